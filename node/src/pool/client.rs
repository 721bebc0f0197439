//! The control API's client side: finding a running node (`--node`, `$PEERBUILD_NODE`, or the
//! data directory's node.json) and asking it, over its Unix socket or loopback TCP with the
//! token. `peerbuild status` uses it, and so does `peerbuild run` for the pool's cache
//! ([`ApiPoolCache`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::shared_cache::TreeFetched;
use super::{NodeFile, api, identity};
use crate::data_dir::DataDir;
use crate::engine::cache::{Entry, FindRequest, Found, PoolCache};
use crate::store::transfer::BoxFuture;

/// The largest API answer the CLI reads (a blob of the largest size, with its frame).
const MAX_RESPONSE_BYTES: usize = 72 << 20;

/// Where the node's API is, and how to get in.
#[derive(Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { authority: String, token: String },
}

/// `--node`, else `$PEERBUILD_NODE`, else `DATA_DIR/node.json`. The inner error is the message
/// for "no node".
pub fn find_node(
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

/// Sends a request and returns the node's response, its body unread.
async fn open(
    endpoint: &Endpoint,
    method: Method,
    path: &str,
    body: Body,
) -> Result<Response<Incoming>> {
    match endpoint {
        Endpoint::Unix(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
            request(stream, "localhost", None, method, path, body).await
        }
        Endpoint::Tcp { authority, token } => {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .with_context(|| format!("cannot connect to {authority}"))?;
            request(stream, authority, Some(token), method, path, body).await
        }
    }
}

/// Sends a request; the answer's body when the node says 200, else an error with its message.
async fn send(endpoint: &Endpoint, method: Method, path: &str, body: Body) -> Result<Bytes> {
    let response = open(endpoint, method, path, body).await?;
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

/// `POST path` with a JSON body; the answer's body when the node says 200.
pub async fn post(endpoint: &Endpoint, path: &str, json: Vec<u8>) -> Result<Bytes> {
    send(endpoint, Method::POST, path, Body::Json(Bytes::from(json))).await
}

/// `POST path` with a binary body (`/v1/blobs/put`); the answer's body when the node says 200.
pub async fn post_bytes(endpoint: &Endpoint, path: &str, bytes: Vec<u8>) -> Result<Bytes> {
    send(
        endpoint,
        Method::POST,
        path,
        Body::Binary(Bytes::from(bytes)),
    )
    .await
}

/// `GET path`; the answer's body when the node says 200.
pub async fn get(endpoint: &Endpoint, path: &str) -> Result<Bytes> {
    send(endpoint, Method::GET, path, Body::Json(Bytes::new())).await
}

/// A request's body and what it holds.
enum Body {
    Json(Bytes),
    Binary(Bytes),
}

/// `POST path` with a JSON body whose answer is a stream of lines (`POST /v1/builds`).
pub async fn post_lines(endpoint: &Endpoint, path: &str, json: Vec<u8>) -> Result<Lines> {
    let response = open(endpoint, Method::POST, path, Body::Json(Bytes::from(json))).await?;
    let code = response.status();
    if code != StatusCode::OK {
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "the node answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(Lines {
        body: response.into_body(),
        buffer: Vec::new(),
    })
}

/// The lines of a streamed answer, each at most [`MAX_LINE_BYTES`].
pub struct Lines {
    body: Incoming,
    buffer: Vec<u8>,
}

/// The longest line a streamed answer may send.
pub const MAX_LINE_BYTES: usize = 8 << 20;

impl Lines {
    /// The next line (without its newline); `None` when the answer ended.
    pub async fn next(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.buffer, rest);
                line.pop();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.buffer.len() > MAX_LINE_BYTES {
                bail!("the node sent a line over {MAX_LINE_BYTES} bytes");
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(err)) => bail!("the node's answer broke off: {err}"),
                None if self.buffer.is_empty() => return Ok(None),
                None => {
                    let line = std::mem::take(&mut self.buffer);
                    return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
                }
            }
        }
    }
}

async fn request<S>(
    stream: S,
    host: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Body,
) -> Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the node failed")?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let (body, kind) = match body {
        Body::Json(body) => (body, "application/json"),
        Body::Binary(body) => (body, "application/octet-stream"),
    };
    if !body.is_empty() {
        builder = builder.header(hyper::header::CONTENT_TYPE, kind);
    }
    let request = builder.body(Full::new(body))?;
    sender
        .send_request(request)
        .await
        .context("the node closed the connection")
}

/// Where `peerbuild run` submits its build: `--node`, else `$PEERBUILD_NODE` (either must
/// answer), else the node running on the data directory. `None`: no node; the build runs on
/// this machine's embedded pool. A node.json whose node does not answer (it was killed) is
/// passed over with a remark.
pub fn submit_endpoint(data_dir: Option<&Path>, node: Option<&str>) -> Result<Option<Endpoint>> {
    let from_env = std::env::var("PEERBUILD_NODE")
        .ok()
        .filter(|v| !v.is_empty());
    if node.is_some() || from_env.is_some() {
        return match find_node(data_dir, node)? {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(message) => bail!("{message}"),
        };
    }
    let data = DataDir::open(data_dir)?;
    let Some(socket) = NodeFile::read(data.root()).and_then(|node| node.socket()) else {
        return Ok(None);
    };
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        eprintln!(
            "peerbuild: the node in {} does not answer (it may have been killed); running the build on this machine",
            data.root().display()
        );
        return Ok(None);
    }
    Ok(Some(Endpoint::Unix(socket)))
}

/// The pool's cache as a build run by `peerbuild run` reaches it: through the control API of
/// the node running on the same data directory (which fetches into the store both share).
pub struct ApiPoolCache {
    endpoint: Endpoint,
}

impl ApiPoolCache {
    /// The node on `data_dir`, if one is running there (its node.json and socket exist).
    pub fn on_data_dir(data_dir: &Path) -> Option<ApiPoolCache> {
        let socket = NodeFile::read(data_dir)?.socket()?;
        Some(ApiPoolCache {
            endpoint: Endpoint::Unix(socket),
        })
    }
}

impl ApiPoolCache {
    /// Asks the node to fetch the tree `digest` from its peers into the store, and to restore
    /// it into `into` (an absolute path) as it arrives, when given and the node can write there
    /// (see [`TreeFetched::not_exported`]).
    pub async fn fetch_tree(
        &self,
        digest: protocol::Digest,
        into: Option<&Path>,
    ) -> Result<TreeFetched> {
        let json = serde_json::to_vec(&api::FetchRequest {
            tree: digest.to_string(),
            into: into.map(Path::to_owned),
        })?;
        let asked = post(&self.endpoint, "/v1/cache/fetch", json);
        let body = tokio::time::timeout(FIND_TIMEOUT, asked)
            .await
            .map_err(|_| anyhow::anyhow!("the node did not answer in time"))??;
        serde_json::from_slice(&body).context("the node's answer is not understood")
    }
}

/// How long a cache lookup through the node may take: it may fetch a large tree.
const FIND_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);

impl PoolCache for ApiPoolCache {
    fn find<'a>(&'a self, request: &'a FindRequest) -> BoxFuture<'a, Result<Found, String>> {
        Box::pin(async move {
            let json = serde_json::to_vec(request).map_err(|e| e.to_string())?;
            let asked = post(&self.endpoint, "/v1/cache/find", json);
            let body = tokio::time::timeout(FIND_TIMEOUT, asked)
                .await
                .map_err(|_| "the node did not answer in time".to_owned())?
                .map_err(|e| format!("{e:#}"))?;
            serde_json::from_slice(&body)
                .map_err(|e| format!("the node's answer is not understood ({e})"))
        })
    }

    fn announce<'a>(&'a self, entry: &'a Entry) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let json = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
            let asked = post(&self.endpoint, "/v1/cache/announce", json);
            tokio::time::timeout(ANNOUNCE_TIMEOUT, asked)
                .await
                .map_err(|_| "the node did not answer in time".to_owned())?
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
    }
}
