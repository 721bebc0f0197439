//! The `host` backend: the build's shell runs directly on this machine, as the node's user or
//! the `run-as` user, with no isolation beyond a clean environment and a killed process tree.
//! Owners opt into it; the isolating backends are `namespace`, `docker` and `wasm`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;

use tokio::process::Command;

use crate::helper::{self, STATUS_FD};
use crate::shell::ShellSession;
use crate::{
    BoxFuture, Capabilities, Enforcement, Executor, HelperCommand, SandboxError, Session,
    SessionSpec,
};

/// Runs sessions on the host through the helper process.
#[derive(Clone, Debug)]
pub struct HostExecutor {
    helper: HelperCommand,
}

impl HostExecutor {
    pub fn new(helper: HelperCommand) -> Self {
        HostExecutor { helper }
    }
}

impl Executor for HostExecutor {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            filesystem: Enforcement::None,
            network: Enforcement::None,
            processes: Enforcement::None,
            memory: Enforcement::None,
            cpu: Enforcement::None,
            process_count: Enforcement::None,
            process_tree_kill: Enforcement::Enforced,
            outbound_network: true,
        }
    }

    fn start<'a>(
        &'a self,
        spec: &'a SessionSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, SandboxError>> {
        Box::pin(async move { spawn_helper(&self.helper, Vec::new(), spec) })
    }
}

/// Starts the helper for a session, with `extra` arguments after the session's own, and wraps
/// it in a [`ShellSession`].
pub(crate) fn spawn_helper(
    helper: &HelperCommand,
    extra: Vec<std::ffi::OsString>,
    spec: &SessionSpec,
) -> Result<Box<dyn Session>, SandboxError> {
    let spawn_error = |source| SandboxError::Spawn {
        what: "sandbox helper",
        source,
    };
    let (output_read, output_write) = pipe().map_err(spawn_error)?;
    let (reply_read, reply_write) = pipe().map_err(spawn_error)?;
    let output_for_stderr = output_write.try_clone().map_err(spawn_error)?;
    let reply_fd = reply_write.as_raw_fd();

    let mut command = Command::new(&helper.program);
    command
        .args(&helper.args)
        .args(helper::arguments(
            spec.shell.program(),
            &spec.workdir,
            spec.run_as.as_ref(),
        ))
        .args(extra)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::from(output_write))
        .stderr(Stdio::from(output_for_stderr))
        // Its own process group: a Ctrl-C at the terminal reaches peerbuild, which stops the
        // build in order, and not the build's processes directly.
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: runs between fork and exec; dup2 and prctl are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // dup2 clears close-on-exec on the copy, so the reply pipe reaches the helper as
            // descriptor 3. `pipe()` never returns descriptor 3 itself (see there).
            if libc::dup2(reply_fd, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the node dies, the helper is told and kills the build.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    let child = command.spawn().map_err(spawn_error)?;
    drop(reply_write);
    Ok(Box::new(ShellSession::new(
        child,
        output_read,
        reply_read,
        spec.mode,
    )?))
}

/// A close-on-exec pipe whose descriptors are above the three standard ones and descriptor 3,
/// so that the `dup2` onto 3 in the child always makes a fresh, inheritable copy.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_status_fd(read)?, above_status_fd(write)?))
}

fn above_status_fd(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > STATUS_FD {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, STATUS_FD + 1) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}
