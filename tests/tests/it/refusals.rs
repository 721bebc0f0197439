//! Broken buildspecs are refused before anything runs, with the file, line, column and key at
//! fault, what was expected, and a hint: exit status 2.

use expect_test::{Expect, expect};
use tests::Project;

fn check(buildspec: &str, expected: Expect) {
    let project = Project::new(&[("buildspec.yml", buildspec)]);
    let run = project.run(&[]);
    assert_eq!(run.code, 2, "refused with status 2: {}", run.stdout);
    assert!(run.events.is_empty(), "nothing ran: {}", run.stdout);
    let stderr = run
        .stderr
        .replace(&project.src().display().to_string(), "<SRC>");
    expected.assert_eq(&stderr);
}

#[test]
fn invalid_yaml() {
    check(
        "version: 0.2\nphases:\n  build:\n    commands: [echo\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:4:20: invalid YAML: while parsing a flow sequence, expected ',' or ']'
    "#]],
    );
}

#[test]
fn misspelt_top_level_key() {
    check(
        "version: 0.2\nphase:\n  build:\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:2:1: phase: unknown key; expected one of version, run-as, env, proxy, batch, phases, reports, artifacts, cache, peerbuild
          hint: did you mean `phases`?
    "#]],
    );
}

#[test]
fn misspelt_phase() {
    check(
        "version: 0.2\nphases:\n  biuld:\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:3:3: phases.biuld: unknown key; expected one of install, pre_build, build, post_build
          hint: did you mean `build`?
    "#]],
    );
}

#[test]
fn unsupported_version() {
    check(
        "version: 0.3\nphases:\n  build:\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:1:10: version: unsupported version `0.3`; expected 0.1 or 0.2
    "#]],
    );
}

#[test]
fn command_parsed_as_a_mapping() {
    check(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - echo key: value\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:5:9: phases.build.commands[0]: expected a command (a string), found a mapping
          hint: YAML read `echo key: value` as a mapping because of the `: `; put the whole command in quotes
    "#]],
    );
}

#[test]
fn reserved_variable_name() {
    check(
        "version: 0.2\nenv:\n  variables:\n    CODEBUILD_X: y\nphases:\n  build:\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:4:5: env.variables.CODEBUILD_X: `CODEBUILD_X` is reserved: names starting with `CODEBUILD_` are set by the build itself
    "#]],
    );
}

#[test]
fn exported_secret() {
    check(
        "version: 0.2\nenv:\n  parameter-store:\n    TOKEN: /t\n  exported-variables:\n    - TOKEN\nphases:\n  build:\n    commands: [echo]\n",
        expect![[r#"
            peerbuild: <SRC>/buildspec.yml:6:7: env.exported-variables[0]: `TOKEN` is a secret (env.parameter-store); secrets cannot be exported
        "#]],
    );
}

#[test]
fn bad_on_failure() {
    check(
        "version: 0.2\nphases:\n  build:\n    on-failure: IGNORE\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:4:17: phases.build.on-failure: `IGNORE` is not allowed; expected one of ABORT, CONTINUE, RETRY, RETRY-<count>, RETRY-<regex>, RETRY-<count>-<regex>
    "#]],
    );
}

#[test]
fn dependency_cycle() {
    check(
        "version: 0.2\nbatch:\n  build-graph:\n    - identifier: a\n      depend-on: [b]\n    - identifier: b\n      depend-on: [a]\nphases:\n  build:\n    commands: [echo]\n",
        expect![[r#"
            peerbuild: <SRC>/buildspec.yml:5:19: batch.build-graph[0].depend-on[0]: dependency cycle: a -> b -> a (each member waits for the next)
        "#]],
    );
}

#[test]
fn duplicate_key() {
    check(
        "version: 0.2\nphases:\n  build:\n    commands: [echo]\n  build:\n    commands: [echo]\n",
        expect![[r#"
        peerbuild: <SRC>/buildspec.yml:5:3: phases.build: duplicate key `build` (lines 3 and 5); each key may appear once
    "#]],
    );
}

#[test]
fn missing_buildspec_file() {
    let project = Project::new(&[("README", "no buildspec here")]);
    let run = project.run(&[]);
    assert_eq!(run.code, 2);
    expect![[r#"
        peerbuild: no buildspec at <SRC>/buildspec.yml: write a buildspec.yml there, or name one with --buildspec FILE
    "#]].assert_eq(&run.stderr.replace(&project.src().display().to_string(), "<SRC>"));
}

#[test]
fn missing_secret_and_unknown_user() {
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nenv:\n  parameter-store:\n    TOKEN: /ci/token\nphases:\n  build:\n    commands: [echo]\n",
    )]);
    let run = project.run(&[]);
    assert_eq!(run.code, 2);
    expect![[r#"
        peerbuild: env.parameter-store.TOKEN reads the parameter `/ci/token`, which the secrets file does not hold; add a line `/ci/token=VALUE` to the file given with --secrets
    "#]].assert_eq(&run.stderr);
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nrun-as: no-such-user-pb\nphases:\n  build:\n    commands: [echo]\n",
    )]);
    let run = project.run(&[]);
    assert_eq!(run.code, 2);
    expect![[r#"
        peerbuild: run-as: the user `no-such-user-pb` does not exist on this machine; create it, or change run-as
    "#]].assert_eq(&run.stderr);
}

/// The owner's `config.toml` decides which sandboxes a buildspec may ask for and which one a
/// build gets by default; `--sandbox` is the owner's own choice.
#[test]
fn the_owners_settings_choose_and_limit_sandboxes() {
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\npeerbuild:\n  sandbox: host\nphases:\n  build:\n    commands:\n      - echo sandbox=$PEERBUILD_SANDBOX\n",
    )]);
    let data = project.data().display().to_string();
    let refused = project.run(&[]);
    assert_eq!(refused.code, 2, "{}", refused.stdout);
    assert!(refused.events.is_empty(), "nothing ran: {}", refused.stdout);
    expect![[r#"
        peerbuild: the buildspec asks for it in peerbuild.sandbox: the host sandbox is not allowed on this node (it runs builds with no isolation); it allows namespace, docker, wasm. To allow it, add "host" to sandbox.allow in <DATA>/config.toml
    "#]]
    .assert_eq(&refused.stderr.replace(&data, "<DATA>"));
    // The owner's own flag beats the buildspec, whatever the list says.
    let flagged = project.run(&["--sandbox", "host"]);
    assert_eq!(flagged.code, 0, "{}", flagged.stderr);
    assert!(flagged.log().contains("sandbox=host"), "{}", flagged.log());
    // Allowed in config.toml, the buildspec gets it.
    std::fs::write(
        project.data().join("config.toml"),
        "[sandbox]\nallow = [\"namespace\", \"host\"]\n",
    )
    .expect("write config");
    let allowed = project.run(&[]);
    assert_eq!(allowed.code, 0, "{}", allowed.stderr);
    assert!(allowed.log().contains("sandbox=host"), "{}", allowed.log());
    // The owner's default applies to buildspecs that name no sandbox.
    project.write(
        "buildspec.yml",
        "version: 0.2\nphases:\n  build:\n    commands:\n      - echo sandbox=$PEERBUILD_SANDBOX\n",
    );
    std::fs::write(
        project.data().join("config.toml"),
        "[sandbox]\nallow = [\"host\"]\n",
    )
    .expect("write config");
    let defaulted = project.run(&[]);
    assert_eq!(defaulted.code, 0, "{}", defaulted.stderr);
    assert!(
        defaulted.log().contains("sandbox=host"),
        "{}",
        defaulted.log()
    );
    // A typo in a security setting is never ignored.
    std::fs::write(
        project.data().join("config.toml"),
        "[sandbox]\nallow = [\"host\"]\nprivileges = true\n",
    )
    .expect("write config");
    let broken = project.run(&[]);
    assert_eq!(broken.code, 2, "{}", broken.stdout);
    assert!(broken.events.is_empty());
    let stderr = broken.stderr.replace(&data, "<DATA>");
    assert!(
        stderr.contains("<DATA>/config.toml")
            && stderr.contains("line 3")
            && stderr.contains("privileges"),
        "{stderr}"
    );
}

/// Per-phase sandboxes are checked like the build's, before anything runs.
#[test]
fn per_phase_sandboxes_are_checked_before_anything_runs() {
    let cases = [
        (
            "sandbox: host",
            "the buildspec asks for it in peerbuild.phases.build.sandbox: the host sandbox is not allowed on this node",
        ),
        (
            "sandbox: docker",
            "peerbuild.phases.build: the docker sandbox needs an image: set peerbuild.phases.build.image",
        ),
        (
            "sandbox: wasm\n      image: busybox",
            "peerbuild.phases.build.image `busybox` needs the docker sandbox; the wasm sandbox uses this machine's files",
        ),
    ];
    for (settings, message) in cases {
        let project = Project::new(&[(
            "buildspec.yml",
            &format!(
                "version: 0.2\npeerbuild:\n  phases:\n    build:\n      {settings}\nphases:\n  build:\n    commands:\n      - echo ran\n"
            ),
        )]);
        let run = project.run(&["--sandbox", "host"]);
        assert_eq!(run.code, 2, "{settings}: {}", run.stdout);
        assert!(run.events.is_empty(), "nothing ran: {}", run.stdout);
        assert!(run.stderr.contains(message), "{settings}: {}", run.stderr);
    }
}
