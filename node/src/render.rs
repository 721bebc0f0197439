//! The terminal view of a build: phase lines (name, status, duration), the commands and their
//! output live, a spinner for long quiet phases when the output is a terminal, and a summary.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::events::{BuildResult, Event, Level, Status};
use crate::reporter::EventSink;

/// How long a phase must be quiet before the spinner shows.
const QUIET_BEFORE_SPINNER: Duration = Duration::from_secs(1);

/// Renders events as text.
pub struct Human<W: Write + Send> {
    out: W,
    /// Phase headers not yet printed, by member: a phase that prints nothing shows one line.
    pending_headers: Vec<(Option<String>, String)>,
    /// Draw a spinner on standard error (only when it is a terminal).
    spinner: Option<Spinner>,
}

struct Spinner {
    phase: Option<(String, Instant)>,
    last_output: Instant,
    visible: bool,
    frame: usize,
}

impl<W: Write + Send> Human<W> {
    pub fn new(out: W, spinner: bool) -> Self {
        Human {
            out,
            pending_headers: Vec::new(),
            spinner: spinner.then(|| Spinner {
                phase: None,
                last_output: Instant::now(),
                visible: false,
                frame: 0,
            }),
        }
    }

    fn clear_spinner(&mut self) {
        if let Some(spinner) = &mut self.spinner {
            spinner.last_output = Instant::now();
            if spinner.visible {
                spinner.visible = false;
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        }
    }

    /// Prints the header of `member`'s current phase if it has not been printed yet.
    fn header(&mut self, member: &Option<String>) {
        if let Some(index) = self.pending_headers.iter().position(|(m, _)| m == member) {
            let (_, header) = self.pending_headers.swap_remove(index);
            self.line(&header);
        }
    }

    fn line(&mut self, text: &str) {
        self.clear_spinner();
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }
}

fn prefix(member: &Option<String>) -> String {
    member
        .as_ref()
        .map(|m| format!("[{m}] "))
        .unwrap_or_default()
}

/// `1.23s`, `45ms`, `2m03s`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.2}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

impl<W: Write + Send> EventSink for Human<W> {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::BuildStarted {
                build_id,
                build_number,
                source,
                source_version,
                sandbox,
                batch,
                ..
            } => {
                let version = source_version
                    .as_ref()
                    .map(|v| format!(" at {}", &v[..v.len().min(12)]))
                    .unwrap_or_default();
                let kind = if *batch { "batch build" } else { "build" };
                self.line(&format!(
                    "peerbuild: {kind} {build_id} (#{build_number}) of {source}{version}, sandbox {sandbox}"
                ));
            }
            Event::PhaseStarted { member, phase } => {
                if let Some(spinner) = &mut self.spinner {
                    spinner.phase = Some((format!("{}{phase}", prefix(member)), Instant::now()));
                }
                self.pending_headers.retain(|(m, _)| m != member);
                self.pending_headers
                    .push((member.clone(), format!("{}── {phase}", prefix(member))));
            }
            Event::Command {
                member, command, ..
            } => {
                let mut lines = command.lines();
                let first = lines.next().unwrap_or_default();
                let more = if lines.next().is_some() { " …" } else { "" };
                self.header(member);
                self.line(&format!("{}$ {first}{more}", prefix(member)));
            }
            Event::Log { member, line, .. } => {
                self.header(member);
                self.line(&format!("{}{line}", prefix(member)))
            }
            Event::Note {
                member,
                level,
                message,
            } => {
                let tag = match level {
                    Level::Info => "note",
                    Level::Warning => "warning",
                };
                self.header(member);
                self.line(&format!("{}peerbuild {tag}: {message}", prefix(member)));
            }
            Event::PhaseFinished {
                member,
                phase,
                status,
                duration_ms,
                message,
            } => {
                if let Some(spinner) = &mut self.spinner {
                    spinner.phase = None;
                }
                self.pending_headers.retain(|(m, _)| m != member);
                let why = message
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                self.line(&format!(
                    "{}── {phase} {} in {}{why}",
                    prefix(member),
                    status.name(),
                    duration(*duration_ms)
                ));
            }
            Event::MemberFinished { result } => {
                let text = member_line(result);
                self.line(&text);
            }
            Event::BuildFinished { result } => {
                let text = summary(result);
                self.line(&text);
            }
        }
    }

    fn tick(&mut self) {
        let Some(spinner) = &mut self.spinner else {
            return;
        };
        let Some((phase, started)) = &spinner.phase else {
            return;
        };
        if spinner.last_output.elapsed() < QUIET_BEFORE_SPINNER {
            return;
        }
        const FRAMES: [&str; 4] = ["|", "/", "-", "\\"];
        spinner.frame = (spinner.frame + 1) % FRAMES.len();
        spinner.visible = true;
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[2K{} {phase} running for {}s",
            FRAMES[spinner.frame],
            started.elapsed().as_secs()
        );
        let _ = std::io::stderr().flush();
    }
}

fn member_line(result: &BuildResult) -> String {
    let member = result.member.as_deref().unwrap_or("?");
    let why = result
        .message
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    format!(
        "[{member}] member {} in {}{why}",
        result.status.name(),
        duration(result.duration_ms)
    )
}

/// The summary printed at the end of a build.
pub fn summary(result: &BuildResult) -> String {
    let mut out = Vec::new();
    let why = result
        .message
        .as_ref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    out.push(format!(
        "\nBuild {} {} in {}{why}",
        result.build_id,
        result.status.name(),
        duration(result.duration_ms)
    ));
    // A build the pool placed names the peer that ran it (a local one is `local (HOST)`).
    if !result.peer.is_empty() && !result.peer.starts_with("local (") {
        out.push(format!("  peer:      {}", result.peer));
    }
    if !result.phases.is_empty() {
        let phases: Vec<String> = result
            .phases
            .iter()
            .map(|p| {
                let mark = if p.status == Status::Succeeded {
                    String::new()
                } else {
                    format!(" {}", p.status.name())
                };
                format!("{} {}{mark}", p.phase, duration(p.duration_ms))
            })
            .collect();
        out.push(format!("  phases:    {}", phases.join(", ")));
    }
    for member in &result.members {
        let why = member
            .message
            .as_ref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        out.push(format!(
            "  member:    {:<20} {:<10} {}{why}",
            member.member.as_deref().unwrap_or("?"),
            member.status.name(),
            duration(member.duration_ms)
        ));
    }
    summary_details(result, &mut out);
    for member in &result.members {
        summary_details(member, &mut out);
    }
    out.push(format!("  logs:      peerbuild logs {}", result.build_id));
    out.join("\n")
}

fn summary_details(result: &BuildResult, out: &mut Vec<String>) {
    let who = result
        .member
        .as_ref()
        .map(|m| format!("[{m}] "))
        .unwrap_or_default();
    for artifact in &result.artifacts {
        let name = artifact
            .name
            .as_ref()
            .map(|n| format!(" `{n}`"))
            .unwrap_or_default();
        let place = match &artifact.location {
            Some(location) => format!("in {location}"),
            None => format!(
                "stored; export with: peerbuild cache export {} OUT_DIR",
                artifact.digest
            ),
        };
        out.push(format!(
            "  artifacts: {who}{}{name}: {} files, {} bytes, {place}",
            artifact.identifier, artifact.files, artifact.bytes
        ));
    }
    for report in &result.reports {
        let counts = match &report.counts {
            Some(c) => format!(
                "{} passed, {} failed, {} skipped{}",
                c.passed,
                c.failed,
                c.skipped,
                if c.errored > 0 {
                    format!(", {} errored", c.errored)
                } else {
                    String::new()
                }
            ),
            None => format!("{} files recorded", report.files.len()),
        };
        out.push(format!(
            "  report:    {who}{} ({}): {counts}",
            report.name, report.format
        ));
        for problem in &report.problems {
            out.push(format!("             {problem}"));
        }
    }
    for variable in &result.exported_variables {
        out.push(format!(
            "  exported:  {who}{}={}",
            variable.name, variable.value
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(45), "45ms");
        assert_eq!(duration(1234), "1.23s");
        assert_eq!(duration(123_000), "2m03s");
    }
}
