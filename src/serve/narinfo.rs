//! `GET/HEAD /<hash>.narinfo`: route cache, then single-flight race. HOT.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::http::client::{ClientError, Request as UpRequest};
use crate::http::response::write_simple;
use crate::metrics::ResolveResult;
use crate::proto::narinfo::{NarInfo, MAX_NARINFO_SIZE};
use crate::proto::signature::verify_narinfo;
use crate::proto::store_path::StoreHash;
use crate::race::{
    self, Attempt, AttemptResult, FailKind, Outcome, RaceConfig, RejectKind, Verdict,
};
use crate::route::{Cached, RouteEntry};
use crate::serve::After;
use crate::upstream::{filter, UpstreamSet};
use crate::worker::{unix_now, WorkerCtx};

/// What a resolution produced; shared by every request that joined it.
#[derive(Clone, Debug)]
pub enum Resolved {
    Found(Arc<RouteEntry>),
    Miss,
    Unavailable {
        timed_out: bool,
    },
    /// The race queue was full (or the wait too long): 503 + Retry-After.
    Overloaded,
}

/// Answers from the route cache, or joins/starts the race for `hash`.
pub fn answer(
    ctx: &WorkerCtx,
    hash: StoreHash,
) -> impl std::future::Future<Output = Resolved> + '_ {
    async move {
        // A route to a DOWN upstream is raced again; it is still served when
        // no other upstream gives a usable answer.
        let mut stale = None;
        match ctx.shared.routes.get(&hash, unix_now()) {
            Some(Cached::Hit(e))
                if ctx
                    .shared
                    .routing
                    .route_is_down(&ctx.shared.upstreams, &e.upstream) =>
            {
                ctx.metrics.narinfo_cache_misses.inc();
                stale = Some(e);
            }
            Some(Cached::Hit(e)) => {
                ctx.metrics.narinfo_cache_hits.inc();
                return Resolved::Found(e);
            }
            Some(Cached::Negative) => {
                ctx.metrics.narinfo_negative_hits.inc();
                return Resolved::Miss;
            }
            None => ctx.metrics.narinfo_cache_misses.inc(),
        }
        let (resolved, role) = ctx.flights.run(hash, || resolve(ctx, hash)).await;
        if role == race::Role::Joined {
            ctx.metrics.singleflight_waiters.inc();
        }
        match (resolved, stale) {
            (Resolved::Unavailable { .. } | Resolved::Overloaded, Some(e)) => Resolved::Found(e),
            (resolved, _) => resolved,
        }
    }
}

/// Races the upstreams for `hash` and records the result in the route table.
async fn resolve(ctx: &WorkerCtx, hash: StoreHash) -> Resolved {
    let set: Arc<UpstreamSet> = ctx.shared.upstreams.clone();
    let routing = &ctx.shared.routing;
    let waited = std::time::Instant::now();
    let _permit = match ctx.limits.race(&routing.limits).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%hash, error = %e, "narinfo race refused");
            return Resolved::Overloaded;
        }
    };
    ctx.metrics.race_wait.observe_duration(waited.elapsed());
    let plan = routing.plan_race(&set, std::time::Instant::now());
    let candidates = &plan.candidates;
    let cfg = &ctx.shared.config;
    let race_cfg = RaceConfig {
        tier_deadline: cfg.timeouts.race_deadline,
        hedge_after: Some(plan.hedge_after),
    };
    let path: Rc<str> = Rc::from(format!("/{hash}.narinfo"));
    let fetch = |i: usize| {
        let set = set.clone();
        let path = path.clone();
        let client = ctx.client.clone();
        async move {
            let _permit = ctx.limits.upstream(&routing.limits, i).await;
            fetch_narinfo(&client, &set.list[i].origin, &path).await
        }
    };
    let judge = |i: usize, body: &Bytes| judge(&set, i, hash, body);
    let mut answers = 0usize;
    let report = |i: usize, rep: &race::AttemptReport| {
        answers += 1;
        routing.observe(i, rep);
        ctx.metrics.attempt(i, rep.result.label());
        if let AttemptResult::Rejected(RejectKind::BadSignature) = rep.result {
            ctx.metrics.bad_signatures.inc();
        }
        if rep.result == AttemptResult::Accepted {
            if let Some(u) = ctx.metrics.upstreams.get(i) {
                u.race_wins.inc();
                u.win_latency.observe_duration(rep.latency);
            }
        }
    };
    ctx.metrics.races.inc();
    let started = std::time::Instant::now();
    let outcome = race::race(candidates, &race_cfg, fetch, judge, report).await;
    ctx.metrics.race_latency.observe_duration(started.elapsed());
    let result = match outcome {
        Outcome::Found { .. } => ResolveResult::Success,
        Outcome::Miss => ResolveResult::NotFound,
        Outcome::Unavailable { .. } => ResolveResult::Unavailable,
    };
    ctx.metrics.attempts_per_resolve[result as usize].observe(answers as f64);
    let now = unix_now();
    match outcome {
        Outcome::Found {
            upstream,
            accepted,
            latency,
        } => {
            let info: NarInfo = accepted;
            let entry = Arc::new(RouteEntry {
                upstream: set.list[upstream].url.clone(),
                // Re-rendered in Nix's exact layout: some clients misread
                // spacing variants that upstreams produce (see proto::narinfo).
                narinfo: Bytes::from(info.render()),
                nar_url: info.url.trim_start_matches('/').into(),
                nar_hash: info.nar_hash.as_str().into(),
                nar_size: info.nar_size,
                expires_at: now + cfg.cache.ttl.as_secs(),
                verified_at: now,
                latency_ms: latency.as_secs_f32() * 1000.0,
            });
            ctx.shared.routes.insert(hash, entry.clone());
            Resolved::Found(entry)
        }
        Outcome::Miss => {
            // Upstreams left out (DOWN, cooling down) may hold the path:
            // such a miss is remembered only briefly.
            let ttl = if plan.partial {
                cfg.cache.in_memory_negative_ttl
            } else {
                cfg.cache.negative_ttl
            };
            ctx.shared
                .routes
                .insert_negative(hash, now + ttl.as_secs().max(1));
            Resolved::Miss
        }
        Outcome::Unavailable { timed_out } => Resolved::Unavailable { timed_out },
    }
}

/// One GET of `<hash>.narinfo`. The response owns its connection, so
/// dropping this future (a lost race) closes the connection.
async fn fetch_narinfo(
    client: &crate::http::client::LocalClient,
    origin: &crate::http::client::Origin,
    path: &str,
) -> Attempt {
    let resp = match client.send(origin, &UpRequest::get(path)).await {
        Ok(r) => r,
        Err(e) => return Attempt::Failed(fail_kind(&e)),
    };
    match resp.status() {
        200 => match resp.read_to_end(MAX_NARINFO_SIZE).await {
            Ok(body) => Attempt::Found(body),
            Err(e) => Attempt::Failed(fail_kind(&e)),
        },
        s => Attempt::from_unexpected_status(s),
    }
}

pub fn fail_kind(e: &ClientError) -> FailKind {
    match e.kind() {
        "dns" => FailKind::Dns,
        "connect" => FailKind::Connect,
        "tls" => FailKind::Tls,
        "timeout" => FailKind::Timeout,
        "reset" | "io" | "aborted" => FailKind::Reset,
        "too_large" => FailKind::TooLarge,
        _ => FailKind::Protocol,
    }
}

/// A narinfo is served only if it parses, names the requested path, passes
/// the upstream's filters and verifies against its keys.
fn judge(set: &UpstreamSet, i: usize, hash: StoreHash, body: &Bytes) -> Verdict<NarInfo> {
    let Ok(info) = NarInfo::parse(body) else {
        return Verdict::Reject(RejectKind::Malformed);
    };
    if info.store_hash() != hash {
        return Verdict::Reject(RejectKind::WrongStorePath);
    }
    let up = &set.list[i];
    if !filter::allows(&up.filters, &info) {
        return Verdict::Reject(RejectKind::Filtered);
    }
    if !up.keys.is_empty() && !verify_narinfo(&info, &up.keys).is_accepted() {
        tracing::debug!(upstream = %up.url, %hash, "narinfo rejected: no valid signature");
        return Verdict::Reject(RejectKind::BadSignature);
    }
    Verdict::Accept(info)
}

/// Maps a resolution onto the response status (404 only for definite misses).
pub fn status_of(r: &Resolved) -> u16 {
    match r {
        Resolved::Found(_) => 200,
        Resolved::Miss => 404,
        Resolved::Unavailable { timed_out: true } => 504,
        Resolved::Unavailable { timed_out: false } => 502,
        Resolved::Overloaded => 503,
    }
}

/// Load shedding: 503 with `Retry-After: 1`. Nix treats 503 as transient
/// and backs off (5 s base, honouring Retry-After) before asking again.
pub fn write_overloaded(conn: &mut crate::serve::Conn, ctx: &WorkerCtx, keep: bool) -> After {
    let date = ctx.date();
    write_simple(
        &mut conn.wbuf,
        503,
        keep,
        false,
        &date,
        &[
            ("Retry-After", b"1"),
            ("Content-Type", b"text/plain; charset=utf-8"),
        ],
        b"too many lookups in flight; retry shortly\n",
    );
    if keep {
        After::KeepAlive
    } else {
        After::Close
    }
}
