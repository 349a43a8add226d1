//! NAR-side config: hedging and per-upstream NAR limits
//! (`[cache.nar_hedging]`, the upstream keys `allow_hedging`,
//! `nar_timeout` and `max_concurrent_requests`) and NAR URLs
//! (`nar_url_mode`, `storage_url`); docs/configuration.md.

use std::time::Duration;

use super::{invalid, positive, raw, ConfigError};

/// Per-upstream NAR settings (`allow_hedging`, `nar_timeout`,
/// `max_concurrent_requests`); the default is what a discovered upstream
/// gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamNar {
    pub allow_hedging: bool,
    /// None: `timeouts.idle`.
    pub timeout: Option<Duration>,
    /// None: no cap.
    pub max_streams: Option<u32>,
}

impl Default for UpstreamNar {
    fn default() -> Self {
        UpstreamNar {
            allow_hedging: true,
            timeout: None,
            max_streams: None,
        }
    }
}

/// `[cache.nar_hedging]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarHedging {
    pub enabled: bool,
    /// Wait before each extra attempt (zero: start them together).
    pub delay: Duration,
    /// Most attempts in flight for one NAR request (>= 1).
    pub max_inflight: u32,
}

pub(super) fn validate_upstream(
    i: usize,
    u: &raw::RawUpstream,
) -> Result<UpstreamNar, ConfigError> {
    let timeout = match u.nar_timeout {
        Some(d) => Some(positive(&format!("upstream[{i}].nar_timeout"), d.0)?),
        None => None,
    };
    if u.max_concurrent_requests == Some(0) {
        return Err(invalid(format!(
            "upstream[{i}].max_concurrent_requests must be >= 1 (leave it out for no limit)"
        )));
    }
    Ok(UpstreamNar {
        allow_hedging: u.allow_hedging.unwrap_or(true),
        timeout,
        max_streams: u.max_concurrent_requests,
    })
}

pub(super) fn validate_hedging(h: &raw::RawNarHedging) -> Result<NarHedging, ConfigError> {
    if h.max_inflight < 1 {
        return Err(invalid("cache.nar_hedging.max_inflight must be >= 1"));
    }
    Ok(NarHedging {
        enabled: h.enabled,
        delay: h.delay.0,
        max_inflight: h.max_inflight,
    })
}

/// `nar_url_mode` and `storage_url` of upstream `i`.
pub(super) fn validate_nar_urls(
    i: usize,
    u: &raw::RawUpstream,
    kind: &super::UpstreamKind,
) -> Result<(crate::proto::narinfo::NarUrlMode, Option<String>), ConfigError> {
    let mode = u.nar_url_mode.unwrap_or_default();
    let storage_url = match u.storage_url.as_deref().map(str::trim) {
        None => None,
        Some(s) => {
            super::check_http_url(s).map_err(|e| {
                super::invalid(format!("upstream[{i}]: invalid storage_url {s:?}: {e}"))
            })?;
            Some(s.trim_end_matches('/').to_owned())
        }
    };
    if mode == crate::proto::narinfo::NarUrlMode::ToUpstream
        && matches!(kind, super::UpstreamKind::S3(_))
        && storage_url.is_none()
    {
        return Err(super::invalid(format!(
            "upstream[{i}]: nar_url_mode = \"to_upstream\" needs an http(s) URL for clients; an s3:// upstream needs storage_url for it"
        )));
    }
    Ok((mode, storage_url))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::env::MapEnv;
    use crate::config::{Config, ConfigError, Source};

    fn load(text: &str) -> Result<Config, ConfigError> {
        let env = MapEnv::new(&[("HOME", "/home/t")]);
        Config::from_toml(text, Source::Embedded, "test.toml", &env)
    }

    const UP: &str = "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\n";

    #[test]
    fn defaults() {
        let c = load(UP).unwrap();
        let h = c.cache.nar_hedging;
        assert!(h.enabled);
        assert_eq!(h.delay, Duration::from_secs(1));
        assert_eq!(h.max_inflight, 2);
        let n = c.upstreams[0].nar;
        assert!(n.allow_hedging);
        assert_eq!((n.timeout, n.max_streams), (None, None));
        assert_eq!(n, super::UpstreamNar::default(), "what discovery gives");
    }

    #[test]
    fn keys_are_read() {
        let text = format!(
            "{UP}allow_hedging = false\nnar_timeout = \"2s\"\nmax_concurrent_requests = 3\n\
             [cache.nar_hedging]\nenabled = false\ndelay = \"0s\"\nmax_inflight = 4\n"
        );
        let c = load(&text).unwrap();
        let n = c.upstreams[0].nar;
        assert!(!n.allow_hedging);
        assert_eq!(n.timeout, Some(Duration::from_secs(2)));
        assert_eq!(n.max_streams, Some(3));
        let h = c.cache.nar_hedging;
        assert!(!h.enabled);
        assert_eq!((h.delay, h.max_inflight), (Duration::ZERO, 4));
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                format!("{UP}[cache.nar_hedging]\nmax_inflight = 0\n"),
                "cache.nar_hedging.max_inflight must be >= 1",
            ),
            (
                format!("{UP}max_concurrent_requests = 0\n"),
                "upstream[0].max_concurrent_requests must be >= 1",
            ),
            (
                format!("{UP}nar_timeout = \"0s\"\n"),
                "upstream[0].nar_timeout must be positive",
            ),
            (format!("{UP}nar_timeout = \"soon\"\n"), "invalid duration"),
            (
                format!("{UP}[cache.nar_hedging]\nmax_in_flight = 2\n"),
                "max_in_flight",
            ),
            (
                format!("{UP}max_concurrent_requests = -1\n"),
                "max_concurrent_requests",
            ),
        ];
        for (text, want) in cases {
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
