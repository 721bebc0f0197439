//! The node owner's settings: `DATA_DIR/config.toml`. Everything here is the owner's decision
//! about what builds may do on this machine; a buildspec (which may come from anyone) can ask
//! for less, never for more.
//!
//! ```toml
//! [sandbox]
//! default = "namespace"                      # for builds that name no sandbox
//! allow = ["namespace", "docker", "wasm"]    # add "host" to run builds without isolation
//! privileged = false                         # docker privileged-mode
//! network = true                             # false: no build gets the network
//! ```
//!
//! A missing file means the defaults above. An unknown key or a wrong value is an error naming
//! the file, the line and the key: a typo in a security setting must never be ignored.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use protocol::buildspec::SandboxKind;
use serde::Deserialize;

/// The file's name in the data directory.
pub const FILE: &str = "config.toml";

/// The owner's settings, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where they were read from (for messages), or would have been.
    pub path: PathBuf,
    pub sandbox: SandboxSettings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSettings {
    pub default: SandboxKind,
    pub allow: Vec<SandboxKind>,
    pub privileged: bool,
    pub network: bool,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            default: SandboxKind::Namespace,
            allow: vec![
                SandboxKind::Namespace,
                SandboxKind::Docker,
                SandboxKind::Wasm,
            ],
            privileged: false,
            network: true,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    sandbox: SandboxFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SandboxFile {
    default: Option<String>,
    allow: Option<Vec<String>>,
    privileged: Option<bool>,
    network: Option<bool>,
}

impl Settings {
    /// Reads `DATA_DIR/config.toml`; the defaults when there is none.
    pub fn load(data_dir: &Path) -> Result<Settings> {
        let path = data_dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Settings {
                    path,
                    sandbox: SandboxSettings::default(),
                });
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        Self::parse(&path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Settings> {
        let file: File = toml::from_str(text)
            .map_err(|err| anyhow::anyhow!("{}: {}", path.display(), err.to_string().trim_end()))?;
        let defaults = SandboxSettings::default();
        let kind = |text: &str, key: &str| {
            SandboxKind::from_key(text).with_context(|| {
                format!(
                    "{}: sandbox.{key}: unknown sandbox `{text}`; expected namespace, docker, wasm or host",
                    path.display()
                )
            })
        };
        let allow = match &file.sandbox.allow {
            Some(list) => list
                .iter()
                .map(|k| kind(k, "allow"))
                .collect::<Result<Vec<_>>>()?,
            None => defaults.allow.clone(),
        };
        let default = match &file.sandbox.default {
            Some(text) => kind(text, "default")?,
            None if allow.contains(&defaults.default) => defaults.default,
            // An owner who allows only, say, docker means it for builds that name nothing too.
            None => match allow.first() {
                Some(first) => *first,
                None => bail!(
                    "{}: sandbox.allow is empty: no build could run; list at least one sandbox",
                    path.display()
                ),
            },
        };
        if !allow.contains(&default) {
            bail!(
                "{}: sandbox.default is `{}`, which sandbox.allow does not list",
                path.display(),
                default.key()
            );
        }
        Ok(Settings {
            path: path.to_owned(),
            sandbox: SandboxSettings {
                default,
                allow,
                privileged: file.sandbox.privileged.unwrap_or(defaults.privileged),
                network: file.sandbox.network.unwrap_or(defaults.network),
            },
        })
    }

    /// Refuses a sandbox the owner does not allow, saying how to allow it.
    pub fn check_allowed(&self, kind: SandboxKind) -> Result<(), String> {
        if self.sandbox.allow.contains(&kind) {
            return Ok(());
        }
        let allowed: Vec<&str> = self.sandbox.allow.iter().map(|k| k.key()).collect();
        let why = if kind == SandboxKind::Host {
            " (it runs builds with no isolation)"
        } else {
            ""
        };
        Err(format!(
            "the {} sandbox is not allowed on this node{why}; it allows {}. To allow it, add \"{}\" to sandbox.allow in {}",
            kind.key(),
            allowed.join(", "),
            kind.key(),
            self.path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings> {
        Settings::parse(Path::new("/data/config.toml"), text)
    }

    #[test]
    fn defaults_are_sandboxed_and_networked() {
        let settings = parse("").expect("parses");
        assert_eq!(settings.sandbox, SandboxSettings::default());
        assert_eq!(settings.sandbox.default, SandboxKind::Namespace);
        assert!(settings.check_allowed(SandboxKind::Host).is_err());
        assert!(settings.check_allowed(SandboxKind::Docker).is_ok());
    }

    #[test]
    fn host_is_allowed_only_when_listed() {
        let settings = parse("[sandbox]\nallow = [\"host\", \"namespace\"]\ndefault = \"host\"\n")
            .expect("ok");
        assert_eq!(settings.sandbox.default, SandboxKind::Host);
        assert!(settings.check_allowed(SandboxKind::Host).is_ok());
        let refused = settings
            .check_allowed(SandboxKind::Wasm)
            .expect_err("not listed");
        assert!(
            refused.contains("add \"wasm\" to sandbox.allow in /data/config.toml"),
            "{refused}"
        );
    }

    #[test]
    fn the_default_follows_a_narrow_allow_list() {
        let settings = parse("[sandbox]\nallow = [\"docker\"]\n").expect("ok");
        assert_eq!(settings.sandbox.default, SandboxKind::Docker);
    }

    #[test]
    fn mistakes_are_errors_with_their_place() {
        let typo = parse("[sandbox]\nalow = [\"host\"]\n").expect_err("unknown key");
        let text = format!("{typo:#}");
        assert!(
            text.contains("/data/config.toml") && text.contains("alow"),
            "{text}"
        );
        assert!(text.contains("line 2"), "{text}");
        let unknown = parse("[sandbox]\nallow = [\"chroot\"]\n").expect_err("unknown kind");
        assert!(format!("{unknown:#}").contains("unknown sandbox `chroot`"));
        let outside = parse("[sandbox]\nallow = [\"docker\"]\ndefault = \"host\"\n")
            .expect_err("default not allowed");
        assert!(format!("{outside:#}").contains("does not list"));
        assert!(parse("[sandbox]\nallow = []\n").is_err());
        assert!(parse("[sandbox]\nnetwork = \"yes\"\n").is_err());
    }
}
