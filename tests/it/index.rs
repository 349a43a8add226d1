//! Index-aware routing through the real `ncro` binary: fake upstreams that
//! advertise a NixBloom filter or serve an RFC 0195 index are not asked for
//! paths their summary rules out (counted at the fake), are still asked for
//! the rest, and are raced as usual when the summary is broken or stale.
//! Also: ncro's own filter of known routes, consumed by a second ncro.
//! Summaries are written by `index/formats.rs`, independently of ncro.

mod formats;

use std::time::Duration;

use crate::fake::{random_hash, FakeUpstream, FakeUpstreamBuilder, TestKey, TestPath};
use crate::harness::{HttpConn, NcroProcess};
use crate::metrics::{scrape, scrape_until, Scrape};
use crate::routing::{db_dir, entry, NcroConfig};

/// Polls `/metrics` until `ready` holds (summaries refresh asynchronously).
fn wait_metrics(ncro: &NcroProcess, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    scrape_until(ncro, what, Duration::from_secs(20), ready)
}

/// Waits until ncro uses a summary of `url`.
fn wait_summary(ncro: &NcroProcess, url: &str, source: &str) -> Scrape {
    let labels = [("upstream", url), ("source", source)];
    wait_metrics(ncro, &format!("a {source} summary of {url}"), |m| {
        m.get("ncro_index_summary_bytes", &labels).is_some()
    })
}

fn narinfo_requests(up: &FakeUpstream, hash: &str) -> usize {
    up.request_count(&format!("/{hash}.narinfo"))
}

/// A fake serving `paths` that advertises a NixBloom filter of `members`,
/// roomy enough (sized for 10 000 paths at 10⁻⁶) that a random hash is
/// never a false positive in these tests.
fn bloom_upstream(paths: &[&TestPath], members: &[&str], key: &TestKey) -> FakeUpstream {
    let bloom = if members.is_empty() {
        formats::nixbloom(&[], 0, 0.01)
    } else {
        formats::nixbloom(members, 10_000, 1e-6)
    };
    advertising(paths, bloom, key)
}

fn advertising(paths: &[&TestPath], bloom: Vec<u8>, key: &TestKey) -> FakeUpstream {
    let info = "StoreDir: /nix/store\nWantMassQuery: 1\nBloomFilter: bloom-filter\n";
    with_paths(FakeUpstream::builder(), paths, key)
        .file_with_type("/nix-cache-info", "text/x-nix-cache-info", info)
        .file("/bloom-filter", bloom)
        .start()
}

fn with_paths(
    mut b: FakeUpstreamBuilder,
    paths: &[&TestPath],
    key: &TestKey,
) -> FakeUpstreamBuilder {
    for p in paths {
        b = b.path(p, key);
    }
    b
}

fn config(ups: &[crate::routing::UpstreamEntry], db: &std::path::Path) -> NcroConfig {
    NcroConfig::new(ups, &db.join("routes.db"))
        .set("index", "enabled", true)
        .set("index", "refresh_interval", "1h")
        .set("index", "max_age", "1h")
}

fn skipped(m: &Scrape, url: &str) -> f64 {
    m.value("ncro_index_skipped_requests_total", &[("upstream", url)])
}

#[test]
fn a_bloom_filter_keeps_misses_away_and_lets_hits_through() {
    let (ka, kb) = (
        TestKey::generate("bloom-a-1"),
        TestKey::generate("plain-b-1"),
    );
    let (on_a, on_b) = (TestPath::new("on-a"), TestPath::new("on-b"));
    let a = bloom_upstream(&[&on_a], &[&on_a.hash], &ka);
    let b = with_paths(FakeUpstream::builder(), &[&on_b], &kb).start(); // no index
    let db = db_dir();
    let ncro = config(
        &[entry(a.url(), 10, &ka), entry(b.url(), 10, &kb)],
        db.path(),
    )
    .start();
    wait_summary(&ncro, &a.url(), "nixbloom");

    let r = ncro.get(&on_b.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        narinfo_requests(&a, &on_b.hash),
        0,
        "a's filter rules on_b out"
    );
    let r = ncro.get(&on_a.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(narinfo_requests(&a, &on_a.hash), 1, "a member is asked for");
    // Nobody has it: a is ruled out, b says 404, so the miss is definite.
    let nowhere = random_hash();
    assert_eq!(ncro.get(&format!("/{nowhere}.narinfo")).status, 404);
    assert_eq!(narinfo_requests(&a, &nowhere), 0);
    assert_eq!(narinfo_requests(&b, &nowhere), 1);
    let m = scrape(&ncro);
    assert_eq!(skipped(&m, &a.url()), 2.0);
    assert_eq!(skipped(&m, &b.url()), 0.0);
    let age = m.value(
        "ncro_index_summary_age_seconds",
        &[("upstream", &a.url()), ("source", "nixbloom")],
    );
    assert!((0.0..3600.0).contains(&age), "{age}");
}

#[test]
fn every_upstream_ruled_out_is_a_404_without_a_request() {
    let (ka, kb) = (
        TestKey::generate("bloom-a-1"),
        TestKey::generate("bloom-b-1"),
    );
    let p = TestPath::new("somewhere");
    let a = bloom_upstream(&[&p], &[&p.hash], &ka);
    let b = bloom_upstream(&[], &[], &kb); // an empty filter: has nothing
    let db = db_dir();
    let ncro = config(
        &[entry(a.url(), 10, &ka), entry(b.url(), 20, &kb)],
        db.path(),
    )
    .start();
    wait_summary(&ncro, &a.url(), "nixbloom");
    wait_summary(&ncro, &b.url(), "nixbloom");
    let before = (a.requests().len(), b.requests().len());
    let nowhere = random_hash();
    assert_eq!(ncro.get(&format!("/{nowhere}.narinfo")).status, 404);
    assert_eq!(
        (a.requests().len(), b.requests().len()),
        before,
        "no upstream asked"
    );
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(narinfo_requests(&b, &p.hash), 0);
}

/// Hashes starting with `c`, so a depth-1 index puts them in one shard
/// and leaves most shards empty.
fn hash_starting(c: char) -> String {
    format!("{c}{}", &random_hash()[1..])
}

#[test]
fn an_rfc0195_index_keeps_misses_away_and_reads_the_journal() {
    let key = TestKey::generate("rfc-1");
    let in_shard = TestPath::with_hash(&hash_starting('a'), "in-shard", b"x");
    let in_journal = TestPath::with_hash(&hash_starting('a'), "pushed-later", b"y");
    let other = TestPath::with_hash(&hash_starting('a'), "elsewhere", b"z");
    let mut b = with_paths(FakeUpstream::builder(), &[&in_shard, &in_journal], &key);
    for (path, body) in formats::rfc_index(&[&in_shard.hash, &random_hash()], 1) {
        b = b.file(&path, body);
    }
    let journal = format!("+{}\n-{}\n", in_journal.hash, random_hash());
    let up = b.file("/nix-cache-index/journal/1000.log", journal).start();
    let kb = TestKey::generate("plain-1");
    let plain = with_paths(FakeUpstream::builder(), &[&other], &kb).start();
    let db = db_dir();
    // Three items: only a tiny false-positive rate makes "ruled out" certain.
    let ncro = config(
        &[entry(up.url(), 10, &key), entry(plain.url(), 10, &kb)],
        db.path(),
    )
    .set("index", "false_positive_rate", 1e-9)
    .start();
    wait_summary(&ncro, &up.url(), "rfc0195");

    for p in [&in_shard, &in_journal, &other] {
        assert_eq!(
            ncro.get(&p.narinfo_request_path()).status,
            200,
            "{}",
            p.name
        );
    }
    assert_eq!(narinfo_requests(&up, &in_shard.hash), 1);
    assert_eq!(
        narinfo_requests(&up, &in_journal.hash),
        1,
        "journal additions count"
    );
    assert_eq!(
        narinfo_requests(&up, &other.hash),
        0,
        "ruled out by its shard"
    );
    assert!(
        up.request_count("/nix-cache-index/journal/700.log") >= 1,
        "the segment rotated last is read too"
    );
    assert_eq!(skipped(&scrape(&ncro), &up.url()), 1.0);
}

#[test]
fn broken_summaries_mean_racing_as_usual_and_are_counted() {
    let key = TestKey::generate("broken-1");
    let info = "StoreDir: /nix/store\nBloomFilter: /bloom-filter\n";
    let garbage = FakeUpstream::builder()
        .file_with_type("/nix-cache-info", "text/x-nix-cache-info", info)
        .file("/bloom-filter", b"NixBloom but not really".to_vec())
        .start();
    // An RFC index whose shard's data was altered after checksumming.
    let mut b = FakeUpstream::builder();
    for (path, mut body) in formats::rfc_index(&[&random_hash(), &random_hash()], 0) {
        if path.ends_with(".idx") {
            *body.last_mut().unwrap() ^= 1;
        }
        b = b.file(&path, body);
    }
    let corrupt = b.start();
    let db = db_dir();
    let ups = [
        entry(garbage.url(), 10, &key),
        entry(corrupt.url(), 10, &key),
    ];
    let ncro = config(&ups, db.path()).start();
    let errors = |m: &Scrape, url: &str| {
        m.value(
            "ncro_index_refresh_errors_total",
            &[("upstream", url), ("kind", "parse")],
        )
    };
    let m = wait_metrics(&ncro, "both refreshes failing", |m| {
        errors(m, &garbage.url()) >= 1.0 && errors(m, &corrupt.url()) >= 1.0
    });
    assert!(!m.text.contains("ncro_index_summary_bytes{"), "{}", m.text);
    let h = random_hash();
    assert_eq!(ncro.get(&format!("/{h}.narinfo")).status, 404);
    assert_eq!(narinfo_requests(&garbage, &h), 1, "raced as usual");
    assert_eq!(narinfo_requests(&corrupt, &h), 1, "raced as usual");
}

#[test]
fn a_stale_summary_is_ignored() {
    let key = TestKey::generate("stale-1");
    let p = TestPath::new("known");
    let up = bloom_upstream(&[&p], &[&p.hash], &key);
    let db = db_dir();
    let ncro = config(&[entry(up.url(), 10, &key)], db.path())
        .set("index", "max_age", "1s")
        .start();
    wait_summary(&ncro, &up.url(), "nixbloom");
    let fresh = random_hash();
    assert_eq!(ncro.get(&format!("/{fresh}.narinfo")).status, 404);
    assert_eq!(narinfo_requests(&up, &fresh), 0, "fresh: ruled out");
    // No refresh for an hour: past max_age the summary no longer counts.
    let labels = [("upstream", up.url()), ("source", "nixbloom".to_owned())];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    wait_metrics(&ncro, "the summary aging past max_age", |m| {
        m.get("ncro_index_summary_age_seconds", &labels)
            .is_some_and(|age| age > 1.2)
    });
    let stale = random_hash();
    assert_eq!(ncro.get(&format!("/{stale}.narinfo")).status, 404);
    assert_eq!(narinfo_requests(&up, &stale), 1, "stale: asked");
}

/// ncro B routes through ncro A (and a plain cache). A publishes a filter
/// of the routes it knows; B skips A for every hash A has not routed.
#[test]
fn a_downstream_ncro_skips_an_upstream_ncro_for_hashes_it_does_not_know() {
    let key = TestKey::generate("origin-1");
    let (known, unknown) = (TestPath::new("known"), TestPath::new("unknown"));
    let origin = with_paths(FakeUpstream::builder(), &[&known], &key).start();
    let (db_a, db_b) = (db_dir(), db_dir());
    let a = NcroConfig::new(
        &[entry(origin.url(), 10, &key)],
        &db_a.path().join("routes.db"),
    )
    .set("index", "publish", true)
    .set("index", "publish_interval", "100ms")
    // One route: only a tiny false-positive rate makes "ruled out" certain.
    .set("index", "false_positive_rate", 1e-9)
    .start();
    let info = a.get("/nix-cache-info").text();
    assert!(info.contains("\nBloomFilter: bloom-filter\n"), "{info}");
    assert_eq!(a.get(&known.narinfo_request_path()).status, 200);
    wait_metrics(&a, "A publishing its route", |m| {
        m.get("ncro_index_published_routes", &[]) == Some(1.0)
    });
    let filter = a.get("/bloom-filter");
    assert_eq!(filter.status, 200);
    assert_eq!(&filter.body[..8], b"NixBloom");
    let etag = filter.header("etag").expect("an ETag").to_owned();
    let mut conn = HttpConn::connect(a.addr()).unwrap();
    let again = conn
        .request("GET", "/bloom-filter", &[("If-None-Match", &etag)])
        .unwrap();
    assert_eq!(again.status, 304);

    let k2 = TestKey::generate("plain-2");
    let plain = with_paths(FakeUpstream::builder(), &[&unknown], &k2).start();
    let ups = [entry(a.url(), 10, &key), entry(plain.url(), 10, &k2)];
    let b = config(&ups, db_b.path()).start();
    wait_summary(&b, &a.url(), "nixbloom");
    let a_narinfos = |a: &NcroProcess| {
        scrape(a).value("ncro_narinfo_requests_total", &[("status", "200")])
            + scrape(a).value("ncro_narinfo_requests_total", &[("status", "error")])
    };
    let before = a_narinfos(&a);
    assert_eq!(b.get(&unknown.narinfo_request_path()).status, 200);
    assert_eq!(
        a_narinfos(&a),
        before,
        "A is not asked for a hash it does not know"
    );
    // A filter of one route stays as tight as planned (a filter sized by
    // the bare format rule let about 1 in 28 random hashes through).
    for _ in 0..40 {
        assert_eq!(b.get(&format!("/{}.narinfo", random_hash())).status, 404);
    }
    assert_eq!(a_narinfos(&a), before, "A is not asked for random misses");
    assert_eq!(b.get(&known.narinfo_request_path()).status, 200);
    assert_eq!(a_narinfos(&a), before + 1.0, "A is asked for its route");
    assert_eq!(
        skipped(&scrape(&b), &a.url()),
        41.0,
        "unknown and the 40 random misses"
    );
    assert_eq!(narinfo_requests(&origin, &unknown.hash), 0);
}

/// Requests the fakes received and ncro's own accounting for `n` cold
/// narinfo lookups, each held by exactly one of three upstreams, plus `n`
/// lookups nobody holds; with and without their filters.
struct Workload {
    hits_sent: usize,
    misses_sent: usize,
    skipped: f64,
    false_positives: f64,
}

fn miss_heavy(n: usize, use_index: bool) -> Workload {
    let keys: Vec<TestKey> = (0..3)
        .map(|i| TestKey::generate(&format!("third-{i}")))
        .collect();
    let paths: Vec<TestPath> = (0..n).map(|i| TestPath::new(&format!("p{i}"))).collect();
    let ups: Vec<FakeUpstream> = (0..3)
        .map(|u| {
            let mine: Vec<&TestPath> = paths.iter().skip(u).step_by(3).collect();
            let hashes: Vec<&str> = mine.iter().map(|p| p.hash.as_str()).collect();
            // Sized as a cache would size it: its paths at 1 %.
            advertising(
                &mine,
                formats::nixbloom(&hashes, hashes.len(), 0.01),
                &keys[u],
            )
        })
        .collect();
    let entries: Vec<_> = ups
        .iter()
        .zip(&keys)
        .map(|(u, k)| entry(u.url(), 10, k))
        .collect();
    let db = db_dir();
    let ncro = config(&entries, db.path())
        .set("index", "enabled", use_index)
        .start();
    if use_index {
        ups.iter()
            .for_each(|u| drop(wait_summary(&ncro, &u.url(), "nixbloom")));
    }
    let sent = |ups: &[FakeUpstream]| -> usize {
        ups.iter()
            .map(|u| {
                u.requests()
                    .iter()
                    .filter(|r| r.path.ends_with(".narinfo"))
                    .count()
            })
            .sum()
    };
    let mut conn = HttpConn::connect(ncro.addr()).unwrap();
    for p in &paths {
        assert_eq!(conn.get(&p.narinfo_request_path()).unwrap().status, 200);
    }
    let hits_sent = sent(&ups);
    for _ in 0..n {
        assert_eq!(
            conn.get(&format!("/{}.narinfo", random_hash()))
                .unwrap()
                .status,
            404
        );
    }
    let m = scrape(&ncro);
    let total = |name: &str| -> f64 {
        ups.iter()
            .map(|u| m.value(name, &[("upstream", &u.url())]))
            .sum()
    };
    Workload {
        hits_sent,
        misses_sent: sent(&ups) - hits_sent,
        skipped: total("ncro_index_skipped_requests_total"),
        false_positives: total("ncro_index_false_positives_total"),
    }
}

fn check_savings(n: usize) -> (Workload, Workload) {
    let without = miss_heavy(n, false);
    let with = miss_heavy(n, true);
    // Without summaries every miss asks all three; with them only false
    // positives (1 % per upstream) are asked.
    // At least: under load a pooled connection the fake upstream closed
    // may make the client resend one request.
    assert!(without.misses_sent >= 3 * n, "{}", without.misses_sent);
    assert!(with.misses_sent <= n / 10 + 3, "{}", with.misses_sent);
    assert!(with.hits_sent <= n + n / 10 + 3, "{}", with.hits_sent);
    assert!(with.skipped >= n as f64 * 4.8, "{}", with.skipped);
    assert_eq!(without.skipped, 0.0);
    (without, with)
}

#[test]
fn a_miss_heavy_workload_saves_requests() {
    check_savings(120);
}

/// The measurement in docs/index-routing.md:
/// `cargo test --test it index::measure_miss_heavy_workload -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_miss_heavy_workload() {
    let n = 1000;
    let (without, with) = check_savings(n);
    println!("{n} cold hits (each on one of 3 upstreams) + {n} misses (on none):");
    for (label, w) in [("index off", &without), ("index on", &with)] {
        println!(
            "{label}: narinfo requests received by the upstreams: hits {}, misses {}, total {}; skipped {}; false positives {}",
            w.hits_sent,
            w.misses_sent,
            w.hits_sent + w.misses_sent,
            w.skipped,
            w.false_positives
        );
    }
}
