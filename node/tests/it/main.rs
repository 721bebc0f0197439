//! The `peerbuild` command line as users meet it: help with examples for every command, and
//! clear usage errors. (Being an integration test of this package, it also makes
//! `cargo test --workspace` build the binary the end-to-end suite in `tests` drives.) `peers.rs`
//! drives a real node with a hand-built libp2p peer: version refusal, malformed gossip.

mod peers;

use std::process::Command;

fn peerbuild(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_peerbuild"))
        .args(args)
        .env(
            "PEERBUILD_DATA_DIR",
            std::env::temp_dir().join("pb-cli-test-data"),
        )
        .output()
        .expect("peerbuild runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help_with_examples() {
    for command in [
        &["--help"][..],
        &["run", "--help"],
        &["builds", "--help"],
        &["logs", "--help"],
        &["cancel", "--help"],
        &["node", "--help"],
        &["pool", "init", "--help"],
        &["status", "--help"],
    ] {
        let (code, stdout, _) = peerbuild(command);
        assert_eq!(code, 0, "{command:?}");
        assert!(
            stdout.contains("Examples:"),
            "{command:?} has no examples:\n{stdout}"
        );
    }
}

#[test]
fn the_helper_subcommand_is_hidden() {
    let (_, stdout, _) = peerbuild(&["--help"]);
    assert!(!stdout.contains("sandbox-helper"), "{stdout}");
}

#[test]
fn usage_errors_exit_with_status_2() {
    let (code, _, stderr) = peerbuild(&["run", "--timeout", "soon"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("write a number with a unit"), "{stderr}");
    let (code, _, stderr) = peerbuild(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unrecognized subcommand"), "{stderr}");
}

#[test]
fn env_values_must_be_key_value() {
    let dir = std::env::temp_dir().join(format!("pb-cli-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("buildspec.yml"),
        "version: 0.2\nphases:\n  build:\n    commands: [echo]\n",
    )
    .expect("write");
    let (code, _, stderr) = peerbuild(&["run", dir.to_str().expect("utf-8"), "--env", "NOEQUALS"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("is not KEY=VALUE"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
