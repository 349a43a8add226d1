//! Parallel ranged NAR fetches (docs/nar-failover.md, "Parallel ranges").
//!
//! A single connection is often slower than the path to a cache (a
//! per-connection cap at S3 or a CDN edge, a window/RTT bound across an
//! ocean). For a large NAR whose first response proved that it can be
//! fetched in ranges — a Content-Length framed 200 (or 206 to the client's
//! own Range) of at least `cache.nar_ranges.min_size`, identified by a
//! hash-named URL, a strong ETag or a canonical candidate's proof — ncro
//! fetches the rest as `chunk_size` ranges over up to `connections`
//! connections at once and writes them to the client in order, as one
//! ordinary response.
//!
//! - The first response keeps serving the first range; the others are
//!   `Range` requests to the same upstream, and to other upstreams that
//!   prove they hold the same file (the rules of mid-stream failover).
//! - Before the client gets its head, one range request is tried: an
//!   upstream that answers it wrongly (200, a wrong `Content-Range`,
//!   another ETag) gets the ordinary single-stream relay instead.
//! - Memory: a transfer reserves `connections * chunk_size` of the
//!   process-wide `max_memory` before it starts (else: one stream); it
//!   never holds more buffers than that. A slow client keeps its buffers
//!   busy, so no new range starts: backpressure, no disk.
//! - A range that fails or stalls (`stall_timeout`) is asked again, for
//!   its missing bytes only, on another connection or from another
//!   holder. The transfer fails only when no holder can supply a range;
//!   the client connection is then closed, never presented as complete.
//! - Every range request holds a stream permit of its upstream
//!   (`max_concurrent_requests`).

mod budget;
mod driver;
mod fetch;

use std::io;

use crate::config::ranges::NarRanges;
use crate::http::client::Response as UpResponse;
use crate::http::request::{Method, Request};
use crate::http::response::{write_head, Framing};
use crate::metrics::ranged::RangedResult;
use crate::serve::{After, Conn};
use crate::worker::WorkerCtx;

use super::failover::Object;
use super::hedge::Held;
use super::{upstream_host, Source, PASSED_HEADERS};
use budget::Reservation;
use fetch::{Job, Target};

/// What [`try_relay`] did. Returned once per NAR request and taken apart
/// at once: boxing the response would cost the single-stream path an
/// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Ranged {
    /// The transfer was done in ranges (or failed after its head).
    Done(io::Result<After>),
    /// Not for ranges: relay `resp` as one stream.
    Declined(UpResponse, Source),
}

/// Whether the first response allows a ranged transfer, and its object.
fn eligible(
    cfg: &NarRanges,
    req: &Request<'_>,
    resp: &UpResponse,
    from: &Source,
) -> Option<Object> {
    if !cfg.enabled || req.method != Method::Get || resp.is_chunked() {
        return None;
    }
    if !matches!(resp.status(), 200 | 206) {
        return None;
    }
    let len = resp.content_length()?;
    if len < cfg.min_size.max(1) || len <= cfg.chunk_size {
        return None;
    }
    let object = Object::of(resp, &from.candidate.path)?;
    let (_, _, content_addressed) = object.span();
    // Without an identity, bytes from two requests might be of two
    // versions of the file.
    (content_addressed || object.has_etag() || from.candidate.proven).then_some(object)
}

/// Whether upstream `slot` answers faster than `min_latency` (its latency
/// EMA from probes and races). On such a link one connection already
/// carries what the link can, so ranges would only add CPU: the single
/// stream is spliced, ranges are copied through ncro (docs/benchmarks.md,
/// "NAR relay and parallel ranges"). An upstream not measured yet counts
/// as far.
fn is_near(ctx: &WorkerCtx, slot: usize, min_latency: std::time::Duration) -> bool {
    if min_latency.is_zero() {
        return false;
    }
    let ema = ctx
        .shared
        .routing
        .snapshot()
        .entries
        .get(slot)
        .and_then(|e| e.ema_ms);
    ema.is_some_and(|ms| ms < min_latency.as_secs_f64() * 1000.0)
}

/// Relays a large NAR in parallel ranges when `resp` allows it (see the
/// module docs); otherwise gives `resp` back untouched.
pub async fn try_relay(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    mut resp: UpResponse,
    from: Source,
    keep: bool,
) -> Ranged {
    let cfg = ctx.shared.config.cache.nar_ranges;
    let Some(object) = eligible(&cfg, req, &resp, &from) else {
        return Ranged::Declined(resp, from);
    };
    let counters = &ctx.metrics.nar_ranged;
    let Some(reservation) = Reservation::take(cfg.per_transfer(), cfg.max_memory) else {
        counters.result(RangedResult::NoRoom);
        tracing::debug!(
            path = req.path,
            "NAR ranges: memory budget in use; one stream"
        );
        return Ranged::Declined(resp, from);
    };
    let set = from.rest.set().clone();
    let origin = from.candidate.upstream;
    let Some(up) = set.live(origin) else {
        return Ranged::Declined(resp, from);
    };
    if is_near(ctx, origin, cfg.min_latency) {
        counters.result(RangedResult::Near);
        tracing::debug!(upstream = %up.url, path = req.path, "NAR ranges: the upstream is nearer than min_latency; one stream");
        return Ranged::Declined(resp, from);
    }
    // The probe: the second range, on a connection of its own.
    let Some(permit) = Held::take(ctx, origin, up) else {
        counters.result(RangedResult::NoRoom);
        return Ranged::Declined(resp, from);
    };
    let (start, end, content_addressed) = object.span();
    let chunk = cfg.chunk_size;
    let second = Job {
        index: 1,
        from: start + chunk,
        to: end.min(start + 2 * chunk - 1),
        buf: Vec::new(),
    };
    let target = Target {
        up,
        path: &from.candidate.path,
        known_same: content_addressed || from.candidate.proven,
        stall: cfg.stall_timeout,
    };
    let probe = match fetch::open(ctx, target, &object, &second).await {
        Ok(r) => r,
        Err(fetch::Miss::Misbehaved(status)) => {
            tracing::info!(upstream = %up.url, status, path = req.path, "NAR ranges: the upstream answers Range wrongly; one stream");
            counters.result(RangedResult::Declined);
            return Ranged::Declined(resp, from);
        }
        Err(fetch::Miss::Error(e)) => {
            tracing::debug!(upstream = %up.url, error = %e, path = req.path, "NAR ranges: the probe failed; one stream");
            counters.result(RangedResult::Declined);
            return Ranged::Declined(resp, from);
        }
    };
    // The head, as the single-stream relay writes it.
    let len = end - start + 1;
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(PASSED_HEADERS.len() + 2);
    for name in PASSED_HEADERS {
        if let Some(v) = resp.header(name) {
            headers.push((name, v));
        }
    }
    if let Some(host) = upstream_host(ctx, &set, origin) {
        headers.push(("X-Ncro-Upstream", host.as_bytes()));
    }
    headers.push(("X-Ncro-Route", from.candidate.kind.as_str().as_bytes()));
    let date = ctx.date();
    write_head(
        &mut conn.wbuf,
        resp.status(),
        Framing::Length(len),
        keep,
        &date,
        &headers,
    );
    drop(headers);
    if let Err(e) = conn.flush(ctx).await {
        return Ranged::Done(Err(e));
    }
    resp.set_read_timeout(cfg.stall_timeout);
    let run = driver::Transfer {
        ctx,
        set: &set,
        cfg,
        object: &object,
        origin: (origin, from.candidate.path.clone(), target.known_same),
        rest: from.rest,
    };
    let outcome = run
        .run(&mut conn.stream, resp, (second, probe, permit))
        .await;
    drop(reservation);
    ctx.metrics.nar_bytes.add(outcome.sent);
    Ranged::Done(Ok(match outcome.result {
        Ok(()) => {
            counters.result(RangedResult::Completed);
            After::keep_if(keep)
        }
        Err(why) => {
            match why {
                driver::Failed::Client(e) => {
                    counters.result(RangedResult::ClientGone);
                    tracing::debug!(path = req.path, error = %e, "client went away during a NAR relay (parallel ranges)")
                }
                driver::Failed::NoHolder => {
                    counters.result(RangedResult::Failed);
                    tracing::warn!(
                        path = req.path,
                        sent = outcome.sent,
                        "NAR ranges: no upstream could supply a range; closing the client connection"
                    )
                }
            }
            conn.mark_nar_failed();
            After::Close
        }
    }))
}
