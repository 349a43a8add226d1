//! Signature checking as the race engine does it (fingerprint built from
//! the parsed narinfo, `Sig:` decoded, `verify_strict`) against the bare
//! `verify_strict` on a precomputed message, so the cost ncro adds around
//! the curve arithmetic is visible.

use std::sync::LazyLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use divan::black_box;
use ed25519_dalek::{Signature, VerifyingKey};
use ncro::proto::narinfo::NarInfo;
use ncro::proto::signature::{verify_narinfo, PublicKey, SecretKey, Verdict};

struct Fixture {
    info: NarInfo,
    keys: Vec<PublicKey>,
    fingerprint: String,
    raw_key: VerifyingKey,
    raw_sig: Signature,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let secret = SecretKey::generate("cache.example.org-1").expect("valid key name");
    let mut info = crate::sample_narinfo();
    let fingerprint = info.fingerprint();
    let sig = secret.sign(&fingerprint);
    info.sigs.push(sig.clone());
    // Round-trip through the wire form so the bench sees what a worker sees.
    let info = NarInfo::parse(info.render().as_bytes()).expect("rendered narinfo parses");
    let public = secret.public();
    let raw_key = decode_after_colon(&public.to_nix_string());
    let raw_sig = decode_after_colon(&sig);
    Fixture {
        info,
        keys: vec![public],
        fingerprint,
        raw_key: VerifyingKey::from_bytes(&raw_key).expect("generated key is valid"),
        raw_sig: Signature::from_bytes(&raw_sig),
    }
});

fn decode_after_colon<const N: usize>(s: &str) -> [u8; N] {
    let (_, b64) = s.split_once(':').expect("name:base64");
    let bytes = STANDARD.decode(b64).expect("base64 we just encoded");
    bytes.try_into().expect("length fixed by ed25519")
}

pub fn warm() {
    LazyLock::force(&FIXTURE);
}

#[divan::bench(sample_size = 10)]
fn ncro_verify_narinfo() -> Verdict {
    let f = &*FIXTURE;
    let verdict = verify_narinfo(black_box(&f.info), black_box(&f.keys));
    debug_assert!(verdict.is_accepted());
    verdict
}

/// The fingerprint alone: the non-cryptographic part of the line above.
#[divan::bench(sample_size = 100)]
fn ncro_fingerprint_only() -> String {
    black_box(&FIXTURE.info).fingerprint()
}

#[divan::bench(sample_size = 10)]
fn baseline_verify_strict() -> bool {
    let f = &*FIXTURE;
    black_box(&f.raw_key)
        .verify_strict(black_box(f.fingerprint.as_bytes()), black_box(&f.raw_sig))
        .is_ok()
}
