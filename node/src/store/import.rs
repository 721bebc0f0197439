//! Importing a folder into the store as a tree: files hashed and stored in parallel, large ones
//! cut into content-defined chunks so a small edit stores a few new chunks, unchanged files
//! taken from the stat cache without being read, and one sync before the root is published.

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::Digest;
use protocol::tree::{Entry, EntryKind, Tree, encode_chunk_list};

use super::parallel::ordered;
use super::statcache::{Hashed, Look, StatCache};
use super::{CHUNK_AVG_BYTES, CHUNK_MAX_BYTES, CHUNK_MIN_BYTES, Result, Store, StoreError};

/// Files larger than this are streamed and their chunks stored in parallel; smaller ones are
/// read whole, many files in parallel.
const LARGE_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// What an import did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Imported {
    pub root: Option<Digest>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of all files, as they are on disk uncompressed.
    pub bytes: u64,
    /// Bytes newly written to the store (compressed), after deduplication.
    pub new_bytes: u64,
    /// Files that were read (the rest came from the stat cache).
    pub files_read: u64,
}

enum Node {
    File { index: usize },
    Dir(Vec<(Vec<u8>, Node)>),
    Symlink(Vec<u8>),
}

struct FileJob {
    relative: Vec<u8>,
    path: PathBuf,
    look: Look,
    executable: bool,
}

/// Whether an import keeps a stat cache for the folder (worth it only for folders imported
/// again, such as sources).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Statting {
    Cached,
    Once,
}

/// Imports every file, folder and symlink under `root`. Devices, sockets and pipes are refused.
pub fn import_dir(store: &Store, root: &Path, what: &str) -> Result<Imported> {
    let mut jobs = Vec::new();
    let node = walk(root, Path::new(""), &mut jobs)?;
    finish(store, root, node, jobs, what, Statting::Cached)
}

/// Imports a folder that will not be imported again (a scratch copy of artifacts): no stat
/// cache is kept for it.
pub fn import_dir_once(store: &Store, root: &Path, what: &str) -> Result<Imported> {
    let mut jobs = Vec::new();
    let node = walk(root, Path::new(""), &mut jobs)?;
    finish(store, root, node, jobs, what, Statting::Once)
}

/// Imports the listed files (relative to `root`; folders are implied), as a source is sent.
pub fn import_files(store: &Store, root: &Path, files: &[PathBuf], what: &str) -> Result<Imported> {
    let mut jobs = Vec::new();
    let mut top = Node::Dir(Vec::new());
    for relative in files {
        let path = root.join(relative);
        let metadata = path
            .symlink_metadata()
            .map_err(|e| StoreError::io(&path, e))?;
        let leaf = leaf(&path, relative, &metadata, &mut jobs)?;
        insert(&mut top, relative, leaf);
    }
    finish(store, root, top, jobs, what, Statting::Cached)
}

fn insert(node: &mut Node, relative: &Path, leaf: Node) {
    let mut node = node;
    let components: Vec<&[u8]> = relative.iter().map(|c| c.as_bytes()).collect();
    let Some((last, parents)) = components.split_last() else {
        return;
    };
    for name in parents {
        let Node::Dir(children) = node else {
            return;
        };
        let position = match children.iter().position(|(n, _)| n == name) {
            Some(position) => position,
            None => {
                children.push((name.to_vec(), Node::Dir(Vec::new())));
                children.len() - 1
            }
        };
        node = &mut children[position].1;
    }
    if let Node::Dir(children) = node {
        children.push((last.to_vec(), leaf));
    }
}

fn walk(root: &Path, relative: &Path, jobs: &mut Vec<FileJob>) -> Result<Node> {
    let dir = root.join(relative);
    let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
        let path = entry.path();
        let child_relative = relative.join(entry.file_name());
        let metadata = path
            .symlink_metadata()
            .map_err(|e| StoreError::io(&path, e))?;
        let node = if metadata.is_dir() {
            walk(root, &child_relative, jobs)?
        } else {
            leaf(&path, &child_relative, &metadata, jobs)?
        };
        children.push((entry.file_name().as_bytes().to_vec(), node));
    }
    Ok(Node::Dir(children))
}

fn leaf(
    path: &Path,
    relative: &Path,
    metadata: &fs::Metadata,
    jobs: &mut Vec<FileJob>,
) -> Result<Node> {
    let kind = metadata.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(path).map_err(|e| StoreError::io(path, e))?;
        return Ok(Node::Symlink(target.as_os_str().as_bytes().to_vec()));
    }
    if !kind.is_file() {
        return Err(StoreError::Refused {
            path: path.to_owned(),
            reason: "not a regular file, folder or symlink (a device, socket or pipe cannot be stored); remove it or leave it out".into(),
        });
    }
    jobs.push(FileJob {
        relative: relative.as_os_str().as_bytes().to_vec(),
        path: path.to_owned(),
        look: Look::of(metadata),
        executable: metadata.permissions().mode() & 0o111 != 0,
    });
    Ok(Node::File {
        index: jobs.len() - 1,
    })
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn finish(
    store: &Store,
    root: &Path,
    node: Node,
    jobs: Vec<FileJob>,
    what: &str,
    statting: Statting,
) -> Result<Imported> {
    let _lock = store.lock_shared()?;
    let started_ns = now_ns();
    let mut cache = match statting {
        Statting::Cached => StatCache::load(&store.statcache_dir(), root),
        Statting::Once => StatCache::default(),
    };
    let mut imported = Imported::default();
    let mut hashed: Vec<Option<Hashed>> = vec![None; jobs.len()];
    let mut small = Vec::new();
    let mut large = Vec::new();
    for (index, job) in jobs.iter().enumerate() {
        imported.files += 1;
        imported.bytes += job.look.size;
        match cache
            .lookup(&job.relative, &job.look)
            .filter(|h| still_stored(store, h))
        {
            Some(hit) => hashed[index] = Some(hit),
            None if job.look.size > LARGE_FILE_BYTES => large.push(index),
            None => small.push(index),
        }
    }
    imported.files_read = (small.len() + large.len()) as u64;
    // Small files are read, hashed and compressed; with packs there are no per-file writes
    // to wait on, so two threads a core are enough.
    ordered(
        small.iter().copied(),
        workers() * 2,
        128,
        |index| (index, store_small(store, &jobs[index].path)),
        |(index, result)| {
            let (hash, written) = result?;
            imported.new_bytes += written;
            hashed[index] = Some(hash);
            Ok::<(), StoreError>(())
        },
    )?;
    for index in large {
        let (hash, written) = store_large(store, &jobs[index].path)?;
        imported.new_bytes += written;
        hashed[index] = Some(hash);
    }
    for (job, hash) in jobs.iter().zip(&hashed) {
        if let Some(hash) = hash {
            cache.record(job.relative.clone(), job.look, *hash, started_ns);
        }
    }
    let root_digest = store_tree(store, node, &jobs, &hashed, &mut imported)?;
    // Only new objects need to be made durable; an import that found everything stored
    // already (a rebuild of an unchanged source) skips the file-system-wide sync. The open
    // pack is published after the sync, and the root after that.
    store.flush(imported.new_bytes)?;
    store.add_root(&root_digest, what)?;
    if statting == Statting::Cached {
        cache.save(&store.temporary_path("statcache"));
    }
    imported.root = Some(root_digest);
    Ok(imported)
}

/// Whether the objects a cached file needs are still in the store (gc may have removed them).
fn still_stored(store: &Store, hashed: &Hashed) -> bool {
    match hashed.chunks {
        None => store.contains(&hashed.digest),
        Some(list) => store.contains(&list),
    }
}

/// Reads a file whole and stores it as one blob, or as chunks and a chunk list.
fn store_small(store: &Store, path: &Path) -> Result<(Hashed, u64)> {
    let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
    if bytes.len() <= CHUNK_MIN_BYTES {
        let (digest, written) = store.put(&bytes)?;
        return Ok((
            Hashed {
                digest,
                chunks: None,
            },
            written,
        ));
    }
    let mut chunks = Vec::new();
    let mut written = 0;
    for chunk in
        fastcdc::v2020::FastCDC::new(&bytes, CHUNK_MIN_BYTES, CHUNK_AVG_BYTES, CHUNK_MAX_BYTES)
    {
        let (digest, new) = store.put(&bytes[chunk.offset..chunk.offset + chunk.length])?;
        chunks.push(digest);
        written += new;
    }
    chunked(store, Digest::of(&bytes), chunks, written)
}

fn chunked(
    store: &Store,
    whole: Digest,
    chunks: Vec<Digest>,
    written: u64,
) -> Result<(Hashed, u64)> {
    if chunks.len() == 1 {
        return Ok((
            Hashed {
                digest: whole,
                chunks: None,
            },
            written,
        ));
    }
    let (list, new) = store.put(&encode_chunk_list(&chunks))?;
    Ok((
        Hashed {
            digest: whole,
            chunks: Some(list),
        },
        written + new,
    ))
}

/// Streams a large file: chunk boundaries found in order by one thread reading blocks, chunks
/// hashed, compressed and written by several threads, the whole file hashed in order as the
/// chunks come back. A chunk is a range of the block it was cut from, so its bytes are read
/// into memory once and never copied on their way to the threads that store them.
fn store_large(store: &Store, path: &Path) -> Result<(Hashed, u64)> {
    let file = fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut chunks = Vec::new();
    let mut written = 0u64;
    let workers = workers();
    ordered(
        Pieces::new(path, file),
        workers,
        workers * 4,
        |piece| {
            let piece = piece?;
            let (digest, new) = store.put(piece.bytes())?;
            Ok::<_, StoreError>((digest, new, piece))
        },
        |result| {
            let (digest, new, piece) = result?;
            hasher.update(piece.bytes());
            size += piece.bytes().len() as u64;
            chunks.push(digest);
            written += new;
            Ok::<(), StoreError>(())
        },
    )?;
    let whole = Digest::from_parts(*hasher.finalize().as_bytes(), size);
    chunked(store, whole, chunks, written)
}

/// The size of the blocks a large file is read in: several chunks' worth, so a chunk always
/// lies within one block and moving the unfinished tail of a block to the next copies little.
const BLOCK_BYTES: usize = 4 * CHUNK_MAX_BYTES;

/// Blocks kept for reuse once no chunk refers to them (a fresh block costs page faults). With
/// at most `workers * 4` chunks in flight, in file order, a few blocks are in use at a time.
const SPARE_BLOCKS: usize = 4;

/// One chunk of a large file: a range of the block it was cut from.
struct Piece {
    block: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        &self.block[self.start..self.end]
    }
}

/// A large file's chunks, in order, with the boundaries `fastcdc::v2020::StreamCDC` finds: each
/// cut is made in the next `CHUNK_MAX_BYTES` bytes (fewer only at the end of the file).
struct Pieces<'a> {
    path: &'a Path,
    file: fs::File,
    masks: (u64, u64),
    block: Arc<Vec<u8>>,
    /// Where the next chunk starts in `block`, and how many of its bytes were read.
    start: usize,
    filled: usize,
    end_of_file: bool,
    failed: bool,
    spare: Vec<Arc<Vec<u8>>>,
}

impl<'a> Pieces<'a> {
    fn new(path: &'a Path, file: fs::File) -> Pieces<'a> {
        Pieces {
            path,
            file,
            masks: fastcdc::v2020::select_masks(
                CHUNK_AVG_BYTES,
                fastcdc::v2020::Normalization::Level1,
            ),
            block: Arc::new(Vec::new()),
            start: 0,
            filled: 0,
            end_of_file: false,
            failed: false,
            spare: Vec::new(),
        }
    }

    /// Moves the unfinished tail of the current block to the front of a free block and reads
    /// after it until that block is full or the file ends.
    fn refill(&mut self) -> std::io::Result<()> {
        let mut next = match self.spare.iter().position(|b| Arc::strong_count(b) == 1) {
            Some(position) => self.spare.swap_remove(position),
            None => Arc::new(vec![0u8; BLOCK_BYTES]),
        };
        let tail = self.filled - self.start;
        let mut filled = tail;
        {
            // Only `spare` held the block, and it gave it up: nothing else can refer to it.
            let Some(buffer) = Arc::get_mut(&mut next) else {
                return Err(std::io::Error::other("a reused block is still in use"));
            };
            buffer[..tail].copy_from_slice(&self.block[self.start..self.filled]);
            while filled < buffer.len() && !self.end_of_file {
                match self.file.read(&mut buffer[filled..]) {
                    Ok(0) => self.end_of_file = true,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let previous = std::mem::replace(&mut self.block, next);
        if !previous.is_empty() && self.spare.len() < SPARE_BLOCKS {
            self.spare.push(previous);
        }
        self.start = 0;
        self.filled = filled;
        Ok(())
    }
}

impl Iterator for Pieces<'_> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        if self.failed {
            return None;
        }
        if self.filled - self.start < CHUNK_MAX_BYTES
            && !self.end_of_file
            && let Err(e) = self.refill()
        {
            self.failed = true;
            return Some(Err(StoreError::io(self.path, e)));
        }
        let available = &self.block[self.start..self.filled];
        let window = &available[..available.len().min(CHUNK_MAX_BYTES)];
        let (mask_s, mask_l) = self.masks;
        let (_, length) = fastcdc::v2020::cut(
            window,
            CHUNK_MIN_BYTES,
            CHUNK_AVG_BYTES,
            CHUNK_MAX_BYTES,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        if length == 0 {
            return None;
        }
        let piece = Piece {
            block: Arc::clone(&self.block),
            start: self.start,
            end: self.start + length,
        };
        self.start += length;
        Some(Ok(piece))
    }
}

fn store_tree(
    store: &Store,
    node: Node,
    jobs: &[FileJob],
    hashed: &[Option<Hashed>],
    imported: &mut Imported,
) -> Result<Digest> {
    let Node::Dir(children) = node else {
        return Err(StoreError::Refused {
            path: PathBuf::from("."),
            reason: "the root of an import must be a folder".into(),
        });
    };
    imported.dirs += 1;
    let mut entries = Vec::with_capacity(children.len());
    for (name, child) in children {
        let kind = match child {
            Node::File { index } => {
                let Some(hash) = hashed[index] else {
                    return Err(StoreError::Refused {
                        path: jobs[index].path.clone(),
                        reason: "was not hashed".into(),
                    });
                };
                EntryKind::File {
                    digest: hash.digest,
                    executable: jobs[index].executable,
                    chunks: hash.chunks,
                }
            }
            Node::Symlink(target) => {
                imported.symlinks += 1;
                EntryKind::Symlink { target }
            }
            dir @ Node::Dir(_) => EntryKind::Dir {
                digest: store_tree(store, dir, jobs, hashed, imported)?,
            },
        };
        entries.push(Entry { name, kind });
    }
    let tree = Tree::new(entries)?;
    let (digest, written) = store.put(&tree.encode())?;
    imported.new_bytes += written;
    Ok(digest)
}
