//! `peerbuild cache`: the content-addressed store from the command line.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::CacheCommand;
use crate::data_dir::DataDir;
use crate::store::{Store, StoreError, export, gc, import};

/// Opens the store in the data directory.
pub fn open_store(data_dir: Option<&Path>) -> Result<Store> {
    let data = DataDir::open(data_dir)?;
    let path = data.root().join("store");
    Store::open(&path).with_context(|| format!("cannot open the store at {}", path.display()))
}

/// Has the node running on the data directory, if one does, fetch what the store lacks of the
/// tree `digest` from its peers (into the store both share), restoring it into `into` as it
/// arrives. `None` when no node runs (the export then says what is missing).
fn fetch_from_pool(
    data_dir: Option<&Path>,
    digest: &protocol::Digest,
    into: &Path,
) -> Result<Option<crate::pool::shared_cache::TreeFetched>> {
    let data = DataDir::open(data_dir)?;
    let Some(pool) = crate::pool::client::ApiPoolCache::on_data_dir(data.root()) else {
        return Ok(None);
    };
    eprintln!("peerbuild: {digest} is not all in this store; fetching it from the pool");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let into = std::path::absolute(into)
        .with_context(|| format!("cannot restore into {}", into.display()))?;
    let fetched = runtime
        .block_on(pool.fetch_tree(*digest, Some(&into)))
        .with_context(|| format!("cannot fetch {digest} from the pool"))?;
    if let Some(why) = &fetched.not_exported {
        eprintln!("peerbuild: {why}; exporting it here");
    }
    for dropped in &fetched.dropped {
        eprintln!("peerbuild: dropped from the transfer: {dropped}");
    }
    Ok(Some(fetched))
}

/// Shows how many bytes an operation has moved, on standard error, while it runs, when standard
/// error is a terminal; cleared when dropped.
struct Progress {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(store: &std::sync::Arc<Store>, verb: &'static str) -> Progress {
        use std::io::{IsTerminal, Write};
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (done, store) = (done.clone(), store.clone());
            let started = Instant::now();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let bytes = store.progress.load(Ordering::Relaxed);
                    let _ = write!(
                        std::io::stderr(),
                        "\r\x1b[2K{verb} {} ({:.0}s)",
                        mib(bytes),
                        started.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                }
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            })
        });
        Progress { done, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

pub fn run(data_dir: Option<&Path>, command: CacheCommand) -> Result<u8> {
    let store = std::sync::Arc::new(open_store(data_dir)?);
    match command {
        CacheCommand::Import { dir, json } => {
            let started = Instant::now();
            let absolute = std::path::absolute(&dir)?;
            let progress = Progress::start(&store, "importing");
            let imported = import::import_dir(
                &store,
                &absolute,
                &format!("import of {}", absolute.display()),
            )
            .with_context(|| format!("cannot import {}", dir.display()))?;
            drop(progress);
            let root = imported.root.context("the import produced no tree")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"digest": root.to_string(), "imported": imported, "duration_ms": started.elapsed().as_millis() as u64})
                );
            } else {
                eprintln!(
                    "imported {} files ({}), {} read, {} new in the store, in {:.2}s",
                    imported.files,
                    mib(imported.bytes),
                    imported.files_read,
                    mib(imported.new_bytes),
                    started.elapsed().as_secs_f64()
                );
                println!("{root}");
            }
        }
        CacheCommand::Export { digest, dir, json } => {
            let started = Instant::now();
            let progress = Progress::start(&store, "exporting");
            let mut exported = export::export(&store, &digest, &dir);
            drop(progress);
            // A blob this store lacks (or had to set aside as corrupt) comes from the pool, when
            // a node runs here, which restores the tree into the folder as it arrives (the
            // failed export left nothing behind). If the node cannot write there, the tree is
            // exported here once it is in the store.
            let mut fetched = None;
            if let Err(StoreError::Missing { .. } | StoreError::Corrupt { .. }) = &exported {
                fetched = fetch_from_pool(data_dir, &digest, &dir)?;
                match fetched.as_ref().map(|f| f.exported) {
                    Some(Some(restored)) if restored.is_in(&dir) => exported = Ok(restored),
                    Some(_) => {
                        let progress = Progress::start(&store, "exporting");
                        exported = export::export(&store, &digest, &dir);
                        drop(progress);
                    }
                    None => {}
                }
            }
            let exported = exported
                .with_context(|| format!("cannot export {digest} into {}", dir.display()))?;
            if exported.skipped_symlinks > 0 {
                eprintln!(
                    "peerbuild: {} symlinks were not restored: they lead out of the tree, or the file system folds case",
                    exported.skipped_symlinks
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"exported": exported, "fetched": fetched, "duration_ms": started.elapsed().as_millis() as u64})
                );
            } else {
                println!(
                    "exported {} files ({}), {} folders, {} symlinks into {} in {:.2}s",
                    exported.files,
                    mib(exported.bytes),
                    exported.dirs,
                    exported.symlinks,
                    dir.display(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        CacheCommand::Stat { json } => {
            let stats = store.stats()?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("store:       {}", store.root().display());
                println!("objects:     {}", stats.objects);
                println!("stored:      {}", mib(stats.stored_bytes));
                println!("logical:     {}", mib(stats.logical_bytes));
                println!(
                    "referenced:  {} by {} trees",
                    mib(stats.referenced_bytes),
                    stats.roots
                );
                println!(
                    "compression: {:.2}x (logical / stored)",
                    ratio(stats.logical_bytes, stats.stored_bytes)
                );
                println!(
                    "dedup:       {:.2}x (referenced / logical)",
                    ratio(stats.referenced_bytes, stats.logical_bytes)
                );
            }
        }
        CacheCommand::Keys { json } => {
            let entries = crate::engine::cache::all_entries(&store);
            if json {
                for entry in &entries {
                    println!("{}", serde_json::to_string(entry)?);
                }
            } else if entries.is_empty() {
                println!("no cache entries yet; a buildspec's `cache:` section saves them");
            } else {
                for entry in &entries {
                    println!(
                        "{}  {}/{}  paths: {}",
                        entry.key,
                        entry.os,
                        entry.arch,
                        entry.paths.join(", ")
                    );
                    println!("    tree {}", entry.tree);
                }
            }
        }
        CacheCommand::Pin { digest } => {
            if !store.contains(&digest) {
                anyhow::bail!("the store has no tree {digest}");
            }
            store.pin(&digest.to_string(), &[digest])?;
            println!("pinned {digest}");
        }
        CacheCommand::Unpin { digest } => {
            if !store.unpin(&digest.to_string()) {
                anyhow::bail!("{digest} was not pinned");
            }
            println!("unpinned {digest}");
        }
        CacheCommand::Gc { max_size, json } => {
            let collected = gc::collect(&store, max_size)?;
            if json {
                println!("{}", serde_json::to_string(&collected)?);
            } else {
                println!(
                    "removed {} trees and {} objects, freed {}; the store now holds {}",
                    collected.roots_removed,
                    collected.objects_removed,
                    mib(collected.bytes_freed),
                    mib(collected.stored_bytes_after)
                );
            }
        }
    }
    Ok(0)
}
