//! The race state machine: tiers in flight, their deadlines, the hedge
//! timer, and the tally that decides between a miss and an outage.

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::ops::Range;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
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
    let order = tier_order(candidates);
    let n = order.len();
    // The slots live in this future (which the caller has boxed once per
    // miss) when there are few candidates, the usual case: no allocation
    // of their own, and none through the allocator's slow aligned path
    // (an attempt holds a monoio `Sleep`, aligned to 128 bytes).
    let inline: Pin<&mut [Option<Fut>; INLINE_SLOTS]> = pin!(std::array::from_fn(|_| None));
    let mut spilled: Option<Pin<Box<[Option<Fut>]>>> = None;
    let slots: Pin<&mut [Option<Fut>]> = if n <= INLINE_SLOTS {
        let all: Pin<&mut [Option<Fut>]> = inline;
        // SAFETY: a prefix of a pinned slice is pinned too; nothing is
        // moved out of it.
        unsafe { all.map_unchecked_mut(|s| &mut s[..n]) }
    } else {
        spilled
            .insert(Box::into_pin((0..n).map(|_| None).collect()))
            .as_mut()
    };
    let mut state = RaceState::new(order, Slots { slots }, cfg);
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

/// Races with at most this many candidates keep their attempts inside the
/// race's own future; larger ones allocate the slot array.
const INLINE_SLOTS: usize = 4;

/// The race's attempts: one slot per candidate, by position in tier order,
/// set up once per race (not per tier or per attempt). A slot holds its
/// attempt from launch until it answers or is abandoned; emptying a slot
/// drops the attempt in place (which cancels it). Attempts still in their
/// slots when the race ends are dropped as `race` returns.
struct Slots<'s, Fut> {
    slots: Pin<&'s mut [Option<Fut>]>,
}

impl<Fut: Future> Slots<'_, Fut> {
    fn slot(&mut self, i: usize) -> Pin<&mut Option<Fut>> {
        // SAFETY: the slice is pinned and never reallocated or moved out
        // of; a slot's value is only replaced through `Pin::set`, which
        // drops the old value in place.
        unsafe { self.slots.as_mut().map_unchecked_mut(|s| &mut s[i]) }
    }

    fn start(&mut self, i: usize, fut: Fut) {
        self.slot(i).set(Some(fut));
    }

    fn cancel(&mut self, i: usize) {
        self.slot(i).set(None);
    }

    fn is_live(&self, i: usize) -> bool {
        self.slots[i].is_some()
    }

    /// Polls the attempt in slot `i`; a finished one is dropped at once.
    fn poll(&mut self, i: usize, cx: &mut Context<'_>) -> Poll<Option<Fut::Output>> {
        let Some(fut) = self.slot(i).as_pin_mut() else {
            return Poll::Ready(None);
        };
        let out = ready!(fut.poll(cx));
        self.cancel(i);
        Poll::Ready(Some(out))
    }
}

/// One started tier.
struct Running {
    /// Tier ordinal (0 = most preferred).
    ordinal: usize,
    started: Instant,
    deadline: Instant,
    /// When the next tier should join in; `None` when hedging is off, this
    /// is the last tier, or the next tier has already started.
    hedge_at: Option<Instant>,
    /// Its candidates' positions in tier order (their slots).
    members: Range<usize>,
    /// Attempts still in flight.
    live: usize,
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

struct RaceState<'c, 's, Fut> {
    order: Cow<'c, [Candidate]>,
    tier_deadline: std::time::Duration,
    hedge_after: Option<super::Hedges>,
    early: super::EarlyStarts,
    /// Index in `order` where the next unstarted tier begins.
    next_start: usize,
    /// Tiers started so far.
    launched: usize,
    /// Started tiers with attempts still in flight, oldest first.
    running: Vec<Running>,
    /// Every candidate's attempt, by position in `order`.
    slots: Slots<'s, Fut>,
    tally: Tally,
}

impl<'c, 's, Fut: Future<Output = Attempt>> RaceState<'c, 's, Fut> {
    fn new(order: Cow<'c, [Candidate]>, slots: Slots<'s, Fut>, cfg: &RaceConfig) -> Self {
        RaceState {
            tier_deadline: cfg.tier_deadline,
            hedge_after: cfg.hedge_after,
            early: cfg.early,
            next_start: 0,
            launched: 0,
            running: Vec::with_capacity(2),
            slots,
            order,
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
        let members = self.next_start..end;
        for i in members.clone() {
            self.slots.start(i, fetch(self.order[i].upstream));
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
            live: members.len(),
            members,
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
        // Every live attempt is polled: a tier has few members, and a
        // spurious poll of a pending request costs less than a per-attempt
        // waker and task allocation.
        for (tier, run) in self.running.iter_mut().enumerate() {
            for i in run.members.clone() {
                if let Poll::Ready(Some(attempt)) = self.slots.poll(i, cx) {
                    run.live -= 1;
                    return Poll::Ready(Event::Finished {
                        tier,
                        upstream: self.order[i].upstream,
                        attempt,
                    });
                }
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
        if self.running[tier].live == 0 {
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
        run: Running,
        now: Instant,
        report: &mut impl FnMut(usize, &AttemptReport),
    ) {
        let rep = AttemptReport {
            result: AttemptResult::Failed(FailKind::Timeout),
            latency: now.saturating_duration_since(run.started),
        };
        for i in run.members {
            if self.slots.is_live(i) {
                report(self.order[i].upstream, &rep);
                // Dropping the straggler closes its connection.
                self.slots.cancel(i);
            }
        }
        self.tally.timed_out = true;
    }
}
