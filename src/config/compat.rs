//! Keys and parameters ncro accepts so that configs written for ncro 2.2
//! or today's ncro load, but does not act on: each one present gives a
//! warning naming it (printed by `check-config`, logged by `serve`).
//! COLD: runs once at load.

use super::raw::RawConfig;

/// One warning per accepted-and-ignored key or parameter in `raw`.
pub fn warnings(raw: &RawConfig) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = raw.cache.slow_statement_threshold {
        out.push(format!(
            "cache.slow_statement_threshold = {t:?} is ignored: SQLite runs on ncro's writer thread, never on the request path; watch ncro_route_writer_queue_depth and ncro_route_db_degraded instead"
        ));
    }
    for (i, u) in raw.upstreams.iter().flatten().enumerate() {
        let url = u.url.trim();
        if !url.starts_with("s3://") {
            continue;
        }
        // Errors in the URL are reported by validation; only a URL that
        // parses has parameters worth naming.
        if let Ok(s3) = super::s3::S3Url::parse(url) {
            if !s3.upload_only.is_empty() {
                out.push(format!(
                    "upstream[{i}]: s3 parameters {} only matter for uploads (nix copy --to) and are ignored by ncro",
                    s3.upload_only.join(", ")
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ignored_keys_and_upload_only_parameters() {
        let raw: RawConfig = toml::from_str(
            r#"
[cache]
slow_statement_threshold = "2s"
[[upstreams]]
url = "https://a.example"
[[upstreams]]
url = "s3://b?region=x&compression=zstd&secret-key=/k"
"#,
        )
        .unwrap();
        assert_eq!(
            warnings(&raw),
            vec![
                "cache.slow_statement_threshold = 2s is ignored: SQLite runs on ncro's writer thread, never on the request path; watch ncro_route_writer_queue_depth and ncro_route_db_degraded instead".to_owned(),
                "upstream[1]: s3 parameters compression, secret-key only matter for uploads (nix copy --to) and are ignored by ncro".to_owned(),
            ]
        );
        assert!(warnings(&RawConfig::default()).is_empty());
    }
}
