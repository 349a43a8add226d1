//! NAR hedging and per-upstream NAR limits: `[cache.nar_hedging]` and
//! the upstream keys `allow_hedging`, `nar_timeout` and
//! `max_concurrent_requests` (docs/configuration.md).

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

pub(super) fn validate_upstream(i: usize, u: &raw::RawUpstream) -> Result<UpstreamNar, ConfigError> {
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
