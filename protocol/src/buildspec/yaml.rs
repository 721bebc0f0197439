//! A small YAML tree with source positions, built from `saphyr_parser` events for the buildspec
//! parser.
//!
//! Every scalar keeps the text the user wrote (`0.2` stays `"0.2"`, `yes` stays `"yes"`): the
//! buildspec parser decides what a value means from the key it sits under, so YAML's own typing
//! (floats, YAML 1.1 booleans) never alters a version, a variable value or a runtime version.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};

/// The most nodes a file may hold once aliases are expanded. A real buildspec has a few hundred;
/// the bound stops a "billion laughs" file (aliases of aliases) from exhausting memory.
pub(crate) const MAX_NODES: usize = 100_000;

/// The deepest nesting accepted. Cloning and dropping the tree recurse, so nesting (including
/// what aliases add) is bounded to keep the stack safe on any input.
pub(crate) const MAX_DEPTH: usize = 100;

/// A position in the source: 1-indexed line and 1-indexed column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// The first character of the file, used for problems with the whole file.
    pub const START: Pos = Pos { line: 1, column: 1 };

    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// A YAML value and where it starts.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// `~`, `null` or nothing at all, unquoted.
    Null,
    /// Any other scalar, as written, with the style it was written in.
    Scalar(String, ScalarStyle),
    Sequence(Vec<Node>),
    /// Pairs in file order; keys are unique.
    Mapping(Vec<(Key, Node)>),
}

/// A mapping key: always a scalar, kept as written.
#[derive(Clone, Debug)]
pub(crate) struct Key {
    pub text: String,
    pub pos: Pos,
}

/// Why a text is not a usable YAML tree.
#[derive(Debug)]
pub(crate) struct YamlError {
    pub pos: Pos,
    /// The dotted path of the value at fault, when the problem is inside the tree.
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
}

impl YamlError {
    fn new(pos: Pos, path: String, message: String) -> YamlError {
        YamlError {
            pos,
            path,
            message,
            hint: None,
        }
    }
}

/// Loads the single document of `text`. An empty document (or a file of comments) is a `Null`
/// node at the start of the file.
pub(crate) fn load(text: &str) -> Result<Node, YamlError> {
    let mut loader = Loader::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(scan_error)?;
        if loader.on_event(event, &span)? {
            break;
        }
    }
    Ok(loader.root.unwrap_or(Node {
        pos: Pos::START,
        value: Value::Null,
    }))
}

/// Turns a syntax error into a message, with a hint for the mistakes buildspec authors make most.
fn scan_error(error: ScanError) -> YamlError {
    let marker = error.marker();
    let pos = Pos {
        line: marker.line(),
        column: marker.col() + 1,
    };
    let info = error.info();
    let mut yaml_error = YamlError::new(pos, String::new(), format!("invalid YAML: {info}"));
    if info.contains("tab") {
        yaml_error.hint =
            Some("indent with spaces; YAML does not allow tabs for indentation".into());
    } else if info.contains("mapping values are not allowed") {
        yaml_error.hint =
            Some("a `: ` inside a value starts a mapping; put the whole value in quotes".into());
    }
    yaml_error
}

/// A node with the bookkeeping the size and depth bounds need.
struct Built {
    node: Node,
    /// Nodes in this subtree, itself included.
    size: usize,
    /// Levels in this subtree: 1 for a scalar.
    height: usize,
}

/// A collection whose end event has not arrived yet.
struct Frame {
    pos: Pos,
    anchor: usize,
    size: usize,
    height: usize,
    kind: FrameKind,
}

enum FrameKind {
    Sequence(Vec<Node>),
    Mapping {
        pairs: Vec<(Key, Node)>,
        /// Each key seen so far and the line it is on, to refuse duplicates naming both lines.
        lines: HashMap<String, usize>,
        /// The key whose value comes next.
        key: Option<Key>,
    },
}

#[derive(Default)]
struct Loader {
    stack: Vec<Frame>,
    /// Anchored nodes by the parser's anchor id, with their size and height for the bounds.
    anchors: HashMap<usize, (Node, usize, usize)>,
    nodes: usize,
    documents: usize,
    root: Option<Node>,
}

impl Loader {
    /// Handles one event; returns true at the end of the stream.
    fn on_event(&mut self, event: Event<'_>, span: &Span) -> Result<bool, YamlError> {
        let pos = Pos::of(span);
        match event {
            Event::StreamEnd => return Ok(true),
            Event::DocumentStart(_) => self.start_document(pos)?,
            Event::Scalar(text, style, anchor, _) => self.scalar(&text, style, anchor, pos)?,
            Event::Alias(anchor) => self.alias(anchor, pos)?,
            Event::SequenceStart(anchor, _) => {
                self.open(pos, anchor, FrameKind::Sequence(vec![]))?
            }
            Event::MappingStart(anchor, _) => {
                let kind = FrameKind::Mapping {
                    pairs: vec![],
                    lines: HashMap::new(),
                    key: None,
                };
                self.open(pos, anchor, kind)?;
            }
            Event::SequenceEnd | Event::MappingEnd => self.close()?,
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
        }
        Ok(false)
    }

    fn start_document(&mut self, pos: Pos) -> Result<(), YamlError> {
        self.documents += 1;
        if self.documents > 1 {
            let mut error = YamlError::new(
                pos,
                String::new(),
                "the file holds more than one YAML document; a buildspec is a single document"
                    .into(),
            );
            error.hint = Some("remove the `---` line that starts the second document".into());
            return Err(error);
        }
        Ok(())
    }

    fn count(&mut self, size: usize, pos: Pos) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(size);
        if self.nodes > MAX_NODES {
            return Err(YamlError::new(
                pos,
                String::new(),
                format!(
                    "the file expands to more than {MAX_NODES} YAML values (aliases included); \
                     a buildspec is far smaller"
                ),
            ));
        }
        Ok(())
    }

    fn check_depth(&self, height: usize, pos: Pos) -> Result<(), YamlError> {
        if self.stack.len() + height > MAX_DEPTH {
            return Err(YamlError::new(
                pos,
                self.path(),
                format!("the file nests values more than {MAX_DEPTH} levels deep"),
            ));
        }
        Ok(())
    }

    fn scalar(
        &mut self,
        text: &str,
        style: ScalarStyle,
        anchor: usize,
        pos: Pos,
    ) -> Result<(), YamlError> {
        self.count(1, pos)?;
        let is_null =
            style == ScalarStyle::Plain && matches!(text, "" | "~" | "null" | "Null" | "NULL");
        let value = if is_null {
            Value::Null
        } else {
            Value::Scalar(text.to_owned(), style)
        };
        let node = Node { pos, value };
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), 1, 1));
        }
        // A key keeps its text even when it reads as null, so that `null:` is reported as the
        // unknown key it is rather than vanishing.
        if self.awaits_key() {
            return self.add_key(Key {
                text: text.to_owned(),
                pos,
            });
        }
        self.add(Built {
            node,
            size: 1,
            height: 1,
        })
    }

    fn alias(&mut self, anchor: usize, pos: Pos) -> Result<(), YamlError> {
        let Some(&(_, size, height)) = self.anchors.get(&anchor) else {
            return Err(YamlError::new(
                pos,
                self.path(),
                "alias to an unknown anchor".into(),
            ));
        };
        // Check the bounds before cloning, so that a hostile file never gets its expansion.
        self.count(size, pos)?;
        self.check_depth(height, pos)?;
        let Some((node, _, _)) = self.anchors.get(&anchor) else {
            return Ok(());
        };
        let mut node = node.clone();
        // Report problems in an alias at the alias, which is where the value is used.
        node.pos = pos;
        self.add(Built { node, size, height })
    }

    fn open(&mut self, pos: Pos, anchor: usize, kind: FrameKind) -> Result<(), YamlError> {
        self.count(1, pos)?;
        self.check_depth(1, pos)?;
        self.stack.push(Frame {
            pos,
            anchor,
            size: 1,
            height: 1,
            kind,
        });
        Ok(())
    }

    fn close(&mut self) -> Result<(), YamlError> {
        let Some(frame) = self.stack.pop() else {
            return Ok(());
        };
        let value = match frame.kind {
            FrameKind::Sequence(items) => Value::Sequence(items),
            FrameKind::Mapping { pairs, .. } => Value::Mapping(pairs),
        };
        let node = Node {
            pos: frame.pos,
            value,
        };
        if frame.anchor != 0 {
            let stored = (node.clone(), frame.size, frame.height);
            self.anchors.insert(frame.anchor, stored);
        }
        self.add(Built {
            node,
            size: frame.size,
            height: frame.height,
        })
    }

    fn awaits_key(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame {
                kind: FrameKind::Mapping { key: None, .. },
                ..
            })
        )
    }

    /// Places a finished node into the collection being built, or makes it the document.
    fn add(&mut self, built: Built) -> Result<(), YamlError> {
        if self.awaits_key() {
            return self.add_built_key(built.node);
        }
        let Some(frame) = self.stack.last_mut() else {
            self.root = Some(built.node);
            return Ok(());
        };
        frame.size += built.size;
        frame.height = frame.height.max(built.height + 1);
        match &mut frame.kind {
            FrameKind::Sequence(items) => items.push(built.node),
            FrameKind::Mapping { pairs, key, .. } => {
                if let Some(key) = key.take() {
                    pairs.push((key, built.node));
                }
            }
        }
        Ok(())
    }

    /// A key that came from an alias or a collection: only a scalar alias is a usable key.
    fn add_built_key(&mut self, node: Node) -> Result<(), YamlError> {
        match node.value {
            Value::Scalar(text, _) => self.add_key(Key {
                text,
                pos: node.pos,
            }),
            Value::Null => self.add_key(Key {
                text: String::new(),
                pos: node.pos,
            }),
            Value::Sequence(_) | Value::Mapping(_) => Err(YamlError::new(
                node.pos,
                self.path(),
                "a mapping key must be a plain value, not a list or a mapping".into(),
            )),
        }
    }

    fn add_key(&mut self, new_key: Key) -> Result<(), YamlError> {
        let path = self.path();
        let Some(Frame {
            kind: FrameKind::Mapping { lines, key, .. },
            ..
        }) = self.stack.last_mut()
        else {
            return Ok(());
        };
        if let Some(first_line) = lines.get(&new_key.text) {
            let message = format!(
                "duplicate key `{}` (lines {first_line} and {}); each key may appear once",
                new_key.text, new_key.pos.line
            );
            return Err(YamlError::new(
                new_key.pos,
                join(&path, &new_key.text),
                message,
            ));
        }
        lines.insert(new_key.text.clone(), new_key.pos.line);
        *key = Some(new_key);
        Ok(())
    }

    /// The dotted path of the collection being built (`phases.build.commands[2]`).
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match &frame.kind {
                FrameKind::Sequence(items) => path.push_str(&format!("[{}]", items.len())),
                FrameKind::Mapping { key: Some(key), .. } => path = join(&path, &key.text),
                FrameKind::Mapping { key: None, .. } => {}
            }
        }
        path
    }
}

/// `parent.child`, or `child` at the top.
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}
