//! `/nix-cache-info`: the small key-value file a Nix client fetches once
//! per substituter before anything else.
//!
//! We serve our own from memory (a client that cannot fetch it drops the
//! substituter) and read upstreams' ones only to learn their store dir and
//! priority, so parsing is as lenient as Nix's: an empty file is valid,
//! lines without `:` are skipped, values are trimmed, the last duplicate
//! wins.

use super::store_path::STORE_DIR;
use thiserror::Error;

/// Real files are three lines; anything bigger is not a cache-info.
pub const MAX_CACHE_INFO_SIZE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// `StoreDir`, `/nix/store` when absent.
    pub store_dir: String,
    /// `WantMassQuery`; only the value `1` means true, as in Nix.
    pub want_mass_query: bool,
    /// `Priority`; `None` when absent or not an integer.
    pub priority: Option<i32>,
    /// Every other `key: value` line, in file order.
    pub extra: Vec<(String, String)>,
}

impl Default for CacheInfo {
    fn default() -> Self {
        CacheInfo {
            store_dir: STORE_DIR.to_owned(),
            want_mass_query: false,
            priority: None,
            extra: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CacheInfoError {
    #[error("nix-cache-info is {0} bytes, over the {MAX_CACHE_INFO_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("nix-cache-info is not valid UTF-8")]
    NotUtf8,
}

impl CacheInfo {
    pub fn parse(bytes: &[u8]) -> Result<CacheInfo, CacheInfoError> {
        if bytes.len() > MAX_CACHE_INFO_SIZE {
            return Err(CacheInfoError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| CacheInfoError::NotUtf8)?;
        let mut info = CacheInfo::default();
        for line in text.split('\n') {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            // Trimming also drops the `\r` of CRLF files, which Nix tolerates here.
            let value = value.trim();
            match key {
                "StoreDir" => info.store_dir = value.to_owned(),
                "WantMassQuery" => info.want_mass_query = value == "1",
                "Priority" => info.priority = value.parse().ok(),
                _ => info.extra.push((key.to_owned(), value.to_owned())),
            }
        }
        Ok(info)
    }
}

/// The body we serve, e.g. `StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n`.
/// `store_dir` comes from validated config and must not contain a line break.
pub fn render(store_dir: &str, want_mass_query: bool, priority: Option<i32>) -> String {
    debug_assert!(
        !store_dir.contains(['\n', '\r']),
        "store dir has a line break"
    );
    let mut out = format!(
        "StoreDir: {store_dir}\nWantMassQuery: {}\n",
        u8::from(want_mass_query)
    );
    if let Some(p) = priority {
        out.push_str("Priority: ");
        out.push_str(&p.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> CacheInfo {
        CacheInfo::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn renders_exactly_what_ncro_always_served() {
        assert_eq!(
            render("/nix/store", true, Some(30)),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        );
        assert_eq!(
            render("/nix/store", false, None),
            "StoreDir: /nix/store\nWantMassQuery: 0\n"
        );
        assert_eq!(
            render("/nix/store", true, Some(-3)),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: -3\n"
        );
    }

    #[test]
    fn empty_and_store_dir_only_files_are_valid() {
        assert_eq!(parse(""), CacheInfo::default());
        assert_eq!(parse("\n\n"), CacheInfo::default());
        // What `nix copy --to file://…` writes.
        let info = parse("StoreDir: /nix/store\n");
        assert_eq!(info, CacheInfo::default());
    }

    #[test]
    fn parses_the_usual_fields() {
        let info = parse("StoreDir: /gnu/store\nWantMassQuery: 1\nPriority: 40\n");
        assert_eq!(info.store_dir, "/gnu/store");
        assert!(info.want_mass_query);
        assert_eq!(info.priority, Some(40));
        assert!(info.extra.is_empty());
    }

    #[test]
    fn lenient_like_nix() {
        let info = parse(
            "StoreDir:/nix/store  \r\n\
             garbage line\r\n\
             WantMassQuery: true\r\n\
             Priority: high\r\n\
             GetNarInfosV1: /batch\n\
             Priority: 10\n\
             WantMassQuery:  1 ",
        );
        assert_eq!(info.store_dir, "/nix/store");
        assert!(info.want_mass_query, "the last WantMassQuery wins");
        assert_eq!(info.priority, Some(10), "the last Priority wins");
        assert_eq!(info.extra, [("GetNarInfosV1".into(), "/batch".into())]);
        assert!(!parse("WantMassQuery: true").want_mass_query);
        assert_eq!(parse("Priority: high").priority, None);
        assert_eq!(parse("Priority: 99999999999").priority, None);
    }

    #[test]
    fn rejects_non_utf8_and_oversized_bodies() {
        assert_eq!(
            CacheInfo::parse(b"StoreDir: \xff"),
            Err(CacheInfoError::NotUtf8)
        );
        let big = vec![b'\n'; MAX_CACHE_INFO_SIZE + 1];
        assert_eq!(
            CacheInfo::parse(&big),
            Err(CacheInfoError::TooLarge(MAX_CACHE_INFO_SIZE + 1))
        );
        assert!(CacheInfo::parse(&big[1..]).is_ok());
    }

    #[test]
    fn property_render_then_parse_round_trips() {
        for store_dir in ["/nix/store", "/gnu/store", "/x"] {
            for want in [false, true] {
                for priority in [
                    None,
                    Some(i32::MIN),
                    Some(-1),
                    Some(0),
                    Some(30),
                    Some(i32::MAX),
                ] {
                    let info = parse(&render(store_dir, want, priority));
                    assert_eq!(info.store_dir, store_dir);
                    assert_eq!(info.want_mass_query, want);
                    assert_eq!(info.priority, priority);
                    assert!(info.extra.is_empty());
                }
            }
        }
    }
}
