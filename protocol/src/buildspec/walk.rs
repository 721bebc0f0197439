//! Typed access to the YAML tree for the buildspec parser: every accessor knows the dotted path
//! and position of its value, so each refusal says where it is and what was expected.

use saphyr_parser::ScalarStyle;

use super::error::{ParseError, did_you_mean};
use super::yaml::{Key, Node, Pos, Value, join};

/// A value in the tree, with its dotted path and the position of the key that names it.
pub(crate) struct Item<'a> {
    pub node: &'a Node,
    /// Where the key naming this value is (or the value itself, for list items and the root).
    /// Problems with the value as a whole, such as a missing key inside it, are reported here.
    pub at: Pos,
    pub path: String,
}

/// A mapping whose keys are checked: known keys only, or any names for user-named maps.
pub(crate) struct Map<'a> {
    pairs: &'a [(Key, Node)],
    at: Pos,
    path: String,
}

impl<'a> Item<'a> {
    pub fn root(node: &'a Node) -> Item<'a> {
        Item {
            node,
            at: node.pos,
            path: String::new(),
        }
    }

    /// Where to report a problem with the value: the value itself, or its key when the value is
    /// empty, because YAML places an empty value wherever the next token happens to start.
    pub fn value_pos(&self) -> Pos {
        match self.node.value {
            Value::Null => self.at,
            _ => self.node.pos,
        }
    }

    /// An error about this value.
    pub fn fail(&self, message: impl Into<String>) -> ParseError {
        ParseError::at(self.value_pos(), &self.path, message)
    }

    /// An error about the key naming this value.
    pub fn fail_at_key(&self, message: impl Into<String>) -> ParseError {
        ParseError::at(self.at, &self.path, message)
    }

    fn expected(&self, what: &str) -> ParseError {
        self.fail(format!("expected {what}, found {}", found(self.node)))
    }

    /// The scalar's text, as written.
    pub fn text(&self) -> Result<&'a str, ParseError> {
        match &self.node.value {
            Value::Scalar(text, _) => Ok(text),
            _ => Err(self.expected("a string")),
        }
    }

    /// The scalar's text, refused when blank.
    pub fn non_empty(&self, what: &str) -> Result<String, ParseError> {
        let text = self.text()?;
        if text.trim().is_empty() {
            return Err(self.fail(format!("expected {what}, found an empty string")));
        }
        Ok(text.to_owned())
    }

    /// `yes`/`no`/`true`/`false`, any case, as CodeBuild accepts them.
    pub fn boolean(&self) -> Result<bool, ParseError> {
        let Value::Scalar(text, _) = &self.node.value else {
            return Err(self.expected("yes/no or true/false"));
        };
        match text.to_ascii_lowercase().as_str() {
            "yes" | "true" => Ok(true),
            "no" | "false" => Ok(false),
            _ => Err(self.expected("yes/no or true/false")),
        }
    }

    /// The items of a list; `what` completes "expected", as in "a list of commands (strings)".
    /// An empty value is an empty list: users comment out every item of a list and expect the
    /// key to do nothing.
    pub fn list(&self, what: &str) -> Result<Vec<Item<'a>>, ParseError> {
        match &self.node.value {
            Value::Null => Ok(vec![]),
            Value::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(index, node)| Item {
                    node,
                    at: node.pos,
                    path: format!("{}[{index}]", self.path),
                })
                .collect()),
            Value::Scalar(..) => Err(self
                .expected(what)
                .with_hint("write each item on its own line, starting with `- `")),
            Value::Mapping(_) => Err(self.expected(what)),
        }
    }

    /// A list of strings, such as `commands`.
    pub fn strings(&self, noun: &str) -> Result<Vec<String>, ParseError> {
        self.list(&format!("a list of {noun}s (strings)"))?
            .iter()
            .map(|item| item.list_string(noun))
            .collect()
    }

    /// One string of a list; the classic unquoted `- echo key: value` gets its own hint.
    fn list_string(&self, noun: &str) -> Result<String, ParseError> {
        match &self.node.value {
            Value::Scalar(text, _) => Ok(text.clone()),
            Value::Mapping(pairs) => {
                let error = self.expected(&format!("a {noun} (a string)"));
                Err(match mapping_as_text(pairs) {
                    Some(text) => error.with_hint(format!(
                        "YAML read `{text}` as a mapping because of the `: `; \
                         put the whole {noun} in quotes"
                    )),
                    None => error,
                })
            }
            _ => Err(self.expected(&format!("a {noun} (a string)"))),
        }
    }

    /// A list of globs, or a single glob. CodeBuild documents `files`, `paths` and
    /// `exclude-paths` as lists, but a lone glob can only mean a one-item list, and refusing it
    /// would surprise more than accepting it; commands stay strict because a lone string there is
    /// often a command meant for `- ` that lost its dash.
    pub fn globs(&self) -> Result<Vec<String>, ParseError> {
        match &self.node.value {
            Value::Scalar(text, _) => Ok(vec![text.clone()]),
            _ => self.strings("glob"),
        }
    }

    /// A non-empty list of globs, for the keys that are pointless without one.
    pub fn some_globs(&self) -> Result<Vec<String>, ParseError> {
        let globs = self.globs()?;
        if globs.is_empty() {
            return Err(self.fail("expected at least one glob, found none"));
        }
        Ok(globs)
    }

    /// A string or a list of strings (`build-matrix` dimensions).
    pub fn string_or_list(&self, noun: &str) -> Result<Vec<String>, ParseError> {
        match &self.node.value {
            Value::Scalar(text, _) => Ok(vec![text.clone()]),
            Value::Sequence(_) => self.strings(noun),
            _ => Err(self.expected(&format!("a {noun} or a list of {noun}s"))),
        }
    }

    /// A mapping that may hold only `known` keys; an empty value is an empty mapping.
    pub fn fields(&self, known: &[&str]) -> Result<Map<'a>, ParseError> {
        let map = self.entries()?;
        for (key, _) in map.pairs {
            if !known.contains(&key.text.as_str()) {
                return Err(unknown_key(&map.path, key, known));
            }
        }
        Ok(map)
    }

    /// A mapping whose keys are names the user chose (variables, report groups).
    pub fn entries(&self) -> Result<Map<'a>, ParseError> {
        let pairs: &'a [(Key, Node)] = match &self.node.value {
            Value::Null => &[],
            Value::Mapping(pairs) => pairs,
            _ => return Err(self.expected("a mapping (`key: value` lines)")),
        };
        Ok(Map {
            pairs,
            at: self.at,
            path: self.path.clone(),
        })
    }

    /// One of a fixed set of words, written exactly.
    pub fn choice<T: Copy>(&self, options: &[(&str, T)]) -> Result<T, ParseError> {
        let text = self.text()?;
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
            return Ok(*value);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        Err(self.not_one_of(text, &names))
    }

    /// The refusal of a word that is not one of `names`.
    pub fn not_one_of(&self, text: &str, names: &[&str]) -> ParseError {
        self.fail(format!(
            "`{text}` is not allowed; expected one of {}",
            names.join(", ")
        ))
        .with_optional_hint(did_you_mean(text, names))
    }
}

impl<'a> Map<'a> {
    pub fn get(&self, name: &str) -> Option<Item<'a>> {
        self.pairs
            .iter()
            .find(|(key, _)| key.text == name)
            .map(|(key, node)| self.item(key, node))
    }

    /// A key the section cannot do without; `why` tells what it is for.
    pub fn require(&self, name: &str, why: &str) -> Result<Item<'a>, ParseError> {
        self.get(name).ok_or_else(|| {
            ParseError::at(
                self.at,
                &join(&self.path, name),
                format!("required key is missing; {why}"),
            )
        })
    }

    /// Every key with its value, in file order.
    pub fn items(&self) -> impl Iterator<Item = (&'a Key, Item<'a>)> + '_ {
        self.pairs
            .iter()
            .map(|(key, node)| (key, self.item(key, node)))
    }

    /// The position of the key that names this mapping.
    pub fn at(&self) -> Pos {
        self.at
    }

    fn item(&self, key: &'a Key, node: &'a Node) -> Item<'a> {
        Item {
            node,
            at: key.pos,
            path: join(&self.path, &key.text),
        }
    }
}

fn unknown_key(path: &str, key: &Key, known: &[&str]) -> ParseError {
    let hint = did_you_mean(&key.text, known).or_else(|| misplaced(path, &key.text));
    ParseError::at(
        key.pos,
        &join(path, &key.text),
        format!("unknown key; expected one of {}", known.join(", ")),
    )
    .with_optional_hint(hint)
}

/// A hint for keys written at the wrong level, the other common way to get an unknown key.
fn misplaced(path: &str, key: &str) -> Option<String> {
    const PHASES: [&str; 4] = ["install", "pre_build", "build", "post_build"];
    const PHASE_KEYS: [&str; 5] = [
        "commands",
        "finally",
        "run-as",
        "on-failure",
        "runtime-versions",
    ];
    if key == "<<" {
        return Some("YAML merge keys (`<<`) are not supported; write the keys out".into());
    }
    if path.is_empty() && PHASES.contains(&key) {
        return Some(format!("`{key}` is a phase; put it under `phases:`"));
    }
    if path == "phases" && PHASE_KEYS.contains(&key) {
        return Some(format!(
            "`{key}` goes inside a phase, e.g. `phases: build: {key}:`"
        ));
    }
    None
}

/// What a value is, for "expected X, found Y".
pub(crate) fn found(node: &Node) -> String {
    match &node.value {
        Value::Null => "nothing".into(),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Scalar(text, style) => {
            let shown = shorten(text);
            match style {
                ScalarStyle::Plain => format!("`{shown}`"),
                _ => format!("the string `{shown}`"),
            }
        }
    }
}

/// A value short enough to quote in a one-line message.
fn shorten(text: &str) -> String {
    const LIMIT: usize = 40;
    let first_line = text.lines().next().unwrap_or("");
    if first_line.chars().count() > LIMIT || first_line.len() < text.trim_end().len() {
        let head: String = first_line.chars().take(LIMIT).collect();
        format!("{head}…")
    } else {
        first_line.to_owned()
    }
}

/// `key: value` for a one-pair mapping of scalars, the shape an unquoted command turns into.
fn mapping_as_text(pairs: &[(Key, Node)]) -> Option<String> {
    let [(key, value)] = pairs else {
        return None;
    };
    match &value.value {
        Value::Scalar(text, _) => Some(format!("{}: {text}", key.text)),
        Value::Null => Some(format!("{}:", key.text)),
        _ => None,
    }
}
