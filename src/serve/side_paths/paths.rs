//! Which binary-cache side paths ncro serves, and their exact shapes. Pure.
//!
//! Every path is checked here before anything else happens: a path that
//! does not have exactly the shape Nix writes is answered 400 and never
//! reaches an upstream, so no `..`, `%2e`, control byte or stray slash can
//! be smuggled into an upstream request line.

use crate::proto::narinfo::{is_basename, is_store_name};
use crate::proto::store_path::{StoreHash, HASH_LEN};

/// The kinds of side paths, also the `endpoint` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `log/<drv basename>`: a build log (`nix store copy-log`, Hydra).
    Log,
    /// `<hash>.ls`: a NAR listing (`write-nar-listing=true`).
    Listing,
    /// `realisations/sha256:<hex>!<output>.doi`: CA realisation, Nix ≤ 2.33.
    Realisation,
    /// `build-trace-v2/<drv basename>/<output>.doi`: CA build trace, Nix ≥ 2.34.
    BuildTrace,
    /// `debuginfo/<build-id>`: a pointer into a debug-output NAR.
    DebugInfo,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Log,
        Kind::Listing,
        Kind::Realisation,
        Kind::BuildTrace,
        Kind::DebugInfo,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Log => "log",
            Kind::Listing => "ls",
            Kind::Realisation => "realisation",
            Kind::BuildTrace => "build_trace",
            Kind::DebugInfo => "debuginfo",
        }
    }
}

/// A side path that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    /// The store hash whose narinfo route says which upstream to ask first
    /// (the path's own hash for `.ls`, the derivation's for logs and build
    /// traces); `None` when the path names no store path.
    pub route: Option<StoreHash>,
}

/// Longest build id accepted, in hex digits (GNU ld writes 8 to 20 bytes;
/// `--build-id=0x…` allows more, this is generous).
const MAX_BUILD_ID_HEX: usize = 128;
/// Shortest: a 4-byte id.
const MIN_BUILD_ID_HEX: usize = 8;

/// `None`: not a side path (the caller answers 404 as before).
/// `Some(Err(kind))`: under a side-path prefix but malformed (400).
pub fn classify(path: &str) -> Option<Result<Target, Kind>> {
    let rest = path.strip_prefix('/')?;
    let (kind, route) = if let Some(drv) = rest.strip_prefix("log/") {
        (Kind::Log, log(drv))
    } else if let Some(id) = rest.strip_prefix("realisations/") {
        (Kind::Realisation, realisation(id).then_some(None))
    } else if let Some(key) = rest.strip_prefix("build-trace-v2/") {
        (Kind::BuildTrace, build_trace(key))
    } else if let Some(id) = rest.strip_prefix("debuginfo/") {
        (Kind::DebugInfo, build_id(id).then_some(None))
    } else if let Some(hash) = rest.strip_suffix(".ls").filter(|h| !h.contains('/')) {
        (Kind::Listing, StoreHash::parse(hash.as_bytes()).map(Some))
    } else {
        return None;
    };
    Some(match route {
        Some(route) => Ok(Target { kind, route }),
        None => Err(kind),
    })
}

/// A derivation basename, `<hash>-<name>.drv`, and its hash.
fn drv_hash(base: &str) -> Option<StoreHash> {
    if !base.ends_with(".drv") || !is_basename(base) {
        return None;
    }
    StoreHash::parse(base.as_bytes().get(..HASH_LEN)?)
}

fn log(drv: &str) -> Option<Option<StoreHash>> {
    drv_hash(drv).map(Some)
}

/// `<drv basename>/<output>.doi`, routed by the derivation's hash.
fn build_trace(key: &str) -> Option<Option<StoreHash>> {
    let (drv, file) = key.split_once('/')?;
    let output = file.strip_suffix(".doi")?;
    is_store_name(output).then_some(())?;
    drv_hash(drv).map(Some)
}

/// `sha256:<64 lowercase hex>!<output>.doi`: Nix ≤ 2.33 names a
/// realisation by the derivation's hash modulo (`DrvOutput::to_string`,
/// Base16), which is no store path, so there is no route to follow.
fn realisation(id: &str) -> bool {
    let Some((hash, file)) = id.split_once('!') else {
        return false;
    };
    let hex = hash.strip_prefix("sha256:").unwrap_or("");
    let output = file.strip_suffix(".doi").unwrap_or("");
    hex.len() == 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && is_store_name(output)
}

/// A GNU build id in lowercase hex, as Nix's `index-debug-info` writes it
/// (the `.build-id/<2>/<rest>.debug` path with the slash and suffix
/// dropped).
fn build_id(id: &str) -> bool {
    (MIN_BUILD_ID_HEX..=MAX_BUILD_ID_HEX).contains(&id.len())
        && id.len() % 2 == 0
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "l2g9xjgs9ma4cia51w7yhsjdanyx4mnc";

    fn ok(path: &str) -> Target {
        match classify(path) {
            Some(Ok(t)) => t,
            other => panic!("{path:?}: {other:?}"),
        }
    }

    fn bad(path: &str) -> Kind {
        match classify(path) {
            Some(Err(k)) => k,
            other => panic!("{path:?} should be invalid: {other:?}"),
        }
    }

    #[test]
    fn valid_shapes_and_their_routes() {
        let hash = StoreHash::parse(H.as_bytes());
        let log = ok(&format!("/log/{H}-ncro-logtest-1.drv"));
        assert_eq!((log.kind, log.route), (Kind::Log, hash));
        let ls = ok(&format!("/{H}.ls"));
        assert_eq!((ls.kind, ls.route), (Kind::Listing, hash));
        let bt = ok(&format!("/build-trace-v2/{H}-foo.drv/out.doi"));
        assert_eq!((bt.kind, bt.route), (Kind::BuildTrace, hash));
        let hex = "a".repeat(64);
        let r = ok(&format!("/realisations/sha256:{hex}!dev.doi"));
        assert_eq!((r.kind, r.route), (Kind::Realisation, None));
        let d = ok("/debuginfo/0123456789abcdef0123456789abcdef01234567");
        assert_eq!((d.kind, d.route), (Kind::DebugInfo, None));
    }

    #[test]
    fn unrelated_paths_are_not_claimed() {
        for p in [
            "/",
            "/nix-cache-info",
            "/foo",
            "/nar/x.nar",
            "/logs/x",
            "/a/b.ls",
        ] {
            assert_eq!(classify(p), None, "{p}");
        }
    }

    #[test]
    fn malformed_side_paths_are_rejected() {
        let hex = "a".repeat(64);
        for (p, kind) in [
            (format!("/log/{H}-x"), Kind::Log), // not a derivation
            (format!("/log/{H}-x.drv/"), Kind::Log),
            (format!("/log/../{H}-x.drv"), Kind::Log),
            (format!("/log/{H}-%2e%2e.drv"), Kind::Log),
            ("/log/".to_owned(), Kind::Log),
            (format!("/log/{}-x.drv", &H[..31]), Kind::Log),
            (format!("/{}e.ls", &H[..31]), Kind::Listing), // 'e' is not base32
            ("/.ls".to_owned(), Kind::Listing),
            (
                format!("/build-trace-v2/{H}-foo.drv/../out.doi"),
                Kind::BuildTrace,
            ),
            (format!("/build-trace-v2/{H}-foo.drv/out"), Kind::BuildTrace),
            (format!("/build-trace-v2/{H}-foo/out.doi"), Kind::BuildTrace),
            (
                format!("/build-trace-v2/{H}-foo.drv/a/out.doi"),
                Kind::BuildTrace,
            ),
            (
                format!("/build-trace-v2/{H}-foo.drv/.doi"),
                Kind::BuildTrace,
            ),
            (format!("/realisations/sha256:{hex}!out"), Kind::Realisation),
            (
                format!("/realisations/sha256:{}!out.doi", &hex[..63]),
                Kind::Realisation,
            ),
            (
                format!("/realisations/sha1:{hex}!out.doi"),
                Kind::Realisation,
            ),
            (
                format!("/realisations/sha256:{}!out.doi", hex.to_uppercase()),
                Kind::Realisation,
            ),
            (
                format!("/realisations/sha256:{hex}!a/b.doi"),
                Kind::Realisation,
            ),
            ("/debuginfo/xyz".to_owned(), Kind::DebugInfo),
            ("/debuginfo/abc".to_owned(), Kind::DebugInfo), // odd length
            ("/debuginfo/0123456789ABCDEF".to_owned(), Kind::DebugInfo),
            ("/debuginfo/../../etc".to_owned(), Kind::DebugInfo),
            (format!("/debuginfo/{}", "a".repeat(130)), Kind::DebugInfo),
        ] {
            assert_eq!(bad(&p), kind, "{p}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Kind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), Kind::ALL.len());
    }
}
