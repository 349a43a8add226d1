//! The content of a synthetic binary cache, derived from a seed: store
//! hashes, signed narinfos and NAR bodies. The same seed always gives the
//! same cache, so `bench run --synthetic N --seed S` can name the paths of
//! `bench upstream --seed S` without a list file.
//!
//! NAR bodies are a repeating pattern cut to each size; their `NarHash` is
//! the real sha256 of the bytes served, computed once per distinct size.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::proto::base32;
use crate::proto::narinfo::NarInfo;
use crate::proto::signature::{PublicKey, SecretKey};
use crate::proto::store_path::{StoreHash, STORE_DIR};

/// The repeating unit of every NAR body; bodies are sent in slices of it.
pub const PATTERN_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("a synthetic cache needs at least one NAR size")]
    NoSizes,
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The 32-character store hash of path `index`.
pub fn store_hash(seed: u64, index: u64) -> StoreHash {
    let digest = derive(seed, index, b"path");
    let text = base32::encode(&digest[..20]);
    StoreHash::parse(text.as_bytes()).expect("20 bytes encode to 32 base32 characters")
}

/// The NAR URL (relative, as in a narinfo) of path `index`.
pub fn nar_url(seed: u64, index: u64) -> String {
    format!("nar/{}.nar", base32::encode(&derive(seed, index, b"nar")))
}

fn derive(seed: u64, index: u64, what: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ncro-bench\0");
    h.update(seed.to_le_bytes());
    h.update(index.to_le_bytes());
    h.update(what);
    h.finalize().into()
}

/// Byte `i` of every NAR body.
fn pattern() -> Bytes {
    (0..PATTERN_LEN)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// `sha256:<nix-base32>` of a body of `size` bytes of `pattern`.
fn nar_hash(pattern: &[u8], size: u64) -> String {
    let mut h = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        h.update(&pattern[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", base32::encode(&h.finalize()))
}

/// What a path index maps to.
#[derive(Debug, Clone)]
pub struct PathEntry {
    pub index: u64,
    pub narinfo: Bytes,
}

/// A whole synthetic cache in memory. Immutable; shared by server threads.
pub struct Dataset {
    pub seed: u64,
    pub len: u64,
    pub public_key: PublicKey,
    /// NAR sizes; path `i` has size `sizes[i % sizes.len()]`.
    pub sizes: Vec<u64>,
    pub pattern: Bytes,
    pub narinfos: HashMap<StoreHash, PathEntry>,
    /// Keyed by the URL path without its leading `/` (`nar/....nar`).
    pub nars: HashMap<Box<str>, u64>,
}

impl Dataset {
    /// Builds `len` signed narinfos. Costs one signature per path (tens of
    /// microseconds each), so 100 000 paths take a few seconds.
    pub fn build(
        seed: u64,
        len: u64,
        sizes: &[u64],
        key: &SecretKey,
    ) -> Result<Dataset, DatasetError> {
        if sizes.is_empty() {
            return Err(DatasetError::NoSizes);
        }
        let pattern = pattern();
        let mut hashes: HashMap<u64, String> = HashMap::new();
        for &s in sizes {
            hashes.entry(s).or_insert_with(|| nar_hash(&pattern, s));
        }
        let cap = usize::try_from(len).unwrap_or(0);
        let mut narinfos = HashMap::with_capacity(cap);
        let mut nars = HashMap::with_capacity(cap);
        for index in 0..len {
            let size = sizes[(index % sizes.len() as u64) as usize];
            let info = narinfo(seed, len, index, size, &hashes[&size], key);
            narinfos.insert(
                store_hash(seed, index),
                PathEntry {
                    index,
                    narinfo: Bytes::from(info.render()),
                },
            );
            nars.insert(info.url.into_boxed_str(), index);
        }
        Ok(Dataset {
            seed,
            len,
            public_key: key.public(),
            sizes: sizes.to_vec(),
            pattern,
            narinfos,
            nars,
        })
    }

    pub fn nar_size(&self, index: u64) -> u64 {
        self.sizes[(index % self.sizes.len() as u64) as usize]
    }

    /// Writes `hashes.txt` (one store hash per line) and `nars.txt` (one
    /// NAR URL per line) for every path, in index order.
    pub fn write_lists(&self, dir: &Path) -> Result<(), DatasetError> {
        let hashes = (0..self.len).map(|i| store_hash(self.seed, i).to_string());
        write_lines(&dir.join("hashes.txt"), hashes)?;
        let urls = (0..self.len).map(|i| nar_url(self.seed, i));
        write_lines(&dir.join("nars.txt"), urls)
    }
}

/// Path `index`'s narinfo: uncompressed NAR, one reference (the next path,
/// so closures have edges), signed by `key`.
fn narinfo(seed: u64, len: u64, index: u64, size: u64, hash: &str, key: &SecretKey) -> NarInfo {
    let base = |i: u64| format!("{}-bench-{i}", store_hash(seed, i));
    let references = if len > 1 {
        vec![base((index + 1) % len)]
    } else {
        Vec::new()
    };
    let mut info = NarInfo {
        store_path: format!("{STORE_DIR}/{}", base(index)),
        url: nar_url(seed, index),
        compression: Some("none".into()),
        file_hash: Some(hash.to_owned()),
        file_size: Some(size),
        nar_hash: hash.to_owned(),
        nar_size: size,
        references,
        ..NarInfo::default()
    };
    info.sigs = vec![key.sign(&info.fingerprint())];
    info
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> Result<(), DatasetError> {
    let err = |source| DatasetError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(err)?;
    let mut out = std::io::BufWriter::new(file);
    for line in lines {
        writeln!(out, "{line}").map_err(err)?;
    }
    out.flush().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::signature::{verify_narinfo, Verdict};

    fn key() -> SecretKey {
        SecretKey::generate("bench-test-1").unwrap()
    }

    #[test]
    fn hashes_are_deterministic_valid_and_seeded() {
        assert_eq!(store_hash(1, 5), store_hash(1, 5));
        assert_ne!(store_hash(1, 5), store_hash(1, 6));
        assert_ne!(store_hash(1, 5), store_hash(2, 5));
        assert_eq!(store_hash(1, 5).as_str().len(), 32);
        let url = nar_url(1, 5);
        assert!(url.starts_with("nar/") && url.ends_with(".nar") && url.len() == 4 + 52 + 4);
    }

    #[test]
    fn narinfos_parse_verify_and_name_their_nar() {
        let k = key();
        let d = Dataset::build(3, 20, &[1000, 70_000], &k).unwrap();
        assert_eq!(d.narinfos.len(), 20);
        assert_eq!(d.nars.len(), 20);
        for i in [0u64, 1, 19] {
            let e = &d.narinfos[&store_hash(3, i)];
            assert_eq!(e.index, i);
            let info = NarInfo::parse(&e.narinfo).unwrap();
            assert_eq!(info.store_hash(), store_hash(3, i));
            assert_eq!(info.url, nar_url(3, i));
            assert_eq!(d.nars[info.url.as_str()], i);
            assert_eq!(info.nar_size, d.nar_size(i));
            assert_eq!(info.references.len(), 1);
            let verdict = verify_narinfo(&info, &[k.public()]);
            assert!(matches!(verdict, Verdict::Valid { .. }), "{verdict:?}");
        }
    }

    #[test]
    fn nar_hash_is_the_hash_of_the_served_bytes() {
        let d = Dataset::build(1, 2, &[100_000], &key()).unwrap();
        // What the server sends: the pattern repeated, cut to the size.
        let mut body = Vec::new();
        while body.len() < 100_000 {
            let n = (100_000 - body.len()).min(PATTERN_LEN);
            body.extend_from_slice(&d.pattern[..n]);
        }
        let want = format!("sha256:{}", base32::encode(&Sha256::digest(&body)));
        let info = NarInfo::parse(&d.narinfos[&store_hash(1, 0)].narinfo).unwrap();
        assert_eq!(info.nar_hash, want);
        assert!(Dataset::build(1, 2, &[], &key()).is_err());
    }

    #[test]
    fn lists_name_every_path() {
        let d = Dataset::build(4, 3, &[10], &key()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        d.write_lists(dir.path()).unwrap();
        let hashes = std::fs::read_to_string(dir.path().join("hashes.txt")).unwrap();
        let want: Vec<String> = (0..3).map(|i| store_hash(4, i).to_string()).collect();
        assert_eq!(hashes.lines().collect::<Vec<_>>(), want);
        let nars = std::fs::read_to_string(dir.path().join("nars.txt")).unwrap();
        assert_eq!(nars.lines().nth(2), Some(nar_url(4, 2).as_str()));
    }
}
