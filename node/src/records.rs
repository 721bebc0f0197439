//! Past and running builds as the data directory keeps them: `peerbuild builds`, `peerbuild logs`
//! and `peerbuild cancel`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::data_dir::DataDir;
use crate::events::{Envelope, Event, Status};
use crate::reporter::{EventSink, JsonLines, read_events};

/// One line of `peerbuild builds`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub build_id: String,
    pub build_number: u64,
    pub status: Status,
    pub start_time_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub source: String,
}

/// Reads what the data directory holds about one build (a pool build's record starts with the
/// node's notes on where it runs, then the worker's `build_started`).
fn summarize(dir: &Path) -> Option<Summary> {
    let events = read_events(&dir.join("events.jsonl")).ok()?;
    let Some(Event::BuildStarted {
        build_id,
        build_number,
        source,
        start_time_ms,
        ..
    }) = events
        .iter()
        .find(|e| matches!(e, Event::BuildStarted { .. }))
        .cloned()
    else {
        return None;
    };
    let finished = std::fs::read(dir.join("result.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Envelope>(&bytes).ok())
        .and_then(|envelope| match envelope.event {
            Event::BuildFinished { result } => Some(result),
            _ => None,
        });
    let (status, duration_ms) = match finished {
        Some(result) => (result.status, Some(result.duration_ms)),
        None if running(dir) => (Status::InProgress, None),
        // No result and nobody running it: peerbuild itself was killed mid-build.
        None => (Status::Fault, None),
    };
    Some(Summary {
        build_id,
        build_number,
        status,
        start_time_ms,
        duration_ms,
        source,
    })
}

/// Whether the process that runs the build in `dir` is alive.
fn running(dir: &Path) -> bool {
    running_pid(dir).is_some()
}

fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // The pid is alive and is a peerbuild process (pids are reused).
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    name.starts_with("peerbuild").then_some(pid)
}

fn build_dirs(data: &DataDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data.builds()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// `peerbuild builds`.
pub fn list(data_dir: Option<&Path>, json: bool) -> Result<u8> {
    let data = DataDir::open(data_dir)?;
    let mut builds: Vec<Summary> = build_dirs(&data)
        .iter()
        .filter_map(|d| summarize(d))
        .collect();
    builds.sort_by_key(|b| std::cmp::Reverse(b.start_time_ms));
    if json {
        for build in &builds {
            println!("{}", serde_json::to_string(build)?);
        }
        return Ok(0);
    }
    if builds.is_empty() {
        println!("no builds yet; run one with `peerbuild run`");
        return Ok(0);
    }
    println!(
        "{:<50} {:>5} {:<11} {:>9}  SOURCE",
        "BUILD", "#", "STATUS", "DURATION"
    );
    for build in &builds {
        let duration = build
            .duration_ms
            .map(crate::render::duration)
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<50} {:>5} {:<11} {:>9}  {}",
            build.build_id,
            build.build_number,
            build.status.name(),
            duration,
            build.source
        );
    }
    Ok(0)
}

/// Finds a build by its id or a unique prefix of it (or of the part after `project:`).
fn find(data: &DataDir, wanted: &str) -> Result<PathBuf> {
    let exact = data.build(wanted);
    if exact.join("events.jsonl").exists() {
        return Ok(exact);
    }
    let wanted_dir = wanted.replace('/', "+");
    let matches: Vec<PathBuf> = build_dirs(data)
        .into_iter()
        .filter(|dir| {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let uuid = name.split_once(':').map(|(_, u)| u).unwrap_or_default();
            name.starts_with(&wanted_dir) || uuid.starts_with(&wanted_dir)
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no build `{wanted}` in {}; `peerbuild builds` lists them",
            data.root().display()
        ),
        many => bail!(
            "`{wanted}` matches {} builds; give more of the id (`peerbuild builds` lists them)",
            many.len()
        ),
    }
}

/// `peerbuild logs BUILD_ID`.
pub fn logs(data_dir: Option<&Path>, build_id: &str, json: bool) -> Result<u8> {
    let data = DataDir::open(data_dir)?;
    let dir = find(&data, build_id)?;
    let events = read_events(&dir.join("events.jsonl"))?;
    let mut sink: Box<dyn EventSink> = if json {
        Box::new(JsonLines::new(std::io::stdout()))
    } else {
        Box::new(crate::render::Human::new(std::io::stdout(), false))
    };
    for event in &events {
        sink.emit(event);
    }
    if !events
        .iter()
        .any(|e| matches!(e, Event::BuildFinished { .. }))
        && !json
    {
        let state = if running(&dir) {
            "still running"
        } else {
            "ended without a result (peerbuild was killed)"
        };
        println!("\n(the build is {state})");
    }
    Ok(0)
}

/// `peerbuild cancel BUILD_ID`: asks the process running the build to stop it.
pub fn cancel(data_dir: Option<&Path>, build_id: &str) -> Result<u8> {
    let data = DataDir::open(data_dir)?;
    let dir = find(&data, build_id)?;
    let Some(pid) = running_pid(&dir) else {
        bail!("the build {build_id} is not running");
    };
    // SAFETY: kill only sends a signal.
    if unsafe { libc::kill(pid, libc::SIGTERM) } < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot signal the build's process");
    }
    println!("asked the build to stop; it ends STOPPED once its processes are killed");
    Ok(0)
}
