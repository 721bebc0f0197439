//! The pool's shared cache end to end: a cache saved by a build beside one node is restored by
//! a build beside another (`--local`: the builds run on the machine of the node they sit beside) (through gossip announcements and the blob protocol), a peer serving
//! corrupt blobs is caught and bypassed, and `peerbuild cache export` fetches a tree this store
//! lacks from the pool.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tests::Project;
use tests::cluster::{Cluster, NodeOptions, wait_until};

/// A build that makes its `deps` folder only when the cache did not bring it, and prints the
/// checksum of what it has either way.
const BUILDSPEC: &str = r#"version: 0.2
phases:
  build:
    commands:
      - |
        if [ -f deps/made.txt ]; then
          echo "deps restored: $(cat deps/made.txt)"
        else
          mkdir -p deps/small
          echo "made by the first build" > deps/made.txt
          for i in $(seq 1 40); do echo "file $i" > deps/small/f$i.txt; done
          head -c 3000000 /dev/urandom > deps/big.bin
        fi
      - echo "sum $(cat deps/made.txt deps/small/*.txt deps/big.bin | sha256sum | cut -c1-64)"
cache:
  key: deps-v1
  paths:
    - deps/**/*
"#;

/// Three nodes that all heard each other's heartbeats.
fn three_nodes() -> Cluster {
    let mut cluster = Cluster::new();
    let first = cluster.start(NodeOptions::default());
    let second = cluster.start(NodeOptions {
        bootstrap: vec![first],
        ..NodeOptions::default()
    });
    // The third node, which most tests restore on, keeps its files to itself.
    let third = cluster.start(NodeOptions {
        bootstrap: vec![second],
        umask: Some(0o077),
        ..NodeOptions::default()
    });
    let all = [first, second, third];
    wait_until(
        "every node hears every other",
        Instant::now() + Duration::from_secs(30),
        || {
            all.iter().all(|i| {
                let heard = cluster.peers_heard_by(*i);
                all.iter()
                    .filter(|o| *o != i)
                    .all(|o| heard.contains(&cluster.node(*o).peer_id))
            })
        },
        || cluster.logs(),
    );
    cluster
}

fn sum(run: &tests::Run) -> String {
    run.log()
        .lines()
        .find_map(|l| l.strip_prefix("sum "))
        .unwrap_or_else(|| panic!("the build printed its sum:\n{}", run.stdout))
        .to_owned()
}

fn restore_record(run: &tests::Run) -> &serde_json::Value {
    run.result()["caches"]
        .as_array()
        .and_then(|caches| caches.iter().find(|c| c["action"] == "restore"))
        .unwrap_or_else(|| panic!("a restore record: {}", run.result()))
}

fn peers_of(record: &serde_json::Value) -> Vec<String> {
    record["peers"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Flips a byte in the middle of every large (loose) blob of the node's store: the node then
/// serves bad bytes for them, as a lying or broken peer would.
fn corrupt_loose_blobs(data_dir: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path, corrupted: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, corrupted);
            } else if let Ok(mut bytes) = std::fs::read(&path)
                && bytes.len() > 100_000
            {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0xff;
                std::fs::write(&path, bytes).expect("rewrite blob");
                *corrupted += 1;
            }
        }
    }
    let mut corrupted = 0;
    walk(&data_dir.join("store").join("objects"), &mut corrupted);
    corrupted
}

#[test]
fn a_cache_saved_beside_one_node_is_restored_by_a_build_beside_another() {
    let cluster = three_nodes();
    let project = Project::new(&[("buildspec.yml", BUILDSPEC)]);
    let first = cluster.run_on(0, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert_eq!(restore_record(&first)["hit"], false);
    let reason = restore_record(&first)["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("in the pool: no peer has an entry"),
        "a miss says the pool was asked too: {reason}"
    );

    // The third node was never told by the first directly: gossip and the blob protocol bring it.
    let second = cluster.run_on(2, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(
        second.code,
        0,
        "{}\n{}\n{}",
        second.stdout,
        second.stderr,
        cluster.logs()
    );
    assert!(
        second
            .log()
            .contains("deps restored: made by the first build"),
        "{}\n{}",
        second.transcript(),
        cluster.logs()
    );
    assert_eq!(
        sum(&first),
        sum(&second),
        "the restored files are the saved ones"
    );
    assert!(
        second.transcript().contains("written as it arrived"),
        "the node wrote the entry while it arrived: {}",
        second.transcript()
    );
    let record = restore_record(&second);
    assert_eq!(record["hit"], true);
    assert_eq!(record["matched_key"], "deps-v1");
    assert_eq!(peers_of(record), vec![cluster.node(0).peer_id.clone()]);

    // Now it is this node's own: the next build restores it without the pool.
    let third = cluster.run_on(2, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(third.code, 0, "{}", third.stdout);
    assert_eq!(restore_record(&third)["hit"], true);
    assert!(peers_of(restore_record(&third)).is_empty());
}

#[test]
fn a_peer_serving_corrupt_blobs_is_dropped_and_another_holder_serves_them() {
    let cluster = three_nodes();
    let project = Project::new(&[("buildspec.yml", BUILDSPEC)]);
    let saved = cluster.run_on(0, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(saved.code, 0, "{}", saved.stdout);
    // The second node restores it too, and so becomes a holder.
    let copied = cluster.run_on(1, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(copied.code, 0, "{}", copied.stdout);
    assert_eq!(restore_record(&copied)["hit"], true);

    // The first node's large blobs go bad; it still claims to hold them.
    assert!(corrupt_loose_blobs(cluster.node(0).data_dir()) > 0);
    let restored = cluster.run_on(2, &project, &["--local", "--sandbox", "host"]);
    assert_eq!(restored.code, 0, "{}\n{}", restored.stdout, cluster.logs());
    assert_eq!(sum(&saved), sum(&restored), "no bad byte reached the build");
    let record = restore_record(&restored);
    assert_eq!(record["hit"], true);
    let first = cluster.node(0).peer_id.clone();
    let peers = peers_of(record);
    assert!(
        !peers.contains(&first) && peers.contains(&cluster.node(1).peer_id),
        "the blobs came from the honest holder: {peers:?}"
    );
    // The transfer spreads the large blobs over both holders in turn, so the liar is asked for
    // some, caught at the first, and named.
    let transcript = restored.transcript();
    assert!(
        transcript.contains(&format!(
            "a peer was dropped from the transfer (peer {first}: it sent a bad blob"
        )),
        "{transcript}"
    );
}

#[test]
fn cache_export_fetches_a_tree_this_store_lacks_from_the_pool() {
    let cluster = three_nodes();
    let tree = cluster.scratch().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/a.txt"), "alpha\n").expect("write");
    let big: Vec<u8> = (0..2_000_000u64).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(tree.join("big.bin"), &big).expect("write");
    let imported = cluster.cache_on(0, &["import", tree.to_str().expect("utf-8")]);
    assert!(imported.status.success());
    let digest = String::from_utf8_lossy(&imported.stdout).trim().to_owned();

    let out = cluster.scratch().join("out");
    let exported = cluster.cache_on(
        2,
        &["export", "--json", &digest, out.to_str().expect("utf-8")],
    );
    assert!(
        exported.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&exported.stderr),
        cluster.logs()
    );
    assert!(String::from_utf8_lossy(&exported.stderr).contains("fetching it from the pool"));
    // The node wrote the tree into the folder as it arrived, and said what it wrote.
    let answer: serde_json::Value =
        serde_json::from_slice(&exported.stdout).expect("JSON on standard output");
    assert_eq!(
        answer["fetched"]["exported"], answer["exported"],
        "{answer}"
    );
    assert_eq!(answer["exported"]["files"], 2, "{answer}");
    assert_eq!(std::fs::read(out.join("big.bin")).expect("exported"), big);
    assert_eq!(
        std::fs::read_to_string(out.join("sub/a.txt")).expect("exported"),
        "alpha\n"
    );
    // Its folders are open to all, as any export's, whatever the node's umask (0077 here).
    for folder in [out.clone(), out.join("sub")] {
        let mode = std::fs::metadata(&folder)
            .expect("there")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{}", folder.display());
    }

    // A digest no peer holds is a clear error, not a hang.
    let nowhere = format!("{}/12", "ab".repeat(32));
    let missing = cluster.cache_on(
        2,
        &["export", &nowhere, out.join("x").to_str().expect("utf-8")],
    );
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("cannot fetch") && stderr.contains("no peer"),
        "{stderr}"
    );
}
