//! Remote builds end to end: `peerbuild run` beside a node submits to it; the node places the
//! build on the peer with the labels asked for, the worker fetches the source, runs it and
//! streams its log back, the result names the peer and is checked against its key, and the
//! artifacts come back identical to a local build's. A worker killed mid-build has its build
//! run again on another peer; a build no peer can run fails at once, saying why.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tests::cluster::{Cluster, NodeOptions, wait_until};
use tests::{Project, http_get};

const BUILDSPEC: &str = r#"version: 0.2
env:
  parameter-store:
    TOKEN: /ci/token
phases:
  build:
    commands:
      - echo "running on $PEERBUILD_PEER_ID"
      - echo "token $TOKEN"
      - echo "greeting $GREETING"
      - mkdir -p out/sub
      - cat input.txt > out/copy.txt
      - seq 1 2000 | sha256sum > out/sub/sum.txt
      - printf '#!/bin/sh\necho hi\n' > out/run.sh && chmod +x out/run.sh
artifacts:
  files:
    - '**/*'
  base-directory: out
"#;

/// Nodes started with these options, every one allowing `host` builds, all hearing each other.
fn pool(options: Vec<NodeOptions>) -> Cluster {
    let mut cluster = Cluster::new();
    let mut started = Vec::new();
    for mut node in options {
        if let Some(first) = started.first() {
            node.bootstrap = vec![*first];
        }
        let index = cluster.start(node);
        cluster.allow_host(index);
        started.push(index);
    }
    wait_until(
        "every node hears every other",
        Instant::now() + Duration::from_secs(30),
        || {
            started.iter().all(|i| {
                let heard = cluster.peers_heard_by(*i);
                started
                    .iter()
                    .filter(|o| *o != i)
                    .all(|o| heard.contains(&cluster.node(*o).peer_id))
            })
        },
        || cluster.logs(),
    );
    cluster
}

/// Writes the project's secrets file; returns its path.
fn secrets_file(project: &Project, text: &str) -> String {
    let path = project.root().join("secrets.env");
    std::fs::write(&path, text).expect("write the secrets file");
    path.to_str().expect("utf-8").to_owned()
}

fn labelled(label: &str) -> NodeOptions {
    NodeOptions {
        labels: vec![label.into()],
        ..NodeOptions::default()
    }
}

fn files_under(root: &std::path::Path) -> Vec<(String, Vec<u8>, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                let executable = entry.metadata().expect("stat").permissions().mode() & 0o111 != 0;
                let relative = path
                    .strip_prefix(root)
                    .expect("inside")
                    .display()
                    .to_string();
                found.push((relative, std::fs::read(&path).expect("read"), executable));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_build_runs_on_the_peer_with_the_label_and_its_artifacts_come_back() {
    let cluster = pool(vec![
        NodeOptions::default(),
        labelled("zone=b"),
        NodeOptions::default(),
    ]);
    let project = Project::new(&[
        ("buildspec.yml", BUILDSPEC),
        ("input.txt", "from the source\n"),
    ]);
    let remote_out = project.root().join("remote-artifacts");
    let secrets = secrets_file(&project, "/ci/token=s3cr3t-value\n/unused=never-sent\n");
    let secrets = secrets.as_str();
    // A bystander (node 2) hears how the run goes from the worker's gossip.
    let events = UnixStream::connect(cluster.node(2).data_dir().join("api.sock")).expect("api");
    events
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let worker = cluster.node(1).peer_id.clone();
    let announced = {
        let worker = worker.clone();
        std::thread::spawn(move || {
            http_get(events, "/v1/events", "", |text| {
                text.lines().any(|line| {
                    line.contains("\"event\":\"task_state\"")
                        && line.contains("\"state\":\"finished\"")
                        && line.contains(&worker)
                })
            })
        })
    };
    let remote = cluster.run_on(
        0,
        &project,
        &[
            "--require",
            "zone=b",
            "--secrets",
            secrets,
            "--env",
            "GREETING=hello from the submitter",
            "--artifacts",
            remote_out.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        remote.code,
        0,
        "{}\n{}\n{}",
        remote.stdout,
        remote.stderr,
        cluster.logs()
    );
    assert_eq!(
        remote.result()["peer"],
        worker.as_str(),
        "the result names the peer"
    );
    assert!(
        remote.log().contains(&format!("running on {worker}")),
        "PEERBUILD_PEER_ID is the worker's: {}",
        remote.log()
    );
    let transcript = remote.transcript();
    assert!(
        transcript.contains(&format!("running on peer {worker}")),
        "the build says where it runs: {transcript}"
    );
    // The secret reached the build on the worker, and no output shows it; nothing the worker
    // keeps holds it, nor the secret the build does not read (which never left this machine).
    assert!(remote.log().contains("token ***"), "{}", remote.log());
    // The submitter's --env reached the build on the worker (on a pipe, not a command line).
    assert!(
        remote.log().contains("greeting hello from the submitter"),
        "{}",
        remote.log()
    );
    assert!(!remote.stdout.contains("s3cr3t-value"));
    for (path, bytes, _) in files_under(cluster.node(1).data_dir()) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("s3cr3t-value") && !text.contains("never-sent"),
            "the worker keeps a secret in {path}"
        );
    }

    let build_id = remote.result()["build_id"].as_str().expect("id").to_owned();
    let announced = announced.join().expect("the event stream");
    let finished = announced
        .lines()
        .find(|line| line.contains("\"state\":\"finished\""))
        .expect("a finished run");
    assert!(
        finished.contains("\"status\":\"SUCCEEDED\"") && finished.contains(&build_id),
        "the worker announced how the run ended: {finished}"
    );
    assert!(
        announced.contains("\"state\":\"running\""),
        "the worker announced it took the run: {announced}"
    );

    // The same build on an embedded pool gives the same artifacts, byte for byte and mode.
    let local_out = project.root().join("local-artifacts");
    let local = project.run(&[
        "--sandbox",
        "host",
        "--secrets",
        secrets,
        "--artifacts",
        local_out.to_str().expect("utf-8"),
    ]);
    assert_eq!(local.code, 0, "{}", local.stdout);
    let remote_files = files_under(&remote_out);
    assert!(!remote_files.is_empty());
    assert_eq!(remote_files, files_under(&local_out));
    assert_eq!(
        remote.result()["artifacts"][0]["digest"],
        local.result()["artifacts"][0]["digest"],
        "the artifact trees are identical"
    );

    // The submitter keeps the build's record.
    let builds = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(cluster.node(0).data_dir())
        .args(["builds", "--json"])
        .output()
        .expect("peerbuild builds");
    let listed = String::from_utf8_lossy(&builds.stdout);
    let id = remote.result()["build_id"].as_str().expect("id").to_owned();
    assert!(listed.contains(&id), "{listed}");
}

#[test]
fn a_build_from_another_data_directory_hands_over_its_source_and_gets_its_artifacts() {
    let cluster = pool(vec![NodeOptions::default(), labelled("zone=b")]);
    let project = Project::new(&[
        ("buildspec.yml", BUILDSPEC),
        ("input.txt", "from a store the node does not share\n"),
    ]);
    let secrets = secrets_file(&project, "/ci/token=from-elsewhere\n");
    let api = format!(
        "unix:{}",
        cluster.node(0).data_dir().join("api.sock").display()
    );
    let out = project.root().join("out");
    // The project's own data directory, not the node's: only the API joins them.
    let run = project.run(&[
        "--node",
        &api,
        "--require",
        "zone=b",
        "--secrets",
        &secrets,
        "--artifacts",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        run.code,
        0,
        "{}\n{}\n{}",
        run.stdout,
        run.stderr,
        cluster.logs()
    );
    assert_eq!(run.result()["peer"], cluster.node(1).peer_id.as_str());
    assert_eq!(
        std::fs::read_to_string(out.join("copy.txt")).expect("the artifact came back"),
        "from a store the node does not share\n"
    );
    // The artifacts are in the submitter's own store too, as the summary says.
    let digest = run.result()["artifacts"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let again = project.root().join("again");
    let export = project
        .command()
        .args(["cache", "export", &digest])
        .arg(&again)
        .output()
        .expect("cache export");
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert_eq!(files_under(&again), files_under(&out));
}

#[test]
fn a_build_no_peer_can_run_fails_at_once_saying_why() {
    let cluster = pool(vec![NodeOptions::default(), NodeOptions::default()]);
    let project = Project::new(&[("buildspec.yml", BUILDSPEC), ("input.txt", "x\n")]);
    let started = Instant::now();
    let secrets = secrets_file(&project, "/ci/token=not-in-any-peer-id\n");
    let run = cluster.run_on(
        0,
        &project,
        &["--require", "gpu=a100", "--secrets", &secrets],
    );
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    let message = run.result()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("no peer can run this build") && message.contains("gpu=a100"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it fails at once"
    );
}

/// What became of a build whose worker was taken away mid-build.
struct Lost {
    stdout: String,
    result: serde_json::Value,
    victim_id: String,
    survivor_id: String,
}

/// Runs a slow build on one of two workers and, as soon as it runs there, takes that worker
/// away with `take_away`; returns once the build ended, asserting it succeeded.
fn lose_a_worker_mid_build(take_away: impl FnOnce(&mut Cluster, usize)) -> Lost {
    let mut cluster = pool(vec![
        NodeOptions::default(),
        labelled("role=worker"),
        labelled("role=worker"),
    ]);
    let slow = BUILDSPEC.replace(
        "      - mkdir -p out/sub\n",
        "      - sleep 4\n      - mkdir -p out/sub\n",
    );
    let project = Project::new(&[("buildspec.yml", slow.as_str()), ("input.txt", "x\n")]);
    let secrets = secrets_file(&project, "/ci/token=not-in-any-peer-id\n");
    let mut child = cluster.spawn_run_on(
        0,
        &project,
        &["--require", "role=worker", "--secrets", &secrets],
    );
    // Whichever worker took it is taken away as soon as it runs the build.
    let mut victim = None;
    wait_until(
        "a worker starts the build",
        Instant::now() + Duration::from_secs(60),
        || {
            victim = [1, 2].into_iter().find(|i| {
                cluster
                    .node(*i)
                    .log()
                    .contains("running a build for a peer")
            });
            victim.is_some()
        },
        || cluster.logs(),
    );
    let victim = victim.expect("a worker took the build");
    let victim_id = cluster.node(victim).peer_id.clone();
    let survivor_id = cluster.node(3 - victim).peer_id.clone();
    take_away(&mut cluster, victim);

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the build never ended:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    assert_eq!(status.code(), Some(0), "{stdout}\n{}", cluster.logs());
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let result = events
        .iter()
        .rev()
        .find(|e| e["event"] == "build_finished")
        .expect("a result")["result"]
        .clone();
    assert_eq!(result["peer"], survivor_id.as_str(), "{}", cluster.logs());
    Lost {
        stdout,
        result,
        victim_id,
        survivor_id,
    }
}

#[test]
fn a_worker_killed_mid_build_has_its_build_run_again_on_another_peer() {
    let lost = lose_a_worker_mid_build(|cluster, victim| cluster.kill(victim));
    assert!(
        lost.stdout.contains(&format!(
            "peer {} was lost while running the build",
            lost.victim_id
        )),
        "the user sees why it ran again: {}",
        lost.stdout
    );
    assert!(
        lost.result["message"]
            .as_str()
            .is_some_and(|m| m.contains(&lost.victim_id)),
        "{}",
        lost.result
    );
}

#[test]
fn a_worker_stopped_mid_build_hands_it_back_and_it_runs_on_another_peer() {
    let lost = lose_a_worker_mid_build(|cluster, victim| {
        let status = cluster.stop(victim);
        assert!(status.success(), "SIGTERM ends the node with 0: {status:?}");
    });
    assert!(
        lost.stdout.contains(&format!(
            "peer {} was lost while running the build (the peer is shutting down and handed the build back)",
            lost.victim_id
        )),
        "the user sees it was handed back: {}",
        lost.stdout
    );
    assert_ne!(lost.victim_id, lost.survivor_id);
}

#[test]
fn a_batch_fans_its_members_out_across_peers() {
    let one_slot = |label: &str| NodeOptions {
        labels: vec![label.into()],
        slots: Some(1),
        ..NodeOptions::default()
    };
    let cluster = pool(vec![
        one_slot("role=submitter"),
        one_slot("role=worker"),
        one_slot("role=worker"),
    ]);
    let buildspec = r#"version: 0.2
batch:
  build-graph:
    - identifier: first
    - identifier: second
    - identifier: third
      depend-on:
        - first
phases:
  build:
    commands:
      - sleep 2
      - echo "$CODEBUILD_BATCH_BUILD_IDENTIFIER ran on $PEERBUILD_PEER_ID"
      - mkdir -p out && echo "$CODEBUILD_BATCH_BUILD_IDENTIFIER" > out/which.txt
artifacts:
  files:
    - out/which.txt
"#;
    let project = Project::new(&[("buildspec.yml", buildspec)]);
    let out = project.root().join("artifacts");
    let run = cluster.run_on(
        0,
        &project,
        &[
            "--require",
            "role=worker",
            "--artifacts",
            out.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        run.code,
        0,
        "{}\n{}\n{}",
        run.stdout,
        run.stderr,
        cluster.logs()
    );
    let members = run.result()["members"].as_array().expect("members").clone();
    assert_eq!(members.len(), 3);
    let workers = [
        cluster.node(1).peer_id.clone(),
        cluster.node(2).peer_id.clone(),
    ];
    let mut peers: Vec<String> = members
        .iter()
        .map(|m| m["peer"].as_str().expect("peer").to_owned())
        .collect();
    for (member, peer) in members.iter().zip(&peers) {
        assert!(workers.contains(peer), "{member}");
        let identifier = member["member"].as_str().expect("member");
        assert!(
            run.log().contains(&format!("{identifier} ran on {peer}")),
            "{}",
            run.log()
        );
        assert_eq!(
            std::fs::read_to_string(out.join(identifier).join("out/which.txt")).expect("artifact"),
            format!("{identifier}\n")
        );
    }
    peers.sort();
    peers.dedup();
    assert_eq!(
        peers.len(),
        2,
        "two one-slot workers ran the members side by side"
    );
}
