//! Exporting a tree from the store into a folder: every blob verified, folders and small files
//! written by threads taking a folder each, large files written chunk by chunk in parallel and
//! checked against their whole-file digest, executable bits, symlinks and empty folders
//! restored. The export is built in a temporary folder beside the destination
//! ([`Destination`]) and renamed into place, so a failure never leaves the destination
//! half-written. [`Arriving`] is the same export written while a transfer brings the blobs.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::Digest;
use protocol::tree::{EntryKind, Tree, decode_chunk_list};

use super::parallel::{each, ordered};
use super::{Blob, Reader, Result, Store, StoreError};

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Symlinks not restored because they point outside the tree.
    pub skipped_symlinks: u64,
}

struct FileJob {
    path: PathBuf,
    digest: Digest,
    chunks: Option<Digest>,
    executable: bool,
}

/// Exports the tree `root` into `dest`, which must not exist or be an empty folder.
pub fn export(store: &Store, root: &Digest, dest: &Path) -> Result<Exported> {
    let _lock = store.lock_shared()?;
    let destination = Destination::prepare(dest)?;
    let exported = fill(store, root, destination.folder())?;
    destination.commit()?;
    store.touch_root(root);
    Ok(exported)
}

/// Where an export is written: a temporary folder beside the destination, renamed into place
/// by [`Destination::commit`] and removed when dropped uncommitted, so a failure never leaves
/// the destination half-written.
pub struct Destination {
    temporary: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Destination {
    /// Makes the temporary folder for an export into `dest`, which must not exist or be an
    /// empty folder.
    pub fn prepare(dest: &Path) -> Result<Destination> {
        if let Ok(mut entries) = fs::read_dir(dest)
            && entries.next().is_some()
        {
            return Err(StoreError::Refused {
                path: dest.to_owned(),
                reason: "the destination is not empty; export into a new or empty folder".into(),
            });
        }
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A node restores into several folders at once, perhaps two into one: each export its
        // own temporary folder.
        static EXPORTS: AtomicU64 = AtomicU64::new(0);
        let temporary = parent.join(format!(
            ".{name}.peerbuild-export-{}-{}",
            std::process::id(),
            EXPORTS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&temporary);
        fs::create_dir(&temporary).map_err(|e| StoreError::io(&temporary, e))?;
        Ok(Destination {
            temporary,
            dest: dest.to_owned(),
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn folder(&self) -> &Path {
        &self.temporary
    }

    /// Renames the finished export into place.
    pub fn commit(mut self) -> Result<()> {
        fs::rename(&self.temporary, &self.dest).map_err(|e| StoreError::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.temporary);
        }
    }
}

/// What an export writes: the folders with their symlinks and small files, in batches, and
/// the large (chunked) files apart.
#[derive(Default)]
struct Plan {
    batches: Vec<Batch>,
    large: Vec<FileJob>,
}

/// One thread's share of a folder: the folder (made if it is not yet), its symlinks, and up to
/// [`BATCH_FILES`] of its small files.
struct Batch {
    folder: PathBuf,
    symlinks: Vec<(PathBuf, PathBuf)>,
    files: Vec<FileJob>,
}

/// The most files of one folder a thread writes in a row: a large folder is shared out.
const BATCH_FILES: usize = 256;

fn fill(store: &Store, root: &Digest, dir: &Path) -> Result<Exported> {
    let reader = store.reader();
    let reader = &reader;
    let (plan, mut exported) = plan(reader, root, dir)?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Large files are written on a thread of their own while the small ones go on, so the
    // disk is kept busy by both (a tree is usually a few big files among many small ones).
    // When one side fails, the other stops at its next file instead of writing on in vain.
    let failed = AtomicBool::new(false);
    let stopped = || failed.load(Ordering::Relaxed);
    let fail = |err: StoreError| {
        failed.store(true, Ordering::Relaxed);
        err
    };
    let (files, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        let large = scope.spawn(|| {
            for job in &plan.large {
                if stopped() {
                    break;
                }
                let written = write_chunked(reader, job, workers).map_err(fail)?;
                bytes.fetch_add(written, Ordering::Relaxed);
                files.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), StoreError>(())
        });
        // Folders and small files cost file-system calls more than CPU. Creating a file or a
        // folder holds its parent's lock while the file system finds a free inode, which can
        // take long (ext4 without a journal steps over recently deleted inodes one by one), so
        // each thread makes whole folders and their files: threads in different folders create
        // side by side instead of waiting on each other's folder lock.
        let small = each(&plan.batches, workers, |batch| {
            if stopped() {
                return Err(StoreError::Refused {
                    path: dir.to_owned(),
                    reason: "the export stopped: writing another file failed".into(),
                });
            }
            write_batch(reader, batch, &bytes).map_err(fail)?;
            files.fetch_add(batch.files.len() as u64, Ordering::Relaxed);
            Ok(())
        });
        let large = large
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The large side's own error says more than the small side's "stopped".
        large?;
        small
    })?;
    exported.files += files.into_inner();
    exported.bytes += bytes.into_inner();
    Ok(exported)
}

/// Makes a batch's folder (and any parent another thread has not made yet: all are inside the
/// export's new temporary folder), then its symlinks and files.
fn write_batch(reader: &Reader<'_>, batch: &Batch, bytes: &AtomicU64) -> Result<()> {
    make_folder_and_links(batch, true)?;
    for job in &batch.files {
        let blob = reader.get(&job.digest)?;
        write_file(&job.path, &blob, job.executable)?;
        bytes.fetch_add(blob.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Reads the trees of `root` and lists what to write into `dir`, each folder before the
/// folders in it, leaving out every symlink that leads out of the tree (see [`Links`]).
fn plan(reader: &Reader<'_>, root: &Digest, dir: &Path) -> Result<(Plan, Exported)> {
    let mut plan = Plan::default();
    let mut exported = Exported::default();
    make_plan(reader, root, dir, &mut plan, &mut exported)?;
    let links = Links(
        plan.batches
            .iter()
            .flat_map(|batch| &batch.symlinks)
            .filter_map(|(path, target)| {
                Some((path.strip_prefix(dir).ok()?.to_owned(), target.clone()))
            })
            .collect(),
    );
    for batch in &mut plan.batches {
        batch.symlinks.retain(|(path, target)| {
            let inside = path
                .strip_prefix(dir)
                .is_ok_and(|path| links.stays_inside(path, target));
            if inside {
                exported.symlinks += 1;
            } else {
                exported.skipped_symlinks += 1;
            }
            inside
        });
    }
    Ok((plan, exported))
}

fn make_plan(
    store: &Reader<'_>,
    tree: &Digest,
    dir: &Path,
    plan: &mut Plan,
    exported: &mut Exported,
) -> Result<()> {
    let tree = Tree::decode(&store.get(tree)?)?;
    exported.dirs += 1;
    let mut batch = Batch {
        folder: dir.to_owned(),
        symlinks: Vec::new(),
        files: Vec::new(),
    };
    let mut folders = Vec::new();
    for entry in tree.entries() {
        let path = dir.join(std::ffi::OsStr::from_bytes(&entry.name));
        match &entry.kind {
            EntryKind::Dir { digest } => folders.push((path, *digest)),
            EntryKind::Symlink { target } => {
                let target = Path::new(std::ffi::OsStr::from_bytes(target));
                batch.symlinks.push((path, target.to_owned()));
            }
            EntryKind::File {
                digest,
                executable,
                chunks,
            } => {
                let job = FileJob {
                    path,
                    digest: *digest,
                    chunks: *chunks,
                    executable: *executable,
                };
                if job.chunks.is_some() {
                    plan.large.push(job);
                    continue;
                }
                if batch.files.len() == BATCH_FILES {
                    let next = Batch {
                        folder: dir.to_owned(),
                        symlinks: Vec::new(),
                        files: Vec::new(),
                    };
                    plan.batches.push(std::mem::replace(&mut batch, next));
                }
                batch.files.push(job);
            }
        }
    }
    plan.batches.push(batch);
    for (path, digest) in folders {
        make_plan(store, &digest, &path, plan, exported)?;
    }
    Ok(())
}

/// A tree's symlinks, by their path from its root, with their targets. A link is recreated
/// only if its target, followed the way the kernel would through the tree's other links,
/// never leaves the tree: a link leading out could point a later writer (the build) anywhere.
/// Followed, not read as text: `d/y -> ..` stays inside, but `d/x -> y/../..` leaves through
/// `y` although its text has as many names as `..`s. A name the tree does not hold, or a
/// file, is taken as a folder: whatever a later writer makes there is its own doing.
struct Links(HashMap<PathBuf, PathBuf>);

/// The most links followed in resolving one (the kernel's own limit): a longer chain, or a
/// loop, is not recreated.
const MAX_HOPS: u32 = 40;

impl Links {
    /// Whether the link at `path` (from the tree's root) with `target` stays inside the tree.
    fn stays_inside(&self, path: &Path, target: &Path) -> bool {
        let folder = path.parent().unwrap_or(Path::new("")).to_owned();
        self.resolve(folder, target, &mut 0).is_some()
    }

    /// Where `target`, followed from the folder `at`, leads (a path from the tree's root), or
    /// `None` if it leaves the tree, is absolute, or follows more than [`MAX_HOPS`] links.
    fn resolve(&self, mut at: PathBuf, target: &Path, hops: &mut u32) -> Option<PathBuf> {
        for component in target.components() {
            match component {
                Component::Normal(name) => {
                    at.push(name);
                    if let Some(next) = self.0.get(&at) {
                        *hops += 1;
                        if *hops > MAX_HOPS {
                            return None;
                        }
                        at.pop();
                        at = self.resolve(at, next, hops)?;
                    }
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    if !at.pop() {
                        return None;
                    }
                }
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        Some(at)
    }
}

/// An export written while its blobs arrive from peers (a restore): planned once the store
/// holds every tree and chunk list of the tree ([`Arriving::plan`]: folders and symlinks made,
/// large files created), each file or chunk written the moment the transfer has verified it
/// ([`Arriving::write`]: no second decompression, no second read of the store), and what the
/// store held already written from it at the end ([`Arriving::finish`]). A large file's chunks
/// are hashed in file order as they land (one that lands early is read back from the file once
/// those before it are in), so its whole-file digest is checked without reading it again.
pub struct Arriving {
    exported: Exported,
    /// Each blob not written yet, with where it goes.
    pending: Mutex<HashMap<Digest, Vec<Target>>>,
    large: Vec<LargeFile>,
    /// Held while a file is created: one at a time (see [`Arriving::place`]).
    creating: Mutex<()>,
    files: AtomicU64,
    bytes: AtomicU64,
    /// Why the export stopped: the first write that failed. The transfer goes on regardless.
    failed: Mutex<Option<String>>,
    /// Set when whoever waits for the export is gone: nothing more is written.
    stop: Arc<AtomicBool>,
}

/// Where a blob goes.
enum Target {
    Small {
        path: PathBuf,
        executable: bool,
    },
    /// The `index`th chunk of the large file `file`.
    Chunk {
        file: usize,
        index: usize,
    },
}

/// A chunked file being written (opened for each chunk, so a tree of many large files never
/// holds many descriptors).
struct LargeFile {
    job: FileJob,
    /// Each chunk and its offset, in file order.
    chunks: Vec<(Digest, u64)>,
    hashed: Mutex<InOrder>,
}

/// A large file's hash, taken over its chunks in order as they land.
struct InOrder {
    hasher: blake3::Hasher,
    landed: Vec<bool>,
    /// The first chunk not hashed yet.
    next: usize,
}

impl Arriving {
    /// Plans the export of `root` into `dir` (an empty folder, see [`Destination`]): the store
    /// must hold every tree and chunk list of it by now. Makes the folders (never their
    /// parents: a folder gone from under the export fails it), the symlinks and the large
    /// files. Once `stop` is set, nothing more is written.
    pub fn plan(
        store: &Store,
        root: &Digest,
        dir: &Path,
        stop: Arc<AtomicBool>,
    ) -> Result<Arriving> {
        let reader = store.reader();
        let (plan, exported) = plan(&reader, root, dir)?;
        let mut pending: HashMap<Digest, Vec<Target>> = HashMap::new();
        // Each folder's batches come before the folders in it: no parent is made here, so a
        // folder gone from under the export fails it rather than being made again.
        for batch in plan.batches {
            make_folder_and_links(&batch, false)?;
            for job in batch.files {
                pending.entry(job.digest).or_default().push(Target::Small {
                    path: job.path,
                    executable: job.executable,
                });
            }
        }
        let mut large = Vec::with_capacity(plan.large.len());
        for job in plan.large {
            let Some(list) = job.chunks else { continue };
            let chunks = decode_chunk_list(&reader.get(&list)?)?;
            // Its folder's batch made the folder above.
            create_file(&job.path, job.executable)?;
            let placed = at_offsets(&chunks);
            for (index, chunk) in chunks.iter().enumerate() {
                pending.entry(*chunk).or_default().push(Target::Chunk {
                    file: large.len(),
                    index,
                });
            }
            large.push(LargeFile {
                job,
                hashed: Mutex::new(InOrder {
                    hasher: blake3::Hasher::new(),
                    landed: vec![false; placed.len()],
                    next: 0,
                }),
                chunks: placed,
            });
        }
        Ok(Arriving {
            exported,
            pending: Mutex::new(pending),
            large,
            creating: Mutex::new(()),
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed: Mutex::new(None),
            stop,
        })
    }

    /// Writes the blob `digest`, verified, wherever the tree has it; a blob it does not list,
    /// or one written already, is passed over. A failed write stops the export (see
    /// [`Arriving::finish`]), not the transfer: the blob is in the store either way.
    pub fn write(&self, digest: &Digest, bytes: &[u8]) {
        if self.stopped() {
            return;
        }
        let targets = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        for target in targets.iter().flatten() {
            if let Err(err) = self.place(target, bytes) {
                self.fail(err.to_string());
                return;
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    fn fail(&self, why: String) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
    }

    fn place(&self, target: &Target, bytes: &[u8]) -> Result<()> {
        match target {
            Target::Small { path, executable } => {
                // The transfer verifies blobs on several threads; creating files on all of
                // them at once only makes them wait on (or spin for) the same folders' locks
                // and the file system's inode allocator.
                let file = {
                    let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                    write_file(path, bytes, *executable)?
                };
                // The transfer syncs the store's file system before the export is done, which
                // writes the export's pages too: handed to the disk now, they are mostly
                // written by then instead of waited for.
                super::start_writeback(&file, 0, 0);
                self.files.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Target::Chunk { file, index } => self.large[*file].land(*index, bytes),
        }
    }

    /// Writes what is still unwritten from the store (it held those blobs before the
    /// transfer), reading each verified, then checks every large file against its digest.
    /// The error says why the export is not whole (a write that failed on the way, a chunk
    /// list that does not make its file): the caller exports the tree itself, or reports it.
    pub fn finish(self, store: &Store) -> std::result::Result<Exported, String> {
        if let Some(why) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(why);
        }
        self.complete(store).map_err(|e| e.to_string())
    }

    fn complete(self, store: &Store) -> Result<Exported> {
        let left: Vec<(Digest, Vec<Target>)> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let reader = store.reader();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        each(&left, workers, |(digest, targets)| {
            let blob = reader.get(digest)?;
            targets
                .iter()
                .try_for_each(|target| self.place(target, &blob))
        })?;
        let mut exported = self.exported;
        for large in &self.large {
            let order = large.hashed.lock().unwrap_or_else(|e| e.into_inner());
            let size = large.chunks.iter().map(|(chunk, _)| chunk.size()).sum();
            if order.next != large.chunks.len()
                || Digest::from_parts(*order.hasher.finalize().as_bytes(), size) != large.job.digest
            {
                return Err(StoreError::Corrupt {
                    digest: large.job.digest,
                    detail: "its chunks do not assemble into the file's digest".into(),
                });
            }
            let file = large.open()?;
            restore_mode(&file, &large.job.path, large.job.executable)?;
            exported.files += 1;
            exported.bytes += size;
        }
        exported.files += self.files.into_inner();
        exported.bytes += self.bytes.into_inner();
        Ok(exported)
    }
}

impl LargeFile {
    fn open(&self) -> Result<fs::File> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.job.path)
            .map_err(|e| StoreError::io(&self.job.path, e))
    }

    /// Writes chunk `index` at its place, and hashes every chunk now in order.
    fn land(&self, index: usize, bytes: &[u8]) -> Result<()> {
        let path = &self.job.path;
        let file = self.open()?;
        let (_, offset) = self.chunks[index];
        file.write_all_at(bytes, offset)
            .map_err(|e| StoreError::io(path, e))?;
        // See `Arriving::place`: the disk starts on it now, not in the transfer's sync.
        super::start_writeback(&file, offset, bytes.len() as u64);
        let mut order = self.hashed.lock().unwrap_or_else(|e| e.into_inner());
        order.landed[index] = true;
        if order.next != index {
            return Ok(());
        }
        order.hasher.update(bytes);
        order.next += 1;
        // The chunks that landed early are in the file (written before they were marked).
        let mut early = Vec::new();
        while order.landed.get(order.next) == Some(&true) {
            let (chunk, offset) = self.chunks[order.next];
            early.resize(chunk.size() as usize, 0);
            file.read_exact_at(&mut early, offset)
                .map_err(|e| StoreError::io(path, e))?;
            order.hasher.update(&early);
            order.next += 1;
        }
        Ok(())
    }
}

/// Makes a batch's folder, 0755 whatever the process's umask (a node may run with 0077), with
/// its `parents` when asked (threads write batches in no order), and its symlinks. A folder
/// that exists already (another batch of it made it) is fine.
fn make_folder_and_links(batch: &Batch, parents: bool) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let folder = &batch.folder;
    match fs::DirBuilder::new()
        .mode(0o755)
        .recursive(parents)
        .create(folder)
    {
        Ok(()) if umask() & 0o755 != 0 => {
            fs::set_permissions(folder, fs::Permissions::from_mode(0o755))
                .map_err(|e| StoreError::io(folder, e))?;
        }
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(StoreError::io(folder, err)),
    }
    for (path, target) in &batch.symlinks {
        std::os::unix::fs::symlink(target, path).map_err(|e| StoreError::io(path, e))?;
    }
    Ok(())
}

/// Each chunk of a file with its offset in the file.
fn at_offsets(chunks: &[Digest]) -> Vec<(Digest, u64)> {
    let mut offset = 0;
    chunks
        .iter()
        .map(|chunk| {
            let at = offset;
            offset += chunk.size();
            (*chunk, at)
        })
        .collect()
}

/// Writes a new file with its mode set at creation.
fn write_file(path: &Path, bytes: &[u8], executable: bool) -> Result<fs::File> {
    let mut file = create_file(path, executable)?;
    file.write_all(bytes).map_err(|e| StoreError::io(path, e))?;
    restore_mode(&file, path, executable)?;
    Ok(file)
}

/// Creates a new file with its mode set at creation.
fn create_file(path: &Path, executable: bool) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode(executable))
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}

/// A second `chmod` is needed only when the process's umask stripped bits from 0644/0755.
fn restore_mode(file: &fs::File, path: &Path, executable: bool) -> Result<()> {
    if umask() & mode(executable) != 0 {
        file.set_permissions(fs::Permissions::from_mode(mode(executable)))
            .map_err(|e| StoreError::io(path, e))?;
    }
    Ok(())
}

fn mode(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

/// The process's umask, read without changing it (`umask(2)` would race with other threads).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
            })
            // Unknown: assume the worst, so modes are always set explicitly.
            .unwrap_or(0o777)
    })
}

/// Writes a chunked file. Each chunk is fetched, decoded and written at its place by several
/// threads, and the file's bytes are hashed once, in order, against the whole file's digest,
/// which covers every chunk: a chunk is not hashed a second time on its own. The file is in
/// the export's temporary folder until then, seen by no one. When the digest does not match,
/// the chunks are read again one by one, verified, so a corrupt one is named and set aside.
fn write_chunked(reader: &Reader<'_>, job: &FileJob, workers: usize) -> Result<u64> {
    let Some(list) = job.chunks else {
        return Ok(0);
    };
    let chunks = decode_chunk_list(&reader.get(&list)?)?;
    // Its folder may still be waiting for a thread of the small files.
    if let Some(folder) = job.path.parent() {
        fs::create_dir_all(folder).map_err(|e| StoreError::io(folder, e))?;
    }
    let file = create_file(&job.path, job.executable)?;
    let placed = at_offsets(&chunks);
    let size = chunks.iter().map(Digest::size).sum();
    let mut hasher = blake3::Hasher::new();
    ordered(
        placed.into_iter(),
        workers,
        workers * 4,
        |(chunk, offset)| {
            let bytes = reader.get_unverified(&chunk)?;
            file.write_all_at(&bytes, offset)
                .map_err(|e| StoreError::io(&job.path, e))?;
            Ok(bytes)
        },
        |bytes: Result<Blob>| {
            hasher.update(&bytes?);
            Ok::<(), StoreError>(())
        },
    )?;
    if Digest::from_parts(*hasher.finalize().as_bytes(), size) != job.digest {
        for chunk in &chunks {
            reader.get(chunk)?;
        }
        return Err(StoreError::Corrupt {
            digest: job.digest,
            detail: "its chunks do not assemble into the file's digest".into(),
        });
    }
    restore_mode(&file, &job.path, job.executable)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::Links;
    use std::path::Path;

    fn links(pairs: &[(&str, &str)]) -> Links {
        Links(
            pairs
                .iter()
                .map(|(path, target)| (path.into(), target.into()))
                .collect(),
        )
    }

    #[test]
    fn symlink_targets_are_followed_through_the_trees_links() {
        let none = links(&[]);
        assert!(none.stays_inside(Path::new("l"), Path::new("a/b")));
        assert!(none.stays_inside(Path::new("d/l"), Path::new("../x")));
        assert!(none.stays_inside(Path::new("d/l"), Path::new("./../d/.")));
        assert!(!none.stays_inside(Path::new("l"), Path::new("../x")));
        assert!(!none.stays_inside(Path::new("l"), Path::new("a/../../x")));
        assert!(!none.stays_inside(Path::new("a/b/c/l"), Path::new("/etc/passwd")));

        // Lexically inside, but `y` is the root: `y/../..` is the tree's grandparent.
        let chained = links(&[("d/y", ".."), ("d/x", "y/../.."), ("d/z", "y/e")]);
        assert!(chained.stays_inside(Path::new("d/y"), Path::new("..")));
        assert!(!chained.stays_inside(Path::new("d/x"), Path::new("y/../..")));
        assert!(chained.stays_inside(Path::new("d/z"), Path::new("y/e")));

        // Through a link that itself leads out, and through a link to a link that does.
        let out = links(&[
            ("b", "/etc"),
            ("a", "b"),
            ("c", "a/passwd"),
            ("u", "d/../.."),
        ]);
        assert!(!out.stays_inside(Path::new("a"), Path::new("b")));
        assert!(!out.stays_inside(Path::new("c"), Path::new("a/passwd")));
        assert!(!out.stays_inside(Path::new("u"), Path::new("d/../..")));

        // A loop is never followed to its end.
        let looped = links(&[("p", "q"), ("q", "p"), ("s", "s")]);
        assert!(!looped.stays_inside(Path::new("p"), Path::new("q")));
        assert!(!looped.stays_inside(Path::new("s"), Path::new("s")));
    }
}
