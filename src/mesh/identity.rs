//! A node's gossip identity: an ed25519 key whose file holds the raw
//! 32-byte seed (or 64 bytes, seed first), as ncro 2.2 writes it. COLD:
//! read once at start (or by `ncro keygen`), never on a worker.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("mesh key {path}: invalid key file size {len}, want 32 or 64 bytes")]
    Size { path: PathBuf, len: usize },
    #[error("mesh key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the key came from, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Loaded,
    Created,
    Ephemeral,
}

pub struct Identity {
    pub key: SigningKey,
    pub origin: Origin,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The seed is a secret: only ever print the public half.
        write!(f, "Identity({}, {:?})", self.public_hex(), self.origin)
    }
}

impl Identity {
    /// `mesh.private_key`: empty means a fresh key for this run only; a
    /// missing file is created (mode 0600, parents as needed).
    pub fn load_or_create(path: &str) -> Result<Identity, IdentityError> {
        if path.is_empty() {
            return Ok(Identity {
                key: SigningKey::from_bytes(&rand::random()),
                origin: Origin::Ephemeral,
            });
        }
        let path = Path::new(path);
        match std::fs::read(path) {
            Ok(bytes) => Ok(Identity {
                key: from_file_bytes(path, &bytes)?,
                origin: Origin::Loaded,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Identity {
                key: write_new(path)?,
                origin: Origin::Created,
            }),
            Err(e) => Err(io(path)(e)),
        }
    }

    /// Lowercase hex of the 32-byte public key (what peers list).
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// ncro 2.2's node id: hex of the first 8 bytes of the public key.
    pub fn node_id(&self) -> String {
        node_id(self.key.verifying_key().as_bytes())
    }
}

pub fn node_id(public: &[u8; 32]) -> String {
    hex::encode(&public[..8])
}

fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<SigningKey, IdentityError> {
    match bytes.len() {
        32 | 64 => {
            let seed: [u8; 32] = bytes[..32].try_into().expect("length checked");
            Ok(SigningKey::from_bytes(&seed))
        }
        len => Err(IdentityError::Size {
            path: path.to_path_buf(),
            len,
        }),
    }
}

/// Writes a fresh random seed to `path`, which must not exist yet. The
/// file is created 0600 (ncro 2.2 left it to the umask); parent
/// directories are created 0700.
pub fn write_new(path: &Path) -> Result<SigningKey, IdentityError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::Exists {
                path: path.to_path_buf(),
            },
            _ => io(path)(e),
        })?;
    let seed: [u8; 32] = rand::random();
    file.write_all(&seed)
        .and_then(|()| file.sync_all())
        .map_err(io(path))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// True when others than the owner may read the key file.
pub fn readable_by_others(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_0600_key_then_loads_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/node.key");
        let p = path.to_str().unwrap();
        let made = Identity::load_or_create(p).unwrap();
        assert_eq!(made.origin, Origin::Created);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        assert!(!readable_by_others(p));
        let loaded = Identity::load_or_create(p).unwrap();
        assert_eq!(loaded.origin, Origin::Loaded);
        assert_eq!(loaded.public_hex(), made.public_hex());
        assert_eq!(loaded.node_id(), made.public_hex()[..16]);
    }

    #[test]
    fn reads_raw_32_and_64_byte_files_and_rejects_others() {
        let dir = tempfile::tempdir().unwrap();
        // The VM test's node a: seed and public key, both hex.
        let seed = hex::decode("f922d1d8bcb79737f9d90fcb77ae6f15c1fe316d37bc9dd694c3fbbce1106cd4")
            .unwrap();
        let public = "da0cfc18462fdd767d1fd1b5d109677814d2c2679a27c1a8c80ad6c809327d75";
        let p32 = dir.path().join("k32");
        std::fs::write(&p32, &seed).unwrap();
        let id = Identity::load_or_create(p32.to_str().unwrap()).unwrap();
        assert_eq!(id.public_hex(), public);
        assert_eq!(id.node_id(), "da0cfc18462fdd76");
        let p64 = dir.path().join("k64");
        let mut both = seed.clone();
        both.extend_from_slice(&hex::decode(public).unwrap());
        std::fs::write(&p64, &both).unwrap();
        let id = Identity::load_or_create(p64.to_str().unwrap()).unwrap();
        assert_eq!(id.public_hex(), public);
        let bad = dir.path().join("k33");
        std::fs::write(&bad, [0u8; 33]).unwrap();
        let err = Identity::load_or_create(bad.to_str().unwrap()).unwrap_err();
        assert!(err
            .to_string()
            .contains("invalid key file size 33, want 32 or 64 bytes"));
    }

    #[test]
    fn empty_path_is_ephemeral_and_keygen_never_overwrites() {
        let a = Identity::load_or_create("").unwrap();
        let b = Identity::load_or_create("").unwrap();
        assert_eq!(a.origin, Origin::Ephemeral);
        assert_ne!(a.public_hex(), b.public_hex());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path).unwrap();
        assert!(matches!(
            write_new(&path),
            Err(IdentityError::Exists { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(readable_by_others(path.to_str().unwrap()));
    }
}
