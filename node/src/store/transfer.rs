//! Fetching a tree's blobs from peers: the store side of cache sharing (issue 6).
//!
//! A transfer works in rounds. Each round lists what the tree still lacks here ([`missing`]:
//! the blobs reachable through the trees and chunk lists already held, so a tree's contents are
//! asked for once the tree itself has arrived), asks every source which of those it holds,
//! spreads the blobs over their holders (trees and chunk lists first, in rounds of their own;
//! then every file and chunk in one round), and fetches them in bounded batches
//! ([`MAX_BATCH_BLOBS`], [`MAX_BATCH_BYTES`]), several batches per source at once. Every blob
//! travels as stored (already compressed) and is verified against its digest before it is
//! stored ([`Store::put_stored`]); a source that sends a bad blob, leaves out one it claimed to
//! hold, or fails, is dropped for the rest of the transfer and its blobs go to other holders in
//! the next round. Nothing is kept in memory between rounds but digests: a transfer that is
//! interrupted resumes, next time, with only what is still missing.
//!
//! A transfer writes no more than it may: the digests say what every blob weighs, so each
//! round counts what the tree still needs (a chunked file whose chunk list has not arrived
//! counted whole) before asking for any of it, and refuses the tree once that passes the
//! transfer's limit (the store's budget, and nine tenths of the disk's free space), naming the
//! tree or chunk list that listed too much and the peer that sent it. A chunk list must add up
//! to its file's size. Each blob is checked against its own digest on arrival (the pool's
//! reader refuses a frame larger than the blob due, the store one that does not match it).
//!
//! The sources are behind [`BlobSource`], the seam the pool's blob protocol plugs into;
//! [`StoreSource`] serves a local store, as a peer answers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::Digest;
use protocol::tree::{EntryKind, Tree, decode_chunk_list};

use super::export::{Arriving, Destination, Exported};
use super::{Store, StoreError};

/// The batch and question sizes are the blob protocol's own limits (`protocol::cas`), so a
/// batch always fits one request.
pub use protocol::cas::{
    MAX_BLOB_BYTES, MAX_FETCH_BYTES as MAX_BATCH_BYTES, MAX_FETCH_DIGESTS as MAX_BATCH_BLOBS,
    MAX_HAS_DIGESTS as MAX_QUERY_DIGESTS,
};
/// Requests in flight to one source at once.
const IN_FLIGHT_PER_SOURCE: usize = 4;
/// How long a `Has` question may take before its source is dropped for the transfer. A fetch
/// has no such limit: a big batch from a slow source takes as long as it needs, and the source
/// gives up itself once nothing moves (the pool's `PeerSource`).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A boxed future, so [`BlobSource`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Blobs in their stored form, each with its digest: what a fetch returns.
pub type StoredBlobs = Vec<(Digest, Vec<u8>)>;

/// Somewhere blobs can be fetched from: a peer, through the pool's blob protocol.
pub trait BlobSource: Send + Sync {
    /// Who it is, for messages.
    fn name(&self) -> String;
    /// Which of `digests` it holds (one answer each, in order).
    fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>>;
    /// The stored form of each of `digests` it holds (see [`Store::get_stored`]). The transfer
    /// waits as long as a fetch takes: a source bounds its own waits, failing when it stalls
    /// rather than when it is slow.
    fn fetch<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<StoredBlobs, String>>;
}

/// Serves the blobs of a local store, as a peer answers the blob protocol.
pub struct StoreSource {
    pub name: String,
    pub store: Arc<Store>,
}

impl BlobSource for StoreSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>> {
        Box::pin(async move {
            self.store.refresh();
            Ok(digests.iter().map(|d| self.store.contains(d)).collect())
        })
    }

    fn fetch<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<StoredBlobs, String>> {
        let store = self.store.clone();
        let digests = digests.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut found = Vec::with_capacity(digests.len());
                for digest in digests {
                    match store.get_stored(&digest) {
                        Ok(stored) => found.push((digest, stored)),
                        Err(StoreError::Missing { .. }) => {}
                        Err(err) => return Err(err.to_string()),
                    }
                }
                Ok(found)
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

/// What a transfer did.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Blobs fetched and stored.
    pub blobs: u64,
    /// Bytes that travelled (as stored, mostly compressed).
    pub transferred_bytes: u64,
    /// Bytes newly written to the store.
    pub written_bytes: u64,
    pub rounds: u32,
    /// Sources dropped during the transfer, with why.
    pub dropped: Vec<(String, String)>,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no peer can send blob {digest}{}", dropped_note(.dropped))]
    Unavailable {
        digest: Digest,
        dropped: Vec<(String, String)>,
    },
    #[error("blob {digest} is {} bytes, more than a transfer accepts ({MAX_BLOB_BYTES})", .digest.size())]
    TooLarge { digest: Digest },
    #[error("the transfer stopped making progress with {left} blobs still missing")]
    Stalled { left: usize },
    #[error(
        "tree {root} needs more than this transfer may write ({limit_bytes} bytes: the store's budget and nine tenths of the disk's free space): {listed_by}, sent by {peer}, brings it to {needed_bytes} bytes"
    )]
    OverLimit {
        root: Digest,
        /// The tree or chunk list whose entries passed the limit.
        listed_by: Digest,
        peer: String,
        needed_bytes: u64,
        limit_bytes: u64,
    },
    #[error(
        "chunk list {list}, sent by {peer}, adds up to {chunk_bytes} bytes for file {file}; the tree is refused"
    )]
    ChunksDisagree {
        list: Digest,
        file: Digest,
        peer: String,
        chunk_bytes: u64,
    },
}

fn dropped_note(dropped: &[(String, String)]) -> String {
    if dropped.is_empty() {
        return String::new();
    }
    let list: Vec<String> = dropped
        .iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect();
    format!(" (dropped: {})", list.join("; "))
}

/// The blobs of the tree `root` this store lacks, as far as the trees and chunk lists it holds
/// tell: `root` itself if it is missing; else every missing subtree, file, chunk list and chunk
/// under the trees present.
pub fn missing(store: &Store, root: &Digest) -> Result<Vec<Digest>, TransferError> {
    let budget = Budget {
        limit_bytes: u64::MAX,
        done_bytes: 0,
    };
    Ok(plan(store, root, budget, &Senders::default())?.missing)
}

/// What a transfer may write, and what it has written so far (at the digests' sizes).
#[derive(Clone, Copy, Debug)]
struct Budget {
    limit_bytes: u64,
    done_bytes: u64,
}

/// One round's view of the tree: what is missing, and which of it lists more (trees and chunk
/// lists), so whoever sends those is remembered.
#[derive(Default)]
struct Plan {
    missing: Vec<Digest>,
    listings: HashSet<Digest>,
}

/// Who sent each tree and chunk list of this transfer, to name the peer when one of them
/// asks for too much.
#[derive(Default)]
struct Senders {
    by_digest: Mutex<HashMap<Digest, String>>,
    /// The sources, for a root nobody has sent yet.
    asked: String,
}

impl Senders {
    fn sent(&self, digest: Digest, source: String) {
        self.by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, source);
    }

    fn name(&self, digest: &Digest, root: &Digest) -> String {
        let known = self
            .by_digest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned();
        match known {
            Some(source) => source,
            None if digest == root => format!("the peers asked ({})", self.asked),
            None => "this store (it was here before the transfer)".to_owned(),
        }
    }
}

/// The walk behind [`plan`].
struct Walk<'a> {
    store: &'a Store,
    root: Digest,
    budget: Budget,
    senders: &'a Senders,
    seen: HashSet<Digest>,
    needed_bytes: u64,
    plan: Plan,
}

/// What the walk found of one blob.
#[derive(PartialEq)]
enum Found {
    /// Here, and seen for the first time: its own entries are to be walked.
    Here,
    /// Missing: it is planned.
    Missing,
    /// Seen before.
    Seen,
}

impl Walk<'_> {
    /// Looks for `digest`, listed by `listing`. A missing blob is planned, at `bytes`, and
    /// refused if that takes the transfer past its limit.
    fn find(
        &mut self,
        digest: Digest,
        listing: Digest,
        bytes: u64,
    ) -> Result<Found, TransferError> {
        if !self.seen.insert(digest) {
            return Ok(Found::Seen);
        }
        if self.store.contains(&digest) {
            return Ok(Found::Here);
        }
        self.plan.missing.push(digest);
        self.needed_bytes = self.needed_bytes.saturating_add(bytes);
        let total = self.budget.done_bytes.saturating_add(self.needed_bytes);
        if total > self.budget.limit_bytes {
            return Err(TransferError::OverLimit {
                root: self.root,
                listed_by: listing,
                peer: self.senders.name(&listing, &self.root),
                needed_bytes: total,
                limit_bytes: self.budget.limit_bytes,
            });
        }
        Ok(Found::Missing)
    }

    /// Looks for a tree or chunk list: a missing one is also remembered as a listing, so
    /// whoever sends it is known.
    fn find_listing(
        &mut self,
        digest: Digest,
        listing: Digest,
        bytes: u64,
    ) -> Result<Found, TransferError> {
        let found = self.find(digest, listing, bytes)?;
        if found == Found::Missing {
            self.plan.listings.insert(digest);
        }
        Ok(found)
    }
}

/// Walks the tree `root` as far as this store holds it (see [`missing`]), counting what is
/// missing at the sizes its digests give, a chunked file whose chunk list is missing counted
/// whole. Refuses the tree when that would take the transfer past its limit, or when a chunk
/// list does not add up to its file.
fn plan(
    store: &Store,
    root: &Digest,
    budget: Budget,
    senders: &Senders,
) -> Result<Plan, TransferError> {
    // What other processes stored since is counted once, not looked for blob by blob.
    store.refresh();
    let mut walk = Walk {
        store,
        root: *root,
        budget,
        senders,
        seen: HashSet::new(),
        needed_bytes: 0,
        plan: Plan::default(),
    };
    if walk.find_listing(*root, *root, root.size())? != Found::Here {
        return Ok(walk.plan);
    }
    let mut trees = vec![*root];
    while let Some(tree) = trees.pop() {
        let decoded = Tree::decode(&store.get(&tree)?).map_err(StoreError::from)?;
        for entry in decoded.entries() {
            match &entry.kind {
                EntryKind::Dir { digest } => {
                    if walk.find_listing(*digest, tree, digest.size())? == Found::Here {
                        trees.push(*digest);
                    }
                }
                EntryKind::File {
                    digest: file,
                    chunks: Some(list),
                    ..
                } => {
                    let whole = list.size().saturating_add(file.size());
                    if walk.find_listing(*list, tree, whole)? == Found::Here {
                        let chunks =
                            decode_chunk_list(&store.get(list)?).map_err(StoreError::from)?;
                        let chunk_bytes = chunks
                            .iter()
                            .fold(0u64, |sum, chunk| sum.saturating_add(chunk.size()));
                        if chunk_bytes != file.size() {
                            return Err(TransferError::ChunksDisagree {
                                list: *list,
                                file: *file,
                                peer: senders.name(list, root),
                                chunk_bytes,
                            });
                        }
                        for chunk in chunks {
                            walk.find(chunk, *list, chunk.size())?;
                        }
                    }
                }
                EntryKind::File {
                    digest,
                    chunks: None,
                    ..
                } => {
                    walk.find(*digest, tree, digest.size())?;
                }
                EntryKind::Symlink { .. } => {}
            }
        }
    }
    Ok(walk.plan)
}

/// The most one transfer may write: `budget_bytes` (the store's size budget: a tree larger
/// than the whole store could never be kept, gc would drop it or everything else), and nine
/// tenths of the free space on the store's disk (the rest stays for builds and the machine).
fn limit_bytes(store: &Store, budget_bytes: u64) -> Result<u64, StoreError> {
    let path = store.root();
    let text = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| StoreError::io(path, std::io::Error::other(e)))?;
    // SAFETY: statvfs fills the struct it is given from a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(text.as_ptr(), &mut stat) } < 0 {
        return Err(StoreError::io(path, std::io::Error::last_os_error()));
    }
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    Ok(budget_bytes.min(free - free / 10))
}

/// How many failed fetches (a broken connection, a stream that stalled) a source is forgiven
/// within one transfer before it is dropped: the next round asks it again.
const FORGIVEN_FAILURES: u64 = 3;
/// The pause before a round that follows a failed fetch, so a broken connection can be made
/// again.
const AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(500);

/// One source during a transfer.
struct Source {
    source: Arc<dyn BlobSource>,
    dropped: AtomicBool,
    why: Mutex<Option<String>>,
    /// Rounds in which its fetches failed (not for a bad blob): past [`FORGIVEN_FAILURES`],
    /// it is dropped.
    failures: AtomicU64,
    /// Why a fetch failed in this round, if one did.
    failed_now: Mutex<Option<String>>,
}

impl Source {
    /// A fetch failed without the source sending anything wrong: the source is asked again
    /// in the next round (its other fetches in flight may fail too: one round, one failure).
    fn failed(&self, why: String) {
        tracing::debug!(source = %self.source.name(), %why, "a fetch failed");
        self.failed_now
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    /// At a round's end: whether a fetch failed in it; the source is dropped if that was one
    /// failure too many.
    fn count_failure(&self) -> bool {
        let Some(why) = self
            .failed_now
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return false;
        };
        if self.failures.fetch_add(1, Ordering::SeqCst) + 1 > FORGIVEN_FAILURES {
            self.drop_for(format!("{why} (after {FORGIVEN_FAILURES} failed rounds)"));
        }
        true
    }

    fn drop_for(&self, why: String) {
        if !self.dropped.swap(true, Ordering::SeqCst) {
            *self.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }

    fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Counters shared by a round's workers.
#[derive(Default)]
struct Totals {
    blobs: AtomicU64,
    /// Bytes fetched, at the sizes the digests give (what the limit counts).
    fetched: AtomicU64,
    transferred: AtomicU64,
    written: AtomicU64,
    senders: Senders,
}

/// Fetches every blob of the tree `root` this store lacks from `sources`, verifying each, then
/// keeps the tree (a root named `what`). Writes at most `budget_bytes` (the store's size
/// budget), and no more than nine tenths of the disk's free space.
pub async fn fetch_tree(
    store: Arc<Store>,
    root: Digest,
    sources: Vec<Arc<dyn BlobSource>>,
    what: &str,
    budget_bytes: u64,
) -> Result<Fetched, TransferError> {
    let (fetched, _) = fetch(store, root, sources, what, budget_bytes, &mut None).await?;
    Ok(fetched)
}

/// [`fetch_tree`], and the tree exported into `into`, when given, as its blobs arrive (a
/// restore; then what was written, or why nothing was): each
/// file and chunk is written there the moment it is verified, from the bytes decoded to verify
/// it ([`Arriving`]); what the store held already is written from the store at the end. The
/// export is renamed into place once whole, after the store keeps the tree. An export that
/// fails (a full disk there, a chunk list that does not make its file) does not fail the
/// transfer: its error says why, nothing is left at `into`, and the tree is in the store.
/// Dropped before it ends, it stops writing at its next folder or blob, renames nothing into
/// place, and what it wrote is removed.
pub async fn fetch_tree_into(
    store: Arc<Store>,
    root: Digest,
    sources: Vec<Arc<dyn BlobSource>>,
    what: &str,
    budget_bytes: u64,
    into: Option<Destination>,
) -> Result<(Fetched, Option<Result<Exported, String>>), TransferError> {
    let mut into = Unused(into);
    let fetched = fetch(store, root, sources, what, budget_bytes, &mut into.0).await;
    // A transfer that failed leaves its export unused: it is gone before the answer.
    if let Some(removing) = into.remove() {
        let _ = removing.await;
    }
    fetched
}

/// An export not used yet: removed on a blocking thread (a second or so for a large partial
/// tree), never on the runtime's, whether the transfer failed or its future was dropped.
struct Unused(Option<Destination>);

impl Unused {
    /// Starts removing the export, if there is one and a runtime to remove it on (else it is
    /// removed here and now).
    fn remove(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let unused = self.0.take()?;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Some(runtime.spawn_blocking(move || drop(unused))),
            Err(_) => None,
        }
    }
}

impl Drop for Unused {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Sets its flag when dropped: a transfer's future dropped before it ended stops its export.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn fetch(
    store: Arc<Store>,
    root: Digest,
    sources: Vec<Arc<dyn BlobSource>>,
    what: &str,
    budget_bytes: u64,
    into: &mut Option<Destination>,
) -> Result<(Fetched, Option<Result<Exported, String>>), TransferError> {
    let lock_store = store.clone();
    // gc never removes what a running transfer has stored but not yet made a root.
    let _lock = tokio::task::spawn_blocking(move || lock_store.lock_shared())
        .await
        .map_err(|e| StoreError::Refused {
            path: store.root().to_owned(),
            reason: e.to_string(),
        })??;
    let sources: Vec<Arc<Source>> = sources
        .into_iter()
        .map(|source| {
            Arc::new(Source {
                source,
                dropped: AtomicBool::new(false),
                why: Mutex::new(None),
                failures: AtomicU64::new(0),
                failed_now: Mutex::new(None),
            })
        })
        .collect();
    let limit_bytes = limit_bytes(&store, budget_bytes)?;
    let names: Vec<String> = sources.iter().map(|s| s.source.name()).collect();
    let totals = Arc::new(Totals {
        senders: Senders {
            asked: names.join(", "),
            ..Senders::default()
        },
        ..Totals::default()
    });
    // The export written as the blobs arrive once it is planned, or why it could not be (the
    // transfer goes on).
    let mut export: Option<Result<Arc<Arriving>, String>> = None;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_when_dropped = StopOnDrop(stop.clone());
    let mut rounds = 0;
    loop {
        let (walk_store, walk_totals) = (store.clone(), totals.clone());
        let budget = Budget {
            limit_bytes,
            done_bytes: totals.fetched.load(Ordering::Relaxed),
        };
        let Plan {
            mut missing,
            listings,
        } = tokio::task::spawn_blocking(move || {
            plan(&walk_store, &root, budget, &walk_totals.senders)
        })
        .await
        .map_err(|e| StoreError::Refused {
            path: store.root().to_owned(),
            reason: e.to_string(),
        })??;
        // Once every tree and chunk list is here, the export is planned; the files and chunks
        // still missing are written into it as they arrive.
        if listings.is_empty()
            && export.is_none()
            && let Some(into) = into.as_ref()
        {
            let folder = into.folder().to_owned();
            let (plan_store, stop) = (store.clone(), stop.clone());
            let planned = tokio::task::spawn_blocking(move || {
                Arriving::plan(&plan_store, &root, &folder, stop)
            })
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Refused {
                    path: into.folder().to_owned(),
                    reason: e.to_string(),
                })
            });
            tracing::debug!(round = rounds, "the export is planned");
            export = Some(planned.map(Arc::new).map_err(|err| err.to_string()));
        }
        if missing.is_empty() {
            break;
        }
        // Trees and chunk lists come first, in rounds of their own (they are small, so those
        // rounds are quick); the files and chunks they list then come in one round, all
        // batches of it flowing at once, rather than each round waiting for its slowest.
        // The plan counted everything against the limit already.
        if !listings.is_empty() {
            missing.retain(|digest| listings.contains(digest));
        }
        if let Some(digest) = missing.iter().find(|d| d.size() > MAX_BLOB_BYTES) {
            return Err(TransferError::TooLarge { digest: *digest });
        }
        rounds += 1;
        let before = totals.blobs.load(Ordering::Relaxed);
        let dropped_before = sources.iter().filter(|s| s.is_dropped()).count();
        let started = std::time::Instant::now();
        let queues = assign(&sources, &missing).await?;
        let asked = started.elapsed();
        let round = Round {
            listings: Arc::new(listings),
            arriving: export.as_ref().and_then(|e| e.as_ref().ok()).cloned(),
        };
        run_round(&store, &sources, queues, &totals, &round).await?;
        tracing::debug!(
            round = rounds,
            missing = missing.len(),
            asked_ms = asked.as_millis() as u64,
            round_ms = started.elapsed().as_millis() as u64,
            "a transfer round"
        );
        let progressed = totals.blobs.load(Ordering::Relaxed) > before;
        let mut failed = false;
        for source in &sources {
            failed |= source.count_failure();
        }
        let found_out = sources.iter().filter(|s| s.is_dropped()).count() > dropped_before;
        if failed && !found_out {
            // A fetch failed (a connection broke): ask again, after a moment.
            tracing::debug!(round = rounds, "a fetch failed; the next round asks again");
            tokio::time::sleep(AFTER_FAILURE).await;
            continue;
        }
        // Nothing arrived and no source was found out: asking again would not help.
        if !progressed && !found_out {
            return Err(TransferError::Stalled {
                left: missing.len(),
            });
        }
    }
    let written = totals.written.load(Ordering::Relaxed);
    let flush_store = store.clone();
    let what = what.to_owned();
    // Every round's writers are done by now: the export is this transfer's alone.
    let export = export.map(|e| {
        e.and_then(|a| Arc::try_unwrap(a).map_err(|_| "the export is still being written".into()))
    });
    let stopped = stop.clone();
    let into = into.take();
    let exported = tokio::task::spawn_blocking(move || {
        flush_store.flush(written)?;
        flush_store.add_root(&root, &what)?;
        let Some(into) = into else {
            return Ok(None);
        };
        tracing::debug!("the store keeps the tree; finishing the export");
        let given_up = || stopped.load(Ordering::Relaxed);
        if given_up() {
            return Ok(Some(Err("the restore was given up".into())));
        }
        // Planned in the first round with every listing here, which every transfer reaches.
        let exported = export
            .unwrap_or_else(|| Err("the export was never planned".into()))
            .and_then(|arriving| arriving.finish(&flush_store));
        // Nobody waits for it any more (the request was dropped): it is not put in place, and
        // dropping `into` removes it.
        if given_up() {
            return Ok(Some(Err("the restore was given up".into())));
        }
        let exported = exported.and_then(|exported| {
            into.commit().map_err(|e| e.to_string())?;
            Ok(exported)
        });
        Ok::<_, StoreError>(Some(exported))
    })
    .await
    .map_err(|e| StoreError::Refused {
        path: store.root().to_owned(),
        reason: e.to_string(),
    })??;
    let fetched = Fetched {
        blobs: totals.blobs.load(Ordering::Relaxed),
        transferred_bytes: totals.transferred.load(Ordering::Relaxed),
        written_bytes: written,
        rounds,
        dropped: dropped(&sources),
    };
    Ok((fetched, exported))
}

/// What a round's fetches share besides the totals.
#[derive(Clone)]
struct Round {
    /// The trees and chunk lists asked for (whoever sends one is remembered).
    listings: Arc<HashSet<Digest>>,
    /// The export written as blobs arrive, if any.
    arriving: Option<Arc<Arriving>>,
}

fn dropped(sources: &[Arc<Source>]) -> Vec<(String, String)> {
    sources
        .iter()
        .filter(|s| s.is_dropped())
        .map(|s| {
            let why = s.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (s.source.name(), why.unwrap_or_default())
        })
        .collect()
}

/// Asks the live sources which of `missing` they hold and spreads the blobs over their holders
/// (each blob to one holder, holders taken in turn), as batches per source.
async fn assign(
    sources: &[Arc<Source>],
    missing: &[Digest],
) -> Result<Vec<VecDeque<Vec<Digest>>>, TransferError> {
    let mut holders: HashMap<Digest, Vec<usize>> = HashMap::new();
    for (index, source) in sources.iter().enumerate() {
        if source.is_dropped() {
            continue;
        }
        for part in missing.chunks(MAX_QUERY_DIGESTS) {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, source.source.has(part))
                .await
                .unwrap_or_else(|_| Err("it did not answer in time".to_owned()));
            match answer {
                Ok(answers) if answers.len() == part.len() => {
                    for (digest, held) in part.iter().zip(answers) {
                        if held {
                            holders.entry(*digest).or_default().push(index);
                        }
                    }
                }
                Ok(answers) => {
                    source.drop_for(format!(
                        "answered {} of {} questions",
                        answers.len(),
                        part.len()
                    ));
                    break;
                }
                Err(err) => {
                    source.drop_for(err);
                    break;
                }
            }
        }
    }
    let mut per_source: Vec<Vec<Digest>> = vec![Vec::new(); sources.len()];
    for (turn, digest) in missing.iter().enumerate() {
        let live: Vec<usize> = holders
            .get(digest)
            .map(|h| {
                h.iter()
                    .copied()
                    .filter(|i| !sources[*i].is_dropped())
                    .collect()
            })
            .unwrap_or_default();
        let Some(&chosen) = live.get(turn % live.len().max(1)) else {
            return Err(TransferError::Unavailable {
                digest: *digest,
                dropped: dropped(sources),
            });
        };
        per_source[chosen].push(*digest);
    }
    Ok(per_source.into_iter().map(batches).collect())
}

/// Cuts a list of blobs into requests of at most [`MAX_BATCH_BLOBS`] and [`MAX_BATCH_BYTES`].
fn batches(digests: Vec<Digest>) -> VecDeque<Vec<Digest>> {
    let mut out = VecDeque::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for digest in digests {
        if !current.is_empty()
            && (current.len() == MAX_BATCH_BLOBS || bytes + digest.size() > MAX_BATCH_BYTES)
        {
            out.push_back(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += digest.size();
        current.push(digest);
    }
    if !current.is_empty() {
        out.push_back(current);
    }
    out
}

/// Fetches every source's batches, [`IN_FLIGHT_PER_SOURCE`] at a time per source. A source's
/// fault drops the source; a local one (a full disk) ends the round with its error.
async fn run_round(
    store: &Arc<Store>,
    sources: &[Arc<Source>],
    queues: Vec<VecDeque<Vec<Digest>>>,
    totals: &Arc<Totals>,
    round: &Round,
) -> Result<(), StoreError> {
    let local_error: Arc<Mutex<Option<StoreError>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for (source, queue) in sources.iter().zip(queues) {
        if queue.is_empty() {
            continue;
        }
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..IN_FLIGHT_PER_SOURCE {
            let (store, source, queue, totals, local_error) = (
                store.clone(),
                source.clone(),
                queue.clone(),
                totals.clone(),
                local_error.clone(),
            );
            let round = round.clone();
            workers.spawn(async move {
                loop {
                    let failed = local_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some();
                    if failed || source.is_dropped() {
                        return;
                    }
                    let Some(batch) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
                    else {
                        return;
                    };
                    match fetch_batch(&store, &source, batch, &totals, &round).await {
                        Ok(()) => {}
                        Err(Fault::Source(why)) => source.drop_for(why),
                        Err(Fault::Unreachable(why)) => {
                            source.failed(why);
                            // This worker stops; what the source's workers leave undone
                            // waits for the next round.
                            return;
                        }
                        Err(Fault::Local(err)) => {
                            local_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(err);
                        }
                    }
                }
            });
        }
    }
    while let Some(done) = workers.join_next().await {
        if let Err(err) = done
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
    }
    let failed = local_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Whose fault a failed batch is.
enum Fault {
    /// The source's: it is dropped for the rest of the transfer.
    Source(String),
    /// The fetch failed without the source sending anything wrong (the connection broke, it
    /// stalled): it is asked again next round, a few times.
    Unreachable(String),
    /// This node's (a full disk): the transfer ends.
    Local(StoreError),
}

/// Fetches one batch and stores each blob once it is verified.
async fn fetch_batch(
    store: &Arc<Store>,
    source: &Arc<Source>,
    batch: Vec<Digest>,
    totals: &Arc<Totals>,
    round: &Round,
) -> Result<(), Fault> {
    let received = source
        .source
        .fetch(&batch)
        .await
        .map_err(Fault::Unreachable)?;
    let asked: HashSet<Digest> = batch.iter().copied().collect();
    let mut got = HashSet::new();
    for (digest, _) in &received {
        if !asked.contains(digest) || !got.insert(*digest) {
            return Err(Fault::Source(format!(
                "it sent blob {digest}, which was not asked for"
            )));
        }
    }
    // The whole batch is verified and stored on one blocking thread: one hand-over a batch,
    // not one a blob.
    let (put_store, put_source, put_totals, put_listings, arriving) = (
        store.clone(),
        source.clone(),
        totals.clone(),
        round.listings.clone(),
        round.arriving.clone(),
    );
    tokio::task::spawn_blocking(move || {
        for (digest, stored) in received {
            let export = |bytes: &[u8]| {
                if let Some(arriving) = &arriving {
                    arriving.write(&digest, bytes);
                }
            };
            match put_store.put_stored_then(&digest, &stored, export) {
                Ok(written) => {
                    if put_listings.contains(&digest) {
                        put_totals.senders.sent(digest, put_source.source.name());
                    }
                    put_totals.blobs.fetch_add(1, Ordering::Relaxed);
                    put_totals
                        .fetched
                        .fetch_add(digest.size(), Ordering::Relaxed);
                    put_totals
                        .transferred
                        .fetch_add(stored.len() as u64, Ordering::Relaxed);
                    put_totals.written.fetch_add(written, Ordering::Relaxed);
                }
                Err(err @ StoreError::Corrupt { .. }) => {
                    return Err(Fault::Source(format!("it sent a bad blob: {err}")));
                }
                Err(err) => return Err(Fault::Local(err)),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| {
        Fault::Local(StoreError::Refused {
            path: store.root().to_owned(),
            reason: e.to_string(),
        })
    })??;
    if let Some(left_out) = batch.iter().find(|d| !got.contains(d)) {
        return Err(Fault::Source(format!(
            "it said it held blob {left_out}, then did not send it"
        )));
    }
    Ok(())
}
