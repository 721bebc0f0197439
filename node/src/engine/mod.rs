//! The build engine: runs one build (a whole buildspec, or one member of a batch) on this
//! machine through a sandbox executor, with CodeBuild's phases, transitions and variables.
//!
//! Transitions (BUILDSPEC.md; where AWS is silent, the choice is written in docs/BUILDSPEC.md):
//! - INSTALL or PRE_BUILD fails: the later build phases are skipped (POST_BUILD too), and
//!   UPLOAD_ARTIFACTS is still attempted.
//! - BUILD fails: POST_BUILD runs with `CODEBUILD_BUILD_SUCCEEDING=0`; UPLOAD_ARTIFACTS follows.
//! - `on-failure: ABORT`: every later build phase is skipped; UPLOAD_ARTIFACTS is attempted.
//! - `on-failure: CONTINUE`: the build is marked failed, and the next phases run as usual.
//! - `on-failure: RETRY...`: the phase (commands, then finally) runs again up to the count, when
//!   the failed attempt's output matches the pattern if one is given; then the default applies.
//! - A timeout or a stop ends the build at once: its processes are killed and nothing else runs.

pub mod artifacts;
pub mod cache;
pub mod env;
pub mod mask;
pub mod reports;
pub mod runtimes;
pub mod secrets;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use protocol::buildspec::{
    ArtifactSet, Buildspec, Cache, CacheAction, OnFailure, Phase, PhaseName, SandboxKind,
};
use sandbox::{Executor, OutputSink, SessionSpec, ShellKind, ShellMode};
use tokio::sync::watch;

use crate::data_dir::DataDir;
use crate::events::{
    ArtifactRecord, BuildResult, CacheRecord, Event, Level, PhaseRecord, ReportRecord, Status,
    Variable,
};
use crate::ids::BuildId;
use crate::reporter::Reporter;
use crate::source::Source;
use crate::users::User;
use env::Variables;
use mask::LineBuffer;
use session::{Handover, Sessions};

/// Why a build was cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupt {
    TimedOut,
    Stopped,
    /// The build printed more than its output budget.
    OutputLimit,
}

impl Interrupt {
    fn status(self) -> Status {
        match self {
            Interrupt::TimedOut => Status::TimedOut,
            Interrupt::Stopped => Status::Stopped,
            Interrupt::OutputLimit => Status::Failed,
        }
    }
}

/// How much output one build may print (its log is kept whole in the data directory, so a
/// build that floods it must be stopped before it fills the disk).
#[derive(Debug)]
pub struct OutputBudget {
    limit: u64,
    used: AtomicU64,
    exceeded: tokio::sync::Notify,
}

impl OutputBudget {
    pub fn new(limit: u64) -> Arc<OutputBudget> {
        Arc::new(OutputBudget {
            limit,
            used: AtomicU64::new(0),
            exceeded: tokio::sync::Notify::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts `bytes` of output; returns how many of them fit in the budget (all, some, or
    /// none once it is spent).
    fn spend(&self, bytes: usize) -> usize {
        let before = self.used.fetch_add(bytes as u64, Ordering::Relaxed);
        let fits = self.limit.saturating_sub(before).min(bytes as u64) as usize;
        if fits < bytes && before <= self.limit {
            self.exceeded.notify_waiters();
        }
        fits
    }

    fn is_spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.limit
    }

    async fn spent(&self) {
        loop {
            let notified = self.exceeded.notified();
            if self.is_spent() {
                return;
            }
            notified.await;
        }
    }
}

/// Where a build's artifacts go.
#[derive(Clone, Debug)]
pub enum ArtifactTarget {
    /// `--artifacts DIR` (for a batch member, `DIR/IDENTIFIER`): the primary artifact's files go
    /// in the folder itself, each secondary artifact in a sub-folder named by its identifier.
    /// They are stored as trees too.
    Folder(PathBuf),
    /// Without `--artifacts`: artifacts are only stored as trees; the summary says how to
    /// export them.
    Store,
}

/// A build ready to run.
pub struct Build {
    pub id: BuildId,
    pub number: u64,
    /// The batch member's identifier.
    pub member: Option<String>,
    pub buildspec: Buildspec,
    pub source: Arc<Source>,
    /// The whole environment but `CODEBUILD_SRC_DIR`, which is known once the workspace is.
    pub env: Variables,
    /// The users `run-as` names, looked up.
    pub users: HashMap<String, User>,
    pub artifacts: ArtifactTarget,
    pub start_time_ms: u64,
    /// Secret values to mask in everything the build shows.
    pub secrets: Vec<String>,
    /// The batch member asks for CodeBuild's `privileged-mode` (already allowed by the owner).
    pub privileged: bool,
    /// Whether the build may reach other machines (already allowed by the owner).
    pub network: sandbox::Network,
}

/// What every build on this node shares.
pub struct Node {
    pub executor: Arc<dyn Executor>,
    /// Executors for phases the buildspec puts in another sandbox (`peerbuild.phases`).
    pub phase_executors: HashMap<SandboxChoice, Arc<dyn Executor>>,
    pub store: Arc<crate::store::Store>,
    pub data: DataDir,
    pub reporter: Reporter,
    /// The peer that runs builds here, as results name it.
    pub peer: String,
    pub me: User,
    /// The pool's cache, when a node is running: asked on a miss, told of every save.
    pub pool_cache: Option<Arc<dyn cache::PoolCache>>,
}

/// A sandbox and, for `docker`, its image.
pub type SandboxChoice = (SandboxKind, Option<String>);

/// The deadline and the stop signal of one build.
#[derive(Clone)]
pub struct Limits {
    pub deadline: tokio::time::Instant,
    pub stop: watch::Receiver<Option<Interrupt>>,
    pub output: Arc<OutputBudget>,
}

/// How a step (a command, a block, a phase) ended.
enum Step {
    Ok,
    Failed { command: String, code: i32 },
    Interrupted(Interrupt),
    Fault(String),
}

impl Limits {
    /// Runs `work` unless the build times out or is stopped first.
    async fn guard<T>(&self, work: impl Future<Output = T>) -> Result<T, Interrupt> {
        let mut stop = self.stop.clone();
        let out = tokio::select! {
            out = work => out,
            _ = tokio::time::sleep_until(self.deadline) => return Err(Interrupt::TimedOut),
            interrupt = stopped(&mut stop) => return Err(interrupt),
            _ = self.output.spent() => return Err(Interrupt::OutputLimit),
        };
        // Work that ended because of its flood (a backend's own cap) ends on the budget too.
        if self.output.is_spent() {
            return Err(Interrupt::OutputLimit);
        }
        Ok(out)
    }
}

/// Resolves when the build is told to stop (or times out, as the sender decides).
pub async fn stopped_signal(stop: &mut watch::Receiver<Option<Interrupt>>) -> Interrupt {
    stopped(stop).await
}

async fn stopped(stop: &mut watch::Receiver<Option<Interrupt>>) -> Interrupt {
    loop {
        if let Some(interrupt) = *stop.borrow_and_update() {
            return interrupt;
        }
        if stop.changed().await.is_err() {
            // Nobody can stop this build any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Runs a build to its end and returns its result; never panics on anything the build does.
pub async fn run(build: Build, node: &Node, limits: Limits) -> BuildResult {
    node.reporter.add_secrets(build.secrets.iter().cloned());
    let mut run = Run {
        sessions: None,
        phases: Vec::new(),
        failed: false,
        message: None,
        end: None,
        tail: String::new(),
        exported: Vec::new(),
        artifacts: Vec::new(),
        reports: Vec::new(),
        source_digest: None,
        caches: Vec::new(),
        limits,
        started: Instant::now(),
        build: &build,
        node,
    };
    run.all().await;
    run.result()
}

struct Run<'a> {
    build: &'a Build,
    node: &'a Node,
    limits: Limits,
    sessions: Option<Sessions>,
    phases: Vec<PhaseRecord>,
    /// The build has failed (it may still run POST_BUILD and UPLOAD_ARTIFACTS).
    failed: bool,
    /// The first failure's explanation.
    message: Option<String>,
    /// Set when the build ended early: a fault, a timeout or a stop.
    end: Option<Status>,
    /// The current phase attempt's output, for `RETRY-<regex>`.
    tail: String,
    exported: Vec<Variable>,
    artifacts: Vec<ArtifactRecord>,
    reports: Vec<ReportRecord>,
    /// The source's tree digest, once DOWNLOAD_SOURCE has stored it.
    source_digest: Option<String>,
    caches: Vec<CacheRecord>,
    started: Instant,
}

/// The most output kept for matching a retry pattern.
const TAIL_LIMIT_BYTES: usize = 256 * 1024;

impl Run<'_> {
    fn emit(&self, event: Event) {
        self.node.reporter.emit(event);
    }

    fn note(&self, level: Level, message: impl Into<String>) {
        self.emit(Event::Note {
            member: self.build.member.clone(),
            level,
            message: message.into(),
        });
    }

    fn fail(&mut self, message: String) {
        self.failed = true;
        self.message.get_or_insert(message);
    }

    async fn all(&mut self) {
        let Some(workspace) = self.provision() else {
            return;
        };
        let mut staged_cache = None;
        let mut artifact_names = None;
        if self.download_source(workspace.path()).await {
            let cache = self.usable_cache();
            if let Some(cache) = cache.as_ref().filter(|c| c.action != CacheAction::Save) {
                self.restore_cache(&workspace, cache).await;
            }
            if self.end.is_none() {
                self.build_phases().await;
            }
            if self.end.is_none() {
                self.export_variables().await;
            }
            // What needs the build's shell is done now: the cache's key and its paths outside
            // the workspace, the artifacts' names.
            if self.end.is_none()
                && !self.failed
                && let Some(cache) = cache.filter(|c| c.action != CacheAction::Restore)
            {
                staged_cache = self.stage_cache(&workspace, cache).await;
            }
            if self.end.is_none() && self.has_uploads() {
                artifact_names = self.artifact_names().await;
            }
        }
        // The sandbox ends before anything is read out of it: no process the build started can
        // change a file while the node collects it.
        if let Some(sessions) = &mut self.sessions
            && let Err(err) = sessions.close().await
        {
            // Something the build started may still run: nothing is read out of its reach.
            self.end = Some(Status::Fault);
            self.message.get_or_insert(format!(
                "could not end the build's sandbox ({err}); its caches and artifacts are not collected"
            ));
            staged_cache = None;
            artifact_names = None;
        }
        // The staging folder leaves the workspace before anything reads it (and whether or
        // not a cache is saved, so it never reaches the artifacts).
        let outside = workspace.take_stage();
        if self.end.is_none()
            && let Some(staged) = staged_cache
        {
            let outside = outside.as_deref().filter(|_| staged.outside_staged);
            self.save_cache(&workspace, staged, outside).await;
        }
        if let Some(outside) = &outside {
            remove_tree(outside);
        }
        if let Some(names) = artifact_names {
            self.upload(workspace.path(), names).await;
        }
        self.node.store.unpin(&self.build.id.to_string());
        drop(workspace);
    }

    /// PROVISIONING: the workspace and the session set-up.
    fn provision(&mut self) -> Option<Workspace> {
        let started = Instant::now();
        self.phase_started("PROVISIONING");
        match Workspace::create(&self.node.data, self.build) {
            Ok(workspace) => {
                let mut env = self.build.env.clone();
                env.set("CODEBUILD_SRC_DIR", workspace.path().display().to_string());
                // `codebuild-hash-files` on the build's PATH, as CodeBuild provides it.
                let path = env.get("PATH").unwrap_or_default().to_owned();
                env.set("PATH", format!("{}:{path}", workspace.bin().display()));
                let shell = match self.build.buildspec.env.shell {
                    protocol::buildspec::Shell::Bash => ShellKind::Bash,
                    protocol::buildspec::Shell::Sh => ShellKind::Sh,
                };
                let mode = match self.build.buildspec.version {
                    protocol::buildspec::Version::V0_1 => ShellMode::FreshPerCommand,
                    protocol::buildspec::Version::V0_2 => ShellMode::Persistent,
                };
                let spec = SessionSpec {
                    shell,
                    mode,
                    workdir: workspace.path().to_owned(),
                    env: env.into_vec(),
                    run_as: None,
                    privileged: self.build.privileged,
                    network: self.build.network,
                };
                self.sessions = Some(Sessions::new(
                    self.node.executor.clone(),
                    spec,
                    self.node.me.clone(),
                ));
                self.phase_finished("PROVISIONING", started, Status::Succeeded, None);
                Some(workspace)
            }
            Err(err) => {
                let message = format!("{err:#}");
                self.phase_finished(
                    "PROVISIONING",
                    started,
                    Status::Fault,
                    Some(message.clone()),
                );
                self.end = Some(Status::Fault);
                self.message = Some(message);
                None
            }
        }
    }

    /// DOWNLOAD_SOURCE: the source imported into the store as a tree (unchanged files come from
    /// the stat cache) and exported, verified, into the workspace.
    async fn download_source(&mut self, workspace: &Path) -> bool {
        let started = Instant::now();
        self.phase_started("DOWNLOAD_SOURCE");
        let source = self.build.source.clone();
        let store = self.node.store.clone();
        let target = workspace.to_owned();
        let owner = self.workspace_owner();
        let what = format!("source of {}", self.build.id);
        let pin = self.build.id.to_string();
        let copy = tokio::task::spawn_blocking(move || {
            let imported =
                crate::store::import::import_files(&store, &source.root, &source.files, &what)?;
            if let Some(root) = imported.root {
                // The source stays in the store while the build runs, whatever gc decides.
                store.pin_while_running(&pin, &[root])?;
            }
            let root = imported
                .root
                .ok_or_else(|| anyhow::anyhow!("the source produced no tree"))?;
            let exported = crate::store::export::export(&store, &root, &target)?;
            if let Some((uid, gid)) = owner {
                chown_tree(&target, uid, gid)?;
            }
            anyhow::Ok((root, imported, exported.skipped_symlinks))
        });
        let mut copy = copy;
        let outcome = match self.limits.guard(&mut copy).await {
            Ok(Ok(Ok((root, imported, skipped_symlinks)))) => {
                if skipped_symlinks > 0 {
                    self.note(
                        Level::Warning,
                        format!("{skipped_symlinks} symlinks of the source were left out of the workspace: they lead out of it, or the file system folds case"),
                    );
                }
                let detail = format!(
                    "{} files, {} bytes, tree {root}",
                    imported.files, imported.bytes
                );
                self.source_digest = Some(root.to_string());
                self.phase_finished("DOWNLOAD_SOURCE", started, Status::Succeeded, Some(detail));
                return true;
            }
            Ok(Ok(Err(err))) => (Status::Fault, format!("{err:#}")),
            Ok(Err(join)) => (Status::Fault, format!("the source copy stopped: {join}")),
            Err(interrupt) => {
                // The copy cannot be cut short mid-file; wait for it, so the workspace and the
                // source's pin are cleaned up after it and not raced by it.
                let _ = copy.await;
                (interrupt.status(), "interrupted".to_owned())
            }
        };
        self.phase_finished(
            "DOWNLOAD_SOURCE",
            started,
            outcome.0,
            Some(outcome.1.clone()),
        );
        self.end = Some(outcome.0);
        self.message = Some(outcome.1);
        false
    }

    /// The user the workspace belongs to when the build runs as another user than peerbuild.
    fn workspace_owner(&self) -> Option<(u32, u32)> {
        let name = self.build.buildspec.run_as.as_ref().or_else(|| {
            PhaseName::ALL
                .iter()
                .filter_map(|p| self.build.buildspec.phases.get(*p))
                .find_map(|p| p.run_as.as_ref())
        })?;
        let user = self.build.users.get(name)?;
        (user.uid != self.node.me.uid).then_some((user.uid, user.gid))
    }

    async fn build_phases(&mut self) {
        let mut skip_reason: Option<String> = None;
        for name in PhaseName::ALL {
            let Some(phase) = self.build.buildspec.phases.get(name) else {
                continue;
            };
            if let Some(reason) = &skip_reason {
                self.note(
                    Level::Info,
                    format!("{} skipped: {reason}", name.report_name()),
                );
                continue;
            }
            if name == PhaseName::PostBuild && self.failed {
                self.note(
                    Level::Warning,
                    "POST_BUILD runs although the build has failed, as in CodeBuild; CODEBUILD_BUILD_SUCCEEDING is 0",
                );
            }
            match self.phase(name, phase).await {
                Step::Ok => {}
                Step::Failed { command, code } => {
                    self.fail(format!(
                        "{}: command `{}` exited with status {code}",
                        name.report_name(),
                        first_line(&command)
                    ));
                    if let Some(sessions) = &mut self.sessions
                        && let Err(err) = sessions.mark_failed().await
                    {
                        self.note(
                            Level::Warning,
                            format!("could not update CODEBUILD_BUILD_SUCCEEDING: {err}"),
                        );
                    }
                    skip_reason = skip_after_failure(name, &phase.on_failure);
                }
                Step::Interrupted(interrupt) => {
                    self.end = Some(interrupt.status());
                    return;
                }
                Step::Fault(message) => {
                    self.end = Some(Status::Fault);
                    self.message.get_or_insert(message);
                    return;
                }
            }
        }
    }

    /// Runs one phase, with its retries, and reports it: in the build's session, or in a
    /// session of its own when the buildspec puts it in another sandbox.
    async fn phase(&mut self, name: PhaseName, phase: &Phase) -> Step {
        let Some(executor) = self.phase_executor(name) else {
            return self.phase_in_session(name, phase).await;
        };
        let kind = executor.kind();
        let (variables, directory) = match self.carried_state().await {
            Ok(state) => state,
            Err(step) => return step,
        };
        let mut script = String::new();
        for (variable, value) in variables {
            let value = if variable == "PEERBUILD_SANDBOX" {
                kind.to_owned()
            } else {
                value
            };
            // A wasm session reads `export` lines one a line: a value with a newline cannot go.
            if kind == "wasm" && value.contains('\n') {
                self.note(
                    Level::Warning,
                    format!("{}: the variable {variable} holds a newline, which the wasm sandbox cannot take; the phase runs without it", name.report_name()),
                );
                continue;
            }
            script.push_str(&format!("export {variable}={}\n", session::quote(&value)));
        }
        if kind != "wasm" {
            script.push_str(&format!(
                "cd -- {} 2>/dev/null || true\n",
                session::quote(&directory)
            ));
        }
        self.note(
            Level::Info,
            format!(
                "{} runs in the {kind} sandbox, in a session of its own: it starts from the build's working directory and exported variables, and sees what the build wrote in the workspace (nothing else)",
                name.report_name()
            ),
        );
        let workspace = self.sessions.as_ref().map(|s| s.workdir().to_owned());
        // Files each side wrote become the other side's own (the sandboxes may run under
        // different ids), before the phase and after it.
        self.adopt_workspace(executor.as_ref(), workspace.as_deref());
        let main = self.sessions.take();
        self.sessions = main
            .as_ref()
            .map(|sessions| sessions.elsewhere(executor, script));
        let step = self.phase_in_session(name, phase).await;
        let own = self.sessions.take();
        self.sessions = main;
        if let Some(mut own) = own
            && let Err(err) = own.close().await
        {
            // Something the phase started may still run: the build cannot go on safely.
            return Step::Fault(format!(
                "could not end {}'s sandbox: {err}",
                name.report_name()
            ));
        }
        let main_executor = self.node.executor.clone();
        self.adopt_workspace(main_executor.as_ref(), workspace.as_deref());
        step
    }

    fn adopt_workspace(&self, executor: &dyn Executor, workspace: Option<&Path>) {
        if let Some(workspace) = workspace
            && let Err(err) = executor.adopt(workspace)
        {
            self.note(Level::Warning, format!("the workspace: {err}"));
        }
    }

    /// The executor of a phase the buildspec puts in another sandbox than the build's.
    fn phase_executor(&self, name: PhaseName) -> Option<Arc<dyn Executor>> {
        let (_, settings) = self
            .build
            .buildspec
            .peerbuild
            .phases
            .iter()
            .find(|(phase, _)| *phase == name)?;
        // Only phases in another sandbox (or another image) than the build's have an entry.
        let kind = settings
            .sandbox
            .or_else(|| SandboxKind::from_key(self.node.executor.kind()))?;
        self.node
            .phase_executors
            .get(&(kind, settings.image.clone()))
            .cloned()
    }

    /// The build shell's exported variables and working directory, for a session of another
    /// sandbox to start from.
    async fn carried_state(&mut self) -> Result<(Vec<(String, String)>, String), Step> {
        let user = self.top_user();
        // NUL-separated (values may hold newlines), as \x01: captures cannot carry NULs.
        let env = self
            .capture(
                user.as_ref(),
                "{ env -0 2>/dev/null || env; } | tr '\\000' '\\001'",
            )
            .await?;
        if env.stdout.len() >= sandbox::CAPTURE_LIMIT_BYTES {
            self.note(
                Level::Warning,
                "the build's variables take more than 1 MiB; the phase in another sandbox gets only the first 1 MiB of them",
            );
        }
        let separator = if env.stdout.contains('\u{1}') {
            '\u{1}'
        } else {
            '\n'
        };
        let mut variables = Vec::new();
        for entry in env.stdout.split(separator) {
            let Some((name, value)) = entry.split_once('=') else {
                continue;
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid && !matches!(name, "PWD" | "OLDPWD" | "SHLVL" | "_") {
                variables.push((name.to_owned(), value.to_owned()));
            }
        }
        let directory = self.capture(user.as_ref(), "pwd").await?.stdout;
        Ok((variables, directory))
    }

    /// Runs one phase in the current sessions, with its retries, and reports it.
    async fn phase_in_session(&mut self, name: PhaseName, phase: &Phase) -> Step {
        let started = Instant::now();
        let report_name = name.report_name();
        self.phase_started(report_name);
        let user = self.phase_user(phase);
        let (retries, pattern) = match &phase.on_failure {
            OnFailure::Retry { count, pattern } => (*count, pattern.as_deref()),
            _ => (0, None),
        };
        if !phase.runtime_versions.is_empty()
            && let Err(step) = self
                .check_runtimes(user.as_ref(), &phase.runtime_versions)
                .await
        {
            return self.phase_ended(report_name, started, step);
        }
        let mut attempt = 0;
        let step = loop {
            self.tail.clear();
            let step = self.attempt(name, user.as_ref(), phase).await;
            if !matches!(step, Step::Failed { .. }) || attempt >= retries {
                break step;
            }
            if let Some(pattern) = pattern
                && !retry_pattern_matches(pattern, &self.tail)
            {
                self.note(
                        Level::Info,
                        format!("{report_name} failed; not retrying, since its output does not match `{pattern}`"),
                    );
                break step;
            }
            attempt += 1;
            self.note(
                Level::Warning,
                format!("{report_name} failed; retrying (retry {attempt} of {retries})"),
            );
        };
        self.phase_ended(report_name, started, step)
    }

    fn phase_user(&self, phase: &Phase) -> Option<User> {
        let name = phase
            .run_as
            .as_ref()
            .or(self.build.buildspec.run_as.as_ref())?;
        self.build.users.get(name).cloned()
    }

    fn phase_ended(&mut self, phase: &str, started: Instant, step: Step) -> Step {
        let (status, message) = match &step {
            Step::Ok => (Status::Succeeded, None),
            Step::Failed { command, code } => (
                Status::Failed,
                Some(format!(
                    "Error while executing command: {}. Reason: exit status {code}",
                    first_line(command)
                )),
            ),
            Step::Interrupted(interrupt) => {
                (interrupt.status(), Some(self.interrupt_message(*interrupt)))
            }
            Step::Fault(message) => (Status::Fault, Some(message.clone())),
        };
        if let (Step::Interrupted(_), Some(message)) = (&step, &message) {
            self.message.get_or_insert(message.clone());
        }
        self.phase_finished(phase, started, status, message);
        step
    }

    /// One attempt of a phase: its commands, then its `finally` block whatever happened (unless
    /// the build was cut short). The phase succeeds only if both blocks do.
    async fn attempt(&mut self, name: PhaseName, user: Option<&User>, phase: &Phase) -> Step {
        let step = self.block(name, user, &phase.commands).await;
        if matches!(step, Step::Interrupted(_) | Step::Fault(_)) || phase.finally.is_empty() {
            return step;
        }
        let finally = self.block(name, user, &phase.finally).await;
        match step {
            Step::Ok => finally,
            failed => match finally {
                Step::Interrupted(_) | Step::Fault(_) => finally,
                _ => failed,
            },
        }
    }

    /// Runs commands in order; the first that fails skips the rest.
    async fn block(&mut self, name: PhaseName, user: Option<&User>, commands: &[String]) -> Step {
        for command in commands {
            let step = self.command(name, user, command).await;
            if !matches!(step, Step::Ok) {
                return step;
            }
        }
        Step::Ok
    }

    async fn command(&mut self, name: PhaseName, user: Option<&User>, command: &str) -> Step {
        // Copies of the shared references, so that notes can be emitted while the session (a
        // borrow of `self.sessions`) is in use.
        let (node, build) = (self.node, self.build);
        let limits = self.limits.clone();
        let Some(sessions) = self.sessions.as_mut() else {
            return Step::Fault("the build has no shell".into());
        };
        let (session, handover) = match limits.guard(sessions.get(user)).await {
            Err(interrupt) => return Step::Interrupted(interrupt),
            Ok(Err(err)) => return Step::Fault(format!("the sandbox failed: {err}")),
            Ok(Ok(pair)) => pair,
        };
        if let Handover::Switched { from, to } = handover {
            node.reporter.emit(Event::Note {
                member: build.member.clone(),
                level: Level::Info,
                message: format!("{} runs as `{to}` (was `{from}`) in a new shell, from the previous shell's working directory and exported variables", name.report_name()),
            });
        }
        node.reporter.emit(Event::Command {
            member: build.member.clone(),
            phase: name.report_name().to_owned(),
            command: command.to_owned(),
        });
        let mut output = PhaseOutput::new(
            &node.reporter,
            &limits.output,
            build.member.clone(),
            name.report_name(),
        );
        let oom_before = session.oom_kills();
        let outcome = limits.guard(session.run(command, &mut output)).await;
        output.finish();
        let oom_after = session.oom_kills();
        append_tail(&mut self.tail, &output.text);
        // The first command of a session may start before the sandbox's cgroup exists.
        let before = oom_before.unwrap_or(0);
        if let Some(after) = oom_after
            && after > before
        {
            self.note(
                Level::Warning,
                format!(
                    "`{}`: the kernel killed {} of its processes for want of memory: the sandbox's processes together passed its memory limit (PEERBUILD_SANDBOX_MEMORY_LIMIT)",
                    first_line(command),
                    after - before
                ),
            );
        }
        match outcome {
            Err(interrupt) => Step::Interrupted(interrupt),
            Ok(Err(err)) => Step::Fault(format!("the sandbox failed: {err}")),
            Ok(Ok(outcome)) => {
                if let sandbox::CommandOutcome::ShellExited(code) = outcome {
                    if let Some(sessions) = &mut self.sessions {
                        sessions.shell_exited();
                    }
                    self.note(
                        Level::Warning,
                        format!("the build's shell exited with status {code} (an `exit`, a failure under `set -e`, or a shell syntax error); later commands start in a new shell from CODEBUILD_SRC_DIR, without the directory and variables of this one"),
                    );
                }
                if outcome.succeeded() {
                    Step::Ok
                } else {
                    Step::Failed {
                        command: command.to_owned(),
                        code: outcome.code(),
                    }
                }
            }
        }
    }

    /// Like [`Run::capture`], with what the command printed to standard error (shown in the
    /// log under `label`) returned too.
    async fn capture_with_errors(
        &mut self,
        user: Option<&User>,
        label: &'static str,
        command: &str,
    ) -> Result<(sandbox::Captured, String), Step> {
        let limits = self.limits.clone();
        let mut output = PhaseOutput::new(
            &self.node.reporter,
            &limits.output,
            self.build.member.clone(),
            label,
        );
        let sessions = self
            .sessions
            .as_mut()
            .ok_or_else(|| Step::Fault("the build has no shell".into()))?;
        let result = limits
            .guard(async {
                let (session, _) = sessions.get(user).await?;
                session.capture(command, &mut output).await
            })
            .await;
        output.finish();
        match result {
            Err(interrupt) => Err(Step::Interrupted(interrupt)),
            Ok(Err(err)) => Err(Step::Fault(format!("the sandbox failed: {err}"))),
            Ok(Ok(captured)) => Ok((captured, output.text)),
        }
    }

    /// Runs `command` in a subshell of the build's shell and returns its standard output.
    async fn capture(
        &mut self,
        user: Option<&User>,
        command: &str,
    ) -> Result<sandbox::Captured, Step> {
        Ok(self.capture_with_errors(user, "", command).await?.0)
    }

    async fn check_runtimes(
        &mut self,
        user: Option<&User>,
        wanted: &[(String, String)],
    ) -> Result<(), Step> {
        for (runtime, version) in wanted {
            let version = if version.contains('$') {
                self.capture(user, &format!("printf '%s' {}", double_quote(version)))
                    .await?
                    .stdout
            } else {
                version.clone()
            };
            let Some(probe) = runtimes::probe_command(runtime) else {
                self.note(Level::Warning, format!("runtime {runtime} {version}: peerbuild does not know this runtime (it knows {}); going on", runtimes::known_runtimes()));
                continue;
            };
            let captured = self.capture(user, probe).await?;
            let found = (captured.status == 0)
                .then(|| runtimes::version_in(&captured.stdout))
                .flatten();
            match found {
                Some(found) if runtimes::matches(&version, &found) => {
                    self.note(Level::Info, format!("runtime {runtime} {version}: found {found}"))
                }
                Some(found) => self.note(Level::Warning, format!("runtime {runtime} {version}: this machine has {found} instead; going on, as CodeBuild does on images without runtime support")),
                None => self.note(Level::Warning, format!("runtime {runtime} {version}: not installed here; going on, as CodeBuild does on images without runtime support")),
            }
        }
        Ok(())
    }

    /// `exported-variables`: their values once the build phases are over.
    async fn export_variables(&mut self) {
        let names = self.build.buildspec.env.exported_variables.clone();
        let user = self.top_user();
        for name in names {
            match self
                .capture(user.as_ref(), &format!("printf '%s' \"${{{name}-}}\""))
                .await
            {
                Ok(captured) => self.exported.push(Variable {
                    name,
                    value: captured.stdout,
                }),
                Err(Step::Interrupted(interrupt)) => {
                    self.interrupted(interrupt);
                    return;
                }
                Err(_) => self.note(
                    Level::Warning,
                    format!("could not read the exported variable {name}"),
                ),
            }
        }
    }

    /// Evaluates a cache key (or fallback key) in the build's shell: `$(...)` and variables,
    /// after the source is in place.
    async fn evaluate_key(&mut self, key: &str) -> Result<String, Step> {
        let user = self.top_user();
        let command = format!("cat <<__PEERBUILD_CACHE_KEY__\n{key}\n__PEERBUILD_CACHE_KEY__");
        let (captured, errors) = self
            .capture_with_errors(user.as_ref(), "cache key", &command)
            .await?;
        if !errors.trim().is_empty() {
            // `$(...)` failures do not fail the expansion, so a key can silently lose its hash
            // (`npm-` for ever); say so.
            self.note(
                Level::Warning,
                format!("cache: evaluating the key `{key}` printed errors, so the key `{}` may not be what you meant", captured.stdout),
            );
        }
        if self.node.reporter.mask(&captured.stdout) != captured.stdout {
            // Keys are kept in the store and shown everywhere; a key holding a secret would leak it.
            return Err(Step::Fault(format!(
                "the cache key `{key}` contains a secret value; the cache is not used (keys are stored and shown in clear)"
            )));
        }
        Ok(captured.stdout)
    }

    /// The buildspec's cache as this sandbox can use it: a `wasm` build has no file system
    /// outside its workspace, so paths outside it are left out there, with a note.
    fn usable_cache(&self) -> Option<Cache> {
        let mut cache = self.build.buildspec.cache.clone()?;
        if self.node.executor.kind() == "wasm" {
            let (outside, inside): (Vec<String>, Vec<String>) =
                cache.paths.into_iter().partition(|p| p.starts_with('/'));
            if !outside.is_empty() {
                self.note(
                    Level::Warning,
                    format!(
                        "cache: paths outside the workspace ({}) are not cached: the wasm sandbox has no files outside the workspace",
                        outside.join(", "),
                    ),
                );
            }
            if inside.is_empty() {
                return None;
            }
            cache.paths = inside;
        }
        Some(cache)
    }

    /// Restores the buildspec's cache before INSTALL.
    async fn restore_cache(&mut self, workspace: &Workspace, cache: &Cache) {
        let started = Instant::now();
        let Some(key) = self.cache_key(cache).await else {
            return;
        };
        let mut fallbacks = Vec::new();
        for fallback in &cache.fallback_keys {
            match self.evaluate_key(fallback).await {
                Ok(value) => fallbacks.push(value),
                Err(step) => return self.cache_interrupted(step),
            }
        }
        let mut from_peers = None;
        // The entry's tree the node wrote into the scratch folder as it arrived, if it did.
        let mut arrived = None;
        let scratch = workspace.scratch("cache-restore");
        let mut found = self.lookup(cache, &key, &fallbacks).await;
        // The pool is asked unless this store has the key itself; a fallback found here still
        // loses to the key itself held by a peer.
        let exact_here = matches!(found, cache::Lookup::Hit { exact: true, .. });
        if let (false, Some(pool)) = (exact_here, self.node.pool_cache.clone()) {
            let hit_here = matches!(found, cache::Lookup::Hit { .. });
            let request = cache::FindRequest {
                paths: cache.paths.clone(),
                key: key.clone(),
                fallbacks: if hit_here {
                    Vec::new()
                } else {
                    fallbacks.clone()
                },
                into: std::path::absolute(&scratch).ok(),
            };
            match self.limits.guard(pool.find(&request)).await {
                Ok(Ok(cache::Found::Fetched {
                    entry,
                    peers,
                    transferred_bytes,
                    dropped,
                    exported,
                    ..
                })) => {
                    arrived = exported.map(|exported| (entry.tree, *exported));
                    for why in dropped {
                        self.note(
                            Level::Warning,
                            format!("cache: a peer was dropped from the transfer ({why})"),
                        );
                    }
                    from_peers = Some((peers, transferred_bytes));
                    found = self.lookup(cache, &key, &fallbacks).await;
                }
                Ok(Ok(cache::Found::Nothing {
                    reason: pool_reason,
                })) => {
                    if let cache::Lookup::Miss { reason } = &mut found {
                        *reason = format!("{reason}; in the pool: {pool_reason}");
                    }
                }
                Ok(Err(err)) => {
                    self.note(
                        Level::Warning,
                        format!("cache: the pool could not be asked ({err})"),
                    );
                }
                Err(interrupt) => return self.interrupted(interrupt),
            }
        }
        let outcome = match found {
            cache::Lookup::Hit { entry, .. } => {
                // What arrived is used when it is the entry found here now.
                let arrived = arrived
                    .filter(|(tree, _)| *tree == entry.tree)
                    .map(|(_, exported)| exported);
                self.stage_entry(workspace, entry, scratch, arrived).await
            }
            cache::Lookup::Miss { reason } => Err(reason),
        };
        let outcome = match outcome {
            Ok((matched, restored)) => {
                // The session has started: files written into its workspace now must be made
                // the build's own (the namespace sandbox runs under other ids).
                if let Err(err) = self.node.executor.adopt(&restored.staged) {
                    self.note(Level::Warning, format!("cache: {err}"));
                }
                match self.unstage(&restored.staged, workspace.path()).await {
                    Ok(skipped) => Ok((matched, restored, skipped)),
                    Err(step) => return self.cache_interrupted(step),
                }
            }
            Err(reason) => Err(reason),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        let (record, message) = match outcome {
            Ok((
                matched,
                cache::Restored {
                    files,
                    bytes,
                    as_it_arrived,
                    ..
                },
                skipped,
            )) => {
                for path in skipped {
                    self.note(Level::Warning, format!("cache: left {path} as it was"));
                }
                (
                    CacheRecord {
                        matched_key: Some(matched.clone()),
                        hit: true,
                        files,
                        bytes,
                        peers: from_peers
                            .as_ref()
                            .map(|(peers, _)| peers.clone())
                            .unwrap_or_default(),
                        ..CacheRecord::new("restore", &key, duration_ms)
                    },
                    match &from_peers {
                        None => format!(
                            "cache hit: restored {files} files ({bytes} bytes) from key `{matched}` in {duration_ms} ms"
                        ),
                        Some((peers, transferred)) => format!(
                            "cache hit: restored {files} files ({bytes} bytes) from key `{matched}` in {duration_ms} ms, fetched from {} ({transferred} bytes transferred{})",
                            peers.join(", "),
                            if as_it_arrived {
                                ", written as it arrived"
                            } else {
                                ""
                            }
                        ),
                    },
                )
            }
            Err(reason) => (
                CacheRecord {
                    reason: Some(reason.clone()),
                    ..CacheRecord::new("restore", &key, duration_ms)
                },
                format!("cache miss for key `{key}`: {reason}"),
            ),
        };
        self.note(Level::Info, message);
        self.caches.push(record);
    }

    /// Looks the key, then each fallback prefix, up in this store.
    async fn lookup(&self, cache: &Cache, key: &str, fallbacks: &[String]) -> cache::Lookup {
        let cache = cache.clone();
        let store = self.node.store.clone();
        let (key, fallbacks) = (key.to_owned(), fallbacks.to_vec());
        tokio::task::spawn_blocking(move || cache::lookup(&store, &cache, &key, &fallbacks))
            .await
            .unwrap_or_else(|join| cache::Lookup::Miss {
                reason: join.to_string(),
            })
    }

    /// Stages an entry of this store in the workspace, for the build's shell to merge; exported
    /// into `scratch` first, unless it `arrived` there already.
    async fn stage_entry(
        &self,
        workspace: &Workspace,
        entry: cache::Entry,
        scratch: PathBuf,
        arrived: Option<crate::store::export::Exported>,
    ) -> Result<(String, cache::Restored), String> {
        let store = self.node.store.clone();
        let workspace_path = workspace.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let restored = cache::restore(&store, &entry, &workspace_path, &scratch, arrived);
            restored.map(|restored| (entry.key, restored))
        })
        .await
        .unwrap_or_else(|join| Err(join.to_string()))
    }

    /// The cache's key, evaluated; `None` (with a note) when the buildspec gives none.
    async fn cache_key(&mut self, cache: &Cache) -> Option<String> {
        let Some(key) = &cache.key else {
            self.note(Level::Warning, "cache: the buildspec gives no `key`, so nothing is restored or saved (fallback-keys need a key)");
            return None;
        };
        match self.evaluate_key(key).await {
            Ok(value) if !value.trim().is_empty() => Some(value),
            Ok(_) => {
                self.note(
                    Level::Warning,
                    format!("cache: the key `{key}` evaluated to nothing; no cache used"),
                );
                None
            }
            Err(step) => {
                self.cache_interrupted(step);
                None
            }
        }
    }

    /// What users read when the build was cut short.
    fn interrupt_message(&self, interrupt: Interrupt) -> String {
        match interrupt {
            Interrupt::TimedOut => "the build timed out; its processes were killed".to_owned(),
            Interrupt::Stopped => "the build was stopped; its processes were killed".to_owned(),
            Interrupt::OutputLimit => format!(
                "the build printed more than {} bytes of output, its limit (PEERBUILD_SANDBOX_OUTPUT_LIMIT); its processes were killed",
                self.limits.output.limit()
            ),
        }
    }

    /// Ends the build because it was cut short outside a phase (a cache key, an artifact
    /// name), saying why.
    fn interrupted(&mut self, interrupt: Interrupt) {
        self.end = Some(interrupt.status());
        let message = self.interrupt_message(interrupt);
        self.message.get_or_insert(message);
    }

    fn cache_interrupted(&mut self, step: Step) {
        match step {
            Step::Interrupted(interrupt) => self.interrupted(interrupt),
            Step::Fault(message) => self.note(Level::Warning, format!("cache: {message}")),
            Step::Ok | Step::Failed { .. } => {}
        }
    }

    /// Puts a restored entry into place through the build's shell (see `cache::STAGE`);
    /// returns the paths left as they were.
    async fn unstage(&mut self, staged: &Path, workspace: &Path) -> Result<Vec<String>, Step> {
        let user = self.top_user();
        let result = self
            .capture(user.as_ref(), &cache::unstage_script(staged, workspace))
            .await;
        if let Err(err) = cache::remove_staged(staged) {
            self.note(
                Level::Warning,
                format!("cache: could not remove {}: {err}", staged.display()),
            );
        }
        let captured = result?;
        Ok(captured.stdout.lines().map(str::to_owned).collect())
    }

    /// Before the sandbox ends: the cache's key, and a copy of its paths outside the workspace
    /// staged in the workspace (see `cache::STAGE`), for [`Run::save_cache`].
    async fn stage_cache(&mut self, workspace: &Workspace, cache: Cache) -> Option<StagedCache> {
        let key = self.cache_key(&cache).await?;
        let stage = workspace.path().join(cache::STAGE);
        let Some(script) = cache::stage_script(&cache.paths, &stage) else {
            return Some(StagedCache {
                cache,
                key,
                outside_staged: false,
            });
        };
        let user = self.top_user();
        match self.capture(user.as_ref(), &script).await {
            Ok(captured) => {
                for line in captured.stdout.lines() {
                    self.note(Level::Warning, format!("cache: {line}"));
                }
                let outside_staged = captured.status == 0;
                if !outside_staged {
                    self.note(
                        Level::Warning,
                        "cache: the paths outside the workspace could not be staged; they are not saved",
                    );
                }
                Some(StagedCache {
                    cache,
                    key,
                    outside_staged,
                })
            }
            Err(step) => {
                self.cache_interrupted(step);
                None
            }
        }
    }

    /// Saves the cache after a successful build, once the sandbox is gone, its paths outside the
    /// workspace read from `outside` (the staging folder taken out of the workspace); an
    /// existing entry for the key is never replaced.
    async fn save_cache(
        &mut self,
        workspace: &Workspace,
        staged: StagedCache,
        outside: Option<&Path>,
    ) {
        let started = Instant::now();
        let StagedCache { cache, key, .. } = staged;
        let outside = outside.map(Path::to_owned);
        let store = self.node.store.clone();
        let workspace_path = workspace.path().to_owned();
        let scratch = workspace.scratch("cache-save");
        let save_key = key.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            cache::save(
                &store,
                &cache,
                &save_key,
                &workspace_path,
                outside.as_deref(),
                &scratch,
            )
        })
        .await
        .unwrap_or_else(|join| Err(join.to_string()));
        let duration_ms = started.elapsed().as_millis() as u64;
        let mut record = CacheRecord::new("save", &key, duration_ms);
        let message = match outcome {
            Ok((saved, warnings)) => {
                for warning in warnings {
                    self.note(Level::Warning, format!("cache: {warning}"));
                }
                match saved {
                    cache::Saved::Stored {
                        files,
                        bytes,
                        entry,
                    } => {
                        (record.files, record.bytes) = (files, bytes);
                        if let Some(pool) = &self.node.pool_cache
                            && let Err(err) = pool.announce(&entry).await
                        {
                            self.note(
                                Level::Warning,
                                format!("cache: saved here, but the pool was not told ({err})"),
                            );
                        }
                        format!(
                            "cache saved: {files} files ({bytes} bytes) under key `{key}` in {duration_ms} ms"
                        )
                    }
                    cache::Saved::AlreadyThere => {
                        record.reason =
                            Some("an entry for this key exists; entries are immutable".into());
                        format!(
                            "cache not saved: an entry for key `{key}` already exists, and entries never change (put a hash of your lock files in the key)"
                        )
                    }
                    cache::Saved::NothingMatched => {
                        record.reason = Some("no file matches the cache paths".into());
                        format!(
                            "cache not saved: no file matches the cache paths ({})",
                            self.build
                                .buildspec
                                .cache
                                .as_ref()
                                .map(|c| c.paths.join(", "))
                                .unwrap_or_default()
                        )
                    }
                }
            }
            Err(err) => {
                record.reason = Some(err.clone());
                format!("cache not saved: {err}")
            }
        };
        self.note(Level::Info, message);
        self.caches.push(record);
    }

    fn top_user(&self) -> Option<User> {
        let name = self.build.buildspec.run_as.as_ref()?;
        self.build.users.get(name).cloned()
    }

    fn has_uploads(&self) -> bool {
        self.build.buildspec.artifacts.is_some() || !self.build.buildspec.reports.is_empty()
    }

    /// The artifacts' `name`s, evaluated in the build's shell before it ends (by identifier;
    /// absent for a set without a name). `None` when the build was stopped meanwhile.
    async fn artifact_names(&mut self) -> Option<HashMap<String, String>> {
        let mut names = HashMap::new();
        let user = self.top_user();
        for (identifier, set) in artifact_sets(&self.build.buildspec) {
            let Some(name) = &set.name else { continue };
            let command =
                format!("cat <<__PEERBUILD_ARTIFACT_NAME__\n{name}\n__PEERBUILD_ARTIFACT_NAME__");
            match self.capture(user.as_ref(), &command).await {
                Ok(captured) => {
                    names.insert(identifier, captured.stdout);
                }
                Err(Step::Interrupted(interrupt)) => {
                    self.interrupted(interrupt);
                    return None;
                }
                Err(step) => {
                    let reason = match step {
                        Step::Fault(message)
                        | Step::Failed {
                            command: message, ..
                        } => message,
                        Step::Ok | Step::Interrupted(_) => String::new(),
                    };
                    self.note(
                        Level::Warning,
                        format!(
                            "artifact {identifier}: could not evaluate its name `{name}`: {reason}"
                        ),
                    );
                    names.insert(identifier, name.clone());
                }
            }
        }
        Some(names)
    }

    /// UPLOAD_ARTIFACTS: artifacts copied out, reports read (after the sandbox has ended).
    async fn upload(&mut self, workspace: &Path, mut names: HashMap<String, String>) {
        let started = Instant::now();
        self.phase_started("UPLOAD_ARTIFACTS");
        let mut problems = Vec::new();
        let sets = artifact_sets(&self.build.buildspec);
        for (identifier, set) in sets {
            let dest = match &self.build.artifacts {
                ArtifactTarget::Folder(root) if identifier == "primary" => Some(root.clone()),
                ArtifactTarget::Folder(root) => Some(root.join(&identifier)),
                ArtifactTarget::Store => None,
            };
            let name = names.remove(&identifier);
            match self
                .upload_set(workspace, &identifier, name, &set, dest)
                .await
            {
                Ok(record) => self.artifacts.push(record),
                Err(Step::Interrupted(interrupt)) => {
                    self.interrupted(interrupt);
                    self.phase_finished("UPLOAD_ARTIFACTS", started, interrupt.status(), None);
                    return;
                }
                Err(Step::Fault(message))
                | Err(Step::Failed {
                    command: message, ..
                }) => problems.push(message),
                // `upload_set` reports failures only; `Step::Ok` never comes as an error.
                Err(Step::Ok) => {}
            }
        }
        for (name, report) in &self.build.buildspec.reports {
            let outcome = reports::collect(workspace, name, report);
            self.reports.push(report_record(outcome));
        }
        let (status, message) = if problems.is_empty() {
            (Status::Succeeded, None)
        } else {
            let message = problems.join("; ");
            self.fail(format!("UPLOAD_ARTIFACTS: {message}"));
            (Status::Failed, Some(message))
        };
        self.phase_finished("UPLOAD_ARTIFACTS", started, status, message);
    }

    /// Selects an artifact's files, copies them out (into `dest`, or a scratch folder), and
    /// stores them as a tree whose digest the result reports.
    async fn upload_set(
        &mut self,
        workspace: &Path,
        identifier: &str,
        name: Option<String>,
        set: &ArtifactSet,
        dest: Option<PathBuf>,
    ) -> Result<ArtifactRecord, Step> {
        let fault = |err: String| Step::Fault(format!("artifact {identifier}: {err}"));
        let selected = artifacts::select(workspace, set).map_err(|e| fault(e.to_string()))?;
        for warning in &selected.warnings {
            self.note(Level::Warning, format!("artifact {identifier}: {warning}"));
        }
        // Named by position, never by the identifier, so nothing the buildspec writes can
        // steer where the scratch copy goes or what is removed afterwards.
        let scratch = self.node.data.work().join(format!(
            "artifact-{}-{}",
            self.build.id.to_string().replace([':', '/'], "-"),
            self.artifacts.len()
        ));
        let folder = dest.clone().unwrap_or_else(|| scratch.clone());
        let store = self.node.store.clone();
        let what = format!("artifact {identifier} of {}", self.build.id);
        let stored = tokio::task::spawn_blocking(move || {
            let summary = artifacts::copy_out(&selected, &folder).map_err(|e| e.to_string())?;
            let imported = crate::store::import::import_dir_once(&store, &folder, &what)
                .map_err(|e| e.to_string());
            Ok::<_, String>((summary, imported?))
        })
        .await;
        if dest.is_none() {
            remove_tree(&scratch);
        }
        let (summary, imported) = match stored {
            Ok(Ok(pair)) => pair,
            Ok(Err(err)) => return Err(fault(err)),
            Err(join) => return Err(fault(join.to_string())),
        };
        Ok(ArtifactRecord {
            identifier: identifier.to_owned(),
            name,
            files: summary.files,
            bytes: summary.bytes,
            digest: imported.root.map(|d| d.to_string()).unwrap_or_default(),
            location: dest.map(|d| d.display().to_string()),
        })
    }

    fn phase_started(&self, phase: &str) {
        self.emit(Event::PhaseStarted {
            member: self.build.member.clone(),
            phase: phase.to_owned(),
        });
    }

    fn phase_finished(
        &mut self,
        phase: &str,
        started: Instant,
        status: Status,
        message: Option<String>,
    ) {
        let duration_ms = started.elapsed().as_millis() as u64;
        self.emit(Event::PhaseFinished {
            member: self.build.member.clone(),
            phase: phase.to_owned(),
            status,
            duration_ms,
            message: message.clone(),
        });
        self.phases.push(PhaseRecord {
            phase: phase.to_owned(),
            status,
            duration_ms,
            message,
        });
    }

    fn result(self) -> BuildResult {
        let status = match self.end {
            Some(status) => status,
            None if self.failed => Status::Failed,
            None => Status::Succeeded,
        };
        BuildResult {
            build_id: self.build.id.to_string(),
            build_number: self.build.number,
            member: self.build.member.clone(),
            status,
            message: self.message,
            start_time_ms: self.build.start_time_ms,
            duration_ms: self.started.elapsed().as_millis() as u64,
            peer: self.node.peer.clone(),
            source_digest: self.source_digest,
            caches: self.caches,
            phases: self.phases,
            exported_variables: self.exported,
            artifacts: self.artifacts,
            reports: self.reports,
            members: Vec::new(),
        }
    }
}

/// Which later build phases a failure skips, and why (`None`: none are skipped).
fn skip_after_failure(phase: PhaseName, on_failure: &OnFailure) -> Option<String> {
    let failed = phase.report_name();
    match on_failure {
        OnFailure::Continue => None,
        OnFailure::Abort => Some(format!("{failed} failed with on-failure: ABORT")),
        OnFailure::Default | OnFailure::Retry { .. } => match phase {
            PhaseName::Install | PhaseName::PreBuild => Some(format!("{failed} failed")),
            PhaseName::Build | PhaseName::PostBuild => None,
        },
    }
}

fn retry_pattern_matches(pattern: &str, output: &str) -> bool {
    // The parser has checked the pattern; one that still does not compile never matches.
    regex::Regex::new(pattern).is_ok_and(|re| re.is_match(output))
}

fn append_tail(tail: &mut String, text: &str) {
    tail.push_str(text);
    // Trimmed only once it is twice the limit, so appending line by line stays linear.
    if tail.len() > 2 * TAIL_LIMIT_BYTES {
        let mut cut = tail.len() - TAIL_LIMIT_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail.drain(..cut);
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Double-quotes `text` for the shell: `$VAR` and `$(...)` in it expand, as in a runtime
/// version such as `$MY_VERSION`; quotes and backslashes stay literal.
fn double_quote(text: &str) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| match c {
            '"' | '\\' | '`' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

fn artifact_sets(buildspec: &Buildspec) -> Vec<(String, ArtifactSet)> {
    let Some(artifacts) = &buildspec.artifacts else {
        return Vec::new();
    };
    artifacts
        .primary
        .iter()
        .map(|set| ("primary".to_owned(), set.clone()))
        .chain(artifacts.secondary.iter().cloned())
        .collect()
}

fn report_record(outcome: reports::ReportOutcome) -> ReportRecord {
    ReportRecord {
        name: outcome.name,
        format: outcome.format.key().to_owned(),
        files: outcome
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect(),
        counts: outcome.counts.map(|c| crate::events::TestCounts {
            passed: c.passed,
            failed: c.failed,
            skipped: c.skipped,
            errored: c.errored,
        }),
        problems: outcome.problems,
    }
}

/// Turns a command's output into masked log lines, and keeps its text for retry patterns.
struct PhaseOutput {
    reporter: Reporter,
    budget: Arc<OutputBudget>,
    masker: mask::Masker,
    member: Option<String>,
    phase: &'static str,
    lines: LineBuffer,
    text: String,
    /// The output budget ran out in the middle of this output.
    cut: bool,
}

impl PhaseOutput {
    fn new(
        reporter: &Reporter,
        budget: &Arc<OutputBudget>,
        member: Option<String>,
        phase: &'static str,
    ) -> Self {
        PhaseOutput {
            masker: reporter.masker(),
            reporter: reporter.clone(),
            budget: budget.clone(),
            member,
            phase,
            lines: LineBuffer::default(),
            text: String::new(),
            cut: false,
        }
    }

    fn line(&mut self, line: String) {
        let line = self.masker.mask(&line);
        append_tail(&mut self.text, &line);
        self.text.push('\n');
        self.reporter.emit(Event::Log {
            member: self.member.clone(),
            phase: self.phase.to_owned(),
            line,
        });
    }

    fn finish(&mut self) {
        // A line the budget cut short is dropped: its end, which may hold the rest of a secret
        // the masker would have recognised, never came.
        if let Some(rest) = self.lines.flush()
            && !self.cut
        {
            self.line(rest);
        }
    }
}

impl OutputSink for PhaseOutput {
    fn write(&mut self, bytes: &[u8]) {
        // Past the budget nothing more is kept; the build is being stopped.
        let fits = self.budget.spend(bytes.len());
        if fits < bytes.len() {
            self.cut = true;
        }
        if fits == 0 {
            return;
        }
        for line in self.lines.push(&bytes[..fits], &self.masker) {
            self.line(line);
        }
    }
}

/// A cache to save once the sandbox has ended: its evaluated key, and whether its paths outside
/// the workspace were staged.
struct StagedCache {
    cache: Cache,
    key: String,
    outside_staged: bool,
}

/// A build's working folder, removed when dropped.
struct Workspace {
    /// The folder that holds the workspace (removed with it).
    holder: PathBuf,
    path: PathBuf,
}

impl Workspace {
    fn create(data: &DataDir, build: &Build) -> anyhow::Result<Self> {
        use anyhow::Context;
        // A build run as another user must be able to reach its workspace, which the private
        // data directory does not allow; it then lives in a fresh folder in the temporary
        // directory that others may pass through but not list.
        let needs_other_user = !build.users.is_empty();
        let parent = if needs_other_user {
            std::env::temp_dir()
        } else {
            data.work()
        };
        crate::data_dir::create_private(&parent)?;
        let holder = parent.join(format!(
            "peerbuild-{}",
            build.id.to_string().replace([':', '/'], "-")
        ));
        std::fs::create_dir(&holder)
            .with_context(|| format!("cannot create the workspace {}", holder.display()))?;
        if needs_other_user {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&holder, std::fs::Permissions::from_mode(0o711))?;
        }
        let path = holder.join("src");
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the workspace {}", path.display()))?;
        let bin = holder.join("bin");
        std::fs::create_dir(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
        let script = bin.join("codebuild-hash-files");
        std::fs::write(&script, cache::HASH_FILES_SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(Workspace { holder, path })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the cache staging folder (see `cache::STAGE`) out of the workspace, into a
    /// folder of the node's, once the sandbox has ended: `rename` moves whatever is there
    /// without following it, and only a real folder is kept (a symlink the build left in its
    /// place is removed), so collecting from it never leads out.
    fn take_stage(&self) -> Option<PathBuf> {
        let stage = self.path.join(cache::STAGE);
        let meta = std::fs::symlink_metadata(&stage).ok()?;
        if !meta.is_dir() {
            let _ = std::fs::remove_file(&stage);
            return None;
        }
        let taken = self.scratch("cache-outside");
        remove_tree(&taken);
        std::fs::rename(&stage, &taken).ok()?;
        std::fs::symlink_metadata(&taken)
            .is_ok_and(|m| m.is_dir())
            .then_some(taken)
    }

    /// Tools peerbuild puts on the build's PATH.
    fn bin(&self) -> PathBuf {
        self.holder.join("bin")
    }

    /// A scratch folder beside the workspace (same file system, so moves are renames).
    fn scratch(&self, label: &str) -> PathBuf {
        self.holder.join(label)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        remove_tree(&self.holder);
    }
}

/// Removes a folder tree, first making writable any folder a build left read-only.
pub fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    make_writable(path);
    let _ = std::fs::remove_dir_all(path);
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = path.symlink_metadata() else {
        return;
    };
    if !metadata.is_dir() {
        return;
    }
    let mode = metadata.permissions().mode() | 0o700;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use anyhow::Context;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("cannot hand {} to the run-as user", path.display()))?;
    if path.symlink_metadata()?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::OutputBudget;

    #[test]
    fn the_output_budget_keeps_what_fits_and_no_more() {
        let budget = OutputBudget::new(10);
        assert_eq!(budget.spend(4), 4);
        assert!(!budget.is_spent());
        assert_eq!(budget.spend(8), 6);
        assert!(budget.is_spent());
        assert_eq!(budget.spend(3), 0);
    }
}
