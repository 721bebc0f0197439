//! The coordinator: the scheduler crate's placement engine ([`scheduler::Scheduler`]), driven by
//! this node. One task owns the engine; it feeds it the pool as the swarm sees it (every new
//! heartbeat, this node's own state, peers that left), the submissions of [`super::tasks`], and
//! what their runs report (accepted, declined, progress, finished), plus a tick for leases,
//! offer timeouts and queued timeouts. It carries the engine's actions to the build they concern
//! as [`Order`]s: the build's own task does the I/O (offers, relaying, artifacts) and reports
//! back. So every placement decision (labels, sandbox, free slots, inputs held, load, learned
//! durations, fair shares, retries elsewhere, quarantine) is the scheduler crate's, tested and
//! simulated there, and the node only translates.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::Digest;
use protocol::wire::{Enforcement, Heartbeat as WireHeartbeat, MAX_RUNNING};
use scheduler::{
    Action, Attempt, BuildId, BuildOutcome, BuildSpec, Capabilities, Config, Event, Explanation,
    FailReason, Guarantees, Heartbeat, Input, InputId, LossReason, Millis, PeerId, Requirements,
    SandboxKind, Scheduler, SubmitterId, TaskId, TaskKey, TaskSpec, TaskStatus, Unsatisfiable,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{debug, info, warn};

use super::view::PoolView;

/// How often the engine is told time passed and the pool view is read for news.
const TICK: Duration = Duration::from_millis(200);
/// Submissions and reports waiting for the engine.
const INBOX: usize = 1024;
/// Orders waiting for one build's task (a build gets a handful in its life).
pub const ORDERS: usize = 64;
/// The submitter every build of this node's API has: its owner (the API is theirs alone).
const OWNER: SubmitterId = SubmitterId(1);
/// How much longer than the node's own wait for an answer the engine waits for an offer.
const OFFER_MARGIN: Duration = Duration::from_secs(15);
/// How often a peer's capabilities may change in the engine's eyes (each new set of
/// capabilities is a constraint class the engine keeps).
const CAPABILITY_CHANGES: Duration = Duration::from_secs(60);
/// How long the engine remembers that a run ended, for the heartbeats that left before it did.
const ENDED_REMEMBERED: Duration = Duration::from_secs(10);
/// Peers away (left, not back) whose numbers the engine keeps, the last to leave; the others
/// are forgotten unless quarantined. One that is forgotten and comes back gets a new number, so
/// a live build's task that avoids it (its run failed there) no longer knows it: that takes
/// 1,024 other peers leaving during the build.
const DEPARTED_NAMED: usize = 1024;

/// A remote peer's capabilities as the engine knows them.
struct Known {
    capabilities: Arc<Capabilities>,
    /// When they last changed.
    changed: Instant,
    /// Whether the peer has listed its sandboxes (its probes ran) in any heartbeat yet.
    probed: bool,
}

/// What the engine tells a build's task to do.
#[derive(Debug)]
pub enum Order {
    /// Offer the build to `name` (this node's own peer id for a run here). `why` is the
    /// placement's explanation, for the user.
    Offer {
        attempt: Attempt,
        peer: PeerId,
        name: String,
        why: String,
        /// The offer's `task`: unique per coordinator process, short enough for heartbeats'
        /// lists of what a peer runs.
        task: String,
    },
    /// Stop this run (its peer was lost, or its lease ran out): its result no longer counts.
    Cancel { attempt: Attempt },
    /// Something the user should read (why the build waits).
    Note(String),
    /// A run was lost (`peer` gone, silent, failed or refusing): stop it if it still runs;
    /// the build is placed again.
    Lost {
        attempt: Attempt,
        peer: String,
        said: String,
    },
    /// This run's result is the build's result.
    Accept { attempt: Attempt },
    /// The build cannot run to a result: why.
    Fail(String),
    /// The engine is done with the build.
    Done,
}

/// What a submission needs from a peer, and what it carries.
pub struct Plan {
    /// The build's id, for the node's log.
    pub label: String,
    /// `--require LABEL=VALUE`; `os` and `arch` name the platform.
    pub requires: Vec<(String, String)>,
    /// The sandbox asked for (`None`: whichever the worker's owner runs builds in).
    pub sandbox: Option<String>,
    pub source: Digest,
    /// What makes runs of this build comparable across builds (durations are learned by it).
    pub key: u64,
    pub queued_timeout: Duration,
}

enum Inbox {
    Submit {
        plan: Plan,
        orders: mpsc::Sender<Order>,
        accepted: oneshot::Sender<BuildId>,
    },
    Event(Event),
}

/// The handle builds use to reach the engine.
#[derive(Clone)]
pub struct Coordinator {
    inbox: mpsc::Sender<Inbox>,
}

/// What the engine reads of this node.
pub struct Local {
    pub me: String,
    pub view: Arc<Mutex<PoolView>>,
    pub slots: Arc<Semaphore>,
    /// The tasks this node runs now (for any coordinator), by offer `task`.
    pub running: Arc<Mutex<BTreeSet<String>>>,
    /// Where the engine leaves how many tasks wait in its queue (heartbeats carry it).
    pub queued: Arc<AtomicU32>,
    pub lease: Duration,
}

impl Coordinator {
    /// Starts the engine's task.
    pub fn start(local: Local) -> Coordinator {
        let (inbox, received) = mpsc::channel(INBOX);
        tokio::spawn(Engine::new(local).run(received));
        Coordinator { inbox }
    }

    /// Hands a build to the engine; its orders arrive on `orders`.
    pub async fn submit(&self, plan: Plan, orders: mpsc::Sender<Order>) -> Result<BuildId, String> {
        let (accepted, answer) = oneshot::channel();
        let submit = Inbox::Submit {
            plan,
            orders,
            accepted,
        };
        // The engine's task ends only with the node, or on a bug (its log says which).
        let gone =
            || "the node's coordinator is not running (the node is stopping, or see its log)";
        if self.inbox.send(submit).await.is_err() {
            return Err(gone().to_owned());
        }
        answer.await.map_err(|_| gone().to_owned())
    }

    /// Reports what happened to a run (or a cancel).
    pub async fn report(&self, event: Event) {
        let _ = self.inbox.send(Inbox::Event(event)).await;
    }
}

/// The scheduler's peer numbers and the peer ids they stand for. A number is never given twice,
/// so one that outlives its peer's name here (in a late message) can name no other peer.
#[derive(Default)]
struct Names {
    numbers: HashMap<String, PeerId>,
    names: HashMap<PeerId, String>,
    given: u64,
    /// Peers that left and have not come back, with when they left (counted in departures):
    /// past [`DEPARTED_NAMED`] of them, those away longest are forgotten.
    away: HashMap<String, u64>,
    /// `away` by when they left.
    departures: BTreeMap<u64, String>,
    left: u64,
}

impl Names {
    fn number(&mut self, name: &str) -> PeerId {
        if let Some(number) = self.numbers.get(name) {
            return *number;
        }
        self.given += 1;
        let number = PeerId(self.given);
        self.numbers.insert(name.to_owned(), number);
        self.names.insert(number, name.to_owned());
        number
    }

    fn name(&self, number: PeerId) -> String {
        self.names
            .get(&number)
            .cloned()
            .unwrap_or_else(|| number.to_string())
    }

    /// Notes that a peer left (it has a number); [`Names::forget_departed`] forgets it in time.
    fn departed(&mut self, name: String) {
        self.left += 1;
        self.away.insert(name.clone(), self.left);
        self.departures.insert(self.left, name);
    }

    /// Notes that a peer is here: first heard, or back.
    fn arrived(&mut self, name: &str) {
        if let Some(left) = self.away.remove(name) {
            self.departures.remove(&left);
        }
    }

    /// Forgets the peers away longest, beyond [`DEPARTED_NAMED`] of them; but for those whose
    /// number `needed` says the scheduler still needs (the quarantine it keeps for a peer's
    /// return is kept by number), which stay in the place of others, as if they had just
    /// left. So peers coming and going leave behind a bounded number of names.
    fn forget_departed(&mut self, needed: impl Fn(PeerId) -> bool) {
        // Each peer away is looked at once at most.
        let mut looked = 0;
        while self.away.len() > DEPARTED_NAMED && looked < self.away.len() {
            looked += 1;
            let Some((_, name)) = self.departures.pop_first() else {
                break;
            };
            let number = self.numbers[&name];
            if needed(number) {
                self.departed(name);
                continue;
            }
            self.away.remove(&name);
            self.numbers.remove(&name);
            self.names.remove(&number);
        }
    }
}

struct Engine {
    local: Local,
    scheduler: Scheduler,
    started: Instant,
    /// Names this process's runs apart from an earlier one's (a restarted node numbers its
    /// builds from one again).
    incarnation: u64,
    names: Names,
    me: PeerId,
    builds: HashMap<BuildId, mpsc::Sender<Order>>,
    next_build: u64,
    /// When the last heartbeat of each remote peer that was fed to the engine arrived.
    fed: HashMap<String, Instant>,
    /// Offer `task` names of live runs (with the peer each is on), to read peers' lists of
    /// what they run.
    runs: HashMap<String, (TaskId, Attempt, PeerId)>,
    /// Runs that ended in the last [`ENDED_REMEMBERED`], by name, and when.
    ended: HashMap<String, Instant>,
    /// Each remote peer's capabilities as the engine knows them.
    capabilities: HashMap<PeerId, Known>,
    /// This node's own, as last fed.
    local_capabilities: Option<Arc<Capabilities>>,
    /// Each build's run names' prefix.
    prefixes: HashMap<BuildId, String>,
}

impl Engine {
    fn new(local: Local) -> Engine {
        let mut names = Names::default();
        let me = names.number(&local.me);
        let config = Config {
            lease_ms: local.lease.as_millis() as u64,
            // Past the node's own wait for an answer (which starts a moment later), so the
            // engine never gives up on an offer the build's task still waits on: a run it
            // forgot could not be stopped.
            offer_timeout_ms: (super::tasks::OFFER_TIMEOUT + OFFER_MARGIN).as_millis() as u64,
            max_attempts: super::tasks::MAX_ATTEMPTS,
            // A build may deploy or publish: never run a second copy of one on a hunch.
            straggler_percent: None,
            local_peer: Some(me),
            ..Config::default()
        };
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Engine {
            local,
            scheduler: Scheduler::new(config),
            started: Instant::now(),
            incarnation,
            names,
            me,
            builds: HashMap::new(),
            next_build: 1,
            fed: HashMap::new(),
            runs: HashMap::new(),
            ended: HashMap::new(),
            capabilities: HashMap::new(),
            local_capabilities: None,
            prefixes: HashMap::new(),
        }
    }

    fn now(&self) -> Millis {
        Millis(self.started.elapsed().as_millis() as u64)
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Inbox>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.read_pool();
        loop {
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(Inbox::Submit { plan, orders, accepted }) => {
                        let _ = accepted.send(self.submit(plan, orders));
                    }
                    Some(Inbox::Event(event)) => self.step(event),
                    None => return,
                },
                _ = tick.tick() => {
                    self.read_pool();
                    self.step(Event::Tick);
                }
            }
        }
    }

    fn submit(&mut self, plan: Plan, orders: mpsc::Sender<Order>) -> BuildId {
        // The pool as it is now, not as of the last tick: a peer heard a moment ago may be the
        // only one that can run this build, and a build no known peer can run fails at once.
        self.read_pool();
        let build = BuildId(self.next_build);
        self.next_build += 1;
        let prefix = format!("{}/{}/{}", self.local.me, self.incarnation, build.0);
        self.builds.insert(build, orders);
        self.prefixes.insert(build, prefix);
        let spec = BuildSpec {
            build,
            submitter: OWNER,
            tasks: vec![TaskSpec {
                key: TaskKey(plan.key),
                requirements: requirements(&plan),
                inputs: vec![Input {
                    id: input_id(&plan.source),
                    size_bytes: plan.source.size(),
                }],
                depends_on: Vec::new(),
                ignore_failure: false,
            }],
            queued_timeout_ms: plan.queued_timeout.as_millis() as u64,
        };
        debug!(build = %build, label = %plan.label, "build submitted to the scheduler");
        self.step(Event::Submit(spec));
        let task = TaskId { build, index: 0 };
        if let Some(TaskStatus::Queued { .. }) = self.scheduler.status(self.now(), task) {
            let why = self.queued(task);
            self.order(build, Order::Note(why));
        }
        build
    }

    /// Why a task waits, in peer ids.
    fn queued(&self, task: TaskId) -> String {
        match self.scheduler.status(self.now(), task) {
            Some(TaskStatus::Queued {
                qualified,
                quarantined,
                free_slots,
                avoided,
                ..
            }) => {
                let mut why = format!("waiting for a free slot: {qualified} peers can run it");
                if quarantined > 0 {
                    why.push_str(&format!(" ({quarantined} quarantined)"));
                }
                if free_slots == 0 {
                    why.push_str(", and every one is busy");
                } else if !avoided.is_empty() {
                    let avoided: Vec<String> =
                        avoided.iter().map(|p| self.names.name(*p)).collect();
                    why.push_str(&format!(", other than {}", avoided.join(", ")));
                }
                why
            }
            _ => "waiting for a free slot".to_owned(),
        }
    }

    /// Feeds the engine what changed in the pool: this node's own state, every heartbeat heard
    /// since the last look, and peers that are gone.
    fn read_pool(&mut self) {
        let (local, (present, heard)) = {
            let view = self.local.view.lock().unwrap_or_else(|e| e.into_inner());
            (view.local().clone(), view.placeable_since(&self.fed))
        };
        let queued = self.scheduler.stats().queued_tasks as u32;
        self.local.queued.store(queued, Ordering::Relaxed);
        // This node's own runs cannot vanish unseen: the engine's runs placed here are listed
        // until their builds' tasks report how they ended.
        let me = self.me;
        // The same `Arc` while nothing changed: the engine then knows the class at once.
        let own = capabilities(&local);
        let capabilities = match &self.local_capabilities {
            Some(known) if **known == own => known.clone(),
            _ => {
                let own = Arc::new(own);
                self.local_capabilities = Some(own.clone());
                own
            }
        };
        let heartbeat = Heartbeat {
            peer: me,
            capabilities,
            total_slots: local.slots_total,
            free_slots: (self.local.slots.available_permits() as u32).min(local.slots_total),
            load_permille: local.load_milli.min(1000),
            holds: Vec::new(),
            running: self
                .runs
                .values()
                .filter(|(_, _, peer)| *peer == me)
                .map(|(task, attempt, _)| (*task, *attempt))
                .collect(),
            queued_tasks: queued,
        };
        self.step(Event::Heartbeat(heartbeat));
        for (heartbeat, heard_at) in heard {
            if heartbeat.peer_id == self.local.me {
                continue;
            }
            if self
                .fed
                .insert(heartbeat.peer_id.clone(), heard_at)
                .is_none()
            {
                self.names.arrived(&heartbeat.peer_id);
            }
            let peer = self.names.number(&heartbeat.peer_id);
            let heartbeat = self.heartbeat(&heartbeat, peer);
            self.step(Event::Heartbeat(heartbeat));
        }
        self.ended.retain(|_, at| at.elapsed() < ENDED_REMEMBERED);
        let present: BTreeSet<String> = present.into_iter().collect();
        let gone: Vec<String> = self
            .fed
            .keys()
            .filter(|name| !present.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.fed.remove(&name);
            let peer = self.names.number(&name);
            self.capabilities.remove(&peer);
            info!(peer = %name, "peer gone: its runs are placed again");
            self.step(Event::PeerGone { peer });
            self.names.departed(name);
        }
        let scheduler = &self.scheduler;
        self.names
            .forget_departed(|number| scheduler.remembers(number));
    }

    /// A remote peer's heartbeat as the engine takes it: its slots clamped to what a node may
    /// have, its queue counted only up to its own slots (a peer that runs nothing has no say in
    /// fair shares), and a change of capabilities taken at most once a minute.
    fn heartbeat(&mut self, wire: &WireHeartbeat, peer: PeerId) -> Heartbeat {
        let total_slots = wire.slots_total.min(MAX_RUNNING as u32);
        let now = Instant::now();
        let heard = capabilities(wire);
        let probed = !wire.sandboxes.is_empty();
        let capabilities = match self.capabilities.get_mut(&peer) {
            Some(known) if *known.capabilities == heard => known.capabilities.clone(),
            // The first sandbox list a peer sends (its probes ran after its first heartbeat)
            // is taken at once: until then it was taken to offer every sandbox.
            Some(known) if probed && !known.probed => {
                known.capabilities = Arc::new(heard);
                known.changed = now;
                known.probed = true;
                known.capabilities.clone()
            }
            Some(known) if now.duration_since(known.changed) < CAPABILITY_CHANGES => {
                known.capabilities.clone()
            }
            _ => {
                let heard = Arc::new(heard);
                // A set without sandboxes (a restart, probes not run yet) earns the pass again:
                // taking such a set is itself limited to once a minute.
                self.capabilities.insert(
                    peer,
                    Known {
                        capabilities: heard.clone(),
                        changed: now,
                        probed,
                    },
                );
                heard
            }
        };
        // A run of this coordinator's that the heartbeat lists but that has ended here held its
        // slot when the heartbeat left, and the slot is free now (the worker frees it before
        // its last reply). Taken as used, it would keep the peer a slot fuller than it is until
        // its next heartbeat, and a batch whose members end just after a heartbeat would wait
        // that long for each of those slots.
        let ended = wire
            .running
            .iter()
            .filter(|task| self.ended.contains_key(*task))
            .count();
        let ended = u32::try_from(ended).unwrap_or(u32::MAX);
        // Never more free than the runs it lists leave: one that ended may already be counted
        // free (the worker lists a run until the coordinator closes its stream).
        let listed = u32::try_from(wire.running.len()).unwrap_or(u32::MAX);
        let unlisted = total_slots.saturating_sub(listed.saturating_sub(ended));
        let said = wire.slots_free.min(total_slots);
        Heartbeat {
            peer,
            capabilities,
            total_slots,
            free_slots: said.saturating_add(ended).min(unlisted).max(said),
            load_permille: wire.load_milli.min(1000),
            holds: Vec::new(),
            running: wire
                .running
                .iter()
                .filter_map(|task| self.runs.get(task))
                .filter(|(_, _, on)| *on == peer)
                .map(|(task, attempt, _)| (*task, *attempt))
                .collect(),
            queued_tasks: wire.queue_length.min(total_slots),
        }
    }

    fn step(&mut self, event: Event) {
        if let Event::OfferDeclined { task, attempt, .. } = &event {
            // A decline: the run never held a slot there.
            self.forget_run(*task, *attempt, false);
        }
        let now = self.now();
        let actions = self.scheduler.step(now, event);
        for action in actions {
            self.carry_out(action);
        }
    }

    fn order(&mut self, build: BuildId, order: Order) {
        let Some(orders) = self.builds.get(&build) else {
            return;
        };
        if orders.try_send(order).is_err() {
            // The build's task is gone (its submitter left) or not reading: it is cancelled.
            warn!(build = %build, "a build's task stopped taking orders; cancelling it");
            self.builds.remove(&build);
            let now = self.now();
            for action in self.scheduler.step(now, Event::Cancel { build }) {
                self.carry_out(action);
            }
        }
    }

    fn run_name(&self, task: TaskId, attempt: Attempt) -> Option<String> {
        let prefix = self.prefixes.get(&task.build)?;
        Some(format!("{prefix}#{}", attempt.0))
    }

    fn carry_out(&mut self, action: Action) {
        debug!(%action, "scheduler");
        match action {
            Action::Offer {
                task,
                attempt,
                peer,
                explanation,
            } => {
                let Some(run) = self.run_name(task, attempt) else {
                    return;
                };
                self.runs.insert(run.clone(), (task, attempt, peer));
                let name = self.names.name(peer);
                let why = explain(&explanation);
                self.order(
                    task.build,
                    Order::Offer {
                        attempt,
                        peer,
                        name,
                        why,
                        task: run,
                    },
                );
            }
            Action::Cancel { task, attempt, .. } => {
                // The worker may still be stopping it, holding its slot.
                self.forget_run(task, attempt, false);
                self.order(task.build, Order::Cancel { attempt });
            }
            Action::Rerun {
                task,
                lost,
                peer,
                reason,
            } => {
                // Ended by the worker's own last reply (an error, a refusal, a handback), its
                // slot was freed first; lost any other way, it may still hold it.
                let replied = matches!(
                    reason,
                    LossReason::Error { .. } | LossReason::HandedBack { .. }
                );
                self.forget_run(task, lost, replied);
                let name = self.names.name(peer);
                warn!(peer = %name, reason = %reason, "run lost; placing the build again");
                let said = format!(
                    "peer {name} was lost while running the build ({}); running it again on another peer",
                    loss(&reason)
                );
                self.order(
                    task.build,
                    Order::Lost {
                        attempt: lost,
                        peer: name,
                        said,
                    },
                );
            }
            Action::Accept { task, attempt, .. } => {
                self.forget_run(task, attempt, true);
                self.order(task.build, Order::Accept { attempt });
            }
            Action::Fail { task, reason } => {
                let why = self.failure(&reason);
                self.order(task.build, Order::Fail(why));
            }
            Action::Quarantine {
                peer,
                until,
                strikes,
            } => {
                let minutes = until.since(self.now()) / 60_000;
                warn!(peer = %self.names.name(peer), strikes, minutes, "peer quarantined: its runs failed where others succeeded, or it refused work it offered");
            }
            Action::BuildFinished { build, outcome } => {
                if let BuildOutcome::Rejected(reason) = &outcome {
                    self.order(build, Order::Fail(format!("the node refused it: {reason}")));
                }
                self.order(build, Order::Done);
                self.builds.remove(&build);
                self.prefixes.remove(&build);
                self.forget_runs(|(task, _, _)| task.build == build, false);
            }
        }
    }

    fn forget_run(&mut self, task: TaskId, attempt: Attempt, slot_freed: bool) {
        self.forget_runs(|(t, a, _)| (*t, *a) == (task, attempt), slot_freed);
    }

    /// Forgets the runs `ended` picks. `slots_freed`: their workers ended them with a last
    /// reply, sent once the slot was free; such runs are remembered for a while (see
    /// [`Engine::heartbeat`]).
    fn forget_runs(
        &mut self,
        ended: impl Fn(&(TaskId, Attempt, PeerId)) -> bool,
        slots_freed: bool,
    ) {
        let now = Instant::now();
        let ended_runs = &mut self.ended;
        self.runs.retain(|name, run| {
            if !ended(run) {
                return true;
            }
            if slots_freed {
                ended_runs.insert(name.clone(), now);
            }
            false
        });
    }

    /// A failure as the user reads it, peers by their ids.
    fn failure(&self, reason: &FailReason) -> String {
        match reason {
            FailReason::Unsatisfiable(why) => self.unsatisfiable(why),
            FailReason::RetriesExhausted { attempts, last } => {
                format!(
                    "the build was lost {attempts} times; the last time {}",
                    loss(last)
                )
            }
            other => other.to_string(),
        }
    }

    fn unsatisfiable(&self, why: &Unsatisfiable) -> String {
        let mut text = format!(
            "no peer can run this build (of {} in the pool)",
            why.pool_size
        );
        for (index, miss) in why.closest.iter().enumerate() {
            text.push_str(if index == 0 { "; closest: " } else { "; " });
            let peers: Vec<String> = miss.peers.iter().map(|p| self.names.name(*p)).collect();
            text.push_str(&peers.join(", "));
            let more = (miss.peer_count as usize).saturating_sub(miss.peers.len());
            if more > 0 {
                text.push_str(&format!(" and {more} more"));
            }
            let unmet: Vec<String> = miss.unmet.iter().map(|u| u.to_string()).collect();
            let verb = if miss.peer_count == 1 {
                "lacks"
            } else {
                "lack"
            };
            text.push_str(&format!(" {verb} {}", unmet.join(", ")));
        }
        text
    }
}

/// Why a run was lost, as the user reads it.
fn loss(reason: &LossReason) -> String {
    match reason {
        LossReason::Error { message } | LossReason::HandedBack { message } => message.clone(),
        LossReason::LeaseExpired { silent_ms } => {
            format!("its lease ran out: silent for {} ms", silent_ms)
        }
        other => other.to_string(),
    }
}

/// The placement's reasons, without the scheduler's peer number (the user reads peer ids).
fn explain(explanation: &Explanation) -> String {
    let mut why = format!(
        "{} of {} slots free, load {:.2}",
        explanation.free_slots,
        explanation.total_slots,
        f64::from(explanation.load_permille) / 1000.0
    );
    if let Some(held) = explanation.held_permille
        && held > 0
    {
        why.push_str(&format!(", holds {}% of the source", held / 10));
    }
    if let Some(expected) = explanation.expected_ms {
        why.push_str(&format!(", expected {:.1} s", expected as f64 / 1000.0));
    }
    why.push_str(&format!(", best of {}", explanation.candidates));
    why
}

/// A submission's hard constraints. `os` and `arch` among `--require` name the platform; the
/// rest are labels. Network is the worker owner's to refuse (its `peerbuild run` says so).
fn requirements(plan: &Plan) -> Requirements {
    let mut requirements = Requirements {
        sandbox: plan.sandbox.as_deref().and_then(SandboxKind::from_name),
        network: false,
        ..Requirements::default()
    };
    for (label, value) in &plan.requires {
        match label.as_str() {
            "os" => requirements.os = Some(value.clone()),
            "arch" => requirements.arch = Some(value.clone()),
            _ => {
                requirements.labels.insert(label.clone(), value.clone());
            }
        }
    }
    requirements
}

/// What a heartbeat says a peer offers.
fn capabilities(heartbeat: &WireHeartbeat) -> Capabilities {
    // A node lists its sandboxes once its probes ran: until then it may run any, as far as
    // anyone knows (its `peerbuild run` refuses what its owner does not allow).
    if heartbeat.sandboxes.is_empty() {
        let kinds = [
            SandboxKind::Namespace,
            SandboxKind::Docker,
            SandboxKind::Wasm,
            SandboxKind::Host,
        ];
        return Capabilities {
            sandboxes: kinds.map(|kind| (kind, Guarantees::NONE)).into(),
            ..capabilities_but_sandboxes(heartbeat)
        };
    }
    let sandboxes = heartbeat
        .sandboxes
        .iter()
        .filter_map(|sandbox| {
            let kind = SandboxKind::from_name(&sandbox.kind)?;
            let g = &sandbox.guarantees;
            let mut guarantees = Guarantees::NONE;
            for (enforcement, bit) in [
                (g.process_tree_kill, Guarantees::TIME),
                (g.memory, Guarantees::MEMORY),
                (g.process_count, Guarantees::PROCESSES),
            ] {
                if enforcement == Enforcement::Enforced {
                    guarantees = guarantees.union(bit);
                }
            }
            Some((kind, guarantees))
        })
        .collect();
    Capabilities {
        sandboxes,
        ..capabilities_but_sandboxes(heartbeat)
    }
}

fn capabilities_but_sandboxes(heartbeat: &WireHeartbeat) -> Capabilities {
    let mut runtimes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for runtime in &heartbeat.runtimes {
        runtimes
            .entry(runtime.name.clone())
            .or_default()
            .insert(runtime.version.clone());
    }
    Capabilities {
        os: heartbeat.os.clone(),
        arch: heartbeat.arch.clone(),
        labels: heartbeat.labels.iter().cloned().collect(),
        runtimes,
        sandboxes: BTreeMap::new(),
        network: true,
    }
}

fn input_id(digest: &Digest) -> InputId {
    let hash = digest.hash();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    InputId(u64::from_le_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::wire::{Guarantees as WireGuarantees, Sandbox};

    fn wire(peer: &str, labels: &[(&str, &str)]) -> WireHeartbeat {
        let all = WireGuarantees {
            filesystem: Enforcement::Enforced,
            network: Enforcement::Enforced,
            processes: Enforcement::Enforced,
            memory: Enforcement::BestEffort,
            cpu: Enforcement::BestEffort,
            process_count: Enforcement::Enforced,
            process_tree_kill: Enforcement::Enforced,
        };
        WireHeartbeat {
            peer_id: peer.into(),
            slots_total: 2,
            slots_free: 2,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            os: "linux".into(),
            arch: "x86_64".into(),
            sandboxes: vec![Sandbox {
                kind: "namespace".into(),
                guarantees: all,
            }],
            ..WireHeartbeat::default()
        }
    }

    fn engine(remote: &WireHeartbeat) -> Engine {
        let mut local = wire("me", &[]);
        local.slots_total = 1;
        local.slots_free = 1;
        let mut view = PoolView::new(local);
        view.heard(remote.clone(), Instant::now());
        view.connected(&remote.peer_id, "/ip4/127.0.0.1/tcp/1".into());
        Engine::new(Local {
            me: "me".into(),
            view: Arc::new(Mutex::new(view)),
            slots: Arc::new(Semaphore::new(1)),
            running: Arc::default(),
            queued: Arc::default(),
            lease: Duration::from_secs(20),
        })
    }

    fn gpu_plan() -> Plan {
        Plan {
            label: "project:1".into(),
            requires: vec![("gpu".into(), "a100".into())],
            sandbox: None,
            source: Digest::of(b"source"),
            key: 7,
            queued_timeout: Duration::from_secs(60),
        }
    }

    fn drain(orders: &mut mpsc::Receiver<Order>) -> Vec<Order> {
        std::iter::from_fn(|| orders.try_recv().ok()).collect()
    }

    /// A worker hears from peer B again; `running` is what its heartbeat lists.
    fn beat(engine: &mut Engine, remote: &WireHeartbeat, running: &[String]) {
        let heartbeat = WireHeartbeat {
            running: running.to_vec(),
            ..remote.clone()
        };
        // A new arrival time each beat: the engine feeds only heartbeats it has not seen.
        std::thread::sleep(Duration::from_millis(2));
        engine
            .local
            .view
            .lock()
            .unwrap()
            .heard(heartbeat, Instant::now());
        engine.read_pool();
    }

    /// A run placed and started, as its offer named it.
    struct Placed {
        task: TaskId,
        attempt: Attempt,
        peer: PeerId,
        name: String,
        run: String,
    }

    /// Submits `plan`, expects one offer, and has the run start there; returns the run and
    /// the build's orders, for what comes after.
    fn place_and_start(engine: &mut Engine, plan: Plan) -> (Placed, mpsc::Receiver<Order>) {
        let (orders_to, mut orders) = mpsc::channel(ORDERS);
        let build = engine.submit(plan, orders_to);
        let offered = drain(&mut orders);
        let [
            Order::Offer {
                attempt,
                peer,
                name,
                task: run,
                ..
            },
        ] = &offered[..]
        else {
            panic!("one offer: {offered:?}");
        };
        let placed = Placed {
            task: TaskId { build, index: 0 },
            attempt: *attempt,
            peer: *peer,
            name: name.clone(),
            run: run.clone(),
        };
        engine.step(Event::Started {
            task: placed.task,
            attempt: placed.attempt,
            peer: placed.peer,
        });
        (placed, orders)
    }

    #[test]
    fn a_run_missing_from_two_of_its_workers_heartbeats_is_placed_again() {
        let remote = wire("peer-b", &[("gpu", "a100")]);
        let mut engine = engine(&remote);
        engine.read_pool();
        let (placed, mut orders) = place_and_start(&mut engine, gpu_plan());
        assert_eq!(placed.name, "peer-b", "only peer B has the label");
        let (attempt, run) = (placed.attempt, placed.run);
        // Listed: the run holds, however often the worker beats.
        for _ in 0..3 {
            beat(&mut engine, &remote, std::slice::from_ref(&run));
        }
        assert!(drain(&mut orders).is_empty());
        // Missing once may be a heartbeat sent before the run began; twice, it is gone.
        beat(&mut engine, &remote, &[]);
        assert!(drain(&mut orders).is_empty());
        beat(&mut engine, &remote, &[]);
        let after = drain(&mut orders);
        assert!(
            matches!(&after[..], [Order::Lost { peer, attempt: lost, .. }, Order::Offer { attempt: next, .. }] if peer == "peer-b" && *lost == attempt && *next != attempt),
            "the lost run is named, so its task stops it: {after:?}"
        );
    }

    #[test]
    fn a_slot_whose_run_ended_after_the_heartbeat_left_is_free() {
        let mut remote = wire("peer-b", &[("gpu", "a100")]);
        remote.slots_total = 1;
        remote.slots_free = 1;
        let mut engine = engine(&remote);
        engine.read_pool();
        let (placed, _) = place_and_start(&mut engine, gpu_plan());
        engine.step(Event::Finished {
            task: placed.task,
            attempt: placed.attempt,
            peer: placed.peer,
            outcome: scheduler::TaskOutcome::Succeeded,
        });
        // Peer B's heartbeat, sent while the run still held its one slot, arrives after.
        beat(
            &mut engine,
            &WireHeartbeat {
                slots_free: 0,
                ..remote.clone()
            },
            std::slice::from_ref(&placed.run),
        );
        let (orders_to, mut orders) = mpsc::channel(ORDERS);
        engine.submit(gpu_plan(), orders_to);
        let next = drain(&mut orders);
        assert!(
            matches!(&next[..], [Order::Offer { name, .. }] if name == "peer-b"),
            "the next build goes to the slot that is free now: {next:?}"
        );
    }

    #[test]
    fn a_run_on_this_node_is_never_taken_for_vanished() {
        let remote = wire("peer-b", &[]);
        let mut engine = engine(&remote);
        engine.read_pool();
        let plan = Plan {
            requires: Vec::new(),
            ..gpu_plan()
        };
        // Peer B's heartbeat says it is busy, so the build is placed here.
        beat(
            &mut engine,
            &WireHeartbeat {
                slots_free: 0,
                ..remote.clone()
            },
            &[],
        );
        let (placed, mut orders) = place_and_start(&mut engine, plan);
        assert_eq!(placed.name, "me");
        // Its task has not reported the end yet (the node's `running` set is empty by then):
        // however many ticks pass, the run stands.
        for _ in 0..5 {
            engine.read_pool();
        }
        assert!(drain(&mut orders).is_empty());
    }

    #[test]
    fn a_heartbeat_claiming_absurd_slots_is_clamped() {
        let mut remote = wire("peer-b", &[("gpu", "a100")]);
        remote.slots_total = u32::MAX;
        remote.slots_free = u32::MAX;
        remote.queue_length = u32::MAX;
        let mut engine = engine(&remote);
        engine.read_pool();
        let (orders_to, mut orders) = mpsc::channel(ORDERS);
        engine.submit(gpu_plan(), orders_to);
        assert!(matches!(&drain(&mut orders)[..], [Order::Offer { .. }]));
        // It now says every slot is taken: the engine's arithmetic must hold.
        beat(
            &mut engine,
            &WireHeartbeat {
                slots_free: 0,
                ..remote.clone()
            },
            &[],
        );
        let taken = engine.heartbeat(&remote, PeerId(2));
        assert_eq!(taken.total_slots, MAX_RUNNING as u32);
        assert!(taken.queued_tasks <= taken.total_slots);
    }

    #[test]
    fn peers_away_longest_are_forgotten_unless_quarantined() {
        let mut names = Names::default();
        // A peer is numbered when first heard (and noted as here), as `read_pool` does.
        let hear = |names: &mut Names, name: &str| {
            names.arrived(name);
            names.number(name)
        };
        let me = hear(&mut names, "me");
        let flaky = hear(&mut names, "flaky");
        let back = hear(&mut names, "back");
        let flapping = hear(&mut names, "flapping");
        names.departed("flaky".into());
        names.departed("back".into());
        // A peer that left, and came back: it is not away.
        hear(&mut names, "back");
        for p in 0..3 * DEPARTED_NAMED {
            let name = format!("peer-{p}");
            hear(&mut names, &name);
            names.departed(name);
            // Another comes and goes all the while: one peer, not a crowd pushing others out.
            names.departed("flapping".into());
            hear(&mut names, "flapping");
            names.forget_departed(|number| number == flaky);
        }
        // This node, the two peers here, and as many away as are named: the quarantined one,
        // then the last to leave.
        assert_eq!(names.names.len(), 3 + DEPARTED_NAMED);
        assert_eq!(names.numbers.len(), names.names.len());
        assert_eq!(names.away.len(), DEPARTED_NAMED);
        assert_eq!(names.departures.len(), DEPARTED_NAMED);
        assert_eq!(names.name(me), "me");
        assert_eq!(names.name(flaky), "flaky");
        assert_eq!(hear(&mut names, "back"), back);
        assert_eq!(hear(&mut names, "flapping"), flapping);
        let first_named = 3 * DEPARTED_NAMED - (DEPARTED_NAMED - 1);
        assert!(names.numbers.contains_key(&format!("peer-{first_named}")));
        assert!(
            !names
                .numbers
                .contains_key(&format!("peer-{}", first_named - 1))
        );
        // A forgotten peer that returns gets a number never given before.
        let given = names.given;
        let again = hear(&mut names, "peer-0");
        assert_eq!(again, PeerId(given + 1));
        assert_eq!(names.name(again), "peer-0");
    }

    #[test]
    fn a_peer_heard_since_the_last_tick_can_take_the_build() {
        let remote = wire("peer-b", &[("gpu", "a100")]);
        // The engine has not looked at the view since peer B joined it.
        let mut engine = engine(&remote);
        let (orders_to, mut orders) = mpsc::channel(ORDERS);
        engine.submit(gpu_plan(), orders_to);
        let said = drain(&mut orders);
        assert!(
            matches!(&said[..], [Order::Offer { name, .. }] if name == "peer-b"),
            "{said:?}"
        );
    }

    #[test]
    fn a_build_no_peer_can_run_fails_at_once_naming_the_peers() {
        let remote = wire("peer-b", &[("gpu", "t4")]);
        let mut engine = engine(&remote);
        engine.read_pool();
        let (orders_to, mut orders) = mpsc::channel(ORDERS);
        engine.submit(gpu_plan(), orders_to);
        let said = drain(&mut orders);
        let [Order::Fail(why), Order::Done] = &said[..] else {
            panic!("a failure: {said:?}");
        };
        assert!(
            why.starts_with("no peer can run this build (of 2 in the pool)")
                && why.contains("me, peer-b lack label gpu=a100"),
            "{why}"
        );
    }

    #[test]
    fn an_ended_run_listed_after_its_slot_was_freed_is_not_counted_twice() {
        let mut remote = wire("peer-b", &[]);
        remote.slots_total = 4;
        let mut engine = engine(&remote);
        engine.ended.insert("me/1/1#1".into(), Instant::now());
        // The worker freed the ended run's slot (3 free), but lists it until the coordinator
        // closes its stream, beside a run still going.
        let heartbeat = WireHeartbeat {
            slots_free: 3,
            running: vec!["me/1/1#1".into(), "me/1/2#1".into()],
            ..remote.clone()
        };
        assert_eq!(engine.heartbeat(&heartbeat, PeerId(2)).free_slots, 3);
        // Sent while the ended run still held its slot: that slot is free now.
        let earlier = WireHeartbeat {
            slots_free: 2,
            ..heartbeat
        };
        assert_eq!(engine.heartbeat(&earlier, PeerId(2)).free_slots, 3);
    }

    #[test]
    fn a_peers_first_sandbox_list_is_taken_at_once() {
        // Peer B's first heartbeat left before its sandbox probes ran.
        let probed = wire("peer-b", &[("gpu", "a100")]);
        let early = WireHeartbeat {
            sandboxes: Vec::new(),
            ..probed.clone()
        };
        let mut engine = engine(&early);
        engine.read_pool();
        // Seconds later it lists them: namespace only. A build that needs docker cannot go
        // there (the once-a-minute limit on changes does not hold the list back).
        let needs_docker = |engine: &mut Engine| {
            let (orders_to, mut orders) = mpsc::channel(ORDERS);
            let plan = Plan {
                sandbox: Some("docker".into()),
                ..gpu_plan()
            };
            engine.submit(plan, orders_to);
            drain(&mut orders)
        };
        beat(&mut engine, &probed, &[]);
        let said = needs_docker(&mut engine);
        assert!(
            matches!(&said[..], [Order::Fail(_), Order::Done]),
            "no peer offers docker: {said:?}"
        );
        // The pass is used once: a change back within the minute waits.
        beat(&mut engine, &early, &[]);
        let said = needs_docker(&mut engine);
        assert!(
            matches!(&said[..], [Order::Fail(_), Order::Done]),
            "{said:?}"
        );
    }

    #[test]
    fn a_heartbeat_becomes_capabilities_the_scheduler_checks() {
        let capabilities = capabilities(&wire("a", &[("gpu", "a100")]));
        assert_eq!(capabilities.labels["gpu"], "a100");
        assert_eq!(
            capabilities.sandboxes[&SandboxKind::Namespace],
            Guarantees::TIME.union(Guarantees::PROCESSES)
        );
        let plan = Plan {
            label: "b".into(),
            requires: vec![("os".into(), "linux".into()), ("gpu".into(), "a100".into())],
            sandbox: None,
            source: Digest::of(b"x"),
            key: 1,
            queued_timeout: Duration::from_secs(1),
        };
        let wanted = requirements(&plan);
        assert_eq!(wanted.os.as_deref(), Some("linux"));
        assert!(!wanted.labels.contains_key("os"));
        assert!(wanted.satisfied_by(&capabilities));
        let other = super::capabilities(&wire("b", &[("gpu", "t4")]));
        assert!(!wanted.satisfied_by(&other));
        let docker = Plan {
            sandbox: Some("docker".into()),
            ..plan
        };
        assert!(!requirements(&docker).satisfied_by(&capabilities));
    }
}
