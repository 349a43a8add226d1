//! Metrics of the early-start rule (docs/routing.md, "Early starts"):
//! per-tier statistics as the control thread last computed them, which
//! tiers are armed, and what early-started requests turned out to be.

use std::sync::Mutex;

use prometheus::proto::{MetricFamily, MetricType};

use super::family::{counter_metric, family, gauge_metric};
use super::{Metrics, EARLY_START_RESULTS};

/// One tier in the last decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierRow {
    pub priority: i32,
    /// Decayed counts of recent tier outcomes.
    pub found: f64,
    pub missed: f64,
    /// The next tier starts together with this one.
    pub armed: bool,
}

/// Written by the control thread once a second; read by scrapes. The lock
/// is never taken on the request path.
#[derive(Debug, Default)]
pub struct TierGauges(Mutex<Vec<TierRow>>);

impl TierGauges {
    pub fn set(&self, rows: Vec<TierRow>) {
        if let Ok(mut g) = self.0.lock() {
            *g = rows;
        }
    }

    pub fn get(&self) -> Vec<TierRow> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let early = EARLY_START_RESULTS
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let v = m.workers.iter().map(|w| w.early_starts[i].get()).sum();
            counter_metric(&[("result", r)], v)
        })
        .collect();
    let rows = m.tiers.get();
    let (mut outcomes, mut armed) = (vec![], vec![]);
    for r in &rows {
        let p = r.priority.to_string();
        outcomes.push(gauge_metric(
            &[("priority", &p), ("result", "found")],
            r.found,
        ));
        outcomes.push(gauge_metric(
            &[("priority", &p), ("result", "missed")],
            r.missed,
        ));
        armed.push(gauge_metric(
            &[("priority", &p)],
            f64::from(u8::from(r.armed)),
        ));
    }
    vec![
        family(
            "ncro_narinfo_early_starts_total",
            "narinfo requests sent to a tier before the tier above had answered, because that tier mostly misses; by what the tier above then said.",
            MetricType::COUNTER,
            early,
        ),
        family(
            "ncro_narinfo_tier_outcomes",
            "Recent race outcomes of each tier (decayed counts, time constant health.early_start_window): some member answered 200 (found) or every member a definite miss (missed).",
            MetricType::GAUGE,
            outcomes,
        ),
        family(
            "ncro_narinfo_tier_early_start",
            "1 when the next tier starts together with this one (early start armed), else 0.",
            MetricType::GAUGE,
            armed,
        ),
    ]
}
