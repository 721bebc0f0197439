//! Placement decisions and the line that explains each, data-driven: a pool, a task, and the
//! actions the scheduler answers with.

use expect_test::{Expect, expect};
use scheduler::{Config, Event, Guarantees, PeerId, SandboxKind, TaskOutcome};

use crate::support::{Harness, PeerBuilder, TaskBuilder, build, id, linux, peer, task};

/// Announces `peers`, submits one build of `tasks`, and compares what the scheduler did.
fn check(peers: Vec<PeerBuilder>, tasks: Vec<TaskBuilder>, expected: Expect) {
    let mut harness = Harness::new();
    for peer in peers {
        harness.quietly(peer.heartbeat());
    }
    harness.step(build(1, 1, tasks));
    expected.assert_eq(&harness.transcript());
}

#[test]
fn prefers_the_peer_holding_most_input_bytes() {
    check(
        vec![peer(1).holds(&[10]), peer(2).holds(&[10, 11]), peer(3)],
        vec![task().input(10, 60).input(11, 30).input(12, 10)],
        expect![[r#"
            0ms submit B1 by S1 (1 tasks)
              offer B1.0 #1: placed on P2: holds 90% of inputs, 4/4 slots free, load 0% (best of 2)"#]],
    );
}

#[test]
fn inputs_outweigh_a_busier_peer() {
    check(
        vec![peer(1).slots(4, 1).load(700).holds(&[10]), peer(2)],
        vec![task().input(10, 100)],
        expect![[r#"
            0ms submit B1 by S1 (1 tasks)
              offer B1.0 #1: placed on P1: holds 100% of inputs, 1/4 slots free, load 70% (best of 2)"#]],
    );
}

#[test]
fn without_inputs_free_slots_then_load_decide() {
    check(
        vec![
            peer(1).slots(4, 1),
            peer(2).slots(4, 3).load(600),
            peer(3).slots(4, 3).load(100),
        ],
        vec![task(), task()],
        expect![[r#"
            0ms submit B1 by S1 (2 tasks)
              offer B1.0 #1: placed on P3: no inputs, 3/4 slots free, load 10% (best of 2)
              offer B1.1 #1: placed on P2: no inputs, 3/4 slots free, load 60% (best of 2)"#]],
    );
}

#[test]
fn hard_constraints_come_before_any_score() {
    check(
        vec![
            peer(1).holds(&[10]),
            peer(2).slots(2, 1).load(900).label("gpu", "a100"),
        ],
        vec![task().input(10, 100).requires(|r| {
            r.labels.insert("gpu".into(), "a100".into());
        })],
        expect![[r#"
            0ms submit B1 by S1 (1 tasks)
              offer B1.0 #1: placed on P2: holds 0% of inputs, 1/2 slots free, load 90% (best of 1)"#]],
    );
}

#[test]
fn a_task_no_peer_can_run_fails_at_once_naming_the_closest_peers() {
    let mut mac = linux();
    mac.os = "macos".into();
    check(
        vec![
            peer(1),
            peer(2),
            peer(3).label("gpu", "a100"),
            peer(4).capabilities(mac),
        ],
        vec![
            task().requires(|r| {
                r.labels.insert("gpu".into(), "h100".into());
            }),
            task().requires(|r| {
                r.os = Some("macos".into());
                r.runtimes.insert("python".into(), "3.9".into());
            }),
        ],
        expect![[r#"
            0ms submit B1 by S1 (2 tasks)
              fail B1.0: no peer of 4 can run it; closest: P1, P2, P3 and 1 more lack label gpu=h100
              fail B1.1: no peer of 4 can run it; closest: P4 lacks runtime python 3.9
              build B1 failed (B1.0, B1.1)"#]],
    );
}

#[test]
fn sandbox_kind_guarantees_and_network_are_hard_constraints() {
    let mut weak = linux();
    weak.sandboxes
        .insert(SandboxKind::Namespace, Guarantees::TIME);
    let mut offline = linux();
    offline.network = false;
    check(
        vec![peer(1).capabilities(weak), peer(2).capabilities(offline)],
        vec![
            task().requires(|r| r.guarantees = Guarantees::MEMORY.union(Guarantees::TIME)),
            task().requires(|r| r.sandbox = Some(SandboxKind::Wasm)),
            task().requires(|r| r.network = false),
        ],
        expect![[r#"
            0ms submit B1 by S1 (3 tasks)
              fail B1.0: no peer of 2 can run it; closest: P1 lacks enforced memory limits in the namespace sandbox; P2 lacks network access
              fail B1.1: no peer of 2 can run it; closest: P1 lacks sandbox wasm
              offer B1.2 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 2)"#]],
    );
}

#[test]
fn a_task_that_names_no_sandbox_needs_a_peer_that_offers_one() {
    let mut none = linux();
    none.sandboxes.clear();
    check(
        vec![
            peer(1).capabilities(none.clone()),
            peer(2).capabilities(none),
        ],
        vec![task().requires(|r| r.sandbox = None)],
        expect![[r#"
            0ms submit B1 by S1 (1 tasks)
              fail B1.0: no peer of 2 can run it; closest: P1, P2 lack any sandbox
              build B1 failed (B1.0)"#]],
    );
    check(
        vec![peer(1)],
        vec![task().requires(|r| r.sandbox = None)],
        expect![[r#"
            0ms submit B1 by S1 (1 tasks)
              offer B1.0 #1: placed on P1: no inputs, 4/4 slots free, load 0% (best of 1)"#]],
    );
}

#[test]
fn the_expected_duration_learned_per_class_breaks_ties() {
    let mut arm = linux();
    arm.arch = "aarch64".into();
    let mut harness = Harness::new();
    harness.quietly(peer(1).heartbeat());
    harness.quietly(peer(2).capabilities(arm).heartbeat());
    // One run on each class teaches the scheduler that this task is four times faster on P2's.
    harness.quietly(build(1, 1, vec![task().key(7), task().key(7)]));
    harness.quietly(crate::support::started(1, 0, 1, 1));
    harness.quietly(crate::support::started(1, 1, 1, 2));
    harness.at(10_000);
    harness.finish(id(1, 1), 1, 2, TaskOutcome::Succeeded);
    harness.at(40_000);
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.transcript();
    harness.step(build(2, 1, vec![task().key(7)]));
    expect![[r#"
        40000ms submit B2 by S1 (1 tasks)
          offer B2.0 #1: placed on P2: no inputs, 4/4 slots free, load 0%, expected 10s (best of 2)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn a_finished_task_frees_its_slot_without_waiting_for_a_heartbeat() {
    let mut harness = Harness::new();
    harness.quietly(peer(1).slots(1, 1).heartbeat());
    harness.step(build(1, 1, vec![task(), task()]));
    harness.accept(id(1, 0), 1, 1);
    harness.at(5_000);
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    expect![[r#"
        0ms submit B1 by S1 (2 tasks)
          offer B1.0 #1: placed on P1: no inputs, 1/1 slots free, load 0% (best of 1)
        0ms P1 starts B1.0 #1
        5000ms P1 finished B1.0 #1: succeeded
          accept B1.0 #1 from P1: succeeded
          offer B1.1 #1: placed on P1: no inputs, 1/1 slots free, load 0%, expected 5s (best of 1)"#]]
    .assert_eq(&harness.transcript());
}

#[test]
fn peers_that_come_and_go_with_capabilities_of_their_own_do_not_grow_the_classes() {
    let host = |name: &'static str| {
        move |r: &mut scheduler::Requirements| {
            r.labels.insert("host".into(), name.into());
        }
    };
    let max_classes = 8;
    let mut harness = Harness::with(Config {
        max_classes,
        ..Config::default()
    });
    harness.quietly(peer(1).label("host", "stays").heartbeat());
    harness.quietly(peer(2).label("host", "leaves").heartbeat());
    // The scheduler learns how long task 7 takes on each of the two classes.
    harness.quietly(build(
        1,
        1,
        vec![
            task().key(7).requires(host("stays")),
            task().key(7).requires(host("leaves")),
        ],
    ));
    harness.quietly(crate::support::started(1, 0, 1, 1));
    harness.quietly(crate::support::started(1, 1, 1, 2));
    harness.at(10_000);
    harness.finish(id(1, 0), 1, 1, TaskOutcome::Succeeded);
    harness.finish(id(1, 1), 1, 2, TaskOutcome::Succeeded);
    harness.quietly(Event::PeerGone { peer: PeerId(2) });
    // Thrice as many peers as classes are kept come and go, each with a label of its own.
    let churned = 3 * max_classes as u64;
    for p in 100..100 + churned {
        let name = format!("h{p}");
        harness.quietly(peer(p).label("host", &name).heartbeat());
        harness.quietly(Event::PeerGone { peer: PeerId(p) });
    }
    assert_eq!(harness.scheduler.stats().classes, max_classes);
    // The class no peer has been in for longest is the one replaced: a peer restarting while
    // another comes and goes finds its class as it was.
    harness.quietly(Event::PeerGone { peer: PeerId(1) });
    harness.quietly(peer(99).label("host", "passing").heartbeat());
    harness.quietly(Event::PeerGone { peer: PeerId(99) });
    harness.quietly(peer(1).label("host", "stays").heartbeat());
    // A class that stands for other capabilities now matches requirements by its new ones, and
    // knows nothing of the runs of the class it replaced.
    harness.quietly(peer(3).label("host", "new").heartbeat());
    harness.quietly(peer(4).label("host", "leaves").heartbeat());
    harness.transcript();
    harness.step(build(
        2,
        1,
        vec![
            task().key(7).requires(host("new")),
            task().key(7).requires(host("leaves")),
            task().key(7).requires(host("stays")),
        ],
    ));
    expect![[r#"
        10000ms submit B2 by S1 (3 tasks)
          offer B2.2 #1: placed on P1: no inputs, 4/4 slots free, load 0%, expected 10s (best of 1)
          offer B2.1 #1: placed on P4: no inputs, 4/4 slots free, load 0% (best of 1)
          offer B2.0 #1: placed on P3: no inputs, 4/4 slots free, load 0% (best of 1)"#]]
    .assert_eq(&harness.transcript());
    assert_eq!(harness.scheduler.stats().classes, max_classes);
}
