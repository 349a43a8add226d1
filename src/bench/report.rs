//! Results of a load run: per-thread [`Stats`] (an HDR histogram and
//! counters, no locks), merged into one [`Report`] that renders as text,
//! JSON or a Markdown table row.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histogram resolves (longer ones are clamped).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Why a request failed; a fixed set, so it can label output columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    Closed,
    Protocol,
    Io,
    Http4xx,
    Http5xx,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Closed,
        ErrorKind::Protocol,
        ErrorKind::Io,
        ErrorKind::Http4xx,
        ErrorKind::Http5xx,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Closed => "closed",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Io => "io",
            ErrorKind::Http4xx => "http_4xx",
            ErrorKind::Http5xx => "http_5xx",
        }
    }

    /// The error a status is, given the status the scenario expects for
    /// "not there" (404 is the answer in a miss scenario, an error elsewhere).
    pub fn of_status(status: u16, not_found_expected: bool) -> Option<ErrorKind> {
        match status {
            404 if not_found_expected => None,
            400..=499 => Some(ErrorKind::Http4xx),
            500..=599 => Some(ErrorKind::Http5xx),
            _ => None,
        }
    }
}

/// One thread's measurements. Recording never allocates.
pub struct Stats {
    hist: Histogram<u64>,
    requests: u64,
    bytes: u64,
    errors: [u64; ErrorKind::ALL.len()],
    /// Indexed by status code (0..600); other codes land in slot 0.
    statuses: Vec<u64>,
    last_done: Option<Instant>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("static histogram bounds are valid"),
            requests: 0,
            bytes: 0,
            errors: [0; ErrorKind::ALL.len()],
            statuses: vec![0; 600],
            last_done: None,
        }
    }
}

impl Stats {
    /// A complete HTTP response; its latency goes into the histogram.
    pub fn response(
        &mut self,
        latency: Duration,
        status: u16,
        bytes: u64,
        error: Option<ErrorKind>,
    ) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record(us.max(1));
        self.bytes += bytes;
        let slot = if status < 600 { status as usize } else { 0 };
        self.statuses[slot] += 1;
        self.finish(error);
    }

    /// A request that got no response (its latency is not recorded: it
    /// would only say how long the failure took to notice).
    pub fn failure(&mut self, kind: ErrorKind) {
        self.finish(Some(kind));
    }

    fn finish(&mut self, error: Option<ErrorKind>) {
        self.requests += 1;
        if let Some(k) = error {
            self.errors[k as usize] += 1;
        }
        self.last_done = Some(Instant::now());
    }

    pub fn merge(&mut self, other: &Stats) {
        // Both histograms share bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.requests += other.requests;
        self.bytes += other.bytes;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for (a, b) in self.statuses.iter_mut().zip(&other.statuses) {
            *a += b;
        }
        self.last_done = self.last_done.max(other.last_done);
    }

    pub fn requests(&self) -> u64 {
        self.requests
    }

    pub fn last_done(&self) -> Option<Instant> {
        self.last_done
    }
}

/// What was run, for the report header.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub scenario: &'static str,
    pub target: String,
    pub connections: usize,
    pub threads: usize,
    /// Open-loop rate in requests per second; `None` for closed loop.
    pub rate: Option<f64>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// The merged result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub info: RunInfo,
    pub mode: &'static str,
    /// Measured seconds: from the end of the warm-up to the last response.
    pub duration_s: f64,
    pub requests: u64,
    pub req_per_s: f64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    pub statuses: BTreeMap<String, u64>,
    pub latency_us: Latency,
}

impl Report {
    pub fn new(info: RunInfo, stats: &Stats, measured: Duration) -> Report {
        let secs = measured.as_secs_f64().max(1e-9);
        let h = &stats.hist;
        let q = |x: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(x)
            }
        };
        let errors_by_kind: BTreeMap<_, _> = ErrorKind::ALL
            .iter()
            .map(|&k| (k.label(), stats.errors[k as usize]))
            .filter(|&(_, n)| n > 0)
            .collect();
        let statuses = stats
            .statuses
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(code, &n)| {
                (
                    if code == 0 {
                        "other".into()
                    } else {
                        code.to_string()
                    },
                    n,
                )
            })
            .collect();
        Report {
            mode: if info.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            info,
            duration_s: measured.as_secs_f64(),
            requests: stats.requests,
            req_per_s: stats.requests as f64 / secs,
            bytes: stats.bytes,
            bytes_per_s: stats.bytes as f64 / secs,
            errors: errors_by_kind.values().sum(),
            errors_by_kind,
            statuses,
            latency_us: Latency {
                min: if h.is_empty() { 0 } else { h.min() },
                mean: if h.is_empty() { 0.0 } else { h.mean() },
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: if h.is_empty() { 0 } else { h.max() },
            },
        }
    }

    /// The human summary printed after a run.
    pub fn render_text(&self) -> String {
        let i = &self.info;
        let mut s = String::new();
        let loop_kind = match i.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".into(),
        };
        let _ = writeln!(
            s,
            "{} against {}: {} connections on {} threads, {loop_kind}",
            i.scenario, i.target, i.connections, i.threads
        );
        let _ = writeln!(
            s,
            "  requests   {} in {:.2}s = {:.0} req/s, {}/s",
            self.requests,
            self.duration_s,
            self.req_per_s,
            human_bytes(self.bytes_per_s)
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "  latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        );
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(s, "  statuses   {}", statuses.join(", "));
        let errors: Vec<String> = self
            .errors_by_kind
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  errors     {}{}",
            self.errors,
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            }
        );
        s
    }

    pub const MARKDOWN_HEADER: &'static str = "| scenario | target | conns | rate | req/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    pub fn markdown_row(&self) -> String {
        let l = &self.latency_us;
        let f = |us: u64| format!("{:.2}", us as f64 / 1000.0);
        format!(
            "| {} | {} | {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
            self.info.scenario,
            self.info.target,
            self.info.connections,
            self.info.rate.map_or("closed".into(), |r| format!("{r}")),
            self.req_per_s,
            self.bytes_per_s / 1e6,
            f(l.p50),
            f(l.p99),
            f(l.p999),
            f(l.max),
            self.errors
        )
    }
}

/// Microseconds as milliseconds with sensible precision.
pub fn ms(us: u64) -> String {
    match us {
        0..=9_999 => format!("{:.2}ms", us as f64 / 1000.0),
        10_000..=999_999 => format!("{:.1}ms", us as f64 / 1000.0),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            scenario: "narinfo-hit",
            target: "http://127.0.0.1:1".into(),
            connections: 4,
            threads: 2,
            rate: None,
        }
    }

    #[test]
    fn merged_stats_give_counts_rates_and_percentiles() {
        let (mut a, mut b) = (Stats::default(), Stats::default());
        for i in 1..=100u64 {
            a.response(Duration::from_micros(i * 10), 200, 1000, None);
        }
        b.response(
            Duration::from_millis(50),
            503,
            10,
            ErrorKind::of_status(503, false),
        );
        b.failure(ErrorKind::Timeout);
        a.merge(&b);
        let r = Report::new(info(), &a, Duration::from_secs(2));
        assert_eq!(r.requests, 102);
        assert_eq!(r.req_per_s, 51.0);
        assert_eq!(r.bytes, 100_010);
        assert_eq!(r.errors, 2);
        assert_eq!(r.errors_by_kind["timeout"], 1);
        assert_eq!(r.errors_by_kind["http_5xx"], 1);
        assert_eq!(r.statuses["200"], 100);
        assert_eq!(r.statuses["503"], 1);
        // Three significant figures: within 0.1 %.
        // 101 latencies: 10, 20, ..., 1000 µs and 50 ms; the 51st is 510 µs.
        assert!(
            (509..=511).contains(&r.latency_us.p50),
            "{:?}",
            r.latency_us
        );
        assert!(r.latency_us.max >= 49_900, "{:?}", r.latency_us);
        assert_eq!(r.mode, "closed");
        let text = r.render_text();
        assert!(text.contains("102 in 2.00s = 51 req/s"), "{text}");
        assert!(text.contains("timeout: 1"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "narinfo-hit");
        assert_eq!(json["latency_us"]["p999"], r.latency_us.p999);
        let row = r.markdown_row();
        assert!(
            row.starts_with("| narinfo-hit |") && row.ends_with("| 2 |"),
            "{row}"
        );
        assert_eq!(
            row.matches('|').count(),
            Report::MARKDOWN_HEADER
                .lines()
                .next()
                .unwrap()
                .matches('|')
                .count()
        );
    }

    #[test]
    fn empty_run_and_status_classes() {
        let r = Report::new(info(), &Stats::default(), Duration::ZERO);
        assert_eq!((r.requests, r.errors, r.latency_us.max), (0, 0, 0));
        assert_eq!(ErrorKind::of_status(404, true), None);
        assert_eq!(ErrorKind::of_status(404, false), Some(ErrorKind::Http4xx));
        assert_eq!(ErrorKind::of_status(200, false), None);
        assert_eq!(ErrorKind::of_status(302, true), None);
        assert_eq!(ms(1_500), "1.50ms");
        assert_eq!(ms(2_500_000), "2.50s");
        assert_eq!(human_bytes(2048.0), "2.0 KiB");
    }
}
