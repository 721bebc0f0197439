//! Content digests: BLAKE3 of the uncompressed bytes, plus their size. A digest names a blob
//! (a small file's content, a chunk, a chunk list, or an encoded tree) everywhere: on disk, on
//! the wire, and in results.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A blob's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest {
    hash: [u8; 32],
    size: u64,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hash: *blake3::hash(bytes).as_bytes(),
            size: bytes.len() as u64,
        }
    }

    /// A digest from a hash computed elsewhere (by a streaming hasher over `size` bytes).
    pub fn from_parts(hash: [u8; 32], size: u64) -> Digest {
        Digest { hash, size }
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hash as 64 lower-case hex digits (a store's object name).
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.hash {
            out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(byte & 15), 16).unwrap_or('0'));
        }
        out
    }

    /// Whether `bytes` are what this digest names.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && blake3::hash(bytes).as_bytes() == &self.hash
    }
}

/// `HASH/SIZE`, as users copy it from output into `peerbuild cache export`.
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}/{})", &self.hex()[..12], self.size)
    }
}

/// Why a digest's text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a digest: expected 64 hex digits, `/`, and the size in bytes")]
pub struct DigestParseError {
    pub text: String,
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || DigestParseError {
            text: text.to_owned(),
        };
        let (hex, size) = text.trim().split_once('/').ok_or_else(error)?;
        // Checked byte by byte first: slicing a string of multi-byte characters could panic,
        // and `from_str_radix` alone would accept a `+`.
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(error());
        }
        if !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| error())?;
        }
        let size = size.parse().map_err(|_| error())?;
        Ok(Digest { hash, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_and_parse_back() {
        let digest = Digest::of(b"hello");
        let text = digest.to_string();
        assert!(text.ends_with("/5"));
        assert_eq!(text.parse::<Digest>(), Ok(digest));
        assert!(digest.matches(b"hello"));
        assert!(!digest.matches(b"hellO"));
        assert!("abc/5".parse::<Digest>().is_err());
        assert!(format!("{}/1", "é".repeat(32)).parse::<Digest>().is_err());
        assert!(
            format!("+f{}/5", &digest.hex()[2..])
                .parse::<Digest>()
                .is_err()
        );
        assert!(format!("{}/+5", digest.hex()).parse::<Digest>().is_err());
        assert!(format!("{}/x", digest.hex()).parse::<Digest>().is_err());
    }
}
