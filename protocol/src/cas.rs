//! The blob-transfer protocol, `/peerbuild/cas/1`: how one node asks another which blobs it
//! holds, fetches them (as stored, mostly zstd-compressed), and asks which cache entries it has
//! under a key prefix.
//!
//! One request per stream. A stream carries length-framed messages: a `u32` (big-endian) byte
//! count, then postcard of `(WIRE_FORMAT_VERSION, message)`. The asker writes one [`CasRequest`]
//! and closes its side; the answerer writes [`CasReply`] frames and closes: one `Held` for
//! `Has`; for `Fetch`, a `Blob` or `Missing` for each digest in the order asked, then `End`;
//! one `Entries` for `CacheEntries`; or one `Refused` for anything it will not answer. Every
//! request is bounded ([`MAX_HAS_DIGESTS`], [`MAX_FETCH_DIGESTS`], [`MAX_FETCH_BYTES`]), so no
//! single message grows large: a big transfer is many requests, several in flight at once.
//!
//! A frame's length is checked against what the reader expects before anything is read into
//! memory ([`MAX_REQUEST_BYTES`]; for replies, [`reply_limit`] from the digests asked), and a
//! blob is verified against its digest by the store that takes it, never trusted.

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::wire::{self, WireError, check_size, decode_versioned, encode_versioned};

/// The protocol id (its version is the last part).
pub const CAS_PROTOCOL: &str = "/peerbuild/cas/1";

/// The most digests one `Has` names.
pub const MAX_HAS_DIGESTS: usize = 1024;
/// The most blobs one `Fetch` asks for.
pub const MAX_FETCH_DIGESTS: usize = 64;
/// The most bytes (uncompressed) one `Fetch` asks for; a single larger blob is asked for alone.
pub const MAX_FETCH_BYTES: u64 = 8 << 20;
/// The largest blob that travels (chunks are at most 2 MiB; trees and chunk lists of huge
/// folders and files are the only larger blobs).
pub const MAX_BLOB_BYTES: u64 = 64 << 20;
/// How much larger than its content a stored blob may be: its kind byte, and zstd's worst case
/// on incompressible input (far below this; the store keeps such blobs raw anyway).
pub const MAX_STORED_OVERHEAD: u64 = (1 << 16) + 1;
/// The largest request frame.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The most cache entries one `Entries` reply holds.
pub const MAX_ENTRIES: usize = 32;
/// Limits on a cache entry's fields.
pub const MAX_CACHE_KEY_BYTES: usize = 1024;
pub const MAX_CACHE_PATHS: usize = 64;
pub const MAX_CACHE_PATH_BYTES: usize = 1024;
/// The cache version: 32 hex digits (see the node's cache module).
pub const CACHE_VERSION_BYTES: usize = 32;

/// What one stream asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CasRequest {
    /// Which of these blobs do you hold? Answered by one `Held`.
    Has { digests: Vec<Digest> },
    /// Send these blobs as stored. Answered by a `Blob` or `Missing` each, in order, then `End`.
    Fetch { digests: Vec<Digest> },
    /// Which cache entries of this cache version have keys starting with `key_prefix` (newest
    /// first)? Answered by one `Entries`.
    CacheEntries { version: String, key_prefix: String },
}

/// What the answerer writes back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CasReply {
    /// One answer per digest asked, in order.
    Held {
        held: Vec<bool>,
    },
    /// A blob in its stored form (zstd frame or raw bytes, as the store keeps it).
    Blob {
        digest: Digest,
        /// Encoded as postcard's bytes (a length, then the bytes): the same bytes on the wire
        /// as a sequence of `u8`, read and written in one copy instead of one call a byte.
        #[serde(with = "serde_bytes")]
        stored: Vec<u8>,
    },
    /// A blob asked for that the answerer does not hold (any more).
    Missing {
        digest: Digest,
    },
    /// The end of a `Fetch` answer.
    End,
    Entries {
        entries: Vec<CacheEntry>,
    },
    /// The answerer will not answer (overloaded, a malformed request): the reason, for logs.
    Refused {
        reason: String,
    },
}

/// A saved cache entry, as gossip announces it and `Entries` lists it. The receiver recomputes
/// the cache version from `paths`, `os` and `arch`; it never takes a version on trust.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub key: String,
    pub paths: Vec<String>,
    pub os: String,
    pub arch: String,
    /// The entry's tree.
    pub tree: Digest,
    /// When it was saved (milliseconds since the Unix epoch), to pick the newest of several.
    pub created_ms: u64,
}

/// What a reply frame may hold beyond its blob or list: the message's own fields.
const FRAME_OVERHEAD: u64 = 256;

/// The largest reply frame a reader accepts after asking `request`: a blob frame for the
/// largest blob asked, or a bounded list.
pub fn reply_limit(request: &CasRequest) -> usize {
    // Each field with its length prefix (at most 5 bytes), a digest, a time.
    let entry = MAX_CACHE_KEY_BYTES
        + MAX_CACHE_PATHS * (MAX_CACHE_PATH_BYTES + 5)
        + 2 * (wire::MAX_TEXT_BYTES + 5)
        + 64;
    let entries = (MAX_ENTRIES * entry) as u64;
    let limit = match request {
        CasRequest::Has { digests } => digests.len() as u64 + FRAME_OVERHEAD,
        CasRequest::Fetch { digests } => {
            let largest = digests.iter().max_by_key(|d| d.size());
            return fetch_reply_limit(largest);
        }
        CasRequest::CacheEntries { .. } => entries + FRAME_OVERHEAD,
    };
    // A `Refused` always fits, whatever was asked.
    limit.max(1024 + FRAME_OVERHEAD) as usize
}

/// The largest frame a reader accepts for the next reply of a `Fetch` answer: the `Blob` (or
/// `Missing`) of `due`, the blob due next in the order asked, or the `End` when none is left.
/// A frame larger than the blob due is refused before it is read, whatever else was asked.
pub fn fetch_reply_limit(due: Option<&Digest>) -> usize {
    let blob = due.map_or(0, |d| d.size().min(MAX_BLOB_BYTES) + MAX_STORED_OVERHEAD);
    // A `Refused` always fits, whatever was asked.
    (blob + FRAME_OVERHEAD).max(1024 + FRAME_OVERHEAD) as usize
}

/// Encodes a request; refuses one over its limits (the answerer would refuse it).
pub fn encode_request(request: &CasRequest) -> Result<Vec<u8>, WireError> {
    check_request(request)?;
    let bytes = encode_versioned(request)?;
    check_size(bytes.len(), MAX_REQUEST_BYTES)?;
    Ok(bytes)
}

/// Decodes a request from a peer: size, version, message, then limits.
pub fn decode_request(bytes: &[u8]) -> Result<CasRequest, WireError> {
    check_size(bytes.len(), MAX_REQUEST_BYTES)?;
    let request: CasRequest = decode_versioned(bytes)?;
    check_request(&request)?;
    Ok(request)
}

/// Encodes a reply frame's body.
pub fn encode_reply(reply: &CasReply) -> Result<Vec<u8>, WireError> {
    check_reply(reply)?;
    encode_versioned(reply)
}

/// Decodes a reply frame's body (its length already checked against [`reply_limit`]).
pub fn decode_reply(bytes: &[u8]) -> Result<CasReply, WireError> {
    let reply: CasReply = decode_versioned(bytes)?;
    check_reply(&reply)?;
    Ok(reply)
}

fn over(field: &'static str) -> WireError {
    WireError::OverLimit { field }
}

fn check_request(request: &CasRequest) -> Result<(), WireError> {
    match request {
        CasRequest::Has { digests } => {
            if digests.len() > MAX_HAS_DIGESTS {
                return Err(over("digests"));
            }
        }
        CasRequest::Fetch { digests } => {
            if digests.len() > MAX_FETCH_DIGESTS {
                return Err(over("digests"));
            }
            if digests.iter().any(|d| d.size() > MAX_BLOB_BYTES) {
                return Err(over("digests"));
            }
            let total: u64 = digests.iter().map(Digest::size).sum();
            if digests.len() > 1 && total > MAX_FETCH_BYTES {
                return Err(over("digests"));
            }
        }
        CasRequest::CacheEntries {
            version,
            key_prefix,
        } => {
            if version.len() != CACHE_VERSION_BYTES
                || !version.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(over("version"));
            }
            if key_prefix.len() > MAX_CACHE_KEY_BYTES {
                return Err(over("key_prefix"));
            }
        }
    }
    Ok(())
}

fn check_reply(reply: &CasReply) -> Result<(), WireError> {
    match reply {
        CasReply::Held { held } if held.len() > MAX_HAS_DIGESTS => Err(over("held")),
        CasReply::Blob { digest, stored }
            if digest.size() > MAX_BLOB_BYTES
                || stored.len() as u64 > digest.size() + MAX_STORED_OVERHEAD =>
        {
            Err(over("stored"))
        }
        CasReply::Entries { entries } => {
            if entries.len() > MAX_ENTRIES {
                return Err(over("entries"));
            }
            entries.iter().try_for_each(check_cache_entry)
        }
        CasReply::Refused { reason } if reason.len() > 1024 => Err(over("reason")),
        _ => Ok(()),
    }
}

/// Checks a cache entry's fields against their limits (gossip and `Entries` alike).
pub fn check_cache_entry(entry: &CacheEntry) -> Result<(), WireError> {
    if entry.key.len() > MAX_CACHE_KEY_BYTES {
        return Err(over("key"));
    }
    if entry.paths.is_empty() || entry.paths.len() > MAX_CACHE_PATHS {
        return Err(over("paths"));
    }
    if entry.paths.iter().any(|p| p.len() > MAX_CACHE_PATH_BYTES) {
        return Err(over("paths"));
    }
    if entry.os.len() > wire::MAX_TEXT_BYTES || entry.arch.len() > wire::MAX_TEXT_BYTES {
        return Err(over("platform"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CacheEntry {
        CacheEntry {
            key: "npm-0123abcd".into(),
            paths: vec!["node_modules/**/*".into(), "/root/.npm/**/*".into()],
            os: "linux".into(),
            arch: "x86_64".into(),
            tree: Digest::of(b"tree"),
            created_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let requests = [
            CasRequest::Has {
                digests: vec![Digest::of(b"a"), Digest::of(b"b")],
            },
            CasRequest::Fetch {
                digests: vec![Digest::of(b"a")],
            },
            CasRequest::CacheEntries {
                version: "0123456789abcdef0123456789abcdef".into(),
                key_prefix: "npm-".into(),
            },
        ];
        for request in requests {
            let bytes = encode_request(&request).expect("encodes");
            assert_eq!(decode_request(&bytes), Ok(request));
        }
        let replies = [
            CasReply::Held {
                held: vec![true, false],
            },
            CasReply::Blob {
                digest: Digest::of(b"a"),
                stored: b"a".to_vec(),
            },
            CasReply::Missing {
                digest: Digest::of(b"b"),
            },
            CasReply::End,
            CasReply::Entries {
                entries: vec![entry()],
            },
            CasReply::Refused {
                reason: "busy".into(),
            },
        ];
        for reply in replies {
            let bytes = encode_reply(&reply).expect("encodes");
            assert_eq!(decode_reply(&bytes), Ok(reply));
        }
    }

    #[test]
    fn requests_over_their_limits_are_refused_both_ways() {
        let many = CasRequest::Has {
            digests: vec![Digest::of(b"a"); MAX_HAS_DIGESTS + 1],
        };
        assert_eq!(encode_request(&many), Err(over("digests")));
        let bytes = encode_versioned(&many).expect("encodes");
        assert!(decode_request(&bytes).is_err());
        let big = Digest::from_parts([7; 32], MAX_FETCH_BYTES);
        let heavy = CasRequest::Fetch {
            digests: vec![big, big],
        };
        assert_eq!(encode_request(&heavy), Err(over("digests")));
        // One blob over the batch size is asked for alone.
        let alone = CasRequest::Fetch { digests: vec![big] };
        assert!(encode_request(&alone).is_ok());
        let bad_version = CasRequest::CacheEntries {
            version: "../../etc".into(),
            key_prefix: String::new(),
        };
        assert_eq!(encode_request(&bad_version), Err(over("version")));
    }

    #[test]
    fn a_blob_is_on_the_wire_as_a_length_and_its_bytes() {
        // The wire format peers of this version agree on: a blob's stored bytes follow their
        // length as they are, the same bytes a sequence of `u8` has in postcard.
        #[derive(Serialize)]
        enum AsSequence {
            _Held,
            Blob { digest: Digest, stored: Vec<u8> },
        }
        let digest = Digest::of(b"abc");
        let stored = (0..=255u8).collect::<Vec<u8>>();
        let sequence = postcard::to_allocvec(&AsSequence::Blob {
            digest,
            stored: stored.clone(),
        })
        .expect("encodes");
        let bytes = postcard::to_allocvec(&CasReply::Blob {
            digest,
            stored: stored.clone(),
        })
        .expect("encodes");
        assert_eq!(bytes, sequence);
        assert!(bytes.ends_with(&stored));
    }

    #[test]
    fn a_blob_larger_than_its_digest_allows_is_refused() {
        let digest = Digest::of(b"small");
        let bloated = CasReply::Blob {
            digest,
            stored: vec![0; 5 + MAX_STORED_OVERHEAD as usize + 1],
        };
        let bytes = encode_versioned(&bloated).expect("encodes");
        assert_eq!(decode_reply(&bytes), Err(over("stored")));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let good = encode_reply(&CasReply::Entries {
            entries: vec![entry()],
        })
        .expect("encodes");
        for end in 0..good.len() {
            assert!(decode_reply(&good[..end]).is_err(), "prefix {end}");
        }
        for at in 0..good.len() {
            for value in [0x00, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = decode_reply(&bad);
                let _ = decode_request(&bad);
            }
        }
    }

    #[test]
    fn reply_limits_follow_what_was_asked() {
        let small = CasRequest::Fetch {
            digests: vec![Digest::from_parts([1; 32], 1000)],
        };
        let large = CasRequest::Fetch {
            digests: vec![Digest::from_parts([1; 32], 2 << 20)],
        };
        assert!(reply_limit(&small) < reply_limit(&large));
        assert!(reply_limit(&large) as u64 >= (2 << 20) + MAX_STORED_OVERHEAD);
        let entries = encode_reply(&CasReply::Entries {
            entries: vec![entry(); MAX_ENTRIES],
        })
        .expect("encodes");
        let ask = CasRequest::CacheEntries {
            version: "0".repeat(32),
            key_prefix: String::new(),
        };
        assert!(entries.len() <= reply_limit(&ask));
    }
}
