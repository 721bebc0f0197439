//! Executors that run a build's commands, one trait for every sandbox backend.
//!
//! A build runs as a [`Session`]: one long-lived shell that receives commands one at a time, so
//! that CodeBuild's 0.2 rule (one shell for the whole build) holds. `host` and `namespace` start
//! the shell through a freshly executed helper process (see [`helper`]) that becomes a child
//! subreaper: when the session ends, every process the build started is killed, double-forked
//! ones too. `docker` starts it in a container of its own, removed when the session ends.
//!
//! This crate knows nothing of peers, buildspecs or the network protocol: callers hand it a
//! [`SessionSpec`] and read back [`CommandOutcome`]s.

mod cgroups;
mod docker;
pub mod helper;
mod host;
mod isolate;
mod layers;
mod namespace;
mod network;
mod shell;
mod wasm;

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub use docker::{DockerConfig, DockerExecutor};
pub use host::HostExecutor;
pub use namespace::{NamespaceConfig, NamespaceExecutor};
pub use shell::{CAPTURE_LIMIT_BYTES, ShellSession};
pub use wasm::{CacheStats, WasmConfig, WasmExecutor};

/// A boxed future, so that [`Session`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the helper process is started: normally the `peerbuild` binary itself with a hidden
/// subcommand, which calls [`helper::main`].
#[derive(Clone, Debug)]
pub struct HelperCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Which shell interprets the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShellKind {
    Bash,
    /// POSIX `/bin/sh`.
    Sh,
}

impl ShellKind {
    pub fn program(self) -> &'static str {
        match self {
            ShellKind::Bash => "bash",
            ShellKind::Sh => "/bin/sh",
        }
    }
}

/// Whether commands share one shell state (0.2) or each starts from a fresh one (0.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShellMode {
    /// `cd` and `export` carry over from one command to the next.
    Persistent,
    /// Each command runs in a subshell: nothing it changes reaches the next command.
    FreshPerCommand,
}

/// The numeric identity a session runs as (CodeBuild's `run-as`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Everything needed to start a session.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub shell: ShellKind,
    pub mode: ShellMode,
    /// The directory the shell starts in.
    pub workdir: PathBuf,
    /// The whole environment of the shell: nothing of the caller's own leaks in.
    pub env: Vec<(String, String)>,
    /// `None` runs as the caller's own user.
    pub run_as: Option<RunAs>,
    /// The build asks for CodeBuild's `privileged-mode`. Only `docker` acts on it, and only
    /// when its owner allows it ([`DockerConfig::allow_privileged`]); otherwise it refuses the
    /// session. `host` is unconfined anyway; `namespace` never grants it.
    pub privileged: bool,
    /// Whether the build may reach other machines.
    pub network: Network,
}

/// A session's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// No network but the session's own loopback (`network: false`).
    Isolated,
    /// Outbound access to other machines, never to the host's own addresses: `namespace`
    /// gives it through slirp4netns behind the host's guard, `docker` through its guarded
    /// bridge; where a backend cannot guard the host, the session is isolated and its log says
    /// why ([`Capabilities::outbound_network`]). `host` always shares the host's network.
    Outbound,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The command finished with this exit status (128 + N when a signal N killed it).
    Exited(i32),
    /// The shell itself exited while running the command (`exit 3`, `set -e`): the status is the
    /// shell's, and the session is over.
    ShellExited(i32),
}

impl CommandOutcome {
    pub fn succeeded(self) -> bool {
        matches!(
            self,
            CommandOutcome::Exited(0) | CommandOutcome::ShellExited(0)
        )
    }

    pub fn code(self) -> i32 {
        match self {
            CommandOutcome::Exited(code) | CommandOutcome::ShellExited(code) => code,
        }
    }
}

/// The result of [`Session::capture`]: a command's standard output, with trailing newlines
/// removed as shell command substitution does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub stdout: String,
    pub status: i32,
}

/// Receives a session's output (standard output and standard error together) as it arrives.
pub trait OutputSink: Send {
    fn write(&mut self, bytes: &[u8]);
}

/// How well a backend enforces one kind of isolation on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Enforced,
    BestEffort,
    None,
}

/// What a backend can enforce on this machine, reported at start-up so a node can advertise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub filesystem: Enforcement,
    pub network: Enforcement,
    pub processes: Enforcement,
    pub memory: Enforcement,
    pub cpu: Enforcement,
    pub process_count: Enforcement,
    /// Whether every process a session started is dead once it ends.
    pub process_tree_kill: Enforcement,
    /// Whether sessions that ask for [`Network::Outbound`] get it. `network` says how well the
    /// host is kept out of reach either way.
    pub outbound_network: bool,
}

/// Errors at the executor boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    #[error("could not start the {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("lost contact with the build's shell")]
    Io(#[source] std::io::Error),
    #[error("the build's shell broke the session protocol: {detail}")]
    Protocol { detail: String },
    #[error("the session has ended; start a new one")]
    Ended,
    #[error(
        "some of the build's processes could not be killed within {seconds}s and may still run"
    )]
    Unkillable { seconds: u64 },
    #[error("cannot give {path} to the build: {reason}")]
    Adopt { path: PathBuf, reason: String },
    #[error(
        "image {image} is not on this machine; no registry can be reached: build or import it (docker import)"
    )]
    MissingImage { image: String },
    #[error("the build asks for privileged-mode, which this node does not allow")]
    PrivilegedRefused,
    #[error("the Docker engine refused to {action}: {reason}")]
    Docker {
        action: &'static str,
        reason: String,
    },
    #[error("{detail}")]
    Unsupported { detail: String },
    #[error("the {backend} sandbox is not available on this machine: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
}

/// A backend that can start sessions.
pub trait Executor: Send + Sync {
    /// The backend's name as users write it (`host`).
    fn kind(&self) -> &'static str;
    /// What this backend enforces on this machine.
    fn capabilities(&self) -> Capabilities;
    /// Starts a shell session.
    fn start<'a>(
        &'a self,
        spec: &'a SessionSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, SandboxError>>;
    /// Makes files the node wrote into a workspace after its session started (a restored
    /// cache) usable by the build as if the build had written them: `namespace` gives them to
    /// the sandbox's ids on disk. Call it on the top folder written; `host` needs nothing.
    fn adopt(&self, _path: &Path) -> Result<(), SandboxError> {
        Ok(())
    }
}

/// A running shell that takes commands one at a time.
pub trait Session: Send {
    /// Runs one command, streaming its output to `output`, and returns how it ended. Dropping the
    /// future leaves the command running; call [`Session::terminate`] to stop it.
    fn run<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<CommandOutcome, SandboxError>>;

    /// Runs one command in a subshell and returns its standard output (up to 1 MiB); its
    /// standard error goes to the log as usual. Nothing the command changes persists.
    fn capture<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<Captured, SandboxError>>;

    /// Runs peerbuild's own shell code in the session's main shell (never a subshell, whatever
    /// the mode), so that what it sets persists; returns its exit status.
    fn apply<'a>(
        &'a mut self,
        script: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<i32, SandboxError>>;

    /// Kills every process of the session and waits until they are gone.
    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>>;

    /// How many of the session's processes the kernel has killed for want of memory so far,
    /// where the backend can tell (`namespace`, through its memory cgroup): compared before
    /// and after a command, it tells an out-of-memory kill from any other SIGKILL.
    fn oom_kills(&self) -> Option<u64> {
        None
    }
}
