//! The `docker` backend: each session runs in its own container of a named image, through the
//! Docker Engine API (bollard over the engine's Unix socket).
//!
//! The container starts with a do-nothing init (`sleep` in a loop, under Docker's own `init`
//! that reaps orphans) and the session's shell is a `docker exec` into it. The shell speaks the
//! same three-pipe protocol as every other backend (see `driver.sh`), over three FIFOs in a
//! session folder next to the workspace, bound read-only into the container at
//! [`SESSION_MOUNT`]: the exec's first command opens them as its standard input, its output
//! (standard output and standard error) and descriptor 3, then runs the driver. The output and
//! the replies are kernel pipes written directly by the build's processes, never relayed by the
//! engine, so everything a command wrote is in the output pipe before its status is in the reply
//! pipe, exactly as with `host` (Docker's own attached streams are two streams relayed separately,
//! with no order between them). Ending the session removes the container (forcibly), which kills
//! every process in it.
//!
//! What a container gets: the workspace bound read-write at its own path (and peerbuild's tool
//! folder read-only), nothing else of the host; no network (`network none`), or for sessions that
//! ask for it the `peerbuild` Docker network, a bridge named [`DOCKER_BRIDGE`] with no traffic
//! between containers, whose packets to any address of the host itself the guard drops (see
//! `network.rs`); every capability dropped, `no-new-privileges`;
//! memory, CPU and process limits; never the Docker socket; privileged only when the build asks
//! for `privileged-mode` and the owner allows it. It runs as the node's own uid (or the `run-as`
//! uid), so files the build writes into the workspace are the node's to clean up. Changes to the
//! container's own file system are thrown away with the session: a shell replaced after `exit` or
//! for another `run-as` user starts from the image again.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use tokio::net::unix::pipe;

use crate::network::{DOCKER_BRIDGE, install_guard};
use crate::shell::{Requests, ShellProcess, ShellSession};
use crate::{
    BoxFuture, Capabilities, Enforcement, Executor, Network, SandboxError, Session, SessionSpec,
    ShellKind, helper::DRIVER,
};

/// The Docker network of sessions with outbound network; its bridge is [`DOCKER_BRIDGE`].
pub const DOCKER_NETWORK: &str = "peerbuild";

/// Where the session folder (the three FIFOs) is bound inside the container.
pub const SESSION_MOUNT: &str = "/.peerbuild";

/// The label every session container carries, with the node's pid as its value, so that
/// containers left by a node that died are found and removed by the next one.
const SESSION_LABEL: &str = "peerbuild.session";

/// How long a session waits for its shell to open the pipes.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long the end of a session waits for the engine to report the shell's exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The container's init: it only keeps the container alive; the shell is an exec.
const KEEP_ALIVE: &str = "while :; do sleep 3600; done";
/// How many more containers a session starts when one dies as it starts.
const CONTAINER_RETRIES: u32 = 2;
/// Why one try at a session failed.
enum StartFailure {
    /// The container died as its shell started (worth another); `reason` says how it ended.
    Died {
        action: &'static str,
        reason: String,
    },
    Other(SandboxError),
}

impl From<SandboxError> for StartFailure {
    fn from(err: SandboxError) -> StartFailure {
        StartFailure::Other(err)
    }
}

/// What the engine refused when it would not start the shell in a started container.
const SHELL_START: &str = "start the build's shell";

/// Opens the three FIFOs (output and replies first, so that once the node's writer to the
/// requests FIFO opens, both are open), then runs the driver in bash when the build wants bash
/// and the image has it, else in `/bin/sh`, saying so in the build's log.
const PRELUDE: &str = r#"exec >"$1/output" 2>&1 3>"$1/replies" <"$1/requests"
if [ -n "$4" ]; then echo "peerbuild: $4"; fi
if [ "$3" = bash ]; then
  if command -v bash >/dev/null 2>&1; then exec bash -c "$2" peerbuild; fi
  echo "peerbuild: the image has no bash; the build's shell is /bin/sh"
fi
exec /bin/sh -c "$2" peerbuild"#;

/// What the node asks of every `docker` session.
#[derive(Clone, Debug, Default)]
pub struct DockerConfig {
    /// The image the phases run in; it must be on this machine (no registry is reachable).
    pub image: String,
    /// Whether the owner allows builds that ask for `privileged-mode` to get a privileged
    /// container. When false, such a session is refused.
    pub allow_privileged: bool,
    /// The most memory a session's processes may use together (swap included).
    pub memory_limit_bytes: Option<u64>,
    /// The most processes (and threads) a session may have at once.
    pub process_limit: Option<u64>,
    /// The most CPU time a session may use, in thousandths of a CPU.
    pub cpu_limit_millis: Option<u64>,
}

/// Runs sessions in containers of one image.
#[derive(Clone, Debug)]
pub struct DockerExecutor {
    docker: Docker,
    config: DockerConfig,
    capabilities: Capabilities,
    /// Whether sessions that ask for network get the guarded network, or why not.
    outbound: Result<(), String>,
}

impl DockerExecutor {
    /// Connects to the engine (`$DOCKER_HOST` when it names a Unix socket, else
    /// `/var/run/docker.sock`), checks that the image is on this machine, learns which limits
    /// the engine enforces, and removes session containers left by nodes that died.
    pub async fn new(config: DockerConfig) -> Result<Self, SandboxError> {
        let unavailable = |reason: String| SandboxError::Unavailable {
            backend: "docker",
            reason,
        };
        let docker = Docker::connect_with_unix_defaults()
            .map_err(|e| unavailable(format!("cannot reach the Docker engine: {e}")))?;
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| unavailable("the Docker engine did not answer within 10 s".into()))?
            .map_err(|e| unavailable(format!("cannot reach the Docker engine: {e}")))?;
        match docker.inspect_image(&config.image).await {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                return Err(SandboxError::MissingImage {
                    image: config.image.clone(),
                });
            }
            Err(e) => return Err(unavailable(format!("cannot inspect the image: {e}"))),
        }
        let info = docker
            .info()
            .await
            .map_err(|e| unavailable(format!("cannot read the engine's information: {e}")))?;
        let limit = |supported: Option<bool>, asked: bool| match (supported, asked) {
            (Some(true), true) => Enforcement::Enforced,
            _ => Enforcement::None,
        };
        let outbound = outbound(&docker).await;
        let capabilities = Capabilities {
            filesystem: Enforcement::Enforced,
            network: Enforcement::Enforced,
            processes: Enforcement::Enforced,
            memory: limit(info.memory_limit, config.memory_limit_bytes.is_some()),
            cpu: limit(info.cpu_cfs_quota, config.cpu_limit_millis.is_some()),
            process_count: limit(info.pids_limit, config.process_limit.is_some()),
            process_tree_kill: Enforcement::Enforced,
            outbound_network: outbound.is_ok(),
        };
        remove_orphans(&docker).await;
        Ok(DockerExecutor {
            docker,
            config,
            capabilities,
            outbound,
        })
    }

    /// The container's settings for a session.
    fn container(
        &self,
        spec: &SessionSpec,
        session_folder: &Path,
        user: &str,
    ) -> ContainerCreateBody {
        let network = match (spec.network, &self.outbound) {
            (Network::Outbound, Ok(())) => DOCKER_NETWORK,
            _ => "none",
        };
        let bind = |source: &Path, target: &Path, read_only: bool| Mount {
            source: Some(source.display().to_string()),
            target: Some(target.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(read_only),
            ..Default::default()
        };
        let mut mounts = vec![
            bind(&spec.workdir, &spec.workdir, false),
            bind(session_folder, Path::new(SESSION_MOUNT), true),
        ];
        // peerbuild's tools (`codebuild-hash-files`) sit beside the workspace, on its PATH.
        if let Some(tools) = spec.workdir.parent().map(|p| p.join("bin"))
            && tools.is_dir()
        {
            mounts.push(bind(&tools, &tools, true));
        }
        let config = &self.config;
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let host_config = HostConfig {
            mounts: Some(mounts),
            network_mode: Some(network.into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            privileged: Some(spec.privileged && config.allow_privileged),
            init: Some(true),
            memory: config.memory_limit_bytes.map(signed),
            memory_swap: config.memory_limit_bytes.map(signed),
            pids_limit: config.process_limit.map(signed),
            nano_cpus: config
                .cpu_limit_millis
                .map(|m| signed(m.saturating_mul(1_000_000))),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(config.image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), KEEP_ALIVE.into()]),
            user: Some(user.to_owned()),
            working_dir: Some(spec.workdir.display().to_string()),
            labels: Some(HashMap::from([(
                SESSION_LABEL.to_owned(),
                std::process::id().to_string(),
            )])),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Starts a session's container and shell. A container that died under the shell's
    /// start (seen about once in 40 starts on CI's engine with several builds at once: the
    /// container exits with status 127 right after it started, and the engine then refuses
    /// the shell with "is not running") is replaced by a fresh one, up to
    /// [`CONTAINER_RETRIES`] times; the error then says how the last one ended.
    async fn start_session(&self, spec: &SessionSpec) -> Result<Box<dyn Session>, SandboxError> {
        let mut retries = 0;
        loop {
            match self.try_start_session(spec).await {
                Ok(session) => return Ok(session),
                Err(StartFailure::Died { .. }) if retries < CONTAINER_RETRIES => retries += 1,
                Err(StartFailure::Died { action, reason }) => {
                    return Err(SandboxError::Docker { action, reason });
                }
                Err(StartFailure::Other(err)) => return Err(err),
            }
        }
    }

    /// How a container that is no longer running ended, or `None` while it runs (or cannot
    /// be inspected).
    async fn died(&self, container: &str) -> Option<String> {
        let inspected = self.docker.inspect_container(container, None).await.ok()?;
        let state = inspected.state?;
        if state.running != Some(false) {
            return None;
        }
        let mut how = format!(
            "the container exited with status {}",
            state.exit_code.unwrap_or(-1)
        );
        if state.oom_killed == Some(true) {
            how.push_str(", killed for want of memory");
        }
        if let Some(error) = state.error.filter(|e| !e.is_empty()) {
            how.push_str(&format!(": {error}"));
        }
        Some(how)
    }

    /// One try of [`Self::start_session`] (the container is removed if it fails).
    async fn try_start_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Box<dyn Session>, StartFailure> {
        if spec.privileged && !self.config.allow_privileged {
            return Err(SandboxError::PrivilegedRefused.into());
        }
        let holder = spec
            .workdir
            .parent()
            .ok_or_else(|| SandboxError::Unavailable {
                backend: "docker",
                reason: format!(
                    "the workspace {} has no parent folder",
                    spec.workdir.display()
                ),
            })?;
        let (uid, gid) = match &spec.run_as {
            Some(run_as) => (run_as.uid, run_as.gid),
            // SAFETY: geteuid and getegid have no preconditions.
            None => unsafe { (libc::geteuid(), libc::getegid()) },
        };
        let user = format!("{uid}:{gid}");
        let name = container_name();
        let folder = holder.join(format!("docker-{name}"));
        let fifos =
            make_session_folder(&folder, uid, gid).map_err(|source| SandboxError::Spawn {
                what: "session folder",
                source,
            })?;
        let refused = |action: &'static str| {
            move |e: bollard::errors::Error| SandboxError::Docker {
                action,
                reason: e.to_string(),
            }
        };
        // Readers first: a writer's open in the container waits for them.
        let open_error = |source| SandboxError::Spawn {
            what: "session pipes",
            source,
        };
        let output = pipe::OpenOptions::new()
            .open_receiver(&fifos.output)
            .map_err(open_error)?;
        let replies = pipe::OpenOptions::new()
            .open_receiver(&fifos.replies)
            .map_err(open_error)?;
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                self.container(spec, &folder, &user),
            )
            .await
            .map_err(refused("create the build's container"))?;
        // From here on the process owns the container and removes it if anything fails.
        let mut process = DockerProcess {
            docker: self.docker.clone(),
            container: name,
            exec: String::new(),
            folder,
            removed: false,
        };
        let started = self.start_shell(&mut process, spec, &user, &fifos).await;
        match started {
            Ok(requests) => Ok(Box::new(ShellSession::with_process(
                Box::new(process),
                requests,
                output,
                replies,
                spec.mode,
            ))),
            Err(err) => {
                // Only a container that started and then died under the shell is worth
                // another: one the engine cannot start at all (say, privileged where that is
                // not possible) fails the same way again.
                let died = match &err {
                    SandboxError::Docker { action, .. } if *action == SHELL_START => {
                        self.died(&process.container).await
                    }
                    _ => None,
                };
                let _ = process.remove().await;
                Err(match (err, died) {
                    (SandboxError::Docker { action, reason }, Some(died)) => StartFailure::Died {
                        action,
                        reason: format!("{reason} ({died})"),
                    },
                    (err, _) => StartFailure::Other(err),
                })
            }
        }
    }

    /// The line the session's log starts with when it asked for network and cannot have it.
    fn network_note(&self, spec: &SessionSpec) -> String {
        match (spec.network, &self.outbound) {
            (Network::Outbound, Err(reason)) => {
                format!("outbound network unavailable: {reason}")
            }
            _ => String::new(),
        }
    }

    /// Starts the container and the shell in it, and opens the requests FIFO once the shell has
    /// opened all three.
    async fn start_shell(
        &self,
        process: &mut DockerProcess,
        spec: &SessionSpec,
        user: &str,
        fifos: &Fifos,
    ) -> Result<Requests, SandboxError> {
        let refused = |action: &'static str| {
            move |e: bollard::errors::Error| SandboxError::Docker {
                action,
                reason: e.to_string(),
            }
        };
        self.docker
            .start_container(&process.container, None)
            .await
            .map_err(refused("start the build's container"))?;
        let shell = match spec.shell {
            ShellKind::Bash => "bash",
            ShellKind::Sh => "sh",
        };
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let exec = self
            .docker
            .create_exec(
                &process.container,
                CreateExecOptions {
                    cmd: Some(vec![
                        "/bin/sh".to_owned(),
                        "-c".to_owned(),
                        PRELUDE.to_owned(),
                        "peerbuild".to_owned(),
                        SESSION_MOUNT.to_owned(),
                        DRIVER.to_owned(),
                        shell.to_owned(),
                        self.network_note(spec),
                    ]),
                    env: Some(env),
                    user: Some(user.to_owned()),
                    working_dir: Some(spec.workdir.display().to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(refused(SHELL_START))?;
        process.exec = exec.id;
        self.docker
            .start_exec(
                &process.exec,
                Some(StartExecOptions {
                    detach: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(refused(SHELL_START))?;
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            match pipe::OpenOptions::new().open_sender(&fifos.requests) {
                Ok(sender) => return Ok(Box::pin(sender)),
                Err(err) if err.raw_os_error() == Some(libc::ENXIO) => {}
                Err(source) => {
                    return Err(SandboxError::Spawn {
                        what: "session pipes",
                        source,
                    });
                }
            }
            // Nobody reads the requests yet: the shell has not opened its pipes. Did it fail?
            let inspected = self
                .docker
                .inspect_exec(&process.exec)
                .await
                .map_err(refused("report on the build's shell"))?;
            if inspected.running == Some(false) && inspected.exit_code.is_some() {
                return Err(SandboxError::Unavailable {
                    backend: "docker",
                    reason: format!(
                        "the build's shell exited with status {} before it started; the image needs /bin/sh",
                        inspected.exit_code.unwrap_or(-1)
                    ),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SandboxError::Unavailable {
                    backend: "docker",
                    reason: format!(
                        "the build's shell did not start within {} s",
                        START_WAIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Executor for DockerExecutor {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn start<'a>(
        &'a self,
        spec: &'a SessionSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, SandboxError>> {
        Box::pin(self.start_session(spec))
    }
}

/// A session's container and its shell, the exec.
struct DockerProcess {
    docker: Docker,
    container: String,
    exec: String,
    /// The session folder with the FIFOs, removed with the container.
    folder: PathBuf,
    removed: bool,
}

impl DockerProcess {
    /// Removes the container, which kills every process in it, and the session folder.
    async fn remove(&mut self) -> Result<(), SandboxError> {
        if self.removed {
            return Ok(());
        }
        let removed = self
            .docker
            .remove_container(
                &self.container,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let _ = std::fs::remove_dir_all(&self.folder);
        match removed {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                self.removed = true;
                Ok(())
            }
            Err(e) => Err(SandboxError::Docker {
                action: "remove the build's container",
                reason: e.to_string(),
            }),
        }
    }

    /// The shell's exit status, once the engine has seen it exit.
    async fn exit_status(&self) -> Result<i32, SandboxError> {
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        loop {
            let inspected =
                self.docker
                    .inspect_exec(&self.exec)
                    .await
                    .map_err(|e| SandboxError::Docker {
                        action: "report on the build's shell",
                        reason: e.to_string(),
                    })?;
            if inspected.running == Some(false)
                && let Some(code) = inspected.exit_code
            {
                return Ok(i32::try_from(code).unwrap_or(1));
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(128 + libc::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl ShellProcess for DockerProcess {
    fn exited(&mut self) -> BoxFuture<'_, Result<i32, SandboxError>> {
        Box::pin(async move {
            let status = self.exit_status().await;
            // Whatever the shell left running dies with the container, closing the output pipe.
            self.remove().await?;
            status
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(self.remove())
    }

    fn abandon(&mut self) {
        if self.removed {
            return;
        }
        let (docker, container, folder) = (
            self.docker.clone(),
            self.container.clone(),
            self.folder.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let options = RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                };
                let _ = docker.remove_container(&container, Some(options)).await;
                let _ = std::fs::remove_dir_all(folder);
            });
        }
    }
}

/// The three FIFOs of a session.
struct Fifos {
    requests: PathBuf,
    output: PathBuf,
    replies: PathBuf,
}

/// A fresh session folder with its FIFOs, owned by the uid the session runs as.
fn make_session_folder(folder: &Path, uid: u32, gid: u32) -> std::io::Result<Fifos> {
    std::fs::create_dir(folder)?;
    std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(folder, Some(uid), Some(gid))?;
    let fifos = Fifos {
        requests: folder.join("requests"),
        output: folder.join("output"),
        replies: folder.join("replies"),
    };
    for path in [&fifos.requests, &fifos.output, &fifos.replies] {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: mkfifo reads a NUL-terminated path.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(fifos)
}

/// A container name no other session uses: this process, a counter, and the time.
fn container_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "peerbuild-{}-{}-{nanos:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes sure sessions that ask for network can have it: the guard in place, and the
/// [`DOCKER_NETWORK`] network there with the bridge the guard knows. Or why not (a line their
/// log shows).
async fn outbound(docker: &Docker) -> Result<(), String> {
    install_guard().map_err(|reason| {
        format!("the host's own addresses cannot be guarded from the build ({reason})")
    })?;
    // Two rounds: another node may create the network between our look and our creation.
    for _ in 0..2 {
        match docker.inspect_network(DOCKER_NETWORK, None).await {
            Ok(network) => {
                let options = network.options.unwrap_or_default();
                let bridge = options.get("com.docker.network.bridge.name");
                return match (network.driver.as_deref(), bridge) {
                    (Some("bridge"), Some(name)) if name == DOCKER_BRIDGE => Ok(()),
                    _ => Err(format!(
                        "the Docker network `{DOCKER_NETWORK}` is not the one peerbuild makes \
                         (a bridge named {DOCKER_BRIDGE}); remove it (docker network rm \
                         {DOCKER_NETWORK})"
                    )),
                };
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(format!("cannot look up the Docker network: {e}")),
        }
        let options = HashMap::from([
            (
                "com.docker.network.bridge.name".to_owned(),
                DOCKER_BRIDGE.to_owned(),
            ),
            // Builds running at once do not reach each other.
            (
                "com.docker.network.bridge.enable_icc".to_owned(),
                "false".to_owned(),
            ),
        ]);
        let request = NetworkCreateRequest {
            name: DOCKER_NETWORK.to_owned(),
            driver: Some("bridge".to_owned()),
            options: Some(options),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => continue,
            Err(e) => return Err(format!("cannot create the Docker network: {e}")),
        }
    }
    Err(format!(
        "the Docker network `{DOCKER_NETWORK}` cannot be created"
    ))
}

/// Removes session containers whose node (the pid in their label) is no longer running. Best
/// effort: a failure leaves them for the next node.
async fn remove_orphans(docker: &Docker) {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![SESSION_LABEL.to_owned()],
        )])),
        ..Default::default()
    };
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    for container in containers {
        let pid = container
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SESSION_LABEL))
            .and_then(|pid| pid.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if let (false, Some(id)) = (alive, container.id) {
            let options = RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            let _ = docker.remove_container(&id, Some(options)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_differ() {
        assert_ne!(container_name(), container_name());
    }
}
