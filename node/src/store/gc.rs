//! Garbage collection: keeps the store under a size budget by dropping the least recently used
//! roots, then removes every object no remaining root reaches. It holds the store's lock
//! exclusively, so it never removes what a running import, export or build uses.

use std::collections::{HashMap, HashSet};

use protocol::Digest;
use protocol::tree::{EntryKind, Tree, decode_chunk_list};

use super::{Result, Store, StoreError};

/// What a collection did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Collected {
    pub roots_removed: u64,
    pub objects_removed: u64,
    pub bytes_freed: u64,
    pub stored_bytes_after: u64,
}

fn name(digest: &Digest) -> String {
    format!("{}-{}", digest.hex(), digest.size())
}

/// The objects a tree reaches, adding to `out`; trees already in `seen` are not read again. A
/// missing object is skipped (there is nothing to keep), but any other failure to read a tree
/// stops the collection: guessing would delete what a live tree still needs.
fn reachable(
    store: &Store,
    tree: &Digest,
    seen: &mut HashSet<Digest>,
    out: &mut Vec<Digest>,
) -> Result<()> {
    if !seen.insert(*tree) {
        return Ok(());
    }
    out.push(*tree);
    let bytes = match store.get(tree) {
        Ok(bytes) => bytes,
        Err(StoreError::Missing { .. } | StoreError::Corrupt { .. }) => return Ok(()),
        Err(err) => return Err(err),
    };
    let tree = Tree::decode(&bytes)?;
    for entry in tree.entries() {
        match &entry.kind {
            EntryKind::Dir { digest } => reachable(store, digest, seen, out)?,
            EntryKind::File {
                digest,
                chunks: None,
                ..
            } => out.push(*digest),
            EntryKind::File {
                chunks: Some(list), ..
            } => {
                out.push(*list);
                match store.get(list) {
                    Ok(bytes) => out.extend(decode_chunk_list(&bytes)?),
                    Err(StoreError::Missing { .. } | StoreError::Corrupt { .. }) => {}
                    Err(err) => return Err(err),
                }
            }
            EntryKind::Symlink { .. } => {}
        }
    }
    Ok(())
}

/// Every blob of the tree `root` this store holds (trees, files, chunk lists, chunks), each
/// once: what another store needs to hold the whole tree.
pub fn blobs_of(store: &Store, root: &Digest) -> Result<Vec<Digest>> {
    let mut blobs = Vec::new();
    reachable(store, root, &mut HashSet::new(), &mut blobs)?;
    let mut seen = HashSet::new();
    blobs.retain(|digest| seen.insert(*digest));
    Ok(blobs)
}

/// [`reachable`], by object name.
fn reachable_names(store: &Store, tree: &Digest, out: &mut Vec<String>) -> Result<()> {
    let mut digests = Vec::new();
    reachable(store, tree, &mut HashSet::new(), &mut digests)?;
    out.extend(digests.iter().map(name));
    Ok(())
}

/// The bytes of all files a tree holds (duplicates counted each time), memoized by tree.
pub fn tree_file_bytes(
    store: &Store,
    tree: &Digest,
    memo: &mut HashMap<Digest, u64>,
) -> Result<u64> {
    if let Some(bytes) = memo.get(tree) {
        return Ok(*bytes);
    }
    let decoded = Tree::decode(&store.get(tree)?)?;
    let mut total = 0;
    for entry in decoded.entries() {
        total += match &entry.kind {
            EntryKind::Dir { digest } => tree_file_bytes(store, digest, memo)?,
            EntryKind::File { digest, .. } => digest.size(),
            EntryKind::Symlink { .. } => 0,
        };
    }
    memo.insert(*tree, total);
    Ok(total)
}

/// Drops least recently used roots until what the rest reach fits in `max_stored_bytes`, then
/// removes every object no root reaches.
pub fn collect(store: &Store, max_stored_bytes: u64) -> Result<Collected> {
    let _lock = store.lock_exclusive()?;
    collect_locked(store, max_stored_bytes)
}

/// The store's size budget: `explicit` (`--store-max-size`), else `$PEERBUILD_STORE_MAX_SIZE`,
/// else 20 GiB.
pub fn budget(explicit: Option<u64>) -> u64 {
    explicit
        .or_else(|| {
            std::env::var("PEERBUILD_STORE_MAX_SIZE")
                .ok()
                .and_then(|v| crate::cli::parse_size(&v).ok())
        })
        .unwrap_or(20 << 30)
}

/// After a build: when the store has grown by a twentieth of its budget since the last check,
/// collects down to the budget, unless another process is using the store (it is tried again
/// after a later build). Returns what it collected, if it ran.
pub fn keep_within(
    store: &Store,
    max_stored_bytes: u64,
    grown_bytes: u64,
) -> Result<Option<Collected>> {
    let path = store.root().join("grown-since-gc");
    let grown = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_add(grown_bytes);
    if grown < max_stored_bytes / 20 {
        let _ = std::fs::write(&path, grown.to_string());
        return Ok(None);
    }
    let Some(_lock) = store.try_lock_exclusive()? else {
        let _ = std::fs::write(&path, grown.to_string());
        return Ok(None);
    };
    let collected = collect_locked(store, max_stored_bytes)?;
    let _ = std::fs::write(&path, "0");
    Ok(Some(collected))
}

fn collect_locked(store: &Store, max_stored_bytes: u64) -> Result<Collected> {
    let objects = store.list_objects()?;
    let stored: HashMap<&str, u64> = objects.iter().map(|(n, _, s)| (n.as_str(), *s)).collect();
    let mut roots = store.list_roots()?;
    roots.sort_by_key(|(_, used)| *used);
    let mut refcount: HashMap<String, u64> = HashMap::new();
    let mut per_root = Vec::new();
    for (root, _) in &roots {
        let mut names = Vec::new();
        reachable_names(store, root, &mut names)?;
        names.sort();
        names.dedup();
        for n in &names {
            *refcount.entry(n.clone()).or_default() += 1;
        }
        per_root.push(names);
    }
    // Pinned trees are never dropped: count them as roots that cannot be removed.
    let pinned = store.pinned();
    let mut pinned_names = Vec::new();
    for tree in &pinned {
        reachable_names(store, tree, &mut pinned_names)?;
    }
    for n in pinned_names {
        *refcount.entry(n).or_default() += 1;
    }
    let mut live: u64 = refcount.keys().filter_map(|n| stored.get(n.as_str())).sum();
    let mut collected = Collected::default();
    for ((root, _), names) in roots.iter().zip(&per_root) {
        if live <= max_stored_bytes {
            break;
        }
        if pinned.contains(root) {
            continue;
        }
        for n in names {
            if let Some(count) = refcount.get_mut(n) {
                *count -= 1;
                if *count == 0 {
                    live -= stored.get(n.as_str()).copied().unwrap_or(0);
                }
            }
        }
        store.remove_root(root);
        collected.roots_removed += 1;
    }
    for (object, _, _) in &objects {
        if refcount.get(object).copied().unwrap_or(0) == 0 {
            let freed = store.remove_object(object);
            if freed > 0 {
                collected.bytes_freed += freed;
                collected.objects_removed += 1;
            }
        }
    }
    // Packed objects cannot be removed one by one: packs holding dead ones are rewritten.
    let alive: HashSet<Digest> = refcount
        .iter()
        .filter(|(_, count)| **count > 0)
        .filter_map(|(name, _)| name.replacen('-', "/", 1).parse().ok())
        .collect();
    let (removed, freed) = store.repack(&alive)?;
    collected.objects_removed += removed;
    collected.bytes_freed += freed;
    collected.stored_bytes_after = live;
    remove_orphaned_cache_entries(store);
    Ok(collected)
}

/// Removes buildspec cache entries whose tree is gone, so a key whose tree was collected can be
/// saved again instead of being "already there" for ever.
fn remove_orphaned_cache_entries(store: &Store) {
    let Ok(versions) = std::fs::read_dir(store.root().join("cache")) else {
        return;
    };
    for version in versions.flatten() {
        let Ok(entries) = std::fs::read_dir(version.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let tree = std::fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .and_then(|json| json["tree"].as_str()?.parse::<Digest>().ok());
            if !tree.is_some_and(|tree| store.contains(&tree)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
