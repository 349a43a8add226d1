//! Health probing, latency-aware routing and the mass-query limits, end to
//! end: the real `ncro` binary in front of fake upstreams on loopback.
//!
//! Probe timings are shrunk (`probe_interval = "50ms"`) so that an upstream
//! reaches DOWN (3 failures at x1, then 7 at x4 backoff) in about 3 s.
//! Latency bounds are generous multiples of the fakes' delays: they tell
//! "the fast upstream answered" from "the hedge or the deadline fired",
//! not milliseconds.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake::{random_hash, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::server::eventually;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Longest wait for a health state change in these tests.
const STATE_WAIT: Duration = Duration::from_secs(30);

/// Config knobs that differ between tests.
struct Knobs {
    probe_interval: &'static str,
    probe_timeout: &'static str,
    hedge_after: &'static str,
    race_deadline: &'static str,
    cooldown: &'static str,
    max_races: u32,
    /// TOML appended to the last `[[upstreams]]` table (filters).
    last_upstream_extra: &'static str,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            probe_interval: "50ms",
            probe_timeout: "100ms",
            hedge_after: "1500ms",
            race_deadline: "3s",
            cooldown: "15s",
            max_races: 64,
            last_upstream_extra: "",
        }
    }
}

fn config(upstreams: &[(&str, i32)], db: &Path, k: &Knobs) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = String::from("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n\n");
    for (url, priority) in upstreams {
        out.push_str(&format!(
            "[[upstreams]]\nurl = {}\npriority = {priority}\n\n",
            q(url)
        ));
    }
    out.push_str(k.last_upstream_extra);
    out.push_str(&format!(
        "[cache]\ndb_path = {}\n\n[cache.mass_query]\nmax_concurrent_races = {}\n\
         upstream_cooldown = {}\n\n[timeouts]\nrace_deadline = {}\n\n\
         [health]\nenabled = true\nprobe_interval = {}\nprobe_timeout = {}\nhedge_after = {}\n\n\
         [logging]\nlevel = \"debug\"\nformat = \"text\"\n",
        q(&db.to_string_lossy()),
        k.max_races,
        q(k.cooldown),
        q(k.race_deadline),
        q(k.probe_interval),
        q(k.probe_timeout),
        q(k.hedge_after),
    ));
    out
}

fn health(ncro: &NcroProcess) -> Value {
    let r = ncro.get("/health");
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).expect("/health is JSON")
}

/// The `/health` entry of `url`.
fn entry(h: &Value, url: &str) -> Value {
    h["upstreams"]
        .as_array()
        .and_then(|list| list.iter().find(|u| u["url"] == url))
        .cloned()
        .unwrap_or_else(|| panic!("{url} not in /health: {h}"))
}

fn urls_in_order(h: &Value) -> Vec<String> {
    h["upstreams"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|u| u["url"].as_str())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn wait_state(ncro: &NcroProcess, url: &str, state: &str) {
    let reached = eventually(STATE_WAIT, || entry(&health(ncro), url)["status"] == state);
    assert!(reached, "{url} never became {state}: {}", health(ncro));
}

fn narinfo_requests(up: &FakeUpstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count()
}

/// GET `path`, returning the status and how long the answer took.
fn timed_get(ncro: &NcroProcess, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = ncro.get(path);
    (r.status, t.elapsed())
}

/// A fake that never answers anything (probes included).
fn hanging() -> FakeUpstream {
    FakeUpstream::builder()
        .rule(PathMatch::Any, Fault::Hang)
        .start()
}

/// A fake serving `paths`, every answer (probes included) after `latency`.
fn serving(paths: &[&TestPath], latency: Duration) -> FakeUpstream {
    with_paths(FakeUpstream::builder().latency(latency), paths)
}

/// A fake that answers probes at once but narinfos after `delay`.
fn slow_narinfos(paths: &[&TestPath], delay: Duration) -> FakeUpstream {
    let b = FakeUpstream::builder().rule(PathMatch::suffix(".narinfo"), Fault::Delay(delay));
    with_paths(b, paths)
}

fn with_paths(b: crate::fake::FakeUpstreamBuilder, paths: &[&TestPath]) -> FakeUpstream {
    let key = TestKey::generate("health-test");
    let mut b = b.cache_info(40);
    for p in paths {
        b = b.path(p, &key);
    }
    b.start()
}

#[test]
fn slow_upstream_falls_behind_a_fast_one_after_a_few_probes() {
    let p = TestPath::new("ordered");
    let slow = serving(&[&p], ms(150));
    let fast = serving(&[&p], ms(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let knobs = Knobs {
        probe_interval: "100ms",
        probe_timeout: "2s",
        ..Knobs::default()
    };
    // The slow upstream is configured first: only measurements can demote it.
    let cfg = config(
        &[(&slow.url(), 10), (&fast.url(), 10)],
        &dir.path().join("db"),
        &knobs,
    );
    let ncro = NcroProcess::start(&cfg);
    let ordered = eventually(STATE_WAIT, || {
        let h = health(&ncro);
        let (s, f) = (entry(&h, &slow.url()), entry(&h, &fast.url()));
        let measured = f["latency_ms"].as_f64() > Some(0.0);
        measured
            && urls_in_order(&h) == [fast.url(), slow.url()]
            && s["latency_ms"].as_f64() > Some(100.0)
    });
    assert!(ordered, "fast upstream never led: {}", health(&ncro));
    // No route names this NAR yet, so the fallback asks in routing order.
    let r = ncro.get(&p.nar_request_path());
    assert_eq!(r.status, 200);
    assert_eq!(r.body, p.nar);
    assert_eq!(fast.request_count(&p.nar_request_path()), 1);
    assert_eq!(slow.request_count(&p.nar_request_path()), 0);
}

/// The acceptance test: three upstreams, one hanging in the preferred tier.
/// Before it is known DOWN the hedge (not the 3 s deadline) bounds a miss;
/// once it is DOWN, misses are answered at the fastest live upstream's pace
/// and the hanging one is not asked any more.
#[test]
fn misses_run_at_the_fastest_live_upstreams_pace_once_a_hanging_one_is_down() {
    let paths: Vec<TestPath> = (0..4).map(|i| TestPath::new(&format!("p{i}"))).collect();
    let refs: Vec<&TestPath> = paths.iter().collect();
    let hung = hanging();
    let fast = serving(&refs, ms(20));
    // Probes must not time out on it: only its narinfos are slow.
    let slow = slow_narinfos(&refs, ms(600));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        &[(&hung.url(), 1), (&fast.url(), 10), (&slow.url(), 10)],
        &dir.path().join("db"),
        &Knobs::default(),
    );
    let ncro = NcroProcess::start(&cfg);

    let (status, took) = timed_get(&ncro, &paths[0].narinfo_request_path());
    assert_eq!(status, 200);
    assert!(
        took >= ms(1400) && took < ms(2900),
        "hedged after hedge_after (1.5 s), well before the deadline: {took:?}"
    );

    wait_state(&ncro, &hung.url(), "DOWN");
    let asked_before = narinfo_requests(&hung);
    for p in &paths[1..] {
        let (status, took) = timed_get(&ncro, &p.narinfo_request_path());
        assert_eq!(status, 200);
        assert!(
            took < ms(450),
            "fast upstream's pace (20 ms), not the slow one's (600 ms): {took:?}"
        );
    }
    let (status, took) = timed_get(&ncro, &format!("/{}.narinfo", random_hash()));
    assert_eq!(status, 404, "every live upstream said 404");
    assert!(took < ms(1400), "no hedge or deadline wait: {took:?}");
    assert_eq!(
        narinfo_requests(&hung),
        asked_before,
        "a DOWN upstream gets no race traffic"
    );

    let h = health(&ncro);
    assert_eq!(h["status"], "degraded");
    assert_eq!(
        urls_in_order(&h).last(),
        Some(&hung.url()),
        "DOWN listed last"
    );
    assert!(entry(&h, &hung.url())["consecutive_fails"].as_u64() >= Some(10));
}

#[test]
fn a_down_upstream_comes_back_after_it_recovers() {
    let only_there = TestPath::new("only-there");
    let other = serving(&[], ms(1));
    let mut dead = hanging();
    let addr = dead.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        &[(&dead.url(), 10), (&other.url(), 10)],
        &dir.path().join("db"),
        &Knobs::default(),
    );
    let ncro = NcroProcess::start(&cfg);
    wait_state(&ncro, &dead.url(), "DOWN");
    let metrics = ncro.get("/metrics").text();
    for (url, state) in [(dead.url(), "down"), (other.url(), "active")] {
        let line = format!("ncro_upstream_health_state{{upstream=\"{url}\",state=\"{state}\"}} 1");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
    let asked = narinfo_requests(&dead);
    for _ in 0..5 {
        let (status, _) = timed_get(&ncro, &format!("/{}.narinfo", random_hash()));
        assert_eq!(status, 404);
    }
    assert_eq!(narinfo_requests(&dead), asked, "no race traffic while DOWN");

    dead.stop();
    let key = TestKey::generate("back");
    let back = FakeUpstream::builder()
        .cache_info(40)
        .path(&only_there, &key)
        .start_on(addr)
        .expect("rebind the upstream's port");
    wait_state(&ncro, &back.url(), "ACTIVE");
    let r = ncro.get(&only_there.narinfo_request_path());
    assert_eq!(r.status, 200, "raced again once ACTIVE");
    assert_eq!(back.request_count(&only_there.narinfo_request_path()), 1);
}

#[test]
fn a_transport_error_keeps_an_upstream_out_of_races_until_its_cooldown_ends() {
    let paths: Vec<TestPath> = (0..3).map(|i| TestPath::new(&format!("c{i}"))).collect();
    let refs: Vec<&TestPath> = paths.iter().collect();
    // Probes succeed (only narinfo requests are reset), so it stays ACTIVE.
    let flaky = FakeUpstream::builder()
        .cache_info(40)
        .rule(PathMatch::suffix(".narinfo"), Fault::Reset)
        .start();
    let good = serving(&refs, ms(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let knobs = Knobs {
        cooldown: "2s",
        ..Knobs::default()
    };
    let cfg = config(
        &[(&flaky.url(), 1), (&good.url(), 10)],
        &dir.path().join("db"),
        &knobs,
    );
    let ncro = NcroProcess::start(&cfg);

    let reset_at = Instant::now();
    assert_eq!(ncro.get(&paths[0].narinfo_request_path()).status, 200);
    assert_eq!(flaky.request_count(&paths[0].narinfo_request_path()), 1);
    assert_eq!(ncro.get(&paths[1].narinfo_request_path()).status, 200);
    assert!(
        reset_at.elapsed() < ms(1800),
        "test too slow to check the cooldown"
    );
    assert_eq!(
        flaky.request_count(&paths[1].narinfo_request_path()),
        0,
        "cooling down"
    );
    assert_eq!(entry(&health(&ncro), &flaky.url())["cooling_down"], true);

    std::thread::sleep(ms(2200).saturating_sub(reset_at.elapsed()));
    assert_eq!(ncro.get(&paths[2].narinfo_request_path()).status, 200);
    assert_eq!(
        flaky.request_count(&paths[2].narinfo_request_path()),
        1,
        "asked again"
    );
}

#[test]
fn a_full_race_queue_answers_503_with_retry_after() {
    let slow = slow_narinfos(&[], ms(1000));
    let dir = tempfile::tempdir().expect("tempdir");
    // One worker, one race at a time: one request races, one waits in the
    // worker's queue (its bound equals max_concurrent_races), the rest get 503.
    let knobs = Knobs {
        max_races: 1,
        race_deadline: "5s",
        probe_timeout: "2s",
        ..Knobs::default()
    };
    let ncro = NcroProcess::start(&config(
        &[(&slow.url(), 10)],
        &dir.path().join("db"),
        &knobs,
    ));
    let addr = ncro.addr();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let path = format!("/{}.narinfo", random_hash());
                let r = crate::harness::http_get(addr, &path).expect("answer");
                (
                    r.status,
                    r.header("retry-after").map(String::from),
                    t.elapsed(),
                )
            })
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(
        !refused.is_empty(),
        "some request must be shed: {results:?}"
    );
    for (_, retry_after, took) in &refused {
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(*took < ms(900), "shed at once, not after waiting: {took:?}");
    }
    let answered: Vec<_> = results.iter().filter(|r| r.0 != 503).collect();
    assert!(answered.iter().all(|r| r.0 == 404), "{results:?}");
    assert!(
        answered.iter().any(|r| r.2 >= ms(1800)),
        "one request waited for the permit, then raced: {results:?}"
    );
}

#[test]
fn a_restart_restores_health_from_the_database() {
    let p = TestPath::new("after-restart");
    let hung = hanging();
    let fast = serving(&[&p], ms(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        &[(&hung.url(), 1), (&fast.url(), 10)],
        &dir.path().join("db"),
        &Knobs::default(),
    );
    let mut first = NcroProcess::start(&cfg);
    wait_state(&first, &hung.url(), "DOWN");
    // Rows are written at most once per probe interval (50 ms).
    std::thread::sleep(ms(300));
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(15)).success());

    let second = NcroProcess::start(&cfg);
    let h = health(&second);
    let restored = entry(&h, &hung.url());
    assert_eq!(restored["status"], "DOWN", "{h}");
    assert!(restored["consecutive_fails"].as_u64() >= Some(10));
    assert!(
        entry(&h, &fast.url())["latency_ms"].as_f64() > Some(0.0),
        "EMA restored: {h}"
    );
    let asked = narinfo_requests(&hung);
    let (status, took) = timed_get(&second, &p.narinfo_request_path());
    assert_eq!(status, 200);
    assert!(
        took < ms(1000),
        "no hedge wait on the restored DOWN tier: {took:?}"
    );
    assert_eq!(narinfo_requests(&hung), asked);
}

#[test]
fn an_upstream_without_nix_cache_info_stays_active() {
    let p = TestPath::new("no-cache-info");
    let key = TestKey::generate("nci");
    // No cache_info(): /nix-cache-info answers 404.
    let bare = FakeUpstream::builder().path(&p, &key).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ncro = NcroProcess::start(&config(
        &[(&bare.url(), 10)],
        &dir.path().join("db"),
        &Knobs::default(),
    ));
    // Well past the ten probes that would make it DOWN if 404 were a failure.
    let probed = eventually(STATE_WAIT, || bare.request_count("/nix-cache-info") >= 24);
    assert!(probed, "probes did not run");
    let e = entry(&health(&ncro), &bare.url());
    assert_eq!(e["status"], "ACTIVE", "{e}");
    assert_eq!(e["cache_info"], false);
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
}

#[test]
fn a_route_to_a_down_upstream_is_raced_again() {
    let p = TestPath::new("rerouted");
    let mut first = serving(&[&p], ms(1));
    let second = serving(&[&p], ms(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        &[(&first.url(), 1), (&second.url(), 10)],
        &dir.path().join("db"),
        &Knobs::default(),
    );
    let ncro = NcroProcess::start(&cfg);
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(
        second.request_count(&p.narinfo_request_path()),
        0,
        "tier 1 answered"
    );
    first.stop();
    wait_state(&ncro, &first.url(), "DOWN");
    let r = ncro.get(&p.narinfo_request_path());
    assert_eq!(r.status, 200);
    assert_eq!(
        second.request_count(&p.narinfo_request_path()),
        1,
        "raced again"
    );
    let nar = ncro.get(&p.nar_request_path());
    assert_eq!((nar.status, nar.body == p.nar), (200, true));
    assert_eq!(second.request_count(&p.nar_request_path()), 1);
}

#[test]
fn routes_loaded_at_start_obey_the_current_filters() {
    let p = TestPath::new("private-thing");
    let up = serving(&[&p], ms(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db");
    let mut before = NcroProcess::start(&config(&[(&up.url(), 10)], &db, &Knobs::default()));
    assert_eq!(before.get(&p.narinfo_request_path()).status, 200);
    before.sigterm();
    assert!(before.wait_exit(Duration::from_secs(15)).success());
    let filtered = Knobs {
        last_upstream_extra: "[[upstreams.filters]]\naction = \"deny\"\npattern = \"private*\"\n\n",
        ..Knobs::default()
    };
    let after = NcroProcess::start(&config(&[(&up.url(), 10)], &db, &filtered));
    let r = after.get(&p.narinfo_request_path());
    assert_eq!(
        r.status, 404,
        "the stored route was dropped and the new race filtered it"
    );
    assert_eq!(up.request_count(&p.narinfo_request_path()), 2);
}
