//! The coordinator's state machine: `step(now, event) -> actions`. It keeps each build's tasks
//! (waiting on dependencies, queued, placed, done), a fair queue per submitter, the runs it has
//! offered with their leases, and timers; placement itself is in `pool`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::ops::Bound;

use crate::batch::{GraphError, Member, check_graph};
use crate::fast_hash::FastMap;
use crate::ids::{Attempt, BuildId, Millis, PeerId, SubmitterId, TaskId, TaskKey};
use crate::model::{
    Action, BuildOutcome, BuildSpec, DeclineReason, Event, FailReason, Heartbeat, Input,
    LossReason, RejectReason, TaskOutcome, TaskStatus,
};
use crate::pool::{Choice, Policy, Pool, ReqId};
use crate::rng::Rng;

/// Tunables, with defaults for a LAN pool heartbeating every two seconds.
#[derive(Clone, Debug)]
pub struct Config {
    /// A peer not heard from for this long loses its runs (its lease).
    pub lease_ms: u64,
    /// An offer not accepted within this is withdrawn and the task placed again.
    pub offer_timeout_ms: u64,
    /// Runs of a task that may be lost (peer gone, silent, or unable to run it) before it fails.
    pub max_attempts: u32,
    /// Tasks this coordinator holds at most (waiting, queued or running); submissions beyond
    /// are refused, so one coordinator's memory stays bounded.
    pub max_pending_tasks: usize,
    /// A run slower than this share of its expected duration (in percent) gets a speculative
    /// copy on another peer; `None` turns speculation off.
    pub straggler_percent: Option<u64>,
    /// Runs shorter than this are never speculated on: a copy would not finish sooner.
    pub straggler_min_ms: u64,
    /// This many strikes within `quarantine_window_ms` quarantine a peer for `quarantine_ms`.
    /// A strike: a run that errored where the same task then succeeded elsewhere, or an offer
    /// refused as unsuitable although the peer's heartbeat claimed it could run it.
    pub quarantine_strikes: usize,
    pub quarantine_window_ms: u64,
    pub quarantine_ms: u64,
    pub policy: Policy,
    /// Seeds the random placement baseline; unused by the scored policy.
    pub seed: u64,
    /// This coordinator's own node, if it is also a peer of the pool: its heartbeats' queue
    /// length is this scheduler's own demand, not another coordinator's.
    pub local_peer: Option<PeerId>,
    /// Classes of equal capabilities kept, at most, while some hold no peer: past it, a new set
    /// of capabilities takes the place of the class no peer has been in for longest, and that
    /// class's learned durations go. Peers that come and go with capabilities of their own (a
    /// label naming the machine) would otherwise grow the classes for as long as the node
    /// runs. There are more classes than this only if more were once in use at the same time.
    pub max_classes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ms: 10_000,
            offer_timeout_ms: 5_000,
            max_attempts: 3,
            max_pending_tasks: 200_000,
            straggler_percent: Some(200),
            straggler_min_ms: 2_000,
            quarantine_strikes: 3,
            quarantine_window_ms: 600_000,
            quarantine_ms: 300_000,
            policy: Policy::Scored,
            seed: 0,
            local_peer: None,
            max_classes: 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Dependencies have not all succeeded yet.
    Waiting,
    /// Ready, in its submitter's queue since `since`.
    Queued {
        since: Millis,
    },
    /// At least one run offered or running.
    Placed,
    Done,
}

#[derive(Clone, Debug)]
struct Run {
    attempt: Attempt,
    peer: PeerId,
    /// The peer accepted or started it, so it counts it in its heartbeats.
    acknowledged: bool,
    started: Option<Millis>,
    /// Consecutive heartbeats from its peer that did not list it.
    missed_heartbeats: u8,
}

/// How many runs of a task may be handed back (peers shutting down) per attempt it may lose,
/// before a handback counts as a loss too.
const HANDBACKS_PER_ATTEMPT: u32 = 4;

#[derive(Debug)]
struct TaskState {
    /// Only what placement needs from the `TaskSpec`: its requirements are interned as
    /// `requirement`, and its dependencies live on as `dependents` and `waiting_on`.
    key: TaskKey,
    inputs: Vec<Input>,
    ignore_failure: bool,
    requirement: ReqId,
    dependents: Vec<u32>,
    waiting_on: usize,
    phase: Phase,
    next_attempt: u32,
    /// When it last became ready (or was lost and became ready again): the queued timeout
    /// counts from here.
    queued_since: Millis,
    /// Runs lost so far (not counting declined offers or losing speculative copies).
    losses: u32,
    runs: Vec<Run>,
    /// Peers whose runs of this task errored; if it then succeeds elsewhere, they get a strike.
    errored_on: Vec<PeerId>,
    /// Peers that handed a run of this task back to shut down, one entry a run: avoided like
    /// the above, no strike (see [`HANDBACKS_PER_ATTEMPT`]).
    handed_back_on: Vec<PeerId>,
}

impl TaskState {
    /// The peers a retry avoids while others qualify, each once.
    fn avoided(&self) -> Vec<PeerId> {
        let mut avoided = self.errored_on.clone();
        avoided.extend(&self.handed_back_on);
        avoided.sort_unstable();
        avoided.dedup();
        avoided
    }
}

#[derive(Debug)]
struct BuildState {
    submitter: SubmitterId,
    tasks: Vec<TaskState>,
    unfinished: usize,
    failed: Vec<TaskId>,
    queued_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    OfferExpires { task: TaskId, attempt: Attempt },
    Straggler { task: TaskId, attempt: Attempt },
    QueuedTimeout { task: TaskId, since: Millis },
    QuarantineEnds { peer: PeerId, until: Millis },
}

#[derive(Debug, Default)]
struct SubmitterQueue {
    /// Live builds of this submitter.
    builds: u32,
    /// Runs in flight for this submitter: the fair-share measure.
    running: u32,
    /// Ready tasks by requirement set, so tasks that cannot be placed now do not hold up tasks
    /// that can. Entries for tasks that left the queue otherwise are skipped when met.
    groups: BTreeMap<ReqId, VecDeque<TaskId>>,
}

/// How a task ended, for the bookkeeping shared by every way of ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Succeeded,
    Failed,
}

/// Counters for callers and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Peers with at least one slot.
    pub peers: usize,
    /// Classes of equal capabilities held: at most `Config::max_classes`, or the most that were
    /// ever in use at once.
    pub classes: usize,
    /// Classes that took the place of one no peer was in, past `Config::max_classes`.
    pub classes_replaced: u64,
    pub builds: usize,
    /// Tasks of live builds not yet done (waiting on dependencies, queued or running).
    pub pending_tasks: usize,
    /// Tasks ready and waiting for a peer: what this node's heartbeat announces as its queue.
    pub queued_tasks: usize,
    /// Runs offered or running.
    pub running: u64,
    /// Placements made (offers, speculative copies included).
    pub decisions: u64,
}

/// One coordinator's scheduler. Feed it events with [`Scheduler::step`] and carry out the
/// actions it returns.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    pool: Pool,
    builds: FastMap<BuildId, BuildState>,
    submitters: BTreeMap<SubmitterId, SubmitterQueue>,
    timers: BinaryHeap<Reverse<(Millis, Timer)>>,
    pending_tasks: usize,
    queued_tasks: usize,
    /// Queued tasks per requirement set, so a step that freed a slot no queued task can use
    /// finds that out without walking every submitter's queue.
    queued_by_requirement: FastMap<ReqId, usize>,
    running: u64,
    decisions: u64,
    rng: Rng,
}

impl Scheduler {
    pub fn new(config: Config) -> Scheduler {
        let rng = Rng::new(config.seed);
        Scheduler {
            pool: Pool::new(config.max_classes),
            config,
            builds: FastMap::default(),
            submitters: BTreeMap::new(),
            timers: BinaryHeap::new(),
            pending_tasks: 0,
            queued_tasks: 0,
            queued_by_requirement: FastMap::default(),
            running: 0,
            decisions: 0,
            rng,
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            peers: self.pool.workers(),
            classes: self.pool.classes(),
            classes_replaced: self.pool.classes_replaced(),
            builds: self.builds.len(),
            pending_tasks: self.pending_tasks,
            queued_tasks: self.queued_tasks,
            running: self.running,
            decisions: self.decisions,
        }
    }

    /// Whether the scheduler holds anything of `peer`: it is in the pool, or away with a
    /// quarantine it will find again when it returns. A peer it does not remember may be given
    /// a new number.
    pub fn remembers(&self, peer: PeerId) -> bool {
        self.pool.remembers(peer)
    }

    /// Takes in one event at time `now` and returns what to do, in order.
    pub fn step(&mut self, now: Millis, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        let quiet = matches!(
            event,
            Event::OfferAccepted { .. } | Event::Started { .. } | Event::Progress { .. }
        );
        match event {
            Event::Submit(spec) => self.submit(now, spec, &mut out),
            Event::Heartbeat(heartbeat) => self.heartbeat(now, &heartbeat, &mut out),
            Event::OfferAccepted {
                task,
                attempt,
                peer,
            } => self.acknowledge(now, task, attempt, peer, None),
            Event::Started {
                task,
                attempt,
                peer,
            } => self.acknowledge(now, task, attempt, peer, Some(now)),
            Event::Progress { peer, .. } => self.pool.heard_from(now, peer),
            Event::OfferDeclined {
                task,
                attempt,
                peer,
                reason,
            } => self.declined(now, task, attempt, peer, reason, &mut out),
            Event::Finished {
                task,
                attempt,
                peer,
                outcome,
            } => self.finished(now, task, attempt, peer, outcome, &mut out),
            Event::PeerGone { peer } => self.drop_peer(now, peer, LossReason::PeerGone, &mut out),
            Event::Cancel { build } => self.cancel(build, &mut out),
            Event::Tick => self.tick(now, &mut out),
        }
        // Acceptances, starts and progress neither free a slot nor queue a task; every other
        // event may, and then whatever can be placed is placed before the step returns.
        if !quiet {
            self.dispatch(now, &mut out);
        }
        out
    }

    fn submit(&mut self, now: Millis, spec: BuildSpec, out: &mut Vec<Action>) {
        let build = spec.build;
        if let Err(reason) = self.admit(&spec) {
            out.push(Action::BuildFinished {
                build,
                outcome: BuildOutcome::Rejected(reason),
            });
            return;
        }
        let count = spec.tasks.len();
        let mut dependents: Vec<Vec<u32>> = vec![Vec::new(); count];
        for (index, task) in spec.tasks.iter().enumerate() {
            for dependency in &task.depends_on {
                dependents[*dependency as usize].push(index as u32);
            }
        }
        let tasks: Vec<TaskState> = spec
            .tasks
            .into_iter()
            .zip(dependents)
            .map(|(task, dependents)| TaskState {
                requirement: self.pool.requirement_id(&task.requirements),
                waiting_on: task.depends_on.len(),
                key: task.key,
                // Largest first: the placement's holder scan looks at the largest inputs first.
                inputs: {
                    let mut inputs = task.inputs;
                    inputs.sort_by_key(|input| Reverse(input.size_bytes));
                    inputs
                },
                ignore_failure: task.ignore_failure,
                dependents,
                phase: Phase::Waiting,
                next_attempt: 1,
                queued_since: now,
                losses: 0,
                runs: Vec::new(),
                errored_on: Vec::new(),
                handed_back_on: Vec::new(),
            })
            .collect();
        self.builds.insert(
            build,
            BuildState {
                submitter: spec.submitter,
                tasks,
                unfinished: count,
                failed: Vec::new(),
                queued_timeout_ms: spec.queued_timeout_ms,
            },
        );
        self.submitters.entry(spec.submitter).or_default().builds += 1;
        self.pending_tasks += count;
        if count == 0 {
            self.end_build(build, out);
            return;
        }
        for index in 0..count as u32 {
            let task = TaskId { build, index };
            // Tasks failing at once (no peer can run them) may end the build before the loop.
            if !self.builds.contains_key(&build) {
                return;
            }
            let state = self.task(task);
            // A task made ready by an earlier one's ignored failure has been handled already.
            if state.phase == Phase::Waiting && state.waiting_on == 0 {
                self.make_ready(now, task, out);
            }
        }
    }

    fn admit(&self, spec: &BuildSpec) -> Result<(), RejectReason> {
        if self.builds.contains_key(&spec.build) {
            return Err(RejectReason::DuplicateBuild);
        }
        if self.pending_tasks + spec.tasks.len() > self.config.max_pending_tasks {
            return Err(RejectReason::QueueFull {
                queued: self.pending_tasks,
                limit: self.config.max_pending_tasks,
            });
        }
        let members: Vec<Member> = spec
            .tasks
            .iter()
            .map(|task| Member {
                depends_on: task.depends_on.iter().map(|d| *d as usize).collect(),
                ignore_failure: task.ignore_failure,
            })
            .collect();
        check_graph(&members).map_err(|error| match error {
            GraphError::UnknownDependency { member, dependency } => {
                RejectReason::UnknownDependency {
                    task: member as u32,
                    dependency: dependency as u32,
                }
            }
            GraphError::Cycle { members } => RejectReason::Cycle {
                tasks: members.into_iter().map(|m| m as u32).collect(),
            },
        })
    }

    fn task(&self, task: TaskId) -> &TaskState {
        &self.builds[&task.build].tasks[task.index as usize]
    }

    fn task_mut(&mut self, task: TaskId) -> &mut TaskState {
        &mut self.builds.get_mut(&task.build).expect("live build").tasks[task.index as usize]
    }

    /// The task's state, if its build is still live; results for finished builds are late.
    fn live_task(&self, task: TaskId) -> Option<&TaskState> {
        self.builds
            .get(&task.build)
            .and_then(|b| b.tasks.get(task.index as usize))
    }

    /// A task's dependencies are done: queue it, or fail it at once if no peer can ever run it.
    fn make_ready(&mut self, now: Millis, task: TaskId, out: &mut Vec<Action>) {
        let requirement = self.task(task).requirement;
        // With no peer known yet the pool cannot be judged; the queued timeout bounds the wait.
        if self.pool.workers() > 0 && !self.pool.satisfiable(requirement) {
            let why = self.pool.unsatisfiable(requirement);
            self.fail(now, task, FailReason::Unsatisfiable(why), out);
            return;
        }
        self.task_mut(task).queued_since = now;
        self.enqueue(task);
    }

    fn enqueue(&mut self, task: TaskId) {
        let build = &self.builds[&task.build];
        let (submitter, timeout_ms) = (build.submitter, build.queued_timeout_ms);
        let state = self.task(task);
        let (since, requirement) = (state.queued_since, state.requirement);
        self.set_phase(task, Phase::Queued { since });
        self.submitters
            .get_mut(&submitter)
            .expect("submitter of a live build")
            .groups
            .entry(requirement)
            .or_default()
            .push_back(task);
        self.timers.push(Reverse((
            since.plus(timeout_ms),
            Timer::QueuedTimeout { task, since },
        )));
    }

    fn heartbeat(&mut self, now: Millis, heartbeat: &Heartbeat, out: &mut Vec<Action>) {
        let peer = heartbeat.peer;
        let ours: Vec<(TaskId, Attempt)> = self
            .pool
            .peer(peer)
            .map(|view| view.attempts.clone())
            .unwrap_or_default();
        let mut listed = 0;
        let mut vanished = Vec::new();
        for (task, attempt) in ours {
            if heartbeat.running.contains(&(task, attempt)) {
                listed += 1;
                self.mark_listed(task, attempt);
                continue;
            }
            let run = self
                .run(task, attempt, peer)
                .expect("a peer's runs are live");
            // An offer may be accepted after the heartbeat left, so one miss is not enough.
            if run.acknowledged && run.missed_heartbeats >= 1 {
                vanished.push((task, run.clone()));
            } else if run.acknowledged {
                self.mark_missed(task, attempt);
            }
        }
        // The demand of this node's own coordinator is this scheduler's, not a competitor's.
        let queued_tasks = if self.config.local_peer == Some(peer) {
            0
        } else {
            heartbeat.queued_tasks
        };
        if let Some(emptied) = self.pool.heartbeat(now, heartbeat, listed, queued_tasks)
            && self.pool.workers() > 0
        {
            self.fail_unsatisfiable(now, emptied, out);
        }
        for (task, run) in vanished {
            self.release(task, run.attempt);
            self.lost(now, task, run, LossReason::Vanished, out);
        }
    }

    fn run_mut(&mut self, task: TaskId, attempt: Attempt) -> &mut Run {
        self.task_mut(task)
            .runs
            .iter_mut()
            .find(|run| run.attempt == attempt)
            .expect("a live run")
    }

    /// The peer lists the run: it has it, even if its acceptance never arrived.
    fn mark_listed(&mut self, task: TaskId, attempt: Attempt) {
        let run = self.run_mut(task, attempt);
        run.acknowledged = true;
        run.missed_heartbeats = 0;
    }

    fn mark_missed(&mut self, task: TaskId, attempt: Attempt) {
        self.run_mut(task, attempt).missed_heartbeats = 1;
    }

    fn run(&self, task: TaskId, attempt: Attempt, peer: PeerId) -> Option<&Run> {
        self.live_task(task)?
            .runs
            .iter()
            .find(|run| run.attempt == attempt && run.peer == peer)
    }

    fn acknowledge(
        &mut self,
        now: Millis,
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        started: Option<Millis>,
    ) {
        if self.run(task, attempt, peer).is_none() {
            return;
        }
        self.pool.heard_from(now, peer);
        let state = self.task_mut(task);
        let key = state.key;
        let run = state
            .runs
            .iter_mut()
            .find(|run| run.attempt == attempt)
            .expect("checked above");
        run.acknowledged = true;
        let Some(started) = started.filter(|_| run.started.is_none()) else {
            return;
        };
        run.started = Some(started);
        let Some(percent) = self.config.straggler_percent else {
            return;
        };
        let class = self.pool.peer(peer).expect("a run's peer is known").class;
        if let Some(expected_ms) = self.pool.expected_ms(key, class) {
            let patience_ms = (expected_ms * percent / 100).max(self.config.straggler_min_ms);
            self.timers.push(Reverse((
                started.plus(patience_ms),
                Timer::Straggler { task, attempt },
            )));
        }
    }

    fn declined(
        &mut self,
        now: Millis,
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        reason: DeclineReason,
        out: &mut Vec<Action>,
    ) {
        if self.run(task, attempt, peer).is_none() {
            return;
        }
        self.pool.heard_from(now, peer);
        self.withdraw(task, attempt, peer);
        // A peer that refuses work its heartbeat says it can do misleads every placement.
        if reason == DeclineReason::Unsuitable {
            self.strike(now, peer, out);
        }
    }

    /// An offer came to nothing: the task goes back to the queue (this does not count as a lost
    /// run) and the peer gets no more offers until its next heartbeat says it has room.
    fn withdraw(&mut self, task: TaskId, attempt: Attempt, peer: PeerId) {
        self.release(task, attempt);
        self.pool.update(peer, |view| {
            view.others = view.total.saturating_sub(view.committed);
        });
        if self.task(task).runs.is_empty() {
            // It keeps its queued-since time: declines alone must not keep a task queued forever.
            self.enqueue(task);
        }
    }

    fn finished(
        &mut self,
        now: Millis,
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        outcome: TaskOutcome,
        out: &mut Vec<Action>,
    ) {
        let Some(run) = self.run(task, attempt, peer).cloned() else {
            // A late or duplicate result: the run was cancelled, lost, or beaten by another.
            return;
        };
        self.pool.heard_from(now, peer);
        self.release(task, attempt);
        match outcome {
            TaskOutcome::Error { message } => {
                self.task_mut(task).errored_on.push(peer);
                self.lost(now, task, run, LossReason::Error { message }, out);
            }
            TaskOutcome::HandedBack { message } => {
                self.task_mut(task).handed_back_on.push(peer);
                self.lost(now, task, run, LossReason::HandedBack { message }, out);
            }
            TaskOutcome::Succeeded | TaskOutcome::Failed => {
                if let (Some(started), Some(view)) = (run.started, self.pool.peer(peer)) {
                    let (key, class) = (self.task(task).key, view.class);
                    self.pool.learn(key, class, now.since(started));
                }
                self.cancel_runs(task, out);
                let ending = if outcome == TaskOutcome::Succeeded {
                    Ending::Succeeded
                } else {
                    Ending::Failed
                };
                out.push(Action::Accept {
                    task,
                    attempt,
                    peer,
                    outcome,
                });
                if ending == Ending::Succeeded {
                    for culprit in std::mem::take(&mut self.task_mut(task).errored_on) {
                        self.strike(now, culprit, out);
                    }
                }
                self.end_task(now, task, ending, out);
            }
        }
    }

    /// Takes a run off its peer: the slot is free in this coordinator's view at once.
    fn release(&mut self, task: TaskId, attempt: Attempt) {
        let submitter = self.builds[&task.build].submitter;
        let state = self.task_mut(task);
        let position = state
            .runs
            .iter()
            .position(|run| run.attempt == attempt)
            .expect("releasing a live run");
        let run = state.runs.remove(position);
        self.pool.update(run.peer, |view| {
            view.committed -= 1;
            view.attempts.retain(|entry| *entry != (task, attempt));
        });
        self.submitters
            .get_mut(&submitter)
            .expect("submitter of a live build")
            .running -= 1;
        self.running -= 1;
    }

    /// Every change of a task's phase goes through here, so the count of queued tasks (this
    /// node's announced demand) stays exact.
    fn set_phase(&mut self, task: TaskId, phase: Phase) {
        let state = self.task_mut(task);
        let was_queued = matches!(state.phase, Phase::Queued { .. });
        state.phase = phase;
        let requirement = state.requirement;
        let is_queued = matches!(phase, Phase::Queued { .. });
        match (was_queued, is_queued) {
            (false, true) => {
                self.queued_tasks += 1;
                *self.queued_by_requirement.entry(requirement).or_default() += 1;
            }
            (true, false) => {
                self.queued_tasks -= 1;
                let count = self
                    .queued_by_requirement
                    .get_mut(&requirement)
                    .expect("counted when queued");
                *count -= 1;
                if *count == 0 {
                    self.queued_by_requirement.remove(&requirement);
                }
            }
            _ => {}
        }
    }

    fn cancel_runs(&mut self, task: TaskId, out: &mut Vec<Action>) {
        for run in self.task(task).runs.clone() {
            self.release(task, run.attempt);
            out.push(Action::Cancel {
                task,
                attempt: run.attempt,
                peer: run.peer,
            });
        }
    }

    /// A run is gone without a result. Another run of the task may still win; otherwise the
    /// task runs again, unless it has been lost too often.
    fn lost(
        &mut self,
        now: Millis,
        task: TaskId,
        run: Run,
        reason: LossReason,
        out: &mut Vec<Action>,
    ) {
        if !self.task(task).runs.is_empty() {
            return;
        }
        let max_attempts = self.config.max_attempts;
        let state = self.task_mut(task);
        // A run handed back by a peer shutting down is nobody's failure: it does not use up
        // an attempt, unless the task keeps coming back far more often than it may be lost
        // (a peer that only ever hands work back cannot keep a build going round forever).
        let handbacks = state.handed_back_on.len() as u64;
        let forgiven = u64::from(max_attempts) * u64::from(HANDBACKS_PER_ATTEMPT);
        if !matches!(reason, LossReason::HandedBack { .. }) || handbacks > forgiven {
            state.losses += 1;
        }
        let losses = state.losses;
        if losses >= max_attempts {
            let reason = FailReason::RetriesExhausted {
                attempts: losses,
                last: reason,
            };
            self.fail(now, task, reason, out);
            return;
        }
        out.push(Action::Rerun {
            task,
            lost: run.attempt,
            peer: run.peer,
            reason,
        });
        self.task_mut(task).queued_since = now;
        self.enqueue(task);
    }

    fn drop_peer(&mut self, now: Millis, peer: PeerId, reason: LossReason, out: &mut Vec<Action>) {
        let Some(view) = self.pool.remove(peer) else {
            return;
        };
        for (task, attempt) in view.attempts {
            let run = self
                .run(task, attempt, peer)
                .cloned()
                .expect("a peer's runs are live");
            self.release(task, attempt);
            // The peer may still be running it, unseen (a partition): tell it to stop, and its
            // result will be ignored if it comes.
            out.push(Action::Cancel {
                task,
                attempt,
                peer,
            });
            self.lost(now, task, run, reason.clone(), out);
        }
        if self.pool.class_emptied(view.class) && self.pool.workers() > 0 {
            self.fail_unsatisfiable(now, view.class, out);
        }
    }

    /// The last peer of a class left: queued tasks that no remaining peer can run fail now.
    fn fail_unsatisfiable(&mut self, now: Millis, class: u32, out: &mut Vec<Action>) {
        let mut doomed = Vec::new();
        for queue in self.submitters.values_mut() {
            let requirements: Vec<ReqId> = queue
                .groups
                .keys()
                .copied()
                .filter(|r| {
                    self.pool.requirement_uses_class(*r, class) && !self.pool.satisfiable(*r)
                })
                .collect();
            for requirement in requirements {
                doomed.extend(queue.groups.remove(&requirement).unwrap_or_default());
            }
        }
        for task in doomed {
            if self.is_queued(task) {
                let why = self.pool.unsatisfiable(self.task(task).requirement);
                self.fail(now, task, FailReason::Unsatisfiable(why), out);
            }
        }
    }

    fn is_queued(&self, task: TaskId) -> bool {
        self.live_task(task)
            .is_some_and(|state| matches!(state.phase, Phase::Queued { .. }))
    }

    fn cancel(&mut self, build: BuildId, out: &mut Vec<Action>) {
        let Some(state) = self.builds.get(&build) else {
            return;
        };
        let count = state.tasks.len() as u32;
        for index in 0..count {
            let task = TaskId { build, index };
            self.cancel_runs(task, out);
            if self.task(task).phase != Phase::Done {
                self.set_phase(task, Phase::Done);
                self.pending_tasks -= 1;
            }
        }
        let state = self.builds.remove(&build).expect("live build");
        self.forget_build(state.submitter);
        out.push(Action::BuildFinished {
            build,
            outcome: BuildOutcome::Cancelled,
        });
    }

    /// A submitter's build ended; a submitter with none left is forgotten, so the table of
    /// submitters grows with the builds live, not with every user ever seen.
    fn forget_build(&mut self, submitter: SubmitterId) {
        let queue = self
            .submitters
            .get_mut(&submitter)
            .expect("submitter of a live build");
        queue.builds -= 1;
        if queue.builds == 0 {
            // Its runs all ended with its builds; what is left in its queue are entries for
            // tasks that ended otherwise.
            self.submitters.remove(&submitter);
        }
    }

    fn fail(&mut self, now: Millis, task: TaskId, reason: FailReason, out: &mut Vec<Action>) {
        out.push(Action::Fail { task, reason });
        self.end_task(now, task, Ending::Failed, out);
    }

    /// Marks a task done and moves its dependents on: they become ready once all their
    /// dependencies are done, or fail when one failed (unless it ignores failure).
    fn end_task(&mut self, now: Millis, task: TaskId, ending: Ending, out: &mut Vec<Action>) {
        self.set_phase(task, Phase::Done);
        let state = self.task(task);
        let counts_as_done = ending == Ending::Succeeded || state.ignore_failure;
        let dependents = state.dependents.clone();
        let build = self.builds.get_mut(&task.build).expect("live build");
        build.unfinished -= 1;
        if !counts_as_done {
            build.failed.push(task);
        }
        self.pending_tasks -= 1;
        for index in dependents {
            // A dependent failing in turn can end the whole build.
            if !self.builds.contains_key(&task.build) {
                return;
            }
            let dependent = TaskId {
                build: task.build,
                index,
            };
            if counts_as_done {
                let state = self.task_mut(dependent);
                state.waiting_on -= 1;
                if state.waiting_on == 0 {
                    self.make_ready(now, dependent, out);
                }
            } else if self.task(dependent).phase == Phase::Waiting {
                let reason = FailReason::DependencyFailed { dependency: task };
                self.fail(now, dependent, reason, out);
            }
        }
        if self
            .builds
            .get(&task.build)
            .is_some_and(|build| build.unfinished == 0)
        {
            self.end_build(task.build, out);
        }
    }

    fn end_build(&mut self, build: BuildId, out: &mut Vec<Action>) {
        let state = self.builds.remove(&build).expect("live build");
        self.forget_build(state.submitter);
        let outcome = if state.failed.is_empty() {
            BuildOutcome::Succeeded
        } else {
            BuildOutcome::Failed {
                failed: state.failed,
            }
        };
        out.push(Action::BuildFinished { build, outcome });
    }

    fn strike(&mut self, now: Millis, peer: PeerId, out: &mut Vec<Action>) {
        let Some(view) = self.pool.peer(peer) else {
            return;
        };
        let window_start = Millis(now.0.saturating_sub(self.config.quarantine_window_ms));
        let mut strikes = view.strikes.clone();
        strikes.retain(|at| *at >= window_start);
        strikes.push(now);
        let quarantine = strikes.len() >= self.config.quarantine_strikes;
        let until = now.plus(self.config.quarantine_ms);
        let count = strikes.len() as u32;
        self.pool.update(peer, |view| {
            if quarantine {
                view.strikes.clear();
                view.quarantined_until = Some(until);
            } else {
                view.strikes = strikes;
            }
        });
        if quarantine {
            self.timers
                .push(Reverse((until, Timer::QuarantineEnds { peer, until })));
            out.push(Action::Quarantine {
                peer,
                until,
                strikes: count,
            });
        }
    }

    fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        let deadline = Millis(now.0.saturating_sub(self.config.lease_ms));
        while let Some((last_seen, peer)) = self.pool.silent_since(deadline) {
            let reason = LossReason::LeaseExpired {
                silent_ms: now.since(last_seen),
            };
            self.drop_peer(now, peer, reason, out);
        }
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.fire(now, timer, out);
        }
    }

    fn fire(&mut self, now: Millis, timer: Timer, out: &mut Vec<Action>) {
        match timer {
            Timer::OfferExpires { task, attempt } => {
                let unanswered = self
                    .live_task(task)
                    .and_then(|s| s.runs.iter().find(|run| run.attempt == attempt))
                    .filter(|run| !run.acknowledged)
                    .map(|run| run.peer);
                if let Some(peer) = unanswered {
                    self.withdraw(task, attempt, peer);
                }
            }
            Timer::Straggler { task, attempt } => self.speculate(now, task, attempt, out),
            Timer::QueuedTimeout { task, since } => {
                let waiting = self
                    .live_task(task)
                    .is_some_and(|s| s.phase == Phase::Queued { since });
                if waiting {
                    let reason = FailReason::QueuedTimeout {
                        waited_ms: now.since(since),
                    };
                    self.fail(now, task, reason, out);
                }
            }
            Timer::QuarantineEnds { peer, until } => self.pool.end_quarantine(peer, until),
        }
    }

    /// A run is much slower than this task's runs on that class of peer: race a copy on another
    /// peer; the first result wins and the other run is cancelled.
    fn speculate(&mut self, now: Millis, task: TaskId, attempt: Attempt, out: &mut Vec<Action>) {
        let Some(state) = self.live_task(task) else {
            return;
        };
        let [run] = state.runs.as_slice() else {
            return;
        };
        if run.attempt != attempt || run.started.is_none() {
            return;
        }
        let slow_peer = run.peer;
        let Some(mut choice) = self.choose(task, &[slow_peer]) else {
            return;
        };
        choice.explanation.races = Some((attempt, slow_peer));
        self.offer(now, task, choice, out);
    }

    fn choose(&mut self, task: TaskId, exclude: &[PeerId]) -> Option<Choice> {
        let state = self.task(task);
        match self.config.policy {
            Policy::Scored => self.pool.choose(
                state.requirement,
                state.key,
                &state.inputs,
                exclude,
                self.decisions.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            Policy::Random => {
                let random = self.rng.next_u64();
                let state = self.task(task);
                self.pool.choose_randomly(
                    state.requirement,
                    state.key,
                    &state.inputs,
                    exclude,
                    random,
                )
            }
        }
    }

    fn offer(&mut self, now: Millis, task: TaskId, choice: Choice, out: &mut Vec<Action>) {
        let peer = choice.peer;
        let submitter = self.builds[&task.build].submitter;
        let state = self.task_mut(task);
        let attempt = Attempt(state.next_attempt);
        state.next_attempt += 1;
        state.runs.push(Run {
            attempt,
            peer,
            acknowledged: false,
            started: None,
            missed_heartbeats: 0,
        });
        self.set_phase(task, Phase::Placed);
        self.running += 1;
        self.pool.update(peer, |view| {
            view.committed += 1;
            view.attempts.push((task, attempt));
        });
        self.submitters
            .get_mut(&submitter)
            .expect("submitter of a live build")
            .running += 1;
        self.timers.push(Reverse((
            now.plus(self.config.offer_timeout_ms),
            Timer::OfferExpires { task, attempt },
        )));
        self.decisions += 1;
        out.push(Action::Offer {
            task,
            attempt,
            peer,
            explanation: choice.explanation,
        });
    }

    /// Places queued tasks while there is room: each time, the submitter with the fewest runs in
    /// flight goes first (equal shares of the pool), so one big batch cannot starve a small build.
    fn dispatch(&mut self, now: Millis, out: &mut Vec<Action>) {
        let mut order: Vec<(u32, SubmitterId)> = Vec::new();
        loop {
            if self.pool.free_total() == 0 || self.over_fair_share() || !self.placeable_work() {
                return;
            }
            order.clear();
            order.extend(
                self.submitters
                    .iter()
                    .filter(|(_, queue)| !queue.groups.is_empty())
                    .map(|(submitter, queue)| (queue.running, *submitter)),
            );
            order.sort_unstable();
            let placed = order
                .iter()
                .any(|(_, submitter)| self.place_next_of(now, *submitter, out));
            if !placed {
                return;
            }
        }
    }

    /// Whether some queued task has a free slot among the peers that could run it.
    fn placeable_work(&self) -> bool {
        self.queued_by_requirement
            .keys()
            .any(|requirement| self.pool.capacity(*requirement) > 0)
    }

    /// While other coordinators have tasks waiting, this one takes no more than an equal share
    /// of the pool's slots. Its own finished runs free slots in its view first (before any
    /// heartbeat tells the others), so without this it would keep every slot it ever held.
    fn over_fair_share(&self) -> bool {
        let others = self.pool.waiting_coordinators() as u64;
        others > 0 && self.running >= (self.pool.slots_total() / (others + 1)).max(1)
    }

    /// Places the submitter's oldest task among the requirement sets that have room.
    fn place_next_of(
        &mut self,
        now: Millis,
        submitter: SubmitterId,
        out: &mut Vec<Action>,
    ) -> bool {
        let mut after = Bound::Unbounded;
        loop {
            let queue = &self.submitters[&submitter];
            let Some(requirement) = queue
                .groups
                .range((after, Bound::Unbounded))
                .map(|(r, _)| *r)
                .next()
            else {
                return false;
            };
            after = Bound::Excluded(requirement);
            if self.pool.capacity(requirement) == 0 {
                continue;
            }
            // Each entry is looked at once at most: a task that must wait for another peer goes
            // to the back, and the next one may take the free slot.
            let mut budget = self.submitters[&submitter].groups[&requirement].len();
            while let Some(task) = self.front(submitter, requirement) {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                self.pop_front(submitter, requirement);
                if !self.is_queued(task) {
                    continue;
                }
                if let Some(choice) = self.choose_for_retry(task) {
                    self.offer(now, task, choice, out);
                    return true;
                }
                self.push_back(submitter, requirement, task);
            }
        }
    }

    /// A retry goes to a peer that has not failed to run the task (nor handed it back); back to
    /// one that has only when no other qualified peer is left in the pool.
    fn choose_for_retry(&mut self, task: TaskId) -> Option<Choice> {
        let avoided = self.task(task).avoided();
        if avoided.is_empty() {
            return self.choose(task, &[]);
        }
        if let Some(choice) = self.choose(task, &avoided) {
            return Some(choice);
        }
        let requirement = self.task(task).requirement;
        let (qualified, _) = self.pool.qualified(requirement);
        let avoided_here = avoided
            .iter()
            .filter(|peer| self.pool.peer(**peer).is_some())
            .count() as u32;
        if qualified > avoided_here {
            return None;
        }
        self.choose(task, &[])
    }

    fn push_back(&mut self, submitter: SubmitterId, requirement: ReqId, task: TaskId) {
        self.submitters
            .get_mut(&submitter)
            .expect("known submitter")
            .groups
            .entry(requirement)
            .or_default()
            .push_back(task);
    }

    fn front(&self, submitter: SubmitterId, requirement: ReqId) -> Option<TaskId> {
        self.submitters[&submitter]
            .groups
            .get(&requirement)
            .and_then(|queue| queue.front().copied())
    }

    fn pop_front(&mut self, submitter: SubmitterId, requirement: ReqId) {
        let groups = &mut self
            .submitters
            .get_mut(&submitter)
            .expect("known submitter")
            .groups;
        let queue = groups.get_mut(&requirement).expect("known group");
        queue.pop_front();
        if queue.is_empty() {
            groups.remove(&requirement);
        }
    }

    /// Where a task stands and why, for `peerbuild status`; `None` once the task is done (its
    /// `Accept` or `Fail` said how) or its build has ended.
    pub fn status(&self, now: Millis, task: TaskId) -> Option<TaskStatus> {
        let state = self.live_task(task)?;
        match state.phase {
            Phase::Done => None,
            Phase::Waiting => {
                let tasks = &self.builds[&task.build].tasks;
                let on = (0..tasks.len() as u32)
                    .filter(|index| {
                        tasks[*index as usize].dependents.contains(&task.index)
                            && tasks[*index as usize].phase != Phase::Done
                    })
                    .map(|index| TaskId {
                        build: task.build,
                        index,
                    })
                    .collect();
                Some(TaskStatus::Waiting { on })
            }
            Phase::Queued { since } => {
                let (qualified, quarantined) = self.pool.qualified(state.requirement);
                Some(TaskStatus::Queued {
                    waited_ms: now.since(since),
                    qualified,
                    quarantined,
                    free_slots: self.pool.capacity(state.requirement),
                    yielding: self.over_fair_share(),
                    avoided: state.avoided(),
                })
            }
            Phase::Placed => {
                let runs = state
                    .runs
                    .iter()
                    .map(|run| {
                        let ran_ms = run.started.map(|started| now.since(started));
                        (run.attempt, run.peer, ran_ms)
                    })
                    .collect();
                let expected_ms = state.runs.first().and_then(|run| {
                    let class = self.pool.peer(run.peer)?.class;
                    self.pool.expected_ms(state.key, class)
                });
                Some(TaskStatus::Placed { runs, expected_ms })
            }
        }
    }

    /// Checks every internal invariant; the simulator calls this after every step. An error is a
    /// bug in the scheduler.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        let mut running: BTreeMap<SubmitterId, u32> = BTreeMap::new();
        let mut builds: BTreeMap<SubmitterId, u32> = BTreeMap::new();
        let mut pending = 0;
        let mut queued = 0;
        let mut queued_by_requirement: BTreeMap<ReqId, usize> = BTreeMap::new();
        for (build, state) in &self.builds {
            let mut unfinished = 0;
            *builds.entry(state.submitter).or_default() += 1;
            for (index, task) in state.tasks.iter().enumerate() {
                let id = TaskId {
                    build: *build,
                    index: index as u32,
                };
                *running.entry(state.submitter).or_default() += task.runs.len() as u32;
                let placed = task.phase == Phase::Placed;
                if placed == task.runs.is_empty() {
                    return Err(format!(
                        "{id}: {:?} with {} runs",
                        task.phase,
                        task.runs.len()
                    ));
                }
                if task.phase == Phase::Waiting && task.waiting_on == 0 {
                    return Err(format!("{id}: waiting on nothing"));
                }
                if task.phase != Phase::Done {
                    unfinished += 1;
                }
                if matches!(task.phase, Phase::Queued { .. }) {
                    queued += 1;
                    *queued_by_requirement.entry(task.requirement).or_default() += 1;
                }
                for run in &task.runs {
                    let view = self
                        .pool
                        .peer(run.peer)
                        .ok_or_else(|| format!("{id} runs on unknown {}", run.peer))?;
                    if !view.attempts.contains(&(id, run.attempt)) {
                        return Err(format!("{id} {} missing from {}", run.attempt, run.peer));
                    }
                }
            }
            if unfinished != state.unfinished {
                return Err(format!(
                    "{build}: {unfinished} unfinished, counted {}",
                    state.unfinished
                ));
            }
            pending += unfinished;
        }
        if pending != self.pending_tasks || queued != self.queued_tasks {
            return Err(format!(
                "pending {pending} and queued {queued}, counted {} and {}",
                self.pending_tasks, self.queued_tasks
            ));
        }
        let counted: BTreeMap<ReqId, usize> = self
            .queued_by_requirement
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect();
        if counted != queued_by_requirement {
            return Err(format!(
                "queued by requirement {queued_by_requirement:?}, counted {counted:?}"
            ));
        }
        let runs: u64 = running.values().map(|r| u64::from(*r)).sum();
        if runs != self.running {
            return Err(format!("{runs} runs, counted {}", self.running));
        }
        let known: BTreeMap<SubmitterId, u32> = self
            .submitters
            .iter()
            .map(|(s, q)| (*s, q.builds))
            .collect();
        if known != builds {
            return Err(format!(
                "builds per submitter {builds:?}, counted {known:?}"
            ));
        }
        for (submitter, queue) in &self.submitters {
            let counted = running.get(submitter).copied().unwrap_or(0);
            if counted != queue.running {
                return Err(format!(
                    "{submitter}: {counted} runs, counted {}",
                    queue.running
                ));
            }
        }
        Ok(())
    }
}
