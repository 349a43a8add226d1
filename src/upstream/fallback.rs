//! The `[fallback_cache]`, ready for requests, and the host names that
//! `X-Ncro-Upstream` carries.
//!
//! The fallback is an [`Upstream`] that lives outside every
//! [`super::UpstreamSet`]: it has no slot, so it is never raced, probed,
//! cooled down, filtered, discovered, gossiped or stored as a route. The
//! narinfo path asks it only when a race ends with no upstream able to
//! answer (docs/routing.md, "Fallback cache"), and the NAR path tries it
//! once after every upstream failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Upstream, UpstreamError};
use crate::config::Config;
use crate::http::client::Origin;
use crate::proto::signature::PublicKey;

/// What a [`crate::route::Hit`] from the fallback names as its upstream:
/// no slot of any [`super::UpstreamSet`] (so nothing indexed by slot, such
/// as cooldowns or per-upstream metrics, is touched for it).
pub const SLOT: usize = usize::MAX;

/// The fallback cache: its upstream form and the total time allowed for
/// one narinfo request to it.
#[derive(Debug)]
pub struct Fallback {
    pub upstream: Upstream,
    /// `fallback_cache.narinfo_timeout`, else `timeouts.race_deadline`.
    pub narinfo_timeout: Duration,
    /// Requests sent to it (narinfo and NAR), for `/status`. One shared
    /// counter is fine: it is only touched when every upstream failed.
    queries: AtomicU64,
}

impl Fallback {
    /// The configured fallback, `None` unless `fallback_cache.enabled`.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Fallback>>, UpstreamError> {
        let Some(u) = &cfg.fallback_cache else {
            return Ok(None);
        };
        let invalid = |why: String| UpstreamError::Invalid {
            url: u.url.clone(),
            why,
        };
        let auth = u
            .basic_auth
            .as_ref()
            .map(|(user, pw)| (user.as_str(), pw.as_deref()));
        let origin = Origin::parse(&u.url, auth).map_err(|e| invalid(e.to_string()))?;
        let keys = u
            .public_keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| invalid(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Some(Arc::new(Fallback {
            upstream: Upstream {
                url: Arc::from(u.url.as_str()),
                origin,
                s3: None,
                priority: i32::MAX,
                keys,
                filters: Vec::new(),
                narinfo_timeout: u.narinfo_timeout,
                host: host_of(&u.url),
                storage: None,
                nar: u.nar,
            },
            narinfo_timeout: u.narinfo_timeout.unwrap_or(cfg.timeouts.race_deadline),
            queries: AtomicU64::new(0),
        })))
    }

    /// Counts one request sent to the fallback.
    pub fn asked(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent to the fallback since the start (`/status`
    /// `total_queries`).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// The host of an upstream URL as `X-Ncro-Upstream` names it: no scheme,
/// credentials, port, path or query (an IPv6 literal without brackets);
/// `unknown` when there is none.
pub fn host_of(url: &str) -> Box<str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']').map_or(v6, |(h, _)| h)
    } else {
        authority.split_once(':').map_or(authority, |(h, _)| h)
    };
    // A header value must be visible ASCII; anything else is not a host.
    let printable = host.bytes().all(|b| b.is_ascii_graphic());
    if host.is_empty() || !printable {
        "unknown".into()
    } else {
        host.into()
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_drops_scheme_port_path_and_query() {
        assert_eq!(&*host_of("https://cache.nixos.org"), "cache.nixos.org");
        assert_eq!(&*host_of("http://127.0.0.1:5000/sub/dir"), "127.0.0.1");
        assert_eq!(&*host_of("http://[::1]:8080/x"), "::1");
        assert_eq!(&*host_of("s3://bucket?region=eu-west-1"), "bucket");
        assert_eq!(&*host_of("http://user@host.example:1/"), "host.example");
        assert_eq!(&*host_of("http://"), "unknown");
        assert_eq!(&*host_of("http://h\u{e9}/"), "unknown");
    }
}
