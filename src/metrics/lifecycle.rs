//! `ncro_shutdown_phase{phase}`: 1 for the phase the process is in
//! (`serving`, `lame_duck`, `draining`), 0 for the others. COLD.

use prometheus::proto::{MetricFamily, MetricType};

use super::family::{family, gauge_metric};
use super::Metrics;
use crate::signals::Stage;

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let now = m.phase.get();
    let metrics = Stage::ALL
        .iter()
        .map(|&s| gauge_metric(&[("phase", s.label())], f64::from(u8::from(s == now))))
        .collect();
    vec![family(
        "ncro_shutdown_phase",
        "1 for the phase the process is in: serving, lame_duck (SIGTERM taken, /health answers 503, still serving for server.drain_delay) or draining.",
        MetricType::GAUGE,
        metrics,
    )]
}
