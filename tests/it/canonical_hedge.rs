//! Canonical NAR URLs and NAR hedging together, through the real `ncro`
//! binary (docs/nar-failover.md, "Canonical NAR URLs" and "Hedging"): a
//! hedge of a canonical request goes only to an upstream whose narinfo
//! proves the same file, the proof being part of its attempt, and a hedge
//! winner cut mid-stream is finished by the routed upstream it beat.

use std::time::{Duration, Instant};

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::faults::fetch::{fetch, Got};
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

const LIMIT: Duration = Duration::from_secs(30);
/// Longer than any test waits: a head held this long never arrives.
const SLOW: Duration = Duration::from_secs(60);

fn canonical(p: &TestPath) -> String {
    format!("/nar/{}.nar", p.hash)
}

fn hedging(delay: &str, max_inflight: i64) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("enabled".into(), true.into());
    t.insert("delay".into(), delay.into());
    t.insert("max_inflight".into(), max_inflight.into());
    toml::Value::Table(t)
}

/// `p`'s narinfo with its file at `url` (the same file: the signature does
/// not cover the file fields).
fn renamed(p: &TestPath, k: &TestKey, url: &str) -> String {
    p.narinfo(&[k]).replace(&p.nar_url(), url)
}

/// `ups` in order with priorities 10, 20, ... (the first wins the narinfo
/// race), one worker, hedging after `delay`; the narinfo is fetched first,
/// like Nix does, so that the canonical request is routed to the first.
fn start(
    ups: &[&FakeUpstream],
    k: &TestKey,
    p: &TestPath,
    delay: &str,
    max: i64,
) -> (NcroProcess, tempfile::TempDir) {
    let db = db_dir();
    let entries: Vec<_> = ups
        .iter()
        .enumerate()
        .map(|(i, u)| entry(u.url(), 10 * (i as i32 + 1), k))
        .collect();
    let ncro = NcroConfig::new(&entries, &db.path().join("r.db"))
        .set("server", "workers", 1)
        .set("timeouts", "first_byte", "90s")
        .set("cache", "nar_hedging", hedging(delay, max))
        .start();
    let r = fetch(ncro.addr(), &p.narinfo_request_path(), &[], LIMIT);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    let url = String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned));
    assert_eq!(url, Some(format!("nar/{}.nar", p.hash)), "to_self URL");
    (ncro, db)
}

fn assert_whole(got: &Got, p: &TestPath, ncro: &NcroProcess) {
    assert_eq!(got.status, 200, "{:?}\n{}", got.headers, ncro.logs());
    assert!(
        got.complete && got.body == p.nar,
        "{} of {} bytes\n{}",
        got.body.len(),
        p.nar.len(),
        ncro.logs()
    );
}

fn counter(ncro: &NcroProcess, family: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(ncro).value(family, labels)
}

/// The routed upstream A holds its NAR head; B holds the same file under
/// another name (its narinfo proves it), C the same store path in another
/// compression. Hedging fires for both: C's proof fails, so C is never
/// asked for a NAR; B's proof succeeds and B wins, byte exact, marked
/// `hedge`. Each proof is one narinfo request, made when its attempt
/// starts.
#[test]
fn a_slow_canonical_nar_is_hedged_only_to_an_upstream_proving_the_same_file() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("canon-hedge", &random_bytes(64 * 1024));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(PathMatch::exact(&p.nar_request_path()), Fault::Delay(SLOW))
        .start();
    // B's head comes after a while, so that C is started as a hedge too,
    // whichever of the two the NAR order puts first.
    let b = FakeUpstream::builder()
        .narinfo(&p.hash, renamed(&p, &k, "blobs/renamed.nar"))
        .file("/blobs/renamed.nar", p.nar.clone())
        .rule(
            PathMatch::exact("/blobs/renamed.nar"),
            Fault::Delay(Duration::from_millis(800)),
        )
        .start();
    let xz = "sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3";
    let c = FakeUpstream::builder()
        .narinfo(
            &p.hash,
            renamed(&p, &k, "nar/x.nar.xz")
                .replace("Compression: none", "Compression: xz")
                .replace(
                    &format!("FileHash: {}", p.nar_hash()),
                    &format!("FileHash: {xz}"),
                ),
        )
        .file("/nar/x.nar.xz", p.nar.clone())
        .start();
    let (ncro, _db) = start(&[&a, &c, &b], &k, &p, "200ms", 3);
    let narinfos = |u: &FakeUpstream| u.request_count(&p.narinfo_request_path());
    let (b_before, c_before) = (narinfos(&b), narinfos(&c));

    let sent = Instant::now();
    let got = fetch(ncro.addr(), &canonical(&p), &[], LIMIT);
    assert_whole(&got, &p, &ncro);
    assert_eq!(
        got.header("X-Ncro-Route"),
        Some("hedge"),
        "{:?}",
        got.headers
    );
    assert_eq!(got.header("X-Ncro-Upstream"), Some("127.0.0.1"));
    assert!(got.elapsed < SLOW / 2, "waited for A: {:?}", got.elapsed);

    // A was asked once, at its real path, and lost.
    assert_eq!(a.request_count(&p.nar_request_path()), 1);
    // B: proved by one narinfo request, then asked for its own file, not
    // before the hedge delay.
    assert_eq!(narinfos(&b), b_before + 1, "one proof");
    let b_nars: Vec<_> = b
        .requests()
        .into_iter()
        .filter(|r| r.path == "/blobs/renamed.nar")
        .collect();
    assert_eq!(b_nars.len(), 1);
    let gap = b_nars[0].at.duration_since(sent);
    assert!(gap >= Duration::from_millis(200), "hedged after {gap:?}");
    // C: its narinfo was asked (the proof) and refused; nothing else.
    assert_eq!(narinfos(&c), c_before + 1, "one proof");
    let c_other: Vec<String> = c
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|path| *path != p.narinfo_request_path())
        .collect();
    assert!(c_other.is_empty(), "C was asked for {c_other:?}");

    let hedges = |event: &str, u: &FakeUpstream| {
        counter(
            &ncro,
            "ncro_nar_hedges_total",
            &[("event", event), ("upstream", &u.url())],
        )
    };
    assert_eq!(hedges("won", &b), 1.0);
    assert_eq!(hedges("started", &c), 1.0);
    assert_eq!(hedges("cancelled", &a), 1.0);
    let c_failed = counter(
        &ncro,
        "ncro_nar_hedge_failures_total",
        &[("kind", "not_found"), ("upstream", &c.url())],
    );
    assert_eq!(c_failed, 1.0, "C's failed proof is a not_found attempt");
}

/// The hedge B wins and is cut mid-body; the routed upstream A, cancelled
/// as the hedge loser, still holds the promised file and finishes the body
/// from where the client is, at its own path.
#[test]
fn a_cut_hedge_winner_is_finished_by_the_cancelled_routed_upstream() {
    const CUT: usize = 40 * 1024;
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("canon-hedge-cut", &random_bytes(160 * 1024));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(
            PathMatch::exact(&p.nar_request_path()),
            Fault::nth(1, Fault::Delay(SLOW)),
        )
        .start();
    let b = FakeUpstream::builder()
        .narinfo(&p.hash, renamed(&p, &k, "blobs/cut.nar"))
        .file("/blobs/cut.nar", p.nar.clone())
        .rule(PathMatch::exact("/blobs/cut.nar"), Fault::ResetMidBody(CUT))
        .start();
    let (ncro, _db) = start(&[&a, &b], &k, &p, "200ms", 2);

    let got = fetch(ncro.addr(), &canonical(&p), &[], LIMIT);
    assert_whole(&got, &p, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"));
    assert_eq!(b.request_count("/blobs/cut.nar"), 1);
    let a_nars: Vec<Option<String>> = a
        .requests()
        .into_iter()
        .filter(|r| r.path == p.nar_request_path())
        .map(|r| r.header("Range").map(str::to_owned))
        .collect();
    assert_eq!(a_nars.len(), 2, "{a_nars:?}");
    assert_eq!(a_nars[0], None, "the hedged open");
    let range = a_nars[1].clone().expect("a Range continuation");
    let last = p.nar.len() - 1;
    let from: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix(&format!("-{last}")))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected Range {range}"));
    assert!(from > 0 && from <= CUT, "{range}");
    let ok = eventually(Duration::from_secs(10), || {
        counter(
            &ncro,
            "ncro_nar_failovers_total",
            &[("result", "completed")],
        ) == 1.0
    });
    assert!(ok, "{}", ncro.logs());
}

/// A proof is part of its attempt: B's narinfo (its proof) is slow, so
/// after the hedge delay the next candidate, C, is started beside it, as
/// for a slow NAR head; C proves the same file and wins. B, cancelled
/// while proving, is never asked for the NAR.
#[test]
fn a_slow_proof_is_hedged_like_a_slow_attempt() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("canon-slow-proof", &random_bytes(32 * 1024));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(PathMatch::exact(&p.nar_request_path()), Fault::Delay(SLOW))
        .start();
    let b = FakeUpstream::builder()
        .narinfo(&p.hash, renamed(&p, &k, "blobs/b.nar"))
        .file("/blobs/b.nar", p.nar.clone())
        .rule(PathMatch::suffix(".narinfo"), Fault::Delay(SLOW))
        .start();
    let c = FakeUpstream::builder()
        .narinfo(&p.hash, renamed(&p, &k, "blobs/c.nar"))
        .file("/blobs/c.nar", p.nar.clone())
        .start();
    // Priorities 10, 20, 30: three tiers, so the NAR order is A, B, C.
    let (ncro, _db) = start(&[&a, &b, &c], &k, &p, "200ms", 3);

    let got = fetch(ncro.addr(), &canonical(&p), &[], LIMIT);
    assert_whole(&got, &p, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"));
    assert!(
        got.elapsed < SLOW / 2,
        "waited for a proof: {:?}",
        got.elapsed
    );
    assert_eq!(c.request_count("/blobs/c.nar"), 1);
    assert_eq!(b.request_count("/blobs/b.nar"), 0, "B never proved it");
    assert!(
        b.request_count(&p.narinfo_request_path()) >= 1,
        "B's proof was started"
    );
    let started = |u: &FakeUpstream| {
        counter(
            &ncro,
            "ncro_nar_hedges_total",
            &[("event", "started"), ("upstream", &u.url())],
        )
    };
    assert_eq!((started(&b), started(&c)), (1.0, 1.0));
}
