//! A deterministic simulation of a pool: seeded virtual peers (slots, speeds, caches, failures,
//! partitions, joins) and coordinators running [`Scheduler`]s, driven through simulated time.
//! Every invariant is checked after every step; a failure names its seed, and the same seed
//! replays the same run exactly (in the spirit of TigerBeetle's VOPR).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use crate::ids::{Attempt, BuildId, InputId, Millis, PeerId, SubmitterId, TaskId, TaskKey};
use crate::model::{
    Action, BuildOutcome, BuildSpec, Capabilities, DeclineReason, Event, FailReason, Guarantees,
    Heartbeat, Input, Requirements, SandboxKind, TaskOutcome, TaskSpec,
};
use crate::rng::Rng;
use crate::scheduler::{Config, Scheduler};

/// Trouble a scenario injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Peers crash (some saying goodbye, some going silent), come back, and new ones join.
    Churn,
    /// Peers are cut off from the coordinators for a while, then heal.
    Partitions,
    /// One peer runs far slower than its class usually does.
    SlowPeer,
    /// One peer's heartbeats claim every slot free, no load, and every input held.
    LyingHeartbeat,
    /// Some tasks require a label no peer has.
    Unsatisfiable,
    /// One peer errors on every run, so its runs succeed only elsewhere.
    FlakyPeer,
    /// Some builds are cancelled while they run.
    Cancels,
}

/// What the coordinators submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Each coordinator submits random builds within the scenario's ranges.
    Random,
    /// The first coordinator submits one big batch, and a moment later the second submits a
    /// small build: the small one must not wait for the whole batch.
    BigAndSmall,
}

/// A family of simulated runs; each seed draws its own pool and workload from these ranges.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub peers: (u64, u64),
    pub slots: (u64, u64),
    /// Thousandths of the nominal speed.
    pub speed_permille: (u64, u64),
    pub coordinators: u64,
    pub builds_per_coordinator: (u64, u64),
    pub tasks_per_build: (u64, u64),
    pub task_ms: (u64, u64),
    pub latency_ms: (u64, u64),
    pub heartbeat_ms: u64,
    pub tick_ms: u64,
    /// Builds are submitted from this time on, within `submit_spread_ms`.
    pub first_submit_ms: u64,
    pub submit_spread_ms: u64,
    /// The size of a project's shared input (its source tree and caches), and of each task's
    /// own input.
    pub source_bytes: u64,
    pub task_input_bytes: u64,
    /// Distinct projects; builds of the same project share inputs and task keys.
    pub projects: u64,
    /// Inputs a peer's cache keeps (oldest evicted first).
    pub cache_inputs: usize,
    /// Chance a task's own commands fail (a build failure, not the peer's).
    pub fail_percent: u64,
    /// Peers of several capability kinds, and tasks requiring them.
    pub mixed_capabilities: bool,
    /// Random dependencies between a build's tasks.
    pub dependencies: bool,
    pub workload: Workload,
    pub faults: Vec<Fault>,
    /// The run fails if any build has not ended by then.
    pub horizon_ms: u64,
    pub config: Config,
}

impl Scenario {
    /// A small, healthy pool: the baseline the fault scenarios add to.
    pub fn steady() -> Scenario {
        Scenario {
            name: "steady",
            peers: (4, 8),
            slots: (1, 4),
            speed_permille: (500, 1500),
            coordinators: 2,
            builds_per_coordinator: (1, 4),
            tasks_per_build: (1, 6),
            task_ms: (500, 8_000),
            latency_ms: (1, 20),
            heartbeat_ms: 2_000,
            tick_ms: 500,
            first_submit_ms: 0,
            submit_spread_ms: 20_000,
            source_bytes: 50_000_000,
            task_input_bytes: 20_000_000,
            projects: 3,
            cache_inputs: 12,
            fail_percent: 5,
            mixed_capabilities: true,
            dependencies: true,
            workload: Workload::Random,
            faults: Vec::new(),
            horizon_ms: 3_600_000,
            config: Config::default(),
        }
    }

    fn with(name: &'static str, faults: &[Fault]) -> Scenario {
        Scenario {
            name,
            faults: faults.to_vec(),
            ..Scenario::steady()
        }
    }

    pub fn churn() -> Scenario {
        Scenario::with("churn", &[Fault::Churn])
    }

    /// Churn with the random placement baseline, so the benchmarks' baseline is as correct as
    /// the real policy.
    pub fn churn_random() -> Scenario {
        Scenario {
            name: "churn-random",
            config: Config {
                policy: crate::pool::Policy::Random,
                ..Config::default()
            },
            ..Scenario::churn()
        }
    }

    pub fn partitions() -> Scenario {
        Scenario::with("partitions", &[Fault::Partitions])
    }

    pub fn slow_peer() -> Scenario {
        Scenario {
            // Repeated builds of few projects, so durations are learned and a straggler shows.
            projects: 1,
            builds_per_coordinator: (3, 6),
            ..Scenario::with("slow-peer", &[Fault::SlowPeer])
        }
    }

    pub fn lying_heartbeat() -> Scenario {
        Scenario::with("lying-heartbeat", &[Fault::LyingHeartbeat])
    }

    pub fn unsatisfiable() -> Scenario {
        Scenario::with("unsatisfiable", &[Fault::Unsatisfiable])
    }

    pub fn flaky_peer() -> Scenario {
        Scenario {
            projects: 1,
            builds_per_coordinator: (3, 6),
            ..Scenario::with("flaky-peer", &[Fault::FlakyPeer])
        }
    }

    /// DESIGN.md's fan-out target: 24 one-second tasks over 4 peers x 2 slots, ideal 3 s.
    pub fn fan_out(latency_ms: u64) -> Scenario {
        Scenario {
            name: "fan-out",
            peers: (4, 4),
            slots: (2, 2),
            speed_permille: (1000, 1000),
            coordinators: 1,
            builds_per_coordinator: (1, 1),
            tasks_per_build: (24, 24),
            task_ms: (1000, 1000),
            latency_ms: (latency_ms, latency_ms),
            // Submitted once every peer has announced itself.
            first_submit_ms: 3_000,
            submit_spread_ms: 1,
            source_bytes: 0,
            task_input_bytes: 0,
            fail_percent: 0,
            mixed_capabilities: false,
            dependencies: false,
            ..Scenario::steady()
        }
    }

    /// Repeated builds of a few projects on a pool with small caches: how often the chosen peer
    /// already holds a task's inputs.
    pub fn repeated_builds(policy: crate::pool::Policy) -> Scenario {
        Scenario {
            name: "repeated-builds",
            peers: (20, 20),
            slots: (2, 2),
            speed_permille: (1000, 1000),
            coordinators: 1,
            builds_per_coordinator: (300, 300),
            tasks_per_build: (1, 3),
            task_ms: (5_000, 20_000),
            submit_spread_ms: 1_200_000,
            first_submit_ms: 3_000,
            projects: 30,
            cache_inputs: 8,
            fail_percent: 0,
            mixed_capabilities: false,
            dependencies: false,
            config: Config {
                policy,
                ..Config::default()
            },
            ..Scenario::steady()
        }
    }

    /// A big batch on one coordinator, a small build on another (DESIGN.md, "Scheduling").
    pub fn big_and_small() -> Scenario {
        Scenario {
            name: "big-and-small",
            peers: (3, 6),
            coordinators: 2,
            tasks_per_build: (40, 40),
            task_ms: (4_000, 6_000),
            first_submit_ms: 3_000,
            fail_percent: 0,
            mixed_capabilities: false,
            dependencies: false,
            workload: Workload::BigAndSmall,
            ..Scenario::steady()
        }
    }

    /// Everything at once.
    pub fn mayhem() -> Scenario {
        Scenario::with(
            "mayhem",
            &[
                Fault::Churn,
                Fault::Partitions,
                Fault::SlowPeer,
                Fault::LyingHeartbeat,
                Fault::Unsatisfiable,
                Fault::FlakyPeer,
                Fault::Cancels,
            ],
        )
    }

    /// Everything at once, with room for two constraint classes only: peers of every kind
    /// coming and going make classes take each other's places all the time.
    pub fn few_classes() -> Scenario {
        Scenario {
            name: "few-classes",
            config: Config {
                max_classes: 2,
                ..Config::default()
            },
            ..Scenario::mayhem()
        }
    }

    /// Every scenario the test suite runs, by name.
    pub fn all() -> Vec<Scenario> {
        vec![
            Scenario::steady(),
            Scenario::churn(),
            Scenario::churn_random(),
            Scenario::partitions(),
            Scenario::slow_peer(),
            Scenario::lying_heartbeat(),
            Scenario::unsatisfiable(),
            Scenario::flaky_peer(),
            Scenario::with("cancels", &[Fault::Cancels]),
            Scenario::big_and_small(),
            Scenario::mayhem(),
            Scenario::few_classes(),
        ]
    }
}

/// Every simulated build gets this queued timeout, so a task waiting on a partitioned-away class
/// ends in bounded time.
const QUEUED_TIMEOUT_MS: u64 = 120_000;

/// The node a coordinator runs on: a peer with no slots, outside the workers' id range.
fn coordinator_peer(coordinator: usize) -> PeerId {
    PeerId(1_000_000 + coordinator as u64)
}

/// What a run measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub builds: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub rejected: u64,
    pub offers: u64,
    pub declines: u64,
    pub reruns: u64,
    pub speculative: u64,
    pub quarantines: u64,
    pub unsatisfiable: u64,
    pub queued_timeouts: u64,
    /// Input bytes the runs needed, and how many of them the chosen peer already held.
    pub input_bytes: u64,
    pub held_bytes: u64,
    /// From the first submission to the last build's end.
    pub makespan_ms: u64,
    /// From each build's submission to its end.
    pub build_ms: BTreeMap<BuildId, u64>,
    pub steps: u64,
    /// Constraint classes that took the place of another (`Config::max_classes`).
    pub classes_replaced: u64,
}

/// A violated invariant, with what replays it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub scenario: &'static str,
    pub seed: u64,
    pub at: Millis,
    pub message: String,
    /// The last events and actions before the failure, oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {} seed {} at {}: {}",
            self.scenario, self.seed, self.at, self.message
        )?;
        writeln!(
            f,
            "replay: SIM_SCENARIO={} SIM_SEED={} cargo test -p scheduler --test it sim::replay",
            self.scenario, self.seed
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, Failure> {
    let mut world = World::new(scenario, seed);
    world.run().map_err(|message| Failure {
        scenario: scenario.name,
        seed,
        at: world.now,
        message,
        trace: world
            .trace
            .iter()
            .map(|(at, coordinator, traced)| match traced {
                Traced::In(event) => format!("{at} C{coordinator} <- {event:?}"),
                Traced::Out(action) => format!("{at} C{coordinator} -> {action:?}"),
            })
            .collect(),
    })?;
    let mut report = world.report;
    report.classes_replaced = world
        .coordinators
        .iter()
        .map(|c| c.stats().classes_replaced)
        .sum();
    Ok(report)
}

const TRACE_LINES: usize = 40;
/// Bytes a peer fetches per millisecond (100 MB/s) for inputs it lacks.
const FETCH_BYTES_PER_MS: u64 = 100_000;

#[derive(Clone, Debug)]
struct WorkerRun {
    task: TaskId,
    attempt: Attempt,
    coordinator: usize,
}

#[derive(Debug)]
struct VirtualPeer {
    id: PeerId,
    capabilities: Arc<Capabilities>,
    /// What its heartbeats claim: a lying peer also claims a GPU it does not have.
    claimed: Arc<Capabilities>,
    slots: u32,
    speed_permille: u64,
    cache: VecDeque<InputId>,
    running: Vec<WorkerRun>,
    up: bool,
    partitioned: bool,
    lies: bool,
    flaky: bool,
    /// Bumped on each crash, so events from before it are recognised.
    incarnation: u32,
}

impl VirtualPeer {
    fn reachable(&self) -> bool {
        self.up && !self.partitioned
    }
}

#[derive(Debug)]
struct SimTask {
    base_ms: u64,
    fails: bool,
    impossible: bool,
    accepted: u32,
    /// The scheduler gave up on it (a `Fail` action).
    given_up: u32,
    succeeded: bool,
}

#[derive(Debug)]
struct SimBuild {
    coordinator: usize,
    spec: BuildSpec,
    tasks: Vec<SimTask>,
    ended: u32,
}

#[derive(Debug)]
enum SimEvent {
    /// A message to a coordinator; `from` is the peer that sent it, if any.
    ToCoordinator {
        coordinator: usize,
        from: Option<PeerId>,
        event: Event,
    },
    Offer {
        peer: PeerId,
        coordinator: usize,
        task: TaskId,
        attempt: Attempt,
    },
    CancelRun {
        peer: PeerId,
        task: TaskId,
        attempt: Attempt,
    },
    RunEnds {
        peer: PeerId,
        incarnation: u32,
        task: TaskId,
        attempt: Attempt,
    },
    Heartbeat {
        peer: PeerId,
        incarnation: u32,
    },
    Tick {
        coordinator: usize,
    },
    /// A coordinator gossips its queue length, as its node's heartbeat would.
    Announce {
        coordinator: usize,
    },
    Submit {
        build: BuildId,
    },
    Cancel {
        build: BuildId,
    },
    Crash {
        peer: PeerId,
        says_goodbye: bool,
    },
    Restart {
        peer: PeerId,
    },
    Join {
        peer: PeerId,
    },
    Partition {
        peer: PeerId,
    },
    Heal {
        peer: PeerId,
    },
}

struct World<'a> {
    scenario: &'a Scenario,
    rng: Rng,
    now: Millis,
    sequence: u64,
    queue: BTreeMap<(Millis, u64), SimEvent>,
    peers: BTreeMap<PeerId, VirtualPeer>,
    coordinators: Vec<Scheduler>,
    builds: BTreeMap<BuildId, SimBuild>,
    unended: BTreeSet<BuildId>,
    first_submit: Option<Millis>,
    submitted_at: BTreeMap<BuildId, Millis>,
    report: Report,
    /// The last events and actions, formatted only if the run fails.
    trace: VecDeque<(Millis, usize, Traced)>,
}

#[derive(Debug)]
enum Traced {
    In(Event),
    Out(Action),
}

/// The capability kinds of a mixed pool, and the requirements tasks pick from; every
/// requirement is met by at least one kind.
fn kinds() -> Vec<Capabilities> {
    let runtimes = |versions: &[&str]| {
        BTreeMap::from([(
            "python".to_string(),
            versions.iter().map(|v| v.to_string()).collect(),
        )])
    };
    let linux = Capabilities {
        os: "linux".into(),
        arch: "x86_64".into(),
        labels: BTreeMap::new(),
        runtimes: runtimes(&["3.11", "3.12"]),
        sandboxes: BTreeMap::from([
            (SandboxKind::Namespace, Guarantees::ALL),
            (SandboxKind::Docker, Guarantees::ALL),
        ]),
        network: true,
    };
    let arm = Capabilities {
        arch: "aarch64".into(),
        runtimes: runtimes(&["3.12"]),
        sandboxes: BTreeMap::from([(SandboxKind::Namespace, Guarantees::TIME)]),
        ..linux.clone()
    };
    let gpu = Capabilities {
        labels: BTreeMap::from([("gpu".into(), "yes".into())]),
        network: false,
        ..linux.clone()
    };
    let mac = Capabilities {
        os: "macos".into(),
        arch: "aarch64".into(),
        runtimes: runtimes(&["3.12"]),
        sandboxes: BTreeMap::from([(SandboxKind::Host, Guarantees::NONE)]),
        ..linux.clone()
    };
    vec![linux, arm, gpu, mac]
}

fn requirement_kinds() -> Vec<Requirements> {
    let any = Requirements::default();
    vec![
        any.clone(),
        Requirements {
            runtimes: BTreeMap::from([("python".into(), "3.11".into())]),
            sandbox: Some(SandboxKind::Docker),
            ..any.clone()
        },
        Requirements {
            arch: Some("aarch64".into()),
            guarantees: Guarantees::TIME,
            ..any.clone()
        },
        Requirements {
            labels: BTreeMap::from([("gpu".into(), "yes".into())]),
            network: false,
            ..any.clone()
        },
        Requirements {
            os: Some("macos".into()),
            sandbox: Some(SandboxKind::Host),
            ..any
        },
    ]
}

fn impossible_requirements() -> Requirements {
    Requirements {
        labels: BTreeMap::from([("gpu".into(), "h100".into())]),
        ..Requirements::default()
    }
}

impl<'a> World<'a> {
    fn new(scenario: &'a Scenario, seed: u64) -> World<'a> {
        let mut rng = Rng::new(seed);
        let coordinators = (0..scenario.coordinators)
            .map(|index| {
                Scheduler::new(Config {
                    seed: seed ^ index,
                    local_peer: Some(coordinator_peer(index as usize)),
                    ..scenario.config.clone()
                })
            })
            .collect();
        let mut world = World {
            scenario,
            rng: rng.fork(),
            now: Millis(0),
            sequence: 0,
            queue: BTreeMap::new(),
            peers: BTreeMap::new(),
            coordinators,
            builds: BTreeMap::new(),
            unended: BTreeSet::new(),
            first_submit: None,
            submitted_at: BTreeMap::new(),
            report: Report::default(),
            trace: VecDeque::new(),
        };
        world.populate();
        world
    }

    fn has(&self, fault: Fault) -> bool {
        self.scenario.faults.contains(&fault)
    }

    fn at(&mut self, delay_ms: u64, event: SimEvent) {
        self.sequence += 1;
        self.queue
            .insert((self.now.plus(delay_ms), self.sequence), event);
    }

    fn latency(&mut self) -> u64 {
        let (low, high) = self.scenario.latency_ms;
        self.rng.between(low, high)
    }

    fn new_peer(&mut self, id: PeerId) -> VirtualPeer {
        let s = self.scenario;
        let kinds = kinds();
        let kind = if s.mixed_capabilities && id.0 < kinds.len() as u64 && s.peers.0 > 1 {
            // The first peers cover every kind, so in a healthy pool every requirement the
            // workload uses can be met; churn and partitions may still take a kind away.
            id.0 as usize
        } else if s.mixed_capabilities {
            // Most peers are plain Linux machines; the other kinds are rarer.
            match self.rng.below(10) {
                0 => 1,
                1 => 2,
                2 => 3,
                _ => 0,
            }
        } else {
            0
        };
        VirtualPeer {
            id,
            capabilities: Arc::new(kinds[kind].clone()),
            claimed: Arc::new(kinds[kind].clone()),
            slots: self.rng.between(s.slots.0, s.slots.1) as u32,
            speed_permille: self.rng.between(s.speed_permille.0, s.speed_permille.1),
            cache: VecDeque::new(),
            running: Vec::new(),
            up: true,
            partitioned: false,
            lies: false,
            flaky: false,
            incarnation: 0,
        }
    }

    fn populate(&mut self) {
        let s = self.scenario;
        let count = self.rng.between(s.peers.0, s.peers.1);
        for index in 0..count {
            let peer = self.new_peer(PeerId(index));
            self.peers.insert(peer.id, peer);
            let jitter = self.rng.below(s.heartbeat_ms);
            // Peers announce themselves before the first build arrives, most of the time.
            self.at(
                jitter / 4,
                SimEvent::Heartbeat {
                    peer: PeerId(index),
                    incarnation: 0,
                },
            );
        }
        if self.has(Fault::SlowPeer) {
            let peer = PeerId(self.rng.below(count));
            self.peers.get_mut(&peer).expect("exists").speed_permille = 60;
        }
        if self.has(Fault::LyingHeartbeat) {
            let peer = PeerId(self.rng.below(count));
            let liar = self.peers.get_mut(&peer).expect("exists");
            liar.lies = true;
            let mut claimed = Capabilities::clone(&liar.capabilities);
            claimed.labels.insert("gpu".into(), "yes".into());
            liar.claimed = Arc::new(claimed);
        }
        if self.has(Fault::FlakyPeer) && count > 1 {
            let peer = PeerId(self.rng.below(count));
            self.peers.get_mut(&peer).expect("exists").flaky = true;
        }
        for coordinator in 0..s.coordinators as usize {
            self.at(s.tick_ms, SimEvent::Tick { coordinator });
            let jitter = self.rng.below(s.heartbeat_ms);
            self.at(jitter, SimEvent::Announce { coordinator });
        }
        self.plan_builds();
        self.plan_faults(count);
    }

    fn plan_builds(&mut self) {
        let s = self.scenario;
        let requirements = requirement_kinds();
        let mut next_build = 1;
        for coordinator in 0..s.coordinators as usize {
            let builds = match s.workload {
                Workload::Random => self
                    .rng
                    .between(s.builds_per_coordinator.0, s.builds_per_coordinator.1),
                Workload::BigAndSmall => 1,
            };
            for _ in 0..builds {
                let build = BuildId(next_build);
                next_build += 1;
                let project = self.rng.below(s.projects);
                let count = match (s.workload, coordinator) {
                    (Workload::BigAndSmall, 0) => s.tasks_per_build.1 as u32,
                    (Workload::BigAndSmall, _) => 2,
                    (Workload::Random, _) => {
                        self.rng.between(s.tasks_per_build.0, s.tasks_per_build.1) as u32
                    }
                };
                let mut specs = Vec::new();
                let mut tasks = Vec::new();
                for index in 0..count {
                    let impossible = self.has(Fault::Unsatisfiable) && self.rng.chance(15);
                    let requirement = if impossible {
                        impossible_requirements()
                    } else if s.mixed_capabilities && self.rng.chance(30) {
                        requirements[self.rng.below(requirements.len() as u64) as usize].clone()
                    } else {
                        requirements[0].clone()
                    };
                    let mut depends_on = Vec::new();
                    if s.dependencies && index > 0 && self.rng.chance(30) {
                        depends_on.push(self.rng.below(u64::from(index)) as u32);
                    }
                    // A project's tasks share its source tree and caches; each also has an input
                    // of its own (its member's cache).
                    let inputs = vec![
                        Input {
                            id: InputId(project << 32),
                            size_bytes: s.source_bytes,
                        },
                        Input {
                            id: InputId(project << 32 | 1 << 16 | u64::from(index)),
                            size_bytes: s.task_input_bytes,
                        },
                    ];
                    specs.push(TaskSpec {
                        key: TaskKey(project << 32 | u64::from(index)),
                        requirements: requirement,
                        inputs,
                        depends_on,
                        ignore_failure: self.rng.chance(10),
                    });
                    // Durations are a property of the project's task, so they can be learned.
                    let mut task_rng = Rng::new(project << 32 | u64::from(index));
                    tasks.push(SimTask {
                        base_ms: task_rng.between(s.task_ms.0, s.task_ms.1),
                        fails: self.rng.chance(s.fail_percent),
                        impossible,
                        accepted: 0,
                        given_up: 0,
                        succeeded: false,
                    });
                }
                let spec = BuildSpec {
                    build,
                    submitter: SubmitterId(coordinator as u64 * 10 + self.rng.below(3)),
                    tasks: specs,
                    queued_timeout_ms: QUEUED_TIMEOUT_MS,
                };
                self.builds.insert(
                    build,
                    SimBuild {
                        coordinator,
                        spec,
                        tasks,
                        ended: 0,
                    },
                );
                self.unended.insert(build);
                let delay = match s.workload {
                    Workload::Random => {
                        s.first_submit_ms + self.rng.below(s.submit_spread_ms.max(1))
                    }
                    // The small build comes once the batch holds every slot.
                    Workload::BigAndSmall => s.first_submit_ms + coordinator as u64 * 3_000,
                };
                self.at(delay, SimEvent::Submit { build });
                if self.has(Fault::Cancels) && self.rng.chance(25) {
                    let after = delay + self.rng.below(10_000);
                    self.at(after, SimEvent::Cancel { build });
                }
            }
        }
    }

    fn plan_faults(&mut self, count: u64) {
        let window = self.scenario.submit_spread_ms + 20_000;
        if self.has(Fault::Churn) {
            for _ in 0..self.rng.between(1, 4) {
                let peer = PeerId(self.rng.below(count));
                let says_goodbye = self.rng.chance(50);
                let at = self.rng.below(window);
                self.at(at, SimEvent::Crash { peer, says_goodbye });
                if self.rng.chance(60) {
                    let back = at + self.rng.between(1_000, 40_000);
                    self.at(back, SimEvent::Restart { peer });
                }
            }
            for index in 0..self.rng.between(0, 3) {
                let at = self.rng.below(window);
                self.at(
                    at,
                    SimEvent::Join {
                        peer: PeerId(count + index),
                    },
                );
            }
        }
        if self.has(Fault::Partitions) {
            for _ in 0..self.rng.between(1, 4) {
                let peer = PeerId(self.rng.below(count));
                let at = self.rng.below(window);
                self.at(at, SimEvent::Partition { peer });
                // Short partitions lose messages within the lease; long ones outlive it.
                let length = self.rng.between(500, 30_000);
                self.at(at + length, SimEvent::Heal { peer });
            }
        }
    }

    fn note(&mut self, coordinator: usize, traced: Traced) {
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        self.trace.push_back((self.now, coordinator, traced));
    }

    fn run(&mut self) -> Result<(), String> {
        while !self.unended.is_empty() {
            let Some(((at, _), event)) = self.queue.pop_first() else {
                return Err("the simulation ran out of events with builds unended".into());
            };
            if at.0 > self.scenario.horizon_ms {
                return Err(format!(
                    "builds {:?} had not ended by the horizon",
                    self.unended
                ));
            }
            self.now = at;
            self.handle(event)?;
        }
        self.check_ends()
    }

    fn handle(&mut self, event: SimEvent) -> Result<(), String> {
        match event {
            SimEvent::ToCoordinator {
                coordinator,
                from,
                event,
            } => {
                if let Some(peer) = from
                    && !self.peers[&peer].reachable()
                {
                    return Ok(());
                }
                self.deliver(coordinator, event)?;
            }
            SimEvent::Offer {
                peer,
                coordinator,
                task,
                attempt,
            } => self.offer_arrives(peer, coordinator, task, attempt),
            SimEvent::CancelRun {
                peer,
                task,
                attempt,
            } => {
                let virtual_peer = self.peers.get_mut(&peer).expect("known peer");
                if virtual_peer.reachable() {
                    virtual_peer
                        .running
                        .retain(|run| (run.task, run.attempt) != (task, attempt));
                }
            }
            SimEvent::RunEnds {
                peer,
                incarnation,
                task,
                attempt,
            } => self.run_ends(peer, incarnation, task, attempt),
            SimEvent::Heartbeat { peer, incarnation } => self.heartbeat(peer, incarnation),
            SimEvent::Tick { coordinator } => {
                self.deliver(coordinator, Event::Tick)?;
                let tick_ms = self.scenario.tick_ms;
                self.at(tick_ms, SimEvent::Tick { coordinator });
            }
            SimEvent::Announce { coordinator } => {
                let heartbeat = Heartbeat {
                    peer: coordinator_peer(coordinator),
                    capabilities: Arc::new(Capabilities::default()),
                    total_slots: 0,
                    free_slots: 0,
                    load_permille: 0,
                    holds: Vec::new(),
                    running: Vec::new(),
                    queued_tasks: self.coordinators[coordinator].stats().queued_tasks as u32,
                };
                for other in (0..self.coordinators.len()).filter(|c| *c != coordinator) {
                    let latency = self.latency();
                    self.at(
                        latency,
                        SimEvent::ToCoordinator {
                            coordinator: other,
                            from: None,
                            event: Event::Heartbeat(heartbeat.clone()),
                        },
                    );
                }
                let next = self.scenario.heartbeat_ms;
                self.at(next, SimEvent::Announce { coordinator });
            }
            SimEvent::Submit { build } => {
                self.first_submit.get_or_insert(self.now);
                self.submitted_at.insert(build, self.now);
                let sim_build = &self.builds[&build];
                let (coordinator, spec) = (sim_build.coordinator, sim_build.spec.clone());
                self.report.builds += 1;
                self.deliver(coordinator, Event::Submit(spec))?;
            }
            SimEvent::Cancel { build } => {
                let coordinator = self.builds[&build].coordinator;
                self.deliver(coordinator, Event::Cancel { build })?;
            }
            SimEvent::Crash { peer, says_goodbye } => self.crash(peer, says_goodbye),
            SimEvent::Restart { peer } => {
                let virtual_peer = self.peers.get_mut(&peer).expect("known peer");
                if !virtual_peer.up {
                    virtual_peer.up = true;
                    let incarnation = virtual_peer.incarnation;
                    self.at(0, SimEvent::Heartbeat { peer, incarnation });
                }
            }
            SimEvent::Join { peer } => {
                let virtual_peer = self.new_peer(peer);
                self.peers.insert(peer, virtual_peer);
                self.at(
                    0,
                    SimEvent::Heartbeat {
                        peer,
                        incarnation: 0,
                    },
                );
            }
            SimEvent::Partition { peer } => {
                self.peers.get_mut(&peer).expect("known peer").partitioned = true;
            }
            SimEvent::Heal { peer } => {
                self.peers.get_mut(&peer).expect("known peer").partitioned = false;
            }
        }
        Ok(())
    }

    fn crash(&mut self, peer: PeerId, says_goodbye: bool) {
        let virtual_peer = self.peers.get_mut(&peer).expect("known peer");
        if !virtual_peer.up {
            return;
        }
        let reachable = virtual_peer.reachable();
        virtual_peer.up = false;
        virtual_peer.running.clear();
        virtual_peer.incarnation += 1;
        if says_goodbye && reachable {
            for coordinator in 0..self.coordinators.len() {
                let latency = self.latency();
                self.at(
                    latency,
                    SimEvent::ToCoordinator {
                        coordinator,
                        from: None,
                        event: Event::PeerGone { peer },
                    },
                );
            }
        }
    }

    fn heartbeat(&mut self, peer: PeerId, incarnation: u32) {
        let virtual_peer = &self.peers[&peer];
        if virtual_peer.incarnation != incarnation || !virtual_peer.up {
            return;
        }
        let free = virtual_peer.slots - virtual_peer.running.len() as u32;
        let heartbeat = Heartbeat {
            peer,
            capabilities: virtual_peer.claimed.clone(),
            total_slots: virtual_peer.slots,
            free_slots: if virtual_peer.lies {
                virtual_peer.slots
            } else {
                free
            },
            load_permille: if virtual_peer.lies {
                0
            } else {
                1000 - free * 1000 / virtual_peer.slots
            },
            holds: if virtual_peer.lies {
                (0..self.scenario.projects)
                    .map(|p| InputId(p << 32))
                    .collect()
            } else {
                virtual_peer.cache.iter().copied().collect()
            },
            running: virtual_peer
                .running
                .iter()
                .map(|run| (run.task, run.attempt))
                .collect(),
            // Workers here do not coordinate; coordinators announce their queues themselves.
            queued_tasks: 0,
        };
        if virtual_peer.reachable() {
            for coordinator in 0..self.coordinators.len() {
                let latency = self.latency();
                self.at(
                    latency,
                    SimEvent::ToCoordinator {
                        coordinator,
                        from: Some(peer),
                        event: Event::Heartbeat(heartbeat.clone()),
                    },
                );
            }
        }
        let next = self.scenario.heartbeat_ms + self.rng.below(200);
        self.at(next, SimEvent::Heartbeat { peer, incarnation });
    }

    fn send(&mut self, coordinator: usize, peer: PeerId, event: Event) {
        let latency = self.latency();
        self.at(
            latency,
            SimEvent::ToCoordinator {
                coordinator,
                from: Some(peer),
                event,
            },
        );
    }

    fn offer_arrives(&mut self, peer: PeerId, coordinator: usize, task: TaskId, attempt: Attempt) {
        let virtual_peer = &self.peers[&peer];
        if !virtual_peer.reachable() {
            return;
        }
        let build = &self.builds[&task.build];
        let spec = &build.spec.tasks[task.index as usize];
        // A worker accepts only what it can run and has slots for, whatever a coordinator
        // believed.
        let suitable = spec.requirements.satisfied_by(&virtual_peer.capabilities);
        if !suitable || virtual_peer.running.len() as u32 >= virtual_peer.slots {
            self.report.declines += 1;
            let reason = if suitable {
                DeclineReason::Busy
            } else {
                DeclineReason::Unsuitable
            };
            self.send(
                coordinator,
                peer,
                Event::OfferDeclined {
                    task,
                    attempt,
                    peer,
                    reason,
                },
            );
            return;
        }
        let total: u64 = spec.inputs.iter().map(|i| i.size_bytes).sum();
        let held: u64 = spec
            .inputs
            .iter()
            .filter(|i| virtual_peer.cache.contains(&i.id))
            .map(|i| i.size_bytes)
            .sum();
        let fetch_ms = (total - held) / FETCH_BYTES_PER_MS;
        let run_ms = build.tasks[task.index as usize].base_ms * 1000 / virtual_peer.speed_permille;
        let inputs: Vec<InputId> = spec.inputs.iter().map(|i| i.id).collect();
        self.report.input_bytes += total;
        self.report.held_bytes += held;
        let cache_inputs = self.scenario.cache_inputs;
        let virtual_peer = self.peers.get_mut(&peer).expect("known peer");
        for input in inputs {
            if !virtual_peer.cache.contains(&input) {
                if virtual_peer.cache.len() == cache_inputs {
                    virtual_peer.cache.pop_front();
                }
                virtual_peer.cache.push_back(input);
            }
        }
        virtual_peer.running.push(WorkerRun {
            task,
            attempt,
            coordinator,
        });
        let incarnation = virtual_peer.incarnation;
        self.send(
            coordinator,
            peer,
            Event::OfferAccepted {
                task,
                attempt,
                peer,
            },
        );
        self.send(
            coordinator,
            peer,
            Event::Started {
                task,
                attempt,
                peer,
            },
        );
        self.at(
            fetch_ms + run_ms,
            SimEvent::RunEnds {
                peer,
                incarnation,
                task,
                attempt,
            },
        );
    }

    fn run_ends(&mut self, peer: PeerId, incarnation: u32, task: TaskId, attempt: Attempt) {
        let virtual_peer = self.peers.get_mut(&peer).expect("known peer");
        if virtual_peer.incarnation != incarnation {
            return;
        }
        let Some(position) = virtual_peer
            .running
            .iter()
            .position(|run| (run.task, run.attempt) == (task, attempt))
        else {
            return;
        };
        let run = virtual_peer.running.remove(position);
        let outcome = if virtual_peer.flaky {
            TaskOutcome::Error {
                message: "sandbox failed to start".into(),
            }
        } else if self.builds[&task.build].tasks[task.index as usize].fails {
            TaskOutcome::Failed
        } else {
            TaskOutcome::Succeeded
        };
        self.send(
            run.coordinator,
            peer,
            Event::Finished {
                task,
                attempt,
                peer,
                outcome,
            },
        );
    }

    fn deliver(&mut self, coordinator: usize, event: Event) -> Result<(), String> {
        self.note(coordinator, Traced::In(event.clone()));
        let actions = self.coordinators[coordinator].step(self.now, event);
        self.report.steps += 1;
        for action in actions {
            self.note(coordinator, Traced::Out(action.clone()));
            self.act(coordinator, action)?;
        }
        self.coordinators[coordinator].check_invariants()?;
        for peer in self.peers.values() {
            if peer.running.len() as u32 > peer.slots {
                return Err(format!(
                    "{} runs {} on {} slots",
                    peer.id,
                    peer.running.len(),
                    peer.slots
                ));
            }
            for run in &peer.running {
                let spec = &self.builds[&run.task.build].spec.tasks[run.task.index as usize];
                if !spec.requirements.satisfied_by(&peer.capabilities) {
                    return Err(format!(
                        "{} runs on {}, which violates its constraints",
                        run.task, peer.id
                    ));
                }
            }
        }
        Ok(())
    }

    fn act(&mut self, coordinator: usize, action: Action) -> Result<(), String> {
        match action {
            Action::Offer {
                task,
                attempt,
                peer,
                explanation,
            } => {
                self.report.offers += 1;
                if explanation.races.is_some() {
                    self.report.speculative += 1;
                }
                let requirements =
                    &self.builds[&task.build].spec.tasks[task.index as usize].requirements;
                let virtual_peer = self
                    .peers
                    .get(&peer)
                    .ok_or_else(|| format!("{task} offered to unknown {peer}"))?;
                // Checked against what the peer announced: a liar's lie is caught by the worker,
                // which refuses, and by the check below that nothing runs where it must not.
                if !requirements.satisfied_by(&virtual_peer.claimed) {
                    return Err(format!(
                        "{task} offered to {peer}, which violates its constraints"
                    ));
                }
                if self.builds[&task.build].ended > 0 {
                    return Err(format!("{task} offered after its build ended"));
                }
                let latency = self.latency();
                self.at(
                    latency,
                    SimEvent::Offer {
                        peer,
                        coordinator,
                        task,
                        attempt,
                    },
                );
            }
            Action::Cancel {
                task,
                attempt,
                peer,
            } => {
                let latency = self.latency();
                self.at(
                    latency,
                    SimEvent::CancelRun {
                        peer,
                        task,
                        attempt,
                    },
                );
            }
            Action::Rerun { .. } => self.report.reruns += 1,
            Action::Accept { task, outcome, .. } => {
                let build = self.builds.get_mut(&task.build).expect("known build");
                if build.ended > 0 {
                    return Err(format!("{task} accepted a result after its build ended"));
                }
                let sim_task = &mut build.tasks[task.index as usize];
                sim_task.accepted += 1;
                sim_task.succeeded = outcome == TaskOutcome::Succeeded;
                if sim_task.accepted + sim_task.given_up > 1 {
                    return Err(format!("{task} ended twice (a result or given up)"));
                }
                if sim_task.impossible {
                    return Err(format!("{task} cannot run anywhere, yet has a result"));
                }
            }
            Action::Fail { task, reason } => {
                match reason {
                    FailReason::Unsatisfiable(_) => self.report.unsatisfiable += 1,
                    FailReason::QueuedTimeout { .. } => self.report.queued_timeouts += 1,
                    _ => {}
                }
                let build = self.builds.get_mut(&task.build).expect("known build");
                let sim_task = &mut build.tasks[task.index as usize];
                sim_task.given_up += 1;
                if build.ended > 0 || sim_task.accepted + sim_task.given_up > 1 {
                    return Err(format!("{task} given up after it ended"));
                }
            }
            Action::Quarantine { .. } => self.report.quarantines += 1,
            Action::BuildFinished { build, outcome } => self.build_finished(build, outcome)?,
        }
        Ok(())
    }

    fn build_finished(&mut self, build: BuildId, outcome: BuildOutcome) -> Result<(), String> {
        let sim_build = self.builds.get_mut(&build).expect("known build");
        sim_build.ended += 1;
        if sim_build.ended > 1 {
            return Err(format!("{build} ended twice"));
        }
        self.unended.remove(&build);
        let first = self.first_submit.unwrap_or(self.now);
        self.report.makespan_ms = self.report.makespan_ms.max(self.now.since(first));
        let submitted = self.submitted_at.get(&build).copied().unwrap_or(self.now);
        self.report
            .build_ms
            .insert(build, self.now.since(submitted));
        let sim_build = &self.builds[&build];
        let every_task_ended = sim_build
            .tasks
            .iter()
            .all(|task| task.accepted + task.given_up == 1);
        match outcome {
            BuildOutcome::Succeeded => {
                self.report.succeeded += 1;
                for (index, task) in sim_build.tasks.iter().enumerate() {
                    let ignored = sim_build.spec.tasks[index].ignore_failure;
                    let good = (task.accepted == 1 && task.succeeded)
                        || (ignored && task.accepted + task.given_up == 1);
                    if !good {
                        return Err(format!(
                            "{build} succeeded, but task {index} has {} accepted results",
                            task.accepted
                        ));
                    }
                }
            }
            BuildOutcome::Failed { .. } => {
                self.report.failed += 1;
                if !every_task_ended {
                    return Err(format!("{build} failed with tasks not ended"));
                }
            }
            BuildOutcome::Cancelled => self.report.cancelled += 1,
            BuildOutcome::Rejected(reason) => {
                self.report.rejected += 1;
                return Err(format!("{build} rejected: {reason}"));
            }
        }
        Ok(())
    }

    fn check_ends(&self) -> Result<(), String> {
        for (build, sim_build) in &self.builds {
            if sim_build.ended != 1 {
                return Err(format!("{build} ended {} times", sim_build.ended));
            }
        }
        Ok(())
    }
}
