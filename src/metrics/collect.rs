//! Scrape-time merge of the per-worker slots into prometheus families.
//! COLD: runs once per scrape, allocates freely.

use std::sync::Arc;

use prometheus::proto::{Bucket, Histogram, Metric, MetricFamily, MetricType};

use super::family::{counter_metric, family, gauge_metric, labels};
use super::{
    LocalCounter, LocalHistogram, Metrics, WorkerMetrics, BATCH_PATH_RESULTS, ENDPOINTS,
    ENDPOINT_RESULTS, FAILOVER_RESULTS, NAR_OUTCOMES, OUTCOMES, RESOLVE_RESULTS, SHED_REASONS,
};
use crate::http::client::PoolDiscards;
use crate::route::RouteTable;

/// Cross-thread state sampled at scrape time.
pub struct Gauges {
    pub routes: Arc<RouteTable>,
}

/// Sums one histogram over all workers into a cumulative prometheus one.
fn histogram_metric<'a>(
    pairs: &[(&str, &str)],
    parts: impl Iterator<Item = &'a LocalHistogram>,
) -> Metric {
    let mut bounds: &[f64] = &[];
    let mut counts: Vec<u64> = Vec::new();
    let mut sum_nanos = 0u64;
    for h in parts {
        bounds = h.bounds;
        counts.resize(h.counts.len(), 0);
        for (c, l) in counts.iter_mut().zip(h.counts.iter()) {
            *c += l.get();
        }
        sum_nanos += h.sum_nanos.get();
    }
    let mut cumulative = 0u64;
    let mut buckets = Vec::with_capacity(bounds.len());
    for (i, &b) in bounds.iter().enumerate() {
        cumulative += counts.get(i).copied().unwrap_or(0);
        let mut bucket = Bucket::default();
        bucket.set_upper_bound(b);
        bucket.set_cumulative_count(cumulative);
        buckets.push(bucket);
    }
    let total = cumulative + counts.get(bounds.len()).copied().unwrap_or(0);
    let mut h = Histogram::default();
    h.set_sample_count(total);
    h.set_sample_sum(sum_nanos as f64 / 1e9);
    h.set_bucket(buckets);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

struct Builder<'a> {
    m: &'a Metrics,
    out: Vec<MetricFamily>,
}

impl Builder<'_> {
    fn sum(&self, f: impl Fn(&WorkerMetrics) -> &LocalCounter) -> u64 {
        self.m.workers.iter().map(|w| f(w).get()).sum()
    }

    fn counter(&mut self, name: &str, help: &str, f: impl Fn(&WorkerMetrics) -> &LocalCounter) {
        let v = self.sum(f);
        self.out.push(family(
            name,
            help,
            MetricType::COUNTER,
            vec![counter_metric(&[], v)],
        ));
    }

    fn histogram(&mut self, name: &str, help: &str, metrics: Vec<Metric>) {
        self.out
            .push(family(name, help, MetricType::HISTOGRAM, metrics));
    }
}

pub fn families(m: &Metrics) -> Vec<MetricFamily> {
    let mut b = Builder {
        m,
        out: Vec::with_capacity(40),
    };
    ncro22_families(&mut b);
    upstream_families(&mut b);
    worker_families(&mut b);
    state_families(&mut b);
    endpoint_families(&mut b);
    b.out.extend(super::health::families(m));
    b.out.extend(super::mesh::families(m));
    b.out.extend(super::index::families(m));
    b.out.extend(super::hedge::families(m));
    b.out.extend(super::ranged::families(m));
    b.out.extend(super::lifecycle::families(m));
    b.out.extend(super::tiers::families(m));
    b.out
}

/// Every metric ncro 2.2 exported, same names, types and labels.
fn ncro22_families(b: &mut Builder) {
    b.counter(
        "ncro_narinfo_cache_hits_total",
        "narinfo requests answered from the route cache.",
        |w| &w.narinfo_cache_hits,
    );
    b.counter(
        "ncro_narinfo_cache_misses_total",
        "narinfo requests that found no route and joined or started a race.",
        |w| &w.narinfo_cache_misses,
    );
    b.counter(
        "ncro_narinfo_memory_negative_hits_total",
        "narinfo requests answered 404 from a negative entry.",
        |w| &w.narinfo_negative_hits,
    );
    b.counter(
        "ncro_narinfo_singleflight_waiters_total",
        "narinfo requests that joined an in-flight race for the same hash.",
        |w| &w.singleflight_waiters,
    );
    let (ok, err) = (b.sum(|w| &w.narinfo_ok), b.sum(|w| &w.narinfo_error));
    b.out.push(family(
        "ncro_narinfo_requests_total",
        "narinfo requests by outcome (200, or error for anything else).",
        MetricType::COUNTER,
        vec![
            counter_metric(&[("status", "200")], ok),
            counter_metric(&[("status", "error")], err),
        ],
    ));
    b.counter("ncro_nar_requests_total", "NAR requests.", |w| {
        &w.nar_requests
    });
    b.counter(
        "ncro_narinfo_upstream_attempts_total",
        "Upstream narinfo answers received in races.",
        |w| &w.upstream_attempts,
    );
    let per_resolve = RESOLVE_RESULTS
        .iter()
        .enumerate()
        .map(|(i, r)| {
            histogram_metric(
                &[("result", r)],
                b.m.workers.iter().map(|w| &w.attempts_per_resolve[i]),
            )
        })
        .collect();
    b.histogram(
        "ncro_narinfo_upstream_attempts_per_resolve",
        "Upstream answers received per race, by race result.",
        per_resolve,
    );
    let wait = vec![histogram_metric(
        &[("kind", "global")],
        b.m.workers.iter().map(|w| &w.race_wait),
    )];
    b.histogram(
        "ncro_narinfo_race_wait_seconds",
        "Wait for a global race permit.",
        wait,
    );
    let urls = b.m.upstream_slots().live;
    let wins = urls
        .iter()
        .map(|&(i, ref u)| {
            counter_metric(
                &[("upstream", u)],
                b.m.workers
                    .iter()
                    .map(|w| w.upstreams[i].race_wins.get())
                    .sum(),
            )
        })
        .collect();
    b.out.push(family(
        "ncro_upstream_race_wins_total",
        "Races won by each upstream.",
        MetricType::COUNTER,
        wins,
    ));
    let lat = urls
        .iter()
        .map(|&(i, ref u)| {
            histogram_metric(
                &[("upstream", u)],
                b.m.workers.iter().map(|w| &w.upstreams[i].win_latency),
            )
        })
        .collect();
    b.histogram(
        "ncro_upstream_latency_seconds",
        "Latency of each upstream's winning narinfo answers.",
        lat,
    );
    let entries = b.m.gauges.get().map_or(0, |g| g.routes.len());
    b.out.push(family(
        "ncro_route_entries",
        "Routes and negative entries in the route cache (live).",
        MetricType::GAUGE,
        vec![gauge_metric(&[], entries as f64)],
    ));
}

fn upstream_families(b: &mut Builder) {
    let mut outcomes = Vec::new();
    let mut bytes = Vec::new();
    let slots = b.m.upstream_slots();
    for (i, u) in &slots.live {
        let (i, u) = (*i, &**u);
        for (k, o) in OUTCOMES.iter().enumerate() {
            let v =
                b.m.workers
                    .iter()
                    .map(|w| w.upstreams[i].outcomes[k].get())
                    .sum();
            outcomes.push(counter_metric(&[("upstream", u), ("outcome", o)], v));
        }
        let v =
            b.m.workers
                .iter()
                .map(|w| w.upstreams[i].nar_bytes.get())
                .sum();
        bytes.push(counter_metric(&[("upstream", u)], v));
    }
    b.out.push(family("ncro_upstream_requests_total", "Upstream narinfo requests in races by outcome (accepted, not_found, timeout, reset, status_5xx, bad_signature, ...).", MetricType::COUNTER, outcomes));
    b.out.push(family(
        "ncro_upstream_nar_bytes_total",
        "NAR body bytes relayed from each upstream.",
        MetricType::COUNTER,
        bytes,
    ));
    b.out.push(family(
        "ncro_discovery_upstreams",
        "Upstreams found by mDNS discovery and currently routed to.",
        MetricType::GAUGE,
        vec![gauge_metric(&[], slots.discovered as f64)],
    ));
    b.counter(
        "ncro_narinfo_races_total",
        "Races run (route-cache misses that were not joined).",
        |w| &w.races,
    );
    let shed = SHED_REASONS
        .iter()
        .enumerate()
        .map(|(i, reason)| counter_metric(&[("reason", reason)], b.sum(|w| &w.shed[i])))
        .collect();
    b.out.push(family(
        "ncro_narinfo_shed_total",
        "Races refused by the mass-query limits (answered 503, or a stale route).",
        MetricType::COUNTER,
        shed,
    ));
    b.counter(
        "ncro_narinfo_bad_signatures_total",
        "Upstream narinfos rejected for their signature.",
        |w| &w.bad_signatures,
    );
    let discards = PoolDiscards::REASONS
        .iter()
        .enumerate()
        .map(|(i, reason)| {
            let v =
                b.m.workers
                    .iter()
                    .map(|w| w.pool_discards.counts()[i])
                    .sum();
            counter_metric(&[("reason", reason)], v)
        })
        .collect();
    b.out.push(family(
        "ncro_upstream_pool_discards_total",
        "Idle upstream connections closed at checkout instead of reused: unsolicited bytes had arrived, or the upstream had closed it.",
        MetricType::COUNTER,
        discards,
    ));
    let race = vec![histogram_metric(
        &[],
        b.m.workers.iter().map(|w| &w.race_latency),
    )];
    b.histogram(
        "ncro_narinfo_race_duration_seconds",
        "Time from the start of a race to its result.",
        race,
    );
    b.counter(
        "ncro_nar_bytes_total",
        "NAR body bytes sent to clients.",
        |w| &w.nar_bytes,
    );
    b.counter(
        "ncro_nar_errors_total",
        "NAR requests that failed or were cut short.",
        |w| &w.nar_errors,
    );
    let dur = NAR_OUTCOMES
        .iter()
        .enumerate()
        .map(|(i, o)| {
            histogram_metric(
                &[("outcome", o)],
                b.m.workers.iter().map(|w| &w.nar_duration[i]),
            )
        })
        .collect();
    b.histogram(
        "ncro_nar_request_duration_seconds",
        "NAR request duration from request to last byte, by outcome.",
        dur,
    );
}

/// The binary-cache side paths and the batch narinfo endpoint.
fn endpoint_families(b: &mut Builder) {
    let mut requests = Vec::with_capacity(ENDPOINTS.len() * ENDPOINT_RESULTS.len());
    for (e, endpoint) in ENDPOINTS.iter().enumerate() {
        for (r, result) in ENDPOINT_RESULTS.iter().enumerate() {
            let v = b.sum(|w| &w.endpoint_requests[e][r]);
            requests.push(counter_metric(
                &[("endpoint", endpoint), ("result", result)],
                v,
            ));
        }
    }
    b.out.push(family(
        "ncro_endpoint_requests_total",
        "Requests to the binary-cache side paths and the batch narinfo endpoint, by result.",
        MetricType::COUNTER,
        requests,
    ));
    let paths = BATCH_PATH_RESULTS
        .iter()
        .enumerate()
        .map(|(i, r)| counter_metric(&[("result", r)], b.sum(|w| &w.batch_paths[i])))
        .collect();
    b.out.push(family(
        "ncro_narinfo_batch_paths_total",
        "Store hashes asked in batch narinfo requests, by what was learned.",
        MetricType::COUNTER,
        paths,
    ));
    let failovers = FAILOVER_RESULTS
        .iter()
        .enumerate()
        .map(|(i, r)| counter_metric(&[("result", r)], b.sum(|w| &w.nar_failovers[i])))
        .collect();
    b.out.push(family(
        "ncro_nar_failovers_total",
        "NAR bodies cut mid-stream whose rest was sought from another upstream, by result.",
        MetricType::COUNTER,
        failovers,
    ));
}

fn worker_families(b: &mut Builder) {
    b.counter(
        "ncro_http_requests_total",
        "HTTP requests parsed, all endpoints.",
        |w| &w.requests_total,
    );
    b.counter(
        "ncro_cache_info_requests_total",
        "/nix-cache-info requests.",
        |w| &w.cache_info_requests,
    );
    b.counter(
        "ncro_http_bad_requests_total",
        "Requests answered 400, 405 or 431.",
        |w| &w.bad_requests,
    );
    b.counter(
        "ncro_http_connections_rejected_total",
        "Connections over server.max_connections, answered 503 and closed.",
        |w| &w.connections_rejected,
    );
    let per = |f: &dyn Fn(&WorkerMetrics) -> f64, gauge: bool| -> Vec<Metric> {
        b.m.workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let idx = i.to_string();
                if gauge {
                    gauge_metric(&[("worker", &idx)], f(w))
                } else {
                    counter_metric(&[("worker", &idx)], f(w) as u64)
                }
            })
            .collect()
    };
    let total = per(&|w| w.connections_total.get() as f64, false);
    let open = per(
        &|w| {
            w.connections_total
                .get()
                .saturating_sub(w.connections_closed.get()) as f64
        },
        true,
    );
    let reqs = per(&|w| w.requests_total.get() as f64, false);
    let drivers =
        b.m.drivers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                gauge_metric(
                    &[
                        ("worker", &i.to_string()),
                        ("driver", d.get().copied().unwrap_or("starting")),
                    ],
                    1.0,
                )
            })
            .collect();
    b.out.push(family(
        "ncro_worker_connections_total",
        "Client connections accepted per worker.",
        MetricType::COUNTER,
        total,
    ));
    b.out.push(family(
        "ncro_worker_connections_open",
        "Client connections open per worker.",
        MetricType::GAUGE,
        open,
    ));
    b.out.push(family(
        "ncro_worker_requests_total",
        "HTTP requests per worker.",
        MetricType::COUNTER,
        reqs,
    ));
    b.out.push(family(
        "ncro_worker_driver_info",
        "I/O driver of each worker (io_uring or epoll).",
        MetricType::GAUGE,
        drivers,
    ));
}

fn state_families(b: &mut Builder) {
    let info = gauge_metric(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    b.out.push(family(
        "ncro_build_info",
        "ncro version.",
        MetricType::GAUGE,
        vec![info],
    ));
    let Some(g) = b.m.gauges.get() else { return };
    // Without a writer the database could not be opened at start: memory
    // only for the life of the process.
    let degraded = g.routes.writer().is_none_or(|w| w.is_degraded());
    b.out.push(family(
        "ncro_route_db_degraded",
        "1 while routes are not persisted (database not opened, or the last write failed).",
        MetricType::GAUGE,
        vec![gauge_metric(&[], f64::from(u8::from(degraded)))],
    ));
    let (routes, pins) = g.routes.nar_claims_refused();
    b.out.push(family(
        "ncro_route_nar_claims_refused_total",
        "NAR index writes refused because a live entry kept the NAR for another upstream, by source (route: a verified narinfo's URL; debuginfo: a debuginfo record's archive).",
        MetricType::COUNTER,
        vec![
            counter_metric(&[("source", "route")], routes),
            counter_metric(&[("source", "debuginfo")], pins),
        ],
    ));
    let Some(w) = g.routes.writer() else { return };
    let gauge = |name: &str, help: &str, v: u64| {
        family(
            name,
            help,
            MetricType::GAUGE,
            vec![gauge_metric(&[], v as f64)],
        )
    };
    let counter = |name: &str, help: &str, v: u64| {
        family(
            name,
            help,
            MetricType::COUNTER,
            vec![counter_metric(&[], v)],
        )
    };
    b.out.push(gauge(
        "ncro_route_writer_queue_depth",
        "Route writes queued for the SQLite writer thread.",
        w.queue_depth() as u64,
    ));
    b.out.push(counter(
        "ncro_route_writer_batches_total",
        "Transactions committed by the SQLite writer.",
        w.batches_written(),
    ));
    b.out.push(counter(
        "ncro_route_writer_rows_total",
        "Rows written by the SQLite writer.",
        w.rows_written(),
    ));
    b.out.push(counter(
        "ncro_route_writer_errors_total",
        "Failed SQLite writes (routing continues from memory).",
        w.write_errors(),
    ));
    b.out.push(counter(
        "ncro_route_writer_dropped_total",
        "Route writes dropped because the writer queue was full.",
        w.dropped_writes(),
    ));
    b.out.push(gauge(
        "ncro_route_db_rows",
        "Routes stored in the SQLite database.",
        w.stored_routes(),
    ));
    b.out.push(gauge(
        "ncro_route_narinfo_memory_bytes",
        "Memory held by cached narinfo bodies (bounded by cache.narinfo_memory_mb).",
        g.routes.body_bytes(),
    ));
    let (reads, misses) = g.routes.disk_reads();
    b.out.push(counter(
        "ncro_route_narinfo_disk_reads_total",
        "Route-cache hits whose narinfo was read back from the database.",
        reads,
    ));
    b.out.push(counter(
        "ncro_route_narinfo_disk_misses_total",
        "Route-cache hits whose narinfo could not be read back (raced instead).",
        misses,
    ));
}
