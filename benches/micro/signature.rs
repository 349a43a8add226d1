//! Signature checking as the race engine does it (fingerprint built from
//! the parsed narinfo, `Sig:` decoded, `verify_strict`) against the bare
//! `verify_strict` on a precomputed message, so the cost ncro adds around
//! the curve arithmetic is visible. Once with a generated key, once with a
//! real cache.nixos.org narinfo and signature; plus the content-address
//! check that stands in for a signature on CA paths.

use std::sync::LazyLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use divan::black_box;
use ed25519_dalek::{Signature, VerifyingKey};
use ncro::proto::content_address;
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
    LazyLock::force(&REAL);
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

/// libssh2 1.10.0 as cache.nixos.org signed it (harmonia's test vector,
/// also in shared/realdata/sig-vectors.txt): four references.
const NIXOS_NARINFO: &str = "StorePath: /nix/store/02bfycjg1607gpcnsg8l13lc45qa8qj3-libssh2-1.10.0\n\
    URL: nar/x.nar.xz\n\
    Compression: xz\n\
    NarHash: sha256:1l29f8r5q2739wnq4i7m2v545qx77b3wrdsw9xz2ajiy3hv1al8b\n\
    NarSize: 294664\n\
    References: 02bfycjg1607gpcnsg8l13lc45qa8qj3-libssh2-1.10.0 \
    1l4r0r4ab3v3a3ppir4jwiah3icalk9d-zlib-1.2.11 gf6j3k1flnhayvpnwnhikkg0s5dxrn1i-openssl-1.1.1l \
    z56jcx3j1gfyk4sv7g8iaan0ssbdkhz1-glibc-2.33-56\n\
    Sig: cache.nixos.org-1:0CpHca+06TwFp9VkMyz5OaphT3E8mnS+1SWymYlvFaghKSYPCMQ66TS1XPAr1+y9rfQZPLaHrBjjnIRktE/nAA==\n";
const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// A cache.nixos.org `.drv` (`CA: text:sha256`, five references), unsigned:
/// accepted on its content address alone (NarHash and NarSize are made up:
/// the CA check does not read them).
const CA_NARINFO: &str = "StorePath: /nix/store/s4mcg8jhhm55k3zyblpjabmcavi7403k-docbook2X-0.8.8.tar.gz.drv\n\
    URL: nar/x.nar.xz\n\
    NarHash: sha256:0wg0fvx8yghacljdwxqlqg9dvrkyiiyk4dvpwck37xapvfid109n\n\
    NarSize: 1000\n\
    References: 43shw2f4xz1yj7cpyazcqa5895zwwbic-curl-8.1.1.drv \
    48ax6lwv7vh54q7nf55zmga80fybc1mj-mirrors-list.drv 57620l1168piiia2bmmsxxhh7sjb2n40-builder.sh \
    mcjbr0j20q0sj5a31d3acmxgjabb5xs6-bash-5.2-p15.drv r4p6d7r1shc9rhpsida71gl4c3sgxzcf-stdenv-linux.drv\n\
    CA: text:sha256:0p8wjixkbg49jadn3iygq7a8pa126id83y7f6qh9hlslkvxm56i8\n";

struct Real {
    info: NarInfo,
    keys: Vec<PublicKey>,
    fingerprint: String,
    raw_key: VerifyingKey,
    raw_sig: Signature,
    ca: NarInfo,
}

static REAL: LazyLock<Real> = LazyLock::new(|| {
    let info = NarInfo::parse(NIXOS_NARINFO.as_bytes()).expect("real narinfo parses");
    let key = PublicKey::parse(NIXOS_KEY).expect("cache.nixos.org key");
    let ca = NarInfo::parse(CA_NARINFO.as_bytes()).expect("CA narinfo parses");
    assert_eq!(
        verify_narinfo(&info, std::slice::from_ref(&key)),
        Verdict::Valid {
            key_name: "cache.nixos.org-1".into()
        }
    );
    assert_eq!(verify_narinfo(&ca, &[]), Verdict::ContentAddressed);
    Real {
        fingerprint: info.fingerprint(),
        raw_key: key.key,
        raw_sig: Signature::from_bytes(&decode_after_colon(&info.sigs[0])),
        keys: vec![key],
        info,
        ca,
    }
});

/// `verify_narinfo` of a real cache.nixos.org narinfo: the race engine's
/// whole check. Compare with `baseline_verify_strict_cache_nixos_org`.
#[divan::bench(sample_size = 10)]
fn ncro_verify_narinfo_cache_nixos_org() -> Verdict {
    let r = &*REAL;
    verify_narinfo(black_box(&r.info), black_box(&r.keys))
}

/// Bare `verify_strict` of the same fingerprint and signature.
#[divan::bench(sample_size = 10)]
fn baseline_verify_strict_cache_nixos_org() -> bool {
    let r = &*REAL;
    black_box(&r.raw_key)
        .verify_strict(black_box(r.fingerprint.as_bytes()), black_box(&r.raw_sig))
        .is_ok()
}

/// The content-address proof alone (parse the CA, two SHA-256, compare).
#[divan::bench(sample_size = 100)]
fn ncro_content_address_proof() -> bool {
    content_address::proves_store_path(black_box(&REAL.ca))
}

/// `verify_narinfo` of the unsigned CA narinfo (no signature to try).
#[divan::bench(sample_size = 100)]
fn ncro_verify_narinfo_content_addressed() -> Verdict {
    verify_narinfo(black_box(&REAL.ca), black_box(&REAL.keys))
}
