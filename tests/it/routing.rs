//! The routing core through the real `ncro` binary: races, tiers and the
//! hedge, signature and store-path checks, miss versus outage, the negative
//! cache, single-flight, routes surviving a restart, and race losers being
//! cancelled without leaking descriptors. Upstreams are fakes on loopback;
//! ncro's answers are checked over plain HTTP by the harness client.
//!
//! Timing bounds are deliberately loose (this runs on a shared 2-core VM):
//! each one separates two mechanisms by a wide factor, never measures speed.

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::{test_config, HttpConn, NcroProcess, Response};
use crate::server::eventually;

/// One `[[upstreams]]` entry: URL, priority, public key ("" for none).
pub type UpstreamEntry = (String, i32, String);

/// An upstream entry for a fake that signs with `key`.
pub fn entry(url: String, priority: i32, key: &TestKey) -> UpstreamEntry {
    (url, priority, key.public_key())
}

/// A test config (debug logs, loopback port chosen by the harness) with
/// extra keys set per section.
pub struct NcroConfig {
    table: toml::Table,
}

impl NcroConfig {
    pub fn new(upstreams: &[UpstreamEntry], db: &Path) -> NcroConfig {
        let refs: Vec<(&str, i32, &str)> = upstreams
            .iter()
            .map(|(u, p, k)| (u.as_str(), *p, k.as_str()))
            .collect();
        let text = test_config("127.0.0.1:0", &refs, db);
        let table = toml::from_str(&text).expect("test_config renders valid TOML");
        NcroConfig { table }
    }

    /// Sets `section.key` (creating the section).
    pub fn set(mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> NcroConfig {
        let t = self
            .table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t.as_table_mut()
            .unwrap_or_else(|| panic!("[{section}] is a table"))
            .insert(key.to_owned(), value.into());
        self
    }

    /// Sets `key` of the `i`-th `[[upstreams]]` entry.
    pub fn upstream(mut self, i: usize, key: &str, value: impl Into<toml::Value>) -> NcroConfig {
        let ups = self
            .table
            .get_mut("upstreams")
            .and_then(|u| u.as_array_mut())
            .expect("[[upstreams]]");
        ups[i]
            .as_table_mut()
            .expect("an upstream is a table")
            .insert(key.to_owned(), value.into());
        self
    }

    pub fn render(&self) -> String {
        toml::to_string(&self.table).expect("config table serialises")
    }

    pub fn start(&self) -> NcroProcess {
        NcroProcess::start(&self.render())
    }
}

/// A fresh temp dir for a route database (kept across restarts by the test).
pub fn db_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ncro-routing-")
        .tempdir()
        .expect("temp dir")
}

/// GET with the elapsed time.
pub fn timed_get(ncro: &NcroProcess, path: &str) -> (Response, Duration) {
    let t = Instant::now();
    let r = ncro.get(path);
    (r, t.elapsed())
}

/// The key names of the `Sig:` lines of a served narinfo.
fn signers(narinfo: &Response) -> Vec<String> {
    narinfo
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .filter_map(|s| s.split_once(':').map(|(name, _)| name.to_owned()))
        .collect()
}

/// Narinfo requests an upstream has received in total.
fn narinfo_requests(up: &FakeUpstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count()
}

fn assert_served_by(r: &Response, p: &TestPath, key: &TestKey, ncro: &NcroProcess) {
    assert_eq!(r.status, 200, "{}\n{}", r.text(), ncro.logs());
    assert!(
        r.text()
            .contains(&format!("StorePath: {}\n", p.store_path())),
        "{}",
        r.text()
    );
    assert_eq!(signers(r), vec![key.name().to_owned()], "{}", r.text());
    assert!(!r.body.contains(&b'\r'), "never serve CRLF");
}

#[test]
fn race_picks_the_fastest_and_remembers_the_route() {
    let (ka, kb) = (TestKey::generate("slow-1"), TestKey::generate("fast-1"));
    let p = TestPath::new("raced");
    let slow = FakeUpstream::builder()
        .path(&p, &ka)
        .latency(Duration::from_millis(300))
        .start();
    let fast = FakeUpstream::builder().path(&p, &kb).start();
    let db = db_dir();
    // The slow one is listed first: winning must come from speed, not order.
    let ups = [entry(slow.url(), 10, &ka), entry(fast.url(), 10, &kb)];
    let ncro = NcroConfig::new(&ups, &db.path().join("routes.db")).start();

    let (r, took) = timed_get(&ncro, &p.narinfo_request_path());
    assert_served_by(&r, &p, &kb, &ncro);
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    // The loser may be cancelled before its request is even written.
    assert!(slow.request_count(&p.narinfo_request_path()) <= 1);
    assert_eq!(fast.request_count(&p.narinfo_request_path()), 1);

    let again = ncro.get(&p.narinfo_request_path());
    assert_eq!(again.status, 200);
    assert_eq!(again.body, r.body, "the remembered narinfo is served");
    // Counted per path, not as a before/after snapshot: the cancelled
    // request to the slow upstream may be logged by the fake only now.
    assert!(
        slow.request_count(&p.narinfo_request_path()) <= 1,
        "a route-cache hit asks no upstream"
    );
    assert_eq!(
        fast.request_count(&p.narinfo_request_path()),
        1,
        "a route-cache hit asks no upstream"
    );
}

#[test]
fn tier_one_miss_falls_through_to_tier_two() {
    let (k1, k2) = (TestKey::generate("t1-1"), TestKey::generate("t2-1"));
    let p = TestPath::new("tiered");
    let t1 = FakeUpstream::builder().start(); // has nothing: 404
    let t2 = FakeUpstream::builder().path(&p, &k2).start();
    let db = db_dir();
    let ups = [entry(t1.url(), 10, &k1), entry(t2.url(), 20, &k2)];
    let ncro = NcroConfig::new(&ups, &db.path().join("routes.db"))
        .set("health", "hedge_after", "10s")
        .start();
    let r = ncro.get(&p.narinfo_request_path());
    assert_served_by(&r, &p, &k2, &ncro);
    let (a, b) = (&t1.requests()[0], &t2.requests()[0]);
    assert!(a.at <= b.at, "tier 1 is asked first");
}

/// Tier 1 never answers; tier 2 has the path. `hedge_after` decides how long
/// the client waits: the tier deadline, or the much earlier hedge point.
fn hanging_tier_one(hedge_after: &str, race_deadline: &str) -> (Response, Duration) {
    let (k1, k2) = (TestKey::generate("hang-1"), TestKey::generate("t2-1"));
    let p = TestPath::new("behind-a-hang");
    let t1 = FakeUpstream::builder()
        .path(&p, &k1)
        .rule(PathMatch::suffix(".narinfo"), Fault::Hang)
        .start();
    let t2 = FakeUpstream::builder().path(&p, &k2).start();
    let db = db_dir();
    let ups = [entry(t1.url(), 10, &k1), entry(t2.url(), 20, &k2)];
    let ncro = NcroConfig::new(&ups, &db.path().join("routes.db"))
        .set("health", "hedge_after", hedge_after)
        .set("timeouts", "race_deadline", race_deadline)
        .start();
    let (r, took) = timed_get(&ncro, &p.narinfo_request_path());
    assert_served_by(&r, &p, &k2, &ncro);
    (r, took)
}

#[test]
fn hanging_tier_one_is_abandoned_at_the_tier_deadline() {
    let (_, took) = hanging_tier_one("10s", "1s");
    assert!(
        took >= Duration::from_millis(900),
        "before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "far past the deadline: {took:?}"
    );
}

#[test]
fn hedge_starts_tier_two_long_before_the_deadline() {
    // Deadline 4s, hedge 200ms: an answer well under 2s can only come from
    // the hedge, and it cannot come before the hedge point.
    let (_, took) = hanging_tier_one("200ms", "4s");
    assert!(
        took >= Duration::from_millis(180),
        "before the hedge: {took:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "waited for the deadline: {took:?}"
    );
}

#[test]
fn bad_signature_on_the_fastest_falls_through_and_is_never_served() {
    let (trusted_a, forger, kb) = (
        TestKey::generate("a-1"),
        TestKey::generate("a-1"), // same name, other key: a forgery
        TestKey::generate("b-1"),
    );
    let p = TestPath::new("signed");
    let bad = FakeUpstream::builder().path(&p, &forger).start();
    let good = FakeUpstream::builder()
        .path(&p, &kb)
        .latency(Duration::from_millis(200))
        .start();
    let db = db_dir();
    let ups = [entry(bad.url(), 10, &trusted_a), entry(good.url(), 10, &kb)];
    let ncro = NcroConfig::new(&ups, &db.path().join("routes.db")).start();
    let r = ncro.get(&p.narinfo_request_path());
    assert_served_by(&r, &p, &kb, &ncro);
    assert_eq!(bad.request_count(&p.narinfo_request_path()), 1);

    // The same forgery in tier 1 of another ncro falls through to tier 2.
    let db2 = db_dir();
    let ups = [entry(bad.url(), 10, &trusted_a), entry(good.url(), 20, &kb)];
    let ncro2 = NcroConfig::new(&ups, &db2.path().join("routes.db")).start();
    assert_served_by(&ncro2.get(&p.narinfo_request_path()), &p, &kb, &ncro2);
}

#[test]
fn bad_signature_alone_is_an_outage_not_a_miss() {
    let (trusted, forger) = (TestKey::generate("a-1"), TestKey::generate("a-1"));
    let p = TestPath::new("forged");
    let bad = FakeUpstream::builder().path(&p, &forger).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(bad.url(), 10, &trusted)], &db.path().join("r.db")).start();
    for _ in 0..2 {
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 502, "{}", r.text());
    }
    assert_eq!(
        bad.request_count(&p.narinfo_request_path()),
        2,
        "a rejected signature is not negative-cached"
    );
}

#[test]
fn wrong_store_path_is_a_miss_for_that_upstream() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("asked");
    let other = TestPath::new("other");
    // Upstream `liar` answers p's URL with a valid, signed narinfo of `other`.
    let liar = FakeUpstream::builder()
        .narinfo(&p.hash, other.narinfo(&[&k]))
        .start();
    let good = FakeUpstream::builder()
        .path(&p, &k)
        .latency(Duration::from_millis(150))
        .start();
    let empty = FakeUpstream::builder().start();
    let db = db_dir();

    let ups = [entry(liar.url(), 10, &k), entry(good.url(), 10, &k)];
    let ncro = NcroConfig::new(&ups, &db.path().join("a.db")).start();
    let r = ncro.get(&p.narinfo_request_path());
    assert_served_by(&r, &p, &k, &ncro);
    assert!(!r.text().contains(&other.hash));

    // With no one else holding it, the lie counts as "not here": a real 404.
    let ups = [entry(liar.url(), 10, &k), entry(empty.url(), 10, &k)];
    let ncro2 = NcroConfig::new(&ups, &db.path().join("b.db")).start();
    let r = ncro2.get(&p.narinfo_request_path());
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn crlf_narinfo_is_rejected() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("crlf");
    let crlf = p.narinfo(&[&k]).replace('\n', "\r\n");
    let up = FakeUpstream::builder()
        .narinfo(&p.hash, crlf.clone())
        .start();
    let good = FakeUpstream::builder()
        .path(&p, &k)
        .latency(Duration::from_millis(150))
        .start();
    let db = db_dir();

    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("a.db")).start();
    let r = ncro.get(&p.narinfo_request_path());
    assert_eq!(r.status, 502, "a garbled body is no proof of absence");
    assert!(!r.body.contains(&b'\r'));

    let ups = [entry(up.url(), 10, &k), entry(good.url(), 10, &k)];
    let ncro2 = NcroConfig::new(&ups, &db.path().join("b.db")).start();
    assert_served_by(&ncro2.get(&p.narinfo_request_path()), &p, &k, &ncro2);
}

#[test]
fn upstream_500_is_502_and_never_cached() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("flaky");
    let up = FakeUpstream::builder()
        .path(&p, &k)
        .rule(
            p.narinfo_request_path(),
            Fault::first_n(2, Fault::Status(500)),
        )
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db"))
        .set("cache", "negative_ttl", "1h")
        .start();
    for _ in 0..2 {
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 502, "{}", r.text());
    }
    // The upstream has recovered: the very next request gets the path.
    let r = ncro.get(&p.narinfo_request_path());
    assert_served_by(&r, &p, &k, &ncro);
    assert_eq!(up.request_count(&p.narinfo_request_path()), 3);
}

#[test]
fn tier_one_timeout_plus_tier_two_404_is_not_a_miss() {
    let (k1, k2) = (TestKey::generate("t1-1"), TestKey::generate("t2-1"));
    let p = TestPath::new("unknowable");
    let t1 = FakeUpstream::builder()
        .path(&p, &k1)
        .rule(PathMatch::suffix(".narinfo"), Fault::Hang)
        .start();
    let t2 = FakeUpstream::builder().start();
    let db = db_dir();
    let ups = [entry(t1.url(), 10, &k1), entry(t2.url(), 20, &k2)];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("timeouts", "race_deadline", "1s")
        .set("health", "hedge_after", "10s")
        .set("cache", "negative_ttl", "1h")
        .start();
    for round in 1..=2 {
        let r = ncro.get(&p.narinfo_request_path());
        assert!(
            matches!(r.status, 502 | 504),
            "round {round}: got {} (a 404 would stick on clients for an hour)",
            r.status
        );
        assert_eq!(
            t2.request_count(&p.narinfo_request_path()),
            round,
            "asked again: nothing was negative-cached"
        );
    }
}

#[test]
fn all_404_is_404_and_negative_cached_until_negative_ttl() {
    let (k1, k2) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let p = TestPath::new("absent");
    let a = FakeUpstream::builder().start();
    let b = FakeUpstream::builder().start();
    let db = db_dir();
    let ups = [entry(a.url(), 10, &k1), entry(b.url(), 20, &k2)];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("cache", "negative_ttl", "2s")
        .start();
    let path = p.narinfo_request_path();
    assert_eq!(ncro.get(&path).status, 404);
    assert_eq!((a.request_count(&path), b.request_count(&path)), (1, 1));
    assert_eq!(ncro.get(&path).status, 404);
    assert_eq!(
        (a.request_count(&path), b.request_count(&path)),
        (1, 1),
        "answered from the negative cache"
    );
    // Expiry is kept in whole seconds: after 3s a 2s entry is gone.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ncro.get(&path).status, 404);
    assert_eq!(
        (a.request_count(&path), b.request_count(&path)),
        (2, 2),
        "asked again after negative_ttl"
    );
}

#[test]
fn head_narinfo_is_answered_without_a_body() {
    let k = TestKey::generate("k-1");
    let (p, absent) = (TestPath::new("headed"), TestPath::new("absent"));
    let up = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db")).start();
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    let head = c
        .request("HEAD", &p.narinfo_request_path(), &[])
        .expect("HEAD");
    assert_eq!(head.status, 200, "{}", ncro.logs());
    // The GET on the same connection parses only if HEAD sent no body.
    let get = c.get(&p.narinfo_request_path()).expect("GET after HEAD");
    assert_served_by(&get, &p, &k, &ncro);
    assert_eq!(
        head.header("Content-Length"),
        Some(get.body.len().to_string().as_str())
    );
    let miss = ncro
        .request("HEAD", &absent.narinfo_request_path(), &[])
        .expect("HEAD of a miss");
    assert_eq!(miss.status, 404);
    assert_eq!(
        up.request_count(&p.narinfo_request_path()),
        1,
        "GET hit the route"
    );
}

/// A HEAD answered with an error status must not carry a body either: on a
/// keep-alive connection the client reads those bytes as the next response.
/// `Conn::error` (src/serve.rs) always writes its body; it needs the
/// request's HEAD flag, passed from `Conn::narinfo` and `nar::serve`.
#[test]
fn regression_head_error_responses_have_no_body() {
    let k = TestKey::generate("k-1");
    let (p, absent) = (TestPath::new("present"), TestPath::new("absent"));
    let up = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db")).start();
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    for miss in [absent.narinfo_request_path(), absent.nar_request_path()] {
        let r = c.request("HEAD", &miss, &[]).expect("HEAD of a miss");
        assert_eq!(r.status, 404, "{miss}");
        let next = c.get(&p.narinfo_request_path());
        let next = next.unwrap_or_else(|e| panic!("after HEAD {miss}: {e}"));
        assert_eq!(next.status, 200, "after HEAD {miss}");
    }
}

#[test]
fn chunked_narinfo_is_accepted_and_truncated_one_is_an_outage() {
    let k = TestKey::generate("k-1");
    let (chunked, cut) = (TestPath::new("chunked"), TestPath::new("cut"));
    let up = FakeUpstream::builder()
        .path(&chunked, &k)
        .path(&cut, &k)
        .rule(chunked.narinfo_request_path(), Fault::Chunked)
        .rule(cut.narinfo_request_path(), Fault::Truncate(40))
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db")).start();
    assert_served_by(
        &ncro.get(&chunked.narinfo_request_path()),
        &chunked,
        &k,
        &ncro,
    );
    assert_eq!(ncro.get(&cut.narinfo_request_path()).status, 502);
}

#[test]
fn routes_expire_after_cache_ttl() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("short-lived");
    let up = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db"))
        .set("cache", "ttl", "1s")
        .start();
    let path = p.narinfo_request_path();
    assert_served_by(&ncro.get(&path), &p, &k, &ncro);
    // Expiry is kept in whole seconds: a 1s route is gone 2.5s later.
    std::thread::sleep(Duration::from_millis(2500));
    assert_served_by(&ncro.get(&path), &p, &k, &ncro);
    assert_eq!(up.request_count(&path), 2, "raced again after the ttl");
}

#[test]
fn negative_entries_survive_a_restart() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("absent-across-restarts");
    let up = FakeUpstream::builder().start();
    let db = db_dir();
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db")).set(
        "cache",
        "negative_ttl",
        "1h",
    );
    let mut first = cfg.start();
    assert_eq!(first.get(&p.narinfo_request_path()).status, 404);
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    drop(first);
    let second = cfg.start();
    assert_eq!(second.get(&p.narinfo_request_path()).status, 404);
    assert_eq!(up.request_count(&p.narinfo_request_path()), 1);
}

/// An upstream that refuses connections gives no answer, so a miss
/// elsewhere is not a definite miss. (Until health tracking leaves dead
/// upstreams out, one dead upstream turns every miss into a 502.)
#[test]
fn refused_connection_plus_404_is_502() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("refused");
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    }; // closed again: connecting is refused
    let empty = FakeUpstream::builder().start();
    let db = db_dir();
    let ups = [(dead, 10, k.public_key()), entry(empty.url(), 10, &k)];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db")).start();
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 502);
}

/// `clients` connections, all opened first, then released at once to ask
/// for `path`; returns every status.
fn burst(ncro: &NcroProcess, path: &str, clients: usize) -> Vec<u16> {
    let gate = Arc::new(Barrier::new(clients));
    let addr = ncro.addr();
    let threads: Vec<JoinHandle<u16>> = (0..clients)
        .map(|_| {
            let gate = Arc::clone(&gate);
            let path = path.to_owned();
            std::thread::spawn(move || {
                let conn = HttpConn::connect(addr);
                gate.wait();
                match conn.and_then(|mut c| c.get(&path)) {
                    Ok(r) => r.status,
                    Err(e) => panic!("client: {e}"),
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| panic!("{}", ncro.logs())))
        .collect()
}

#[test]
fn single_flight_shares_results_and_failures() {
    let k = TestKey::generate("k-1");
    let (good, bad) = (TestPath::new("shared"), TestPath::new("shared-failure"));
    let up = FakeUpstream::builder()
        .path(&good, &k)
        .path(&bad, &k)
        .rule(bad.narinfo_request_path(), Fault::Status(500))
        .latency(Duration::from_millis(500))
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db"))
        .set("server", "workers", 1)
        .start();

    let statuses = burst(&ncro, &good.narinfo_request_path(), 50);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(up.request_count(&good.narinfo_request_path()), 1);

    let statuses = burst(&ncro, &bad.narinfo_request_path(), 50);
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
    assert_eq!(
        up.request_count(&bad.narinfo_request_path()),
        1,
        "one failed race answered all 50"
    );
}

#[test]
fn single_flight_is_per_worker() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("two-workers");
    let up = FakeUpstream::builder()
        .path(&p, &k)
        .latency(Duration::from_millis(500))
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db"))
        .set("server", "workers", 2)
        .start();
    let statuses = burst(&ncro, &p.narinfo_request_path(), 50);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let n = up.request_count(&p.narinfo_request_path());
    assert!((1..=2).contains(&n), "{n} upstream requests for 2 workers");
}

/// Hashes in the route log, read the way an operator would.
fn stored_routes(db: &Path) -> HashSet<String> {
    use rusqlite::{Connection, OpenFlags};
    let Ok(c) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return HashSet::new();
    };
    let _ = c.busy_timeout(Duration::from_secs(2)); // default applies otherwise
    let Ok(mut stmt) = c.prepare("SELECT hash FROM route_log") else {
        return HashSet::new();
    };
    let rows = stmt.query_map([], |r| r.get::<_, String>(0));
    rows.map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

enum Stop {
    Graceful,
    Kill,
}

fn routes_survive_restart(stop: Stop) {
    let k = TestKey::generate("k-1");
    let paths: Vec<TestPath> = (0..5)
        .map(|i| TestPath::new(&format!("kept-{i}")))
        .collect();
    let mut builder = FakeUpstream::builder();
    for p in &paths {
        builder = builder.path(p, &k);
    }
    let mut up = builder.start();
    let addr = up.addr();
    let db = db_dir();
    let db_path = db.path().join("routes.db");
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &k)], &db_path);

    let mut first = cfg.start();
    let served: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| {
            let r = first.get(&p.narinfo_request_path());
            assert_served_by(&r, p, &k, &first);
            r.body
        })
        .collect();
    match stop {
        Stop::Graceful => {
            first.sigterm();
            let status = first.wait_exit(Duration::from_secs(20));
            assert!(status.success(), "{status}\n{}", first.logs());
        }
        Stop::Kill => {
            // Routes reach SQLite through the writer thread in batches: wait
            // until they are committed, then give ncro no chance to flush.
            let deadline = Instant::now() + Duration::from_secs(10);
            let want: HashSet<String> = paths.iter().map(|p| p.hash.clone()).collect();
            while !want.is_subset(&stored_routes(&db_path)) {
                assert!(Instant::now() < deadline, "routes never reached SQLite");
                std::thread::sleep(Duration::from_millis(50));
            }
            first.kill();
        }
    }
    drop(first);

    // Same URL, but every narinfo now fails.
    up.stop();
    let broken = FakeUpstream::builder()
        .rule(PathMatch::Any, Fault::Status(500))
        .start_on(addr)
        .expect("rebind the upstream's port");
    let second = cfg.start();
    for (p, body) in paths.iter().zip(&served) {
        let r = second.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", second.logs());
        assert_eq!(
            &r.body, body,
            "the restored narinfo is the one served before"
        );
    }
    assert_eq!(
        narinfo_requests(&broken),
        0,
        "all answered from the restored table"
    );
    // And the upstream really is broken for anything not restored.
    let unknown = TestPath::new("not-kept");
    assert_eq!(second.get(&unknown.narinfo_request_path()).status, 502);
}

#[test]
fn routes_survive_a_graceful_restart() {
    routes_survive_restart(Stop::Graceful);
}

#[test]
fn routes_survive_sigkill_once_committed() {
    routes_survive_restart(Stop::Kill);
}

/// An upstream that answers every request with the same canned bytes, or
/// never answers at all. It counts accepted connections and the ones still
/// open: a connection leaves the open count only when the peer closes it,
/// which is how a test sees ncro close (or keep) its upstream connections.
pub struct CannedUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl CannedUpstream {
    /// Reads requests, never answers.
    pub fn silent() -> CannedUpstream {
        CannedUpstream::start(None)
    }

    /// Answers each request with `response` and keeps the connection.
    pub fn answering(response: &str) -> CannedUpstream {
        CannedUpstream::start(Some(Arc::from(response.as_bytes())))
    }

    fn start(answer: Option<Arc<[u8]>>) -> CannedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mut up = CannedUpstream {
            addr,
            accepted: Arc::default(),
            open: Arc::default(),
            requests: Arc::default(),
            stop: Arc::default(),
            threads: Arc::default(),
            acceptor: None,
        };
        let (a, o, r, s, t) = (
            up.accepted.clone(),
            up.open.clone(),
            up.requests.clone(),
            up.stop.clone(),
            up.threads.clone(),
        );
        let acceptor = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        o.fetch_add(1, Ordering::SeqCst);
                        let (o, r, s, answer) = (o.clone(), r.clone(), s.clone(), answer.clone());
                        let h = std::thread::spawn(move || {
                            canned_conn(stream, answer.as_deref(), &r, &s);
                            o.fetch_sub(1, Ordering::SeqCst);
                        });
                        t.lock().unwrap_or_else(|e| e.into_inner()).push(h);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        up.acceptor = Some(acceptor);
        up
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Counts request heads (answering each, if there is an answer) until the
/// peer closes or the upstream stops.
fn canned_conn(mut s: TcpStream, answer: Option<&[u8]>, requests: &AtomicUsize, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false); // inherited from the listener on some systems
    let _ = s.set_read_timeout(Some(Duration::from_millis(100))); // to notice `stop`
    let mut seen: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                seen.extend_from_slice(&chunk[..n]);
                while let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    requests.fetch_add(1, Ordering::SeqCst);
                    seen.drain(..i + 4);
                    if let Some(a) = answer {
                        if s.write_all(a).is_err() {
                            return;
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Drop for CannedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join(); // a panicked acceptor has nothing to clean up
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join(); // each ends within one read timeout of `stop`
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

#[test]
fn cancelled_losers_close_their_connections() {
    const WARMUP: usize = 5;
    const RACES: usize = 30;
    let k = TestKey::generate("k-1");
    let paths: Vec<TestPath> = (0..WARMUP + RACES)
        .map(|i| TestPath::new(&format!("race-{i}")))
        .collect();
    let mut builder = FakeUpstream::builder();
    for p in &paths {
        builder = builder.path(p, &k);
    }
    // A little latency so the silent loser surely has its request by the
    // time the winner answers.
    let fast = builder.latency(Duration::from_millis(150)).start();
    let silent = CannedUpstream::silent();
    let db = db_dir();
    let ups = [
        entry(fast.url(), 10, &k),
        (silent.url(), 10, k.public_key()),
    ];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("server", "workers", 1)
        .set("timeouts", "race_deadline", "30s")
        .set("timeouts", "first_byte", "30s")
        .start();
    let get_all = |ps: &[TestPath]| {
        for p in ps {
            assert_served_by(&ncro.get(&p.narinfo_request_path()), p, &k, &ncro);
        }
    };
    get_all(&paths[..WARMUP]);
    assert!(
        eventually(Duration::from_secs(5), || silent.open() == 0),
        "warm-up losers still open: {}",
        silent.open()
    );
    let fds_before = open_fds(ncro.pid());

    get_all(&paths[WARMUP..]);
    let closed = eventually(Duration::from_secs(5), || silent.open() == 0);
    assert!(
        closed,
        "{} of the loser connections are still open\n{}",
        silent.open(),
        ncro.logs()
    );
    assert!(
        silent.requests() >= RACES,
        "the loser was asked only {} times",
        silent.requests()
    );
    let fds_after = open_fds(ncro.pid());
    assert!(
        fds_after <= fds_before + 4,
        "ncro fds grew from {fds_before} to {fds_after} over {RACES} races"
    );
}

/// Regression: a 404 with a body (nginx, S3 and Fastly all send one) was
/// dropped unread, which closes the upstream connection, so every miss on
/// an upstream cost a fresh TCP (and TLS) handshake on the next lookup.
#[test]
fn regression_404_with_body_keeps_the_upstream_connection() {
    let miss = CannedUpstream::answering(
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 22\r\n\r\n<h1>404 Not Found</h1>",
    );
    let db = db_dir();
    let ncro = NcroConfig::new(&[(miss.url(), 10, String::new())], &db.path().join("r.db"))
        .set("server", "workers", 1)
        .start();
    for i in 0..5 {
        let p = TestPath::new(&format!("missing-{i}"));
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 404, "{}", ncro.logs());
    }
    assert_eq!(miss.requests(), 5);
    assert_eq!(miss.accepted(), 1, "connections for 5 sequential misses");
}

/// An upstream misconfigured to redirect everything (http -> https, say)
/// makes every lookup a 502; the debug log must say which upstream and
/// status, since the metric label leaves the status out.
#[test]
fn regression_failed_attempts_are_logged_with_their_status() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("moved");
    let up = FakeUpstream::builder()
        .rule(
            PathMatch::suffix(".narinfo"),
            Fault::Redirect("https://elsewhere.invalid/".into()),
        )
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &k)], &db.path().join("r.db")).start();
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 502);
    assert!(
        ncro.wait_for_log("OtherStatus(302)", Duration::from_secs(5)),
        "{}",
        ncro.logs()
    );
    let out = ncro.stdout();
    let line = out.lines().find(|l| l.contains("OtherStatus(302)"));
    assert!(line.is_some_and(|l| l.contains(&up.url()) && l.contains(&p.hash)));
}
