//! A session with the build's shell, spoken over three pipes: requests on the shell's standard
//! input, output (standard output and standard error together) on one pipe, and replies on
//! descriptor 3 (see `driver.sh`). The pipes are anonymous for `host` and `namespace` and named
//! (FIFOs in a folder bound into the container) for `docker`; what started the shell and how it
//! is stopped is a [`ShellProcess`].

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::pin::Pin;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::Child;

use crate::{BoxFuture, Captured, CommandOutcome, OutputSink, SandboxError, Session, ShellMode};

/// How long the end of a session waits for the helper to have killed everything.
const TERMINATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most output taken from the pipe after a command's reply, before the reply is returned.
const DRAIN_LIMIT_BYTES: usize = 1 << 20;

/// The most captured output kept; the rest is read and dropped.
pub const CAPTURE_LIMIT_BYTES: usize = 1 << 20;

/// What runs the shell: it reports how the shell ended and kills what the session started.
pub(crate) trait ShellProcess: Send {
    /// The shell has closed its reply pipe, so it has exited: makes sure every process of the
    /// session is gone (so that the output pipe closes) and returns the shell's exit status.
    fn exited(&mut self) -> BoxFuture<'_, Result<i32, SandboxError>>;
    /// Kills every process of the session and waits until they are gone.
    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>>;
    /// The session was dropped while running: starts killing it without waiting.
    fn abandon(&mut self);
    /// How many of the session's processes the kernel killed for want of memory so far, where
    /// the backend can tell.
    fn oom_kills(&self) -> Option<u64> {
        None
    }
}

/// Where requests are written.
pub(crate) type Requests = Pin<Box<dyn AsyncWrite + Send>>;

/// A running shell and the pipes to it.
pub struct ShellSession {
    process: Box<dyn ShellProcess>,
    requests: Option<Requests>,
    output: pipe::Receiver,
    output_open: bool,
    replies: pipe::Receiver,
    mode: ShellMode,
    /// Set once the shell has exited: its status.
    ended: Option<i32>,
}

/// What a request expects back on the reply pipe.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reply {
    Status,
    CapturedOutput,
}

/// A parsed reply.
enum Answer {
    Status(i32),
    Captured(Captured),
    ShellExited(i32),
}

impl ShellSession {
    /// Wraps a helper that was started with its standard input piped, its output on `output` and
    /// the reply pipe's write end on descriptor 3.
    pub(crate) fn new(
        mut helper: Child,
        output: OwnedFd,
        replies: OwnedFd,
        mode: ShellMode,
    ) -> Result<Self, SandboxError> {
        let requests = helper.stdin.take().map(|stdin| Box::pin(stdin) as Requests);
        Ok(ShellSession {
            process: Box::new(HelperProcess {
                helper,
                oom_events: std::sync::OnceLock::new(),
            }),
            requests,
            output: pipe::Receiver::from_owned_fd(output).map_err(SandboxError::Io)?,
            output_open: true,
            replies: pipe::Receiver::from_owned_fd(replies).map_err(SandboxError::Io)?,
            mode,
            ended: None,
        })
    }

    /// Wraps a shell started some other way, whose three pipes are already open.
    pub(crate) fn with_process(
        process: Box<dyn ShellProcess>,
        requests: Requests,
        output: pipe::Receiver,
        replies: pipe::Receiver,
        mode: ShellMode,
    ) -> Self {
        ShellSession {
            process,
            requests: Some(requests),
            output,
            output_open: true,
            replies,
            mode,
            ended: None,
        }
    }

    async fn exchange(
        &mut self,
        kind: &str,
        command: &str,
        sink: &mut dyn OutputSink,
        reply: Reply,
    ) -> Result<Answer, SandboxError> {
        if self.ended.is_some() {
            return Err(SandboxError::Ended);
        }
        let request = encode_request(kind, command);
        let sent = match self.requests.as_mut() {
            Some(requests) => requests.write_all(request.as_bytes()).await,
            None => Err(ErrorKind::BrokenPipe.into()),
        };
        if let Err(err) = sent
            && err.kind() != ErrorKind::BrokenPipe
        {
            return Err(SandboxError::Io(err));
        }
        // The shell is already gone; its status comes from the helper below.
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut out = vec![0u8; 64 * 1024];
        loop {
            if let Some(answer) = parse_reply(&received, reply)? {
                self.drain_output(sink)?;
                return Ok(answer);
            }
            tokio::select! {
                biased;
                read = self.replies.read(&mut chunk) => {
                    let n = read.map_err(SandboxError::Io)?;
                    if n == 0 {
                        return self.shell_exited(sink).await;
                    }
                    append_bounded(&mut received, &chunk[..n], reply);
                }
                read = self.output.read(&mut out), if self.output_open => {
                    match read.map_err(SandboxError::Io)? {
                        0 => self.output_open = false,
                        n => sink.write(&out[..n]),
                    }
                }
            }
        }
    }

    /// Forwards output that is already in the pipe. Everything a command wrote before the shell
    /// replied is in the pipe by then, so this keeps a command's output ahead of its status.
    ///
    /// At most [`DRAIN_LIMIT_BYTES`] are taken: a background process that writes without pause
    /// (`yes &`) keeps the pipe full, and an unbounded drain would never yield, so neither the
    /// timeout nor Ctrl-C could act. What is left is read with the next command.
    fn drain_output(&mut self, sink: &mut dyn OutputSink) -> Result<(), SandboxError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut drained = 0;
        while self.output_open && drained < DRAIN_LIMIT_BYTES {
            match self.output.try_read(&mut buf) {
                Ok(0) => self.output_open = false,
                Ok(n) => {
                    drained += n;
                    sink.write(&buf[..n]);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) => return Err(SandboxError::Io(err)),
            }
        }
        Ok(())
    }

    /// The reply pipe closed: the shell exited. The process side then kills what is left and
    /// reports the shell's status; the rest of the output is read until its pipe closes.
    async fn shell_exited(&mut self, sink: &mut dyn OutputSink) -> Result<Answer, SandboxError> {
        self.requests = None;
        let code = self.process.exited().await?;
        self.ended = Some(code);
        let mut buf = vec![0u8; 64 * 1024];
        while self.output_open {
            match self.output.read(&mut buf).await.map_err(SandboxError::Io)? {
                0 => self.output_open = false,
                n => sink.write(&buf[..n]),
            }
        }
        Ok(Answer::ShellExited(code))
    }
}

/// A shell started by the helper process (`host` and `namespace`).
struct HelperProcess {
    helper: Child,
    /// Where the session's out-of-memory kills are counted, once the helper made its cgroup.
    oom_events: std::sync::OnceLock<std::path::PathBuf>,
}

impl ShellProcess for HelperProcess {
    fn exited(&mut self) -> BoxFuture<'_, Result<i32, SandboxError>> {
        // The helper reaps the shell, kills what is left, and exits with the shell's status.
        Box::pin(async move {
            let status = self.helper.wait().await.map_err(SandboxError::Io)?;
            Ok(exit_code(status))
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            if self.helper.id().is_none() {
                return Ok(());
            }
            signal_helper(&self.helper, libc::SIGTERM);
            // The helper kills the session's processes and exits at once, unless one cannot be
            // killed (started through a set-user-id program): then give up waiting rather than
            // hang the build's end, and say so.
            match tokio::time::timeout(TERMINATE_WAIT, self.helper.wait()).await {
                Ok(status) => status.map(drop).map_err(SandboxError::Io),
                Err(_) => {
                    signal_helper(&self.helper, libc::SIGKILL);
                    let _ = self.helper.wait().await;
                    Err(SandboxError::Unkillable {
                        seconds: TERMINATE_WAIT.as_secs(),
                    })
                }
            }
        })
    }

    /// The helper kills everything on SIGTERM, whether or not anyone waits for it.
    fn abandon(&mut self) {
        signal_helper(&self.helper, libc::SIGTERM);
    }

    fn oom_kills(&self) -> Option<u64> {
        let file = match self.oom_events.get() {
            Some(file) => file,
            None => {
                let found = crate::cgroups::oom_events_file(self.helper.id()?)?;
                self.oom_events.get_or_init(|| found)
            }
        };
        crate::cgroups::oom_kills(file)
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}

/// "KIND N\n" followed by the N lines of the command.
fn encode_request(kind: &str, command: &str) -> String {
    let body = command.strip_suffix('\n').unwrap_or(command);
    let lines = body.split('\n').count();
    format!("{kind} {lines}\n{body}\n")
}

fn append_bounded(received: &mut Vec<u8>, bytes: &[u8], reply: Reply) {
    received.extend_from_slice(bytes);
    // Captured output past the limit is dropped, but the NUL separator and the status after it
    // must still be found, so keep the tail.
    if reply == Reply::CapturedOutput
        && received.len() > CAPTURE_LIMIT_BYTES
        && !received.contains(&0)
    {
        received.truncate(CAPTURE_LIMIT_BYTES);
    }
}

fn parse_reply(received: &[u8], reply: Reply) -> Result<Option<Answer>, SandboxError> {
    let (captured, rest) = match reply {
        Reply::Status => (None, received),
        Reply::CapturedOutput => match received.iter().position(|b| *b == 0) {
            Some(nul) => (Some(&received[..nul]), &received[nul + 1..]),
            None => return Ok(None),
        },
    };
    let Some(newline) = rest.iter().position(|b| *b == b'\n') else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&rest[..newline]);
    let status: i32 = text.trim().parse().map_err(|_| SandboxError::Protocol {
        detail: format!("expected an exit status, got {text:?}"),
    })?;
    Ok(Some(match captured {
        None => Answer::Status(status),
        Some(stdout) => Answer::Captured(Captured {
            stdout: String::from_utf8_lossy(&stdout[..stdout.len().min(CAPTURE_LIMIT_BYTES)])
                .into_owned(),
            status,
        }),
    }))
}

impl Session for ShellSession {
    fn run<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<CommandOutcome, SandboxError>> {
        Box::pin(async move {
            let kind = match self.mode {
                ShellMode::Persistent => "run",
                ShellMode::FreshPerCommand => "sub",
            };
            match self.exchange(kind, command, output, Reply::Status).await? {
                Answer::Status(code) => Ok(CommandOutcome::Exited(code)),
                Answer::ShellExited(code) => Ok(CommandOutcome::ShellExited(code)),
                Answer::Captured(_) => Err(SandboxError::Protocol {
                    detail: "captured output for a plain command".into(),
                }),
            }
        })
    }

    fn capture<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<Captured, SandboxError>> {
        Box::pin(async move {
            match self
                .exchange("cap", command, output, Reply::CapturedOutput)
                .await?
            {
                Answer::Captured(captured) => Ok(captured),
                Answer::ShellExited(_) => Err(SandboxError::Ended),
                Answer::Status(_) => Err(SandboxError::Protocol {
                    detail: "a status without captured output".into(),
                }),
            }
        })
    }

    fn apply<'a>(
        &'a mut self,
        script: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<i32, SandboxError>> {
        Box::pin(async move {
            match self.exchange("run", script, output, Reply::Status).await? {
                Answer::Status(code) => Ok(code),
                Answer::ShellExited(_) => Err(SandboxError::Ended),
                Answer::Captured(_) => Err(SandboxError::Protocol {
                    detail: "captured output for a plain command".into(),
                }),
            }
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            self.requests = None;
            let terminated = self.process.terminate().await;
            self.ended.get_or_insert(128 + libc::SIGTERM);
            terminated
        })
    }

    fn oom_kills(&self) -> Option<u64> {
        self.process.oom_kills()
    }
}

fn signal_helper(helper: &Child, signal: i32) {
    if let Some(pid) = helper.id() {
        // SAFETY: kill only sends a signal; the helper is our child and not yet reaped, so the
        // pid cannot have been reused.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

impl Drop for ShellSession {
    /// A session dropped without `terminate` still ends.
    fn drop(&mut self) {
        if self.ended.is_none() {
            self.process.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_lines() {
        assert_eq!(encode_request("run", "echo hi"), "run 1\necho hi\n");
        assert_eq!(encode_request("run", "a\nb\n"), "run 2\na\nb\n");
        assert_eq!(encode_request("cap", ""), "cap 1\n\n");
    }

    #[test]
    fn replies_parse() {
        assert!(matches!(
            parse_reply(b"17\n", Reply::Status),
            Ok(Some(Answer::Status(17)))
        ));
        assert!(matches!(parse_reply(b"1", Reply::Status), Ok(None)));
        let Ok(Some(Answer::Captured(c))) = parse_reply(b"a\nb\x000\n", Reply::CapturedOutput)
        else {
            panic!("expected a capture");
        };
        assert_eq!((c.stdout.as_str(), c.status), ("a\nb", 0));
        assert!(parse_reply(b"x\n", Reply::Status).is_err());
    }
}
