//! Nothing is left running after a build ends, times out or is stopped, double-forked processes
//! included; and exit statuses follow DESIGN.md.

use std::time::Duration;

use expect_test::expect;
use tests::{Project, processes_with, wait_for};

#[test]
fn background_and_double_forked_processes_die_with_the_build() {
    let marker = tests::marker("daemon");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  build:\n    commands:\n      - sh -c 'sleep 300 && echo {marker}' &\n      - (setsid sh -c 'sleep 300 && echo {marker}' &)\n      - nohup sh -c 'sleep 300 && echo {marker}' >/dev/null 2>&1 &\n      - echo started\n"
        ),
    )]);
    let run = project.run(&[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn timeout_ends_the_build_timed_out_and_kills_its_processes() {
    let marker = tests::marker("timeout");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  build:\n    commands:\n      - (setsid sh -c 'sleep 300 && echo {marker}' &)\n      - sh -c 'sleep 300 && echo {marker}'\n  post_build:\n    commands:\n      - echo never\n"
        ),
    )]);
    let run = project.run(&["--timeout", "2s"]);
    expect![[r#"
        exit 1
        $ (setsid sh -c 'sleep 300 && echo MARKER' &)
        $ sh -c 'sleep 300 && echo MARKER'
        BUILD TIMED_OUT: the build timed out; its processes were killed
        result TIMED_OUT: the build timed out; its processes were killed"#]]
    .assert_eq(&run.transcript().replace(&marker, "MARKER"));
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn ctrl_c_stops_the_build_with_status_130() {
    let marker = tests::marker("sigint");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  build:\n    commands:\n      - echo ready\n      - sh -c 'sleep 300 && echo {marker}'\n"
        ),
    )]);
    let mut child = project
        .command()
        .args(["run", "src"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    wait_for("the build's sleep", Duration::from_secs(30), || {
        !processes_with(&marker).is_empty()
    });
    // SAFETY: kill only sends a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("ends");
    assert_eq!(status.code(), Some(130));
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
    let mut output = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut output)
        .expect("read");
    assert!(output.contains("BUILD STOPPED"), "{output}");
}

#[test]
fn cancel_stops_a_running_build() {
    let marker = tests::marker("cancel");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nphases:\n  build:\n    commands:\n      - sh -c 'sleep 300 && echo {marker}'\n"
        ),
    )]);
    let mut child = project
        .command()
        .args(["run", "src", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    wait_for("the build's sleep", Duration::from_secs(30), || {
        !processes_with(&marker).is_empty()
    });
    let builds = project
        .command()
        .args(["builds", "--json"])
        .output()
        .expect("lists");
    let listing = String::from_utf8_lossy(&builds.stdout);
    let first: serde_json::Value =
        serde_json::from_str(listing.lines().next().expect("one build")).expect("json");
    assert_eq!(first["status"], "IN_PROGRESS");
    let id = first["build_id"].as_str().expect("id").to_owned();
    let cancel = project
        .command()
        .args(["cancel", &id])
        .output()
        .expect("cancels");
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    assert_eq!(child.wait().expect("ends").code(), Some(130));
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}

#[test]
fn exit_statuses_follow_the_contract() {
    let ok = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nphases:\n  build:\n    commands: [echo hi]\n",
    )]);
    assert_eq!(ok.run(&[]).code, 0);
    let failing = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nphases:\n  build:\n    commands: ['false']\n",
    )]);
    assert_eq!(failing.run(&[]).code, 1);
    let broken = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nphases:\n  biuld:\n    commands: [echo]\n",
    )]);
    assert_eq!(broken.run(&[]).code, 2);
    let unsatisfiable = ok.run(&["--require", "gpu=yes"]);
    assert_eq!(unsatisfiable.code, 3);
    expect![[r#"
        exit 3
        stderr: peerbuild: error: no peer can run this build: it requires gpu=yes, and this machine (the only peer) has os=linux, arch=x86_64"#]].assert_eq(&unsatisfiable.transcript());
    assert_eq!(
        ok.run(&["--sandbox", "vm"]).code,
        2,
        "an unknown sandbox is refused"
    );
    assert_eq!(ok.run(&["--sandbox", "docker"]).code, 2);
    assert_eq!(ok.run(&["--timeout", "ten"]).code, 2);
}

#[test]
fn ctrl_c_stops_a_batch_including_members_not_yet_started() {
    let marker = tests::marker("batchstop");
    let project = Project::new(&[(
        "buildspec.yml",
        &format!(
            "version: 0.2\nbatch:\n  build-fanout:\n    parallelism: 4\nphases:\n  build:\n    commands:\n      - sh -c 'sleep 300 && echo {marker}'\n"
        ),
    )]);
    let mut child = project
        .command()
        .args(["run", "src", "--slots", "1", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    wait_for("the first member's sleep", Duration::from_secs(30), || {
        !processes_with(&marker).is_empty()
    });
    let started = std::time::Instant::now();
    // SAFETY: kill only sends a signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("ends");
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the waiting members did not run their 300 s sleeps"
    );
    assert_eq!(processes_with(&marker), Vec::<i32>::new());
}
