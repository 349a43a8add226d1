//! The narinfo `URL:` as ncro serves it (`upstreams[].nar_url_mode`), the
//! canonical NAR path `nar/<store hash><ext>` and the proof that two
//! narinfos describe the same NAR file (docs/nar-failover.md, "Canonical
//! NAR URLs"). Nothing here signs or verifies: the `URL:` line is not part
//! of the signed fingerprint, which is why rewriting it is safe.

use serde::{Deserialize, Serialize};

use super::{normalise_hash, NarInfo};
use crate::proto::store_path::{StoreHash, HASH_LEN};

/// How the `URL:` of an upstream's narinfo is served.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NarUrlMode {
    /// The upstream's `URL:` unchanged (ncro 2.2).
    Keep,
    /// `nar/<store hash><ext>`: the client fetches the NAR through ncro by
    /// a name that carries the store hash.
    #[default]
    ToSelf,
    /// The absolute URL of the NAR at the upstream (or its `storage_url`):
    /// the client fetches it directly.
    ToUpstream,
}

/// Whether a narinfo `URL:` is absolute (has its own scheme and host).
pub fn is_absolute(url: &str) -> bool {
    ["http://", "https://", "s3://"].iter().any(|s| {
        url.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    })
}

/// The extension of a NAR file name: from the first `.nar` of the last
/// path segment to its end, query removed (`.nar`, `.nar.xz`, ...); empty
/// when the name has no `.nar`.
pub fn nar_ext(url: &str) -> &str {
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    let name = path.rsplit('/').next().unwrap_or_default();
    name.find(".nar").map_or("", |at| &name[at..])
}

/// The `URL:` value to serve instead of `url` (the upstream's), or None
/// to keep it: `keep`, or an absolute URL (the client already fetches it
/// directly; ncro has no origin for it). `base` is where a relative `url`
/// resolves for the client: the upstream's `storage_url`, else its `url`.
pub fn served_url(mode: NarUrlMode, hash: &StoreHash, url: &str, base: &str) -> Option<String> {
    if is_absolute(url) {
        return None;
    }
    match mode {
        NarUrlMode::Keep => None,
        // Built at their exact size (`format!` grows its buffer twice or
        // three times for these; this runs on every race won).
        NarUrlMode::ToSelf => Some(concat(&["nar/", hash.as_str(), nar_ext(url)])),
        NarUrlMode::ToUpstream => Some(concat(&[
            base.trim_end_matches('/'),
            "/",
            url.trim_start_matches('/'),
        ])),
    }
}

fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// A request path `/nar/<32-char store hash>[.nar...]` (query ignored):
/// the store hash and the extension the client was promised. Any other
/// NAR path (a FileHash name, a cache's own layout) is not canonical.
pub fn canonical_request(path: &str) -> Option<(StoreHash, &str)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let name = path.strip_prefix("/nar/")?;
    let (hash, ext) = name.split_at_checked(HASH_LEN)?;
    if !(ext.is_empty() || ext.starts_with(".nar")) || ext.contains('/') {
        return None;
    }
    Some((StoreHash::parse(hash.as_bytes())?, ext))
}

/// Why another upstream's narinfo does not describe the same NAR file as
/// the one a client was promised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMismatch {
    NarHash,
    Compression,
    FileHash,
    FileSize,
    /// Neither names a FileHash and the file is compressed: equal NAR
    /// hashes do not make equal compressed bytes.
    Unproven,
}

/// Whether `other` describes byte for byte the same NAR file as `promised`:
/// the same NarHash, Compression, FileHash and FileSize (hashes compared
/// in any encoding). Without a FileHash only an uncompressed file
/// (`Compression: none`, where the file is the NAR) can be proved.
pub fn same_file(promised: &NarInfo, other: &NarInfo) -> Result<(), FileMismatch> {
    if normalise_hash(&promised.nar_hash) != normalise_hash(&other.nar_hash) {
        return Err(FileMismatch::NarHash);
    }
    if promised.compression != other.compression {
        return Err(FileMismatch::Compression);
    }
    let (a, b) = (&promised.file_hash, &other.file_hash);
    if a.as_deref().map(normalise_hash) != b.as_deref().map(normalise_hash) {
        return Err(FileMismatch::FileHash);
    }
    if promised.file_size != other.file_size {
        return Err(FileMismatch::FileSize);
    }
    if promised.file_hash.is_none() && promised.compression.as_deref() != Some("none") {
        return Err(FileMismatch::Unproven);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "z3358nh04rrn2fw765nlbl8ff0w9p8cp";

    fn hash() -> StoreHash {
        StoreHash::parse(H.as_bytes()).unwrap()
    }

    #[test]
    fn ext_runs_from_the_first_nar_of_the_file_name() {
        assert_eq!(nar_ext("nar/abc.nar.xz"), ".nar.xz");
        assert_eq!(nar_ext("nar/abc.nar"), ".nar");
        assert_eq!(nar_ext("nar/abc.nar.zst?hash=x.nar.gz"), ".nar.zst");
        assert_eq!(nar_ext("https://blobs.example/x-foo.nar.zst"), ".nar.zst");
        assert_eq!(nar_ext("a.nar.dir/blob"), "");
        assert_eq!(nar_ext("nar/blob"), "");
    }

    #[test]
    fn served_url_by_mode() {
        let h = hash();
        let u = "nar/1w1f.nar.xz?x=1";
        assert_eq!(served_url(NarUrlMode::Keep, &h, u, "http://a"), None);
        assert_eq!(
            served_url(NarUrlMode::ToSelf, &h, u, "http://a").as_deref(),
            Some(format!("nar/{H}.nar.xz").as_str())
        );
        assert_eq!(
            served_url(NarUrlMode::ToUpstream, &h, u, "http://a/p/").as_deref(),
            Some("http://a/p/nar/1w1f.nar.xz?x=1")
        );
        assert_eq!(
            served_url(NarUrlMode::ToUpstream, &h, "/nar/x.nar", "http://a").as_deref(),
            Some("http://a/nar/x.nar")
        );
        // Absolute URLs are the client's to fetch: never rewritten.
        let abs = "https://blobs.example/x.nar.zst";
        assert_eq!(served_url(NarUrlMode::ToSelf, &h, abs, "http://a"), None);
        assert_eq!(
            served_url(NarUrlMode::ToUpstream, &h, abs, "http://a"),
            None
        );
    }

    #[test]
    fn canonical_requests_carry_a_store_hash() {
        let path = format!("/nar/{H}.nar.xz");
        assert_eq!(canonical_request(&path), Some((hash(), ".nar.xz")));
        assert_eq!(canonical_request(&format!("/nar/{H}")).unwrap().1, "");
        assert_eq!(
            canonical_request(&format!("/nar/{H}.nar?x")).unwrap().1,
            ".nar"
        );
        let file_hash = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3";
        assert!(canonical_request(&format!("/nar/{file_hash}.nar.xz")).is_none());
        assert!(canonical_request(&format!("/nar/{H}x.nar")).is_none());
        assert!(canonical_request(&format!("/nar/{H}.xz")).is_none());
        assert!(canonical_request(&format!("/x/{H}.nar")).is_none());
        assert!(canonical_request("/nar/eeee").is_none());
    }

    fn info(nar_hash: &str, comp: Option<&str>, fh: Option<&str>, fs: Option<u64>) -> NarInfo {
        NarInfo {
            nar_hash: nar_hash.into(),
            compression: comp.map(Into::into),
            file_hash: fh.map(Into::into),
            file_size: fs,
            ..Default::default()
        }
    }

    #[test]
    fn same_file_needs_every_file_field() {
        let nh = "sha256:01772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4";
        let fh = "sha256:17c7k3n58rpb2v76acz518qn3z0y23pkx9dc1plz246kgzj0jpz2";
        let a = info(nh, Some("xz"), Some(fh), Some(284));
        assert_eq!(same_file(&a, &a.clone()), Ok(()));
        let other_nh = "sha256:11772l4g95pwc0lq96idyn3q80d56wg8qs5s9dg45zc9vfgnckb4";
        let cases = [
            (
                info(other_nh, Some("xz"), Some(fh), Some(284)),
                FileMismatch::NarHash,
            ),
            (
                info(nh, Some("zstd"), Some(fh), Some(284)),
                FileMismatch::Compression,
            ),
            (
                info(nh, Some("xz"), Some(other_nh), Some(284)),
                FileMismatch::FileHash,
            ),
            (
                info(nh, Some("xz"), None, Some(284)),
                FileMismatch::FileHash,
            ),
            (
                info(nh, Some("xz"), Some(fh), Some(285)),
                FileMismatch::FileSize,
            ),
        ];
        for (b, why) in cases {
            assert_eq!(same_file(&a, &b), Err(why));
        }
        // Compressed without a FileHash: not provable.
        let bare = info(nh, Some("xz"), None, None);
        assert_eq!(same_file(&bare, &bare.clone()), Err(FileMismatch::Unproven));
        let plain = info(nh, Some("none"), None, Some(616));
        assert_eq!(same_file(&plain, &plain.clone()), Ok(()));
        // The same hash in hex and in nix-base32 is the same hash.
        let hex = "sha256:a2a0f8cb9c50c2b9c1b9f2b49b9afc89f8a8e2a29c02b3a6a4a06a14e86e0a01";
        let nix32 = normalise_hash(hex).into_owned();
        assert_ne!(hex, nix32);
        let a = info(hex, Some("none"), None, Some(616));
        assert_eq!(
            same_file(&a, &info(&nix32, Some("none"), None, Some(616))),
            Ok(())
        );
    }
}
