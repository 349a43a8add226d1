//! NixBloom: the Bloom filter of its store paths that a binary cache
//! announces with a `BloomFilter:` line in `nix-cache-info` (Determinate's
//! `nix-423` branch; shared/notes/cache-index.md §3.6).
//!
//! Layout, little-endian: `NixBloom` (8 bytes), version (u64, 1), k (u64),
//! m (u64, bits, a multiple of 8), then m/8 bytes of bits; the body is
//! exactly `32 + m/8` bytes. Bit `p` is `bits[p / 8] >> (p % 8) & 1`. A
//! hash is tested from its Nix32-decoded bytes: `h1` = u64 LE of bytes
//! 0..8, `h2` of bytes 8..16, positions `(h1 + i·h2 mod 2⁶⁴) mod m` for
//! `i < k`. Store hashes are already uniform, so nothing is hashed again.

use std::f64::consts::LN_2;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::store_path::{StoreHash, NIX_BASE32_ALPHABET};

pub const MAGIC: &[u8; 8] = b"NixBloom";
pub const HEADER_LEN: usize = 32;
pub const VERSION: u64 = 1;
/// More hash functions than this is no sensible filter (k ≈ 0.7·m/n); the
/// bound also bounds what one check costs a worker.
pub const MAX_K: u64 = 64;
/// Filters ncro builds are sized for at least this many paths. The
/// format's positions `h1 + i·h2` step through a bit array whose size is a
/// multiple of 8, so a probe whose `h2` shares factors with `m` touches
/// only a fraction of it; in a filter of a few dozen bits that makes the
/// real false-positive rate far above the planned one (measured: one path
/// at a planned 10⁻⁹ gives m = 48 and 3.6 % false positives; ten paths at
/// 1 % give 1.9 %). From about a thousand paths up the effect is below
/// 1/m and negligible, and the floor costs at most a few kilobytes.
pub const MIN_SIZED_PATHS: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BloomError {
    #[error("NixBloom body is {0} bytes, shorter than its 32-byte header")]
    TooShort(usize),
    #[error("not a NixBloom filter (bad magic)")]
    BadMagic,
    #[error("NixBloom version {0} is not supported (only 1)")]
    Version(u64),
    #[error("NixBloom k = {0} is outside 1..={MAX_K}")]
    BadK(u64),
    #[error("NixBloom m = {0} is not a positive multiple of 8")]
    BadM(u64),
    #[error("NixBloom body is {got} bytes; its header says {expected}")]
    SizeMismatch { expected: u64, got: usize },
}

const fn digit_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < NIX_BASE32_ALPHABET.len() {
        t[NIX_BASE32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
}

static DIGIT: [u8; 256] = digit_table();

/// The two 64-bit values a membership test starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub h1: u64,
    pub h2: u64,
}

impl Probe {
    /// From a store hash, without decoding it to bytes: Nix32 puts the
    /// last character in the lowest bits, so folding all 32 characters
    /// into a `u128` (the shifts drop what overflows) leaves exactly the
    /// decoded bytes 0..16 read as a little-endian integer.
    #[inline]
    pub fn of(hash: &StoreHash) -> Probe {
        let mut acc: u128 = 0;
        for &c in hash.as_bytes() {
            acc = (acc << 5) | u128::from(DIGIT[usize::from(c)]);
        }
        Probe::from_low128(acc)
    }

    /// From the low 128 bits of the hash read as a 160-bit integer (first
    /// character most significant), as the RFC 0195 index stores it.
    #[inline]
    pub fn from_low128(v: u128) -> Probe {
        Probe {
            h1: v as u64,
            h2: (v >> 64) as u64,
        }
    }

    #[inline]
    fn position(self, i: u64, m: u64) -> u64 {
        self.h1.wrapping_add(i.wrapping_mul(self.h2)) % m
    }
}

/// A checked filter. `body` is the whole serialised filter (header
/// included), shared rather than copied, so it can be served as is.
#[derive(Debug, Clone)]
pub struct Bloom {
    k: u64,
    m: u64,
    body: Bytes,
}

impl Bloom {
    pub fn parse(body: impl Into<Bytes>) -> Result<Bloom, BloomError> {
        let body = body.into();
        if body.len() < HEADER_LEN {
            return Err(BloomError::TooShort(body.len()));
        }
        if &body[..8] != MAGIC {
            return Err(BloomError::BadMagic);
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (version, k, m) = (word(8), word(16), word(24));
        if version != VERSION {
            return Err(BloomError::Version(version));
        }
        if !(1..=MAX_K).contains(&k) {
            return Err(BloomError::BadK(k));
        }
        if m == 0 || m % 8 != 0 {
            return Err(BloomError::BadM(m));
        }
        let expected = HEADER_LEN as u64 + m / 8;
        if body.len() as u64 != expected {
            return Err(BloomError::SizeMismatch {
                expected,
                got: body.len(),
            });
        }
        Ok(Bloom { k, m, body })
    }

    /// False only when the path is certainly not in the set.
    #[inline]
    pub fn may_contain(&self, p: Probe) -> bool {
        let bits = &self.body[HEADER_LEN..];
        (0..self.k).all(|i| {
            let pos = p.position(i, self.m);
            // `pos < m` and `bits.len() == m / 8` (checked by `parse`).
            bits[(pos / 8) as usize] >> (pos % 8) & 1 == 1
        })
    }

    pub fn k(&self) -> u64 {
        self.k
    }

    /// Size of the bit array in bits.
    pub fn m(&self) -> u64 {
        self.m
    }

    /// The serialised filter, as served and as fetched.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// `(k, m)` for `n` paths at false-positive rate `p`, the format's own
/// rule: `m = ⌈−n·ln p / ln²2⌉` rounded up to a multiple of 8 and
/// `k = max(1, round(m/n · ln 2))`; an empty set gets `m = 8, k = 1`.
pub fn params(n: u64, p: f64) -> (u64, u64) {
    if n == 0 {
        return (1, 8);
    }
    let bits = (-(n as f64) * p.ln() / (LN_2 * LN_2)).ceil().max(8.0) as u64;
    let m = bits.div_ceil(8) * 8;
    let k = ((m as f64 / n as f64) * LN_2)
        .round()
        .clamp(1.0, MAX_K as f64) as u64;
    (k, m)
}

/// Builds a filter for a known number of paths.
pub struct BloomBuilder {
    k: u64,
    m: u64,
    bits: Vec<u8>,
}

impl BloomBuilder {
    /// Sized for `n` paths at false-positive rate `p` ([`params`]).
    pub fn new(n: u64, p: f64) -> BloomBuilder {
        let (k, m) = params(n, p);
        BloomBuilder {
            k,
            m,
            bits: vec![0; (m / 8) as usize],
        }
    }

    /// Sized for `max(n, MIN_SIZED_PATHS)` paths: what ncro publishes and
    /// builds for itself, so small sets keep the planned rate.
    pub fn roomy(n: u64, p: f64) -> BloomBuilder {
        BloomBuilder::new(n.max(MIN_SIZED_PATHS), p)
    }

    pub fn insert(&mut self, p: Probe) {
        for i in 0..self.k {
            let pos = p.position(i, self.m);
            self.bits[(pos / 8) as usize] |= 1 << (pos % 8);
        }
    }

    pub fn finish(self) -> Bloom {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.bits.len());
        out.put_slice(MAGIC);
        out.put_u64_le(VERSION);
        out.put_u64_le(self.k);
        out.put_u64_le(self.m);
        out.put_slice(&self.bits);
        Bloom {
            k: self.k,
            m: self.m,
            body: out.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::base32;

    fn hash(s: &str) -> StoreHash {
        StoreHash::parse(s.as_bytes()).unwrap()
    }

    /// `nix-hash --type sha1 --to-base32` of sha1("abc") (pinned in
    /// proto::base32): its Nix32 decoding is the digest a9993e36 4706816a
    /// ba3e2571 7850c26c 9cd0d89d, so h1 and h2 are its first two
    /// little-endian words.
    #[test]
    fn probe_reads_the_nix32_decoded_bytes_little_endian() {
        let p = Probe::of(&hash("kpcd173cq987hw957sx6m0868wv3x6d9"));
        assert_eq!(p.h1, 0x6a81_0647_363e_99a9);
        assert_eq!(p.h2, 0x6cc2_5078_7125_3eba);
    }

    #[test]
    fn probe_agrees_with_base32_decode_for_many_hashes() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..500 {
            let s: String = (0..32)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(NIX_BASE32_ALPHABET[(x % 32) as usize])
                })
                .collect();
            let bytes = base32::decode(&s).unwrap();
            let word = |r: std::ops::Range<usize>| u64::from_le_bytes(bytes[r].try_into().unwrap());
            let p = Probe::of(&hash(&s));
            assert_eq!((p.h1, p.h2), (word(0..8), word(8..16)), "{s}");
        }
    }

    /// The format's own example: 500 000 paths at 1 % give k = 7 and
    /// m ≈ 4.7·10⁶ bits, about 590 KB on the wire.
    #[test]
    fn sizing_follows_the_format_rule() {
        let (k, m) = params(500_000, 0.01);
        assert_eq!(k, 7);
        assert_eq!(m, 4_792_536, "⌈4 792 529.1⌉ rounded up to a multiple of 8");
        assert!((580_000..610_000).contains(&(HEADER_LEN as u64 + m / 8)));
        assert_eq!(params(0, 0.01), (1, 8), "empty set: the minimal filter");
        assert_eq!(params(1, 0.5), (6, 8), "never fewer than 8 bits");
    }

    #[test]
    fn header_layout_is_exact() {
        let mut b = BloomBuilder::new(0, 0.01);
        b.insert(Probe { h1: 3, h2: 0 });
        let bloom = b.finish();
        let body = bloom.body();
        assert_eq!(&body[..8], b"NixBloom");
        assert_eq!(&body[8..16], &1u64.to_le_bytes());
        assert_eq!(&body[16..24], &1u64.to_le_bytes(), "k");
        assert_eq!(&body[24..32], &8u64.to_le_bytes(), "m");
        assert_eq!(&body[32..], &[0b0000_1000], "bit 3 of byte 0");
        assert!(bloom.may_contain(Probe { h1: 11, h2: 7 }), "11 mod 8 = 3");
        assert!(!bloom.may_contain(Probe { h1: 4, h2: 0 }));
    }

    /// Filters written by hand with k = 2, m = 24: for h1 = 1 and
    /// h2 = 2^64 − 1 the second position is (1 + 2^64 − 1) mod 2^64 = 0,
    /// while computing without the wrap would give 2^64 mod 24 = 16.
    #[test]
    fn positions_wrap_modulo_2_64_before_mod_m() {
        let filter = |bits: [u8; 3]| {
            let mut body = b"NixBloom".to_vec();
            for w in [1u64, 2, 24] {
                body.extend_from_slice(&w.to_le_bytes());
            }
            body.extend_from_slice(&bits);
            Bloom::parse(Bytes::from(body)).unwrap()
        };
        let p = Probe {
            h1: 1,
            h2: u64::MAX,
        };
        assert!(filter([0b0000_0011, 0, 0]).may_contain(p), "bits 1 and 0");
        assert!(
            !filter([0b0000_0010, 0, 0b0000_0001]).may_contain(p),
            "not bit 16"
        );
    }

    #[test]
    fn rejects_malformed_bodies() {
        let good = {
            let mut b = BloomBuilder::new(10, 0.01);
            b.insert(Probe::of(&hash("kpcd173cq987hw957sx6m0868wv3x6d9")));
            b.finish().body().to_vec()
        };
        assert!(Bloom::parse(Bytes::from(good.clone())).is_ok());
        let with = |at: usize, word: u64| {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&word.to_le_bytes());
            Bloom::parse(Bytes::from(b)).unwrap_err()
        };
        assert_eq!(with(8, 2), BloomError::Version(2));
        assert_eq!(with(16, 0), BloomError::BadK(0));
        assert_eq!(with(16, 65), BloomError::BadK(65));
        assert_eq!(with(24, 12), BloomError::BadM(12));
        assert!(matches!(with(24, 8), BloomError::SizeMismatch { .. }));
        let mut magic = good.clone();
        magic[0] = b'n';
        assert_eq!(
            Bloom::parse(Bytes::from(magic)).unwrap_err(),
            BloomError::BadMagic
        );
        let short = Bytes::from(good[..31].to_vec());
        assert_eq!(Bloom::parse(short).unwrap_err(), BloomError::TooShort(31));
        let long = Bytes::from([good.as_slice(), &[0]].concat());
        assert!(matches!(
            Bloom::parse(long),
            Err(BloomError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn no_false_negatives_and_about_the_planned_false_positive_rate() {
        let probes: Vec<Probe> = (0..20_000u64)
            .map(|i| {
                let h1 = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Probe {
                    h1,
                    h2: h1.rotate_left(29) ^ 0xD6E8_FEB8_6659_FD93,
                }
            })
            .collect();
        let (members, others) = probes.split_at(10_000);
        let mut b = BloomBuilder::new(members.len() as u64, 0.01);
        members.iter().for_each(|&p| b.insert(p));
        let bloom = Bloom::parse(b.finish().body().clone()).unwrap();
        assert!(members.iter().all(|&p| bloom.may_contain(p)));
        let fp = others.iter().filter(|&&p| bloom.may_contain(p)).count();
        assert!(fp < 250, "{fp} false positives in 10 000 (planned 1 %)");
    }

    /// Random members and probes (splitmix64), `sets` filters of `n`
    /// paths each: the share of non-members that pass.
    fn measured_false_positives(build: fn(u64, f64) -> BloomBuilder, n: u64, p: f64) -> f64 {
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let (sets, probes) = (200, 2_000);
        let mut passed = 0;
        for _ in 0..sets {
            let mut b = build(n, p);
            for _ in 0..n {
                b.insert(Probe {
                    h1: next(),
                    h2: next(),
                });
            }
            let bloom = b.finish();
            passed += (0..probes)
                .filter(|_| {
                    bloom.may_contain(Probe {
                        h1: next(),
                        h2: next(),
                    })
                })
                .count();
        }
        passed as f64 / f64::from(sets * probes)
    }

    #[test]
    fn small_filters_built_by_the_format_rule_miss_their_planned_rate() {
        let fp = measured_false_positives(BloomBuilder::new, 1, 1e-9);
        assert!(fp > 0.01, "one path, planned 1e-9: measured {fp}");
        let fp = measured_false_positives(BloomBuilder::new, 10, 0.01);
        assert!(fp > 0.015, "ten paths, planned 1 %: measured {fp}");
    }

    #[test]
    fn roomy_filters_keep_the_planned_rate_for_small_sets() {
        for (n, p) in [(1, 1e-9), (1, 0.01), (10, 0.01), (100, 0.01), (10, 1e-6)] {
            let fp = measured_false_positives(BloomBuilder::roomy, n, p);
            assert!(fp <= p.max(1e-4), "{n} paths, planned {p}: measured {fp}");
        }
        let (k, m) = (
            BloomBuilder::roomy(5_000, 0.01).k,
            BloomBuilder::roomy(5_000, 0.01).m,
        );
        assert_eq!((k, m), params(5_000, 0.01), "large sets: the format rule");
    }
}
