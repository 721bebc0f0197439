//! Scheduler benchmarks, printed and never asserted: placement decisions per second on a pool of
//! 10,000 peers with 100,000 queued tasks; fan-out of 24 one-second tasks over 4 peers x 2 slots
//! in the simulator; cache-hit rate of affinity placement against random placement.
//!
//!   cargo bench -p scheduler --bench scheduler [-- placement|fan-out|cache]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::rng::Rng;
use scheduler::sim::{self, Scenario};
use scheduler::{
    Action, Attempt, BuildId, BuildSpec, Capabilities, Config, Event, Guarantees, Heartbeat, Input,
    InputId, Millis, PeerId, Policy, Requirements, SandboxKind, Scheduler, SubmitterId, TaskId,
    TaskKey, TaskOutcome, TaskSpec,
};

const PEERS: u64 = 10_000;
const SLOTS: u32 = 4;
const BUILDS: u64 = 100;
const TASKS_PER_BUILD: u64 = 1_000;
const SUBMITTERS: u64 = 20;
const INPUTS: u64 = 20_000;
const HELD_PER_PEER: u64 = 32;
/// One heartbeat for every this many finished tasks: 10,000 peers beating every 2 s against
/// 100,000 decisions a second.
const FINISHES_PER_HEARTBEAT: u64 = 20;

/// Eight constraint classes: two architectures, with or without a GPU label, with or without
/// network access.
fn capabilities(class: u64) -> Capabilities {
    let mut labels = BTreeMap::new();
    if class & 2 != 0 {
        labels.insert("gpu".to_string(), "yes".to_string());
    }
    Capabilities {
        os: "linux".into(),
        arch: if class & 1 != 0 { "aarch64" } else { "x86_64" }.into(),
        labels,
        runtimes: BTreeMap::from([(
            "python".to_string(),
            ["3.12".to_string()].into_iter().collect(),
        )]),
        sandboxes: BTreeMap::from([(SandboxKind::Namespace, Guarantees::ALL)]),
        network: class & 4 == 0,
    }
}

/// Requirement sets met by eight, four, four, two and one of the classes.
fn requirements(kind: u64) -> Requirements {
    let mut requirements = Requirements {
        network: false,
        ..Requirements::default()
    };
    match kind {
        0 => {}
        1 => requirements.arch = Some("aarch64".into()),
        2 => requirements.network = true,
        3 => {
            requirements.labels.insert("gpu".into(), "yes".into());
            requirements.network = true;
        }
        _ => {
            requirements.labels.insert("gpu".into(), "yes".into());
            requirements.arch = Some("aarch64".into());
            requirements.network = true;
        }
    }
    requirements
}

struct Pool {
    classes: Vec<Arc<Capabilities>>,
    holds: Vec<Vec<InputId>>,
    running: Vec<Vec<(TaskId, Attempt)>>,
}

impl Pool {
    fn heartbeat(&self, peer: u64) -> Event {
        let running = self.running[peer as usize].clone();
        Event::Heartbeat(Heartbeat {
            peer: PeerId(peer),
            capabilities: Arc::clone(&self.classes[(peer % 8) as usize]),
            total_slots: SLOTS,
            free_slots: SLOTS - running.len() as u32,
            load_permille: running.len() as u32 * 1000 / SLOTS,
            holds: self.holds[peer as usize].clone(),
            running,
            queued_tasks: 0,
        })
    }
}

fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The scheduler, the pool it places on, and what the benchmark counts.
struct Driver {
    scheduler: Scheduler,
    pool: Pool,
    now: Millis,
    in_flight: VecDeque<(TaskId, Attempt, PeerId)>,
    busy: Duration,
    events: u64,
    offers: u64,
    finished_builds: u64,
}

impl Driver {
    /// Steps the scheduler, timing only the step, and plays the peers' part in what it asks.
    fn step(&mut self, event: Event) {
        let started = Instant::now();
        let actions = self.scheduler.step(self.now, event);
        self.busy += started.elapsed();
        self.events += 1;
        for action in actions {
            match action {
                Action::Offer {
                    task,
                    attempt,
                    peer,
                    ..
                } => {
                    self.offers += 1;
                    self.in_flight.push_back((task, attempt, peer));
                    self.pool.running[peer.0 as usize].push((task, attempt));
                }
                Action::BuildFinished { .. } => self.finished_builds += 1,
                _ => {}
            }
        }
    }
}

fn throughput() {
    let mut rng = Rng::new(1);
    let pool = Pool {
        classes: (0..8).map(|class| Arc::new(capabilities(class))).collect(),
        holds: (0..PEERS)
            .map(|_| {
                (0..HELD_PER_PEER)
                    .map(|_| InputId(rng.below(INPUTS)))
                    .collect()
            })
            .collect(),
        running: vec![Vec::new(); PEERS as usize],
    };
    let mut driver = Driver {
        scheduler: Scheduler::new(Config {
            max_pending_tasks: 200_000,
            ..Config::default()
        }),
        pool,
        now: Millis(0),
        in_flight: VecDeque::new(),
        busy: Duration::ZERO,
        events: 0,
        offers: 0,
        finished_builds: 0,
    };

    // 100,000 tasks queued before any peer has announced itself.
    for build in 0..BUILDS {
        let tasks = (0..TASKS_PER_BUILD)
            .map(|index| {
                let project = build % 10;
                TaskSpec {
                    key: TaskKey((project << 32) | (index % 50)),
                    requirements: requirements(rng.below(5)),
                    inputs: (0..4)
                        .map(|_| Input {
                            id: InputId(rng.below(INPUTS)),
                            size_bytes: rng.between(1, 100) * 1_000_000,
                        })
                        .collect(),
                    depends_on: Vec::new(),
                    ignore_failure: false,
                }
            })
            .collect();
        driver.step(Event::Submit(BuildSpec {
            build: BuildId(build),
            submitter: SubmitterId(build % SUBMITTERS),
            tasks,
            queued_timeout_ms: 3_600_000,
        }));
    }
    let submit_time = driver.busy;

    // Every peer announces itself; each heartbeat fills the peer's slots.
    for peer in 0..PEERS {
        let heartbeat = driver.pool.heartbeat(peer);
        driver.step(heartbeat);
    }
    let announce_offers = driver.offers;
    let announce_time = driver.busy - submit_time;

    // Steady state: runs start and finish in order, each finish freeing a slot for the next
    // decision; heartbeats and ticks keep arriving.
    let mut finishes = 0u64;
    while let Some((task, attempt, peer)) = driver.in_flight.pop_front() {
        driver.step(Event::Started {
            task,
            attempt,
            peer,
        });
        driver.pool.running[peer.0 as usize].retain(|run| *run != (task, attempt));
        driver.step(Event::Finished {
            task,
            attempt,
            peer,
            outcome: TaskOutcome::Succeeded,
        });
        finishes += 1;
        if finishes.is_multiple_of(FINISHES_PER_HEARTBEAT) {
            let heartbeat = driver.pool.heartbeat(rng.below(PEERS));
            driver.step(heartbeat);
        }
        if finishes.is_multiple_of(1_000) {
            driver.now = driver.now.plus(10);
            driver.step(Event::Tick);
        }
    }
    let steady_offers = driver.offers - announce_offers;
    let steady_time = driver.busy - announce_time - submit_time;
    let stats = driver.scheduler.stats();
    let tasks = BUILDS * TASKS_PER_BUILD;
    println!("placement: {PEERS} peers x {SLOTS} slots in 8 classes, {tasks} tasks queued");
    println!(
        "  submit {tasks} tasks:         {:8.1} ms",
        submit_time.as_secs_f64() * 1000.0
    );
    println!(
        "  announce {PEERS} peers:        {:8.1} ms, {announce_offers} placements, {:.0} placements/s",
        announce_time.as_secs_f64() * 1000.0,
        announce_offers as f64 / announce_time.as_secs_f64()
    );
    println!(
        "  steady state:               {:8.1} ms, {steady_offers} placements, {:.0} placements/s",
        steady_time.as_secs_f64() * 1000.0,
        steady_offers as f64 / steady_time.as_secs_f64()
    );
    println!(
        "  overall: {} placements in {:.1} ms of step() over {} events: {:.0} placements/s",
        driver.offers,
        driver.busy.as_secs_f64() * 1000.0,
        driver.events,
        driver.offers as f64 / driver.busy.as_secs_f64()
    );
    println!(
        "  builds finished {}/{BUILDS}, tasks left {}, peak RSS {} MiB",
        driver.finished_builds,
        stats.pending_tasks,
        peak_memory_kib().unwrap_or(0) / 1024
    );
}

fn fan_out() {
    for latency_ms in [1, 20] {
        let scenario = Scenario::fan_out(latency_ms);
        let makespans: Vec<u64> = (0..20)
            .map(|seed| {
                sim::run(&scenario, seed)
                    .unwrap_or_else(|failure| panic!("{failure}"))
                    .makespan_ms
            })
            .collect();
        let worst = *makespans.iter().max().expect("runs");
        let mean = makespans.iter().sum::<u64>() as f64 / makespans.len() as f64;
        println!(
            "fan-out 24 x 1 s over 4 peers x 2 slots, {latency_ms} ms latency: mean {:.3} s ({:.3}x ideal), worst {:.3} s ({:.3}x)",
            mean / 1000.0,
            mean / 3000.0,
            worst as f64 / 1000.0,
            worst as f64 / 3000.0
        );
    }
}

fn cache_hits() {
    for (name, policy) in [("affinity", Policy::Scored), ("random", Policy::Random)] {
        let scenario = Scenario::repeated_builds(policy);
        let (mut held, mut total, mut makespan) = (0u64, 0u64, 0u64);
        const SEEDS: u64 = 10;
        for seed in 0..SEEDS {
            let report = sim::run(&scenario, seed).unwrap_or_else(|failure| panic!("{failure}"));
            held += report.held_bytes;
            total += report.input_bytes;
            makespan += report.makespan_ms;
        }
        println!(
            "cache hits, {name} placement: {:.1}% of input bytes already on the chosen peer (mean makespan {:.0} s)",
            held as f64 * 100.0 / total as f64,
            makespan as f64 / SEEDS as f64 / 1000.0
        );
    }
}

fn main() {
    // `cargo bench -p scheduler --bench scheduler -- placement` runs only the named parts.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if wanted("placement") {
        throughput();
    }
    if wanted("fan-out") {
        fan_out();
    }
    if wanted("cache") {
        cache_hits();
    }
}
