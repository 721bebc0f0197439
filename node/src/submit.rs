//! `peerbuild run` with a node running (on the data directory, or `--node`): everything is
//! checked here first, as for a local build (exit 2 on a refusal, nothing submitted); the
//! source goes into this store, and to the node's if that is another (`pool::blobs`); the
//! build is submitted to the node (`POST /v1/builds`), which places it on a peer; its events
//! are shown live and recorded here as they arrive; artifacts, fetched by the node, come back
//! into this store and are exported for `--artifacts`. Ctrl-C closes the submission, and the
//! node stops the build wherever it runs.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::engine::secrets;
use crate::engine::{Interrupt, Limits, OutputBudget};
use crate::events::{ArtifactRecord, BuildResult, Envelope, Event, Level, Status};
use crate::pool::blobs;
use crate::pool::client::{self, Endpoint};
use crate::pool::tasks::Submission;
use crate::reporter::Reporter;
use crate::run::{self, Placing, Prepared, refuse};
use crate::store::{Store, export, import};
use protocol::task::TaskOffer;

/// Submits the build to the node at `endpoint` and follows it to its end; the exit status.
pub async fn submit(data_dir: Option<&Path>, args: RunArgs, endpoint: Endpoint) -> Result<u8> {
    for (given, flag) in [
        (args.image.is_some(), "--image"),
        (args.allow_privileged, "--allow-privileged"),
        (args.slots.is_some(), "--slots"),
        (args.store_max_size.is_some(), "--store-max-size"),
    ] {
        if given {
            return refuse(format!(
                "{flag} applies to builds on this machine, but a node runs here and the build goes to the pool; pass --local to run it here"
            ));
        }
    }
    let prepared = run::prepare(data_dir, &args, Placing::Pool)?;
    let store = Arc::new(crate::cache_cli::open_store(Some(prepared.data.root()))?);
    // Everything that can refuse comes before the build's record is started.
    let submission = submission(&prepared, &args, &store).await?;
    // A node on another data directory gets the source first (on this one: a question).
    blobs::upload_tree(&endpoint, &store, submission.build.source)
        .await
        .context("cannot hand the source to the node")?;
    let build_dir = prepared.data.build(&prepared.id.to_string());
    run::start_record(&build_dir)?;
    let reporter = Reporter::new(run::sinks(&args, Some(&build_dir))?);
    reporter.add_secrets(prepared.secrets.entries().map(|(_, value)| value.clone()));
    let (stop_sender, stop) = watch::channel(None);
    let signals = tokio::spawn(run::forward_signals(stop_sender));
    let ticker = tokio::spawn(run::tick(reporter.clone()));
    let follow = Follow {
        endpoint: &endpoint,
        prepared: &prepared,
        reporter: &reporter,
    };
    let mut result = match &prepared.buildspec.batch {
        None => follow.build(&submission, stop, false).await,
        Some(batch) => follow.batch(&submission, batch, &args, stop).await,
    };
    ticker.abort();
    signals.abort();
    fetch_artifacts(&endpoint, &store, &mut result).await;
    if let Some(root) = &prepared.artifacts_root {
        let planned: Vec<String> = prepared
            .buildspec
            .batch
            .as_ref()
            .map(|b| {
                crate::batch::members(b)
                    .into_iter()
                    .map(|m| m.identifier)
                    .collect()
            })
            .unwrap_or_default();
        export_artifacts(&store, root, &mut result, &planned, &reporter).await;
    }
    let status = result.status;
    run::finish_record(&reporter, Some(&build_dir), result)?;
    Ok(status.exit_code())
}

/// Following a submitted build (or a batch member) on the node.
struct Follow<'a> {
    endpoint: &'a Endpoint,
    prepared: &'a Prepared,
    reporter: &'a Reporter,
}

impl Follow<'_> {
    /// Submits and shows the build's events until its result; a stop (Ctrl-C, or a batch's
    /// fast-fail) closes the submission, and the node stops the build wherever it runs.
    async fn build(
        &self,
        submission: &Submission,
        mut stop: watch::Receiver<Option<Interrupt>>,
        member: bool,
    ) -> BuildResult {
        let unfinished = |status, message| {
            let mut result = unfinished(self.prepared, submission, status, message);
            result.member = submission.build.batch_member.clone();
            result
        };
        let json = match serde_json::to_vec(submission) {
            Ok(json) => json,
            Err(err) => return unfinished(Status::Fault, err.to_string()),
        };
        let mut lines = match client::post_lines(self.endpoint, "/v1/builds", json).await {
            Ok(lines) => lines,
            Err(err) => {
                return unfinished(
                    Status::Fault,
                    format!("the node did not take the build: {err:#}"),
                );
            }
        };
        let mut broken = None;
        let mut stop_open = true;
        loop {
            let line = tokio::select! {
                line = lines.next() => line,
                changed = stop.changed(), if stop_open => {
                    // A closed channel (no signal handler) is no stop; a value is.
                    match changed {
                        Ok(()) if stop.borrow().is_some() => break,
                        Ok(()) => continue,
                        Err(_) => {
                            stop_open = false;
                            continue;
                        }
                    }
                }
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(err) => {
                    broken = Some(format!("{err:#}"));
                    break;
                }
            };
            let Ok(envelope) = serde_json::from_str::<Envelope>(&line) else {
                continue;
            };
            match envelope.event {
                Event::BuildFinished { result } => return *result,
                // A member's own start is the batch's business, already shown.
                Event::BuildStarted { .. } if member => {}
                // The worker names its own copy of the source; the user knows it by theirs.
                Event::BuildStarted {
                    build_id,
                    build_number,
                    source_version,
                    sandbox,
                    batch,
                    start_time_ms,
                    ..
                } => self.reporter.emit(Event::BuildStarted {
                    build_id,
                    build_number,
                    source: self.prepared.source.root.display().to_string(),
                    source_version,
                    sandbox,
                    batch,
                    start_time_ms,
                }),
                // The node's notes on where a member runs are the member's.
                Event::Note {
                    member: None,
                    level,
                    message,
                } if member => self.reporter.emit(Event::Note {
                    member: submission.build.batch_member.clone(),
                    level,
                    message,
                }),
                event => self.reporter.emit(event),
            }
        }
        // Dropping the answer closes the submission: a build still running is stopped.
        drop(lines);
        if stop.borrow().is_some() {
            return unfinished(
                Status::Stopped,
                "the build was stopped; the node stops it wherever it runs".to_owned(),
            );
        }
        unfinished(
            Status::Fault,
            format!(
                "the node stopped answering before the build ended{}",
                broken.map(|b| format!(" ({b})")).unwrap_or_default()
            ),
        )
    }

    /// A batch fanned out across the pool: each member is its own submission (the node places
    /// each on a peer), started in the order the batch's graph allows, as for a local batch.
    async fn batch(
        &self,
        submission: &Submission,
        batch: &protocol::buildspec::Batch,
        args: &RunArgs,
        stop: watch::Receiver<Option<Interrupt>>,
    ) -> BuildResult {
        let started = std::time::Instant::now();
        self.reporter.emit(Event::BuildStarted {
            build_id: self.prepared.id.to_string(),
            build_number: self.prepared.number,
            source: self.prepared.source.root.display().to_string(),
            source_version: self.prepared.source.git_commit.clone(),
            sandbox: args.sandbox.clone().unwrap_or_else(|| "pool".to_owned()),
            batch: true,
            start_time_ms: self.prepared.start_time_ms,
        });
        let planned = crate::batch::members(batch);
        for member in &planned {
            if let Some(description) = &member.description {
                self.reporter.emit(Event::Note {
                    member: Some(member.identifier.clone()),
                    level: Level::Info,
                    message: description.clone(),
                });
            }
        }
        let limits = Limits {
            deadline: tokio::time::Instant::now() + args.timeout,
            stop: stop.clone(),
            output: OutputBudget::new(u64::MAX),
        };
        let identifiers: Vec<String> = planned.iter().map(|m| m.identifier.clone()).collect();
        let runner: crate::batch::MemberRunner<'_> = Box::new(move |index, member_limits| {
            let mut member = submission.clone();
            member.build.batch_member = identifiers.get(index).cloned();
            Box::pin(async move {
                let mut result = self.build(&member, member_limits.stop, true).await;
                result.member = member.build.batch_member.clone();
                result
            })
        });
        // Every member may start at once: the node waits for free slots in the pool.
        let slots = planned.len().max(1);
        let members = crate::batch::run_members(
            &planned,
            batch.fast_fail,
            slots,
            limits,
            self.reporter,
            runner,
        )
        .await;
        let stopped = stop.borrow().is_some();
        run::batch_result(
            self.prepared,
            &planned,
            members,
            stopped,
            started,
            "pool".to_owned(),
        )
    }
}

/// The submission: the source imported into the shared store as a tree, and what the node and
/// the peer running the build need to know.
async fn submission(prepared: &Prepared, args: &RunArgs, store: &Arc<Store>) -> Result<Submission> {
    let source = prepared.source.clone();
    let import_store = store.clone();
    let what = format!("source of {}", prepared.id);
    let imported = tokio::task::spawn_blocking(move || {
        import::import_files(&import_store, &source.root, &source.files, &what)
    })
    .await??;
    let tree = imported.root.context("the source produced no tree")?;
    let mut requires = Vec::new();
    for requirement in &args.require {
        let Some((label, value)) = requirement.split_once('=') else {
            return refuse(format!("--require {requirement}: expected LABEL=VALUE"));
        };
        requires.push((label.to_owned(), value.to_owned()));
    }
    Ok(Submission {
        build: TaskOffer {
            // The node names the task.
            task: String::new(),
            source: tree,
            source_name: prepared
                .source
                .root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "build".into()),
            source_version: prepared.source.git_commit.clone(),
            buildspec: prepared.buildspec_text.clone(),
            build_id: prepared.id.to_string(),
            build_number: prepared.number,
            env: prepared.submitted.clone(),
            timeout_secs: args.timeout.as_secs(),
            sandbox: args.sandbox.clone(),
            deny_network: args.deny_network,
            batch_member: None,
        },
        secrets: needed_secrets(prepared),
        requires,
    })
}

/// The secrets the build reads (its buildspec's, and its batch members' own buildspecs'): only
/// those travel to the peer that runs it, not the whole `--secrets` file.
fn needed_secrets(prepared: &Prepared) -> Vec<(String, String)> {
    let mut names = secrets::referenced(&prepared.buildspec);
    if let Some(batch) = &prepared.buildspec.batch {
        for member in crate::batch::members(batch) {
            let Some(path) = &member.buildspec else {
                continue;
            };
            let text = std::fs::read_to_string(prepared.source.root.join(path));
            if let Ok(own) = text.map(|t| protocol::buildspec::parse(path, &t)) {
                names.extend(own.iter().flat_map(secrets::referenced));
            }
        }
    }
    prepared
        .secrets
        .entries()
        .filter(|(name, _)| names.contains(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The result of a submission that ended without one from the node.
fn unfinished(
    prepared: &Prepared,
    submission: &Submission,
    status: Status,
    message: String,
) -> BuildResult {
    BuildResult {
        start_time_ms: prepared.start_time_ms,
        source_digest: Some(submission.build.source.to_string()),
        ..BuildResult::ended_early(prepared.id.to_string(), prepared.number, status, message)
    }
}

/// Fetches the result's artifact trees from the node's store into this one (nothing to fetch
/// when they are one), so they can be exported here. One that cannot be fetched fails the
/// build: its artifacts did not come back.
async fn fetch_artifacts(endpoint: &Endpoint, store: &Arc<Store>, result: &mut BuildResult) {
    let mut failed = Vec::new();
    let digests: Vec<String> = std::iter::once(&*result)
        .chain(result.members.iter())
        .flat_map(|r| r.artifacts.iter().map(|a| a.digest.clone()))
        .collect();
    for text in digests {
        let Ok(digest) = text.parse::<protocol::Digest>() else {
            continue;
        };
        if let Err(err) = blobs::download_tree(endpoint.clone(), store, digest).await {
            failed.push(format!("{digest}: {err:#}"));
        }
    }
    if !failed.is_empty() {
        result.status = Status::Fault;
        result.message = Some(format!(
            "artifacts could not be fetched from the node: {}",
            failed.join("; ")
        ));
    }
}

/// Writes each artifact tree (fetched into this store) into `--artifacts`:
/// the primary artifact's files in the folder itself, a secondary one in a sub-folder named by
/// its identifier, a batch member's under its identifier, as for a local build. The names come
/// from a peer's result, so each must be one plain folder name, and a member one of this
/// batch's own; anything else is not written. A tree that cannot be written fails the build.
async fn export_artifacts(
    store: &Arc<Store>,
    root: &Path,
    result: &mut BuildResult,
    planned: &[String],
    reporter: &Reporter,
) {
    let mut jobs: Vec<(&mut ArtifactRecord, Option<std::path::PathBuf>)> = Vec::new();
    for artifact in &mut result.artifacts {
        let folder = artifact_folder(root, &artifact.identifier);
        jobs.push((artifact, folder));
    }
    for member in &mut result.members {
        let member_root = member
            .member
            .as_deref()
            .filter(|m| planned.iter().any(|p| p == m) && plain_name(m))
            .map(|m| root.join(m));
        for artifact in &mut member.artifacts {
            let folder = member_root
                .as_ref()
                .and_then(|r| artifact_folder(r, &artifact.identifier));
            jobs.push((artifact, folder));
        }
    }
    // The primary artifact goes into its folder first: a secondary one's sub-folder is then
    // created inside it.
    jobs.sort_by_key(|(_, folder)| folder.as_ref().map_or(0, |f| f.components().count()));
    let mut failed = Vec::new();
    for (artifact, folder) in jobs {
        let (Some(folder), Ok(digest)) = (folder, artifact.digest.parse::<protocol::Digest>())
        else {
            failed.push(format!(
                "`{}` (its name or digest is not valid)",
                artifact.identifier
            ));
            continue;
        };
        let export_store = store.clone();
        let target = folder.clone();
        let exported = tokio::task::spawn_blocking(move || {
            export::export(&export_store, &digest, &target).map_err(|e| format!("{e:#}"))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match exported {
            Ok(_) => artifact.location = Some(folder.display().to_string()),
            Err(err) => failed.push(format!(
                "`{}` into {}: {err}",
                artifact.identifier,
                folder.display()
            )),
        }
    }
    if !failed.is_empty() {
        let message = format!("artifacts could not be written: {}", failed.join("; "));
        reporter.emit(Event::Note {
            member: None,
            level: Level::Warning,
            message: message.clone(),
        });
        if result.status == Status::Succeeded {
            result.status = Status::Fault;
            result.message = Some(message);
        }
    }
}

/// Whether `name` is one plain folder name (no `/`, not `.` or `..`, not empty).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Where an artifact goes under `root`; `None` when its identifier is not a plain name.
fn artifact_folder(root: &Path, identifier: &str) -> Option<std::path::PathBuf> {
    if identifier == "primary" {
        Some(root.to_owned())
    } else {
        plain_name(identifier).then(|| root.join(identifier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names_from_a_peer_stay_inside_the_folder() {
        let root = Path::new("/out");
        assert_eq!(artifact_folder(root, "primary"), Some(root.to_owned()));
        assert_eq!(artifact_folder(root, "docs"), Some(root.join("docs")));
        for bad in ["", ".", "..", "../x", "/etc", "a/b"] {
            assert_eq!(artifact_folder(root, bad), None, "{bad:?}");
        }
    }
}
