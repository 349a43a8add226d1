//! A tiny deterministic generator (SplitMix64) for jitter, failure
//! injection and random hashes: one per thread, no locking, no
//! allocation, and reproducible from a seed.

use crate::proto::store_path::{HASH_LEN, NIX_BASE32_ALPHABET};

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A random store hash (32 Nix-base32 characters) written into `out`.
    pub fn fill_hash(&mut self, out: &mut [u8; HASH_LEN]) {
        let mut bits = 0u64;
        for (i, c) in out.iter_mut().enumerate() {
            if i % 12 == 0 {
                bits = self.next_u64();
            }
            *c = NIX_BASE32_ALPHABET[(bits & 31) as usize];
            bits >>= 5;
        }
    }
}

/// SplitMix64's finaliser: a good 64-bit mix of one word.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::store_path::StoreHash;

    #[test]
    fn deterministic_and_spread() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(7);
        assert_eq!(a, (0..5).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut r = Rng::new(1);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| r.chance(0.0)));
    }

    #[test]
    fn random_hashes_are_valid_and_differ() {
        let mut r = Rng::new(9);
        let (mut a, mut b) = ([0u8; HASH_LEN], [0u8; HASH_LEN]);
        r.fill_hash(&mut a);
        r.fill_hash(&mut b);
        assert!(StoreHash::parse(&a).is_some());
        assert!(StoreHash::parse(&b).is_some());
        assert_ne!(a, b);
    }
}
