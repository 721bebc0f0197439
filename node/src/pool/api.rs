//! The control API: HTTP/1.1 with JSON, served on the Unix socket `DATA_DIR/api.sock` (mode
//! 0600, so only the node's owner can connect, and masked from sandboxes with the rest of the data
//! directory) and, with `--api 127.0.0.1:PORT`, on loopback TCP behind the bearer token in
//! `DATA_DIR/api.token`.
//!
//! Routes live in `route`: one match on method and path; their state is in [`ApiState`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use anyhow::{Context, Result};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tracing::{debug, warn};

use super::blobs;
use super::shared_cache::NodeCache;
use super::swarm::Shared;
use super::tasks::{Submission, Tasks};
use super::view::PoolEvent;
use crate::engine::cache::{Entry, FindRequest, PoolCache};

/// Event lines a client of `/v1/events` may fall behind by before it is dropped.
const EVENTS_PER_CLIENT: usize = 256;
/// API connections served at once; more wait in the listener's backlog.
const MAX_API_CONNECTIONS: usize = 64;

/// What the handlers read.
pub struct ApiState {
    pub shared: Shared,
    /// The bearer token for loopback TCP (`None`: no TCP listener).
    pub token: Option<String>,
    /// The pool's shared cache.
    pub cache: Arc<NodeCache>,
    /// Remote builds.
    pub tasks: Arc<Tasks>,
}

/// Event lines a submitter may fall behind by before the build waits for it.
const SUBMIT_QUEUE: usize = 1024;

/// The largest request body the API reads (a submission holds a buildspec of up to 256 KiB
/// and up to 1,024 variables and secrets: an offer's 1 MiB, with room for JSON's escaping).
const MAX_REQUEST_BODY_BYTES: usize = 4 << 20;

/// Binds `socket` with mode 0600 (creating it in a private temporary name first, so it is never
/// reachable with looser permissions), replacing a stale socket of a node that died.
pub fn bind_unix(socket: &Path) -> Result<UnixListener> {
    if socket.exists() {
        // The data directory lock is held, so no live node owns it.
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let staging = socket.with_extension("sock.new");
    let _ = std::fs::remove_file(&staging);
    // SAFETY: umask only changes this process's file creation mask; it is restored at once.
    // (Another thread creating a file in between gets stricter permissions, never looser.)
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&staging);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("cannot listen on {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staging, socket)
        .with_context(|| format!("cannot create {}", socket.display()))?;
    Ok(listener)
}

/// Binds the loopback TCP listener; anything but a loopback address is refused.
pub async fn bind_tcp(address: SocketAddr) -> Result<TcpListener> {
    if !address.ip().is_loopback() {
        anyhow::bail!(
            "--api {address}: the control API listens on loopback only (127.0.0.1 or ::1); reach it from elsewhere through SSH"
        );
    }
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the API"))
}

/// Serves the Unix socket (and the TCP listener) until `shutdown` turns true.
pub async fn serve(
    unix: UnixListener,
    tcp: Option<TcpListener>,
    state: Arc<ApiState>,
    shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_API_CONNECTIONS));
    let unix_task = {
        let (state, limit, mut shutdown) = (state.clone(), limit.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    accepted = unix.accept() => match accepted {
                        Ok((stream, _)) => spawn_connection(stream, Listener::Unix, &state, &limit, &shutdown),
                        Err(err) => warn!(error = %err, "API accept failed"),
                    },
                    _ = shutdown.changed() => break,
                }
            }
        }
    };
    let tcp_task = {
        let (state, limit, mut shutdown) = (state.clone(), limit.clone(), shutdown.clone());
        async move {
            let Some(tcp) = tcp else { return };
            loop {
                tokio::select! {
                    accepted = tcp.accept() => match accepted {
                        Ok((stream, _)) => spawn_connection(stream, Listener::Tcp, &state, &limit, &shutdown),
                        Err(err) => warn!(error = %err, "API accept failed"),
                    },
                    _ = shutdown.changed() => break,
                }
            }
        }
    };
    tokio::join!(unix_task, tcp_task);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Unix,
    Tcp,
}

fn spawn_connection<S>(
    stream: S,
    listener: Listener,
    state: &Arc<ApiState>,
    limit: &Arc<Semaphore>,
    shutdown: &watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        debug!("API connection refused: too many at once");
        return;
    };
    let state = state.clone();
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, listener, request).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    debug!(error = %err, "API connection ended with an error");
                }
            }
            // Event streams never end by themselves: the node's shutdown ends them.
            _ = shutdown.changed() => {}
        }
    });
}

type ApiBody = BoxBody<Bytes, Infallible>;

async fn handle(
    state: &ApiState,
    listener: Listener,
    request: Request<Incoming>,
) -> Response<ApiBody> {
    if listener == Listener::Tcp && !authorized(state, &request) {
        return error(
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer TOKEN` with the token in the node's DATA_DIR/api.token",
        );
    }
    route(state, request).await
}

fn authorized(state: &ApiState, request: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return false;
    };
    let Some(header) = request.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The routes (docs/PROTOCOL.md, "Control API"). Listing, logs and cancel stay with the CLI,
/// which keeps each build's record; `GET /v1/builds` may come here later.
async fn route(state: &ApiState, request: Request<Incoming>) -> Response<ApiBody> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => status(state),
        (&Method::GET, ["v1", "events"]) => events(state),
        (_, ["v1", "status" | "events"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (&Method::POST, ["v1", "cache", "find"]) => match read_json(request).await {
            Ok(find) => cache_find(state, find).await,
            Err(response) => response,
        },
        (&Method::POST, ["v1", "cache", "announce"]) => match read_json(request).await {
            Ok(entry) => cache_announce(state, entry).await,
            Err(response) => response,
        },
        (&Method::POST, ["v1", "builds"]) => match read_json(request).await {
            Ok(submission) => submit(state, submission),
            Err(response) => response,
        },
        (_, ["v1", "builds"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::POST, ["v1", "cache", "fetch"]) => match read_json(request).await {
            Ok(fetch) => cache_fetch(state, fetch).await,
            Err(response) => response,
        },
        (_, ["v1", "cache", "find" | "announce" | "fetch"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        (&Method::POST, ["v1", "blobs", "has"]) => match read_json(request).await {
            Ok(asked) => match blobs::serve_has(state.tasks.store.clone(), asked).await {
                Ok(held) => json_of(&held),
                Err(err) => error(StatusCode::BAD_REQUEST, &err),
            },
            Err(response) => response,
        },
        (&Method::POST, ["v1", "blobs", "fetch"]) => match read_json(request).await {
            Ok(asked) => match blobs::serve_fetch(state.tasks.store.clone(), asked).await {
                Ok(frames) => {
                    let mut response = Response::new(Full::new(Bytes::from(frames)).boxed());
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                Err(err) => error(StatusCode::BAD_REQUEST, &err),
            },
            Err(response) => response,
        },
        (&Method::POST, ["v1", "blobs", "put"]) => {
            match read_body(request, blobs::MAX_PUT_BYTES).await {
                Ok(body) => match blobs::serve_put(state.tasks.store.clone(), body).await {
                    Ok(put) => json_of(&put),
                    Err(err) => error(StatusCode::BAD_REQUEST, &err),
                },
                Err(response) => response,
            }
        }
        (_, ["v1", "blobs", "has" | "fetch" | "put"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint; this node serves GET /v1/status, GET /v1/events, POST /v1/builds, POST /v1/cache/find, POST /v1/cache/announce, POST /v1/cache/fetch and POST /v1/blobs/{has,fetch,put}",
        ),
    }
}

/// A request body, at most `limit` bytes.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Response<ApiBody>> {
    Ok(http_body_util::Limited::new(request.into_body(), limit)
        .collect()
        .await
        .map_err(|err| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read the request ({err})"),
            )
        })?
        .to_bytes())
}

/// A JSON request body, at most [`MAX_REQUEST_BODY_BYTES`].
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Response<ApiBody>> {
    let body = read_body(request, MAX_REQUEST_BODY_BYTES).await?;
    serde_json::from_slice(&body).map_err(|err| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("malformed request: {err}"),
        )
    })
}

/// `POST /v1/cache/find`: a `FindRequest`; answers a `Found`. The entry found is fetched into
/// the node's store (the data directory the asking build shares) before the answer.
async fn cache_find(state: &ApiState, find: FindRequest) -> Response<ApiBody> {
    if let Some(response) = not_absolute(find.into.as_deref()) {
        return response;
    }
    match state.cache.find(&find).await {
        Ok(found) => match serde_json::to_vec(&found) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        },
        Err(err) => error(StatusCode::BAD_GATEWAY, &err),
    }
}

/// `POST /v1/builds`: a `Submission`; answers with the build's events as JSON lines (the
/// `--json` schema), ending with `build_finished`. Closing the connection cancels the build.
fn submit(state: &ApiState, submission: Submission) -> Response<ApiBody> {
    let (sender, lines) = mpsc::channel::<Bytes>(SUBMIT_QUEUE);
    tokio::spawn(state.tasks.clone().submit(submission, sender));
    let mut response = Response::new(EventBody { lines }.boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// What `POST /v1/cache/fetch` takes: the tree's digest as `HASH/SIZE`, and optionally an
/// absolute path to restore it into as it arrives (a new or empty folder).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct FetchRequest {
    pub tree: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<std::path::PathBuf>,
}

/// `POST /v1/cache/fetch`: a `FetchRequest`; fetches the tree into the node's store from its
/// peers and answers a `TreeFetched`.
async fn cache_fetch(state: &ApiState, fetch: FetchRequest) -> Response<ApiBody> {
    let tree = match fetch.tree.parse::<protocol::Digest>() {
        Ok(tree) => tree,
        Err(err) => return error(StatusCode::BAD_REQUEST, &format!("tree: {err}")),
    };
    if let Some(response) = not_absolute(fetch.into.as_deref()) {
        return response;
    }
    match state.cache.fetch_tree(tree, fetch.into).await {
        Ok(fetched) => match serde_json::to_vec(&fetched) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        },
        Err(err) => error(StatusCode::BAD_GATEWAY, &err),
    }
}

/// A refusal of a request's `into` folder that is not an absolute path (the node's working
/// folder is not the asker's).
fn not_absolute(into: Option<&std::path::Path>) -> Option<Response<ApiBody>> {
    let into = into.filter(|into| !into.is_absolute())?;
    Some(error(
        StatusCode::BAD_REQUEST,
        &format!("into: {} is not an absolute path", into.display()),
    ))
}

/// `POST /v1/cache/announce`: an `Entry` saved in the node's store; the pool is told.
async fn cache_announce(state: &ApiState, entry: Entry) -> Response<ApiBody> {
    match state.cache.announce(&entry).await {
        Ok(()) => json_response(StatusCode::OK, b"{}".to_vec()),
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, &err),
    }
}

fn status(state: &ApiState) -> Response<ApiBody> {
    let report = {
        let view = state.shared.view.lock().unwrap_or_else(|p| p.into_inner());
        view.report(Instant::now())
    };
    match serde_json::to_vec(&report) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}

/// A live stream of JSON lines. Each client has its own bounded queue; a client that falls
/// behind by more than [`EVENTS_PER_CLIENT`] lines is dropped instead of buffered.
fn events(state: &ApiState) -> Response<ApiBody> {
    let mut receiver = state.shared.events.subscribe();
    let (sender, lines) = mpsc::channel::<Bytes>(EVENTS_PER_CLIENT);
    tokio::spawn(async move {
        loop {
            let event: PoolEvent = match receiver.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    debug!(missed, "event client too slow; dropped");
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Ok(mut line) = serde_json::to_vec(&event) else {
                continue;
            };
            line.push(b'\n');
            if sender.try_send(Bytes::from(line)).is_err() {
                // Full (the client reads too slowly) or gone: either way, stop.
                debug!("event client too slow or gone; dropped");
                return;
            }
        }
    });
    let mut response = Response::new(EventBody { lines }.boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// The body of `/v1/events`: whatever the per-client queue holds, until it closes.
struct EventBody {
    lines: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.lines
            .poll_recv(cx)
            .map(|line| line.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn json_of<T: serde::Serialize>(value: &T) -> Response<ApiBody> {
    match serde_json::to_vec(value) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}

fn json_response(code: StatusCode, json: Vec<u8>) -> Response<ApiBody> {
    let mut response = Response::new(Full::new(Bytes::from(json)).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(code: StatusCode, message: &str) -> Response<ApiBody> {
    let json = serde_json::json!({ "error": message }).to_string();
    json_response(code, json.into_bytes())
}

/// The URL `peerbuild status --node` and node.json use for a Unix socket.
pub fn unix_url(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

/// A socket path from a `unix:` URL.
pub fn unix_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("unix://")
        .or_else(|| url.strip_prefix("unix:"))
        .map(PathBuf::from)
}
