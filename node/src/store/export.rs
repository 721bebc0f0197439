//! Exporting a tree from the store into a folder: every blob verified, files written in
//! parallel, large files assembled in order and checked against their whole-file digest,
//! executable bits, symlinks and empty folders restored. The export is built in a temporary
//! folder beside the destination and renamed into place, so a failure never leaves the
//! destination half-written.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use protocol::Digest;
use protocol::tree::{EntryKind, Tree, decode_chunk_list};

use super::parallel::ordered;
use super::{Result, Store, StoreError};

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
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
    let temporary = parent.join(format!(".{name}.peerbuild-export-{}", std::process::id()));
    let _ = fs::remove_dir_all(&temporary);
    fs::create_dir(&temporary).map_err(|e| StoreError::io(&temporary, e))?;
    match fill(store, root, &temporary) {
        Ok(exported) => {
            if let Err(err) = fs::rename(&temporary, dest) {
                let _ = fs::remove_dir_all(&temporary);
                return Err(StoreError::io(dest, err));
            }
            store.touch_root(root);
            Ok(exported)
        }
        Err(err) => {
            let _ = fs::remove_dir_all(&temporary);
            Err(err)
        }
    }
}

fn fill(store: &Store, root: &Digest, dir: &Path) -> Result<Exported> {
    let mut exported = Exported::default();
    let mut jobs = Vec::new();
    plan(store, root, dir, 0, &mut jobs, &mut exported)?;
    let (small, large): (Vec<FileJob>, Vec<FileJob>) =
        jobs.into_iter().partition(|j| j.chunks.is_none());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Large files are written on a thread of their own while the small ones go on, so the
    // disk is kept busy by both (a tree is usually a few big files among many small ones).
    // When one side fails, the other stops at its next file instead of writing on in vain.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let stopped = || failed.load(std::sync::atomic::Ordering::Relaxed);
    let fail = |err: StoreError| {
        failed.store(true, std::sync::atomic::Ordering::Relaxed);
        err
    };
    std::thread::scope(|scope| {
        let large = scope.spawn(|| {
            let mut written = Exported::default();
            for job in large {
                if stopped() {
                    break;
                }
                written.bytes += write_chunked(store, &job, workers).map_err(fail)?;
                written.files += 1;
            }
            Ok::<Exported, StoreError>(written)
        });
        // Small files are bound by file-system calls more than by the CPU, so more threads
        // than cores keep the disk busy.
        let small = ordered(
            small.into_iter(),
            workers * 4,
            128,
            |job| -> Result<u64> {
                let bytes = store.get(&job.digest)?;
                write_file(&job.path, &bytes, job.executable)?;
                Ok(bytes.len() as u64)
            },
            |written| {
                if stopped() {
                    return Err(StoreError::Refused {
                        path: dir.to_owned(),
                        reason: "the export stopped: writing a large file failed".into(),
                    });
                }
                exported.bytes += written.map_err(fail)?;
                exported.files += 1;
                Ok::<(), StoreError>(())
            },
        );
        let large = large
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // The large side's own error says more than the small side's "stopped".
        let large = large?;
        small?;
        exported.bytes += large.bytes;
        exported.files += large.files;
        Ok(exported)
    })
}

/// Creates folders and symlinks, and lists the files to write.
fn plan(
    store: &Store,
    tree: &Digest,
    dir: &Path,
    depth: usize,
    jobs: &mut Vec<FileJob>,
    exported: &mut Exported,
) -> Result<()> {
    let tree = Tree::decode(&store.get(tree)?)?;
    exported.dirs += 1;
    for entry in tree.entries() {
        let path = dir.join(std::ffi::OsStr::from_bytes(&entry.name));
        match &entry.kind {
            EntryKind::Dir { digest } => {
                fs::create_dir(&path).map_err(|e| StoreError::io(&path, e))?;
                plan(store, digest, &path, depth + 1, jobs, exported)?;
            }
            EntryKind::Symlink { target } => {
                let target = Path::new(std::ffi::OsStr::from_bytes(target));
                // A link leading out of the tree is never recreated (it could point a later
                // writer anywhere); the rest of the tree is still exported.
                if !stays_inside(target, depth) {
                    exported.skipped_symlinks += 1;
                    continue;
                }
                std::os::unix::fs::symlink(target, &path).map_err(|e| StoreError::io(&path, e))?;
                exported.symlinks += 1;
            }
            EntryKind::File {
                digest,
                executable,
                chunks,
            } => jobs.push(FileJob {
                path,
                digest: *digest,
                chunks: *chunks,
                executable: *executable,
            }),
        }
    }
    Ok(())
}

/// Whether a relative link target, from a link `depth` folders below the tree's root, stays
/// inside the tree.
fn stays_inside(target: &Path, depth: usize) -> bool {
    let mut level = depth as i64;
    for component in target.components() {
        match component {
            Component::Normal(_) => level += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                level -= 1;
                if level < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Writes a new file with its mode set at creation; a second `chmod` is needed only when the
/// process's umask would strip bits from 0644/0755.
fn write_file(path: &Path, bytes: &[u8], executable: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    file.write_all(bytes).map_err(|e| StoreError::io(path, e))?;
    if umask() & mode != 0 {
        set_mode(path, executable)?;
    }
    Ok(())
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

fn set_mode(path: &Path, executable: bool) -> Result<()> {
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| StoreError::io(path, e))
}

/// Writes a chunked file: chunks fetched and verified in parallel, written in order, and the
/// assembled file checked against its whole-file digest.
fn write_chunked(store: &Store, job: &FileJob, workers: usize) -> Result<u64> {
    let Some(list) = job.chunks else {
        return Ok(0);
    };
    let chunks = decode_chunk_list(&store.get(&list)?)?;
    let mut file = fs::File::create(&job.path).map_err(|e| StoreError::io(&job.path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    ordered(
        chunks.into_iter(),
        workers,
        workers * 4,
        |chunk| store.get(&chunk),
        |bytes| {
            let bytes = bytes?;
            hasher.update(&bytes);
            size += bytes.len() as u64;
            file.write_all(&bytes)
                .map_err(|e| StoreError::io(&job.path, e))
        },
    )?;
    drop(file);
    if Digest::from_parts(*hasher.finalize().as_bytes(), size) != job.digest {
        return Err(StoreError::Corrupt {
            digest: job.digest,
            detail: "its chunks do not assemble into the file's digest".into(),
        });
    }
    set_mode(&job.path, job.executable)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::stays_inside;
    use std::path::Path;

    #[test]
    fn symlink_targets_are_checked_lexically() {
        assert!(stays_inside(Path::new("a/b"), 0));
        assert!(stays_inside(Path::new("../x"), 1));
        assert!(!stays_inside(Path::new("../x"), 0));
        assert!(!stays_inside(Path::new("a/../../x"), 0));
        assert!(!stays_inside(Path::new("/etc/passwd"), 3));
    }
}
