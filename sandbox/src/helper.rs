//! The session helper: a small process, freshly executed for every session, that starts the
//! build's shell and makes sure that every process the build started dies with the session.
//!
//! The node runs it as `peerbuild __sandbox-helper ...` and never forks from its own
//! multi-threaded process into the build. The helper marks itself a child subreaper, so orphans
//! of the build (double-forked daemons included) are re-parented to it rather than to init; when
//! the shell exits, or when the node asks with SIGTERM, it kills its children again and again
//! until none are left, then exits with the shell's status.
//!
//! For the `namespace` backend (`--isolate namespace`), the helper builds the sandbox first (see
//! `isolate.rs`) and its child is the sandbox's init rather than the shell: killing init kills
//! every process in the sandbox's pid namespace.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::isolate::{self, Isolation};

/// The script the shell runs; see the file for the request protocol.
pub const DRIVER: &str = include_str!("driver.sh");

/// The file descriptor the shell replies on.
pub const STATUS_FD: i32 = 3;

/// Exit status when the helper could not start the shell.
pub const EXIT_CANNOT_START: i32 = 127;

/// How the helper's message starts when it could not build the sandbox.
pub const START_FAILURE: &str = "peerbuild: cannot start the namespace sandbox: ";

struct Options {
    shell: String,
    workdir: PathBuf,
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Vec<u32>,
    isolation: Option<Isolation>,
    /// Print what the sandbox enforced on standard output (the executor's start-up probe).
    report: bool,
    /// Lines for the build's log, printed before the shell starts.
    notes: Vec<String>,
}

/// Builds the helper's arguments for a session (the inverse of `parse_options`).
pub fn arguments(
    shell: &str,
    workdir: &std::path::Path,
    run_as: Option<&crate::RunAs>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--shell".into(),
        shell.into(),
        "--workdir".into(),
        workdir.as_os_str().to_owned(),
    ];
    if let Some(run_as) = run_as {
        let groups: Vec<String> = run_as.groups.iter().map(u32::to_string).collect();
        args.extend([
            "--uid".into(),
            run_as.uid.to_string().into(),
            "--gid".into(),
            run_as.gid.to_string().into(),
            "--groups".into(),
            groups.join(",").into(),
        ]);
    }
    args
}

/// The arguments that make the helper start the session in a `namespace` sandbox.
pub(crate) fn isolation_arguments(isolation: &Isolation) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--isolate".into(),
        "namespace".into(),
        "--base".into(),
        isolation.base.as_os_str().to_owned(),
    ];
    for path in &isolation.masked {
        args.extend(["--mask".into(), path.as_os_str().to_owned()]);
    }
    if let Some(bytes) = isolation.memory_limit_bytes {
        args.extend(["--memory".into(), bytes.to_string().into()]);
    }
    if let Some(count) = isolation.process_limit {
        args.extend(["--processes".into(), count.to_string().into()]);
    }
    if let isolate::Network::Slirp(program) = &isolation.network {
        args.extend(["--slirp".into(), program.as_os_str().to_owned()]);
    }
    if let Some(generation) = isolation.guard_generation {
        args.extend(["--guard-generation".into(), generation.to_string().into()]);
    }
    if let Some(root) = &isolation.root {
        args.extend(["--root".into(), root.as_os_str().to_owned()]);
    }
    args
}

/// The arguments that make the helper print `note` in the build's log before the shell
/// starts (as `peerbuild: NOTE`).
pub(crate) fn note_arguments(note: &str) -> Vec<OsString> {
    vec!["--note".into(), note.into()]
}

fn parse_options(args: Vec<OsString>) -> Result<Options, String> {
    let mut options = Options {
        shell: String::new(),
        workdir: PathBuf::new(),
        uid: None,
        gid: None,
        groups: Vec::new(),
        isolation: None,
        report: false,
        notes: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
        let text = || value.to_string_lossy().into_owned();
        let number = |s: &str| s.parse::<u32>().map_err(|_| format!("not a number: {s}"));
        let big = |s: &str| s.parse::<u64>().map_err(|_| format!("not a number: {s}"));
        let isolation = &mut options.isolation;
        match flag.to_str() {
            Some("--shell") => options.shell = text(),
            Some("--workdir") => options.workdir = PathBuf::from(&value),
            Some("--uid") => options.uid = Some(number(&text())?),
            Some("--gid") => options.gid = Some(number(&text())?),
            Some("--groups") => {
                options.groups = text()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(number)
                    .collect::<Result<_, _>>()?
            }
            Some("--isolate") if value == "namespace" => {
                isolation.get_or_insert_with(Isolation::default);
            }
            Some("--isolate") => return Err(format!("unknown sandbox {}", text())),
            Some("--base") => isolation.get_or_insert_with(Isolation::default).base = value.into(),
            Some("--mask") => isolation
                .get_or_insert_with(Isolation::default)
                .masked
                .push(value.into()),
            Some("--memory") => {
                isolation
                    .get_or_insert_with(Isolation::default)
                    .memory_limit_bytes = Some(big(&text())?)
            }
            Some("--processes") => {
                isolation
                    .get_or_insert_with(Isolation::default)
                    .process_limit = Some(big(&text())?)
            }
            Some("--slirp") => {
                isolation.get_or_insert_with(Isolation::default).network =
                    isolate::Network::Slirp(value.into())
            }
            Some("--guard-generation") => {
                isolation
                    .get_or_insert_with(Isolation::default)
                    .guard_generation = Some(number(&text())?)
            }
            Some("--root") => {
                isolation.get_or_insert_with(Isolation::default).root = Some(value.into())
            }
            Some("--note") => options.notes.push(text()),
            Some("--report") => options.report = value == "yes",
            _ => return Err(format!("unknown option {}", flag.to_string_lossy())),
        }
    }
    if options.shell.is_empty() {
        return Err("--shell is required".into());
    }
    Ok(options)
}

/// The helper's entry point; returns the process exit status. Call it before any threads exist.
pub fn main(args: Vec<OsString>) -> i32 {
    let options = match parse_options(args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("peerbuild sandbox helper: {message}");
            return 2;
        }
    };
    // SAFETY: prctl with these arguments only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let signals = block_signals();
    for note in &options.notes {
        eprintln!("peerbuild: {note}");
    }
    if let Some(isolation) = &options.isolation {
        return run_isolated(&options, isolation, &signals);
    }
    let shell_pid = match spawn_shell(&options) {
        Ok(pid) => pid,
        Err(err) => {
            eprintln!(
                "peerbuild: cannot start the build's shell `{}`: {err}",
                options.shell
            );
            return EXIT_CANNOT_START;
        }
    };
    release_session_pipes();
    supervise(shell_pid, &signals)
}

/// Runs the session in a `namespace` sandbox: the helper's child is the sandbox's init.
fn run_isolated(options: &Options, isolation: &Isolation, signals: &libc::sigset_t) -> i32 {
    let identity = isolate::Identity {
        uid: options.uid,
        gid: options.gid,
        groups: options.groups.clone(),
    };
    let started = match isolate::start(isolation, &options.shell, &options.workdir, &identity) {
        Ok(started) => started,
        Err(message) => {
            eprintln!("{START_FAILURE}{message}");
            return EXIT_CANNOT_START;
        }
    };
    if options.report {
        println!(
            "memory={} processes={}",
            started.memory.name(),
            started.processes.name()
        );
    }
    release_session_pipes();
    let status = supervise(started.init_pid, signals);
    started.clean_up();
    status
}

/// Blocks the signals the helper waits for, so they are taken synchronously by `sigtimedwait`
/// and none can slip in between a check and a wait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use; sigprocmask only changes this
    // thread's mask, and the helper has a single thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn spawn_shell(options: &Options) -> std::io::Result<i32> {
    let identity = crate::isolate::Identity {
        uid: options.uid,
        gid: options.gid,
        groups: options.groups.clone(),
    };
    spawn_driver_shell(&options.shell, &options.workdir, &identity)
}

/// Starts the shell running the driver, in a new session, as `identity` (for every backend
/// that runs a shell: on the host, or inside the namespace sandbox).
pub(crate) fn spawn_driver_shell(
    shell: &str,
    workdir: &std::path::Path,
    identity: &crate::isolate::Identity,
) -> std::io::Result<i32> {
    let mut command = Command::new(shell);
    command
        .arg("-c")
        .arg(DRIVER)
        .arg("peerbuild")
        .current_dir(workdir);
    let identity = identity.clone();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (sigprocmask, setsid, setgroups, setresgid, setresuid) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // A new session: the build has no controlling terminal to read from or inject into,
            // and its process group is the shell's pid.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let (Some(uid), Some(gid)) = (identity.uid, identity.gid)
                && (libc::setgroups(identity.groups.len(), identity.groups.as_ptr()) < 0
                    || libc::setresgid(gid, gid, gid) < 0
                    || libc::setresuid(uid, uid, uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(child.id() as i32)
}

/// Points the helper's own copies of the session pipes at /dev/null, so that the node sees the
/// pipes close once the shell and everything it started are gone.
pub(crate) fn release_session_pipes() {
    let path = c"/dev/null";
    // SAFETY: plain descriptor calls on descriptors this process owns.
    unsafe {
        let null = libc::open(path.as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in [0, 1, 2, STATUS_FD] {
                libc::dup2(null, fd);
            }
            if null > STATUS_FD {
                libc::close(null);
            }
        }
    }
}

/// How long the helper keeps trying to kill what is left before it gives up: a process started
/// through a set-user-id program cannot be signalled, and must not keep the helper alive for ever.
const KILL_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(30);

fn supervise(shell_pid: i32, signals: &libc::sigset_t) -> i32 {
    let mut shell_status = None;
    let mut killing = false;
    let mut killing_since: Option<std::time::Instant> = None;
    loop {
        if killing {
            let since = *killing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > KILL_GIVE_UP {
                break;
            }
            kill_children(shell_pid);
        }
        if let Reaped::NoChildrenLeft = reap(shell_pid, &mut shell_status) {
            break;
        }
        if shell_status.is_some() && !killing {
            // The shell is gone, so the session is over: nothing it left behind may live on.
            killing = true;
            continue;
        }
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: waits for one of the blocked signals; the info pointer may be null.
        let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
        if matches!(signal, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) {
            killing = true;
        }
    }
    shell_status.unwrap_or(128 + libc::SIGKILL)
}

enum Reaped {
    Some,
    Nothing,
    NoChildrenLeft,
}

/// Reaps every child that has exited, noting the shell's status.
fn reap(shell_pid: i32, shell_status: &mut Option<i32>) -> Reaped {
    let mut reaped = Reaped::Nothing;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid == 0 {
            return reaped;
        }
        if pid < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => Reaped::NoChildrenLeft,
            };
        }
        if pid == shell_pid {
            *shell_status = Some(decode_status(status));
        }
        reaped = Reaped::Some;
    }
}

pub(crate) fn decode_status(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Kills the shell's process group and every child of the helper, including orphans that were
/// re-parented to it. Called again after each reap, because killing a process hands its own
/// children to the helper.
fn kill_children(shell_pid: i32) {
    // SAFETY: kill only sends signals.
    unsafe { libc::kill(-shell_pid, libc::SIGKILL) };
    let me = std::process::id() as i32;
    for pid in children_of(me) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The pids whose parent is `parent`, read from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' are
    // "state ppid ...".
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let run_as = crate::RunAs {
            uid: 1000,
            gid: 100,
            groups: vec![100, 27],
        };
        let args = arguments("bash", std::path::Path::new("/w"), Some(&run_as));
        let options = parse_options(args).expect("parses");
        assert_eq!(options.shell, "bash");
        assert_eq!(options.workdir, PathBuf::from("/w"));
        assert_eq!((options.uid, options.gid), (Some(1000), Some(100)));
        assert_eq!(options.groups, vec![100, 27]);
    }

    #[test]
    fn isolation_arguments_round_trip() {
        let isolation = Isolation {
            base: PathBuf::from("/data/work/b/sandbox"),
            masked: vec![PathBuf::from("/data"), PathBuf::from("/srv/keys")],
            memory_limit_bytes: Some(1 << 30),
            process_limit: Some(512),
            network: isolate::Network::Slirp(PathBuf::from("/usr/bin/slirp4netns")),
            guard_generation: Some(4_000_000_000),
            root: Some(PathBuf::from("/images/debian")),
        };
        let mut args = arguments("sh", std::path::Path::new("/w"), None);
        args.extend(isolation_arguments(&isolation));
        args.extend(note_arguments("outbound network unavailable: no"));
        let options = parse_options(args).expect("parses");
        assert_eq!(options.isolation, Some(isolation));
        assert_eq!(options.notes, ["outbound network unavailable: no"]);
        let err = parse_options(vec!["--isolate".into(), "docker".into()]).err();
        assert_eq!(err.as_deref(), Some("unknown sandbox docker"));
    }

    #[test]
    fn unknown_option_is_refused() {
        let err = parse_options(vec!["--bogus".into(), "x".into()]).err();
        assert_eq!(err.as_deref(), Some("unknown option --bogus"));
    }

    #[test]
    fn parent_of_self_is_our_parent() {
        let me = std::process::id() as i32;
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        assert_eq!(parent_of(me), Some(parent));
    }
}
