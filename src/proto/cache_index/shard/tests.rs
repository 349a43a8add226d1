use super::*;

/// MSB-first bit writer for building shards in tests, written apart from
/// the decoder's reader.
#[derive(Default)]
struct Writer {
    bytes: Vec<u8>,
    bits: u64,
}

impl Writer {
    fn bit(&mut self, b: bool) {
        if self.bits % 8 == 0 {
            self.bytes.push(0);
        }
        if b {
            *self.bytes.last_mut().unwrap() |= 0x80 >> (self.bits % 8);
        }
        self.bits += 1;
    }
    /// `v` in `n` bits, most significant first (bits above 128 are zero).
    fn value(&mut self, v: u128, n: u32) {
        for i in (0..n).rev() {
            self.bit(i < 128 && (v >> i) & 1 == 1);
        }
    }
    fn pad(&mut self) {
        self.bits = self.bytes.len() as u64 * 8;
    }
}

struct Built {
    file: Vec<u8>,
}

/// A shard of sorted suffixes (as u128) in ncps's layout; sparse offsets
/// point after the item (`after`) or at its code (byte-aligned only for
/// item 0).
fn build(items: &[u128], k: u8, depth: u8, after: bool) -> Built {
    let suffix_bits = 160 - 5 * u32::from(depth);
    let mut w = Writer::default();
    let mut sparse = Vec::new();
    for (i, &v) in items.iter().enumerate() {
        let start = w.bits;
        if i == 0 {
            w.value(v, suffix_bits);
        } else {
            let d = v - items[i - 1];
            for _ in 0..(d >> k) {
                w.bit(true);
            }
            w.bit(false);
            w.value(d & ((1u128 << k) - 1), u32::from(k));
        }
        if i % 256 == 0 {
            w.pad();
            let offset = if after { w.bits / 8 } else { start / 8 };
            let mut e = [0u8; 28];
            e[4..20].copy_from_slice(&v.to_be_bytes());
            e[20..].copy_from_slice(&offset.to_le_bytes());
            sparse.extend_from_slice(&e);
        }
    }
    let mut file = Vec::new();
    file.extend_from_slice(b"NIXIDX01");
    file.extend_from_slice(&(items.len() as u64).to_le_bytes());
    file.push(k);
    file.push(suffix_bits as u8);
    file.extend_from_slice(&64u64.to_le_bytes());
    file.extend_from_slice(&((sparse.len() / 28) as u64).to_le_bytes());
    file.extend_from_slice(&xxhash_rust::xxh64::xxh64(&w.bytes, 0).to_le_bytes());
    file.resize(64, 0);
    file.extend_from_slice(&sparse);
    file.extend_from_slice(&w.bytes);
    Built { file }
}

fn decoded(file: &[u8], depth: u8, prefix: u32) -> Result<Vec<U160>, ShardError> {
    let mut out = Vec::new();
    decode(file, depth, prefix, u64::MAX, |v| out.push(v))?;
    Ok(out)
}

fn u(v: u128) -> U160 {
    U160::from_be_bytes(&{
        let mut b = [0u8; 20];
        b[4..].copy_from_slice(&v.to_be_bytes());
        b
    })
}

/// Written out bit by bit from the notes' layout: depth 4 (140-bit
/// suffixes), k = 2, items 1 and 6. Item 0 is 139 zero bits and a one,
/// padded to 18 bytes (…, 0x10); the gap 5 is quotient 1 ("10") and
/// remainder 1 ("01"): 0x90. XXH64 seed 0 of those 19 bytes.
#[test]
fn hand_written_shard_vector() {
    let mut data = vec![0u8; 17];
    data.extend_from_slice(&[0x10, 0x90]);
    for offset in [0u64, 18] {
        let mut f = b"NIXIDX01".to_vec();
        f.extend_from_slice(&2u64.to_le_bytes());
        f.extend_from_slice(&[2, 140]);
        f.extend_from_slice(&64u64.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&xxhash_rust::xxh64::xxh64(&data, 0).to_le_bytes());
        f.resize(64, 0);
        let mut entry = [0u8; 28];
        entry[19] = 1;
        entry[20..].copy_from_slice(&offset.to_le_bytes());
        f.extend_from_slice(&entry);
        f.extend_from_slice(&data);
        assert_eq!(f.len(), 64 + 28 + 19);
        // Prefix "0000" is zero: the full keys are the suffixes.
        assert_eq!(decoded(&f, 4, 0).unwrap(), [u(1), u(6)], "offset {offset}");
        // Under prefix "0001" the keys carry the prefix above 140 bits.
        let keys = decoded(&f, 4, 1).unwrap();
        assert_eq!(keys[1].low128(), 6, "low 128 bits are the suffix's");
        assert_eq!(keys[1].bit_len(), 141);
    }
}

#[test]
fn round_trips_many_items_with_sparse_entries() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut items: Vec<u128> = (0..1000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            u128::from(x) << 20
        })
        .collect();
    items.sort_unstable();
    items.dedup();
    // k near log2 of the mean gap, as a real writer would pick it.
    let b = build(&items, 74, 2, true);
    let keys = decoded(&b.file, 2, 0).unwrap();
    assert_eq!(keys.len(), items.len());
    assert!(keys.iter().zip(&items).all(|(k, &v)| k.low128() == v));
    // Fewer than 257 items: the one sparse entry may point at item 0's
    // code (offset 0, the RFC's example) instead of after it.
    let few = &items[..200];
    let keys = decoded(&build(few, 74, 2, false).file, 2, 0).unwrap();
    assert!(keys.iter().zip(few).all(|(k, &v)| k.low128() == v));
}

#[test]
fn depth_zero_uses_full_160_bit_suffixes_and_root() {
    let items = [3u128, 1 << 100, (1 << 127) + 5];
    let b = build(&items, 126, 0, true);
    let keys = decoded(&b.file, 0, prefix_value("root").unwrap()).unwrap();
    assert_eq!(keys, items.map(u));
    assert_eq!(decoded(&build(&[], 8, 0, true).file, 0, 0).unwrap(), []);
}

#[test]
fn refuses_what_it_cannot_read_exactly() {
    let items: Vec<u128> = (1..600u128).map(|i| i * 1_000_003).collect();
    let good = build(&items, 19, 1, true).file;
    assert!(decoded(&good, 1, 7).is_ok());
    let bad = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        decoded(&b, 1, 7).unwrap_err()
    };
    assert_eq!(bad(&|b| b[0] = b'x'), ShardError::BadMagic);
    assert_eq!(bad(&|b| b[17] = 160), ShardError::Header("suffix bits"));
    let last = good.len() - 1;
    assert_eq!(bad(&|b| b[last] ^= 1), ShardError::Checksum);
    // A sparse value that disagrees with the data (item 256).
    assert_eq!(bad(&|b| b[64 + 28 + 19] ^= 1), ShardError::Sparse(1));
    // A sparse offset that is neither reading.
    assert_eq!(bad(&|b| b[64 + 28 + 20] ^= 0x40), ShardError::Sparse(1));
    assert_eq!(
        bad(&|b| b[18..26].copy_from_slice(&10_000u64.to_le_bytes())),
        ShardError::Header("sparse index")
    );
    assert_eq!(
        bad(&|b| b[8..16].copy_from_slice(&700u64.to_le_bytes())),
        ShardError::Data(599),
        "more items than the data holds"
    );
    assert_eq!(
        decoded(&good[..63], 1, 7).unwrap_err(),
        ShardError::TooShort(63)
    );
    let mut over = Vec::new();
    assert_eq!(
        decode(&good, 1, 7, 10, |v| over.push(v)),
        Err(ShardError::TooManyItems(599))
    );
}

#[test]
fn a_wrong_k_or_layout_is_caught_not_misread() {
    let items: Vec<u128> = (1..300u128).map(|i| i * 7_919).collect();
    let mut b = build(&items, 12, 1, true).file;
    b[16] = 11; // the header claims another k than the data was coded with
    assert!(decoded(&b, 1, 0).is_err());
    // Duplicates cannot be in a set: a zero gap is refused.
    let dup = build(&[5, 5, 9], 3, 1, true).file;
    assert_eq!(decoded(&dup, 1, 0).unwrap_err(), ShardError::Data(1));
}

#[test]
fn u160_arithmetic() {
    let max = U160::from_be_bytes(&[0xff; 20]);
    assert_eq!(max.bit_len(), 160);
    assert_eq!(max.checked_add(U160::from_u64(1)), None);
    assert_eq!(U160::from_u64(1).checked_shl(159).unwrap().bit_len(), 160);
    assert_eq!(U160::from_u64(1).checked_shl(160), None);
    assert_eq!(
        U160::from_u64(3).checked_shl(128),
        Some(U160 { hi: 3, lo: 0 })
    );
    assert_eq!(U160::from_u64(u64::MAX).checked_shl(97), None);
    assert_eq!(
        U160::from_u64(u64::MAX).checked_shl(96),
        Some(U160 {
            hi: u32::MAX,
            lo: u128::from(u32::MAX) << 96
        })
    );
    let carry = U160 {
        hi: 0,
        lo: u128::MAX,
    }
    .checked_add(U160::from_u64(1));
    assert_eq!(carry, Some(U160 { hi: 1, lo: 0 }));
    assert_eq!(prefix_value("0z"), Some(31));
    assert_eq!(prefix_value("10"), Some(32));
    assert_eq!(prefix_value("e"), None);
}
