//! The libp2p swarm: its transports (TCP with Noise and yamux, wrapped in pnet with a pool key;
//! QUIC only without one), its behaviours (allow-list, connection limits, identify, ping, mDNS,
//! Kademlia, gossipsub on the pool and events topics, raw streams) and the event loop that turns
//! their events into the pool view and the cache index.
//!
//! The loop is the only owner of the `Swarm`. Other tasks talk to it through bounded channels
//! ([`SwarmCommand`]: dial, announce a cache entry, provide a tree, find a tree's providers)
//! and read what it learns from the shared [`PoolView`] and cache index. Raw streams (the blob
//! protocol, `pool::cas`) go around the loop through `libp2p-stream`'s `Control`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::core::{ConnectedPoint, Transport};
use libp2p::futures::future::Either;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, identify, mdns,
    noise, ping, quic, tcp, yamux,
};
use protocol::Digest;
use protocol::cas::CacheEntry;
use protocol::wire::{self, Heartbeat, PoolMessage, WireError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::shared_cache::CacheIndex;
use super::view::{PoolEvent, PoolView};

/// The most connections this node keeps, in all and per peer, and the most handshakes in flight.
const MAX_CONNECTIONS: u32 = 256;
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
const MAX_PENDING_CONNECTIONS: u32 = 64;
/// Peers heard of by gossip are dialled directly while this node has fewer connections than
/// this: small pools become a full mesh, large ones rely on gossip's own mesh.
const DIAL_HEARD_PEERS_BELOW: usize = 64;
/// The largest gossip frame (payload, signature, key and topic): gossipsub refuses bigger ones
/// before decoding them.
const MAX_GOSSIP_FRAME_BYTES: usize = wire::MAX_POOL_MESSAGE_BYTES + 4096;
/// Provider lookups in flight at once; more are answered at once with no providers.
const MAX_PROVIDER_QUERIES: usize = 64;
/// Providers one lookup collects before it answers.
const MAX_PROVIDERS: usize = 16;

/// What the swarm needs to start.
pub struct SwarmSettings {
    pub keypair: Keypair,
    pub pool_key: Option<PreSharedKey>,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// `Some`: only these peers may connect or be heard.
    pub allow_peers: Option<Vec<PeerId>>,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
}

/// What the node knows of itself for its heartbeats, filled in as start-up probes finish.
#[derive(Clone, Debug, Default)]
pub struct LocalFacts {
    pub slots_total: u32,
    pub labels: Vec<(String, String)>,
    pub runtimes: Vec<wire::Runtime>,
    pub sandboxes: Vec<wire::Sandbox>,
}

/// Requests to the event loop from other tasks.
#[derive(Debug)]
#[non_exhaustive]
pub enum SwarmCommand {
    /// Dial a peer by address (the control API or a later slice's placement).
    Dial(Multiaddr),
    /// This node saved a cache entry: say so on the events topic and provide its tree.
    Announce(CacheEntry),
    /// This node holds a tree now: provide it in the DHT.
    Provide(Digest),
    /// This node took or finished a run: say so on the events topic.
    TaskState {
        task: String,
        build_id: String,
        state: wire::TaskState,
    },
    /// Which peers provide this digest in the DHT (at most 16).
    FindProviders {
        digest: Digest,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// What the event loop shares with the rest of the node.
#[derive(Clone)]
pub struct Shared {
    pub view: Arc<Mutex<PoolView>>,
    pub events: broadcast::Sender<PoolEvent>,
    /// Cache entries peers announced.
    pub cache_index: Arc<Mutex<CacheIndex>>,
    /// This node's build slots: heartbeats announce the free ones.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The tasks this node runs now, by offer `task` (heartbeats list them).
    pub running: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Tasks waiting in this node's coordinator queue.
    pub queued: Arc<std::sync::atomic::AtomicU32>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    /// Raw streams: the blob protocol (`pool::cas`).
    stream: libp2p_stream::Behaviour,
}

/// Says `message` on the events topic; best effort (no peers yet, or over the wire limits, is
/// a debug line).
fn publish_event(swarm: &mut Swarm<Behaviour>, message: &PoolMessage, what: &str) {
    match wire::encode_pool_message(message) {
        Ok(bytes) => {
            if let Err(err) = swarm
                .behaviour_mut()
                .gossipsub
                .publish(events_topic(), bytes)
            {
                debug!(error = %err, "{what} not announced by gossip");
            }
        }
        Err(err) => debug!(error = %err, "{what} over the wire limits: not announced"),
    }
}

/// The transport: TCP + Noise + yamux, inside pnet when there is a pool key; QUIC beside it
/// only without one (pnet cannot cover QUIC, and a private pool must not be reachable around it).
fn transport(
    keypair: &Keypair,
    pool_key: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let noise = noise::Config::new(keypair).context("cannot set up Noise encryption")?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let handshake_timeout = Duration::from_secs(20);
    Ok(match pool_key {
        Some(key) => tcp
            .and_then(move |socket, _| PnetConfig::new(key).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(handshake_timeout)
            .boxed(),
        None => {
            let tcp = tcp
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(handshake_timeout);
            let quic = quic::tokio::Transport::new(quic::Config::new(keypair));
            tcp.or_transport(quic)
                .map(|either, _| match either {
                    Either::Left((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
                    Either::Right((peer, connection)) => (peer, StreamMuxerBox::new(connection)),
                })
                .boxed()
        }
    })
}

fn behaviour(settings: &SwarmSettings) -> Result<Behaviour> {
    let keypair = &settings.keypair;
    let peer_id = keypair.public().to_peer_id();
    let allow = settings.allow_peers.as_ref().map(|peers| {
        let mut allowed = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for peer in peers {
            allowed.allow_peer(*peer);
        }
        allowed
    });
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(MAX_CONNECTIONS))
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
        .with_max_pending_incoming(Some(MAX_PENDING_CONNECTIONS))
        .with_max_pending_outgoing(Some(MAX_PENDING_CONNECTIONS));
    let identify = identify::Behaviour::new(
        identify::Config::new(wire::IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
            .with_agent_version(agent_version()),
    );
    let mdns = if settings.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .context("cannot start mDNS discovery (try --no-mdns)")?,
        )
    } else {
        None
    };
    let mut kad_config = kad::Config::new(StreamProtocol::new(wire::KAD_PROTOCOL));
    kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
    let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
    // Every node is a full DHT member: pools are small and peers reachable (LAN or bootstrap).
    kad.set_mode(Some(kad::Mode::Server));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_FRAME_BYTES)
        .build()
        .map_err(|err| anyhow::anyhow!("gossipsub configuration: {err}"))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(keypair.clone()), gossip_config)
            .map_err(|err| anyhow::anyhow!("gossipsub: {err}"))?;
    for topic in [pool_topic(), events_topic()] {
        gossipsub
            .subscribe(&topic)
            .map_err(|err| anyhow::anyhow!("cannot subscribe to {topic}: {err}"))?;
    }
    Ok(Behaviour {
        allow: allow.into(),
        limits: connection_limits::Behaviour::new(limits),
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        mdns: mdns.into(),
        kad,
        gossipsub,
        stream: libp2p_stream::Behaviour::new(),
    })
}

fn pool_topic() -> IdentTopic {
    IdentTopic::new(wire::POOL_TOPIC)
}

fn events_topic() -> IdentTopic {
    IdentTopic::new(wire::EVENTS_TOPIC)
}

fn record_key(digest: &Digest) -> kad::RecordKey {
    kad::RecordKey::new(digest.hash())
}

/// `peerbuild/<version>`, the identify agent version.
pub fn agent_version() -> String {
    format!("peerbuild/{}", env!("CARGO_PKG_VERSION"))
}

/// The running swarm, before its loop starts: listening, bootstrap peers dialled.
pub struct PoolSwarm {
    swarm: Swarm<Behaviour>,
    settings: SwarmSettings,
}

impl PoolSwarm {
    /// Builds the swarm and starts listening and dialling; errors name the address at fault.
    pub fn start(settings: SwarmSettings) -> Result<Self> {
        let transport = transport(&settings.keypair, settings.pool_key)?;
        let behaviour = behaviour(&settings)?;
        let peer_id = settings.keypair.public().to_peer_id();
        let config = libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(300));
        let mut swarm = Swarm::new(transport, behaviour, peer_id, config);
        for address in &settings.listen {
            swarm
                .listen_on(address.clone())
                .with_context(|| format!("cannot listen on {address}"))?;
        }
        for address in &settings.bootstrap {
            let Some(Protocol::P2p(peer)) = address.iter().last() else {
                anyhow::bail!(
                    "--bootstrap {address}: the address must end in /p2p/PEER_ID (the peer id is in the other node's node.json and `peerbuild status`)"
                );
            };
            swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, address.clone());
            if let Err(err) = swarm.dial(address.clone()) {
                warn!(%address, error = %err, "cannot dial bootstrap peer");
            }
        }
        Ok(PoolSwarm { swarm, settings })
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// A handle for opening and accepting raw streams (the blob protocol).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().stream.new_control()
    }

    /// Runs until `shutdown` turns true: heartbeats, discovery, the pool view. On shutdown it
    /// says it is leaving and closes every connection.
    pub async fn run(
        mut self,
        shared: Shared,
        facts: watch::Receiver<LocalFacts>,
        listen_addresses: watch::Sender<Vec<Multiaddr>>,
        mut commands: mpsc::Receiver<SwarmCommand>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut state = LoopState {
            sequence: 0,
            listening: Vec::new(),
            lease: self.settings.lease,
            shared,
            facts,
            listen_addresses,
            provider_queries: HashMap::new(),
        };
        let mut heartbeats = tokio::time::interval(self.settings.heartbeat_interval);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first bootstrap runs once the first connections had a moment to identify.
        let mut kad_bootstrap = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(30),
        );
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => state.on_event(&mut self.swarm, &self.settings, event),
                _ = heartbeats.tick() => state.beat(&mut self.swarm),
                _ = kad_bootstrap.tick() => {
                    // Fails only when no peer is known yet; mDNS or a later heartbeat fixes that.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                Some(command) = commands.recv() => state.on_command(&mut self.swarm, command),
                _ = shutdown.changed() => break,
            }
        }
        self.leave().await;
    }

    /// Says goodbye on the pool topic and gives the swarm a moment to send it, then closes.
    async fn leave(mut self) {
        let goodbye = PoolMessage::Leaving {
            peer_id: self.peer_id().to_string(),
        };
        if let Ok(bytes) = wire::encode_pool_message(&goodbye) {
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(pool_topic(), bytes);
        }
        let deadline = tokio::time::sleep(Duration::from_millis(300));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = self.swarm.select_next_some() => {}
                _ = &mut deadline => break,
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        info!("swarm closed");
    }
}

struct LoopState {
    sequence: u64,
    listening: Vec<Multiaddr>,
    lease: Duration,
    shared: Shared,
    facts: watch::Receiver<LocalFacts>,
    listen_addresses: watch::Sender<Vec<Multiaddr>>,
    /// Provider lookups in flight: what they found so far, and who waits for the answer.
    provider_queries: HashMap<kad::QueryId, (Vec<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
}

impl LoopState {
    fn on_command(&mut self, swarm: &mut Swarm<Behaviour>, command: SwarmCommand) {
        match command {
            SwarmCommand::Dial(address) => {
                if let Err(err) = swarm.dial(address.clone()) {
                    warn!(%address, error = %err, "cannot dial");
                }
            }
            SwarmCommand::TaskState {
                task,
                build_id,
                state,
            } => {
                let message = PoolMessage::TaskState {
                    peer_id: swarm.local_peer_id().to_string(),
                    task,
                    build_id,
                    state,
                };
                publish_event(swarm, &message, "task state");
            }
            SwarmCommand::Announce(entry) => {
                let tree = entry.tree;
                let message = PoolMessage::CacheSaved {
                    peer_id: swarm.local_peer_id().to_string(),
                    entry,
                };
                // Peers that miss it still find it by asking (`CacheEntries`) and in the DHT.
                publish_event(swarm, &message, "cache entry");
                self.provide(swarm, &tree);
            }
            SwarmCommand::Provide(digest) => self.provide(swarm, &digest),
            SwarmCommand::FindProviders { digest, reply } => {
                if self.provider_queries.len() >= MAX_PROVIDER_QUERIES {
                    let _ = reply.send(Vec::new());
                    return;
                }
                let id = swarm.behaviour_mut().kad.get_providers(record_key(&digest));
                self.provider_queries.insert(id, (Vec::new(), reply));
            }
        }
    }

    fn provide(&self, swarm: &mut Swarm<Behaviour>, digest: &Digest) {
        if let Err(err) = swarm
            .behaviour_mut()
            .kad
            .start_providing(record_key(digest))
        {
            debug!(%digest, error = %err, "not provided in the DHT");
        }
    }

    /// A step of a provider lookup: collect, and answer when it is done or has enough.
    fn on_providers(
        &mut self,
        id: kad::QueryId,
        result: Result<kad::GetProvidersOk, kad::GetProvidersError>,
        last: bool,
    ) {
        let Some((found, _)) = self.provider_queries.get_mut(&id) else {
            return;
        };
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
            for provider in providers {
                if !found.contains(&provider) {
                    found.push(provider);
                }
            }
        }
        let done = last || found.len() >= MAX_PROVIDERS;
        if done && let Some((found, reply)) = self.provider_queries.remove(&id) {
            let _ = reply.send(found);
        }
    }

    fn publish_events(&self, events: Vec<PoolEvent>) {
        for event in events {
            // No subscriber is fine: nobody is watching the event stream.
            let _ = self.shared.events.send(event);
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, PoolView> {
        // A panic while holding the lock is a bug elsewhere; the view itself stays consistent
        // (every update is one call), so keep serving it.
        self.shared
            .view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends this node's heartbeat and forgets peers whose lease ran out.
    fn beat(&mut self, swarm: &mut Swarm<Behaviour>) {
        self.sequence += 1;
        let heartbeat = self.heartbeat(swarm);
        self.view().set_local(heartbeat.clone());
        match wire::encode_pool_message(&PoolMessage::Heartbeat(heartbeat)) {
            Ok(bytes) => {
                if let Err(err) = swarm.behaviour_mut().gossipsub.publish(pool_topic(), bytes) {
                    // No peers yet is the usual case for a lone node.
                    tracing::trace!(error = %err, "heartbeat not published");
                }
            }
            Err(err) => {
                warn!(error = %err, "heartbeat not sent: over the wire limits (fewer labels?)")
            }
        }
        let events = self.view().expire(Instant::now(), self.lease);
        for event in &events {
            if let PoolEvent::PeerLeft { peer_id, .. } = event {
                info!(peer = %peer_id, "peer lease expired");
            }
        }
        self.publish_events(events);
    }

    fn heartbeat(&self, swarm: &Swarm<Behaviour>) -> Heartbeat {
        let facts = self.facts.borrow().clone();
        let queue_length = self
            .shared
            .queued
            .load(std::sync::atomic::Ordering::Relaxed);
        let running: Vec<String> = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .take(wire::MAX_RUNNING)
            .cloned()
            .collect();
        let slots_free = (self.shared.slots.available_permits() as u32).min(facts.slots_total);
        Heartbeat {
            peer_id: swarm.local_peer_id().to_string(),
            sequence: self.sequence,
            protocol_major: wire::PROTOCOL_MAJOR,
            agent_version: agent_version(),
            listen_addresses: self
                .listening
                .iter()
                .take(wire::MAX_ADDRESSES)
                .map(|a| a.to_string())
                .collect(),
            slots_total: facts.slots_total,
            slots_free,
            labels: facts.labels,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            runtimes: facts.runtimes,
            sandboxes: facts.sandboxes,
            load_milli: super::facts::load_milli(),
            queue_length,
            running,
        }
    }

    fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        settings: &SwarmSettings,
        event: SwarmEvent<BehaviourEvent>,
    ) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if !self.listening.contains(&address) {
                    self.listening.push(address);
                }
                self.listen_addresses.send_replace(self.listening.clone());
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.retain(|a| *a != address);
                self.listen_addresses.send_replace(self.listening.clone());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if !is_allowed(settings, &peer_id) {
                    // The allow-list behaviour refuses these before they are established; this
                    // is a second lock on the same door.
                    warn!(peer = %peer_id, "peer not on the allow-list; disconnecting");
                    let _ = swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let address = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                debug!(peer = %peer_id, %address, "connected");
                self.view()
                    .connected(&peer_id.to_string(), address.to_string());
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } => {
                debug!(peer = %peer_id, "connection closed");
                self.view().disconnected(&peer_id.to_string());
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                debug!(%send_back_addr, ?peer_id, error = %error, "incoming connection refused or failed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(swarm, settings, event),
            _ => {}
        }
    }

    fn on_behaviour(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        settings: &SwarmSettings,
        event: BehaviourEvent,
    ) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Err(reason) = check_version(&info.protocol_version, &info.agent_version) {
                    warn!(peer = %peer_id, agent = %info.agent_version, "{reason}; disconnecting");
                    let _ = swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.view()
                    .identified(&peer_id.to_string(), info.agent_version);
                let speaks_kad = info
                    .protocols
                    .iter()
                    .any(|p| p.as_ref() == wire::KAD_PROTOCOL);
                if speaks_kad {
                    for address in info.listen_addrs {
                        swarm.behaviour_mut().kad.add_address(&peer_id, address);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer_id, address) in found {
                    if !is_allowed(settings, &peer_id) {
                        continue;
                    }
                    debug!(peer = %peer_id, %address, "found by mDNS");
                    swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                    let dial = DialOpts::peer_id(peer_id)
                        .addresses(vec![address])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    let _ = swarm.dial(dial);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => self.on_providers(id, result, step.last),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance =
                    self.on_pool_message(swarm, settings, message.source, &message.data);
                swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            _ => {}
        }
    }

    /// Validates and applies one pool message; the answer tells gossipsub whether to forward it
    /// (`Accept`), drop it quietly (`Ignore`) or drop it and count it against the sender (`Reject`).
    fn on_pool_message(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        settings: &SwarmSettings,
        source: Option<PeerId>,
        data: &[u8],
    ) -> MessageAcceptance {
        let Some(source) = source else {
            return MessageAcceptance::Reject;
        };
        if !is_allowed(settings, &source) {
            debug!(peer = %source, "message from a peer not on the allow-list dropped");
            return MessageAcceptance::Reject;
        }
        let message = match wire::decode_pool_message(data) {
            Ok(message) => message,
            Err(err @ (WireError::UnsupportedVersion { .. } | WireError::UnknownKind { .. })) => {
                debug!(peer = %source, error = %err, "pool message of another version ignored");
                return MessageAcceptance::Ignore;
            }
            Err(err) => {
                warn!(peer = %source, error = %err, "malformed pool message dropped");
                return MessageAcceptance::Reject;
            }
        };
        if message.peer_id() != source.to_string() {
            warn!(peer = %source, claimed = %message.peer_id(), "pool message speaking for another peer dropped");
            return MessageAcceptance::Reject;
        }
        match message {
            PoolMessage::Heartbeat(heartbeat) => {
                if heartbeat.protocol_major != wire::PROTOCOL_MAJOR {
                    return MessageAcceptance::Ignore;
                }
                self.dial_if_new(swarm, source, &heartbeat.listen_addresses);
                let events = self.view().heard(heartbeat, Instant::now());
                for event in &events {
                    if let PoolEvent::PeerJoined { peer_id } = event {
                        info!(peer = %peer_id, "peer joined");
                    }
                }
                self.publish_events(events);
            }
            PoolMessage::Leaving { peer_id } => {
                info!(peer = %peer_id, "peer leaving");
                let events = self.view().left(&peer_id);
                self.publish_events(events);
            }
            PoolMessage::CacheSaved { entry, .. } => {
                debug!(peer = %source, key = %entry.key, "cache entry announced");
                self.shared
                    .cache_index
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .heard(source, entry);
            }
            PoolMessage::TaskState {
                task,
                build_id,
                state,
                ..
            } => {
                debug!(peer = %source, %task, ?state, "task state announced");
                let (state, status, result) = match state {
                    wire::TaskState::Running => ("running", None, None),
                    wire::TaskState::Finished { status, result } => (
                        "finished",
                        Some(status),
                        Some(blake3::Hash::from(result).to_hex().to_string()),
                    ),
                    wire::TaskState::Ended => ("ended", None, None),
                };
                self.publish_events(vec![PoolEvent::TaskState {
                    peer_id: source.to_string(),
                    task,
                    build_id,
                    state: state.to_owned(),
                    status,
                    result,
                }]);
            }
            _ => return MessageAcceptance::Ignore,
        }
        MessageAcceptance::Accept
    }

    /// A peer heard of through gossip gets a direct connection while the pool is small, and its
    /// addresses go into the DHT.
    fn dial_if_new(&self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addresses: &[String]) {
        if swarm.is_connected(&peer) || swarm.connected_peers().count() >= DIAL_HEARD_PEERS_BELOW {
            return;
        }
        let addresses: Vec<Multiaddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        if addresses.is_empty() {
            return;
        }
        for address in &addresses {
            swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, address.clone());
        }
        let dial = DialOpts::peer_id(peer)
            .addresses(addresses)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let _ = swarm.dial(dial);
    }
}

fn is_allowed(settings: &SwarmSettings, peer: &PeerId) -> bool {
    settings
        .allow_peers
        .as_ref()
        .is_none_or(|peers| peers.contains(peer))
}

/// Whether a peer's identify protocol version is one this node speaks; the error says which side
/// to upgrade.
pub fn check_version(protocol_version: &str, peer_agent: &str) -> Result<(), String> {
    match wire::protocol_major(protocol_version) {
        None => Err(format!(
            "peer speaks `{protocol_version}`, not the peerbuild protocol"
        )),
        Some(major) if major == wire::PROTOCOL_MAJOR => Ok(()),
        Some(major) if major > wire::PROTOCOL_MAJOR => Err(format!(
            "peer ({peer_agent}) speaks pool protocol {major}, this node ({}) speaks {}: upgrade this node",
            agent_version(),
            wire::PROTOCOL_MAJOR
        )),
        Some(major) => Err(format!(
            "peer ({peer_agent}) speaks pool protocol {major}, this node ({}) speaks {}: upgrade the peer",
            agent_version(),
            wire::PROTOCOL_MAJOR
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_major_versions_are_refused_naming_the_side_to_upgrade() {
        assert_eq!(check_version("/peerbuild/1", "peerbuild/0.1.0"), Ok(()));
        let newer = check_version("/peerbuild/2", "peerbuild/9.0.0").expect_err("refused");
        assert!(newer.ends_with("upgrade this node"), "{newer}");
        let older = check_version("/peerbuild/0", "peerbuild/0.0.1").expect_err("refused");
        assert!(older.ends_with("upgrade the peer"), "{older}");
        assert!(check_version("/ipfs/0.1.0", "kubo").is_err());
    }
}
