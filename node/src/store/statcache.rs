//! The stat cache: for each folder imported, what each file looked like (size, modification and
//! change times, inode) when it was hashed, and what it hashed to. A file that still looks the
//! same is not read again. Entries modified within the last two seconds before an import are
//! not recorded, so a file changed twice within one timestamp tick is never mistaken as
//! unchanged.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use protocol::Digest;
use serde::{Deserialize, Serialize};

const FORMAT: u8 = 1;

/// What a file looked like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Look {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub inode: u64,
}

impl Look {
    pub fn of(metadata: &fs::Metadata) -> Look {
        Look {
            size: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            ctime_ns: i128::from(metadata.ctime()) * 1_000_000_000
                + i128::from(metadata.ctime_nsec()),
            inode: metadata.ino(),
        }
    }
}

/// What a file hashed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashed {
    pub digest: Digest,
    pub chunks: Option<Digest>,
}

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    format: u8,
    entries: Vec<(Vec<u8>, Look, Hashed)>,
}

/// The cache of one imported folder.
#[derive(Default)]
pub struct StatCache {
    path: PathBuf,
    old: HashMap<Vec<u8>, (Look, Hashed)>,
    new: Vec<(Vec<u8>, Look, Hashed)>,
}

impl StatCache {
    /// Loads the cache kept in `dir` for the folder `root`; a missing or unreadable cache is
    /// simply empty.
    pub fn load(dir: &Path, root: &Path) -> StatCache {
        use std::os::unix::ffi::OsStrExt;
        let name = blake3::hash(root.as_os_str().as_bytes())
            .to_hex()
            .to_string();
        let path = dir.join(name);
        let old = fs::read(&path)
            .ok()
            .and_then(|bytes| postcard::from_bytes::<Saved>(&bytes).ok())
            .filter(|saved| saved.format == FORMAT)
            .map(|saved| {
                saved
                    .entries
                    .into_iter()
                    .map(|(p, l, h)| (p, (l, h)))
                    .collect()
            })
            .unwrap_or_default();
        StatCache {
            path,
            old,
            new: Vec::new(),
        }
    }

    pub fn lookup(&self, relative: &[u8], look: &Look) -> Option<Hashed> {
        self.old
            .get(relative)
            .filter(|(old, _)| old == look)
            .map(|(_, hashed)| *hashed)
    }

    /// Records a file for the next import, unless it changed too recently to trust its times.
    pub fn record(
        &mut self,
        relative: Vec<u8>,
        look: Look,
        hashed: Hashed,
        import_started_ns: i128,
    ) {
        if look.mtime_ns < import_started_ns - 2_000_000_000
            && look.ctime_ns < import_started_ns - 2_000_000_000
        {
            self.new.push((relative, look, hashed));
        }
    }

    /// Replaces the saved cache with what this import recorded (atomically).
    pub fn save(self, temporary: &Path) {
        let saved = Saved {
            format: FORMAT,
            entries: self.new,
        };
        if let Ok(bytes) = postcard::to_stdvec(&saved)
            && fs::write(temporary, bytes).is_ok()
        {
            let _ = fs::rename(temporary, &self.path);
        }
    }
}
