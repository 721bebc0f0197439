//! Helpers for peerbuild's end-to-end tests: a scratch project on disk, the real `peerbuild`
//! binary run against it, and a compact, stable transcript of what it did for snapshots.

pub mod cluster;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The `peerbuild` binary that `cargo test --workspace` builds next to the test executables.
pub fn peerbuild() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/it-HASH -> target/<profile>/peerbuild
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("peerbuild"))
        .expect("the test binary lives in target/<profile>/deps");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it), or build it with `cargo build -p node`",
        binary.display()
    );
    binary
}

/// A folder removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("pb-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("can create a temporary folder");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scratch project with its own data directory.
pub struct Project {
    root: TempDir,
}

impl Project {
    /// A project holding `files` (path, contents); a path ending in `*` is made executable
    /// (the `*` is dropped).
    pub fn new(files: &[(&str, &str)]) -> Project {
        let project = Project {
            root: TempDir::new("project"),
        };
        std::fs::create_dir_all(project.src()).expect("mkdir src");
        for (path, contents) in files {
            project.write(path, contents);
        }
        project
    }

    pub fn write(&self, path: &str, contents: &str) {
        use std::os::unix::fs::PermissionsExt;
        let (path, executable) = match path.strip_suffix('*') {
            Some(path) => (path, true),
            None => (path, false),
        };
        let full = self.src().join(path);
        std::fs::create_dir_all(full.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&full, contents).expect("write file");
        if executable {
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }

    /// The source folder.
    pub fn src(&self) -> PathBuf {
        self.root.path().join("src")
    }

    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A `peerbuild` command with this project's data directory.
    pub fn command(&self) -> Command {
        let mut command = Command::new(peerbuild());
        command
            .env("PEERBUILD_DATA_DIR", self.data())
            .env_remove("PEERBUILD_NODE")
            .current_dir(self.root.path())
            .stdin(Stdio::null());
        command
    }

    /// Runs `peerbuild run src --json ARGS` to the end.
    pub fn run(&self, args: &[&str]) -> Run {
        let output = self
            .command()
            .arg("run")
            .arg(self.src())
            .arg("--json")
            .args(args)
            .output()
            .expect("peerbuild runs");
        Run::new(output, self)
    }
}

/// The outcome of `peerbuild run --json`.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub events: Vec<serde_json::Value>,
    replacements: Vec<(String, String)>,
}

impl Run {
    /// Reads the outcome of a `peerbuild run --json` started with [`Project::command`].
    pub fn new(output: Output, project: &Project) -> Run {
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let events = stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            events,
            replacements: vec![
                (project.data().display().to_string(), "<DATA>".into()),
                (project.root().display().to_string(), "<PROJECT>".into()),
            ],
        }
    }

    /// The build's output lines (the commands' standard output and error), joined.
    pub fn log(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["event"] == "log")
            .filter_map(|e| e["line"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The final result event's `result` object.
    pub fn result(&self) -> &serde_json::Value {
        self.events
            .iter()
            .rev()
            .find(|e| e["event"] == "build_finished")
            .map(|e| &e["result"])
            .unwrap_or_else(|| {
                panic!(
                    "no build_finished event; stdout:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
    }

    /// A compact transcript for snapshots: the exit status, each phase with its status, the
    /// commands and their output, peerbuild's notes, and the result's key facts. Ids, paths and
    /// timings are replaced by stable placeholders.
    pub fn transcript(&self) -> String {
        let mut lines = vec![format!("exit {}", self.code)];
        for event in &self.events {
            if let Some(line) = transcript_line(event) {
                lines.push(line);
            }
        }
        if !self.stderr.trim().is_empty() {
            lines.push(format!("stderr: {}", self.stderr.trim()));
        }
        self.normalize(&lines.join("\n"))
    }

    fn normalize(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (from, to) in &self.replacements {
            text = text.replace(from.as_str(), to);
        }
        normalize_digests(&normalize_ids(&text))
    }
}

fn member_prefix(event: &serde_json::Value) -> String {
    event["member"]
        .as_str()
        .map(|m| format!("[{m}] "))
        .unwrap_or_default()
}

fn transcript_line(event: &serde_json::Value) -> Option<String> {
    let m = member_prefix(event);
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
    match event["event"].as_str()? {
        "phase_finished" => {
            let phase = text("phase");
            let status = text("status");
            // Set-up phases are noise in snapshots unless they fail.
            if matches!(phase.as_str(), "PROVISIONING" | "DOWNLOAD_SOURCE") && status == "SUCCEEDED"
            {
                return None;
            }
            let message = event["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            Some(format!("{m}{phase} {status}{message}"))
        }
        "command" => Some(format!("{m}$ {}", text("command"))),
        "log" => Some(format!("{m}| {}", text("line"))),
        "note" => Some(format!("{m}note: {}", text("message"))),
        "member_finished" => {
            let r = &event["result"];
            Some(format!(
                "[{}] member {}{}",
                r["member"].as_str().unwrap_or("?"),
                r["status"].as_str().unwrap_or("?"),
                r["message"]
                    .as_str()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ))
        }
        "build_finished" => Some(result_lines(&event["result"])),
        _ => None,
    }
}

fn result_lines(result: &serde_json::Value) -> String {
    let mut lines = vec![format!(
        "result {}{}",
        result["status"].as_str().unwrap_or("?"),
        result["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    )];
    for variable in result["exported_variables"]
        .as_array()
        .into_iter()
        .flatten()
    {
        lines.push(format!(
            "exported {}={}",
            variable["name"].as_str().unwrap_or("?"),
            variable["value"].as_str().unwrap_or("?")
        ));
    }
    for artifact in result["artifacts"].as_array().into_iter().flatten() {
        lines.push(format!(
            "artifact {}{}: {} files",
            artifact["identifier"].as_str().unwrap_or("?"),
            artifact["name"]
                .as_str()
                .map(|n| format!(" `{n}`"))
                .unwrap_or_default(),
            artifact["files"]
        ));
    }
    for report in result["reports"].as_array().into_iter().flatten() {
        lines.push(format!(
            "report {} {}: {}",
            report["name"].as_str().unwrap_or("?"),
            report["format"].as_str().unwrap_or("?"),
            report["counts"]
        ));
    }
    lines.join("\n")
}

/// Replaces `project:uuid` build ids by `<ID>`.
pub fn normalize_ids(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if bytes[i] == b':' && i + 37 <= text.len() && is_uuid(&text[i + 1..i + 37]) {
            // Drop the project name already copied.
            while out.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                out.pop();
            }
            out.push_str("<ID>");
            i += 37;
            continue;
        }
        let c = text[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Replaces store digests (`64 hex digits/SIZE`) by `<DIGEST>`.
pub fn normalize_digests(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(slash) = rest.find('/') {
        let before = &rest[..slash];
        let hex_start = before.len().saturating_sub(64);
        let hex = &before[hex_start..];
        let size_len = rest[slash + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        let is_digest =
            hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) && size_len > 0;
        if is_digest {
            out.push_str(&before[..hex_start]);
            out.push_str("<DIGEST>");
            rest = &rest[slash + 1 + size_len..];
        } else {
            out.push_str(&rest[..=slash]);
            rest = &rest[slash + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Replaces durations (`12ms`, `1.23s`, `2m03s`) by `<T>`, since timings vary from run to run.
pub fn normalize_durations(text: &str) -> String {
    text.lines()
        .map(normalize_line_durations)
        .collect::<Vec<_>>()
        .join("\n")
}

fn normalize_line_durations(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            let (core, rest) = word.split_at(word.trim_end_matches([',', ':', ')']).len());
            let digits = core.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let unit = &core[digits.len()..];
            let numeric = !digits.is_empty()
                && digits
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == 'm');
            if numeric && matches!(unit, "ms" | "s") {
                format!("<T>{rest}")
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Waits until `condition` holds, checking every 20 ms, failing after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(marker)
        })
        .collect()
}

/// A marker unique to this test run, to find a test's processes.
pub fn marker(label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "pbmark-{label}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The unprivileged user the run-as tests switch to; created when missing (the tests run as
/// root, as CI does).
pub const TEST_USER: &str = "peerbuild-test";

pub fn ensure_test_user() {
    let exists = Command::new("id")
        .arg("-u")
        .arg(TEST_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        return;
    }
    let created = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/bin/bash",
            TEST_USER,
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        created,
        "the run-as tests need the user {TEST_USER}; create it (as root: useradd --system {TEST_USER})"
    );
}

/// The backend conformance build: one buildspec every shell sandbox runs (`host`, `namespace`,
/// `docker`), so each backend's test compares the same transcript: the working directory, a
/// `cd` and an exported variable carried across phases, a workspace write the node collects,
/// exit statuses, `CODEBUILD_BUILD_SUCCEEDING`, and which sandbox and image ran it.
pub const BACKEND_CONFORMANCE: &str = r#"
version: 0.2
phases:
  install:
    commands:
      - test "$PWD" = "$CODEBUILD_SRC_DIR" && echo starts in the workspace
      - mkdir -p sub && cd sub
      - export GREETING=hello
  build:
    commands:
      - basename "$PWD"
      - echo "$GREETING"
      - echo made inside > "$CODEBUILD_SRC_DIR/out.txt"
      - id -u
      - sh -c 'exit 3'
  post_build:
    commands:
      - echo "succeeding=$CODEBUILD_BUILD_SUCCEEDING"
      - echo "sandbox=$PEERBUILD_SANDBOX image=$CODEBUILD_BUILD_IMAGE"
artifacts:
  files: [out.txt]
"#;

/// What [`BACKEND_CONFORMANCE`] must show on every backend: the same transcript, but for the
/// sandbox and image it names and, where the image has no bash, the line saying so.
pub fn backend_conformance_transcript(sandbox: &str, image: &str, no_bash: bool) -> String {
    let note = if no_bash {
        "| peerbuild: the image has no bash; the build's shell is /bin/sh\n"
    } else {
        ""
    };
    format!(
        "exit 1
$ test \"$PWD\" = \"$CODEBUILD_SRC_DIR\" && echo starts in the workspace
{note}| starts in the workspace
$ mkdir -p sub && cd sub
$ export GREETING=hello
INSTALL SUCCEEDED
$ basename \"$PWD\"
| sub
$ echo \"$GREETING\"
| hello
$ echo made inside > \"$CODEBUILD_SRC_DIR/out.txt\"
$ id -u
| 0
$ sh -c 'exit 3'
BUILD FAILED: Error while executing command: sh -c 'exit 3'. Reason: exit status 3
note: POST_BUILD runs although the build has failed, as in CodeBuild; CODEBUILD_BUILD_SUCCEEDING is 0
$ echo \"succeeding=$CODEBUILD_BUILD_SUCCEEDING\"
| succeeding=0
$ echo \"sandbox=$PEERBUILD_SANDBOX image=$CODEBUILD_BUILD_IMAGE\"
| sandbox={sandbox} image={image}
POST_BUILD SUCCEEDED
UPLOAD_ARTIFACTS SUCCEEDED
result FAILED: BUILD: command `sh -c 'exit 3'` exited with status 3
artifact primary: 1 files"
    )
}

/// Runs [`BACKEND_CONFORMANCE`] with `args` (which choose the sandbox); returns the run's
/// transcript and the artifact the build wrote.
pub fn backend_conformance(args: &[&str]) -> (String, String) {
    let project = Project::new(&[("buildspec.yml", BACKEND_CONFORMANCE)]);
    let artifacts = TempDir::new("conformance-artifacts");
    let folder = artifacts.path().join("out");
    let mut all = args.to_vec();
    let folder_arg = folder.display().to_string();
    all.extend(["--artifacts", &folder_arg]);
    let run = project.run(&all);
    let copied = std::fs::read_to_string(folder.join("out.txt")).unwrap_or_default();
    (run.transcript(), copied)
}

/// The Debian packages the sandbox and pool tests use, by a program each provides.
const TEST_PACKAGES: [(&str, &str); 4] = [
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/slirp4netns", "slirp4netns"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/sbin/ip", "iproute2"),
];

/// Installs (once per test run, as root, with apt-get) whichever of the packages the sandbox
/// and pool tests use is missing, so `cargo test --workspace` sets a new machine up by itself
/// as `.ci/run` does. Best effort: a machine without apt-get or root keeps what it has, and
/// the tests that need a missing tool say so.
pub fn ensure_test_packages() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let missing: Vec<&str> = TEST_PACKAGES
            .iter()
            .filter(|(program, _)| !Path::new(program).exists())
            .map(|(_, package)| *package)
            .collect();
        if missing.is_empty() {
            return;
        }
        eprintln!("installing what the tests need: {}", missing.join(" "));
        let quiet = |command: &mut Command| {
            command
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = quiet(Command::new("apt-get").args(["update", "-q"]));
        let installed = quiet(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        );
        if !installed {
            eprintln!(
                "could not install {} (run .ci/run as root)",
                missing.join(" ")
            );
        }
    });
}

/// A machine "outside" this host for network tests: a network namespace joined to the host's
/// by a veth pair (`10.231.N.1` on the host, `10.231.N.2` outside), with a TCP server outside
/// that answers every connection with [`Outside::GREETING`]. Torn down when dropped.
pub struct Outside {
    namespace: String,
    host_link: String,
    server: Option<std::process::Child>,
    /// The host's end of the link: an address local to the host that is not loopback.
    pub host_address: String,
    /// The server's address and port, reachable from the host.
    pub address: String,
    pub port: u16,
}

impl Outside {
    pub const GREETING: &'static str = "hello from outside";

    /// Builds it; panics with the failing command when this machine cannot (not root, no `ip`).
    pub fn new() -> Outside {
        ensure_test_packages();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = (std::process::id() as usize * 7 + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        let label = format!("{}x{n}", std::process::id() % 10_000);
        let mut outside = Outside {
            namespace: format!("pbout-{label}"),
            host_link: format!("pbh{label}"),
            server: None,
            host_address: format!("10.231.{n}.1"),
            address: format!("10.231.{n}.2"),
            port: 8000 + n as u16,
        };
        let (ns, host_link) = (outside.namespace.clone(), outside.host_link.clone());
        let peer = format!("pbo{label}");
        let host_cidr = format!("{}/30", outside.host_address);
        let outside_cidr = format!("{}/30", outside.address);
        set_up_network(
            || {
                try_ip(&["netns", "add", &ns])?;
                try_ip(&[
                    "link", "add", &host_link, "type", "veth", "peer", "name", &peer,
                ])?;
                try_ip(&["link", "set", &peer, "netns", &ns])?;
                try_ip(&["addr", "add", &host_cidr, "dev", &host_link])?;
                try_ip(&["link", "set", &host_link, "up"])?;
                try_ip(&["-n", &ns, "addr", "add", &outside_cidr, "dev", &peer])?;
                try_ip(&["-n", &ns, "link", "set", &peer, "up"])?;
                try_ip(&["-n", &ns, "link", "set", "lo", "up"])
            },
            || {
                let _ = try_ip(&["link", "del", &host_link]);
                let _ = try_ip(&["netns", "del", &ns]);
            },
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let server = format!(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{}', {}))\n\
             s.listen(16)\n\
             while True:\n    c, _ = s.accept()\n    c.sendall(b'{}\\n')\n    c.close()\n",
            outside.address,
            outside.port,
            Outside::GREETING
        );
        let mut server_command = Command::new("python3");
        enter_netns(&mut server_command, &ns);
        let child = server_command
            .args(["-c", &server])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the outside server (python3)");
        outside.server = Some(child);
        let target = format!("{}:{}", outside.address, outside.port);
        wait_for("the outside server", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&target).is_ok()
        });
        outside
    }
}

impl Default for Outside {
    fn default() -> Self {
        Outside::new()
    }
}

/// Held while network namespaces are set up or removed: `ip netns add` and `delete` remount
/// `/run/netns`, and an `ip -n` meanwhile can fail (EINVAL).
pub fn netns_setup_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `command` start inside the network namespace `namespace` (from `ip netns add`): it
/// enters it itself, with `setns` on a descriptor opened under [`netns_setup_lock`], rather
/// than through `ip netns exec`, whose own lookup races with other tests' set-up.
pub fn enter_netns(command: &mut Command, namespace: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let file = {
        let _serial = netns_setup_lock();
        std::fs::File::open(format!("/run/netns/{namespace}"))
            .unwrap_or_else(|e| panic!("open the network namespace {namespace}: {e}"))
    };
    // SAFETY: between fork and exec the closure only calls setns(2) on a descriptor it owns;
    // it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes a network set-up (`make`: its `ip` steps) under [`netns_setup_lock`]. Now and then
/// the kernel refuses a step, such as moving a veth end into a namespace just made (EINVAL,
/// seen on CI): the set-up is undone (`undo`) and made again, up to four more times, before
/// the last error is returned.
pub fn set_up_network(
    make: impl Fn() -> Result<(), String>,
    undo: impl Fn(),
) -> Result<(), String> {
    let _serial = netns_setup_lock();
    let mut tries = 0;
    loop {
        match make() {
            Ok(()) => return Ok(()),
            Err(err) if tries < 4 => {
                tries += 1;
                eprintln!("a network set-up failed ({err}); again");
                undo();
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(err) => {
                undo();
                return Err(err);
            }
        }
    }
}

pub fn try_ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip (package iproute2): {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _serial = netns_setup_lock();
        for args in [
            vec!["link", "del", self.host_link.as_str()],
            vec!["netns", "del", self.namespace.as_str()],
        ] {
            let _ = Command::new("ip").args(&args).output();
        }
    }
}

/// The host's address on its default route's interface (not loopback), if it has one.
pub fn default_route_address() -> Option<String> {
    let output = Command::new("ip")
        .args(["-4", "route", "get", "192.0.2.200"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words
        .next()
        .filter(|a| !a.starts_with("127."))
        .map(str::to_owned)
}

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Fills `root` with a minimal image root file system: the static busybox and its applet
/// links in `bin/`, `/tmp`, and `etc/passwd` and `etc/group` naming root.
pub fn busybox_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    ensure_test_packages();
    if !Path::new(BUSYBOX).exists() {
        return Err(format!(
            "{BUSYBOX} is missing: apt-get install busybox-static"
        ));
    }
    let bin = root.join("bin");
    for folder in ["bin", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(folder)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(|e| e.to_string())?;
    let applets = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(|e| e.to_string())?;
        }
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    Ok(())
}

/// A listener on every address of this machine, as the pool's port is, with its port: what a
/// network probe from a sandbox must never reach. Non-blocking, so a test can poll it.
pub fn host_listener() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listen");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    (listener, port)
}

/// Sends one HTTP/1.1 GET over `stream` and reads until `done` holds for what arrived (or 30 s).
pub fn http_get(
    mut stream: impl Read + Write,
    path: &str,
    headers: &str,
    mut done: impl FnMut(&str) -> bool,
) -> String {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"
    )
    .expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !done(&String::from_utf8_lossy(&received)) {
        assert!(
            Instant::now() < deadline,
            "no answer: {}",
            String::from_utf8_lossy(&received)
        );
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("read: {err}"),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[cfg(test)]
mod tests {
    use super::normalize_ids;

    #[test]
    fn ids_are_normalized() {
        assert_eq!(
            normalize_ids("build my-app:0f3c1e2a-1b2c-4d3e-8f90-123456789abc (#1)"),
            "build <ID> (#1)"
        );
        assert_eq!(
            normalize_ids("x:0f3c1e2a-1b2c-4d3e-8f90-123456789abc/lint"),
            "<ID>/lint"
        );
    }
}
