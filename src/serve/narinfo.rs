//! `GET/HEAD /<hash>.narinfo`: route cache, then single-flight race. HOT.

mod fallback;
mod tiers;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::narinfo::{ResolutionPolicy, UnavailableAnswer};
use crate::http::client::{ClientError, Request as UpRequest, Response as UpResponse};
use crate::http::response::write_simple;
use crate::metrics::{ResolveResult, ShedReason};
use crate::proto::narinfo::{relay_form, NarInfo, MAX_NARINFO_SIZE};
use crate::proto::nixbloom::Probe;
use crate::proto::signature::verify_narinfo;
use crate::proto::store_path::{StoreHash, HASH_LEN};
use crate::race::{
    self, Attempt, AttemptResult, FailKind, Outcome, RaceConfig, RejectKind, Verdict,
};
use crate::route::{Cached, Hit, RouteEntry};
use crate::serve::After;
use crate::upstream::limits::LimitError;
use crate::upstream::{filter, RacePlan, Upstream, UpstreamSet};
use crate::worker::{unix_now, WorkerCtx};
pub use crate::worker::{Resolved, Via};
pub use fallback::write_found;

/// Answers from the route cache, or joins/starts the race for `hash`.
pub async fn answer(ctx: &WorkerCtx, hash: StoreHash) -> Resolved {
    // A route to a DOWN upstream is raced again; it is still served when
    // no other upstream gives a usable answer.
    let mut stale = None;
    // Whether a route is stored (a short-lived 404 must not replace it).
    let mut routed = true;
    match ctx.shared.routes.get(&hash, unix_now()) {
        Some(Cached::Hit(h)) if route_down(ctx, h.upstream) => {
            ctx.metrics.narinfo_cache_misses.inc();
            stale = Some(h);
        }
        Some(Cached::Hit(h)) => {
            ctx.metrics.narinfo_cache_hits.inc();
            return Resolved::Found(h, Via::CacheHit);
        }
        // Its narinfo is read back from disk inside the flight below, so
        // that concurrent requests share one read.
        Some(Cached::Cold { upstream }) if !route_down(ctx, upstream) => {
            ctx.metrics.narinfo_cache_hits.inc();
        }
        Some(Cached::Cold { .. }) => ctx.metrics.narinfo_cache_misses.inc(),
        Some(Cached::Negative) => {
            ctx.metrics.narinfo_negative_hits.inc();
            return Resolved::Miss;
        }
        None => {
            ctx.metrics.narinfo_cache_misses.inc();
            routed = false;
        }
    }
    // Boxed: the race's state is large and only misses need it, so it is
    // not part of every idle connection's task.
    let (resolved, role) = Box::pin(ctx.flights.run(hash, || resolve_once(ctx, hash))).await;
    if role == race::Role::Joined {
        ctx.metrics.singleflight_waiters.inc();
    }
    match (resolved, stale) {
        // A route already verified beats the fallback cache.
        (
            Resolved::Unavailable { .. } | Resolved::Overloaded | Resolved::Found(_, Via::Fallback),
            Some(e),
        ) => Resolved::Found(e, Via::CacheHit),
        (Resolved::Unavailable { .. }, None)
            if ctx.shared.config.cache.unavailable_answer == UnavailableAnswer::NotFound =>
        {
            // `cache.unavailable_answer = "404"`: remembered only briefly,
            // so the path is found again as soon as its upstream is back,
            // and never in place of a stored route (a cold one to a DOWN
            // upstream).
            if !routed {
                let ttl = ctx.shared.config.cache.in_memory_negative_ttl;
                let expires = unix_now() + ttl.as_secs().max(1);
                ctx.shared.routes.insert_negative(hash, expires);
            }
            Resolved::Miss
        }
        (resolved, _) => resolved,
    }
}

/// How long a finished cross-worker flight's result may be handed to a
/// latecomer. The leader removes the entry right after publishing it; this
/// only bounds the damage if that removal never happens.
const FLIGHT_RESULT_TTL: Duration = Duration::from_secs(1);

/// Cross-worker single-flight. The per-worker `SingleFlight` already merges
/// concurrent requests on one worker; this makes workers share one race per
/// hash too (measured without it: 42 of 100 fresh hashes were raced twice
/// when 32 clients asked for each at once over 2 workers). The shared table
/// is only touched on route-cache misses.
async fn resolve_once(ctx: &WorkerCtx, hash: StoreHash) -> Resolved {
    let flights = &ctx.shared.flights;
    loop {
        match flights.get_value_or_guard_async(&hash).await {
            Ok((resolved, at)) if at.elapsed() < FLIGHT_RESULT_TTL => {
                ctx.metrics.singleflight_waiters.inc();
                return resolved;
            }
            Ok(_) => {
                flights.remove(&hash); // stale: see FLIGHT_RESULT_TTL
            }
            Err(guard) => {
                // Another worker may have finished between our route-cache
                // miss and taking the guard.
                let resolved = match ctx.shared.routes.get(&hash, unix_now()) {
                    Some(Cached::Hit(h)) if !route_down(ctx, h.upstream) => {
                        Resolved::Found(h, Via::CacheHit)
                    }
                    Some(Cached::Cold { upstream }) if !route_down(ctx, upstream) => {
                        match cold_body(ctx, hash, upstream).await {
                            Some(h) => Resolved::Found(h, Via::CacheHit),
                            None => resolve(ctx, hash).await,
                        }
                    }
                    Some(Cached::Negative) => Resolved::Miss,
                    _ => resolve(ctx, hash).await,
                };
                // Waiters on other workers get the value from the guard;
                // later misses consult the route table, not this entry.
                let _ = guard.insert((resolved.clone(), std::time::Instant::now()));
                flights.remove(&hash);
                return resolved;
            }
        }
    }
}

/// Whether a cached route's upstream is DOWN (or its slot was reused), so
/// that the route is raced again. The slot's URL is only looked up while
/// some upstream is DOWN.
fn route_down(ctx: &WorkerCtx, upstream: usize) -> bool {
    let routing = &ctx.shared.routing;
    routing.any_down() && {
        let url = ctx.shared.routes.slot_url(upstream);
        routing.route_is_down(&ctx.shared.upstreams, url.as_deref().unwrap_or(""))
    }
}

/// The narinfo of a route whose body is only on disk, read on the database
/// reader thread. Filters and the signature (or content address) are
/// checked again under the current configuration: keys and filters may
/// have changed since the route was stored (a refused route is forgotten).
async fn cold_body(ctx: &WorkerCtx, hash: StoreHash, upstream: usize) -> Option<Hit> {
    let routes = &ctx.shared.routes;
    let narinfo = routes.read_body(&hash, upstream).await?;
    if !ctx
        .shared
        .upstreams
        .load()
        .accepts_stored(upstream, &narinfo)
    {
        routes.remove(&hash);
        return None;
    }
    let narinfo = routes.keep_body(&hash, upstream, narinfo);
    Some(Hit { upstream, narinfo })
}

/// Races the upstreams for `hash` and records the result in the route table.
async fn resolve(ctx: &WorkerCtx, hash: StoreHash) -> Resolved {
    // One snapshot for the whole race: slot indexes in the plan stay valid
    // even if discovery publishes a new set meanwhile.
    let set: Arc<UpstreamSet> = ctx.shared.upstreams.load();
    let routing = &ctx.shared.routing;
    let waited = std::time::Instant::now();
    let _permit = match ctx.limits.race(&routing.limits).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%hash, error = %e, "narinfo race refused");
            let reason = match e {
                LimitError::QueueFull => ShedReason::QueueFull,
                LimitError::Timeout => ShedReason::WaitTimeout,
            };
            ctx.metrics.shed[reason as usize].inc();
            return Resolved::Overloaded;
        }
    };
    ctx.metrics.race_wait.observe_duration(waited.elapsed());
    let plan = plan_with_index(ctx, &set, hash);
    let candidates = &plan.candidates;
    let cfg = &ctx.shared.config;
    let (hedge_after, early) = match cfg.cache.resolution_policy {
        ResolutionPolicy::Hedged => (Some(plan.hedge_after), plan.early),
        // A lower tier is asked only once the one above has ended: no
        // hedge, no early start.
        ResolutionPolicy::Strict => (None, race::EarlyStarts::NONE),
    };
    let race_cfg = RaceConfig {
        tier_deadline: cfg.timeouts.race_deadline,
        hedge_after,
        early,
    };
    let track = tiers::TierTrack::new(candidates, early, ctx.metrics.clone());
    let path = NarinfoPath::new(&hash);
    let fetch = |i: usize| {
        let set = set.clone();
        let client = ctx.client.clone();
        let run_to_end = track.borrow_mut().launched(i);
        let track = track.clone();
        async move {
            let _permit = ctx.limits.upstream(&routing.limits, i).await;
            let attempt = async move {
                let up = &set.list[i];
                let fetch = fetch_narinfo(&client, &up.origin, path.as_str());
                let attempt = match up.narinfo_timeout {
                    // `upstreams[].narinfo_timeout`: this request alone is
                    // cut. Boxed (a timer is large, and rarely configured)
                    // so that it does not grow every attempt's slot.
                    Some(limit) => Box::pin(monoio::time::timeout(limit, fetch))
                        .await
                        .unwrap_or(Attempt::Failed(FailKind::Timeout)),
                    None => fetch.await,
                };
                track.borrow_mut().finished(i, &attempt);
                attempt
            };
            if run_to_end {
                // A task of its own, so that it finishes (and is counted)
                // when the race is decided first; dropping the handle
                // detaches it. Its permit is released with the race.
                monoio::spawn(attempt).await
            } else {
                attempt.await
            }
        }
    };
    let judge = |i: usize, body: &Bytes| judge(&set.list[i], hash, body);
    let mut answers = 0usize;
    let mut bad_signature = false;
    let report = |i: usize, rep: &race::AttemptReport| {
        answers += 1;
        bad_signature |= rep.result == AttemptResult::Rejected(RejectKind::BadSignature);
        routing.observe(i, rep);
        ctx.metrics.attempt(i, rep.result.label());
        if rep.result == AttemptResult::NotFound {
            index_false_positive(ctx, &set, i);
        }
        if let AttemptResult::Rejected(RejectKind::BadSignature) = rep.result {
            ctx.metrics.bad_signatures.inc();
        }
        if rep.result == AttemptResult::Failed(FailKind::TooLarge) {
            // Rare and worth an operator's attention: the path cannot be
            // substituted through ncro from this upstream.
            tracing::warn!(upstream = %set.list[i].url, %hash, limit = MAX_NARINFO_SIZE, "narinfo refused: larger than the limit; counted as outcome=\"too_large\"");
        }
        if rep.result == AttemptResult::Accepted {
            if let Some(u) = ctx.metrics.upstreams.get(i) {
                u.race_wins.inc();
                u.win_latency.observe_duration(rep.latency);
            }
        } else if rep.result != AttemptResult::NotFound {
            // The only trace of why a lookup became a 502 or 504 (an upstream
            // answering 301 to everything, say); the metric label drops the status.
            tracing::debug!(upstream = %set.list[i].url, %hash, result = ?rep.result, ms = rep.latency.as_millis() as u64, "narinfo attempt gave no answer");
        }
    };
    let (mut fetch, mut judge, mut report) = (fetch, judge, report);
    ctx.metrics.races.inc();
    let started = std::time::Instant::now();
    let mut outcome = if candidates.is_empty() && plan.index_skipped > 0 {
        Outcome::Miss // every upstream ruled out by a fresh summary: nothing to ask
    } else {
        race::race(candidates, &race_cfg, &mut fetch, &mut judge, &mut report).await
    };
    if !matches!(outcome, Outcome::Found { .. }) && !plan.cooling.is_empty() {
        // The others gave no answer; an upstream sitting out a cooldown
        // after one transport error may well have recovered and hold the
        // path. Without asking it, a lookup would fail (502) for the whole
        // cooldown, longer than Nix keeps retrying (about 4.5 s).
        let fallback = race::race(&plan.cooling, &race_cfg, fetch, judge, report).await;
        outcome = with_fallback(outcome, fallback);
    }
    ctx.metrics.race_latency.observe_duration(started.elapsed());
    let result = match outcome {
        Outcome::Found { .. } => ResolveResult::Success,
        Outcome::Miss => ResolveResult::NotFound,
        Outcome::Unavailable { .. } => ResolveResult::Unavailable,
    };
    ctx.metrics.attempts_per_resolve[result as usize].observe(answers as f64);
    if let (Outcome::Unavailable { .. }, Some(fb)) = (&outcome, &ctx.shared.fallback) {
        // No upstream could answer. A bad signature is an answer (a
        // refused one): then the fallback is not asked.
        if !bad_signature {
            // Boxed: a rare path, kept out of every race's future.
            return Box::pin(fallback::ask(ctx, fb, hash, path.as_str())).await;
        }
    }
    let now = unix_now();
    match outcome {
        Outcome::Found {
            upstream,
            accepted,
            latency,
        } => {
            let (info, narinfo): (NarInfo, Bytes) = accepted;
            let entry = Arc::new(RouteEntry {
                upstream: set.list[upstream].url.clone(),
                narinfo,
                nar_url: info.url.trim_start_matches('/').into(),
                nar_hash: info.nar_hash.as_str().into(),
                nar_size: info.nar_size,
                expires_at: now + cfg.cache.ttl.as_secs(),
                verified_at: now,
                latency_ms: latency.as_secs_f32() * 1000.0,
            });
            // Served with its `URL:` as the upstream's nar_url_mode says.
            let narinfo = ctx.shared.routes.insert(hash, entry);
            Resolved::Found(Hit { upstream, narinfo }, Via::Race)
        }
        Outcome::Miss => {
            // Upstreams left out (DOWN) may hold the path:
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

/// `/<hash>.narinfo`, built without an allocation and `Copy`, so that each
/// attempt (a task of its own when it must run to its end) holds its own.
#[derive(Clone, Copy)]
struct NarinfoPath([u8; NarinfoPath::LEN]);

impl NarinfoPath {
    const LEN: usize = 1 + HASH_LEN + ".narinfo".len();

    fn new(hash: &StoreHash) -> NarinfoPath {
        let mut p = [0u8; Self::LEN];
        p[0] = b'/';
        p[1..1 + HASH_LEN].copy_from_slice(hash.as_bytes());
        p[1 + HASH_LEN..].copy_from_slice(b".narinfo");
        NarinfoPath(p)
    }

    fn as_str(&self) -> &str {
        // Nix-base32 characters and ASCII punctuation only.
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

/// The outcome of a race whose candidates gave no answer, followed by one
/// over the upstreams that were cooling down: a miss only if both missed.
fn with_fallback<A>(first: Outcome<A>, fallback: Outcome<A>) -> Outcome<A> {
    match (first, fallback) {
        (_, found @ Outcome::Found { .. }) | (found @ Outcome::Found { .. }, _) => found,
        (Outcome::Miss, other) | (other, Outcome::Miss) => other,
        (Outcome::Unavailable { timed_out: a }, Outcome::Unavailable { timed_out: b }) => {
            Outcome::Unavailable { timed_out: a && b }
        }
    }
}

/// The race plan, leaving out upstreams whose fresh index summary rules
/// `hash` out (docs/index-routing.md); each one left out is counted.
fn plan_with_index(ctx: &WorkerCtx, set: &UpstreamSet, hash: StoreHash) -> RacePlan {
    let now = std::time::Instant::now();
    let summaries = ctx.shared.index.summaries();
    if summaries.is_empty() {
        return ctx.shared.routing.plan_race(set, now);
    }
    let probe = Probe::of(&hash);
    ctx.shared.routing.plan_race_skipping(set, now, |i, up| {
        let absent = summaries.definitely_absent(i, up, probe, now);
        if absent {
            if let Some(u) = ctx.metrics.upstreams.get(i) {
                u.index_skips.inc();
            }
        }
        absent
    })
}

/// A 404 from an upstream its fresh summary did not rule out: a Bloom
/// filter's false positive (or a path gone since the summary was built).
fn index_false_positive(ctx: &WorkerCtx, set: &UpstreamSet, i: usize) {
    let now = std::time::Instant::now();
    let summaries = ctx.shared.index.summaries();
    if summaries.fresh(i, &set.list[i], now).is_some() {
        if let Some(u) = ctx.metrics.upstreams.get(i) {
            u.index_false_positives.inc();
        }
    }
}

/// One GET of `<hash>.narinfo`. The response owns its connection, so
/// dropping this future (a lost race) closes the connection.
pub(crate) async fn fetch_narinfo(
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
        s => {
            discard_body(resp);
            Attempt::from_unexpected_status(s)
        }
    }
}

/// Largest error body worth reading just to keep its connection.
const DISCARD_LIMIT: usize = 16 * 1024;
/// How long a background discard may take before the connection is closed.
const DISCARD_WAIT: Duration = Duration::from_secs(1);

/// Reads a small error body (a 404 page) to its end in a background task,
/// so the connection returns to the idle pool. Dropping it unread closes
/// the connection, and then every miss costs the next lookup on that
/// upstream a new TCP and TLS handshake. Nobody waits for the task: the
/// caller has its answer from the status alone.
pub(crate) fn discard_body(mut resp: UpResponse) {
    let too_big = resp
        .content_length()
        .is_some_and(|n| n > DISCARD_LIMIT as u64);
    if resp.finish_buffered() || too_big {
        return; // pooled (the whole body had arrived), or cheaper to close
    }
    monoio::spawn(async move {
        let drain = async {
            let mut left = DISCARD_LIMIT;
            // Ends at the body's end (the connection is pooled then), on an
            // error, or past the limit; the last two close it on drop.
            while let Ok(Some(piece)) = resp.read_chunk().await {
                match left.checked_sub(piece.len()) {
                    Some(rest) => left = rest,
                    None => return,
                }
            }
        };
        // A timeout only means the connection is closed instead of reused.
        let _ = monoio::time::timeout(DISCARD_WAIT, drain).await;
    });
}

pub fn fail_kind(e: &ClientError) -> FailKind {
    match e.kind() {
        "dns" => FailKind::Dns,
        "connect" => FailKind::Connect,
        "tls" => FailKind::Tls,
        "timeout" => FailKind::Timeout,
        "reset" | "io" | "aborted" => FailKind::Reset,
        "too_large" => FailKind::TooLarge,
        "auth" => FailKind::Auth,
        // Never the upstream's fault: no cooldown (`limits::is_transport`).
        "request" => FailKind::Request,
        _ => FailKind::Protocol,
    }
}

/// A narinfo is served only if it parses, names the requested path, passes
/// the upstream's filters and verifies against its keys. What is served is
/// the upstream's bytes ([`relay_form`]: only lines Nix would misread are
/// rewritten). `body` is already a buffer of its own, of its exact size
/// ([`UpResponse::read_to_end`]), so an unchanged body is kept, not copied.
pub(crate) fn judge(up: &Upstream, hash: StoreHash, body: &Bytes) -> Verdict<(NarInfo, Bytes)> {
    let Ok(info) = NarInfo::parse(body) else {
        return Verdict::Reject(RejectKind::Malformed);
    };
    if info.store_hash() != hash {
        return Verdict::Reject(RejectKind::WrongStorePath);
    }
    if !filter::allows(&up.filters, &info) {
        return Verdict::Reject(RejectKind::Filtered);
    }
    if !up.keys.is_empty() && !verify_narinfo(&info, &up.keys).is_accepted() {
        tracing::debug!(upstream = %up.url, %hash, "narinfo rejected: no valid signature");
        return Verdict::Reject(RejectKind::BadSignature);
    }
    let served = match relay_form(body, None) {
        Cow::Borrowed(_) => body.clone(),
        Cow::Owned(fixed) => Bytes::from(fixed),
    };
    Verdict::Accept((info, served))
}

/// Maps a resolution onto the response status (404 only for definite misses).
pub fn status_of(r: &Resolved) -> u16 {
    match r {
        Resolved::Found(..) => 200,
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
    After::keep_if(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_race_decides_only_what_the_first_left_open() {
        let found = || Outcome::Found {
            upstream: 1,
            accepted: (),
            latency: Duration::ZERO,
        };
        let down = |timed_out| Outcome::<()>::Unavailable { timed_out };
        assert!(matches!(
            with_fallback(Outcome::Miss, found()),
            Outcome::Found { upstream: 1, .. }
        ));
        assert!(matches!(
            with_fallback(down(false), found()),
            Outcome::Found { .. }
        ));
        assert_eq!(
            with_fallback(Outcome::<()>::Miss, Outcome::Miss),
            Outcome::Miss
        );
        assert_eq!(with_fallback(Outcome::Miss, down(true)), down(true));
        assert_eq!(with_fallback(down(false), Outcome::Miss), down(false));
        assert_eq!(with_fallback(down(true), down(true)), down(true));
        assert_eq!(with_fallback(down(true), down(false)), down(false));
    }
}
