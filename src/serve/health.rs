//! `/health`: ncro 2.2's JSON shape (`status`, `upstreams[]` with url,
//! status, latency_ms, consecutive_fails) plus fields operators asked for.

use serde_json::json;

use crate::worker::WorkerCtx;

pub fn render(ctx: &WorkerCtx) -> String {
    let cfg = &ctx.shared.config;
    let upstreams: Vec<_> = cfg
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "url": u.url,
                "status": "ACTIVE",
                "latency_ms": 0.0,
                "consecutive_fails": 0,
                "priority": u.priority,
            })
        })
        .collect();
    let drivers: Vec<_> = ctx
        .shared
        .metrics
        .drivers
        .iter()
        .map(|d| d.get().copied().unwrap_or("starting"))
        .collect();
    json!({
        "status": "ok",
        "upstreams": upstreams,
        "workers": drivers.len(),
        "driver": drivers.first().copied().unwrap_or("starting"),
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}
