//! Micro-benchmarks of ncro's hot-path building blocks, each next to a
//! named baseline so a regression shows up as a ratio, not a bare number.
//!
//! Run with `cargo bench --bench micro`; each module is one divan group
//! holding an `ncro` bench and one or more `baseline_*` benches.

mod http;
mod narinfo;
mod plan;
mod route;
mod signature;
mod store_hash;
mod upstreams;

use ncro::proto::narinfo::NarInfo;
use ncro::proto::store_path::NIX_BASE32_ALPHABET;

fn main() {
    // Fixtures are built before timing starts so no sample pays for them.
    // Sample sizes are fixed per bench (about 10-100 µs a sample): divan's
    // automatic sizing reads one preempted first run on a busy 2-vCPU VM as
    // a slow bench and falls back to one iteration per sample, which is
    // below the timer's precision.
    narinfo::warm();
    plan::warm();
    route::warm();
    signature::warm();
    upstreams::warm();
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
    let file_hash = sha256(1);
    NarInfo {
        store_path: format!("/nix/store/{}-hello-2.12.1", fake_base32(2, 32)),
        url: format!("nar/{}.nar.xz", &file_hash[7..]),
        compression: Some("xz".into()),
        file_hash: Some(file_hash),
        file_size: Some(50_264),
        nar_hash: sha256(3),
        nar_size: 226_560,
        references: (10..16)
            .map(|i| format!("{}-dep-{i}", fake_base32(i, 32)))
            .collect(),
        deriver: Some(format!("{}-hello-2.12.1.drv", fake_base32(4, 32))),
        sigs: Vec::new(),
        ca: None,
    }
}

/// A `sha256:` hash in Nix-base32. 52 characters carry 260 bits, so the
/// first one holds only the top bit of the digest and must be '0' or '1'.
fn sha256(seed: u64) -> String {
    format!("sha256:1{}", fake_base32(seed, 51))
}
