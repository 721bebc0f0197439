//! Store tests: random trees round-trip exactly; equal content gives equal digests; concurrent
//! imports of overlapping trees; an export that fails leaves nothing behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{Store, StoreError, export, import};

/// A small deterministic generator, so a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pb-storetest-{label}-{}-{}",
        std::process::id(),
        super::nanos()
    ));
    fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// Names that stress encodings: spaces, newlines, non-UTF-8 bytes, unicode, dots.
fn name(rng: &mut Rng) -> Vec<u8> {
    let pool: [&[u8]; 8] = [
        b"file",
        b"with space",
        b"new\nline",
        b"\xff\xfe-bytes",
        "ünï-çødé".as_bytes(),
        b".hidden",
        b"-dash",
        b"x",
    ];
    let mut name = pool[rng.below(pool.len() as u64) as usize].to_vec();
    name.extend_from_slice(format!("-{}", rng.below(1000)).as_bytes());
    name
}

fn content(rng: &mut Rng) -> Vec<u8> {
    let size = match rng.below(10) {
        0 => 0,
        1 => 300 * 1024 + rng.below(900 * 1024) as usize, // chunked
        _ => rng.below(4096) as usize,
    };
    let text = rng.below(2) == 0;
    (0..size)
        .map(|i| {
            if text {
                b"abc def\n"[i % 8]
            } else {
                rng.next() as u8
            }
        })
        .collect()
}

fn random_tree(rng: &mut Rng, dir: &Path, depth: u32) {
    for _ in 0..rng.below(6) + 1 {
        let path = dir.join(OsStr::from_bytes(&name(rng)));
        if path.symlink_metadata().is_ok() {
            continue;
        }
        match rng.below(10) {
            0..=5 => {
                fs::write(&path, content(rng)).expect("write");
                let mode = if rng.below(3) == 0 { 0o755 } else { 0o644 };
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            }
            6 => std::os::unix::fs::symlink("some/relative/target", &path).expect("symlink"),
            _ if depth < 3 => {
                fs::create_dir(&path).expect("mkdir");
                random_tree(rng, &path, depth + 1);
            }
            _ => fs::create_dir(&path).expect("empty folder"),
        }
    }
}

/// Every entry under `dir`: kind, executable bit, content or link target.
fn listing(dir: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, String>) {
        for entry in fs::read_dir(dir).expect("list").flatten() {
            let path = entry.path();
            let relative = path
                .strip_prefix(root)
                .expect("inside")
                .as_os_str()
                .as_bytes()
                .to_vec();
            let meta = path.symlink_metadata().expect("stat");
            let what = if meta.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&path).expect("readlink"))
            } else if meta.is_dir() {
                walk(root, &path, out);
                "dir".to_owned()
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                format!(
                    "file exec={exec} {}",
                    blake3::hash(&fs::read(&path).expect("read")).to_hex()
                )
            };
            out.insert(relative, what);
        }
    }
    walk(dir, dir, &mut out);
    out
}

#[test]
fn random_trees_round_trip_exactly() {
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let work = scratch("roundtrip");
        let source = work.join("source");
        fs::create_dir(&source).expect("mkdir");
        random_tree(&mut rng, &source, 0);
        let store = Store::open(&work.join("store")).expect("opens");
        let imported = import::import_dir(&store, &source, "test").expect("imports");
        let root = imported.root.expect("a root");
        let out = work.join("out");
        export::export(&store, &root, &out).expect("exports");
        assert_eq!(
            listing(&source),
            listing(&out),
            "seed {seed}: the export differs from the source"
        );
        let again = import::import_dir(&store, &out, "test").expect("imports the export");
        assert_eq!(
            again.root,
            Some(root),
            "seed {seed}: equal content gives an equal digest"
        );
        fs::remove_dir_all(&work).ok();
    }
}

#[test]
fn a_new_store_opened_by_many_at_once_opens_for_all() {
    let work = scratch("open-at-once");
    for round in 0..20 {
        let root = work.join(format!("store-{round}"));
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    start.wait();
                    Store::open(&root).expect("opens");
                });
            }
        });
    }
    fs::remove_dir_all(&work).ok();
}

#[test]
fn concurrent_imports_of_overlapping_trees_agree() {
    let work = scratch("concurrent");
    let mut rng = Rng(77);
    let a = work.join("a");
    fs::create_dir(&a).expect("mkdir");
    random_tree(&mut rng, &a, 0);
    let b = work.join("b");
    fs::create_dir(&b).expect("mkdir");
    fs::write(a.join("shared-big"), content(&mut Rng(5)).repeat(3)).expect("write");
    fs::copy(a.join("shared-big"), b.join("shared-big")).expect("copy");
    let store_path = work.join("store");
    let digests: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b, &a]
            .into_iter()
            .map(|dir| {
                let store_path = &store_path;
                scope.spawn(move || {
                    let store = Store::open(store_path).expect("opens");
                    import::import_dir(&store, dir, "test")
                        .expect("imports")
                        .root
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    assert_eq!(digests[0], digests[2]);
    let store = Store::open(&store_path).expect("opens");
    for (dir, digest) in [(&a, digests[0]), (&b, digests[1])] {
        let out = work.join(format!(
            "out-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        export::export(&store, &digest.expect("a root"), &out).expect("exports");
        assert_eq!(listing(dir), listing(&out));
    }
    fs::remove_dir_all(&work).ok();
}

#[test]
fn a_failed_export_leaves_no_half_written_folder() {
    let work = scratch("failedexport");
    let source = work.join("source");
    fs::create_dir_all(source.join("sub")).expect("mkdir");
    fs::write(source.join("sub/a"), b"a".repeat(1000)).expect("write");
    fs::write(source.join("b"), b"bbbb".repeat(1000)).expect("write");
    let store = Store::open(&work.join("store")).expect("opens");
    let root = import::import_dir(&store, &source, "test")
        .expect("imports")
        .root
        .expect("root");
    // Corrupt one file's object: the export must fail and leave nothing at the destination.
    let victim = protocol::Digest::of(&b"bbbb".repeat(1000));
    store.damage(&victim);
    let out = work.join("out");
    let err = export::export(&store, &root, &out).expect_err("corruption is caught");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(!out.exists(), "no half-written destination");
    let leftovers: Vec<_> = fs::read_dir(&work)
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "only source and store remain: {leftovers:?}"
    );
    fs::remove_dir_all(&work).ok();
}

/// A chunked file's chunks are checked through the whole file's digest, not one by one: a
/// corrupt chunk still fails the export, is named, and is set aside.
#[test]
fn a_corrupt_chunk_fails_the_export_and_is_set_aside() {
    let work = scratch("corruptchunk");
    let source = work.join("source");
    fs::create_dir_all(&source).expect("mkdir");
    let mut rng = Rng(7);
    let large: Vec<u8> = (0..3_000_000).map(|_| rng.next() as u8).collect();
    fs::write(source.join("large"), &large).expect("write");
    fs::write(source.join("small"), b"small").expect("write");
    let store = Store::open(&work.join("store")).expect("opens");
    let root = import::import_dir(&store, &source, "test")
        .expect("imports")
        .root
        .expect("root");
    let tree = protocol::tree::Tree::decode(&store.get(&root).expect("tree")).expect("decodes");
    let list = tree
        .entries()
        .iter()
        .find_map(|e| match e.kind {
            protocol::tree::EntryKind::File {
                chunks: Some(list), ..
            } => Some(list),
            _ => None,
        })
        .expect("the large file is chunked");
    let chunks =
        protocol::tree::decode_chunk_list(&store.get(&list).expect("list")).expect("decodes");
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    let victim = chunks[1];
    store.damage(&victim);
    let out = work.join("out");
    let err = export::export(&store, &root, &out).expect_err("corruption is caught");
    assert!(
        matches!(err, StoreError::Corrupt { .. }) && err.to_string().contains(&victim.to_string()),
        "{err}"
    );
    assert!(!out.exists(), "no half-written destination");
    assert!(!store.contains(&victim), "the corrupt chunk is set aside");
    // Imported again, the chunk is stored again and the export is whole.
    import::import_dir(&store, &source, "test").expect("imports again");
    export::export(&store, &root, &out).expect("exports");
    assert_eq!(fs::read(out.join("large")).expect("read"), large);
    fs::remove_dir_all(&work).ok();
}

/// A tree (from a peer, say) whose chunk list holds sound chunks that are not the file it
/// names is refused, though every chunk matches its own digest.
/// A tree of one chunked file whose chunks (`[1; 200,000]` and `[2; 200,000]`, both stored) do
/// not make the file it names (`claimed`); returns (root, claimed).
fn tree_with_wrong_chunks(store: &Store) -> (protocol::Digest, protocol::Digest) {
    use protocol::tree::{Entry, EntryKind, Tree, encode_chunk_list};
    let (a, _) = store.put(&[1u8; 200_000]).expect("puts");
    let (b, _) = store.put(&[2u8; 200_000]).expect("puts");
    let (list, _) = store.put(&encode_chunk_list(&[a, b])).expect("puts");
    let claimed = protocol::Digest::of(&[3u8; 400_000]);
    let tree = Tree::new(vec![Entry {
        name: b"f".to_vec(),
        kind: EntryKind::File {
            digest: claimed,
            executable: false,
            chunks: Some(list),
        },
    }])
    .expect("a tree");
    let (root, _) = store.put(&tree.encode()).expect("puts");
    (root, claimed)
}

#[test]
fn chunks_that_do_not_make_the_named_file_are_refused() {
    let work = scratch("wrongchunks");
    let store = Store::open(&work.join("store")).expect("opens");
    let (root, claimed) = tree_with_wrong_chunks(&store);
    let (a, b) = (
        protocol::Digest::of(&[1u8; 200_000]),
        protocol::Digest::of(&[2u8; 200_000]),
    );
    let out = work.join("out");
    let err = export::export(&store, &root, &out).expect_err("refused");
    assert!(
        matches!(err, StoreError::Corrupt { .. }) && err.to_string().contains(&claimed.to_string()),
        "{err}"
    );
    assert!(!out.exists(), "no half-written destination");
    assert!(
        store.contains(&a) && store.contains(&b),
        "sound chunks are kept"
    );
    fs::remove_dir_all(&work).ok();
}

#[test]
fn symlinks_pointing_outside_are_not_restored_and_devices_are_refused_on_import() {
    let work = scratch("escape");
    let source = work.join("source");
    fs::create_dir(&source).expect("mkdir");
    std::os::unix::fs::symlink("/etc/passwd", source.join("escape")).expect("symlink");
    let store = Store::open(&work.join("store")).expect("opens");
    let root = import::import_dir(&store, &source, "test")
        .expect("imports")
        .root
        .expect("root");
    let exported = export::export(&store, &root, &work.join("out")).expect("exports the rest");
    assert_eq!(exported.skipped_symlinks, 1);
    assert!(work.join("out").exists() && work.join("out/escape").symlink_metadata().is_err());

    // Links followed through each other: `d/x`'s text stays inside, but through `d/y` (the
    // root) it leads to the tree's grandparent.
    let chained = work.join("chained");
    fs::create_dir_all(chained.join("d/e")).expect("mkdir");
    std::os::unix::fs::symlink("..", chained.join("d/y")).expect("symlink");
    std::os::unix::fs::symlink("y/../..", chained.join("d/x")).expect("symlink");
    std::os::unix::fs::symlink("y/d/e", chained.join("d/z")).expect("symlink");
    let root = import::import_dir(&store, &chained, "test")
        .expect("imports")
        .root
        .expect("root");
    let out = work.join("chained-out");
    let exported = export::export(&store, &root, &out).expect("exports the rest");
    assert_eq!((exported.symlinks, exported.skipped_symlinks), (2, 1));
    assert!(out.join("d/x").symlink_metadata().is_err());
    assert_eq!(
        fs::read_link(out.join("d/y")).expect("kept"),
        Path::new("..")
    );
    assert!(out.join("d/z").is_dir(), "d/z leads to d/e through d/y");

    let fifo = work.join("withfifo");
    fs::create_dir(&fifo).expect("mkdir");
    let status = std::process::Command::new("mkfifo")
        .arg(fifo.join("pipe"))
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    let err = import::import_dir(&store, &fifo, "test").expect_err("refused");
    assert!(
        err.to_string()
            .contains("a device, socket or pipe cannot be stored"),
        "{err}"
    );
    fs::remove_dir_all(&work).ok();
}

#[test]
fn gc_keeps_the_budget_and_the_newest_roots() {
    let work = scratch("gc");
    let store = Store::open(&work.join("store")).expect("opens");
    let mut roots = Vec::new();
    for i in 0..3u8 {
        let dir = work.join(format!("t{i}"));
        fs::create_dir(&dir).expect("mkdir");
        let bytes: Vec<u8> = (0..200_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> (i + 3)) as u8)
            .collect();
        fs::write(dir.join("data"), bytes).expect("write");
        roots.push(
            import::import_dir(&store, &dir, "test")
                .expect("imports")
                .root
                .expect("root"),
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = store.stats().expect("stats");
    let collected = super::gc::collect(&store, before.stored_bytes / 2).expect("collects");
    assert!(collected.roots_removed >= 1);
    assert!(collected.stored_bytes_after <= before.stored_bytes / 2);
    let newest = roots[2];
    export::export(&store, &newest, &work.join("newest")).expect("the newest root survives");
    assert!(
        export::export(&store, &roots[0], &work.join("oldest")).is_err(),
        "the oldest root was dropped"
    );
    fs::remove_dir_all(&work).ok();
}

#[test]
fn pins_survive_gc_and_the_budget_check_waits_for_growth() {
    let work = scratch("pins");
    let store = Store::open(&work.join("store")).expect("opens");
    let mut roots = Vec::new();
    for i in 0..3u8 {
        let dir = work.join(format!("t{i}"));
        fs::create_dir(&dir).expect("mkdir");
        fs::write(
            dir.join("data"),
            content(&mut Rng(u64::from(i) + 11)).repeat(4),
        )
        .expect("write");
        roots.push(
            import::import_dir(&store, &dir, "test")
                .expect("imports")
                .root
                .expect("root"),
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    store.pin("keep-oldest", &[roots[0]]).expect("pins");
    super::gc::collect(&store, 1).expect("collects everything it may");
    export::export(&store, &roots[0], &work.join("pinned")).expect("the pinned tree survives");
    assert!(export::export(&store, &roots[1], &work.join("unpinned")).is_err());
    assert!(store.unpin("keep-oldest"));
    // Growth below a twentieth of the budget does not collect; past it, it does.
    assert!(
        super::gc::keep_within(&store, 1 << 30, 1024)
            .expect("checks")
            .is_none()
    );
    let collected = super::gc::keep_within(&store, 1, 1 << 30)
        .expect("checks")
        .expect("ran");
    assert!(collected.objects_removed > 0);
    fs::remove_dir_all(&work).ok();
}

#[test]
fn a_corrupt_object_is_set_aside_and_stored_again_by_the_next_import() {
    let work = scratch("heal");
    let source = work.join("source");
    fs::create_dir(&source).expect("mkdir");
    fs::write(source.join("f"), b"precious".repeat(100)).expect("write");
    let store = Store::open(&work.join("store")).expect("opens");
    let root = import::import_dir_once(&store, &source, "test")
        .expect("imports")
        .root
        .expect("root");
    let digest = protocol::Digest::of(&b"precious".repeat(100));
    store.damage(&digest);
    assert!(store.get(&digest).is_err(), "the torn object is caught");
    assert!(!store.contains(&digest), "and no longer counted as held");
    import::import_dir_once(&store, &source, "test").expect("imports again");
    export::export(&store, &root, &work.join("out")).expect("the tree is whole again");
    fs::remove_dir_all(&work).ok();
}

#[test]
fn gc_rewrites_packs_keeping_only_live_objects() {
    let work = scratch("repack");
    let store = Store::open(&work.join("store")).expect("opens");
    let mut roots = Vec::new();
    for tree in 0..3 {
        let dir = work.join(format!("t{tree}"));
        fs::create_dir(&dir).expect("mkdir");
        for file in 0..50 {
            // Every tree shares file 0; the rest are its own.
            let text = if file == 0 {
                "shared".to_owned()
            } else {
                format!("tree {tree} file {file}")
            };
            fs::write(dir.join(format!("f{file}")), text.repeat(20)).expect("write");
        }
        roots.push(
            import::import_dir(&store, &dir, "test")
                .expect("imports")
                .root
                .expect("root"),
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = store.stats().expect("stats");
    let collected = super::gc::collect(&store, before.stored_bytes * 2 / 3).expect("collects");
    assert!(
        collected.roots_removed >= 1 && collected.objects_removed >= 49,
        "{collected:?}"
    );
    let after = store.stats().expect("stats");
    assert!(after.objects < before.objects);
    for (i, root) in roots
        .iter()
        .enumerate()
        .skip(collected.roots_removed as usize)
    {
        let out = work.join(format!("out{i}"));
        export::export(&store, root, &out).expect("a kept tree is whole");
        assert_eq!(listing(&work.join(format!("t{i}"))), listing(&out));
    }
    // A fresh process sees the same: the rewritten packs are published.
    drop(store);
    let store = Store::open(&work.join("store")).expect("reopens");
    let last = roots[2];
    export::export(&store, &last, &work.join("again")).expect("reads the new packs");
    fs::remove_dir_all(&work).ok();
}

#[test]
fn threads_sharing_a_store_can_export_right_after_importing_overlapping_trees() {
    let work = scratch("shared-store");
    let source = work.join("source");
    fs::create_dir(&source).expect("mkdir");
    for file in 0..40 {
        fs::write(
            source.join(format!("f{file}")),
            format!("file {file}\n").repeat(30),
        )
        .expect("write");
    }
    let store = Store::open(&work.join("store")).expect("opens");
    for round in 0..15 {
        std::thread::scope(|scope| {
            for thread in 0..3 {
                let (store, source, work) = (&store, &source, &work);
                scope.spawn(move || {
                    let root = import::import_dir_once(store, source, "test")
                        .expect("imports")
                        .root
                        .expect("root");
                    let out = work.join(format!("out-{round}-{thread}"));
                    export::export(store, &root, &out).expect("every blob is readable at once");
                });
            }
        });
        // Fresh content each round, so the threads race on new blobs again.
        fs::write(source.join("f0"), format!("round {round}\n").repeat(30)).expect("write");
    }
    fs::remove_dir_all(&work).ok();
}

mod transfer {
    //! Fetching trees between stores: every blob verified, liars dropped and bypassed, an
    //! interrupted transfer resumed with only what is missing.

    use std::collections::HashSet;
    use std::sync::Arc;

    use protocol::Digest;
    use protocol::tree::{Entry as TreeEntry, EntryKind, Tree, encode_chunk_list};

    use super::*;
    use crate::store::export::{Destination, Exported};
    use crate::store::transfer::{
        BlobSource, BoxFuture, Fetched, StoreSource, StoredBlobs, TransferError, fetch_tree,
        fetch_tree_into, missing,
    };

    /// A source tree with small files, a chunked file (several chunks), links and folders,
    /// imported into a store of its own; returns (work dir, source folder, store, root).
    fn holder(seed: u64) -> (PathBuf, PathBuf, Arc<Store>, Digest) {
        holder_with(seed, |_, _| {})
    }

    /// [`holder`], with `more` written into the source folder before the import.
    fn holder_with(
        seed: u64,
        more: impl FnOnce(&Path, &mut Rng),
    ) -> (PathBuf, PathBuf, Arc<Store>, Digest) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let work = scratch("transfer");
        let source = work.join("source");
        fs::create_dir(&source).expect("mkdir");
        random_tree(&mut rng, &source, 0);
        let big: Vec<u8> = (0..3 << 20).map(|_| rng.next() as u8).collect();
        fs::write(source.join("big.bin"), big).expect("write");
        more(&source, &mut rng);
        let store = Arc::new(Store::open(&work.join("holder")).expect("opens"));
        let root = import::import_dir(&store, &source, "test")
            .expect("imports")
            .root
            .expect("a root");
        (work, source, store, root)
    }

    fn source(name: &str, store: &Arc<Store>) -> Arc<dyn BlobSource> {
        Arc::new(StoreSource {
            name: name.to_owned(),
            store: store.clone(),
        })
    }

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(future)
    }

    fn fetch(
        store: &Arc<Store>,
        root: Digest,
        sources: Vec<Arc<dyn BlobSource>>,
    ) -> Result<Fetched, TransferError> {
        fetch_within(store, root, sources, 1 << 30)
    }

    /// A fetch that may write at most `budget_bytes`.
    fn fetch_within(
        store: &Arc<Store>,
        root: Digest,
        sources: Vec<Arc<dyn BlobSource>>,
        budget_bytes: u64,
    ) -> Result<Fetched, TransferError> {
        run(fetch_tree(
            store.clone(),
            root,
            sources,
            "fetched",
            budget_bytes,
        ))
    }

    /// A restore into `out` as the blobs arrive.
    fn restore(
        store: &Arc<Store>,
        root: Digest,
        sources: Vec<Arc<dyn BlobSource>>,
        out: &Path,
    ) -> Result<(Fetched, Result<Exported, String>), TransferError> {
        let into = Destination::prepare(out).expect("prepares");
        let (fetched, exported) = run(fetch_tree_into(
            store.clone(),
            root,
            sources,
            "restored",
            1 << 30,
            Some(into),
        ))?;
        Ok((fetched, exported.expect("an export was asked for")))
    }

    /// Serves its store's blobs with one byte flipped in each.
    struct Liar(StoreSource);

    impl BlobSource for Liar {
        fn name(&self) -> String {
            self.0.name()
        }
        fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>> {
            self.0.has(digests)
        }
        fn fetch<'a>(
            &'a self,
            digests: &'a [Digest],
        ) -> BoxFuture<'a, Result<StoredBlobs, String>> {
            Box::pin(async move {
                let mut blobs = self.0.fetch(digests).await?;
                for (_, stored) in &mut blobs {
                    if let Some(last) = stored.last_mut() {
                        *last ^= 0x5a;
                    }
                }
                Ok(blobs)
            })
        }
    }

    /// Serves its store's blobs and writes down each batch asked for, in order; the fetches
    /// `fails` picks (by their number, from 0) fail instead, as over a broken connection.
    struct Scripted {
        inner: StoreSource,
        fails: Box<dyn Fn(usize) -> bool + Send + Sync>,
        batches: std::sync::Mutex<Vec<Vec<Digest>>>,
    }

    impl Scripted {
        fn new(
            name: &str,
            store: &Arc<Store>,
            fails: impl Fn(usize) -> bool + Send + Sync + 'static,
        ) -> Arc<Scripted> {
            Arc::new(Scripted {
                inner: StoreSource {
                    name: name.to_owned(),
                    store: store.clone(),
                },
                fails: Box::new(fails),
                batches: Default::default(),
            })
        }
    }

    impl BlobSource for Scripted {
        fn name(&self) -> String {
            self.inner.name()
        }
        fn has<'a>(&'a self, digests: &'a [Digest]) -> BoxFuture<'a, Result<Vec<bool>, String>> {
            self.inner.has(digests)
        }
        fn fetch<'a>(
            &'a self,
            digests: &'a [Digest],
        ) -> BoxFuture<'a, Result<StoredBlobs, String>> {
            let mut batches = self.batches.lock().unwrap();
            let number = batches.len();
            batches.push(digests.to_vec());
            if (self.fails)(number) {
                return Box::pin(async { Err("connection is closed".to_owned()) });
            }
            self.inner.fetch(digests)
        }
    }

    /// How many batches a whole fetch of `root` from `holder` asks for before its first batch
    /// of files and chunks (into a scratch store under `work`).
    fn listing_batches(work: &Path, holder: &Arc<Store>, root: Digest) -> usize {
        let listings = listings_of(holder, root);
        let recorder = Scripted::new("recorder", holder, |_| false);
        let count = Arc::new(Store::open(&work.join("count")).expect("opens"));
        fetch(&count, root, vec![recorder.clone()]).expect("fetches");
        let batches = recorder.batches.lock().unwrap();
        batches
            .iter()
            .filter(|b| b.iter().all(|d| listings.contains(d)))
            .count()
    }

    /// The trees and chunk lists of the tree `root` in `store`.
    fn listings_of(store: &Store, root: Digest) -> HashSet<Digest> {
        let mut listings = HashSet::from([root]);
        let mut trees = vec![root];
        while let Some(tree) = trees.pop() {
            let decoded = Tree::decode(&store.get(&tree).expect("reads")).expect("decodes");
            for entry in decoded.entries() {
                match &entry.kind {
                    EntryKind::Dir { digest } => {
                        listings.insert(*digest);
                        trees.push(*digest);
                    }
                    EntryKind::File {
                        chunks: Some(list), ..
                    } => {
                        listings.insert(*list);
                    }
                    _ => {}
                }
            }
        }
        listings
    }

    #[test]
    fn the_trees_and_chunk_lists_come_first_then_every_file_and_chunk_in_one_round() {
        let (work, _, holder, root) = holder(8);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let recorder = Scripted::new("peer-a", &holder, |_| false);
        let fetched = fetch(&receiver, root, vec![recorder.clone()]).expect("fetches");
        let listings = listings_of(&holder, root);
        let batches = recorder.batches.lock().unwrap().clone();
        // Batches of listings only, then batches of files and chunks only.
        let first_leaves = batches
            .iter()
            .position(|b| b.iter().all(|d| !listings.contains(d)))
            .expect("files were fetched");
        assert!(
            batches[..first_leaves]
                .iter()
                .all(|b| b.iter().all(|d| listings.contains(d)))
        );
        assert!(
            batches[first_leaves..]
                .iter()
                .all(|b| b.iter().all(|d| !listings.contains(d)))
        );
        // One round a level of listings, and one for every file and chunk.
        let depth = fetched.rounds - 1;
        assert!(depth >= 2, "{fetched:?}");
        assert_eq!(
            batches[..first_leaves].len() as u32,
            depth,
            "one batch a level: {fetched:?}"
        );
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_tree_fetched_from_a_peer_exports_exactly_and_a_second_fetch_moves_nothing() {
        let (work, source_dir, holder, root) = holder(5);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let fetched = fetch(&receiver, root, vec![source("peer-a", &holder)]).expect("fetches");
        assert!(fetched.blobs > 3, "{fetched:?}");
        assert!(fetched.dropped.is_empty(), "{fetched:?}");
        assert_eq!(missing(&receiver, &root).expect("walks"), Vec::new());
        let out = work.join("out");
        export::export(&receiver, &root, &out).expect("exports");
        assert_eq!(listing(&source_dir), listing(&out));
        let again = fetch(&receiver, root, vec![source("peer-a", &holder)]).expect("fetches");
        assert_eq!((again.blobs, again.rounds), (0, 0), "{again:?}");
        fs::remove_dir_all(&work).ok();
    }

    /// A restore written as the blobs arrive, with some of them here already, a liar among
    /// the peers, and large files whose chunks come from two peers in no set order, one of
    /// them with a chunk that repeats: the folder is the source exactly, and says what a
    /// plain export says.
    #[test]
    fn a_tree_restored_as_its_blobs_arrive_is_exact() {
        let (work, source_dir, holder, root) = holder_with(9, |source, rng| {
            let block: Vec<u8> = (0..700_000).map(|_| rng.next() as u8).collect();
            fs::write(source.join("repeats.bin"), block.repeat(4)).expect("write");
        });
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let partial = work.join("partial");
        fs::create_dir(&partial).expect("mkdir");
        fs::copy(source_dir.join("big.bin"), partial.join("big.bin")).expect("copies");
        import::import_dir_once(&receiver, &partial, "part of it").expect("imports");
        let liar = Arc::new(Liar(StoreSource {
            name: "liar".into(),
            store: holder.clone(),
        }));
        let sources = vec![liar, source("peer-a", &holder), source("peer-b", &holder)];
        let out = work.join("out");
        let (fetched, exported) = restore(&receiver, root, sources, &out).expect("restores");
        assert_eq!(fetched.dropped.len(), 1, "{fetched:?}");
        assert_eq!(listing(&source_dir), listing(&out));
        let plain = export::export(&receiver, &root, &work.join("plain")).expect("exports");
        assert_eq!(exported, Ok(plain));
        fs::remove_dir_all(&work).ok();
    }

    /// A restore whose only peer goes away once files are being written leaves no folder.
    #[test]
    fn a_restore_that_fails_leaves_no_folder() {
        // Files enough for several batches.
        let (work, _, holder, root) = holder_with(10, |source, rng| {
            let more: Vec<u8> = (0..20 << 20).map(|_| rng.next() as u8).collect();
            fs::write(source.join("more.bin"), more).expect("write");
        });
        let listing_batches = listing_batches(&work, &holder, root);
        // Every listing and one batch of files arrive; then the connection is gone for good.
        let flaky = Scripted::new("flaky", &holder, move |fetch| fetch > listing_batches);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let out = work.join("out");
        restore(&receiver, root, vec![flaky], &out).expect_err("the only peer went away");
        let mut left: Vec<_> = fs::read_dir(&work)
            .expect("lists")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["count", "holder", "receiver", "source"]);
        fs::remove_dir_all(&work).ok();
    }

    /// An export that cannot be written (its folder vanished as the files began to arrive)
    /// fails alone: the transfer goes on, the tree is in the store, and nothing is left where
    /// the export was to go, nor made again beside it.
    #[test]
    fn a_restore_whose_folder_cannot_be_written_still_fetches_the_tree() {
        let (work, _, holder, root) = holder(11);
        let listing_batches = listing_batches(&work, &holder, root);
        let parent = work.join("parent");
        fs::create_dir(&parent).expect("mkdir");
        let vanish_in = parent.clone();
        let source = Scripted::new("peer", &holder, move |fetch| {
            // The first batch of files: the export is planned, and its folder goes now.
            if fetch == listing_batches {
                for entry in fs::read_dir(&vanish_in).expect("lists").flatten() {
                    fs::remove_dir_all(entry.path()).ok();
                }
            }
            false
        });
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let out = parent.join("out");
        let (fetched, exported) = restore(&receiver, root, vec![source], &out).expect("fetches");
        assert!(fetched.blobs > 0, "{fetched:?}");
        let why = exported.expect_err("the export failed");
        assert!(why.contains("No such file"), "{why}");
        assert_eq!(missing(&receiver, &root).expect("walks"), Vec::new());
        assert_eq!(fs::read_dir(&parent).expect("lists").count(), 0);
        fs::remove_dir_all(&work).ok();
    }

    /// A peer's tree whose chunk list holds sound chunks that are not the file it names: the
    /// restore fails, though every chunk matched its own digest as it arrived.
    #[test]
    fn a_restore_refuses_chunks_that_do_not_make_the_named_file() {
        let work = scratch("restorewrongchunks");
        let holder = Arc::new(Store::open(&work.join("holder")).expect("opens"));
        let (root, claimed) = tree_with_wrong_chunks(&holder);
        holder.flush(1).expect("flushes");
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let out = work.join("out");
        let (_, exported) =
            restore(&receiver, root, vec![source("peer", &holder)], &out).expect("fetches");
        let why = exported.expect_err("the export is refused");
        assert!(
            why.contains(&claimed.to_string()) && why.contains("do not assemble"),
            "{why}"
        );
        assert!(!out.exists(), "no half-written destination");
        // The transfer itself was whole: the tree is in the store, for the asker to look at.
        assert_eq!(missing(&receiver, &root).expect("walks"), Vec::new());
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_lying_peer_is_dropped_and_its_blobs_come_from_another() {
        let (work, source_dir, holder, root) = holder(6);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let liar = Arc::new(Liar(StoreSource {
            name: "liar".into(),
            store: holder.clone(),
        }));
        let fetched =
            fetch(&receiver, root, vec![liar, source("honest", &holder)]).expect("fetches");
        assert_eq!(fetched.dropped.len(), 1, "{fetched:?}");
        assert_eq!(fetched.dropped[0].0, "liar");
        assert!(fetched.dropped[0].1.contains("bad blob"), "{fetched:?}");
        let out = work.join("out");
        export::export(&receiver, &root, &out).expect("exports");
        assert_eq!(listing(&source_dir), listing(&out));
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn an_interrupted_transfer_resumes_with_only_what_is_missing() {
        let (work, _, holder, root) = holder(7);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let total = {
            let scratch = Arc::new(Store::open(&work.join("count")).expect("opens"));
            fetch(&scratch, root, vec![source("peer", &holder)])
                .expect("fetches")
                .blobs
        };
        // Two batches, then its connection is gone for good.
        let flaky = Scripted::new("flaky", &holder, |fetch| fetch >= 2);
        let failed = fetch(&receiver, root, vec![flaky]).expect_err("the only peer went away");
        let message = failed.to_string();
        assert!(
            message.contains("no peer can send blob")
                && message.contains("flaky: connection is closed"),
            "{message}"
        );
        let resumed = fetch(&receiver, root, vec![source("peer", &holder)]).expect("resumes");
        assert!(
            resumed.blobs > 0 && resumed.blobs < total,
            "resumed {} of {total}",
            resumed.blobs
        );
        assert_eq!(missing(&receiver, &root).expect("walks"), Vec::new());
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_peer_whose_connection_breaks_for_a_moment_is_asked_again() {
        let (work, _, holder, root) = holder(5);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        // Its first three fetches fail: a connection that broke and is made again.
        let blip = Scripted::new("only-peer", &holder, |fetch| fetch < 3);
        let fetched = fetch(&receiver, root, vec![blip]).expect("the only peer came back");
        assert!(fetched.dropped.is_empty(), "{fetched:?}");
        assert_eq!(missing(&receiver, &root).expect("walks"), Vec::new());
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_blob_no_peer_holds_is_named() {
        let (work, _, _, root) = holder(8);
        let empty = Arc::new(Store::open(&work.join("empty")).expect("opens"));
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let failed =
            fetch(&receiver, root, vec![source("empty", &empty)]).expect_err("nobody has it");
        assert!(
            failed
                .to_string()
                .contains(&format!("no peer can send blob {root}")),
            "{failed}"
        );
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_tree_larger_than_the_transfer_may_write_is_refused_before_its_files_are_fetched() {
        // The holder's tree has a file of 3 MiB, and more.
        let (work, _, holder, root) = holder(10);
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let budget = 1 << 20;
        let failed = fetch_within(&receiver, root, vec![source("peer-a", &holder)], budget)
            .expect_err("more than the budget");
        let message = failed.to_string();
        assert!(
            matches!(failed, TransferError::OverLimit { .. })
                && message.contains(&format!("tree {root} needs more"))
                && message.contains("sent by peer-a"),
            "{message}"
        );
        let stats = receiver.stats().expect("stats");
        assert!(stats.logical_bytes <= budget, "{stats:?}");
        // The same tree fits a larger budget.
        fetch_within(&receiver, root, vec![source("peer-a", &holder)], 64 << 20).expect("fits");
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn a_chunk_list_that_does_not_add_up_to_its_file_is_refused_before_its_chunks() {
        let work = scratch("chunk-list");
        let liar = Arc::new(Store::open(&work.join("liar")).expect("opens"));
        let mut rng = Rng(11);
        let chunks: Vec<Digest> = (0..2)
            .map(|_| {
                let bytes: Vec<u8> = (0..256 << 10).map(|_| rng.next() as u8).collect();
                liar.put(&bytes).expect("stores").0
            })
            .collect();
        let (list, _) = liar.put(&encode_chunk_list(&chunks)).expect("stores");
        // A file of four bytes whose chunk list names half a megabyte.
        let tree = Tree::new(vec![TreeEntry {
            name: b"small.txt".to_vec(),
            kind: EntryKind::File {
                digest: Digest::of(b"tiny"),
                executable: false,
                chunks: Some(list),
            },
        }])
        .expect("a tree");
        let (root, _) = liar.put(&tree.encode()).expect("stores");
        liar.flush(1).expect("flushes");
        let receiver = Arc::new(Store::open(&work.join("receiver")).expect("opens"));
        let failed = fetch(&receiver, root, vec![source("liar", &liar)]).expect_err("a lying list");
        let message = failed.to_string();
        assert!(
            matches!(failed, TransferError::ChunksDisagree { .. })
                && message.contains(&format!("chunk list {list}, sent by liar"))
                && message.contains("the tree is refused"),
            "{message}"
        );
        assert!(chunks.iter().all(|c| !receiver.contains(c)));
        fs::remove_dir_all(&work).ok();
    }

    #[test]
    fn stored_bytes_that_do_not_match_their_digest_are_refused() {
        let (work, _, holder, root) = holder(9);
        let receiver = Store::open(&work.join("receiver")).expect("opens");
        let mut stored = holder.get_stored(&root).expect("stored form");
        assert!(matches!(
            receiver.put_stored(&root, &stored[..stored.len() - 1]),
            Err(StoreError::Corrupt { .. })
        ));
        let last = stored.len() - 1;
        stored[last] ^= 1;
        assert!(matches!(
            receiver.put_stored(&root, &stored),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!receiver.contains(&root));
        stored[last] ^= 1;
        assert!(receiver.put_stored(&root, &stored).expect("stores") > 0);
        assert_eq!(
            receiver.get(&root).expect("reads"),
            holder.get(&root).expect("reads")
        );
        fs::remove_dir_all(&work).ok();
    }
}

/// A large file (streamed in blocks) is cut where `fastcdc`'s own `StreamCDC` cuts it, so
/// its chunks and digests do not depend on how the import reads it; sizes at and around the
/// block size and a file ending in less than a chunk's minimum are the edges.
#[test]
fn large_files_are_cut_where_stream_cdc_cuts_them() {
    use super::{CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES};
    use protocol::Digest;
    use protocol::tree::{EntryKind, Tree, decode_chunk_list};
    let block = 4 * CHUNK_MAX_BYTES;
    let work = scratch("large-cuts");
    let store = Store::open(&work.join("store")).expect("opens");
    let mut rng = Rng(0x5eed_1a26e);
    for size in [block + 1, 2 * block + CHUNK_MIN_BYTES / 2, 3 * block] {
        let dir = work.join(format!("tree-{size}"));
        fs::create_dir_all(&dir).expect("mkdir");
        // Runs of random bytes and of text, so chunks vary in size and compress differently.
        let bytes: Vec<u8> = (0..size)
            .map(|i| {
                if (i >> 20) % 2 == 0 {
                    rng.next() as u8
                } else {
                    b"let x = 1;\n"[i % 11]
                }
            })
            .collect();
        fs::write(dir.join("large"), &bytes).expect("write");
        let expected: Vec<Digest> = fastcdc::v2020::StreamCDC::new(
            &bytes[..],
            CHUNK_MIN_BYTES,
            CHUNK_AVG_BYTES,
            CHUNK_MAX_BYTES,
        )
        .map(|chunk| Digest::of(&chunk.expect("in memory").data))
        .collect();
        let root = import::import_dir(&store, &dir, "test")
            .expect("imports")
            .root
            .expect("a root");
        let tree = Tree::decode(&store.get(&root).expect("tree")).expect("decodes");
        let EntryKind::File {
            digest,
            chunks: Some(list),
            ..
        } = &tree.entries()[0].kind
        else {
            panic!("size {size}: not stored in chunks");
        };
        assert_eq!(
            *digest,
            Digest::of(&bytes),
            "size {size}: the whole file's digest"
        );
        let stored = decode_chunk_list(&store.get(list).expect("list")).expect("decodes");
        assert_eq!(stored, expected, "size {size}: the chunks");
    }
    let _ = fs::remove_dir_all(&work);
}
