//! Artifact selection and copying: which files of a finished build are its output, chosen from an
//! `artifacts` block the way CodeBuild chooses them, and how they are copied out.
//!
//! # How paths are chosen
//!
//! - **Base folders.** Without `base-directory` the base folder is the build directory. A plain
//!   `base-directory` names one folder; one with glob characters (`*?[{\`) may match several. The
//!   base folders themselves never appear in output paths: an output path is the path relative to
//!   the base folder it was found in. A `base-directory` that matches no folder is an error.
//! - **Matching.** `files` and `exclude-paths` are globs relative to the base folder, matched with
//!   `/` as a literal separator: `*` stays within one folder, `**` crosses folders, and `**/*`
//!   matches everything at any depth. A leading `./` is ignored; absolute patterns and `..` are
//!   refused because artifacts come from inside the build directory.
//! - **The directory rule.** A path is selected when a `files` pattern matches the path itself *or
//!   any of its parent folders*. So `dist` and `dist/*` select everything under `dist`, exactly
//!   like `dist/**/*`, because `dist/*` matches the subfolder `dist/sub` and a matched folder
//!   brings its whole contents (CodeBuild behaves this way); `dist/*.js` selects the `.js` files
//!   directly in `dist`, plus the contents of any folder in `dist` whose name ends in `.js`. An
//!   empty folder that is selected appears as an [`EntryKind::Dir`] entry. `exclude-paths` use
//!   the same rule, so excluding a folder excludes its contents, and exclusion wins over `files`.
//! - **`discard-paths: yes`** flattens every output path to its file name; two different files
//!   with the same name are an error, never a silent overwrite. Empty folders are dropped then.
//! - **Symlinks.** A symlink that resolves outside the build directory (absolute, through `..`, or
//!   through a symlinked parent folder) is never followed: it is skipped with a warning. With
//!   `enable-symlinks: yes` (and without `discard-paths`, where a relative link could not stay
//!   correct) a symlink that resolves inside the base folder is kept as a symlink with a relative
//!   target. Every other symlink that resolves inside the build directory is replaced by what it
//!   points to: a file is copied, a folder is walked like a real one (a link back to a folder
//!   being walked is skipped with a warning, so link loops end).
//! - **No match.** A `files` list that selects nothing is [`ArtifactError::NoMatch`], as CodeBuild
//!   fails UPLOAD_ARTIFACTS with "no matching artifact paths found".
//!
//! Only the subtrees that a pattern can reach are walked: the walk starts at each pattern's
//! leading folders without glob characters, so `dist/**/*` never reads `node_modules`.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use protocol::buildspec::ArtifactSet;
use serde::Serialize;

/// Folders nested deeper than this are refused; real trees never come close, and the limit stops
/// a farm of symlinked folders from being walked for ever.
const MAX_DEPTH: usize = 256;

/// The files an artifact block selects, ready to be copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// Sorted by `dest`; no two entries share a `dest`.
    pub entries: Vec<Entry>,
    /// Paths that were selected but skipped, such as symlinks leading out of the build directory.
    pub warnings: Vec<String>,
}

/// One selected path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path inside the build directory. For a file reached through a symlink it is the
    /// file the link resolves to; for a kept symlink it is the link itself.
    pub source: PathBuf,
    /// Relative path in the output, made of plain components only.
    pub dest: PathBuf,
    pub kind: EntryKind,
}

/// What an entry is written as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File {
        executable: bool,
    },
    /// A symlink kept by `enable-symlinks`; `target` is relative to the link's folder.
    Symlink {
        target: PathBuf,
    },
    /// An empty folder that was selected.
    Dir,
}

/// What [`copy_out`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopySummary {
    pub files: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Why artifacts could not be selected or copied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    #[error("invalid glob {pattern:?}")]
    InvalidPattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    /// Artifact paths are relative to the build directory, so `/x` and `../x` are refused.
    #[error("pattern {pattern:?} must be relative and stay inside the build directory")]
    PatternOutside { pattern: String },
    #[error("base-directory {pattern:?} matches no folder inside the build directory")]
    BaseDirectoryNotFound { pattern: String },
    #[error("no matching artifact paths found for {patterns:?}")]
    NoMatch { patterns: Vec<String> },
    /// Two different sources need the same output path (or one needs it as a folder).
    #[error(
        "{} and {} would both be written to {}",
        .first.display(),
        .second.display(),
        .dest.display()
    )]
    Collision {
        dest: PathBuf,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("folders nest deeper than {MAX_DEPTH} levels at {}", .path.display())]
    TooDeep { path: PathBuf },
    #[error("cannot read {}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    /// Outputs are never mixed: an existing destination must be an empty folder.
    #[error("{} already exists and is not an empty folder", .path.display())]
    DestinationInUse { path: PathBuf },
    #[error("artifact path {} is not a plain relative path inside the output", .dest.display())]
    UnsafeDestination { dest: PathBuf },
    #[error("{} is a symlink; files are collected from real folders only", .path.display())]
    RootIsLink { path: PathBuf },
}

/// Chooses the files that `set` selects in `build_dir`, by the rules in the module docs.
pub fn select(build_dir: &Path, set: &ArtifactSet) -> Result<Selected, ArtifactError> {
    // The folder itself must not be a link (its parents may be: the data directory can live
    // behind one): collecting from a link would collect from wherever it points.
    let is_link = fs::symlink_metadata(build_dir).map_err(|source| ArtifactError::Read {
        path: build_dir.to_path_buf(),
        source,
    })?;
    if is_link.file_type().is_symlink() {
        return Err(ArtifactError::RootIsLink {
            path: build_dir.to_path_buf(),
        });
    }
    let build_root = fs::canonicalize(build_dir).map_err(|source| ArtifactError::Read {
        path: build_dir.to_path_buf(),
        source,
    })?;
    let rules = Rules {
        files: Patterns::new(&set.files)?,
        excludes: Patterns::new(&set.exclude_paths)?,
        flatten: set.discard_paths,
    };
    let keep_symlinks = set.enable_symlinks && !set.discard_paths;
    let roots = rules.files.walk_roots();
    let mut entries = Vec::new();
    let mut warnings = Vec::new();
    for base_root in base_folders(&build_root, set.base_directory.as_deref())? {
        for node in Walk::run(&build_root, &base_root, keep_symlinks, &roots)? {
            match rules.choose(node) {
                Choice::Take(entry) => entries.push(entry),
                Choice::Warn { path, reason } => {
                    warnings.push(warning(&build_root, &path, &reason));
                }
                Choice::Drop => {}
            }
        }
    }
    if entries.is_empty() {
        return Err(ArtifactError::NoMatch {
            patterns: set.files.clone(),
        });
    }
    Ok(Selected {
        entries: finish(entries)?,
        warnings,
    })
}

/// Copies the selection into `dest_dir`, which must not exist yet or be an empty folder.
///
/// Everything is written into a fresh sibling folder first and renamed into place at the end, so
/// a failure leaves no half-written output. Files get mode 0755 when executable and 0644
/// otherwise, so outputs do not depend on the build's umask or odd permission bits. Nothing is
/// ever written through a symlink: parent folders are checked to be real folders and files are
/// created with `create_new`.
pub fn copy_out(selected: &Selected, dest_dir: &Path) -> Result<CopySummary, ArtifactError> {
    check_destination_free(dest_dir)?;
    let staging = make_staging_dir(dest_dir)?;
    let result = fill(selected, &staging).and_then(|summary| {
        fs::rename(&staging, dest_dir)
            .map(|()| summary)
            .map_err(|source| ArtifactError::Write {
                path: dest_dir.to_path_buf(),
                source,
            })
    });
    if result.is_err() {
        // Cleaning up is best effort: the error that stopped the copy is the one worth reporting.
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// A compiled `files` or `exclude-paths` list.
struct Patterns {
    /// The patterns with `./`, empty and `.` components removed; `**/*` stands for "everything".
    cleaned: Vec<String>,
    set: GlobSet,
}

impl Patterns {
    fn new(patterns: &[String]) -> Result<Self, ArtifactError> {
        let mut builder = GlobSetBuilder::new();
        let mut cleaned = Vec::new();
        for pattern in patterns {
            let mut clean = clean_pattern(pattern)?;
            if clean.is_empty() {
                clean = "**/*".to_owned();
            }
            builder.add(compile_glob(&clean, pattern)?);
            cleaned.push(clean);
        }
        let set = builder
            .build()
            .map_err(|source| ArtifactError::InvalidPattern {
                pattern: patterns.join(" "),
                source,
            })?;
        Ok(Self { cleaned, set })
    }

    /// The directory rule: a pattern matching a folder selects everything inside it.
    fn selects(&self, rel: &Path) -> bool {
        rel.ancestors()
            .filter(|path| !path.as_os_str().is_empty())
            .any(|path| self.set.is_match(path))
    }

    /// The folders to walk: each pattern's leading literal folders, without nested duplicates.
    fn walk_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.cleaned.iter().map(|p| literal_prefix(p)).collect();
        // Paths sort component by component, so a folder sorts directly before its contents.
        roots.sort();
        let mut kept: Vec<PathBuf> = Vec::new();
        for root in roots {
            if kept.last().is_none_or(|last| !root.starts_with(last)) {
                kept.push(root);
            }
        }
        kept
    }
}

/// Removes `./`, repeated `/` and a trailing `/`; refuses absolute patterns and `..`.
fn clean_pattern(pattern: &str) -> Result<String, ArtifactError> {
    let parts: Vec<&str> = pattern
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if pattern.starts_with('/') || parts.contains(&"..") {
        return Err(ArtifactError::PatternOutside {
            pattern: pattern.to_owned(),
        });
    }
    Ok(parts.join("/"))
}

fn compile_glob(clean: &str, original: &str) -> Result<Glob, ArtifactError> {
    GlobBuilder::new(clean)
        .literal_separator(true)
        .build()
        .map_err(|source| ArtifactError::InvalidPattern {
            pattern: original.to_owned(),
            source,
        })
}

fn has_glob_meta(text: &str) -> bool {
    text.contains(['*', '?', '[', '{', '\\'])
}

/// The leading components of a cleaned pattern that contain no glob characters.
fn literal_prefix(clean: &str) -> PathBuf {
    clean
        .split('/')
        .take_while(|part| !has_glob_meta(part))
        .collect()
}

/// The canonical base folders that `base-directory` names.
fn base_folders(build_root: &Path, base: Option<&str>) -> Result<Vec<PathBuf>, ArtifactError> {
    let Some(pattern) = base else {
        return Ok(vec![build_root.to_path_buf()]);
    };
    let clean = clean_pattern(pattern)?;
    let mut found = Vec::new();
    if has_glob_meta(&clean) {
        let glob = compile_glob(&clean, pattern)?.compile_matcher();
        let prefix = literal_prefix(&clean);
        if let Some(start) = resolve_inside(build_root, &prefix)? {
            let mut finder = FolderFinder {
                build_root,
                glob: &glob,
                found: &mut found,
                stack: Vec::new(),
            };
            finder.visit(prefix, start)?;
        }
    } else if let Some(folder) = resolve_inside(build_root, Path::new(&clean))?
        && folder.is_dir()
    {
        found.push(folder);
    }
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err(ArtifactError::BaseDirectoryNotFound {
            pattern: pattern.to_owned(),
        });
    }
    Ok(found)
}

/// The canonical path of `rel` under the build root, or `None` when nothing is there or it
/// resolves outside the build directory.
fn resolve_inside(build_root: &Path, rel: &Path) -> Result<Option<PathBuf>, ArtifactError> {
    let path = build_root.join(rel);
    match fs::canonicalize(&path) {
        Ok(resolved) if resolved.starts_with(build_root) => Ok(Some(resolved)),
        Ok(_) => Ok(None),
        Err(error) if is_missing(&error) => Ok(None),
        Err(source) => Err(ArtifactError::Read { path, source }),
    }
}

/// Finds the folders that a `base-directory` glob matches, relative to the build directory.
struct FolderFinder<'a> {
    build_root: &'a Path,
    glob: &'a GlobMatcher,
    found: &'a mut Vec<PathBuf>,
    /// Canonical folders being walked, to stop at symlinks that lead back into them.
    stack: Vec<PathBuf>,
}

impl FolderFinder<'_> {
    fn visit(&mut self, rel: PathBuf, folder: PathBuf) -> Result<(), ArtifactError> {
        if self.stack.len() > MAX_DEPTH {
            return Err(ArtifactError::TooDeep { path: folder });
        }
        if !rel.as_os_str().is_empty() && self.glob.is_match(&rel) {
            self.found.push(folder.clone());
        }
        for name in sorted_children(&folder)? {
            // A child that cannot be resolved (a dangling link, say) cannot be a base folder.
            let Ok(child) = fs::canonicalize(folder.join(&name)) else {
                continue;
            };
            let inside = child.starts_with(self.build_root) && child.is_dir();
            let is_loop = child == folder || self.stack.iter().any(|open| open.starts_with(&child));
            if inside && !is_loop {
                self.stack.push(folder.clone());
                let result = self.visit(rel.join(&name), child);
                self.stack.pop();
                result?;
            }
        }
        Ok(())
    }
}

/// One path found under a base folder, with symlinks already resolved.
#[derive(Debug)]
struct Node {
    /// Path relative to the base folder.
    rel: PathBuf,
    /// See [`Entry::source`]; for a skipped path, the path itself.
    source: PathBuf,
    kind: NodeKind,
}

#[derive(Debug)]
enum NodeKind {
    File {
        executable: bool,
    },
    Symlink {
        target: PathBuf,
    },
    EmptyDir,
    /// Not followed; `may_hold_matches` is true when it stands for a folder whose contents a
    /// pattern might have selected, so it is worth a warning even when not matched itself.
    Skipped {
        reason: String,
        may_hold_matches: bool,
    },
}

/// The walk of one base folder.
struct Walk<'a> {
    build_root: &'a Path,
    base_root: &'a Path,
    keep_symlinks: bool,
    /// Canonical folders being walked, to stop at symlinks that lead back into them.
    stack: Vec<PathBuf>,
    nodes: Vec<Node>,
}

impl<'a> Walk<'a> {
    fn run(
        build_root: &'a Path,
        base_root: &'a Path,
        keep_symlinks: bool,
        roots: &[PathBuf],
    ) -> Result<Vec<Node>, ArtifactError> {
        let mut walk = Walk {
            build_root,
            base_root,
            keep_symlinks,
            stack: Vec::new(),
            nodes: Vec::new(),
        };
        for root in roots {
            walk.root(root)?;
        }
        Ok(walk.nodes)
    }

    /// Walks from one literal prefix, after checking that its folders stay inside the build.
    fn root(&mut self, rel: &Path) -> Result<(), ArtifactError> {
        let base_root = self.base_root;
        let Some(name) = rel.file_name() else {
            return self.dir(rel, base_root, 0);
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent_path = base_root.join(parent_rel);
        let parent = match fs::canonicalize(&parent_path) {
            Ok(parent) => parent,
            Err(error) if is_missing(&error) => return Ok(()),
            Err(source) => {
                return Err(ArtifactError::Read {
                    path: parent_path,
                    source,
                });
            }
        };
        if !parent.starts_with(self.build_root) {
            let reason = "its folder resolves outside the build directory".to_owned();
            self.skip(parent_rel.to_path_buf(), parent_path, reason, true);
            return Ok(());
        }
        self.visit(rel.to_path_buf(), &parent, name, rel.components().count())
    }

    fn visit(
        &mut self,
        rel: PathBuf,
        parent: &Path,
        name: &OsStr,
        depth: usize,
    ) -> Result<(), ArtifactError> {
        let path = parent.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(error) if is_missing(&error) => return Ok(()),
            Err(source) => return Err(ArtifactError::Read { path, source }),
        };
        let file_type = meta.file_type();
        if file_type.is_symlink() {
            return self.symlink(rel, path, depth);
        }
        if file_type.is_dir() {
            return self.dir(&rel, &path, depth);
        }
        if file_type.is_file() {
            let executable = is_executable(&meta);
            self.push(rel, path, NodeKind::File { executable });
        } else {
            let reason = "is not a regular file, folder or symlink".to_owned();
            self.skip(rel, path, reason, false);
        }
        Ok(())
    }

    /// Walks a folder; `path` is canonical.
    fn dir(&mut self, rel: &Path, path: &Path, depth: usize) -> Result<(), ArtifactError> {
        if depth > MAX_DEPTH {
            return Err(ArtifactError::TooDeep {
                path: path.to_path_buf(),
            });
        }
        let names = sorted_children(path)?;
        if names.is_empty() && !rel.as_os_str().is_empty() {
            self.push(rel.to_path_buf(), path.to_path_buf(), NodeKind::EmptyDir);
        }
        self.stack.push(path.to_path_buf());
        let result = names
            .iter()
            .try_for_each(|name| self.visit(rel.join(name), path, name, depth + 1));
        self.stack.pop();
        result
    }

    fn symlink(&mut self, rel: PathBuf, path: PathBuf, depth: usize) -> Result<(), ArtifactError> {
        let Ok(resolved) = fs::canonicalize(&path) else {
            self.skip(
                rel,
                path,
                "is a symlink that leads nowhere".to_owned(),
                false,
            );
            return Ok(());
        };
        if !resolved.starts_with(self.build_root) {
            let reason = format!(
                "is a symlink to {}, outside the build directory",
                resolved.display()
            );
            let may_hold_matches = resolved.is_dir();
            self.skip(rel, path, reason, may_hold_matches);
            return Ok(());
        }
        if self.keep_symlinks
            && let Ok(inside) = resolved.strip_prefix(self.base_root)
        {
            let target = relative_target(&rel, inside);
            self.push(rel, path, NodeKind::Symlink { target });
            return Ok(());
        }
        let meta = fs::metadata(&resolved).map_err(|source| ArtifactError::Read {
            path: resolved.clone(),
            source,
        })?;
        if meta.is_dir() {
            if self.stack.iter().any(|open| open.starts_with(&resolved)) {
                let reason = "is a symlink to a folder that contains it".to_owned();
                self.skip(rel, path, reason, false);
                return Ok(());
            }
            return self.dir(&rel, &resolved, depth);
        }
        if meta.is_file() {
            let executable = is_executable(&meta);
            self.push(rel, resolved, NodeKind::File { executable });
        } else {
            let reason = "is a symlink to something that is not a file or folder".to_owned();
            self.skip(rel, path, reason, false);
        }
        Ok(())
    }

    fn push(&mut self, rel: PathBuf, source: PathBuf, kind: NodeKind) {
        self.nodes.push(Node { rel, source, kind });
    }

    fn skip(&mut self, rel: PathBuf, source: PathBuf, reason: String, may_hold_matches: bool) {
        let kind = NodeKind::Skipped {
            reason,
            may_hold_matches,
        };
        self.push(rel, source, kind);
    }
}

fn sorted_children(folder: &Path) -> Result<Vec<OsString>, ArtifactError> {
    let read = |source| ArtifactError::Read {
        path: folder.to_path_buf(),
        source,
    };
    let mut names = fs::read_dir(folder)
        .map_err(read)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    // Sorting makes the walk, and so the warnings, the same on every run.
    names.sort();
    Ok(names)
}

fn is_missing(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn is_executable(meta: &fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

/// The target of a link at `link` pointing to `target`, both relative to the output root,
/// written relative to the link's folder.
fn relative_target(link: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component> = link
        .parent()
        .map_or(Vec::new(), |p| p.components().collect());
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut relative: PathBuf = from[common..].iter().map(|_| "..").collect();
    relative.extend(&to[common..]);
    if relative.as_os_str().is_empty() {
        relative.push(".");
    }
    relative
}

/// What to do with one walked path.
enum Choice {
    Take(Entry),
    Warn { path: PathBuf, reason: String },
    Drop,
}

/// The pure part of selection: patterns and options applied to walked paths.
struct Rules {
    files: Patterns,
    excludes: Patterns,
    flatten: bool,
}

impl Rules {
    fn choose(&self, node: Node) -> Choice {
        if self.excludes.selects(&node.rel) {
            return Choice::Drop;
        }
        let selected = self.files.selects(&node.rel);
        let kind = match node.kind {
            NodeKind::Skipped {
                reason,
                may_hold_matches,
            } => {
                if selected || may_hold_matches {
                    let path = node.source;
                    return Choice::Warn { path, reason };
                }
                return Choice::Drop;
            }
            _ if !selected => return Choice::Drop,
            NodeKind::File { executable } => EntryKind::File { executable },
            NodeKind::Symlink { target } => EntryKind::Symlink { target },
            NodeKind::EmptyDir if self.flatten => return Choice::Drop,
            NodeKind::EmptyDir => EntryKind::Dir,
        };
        let dest = match node.rel.file_name() {
            Some(name) if self.flatten => PathBuf::from(name),
            _ => node.rel,
        };
        Choice::Take(Entry {
            source: node.source,
            dest,
            kind,
        })
    }
}

fn warning(build_root: &Path, path: &Path, reason: &str) -> String {
    let shown = path.strip_prefix(build_root).unwrap_or(path);
    format!("skipped {}: {reason}", shown.display())
}

/// Sorts by output path, merges duplicates of one source, and refuses two sources for one path.
fn finish(mut entries: Vec<Entry>) -> Result<Vec<Entry>, ArtifactError> {
    entries.sort_by(|a, b| (&a.dest, &a.source).cmp(&(&b.dest, &b.source)));
    entries.dedup();
    if let Some(pair) = entries.windows(2).find(|pair| pair[0].dest == pair[1].dest) {
        return Err(ArtifactError::Collision {
            dest: pair[0].dest.clone(),
            first: pair[0].source.clone(),
            second: pair[1].source.clone(),
        });
    }
    // A file and a path beneath it cannot both be written: the file's path would be a folder.
    let leaves: HashMap<&Path, &Path> = entries
        .iter()
        .filter(|entry| entry.kind != EntryKind::Dir)
        .map(|entry| (entry.dest.as_path(), entry.source.as_path()))
        .collect();
    for entry in &entries {
        let clash = entry
            .dest
            .ancestors()
            .skip(1)
            .find_map(|a| leaves.get_key_value(a));
        if let Some((dest, first)) = clash {
            return Err(ArtifactError::Collision {
                dest: dest.to_path_buf(),
                first: first.to_path_buf(),
                second: entry.source.clone(),
            });
        }
    }
    Ok(entries)
}

fn check_destination_free(dest_dir: &Path) -> Result<(), ArtifactError> {
    let in_use = || ArtifactError::DestinationInUse {
        path: dest_dir.to_path_buf(),
    };
    let read = |source| ArtifactError::Read {
        path: dest_dir.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(dest_dir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(read(source)),
        Ok(meta) if !meta.is_dir() => Err(in_use()),
        Ok(_) => match fs::read_dir(dest_dir).map_err(read)?.next() {
            None => Ok(()),
            Some(_) => Err(in_use()),
        },
    }
}

/// Creates an empty folder beside `dest_dir`, on the same file system so the final rename works.
fn make_staging_dir(dest_dir: &Path) -> Result<PathBuf, ArtifactError> {
    let Some(name) = dest_dir.file_name() else {
        return Err(ArtifactError::DestinationInUse {
            path: dest_dir.to_path_buf(),
        });
    };
    let parent = dest_dir.parent().unwrap_or(Path::new("."));
    let write = |path: &Path, source| ArtifactError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(parent).map_err(|source| write(parent, source))?;
    let mut attempt = 0;
    loop {
        let mut staging_name = OsString::from(".");
        staging_name.push(name);
        staging_name.push(format!(".partial-{}-{attempt}", std::process::id()));
        let staging = parent.join(staging_name);
        match fs::create_dir(&staging) {
            Ok(()) => return Ok(staging),
            // A leftover from a crashed copy is not ours to delete; try the next name.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(source) => return Err(write(&staging, source)),
        }
    }
}

/// Writes every entry under `root`, a fresh empty folder.
fn fill(selected: &Selected, root: &Path) -> Result<CopySummary, ArtifactError> {
    let mut summary = CopySummary::default();
    let mut made = HashSet::new();
    for entry in &selected.entries {
        check_safe_dest(&entry.dest)?;
        make_parents(root, &entry.dest, &mut made)?;
        let path = root.join(&entry.dest);
        match &entry.kind {
            EntryKind::File { executable } => {
                summary.bytes += copy_file(&entry.source, &path, *executable)?;
                summary.files += 1;
            }
            EntryKind::Symlink { target } => {
                make_symlink(&entry.dest, target, &path)?;
                summary.symlinks += 1;
            }
            EntryKind::Dir => {
                make_real_dir(&path)?;
                made.insert(entry.dest.clone());
            }
        }
    }
    Ok(summary)
}

/// Output paths must be relative and made of plain names, so they cannot leave the output.
fn check_safe_dest(dest: &Path) -> Result<(), ArtifactError> {
    let plain = dest.components().all(|c| matches!(c, Component::Normal(_)));
    if dest.as_os_str().is_empty() || !plain {
        return Err(ArtifactError::UnsafeDestination {
            dest: dest.to_path_buf(),
        });
    }
    Ok(())
}

/// Creates the parent folders of `dest`, refusing to pass through anything but a real folder.
fn make_parents(
    root: &Path,
    dest: &Path,
    made: &mut HashSet<PathBuf>,
) -> Result<(), ArtifactError> {
    let mut rel = PathBuf::new();
    for component in dest.parent().into_iter().flat_map(Path::components) {
        rel.push(component);
        if !made.contains(&rel) {
            make_real_dir(&root.join(&rel))?;
            made.insert(rel.clone());
        }
    }
    Ok(())
}

fn make_real_dir(path: &Path) -> Result<(), ArtifactError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => Ok(()),
                _ => Err(ArtifactError::UnsafeDestination {
                    dest: path.to_path_buf(),
                }),
            }
        }
        Err(source) => Err(ArtifactError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn copy_file(source: &Path, dest: &Path, executable: bool) -> Result<u64, ArtifactError> {
    let write = |source| ArtifactError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let mut input = open_source(source).map_err(|error| ArtifactError::Read {
        path: source.to_path_buf(),
        source: error,
    })?;
    // `create_new` fails on any existing path, symlinks included, so nothing is overwritten.
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(write)?;
    let bytes = io::copy(&mut input, &mut output).map_err(write)?;
    let mode = if executable { 0o755 } else { 0o644 };
    output
        .set_permissions(Permissions::from_mode(mode))
        .map_err(write)?;
    Ok(bytes)
}

/// Opens a selected file without following a symlink or blocking on a FIFO: a process the build
/// left running may have swapped the file since it was selected.
fn open_source(source: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(source)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("no longer a regular file"));
    }
    Ok(file)
}

fn make_symlink(dest: &Path, target: &Path, path: &Path) -> Result<(), ArtifactError> {
    if !target_stays_inside(dest, target) {
        return Err(ArtifactError::UnsafeDestination {
            dest: dest.to_path_buf(),
        });
    }
    std::os::unix::fs::symlink(target, path).map_err(|source| ArtifactError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// True when a relative `target`, read from the folder of `link`, stays inside the output by its
/// text alone. This is a sanity check on the selection: `copy_out` never follows links itself.
fn target_stays_inside(link: &Path, target: &Path) -> bool {
    let mut depth = link.parent().map_or(0, |p| p.components().count());
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => depth -= 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};
    use std::os::unix::ffi::OsStrExt;

    /// Builds a tree under `root/build` from one line per path, relative to `build`:
    /// `a/b` is a file (its content is its path), `a/b +x` an executable file, `a/` an empty
    /// folder, and `a -> target` a symlink (`$OUTSIDE` is `root/outside`, which always holds
    /// `secret.txt` and `dir/inner.txt`).
    fn make_tree(root: &Path, spec: &str) {
        let build = root.join("build");
        let outside = root.join("outside");
        fs::create_dir_all(outside.join("dir")).expect("outside dir");
        fs::write(outside.join("secret.txt"), "secret").expect("secret");
        fs::write(outside.join("dir/inner.txt"), "inner").expect("inner");
        fs::create_dir_all(&build).expect("build dir");
        for line in spec.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if let Some((link, target)) = line.split_once(" -> ") {
                let target = target.replace("$OUTSIDE", &outside.to_string_lossy());
                make_parent(&build.join(link));
                std::os::unix::fs::symlink(target, build.join(link)).expect("symlink");
            } else if let Some(dir) = line.strip_suffix('/') {
                fs::create_dir_all(build.join(dir)).expect("dir");
            } else if let Some(file) = line.strip_suffix(" +x") {
                write_file(&build.join(file), file);
                let mode = Permissions::from_mode(0o755);
                fs::set_permissions(build.join(file), mode).expect("chmod");
            } else {
                write_file(&build.join(line), line);
            }
        }
    }

    fn make_parent(path: &Path) {
        fs::create_dir_all(path.parent().expect("parent")).expect("parents");
    }

    fn write_file(path: &Path, content: &str) {
        make_parent(path);
        fs::write(path, content).expect("write");
    }

    /// Reads `key: value` lines; list values are separated by spaces.
    fn parse_set(spec: &str) -> ArtifactSet {
        let mut set = ArtifactSet::default();
        for line in spec.lines().map(str::trim).filter(|line| !line.is_empty()) {
            let (key, value) = line.split_once(':').expect("key: value");
            let value = value.trim();
            let list = || value.split_whitespace().map(str::to_owned).collect();
            match key {
                "files" => set.files = list(),
                "exclude-paths" => set.exclude_paths = list(),
                "base-directory" => set.base_directory = Some(value.to_owned()),
                "discard-paths" => set.discard_paths = value == "yes",
                "enable-symlinks" => set.enable_symlinks = value == "yes",
                other => panic!("unknown key {other}"),
            }
        }
        set
    }

    fn render_selected(selected: &Selected, root: &Path) -> String {
        let mut out = String::new();
        for entry in &selected.entries {
            let dest = entry.dest.to_string_lossy();
            let source = entry.source.strip_prefix(root).unwrap_or(&entry.source);
            let source = source.to_string_lossy();
            let line = match &entry.kind {
                EntryKind::File { executable: true } => format!("{dest} <- {source} (exec)"),
                EntryKind::File { executable: false } => format!("{dest} <- {source}"),
                EntryKind::Symlink { target } => format!("{dest} -> {}", target.display()),
                EntryKind::Dir => format!("{dest}/"),
            };
            out.push_str(&line);
            out.push('\n');
        }
        for warning in &selected.warnings {
            out.push_str(&format!("warning: {warning}\n"));
        }
        out
    }

    fn temp_root() -> (tempfile::TempDir, PathBuf) {
        let temp = tempfile::tempdir().expect("temp dir");
        let root = fs::canonicalize(temp.path()).expect("canonical temp dir");
        (temp, root)
    }

    fn hide_root(text: String, root: &Path) -> String {
        text.replace(&*root.to_string_lossy(), "<tmp>")
    }

    /// The selection `set` makes in a tree built from `tree`, one line per entry or warning.
    fn listing(tree: &str, set: &str) -> String {
        let (_temp, root) = temp_root();
        make_tree(&root, tree);
        let actual = match select(&root.join("build"), &parse_set(set)) {
            Ok(selected) => render_selected(&selected, &root),
            Err(error) => format!("error: {error}\n"),
        };
        hide_root(actual, &root)
    }

    fn check(tree: &str, set: &str, expect: Expect) {
        expect.assert_eq(&listing(tree, set));
    }

    const APP: &str = "
        README.md
        .hidden
        dist/app.js
        dist/app.js.map
        dist/lib/util.js
        dist/lib/deep/more.js
        dist/empty/
        src/main.rs
    ";

    #[test]
    fn everything() {
        check(
            APP,
            "files: **/*",
            expect![[r#"
                .hidden <- build/.hidden
                README.md <- build/README.md
                dist/app.js <- build/dist/app.js
                dist/app.js.map <- build/dist/app.js.map
                dist/empty/
                dist/lib/deep/more.js <- build/dist/lib/deep/more.js
                dist/lib/util.js <- build/dist/lib/util.js
                src/main.rs <- build/src/main.rs
            "#]],
        );
    }

    #[test]
    fn folder_star_includes_matched_subfolders_like_double_star() {
        let star = listing(APP, "files: dist/*");
        assert_eq!(star, listing(APP, "files: dist/**/*"));
        assert_eq!(star, listing(APP, "files: ./dist/"));
        expect![[r#"
            dist/app.js <- build/dist/app.js
            dist/app.js.map <- build/dist/app.js.map
            dist/empty/
            dist/lib/deep/more.js <- build/dist/lib/deep/more.js
            dist/lib/util.js <- build/dist/lib/util.js
        "#]]
        .assert_eq(&star);
    }

    #[test]
    fn star_does_not_cross_folders() {
        check(
            APP,
            "files: dist/*.js",
            expect![[r#"
                dist/app.js <- build/dist/app.js
            "#]],
        );
        check(
            APP,
            "files: dist/**/*.js",
            expect![[r#"
                dist/app.js <- build/dist/app.js
                dist/lib/deep/more.js <- build/dist/lib/deep/more.js
                dist/lib/util.js <- build/dist/lib/util.js
            "#]],
        );
    }

    #[test]
    fn single_file_and_several_patterns() {
        check(
            APP,
            "files: README.md dist/lib/util.js dist/lib/*.js",
            expect![[r#"
                README.md <- build/README.md
                dist/lib/util.js <- build/dist/lib/util.js
            "#]],
        );
    }

    #[test]
    fn plain_base_directory_is_not_part_of_output_paths() {
        check(
            APP,
            "files: **/*
             base-directory: dist/lib",
            expect![[r#"
                deep/more.js <- build/dist/lib/deep/more.js
                util.js <- build/dist/lib/util.js
            "#]],
        );
    }

    #[test]
    fn base_directory_glob_matching_two_folders() {
        check(
            "
            services/api/out/api.jar
            services/api/src/Api.java
            services/web/out/web.jar
            services/web/out/static/index.html
            ",
            "files: **/*
             base-directory: services/*/out",
            expect![[r#"
                api.jar <- build/services/api/out/api.jar
                static/index.html <- build/services/web/out/static/index.html
                web.jar <- build/services/web/out/web.jar
            "#]],
        );
    }

    #[test]
    fn base_directory_glob_collision_is_an_error() {
        check(
            "
            a/out/app.jar
            b/out/app.jar
            ",
            "files: *.jar
             base-directory: */out",
            expect![[r#"
                error: <tmp>/build/a/out/app.jar and <tmp>/build/b/out/app.jar would both be written to app.jar
            "#]],
        );
    }

    #[test]
    fn missing_base_directory() {
        check(
            APP,
            "files: **/*
             base-directory: target",
            expect![[r#"
                error: base-directory "target" matches no folder inside the build directory
            "#]],
        );
        check(
            APP,
            "files: **/*
             base-directory: README.md",
            expect![[r#"
                error: base-directory "README.md" matches no folder inside the build directory
            "#]],
        );
    }

    #[test]
    fn exclude_star_stays_in_one_folder_double_star_crosses() {
        check(
            APP,
            "files: dist/**/*
             exclude-paths: dist/*.js",
            expect![[r#"
                dist/app.js.map <- build/dist/app.js.map
                dist/empty/
                dist/lib/deep/more.js <- build/dist/lib/deep/more.js
                dist/lib/util.js <- build/dist/lib/util.js
            "#]],
        );
        check(
            APP,
            "files: dist/**/*
             exclude-paths: dist/**/*.js",
            expect![[r#"
                dist/app.js.map <- build/dist/app.js.map
                dist/empty/
            "#]],
        );
    }

    #[test]
    fn exclude_paths_are_relative_to_base_directory_and_exclude_folders_whole() {
        check(
            APP,
            "files: **/*
             base-directory: dist
             exclude-paths: lib *.map",
            expect![[r#"
                app.js <- build/dist/app.js
                empty/
            "#]],
        );
    }

    #[test]
    fn discard_paths_flattens() {
        check(
            APP,
            "files: dist/**/*.js
             discard-paths: yes",
            expect![[r#"
                app.js <- build/dist/app.js
                more.js <- build/dist/lib/deep/more.js
                util.js <- build/dist/lib/util.js
            "#]],
        );
    }

    #[test]
    fn discard_paths_collision_names_both_files() {
        check(
            "
            a/config.json
            b/config.json
            ",
            "files: **/*
             discard-paths: yes",
            expect![[r#"
                error: <tmp>/build/a/config.json and <tmp>/build/b/config.json would both be written to config.json
            "#]],
        );
    }

    const LINKS: &str = "
        dist/app.js
        dist/current -> app.js
        dist/lib/util.js
        dist/libs -> lib
        shared/common.js
        dist/common.js -> ../shared/common.js
    ";

    #[test]
    fn symlinks_inside_the_output_are_kept_when_enabled() {
        check(
            LINKS,
            "files: **/*
             base-directory: dist
             enable-symlinks: yes",
            expect![[r#"
                app.js <- build/dist/app.js
                common.js <- build/shared/common.js
                current -> app.js
                lib/util.js <- build/dist/lib/util.js
                libs -> lib
            "#]],
        );
    }

    #[test]
    fn symlinks_are_followed_when_not_enabled() {
        check(
            LINKS,
            "files: **/*
             base-directory: dist",
            expect![[r#"
                app.js <- build/dist/app.js
                common.js <- build/shared/common.js
                current <- build/dist/app.js
                lib/util.js <- build/dist/lib/util.js
                libs/util.js <- build/dist/lib/util.js
            "#]],
        );
    }

    #[test]
    fn kept_symlink_targets_are_relative_even_when_written_absolute() {
        let (_temp, root) = temp_root();
        let absolute = root.join("build/dist/lib/util.js");
        let tree = format!("dist/lib/util.js\ndist/bin/link -> {}", absolute.display());
        make_tree(&root, &tree);
        let set = parse_set("files: **/*\nbase-directory: dist\nenable-symlinks: yes");
        let actual = match select(&root.join("build"), &set) {
            Ok(selected) => render_selected(&selected, &root),
            Err(error) => format!("error: {error}\n"),
        };
        expect![[r#"
            bin/link -> ../lib/util.js
            lib/util.js <- build/dist/lib/util.js
        "#]]
        .assert_eq(&actual);
    }

    #[test]
    fn symlinks_escaping_the_build_directory_are_skipped_with_a_warning() {
        let tree = "
            app.js
            relative -> ../outside/secret.txt
            absolute -> $OUTSIDE/secret.txt
            folder -> $OUTSIDE/dir
            dangling -> nowhere
        ";
        let followed = listing(tree, "files: **/*");
        assert_eq!(followed, listing(tree, "files: **/*\nenable-symlinks: yes"));
        expect![[r#"
            app.js <- build/app.js
            warning: skipped absolute: is a symlink to <tmp>/outside/secret.txt, outside the build directory
            warning: skipped dangling: is a symlink that leads nowhere
            warning: skipped folder: is a symlink to <tmp>/outside/dir, outside the build directory
            warning: skipped relative: is a symlink to <tmp>/outside/secret.txt, outside the build directory
        "#]]
        .assert_eq(&followed);
    }

    #[test]
    fn symlinked_folder_outside_is_not_followed_even_when_named() {
        check(
            "
            app.js
            vendor -> $OUTSIDE/dir
            ",
            "files: app.js vendor/**/*",
            expect![[r#"
                app.js <- build/app.js
                warning: skipped vendor: is a symlink to <tmp>/outside/dir, outside the build directory
            "#]],
        );
        check(
            "
            app.js
            vendor -> $OUTSIDE/dir
            ",
            "files: app.js vendor/inner.txt",
            expect![[r#"
                app.js <- build/app.js
                warning: skipped vendor: its folder resolves outside the build directory
            "#]],
        );
    }

    #[test]
    fn symlink_loops_end() {
        check(
            "
            a/file.txt
            a/up -> ..
            ",
            "files: **/*",
            expect![[r#"
                a/file.txt <- build/a/file.txt
                warning: skipped a/up: is a symlink to a folder that contains it
            "#]],
        );
    }

    #[test]
    fn unselected_escaping_symlinks_are_silent() {
        check(
            "
            dist/app.js
            dist/secret -> $OUTSIDE/secret.txt
            ",
            "files: dist/*.js",
            expect![[r#"
                dist/app.js <- build/dist/app.js
            "#]],
        );
    }

    #[test]
    fn no_match_is_an_error() {
        check(
            APP,
            "files: target/*.jar build/**/*",
            expect![[r#"
                error: no matching artifact paths found for ["target/*.jar", "build/**/*"]
            "#]],
        );
        check(
            APP,
            "files: dist/**/*
             exclude-paths: dist",
            expect![[r#"
                error: no matching artifact paths found for ["dist/**/*"]
            "#]],
        );
    }

    #[test]
    fn patterns_leaving_the_build_directory_are_refused() {
        check(
            APP,
            "files: ../outside/*",
            expect![[r#"
                error: pattern "../outside/*" must be relative and stay inside the build directory
            "#]],
        );
        check(
            APP,
            "files: /etc/passwd",
            expect![[r#"
                error: pattern "/etc/passwd" must be relative and stay inside the build directory
            "#]],
        );
    }

    #[test]
    fn non_utf8_names_are_selected() {
        let (_temp, root) = temp_root();
        make_tree(&root, "dist/ok.txt");
        let name = OsStr::from_bytes(b"bad\xff.txt");
        fs::write(root.join("build/dist").join(name), "x").expect("write");
        let set = parse_set("files: dist/*");
        let actual = match select(&root.join("build"), &set) {
            Ok(selected) => render_selected(&selected, &root),
            Err(error) => format!("error: {error}\n"),
        };
        expect![[r#"
            dist/bad�.txt <- build/dist/bad�.txt
            dist/ok.txt <- build/dist/ok.txt
        "#]]
        .assert_eq(&actual);
    }

    /// Lists a copied output: `path mode` for files, `path -> target` for links, `path/` for
    /// folders, then the summary.
    fn render_output(dir: &Path, summary: CopySummary) -> String {
        let mut lines = Vec::new();
        list_output(dir, Path::new(""), &mut lines);
        lines.sort();
        lines.push(format!("{summary:?}"));
        lines.join("\n") + "\n"
    }

    fn list_output(dir: &Path, rel: &Path, lines: &mut Vec<String>) {
        for name in sorted_children(&dir.join(rel)).expect("list") {
            let rel = rel.join(name);
            let path = dir.join(&rel);
            let meta = fs::symlink_metadata(&path).expect("stat");
            let shown = rel.to_string_lossy();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("read link");
                lines.push(format!("{shown} -> {}", target.display()));
            } else if meta.is_dir() {
                lines.push(format!("{shown}/"));
                list_output(dir, &rel, lines);
            } else {
                lines.push(format!("{shown} {:o}", meta.permissions().mode() & 0o777));
            }
        }
    }

    fn check_copy(tree: &str, set: &str, prepare: impl FnOnce(&Path), expect: Expect) {
        let (_temp, root) = temp_root();
        make_tree(&root, tree);
        let out = root.join("out/artifact");
        prepare(&out);
        let result = select(&root.join("build"), &parse_set(set))
            .and_then(|selected| copy_out(&selected, &out));
        let actual = match result {
            Ok(summary) => render_output(&out, summary),
            Err(error) => format!("error: {error}\n"),
        };
        expect.assert_eq(&hide_root(actual, &root));
    }

    const TOOLS: &str = "
        bin/run +x
        bin/README
        bin/current -> run
        bin/empty/
    ";

    #[test]
    fn copy_out_preserves_executable_bit_and_links() {
        check_copy(
            TOOLS,
            "files: **/*
             enable-symlinks: yes",
            |_| {},
            expect![[r#"
                bin/
                bin/README 644
                bin/current -> run
                bin/empty/
                bin/run 755
                CopySummary { files: 2, symlinks: 1, bytes: 17 }
            "#]],
        );
    }

    #[test]
    fn copy_out_fills_an_existing_empty_folder() {
        check_copy(
            TOOLS,
            "files: bin/run",
            |out| fs::create_dir_all(out).expect("mkdir"),
            expect![[r#"
                bin/
                bin/run 755
                CopySummary { files: 1, symlinks: 0, bytes: 7 }
            "#]],
        );
    }

    #[test]
    fn copy_out_refuses_a_non_empty_destination() {
        check_copy(
            TOOLS,
            "files: **/*",
            |out| write_file(&out.join("old.txt"), "old"),
            expect![[r#"
                error: <tmp>/out/artifact already exists and is not an empty folder
            "#]],
        );
    }

    #[test]
    fn copy_out_failure_leaves_nothing_behind() {
        let (_temp, root) = temp_root();
        make_tree(&root, TOOLS);
        let selected = select(&root.join("build"), &parse_set("files: **/*")).expect("select");
        fs::remove_file(root.join("build/bin/run")).expect("remove");
        let out = root.join("out/artifact");
        let error = match copy_out(&selected, &out) {
            Ok(summary) => format!("unexpected success: {summary:?}"),
            Err(error) => hide_root(error.to_string(), &root),
        };
        let left = sorted_children(&root.join("out")).expect("list out");
        expect![[r#"cannot read <tmp>/build/bin/run, left: []"#]]
            .assert_eq(&format!("{error}, left: {left:?}"));
    }

    #[test]
    fn copy_out_does_not_follow_a_file_swapped_for_a_symlink() {
        let (_temp, root) = temp_root();
        make_tree(&root, "app.js");
        let selected = select(&root.join("build"), &parse_set("files: app.js")).expect("select");
        fs::remove_file(root.join("build/app.js")).expect("remove");
        let secret = root.join("outside/secret.txt");
        std::os::unix::fs::symlink(secret, root.join("build/app.js")).expect("symlink");
        let actual = match copy_out(&selected, &root.join("out")) {
            Ok(summary) => format!("unexpected success: {summary:?}"),
            Err(error) => hide_root(error.to_string(), &root),
        };
        expect!["cannot read <tmp>/build/app.js"].assert_eq(&actual);
    }

    #[test]
    fn copy_out_refuses_paths_leaving_the_output() {
        let (_temp, root) = temp_root();
        make_tree(&root, "app.js");
        let escaping = |dest: &str, kind: EntryKind| Selected {
            entries: vec![Entry {
                source: root.join("build/app.js"),
                dest: PathBuf::from(dest),
                kind,
            }],
            warnings: Vec::new(),
        };
        let file = EntryKind::File { executable: false };
        let link = EntryKind::Symlink {
            target: PathBuf::from("../../x"),
        };
        let results: Vec<String> = [escaping("../x", file.clone()), escaping("a/b", link)]
            .iter()
            .map(|selected| match copy_out(selected, &root.join("out")) {
                Ok(summary) => format!("{summary:?}"),
                Err(error) => error.to_string(),
            })
            .collect();
        expect![[r#"
            [
                "artifact path ../x is not a plain relative path inside the output",
                "artifact path a/b is not a plain relative path inside the output",
            ]
        "#]]
        .assert_debug_eq(&results);
    }

    #[test]
    fn relative_targets() {
        let cases = [
            ("a", "b"),
            ("x/link", "x/y/file"),
            ("x/y/link", "z/file"),
            ("x/link", ""),
        ];
        let actual: Vec<String> = cases
            .iter()
            .map(|(link, target)| {
                let relative = relative_target(Path::new(link), Path::new(target));
                format!("{link} -> {}", relative.display())
            })
            .collect();
        expect![[r#"
            [
                "a -> b",
                "x/link -> y/file",
                "x/y/link -> ../../z/file",
                "x/link -> ..",
            ]
        "#]]
        .assert_debug_eq(&actual);
    }
}
