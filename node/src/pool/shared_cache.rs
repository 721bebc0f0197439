//! The pool's shared cache: a bounded index of the cache entries peers announced by gossip
//! ([`CacheIndex`]), and [`NodeCache`], the node's side of the engine's `PoolCache` seam. A
//! lookup takes the key, then each fallback prefix, in order; for each it reads the index, and
//! when the index knows nothing asks connected peers directly (`CacheEntries`), so entries
//! saved before this node joined are found too. The first candidate whose tree can be fetched
//! wins: its holders (the announcer, the peers that listed it, and the DHT's providers of the
//! tree) serve the blobs through the store's transfer, which verifies each, drops a peer that
//! lies, and resumes what an earlier attempt left. The entry is then kept in this store, and
//! this node announces it and provides the tree in turn, so later fetches have more holders.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use protocol::Digest;
use protocol::cas::CacheEntry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::cas::PeerSource;
use super::swarm::SwarmCommand;
use super::view::PoolView;
use crate::engine::cache::{self, Entry, FindRequest, Found, PoolCache};
use crate::store::export::{Destination, Exported};
use crate::store::transfer::{self, BlobSource, BoxFuture};
use crate::store::{Store, gc};

/// Announcements the index keeps; the oldest heard is forgotten first.
pub const MAX_INDEX_ENTRIES: usize = 4096;
/// Connected peers asked directly when the index knows no entry.
const PEERS_ASKED: usize = 8;
/// How long asking peers for entries or the DHT for providers may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Candidates tried, per key or prefix, before giving up on it.
const CANDIDATES_TRIED: usize = 3;
/// Sources one transfer uses at most.
const MAX_SOURCES: usize = 8;

/// One announced entry and who holds it.
#[derive(Clone, Debug)]
struct Held {
    entry: CacheEntry,
    holders: Vec<PeerId>,
}

/// The cache entries heard of by gossip, by cache version (recomputed here from each entry's
/// own paths and platform), bounded to [`MAX_INDEX_ENTRIES`].
#[derive(Debug, Default)]
pub struct CacheIndex {
    by_version: HashMap<String, Vec<Held>>,
    /// (version, key) in the order first heard, for eviction.
    order: VecDeque<(String, String)>,
}

impl CacheIndex {
    /// `peer` says it saved `entry`.
    pub fn heard(&mut self, peer: PeerId, mut entry: CacheEntry) {
        entry.created_ms = entry.created_ms.min(cache::now_ms());
        let version = cache::version_for(&entry.paths, &entry.os, &entry.arch);
        let held = self.by_version.entry(version.clone()).or_default();
        if let Some(known) = held.iter_mut().find(|h| h.entry.key == entry.key) {
            // Entries are immutable, but two peers may each have saved one under a key: keep
            // the first tree heard, and add the peer as a holder only if it holds that tree.
            if known.entry.tree == entry.tree && !known.holders.contains(&peer) {
                known.holders.truncate(MAX_SOURCES - 1);
                known.holders.push(peer);
            }
            return;
        }
        held.push(Held {
            entry: entry.clone(),
            holders: vec![peer],
        });
        self.order.push_back((version, entry.key));
        while self.order.len() > MAX_INDEX_ENTRIES {
            let Some((version, key)) = self.order.pop_front() else {
                break;
            };
            if let Some(held) = self.by_version.get_mut(&version) {
                held.retain(|h| h.entry.key != key);
                if held.is_empty() {
                    self.by_version.remove(&version);
                }
            }
        }
    }

    /// The entries of `version` for `key` (`exact`), or whose keys start with it, newest first.
    fn candidates(&self, version: &str, key: &str, exact: bool) -> Vec<Held> {
        let mut found: Vec<Held> = self
            .by_version
            .get(version)
            .into_iter()
            .flatten()
            .filter(|h| {
                if exact {
                    h.entry.key == key
                } else {
                    h.entry.key.starts_with(key)
                }
            })
            .cloned()
            .collect();
        found.sort_by_key(|h| std::cmp::Reverse(h.entry.created_ms));
        found
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What fetching a tree from the pool did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TreeFetched {
    pub blobs: u64,
    pub transferred_bytes: u64,
    pub written_bytes: u64,
    /// Peers dropped from the transfer, with why.
    pub dropped: Vec<String>,
    /// What the node wrote into the folder it was asked to restore the tree into, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported: Option<Exported>,
    /// Why the node did not restore the tree into the folder it was asked to (it cannot write
    /// there): the tree is in the store, for the caller to export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_exported: Option<String>,
}

/// The node's shared cache: what `peerbuild run` asks through the control API.
pub struct NodeCache {
    pub me: PeerId,
    pub store: Arc<Store>,
    pub index: Arc<Mutex<CacheIndex>>,
    pub view: Arc<Mutex<PoolView>>,
    pub control: libp2p_stream::Control,
    pub commands: mpsc::Sender<SwarmCommand>,
}

impl NodeCache {
    fn source(&self, peer: PeerId) -> PeerSource {
        PeerSource {
            peer,
            control: self.control.clone(),
        }
    }

    /// Candidates for `key` from the index, else from connected peers asked directly.
    async fn candidates(&self, version: &str, key: &str, exact: bool) -> Vec<Held> {
        let known = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .candidates(version, key, exact);
        if !known.is_empty() {
            return known;
        }
        let asks = self
            .connected(PEERS_ASKED)
            .into_iter()
            .map(|peer| async move {
                let answer = tokio::time::timeout(
                    ASK_TIMEOUT,
                    self.source(peer).cache_entries(version, key),
                )
                .await;
                match answer {
                    Ok(Ok(entries)) => Some((peer, entries)),
                    Ok(Err(err)) => {
                        debug!(%peer, error = %err, "peer not asked for cache entries");
                        None
                    }
                    Err(_) => None,
                }
            });
        let mut index = CacheIndex::default();
        for (peer, entries) in futures::future::join_all(asks).await.into_iter().flatten() {
            for entry in entries {
                // An entry of another version is not what was asked: a lie or a bug; skip it.
                if cache::version_for(&entry.paths, &entry.os, &entry.arch) == version {
                    index.heard(peer, entry);
                }
            }
        }
        index.candidates(version, key, exact)
    }

    /// The DHT's providers of `tree`, bounded and within [`ASK_TIMEOUT`].
    async fn providers(&self, tree: Digest) -> Vec<PeerId> {
        let (reply, answer) = oneshot::channel();
        let command = SwarmCommand::FindProviders {
            digest: tree,
            reply,
        };
        if self.commands.send(command).await.is_err() {
            return Vec::new();
        }
        tokio::time::timeout(ASK_TIMEOUT, answer)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Up to `limit` connected peers but this node, pool members first.
    fn connected(&self, limit: usize) -> Vec<PeerId> {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected_peers(limit)
            .iter()
            .filter_map(|p| p.parse().ok())
            .filter(|p| *p != self.me)
            .collect()
    }

    /// Fetches `tree` from `peers` and the DHT's providers of it (at most [`MAX_SOURCES`] in
    /// all), as a root named `what`, writing no more than the store's budget and the disk's
    /// free space allow (see [`transfer::fetch_tree`]). Returns what the transfer did and the
    /// peers it used, the ones dropped for lying or failing left out.
    pub(crate) async fn fetch_from(
        &self,
        tree: Digest,
        peers: Vec<PeerId>,
        what: &str,
    ) -> Result<(transfer::Fetched, Vec<PeerId>), String> {
        let (fetched, peers, _) = self.transfer_from(tree, peers, what, None).await?;
        Ok((fetched, peers))
    }

    /// [`NodeCache::fetch_from`], the tree also restored into the folder `into` as it arrives
    /// (see [`transfer::fetch_tree_into`]) when given: then what was written (`None` without
    /// `into`), or why nothing was (this node cannot write there, or the export failed).
    async fn transfer_from(
        &self,
        tree: Digest,
        mut peers: Vec<PeerId>,
        what: &str,
        into: Option<PathBuf>,
    ) -> Result<(transfer::Fetched, Vec<PeerId>, Exporting), String> {
        for provider in self.providers(tree).await {
            if !peers.contains(&provider) {
                peers.push(provider);
            }
        }
        peers.retain(|p| *p != self.me);
        peers.truncate(MAX_SOURCES);
        if peers.is_empty() {
            return Err("no peer holds it".to_owned());
        }
        let (into, unwritable) = match destination(into).await {
            Ok(into) => (into, None),
            Err(why) => (None, Some(why)),
        };
        let sources: Vec<Arc<dyn BlobSource>> = peers
            .iter()
            .map(|p| Arc::new(self.source(*p)) as Arc<dyn BlobSource>)
            .collect();
        // A node has no `--store-max-size`: its store's budget is the environment's, or 20 GiB.
        let budget = gc::budget(None);
        let (fetched, exported) =
            transfer::fetch_tree_into(self.store.clone(), tree, sources, what, budget, into)
                .await
                .map_err(|e| e.to_string())?;
        let exported = match (unwritable, exported) {
            (Some(why), _) => Err(why),
            (None, None) => Ok(None),
            (None, Some(exported)) => exported
                .map(Some)
                .map_err(|why| format!("the tree could not be written there: {why}")),
        };
        for (source, why) in &fetched.dropped {
            info!(source = %source, reason = %why, "a peer was dropped from a transfer");
        }
        peers.retain(|p| {
            let name = self.source(*p).name();
            !fetched.dropped.iter().any(|(dropped, _)| *dropped == name)
        });
        Ok((fetched, peers, exported))
    }

    /// Fetches `held`'s tree from its holders and keeps the entry here; writes the tree into
    /// `into` as it arrives, when given and this node can write there.
    async fn fetch(&self, held: &Held, into: Option<PathBuf>) -> Result<Found, String> {
        let what = format!("cache `{}` (from the pool)", held.entry.key);
        let (fetched, peers, exported) = self
            .transfer_from(held.entry.tree, held.holders.clone(), &what, into)
            .await?;
        let exported = exported
            .map_err(|why| debug!(%why, "the asker exports the entry itself"))
            .ok()
            .flatten();
        let from = peers
            .first()
            .map_or_else(|| "the pool".to_owned(), PeerId::to_string);
        let entry = Entry::from_wire(&held.entry, &from);
        let store = self.store.clone();
        let adopted = entry.clone();
        tokio::task::spawn_blocking(move || cache::adopt(&store, &adopted))
            .await
            .map_err(|e| e.to_string())??;
        // This node holds the tree now: another holder for the next peer that wants it.
        let _ = self
            .commands
            .send(SwarmCommand::Announce(held.entry.clone()))
            .await;
        Ok(Found::Fetched {
            entry,
            peers: peers.iter().map(PeerId::to_string).collect(),
            transferred_bytes: fetched.transferred_bytes,
            blobs: fetched.blobs,
            dropped: dropped_reasons(&fetched),
            exported: exported.map(Box::new),
        })
    }

    /// Fetches the tree `digest` into this store from whichever peers hold it: the DHT's
    /// providers and the connected peers (each asked which of its blobs it has). With `into`
    /// (an absolute path), the tree is also restored there as it arrives, unless this node
    /// cannot write there (then `not_exported` says why, and the caller exports it).
    pub async fn fetch_tree(
        &self,
        digest: Digest,
        into: Option<PathBuf>,
    ) -> Result<TreeFetched, String> {
        let what = format!("tree {digest} (from the pool)");
        let (fetched, _, exported) = self
            .transfer_from(digest, self.connected(MAX_SOURCES), &what, into)
            .await?;
        let (exported, not_exported) = match exported {
            Ok(exported) => (exported, None),
            Err(why) => (None, Some(why)),
        };
        let _ = self.commands.send(SwarmCommand::Provide(digest)).await;
        Ok(TreeFetched {
            blobs: fetched.blobs,
            transferred_bytes: fetched.transferred_bytes,
            written_bytes: fetched.written_bytes,
            dropped: dropped_reasons(&fetched),
            exported,
            not_exported,
        })
    }

    async fn find_entry(&self, request: &FindRequest) -> Result<Found, String> {
        let version = cache::version(&request.paths);
        let asks = std::iter::once((request.key.as_str(), true))
            .chain(request.fallbacks.iter().map(|f| (f.as_str(), false)));
        let mut failures = Vec::new();
        for (key, exact) in asks {
            for held in self
                .candidates(&version, key, exact)
                .await
                .iter()
                .take(CANDIDATES_TRIED)
            {
                match self.fetch(held, request.into.clone()).await {
                    Ok(found) => return Ok(found),
                    Err(err) => failures.push(format!("`{}`: {err}", held.entry.key)),
                }
            }
        }
        let reason = if failures.is_empty() {
            "no peer has an entry for this key or its fallback prefixes".to_owned()
        } else {
            format!(
                "entries found could not be fetched ({})",
                failures.join("; ")
            )
        };
        Ok(Found::Nothing { reason })
    }
}

/// What a transfer restored into the folder it was given: `None` when it was given none; why
/// not, when this node cannot write there or the export failed (the tree is in the store).
type Exporting = Result<Option<Exported>, String>;

/// The folder `into` made ready for a tree to be restored into as it arrives; why not, when
/// this node cannot write there (the asker then exports the tree itself).
async fn destination(into: Option<PathBuf>) -> Result<Option<Destination>, String> {
    let Some(path) = into else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || {
        Destination::prepare(&path)
            .map(Some)
            .map_err(|e| format!("this node cannot restore the tree there: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// "PEER: why" for each peer a transfer dropped.
fn dropped_reasons(fetched: &transfer::Fetched) -> Vec<String> {
    fetched
        .dropped
        .iter()
        .map(|(source, why)| format!("{source}: {why}"))
        .collect()
}

impl PoolCache for NodeCache {
    fn find<'a>(&'a self, request: &'a FindRequest) -> BoxFuture<'a, Result<Found, String>> {
        Box::pin(self.find_entry(request))
    }

    fn announce<'a>(&'a self, entry: &'a Entry) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let wire = entry
                .to_wire()
                .ok_or_else(|| format!("the entry's tree `{}` is not a digest", entry.tree))?;
            // Only what this store really holds is announced: peers will ask for it.
            if !self.store.holds(&wire.tree) {
                return Err(format!(
                    "the entry's tree {} is not in this node's store",
                    wire.tree
                ));
            }
            self.commands
                .send(SwarmCommand::Announce(wire))
                .await
                .map_err(|_| "the node is stopping".to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, created_ms: u64) -> CacheEntry {
        CacheEntry {
            key: key.into(),
            paths: vec!["out/**/*".into()],
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            tree: Digest::of(key.as_bytes()),
            created_ms,
        }
    }

    #[test]
    fn the_index_finds_keys_then_prefixes_newest_first() {
        let mut index = CacheIndex::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        index.heard(a, entry("deps-1", 1));
        index.heard(b, entry("deps-2", 2));
        index.heard(b, entry("deps-1", 1));
        let version = cache::version(&["out/**/*".to_owned()]);
        let exact = index.candidates(&version, "deps-1", true);
        assert_eq!(exact.len(), 1);
        assert_eq!(exact[0].holders, vec![a, b]);
        let prefix: Vec<String> = index
            .candidates(&version, "deps-", false)
            .into_iter()
            .map(|h| h.entry.key)
            .collect();
        assert_eq!(prefix, ["deps-2", "deps-1"]);
        // Another set of paths or platform is another version: never a match.
        let other = cache::version(&["elsewhere/**/*".to_owned()]);
        assert!(index.candidates(&other, "deps-1", true).is_empty());
        let mut foreign = entry("deps-1", 3);
        foreign.arch = "sparc".into();
        index.heard(a, foreign);
        assert_eq!(index.candidates(&version, "deps-1", true).len(), 1);
    }

    #[test]
    fn a_second_tree_under_a_known_key_does_not_add_its_peer_as_a_holder() {
        let mut index = CacheIndex::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        index.heard(a, entry("k", 1));
        let mut other = entry("k", 2);
        other.tree = Digest::of(b"another tree");
        index.heard(b, other);
        let version = cache::version(&["out/**/*".to_owned()]);
        let found = index.candidates(&version, "k", true);
        assert_eq!(found[0].holders, vec![a]);
    }

    #[test]
    fn the_index_is_bounded_and_forgets_the_oldest() {
        let mut index = CacheIndex::default();
        let peer = PeerId::random();
        for i in 0..MAX_INDEX_ENTRIES + 10 {
            index.heard(peer, entry(&format!("k{i}"), i as u64));
        }
        assert_eq!(index.len(), MAX_INDEX_ENTRIES);
        let version = cache::version(&["out/**/*".to_owned()]);
        assert!(index.candidates(&version, "k0", true).is_empty());
        assert_eq!(
            index
                .candidates(&version, &format!("k{}", MAX_INDEX_ENTRIES + 9), true)
                .len(),
            1
        );
    }
}
