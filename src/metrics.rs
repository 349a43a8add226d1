//! Metrics. Each worker owns a [`WorkerMetrics`] slot and is its only
//! writer, so counters are bumped with a plain load + store (no locked
//! read-modify-write, no shared cache line); `/metrics` merges the slots at
//! scrape time into prometheus families and renders the text format.
//!
//! Labels are bounded: upstream labels come from the upstream set
//! (configured, plus at most `discovery.max_upstreams` discovered ones),
//! outcome labels from fixed lists, never from request data.
//!
//! docs/metrics.md lists every family; `tests/it/metrics.rs` checks exact
//! values after known traffic.

pub mod access;
mod collect;
mod family;
mod health;
pub mod hedge;
mod index;
mod lifecycle;
mod mesh;
pub mod ranged;
pub mod tiers;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use collect::Gauges;
pub use health::{HealthSample, HealthSource, HealthState};
pub use mesh::MeshCounters;

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
    "auth",
    "request",
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
    /// narinfo requests not sent: a fresh index summary ruled the path out.
    pub index_skips: LocalCounter,
    /// 404s from this upstream while its fresh summary said "maybe".
    pub index_false_positives: LocalCounter,
    /// NAR hedging and stream limits ([`hedge`]).
    pub nar: hedge::NarUpstreamCounters,
    /// Race tiers led by this upstream (first in the tier's order) that
    /// some member answered 200, and whose every member answered a
    /// definite miss: the control thread's per-tier statistics
    /// (`control::tiers`).
    pub tier_found: LocalCounter,
    pub tier_missed: LocalCounter,
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
            index_skips: LocalCounter::default(),
            index_false_positives: LocalCounter::default(),
            tier_found: LocalCounter::default(),
            tier_missed: LocalCounter::default(),
            nar: Default::default(),
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

/// Endpoints counted in `ncro_endpoint_requests_total` (the binary-cache
/// side paths and the batch narinfo endpoint; docs/endpoints.md).
pub const ENDPOINTS: [&str; 6] = [
    "log",
    "ls",
    "realisation",
    "build_trace",
    "debuginfo",
    "get_narinfos",
];

/// How a request to one of [`ENDPOINTS`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointResult {
    /// An answer was relayed (2xx, or a redirect to where the file is).
    Ok = 0,
    /// 404: every upstream asked said not found.
    NotFound = 1,
    /// 400, 405 or 413: refused without asking any upstream.
    BadRequest = 2,
    /// 502, 503 or 504, or a relay cut short.
    Error = 3,
}

pub const ENDPOINT_RESULTS: [&str; 4] = ["ok", "not_found", "bad_request", "error"];

/// What a batch narinfo request learned per store hash, for
/// `ncro_narinfo_batch_paths_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPath {
    Found = 0,
    /// A definite miss: left out of the answer.
    Absent = 1,
    /// No definite answer; the whole batch failed.
    Failed = 2,
}

pub const BATCH_PATH_RESULTS: [&str; 3] = ["found", "absent", "failed"];

/// How a mid-stream NAR failover ended, for `ncro_nar_failovers_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverResult {
    /// Another upstream finished the body.
    Completed = 0,
    /// No other upstream answered the Range request with a 2xx.
    NoAlternative = 1,
    /// Some answered, none proved the same object of the same size.
    Mismatch = 2,
    /// One was spliced in and failed too; none finished.
    Failed = 3,
}

pub const FAILOVER_RESULTS: [&str; 4] = ["completed", "no_alternative", "mismatch", "failed"];

/// What an early-started narinfo request turned out to be, for
/// `ncro_narinfo_early_starts_total` (docs/routing.md, "Early starts"):
/// `useful` (the tier above missed, so sequential order would have sent it
/// too), `wasted` (the tier above had the path: an extra request),
/// `unknown` (the tier above failed or timed out).
pub const EARLY_START_RESULTS: [&str; 3] = ["useful", "wasted", "unknown"];

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
    /// Connections over `server.max_connections`, answered 503.
    pub connections_rejected: LocalCounter,
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
    /// By [`ENDPOINTS`] index, then [`EndpointResult`].
    pub endpoint_requests: [[LocalCounter; 4]; 6],
    /// Store hashes asked in batch requests, by [`BatchPath`].
    pub batch_paths: [LocalCounter; 3],
    /// Mid-stream NAR failovers, by [`FailoverResult`].
    pub nar_failovers: [LocalCounter; 4],
    /// Early-started narinfo requests, by [`EARLY_START_RESULTS`].
    pub early_starts: [LocalCounter; 3],
    /// Waits for a NAR stream permit, by [`hedge::LimitWait`].
    pub nar_limit_waits: [LocalCounter; 2],
    pub nar_ranged: ranged::RangedCounters,
    /// Idle upstream connections the worker's client discarded at checkout.
    pub pool_discards: Arc<crate::http::client::PoolDiscards>,
    pub upstreams: Box<[UpstreamMetrics]>,
}

impl WorkerMetrics {
    pub fn new(upstreams: usize) -> WorkerMetrics {
        WorkerMetrics {
            connections_total: Default::default(),
            connections_closed: Default::default(),
            connections_rejected: Default::default(),
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
            endpoint_requests: Default::default(),
            batch_paths: Default::default(),
            nar_failovers: Default::default(),
            early_starts: Default::default(),
            nar_limit_waits: Default::default(),
            nar_ranged: Default::default(),
            pool_discards: Arc::default(),
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

    /// Records a finished request to one of [`ENDPOINTS`]; an unknown name
    /// (a new endpoint nobody added to the list) is not counted.
    pub fn endpoint_finished(&self, endpoint: &str, result: EndpointResult) {
        if let Some(i) = ENDPOINTS.iter().position(|&e| e == endpoint) {
            self.endpoint_requests[i][result as usize].inc();
        }
    }

    /// Records how a mid-stream NAR failover ended.
    pub fn nar_failed_over(&self, result: FailoverResult) {
        self.nar_failovers[result as usize].inc();
    }

    /// Records a finished NAR request (errors also count in `nar_errors`).
    pub fn nar_finished(&self, outcome: NarOutcome, elapsed: Duration) {
        if outcome == NarOutcome::Error {
            self.nar_errors.inc();
        }
        self.nar_duration[outcome as usize].observe_duration(elapsed);
    }
}

/// The upstreams a scrape reports.
pub struct UpstreamSlots {
    /// `(slot, url)` of every upstream currently routed to.
    pub live: Vec<(usize, Arc<str>)>,
    /// How many of them were discovered (`ncro_discovery_upstreams`).
    pub discovered: usize,
}

/// Called at scrape time; must not block.
pub type UpstreamSource = Box<dyn Fn() -> UpstreamSlots + Send + Sync>;

/// All workers' slots plus the cross-thread gauges; read at scrape time.
pub struct Metrics {
    pub workers: Vec<Arc<WorkerMetrics>>,
    /// "io_uring" or "epoll" per worker, set once each worker started.
    pub drivers: Vec<std::sync::OnceLock<&'static str>>,
    /// Upstream label values, by the index the workers use: the set at
    /// start. [`Self::upstream_source`], once installed, takes over.
    pub upstream_urls: Vec<Arc<str>>,
    /// The live upstream slots at scrape time (the set changes when
    /// discovery adds or retires upstreams); installed once at start.
    pub upstream_source: std::sync::OnceLock<UpstreamSource>,
    pub gauges: std::sync::OnceLock<Gauges>,
    /// Installed once by the health work; until then every upstream's state
    /// is reported as `unknown`.
    pub health: std::sync::OnceLock<HealthSource>,
    /// Written by the mesh gossip task only; zeros when the mesh is off.
    pub mesh: Arc<MeshCounters>,
    /// Index summaries and ncro's published filter (set once, at start).
    pub index: std::sync::OnceLock<Arc<crate::index::IndexState>>,
    /// When the metrics (so the process's serving state) were created:
    /// `/status`'s `uptime_secs`.
    pub started: std::time::Instant,
    /// The process's shutdown phase; the main thread moves it on SIGTERM,
    /// `/health` and scrapes read it.
    pub phase: Arc<crate::signals::Phase>,
    /// Per-tier statistics and armed early starts, written by the control
    /// thread's `control::tiers` job.
    pub tiers: tiers::TierGauges,
}

impl Metrics {
    pub fn new(workers: usize, upstream_urls: Vec<Arc<str>>) -> Metrics {
        let slots = upstream_urls.len();
        Metrics::with_slots(workers, upstream_urls, slots)
    }

    /// Per-upstream counters for `slots` upstreams (at least the
    /// `upstream_urls`): room for the discovered ones, which cannot be
    /// added to a worker's slot later.
    pub fn with_slots(workers: usize, upstream_urls: Vec<Arc<str>>, slots: usize) -> Metrics {
        let slots = slots.max(upstream_urls.len());
        Metrics {
            workers: (0..workers)
                .map(|_| Arc::new(WorkerMetrics::new(slots)))
                .collect(),
            drivers: (0..workers).map(|_| std::sync::OnceLock::new()).collect(),
            upstream_urls,
            upstream_source: std::sync::OnceLock::new(),
            gauges: std::sync::OnceLock::new(),
            health: std::sync::OnceLock::new(),
            mesh: Arc::default(),
            index: std::sync::OnceLock::new(),
            started: std::time::Instant::now(),
            phase: Arc::default(),
            tiers: Default::default(),
        }
    }

    /// The upstreams to report now.
    pub fn upstream_slots(&self) -> UpstreamSlots {
        match self.upstream_source.get() {
            Some(source) => source(),
            None => UpstreamSlots {
                live: self.upstream_urls.iter().cloned().enumerate().collect(),
                discovered: 0,
            },
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut families = collect::families(self);
        // The encoder rejects a family without samples (and stops there): a
        // per-upstream family is empty when no upstream is configured.
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
