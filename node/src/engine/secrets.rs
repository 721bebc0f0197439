//! Secrets for `parameter-store` and `secrets-manager` entries, read from `--secrets FILE`: one
//! `NAME=VALUE` a line, NAME being the parameter path or the secret id. Values live only in memory
//! and in the build's environment; they are never written to disk or into the store.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use protocol::buildspec::{Buildspec, SecretRef};

/// The secrets a build may read.
#[derive(Default)]
pub struct SecretsFile {
    values: HashMap<String, String>,
}

impl std::fmt::Debug for SecretsFile {
    /// Never prints a value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsFile")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretsFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the secrets file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the secrets file {}", path.display()))
    }

    /// Every name and value, for handing the file to the peer that runs a build.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &String)> {
        self.values.iter()
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut values = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                // The line itself may be a secret: never echo it.
                bail!(
                    "line {}: expected NAME=VALUE (a parameter path or secret id, `=`, the value)",
                    index + 1
                );
            };
            values.insert(name.trim().to_owned(), value.to_owned());
        }
        Ok(SecretsFile { values })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

/// A secret resolved for a build: the variable it sets and its value.
pub struct Resolved {
    pub variables: Vec<(String, String)>,
    /// Every value to mask: each variable's value, and each whole secret text it came from.
    pub mask: Vec<String>,
}

/// The names (parameter paths, secret ids) the buildspec's secret entries read.
pub fn referenced(buildspec: &Buildspec) -> Vec<String> {
    let parameters = buildspec.env.parameter_store.iter().map(|(_, path)| path);
    let secrets = buildspec
        .env
        .secrets_manager
        .iter()
        .map(|(_, reference)| &reference.secret_id);
    parameters.chain(secrets).cloned().collect()
}

/// Resolves the buildspec's secret entries. A missing secret is an error that names the variable
/// and the parameter or secret, so the user knows which line of the secrets file to add.
pub fn resolve(buildspec: &Buildspec, secrets: &SecretsFile) -> Result<Resolved> {
    let mut resolved = Resolved {
        variables: Vec::new(),
        mask: Vec::new(),
    };
    for (variable, path) in &buildspec.env.parameter_store {
        let Some(value) = secrets.get(path) else {
            bail!(
                "env.parameter-store.{variable} reads the parameter `{path}`, which the secrets file does not hold; add a line `{path}=VALUE` to the file given with --secrets"
            );
        };
        resolved.mask.push(value.to_owned());
        resolved
            .variables
            .push((variable.clone(), value.to_owned()));
    }
    for (variable, reference) in &buildspec.env.secrets_manager {
        let value = secret_value(variable, reference, secrets, &mut resolved.mask)?;
        resolved.mask.push(value.clone());
        resolved.variables.push((variable.clone(), value));
    }
    Ok(resolved)
}

fn secret_value(
    variable: &str,
    reference: &SecretRef,
    secrets: &SecretsFile,
    mask: &mut Vec<String>,
) -> Result<String> {
    let id = &reference.secret_id;
    let Some(text) = secrets.get(id) else {
        bail!(
            "env.secrets-manager.{variable} reads the secret `{id}`, which the secrets file does not hold; add a line `{id}=VALUE` (for a secret with JSON keys, its JSON text) to the file given with --secrets"
        );
    };
    mask.push(text.to_owned());
    let Some(key) = &reference.json_key else {
        return Ok(text.to_owned());
    };
    let json: serde_json::Value = serde_json::from_str(text).map_err(|_| {
        anyhow::anyhow!(
            "env.secrets-manager.{variable} asks for the JSON key `{key}` of the secret `{id}`, but that secret is not JSON"
        )
    })?;
    match json.get(key) {
        Some(serde_json::Value::String(value)) => Ok(value.clone()),
        Some(other) => Ok(other.to_string()),
        None => bail!(
            "env.secrets-manager.{variable} asks for the JSON key `{key}`, which the secret `{id}` does not have"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buildspec(env: &str) -> Buildspec {
        let text = format!("version: 0.2\nenv:\n{env}\nphases:\n  build:\n    commands: [true]\n");
        protocol::buildspec::parse("buildspec.yml", &text).expect("valid buildspec")
    }

    #[test]
    fn resolves_parameters_and_json_keys() {
        let spec = buildspec(
            "  parameter-store:\n    TOKEN: /ci/token\n  secrets-manager:\n    DB_PASS: prod/db:password\n    RAW: prod/db",
        );
        let file = SecretsFile::parse(
            "# comment\n/ci/token=t0k3n\nprod/db={\"password\":\"pw\",\"port\":5432}\n",
        )
        .expect("parses");
        let resolved = resolve(&spec, &file).expect("resolves");
        let names: Vec<_> = resolved
            .variables
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            names,
            vec![
                "TOKEN=t0k3n",
                "DB_PASS=pw",
                "RAW={\"password\":\"pw\",\"port\":5432}"
            ]
        );
        assert!(resolved.mask.contains(&"pw".to_owned()));
    }

    #[test]
    fn missing_secret_says_what_to_add() {
        let spec = buildspec("  parameter-store:\n    TOKEN: /ci/token");
        let err = resolve(&spec, &SecretsFile::default())
            .err()
            .expect("fails");
        assert!(
            err.to_string().contains("add a line `/ci/token=VALUE`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_line_is_refused_without_echoing_it() {
        let err = SecretsFile::parse("supersecret\n").expect_err("fails");
        assert!(!format!("{err:#}").contains("supersecret"));
    }
}
