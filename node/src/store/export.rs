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
    /// Symlinks not restored: they lead out of the tree, or the file system folds case.
    pub skipped_symlinks: u64,
}

impl Exported {
    /// Whether this export, written by a node into `dir`, is there to be seen from here: a
    /// node with a file system view of its own (a private /tmp, a container) may have written
    /// elsewhere. A folder that should hold something and is empty is not it.
    pub fn is_in(&self, dir: &Path) -> bool {
        let empty_tree = self.files == 0 && self.symlinks == 0 && self.dirs <= 1;
        dir.is_dir()
            && (empty_tree || fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()))
    }
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
        new_folder(&temporary, false).map_err(|e| StoreError::io(&temporary, e))?;
        open_to_all(&temporary)?;
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
        // A restore given up may still be finishing a write or two into it (they stop at their
        // next blob), so a removal that fails is tried again, after a moment.
        if self.committed {
            return;
        }
        for attempt in 0..3 {
            match fs::remove_dir_all(&self.temporary) {
                Ok(()) => return,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) if attempt < 2 => std::thread::sleep(std::time::Duration::from_millis(50)),
                Err(_) => {}
            }
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
    make_folder_and_links(batch, Make::WithParents)?;
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
    // On a file system that folds case, two names the tree tells apart can be one on disk (a
    // link `P` and a folder `p`), so where a link leads cannot be judged from the tree: none
    // is recreated there.
    let relative = |path: &Path| path.strip_prefix(dir).ok().map(Path::to_owned);
    let has_links = plan.batches.iter().any(|batch| !batch.symlinks.is_empty());
    if !has_links || folds_case(dir)? {
        let skipped = plan
            .batches
            .iter_mut()
            .map(|batch| batch.symlinks.drain(..).count());
        exported.skipped_symlinks += skipped.sum::<usize>() as u64;
        return Ok((plan, exported));
    }
    let mut links = Links::new(
        plan.batches
            .iter()
            .filter_map(|batch| relative(&batch.folder)),
        plan.batches
            .iter()
            .flat_map(|batch| &batch.symlinks)
            .filter_map(|(path, target)| Some((relative(path)?, target.clone()))),
    );
    for batch in &mut plan.batches {
        batch.symlinks.retain(|(path, _)| {
            let inside = relative(path).is_some_and(|path| links.stays_inside(&path));
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

/// Whether the file system under `dir` (an export's new, empty folder) folds case: a file
/// made there is looked up by its name in capitals.
fn folds_case(dir: &Path) -> Result<bool> {
    let probe = dir.join(".peerbuild-case-probe");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| StoreError::io(&probe, e))?;
    let folds = dir.join(".PEERBUILD-CASE-PROBE").symlink_metadata().is_ok();
    fs::remove_file(&probe).map_err(|e| StoreError::io(&probe, e))?;
    Ok(folds)
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

/// A tree's folders and symlinks, walked the way the kernel resolves a path, to tell which
/// links lead out of the tree. A link is recreated only if it does not: a link leading out
/// could point a later writer (the build) anywhere. Followed, not read as text: `d/y -> ..`
/// stays inside, but `d/x -> y/../..` leaves through `y` although its text has as many names
/// as `..`s. A link into a name the tree does not hold (or a file) is left dangling inside,
/// but `..` after such a name counts as leaving: the kernel would refuse that path anyway
/// (no such folder), and a writer could later make the name a link. A target the kernel
/// refuses (empty, with a NUL byte, longer than `PATH_MAX`), a loop, and links nested more
/// than 40 deep count as leaving too (near the kernel's limit of 40 links in one lookup, which
/// counts every link followed: a link cut off there, and every link first reached through it,
/// is refused even if asked alone it would resolve in fewer, erring on the safe side in trees
/// that hold such chains at all). Each link is followed once, however many others lead
/// through it, so planning takes time in proportion to the tree and its targets, whatever a
/// peer put in them.
struct Links {
    /// Each folder and link by its folder (0: the tree's root) and its name.
    names: HashMap<(usize, Vec<u8>), usize>,
    nodes: Vec<Node>,
}

enum Node {
    /// A folder, with the folder it is in (`None` for the root).
    Folder { parent: Option<usize> },
    /// A link in the folder `parent`, and where it leads once followed.
    Link {
        parent: usize,
        target: PathBuf,
        leads: Option<Place>,
    },
}

/// Where a path leads in the tree.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Place {
    Folder(usize),
    /// A name the tree does not hold as a folder (nothing, or a file), or something below it.
    Absent,
    /// Out of the tree, or nowhere the kernel would go.
    Outside,
}

/// The longest link target the kernel takes (`PATH_MAX` with its NUL).
const MAX_TARGET_BYTES: usize = 4095;
/// How deep links are followed within one another (near the kernel's limit: see [`Links`]).
const MAX_DEPTH: u32 = 40;

impl Links {
    /// The folders (each after the folder it is in) and the links, by their paths from the
    /// tree's root.
    fn new(
        folders: impl IntoIterator<Item = PathBuf>,
        links: impl IntoIterator<Item = (PathBuf, PathBuf)>,
    ) -> Links {
        let mut tree = Links {
            names: HashMap::new(),
            nodes: vec![Node::Folder { parent: None }],
        };
        let mut ids: HashMap<PathBuf, usize> = HashMap::from([(PathBuf::new(), 0)]);
        for folder in folders {
            if !ids.contains_key(&folder)
                && let Some(id) = tree.add(&ids, &folder, |parent| Node::Folder {
                    parent: Some(parent),
                })
            {
                ids.insert(folder, id);
            }
        }
        for (path, target) in links {
            tree.add(&ids, &path, |parent| Node::Link {
                parent,
                target,
                leads: None,
            });
        }
        tree
    }

    /// Adds what `node` makes of its folder's number at `path`, in the folder `ids` numbers.
    fn add(
        &mut self,
        ids: &HashMap<PathBuf, usize>,
        path: &Path,
        node: impl FnOnce(usize) -> Node,
    ) -> Option<usize> {
        let parent = *ids.get(path.parent()?)?;
        let name = path.file_name()?.as_bytes().to_vec();
        let id = self.nodes.len();
        self.nodes.push(node(parent));
        self.names.insert((parent, name), id);
        Some(id)
    }

    /// Whether the link at `path` (from the tree's root) stays inside the tree.
    fn stays_inside(&mut self, path: &Path) -> bool {
        let link = path
            .parent()
            .zip(path.file_name())
            .and_then(|(parent, name)| {
                let mut at = 0;
                for component in parent.components() {
                    at = *self
                        .names
                        .get(&(at, component.as_os_str().as_bytes().to_vec()))?;
                }
                self.names.get(&(at, name.as_bytes().to_vec())).copied()
            });
        link.is_some_and(|link| self.follow(link, 0) != Place::Outside)
    }

    /// Where the link `link` leads, reached through `depth` others: followed once, its place
    /// kept for every other link that leads through it. A link met again while it is being
    /// followed is a loop; one more than [`MAX_DEPTH`] links down is not followed (about the
    /// kernel's limit), and counts as leaving, as does every link that led to it.
    fn follow(&mut self, link: usize, depth: u32) -> Place {
        let Node::Link {
            parent,
            target,
            leads,
        } = &mut self.nodes[link]
        else {
            return Place::Outside;
        };
        if let Some(place) = leads {
            return *place;
        }
        if depth > MAX_DEPTH {
            return Place::Outside;
        }
        *leads = Some(Place::Outside);
        let (parent, target) = (*parent, target.clone());
        let place = self.walk(parent, &target, depth);
        if let Node::Link { leads, .. } = &mut self.nodes[link] {
            *leads = Some(place);
        }
        place
    }

    /// Where `target`, a link's target reached through `depth` others, leads from the folder
    /// `from`.
    fn walk(&mut self, from: usize, target: &Path, depth: u32) -> Place {
        let bytes = target.as_os_str().as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_TARGET_BYTES || bytes.contains(&0) {
            return Place::Outside;
        }
        let mut at = Place::Folder(from);
        for component in target.components() {
            at = match (component, at) {
                (_, Place::Outside) | (Component::RootDir | Component::Prefix(_), _) => {
                    return Place::Outside;
                }
                (Component::CurDir, at) => at,
                (Component::ParentDir, Place::Folder(folder)) => match self.nodes[folder] {
                    Node::Folder {
                        parent: Some(parent),
                    } => Place::Folder(parent),
                    _ => Place::Outside,
                },
                (Component::ParentDir, Place::Absent) => Place::Outside,
                (Component::Normal(_), Place::Absent) => Place::Absent,
                (Component::Normal(name), Place::Folder(folder)) => {
                    match self.names.get(&(folder, name.as_bytes().to_vec())) {
                        None => Place::Absent,
                        Some(&id) => match self.nodes[id] {
                            Node::Folder { .. } => Place::Folder(id),
                            Node::Link { .. } => self.follow(id, depth + 1),
                        },
                    }
                }
            };
        }
        at
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

/// When a blob is written into the export. One that arrived is handed to the disk at once
/// (`start_writeback`): the transfer syncs the store once it has every blob, and where the
/// export shares the store's file system that sync writes the export's pages too, so they are
/// mostly written by then instead of waited for. One the store held before is written after
/// that sync, and left to the kernel.
#[derive(Clone, Copy, PartialEq)]
enum Written {
    Arrived,
    Held,
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
        // Each folder's batches come before the folders in it: no parent is made here, and
        // the export's own folder is never made again (its `Destination` made it), so a
        // folder gone from under the export (removed when the restore was given up) fails it
        // rather than being made again and left behind.
        for batch in plan.batches {
            if stop.load(Ordering::Relaxed) {
                return Err(StoreError::Refused {
                    path: dir.to_owned(),
                    reason: "the restore was given up".into(),
                });
            }
            let make = if batch.folder == dir {
                Make::Made
            } else {
                Make::Alone
            };
            make_folder_and_links(&batch, make)?;
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
            // A blob many files share stops between them too, once given up.
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            if let Err(err) = self.place(target, bytes, Written::Arrived) {
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

    fn place(&self, target: &Target, bytes: &[u8], written: Written) -> Result<()> {
        match target {
            Target::Small { path, executable } => {
                // The transfer verifies blobs on several threads; creating files on all of
                // them at once only makes them wait on (or spin for) the same folders' locks
                // and the file system's inode allocator. Writing their bytes goes on side by
                // side.
                let file = {
                    let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                    create_file(path, *executable)?
                };
                let file = fill_file(file, path, bytes, *executable)?;
                if written == Written::Arrived {
                    super::start_writeback(&file, 0, 0);
                }
                self.files.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Target::Chunk { file, index } => self.large[*file].land(*index, bytes, written),
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
                .try_for_each(|target| self.place(target, &blob, Written::Held))
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
    fn land(&self, index: usize, bytes: &[u8], written: Written) -> Result<()> {
        let path = &self.job.path;
        let file = self.open()?;
        let (_, offset) = self.chunks[index];
        file.write_all_at(bytes, offset)
            .map_err(|e| StoreError::io(path, e))?;
        if written == Written::Arrived {
            super::start_writeback(&file, offset, bytes.len() as u64);
        }
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

/// How [`make_folder_and_links`] makes a batch's folder.
#[derive(Clone, Copy, PartialEq)]
enum Make {
    /// With any parent not made yet (threads write batches in no order).
    WithParents,
    /// Itself only: its parent must be there.
    Alone,
    /// Not at all: it must be there (the export's own folder).
    Made,
}

/// Makes a batch's folder as `make` says, 0755 whatever the process's umask (a node may run
/// with 0077), and its symlinks. A folder that exists already (another batch of it made it)
/// is fine if it is a folder.
fn make_folder_and_links(batch: &Batch, make: Make) -> Result<()> {
    let folder = &batch.folder;
    let made = match make {
        Make::Made => Err(std::io::ErrorKind::AlreadyExists.into()),
        Make::WithParents | Make::Alone => new_folder(folder, make == Make::WithParents),
    };
    match made {
        Ok(()) => {
            // With its parents, `Ok` also means it was there already (see below).
            if make == Make::WithParents {
                is_folder(folder)?;
            }
            open_to_all(folder)?;
        }
        // Made already (by another batch of it, as a parent of one, or as the export's own
        // folder, by `Destination::prepare`): it must be a folder, not a link a colliding name
        // made (on a file system that folds case, say, where `plan` recreates no links, or one
        // made by whatever else writes there).
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => is_folder(folder)?,
        Err(err) => return Err(StoreError::io(folder, err)),
    }
    for (path, target) in &batch.symlinks {
        std::os::unix::fs::symlink(target, path).map_err(|e| StoreError::io(path, e))?;
    }
    Ok(())
}

/// Makes a folder 0755 less the process's umask (see [`open_to_all`]), and with `parents`
/// those it is in.
fn new_folder(folder: &Path, parents: bool) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .mode(0o755)
        .recursive(parents)
        .create(folder)
}

/// Gives a folder just made 0755, where the process's umask took some of it away.
fn open_to_all(folder: &Path) -> Result<()> {
    if umask() & 0o755 != 0 {
        fs::set_permissions(folder, fs::Permissions::from_mode(0o755))
            .map_err(|e| StoreError::io(folder, e))?;
    }
    Ok(())
}

/// Fails unless `path` is a folder itself (not a link to one).
fn is_folder(path: &Path) -> Result<()> {
    let meta = path
        .symlink_metadata()
        .map_err(|e| StoreError::io(path, e))?;
    if meta.is_dir() {
        return Ok(());
    }
    Err(StoreError::Refused {
        path: path.to_owned(),
        reason: "the tree has a folder here, but something else is in its place".into(),
    })
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
    fill_file(create_file(path, executable)?, path, bytes, executable)
}

/// Writes a new file's bytes and gives it its mode.
fn fill_file(mut file: fs::File, path: &Path, bytes: &[u8], executable: bool) -> Result<fs::File> {
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
    use std::path::{Path, PathBuf};

    /// Which of `links` stay inside a tree of `folders` and those links.
    fn inside(folders: &[&str], links: &[(&str, &str)]) -> Vec<bool> {
        let mut tree = Links::new(
            folders.iter().map(PathBuf::from),
            links
                .iter()
                .map(|(path, target)| (path.into(), target.into())),
        );
        links
            .iter()
            .map(|(path, _)| tree.stays_inside(Path::new(path)))
            .collect()
    }

    #[test]
    fn symlink_targets_are_followed_through_the_trees_links() {
        let plain = [
            ("l", "a/b"),
            ("d/l", "../x"),
            ("d/m", "./../d/."),
            ("r", "../x"),
            ("s", "d/../../x"),
            ("d/abs", "/etc/passwd"),
        ];
        assert_eq!(
            inside(&["d"], &plain),
            [true, true, true, false, false, false]
        );

        // Lexically inside, but `y` is the root: `y/../..` is the tree's grandparent.
        let chained = [("d/y", ".."), ("d/x", "y/../.."), ("d/z", "y/d/e")];
        assert_eq!(inside(&["d", "d/e"], &chained), [true, false, true]);

        // Through a link that itself leads out, and through a link to a link that does.
        let out = [("b", "/etc"), ("a", "b"), ("c", "a/passwd")];
        assert_eq!(inside(&[], &out), [false, false, false]);

        // `..` after a name the tree does not hold as a folder: a writer could make it a link.
        let absent = [("d/l", "nothing/.."), ("d/m", "nothing/here")];
        assert_eq!(inside(&["d"], &absent), [false, true]);

        // A loop is never followed to its end; targets the kernel refuses are refused.
        let long = "a/".repeat(3000);
        let refused = [
            ("p", "q"),
            ("q", "p"),
            ("s", "s"),
            ("e", ""),
            ("n", "a\0b"),
            ("g", long.as_str()),
        ];
        assert_eq!(inside(&[], &refused), [false; 6]);
    }

    #[test]
    fn an_export_is_taken_as_there_only_where_it_can_be_seen() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join("out");
        let tree = super::Exported {
            files: 2,
            dirs: 1,
            ..Default::default()
        };
        let empty = super::Exported {
            dirs: 1,
            ..Default::default()
        };
        assert!(!tree.is_in(&dir) && !empty.is_in(&dir), "no folder");
        std::fs::create_dir(&dir).expect("mkdir");
        assert!(!tree.is_in(&dir), "an empty folder, written elsewhere");
        assert!(empty.is_in(&dir), "an empty tree");
        std::fs::write(dir.join("f"), b"x").expect("write");
        assert!(tree.is_in(&dir));
    }

    #[test]
    fn a_long_chain_of_links_is_followed_once_a_link() {
        // Each link leads through the one before it. Asked from its start, each is followed
        // once; asked from its end, following stops 40 links down (about the kernel's limit), and
        // those links count as leaving. Either way the time is in proportion to the chain,
        // and the depth bounded.
        let chain: Vec<(String, String)> = (0..20_000)
            .map(|i| match i {
                0 => ("l0".to_owned(), ".".to_owned()),
                i => (format!("l{i}"), format!("l{}/./././.", i - 1)),
            })
            .collect();
        let mut chain: Vec<(&str, &str)> = chain
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        assert!(inside(&[], &chain).iter().all(|inside| *inside));
        chain.reverse();
        let asked = inside(&[], &chain);
        assert!(!asked[0] && asked[asked.len() - 1]);
    }
}
