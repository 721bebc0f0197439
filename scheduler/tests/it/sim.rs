//! Simulation sweeps: many seeds per scenario, every invariant checked after every step. A
//! failing seed is printed with the command that replays it.

use scheduler::BuildId;
use scheduler::sim::{self, Report, Scenario};

/// A third of the seeds, for the scenarios that cost more per seed.
fn thin(seeds: std::ops::Range<u64>) -> std::ops::Range<u64> {
    seeds.start..seeds.start + (seeds.end - seeds.start).div_ceil(3)
}

/// Runs `seeds` seeds of a scenario and adds up what they measured.
fn sweep(scenario: Scenario, seeds: std::ops::Range<u64>) -> Report {
    let mut total = Report::default();
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| sim::run(&scenario, seed));
        let Ok(outcome) = outcome else {
            panic!(
                "scenario {} seed {seed} panicked; replay: SIM_SCENARIO={} SIM_SEED={seed} \
                 cargo test -p scheduler --test it sim::replay",
                scenario.name, scenario.name
            );
        };
        match outcome {
            Ok(report) => {
                total.builds += report.builds;
                total.succeeded += report.succeeded;
                total.failed += report.failed;
                total.cancelled += report.cancelled;
                total.declines += report.declines;
                total.reruns += report.reruns;
                total.speculative += report.speculative;
                total.quarantines += report.quarantines;
                total.unsatisfiable += report.unsatisfiable;
                total.queued_timeouts += report.queued_timeouts;
                total.steps += report.steps;
                total.classes_replaced += report.classes_replaced;
                total.makespan_ms += report.makespan_ms;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    println!("{}: {total:?}", scenario.name);
    total
}

/// Seeds per scenario: 300 in CI; `SIM_SEEDS=100000 cargo test --release -p scheduler --test it
/// sim::` soaks for longer. `SIM_SEED_BASE` shifts the range, to soak fresh seeds.
fn seeds() -> std::ops::Range<u64> {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    base..base + env("SIM_SEEDS").unwrap_or(300)
}

#[test]
fn steady_pools_run_every_build() {
    let total = sweep(Scenario::steady(), seeds());
    assert_eq!(total.builds, total.succeeded + total.failed);
    assert!(total.succeeded > total.builds / 2, "{total:?}");
}

#[test]
fn churn_reruns_lost_tasks() {
    let total = sweep(Scenario::churn(), seeds());
    assert!(total.reruns > 0, "{total:?}");
}

#[test]
fn partitions_lose_leases_and_recover() {
    let total = sweep(Scenario::partitions(), seeds());
    assert!(total.reruns > 0, "{total:?}");
}

#[test]
fn a_slow_peer_gets_speculative_copies() {
    let total = sweep(Scenario::slow_peer(), seeds());
    assert!(total.speculative > 0, "{total:?}");
}

#[test]
fn a_lying_heartbeat_never_overcommits_nor_runs_what_it_cannot() {
    let total = sweep(Scenario::lying_heartbeat(), seeds());
    assert!(total.declines > 0, "{total:?}");
    assert!(total.quarantines > 0, "{total:?}");
}

#[test]
fn unsatisfiable_tasks_fail_with_a_reason() {
    let total = sweep(Scenario::unsatisfiable(), seeds());
    assert!(total.unsatisfiable > 0, "{total:?}");
}

#[test]
fn a_flaky_peer_is_quarantined() {
    let total = sweep(Scenario::flaky_peer(), seeds());
    assert!(total.quarantines > 0, "{total:?}");
}

#[test]
fn a_small_build_overtakes_another_coordinators_big_batch() {
    let scenario = Scenario::big_and_small();
    // The slowest run of a task: 6 s of work at half speed.
    let longest_run_ms = scenario.task_ms.1 * 1000 / scenario.speed_permille.0;
    let mut overtook = 0;
    for seed in thin(seeds()) {
        let report = sim::run(&scenario, seed).unwrap_or_else(|failure| panic!("{failure}"));
        let (big, small) = (report.build_ms[&BuildId(1)], report.build_ms[&BuildId(2)]);
        // With fair shares the small build waits for some of the batch's runs to end (one run,
        // and a heartbeat to hear of the free slots), never for the whole batch.
        let bound = 2 * longest_run_ms + scenario.heartbeat_ms + 1_000;
        assert!(
            small <= bound,
            "seed {seed}: small {small} ms, big {big} ms"
        );
        if 3_000 + small < big {
            overtook += 1;
        }
    }
    assert!(overtook > 0);
}

#[test]
fn random_placement_keeps_every_invariant_too() {
    sweep(Scenario::churn_random(), thin(seeds()));
}

#[test]
fn everything_at_once() {
    let total = sweep(Scenario::mayhem(), seeds());
    assert!(total.cancelled > 0, "{total:?}");
}

#[test]
fn classes_taking_each_others_places_keep_every_invariant() {
    let total = sweep(Scenario::few_classes(), seeds());
    assert!(total.classes_replaced > 0, "{total:?}");
}

/// `SIM_SCENARIO=name SIM_SEED=n` replays one run and prints it; without them, checks that a
/// seed replays to the same result.
#[test]
fn replay() {
    let scenario = std::env::var("SIM_SCENARIO").ok();
    let seed = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok());
    if let (Some(name), Some(seed)) = (scenario, seed) {
        let scenario = Scenario::all()
            .into_iter()
            .find(|s| s.name == name)
            .expect("a scenario of that name");
        match sim::run(&scenario, seed) {
            Ok(report) => println!("{report:#?}"),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    for scenario in Scenario::all() {
        let first = sim::run(&scenario, 42);
        assert_eq!(first, sim::run(&scenario, 42), "{}", scenario.name);
    }
}

#[test]
fn a_failure_names_its_seed_and_how_to_replay_it() {
    let failure = sim::Failure {
        scenario: "churn",
        seed: 1234,
        at: scheduler::Millis(15_000),
        message: "B3 ended twice".into(),
        trace: vec!["14990ms C0 <- Tick".into()],
    };
    expect_test::expect![[r#"
        scenario churn seed 1234 at 15000ms: B3 ended twice
        replay: SIM_SCENARIO=churn SIM_SEED=1234 cargo test -p scheduler --test it sim::replay
          14990ms C0 <- Tick
    "#]]
    .assert_eq(&failure.to_string());
}
