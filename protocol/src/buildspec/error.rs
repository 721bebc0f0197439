//! `ParseError`: why a buildspec was refused and where to fix it, plus the "did you mean" helper.

use std::fmt;

use super::yaml::Pos;

/// A buildspec that cannot run, with the place to fix it.
///
/// Displayed on one line, `file:line:column: key: message`, followed by an indented
/// `hint:` line when there is one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{file}:{line}:{column}: {}{message}{}",
    KeyPrefix(key),
    HintSuffix(hint)
)]
#[non_exhaustive]
pub struct ParseError {
    /// The file's display name, as given to [`parse`](super::parse).
    pub file: String,
    /// 1-indexed line.
    pub line: usize,
    /// 1-indexed column, in characters.
    pub column: usize,
    /// The dotted path of the key at fault (`phases.build.commands[2]`, `env.variables.FOO`);
    /// empty for problems with the whole file.
    pub key: String,
    pub message: String,
    /// A suggested fix, such as the known key closest to a misspelt one.
    pub hint: Option<String>,
}

struct KeyPrefix<'a>(&'a str);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

struct HintSuffix<'a>(&'a Option<String>);

impl fmt::Display for HintSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(hint) => write!(f, "\n  hint: {hint}"),
            None => Ok(()),
        }
    }
}

impl ParseError {
    /// An error at `pos` about `key`; the file name is filled in by [`ParseError::located`].
    pub(crate) fn at(pos: Pos, key: &str, message: impl Into<String>) -> ParseError {
        ParseError {
            file: String::new(),
            line: pos.line,
            column: pos.column,
            key: key.to_owned(),
            message: message.into(),
            hint: None,
        }
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> ParseError {
        self.hint = Some(hint.into());
        self
    }

    pub(crate) fn with_optional_hint(mut self, hint: Option<String>) -> ParseError {
        self.hint = hint;
        self
    }

    /// Names the file and keeps the position inside `text`: the YAML scanner may report the end
    /// of input one line past the last one, which an editor cannot jump to.
    pub(crate) fn located(mut self, file: &str, text: &str) -> ParseError {
        self.file = file.to_owned();
        let lines: Vec<&str> = text.lines().collect();
        let last = lines.len().max(1);
        if self.line == 0 || self.line > last {
            self.line = last;
            self.column = usize::MAX;
        }
        let width = lines
            .get(self.line - 1)
            .map_or(0, |line| line.chars().count());
        self.column = self.column.clamp(1, width + 1);
        self
    }
}

/// The candidate a user most likely meant by `input`, if one is close enough to suggest.
///
/// Spelling variants that CodeBuild users write often (`pre-build`, `PRE_BUILD`, `runas`) match
/// exactly once case and `-`/`_` are set aside; otherwise the closest candidate by normalized
/// Damerau–Levenshtein similarity is offered when at least 0.6 of it matches, which catches one or
/// two slips in a short key without offering unrelated words.
pub(crate) fn suggest<'k>(input: &str, candidates: &[&'k str]) -> Option<&'k str> {
    let squashed = squash(input);
    if let Some(exact) = candidates.iter().find(|c| squash(c) == squashed) {
        return Some(exact);
    }
    let lower = input.to_lowercase();
    // Reversed so that, among equally close candidates, the first listed wins.
    candidates
        .iter()
        .rev()
        .map(|c| {
            (
                strsim::normalized_damerau_levenshtein(&lower, &c.to_lowercase()),
                *c,
            )
        })
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn squash(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// "did you mean `x`?" for the closest candidate, if any.
pub(crate) fn did_you_mean(input: &str, candidates: &[&str]) -> Option<String> {
    suggest(input, candidates).map(|c| format!("did you mean `{c}`?"))
}
