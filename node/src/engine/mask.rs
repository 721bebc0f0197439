//! Secret masking: every secret value is replaced by `***` in every line a build shows or keeps.
//!
//! Output arrives in arbitrary pieces, so a secret can be split across two writes. [`LineBuffer`]
//! therefore releases only whole lines, and a line too long to hold is released in parts that
//! keep back any tail that could begin a secret. Masking whole lines then catches every secret
//! that does not itself span a line break; a multi-line secret is masked line by line.

/// The text that replaces a secret.
pub const MASK: &str = "***";

/// The longest line held back before it is released in parts.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// The secret values of one build.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Longest first, so that a secret containing another is masked whole.
    needles: Vec<String>,
}

impl Masker {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles: Vec<String> = Vec::new();
        for secret in secrets {
            for part in std::iter::once(secret).chain(secret.lines()) {
                let part = part.trim_end_matches('\r');
                if !part.trim().is_empty() && !needles.iter().any(|n| n == part) {
                    needles.push(part.to_owned());
                }
            }
        }
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Masker { needles }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    pub fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for needle in &self.needles {
            if text.contains(needle.as_str()) {
                text = text.replace(needle.as_str(), MASK);
            }
        }
        text
    }

    /// How many trailing bytes of `bytes` could be the start of a secret.
    fn unsafe_tail(&self, bytes: &[u8]) -> usize {
        self.needles
            .iter()
            .map(|needle| {
                let needle = needle.as_bytes();
                (1..needle.len().min(bytes.len() + 1))
                    .rev()
                    .find(|&n| bytes.ends_with(&needle[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

/// Splits a byte stream into lines for masking.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes and returns the lines now complete (without their line breaks).
    pub fn push(&mut self, bytes: &[u8], masker: &Masker) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        // Scan once and drain once, so a read of many short lines costs linear time.
        let mut start = 0;
        while let Some(offset) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let end = start + offset;
            lines.push(decode(&self.pending[start..end]));
            start = end + 1;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_LINE_BYTES {
            let keep = masker.unsafe_tail(&self.pending);
            let cut = self.pending.len() - keep;
            let part: Vec<u8> = self.pending.drain(..cut).collect();
            lines.push(decode(&part));
        }
        lines
    }

    /// Releases whatever is left, at the end of a command.
    pub fn flush(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.pending);
        Some(decode(&rest))
    }
}

fn decode(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.strip_suffix('\r').unwrap_or(&text).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], pieces: &[&[u8]]) -> Vec<String> {
        let masker = Masker::new(secrets.iter().copied());
        let mut buffer = LineBuffer::default();
        let mut lines = Vec::new();
        for piece in pieces {
            lines.extend(buffer.push(piece, &masker));
        }
        lines.extend(buffer.flush());
        lines.iter().map(|l| masker.mask(l)).collect()
    }

    #[test]
    fn masks_a_secret_split_across_writes() {
        let lines = run(&["hunter2"], &[b"pass: hun", b"ter", b"2 ok\nnext\n"]);
        assert_eq!(lines, vec!["pass: *** ok", "next"]);
    }

    #[test]
    fn masks_multi_line_secrets_line_by_line() {
        let lines = run(&["line-one\nline-two"], &[b"a line-one\nline-two b\n"]);
        assert_eq!(lines, vec!["a ***", "*** b"]);
    }

    #[test]
    fn longer_secret_wins_over_the_secret_it_contains() {
        let lines = run(&["abc", "abcdef"], &[b"x abcdef y\n"]);
        assert_eq!(lines, vec!["x *** y"]);
    }

    #[test]
    fn long_lines_are_cut_without_splitting_a_secret() {
        let secret = "s3cr3t-value";
        let mut text = vec![b'x'; MAX_LINE_BYTES - 3];
        text.extend_from_slice(secret.as_bytes());
        text.extend_from_slice(b" tail");
        // Feed in small pieces so the cut can fall inside the secret.
        let pieces: Vec<&[u8]> = text.chunks(7).collect();
        let joined = run(&[secret], &pieces).join("");
        assert!(!joined.contains(secret));
        assert!(joined.ends_with("*** tail"));
    }

    #[test]
    fn blank_secrets_mask_nothing() {
        assert!(Masker::new(["", "  "]).is_empty());
    }
}
