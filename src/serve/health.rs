//! `/health`: ncro 2.2's JSON shape (`status`, `upstreams[]` with url,
//! status, latency_ms, consecutive_fails, in routing order) plus fields
//! operators asked for: priority, source (configured or discovered),
//! whether `/nix-cache-info` answered,
//! cooldown and in-flight counts, worker count and I/O driver. Answered
//! 503 when every upstream is DOWN, so a load balancer takes the node out.

use serde_json::json;

use crate::upstream::health::{HealthSnapshot, State};
use crate::worker::WorkerCtx;

/// ncro 2.2's overall status: `down` when every upstream is DOWN (and
/// there is at least one), `degraded` when any is DOWN or DEGRADED.
/// Retired discovered upstreams do not count (they are not in `order`).
pub fn overall(snap: &HealthSnapshot) -> &'static str {
    let states = || snap.order.iter().map(|&i| snap.entries[i].state);
    if !snap.order.is_empty() && states().all(|s| s == State::Down) {
        "down"
    } else if states().any(|s| s != State::Active) {
        "degraded"
    } else {
        "ok"
    }
}

/// `/health`'s HTTP status: 503 when every upstream in the health table
/// is DOWN (and there is one), as today's ncro answers, and from SIGTERM
/// on (the lame duck, then the drain); 200 otherwise.
pub fn http_status(snap: &HealthSnapshot, stopping: bool) -> u16 {
    if stopping || overall(snap) == "down" {
        503
    } else {
        200
    }
}

/// True from SIGTERM on (`server.drain_delay`'s lame duck, then the
/// drain): `/health` answers 503 with `"status":"draining"`.
pub fn stopping(ctx: &WorkerCtx) -> bool {
    ctx.shared.metrics.phase.stopping()
}

/// The status code and JSON body of `/health`.
pub fn render(ctx: &WorkerCtx) -> (u16, String) {
    let set = ctx.shared.upstreams.load();
    let routing = &ctx.shared.routing;
    let snap = routing.snapshot();
    let now = std::time::Instant::now();
    let upstreams: Vec<_> = snap
        .order
        .iter()
        .filter_map(|&i| {
            let (u, e) = (set.live(i)?, snap.entries.get(i)?);
            let discovered = set.slot(i) != Some(crate::upstream::slots::Slot::Configured);
            Some(json!({
                "url": &*u.url,
                "status": e.state.label(),
                "latency_ms": e.ema_ms.unwrap_or(0.0),
                "consecutive_fails": e.consecutive_fails,
                "priority": u.priority,
                "source": if discovered { "discovered" } else { "configured" },
                "cache_info": e.cache_info,
                "cooling_down": routing.limits.cooldowns.is_cooling(i, now),
                "inflight": routing.limits.upstreams.get(i).map_or(0, |g| g.in_use()),
            }))
        })
        .collect();
    let drivers: Vec<_> = ctx
        .shared
        .metrics
        .drivers
        .iter()
        .map(|d| d.get().copied().unwrap_or("starting"))
        .collect();
    // SIGTERM taken: balancers must stop sending new requests here.
    let stopping = stopping(ctx);
    let status = if stopping { "draining" } else { overall(&snap) };
    let body = json!({
        "status": status,
        "upstreams": upstreams,
        "races_in_flight": routing.limits.races.in_use(),
        "workers": drivers.len(),
        "driver": drivers.first().copied().unwrap_or("starting"),
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string();
    (http_status(&snap, stopping), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::UpstreamHealth;

    fn snap(fails: &[u32]) -> HealthSnapshot {
        let now = std::time::Instant::now();
        let table: Vec<_> = fails
            .iter()
            .map(|&f| UpstreamHealth::restored(10.0, f, 1, now))
            .collect();
        HealthSnapshot::build(&vec![1; fails.len()], &table)
    }

    #[test]
    fn overall_status_follows_ncro_22() {
        assert_eq!(overall(&snap(&[])), "ok");
        assert_eq!(overall(&snap(&[0, 2])), "ok");
        assert_eq!(overall(&snap(&[0, 3])), "degraded");
        assert_eq!(overall(&snap(&[0, 10])), "degraded");
        assert_eq!(overall(&snap(&[10, 12])), "down");
    }

    #[test]
    fn unavailable_only_when_every_upstream_is_down() {
        assert_eq!(http_status(&snap(&[]), false), 200);
        assert_eq!(http_status(&snap(&[10, 9]), false), 200);
        assert_eq!(http_status(&snap(&[10, 12]), false), 503);
    }
}
