//! The `docker` sandbox, end to end through `peerbuild run --sandbox docker --image ...`: the
//! ordinary CodeBuild behaviours inside a container, the container gone afterwards, and escape
//! probes that must find nothing of the host.
//!
//! No registry can be reached, so the tests build their own image from local files: the static
//! busybox (Debian's `busybox-static`) and its applet links, imported with `docker import` as
//! [`IMAGE`] (once; an existing image is kept). Where there is no Docker engine or no static
//! busybox, each test prints why and returns early, except under `CI=true`, where that is a
//! failure.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use expect_test::expect;
use tests::{Outside, Project, Run, TempDir};

/// The test image: busybox only, so `/bin/sh` is busybox's ash and there is no bash.
const IMAGE: &str = "peerbuild-test-busybox:1";

/// Whether the engine answers and the test image exists (importing it if needed), checked once.
fn available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    match AVAILABLE.get_or_init(prepare_image) {
        Ok(()) => true,
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the docker sandbox must be testable under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: the docker sandbox cannot be tested here: {reason}");
            false
        }
    }
}

fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Imports [`IMAGE`] from a root folder holding the static busybox and its applet links.
fn prepare_image() -> Result<(), String> {
    docker(&["version", "--format", "{{.Server.Version}}"])?;
    if docker(&["image", "inspect", IMAGE]).is_ok() {
        return Ok(());
    }
    let root = TempDir::new("docker-image");
    tests::busybox_root(root.path())?;
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    let archive = tar.stdout.take().ok_or("no tar output")?;
    let imported = Command::new("docker")
        .args(["import", "-", IMAGE])
        .stdin(Stdio::from(archive))
        .output()
        .map_err(|e| format!("cannot run docker import: {e}"))?;
    let _ = tar.wait();
    if !imported.status.success() {
        return Err(format!(
            "docker import failed: {}",
            String::from_utf8_lossy(&imported.stderr).trim()
        ));
    }
    Ok(())
}

/// A project whose buildspec runs `commands` in its build phase, in `/bin/sh`.
fn build_of(commands: &[&str]) -> Project {
    build_of_in(Project::new(&[]), commands, "")
}

/// Writes into `project` a buildspec (`sh`) running `commands` in its build phase, followed by
/// `rest` (more top-level keys).
fn build_of_in(project: Project, commands: &[&str], rest: &str) -> Project {
    let mut spec =
        String::from("version: 0.2\nenv:\n  shell: sh\nphases:\n  build:\n    commands:\n");
    for command in commands {
        spec.push_str(&format!("      - '{}'\n", command.replace('\'', "''")));
    }
    spec.push_str(rest);
    project.write("buildspec.yml", &spec);
    project
}

fn run_docker(project: &Project, extra: &[&str]) -> Run {
    let mut args = vec!["--sandbox", "docker", "--image", IMAGE];
    args.extend_from_slice(extra);
    project.run(&args)
}

/// `peerbuild run src --json --sandbox docker --image IMAGE ARGS` with extra environment.
fn run_docker_with_env(project: &Project, env: &[(&str, &str)], extra: &[&str]) -> String {
    let mut command = project.command();
    command.args([
        "run",
        "src",
        "--json",
        "--sandbox",
        "docker",
        "--image",
        IMAGE,
    ]);
    command.args(extra);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("peerbuild runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The ids of every container on this machine, running or not.
fn containers() -> Vec<String> {
    docker(&["ps", "-a", "-q", "--no-trunc"])
        .expect("docker ps")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The container id a build printed with `echo container=$(hostname)` (a container's host
/// name is the start of its id).
fn container_of(text: &str) -> String {
    text.split("container=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_hexdigit()).next())
        .find(|id| id.len() >= 12)
        .unwrap_or_else(|| panic!("no container id in: {text}"))
        .to_owned()
}

fn assert_gone(container: &str) {
    let left: Vec<String> = containers()
        .into_iter()
        .filter(|id| id.starts_with(container))
        .collect();
    assert!(
        left.is_empty(),
        "the build's container is still there: {left:?}"
    );
}

#[test]
fn ordinary_behaviours_hold_inside() {
    if !available() {
        return;
    }
    // The buildspec asks for bash (the default); the image has none, so the shell is /bin/sh
    // and the log says so once.
    let (transcript, copied) =
        tests::backend_conformance(&["--sandbox", "docker", "--image", IMAGE]);
    assert_eq!(
        transcript,
        tests::backend_conformance_transcript("docker", IMAGE, true)
    );
    assert_eq!(copied, "made inside\n");
}

#[test]
fn output_comes_before_its_commands_status() {
    if !available() {
        return;
    }
    // Much output, then at once the status: every line must be shown with its command, ahead
    // of the next command.
    let project = build_of(&[
        "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; echo to stderr >&2",
        "echo after",
    ]);
    let run = run_docker(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let transcript = run.transcript();
    let lines: Vec<&str> = transcript.lines().collect();
    let position = |wanted: &str| {
        lines
            .iter()
            .position(|l| *l == wanted)
            .unwrap_or_else(|| panic!("no `{wanted}` in {transcript}"))
    };
    let last = position("| line2999");
    assert!(position("| line0") < last);
    assert!(last < position("| to stderr"));
    assert!(position("| to stderr") < position("$ echo after"));
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("| line")).count(),
        3000
    );
}

#[test]
fn the_container_is_gone_after_the_build() {
    if !available() {
        return;
    }
    let project = build_of(&[
        "echo container=$(hostname)",
        "(sleep 300 &) ; sleep 300 > /dev/null 2>&1 &",
        "echo left running",
    ]);
    let run = run_docker(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_gone(&container_of(&run.log()));
}

#[test]
fn a_timeout_removes_the_container() {
    if !available() {
        return;
    }
    let project = build_of(&["echo container=$(hostname)", "sleep 300"]);
    let started = std::time::Instant::now();
    let run = run_docker(&project, &["--timeout", "2s"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(run.result()["status"], "TIMED_OUT");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_gone(&container_of(&run.log()));
}

#[test]
fn a_shell_that_exits_is_replaced() {
    if !available() {
        return;
    }
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nenv:\n  shell: sh\nphases:\n  build:\n    commands:\n      - echo container=$(hostname)\n      - exit 4\n  post_build:\n    commands:\n      - echo still here > after.txt; cat after.txt\n",
    )]);
    let run = run_docker(&project, &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.log().contains("still here"), "{}", run.stdout);
    assert_gone(&container_of(&run.log()));
}

/// A project like [`build_of`]'s, whose buildspec also says `peerbuild: network: VALUE`.
fn build_with_network(network: &str, commands: &[&str]) -> Project {
    let mut spec = format!(
        "version: 0.2\nenv:\n  shell: sh\npeerbuild:\n  network: {network}\nphases:\n  build:\n    commands:\n"
    );
    for command in commands {
        spec.push_str(&format!("      - '{}'\n", command.replace('\'', "''")));
    }
    Project::new(&[("buildspec.yml", &spec)])
}

/// A busybox command that connects to `address:port` and prints what it read, or `no answer`
/// (`-w` bounds the connection attempt only; `timeout` bounds a connection that got through).
fn connect(address: &str, port: u16) -> String {
    format!("timeout 5 nc -w 3 {address} {port} || echo no answer from {address}")
}

#[test]
fn network_false_means_no_network() {
    if !available() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let outside = Outside::new();
    let project = build_with_network(
        "false",
        &[
            &format!("echo hello | nc -w 2 127.0.0.1 {port} && echo connected || echo refused"),
            "ls /sys/class/net | tr \"\\n\" \" \"; echo",
            &connect(&outside.address, outside.port),
        ],
    );
    let run = run_docker(&project, &[]);
    let out = run.log();
    assert!(
        out.contains("refused") && !out.contains("connected"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.trim() == "lo"), "interfaces: {out}");
    assert!(
        out.contains(&format!("no answer from {}", outside.address)),
        "{out}"
    );
    assert!(
        listener.accept().is_err(),
        "the build reached the host's loopback"
    );
    // A docker build that does not ask for network gets none.
    let run = run_docker(&build_of(&[&connect(&outside.address, outside.port)]), &[]);
    assert!(
        run.log()
            .contains(&format!("no answer from {}", outside.address)),
        "{}",
        run.log()
    );
}

#[test]
fn builds_reach_other_machines_but_never_the_host() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    // A service on every address of the host, as the pool's port is.
    let (listener, port) = tests::host_listener();
    let mut host_addresses = vec![outside.host_address.clone()];
    host_addresses.extend(tests::default_route_address());
    let gateway = "$(ip route | awk \"/default/ {print \\$3}\")";
    let mut commands = vec![
        connect(&outside.address, outside.port),
        // The bridge's own address on the host, the container's gateway.
        format!("timeout 5 nc -w 3 {gateway} {port} || echo no answer from the gateway"),
    ];
    commands.extend(host_addresses.iter().map(|a| connect(a, port)));
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let run = run_docker(&build_with_network("true", &commands), &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let log = run.log();
    // The network works (the outside machine answers), so what fails is the guard's doing.
    assert!(log.starts_with(Outside::GREETING), "{log}");
    assert!(log.contains("no answer from the gateway"), "{log}");
    for address in &host_addresses {
        assert!(
            log.contains(&format!("no answer from {address}")),
            "the build reached the host at {address}: {log}"
        );
    }
    assert!(
        listener.accept().is_err(),
        "the build reached a service on the host's own addresses"
    );
}

#[test]
fn the_docker_socket_is_out_of_reach() {
    if !available() {
        return;
    }
    let project = build_of(&[
        "for s in /var/run/docker.sock /run/docker.sock; do test -e $s && echo found $s; done; echo looked",
        "grep -c docker.sock /proc/mounts || true",
    ]);
    let run = run_docker(&project, &[]);
    let out = run.log();
    assert!(out.contains("looked") && !out.contains("found"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "0"), "{out}");
}

#[test]
fn no_capabilities_and_no_new_privileges() {
    if !available() {
        return;
    }
    let project = build_of(&["grep -E \"^(CapEff|CapBnd|NoNewPrivs)\" /proc/self/status"]);
    let run = run_docker(&project, &[]);
    expect![[r#"
        CapEff:	0000000000000000
        CapBnd:	0000000000000000
        NoNewPrivs:	1"#]]
    .assert_eq(&run.log());
}

#[test]
fn the_hosts_environment_and_files_stay_out() {
    if !available() {
        return;
    }
    let secret = tests::marker("docker-secret");
    let name = tests::marker("docker-canary");
    let canary = std::path::PathBuf::from(format!("/root/{name}"));
    let planted = std::fs::write(&canary, &secret).is_ok();
    if planted {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o600));
    }
    let project = build_of(&[
        "env | sort",
        &format!("cat /root/{name} || echo no root canary"),
        "cat /etc/passwd",
    ]);
    let out = run_docker_with_env(&project, &[("PEERBUILD_PROBE_MARKER", &secret)], &[]);
    if planted {
        let _ = std::fs::remove_file(&canary);
    }
    assert!(out.contains("CODEBUILD_SRC_DIR="), "{out}");
    assert!(out.contains("no root canary"), "{out}");
    assert!(
        !out.contains(&secret),
        "the build saw the host's secret: {out}"
    );
}

#[test]
fn host_processes_the_data_directory_and_host_files_are_out_of_reach() {
    if !available() {
        return;
    }
    let secret = tests::marker("docker-env-secret");
    let project = Project::new(&[]);
    // A canary in the node's data directory, and a host process holding a secret in its
    // environment, with its pid known to the build.
    std::fs::create_dir_all(project.data()).expect("data dir");
    let data_canary = project.data().join("canary");
    std::fs::write(&data_canary, &secret).expect("plant");
    let mut host_process = Command::new("sleep")
        .arg("300")
        .env("PEERBUILD_PROBE_SECRET", &secret)
        .spawn()
        .expect("sleep starts");
    let pid = host_process.id();
    let outside = format!("/etc/{}", tests::marker("docker-write"));
    let commands = [
        format!("cat {} 2>/dev/null || echo no data canary", data_canary.display()),
        "cat /proc/[0-9]*/environ 2>/dev/null | tr \"\\000\" \"\\n\" | grep -c PEERBUILD_PROBE_SECRET || true".to_owned(),
        format!("kill -9 {pid} 2>/dev/null && echo killed || echo cannot kill"),
        format!("echo planted > {outside} && echo wrote inside"),
        "mkdir -p out && ln -s /etc/shadow out/shadow && echo mine > out/mine".to_owned(),
        // The container's files are another file system: no hard link reaches them.
        "ln /etc/passwd out/hard 2>/dev/null && echo hard-linked || echo no-hard-link".to_owned(),
    ];
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let project = build_of_in(
        project,
        &commands,
        "artifacts:\n  files:\n    - 'out/**/*'\n",
    );
    let collected = TempDir::new("docker-collected");
    let out = run_docker_with_env(
        &project,
        &[],
        &[
            "--artifacts",
            &collected.path().join("out").display().to_string(),
        ],
    );
    let alive = host_process.try_wait().expect("wait").is_none();
    let _ = host_process.kill();
    let _ = host_process.wait();
    assert!(out.contains("no data canary"), "{out}");
    assert!(!out.contains(&secret), "the build saw a host secret: {out}");
    assert!(out.contains("cannot kill") && alive, "{out}");
    assert!(out.contains("wrote inside"), "{out}");
    assert!(out.contains("no-hard-link"), "{out}");
    assert!(
        !std::path::Path::new(&outside).exists(),
        "the build wrote {outside} on the host"
    );
    let mine = collected.path().join("out/out/mine");
    assert_eq!(
        std::fs::read_to_string(&mine).ok().as_deref(),
        Some("mine\n"),
        "{out}"
    );
    let shadow = collected.path().join("out/out/shadow");
    assert!(
        std::fs::read_to_string(&shadow).map_or(true, |text| !text.contains("root:")),
        "the collector followed a link out of the workspace"
    );
}

#[test]
fn a_fork_bomb_meets_the_process_limit() {
    if !available() {
        return;
    }
    // First prove the limit is in force with a bounded loop (harmless without a limit), and
    // only then let the bomb go.
    let project = build_of(&[
        "echo container=$(hostname)",
        "sh -c \"i=0; while [ \\$i -lt 200 ]; do sleep 5 & i=\\$((i+1)); done; echo all 200 forked\" 2>/dev/null; echo probe done",
        "sh -c \"f() { f | f & }; f\" 2>/dev/null; echo the shell still answers",
    ]);
    let started = std::time::Instant::now();
    let out = run_docker_with_env(
        &project,
        &[("PEERBUILD_SANDBOX_PROCESS_LIMIT", "64")],
        &["--timeout", "30s"],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{out}"
    );
    assert!(out.contains("\"line\":\"probe done\""), "{out}");
    assert!(
        !out.contains("\"line\":\"all 200 forked\""),
        "no limit: {out}"
    );
    assert!(
        out.contains("\"line\":\"the shell still answers\""),
        "{out}"
    );
    assert_gone(&container_of(&out));
}

#[test]
fn an_output_flood_meets_the_output_limit() {
    if !available() {
        return;
    }
    let marker = tests::marker("flood");
    let project = build_of(&[
        "echo container=$(hostname)",
        &format!("yes {marker}"),
        "echo never",
    ]);
    let out = run_docker_with_env(
        &project,
        &[("PEERBUILD_SANDBOX_OUTPUT_LIMIT", "1M")],
        &["--timeout", "60s"],
    );
    assert!(
        out.contains("printed more than 1048576 bytes of output, its limit"),
        "{}",
        &out[out.len().saturating_sub(2000)..]
    );
    assert!(!out.contains("\"line\":\"never\""));
    let kept = out.matches(&marker).count();
    assert!(
        kept > 1000 && kept <= (1 << 20) / marker.len(),
        "{kept} lines kept"
    );
    assert_gone(&container_of(&out));
}

#[test]
fn memory_past_the_limit_is_refused() {
    if !available() {
        return;
    }
    // A 256 MiB shell variable: harmless without a limit, killed with a 64 MiB one.
    let project = Project::new(&[
        (
            "grow.sh",
            "x=$(head -c 268435456 /dev/zero | tr '\\0' a)\necho grew\n",
        ),
        (
            "buildspec.yml",
            "version: 0.2\nenv:\n  shell: sh\nphases:\n  build:\n    commands:\n      - sh grow.sh; echo status=$?\n",
        ),
    ]);
    let out = run_docker_with_env(
        &project,
        &[("PEERBUILD_SANDBOX_MEMORY_LIMIT", "64M")],
        &["--timeout", "60s"],
    );
    assert!(out.contains("status=137"), "not killed: {out}");
    assert!(!out.contains("\"line\":\"grew\""), "{out}");
}

#[test]
fn privileged_mode_needs_the_owners_consent() {
    if !available() {
        return;
    }
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
env:
  shell: sh
batch:
  build-list:
    - identifier: dind
      env:
        privileged-mode: true
phases:
  build:
    commands:
      - grep CapEff /proc/self/status
"#,
    )]);
    let refused = run_docker(&project, &[]);
    expect![[r#"
        exit 2
        stderr: peerbuild: batch member `dind` asks for privileged-mode, which this node does not allow; pass --allow-privileged, or set sandbox.privileged = true in <DATA>/config.toml"#]].assert_eq(&refused.transcript());
    let allowed = run_docker(&project, &["--allow-privileged"]);
    // Some engines cannot start privileged containers at all (one itself running with fewer
    // capabilities); there the member must fail with the engine's reason, which also shows
    // that privilege was asked for, since ordinary containers start.
    if docker(&["run", "--rm", "--privileged", IMAGE, "true"]).is_ok() {
        assert_eq!(allowed.code, 0, "{}", allowed.stdout);
        assert!(
            !allowed.log().contains("0000000000000000"),
            "a privileged member keeps its capabilities: {}",
            allowed.log()
        );
    } else {
        assert_eq!(allowed.code, 3, "{}", allowed.stdout);
        assert!(
            allowed
                .stdout
                .contains("the Docker engine refused to start the build's container"),
            "{}",
            allowed.stdout
        );
    }
}

#[test]
fn images_are_chosen_and_checked_before_anything_runs() {
    let project = build_of(&["echo ran"]);
    let no_image = project.run(&["--sandbox", "docker"]);
    expect![[r#"
        exit 2
        stderr: peerbuild: the docker sandbox needs an image: pass --image NAME or set peerbuild.image in the buildspec"#]]
    .assert_eq(&no_image.transcript());
    let image_elsewhere = project.run(&["--sandbox", "host", "--image", IMAGE]);
    expect![[r#"
        exit 2
        stderr: peerbuild: --image peerbuild-test-busybox:1 needs the docker or namespace sandbox; the host sandbox uses this machine's files"#]]
    .assert_eq(&image_elsewhere.transcript());
    if !available() {
        return;
    }
    let missing = project.run(&[
        "--sandbox",
        "docker",
        "--image",
        "peerbuild-no-such-image:0",
    ]);
    expect![[r#"
        exit 2
        stderr: peerbuild: image peerbuild-no-such-image:0 is not on this machine; no registry can be reached: build or import it (docker import)"#]]
    .assert_eq(&missing.transcript());
    let from_buildspec = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nenv:\n  shell: sh\npeerbuild:\n  sandbox: docker\n  image: {IMAGE}\nphases:\n  build:\n    commands:\n      - echo sandbox=$PEERBUILD_SANDBOX\n"
        ),
    )]);
    let run = from_buildspec.run(&[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.log().contains("sandbox=docker"), "{}", run.stdout);
}

#[test]
fn an_unreachable_engine_is_a_fault_with_its_reason() {
    let project = build_of(&["echo ran"]);
    let output = project
        .command()
        .env("DOCKER_HOST", "unix:///nonexistent/peerbuild-test.sock")
        .args([
            "run",
            "src",
            "--json",
            "--sandbox",
            "docker",
            "--image",
            IMAGE,
        ])
        .output()
        .expect("peerbuild runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "the docker sandbox is not available on this machine: cannot reach the Docker engine"
        ),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("\"line\":\"ran\""));
}

#[test]
fn containers_left_by_a_node_that_died_are_removed_by_the_next() {
    use std::io::BufRead;
    if !available() {
        return;
    }
    let project = build_of(&["echo container=$(hostname)", "sleep 300"]);
    let mut node = project
        .command()
        .args([
            "run",
            "src",
            "--json",
            "--sandbox",
            "docker",
            "--image",
            IMAGE,
        ])
        .args(["--timeout", "60s"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("peerbuild starts");
    let stdout = node.stdout.take().expect("piped");
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("\"line\":\"container="))
        .expect("the build names its container");
    let container = container_of(&line);
    // SIGKILL: the node gets no chance to remove the container.
    node.kill().expect("kill");
    node.wait().expect("wait");
    // (Another test's node may already have removed it: the sweep runs at every start.)
    let next = run_docker(&build_of(&["true"]), &[]);
    assert_eq!(next.code, 0, "{}", next.stdout);
    assert_gone(&container);
}

/// A container on this machine, removed when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// A namespace build (whose outbound traffic leaves from the host itself, through slirp4netns)
/// reaches neither a container on the host's bridge nor a port a container publishes on the
/// host's addresses (which Docker rewrites to the container before ordinary filters look).
#[test]
fn a_namespace_build_reaches_no_container_on_this_machine() {
    if !available() {
        return;
    }
    let marker = tests::marker("container-greeting");
    let id = docker(&[
        "run",
        "-d",
        "-p",
        "8080",
        IMAGE,
        "sh",
        "-c",
        &format!("while true; do echo {marker} | nc -l -p 8080; done"),
    ])
    .expect("a container starts");
    let container = Container(id.trim().to_owned());
    let address = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &container.0,
    ])
    .expect("inspect")
    .trim()
    .to_owned();
    let published = docker(&["port", &container.0, "8080/tcp"]).expect("port");
    let host_port: u16 = published
        .lines()
        .find_map(|l| l.strip_prefix("0.0.0.0:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no published port in {published}"));
    // The container answers the host itself, so a failure below is the guard's doing.
    let from_host = Command::new("bash")
        .args([
            "-c",
            &format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{address}/8080 && head -1 <&3'"),
        ])
        .output()
        .expect("bash");
    assert!(
        String::from_utf8_lossy(&from_host.stdout).contains(&marker),
        "the container does not answer the host"
    );
    let outside = Outside::new();
    let mut targets = vec![
        (outside.address.clone(), outside.port),
        (address.clone(), 8080),
    ];
    targets.extend(tests::default_route_address().map(|a| (a, host_port)));
    let commands: Vec<String> = targets
        .iter()
        .map(|(a, p)| {
            format!("timeout 5 bash -c \"exec 3<>/dev/tcp/{a}/{p} && head -1 <&3\" 2>/dev/null || echo no answer from {a}:{p}")
        })
        .collect();
    let mut spec = String::from("version: 0.2\nphases:\n  build:\n    commands:\n");
    for command in &commands {
        spec.push_str(&format!("      - '{}'\n", command.replace('\'', "''")));
    }
    let project = Project::new(&[("buildspec.yml", &spec)]);
    let run = project.run(&["--sandbox", "namespace"]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let log = run.log();
    // The network works (the outside machine answers), so what fails is the guard's doing.
    assert!(log.starts_with(Outside::GREETING), "{log}");
    assert!(
        !log.contains(&marker),
        "the build reached a container: {log}"
    );
    for (address, port) in &targets[1..] {
        assert!(
            log.contains(&format!("no answer from {address}:{port}")),
            "{log}"
        );
    }
}
