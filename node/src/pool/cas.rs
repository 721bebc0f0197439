//! The blob protocol `/peerbuild/cas/1` on libp2p streams (`protocol::cas` has the messages):
//! [`serve`] answers other peers from this node's store, and [`PeerSource`] asks a peer, as a
//! [`BlobSource`] for the store's transfers.
//!
//! One request per stream; streams are cheap on yamux, and several in flight to one peer are
//! what makes a transfer fast. Every read is bounded before it allocates, every exchange has a
//! deadline, and at most [`MAX_SERVED_STREAMS`] requests are answered at once (more are refused
//! with a reason, and the asker tries another holder or later).

use std::sync::Arc;
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{AsyncRead, AsyncWrite, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use protocol::Digest;
use protocol::cas::{self, CacheEntry, CasReply, CasRequest};
use tokio::sync::{Semaphore, watch};
use tracing::debug;

use crate::engine::cache;
use crate::store::transfer::{BlobSource, BoxFuture, StoredBlobs};
use crate::store::{Store, StoreError};

/// Requests this node answers at once.
pub const MAX_SERVED_STREAMS: usize = 32;
/// How long one exchange may take, either side.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer may take to send its request once it opened a stream.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(cas::CAS_PROTOCOL)
}

/// Reads one frame: a big-endian `u32` length, checked against `limit` before anything is
/// allocated, then the body. `None` at a clean end of stream.
pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {length} bytes is over the limit of {limit}"),
        ));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(Some(body))
}

pub(crate) async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    body: &[u8],
) -> std::io::Result<()> {
    let length = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    stream.write_all(&length.to_be_bytes()).await?;
    stream.write_all(body).await
}

async fn write_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &CasReply,
) -> Result<(), String> {
    let body = cas::encode_reply(reply).map_err(|e| e.to_string())?;
    write_frame(stream, &body).await.map_err(|e| e.to_string())
}

/// The next incoming stream from a peer on the allow-list (`allowed`, if any: the connection
/// was refused already if the peer is off it; this is a second lock); `None` once `shutdown`
/// turns true or the protocol is no longer served.
pub(crate) async fn next_stream(
    incoming: &mut libp2p_stream::IncomingStreams,
    allowed: Option<&[PeerId]>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(PeerId, libp2p::Stream)> {
    loop {
        let (peer, stream) = tokio::select! {
            next = incoming.next() => next?,
            _ = shutdown.changed() => return None,
        };
        if allowed.is_some_and(|list| !list.contains(&peer)) {
            debug!(%peer, "a stream from a peer off the allow-list dropped");
            continue;
        }
        return Some((peer, stream));
    }
}

/// Answers blob requests from peers until `shutdown` turns true. `allowed` is the allow-list
/// (the connection was refused already if the peer is off it; this is a second lock).
pub async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    store: Arc<Store>,
    allowed: Option<Vec<PeerId>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_SERVED_STREAMS));
    while let Some((peer, mut stream)) =
        next_stream(&mut incoming, allowed.as_deref(), &mut shutdown).await
    {
        let limit = limit.clone();
        let store = store.clone();
        tokio::spawn(async move {
            // The request is read before a permit is taken, within a short deadline, so idle
            // streams cannot hold the permits that answers need.
            let answered = match read_request(&mut stream).await {
                Err(err) => Err(err),
                Ok(request) => match limit.try_acquire_owned() {
                    Ok(_permit) => {
                        tokio::time::timeout(EXCHANGE_TIMEOUT, answer(&mut stream, request, &store))
                            .await
                            .unwrap_or_else(|_| Err("the exchange took too long".to_owned()))
                    }
                    Err(_) => {
                        let busy = CasReply::Refused {
                            reason: format!("busy: {MAX_SERVED_STREAMS} requests in flight"),
                        };
                        write_reply(&mut stream, &busy).await
                    }
                },
            };
            if let Err(err) = answered {
                debug!(%peer, error = %err, "blob request not answered");
            }
            let _ = stream.close().await;
        });
    }
}

/// Reads one request, within [`REQUEST_READ_TIMEOUT`]; a malformed one is answered `Refused`.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<CasRequest, String> {
    let body = tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_frame(stream, cas::MAX_REQUEST_BYTES),
    )
    .await
    .map_err(|_| "no request in time".to_owned())?
    .map_err(|e| e.to_string())?
    .ok_or("the stream ended before a request")?;
    match cas::decode_request(&body) {
        Ok(request) => Ok(request),
        Err(err) => {
            let refused = CasReply::Refused {
                reason: format!("malformed request: {err}"),
            };
            write_reply(stream, &refused).await?;
            Err(err.to_string())
        }
    }
}

/// Writes the answer to `request`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: CasRequest,
    store: &Arc<Store>,
) -> Result<(), String> {
    match request {
        CasRequest::Has { digests } => {
            store.refresh();
            let held = digests.iter().map(|d| store.contains(d)).collect();
            write_reply(stream, &CasReply::Held { held }).await
        }
        CasRequest::Fetch { digests } => {
            for digest in digests {
                let reader = store.clone();
                let stored = tokio::task::spawn_blocking(move || reader.get_stored(&digest))
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = match stored {
                    Ok(stored) => CasReply::Blob { digest, stored },
                    Err(StoreError::Missing { .. }) => CasReply::Missing { digest },
                    Err(err) => {
                        debug!(%digest, error = %err, "blob not served");
                        CasReply::Missing { digest }
                    }
                };
                write_reply(stream, &reply).await?;
            }
            write_reply(stream, &CasReply::End).await
        }
        CasRequest::CacheEntries {
            version,
            key_prefix,
        } => {
            let reader = store.clone();
            let entries = tokio::task::spawn_blocking(move || {
                cache::entries_with_prefix(&reader, &version, &key_prefix, cas::MAX_ENTRIES)
            })
            .await
            .map_err(|e| e.to_string())?;
            // An entry over the wire's limits is left out rather than spoil the whole answer.
            let entries = entries
                .iter()
                .filter_map(cache::Entry::to_wire)
                .filter(|e| cas::check_cache_entry(e).is_ok())
                .collect();
            write_reply(stream, &CasReply::Entries { entries }).await
        }
    }
}

/// A peer as a source of blobs and cache entries.
#[derive(Clone)]
pub struct PeerSource {
    pub peer: PeerId,
    pub control: libp2p_stream::Control,
}

impl PeerSource {
    /// Sends `request` on a new stream and reads replies until `done` says the answer is whole.
    async fn exchange(
        &self,
        request: &CasRequest,
        mut on_reply: impl FnMut(CasReply) -> Result<bool, String>,
    ) -> Result<(), String> {
        let body = cas::encode_request(request).map_err(|e| e.to_string())?;
        let limit = cas::reply_limit(request);
        let mut control = self.control.clone();
        let work = async {
            let mut stream = control
                .open_stream(self.peer, protocol())
                .await
                .map_err(|e| format!("cannot open a stream: {e}"))?;
            write_frame(&mut stream, &body)
                .await
                .map_err(|e| e.to_string())?;
            stream.close().await.map_err(|e| e.to_string())?;
            loop {
                let frame = read_frame(&mut stream, limit)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the answer ended early")?;
                let reply = cas::decode_reply(&frame).map_err(|e| e.to_string())?;
                if let CasReply::Refused { reason } = reply {
                    return Err(format!("refused: {reason}"));
                }
                if on_reply(reply)? {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err("it did not answer in time".to_owned()))
    }

    /// Sends a request answered by one reply, which `pick` takes apart (or hands back, when it
    /// is not the kind expected).
    async fn single<T>(
        &self,
        request: &CasRequest,
        pick: impl Fn(CasReply) -> Result<T, CasReply>,
    ) -> Result<T, String> {
        let mut answer = None;
        self.exchange(request, |reply| match pick(reply) {
            Ok(value) => {
                answer = Some(value);
                Ok(true)
            }
            Err(other) => Err(format!("unexpected answer {}", reply_name(&other))),
        })
        .await?;
        answer.ok_or_else(|| "no answer".to_owned())
    }

    /// The cache entries of `version` whose keys start with `key_prefix`, as the peer lists them.
    pub async fn cache_entries(
        &self,
        version: &str,
        key_prefix: &str,
    ) -> Result<Vec<CacheEntry>, String> {
        let request = CasRequest::CacheEntries {
            version: version.to_owned(),
            key_prefix: key_prefix.to_owned(),
        };
        let entries = self
            .single(&request, |reply| match reply {
                CasReply::Entries { entries } => Ok(entries),
                other => Err(other),
            })
            .await?;
        // An entry that does not start with what was asked is a lie, not an answer.
        if entries.iter().any(|e| !e.key.starts_with(key_prefix)) {
            return Err("it listed entries that do not match the prefix asked".to_owned());
        }
        Ok(entries)
    }
}

fn reply_name(reply: &CasReply) -> &'static str {
    match reply {
        CasReply::Held { .. } => "Held",
        CasReply::Blob { .. } => "Blob",
        CasReply::Missing { .. } => "Missing",
        CasReply::End => "End",
        CasReply::Entries { .. } => "Entries",
        CasReply::Refused { .. } => "Refused",
    }
}

impl BlobSource for PeerSource {
    fn name(&self) -> String {
        format!("peer {}", self.peer)
    }

    fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>> {
        Box::pin(async move {
            let request = CasRequest::Has {
                digests: digests.to_vec(),
            };
            self.single(&request, |reply| match reply {
                CasReply::Held { held } => Ok(held),
                other => Err(other),
            })
            .await
        })
    }

    fn fetch<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<StoredBlobs, String>> {
        Box::pin(async move {
            let request = CasRequest::Fetch {
                digests: digests.to_vec(),
            };
            let mut expected = digests.iter();
            let mut found = Vec::with_capacity(digests.len());
            self.exchange(&request, |reply| {
                let next = expected.next();
                match (reply, next) {
                    (CasReply::Blob { digest, stored }, Some(want)) if digest == *want => {
                        found.push((digest, stored));
                        Ok(false)
                    }
                    (CasReply::Missing { digest }, Some(want)) if digest == *want => Ok(false),
                    (CasReply::End, None) => Ok(true),
                    (other, _) => Err(format!(
                        "answered out of order ({} where another was due)",
                        reply_name(&other)
                    )),
                }
            })
            .await?;
            Ok(found)
        })
    }
}
