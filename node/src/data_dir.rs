//! The data directory (DESIGN.md's contract): `--data-dir`, else `$PEERBUILD_DATA_DIR`, else the
//! user's data folder (`$XDG_DATA_HOME/peerbuild` or `~/.local/share/peerbuild`).
//!
//! Layout:
//! - `builds/ID/events.jsonl`: every event of a build, masked, appended as it happens;
//! - `builds/ID/result.json`: the final result; `builds/ID/pid` while the build runs;
//! - `builds/ID/artifacts/NAME/`: artifacts kept when `--artifacts` is not given;
//! - `projects/NAME/build-number`: CodeBuild's per-project build counter;
//! - `work/`: workspaces of running builds, removed when each build ends.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The resolved data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Resolves the data directory and creates it (mode 0700) if needed.
    pub fn open(flag: Option<&Path>) -> Result<Self> {
        let root = match flag {
            Some(path) => path.to_owned(),
            None => default_root()?,
        };
        create_private(&root)?;
        let root = root
            .canonicalize()
            .with_context(|| format!("cannot open the data directory {}", root.display()))?;
        Ok(DataDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn builds(&self) -> PathBuf {
        self.root.join("builds")
    }

    pub fn build(&self, id: &str) -> PathBuf {
        // A member id holds a `/`; keep each build's folder one level deep.
        self.builds().join(id.replace('/', "+"))
    }

    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Takes the next build number of `project`, safely against concurrent runs.
    pub fn next_build_number(&self, project: &str) -> Result<u64> {
        let dir = self.root.join("projects").join(project);
        create_private(&dir)?;
        let path = dir.join("build-number");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let _lock = FileLock::exclusive(&file)?;
        // Reading and writing through a shared reference keeps the lock's borrow valid.
        let mut handle = &file;
        let mut text = String::new();
        handle
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let next = text.trim().parse::<u64>().unwrap_or(0) + 1;
        handle.rewind()?;
        file.set_len(0)?;
        handle
            .write_all(format!("{next}\n").as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(next)
    }
}

fn default_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PEERBUILD_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("peerbuild"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no data directory: set --data-dir, PEERBUILD_DATA_DIR or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/peerbuild"))
}

/// Creates a folder readable by its owner only (with any missing parents).
pub fn create_private(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Writes a file readable by its owner only, atomically (temporary file and rename).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, contents)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(0o600))?;
    fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

/// An advisory lock held until dropped.
struct FileLock<'a>(&'a fs::File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a fs::File) -> Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we hold open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot lock the build counter");
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_numbers_count_up_per_project() {
        let root = std::env::temp_dir().join(format!("pb-data-{}", std::process::id()));
        let data = DataDir::open(Some(&root)).expect("opens");
        assert_eq!(data.next_build_number("a").expect("n"), 1);
        assert_eq!(data.next_build_number("a").expect("n"), 2);
        assert_eq!(data.next_build_number("b").expect("n"), 1);
        let mode = fs::metadata(&root).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::remove_dir_all(&root).ok();
    }
}
