//! The pool end to end: real `peerbuild node` processes on loopback that find each other through
//! bootstrap addresses, the DHT and gossip, keep strangers out (pool keys, allow-lists), and stop
//! cleanly; `peerbuild status` and `peerbuild pool init` against them.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tests::cluster::{Cluster, Lan, NodeOptions, wait_until};
use tests::{TempDir, http_get};

fn deadline(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

fn sees_all(cluster: &Cluster, index: usize, others: &[usize]) -> bool {
    let heard = cluster.peers_heard_by(index);
    others
        .iter()
        .all(|other| heard.contains(&cluster.node(*other).peer_id))
}

/// Proving that something does not happen needs a window: this many heartbeats of test nodes.
fn let_a_few_heartbeats_pass() {
    std::thread::sleep(Duration::from_secs(4));
}

fn pool_key(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    let path = cluster.scratch().join(name);
    let output = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(cluster.scratch().join("keys"))
        .args(["pool", "init", "--out"])
        .arg(&path)
        .output()
        .expect("runs pool init");
    assert!(
        output.status.success(),
        "pool init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("peerbuild node --pool-key") && printed.contains("--bootstrap"),
        "pool init prints the join command: {printed}"
    );
    assert!(
        printed.contains("placeholder") && printed.contains("THIS_PEER_ID"),
        "with no node running, pool init says the address is a placeholder: {printed}"
    );
    let mode = std::fs::metadata(&path)
        .expect("key written")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the pool key is private");
    path
}

#[test]
fn three_nodes_joined_by_bootstrap_see_each_other_with_labels_and_slots() {
    let mut cluster = Cluster::new();
    let first = cluster.start(NodeOptions {
        labels: vec!["zone=a".into(), "gpu=none".into()],
        slots: Some(3),
        ..NodeOptions::default()
    });
    let second = cluster.start(NodeOptions {
        bootstrap: vec![first],
        ..NodeOptions::default()
    });
    // The third knows only the second: it must find the first through the DHT and gossip.
    let third = cluster.start(NodeOptions {
        bootstrap: vec![second],
        slots: Some(1),
        ..NodeOptions::default()
    });
    let all = [first, second, third];
    for index in all {
        let others: Vec<usize> = all.iter().copied().filter(|o| *o != index).collect();
        wait_until(
            &format!("node {index} to hear every other node"),
            deadline(45),
            || sees_all(&cluster, index, &others),
            || cluster.logs(),
        );
    }
    // Sandboxes are probed once at start-up (the namespace probe builds a sandbox), so they may
    // come a few heartbeats after the peer itself on a loaded machine.
    let first_as_seen = |status: &serde_json::Value| {
        status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["peer_id"] == cluster.node(first).peer_id.as_str())
            .cloned()
            .expect("the third node lists the first")
    };
    wait_until(
        "the first node's sandboxes reach the third",
        deadline(60),
        || first_as_seen(&cluster.status(third))["sandboxes"]["host"].is_object(),
        || cluster.logs(),
    );
    let status = cluster.status(third);
    let seen = &first_as_seen(&status);
    assert_eq!(seen["labels"]["zone"], "a");
    assert_eq!(seen["labels"]["gpu"], "none");
    assert_eq!(seen["slots_total"], 3);
    assert_eq!(seen["slots_free"], 3);
    assert!(seen["load"].is_number());
    assert_eq!(seen["protocol_major"], 1);
    assert!(
        seen["agent_version"]
            .as_str()
            .is_some_and(|a| a.starts_with("peerbuild/"))
    );
    assert!(
        seen["sandboxes"]["host"].is_object(),
        "sandboxes are announced: {seen}"
    );
    assert_eq!(status["node"]["slots_total"], 1);
    assert_eq!(
        status["node"]["peer_id"],
        cluster.node(third).peer_id.as_str()
    );

    // The table names every peer.
    let table = cluster.status_command(first, &[]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    for index in all {
        assert!(table.contains(&cluster.node(index).peer_id), "{table}");
    }
    assert!(
        table.contains("zone=a") && table.contains("3/3 free"),
        "{table}"
    );

    // A node that stops says so, and the others forget it.
    assert!(cluster.stop(second).success());
    wait_until(
        "the stopped node to be forgotten",
        deadline(20),
        || {
            !cluster
                .peers_heard_by(first)
                .contains(&cluster.node(second).peer_id)
        },
        || cluster.logs(),
    );
}

#[test]
fn a_node_with_another_pool_key_or_none_is_kept_out() {
    let mut cluster = Cluster::new();
    let key = pool_key(&cluster, "pool.key");
    let other_key = pool_key(&cluster, "other.key");
    let first = cluster.start(NodeOptions {
        pool_key: Some(key.clone()),
        ..NodeOptions::default()
    });
    let member = cluster.start(NodeOptions {
        pool_key: Some(key),
        bootstrap: vec![first],
        ..NodeOptions::default()
    });
    let stranger = cluster.start(NodeOptions {
        pool_key: Some(other_key),
        bootstrap: vec![first, member],
        ..NodeOptions::default()
    });
    let keyless = cluster.start(NodeOptions {
        bootstrap: vec![first, member],
        ..NodeOptions::default()
    });
    wait_until(
        "the two members to hear each other",
        deadline(30),
        || sees_all(&cluster, first, &[member]) && sees_all(&cluster, member, &[first]),
        || cluster.logs(),
    );
    let_a_few_heartbeats_pass();
    for index in [first, member] {
        let listed = cluster.peers_listed_by(index);
        for outsider in [stranger, keyless] {
            assert!(
                !listed.contains(&cluster.node(outsider).peer_id),
                "node {index} lists outsider {outsider}: {listed:?}\n{}",
                cluster.logs()
            );
        }
    }
    for outsider in [stranger, keyless] {
        assert_eq!(
            cluster.peers_listed_by(outsider),
            Vec::<String>::new(),
            "outsider {outsider} got a connection\n{}",
            cluster.logs()
        );
    }
    // A private node listens on TCP only: QUIC is refused, as bad usage.
    let refused = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(cluster.scratch().join("quic"))
        .args([
            "node",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--pool-key",
        ])
        .arg(cluster.scratch().join("pool.key"))
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("TCP only"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn a_peer_that_dies_is_forgotten_when_its_lease_runs_out() {
    let mut cluster = Cluster::new();
    let survivor = cluster.start(NodeOptions::default());
    let victim = cluster.start(NodeOptions {
        bootstrap: vec![survivor],
        ..NodeOptions::default()
    });
    wait_until(
        "the survivor to hear the victim",
        deadline(30),
        || sees_all(&cluster, survivor, &[victim]),
        || cluster.logs(),
    );
    let killed_at = Instant::now();
    cluster.kill(victim);
    let victim_id = cluster.node(victim).peer_id.clone();
    wait_until(
        "the survivor to forget the dead peer",
        deadline(30),
        || !cluster.peers_listed_by(survivor).contains(&victim_id),
        || cluster.logs(),
    );
    // Not before its lease (5 s) ran out: a dead peer sends no goodbye.
    assert!(
        killed_at.elapsed() >= Duration::from_secs(4),
        "forgotten after {:?}",
        killed_at.elapsed()
    );
    assert!(
        cluster.node(survivor).log().contains("peer lease expired"),
        "{}",
        cluster.logs()
    );
}

#[test]
fn an_allow_list_keeps_an_off_list_peer_out() {
    let mut cluster = Cluster::new();
    let open = cluster.start(NodeOptions::default());
    let guarded = cluster.start(NodeOptions {
        bootstrap: vec![open],
        allow_peers: vec![cluster.node(open).peer_id.clone()],
        ..NodeOptions::default()
    });
    // Off the list: it dials the guarded node directly and also reaches it through gossip
    // forwarded by the open node.
    let outsider = cluster.start(NodeOptions {
        bootstrap: vec![guarded, open],
        ..NodeOptions::default()
    });
    wait_until(
        "the open node to hear both others",
        deadline(30),
        || sees_all(&cluster, open, &[guarded, outsider]),
        || cluster.logs(),
    );
    wait_until(
        "the guarded node to hear the open node",
        deadline(30),
        || sees_all(&cluster, guarded, &[open]),
        || cluster.logs(),
    );
    let_a_few_heartbeats_pass();
    let outsider_id = cluster.node(outsider).peer_id.clone();
    let status = cluster.status(guarded);
    let listed: Vec<&str> = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["peer_id"].as_str())
        .collect();
    assert!(
        !listed.contains(&outsider_id.as_str()),
        "the guarded node lists the outsider: {listed:?}\n{}",
        cluster.logs()
    );
    // The outsider may hear the guarded node's heartbeats through the open node (which has no
    // allow-list), but the guarded node refuses every connection from it.
    let refused = cluster
        .node(guarded)
        .log()
        .lines()
        .any(|line| line.contains("refused") && line.contains(&outsider_id));
    assert!(
        refused,
        "the guarded node logs refusing the outsider's connection\n{}",
        cluster.logs()
    );
}

#[test]
fn a_node_stops_cleanly_keeps_its_identity_and_guards_its_files() {
    let mut cluster = Cluster::new();
    let node = cluster.start(NodeOptions::default());
    let data = cluster.node(node).data_dir().to_owned();
    let peer_id = cluster.node(node).peer_id.clone();
    let mode = |name: &str| {
        std::fs::metadata(data.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("api.sock"),
        0o600,
        "the API socket is the owner's only"
    );
    assert_eq!(mode("identity.key"), 0o600);

    // `pool init` beside a running node prints its real address for the join command.
    let init = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(&data)
        .args(["pool", "init"])
        .output()
        .expect("runs");
    let printed = String::from_utf8_lossy(&init.stdout);
    assert!(init.status.success(), "{printed}");
    assert!(
        printed.contains(&format!(
            "--bootstrap {}",
            cluster.node(node).bootstrap_addresses[0]
        )),
        "{printed}"
    );
    assert_eq!(mode("pool.key"), 0o600);
    let again = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(&data)
        .args(["pool", "init"])
        .output()
        .expect("runs");
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // A second node on the same data directory is refused.
    let second = cluster
        .node_command(&data, &NodeOptions::default())
        .output()
        .expect("runs");
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another node is already running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let status = cluster.stop(node);
    assert!(status.success(), "SIGTERM ends the node with 0: {status:?}");
    assert!(!data.join("node.json").exists(), "node.json is removed");
    assert!(!data.join("api.sock").exists(), "the socket is removed");

    cluster.restart(node, NodeOptions::default());
    assert_eq!(
        cluster.node(node).peer_id,
        peer_id,
        "the identity survives a restart"
    );
    assert!(cluster.stop(node).success());

    std::fs::set_permissions(
        data.join("identity.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let refused = cluster
        .node_command(&data, &NodeOptions::default())
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("identity key") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[test]
fn the_api_streams_events_and_loopback_tcp_needs_the_token() {
    let mut cluster = Cluster::new();
    let first = cluster.start(NodeOptions {
        api_tcp: true,
        ..NodeOptions::default()
    });
    let data = cluster.node(first).data_dir().to_owned();
    let events = UnixStream::connect(data.join("api.sock")).expect("connects to api.sock");
    events
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let second = cluster.start(NodeOptions {
        bootstrap: vec![first],
        ..NodeOptions::default()
    });
    let second_id = cluster.node(second).peer_id.clone();
    let streamed = http_get(&events, "/v1/events", "", |text| {
        text.contains("\"event\":\"peer_joined\"")
            && text.contains("\"event\":\"peer_heartbeat\"")
            && text.contains(&second_id)
    });
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed}");

    let node: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("node.json")).expect("node.json"))
            .expect("json");
    let url = node["api_tcp"]
        .as_str()
        .expect("api_tcp in node.json")
        .to_owned();
    let authority = url.trim_start_matches("http://");
    let mode = std::fs::metadata(data.join("api.token"))
        .expect("api.token")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let connect = || {
        let stream = TcpStream::connect(authority).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        stream
    };
    let refused = http_get(connect(), "/v1/status", "", |t| t.contains("api.token"));
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let wrong = http_get(
        connect(),
        "/v1/status",
        "Authorization: Bearer not-the-token\r\n",
        |t| t.contains("api.token"),
    );
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let token = std::fs::read_to_string(data.join("api.token")).expect("token");
    let allowed = http_get(
        connect(),
        "/v1/status",
        &format!("Authorization: Bearer {}\r\n", token.trim()),
        |t| t.contains("\"peers\""),
    );
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");

    // `status --node http://...` reads the token from the data directory.
    let output = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(&data)
        .args(["status", "--json", "--node", &url])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains(&second_id));
}

#[test]
fn mdns_finds_peers_on_a_lan_of_network_namespaces() {
    let Some(lan) = Lan::pair() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to create network namespaces (run as root with iproute2)"
        );
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return;
    };
    let mut cluster = Cluster::new();
    // No bootstrap addresses: only mDNS can introduce them.
    let nodes: Vec<usize> = lan
        .namespaces
        .iter()
        .map(|namespace| {
            cluster.start(NodeOptions {
                netns: Some(namespace.clone()),
                ..NodeOptions::default()
            })
        })
        .collect();
    for (index, other) in [(nodes[0], nodes[1]), (nodes[1], nodes[0])] {
        wait_until(
            &format!("node {index} to find node {other} by mDNS"),
            deadline(45),
            || sees_all(&cluster, index, &[other]),
            || cluster.logs(),
        );
    }
    drop(cluster);
}

#[test]
fn bad_node_flags_are_refused_as_usage_errors() {
    let data = TempDir::new("bad-flags");
    for (args, expected) in [
        (
            &["--bootstrap", "/ip4/127.0.0.1/tcp/1"][..],
            "must end in /p2p/PEER_ID",
        ),
        (&["--listen", "not-an-address"][..], "not a multiaddr"),
        (&["--label", "gpu"][..], "write KEY=VALUE"),
        (&["--allow-peer", "nobody"][..], "not a peer id"),
        (&["--slots", "0"][..], "at least one slot"),
        (
            &["--lease", "5s", "--heartbeat-interval", "5s"][..],
            "--lease must be longer",
        ),
    ] {
        let output = std::process::Command::new(tests::peerbuild())
            .arg("--data-dir")
            .arg(data.path())
            .args(["node", "--no-mdns"])
            .args(args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn status_without_a_node_exits_3_saying_how_to_start_one() {
    let data = TempDir::new("no-node");
    let output = std::process::Command::new(tests::peerbuild())
        .arg("--data-dir")
        .arg(data.path())
        .arg("status")
        .env_remove("PEERBUILD_NODE")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("peerbuild node"), "{stderr}");
}
