//! The buildspec model: a parsed `buildspec.yml`, key by key, as BUILDSPEC.md describes it.
//!
//! Maps that users write (variables, reports, secondary artifacts) are kept as ordered lists of
//! pairs so that output follows the file's order; the parser refuses duplicate keys, so a name
//! appears at most once in each list.

use serde::{Deserialize, Serialize};

/// A whole buildspec file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buildspec {
    pub version: Version,
    /// Top-level `run-as`: the Linux user that runs every phase unless a phase overrides it.
    pub run_as: Option<String>,
    pub env: Env,
    pub proxy: Proxy,
    pub batch: Option<Batch>,
    pub phases: Phases,
    /// `reports`: report group name and its files, in file order.
    pub reports: Vec<(String, Report)>,
    pub artifacts: Option<Artifacts>,
    pub cache: Option<Cache>,
    /// The optional top-level `peerbuild:` section, peerbuild's only extension to the format.
    pub peerbuild: Extension,
}

/// `version: 0.1` runs each command in a fresh shell; `0.2` runs the whole build in one shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    V0_1,
    V0_2,
}

/// `env.shell`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shell {
    #[default]
    Bash,
    /// `/bin/sh`.
    Sh,
}

/// The `env` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    pub shell: Shell,
    /// `env.variables`: literal values, never expanded.
    pub variables: Vec<(String, String)>,
    /// `env.parameter-store`: variable name and parameter path.
    pub parameter_store: Vec<(String, String)>,
    /// `env.secrets-manager`: variable name and the secret it reads.
    pub secrets_manager: Vec<(String, SecretRef)>,
    /// `env.exported-variables`: names reported with the build result.
    pub exported_variables: Vec<String>,
    /// `env.git-credential-helper`.
    pub git_credential_helper: bool,
}

/// A `secrets-manager` reference: `secret-id:json-key:version-stage:version-id`, where every
/// part after the id may be empty. A secret id that is an ARN keeps its own colons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRef {
    pub secret_id: String,
    /// Without a JSON key the variable holds the whole secret text.
    pub json_key: Option<String>,
    pub version_stage: Option<String>,
    pub version_id: Option<String>,
}

/// The `proxy` section: accepted and recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    pub upload_artifacts: bool,
    pub logs: bool,
}

/// The four build phases in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PhaseName {
    Install,
    PreBuild,
    Build,
    PostBuild,
}

impl PhaseName {
    pub const ALL: [PhaseName; 4] = [
        PhaseName::Install,
        PhaseName::PreBuild,
        PhaseName::Build,
        PhaseName::PostBuild,
    ];

    /// The key as written in a buildspec (`pre_build`).
    pub fn key(self) -> &'static str {
        match self {
            PhaseName::Install => "install",
            PhaseName::PreBuild => "pre_build",
            PhaseName::Build => "build",
            PhaseName::PostBuild => "post_build",
        }
    }

    /// The phase as CodeBuild reports it (`PRE_BUILD`).
    pub fn report_name(self) -> &'static str {
        match self {
            PhaseName::Install => "INSTALL",
            PhaseName::PreBuild => "PRE_BUILD",
            PhaseName::Build => "BUILD",
            PhaseName::PostBuild => "POST_BUILD",
        }
    }
}

/// The `phases` section; a phase that is not written is `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    pub install: Option<Phase>,
    pub pre_build: Option<Phase>,
    pub build: Option<Phase>,
    pub post_build: Option<Phase>,
}

impl Phases {
    pub fn get(&self, name: PhaseName) -> Option<&Phase> {
        match name {
            PhaseName::Install => self.install.as_ref(),
            PhaseName::PreBuild => self.pre_build.as_ref(),
            PhaseName::Build => self.build.as_ref(),
            PhaseName::PostBuild => self.post_build.as_ref(),
        }
    }
}

/// One phase.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub run_as: Option<String>,
    pub on_failure: OnFailure,
    /// `runtime-versions` (install only): runtime name and requested version, in file order.
    pub runtime_versions: Vec<(String, String)>,
    pub commands: Vec<String>,
    pub finally: Vec<String>,
}

/// `on-failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnFailure {
    /// Not written: CodeBuild's default transitions.
    #[default]
    Default,
    Abort,
    Continue,
    /// `RETRY`, `RETRY-<count>`, `RETRY-<regex>`, `RETRY-<count>-<regex>`. `count` is the number
    /// of retries after the first attempt (3 when not written). With a pattern, a retry happens
    /// only when the failed attempt's output matches it.
    Retry {
        count: u32,
        pattern: Option<String>,
    },
}

/// An artifact block: the primary `artifacts` or one of its `secondary-artifacts`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSet {
    pub files: Vec<String>,
    /// `name`, evaluated with shell syntax when the artifacts are uploaded.
    pub name: Option<String>,
    pub discard_paths: bool,
    pub base_directory: Option<String>,
    pub exclude_paths: Vec<String>,
    pub enable_symlinks: bool,
    pub s3_prefix: Option<String>,
}

/// The `artifacts` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifacts {
    /// The primary artifact; absent when the section holds only `secondary-artifacts`.
    pub primary: Option<ArtifactSet>,
    /// `secondary-artifacts`: identifier and block, in file order.
    pub secondary: Vec<(String, ArtifactSet)>,
}

/// A report group under `reports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub files: Vec<String>,
    pub base_directory: Option<String>,
    pub discard_paths: bool,
    pub file_format: ReportFormat,
}

/// `file-format` of a report group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportFormat {
    #[default]
    JunitXml,
    CucumberJson,
    NunitXml,
    Nunit3Xml,
    TestngXml,
    VisualStudioTrx,
    CloverXml,
    CoberturaXml,
    JacocoXml,
    SimpleCov,
}

impl ReportFormat {
    /// The name as written in a buildspec (`JUNITXML`).
    pub fn key(self) -> &'static str {
        match self {
            ReportFormat::JunitXml => "JUNITXML",
            ReportFormat::CucumberJson => "CUCUMBERJSON",
            ReportFormat::NunitXml => "NUNITXML",
            ReportFormat::Nunit3Xml => "NUNIT3XML",
            ReportFormat::TestngXml => "TESTNGXML",
            ReportFormat::VisualStudioTrx => "VISUALSTUDIOTRX",
            ReportFormat::CloverXml => "CLOVERXML",
            ReportFormat::CoberturaXml => "COBERTURAXML",
            ReportFormat::JacocoXml => "JACOCOXML",
            ReportFormat::SimpleCov => "SIMPLECOV",
        }
    }
}

/// The `cache` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    pub key: Option<String>,
    /// Tried in order, each as a prefix; at most five.
    pub fallback_keys: Vec<String>,
    pub action: CacheAction,
    pub paths: Vec<String>,
}

/// `cache.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheAction {
    /// Not written: restore before INSTALL and save after the build phases.
    #[default]
    RestoreAndSave,
    Restore,
    Save,
}

/// The `batch` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub fast_fail: bool,
    pub kind: BatchKind,
}

/// Which of the four batch forms the section uses (exactly one).
#[allow(
    clippy::large_enum_variant,
    reason = "a buildspec holds at most one batch, so boxing the matrix would save nothing"
)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchKind {
    /// `build-list`: members run in parallel.
    List(Vec<BatchMember>),
    /// `build-graph`: members wait for the members named in `depend-on`.
    Graph(Vec<BatchMember>),
    /// `build-matrix`: one member per combination.
    Matrix(Matrix),
    /// `build-fanout`: one task split into `parallelism` members.
    Fanout(Fanout),
}

/// A member of `build-list` or `build-graph`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMember {
    pub identifier: String,
    /// Another buildspec file in the source, relative to the source root.
    pub buildspec: Option<String>,
    pub ignore_failure: bool,
    pub env: MemberEnv,
    /// `depend-on` (build-graph only).
    pub depend_on: Vec<String>,
    pub debug_session: bool,
}

/// A batch member's `env` overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEnv {
    pub variables: Vec<(String, String)>,
    pub image: Option<String>,
    pub compute_type: Option<String>,
    pub r#type: Option<String>,
    pub privileged_mode: bool,
    pub fleet: Option<String>,
}

/// `build-matrix`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    /// `static`: settings every member shares.
    pub static_ignore_failure: bool,
    pub static_env: MemberEnv,
    /// `dynamic.buildspec`: one or more buildspec files (empty: the current one).
    pub buildspecs: Vec<String>,
    /// `dynamic.env.image`.
    pub images: Vec<String>,
    /// `dynamic.env.compute-type`.
    pub compute_types: Vec<String>,
    /// `dynamic.env.variables`: each variable with the values it takes.
    pub variables: Vec<(String, Vec<String>)>,
}

/// `build-fanout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fanout {
    pub parallelism: u32,
    pub ignore_failure: bool,
}

/// Which sandbox runs a build or a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SandboxKind {
    Namespace,
    Docker,
    Wasm,
    Host,
}

impl SandboxKind {
    /// Every kind, in the order users read them.
    pub const ALL: [SandboxKind; 4] = [
        SandboxKind::Namespace,
        SandboxKind::Docker,
        SandboxKind::Wasm,
        SandboxKind::Host,
    ];

    /// The kind users write as `key` (`namespace`).
    pub fn from_key(key: &str) -> Option<SandboxKind> {
        Self::ALL.into_iter().find(|kind| kind.key() == key)
    }

    pub fn key(self) -> &'static str {
        match self {
            SandboxKind::Namespace => "namespace",
            SandboxKind::Docker => "docker",
            SandboxKind::Wasm => "wasm",
            SandboxKind::Host => "host",
        }
    }
}

/// Where a phase runs: with the rest of the build (the default) or placed on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    #[default]
    Session,
    Separate,
}

/// The top-level `peerbuild:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub sandbox: Option<SandboxKind>,
    pub image: Option<String>,
    pub network: Option<bool>,
    /// `peerbuild.phases.<phase>`: per-phase overrides, in phase order.
    pub phases: Vec<(PhaseName, PhaseExtension)>,
}

/// Per-phase overrides under `peerbuild.phases`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseExtension {
    pub sandbox: Option<SandboxKind>,
    pub image: Option<String>,
    pub network: Option<bool>,
    pub placement: Placement,
}
