//! The events a build emits while it runs, and its final result: what `--json` prints (one
//! object a line, schema version [`SCHEMA_VERSION`], documented in docs/EVENTS.md), what the
//! terminal shows, and what `DATA_DIR/builds/ID/events.jsonl` keeps for `peerbuild logs`.

use serde::{Deserialize, Serialize};

/// Bumped whenever a field changes meaning or disappears; new optional fields keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// A build's or phase's status, as CodeBuild names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Succeeded,
    Failed,
    Fault,
    TimedOut,
    InProgress,
    Stopped,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::Fault => "FAULT",
            Status::TimedOut => "TIMED_OUT",
            Status::InProgress => "IN_PROGRESS",
            Status::Stopped => "STOPPED",
        }
    }

    /// The exit status of `peerbuild run` for a build that ended so (DESIGN.md).
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Succeeded => 0,
            Status::Failed | Status::TimedOut => 1,
            Status::Fault | Status::InProgress => 3,
            Status::Stopped => 130,
        }
    }
}

/// How loud a note is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warning,
}

/// One event. `member` is the batch member's identifier, absent outside batch builds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    BuildStarted {
        build_id: String,
        build_number: u64,
        source: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        source_version: Option<String>,
        sandbox: String,
        batch: bool,
        start_time_ms: u64,
    },
    PhaseStarted {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        member: Option<String>,
        phase: String,
    },
    /// A command about to run.
    Command {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        member: Option<String>,
        phase: String,
        command: String,
    },
    /// A line of the commands' output (standard output and standard error together).
    Log {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        member: Option<String>,
        phase: String,
        line: String,
    },
    /// peerbuild's own remark on the build: a retry, a missing runtime, a skipped phase.
    Note {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        member: Option<String>,
        level: Level,
        message: String,
    },
    PhaseFinished {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        member: Option<String>,
        phase: String,
        status: Status,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        message: Option<String>,
    },
    /// A batch member ended.
    MemberFinished {
        result: Box<BuildResult>,
    },
    BuildFinished {
        result: Box<BuildResult>,
    },
}

/// A finished phase in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: String,
    pub status: Status,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// An exported variable's final value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variable {
    pub name: String,
    pub value: String,
}

/// An artifact (the primary one, or a secondary one by its identifier) as it was copied out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// `primary`, or the secondary artifact's identifier.
    pub identifier: String,
    /// The evaluated `name`, when the buildspec gives one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// The artifact's tree in the store (`peerbuild cache export DIGEST DIR` writes it out).
    pub digest: String,
    /// The folder holding the artifact's files, with `--artifacts`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub location: Option<String>,
}

/// A cache restore or save, as the build's output reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// `restore` or `save`.
    pub action: String,
    /// The key as evaluated.
    pub key: String,
    /// The entry's key that matched (a fallback prefix may match another key).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub matched_key: Option<String>,
    pub hit: bool,
    pub files: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    /// Why a restore missed or a save stored nothing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The peers a restored entry was fetched from (empty: it was in this node's store).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub peers: Vec<String>,
}

impl CacheRecord {
    /// A record of `action` on `key` that found and moved nothing; callers fill in the rest.
    pub fn new(action: &str, key: &str, duration_ms: u64) -> Self {
        CacheRecord {
            action: action.to_owned(),
            key: key.to_owned(),
            matched_key: None,
            hit: false,
            files: 0,
            bytes: 0,
            duration_ms,
            reason: None,
            peers: Vec::new(),
        }
    }
}

/// Passed, failed, skipped and errored test cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub errored: u64,
}

/// A report group's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRecord {
    pub name: String,
    pub format: String,
    pub files: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub counts: Option<TestCounts>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub problems: Vec<String>,
}

/// The result of a build or of one batch member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildResult {
    pub build_id: String,
    pub build_number: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub member: Option<String>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    pub start_time_ms: u64,
    pub duration_ms: u64,
    /// The peer that ran it.
    pub peer: String,
    /// The source's tree digest in the store.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_digest: Option<String>,
    pub phases: Vec<PhaseRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub exported_variables: Vec<Variable>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub artifacts: Vec<ArtifactRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub reports: Vec<ReportRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub caches: Vec<CacheRecord>,
    /// A batch build's members, in the order the batch lists them.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub members: Vec<BuildResult>,
}

impl BuildResult {
    /// A result for a build that ended before it ran anything of its own (refused, stopped, or
    /// lost): its status and why, every list empty.
    pub fn ended_early(
        build_id: String,
        build_number: u64,
        status: Status,
        message: String,
    ) -> Self {
        BuildResult {
            build_id,
            build_number,
            member: None,
            status,
            message: Some(message),
            start_time_ms: 0,
            duration_ms: 0,
            peer: String::new(),
            source_digest: None,
            phases: Vec::new(),
            exported_variables: Vec::new(),
            artifacts: Vec::new(),
            reports: Vec::new(),
            caches: Vec::new(),
            members: Vec::new(),
        }
    }
}

/// An event as written out: the schema version first, then the event's own fields.
#[derive(Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub event: Event,
}

impl Event {
    /// Applies `mask` to every piece of text that came from the build or its inputs, so that no
    /// secret leaves the engine in any event.
    pub fn mask_with(&mut self, mask: &dyn Fn(&str) -> String) {
        let m = |s: &mut String| *s = mask(s);
        match self {
            Event::BuildStarted { .. } | Event::PhaseStarted { .. } => {}
            Event::Command { command, .. } => m(command),
            Event::Log { line, .. } => m(line),
            Event::Note { message, .. } => m(message),
            Event::PhaseFinished { message, .. } => message.iter_mut().for_each(m),
            Event::MemberFinished { result } | Event::BuildFinished { result } => {
                result.mask_with(mask)
            }
        }
    }
}

impl BuildResult {
    fn mask_with(&mut self, mask: &dyn Fn(&str) -> String) {
        let m = |s: &mut String| *s = mask(s);
        self.message.iter_mut().for_each(m);
        for phase in &mut self.phases {
            phase.message.iter_mut().for_each(m);
        }
        for variable in &mut self.exported_variables {
            m(&mut variable.value);
        }
        for artifact in &mut self.artifacts {
            artifact.name.iter_mut().for_each(m);
        }
        for cache in &mut self.caches {
            m(&mut cache.key);
            cache.matched_key.iter_mut().for_each(m);
            cache.reason.iter_mut().for_each(m);
        }
        for member in &mut self.members {
            member.mask_with(mask);
        }
    }
}
