//! What this machine offers, found once at start-up (runtimes, sandbox guarantees) or read for
//! each heartbeat (load): the facts a heartbeat announces.

use std::path::PathBuf;
use std::time::Duration;

use protocol::wire::{Enforcement, Guarantees, Runtime, Sandbox};
use sandbox::{Executor, HelperCommand, HostExecutor, NamespaceConfig, NamespaceExecutor};

use crate::engine::runtimes;

/// Detects the runtimes this machine has, each probe bounded by a timeout so a hanging tool
/// cannot stall the node's start.
pub async fn detect_runtimes() -> Vec<Runtime> {
    let mut found = Vec::new();
    for name in runtimes::known_runtimes().split(", ") {
        let Some(command) = runtimes::probe_command(name) else {
            continue;
        };
        let probe = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(5), probe).await else {
            continue;
        };
        if !output.status.success() {
            continue;
        }
        if let Some(version) = runtimes::version_in(&String::from_utf8_lossy(&output.stdout)) {
            found.push(Runtime {
                name: name.to_owned(),
                version,
            });
        }
    }
    found
}

/// The sandbox backends this node can start, with what each enforces. The namespace backend
/// builds one sandbox as a probe (so this runs once, at start-up); a backend that cannot start
/// here is left out, not an error.
pub fn detect_sandboxes(data_dir: PathBuf) -> Vec<Sandbox> {
    let Ok(program) = std::env::current_exe() else {
        return Vec::new();
    };
    let helper = HelperCommand {
        program,
        args: vec!["__sandbox-helper".into()],
    };
    let mut found = vec![Sandbox {
        kind: "host".into(),
        guarantees: guarantees(HostExecutor::new(helper.clone()).capabilities()),
    }];
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = NamespaceConfig {
        root: None,
        masked: [Some(data_dir), home].into_iter().flatten().collect(),
        memory_limit_bytes: None,
        process_limit: Some(4096),
    };
    match NamespaceExecutor::new(helper, config) {
        Ok(executor) => found.push(Sandbox {
            kind: "namespace".into(),
            guarantees: guarantees(executor.capabilities()),
        }),
        Err(err) => tracing::info!(error = %err, "namespace sandbox unavailable on this node"),
    }
    found
}

fn guarantees(capabilities: sandbox::Capabilities) -> Guarantees {
    Guarantees {
        filesystem: enforcement(capabilities.filesystem),
        network: enforcement(capabilities.network),
        processes: enforcement(capabilities.processes),
        memory: enforcement(capabilities.memory),
        cpu: enforcement(capabilities.cpu),
        process_count: enforcement(capabilities.process_count),
        process_tree_kill: enforcement(capabilities.process_tree_kill),
    }
}

fn enforcement(value: sandbox::Enforcement) -> Enforcement {
    match value {
        sandbox::Enforcement::Enforced => Enforcement::Enforced,
        sandbox::Enforcement::BestEffort => Enforcement::BestEffort,
        sandbox::Enforcement::None => Enforcement::None,
    }
}

/// The one-minute load average in thousandths, from `/proc/loadavg` (0 where there is none).
pub fn load_milli() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| parse_load_milli(&text))
        .unwrap_or(0)
}

fn parse_load_milli(text: &str) -> Option<u32> {
    let first: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((first * 1000.0).clamp(0.0, u32::MAX as f64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_read_in_thousandths() {
        assert_eq!(parse_load_milli("1.52 0.80 0.40 2/345 6789\n"), Some(1520));
        assert_eq!(parse_load_milli(""), None);
    }
}
