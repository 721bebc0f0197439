//! The CodeBuild conformance suite: one case per behaviour of BUILDSPEC.md, each a buildspec and
//! its files, run through `peerbuild run --json`, compared with a transcript snapshot.

use expect_test::{Expect, expect};
use tests::Project;

fn check(files: &[(&str, &str)], args: &[&str], expected: Expect) {
    let project = Project::new(files);
    let run = project.run(args);
    expected.assert_eq(&run.transcript());
}

#[test]
fn version_02_keeps_one_shell_across_commands_and_phases() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  install:
    commands:
      - mkdir -p sub && cd sub
      - export GREETING=hello
  build:
    commands:
      - basename "$PWD"
      - echo "$GREETING"
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ mkdir -p sub && cd sub
            $ export GREETING=hello
            INSTALL SUCCEEDED
            $ basename "$PWD"
            | sub
            $ echo "$GREETING"
            | hello
            BUILD SUCCEEDED
            result SUCCEEDED"#]],
    );
}

#[test]
fn version_01_runs_each_command_in_a_fresh_shell() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.1
phases:
  build:
    commands:
      - mkdir -p sub && cd sub && export GREETING=hello
      - basename "$PWD"
      - echo "greeting=${GREETING:-unset}"
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ mkdir -p sub && cd sub && export GREETING=hello
            $ basename "$PWD"
            | src
            $ echo "greeting=${GREETING:-unset}"
            | greeting=unset
            BUILD SUCCEEDED
            result SUCCEEDED"#]],
    );
}

#[test]
fn env_shell_selects_the_shell() {
    let spec = |shell: &str| {
        format!(
            "version: 0.2\nenv:\n  shell: {shell}\nphases:\n  build:\n    commands:\n      - if [ -n \"$BASH_VERSION\" ]; then echo bash; else echo posix sh; fi\n"
        )
    };
    check(
        &[("buildspec.yml", &spec("bash"))],
        &[],
        expect![[r#"
        exit 0
        $ if [ -n "$BASH_VERSION" ]; then echo bash; else echo posix sh; fi
        | bash
        BUILD SUCCEEDED
        result SUCCEEDED"#]],
    );
    check(
        &[("buildspec.yml", &spec("/bin/sh"))],
        &[],
        expect![[r#"
        exit 0
        $ if [ -n "$BASH_VERSION" ]; then echo bash; else echo posix sh; fi
        | posix sh
        BUILD SUCCEEDED
        result SUCCEEDED"#]],
    );
}

#[test]
fn failed_build_skips_the_rest_of_its_block_and_still_runs_post_build() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - echo "before=$CODEBUILD_BUILD_SUCCEEDING"
      - "false"
      - echo never printed
  post_build:
    commands:
      - echo "after=$CODEBUILD_BUILD_SUCCEEDING"
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ echo "before=$CODEBUILD_BUILD_SUCCEEDING"
            | before=1
            $ false
            BUILD FAILED: Error while executing command: false. Reason: exit status 1
            note: POST_BUILD runs although the build has failed, as in CodeBuild; CODEBUILD_BUILD_SUCCEEDING is 0
            $ echo "after=$CODEBUILD_BUILD_SUCCEEDING"
            | after=0
            POST_BUILD SUCCEEDED
            result FAILED: BUILD: command `false` exited with status 1"#]],
    );
}

#[test]
fn finally_runs_after_a_failure_and_can_fail_the_phase() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  pre_build:
    commands:
      - "false"
    finally:
      - echo cleaning up
  build:
    commands:
      - echo not reached
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ false
            $ echo cleaning up
            | cleaning up
            PRE_BUILD FAILED: Error while executing command: false. Reason: exit status 1
            note: BUILD skipped: PRE_BUILD failed
            result FAILED: PRE_BUILD: command `false` exited with status 1"#]],
    );
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - echo fine
    finally:
      - exit_code_7() { return 7; }; exit_code_7
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ echo fine
            | fine
            $ exit_code_7() { return 7; }; exit_code_7
            BUILD FAILED: Error while executing command: exit_code_7() { return 7; }; exit_code_7. Reason: exit status 7
            result FAILED: BUILD: command `exit_code_7() { return 7; }; exit_code_7` exited with status 7"#]],
    );
}

#[test]
fn failed_install_skips_every_later_phase_but_uploads_artifacts() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  install:
    commands:
      - echo partial > partial.txt
      - "false"
  pre_build:
    commands: [echo no]
  build:
    commands: [echo no]
  post_build:
    commands: [echo no]
artifacts:
  files: [partial.txt]
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ echo partial > partial.txt
            $ false
            INSTALL FAILED: Error while executing command: false. Reason: exit status 1
            note: PRE_BUILD skipped: INSTALL failed
            note: BUILD skipped: INSTALL failed
            note: POST_BUILD skipped: INSTALL failed
            UPLOAD_ARTIFACTS SUCCEEDED
            result FAILED: INSTALL: command `false` exited with status 1
            artifact primary: 1 files"#]],
    );
}

#[test]
fn on_failure_continue_goes_on_and_the_build_fails() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  install:
    on-failure: CONTINUE
    commands:
      - "false"
  build:
    commands:
      - echo "build runs, succeeding=$CODEBUILD_BUILD_SUCCEEDING"
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ false
            INSTALL FAILED: Error while executing command: false. Reason: exit status 1
            $ echo "build runs, succeeding=$CODEBUILD_BUILD_SUCCEEDING"
            | build runs, succeeding=0
            BUILD SUCCEEDED
            result FAILED: INSTALL: command `false` exited with status 1"#]],
    );
}

#[test]
fn on_failure_abort_skips_post_build() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    on-failure: ABORT
    commands:
      - "false"
  post_build:
    commands:
      - echo not reached
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ false
            BUILD FAILED: Error while executing command: false. Reason: exit status 1
            note: POST_BUILD skipped: BUILD failed with on-failure: ABORT
            result FAILED: BUILD: command `false` exited with status 1"#]],
    );
}

#[test]
fn on_failure_retry_runs_the_phase_again() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    on-failure: RETRY-3
    commands:
      - echo x >> attempts
      - echo "attempt $(wc -l < attempts)"
      - test "$(wc -l < attempts)" -ge 3
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ echo x >> attempts
            $ echo "attempt $(wc -l < attempts)"
            | attempt 1
            $ test "$(wc -l < attempts)" -ge 3
            note: BUILD failed; retrying (retry 1 of 3)
            $ echo x >> attempts
            $ echo "attempt $(wc -l < attempts)"
            | attempt 2
            $ test "$(wc -l < attempts)" -ge 3
            note: BUILD failed; retrying (retry 2 of 3)
            $ echo x >> attempts
            $ echo "attempt $(wc -l < attempts)"
            | attempt 3
            $ test "$(wc -l < attempts)" -ge 3
            BUILD SUCCEEDED
            result SUCCEEDED"#]],
    );
}

#[test]
fn on_failure_retry_with_a_pattern_retries_only_matching_failures() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    on-failure: RETRY-2-connection (reset|refused)
    commands:
      - 'echo "fatal: disk full"' 
      - "false"
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ echo "fatal: disk full"
            | fatal: disk full
            $ false
            note: BUILD failed; not retrying, since its output does not match `connection (reset|refused)`
            BUILD FAILED: Error while executing command: false. Reason: exit status 1
            result FAILED: BUILD: command `false` exited with status 1"#]],
    );
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    on-failure: RETRY-1-connection (reset|refused)
    commands:
      - 'echo "error: connection reset by peer"' 
      - "false"
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ echo "error: connection reset by peer"
            | error: connection reset by peer
            $ false
            note: BUILD failed; retrying (retry 1 of 1)
            $ echo "error: connection reset by peer"
            | error: connection reset by peer
            $ false
            BUILD FAILED: Error while executing command: false. Reason: exit status 1
            result FAILED: BUILD: command `false` exited with status 1"#]],
    );
}

#[test]
fn variables_are_literal_and_submit_time_values_win() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
env:
  variables:
    LITERAL: $HOME:/x
    FROM_SPEC: spec
    OVERRIDDEN: spec
    FROM_FILE: spec
phases:
  build:
    commands:
      - echo "literal=$LITERAL spec=$FROM_SPEC overridden=$OVERRIDDEN file=$FROM_FILE extra=$EXTRA"
"#,
    )]);
    std::fs::write(
        project.root().join("vars.env"),
        "# submit-time values\nFROM_FILE=file\nOVERRIDDEN=file\n",
    )
    .expect("write env file");
    let env_file = project.root().join("vars.env");
    let run = project.run(&[
        "--env-file",
        env_file.to_str().expect("utf-8 path"),
        "--env",
        "OVERRIDDEN=cli",
        "--env",
        "EXTRA=a=b",
    ]);
    expect![[r#"
        exit 0
        $ echo "literal=$LITERAL spec=$FROM_SPEC overridden=$OVERRIDDEN file=$FROM_FILE extra=$EXTRA"
        | literal=$HOME:/x spec=spec overridden=cli file=file extra=a=b
        BUILD SUCCEEDED
        result SUCCEEDED"#]].assert_eq(&run.transcript());
}

#[test]
fn exported_variables_are_reported_with_their_final_values() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
env:
  exported-variables:
    - VERSION
    - NEVER_SET
phases:
  build:
    commands:
      - export VERSION=1.2.3
  post_build:
    commands:
      - export VERSION="$VERSION-final"
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ export VERSION=1.2.3
            BUILD SUCCEEDED
            $ export VERSION="$VERSION-final"
            POST_BUILD SUCCEEDED
            result SUCCEEDED
            exported VERSION=1.2.3-final
            exported NEVER_SET="#]],
    );
}

#[test]
fn built_in_variables_are_set() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
phases:
  build:
    commands:
      - case "$CODEBUILD_BUILD_ID" in src:*-*-4*-*) echo "build id ok";; *) echo "bad id $CODEBUILD_BUILD_ID";; esac
      - echo "number=$CODEBUILD_BUILD_NUMBER succeeding=$CODEBUILD_BUILD_SUCCEEDING image=$CODEBUILD_BUILD_IMAGE"
      - test "$CODEBUILD_SRC_DIR" = "$PWD" && echo "src dir is the working directory"
      - test "$CODEBUILD_START_TIME" -gt 1700000000000 && echo "start time in ms"
      - echo "initiator=${CODEBUILD_INITIATOR%%/*} home_set=${HOME:+yes} arn=${CODEBUILD_BUILD_ARN%%:*}"
      - echo "source version=${CODEBUILD_RESOLVED_SOURCE_VERSION:-none} batch=${CODEBUILD_BATCH_BUILD_IDENTIFIER:-none}"
"#,
    )]);
    let first = project.run(&[]);
    let second = project.run(&[]);
    expect![[r#"
        exit 0
        $ case "$CODEBUILD_BUILD_ID" in src:*-*-4*-*) echo "build id ok";; *) echo "bad id $CODEBUILD_BUILD_ID";; esac
        | build id ok
        $ echo "number=$CODEBUILD_BUILD_NUMBER succeeding=$CODEBUILD_BUILD_SUCCEEDING image=$CODEBUILD_BUILD_IMAGE"
        | number=1 succeeding=1 image=host
        $ test "$CODEBUILD_SRC_DIR" = "$PWD" && echo "src dir is the working directory"
        | src dir is the working directory
        $ test "$CODEBUILD_START_TIME" -gt 1700000000000 && echo "start time in ms"
        | start time in ms
        $ echo "initiator=${CODEBUILD_INITIATOR%%/*} home_set=${HOME:+yes} arn=${CODEBUILD_BUILD_ARN%%:*}"
        | initiator=peerbuild home_set=yes arn=arn
        $ echo "source version=${CODEBUILD_RESOLVED_SOURCE_VERSION:-none} batch=${CODEBUILD_BATCH_BUILD_IDENTIFIER:-none}"
        | source version=none batch=none
        BUILD SUCCEEDED
        result SUCCEEDED"#]].assert_eq(&first.transcript());
    assert!(
        second.stdout.contains("number=2 "),
        "build numbers count up: {}",
        second.stdout
    );
}

#[test]
fn git_checkout_sends_tracked_and_unignored_files_and_its_commit() {
    let project = Project::new(&[
        (
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - ls -a | grep -v '^\.\.\?$' | sort | tr '\n' ' '; echo
      - test "$CODEBUILD_RESOLVED_SOURCE_VERSION" = "$(cat ../commit 2>/dev/null || echo "$CODEBUILD_SOURCE_VERSION")" && echo "commit ${#CODEBUILD_RESOLVED_SOURCE_VERSION} chars"
"#,
        ),
        (".gitignore", "target/\n*.log\n"),
        ("tracked.txt", "t"),
    ]);
    let git = |args: &[&str]| {
        let status = std::process::Command::new("git")
            .args(args)
            .current_dir(project.src())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git runs");
        assert!(status.status.success(), "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "first"]);
    project.write("untracked.txt", "u");
    project.write("target/debug/big", "ignored");
    project.write("debug.log", "ignored");
    let run = project.run(&[]);
    expect![[r#"
        exit 0
        $ ls -a | grep -v '^\.\.\?$' | sort | tr '\n' ' '; echo
        | .gitignore buildspec.yml tracked.txt untracked.txt 
        $ test "$CODEBUILD_RESOLVED_SOURCE_VERSION" = "$(cat ../commit 2>/dev/null || echo "$CODEBUILD_SOURCE_VERSION")" && echo "commit ${#CODEBUILD_RESOLVED_SOURCE_VERSION} chars"
        | commit 40 chars
        BUILD SUCCEEDED
        result SUCCEEDED"#]].assert_eq(&run.transcript());
}

#[test]
fn secrets_are_masked_everywhere_and_never_written_to_disk() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
env:
  parameter-store:
    TOKEN: /ci/token
  secrets-manager:
    DB_PASSWORD: prod/db:password
phases:
  build:
    commands:
      - echo "token is $TOKEN"
      - printf 'split=hunter'; sleep 0.2; printf '2-pass and more\n'
      - echo "password is $DB_PASSWORD" >&2
      - export LEAK="$TOKEN"
"#,
    )]);
    let secrets = project.root().join("secrets.env");
    std::fs::write(
        &secrets,
        "/ci/token=t0k3n-value\nprod/db={\"password\":\"hunter2-pass\"}\n",
    )
    .expect("write");
    let run = project.run(&["--secrets", secrets.to_str().expect("utf-8")]);
    expect![[r#"
        exit 0
        $ echo "token is $TOKEN"
        | token is ***
        $ printf 'split=hunter'; sleep 0.2; printf '2-pass and more\n'
        | split=*** and more
        $ echo "password is $DB_PASSWORD" >&2
        | password is ***
        $ export LEAK="$TOKEN"
        BUILD SUCCEEDED
        result SUCCEEDED"#]]
    .assert_eq(&run.transcript());
    for value in ["t0k3n-value", "hunter2-pass"] {
        assert!(!run.stdout.contains(value), "secret in output");
        let found = std::process::Command::new("grep")
            .args(["-r", "-l", value])
            .arg(project.data())
            .output()
            .expect("grep runs");
        assert!(
            found.stdout.is_empty(),
            "secret {value} on disk in {}",
            String::from_utf8_lossy(&found.stdout)
        );
    }
}

#[test]
fn artifacts_follow_codebuild_paths() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
phases:
  build:
    commands:
      - mkdir -p dist/app/bin dist/app/docs logs
      - echo bin > dist/app/bin/tool && chmod +x dist/app/bin/tool
      - echo readme > dist/app/docs/README.md
      - echo skip > dist/app/docs/draft.tmp
      - echo log > logs/build.log
      - export STAMP=v7
artifacts:
  base-directory: dist
  files:
    - '**/*'
  exclude-paths:
    - '**/*.tmp'
  name: app-$STAMP
  secondary-artifacts:
    logs:
      files:
        - logs/*
      discard-paths: yes
"#,
    )]);
    let out = project.root().join("out");
    let run = project.run(&["--artifacts", out.to_str().expect("utf-8")]);
    expect![[r#"
        exit 0
        $ mkdir -p dist/app/bin dist/app/docs logs
        $ echo bin > dist/app/bin/tool && chmod +x dist/app/bin/tool
        $ echo readme > dist/app/docs/README.md
        $ echo skip > dist/app/docs/draft.tmp
        $ echo log > logs/build.log
        $ export STAMP=v7
        BUILD SUCCEEDED
        UPLOAD_ARTIFACTS SUCCEEDED
        result SUCCEEDED
        artifact primary `app-v7`: 2 files
        artifact logs: 1 files"#]]
    .assert_eq(&run.transcript());
    let mut listing = Vec::new();
    list(&out, &out, &mut listing);
    listing.sort();
    expect![[r#"
        app/bin/tool (executable)
        app/docs/README.md
        logs/build.log"#]]
    .assert_eq(&listing.join("\n"));
}

fn list(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("list").flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let rel = path
            .strip_prefix(root)
            .expect("inside")
            .display()
            .to_string();
        if meta.is_dir() {
            list(root, &path, out);
        } else if meta.file_type().is_symlink() {
            out.push(format!(
                "{rel} -> {}",
                std::fs::read_link(&path).expect("link").display()
            ));
        } else {
            let exec = if meta.permissions().mode() & 0o111 != 0 {
                " (executable)"
            } else {
                ""
            };
            out.push(format!("{rel}{exec}"));
        }
    }
}

#[test]
fn artifacts_never_follow_a_symlink_out_of_the_build() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
phases:
  build:
    commands:
      - mkdir -p out && echo inside > out/inside.txt
      - ln -s /etc/hostname out/escape
      - ln -s inside.txt out/alias
artifacts:
  files:
    - out/**/*
  enable-symlinks: yes
"#,
    )]);
    let dest = project.root().join("artifacts");
    let run = project.run(&["--artifacts", dest.to_str().expect("utf-8")]);
    expect![[r#"
        exit 0
        $ mkdir -p out && echo inside > out/inside.txt
        $ ln -s /etc/hostname out/escape
        $ ln -s inside.txt out/alias
        BUILD SUCCEEDED
        note: artifact primary: skipped out/escape: is a symlink to /etc/hostname, outside the build directory
        UPLOAD_ARTIFACTS SUCCEEDED
        result SUCCEEDED
        artifact primary: 1 files"#]].assert_eq(&run.transcript());
    let mut listing = Vec::new();
    list(&dest, &dest, &mut listing);
    listing.sort();
    expect![[r#"
        out/alias -> inside.txt
        out/inside.txt"#]]
    .assert_eq(&listing.join("\n"));
}

#[test]
fn junit_reports_are_counted() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - mkdir -p reports
      - |
        cat > reports/unit.xml <<'XML'
        <testsuites><testsuite name="s">
          <testcase name="a"/><testcase name="b"><failure message="no"/></testcase>
          <testcase name="c"><skipped/></testcase><testcase name="d"/>
        </testsuite></testsuites>
        XML
      - echo '{}' > reports/coverage.json
reports:
  unit:
    files: ['**/*.xml']
    base-directory: reports
  coverage:
    files: [reports/coverage.json]
    file-format: SIMPLECOV
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ mkdir -p reports
            $ cat > reports/unit.xml <<'XML'
            <testsuites><testsuite name="s">
              <testcase name="a"/><testcase name="b"><failure message="no"/></testcase>
              <testcase name="c"><skipped/></testcase><testcase name="d"/>
            </testsuite></testsuites>
            XML

            $ echo '{}' > reports/coverage.json
            BUILD SUCCEEDED
            UPLOAD_ARTIFACTS SUCCEEDED
            result SUCCEEDED
            report unit JUNITXML: {"errored":0,"failed":1,"passed":2,"skipped":1}
            report coverage SIMPLECOV: null"#]],
    );
}

#[test]
fn missing_runtimes_are_reported_and_the_build_goes_on() {
    let project = Project::new(&[(
        "buildspec.yml",
        r#"
version: 0.2
phases:
  install:
    runtime-versions:
      python: 3.x
      golang: 1.99
      cobol: latest
    commands:
      - echo installing
"#,
    )]);
    // Which Python 3 the machine has is the machine's business.
    let transcript: Vec<String> = project
        .run(&[])
        .transcript()
        .lines()
        .map(|line| match line.split_once("python 3.x: found 3.") {
            Some((head, _)) => format!("{head}python 3.x: found 3.<MINOR>"),
            None => line.to_owned(),
        })
        .collect();
    expect![[r#"
        exit 0
        note: runtime python 3.x: found 3.<MINOR>
        note: runtime golang 1.99: not installed here; going on, as CodeBuild does on images without runtime support
        note: runtime cobol latest: peerbuild does not know this runtime (it knows python, nodejs, java, golang, ruby, php, dotnet, docker); going on
        $ echo installing
        | installing
        INSTALL SUCCEEDED
        result SUCCEEDED"#]]
    .assert_eq(&transcript.join("\n"));
}

#[test]
fn a_shell_that_exits_is_replaced_for_later_phases() {
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - export KEPT=no
      - exit 3
  post_build:
    commands:
      - echo "post_build in a new shell, KEPT=${KEPT:-lost}"
"#,
        )],
        &[],
        expect![[r#"
            exit 1
            $ export KEPT=no
            $ exit 3
            note: the build's shell exited with status 3 (an `exit`, a failure under `set -e`, or a shell syntax error); later commands start in a new shell from CODEBUILD_SRC_DIR, without the directory and variables of this one
            BUILD FAILED: Error while executing command: exit 3. Reason: exit status 3
            note: POST_BUILD runs although the build has failed, as in CodeBuild; CODEBUILD_BUILD_SUCCEEDING is 0
            $ echo "post_build in a new shell, KEPT=${KEPT:-lost}"
            | post_build in a new shell, KEPT=lost
            POST_BUILD SUCCEEDED
            result FAILED: BUILD: command `exit 3` exited with status 3"#]],
    );
}

#[test]
fn run_as_switches_user_and_carries_directory_and_variables() {
    tests::ensure_test_user();
    check(
        &[(
            "buildspec.yml",
            r#"
version: 0.2
phases:
  install:
    commands:
      - mkdir -p work && chmod 777 work && cd work
      - export CARRIED=yes
      - whoami
  build:
    run-as: peerbuild-test
    commands:
      - whoami
      - echo "dir=$(basename "$PWD") carried=$CARRIED home=$HOME"
      - touch written-by-build
  post_build:
    commands:
      - whoami
      - stat -c %U written-by-build
"#,
        )],
        &[],
        expect![[r#"
            exit 0
            $ mkdir -p work && chmod 777 work && cd work
            $ export CARRIED=yes
            $ whoami
            | root
            INSTALL SUCCEEDED
            note: BUILD runs as `peerbuild-test` (was `root`) in a new shell, from the previous shell's working directory and exported variables
            $ whoami
            | peerbuild-test
            $ echo "dir=$(basename "$PWD") carried=$CARRIED home=$HOME"
            | dir=work carried=yes home=/home/peerbuild-test
            $ touch written-by-build
            BUILD SUCCEEDED
            note: POST_BUILD runs as `root` (was `peerbuild-test`) in a new shell, from the previous shell's working directory and exported variables
            $ whoami
            | root
            $ stat -c %U written-by-build
            | peerbuild-test
            POST_BUILD SUCCEEDED
            result SUCCEEDED"#]],
    );
}

#[test]
fn cache_restores_saves_falls_back_and_explains_misses() {
    let project = Project::new(&[
        ("deps.lock", "v1\n"),
        (
            "buildspec.yml",
            r#"
version: 0.2
phases:
  build:
    commands:
      - if [ -f deps/pkg.txt ]; then echo "restored=$(cat deps/pkg.txt)"; else mkdir -p deps && echo "fetched-for-$(cat deps.lock)" > deps/pkg.txt; fi
      - test "${FAIL:-no}" = no
cache:
  key: deps-$(codebuild-hash-files deps.lock | cut -c1-8)
  fallback-keys:
    - deps-
  paths:
    - deps/**/*
"#,
        ),
    ]);
    let mut transcripts = Vec::new();
    transcripts.push(project.run(&["--env", "FAIL=yes"]).transcript()); // a failed build saves nothing
    transcripts.push(project.run(&[]).transcript()); // miss, then save
    transcripts.push(project.run(&[]).transcript()); // exact hit; the entry is immutable
    project.write("deps.lock", "v2\n");
    transcripts.push(project.run(&[]).transcript()); // fallback prefix hit, new key saved
    let keys = project
        .command()
        .args(["cache", "keys"])
        .output()
        .expect("lists");
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert_eq!(keys.matches("deps-").count(), 2, "{keys}");
    let spec = std::fs::read_to_string(project.src().join("buildspec.yml")).expect("read");
    project.write(
        "buildspec.yml",
        &spec.replace("    - deps/**/*\n", "    - deps/**/*\n    - more/**/*\n"),
    );
    transcripts.push(project.run(&[]).transcript()); // other paths: a different cache
    let text = tests::normalize_digests(&transcripts.join("\n----\n"));
    let text: String = text
        .lines()
        .filter(|l| l.starts_with("note: cache") || l.starts_with("| ") || l.starts_with("result"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = tests::normalize_durations(&text.replace(" ms", "ms"));
    expect![[r#"
        note: cache miss for key `deps-2d27fbdf`: no entry yet for these paths
        result FAILED: BUILD: command `test "${FAIL:-no}" = no` exited with status 1
        note: cache miss for key `deps-2d27fbdf`: no entry yet for these paths
        note: cache saved: 1 files (15 bytes) under key `deps-2d27fbdf` in <T>
        result SUCCEEDED
        note: cache hit: restored 1 files (15 bytes) from key `deps-2d27fbdf` in <T>
        | restored=fetched-for-v1
        note: cache not saved: an entry for key `deps-2d27fbdf` already exists, and entries never change (put a hash of your lock files in the key)
        result SUCCEEDED
        note: cache hit: restored 1 files (15 bytes) from key `deps-2d27fbdf` in <T>
        | restored=fetched-for-v1
        note: cache saved: 1 files (15 bytes) under key `deps-81db67b6` in <T>
        result SUCCEEDED
        note: cache miss for key `deps-81db67b6`: the entry for this key was saved with other paths (deps/**/*); the cache version includes the set of paths
        note: cache saved: 1 files (15 bytes) under key `deps-81db67b6` in <T>
        result SUCCEEDED"#]].assert_eq(&text);
}

#[test]
fn cache_paths_outside_the_workspace_are_restored() {
    let outside = tests::TempDir::new("cache-outside");
    let target = outside.path().join("m2");
    let spec = format!(
        "version: 0.2\nphases:\n  build:\n    commands:\n      - ls {dir} 2>/dev/null || (mkdir -p {dir} && echo jar > {dir}/lib.jar)\ncache:\n  key: m2\n  paths:\n    - '{dir}/**/*'\n",
        dir = target.display()
    );
    // With `host` the build's file system is this machine's, so the test can look; the other
    // sandboxes have their own tests (sandbox_namespace.rs).
    let project = Project::new(&[("buildspec.yml", &spec)]);
    assert_eq!(project.run(&["--sandbox", "host"]).code, 0);
    std::fs::remove_dir_all(&target).expect("remove");
    let run = project.run(&["--sandbox", "host"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.stdout.contains("cache hit"), "{}", run.stdout);
    assert_eq!(
        std::fs::read_to_string(target.join("lib.jar")).expect("restored"),
        "jar\n"
    );
}

#[test]
fn a_build_that_times_out_after_its_phases_saves_no_cache() {
    // The artifact name is evaluated after the cache is staged and takes past the timeout.
    let project = Project::new(&[(
        "buildspec.yml",
        "version: 0.2\nphases:\n  build:\n    commands:\n      - mkdir -p deps && echo x > deps/x\nartifacts:\n  name: n$(sleep 30)\n  files:\n    - deps/x\ncache:\n  key: late\n  paths:\n    - 'deps/**/*'\n",
    )]);
    let run = project.run(&["--sandbox", "host", "--timeout", "3s"]);
    assert_eq!(run.code, 1, "{}", run.transcript());
    assert!(!run.stdout.contains("cache saved"), "{}", run.transcript());
    assert!(
        run.transcript().contains("TIMED_OUT"),
        "{}",
        run.transcript()
    );
}

/// The backend conformance build (the one every shell sandbox runs) on `host`.
#[test]
fn the_backend_conformance_build_runs_on_the_host() {
    let (transcript, copied) = tests::backend_conformance(&["--sandbox", "host"]);
    assert_eq!(
        transcript,
        tests::backend_conformance_transcript("host", "host", false)
    );
    assert_eq!(copied, "made inside\n");
}
