//! Finding the upstream that serves a side path: the routed upstream
//! first, then a race of the others. HOT, but only on side-path requests.
//!
//! The narinfo race engine is reused as is (tiers, hedge, deadlines, the
//! miss-versus-outage tally). It decides on response heads only: a fetch
//! that got a final answer parks the response in a per-race slot and hands
//! the engine an empty body, which the judge accepts. The body (a build log
//! can be megabytes) is then streamed by the caller, never buffered here.

use std::cell::RefCell;

use bytes::Bytes;

use crate::http::client::{Request as UpRequest, Response as UpResponse};
use crate::race::{
    self, Attempt, AttemptResult, Candidate, FailKind, Outcome, RaceConfig, Verdict,
};
use crate::serve::narinfo::{discard_body, fail_kind};
use crate::upstream::{RacePlan, UpstreamSet};
use crate::worker::WorkerCtx;

/// What asking the upstreams produced.
#[derive(Debug)]
pub enum Fetched {
    /// `upstream` gave a final answer (200, or a redirect to an absolute
    /// URL); its body has not been read. Boxed: the response is large and
    /// the other outcomes are a word.
    Found {
        upstream: usize,
        resp: Box<UpResponse>,
    },
    /// Every upstream asked said 404, 403 or 410.
    Miss,
    /// Some upstream gave no definite answer (error, 5xx, timeout), or one
    /// that may hold the path was not asked: never a 404.
    Unavailable { timed_out: bool },
    /// No race permit (`cache.mass_query` limits): 503.
    Overloaded,
}

/// Asks `routed` (the upstream that served the related narinfo) alone
/// first; on anything but a final answer, races every other candidate.
pub async fn fetch(ctx: &WorkerCtx, routed: Option<usize>, req: UpRequest<'_>) -> Fetched {
    let routing = &ctx.shared.routing;
    // One snapshot for the whole fetch: slot indexes stay valid in it.
    let set = ctx.shared.upstreams.load();
    let plan = routing.plan_race(&set, std::time::Instant::now());
    let _permit = match ctx.limits.race(&routing.limits).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(path = req.path, error = %e, "side-path race refused");
            return Fetched::Overloaded;
        }
    };
    let (first, rest): (Vec<Candidate>, Vec<Candidate>) = plan
        .candidates
        .iter()
        .partition(|c| Some(c.upstream) == routed);
    let mut outcomes = Vec::with_capacity(3);
    // Upstreams cooling down after a transport error are asked last: one
    // may have recovered and be the only one holding the path.
    for candidates in [first, rest, plan.cooling.clone()] {
        if candidates.is_empty() {
            continue;
        }
        match race_heads(ctx, &set, &plan, &candidates, req).await {
            Ok(found) => return found,
            Err(outcome) => outcomes.push(outcome),
        }
    }
    combine(&outcomes)
}

/// The verdict over every race run: a miss only if each was a miss.
fn combine(outcomes: &[Outcome<usize>]) -> Fetched {
    let mut timed_out = true;
    let mut unavailable = outcomes.is_empty();
    for o in outcomes {
        if let Outcome::Unavailable { timed_out: t } = o {
            unavailable = true;
            timed_out &= *t;
        }
    }
    if !unavailable {
        return Fetched::Miss;
    }
    // An empty plan is an outage, not a deadline.
    let only_deadlines = timed_out && !outcomes.is_empty();
    Fetched::Unavailable {
        timed_out: only_deadlines,
    }
}

/// One race over `candidates`; `Ok` with the winner's response, else the
/// engine's outcome.
async fn race_heads(
    ctx: &WorkerCtx,
    set: &UpstreamSet,
    plan: &RacePlan,
    candidates: &[Candidate],
    req: UpRequest<'_>,
) -> Result<Fetched, Outcome<usize>> {
    let routing = &ctx.shared.routing;
    let parked: RefCell<Vec<Option<UpResponse>>> =
        RefCell::new((0..set.len()).map(|_| None).collect());
    let fetch = |i: usize| {
        let parked = &parked;
        async move {
            let _permit = ctx.limits.upstream(&routing.limits, i).await;
            let resp = match ctx.client.send(&set.list[i].origin, &req).await {
                Ok(r) => r,
                Err(e) => return Attempt::Failed(fail_kind(&e)),
            };
            if is_final(&resp) {
                if let Some(slot) = parked.borrow_mut().get_mut(i) {
                    *slot = Some(resp);
                }
                return Attempt::Found(Bytes::new());
            }
            let status = resp.status();
            discard_body(resp);
            Attempt::from_unexpected_status(status)
        }
    };
    let judge = |i: usize, _: &Bytes| Verdict::Accept(i);
    let report = |i: usize, rep: &race::AttemptReport| {
        // Only cooldowns: latency EMAs stay fed by narinfo races alone, and
        // the narinfo attempt counters keep counting narinfo requests. A
        // request the upstream could not be sent is no failure of its own.
        if let AttemptResult::Failed(kind) = rep.result {
            if kind != FailKind::Request {
                routing.failed(i, kind);
            }
            tracing::debug!(upstream = %set.list[i].url, path = req.path, result = kind.label(), "side-path attempt gave no answer");
        }
    };
    let cfg = RaceConfig {
        tier_deadline: ctx.shared.config.timeouts.race_deadline,
        hedge_after: Some(plan.hedge_after),
        early: race::EarlyStarts::NONE,
    };
    match race::race(candidates, &cfg, fetch, judge, report).await {
        Outcome::Found { upstream, .. } => {
            let resp = parked.borrow_mut().get_mut(upstream).and_then(Option::take);
            // The slot is filled before the engine sees the attempt, so it
            // cannot be empty; an outage is the safe reading if it were.
            resp.map(|resp| Fetched::Found {
                upstream,
                resp: Box::new(resp),
            })
            .ok_or(Outcome::Unavailable { timed_out: false })
        }
        other => Err(other),
    }
}

/// A 200, or a redirect to an absolute URL (an upstream that keeps its
/// files in object storage): relayed to the client as the answer.
fn is_final(resp: &UpResponse) -> bool {
    let absolute = |l: &[u8]| {
        ["http://", "https://"].iter().any(|scheme| {
            l.get(..scheme.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes()))
        })
    };
    match resp.status() {
        200 => true,
        301 | 302 | 303 | 307 | 308 => resp.header("Location").is_some_and(absolute),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(f: Fetched) -> &'static str {
        match f {
            Fetched::Miss => "miss",
            Fetched::Unavailable { timed_out: true } => "504",
            Fetched::Unavailable { timed_out: false } => "502",
            Fetched::Found { .. } => "found",
            Fetched::Overloaded => "503",
        }
    }

    #[test]
    fn a_miss_needs_every_race_to_miss() {
        let miss = Outcome::<usize>::Miss;
        let timeout = Outcome::<usize>::Unavailable { timed_out: true };
        let error = Outcome::<usize>::Unavailable { timed_out: false };
        assert_eq!(verdict(combine(&[miss.clone(), miss.clone()])), "miss");
        assert_eq!(verdict(combine(std::slice::from_ref(&miss))), "miss");
        assert_eq!(verdict(combine(&[error.clone(), miss.clone()])), "502");
        assert_eq!(verdict(combine(&[miss.clone(), timeout.clone()])), "504");
        assert_eq!(verdict(combine(&[timeout, error])), "502");
        // Nobody asked: not definite.
        assert_eq!(verdict(combine(&[])), "502");
        assert_eq!(verdict(combine(&[miss])), "miss");
    }
}
