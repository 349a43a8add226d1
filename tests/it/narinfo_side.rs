//! Narinfo-side keys through the real binary: `[fallback_cache]` (narinfo
//! and the single NAR try), `upstreams[].narinfo_timeout`,
//! `server.want_mass_query`, `cache.resolution_policy`,
//! `cache.unavailable_answer`, and the `X-Ncro-Upstream` / `X-Ncro-Route`
//! headers. Upstreams are fakes on loopback; "dead" upstreams are loopback
//! ports nobody listens on.
//!
//! Timing is never measured against a bound: each test sets latencies far
//! apart (seconds against a hedge of 100 ms) and checks who answered.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_port, NcroProcess, Response};
use crate::routing::{db_dir, entry, NcroConfig, UpstreamEntry};

/// A config table built from the routing tests' config.
fn config(ups: &[UpstreamEntry], db: &Path) -> toml::Table {
    toml::from_str(&NcroConfig::new(ups, db).render()).expect("config parses")
}

fn set(t: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    let s = t
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    s.as_table_mut()
        .expect("section is a table")
        .insert(key.to_owned(), value.into());
}

/// Sets `key` on the `i`-th `[[upstreams]]` entry.
fn set_upstream(t: &mut toml::Table, i: usize, key: &str, value: impl Into<toml::Value>) {
    let ups = t
        .get_mut("upstreams")
        .and_then(|u| u.as_array_mut())
        .expect("upstreams array");
    ups[i]
        .as_table_mut()
        .expect("upstream table")
        .insert(key.to_owned(), value.into());
}

fn with_fallback(t: &mut toml::Table, url: &str, key: &TestKey) {
    set(t, "fallback_cache", "enabled", true);
    set(t, "fallback_cache", "url", url);
    set(t, "fallback_cache", "public_key", key.public_key());
}

fn start(t: &toml::Table) -> NcroProcess {
    NcroProcess::start(&toml::to_string(t).expect("config serialises"))
}

/// An upstream URL on a loopback port with no listener: every request to
/// it is refused, so it is "unavailable", never "not found".
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn route(r: &Response) -> &str {
    r.header("X-Ncro-Route").unwrap_or("<none>")
}

fn upstream_host(r: &Response) -> &str {
    r.header("X-Ncro-Upstream").unwrap_or("<none>")
}

fn signed_by(r: &Response, key: &TestKey) -> bool {
    r.text().contains(&format!("Sig: {}:", key.name()))
}

fn stop(mut ncro: NcroProcess) {
    ncro.sigterm();
    assert!(ncro.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn fallback_answers_when_no_upstream_can_and_is_never_stored() {
    let (kn, kf) = (
        TestKey::generate("normal-1"),
        TestKey::generate("fallback-1"),
    );
    let p = TestPath::new("only-in-fallback");
    let absent = TestPath::new("nowhere");
    let fb = FakeUpstream::builder().path(&p, &kf).start();
    let db = db_dir();
    let mut t = config(&[entry(dead_url(), 10, &kn)], &db.path().join("routes.db"));
    with_fallback(&mut t, &fb.url(), &kf);
    let ncro = start(&t);
    let path = p.narinfo_request_path();

    let r = ncro.get(&path);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert!(signed_by(&r, &kf), "{}", r.text());
    assert_eq!(route(&r), "fallback");
    assert_eq!(upstream_host(&r), "127.0.0.1");

    let head = ncro.request("HEAD", &path, &[]).expect("HEAD");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(route(&head), "fallback");
    assert_eq!(upstream_host(&head), "127.0.0.1");
    assert_eq!(fb.request_count(&path), 2, "not remembered: asked again");

    // The fallback's 404 is the answer.
    let miss = ncro.get(&absent.narinfo_request_path());
    assert_eq!(miss.status, 404, "{}", ncro.logs());
    assert_eq!(fb.request_count(&absent.narinfo_request_path()), 1);

    // Not in the route database either.
    stop(ncro);
    let ncro = start(&t);
    let again = ncro.get(&path);
    assert_eq!(again.status, 200, "{}", ncro.logs());
    assert_eq!(route(&again), "fallback", "never a cache hit");
    assert_eq!(fb.request_count(&path), 3);
}

#[test]
fn fallback_is_not_asked_after_a_definite_miss_or_a_bad_signature() {
    let (kn, kf, forger) = (
        TestKey::generate("normal-1"),
        TestKey::generate("fallback-1"),
        TestKey::generate("forger-1"),
    );
    let forged = TestPath::new("forged-upstream");
    let missing = TestPath::new("missing-upstream");
    // The upstream serves `forged` with a signature its key does not make,
    // and has nothing for `missing`; the fallback has both.
    let up = FakeUpstream::builder().path(&forged, &forger).start();
    let fb = FakeUpstream::builder()
        .path(&forged, &kf)
        .path(&missing, &kf)
        .start();
    let db = db_dir();
    let mut t = config(&[entry(up.url(), 10, &kn)], &db.path().join("routes.db"));
    with_fallback(&mut t, &fb.url(), &kf);
    let ncro = start(&t);

    let r = ncro.get(&missing.narinfo_request_path());
    assert_eq!(r.status, 404, "{}", ncro.logs());
    let r = ncro.get(&forged.narinfo_request_path());
    assert_eq!(r.status, 502, "{}", ncro.logs());
    assert_eq!(up.request_count(&forged.narinfo_request_path()), 1);
    assert_eq!(
        narinfo_requests(&fb),
        0,
        "the fallback is never asked after a definite miss or a refused signature"
    );
}

#[test]
fn fallback_narinfo_is_verified_with_its_own_keys() {
    let (kf, other) = (
        TestKey::generate("fallback-1"),
        TestKey::generate("other-1"),
    );
    let good = TestPath::new("fallback-good");
    let bad = TestPath::new("fallback-bad");
    let fb = FakeUpstream::builder()
        .path(&good, &kf)
        .path(&bad, &other)
        .start();
    let db = db_dir();
    // The normal upstream trusts `other`: the fallback must not.
    let mut t = config(
        &[entry(dead_url(), 10, &other)],
        &db.path().join("routes.db"),
    );
    with_fallback(&mut t, &fb.url(), &kf);
    let ncro = start(&t);
    let r = ncro.get(&bad.narinfo_request_path());
    assert_eq!(r.status, 502, "{}\n{}", r.text(), ncro.logs());
    let r = ncro.get(&good.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert_eq!(route(&r), "fallback");
}

#[test]
fn fallback_gets_one_nar_try_with_the_request_as_received() {
    let (kn, kf) = (
        TestKey::generate("normal-1"),
        TestKey::generate("fallback-1"),
    );
    let p = TestPath::new("nar-in-fallback");
    let target = format!("{}?hash=abc", p.nar_request_path());
    // A live upstream without the NAR (404) and a dead one.
    let up = FakeUpstream::builder().start();
    let fb = FakeUpstream::builder().file(&target, p.nar.clone()).start();
    let db = db_dir();
    let ups = [entry(up.url(), 10, &kn), entry(dead_url(), 20, &kn)];
    let mut t = config(&ups, &db.path().join("routes.db"));
    with_fallback(&mut t, &fb.url(), &kf);
    let ncro = start(&t);

    let r = ncro.get(&target);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert_eq!(r.body, p.nar, "the fallback's bytes");
    assert_eq!(route(&r), "fallback");
    assert_eq!(r.header("X-Ncro-Upstream"), Some("127.0.0.1"));
    assert_eq!(up.request_count(&target), 1, "the upstreams first");
    assert_eq!(fb.request_count(&target), 1, "path and query as received");

    // Absent from the fallback too: one try, then the usual answer.
    let other = TestPath::new("nar-nowhere").nar_request_path();
    let r = ncro.get(&other);
    assert_eq!(r.status, 502, "a dead upstream could not be asked");
    assert_eq!(fb.request_count(&other), 1);
}

#[test]
fn narinfo_timeout_cuts_a_slow_upstream_while_another_answers() {
    let (ks, kq) = (TestKey::generate("slow-1"), TestKey::generate("quick-1"));
    let p = TestPath::new("slow-first-tier");
    let slow = FakeUpstream::builder()
        .path(&p, &ks)
        .latency(Duration::from_secs(4))
        .start();
    let quick = FakeUpstream::builder().path(&p, &kq).start();
    let ups = [entry(slow.url(), 10, &ks), entry(quick.url(), 20, &kq)];
    let run = |timeout: Option<&str>| {
        let db = db_dir();
        let mut t = config(&ups, &db.path().join("routes.db"));
        set(&mut t, "health", "enabled", false);
        set(&mut t, "health", "hedge_after", "30s");
        set(&mut t, "timeouts", "race_deadline", "30s");
        if let Some(d) = timeout {
            set_upstream(&mut t, 0, "narinfo_timeout", d);
        }
        let ncro = start(&t);
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        r
    };
    // Without the key, tier 1 answers after 4 s and wins (the hedge and
    // the deadline are 30 s away).
    assert!(signed_by(&run(None), &ks));
    // With it, tier 1 is cut at 300 ms and tier 2 answers.
    assert!(signed_by(&run(Some("300ms")), &kq));
}

#[test]
fn want_mass_query_is_announced() {
    let db = db_dir();
    let k = TestKey::generate("any-1");
    let up = FakeUpstream::builder().start();
    let mut t = config(&[entry(up.url(), 10, &k)], &db.path().join("routes.db"));
    let on = start(&t).get("/nix-cache-info");
    assert!(on.text().contains("WantMassQuery: 1\n"), "{}", on.text());
    set(&mut t, "server", "want_mass_query", false);
    let off = start(&t).get("/nix-cache-info");
    assert!(off.text().contains("WantMassQuery: 0\n"), "{}", off.text());
}

/// Narinfo requests a fake received.
fn narinfo_requests(up: &FakeUpstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count()
}

#[test]
fn strict_policy_asks_a_lower_tier_only_after_the_upper_one_answered() {
    const UPPER_LATENCY: Duration = Duration::from_secs(2);
    let (ku, kl) = (TestKey::generate("upper-1"), TestKey::generate("lower-1"));
    let both = TestPath::new("in-both-tiers");
    let lower_only = TestPath::new("in-lower-tier");
    let run = |policy: &str| {
        let upper = FakeUpstream::builder()
            .path(&both, &ku)
            .latency(UPPER_LATENCY)
            .start();
        let lower = FakeUpstream::builder()
            .path(&both, &kl)
            .path(&lower_only, &kl)
            .start();
        let db = db_dir();
        let ups = [entry(upper.url(), 10, &ku), entry(lower.url(), 20, &kl)];
        let mut t = config(&ups, &db.path().join("routes.db"));
        set(&mut t, "health", "enabled", false);
        set(&mut t, "health", "hedge_after", "100ms");
        set(&mut t, "timeouts", "race_deadline", "30s");
        set(&mut t, "cache", "resolution_policy", policy);
        let ncro = start(&t);
        let a = ncro.get(&both.narinfo_request_path());
        assert_eq!(a.status, 200, "{}", ncro.logs());
        let b = ncro.get(&lower_only.narinfo_request_path());
        assert_eq!(b.status, 200, "{}", ncro.logs());
        (a, upper, lower)
    };
    let after_upper = |upper: &FakeUpstream, lower: &FakeUpstream, path: &str| {
        let asked = |f: &FakeUpstream| -> Instant {
            f.requests()
                .iter()
                .find(|r| r.path == path)
                .map(|r| r.at)
                .expect("asked")
        };
        asked(lower) >= asked(upper) + UPPER_LATENCY
    };

    let (a, upper, lower) = run("strict");
    assert!(signed_by(&a, &ku), "the upper tier answered: {}", a.text());
    assert_eq!(
        lower.request_count(&both.narinfo_request_path()),
        0,
        "strict: the lower tier is not asked while the upper one may answer"
    );
    assert!(
        after_upper(&upper, &lower, &lower_only.narinfo_request_path()),
        "strict: the lower tier is asked only after the upper tier's 404"
    );

    let (_, upper, lower) = run("hedged");
    assert_eq!(
        lower.request_count(&both.narinfo_request_path()),
        1,
        "hedged: the lower tier joins once the upper one is late"
    );
    assert!(
        !after_upper(&upper, &lower, &lower_only.narinfo_request_path()),
        "hedged: the lower tier is asked before the upper tier answers"
    );
}

#[test]
fn unavailable_answer_chooses_between_502_and_a_short_lived_404() {
    let k = TestKey::generate("comes-back-1");
    let p = TestPath::new("behind-an-outage");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let db = db_dir();
    let mut t = config(&[entry(url, 10, &k)], &db.path().join("routes.db"));
    set(&mut t, "health", "enabled", false);
    let default = start(&t);
    let r = default.get(&p.narinfo_request_path());
    assert_eq!(r.status, 502, "{}", default.logs());
    drop(default);

    let db = db_dir();
    set(
        &mut t,
        "cache",
        "db_path",
        db.path().join("routes.db").to_string_lossy().into_owned(),
    );
    set(&mut t, "cache", "unavailable_answer", "404");
    set(&mut t, "cache", "negative_ttl", "1h");
    let mut mq = toml::Table::new();
    mq.insert("in_memory_negative_ttl".into(), "1s".into());
    t.get_mut("cache")
        .and_then(|c| c.as_table_mut())
        .expect("cache table")
        .insert("mass_query".into(), mq.into());
    let ncro = start(&t);
    let r = ncro.get(&p.narinfo_request_path());
    assert_eq!(r.status, 404, "{}", ncro.logs());

    // The upstream comes back: the 404 was not remembered for
    // cache.negative_ttl (1 h), only for the in-memory negative TTL.
    let _up = FakeUpstream::builder()
        .path(&p, &k)
        .start_on(([127, 0, 0, 1], port).into())
        .expect("rebind the upstream's port");
    let until = Instant::now() + Duration::from_secs(30);
    let served = loop {
        let r = ncro.get(&p.narinfo_request_path());
        if r.status == 200 || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(served.status, 200, "{}", ncro.logs());
}

#[test]
fn narinfo_answers_say_where_they_came_from() {
    let k = TestKey::generate("origin-1");
    let p = TestPath::new("provenance");
    let up = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let t = config(&[entry(up.url(), 10, &k)], &db.path().join("routes.db"));
    let ncro = start(&t);
    let path = p.narinfo_request_path();
    let raced = ncro.get(&path);
    assert_eq!(raced.status, 200, "{}", ncro.logs());
    assert_eq!(route(&raced), "race");
    assert_eq!(upstream_host(&raced), "127.0.0.1");
    let hit = ncro.get(&path);
    assert_eq!(route(&hit), "cache-hit");
    assert_eq!(upstream_host(&hit), "127.0.0.1");
    let head = ncro.request("HEAD", &path, &[]).expect("HEAD");
    assert_eq!(head.status, 200);
    assert_eq!(route(&head), "cache-hit");
    assert_eq!(upstream_host(&head), "127.0.0.1");
    assert_eq!(head.header("Content-Length"), hit.header("Content-Length"));

    // After a restart the route comes from SQLite: still a cache hit.
    stop(ncro);
    let ncro = start(&t);
    let cold = ncro.get(&path);
    assert_eq!(cold.status, 200, "{}", ncro.logs());
    assert_eq!(route(&cold), "cache-hit");
    assert_eq!(upstream_host(&cold), "127.0.0.1");
    assert_eq!(up.request_count(&path), 1, "one race in all");
}
