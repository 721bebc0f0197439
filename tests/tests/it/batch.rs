//! Batch builds: every batch form, parallel members with prefixed output, dependencies, failures.

use expect_test::expect;
use tests::Project;

/// Member lines interleave when members run in parallel; sort the transcript's lines per member
/// so the snapshot is stable, keeping each member's own order.
fn by_member(transcript: &str) -> String {
    let mut header = Vec::new();
    let mut members: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    let mut footer = Vec::new();
    for line in transcript.lines() {
        match line.strip_prefix('[').and_then(|rest| rest.split_once(']')) {
            Some((member, _)) => members.entry(member.to_owned()).or_default().push(line),
            None if members.is_empty() => header.push(line),
            None => footer.push(line),
        }
    }
    let mut out: Vec<&str> = header;
    for lines in members.values() {
        out.extend(lines);
    }
    out.extend(footer);
    out.join("\n")
}

#[test]
fn build_list_runs_members_in_parallel_with_their_variables() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
batch:
  build-list:
    - identifier: linux
      env:
        variables:
          TARGET: linux
    - identifier: mac
      env:
        variables:
          TARGET: mac
phases:
  build:
    commands:
      - echo "$CODEBUILD_BATCH_BUILD_IDENTIFIER builds $TARGET"
      - sleep 1
"#,
    )]);
    let started = std::time::Instant::now();
    let run = project.run(&["--slots", "2"]);
    let elapsed = started.elapsed();
    expect![[r#"
        exit 0
        [linux] $ echo "$CODEBUILD_BATCH_BUILD_IDENTIFIER builds $TARGET"
        [linux] | linux builds linux
        [linux] $ sleep 1
        [linux] BUILD SUCCEEDED
        [linux] member SUCCEEDED
        [mac] $ echo "$CODEBUILD_BATCH_BUILD_IDENTIFIER builds $TARGET"
        [mac] | mac builds mac
        [mac] $ sleep 1
        [mac] BUILD SUCCEEDED
        [mac] member SUCCEEDED
        result SUCCEEDED"#]]
    .assert_eq(&by_member(&run.transcript()));
    // Not a timing assertion on speed: two one-second members in sequence would take two.
    assert!(
        elapsed.as_secs_f64() < 1.9,
        "members ran one after another ({elapsed:?})"
    );
}

#[test]
fn build_graph_waits_for_dependencies_and_blocks_after_failure() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
batch:
  build-graph:
    - identifier: first
    - identifier: broken
      env:
        variables:
          FAIL: "yes"
      depend-on: [first]
    - identifier: after_broken
      depend-on: [broken]
    - identifier: tolerated
      ignore-failure: true
      env:
        variables:
          FAIL: "yes"
    - identifier: after_tolerated
      depend-on: [tolerated]
phases:
  build:
    commands:
      - echo "running $CODEBUILD_BATCH_BUILD_IDENTIFIER"
      - test "${FAIL:-no}" = no
"#,
    )]);
    let run = project.run(&["--slots", "1"]);
    expect![[r#"
        exit 1
        [first] $ echo "running $CODEBUILD_BATCH_BUILD_IDENTIFIER"
        [first] | running first
        [first] $ test "${FAIL:-no}" = no
        [first] BUILD SUCCEEDED
        [first] member SUCCEEDED
        [broken] $ echo "running $CODEBUILD_BATCH_BUILD_IDENTIFIER"
        [broken] | running broken
        [broken] $ test "${FAIL:-no}" = no
        [broken] BUILD FAILED: Error while executing command: test "${FAIL:-no}" = no. Reason: exit status 1
        [broken] member FAILED: BUILD: command `test "${FAIL:-no}" = no` exited with status 1
        [after_broken] note: not started: it depends on broken, which did not succeed
        [tolerated] $ echo "running $CODEBUILD_BATCH_BUILD_IDENTIFIER"
        [tolerated] | running tolerated
        [tolerated] $ test "${FAIL:-no}" = no
        [tolerated] BUILD FAILED: Error while executing command: test "${FAIL:-no}" = no. Reason: exit status 1
        [tolerated] member FAILED: BUILD: command `test "${FAIL:-no}" = no` exited with status 1
        [after_tolerated] $ echo "running $CODEBUILD_BATCH_BUILD_IDENTIFIER"
        [after_tolerated] | running after_tolerated
        [after_tolerated] $ test "${FAIL:-no}" = no
        [after_tolerated] BUILD SUCCEEDED
        [after_tolerated] member SUCCEEDED
        result FAILED: members that did not succeed: broken, after_broken"#]].assert_eq(&run.transcript());
}

#[test]
fn build_matrix_makes_one_member_per_combination() {
    let project = Project::new(&[
        (
            "buildspec.yml",
            r#"
version: 0.2
batch:
  build-matrix:
    static:
      env:
        variables:
          COMMON: shared
    dynamic:
      buildspec:
        - a.yml
        - b.yml
      env:
        variables:
          LEVEL: [1, 2]
"#,
        ),
        (
            "a.yml",
            "version: 0.2\nphases:\n  build:\n    commands:\n      - echo \"a level=$LEVEL common=$COMMON\"\n",
        ),
        (
            "b.yml",
            "version: 0.2\nphases:\n  build:\n    commands:\n      - echo \"b level=$LEVEL\"\n",
        ),
    ]);
    let run = project.run(&["--slots", "1"]);
    expect![[r#"
        exit 0
        [matrix_1] note: buildspec a.yml, LEVEL=1
        [matrix_2] note: buildspec a.yml, LEVEL=2
        [matrix_3] note: buildspec b.yml, LEVEL=1
        [matrix_4] note: buildspec b.yml, LEVEL=2
        [matrix_1] $ echo "a level=$LEVEL common=$COMMON"
        [matrix_1] | a level=1 common=shared
        [matrix_1] BUILD SUCCEEDED
        [matrix_1] member SUCCEEDED
        [matrix_2] $ echo "a level=$LEVEL common=$COMMON"
        [matrix_2] | a level=2 common=shared
        [matrix_2] BUILD SUCCEEDED
        [matrix_2] member SUCCEEDED
        [matrix_3] $ echo "b level=$LEVEL"
        [matrix_3] | b level=1
        [matrix_3] BUILD SUCCEEDED
        [matrix_3] member SUCCEEDED
        [matrix_4] $ echo "b level=$LEVEL"
        [matrix_4] | b level=2
        [matrix_4] BUILD SUCCEEDED
        [matrix_4] member SUCCEEDED
        result SUCCEEDED"#]]
    .assert_eq(&run.transcript());
}

#[test]
fn build_fanout_tells_each_member_its_share() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
batch:
  build-fanout:
    parallelism: 3
phases:
  build:
    commands:
      - echo "shard $PEERBUILD_FANOUT_INDEX of $PEERBUILD_FANOUT_COUNT"
"#,
    )]);
    let run = project.run(&["--slots", "1"]);
    expect![[r#"
        exit 0
        [fanout_1] note: fan-out member 1 of 3
        [fanout_2] note: fan-out member 2 of 3
        [fanout_3] note: fan-out member 3 of 3
        [fanout_1] $ echo "shard $PEERBUILD_FANOUT_INDEX of $PEERBUILD_FANOUT_COUNT"
        [fanout_1] | shard 0 of 3
        [fanout_1] BUILD SUCCEEDED
        [fanout_1] member SUCCEEDED
        [fanout_2] $ echo "shard $PEERBUILD_FANOUT_INDEX of $PEERBUILD_FANOUT_COUNT"
        [fanout_2] | shard 1 of 3
        [fanout_2] BUILD SUCCEEDED
        [fanout_2] member SUCCEEDED
        [fanout_3] $ echo "shard $PEERBUILD_FANOUT_INDEX of $PEERBUILD_FANOUT_COUNT"
        [fanout_3] | shard 2 of 3
        [fanout_3] BUILD SUCCEEDED
        [fanout_3] member SUCCEEDED
        result SUCCEEDED"#]]
    .assert_eq(&run.transcript());
}

#[test]
fn fast_fail_stops_the_other_members() {
    let marker = tests::marker("fastfail");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            r#"
version: 0.2
batch:
  fast-fail: true
  build-list:
    - identifier: slow
      env:
        variables:
          WAIT: "30"
    - identifier: failing
      env:
        variables:
          WAIT: "0"
phases:
  build:
    commands:
      - sh -c 'sleep $WAIT && echo {marker}'
      - test "$WAIT" != 0
"#
        ),
    )]);
    let started = std::time::Instant::now();
    let run = project.run(&["--slots", "2"]);
    assert!(
        started.elapsed().as_secs() < 25,
        "the slow member was not stopped"
    );
    expect![[r#"
        exit 1
        [failing] $ sh -c 'sleep $WAIT && echo MARKER'
        [failing] | MARKER
        [failing] $ test "$WAIT" != 0
        [failing] BUILD FAILED: Error while executing command: test "$WAIT" != 0. Reason: exit status 1
        [failing] member FAILED: BUILD: command `test "$WAIT" != 0` exited with status 1
        [slow] $ sh -c 'sleep $WAIT && echo MARKER'
        [slow] BUILD STOPPED: the build was stopped; its processes were killed
        [slow] member STOPPED: the build was stopped; its processes were killed
        result FAILED: members that did not succeed: slow, failing"#]].assert_eq(&by_member(&run.transcript().replace(&marker, "MARKER")));
    assert_eq!(tests::processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn privileged_mode_is_refused_unless_allowed() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
batch:
  build-list:
    - identifier: docker_in_docker
      env:
        privileged-mode: true
phases:
  build:
    commands: [echo privileged]
"#,
    )]);
    let refused = project.run(&[]);
    expect![[r#"
        exit 2
        stderr: peerbuild: batch member `docker_in_docker` asks for privileged-mode, which this node does not allow; pass --allow-privileged, or set sandbox.privileged = true in <DATA>/config.toml"#]].assert_eq(&refused.transcript());
    let allowed = project.run(&["--allow-privileged"]);
    assert_eq!(allowed.code, 0, "{}", allowed.stdout);
}
