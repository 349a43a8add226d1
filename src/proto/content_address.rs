//! Content-addressed store paths: the store path a narinfo's `CA:` field
//! implies, computed exactly as Nix does (`makeFixedOutputPathFromCA`).
//!
//! Nix accepts a narinfo without a trusted signature when its path is
//! content-addressed (`ValidPathInfo::isContentAddressed`): it recomputes
//! the store path from the `CA:` hash, the name and the references, and
//! trusts the narinfo only if that gives `StorePath` back. A `CA:` line
//! alone proves nothing; [`proves_store_path`] is that check.
//!
//! The store path of type `T`, a SHA-256 `digest` and `name` is
//! `/nix/store/` + nixbase32(fold20(sha256("T:sha256:<hex digest>:/nix/store:<name>")))
//! + `-<name>`, where fold20 XORs byte `i` of the hash into byte `i % 20`.
//!
//! | `CA:` | type | inner digest |
//! |---|---|---|
//! | `text:sha256:<h>` | `text` + `:<ref path>` per reference (sorted); no self reference | `h` |
//! | `fixed:r:sha256:<h>` | `source` + `:<ref path>` per other reference (sorted) + `:self` if self-referencing | `h` |
//! | `fixed:[r:]<algo>:<h>` otherwise | `output:out`; no references at all | sha256(`fixed:out:[r:]<algo>:<hex h>:`) |
//!
//! The hash after `<algo>:` may be hex, nixbase32 or base64, told apart
//! by length (Nix's `Hash::parseNonSRIUnprefixed`); SRI is not accepted
//! there. Methods Nix gates behind experimental features (`fixed:git:`)
//! and anything else unknown prove nothing.

use super::base32;
use super::narinfo::{parse_hash, NarInfo};
use super::store_path::{name_of, STORE_DIR};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Bytes of a store path hash (before nixbase32).
const STORE_HASH_BYTES: usize = 20;

/// How the content was ingested, from the `CA:` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `text:`: a flat file (`builtins.toFile`, `.drv` files).
    Text,
    /// `fixed:`: a flat file hashed as is.
    Flat,
    /// `fixed:r:`: the NAR serialisation of the path.
    NixArchive,
}

/// A parsed `CA:` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentAddress {
    pub method: Method,
    /// `md5`, `sha1`, `sha256` or `sha512`.
    pub algo: &'static str,
    pub digest: Vec<u8>,
}

/// Why a `CA:` value does not give a store path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CaError {
    #[error("content address is not text:<algo>:<hash> or fixed:[r:]<algo>:<hash>")]
    UnknownMethod,
    #[error("content address hash is not <md5|sha1|sha256|sha512>:<hex|nix32|base64>")]
    BadHash,
    #[error("text content address must use sha256")]
    TextNotSha256,
    #[error("text content address with a self reference")]
    TextSelfReference,
    #[error("fixed-output content address (other than fixed:r:sha256) with references")]
    FixedWithReferences,
}

impl ContentAddress {
    /// Parses a `CA:` value as Nix's `ContentAddress::parse` does.
    pub fn parse(s: &str) -> Result<ContentAddress, CaError> {
        let (prefix, rest) = s.split_once(':').ok_or(CaError::UnknownMethod)?;
        let (method, rest) = match prefix {
            "text" => (Method::Text, rest),
            // `git:` needs an experimental feature; not accepted here.
            "fixed" if rest.starts_with("git:") => return Err(CaError::UnknownMethod),
            "fixed" => match rest.strip_prefix("r:") {
                Some(rest) => (Method::NixArchive, rest),
                None => (Method::Flat, rest),
            },
            _ => return Err(CaError::UnknownMethod),
        };
        // `<algo>:<hash>`; without the ':' `parse_hash` would take SRI.
        if !rest.contains(':') {
            return Err(CaError::BadHash);
        }
        let (algo, digest) = parse_hash(rest).ok_or(CaError::BadHash)?;
        Ok(ContentAddress {
            method,
            algo,
            digest,
        })
    }

    /// The store path of content with this address named `name` that
    /// refers to `others` (basenames `<hash>-<name>`, any order, repeats
    /// allowed, not including the path itself) and, if `self_ref`, to
    /// itself.
    pub fn store_path(
        &self,
        name: &str,
        others: &[&str],
        self_ref: bool,
    ) -> Result<String, CaError> {
        let mut refs = others.to_vec();
        refs.sort_unstable();
        refs.dedup();
        let sha256 = self.algo == "sha256";
        match self.method {
            Method::Text if !sha256 => Err(CaError::TextNotSha256),
            Method::Text if self_ref => Err(CaError::TextSelfReference),
            Method::Text => Ok(make_store_path("text", &refs, false, &self.digest, name)),
            Method::NixArchive if sha256 => Ok(make_store_path(
                "source",
                &refs,
                self_ref,
                &self.digest,
                name,
            )),
            Method::Flat | Method::NixArchive if self_ref || !refs.is_empty() => {
                Err(CaError::FixedWithReferences)
            }
            Method::Flat | Method::NixArchive => {
                let mut inner = Sha256::new();
                inner.update(b"fixed:out:");
                if self.method == Method::NixArchive {
                    inner.update(b"r:");
                }
                inner.update(self.algo.as_bytes());
                inner.update(b":");
                inner.update(hex::encode(&self.digest).as_bytes());
                inner.update(b":");
                let inner = inner.finalize();
                Ok(make_store_path("output:out", &[], false, &inner, name))
            }
        }
    }
}

/// Nix's `makeStorePath(makeType(type, refs), sha256 digest, name)`;
/// `refs` sorted and unique.
fn make_store_path(ty: &str, refs: &[&str], self_ref: bool, digest: &[u8], name: &str) -> String {
    let mut h = Sha256::new();
    h.update(ty.as_bytes());
    for r in refs {
        h.update(b":");
        h.update(STORE_DIR.as_bytes());
        h.update(b"/");
        h.update(r.as_bytes());
    }
    if self_ref {
        h.update(b":self");
    }
    h.update(b":sha256:");
    h.update(hex::encode(digest).as_bytes());
    h.update(b":");
    h.update(STORE_DIR.as_bytes());
    h.update(b":");
    h.update(name.as_bytes());
    let full = h.finalize();
    let mut folded = [0u8; STORE_HASH_BYTES];
    for (i, b) in full.iter().enumerate() {
        folded[i % STORE_HASH_BYTES] ^= b;
    }
    format!("{STORE_DIR}/{}-{name}", base32::encode(&folded))
}

/// The store path `info`'s `CA:` field implies for its name and
/// references (`Ok(None)` without a `CA:` line).
pub fn implied_store_path(info: &NarInfo) -> Result<Option<String>, CaError> {
    let Some(ca) = &info.ca else {
        return Ok(None);
    };
    let ca = ContentAddress::parse(ca)?;
    let own = info
        .store_path
        .strip_prefix(STORE_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(&info.store_path);
    let mut self_ref = false;
    let others: Vec<&str> = info
        .references
        .iter()
        .map(String::as_str)
        .filter(|r| {
            let is_self = *r == own;
            self_ref |= is_self;
            !is_self
        })
        .collect();
    ca.store_path(name_of(&info.store_path), &others, self_ref)
        .map(Some)
}

/// True when `info` has a `CA:` field that computes to its `StorePath`
/// (Nix's `isContentAddressed`): such a narinfo needs no signature.
pub fn proves_store_path(info: &NarInfo) -> bool {
    matches!(implied_store_path(info), Ok(Some(path)) if path == info.store_path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `nix-store --print-fixed-path [--recursive] <algo> <hex of
    /// sha-of-"hello"> hello.txt` with Nix 2.8.
    const HELLO: [(&str, &str, &str, &str); 4] = [
        (
            "md5",
            "5d41402abc4b2a76b9719d911017c592",
            "kckpqk5dy7g82i6w9vjmp4n2ilz1m9sk",
            "lc4xxivjdb4alfad0cnb7hqh3qdf10vc",
        ),
        (
            "sha1",
            "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
            "bl4cpnz7cwz57jcydmc1ylp7y584axbs",
            "i1qwvcgyn128a46qdk48ap7hrd5vrxjd",
        ),
        (
            "sha256",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "iixxin28s82lrxs8v4lcf7nha2dkwprm",
            "znxk460dqf3s9jhv1pynin6mszpxzizm",
        ),
        (
            "sha512",
            "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7\
             2323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043",
            "8wyqp5vyydvckami85sghchxjldmk33b",
            "0y4scmg0kiszg5ri1gc9xmch1wzasaki",
        ),
    ];

    fn path(ca: &str, name: &str, others: &[&str], self_ref: bool) -> Result<String, CaError> {
        ContentAddress::parse(ca)?.store_path(name, others, self_ref)
    }

    fn store(hash: &str, name: &str) -> String {
        format!("/nix/store/{hash}-{name}")
    }

    #[test]
    fn fixed_paths_match_nix_print_fixed_path() {
        for (algo, hex, flat, recursive) in HELLO {
            let flat_ca = format!("fixed:{algo}:{hex}");
            assert_eq!(
                path(&flat_ca, "hello.txt", &[], false),
                Ok(store(flat, "hello.txt")),
                "{algo}"
            );
            let rec_ca = format!("fixed:r:{algo}:{hex}");
            assert_eq!(
                path(&rec_ca, "hello.txt", &[], false),
                Ok(store(recursive, "hello.txt")),
                "{algo}"
            );
        }
    }

    #[test]
    fn hash_encodings_are_told_apart_by_length() {
        let (_, hex, flat, _) = HELLO[2];
        let bytes = hex::decode(hex).unwrap();
        let want = Ok(store(flat, "hello.txt"));
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        for digest in [
            hex.to_owned(),
            hex.to_ascii_uppercase(),
            base32::encode(&bytes),
            b64.clone(),
        ] {
            let ca = format!("fixed:sha256:{digest}");
            assert_eq!(path(&ca, "hello.txt", &[], false), want, "{ca}");
        }
        // SRI is not Nix's CA syntax, and neither is a missing algorithm.
        for bad in [
            format!("fixed:sha256-{b64}"),
            format!("fixed:{b64}"),
            format!("fixed:sha256:{}", &hex[1..]),
            format!("fixed:sha256:{hex}0"),
            format!("fixed:sha3:{hex}"),
            "fixed:sha256:".to_owned(),
            "fixed:".to_owned(),
        ] {
            assert_eq!(ContentAddress::parse(&bad), Err(CaError::BadHash), "{bad}");
        }
    }

    #[test]
    fn unknown_methods_prove_nothing() {
        let (_, hex, _, _) = HELLO[1];
        for bad in [
            format!("fixed:git:sha1:{hex}"),
            format!("fixed:git:sha256:{}", HELLO[2].1),
            format!("nar:sha1:{hex}"),
            format!("Text:sha256:{}", HELLO[2].1),
            "".to_owned(),
            "text".to_owned(),
        ] {
            assert_eq!(
                ContentAddress::parse(&bad),
                Err(CaError::UnknownMethod),
                "{bad}"
            );
        }
    }

    /// `builtins.toFile` paths computed by Nix 2.8 (`nix-instantiate
    /// --eval`): "b" = "x", "c" = "y", "a.drv" = "ref <c> <b>" referring
    /// to both, "plain" = "hello".
    #[test]
    fn text_paths_match_builtins_to_file() {
        let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
        let b = "w320iz5b4848q2l7a7x8mw2vymm22ddg-b";
        let c = "apxsqdxczpngmp2qlqkjj6k7qy5ywhij-c";
        let text = |content: &str| format!("text:sha256:{}", sha(content));
        assert_eq!(path(&text("x"), "b", &[], false), Ok(store(&b[..32], "b")));
        assert_eq!(
            path(&text("hello"), "plain", &[], false),
            Ok(store("hryqmcj4b8a04mhxl5bpm763lm15cfkp", "plain"))
        );
        let a = text(&format!("ref /nix/store/{c} /nix/store/{b}"));
        let want = Ok(store("y02b2qlh1rx8zjp2c5f3zkbzai9nv5zn", "a.drv"));
        // References are sorted and de-duplicated, whatever their order.
        assert_eq!(path(&a, "a.drv", &[b, c], false), want);
        assert_eq!(path(&a, "a.drv", &[c, b, c], false), want);
        assert_ne!(path(&a, "a.drv", &[b], false), want);
        assert_eq!(
            path(&a, "a.drv", &[b, c], true),
            Err(CaError::TextSelfReference)
        );
        assert_eq!(
            path(&format!("text:sha1:{}", HELLO[1].1), "x", &[], false),
            Err(CaError::TextNotSha256)
        );
    }

    /// Written by `nix store make-content-addressed` (Nix 2.8) for a path
    /// that refers to itself and to `dep`, then `nix copy --to file://`.
    pub(crate) const SELF_REF: &str =
        "StorePath: /nix/store/yl94sq47ifalk94c9kff9bqc95h778fd-selfref\n\
        URL: nar/1cbic8l3d1xsqn8qab1y76kqrpz3snz1gpvhq2jmzxsjv5y8mwjf.nar.xz\n\
        Compression: xz\n\
        FileHash: sha256:1cbic8l3d1xsqn8qab1y76kqrpz3snz1gpvhq2jmzxsjv5y8mwjf\n\
        FileSize: 208\n\
        NarHash: sha256:1kh2ngmj11n8q06c5rj6ri1z75a8g0jala15fjqyirr87i2rdkai\n\
        NarSize: 216\n\
        References: az31knmcmkcvqp327ha4d0jxlpimbbi3-dep yl94sq47ifalk94c9kff9bqc95h778fd-selfref\n\
        CA: fixed:r:sha256:00xzb54v6ldzhpalhl3zzzsg6irz8ibxayzab5nnyqfjqk47r55s\n";
    /// Its reference, from the same run.
    pub(crate) const DEP: &str = "StorePath: /nix/store/az31knmcmkcvqp327ha4d0jxlpimbbi3-dep\n\
        URL: nar/0vndhnpqzhz4n0lz6920j0pjmzap93vf8mncpd77m1hqiff28gfm.nar.xz\n\
        Compression: xz\n\
        FileHash: sha256:0vndhnpqzhz4n0lz6920j0pjmzap93vf8mncpd77m1hqiff28gfm\n\
        FileSize: 124\n\
        NarHash: sha256:0i0g5h0y4w5xf5rynap2x27zaib43xl5qr5wlj9vw83ai7p732m1\n\
        NarSize: 120\n\
        References: \n\
        CA: fixed:r:sha256:0i0g5h0y4w5xf5rynap2x27zaib43xl5qr5wlj9vw83ai7p732m1\n";

    fn parse(text: &str) -> NarInfo {
        NarInfo::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn source_paths_with_references_and_self_match_nix() {
        for text in [SELF_REF, DEP] {
            let info = parse(text);
            assert_eq!(implied_store_path(&info), Ok(Some(info.store_path.clone())));
            assert!(proves_store_path(&info), "{text}");
        }
        // Without the self reference, or without the other one, the path
        // differs.
        let mut info = parse(SELF_REF);
        info.references.pop();
        assert!(!proves_store_path(&info));
        let mut info = parse(SELF_REF);
        info.references.remove(0);
        assert!(!proves_store_path(&info));
        let mut info = parse(SELF_REF);
        info.references.reverse();
        assert!(proves_store_path(&info), "order does not matter");
    }

    /// From the real-data corpus (cache.nixos.org narinfos via tvix's
    /// tests): StorePath, CA, references.
    #[test]
    fn cache_nixos_org_paths() {
        let cases: [(&str, &str, &[&str]); 4] = [
            (
                "/nix/store/0z91agv7vjamx6cwpclf21mivxqwarba-regrrr_0.1.3.tar.gz",
                "fixed:sha256:1ih27mgqfzjlas97rvj18s8j3p0bpwb03vr71yrq776vzv1v6fcs",
                &[],
            ),
            (
                "/nix/store/k20pahypzvr49fy82cw5sx72hdfg3qcr-texlive-hyphenex-37354",
                "fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
                &[],
            ),
            (
                "/nix/store/vlapfq163ddwdcn2smfk31x6fs0c9jh6-source",
                "fixed:r:sha256:0gkkhap0ljzw750z2ypjr87n4mhinv07flvcshvi9l4jlqs2w1bc",
                &[],
            ),
            (
                "/nix/store/s4mcg8jhhm55k3zyblpjabmcavi7403k-docbook2X-0.8.8.tar.gz.drv",
                "text:sha256:0p8wjixkbg49jadn3iygq7a8pa126id83y7f6qh9hlslkvxm56i8",
                &[
                    "43shw2f4xz1yj7cpyazcqa5895zwwbic-curl-8.1.1.drv",
                    "48ax6lwv7vh54q7nf55zmga80fybc1mj-mirrors-list.drv",
                    "57620l1168piiia2bmmsxxhh7sjb2n40-builder.sh",
                    "mcjbr0j20q0sj5a31d3acmxgjabb5xs6-bash-5.2-p15.drv",
                    "r4p6d7r1shc9rhpsida71gl4c3sgxzcf-stdenv-linux.drv",
                ],
            ),
        ];
        for (store_path, ca, refs) in cases {
            let name = name_of(store_path);
            assert_eq!(path(ca, name, refs, false).as_deref(), Ok(store_path));
        }
    }

    #[test]
    fn fixed_outputs_other_than_source_may_not_have_references() {
        let (_, hex, flat, recursive) = HELLO[1];
        let dep = "az31knmcmkcvqp327ha4d0jxlpimbbi3-dep";
        for (ca, want) in [
            (format!("fixed:sha1:{hex}"), flat),
            (format!("fixed:r:sha1:{hex}"), recursive),
            (format!("fixed:sha256:{}", HELLO[2].1), HELLO[2].2),
        ] {
            assert_eq!(
                path(&ca, "hello.txt", &[], false),
                Ok(store(want, "hello.txt"))
            );
            assert_eq!(
                path(&ca, "hello.txt", &[dep], false),
                Err(CaError::FixedWithReferences)
            );
            assert_eq!(
                path(&ca, "hello.txt", &[], true),
                Err(CaError::FixedWithReferences)
            );
        }
    }

    #[test]
    fn a_ca_line_that_names_another_path_proves_nothing() {
        let mut info = parse(DEP);
        // The hash of some other content: a valid CA, for another path.
        info.ca = Some(format!("fixed:r:sha256:{}", HELLO[2].1));
        assert!(implied_store_path(&info).unwrap().is_some());
        assert!(!proves_store_path(&info));
        info.ca = Some("fixed:git:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw".into());
        assert_eq!(implied_store_path(&info), Err(CaError::UnknownMethod));
        assert!(!proves_store_path(&info));
        info.ca = None;
        assert_eq!(implied_store_path(&info), Ok(None));
        assert!(!proves_store_path(&info));
        // The name is part of the path.
        let mut info = parse(DEP);
        info.store_path = "/nix/store/az31knmcmkcvqp327ha4d0jxlpimbbi3-dep2".into();
        assert!(!proves_store_path(&info));
    }

    #[test]
    fn property_mangled_addresses_never_panic() {
        // Truncations, byte flips and inserted separators of valid CA
        // values either parse and give a store path, or fail cleanly.
        let seeds = [
            format!("fixed:r:sha256:{}", HELLO[2].1),
            format!("fixed:sha1:{}", HELLO[1].1),
            format!("fixed:r:md5:{}", HELLO[0].1),
            format!("text:sha256:{}", HELLO[2].1),
            "fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw".to_owned(),
        ];
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z ^ (z >> 31)
        };
        const POOL: &[u8] = b"0az:r-=+/\xff";
        let dep = "az31knmcmkcvqp327ha4d0jxlpimbbi3-dep";
        let mut parsed = 0;
        for round in 0..3000usize {
            let mut bytes = seeds[round % seeds.len()].clone().into_bytes();
            let i = next() as usize % bytes.len();
            match round % 3 {
                0 => bytes.truncate(i),
                1 => bytes[i] = POOL[next() as usize % POOL.len()],
                _ => bytes.insert(i, b":r"[next() as usize % 2]),
            }
            let text = String::from_utf8_lossy(&bytes);
            let Ok(ca) = ContentAddress::parse(&text) else {
                continue;
            };
            parsed += 1;
            let refs: &[&str] = if next() % 2 == 0 { &[dep] } else { &[] };
            if let Ok(p) = ca.store_path("x", refs, next() % 2 == 0) {
                assert!(crate::proto::store_path::StoreHash::from_store_path(&p).is_some());
            }
        }
        assert!(parsed > 100, "{parsed}");
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            CaError::FixedWithReferences.to_string(),
            "fixed-output content address (other than fixed:r:sha256) with references"
        );
    }
}
