//! The pool's wire messages and protocol ids: what peers say to each other over gossip, and
//! the names (each carrying a version) under which they say it.
//!
//! Encoding: postcard of the format version ([`WIRE_FORMAT_VERSION`], a `u16`) followed by the
//! message. A decoder checks the size before it decodes anything, reads the version first and
//! refuses a version it does not speak, then checks every field against its limit, so a
//! message from a peer can neither make a node allocate without bound nor smuggle in values no
//! honest encoder would send.
//!
//! Peer ids travel as their text form (base58), so this crate needs no libp2p: the node checks
//! that a message's peer id is the peer that signed it.

use serde::{Deserialize, Serialize};

/// Bumped when a message's encoding changes; a decoder refuses other versions.
pub const WIRE_FORMAT_VERSION: u16 = 1;

/// The pool protocol's major version. Peers whose identify protocol version has another major
/// version are disconnected: they would not understand each other's messages.
pub const PROTOCOL_MAJOR: u32 = 1;

/// The identify protocol version every node announces (`/peerbuild/<major>`).
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/peerbuild/1";

/// The Kademlia protocol id: peerbuild's own DHT, separate from any public one.
pub const KAD_PROTOCOL: &str = "/peerbuild/kad/1";

/// The gossipsub topic of heartbeats and other pool announcements.
pub const POOL_TOPIC: &str = "peerbuild/pool/1";

/// The gossipsub topic of build events: cache entries saved, and runs taken and finished.
pub const EVENTS_TOPIC: &str = "peerbuild/events/1";

/// The largest pool message a node sends or accepts (gossipsub itself refuses anything over its
/// transmit limit before decoding; this is the same bound for the payload).
pub const MAX_POOL_MESSAGE_BYTES: usize = 16 * 1024;

/// Limits on a heartbeat's fields (the whole message must also fit
/// [`MAX_POOL_MESSAGE_BYTES`]).
pub const MAX_LABELS: usize = 32;
pub const MAX_RUNTIMES: usize = 32;
pub const MAX_SANDBOXES: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_TEXT_BYTES: usize = 256;

/// How many kinds of [`PoolMessage`] this version knows. New kinds are appended (never
/// reordered), so an older node reads the kind first and ignores one it does not know: this is
/// how a message grows new fields without a format version bump (a `Heartbeat2` beside
/// `Heartbeat`, sent side by side until old nodes are gone).
pub const POOL_MESSAGE_KINDS: u32 = 4;

/// Everything said on the pool topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PoolMessage {
    /// A peer's periodic state.
    Heartbeat(Heartbeat),
    /// A peer shutting down cleanly: forget it now rather than when its lease runs out.
    Leaving { peer_id: String },
    /// A peer saved a cache entry and holds its tree (on the events topic).
    CacheSaved {
        peer_id: String,
        entry: crate::cas::CacheEntry,
    },
    /// A peer took a run of a build, or finished one (on the events topic). Gossipsub signs
    /// every message with its author's key, so this is the worker's signed word; `result` ties
    /// it to the result the coordinator got on the task stream.
    TaskState {
        peer_id: String,
        /// The offer's `task` (the coordinator's name for the run).
        task: String,
        build_id: String,
        state: TaskState,
    },
}

/// Where a run stands, as the peer running it announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Running,
    /// `status` as the result says (`SUCCEEDED`, `FAILED`, ...); `result` is the BLAKE3 hash of
    /// the result's JSON as sent on the task stream, where it is signed.
    Finished {
        status: String,
        result: [u8; 32],
    },
    /// The run ended without a result (refused, faulted, handed back).
    Ended,
}

impl PoolMessage {
    /// The peer the message speaks for (it must be the peer that signed it).
    pub fn peer_id(&self) -> &str {
        match self {
            PoolMessage::Heartbeat(heartbeat) => &heartbeat.peer_id,
            PoolMessage::Leaving { peer_id } => peer_id,
            PoolMessage::CacheSaved { peer_id, .. } => peer_id,
            PoolMessage::TaskState { peer_id, .. } => peer_id,
        }
    }
}

/// A peer's periodic announcement of what it offers and how busy it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's peer id, as text.
    pub peer_id: String,
    /// Counts up from 1 with each heartbeat of one run of the node; a restarted node starts
    /// again, so receivers compare it only to spot reordering within one run.
    pub sequence: u64,
    /// The sender's pool protocol major version ([`PROTOCOL_MAJOR`]).
    pub protocol_major: u32,
    /// The sender's software, `peerbuild/<version>`.
    pub agent_version: String,
    /// Addresses the sender listens on (multiaddr text), so a peer that hears of it through
    /// gossip can connect to it directly.
    pub listen_addresses: Vec<String>,
    pub slots_total: u32,
    pub slots_free: u32,
    /// `--label KEY=VALUE` pairs, sorted by key.
    pub labels: Vec<(String, String)>,
    /// `linux`, `macos`, ... (Rust's `std::env::consts::OS`).
    pub os: String,
    /// `x86_64`, `aarch64`, ... (Rust's `std::env::consts::ARCH`).
    pub arch: String,
    /// Runtimes detected on the machine.
    pub runtimes: Vec<Runtime>,
    /// Sandbox backends this node can run, with what each enforces.
    pub sandboxes: Vec<Sandbox>,
    /// The one-minute load average, in thousandths (1.5 is 1500).
    pub load_milli: u32,
    /// Tasks waiting for a slot on this node, as coordinator.
    pub queue_length: u32,
    /// The tasks this node runs now, for any coordinator (the `task` of each offer it took; at
    /// most [`MAX_RUNNING`]). A coordinator whose run is missing from two heartbeats in a row
    /// takes it as lost and runs the task again.
    pub running: Vec<String>,
}

/// The most runs a heartbeat lists (a node runs at most this many builds at once).
pub const MAX_RUNNING: usize = 64;

/// A detected runtime: its buildspec name (`python`, `nodejs`, ...) and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub name: String,
    pub version: String,
}

/// A sandbox backend a node can run, and what it enforces on that machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// `host`, `namespace`, `docker`, `wasm`.
    pub kind: String,
    pub guarantees: Guarantees,
}

/// How well a sandbox enforces each kind of isolation on the sender's machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guarantees {
    pub filesystem: Enforcement,
    pub network: Enforcement,
    pub processes: Enforcement,
    pub memory: Enforcement,
    pub cpu: Enforcement,
    pub process_count: Enforcement,
    pub process_tree_kill: Enforcement,
}

/// How well one kind of isolation is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enforcement {
    Enforced,
    BestEffort,
    None,
}

/// Why a message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("message of {size_bytes} bytes is over the limit of {limit_bytes}")]
    TooLarge {
        size_bytes: usize,
        limit_bytes: usize,
    },
    #[error(
        "message format version {found} is not supported (this node speaks {supported}); upgrade the older node"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    /// A message kind this node does not know (a newer node's): ignore it, do not blame the
    /// sender.
    #[error("unknown message kind {kind} (from a newer peerbuild)")]
    UnknownKind { kind: u32 },
    #[error("malformed message: {reason}")]
    Malformed { reason: String },
    #[error("field `{field}` is over its limit")]
    OverLimit { field: &'static str },
}

/// Encodes a pool message; refuses one over [`MAX_POOL_MESSAGE_BYTES`] or with a field over its
/// limit (the receiver would drop it).
pub fn encode_pool_message(message: &PoolMessage) -> Result<Vec<u8>, WireError> {
    check_limits(message)?;
    let bytes = postcard::to_stdvec(&(WIRE_FORMAT_VERSION, message)).map_err(|err| {
        WireError::Malformed {
            reason: err.to_string(),
        }
    })?;
    if bytes.len() > MAX_POOL_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            size_bytes: bytes.len(),
            limit_bytes: MAX_POOL_MESSAGE_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes a pool message from a peer: size first, then version, then the message, then each
/// field's limit. Trailing bytes are refused.
pub fn decode_pool_message(bytes: &[u8]) -> Result<PoolMessage, WireError> {
    if bytes.len() > MAX_POOL_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            size_bytes: bytes.len(),
            limit_bytes: MAX_POOL_MESSAGE_BYTES,
        });
    }
    let (version, rest): (u16, &[u8]) = postcard::take_from_bytes(bytes).map_err(malformed)?;
    if version != WIRE_FORMAT_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: version,
            supported: WIRE_FORMAT_VERSION,
        });
    }
    // postcard writes an enum's variant index first: read it before the body.
    let (kind, _): (u32, &[u8]) = postcard::take_from_bytes(rest).map_err(malformed)?;
    if kind >= POOL_MESSAGE_KINDS {
        return Err(WireError::UnknownKind { kind });
    }
    let (message, rest): (PoolMessage, &[u8]) =
        postcard::take_from_bytes(rest).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed {
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    check_limits(&message)?;
    Ok(message)
}

/// Postcard of `(WIRE_FORMAT_VERSION, message)`: the encoding of every direct-stream frame.
pub(crate) fn encode_versioned<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(&(WIRE_FORMAT_VERSION, message)).map_err(malformed)
}

/// Reads what [`encode_versioned`] wrote: the version first (another is refused), then the
/// message, with no trailing bytes.
pub(crate) fn decode_versioned<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    let (version, rest): (u16, &[u8]) = postcard::take_from_bytes(bytes).map_err(malformed)?;
    if version != WIRE_FORMAT_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: version,
            supported: WIRE_FORMAT_VERSION,
        });
    }
    let (message, rest): (T, &[u8]) = postcard::take_from_bytes(rest).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed {
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(message)
}

/// Refuses a frame over its limit.
pub(crate) fn check_size(size_bytes: usize, limit_bytes: usize) -> Result<(), WireError> {
    if size_bytes > limit_bytes {
        return Err(WireError::TooLarge {
            size_bytes,
            limit_bytes,
        });
    }
    Ok(())
}

fn malformed(err: postcard::Error) -> WireError {
    WireError::Malformed {
        reason: err.to_string(),
    }
}

fn check_limits(message: &PoolMessage) -> Result<(), WireError> {
    match message {
        PoolMessage::Heartbeat(heartbeat) => check_heartbeat(heartbeat),
        PoolMessage::Leaving { peer_id } => check_text("peer_id", peer_id),
        PoolMessage::CacheSaved { peer_id, entry } => {
            check_text("peer_id", peer_id)?;
            crate::cas::check_cache_entry(entry)
        }
        PoolMessage::TaskState {
            peer_id,
            task,
            build_id,
            state,
        } => {
            check_text("peer_id", peer_id)?;
            check_text("task", task)?;
            check_text("build_id", build_id)?;
            match state {
                TaskState::Finished { status, .. } => check_text("status", status),
                TaskState::Running | TaskState::Ended => Ok(()),
            }
        }
    }
}

fn check_heartbeat(heartbeat: &Heartbeat) -> Result<(), WireError> {
    check_count("labels", heartbeat.labels.len(), MAX_LABELS)?;
    check_count("runtimes", heartbeat.runtimes.len(), MAX_RUNTIMES)?;
    check_count("sandboxes", heartbeat.sandboxes.len(), MAX_SANDBOXES)?;
    check_count("running", heartbeat.running.len(), MAX_RUNNING)?;
    check_count(
        "listen_addresses",
        heartbeat.listen_addresses.len(),
        MAX_ADDRESSES,
    )?;
    if heartbeat.slots_free > heartbeat.slots_total {
        return Err(WireError::OverLimit {
            field: "slots_free",
        });
    }
    check_text("peer_id", &heartbeat.peer_id)?;
    check_text("agent_version", &heartbeat.agent_version)?;
    check_text("os", &heartbeat.os)?;
    check_text("arch", &heartbeat.arch)?;
    for address in &heartbeat.listen_addresses {
        check_text("listen_addresses", address)?;
    }
    for (key, value) in &heartbeat.labels {
        check_text("labels", key)?;
        check_text("labels", value)?;
    }
    for runtime in &heartbeat.runtimes {
        check_text("runtimes", &runtime.name)?;
        check_text("runtimes", &runtime.version)?;
    }
    for sandbox in &heartbeat.sandboxes {
        check_text("sandboxes", &sandbox.kind)?;
    }
    for task in &heartbeat.running {
        check_text("running", task)?;
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize, limit: usize) -> Result<(), WireError> {
    if count > limit {
        return Err(WireError::OverLimit { field });
    }
    Ok(())
}

fn check_text(field: &'static str, text: &str) -> Result<(), WireError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(WireError::OverLimit { field });
    }
    Ok(())
}

/// The major version in an identify protocol version such as `/peerbuild/1` or
/// `/peerbuild/1.2`; `None` when it is not a peerbuild node at all.
pub fn protocol_major(identify_protocol_version: &str) -> Option<u32> {
    let rest = identify_protocol_version.strip_prefix("/peerbuild/")?;
    let major = rest.split('.').next()?;
    major.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            peer_id: "12D3KooWExample".into(),
            sequence: 7,
            protocol_major: PROTOCOL_MAJOR,
            agent_version: "peerbuild/0.1.0".into(),
            listen_addresses: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            slots_total: 4,
            slots_free: 3,
            labels: vec![("gpu".into(), "a100".into())],
            os: "linux".into(),
            arch: "x86_64".into(),
            runtimes: vec![Runtime {
                name: "python".into(),
                version: "3.11.7".into(),
            }],
            sandboxes: vec![Sandbox {
                kind: "host".into(),
                guarantees: Guarantees {
                    filesystem: Enforcement::None,
                    network: Enforcement::None,
                    processes: Enforcement::None,
                    memory: Enforcement::BestEffort,
                    cpu: Enforcement::None,
                    process_count: Enforcement::BestEffort,
                    process_tree_kill: Enforcement::Enforced,
                },
            }],
            load_milli: 1500,
            queue_length: 0,
            running: vec!["12D3KooWCoordinator/1764000000000/3#1".into()],
        }
    }

    #[test]
    fn a_task_state_round_trips_and_is_bounded() {
        let message = PoolMessage::TaskState {
            peer_id: "12D3KooWExample".into(),
            task: "12D3KooWCoordinator/1764000000000/3#1".into(),
            build_id: "app:1234".into(),
            state: TaskState::Finished {
                status: "SUCCEEDED".into(),
                result: [7; 32],
            },
        };
        let bytes = encode_pool_message(&message).expect("encodes");
        assert_eq!(decode_pool_message(&bytes), Ok(message));
        let long = PoolMessage::TaskState {
            peer_id: "12D3KooWExample".into(),
            task: "t".repeat(MAX_TEXT_BYTES + 1),
            build_id: "app:1234".into(),
            state: TaskState::Running,
        };
        assert_eq!(
            encode_pool_message(&long),
            Err(WireError::OverLimit { field: "task" })
        );
    }

    #[test]
    fn a_heartbeat_round_trips() {
        let message = PoolMessage::Heartbeat(heartbeat());
        let bytes = encode_pool_message(&message).expect("encodes");
        assert_eq!(decode_pool_message(&bytes), Ok(message));
    }

    #[test]
    fn malformed_bytes_are_refused_without_panicking() {
        let good = encode_pool_message(&PoolMessage::Heartbeat(heartbeat())).expect("encodes");
        // Every truncation, and every single-byte corruption, decodes to an error or to a
        // message within limits: never a panic.
        for end in 0..good.len() {
            assert!(decode_pool_message(&good[..end]).is_err(), "prefix {end}");
        }
        for at in 0..good.len() {
            for value in [0x00, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = decode_pool_message(&bad);
            }
        }
        // A length prefix claiming a huge vector must not allocate it.
        let mut huge = postcard::to_stdvec(&WIRE_FORMAT_VERSION).expect("encodes");
        huge.extend([0x00, 0x01, b'x', 0x01, 0x00]);
        huge.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_pool_message(&huge).is_err());
        assert!(decode_pool_message(&[0xff; 40]).is_err());
    }

    #[test]
    fn other_versions_and_oversized_messages_are_refused() {
        let mut bytes =
            postcard::to_stdvec(&(2u16, PoolMessage::Heartbeat(heartbeat()))).expect("encodes");
        assert_eq!(
            decode_pool_message(&bytes),
            Err(WireError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        bytes.resize(MAX_POOL_MESSAGE_BYTES + 1, 0);
        assert!(matches!(
            decode_pool_message(&bytes),
            Err(WireError::TooLarge { .. })
        ));
        let mut too_many = heartbeat();
        too_many.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            encode_pool_message(&PoolMessage::Heartbeat(too_many)),
            Err(WireError::OverLimit { field: "labels" })
        );
        let mut busy = heartbeat();
        busy.running = (0..=MAX_RUNNING).map(|i| format!("t{i}")).collect();
        assert_eq!(
            encode_pool_message(&PoolMessage::Heartbeat(busy)),
            Err(WireError::OverLimit { field: "running" })
        );
        let mut lying = heartbeat();
        lying.slots_free = 9;
        let bytes = postcard::to_stdvec(&(WIRE_FORMAT_VERSION, PoolMessage::Heartbeat(lying)))
            .expect("encodes");
        assert_eq!(
            decode_pool_message(&bytes),
            Err(WireError::OverLimit {
                field: "slots_free"
            })
        );
    }

    #[test]
    fn a_newer_message_kind_is_recognised_as_such() {
        let mut bytes = postcard::to_stdvec(&WIRE_FORMAT_VERSION).expect("encodes");
        bytes.extend([POOL_MESSAGE_KINDS as u8, 1, 2, 3]);
        assert_eq!(
            decode_pool_message(&bytes),
            Err(WireError::UnknownKind {
                kind: POOL_MESSAGE_KINDS
            })
        );
        let leaving = PoolMessage::Leaving {
            peer_id: "12D3KooWExample".into(),
        };
        let bytes = encode_pool_message(&leaving).expect("encodes");
        assert_eq!(decode_pool_message(&bytes), Ok(leaving));
        let saved = PoolMessage::CacheSaved {
            peer_id: "12D3KooWExample".into(),
            entry: crate::cas::CacheEntry {
                key: "k".into(),
                paths: vec!["out/**/*".into()],
                os: "linux".into(),
                arch: "x86_64".into(),
                tree: crate::Digest::of(b"t"),
                created_ms: 1,
            },
        };
        let bytes = encode_pool_message(&saved).expect("encodes");
        assert_eq!(decode_pool_message(&bytes), Ok(saved));
    }

    #[test]
    fn major_versions_are_read_from_identify() {
        assert_eq!(protocol_major("/peerbuild/1"), Some(1));
        assert_eq!(protocol_major("/peerbuild/2.3"), Some(2));
        assert_eq!(protocol_major("/ipfs/0.1.0"), None);
        assert_eq!(
            protocol_major(IDENTIFY_PROTOCOL_VERSION),
            Some(PROTOCOL_MAJOR)
        );
    }
}
