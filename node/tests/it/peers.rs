//! A hand-built libp2p peer against a real `peerbuild node` process: a peer of another major
//! protocol version is disconnected with a line saying which side to upgrade, and malformed or
//! forged gossip on the pool topic is dropped without harming the node.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::Transport;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, noise, tcp, yamux};
use protocol::wire;

#[derive(NetworkBehaviour)]
struct Probe {
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

fn transport(keypair: &Keypair) -> Boxed<(PeerId, StreamMuxerBox)> {
    tcp::tokio::Transport::new(tcp::Config::default())
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair).expect("noise"))
        .multiplex(yamux::Config::default())
        .boxed()
}

/// A peer speaking `protocol_version` in identify, subscribed to the pool topic.
fn probe(protocol_version: &str) -> Swarm<Probe> {
    let keypair = Keypair::generate_ed25519();
    let identify = identify::Behaviour::new(identify::Config::new(
        protocol_version.to_owned(),
        keypair.public(),
    ));
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(200))
        .build()
        .expect("gossipsub config");
    let mut gossipsub =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(keypair.clone()), config)
            .expect("gossipsub");
    gossipsub
        .subscribe(&IdentTopic::new(wire::POOL_TOPIC))
        .expect("subscribe");
    Swarm::new(
        transport(&keypair),
        Probe {
            identify,
            gossipsub,
        },
        keypair.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    )
}

struct NodeProcess {
    child: Child,
    log: std::path::PathBuf,
    address: Multiaddr,
}

impl NodeProcess {
    fn start(data: &Path) -> NodeProcess {
        let log = data.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_peerbuild"))
            .arg("--data-dir")
            .arg(data)
            .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(["--heartbeat-interval", "1s"])
            .env("PEERBUILD_LOG", "info,node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("peerbuild node starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = loop {
            let json = std::fs::read_to_string(data.join("node.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(address) = json
                .as_ref()
                .and_then(|j| j["bootstrap_addresses"][0].as_str())
            {
                break address.parse().expect("a multiaddr");
            }
            assert!(Instant::now() < deadline, "no node.json");
            std::thread::sleep(Duration::from_millis(50));
        };
        NodeProcess {
            child,
            log,
            address,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `swarm` until `done` says so for an event, or `limit` passes (then `false`).
async fn until(
    swarm: &mut Swarm<Probe>,
    limit: Duration,
    mut done: impl FnMut(&mut Swarm<Probe>, &SwarmEvent<ProbeEvent>) -> bool,
) -> bool {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => if done(swarm, &event) { return true },
            _ = &mut deadline => return false,
        }
    }
}

#[test]
fn another_major_version_is_refused_and_bad_gossip_is_dropped() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let node = NodeProcess::start(&scratch.path().join("node"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // A newer major version: the node disconnects it and says to upgrade itself.
        let mut newer = probe("/peerbuild/2");
        newer.dial(node.address.clone()).expect("dial");
        let closed = until(&mut newer, Duration::from_secs(20), |_, event| {
            matches!(event, SwarmEvent::ConnectionClosed { .. })
        })
        .await;
        assert!(closed, "the node kept a /peerbuild/2 peer\n{}", node.log());

        // A peer of this version that sends garbage and a forged heartbeat.
        let mut liar = probe(wire::IDENTIFY_PROTOCOL_VERSION);
        liar.dial(node.address.clone()).expect("dial");
        let subscribed = until(&mut liar, Duration::from_secs(20), |_, event| {
            matches!(
                event,
                SwarmEvent::Behaviour(ProbeEvent::Gossipsub(gossipsub::Event::Subscribed { .. }))
            )
        })
        .await;
        assert!(subscribed, "the node never subscribed\n{}", node.log());
        let topic = IdentTopic::new(wire::POOL_TOPIC);
        let forged = wire::encode_pool_message(&wire::PoolMessage::Heartbeat(wire::Heartbeat {
            peer_id: PeerId::random().to_string(),
            protocol_major: wire::PROTOCOL_MAJOR,
            slots_total: 64,
            slots_free: 64,
            ..wire::Heartbeat::default()
        }))
        .expect("encodes");
        for payload in [vec![0xff; 40], vec![0x01, 0x00, 0x05], forged] {
            liar.behaviour_mut()
                .gossipsub
                .publish(topic.clone(), payload)
                .expect("published");
        }
        // Keep the connection served while the node reads them.
        until(&mut liar, Duration::from_secs(3), |_, _| false).await;
    });
    let log = node.log();
    assert!(
        log.contains("upgrade this node"),
        "no line saying which side to upgrade:\n{log}"
    );
    assert!(log.contains("malformed pool message dropped"), "{log}");
    assert!(log.contains("speaking for another peer"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // The node is unharmed: it still answers, and lists neither the liar's forged peer nor any
    // heartbeat from the liar.
    let status = Command::new(env!("CARGO_BIN_EXE_peerbuild"))
        .arg("--data-dir")
        .arg(scratch.path().join("node"))
        .args(["status", "--json"])
        .env_remove("PEERBUILD_NODE")
        .output()
        .expect("status runs");
    assert!(status.status.success(), "{}", node.log());
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let heard = json["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| !p["heartbeat_age_ms"].is_null())
        .count();
    assert_eq!(heard, 0, "{json}");
}
