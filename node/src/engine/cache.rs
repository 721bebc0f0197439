//! The buildspec's `cache:` section on the store. An entry maps (key, set of paths, OS, CPU
//! architecture) to a tree; the paths, OS and architecture form the cache's version, so an entry
//! saved with other paths or on another platform never matches. Entries are immutable: the
//! first save under a key wins, later saves do nothing (users put a hash of their lock files in
//! the key). A cache is restored before INSTALL and saved after the build phases, only when the
//! build succeeded.
//!
//! Layout: `DATA_DIR/store/cache/VERSION/KEYHASH.json`, created exclusively (so two builds
//! saving one key at once cannot both win). A cached tree holds `rel/...` (paths relative to the
//! build directory) and `abs/...` (absolute paths, such as `/root/.m2`).
//!
//! Absolute paths live in the sandbox's own file system (an overlay, a container), which the
//! node cannot read safely while the build runs and does not share at all in some backends. So
//! they travel through a staging folder in the workspace ([`STAGE`]), the one folder every
//! backend shares with the node: before the sandbox ends, the build's shell copies what the
//! paths name into it ([`stage_script`]); once the sandbox is gone the node reads it like the
//! rest of the workspace. A restore goes the other way: the node puts the whole entry in the
//! staging folder and the build's shell merges it into place ([`unstage_script`]), so the files
//! land where the build sees them, owned by the build's user, and links the build planted in
//! its workspace resolve inside the sandbox, never on the host.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::Digest;
use protocol::buildspec::{ArtifactSet, Cache};
use protocol::cas::CacheEntry;
use serde::{Deserialize, Serialize};

use super::artifacts;
use super::session::quote;
use crate::store::transfer::BoxFuture;
use crate::store::{Store, export, import};

/// A saved entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub paths: Vec<String>,
    pub os: String,
    pub arch: String,
    pub tree: String,
    pub created_ms: u64,
    /// The peer this entry was fetched from, for one another peer saved. Such an entry is
    /// pruned to its paths when it is restored: its tree was built elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_peer: Option<String>,
}

/// What looking a key up found.
#[derive(Debug)]
pub enum Lookup {
    Hit { entry: Entry, exact: bool },
    Miss { reason: String },
}

fn paths_key(paths: &[String]) -> Vec<String> {
    let mut sorted = paths.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
}

/// The cache's version on this machine: its set of paths, this OS and CPU architecture.
pub fn version(paths: &[String]) -> String {
    version_for(paths, std::env::consts::OS, std::env::consts::ARCH)
}

/// The version of a cache of `paths` saved on `os`/`arch` (32 hex digits).
pub fn version_for(paths: &[String], os: &str, arch: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    for path in paths_key(paths) {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
    }
    hasher.update(os.as_bytes());
    hasher.update(b"\0");
    hasher.update(arch.as_bytes());
    hasher.finalize().to_hex()[..32].to_owned()
}

impl Entry {
    /// The entry as the pool's wire carries it; `None` if its tree digest does not parse.
    pub fn to_wire(&self) -> Option<CacheEntry> {
        Some(CacheEntry {
            key: self.key.clone(),
            paths: self.paths.clone(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            tree: self.tree.parse().ok()?,
            created_ms: self.created_ms,
        })
    }

    /// An entry `peer` announced or listed.
    pub fn from_wire(entry: &CacheEntry, peer: &str) -> Entry {
        Entry {
            key: entry.key.clone(),
            paths: entry.paths.clone(),
            os: entry.os.clone(),
            arch: entry.arch.clone(),
            tree: entry.tree.to_string(),
            // A peer's clock (or a peer gaming "newest first") never puts it in the future.
            created_ms: entry.created_ms.min(now_ms()),
            from_peer: Some(peer.to_owned()),
        }
    }

    /// Its version, computed from its own paths and platform.
    pub fn version(&self) -> String {
        version_for(&self.paths, &self.os, &self.arch)
    }
}

/// The pool's side of the cache, when a node is running: it looks keys up among the entries
/// its peers announced (or asks them), fetches the tree of one into this store, and tells the
/// pool about entries saved here. The engine knows only this seam.
pub trait PoolCache: Send + Sync {
    /// Finds an entry for `request` in the pool and, when one is found, fetches its tree and
    /// keeps the entry in this store (so [`lookup`] finds it next).
    fn find<'a>(&'a self, request: &'a FindRequest) -> BoxFuture<'a, Result<Found, String>>;
    /// Tells the pool this store holds `entry`.
    fn announce<'a>(&'a self, entry: &'a Entry) -> BoxFuture<'a, Result<(), String>>;
}

/// A cache lookup asked of the pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FindRequest {
    pub paths: Vec<String>,
    pub key: String,
    pub fallbacks: Vec<String>,
    /// A new folder (an absolute path) to write the entry's tree into as it arrives, when the
    /// node can write there (see [`Found::Fetched`]'s `exported`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<PathBuf>,
}

/// What the pool found.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Found {
    /// An entry, now in this store, fetched from `peer`s.
    Fetched {
        entry: Entry,
        peers: Vec<String>,
        transferred_bytes: u64,
        blobs: u64,
        /// Peers dropped from the transfer (a bad blob, no answer), with why.
        #[serde(default)]
        dropped: Vec<String>,
        /// What was written into the request's `into` folder: the entry's whole tree, as it
        /// arrived. `None` when nothing was (no `into`, or the node cannot write there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exported: Option<Box<export::Exported>>,
    },
    /// No peer has an entry for the key or its fallback prefixes.
    Nothing { reason: String },
}

/// The entries of `version` in this store whose keys start with `prefix` and whose trees are
/// here, newest first, at most `max` (what a peer's `CacheEntries` request gets).
pub fn entries_with_prefix(store: &Store, version: &str, prefix: &str, max: usize) -> Vec<Entry> {
    if version.len() != 32 || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Vec::new();
    }
    let mut here = entries_in(&cache_dir(store).join(version));
    store.refresh();
    here.retain(|e| {
        e.key.starts_with(prefix) && e.tree.parse::<Digest>().is_ok_and(|d| store.contains(&d))
    });
    here.sort_by_key(|e| std::cmp::Reverse(e.created_ms));
    here.truncate(max);
    here
}

/// Keeps `entry` (whose tree is in the store already, as a root) in this store's cache index.
/// `Ok(false)` when an entry for its key exists already: entries never change.
pub fn adopt(store: &Store, entry: &Entry) -> Result<bool, String> {
    let tree: Digest = entry
        .tree
        .parse()
        .map_err(|e: protocol::digest::DigestParseError| e.to_string())?;
    if !store.holds(&tree) {
        return Err(format!("the entry's tree {tree} is not in the store"));
    }
    let target = entry_path(store, &entry.version(), &entry.key);
    if live_entry(store, &target) {
        return Ok(false);
    }
    let _ = fs::remove_file(&target);
    publish(store, entry, &target)
}

fn entry_path(store: &Store, version: &str, key: &str) -> PathBuf {
    let name = format!("{}.json", &blake3::hash(key.as_bytes()).to_hex()[..32]);
    cache_dir(store).join(version).join(name)
}

/// Writes `entry` at `target` unless one is there. Written whole to a temporary file, then
/// published with link(2), which never replaces: of two builds saving one key at once exactly
/// one wins, and no reader sees half an entry.
fn publish(store: &Store, entry: &Entry, target: &Path) -> Result<bool, String> {
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(entry).map_err(|e| e.to_string())?;
    let temporary = store.temporary_path("cache-entry");
    fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(&json))
        .map_err(|e| format!("{}: {e}", temporary.display()))?;
    let published = fs::hard_link(&temporary, target);
    let _ = fs::remove_file(&temporary);
    match published {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err.to_string()),
    }
}

fn cache_dir(store: &Store) -> PathBuf {
    store.root().join("cache")
}

fn entries_in(dir: &Path) -> Vec<Entry> {
    let Ok(files) = fs::read_dir(dir) else {
        return Vec::new();
    };
    files
        .flatten()
        .filter_map(|f| fs::read(f.path()).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect()
}

/// Every entry in the store, for `peerbuild cache keys`.
pub fn all_entries(store: &Store) -> Vec<Entry> {
    let Ok(versions) = fs::read_dir(cache_dir(store)) else {
        return Vec::new();
    };
    let mut entries: Vec<Entry> = versions
        .flatten()
        .flat_map(|v| entries_in(&v.path()))
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.created_ms));
    entries
}

/// Looks `key` up, then each fallback key as a prefix (newest entry first), in this version.
pub fn lookup(store: &Store, cache: &Cache, key: &str, fallbacks: &[String]) -> Lookup {
    let version = version(&cache.paths);
    let mut here = entries_in(&cache_dir(store).join(&version));
    // An entry whose tree gc removed is no entry.
    store.refresh();
    here.retain(|e| e.tree.parse::<Digest>().is_ok_and(|d| store.contains(&d)));
    here.sort_by_key(|e| std::cmp::Reverse(e.created_ms));
    if let Some(entry) = here.iter().find(|e| e.key == key) {
        return Lookup::Hit {
            entry: entry.clone(),
            exact: true,
        };
    }
    for prefix in fallbacks {
        if let Some(entry) = here.iter().find(|e| e.key.starts_with(prefix.as_str())) {
            return Lookup::Hit {
                entry: entry.clone(),
                exact: false,
            };
        }
    }
    Lookup::Miss {
        reason: miss_reason(store, cache, key, &here),
    }
}

fn miss_reason(store: &Store, cache: &Cache, key: &str, here: &[Entry]) -> String {
    let wanted = paths_key(&cache.paths);
    let elsewhere: Vec<Entry> = all_entries(store)
        .into_iter()
        .filter(|e| e.key == key)
        .collect();
    if let Some(other) = elsewhere.first() {
        if other.os != std::env::consts::OS || other.arch != std::env::consts::ARCH {
            return format!(
                "the entry for this key was saved on {}/{}; entries are specific to the OS and CPU architecture",
                other.os, other.arch
            );
        }
        if paths_key(&other.paths) != wanted {
            return format!(
                "the entry for this key was saved with other paths ({}); the cache version includes the set of paths",
                other.paths.join(", ")
            );
        }
    }
    match here.first() {
        Some(newest) => format!(
            "key changed: no entry for this key or its fallback prefixes (the newest entry for these paths has key `{}`)",
            newest.key
        ),
        None => "no entry yet for these paths".to_owned(),
    }
}

/// The staging folder for absolute cache paths, in the workspace (see the module's docs). Never
/// part of the cache's relative paths.
pub const STAGE: &str = ".peerbuild-cache-outside";

/// Shell code, run in a subshell of the build's shell before the sandbox ends, that copies what
/// the cache's absolute paths name into `stage` (a base that is a link, `~/.m2 -> /data/m2`,
/// is copied as what it points to). Prints one line for each path it could not copy. `None`
/// when the cache has no absolute paths.
pub fn stage_script(paths: &[String], stage: &Path) -> Option<String> {
    let bases = absolute_bases(paths);
    if bases.is_empty() {
        return None;
    }
    let stage = quote(&stage.to_string_lossy());
    let mut script = format!(
        "(\ncommand rm -rf -- {stage} && command mkdir -p -- {stage} || exit 1\nfor pb_p in"
    );
    for base in &bases {
        script.push(' ');
        script.push_str(&quote(base));
    }
    script.push_str(&format!(
        "; do\n  if [ -e \"$pb_p\" ] || [ -L \"$pb_p\" ]; then\n    command mkdir -p -- {stage}\"${{pb_p%/*}}\" && command cp -a -H -- \"$pb_p\" {stage}\"$pb_p\" || echo \"$pb_p (could not be copied)\"\n  fi\ndone\n)"
    ));
    Some(script)
}

/// Shell code, run in a subshell of the build's shell, that merges a restored entry staged by
/// [`restore`] into place (`rel/` into the build directory `workspace`, `abs/` at the absolute
/// paths): folders merged (a symlink to a folder is followed, as `~/.m2 -> /data/m2` must stay
/// a link), files replaced, and where a folder is in place of a file or the other way round the
/// path is left as it was, with one line printed for it. It runs inside the sandbox, so links
/// the build planted lead only where the build could write anyway.
pub fn unstage_script(stage: &Path, workspace: &Path) -> String {
    let workspace = quote(&workspace.to_string_lossy());
    let stage = quote(&stage.to_string_lossy());
    format!(
        r#"(
pb_merge() {{
  for pb_e in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$pb_e" ] || [ -L "$pb_e" ] || continue
    pb_d="${{2%/}}/${{pb_e##*/}}"
    if [ -d "$pb_e" ] && [ ! -L "$pb_e" ]; then
      if [ -d "$pb_d" ]; then
        pb_merge "$pb_e" "$pb_d"
      elif [ -e "$pb_d" ] || [ -L "$pb_d" ]; then
        echo "$pb_d (a file is there)"
      else
        command cp -a -- "$pb_e" "$pb_d" 2>/dev/null || echo "$pb_d (could not be written)"
      fi
    elif [ -d "$pb_d" ]; then
      echo "$pb_d (a folder is there)"
    else
      command rm -f -- "$pb_d" 2>/dev/null
      command cp -a -- "$pb_e" "$pb_d" 2>/dev/null || echo "$pb_d (could not be written)"
    fi
  done
}}
[ -d {stage}/rel ] && pb_merge {stage}/rel {workspace}
[ -d {stage}/abs ] && pb_merge {stage}/abs /
true
)"#
    )
}

/// The folders (or files) that absolute cache paths start from: each pattern's leading
/// components without glob characters, with paths inside another base dropped. A pattern that
/// would start from `/` itself is left out: a cache of the whole file system is never meant.
fn absolute_bases(paths: &[String]) -> Vec<String> {
    let mut bases: Vec<String> = paths
        .iter()
        .filter(|p| p.starts_with('/'))
        .map(|pattern| {
            let mut base = String::new();
            for part in pattern.split('/').filter(|p| !p.is_empty() && *p != ".") {
                if part.contains(['*', '?', '[', '{', '\\']) {
                    break;
                }
                base.push('/');
                base.push_str(part);
            }
            base
        })
        .filter(|base| !base.is_empty() && !base.split('/').any(|p| p == ".."))
        .collect();
    bases.sort();
    bases.dedup();
    let mut kept: Vec<String> = Vec::new();
    for base in bases {
        if !kept
            .iter()
            .any(|k| base.starts_with(k.as_str()) && base.as_bytes().get(k.len()) == Some(&b'/'))
        {
            kept.push(base);
        }
    }
    kept
}

/// The files a cache's paths select right now, split into those relative to the build
/// directory and absolute ones (read from `outside`, the staged copy; see [`STAGE`]).
fn select(
    workspace: &Path,
    outside: Option<&Path>,
    paths: &[String],
) -> (
    Option<artifacts::Selected>,
    Option<artifacts::Selected>,
    Vec<String>,
) {
    let (absolute, relative): (Vec<&String>, Vec<&String>) =
        paths.iter().partition(|p| p.starts_with('/'));
    let mut warnings = Vec::new();
    let mut pick = |root: &Path, patterns: Vec<String>, exclude: Vec<String>| {
        if patterns.is_empty() {
            return None;
        }
        let set = ArtifactSet {
            files: patterns,
            exclude_paths: exclude,
            ..ArtifactSet::default()
        };
        match artifacts::select(root, &set) {
            Ok(selected) => {
                warnings.extend(selected.warnings.iter().cloned());
                Some(selected)
            }
            Err(artifacts::ArtifactError::NoMatch { .. }) => None,
            Err(err) => {
                warnings.push(err.to_string());
                None
            }
        }
    };
    let relative = pick(
        workspace,
        relative.into_iter().cloned().collect(),
        vec![STAGE.to_owned()],
    );
    let absolute = outside.and_then(|outside| {
        pick(
            outside,
            absolute
                .into_iter()
                .map(|p| p.trim_start_matches('/').to_owned())
                .collect(),
            Vec::new(),
        )
    });
    (relative, absolute, warnings)
}

/// What a save did.
pub enum Saved {
    Stored {
        files: u64,
        bytes: u64,
        entry: Entry,
    },
    AlreadyThere,
    NothingMatched,
}

/// Saves the files the cache's paths select under `key`, unless an entry for it exists: relative
/// paths from the workspace, absolute ones from `outside` (their staged copy, see [`STAGE`]).
pub fn save(
    store: &Store,
    cache: &Cache,
    key: &str,
    workspace: &Path,
    outside: Option<&Path>,
    scratch: &Path,
) -> Result<(Saved, Vec<String>), String> {
    let target = entry_path(store, &version(&cache.paths), key);
    if live_entry(store, &target) {
        return Ok((Saved::AlreadyThere, Vec::new()));
    }
    // An entry left unreadable or without its tree (gc, a crash) is no entry: it is replaced.
    let _ = fs::remove_file(&target);
    let (relative, absolute, warnings) = select(workspace, outside, &cache.paths);
    if relative.is_none() && absolute.is_none() {
        return Ok((Saved::NothingMatched, warnings));
    }
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let mut files = 0;
    let mut bytes = 0;
    for (selected, part) in [(relative, "rel"), (absolute, "abs")] {
        if let Some(selected) = selected {
            let copied =
                artifacts::copy_out(&selected, &scratch.join(part)).map_err(|e| e.to_string())?;
            files += copied.files;
            bytes += copied.bytes;
        }
    }
    let imported = import::import_dir_once(store, scratch, &format!("cache `{key}`"));
    let _ = fs::remove_dir_all(scratch);
    let root = imported
        .map_err(|e| e.to_string())?
        .root
        .ok_or("the cache produced no tree")?;
    let entry = Entry {
        key: key.to_owned(),
        paths: cache.paths.clone(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        tree: root.to_string(),
        created_ms: now_ms(),
        from_peer: None,
    };
    if publish(store, &entry, &target)? {
        Ok((
            Saved::Stored {
                files,
                bytes,
                entry,
            },
            warnings,
        ))
    } else {
        Ok((Saved::AlreadyThere, warnings))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Drops from a staged entry (one fetched from a peer) every file its cache paths would not
/// have saved, and every folder left empty: a peer's tree may hold anything, and a restore
/// writes only where the cache's paths say.
fn prune_to_paths(staged: &Path, paths: &[String]) -> Result<(), String> {
    let (rel, abs) = (staged.join("rel"), staged.join("abs"));
    for part in [&rel, &abs] {
        fs::create_dir_all(part).map_err(|e| format!("{}: {e}", part.display()))?;
    }
    let (relative, absolute, _) = select(&rel, Some(&abs), paths);
    let kept = |selected: Option<artifacts::Selected>| -> std::collections::HashSet<PathBuf> {
        selected
            .map(|s| s.entries.into_iter().map(|e| e.dest).collect())
            .unwrap_or_default()
    };
    prune_folder(&rel, Path::new(""), &kept(relative))?;
    prune_folder(&abs, Path::new(""), &kept(absolute))
}

/// Removes what `keep` does not list under `root/at`.
fn prune_folder(
    root: &Path,
    at: &Path,
    keep: &std::collections::HashSet<PathBuf>,
) -> Result<(), String> {
    let folder = root.join(at);
    let entries = fs::read_dir(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let relative = at.join(entry.file_name());
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map(|t| t.is_dir())
            .map_err(|e| e.to_string())?;
        if is_dir {
            prune_folder(root, &relative, keep)?;
            // An emptied folder goes too (fails harmlessly when something is left).
            let _ = fs::remove_dir(&path);
        } else if !keep.contains(&relative) {
            fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Whether the entry file at `path` parses and its tree is in the store.
fn live_entry(store: &Store, path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Entry>(&bytes).ok())
        .and_then(|entry| entry.tree.parse::<Digest>().ok())
        .is_some_and(|tree| store.holds(&tree))
}

/// What a restore did.
pub struct Restored {
    pub files: u64,
    pub bytes: u64,
    /// The entry, staged in the workspace for [`unstage_script`].
    pub staged: PathBuf,
    /// Whether it is what the node wrote as it arrived (else it was exported here).
    pub as_it_arrived: bool,
}

/// Exports an entry's tree into `scratch`, then moves it to the staging folder
/// `workspace/STAGE` (`rel/` for the build directory, `abs/` for absolute paths), for the
/// build's shell to merge into place with [`unstage_script`]. `arrived` says the tree is in
/// `scratch` already (the node wrote it there as it arrived from peers). The node itself never
/// writes into the workspace's folders: a build that planted a symlink there (while its cache
/// key was evaluated) must not steer the node's writes out of the sandbox.
pub fn restore(
    store: &Store,
    entry: &Entry,
    workspace: &Path,
    scratch: &Path,
    arrived: Option<export::Exported>,
) -> Result<Restored, String> {
    let digest: Digest = entry
        .tree
        .parse()
        .map_err(|e: protocol::digest::DigestParseError| e.to_string())?;
    let arrived = arrived.filter(|arrived| arrived.is_in(scratch));
    let as_it_arrived = arrived.is_some();
    let exported = match arrived {
        Some(exported) => exported,
        None => {
            let _ = fs::remove_dir_all(scratch);
            if let Some(parent) = scratch.parent() {
                fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            export::export(store, &digest, scratch).map_err(|e| e.to_string())?
        }
    };
    if entry.from_peer.is_some() {
        prune_to_paths(scratch, &entry.paths)?;
    }
    let staged = workspace.join(STAGE);
    // `rename` never follows a symlink the build left under the name: it fails on one (a
    // folder cannot replace a file) and replaces only an empty folder.
    let moved = remove_staged(&staged).and_then(|()| fs::rename(scratch, &staged));
    let _ = fs::remove_dir_all(scratch);
    moved.map_err(|e| format!("cannot stage the cache in the workspace: {e}"))?;
    Ok(Restored {
        files: exported.files,
        bytes: exported.bytes,
        staged,
        as_it_arrived,
    })
}

/// Removes a staging folder (or whatever the build left under its name), never following a
/// symlink.
pub fn remove_staged(staged: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(staged) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(staged),
        Ok(_) => fs::remove_file(staged),
    }
}

/// `codebuild-hash-files GLOB...`, as CodeBuild provides it: the SHA-256 of the matched files'
/// contents in path order, for cache keys such as `npm-$(codebuild-hash-files package-lock.json)`.
pub const HASH_FILES_SCRIPT: &str = r#"#!/usr/bin/env bash
# codebuild-hash-files GLOB...: SHA-256 over the matched files (in path order), for cache keys.
set -euo pipefail
shopt -s globstar nullglob dotglob
files=()
for pattern in "$@"; do
  for match in $pattern; do
    [ -f "$match" ] && files+=("$match")
  done
done
if [ ${#files[@]} -eq 0 ]; then
  echo "codebuild-hash-files: no file matches $*" >&2
  exit 1
fi
printf '%s\n' "${files[@]}" | LC_ALL=C sort -u | while IFS= read -r f; do cat -- "$f"; done | sha256sum | cut -d' ' -f1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree as a peer might send it: the cache's own files, and more besides.
    fn peer_tree(store: &Store, scratch: &Path) -> Digest {
        for (path, text) in [
            ("rel/deps/ok.txt", "wanted"),
            ("rel/src/main.c", "overwritten source"),
            ("abs/root/.m2/repo/lib.jar", "wanted too"),
            ("abs/etc/profile.d/evil.sh", "planted"),
        ] {
            let full = scratch.join(path);
            fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            fs::write(full, text).expect("write");
        }
        import::import_dir_once(store, scratch, "a peer's tree")
            .expect("imports")
            .root
            .expect("a tree")
    }

    fn files(root: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read").flatten() {
                if entry.file_type().expect("type").is_dir() {
                    stack.push(entry.path());
                } else {
                    let path = entry.path();
                    let relative = path.strip_prefix(root).expect("inside");
                    found.push(relative.display().to_string());
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn an_entry_from_a_peer_restores_only_what_its_paths_name() {
        let temp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&temp.path().join("store")).expect("store");
        let tree = peer_tree(&store, &temp.path().join("made"));
        let mut entry = Entry {
            key: "deps".into(),
            paths: vec!["deps/**/*".into(), "/root/.m2/**/*".into()],
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            tree: tree.to_string(),
            created_ms: 1,
            from_peer: Some("12D3KooWPeer".into()),
        };
        let workspace = temp.path().join("workspace");
        fs::create_dir_all(&workspace).expect("mkdir");
        let scratch = temp.path().join("scratch");
        let stage = |entry: &Entry| restore(&store, entry, &workspace, &scratch, None);
        let restored = stage(&entry).expect("restores");
        assert_eq!(
            files(&restored.staged),
            ["abs/root/.m2/repo/lib.jar", "rel/deps/ok.txt"]
        );
        assert!(
            !restored.staged.join("abs/etc").exists(),
            "emptied folders go too"
        );

        // This node's own entries were selected by these paths when saved: restored as they are.
        entry.from_peer = None;
        let own = stage(&entry).expect("restores");
        assert_eq!(files(&own.staged).len(), 4);
    }
}
