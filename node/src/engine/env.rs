//! A build's environment: the base variables, CodeBuild's built-ins, the buildspec's variables
//! and secrets, a batch member's variables, and the values given at submit time, in that order
//! of precedence (later wins), as BUILDSPEC.md describes.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// An ordered set of variables in which a later value replaces an earlier one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Variables(Vec<(String, String)>);

impl Variables {
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    pub fn extend<'a>(&mut self, pairs: impl IntoIterator<Item = &'a (String, String)>) {
        for (name, value) in pairs {
            self.set(name, value.clone());
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }
}

/// Whether `name` can be a shell variable.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parses one `KEY=VALUE` given at submit time. The value is literal.
pub fn parse_assignment(text: &str) -> Result<(String, String)> {
    let Some((name, value)) = text.split_once('=') else {
        bail!("`{text}` is not KEY=VALUE");
    };
    check_submitted_name(name)?;
    Ok((name.to_owned(), value.to_owned()))
}

fn check_submitted_name(name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!(
            "`{name}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"
        );
    }
    if name.starts_with("CODEBUILD_") {
        bail!("`{name}`: names starting with CODEBUILD_ are reserved for the build's built-ins");
    }
    Ok(())
}

/// Reads an `--env-file`: `KEY=VALUE` lines, blank lines and `#` comments skipped, an optional
/// `export ` before the key; values are literal (no quotes removed), as with `docker --env-file`.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the env file {}", path.display()))?;
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let assignment = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let pair = parse_assignment(assignment)
            .with_context(|| format!("{}:{}", path.display(), index + 1))?;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// The variables a build starts from before any of its own: a clean environment with the
/// caller's `PATH`, the user's home and identity, and a UTF-8 locale.
pub fn base(home: &str, user: &str) -> Variables {
    let mut vars = Variables::default();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    vars.set("PATH", path);
    vars.set("HOME", home);
    vars.set("USER", user);
    vars.set("LOGNAME", user);
    vars.set(
        "LANG",
        std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()),
    );
    if let Ok(tz) = std::env::var("TZ") {
        vars.set("TZ", tz);
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_values_win_in_place() {
        let mut vars = Variables::default();
        vars.set("A", "1");
        vars.set("B", "2");
        vars.set("A", "3");
        assert_eq!(
            vars.into_vec(),
            vec![("A".into(), "3".into()), ("B".into(), "2".into())]
        );
    }

    #[test]
    fn assignments_are_literal_and_checked() {
        assert_eq!(
            parse_assignment("P=$PATH:/x=y").expect("valid"),
            ("P".into(), "$PATH:/x=y".into())
        );
        assert!(parse_assignment("1X=a").is_err());
        assert!(parse_assignment("CODEBUILD_X=a").is_err());
        assert!(parse_assignment("novalue").is_err());
    }

    #[test]
    fn env_file_skips_comments_and_keeps_quotes() {
        let dir = std::env::temp_dir().join(format!("pb-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("env");
        std::fs::write(&path, "# c\n\nexport A=\"q\"\nB=x=y\n").expect("write");
        let pairs = read_env_file(&path).expect("parses");
        assert_eq!(
            pairs,
            vec![("A".into(), "\"q\"".into()), ("B".into(), "x=y".into())]
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
