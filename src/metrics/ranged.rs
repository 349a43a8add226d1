//! Parallel ranged NAR fetches (docs/metrics.md):
//! `ncro_nar_ranged_total{result}` and `ncro_nar_range_retries_total`.
//! Counters are per worker (single writer); the scrape sums them. COLD.

use prometheus::proto::{MetricFamily, MetricType};

use super::family::{counter_metric, family};
use super::{LocalCounter, Metrics};

/// How a large NAR eligible for ranges went, for
/// `ncro_nar_ranged_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangedResult {
    /// Fetched in ranges, the client got every byte.
    Completed = 0,
    /// No holder could supply a range: the client connection was closed.
    Failed = 1,
    /// The client went away.
    ClientGone = 2,
    /// The upstream answered the probe range wrongly (or it failed): one
    /// stream instead.
    Declined = 3,
    /// `max_memory` was in use, or no stream permit: one stream instead.
    NoRoom = 4,
    /// The upstream's latency is below `min_latency`: one stream (one
    /// connection fills a nearby link, and splice costs far less CPU).
    Near = 5,
}

pub const RANGED_RESULTS: [&str; 6] = [
    "completed",
    "failed",
    "client_gone",
    "declined",
    "no_room",
    "near",
];

/// One worker's counters.
#[derive(Default)]
pub struct RangedCounters {
    pub results: [LocalCounter; 6],
    /// Ranges asked again after a failure or stall.
    pub retries: LocalCounter,
}

impl RangedCounters {
    pub fn result(&self, r: RangedResult) {
        self.results[r as usize].inc();
    }
}

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let results = RANGED_RESULTS
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let v = m
                .workers
                .iter()
                .map(|w| w.nar_ranged.results[k].get())
                .sum();
            counter_metric(&[("result", r)], v)
        })
        .collect();
    let retries = m.workers.iter().map(|w| w.nar_ranged.retries.get()).sum();
    vec![
        family(
            "ncro_nar_ranged_total",
            "Large NARs eligible for parallel ranges, by how they went (declined, no_room and near were relayed as one stream).",
            MetricType::COUNTER,
            results,
        ),
        family(
            "ncro_nar_range_retries_total",
            "Ranges of parallel NAR transfers asked again after a failure or stall.",
            MetricType::COUNTER,
            vec![counter_metric(&[], retries)],
        ),
    ]
}
