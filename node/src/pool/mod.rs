//! `peerbuild node`: a long-running pool member. It holds the data directory's node lock, loads
//! its identity, starts the swarm ([`swarm`]) and the control API ([`api`]), announces itself in
//! `DATA_DIR/node.json`, and on SIGTERM or Ctrl-C says goodbye, closes everything, removes
//! node.json and exits 0.
//!
//! `peerbuild status` and `peerbuild pool init` are in [`status`].

pub mod api;
pub mod blobs;
pub mod cas;
pub mod client;
pub mod coordinator;
pub mod facts;
pub mod identity;
pub mod shared_cache;
pub mod status;
pub mod swarm;
pub mod tasks;
pub mod view;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use libp2p::{Multiaddr, PeerId};
use protocol::wire;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::info;

use crate::cli::NodeArgs;
use crate::data_dir::{DataDir, write_private};
use crate::run::EXIT_USAGE;
use swarm::{LocalFacts, PoolSwarm, Shared, SwarmSettings};
use view::PoolView;

/// `DATA_DIR/node.json`'s format version.
pub const NODE_FILE_VERSION: u32 = 1;

/// What `DATA_DIR/node.json` says about a running node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFile {
    pub version: u32,
    pub peer_id: String,
    /// The addresses the node listens on, as the system resolved them (`/tcp/0` became a port).
    pub listen_addresses: Vec<String>,
    /// The same addresses with `/p2p/PEER_ID`: what another node's `--bootstrap` takes.
    pub bootstrap_addresses: Vec<String>,
    /// The control API: `unix:PATH`.
    pub api: String,
    /// The loopback TCP API (`http://127.0.0.1:PORT`) when `--api` was given.
    pub api_tcp: Option<String>,
    pub pid: u32,
    pub agent_version: String,
}

impl NodeFile {
    /// `DATA_DIR/node.json`, if there is one and it reads (a node may be running).
    pub fn read(data_root: &Path) -> Option<NodeFile> {
        let bytes = fs::read(data_root.join("node.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The node's API socket, if node.json names one that exists.
    pub fn socket(&self) -> Option<PathBuf> {
        api::unix_path(&self.api).filter(|socket| socket.exists())
    }
}

/// The data directory's files for the node.
struct NodePaths {
    lock: PathBuf,
    node_file: PathBuf,
    identity: PathBuf,
    socket: PathBuf,
    token: PathBuf,
}

impl NodePaths {
    fn new(root: &Path) -> Self {
        NodePaths {
            lock: root.join("node.lock"),
            node_file: root.join("node.json"),
            identity: root.join("identity.key"),
            socket: root.join("api.sock"),
            token: root.join("api.token"),
        }
    }
}

/// What the command line asked for, checked.
struct NodePlan {
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    allow_peers: Option<Vec<PeerId>>,
    labels: Vec<(String, String)>,
    slots: u32,
}

/// `peerbuild node`: runs until SIGTERM or Ctrl-C; exit status 0 then.
pub fn run_node(data_dir: Option<&Path>, args: NodeArgs) -> Result<u8> {
    let plan = match plan(&args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("peerbuild: error: {message}");
            return Ok(EXIT_USAGE);
        }
    };
    init_logging();
    let data = DataDir::open(data_dir)?;
    let paths = NodePaths::new(data.root());
    let _lock = lock_data_dir(&paths)?;
    let keypair = identity::load_or_create_identity(&paths.identity)?;
    let pool_key = args
        .pool_key
        .as_deref()
        .map(identity::load_pool_key)
        .transpose()?;
    let token = match args.api {
        Some(_) => Some(identity::load_or_create_token(&paths.token)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the node's runtime")?;
    let settings = SwarmSettings {
        keypair,
        listen: if plan.listen.is_empty() {
            default_listen(pool_key.is_some())
        } else {
            plan.listen.clone()
        },
        pool_key,
        bootstrap: plan.bootstrap.clone(),
        mdns: !args.no_mdns,
        allow_peers: plan.allow_peers.clone(),
        heartbeat_interval: args.heartbeat_interval,
        lease: args.lease,
    };
    let facts = LocalFacts {
        slots_total: plan.slots,
        labels: plan.labels.clone(),
        ..LocalFacts::default()
    };
    runtime.block_on(serve_node(data, paths, settings, facts, args.api, token))?;
    // Connections and the API's tasks end with the runtime; do not wait for stragglers.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(0)
}

async fn serve_node(
    data: DataDir,
    paths: NodePaths,
    settings: SwarmSettings,
    facts: LocalFacts,
    api_address: Option<std::net::SocketAddr>,
    token: Option<String>,
) -> Result<()> {
    let allowed = settings.allow_peers.clone();
    let keypair = settings.keypair.clone();
    let lease = settings.lease;
    let pool = PoolSwarm::start(settings)?;
    let peer_id = pool.peer_id();
    let store = Arc::new(crate::cache_cli::open_store(Some(data.root()))?);
    let mut control = pool.stream_control();
    let incoming = control
        .accept(cas::protocol())
        .map_err(|_| anyhow::anyhow!("the blob protocol is registered twice"))?;
    let incoming_tasks = control
        .accept(tasks::protocol())
        .map_err(|_| anyhow::anyhow!("the task protocol is registered twice"))?;
    let unix = api::bind_unix(&paths.socket)?;
    let tcp = match api_address {
        Some(address) => Some(api::bind_tcp(address).await?),
        None => None,
    };
    let api_tcp = match &tcp {
        Some(listener) => Some(format!("http://{}", listener.local_addr()?)),
        None => None,
    };
    let local = wire::Heartbeat {
        peer_id: peer_id.to_string(),
        protocol_major: wire::PROTOCOL_MAJOR,
        agent_version: swarm::agent_version(),
        slots_total: facts.slots_total,
        slots_free: facts.slots_total,
        labels: facts.labels.clone(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        ..wire::Heartbeat::default()
    };
    let (events, _) = broadcast::channel(1024);
    let shared = Shared {
        view: Arc::new(Mutex::new(PoolView::new(local))),
        events,
        cache_index: Arc::new(Mutex::new(shared_cache::CacheIndex::default())),
        slots: Arc::new(tokio::sync::Semaphore::new(
            facts.slots_total.max(1) as usize
        )),
        running: Arc::new(Mutex::new(std::collections::BTreeSet::new())),
        queued: Arc::new(std::sync::atomic::AtomicU32::new(0)),
    };
    let (facts_sender, facts_receiver) = watch::channel(facts);
    let (addresses_sender, mut addresses) = watch::channel(Vec::<Multiaddr>::new());
    let (commands, command_receiver) = mpsc::channel(64);
    let (shutdown_sender, shutdown) = watch::channel(false);

    spawn_probes(data.root().to_owned(), facts_sender);
    let swarm_task = tokio::spawn(pool.run(
        shared.clone(),
        facts_receiver,
        addresses_sender,
        command_receiver,
        shutdown.clone(),
    ));
    let cas_task = tokio::spawn(cas::serve(
        incoming,
        store.clone(),
        allowed.clone(),
        shutdown.clone(),
    ));
    let cache = Arc::new(shared_cache::NodeCache {
        me: peer_id,
        store: store.clone(),
        index: shared.cache_index.clone(),
        view: shared.view.clone(),
        control: control.clone(),
        commands,
    });
    let tasks = Arc::new(tasks::Tasks {
        me: peer_id,
        keypair,
        data_root: data.root().to_owned(),
        store,
        control,
        cache: cache.clone(),
        slots: shared.slots.clone(),
        next_folder: std::sync::atomic::AtomicU64::new(0),
        coordinator: coordinator::Coordinator::start(coordinator::Local {
            me: peer_id.to_string(),
            view: shared.view.clone(),
            slots: shared.slots.clone(),
            running: shared.running.clone(),
            queued: shared.queued.clone(),
            lease,
        }),
        running: shared.running.clone(),
    });
    let tasks_task = tokio::spawn(tasks::serve(
        tasks.clone(),
        incoming_tasks,
        allowed,
        shutdown.clone(),
    ));
    let api_state = Arc::new(api::ApiState {
        shared,
        token,
        cache,
        tasks,
    });
    let api_task = tokio::spawn(api::serve(unix, tcp, api_state, shutdown.clone()));

    // node.json appears once the listeners have their ports, and follows them after.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        addresses.wait_for(|a| !a.is_empty()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let node_file = |addresses: &[Multiaddr]| NodeFile {
        version: NODE_FILE_VERSION,
        peer_id: peer_id.to_string(),
        listen_addresses: addresses.iter().map(|a| a.to_string()).collect(),
        bootstrap_addresses: addresses
            .iter()
            .map(|a| format!("{a}/p2p/{peer_id}"))
            .collect(),
        api: api::unix_url(&paths.socket),
        api_tcp: api_tcp.clone(),
        pid: std::process::id(),
        agent_version: swarm::agent_version(),
    };
    write_node_file(&paths.node_file, &node_file(&addresses.borrow_and_update()))?;
    info!(peer = %peer_id, api = %api::unix_url(&paths.socket), "node started");

    let stop = wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            signal = &mut stop => {
                let signal = signal?;
                info!(signal, "stopping");
                break;
            }
            changed = addresses.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = addresses.borrow_and_update().clone();
                write_node_file(&paths.node_file, &node_file(&current))?;
            }
        }
    }
    let _ = shutdown_sender.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), swarm_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), api_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), cas_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks_task).await;
    remove_if_present(&paths.node_file)?;
    remove_if_present(&paths.socket)?;
    info!("node stopped");
    Ok(())
}

/// Start-up probes whose results go into later heartbeats: runtimes, then sandboxes (the
/// namespace probe builds a sandbox, so it runs once, off the event loop).
fn spawn_probes(data_dir: PathBuf, facts: watch::Sender<LocalFacts>) {
    tokio::spawn(async move {
        let runtimes = facts::detect_runtimes().await;
        facts.send_modify(|f| f.runtimes = runtimes);
        match tokio::task::spawn_blocking(move || facts::detect_sandboxes(data_dir)).await {
            Ok(sandboxes) => facts.send_modify(|f| f.sandboxes = sandboxes),
            Err(err) => tracing::warn!(error = %err, "sandbox probe failed"),
        }
    });
}

async fn wait_for_stop() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}

fn write_node_file(path: &Path, node: &NodeFile) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(node)?;
    json.push(b'\n');
    write_private(path, &json)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Holds `DATA_DIR/node.lock` for the node's lifetime, so two nodes never share a data directory
/// (a node that dies releases it with its descriptor).
fn lock_data_dir(paths: &NodePaths) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&paths.lock)
        .with_context(|| format!("cannot open {}", paths.lock.display()))?;
    // SAFETY: flock on a descriptor we hold open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        let running = paths
            .node_file
            .parent()
            .and_then(NodeFile::read)
            .map(|node| format!(" (pid {}, peer {})", node.pid, node.peer_id))
            .unwrap_or_default();
        anyhow::bail!(
            "another node is already running on the data directory {}{running}; stop it, or give this one its own --data-dir",
            paths
                .lock
                .parent()
                .map_or_else(String::new, |p| p.display().to_string())
        );
    }
    Ok(file)
}

fn default_listen(private: bool) -> Vec<Multiaddr> {
    let mut listen = vec![
        "/ip4/0.0.0.0/tcp/0"
            .parse()
            .expect("a valid constant address"),
    ];
    if !private {
        listen.push(
            "/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .expect("a valid constant address"),
        );
    }
    listen
}

/// Checks the flags; the error is the line the user reads.
fn plan(args: &NodeArgs) -> std::result::Result<NodePlan, String> {
    let listen = args
        .listen
        .iter()
        .map(|a| parse_address("--listen", a))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if args.pool_key.is_some()
        && let Some(quic) = listen.iter().find(|a| {
            a.iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
        })
    {
        return Err(format!(
            "--listen {quic}: a node with --pool-key listens on TCP only (the pool key cannot protect QUIC)"
        ));
    }
    let bootstrap = args
        .bootstrap
        .iter()
        .map(|a| parse_address("--bootstrap", a))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(address) = bootstrap
        .iter()
        .find(|a| !matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))))
    {
        return Err(format!(
            "--bootstrap {address}: the address must end in /p2p/PEER_ID (the other node's node.json lists its bootstrap_addresses)"
        ));
    }
    let allow_peers = if args.allow_peer.is_empty() {
        None
    } else {
        Some(
            args.allow_peer
                .iter()
                .map(|p| {
                    p.parse::<PeerId>().map_err(|_| {
                        format!("--allow-peer {p}: not a peer id (they look like 12D3KooW...; `peerbuild status` shows them)")
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
        )
    };
    let mut labels = Vec::new();
    for label in &args.labels {
        labels.push(parse_label(label)?);
    }
    labels.sort();
    labels.dedup_by(|a, b| a.0 == b.0);
    if labels.len() > wire::MAX_LABELS {
        return Err(format!(
            "{} labels given; a node announces at most {}",
            labels.len(),
            wire::MAX_LABELS
        ));
    }
    if args.lease <= args.heartbeat_interval {
        return Err(format!(
            "--lease must be longer than --heartbeat-interval ({}s), or every peer would be taken as gone between two heartbeats",
            args.heartbeat_interval.as_secs()
        ));
    }
    // Heartbeats list every run in progress, and carry at most `MAX_RUNNING` of them.
    let most = wire::MAX_RUNNING as u32;
    let slots = match args.slots {
        Some(0) => return Err("--slots 0: a node needs at least one slot".into()),
        Some(n) if n > most => {
            return Err(format!(
                "--slots {n}: a node runs at most {most} builds at once"
            ));
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| (n.get() as u32).min(most)),
    };
    Ok(NodePlan {
        listen,
        bootstrap,
        allow_peers,
        labels,
        slots,
    })
}

fn parse_address(flag: &str, text: &str) -> std::result::Result<Multiaddr, String> {
    text.parse::<Multiaddr>().map_err(|err| {
        format!("{flag} {text}: not a multiaddr ({err}); write one such as /ip4/192.0.2.7/tcp/4001")
    })
}

/// `KEY=VALUE`, the key made of letters, digits, `.`, `_`, `-`.
fn parse_label(text: &str) -> std::result::Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("--label {text}: write KEY=VALUE, such as gpu=a100"));
    };
    let key_ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !key_ok {
        return Err(format!(
            "--label {text}: the key may hold only letters, digits, `.`, `_` and `-`"
        ));
    }
    if key.len() > wire::MAX_TEXT_BYTES || value.len() > wire::MAX_TEXT_BYTES {
        return Err(format!(
            "--label {text}: keys and values are at most {} bytes",
            wire::MAX_TEXT_BYTES
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PEERBUILD_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,libp2p_mdns=warn,libp2p_gossipsub=warn,libp2p_kad=error")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert_eq!(
            parse_label("gpu=a100"),
            Ok(("gpu".to_owned(), "a100".to_owned()))
        );
        assert_eq!(
            parse_label("os.version="),
            Ok(("os.version".into(), "".into()))
        );
        assert!(parse_label("gpu").is_err());
        assert!(parse_label("=x").is_err());
        assert!(parse_label("a b=c").is_err());
    }
}
