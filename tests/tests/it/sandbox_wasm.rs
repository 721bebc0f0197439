//! The `wasm` sandbox, end to end through `peerbuild run --sandbox wasm`: each command is a WASI
//! module in the workspace. The modules are WebAssembly text kept in `tests/wasm-fixtures/`;
//! wasmtime (with its `wat` feature) compiles text as well as binary modules, so no WebAssembly
//! toolchain is needed.

use tests::{Project, Run, TempDir};

const ECHO: &str = include_str!("../../wasm-fixtures/echo.wat");
const OPEN: &str = include_str!("../../wasm-fixtures/open.wat");
const LOOP: &str = include_str!("../../wasm-fixtures/loop.wat");
const GROW: &str = include_str!("../../wasm-fixtures/grow.wat");
const FLOOD: &str = include_str!("../../wasm-fixtures/flood.wat");

/// A project with the fixture modules under `tools/` whose buildspec runs `commands` in its
/// build phase, followed by `extra` buildspec text.
fn project(commands: &[&str], extra: &str) -> Project {
    let mut spec = String::from("version: 0.2\nphases:\n  build:\n    commands:\n");
    for command in commands {
        spec.push_str(&format!("      - '{}'\n", command.replace('\'', "''")));
    }
    spec.push_str(extra);
    Project::new(&[
        ("buildspec.yml", &spec),
        ("tools/echo.wasm", ECHO),
        ("tools/open.wasm", OPEN),
        ("tools/loop.wasm", LOOP),
        ("tools/grow.wasm", GROW),
        ("tools/flood.wasm", FLOOD),
        ("inside.txt", "inside the workspace\n"),
    ])
}

fn run_wasm(project: &Project, extra: &[&str]) -> Run {
    let mut args = vec!["--sandbox", "wasm"];
    args.extend_from_slice(extra);
    project.run(&args)
}

/// The exit statuses the build's commands reported, in order.
fn failures(run: &Run) -> String {
    run.transcript()
        .lines()
        .filter(|l| l.contains("FAILED") || l.starts_with("exit"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_module_gets_its_arguments_and_environment_and_its_exit_status_counts() {
    let project = project(
        &[r#"tools/echo.wasm one "two words" 'three'"#],
        "env:\n  variables:\n    GREETING: hello\n",
    );
    let run = run_wasm(&project, &[]);
    let text = run.log();
    assert!(text.contains("one\ntwo words\nthree\n"), "{text}");
    assert!(text.contains("GREETING=hello"), "{text}");
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert!(
        failures(&run).contains("exit status 3"),
        "{}",
        run.transcript()
    );
}

#[test]
fn a_module_writes_into_the_workspace_and_the_file_becomes_an_artifact() {
    let project = project(
        &[
            "tools/open.wasm write out.txt",
            "tools/open.wasm read out.txt",
            "tools/open.wasm read ./inside.txt",
        ],
        "artifacts:\n  files: [out.txt]\n",
    );
    let artifacts = TempDir::new("wasm-artifacts");
    let folder = artifacts.path().join("out");
    let run = run_wasm(&project, &["--artifacts", &folder.display().to_string()]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let text = run.log();
    assert!(text.contains("written by wasm"), "{text}");
    assert!(text.contains("inside the workspace"), "{text}");
    assert_eq!(
        std::fs::read_to_string(folder.join("out.txt")).expect("the artifact"),
        "written by wasm\n"
    );
}

#[test]
fn escapes_from_the_workspace_are_refused() {
    let outside = TempDir::new("wasm-outside");
    std::fs::write(outside.path().join("secret"), "host secret\n").expect("write");
    // The source's symlinks that point out are left out of the workspace, so the build makes
    // its own: `up` leads to the host's root and `out` to a folder outside, through `..`.
    let root = "../".repeat(30);
    let out = format!(
        "{root}{}",
        outside.path().display().to_string().trim_start_matches('/')
    );
    let setup = [
        format!("tools/open.wasm link {root} up"),
        format!("tools/open.wasm link {out} out"),
    ];
    let attempts = [
        "tools/open.wasm read ../buildspec.yml".to_owned(),
        format!("tools/open.wasm read {root}etc/hostname"),
        "tools/open.wasm read /etc/hostname".to_owned(),
        format!("tools/open.wasm read {}/secret", outside.path().display()),
        "tools/open.wasm read up/etc/hostname".to_owned(),
        "tools/open.wasm read up/".to_owned(),
        "tools/open.wasm read out/".to_owned(),
        "tools/open.wasm read out/secret".to_owned(),
        "tools/open.wasm write out/planted".to_owned(),
        "tools/open.wasm link /etc etc".to_owned(),
    ];
    for attempt in &attempts {
        let mut commands: Vec<&str> = setup.iter().map(String::as_str).collect();
        commands.push(attempt);
        let project = project(&commands, "");
        let run = run_wasm(&project, &[]);
        let text = run.log();
        assert_eq!(run.code, 1, "{attempt}: {}", run.transcript());
        // EPERM or ENOTCAPABLE: refused, not merely missing.
        let failure = failures(&run);
        assert!(
            failure.contains(&format!("{attempt}. Reason: exit status 63"))
                || failure.contains(&format!("{attempt}. Reason: exit status 76")),
            "{attempt}: {}",
            run.transcript()
        );
        assert!(!text.contains("host secret"), "{attempt}: {text}");
        assert!(!outside.path().join("planted").exists(), "{attempt}");
    }
}

#[test]
fn a_module_outside_the_workspace_is_not_run() {
    let project = project(
        &["../tools/echo.wasm", "/bin/true", "tools/missing.wasm"],
        "",
    );
    let run = run_wasm(&project, &[]);
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert!(
        failures(&run).contains("exit status 127"),
        "{}",
        run.transcript()
    );
}

#[test]
fn shell_syntax_is_refused_clearly() {
    let project = project(&["tools/echo.wasm a | tools/echo.wasm b"], "");
    let run = run_wasm(&project, &[]);
    assert_ne!(run.code, 0, "{}", run.transcript());
    let transcript = run.transcript();
    assert!(
        transcript.contains("module invocations, not shell"),
        "{transcript}"
    );
}

#[test]
fn a_module_that_runs_forever_times_out() {
    let project = project(&["tools/loop.wasm"], "");
    let started = std::time::Instant::now();
    let run = run_wasm(&project, &["--timeout", "2s"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(run.result()["status"], "TIMED_OUT", "{}", run.transcript());
}

#[test]
fn a_module_growing_past_the_memory_limit_fails_cleanly() {
    let project = project(&["tools/grow.wasm"], "");
    let run = project
        .command()
        .env("PEERBUILD_SANDBOX_MEMORY_LIMIT", "64M")
        .args(["run", &project.src().display().to_string(), "--json"])
        .args(["--sandbox", "wasm"])
        .output()
        .expect("peerbuild runs");
    let run = Run::new(run, &project);
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert!(
        failures(&run).contains("exit status 134"),
        "{}",
        run.transcript()
    );
    assert!(run.log().contains("unreachable"), "{}", run.log());
}

#[test]
fn an_output_flood_is_capped() {
    let project = project(&["tools/flood.wasm"], "");
    let run = project
        .command()
        .env("PEERBUILD_SANDBOX_OUTPUT_LIMIT", "1M")
        .args(["run", &project.src().display().to_string(), "--json"])
        .args(["--sandbox", "wasm", "--timeout", "60s"])
        .output()
        .expect("peerbuild runs");
    let run = Run::new(run, &project);
    assert_eq!(run.code, 1, "{}", run.transcript());
    let text = run.log();
    assert!(text.len() <= (1 << 20) + 4096, "{} bytes", text.len());
    // The build's output budget (the same variable) ends the build as the module passes it.
    let transcript = run.transcript();
    assert!(
        transcript.contains("printed more than 1048576 bytes of output, its limit"),
        "{}",
        &transcript[transcript.len().saturating_sub(400)..]
    );
}

#[test]
fn compiled_modules_are_cached_in_the_data_directory() {
    let project = project(&["tools/echo.wasm"], "");
    let first = run_wasm(&project, &[]);
    assert_eq!(first.code, 0, "{}", first.transcript());
    let cache = project.data().join("wasm-cache");
    let files = || {
        let mut names: Vec<_> = std::fs::read_dir(&cache)
            .expect("the cache folder")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        names
    };
    let cached = files();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let second = run_wasm(&project, &[]);
    assert_eq!(second.code, 0, "{}", second.transcript());
    assert_eq!(files(), cached);
}

/// A buildspec may put one phase in the wasm sandbox: it starts from the build's exported
/// variables, shares the workspace, and the build's shell goes on after it.
#[test]
fn one_phase_can_run_in_the_wasm_sandbox() {
    let spec = r#"version: 0.2
peerbuild:
  phases:
    build:
      sandbox: wasm
phases:
  install:
    commands:
      - export GREETING=carried
      - echo from-the-shell > made.txt
  build:
    commands:
      - tools/open.wasm read made.txt
      - tools/open.wasm write from-wasm.txt
      - tools/echo.wasm
  post_build:
    commands:
      - echo "after $GREETING $(cat from-wasm.txt)"
"#;
    let project = Project::new(&[
        ("buildspec.yml", spec),
        ("tools/echo.wasm", ECHO),
        ("tools/open.wasm", OPEN),
    ]);
    // The build's own sandbox is host here, so that this test needs no namespace support.
    let run = project.run(&["--sandbox", "host"]);
    assert_eq!(run.code, 0, "{}", run.transcript());
    let log = run.log();
    assert!(log.contains("from-the-shell"), "{log}");
    assert!(log.lines().any(|l| l == "GREETING=carried"), "{log}");
    assert!(log.contains("after carried"), "{log}");
    assert!(
        run.transcript()
            .contains("BUILD runs in the wasm sandbox, in a session of its own"),
        "{}",
        run.transcript()
    );
    // Shell code in a wasm phase is not run by a shell: the build ends with the reason.
    let refused = project_with_build_phase_in_wasm("echo $GREETING");
    assert_ne!(refused.code, 0, "{}", refused.transcript());
    assert!(
        refused.transcript().contains("`$` is shell syntax"),
        "{}",
        refused.transcript()
    );
}

fn project_with_build_phase_in_wasm(command: &str) -> Run {
    let spec = format!(
        "version: 0.2\npeerbuild:\n  phases:\n    build:\n      sandbox: wasm\nphases:\n  build:\n    commands:\n      - '{command}'\n"
    );
    let project = Project::new(&[("buildspec.yml", &spec)]);
    project.run(&["--sandbox", "host"])
}
