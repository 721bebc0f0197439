//! The node's secrets on disk: its identity (an ed25519 keypair in `DATA_DIR/identity.key`), the
//! pool's pre-shared key, and the API token. Each is created with mode 0600 and refused when
//! another user could read it, so a leaked key is noticed rather than used.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// The identity file's first line; the rest is the protobuf keypair in hex.
const IDENTITY_HEADER: &str = "peerbuild-identity-v1";

/// Loads the node's keypair from `path`, creating it (0600) if it does not exist.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair> {
    match fs::symlink_metadata(path) {
        Ok(_) => load_identity(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let encoded = keypair
                .to_protobuf_encoding()
                .context("cannot encode the new identity key")?;
            let text = format!("{IDENTITY_HEADER}\n{}\n", hex(&encoded));
            create_new_private(path, text.as_bytes())?;
            Ok(keypair)
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn load_identity(path: &Path) -> Result<Keypair> {
    check_private(path, "identity key")?;
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let corrupt = || {
        format!(
            "{} is corrupt (not a peerbuild identity key); move it away to start with a new peer id",
            path.display()
        )
    };
    if lines.next() != Some(IDENTITY_HEADER) {
        bail!(corrupt());
    }
    let bytes = lines.next().and_then(unhex).with_context(corrupt)?;
    Keypair::from_protobuf_encoding(&bytes).with_context(corrupt)
}

/// Refuses a secret file that is not a regular file owned by this user with mode 0600 (or
/// stricter).
pub fn check_private(path: &Path, what: &str) -> Result<()> {
    let metadata =
        fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !metadata.is_file() {
        bail!("the {what} {} is not a regular file", path.display());
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the {what} {} has mode {mode:04o}: other users could read it; run `chmod 600 {}` (and consider it leaked)",
            path.display(),
            path.display()
        );
    }
    // SAFETY: getuid has no failure mode.
    let me = unsafe { libc::getuid() };
    use std::os::unix::fs::MetadataExt;
    if metadata.uid() != me {
        bail!(
            "the {what} {} belongs to uid {}, not to this user (uid {me})",
            path.display(),
            metadata.uid()
        );
    }
    Ok(())
}

/// Creates `path` with mode 0600 holding `contents`; never overwrites an existing file.
pub fn create_new_private(path: &Path, contents: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists; peerbuild never overwrites a key (remove it first, or choose another file)",
                    path.display()
                )
            } else {
                format!("cannot create {}", path.display())
            }
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A new random pool key in the standard `/key/swarm/psk/1.0.0/` file format.
pub fn new_pool_key() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).context("cannot read random bytes for the pool key")?;
    Ok(PreSharedKey::new(bytes).to_key_file())
}

/// Reads a pool key file, refusing one that other users can read.
pub fn load_pool_key(path: &Path) -> Result<PreSharedKey> {
    check_private(path, "pool key")?;
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<PreSharedKey>().map_err(|err| {
        anyhow::anyhow!(
            "{} is not a pool key ({err}); create one with `peerbuild pool init`",
            path.display()
        )
    })
}

/// The API token for loopback TCP: read it, or create a random one (0600).
pub fn load_or_create_token(path: &Path) -> Result<String> {
    if path.exists() {
        check_private(path, "API token")?;
        let token =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let token = token.trim();
        if token.len() >= 32 {
            return Ok(token.to_owned());
        }
        bail!(
            "the API token {} is too short; remove it and a new one is made",
            path.display()
        );
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).context("cannot read random bytes for the API token")?;
    let token = hex(&bytes);
    create_new_private(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_a_reload_and_a_loose_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("identity.key");
        let first = load_or_create_identity(&path).expect("created");
        let again = load_or_create_identity(&path).expect("loaded");
        assert_eq!(first.public(), again.public());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create_identity(&path).expect_err("refused");
        assert!(format!("{err:#}").contains("chmod 600"), "{err:#}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&path, "garbage").expect("write");
        let err = load_or_create_identity(&path).expect_err("refused");
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
    }

    #[test]
    fn pool_keys_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pool.key");
        create_new_private(&path, new_pool_key().expect("key").as_bytes()).expect("written");
        load_pool_key(&path).expect("parses");
        assert!(create_new_private(&path, b"x").is_err());
    }
}
