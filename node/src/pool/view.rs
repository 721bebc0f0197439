//! The pool as this node sees it: every peer heard from (by heartbeat or connection), kept by the
//! swarm's event loop and read by the control API. Also the JSON shapes `GET /v1/status` and
//! `GET /v1/events` return, which `peerbuild status` reads back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use protocol::wire::{Enforcement, Heartbeat};
use serde::{Deserialize, Serialize};

/// The version of the API's JSON shapes; bumped when a field changes meaning or goes away.
pub const API_VERSION: u32 = 1;

/// The most peers a view keeps; a heartbeat from a new peer past it is dropped (with a log line),
/// so a flood of fake peer ids cannot grow the node's memory without bound.
pub const MAX_PEERS: usize = 4096;

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub api_version: u32,
    /// This node.
    pub node: PeerStatus,
    /// Every other peer this node knows of, by peer id.
    pub peers: Vec<PeerStatus>,
}

/// One peer as `peerbuild status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer_id: String,
    /// Addresses the peer listens on (from its heartbeat), else the ones seen on connections.
    pub addresses: Vec<String>,
    /// Whether this node has a direct connection to it now.
    pub connected: bool,
    pub slots_free: Option<u32>,
    pub slots_total: Option<u32>,
    pub labels: BTreeMap<String, String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub runtimes: BTreeMap<String, String>,
    /// Sandbox kinds and what each enforces (`enforced`, `best_effort`, `none`).
    pub sandboxes: BTreeMap<String, BTreeMap<String, String>>,
    /// The one-minute load average.
    pub load: Option<f64>,
    pub queue_length: Option<u32>,
    /// Milliseconds since its last heartbeat arrived (`None`: none yet).
    pub heartbeat_age_ms: Option<u64>,
    pub agent_version: Option<String>,
    pub protocol_major: Option<u32>,
}

/// A line of `GET /v1/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PoolEvent {
    PeerJoined {
        peer_id: String,
    },
    PeerHeartbeat {
        peer_id: String,
        slots_free: u32,
        slots_total: u32,
        load: f64,
        queue_length: u32,
    },
    PeerLeft {
        peer_id: String,
        /// `leaving` (it said so), `lease_expired` (silent too long).
        reason: String,
    },
    /// A peer took a run of a build (`running`), finished it (`finished`, with the result's
    /// status and the BLAKE3 of its JSON), or ended it without a result (`ended`).
    TaskState {
        peer_id: String,
        task: String,
        build_id: String,
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
}

#[derive(Debug, Default)]
struct Peer {
    heartbeat: Option<Heartbeat>,
    heard_at: Option<Instant>,
    connections: u32,
    seen_addresses: Vec<String>,
    agent_version: Option<String>,
}

/// The pool view; owned behind a mutex, touched only briefly (no I/O under the lock).
#[derive(Debug)]
pub struct PoolView {
    local: Heartbeat,
    peers: BTreeMap<String, Peer>,
}

impl PoolView {
    pub fn new(local: Heartbeat) -> Self {
        PoolView {
            local,
            peers: BTreeMap::new(),
        }
    }

    /// The latest heartbeat this node sent.
    pub fn set_local(&mut self, local: Heartbeat) {
        self.local = local;
    }

    /// A valid heartbeat arrived; returns the events it causes.
    pub fn heard(&mut self, heartbeat: Heartbeat, now: Instant) -> Vec<PoolEvent> {
        let mut events = Vec::new();
        if heartbeat.peer_id == self.local.peer_id {
            return events;
        }
        if !self.peers.contains_key(&heartbeat.peer_id) && self.peers.len() >= MAX_PEERS {
            tracing::warn!(peer = %heartbeat.peer_id, "pool view full; heartbeat of a new peer dropped");
            return events;
        }
        let peer = self.peers.entry(heartbeat.peer_id.clone()).or_default();
        if peer.heartbeat.is_none() {
            events.push(PoolEvent::PeerJoined {
                peer_id: heartbeat.peer_id.clone(),
            });
        }
        events.push(PoolEvent::PeerHeartbeat {
            peer_id: heartbeat.peer_id.clone(),
            slots_free: heartbeat.slots_free,
            slots_total: heartbeat.slots_total,
            load: heartbeat.load_milli as f64 / 1000.0,
            queue_length: heartbeat.queue_length,
        });
        peer.heartbeat = Some(heartbeat);
        peer.heard_at = Some(now);
        events
    }

    /// A peer announced that it is leaving.
    pub fn left(&mut self, peer_id: &str) -> Vec<PoolEvent> {
        match self.peers.get_mut(peer_id) {
            Some(peer) if peer.heartbeat.is_some() => {
                peer.heartbeat = None;
                peer.heard_at = None;
                if peer.connections == 0 {
                    self.peers.remove(peer_id);
                }
                vec![PoolEvent::PeerLeft {
                    peer_id: peer_id.to_owned(),
                    reason: "leaving".into(),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// A connection to `peer_id` was established.
    pub fn connected(&mut self, peer_id: &str, address: String) {
        if !self.peers.contains_key(peer_id) && self.peers.len() >= MAX_PEERS {
            return;
        }
        let peer = self.peers.entry(peer_id.to_owned()).or_default();
        peer.connections += 1;
        if !peer.seen_addresses.contains(&address) && peer.seen_addresses.len() < 8 {
            peer.seen_addresses.push(address);
        }
    }

    /// A connection to `peer_id` closed.
    pub fn disconnected(&mut self, peer_id: &str) {
        if let Some(peer) = self.peers.get_mut(peer_id) {
            peer.connections = peer.connections.saturating_sub(1);
            if peer.connections == 0 && peer.heartbeat.is_none() {
                self.peers.remove(peer_id);
            }
        }
    }

    /// Identify told us the peer's software.
    pub fn identified(&mut self, peer_id: &str, agent_version: String) {
        if let Some(peer) = self.peers.get_mut(peer_id) {
            peer.agent_version = Some(agent_version);
        }
    }

    /// Whether a peer has a direct connection.
    pub fn is_connected(&self, peer_id: &str) -> bool {
        self.peers.get(peer_id).is_some_and(|p| p.connections > 0)
    }

    /// This node's latest heartbeat.
    pub fn local(&self) -> &Heartbeat {
        &self.local
    }

    /// The latest heartbeat of every peer heard from (within its lease) and directly
    /// connected: the peers a build can be placed on.
    pub fn placeable(&self) -> Vec<(Heartbeat, Instant)> {
        self.peers
            .values()
            .filter(|p| p.connections > 0)
            .filter_map(|p| Some((p.heartbeat.clone()?, p.heard_at?)))
            .collect()
    }

    /// The placeable peers (as [`PoolView::placeable`]) with when each was last heard, and the
    /// heartbeats of those heard since `seen` says: a reader that keeps `seen` clones only what
    /// is new.
    pub fn placeable_since(
        &self,
        seen: &std::collections::HashMap<String, Instant>,
    ) -> (Vec<String>, Vec<(Heartbeat, Instant)>) {
        let mut present = Vec::new();
        let mut new = Vec::new();
        for (id, peer) in &self.peers {
            let (Some(heartbeat), Some(heard_at)) = (&peer.heartbeat, peer.heard_at) else {
                continue;
            };
            if peer.connections == 0 {
                continue;
            }
            present.push(id.clone());
            if seen.get(id) != Some(&heard_at) {
                new.push((heartbeat.clone(), heard_at));
            }
        }
        (present, new)
    }

    /// Whether `peer_id`'s lease holds (a heartbeat heard within it).
    pub fn is_alive(&self, peer_id: &str) -> bool {
        self.peers
            .get(peer_id)
            .is_some_and(|p| p.heartbeat.is_some())
    }

    /// Up to `limit` peers with a direct connection, those heard from by heartbeat first (they
    /// are pool members; a connection alone may still be identifying).
    pub fn connected_peers(&self, limit: usize) -> Vec<String> {
        let connected = || self.peers.iter().filter(|(_, p)| p.connections > 0);
        connected()
            .filter(|(_, p)| p.heartbeat.is_some())
            .chain(connected().filter(|(_, p)| p.heartbeat.is_none()))
            .map(|(id, _)| id.clone())
            .take(limit)
            .collect()
    }

    /// Forgets the heartbeats of peers silent for longer than `lease`.
    pub fn expire(&mut self, now: Instant, lease: Duration) -> Vec<PoolEvent> {
        let expired: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, peer)| {
                peer.heard_at
                    .is_some_and(|at| now.saturating_duration_since(at) > lease)
            })
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .into_iter()
            .map(|peer_id| {
                if let Some(peer) = self.peers.get_mut(&peer_id) {
                    peer.heartbeat = None;
                    peer.heard_at = None;
                    if peer.connections == 0 {
                        self.peers.remove(&peer_id);
                    }
                }
                PoolEvent::PeerLeft {
                    peer_id,
                    reason: "lease_expired".into(),
                }
            })
            .collect()
    }

    /// The report `GET /v1/status` returns.
    pub fn report(&self, now: Instant) -> StatusReport {
        let mut node = status_of(&self.local);
        node.heartbeat_age_ms = Some(0);
        node.connected = true;
        let peers = self
            .peers
            .iter()
            .map(|(peer_id, peer)| {
                let mut status = match &peer.heartbeat {
                    Some(heartbeat) => status_of(heartbeat),
                    None => PeerStatus {
                        peer_id: peer_id.clone(),
                        ..PeerStatus::default()
                    },
                };
                if status.addresses.is_empty() {
                    status.addresses = peer.seen_addresses.clone();
                }
                if status.agent_version.is_none() {
                    status.agent_version = peer.agent_version.clone();
                }
                status.connected = peer.connections > 0;
                status.heartbeat_age_ms = peer
                    .heard_at
                    .map(|at| now.saturating_duration_since(at).as_millis() as u64);
                status
            })
            .collect();
        StatusReport {
            api_version: API_VERSION,
            node,
            peers,
        }
    }
}

fn status_of(heartbeat: &Heartbeat) -> PeerStatus {
    PeerStatus {
        peer_id: heartbeat.peer_id.clone(),
        addresses: heartbeat.listen_addresses.clone(),
        connected: false,
        slots_free: Some(heartbeat.slots_free),
        slots_total: Some(heartbeat.slots_total),
        labels: heartbeat.labels.iter().cloned().collect(),
        os: Some(heartbeat.os.clone()),
        arch: Some(heartbeat.arch.clone()),
        runtimes: heartbeat
            .runtimes
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect(),
        sandboxes: heartbeat
            .sandboxes
            .iter()
            .map(|sandbox| {
                let g = &sandbox.guarantees;
                let entries = [
                    ("filesystem", g.filesystem),
                    ("network", g.network),
                    ("processes", g.processes),
                    ("memory", g.memory),
                    ("cpu", g.cpu),
                    ("process_count", g.process_count),
                    ("process_tree_kill", g.process_tree_kill),
                ];
                let guarantees = entries
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), enforcement_name(value).to_owned()))
                    .collect();
                (sandbox.kind.clone(), guarantees)
            })
            .collect(),
        load: Some(heartbeat.load_milli as f64 / 1000.0),
        queue_length: Some(heartbeat.queue_length),
        heartbeat_age_ms: None,
        agent_version: Some(heartbeat.agent_version.clone()),
        protocol_major: Some(heartbeat.protocol_major),
    }
}

fn enforcement_name(value: Enforcement) -> &'static str {
    match value {
        Enforcement::Enforced => "enforced",
        Enforcement::BestEffort => "best_effort",
        Enforcement::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(peer_id: &str) -> Heartbeat {
        Heartbeat {
            peer_id: peer_id.into(),
            slots_total: 2,
            slots_free: 1,
            ..Heartbeat::default()
        }
    }

    #[test]
    fn peers_join_beat_and_expire() {
        let start = Instant::now();
        let mut view = PoolView::new(heartbeat("me"));
        let events = view.heard(heartbeat("a"), start);
        assert_eq!(events.len(), 2);
        assert!(matches!(events[0], PoolEvent::PeerJoined { .. }));
        assert_eq!(view.heard(heartbeat("a"), start).len(), 1);
        assert!(view.heard(heartbeat("me"), start).is_empty());
        let later = start + Duration::from_secs(10);
        assert_eq!(view.report(later).peers[0].heartbeat_age_ms, Some(10_000));
        let events = view.expire(later, Duration::from_secs(5));
        assert_eq!(
            events,
            vec![PoolEvent::PeerLeft {
                peer_id: "a".into(),
                reason: "lease_expired".into()
            }]
        );
        assert!(view.report(later).peers.is_empty());
    }
}
