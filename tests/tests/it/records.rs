//! `peerbuild builds` and `peerbuild logs` read back what earlier builds kept.

use expect_test::expect;
use tests::{Project, normalize_ids};

#[test]
fn builds_and_logs_show_past_builds() {
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nphases:\n  build:\n    commands:\n      - echo from the log\n",
    )]);
    let run = project.run(&[]);
    assert_eq!(run.code, 0);
    let id = run.result()["build_id"].as_str().expect("id").to_owned();

    let builds = project.command().arg("builds").output().expect("lists");
    let listing = String::from_utf8_lossy(&builds.stdout);
    assert!(
        listing.contains(&id) && listing.contains("SUCCEEDED"),
        "{listing}"
    );

    let prefix = &id[..id.find(':').expect("project:uuid") + 5];
    let logs = project
        .command()
        .args(["logs", prefix])
        .output()
        .expect("shows");
    let text = String::from_utf8_lossy(&logs.stdout);
    let text = tests::normalize_durations(
        &normalize_ids(&text).replace(&project.src().display().to_string(), "<SRC>"),
    );
    expect![[r#"
        peerbuild: build <ID> (#1) of <SRC>, sandbox namespace
        ── PROVISIONING SUCCEEDED in <T>
        ── DOWNLOAD_SOURCE SUCCEEDED in <T>: 1 files, 70 bytes, tree e79dd5f69435f73db30d2a91e8d8c1e48377d6e2f7d16333c3e2e49a1111f320/52
        ── BUILD
        $ echo from the log
        from the log
        ── BUILD SUCCEEDED in <T>

        Build <ID> SUCCEEDED in <T>
          phases:    PROVISIONING <T>, DOWNLOAD_SOURCE <T>, BUILD <T>
          logs:      peerbuild logs <ID>"#]]
    .assert_eq(&text);

    let missing = project
        .command()
        .args(["logs", "nope"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no build `nope`"));
}
