//! NAR hedging and per-upstream NAR stream limits (docs/metrics.md):
//! `ncro_nar_hedges_total{event,upstream}`,
//! `ncro_nar_hedge_failures_total{kind,upstream}`,
//! `ncro_nar_limit_skips_total{upstream}`,
//! `ncro_nar_limit_waits_total{result}` and
//! `ncro_nar_streams_limited{upstream}`. Counters are per worker (single
//! writer); the scrape sums them. COLD apart from the counters.

use prometheus::proto::{MetricFamily, MetricType};

use super::family::{counter_metric, family, gauge_metric};
use super::{LocalCounter, Metrics};

/// What happened to a hedge, for `ncro_nar_hedges_total{event}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeEvent {
    /// An attempt was started while another one for the same request was
    /// still in flight.
    Started = 0,
    /// Such an extra attempt won (its answer was relayed).
    Won = 1,
    /// An attempt was dropped because another one won (under the loser).
    Cancelled = 2,
}

pub const HEDGE_EVENTS: [&str; 3] = ["started", "won", "cancelled"];

/// Why an attempt to open a NAR did not win, for
/// `ncro_nar_hedge_failures_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeFailure {
    /// 403, 404 or 410: the upstream does not have it.
    NotFound = 0,
    /// Any other status that is not the upstream's final word (5xx, ...).
    Status = 1,
    /// No head within `timeouts.first_byte`, or no first body byte within
    /// the upstream's NAR read timeout (or a connect/DNS timeout).
    Timeout = 2,
    /// Connect, TLS, reset or protocol error before the head.
    Transport = 3,
    /// A 2xx whose connection ended before its first body byte.
    NoBody = 4,
}

pub const HEDGE_FAILURES: [&str; 5] = ["not_found", "status", "timeout", "transport", "no_body"];

/// Per upstream, per worker.
#[derive(Default)]
pub struct NarUpstreamCounters {
    pub hedges: [LocalCounter; 3],
    pub failures: [LocalCounter; 5],
    /// Candidates passed over because `max_concurrent_requests` streams
    /// were in flight.
    pub limit_skips: LocalCounter,
    /// Stream permits taken and given back under the cap (the difference
    /// is the number in flight).
    pub permits_taken: LocalCounter,
    pub permits_given: LocalCounter,
}

impl NarUpstreamCounters {
    pub fn hedge(&self, e: HedgeEvent) {
        self.hedges[e as usize].inc();
    }

    pub fn failure(&self, f: HedgeFailure) {
        self.failures[f as usize].inc();
    }
}

/// How a wait for a NAR stream permit ended, for
/// `ncro_nar_limit_waits_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitWait {
    Granted = 0,
    /// Nothing came free within the wait limit: 503.
    Refused = 1,
}

pub const LIMIT_WAITS: [&str; 2] = ["granted", "refused"];

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let slots = m.upstream_slots();
    let sum = |i: usize, f: &dyn Fn(&NarUpstreamCounters) -> &LocalCounter| -> u64 {
        m.workers
            .iter()
            .filter_map(|w| w.upstreams.get(i))
            .map(|u| f(&u.nar).get())
            .sum()
    };
    let (mut hedges, mut failures, mut skips, mut limited) = (vec![], vec![], vec![], vec![]);
    for (i, url) in &slots.live {
        let (i, url) = (*i, &**url);
        for (k, e) in HEDGE_EVENTS.iter().enumerate() {
            let v = sum(i, &|u| &u.hedges[k]);
            hedges.push(counter_metric(&[("event", e), ("upstream", url)], v));
        }
        for (k, kind) in HEDGE_FAILURES.iter().enumerate() {
            let v = sum(i, &|u| &u.failures[k]);
            failures.push(counter_metric(&[("kind", kind), ("upstream", url)], v));
        }
        skips.push(counter_metric(
            &[("upstream", url)],
            sum(i, &|u| &u.limit_skips),
        ));
        let held = sum(i, &|u| &u.permits_taken).saturating_sub(sum(i, &|u| &u.permits_given));
        limited.push(gauge_metric(&[("upstream", url)], held as f64));
    }
    let waits = LIMIT_WAITS
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let v = m.workers.iter().map(|w| w.nar_limit_waits[k].get()).sum();
            counter_metric(&[("result", r)], v)
        })
        .collect();
    vec![
        family(
            "ncro_nar_hedges_total",
            "NAR hedging: extra attempts started, extra attempts that won, attempts cancelled because another won.",
            MetricType::COUNTER,
            hedges,
        ),
        family(
            "ncro_nar_hedge_failures_total",
            "Attempts to open a NAR that failed before their body started, by kind.",
            MetricType::COUNTER,
            failures,
        ),
        family(
            "ncro_nar_limit_skips_total",
            "NAR candidates passed over because max_concurrent_requests streams to them were in flight.",
            MetricType::COUNTER,
            skips,
        ),
        family(
            "ncro_nar_limit_waits_total",
            "NAR requests that found every holder at max_concurrent_requests and waited: granted, or refused with 503.",
            MetricType::COUNTER,
            waits,
        ),
        family(
            "ncro_nar_streams_limited",
            "NAR streams in flight to upstreams with max_concurrent_requests (permits held).",
            MetricType::GAUGE,
            limited,
        ),
    ]
}
