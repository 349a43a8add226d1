use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::race::{AttemptResult, FailKind, RejectKind};

fn metrics(workers: usize, upstreams: &[&str]) -> Metrics {
    Metrics::new(workers, upstreams.iter().map(|u| Arc::from(*u)).collect())
}

/// The value of the sample line starting with `series ` (exact name and
/// labels as rendered).
fn sample(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no sample {series}\n{text}"));
    line[prefix.len()..].parse().expect("numeric sample")
}

#[test]
fn histogram_is_cumulative_with_inf_sum_and_count_merged_over_workers() {
    let m = metrics(2, &["http://a"]);
    let (w0, w1) = (&m.workers[0], &m.workers[1]);
    w0.race_latency.observe(0.00005); // first bucket (0.0001)
    w0.race_latency.observe(0.0001); // bounds are inclusive (le)
    w1.race_latency.observe(0.003); // 0.005 bucket
    w1.race_latency.observe(45.0); // above the last bound: +Inf only
    let t = m.render();
    let b = |le: &str| {
        sample(
            &t,
            &format!("ncro_narinfo_race_duration_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(b("0.0001"), 2.0);
    assert_eq!(b("0.0025"), 2.0);
    assert_eq!(b("0.005"), 3.0);
    assert_eq!(b("30"), 3.0);
    assert_eq!(b("+Inf"), 4.0);
    assert_eq!(sample(&t, "ncro_narinfo_race_duration_seconds_count"), 4.0);
    let sum = sample(&t, "ncro_narinfo_race_duration_seconds_sum");
    assert!((sum - 45.00315).abs() < 1e-6, "{sum}");
}

#[test]
fn every_bucket_line_is_monotonic() {
    let m = metrics(3, &["http://a", "http://b"]);
    for (i, w) in m.workers.iter().enumerate() {
        for k in 0..50 {
            let v = (k * (i + 1)) as f64 * 0.0137;
            w.race_latency.observe(v);
            w.upstreams[i % 2].win_latency.observe(v);
            w.nar_finished(NarOutcome::Ok, Duration::from_secs_f64(v));
        }
    }
    let t = m.render();
    let mut last: Option<(String, f64)> = None;
    for line in t.lines().filter(|l| l.contains("_bucket{")) {
        let (series, v) = line.rsplit_once(' ').expect("sample line");
        let v: f64 = v.parse().expect("number");
        // Series of one histogram differ only in `le`; compare within one.
        let key = series.split("le=").next().unwrap_or("").to_owned();
        if let Some((k, prev)) = &last {
            if *k == key {
                assert!(v >= *prev, "{line} after {prev}");
            }
        }
        last = Some((key, v));
    }
}

#[test]
fn counters_are_summed_over_workers_and_labelled_by_upstream() {
    let m = metrics(2, &["http://a", "http://b"]);
    m.workers[0].narinfo_cache_hits.add(3);
    m.workers[1].narinfo_cache_hits.inc();
    m.workers[0].narinfo_ok.add(2);
    m.workers[1].narinfo_error.add(5);
    m.workers[0].attempt(1, "status_5xx");
    m.workers[1].attempt(1, "status_5xx");
    m.workers[1].attempt(0, "accepted");
    m.workers[1].upstreams[0].race_wins.inc();
    let t = m.render();
    assert_eq!(sample(&t, "ncro_narinfo_cache_hits_total"), 4.0);
    assert_eq!(
        sample(&t, "ncro_narinfo_requests_total{status=\"200\"}"),
        2.0
    );
    assert_eq!(
        sample(&t, "ncro_narinfo_requests_total{status=\"error\"}"),
        5.0
    );
    assert_eq!(sample(&t, "ncro_narinfo_upstream_attempts_total"), 3.0);
    let req = |u: &str, o: &str| {
        sample(
            &t,
            &format!("ncro_upstream_requests_total{{upstream=\"{u}\",outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(req("http://b", "status_5xx"), 2.0);
    assert_eq!(req("http://a", "accepted"), 1.0);
    assert_eq!(req("http://a", "status_5xx"), 0.0);
    assert_eq!(
        sample(&t, "ncro_upstream_race_wins_total{upstream=\"http://a\"}"),
        1.0
    );
    assert_eq!(
        sample(&t, "ncro_upstream_race_wins_total{upstream=\"http://b\"}"),
        0.0
    );
}

#[test]
fn every_race_outcome_has_its_own_label() {
    let mut results = vec![AttemptResult::Accepted, AttemptResult::NotFound];
    for r in [
        RejectKind::BadSignature,
        RejectKind::WrongStorePath,
        RejectKind::Filtered,
        RejectKind::Malformed,
    ] {
        results.push(AttemptResult::Rejected(r));
    }
    for f in [
        FailKind::Dns,
        FailKind::Connect,
        FailKind::Tls,
        FailKind::Timeout,
        FailKind::Reset,
        FailKind::Status5xx(503),
        FailKind::OtherStatus(401),
        FailKind::Protocol,
        FailKind::TooLarge,
        FailKind::Auth,
        FailKind::Request,
    ] {
        results.push(AttemptResult::Failed(f));
    }
    let mut seen = std::collections::HashSet::new();
    for r in results {
        let label = r.label();
        assert!(OUTCOMES.contains(&label), "{label} missing from OUTCOMES");
        assert!(seen.insert(outcome_index(label)), "{label} shares an index");
    }
    assert_eq!(OUTCOMES[outcome_index("some-new-kind")], "other");
}

#[test]
fn nar_outcomes_feed_errors_and_duration() {
    let m = metrics(1, &["http://a"]);
    let w = &m.workers[0];
    w.nar_finished(NarOutcome::Ok, Duration::from_millis(3));
    w.nar_finished(NarOutcome::Error, Duration::from_millis(40));
    w.nar_finished(NarOutcome::Error, Duration::from_secs(2));
    let t = m.render();
    assert_eq!(sample(&t, "ncro_nar_errors_total"), 2.0);
    let count = |o: &str| {
        sample(
            &t,
            &format!("ncro_nar_request_duration_seconds_count{{outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(count("ok"), 1.0);
    assert_eq!(count("error"), 2.0);
}

#[test]
fn health_is_unknown_until_a_source_is_installed() {
    let m = metrics(1, &["http://a", "http://b"]);
    let t = m.render();
    let state = |t: &str, u: &str, s: &str| {
        sample(
            t,
            &format!("ncro_upstream_health_state{{upstream=\"{u}\",state=\"{s}\"}}"),
        )
    };
    assert_eq!(state(&t, "http://a", "unknown"), 1.0);
    assert_eq!(state(&t, "http://a", "active"), 0.0);
    assert!(sample(
        &t,
        "ncro_upstream_latency_ema_seconds{upstream=\"http://a\"}"
    )
    .is_nan());

    let source: HealthSource = Box::new(|url: &str| {
        (url == "http://b").then_some(HealthSample {
            state: HealthState::Degraded,
            ema: Some(Duration::from_millis(250)),
            consecutive_failures: 4,
        })
    });
    assert!(m.health.set(source).is_ok());
    let t = m.render();
    assert_eq!(state(&t, "http://b", "degraded"), 1.0);
    assert_eq!(state(&t, "http://b", "unknown"), 0.0);
    assert_eq!(state(&t, "http://a", "unknown"), 1.0);
    assert_eq!(
        sample(
            &t,
            "ncro_upstream_latency_ema_seconds{upstream=\"http://b\"}"
        ),
        0.25
    );
    assert_eq!(
        sample(
            &t,
            "ncro_upstream_consecutive_failures{upstream=\"http://b\"}"
        ),
        4.0
    );
}

#[test]
fn no_upstreams_still_renders_the_rest() {
    // Every upstream may be S3 and skipped: per-upstream families are then
    // empty, which the encoder would refuse.
    let m = metrics(1, &[]);
    m.workers[0].narinfo_cache_hits.inc();
    let t = m.render();
    assert!(!t.starts_with("# metrics encoding failed"), "{t}");
    assert_eq!(sample(&t, "ncro_narinfo_cache_hits_total"), 1.0);
    assert!(!t.contains("ncro_upstream_race_wins_total"));
}

#[test]
fn driver_info_per_worker() {
    let m = metrics(2, &["http://a"]);
    assert!(m.drivers[0].set("io_uring").is_ok());
    let t = m.render();
    assert_eq!(
        sample(
            &t,
            "ncro_worker_driver_info{worker=\"0\",driver=\"io_uring\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &t,
            "ncro_worker_driver_info{worker=\"1\",driver=\"starting\"}"
        ),
        1.0
    );
}

#[test]
fn worker_slots_do_not_share_cache_lines() {
    assert!(std::mem::align_of::<WorkerMetrics>() >= 128);
}
