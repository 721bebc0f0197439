//! The state machine under failure, as transcripts: leases, lost and late results, bounded
//! retries, timeouts, speculation, quarantine, dependencies, cancellation, refusals, fairness.

use expect_test::expect;
use scheduler::{Attempt, Config, Event, PeerId, TaskOutcome};

use crate::support::{Harness, build, id, peer, started, task};

fn error() -> TaskOutcome {
    TaskOutcome::Error {
        message: "sandbox failed to start".into(),
    }
}

#[test]
fn a_silent_peer_loses_its_lease_and_its_late_result_is_ignored() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).slots(4, 2).heartbeat());
    harness.step(build(1, 1, vec![task()]));
    harness.accept(id(1, 0), 1, 1);
    // P2 keeps heartbeating; P1 falls silent past the 10 s lease.
    harness.at(9_000).quietly(peer(2).slots(4, 2).heartbeat());
    harness.at(10_500).step(Event::Tick);
    harness.accept(id(1, 0), 2, 2);
    harness.at(12_000);
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.finish(id(1, 0), 2, 2, TaskOutcome::Succeeded);
    harness.finish(id(1, 0), 2, 2, TaskOutcome::Succeeded);
    expect![[r#"
        0ms submit B1 by S1 (1 tasks)
          offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 2)
        0ms P1 starts B1.0 #1
        10500ms tick
          cancel B1.0 #1 on P1
          rerun B1.0: lost #1 on P1, the peer was silent for 11s
          offer B1.0 #2: placed on P2: no inputs, 2/4 slots free, load 0% (best of 1)
        10500ms P2 starts B1.0 #2
        12000ms P1 finished B1.0 #1: succeeded
        12000ms P2 finished B1.0 #2: succeeded
          accept B1.0 #2 from P2: succeeded
          build B1 succeeded
        12000ms P2 finished B1.0 #2: succeeded"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn retries_are_bounded() {
    let mut harness = Harness::new();
    for p in 1..=4 {
        harness.quietly(peer(p).heartbeat());
    }
    harness.quietly(build(1, 1, vec![task()]));
    harness.accept(id(1, 0), 1, 1);
    harness.step(Event::PeerGone { peer: PeerId(1) });
    harness.accept(id(1, 0), 2, 2);
    harness.finish(id(1, 0), 2, 2, error());
    harness.accept(id(1, 0), 3, 3);
    harness.step(Event::PeerGone { peer: PeerId(3) });
    expect![[r#"
        0ms P1 starts B1.0 #1
        0ms P1 gone
          cancel B1.0 #1 on P1
          rerun B1.0: lost #1 on P1, the peer left
          offer B1.0 #2: placed on P2: no inputs, 4/4 slots free, load 0% (best of 2)
        0ms P2 starts B1.0 #2
        0ms P2 finished B1.0 #2: error: sandbox failed to start
          rerun B1.0: lost #2 on P2, the peer could not run it: sandbox failed to start
          offer B1.0 #3: placed on P3: no inputs, 4/4 slots free, load 0% (best of 2)
        0ms P3 starts B1.0 #3
        0ms P3 gone
          cancel B1.0 #3 on P3
          fail B1.0: lost 3 times; last: the peer left
          build B1 failed (B1.0)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_declined_or_unanswered_offer_goes_elsewhere_without_counting_as_a_retry() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).slots(4, 3).heartbeat());
    harness.step(build(1, 1, vec![task()]));
    harness.decline(id(1, 0), 1, 1);
    // P2 never answers; the offer is withdrawn after 5 s, and P1 has room again by then.
    harness.at(4_000).quietly(peer(1).heartbeat());
    harness.at(5_000).step(Event::Tick);
    expect![[r#"
        0ms submit B1 by S1 (1 tasks)
          offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 2)
        0ms P1 declines B1.0 #1: Busy
          offer B1.0 #2: placed on P2: no inputs, 3/4 slots free, load 0% (best of 1)
        5000ms tick
          offer B1.0 #3: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_run_missing_from_two_heartbeats_is_lost() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(build(1, 1, vec![task()]));
    harness.accept(id(1, 0), 1, 1);
    let running = [(id(1, 0), Attempt(1))];
    harness
        .at(2_000)
        .step(peer(1).slots(4, 3).running(&running).heartbeat());
    // The result went astray (a short partition); the peer no longer lists the run.
    harness.at(4_000).step(peer(1).heartbeat());
    harness.at(6_000).step(peer(1).heartbeat());
    expect![[r#"
        0ms P1 starts B1.0 #1
        2000ms heartbeat P1: 3/4 free, running 1
        4000ms heartbeat P1: 4/4 free, running 0
        6000ms heartbeat P1: 4/4 free, running 0
          rerun B1.0: lost #1 on P1, the peer stopped reporting it
          offer B1.0 #2: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_queued_task_leaves_the_queue_at_its_queued_timeout() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(1, 1).heartbeat());
    harness.step(build(1, 1, vec![task(), task()]));
    harness.accept(id(1, 0), 1, 1);
    for at in [8_000, 16_000, 24_000, 32_000, 40_000, 48_000, 56_000] {
        let running = [(id(1, 0), Attempt(1))];
        harness
            .at(at)
            .quietly(peer(1).slots(1, 0).running(&running).heartbeat());
    }
    harness.at(60_000).step(Event::Tick);
    expect![[r#"
        0ms submit B1 by S1 (2 tasks)
          offer B1.0 #1: placed on P1: no inputs, 1/1 slots free, load 0% (best of 1)
        0ms P1 starts B1.0 #1
        60000ms tick
          fail B1.1: no peer had room for it within the queued timeout (1m00s)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_straggler_gets_a_speculative_copy_and_the_first_result_wins() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).heartbeat());
    // A first run teaches the scheduler the task takes about 1 s.
    harness.quietly(build(1, 1, vec![task().key(5)]));
    harness.quietly(started(1, 0, 1, 1));
    harness.at(1_000);
    harness.quietly(Event::Finished {
        task: id(1, 0),
        attempt: Attempt(1),
        peer: PeerId(1),
        outcome: TaskOutcome::Succeeded,
    });
    harness.step(build(2, 1, vec![task().key(5)]));
    harness.accept(id(2, 0), 1, 1);
    // Twice the expected time, but no less than the 2 s floor.
    harness.at(3_000).step(Event::Tick);
    harness.accept(id(2, 0), 2, 2);
    harness.at(4_000);
    harness.finish(id(2, 0), 2, 2, TaskOutcome::Succeeded);
    harness.finish(id(2, 0), 1, 1, TaskOutcome::Succeeded);
    expect![[r#"
        1000ms submit B2 by S1 (1 tasks)
          offer B2.0 #1: placed on P1: no inputs, 4/4 slots free, load 0%, expected 1s (best of 2)
        1000ms P1 starts B2.0 #1
        3000ms tick
          offer B2.0 #2: speculative copy of #1 (slow on P1) placed on P2: no inputs, 4/4 slots free, load 0%, expected 1s (best of 1)
        3000ms P2 starts B2.0 #2
        4000ms P2 finished B2.0 #2: succeeded
          cancel B2.0 #1 on P1
          accept B2.0 #2 from P2: succeeded
          build B2 succeeded
        4000ms P1 finished B2.0 #1: succeeded"#]]
    .assert_eq(&harness.transcript());
}

/// P1 with 4 free slots, P2 with 1, two strikes to a quarantine: two builds each end their
/// first run on P1 with `outcome`, then succeed on P2.
fn lost_twice_on_p1(outcome: TaskOutcome) -> Harness {
    let mut harness = Harness::with(Config {
        quarantine_strikes: 2,
        ..Config::default()
    });
    harness.quietly(peer(1).slots(4, 4).heartbeat());
    harness.quietly(peer(2).slots(4, 1).heartbeat());
    for b in 1..=2 {
        harness.quietly(build(b, 1, vec![task()]));
        harness.quietly(started(b, 0, 1, 1));
        harness.finish(id(b, 0), 1, 1, outcome.clone());
        harness.quietly(started(b, 0, 2, 2));
        harness.finish(id(b, 0), 2, 2, TaskOutcome::Succeeded);
    }
    harness
}

#[test]
fn a_peer_whose_runs_fail_where_others_succeed_is_quarantined() {
    let mut harness = lost_twice_on_p1(error());
    harness.step(build(3, 1, vec![task()]));
    harness.quietly(started(3, 0, 1, 2));
    // The quarantine ends after five minutes, and P1 gets work again.
    harness.at(300_000).quietly(peer(1).heartbeat());
    harness.quietly(
        peer(2)
            .slots(4, 0)
            .running(&[(id(3, 0), Attempt(1))])
            .heartbeat(),
    );
    harness.step(Event::Tick);
    harness.step(build(4, 1, vec![task()]));
    expect![[r#"
        0ms P1 finished B1.0 #1: error: sandbox failed to start
          rerun B1.0: lost #1 on P1, the peer could not run it: sandbox failed to start
          offer B1.0 #2: placed on P2: no inputs, 1/4 slots free, load 0% (best of 1)
        0ms P2 finished B1.0 #2: succeeded
          accept B1.0 #2 from P2: succeeded
          build B1 succeeded
        0ms P1 finished B2.0 #1: error: sandbox failed to start
          rerun B2.0: lost #1 on P1, the peer could not run it: sandbox failed to start
          offer B2.0 #2: placed on P2: no inputs, 1/4 slots free, load 0%, expected 0ms (best of 1)
        0ms P2 finished B2.0 #2: succeeded
          accept B2.0 #2 from P2: succeeded
          quarantine P1 until 300000ms after 2 strikes: runs that failed there but not elsewhere, or work refused that its heartbeat offered
          build B2 succeeded
        0ms submit B3 by S1 (1 tasks)
          offer B3.0 #1: placed on P2: no inputs, 1/4 slots free, load 0%, expected 0ms (best of 1)
        300000ms tick
        300000ms submit B4 by S1 (1 tasks)
          offer B4.0 #1: placed on P1: no inputs, 4/4 slots free, load 0%, expected 0ms (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_peer_that_hands_runs_back_to_shut_down_earns_no_strikes() {
    let mut harness = lost_twice_on_p1(TaskOutcome::HandedBack {
        message: "the peer is shutting down".into(),
    });
    // Back from its restart, P1 is offered work at once: no quarantine.
    harness.step(build(3, 1, vec![task()]));
    expect![[r#"
        0ms P1 finished B1.0 #1: handed back: the peer is shutting down
          rerun B1.0: lost #1 on P1, the peer handed it back: the peer is shutting down
          offer B1.0 #2: placed on P2: no inputs, 1/4 slots free, load 0% (best of 1)
        0ms P2 finished B1.0 #2: succeeded
          accept B1.0 #2 from P2: succeeded
          build B1 succeeded
        0ms P1 finished B2.0 #1: handed back: the peer is shutting down
          rerun B2.0: lost #1 on P1, the peer handed it back: the peer is shutting down
          offer B2.0 #2: placed on P2: no inputs, 1/4 slots free, load 0%, expected 0ms (best of 1)
        0ms P2 finished B2.0 #2: succeeded
          accept B2.0 #2 from P2: succeeded
          build B2 succeeded
        0ms submit B3 by S1 (1 tasks)
          offer B3.0 #1: placed on P1: no inputs, 4/4 slots free, load 0%, expected 0ms (best of 2)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn handed_back_runs_do_not_use_up_the_attempts_but_cannot_go_round_forever() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    let hand_back = |harness: &mut Harness, build: u64, attempt: u32| {
        harness.quietly(started(build, 0, attempt, 1));
        harness.quietly(Event::Finished {
            task: id(build, 0),
            attempt: Attempt(attempt),
            peer: PeerId(1),
            outcome: TaskOutcome::HandedBack {
                message: "shutting down".into(),
            },
        })
    };
    // Five handbacks, more than the three attempts a task may lose: it is still placed.
    harness.quietly(build(1, 1, vec![task()]));
    for attempt in 1..=5 {
        hand_back(&mut harness, 1, attempt);
    }
    harness.accept(id(1, 0), 6, 1);
    harness.finish(id(1, 0), 6, 1, TaskOutcome::Succeeded);
    // Past four handbacks an attempt (twelve), each one counts as a loss: the third fails it.
    harness.step(build(2, 1, vec![task()]));
    for attempt in 1..=14 {
        hand_back(&mut harness, 2, attempt);
    }
    harness.accept(id(2, 0), 15, 1);
    harness.finish(
        id(2, 0),
        15,
        1,
        TaskOutcome::HandedBack {
            message: "shutting down".into(),
        },
    );
    expect![[r#"
        0ms P1 starts B1.0 #6
        0ms P1 finished B1.0 #6: succeeded
          accept B1.0 #6 from P1: succeeded
          build B1 succeeded
        0ms submit B2 by S1 (1 tasks)
          offer B2.0 #1: placed on P1: no inputs, 4/4 slots free, load 0%, expected 0ms (best of 1)
        0ms P1 starts B2.0 #15
        0ms P1 finished B2.0 #15: handed back: shutting down
          fail B2.0: lost 3 times; last: the peer handed it back: shutting down
          build B2 failed (B2.0)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn dependencies_wait_and_a_failure_stops_dependents_unless_ignored() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.step(build(
        1,
        1,
        vec![
            task(),
            task().depends_on(&[0]),
            task().ignore_failure(),
            task().depends_on(&[2]),
        ],
    ));
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Failed);
    harness.finish(id(1, 2), 1, 1, TaskOutcome::Failed);
    harness.finish(id(1, 3), 1, 1, TaskOutcome::Succeeded);
    expect![[r#"
        0ms submit B1 by S1 (4 tasks)
          offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)
          offer B1.2 #1: placed on P1: no inputs, 3/4 slots free, load 0% (best of 1)
        0ms P1 finished B1.0 #1: failed
          accept B1.0 #1 from P1: failed
          fail B1.1: not run: B1.0 did not succeed
        0ms P1 finished B1.2 #1: failed
          accept B1.2 #1 from P1: failed
          offer B1.3 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)
        0ms P1 finished B1.3 #1: succeeded
          accept B1.3 #1 from P1: succeeded
          build B1 failed (B1.0, B1.1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn cancel_stops_runs_and_ignores_their_results() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(build(1, 1, vec![task(), task().depends_on(&[0])]));
    harness.step(Event::Cancel {
        build: scheduler::BuildId(1),
    });
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.step(Event::Cancel {
        build: scheduler::BuildId(1),
    });
    expect![[r#"
        0ms cancel B1
          cancel B1.0 #1 on P1
          build B1 cancelled
        0ms P1 finished B1.0 #1: succeeded
        0ms cancel B1"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn bad_submissions_are_refused_with_the_reason() {
    let mut harness = Harness::with(Config {
        max_pending_tasks: 3,
        ..Config::default()
    });
    harness.quietly(peer(1).slots(1, 0).heartbeat());
    harness.step(build(
        1,
        1,
        vec![task().depends_on(&[1]), task().depends_on(&[0])],
    ));
    harness.step(build(2, 1, vec![task().depends_on(&[4])]));
    harness.step(build(3, 1, vec![task(), task()]));
    harness.step(build(3, 1, vec![task()]));
    harness.step(build(4, 1, vec![task(), task()]));
    harness.step(build(5, 1, vec![]));
    expect![[r#"
        0ms submit B1 by S1 (2 tasks)
          build B1 rejected: tasks depend on each other: [0, 1]
        0ms submit B2 by S1 (1 tasks)
          build B2 rejected: task 0 depends on task 4, which does not exist
        0ms submit B3 by S1 (2 tasks)
        0ms submit B3 by S1 (1 tasks)
          build B3 rejected: a build with this id was submitted
        0ms submit B4 by S1 (2 tasks)
          build B4 rejected: the coordinator's queue is full (2 of 3 tasks); submit later
        0ms submit B5 by S1 (0 tasks)
          build B5 succeeded"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_small_build_is_not_starved_by_a_big_batch() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(2, 2).heartbeat());
    harness.step(build(1, 1, (0..20).map(|_| task()).collect()));
    harness.step(build(2, 2, vec![task()]));
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.finish(id(1, 1), 1, 1, TaskOutcome::Succeeded);
    expect![[r#"
        0ms submit B1 by S1 (20 tasks)
          offer B1.0 #1: placed on P1: no inputs, 2/2 slots free, load 0% (best of 1)
          offer B1.1 #1: placed on P1: no inputs, 1/2 slots free, load 0% (best of 1)
        0ms submit B2 by S2 (1 tasks)
        0ms P1 finished B1.0 #1: succeeded
          accept B1.0 #1 from P1: succeeded
          offer B2.0 #1: placed on P1: no inputs, 1/2 slots free, load 0% (best of 1)
        0ms P1 finished B1.1 #1: succeeded
          accept B1.1 #1 from P1: succeeded
          offer B1.2 #1: placed on P1: no inputs, 1/2 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_coordinator_keeps_to_its_share_while_another_has_tasks_waiting() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(4, 4).heartbeat());
    // Another node, which only coordinates, announces two tasks waiting for room.
    harness.step(peer(9).slots(0, 0).queued(2).heartbeat());
    harness.step(build(1, 1, (0..4).map(|_| task()).collect()));
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.step(peer(9).slots(0, 0).queued(0).heartbeat());
    expect![[r#"
        0ms heartbeat P9: 0/0 free, running 0
        0ms submit B1 by S1 (4 tasks)
          offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)
          offer B1.1 #1: placed on P1: no inputs, 3/4 slots free, load 0% (best of 1)
        0ms P1 finished B1.0 #1: succeeded
          accept B1.0 #1 from P1: succeeded
          offer B1.2 #1: placed on P1: no inputs, 3/4 slots free, load 0% (best of 1)
        0ms heartbeat P9: 0/0 free, running 0
          offer B1.3 #1: placed on P1: no inputs, 2/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn leaving_and_rejoining_does_not_end_a_quarantine() {
    let mut harness = Harness::with(Config {
        quarantine_strikes: 1,
        ..Config::default()
    });
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).slots(4, 1).heartbeat());
    harness.quietly(build(1, 1, vec![task()]));
    harness.quietly(started(1, 0, 1, 1));
    harness.quietly(Event::Finished {
        task: id(1, 0),
        attempt: Attempt(1),
        peer: PeerId(1),
        outcome: error(),
    });
    harness.finish(id(1, 0), 2, 2, TaskOutcome::Succeeded);
    harness.step(Event::PeerGone { peer: PeerId(1) });
    harness.at(1_000).step(peer(1).heartbeat());
    harness.step(build(2, 1, vec![task()]));
    harness.at(300_000).quietly(peer(1).heartbeat());
    harness.quietly(
        peer(2)
            .slots(4, 0)
            .running(&[(id(2, 0), Attempt(1))])
            .heartbeat(),
    );
    harness.step(Event::Tick);
    harness.step(build(3, 1, vec![task()]));
    expect![[r#"
        0ms P2 finished B1.0 #2: succeeded
          accept B1.0 #2 from P2: succeeded
          quarantine P1 until 300000ms after 1 strike: runs that failed there but not elsewhere, or work refused that its heartbeat offered
          build B1 succeeded
        0ms P1 gone
        1000ms heartbeat P1: 4/4 free, running 0
        1000ms submit B2 by S1 (1 tasks)
          offer B2.0 #1: placed on P2: no inputs, 1/4 slots free, load 0% (best of 1)
        300000ms tick
        300000ms submit B3 by S1 (1 tasks)
          offer B3.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_user_can_ask_where_a_task_stands() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(1, 1).heartbeat());
    harness.quietly(peer(2).slots(1, 1).heartbeat());
    harness.quietly(build(
        1,
        1,
        vec![task().key(3), task(), task().depends_on(&[0, 1])],
    ));
    // P1 fails to run the first task: its retry waits for P2 rather than going back to P1.
    harness.quietly(started(1, 0, 1, 1));
    harness.quietly(started(1, 1, 1, 2));
    harness.at(1_000).quietly(Event::Finished {
        task: id(1, 0),
        attempt: Attempt(1),
        peer: PeerId(1),
        outcome: error(),
    });
    let mut lines = Vec::new();
    let mut show = |harness: &mut Harness, at: u64| {
        harness.at(at);
        for index in 0..3 {
            let status = harness.scheduler.status(harness.now, id(1, index));
            lines.push(format!(
                "{at}ms B1.{index}: {}",
                status.map_or("-".into(), |s| s.to_string())
            ));
        }
    };
    show(&mut harness, 2_000);
    harness.quietly(Event::Finished {
        task: id(1, 1),
        attempt: Attempt(1),
        peer: PeerId(2),
        outcome: TaskOutcome::Succeeded,
    });
    show(&mut harness, 3_000);
    expect![[r#"
        2000ms B1.0: queued for 1s: 2 peers can run it, waiting for a peer other than P1 (where it failed)
        2000ms B1.1: running #1 on P2 for 2s
        2000ms B1.2: waiting for B1.0, B1.1 to succeed
        3000ms B1.0: offered #2 to P2, not yet accepted
        3000ms B1.1: -
        3000ms B1.2: waiting for B1.0 to succeed"#]]
    .assert_eq(&lines.join("\n"));
}

#[test]
fn a_queued_task_fails_when_the_last_peer_that_could_run_it_changes() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(1, 1).heartbeat());
    harness.quietly(peer(2).slots(1, 1).label("gpu", "a100").heartbeat());
    harness.quietly(build(1, 1, vec![task(), task()]));
    harness.step(build(
        2,
        1,
        vec![task().requires(|r| {
            r.labels.insert("gpu".into(), "a100".into());
        })],
    ));
    // P2's owner takes the label away: nothing left can run the queued GPU task.
    harness.at(1_000).step(
        peer(2)
            .slots(1, 0)
            .running(&[(id(1, 1), Attempt(1))])
            .heartbeat(),
    );
    expect![[r#"
        0ms submit B2 by S1 (1 tasks)
        1000ms heartbeat P2: 0/1 free, running 1
          fail B2.0: no peer of 2 can run it; closest: P1, P2 lack label gpu=a100
          build B2 failed (B2.0)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_peer_refusing_work_its_heartbeat_claims_it_can_do_earns_strikes() {
    let mut harness = Harness::with(Config {
        quarantine_strikes: 1,
        ..Config::default()
    });
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).slots(4, 1).heartbeat());
    harness.step(build(1, 1, vec![task()]));
    harness.step(Event::OfferDeclined {
        task: id(1, 0),
        attempt: Attempt(1),
        peer: PeerId(1),
        reason: scheduler::DeclineReason::Unsuitable,
    });
    expect![[r#"
        0ms submit B1 by S1 (1 tasks)
          offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 2)
        0ms P1 declines B1.0 #1: Unsuitable
          quarantine P1 until 300000ms after 1 strike: runs that failed there but not elsewhere, or work refused that its heartbeat offered
          offer B1.0 #2: placed on P2: no inputs, 1/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
}
