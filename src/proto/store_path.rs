//! Store path hashes: the 32 Nix-base32 characters that name a store path
//! and its `<hash>.narinfo`.
//!
//! Every request path that names a hash goes through [`StoreHash::parse`]
//! before anything else happens, so an invalid name never reaches an
//! upstream URL, an S3 key, a metric or the database.

use std::fmt;

/// Nix's base32 alphabet (no e, o, u, t).
pub const NIX_BASE32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of a store path hash in characters.
pub const HASH_LEN: usize = 32;

/// The store directory every cache we serve uses.
pub const STORE_DIR: &str = "/nix/store";

const fn build_valid_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < NIX_BASE32_ALPHABET.len() {
        t[NIX_BASE32_ALPHABET[i] as usize] = true;
        i += 1;
    }
    t
}

static VALID: [bool; 256] = build_valid_table();

/// True if `b` is a Nix-base32 character.
#[inline]
pub fn is_base32_char(b: u8) -> bool {
    VALID[b as usize]
}

/// A validated store path hash. Stored as its ASCII characters so it can be
/// used as a map key and written into URLs without conversion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreHash([u8; HASH_LEN]);

impl StoreHash {
    /// Accepts exactly 32 Nix-base32 characters.
    #[inline]
    pub fn parse(s: &[u8]) -> Option<Self> {
        if s.len() != HASH_LEN || !s.iter().all(|&b| is_base32_char(b)) {
            return None;
        }
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(s);
        Some(StoreHash(out))
    }

    /// The hash part of a full store path (`/nix/store/<hash>-<name>`).
    pub fn from_store_path(path: &str) -> Option<Self> {
        let base = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
        let hash = base.as_bytes().get(..HASH_LEN)?;
        if base.as_bytes().get(HASH_LEN) != Some(&b'-') {
            return None;
        }
        Self::parse(hash)
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        // Only base32 ASCII characters are ever stored.
        std::str::from_utf8(&self.0).expect("store hash is ASCII")
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }
}

impl fmt::Display for StoreHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StoreHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreHash({})", self.as_str())
    }
}

/// The name part of a store path basename (`<hash>-<name>` -> `<name>`).
pub fn name_of(path_or_basename: &str) -> &str {
    let base = path_or_basename
        .rsplit('/')
        .next()
        .unwrap_or(path_or_basename);
    match base.split_once('-') {
        Some((_, name)) => name,
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_hash() {
        let h = StoreHash::parse(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr").unwrap();
        assert_eq!(h.as_str(), "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr");
    }

    #[test]
    fn rejects_bad_length_and_alphabet() {
        assert!(StoreHash::parse(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5p").is_none());
        assert!(StoreHash::parse(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5prr").is_none());
        // 'e', 'o', 'u', 't' are not in the alphabet; neither are upper case or '/'.
        for bad in [b'e', b'o', b'u', b't', b'A', b'/', b'.', b'%'] {
            let mut s = *b"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
            s[5] = bad;
            assert!(StoreHash::parse(&s).is_none(), "accepted {}", bad as char);
        }
        assert!(StoreHash::parse(b"../../../../../../etc/passwd.....").is_none());
    }

    #[test]
    fn from_store_path_and_name() {
        let p = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12";
        assert_eq!(
            StoreHash::from_store_path(p).unwrap().as_str(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr"
        );
        assert_eq!(name_of(p), "hello-2.12");
        assert_eq!(
            name_of("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x-source-source"),
            "x-source-source"
        );
        assert!(
            StoreHash::from_store_path("/gnu/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x").is_none()
        );
        assert!(
            StoreHash::from_store_path("/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr").is_none()
        );
    }
}
