//! `/status`: today's ncro's JSON snapshot (`version`, `uptime_secs`,
//! `status`, `cache{..}`, `config{..}`, `upstreams[]`, `fallback`), with
//! the same names, nesting and types. Every value is read from state that
//! exists anyway (the health snapshot, the upstream set, the per-worker
//! counters summed as `/metrics` sums them, the route cache's length), so
//! the request path pays nothing for it. docs/endpoints.md describes each
//! field.

use std::time::Instant;

use serde_json::{json, Value};

use crate::upstream::health::{Counts, Entry, State};
use crate::upstream::slots::Slot;
use crate::worker::WorkerCtx;

/// What `/status` shows of the fallback cache (`[fallback_cache]`, when
/// enabled). The fallback is never probed, so it has no health of its own.
#[derive(Debug, Clone, Copy)]
pub struct FallbackDescription<'a> {
    pub url: &'a str,
    /// An `s3://` cache.
    pub s3: bool,
    /// A username is set (in the configuration or from netrc).
    pub authenticated: bool,
    /// Narinfo and NAR requests sent to it since start.
    pub total_queries: u64,
}

/// The fallback cache's description from the running configuration, when
/// `[fallback_cache]` is enabled.
pub fn fallback_of(ctx: &WorkerCtx) -> Option<FallbackDescription<'_>> {
    let cfg = ctx.shared.config.fallback_cache.as_ref()?;
    Some(FallbackDescription {
        url: &cfg.url,
        s3: matches!(cfg.kind, crate::config::UpstreamKind::S3(_)),
        authenticated: cfg.basic_auth.is_some(),
        total_queries: ctx.shared.fallback.as_ref().map_or(0, |f| f.queries()),
    })
}

/// One `upstreams[]` (or `fallback`) object.
struct UpstreamView<'a> {
    url: &'a str,
    state: State,
    priority: i32,
    ema_ms: Option<f64>,
    consecutive_fails: u32,
    total_queries: u64,
    last_probe_secs_ago: Option<u64>,
    s3: bool,
    authenticated: bool,
}

fn upstream_json(u: &UpstreamView<'_>) -> Value {
    json!({
        "url": u.url,
        "status": u.state.label(),
        "priority": u.priority,
        // ncro writes 0.0 for "never measured".
        "ema_latency_ms": u.ema_ms.unwrap_or(0.0),
        "consecutive_fails": u.consecutive_fails,
        "total_queries": u.total_queries,
        "last_probe_secs_ago": u.last_probe_secs_ago,
        "kind": if u.s3 { "s3" } else { "http" },
        "authenticated": u.authenticated,
    })
}

/// The `fallback` object: `null` without a fallback; otherwise the shape of
/// an `upstreams[]` entry for a cache that is never probed (ACTIVE, no
/// latency, no probe, priority 0).
pub fn fallback_json(fallback: Option<FallbackDescription<'_>>) -> Value {
    fallback.map_or(Value::Null, |f| {
        upstream_json(&UpstreamView {
            url: f.url,
            state: State::Active,
            priority: 0,
            ema_ms: None,
            consecutive_fails: 0,
            total_queries: f.total_queries,
            last_probe_secs_ago: None,
            s3: f.s3,
            authenticated: f.authenticated,
        })
    })
}

/// Whole seconds since `then`, `None` if never.
fn secs_ago(then: Option<Instant>, now: Instant) -> Option<u64> {
    then.map(|t| now.saturating_duration_since(t).as_secs())
}

fn entry_view<'a>(
    url: &'a str,
    priority: i32,
    (e, c): (&Entry, Counts),
    s3: bool,
    authenticated: bool,
    now: Instant,
) -> UpstreamView<'a> {
    UpstreamView {
        url,
        state: e.state,
        priority,
        ema_ms: e.ema_ms,
        consecutive_fails: e.consecutive_fails,
        total_queries: c.total_queries,
        last_probe_secs_ago: secs_ago(c.last_probe, now),
        s3,
        authenticated,
    }
}

/// The `/status` body. `fallback` describes the fallback cache when one is
/// configured and enabled.
pub fn render(ctx: &WorkerCtx, fallback: Option<FallbackDescription<'_>>) -> String {
    let shared = &ctx.shared;
    let cfg = &shared.config;
    let set = shared.upstreams.load();
    let snap = shared.routing.snapshot();
    let now = Instant::now();
    let upstreams: Vec<Value> = snap
        .order
        .iter()
        .filter_map(|&i| {
            let (u, e, c) = (set.live(i)?, snap.entries.get(i)?, *snap.counts.get(i)?);
            // Configured upstreams hold slots 0..n in configuration order;
            // discovered ones never carry credentials.
            let authenticated = set.slot(i) == Some(Slot::Configured)
                && cfg.upstreams.get(i).is_some_and(|c| c.basic_auth.is_some());
            let view = entry_view(
                &u.url,
                u.priority,
                (e, c),
                u.s3.is_some(),
                authenticated,
                now,
            );
            Some(upstream_json(&view))
        })
        .collect();
    let m = &shared.metrics;
    let sum = |f: fn(&crate::metrics::WorkerMetrics) -> u64| -> u64 {
        m.workers.iter().map(|w| f(w)).sum()
    };
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": now.saturating_duration_since(m.started).as_secs(),
        "status": super::health::overall(&snap),
        "cache": {
            "route_entries": shared.routes.len(),
            "narinfo_hits": sum(|w| w.narinfo_cache_hits.get()),
            "narinfo_misses": sum(|w| w.narinfo_cache_misses.get()),
            "narinfo_negative_hits": sum(|w| w.narinfo_negative_hits.get()),
            "nar_requests": sum(|w| w.nar_requests.get()),
        },
        "config": {
            "cache_priority": cfg.server.cache_priority,
            "upstream_count": cfg.upstreams.len(),
            "fallback_configured": fallback.is_some(),
        },
        "upstreams": upstreams,
        "fallback": fallback_json(fallback),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_fallback_is_null() {
        assert_eq!(fallback_json(None), Value::Null);
    }

    #[test]
    fn a_fallback_has_the_upstream_shape() {
        let v = fallback_json(Some(FallbackDescription {
            url: "s3://bucket?region=x",
            s3: true,
            authenticated: false,
            total_queries: 0,
        }));
        assert_eq!(
            v,
            json!({
                "url": "s3://bucket?region=x",
                "status": "ACTIVE",
                "priority": 0,
                "ema_latency_ms": 0.0,
                "consecutive_fails": 0,
                "total_queries": 0,
                "last_probe_secs_ago": null,
                "kind": "s3",
                "authenticated": false,
            })
        );
    }

    #[test]
    fn probe_age_in_whole_seconds() {
        let now = Instant::now();
        assert_eq!(secs_ago(None, now), None);
        let then = now - std::time::Duration::from_millis(2500);
        assert_eq!(secs_ago(Some(then), now), Some(2));
    }
}
