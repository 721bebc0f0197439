//! The blob protocol `/peerbuild/cas/1` on libp2p streams (`protocol::cas` has the messages):
//! [`serve`] answers other peers from this node's store, and [`PeerSource`] asks a peer, as a
//! [`BlobSource`] for the store's transfers.
//!
//! One request per stream; streams are cheap on yamux, and several in flight to one peer are
//! what makes a transfer fast. Every read is bounded before it allocates, either side gives the
//! other up once nothing has moved for [`PROGRESS_TIMEOUT`] (a slow peer is waited for, a
//! stalled one is not), and at most [`MAX_SERVED_STREAMS`] requests are answered at once (more are refused
//! with a reason, and the asker tries another holder or later).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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
/// How long either side of an exchange waits with nothing moving before it gives the other
/// up. There is no limit on a whole exchange: a slow peer's big batch takes as long as it
/// takes while bytes keep coming.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times a request (a blob request, a task offer) the peer answered nothing to is
/// sent again on a fresh stream, and the pause before the first retry (twice as long before
/// the second, and so on).
const UNANSWERED_RETRIES: u32 = 3;
const UNANSWERED_PAUSE: Duration = Duration::from_millis(20);
/// Blobs of a fetch read from the store ahead of the one being sent.
const READ_AHEAD_BLOBS: usize = 4;
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
    let permits = Arc::new(Semaphore::new(MAX_SERVED_STREAMS));
    while let Some((peer, stream)) =
        next_stream(&mut incoming, allowed.as_deref(), &mut shutdown).await
    {
        let permits = permits.clone();
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_stream(stream, &store, &permits, PROGRESS_TIMEOUT).await {
                debug!(%peer, error = %err, "blob request not answered");
            }
        });
    }
}

/// Answers the one request on `stream`. The answer may take as long as the asker needs to
/// read it, but once the asker has read nothing for `wait` the stream is given up and its
/// permit released.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    store: &Arc<Store>,
    permits: &Arc<Semaphore>,
    wait: Duration,
) -> Result<(), String> {
    let mut stream = Progress::new(stream, wait);
    // The request is read before a permit is taken, within a short deadline, so idle streams
    // cannot hold the permits that answers need.
    let answered = match read_request(&mut stream).await {
        Err(err) => Err(err),
        Ok(request) => match permits.try_acquire() {
            Ok(_permit) => answer(&mut stream, request, store).await,
            Err(_) => {
                let busy = CasReply::Refused {
                    reason: format!("busy: {MAX_SERVED_STREAMS} requests in flight"),
                };
                write_reply(&mut stream, &busy).await
            }
        },
    };
    let _ = stream.close().await;
    answered
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
            // One blocking task reads the batch's blobs in order while the replies before
            // them are written: the disk and the network overlap, and a batch costs one
            // hand-over to the blocking pool, not one a blob.
            let (replies, mut next) = tokio::sync::mpsc::channel(READ_AHEAD_BLOBS);
            let reader = store.clone();
            let reading = tokio::task::spawn_blocking(move || {
                for digest in digests {
                    let reply = match reader.get_stored(&digest) {
                        Ok(stored) => CasReply::Blob { digest, stored },
                        Err(StoreError::Missing { .. }) => CasReply::Missing { digest },
                        Err(err) => {
                            debug!(%digest, error = %err, "blob not served");
                            CasReply::Missing { digest }
                        }
                    };
                    if replies.blocking_send(reply).is_err() {
                        // The asker is gone: the rest is not read.
                        return;
                    }
                }
            });
            // Should a write fail, `next` is dropped on the way out and the reader stops at
            // its next blob.
            while let Some(reply) = next.recv().await {
                write_reply(stream, &reply).await?;
            }
            // The channel also closes if the reader panicked: then the answer is not whole,
            // and no `End` claims it is.
            reading.await.map_err(|e| e.to_string())?;
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
    /// A new stream to the peer, for one request, that gives up once the peer has sent or
    /// read nothing for [`PROGRESS_TIMEOUT`].
    async fn open(&self) -> Result<Progress<libp2p::Stream>, String> {
        let mut control = self.control.clone();
        let stream =
            tokio::time::timeout(PROGRESS_TIMEOUT, control.open_stream(self.peer, protocol()))
                .await
                .map_err(|_| "cannot open a stream: no answer in time".to_owned())?
                .map_err(|e| format!("cannot open a stream: {e}"))?;
        Ok(Progress::new(stream, PROGRESS_TIMEOUT))
    }

    /// Runs `exchange` on a new stream to the peer, again when it answered nothing (see
    /// [`ask_again`]).
    async fn ask<T, F, Fut>(&self, exchange: F) -> Result<T, String>
    where
        F: Fn(Progress<libp2p::Stream>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failed>>,
    {
        ask_again(&self.peer.to_string(), || self.open(), exchange).await
    }

    /// Sends a request answered by one reply (see [`single`]), again when it was not answered.
    async fn ask_single<T>(
        &self,
        request: &CasRequest,
        pick: impl Fn(CasReply) -> Result<T, CasReply>,
    ) -> Result<T, String> {
        ask_single(&self.peer.to_string(), || self.open(), request, pick).await
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
            .ask_single(&request, |reply| match reply {
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

/// Runs `exchange` on a stream `open` makes; when the peer answered nothing on it, on a fresh
/// one, up to [`UNANSWERED_RETRIES`] more times. A peer whose reader of incoming streams is
/// busy has a new stream dropped (libp2p-stream queues none), which the asker sees as a reset
/// before any answer: asking again a moment later is what helps. An answer, even a refusal or
/// a bad one, is final, and so is a stall (see [`Failed::before_answer`]).
async fn ask_again<S, T, O, OpenFut, F, Fut>(peer: &str, open: O, exchange: F) -> Result<T, String>
where
    O: Fn() -> OpenFut,
    OpenFut: std::future::Future<Output = Result<S, String>>,
    F: Fn(S) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failed>>,
{
    let mut retries = 0;
    loop {
        match exchange(open().await?).await {
            Err(failed) if failed.unanswered && retries < UNANSWERED_RETRIES => {
                retries += 1;
                debug!(%peer, why = %failed.why, retries, "a stream was not answered; asking again");
                tokio::time::sleep(UNANSWERED_PAUSE * retries).await;
            }
            answer => return answer.map_err(String::from),
        }
    }
}

/// Opens a stream with `open`, writes `request` as a frame and reads the first reply frame
/// (at most `limit` bytes), through [`ask_again`]: a stream that ends or breaks before that
/// frame is replaced by a fresh one, a few times. Returns the stream, for the rest of the
/// exchange, and the frame. The task protocol's offers go this way.
pub(crate) async fn first_answer<S, O, OpenFut>(
    peer: &str,
    open: O,
    request: &[u8],
    limit: usize,
) -> Result<(S, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    O: Fn() -> OpenFut,
    OpenFut: std::future::Future<Output = Result<S, String>>,
{
    ask_again(peer, open, |mut stream| async move {
        write_frame(&mut stream, request)
            .await
            .map_err(Failed::before_answer)?;
        match read_frame(&mut stream, limit).await {
            Ok(Some(frame)) => Ok((stream, frame)),
            Ok(None) => Err(Failed {
                unanswered: true,
                why: "the stream ended".to_owned(),
            }),
            Err(err) => Err(Failed::before_answer(err)),
        }
    })
    .await
}

/// [`single`] through [`ask_again`].
async fn ask_single<S, T, O, OpenFut>(
    peer: &str,
    open: O,
    request: &CasRequest,
    pick: impl Fn(CasReply) -> Result<T, CasReply>,
) -> Result<T, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    O: Fn() -> OpenFut,
    OpenFut: std::future::Future<Output = Result<S, String>>,
{
    let pick = &pick;
    ask_again(peer, open, |mut stream| async move {
        single(&mut stream, request, pick).await
    })
    .await
}

/// What an exchange does after a reply.
enum Next {
    /// Reads another frame, of at most this many bytes.
    Read(usize),
    /// Stops: the answer is whole.
    Done,
}

/// Why an exchange failed, and whether asking again on a fresh stream may help.
#[derive(Debug)]
pub(crate) struct Failed {
    /// The stream ended or broke before the peer answered anything, without stalling: what a
    /// peer that dropped the stream unread looks like.
    unanswered: bool,
    why: String,
}

impl Failed {
    /// The stream failed before any answer: worth asking again unless it stalled (a peer
    /// that keeps a stream waiting is not asked to do it again) or what it sent was bad (a
    /// frame over its limit is an answer, a wrong one).
    fn before_answer(err: std::io::Error) -> Failed {
        Failed {
            unanswered: !matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::InvalidData
            ),
            why: err.to_string(),
        }
    }

    /// A failure asking again would not mend: an answer came (even a refusal or a bad one),
    /// or this side could not make its request.
    fn fin(why: impl ToString) -> Failed {
        Failed {
            unanswered: false,
            why: why.to_string(),
        }
    }
}

impl From<Failed> for String {
    fn from(failed: Failed) -> String {
        failed.why
    }
}

/// Sends `request` on `stream` and reads replies, the first frame at most `limit` bytes and
/// each next one at most what `on_reply` says, until it says the answer is whole. The exchange
/// takes as long as the answer needs; the stream's own deadline (see [`Progress`]) ends it
/// when nothing moves.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &CasRequest,
    mut limit: usize,
    mut on_reply: impl FnMut(CasReply) -> Result<Next, String>,
) -> Result<(), Failed> {
    let body = cas::encode_request(request).map_err(Failed::fin)?;
    write_frame(stream, &body)
        .await
        .map_err(Failed::before_answer)?;
    stream.close().await.map_err(Failed::before_answer)?;
    let mut answered = false;
    loop {
        let frame = match read_frame(stream, limit).await {
            Ok(Some(frame)) => frame,
            Err(err) if !answered => return Err(Failed::before_answer(err)),
            Err(err) => return Err(Failed::fin(err)),
            Ok(None) => {
                return Err(Failed {
                    unanswered: !answered,
                    why: "the answer ended early".to_owned(),
                });
            }
        };
        answered = true;
        let reply = cas::decode_reply(&frame).map_err(Failed::fin)?;
        if let CasReply::Refused { reason } = reply {
            return Err(Failed::fin(format!("refused: {reason}")));
        }
        match on_reply(reply).map_err(Failed::fin)? {
            Next::Read(next) => limit = next,
            Next::Done => return Ok(()),
        }
    }
}

/// Sends a request answered by one reply, which `pick` takes apart (or hands back, when it is
/// not the kind expected).
async fn single<S: AsyncRead + AsyncWrite + Unpin, T>(
    stream: &mut S,
    request: &CasRequest,
    pick: impl Fn(CasReply) -> Result<T, CasReply>,
) -> Result<T, Failed> {
    let mut answer = None;
    let limit = cas::reply_limit(request);
    exchange(stream, request, limit, |reply| match pick(reply) {
        Ok(value) => {
            answer = Some(value);
            Ok(Next::Done)
        }
        Err(other) => Err(format!("unexpected answer {}", reply_name(&other))),
    })
    .await?;
    answer.ok_or_else(|| Failed::fin("no answer"))
}

/// Asks for `digests` on `stream`: the blobs sent, in the order asked, those the peer lacks
/// left out. Each frame is read against the blob due (see [`cas::fetch_reply_limit`]), so a
/// frame larger than that blob allows is refused before it is read into memory, not after;
/// an error names the blob due.
async fn fetch_blobs<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    digests: &[Digest],
) -> Result<StoredBlobs, Failed> {
    let request = CasRequest::Fetch {
        digests: digests.to_vec(),
    };
    let mut expected = digests.iter().copied().peekable();
    let mut due = expected.peek().copied();
    let limit = cas::fetch_reply_limit(due.as_ref());
    let mut found = Vec::with_capacity(digests.len());
    let answered = exchange(stream, &request, limit, |reply| {
        let whole = match (reply, expected.next()) {
            (CasReply::Blob { digest, stored }, Some(want)) if digest == want => {
                found.push((digest, stored));
                false
            }
            (CasReply::Missing { digest }, Some(want)) if digest == want => false,
            (CasReply::End, None) => true,
            (other, _) => {
                return Err(format!(
                    "answered out of order ({} where another was due)",
                    reply_name(&other)
                ));
            }
        };
        due = expected.peek().copied();
        Ok(if whole {
            Next::Done
        } else {
            Next::Read(cas::fetch_reply_limit(due.as_ref()))
        })
    })
    .await;
    answered.map_err(|failed| match due {
        Some(digest) => Failed {
            why: format!("blob {digest}: {}", failed.why),
            ..failed
        },
        None => failed,
    })?;
    Ok(found)
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
            self.ask_single(&request, |reply| match reply {
                CasReply::Held { held } => Ok(held),
                other => Err(other),
            })
            .await
        })
    }

    fn fetch<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<StoredBlobs, String>> {
        Box::pin(self.ask(move |mut stream| async move { fetch_blobs(&mut stream, digests).await }))
    }
}

/// A stream that gives up once the other side has kept it waiting `wait` with no byte moving
/// either way: a slow peer may take as long as it needs while bytes flow, a stalled one is
/// dropped. Only waiting on the peer counts: the clock starts when a read or write has to wait,
/// so time spent elsewhere between them (reading the store) is not held against the peer.
pub(crate) struct Progress<S> {
    inner: S,
    wait: Duration,
    /// Made on the first wait, so a `Progress` can be made outside a runtime.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl<S> Progress<S> {
    pub(crate) fn new(inner: S, wait: Duration) -> Progress<S> {
        Progress {
            inner,
            wait,
            timer: None,
            waiting: false,
        }
    }

    /// Passes on what the inner stream did; while it waits, fails once `wait` has passed.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO)));
        if !self.waiting {
            self.waiting = true;
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.wait);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing moved for {} s", self.wait.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Progress<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.check(cx, polled)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Progress<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_close(cx);
        this.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    //! Exchanges over scripted streams: a slow peer is waited for while bytes keep moving, a
    //! stalled one is given up after the wait, either side.

    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// The wait the tests give a stalled peer (the node's is [`PROGRESS_TIMEOUT`]).
    const WAIT: Duration = Duration::from_millis(300);

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    /// The far side of a stream, scripted: reads give out `incoming` one `step` each `pace`
    /// and then stall (never end) at `stall_at`; writes take one `step` each `pace`, and
    /// nothing more once `room` bytes are taken (a peer that stopped reading).
    struct Paced {
        incoming: Vec<u8>,
        read: usize,
        stall_at: usize,
        written: Vec<u8>,
        room: usize,
        step: usize,
        pace: Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Paced {
        fn new(incoming: Vec<u8>, step: usize, pace: Duration) -> Paced {
            Paced {
                incoming,
                read: 0,
                stall_at: usize::MAX,
                written: Vec::new(),
                room: usize::MAX,
                step,
                pace,
                timer: None,
            }
        }

        /// Ready once the next step may move.
        fn tick(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            let pace = self.pace;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(pace)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
            Poll::Ready(())
        }
    }

    impl AsyncRead for Paced {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            if this.read >= this.stall_at {
                // Never woken: only the reader's own deadline ends this wait.
                return Poll::Pending;
            }
            if this.read == this.incoming.len() {
                return Poll::Ready(Ok(0));
            }
            if this.tick(cx).is_pending() {
                return Poll::Pending;
            }
            let n = this
                .step
                .min(buf.len())
                .min(this.incoming.len() - this.read)
                .min(this.stall_at - this.read);
            buf[..n].copy_from_slice(&this.incoming[this.read..this.read + n]);
            this.read += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Paced {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            if this.written.len() >= this.room {
                // Never woken: only the writer's own deadline ends this wait.
                return Poll::Pending;
            }
            if this.tick(cx).is_pending() {
                return Poll::Pending;
            }
            let n = this.step.min(buf.len()).min(this.room - this.written.len());
            this.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Bytes no compressor shrinks, so a blob of them is stored raw at its full size.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Replies as a peer writes them, each in its frame; no limit is checked, as a lying peer
    /// checks none.
    fn framed(replies: &[CasReply]) -> Vec<u8> {
        let mut out = Vec::new();
        for reply in replies {
            let body = postcard::to_stdvec(&(protocol::wire::WIRE_FORMAT_VERSION, reply))
                .expect("encodes");
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    /// Reads back the frames a side wrote.
    fn unframed(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while bytes.len() >= 4 {
            let length = u32::from_be_bytes(bytes[..4].try_into().expect("four bytes")) as usize;
            frames.push(bytes[4..4 + length].to_vec());
            bytes = &bytes[4 + length..];
        }
        frames
    }

    fn a_blob(len: usize) -> (Digest, Vec<u8>) {
        let bytes = noise(len, len as u64);
        let mut stored = vec![0u8];
        stored.extend_from_slice(&bytes);
        (Digest::of(&bytes), stored)
    }

    #[test]
    fn a_slow_answer_is_read_whole_while_its_bytes_keep_coming() {
        let (digest, stored) = a_blob(96 << 10);
        let answer = framed(&[
            CasReply::Blob {
                digest,
                stored: stored.clone(),
            },
            CasReply::End,
        ]);
        // 96 steps of 1 KiB, 10 ms apart: about three times the wait, all of it moving.
        let started = Instant::now();
        let mut peer = Progress::new(Paced::new(answer, 1024, Duration::from_millis(10)), WAIT);
        let fetched = run(fetch_blobs(&mut peer, &[digest])).expect("a slow peer is waited for");
        assert!(started.elapsed() > WAIT * 2, "{:?}", started.elapsed());
        assert_eq!(fetched, vec![(digest, stored)]);
    }

    #[test]
    fn an_answer_that_stops_coming_fails_after_the_wait() {
        let (digest, stored) = a_blob(96 << 10);
        let answer = framed(&[CasReply::Blob { digest, stored }, CasReply::End]);
        let mut paced = Paced::new(answer, 1024, Duration::from_millis(1));
        paced.stall_at = 10 << 10;
        let started = Instant::now();
        let failed = run(fetch_blobs(&mut Progress::new(paced, WAIT), &[digest]))
            .expect_err("a stalled peer is given up")
            .why;
        assert!(failed.contains("nothing moved for 0.3 s"), "{failed}");
        assert!(started.elapsed() < WAIT * 4, "{:?}", started.elapsed());
    }

    /// A peer's side of a stream that answers at once with `replies`.
    fn answering(replies: &[CasReply]) -> Paced {
        Paced::new(framed(replies), 1024, Duration::ZERO)
    }

    /// Streams handed out in turn to whoever opens one, counted.
    struct Streams {
        queue: Mutex<VecDeque<Paced>>,
        opened: AtomicUsize,
    }

    impl Streams {
        fn new(peers: Vec<Paced>) -> Streams {
            Streams {
                queue: Mutex::new(peers.into()),
                opened: AtomicUsize::new(0),
            }
        }

        async fn open(&self) -> Result<Paced, String> {
            self.opened.fetch_add(1, Ordering::SeqCst);
            let next = self.queue.lock().unwrap().pop_front();
            next.ok_or_else(|| "no more streams".to_owned())
        }

        fn opened(&self) -> usize {
            self.opened.load(Ordering::SeqCst)
        }
    }

    /// Asks whether the peer holds a blob through [`ask_again`], on the streams `peers` hands
    /// out in turn; returns the answer and how many streams were opened.
    fn ask_has(peers: Vec<Paced>) -> (Result<Vec<bool>, String>, usize) {
        let streams = Streams::new(peers);
        let request = CasRequest::Has {
            digests: vec![Digest::of(b"held")],
        };
        let open = || async { Ok(Progress::new(streams.open().await?, WAIT)) };
        let answer = run(ask_single("a peer", open, &request, |reply| match reply {
            CasReply::Held { held } => Ok(held),
            other => Err(other),
        }));
        (answer, streams.opened())
    }

    #[test]
    fn a_stream_the_peer_dropped_unanswered_is_asked_again_on_a_new_one() {
        let dropped = || answering(&[]);
        let held = answering(&[CasReply::Held { held: vec![true] }]);
        let (answer, opened) = ask_has(vec![dropped(), dropped(), held]);
        assert_eq!(answer, Ok(vec![true]));
        assert_eq!(opened, 3);
        // A peer that never answers is given up after the retries.
        let (answer, opened) = ask_has((0..10).map(|_| dropped()).collect());
        assert_eq!(answer, Err("the answer ended early".to_owned()));
        assert_eq!(opened, 1 + UNANSWERED_RETRIES as usize);
    }

    #[test]
    fn an_offer_dropped_unanswered_is_made_again_on_a_fresh_stream() {
        let streams = Streams::new(vec![answering(&[]), answering(&[CasReply::End])]);
        let (stream, frame) = run(first_answer("a peer", || streams.open(), b"offer", 1024))
            .expect("answered the second time");
        assert_eq!(streams.opened(), 2);
        assert_eq!(unframed(&stream.written), vec![b"offer".to_vec()]);
        assert_eq!(
            cas::decode_reply(&frame).expect("decodes"),
            CasReply::End,
            "the answer on the fresh stream"
        );
    }

    #[test]
    fn a_stall_a_bad_frame_or_a_refusal_is_final_not_asked_again() {
        let mut stalled = answering(&[]);
        stalled.stall_at = 0;
        // A length of 4 GiB - 1 where a `Held` of one bool is due.
        let oversized = Paced::new(vec![0xff; 8], 1024, Duration::ZERO);
        let refusing = answering(&[CasReply::Refused {
            reason: "busy".into(),
        }]);
        for (first, said) in [
            (stalled, "nothing moved"),
            (oversized, "over the limit"),
            (refusing, "refused: busy"),
        ] {
            let held = answering(&[CasReply::Held { held: vec![true] }]);
            let (answer, opened) = ask_has(vec![first, held]);
            let failed = answer.expect_err("the first answer is final");
            assert!(failed.contains(said), "{failed}");
            assert_eq!(opened, 1, "{said}");
        }
    }

    fn store_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<Store>, Digest) {
        let dir = tempfile::tempdir().expect("a folder");
        let store = Arc::new(Store::open(dir.path()).expect("opens"));
        let (digest, written) = store.put(bytes).expect("stores");
        store.flush(written).expect("flushes");
        (dir, store, digest)
    }

    fn fetch_request(digest: Digest) -> Vec<u8> {
        let request = CasRequest::Fetch {
            digests: vec![digest],
        };
        let body = cas::encode_request(&request).expect("encodes");
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn a_blob_larger_than_the_one_due_is_refused_before_it_is_read() {
        let (small, _) = a_blob(1024);
        let (big, big_stored) = a_blob(512 << 10);
        // The small blob's reply carries as much as the big one's.
        let answer = framed(&[
            CasReply::Blob {
                digest: small,
                stored: big_stored.clone(),
            },
            CasReply::Blob {
                digest: big,
                stored: big_stored,
            },
            CasReply::End,
        ]);
        let mut peer = Progress::new(Paced::new(answer, 64 << 10, Duration::ZERO), WAIT);
        let failed = run(fetch_blobs(&mut peer, &[small, big]))
            .expect_err("refused")
            .why;
        assert!(
            failed.starts_with(&format!("blob {small}: ")) && failed.contains("over the limit"),
            "{failed}"
        );
        // Nothing past the frame's length was read.
        assert!(peer.inner.read <= 4, "{} bytes read", peer.inner.read);
    }

    #[test]
    fn a_slow_reader_is_answered_whole_and_a_stalled_one_frees_its_permit() {
        let (_dir, store, digest) = store_with(&noise(96 << 10, 7));
        let permits = Arc::new(Semaphore::new(MAX_SERVED_STREAMS));

        let mut slow = Paced::new(fetch_request(digest), 1024, Duration::from_millis(10));
        run(serve_stream(&mut slow, &store, &permits, WAIT)).expect("a slow reader is answered");
        let replies: Vec<CasReply> = unframed(&slow.written)
            .iter()
            .map(|frame| cas::decode_reply(frame).expect("decodes"))
            .collect();
        assert!(
            matches!(&replies[..], [CasReply::Blob { digest: d, .. }, CasReply::End] if *d == digest),
            "{} replies",
            replies.len()
        );

        let mut stalled = Paced::new(fetch_request(digest), 1024, Duration::from_millis(1));
        stalled.room = 4096;
        let started = Instant::now();
        let failed = run(serve_stream(&mut stalled, &store, &permits, WAIT))
            .expect_err("a reader that stopped reading is given up");
        assert!(failed.contains("nothing moved"), "{failed}");
        assert!(started.elapsed() < WAIT * 4, "{:?}", started.elapsed());
        assert_eq!(permits.available_permits(), MAX_SERVED_STREAMS);
    }
}
