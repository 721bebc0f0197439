//! Builders for peers, tasks and builds, and a harness that keeps a readable transcript of a
//! scheduler's steps, for snapshot tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use scheduler::{
    Action, Attempt, BuildId, BuildSpec, Capabilities, Config, DeclineReason, Event, Guarantees,
    Heartbeat, Input, InputId, Millis, PeerId, Requirements, SandboxKind, Scheduler, SubmitterId,
    TaskId, TaskKey, TaskOutcome, TaskSpec,
};

pub fn linux() -> Capabilities {
    Capabilities {
        os: "linux".into(),
        arch: "x86_64".into(),
        labels: BTreeMap::new(),
        runtimes: BTreeMap::from([(
            "python".into(),
            ["3.11".to_string(), "3.12".to_string()].into(),
        )]),
        sandboxes: BTreeMap::from([
            (SandboxKind::Namespace, Guarantees::ALL),
            (SandboxKind::Docker, Guarantees::ALL),
        ]),
        network: true,
    }
}

pub struct PeerBuilder(Heartbeat);

/// A Linux peer with four free slots, no load, holding nothing.
pub fn peer(id: u64) -> PeerBuilder {
    PeerBuilder(Heartbeat {
        peer: PeerId(id),
        capabilities: Arc::new(linux()),
        total_slots: 4,
        free_slots: 4,
        load_permille: 0,
        holds: Vec::new(),
        running: Vec::new(),
        queued_tasks: 0,
    })
}

impl PeerBuilder {
    pub fn slots(mut self, total: u32, free: u32) -> Self {
        self.0.total_slots = total;
        self.0.free_slots = free;
        self
    }

    pub fn load(mut self, permille: u32) -> Self {
        self.0.load_permille = permille;
        self
    }

    pub fn holds(mut self, inputs: &[u64]) -> Self {
        self.0.holds = inputs.iter().map(|i| InputId(*i)).collect();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        Arc::make_mut(&mut self.0.capabilities)
            .labels
            .insert(key.into(), value.into());
        self
    }

    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.0.capabilities = Arc::new(capabilities);
        self
    }

    pub fn running(mut self, runs: &[(TaskId, Attempt)]) -> Self {
        self.0.running = runs.to_vec();
        self
    }

    /// Tasks waiting in the peer's own coordinator.
    pub fn queued(mut self, tasks: u32) -> Self {
        self.0.queued_tasks = tasks;
        self
    }

    pub fn heartbeat(self) -> Event {
        Event::Heartbeat(self.0)
    }
}

pub struct TaskBuilder(TaskSpec);

/// A task with no requirements beyond the defaults and no inputs.
pub fn task() -> TaskBuilder {
    TaskBuilder(TaskSpec {
        key: TaskKey(0),
        requirements: Requirements::default(),
        inputs: Vec::new(),
        depends_on: Vec::new(),
        ignore_failure: false,
    })
}

impl TaskBuilder {
    pub fn key(mut self, key: u64) -> Self {
        self.0.key = TaskKey(key);
        self
    }

    /// An input of `megabytes` MB.
    pub fn input(mut self, id: u64, megabytes: u64) -> Self {
        self.0.inputs.push(Input {
            id: InputId(id),
            size_bytes: megabytes * 1_000_000,
        });
        self
    }

    pub fn requires(mut self, change: impl FnOnce(&mut Requirements)) -> Self {
        change(&mut self.0.requirements);
        self
    }

    pub fn depends_on(mut self, tasks: &[u32]) -> Self {
        self.0.depends_on = tasks.to_vec();
        self
    }

    pub fn ignore_failure(mut self) -> Self {
        self.0.ignore_failure = true;
        self
    }
}

pub fn build(id: u64, submitter: u64, tasks: Vec<TaskBuilder>) -> Event {
    Event::Submit(BuildSpec {
        build: BuildId(id),
        submitter: SubmitterId(submitter),
        tasks: tasks.into_iter().map(|t| t.0).collect(),
        queued_timeout_ms: 60_000,
    })
}

pub fn id(build: u64, index: u32) -> TaskId {
    TaskId {
        build: BuildId(build),
        index,
    }
}

/// A scheduler, the time, and the transcript of what it was told and what it answered.
pub struct Harness {
    pub scheduler: Scheduler,
    pub now: Millis,
    transcript: Vec<String>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(Config::default())
    }

    pub fn with(config: Config) -> Harness {
        Harness {
            scheduler: Scheduler::new(config),
            now: Millis(0),
            transcript: Vec::new(),
        }
    }

    pub fn at(&mut self, ms: u64) -> &mut Self {
        self.now = Millis(ms);
        self
    }

    /// Steps without recording (for setting a scene).
    pub fn quietly(&mut self, event: Event) -> Vec<Action> {
        let actions = self.scheduler.step(self.now, event);
        self.scheduler
            .check_invariants()
            .expect("the scheduler's invariants hold");
        actions
    }

    /// Steps, recording the event and every action.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        self.transcript
            .push(format!("{} {}", self.now, describe(&event)));
        let actions = self.quietly(event);
        for action in &actions {
            self.transcript.push(format!("  {action}"));
        }
        actions
    }

    pub fn accept(&mut self, task: TaskId, attempt: u32, peer: u64) -> Vec<Action> {
        self.step(Event::Started {
            task,
            attempt: Attempt(attempt),
            peer: PeerId(peer),
        })
    }

    pub fn finish(
        &mut self,
        task: TaskId,
        attempt: u32,
        peer: u64,
        outcome: TaskOutcome,
    ) -> Vec<Action> {
        self.step(Event::Finished {
            task,
            attempt: Attempt(attempt),
            peer: PeerId(peer),
            outcome,
        })
    }

    pub fn decline(&mut self, task: TaskId, attempt: u32, peer: u64) -> Vec<Action> {
        self.step(Event::OfferDeclined {
            task,
            attempt: Attempt(attempt),
            peer: PeerId(peer),
            reason: DeclineReason::Busy,
        })
    }

    pub fn transcript(&mut self) -> String {
        std::mem::take(&mut self.transcript).join("\n")
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Submit(spec) => format!(
            "submit {} by {} ({} tasks)",
            spec.build,
            spec.submitter,
            spec.tasks.len()
        ),
        Event::Heartbeat(h) => format!(
            "heartbeat {}: {}/{} free, running {}",
            h.peer,
            h.free_slots,
            h.total_slots,
            h.running.len()
        ),
        Event::OfferAccepted {
            task,
            attempt,
            peer,
        } => format!("{peer} accepts {task} {attempt}"),
        Event::OfferDeclined {
            task,
            attempt,
            peer,
            reason,
        } => format!("{peer} declines {task} {attempt}: {reason:?}"),
        Event::Started {
            task,
            attempt,
            peer,
        } => format!("{peer} starts {task} {attempt}"),
        Event::Progress {
            task,
            attempt,
            peer,
        } => format!("{peer} progresses {task} {attempt}"),
        Event::Finished {
            task,
            attempt,
            peer,
            outcome,
        } => format!("{peer} finished {task} {attempt}: {outcome}"),
        Event::PeerGone { peer } => format!("{peer} gone"),
        Event::Cancel { build } => format!("cancel {build}"),
        Event::Tick => "tick".into(),
    }
}

/// `peer` started attempt `attempt` of task `index` of build `build`.
pub fn started(build: u64, index: u32, attempt: u32, peer: u64) -> Event {
    Event::Started {
        task: id(build, index),
        attempt: Attempt(attempt),
        peer: PeerId(peer),
    }
}
