//! Pack files: small objects (a source file, a tree) written by one import share one file, so
//! importing 15,000 small files creates a handful of files instead of 15,000.
//!
//! A pack is `packs/NAME.pack` (records of a kind byte and the stored bytes, back to back) and
//! `packs/NAME.idx` (postcard: the digest, offset and length of each record). Both are written
//! in the store's temporary folder and renamed into place after the import's sync, the index
//! last: an index names only bytes that are on disk. Packs never change once published; gc
//! rewrites a pack holding dead objects into a new one and removes the old.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use protocol::Digest;

use super::{Result, StoreError};

/// Objects up to this stored size go into packs; larger ones (chunks) stay loose files.
pub const PACK_OBJECT_MAX_BYTES: usize = 64 * 1024;

/// Where a packed object is.
#[derive(Clone, Debug)]
pub struct Location {
    pub pack: Arc<str>,
    pub offset: u64,
    pub len: u32,
}

type IndexEntry = (Digest, u64, u32);

struct Writer {
    name: String,
    path: PathBuf,
    file: std::io::BufWriter<fs::File>,
    offset: u64,
    /// Bytes before this offset were handed to the disk early (`super::start_writeback`).
    written_back: u64,
    entries: Vec<IndexEntry>,
    pending: HashMap<Digest, (u64, u32)>,
}

/// How many bytes a pack gathers before they are handed to the disk early.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// A pack written and sealed, waiting to be published.
pub struct Sealed {
    name: String,
    pack: PathBuf,
    index: PathBuf,
    entries: Vec<IndexEntry>,
}

/// The packs of a store, as this process knows them.
pub struct Packs {
    dir: PathBuf,
    index: RwLock<HashMap<Digest, Location>>,
    loaded: Mutex<Option<HashSet<String>>>,
    /// The pack folder's modification time when its indexes were last read, and when that was.
    seen: Mutex<(Option<std::time::SystemTime>, Option<std::time::Instant>)>,
    writer: Mutex<Option<Writer>>,
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packs").field("dir", &self.dir).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Packs {
    pub fn new(dir: PathBuf) -> Packs {
        Packs {
            dir,
            index: RwLock::new(HashMap::new()),
            loaded: Mutex::new(None),
            seen: Mutex::new((None, None)),
            writer: Mutex::new(None),
        }
    }

    /// Brings the index up to date with the pack folder, when it changed (one `stat` when it
    /// did not; a full look at least once a second, as a folder's time may not tick for a pack
    /// published within the same tick): packs published since are read, and when a pack is
    /// gone (another process's gc repacked), the index is read again from scratch. For answers
    /// that must match what is on disk now: a peer's "do you hold it", a cache lookup.
    pub fn refresh(&self) {
        let mtime = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let now = std::time::Instant::now();
        let mut seen = lock(&self.seen);
        let recent = seen
            .1
            .is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1));
        if mtime.is_some() && seen.0 == mtime && recent {
            return;
        }
        *seen = (mtime, Some(now));
        drop(seen);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let present: HashSet<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".idx").map(str::to_owned)
            })
            .collect();
        {
            let mut loaded = lock(&self.loaded);
            let gone = loaded
                .as_ref()
                .is_some_and(|names| names.iter().any(|n| !present.contains(n)));
            if gone {
                self.index
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                *loaded = None;
            }
        }
        self.load();
    }

    /// Reads the indexes of packs this process has not seen yet.
    pub fn load(&self) {
        let mut loaded = lock(&self.loaded);
        let seen = loaded.get_or_insert_with(HashSet::new);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".idx") else {
                continue;
            };
            if seen.contains(name) {
                continue;
            }
            let Some(list) = read_index(&entry.path()) else {
                continue;
            };
            let pack: Arc<str> = Arc::from(name);
            for (digest, offset, len) in list {
                index.insert(
                    digest,
                    Location {
                        pack: pack.clone(),
                        offset,
                        len,
                    },
                );
            }
            seen.insert(name.to_owned());
        }
    }

    fn ensure_loaded(&self) {
        if lock(&self.loaded).is_none() {
            self.load();
        }
    }

    pub fn locate(&self, digest: &Digest) -> Option<Location> {
        self.ensure_loaded();
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// Whether a pack (published or being written by this process) holds `digest`. Packs
    /// published by others since this process looked are not seen: a missed duplicate only
    /// costs a second copy.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.locate(digest).is_some()
            || lock(&self.writer)
                .as_ref()
                .is_some_and(|w| w.pending.contains_key(digest))
    }

    /// Appends a record to this process's open pack; `false` when it already holds it.
    pub fn append(&self, tmp: &Path, digest: Digest, kind: u8, payload: &[u8]) -> Result<bool> {
        let mut writer = lock(&self.writer);
        if writer.is_none() {
            let name = format!("{}-{}", std::process::id(), super::nanos());
            let path = tmp.join(format!("{name}.pack"));
            // Readable too: this process may read back a record before the pack is published.
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| StoreError::io(&path, e))?;
            *writer = Some(Writer {
                name,
                path,
                file: std::io::BufWriter::with_capacity(1 << 20, file),
                offset: 0,
                written_back: 0,
                entries: Vec::new(),
                pending: HashMap::new(),
            });
        }
        let Some(w) = writer.as_mut() else {
            return Ok(false);
        };
        if w.pending.contains_key(&digest) {
            return Ok(false);
        }
        let len = payload.len() as u32 + 1;
        w.file
            .write_all(&[kind])
            .and_then(|()| w.file.write_all(payload))
            .map_err(|e| StoreError::io(&w.path, e))?;
        w.entries.push((digest, w.offset, len));
        w.pending.insert(digest, (w.offset, len));
        w.offset += u64::from(len);
        if w.offset - w.written_back >= WRITEBACK_BYTES {
            w.file.flush().map_err(|e| StoreError::io(&w.path, e))?;
            super::start_writeback(w.file.get_ref(), w.written_back, w.offset - w.written_back);
            w.written_back = w.offset;
        }
        Ok(true)
    }

    /// Reads a record of the pack this process is writing.
    pub fn read_pending(&self, digest: &Digest) -> Option<Result<Vec<u8>>> {
        let mut writer = lock(&self.writer);
        let w = writer.as_mut()?;
        let &(offset, len) = w.pending.get(digest)?;
        Some(
            w.file
                .flush()
                .and_then(|()| read_at(w.file.get_ref(), offset, len))
                .map_err(|e| StoreError::io(&w.path, e)),
        )
    }

    /// Finishes this process's open pack: its bytes flushed and its index written, both still
    /// in the temporary folder.
    pub fn seal(&self, tmp: &Path) -> Result<Option<Sealed>> {
        let Some(mut w) = lock(&self.writer).take() else {
            return Ok(None);
        };
        w.file.flush().map_err(|e| StoreError::io(&w.path, e))?;
        let index = tmp.join(format!("{}.idx", w.name));
        let bytes = postcard::to_stdvec(&w.entries).unwrap_or_default();
        fs::write(&index, bytes).map_err(|e| StoreError::io(&index, e))?;
        Ok(Some(Sealed {
            name: w.name,
            pack: w.path,
            index,
            entries: w.entries,
        }))
    }

    /// Publishes a sealed pack (after the caller's sync): the pack, then its index.
    pub fn publish(&self, sealed: Sealed) -> Result<()> {
        let pack = self.dir.join(format!("{}.pack", sealed.name));
        let index = self.dir.join(format!("{}.idx", sealed.name));
        fs::rename(&sealed.pack, &pack).map_err(|e| StoreError::io(&pack, e))?;
        fs::rename(&sealed.index, &index).map_err(|e| StoreError::io(&index, e))?;
        let name: Arc<str> = Arc::from(sealed.name.as_str());
        let mut map = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (digest, offset, len) in sealed.entries {
            map.insert(
                digest,
                Location {
                    pack: name.clone(),
                    offset,
                    len,
                },
            );
        }
        lock(&self.loaded)
            .get_or_insert_with(HashSet::new)
            .insert(sealed.name);
        Ok(())
    }

    /// Reads a published record.
    pub fn read(&self, location: &Location) -> std::io::Result<Vec<u8>> {
        read_at(&self.open(&location.pack)?, location.offset, location.len)
    }

    /// Opens a published pack for reading.
    pub fn open(&self, pack: &str) -> std::io::Result<fs::File> {
        fs::File::open(self.dir.join(format!("{pack}.pack")))
    }

    /// Forgets a record that failed verification, in memory and in its pack's index, so the
    /// store stops claiming it and the next import stores it again.
    pub fn drop_entry(&self, digest: &Digest, location: &Location) {
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        let path = self.dir.join(format!("{}.idx", location.pack));
        if let Some(mut list) = read_index(&path) {
            list.retain(|(d, _, _)| d != digest);
            let temporary = path.with_extension("idx-new");
            if fs::write(&temporary, postcard::to_stdvec(&list).unwrap_or_default()).is_ok() {
                let _ = fs::rename(&temporary, &path);
            }
        }
    }

    /// Every published record: digest and stored length.
    pub fn all(&self) -> Vec<(Digest, u32)> {
        self.load();
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(d, l)| (*d, l.len))
            .collect()
    }

    /// Rewrites every pack holding records not in `live`: the live records are copied into a
    /// new pack and the old one removed. Call with the store held exclusively. Returns the
    /// records removed and the bytes freed.
    pub fn repack(&self, live: &HashSet<Digest>, tmp: &Path) -> Result<(u64, u64)> {
        self.load();
        let mut by_pack: HashMap<Arc<str>, Vec<(Digest, Location)>> = HashMap::new();
        for (digest, location) in self.index.read().unwrap_or_else(|e| e.into_inner()).iter() {
            by_pack
                .entry(location.pack.clone())
                .or_default()
                .push((*digest, location.clone()));
        }
        let (mut removed, mut freed) = (0, 0);
        for (pack, records) in by_pack {
            let dead = records.iter().filter(|(d, _)| !live.contains(d)).count();
            if dead == 0 {
                continue;
            }
            let mut kept = 0u64;
            for (digest, location) in records.iter().filter(|(d, _)| live.contains(d)) {
                kept += u64::from(location.len);
                let bytes = self
                    .read(location)
                    .map_err(|e| StoreError::io(&self.dir, e))?;
                let (kind, payload) = bytes
                    .split_first()
                    .map(|(k, p)| (*k, p))
                    .unwrap_or((0, &[][..]));
                self.append(tmp, *digest, kind, payload)?;
            }
            if let Some(sealed) = self.seal(tmp)? {
                self.publish(sealed)?;
            }
            let old_pack = self.dir.join(format!("{pack}.pack"));
            freed += fs::metadata(&old_pack)
                .map(|m| m.len())
                .unwrap_or(0)
                .saturating_sub(kept);
            let _ = fs::remove_file(self.dir.join(format!("{pack}.idx")));
            let _ = fs::remove_file(&old_pack);
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            for (digest, location) in &records {
                if index.get(digest).is_some_and(|l| l.pack == location.pack) {
                    index.remove(digest);
                }
            }
            removed += dead as u64;
        }
        Ok((removed, freed))
    }
}

fn read_index(path: &Path) -> Option<Vec<IndexEntry>> {
    postcard::from_bytes(&fs::read(path).ok()?).ok()
}

pub fn read_at(file: &fs::File, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes)
}
