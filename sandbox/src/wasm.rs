//! The `wasm` backend: each command of a build is a WASI (preview 1) command module from the
//! workspace, run by wasmtime with the workspace as its only folder.
//!
//! A command is a module invocation, not shell: `tools/fmt.wasm --check src` names a module
//! relative to the workspace and its arguments, split into words as a POSIX shell does (single
//! and double quotes, backslashes) but with no variables, globs, pipes, redirections or `;`:
//! those are refused with a clear error. The module sees:
//!
//! - the workspace preopened as `.` (relative paths work; absolute paths, `..` and symlinks out
//!   of it are refused by WASI's capability checks);
//! - the session's environment variables, and its arguments with the module path as `argv[0]`;
//! - no sockets (WASI preview 1 has none) and no other process.
//!
//! Time is bounded with epoch interruption: a ticker increments the engine's epoch every
//! [`TICK`], and a running module checks whether it was cancelled (by [`Session::terminate`],
//! by dropping the future of [`Session::run`], or by its output passing the cap) at each tick.
//! Memory is bounded with a store limiter. Output passing the cap ends the module.
//!
//! Modules are compiled once and cached under the cache folder, keyed by the module's BLAKE3
//! digest and the engine's compatibility hash. A cache file holds the BLAKE3 digest of the
//! compiled code before the code; the code is deserialized only when the digest matches and
//! the folder belongs to this user with no access for others, so only code this executor
//! compiled is ever loaded.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::{
    BoxFuture, Capabilities, Captured, CommandOutcome, Enforcement, Executor, OutputSink,
    SandboxError, Session, SessionSpec,
};

/// How often the epoch ticks: the granularity of interrupting a module.
pub const TICK: Duration = Duration::from_millis(10);

/// The exit status of a command whose module could not be found (as a shell reports it).
pub const STATUS_NOT_FOUND: i32 = 127;
/// The exit status of a command whose module is not a valid WASI command module.
pub const STATUS_INVALID: i32 = 126;
/// The exit status of a command whose module trapped, ran out of memory, passed the output cap
/// or was interrupted (as a process killed by `SIGABRT` reports it).
pub const STATUS_TRAPPED: i32 = 134;

/// Limits and places for a [`WasmExecutor`].
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where compiled modules are kept; created with mode 0700 if missing.
    pub cache_dir: PathBuf,
    /// The most linear memory (and table space) a module may use.
    pub memory_limit_bytes: u64,
    /// The most output one command may write; past it the module is stopped.
    pub output_limit_bytes: u64,
}

/// Runs WASI command modules with wasmtime.
pub struct WasmExecutor {
    engine: Engine,
    config: WasmConfig,
    /// The engine's configuration, as part of every cache key.
    engine_key: String,
    stats: Arc<CacheStats>,
    ticker: Arc<AtomicBool>,
}

/// How often compiled modules came from the cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl std::fmt::Debug for WasmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmExecutor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl WasmExecutor {
    pub fn new(config: WasmConfig) -> Result<Self, SandboxError> {
        let unavailable = |reason: String| SandboxError::Unavailable {
            backend: "wasm",
            reason,
        };
        let mut wasmtime_config = Config::new();
        wasmtime_config.epoch_interruption(true);
        let engine = Engine::new(&wasmtime_config).map_err(|e| unavailable(format!("{e}")))?;
        prepare_cache_dir(&config.cache_dir).map_err(|e| {
            unavailable(format!(
                "the module cache {}: {e}",
                config.cache_dir.display()
            ))
        })?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());

        // The ticker stops when the executor is dropped.
        let ticker = Arc::new(AtomicBool::new(true));
        let (running, ticking) = (ticker.clone(), engine.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| unavailable(format!("cannot start the epoch ticker: {e}")))?;
        Ok(WasmExecutor {
            engine,
            config,
            engine_key,
            stats: Arc::default(),
            ticker,
        })
    }

    /// Cache hits and misses since this executor started.
    pub fn cache_stats(&self) -> &CacheStats {
        &self.stats
    }
}

impl Drop for WasmExecutor {
    fn drop(&mut self) {
        self.ticker.store(false, Ordering::Relaxed);
    }
}

/// Creates the cache folder (0700) and checks that it is this user's alone.
fn prepare_cache_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid only reads the process's identity.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(
            "it must belong to this user and be writable by nobody else",
        ));
    }
    Ok(())
}

impl WasmExecutor {
    fn start_now(&self, spec: &SessionSpec) -> Result<Box<dyn Session>, SandboxError> {
        if spec.run_as.is_some() {
            return Err(SandboxError::Unsupported {
                detail: "run-as: the wasm sandbox runs modules, which have no user identity".into(),
            });
        }
        let workspace = spec
            .workdir
            .canonicalize()
            .map_err(|source| SandboxError::Spawn {
                what: "wasm session (the workspace is missing)",
                source,
            })?;
        Ok(Box::new(WasmSession {
            shared: Arc::new(Shared {
                engine: self.engine.clone(),
                config: self.config.clone(),
                engine_key: self.engine_key.clone(),
                stats: self.stats.clone(),
            }),
            workspace,
            env: spec.env.clone(),
            running: None,
            ended: false,
        }))
    }
}

impl Executor for WasmExecutor {
    fn kind(&self) -> &'static str {
        "wasm"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            filesystem: Enforcement::Enforced,
            network: Enforcement::Enforced,
            processes: Enforcement::Enforced,
            memory: Enforcement::Enforced,
            // Time is bounded (epoch interruption) but CPU share is not.
            cpu: Enforcement::None,
            // Not applicable: a module cannot start processes at all.
            process_count: Enforcement::Enforced,
            process_tree_kill: Enforcement::Enforced,
            outbound_network: false,
        }
    }

    fn start<'a>(
        &'a self,
        spec: &'a SessionSpec,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, SandboxError>> {
        // Starting a wasm session does no waiting: it only prepares state.
        Box::pin(std::future::ready(self.start_now(spec)))
    }
}

struct Shared {
    engine: Engine,
    config: WasmConfig,
    engine_key: String,
    stats: Arc<CacheStats>,
}

/// A command running on its own thread: set `cancel` to stop it at the next tick; `done` is
/// set once the thread has finished.
#[derive(Clone)]
struct Running {
    cancel: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

/// Cancels the module when the future running it is dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct WasmSession {
    shared: Arc<Shared>,
    workspace: PathBuf,
    env: Vec<(String, String)>,
    running: Option<Running>,
    ended: bool,
}

enum Message {
    Output(Vec<u8>),
    Stderr(Vec<u8>),
    Done(i32),
}

impl WasmSession {
    async fn execute(
        &mut self,
        command: &str,
        output: &mut dyn OutputSink,
        mut captured: Option<&mut Vec<u8>>,
    ) -> Result<i32, SandboxError> {
        if self.ended {
            return Err(SandboxError::Ended);
        }
        let words = split_words(command).map_err(|detail| SandboxError::Unsupported {
            detail: format!(
                "the wasm sandbox runs module invocations, not shell: `{command}`: {detail}"
            ),
        })?;
        let Some(module) = words.first() else {
            return Ok(0);
        };
        let path = match resolve_module(&self.workspace, module) {
            Ok(path) => path,
            Err(reason) => {
                output.write(format!("peerbuild: {module}: {reason}\n").as_bytes());
                return Ok(STATUS_NOT_FOUND);
            }
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        self.running = Some(Running {
            cancel: cancel.clone(),
            done: done.clone(),
        });
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let job = Job {
            shared: self.shared.clone(),
            path,
            words,
            env: self.env.clone(),
            workspace: self.workspace.clone(),
            cancel,
            split_output: captured.is_some(),
        };
        std::thread::Builder::new()
            .name("wasm-module".into())
            .spawn(move || {
                let status = job.run(&sender);
                // The module has ended: say so before the status, so that a session ended
                // right after it never waits a tick for this thread.
                done.store(true, Ordering::SeqCst);
                let _ = sender.send(Message::Done(status));
            })
            .map_err(|source| SandboxError::Spawn {
                what: "thread for the module",
                source,
            })?;
        while let Some(message) = receiver.recv().await {
            match message {
                Message::Output(bytes) => match captured.as_deref_mut() {
                    Some(buffer) => buffer.extend_from_slice(&bytes),
                    None => output.write(&bytes),
                },
                Message::Stderr(bytes) => output.write(&bytes),
                Message::Done(status) => {
                    self.running = None;
                    return Ok(status);
                }
            }
        }
        Err(SandboxError::Protocol {
            detail: "the module's thread ended without a status".into(),
        })
    }
}

impl Session for WasmSession {
    fn run<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<CommandOutcome, SandboxError>> {
        Box::pin(async move {
            let status = self.execute(command, output, None).await?;
            Ok(CommandOutcome::Exited(status))
        })
    }

    fn capture<'a>(
        &'a mut self,
        command: &'a str,
        output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<Captured, SandboxError>> {
        Box::pin(async move {
            let mut stdout = Vec::new();
            let status = self.execute(command, output, Some(&mut stdout)).await?;
            stdout.truncate(1 << 20);
            let mut stdout = String::from_utf8_lossy(&stdout).into_owned();
            while stdout.ends_with('\n') {
                stdout.pop();
            }
            Ok(Captured { stdout, status })
        })
    }

    /// Understands only `export NAME=VALUE...` lines, which is what peerbuild's own code sends
    /// to a session once it started; anything else is refused.
    fn apply<'a>(
        &'a mut self,
        script: &'a str,
        _output: &'a mut dyn OutputSink,
    ) -> BoxFuture<'a, Result<i32, SandboxError>> {
        Box::pin(async move {
            let refuse = |detail: String| SandboxError::Unsupported {
                detail: format!("the wasm sandbox cannot apply shell code: {detail}"),
            };
            let mut assignments = Vec::new();
            for line in script.lines().filter(|l| !l.trim().is_empty()) {
                let words = split_words(line).map_err(refuse)?;
                if words.first().map(String::as_str) != Some("export") {
                    return Err(refuse(format!("`{line}`")));
                }
                for word in &words[1..] {
                    let Some((name, value)) = word.split_once('=') else {
                        return Err(refuse(format!("`{line}`")));
                    };
                    assignments.push((name.to_owned(), value.to_owned()));
                }
            }
            for (name, value) in assignments {
                match self.env.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, old)) => *old = value,
                    None => self.env.push((name, value)),
                }
            }
            Ok(0)
        })
    }

    fn terminate(&mut self) -> BoxFuture<'_, Result<(), SandboxError>> {
        Box::pin(async move {
            self.ended = true;
            let Some(running) = self.running.take() else {
                return Ok(());
            };
            running.cancel.store(true, Ordering::SeqCst);
            // A module is stopped at its next tick unless it is blocked in a host call.
            const LIMIT: Duration = Duration::from_secs(30);
            let started = std::time::Instant::now();
            while !running.done.load(Ordering::SeqCst) {
                if started.elapsed() > LIMIT {
                    return Err(SandboxError::Unkillable {
                        seconds: LIMIT.as_secs(),
                    });
                }
                tokio::time::sleep(TICK).await;
            }
            Ok(())
        })
    }
}

/// One module invocation, run on its own thread.
struct Job {
    shared: Arc<Shared>,
    path: PathBuf,
    words: Vec<String>,
    env: Vec<(String, String)>,
    workspace: PathBuf,
    cancel: Arc<AtomicBool>,
    /// Standard error goes to the log while standard output is captured.
    split_output: bool,
}

struct State {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

impl Job {
    /// Runs the module and returns its exit status; reports its problems as output.
    fn run(self, sender: &mpsc::UnboundedSender<Message>) -> i32 {
        let say = |text: String| {
            let _ = sender.send(Message::Output(format!("peerbuild: {text}\n").into_bytes()));
        };
        let name = &self.words[0];
        let module = match self.shared.module(&self.path) {
            Ok(module) => module,
            Err(ModuleError::Read(e)) => {
                say(format!("{name}: {e}"));
                return STATUS_NOT_FOUND;
            }
            Err(ModuleError::Invalid(e)) => {
                say(format!("{name}: not a WebAssembly module: {e}"));
                return STATUS_INVALID;
            }
        };
        let budget = Arc::new(Budget {
            left: AtomicU64::new(self.shared.config.output_limit_bytes),
            exceeded: AtomicBool::new(false),
            cancel: self.cancel.clone(),
        });
        let stdout = Stream {
            sender: sender.clone(),
            budget: budget.clone(),
            stderr: false,
        };
        let stderr = Stream {
            sender: sender.clone(),
            budget: budget.clone(),
            stderr: self.split_output,
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout)
            .stderr(stderr)
            .args(&self.words)
            .envs(&self.env)
            .allow_blocking_current_thread(true);
        if let Err(e) = wasi.preopened_dir(&self.workspace, ".", FsPerms::ReadWrite) {
            say(format!("cannot open the workspace for the module: {e}"));
            return STATUS_INVALID;
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(
                usize::try_from(self.shared.config.memory_limit_bytes).unwrap_or(usize::MAX),
            )
            .table_elements(1 << 20)
            .instances(1)
            .memories(1)
            .tables(4)
            .build();
        let mut store = Store::new(
            &self.shared.engine,
            State {
                wasi: wasi.build_p1(),
                limits,
            },
        );
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(1);
        let cancel = self.cancel.clone();
        store.epoch_deadline_callback(move |_| {
            if cancel.load(Ordering::SeqCst) {
                Err(wasmtime::Error::msg("interrupted"))
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }
        });
        let mut linker: Linker<State> = Linker::new(&self.shared.engine);
        if let Err(e) =
            wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)
        {
            say(format!("cannot link WASI: {e}"));
            return STATUS_INVALID;
        }
        let result = linker
            .instantiate(&mut store, &module)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start| start.call(&mut store, ()));
        match result {
            Ok(()) => 0,
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<I32Exit>() {
                    exit.0
                } else if budget.exceeded.load(Ordering::SeqCst) {
                    say(format!(
                        "{name}: stopped: its output passed the limit of {} bytes",
                        self.shared.config.output_limit_bytes
                    ));
                    STATUS_TRAPPED
                } else if self.cancel.load(Ordering::SeqCst) {
                    say(format!("{name}: interrupted"));
                    STATUS_TRAPPED
                } else {
                    say(format!("{name}: {e:#}"));
                    STATUS_TRAPPED
                }
            }
        }
    }
}

enum ModuleError {
    Read(std::io::Error),
    Invalid(String),
}

impl Shared {
    /// The compiled module at `path`, from the cache when this executor compiled it before.
    fn module(&self, path: &Path) -> Result<Module, ModuleError> {
        let bytes = std::fs::read(path).map_err(ModuleError::Read)?;
        let digest = blake3::hash(&bytes);
        let cached =
            self.config
                .cache_dir
                .join(format!("{}-{}.cwasm", digest.to_hex(), self.engine_key));
        if let Some(module) = self.load_cached(&cached) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(module);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let module = Module::new(&self.engine, &bytes)
            .map_err(|e| ModuleError::Invalid(format!("{e:#}")))?;
        // A cache that cannot be written only costs a compilation next time.
        let _ = self.store_cached(&cached, &module);
        Ok(module)
    }

    fn load_cached(&self, path: &Path) -> Option<Module> {
        let file = std::fs::read(path).ok()?;
        let (stored, code) = file.split_at_checked(32)?;
        if blake3::hash(code).as_bytes() != stored {
            return None;
        }
        // SAFETY: `code` is what `Module::serialize` wrote with this engine's configuration
        // (the file name holds its compatibility hash): the file is in a folder only this user
        // can write, and its digest matches the one written with it.
        unsafe { Module::deserialize(&self.engine, code) }.ok()
    }

    fn store_cached(&self, path: &Path, module: &Module) -> std::io::Result<()> {
        let code = module.serialize().map_err(std::io::Error::other)?;
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(blake3::hash(&code).as_bytes())?;
        file.write_all(&code)?;
        drop(file);
        std::fs::rename(&temporary, path)
    }
}

/// The module file a command names: relative to the workspace and inside it.
fn resolve_module(workspace: &Path, name: &str) -> Result<PathBuf, String> {
    let relative = Path::new(name);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("a module must be named by a path inside the workspace".into());
    }
    let path = workspace
        .join(relative)
        .canonicalize()
        .map_err(|e| format!("no such module ({e})"))?;
    if !path.starts_with(workspace) {
        return Err("the module is outside the workspace".into());
    }
    Ok(path)
}

/// Splits a command line into words as a POSIX shell does for quotes and backslashes; refuses
/// everything else a shell would interpret.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("a single quote is not closed".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("a double quote is not closed".into()),
                        },
                        Some(c @ ('$' | '`')) => {
                            return Err(format!("`{c}` (substitutions are not supported)"));
                        }
                        Some(c) => word.push(c),
                        None => return Err("a double quote is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err("a backslash ends the line".into()),
            },
            '#' if !in_word => break,
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | '\n' | '~' => {
                return Err(format!(
                    "`{}` is shell syntax (pipes, lists, redirections, variables and globs are not supported)",
                    c.escape_default()
                ));
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// What is left of a command's output allowance.
struct Budget {
    left: AtomicU64,
    exceeded: AtomicBool,
    cancel: Arc<AtomicBool>,
}

/// A module's standard output or error, forwarded to the session's output.
struct Stream {
    sender: mpsc::UnboundedSender<Message>,
    budget: Arc<Budget>,
    /// Standard error while standard output is captured: tagged so the session can tell.
    stderr: bool,
}

impl IsTerminal for Stream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Stream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(Writer {
            sender: self.sender.clone(),
            budget: self.budget.clone(),
            stderr: self.stderr,
        })
    }
}

struct Writer {
    sender: mpsc::UnboundedSender<Message>,
    budget: Arc<Budget>,
    stderr: bool,
}

impl tokio::io::AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let wanted = buf.len() as u64;
        let granted = self
            .budget
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                Some(left.saturating_sub(wanted))
            })
            .unwrap_or(0)
            .min(wanted);
        if granted < wanted {
            self.budget.exceeded.store(true, Ordering::SeqCst);
            self.budget.cancel.store(true, Ordering::SeqCst);
        }
        if granted > 0 {
            let bytes = buf[..granted as usize].to_vec();
            let message = if self.stderr {
                Message::Stderr(bytes)
            } else {
                Message::Output(bytes)
            };
            let _ = self.sender.send(message);
        }
        // Past the cap the bytes are dropped; the module stops at its next tick.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShellKind;

    struct Collect(Vec<u8>);

    impl OutputSink for Collect {
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    const HELLO: &str = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "hello\n")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 6))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $exit (i32.const 7))))"#;

    /// A scratch folder with a workspace holding `modules` and a cache folder.
    fn scratch(label: &str, modules: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("wasm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("ws")).unwrap();
        for (name, text) in modules {
            std::fs::write(root.join("ws").join(name), text).unwrap();
        }
        root
    }

    fn executor(root: &Path) -> WasmExecutor {
        WasmExecutor::new(WasmConfig {
            cache_dir: root.join("cache"),
            memory_limit_bytes: 64 << 20,
            output_limit_bytes: 1 << 20,
        })
        .unwrap()
    }

    fn spec(root: &Path) -> SessionSpec {
        SessionSpec {
            shell: ShellKind::Bash,
            mode: crate::ShellMode::Persistent,
            workdir: root.join("ws"),
            env: vec![],
            run_as: None,
            privileged: false,
            network: crate::Network::Isolated,
        }
    }

    #[tokio::test]
    async fn a_module_runs_then_comes_from_the_cache() {
        let root = scratch("cache", &[("hello.wasm", HELLO)]);
        let first = executor(&root);
        let mut session = first.start(&spec(&root)).await.unwrap();
        let mut out = Collect(Vec::new());
        let outcome = session.run("hello.wasm", &mut out).await.unwrap();
        assert_eq!(outcome, CommandOutcome::Exited(7));
        assert_eq!(out.0, b"hello\n");
        let captured = session.capture("./hello.wasm", &mut out).await.unwrap();
        assert_eq!((captured.stdout.as_str(), captured.status), ("hello", 7));
        assert_eq!(first.cache_stats().misses.load(Ordering::Relaxed), 1);
        assert_eq!(first.cache_stats().hits.load(Ordering::Relaxed), 1);

        // A new executor (a new run) loads what the first compiled.
        let second = executor(&root);
        let mut session = second.start(&spec(&root)).await.unwrap();
        session.run("hello.wasm", &mut out).await.unwrap();
        assert_eq!(second.cache_stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(second.cache_stats().misses.load(Ordering::Relaxed), 0);

        // A damaged cache file is not loaded: the module is compiled again.
        let cached = std::fs::read_dir(root.join("cache"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let mut bytes = std::fs::read(cached.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(cached.path(), bytes).unwrap();
        let third = executor(&root);
        let mut session = third.start(&spec(&root)).await.unwrap();
        let outcome = session.run("hello.wasm", &mut out).await.unwrap();
        assert_eq!(outcome, CommandOutcome::Exited(7));
        assert_eq!(third.cache_stats().misses.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn dropping_the_run_and_terminating_stops_a_spinning_module() {
        let spin = r#"(module (memory (export "memory") 1)
            (func (export "_start") (loop $l (br $l))))"#;
        let root = scratch("spin", &[("spin.wasm", spin)]);
        let executor = executor(&root);
        let mut session = executor.start(&spec(&root)).await.unwrap();
        let mut out = Collect(Vec::new());
        let run = session.run("spin.wasm", &mut out);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), run)
                .await
                .is_err()
        );
        let started = std::time::Instant::now();
        session.terminate().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(
            session.run("spin.wasm", &mut out).await,
            Err(SandboxError::Ended)
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn apply_sets_exported_variables_and_refuses_other_shell_code() {
        let root = scratch("apply", &[]);
        let executor = executor(&root);
        let mut session = executor.start(&spec(&root)).await.unwrap();
        let mut out = Collect(Vec::new());
        assert_eq!(
            session
                .apply("export CODEBUILD_BUILD_SUCCEEDING=0", &mut out)
                .await
                .unwrap(),
            0
        );
        assert!(session.apply("cd /tmp", &mut out).await.is_err());
        assert!(
            session
                .capture("printf '%s' \"$X\"", &mut out)
                .await
                .is_err()
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"tools/a.wasm --x 'a b' "c \"d\"" e\ f  # note"#).unwrap(),
            ["tools/a.wasm", "--x", "a b", "c \"d\"", "e f"]
        );
        assert_eq!(split_words("a ''").unwrap(), ["a", ""]);
        assert!(split_words("").unwrap().is_empty());
    }

    #[test]
    fn shell_syntax_is_refused() {
        for line in [
            "a | b",
            "a > f",
            "a $X",
            "a; b",
            "echo \"$X\"",
            "a *.c",
            "a 'b",
        ] {
            assert!(split_words(line).is_err(), "{line}");
        }
    }
}
