//! The `namespace` backend: each session runs in new user, mount, pid, network, IPC, UTS and
//! cgroup namespaces, built by the helper process (see `isolate.rs` for what the sandbox looks
//! like and why it is built that way).
//!
//! Root inside is uid 100000 on the host. The root folder is the host's under a writable
//! overlay whose upper folder lives next to the workspace and goes when the node removes the
//! workspace's folder; `/root`, `/home` and the paths the node
//! names are masked; the workspace is read-write at its own path; `/tmp` is private. The network
//! is the sandbox's own loopback, and for sessions that ask for it outbound access through
//! slirp4netns, with the host's own addresses out of reach (see `network.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use crate::helper::{self, EXIT_CANNOT_START, START_FAILURE};
use crate::host::spawn_helper;
use crate::isolate::{self, Isolation};
use crate::network::{find_program, guard_unchanged, install_guard};
use crate::{
    BoxFuture, Capabilities, Enforcement, Executor, HelperCommand, Network, SandboxError, Session,
    SessionSpec, ShellKind,
};

/// What the node asks of every `namespace` session.
#[derive(Clone, Debug, Default)]
pub struct NamespaceConfig {
    /// Host paths a build must not see, such as the node's data directory and secret stores.
    /// `/root` and `/home` are always masked.
    pub masked: Vec<PathBuf>,
    /// The most memory a session's processes may use together.
    pub memory_limit_bytes: Option<u64>,
    /// The most processes (and threads) a session may have at once.
    pub process_limit: Option<u64>,
    /// An image's root folder to build the sandbox's root over, instead of the host's `/`
    /// (an absolute path to a folder holding a Linux root file system with `/bin/sh`).
    pub root: Option<PathBuf>,
}

/// Runs sessions in namespace sandboxes through the helper process.
#[derive(Clone, Debug)]
pub struct NamespaceExecutor {
    helper: HelperCommand,
    config: NamespaceConfig,
    capabilities: Capabilities,
    /// The slirp4netns that gives sessions outbound network, or why there is none.
    outbound: Result<PathBuf, String>,
    /// The generation of the host's nftables ruleset known to hold the guard as installed
    /// (shared by the executor's clones); `None` until one is known.
    guard_generation: Arc<Mutex<Option<u32>>>,
}

impl NamespaceExecutor {
    /// Checks that this machine can build the sandbox by building one (the helper runs
    /// `/bin/true` in it), and learns which limits it enforces; looks for slirp4netns and
    /// installs the guard that keeps it from the host's own addresses (without both, sessions
    /// get no outbound network). Blocks while the probe runs, a few milliseconds.
    pub fn new(helper: HelperCommand, config: NamespaceConfig) -> Result<Self, SandboxError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Unavailable {
                backend: "namespace",
                reason: "it needs peerbuild to run as root, to map the build's root to an \
                         unprivileged host uid and to mount the host's root under an overlay"
                    .into(),
            });
        }
        if let Some(root) = &config.root
            && (!root.is_absolute() || !root.join("bin/sh").exists())
        {
            return Err(SandboxError::Unavailable {
                backend: "namespace",
                reason: format!(
                    "{} is not an image's root folder (an absolute path to a folder with bin/sh)",
                    root.display()
                ),
            });
        }
        let probe = probe(&helper, &config)?;
        let limit = |how: &str| match how {
            "cgroup-v1" | "cgroup-v2" => Enforcement::Enforced,
            "rlimit" => Enforcement::BestEffort,
            _ => Enforcement::None,
        };
        let (outbound, guard_generation) = match outbound() {
            Ok((slirp, generation)) => (Ok(slirp), generation),
            Err(reason) => (Err(reason), None),
        };
        let capabilities = Capabilities {
            filesystem: Enforcement::Enforced,
            // The session has its own network namespace: a loopback only, or outbound access
            // that never reaches the host's own addresses.
            network: Enforcement::Enforced,
            processes: Enforcement::Enforced,
            memory: limit(&probe.memory),
            cpu: Enforcement::None,
            process_count: limit(&probe.processes),
            process_tree_kill: Enforcement::Enforced,
            outbound_network: outbound.is_ok(),
        };
        Ok(NamespaceExecutor {
            helper,
            config,
            capabilities,
            outbound,
            guard_generation: Arc::new(Mutex::new(guard_generation)),
        })
    }

    /// Checks that the guard is still in place before a session with outbound network starts:
    /// one netlink round trip while the host's ruleset has not changed since the guard was
    /// installed, a new install (an `nft` run) when it has. Returns the generation to hand the
    /// helper, which checks it again right before slirp4netns starts; or why the guard cannot
    /// be installed.
    fn guard_generation(&self) -> Result<Option<u32>, String> {
        let mut known = self
            .guard_generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(generation) = *known
            && guard_unchanged(generation)
        {
            return Ok(Some(generation));
        }
        *known = install_guard().map_err(|reason| {
            format!("the host's own addresses cannot be guarded from the build ({reason})")
        })?;
        Ok(*known)
    }
}

/// The slirp4netns for sessions with outbound network, once the guard is in place, with the
/// ruleset generation that holds it if known; or why sessions get none (a line their log
/// shows).
fn outbound() -> Result<(PathBuf, Option<u32>), String> {
    let slirp = find_program("slirp4netns").ok_or("install slirp4netns")?;
    let generation = install_guard().map_err(|reason| {
        format!("the host's own addresses cannot be guarded from the build ({reason})")
    })?;
    Ok((slirp, generation))
}

/// What the helper is asked to build for a session in `workdir`.
fn isolation(
    config: &NamespaceConfig,
    workdir: &Path,
    network: isolate::Network,
    guard_generation: Option<u32>,
) -> Result<Isolation, SandboxError> {
    let base = sandbox_folder(workdir).ok_or_else(|| SandboxError::Unavailable {
        backend: "namespace",
        reason: format!("the workspace {} has no parent folder", workdir.display()),
    })?;
    Ok(Isolation {
        base,
        masked: config.masked.clone(),
        memory_limit_bytes: config.memory_limit_bytes,
        process_limit: config.process_limit,
        network,
        guard_generation,
        root: config.root.clone(),
    })
}

/// Whether an image's root folder has bash where a shell looks for it.
fn has_bash(root: &Path) -> bool {
    ["bin/bash", "usr/bin/bash", "usr/local/bin/bash"]
        .iter()
        .any(|path| root.join(path).symlink_metadata().is_ok())
}

/// The folder that holds a session's overlay layers and mount points.
fn sandbox_folder(workdir: &Path) -> Option<PathBuf> {
    Some(workdir.parent()?.join("sandbox"))
}

impl Executor for NamespaceExecutor {
    fn kind(&self) -> &'static str {
        "namespace"
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn start<'a>(
        &'a self,
        spec: &'a SessionSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, SandboxError>> {
        Box::pin(async move {
            let guard = match (spec.network, &self.outbound) {
                (Network::Isolated, _) => None,
                (Network::Outbound, Ok(slirp)) => Some(
                    self.guard_generation()
                        .map(|generation| (slirp, generation)),
                ),
                (Network::Outbound, Err(reason)) => Some(Err(reason.clone())),
            };
            let (network, guard_generation, note) = match guard {
                None => (isolate::Network::Loopback, None, None),
                Some(Ok((slirp, generation))) => {
                    (isolate::Network::Slirp(slirp.clone()), generation, None)
                }
                Some(Err(reason)) => (
                    isolate::Network::Loopback,
                    None,
                    Some(format!("outbound network unavailable: {reason}")),
                ),
            };
            let isolation = isolation(&self.config, &spec.workdir, network, guard_generation)?;
            let mut arguments = helper::isolation_arguments(&isolation);
            if let Some(note) = note {
                arguments.extend(helper::note_arguments(&note));
            }
            // An image without bash runs the build in its /bin/sh, as docker does.
            if spec.shell == ShellKind::Bash
                && let Some(root) = &self.config.root
                && !has_bash(root)
            {
                arguments.extend(helper::note_arguments(
                    "the image has no bash; the build's shell is /bin/sh",
                ));
                let spec = SessionSpec {
                    shell: ShellKind::Sh,
                    ..spec.clone()
                };
                return spawn_helper(&self.helper, arguments, &spec);
            }
            spawn_helper(&self.helper, arguments, spec)
        })
    }

    fn adopt(&self, path: &Path) -> Result<(), SandboxError> {
        crate::layers::shift_tree(path).map_err(|reason| SandboxError::Adopt {
            path: path.to_owned(),
            reason,
        })
    }
}

/// How the probe's sandbox applied each limit.
struct Probe {
    memory: String,
    processes: String,
}

fn probe(helper: &HelperCommand, config: &NamespaceConfig) -> Result<Probe, SandboxError> {
    let unavailable = |reason: String| SandboxError::Unavailable {
        backend: "namespace",
        reason,
    };
    let folder = private_temporary_folder()
        .map_err(|e| unavailable(format!("cannot create a folder for the probe: {e}")))?;
    let workdir = folder.join("src");
    std::fs::create_dir_all(&workdir)
        .map_err(|e| unavailable(format!("cannot create {}: {e}", workdir.display())))?;
    let isolation = isolation(config, &workdir, isolate::Network::Loopback, None)?;
    let output = Command::new(&helper.program)
        .args(&helper.args)
        .args(helper::arguments("/bin/true", &workdir, None))
        .args(helper::isolation_arguments(&isolation))
        .args(["--report", "yes"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let _ = std::fs::remove_dir_all(&folder);
    let output = output.map_err(|e| unavailable(format!("cannot run the sandbox helper: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = match output.status.code() {
            Some(EXIT_CANNOT_START) => stderr.trim().trim_start_matches(START_FAILURE).to_owned(),
            _ => format!("the probe failed ({}): {}", output.status, stderr.trim()),
        };
        return Err(unavailable(reason));
    }
    parse_probe(&stdout).ok_or_else(|| {
        unavailable(format!(
            "the probe's report is not understood: {:?}",
            stdout.trim()
        ))
    })
}

/// A new folder in the temporary directory with an unpredictable name (`mkdtemp`), so that no
/// other user can plant a link where the probe, running as root, will write.
fn private_temporary_folder() -> std::io::Result<PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let template = std::env::temp_dir().join("peerbuild-probe-XXXXXX");
    let mut bytes = template.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    // SAFETY: mkdtemp rewrites the NUL-terminated template in place.
    if unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) }.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

fn parse_probe(report: &str) -> Option<Probe> {
    let line = report.lines().next()?;
    let mut memory = None;
    let mut processes = None;
    for field in line.split_whitespace() {
        match field.split_once('=')? {
            ("memory", how) => memory = Some(how.to_owned()),
            ("processes", how) => processes = Some(how.to_owned()),
            _ => {}
        }
    }
    Some(Probe {
        memory: memory?,
        processes: processes?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_parse() {
        let probe = parse_probe("memory=cgroup-v1 processes=rlimit\n").expect("parses");
        assert_eq!(
            (probe.memory.as_str(), probe.processes.as_str()),
            ("cgroup-v1", "rlimit")
        );
        assert!(parse_probe("").is_none());
        assert!(parse_probe("memory=none").is_none());
    }
}
