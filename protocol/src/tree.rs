//! The canonical tree encoding: a directory as a sorted list of entries (name, kind, executable
//! bit, digest or link target). The same folder always encodes to the same bytes on any machine,
//! so a tree's digest names a whole snapshot and equal subtrees are stored once.
//!
//! Encoding: postcard of the format version ([`TREE_FORMAT_VERSION`]) and the entries. Decoding
//! refuses anything a canonical encoder would not produce (unsorted or duplicate names, names
//! with `/` or NUL, `.` and `..`), so a peer cannot smuggle a path out of a tree.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Bumped when the encoding changes; a decoder refuses other versions.
pub const TREE_FORMAT_VERSION: u8 = 1;

/// One directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    entries: Vec<Entry>,
}

/// A named entry of a directory. Names are bytes: Unix file names need not be UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: EntryKind,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A file: `digest` names its whole content. A file cut into several chunks also names its
    /// chunk list (a blob holding the chunks' digests in order), so a receiver can verify each
    /// chunk on arrival and the whole file after assembly.
    File {
        digest: Digest,
        executable: bool,
        chunks: Option<Digest>,
    },
    Dir {
        digest: Digest,
    },
    Symlink {
        target: Vec<u8>,
    },
}

#[derive(Serialize, Deserialize)]
struct Encoded {
    version: u8,
    entries: Vec<Entry>,
}

/// Why bytes are not a valid tree.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    #[error(
        "the tree is encoded with format {found}; this peerbuild reads format {TREE_FORMAT_VERSION}: upgrade the older peer"
    )]
    Version { found: u8 },
    #[error("the tree's bytes do not decode: {detail}")]
    Malformed { detail: String },
    #[error("the tree has an invalid entry name {name:?}")]
    BadName { name: String },
    #[error("the tree's entries are not in canonical order at {name:?}")]
    NotCanonical { name: String },
}

/// Whether `name` can be one path component.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// A tree from entries in any order; fails on an invalid or duplicate name.
    pub fn new(mut entries: Vec<Entry>) -> Result<Tree, TreeError> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        check(&entries)?;
        Ok(Tree { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn encode(&self) -> Vec<u8> {
        let encoded = Encoded {
            version: TREE_FORMAT_VERSION,
            entries: self.entries.clone(),
        };
        // Encoding plain data into a Vec cannot fail.
        postcard::to_stdvec(&encoded).unwrap_or_default()
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        if let Some(&version) = bytes.first()
            && version != TREE_FORMAT_VERSION
        {
            return Err(TreeError::Version { found: version });
        }
        let encoded: Encoded = postcard::from_bytes(bytes).map_err(|e| TreeError::Malformed {
            detail: e.to_string(),
        })?;
        for pair in encoded.entries.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(TreeError::NotCanonical {
                    name: String::from_utf8_lossy(&pair[1].name).into_owned(),
                });
            }
        }
        check(&encoded.entries)?;
        let tree = Tree {
            entries: encoded.entries,
        };
        // postcard accepts trailing bytes and over-long integers; only the canonical bytes
        // may name a tree, so one tree has exactly one digest.
        if tree.encode() != bytes {
            return Err(TreeError::NotCanonical {
                name: "(the encoding itself)".into(),
            });
        }
        Ok(tree)
    }
}

fn check(entries: &[Entry]) -> Result<(), TreeError> {
    for entry in entries {
        if !valid_name(&entry.name) {
            return Err(TreeError::BadName {
                name: String::from_utf8_lossy(&entry.name).into_owned(),
            });
        }
    }
    for pair in entries.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(TreeError::NotCanonical {
                name: String::from_utf8_lossy(&pair[1].name).into_owned(),
            });
        }
    }
    Ok(())
}

/// The chunk list of a chunked file: its chunks' digests in order.
pub fn encode_chunk_list(chunks: &[Digest]) -> Vec<u8> {
    postcard::to_stdvec(&(TREE_FORMAT_VERSION, chunks)).unwrap_or_default()
}

pub fn decode_chunk_list(bytes: &[u8]) -> Result<Vec<Digest>, TreeError> {
    let (version, chunks): (u8, Vec<Digest>) =
        postcard::from_bytes(bytes).map_err(|e| TreeError::Malformed {
            detail: e.to_string(),
        })?;
    if version != TREE_FORMAT_VERSION {
        return Err(TreeError::Version { found: version });
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &[u8]) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File {
                digest: Digest::of(content),
                executable: false,
                chunks: None,
            },
        }
    }

    #[test]
    fn order_of_construction_does_not_change_the_digest() {
        let a = Tree::new(vec![file("b", b"2"), file("a", b"1")]).expect("valid");
        let b = Tree::new(vec![file("a", b"1"), file("b", b"2")]).expect("valid");
        assert_eq!(a.digest(), b.digest());
        assert_eq!(Tree::decode(&a.encode()), Ok(a));
    }

    #[test]
    fn bad_names_and_orders_are_refused() {
        assert!(Tree::new(vec![file("a/b", b"")]).is_err());
        assert!(Tree::new(vec![file("..", b"")]).is_err());
        assert!(Tree::new(vec![file("a", b"1"), file("a", b"2")]).is_err());
        let unsorted = postcard::to_stdvec(&Encoded {
            version: TREE_FORMAT_VERSION,
            entries: vec![file("b", b""), file("a", b"")],
        })
        .expect("encodes");
        assert!(matches!(
            Tree::decode(&unsorted),
            Err(TreeError::NotCanonical { .. })
        ));
        assert_eq!(Tree::decode(&[9, 0]), Err(TreeError::Version { found: 9 }));
        assert!(matches!(
            Tree::decode(&[TREE_FORMAT_VERSION, 5]),
            Err(TreeError::Malformed { .. })
        ));
    }

    #[test]
    fn only_canonical_bytes_decode() {
        let mut trailing = Tree::new(vec![file("a", b"")]).expect("valid").encode();
        trailing.push(0);
        assert!(
            Tree::decode(&trailing).is_err(),
            "trailing bytes are refused"
        );
    }

    #[test]
    fn chunk_lists_round_trip() {
        let chunks = vec![Digest::of(b"a"), Digest::of(b"b")];
        assert_eq!(decode_chunk_list(&encode_chunk_list(&chunks)), Ok(chunks));
    }
}
