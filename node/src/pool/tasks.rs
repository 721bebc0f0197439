//! Remote builds: the node that a build is submitted to coordinates it ([`Tasks::submit`]):
//! it places the build on a peer (itself included) that has the labels asked for and a free
//! slot, hands it over on a `/peerbuild/task/1` stream, relays the build's events back to the
//! submitter in order, checks the signed result, and fetches the artifacts into its store. A
//! worker ([`serve`]) takes a task when it has a free slot, fetches the source tree from the
//! coordinator through the blob protocol, and runs the build with its own `peerbuild run` (a
//! fresh process, so the engine, the owner's sandbox settings and the pool's cache all apply
//! as for a local build), streaming its `--json` events. A worker that is lost (the stream
//! breaks, or its lease runs out) has its build run again on another peer, and the submitter is
//! told why.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{AsyncRead, AsyncWrite};
use hyper::body::Bytes;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{PeerId, StreamProtocol};
use protocol::Digest;
use protocol::task::{self, TaskOffer, TaskReply, TaskSecrets};
use protocol::wire::TaskState;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info};

use scheduler::{
    Attempt, DeclineReason, Event as SchedulerEvent, PeerId as SchedulerPeer, SandboxKind, TaskId,
    TaskOutcome,
};

use super::cas::{first_answer, next_stream, read_frame, write_frame};
use super::coordinator::{self, Coordinator, Order};
use super::shared_cache::NodeCache;
use super::swarm::SwarmCommand;
use crate::events::{BuildResult, Envelope, Event, Level, SCHEMA_VERSION, Status};
use crate::store::{Store, export};

/// Runs of a build that may be lost (a peer gone, failed or refusing) before it fails.
pub const MAX_ATTEMPTS: u32 = 4;
/// How often a run tells the scheduler it is alive (renewing its worker's lease).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a worker may take to accept or decline.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// A worker's answer when it has no free slot (the coordinator tries others, then it again).
const NO_FREE_SLOT: &str = "no free slot";
/// A worker's decline of a run it holds already: an offer made again after its stream broke
/// (see `cas::first_answer`) finds the first one still waiting for its secrets. Taken like a
/// full peer: nobody's fault, the next heartbeat says when there is room.
const ALREADY_RUNNING: &str = "this peer runs that task already";
/// How long a worker may take to write one frame to the coordinator before it is taken for gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long past a build's own timeout a coordinator waits for its worker's result.
const RESULT_GRACE: Duration = Duration::from_secs(120);
/// How long a build that is cancelled gets to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(task::TASK_PROTOCOL)
}

/// A build submitted through `POST /v1/builds`: the offer the chosen peer gets (its source
/// already in this node's store, which the submitter shares; `task` is filled in here), and the
/// labels a peer must have.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    /// `sandbox` is the submitter's `--sandbox`: the owner's own choice when the build runs on
    /// this node, a request (checked against the worker owner's `sandbox.allow`) anywhere else.
    pub build: TaskOffer,
    /// Only for the peer that accepts the build (sent after its `Accepted`).
    pub secrets: Vec<(String, String)>,
    /// `--require LABEL=VALUE`.
    pub requires: Vec<(String, String)>,
}

/// The remote-build side of a node.
pub struct Tasks {
    pub me: PeerId,
    pub keypair: Keypair,
    pub data_root: PathBuf,
    pub store: Arc<Store>,
    pub control: libp2p_stream::Control,
    pub cache: Arc<NodeCache>,
    /// Builds this node runs at once (heartbeats count its free permits); a task beyond them
    /// is declined.
    pub slots: Arc<Semaphore>,
    /// Names task folders in `DATA_DIR/tasks/` (this node's own, never a peer's text).
    pub next_folder: AtomicU64,
    /// Places this node's builds (the scheduler crate's engine).
    pub coordinator: Coordinator,
    /// The tasks this node runs now, by offer `task` (its heartbeats list them).
    pub running: Arc<Mutex<BTreeSet<String>>>,
}

/// One run the scheduler ordered: which build and attempt, on which peer, under which name.
struct PlacedRun {
    build: scheduler::BuildId,
    attempt: Attempt,
    peer: SchedulerPeer,
    /// The peer's id.
    name: String,
    /// The offer's `task`.
    task: String,
}

/// Tells the scheduler how a run goes: accepted, and alive (at most once a second, which
/// renews the worker's lease as a heartbeat does).
struct Reporter {
    coordinator: Coordinator,
    task: TaskId,
    attempt: Attempt,
    peer: SchedulerPeer,
    last: Option<Instant>,
}

impl Reporter {
    async fn accepted(&mut self) {
        let (task, attempt, peer) = (self.task, self.attempt, self.peer);
        self.coordinator
            .report(SchedulerEvent::Started {
                task,
                attempt,
                peer,
            })
            .await;
        self.last = Some(Instant::now());
    }

    async fn progress(&mut self) {
        if self.last.is_some_and(|at| at.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let (task, attempt, peer) = (self.task, self.attempt, self.peer);
        self.coordinator
            .report(SchedulerEvent::Progress {
                task,
                attempt,
                peer,
            })
            .await;
    }
}

/// A task this node runs, listed in its heartbeats while it runs.
struct Running<'a> {
    running: &'a Mutex<BTreeSet<String>>,
    task: String,
}

impl<'a> Running<'a> {
    /// `None` if a run of that name is running already.
    fn new(running: &'a Mutex<BTreeSet<String>>, task: &str) -> Option<Running<'a>> {
        let inserted = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.to_owned());
        inserted.then(|| Running {
            running,
            task: task.to_owned(),
        })
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.task);
    }
}

/// What makes runs of different builds "the same task" for the scheduler's learned durations:
/// the project, the buildspec and the batch member.
fn task_key(offer: &TaskOffer) -> u64 {
    let mut hasher = blake3::Hasher::new();
    for part in [
        offer.source_name.as_str(),
        offer.buildspec.as_str(),
        offer.batch_member.as_deref().unwrap_or(""),
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Where a build's events go: the submitter's API stream.
type Out = mpsc::Sender<Bytes>;

/// One event as a JSON line.
fn line(event: Event) -> Bytes {
    let envelope = Envelope {
        v: SCHEMA_VERSION,
        event,
    };
    let mut json = serde_json::to_vec(&envelope).unwrap_or_default();
    json.push(b'\n');
    Bytes::from(json)
}

fn note(level: Level, message: String) -> Bytes {
    line(Event::Note {
        member: None,
        level,
        message,
    })
}

/// An event from a worker, checked and written out again: it must be one of the build's own
/// events, never a result (only the coordinator says how a build ended, from the signed
/// result), and it goes out as exactly one line.
fn relay(json: &str) -> Result<Bytes, String> {
    let envelope: Envelope =
        serde_json::from_str(json).map_err(|e| format!("it sent an event that is not one: {e}"))?;
    match envelope.event {
        Event::BuildFinished { .. } | Event::MemberFinished { .. } => {
            Err("it sent a result as an event".to_owned())
        }
        event => Ok(line(event)),
    }
}

/// A result for a build that never ran to a result of its own.
fn fault_result(submission: &Submission, status: Status, message: String) -> Bytes {
    let offer = &submission.build;
    line(Event::BuildFinished {
        result: Box::new(BuildResult {
            source_digest: Some(offer.source.to_string()),
            ..BuildResult::ended_early(offer.build_id.clone(), offer.build_number, status, message)
        }),
    })
}

/// How a build ended on a worker, as far as the coordinator is concerned.
enum Ending {
    /// A verified result.
    Result(Box<BuildResult>),
    /// The worker's `peerbuild run` refused it (its owner's settings, its users): another peer
    /// may not.
    Refused(String),
    /// The build cannot end well anywhere (the worker outlived its timeout): stop.
    Failed(String),
    /// The worker declined the offer (not for want of a slot): try another.
    Declined(String),
    /// The worker has no free slot now: try another, or it again in a moment.
    Full,
    /// The worker could not be reached, or was lost or failed while running it, or sent what
    /// it should not: run it again elsewhere.
    Lost(String),
    /// The worker stopped it unfinished to shut down: run it again elsewhere, no blame.
    HandedBack(String),
    /// The submitter went away: stop.
    Cancelled,
}

impl Tasks {
    /// Coordinates `submission`: hands it to the scheduler ([`super::coordinator`]), carries
    /// out its orders (offer the build to a peer, stop a lost run, accept a result), relays the
    /// build's events to `out`, and ends with a `build_finished` line. Returns when the build
    /// ended or the submitter left.
    pub async fn submit(self: Arc<Self>, submission: Submission, out: Out) {
        if !self.store.holds(&submission.build.source) {
            let why = format!(
                "the source tree {} is not in this node's store (`peerbuild run` hands it over before it submits; a client of the API must too: POST /v1/blobs/put, then POST /v1/cache/fetch)",
                submission.build.source
            );
            let _ = out
                .send(fault_result(&submission, Status::Fault, why))
                .await;
            return;
        }
        if let Some(sandbox) = &submission.build.sandbox
            && SandboxKind::from_name(sandbox).is_none()
        {
            let why = format!(
                "no peer can run a build in the `{sandbox}` sandbox: the kinds are namespace, docker, wasm and host"
            );
            let _ = out
                .send(fault_result(&submission, Status::Fault, why))
                .await;
            return;
        }
        let (orders_to, mut orders) = mpsc::channel(coordinator::ORDERS);
        let plan = coordinator::Plan {
            label: submission.build.build_id.clone(),
            requires: submission.requires.clone(),
            sandbox: submission.build.sandbox.clone(),
            source: submission.build.source,
            key: task_key(&submission.build),
            queued_timeout: Duration::from_secs(submission.build.timeout_secs.max(1)),
        };
        let build = match self.coordinator.submit(plan, orders_to).await {
            Ok(build) => build,
            Err(why) => {
                let _ = out
                    .send(fault_result(&submission, Status::Fault, why))
                    .await;
                return;
            }
        };
        let submission = Arc::new(submission);
        // Runs in flight, by attempt (dropping one stops it); their endings come back on
        // `ended`.
        let mut runs: HashMap<Attempt, AbortOnDrop> = HashMap::new();
        let (ended_to, mut ended) = mpsc::channel::<(Attempt, SchedulerPeer, String, Ending)>(8);
        // Results of finished runs, until the scheduler says which one counts.
        let mut results: HashMap<Attempt, (String, Box<BuildResult>)> = HashMap::new();
        let mut lost: Vec<String> = Vec::new();
        // Runs whose ending the user was already told (a refusal, a decline): the scheduler's
        // note that the run was lost would say it again.
        let mut explained: BTreeSet<Attempt> = BTreeSet::new();
        let mut answered = false;
        loop {
            tokio::select! {
                order = orders.recv() => match order {
                    Some(Order::Offer { attempt, peer, name, why, task }) => {
                        let run = self.clone().attempt(
                            submission.clone(),
                            PlacedRun { build, attempt, peer, name, task },
                            why,
                            out.clone(),
                            ended_to.clone(),
                        );
                        runs.insert(attempt, AbortOnDrop(tokio::spawn(run)));
                    }
                    Some(Order::Cancel { attempt }) => {
                        runs.remove(&attempt);
                    }
                    Some(Order::Note(said)) => {
                        if out.send(note(Level::Info, said)).await.is_err() {
                            break;
                        }
                    }
                    Some(Order::Lost { attempt, peer, said }) => {
                        runs.remove(&attempt);
                        if explained.remove(&attempt) {
                            continue;
                        }
                        lost.push(peer);
                        if out.send(note(Level::Warning, said)).await.is_err() {
                            break;
                        }
                    }
                    Some(Order::Accept { attempt }) => {
                        let Some((peer, mut result)) = results.remove(&attempt) else {
                            continue;
                        };
                        if peer != self.me.to_string()
                            && let Ok(worker) = peer.parse()
                            && let Err(err) = self.fetch_artifacts(worker, &result).await
                        {
                            result.status = Status::Fault;
                            result.message = Some(err);
                        }
                        if !lost.is_empty() {
                            let earlier = format!("ran again after losing {}", lost.join(", "));
                            result.message = Some(match result.message.take() {
                                Some(message) => format!("{message} ({earlier})"),
                                None => earlier,
                            });
                        }
                        answered = true;
                        let _ = out.send(line(Event::BuildFinished { result })).await;
                    }
                    Some(Order::Fail(why)) => {
                        if !answered {
                            answered = true;
                            let _ = out.send(fault_result(&submission, Status::Fault, why)).await;
                        }
                    }
                    Some(Order::Done) | None => {
                        if !answered {
                            let why = "the node stopped coordinating the build".to_owned();
                            let _ = out.send(fault_result(&submission, Status::Fault, why)).await;
                        }
                        return;
                    }
                },
                Some((attempt, peer, name, ending)) = ended.recv() => {
                    // A run the scheduler stopped (it was lost, its offer expired) no longer
                    // counts, whatever it says now.
                    if runs.remove(&attempt).is_none() {
                        continue;
                    }
                    let task = TaskId { build, index: 0 };
                    let event = match ending {
                        Ending::Result(result) => {
                            // A FAULT ran (some of) the build's commands: running them again
                            // elsewhere could repeat what they did, so it is the result.
                            let outcome = match result.status {
                                Status::Succeeded => TaskOutcome::Succeeded,
                                _ => TaskOutcome::Failed,
                            };
                            results.insert(attempt, (name, result));
                            SchedulerEvent::Finished { task, attempt, peer, outcome }
                        }
                        Ending::Full => SchedulerEvent::OfferDeclined {
                            task, attempt, peer, reason: DeclineReason::Busy,
                        },
                        // A decline (not for want of a slot) or a refusal is that peer's answer
                        // for this build: it counts as a run that came to nothing, so the build
                        // goes to another peer while one fits and fails after a few.
                        Ending::Declined(reason) => {
                            let said = format!("peer {name} did not take the build: {reason}");
                            if out.send(note(Level::Warning, said)).await.is_err() {
                                break;
                            }
                            explained.insert(attempt);
                            let message = format!("peer {name} declined it: {reason}");
                            SchedulerEvent::Finished { task, attempt, peer, outcome: TaskOutcome::Error { message } }
                        }
                        Ending::Refused(message) => {
                            let said = format!("peer {name} refused the build: {message}");
                            if out.send(note(Level::Warning, said)).await.is_err() {
                                break;
                            }
                            explained.insert(attempt);
                            let message = format!("peer {name} refused it: {message}");
                            SchedulerEvent::Finished { task, attempt, peer, outcome: TaskOutcome::Error { message } }
                        }
                        Ending::Lost(message) => SchedulerEvent::Finished {
                            task, attempt, peer, outcome: TaskOutcome::Error { message },
                        },
                        Ending::HandedBack(message) => SchedulerEvent::Finished {
                            task, attempt, peer, outcome: TaskOutcome::HandedBack { message },
                        },
                        Ending::Failed(why) => {
                            if !answered {
                                let _ = out.send(fault_result(&submission, Status::Fault, why)).await;
                            }
                            break;
                        }
                        Ending::Cancelled => break,
                    };
                    self.coordinator.report(event).await;
                }
                _ = out.closed() => break,
            }
        }
        // The submitter left, or the build cannot go on: stop its runs, free its place.
        drop(runs);
        self.coordinator
            .report(SchedulerEvent::Cancel { build })
            .await;
    }

    /// One run of a build on the peer the scheduler chose; its ending goes to `ended`.
    async fn attempt(
        self: Arc<Self>,
        submission: Arc<Submission>,
        run: PlacedRun,
        why: String,
        out: Out,
        ended: mpsc::Sender<(Attempt, SchedulerPeer, String, Ending)>,
    ) {
        let offer = TaskOffer {
            task: run.task.clone(),
            ..submission.build.clone()
        };
        let reporter = Reporter {
            coordinator: self.coordinator.clone(),
            task: TaskId {
                build: run.build,
                index: 0,
            },
            attempt: run.attempt,
            peer: run.peer,
            last: None,
        };
        let ending = if run.name == self.me.to_string() {
            self.run_here(&offer, &submission.secrets, &out, &why, reporter)
                .await
        } else {
            match run.name.parse::<PeerId>() {
                Ok(worker) => {
                    self.run_on(worker, &offer, &submission.secrets, &out, &why, reporter)
                        .await
                }
                Err(err) => Ending::Lost(err.to_string()),
            }
        };
        let _ = ended.send((run.attempt, run.peer, run.name, ending)).await;
    }

    /// Tells the submitter where the build runs (once it was accepted there).
    async fn say_where(&self, peer: &str, why: &str, out: &Out) -> bool {
        let said = if peer == self.me.to_string() {
            format!("running on this node, {peer} ({why})")
        } else {
            format!("running on peer {peer} ({why})")
        };
        out.send(note(Level::Info, said)).await.is_ok()
    }

    /// Runs the offer on this node, events straight to `out`; the submitter leaving stops it.
    async fn run_here(
        &self,
        offer: &TaskOffer,
        secrets: &[(String, String)],
        out: &Out,
        why: &str,
        mut reporter: Reporter,
    ) -> Ending {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            return Ending::Full;
        };
        let Some(_running) = Running::new(&self.running, &offer.task) else {
            return Ending::Declined("it runs this task already".to_owned());
        };
        reporter.accepted().await;
        if !self.say_where(&self.me.to_string(), why, out).await {
            return Ending::Cancelled;
        }
        let (replies, mut received) = mpsc::channel(256);
        let (stop, cancel) = watch::channel(false);
        let run = self.run_task(offer, secrets, None, replies, cancel);
        tokio::pin!(run);
        let mut ended = None;
        let mut gone = false;
        loop {
            tokio::select! {
                ending = &mut run, if ended.is_none() => ended = Some(ending),
                reply = received.recv() => match reply {
                    Some(TaskReply::Event { json }) if !gone => {
                        reporter.progress().await;
                        let sent = match relay(&json) {
                            Ok(line) => out.send(line).await.is_ok(),
                            Err(_) => true,
                        };
                        if !sent {
                            gone = true;
                            let _ = stop.send(true);
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = out.closed(), if !gone => {
                    gone = true;
                    let _ = stop.send(true);
                }
            }
        }
        if gone {
            return Ending::Cancelled;
        }
        match ended {
            Some(TaskReply::Finished { result, .. }) => parse_result(&result, self.me),
            Some(TaskReply::Refused { message }) => Ending::Refused(message),
            Some(TaskReply::Fault { message }) => Ending::Lost(message),
            Some(TaskReply::HandedBack { message }) => Ending::HandedBack(message),
            _ => Ending::Lost("the build ended without a result".to_owned()),
        }
    }

    /// Hands the offer to `worker` and relays what it says until the build ends.
    async fn run_on(
        &self,
        worker: PeerId,
        offer: &TaskOffer,
        secrets: &[(String, String)],
        out: &Out,
        why: &str,
        mut reporter: Reporter,
    ) -> Ending {
        let body = match task::encode_offer(offer) {
            Ok(body) => body,
            Err(err) => return Ending::Failed(format!("the build cannot be sent: {err}")),
        };
        let secrets = match task::encode_secrets(&TaskSecrets {
            secrets: secrets.to_vec(),
        }) {
            Ok(secrets) => secrets,
            Err(err) => return Ending::Failed(format!("the secrets cannot be sent: {err}")),
        };
        let control = self.control.clone();
        // Unreachable or mute, the peer is as good as lost for this run; a decline is its
        // answer.
        let opened = tokio::time::timeout(OFFER_TIMEOUT, async {
            // A worker too busy to take a new stream has it dropped (libp2p-stream queues
            // none), and nothing ran: the offer is made again on a fresh stream, a few times.
            let open = || {
                let mut control = control.clone();
                async move {
                    control
                        .open_stream(worker, protocol())
                        .await
                        .map_err(|e| format!("cannot open a stream: {e}"))
                }
            };
            let (mut stream, frame) =
                first_answer(&worker.to_string(), open, &body, task::MAX_REPLY_BYTES)
                    .await
                    .map_err(Ending::Lost)?;
            let reply = task::decode_reply(&frame).map_err(|e| Ending::Lost(e.to_string()))?;
            match reply {
                TaskReply::Accepted => {}
                TaskReply::Declined { reason }
                    if reason == NO_FREE_SLOT || reason == ALREADY_RUNNING =>
                {
                    return Err(Ending::Full);
                }
                TaskReply::Declined { reason } => return Err(Ending::Declined(reason)),
                other => {
                    let answer = format!("it answered {} to an offer", reply_name(&other));
                    return Err(Ending::Lost(answer));
                }
            }
            // Only the peer that took the build gets its secrets.
            write_frame(&mut stream, &secrets)
                .await
                .map_err(|e| Ending::Lost(e.to_string()))?;
            Ok(stream)
        })
        .await;
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(ending)) => return ending,
            Err(_) => return Ending::Lost("it did not answer the offer in time".to_owned()),
        };
        reporter.accepted().await;
        let (reader, mut writer) = stream.split();
        if !self.say_where(&worker.to_string(), why, out).await {
            let _ = writer.close().await;
            return Ending::Cancelled;
        }
        // Frames are read whole by a task of their own, so waiting for the lease or the
        // submitter never cuts a frame in half.
        let (frames, mut replies) = mpsc::channel(64);
        let reading = tokio::spawn(read_replies(reader, frames));
        let _reading = AbortOnDrop(reading);
        let deadline = tokio::time::sleep(Duration::from_secs(offer.timeout_secs) + RESULT_GRACE);
        tokio::pin!(deadline);
        loop {
            let reply = tokio::select! {
                reply = replies.recv() => reply.unwrap_or_else(|| Err("the stream ended".to_owned())),
                _ = &mut deadline => {
                    let _ = writer.close().await;
                    return Ending::Failed(format!(
                        "peer {worker} gave no result within the build's timeout and {} s more",
                        RESULT_GRACE.as_secs()
                    ));
                }
                _ = out.closed() => {
                    let _ = writer.close().await;
                    return Ending::Cancelled;
                }
            };
            match reply {
                Ok(TaskReply::Event { json }) => match relay(&json) {
                    Ok(line) => {
                        reporter.progress().await;
                        if out.send(line).await.is_err() {
                            let _ = writer.close().await;
                            return Ending::Cancelled;
                        }
                    }
                    Err(why) => {
                        let _ = writer.close().await;
                        return Ending::Lost(why);
                    }
                },
                Ok(TaskReply::Finished {
                    result,
                    public_key,
                    signature,
                }) => {
                    return match verify(worker, &offer.task, &result, &public_key, &signature) {
                        Ok(()) => parse_result(&result, worker),
                        Err(why) => Ending::Lost(format!("its result is not signed by it: {why}")),
                    };
                }
                Ok(TaskReply::Refused { message }) => return Ending::Refused(message),
                Ok(TaskReply::Fault { message }) => return Ending::Lost(message),
                Ok(TaskReply::HandedBack { message }) => return Ending::HandedBack(message),
                Ok(other) => {
                    return Ending::Lost(format!("it answered {} mid-build", reply_name(&other)));
                }
                Err(err) => return Ending::Lost(err),
            }
        }
    }

    /// Fetches the result's artifact trees from the worker into this store, so the submitter
    /// can export them. A tree that cannot be fetched is the build's fault: its artifacts did
    /// not come back.
    async fn fetch_artifacts(&self, worker: PeerId, result: &BuildResult) -> Result<(), String> {
        let mut digests: Vec<Digest> = Vec::new();
        for result in std::iter::once(result).chain(result.members.iter()) {
            digests.extend(
                result
                    .artifacts
                    .iter()
                    .filter_map(|a| a.digest.parse::<Digest>().ok()),
            );
        }
        for digest in digests {
            let what = format!("artifacts of {}", result.build_id);
            if let Err(err) = self.cache.fetch_from(digest, vec![worker], &what).await {
                return Err(format!(
                    "the artifacts {digest} could not be fetched from peer {worker}: {err}"
                ));
            }
        }
        Ok(())
    }

    /// Runs `offer` with this node's `peerbuild run`, its events to `replies`; returns how it
    /// ended (`Finished`, `Refused` or `Fault`). `coordinator` is where the source comes from
    /// (`None`: it is in this store already). `cancel` turning true stops the build.
    async fn run_task(
        &self,
        offer: &TaskOffer,
        secrets: &[(String, String)],
        coordinator: Option<PeerId>,
        replies: mpsc::Sender<TaskReply>,
        cancel: watch::Receiver<bool>,
    ) -> TaskReply {
        self.announce(offer, TaskState::Running);
        let reply = self
            .execute(offer, secrets, coordinator, replies, cancel)
            .await;
        let state = match &reply {
            TaskReply::Finished { result, .. } => TaskState::Finished {
                status: serde_json::from_str::<serde_json::Value>(result)
                    .ok()
                    .and_then(|r| r["status"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
                result: *blake3::hash(result.as_bytes()).as_bytes(),
            },
            _ => TaskState::Ended,
        };
        self.announce(offer, state);
        reply
    }

    /// Tells the pool (gossip on the events topic) where a run stands. Best effort: a full
    /// command queue drops the announcement, never the run.
    fn announce(&self, offer: &TaskOffer, state: TaskState) {
        let _ = self.cache.commands.try_send(SwarmCommand::TaskState {
            task: offer.task.clone(),
            build_id: offer.build_id.clone(),
            state,
        });
    }

    /// [`Tasks::run_task`]'s work.
    async fn execute(
        &self,
        offer: &TaskOffer,
        secrets: &[(String, String)],
        coordinator: Option<PeerId>,
        replies: mpsc::Sender<TaskReply>,
        mut cancel: watch::Receiver<bool>,
    ) -> TaskReply {
        let fault = |message: String| TaskReply::Fault { message };
        if let Some(coordinator) = coordinator {
            let what = format!("source of {}", offer.build_id);
            if let Err(err) = self
                .cache
                .fetch_from(offer.source, vec![coordinator], &what)
                .await
            {
                return fault(format!(
                    "cannot fetch the source from the coordinator: {err}"
                ));
            }
        }
        // The folder is named here, never from the peer's text, and goes when the task does
        // (even if the task is dropped midway).
        let number = self.next_folder.fetch_add(1, Ordering::Relaxed);
        let folder = FolderGuard(
            self.data_root
                .join("tasks")
                .join(format!("{}-{number}", std::process::id())),
        );
        let (source, buildspec) = match prepare_folder(&self.store, offer, &folder.0).await {
            Ok(paths) => paths,
            Err(err) => return fault(err),
        };
        let ended = self
            .run_child(
                offer,
                secrets,
                coordinator.is_none(),
                &source,
                &buildspec,
                &replies,
                &mut cancel,
            )
            .await;
        drop(folder);
        match ended {
            Ok(Some(result)) => {
                let signature = match self.keypair.sign(&task::signed_bytes(&offer.task, &result)) {
                    Ok(signature) => signature,
                    Err(err) => return fault(format!("cannot sign the result: {err}")),
                };
                TaskReply::Finished {
                    result,
                    public_key: self.keypair.public().encode_protobuf(),
                    signature,
                }
            }
            Ok(None) => fault("the build ended without a result".to_owned()),
            Err(ChildEnd::Refused(message)) => TaskReply::Refused { message },
            Err(ChildEnd::Failed(message)) => fault(message),
        }
    }

    /// Runs `peerbuild run` for the offer; its `--json` lines go to `replies`. Returns the
    /// final result's JSON, if it printed one.
    #[allow(clippy::too_many_arguments)]
    async fn run_child(
        &self,
        offer: &TaskOffer,
        secrets: &[(String, String)],
        submitted_here: bool,
        source: &Path,
        buildspec: &Path,
        replies: &mpsc::Sender<TaskReply>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<Option<String>, ChildEnd> {
        let exe = std::env::current_exe()
            .map_err(|e| ChildEnd::Failed(format!("cannot find the peerbuild binary: {e}")))?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("--data-dir")
            .arg(&self.data_root)
            .arg("run")
            .arg(source)
            .arg("--json")
            .arg("--local")
            .arg("--buildspec")
            .arg(buildspec)
            .arg("--timeout")
            .arg(format!("{}s", offer.timeout_secs.max(1)))
            // Values from the offer go as `--flag=VALUE`, one argument each, so no value can
            // ever be read as a flag of its own.
            .arg(format!("--build-id={}", offer.build_id))
            .arg(format!("--build-number={}", offer.build_number))
            .env("PEERBUILD_PEER_ID", self.me.to_string())
            .env_remove("PEERBUILD_NODE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. The build is told to stop (SIGTERM: it kills its
        // processes in order) when this node dies, as a lost worker's build must not go on.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(member) = &offer.batch_member {
            // One member of a batch the pool fans out: its submitter keeps the batch's record.
            command
                .arg(format!("--batch-member={member}"))
                .arg("--no-record");
        }
        if submitted_here {
            // The submitter is this node's owner (the API is theirs alone), who keeps the
            // build's record; `--sandbox` is their own choice here.
            if offer.batch_member.is_none() {
                command.arg("--no-record");
            }
            if let Some(sandbox) = &offer.sandbox {
                command.arg(format!("--sandbox={sandbox}"));
            }
        } else if let Some(sandbox) = &offer.sandbox {
            command.arg(format!("--sandbox-request={sandbox}"));
        }
        if offer.deny_network {
            command.arg("--deny-network");
        }
        if let Some(version) = &offer.source_version {
            command.arg(format!("--source-version={version}"));
        }
        let handed = hand_over(&mut command, secrets, &offer.env)?;
        let mut child = command
            .spawn()
            .map_err(|e| ChildEnd::Failed(format!("cannot start peerbuild run: {e}")))?;
        // Dropped midway (the node stopping), the build is still stopped in order.
        let stop_on_drop = child.id().map(TermOnDrop);
        fill(handed);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let errors = tokio::spawn(async move {
            let mut tail = String::new();
            if let Some(stderr) = stderr {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tail.push_str(&line);
                    tail.push('\n');
                    if tail.len() > 16 * 1024 {
                        tail.drain(..tail.len() - 8 * 1024);
                    }
                }
            }
            tail
        });
        let mut result = None;
        let mut cancelled = false;
        if let Some(stdout) = stdout {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            loop {
                let next = tokio::select! {
                    next = lines.next_line() => next,
                    _ = cancel.changed(), if !cancelled => {
                        cancelled = true;
                        stop(&mut child).await;
                        continue;
                    }
                };
                let Ok(Some(json)) = next else { break };
                if json.len() > task::MAX_REPLY_BYTES - 1024 {
                    continue;
                }
                if json.contains("\"event\":\"build_finished\"")
                    && let Ok(envelope) = serde_json::from_str::<serde_json::Value>(&json)
                    && envelope["event"] == "build_finished"
                {
                    result = Some(envelope["result"].to_string());
                    continue;
                }
                if replies.send(TaskReply::Event { json }).await.is_err() && !cancelled {
                    cancelled = true;
                    stop(&mut child).await;
                }
            }
        }
        let status = child.wait().await;
        // Reaped: its pid may be anyone's now.
        std::mem::forget(stop_on_drop);
        let tail = errors.await.unwrap_or_default();
        let tail = tail.trim().trim_start_matches("peerbuild: ").to_owned();
        match status.map(|s| s.code()) {
            Ok(Some(2)) => Err(ChildEnd::Refused(tail)),
            _ if result.is_some() => Ok(result),
            Ok(code) => Err(ChildEnd::Failed(format!(
                "peerbuild run ended ({}) without a result: {tail}",
                code.map_or_else(|| "killed".to_owned(), |c| format!("exit {c}"))
            ))),
            Err(err) => Err(ChildEnd::Failed(err.to_string())),
        }
    }
}

/// How a worker's `peerbuild run` ended without a result.
enum ChildEnd {
    Refused(String),
    Failed(String),
}

/// Asks the build to stop (SIGTERM: it kills its processes and ends STOPPED), then kills it
/// if it has not ended within [`STOP_GRACE`].
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill on the pid of our own child, which has not been reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The descriptor on which a worker's `peerbuild run` reads its secrets (`--secrets`).
const SECRETS_DESCRIPTOR: RawFd = 3;
/// The descriptor on which it reads the build's `--env` variables (`--env-list`).
const ENV_DESCRIPTOR: RawFd = 4;

/// Text a child reads on a descriptor of its own: a pipe whose read end it gets as
/// `descriptor`, and whose write end this node fills once the child has started.
struct Handed {
    read: OwnedFd,
    write: OwnedFd,
    descriptor: RawFd,
    text: Vec<u8>,
}

/// Hands the child its secrets and the build's `--env` variables on pipes (descriptors 3 and
/// 4), with the flags that name them: never a file, nor its command line, which every user of
/// this machine can read (`ps`, `/proc/PID/cmdline`).
fn hand_over(
    command: &mut tokio::process::Command,
    secrets: &[(String, String)],
    env: &[(String, String)],
) -> Result<Vec<Handed>, ChildEnd> {
    let failed = |e: std::io::Error| ChildEnd::Failed(format!("pipe: {e}"));
    let mut handed = Vec::new();
    if !secrets.is_empty() {
        let text: String = secrets
            .iter()
            .map(|(name, value)| format!("{name}={value}\n"))
            .collect();
        handed.push(handed_pipe(SECRETS_DESCRIPTOR, text.into_bytes()).map_err(failed)?);
        command.args(["--secrets", "/dev/fd/3"]);
    }
    if !env.is_empty() {
        // A command line cannot hold a NUL byte, so such a value never reached a build as an
        // argument; it does not now either.
        if env
            .iter()
            .any(|(name, value)| name.contains('\0') || value.contains('\0'))
        {
            return Err(ChildEnd::Failed(
                "cannot start peerbuild run: a variable holds a NUL byte".to_owned(),
            ));
        }
        // Each as `--env` took it, `NAME=VALUE`, so the child reads them exactly as before.
        let assignments: Vec<String> = env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let text = serde_json::to_vec(&assignments)
            .map_err(|e| ChildEnd::Failed(format!("the variables: {e}")))?;
        handed.push(handed_pipe(ENV_DESCRIPTOR, text).map_err(failed)?);
        command.arg(format!("--env-list=/dev/fd/{ENV_DESCRIPTOR}"));
    }
    if !handed.is_empty() {
        let given = handed
            .iter()
            .map(|h| (h.read.as_raw_fd(), h.descriptor))
            .collect();
        give_descriptors(command, given);
    }
    Ok(handed)
}

/// Once the child has started: closes this side's read ends, and writes each text (off the
/// async threads: a pipe holds only so much until the child reads it).
fn fill(handed: Vec<Handed>) {
    for Handed {
        read, write, text, ..
    } in handed
    {
        drop(read);
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = std::fs::File::from(write);
            let _ = file.write_all(&text);
        });
    }
}

fn handed_pipe(descriptor: RawFd, text: Vec<u8>) -> std::io::Result<Handed> {
    let (read, write) = pipe()?;
    Ok(Handed {
        read,
        write,
        descriptor,
        text,
    })
}

/// Gives the child each `(read end, descriptor)` pair's read end as that descriptor. Every
/// read end is first copied above all the targets, so giving one never closes another.
fn give_descriptors(command: &mut tokio::process::Command, mut given: Vec<(RawFd, RawFd)>) {
    // SAFETY: fcntl and dup2 are async-signal-safe and nothing here allocates; it runs in the
    // child between fork and exec. The copies are close-on-exec, the descriptors given are not.
    unsafe {
        command.pre_exec(move || {
            for (read, _) in given.iter_mut() {
                let copy = libc::fcntl(*read, libc::F_DUPFD_CLOEXEC, 10);
                if copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                *read = copy;
            }
            for (read, descriptor) in &given {
                if libc::dup2(*read, *descriptor) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A task's folder, removed (off the async threads) when the task ends or is dropped.
struct FolderGuard(PathBuf);

impl Drop for FolderGuard {
    fn drop(&mut self) {
        let folder = std::mem::take(&mut self.0);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || std::fs::remove_dir_all(folder));
        } else {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
}

/// A running `peerbuild run`: asked to stop (SIGTERM: it stops its build in order) if the task
/// is dropped before it was reaped. Forgotten once the child is reaped.
struct TermOnDrop(u32);

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid, which has not been reaped (the guard is forgotten
        // right after `wait`), so it cannot be another process's.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a worker's replies whole, one after another, into `frames`; ends at the stream's end
/// (an error last, unless it ended cleanly after a final reply).
async fn read_replies<R: AsyncRead + Unpin>(
    mut reader: R,
    frames: mpsc::Sender<Result<TaskReply, String>>,
) {
    loop {
        let reply = read_reply(&mut reader).await;
        let failed = reply.is_err();
        if frames.send(reply).await.is_err() || failed {
            return;
        }
    }
}

/// Writes the source tree and the buildspec into the task's folder; returns their paths.
async fn prepare_folder(
    store: &Arc<Store>,
    offer: &TaskOffer,
    folder: &Path,
) -> Result<(PathBuf, PathBuf), String> {
    let store = store.clone();
    let folder = folder.to_owned();
    let source = folder.join("source").join(&offer.source_name);
    let buildspec = folder.join("buildspec.yml");
    let (tree, text) = (offer.source, offer.buildspec.clone());
    let paths = (source.clone(), buildspec.clone());
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&folder);
        crate::data_dir::create_private(&folder).map_err(|e| format!("{e:#}"))?;
        std::fs::create_dir_all(folder.join("source")).map_err(|e| e.to_string())?;
        export::export(&store, &tree, &source).map_err(|e| format!("{e:#}"))?;
        std::fs::write(&buildspec, text).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(paths)
}

/// The worker's result, naming the peer that ran it as the coordinator knows it (never as the
/// result claims), members too.
fn parse_result(json: &str, worker: PeerId) -> Ending {
    match serde_json::from_str::<BuildResult>(json) {
        Ok(mut result) => {
            result.peer = worker.to_string();
            for member in &mut result.members {
                member.peer = worker.to_string();
            }
            Ending::Result(Box::new(result))
        }
        Err(err) => Ending::Lost(format!("its result is not understood: {err}")),
    }
}

/// Checks that `signature` is `worker`'s over the task's result.
fn verify(
    worker: PeerId,
    task_id: &str,
    result: &str,
    public_key: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let key = PublicKey::try_decode_protobuf(public_key).map_err(|e| e.to_string())?;
    if key.to_peer_id() != worker {
        return Err("the key is another peer's".to_owned());
    }
    if !key.verify(&task::signed_bytes(task_id, result), signature) {
        return Err("the signature does not match".to_owned());
    }
    Ok(())
}

async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> Result<TaskReply, String> {
    let frame = read_frame(stream, task::MAX_REPLY_BYTES)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the stream ended")?;
    task::decode_reply(&frame).map_err(|e| e.to_string())
}

async fn write_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    reply: &TaskReply,
) -> Result<(), String> {
    let body = task::encode_reply(reply).map_err(|e| e.to_string())?;
    write_frame(stream, &body).await.map_err(|e| e.to_string())
}

fn reply_name(reply: &TaskReply) -> &'static str {
    match reply {
        TaskReply::Accepted => "Accepted",
        TaskReply::Declined { .. } => "Declined",
        TaskReply::Event { .. } => "Event",
        TaskReply::Finished { .. } => "Finished",
        TaskReply::Refused { .. } => "Refused",
        TaskReply::Fault { .. } => "Fault",
        TaskReply::HandedBack { .. } => "HandedBack",
    }
}

/// Whether a run's name is one its coordinator gave it (`COORDINATOR/...`). Only such offers
/// are taken, so no peer can pass its offer off as another coordinator's run, nor end that
/// run's place in the heartbeats (which list runs by name).
fn named_by(task: &str, coordinator: &PeerId) -> bool {
    task.strip_prefix(coordinator.to_string().as_str())
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Takes tasks from coordinators until `shutdown` turns true.
pub async fn serve(
    tasks: Arc<Tasks>,
    mut incoming: libp2p_stream::IncomingStreams,
    allowed: Option<Vec<PeerId>>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((peer, stream)) =
        next_stream(&mut incoming, allowed.as_deref(), &mut shutdown).await
    {
        let tasks = tasks.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = tasks.work(peer, stream, shutdown).await {
                debug!(%peer, error = %err, "task stream ended");
            }
        });
    }
}

impl Tasks {
    /// One task from `coordinator`: accept it if a slot is free, take its secrets, run it, and
    /// relay its events. The coordinator closing its side (or not reading for a minute) stops
    /// the build.
    async fn work(
        &self,
        coordinator: PeerId,
        stream: libp2p::Stream,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let (mut reader, mut writer) = stream.split();
        let frame = tokio::time::timeout(
            OFFER_TIMEOUT,
            read_frame(&mut reader, task::MAX_OFFER_BYTES),
        )
        .await
        .map_err(|_| "no offer in time".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or("the stream ended before an offer")?;
        let offer = match task::decode_offer(&frame) {
            Ok(offer) => offer,
            Err(err) => {
                let reason = format!("malformed offer: {err}");
                write_reply(
                    &mut writer,
                    &TaskReply::Declined {
                        reason: reason.clone(),
                    },
                )
                .await?;
                return Err(reason);
            }
        };
        if !named_by(&offer.task, &coordinator) {
            let reason = "the task is not named by the peer that offers it".to_owned();
            return write_reply(&mut writer, &TaskReply::Declined { reason }).await;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let reason = NO_FREE_SLOT.to_owned();
            return write_reply(&mut writer, &TaskReply::Declined { reason }).await;
        };
        let Some(_running) = Running::new(&self.running, &offer.task) else {
            let reason = ALREADY_RUNNING.to_owned();
            return write_reply(&mut writer, &TaskReply::Declined { reason }).await;
        };
        write_reply(&mut writer, &TaskReply::Accepted).await?;
        let frame = tokio::time::timeout(
            OFFER_TIMEOUT,
            read_frame(&mut reader, task::MAX_OFFER_BYTES),
        )
        .await
        .map_err(|_| "no secrets in time".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or("the stream ended before the secrets")?;
        let secrets = task::decode_secrets(&frame).map_err(|e| e.to_string())?;
        info!(%coordinator, build = %offer.build_id, "running a build for a peer");
        // The coordinator writes nothing more: anything it sends, or the end of its side, means
        // it is gone or cancels.
        let (gone_sender, mut gone) = watch::channel(false);
        let watching = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            let _ = reader.read(&mut byte).await;
            let _ = gone_sender.send(true);
        });
        let _watching = AbortOnDrop(watching);
        let (replies, mut received) = mpsc::channel(256);
        let (stop, cancel) = watch::channel(false);
        let run = self.run_task(&offer, &secrets.secrets, Some(coordinator), replies, cancel);
        tokio::pin!(run);
        let mut ending = None;
        let mut open = true;
        let mut stopping = false;
        loop {
            tokio::select! {
                ended = &mut run, if ending.is_none() => ending = Some(ended),
                reply = received.recv() => match reply {
                    Some(reply) => {
                        let written = open
                            && tokio::time::timeout(WRITE_TIMEOUT, write_reply(&mut writer, &reply))
                                .await
                                .is_ok_and(|w| w.is_ok());
                        if open && !written {
                            // The coordinator is gone or stopped reading: stop the build.
                            open = false;
                            let _ = stop.send(true);
                        }
                    }
                    None => break,
                },
                changed = gone.changed(), if open => {
                    if changed.is_ok() {
                        open = false;
                        let _ = stop.send(true);
                    }
                }
                _ = shutdown.changed(), if !stopping => {
                    // Handing the build back: the coordinator runs it elsewhere.
                    stopping = true;
                    let _ = stop.send(true);
                }
            }
        }
        let ending = if stopping {
            // Whatever the stopped build says, it did not run to its end: the coordinator
            // runs it again elsewhere.
            TaskReply::HandedBack {
                message: "the peer is shutting down and handed the build back".to_owned(),
            }
        } else {
            ending.unwrap_or(TaskReply::Fault {
                message: "the build ended without a result".to_owned(),
            })
        };
        // The slot is free before the coordinator hears of the ending: it may offer the next
        // build here at once.
        drop(slot);
        if open {
            tokio::time::timeout(WRITE_TIMEOUT, write_reply(&mut writer, &ending))
                .await
                .map_err(|_| "the coordinator stopped reading".to_owned())??;
            // The run stays in this node's heartbeats until the coordinator has read its end
            // (it closes its side then), so it is never taken for vanished in between.
            let _ = tokio::time::timeout(WRITE_TIMEOUT, gone.changed()).await;
        }
        let _ = writer.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_child_reads_the_builds_variables_and_secrets_on_pipes_not_its_command_line() {
        let env = vec![
            (
                "GREETING".to_owned(),
                "hello there\nsecond = line\r".to_owned(),
            ),
            ("EMPTY".to_owned(), String::new()),
        ];
        let secrets = vec![("/ci/token".to_owned(), "s3cr3t".to_owned())];
        // A child that shows what it reads on descriptors 4 and 3.
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", "cat /dev/fd/4; printf '|'; cat /dev/fd/3", "sh"])
            .stdout(Stdio::piped());
        let handed = hand_over(&mut command, &secrets, &env).unwrap_or_else(|_| panic!("pipes"));
        let arguments: Vec<String> = command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for secret in ["hello there", "second = line", "s3cr3t"] {
            assert!(
                !arguments.iter().any(|a| a.contains(secret)),
                "{secret:?} is on the command line: {arguments:?}"
            );
        }
        assert!(
            arguments.contains(&"--env-list=/dev/fd/4".to_owned()),
            "{arguments:?}"
        );
        let output = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async move {
                let child = command.spawn().expect("sh starts");
                fill(handed);
                child.wait_with_output().await.expect("sh ends")
            });
        let shown = String::from_utf8(output.stdout).expect("utf-8");
        let (listed, secrets_read) = shown.split_once('|').expect("both read");
        assert_eq!(secrets_read, "/ci/token=s3cr3t\n");
        // The child takes each listed assignment as it took an `--env` before.
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("env.json");
        std::fs::write(&path, listed).expect("write");
        let read: Vec<(String, String)> = crate::run::read_env_list(&path)
            .expect("reads")
            .iter()
            .map(|a| crate::engine::env::parse_assignment(a).expect("parses"))
            .collect();
        assert_eq!(read, env);
    }

    #[test]
    fn a_worker_cannot_pass_a_result_off_as_an_event() {
        let finished = r#"{"v":1,"event":"build_finished","result":{"build_id":"a:b","build_number":1,"status":"SUCCEEDED","start_time_ms":0,"duration_ms":0,"peer":"x","phases":[]}}"#;
        assert!(relay(finished).is_err());
        assert!(relay("not json").is_err());
        // An event with a line break inside its text goes out as one line.
        let log = r#"{"v":1,"event":"log","phase":"BUILD","line":"a\nb"}"#;
        let line = relay(log).expect("an event");
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
    }

    #[test]
    fn a_peer_can_offer_only_runs_it_named() {
        let coordinator = PeerId::random();
        let other = PeerId::random();
        assert!(named_by(&format!("{coordinator}/17/3.0#1"), &coordinator));
        for spoofed in [
            format!("{other}/17/3.0#1"),
            format!("{coordinator}"),
            format!("{coordinator}x/17"),
            format!("/{coordinator}/17"),
            format!("{other}/{coordinator}/17"),
            String::new(),
        ] {
            assert!(!named_by(&spoofed, &coordinator), "{spoofed}");
        }
    }

    #[test]
    fn a_result_names_the_peer_that_ran_it_whatever_it_claims() {
        let worker = PeerId::random();
        let claimed = r#"{"build_id":"a:b","build_number":1,"status":"SUCCEEDED","start_time_ms":0,"duration_ms":0,"peer":"someone else","phases":[]}"#;
        match parse_result(claimed, worker) {
            Ending::Result(result) => assert_eq!(result.peer, worker.to_string()),
            _ => panic!("a result"),
        }
    }
}
