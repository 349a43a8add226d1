//! Nix's ed25519 signing keys and narinfo signatures.
//!
//! Key strings are `<name>:<base64>`: 32 bytes for a public key, 64 for a
//! secret key (libsodium layout: seed then public key). A signature (`Sig:`
//! value) is `<key name>:<base64 of 64 bytes>` over
//! [`NarInfo::fingerprint`].

use super::content_address;
use super::narinfo::NarInfo;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use std::fmt;
use thiserror::Error;

/// Standard alphabet, padding optional on input and always written on
/// output. Trailing bits are ignored on input because Nix's decoder
/// ignores them; refusing would reject signatures clients accept.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

const PUBLIC_KEY_LEN: usize = 32;
const SECRET_KEY_LEN: usize = 64;
const SIGNATURE_LEN: usize = 64;

/// Why a key string was refused. `kind` is "public" or "secret".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("{kind} key has no ':' between its name and its base64 data")]
    MissingColon { kind: &'static str },
    #[error("{kind} key name is empty")]
    EmptyName { kind: &'static str },
    #[error("{kind} key name contains ':'")]
    NameHasColon { kind: &'static str },
    #[error("{kind} key data is not valid base64")]
    BadBase64 { kind: &'static str },
    #[error("{kind} key data has wrong size {got}, want {want}")]
    WrongSize {
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("public key data is not a valid ed25519 point")]
    InvalidPoint,
    #[error("secret key's second half is not the public key of its first half")]
    MismatchedHalves,
}

/// A trusted key. Several keys may share a name (during a rotation); a
/// signature is tried against each of them.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`; surrounding whitespace (a trailing
    /// newline from a key file) is ignored.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_key::<PUBLIC_KEY_LEN>(s, "public")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint)?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// The `name:base64` form, padded, as `nix-store --generate-binary-cache-key` writes it.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_nix_string())
    }
}

/// A signing key, for synthetic upstreams, tests and key generation.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses Nix's secret key format `name:base64(64 bytes)`.
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_key::<SECRET_KEY_LEN>(s, "secret")?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::MismatchedHalves)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        check_name(name, "secret")?;
        let seed: [u8; 32] = rand::random();
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a fingerprint; the result is a `Sig:` value.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }

    /// The `name:base64(64 bytes)` form Nix reads with `secret-key=`.
    pub fn to_nix_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material into logs.
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

fn check_name(name: &str, kind: &'static str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::EmptyName { kind });
    }
    if name.contains(':') {
        return Err(KeyError::NameHasColon { kind });
    }
    Ok(())
}

fn split_key<'a, const N: usize>(
    s: &'a str,
    kind: &'static str,
) -> Result<(&'a str, [u8; N]), KeyError> {
    let (name, data) = s
        .trim()
        .split_once(':')
        .ok_or(KeyError::MissingColon { kind })?;
    check_name(name, kind)?;
    let bytes = BASE64
        .decode(data)
        .map_err(|_| KeyError::BadBase64 { kind })?;
    let got = bytes.len();
    let bytes = bytes
        .try_into()
        .map_err(|_| KeyError::WrongSize { kind, got, want: N })?;
    Ok((name, bytes))
}

/// The outcome of checking a narinfo's signatures against trusted keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A signature verified under the named key.
    Valid { key_name: String },
    /// No valid signature, but the narinfo's `CA:` field computes to its
    /// `StorePath` ([`content_address::proves_store_path`]). Nix accepts
    /// such content-addressed paths unsigned, so they are passed on.
    ContentAddressed,
    /// No valid signature, and a `CA:` field that does not compute to
    /// `StorePath` (another hash, unknown method, references the method
    /// does not allow): refused like an unsigned narinfo.
    BadContentAddress,
    /// No `Sig:` line names a trusted key.
    NoTrustedSignature,
    /// A signature under a trusted key name failed, or one is malformed.
    BadSignature,
}

impl Verdict {
    /// True when the narinfo may be served to clients.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Verdict::Valid { .. } | Verdict::ContentAddressed)
    }

    /// A fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Valid { .. } => "valid",
            Verdict::ContentAddressed => "content_addressed",
            Verdict::BadContentAddress => "bad_content_address",
            Verdict::NoTrustedSignature => "no_trusted_signature",
            Verdict::BadSignature => "bad_signature",
        }
    }
}

/// Checks `info`'s `Sig:` lines against `keys`.
///
/// Callers skip this entirely for an upstream with no keys configured:
/// with an empty `keys` nothing is trusted and the verdict is
/// `NoTrustedSignature` (or one of the content-address verdicts).
///
/// Only signatures whose name matches a key are looked at; padded and
/// unpadded base64 both work. A *malformed* signature (bad base64, not 64
/// bytes) under a trusted name gives `BadSignature` even when another
/// signature is valid: Nix aborts the whole client run on such a line,
/// whatever else the narinfo carries, so it must never reach a client.
/// A well-formed signature that does not verify is ignored if another
/// verifies, as in Nix.
///
/// Without a valid signature, a narinfo with a `CA:` line is
/// `ContentAddressed` only if the CA computes to its `StorePath` (Nix's
/// `isContentAddressed`), else `BadContentAddress`: a `CA:` line anyone
/// can add must not stand in for a signature.
///
/// Verification is `verify_strict`, which like libsodium (used by Nix)
/// rejects weak keys and non-canonical signatures, so we never accept a
/// signature the client would then refuse.
pub fn verify_narinfo(info: &NarInfo, keys: &[PublicKey]) -> Verdict {
    let mut fingerprint: Option<String> = None;
    let mut valid: Option<&str> = None;
    let mut failed = false;
    for sig in &info.sigs {
        // Nix reads a line without ':' as a name with empty data.
        let (name, data) = sig.split_once(':').unwrap_or((sig, ""));
        if !keys.iter().any(|k| k.name == name) {
            continue;
        }
        let Some(sig) = decode_signature(data) else {
            return Verdict::BadSignature;
        };
        let fp = fingerprint.get_or_insert_with(|| info.fingerprint());
        let mut trusted = keys.iter().filter(|k| k.name == name);
        match trusted.find(|k| k.key.verify_strict(fp.as_bytes(), &sig).is_ok()) {
            Some(k) => valid = valid.or(Some(&k.name)),
            None => failed = true,
        }
    }
    match valid {
        Some(name) => Verdict::Valid {
            key_name: name.to_owned(),
        },
        None if info.ca.is_some() && content_address::proves_store_path(info) => {
            Verdict::ContentAddressed
        }
        None if info.ca.is_some() => Verdict::BadContentAddress,
        None if failed => Verdict::BadSignature,
        None => Verdict::NoTrustedSignature,
    }
}

fn decode_signature(data: &str) -> Option<Signature> {
    let bytes: [u8; SIGNATURE_LEN] = BASE64.decode(data).ok()?.try_into().ok()?;
    Some(Signature::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written and signed by Nix 2.8 for the test harness's cache A.
    use crate::proto::narinfo::tests::REAL;
    const REAL_SIG: &str = "cache-a-1:UNq1BY1CpVIYX894d71znLj/2fxo4JEJhxeFVxwkXZMPBS8ieGP+VgZnxvQ9SLi8DRFATvsyqBVVHz6QYg0SBw==";
    const KEY_A: &str = "cache-a-1:3xCONpXdaeQM/Ayml/X2x2/mkdwLvoDymniBw9CeEMU=";
    const KEY_B: &str = "cache-b-1:8eWYaph6U7vGn9nvMqwz/fwNRTS6/07M1cPst5d0tdw=";

    /// From `nix-store --generate-binary-cache-key test-cache-1 sk pk`.
    const NIX_SECRET: &str = "test-cache-1:itdJd48kKOAcRTyPK2A4m3YyWWWsHx05eNBlmmmFGYKndihke7fQg96DFWpWpph2efGYlYRn0e8BkMIXwrbcaw==";
    const NIX_PUBLIC: &str = "test-cache-1:p3YoZHu30IPegxVqVqaYdnnxmJWEZ9HvAZDCF8K23Gs=";
    /// `nix copy --to file://…?secret-key=sk` of a file added with
    /// `nix-store --add`: a content-addressed path, signed by test-cache-1.
    const NIX_CA_FINGERPRINT: &str = "1;/nix/store/6ixw2a96qkk7dsv78j78kq6f8j76fgr7-hello.txt;\
        sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk;128;";
    const NIX_CA_SIG: &str = "test-cache-1:wG+zApnoSkt24rf9ZGdWsW0iuQcNvhfJTPJilYXtHYTZkwh0fyIOXLlebYpuUKUv2bP27DJF05oyn0SBT2/WCQ==";

    fn real() -> NarInfo {
        NarInfo::parse(REAL.as_bytes()).unwrap()
    }

    fn key(s: &str) -> PublicKey {
        PublicKey::parse(s).unwrap()
    }

    fn with_sigs(sigs: &[&str]) -> NarInfo {
        let mut info = real();
        info.sigs = sigs.iter().map(|s| s.to_string()).collect();
        info
    }

    fn valid_a() -> Verdict {
        Verdict::Valid {
            key_name: "cache-a-1".into(),
        }
    }

    #[test]
    fn public_key_parses_padded_and_unpadded() {
        let k = key(KEY_A);
        assert_eq!(k.name, "cache-a-1");
        assert_eq!(k.to_nix_string(), KEY_A);
        let unpadded = KEY_A.trim_end_matches('=');
        assert_eq!(key(unpadded), k);
        assert_eq!(key(&format!("  {KEY_A}\n")), k);
        assert!(format!("{k:?}").contains(KEY_A));
    }

    #[test]
    fn public_key_errors_name_the_problem() {
        let err = |s: &str| PublicKey::parse(s).unwrap_err().to_string();
        assert_eq!(
            err("cache-a-1"),
            "public key has no ':' between its name and its base64 data"
        );
        assert_eq!(
            err(":3xCONpXdaeQM/Ayml/X2x2/mkdwLvoDymniBw9CeEMU="),
            "public key name is empty"
        );
        assert_eq!(err("k:3xCONp!!"), "public key data is not valid base64");
        assert_eq!(err("k:AAAA"), "public key data has wrong size 3, want 32");
        assert_eq!(err("k:"), "public key data has wrong size 0, want 32");
        // A secret key pasted where a public key belongs.
        assert_eq!(
            err(NIX_SECRET),
            "public key data has wrong size 64, want 32"
        );
    }

    #[test]
    fn public_key_rejects_points_off_the_curve() {
        // Roughly half of all y coordinates have no point; find one.
        let off_curve = (0u8..=255)
            .map(|b| {
                let mut bytes = [0u8; 32];
                bytes[0] = b;
                bytes
            })
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .expect("some small y is off the curve");
        let s = format!("k:{}", BASE64.encode(off_curve));
        assert_eq!(PublicKey::parse(&s), Err(KeyError::InvalidPoint));
    }

    #[test]
    fn secret_key_from_nix_matches_its_public_key_and_signature() {
        let sk = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(sk.name(), "test-cache-1");
        assert_eq!(sk.public(), key(NIX_PUBLIC));
        assert_eq!(sk.to_nix_string(), NIX_SECRET);
        assert_eq!(sk.public().to_nix_string(), NIX_PUBLIC);
        // ed25519 is deterministic: we must produce Nix's exact signature.
        assert_eq!(sk.sign(NIX_CA_FINGERPRINT), NIX_CA_SIG);
        let unpadded = NIX_SECRET.trim_end_matches('=');
        assert_eq!(SecretKey::parse(unpadded).unwrap().sign("x"), sk.sign("x"));
    }

    #[test]
    fn secret_key_errors() {
        let err = |s: &str| SecretKey::parse(s).unwrap_err();
        assert_eq!(
            err(KEY_A),
            KeyError::WrongSize {
                kind: "secret",
                got: 32,
                want: 64
            }
        );
        assert_eq!(err("nocolon"), KeyError::MissingColon { kind: "secret" });
        // Public half replaced by another key's.
        let sk = SecretKey::parse(NIX_SECRET).unwrap();
        let mut bytes = sk.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(key(KEY_A).key.as_bytes());
        let mixed = format!("test-cache-1:{}", BASE64.encode(bytes));
        assert_eq!(err(&mixed), KeyError::MismatchedHalves);
        assert_eq!(
            KeyError::MismatchedHalves.to_string(),
            "secret key's second half is not the public key of its first half"
        );
    }

    #[test]
    fn generated_keys_round_trip_and_never_print_secrets() {
        let sk = SecretKey::generate("ncro-test-1").unwrap();
        let again = SecretKey::parse(&sk.to_nix_string()).unwrap();
        assert_eq!(again.public(), sk.public());
        assert_eq!(
            PublicKey::parse(&sk.public().to_nix_string()).unwrap(),
            sk.public()
        );
        let debug = format!("{sk:?}");
        assert_eq!(debug, "SecretKey(ncro-test-1:<redacted>)");
        assert_ne!(
            SecretKey::generate("x").unwrap().public(),
            SecretKey::generate("x").unwrap().public()
        );
        assert_eq!(
            SecretKey::generate("").unwrap_err(),
            KeyError::EmptyName { kind: "secret" }
        );
        assert_eq!(
            SecretKey::generate("a:b").unwrap_err(),
            KeyError::NameHasColon { kind: "secret" }
        );
    }

    #[test]
    fn verifies_a_real_nix_signature() {
        assert_eq!(verify_narinfo(&real(), &[key(KEY_A)]), valid_a());
        assert_eq!(
            verify_narinfo(&real(), &[key(KEY_B), key(KEY_A)]),
            valid_a()
        );
        let unpadded = REAL_SIG.trim_end_matches('=');
        assert_eq!(
            verify_narinfo(&with_sigs(&[unpadded]), &[key(KEY_A)]),
            valid_a()
        );
    }

    #[test]
    fn verifies_after_nar_hash_re_encoding_and_reference_reordering() {
        // Regression (atticd d563efc): hex NarHash must be fingerprinted as nix32.
        let mut info = real();
        info.nar_hash =
            "sha256:644d669fdb89fd425e4bba688c1e37a5018487f52d9a842960fc96f40815e704".into();
        info.references.reverse();
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), valid_a());
    }

    #[test]
    fn untrusted_or_missing_signatures() {
        assert_eq!(
            verify_narinfo(&real(), &[key(KEY_B)]),
            Verdict::NoTrustedSignature
        );
        assert_eq!(verify_narinfo(&real(), &[]), Verdict::NoTrustedSignature);
        assert_eq!(
            verify_narinfo(&with_sigs(&[]), &[key(KEY_A)]),
            Verdict::NoTrustedSignature
        );
        // The right bytes under another name are not tried, as in Nix.
        let renamed = REAL_SIG.replace("cache-a-1", "cache-a-2");
        assert_eq!(
            verify_narinfo(&with_sigs(&[&renamed]), &[key(KEY_A)]),
            Verdict::NoTrustedSignature
        );
    }

    #[test]
    fn tampered_fields_give_bad_signature() {
        let mut info = real();
        info.nar_size += 1;
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), Verdict::BadSignature);
        let mut info = real();
        info.references.pop();
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), Verdict::BadSignature);
        // URL and compression are not signed: rewriting them is fine.
        let mut info = real();
        info.url = "nar/elsewhere.nar.xz?upstream=2".into();
        info.compression = None;
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), valid_a());
    }

    #[test]
    fn a_wrong_but_well_formed_signature_is_ignored_when_another_verifies() {
        let other = SecretKey::generate("cache-a-1")
            .unwrap()
            .sign(&real().fingerprint());
        let info = with_sigs(&[&other, REAL_SIG]);
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), valid_a());
        assert_eq!(
            verify_narinfo(&with_sigs(&[&other]), &[key(KEY_A)]),
            Verdict::BadSignature
        );
    }

    #[test]
    fn malformed_trusted_signature_is_bad_even_next_to_a_valid_one() {
        // Nix aborts the whole run on these ("signature is not valid").
        let short = format!("cache-a-1:{}", BASE64.encode([7u8; 63]));
        let long = format!("cache-a-1:{}", BASE64.encode([7u8; 65]));
        for bad in [
            "cache-a-1:",
            "cache-a-1",
            "cache-a-1:not base64!",
            &short,
            &long,
        ] {
            for sigs in [vec![bad], vec![bad, REAL_SIG], vec![REAL_SIG, bad]] {
                assert_eq!(
                    verify_narinfo(&with_sigs(&sigs), &[key(KEY_A)]),
                    Verdict::BadSignature,
                    "{sigs:?}"
                );
            }
        }
        // Under a name we do not trust it is none of our business.
        let info = with_sigs(&["someone-else:", REAL_SIG]);
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), valid_a());
    }

    #[test]
    fn a_ca_line_that_does_not_prove_the_path_is_refused() {
        // The forgery: a signed narinfo with its Sig lines dropped and a CA
        // line added. The CA is well-formed but names another path.
        let mut info = with_sigs(&[]);
        info.ca =
            Some("fixed:r:sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk".into());
        let bad = Verdict::BadContentAddress;
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), bad);
        assert_eq!(verify_narinfo(&info, &[]), bad);
        for ca in [
            "fixed:git:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
            "text:sha256:x",
            "junk",
        ] {
            info.ca = Some(ca.into());
            assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), bad, "{ca}");
        }
        // A wrong but well-formed signature does not help it.
        let other = SecretKey::generate("cache-a-1").unwrap().sign("unrelated");
        info.sigs = vec![other];
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), bad);
        // A valid signature is enough, whatever the CA says (as in Nix).
        info.sigs.push(REAL_SIG.into());
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), valid_a());
        info.sigs.push("cache-a-1:AAAA".into());
        assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), Verdict::BadSignature);
    }

    #[test]
    fn content_addressed_paths_pass_unsigned() {
        use crate::proto::content_address::tests::{DEP, SELF_REF};
        let ca = Verdict::ContentAddressed;
        for text in [DEP, SELF_REF] {
            let mut info = NarInfo::parse(text.as_bytes()).unwrap();
            assert!(info.sigs.is_empty());
            assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), ca);
            assert_eq!(verify_narinfo(&info, &[]), ca);
            // Nix checks the CA before the signatures: a failing one is
            // ignored, a malformed one under a trusted name still is not.
            let other = SecretKey::generate("cache-a-1").unwrap().sign("unrelated");
            info.sigs = vec![other];
            assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), ca);
            info.sigs.push("cache-a-1:AAAA".into());
            assert_eq!(verify_narinfo(&info, &[key(KEY_A)]), Verdict::BadSignature);
            // Any change to what the CA covers breaks it.
            let mut info = NarInfo::parse(text.as_bytes()).unwrap();
            info.references
                .push("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x".into());
            assert_eq!(
                verify_narinfo(&info, &[key(KEY_A)]),
                Verdict::BadContentAddress
            );
        }
    }

    #[test]
    fn keys_sharing_a_name_are_all_tried() {
        let rotated = SecretKey::generate("cache-a-1").unwrap().public();
        assert_eq!(
            verify_narinfo(&real(), &[rotated.clone(), key(KEY_A)]),
            valid_a()
        );
        assert_eq!(verify_narinfo(&real(), &[key(KEY_A), rotated]), valid_a());
    }

    #[test]
    fn verdict_acceptance_and_labels() {
        assert!(valid_a().is_accepted());
        assert!(Verdict::ContentAddressed.is_accepted());
        assert!(!Verdict::BadContentAddress.is_accepted());
        assert_eq!(Verdict::BadContentAddress.label(), "bad_content_address");
        assert!(!Verdict::NoTrustedSignature.is_accepted());
        assert!(!Verdict::BadSignature.is_accepted());
        assert_eq!(Verdict::BadSignature.label(), "bad_signature");
        assert_eq!(valid_a().label(), "valid");
    }

    #[test]
    fn property_sign_then_verify_and_any_bit_flip_fails() {
        let keys: Vec<SecretKey> = (0..3)
            .map(|i| SecretKey::generate(&format!("k{i}")).unwrap())
            .collect();
        let trusted: Vec<PublicKey> = keys.iter().map(SecretKey::public).collect();
        let mut info = real();
        for round in 0..200u64 {
            let sk = &keys[(round % 3) as usize];
            info.nar_size = round + 1;
            info.sigs = vec![sk.sign(&info.fingerprint())];
            let want = Verdict::Valid {
                key_name: sk.name().to_owned(),
            };
            assert_eq!(verify_narinfo(&info, &trusted), want);
            // Flip one bit of the signature bytes.
            let (name, data) = info.sigs[0].split_once(':').unwrap();
            let mut bytes = BASE64.decode(data).unwrap();
            bytes[(round as usize * 7) % 64] ^= 1 << (round % 8);
            info.sigs = vec![format!("{name}:{}", BASE64.encode(&bytes))];
            assert_eq!(
                verify_narinfo(&info, &trusted),
                Verdict::BadSignature,
                "{round}"
            );
        }
    }
}
