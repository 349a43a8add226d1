//! Pure health bookkeeping for upstreams: the latency EMA, the
//! ACTIVE/DEGRADED/DOWN states, the probe backoff, the routing order with
//! its 10% tie rule, and the hedge delay. Nothing here does I/O or reads a
//! clock: callers pass `now`. The control thread owns the mutable table
//! ([`UpstreamHealth`] per upstream) and publishes a [`HealthSnapshot`]
//! that workers read. docs/routing.md explains the choices.

use std::time::{Duration, Instant};

/// Consecutive failures from which an upstream is DEGRADED.
pub const DEGRADED_AFTER: u32 = 3;
/// Consecutive failures from which an upstream is DOWN.
pub const DOWN_AFTER: u32 = 10;
/// Two EMAs closer than this ratio are a tie (the "10% rule").
pub const TIE_RATIO: f64 = 1.10;
/// A tier is late once it has taken this many times its slowest healthy
/// member's EMA.
pub const HEDGE_FACTOR: f64 = 3.0;
/// Never hedge sooner than this: a cold connection (TCP and TLS
/// handshakes) costs a few round trips more than the warm probe that fed
/// the EMA, and a hedge that fires on every cold start only doubles load.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(50);

/// Health of one upstream as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Active,
    /// Failing probes; still raced, probed less often.
    Degraded,
    /// Left out of races and NAR fallback unless everything is DOWN.
    Down,
}

impl State {
    pub fn from_fails(consecutive_fails: u32) -> State {
        match consecutive_fails {
            n if n >= DOWN_AFTER => State::Down,
            n if n >= DEGRADED_AFTER => State::Degraded,
            _ => State::Active,
        }
    }

    /// ncro 2.2's spelling in `/health`.
    pub fn label(self) -> &'static str {
        match self {
            State::Active => "ACTIVE",
            State::Degraded => "DEGRADED",
            State::Down => "DOWN",
        }
    }

    /// Probe interval multiplier: a failing upstream is asked less often so
    /// that a dead host costs little, yet is noticed when it comes back.
    pub fn backoff_factor(self) -> u32 {
        match self {
            State::Active => 1,
            State::Degraded => 4,
            State::Down => 10,
        }
    }
}

/// `alpha * sample + (1 - alpha) * prev`; the first sample is taken as is.
pub fn ema(prev: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match prev {
        None => sample,
        Some(p) => alpha * sample + (1.0 - alpha) * p,
    }
}

/// When the next probe of an upstream in `state` is due.
pub fn next_probe(state: State, interval: Duration, now: Instant) -> Instant {
    now + interval * state.backoff_factor()
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProbeResult {
    /// The upstream answered over HTTP. `cache_info` is false when it
    /// answered 404/410 for `/nix-cache-info`: the host is alive (that is
    /// what a probe checks) even though it publishes no cache info.
    Up { latency: Duration, cache_info: bool },
    /// Transport error, timeout, or a status that is neither 2xx nor a
    /// definite 404/410.
    Failed,
}

/// The control thread's record of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealth {
    /// Milliseconds; `None` until the first successful sample.
    pub ema_ms: Option<f64>,
    pub consecutive_fails: u32,
    /// Successful samples so far (probes and race wins), as ncro 2.2 counts.
    pub total_queries: u64,
    pub next_probe: Instant,
    /// Result of the last successful probe's `/nix-cache-info` check;
    /// `None` before the first one.
    pub cache_info: Option<bool>,
    /// When the last probe answer (or failure) was recorded; `None` until
    /// the first (`/status`'s `last_probe_secs_ago`).
    pub last_probe: Option<Instant>,
}

impl UpstreamHealth {
    /// A fresh upstream, probed at once.
    pub fn new(now: Instant) -> UpstreamHealth {
        UpstreamHealth {
            ema_ms: None,
            consecutive_fails: 0,
            total_queries: 0,
            next_probe: now,
            cache_info: None,
            last_probe: None,
        }
    }

    /// From a persisted row. ncro 2.2 writes 0.0 for "never measured". The
    /// first probe is due at once: the upstream may have changed while ncro
    /// was stopped, and a restored DOWN holds only until it answers.
    pub fn restored(ema_ms: f64, consecutive_fails: u32, total_queries: u64, now: Instant) -> Self {
        let measured = ema_ms.is_finite() && ema_ms > 0.0;
        UpstreamHealth {
            ema_ms: measured.then_some(ema_ms),
            consecutive_fails,
            total_queries,
            ..UpstreamHealth::new(now)
        }
    }

    pub fn state(&self) -> State {
        State::from_fails(self.consecutive_fails)
    }

    /// A latency observed from a successful answer (probe or race win):
    /// feeds the EMA and proves the upstream alive.
    pub fn record_latency(&mut self, latency: Duration, alpha: f64) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.ema_ms = Some(ema(self.ema_ms, ms, alpha));
        self.consecutive_fails = 0;
        self.total_queries += 1;
    }

    /// Applies a probe result and schedules the next probe. Returns the
    /// state before and after.
    pub fn record_probe(
        &mut self,
        result: ProbeResult,
        alpha: f64,
        interval: Duration,
        now: Instant,
    ) -> (State, State) {
        let before = self.state();
        match result {
            ProbeResult::Up {
                latency,
                cache_info,
            } => {
                self.record_latency(latency, alpha);
                self.cache_info = Some(cache_info);
            }
            ProbeResult::Failed => {
                self.consecutive_fails = self.consecutive_fails.saturating_add(1)
            }
        }
        let after = self.state();
        self.last_probe = Some(now);
        self.next_probe = next_probe(after, interval, now);
        (before, after)
    }
}

/// What the routing order needs to know about one upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rank {
    pub priority: i32,
    pub state: State,
    pub ema_ms: Option<f64>,
}

/// The order in which upstreams are raced and tried for NARs, as indexes
/// into `ranks` (whose positions are the configured order). The order is
/// the sort by this key, so it is total and deterministic:
///
/// 1. DOWN last;
/// 2. `priority` ascending (a tier);
/// 3. within a tier, ACTIVE before DEGRADED (a failing upstream's EMA is
///    stale);
/// 4. within that, latency class: members sorted by EMA are cut into
///    classes, each starting at its fastest member (the leader) and holding
///    every member less than [`TIE_RATIO`] slower than the leader;
///    unmeasured members form the last class;
/// 5. within a class, configured order.
///
/// So an upstream at least 10% faster than another in its tier always
/// comes first, and one less than 10% slower may come first only because it
/// is configured first (the 10% tie rule). Anchoring classes on their
/// leader, rather than comparing neighbours, keeps 10% windows from
/// chaining and keeps the key a plain total order.
pub fn routing_order(ranks: &[Rank]) -> Vec<usize> {
    let group = |r: &Rank| (r.state == State::Down, r.priority, r.state);
    let mut by_speed: Vec<usize> = (0..ranks.len()).collect();
    by_speed.sort_by(|&a, &b| {
        let (ra, rb) = (&ranks[a], &ranks[b]);
        group(ra)
            .cmp(&group(rb))
            .then_with(|| ra.ema_ms.is_none().cmp(&rb.ema_ms.is_none()))
            .then_with(|| {
                let (x, y) = (ra.ema_ms.unwrap_or(0.0), rb.ema_ms.unwrap_or(0.0));
                x.total_cmp(&y)
            })
            .then(a.cmp(&b))
    });
    let mut class = vec![0usize; ranks.len()];
    let mut current = 0usize;
    let mut leader: Option<usize> = None;
    for &i in &by_speed {
        let same = leader.is_some_and(|l| {
            group(&ranks[l]) == group(&ranks[i]) && same_class(ranks[l].ema_ms, ranks[i].ema_ms)
        });
        if !same {
            current += 1;
            leader = Some(i);
        }
        class[i] = current;
    }
    let mut order: Vec<usize> = (0..ranks.len()).collect();
    order.sort_by_key(|&i| (class[i], i));
    order
}

/// Whether `member` belongs to the latency class led by `leader` (the
/// member is never faster than the leader: callers walk in EMA order).
fn same_class(leader: Option<f64>, member: Option<f64>) -> bool {
    match (leader, member) {
        (None, None) => true,
        (Some(l), Some(m)) => m <= l || m < l * TIE_RATIO,
        _ => false,
    }
}

/// How long one tier of a race may run before the next tier joins in:
/// [`HEDGE_FACTOR`] times the slowest EMA among that tier's own measured
/// ACTIVE members, at least [`HEDGE_FLOOR`], at most `cap`
/// (`health.hedge_after`). A tier with no measured ACTIVE member gives no
/// evidence of what "late" means, so it gets `cap`. Each tier gets its own
/// (`Routing::plan_race`): a slow tier is not late by a fast tier's clock.
pub fn hedge_delay(tier: impl IntoIterator<Item = Rank>, cap: Duration) -> Duration {
    let slowest = tier
        .into_iter()
        .filter(|r| r.state == State::Active)
        .filter_map(|r| r.ema_ms)
        .fold(None, |acc: Option<f64>, ms| {
            Some(acc.map_or(ms, |a| a.max(ms)))
        });
    let Some(ms) = slowest else {
        return cap;
    };
    let late = Duration::try_from_secs_f64(ms * HEDGE_FACTOR / 1000.0).unwrap_or(cap);
    late.max(HEDGE_FLOOR).min(cap)
}

/// One upstream in a [`HealthSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub state: State,
    pub ema_ms: Option<f64>,
    pub consecutive_fails: u32,
    pub cache_info: Option<bool>,
}

/// What only `/status` reads about one upstream, kept apart from the
/// [`Entry`] that routing reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    /// Successful samples so far (probes and race wins).
    pub total_queries: u64,
    /// When the last probe answered or failed; `None` before the first.
    pub last_probe: Option<Instant>,
}

/// An immutable view of every upstream's health, indexed like the
/// [`UpstreamSet`](crate::upstream::UpstreamSet), with the routing order
/// computed once per publication instead of once per request.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSnapshot {
    pub entries: Box<[Entry]>,
    /// [`routing_order`] of every present upstream; DOWN ones at the end.
    pub order: Box<[usize]>,
    /// How many upstreams at the front of `order` are not DOWN.
    pub live: usize,
    /// Indexed like `entries`; for `/status` only.
    pub counts: Box<[Counts]>,
}

impl HealthSnapshot {
    /// Builds the snapshot of `table`; `priorities[i]` is upstream `i`'s.
    pub fn build(priorities: &[i32], table: &[UpstreamHealth]) -> HealthSnapshot {
        HealthSnapshot::build_present(priorities, table, |_| true)
    }

    /// Like [`Self::build`], for a set with retired slots: an upstream for
    /// which `present` is false is left out of `order` (so out of races,
    /// NAR fallback and /health) and reads as DOWN to [`Self::is_down`] (so
    /// a cached route naming it is raced again).
    pub fn build_present(
        priorities: &[i32],
        table: &[UpstreamHealth],
        present: impl Fn(usize) -> bool,
    ) -> HealthSnapshot {
        let entries: Box<[Entry]> = table
            .iter()
            .enumerate()
            .map(|(i, h)| Entry {
                state: if present(i) { h.state() } else { State::Down },
                ema_ms: h.ema_ms,
                consecutive_fails: h.consecutive_fails,
                cache_info: h.cache_info,
            })
            .collect();
        let counts = table
            .iter()
            .map(|h| Counts {
                total_queries: h.total_queries,
                last_probe: h.last_probe,
            })
            .collect();
        let ranks: Vec<Rank> = entries
            .iter()
            .zip(priorities)
            .map(|(e, &priority)| Rank {
                priority,
                state: e.state,
                ema_ms: e.ema_ms,
            })
            .collect();
        let order: Box<[usize]> = routing_order(&ranks)
            .into_iter()
            .filter(|&i| present(i))
            .collect();
        let live = order
            .iter()
            .filter(|&&i| entries[i].state != State::Down)
            .count();
        HealthSnapshot {
            entries,
            order,
            live,
            counts,
        }
    }

    pub fn is_down(&self, upstream: usize) -> bool {
        self.entries
            .get(upstream)
            .is_some_and(|e| e.state == State::Down)
    }

    /// Some upstream is DOWN or retired.
    pub fn any_down(&self) -> bool {
        self.live < self.entries.len()
    }

    /// Upstreams eligible for routing, in routing order: the live ones, or
    /// every one when all are DOWN (trying a DOWN upstream beats failing
    /// without asking anyone).
    pub fn routable(&self) -> &[usize] {
        if self.live == 0 {
            &self.order
        } else {
            &self.order[..self.live]
        }
    }

    /// The rank of upstream `i`, for [`hedge_delay`].
    pub fn rank(&self, i: usize, priority: i32) -> Option<Rank> {
        self.entries.get(i).map(|e| Rank {
            priority,
            state: e.state,
            ema_ms: e.ema_ms,
        })
    }
}

#[cfg(test)]
mod tests;
