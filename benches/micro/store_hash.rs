//! `StoreHash::parse` against the obvious check: length, then a linear
//! search of the 32-character alphabet for every byte.

use divan::black_box;
use ncro::proto::store_path::{StoreHash, HASH_LEN, NIX_BASE32_ALPHABET};

const VALID: &str = "0a9fs7dmj5x1ahq4xwpc9iv6hdq6h9lh";
/// Fails on the last character ('e' is not in Nix-base32), the worst case
/// for both implementations.
const INVALID: &str = "0a9fs7dmj5x1ahq4xwpc9iv6hdq6h9le";

fn baseline(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(|b| NIX_BASE32_ALPHABET.contains(&b))
}

#[divan::bench(sample_size = 5000, args = [VALID, INVALID])]
fn ncro(s: &str) -> Option<StoreHash> {
    StoreHash::parse(black_box(s).as_bytes())
}

#[divan::bench(sample_size = 5000, args = [VALID, INVALID])]
fn baseline_alphabet_contains(s: &str) -> bool {
    baseline(black_box(s))
}
