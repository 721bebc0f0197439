//! `runtime-versions`: which runtimes this machine has and whether they match what the buildspec
//! asks for. On one machine a missing or different runtime is reported and the build goes on, as
//! CodeBuild does on images without runtime support; in a pool the same facts become placement
//! constraints.

/// A runtime peerbuild knows how to detect: its buildspec name and the shell command that prints
/// its version.
struct Probe {
    name: &'static str,
    command: &'static str,
}

const PROBES: &[Probe] = &[
    Probe {
        name: "python",
        command: "python3 --version 2>&1 || python --version 2>&1",
    },
    Probe {
        name: "nodejs",
        command: "node --version 2>&1",
    },
    Probe {
        name: "java",
        command: "java -version 2>&1",
    },
    Probe {
        name: "golang",
        command: "go version 2>&1",
    },
    Probe {
        name: "ruby",
        command: "ruby --version 2>&1",
    },
    Probe {
        name: "php",
        command: "php --version 2>&1",
    },
    Probe {
        name: "dotnet",
        command: "dotnet --version 2>&1",
    },
    Probe {
        name: "docker",
        command: "docker --version 2>&1",
    },
];

/// The shell command that prints `runtime`'s version, or `None` for a runtime peerbuild does not
/// know.
pub fn probe_command(runtime: &str) -> Option<&'static str> {
    PROBES.iter().find(|p| p.name == runtime).map(|p| p.command)
}

pub fn known_runtimes() -> String {
    PROBES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// The first version number in a probe's output (`Python 3.11.7` → `3.11.7`, `go1.21.3` →
/// `1.21.3`, `openjdk version "17.0.15"` → `17.0.15`).
pub fn version_in(output: &str) -> Option<String> {
    let start = output.find(|c: char| c.is_ascii_digit())?;
    let version: String = output[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Some(version.trim_end_matches('.').to_owned())
}

/// Whether `found` satisfies `wanted`: `latest` takes anything; `N.x` matches major N; `3.11`
/// matches `3.11.7` (whole components); Java-style names (`corretto17`, `openjdk11`) match by
/// their major version.
pub fn matches(wanted: &str, found: &str) -> bool {
    let wanted = wanted.trim();
    if wanted.eq_ignore_ascii_case("latest") {
        return true;
    }
    let wanted = wanted.trim_end_matches(".x").trim_end_matches(".X");
    let wanted = match wanted.find(|c: char| c.is_ascii_digit()) {
        Some(start) if start > 0 => &wanted[start..],
        _ => wanted,
    };
    let found: Vec<&str> = found.split('.').collect();
    let wanted: Vec<&str> = wanted.split('.').collect();
    // Java 8 reports itself as 1.8.
    let found = if found.first() == Some(&"1") && found.len() > 1 && wanted.first() != Some(&"1") {
        &found[1..]
    } else {
        &found[..]
    };
    wanted.len() <= found.len() && wanted.iter().zip(found).all(|(w, f)| w == f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_probe_output() {
        assert_eq!(version_in("Python 3.11.7").as_deref(), Some("3.11.7"));
        assert_eq!(
            version_in("go version go1.21.3 linux/amd64").as_deref(),
            Some("1.21.3")
        );
        assert_eq!(version_in("v20.20.2").as_deref(), Some("20.20.2"));
        assert_eq!(version_in("not found"), None);
    }

    #[test]
    fn requested_versions_match_as_codebuild_users_write_them() {
        assert!(matches("3.11", "3.11.7"));
        assert!(!matches("3.1", "3.11.7"));
        assert!(matches("20.x", "20.20.2"));
        assert!(!matches("18.x", "20.20.2"));
        assert!(matches("latest", "1.0"));
        assert!(matches("corretto17", "17.0.15"));
        assert!(matches("openjdk8", "1.8.0"));
    }
}
