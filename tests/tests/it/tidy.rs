//! Repository hygiene as an ordinary test: every Rust file says what it is for, no unfinished
//! markers, and the docs name every event kind and every command.

use std::path::{Path, PathBuf};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list").flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_comment_and_has_no_unfinished_markers() {
    let mut files = Vec::new();
    rust_files(&repository(), &mut files);
    assert!(files.len() > 20, "found the sources");
    // Built from pieces so this file does not trip its own check.
    let markers = [
        concat!("todo", "!("),
        concat!("dbg", "!("),
        concat!("unimplemented", "!("),
    ];
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let shown = file
            .strip_prefix(repository())
            .unwrap_or(file)
            .display()
            .to_string();
        if !text.starts_with("//!") {
            problems.push(format!(
                "{shown}: does not start with a `//!` line saying what it is for"
            ));
        }
        for marker in markers {
            if text.contains(marker) {
                problems.push(format!("{shown}: contains {marker}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_event_schema_doc_names_every_event() {
    let source = std::fs::read_to_string(repository().join("node/src/events.rs")).expect("read");
    let doc = std::fs::read_to_string(repository().join("docs/EVENTS.md")).expect("read");
    let body = source
        .split("pub enum Event {")
        .nth(1)
        .expect("the Event enum");
    let body = &body[..body.find("\n}").expect("its end")];
    let variants: Vec<String> = body
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("    ")?;
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            name.starts_with(|c: char| c.is_ascii_uppercase())
                .then(|| snake_case(&name))
        })
        .collect();
    assert!(variants.len() >= 8, "found the variants: {variants:?}");
    for variant in variants {
        assert!(
            doc.contains(&format!("`{variant}`")),
            "docs/EVENTS.md does not describe `{variant}`"
        );
    }
}

#[test]
fn the_readme_names_every_command() {
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("read");
    for command in [
        "peerbuild run",
        "peerbuild builds",
        "peerbuild logs",
        "peerbuild cancel",
        "peerbuild node",
        "peerbuild pool init",
        "peerbuild status",
    ] {
        assert!(
            readme.contains(command),
            "README.md does not mention `{command}`"
        );
    }
}
