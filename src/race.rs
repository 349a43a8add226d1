//! HOT: the per-worker race engine. One narinfo lookup asks every eligible
//! upstream at once, the first answer that the caller's judge accepts wins,
//! and every other attempt is dropped on the spot.
//!
//! The engine knows nothing about sockets: the caller passes a `fetch`
//! closure that turns an upstream index into a future resolving to an
//! [`Attempt`], a `judge` closure that vets a fetched body (signature,
//! store path, filters) and a `report` closure that receives one
//! [`AttemptReport`] per finished attempt for metrics and latency EMAs.
//! Everything runs on one monoio worker: futures are `!Send`, nothing is
//! spawned, and cancelling an attempt means dropping its future (the real
//! fetch future owns its connection and closes it on drop; see
//! `shared/notes/monoio-facts.md` on why a cancelled connection is never
//! reused).
//!
//! # Tiers
//! Candidates are grouped by [`Candidate::priority`], lowest first. All
//! members of a tier are asked together with one GET each. A tier ends when
//! every member has answered, or at [`RaceConfig::tier_deadline`] when its
//! stragglers are abandoned (reported as [`FailKind::Timeout`]). The next
//! tier starts when the newest running tier ends, or earlier, in addition
//! to it, once the newest tier has run for its own hedge delay
//! ([`RaceConfig::hedge_after`], from that tier's members' latency,
//! however the tier itself was started) or for its armed early start
//! ([`RaceConfig::early`]), whichever is shorter; an early start of zero
//! launches the next tier together with this one, without a timer.
//!
//! # Miss versus unavailable
//! A 404 makes a Nix client skip this cache for an hour
//! (`shared/notes/nix-client.md` §4.3), so [`Outcome::Miss`] is returned only
//! when every asked upstream said a definite "not here": [`Attempt::NotFound`]
//! or a body rejected as [`RejectKind::WrongStorePath`] or
//! [`RejectKind::Filtered`]. Any timeout, transport error, unexpected status,
//! bad signature or malformed body makes the result
//! [`Outcome::Unavailable`]. This fixes ncro 2.2's bug where an unreachable
//! tier 1 plus a 404 in tier 2 was negative-cached (reference §13.2 item 3).
//!
//! # Cost
//! `race::tests::overhead_of_three_instant_fetchers` (ignored; not a timed
//! assertion) runs 200,000 races over 3 candidates in one tier whose fetch
//! futures are ready on first poll, the judge accepting the first. On the
//! shared 2-vCPU development VM, with the crate at opt-level 3 (no LTO,
//! debug assertions on), five runs gave 360-950 ns per race, median about
//! 490 ns: the `FuturesUnordered` and per-attempt task allocations, plus
//! the timer entry, which is created but never registered when an answer is
//! ready first. Those figures predate the slot array: attempts now live in
//! one pinned allocation per race and are polled in place (not re-measured
//! this way; docs/benchmarks.md, "Where a miss's CPU goes", has the
//! allocator calls and CPU per miss before and after). Reproduce with
//! `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test --lib race::tests::overhead -- --ignored --nocapture`.
//!

mod engine;
pub mod single_flight;
#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;

pub use engine::race;
pub use single_flight::{Role, SingleFlight};

/// What one upstream said about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 200 with its complete body, not yet vetted.
    Found(Bytes),
    /// A definite miss: 404, 410, or 403 (S3 buckets answer 403 for absent
    /// keys, and Nix itself treats 403 as 404).
    NotFound,
    /// No usable answer; never evidence that the path is absent.
    Failed(FailKind),
}

impl Attempt {
    /// Classifies a response status other than the expected 200, so the rule
    /// for which statuses are a definite miss lives in one place.
    pub fn from_unexpected_status(status: u16) -> Attempt {
        match status {
            403 | 404 | 410 => Attempt::NotFound,
            500..=599 => Attempt::Failed(FailKind::Status5xx(status)),
            _ => Attempt::Failed(FailKind::OtherStatus(status)),
        }
    }
}

/// Why an attempt produced no answer. A fixed set so that
/// [`FailKind::label`] can be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// No address for the upstream's host.
    Dns,
    /// TCP connect refused, unreachable or timed out.
    Connect,
    /// TLS handshake or certificate failure.
    Tls,
    /// The fetch's own timeout, or the tier deadline abandoned it.
    Timeout,
    /// Connection reset or closed before the response was complete.
    Reset,
    /// 5xx status.
    Status5xx(u16),
    /// Any other status that is neither 200 nor a definite miss
    /// (401, 429, 3xx, 206, ...).
    OtherStatus(u16),
    /// The response could not be parsed as HTTP/1.1.
    Protocol,
    /// The body exceeded the size allowed for a narinfo.
    TooLarge,
    /// An S3 upstream had no usable credentials, or S3 refused them.
    Auth,
    /// The request could not be sent as built (a byte or a size the
    /// client refuses, a path S3 cannot take): the request's fault, not
    /// the upstream's, so it never starts a cooldown.
    Request,
}

impl FailKind {
    /// Metric label; the status code itself is left out to keep the label
    /// set fixed.
    pub fn label(&self) -> &'static str {
        match self {
            FailKind::Dns => "dns",
            FailKind::Connect => "connect",
            FailKind::Tls => "tls",
            FailKind::Timeout => "timeout",
            FailKind::Reset => "reset",
            FailKind::Status5xx(_) => "status_5xx",
            FailKind::OtherStatus(_) => "status_other",
            FailKind::Protocol => "protocol",
            FailKind::TooLarge => "too_large",
            FailKind::Auth => "auth",
            FailKind::Request => "request",
        }
    }
}

/// The judge's decision about a fetched body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<A> {
    /// The body is good; `A` is whatever the caller wants back (typically
    /// the parsed narinfo plus the raw bytes).
    Accept(A),
    /// The body must not be served.
    Reject(RejectKind),
}

/// Why the judge refused a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// No signature from a trusted key verifies.
    BadSignature,
    /// The narinfo's StorePath does not belong to the requested hash.
    WrongStorePath,
    /// The upstream's allow/deny filters exclude this path.
    Filtered,
    /// The body is not a parseable narinfo.
    Malformed,
}

impl RejectKind {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RejectKind::BadSignature => "bad_signature",
            RejectKind::WrongStorePath => "wrong_store_path",
            RejectKind::Filtered => "filtered",
            RejectKind::Malformed => "malformed",
        }
    }

    /// Whether this rejection means "the upstream does not have the path"
    /// (and so may contribute to a [`Outcome::Miss`]). A filtered upstream is
    /// treated as not holding the path; a wrong store path answers a question
    /// nobody asked. A bad signature or a garbled body says nothing about
    /// whether the path exists, so it is not a miss.
    pub fn is_definite_miss(&self) -> bool {
        matches!(self, RejectKind::WrongStorePath | RejectKind::Filtered)
    }
}

/// One upstream that may be asked, as the caller ranks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Index into the caller's upstream snapshot; handed back to `fetch`,
    /// `judge`, `report` and in [`Outcome::Found`].
    pub upstream: usize,
    /// Tier; lower is preferred. Candidates with equal priority are raced
    /// together, in the order the caller gave them.
    pub priority: i32,
}

/// Timing knobs for one race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaceConfig {
    /// How long a tier may run before its unanswered attempts are abandoned
    /// as timeouts. Counted from the tier's own start.
    pub tier_deadline: Duration,
    /// When set, the next tier starts once the current one has run for its
    /// own delay here ([`Hedges::after`] its priority), while the current
    /// one keeps running until its deadline; whichever accepted answer
    /// comes first wins. `None` means a tier only starts after the previous
    /// one has ended.
    pub hedge_after: Option<Hedges>,
    /// Tiers after which the next tier starts early, whatever
    /// `hedge_after` says (the earlier of the two applies): the tier-skip
    /// rule of [`tiers`] arms it for tiers that recently missed most
    /// lookups. Empty means tier order (plus `hedge_after`) alone.
    pub early: EarlyStarts,
}

/// A small fixed map from a tier's priority to a delay: up to `N` tiers,
/// `Copy` and allocation-free, so a race plan carries it by value. A
/// priority listed twice keeps its first delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TierDelays<const N: usize> {
    priority: [i32; N],
    delay: [Duration; N],
    len: u8,
}

impl<const N: usize> TierDelays<N> {
    const EMPTY: Self = TierDelays {
        priority: [0; N],
        delay: [Duration::ZERO; N],
        len: 0,
    };

    /// False (and no change) when `N` tiers are already listed.
    fn push(&mut self, priority: i32, delay: Duration) -> bool {
        let n = self.len as usize;
        if n == N {
            return false;
        }
        self.priority[n] = priority;
        self.delay[n] = delay;
        self.len += 1;
        true
    }

    fn get(&self, priority: i32) -> Option<Duration> {
        let n = self.len as usize;
        self.priority[..n]
            .iter()
            .position(|&p| p == priority)
            .map(|i| self.delay[i])
    }
}

/// Per-tier hedge delays for one race: "once a tier of priority `p` has
/// run for `after(p)`, the next tier joins in". Each tier's delay comes
/// from its own members' latency (`upstream::health::hedge_delay`), so a
/// slow tier is not called late by a fast tier's clock. Up to
/// [`Hedges::MAX`] tiers are listed; any other tier gets the default given
/// to [`Hedges::uniform`]. `Copy` and allocation-free, like
/// [`EarlyStarts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hedges {
    tiers: TierDelays<{ Hedges::MAX }>,
    other: Duration,
}

impl Hedges {
    /// Tiers one race can list.
    pub const MAX: usize = 8;

    /// `delay` for every tier, until [`Self::push`] sets one's own.
    pub const fn uniform(delay: Duration) -> Hedges {
        Hedges {
            tiers: TierDelays::EMPTY,
            other: delay,
        }
    }

    /// Sets the delay of the tier of `priority`; false (and no change) when
    /// [`Self::MAX`] tiers are already listed. A priority listed twice
    /// keeps its first delay.
    pub fn push(&mut self, priority: i32, delay: Duration) -> bool {
        self.tiers.push(priority, delay)
    }

    /// How long the tier of `priority` runs before the next one joins.
    pub fn after(&self, priority: i32) -> Duration {
        self.tiers.get(priority).unwrap_or(self.other)
    }
}

/// Per-tier early starts for one race: "once a tier of priority `p` has
/// run for `delay`, start the next tier too". At most [`EarlyStarts::MAX`]
/// tiers (later ones are ignored); `Copy` and allocation-free, so a race
/// plan carries it by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStarts(TierDelays<{ EarlyStarts::MAX }>);

impl Default for EarlyStarts {
    fn default() -> Self {
        EarlyStarts::NONE
    }
}

impl EarlyStarts {
    /// Tiers one race can start early after.
    pub const MAX: usize = 4;
    /// No early starts.
    pub const NONE: EarlyStarts = EarlyStarts(TierDelays::EMPTY);

    /// Arms an early start after the tier of `priority`; false (and no
    /// change) when [`Self::MAX`] tiers are already armed.
    pub fn push(&mut self, priority: i32, delay: Duration) -> bool {
        self.0.push(priority, delay)
    }

    /// The early-start delay after the tier of `priority`, if armed.
    pub fn after(&self, priority: i32) -> Option<Duration> {
        self.0.get(priority)
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

/// How the race ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<A> {
    /// `upstream` answered first with a body the judge accepted.
    Found {
        /// The winner's index in the caller's snapshot.
        upstream: usize,
        /// What the judge returned for the winning body.
        accepted: A,
        /// Time from the start of the winner's tier to its answer.
        latency: Duration,
    },
    /// Every asked upstream in every tier gave a definite miss. The only
    /// outcome that may be answered with 404 and negatively cached.
    Miss,
    /// No upstream produced an acceptable body and at least one gave no
    /// definite answer, or there were no candidates at all (the caller
    /// decides what an empty candidate list means before calling).
    /// Never negatively cached. `timed_out` is true when timeouts were the
    /// only failures (answer 504); otherwise answer 502.
    Unavailable {
        /// Some attempt timed out and nothing else failed.
        timed_out: bool,
    },
}

/// The result of one finished attempt, as handed to `report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The body was accepted; this attempt won the race.
    Accepted,
    /// A body came back and the judge rejected it.
    Rejected(RejectKind),
    /// A definite miss.
    NotFound,
    /// No usable answer, including abandonment at the tier deadline.
    Failed(FailKind),
}

impl AttemptResult {
    /// Metric label: `accepted`, `not_found`, or the rejection's or
    /// failure's own label.
    pub fn label(&self) -> &'static str {
        match self {
            AttemptResult::Accepted => "accepted",
            AttemptResult::Rejected(kind) => kind.label(),
            AttemptResult::NotFound => "not_found",
            AttemptResult::Failed(kind) => kind.label(),
        }
    }
}

/// What `report` receives for each finished attempt. Attempts dropped
/// because another upstream won are not reported: their latency is unknown
/// and they did nothing wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptReport {
    /// How the attempt ended.
    pub result: AttemptResult,
    /// Time from the start of the attempt's tier to its end (for an
    /// abandoned attempt: to the deadline check that abandoned it).
    pub latency: Duration,
}
