//! The `namespace` sandbox, end to end: escape probes (each its own buildspec, run through
//! `peerbuild run --sandbox namespace`) that must find nothing of the host, limits that must
//! hold, and the ordinary CodeBuild behaviours that must still hold inside.
//!
//! Where this machine cannot build the sandbox, each test prints why and returns early, except
//! under `CI=true`, where that is a failure.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tests::{Outside, Project, Run, TempDir, processes_with};

/// Whether this machine builds namespace sandboxes, checked once with a trivial build.
fn available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = AVAILABLE.get_or_init(|| {
        // The network tests need slirp4netns and nft, and the probe builds a sandbox now.
        tests::ensure_test_packages();
        let project = Project::new(&[(
            "buildspec.yml",
            "version: 0.2\nphases:\n  build:\n    commands: ['true']\n",
        )]);
        let run = project.run(&["--sandbox", "namespace"]);
        match run.code {
            0 => Ok(()),
            _ => Err(format!("exit {}: {}", run.code, run.stderr.trim())),
        }
    });
    match verdict {
        Ok(()) => true,
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the namespace sandbox must work under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: the namespace sandbox is not available here: {reason}");
            false
        }
    }
}

/// A project whose buildspec runs `commands` in its build phase.
fn build_of(commands: &[&str]) -> Project {
    let mut spec = String::from("version: 0.2\nphases:\n  build:\n    commands:\n");
    for command in commands {
        spec.push_str(&format!("      - {}\n", yaml_string(command)));
    }
    Project::new(&[("buildspec.yml", &spec)])
}

fn yaml_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn run_namespaced(project: &Project, extra: &[&str]) -> Run {
    let mut args = vec!["--sandbox", "namespace"];
    args.extend_from_slice(extra);
    project.run(&args)
}

/// `peerbuild run src --json --sandbox namespace --timeout TIMEOUT` with one limit set in the
/// environment.
fn run_limited(
    project: &Project,
    (variable, value): (&str, &str),
    timeout: &str,
) -> std::process::Output {
    project
        .command()
        .env(variable, value)
        .args([
            "run",
            "src",
            "--json",
            "--sandbox",
            "namespace",
            "--timeout",
            timeout,
        ])
        .output()
        .expect("peerbuild runs")
}

/// A file removed when dropped.
struct Canary(std::path::PathBuf);

impl Canary {
    fn plant(path: std::path::PathBuf, secret: &str) -> Canary {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&path, secret).expect("write the canary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Canary(path)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn ordinary_behaviours_hold_inside() {
    if !available() {
        return;
    }
    let (transcript, copied) = tests::backend_conformance(&["--sandbox", "namespace"]);
    assert_eq!(
        transcript,
        tests::backend_conformance_transcript("namespace", "host", false)
    );
    assert_eq!(copied, "made inside\n");
}

#[test]
fn home_folders_and_the_data_directory_are_masked() {
    if !available() {
        return;
    }
    let secret = tests::marker("canary");
    // A data directory outside /tmp (which is private inside anyway), so the mask itself is
    // what hides it.
    let data = Folder::new(format!("/var/tmp/{secret}-data").into());
    let contents = format!("{secret}-contents");
    let _root = Canary::plant(format!("/root/{secret}").into(), &contents);
    let _data = Canary::plant(data.0.join("canary"), &contents);
    let project = build_of(&[
        &format!("cat /root/{secret} || echo no root canary"),
        &format!("cat {}/canary || echo no data canary", data.0.display()),
        &format!("ls -a {} /root /home", data.0.display()),
        &format!(
            "grep -rsF \"$(printf %s {secret} -contents)\" /root /home /var/tmp; echo searched"
        ),
    ]);
    let output = project
        .command()
        .env("PEERBUILD_DATA_DIR", &data.0)
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .output()
        .expect("peerbuild runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("no root canary"), "{stdout}");
    assert!(stdout.contains("no data canary"), "{stdout}");
    assert!(stdout.contains("searched"), "{stdout}");
    assert!(
        !stdout.contains(&contents),
        "the build read a canary: {stdout}"
    );
}

/// A folder removed when dropped.
struct Folder(std::path::PathBuf);

impl Folder {
    fn new(path: std::path::PathBuf) -> Folder {
        std::fs::create_dir_all(&path).expect("mkdir");
        Folder(path)
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn other_processes_environments_are_out_of_reach() {
    if !available() {
        return;
    }
    let secret = tests::marker("environ");
    let project = build_of(&[
        "cat /proc/1/environ | tr \"\\0\" \"\\n\"; echo read init",
        "for f in /proc/[0-9]*/environ; do tr \"\\0\" \"\\n\" < $f; done; echo read all",
        "env",
    ]);
    let output = project
        .command()
        .env("PEERBUILD_PROBE_SECRET", &secret)
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .output()
        .expect("peerbuild runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("read all"), "{stdout}");
    assert!(
        !stdout.contains(&secret),
        "the build saw the node's environment: {stdout}"
    );
}

#[test]
fn host_processes_cannot_be_signalled() {
    if !available() {
        return;
    }
    let mut victim = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep starts");
    let pid = victim.id();
    let project = build_of(&[&format!("kill -9 {pid} || echo kill refused")]);
    let run = run_namespaced(&project, &[]);
    let survived = victim.try_wait().expect("wait").is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(survived, "the build killed a host process: {}", run.log());
    assert!(run.log().contains("kill refused"), "{}", run.log());
}

#[test]
fn the_hosts_loopback_is_out_of_reach() {
    if !available() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let project = build_of(&[&format!(
        "bash -c \"echo hello > /dev/tcp/127.0.0.1/{port}\" && echo connected || echo refused"
    )]);
    let run = run_namespaced(&project, &[]);
    let out = run.log();
    assert!(
        out.contains("refused") && !out.contains("connected"),
        "{out}"
    );
    assert!(
        listener.accept().is_err(),
        "the build reached the host's loopback"
    );
}

#[test]
fn writes_outside_the_workspace_stay_in_the_sandbox() {
    if !available() {
        return;
    }
    let name = tests::marker("probe");
    let target = format!("/etc/peerbuild-probe-{name}");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  install:\n    commands:\n      - echo inside > {target}\n      - mkdir -p /root/.m2 && echo cached > /root/.m2/settings\n  build:\n    commands:\n      - cat {target} /root/.m2/settings\n"
        ),
    )]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(run.log(), "inside\ncached");
    assert!(
        !std::path::Path::new(&target).exists(),
        "the build wrote {target} on the host"
    );
    assert!(!std::path::Path::new("/root/.m2/settings").exists() || host_m2_existed());
}

#[test]
fn caches_outside_the_workspace_travel_between_builds_and_never_touch_the_host() {
    if !available() {
        return;
    }
    let marker = tests::marker("m2");
    // The first build fills /root/.m2 (the sandbox's, in its overlay); the second finds it
    // restored there, owned by the build's root, next to a file of its own it did not lose.
    let spec = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - mkdir -p /root/.m2/repository/org && ls -ln /root/.m2/repository/org\n      - test -f /root/.m2/repository/org/lib.jar || echo {marker} > /root/.m2/repository/org/lib.jar\n      - cat /root/.m2/repository/org/lib.jar\nartifacts:\n  files:\n    - '**/*'\ncache:\n  key: m2-{marker}\n  paths:\n    - '/root/.m2/**/*'\n"
    );
    let project = Project::new(&[("buildspec.yml", &spec)]);
    let first = run_namespaced(&project, &[]);
    assert_eq!(first.code, 0, "{}", first.stdout);
    assert!(
        first.stdout.contains("cache saved: 1 files"),
        "{}",
        first.stdout
    );
    let artifacts = TempDir::new("ns-m2-artifacts");
    let out = artifacts.path().join("out");
    let second = run_namespaced(&project, &["--artifacts", &out.display().to_string()]);
    assert_eq!(second.code, 0, "{}", second.stdout);
    assert!(
        second.stdout.contains("cache hit: restored 1 files"),
        "{}",
        second.stdout
    );
    let log = second.log();
    assert!(log.contains(" 0 0 ") && log.ends_with(&marker), "{log}");
    assert!(
        !std::path::Path::new("/root/.m2/repository/org/lib.jar").exists()
            || std::fs::read_to_string("/root/.m2/repository/org/lib.jar")
                .is_ok_and(|s| !s.contains(&marker)),
        "the cache was restored onto the host's /root"
    );
    // The staging folder is gone before the artifacts are collected: `**/*` finds only the
    // build's own files.
    let collected: Vec<_> = std::fs::read_dir(&out)
        .expect("artifacts")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(collected, ["buildspec.yml"], "{}", second.stdout);
}

#[test]
fn an_output_flood_meets_the_output_limit() {
    if !available() {
        return;
    }
    let marker = tests::marker("flood");
    let project = build_of(&[&format!("yes {marker}"), "echo never"]);
    let output = run_limited(&project, ("PEERBUILD_SANDBOX_OUTPUT_LIMIT", "1M"), "60s");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("printed more than 1048576 bytes of output, its limit"),
        "{}",
        &stdout[stdout.len().saturating_sub(2000)..]
    );
    assert!(!stdout.contains("\"line\":\"never\""));
    // What was kept is bounded by the limit (each line is one JSON event).
    let kept = stdout.matches(&marker).count();
    assert!(
        kept > 1000 && kept <= (1 << 20) / marker.len(),
        "{kept} lines kept"
    );
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

/// Whether the machine's own root already had Maven settings (the probe above must not be
/// blamed for them).
fn host_m2_existed() -> bool {
    std::fs::read_to_string("/root/.m2/settings").is_ok_and(|s| s != "cached\n")
}

#[test]
fn nothing_started_inside_outlives_the_build() {
    if !available() {
        return;
    }
    let marker = tests::marker("ns-daemon");
    let project = build_of(&[
        &format!("(setsid sh -c \"sleep 300 && echo {marker}\" &)"),
        &format!("nohup sh -c \"sleep 300 && echo {marker}\" >/dev/null 2>&1 &"),
        "echo started",
    ]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn a_fork_bomb_meets_the_process_limit() {
    if !available() {
        return;
    }
    let marker = tests::marker("bomb");
    // First prove the limit is in force with a bounded loop (harmless without a limit), and
    // only then let the bomb go.
    let project = Project::new(&[
        ("fork_probe.py", FORK_PROBE),
        (
            "buildspec.yml",
            &format!(
                r#"version: 0.2
phases:
  install:
    commands:
      - LIMITED=$(python3 fork_probe.py)
      - echo "limited=$LIMITED"
  build:
    commands:
      - 'if [ "$LIMITED" = yes ]; then bash -c ": {marker}; f() {{ f | f & }}; f" 2>/dev/null; fi'
      - echo the shell still answers
"#
            ),
        ),
    ]);
    let started = std::time::Instant::now();
    let output = run_limited(&project, ("PEERBUILD_SANDBOX_PROCESS_LIMIT", "64"), "30s");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("limited=yes"),
        "the limit is not in force ({}): {stdout}{stderr}",
        output.status
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

/// Forks sleeping children until refused or 200 exist; prints `yes` when refused early.
const FORK_PROBE: &str = "\
import os, time
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            os.close(1)
            time.sleep(2)
            os._exit(0)
        n += 1
except OSError:
    pass
print('yes' if n < 200 else 'no')
";

#[test]
fn memory_past_the_limit_is_refused() {
    if !available() {
        return;
    }
    // Allocates up to 512 MiB in 16 MiB steps: harmless without a limit, killed with one.
    let project = Project::new(&[
        ("grow.py", GROW),
        (
            "buildspec.yml",
            "version: 0.2\nphases:\n  build:\n    commands:\n      - python3 grow.py > steps.txt; echo status=$?\n      - echo steps=$(wc -l < steps.txt)\n",
        ),
    ]);
    let output = run_limited(&project, ("PEERBUILD_SANDBOX_MEMORY_LIMIT", "128M"), "60s");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("status=137"),
        "not killed: {stdout}{stderr}"
    );
    let steps: u32 = stdout
        .rsplit("steps=")
        .next()
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("a step count");
    assert!(
        steps < 8,
        "allocated {steps} x 16 MiB under a 128 MiB limit"
    );
    // The kill is reported as what it was, not only as a status 137.
    assert!(
        stdout.contains("the kernel killed 1 of its processes for want of memory"),
        "{stdout}"
    );
}

/// The helper moves init into the session's cgroups while init builds the sandbox; the build's
/// very first command must already be inside them, at the root of its own cgroup namespace (a
/// namespace made before the move would show the session's cgroup as `/peerbuild-PID`).
#[test]
fn the_first_command_runs_in_the_sessions_cgroups() {
    if !available() {
        return;
    }
    let project = build_of(&["cat /proc/self/cgroup"]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let log = run.log();
    let lines: Vec<&str> = log.lines().filter(|line| line.contains(':')).collect();
    assert!(!lines.is_empty(), "{log}");
    for line in lines {
        assert!(line.ends_with(":/"), "outside the session's cgroup: {log}");
    }
}

const GROW: &str = "\
blocks = []
for i in range(32):
    blocks.append(bytearray(16 << 20))
    print(i + 1, flush=True)
";

#[test]
fn the_node_environment_stays_out() {
    if !available() {
        return;
    }
    let secret = tests::marker("env");
    let project = build_of(&["env | sort"]);
    let output = project
        .command()
        .env("PEERBUILD_PROBE_MARKER", &secret)
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .output()
        .expect("peerbuild runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("CODEBUILD_SRC_DIR="), "{stdout}");
    assert!(!stdout.contains(&secret), "{stdout}");
}

#[test]
fn password_hashes_are_scrubbed() {
    if !available() {
        return;
    }
    let project = build_of(&[
        "cut -d: -f2 /etc/shadow | sort -u",
        "useradd builder && id -u builder",
    ]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let out = run.log();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("*"), "{out}");
    assert!(
        lines.next().is_some_and(|uid| uid.parse::<u32>().is_ok()),
        "{out}"
    );
}

#[test]
fn host_unix_sockets_are_out_of_reach() {
    if !available() {
        return;
    }
    let path = std::path::PathBuf::from(format!("/var/tmp/{}.sock", tests::marker("socket")));
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("listen");
    listener.set_nonblocking(true).expect("non-blocking");
    let _socket = Canary(path.clone());
    let project = build_of(&[&format!(
        "python3 -c \"import socket; socket.socket(socket.AF_UNIX).connect(\x27{}\x27)\" 2>/dev/null && echo connected || echo refused",
        path.display()
    )]);
    let run = run_namespaced(&project, &[]);
    let out = run.log();
    assert!(
        out.contains("refused") && !out.contains("connected"),
        "{out}"
    );
    assert!(
        listener.accept().is_err(),
        "the build reached a host socket"
    );
}

#[test]
fn a_sandbox_that_cannot_start_never_falls_back_to_the_host() {
    if !available() {
        return;
    }
    // One process allowed: init itself, so the shell cannot start.
    let project = build_of(&["echo ran anyway"]);
    let output = project
        .command()
        .env("PEERBUILD_SANDBOX_PROCESS_LIMIT", "1")
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .output()
        .expect("peerbuild runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stdout}{stderr}");
    assert!(!stdout.contains("ran anyway"), "{stdout}");
    assert!(
        stderr.contains("cannot start the build's shell"),
        "{stderr}"
    );
}

#[test]
fn files_the_build_creates_belong_to_an_unprivileged_host_user() {
    use std::os::unix::fs::MetadataExt;
    if !available() {
        return;
    }
    let project = build_of(&[
        "cp /bin/true set-uid && chmod 4755 set-uid && ls -n set-uid",
        "sleep 20",
    ]);
    let mut child = project
        .command()
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .stdout(Stdio::null())
        .spawn()
        .expect("peerbuild starts");
    let find = || {
        let work = project.data().join("work");
        std::fs::read_dir(work)
            .ok()?
            .flatten()
            .map(|holder| holder.path().join("src/set-uid"))
            .find(|path| path.exists())
    };
    tests::wait_for(
        "the build's set-uid file",
        std::time::Duration::from_secs(30),
        || find().is_some(),
    );
    let meta = find().and_then(|path| std::fs::symlink_metadata(path).ok());
    // SAFETY: kill only sends a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let meta = meta.expect("the file's attributes");
    assert!(meta.uid() >= 100_000, "owned by host uid {}", meta.uid());
}

#[test]
fn a_timeout_kills_everything_inside() {
    if !available() {
        return;
    }
    let marker = tests::marker("ns-timeout");
    let project = build_of(&[
        &format!("(setsid sh -c \"sleep 300 && echo {marker}\" &)"),
        &format!("sh -c \"sleep 300 && echo {marker}\""),
    ]);
    let run = run_namespaced(&project, &["--timeout", "2s"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(run.result()["status"], "TIMED_OUT");
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn the_collector_never_follows_links_out_of_the_workspace() {
    if !available() {
        return;
    }
    // A host file the build must never get out through the artifact or cache collectors.
    let canary = Canary::plant(
        std::path::PathBuf::from(format!("/var/tmp/{}", tests::marker("collector"))),
        "host-secret",
    );
    let target = canary.0.display().to_string();
    let spec = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - mkdir -p out cached\n      - ln -s {target} out/symlink; ln -s /etc/shadow out/shadow; ln -s ../../.. out/up\n      - ln {target} out/hard 2>/dev/null || echo no-hard-link\n      - ln -s {target} cached/symlink; echo c > cached/real\n      - echo mine > out/mine\nartifacts:\n  files:\n    - 'out/**/*'\ncache:\n  key: collector\n  paths:\n    - 'cached/**/*'\n"
    );
    let project = Project::new(&[("buildspec.yml", &spec)]);
    let artifacts = TempDir::new("ns-collector");
    let folder = artifacts.path().join("out");
    let run = run_namespaced(&project, &["--artifacts", &folder.display().to_string()]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    // The workspace is a mount of its own, so no hard link to a file outside it can be made.
    assert!(run.log().contains("no-hard-link"), "{}", run.log());
    let found = file_contents(&folder);
    assert!(found.iter().any(|t| t == "mine\n"), "{found:?}");
    assert!(
        found
            .iter()
            .all(|t| !t.contains("host-secret") && !t.contains("root:")),
        "the collector copied a file from outside the workspace: {found:?}"
    );
    // Nor does the cache: export the tree it saved and look.
    let keys = project
        .command()
        .args(["cache", "keys", "--json"])
        .output()
        .expect("cache keys");
    let keys = String::from_utf8_lossy(&keys.stdout);
    let tree = keys
        .split("\"tree\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no saved cache: {keys}"));
    let exported = artifacts.path().join("cache");
    let export = project
        .command()
        .args(["cache", "export", tree, &exported.display().to_string()])
        .output()
        .expect("cache export");
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let cached = file_contents(&exported);
    assert!(
        cached.iter().all(|t| !t.contains("host-secret")),
        "the cache holds a file from outside the workspace: {cached:?}"
    );
}

#[test]
fn a_link_in_place_of_the_cache_staging_folder_never_leads_the_node_out() {
    if !available() {
        return;
    }
    // A host folder with a secret, which the build names through a link it plants where the
    // node collects the cache's outside paths, after the staging script ran (while an artifact
    // name is evaluated).
    let secrets = Folder::new(format!("/var/tmp/{}", tests::marker("stage-link")).into());
    let secret = tests::marker("staged-secret");
    std::fs::write(secrets.0.join("secret.txt"), &secret).expect("plant");
    let spec = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - echo ok > out.txt\nartifacts:\n  name: a$(rm -rf .peerbuild-cache-outside; ln -s {dir} .peerbuild-cache-outside)\n  files:\n    - out.txt\ncache:\n  key: stage-link\n  paths:\n    - '/leaktest/**/*'\n",
        dir = secrets.0.display()
    );
    let project = Project::new(&[("buildspec.yml", &spec)]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        !run.stdout.contains("cache saved"),
        "the node saved what the link pointed at: {}",
        run.stdout
    );
    assert!(!run.stdout.contains(&secret), "{}", run.stdout);
}

#[test]
fn a_link_planted_in_the_workspace_never_steers_a_restore_out() {
    if !available() {
        return;
    }
    // A host folder the build points `node_modules` at while its cache key is evaluated, just
    // before the restore writes `node_modules/evil.txt`.
    let target = Folder::new(format!("/var/tmp/{}", tests::marker("restore-link")).into());
    let key = tests::marker("restore-key");
    let save = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - mkdir -p node_modules && echo planted > node_modules/evil.txt\ncache:\n  key: {key}\n  paths:\n    - 'node_modules/**/*'\n"
    );
    let project = Project::new(&[("buildspec.yml", &save)]);
    let first = run_namespaced(&project, &[]);
    assert!(first.stdout.contains("cache saved"), "{}", first.stdout);
    let restore = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - cat node_modules/evil.txt\ncache:\n  key: {key}$(ln -s {dir} node_modules)\n  paths:\n    - 'node_modules/**/*'\n",
        dir = target.0.display()
    );
    project.write("buildspec.yml", &restore);
    let second = run_namespaced(&project, &[]);
    assert!(second.stdout.contains("cache hit"), "{}", second.stdout);
    assert!(
        !target.0.join("evil.txt").exists(),
        "the restore wrote through the build's link onto the host"
    );
}

#[test]
fn phases_in_other_sandboxes_share_the_workspace_both_ways() {
    if !available() {
        return;
    }
    // The build runs in namespace (root inside is uid 100000 outside); BUILD runs on the host
    // (as peerbuild's own user). Each side must be able to change what the other wrote.
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\npeerbuild:\n  phases:\n    build:\n      sandbox: host\nphases:\n  install:\n    commands:\n      - echo from-namespace > a.txt && mkdir -p dir\n  build:\n    commands:\n      - echo from-host >> a.txt && echo from-host > dir/b.txt\n  post_build:\n    commands:\n      - echo again >> a.txt && echo again >> dir/b.txt && cat a.txt dir/b.txt\n",
    )]);
    std::fs::create_dir_all(project.data()).expect("data dir");
    std::fs::write(
        project.data().join("config.toml"),
        "[sandbox]\nallow = [\"namespace\", \"host\"]\n",
    )
    .expect("config");
    let run = project.run(&[]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    assert_eq!(
        run.log(),
        "from-namespace\nfrom-host\nagain\nfrom-host\nagain",
        "{}",
        run.transcript()
    );
}

#[test]
fn an_image_root_folder_is_the_sandboxs_root() {
    if !available() {
        return;
    }
    // An image root folder: busybox only (no bash, no /usr), owned by root as an unpacked
    // image is.
    let image = TempDir::new("ns-image");
    tests::busybox_root(image.path()).expect("a busybox root folder");
    let project = build_of(&[
        "ls /",
        "test -e /usr/bin || echo no-usr",
        "echo written > /etc/inside && cat /etc/inside",
        "echo $CODEBUILD_BUILD_IMAGE",
    ]);
    let root = image.path().display().to_string();
    let run = run_namespaced(&project, &["--image", &root]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let log = run.log();
    assert!(log.contains("no-usr") && log.contains("written"), "{log}");
    assert!(log.lines().any(|l| l == root), "{log}");
    assert!(
        run.transcript()
            .contains("the image has no bash; the build's shell is /bin/sh"),
        "{}",
        run.transcript()
    );
    // The image is only the lower layer: nothing the build wrote reached it.
    assert!(!image.path().join("etc/inside").exists());
    // Not a root folder: refused before anything runs.
    let refused = run_namespaced(&project, &["--image", "busybox:latest"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("the namespace sandbox takes an image's root folder"),
        "{}",
        refused.stderr
    );
}

/// The contents of every regular file under `dir` (symlinks are not followed).
fn file_contents(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).expect("stat");
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                found.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
    }
    found
}

#[test]
fn links_left_in_the_overlay_never_lead_the_next_session_out() {
    if !available() {
        return;
    }
    // The build replaces /etc by a link to a host folder, then ends its shell, so that the
    // next phase's session is prepared (as root, on the host) over that upper layer.
    let target = Folder::new(format!("/var/tmp/{}", tests::marker("links")).into());
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  build:\n    commands:\n      - rm -rf /etc 2>/dev/null; ln -s {} /etc && echo linked\n      - exit 1\n  post_build:\n    commands:\n      - echo after\n",
            target.0.display()
        ),
    )]);
    let run = run_namespaced(&project, &[]);
    assert!(run.log().contains("linked"), "{}", run.stdout);
    let written: Vec<_> = std::fs::read_dir(&target.0)
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        written.is_empty(),
        "the helper wrote {written:?} through the build's link"
    );
}

#[test]
fn the_buildspec_chooses_the_sandbox_and_the_command_line_overrides_it() {
    if !available() {
        return;
    }
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\npeerbuild:\n  sandbox: namespace\nphases:\n  build:\n    commands:\n      - echo \"sandbox=$PEERBUILD_SANDBOX\"\n      - awk '{print \"uid map \" $2}' /proc/self/uid_map\n",
    )]);
    let inside = project.run(&[]);
    assert_eq!(inside.code, 0, "{}", inside.stdout);
    assert!(
        inside.stdout.contains("sandbox=namespace"),
        "{}",
        inside.stdout
    );
    assert!(
        inside.stdout.contains("uid map 100000"),
        "root inside maps to 100000: {}",
        inside.stdout
    );
    let host = project.run(&["--sandbox", "host"]);
    assert!(host.stdout.contains("sandbox=host"), "{}", host.stdout);
    assert!(host.stdout.contains("uid map 0"), "{}", host.stdout);
}

/// A shell command that connects to `address:port` and prints what it read, or `no answer`.
/// The connection is given a few seconds: the guard may drop rather than refuse.
fn connect(address: &str, port: u16) -> String {
    format!(
        "timeout 5 bash -c \"exec 3<>/dev/tcp/{address}/{port} && cat <&3\" 2>/dev/null || echo no answer from {address}"
    )
}

/// A project whose buildspec has `peerbuild: network: VALUE` and runs `commands`.
fn build_with_network(network: &str, commands: &[&str]) -> Project {
    let mut spec = format!(
        "version: 0.2\npeerbuild:\n  network: {network}\nphases:\n  build:\n    commands:\n"
    );
    for command in commands {
        spec.push_str(&format!("      - {}\n", yaml_string(command)));
    }
    Project::new(&[("buildspec.yml", &spec)])
}

#[test]
fn builds_reach_other_machines_by_default() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    let project = build_of(&[
        &connect(&outside.address, outside.port),
        // slirp4netns's forwarder, or the resolvers behind a host's loopback resolver.
        "grep -q ^nameserver /etc/resolv.conf && ! grep -q \"^nameserver 127\\.\" /etc/resolv.conf && echo resolver reachable",
    ]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(
        run.log(),
        format!("{}\nresolver reachable", Outside::GREETING),
        "the build did not reach the outside machine"
    );
    // The sandbox's resolv.conf lives in its overlay, never on the host.
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!host.contains("10.0.2.3"), "the host's resolv.conf changed");
}

#[test]
fn the_hosts_own_addresses_are_out_of_reach() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    // A service on every address of the host, as the pool's port is.
    let (listener, port) = tests::host_listener();
    let mut host_addresses = vec![outside.host_address.clone(), "10.0.2.2".to_owned()];
    host_addresses.extend(tests::default_route_address());
    let mut commands = vec![connect(&outside.address, outside.port)];
    commands.extend(host_addresses.iter().map(|a| connect(a, port)));
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let run = run_namespaced(&build_of(&commands), &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let log = run.log();
    // The network works (the outside machine answers), so what fails is the guard's doing.
    assert!(log.starts_with(Outside::GREETING), "{log}");
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
fn network_false_cuts_the_build_off() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    let project = build_with_network("false", &[&connect(&outside.address, outside.port)]);
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(run.log(), format!("no answer from {}", outside.address));
}

#[test]
fn an_owner_who_denies_network_refuses_builds_that_ask() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    let asks = build_with_network("true", &["echo ran"]);
    let run = run_namespaced(&asks, &["--deny-network"]);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("asks for network") && run.stderr.contains("--deny-network"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("ran"), "{}", run.stdout);
    // Asking in a phase is asking too.
    let phase_asks = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\npeerbuild:\n  phases:\n    build:\n      network: true\nphases:\n  build:\n    commands: ['echo ran']\n",
    )]);
    let run = run_namespaced(&phase_asks, &["--deny-network"]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    // A build that did not ask runs, without network.
    let quiet = build_of(&[&connect(&outside.address, outside.port)]);
    let run = run_namespaced(&quiet, &["--deny-network"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(run.log(), format!("no answer from {}", outside.address));
    // The host sandbox cannot cut a build off, so it does not pretend to.
    let run = quiet.run(&["--sandbox", "host", "--deny-network"]);
    assert_eq!(run.code, 2, "{}", run.stdout);
}

#[test]
fn slirp_runs_in_the_guards_group_and_dies_with_the_session() {
    if !available() {
        return;
    }
    let marker = tests::marker("ns-slirp");
    let project = build_of(&[&format!("sh -c \"sleep 2; : {marker}\" && echo slept")]);
    let slirps = std::thread::scope(|scope| {
        let build = scope.spawn(|| run_namespaced(&project, &[]));
        let mut found = Vec::new();
        tests::wait_for("the build's slirp4netns", Duration::from_secs(20), || {
            found = processes_with(&marker)
                .into_iter()
                .filter_map(helper_of)
                .flat_map(slirps_of)
                .collect();
            !found.is_empty() || build.is_finished()
        });
        let run = build.join().expect("the build thread");
        assert_eq!(run.code, 0, "{}", run.stdout);
        found
    });
    assert!(!slirps.is_empty(), "no slirp4netns served the build");
    for pid in slirps {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            !status.contains("slirp4netns") || status.contains("State:\tZ"),
            "slirp4netns {pid} outlived the build"
        );
    }
}

/// The sandbox helper above a process of the build: the last ancestor running
/// `__sandbox-helper` (the sandbox's init, forked from the helper, runs it too).
fn helper_of(pid: i32) -> Option<i32> {
    let is_helper = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("__sandbox-helper"))
    };
    let mut pid = pid;
    let mut helper = None;
    for _ in 0..16 {
        if is_helper(pid) {
            helper = Some(pid);
        } else if helper.is_some() {
            break;
        }
        pid = parent_of(pid)?;
    }
    helper
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The slirp4netns children of `helper`, checked to run in the guard's group (165535).
fn slirps_of(helper: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| parent_of(*pid) == Some(helper))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "slirp4netns")
        })
        .collect();
    for pid in &pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let gid = status.lines().find(|l| l.starts_with("Gid:")).unwrap_or("");
        assert!(
            gid.split_whitespace().skip(1).all(|g| g == "165535"),
            "slirp4netns {pid} runs outside the guard's group: {gid}"
        );
    }
    pids
}

/// The guard is put back for every session: a ruleset flushed while a build runs (an
/// nftables reload) never leaves a later session's slirp4netns unguarded.
#[test]
fn a_flushed_guard_is_restored_before_the_next_session() {
    if !available() {
        return;
    }
    let outside = Outside::new();
    let (listener, port) = tests::host_listener();
    let host = tests::default_route_address().unwrap_or_else(|| outside.host_address.clone());
    // The first shell waits, then exits: the build phase starts a new session, after the test
    // has deleted the guard's table.
    let project = build_with_network(
        "true",
        &[
            "sleep 3",
            "exit 0",
            &connect(&outside.address, outside.port),
            &connect(&host, port),
        ],
    );
    let child = project
        .command()
        .args(["run", "src", "--json", "--sandbox", "namespace"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("peerbuild runs");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let deleted = Command::new("nft")
        .args(["delete", "table", "inet", "peerbuild"])
        .status()
        .expect("nft runs");
    assert!(deleted.success(), "the guard was not there to delete");
    let output = child.wait_with_output().expect("peerbuild ends");
    let run = Run::new(output, &project);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let log = run.log();
    assert!(log.starts_with(Outside::GREETING), "{log}");
    assert!(
        log.contains(&format!("no answer from {host}")),
        "the build reached the host at {host} after the guard was flushed: {log}"
    );
    assert!(listener.accept().is_err());
}

/// `sandbox.network = false` in the owner's settings denies the network as `--deny-network`
/// does, and the refusal names the setting.
#[test]
fn the_owners_settings_can_deny_the_network() {
    if !available() {
        return;
    }
    let project = build_with_network("true", &["echo ran"]);
    std::fs::create_dir_all(project.data()).expect("data dir");
    std::fs::write(
        project.data().join("config.toml"),
        "[sandbox]\nnetwork = false\n",
    )
    .expect("config");
    let run = run_namespaced(&project, &[]);
    assert_eq!(run.code, 2, "{}", run.transcript());
    assert!(!run.stdout.contains("\"line\":\"ran\""), "{}", run.stdout);
    let stderr = run
        .stderr
        .replace(&project.data().display().to_string(), "<DATA>");
    assert!(
        stderr.contains(
            "which this node does not allow (sandbox.network = false in <DATA>/config.toml)"
        ),
        "{stderr}"
    );
}
