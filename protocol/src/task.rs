//! The task protocol, `/peerbuild/task/1`: how a coordinator hands a build to a worker and how
//! the worker reports back, on one libp2p stream per task (so the log arrives in order).
//!
//! Frames as in [`crate::cas`]: a big-endian `u32` byte count, then postcard of
//! `(WIRE_FORMAT_VERSION, message)`. The coordinator writes one [`TaskOffer`]; the worker
//! answers [`TaskReply::Accepted`] or [`TaskReply::Declined`]; having been accepted, the
//! coordinator writes [`TaskSecrets`]; the worker then writes any number of
//! [`TaskReply::Event`]s (the build's events, the `--json` schema, in order) and one ending:
//! [`TaskReply::Finished`] with the result signed by the worker's key, [`TaskReply::Refused`]
//! when the worker's `peerbuild run` refused the build before it ran, [`TaskReply::Fault`], or
//! [`TaskReply::HandedBack`] when the worker stopped it to shut down.
//! The coordinator closing its side of the stream cancels the build.
//!
//! Secrets travel only in [`TaskSecrets`], on this stream: Noise-encrypted, to the one peer
//! that accepted the build, never by gossip.

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::wire::{WireError, check_size, decode_versioned, encode_versioned};

/// The protocol id.
pub const TASK_PROTOCOL: &str = "/peerbuild/task/1";

/// The largest offer frame.
pub const MAX_OFFER_BYTES: usize = 1 << 20;
/// The largest reply frame (an event carries one line of the build's output at most).
pub const MAX_REPLY_BYTES: usize = 4 << 20;
/// The most variables and secrets an offer carries.
pub const MAX_PAIRS: usize = 1024;
/// The largest buildspec an offer carries.
pub const MAX_BUILDSPEC_BYTES: usize = 256 * 1024;
/// The domain a result signature covers, before the task's reference and the result.
pub const RESULT_SIGNATURE_DOMAIN: &[u8] = b"peerbuild-task-result-v1\0";

/// A build handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOffer {
    /// The coordinator's reference for the task (unique among its tasks).
    pub task: String,
    /// The source's tree, fetched from the coordinator with the blob protocol.
    pub source: Digest,
    /// The source folder's name (the build's project name).
    pub source_name: String,
    /// The commit the source came from, when it was a git checkout.
    pub source_version: Option<String>,
    /// The buildspec's text (it may live outside the source).
    pub buildspec: String,
    /// The build's id (`project:uuid`) and number, as the submitter numbered it.
    pub build_id: String,
    pub build_number: u64,
    /// For a batch fanned out across the pool: the one member this task runs.
    pub batch_member: Option<String>,
    /// `--env` variables, in order.
    pub env: Vec<(String, String)>,
    pub timeout_secs: u64,
    /// The sandbox the submitter asked for; the worker's owner settings decide whether it is
    /// allowed, as for a buildspec's `peerbuild.sandbox`.
    pub sandbox: Option<String>,
    /// The submitter refuses builds network (`--deny-network`).
    pub deny_network: bool,
}

/// The values behind the buildspec's `parameter-store` and `secrets-manager` names: the
/// coordinator's second frame, sent only once the worker accepted (a peer that declines never
/// sees them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSecrets {
    pub secrets: Vec<(String, String)>,
}

pub fn encode_secrets(secrets: &TaskSecrets) -> Result<Vec<u8>, WireError> {
    if secrets.secrets.len() > MAX_PAIRS {
        return Err(WireError::OverLimit { field: "secrets" });
    }
    let bytes = encode_versioned(secrets)?;
    check_size(bytes.len(), MAX_OFFER_BYTES)?;
    Ok(bytes)
}

pub fn decode_secrets(bytes: &[u8]) -> Result<TaskSecrets, WireError> {
    check_size(bytes.len(), MAX_OFFER_BYTES)?;
    let secrets: TaskSecrets = decode_versioned(bytes)?;
    if secrets.secrets.len() > MAX_PAIRS {
        return Err(WireError::OverLimit { field: "secrets" });
    }
    Ok(secrets)
}

/// What a worker writes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskReply {
    Accepted,
    Declined {
        reason: String,
    },
    /// One event of the build, as `peerbuild run --json` prints it.
    Event {
        json: String,
    },
    /// The build's final result (JSON), signed: `signature` is the worker's signature over
    /// [`signed_bytes`], `public_key` its key (protobuf), which must be the peer's own.
    Finished {
        result: String,
        public_key: Vec<u8>,
        signature: Vec<u8>,
    },
    /// The worker's `peerbuild run` refused the build before running it (exit status 2).
    Refused {
        message: String,
    },
    /// The worker could not run the build.
    Fault {
        message: String,
    },
    /// The worker stopped the build unfinished because it is shutting down: it is run again
    /// elsewhere, and the worker is not to blame (added last: the variants before keep their
    /// numbers on the wire).
    HandedBack {
        message: String,
    },
}

/// The bytes a result signature covers: the domain, the task reference, a zero byte, the result.
pub fn signed_bytes(task: &str, result: &str) -> Vec<u8> {
    let mut bytes = RESULT_SIGNATURE_DOMAIN.to_vec();
    bytes.extend_from_slice(task.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(result.as_bytes());
    bytes
}

pub fn encode_offer(offer: &TaskOffer) -> Result<Vec<u8>, WireError> {
    check_offer(offer)?;
    let bytes = encode_versioned(offer)?;
    check_size(bytes.len(), MAX_OFFER_BYTES)?;
    Ok(bytes)
}

pub fn decode_offer(bytes: &[u8]) -> Result<TaskOffer, WireError> {
    check_size(bytes.len(), MAX_OFFER_BYTES)?;
    let offer: TaskOffer = decode_versioned(bytes)?;
    check_offer(&offer)?;
    Ok(offer)
}

pub fn encode_reply(reply: &TaskReply) -> Result<Vec<u8>, WireError> {
    let bytes = encode_versioned(reply)?;
    check_size(bytes.len(), MAX_REPLY_BYTES)?;
    Ok(bytes)
}

pub fn decode_reply(bytes: &[u8]) -> Result<TaskReply, WireError> {
    check_size(bytes.len(), MAX_REPLY_BYTES)?;
    decode_versioned(bytes)
}

fn check_offer(offer: &TaskOffer) -> Result<(), WireError> {
    let over = |field| Err(WireError::OverLimit { field });
    if offer.env.len() > MAX_PAIRS {
        return over("env");
    }
    if offer.task.is_empty() || offer.task.len() > 256 {
        return over("task");
    }
    if offer.buildspec.len() > MAX_BUILDSPEC_BYTES {
        return over("buildspec");
    }
    // The id names a folder on the worker: `project:uuid` of `[A-Za-z0-9_-]` only.
    let id_ok = offer
        .build_id
        .split_once(':')
        .is_some_and(|(project, uuid)| {
            [project, uuid].iter().all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        });
    if !id_ok || offer.build_id.len() > 256 {
        return over("build_id");
    }
    if let Some(sandbox) = &offer.sandbox
        && (sandbox.is_empty()
            || sandbox.len() > 32
            || !sandbox.chars().all(|c| c.is_ascii_lowercase()))
    {
        return over("sandbox");
    }
    // CodeBuild's identifiers: letters, digits and underscores.
    if let Some(member) = &offer.batch_member
        && (member.is_empty()
            || member.len() > 128
            || !member
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return over("batch_member");
    }
    // The source's name becomes a folder name on the worker.
    if offer.source_name.is_empty()
        || offer.source_name.contains(['/', '\0'])
        || offer.source_name == "."
        || offer.source_name == ".."
        || offer.source_name.len() > 255
    {
        return over("source_name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> TaskOffer {
        TaskOffer {
            task: "t-1".into(),
            source: Digest::of(b"tree"),
            source_name: "app".into(),
            source_version: Some("abc123".into()),
            buildspec: "version: 0.2\n".into(),
            build_id: "app:0b8e-41".into(),
            build_number: 7,
            batch_member: Some("linux_1".into()),
            env: vec![("A".into(), "1".into())],
            timeout_secs: 3600,
            sandbox: Some("namespace".into()),
            deny_network: false,
        }
    }

    #[test]
    fn offers_and_replies_round_trip() {
        let bytes = encode_offer(&offer()).expect("encodes");
        assert_eq!(decode_offer(&bytes), Ok(offer()));
        for reply in [
            TaskReply::Accepted,
            TaskReply::Declined {
                reason: "no free slot".into(),
            },
            TaskReply::Event {
                json: "{\"event\":\"log\"}".into(),
            },
            TaskReply::Finished {
                result: "{}".into(),
                public_key: vec![1, 2],
                signature: vec![3],
            },
            TaskReply::Refused {
                message: "not allowed".into(),
            },
            TaskReply::Fault {
                message: "no sandbox".into(),
            },
            TaskReply::HandedBack {
                message: "shutting down".into(),
            },
        ] {
            let bytes = encode_reply(&reply).expect("encodes");
            assert_eq!(decode_reply(&bytes), Ok(reply));
        }
    }

    #[test]
    fn the_replies_keep_their_numbers_on_the_wire() {
        // Peers of this version agree on each variant's number (postcard's varint after the
        // format version): a variant added later goes last.
        let number = |reply: &TaskReply| encode_reply(reply).expect("encodes")[1];
        let message = String::new;
        assert_eq!(number(&TaskReply::Accepted), 0);
        assert_eq!(number(&TaskReply::Fault { message: message() }), 5);
        assert_eq!(number(&TaskReply::HandedBack { message: message() }), 6);
    }

    #[test]
    fn a_build_id_that_could_name_another_folder_is_refused() {
        for bad in ["", "app", "app:", ":x", "app:../x", "a/b:c", "app:x:y"] {
            let mut o = offer();
            o.build_id = bad.into();
            assert!(encode_offer(&o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_source_name_that_is_not_one_folder_name_is_refused() {
        for bad in ["", ".", "..", "a/b", "/etc", "a\0b"] {
            let mut o = offer();
            o.source_name = bad.into();
            assert!(encode_offer(&o).is_err(), "{bad:?}");
            let bytes = encode_versioned(&o).expect("encodes");
            assert!(decode_offer(&bytes).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_offers_are_errors_not_panics() {
        let good = encode_offer(&offer()).expect("encodes");
        for end in 0..good.len() {
            assert!(decode_offer(&good[..end]).is_err(), "prefix {end}");
        }
        for at in 0..good.len() {
            for value in [0x00, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = decode_offer(&bad);
                let _ = decode_reply(&bad);
            }
        }
    }

    #[test]
    fn secrets_round_trip_and_are_bounded() {
        let secrets = TaskSecrets {
            secrets: vec![("/db/password".into(), "hunter2".into())],
        };
        let bytes = encode_secrets(&secrets).expect("encodes");
        assert_eq!(decode_secrets(&bytes), Ok(secrets));
        let many = TaskSecrets {
            secrets: vec![("a".into(), "b".into()); MAX_PAIRS + 1],
        };
        assert!(encode_secrets(&many).is_err());
        assert!(decode_secrets(&encode_versioned(&many).expect("encodes")).is_err());
    }

    #[test]
    fn signatures_cover_the_task_and_the_result() {
        assert_ne!(signed_bytes("a", "bc"), signed_bytes("ab", "c"));
        assert!(signed_bytes("t", "{}").starts_with(RESULT_SIGNATURE_DOMAIN));
    }
}
