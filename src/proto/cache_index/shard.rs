//! RFC 0195 shard files: the sorted hashes of one prefix, Golomb-Rice
//! coded (shared/notes/cache-index.md §3.3).
//!
//! A 64-byte little-endian header (`NIXIDX01`, item count, k, suffix bits,
//! sparse-index offset and count, XXH64 of the encoded data), a sparse
//! index of 28-byte entries (20-byte big-endian suffix, u64 LE offset) for
//! every 256th item, then the encoded data: the first suffix raw, then the
//! gaps between successive suffixes as a unary quotient (`d >> k` one-bits
//! and a zero) and a k-bit remainder.
//!
//! The RFC leaves the bit-level details open; the only implementation
//! (ncps) writes bits MSB-first, pads to a byte boundary after item 0 and
//! after every 256th item, and hashes the encoded section with XXH64 seed
//! 0. That is what is decoded here. Where the readings disagree (does a
//! sparse offset point at its item's code or just after it?) either is
//! accepted, because every sparse entry is checked against the decoded
//! stream: a shard written under another reading fails those checks and is
//! refused (the caller then races as usual) instead of being misread.

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"NIXIDX01";
pub const HEADER_LEN: usize = 64;
pub const SPARSE_ENTRY_LEN: usize = 28;
/// One sparse-index entry per this many items.
pub const SPARSE_EVERY: u64 = 256;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShardError {
    #[error("shard is {0} bytes, shorter than its header")]
    TooShort(usize),
    #[error("not an RFC 0195 shard (bad magic)")]
    BadMagic,
    #[error("shard header field {0} is inconsistent")]
    Header(&'static str),
    #[error("shard holds {0} items, over the configured limit")]
    TooManyItems(u64),
    #[error("shard checksum does not match its encoded data")]
    Checksum,
    #[error("shard data is not a valid encoding of its items (at item {0})")]
    Data(u64),
    #[error("shard sparse index entry {0} does not match the data")]
    Sparse(u64),
}

/// A 160-bit unsigned integer: a store hash read big-endian, first
/// character most significant (so hashes and integers sort alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct U160 {
    hi: u32,
    lo: u128,
}

impl U160 {
    pub const ZERO: U160 = U160 { hi: 0, lo: 0 };

    pub fn from_u64(v: u64) -> U160 {
        U160 {
            hi: 0,
            lo: u128::from(v),
        }
    }

    pub fn from_be_bytes(b: &[u8; 20]) -> U160 {
        let mut hi = [0u8; 4];
        let mut lo = [0u8; 16];
        hi.copy_from_slice(&b[..4]);
        lo.copy_from_slice(&b[4..]);
        U160 {
            hi: u32::from_be_bytes(hi),
            lo: u128::from_be_bytes(lo),
        }
    }

    /// The low 128 bits (what a NixBloom probe reads).
    pub fn low128(self) -> u128 {
        self.lo
    }

    /// Bits needed to write the value (0 for zero).
    pub fn bit_len(self) -> u32 {
        if self.hi != 0 {
            160 - self.hi.leading_zeros()
        } else {
            128 - self.lo.leading_zeros()
        }
    }

    /// `self << n`, or `None` when set bits would be shifted out.
    pub fn checked_shl(self, n: u32) -> Option<U160> {
        if self == U160::ZERO {
            return Some(self);
        }
        if self.bit_len() + n > 160 {
            return None;
        }
        let wide = (u128::from(self.hi), self.lo);
        let (hi, lo) = match n {
            0 => wide,
            1..=127 => ((wide.0 << n) | (wide.1 >> (128 - n)), wide.1 << n),
            _ => (wide.1 << (n - 128), 0),
        };
        Some(U160 { hi: hi as u32, lo })
    }

    pub fn checked_add(self, o: U160) -> Option<U160> {
        let (lo, carry) = self.lo.overflowing_add(o.lo);
        let hi = self.hi.checked_add(o.hi)?.checked_add(u32::from(carry))?;
        Some(U160 { hi, lo })
    }

    /// `self | o` for values with no common bits (a shifted quotient and
    /// its remainder), as addition.
    fn join(self, o: U160) -> Option<U160> {
        self.checked_add(o)
    }
}

/// The 64-byte shard header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub count: u64,
    pub k: u8,
    pub suffix_bits: u8,
    pub sparse_offset: u64,
    pub sparse_count: u64,
    pub checksum: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, ShardError> {
        if b.len() < HEADER_LEN {
            return Err(ShardError::TooShort(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(ShardError::BadMagic);
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Ok(Header {
            count: word(8),
            k: b[16],
            suffix_bits: b[17],
            sparse_offset: word(18),
            sparse_count: word(26),
            checksum: word(34),
        })
    }
}

/// MSB-first bit reader over the encoded section.
struct Bits<'a> {
    data: &'a [u8],
    pos: u64,
}

impl Bits<'_> {
    fn remaining(&self) -> u64 {
        (self.data.len() as u64 * 8).saturating_sub(self.pos)
    }

    /// Up to 8 bits from the current byte (`n` ≤ bits left in it).
    fn take_in_byte(&mut self, n: u32) -> u8 {
        let byte = self.data[(self.pos / 8) as usize];
        let used = (self.pos % 8) as u32;
        self.pos += u64::from(n);
        let v = (u16::from(byte) << used) as u8;
        (u16::from(v) >> (8 - n)) as u8
    }

    fn read(&mut self, mut n: u32) -> Option<U160> {
        if u64::from(n) > self.remaining() {
            return None;
        }
        let mut acc = U160::ZERO;
        while n > 0 {
            let take = n.min(8 - (self.pos % 8) as u32);
            let v = self.take_in_byte(take);
            acc = acc.checked_shl(take)?.join(U160::from_u64(u64::from(v)))?;
            n -= take;
        }
        Some(acc)
    }

    /// One-bits up to the terminating zero (which is consumed).
    fn unary(&mut self) -> Option<u64> {
        let mut q = 0u64;
        loop {
            if self.remaining() == 0 {
                return None;
            }
            let left = 8 - (self.pos % 8) as u32;
            let byte = self.data[(self.pos / 8) as usize] << (8 - left);
            let ones = byte.leading_ones().min(left);
            self.pos += u64::from(ones);
            q += u64::from(ones);
            if ones < left {
                self.pos += 1;
                return Some(q);
            }
        }
    }

    /// Skips to the next byte boundary; the skipped bits must be zero.
    fn align(&mut self) -> bool {
        let pad = ((8 - self.pos % 8) % 8) as u32;
        pad == 0 || self.take_in_byte(pad) == 0
    }
}

/// Decodes a shard of the prefix `prefix` (its value, `depth` characters
/// of 5 bits) and calls `item` with every full 160-bit key in ascending
/// order. On an error some keys may already have been passed: the caller
/// must drop them. Refuses more than `max_items` items before decoding.
pub fn decode(
    bytes: &[u8],
    depth: u8,
    prefix: u32,
    max_items: u64,
    mut item: impl FnMut(U160),
) -> Result<u64, ShardError> {
    let h = Header::parse(bytes)?;
    let prefix_bits = 5 * u32::from(depth);
    let suffix_bits = 160 - prefix_bits;
    if u32::from(h.suffix_bits) != suffix_bits {
        return Err(ShardError::Header("suffix bits"));
    }
    if u32::from(h.k) > suffix_bits {
        return Err(ShardError::Header("k"));
    }
    if h.count > max_items {
        return Err(ShardError::TooManyItems(h.count));
    }
    let data_start = data_start(&h, bytes.len()).ok_or(ShardError::Header("sparse index"))?;
    if h.sparse_count > h.count.div_ceil(SPARSE_EVERY) {
        return Err(ShardError::Header("sparse count"));
    }
    let data = &bytes[data_start..];
    if checksum(data) != h.checksum {
        return Err(ShardError::Checksum);
    }
    let sparse = &bytes[h.sparse_offset as usize..data_start];
    let base = U160::from_u64(u64::from(prefix))
        .checked_shl(suffix_bits)
        .ok_or(ShardError::Header("prefix"))?;
    let mut bits = Bits { data, pos: 0 };
    let mut prev = U160::ZERO;
    for i in 0..h.count {
        let start = bits.pos;
        let value = if i == 0 {
            bits.read(suffix_bits)
        } else {
            next_gap(&mut bits, h.k).and_then(|d| prev.checked_add(d))
        };
        let value = value
            .filter(|v| v.bit_len() <= suffix_bits)
            .ok_or(ShardError::Data(i))?;
        if i % SPARSE_EVERY == 0 && !bits.align() {
            return Err(ShardError::Data(i));
        }
        check_sparse(sparse, i, value, start, bits.pos)?;
        item(base.join(value).ok_or(ShardError::Data(i))?);
        prev = value;
    }
    if bits.pos.div_ceil(8) != data.len() as u64 || !bits.align() {
        return Err(ShardError::Data(h.count));
    }
    Ok(h.count)
}

/// The next Golomb-Rice gap; zero is refused (a set has no duplicates).
fn next_gap(bits: &mut Bits, k: u8) -> Option<U160> {
    let q = bits.unary()?;
    let r = bits.read(u32::from(k))?;
    let d = U160::from_u64(q).checked_shl(u32::from(k))?.join(r)?;
    (d != U160::ZERO).then_some(d)
}

/// Item `i` (coded from bit `start`, decoding continuing at bit `end`)
/// against its sparse entry, if it has one: same suffix, and an offset at
/// the byte where its code starts or where decoding resumes after it.
fn check_sparse(
    sparse: &[u8],
    i: u64,
    value: U160,
    start: u64,
    end: u64,
) -> Result<(), ShardError> {
    if i % SPARSE_EVERY != 0 {
        return Ok(());
    }
    let j = i / SPARSE_EVERY;
    let at = j as usize * SPARSE_ENTRY_LEN;
    let Some(entry) = sparse.get(at..at + SPARSE_ENTRY_LEN) else {
        return Ok(()); // fewer entries than items allow; checked where present
    };
    let mut v = [0u8; 20];
    v.copy_from_slice(&entry[..20]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&entry[20..]);
    let offset = u64::from_le_bytes(o);
    let at_start = start % 8 == 0 && offset == start / 8;
    let after = offset * 8 == end;
    if U160::from_be_bytes(&v) != value || !(at_start || after) {
        return Err(ShardError::Sparse(j));
    }
    Ok(())
}

/// The checksum a shard header carries for its encoded-data section:
/// XXH64, seed 0.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(data, 0)
}

/// Where the encoded data starts, from the header's sparse-index fields,
/// if they fit in `len` bytes.
pub fn data_start(h: &Header, len: usize) -> Option<usize> {
    h.sparse_count
        .checked_mul(SPARSE_ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(h.sparse_offset))
        .filter(|&end| h.sparse_offset >= HEADER_LEN as u64 && end <= len as u64)
        .map(|end| end as usize)
}

/// The numeric value of a shard prefix (`root` is 0).
pub fn prefix_value(prefix: &str) -> Option<u32> {
    if prefix == "root" {
        return Some(0);
    }
    prefix.bytes().try_fold(0u32, |acc, c| {
        let d = super::NIX_BASE32_ALPHABET.iter().position(|&a| a == c)?;
        Some((acc << 5) | d as u32)
    })
}

#[cfg(test)]
mod tests;
