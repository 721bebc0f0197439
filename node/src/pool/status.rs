//! `peerbuild status` (asks a running node's control API for the pool and prints it) and
//! `peerbuild pool init` (writes a new pool key and prints how another machine joins).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::view::{PeerStatus, StatusReport};
use super::{NodeFile, api, identity};
use crate::data_dir::DataDir;
use crate::run::EXIT_FAULT;

/// The largest API answer the CLI reads.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Where the node's API is, and how to get in.
enum Endpoint {
    Unix(PathBuf),
    Tcp { authority: String, token: String },
}

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

/// `--node`, else `$PEERBUILD_NODE`, else `DATA_DIR/node.json`. The inner error is the message
/// for "no node".
fn find_node(
    data_dir: Option<&Path>,
    node: Option<&str>,
) -> Result<std::result::Result<Endpoint, String>> {
    let from_env = std::env::var("PEERBUILD_NODE")
        .ok()
        .filter(|v| !v.is_empty());
    let data = DataDir::open(data_dir)?;
    let url = match node.map(str::to_owned).or(from_env) {
        Some(url) => url,
        None => {
            let path = data.root().join("node.json");
            let Ok(bytes) = std::fs::read(&path) else {
                return Ok(Err(format!(
                    "no node is running (no {}); start one with `peerbuild node`, or point to one with --node URL",
                    path.display()
                )));
            };
            let node: NodeFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a node file", path.display()))?;
            node.api
        }
    };
    if let Some(path) = api::unix_path(&url) {
        if !path.exists() {
            return Ok(Err(format!(
                "no node is running ({} does not exist); start one with `peerbuild node`",
                path.display()
            )));
        }
        return Ok(Ok(Endpoint::Unix(path)));
    }
    if let Some(authority) = url.strip_prefix("http://") {
        let authority = authority.trim_end_matches('/').to_owned();
        let token = match std::env::var("PEERBUILD_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            Some(token) => token,
            None => {
                let path = data.root().join("api.token");
                identity::check_private(&path, "API token")?;
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the API token {}", path.display()))?
                    .trim()
                    .to_owned()
            }
        };
        return Ok(Ok(Endpoint::Tcp { authority, token }));
    }
    bail!("--node {url}: write unix:PATH or http://127.0.0.1:PORT")
}

async fn get(endpoint: &Endpoint, path: &str) -> Result<Bytes> {
    match endpoint {
        Endpoint::Unix(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
            request(stream, "localhost", None, path).await
        }
        Endpoint::Tcp { authority, token } => {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            request(stream, authority, Some(token), path).await
        }
    }
}

async fn request<S>(stream: S, host: &str, token: Option<&str>, path: &str) -> Result<Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the node failed")?;
    tokio::spawn(connection);
    let mut builder = Request::get(path).header(hyper::header::HOST, host);
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder.body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("the node closed the connection")?;
    let code = response.status();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|err| anyhow::anyhow!("cannot read the node's answer: {err}"))?
        .to_bytes();
    if code != StatusCode::OK {
        bail!(
            "the node answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
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
    let running = std::fs::read(data.root().join("node.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<NodeFile>(&bytes).ok());
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
