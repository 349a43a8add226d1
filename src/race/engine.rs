//! The race state machine: tiers in flight, their deadlines, the hedge
//! timer, and the tally that decides between a miss and an outage.

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use monoio::time::{sleep_until, Instant, Sleep};

use super::{
    Attempt, AttemptReport, AttemptResult, Candidate, FailKind, Outcome, RaceConfig, Verdict,
};

/// Asks `candidates` for one path and returns the first accepted answer,
/// tier by tier (see the module docs for the rules).
///
/// - `fetch(upstream)` starts one GET; its future is dropped to cancel it.
/// - `judge(upstream, body)` vets a 200 body; a rejection does not end the
///   race.
/// - `report(upstream, report)` is called once for every attempt that
///   finished or was abandoned at its tier deadline, before `race` returns.
///
/// All in-flight attempts are dropped before this returns. An empty
/// `candidates` gives `Unavailable { timed_out: false }` without calling
/// anything. Must run inside a monoio runtime with the timer enabled.
pub async fn race<A, F, Fut, V, R>(
    candidates: &[Candidate],
    cfg: &RaceConfig,
    mut fetch: F,
    mut judge: V,
    mut report: R,
) -> Outcome<A>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Attempt>,
    V: FnMut(usize, &Bytes) -> Verdict<A>,
    R: FnMut(usize, &AttemptReport),
{
    if candidates.is_empty() {
        return Outcome::Unavailable { timed_out: false };
    }
    let mut state = RaceState::new(tier_order(candidates), cfg);
    state.launch_next(&mut fetch, Instant::now());
    // One timer for the whole race, moved to the earliest pending deadline
    // or hedge point instead of allocating a sleep per event.
    let mut timer = pin!(sleep_until(state.next_wake().unwrap_or_else(Instant::now)));
    loop {
        match poll_fn(|cx| state.poll_event(timer.as_mut(), cx)).await {
            Event::Finished {
                tier,
                upstream,
                attempt,
            } => {
                let latency = state.running[tier].started.elapsed();
                let result = state.settle(upstream, attempt, &mut judge);
                let kind = match result {
                    Settled::Won(accepted) => {
                        let rep = AttemptReport {
                            result: AttemptResult::Accepted,
                            latency,
                        };
                        report(upstream, &rep);
                        return Outcome::Found {
                            upstream,
                            accepted,
                            latency,
                        };
                    }
                    Settled::Lost(kind) => kind,
                };
                report(
                    upstream,
                    &AttemptReport {
                        result: kind,
                        latency,
                    },
                );
                state.retire_if_done(tier);
            }
            Event::Timer => state.on_timer(Instant::now(), &mut fetch, &mut report),
        }
        state.keep_going(&mut fetch);
        match state.next_wake() {
            None => return state.tally.outcome(),
            Some(at) if at != timer.deadline() => timer.as_mut().reset(at),
            Some(_) => {}
        }
    }
}

/// Candidates in tier order. The common case (the caller already sorted by
/// priority) borrows; otherwise a stable sort keeps the caller's order
/// within each tier.
fn tier_order(candidates: &[Candidate]) -> Cow<'_, [Candidate]> {
    if candidates.is_sorted_by_key(|c| c.priority) {
        Cow::Borrowed(candidates)
    } else {
        let mut sorted = candidates.to_vec();
        sorted.sort_by_key(|c| c.priority);
        Cow::Owned(sorted)
    }
}

/// A fetch future tagged with the upstream it asks, so that the attempts a
/// deadline abandons can still be reported by upstream.
struct Tagged<Fut> {
    upstream: usize,
    fut: Fut,
}

impl<Fut: Future> Future for Tagged<Fut> {
    type Output = (usize, Fut::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let upstream = self.upstream;
        // SAFETY: `fut` is structurally pinned: it is never moved out of a
        // pinned `Tagged`, `Tagged` has no `Drop` impl, and `Tagged` is
        // `Unpin` only when `Fut` is.
        let fut = unsafe { self.map_unchecked_mut(|t| &mut t.fut) };
        fut.poll(cx).map(|out| (upstream, out))
    }
}

/// One started tier.
struct Running<Fut> {
    /// Tier ordinal (0 = most preferred).
    ordinal: usize,
    started: Instant,
    deadline: Instant,
    /// When the next tier should join in; `None` when hedging is off, this
    /// is the last tier, or the next tier has already started.
    hedge_at: Option<Instant>,
    /// Dropping this set cancels every attempt still in it.
    attempts: FuturesUnordered<Tagged<Fut>>,
}

enum Event {
    Finished {
        /// Position in `RaceState::running`.
        tier: usize,
        upstream: usize,
        attempt: Attempt,
    },
    Timer,
}

enum Settled<A> {
    Won(A),
    Lost(AttemptResult),
}

/// What the answers so far say about the path.
#[derive(Default)]
struct Tally {
    /// Some attempt timed out (its own timeout or the tier deadline).
    timed_out: bool,
    /// Some attempt failed otherwise, or its body was rejected for a reason
    /// that does not prove absence.
    failed: bool,
}

impl Tally {
    fn record(&mut self, result: &AttemptResult) {
        match result {
            AttemptResult::Accepted | AttemptResult::NotFound => {}
            AttemptResult::Rejected(kind) => self.failed |= !kind.is_definite_miss(),
            AttemptResult::Failed(FailKind::Timeout) => self.timed_out = true,
            AttemptResult::Failed(_) => self.failed = true,
        }
    }

    fn outcome<A>(&self) -> Outcome<A> {
        if self.timed_out || self.failed {
            Outcome::Unavailable {
                timed_out: self.timed_out && !self.failed,
            }
        } else {
            Outcome::Miss
        }
    }
}

struct RaceState<'c, Fut> {
    order: Cow<'c, [Candidate]>,
    tier_deadline: std::time::Duration,
    hedge_after: Option<super::Hedges>,
    early: super::EarlyStarts,
    /// Index in `order` where the next unstarted tier begins.
    next_start: usize,
    /// Tiers started so far.
    launched: usize,
    /// Started tiers with attempts still in flight, oldest first.
    running: Vec<Running<Fut>>,
    tally: Tally,
}

impl<'c, Fut: Future<Output = Attempt>> RaceState<'c, Fut> {
    fn new(order: Cow<'c, [Candidate]>, cfg: &RaceConfig) -> Self {
        RaceState {
            order,
            tier_deadline: cfg.tier_deadline,
            hedge_after: cfg.hedge_after,
            early: cfg.early,
            next_start: 0,
            launched: 0,
            running: Vec::with_capacity(2),
            tally: Tally::default(),
        }
    }

    fn has_next_tier(&self) -> bool {
        self.next_start < self.order.len()
    }

    /// Starts every member of the next tier. Does nothing when all tiers
    /// have started.
    fn launch_next(&mut self, fetch: &mut impl FnMut(usize) -> Fut, now: Instant) {
        let Some(&first) = self.order.get(self.next_start) else {
            return;
        };
        let end = self.order[self.next_start..]
            .iter()
            .position(|c| c.priority != first.priority)
            .map_or(self.order.len(), |n| self.next_start + n);
        let attempts = FuturesUnordered::new();
        for c in &self.order[self.next_start..end] {
            attempts.push(Tagged {
                upstream: c.upstream,
                fut: fetch(c.upstream),
            });
        }
        self.next_start = end;
        if let Some(prev) = self.running.last_mut() {
            prev.hedge_at = None;
        }
        // The earlier of this tier's own hedge delay and an armed early
        // start, however this tier itself was started.
        let hedge = self.hedge_after.map(|h| h.after(first.priority));
        let delay = match (hedge, self.early.after(first.priority)) {
            (Some(h), Some(e)) => Some(h.min(e)),
            (h, e) => h.or(e),
        };
        let hedge_at = delay.filter(|_| self.has_next_tier()).map(|d| now + d);
        self.running.push(Running {
            ordinal: self.launched,
            started: now,
            deadline: now + self.tier_deadline,
            hedge_at,
            attempts,
        });
        self.launched += 1;
        if delay == Some(Duration::ZERO) {
            // "At once" means now, not at the timer's next tick (a
            // millisecond or more, longer than a loopback answer).
            self.launch_next(fetch, now);
        }
    }

    /// Whether the most recently started tier still has attempts in flight.
    fn newest_is_live(&self) -> bool {
        self.running
            .last()
            .is_some_and(|r| r.ordinal + 1 == self.launched)
    }

    /// Falls through to the next tier once the newest one has ended.
    fn keep_going(&mut self, fetch: &mut impl FnMut(usize) -> Fut) {
        if !self.newest_is_live() && self.has_next_tier() {
            self.launch_next(fetch, Instant::now());
        }
    }

    /// The earliest deadline or hedge point; `None` once nothing is running.
    fn next_wake(&self) -> Option<Instant> {
        self.running
            .iter()
            .map(|r| r.hedge_at.map_or(r.deadline, |h| h.min(r.deadline)))
            .min()
    }

    fn poll_event(&mut self, timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<Event> {
        for (tier, run) in self.running.iter_mut().enumerate() {
            if let Poll::Ready(Some((upstream, attempt))) = run.attempts.poll_next_unpin(cx) {
                return Poll::Ready(Event::Finished {
                    tier,
                    upstream,
                    attempt,
                });
            }
        }
        timer.poll(cx).map(|()| Event::Timer)
    }

    fn settle<A>(
        &mut self,
        upstream: usize,
        attempt: Attempt,
        judge: &mut impl FnMut(usize, &Bytes) -> Verdict<A>,
    ) -> Settled<A> {
        let result = match attempt {
            Attempt::Found(body) => match judge(upstream, &body) {
                Verdict::Accept(accepted) => return Settled::Won(accepted),
                Verdict::Reject(kind) => AttemptResult::Rejected(kind),
            },
            Attempt::NotFound => AttemptResult::NotFound,
            Attempt::Failed(kind) => AttemptResult::Failed(kind),
        };
        self.tally.record(&result);
        Settled::Lost(result)
    }

    /// Forgets a tier whose every attempt has answered.
    fn retire_if_done(&mut self, tier: usize) {
        if self.running[tier].attempts.is_empty() {
            self.running.remove(tier);
        }
    }

    /// Abandons tiers past their deadline and starts a hedged tier when due.
    fn on_timer(
        &mut self,
        now: Instant,
        fetch: &mut impl FnMut(usize) -> Fut,
        report: &mut impl FnMut(usize, &AttemptReport),
    ) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].deadline <= now {
                let run = self.running.remove(i);
                self.abandon(run, now, report);
            } else {
                i += 1;
            }
        }
        let hedge_due = self
            .running
            .last()
            .and_then(|r| r.hedge_at)
            .is_some_and(|h| h <= now);
        if hedge_due && self.newest_is_live() {
            self.launch_next(fetch, now);
        }
    }

    /// Drops a tier's unanswered attempts, reporting each as a timeout.
    fn abandon(
        &mut self,
        run: Running<Fut>,
        now: Instant,
        report: &mut impl FnMut(usize, &AttemptReport),
    ) {
        let rep = AttemptReport {
            result: AttemptResult::Failed(FailKind::Timeout),
            latency: now.saturating_duration_since(run.started),
        };
        for tagged in Pin::new(&run.attempts).iter_pin_ref() {
            report(tagged.upstream, &rep);
        }
        self.tally.timed_out = true;
        // `run` (and with it every straggler's connection) drops here.
    }
}
