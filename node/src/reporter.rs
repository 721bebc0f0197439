//! Fans a build's events out to where they are shown and kept, masking secrets first: the
//! terminal (human or `--json`) and the build's `events.jsonl`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};

use crate::engine::mask::Masker;
use crate::events::{Envelope, Event, SCHEMA_VERSION};

/// Somewhere events go.
pub trait EventSink: Send {
    fn emit(&mut self, event: &Event);
    /// Called every tenth of a second while a build runs, for progress displays.
    fn tick(&mut self) {}
}

struct Inner {
    masker: Masker,
    secrets: Vec<String>,
    sinks: Vec<Box<dyn EventSink>>,
}

/// Shared by every part of a build (and every member of a batch).
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Mutex<Inner>>,
}

impl Reporter {
    pub fn new(sinks: Vec<Box<dyn EventSink>>) -> Self {
        Reporter {
            inner: Arc::new(Mutex::new(Inner {
                masker: Masker::default(),
                secrets: Vec::new(),
                sinks,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A sink that panicked cannot leave the list of sinks inconsistent; keep reporting.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds secret values to mask from now on.
    pub fn add_secrets(&self, values: impl IntoIterator<Item = String>) {
        let mut inner = self.lock();
        inner.secrets.extend(values);
        inner.masker = Masker::new(inner.secrets.iter().map(String::as_str));
    }

    pub fn masker(&self) -> Masker {
        self.lock().masker.clone()
    }

    pub fn mask(&self, text: &str) -> String {
        self.lock().masker.mask(text)
    }

    pub fn emit(&self, mut event: Event) {
        let mut inner = self.lock();
        if !inner.masker.is_empty() {
            let masker = inner.masker.clone();
            event.mask_with(&|s| masker.mask(s));
        }
        for sink in &mut inner.sinks {
            sink.emit(&event);
        }
    }

    pub fn tick(&self) {
        for sink in &mut self.lock().sinks {
            sink.tick();
        }
    }
}

/// Writes each event as a JSON line.
pub struct JsonLines<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> JsonLines<W> {
    pub fn new(out: W) -> Self {
        JsonLines { out }
    }
}

impl<W: Write + Send> EventSink for JsonLines<W> {
    fn emit(&mut self, event: &Event) {
        let envelope = Envelope {
            v: SCHEMA_VERSION,
            event: event.clone(),
        };
        if let Ok(line) = serde_json::to_string(&envelope) {
            // A closed terminal must not stop the build; the log file still gets the event.
            let _ = writeln!(self.out, "{line}");
            let _ = self.out.flush();
        }
    }
}

/// Opens a build's `events.jsonl` for appending (mode 0600).
pub fn event_log(path: &Path) -> Result<JsonLines<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the build log {}", path.display()))?;
    Ok(JsonLines::new(file))
}

/// Reads back a build's events; lines that do not parse (a build killed mid-write) are skipped.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the build log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Envelope>(line).ok())
        .map(|envelope| envelope.event)
        .collect())
}
