//! `Cluster`: real `peerbuild node` processes on loopback, each with its own data directory,
//! for end-to-end tests of the pool. Ports are chosen by the system and read from each node's
//! `node.json`; conditions are awaited with deadlines; every node is killed on drop, even when a
//! test fails.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{TempDir, peerbuild};

/// How often test nodes heartbeat, and how long their leases are.
pub const HEARTBEAT: &str = "1s";
pub const LEASE: &str = "5s";

/// How a node is started.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Indexes of earlier nodes to `--bootstrap` to.
    pub bootstrap: Vec<usize>,
    pub pool_key: Option<PathBuf>,
    pub labels: Vec<String>,
    pub slots: Option<u32>,
    /// Peer ids for `--allow-peer`.
    pub allow_peers: Vec<String>,
    /// Also serve the API on loopback TCP (`--api 127.0.0.1:0`).
    pub api_tcp: bool,
    /// Run the node in this network namespace, listening on every address with mDNS on
    /// (instead of loopback only, without mDNS).
    pub netns: Option<String>,
    /// Run the node with this umask (a node must write what it shares or restores readable
    /// whatever its umask).
    pub umask: Option<libc::mode_t>,
}

/// A running (or stopped) node.
pub struct Node {
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub peer_id: String,
    /// `node.json`'s `bootstrap_addresses`.
    pub bootstrap_addresses: Vec<String>,
}

impl Node {
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the node wrote to standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A set of nodes on loopback, torn down on drop.
pub struct Cluster {
    root: TempDir,
    nodes: Vec<Node>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            root: TempDir::new("cluster"),
            nodes: Vec::new(),
        }
    }

    /// A folder for test files (pool keys) that goes with the cluster.
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }

    /// Starts a node and waits (up to 30 s) for its node.json; returns its index.
    pub fn start(&mut self, options: NodeOptions) -> usize {
        let index = self.nodes.len();
        let data = self.root.path().join(format!("node{index}"));
        let log = self.root.path().join(format!("node{index}.log"));
        let child = self.spawn(&data, &log, &options);
        self.nodes.push(Node {
            data,
            log,
            child: Some(child),
            peer_id: String::new(),
            bootstrap_addresses: Vec::new(),
        });
        self.await_node_file(index);
        index
    }

    /// Starts a stopped node again on the same data directory.
    pub fn restart(&mut self, index: usize, options: NodeOptions) {
        assert!(self.nodes[index].child.is_none(), "node {index} still runs");
        let (data, log) = (
            self.nodes[index].data.clone(),
            self.nodes[index].log.clone(),
        );
        let child = self.spawn(&data, &log, &options);
        self.nodes[index].child = Some(child);
        self.await_node_file(index);
    }

    /// The command a node of this cluster runs, for tests that expect it to refuse to start.
    pub fn node_command(&self, data: &Path, options: &NodeOptions) -> Command {
        let mut command = match &options.netns {
            Some(namespace) => {
                let mut command = Command::new(peerbuild());
                crate::enter_netns(&mut command, namespace);
                command.arg("--data-dir").arg(data).args([
                    "node",
                    "--listen",
                    "/ip4/0.0.0.0/tcp/0",
                ]);
                command
            }
            None => {
                let mut command = Command::new(peerbuild());
                command.arg("--data-dir").arg(data).args([
                    "node",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--no-mdns",
                ]);
                command
            }
        };
        command
            .args(["--heartbeat-interval", HEARTBEAT, "--lease", LEASE])
            .env("PEERBUILD_LOG", "info,node=debug")
            .stdin(Stdio::null());
        for index in &options.bootstrap {
            let address = self.nodes[*index]
                .bootstrap_addresses
                .first()
                .unwrap_or_else(|| panic!("node {index} has no address"));
            command.args(["--bootstrap", address]);
        }
        if let Some(key) = &options.pool_key {
            command.arg("--pool-key").arg(key);
        }
        for label in &options.labels {
            command.args(["--label", label]);
        }
        if let Some(slots) = options.slots {
            command.args(["--slots", &slots.to_string()]);
        }
        for peer in &options.allow_peers {
            command.args(["--allow-peer", peer]);
        }
        if options.api_tcp {
            command.args(["--api", "127.0.0.1:0"]);
        }
        if let Some(mask) = options.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only calls umask(2), which cannot fail
            // and allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        command
    }

    fn spawn(&self, data: &Path, log: &Path, options: &NodeOptions) -> Child {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("can create the node's log");
        self.node_command(data, options)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("can start peerbuild node")
    }

    fn await_node_file(&mut self, index: usize) {
        let path = self.nodes[index].data.join("node.json");
        let pid = self.nodes[index].pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && json["pid"].as_u64().map(|p| p as u32) == pid
            {
                let node = &mut self.nodes[index];
                node.peer_id = json["peer_id"].as_str().unwrap_or_default().to_owned();
                node.bootstrap_addresses = json["bootstrap_addresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    !node.bootstrap_addresses.is_empty(),
                    "node {index} has no addresses in node.json: {text}"
                );
                return;
            }
            if let Some(status) = self.nodes[index]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "node {index} exited with {status} before writing node.json:\n{}",
                    self.nodes[index].log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {index} wrote no node.json within 30 s:\n{}",
                self.nodes[index].log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// `peerbuild run SRC --json ARGS` of `project` on node `index`'s data directory: the build
    /// goes to that node (or, with `--local`, runs beside it using the pool's cache).
    pub fn run_on(&self, index: usize, project: &crate::Project, args: &[&str]) -> crate::Run {
        let output = self
            .run_command(index, project, args)
            .output()
            .expect("peerbuild runs");
        crate::Run::new(output, project)
    }

    /// The same, started and left running (output piped): for tests that act while it runs.
    pub fn spawn_run_on(&self, index: usize, project: &crate::Project, args: &[&str]) -> Child {
        self.run_command(index, project, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("peerbuild runs")
    }

    fn run_command(&self, index: usize, project: &crate::Project, args: &[&str]) -> Command {
        let mut command = Command::new(peerbuild());
        command
            .arg("--data-dir")
            .arg(&self.nodes[index].data)
            .arg("run")
            .arg(project.src())
            .arg("--json")
            .args(args)
            .env_remove("PEERBUILD_NODE")
            .env_remove("PEERBUILD_DATA_DIR")
            .current_dir(project.root())
            .stdin(Stdio::null());
        command
    }

    /// Lets node `index`'s owner run builds without isolation: `host` is its default and
    /// allowed sandbox (tests of the pool, not of sandboxes, stay fast and need no root).
    pub fn allow_host(&self, index: usize) {
        std::fs::write(
            self.nodes[index].data.join("config.toml"),
            "[sandbox]\ndefault = \"host\"\nallow = [\"host\"]\n",
        )
        .expect("write config.toml");
    }

    /// `peerbuild --data-dir NODE_DATA cache ARGS` on node `index`'s data directory.
    pub fn cache_on(&self, index: usize, args: &[&str]) -> Output {
        Command::new(peerbuild())
            .arg("--data-dir")
            .arg(&self.nodes[index].data)
            .arg("cache")
            .args(args)
            .env_remove("PEERBUILD_NODE")
            .env_remove("PEERBUILD_DATA_DIR")
            .stdin(Stdio::null())
            .output()
            .expect("peerbuild cache runs")
    }

    /// `peerbuild status` against node `index`, with `args` (such as `--json`).
    pub fn status_command(&self, index: usize, args: &[&str]) -> Output {
        Command::new(peerbuild())
            .arg("--data-dir")
            .arg(&self.nodes[index].data)
            .arg("status")
            .args(args)
            .env_remove("PEERBUILD_NODE")
            .output()
            .expect("can run peerbuild status")
    }

    /// `peerbuild status --json` of node `index`, parsed.
    pub fn status(&self, index: usize) -> serde_json::Value {
        let output = self.status_command(index, &["--json"]);
        assert!(
            output.status.success(),
            "peerbuild status failed: {}\nnode log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.nodes[index].log()
        );
        serde_json::from_slice(&output.stdout).expect("status --json prints JSON")
    }

    /// The peers node `index` has heard a heartbeat from.
    pub fn peers_heard_by(&self, index: usize) -> Vec<String> {
        self.peers_of(index, |p| !p["heartbeat_age_ms"].is_null())
    }

    /// Every peer node `index` lists (heard from or connected).
    pub fn peers_listed_by(&self, index: usize) -> Vec<String> {
        self.peers_of(index, |_| true)
    }

    /// The ids of the peers in node `index`'s status that `keep` accepts.
    fn peers_of(&self, index: usize, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
        let status = self.status(index);
        status["peers"]
            .as_array()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|p| keep(p))
                    .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to 20 s) for the node to exit.
    pub fn stop(&mut self, index: usize) -> ExitStatus {
        let mut child = self.nodes[index].child.take().expect("node runs");
        // SAFETY: kill on the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                panic!(
                    "node {index} did not stop within 20 s of SIGTERM ({:?}):\n{}",
                    status.signal(),
                    self.nodes[index].log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the node with SIGKILL: no goodbye, no clean-up (a machine that died).
    pub fn kill(&mut self, index: usize) {
        let mut child = self.nodes[index].child.take().expect("node runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i} ({})\n{}", n.peer_id, n.log()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Waits until `condition` holds, checking every 100 ms; fails with `what` (and `context()`, such
/// as the nodes' logs) past `deadline`.
pub fn wait_until(
    what: &str,
    deadline: Instant,
    mut condition: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two network namespaces joined by a veth pair (`ip netns`, as root), removed on drop: two
/// machines on one LAN, for mDNS (which skips the loopback interface). A pair rather than a
/// bridge: a host bridge's traffic passes the host's iptables FORWARD chain, which Docker sets to
/// drop.
pub struct Lan {
    pub namespaces: Vec<String>,
}

impl Lan {
    /// `None` when this machine cannot make them (not root, no `ip`).
    pub fn pair() -> Option<Lan> {
        crate::ensure_test_packages();
        let tag = std::process::id() % 100_000;
        let lan = Lan {
            namespaces: vec![format!("pb{tag}n0"), format!("pb{tag}n1")],
        };
        let subnet = tag % 200 + 20;
        let (a, b) = (&lan.namespaces[0], &lan.namespaces[1]);
        let steps = [
            format!("netns add {a}"),
            format!("netns add {b}"),
            format!("-n {a} link add pb0 type veth peer name pb1 netns {b}"),
            format!("-n {a} addr add 10.{subnet}.0.1/24 dev pb0"),
            format!("-n {b} addr add 10.{subnet}.0.2/24 dev pb1"),
            format!("-n {a} link set pb0 up multicast on"),
            format!("-n {b} link set pb1 up multicast on"),
            format!("-n {a} link set lo up"),
            format!("-n {b} link set lo up"),
        ];
        let made = crate::set_up_network(
            || {
                steps.iter().try_for_each(|step| {
                    crate::try_ip(&step.split_whitespace().collect::<Vec<_>>())
                })
            },
            || {
                for namespace in &lan.namespaces {
                    let _ = crate::try_ip(&["netns", "delete", namespace]);
                }
            },
        );
        match made {
            Ok(()) => Some(lan),
            Err(err) => {
                eprintln!("cannot make two network namespaces joined by a veth pair: {err}");
                None
            }
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        let _serial = crate::netns_setup_lock();
        for namespace in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "delete", namespace])
                .stderr(Stdio::null())
                .status();
        }
    }
}
