//! Start-up overhead: a trivial build (`echo hi`) through `peerbuild run` on the embedded node,
//! against bash running the same command. Runs alternate so both see the same machine noise;
//! prints medians and percentiles. Goal (DESIGN.md): under 50 ms more than bash.
//!
//!   cargo bench -p node --bench startup            (BENCH_RUNS=N to change the 101 runs)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time(command: &mut Command) -> Duration {
    let started = Instant::now();
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the command runs");
    let elapsed = started.elapsed();
    assert!(status.success(), "{command:?} failed");
    elapsed
}

fn main() {
    let runs = common::runs(101);
    let root = std::env::temp_dir().join(format!("pb-bench-startup-{}", std::process::id()));
    let source = root.join("src");
    std::fs::create_dir_all(&source).expect("mkdir");
    std::fs::write(
        source.join("buildspec.yml"),
        "version: 0.2\nphases:\n  build:\n    commands:\n      - echo hi\n",
    )
    .expect("write buildspec");
    let data = root.join("data");
    let peerbuild = env!("CARGO_BIN_EXE_peerbuild");
    let run = |source: &Path, sandbox: &str| {
        let mut command = Command::new(peerbuild);
        command
            .arg("run")
            .arg(source)
            .args(["--sandbox", sandbox])
            .env("PEERBUILD_DATA_DIR", &data);
        command
    };
    // The namespace sandbox needs root and a kernel that allows it; measure it where it runs.
    let namespace = run(&source, "namespace")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bash = || {
        let mut command = Command::new("bash");
        command.args(["-c", "echo hi"]);
        command
    };
    for _ in 0..5 {
        time(&mut run(&source, "host"));
        time(&mut bash());
    }
    let (mut peerbuild_samples, mut bash_samples, mut namespace_samples) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        peerbuild_samples.push(time(&mut run(&source, "host")));
        bash_samples.push(time(&mut bash()));
        if namespace {
            namespace_samples.push(time(&mut run(&source, "namespace")));
        }
    }
    println!(
        "trivial build (`echo hi`), {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let bash_median = common::report("bash -c 'echo hi'", bash_samples);
    let peerbuild_median = common::report("peerbuild run (embedded node)", peerbuild_samples);
    println!(
        "overhead of peerbuild over bash: {:.2} ms (goal: under 50 ms)",
        peerbuild_median - bash_median
    );
    if namespace {
        let namespace_median =
            common::report("peerbuild run --sandbox namespace", namespace_samples);
        println!(
            "namespace sandbox over host: {:.2} ms (includes its start-up probe)",
            namespace_median - peerbuild_median
        );
    } else {
        println!("peerbuild run --sandbox namespace: not available here (needs root)");
    }
    let _ = std::fs::remove_dir_all(&root);
}
