//! The key of the route table: a store hash packed into 20 bytes.

use crate::proto::store_path::{StoreHash, NIX_BASE32_ALPHABET};

/// A store hash packed into the 20 bytes its 32 base-32 characters carry
/// (any bijection will do; this is not Nix's byte order).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct RouteKey(pub(super) [u8; 20]);

const fn digit_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 32 {
        t[NIX_BASE32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
}

static DIGIT: [u8; 256] = digit_table();

impl RouteKey {
    #[inline]
    pub(super) fn of(hash: &StoreHash) -> RouteKey {
        let mut out = [0u8; 20];
        // 8 characters of 5 bits fill 5 bytes exactly.
        for (chars, bytes) in hash.as_bytes().chunks_exact(8).zip(out.chunks_exact_mut(5)) {
            let v = chars
                .iter()
                .fold(0u64, |v, &c| v << 5 | u64::from(DIGIT[usize::from(c)]));
            bytes.copy_from_slice(&v.to_be_bytes()[3..]);
        }
        RouteKey(out)
    }

    /// The store hash this key was packed from.
    pub(super) fn hash(&self) -> StoreHash {
        let mut chars = [0u8; 32];
        for (bytes, out) in self.0.chunks_exact(5).zip(chars.chunks_exact_mut(8)) {
            let mut v = [0u8; 8];
            v[3..].copy_from_slice(bytes);
            let v = u64::from_be_bytes(v);
            for (i, c) in out.iter_mut().enumerate() {
                *c = NIX_BASE32_ALPHABET[(v >> (5 * (7 - i)) & 31) as usize];
            }
        }
        StoreHash::parse(&chars).expect("a packed key unpacks to base-32")
    }
}
