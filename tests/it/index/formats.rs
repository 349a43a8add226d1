//! Membership summaries as an upstream cache would publish them, written
//! from shared/notes/cache-index.md without `ncro::proto`, so a misreading
//! on either side shows up as a failing test: NixBloom filters and an
//! RFC 0195 index (manifest, ncps-layout shards, journal).

use super::super::fake::nix::NIX_BASE32_ALPHABET;

fn digit(c: u8) -> u8 {
    NIX_BASE32_ALPHABET
        .iter()
        .position(|&a| a == c)
        .expect("Nix-base32 character") as u8
}

/// Nix32 decoding, as the notes give it: the last character fills the
/// lowest five bits of byte 0.
pub fn nix32_decode(hash: &str) -> [u8; 20] {
    let s = hash.as_bytes();
    assert_eq!(s.len(), 32);
    let mut out = [0u8; 20];
    for n in 0..32 {
        let d = u16::from(digit(s[31 - n]));
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        out[i] |= (d << j) as u8;
        if i + 1 < 20 {
            out[i + 1] |= (d >> (8 - j)) as u8;
        }
    }
    out
}

/// A NixBloom filter of `hashes`, sized by the format's rule for
/// `sized_for` paths at false-positive rate `p`.
pub fn nixbloom(hashes: &[&str], sized_for: usize, p: f64) -> Vec<u8> {
    let n = sized_for as f64;
    let ln2 = std::f64::consts::LN_2;
    let (m, k) = if sized_for == 0 {
        (8u64, 1u64)
    } else {
        let m = ((-n * p.ln() / (ln2 * ln2)).ceil() as u64)
            .div_ceil(8)
            .max(1)
            * 8;
        (m, ((m as f64 / n) * ln2).round().max(1.0) as u64)
    };
    let mut bits = vec![0u8; (m / 8) as usize];
    for h in hashes {
        let b = nix32_decode(h);
        let h1 = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let h2 = u64::from_le_bytes(b[8..16].try_into().unwrap());
        for i in 0..k {
            let pos = h1.wrapping_add(i.wrapping_mul(h2)) % m;
            bits[(pos / 8) as usize] |= 1 << (pos % 8);
        }
    }
    let mut out = b"NixBloom".to_vec();
    for w in [1u64, k, m] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&bits);
    out
}

/// A hash as 160 bits, most significant first.
fn key_bits(hash: &str) -> Vec<bool> {
    hash.bytes()
        .flat_map(|c| (0..5).rev().map(move |b| digit(c) >> b & 1 == 1))
        .collect()
}

/// Big-endian bit strings of equal length: `a - b` (a ≥ b).
fn sub(a: &[bool], b: &[bool]) -> Vec<bool> {
    let mut out = vec![false; a.len()];
    let mut borrow = false;
    for i in (0..a.len()).rev() {
        let d = i8::from(a[i]) - i8::from(b[i]) - i8::from(borrow);
        out[i] = d.rem_euclid(2) == 1;
        borrow = d < 0;
    }
    assert!(!borrow, "a < b");
    out
}

/// `v >> k` as a count (the unary quotient), for small quotients.
fn quotient(v: &[bool], k: usize) -> u64 {
    let high = &v[..v.len() - k];
    high.iter().fold(0u64, |acc, &b| {
        acc.checked_mul(2).expect("quotient fits u64") + u64::from(b)
    })
}

#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    len: usize,
}

impl Bits {
    fn push(&mut self, b: bool) {
        if self.len % 8 == 0 {
            self.bytes.push(0);
        }
        if b {
            self.bytes[self.len / 8] |= 0x80 >> (self.len % 8);
        }
        self.len += 1;
    }
    fn pad(&mut self) {
        self.len = self.bytes.len() * 8;
    }
}

/// One shard in ncps's layout: MSB-first, the first suffix raw, Golomb-Rice
/// gaps with parameter `k`, zero padding after item 0 and every 256th,
/// sparse offsets just after those items, XXH64 (seed 0) of the data.
pub fn shard(hashes: &[&str], depth: usize, k: u8) -> Vec<u8> {
    let mut suffixes: Vec<Vec<bool>> = hashes
        .iter()
        .map(|h| key_bits(h)[5 * depth..].to_vec())
        .collect();
    suffixes.sort();
    let mut data = Bits::default();
    let mut sparse = Vec::new();
    for (i, s) in suffixes.iter().enumerate() {
        if i == 0 {
            s.iter().for_each(|&b| data.push(b));
        } else {
            let gap = sub(s, &suffixes[i - 1]);
            (0..quotient(&gap, k.into())).for_each(|_| data.push(true));
            data.push(false);
            gap[gap.len() - usize::from(k)..]
                .iter()
                .for_each(|&b| data.push(b));
        }
        if i % 256 == 0 {
            data.pad();
            let mut value = vec![false; 160 - s.len()];
            value.extend_from_slice(s);
            let bytes: Vec<u8> = value
                .chunks(8)
                .map(|c| c.iter().fold(0u8, |a, &b| a << 1 | u8::from(b)))
                .collect();
            sparse.extend_from_slice(&bytes);
            sparse.extend_from_slice(&((data.len / 8) as u64).to_le_bytes());
        }
    }
    let mut f = b"NIXIDX01".to_vec();
    f.extend_from_slice(&(suffixes.len() as u64).to_le_bytes());
    f.push(k);
    f.push((160 - 5 * depth) as u8);
    f.extend_from_slice(&64u64.to_le_bytes());
    f.extend_from_slice(&((sparse.len() / 28) as u64).to_le_bytes());
    f.extend_from_slice(&xxhash_rust::xxh64::xxh64(&data.bytes, 0).to_le_bytes());
    f.resize(64, 0);
    f.extend_from_slice(&sparse);
    f.extend_from_slice(&data.bytes);
    f
}

/// An RFC 0195 index of `hashes` at `depth`: `(path, body)` for the
/// manifest and every shard of epoch 1. The journal is the caller's: its
/// current segment is `journal/1000.log`, no older ones are kept (ncro
/// also asks for `journal/700.log`, the one rotated last, and gets a 404).
pub fn rfc_index(hashes: &[&str], depth: usize) -> Vec<(String, Vec<u8>)> {
    let manifest = serde_json::json!({
        "version": 1,
        "format": "hlssi",
        "created_at": "2026-01-15T12:00:00Z",
        "item_count": hashes.len(),
        "sharding": { "depth": depth, "alphabet": std::str::from_utf8(NIX_BASE32_ALPHABET).unwrap() },
        "encoding": { "type": "golomb-rice", "parameter": 150 - 5 * depth, "hash_bits": 160, "prefix_bits": 5 * depth },
        "journal": { "current_segment": 1000, "segment_duration_seconds": 300, "retention_count": 0 },
        "epoch": { "current": 1, "previous": 0 },
        "deltas": { "enabled": false, "oldest_base": 0, "compression": "none" }
    });
    let mut files = vec![(
        "/nix-cache-index/manifest.json".to_owned(),
        manifest.to_string().into_bytes(),
    )];
    let prefixes: Vec<String> = if depth == 0 {
        vec!["root".to_owned()]
    } else {
        assert_eq!(depth, 1, "the tests use depth 0 or 1");
        NIX_BASE32_ALPHABET
            .iter()
            .map(|&c| char::from(c).to_string())
            .collect()
    };
    for p in prefixes {
        let mine: Vec<&str> = hashes
            .iter()
            .copied()
            .filter(|h| p == "root" || h.starts_with(p.as_str()))
            .collect();
        let k = (150 - 5 * depth) as u8;
        let path = format!("/nix-cache-index/shards/1/{p}.idx");
        files.push((path, shard(&mine, depth, k)));
    }
    files
}

/// The random hashes of the tests sit far apart (mean gap near 2^150 at
/// depth 1 for a handful of paths), so `k = 150 - 5·depth` keeps every
/// quotient tiny; a real writer picks k from the mean gap the same way.
#[test]
fn writer_self_check() {
    let h = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    let b = nix32_decode(h);
    assert_eq!(super::super::fake::nix::nix_base32(&b), h);
    let bloom = nixbloom(&[h], 1, 0.01);
    assert_eq!(bloom.len(), 32 + 2);
    let s = shard(&[h, "kpcd173cq987hw957sx6m0868wv3x6d9"], 0, 150);
    assert_eq!(&s[..8], b"NIXIDX01");
}
