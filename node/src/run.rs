//! `peerbuild run`: checks everything it can before anything runs (the buildspec, variables,
//! secrets, users, the artifacts folder), then runs the build or batch on the embedded one-node
//! pool, shows it live, keeps its record, and exits with DESIGN.md's status.

use std::collections::HashMap;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use protocol::buildspec::{self, Buildspec, Placement, SandboxKind};
use sandbox::{
    DockerConfig, DockerExecutor, Executor, HelperCommand, HostExecutor, NamespaceConfig,
    NamespaceExecutor, Network, SandboxError, WasmConfig, WasmExecutor,
};
use tokio::sync::watch;

use crate::batch::{self, PlannedMember};
use crate::cli::RunArgs;
use crate::data_dir::{self, DataDir};
use crate::engine::env::{self, Variables};
use crate::engine::secrets::{self, SecretsFile};
use crate::engine::{ArtifactTarget, Build, Interrupt, Limits, Node, OutputBudget, SandboxChoice};
use crate::events::{BuildResult, Event, Level, Status};
use crate::ids::BuildId;
use crate::reporter::{EventSink, JsonLines, Reporter};
use crate::settings::Settings;
use crate::source::{self, Source};
use crate::users::{self, User};

pub const EXIT_USAGE: u8 = 2;
pub const EXIT_FAULT: u8 = 3;

/// A problem with what the user asked for: exit status 2, nothing has run.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

pub(crate) fn refuse<T>(message: impl Into<String>) -> Result<T> {
    Err(Refused(message.into()).into())
}

/// Runs `peerbuild run` and returns the exit status.
pub fn run(data_dir: Option<&Path>, args: RunArgs) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(run_async(data_dir, args)) {
        Ok(code) => Ok(code),
        Err(err) if err.downcast_ref::<Refused>().is_some() => {
            eprintln!("peerbuild: {err:#}");
            Ok(EXIT_USAGE)
        }
        Err(err) => Err(err),
    }
}

/// Everything checked and prepared before the build starts.
pub(crate) struct Prepared {
    pub(crate) data: DataDir,
    pub(crate) source: Arc<Source>,
    pub(crate) buildspec: Buildspec,
    /// The buildspec's text, as read.
    pub(crate) buildspec_text: String,
    pub(crate) id: BuildId,
    pub(crate) number: u64,
    pub(crate) base_env: Variables,
    pub(crate) submitted: Vec<(String, String)>,
    pub(crate) secrets: SecretsFile,
    pub(crate) users: HashMap<String, User>,
    /// `--artifacts`, if given.
    pub(crate) artifacts_root: Option<PathBuf>,
    pub(crate) start_time_ms: u64,
    /// The sandbox the build runs in: `--sandbox`, else the buildspec's `peerbuild.sandbox`,
    /// else the owner's default.
    pub(crate) sandbox: SandboxKind,
    /// The image the `docker` sandbox runs (`--image`, else the buildspec's `peerbuild.image`).
    pub(crate) image: Option<String>,
    /// Remarks to show once the build is announced.
    pub(crate) warnings: Vec<String>,
    /// The owner's settings (`DATA_DIR/config.toml`).
    pub(crate) settings: Settings,
    /// The sandboxes the buildspec's phases ask for under `peerbuild.phases`.
    pub(crate) phase_sandboxes: Vec<SandboxChoice>,
    /// What denies builds the network, if anything (`--deny-network`, or `sandbox.network =
    /// false` in the owner's settings): builds get none, and those that ask are refused.
    pub(crate) denied_network: Option<String>,
}

impl Prepared {
    /// Whether privileged-mode may be granted: `--allow-privileged`, or the owner's setting.
    fn allows_privileged(&self, args: &RunArgs) -> bool {
        args.allow_privileged || self.settings.sandbox.privileged
    }
}

async fn run_async(data_dir: Option<&Path>, args: RunArgs) -> Result<u8> {
    if !args.local
        && let Some(endpoint) =
            crate::pool::client::submit_endpoint(data_dir, args.node.as_deref())?
    {
        return crate::submit::submit(data_dir, args, endpoint).await;
    }
    let prepared = prepare(data_dir, &args, Placing::Here)?;
    let allow_privileged = prepared.allows_privileged(&args);
    let main = (prepared.sandbox, prepared.image.clone());
    let executor = make_executor(&prepared, &main, allow_privileged).await?;
    let mut phase_executors = HashMap::new();
    for sandbox in &prepared.phase_sandboxes {
        if *sandbox != main && !phase_executors.contains_key(sandbox) {
            let other = make_executor(&prepared, sandbox, allow_privileged).await?;
            phase_executors.insert(sandbox.clone(), other);
        }
    }
    let build_dir = (!args.no_record).then(|| prepared.data.build(&prepared.id.to_string()));
    if let Some(build_dir) = &build_dir {
        start_record(build_dir)?;
    }
    let reporter = Reporter::new(sinks(&args, build_dir.as_deref())?);
    let store = Arc::new(crate::cache_cli::open_store(Some(prepared.data.root()))?);
    let store_for_gc = store.clone();
    let node = Node {
        executor,
        phase_executors,
        store,
        data: prepared.data.clone(),
        reporter: reporter.clone(),
        peer: peer_name(),
        me: users::current(),
        pool_cache: crate::pool::client::ApiPoolCache::on_data_dir(prepared.data.root())
            .map(|cache| Arc::new(cache) as Arc<dyn crate::engine::cache::PoolCache>),
    };
    let (stop_sender, stop) = watch::channel(None);
    let limits = Limits {
        deadline: tokio::time::Instant::now() + args.timeout,
        stop,
        output: OutputBudget::new(output_limit()?),
    };
    let signals = tokio::spawn(forward_signals(stop_sender));
    let ticker = tokio::spawn(tick(reporter.clone()));
    let result = run_prepared(&prepared, &args, &node, limits).await;
    ticker.abort();
    signals.abort();
    let result = match result {
        Ok(result) => result,
        Err(err) if err.downcast_ref::<Refused>().is_some() => {
            if let Some(build_dir) = &build_dir {
                let _ = std::fs::remove_dir_all(build_dir);
            }
            return Err(err);
        }
        Err(err) => return Err(err),
    };
    let status = result.status;
    finish_record(&reporter, build_dir.as_deref(), result)?;
    let grown = store_for_gc
        .written
        .load(std::sync::atomic::Ordering::Relaxed);
    keep_store_within_budget(&store_for_gc, &args, grown);
    Ok(status.exit_code())
}

/// Where a build's events go: the terminal (human or `--json`) and, when the build is
/// recorded, its `events.jsonl`.
pub(crate) fn sinks(args: &RunArgs, build_dir: Option<&Path>) -> Result<Vec<Box<dyn EventSink>>> {
    let terminal: Box<dyn EventSink> = if args.json {
        Box::new(JsonLines::new(std::io::stdout()))
    } else {
        let spinner = std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
        Box::new(crate::render::Human::new(std::io::stdout(), spinner))
    };
    let mut sinks = vec![terminal];
    if let Some(build_dir) = build_dir {
        let log = crate::reporter::event_log(&build_dir.join("events.jsonl"))?;
        sinks.push(Box::new(log) as Box<dyn EventSink>);
    }
    Ok(sinks)
}

/// Starts a build's record: its folder in the data directory, with this process's pid (for
/// `peerbuild cancel`).
pub(crate) fn start_record(build_dir: &Path) -> Result<()> {
    data_dir::create_private(build_dir)?;
    data_dir::write_private(
        &build_dir.join("pid"),
        std::process::id().to_string().as_bytes(),
    )
}

/// Shows the final result and, when the build is recorded, keeps it (masked, as every sink saw
/// it) in `result.json`.
pub(crate) fn finish_record(
    reporter: &Reporter,
    build_dir: Option<&Path>,
    result: BuildResult,
) -> Result<()> {
    let mut finished = Event::BuildFinished {
        result: Box::new(result),
    };
    reporter.emit(finished.clone());
    let Some(build_dir) = build_dir else {
        return Ok(());
    };
    finished.mask_with(&|s| reporter.mask(s));
    let record = crate::events::Envelope {
        v: crate::events::SCHEMA_VERSION,
        event: finished,
    };
    data_dir::write_private(
        &build_dir.join("result.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    let _ = std::fs::remove_file(build_dir.join("pid"));
    Ok(())
}

/// What a run executes: one build, or a batch's members (all prepared before anything starts,
/// so a refused member refuses the whole batch before it is announced).
enum Work {
    Single(Box<Build>),
    Batch {
        batch: Box<buildspec::Batch>,
        planned: Vec<PlannedMember>,
        builds: Vec<Build>,
    },
}

async fn run_prepared(
    prepared: &Prepared,
    args: &RunArgs,
    node: &Node,
    limits: Limits,
) -> Result<BuildResult> {
    let work = match (&prepared.buildspec.batch, &args.batch_member) {
        (None, None) => Work::Single(Box::new(single_build(
            prepared,
            &prepared.buildspec,
            None,
            artifact_target(prepared, None),
        )?)),
        (None, Some(identifier)) => {
            return refuse(format!(
                "--batch-member {identifier}: the buildspec has no batch section"
            ));
        }
        (Some(batch), Some(identifier)) => {
            let planned = batch::members(batch);
            let Some(member) = planned.iter().find(|m| m.identifier == *identifier) else {
                return refuse(format!(
                    "--batch-member {identifier}: the batch has no such member"
                ));
            };
            Work::Single(Box::new(member_build(prepared, args, member)?))
        }
        (Some(batch), None) => {
            let planned = batch::members(batch);
            let builds = planned
                .iter()
                .map(|member| member_build(prepared, args, member))
                .collect::<Result<_>>()?;
            Work::Batch {
                batch: Box::new(batch.clone()),
                planned,
                builds,
            }
        }
    };
    node.reporter.emit(Event::BuildStarted {
        build_id: prepared.id.to_string(),
        build_number: prepared.number,
        source: prepared.source.root.display().to_string(),
        source_version: prepared.source.git_commit.clone(),
        sandbox: node.executor.kind().to_owned(),
        batch: matches!(work, Work::Batch { .. }),
        start_time_ms: prepared.start_time_ms,
    });
    for warning in &prepared.warnings {
        node.reporter.emit(Event::Note {
            member: None,
            level: Level::Warning,
            message: warning.clone(),
        });
    }
    for skipped in &prepared.source.skipped {
        node.reporter.emit(Event::Note {
            member: None,
            level: Level::Warning,
            message: format!("left out of the source: {skipped}"),
        });
    }
    match work {
        Work::Single(build) => Ok(crate::engine::run(*build, node, limits).await),
        Work::Batch {
            batch,
            planned,
            builds,
        } => Ok(run_batch(prepared, args, node, limits, &batch, planned, builds).await),
    }
}

async fn run_batch(
    prepared: &Prepared,
    args: &RunArgs,
    node: &Node,
    limits: Limits,
    batch: &buildspec::Batch,
    planned: Vec<PlannedMember>,
    builds: Vec<Build>,
) -> BuildResult {
    let started = std::time::Instant::now();
    for member in &planned {
        if let Some(description) = &member.description {
            node.reporter.emit(Event::Note {
                member: Some(member.identifier.clone()),
                level: Level::Info,
                message: description.clone(),
            });
        }
        if let Some(image) = &member.env.image {
            let message = match &prepared.image {
                Some(build_image) => format!(
                    "image `{image}` is not used: every member runs in the build's image `{build_image}`"
                ),
                None => format!(
                    "image `{image}` is not used: the {} sandbox runs on this machine",
                    node.executor.kind()
                ),
            };
            node.reporter.emit(Event::Note {
                member: Some(member.identifier.clone()),
                level: Level::Warning,
                message,
            });
        }
    }
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let mut builds: Vec<Option<Build>> = builds.into_iter().map(Some).collect();
    let runner: batch::MemberRunner<'_> = Box::new(move |index, member_limits| {
        let build = builds[index].take();
        Box::pin(async move {
            match build {
                Some(build) => crate::engine::run(build, node, member_limits).await,
                None => unreachable_member(index),
            }
        })
    });
    let batch_stop = limits.stop.clone();
    let members = batch::run_members(
        &planned,
        batch.fast_fail,
        slots,
        limits,
        &node.reporter,
        runner,
    )
    .await;
    let stopped = batch_stop.borrow().is_some();
    batch_result(
        prepared,
        &planned,
        members,
        stopped,
        started,
        node.peer.clone(),
    )
}

/// A batch's result from its members': its status, and which members did not succeed.
pub(crate) fn batch_result(
    prepared: &Prepared,
    planned: &[PlannedMember],
    members: Vec<BuildResult>,
    stopped: bool,
    started: std::time::Instant,
    peer: String,
) -> BuildResult {
    let status = batch_status(planned, &members, stopped);
    let message = (status != Status::Succeeded).then(|| {
        let failed: Vec<&str> = members
            .iter()
            .zip(planned)
            .filter(|(r, p)| {
                r.status != Status::Succeeded && !(p.ignore_failure && r.status == Status::Failed)
            })
            .map(|(_, p)| p.identifier.as_str())
            .collect();
        format!("members that did not succeed: {}", failed.join(", "))
    });
    BuildResult {
        start_time_ms: prepared.start_time_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        peer,
        message,
        members,
        ..BuildResult::ended_early(
            prepared.id.to_string(),
            prepared.number,
            status,
            String::new(),
        )
    }
}

/// A result for a member the runner was asked to start twice, which the batch graph never does.
fn unreachable_member(index: usize) -> BuildResult {
    BuildResult::ended_early(
        String::new(),
        0,
        Status::Fault,
        format!("internal error: batch member {index} started twice"),
    )
}

/// The batch's status: a fault or timeout of any member is the batch's; a batch stopped by the
/// user is STOPPED; otherwise it succeeds when every member succeeded or failed with
/// `ignore-failure`.
fn batch_status(planned: &[PlannedMember], members: &[BuildResult], stopped: bool) -> Status {
    for decisive in [Status::Fault, Status::TimedOut] {
        if members.iter().any(|m| m.status == decisive) {
            return decisive;
        }
    }
    let ok = members.iter().zip(planned).all(|(m, p)| {
        m.status == Status::Succeeded || (p.ignore_failure && m.status == Status::Failed)
    });
    match (ok, stopped) {
        (true, _) => Status::Succeeded,
        (false, true) => Status::Stopped,
        (false, false) => Status::Failed,
    }
}

fn member_build(prepared: &Prepared, args: &RunArgs, member: &PlannedMember) -> Result<Build> {
    if member.env.privileged_mode && !prepared.allows_privileged(args) {
        return refuse(format!(
            "batch member `{}` asks for privileged-mode, which this node does not allow; pass --allow-privileged, or set sandbox.privileged = true in {}",
            member.identifier,
            prepared.settings.path.display()
        ));
    }
    let own = match &member.buildspec {
        Some(path) => Some(load_buildspec(&prepared.source.root.join(path), path)?),
        None => None,
    };
    let buildspec = batch::member_buildspec(&prepared.buildspec, own);
    let mut build = single_build(
        prepared,
        &buildspec,
        Some(member),
        artifact_target(prepared, Some(&member.identifier)),
    )?;
    build.member = Some(member.identifier.clone());
    Ok(build)
}

/// Prepares one build (or batch member): its environment in CodeBuild's order of precedence.
/// Where a build's artifacts go: `--artifacts DIR` (a member's in `DIR/IDENTIFIER`), else only
/// the store.
fn artifact_target(prepared: &Prepared, member: Option<&str>) -> ArtifactTarget {
    match (&prepared.artifacts_root, member) {
        (Some(root), Some(member)) => ArtifactTarget::Folder(root.join(member)),
        (Some(root), None) => ArtifactTarget::Folder(root.clone()),
        (None, _) => ArtifactTarget::Store,
    }
}

fn single_build(
    prepared: &Prepared,
    buildspec: &Buildspec,
    member: Option<&PlannedMember>,
    artifacts: ArtifactTarget,
) -> Result<Build> {
    let id = match member {
        Some(member) => prepared.id.member(&member.identifier),
        None => prepared.id.clone(),
    };
    let mut vars = prepared.base_env.clone();
    vars.set("CODEBUILD_BUILD_ID", id.to_string());
    vars.set(
        "CODEBUILD_BUILD_ARN",
        format!("arn:aws:codebuild:local:000000000000:build/{id}"),
    );
    vars.set("CODEBUILD_BUILD_NUMBER", prepared.number.to_string());
    if let Some(member) = member {
        vars.set(
            "CODEBUILD_BATCH_BUILD_IDENTIFIER",
            member.identifier.clone(),
        );
        if let Some(image) = &member.env.image {
            vars.set("CODEBUILD_BUILD_IMAGE", image.clone());
        }
    }
    vars.extend(buildspec.env.variables.iter());
    let resolved =
        secrets::resolve(buildspec, &prepared.secrets).map_err(|e| Refused(format!("{e:#}")))?;
    vars.extend(resolved.variables.iter());
    if let Some(member) = member {
        vars.extend(member.env.variables.iter());
        vars.extend(member.extra_variables.iter());
    }
    vars.extend(prepared.submitted.iter());
    let users = run_as_users(buildspec, &prepared.users);
    Ok(Build {
        id,
        number: prepared.number,
        member: None,
        buildspec: buildspec.clone(),
        source: prepared.source.clone(),
        env: vars,
        users,
        artifacts,
        start_time_ms: prepared.start_time_ms,
        secrets: resolved.mask,
        privileged: member.is_some_and(|m| m.env.privileged_mode),
        network: network_for(
            buildspec,
            prepared.sandbox,
            prepared.denied_network.as_deref(),
        )?,
    })
}

/// The build's network: `peerbuild.network`, else outbound access as CodeBuild builds expect
/// (but for `docker`, whose containers get a network only when the buildspec asks for it).
/// Under `--deny-network` a buildspec that asks for network (`network: true`, at the top or in
/// a phase) is refused, and one that did not ask gets none.
fn network_for(
    buildspec: &Buildspec,
    sandbox: SandboxKind,
    denied_by: Option<&str>,
) -> Result<Network> {
    let extension = &buildspec.peerbuild;
    let mut asked = std::iter::once(extension.network)
        .chain(extension.phases.iter().map(|(_, phase)| phase.network))
        .flatten();
    if let Some(denied_by) = denied_by
        && asked.any(|wanted| wanted)
    {
        return refuse(format!(
            "the buildspec asks for network (peerbuild.network: true), which this node does not \
             allow ({denied_by}); set `network: false` under `peerbuild:` or run it on a node \
             that allows network"
        ));
    }
    Ok(match (denied_by, extension.network) {
        (Some(_), _) | (None, Some(false)) => Network::Isolated,
        (None, None) if sandbox == SandboxKind::Docker => Network::Isolated,
        (None, _) => Network::Outbound,
    })
}

/// Remarks about network settings this sandbox or version does not act on; `--deny-network`
/// with the `host` sandbox, which cannot cut a build off, is refused.
fn network_warnings(
    denied_by: Option<&str>,
    sandbox: SandboxKind,
    buildspec: &Buildspec,
) -> Result<Vec<String>> {
    let extension = &buildspec.peerbuild;
    let mut warnings = Vec::new();
    if sandbox == SandboxKind::Host {
        if let Some(denied_by) = denied_by {
            return refuse(format!(
                "{denied_by} needs a sandbox that can cut a build's network off (--sandbox \
                 namespace or docker); the host sandbox shares this machine's network"
            ));
        }
        if extension.network == Some(false) {
            warnings.push(
                "peerbuild.network: false is not enforced: the host sandbox shares this machine's network"
                    .to_owned(),
            );
        }
    }
    let session = extension.network.unwrap_or(denied_by.is_none());
    if extension
        .phases
        .iter()
        .any(|(_, phase)| phase.network.is_some_and(|n| n != session))
    {
        warnings.push(format!(
            "per-phase network settings under peerbuild.phases are not acted on yet; every phase {}",
            if session { "has the build's network" } else { "runs without network" }
        ));
    }
    Ok(warnings)
}

fn run_as_users(buildspec: &Buildspec, known: &HashMap<String, User>) -> HashMap<String, User> {
    run_as_names(buildspec)
        .into_iter()
        .filter_map(|name| known.get(&name).map(|u| (name, u.clone())))
        .collect()
}

fn run_as_names(buildspec: &Buildspec) -> Vec<String> {
    let phases = buildspec::PhaseName::ALL
        .iter()
        .filter_map(|p| buildspec.phases.get(*p))
        .filter_map(|p| p.run_as.clone());
    buildspec.run_as.clone().into_iter().chain(phases).collect()
}

fn load_buildspec(path: &Path, display: impl AsRef<Path>) -> Result<Buildspec> {
    Ok(load_buildspec_text(path, display)?.0)
}

/// A buildspec parsed, with its text (which a pool build sends to the peer running it).
fn load_buildspec_text(path: &Path, display: impl AsRef<Path>) -> Result<(Buildspec, String)> {
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                return refuse(format!(
                    "{}: the buildspec is not UTF-8 text",
                    display.as_ref().display()
                ));
            }
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return refuse(format!(
                "no buildspec at {}: write a buildspec.yml there, or name one with --buildspec FILE",
                display.as_ref().display()
            ));
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let parsed = buildspec::parse(&display.as_ref().display().to_string(), &text)
        .map_err(|e| Refused(e.to_string()))?;
    Ok((parsed, text))
}

/// Where the build is placed: on this machine (its labels must meet `--require`), or by a node
/// of the pool (which checks them against every peer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placing {
    Here,
    Pool,
}

pub(crate) fn prepare(
    data_dir: Option<&Path>,
    args: &RunArgs,
    placing: Placing,
) -> Result<Prepared> {
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    if !dir.is_dir() {
        return refuse(format!(
            "the source folder {} does not exist",
            dir.display()
        ));
    }
    let buildspec_path = args
        .buildspec
        .clone()
        .unwrap_or_else(|| dir.join("buildspec.yml"));
    let (buildspec, buildspec_text) = load_buildspec_text(&buildspec_path, &buildspec_path)?;
    let data = DataDir::open(data_dir)?;
    let settings = Settings::load(data.root()).map_err(|e| Refused(format!("{e:#}")))?;
    let Chosen {
        sandbox,
        image,
        mut warnings,
        phase_sandboxes,
    } = choose_sandbox(args, &buildspec, &settings)?;
    let deny_network = match (args.deny_network, settings.sandbox.network) {
        (true, _) => Some("--deny-network".to_owned()),
        (false, false) => Some(format!(
            "sandbox.network = false in {}",
            settings.path.display()
        )),
        (false, true) => None,
    };
    warnings.extend(network_warnings(
        deny_network.as_deref(),
        sandbox,
        &buildspec,
    )?);
    if let Some(denied_by) = &deny_network
        && phase_sandboxes
            .iter()
            .any(|(kind, _)| *kind == SandboxKind::Host)
    {
        return refuse(format!(
            "{denied_by} cannot be kept by a phase in the host sandbox (peerbuild.phases), which shares this machine's network"
        ));
    }
    if placing == Placing::Here {
        check_requirements(args)?;
    }
    let submitted = submitted_variables(args)?;
    let secrets = match &args.secrets {
        Some(path) => SecretsFile::load(path).map_err(|e| Refused(format!("{e:#}")))?,
        None => SecretsFile::default(),
    };
    let artifacts_root = artifacts_root(args)?;
    let source = source::scan(&dir, data.root())?;
    let mut all_names = run_as_names(&buildspec);
    if let Some(batch) = &buildspec.batch {
        for member in batch::members(batch) {
            if let Some(path) = &member.buildspec {
                all_names.extend(run_as_names(&load_buildspec(
                    &source.root.join(path),
                    path,
                )?));
            }
        }
    }
    let users = lookup_users(&all_names)?;
    let project = source
        .root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "build".into());
    let (id, number) = match (&args.build_id, args.build_number) {
        (Some(id), Some(number)) => match BuildId::parse(id) {
            Some(id) => (id, number),
            None => return refuse(format!("--build-id {id}: expected PROJECT:ID")),
        },
        _ => {
            let id = BuildId::new(&project);
            let number = data.next_build_number(id.project())?;
            (id, number)
        }
    };
    // Without --artifacts, artifacts stay in the build's own folder of the data directory.
    let me = users::current();
    let mut base_env = env::base(&me.home, &me.name);
    base_env.set("CODEBUILD_BUILD_SUCCEEDING", "1");
    base_env.set("CODEBUILD_INITIATOR", format!("peerbuild/{}", me.name));
    base_env.set(
        "CODEBUILD_BUILD_IMAGE",
        image.clone().unwrap_or_else(|| "host".into()),
    );
    let start_time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    base_env.set("CODEBUILD_START_TIME", start_time_ms.to_string());
    if let Some(commit) = args.source_version.as_ref().or(source.git_commit.as_ref()) {
        base_env.set("CODEBUILD_RESOLVED_SOURCE_VERSION", commit.clone());
        base_env.set("CODEBUILD_SOURCE_VERSION", commit.clone());
    }
    base_env.set("PEERBUILD_SANDBOX", sandbox.key());
    base_env.set("PEERBUILD_PEER_ID", peer_name());
    base_env.set("PEERBUILD_VERSION", env!("CARGO_PKG_VERSION"));
    Ok(Prepared {
        data,
        source: Arc::new(source),
        buildspec,
        buildspec_text,
        id,
        number,
        base_env,
        submitted,
        secrets,
        users,
        artifacts_root,
        start_time_ms,
        sandbox,
        image,
        warnings,
        settings,
        phase_sandboxes,
        denied_network: deny_network,
    })
}

/// What [`choose_sandbox`] decided.
struct Chosen {
    sandbox: SandboxKind,
    /// Set exactly when the sandbox is `docker`.
    image: Option<String>,
    warnings: Vec<String>,
    /// For each phase under `peerbuild.phases`, the sandbox it runs in.
    phase_sandboxes: Vec<SandboxChoice>,
}

/// The sandbox for this run: `--sandbox`, else the buildspec's `peerbuild.sandbox`, else the
/// owner's default (`namespace` unless `config.toml` says otherwise); its image (`docker` needs
/// one, and only `docker` takes one); and remarks about settings this version does not act on.
///
/// `--sandbox` is the owner's own choice on the embedded pool, so it may name any backend; a
/// buildspec, which may come from anyone, gets only what the owner's `sandbox.allow` lists.
fn choose_sandbox(args: &RunArgs, buildspec: &Buildspec, settings: &Settings) -> Result<Chosen> {
    let from_flag = match args.sandbox.as_deref() {
        None => None,
        Some(key) => match SandboxKind::from_key(key) {
            Some(kind) => Some(kind),
            None => {
                return refuse(format!(
                    "unknown sandbox `{key}`; expected namespace, docker, wasm or host"
                ));
            }
        },
    };
    // A submitter's choice, on a node running another peer's build, is a request like the
    // buildspec's: this owner's sandbox.allow decides.
    let requested = match args.sandbox_request.as_deref() {
        None => None,
        Some(key) => match SandboxKind::from_key(key) {
            Some(kind) => Some(kind),
            None => return refuse(format!("the submitter asks for an unknown sandbox `{key}`")),
        },
    };
    if from_flag.is_none()
        && let Some(asked) = requested
        && let Err(refusal) = settings.check_allowed(asked)
    {
        return refuse(format!("the submitter asks for it (--sandbox): {refusal}"));
    }
    if from_flag.is_none()
        && requested.is_none()
        && let Some(asked) = buildspec.peerbuild.sandbox
        && let Err(refusal) = settings.check_allowed(asked)
    {
        return refuse(format!(
            "the buildspec asks for it in peerbuild.sandbox: {refusal}"
        ));
    }
    let sandbox = from_flag
        .or(requested)
        .or(buildspec.peerbuild.sandbox)
        .unwrap_or(settings.sandbox.default);
    let mut warnings = Vec::new();
    let asked_image = args
        .image
        .clone()
        .or_else(|| buildspec.peerbuild.image.clone());
    let image = match (sandbox, asked_image) {
        (SandboxKind::Docker, Some(image)) if !image.trim().is_empty() => Some(image),
        (SandboxKind::Docker, _) => {
            return refuse(
                "the docker sandbox needs an image: pass --image NAME or set peerbuild.image in the buildspec",
            );
        }
        // A root folder names files on this machine: only the owner may choose one.
        (SandboxKind::Namespace, Some(image)) if args.image.is_some() => Some(root_folder(&image)?),
        (_, None) => None,
        (_, Some(image)) if args.image.is_some() => {
            return refuse(format!(
                "--image {image} needs the docker or namespace sandbox; the {} sandbox uses this machine's files",
                sandbox.key()
            ));
        }
        (_, Some(image)) => {
            warnings.push(format!(
                "peerbuild.image `{image}` is not used: the {} sandbox uses this machine's files",
                sandbox.key()
            ));
            None
        }
    };
    let mut phase_sandboxes = Vec::new();
    for (phase, settings_of_phase) in &buildspec.peerbuild.phases {
        let at = format!("peerbuild.phases.{}", phase.key());
        let kind = settings_of_phase.sandbox.unwrap_or(sandbox);
        if let Some(asked) = settings_of_phase.sandbox
            && let Err(refusal) = settings.check_allowed(asked)
        {
            return refuse(format!(
                "the buildspec asks for it in {at}.sandbox: {refusal}"
            ));
        }
        let phase_image = match (kind, &settings_of_phase.image) {
            (SandboxKind::Docker, Some(image)) if !image.trim().is_empty() => Some(image.clone()),
            (SandboxKind::Docker, _) if sandbox == SandboxKind::Docker => image.clone(),
            (SandboxKind::Docker, _) => {
                return refuse(format!(
                    "{at}: the docker sandbox needs an image: set {at}.image"
                ));
            }
            (SandboxKind::Namespace, _) if sandbox == SandboxKind::Namespace => image.clone(),
            (_, Some(phase_image)) => {
                return refuse(format!(
                    "{at}.image `{phase_image}` needs the docker sandbox; the {} sandbox uses this machine's files (a namespace sandbox's root folder is the owner's choice: --image)",
                    kind.key()
                ));
            }
            (_, None) => None,
        };
        phase_sandboxes.push((kind, phase_image));
        if settings_of_phase.placement == Placement::Separate {
            warnings.push(format!(
                "{at}.placement `separate` is not acted on yet (a phase is not placed on its own peer): it runs with the rest of the build"
            ));
        }
    }
    Ok(Chosen {
        sandbox,
        image,
        warnings,
        phase_sandboxes,
    })
}

/// The `namespace` sandbox's `--image`: an image's root folder on this machine, as an
/// absolute path (`docker export` of a container, or a `debootstrap` folder, unpacked).
fn root_folder(image: &str) -> Result<String> {
    let path = Path::new(image);
    let is_folder = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    if !path.is_absolute() || !is_folder || fs::symlink_metadata(path.join("bin/sh")).is_err() {
        return refuse(format!(
            "--image `{image}`: the namespace sandbox takes an image's root folder, an absolute path to a folder holding bin/sh; for a Docker image, use the docker sandbox"
        ));
    }
    Ok(image.to_owned())
}

/// Refuses `--require` labels this machine, the only peer, lacks.
fn check_requirements(args: &RunArgs) -> Result<()> {
    let labels = local_labels();
    for requirement in &args.require {
        let Some((label, value)) = requirement.split_once('=') else {
            return refuse(format!("--require {requirement}: expected LABEL=VALUE"));
        };
        if !labels.iter().any(|(l, v)| l == label && v == value) {
            let have: Vec<String> = labels.iter().map(|(l, v)| format!("{l}={v}")).collect();
            bail!(
                "no peer can run this build: it requires {label}={value}, and this machine (the only peer) has {}",
                have.join(", ")
            );
        }
    }
    Ok(())
}

/// The labels this machine has for `--require`.
fn local_labels() -> Vec<(String, String)> {
    vec![
        ("os".into(), std::env::consts::OS.into()),
        ("arch".into(), std::env::consts::ARCH.into()),
    ]
}

fn submitted_variables(args: &RunArgs) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    if let Some(path) = &args.env_file {
        pairs.extend(env::read_env_file(path).map_err(|e| Refused(format!("{e:#}")))?);
    }
    let listed = match &args.env_list {
        Some(path) => read_env_list(path).map_err(|e| Refused(format!("{e:#}")))?,
        None => Vec::new(),
    };
    // A worker's `--env-list` stands for the `--env`s its build was submitted with.
    for assignment in listed.iter().chain(&args.env) {
        pairs.push(env::parse_assignment(assignment).map_err(|e| Refused(format!("--env {e:#}")))?);
    }
    Ok(pairs)
}

/// Reads an `--env-list`: a JSON list of `KEY=VALUE` strings, each taken as an `--env`.
pub(crate) fn read_env_list(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path)
        .with_context(|| format!("cannot read the variables in {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a JSON list of KEY=VALUE strings", path.display()))
}

fn artifacts_root(args: &RunArgs) -> Result<Option<PathBuf>> {
    let Some(dir) = &args.artifacts else {
        return Ok(None);
    };
    if let Ok(mut entries) = std::fs::read_dir(dir)
        && entries.next().is_some()
    {
        return refuse(format!(
            "the artifacts folder {} is not empty; remove it or choose another, so no earlier output is mixed in or lost",
            dir.display()
        ));
    }
    Ok(Some(std::path::absolute(dir)?))
}

fn lookup_users(names: &[String]) -> Result<HashMap<String, User>> {
    let me = users::current();
    let mut users = HashMap::new();
    for name in names {
        let Some(user) = users::lookup(name)? else {
            return refuse(format!(
                "run-as: the user `{name}` does not exist on this machine; create it, or change run-as"
            ));
        };
        if user.uid != me.uid && me.uid != 0 {
            return refuse(format!(
                "run-as: running as `{name}` needs peerbuild to run as root (it runs as `{}`)",
                me.name
            ));
        }
        users.insert(name.clone(), user);
    }
    Ok(users)
}

/// The executor [`choose_sandbox`] chose.
async fn make_executor(
    prepared: &Prepared,
    (kind, image): &SandboxChoice,
    allow_privileged: bool,
) -> Result<Arc<dyn Executor>> {
    let helper = helper_command()?;
    let memory_limit_bytes =
        Some(env_limit("PEERBUILD_SANDBOX_MEMORY_LIMIT")?.unwrap_or_else(default_memory_limit));
    let process_limit = Some(env_limit("PEERBUILD_SANDBOX_PROCESS_LIMIT")?.unwrap_or(4096));
    match kind {
        SandboxKind::Namespace => {
            let me = users::current();
            let config = NamespaceConfig {
                masked: vec![prepared.data.root().to_owned(), PathBuf::from(&me.home)],
                memory_limit_bytes,
                process_limit,
                root: image.as_ref().map(PathBuf::from),
            };
            let executor = NamespaceExecutor::new(helper, config).with_context(|| {
                format!(
                    "builds run in the namespace sandbox unless told otherwise; to run this one without isolation, pass --sandbox host (or set sandbox.default in {})",
                    prepared.settings.path.display()
                )
            })?;
            Ok(Arc::new(executor))
        }
        SandboxKind::Docker => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
            let config = DockerConfig {
                image: image.clone().unwrap_or_default(),
                allow_privileged,
                memory_limit_bytes,
                process_limit,
                cpu_limit_millis: Some(cpus * 1000),
            };
            match DockerExecutor::new(config).await {
                Ok(executor) => Ok(Arc::new(executor)),
                // The user named an image this machine lacks: a refusal, nothing has run.
                Err(err @ SandboxError::MissingImage { .. }) => refuse(err.to_string()),
                Err(err) => Err(err.into()),
            }
        }
        SandboxKind::Wasm => {
            let config = WasmConfig {
                cache_dir: prepared.data.root().join("wasm-cache"),
                memory_limit_bytes: env_limit("PEERBUILD_SANDBOX_MEMORY_LIMIT")?.unwrap_or(4 << 30),
                // A backstop only: the build's own output budget, a little lower, stops the
                // build first and says why.
                output_limit_bytes: output_limit()?.saturating_add(64 << 10),
            };
            Ok(Arc::new(WasmExecutor::new(config)?))
        }
        SandboxKind::Host => Ok(Arc::new(HostExecutor::new(helper))),
    }
}

/// The most output a build may print: `PEERBUILD_SANDBOX_OUTPUT_LIMIT`, else 256 MiB.
fn output_limit() -> Result<u64> {
    Ok(env_limit("PEERBUILD_SANDBOX_OUTPUT_LIMIT")?.unwrap_or(256 << 20))
}

/// A limit from the environment, in bytes or a count, with an optional K, M or G suffix.
/// (An interim knob until `peerbuild run` and the node's configuration have limit options.)
fn env_limit(variable: &str) -> Result<Option<u64>> {
    let Some(text) = std::env::var_os(variable).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let text = text.to_string_lossy();
    match crate::cli::parse_size(&text) {
        Ok(n) if n > 0 => Ok(Some(n)),
        Ok(_) => refuse(format!("{variable}={text}: expected a positive size")),
        Err(reason) => refuse(format!("{variable}={reason}")),
    }
}

/// Three quarters of the machine's memory: a build cannot starve the node and the machine.
fn default_memory_limit() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64) / 4 * 3
}

/// Keeps the store within its budget after a build (`--store-max-size`, else
/// `$PEERBUILD_STORE_MAX_SIZE`, else 20 GiB). A collection never blocks the exit: when another
/// process uses the store it waits for a later build.
fn keep_store_within_budget(store: &crate::store::Store, args: &RunArgs, grown: u64) {
    let budget = crate::store::gc::budget(args.store_max_size);
    if let Ok(Some(collected)) = crate::store::gc::keep_within(store, budget, grown)
        && collected.roots_removed > 0
    {
        eprintln!(
            "peerbuild: the store is over its budget; dropped {} least recently used trees ({} bytes freed)",
            collected.roots_removed, collected.bytes_freed
        );
    }
}

fn helper_command() -> Result<HelperCommand> {
    Ok(HelperCommand {
        program: std::env::current_exe().context("cannot find the peerbuild binary")?,
        args: vec!["__sandbox-helper".into()],
    })
}

/// The peer that runs builds here: the node's peer id when a node runs this build (it says so
/// in `PEERBUILD_PEER_ID`), else `local (HOSTNAME)`.
fn peer_name() -> String {
    if let Ok(peer) = std::env::var("PEERBUILD_PEER_ID")
        && !peer.is_empty()
    {
        return peer;
    }
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most the buffer's length.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let name = if ok {
        let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "localhost".into()
    };
    format!("local ({name})")
}

/// Ctrl-C and SIGTERM stop the build in order: its processes are killed and it ends STOPPED.
pub(crate) async fn forward_signals(stop: watch::Sender<Option<Interrupt>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    let _ = stop.send(Some(Interrupt::Stopped));
}

pub(crate) async fn tick(reporter: Reporter) {
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        reporter.tick();
    }
}
