//! Micro-benchmarks of ncro's hot-path building blocks, each next to a
//! named baseline so a regression shows up as a ratio, not a bare number.
//!
//! Run with `cargo bench --bench micro`; each module is one divan group
//! holding an `ncro` bench and one or more `baseline_*` benches.

mod http;
mod narinfo;
mod route;
mod signature;
mod store_hash;

use ncro::proto::narinfo::NarInfo;
use ncro::proto::store_path::NIX_BASE32_ALPHABET;

fn main() {
    divan::main();
}

/// `len` Nix-base32 characters derived from `seed`; deterministic so every
/// run benches the same bytes.
pub fn fake_base32(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, and good enough to spread characters.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(NIX_BASE32_ALPHABET[(x % 32) as usize])
        })
        .collect()
}

/// A typical small-package narinfo: xz-compressed, six references, a
/// deriver, unsigned (callers add `sigs`).
pub fn sample_narinfo() -> NarInfo {
    let file_hash = format!("sha256:{}", fake_base32(1, 52));
    NarInfo {
        store_path: format!("/nix/store/{}-hello-2.12.1", fake_base32(2, 32)),
        url: format!("nar/{}.nar.xz", &file_hash[7..]),
        compression: Some("xz".into()),
        file_hash: Some(file_hash),
        file_size: Some(50_264),
        nar_hash: format!("sha256:{}", fake_base32(3, 52)),
        nar_size: 226_560,
        references: (10..16)
            .map(|i| format!("{}-dep-{i}", fake_base32(i, 32)))
            .collect(),
        deriver: Some(format!("{}-hello-2.12.1.drv", fake_base32(4, 32))),
        sigs: Vec::new(),
        ca: None,
    }
}
