//! Blobs over the control API, for a `peerbuild run` whose store is not the node's (`--node`
//! naming a node on another data directory, such as the system's): the source tree goes up
//! before the build is submitted, and the artifact trees come back after it. On a shared data
//! directory both are a question and no bytes.
//!
//! - `POST /v1/blobs/has` (`{"digests": ["HASH/SIZE", ...]}`, at most
//!   [`MAX_QUERY_DIGESTS`]) answers `{"held": [bool, ...]}`.
//! - `POST /v1/blobs/fetch` (the same body, at most [`MAX_BATCH_BLOBS`] digests and
//!   [`MAX_BATCH_BYTES`], or one larger blob) answers the blobs as [frames](encode_frame).
//! - `POST /v1/blobs/put` (frames) stores each blob once it matches its digest.
//!
//! Then `POST /v1/cache/fetch` makes the uploaded tree a root of the node's store (it checks
//! that nothing of it is missing, and fetches what is from peers).
//!
//! A frame is the digest (32-byte hash, then the size as a big-endian u64), the stored form's
//! length (big-endian u32; 0 for a blob the answerer lacks) and the stored form
//! ([`Store::get_stored`]): blobs travel compressed, as the pool's blob protocol sends them.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use hyper::body::Bytes;
use protocol::Digest;
use protocol::cas::MAX_STORED_OVERHEAD;
use serde::{Deserialize, Serialize};

use super::client::{self, Endpoint};
use crate::store::transfer::{
    self, BlobSource, BoxFuture, MAX_BATCH_BLOBS, MAX_BATCH_BYTES, MAX_BLOB_BYTES,
    MAX_QUERY_DIGESTS, StoreSource, StoredBlobs,
};
use crate::store::{Store, gc};

/// The body of `has` and `fetch`.
#[derive(Serialize, Deserialize)]
pub struct Digests {
    pub digests: Vec<String>,
}

/// The answer of `has`.
#[derive(Serialize, Deserialize)]
pub struct Held {
    pub held: Vec<bool>,
}

/// What `put` stored.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Put {
    pub blobs: u64,
    pub written_bytes: u64,
}

/// The largest `put` body: a batch, or one blob of the largest size with its overhead.
pub const MAX_PUT_BYTES: usize = (MAX_BLOB_BYTES + MAX_STORED_OVERHEAD + 4096) as usize;

const FRAME_HEADER: usize = 32 + 8 + 4;

/// Appends one frame; `stored` empty means "not held".
pub fn encode_frame(out: &mut Vec<u8>, digest: &Digest, stored: &[u8]) {
    out.extend_from_slice(digest.hash());
    out.extend_from_slice(&digest.size().to_be_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
    out.extend_from_slice(stored);
}

/// Splits a body into frames, refusing one whose stored form is longer than its blob can be.
pub fn decode_frames(mut bytes: &[u8]) -> Result<Vec<(Digest, &[u8])>, String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < FRAME_HEADER {
            return Err("a frame is cut short".to_owned());
        }
        let (header, rest) = bytes.split_at(FRAME_HEADER);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&header[..32]);
        let size = u64::from_be_bytes(header[32..40].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(header[40..44].try_into().unwrap_or_default()) as usize;
        let digest = Digest::from_parts(hash, size);
        if length as u64 > size.saturating_add(MAX_STORED_OVERHEAD) {
            return Err(format!(
                "{length} stored bytes for {digest}, a blob of {size} bytes"
            ));
        }
        if rest.len() < length {
            return Err(format!("the frame of {digest} is cut short"));
        }
        let (stored, rest) = rest.split_at(length);
        frames.push((digest, stored));
        bytes = rest;
    }
    Ok(frames)
}

fn parse(digests: &[String]) -> Result<Vec<Digest>, String> {
    digests
        .iter()
        .map(|d| d.parse::<Digest>().map_err(|e| format!("{d}: {e}")))
        .collect()
}

/// The node's store, answering as it answers a peer.
fn node_store(store: Arc<Store>) -> StoreSource {
    StoreSource {
        name: "this node".to_owned(),
        store,
    }
}

/// `has`, on the node.
pub async fn serve_has(store: Arc<Store>, asked: Digests) -> Result<Held, String> {
    if asked.digests.len() > MAX_QUERY_DIGESTS {
        return Err(format!("at most {MAX_QUERY_DIGESTS} digests a question"));
    }
    let digests = parse(&asked.digests)?;
    let held = node_store(store).has(&digests).await?;
    Ok(Held { held })
}

/// `fetch`, on the node: the frames of the blobs asked for, in order (empty: not held).
pub async fn serve_fetch(store: Arc<Store>, asked: Digests) -> Result<Vec<u8>, String> {
    let digests = parse(&asked.digests)?;
    let total: u64 = digests.iter().map(|d| d.size()).sum();
    if digests.len() > MAX_BATCH_BLOBS || (digests.len() > 1 && total > MAX_BATCH_BYTES) {
        return Err(format!(
            "at most {MAX_BATCH_BLOBS} blobs and {MAX_BATCH_BYTES} bytes a request (or one larger blob)"
        ));
    }
    let found: std::collections::HashMap<Digest, Vec<u8>> = node_store(store)
        .fetch(&digests)
        .await?
        .into_iter()
        .collect();
    let mut body = Vec::new();
    for digest in &digests {
        let stored = found.get(digest).map_or(&[][..], Vec::as_slice);
        encode_frame(&mut body, digest, stored);
    }
    Ok(body)
}

/// `put`, on the node: stores each blob that matches its digest (a mismatch refuses the rest),
/// durably before answering.
pub async fn serve_put(store: Arc<Store>, body: Bytes) -> Result<Put, String> {
    tokio::task::spawn_blocking(move || {
        let frames = decode_frames(&body)?;
        let mut put = Put::default();
        for (digest, stored) in frames {
            if stored.is_empty() {
                return Err(format!("{digest} came without its bytes"));
            }
            put.written_bytes += store
                .put_stored(&digest, stored)
                .map_err(|e| e.to_string())?;
            put.blobs += 1;
        }
        store.flush(put.written_bytes).map_err(|e| e.to_string())?;
        Ok(put)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Makes the node's store hold the tree `root` this store holds: asks which blobs the node
/// lacks, sends those, then has the node take the tree as a root. Returns what was sent.
pub async fn upload_tree(endpoint: &Endpoint, store: &Arc<Store>, root: Digest) -> Result<Put> {
    let walk_store = store.clone();
    let blobs = tokio::task::spawn_blocking(move || gc::blobs_of(&walk_store, &root))
        .await
        .context("the source's walk stopped")??;
    let mut lacking = Vec::new();
    for batch in blobs.chunks(MAX_QUERY_DIGESTS) {
        let held = has(endpoint, batch).await?;
        if held.len() != batch.len() {
            bail!(
                "the node answered {} of {} questions",
                held.len(),
                batch.len()
            );
        }
        lacking.extend(batch.iter().zip(held).filter(|(_, h)| !h).map(|(d, _)| *d));
    }
    let mut sent = Put::default();
    let mut body = Vec::new();
    for digest in lacking {
        let read_store = store.clone();
        let stored = tokio::task::spawn_blocking(move || read_store.get_stored(&digest))
            .await
            .context("reading the store stopped")??;
        if !body.is_empty() && body.len() + stored.len() > MAX_BATCH_BYTES as usize {
            add(&mut sent, put(endpoint, std::mem::take(&mut body)).await?);
        }
        encode_frame(&mut body, &digest, &stored);
    }
    if !body.is_empty() {
        add(&mut sent, put(endpoint, body).await?);
    }
    let fetch = serde_json::to_vec(&super::api::FetchRequest {
        tree: root.to_string(),
        into: None,
    })?;
    client::post(endpoint, "/v1/cache/fetch", fetch)
        .await
        .with_context(|| format!("the node could not take the tree {root}"))?;
    Ok(sent)
}

fn add(total: &mut Put, more: Put) {
    total.blobs += more.blobs;
    total.written_bytes += more.written_bytes;
}

async fn has(endpoint: &Endpoint, digests: &[Digest]) -> Result<Vec<bool>> {
    let body = serde_json::to_vec(&Digests {
        digests: digests.iter().map(|d| d.to_string()).collect(),
    })?;
    let answer = client::post(endpoint, "/v1/blobs/has", body).await?;
    let held: Held = serde_json::from_slice(&answer).context("the node's answer to has")?;
    Ok(held.held)
}

async fn put(endpoint: &Endpoint, body: Vec<u8>) -> Result<Put> {
    let answer = client::post_bytes(endpoint, "/v1/blobs/put", body).await?;
    serde_json::from_slice(&answer).context("the node's answer to put")
}

/// The node's store as a [`BlobSource`], for fetching artifact trees into this one.
pub struct NodeSource {
    pub endpoint: Endpoint,
}

impl BlobSource for NodeSource {
    fn name(&self) -> String {
        "the node".to_owned()
    }

    fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>> {
        Box::pin(async move {
            has(&self.endpoint, digests)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn fetch<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<StoredBlobs, String>> {
        Box::pin(async move {
            let body = serde_json::to_vec(&Digests {
                digests: digests.iter().map(|d| d.to_string()).collect(),
            })
            .map_err(|e| e.to_string())?;
            let answer = client::post(&self.endpoint, "/v1/blobs/fetch", body)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let frames = decode_frames(&answer)?;
            Ok(frames
                .into_iter()
                .filter(|(_, stored)| !stored.is_empty())
                .map(|(digest, stored)| (digest, stored.to_vec()))
                .collect())
        })
    }
}

/// Fetches the tree `root` from the node's store into this one (nothing, when they are one).
pub async fn download_tree(endpoint: Endpoint, store: &Arc<Store>, root: Digest) -> Result<()> {
    let source: Arc<dyn BlobSource> = Arc::new(NodeSource { endpoint });
    transfer::fetch_tree(
        store.clone(),
        root,
        vec![source],
        "artifacts from the node",
        gc::budget(None),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_lying_length_is_refused() {
        let a = Digest::of(b"hello");
        let b = Digest::of(b"");
        let mut body = Vec::new();
        encode_frame(&mut body, &a, b"\x00hello");
        encode_frame(&mut body, &b, &[]);
        let frames = decode_frames(&body).expect("frames");
        assert_eq!(frames, vec![(a, &b"\x00hello"[..]), (b, &b""[..])]);
        assert!(decode_frames(&body[..body.len() - 1]).is_err());
        let mut lying = Vec::new();
        lying.extend_from_slice(a.hash());
        lying.extend_from_slice(&5u64.to_be_bytes());
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        let refused = decode_frames(&lying).expect_err("too long for its blob");
        assert!(refused.contains("stored bytes"), "{refused}");
    }
}
