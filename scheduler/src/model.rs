//! What the scheduler is told and what it answers: peer capabilities and task requirements (the
//! hard constraints), heartbeats, builds and their tasks, events in, actions out, and the reasons
//! and explanations a user reads.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::ids::{Attempt, BuildId, InputId, Millis, PeerId, SubmitterId, TaskId, TaskKey};

/// The sandbox backends a peer may offer (DESIGN.md, "Sandboxes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SandboxKind {
    Namespace,
    Docker,
    Wasm,
    Host,
}

impl SandboxKind {
    /// The kind a name (`namespace`, `docker`, `wasm`, `host`) stands for.
    pub fn from_name(name: &str) -> Option<SandboxKind> {
        match name {
            "namespace" => Some(SandboxKind::Namespace),
            "docker" => Some(SandboxKind::Docker),
            "wasm" => Some(SandboxKind::Wasm),
            "host" => Some(SandboxKind::Host),
            _ => None,
        }
    }
}

impl fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SandboxKind::Namespace => "namespace",
            SandboxKind::Docker => "docker",
            SandboxKind::Wasm => "wasm",
            SandboxKind::Host => "host",
        })
    }
}

/// Limits a sandbox enforces rather than applies on a best-effort basis, as a set of bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guarantees(pub u8);

impl Guarantees {
    pub const NONE: Guarantees = Guarantees(0);
    pub const TIME: Guarantees = Guarantees(1);
    pub const MEMORY: Guarantees = Guarantees(2);
    pub const PROCESSES: Guarantees = Guarantees(4);
    pub const ALL: Guarantees = Guarantees(7);

    pub fn contains(self, other: Guarantees) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Guarantees) -> Guarantees {
        Guarantees(self.0 | other.0)
    }

    fn missing(self, wanted: Guarantees) -> Guarantees {
        Guarantees(wanted.0 & !self.0)
    }
}

impl fmt::Display for Guarantees {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Guarantees::TIME, "time"),
            (Guarantees::MEMORY, "memory"),
            (Guarantees::PROCESSES, "processes"),
        ];
        let shown: Vec<&str> = names
            .iter()
            .filter(|(bit, _)| self.contains(*bit))
            .map(|(_, name)| *name)
            .collect();
        f.write_str(&shown.join("+"))
    }
}

/// What a peer offers. Peers with equal capabilities form one constraint class, which is what
/// the scheduler indexes, so a requirement is checked once per class instead of once per peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// As Rust names them: `linux`, `macos`, `windows`.
    pub os: String,
    /// As Rust names them: `x86_64`, `aarch64`.
    pub arch: String,
    /// The node's `--label KEY=VALUE`s.
    pub labels: BTreeMap<String, String>,
    /// Runtime name to the versions installed (`python` to `{3.11, 3.12}`).
    pub runtimes: BTreeMap<String, BTreeSet<String>>,
    /// The sandboxes the node's owner allows, with what each enforces.
    pub sandboxes: BTreeMap<SandboxKind, Guarantees>,
    /// Whether the node's owner lets builds reach the network.
    pub network: bool,
}

/// What a task needs from a peer; every field must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirements {
    /// `None`: any OS.
    pub os: Option<String>,
    /// `None`: any CPU architecture.
    pub arch: Option<String>,
    /// From `--require LABEL=VALUE`.
    pub labels: BTreeMap<String, String>,
    /// From the install phase's `runtime-versions`.
    pub runtimes: BTreeMap<String, String>,
    /// `None`: whichever sandbox the peer's owner runs builds in (any peer that offers one).
    pub sandbox: Option<SandboxKind>,
    /// What the sandbox must enforce; checked only when `sandbox` names one.
    pub guarantees: Guarantees,
    /// The build wants network access (the default, as in CodeBuild).
    pub network: bool,
}

impl Default for Requirements {
    fn default() -> Self {
        Requirements {
            os: None,
            arch: None,
            labels: BTreeMap::new(),
            runtimes: BTreeMap::new(),
            sandbox: Some(SandboxKind::Namespace),
            guarantees: Guarantees::NONE,
            network: true,
        }
    }
}

/// One hard constraint a peer does not meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmet {
    Os {
        wanted: String,
    },
    Arch {
        wanted: String,
    },
    Label {
        key: String,
        value: String,
    },
    Runtime {
        name: String,
        version: String,
    },
    Sandbox {
        kind: SandboxKind,
    },
    /// The peer offers no sandbox at all (its owner allows none).
    AnySandbox,
    Guarantees {
        kind: SandboxKind,
        missing: Guarantees,
    },
    Network,
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Os { wanted } => write!(f, "OS {wanted}"),
            Unmet::Arch { wanted } => write!(f, "CPU architecture {wanted}"),
            Unmet::Label { key, value } => write!(f, "label {key}={value}"),
            Unmet::Runtime { name, version } => write!(f, "runtime {name} {version}"),
            Unmet::Sandbox { kind } => write!(f, "sandbox {kind}"),
            Unmet::AnySandbox => f.write_str("any sandbox"),
            Unmet::Guarantees { kind, missing } => {
                write!(f, "enforced {missing} limits in the {kind} sandbox")
            }
            Unmet::Network => f.write_str("network access"),
        }
    }
}

impl Requirements {
    /// Every constraint `capabilities` fails, in a fixed order (the order the user reads them).
    pub fn unmet(&self, capabilities: &Capabilities) -> Vec<Unmet> {
        let mut unmet = Vec::new();
        if let Some(os) = &self.os
            && *os != capabilities.os
        {
            unmet.push(Unmet::Os { wanted: os.clone() });
        }
        if let Some(arch) = &self.arch
            && *arch != capabilities.arch
        {
            unmet.push(Unmet::Arch {
                wanted: arch.clone(),
            });
        }
        for (key, value) in &self.labels {
            if capabilities.labels.get(key) != Some(value) {
                unmet.push(Unmet::Label {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        for (name, version) in &self.runtimes {
            let installed = capabilities
                .runtimes
                .get(name)
                .is_some_and(|versions| versions.contains(version));
            if !installed {
                unmet.push(Unmet::Runtime {
                    name: name.clone(),
                    version: version.clone(),
                });
            }
        }
        match self.sandbox {
            None if capabilities.sandboxes.is_empty() => unmet.push(Unmet::AnySandbox),
            None => {}
            Some(kind) => match capabilities.sandboxes.get(&kind) {
                None => unmet.push(Unmet::Sandbox { kind }),
                Some(offered) if !offered.contains(self.guarantees) => {
                    unmet.push(Unmet::Guarantees {
                        kind,
                        missing: offered.missing(self.guarantees),
                    });
                }
                Some(_) => {}
            },
        }
        if self.network && !capabilities.network {
            unmet.push(Unmet::Network);
        }
        unmet
    }

    pub fn satisfied_by(&self, capabilities: &Capabilities) -> bool {
        self.unmet(capabilities).is_empty()
    }
}

/// What a peer announces on the pool topic, every few seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub peer: PeerId,
    /// Shared: a peer's capabilities rarely change, so heartbeats carry the same value and the
    /// scheduler recognises its class without hashing it again.
    pub capabilities: Arc<Capabilities>,
    pub total_slots: u32,
    pub free_slots: u32,
    /// Load as thousandths of the machine's capacity (load average over cores, capped at 1000).
    pub load_permille: u32,
    /// A bounded summary of the inputs the peer holds; the scheduler keeps at most
    /// [`MAX_HELD_INPUTS`] of them.
    pub holds: Vec<InputId>,
    /// The runs the peer has in progress, for every coordinator (bounded by its slots). A run
    /// this coordinator placed that is missing from two heartbeats in a row is lost: its result
    /// went astray or the peer restarted.
    pub running: Vec<(TaskId, Attempt)>,
    /// Tasks waiting in this node's own coordinator queue: other coordinators yield freed slots
    /// beyond their fair share while it is non-zero.
    pub queued_tasks: u32,
}

/// How many held inputs the scheduler remembers per peer: heartbeats are small (DESIGN.md keeps
/// gossip to a few KiB), and this bounds the input index at peers x this.
pub const MAX_HELD_INPUTS: usize = 1024;

/// An input a task needs, with its size, so "holds 92% of inputs" counts bytes, not files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    pub id: InputId,
    pub size_bytes: u64,
}

/// One unit of placement: a whole build, a batch member, or a phase the buildspec opted into its
/// own placement (which then depends on the task of the phase before it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    pub key: TaskKey,
    pub requirements: Requirements,
    pub inputs: Vec<Input>,
    /// Indices of tasks of the same build that must succeed first (`depend-on`).
    pub depends_on: Vec<u32>,
    /// A failure of this task does not fail the build or block its dependents.
    pub ignore_failure: bool,
}

/// A build as submitted to its coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildSpec {
    pub build: BuildId,
    pub submitter: SubmitterId,
    pub tasks: Vec<TaskSpec>,
    /// How long a ready task may wait for a peer before it fails (CodeBuild's queued timeout).
    pub queued_timeout_ms: u64,
}

/// How a run of a task ended, as the peer reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOutcome {
    Succeeded,
    /// The build itself failed (a command exited non-zero): a result, not retried.
    Failed,
    /// The peer could not run it (sandbox start, input fetch, disk full): retried elsewhere.
    Error {
        message: String,
    },
    /// The peer stopped it unfinished to shut down: retried elsewhere, and no strike against
    /// the peer when it then succeeds there.
    HandedBack {
        message: String,
    },
}

/// Why a worker refused an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclineReason {
    /// No free slot (another coordinator got there first, or local work).
    Busy,
    /// The peer does not meet the task's requirements after all.
    Unsuitable,
}

/// Everything that can happen, fed to [`crate::Scheduler::step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Submit(BuildSpec),
    Heartbeat(Heartbeat),
    OfferAccepted {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
    },
    OfferDeclined {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        reason: DeclineReason,
    },
    Started {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
    },
    /// The run is alive; renews the peer's lease like a heartbeat.
    Progress {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
    },
    Finished {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        outcome: TaskOutcome,
    },
    /// The connection to the peer dropped, or it said goodbye.
    PeerGone {
        peer: PeerId,
    },
    Cancel {
        build: BuildId,
    },
    /// Time passed; leases, offers, queued timeouts and stragglers are checked.
    Tick,
}

/// Why a peer was chosen, in numbers; `Display` is the one line the user reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub peer: PeerId,
    /// Share of the task's input bytes the peer holds, in thousandths; `None` for a task with
    /// no inputs.
    pub held_permille: Option<u32>,
    pub free_slots: u32,
    pub total_slots: u32,
    pub load_permille: u32,
    /// Learned from past runs of this task on the peer's class, if any.
    pub expected_ms: Option<u64>,
    /// How many peers were weighed.
    pub candidates: u32,
    /// Set for a speculative copy of a straggling run: the attempt it races.
    pub races: Option<(Attempt, PeerId)>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.races {
            Some((attempt, peer)) => write!(
                f,
                "speculative copy of {attempt} (slow on {peer}) placed on {}",
                self.peer
            )?,
            None => write!(f, "placed on {}", self.peer)?,
        }
        match self.held_permille {
            Some(held) => write!(f, ": holds {}% of inputs", held / 10)?,
            None => f.write_str(": no inputs")?,
        }
        write!(
            f,
            ", {}/{} slots free, load {}%",
            self.free_slots,
            self.total_slots,
            self.load_permille / 10
        )?;
        if let Some(expected_ms) = self.expected_ms {
            write!(f, ", expected {}", Duration(expected_ms))?;
        }
        write!(f, " (best of {})", self.candidates)
    }
}

/// A duration shown to people: `850ms`, `41s`, `12m05s`.
pub(crate) struct Duration(pub u64);

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms < 1000 {
            write!(f, "{ms}ms")
        } else if ms < 60_000 {
            write!(f, "{}s", (ms + 500) / 1000)
        } else {
            let seconds = (ms + 500) / 1000;
            write!(f, "{}m{:02}s", seconds / 60, seconds % 60)
        }
    }
}

/// No peer of the pool meets a task's requirements: which constraints, and who came closest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsatisfiable {
    /// The peers that came closest (fewest constraints unmet), grouped by what they lack.
    pub closest: Vec<NearMiss>,
    pub pool_size: u32,
}

/// Peers that all lack the same constraints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearMiss {
    pub unmet: Vec<Unmet>,
    /// How many peers, and the first few of them.
    pub peer_count: u32,
    pub peers: Vec<PeerId>,
}

impl fmt::Display for Unsatisfiable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no peer of {} can run it; closest:", self.pool_size)?;
        for (index, miss) in self.closest.iter().enumerate() {
            let separator = if index == 0 { " " } else { "; " };
            let peers: Vec<String> = miss.peers.iter().map(|p| p.to_string()).collect();
            let more = miss.peer_count as usize - miss.peers.len();
            let unmet: Vec<String> = miss.unmet.iter().map(|u| u.to_string()).collect();
            write!(f, "{separator}{}", peers.join(", "))?;
            if more > 0 {
                write!(f, " and {more} more")?;
            }
            let verb = if miss.peer_count == 1 {
                "lacks"
            } else {
                "lack"
            };
            write!(f, " {verb} {}", unmet.join(", "))?;
        }
        Ok(())
    }
}

/// Where a task stands, for a user asking why it has not finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// Dependencies that have not succeeded yet.
    Waiting { on: Vec<TaskId> },
    Queued {
        waited_ms: u64,
        /// Peers that meet its requirements, those of them quarantined, and free slots among
        /// them in this coordinator's view.
        qualified: u32,
        quarantined: u32,
        free_slots: u64,
        /// This coordinator holds its fair share while other coordinators have work waiting.
        yielding: bool,
        /// Peers where it failed to run: a retry goes elsewhere while another peer qualifies.
        avoided: Vec<PeerId>,
    },
    /// Its runs: attempt, peer, and for how long it has run (`None`: not accepted yet).
    Placed {
        runs: Vec<(Attempt, PeerId, Option<u64>)>,
        expected_ms: Option<u64>,
    },
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskStatus::Waiting { on } => {
                let on: Vec<String> = on.iter().map(|t| t.to_string()).collect();
                write!(f, "waiting for {} to succeed", on.join(", "))
            }
            TaskStatus::Queued {
                waited_ms,
                qualified,
                quarantined,
                free_slots,
                yielding,
                avoided,
            } => {
                write!(
                    f,
                    "queued for {}: {qualified} peers can run it",
                    Duration(*waited_ms)
                )?;
                if *quarantined > 0 {
                    write!(f, " ({quarantined} quarantined)")?;
                }
                if *yielding {
                    f.write_str(", and this coordinator is at its fair share while others wait")
                } else if *free_slots == 0 {
                    f.write_str(", none has a free slot")
                } else if !avoided.is_empty() {
                    let avoided: Vec<String> = avoided.iter().map(|p| p.to_string()).collect();
                    write!(
                        f,
                        ", waiting for a peer other than {} (where it failed)",
                        avoided.join(", ")
                    )
                } else {
                    write!(f, ", {free_slots} free: it goes out with the next event")
                }
            }
            TaskStatus::Placed { runs, expected_ms } => {
                let runs: Vec<String> = runs
                    .iter()
                    .map(|(attempt, peer, ran_ms)| match ran_ms {
                        Some(ran_ms) => {
                            format!("running {attempt} on {peer} for {}", Duration(*ran_ms))
                        }
                        None => format!("offered {attempt} to {peer}, not yet accepted"),
                    })
                    .collect();
                f.write_str(&runs.join("; "))?;
                if let Some(expected_ms) = expected_ms {
                    write!(f, " (expected {})", Duration(*expected_ms))?;
                }
                Ok(())
            }
        }
    }
}

/// Why a run of a task was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossReason {
    PeerGone,
    /// No heartbeat or progress within the lease.
    LeaseExpired {
        silent_ms: u64,
    },
    Error {
        message: String,
    },
    /// The peer's heartbeats stopped listing it.
    Vanished,
    /// The peer stopped it unfinished to shut down.
    HandedBack {
        message: String,
    },
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::PeerGone => f.write_str("the peer left"),
            LossReason::LeaseExpired { silent_ms } => {
                write!(f, "the peer was silent for {}", Duration(*silent_ms))
            }
            LossReason::Error { message } => write!(f, "the peer could not run it: {message}"),
            LossReason::Vanished => f.write_str("the peer stopped reporting it"),
            LossReason::HandedBack { message } => write!(f, "the peer handed it back: {message}"),
        }
    }
}

/// Why the scheduler failed a task without a result from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    Unsatisfiable(Unsatisfiable),
    RetriesExhausted { attempts: u32, last: LossReason },
    QueuedTimeout { waited_ms: u64 },
    DependencyFailed { dependency: TaskId },
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Unsatisfiable(why) => why.fmt(f),
            FailReason::RetriesExhausted { attempts, last } => {
                write!(f, "lost {attempts} times; last: {last}")
            }
            FailReason::QueuedTimeout { waited_ms } => write!(
                f,
                "no peer had room for it within the queued timeout ({})",
                Duration(*waited_ms)
            ),
            FailReason::DependencyFailed { dependency } => {
                write!(f, "not run: {dependency} did not succeed")
            }
        }
    }
}

/// Why a submission was refused before anything ran.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    DuplicateBuild,
    /// The coordinator's queue is bounded; try again later.
    QueueFull {
        queued: usize,
        limit: usize,
    },
    UnknownDependency {
        task: u32,
        dependency: u32,
    },
    Cycle {
        tasks: Vec<u32>,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::DuplicateBuild => f.write_str("a build with this id was submitted"),
            RejectReason::QueueFull { queued, limit } => write!(
                f,
                "the coordinator's queue is full ({queued} of {limit} tasks); submit later"
            ),
            RejectReason::UnknownDependency { task, dependency } => {
                write!(
                    f,
                    "task {task} depends on task {dependency}, which does not exist"
                )
            }
            RejectReason::Cycle { tasks } => write!(f, "tasks depend on each other: {tasks:?}"),
        }
    }
}

/// How a build ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildOutcome {
    Succeeded,
    /// The tasks that failed (not counting those that ignore failure).
    Failed {
        failed: Vec<TaskId>,
    },
    Cancelled,
    Rejected(RejectReason),
}

/// What the caller must do, returned by [`crate::Scheduler::step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Offer {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        explanation: Explanation,
    },
    /// Stop a run (best effort: the peer may be unreachable; its result will be ignored).
    Cancel {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
    },
    /// A run was lost; the task goes back to the queue for another attempt.
    Rerun {
        task: TaskId,
        lost: Attempt,
        peer: PeerId,
        reason: LossReason,
    },
    /// This run's result is the task's result; every other result for the task is ignored.
    Accept {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        outcome: TaskOutcome,
    },
    /// The scheduler gave up on a task.
    Fail { task: TaskId, reason: FailReason },
    /// No placements on this peer until `until`: its runs failed where others succeeded (or it
    /// refused work its heartbeat said it could do), `strikes` times within the window.
    Quarantine {
        peer: PeerId,
        until: Millis,
        strikes: u32,
    },
    BuildFinished {
        build: BuildId,
        outcome: BuildOutcome,
    },
}

impl fmt::Display for TaskOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskOutcome::Succeeded => f.write_str("succeeded"),
            TaskOutcome::Failed => f.write_str("failed"),
            TaskOutcome::Error { message } => write!(f, "error: {message}"),
            TaskOutcome::HandedBack { message } => write!(f, "handed back: {message}"),
        }
    }
}

impl fmt::Display for BuildOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildOutcome::Succeeded => f.write_str("succeeded"),
            BuildOutcome::Failed { failed } => {
                let failed: Vec<String> = failed.iter().map(|t| t.to_string()).collect();
                write!(f, "failed ({})", failed.join(", "))
            }
            BuildOutcome::Cancelled => f.write_str("cancelled"),
            BuildOutcome::Rejected(reason) => write!(f, "rejected: {reason}"),
        }
    }
}

/// One line per action, as a log shows it.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Offer {
                task,
                attempt,
                explanation,
                ..
            } => write!(f, "offer {task} {attempt}: {explanation}"),
            Action::Cancel {
                task,
                attempt,
                peer,
            } => write!(f, "cancel {task} {attempt} on {peer}"),
            Action::Rerun {
                task,
                lost,
                peer,
                reason,
            } => write!(f, "rerun {task}: lost {lost} on {peer}, {reason}"),
            Action::Accept {
                task,
                attempt,
                peer,
                outcome,
            } => write!(f, "accept {task} {attempt} from {peer}: {outcome}"),
            Action::Fail { task, reason } => write!(f, "fail {task}: {reason}"),
            Action::Quarantine {
                peer,
                until,
                strikes,
            } => write!(
                f,
                "quarantine {peer} until {until} after {strikes} strike{}: runs that failed \
                 there but not elsewhere, or work refused that its heartbeat offered",
                if *strikes == 1 { "" } else { "s" }
            ),
            Action::BuildFinished { build, outcome } => write!(f, "build {build} {outcome}"),
        }
    }
}
