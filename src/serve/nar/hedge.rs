//! Hedged NAR open: ask the candidates that hold a NAR file one after the
//! other, and when the one asked has not started its body within
//! `cache.nar_hedging.delay`, ask the next one too, up to
//! `max_inflight` attempts at once. The first attempt whose body starts
//! (its first body bytes arrived; for HEAD and bodiless answers, its head)
//! wins; the others are dropped, which closes their connections (a dropped
//! exchange or response never goes back to the pool). A failed attempt
//! (a status that is not the upstream's final word, a transport error, a
//! 2xx that ends before its first byte) starts the next candidate at once.
//!
//! Per-upstream limits apply here too: an upstream at its
//! `max_concurrent_requests` is passed over; when every holder is full,
//! the request waits for a permit up to `timeouts.first_byte` and is then
//! answered 503 (docs/configuration.md).
//!
//! Candidates come from [`Candidates`] (canonical.rs), which decides which
//! upstreams hold the file and under which name. A candidate of a
//! canonical request that still needs its proof (a narinfo fetch from
//! that upstream) is proved inside its attempt, after its stream permit
//! was taken: a slow proof is a slow attempt (the next candidate starts
//! after `delay`), and an upstream whose proof fails is never asked for
//! the NAR. Candidates never taken, passed over, or cancelled as hedge
//! losers go back into [`Candidates`] for a mid-stream failover.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use monoio::time::Instant;

use super::canonical::{Candidate, Candidates, NoProof, Pending, RouteKind};
use super::{is_final, Failures};
use crate::http::client::{
    ClientError, Method as UpMethod, Request as UpRequest, Response as UpResponse,
};
use crate::metrics::hedge::{HedgeEvent, HedgeFailure, LimitWait, NarUpstreamCounters};
use crate::serve::narinfo::{discard_body, fail_kind};
use crate::upstream::limits::streams::StreamPermit;
use crate::upstream::limits::RETRY;
use crate::upstream::{Upstream, UpstreamSet};
use crate::worker::WorkerCtx;

/// A NAR stream's place under its upstream's `max_concurrent_requests`,
/// counted in the worker's metrics while held.
pub struct Held<'a> {
    _permit: StreamPermit<'a>,
    given_back: Option<&'a NarUpstreamCounters>,
}

impl<'a> Held<'a> {
    /// A permit for one stream to `slot`, or None when it is full.
    pub fn take(ctx: &'a WorkerCtx, slot: usize, up: &Upstream) -> Option<Held<'a>> {
        let permit = ctx
            .shared
            .routing
            .limits
            .nar_streams
            .try_take(slot, up.nar.max_streams)?;
        let counters = ctx.metrics.upstreams.get(slot).map(|u| &u.nar);
        let given_back = if permit.is_counted() { counters } else { None };
        if let Some(c) = given_back {
            c.permits_taken.inc();
        }
        Some(Held {
            _permit: permit,
            given_back,
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.given_back {
            c.permits_given.inc();
        }
    }
}

/// The answer to relay, and what failover needs after it.
pub struct Win<'a> {
    /// The winner; its `kind` is [`RouteKind::Hedge`] when an extra
    /// attempt won.
    pub candidate: Candidate,
    pub resp: UpResponse,
    /// Keep until the relay (and any failover) is done.
    pub stream: Held<'a>,
    /// Those not asked, best first, then the full and the cancelled ones:
    /// the candidates for a mid-stream failover.
    pub rest: Candidates,
}

pub enum Opened<'a> {
    Won(Win<'a>),
    /// No upstream served it; the fold of what they said.
    Failed(Failures),
    /// Every holder left was at its `max_concurrent_requests` for the whole
    /// wait: 503 with Retry-After.
    Full,
}

/// Why one attempt did not win.
enum Miss {
    /// A canonical candidate's narinfo did not prove the same file.
    Unproved(NoProof),
    Status(u16),
    Error(ClientError),
    NoBody(ClientError),
}

type Attempt<'a> = Pin<Box<dyn Future<Output = (usize, bool, Result<Opening<'a>, Miss>)> + 'a>>;

struct Opening<'a> {
    candidate: Candidate,
    resp: UpResponse,
    stream: Held<'a>,
}

/// An attempt in flight: its slot, what it was started from, and its
/// candidate once proved (so that a cancelled one is not proved again).
struct InFlight {
    slot: usize,
    pending: Pending,
    proved: Rc<OnceCell<Candidate>>,
}

/// What the client asked, as sent to every candidate.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub method: UpMethod,
    pub headers: &'a [(&'a str, &'a [u8])],
}

struct Hedger<'a> {
    ctx: &'a WorkerCtx,
    set: &'a UpstreamSet,
    ask: Ask<'a>,
    pending: Candidates,
    /// Opted out of hedging and passed over while another attempt ran;
    /// started once nothing else runs.
    deferred: VecDeque<Pending>,
    /// Passed over at their `max_concurrent_requests`.
    full: Vec<Pending>,
    running: FuturesUnordered<Attempt<'a>>,
    /// Started and not finished.
    in_flight: Vec<InFlight>,
    failures: Failures,
}

impl<'a> Hedger<'a> {
    fn counters(&self, slot: usize) -> Option<&'a NarUpstreamCounters> {
        self.ctx.metrics.upstreams.get(slot).map(|u| &u.nar)
    }

    /// Starts the next candidate that may run now. An extra attempt (one
    /// beside others in flight) never goes to an upstream that opted out
    /// of hedging.
    fn start_next(&mut self) -> bool {
        let extra = !self.running.is_empty();
        loop {
            let next = if extra {
                self.pending.take(&mut self.failures)
            } else {
                match self.deferred.pop_front() {
                    Some(p) => Some(p),
                    None => self.pending.take(&mut self.failures),
                }
            };
            let Some(cand) = next else { return false };
            let slot = cand.upstream();
            // The health snapshot may be newer or older than `set`.
            let Some(up) = self.set.live(slot) else {
                continue;
            };
            if extra && !up.nar.allow_hedging {
                self.deferred.push_back(cand);
                continue;
            }
            let Some(stream) = Held::take(self.ctx, slot, up) else {
                if let Some(c) = self.counters(slot) {
                    c.limit_skips.inc();
                }
                self.full.push(cand);
                continue;
            };
            self.launch(cand, up, stream, extra);
            return true;
        }
    }

    /// Starts `cand` under its stream permit: its proof first when it
    /// needs one, then the NAR request.
    fn launch(&mut self, cand: Pending, up: &'a Upstream, stream: Held<'a>, extra: bool) {
        let slot = cand.upstream();
        if extra {
            if let Some(c) = self.counters(slot) {
                c.hedge(HedgeEvent::Started);
            }
        }
        let proved = Rc::new(OnceCell::new());
        self.in_flight.push(InFlight {
            slot,
            pending: cand.clone(),
            proved: proved.clone(),
        });
        let (ctx, set, ask) = (self.ctx, self.set, self.ask);
        self.running.push(Box::pin(async move {
            let result = async {
                let candidate = cand.prove(ctx, set).await.map_err(Miss::Unproved)?;
                let _ = proved.set(candidate.clone());
                let resp = attempt(ctx, up, &candidate.path, ask).await?;
                Ok(Opening {
                    candidate,
                    resp,
                    stream,
                })
            }
            .await;
            (slot, extra, result)
        }));
    }

    /// Waits until one of the full candidates has room, up to `until`, and
    /// starts it.
    async fn wait_for_room(&mut self, until: Instant) -> bool {
        loop {
            let mut i = 0;
            while i < self.full.len() {
                let slot = self.full[i].upstream();
                let Some(up) = self.set.live(slot) else {
                    self.full.remove(i);
                    continue;
                };
                if let Some(stream) = Held::take(self.ctx, slot, up) {
                    let cand = self.full.remove(i);
                    self.launch(cand, up, stream, false);
                    return true;
                }
                i += 1;
            }
            if self.full.is_empty() || Instant::now() >= until {
                return false;
            }
            monoio::time::sleep(RETRY).await;
        }
    }

    fn failed(&mut self, slot: usize, miss: Miss) {
        let kind = match miss {
            Miss::Unproved(why) => {
                self.failures.no_proof(why);
                match why {
                    NoProof::NotHeld => HedgeFailure::NotFound,
                    NoProof::Failed(crate::race::FailKind::Timeout) => HedgeFailure::Timeout,
                    NoProof::Failed(_) => HedgeFailure::Transport,
                }
            }
            Miss::Status(s) => {
                self.failures.status(s);
                if matches!(s, 403 | 404 | 410) {
                    HedgeFailure::NotFound
                } else {
                    HedgeFailure::Status
                }
            }
            Miss::Error(e) | Miss::NoBody(e) if e.is_timeout() => {
                self.failures.error(&e);
                self.cool_down(slot, &e);
                HedgeFailure::Timeout
            }
            Miss::Error(e) => {
                self.failures.error(&e);
                self.cool_down(slot, &e);
                HedgeFailure::Transport
            }
            Miss::NoBody(e) => {
                self.failures.error(&e);
                self.cool_down(slot, &e);
                HedgeFailure::NoBody
            }
        };
        if let Some(c) = self.counters(slot) {
            c.failure(kind);
        }
    }

    fn cool_down(&self, slot: usize, e: &ClientError) {
        // A request this upstream cannot take (an S3 key it cannot
        // encode) says nothing about its health.
        if !e.is_request_fault() {
            self.ctx.shared.routing.failed(slot, fail_kind(e));
        }
    }
}

/// Opens the NAR at the first candidate that starts its body, hedging as
/// configured. See the module docs.
pub async fn open<'a>(
    ctx: &'a WorkerCtx,
    set: &'a UpstreamSet,
    candidates: Candidates,
    ask: Ask<'a>,
) -> Opened<'a> {
    let cfg = ctx.shared.config.cache.nar_hedging;
    let max = if cfg.enabled {
        cfg.max_inflight.max(1) as usize
    } else {
        1
    };
    let mut h = Hedger {
        ctx,
        set,
        ask,
        pending: candidates,
        deferred: VecDeque::new(),
        full: Vec::new(),
        running: FuturesUnordered::new(),
        in_flight: Vec::new(),
        failures: Failures::default(),
    };
    // Set at the first wait for a stream permit; later waits share it.
    let mut wait_until: Option<Instant> = None;
    let mut last_start = Instant::now();
    let mut extras_left = true;
    loop {
        if h.running.is_empty() {
            let started = h.start_next() || {
                if h.full.is_empty() {
                    false
                } else {
                    let until = *wait_until
                        .get_or_insert_with(|| Instant::now() + ctx.shared.config.timeouts.first_byte);
                    let granted = h.wait_for_room(until).await;
                    let result = if granted {
                        LimitWait::Granted
                    } else {
                        LimitWait::Refused
                    };
                    ctx.metrics.nar_limit_waits[result as usize].inc();
                    if !granted {
                        return Opened::Full;
                    }
                    true
                }
            };
            if !started {
                return Opened::Failed(h.failures);
            }
            last_start = Instant::now();
        }
        let hedge_at = (cfg.enabled && extras_left && h.running.len() < max)
            .then(|| last_start + cfg.delay);
        let next = match hedge_at {
            Some(at) => {
                monoio::select! {
                    done = h.running.next() => done,
                    _ = monoio::time::sleep_until(at) => None,
                }
            }
            None => h.running.next().await,
        };
        let Some((slot, extra, result)) = next else {
            // The hedge delay passed with nothing decided.
            extras_left = h.start_next();
            last_start = Instant::now();
            continue;
        };
        if let Some(pos) = h.in_flight.iter().position(|f| f.slot == slot) {
            h.in_flight.remove(pos);
        }
        match result {
            Ok(Opening {
                mut candidate,
                resp,
                stream,
            }) => {
                // Dropping the others closes their connections.
                drop(std::mem::take(&mut h.running));
                for loser in &h.in_flight {
                    if let Some(c) = h.counters(loser.slot) {
                        c.hedge(HedgeEvent::Cancelled);
                    }
                }
                if extra {
                    if let Some(c) = h.counters(slot) {
                        c.hedge(HedgeEvent::Won);
                    }
                    candidate.kind = RouteKind::Hedge;
                }
                // The losers keep a proof they finished: failover does not
                // pay for it again.
                let losers = h.in_flight.drain(..).map(|f| match f.proved.get() {
                    Some(c) => Pending::known(c.clone()),
                    None => f.pending,
                });
                let back: Vec<Pending> = h.full.drain(..).chain(losers).collect();
                let mut rest = h.pending;
                rest.give_back(h.deferred, back);
                return Opened::Won(Win {
                    candidate,
                    resp,
                    stream,
                    rest,
                });
            }
            Err(miss) => {
                h.failed(slot, miss);
                // The next candidate at once, beside those still running.
                if !h.running.is_empty() && h.running.len() < max && extras_left {
                    extras_left = h.start_next();
                    last_start = Instant::now();
                }
            }
        }
    }
}

/// One attempt: the head, then (for a 2xx GET) the first body bytes.
async fn attempt(
    ctx: &WorkerCtx,
    up: &Upstream,
    path: &str,
    ask: Ask<'_>,
) -> Result<UpResponse, Miss> {
    let req = UpRequest {
        method: ask.method,
        path,
        headers: ask.headers,
    };
    let mut resp = match ctx.client.send(up.nar_origin(), &req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(upstream = %up.url, error = %e, path, "NAR request failed");
            return Err(Miss::Error(e));
        }
    };
    if !is_final(&resp) {
        let s = resp.status();
        tracing::debug!(upstream = %up.url, status = s, path, "NAR not served here");
        discard_body(resp);
        return Err(Miss::Status(s));
    }
    if let Some(t) = up.nar.timeout {
        resp.set_read_timeout(t);
    }
    if ask.method == UpMethod::Get && (200..300).contains(&resp.status()) {
        if let Err(e) = resp.wait_body_start().await {
            tracing::debug!(upstream = %up.url, error = %e, path, "NAR body ended before its first byte");
            return Err(Miss::NoBody(e));
        }
    }
    Ok(resp)
}
