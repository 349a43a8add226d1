//! Upstream health as metrics: the place where the health work (probes,
//! EMA, states) plugs in. The health module owns the state; it installs a
//! [`HealthSource`] once with `Metrics::health.set(..)`, and every scrape
//! asks it about each live upstream (configured or discovered). COLD.

use std::time::Duration;

use prometheus::proto::{Metric, MetricFamily, MetricType};

use super::family::{family, gauge_metric};
use super::Metrics;

/// An upstream's state, as a fixed label set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// Not probed yet, or no health source installed.
    Unknown,
    Active,
    Degraded,
    Down,
}

impl HealthState {
    pub const ALL: [HealthState; 4] = [
        HealthState::Unknown,
        HealthState::Active,
        HealthState::Degraded,
        HealthState::Down,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Active => "active",
            HealthState::Degraded => "degraded",
            HealthState::Down => "down",
        }
    }
}

/// What the health work reports about one upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthSample {
    pub state: HealthState,
    /// Latency EMA; `None` until the first measurement.
    pub ema: Option<Duration>,
    pub consecutive_failures: u32,
}

impl HealthSample {
    pub const UNKNOWN: HealthSample = HealthSample {
        state: HealthState::Unknown,
        ema: None,
        consecutive_failures: 0,
    };
}

/// Called at scrape time (on the worker answering `/metrics`) with a
/// configured upstream's URL; must not block.
pub type HealthSource = Box<dyn Fn(&str) -> Option<HealthSample> + Send + Sync>;

/// `ncro_upstream_health_state` (one sample per upstream and state, 1 for
/// the current one), `ncro_upstream_latency_ema_seconds` (NaN until
/// measured) and `ncro_upstream_consecutive_failures`.
pub(super) fn families(m: &Metrics) -> [MetricFamily; 3] {
    let mut states: Vec<Metric> = Vec::new();
    let mut emas = Vec::new();
    let mut fails = Vec::new();
    for (_, url) in &m.upstream_slots().live {
        let url = &**url;
        let s = m
            .health
            .get()
            .and_then(|f| f(url))
            .unwrap_or(HealthSample::UNKNOWN);
        for st in HealthState::ALL {
            let v = if st == s.state { 1.0 } else { 0.0 };
            states.push(gauge_metric(&[("upstream", url), ("state", st.label())], v));
        }
        let ema = s.ema.map_or(f64::NAN, |d| d.as_secs_f64());
        emas.push(gauge_metric(&[("upstream", url)], ema));
        let n = f64::from(s.consecutive_failures);
        fails.push(gauge_metric(&[("upstream", url)], n));
    }
    [
        family(
            "ncro_upstream_health_state",
            "Health state of each upstream (1 for the current state).",
            MetricType::GAUGE,
            states,
        ),
        family(
            "ncro_upstream_latency_ema_seconds",
            "Latency EMA of each upstream (NaN until measured).",
            MetricType::GAUGE,
            emas,
        ),
        family(
            "ncro_upstream_consecutive_failures",
            "Consecutive failed probes of each upstream.",
            MetricType::GAUGE,
            fails,
        ),
    ]
}
