//! The buildspec parser: `buildspec.yml` text in, a checked [`Buildspec`] out, or a
//! [`ParseError`] naming the line, column and key to fix.
//!
//! One function per section, each taking the section's [`Item`] and returning its part of the
//! model. Checks that span a section (a name in two secret sources, batch dependency cycles) run
//! once the section's values are known.

use std::collections::HashMap;

use super::error::{ParseError, did_you_mean};
use super::model::{
    ArtifactSet, Artifacts, Batch, BatchKind, BatchMember, Buildspec, Cache, CacheAction, Env,
    Extension, Fanout, Matrix, MemberEnv, OnFailure, Phase, PhaseExtension, PhaseName, Phases,
    Placement, Proxy, Report, ReportFormat, SandboxKind, SecretRef, Shell, Version,
};
use super::walk::{Item, Map, found};
use super::yaml::{self, Pos, Value, YamlError};

const TOP_KEYS: &[&str] = &[
    "version",
    "run-as",
    "env",
    "proxy",
    "batch",
    "phases",
    "reports",
    "artifacts",
    "cache",
    "peerbuild",
];
const ENV_KEYS: &[&str] = &[
    "shell",
    "variables",
    "parameter-store",
    "secrets-manager",
    "exported-variables",
    "git-credential-helper",
];
const PHASE_NAMES: &[&str] = &["install", "pre_build", "build", "post_build"];
const PHASE_KEYS: &[&str] = &[
    "run-as",
    "on-failure",
    "runtime-versions",
    "commands",
    "finally",
];
const ARTIFACT_KEYS: &[&str] = &[
    "files",
    "name",
    "discard-paths",
    "base-directory",
    "exclude-paths",
    "enable-symlinks",
    "s3-prefix",
    "secondary-artifacts",
];
const REPORT_KEYS: &[&str] = &["files", "base-directory", "discard-paths", "file-format"];
const CACHE_KEYS: &[&str] = &["paths", "key", "fallback-keys", "action"];
const BATCH_KINDS: &[&str] = &["build-list", "build-graph", "build-matrix", "build-fanout"];
const BATCH_KEYS: &[&str] = &[
    "fast-fail",
    "build-list",
    "build-graph",
    "build-matrix",
    "build-fanout",
];
const MEMBER_KEYS: &[&str] = &[
    "identifier",
    "buildspec",
    "ignore-failure",
    "env",
    "debug-session",
    "depend-on",
];
const MEMBER_ENV_KEYS: &[&str] = &[
    "variables",
    "image",
    "compute-type",
    "type",
    "privileged-mode",
    "fleet",
];
const EXTENSION_KEYS: &[&str] = &["sandbox", "image", "network", "phases"];
const PHASE_EXTENSION_KEYS: &[&str] = &["sandbox", "image", "network", "placement"];

/// CodeBuild's limit on `cache.fallback-keys`.
const MAX_FALLBACK_KEYS: usize = 5;
/// CodeBuild's limit on `RETRY-<count>`.
const MAX_RETRIES: u32 = 100;
/// CodeBuild's limit on `build-fanout.parallelism`.
const MAX_PARALLELISM: u32 = 100;

const REPORT_FORMATS: [ReportFormat; 10] = [
    ReportFormat::JunitXml,
    ReportFormat::CucumberJson,
    ReportFormat::NunitXml,
    ReportFormat::Nunit3Xml,
    ReportFormat::TestngXml,
    ReportFormat::VisualStudioTrx,
    ReportFormat::CloverXml,
    ReportFormat::CoberturaXml,
    ReportFormat::JacocoXml,
    ReportFormat::SimpleCov,
];

/// Parses and checks a buildspec. `file` is the name shown in errors (`buildspec.yml`).
///
/// # Errors
/// A [`ParseError`] for the first problem found: invalid YAML, an unknown key, a value of the
/// wrong kind, or a rule of the format broken (a reserved variable name, a dependency cycle, …).
pub fn parse(file: &str, text: &str) -> Result<Buildspec, ParseError> {
    buildspec(text).map_err(|error| error.located(file, text))
}

fn buildspec(text: &str) -> Result<Buildspec, ParseError> {
    let root = yaml::load(text).map_err(from_yaml)?;
    if matches!(root.value, Value::Null) {
        return Err(ParseError::at(
            Pos::START,
            "",
            "the file is empty; a buildspec needs at least `version` and `phases`",
        ));
    }
    let top = Item::root(&root).fields(TOP_KEYS)?;
    let version = version(&top.require("version", "write `version: 0.2` at the top")?)?;
    let batch = optional(&top, "batch", batch)?;
    let phases = top_phases(&top, batch.as_ref())?;
    Ok(Buildspec {
        version,
        run_as: optional(&top, "run-as", user)?,
        env: optional(&top, "env", env)?.unwrap_or_default(),
        proxy: optional(&top, "proxy", proxy)?.unwrap_or_default(),
        batch,
        phases,
        reports: optional(&top, "reports", reports)?.unwrap_or_default(),
        artifacts: optional(&top, "artifacts", artifacts)?,
        cache: optional(&top, "cache", cache)?,
        peerbuild: optional(&top, "peerbuild", extension)?.unwrap_or_default(),
    })
}

fn from_yaml(error: YamlError) -> ParseError {
    ParseError::at(error.pos, &error.path, error.message).with_optional_hint(error.hint)
}

/// The value of `name` read by `read`, or `None` when the key is not written.
fn optional<'a, T>(
    map: &Map<'a>,
    name: &str,
    read: impl FnOnce(&Item<'a>) -> Result<T, ParseError>,
) -> Result<Option<T>, ParseError> {
    map.get(name).map(|item| read(&item)).transpose()
}

fn flag(map: &Map<'_>, name: &str) -> Result<bool, ParseError> {
    Ok(optional(map, name, Item::boolean)?.unwrap_or(false))
}

fn commands(map: &Map<'_>, name: &str) -> Result<Vec<String>, ParseError> {
    Ok(optional(map, name, |item| item.strings("command"))?.unwrap_or_default())
}

fn word(map: &Map<'_>, name: &str, what: &str) -> Result<Option<String>, ParseError> {
    optional(map, name, |item| item.non_empty(what))
}

fn version(item: &Item<'_>) -> Result<Version, ParseError> {
    match item.text() {
        Ok("0.1") => Ok(Version::V0_1),
        Ok("0.2") => Ok(Version::V0_2),
        _ => Err(item.fail(format!(
            "unsupported version {}; expected 0.1 or 0.2",
            found(item.node)
        ))),
    }
}

/// `phases`, required unless a `batch` section builds members from other buildspecs.
fn top_phases(top: &Map<'_>, batch: Option<&Batch>) -> Result<Phases, ParseError> {
    let Some(item) = top.get("phases") else {
        if batch.is_some() {
            return Ok(Phases::default());
        }
        return Err(ParseError::at(
            top.at(),
            "phases",
            "required key is missing; a buildspec needs at least one of install, pre_build, \
             build, post_build unless it has a `batch` section",
        ));
    };
    let phases = phases(&item)?;
    if batch.is_none()
        && PhaseName::ALL
            .iter()
            .all(|name| phases.get(*name).is_none())
    {
        return Err(item.fail_at_key(format!(
            "no phase given; expected at least one of {}",
            PHASE_NAMES.join(", ")
        )));
    }
    Ok(phases)
}

/// A Linux user name for `run-as`.
fn user(item: &Item<'_>) -> Result<String, ParseError> {
    let name = item.non_empty("a user name")?;
    if name
        .chars()
        .any(|c| c.is_whitespace() || c == ':' || c == '/')
    {
        return Err(item.fail(format!("`{name}` is not a user name")));
    }
    Ok(name)
}

fn env(item: &Item<'_>) -> Result<Env, ParseError> {
    let map = item.fields(ENV_KEYS)?;
    let variables = optional(&map, "variables", variables)?.unwrap_or_default();
    let parameter_store = optional(&map, "parameter-store", parameter_store)?.unwrap_or_default();
    let secrets_manager = optional(&map, "secrets-manager", secrets_manager)?.unwrap_or_default();
    let sources = variable_sources(&map)?;
    Ok(Env {
        shell: optional(&map, "shell", shell)?.unwrap_or_default(),
        variables,
        parameter_store,
        secrets_manager,
        exported_variables: optional(&map, "exported-variables", |item| {
            exported_variables(item, &sources)
        })?
        .unwrap_or_default(),
        git_credential_helper: flag(&map, "git-credential-helper")?,
    })
}

fn shell(item: &Item<'_>) -> Result<Shell, ParseError> {
    match item.text()? {
        "bash" => Ok(Shell::Bash),
        "/bin/sh" | "sh" => Ok(Shell::Sh),
        "/bin/bash" => Err(item
            .fail("`/bin/bash` is not allowed; expected bash or /bin/sh")
            .with_hint("CodeBuild names bash without its path: write `shell: bash`")),
        other => Err(item.not_one_of(other, &["bash", "/bin/sh"])),
    }
}

/// `env.variables` (and a batch member's): literal values, kept as written.
fn variables(item: &Item<'_>) -> Result<Vec<(String, String)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, value)| {
            variable_name(&key.text, &value)?;
            Ok((key.text.clone(), variable_value(&value)?))
        })
        .collect()
}

fn variable_value(item: &Item<'_>) -> Result<String, ParseError> {
    match &item.node.value {
        Value::Scalar(text, _) => Ok(text.clone()),
        Value::Null => Err(item
            .fail("expected a value, found nothing")
            .with_hint("write `\"\"` for an empty value")),
        _ => Err(item.fail(format!(
            "expected a single value (a string, number or boolean), found {}",
            found(item.node)
        ))),
    }
}

/// Refuses names a shell cannot hold and the names CodeBuild reserves for itself.
fn variable_name(name: &str, item: &Item<'_>) -> Result<(), ParseError> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        let error = item.fail_at_key(format!(
            "`{name}` is not a valid variable name; a name is letters, digits and `_`, and does \
             not start with a digit"
        ));
        return Err(if name.contains('-') {
            error.with_hint(format!("write `{}`", name.replace('-', "_")))
        } else {
            error
        });
    }
    if name.starts_with("CODEBUILD_") {
        return Err(item.fail_at_key(format!(
            "`{name}` is reserved: names starting with `CODEBUILD_` are set by the build itself"
        )));
    }
    Ok(())
}

fn parameter_store(item: &Item<'_>) -> Result<Vec<(String, String)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, value)| {
            variable_name(&key.text, &value)?;
            Ok((key.text.clone(), value.non_empty("a parameter name")?))
        })
        .collect()
}

fn secrets_manager(item: &Item<'_>) -> Result<Vec<(String, SecretRef)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, value)| {
            variable_name(&key.text, &value)?;
            Ok((key.text.clone(), secret_ref(&value)?))
        })
        .collect()
}

/// `secret-id:json-key:version-stage:version-id`. A secret ARN
/// (`arn:aws:secretsmanager:region:account:secret:name`) keeps its seven parts as the id.
fn secret_ref(item: &Item<'_>) -> Result<SecretRef, ParseError> {
    const FORM: &str = "secret-id:json-key:version-stage:version-id";
    let text = item.non_empty(&format!("a secret reference ({FORM})"))?;
    let parts: Vec<&str> = text.split(':').collect();
    let id_parts = if text.starts_with("arn:") { 7 } else { 1 };
    if parts.len() < id_parts {
        return Err(item.fail(
            "a secret ARN has 7 `:`-separated parts \
             (arn:aws:secretsmanager:region:account:secret:name)",
        ));
    }
    let (id, rest) = parts.split_at(id_parts);
    if rest.len() > 3 {
        return Err(item.fail(format!("too many `:`-separated parts; expected {FORM}")));
    }
    let secret_id = id.join(":");
    if secret_id.is_empty() {
        return Err(item.fail(format!("the secret id is empty; expected {FORM}")));
    }
    let part = |index: usize| {
        rest.get(index)
            .filter(|part| !part.is_empty())
            .map(|part| (*part).to_owned())
    };
    Ok(SecretRef {
        secret_id,
        json_key: part(0),
        version_stage: part(1),
        version_id: part(2),
    })
}

/// Where each env name comes from, refusing a name that two sources set: which value would win
/// is not documented, so a buildspec must say it once.
fn variable_sources<'a>(map: &Map<'a>) -> Result<HashMap<&'a str, &'static str>, ParseError> {
    const SOURCES: [&str; 3] = ["variables", "parameter-store", "secrets-manager"];
    let mut sources: HashMap<&'a str, (&'static str, usize)> = HashMap::new();
    for source in SOURCES {
        let Some(section) = map.get(source) else {
            continue;
        };
        for (key, value) in section.entries()?.items() {
            if let Some((first, line)) = sources.get(key.text.as_str()) {
                return Err(value.fail_at_key(format!(
                    "`{}` is also set in env.{first} (line {line}); a name may appear in only \
                     one of variables, parameter-store and secrets-manager",
                    key.text
                )));
            }
            sources.insert(&key.text, (source, key.pos.line));
        }
    }
    Ok(sources
        .into_iter()
        .map(|(name, (source, _))| (name, source))
        .collect())
}

fn exported_variables(
    item: &Item<'_>,
    sources: &HashMap<&str, &str>,
) -> Result<Vec<String>, ParseError> {
    let mut lines: HashMap<&str, usize> = HashMap::new();
    let mut names = vec![];
    for entry in item.list("a list of variable names")? {
        let name = entry.text()?;
        variable_name(name, &entry)?;
        if let Some(source @ ("parameter-store" | "secrets-manager")) = sources.get(name).copied() {
            return Err(entry.fail(format!(
                "`{name}` is a secret (env.{source}); secrets cannot be exported"
            )));
        }
        if name.starts_with("AWS_") {
            return Err(entry.fail(format!(
                "`{name}` cannot be exported: names starting with `AWS_` are reserved"
            )));
        }
        if let Some(line) = lines.insert(name, entry.at.line) {
            return Err(entry.fail(format!(
                "`{name}` is listed twice (lines {line} and {})",
                entry.at.line
            )));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

fn proxy(item: &Item<'_>) -> Result<Proxy, ParseError> {
    let map = item.fields(&["upload-artifacts", "logs"])?;
    Ok(Proxy {
        upload_artifacts: flag(&map, "upload-artifacts")?,
        logs: flag(&map, "logs")?,
    })
}

fn phases(item: &Item<'_>) -> Result<Phases, ParseError> {
    let map = item.fields(PHASE_NAMES)?;
    let read = |name: PhaseName| optional(&map, name.key(), |item| phase(item, name));
    Ok(Phases {
        install: read(PhaseName::Install)?,
        pre_build: read(PhaseName::PreBuild)?,
        build: read(PhaseName::Build)?,
        post_build: read(PhaseName::PostBuild)?,
    })
}

fn phase(item: &Item<'_>, name: PhaseName) -> Result<Phase, ParseError> {
    let map = item.fields(PHASE_KEYS)?;
    let runtime_versions = match map.get("runtime-versions") {
        Some(versions) if name != PhaseName::Install => {
            return Err(versions
                .fail_at_key("`runtime-versions` is allowed only in the install phase")
                .with_hint("move it under `phases: install:`"));
        }
        Some(versions) => runtime_versions(&versions)?,
        None => vec![],
    };
    Ok(Phase {
        run_as: optional(&map, "run-as", user)?,
        on_failure: optional(&map, "on-failure", on_failure)?.unwrap_or_default(),
        runtime_versions,
        commands: commands(&map, "commands")?,
        finally: commands(&map, "finally")?,
    })
}

/// Runtime and version, both kept as written (`python: 3.10` stays `3.10`).
fn runtime_versions(item: &Item<'_>) -> Result<Vec<(String, String)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, value)| {
            if key.text.trim().is_empty() {
                return Err(value.fail_at_key("expected a runtime name, found an empty key"));
            }
            Ok((
                key.text.clone(),
                value.non_empty("a version (`3.11`, `18.x`, `latest` or `$VARIABLE`)")?,
            ))
        })
        .collect()
}

fn on_failure(item: &Item<'_>) -> Result<OnFailure, ParseError> {
    let text = item.text()?;
    match text {
        "ABORT" => return Ok(OnFailure::Abort),
        "CONTINUE" => return Ok(OnFailure::Continue),
        "RETRY" => {
            return Ok(OnFailure::Retry {
                count: 3,
                pattern: None,
            });
        }
        _ => {}
    }
    if let Some(rest) = text.strip_prefix("RETRY-") {
        return retry(item, rest);
    }
    let forms = [
        "ABORT",
        "CONTINUE",
        "RETRY",
        "RETRY-<count>",
        "RETRY-<regex>",
        "RETRY-<count>-<regex>",
    ];
    let error = item.not_one_of(text, &forms);
    Err(match capitalized_on_failure(text) {
        Some(fixed) => error.with_hint(format!("the word is written in capitals: `{fixed}`")),
        None => error,
    })
}

/// `abort` or `retry-5` with the keyword in capitals, which is what the user meant.
fn capitalized_on_failure(text: &str) -> Option<String> {
    let (word, rest) = text
        .split_once('-')
        .map_or((text, None), |(w, r)| (w, Some(r)));
    let upper = word.to_ascii_uppercase();
    if !matches!(upper.as_str(), "ABORT" | "CONTINUE" | "RETRY") {
        return None;
    }
    Some(match rest {
        Some(rest) => format!("{upper}-{rest}"),
        None => upper,
    })
}

/// `RETRY-<count>`, `RETRY-<regex>` or `RETRY-<count>-<regex>`; `rest` follows `RETRY-`.
fn retry(item: &Item<'_>, rest: &str) -> Result<OnFailure, ParseError> {
    let all_digits = |text: &str| !text.is_empty() && text.chars().all(|c| c.is_ascii_digit());
    let (count, pattern) = match rest.split_once('-') {
        _ if all_digits(rest) => (Some(rest), None),
        Some((count, pattern)) if all_digits(count) => (Some(count), Some(pattern)),
        _ => (None, Some(rest)),
    };
    let count = match count {
        Some(count) => retry_count(item, count)?,
        None => 3,
    };
    if let Some(pattern) = pattern {
        check_pattern(item, pattern)?;
    }
    Ok(OnFailure::Retry {
        count,
        pattern: pattern.map(str::to_owned),
    })
}

fn retry_count(item: &Item<'_>, digits: &str) -> Result<u32, ParseError> {
    match digits.parse::<u32>() {
        Ok(count) if count <= MAX_RETRIES => Ok(count),
        _ => Err(item.fail(format!(
            "retry count {digits} is over the limit of {MAX_RETRIES}"
        ))),
    }
}

/// A retry pattern must compile now, not when the phase first fails half-way through a build.
fn check_pattern(item: &Item<'_>, pattern: &str) -> Result<(), ParseError> {
    if pattern.is_empty() {
        return Err(item.fail("the retry pattern after `RETRY-` is empty"));
    }
    regex::Regex::new(pattern).map(drop).map_err(|error| {
        // The regex crate's message spans several lines with a caret; its last line says why.
        let full = error.to_string();
        let reason = full
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("");
        item.fail(format!(
            "the retry pattern `{pattern}` is not a valid regular expression: {}",
            reason.trim().trim_start_matches("error: ")
        ))
    })
}

fn artifacts(item: &Item<'_>) -> Result<Artifacts, ParseError> {
    let map = item.fields(ARTIFACT_KEYS)?;
    let secondary = optional(&map, "secondary-artifacts", secondary_artifacts)?;
    let primary_written = map
        .items()
        .any(|(key, _)| key.text != "secondary-artifacts");
    let primary = match secondary {
        Some(_) if !primary_written => None,
        _ => Some(artifact_set(&map)?),
    };
    Ok(Artifacts {
        primary,
        secondary: secondary.unwrap_or_default(),
    })
}

fn artifact_set(map: &Map<'_>) -> Result<ArtifactSet, ParseError> {
    let files = map.require("files", "an artifact needs globs such as `- '**/*'`")?;
    Ok(ArtifactSet {
        files: files.some_globs()?,
        name: word(map, "name", "an artifact name")?,
        discard_paths: flag(map, "discard-paths")?,
        base_directory: word(map, "base-directory", "a directory")?,
        exclude_paths: optional(map, "exclude-paths", Item::globs)?.unwrap_or_default(),
        enable_symlinks: flag(map, "enable-symlinks")?,
        s3_prefix: word(map, "s3-prefix", "a prefix")?,
    })
}

fn secondary_artifacts(item: &Item<'_>) -> Result<Vec<(String, ArtifactSet)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, block)| {
            let map = block.fields(ARTIFACT_KEYS)?;
            if let Some(nested) = map.get("secondary-artifacts") {
                return Err(nested.fail_at_key(
                    "secondary artifacts cannot be nested; list each one directly under \
                     `artifacts.secondary-artifacts`",
                ));
            }
            // The identifier names a folder of the output, so it must stay one plain name.
            if key.text.is_empty()
                || !key
                    .text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(block.fail_at_key(format!(
                    "`{}` is not a valid artifact identifier; use letters, digits and `_`",
                    key.text
                )));
            }
            Ok((key.text.clone(), artifact_set(&map)?))
        })
        .collect()
}

fn reports(item: &Item<'_>) -> Result<Vec<(String, Report)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, block)| Ok((key.text.clone(), report(&block)?)))
        .collect()
}

fn report(item: &Item<'_>) -> Result<Report, ParseError> {
    let map = item.fields(REPORT_KEYS)?;
    let files = map.require("files", "a report group needs globs for its report files")?;
    Ok(Report {
        files: files.some_globs()?,
        base_directory: word(&map, "base-directory", "a directory")?,
        discard_paths: flag(&map, "discard-paths")?,
        file_format: optional(&map, "file-format", report_format)?.unwrap_or_default(),
    })
}

/// A report format, in any case (`junitxml` is as clear as `JUNITXML`).
fn report_format(item: &Item<'_>) -> Result<ReportFormat, ParseError> {
    let text = item.text()?;
    REPORT_FORMATS
        .into_iter()
        .find(|format| format.key().eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let names = REPORT_FORMATS.map(ReportFormat::key);
            item.not_one_of(text, &names)
        })
}

fn cache(item: &Item<'_>) -> Result<Cache, ParseError> {
    let map = item.fields(CACHE_KEYS)?;
    let paths = map.require("paths", "a cache needs globs of the paths to keep")?;
    let action = [
        ("restore", CacheAction::Restore),
        ("save", CacheAction::Save),
    ];
    Ok(Cache {
        key: word(&map, "key", "a cache key")?,
        // `fallback-keys` without `key` is kept as written rather than refused: CodeBuild runs
        // such a buildspec and ignores the fallbacks, and so does the cache engine.
        fallback_keys: optional(&map, "fallback-keys", fallback_keys)?.unwrap_or_default(),
        action: optional(&map, "action", |item| item.choice(&action))?.unwrap_or_default(),
        paths: paths.some_globs()?,
    })
}

fn fallback_keys(item: &Item<'_>) -> Result<Vec<String>, ParseError> {
    let entries = item.list("a list of cache keys (strings)")?;
    if let Some(extra) = entries.get(MAX_FALLBACK_KEYS) {
        return Err(extra.fail(format!(
            "at most {MAX_FALLBACK_KEYS} fallback keys are allowed, found {}",
            entries.len()
        )));
    }
    item.strings("cache key")
}

fn batch(item: &Item<'_>) -> Result<Batch, ParseError> {
    let map = item.fields(BATCH_KEYS)?;
    let kinds: Vec<_> = map
        .items()
        .filter(|(key, _)| BATCH_KINDS.contains(&key.text.as_str()))
        .collect();
    let (key, kind_item) = match kinds.as_slice() {
        [] => {
            return Err(
                item.fail_at_key(format!("a batch needs one of {}", BATCH_KINDS.join(", ")))
            );
        }
        [(key, kind_item)] => (key, kind_item),
        [(first, _), (_, second), ..] => {
            return Err(second.fail_at_key(format!(
                "only one of {} may be used; `{}` is already given on line {}",
                BATCH_KINDS.join(", "),
                first.text,
                first.pos.line
            )));
        }
    };
    let kind = match key.text.as_str() {
        "build-list" => BatchKind::List(members(kind_item, Form::List)?),
        "build-graph" => BatchKind::Graph(members(kind_item, Form::Graph)?),
        "build-matrix" => BatchKind::Matrix(matrix(kind_item)?),
        _ => BatchKind::Fanout(fanout(kind_item)?),
    };
    Ok(Batch {
        fast_fail: flag(&map, "fast-fail")?,
        kind,
    })
}

/// Whether members may wait for each other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    List,
    Graph,
}

/// A member with the items its checks point at.
struct Placed<'a> {
    member: BatchMember,
    identifier: Item<'a>,
    depend_on: Vec<Item<'a>>,
}

fn members(item: &Item<'_>, form: Form) -> Result<Vec<BatchMember>, ParseError> {
    let placed = item
        .list("a list of batch members (mappings with an `identifier`)")?
        .iter()
        .map(|entry| member(entry, form))
        .collect::<Result<Vec<_>, _>>()?;
    if placed.is_empty() {
        return Err(item.fail_at_key("expected at least one batch member, found none"));
    }
    check_identifiers(&placed)?;
    if form == Form::Graph {
        check_dependencies(&placed)?;
    }
    Ok(placed.into_iter().map(|placed| placed.member).collect())
}

fn member<'a>(item: &Item<'a>, form: Form) -> Result<Placed<'a>, ParseError> {
    let map = item.fields(MEMBER_KEYS)?;
    let identifier = map.require("identifier", "each batch member needs an identifier")?;
    let depend_on = match map.get("depend-on") {
        Some(depend_on) if form == Form::List => {
            return Err(depend_on
                .fail_at_key("`depend-on` is allowed only in build-graph")
                .with_hint("use `build-graph` instead of `build-list` for members that wait"));
        }
        Some(depend_on) => depend_on.list("a list of member identifiers (strings)")?,
        None => vec![],
    };
    let member = BatchMember {
        identifier: member_identifier(&identifier)?,
        buildspec: word(&map, "buildspec", "a buildspec path")?,
        ignore_failure: flag(&map, "ignore-failure")?,
        env: optional(&map, "env", member_env)?.unwrap_or_default(),
        depend_on: depend_on
            .iter()
            .map(|entry| entry.text().map(str::to_owned))
            .collect::<Result<_, _>>()?,
        debug_session: flag(&map, "debug-session")?,
    };
    Ok(Placed {
        member,
        identifier,
        depend_on,
    })
}

fn member_identifier(item: &Item<'_>) -> Result<String, ParseError> {
    let text = item.non_empty("an identifier")?;
    if !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(item.fail(format!(
            "`{text}` is not a valid identifier; use letters, digits and `_`"
        )));
    }
    Ok(text)
}

fn member_env(item: &Item<'_>) -> Result<MemberEnv, ParseError> {
    let map = item.fields(MEMBER_ENV_KEYS)?;
    Ok(MemberEnv {
        variables: optional(&map, "variables", variables)?.unwrap_or_default(),
        image: word(&map, "image", "an image")?,
        compute_type: word(&map, "compute-type", "a compute type")?,
        r#type: word(&map, "type", "an environment type")?,
        privileged_mode: flag(&map, "privileged-mode")?,
        fleet: word(&map, "fleet", "a fleet")?,
    })
}

fn check_identifiers(placed: &[Placed<'_>]) -> Result<(), ParseError> {
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for entry in placed {
        let line = entry.identifier.at.line;
        if let Some(first) = lines.insert(&entry.member.identifier, line) {
            return Err(entry.identifier.fail(format!(
                "duplicate identifier `{}` (lines {first} and {line}); each member needs its own",
                entry.member.identifier
            )));
        }
    }
    Ok(())
}

/// Every `depend-on` names another member, and no member waits on itself through others.
fn check_dependencies(placed: &[Placed<'_>]) -> Result<(), ParseError> {
    let identifiers: Vec<&str> = placed
        .iter()
        .map(|p| p.member.identifier.as_str())
        .collect();
    for entry in placed {
        for (name, item) in entry.member.depend_on.iter().zip(&entry.depend_on) {
            if *name == entry.member.identifier {
                return Err(item.fail(format!("member `{name}` cannot depend on itself")));
            }
            if !identifiers.contains(&name.as_str()) {
                return Err(item
                    .fail(format!(
                        "unknown member `{name}`; expected one of {}",
                        identifiers.join(", ")
                    ))
                    .with_optional_hint(did_you_mean(name, &identifiers)));
            }
        }
    }
    match find_cycle(placed) {
        Some(cycle) => Err(cycle_error(placed, &cycle)),
        None => Ok(()),
    }
}

/// A dependency cycle as member indexes, each depending on the next and the last on the first.
fn find_cycle(placed: &[Placed<'_>]) -> Option<Vec<usize>> {
    let index: HashMap<&str, usize> = placed
        .iter()
        .enumerate()
        .map(|(i, p)| (p.member.identifier.as_str(), i))
        .collect();
    let depends: Vec<Vec<usize>> = placed
        .iter()
        .map(|p| {
            p.member
                .depend_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();
    let mut dependents = vec![vec![]; placed.len()];
    for (member, deps) in depends.iter().enumerate() {
        for &dependency in deps {
            dependents[dependency].push(member);
        }
    }
    // Kahn's algorithm: what it cannot order is in or behind a cycle.
    let mut waiting: Vec<usize> = depends.iter().map(Vec::len).collect();
    let mut ready: Vec<usize> = (0..placed.len()).filter(|&i| waiting[i] == 0).collect();
    while let Some(member) = ready.pop() {
        for &dependent in &dependents[member] {
            waiting[dependent] -= 1;
            if waiting[dependent] == 0 {
                ready.push(dependent);
            }
        }
    }
    // Every member left waits on another member left, so following those dependencies must come
    // back to a member already visited; the walk from there is the cycle.
    let mut current = (0..placed.len()).find(|&i| waiting[i] > 0)?;
    let mut visited: HashMap<usize, usize> = HashMap::new();
    let mut walk = vec![];
    loop {
        if let Some(&start) = visited.get(&current) {
            return Some(walk.split_off(start));
        }
        visited.insert(current, walk.len());
        walk.push(current);
        current = *depends[current].iter().find(|&&d| waiting[d] > 0)?;
    }
}

fn cycle_error(placed: &[Placed<'_>], cycle: &[usize]) -> ParseError {
    let names: Vec<&str> = cycle
        .iter()
        .chain(cycle.first())
        .map(|&i| placed[i].member.identifier.as_str())
        .collect();
    let first = &placed[cycle[0]];
    let next = names.get(1).copied().unwrap_or_default();
    let item = first
        .member
        .depend_on
        .iter()
        .position(|d| d == next)
        .and_then(|i| first.depend_on.get(i))
        .unwrap_or(&first.identifier);
    item.fail(format!(
        "dependency cycle: {} (each member waits for the next)",
        names.join(" -> ")
    ))
}

fn matrix(item: &Item<'_>) -> Result<Matrix, ParseError> {
    let map = item.fields(&["static", "dynamic"])?;
    let mut matrix = Matrix::default();
    if let Some(fixed) = map.get("static") {
        let fixed = fixed.fields(&["ignore-failure", "env"])?;
        matrix.static_ignore_failure = flag(&fixed, "ignore-failure")?;
        matrix.static_env = optional(&fixed, "env", member_env)?.unwrap_or_default();
    }
    if let Some(dynamic) = map.get("dynamic") {
        let dynamic = dynamic.fields(&["buildspec", "env"])?;
        let list = |name: &str, noun: &str| {
            Ok::<_, ParseError>(
                optional(&dynamic, name, |item| item.string_or_list(noun))?.unwrap_or_default(),
            )
        };
        matrix.buildspecs = list("buildspec", "buildspec path")?;
        if let Some(env) = dynamic.get("env") {
            let env = env.fields(&["image", "compute-type", "variables"])?;
            let list = |name: &str, noun: &str| {
                Ok::<_, ParseError>(
                    optional(&env, name, |item| item.string_or_list(noun))?.unwrap_or_default(),
                )
            };
            matrix.images = list("image", "image")?;
            matrix.compute_types = list("compute-type", "compute type")?;
            matrix.variables = optional(&env, "variables", matrix_variables)?.unwrap_or_default();
        }
    }
    Ok(matrix)
}

fn matrix_variables(item: &Item<'_>) -> Result<Vec<(String, Vec<String>)>, ParseError> {
    item.entries()?
        .items()
        .map(|(key, values)| {
            variable_name(&key.text, &values)?;
            Ok((key.text.clone(), values.string_or_list("value")?))
        })
        .collect()
}

fn fanout(item: &Item<'_>) -> Result<Fanout, ParseError> {
    let map = item.fields(&["parallelism", "ignore-failure"])?;
    let parallelism = map.require(
        "parallelism",
        "a fan-out needs the number of members to split into (1 to 100)",
    )?;
    let count = parallelism
        .text()
        .ok()
        .and_then(|text| text.parse::<u32>().ok())
        .filter(|count| (1..=MAX_PARALLELISM).contains(count))
        .ok_or_else(|| {
            parallelism.fail(format!(
                "expected a whole number from 1 to {MAX_PARALLELISM}, found {}",
                found(parallelism.node)
            ))
        })?;
    Ok(Fanout {
        parallelism: count,
        ignore_failure: flag(&map, "ignore-failure")?,
    })
}

fn extension(item: &Item<'_>) -> Result<Extension, ParseError> {
    let map = item.fields(EXTENSION_KEYS)?;
    Ok(Extension {
        sandbox: optional(&map, "sandbox", sandbox_kind)?,
        image: word(&map, "image", "an image")?,
        network: optional(&map, "network", Item::boolean)?,
        phases: optional(&map, "phases", phase_extensions)?.unwrap_or_default(),
    })
}

/// `peerbuild.phases`, in the order the phases run whatever the file's order.
fn phase_extensions(item: &Item<'_>) -> Result<Vec<(PhaseName, PhaseExtension)>, ParseError> {
    let map = item.fields(PHASE_NAMES)?;
    let mut phases = vec![];
    for name in PhaseName::ALL {
        if let Some(phase) = map.get(name.key()) {
            phases.push((name, phase_extension(&phase)?));
        }
    }
    Ok(phases)
}

fn phase_extension(item: &Item<'_>) -> Result<PhaseExtension, ParseError> {
    let map = item.fields(PHASE_EXTENSION_KEYS)?;
    let placement = [
        ("session", Placement::Session),
        ("separate", Placement::Separate),
    ];
    Ok(PhaseExtension {
        sandbox: optional(&map, "sandbox", sandbox_kind)?,
        image: word(&map, "image", "an image")?,
        network: optional(&map, "network", Item::boolean)?,
        placement: optional(&map, "placement", |item| item.choice(&placement))?.unwrap_or_default(),
    })
}

fn sandbox_kind(item: &Item<'_>) -> Result<SandboxKind, ParseError> {
    item.choice(&SandboxKind::ALL.map(|kind| (kind.key(), kind)))
}
