//! Buildspec parser tests: accepted files as a compact model dump, refused files as the error a
//! user sees, and robustness against arbitrary input.

use expect_test::{Expect, expect};
use protocol::buildspec::{ParseError, parse};

/// Test texts start with a newline so that they line up in the source; it is not part of them.
fn text(yaml: &str) -> &str {
    yaml.strip_prefix('\n').unwrap_or(yaml)
}

fn check_ok(yaml: &str, expect: Expect) {
    let actual = match parse("buildspec.yml", text(yaml)) {
        Ok(buildspec) => compact(&format!("{buildspec:#?}")),
        Err(error) => format!("unexpected error: {error}"),
    };
    expect.assert_eq(&actual);
}

fn check_err(yaml: &str, expect: Expect) {
    let yaml = text(yaml);
    let actual = match parse("buildspec.yml", yaml) {
        Ok(buildspec) => format!("unexpectedly accepted: {buildspec:?}"),
        Err(error) => {
            assert_inside(yaml, &error);
            // The trailing newline keeps every snapshot in the multi-line form, the only one that
            // rustfmt leaves where `UPDATE_EXPECT=1` can find it again.
            format!("{error}\n")
        }
    };
    expect.assert_eq(&actual);
}

/// The pretty Debug output without the fields left at their defaults, and with short groups
/// such as `Some("x")` on one line.
fn compact(debug: &str) -> String {
    let defaults = [": None,", ": [],", ": false,", ": Default,"];
    let lines: Vec<&str> = debug
        .lines()
        .filter(|line| !defaults.iter().any(|default| line.ends_with(default)))
        .collect();
    let mut out = vec![];
    let mut index = 0;
    while index < lines.len() {
        match short_group(&lines[index..]) {
            Some((joined, used)) => {
                out.push(joined);
                index += used;
            }
            None => {
                out.push(lines[index].to_owned());
                index += 1;
            }
        }
    }
    out.join("\n")
}

/// The group opened by `lines[0]` on one line, and how many lines it used, when it holds at most
/// three values and no nested group.
fn short_group(lines: &[&str]) -> Option<(String, usize)> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let opens = |line: &str| line.ends_with(['(', '[', '{']);
    let first = lines.first().filter(|line| opens(line))?;
    let end = lines
        .iter()
        .skip(1)
        .position(|line| opens(line) || indent(line) <= indent(first))?
        + 1;
    let close = lines[end];
    if opens(close) || indent(close) != indent(first) || end > 4 {
        return None;
    }
    let items: Vec<&str> = lines[1..end]
        .iter()
        .map(|line| line.trim().trim_end_matches(','))
        .collect();
    let joined = if first.ends_with('{') && !items.is_empty() {
        format!("{first} {} {}", items.join(", "), close.trim())
    } else {
        format!("{first}{}{}", items.join(", "), close.trim())
    };
    Some((joined, end + 1))
}

/// An error's position is a place an editor can jump to.
fn assert_inside(text: &str, error: &ParseError) {
    let lines: Vec<&str> = text.lines().collect();
    let count = lines.len().max(1);
    assert!(
        (1..=count).contains(&error.line),
        "line {} outside 1..={count} for {error}\n---\n{text}",
        error.line
    );
    let width = lines
        .get(error.line - 1)
        .map_or(0, |line| line.chars().count());
    assert!(
        (1..=width + 1).contains(&error.column),
        "column {} outside 1..={} for {error}\n---\n{text}",
        error.column,
        width + 1
    );
}

const KITCHEN_SINK: &str = r#"
version: 0.2
run-as: builder
env:
  shell: bash
  variables:
    JAVA_HOME: /usr/lib/jvm/java-17
    PATH_EXTRA: $PATH:/opt/bin
    RETRIES: 3
    VERBOSE: yes
  parameter-store:
    DB_PASSWORD: /prod/db/password
  secrets-manager:
    TOKEN: arn:aws:secretsmanager:eu-west-1:123456789012:secret:api-AbCdEf:token:AWSCURRENT
    WHOLE: plain-secret
  exported-variables:
    - JAVA_HOME
    - BUILD_TAG
  git-credential-helper: yes
proxy:
  upload-artifacts: no
  logs: TRUE
batch:
  fast-fail: true
  build-graph:
    - identifier: lint
      env:
        compute-type: BUILD_GENERAL1_SMALL
    - identifier: test_linux
      buildspec: ci/test.yml
      depend-on:
        - lint
      ignore-failure: true
      debug-session: no
      env:
        variables:
          TARGET: linux
        image: aws/codebuild/standard:7.0
        type: LINUX_CONTAINER
        privileged-mode: false
        fleet: my-fleet
phases:
  install:
    run-as: root
    runtime-versions:
      python: 3.10
      nodejs: 18.x
      java: corretto17
      golang: $GO_VERSION
    commands:
      - pip install -r requirements.txt
    finally:
      - echo installed
  pre_build:
    on-failure: CONTINUE
    commands:
      - 'echo "logging in: now"'
  build:
    on-failure: RETRY-2-timed out.*
    commands:
      - make build
      - |
        for f in *.txt; do
          echo "$f"
        done
  post_build:
    on-failure: ABORT
    commands:
      - make package
reports:
  unit:
    files:
      - 'build/test-results/**/*.xml'
    base-directory: build
    discard-paths: yes
    file-format: junitxml
  coverage:
    files: coverage.xml
    file-format: COBERTURAXML
artifacts:
  files:
    - '**/*'
  name: app-$(date +%F)
  discard-paths: no
  base-directory: dist
  exclude-paths:
    - '**/*.map'
  enable-symlinks: yes
  s3-prefix: builds/
  secondary-artifacts:
    docs:
      files:
        - '**/*'
      base-directory: site
cache:
  key: deps-$(codebuild-hash-files package-lock.json)
  fallback-keys:
    - deps-
  action: restore
  paths:
    - node_modules/**/*
peerbuild:
  sandbox: namespace
  image: debian:bookworm
  network: false
  phases:
    post_build:
      placement: separate
      network: true
    install:
      sandbox: docker
      image: python:3.10
"#;

#[test]
fn kitchen_sink() {
    check_ok(
        KITCHEN_SINK,
        expect![[r#"
        Buildspec {
            version: V0_2,
            run_as: Some("builder"),
            env: Env {
                shell: Bash,
                variables: [
                    ("JAVA_HOME", "/usr/lib/jvm/java-17"),
                    ("PATH_EXTRA", "$PATH:/opt/bin"),
                    ("RETRIES", "3"),
                    ("VERBOSE", "yes"),
                ],
                parameter_store: [
                    ("DB_PASSWORD", "/prod/db/password"),
                ],
                secrets_manager: [
                    (
                        "TOKEN",
                        SecretRef {
                            secret_id: "arn:aws:secretsmanager:eu-west-1:123456789012:secret:api-AbCdEf",
                            json_key: Some("token"),
                            version_stage: Some("AWSCURRENT"),
                        },
                    ),
                    (
                        "WHOLE",
                        SecretRef { secret_id: "plain-secret" },
                    ),
                ],
                exported_variables: ["JAVA_HOME", "BUILD_TAG"],
                git_credential_helper: true,
            },
            proxy: Proxy { logs: true },
            batch: Some(
                Batch {
                    fast_fail: true,
                    kind: Graph(
                        [
                            BatchMember {
                                identifier: "lint",
                                env: MemberEnv {
                                    compute_type: Some("BUILD_GENERAL1_SMALL"),
                                },
                            },
                            BatchMember {
                                identifier: "test_linux",
                                buildspec: Some("ci/test.yml"),
                                ignore_failure: true,
                                env: MemberEnv {
                                    variables: [
                                        ("TARGET", "linux"),
                                    ],
                                    image: Some("aws/codebuild/standard:7.0"),
                                    type: Some("LINUX_CONTAINER"),
                                    fleet: Some("my-fleet"),
                                },
                                depend_on: ["lint"],
                            },
                        ],
                    ),
                },
            ),
            phases: Phases {
                install: Some(
                    Phase {
                        run_as: Some("root"),
                        runtime_versions: [
                            ("python", "3.10"),
                            ("nodejs", "18.x"),
                            ("java", "corretto17"),
                            ("golang", "$GO_VERSION"),
                        ],
                        commands: ["pip install -r requirements.txt"],
                        finally: ["echo installed"],
                    },
                ),
                pre_build: Some(
                    Phase {
                        on_failure: Continue,
                        commands: ["echo \"logging in: now\""],
                    },
                ),
                build: Some(
                    Phase {
                        on_failure: Retry {
                            count: 2,
                            pattern: Some("timed out.*"),
                        },
                        commands: ["make build", "for f in *.txt; do\n  echo \"$f\"\ndone\n"],
                    },
                ),
                post_build: Some(
                    Phase {
                        on_failure: Abort,
                        commands: ["make package"],
                    },
                ),
            },
            reports: [
                (
                    "unit",
                    Report {
                        files: ["build/test-results/**/*.xml"],
                        base_directory: Some("build"),
                        discard_paths: true,
                        file_format: JunitXml,
                    },
                ),
                (
                    "coverage",
                    Report {
                        files: ["coverage.xml"],
                        file_format: CoberturaXml,
                    },
                ),
            ],
            artifacts: Some(
                Artifacts {
                    primary: Some(
                        ArtifactSet {
                            files: ["**/*"],
                            name: Some("app-$(date +%F)"),
                            base_directory: Some("dist"),
                            exclude_paths: ["**/*.map"],
                            enable_symlinks: true,
                            s3_prefix: Some("builds/"),
                        },
                    ),
                    secondary: [
                        (
                            "docs",
                            ArtifactSet {
                                files: ["**/*"],
                                base_directory: Some("site"),
                            },
                        ),
                    ],
                },
            ),
            cache: Some(
                Cache {
                    key: Some("deps-$(codebuild-hash-files package-lock.json)"),
                    fallback_keys: ["deps-"],
                    action: Restore,
                    paths: ["node_modules/**/*"],
                },
            ),
            peerbuild: Extension {
                sandbox: Some(Namespace),
                image: Some("debian:bookworm"),
                network: Some(false),
                phases: [
                    (
                        Install,
                        PhaseExtension {
                            sandbox: Some(Docker),
                            image: Some("python:3.10"),
                            placement: Session,
                        },
                    ),
                    (
                        PostBuild,
                        PhaseExtension {
                            network: Some(true),
                            placement: Separate,
                        },
                    ),
                ],
            },
        }"#]],
    );
}

#[test]
fn minimal_version_0_1() {
    check_ok(
        r#"
version: 0.1
phases:
  build:
    commands:
      - echo hello
"#,
        expect![[r#"
            Buildspec {
                version: V0_1,
                env: Env { shell: Bash },
                proxy: Proxy {},
                phases: Phases {
                    build: Some(
                        Phase {
                            commands: ["echo hello"],
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn quoted_version_booleans_and_single_globs() {
    check_ok(
        r#"
version: "0.2"
env:
  shell: /bin/sh
  git-credential-helper: "Yes"
  variables:
    EMPTY: ""
    FLOAT: 1.50
    TILDE: "~"
phases:
  build:
    commands: []
artifacts:
  files: '**/*'
  discard-paths: False
cache:
  paths: /root/.m2/**/*
  fallback-keys:
    - maven-
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env {
                    shell: Sh,
                    variables: [
                        ("EMPTY", ""),
                        ("FLOAT", "1.50"),
                        ("TILDE", "~"),
                    ],
                    git_credential_helper: true,
                },
                proxy: Proxy {},
                phases: Phases {
                    build: Some(
                        Phase {},
                    ),
                },
                artifacts: Some(
                    Artifacts {
                        primary: Some(
                            ArtifactSet {
                                files: ["**/*"],
                            },
                        ),
                    },
                ),
                cache: Some(
                    Cache {
                        fallback_keys: ["maven-"],
                        action: RestoreAndSave,
                        paths: ["/root/.m2/**/*"],
                    },
                ),
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn anchors_and_empty_sections() {
    check_ok(
        r#"
version: 0.2
phases:
  install:
  pre_build:
    commands: &setup
      - ./setup.sh
      - ./check.sh
  build:
    commands: *setup
    finally:
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                phases: Phases {
                    install: Some(
                        Phase {},
                    ),
                    pre_build: Some(
                        Phase {
                            commands: ["./setup.sh", "./check.sh"],
                        },
                    ),
                    build: Some(
                        Phase {
                            commands: ["./setup.sh", "./check.sh"],
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn on_failure_forms() {
    check_ok(
        r#"
version: 0.2
phases:
  install:
    on-failure: RETRY
  pre_build:
    on-failure: RETRY-5
  build:
    on-failure: RETRY-(?i)connection reset
  post_build:
    on-failure: RETRY-0-oops
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                phases: Phases {
                    install: Some(
                        Phase {
                            on_failure: Retry { count: 3 },
                        },
                    ),
                    pre_build: Some(
                        Phase {
                            on_failure: Retry { count: 5 },
                        },
                    ),
                    build: Some(
                        Phase {
                            on_failure: Retry {
                                count: 3,
                                pattern: Some("(?i)connection reset"),
                            },
                        },
                    ),
                    post_build: Some(
                        Phase {
                            on_failure: Retry {
                                count: 0,
                                pattern: Some("oops"),
                            },
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn batch_without_phases() {
    check_ok(
        r#"
version: 0.2
batch:
  build-list:
    - identifier: amd64
      buildspec: ci/amd64.yml
    - identifier: arm64
      buildspec: ci/arm64.yml
      ignore-failure: yes
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                batch: Some(
                    Batch {
                        kind: List(
                            [
                                BatchMember {
                                    identifier: "amd64",
                                    buildspec: Some("ci/amd64.yml"),
                                    env: MemberEnv {},
                                },
                                BatchMember {
                                    identifier: "arm64",
                                    buildspec: Some("ci/arm64.yml"),
                                    ignore_failure: true,
                                    env: MemberEnv {},
                                },
                            ],
                        ),
                    },
                ),
                phases: Phases {},
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn build_matrix() {
    check_ok(
        r#"
version: 0.2
batch:
  build-matrix:
    static:
      ignore-failure: true
      env:
        privileged-mode: false
    dynamic:
      buildspec:
        - ci/a.yml
        - ci/b.yml
      env:
        image: aws/codebuild/standard:7.0
        compute-type:
          - BUILD_GENERAL1_SMALL
          - BUILD_GENERAL1_LARGE
        variables:
          NODE: [18, 20, 22]
          MODE: release
phases:
  build:
    commands:
      - npm test
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                batch: Some(
                    Batch {
                        kind: Matrix(
                            Matrix {
                                static_ignore_failure: true,
                                static_env: MemberEnv {},
                                buildspecs: ["ci/a.yml", "ci/b.yml"],
                                images: ["aws/codebuild/standard:7.0"],
                                compute_types: ["BUILD_GENERAL1_SMALL", "BUILD_GENERAL1_LARGE"],
                                variables: [
                                    (
                                        "NODE",
                                        ["18", "20", "22"],
                                    ),
                                    (
                                        "MODE",
                                        ["release"],
                                    ),
                                ],
                            },
                        ),
                    },
                ),
                phases: Phases {
                    build: Some(
                        Phase {
                            commands: ["npm test"],
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn build_fanout() {
    check_ok(
        r#"
version: 0.2
batch:
  fast-fail: false
  build-fanout:
    parallelism: 5
    ignore-failure: false
phases:
  build:
    commands:
      - codebuild-tests-run --test-command 'pytest' --files-search "codebuild-glob-search 'tests/*.py'"
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                batch: Some(
                    Batch {
                        kind: Fanout(
                            Fanout { parallelism: 5 },
                        ),
                    },
                ),
                phases: Phases {
                    build: Some(
                        Phase {
                            commands: ["codebuild-tests-run --test-command 'pytest' --files-search \"codebuild-glob-search 'tests/*.py'\""],
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn only_secondary_artifacts() {
    check_ok(
        r#"
version: 0.2
phases:
  build:
    commands:
      - make
artifacts:
  secondary-artifacts:
    bin:
      files:
        - 'bin/*'
    docs:
      files: 'docs/**/*'
      name: docs
"#,
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                phases: Phases {
                    build: Some(
                        Phase {
                            commands: ["make"],
                        },
                    ),
                },
                artifacts: Some(
                    Artifacts {
                        secondary: [
                            (
                                "bin",
                                ArtifactSet {
                                    files: ["bin/*"],
                                },
                            ),
                            (
                                "docs",
                                ArtifactSet {
                                    files: ["docs/**/*"],
                                    name: Some("docs"),
                                },
                            ),
                        ],
                    },
                ),
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn windows_line_endings_and_byte_order_mark() {
    check_ok(
        "\u{feff}version: 0.2\r\nphases:\r\n  build:\r\n    commands:\r\n      - make\r\n",
        expect![[r#"
            Buildspec {
                version: V0_2,
                env: Env { shell: Bash },
                proxy: Proxy {},
                phases: Phases {
                    build: Some(
                        Phase {
                            commands: ["make"],
                        },
                    ),
                },
                peerbuild: Extension {},
            }"#]],
    );
}

#[test]
fn bad_yaml_syntax() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands:
      - "echo unterminated
"#,
        expect![[r#"
            buildspec.yml:5:9: invalid YAML: while scanning a quoted scalar, found unexpected end of stream
        "#]],
    );
}

#[test]
fn unquoted_colon_in_value() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: echo a: b: c
"#,
        expect![[r#"
            buildspec.yml:4:21: invalid YAML: mapping values are not allowed in this context
              hint: a `: ` inside a value starts a mapping; put the whole value in quotes
        "#]],
    );
}

#[test]
fn tab_indentation() {
    check_err(
        "version: 0.2\nphases:\n\tbuild:\n\t\tcommands:\n\t\t\t- make\n",
        expect![[r#"
            buildspec.yml:3:2: invalid YAML: tabs disallowed within this context (block indentation)
              hint: indent with spaces; YAML does not allow tabs for indentation
        "#]],
    );
}

#[test]
fn empty_file() {
    check_err(
        "",
        expect![[r#"
            buildspec.yml:1:1: the file is empty; a buildspec needs at least `version` and `phases`
        "#]],
    );
    check_err(
        "# just a comment\n\n",
        expect![[r#"
            buildspec.yml:1:1: the file is empty; a buildspec needs at least `version` and `phases`
        "#]],
    );
    check_err(
        "---\n",
        expect![[r#"
            buildspec.yml:1:1: the file is empty; a buildspec needs at least `version` and `phases`
        "#]],
    );
}

#[test]
fn not_a_mapping() {
    check_err(
        "- version: 0.2\n",
        expect![[r#"
            buildspec.yml:1:1: expected a mapping (`key: value` lines), found a list
        "#]],
    );
}

#[test]
fn missing_version() {
    check_err(
        r#"
phases:
  build:
    commands:
      - make
"#,
        expect![[r#"
            buildspec.yml:1:1: version: required key is missing; write `version: 0.2` at the top
        "#]],
    );
}

#[test]
fn bad_version() {
    check_err(
        r#"
version: 1.0
phases:
  build:
    commands:
      - make
"#,
        expect![[r#"
            buildspec.yml:1:10: version: unsupported version `1.0`; expected 0.1 or 0.2
        "#]],
    );
}

#[test]
fn missing_phases() {
    check_err(
        "version: 0.2\nenv:\n  shell: bash\n",
        expect![[r#"
            buildspec.yml:1:1: phases: required key is missing; a buildspec needs at least one of install, pre_build, build, post_build unless it has a `batch` section
        "#]],
    );
    check_err(
        "version: 0.2\nphases: {}\n",
        expect![[r#"
            buildspec.yml:2:1: phases: no phase given; expected at least one of install, pre_build, build, post_build
        "#]],
    );
}

#[test]
fn misspelt_top_level_key() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands:
      - make
artifact:
  files:
    - '**/*'
"#,
        expect![[r#"
            buildspec.yml:6:1: artifact: unknown key; expected one of version, run-as, env, proxy, batch, phases, reports, artifacts, cache, peerbuild
              hint: did you mean `artifacts`?
        "#]],
    );
}

#[test]
fn misspelt_phase_name() {
    check_err(
        r#"
version: 0.2
phases:
  install:
    commands:
      - make deps
  biuld:
    commands:
      - make
"#,
        expect![[r#"
            buildspec.yml:6:3: phases.biuld: unknown key; expected one of install, pre_build, build, post_build
              hint: did you mean `build`?
        "#]],
    );
}

#[test]
fn dashed_phase_name() {
    check_err(
        r#"
version: 0.2
phases:
  pre-build:
    commands:
      - make
"#,
        expect![[r#"
            buildspec.yml:3:3: phases.pre-build: unknown key; expected one of install, pre_build, build, post_build
              hint: did you mean `pre_build`?
        "#]],
    );
}

#[test]
fn run_as_without_dash() {
    check_err(
        r#"
version: 0.2
runas: builder
phases:
  build:
    commands:
      - make
"#,
        expect![[r#"
            buildspec.yml:2:1: runas: unknown key; expected one of version, run-as, env, proxy, batch, phases, reports, artifacts, cache, peerbuild
              hint: did you mean `run-as`?
        "#]],
    );
}

#[test]
fn phase_outside_phases() {
    check_err(
        r#"
version: 0.2
build:
  commands:
    - make
"#,
        expect![[r#"
            buildspec.yml:2:1: build: unknown key; expected one of version, run-as, env, proxy, batch, phases, reports, artifacts, cache, peerbuild
              hint: `build` is a phase; put it under `phases:`
        "#]],
    );
}

#[test]
fn commands_not_a_list() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: make all
"#,
        expect![[r#"
            buildspec.yml:4:15: phases.build.commands: expected a list of commands (strings), found `make all`
              hint: write each item on its own line, starting with `- `
        "#]],
    );
}

#[test]
fn command_read_as_mapping() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands:
      - make
      - echo key: value
"#,
        expect![[r#"
            buildspec.yml:6:9: phases.build.commands[1]: expected a command (a string), found a mapping
              hint: YAML read `echo key: value` as a mapping because of the `: `; put the whole command in quotes
        "#]],
    );
}

#[test]
fn command_list_nested() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands:
      - - make
"#,
        expect![[r#"
            buildspec.yml:5:9: phases.build.commands[0]: expected a command (a string), found a list
        "#]],
    );
}

#[test]
fn duplicate_key() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands:
      - make
  post_build:
    commands:
      - make package
  build:
    commands:
      - make again
"#,
        expect![[r#"
            buildspec.yml:9:3: phases.build: duplicate key `build` (lines 3 and 9); each key may appear once
        "#]],
    );
}

#[test]
fn non_scalar_key() {
    check_err(
        r#"
version: 0.2
phases:
  ? [build]
  : commands: [make]
"#,
        expect![[r#"
            buildspec.yml:3:5: phases: a mapping key must be a plain value, not a list or a mapping
        "#]],
    );
}

#[test]
fn two_documents() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
---
version: 0.2
"#,
        expect![[r#"
            buildspec.yml:5:1: the file holds more than one YAML document; a buildspec is a single document
              hint: remove the `---` line that starts the second document
        "#]],
    );
}

#[test]
fn reserved_variable() {
    check_err(
        r#"
version: 0.2
env:
  variables:
    CODEBUILD_SRC_DIR: /tmp
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:5: env.variables.CODEBUILD_SRC_DIR: `CODEBUILD_SRC_DIR` is reserved: names starting with `CODEBUILD_` are set by the build itself
        "#]],
    );
}

#[test]
fn invalid_variable_name() {
    check_err(
        r#"
version: 0.2
env:
  variables:
    MY-VAR: 1
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:5: env.variables.MY-VAR: `MY-VAR` is not a valid variable name; a name is letters, digits and `_`, and does not start with a digit
              hint: write `MY_VAR`
        "#]],
    );
}

#[test]
fn variable_without_value() {
    check_err(
        r#"
version: 0.2
env:
  variables:
    LIST: [a, b]
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:11: env.variables.LIST: expected a single value (a string, number or boolean), found a list
        "#]],
    );
}

#[test]
fn name_in_two_sources() {
    check_err(
        r#"
version: 0.2
env:
  variables:
    TOKEN: plain
  secrets-manager:
    TOKEN: my-secret:token
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:6:5: env.secrets-manager.TOKEN: `TOKEN` is also set in env.variables (line 4); a name may appear in only one of variables, parameter-store and secrets-manager
        "#]],
    );
}

#[test]
fn exporting_a_secret() {
    check_err(
        r#"
version: 0.2
env:
  parameter-store:
    DB_PASSWORD: /prod/db
  exported-variables:
    - DB_PASSWORD
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:6:7: env.exported-variables[0]: `DB_PASSWORD` is a secret (env.parameter-store); secrets cannot be exported
        "#]],
    );
}

#[test]
fn exporting_aws_variable() {
    check_err(
        r#"
version: 0.2
env:
  exported-variables:
    - AWS_REGION
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:7: env.exported-variables[0]: `AWS_REGION` cannot be exported: names starting with `AWS_` are reserved
        "#]],
    );
}

#[test]
fn bad_secret_arn() {
    check_err(
        r#"
version: 0.2
env:
  secrets-manager:
    TOKEN: arn:aws:secretsmanager:eu-west-1
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:12: env.secrets-manager.TOKEN: a secret ARN has 7 `:`-separated parts (arn:aws:secretsmanager:region:account:secret:name)
        "#]],
    );
}

#[test]
fn bad_shell() {
    check_err(
        r#"
version: 0.2
env:
  shell: /bin/bash
phases:
  build:
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:3:10: env.shell: `/bin/bash` is not allowed; expected bash or /bin/sh
              hint: CodeBuild names bash without its path: write `shell: bash`
        "#]],
    );
}

#[test]
fn bad_on_failure() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    on-failure: STOP
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:17: phases.build.on-failure: `STOP` is not allowed; expected one of ABORT, CONTINUE, RETRY, RETRY-<count>, RETRY-<regex>, RETRY-<count>-<regex>
        "#]],
    );
    check_err(
        r#"
version: 0.2
phases:
  build:
    on-failure: retry-2
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:17: phases.build.on-failure: `retry-2` is not allowed; expected one of ABORT, CONTINUE, RETRY, RETRY-<count>, RETRY-<regex>, RETRY-<count>-<regex>
              hint: the word is written in capitals: `RETRY-2`
        "#]],
    );
}

#[test]
fn retry_count_over_limit() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    on-failure: RETRY-101
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:17: phases.build.on-failure: retry count 101 is over the limit of 100
        "#]],
    );
}

#[test]
fn bad_retry_pattern() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    on-failure: RETRY-3-(unclosed
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:17: phases.build.on-failure: the retry pattern `(unclosed` is not a valid regular expression: unclosed group
        "#]],
    );
}

#[test]
fn runtime_versions_outside_install() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    runtime-versions:
      python: 3.12
    commands: [make]
"#,
        expect![[r#"
            buildspec.yml:4:5: phases.build.runtime-versions: `runtime-versions` is allowed only in the install phase
              hint: move it under `phases: install:`
        "#]],
    );
}

#[test]
fn bad_boolean() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
artifacts:
  files: ['**/*']
  discard-paths: maybe
"#,
        expect![[r#"
            buildspec.yml:7:18: artifacts.discard-paths: expected yes/no or true/false, found `maybe`
        "#]],
    );
}

#[test]
fn artifacts_without_files() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
artifacts:
  name: app
"#,
        expect![[r#"
            buildspec.yml:5:1: artifacts.files: required key is missing; an artifact needs globs such as `- '**/*'`
        "#]],
    );
}

#[test]
fn nested_secondary_artifacts() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
artifacts:
  secondary-artifacts:
    bin:
      files: ['bin/*']
      secondary-artifacts:
        more:
          files: ['x']
"#,
        expect![[r#"
            buildspec.yml:9:7: artifacts.secondary-artifacts.bin.secondary-artifacts: secondary artifacts cannot be nested; list each one directly under `artifacts.secondary-artifacts`
        "#]],
    );
}

#[test]
fn two_batch_kinds() {
    check_err(
        r#"
version: 0.2
batch:
  build-list:
    - identifier: a
  build-graph:
    - identifier: b
"#,
        expect![[r#"
            buildspec.yml:5:3: batch.build-graph: only one of build-list, build-graph, build-matrix, build-fanout may be used; `build-list` is already given on line 3
        "#]],
    );
}

#[test]
fn batch_without_kind() {
    check_err(
        "version: 0.2\nbatch:\n  fast-fail: true\n",
        expect![[r#"
            buildspec.yml:2:1: batch: a batch needs one of build-list, build-graph, build-matrix, build-fanout
        "#]],
    );
}

#[test]
fn depend_on_in_build_list() {
    check_err(
        r#"
version: 0.2
batch:
  build-list:
    - identifier: a
    - identifier: b
      depend-on:
        - a
"#,
        expect![[r#"
            buildspec.yml:6:7: batch.build-list[1].depend-on: `depend-on` is allowed only in build-graph
              hint: use `build-graph` instead of `build-list` for members that wait
        "#]],
    );
}

#[test]
fn unknown_dependency() {
    check_err(
        r#"
version: 0.2
batch:
  build-graph:
    - identifier: build_linux
    - identifier: test_linux
      depend-on:
        - build_linux
        - build_linx
"#,
        expect![[r#"
            buildspec.yml:8:11: batch.build-graph[1].depend-on[1]: unknown member `build_linx`; expected one of build_linux, test_linux
              hint: did you mean `build_linux`?
        "#]],
    );
}

#[test]
fn self_dependency() {
    check_err(
        r#"
version: 0.2
batch:
  build-graph:
    - identifier: a
      depend-on: [a]
"#,
        expect![[r#"
            buildspec.yml:5:19: batch.build-graph[0].depend-on[0]: member `a` cannot depend on itself
        "#]],
    );
}

#[test]
fn dependency_cycle() {
    check_err(
        r#"
version: 0.2
batch:
  build-graph:
    - identifier: first
    - identifier: a
      depend-on: [first, c]
    - identifier: b
      depend-on: [a]
    - identifier: c
      depend-on: [b]
"#,
        expect![[r#"
            buildspec.yml:6:26: batch.build-graph[1].depend-on[1]: dependency cycle: a -> c -> b -> a (each member waits for the next)
        "#]],
    );
}

#[test]
fn duplicate_identifier() {
    check_err(
        r#"
version: 0.2
batch:
  build-list:
    - identifier: linux
    - identifier: windows
    - identifier: linux
"#,
        expect![[r#"
            buildspec.yml:6:19: batch.build-list[2].identifier: duplicate identifier `linux` (lines 4 and 6); each member needs its own
        "#]],
    );
}

#[test]
fn bad_identifier() {
    check_err(
        r#"
version: 0.2
batch:
  build-list:
    - identifier: linux-amd64
"#,
        expect![[r#"
            buildspec.yml:4:19: batch.build-list[0].identifier: `linux-amd64` is not a valid identifier; use letters, digits and `_`
        "#]],
    );
}

#[test]
fn fanout_parallelism_out_of_range() {
    check_err(
        r#"
version: 0.2
batch:
  build-fanout:
    parallelism: 0
"#,
        expect![[r#"
            buildspec.yml:4:18: batch.build-fanout.parallelism: expected a whole number from 1 to 100, found `0`
        "#]],
    );
}

#[test]
fn too_many_fallback_keys() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
cache:
  key: deps-v2
  fallback-keys:
    - a
    - b
    - c
    - d
    - e
    - f
  paths: ['node_modules/**/*']
"#,
        expect![[r#"
            buildspec.yml:13:7: cache.fallback-keys[5]: at most 5 fallback keys are allowed, found 6
        "#]],
    );
}

#[test]
fn bad_cache_action() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
cache:
  action: restor
  paths: ['x']
"#,
        expect![[r#"
            buildspec.yml:6:11: cache.action: `restor` is not allowed; expected one of restore, save
              hint: did you mean `restore`?
        "#]],
    );
}

#[test]
fn unknown_report_format() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
reports:
  unit:
    files: ['*.xml']
    file-format: JUNIT
"#,
        expect![[r#"
            buildspec.yml:8:18: reports.unit.file-format: `JUNIT` is not allowed; expected one of JUNITXML, CUCUMBERJSON, NUNITXML, NUNIT3XML, TESTNGXML, VISUALSTUDIOTRX, CLOVERXML, COBERTURAXML, JACOCOXML, SIMPLECOV
              hint: did you mean `JUNITXML`?
        "#]],
    );
}

#[test]
fn bad_sandbox_kind() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
peerbuild:
  sandbox: dokcer
"#,
        expect![[r#"
            buildspec.yml:6:12: peerbuild.sandbox: `dokcer` is not allowed; expected one of namespace, docker, wasm, host
              hint: did you mean `docker`?
        "#]],
    );
}

#[test]
fn bad_placement() {
    check_err(
        r#"
version: 0.2
phases:
  build:
    commands: [make]
peerbuild:
  phases:
    build:
      placement: elsewhere
"#,
        expect![[r#"
            buildspec.yml:8:18: peerbuild.phases.build.placement: `elsewhere` is not allowed; expected one of session, separate
        "#]],
    );
}

#[test]
fn billion_laughs() {
    let mut yaml = String::from("version: 0.2\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for level in 1..10 {
        let previous = format!("*a{}", level - 1);
        let items = [previous.as_str(); 10].join(", ");
        yaml.push_str(&format!("a{level}: &a{level} [{items}]\n"));
    }
    check_err(
        &yaml,
        expect![[r#"
            buildspec.yml:6:45: the file expands to more than 100000 YAML values (aliases included); a buildspec is far smaller
        "#]],
    );
}

#[test]
fn deep_nesting() {
    let yaml = format!(
        "version: 0.2\nphases: {}{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    check_err(
        &yaml,
        expect![[r#"
            buildspec.yml:2:264: invalid YAML: recursion limit exceeded
        "#]],
    );
}

#[test]
fn aliases_cannot_nest_past_the_depth_limit() {
    let deep = |inner: &str| format!("{}{inner}{}", "[".repeat(60), "]".repeat(60));
    let yaml = format!("version: 0.2\na: &a {}\nb: {}\n", deep("x"), deep("*a"));
    check_err(
        &yaml,
        expect![[r#"
        buildspec.yml:3:64: b[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]: the file nests values more than 100 levels deep
    "#]],
    );
}

/// A tiny xorshift generator: deterministic, so a failure replays with the printed seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % bound.max(1) as u64).unwrap_or(0)
    }
}

/// One random edit of `bytes`: YAML punctuation, any byte, a deletion or a repeated line.
fn mutate(bytes: &mut Vec<u8>, rng: &mut XorShift) {
    const PUNCTUATION: &[u8] = b":-[]{}&*!|>'\"#%@`,? \t\n\r";
    let at = rng.below(bytes.len());
    match rng.below(5) {
        0 => bytes.insert(at, PUNCTUATION[rng.below(PUNCTUATION.len())]),
        1 => {
            if at < bytes.len() {
                bytes[at] = PUNCTUATION[rng.below(PUNCTUATION.len())];
            }
        }
        2 => bytes.insert(at, (rng.next() & 0xff) as u8),
        3 => {
            let end = (at + rng.below(8)).min(bytes.len());
            bytes.drain(at..end);
        }
        _ => {
            let start = bytes[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let end = bytes[at..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |i| at + i);
            let line = bytes[start..end].to_vec();
            bytes.splice(at..at, line.into_iter().chain([b'\n']));
        }
    }
}

#[test]
fn random_yaml_like_text_never_panics() {
    const ALPHABET: &[u8] = b"ab01 :-[]{}&*!|>'\"#,?\n\n  ";
    for seed in 1..=300_u64 {
        let mut rng = XorShift(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let length = rng.below(200);
        let bytes: Vec<u8> = (0..length)
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect();
        let yaml = String::from_utf8_lossy(&bytes);
        if let Err(error) = parse("buildspec.yml", &yaml) {
            assert_inside(&yaml, &error);
        }
    }
}

#[test]
fn mutated_files_never_panic_and_errors_point_inside() {
    let valid = text(KITCHEN_SINK).as_bytes();
    for seed in 1..=600_u64 {
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut bytes = valid.to_vec();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut bytes, &mut rng);
        }
        let yaml = String::from_utf8_lossy(&bytes);
        if let Err(error) = parse("buildspec.yml", &yaml) {
            assert_inside(&yaml, &error);
            assert!(!error.message.is_empty(), "seed {seed}: empty message");
        }
    }
}

#[test]
fn secondary_artifact_identifiers_must_be_plain_names() {
    check_err(
        "version: 0.2\nphases:\n  build:\n    commands: [echo]\nartifacts:\n  secondary-artifacts:\n    ../escape:\n      files: [x]\n",
        expect![[r#"
            buildspec.yml:7:5: artifacts.secondary-artifacts.../escape: `../escape` is not a valid artifact identifier; use letters, digits and `_`
        "#]],
    );
}
