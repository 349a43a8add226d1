//! Nix-format test data, written independently of `ncro::proto` so that the
//! two implementations check each other: store hashes, nix-base32, NAR
//! serialisation and narinfos signed the way `nix store sign` signs them.
//! `e2e_nix::nix_accepts_fake_signed_narinfo` proves the real Nix client
//! accepts what this module produces.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use rand::Rng as _;

/// Nix's base32 alphabet (no e, o, u, t).
pub const NIX_BASE32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix base32: the last character holds the lowest five bits, so the
/// string reads as one big number written most-significant digit first.
pub fn nix_base32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
        out.push(char::from(
            NIX_BASE32_ALPHABET[usize::from((low | high) & 0x1f)],
        ));
    }
    out
}

/// A random, well-formed 32-character store-path hash.
pub fn random_hash() -> String {
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| char::from(NIX_BASE32_ALPHABET[rng.gen_range(0..32)]))
        .collect()
}

/// `n` random bytes (incompressible NAR payloads for streaming tests).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill(&mut v[..]);
    v
}

/// SHA-256 from ring, reached through rustls (a direct dependency), so the
/// tests need no extra hashing crate.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let tls13 = suite
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    let digest = tls13.common.hash_provider.hash(data);
    digest
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes")
}

/// `sha256:<52 nix-base32 chars>`, the form used by `NarHash:`.
pub fn nix_sha256(data: &[u8]) -> String {
    format!("sha256:{}", nix_base32(&sha256(data)))
}

/// The NAR serialisation of a single regular file.
pub fn nar_of_file(contents: &[u8], executable: bool) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }
    let mut out = Vec::with_capacity(contents.len() + 160);
    for token in [&b"nix-archive-1"[..], b"(", b"type", b"regular"] {
        put(&mut out, token);
    }
    if executable {
        put(&mut out, b"executable");
        put(&mut out, b"");
    }
    put(&mut out, b"contents");
    put(&mut out, contents);
    put(&mut out, b")");
    out
}

/// An ed25519 binary-cache key pair in Nix's `name:base64` formats.
#[derive(Clone)]
pub struct TestKey {
    name: String,
    key: SigningKey,
}

impl TestKey {
    pub fn generate(name: &str) -> TestKey {
        TestKey::from_seed(name, rand::thread_rng().gen())
    }

    pub fn from_seed(name: &str, seed: [u8; 32]) -> TestKey {
        TestKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:base64(32-byte public key)`, as in `trusted-public-keys`.
    pub fn public_key(&self) -> String {
        let public = self.key.verifying_key().to_bytes();
        format!("{}:{}", self.name, BASE64.encode(public))
    }

    /// `name:base64(seed || public key)`, the `nix-store
    /// --generate-binary-cache-key` secret-key file format.
    pub fn secret_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }

    /// A `Sig:` value: `name:base64(ed25519 signature of fingerprint)`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }
}

/// One store path with a real NAR, ready to be served as narinfo + NAR.
#[derive(Clone, Debug)]
pub struct TestPath {
    /// 32 nix-base32 characters.
    pub hash: String,
    pub name: String,
    pub nar: Vec<u8>,
    /// Basenames (`<hash>-<name>`), kept sorted like Nix keeps them.
    pub references: Vec<String>,
    pub deriver: Option<String>,
}

impl TestPath {
    /// A path with a random hash and a small file that names it.
    pub fn new(name: &str) -> TestPath {
        let hash = random_hash();
        let contents = format!("test path {hash}-{name}\n");
        TestPath::with_hash(&hash, name, contents.as_bytes())
    }

    /// A path with a random hash whose NAR holds `contents` as one file.
    pub fn with_contents(name: &str, contents: &[u8]) -> TestPath {
        TestPath::with_hash(&random_hash(), name, contents)
    }

    pub fn with_hash(hash: &str, name: &str, contents: &[u8]) -> TestPath {
        TestPath {
            hash: hash.to_owned(),
            name: name.to_owned(),
            nar: nar_of_file(contents, false),
            references: Vec::new(),
            deriver: None,
        }
    }

    /// Adds `other` to `References:` (and to the signed fingerprint).
    pub fn reference(mut self, other: &TestPath) -> TestPath {
        self.references.push(other.basename());
        self.references.sort();
        self.references.dedup();
        self
    }

    pub fn basename(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    pub fn store_path(&self) -> String {
        format!("/nix/store/{}", self.basename())
    }

    pub fn nar_hash(&self) -> String {
        nix_sha256(&self.nar)
    }

    pub fn nar_size(&self) -> u64 {
        self.nar.len() as u64
    }

    /// The narinfo `URL:` value (relative, uncompressed NAR).
    pub fn nar_url(&self) -> String {
        format!("nar/{}.nar", nix_base32(&sha256(&self.nar)))
    }

    /// The request path a client uses for the NAR: `/` + [`Self::nar_url`].
    pub fn nar_request_path(&self) -> String {
        format!("/{}", self.nar_url())
    }

    /// `/<hash>.narinfo`
    pub fn narinfo_request_path(&self) -> String {
        format!("/{}.narinfo", self.hash)
    }

    /// What Nix signs: `1;<path>;<NarHash>;<NarSize>;<refs as full paths>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("/nix/store/{r}"))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.store_path(),
            self.nar_hash(),
            self.nar_size(),
            refs.join(",")
        )
    }

    /// The narinfo text with one `Sig:` line per signer, LF line endings.
    pub fn narinfo(&self, signers: &[&TestKey]) -> String {
        let nar_hash = self.nar_hash();
        let mut s = format!(
            "StorePath: {}\nURL: {}\nCompression: none\nFileHash: {nar_hash}\nFileSize: {}\n\
             NarHash: {nar_hash}\nNarSize: {}\nReferences: {}\n",
            self.store_path(),
            self.nar_url(),
            self.nar_size(),
            self.nar_size(),
            self.references.join(" "),
        );
        if let Some(deriver) = &self.deriver {
            s.push_str(&format!("Deriver: {deriver}\n"));
        }
        let fingerprint = self.fingerprint();
        for key in signers {
            s.push_str(&format!("Sig: {}\n", key.sign(&fingerprint)));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

    #[test]
    fn nix_base32_matches_nix_for_known_digests() {
        // Reference values from `nix hash to-base32` (Nix 2.8).
        assert_eq!(
            nix_base32(&sha256(b"")),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            nix_base32(&sha256(b"abc")),
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        assert_eq!(nix_base32(&[0xff]), "7z");
        assert_eq!(nix_base32(&[]), "");
    }

    #[test]
    fn random_hash_uses_only_the_nix_alphabet() {
        for _ in 0..100 {
            let h = random_hash();
            assert_eq!(h.len(), 32);
            assert!(h.bytes().all(|b| NIX_BASE32_ALPHABET.contains(&b)), "{h}");
        }
    }

    #[test]
    fn nar_of_file_pads_every_string_to_eight_bytes() {
        let nar = nar_of_file(b"hello", false);
        assert_eq!(nar.len() % 8, 0);
        assert_eq!(&nar[..8], &13u64.to_le_bytes());
        assert_eq!(&nar[8..21], b"nix-archive-1");
        let exec = nar_of_file(b"hello", true);
        assert_eq!(exec.len(), nar.len() + 16 + 16);
    }

    #[test]
    fn narinfo_signature_verifies_over_the_fingerprint() {
        let key = TestKey::generate("test-key-1");
        let dep = TestPath::new("dep");
        let top = TestPath::new("top").reference(&dep);
        let text = top.narinfo(&[&key]);
        assert!(!text.contains('\r'));
        assert!(text.contains(&format!("References: {}\n", dep.basename())));
        let sig_line = text.lines().find_map(|l| l.strip_prefix("Sig: ")).unwrap();
        let (name, sig_b64) = sig_line.split_once(':').unwrap();
        assert_eq!(name, "test-key-1");
        let (_, pk_b64) = key
            .public_key()
            .split_once(':')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .unwrap();
        let pk: [u8; 32] = BASE64.decode(pk_b64).unwrap().try_into().unwrap();
        let sig: [u8; 64] = BASE64.decode(sig_b64).unwrap().try_into().unwrap();
        let fp = format!(
            "1;{};{};{};/nix/store/{}",
            top.store_path(),
            top.nar_hash(),
            top.nar.len(),
            dep.basename()
        );
        assert_eq!(top.fingerprint(), fp);
        VerifyingKey::from_bytes(&pk)
            .unwrap()
            .verify(fp.as_bytes(), &Signature::from_bytes(&sig))
            .expect("signature verifies");
    }

    #[test]
    fn secret_key_holds_seed_and_public_key() {
        let key = TestKey::from_seed("k", [7u8; 32]);
        let (_, sk) = key
            .secret_key()
            .split_once(':')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .unwrap();
        let bytes = BASE64.decode(sk).unwrap();
        assert_eq!(bytes.len(), 64);
        assert_eq!(&bytes[..32], &[7u8; 32]);
        assert_eq!(
            key.public_key(),
            TestKey::from_seed("k", [7u8; 32]).public_key()
        );
    }
}
