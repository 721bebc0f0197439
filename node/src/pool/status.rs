//! `peerbuild status` (asks a running node's control API for the pool and prints it) and
//! `peerbuild pool init` (writes a new pool key and prints how another machine joins).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::client::{find_node, get};
use super::view::{PeerStatus, StatusReport};
use super::{NodeFile, identity};
use crate::data_dir::DataDir;
use crate::run::EXIT_FAULT;

/// `peerbuild status`: exit 0 when shown, 3 when no node answers.
pub fn status(data_dir: Option<&Path>, node: Option<&str>, json: bool) -> Result<u8> {
    let endpoint = match find_node(data_dir, node)? {
        Ok(endpoint) => endpoint,
        Err(message) => {
            eprintln!("peerbuild: {message}");
            return Ok(EXIT_FAULT);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let answer = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), get(&endpoint, "/v1/status")).await
    });
    let body = match answer {
        Ok(Ok(body)) => body,
        Ok(Err(err)) => {
            eprintln!(
                "peerbuild: the node is not answering ({err:#}); if it stopped, start it again with `peerbuild node`"
            );
            return Ok(EXIT_FAULT);
        }
        Err(_) => {
            eprintln!("peerbuild: the node did not answer within 10 s");
            return Ok(EXIT_FAULT);
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body).trim_end());
        return Ok(0);
    }
    let report: StatusReport = serde_json::from_slice(&body)
        .context("the node's status answer is not understood (a different peerbuild version?)")?;
    print!("{}", table(&report));
    Ok(0)
}

/// The table `peerbuild status` prints: this node first, then its peers.
fn table(report: &StatusReport) -> String {
    let mut rows = vec![[
        "PEER".to_owned(),
        "SLOTS".to_owned(),
        "LOAD".to_owned(),
        "HEARTBEAT".to_owned(),
        "LABELS".to_owned(),
    ]];
    rows.push(row(&report.node, " (this node)"));
    for peer in &report.peers {
        rows.push(row(peer, if peer.connected { "" } else { " (via gossip)" }));
    }
    let widths: Vec<usize> = (0..5)
        .map(|column| {
            rows.iter()
                .map(|r| r[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let count = report.peers.len();
    out.push_str(&format!(
        "{count} peer{} besides this node\n",
        if count == 1 { "" } else { "s" }
    ));
    out
}

fn row(peer: &PeerStatus, note: &str) -> [String; 5] {
    let slots = match (peer.slots_free, peer.slots_total) {
        (Some(free), Some(total)) => format!("{free}/{total} free"),
        _ => "-".into(),
    };
    let load = peer.load.map_or("-".into(), |l| format!("{l:.2}"));
    let heartbeat = match peer.heartbeat_age_ms {
        Some(ms) if ms < 1000 => "now".into(),
        Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
        None => "none yet".into(),
    };
    let labels = if peer.labels.is_empty() {
        "-".into()
    } else {
        peer.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    [
        format!("{}{note}", peer.peer_id),
        slots,
        load,
        heartbeat,
        labels,
    ]
}

/// `peerbuild pool init`: writes a new key (0600, never over an existing file) and prints the
/// command that joins another machine to the pool.
pub fn pool_init(data_dir: Option<&Path>, out: Option<&Path>) -> Result<u8> {
    let data = DataDir::open(data_dir)?;
    let path = match out {
        Some(path) => path.to_owned(),
        None => data.root().join("pool.key"),
    };
    identity::create_new_private(&path, identity::new_pool_key()?.as_bytes())?;
    let shown = path.canonicalize().unwrap_or(path);
    println!(
        "Wrote a new pool key to {} (mode 0600). Copy it to each machine of the pool over a secure channel (scp); anyone holding it can join.",
        shown.display()
    );
    let running = NodeFile::read(data.root());
    let bootstrap = running.as_ref().and_then(|node| {
        // Other machines cannot reach loopback addresses; offer the others first.
        let mut addresses: Vec<&String> = node
            .bootstrap_addresses
            .iter()
            .filter(|a| !a.starts_with("/ip4/127.") && !a.starts_with("/ip6/::1/"))
            .collect();
        if addresses.is_empty() {
            addresses = node.bootstrap_addresses.iter().collect();
        }
        addresses.first().map(|a| a.to_string())
    });
    match bootstrap {
        Some(address) => {
            println!(
                "\nThis machine's running node is at {address}. Restart it with the key:\n\n  peerbuild node --pool-key {}\n\nthen on each other machine run:\n\n  peerbuild node --pool-key {} --bootstrap {address}",
                shown.display(),
                shown.display()
            );
            println!(
                "\n(The port stays the same across restarts only with a fixed --listen, such as /ip4/0.0.0.0/tcp/4001.)"
            );
        }
        None => {
            println!(
                "\nNo node is running here, so the address below is a placeholder. Start one here with a fixed port:\n\n  peerbuild node --pool-key {} --listen /ip4/0.0.0.0/tcp/4001\n\nthen on each other machine run (with this machine's IP address, and the peer id `peerbuild status` shows here):\n\n  peerbuild node --pool-key {} --bootstrap /ip4/THIS_MACHINE_IP/tcp/4001/p2p/THIS_PEER_ID",
                shown.display(),
                shown.display()
            );
        }
    }
    Ok(0)
}
