//! Metrics. Each worker owns a [`WorkerMetrics`] slot and is its only
//! writer, so counters are bumped with a plain load + store (no locked
//! read-modify-write, no shared cache line); `/metrics` sums the slots at
//! scrape time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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

/// Counters owned by one worker.
#[derive(Default)]
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
}

/// All workers' slots; cloned into the scrape handler.
pub struct Metrics {
    pub workers: Vec<Arc<WorkerMetrics>>,
    /// "io_uring" or "epoll" per worker, filled once each worker started.
    pub drivers: Vec<std::sync::OnceLock<&'static str>>,
}

impl Metrics {
    pub fn new(workers: usize) -> Metrics {
        Metrics {
            workers: (0..workers)
                .map(|_| Arc::new(WorkerMetrics::default()))
                .collect(),
            drivers: (0..workers).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    fn sum(&self, f: impl Fn(&WorkerMetrics) -> &LocalCounter) -> u64 {
        self.workers.iter().map(|w| f(w).get()).sum()
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "ncro_narinfo_requests_total",
            "narinfo requests by outcome (200 or error).",
            &[
                ("{status=\"200\"}", self.sum(|w| &w.narinfo_ok)),
                ("{status=\"error\"}", self.sum(|w| &w.narinfo_error)),
            ],
        );
        counter(
            "ncro_nar_requests_total",
            "NAR requests.",
            &[("", self.sum(|w| &w.nar_requests))],
        );
        counter(
            "ncro_http_requests_total",
            "HTTP requests parsed, all endpoints.",
            &[("", self.sum(|w| &w.requests_total))],
        );
        counter(
            "ncro_http_bad_requests_total",
            "Requests answered 400, 405 or 431.",
            &[("", self.sum(|w| &w.bad_requests))],
        );
        let per_worker: Vec<(String, u64)> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("{{worker=\"{i}\"}}"), w.connections_total.get()))
            .collect();
        let refs: Vec<(&str, u64)> = per_worker.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(
            "ncro_worker_connections_total",
            "Client connections accepted per worker.",
            &refs,
        );
        let _ = writeln!(out, "# HELP ncro_worker_connections_open Client connections open per worker.\n# TYPE ncro_worker_connections_open gauge");
        for (i, w) in self.workers.iter().enumerate() {
            let open = w
                .connections_total
                .get()
                .saturating_sub(w.connections_closed.get());
            let _ = writeln!(out, "ncro_worker_connections_open{{worker=\"{i}\"}} {open}");
        }
        let _ = writeln!(out, "# HELP ncro_worker_driver_info I/O driver of each worker.\n# TYPE ncro_worker_driver_info gauge");
        for (i, d) in self.drivers.iter().enumerate() {
            let _ = writeln!(
                out,
                "ncro_worker_driver_info{{worker=\"{i}\",driver=\"{}\"}} 1",
                d.get().copied().unwrap_or("starting")
            );
        }
        out
    }
}
