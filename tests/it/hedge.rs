//! NAR hedging through the real `ncro` binary (docs/nar-failover.md,
//! "Hedging"): a first upstream slow to start its body makes ncro ask the
//! next one holding the same file; the first body to start wins, byte
//! exact, and the loser's connection is closed. Plus `enabled = false`,
//! `allow_hedging = false`, `max_inflight`, a failed first attempt, a
//! winner cut mid-body, and `upstreams[].nar_timeout`. The per-upstream
//! stream cap is in [`limits`].

mod limits;

use std::time::Duration;

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::faults::fetch::{fetch, Got};
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

const NAR_FILE: usize = 160 * 1024;
/// Longest one client exchange may take in these tests.
const LIMIT: Duration = Duration::from_secs(15);
/// How long a "slow" first upstream holds its NAR head: far beyond
/// `LIMIT`, so a test that completes did not wait for it.
const SLOW: Duration = Duration::from_secs(60);

/// Upstream `i` of `ups` gets `key = value` (keys the harness' config
/// builder has no setter for).
fn with_upstream_keys(cfg: &NcroConfig, keys: &[(usize, &str, toml::Value)]) -> String {
    let mut table: toml::Table = toml::from_str(&cfg.render()).expect("config renders TOML");
    let ups = table
        .get_mut("upstreams")
        .and_then(toml::Value::as_array_mut)
        .expect("upstreams array");
    for (i, k, v) in keys {
        ups[*i]
            .as_table_mut()
            .expect("upstream table")
            .insert((*k).to_owned(), v.clone());
    }
    toml::to_string(&table).expect("config serialises")
}

fn hedging(enabled: bool, delay: &str, max_inflight: i64) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("enabled".into(), enabled.into());
    t.insert("delay".into(), delay.into());
    t.insert("max_inflight".into(), max_inflight.into());
    toml::Value::Table(t)
}

/// A NAR served by `a` (with its narinfo, so that the NAR is routed to it
/// first) and held by each of `others` under the same URL.
struct Setup {
    k: TestKey,
    p: TestPath,
    _db: tempfile::TempDir,
    db_path: std::path::PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let db = db_dir();
        Setup {
            k: TestKey::generate("k-1"),
            p: TestPath::with_contents(tag, &random_bytes(NAR_FILE)),
            db_path: db.path().join("r.db"),
            _db: db,
        }
    }

    fn nar(&self) -> String {
        self.p.nar_request_path()
    }

    /// The routed upstream: narinfo and NAR, NAR requests under `fault`.
    fn first(&self, fault: Fault) -> FakeUpstream {
        FakeUpstream::builder()
            .path(&self.p, &self.k)
            .rule(PathMatch::exact(&self.nar()), fault)
            .start()
    }

    /// Another holder of the NAR file only.
    fn holder(&self, fault: Option<Fault>) -> FakeUpstream {
        let mut b = FakeUpstream::builder().file(&self.nar(), self.p.nar.clone());
        if let Some(f) = fault {
            b = b.rule(PathMatch::exact(&self.nar()), f);
        }
        b.start()
    }

    /// One worker; upstreams in order with priorities 10, 20, 30, ...
    fn config(&self, ups: &[&FakeUpstream]) -> NcroConfig {
        let entries: Vec<_> = ups
            .iter()
            .enumerate()
            .map(|(i, u)| entry(u.url(), 10 * (i as i32 + 1), &self.k))
            .collect();
        NcroConfig::new(&entries, &self.db_path)
            .set("server", "workers", 1)
            .set("timeouts", "first_byte", "90s")
    }

    /// Starts ncro and routes the NAR to the first upstream (like Nix: the
    /// narinfo first).
    fn start(&self, config: &str) -> NcroProcess {
        let ncro = NcroProcess::start(config);
        let r = ncro.get(&self.p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        ncro
    }

    fn get(&self, ncro: &NcroProcess) -> Got {
        fetch(ncro.addr(), &self.nar(), &[], LIMIT)
    }

    fn assert_whole(&self, got: &Got, ncro: &NcroProcess) {
        assert_eq!(got.status, 200, "{:?}\n{}", got.headers, ncro.logs());
        assert!(
            got.complete && got.body == self.p.nar,
            "{} of {} bytes\n{}",
            got.body.len(),
            self.p.nar.len(),
            ncro.logs()
        );
    }
}

fn nar_requests(up: &FakeUpstream, path: &str) -> Vec<crate::fake::RequestRecord> {
    up.requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

fn hedges(ncro: &NcroProcess, event: &str, up: &FakeUpstream) -> f64 {
    scrape(ncro).value(
        "ncro_nar_hedges_total",
        &[("event", event), ("upstream", &up.url())],
    )
}

/// The first upstream holds its NAR head; the second starts after the
/// hedge delay and wins, byte exact, marked `X-Ncro-Route: hedge`; the
/// first attempt is cancelled and its connection never reused.
#[test]
fn a_slow_first_upstream_is_hedged_and_the_second_wins() {
    let s = Setup::new("hedge-win");
    let a = s.first(Fault::nth(1, Fault::Delay(SLOW)));
    let b = s.holder(None);
    let cfg = s
        .config(&[&a, &b])
        .set("cache", "nar_hedging", hedging(true, "200ms", 2));
    let ncro = s.start(&cfg.render());
    let sent = std::time::Instant::now();
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"), "{:?}", got.headers);
    let (a_reqs, b_reqs) = (nar_requests(&a, &s.nar()), nar_requests(&b, &s.nar()));
    assert_eq!((a_reqs.len(), b_reqs.len()), (1, 1));
    // Measured from the client's request, not from A's arrival (which a
    // slow machine may delay): B is started no sooner than the delay.
    let gap = b_reqs[0].at.duration_since(sent);
    assert!(gap >= Duration::from_millis(200), "hedged after {gap:?}");
    assert_eq!(hedges(&ncro, "started", &b), 1.0);
    assert_eq!(hedges(&ncro, "won", &b), 1.0);
    assert_eq!(hedges(&ncro, "cancelled", &a), 1.0);
    assert_eq!(hedges(&ncro, "started", &a), 0.0);
    // The loser's connection was closed, not pooled: A's next request
    // (now prompt: the rule was for the first NAR request only) comes on
    // another connection, and is not a hedge.
    let again = s.get(&ncro);
    s.assert_whole(&again, &ncro);
    assert_eq!(again.header("X-Ncro-Route"), Some("cache-hit"));
    let a_reqs = nar_requests(&a, &s.nar());
    assert_eq!(a_reqs.len(), 2, "the second fetch goes to A first");
    assert_ne!(a_reqs[1].conn, a_reqs[0].conn, "the cancelled connection was reused");
    assert_eq!(nar_requests(&b, &s.nar()).len(), 1);
}

/// With hedging off, the second upstream is never asked while the first
/// is still answering: the client waits for the slow head.
#[test]
fn with_hedging_disabled_no_second_request_before_the_first_fails() {
    let s = Setup::new("hedge-off");
    let slow = Duration::from_millis(1500);
    let a = s.first(Fault::Delay(slow));
    let b = s.holder(None);
    let cfg = s
        .config(&[&a, &b])
        .set("cache", "nar_hedging", hedging(false, "100ms", 4));
    let ncro = s.start(&cfg.render());
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert!(got.elapsed >= slow, "{:?}", got.elapsed);
    assert_eq!(nar_requests(&b, &s.nar()).len(), 0, "B was asked");
    assert_eq!(got.header("X-Ncro-Route"), Some("cache-hit"));
    assert_eq!(hedges(&ncro, "started", &b), 0.0);
}

/// `allow_hedging = false`: never started beside another attempt; the
/// next upstream that allows it is hedged instead.
#[test]
fn an_upstream_that_opted_out_is_never_started_as_a_hedge() {
    let s = Setup::new("hedge-optout");
    let a = s.first(Fault::nth(1, Fault::Delay(SLOW)));
    let b = s.holder(None);
    let c = s.holder(None);
    let cfg = s
        .config(&[&a, &b, &c])
        .set("cache", "nar_hedging", hedging(true, "200ms", 3));
    let text = with_upstream_keys(&cfg, &[(1, "allow_hedging", false.into())]);
    let ncro = s.start(&text);
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"));
    assert_eq!(nar_requests(&b, &s.nar()).len(), 0, "B opted out");
    assert_eq!(nar_requests(&c, &s.nar()).len(), 1);
    assert_eq!(hedges(&ncro, "won", &c), 1.0);
}

/// `max_inflight = 2`: while the first two upstreams hold their heads,
/// the third and fourth are never asked; with 3, the third is.
#[test]
fn max_inflight_bounds_the_attempts_in_flight() {
    for max in [2usize, 3] {
        let s = Setup::new("hedge-max");
        let held = Duration::from_millis(2500);
        let a = s.first(Fault::nth(1, Fault::Delay(held)));
        let b = s.holder(Some(Fault::Delay(SLOW)));
        let c = s.holder(Some(Fault::Delay(SLOW)));
        let d = s.holder(None);
        let cfg = s
            .config(&[&a, &b, &c, &d])
            .set("cache", "nar_hedging", hedging(true, "100ms", max as i64));
        let ncro = s.start(&cfg.render());
        let got = s.get(&ncro);
        s.assert_whole(&got, &ncro);
        let asked: Vec<usize> = [&a, &b, &c, &d]
            .iter()
            .map(|u| nar_requests(u, &s.nar()).len())
            .collect();
        let want: Vec<usize> = (0..4).map(|i| usize::from(i < max)).collect();
        assert_eq!(asked, want, "max_inflight = {max}\n{}", ncro.logs());
        // A won after its delay: the others were cancelled.
        assert_eq!(got.header("X-Ncro-Route"), Some("cache-hit"));
        assert_eq!(hedges(&ncro, "cancelled", &b), 1.0);
    }
}

/// A first upstream that answers 500 makes ncro ask the next one at once,
/// long before the hedge delay.
#[test]
fn a_failed_first_attempt_starts_the_next_at_once() {
    let s = Setup::new("hedge-500");
    let a = s.first(Fault::Status(500));
    let b = s.holder(None);
    let cfg = s
        .config(&[&a, &b])
        .set("cache", "nar_hedging", hedging(true, "30s", 2));
    let ncro = s.start(&cfg.render());
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert!(got.elapsed < Duration::from_secs(15), "{:?}", got.elapsed);
    assert_eq!(nar_requests(&b, &s.nar()).len(), 1);
    // Not a hedge: nothing else was in flight when B started.
    assert_eq!(got.header("X-Ncro-Route"), Some("direct"));
    let sc = scrape(&ncro);
    let failures = |kind: &str, up: &FakeUpstream| {
        sc.value(
            "ncro_nar_hedge_failures_total",
            &[("kind", kind), ("upstream", &up.url())],
        )
    };
    assert_eq!(failures("status", &a), 1.0);
    assert_eq!(failures("not_found", &a), 0.0);
}

/// The hedge winner is cut mid-body: mid-stream failover still finishes
/// the response from another holder, with a Range from the cut.
#[test]
fn a_hedge_winner_cut_mid_body_still_fails_over() {
    let s = Setup::new("hedge-cut");
    let cut = 48 * 1024;
    let a = s.first(Fault::nth(1, Fault::Delay(SLOW)));
    let b = s.holder(Some(Fault::HangMidBody(cut)));
    let c = s.holder(None);
    let cfg = s
        .config(&[&a, &b, &c])
        .set("cache", "nar_hedging", hedging(true, "200ms", 2))
        .set("timeouts", "idle", "500ms");
    let ncro = s.start(&cfg.render());
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"));
    let last = s.p.nar.len() - 1;
    let ranges: Vec<_> = nar_requests(&c, &s.nar())
        .iter()
        .map(|r| r.header("Range").map(str::to_owned))
        .collect();
    assert_eq!(ranges, [Some(format!("bytes={cut}-{last}"))]);
    let completed = eventually(Duration::from_secs(5), || {
        scrape(&ncro).value("ncro_nar_failovers_total", &[("result", "completed")]) == 1.0
    });
    assert!(completed, "{}", ncro.logs());
}

/// `upstreams[].nar_timeout` is a per-read limit: a stalled stream is cut
/// after it (and failover finishes the body), one that keeps flowing is
/// never cut, however long it takes in all.
#[test]
fn nar_timeout_cuts_a_stalled_stream_but_not_a_flowing_one() {
    let cut = 48 * 1024;
    for stalled in [true, false] {
        let s = Setup::new("nar-timeout");
        let fault = if stalled {
            Fault::HangMidBody(cut)
        } else {
            // 10 KiB every 100 ms: 1.6 s in all, each gap under 400 ms.
            Fault::Trickle(10 * 1024, Duration::from_millis(100))
        };
        let a = s.first(fault);
        let b = s.holder(None);
        // The global idle timeout (60 s) would outlast LIMIT: only the
        // upstream's own nar_timeout can cut the stall in time.
        let cfg = s
            .config(&[&a, &b])
            .set("cache", "nar_hedging", hedging(false, "1s", 1))
            .set("timeouts", "idle", "60s");
        let text = with_upstream_keys(&cfg, &[(0, "nar_timeout", "400ms".into())]);
        let ncro = s.start(&text);
        let got = s.get(&ncro);
        s.assert_whole(&got, &ncro);
        let b_asked = nar_requests(&b, &s.nar()).len();
        if stalled {
            assert_eq!(b_asked, 1, "the stall was not cut: {}", ncro.logs());
        } else {
            assert_eq!(b_asked, 0, "a flowing stream was cut: {}", ncro.logs());
            assert!(got.elapsed >= Duration::from_millis(1500), "{:?}", got.elapsed);
        }
    }
}

/// The winner is the first attempt whose body starts, not the first head:
/// a first upstream that sends its head and then nothing is hedged too.
#[test]
fn a_head_without_body_bytes_is_hedged_too() {
    let s = Setup::new("hedge-headonly");
    let a = s.first(Fault::nth(1, Fault::HangMidBody(0)));
    let b = s.holder(None);
    let cfg = s
        .config(&[&a, &b])
        .set("cache", "nar_hedging", hedging(true, "200ms", 2))
        .set("timeouts", "idle", "60s");
    let ncro = s.start(&cfg.render());
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    assert_eq!(got.header("X-Ncro-Route"), Some("hedge"), "{}", ncro.logs());
    assert_eq!(hedges(&ncro, "won", &b), 1.0);
    assert_eq!(hedges(&ncro, "cancelled", &a), 1.0);
}

/// A 200 whose connection ends before its first body byte is a failed
/// attempt: the next holder is asked at once for the whole file (no
/// Range: nothing was relayed), never a cut 200 to the client.
#[test]
fn a_200_that_ends_before_its_body_tries_the_next_at_once() {
    let s = Setup::new("hedge-nobody");
    let a = s.first(Fault::Truncate(0));
    let b = s.holder(None);
    let cfg = s
        .config(&[&a, &b])
        .set("cache", "nar_hedging", hedging(true, "30s", 2));
    let ncro = s.start(&cfg.render());
    let got = s.get(&ncro);
    s.assert_whole(&got, &ncro);
    let b_reqs = nar_requests(&b, &s.nar());
    assert_eq!(b_reqs.len(), 1);
    assert_eq!(b_reqs[0].header("Range"), None, "continued, not reopened");
    let v = scrape(&ncro).value(
        "ncro_nar_hedge_failures_total",
        &[("kind", "no_body"), ("upstream", &a.url())],
    );
    assert_eq!(v, 1.0, "{}", ncro.logs());
}
