//! Metrics. Each worker owns a [`WorkerMetrics`] slot and is its only
//! writer, so counters are bumped with a plain load + store (no locked
//! read-modify-write, no shared cache line); `/metrics` merges the slots at
//! scrape time into prometheus families and renders the text format.
//!
//! Labels are bounded: upstream labels come from the configured upstream
//! set, outcome labels from fixed lists, never from request data.
//!
//! docs/metrics.md lists every family; `tests/it/metrics.rs` checks exact
//! values after known traffic.

pub mod access;
mod collect;
mod health;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use collect::Gauges;
pub use health::{HealthSample, HealthSource, HealthState};

/// A counter with a single writer thread and any number of readers.
#[derive(Default)]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    /// Only the owning worker calls this; readers may see a value that is
    /// one increment old, which is fine for monitoring.
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Bucket bounds (seconds) from 100 µs cache hits to multi-second misses.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// ncro 2.2's (prometheus default) buckets, kept where dashboards use them.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upstream answers per race.
pub const COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

/// A single-writer histogram: non-cumulative bucket counts plus the sum in
/// nanoseconds (integer, so it needs no float atomics).
pub struct LocalHistogram {
    bounds: &'static [f64],
    counts: Box<[LocalCounter]>,
    sum_nanos: LocalCounter,
}

impl LocalHistogram {
    pub fn new(bounds: &'static [f64]) -> LocalHistogram {
        LocalHistogram {
            bounds,
            counts: (0..=bounds.len())
                .map(|_| LocalCounter::default())
                .collect(),
            sum_nanos: LocalCounter::default(),
        }
    }

    #[inline]
    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].inc();
        self.sum_nanos.add((v.max(0.0) * 1e9) as u64);
    }

    #[inline]
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64())
    }
}

/// Every outcome an upstream request can have, as metric labels.
pub const OUTCOMES: &[&str] = &[
    "accepted",
    "not_found",
    "bad_signature",
    "wrong_store_path",
    "filtered",
    "malformed",
    "dns",
    "connect",
    "tls",
    "timeout",
    "reset",
    "status_5xx",
    "status_other",
    "protocol",
    "too_large",
    "other",
];

/// Index of `label` in [`OUTCOMES`]; a label missing from the list (a new
/// race outcome nobody added here) is counted as `other` rather than lost.
pub fn outcome_index(label: &str) -> usize {
    OUTCOMES
        .iter()
        .position(|&o| o == label)
        .unwrap_or(OUTCOMES.len() - 1)
}

/// Per-upstream counters of one worker.
pub struct UpstreamMetrics {
    pub race_wins: LocalCounter,
    pub outcomes: Box<[LocalCounter]>,
    /// Latency of this upstream's accepted answers (ncro 2.2's
    /// `ncro_upstream_latency_seconds`, default buckets).
    pub win_latency: LocalHistogram,
    pub nar_bytes: LocalCounter,
}

impl Default for UpstreamMetrics {
    fn default() -> Self {
        UpstreamMetrics {
            race_wins: LocalCounter::default(),
            outcomes: (0..OUTCOMES.len())
                .map(|_| LocalCounter::default())
                .collect(),
            win_latency: LocalHistogram::new(DEFAULT_BUCKETS),
            nar_bytes: LocalCounter::default(),
        }
    }
}

/// How a race ended, for `ncro_narinfo_upstream_attempts_per_resolve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveResult {
    Success = 0,
    NotFound = 1,
    Unavailable = 2,
}

pub const RESOLVE_RESULTS: [&str; 3] = ["success", "not_found", "unavailable"];

/// How a NAR request ended, for `ncro_nar_request_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NarOutcome {
    /// The whole body (or the HEAD/304 answer) reached the client.
    Ok = 0,
    /// No upstream served it, the relay was cut short, or the client left.
    Error = 1,
}

pub const NAR_OUTCOMES: [&str; 2] = ["ok", "error"];

/// Why a race was refused (load shedding), for `ncro_narinfo_shed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// The worker's queue of requests waiting for a race permit was full.
    QueueFull = 0,
    /// No permit came free within the wait limit (`timeouts.race_deadline`).
    WaitTimeout = 1,
}

pub const SHED_REASONS: [&str; 2] = ["queue_full", "wait_timeout"];

/// Counters owned by one worker. Aligned so that two workers' slots never
/// share a cache line (the hot counters sit at the start of the struct).
#[repr(align(128))]
pub struct WorkerMetrics {
    pub connections_total: LocalCounter,
    pub connections_closed: LocalCounter,
    pub requests_total: LocalCounter,
    pub cache_info_requests: LocalCounter,
    pub narinfo_ok: LocalCounter,
    pub narinfo_error: LocalCounter,
    pub nar_requests: LocalCounter,
    pub bad_requests: LocalCounter,
    pub narinfo_cache_hits: LocalCounter,
    pub narinfo_cache_misses: LocalCounter,
    pub narinfo_negative_hits: LocalCounter,
    pub singleflight_waiters: LocalCounter,
    pub upstream_attempts: LocalCounter,
    pub bad_signatures: LocalCounter,
    pub nar_bytes: LocalCounter,
    pub nar_errors: LocalCounter,
    pub races: LocalCounter,
    /// Races refused by the mass-query limits, by [`ShedReason`].
    pub shed: [LocalCounter; 2],
    /// Time from the start of a race to its outcome.
    pub race_latency: LocalHistogram,
    pub attempts_per_resolve: [LocalHistogram; 3],
    /// Wait for a global race permit (filled by the mass-query limits).
    pub race_wait: LocalHistogram,
    /// NAR request duration by [`NarOutcome`].
    pub nar_duration: [LocalHistogram; 2],
    pub upstreams: Box<[UpstreamMetrics]>,
}

impl WorkerMetrics {
    pub fn new(upstreams: usize) -> WorkerMetrics {
        WorkerMetrics {
            connections_total: Default::default(),
            connections_closed: Default::default(),
            requests_total: Default::default(),
            cache_info_requests: Default::default(),
            narinfo_ok: Default::default(),
            narinfo_error: Default::default(),
            nar_requests: Default::default(),
            bad_requests: Default::default(),
            narinfo_cache_hits: Default::default(),
            narinfo_cache_misses: Default::default(),
            narinfo_negative_hits: Default::default(),
            singleflight_waiters: Default::default(),
            upstream_attempts: Default::default(),
            bad_signatures: Default::default(),
            nar_bytes: Default::default(),
            nar_errors: Default::default(),
            races: Default::default(),
            shed: Default::default(),
            race_latency: LocalHistogram::new(LATENCY_BUCKETS),
            attempts_per_resolve: [0, 1, 2].map(|_| LocalHistogram::new(COUNT_BUCKETS)),
            race_wait: LocalHistogram::new(DEFAULT_BUCKETS),
            nar_duration: [0, 1].map(|_| LocalHistogram::new(LATENCY_BUCKETS)),
            upstreams: (0..upstreams).map(|_| UpstreamMetrics::default()).collect(),
        }
    }

    /// Records one finished upstream attempt of a race.
    #[inline]
    pub fn attempt(&self, upstream: usize, outcome: &str) {
        self.upstream_attempts.inc();
        if let Some(u) = self.upstreams.get(upstream) {
            u.outcomes[outcome_index(outcome)].inc();
        }
    }

    /// Records a finished NAR request (errors also count in `nar_errors`).
    pub fn nar_finished(&self, outcome: NarOutcome, elapsed: Duration) {
        if outcome == NarOutcome::Error {
            self.nar_errors.inc();
        }
        self.nar_duration[outcome as usize].observe_duration(elapsed);
    }
}

/// All workers' slots plus the cross-thread gauges; read at scrape time.
pub struct Metrics {
    pub workers: Vec<Arc<WorkerMetrics>>,
    /// "io_uring" or "epoll" per worker, set once each worker started.
    pub drivers: Vec<std::sync::OnceLock<&'static str>>,
    /// Upstream label values, by the index the workers use.
    pub upstream_urls: Vec<Arc<str>>,
    pub gauges: std::sync::OnceLock<Gauges>,
    /// Installed once by the health work; until then every upstream's state
    /// is reported as `unknown`.
    pub health: std::sync::OnceLock<HealthSource>,
}

impl Metrics {
    pub fn new(workers: usize, upstream_urls: Vec<Arc<str>>) -> Metrics {
        Metrics {
            workers: (0..workers)
                .map(|_| Arc::new(WorkerMetrics::new(upstream_urls.len())))
                .collect(),
            drivers: (0..workers).map(|_| std::sync::OnceLock::new()).collect(),
            upstream_urls,
            gauges: std::sync::OnceLock::new(),
            health: std::sync::OnceLock::new(),
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut families = collect::families(self);
        // The encoder rejects a family without samples (and stops there): a
        // per-upstream family is empty when every upstream is S3 (skipped).
        families.retain(|f| !f.get_metric().is_empty());
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
            return format!("# metrics encoding failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
