//! Index-aware routing as metrics (docs/index-routing.md): requests the
//! summaries saved, their false positives, refresh failures, and the age
//! and size of each summary in use. COLD (scrape time).

use std::time::Instant;

use prometheus::proto::{Metric, MetricFamily, MetricType};

use super::family::{counter_metric, family, gauge_metric};
use super::Metrics;
use crate::index::RefreshErrorKind;

/// Per-upstream series: skipped, false positives, refresh errors, summary
/// ages and sizes (the last two only for upstreams with a summary).
fn per_upstream(m: &Metrics) -> [Vec<Metric>; 5] {
    let per_worker = |i: usize, f: &dyn Fn(&super::UpstreamMetrics) -> u64| -> u64 {
        m.workers
            .iter()
            .filter_map(|w| w.upstreams.get(i))
            .map(f)
            .sum()
    };
    let [mut skipped, mut fps, mut errors, mut ages, mut sizes]: [Vec<Metric>; 5] =
        Default::default();
    let state = m.index.get();
    let summaries = state.map(|s| s.summaries());
    let now = Instant::now();
    for (i, url) in &m.upstream_slots().live {
        let (i, u) = (*i, &**url);
        let up = [("upstream", u)];
        skipped.push(counter_metric(&up, per_worker(i, &|w| w.index_skips.get())));
        let fp = per_worker(i, &|w| w.index_false_positives.get());
        fps.push(counter_metric(&up, fp));
        for kind in RefreshErrorKind::ALL {
            let v = state.map_or(0, |s| s.errors(i, kind));
            errors.push(counter_metric(
                &[("upstream", u), ("kind", kind.label())],
                v,
            ));
        }
        let Some(s) = summaries.as_ref().and_then(|set| set.get(i)) else {
            continue;
        };
        let labels = [("upstream", u), ("source", s.source.label())];
        let age = now.saturating_duration_since(s.fetched_at).as_secs_f64();
        ages.push(gauge_metric(&labels, age));
        sizes.push(gauge_metric(&labels, s.bloom.body().len() as f64));
    }
    [skipped, fps, errors, ages, sizes]
}

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let [skipped, fps, errors, ages, sizes] = per_upstream(m);
    let state = m.index.get();
    let mut out = vec![
        family(
            "ncro_index_skipped_requests_total",
            "narinfo requests not sent to an upstream because its fresh index summary ruled the path out.",
            MetricType::COUNTER,
            skipped,
        ),
        family(
            "ncro_index_false_positives_total",
            "404s from an upstream whose fresh index summary said the path might be there.",
            MetricType::COUNTER,
            fps,
        ),
        family(
            "ncro_index_refresh_errors_total",
            "Failed refreshes of an upstream's index summary, by kind (its summary is dropped; it is raced as usual).",
            MetricType::COUNTER,
            errors,
        ),
        family(
            "ncro_index_summary_age_seconds",
            "Time since each upstream's summary was fetched or revalidated (ignored past index.max_age).",
            MetricType::GAUGE,
            ages,
        ),
        family(
            "ncro_index_summary_bytes",
            "Size of each upstream's summary filter.",
            MetricType::GAUGE,
            sizes,
        ),
    ];
    if let Some(p) = state.and_then(|s| s.published()) {
        out.push(family(
            "ncro_index_published_routes",
            "Routes in the filter ncro serves at /bloom-filter.",
            MetricType::GAUGE,
            vec![gauge_metric(&[], p.routes as f64)],
        ));
        out.push(family(
            "ncro_index_published_bytes",
            "Size of the filter ncro serves at /bloom-filter.",
            MetricType::GAUGE,
            vec![gauge_metric(&[], p.body.len() as f64)],
        ));
    }
    out
}
