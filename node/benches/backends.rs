//! Start-up cost of each sandbox backend per phase: start a session, run one trivial command in
//! it, end it (every process killed), with the executor already built (its probe is paid once
//! per node, not per phase). Runs of the backends alternate so all see the same machine noise.
//! Goals (issue 4): namespace under 20 ms, wasm with a cached module under 10 ms; docker is
//! measured. A backend this machine cannot run is reported and skipped.
//!
//!   cargo bench -p node --bench backends          (BENCH_RUNS=N to change the 51 runs;
//!                                                   BENCH_DOCKER_IMAGE=NAME for docker)

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox::{
    DockerConfig, DockerExecutor, Executor, HelperCommand, HostExecutor, NamespaceConfig,
    NamespaceExecutor, Network, OutputSink, SessionSpec, ShellKind, ShellMode, WasmConfig,
    WasmExecutor,
};

struct Discard;

impl OutputSink for Discard {
    fn write(&mut self, _bytes: &[u8]) {}
}

fn helper() -> HelperCommand {
    HelperCommand {
        program: PathBuf::from(env!("CARGO_BIN_EXE_peerbuild")),
        args: vec!["__sandbox-helper".into()],
    }
}

fn spec(workdir: &Path, shell: ShellKind, network: Network) -> SessionSpec {
    SessionSpec {
        network,
        shell,
        mode: ShellMode::Persistent,
        workdir: workdir.to_owned(),
        env: vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), "/root".into()),
        ],
        run_as: None,
        privileged: false,
    }
}

/// One phase: start, run `command`, end.
async fn phase(executor: &dyn Executor, spec: &SessionSpec, command: &str) -> Duration {
    let started = Instant::now();
    let mut session = executor.start(spec).await.expect("the session starts");
    let outcome = session.run(command, &mut Discard).await.expect("it runs");
    assert!(outcome.succeeded(), "`{command}` failed: {outcome:?}");
    session.terminate().await.expect("the session ends");
    started.elapsed()
}

struct Backend {
    name: String,
    executor: Arc<dyn Executor>,
    spec: SessionSpec,
    command: &'static str,
    samples: Vec<Duration>,
}

async fn backends(root: &Path) -> Vec<Backend> {
    let mut found = Vec::new();
    let shell_workspace = root.join("shell/src");
    std::fs::create_dir_all(&shell_workspace).expect("mkdir");
    let mut add = |name: &str, executor: Arc<dyn Executor>, spec: SessionSpec, command| {
        found.push(Backend {
            name: name.to_owned(),
            executor,
            spec,
            command,
            samples: Vec::new(),
        })
    };
    add(
        "host",
        Arc::new(HostExecutor::new(helper())),
        spec(&shell_workspace, ShellKind::Bash, Network::Outbound),
        "true",
    );
    let namespace_config = NamespaceConfig {
        masked: vec![root.to_owned()],
        memory_limit_bytes: Some(1 << 30),
        process_limit: Some(1024),
        root: None,
    };
    match NamespaceExecutor::new(helper(), namespace_config) {
        Ok(executor) => {
            let workspace = root.join("namespace/src");
            std::fs::create_dir_all(&workspace).expect("mkdir");
            let executor: Arc<dyn Executor> = Arc::new(executor);
            add(
                "namespace (no network)",
                executor.clone(),
                spec(&workspace, ShellKind::Bash, Network::Isolated),
                "true",
            );
            add(
                "namespace (outbound network)",
                executor,
                spec(&workspace, ShellKind::Bash, Network::Outbound),
                "true",
            );
        }
        Err(err) => println!("namespace: not available here: {err}"),
    }
    let wasm_workspace = root.join("wasm/src");
    std::fs::create_dir_all(&wasm_workspace).expect("mkdir");
    std::fs::write(
        wasm_workspace.join("nop.wat"),
        "(module (memory (export \"memory\") 1) (func (export \"_start\")))",
    )
    .expect("write the module");
    let wasm = WasmExecutor::new(WasmConfig {
        cache_dir: root.join("wasm-cache"),
        memory_limit_bytes: 64 << 20,
        output_limit_bytes: 1 << 20,
    });
    match wasm {
        Ok(executor) => add(
            "wasm (cached module)",
            Arc::new(executor),
            spec(&wasm_workspace, ShellKind::Sh, Network::Isolated),
            "nop.wat",
        ),
        Err(err) => println!("wasm: not available here: {err}"),
    }
    let image =
        std::env::var("BENCH_DOCKER_IMAGE").unwrap_or_else(|_| "peerbuild-test-busybox:1".into());
    let docker = DockerExecutor::new(DockerConfig {
        image: image.clone(),
        allow_privileged: false,
        memory_limit_bytes: Some(1 << 30),
        process_limit: Some(1024),
        cpu_limit_millis: None,
    })
    .await;
    match docker {
        Ok(executor) => {
            let workspace = root.join("docker/src");
            std::fs::create_dir_all(&workspace).expect("mkdir");
            add(
                &format!("docker ({image})"),
                Arc::new(executor),
                spec(&workspace, ShellKind::Sh, Network::Isolated),
                "true",
            )
        }
        Err(err) => println!("docker: not measured: {err} (BENCH_DOCKER_IMAGE names the image)"),
    }
    found
}

fn main() {
    let runs = common::runs(51);
    let root = std::env::temp_dir().join(format!("pb-bench-backends-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut backends = backends(&root).await;
        // Warm-up: the wasm module is compiled and cached here, page caches fill.
        for backend in &backends {
            for _ in 0..3 {
                phase(backend.executor.as_ref(), &backend.spec, backend.command).await;
            }
        }
        for _ in 0..runs {
            for backend in &mut backends {
                let took = phase(backend.executor.as_ref(), &backend.spec, backend.command).await;
                backend.samples.push(took);
            }
        }
        println!(
            "one phase (start a session, run one trivial command, end it), {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        for backend in backends {
            common::report(&backend.name, backend.samples);
        }
    });
    let _ = std::fs::remove_dir_all(&root);
}
