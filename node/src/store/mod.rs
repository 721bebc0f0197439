//! The content-addressed store: every blob (a small file, a chunk of a large one, a chunk list,
//! an encoded tree) kept once under its BLAKE3 digest, zstd-compressed where that saves space
//! and raw where it does not, and verified against its digest on every read.
//!
//! Layout under `DATA_DIR/store/`:
//! - `FORMAT`: the store's format version; a store of another version is refused, not misread.
//! - `objects/ab/HASH-SIZE`: one file a blob: a kind byte (0 raw, 1 zstd), then the bytes.
//! - `roots/HASH-SIZE`: the trees kept alive (imports, sources, artifacts, caches); the file's
//!   modification time is its last use, for least-recently-used eviction; its text says what it is.
//! - `tmp/PID-N/`: files being written by one process, renamed into `objects/` when complete.
//! - `statcache/`: per imported folder, what each file's stat looked like when it was hashed.
//! - `lock`: imports and exports hold it shared, `gc` exclusive, so gc never removes what a
//!   running import or build is using.
//!
//! Durability: objects are written to a temporary file and renamed, so a torn object is never
//! visible; an import syncs the file system once (`syncfs`) before it publishes its root, not
//! once per object. Each object's writeback is started as soon as it is written
//! (`start_writeback`), so the disk works while the import computes and that one sync is
//! short; only the sync promises anything.

pub mod export;
pub mod gc;
pub mod import;
mod pack;
mod parallel;
mod statcache;
#[cfg(test)]
mod tests;
pub mod transfer;

use std::cell::RefCell;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::Digest;
use protocol::tree::TreeError;

/// The on-disk format this code reads and writes.
pub const STORE_FORMAT: &str = "peerbuild-store 1";

/// FastCDC parameters (the Bazel Remote Execution API's): min, average, max chunk size.
pub const CHUNK_MIN_BYTES: usize = 128 * 1024;
pub const CHUNK_AVG_BYTES: usize = 512 * 1024;
pub const CHUNK_MAX_BYTES: usize = 2 * 1024 * 1024;

/// zstd level: fast enough that compressing costs less than writing the bytes.
const ZSTD_LEVEL: i32 = 1;

const KIND_RAW: u8 = 0;
const KIND_ZSTD: u8 = 1;

/// Errors a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("the store has no blob {digest}")]
    Missing { digest: Digest },
    #[error("the stored blob {digest} is corrupt ({detail}); it was not used")]
    Corrupt { digest: Digest, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store at {path} has format `{found}`; this peerbuild reads `{STORE_FORMAT}`")]
    Format { path: PathBuf, found: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An open store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    objects: PathBuf,
    /// This process's folder for files being written.
    tmp: PathBuf,
    counter: AtomicU64,
    /// Bytes this process has hashed into or read out of the store, for progress displays.
    pub progress: AtomicU64,
    /// Bytes this process has newly written into the store, for the size budget.
    pub written: AtomicU64,
    packs: pack::Packs,
    /// Held from sealing the open pack until it is published. An import can skip a blob that
    /// another thread's open pack holds; a read of it that misses waits here for that pack to
    /// be published, instead of finding nothing in between.
    publishing: std::sync::Mutex<()>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, removing temporary files that processes
    /// which no longer exist left behind.
    pub fn open(root: &Path) -> Result<Store> {
        for dir in ["objects", "roots", "tmp", "statcache", "pins", "packs"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|e| StoreError::io(&path, e))?;
        }
        // This store's own folder for files being written: named by the process (which
        // `clean_dead_temporaries` spares while it lives), and unique within it.
        static OPENED: AtomicU64 = AtomicU64::new(0);
        let tmp = root.join("tmp").join(format!(
            "{}-{}-{}",
            std::process::id(),
            nanos(),
            OPENED.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        check_format(root, &tmp).inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })?;
        clean_dead_temporaries(&root.join("tmp"));
        clean_dead_pins(&root.join("pins"));
        Ok(Store {
            root: root.to_owned(),
            objects: root.join("objects"),
            tmp,
            counter: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            written: AtomicU64::new(0),
            packs: pack::Packs::new(root.join("packs")),
            publishing: std::sync::Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.objects
            .join(&hex[..2])
            .join(format!("{hex}-{}", digest.size()))
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        // The pack index is in memory; ask it before the file system.
        self.packs.contains(digest)
            || self
                .object_path(digest)
                .symlink_metadata()
                .is_ok_and(|m| m.len() > 0)
    }

    /// Reads the indexes of packs other processes published (or removed) since this one looked,
    /// when the pack folder changed. [`Store::contains`] does not look again by itself, which
    /// is fine for deduplicating writes but not for answers others act on (a peer's "do you
    /// hold it", a cache lookup, what a transfer still lacks): call this once before such a
    /// batch of `contains`, or ask [`Store::holds`] for a single answer.
    pub fn refresh(&self) {
        self.packs.refresh();
    }

    /// Whether the store holds `digest`, counting packs other processes published since this
    /// one looked (see [`Store::refresh`]).
    pub fn holds(&self, digest: &Digest) -> bool {
        self.contains(digest) || {
            self.refresh();
            self.contains(digest)
        }
    }

    /// Stores `bytes`; returns their digest and how many bytes were newly written (0 when the
    /// store already held them).
    pub fn put(&self, bytes: &[u8]) -> Result<(Digest, u64)> {
        let digest = Digest::of(bytes);
        let written = self.put_with_digest(digest, bytes)?;
        Ok((digest, written))
    }

    /// Stores bytes whose digest the caller computed.
    pub(crate) fn put_with_digest(&self, digest: Digest, bytes: &[u8]) -> Result<u64> {
        self.progress
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        // A valid object has at least its kind byte: an empty file is what a crash can leave
        // behind a rename, and is written again.
        if self.contains(&digest) {
            return Ok(0);
        }
        let compressed = compress(bytes);
        let (kind, payload) = match &compressed {
            // Keep the compressed form only where it saves at least 3%.
            Some(c) if (c.len() as u64) * 100 < (bytes.len() as u64) * 97 => {
                (KIND_ZSTD, c.as_slice())
            }
            _ => (KIND_RAW, bytes),
        };
        self.write_object(digest, kind, payload)
    }

    /// Writes an object of `kind`: into this process's pack when small, else a loose file
    /// written to a temporary file and renamed into place.
    fn write_object(&self, digest: Digest, kind: u8, payload: &[u8]) -> Result<u64> {
        let path = self.object_path(&digest);
        if payload.len() < pack::PACK_OBJECT_MAX_BYTES {
            if !self.packs.append(&self.tmp, digest, kind, payload)? {
                return Ok(0);
            }
            let written = payload.len() as u64 + 1;
            self.written.fetch_add(written, Ordering::Relaxed);
            return Ok(written);
        }
        let temporary = self
            .tmp
            .join(self.counter.fetch_add(1, Ordering::Relaxed).to_string());
        let mut file = fs::File::create(&temporary).map_err(|e| StoreError::io(&temporary, e))?;
        file.write_all(&[kind])
            .and_then(|()| file.write_all(payload))
            .map_err(|e| {
                let _ = fs::remove_file(&temporary);
                StoreError::io(&temporary, e)
            })?;
        start_writeback(&file, 0, 0);
        drop(file);
        // Two writers of the same blob both rename identical bytes into place; either wins.
        if let Err(err) = fs::rename(&temporary, &path) {
            let parent = path.parent().unwrap_or(&self.objects);
            if err.kind() == std::io::ErrorKind::NotFound && fs::create_dir_all(parent).is_ok() {
                fs::rename(&temporary, &path).map_err(|e| StoreError::io(&path, e))?;
            } else {
                let _ = fs::remove_file(&temporary);
                return Err(StoreError::io(&path, err));
            }
        }
        let written = payload.len() as u64 + 1;
        self.written.fetch_add(written, Ordering::Relaxed);
        Ok(written)
    }

    /// Reads a blob, verified against its digest: a mismatch is an error naming the digest,
    /// never wrong bytes.
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.get_blob(digest).map(Blob::into_vec)
    }

    /// Reads a blob, verified, without copying raw bytes out of the buffer they were read into.
    fn get_blob(&self, digest: &Digest) -> Result<Blob> {
        let path = self.object_path(digest);
        match fs::read(&path) {
            Ok(stored) => self.verify(digest, stored, || self.quarantine(&path)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => self.get_packed(digest),
            Err(err) => Err(StoreError::io(&path, err)),
        }
    }

    /// Reads a packed blob, verified.
    fn get_packed(&self, digest: &Digest) -> Result<Blob> {
        let (stored, location) = self.read_packed(digest)?;
        self.verify(digest, stored, || {
            if let Some(location) = &location {
                self.packs.drop_entry(digest, location);
            }
        })
    }

    /// Starts a run of many reads (an export): published packs are opened once for the whole
    /// run rather than once a read. Hold the store's lock while it lives, so gc does not
    /// rewrite the packs it has open.
    pub(crate) fn reader(&self) -> Reader<'_> {
        Reader {
            store: self,
            packs: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// Reads a packed blob as stored: from the pack this process is writing (no location), or
    /// a published pack (whose index is read again once on a miss, as another process or gc
    /// may have written it).
    fn read_packed(&self, digest: &Digest) -> Result<(Vec<u8>, Option<pack::Location>)> {
        if let Some(stored) = self.packs.read_pending(digest) {
            return Ok((stored?, None));
        }
        for attempt in 0..2 {
            if attempt == 1 {
                // Wait for a pack being published by another thread of this process, then
                // look again (another process may also have published one since).
                drop(self.publishing.lock().unwrap_or_else(|e| e.into_inner()));
                self.packs.load();
            }
            let Some(location) = self.packs.locate(digest) else {
                continue;
            };
            match self.packs.read(&location) {
                Ok(stored) => return Ok((stored, Some(location))),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(StoreError::io(&self.root.join("packs"), err)),
            }
        }
        Err(StoreError::Missing { digest: *digest })
    }

    /// A blob as it is stored (its kind byte, then its raw or compressed bytes), as peers send
    /// it to each other: not verified here, since the receiver verifies it anyway.
    pub fn get_stored(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.object_path(digest);
        match fs::read(&path) {
            Ok(stored) => Ok(stored),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Ok(self.read_packed(digest)?.0)
            }
            Err(err) => Err(StoreError::io(&path, err)),
        }
    }

    /// Stores a blob received as stored (see [`Store::get_stored`]) once it decodes to bytes
    /// that match `digest`; returns how many bytes were newly written. Bad bytes are an error
    /// naming the digest, and nothing is stored.
    pub fn put_stored(&self, digest: &Digest, stored: &[u8]) -> Result<u64> {
        self.put_stored_then(digest, stored, |_| {})
    }

    /// [`Store::put_stored`], then `then` with the blob's bytes, decoded and verified (an
    /// export written while its blobs arrive). Not called when the store held the blob
    /// already: those bytes were not decoded.
    pub fn put_stored_then(
        &self,
        digest: &Digest,
        stored: &[u8],
        then: impl FnOnce(&[u8]),
    ) -> Result<u64> {
        if stored.len() as u64
            > digest
                .size()
                .saturating_add(protocol::cas::MAX_STORED_OVERHEAD)
        {
            return Err(StoreError::Corrupt {
                digest: *digest,
                detail: format!(
                    "{} stored bytes for a blob of {} bytes",
                    stored.len(),
                    digest.size()
                ),
            });
        }
        if self.contains(digest) {
            return Ok(0);
        }
        let decoded = self.check_stored(digest, stored)?;
        let (kind, payload) = stored
            .split_first()
            .map(|(kind, payload)| (*kind, payload))
            .unwrap_or((KIND_RAW, &[]));
        let written = self.write_object(*digest, kind, payload)?;
        then(decoded.bytes());
        Ok(written)
    }

    /// Decodes stored bytes and checks them against the digest; on a mismatch `set_aside`
    /// makes the store stop claiming the blob.
    fn verify(&self, digest: &Digest, stored: Vec<u8>, set_aside: impl Fn()) -> Result<Blob> {
        let corrupt = |detail: String| {
            set_aside();
            StoreError::Corrupt {
                digest: *digest,
                detail,
            }
        };
        let blob = Blob::decode(digest, stored).map_err(corrupt)?;
        if blake3::hash(&blob).as_bytes() != digest.hash() {
            return Err(corrupt(MISMATCH.into()));
        }
        self.progress
            .fetch_add(blob.len() as u64, Ordering::Relaxed);
        Ok(blob)
    }

    /// Checks bytes received as stored against their digest; returns them decoded.
    fn check_stored<'a>(&self, digest: &Digest, stored: &'a [u8]) -> Result<Decoded<'a>> {
        let corrupt = |detail: String| StoreError::Corrupt {
            digest: *digest,
            detail,
        };
        let decoded = decode(digest, stored).map_err(corrupt)?;
        if blake3::hash(decoded.bytes()).as_bytes() != digest.hash() {
            return Err(corrupt(MISMATCH.into()));
        }
        self.progress.fetch_add(digest.size(), Ordering::Relaxed);
        Ok(decoded)
    }

    /// Moves a corrupt object aside (into `corrupt/`, for inspection), so the store no longer
    /// claims to hold it and the next import that has its bytes stores them again.
    fn quarantine(&self, path: &Path) {
        let dir = self.root.join("corrupt");
        if fs::create_dir_all(&dir).is_ok()
            && let Some(name) = path.file_name()
        {
            let _ = fs::rename(path, dir.join(name));
        }
    }

    /// Makes everything written so far durable and visible: the open pack is sealed, the file
    /// system synced once (when `new_bytes` is not zero), then the pack published.
    pub fn flush(&self, new_bytes: u64) -> Result<()> {
        let _publishing = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let sealed = self.packs.seal(&self.tmp)?;
        if new_bytes > 0 || sealed.is_some() {
            self.sync()?;
        }
        match sealed {
            Some(sealed) => self.packs.publish(sealed),
            None => Ok(()),
        }
    }

    /// Makes everything written so far durable: one `syncfs` for the store's file system.
    pub fn sync(&self) -> Result<()> {
        let dir = fs::File::open(&self.root).map_err(|e| StoreError::io(&self.root, e))?;
        // SAFETY: syncfs on a descriptor we hold open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } < 0 {
            return Err(StoreError::io(&self.root, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Keeps `digest` (a tree) alive and marks it used now. `what` says what it is.
    pub fn add_root(&self, digest: &Digest, what: &str) -> Result<()> {
        let path = self
            .root
            .join("roots")
            .join(format!("{}-{}", digest.hex(), digest.size()));
        write_whole(&self.temporary_path("root"), &path, what.as_bytes())
    }

    /// Marks a root used now, if it is one.
    pub fn touch_root(&self, digest: &Digest) {
        let path = self
            .root
            .join("roots")
            .join(format!("{}-{}", digest.hex(), digest.size()));
        if let Ok(file) = fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }

    /// Pins trees under `name` (a running build's id, or a digest the user pinned): gc never
    /// removes them or anything they reach, whatever the budget.
    pub fn pin(&self, name: &str, trees: &[Digest]) -> Result<()> {
        self.write_pin(name, trees, None)
    }

    /// Pins trees for as long as this process lives: a pin whose process is gone (a killed
    /// build) is swept when the store is next opened.
    pub fn pin_while_running(&self, name: &str, trees: &[Digest]) -> Result<()> {
        self.write_pin(name, trees, Some(std::process::id()))
    }

    fn write_pin(&self, name: &str, trees: &[Digest], pid: Option<u32>) -> Result<()> {
        let path = self.pin_path(name);
        let owner = pid.map(|pid| format!("pid {pid}\n")).unwrap_or_default();
        let text: String = owner + &trees.iter().map(|d| format!("{d}\n")).collect::<String>();
        write_whole(&self.temporary_path("pin"), &path, text.as_bytes())
    }

    /// Removes a pin; `false` when there was none.
    pub fn unpin(&self, name: &str) -> bool {
        fs::remove_file(self.pin_path(name)).is_ok()
    }

    fn pin_path(&self, name: &str) -> PathBuf {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '+'
                }
            })
            .collect();
        self.root.join("pins").join(safe)
    }

    /// Every pinned tree.
    pub(crate) fn pinned(&self) -> Vec<Digest> {
        let Ok(entries) = fs::read_dir(self.root.join("pins")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.parse::<Digest>().ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Takes the store exclusively if no one else holds it, for a collection that should not
    /// wait for running builds.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>> {
        let file = self.lock_file()?;
        // SAFETY: flock on a descriptor we hold open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            return Ok(None);
        }
        Ok(Some(StoreLock { _file: file }))
    }

    /// Holds the store shared (imports, exports, builds) until dropped.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock_with(libc::LOCK_SH)
    }

    /// Holds the store exclusively (gc) until dropped, waiting for shared holders.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock_with(libc::LOCK_EX)
    }

    fn lock_with(&self, mode: libc::c_int) -> Result<StoreLock> {
        let file = self.lock_file()?;
        // SAFETY: flock on a descriptor we hold open.
        if unsafe { libc::flock(file.as_raw_fd(), mode) } < 0 {
            return Err(StoreError::io(
                &self.root.join("lock"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StoreLock { _file: file })
    }

    fn lock_file(&self) -> Result<fs::File> {
        let path = self.root.join("lock");
        fs::File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Objects put outside an import are published now; nothing refers to them yet, so
        // this needs no sync of its own.
        if let Ok(Some(sealed)) = self.packs.seal(&self.tmp) {
            let _ = self.packs.publish(sealed);
        }
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// What a corrupt blob's error says when its bytes are not the digest's.
const MISMATCH: &str = "its bytes do not match the digest";

/// A blob's bytes as read from the store. Raw bytes stay in the buffer they were read into,
/// past their kind byte, instead of being copied out of it.
pub(crate) struct Blob {
    bytes: Vec<u8>,
    start: usize,
}

impl Blob {
    /// Decodes stored bytes, checking their size against the digest but not their hash.
    fn decode(digest: &Digest, stored: Vec<u8>) -> std::result::Result<Blob, String> {
        match decode(digest, &stored)? {
            Decoded::Raw(_) => {}
            Decoded::Decompressed(bytes) => return Ok(Blob { bytes, start: 0 }),
        }
        Ok(Blob {
            bytes: stored,
            start: 1,
        })
    }

    fn into_vec(mut self) -> Vec<u8> {
        self.bytes.drain(..self.start);
        self.bytes
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Stored bytes decoded: raw ones borrowed, compressed ones decompressed.
enum Decoded<'a> {
    Raw(&'a [u8]),
    Decompressed(Vec<u8>),
}

impl Decoded<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Decoded::Raw(bytes) => bytes,
            Decoded::Decompressed(bytes) => bytes,
        }
    }
}

/// Decodes stored bytes (a kind byte, then raw or zstd bytes) and checks their size against
/// the digest; the hash is the caller's to check. The error is the corruption's description.
fn decode<'a>(digest: &Digest, stored: &'a [u8]) -> std::result::Result<Decoded<'a>, String> {
    let decoded = match stored.split_first() {
        Some((&KIND_RAW, rest)) => Decoded::Raw(rest),
        Some((&KIND_ZSTD, rest)) => {
            let capacity = usize::try_from(digest.size()).map_err(|_| "too large".to_owned())?;
            Decoded::Decompressed(
                decompress(rest, capacity).map_err(|e| format!("cannot decompress: {e}"))?,
            )
        }
        _ => return Err("unknown object kind".into()),
    };
    if decoded.bytes().len() as u64 != digest.size() {
        return Err(MISMATCH.into());
    }
    Ok(decoded)
}

/// Reads for a run of many (see [`Store::reader`]): each published pack is opened once.
pub(crate) struct Reader<'a> {
    store: &'a Store,
    packs:
        std::sync::RwLock<std::collections::HashMap<std::sync::Arc<str>, std::sync::Arc<fs::File>>>,
}

impl Reader<'_> {
    /// A blob, verified against its digest, as [`Store::get`] reads it.
    pub(crate) fn get(&self, digest: &Digest) -> Result<Blob> {
        match self.read_published(digest)? {
            Some((stored, location)) => self.store.verify(digest, stored, || {
                self.store.packs.drop_entry(digest, &location);
            }),
            None => self.store.get_blob(digest),
        }
    }

    /// A blob decoded and its size checked, but not its hash: only for a caller that checks
    /// the bytes against another digest that covers them before anyone can see them (an
    /// export checks a large file's chunks through the whole file's digest) and that reads
    /// them again with [`Reader::get`] when that check fails, to find and set aside the
    /// corrupt blob.
    pub(crate) fn get_unverified(&self, digest: &Digest) -> Result<Blob> {
        let stored = match self.read_published(digest)? {
            Some((stored, _)) => stored,
            None => self.store.get_stored(digest)?,
        };
        let blob = Blob::decode(digest, stored).map_err(|detail| StoreError::Corrupt {
            digest: *digest,
            detail,
        })?;
        self.store
            .progress
            .fetch_add(blob.len() as u64, Ordering::Relaxed);
        Ok(blob)
    }

    /// A record of a published pack, read through the pack's file opened once; `None` when no
    /// published pack this process knows of holds it.
    fn read_published(&self, digest: &Digest) -> Result<Option<(Vec<u8>, pack::Location)>> {
        let Some(location) = self.store.packs.locate(digest) else {
            return Ok(None);
        };
        let open = self
            .packs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&location.pack)
            .cloned();
        let file = match open {
            Some(file) => file,
            None => match self.store.packs.open(&location.pack) {
                Ok(file) => {
                    let file = std::sync::Arc::new(file);
                    self.packs
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(location.pack.clone(), file.clone());
                    file
                }
                // Rewritten by a gc since this process read the index: the store's own
                // read looks again.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(StoreError::io(&self.store.root.join("packs"), err)),
            },
        };
        let stored = pack::read_at(&file, location.offset, location.len)
            .map_err(|e| StoreError::io(&self.store.root.join("packs"), e))?;
        Ok(Some((stored, location)))
    }
}

/// A held store lock; released when dropped (closing the descriptor releases the flock).
pub struct StoreLock {
    _file: fs::File,
}

/// Checks the store's format, writing it (through `tmp`) into a new store.
fn check_format(root: &Path, tmp: &Path) -> Result<()> {
    let path = root.join("FORMAT");
    match fs::read_to_string(&path) {
        Ok(found) if found.trim() == STORE_FORMAT => Ok(()),
        Ok(found) => Err(StoreError::Format {
            path: root.to_owned(),
            found: found.trim().to_owned(),
        }),
        // Whole or not at all: a store several processes open at once never shows another
        // opener an empty FORMAT.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => write_whole(
            &tmp.join("FORMAT"),
            &path,
            format!("{STORE_FORMAT}\n").as_bytes(),
        ),
        Err(err) => Err(StoreError::io(&path, err)),
    }
}

/// Writes `contents` to `temporary`, then renames it to `path`: readers find the file whole
/// or not at all.
fn write_whole(temporary: &Path, path: &Path, contents: &[u8]) -> Result<()> {
    fs::write(temporary, contents).map_err(|e| StoreError::io(temporary, e))?;
    fs::rename(temporary, path).map_err(|e| {
        let _ = fs::remove_file(temporary);
        StoreError::io(path, e)
    })
}

fn clean_dead_temporaries(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid: Option<i32> = name.split('-').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes pins held by processes that no longer exist.
fn clean_dead_pins(pins: &Path) {
    let Ok(entries) = fs::read_dir(pins) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let owner: Option<u32> = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("pid "))
            .and_then(|pid| pid.trim().parse().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Starts writing a file's bytes (`len` 0: to its end) to disk without waiting for them, so
/// the disk works while an import or a transfer goes on and its one `syncfs` finds little left
/// to write (a restore's export uses it too: that sync writes the export's pages as well). It
/// promises nothing: durability still comes from that sync alone, and a failure here only
/// leaves the bytes for the sync to write.
pub(crate) fn start_writeback(file: &fs::File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor we hold open; SYNC_FILE_RANGE_WRITE only starts
    // writeback of the range's dirty pages.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses with a per-thread context (allocating one per blob would dominate small files).
fn compress(bytes: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        cell.as_mut()?.compress(bytes).ok()
    })
}

fn decompress(bytes: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(zstd::bulk::Decompressor::new()?);
        }
        match cell.as_mut() {
            Some(decompressor) => decompressor.decompress(bytes, capacity),
            None => Err(std::io::Error::other("no decompressor")),
        }
    })
}

/// What `peerbuild cache stat` shows.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub objects: u64,
    /// Bytes on disk.
    pub stored_bytes: u64,
    /// Bytes the objects hold uncompressed.
    pub logical_bytes: u64,
    pub roots: u64,
    /// Bytes of all files the roots' trees hold, duplicates counted each time.
    pub referenced_bytes: u64,
}

impl Store {
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        for (_, size, stored) in self.list_objects()? {
            stats.objects += 1;
            stats.logical_bytes += size;
            stats.stored_bytes += stored;
        }
        let mut sizes = std::collections::HashMap::new();
        for (root, _) in self.list_roots()? {
            stats.roots += 1;
            stats.referenced_bytes += gc::tree_file_bytes(self, &root, &mut sizes).unwrap_or(0);
        }
        Ok(stats)
    }

    /// Every object: its digest text (`HASH-SIZE`), logical size, and stored size.
    pub(crate) fn list_objects(&self) -> Result<Vec<(String, u64, u64)>> {
        let mut out: Vec<(String, u64, u64)> = self
            .packs
            .all()
            .into_iter()
            .map(|(d, len)| {
                (
                    format!("{}-{}", d.hex(), d.size()),
                    d.size(),
                    u64::from(len),
                )
            })
            .collect();
        let shards = fs::read_dir(&self.objects).map_err(|e| StoreError::io(&self.objects, e))?;
        for shard in shards.flatten() {
            let Ok(entries) = fs::read_dir(shard.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(size) = name
                    .rsplit_once('-')
                    .and_then(|(_, s)| s.parse::<u64>().ok())
                else {
                    continue;
                };
                let stored = entry.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((name, size, stored));
            }
        }
        Ok(out)
    }

    /// Every root with its last use.
    pub(crate) fn list_roots(&self) -> Result<Vec<(Digest, std::time::SystemTime)>> {
        let dir = self.root.join("roots");
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let mut roots = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().replacen('-', "/", 1);
            let (Ok(digest), Ok(metadata)) = (name.parse::<Digest>(), entry.metadata()) else {
                continue;
            };
            roots.push((digest, metadata.modified().unwrap_or(std::time::UNIX_EPOCH)));
        }
        Ok(roots)
    }

    /// Flips the last stored byte of a blob, loose or packed, as a failing disk would.
    #[cfg(test)]
    pub(crate) fn damage(&self, digest: &Digest) {
        let (path, offset) = match self.packs.locate(digest) {
            Some(location) if !self.object_path(digest).exists() => (
                self.root
                    .join("packs")
                    .join(format!("{}.pack", location.pack)),
                Some(location.offset + u64::from(location.len) - 1),
            ),
            _ => (self.object_path(digest), None),
        };
        let mut bytes = fs::read(&path).expect("the blob's file is readable");
        let at = offset.map_or(bytes.len() - 1, |o| o as usize);
        bytes[at] ^= 0x40;
        fs::write(&path, bytes).expect("the blob's file is writable");
    }

    /// The bytes a blob takes on disk.
    #[cfg(test)]
    pub(crate) fn stored_len(&self, digest: &Digest) -> u64 {
        match self.packs.locate(digest) {
            Some(location) => u64::from(location.len),
            None => fs::metadata(self.object_path(digest))
                .map(|m| m.len())
                .unwrap_or(0),
        }
    }

    /// Rewrites packs so that they hold only `live` objects; see [`pack::Packs::repack`].
    pub(crate) fn repack(&self, live: &std::collections::HashSet<Digest>) -> Result<(u64, u64)> {
        self.packs.repack(live, &self.tmp)
    }

    /// Removes a loose object (packed ones go through [`Store::repack`]).
    pub(crate) fn remove_object(&self, name: &str) -> u64 {
        let Some(shard) = name.get(..2) else {
            return 0;
        };
        let path = self.objects.join(shard).join(name);
        let size = path.metadata().map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => size,
            Err(_) => 0,
        }
    }

    pub(crate) fn remove_root(&self, digest: &Digest) {
        let _ = fs::remove_file(self.root.join("roots").join(format!(
            "{}-{}",
            digest.hex(),
            digest.size()
        )));
    }

    pub(crate) fn statcache_dir(&self) -> PathBuf {
        self.root.join("statcache")
    }

    pub(crate) fn temporary_path(&self, label: &str) -> PathBuf {
        self.tmp.join(format!(
            "{label}-{}",
            self.counter.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    pub(crate) fn temp_store(label: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "pb-store-{label}-{}-{}",
            std::process::id(),
            nanos()
        ));
        let store = Store::open(&dir).expect("opens");
        (dir, store)
    }

    #[test]
    fn blobs_round_trip_compressed_or_raw() {
        let (dir, store) = temp_store("roundtrip");
        let text = b"hello hello hello hello hello hello hello hello".repeat(100);
        let random: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for bytes in [&text[..], &random[..], b""] {
            let (digest, written) = store.put(bytes).expect("puts");
            assert!(written > 0);
            assert_eq!(store.put(bytes).expect("puts again").1, 0, "stored once");
            assert_eq!(store.get(&digest).expect("gets"), bytes);
        }
        let digest = Digest::of(&text);
        assert!(
            store.stored_len(&digest) < text.len() as u64 / 4,
            "text is compressed"
        );
        drop(store);
        // Reopened, the packed blobs are found through the published pack index.
        let store = Store::open(&dir).expect("reopens");
        assert_eq!(store.get(&digest).expect("gets"), text);
        assert_eq!(store.get(&Digest::of(&random)).expect("gets"), random);
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_flipped_byte_is_reported_with_the_digest() {
        for size in [1_000usize, 200_000] {
            let (dir, store) = temp_store("flip");
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let (digest, _) = store.put(&bytes).expect("puts");
            store.flush(1).expect("publishes");
            store.damage(&digest);
            let err = store.get(&digest).expect_err("corruption is detected");
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains(&digest.to_string()));
            assert!(
                !store.contains(&digest),
                "a corrupt blob is no longer claimed"
            );
            fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn a_store_of_another_format_is_refused() {
        let dir = std::env::temp_dir().join(format!("pb-store-format-{}", nanos()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("FORMAT"), "peerbuild-store 99\n").expect("write");
        let err = Store::open(&dir).expect_err("refused");
        assert!(err.to_string().contains("peerbuild-store 99"), "{err}");
        fs::remove_dir_all(dir).ok();
    }
}
