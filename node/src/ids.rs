//! Build identifiers: `project:uuid`, as CodeBuild writes `CODEBUILD_BUILD_ID`.

use std::fmt;

/// A build's identifier.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BuildId {
    project: String,
    uuid: String,
}

impl BuildId {
    /// A fresh identifier for a build of `project` (any text; reduced to `[A-Za-z0-9_-]`).
    pub fn new(project: &str) -> Self {
        let project: String = project
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let project = if project.is_empty() {
            "build".to_owned()
        } else {
            project
        };
        BuildId {
            project,
            uuid: uuid_v4(),
        }
    }

    /// Reads `project:uuid` back, as a submitter sends it; `None` unless both parts are
    /// non-empty `[A-Za-z0-9_-]` (an id names a folder).
    pub fn parse(text: &str) -> Option<BuildId> {
        let (project, uuid) = text.split_once(':')?;
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        (valid(project) && valid(uuid)).then(|| BuildId {
            project: project.to_owned(),
            uuid: uuid.to_owned(),
        })
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// A batch member's identifier: the batch's, with the member's identifier appended.
    pub fn member(&self, identifier: &str) -> BuildId {
        BuildId {
            project: self.project.clone(),
            uuid: format!("{}/{identifier}", self.uuid),
        }
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.project, self.uuid)
    }
}

/// A random (version 4) UUID from the kernel's generator.
fn uuid_v4() -> String {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n <= 0 {
            // The kernel's generator does not fail once initialised; if it ever does, fall
            // back to the clock and pid, which are unique enough on one machine.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let seed = nanos ^ (u128::from(std::process::id()) << 64);
            bytes = seed.to_le_bytes();
            break;
        }
        filled += n as usize;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_codebuild_ids() {
        let id = BuildId::new("my app");
        let text = id.to_string();
        let (project, uuid) = text.split_once(':').expect("project:uuid");
        assert_eq!(project, "my-app");
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.as_bytes()[14], b'4');
        assert_ne!(BuildId::new("a"), BuildId::new("a"));
    }
}
