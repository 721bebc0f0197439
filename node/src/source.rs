//! The source of a build, as DESIGN.md defines it: in a git checkout, the tracked files and the
//! untracked ones git does not ignore; elsewhere, every file. It is copied into the build's own
//! workspace, so a build never changes the user's folder.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A source folder and the files that belong to it.
#[derive(Debug)]
pub struct Source {
    pub root: PathBuf,
    /// Relative paths of files and symlinks, sorted.
    pub files: Vec<PathBuf>,
    /// The commit checked out, when the source is a git checkout.
    pub git_commit: Option<String>,
    /// Things that were left out, with the reason.
    pub skipped: Vec<String>,
}

/// Lists the source in `root`, leaving out `exclude` (the data directory, if it lies inside).
pub fn scan(root: &Path, exclude: &Path) -> Result<Source> {
    let root = root
        .canonicalize()
        .with_context(|| format!("cannot open the source folder {}", root.display()))?;
    if !root.is_dir() {
        bail!("the source {} is not a folder", root.display());
    }
    let mut source = Source {
        root: root.clone(),
        files: Vec::new(),
        git_commit: None,
        skipped: Vec::new(),
    };
    match git_files(&root) {
        Some(files) => {
            source.files = files;
            source.git_commit = git_head(&root);
        }
        None => walk(&root, Path::new(""), exclude, &mut source)?,
    }
    source.files.sort();
    Ok(source)
}

/// Whether `root` is inside a git work tree, judged by a `.git` in it or a parent (cheaper
/// than starting git for every plain folder).
fn inside_git_checkout(root: &Path) -> bool {
    root.ancestors()
        .any(|dir| dir.join(".git").symlink_metadata().is_ok())
}

/// The files git lists for a checkout, or `None` where `root` is not inside one (or git is not
/// installed).
fn git_files(root: &Path) -> Option<Vec<PathBuf>> {
    if !inside_git_checkout(root) {
        return None;
    }
    let output = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    let mut files: Vec<PathBuf> = output
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        // A tracked file deleted in the work tree is not part of the source.
        .filter(|p| root.join(p).symlink_metadata().is_ok())
        .collect();
    files.dedup();
    Some(files)
}

fn git_head(root: &Path) -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "--verify", "-q", "HEAD"])
        .current_dir(root)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !commit.is_empty()).then_some(commit)
}

fn walk(root: &Path, relative: &Path, exclude: &Path, source: &mut Source) -> Result<()> {
    let dir = root.join(relative);
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = relative.join(entry.file_name());
        let full = root.join(&path);
        if full == exclude {
            continue;
        }
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", full.display()))?;
        if kind.is_dir() {
            walk(root, &path, exclude, source)?;
        } else if kind.is_file() || kind.is_symlink() {
            source.files.push(path);
        } else {
            source
                .skipped
                .push(format!("{}: not a file, folder or symlink", path.display()));
        }
    }
    Ok(())
}

/// What a copy moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyStats {
    pub files: u64,
    pub bytes: u64,
}

/// Copies the source's files into `dest`, which must exist. Symlinks are copied as symlinks and
/// the executable bit is kept.
pub fn copy_into(source: &Source, dest: &Path) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    for relative in &source.files {
        let from = source.root.join(relative);
        let to = dest.join(relative);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        stats.bytes += copy_entry(&from, &to)
            .with_context(|| format!("cannot copy {} into the workspace", from.display()))?;
        stats.files += 1;
    }
    Ok(stats)
}

fn copy_entry(from: &Path, to: &Path) -> io::Result<u64> {
    let metadata = from.symlink_metadata()?;
    if metadata.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        return Ok(0);
    }
    let bytes = fs::copy(from, to)?;
    // Keep the mode bits, but never the set-id ones.
    let mode = metadata.permissions().mode() & 0o777;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pb-source-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn plain_folder_gives_every_file() {
        let dir = temp("plain");
        fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        fs::write(dir.join("a/b/c.txt"), "c").expect("write");
        fs::write(dir.join("top"), "t").expect("write");
        std::os::unix::fs::symlink("top", dir.join("link")).expect("symlink");
        let source = scan(&dir, Path::new("/nonexistent")).expect("scans");
        let files: Vec<_> = source
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(files, vec!["a/b/c.txt", "link", "top"]);
        assert_eq!(source.git_commit, None);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn git_checkout_leaves_ignored_files_home() {
        let dir = temp("git");
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(&dir)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .output()
                .expect("git runs")
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        fs::write(dir.join(".gitignore"), "target/\n").expect("write");
        fs::write(dir.join("tracked"), "t").expect("write");
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "first"]);
        fs::write(dir.join("untracked"), "u").expect("write");
        fs::create_dir_all(dir.join("target")).expect("mkdir");
        fs::write(dir.join("target/out"), "o").expect("write");
        let source = scan(&dir, Path::new("/nonexistent")).expect("scans");
        let files: Vec<_> = source
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(files, vec![".gitignore", "tracked", "untracked"]);
        assert_eq!(source.git_commit.map(|c| c.len()), Some(40));
        fs::remove_dir_all(&dir).ok();
    }
}
