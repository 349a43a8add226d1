//! Overload: a burst of unique narinfo misses far beyond
//! `cache.mass_query.max_concurrent_races`, against an upstream that takes
//! its time to say 404, through the real `ncro` binary.
//!
//! What must hold: route-cache hits keep answering from memory at once
//! (they never wait for a race permit); excess misses are shed with
//! `503` and `Retry-After`, most of them at once and the rest after at most
//! `timeouts.race_deadline`; the upstream sees a bounded number of
//! requests; ncro's memory stays bounded; `ncro_narinfo_shed_total` counts
//! every 503. Bounds are loose multiples (shared 2-core CI machines): they
//! tell "answered from memory" (milliseconds) from "waited for the slow
//! upstream" (1.5 s), not speed. `ncro bench` measures the real numbers
//! (docs/benchmarks.md, "Overload").

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::fake::{random_hash, FakeUpstream, TestKey, TestPath};
use crate::harness::{http_get, HttpConn};
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};

const WORKERS: usize = 2;
const MAX_RACES: usize = 4;
/// How long the upstream takes to answer a miss during the burst.
const SLOW: Duration = Duration::from_millis(1500);
const RACE_DEADLINE: Duration = Duration::from_secs(3);
const BURST: usize = 300;

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Latencies of `n` sequential hits over one keep-alive connection, sorted.
fn hit_latencies(addr: SocketAddr, hits: &[TestPath], n: usize) -> Vec<Duration> {
    let mut conn = HttpConn::connect(addr).expect("connect");
    let mut out: Vec<Duration> = (0..n)
        .map(|i| {
            let t = Instant::now();
            let r = conn
                .get(&hits[i % hits.len()].narinfo_request_path())
                .expect("hit");
            assert_eq!(r.status, 200, "a hit must be served: {}", r.text());
            t.elapsed()
        })
        .collect();
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One unique miss per client, all released at once.
fn burst(addr: SocketAddr, clients: usize) -> Vec<(u16, Option<String>, Duration)> {
    let start = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                let path = format!("/{}.narinfo", random_hash());
                start.wait();
                let t = Instant::now();
                let r = http_get(addr, &path).expect("every miss is answered");
                let retry = r.header("retry-after").map(String::from);
                (r.status, retry, t.elapsed())
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect()
}

#[test]
fn a_miss_burst_is_shed_while_hits_stay_fast_and_memory_bounded() {
    let key = TestKey::generate("overload");
    let hits: Vec<TestPath> = (0..20)
        .map(|i| TestPath::new(&format!("hot-{i}")))
        .collect();
    let mut b = FakeUpstream::builder();
    for p in &hits {
        b = b.path(p, &key);
    }
    let up = b.start();
    let db = db_dir();
    let mut mass_query = toml::Table::new();
    mass_query.insert("max_concurrent_races".into(), (MAX_RACES as i64).into());
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &key)], &db.path().join("routes.db"))
        .set("server", "workers", WORKERS as i64)
        .set("timeouts", "race_deadline", "3s")
        .set("cache", "mass_query", mass_query)
        .start();
    let addr = ncro.addr();
    // Learn the routes, then measure hits before the burst.
    hit_latencies(addr, &hits, hits.len());
    let quiet = hit_latencies(addr, &hits, 200);
    let rss_before = rss_kib(ncro.pid());
    up.set_latency(SLOW);
    let asked_before = up.requests().len();

    // Hits and RSS samples while the burst runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let (done, peak, pid) = (done.clone(), peak.clone(), ncro.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let burst_thread = std::thread::spawn(move || {
        let t = Instant::now();
        (burst(addr, BURST), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200)); // let the burst land first
    let loaded = hit_latencies(addr, &hits, 200);
    let (results, burst_took) = burst_thread.join().expect("burst");
    done.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    let rss_peak = peak.load(Ordering::SeqCst);
    let rss_after = rss_kib(ncro.pid());

    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    let raced = results.len() - shed.len();
    let at_once = shed.iter().filter(|r| r.2 < Duration::from_secs(1)).count();
    eprintln!(
        "hits p50/p99: {:?}/{:?} quiet, {:?}/{:?} under the burst; {} shed ({at_once} within 1 s), \
         {raced} raced, burst over in {burst_took:?}; RSS {rss_before} -> peak {rss_peak} -> {rss_after} KiB",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        pct(&loaded, 0.5),
        pct(&loaded, 0.99),
        shed.len(),
    );

    // Hits never wait for the slow upstream.
    assert!(
        pct(&loaded, 0.99) < Duration::from_millis(300),
        "hit p99 {:?} under the burst",
        pct(&loaded, 0.99)
    );
    // Misses: 404 for the few that got a race, 503 + Retry-After for the rest.
    assert!(
        results.iter().all(|r| r.0 == 404 || r.0 == 503),
        "{results:?}"
    );
    for (_, retry, took) in &shed {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(*took < RACE_DEADLINE + Duration::from_secs(2), "{took:?}");
    }
    // At most every permit and every queue slot, twice over (a race takes
    // SLOW, a queued request waits at most RACE_DEADLINE = 2 * SLOW).
    let bound = 2 * (MAX_RACES + WORKERS * MAX_RACES);
    assert!((1..=bound).contains(&raced), "{raced} raced, bound {bound}");
    assert!(at_once >= BURST - 2 * bound, "only {at_once} shed at once");
    assert!(burst_took < SLOW * 2 + RACE_DEADLINE + Duration::from_secs(3));
    let asked = up.requests().len() - asked_before;
    assert!(asked <= bound, "the upstream saw {asked} requests");
    // Memory: a few hundred connections and shed answers, not a pile-up.
    assert!(
        rss_peak < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_peak} KiB"
    );
    let m = scrape(&ncro);
    let counted = m.value("ncro_narinfo_shed_total", &[("reason", "queue_full")])
        + m.value("ncro_narinfo_shed_total", &[("reason", "wait_timeout")]);
    assert_eq!(counted, shed.len() as f64, "{}", m.text);
    // And once the burst is over, misses race again.
    up.set_latency(Duration::ZERO);
    let r = ncro.get(&format!("/{}.narinfo", random_hash()));
    assert_eq!(r.status, 404, "{}", ncro.logs());
}
