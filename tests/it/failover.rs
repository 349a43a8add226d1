//! Mid-stream NAR failover through the real `ncro` binary: an upstream
//! cuts a NAR body (reset, stall or early close), another upstream holds
//! the same NAR, and the client gets the whole NAR in one response, the
//! rest fetched with a `Range` from the first byte it did not have. An
//! upstream that cannot prove it holds the same object is not spliced in.

use std::time::Duration;

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::faults::fetch::{fetch, still_usable, Got};
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

/// Where the first upstream cuts the body (of the range it sends).
const CUT: usize = 48 * 1024;
const NAR_FILE: usize = 160 * 1024;
/// Longest one exchange may take: far above the idle timeout (500 ms).
const LIMIT: Duration = Duration::from_secs(5);

/// What the second upstream holds at the NAR's URL.
#[derive(Clone, Copy)]
enum BHas {
    Same,
    /// Another object, 14 bytes longer.
    Longer,
    Nothing,
}

struct Pair {
    ncro: NcroProcess,
    p: TestPath,
    /// Serves the narinfo and cuts the NAR.
    a: FakeUpstream,
    /// Holds only a NAR file at the same URL (or nothing).
    b: FakeUpstream,
    _db: tempfile::TempDir,
}

impl Pair {
    fn new(fault: Fault, b_has: BHas, relay: &str) -> Pair {
        let k = TestKey::generate("k-1");
        let p = TestPath::with_contents("failover", &random_bytes(NAR_FILE));
        let a = FakeUpstream::builder()
            .path(&p, &k)
            .rule(PathMatch::exact(&p.nar_request_path()), fault)
            .start();
        let mut b = FakeUpstream::builder();
        match b_has {
            BHas::Same => b = b.file(&p.nar_request_path(), p.nar.clone()),
            BHas::Longer => {
                let mut other = p.nar.clone();
                other.extend_from_slice(b"one more line\n");
                b = b.file(&p.nar_request_path(), other);
            }
            BHas::Nothing => {}
        }
        let b = b.start();
        let db = db_dir();
        let ups = [entry(a.url(), 10, &k), entry(b.url(), 20, &k)];
        let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
            .set("server", "workers", 1)
            .set("server", "nar_relay", relay)
            .set("timeouts", "idle", "500ms")
            .set("timeouts", "first_byte", "800ms")
            .start();
        // Like Nix: the narinfo first, which routes the NAR to A.
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        Pair {
            ncro,
            p,
            a,
            b,
            _db: db,
        }
    }

    fn get(&self, headers: &[(&str, &str)]) -> Got {
        fetch(self.ncro.addr(), &self.p.nar_request_path(), headers, LIMIT)
    }

    /// The `Range` headers of B's NAR requests.
    fn b_ranges(&self) -> Vec<Option<String>> {
        let path = self.p.nar_request_path();
        self.b
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .map(|r| r.header("Range").map(str::to_owned))
            .collect()
    }

    /// Waits until `ncro_nar_failovers_total{result}` reaches `want`.
    fn failovers_reach(&self, result: &str, want: f64) {
        let mut last = 0.0;
        let ok = eventually(Duration::from_secs(5), || {
            last = scrape(&self.ncro).value("ncro_nar_failovers_total", &[("result", result)]);
            last == want
        });
        assert!(ok, "failovers{{{result}}} = {last}\n{}", self.ncro.logs());
    }
}

/// The client gets the whole NAR in one 200 on a connection it keeps; B
/// was asked once, for the rest from a byte at or before `cut`.
fn assert_completed(pair: &Pair, got: &mut Got) -> u64 {
    let nar = &pair.p.nar;
    let ctx = || format!("{} {:?}\n{}", got.status, got.headers, pair.ncro.logs());
    assert_eq!(got.status, 200, "{}", ctx());
    assert!(
        got.complete,
        "{} of {} bytes; {}",
        got.body.len(),
        nar.len(),
        ctx()
    );
    assert!(got.body == *nar, "the spliced body differs from the NAR");
    let ranges = pair.b_ranges();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let range = ranges[0].clone().expect("B was asked with a Range");
    let last = nar.len() - 1;
    let start = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix(&format!("-{last}")))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("unexpected Range {range}"));
    assert!(start <= CUT as u64, "{range}");
    assert!(still_usable(got), "client connection lost after a failover");
    pair.failovers_reach("completed", 1.0);
    start
}

fn completes_after(fault: Fault, relay: &str) -> u64 {
    let pair = Pair::new(fault, BHas::Same, relay);
    let mut got = pair.get(&[]);
    let start = assert_completed(&pair, &mut got);
    assert_eq!(pair.a.request_count(&pair.p.nar_request_path()), 1);
    start
}

#[test]
fn stall_mid_body_continues_from_the_next_upstream_copy() {
    assert_eq!(completes_after(Fault::HangMidBody(CUT), "copy"), CUT as u64);
}

#[test]
fn stall_mid_body_continues_from_the_next_upstream_splice() {
    assert_eq!(
        completes_after(Fault::HangMidBody(CUT), "splice"),
        CUT as u64
    );
}

#[test]
fn early_close_mid_body_continues_from_the_next_upstream() {
    assert_eq!(completes_after(Fault::Truncate(CUT), "copy"), CUT as u64);
}

/// A reset may discard bytes the kernel had not handed to ncro yet, so the
/// rest may start before the cut; the body must still be exact.
#[test]
fn reset_mid_body_continues_from_the_next_upstream_copy() {
    completes_after(Fault::ResetMidBody(CUT), "copy");
}

#[test]
fn reset_mid_body_continues_from_the_next_upstream_splice() {
    completes_after(Fault::ResetMidBody(CUT), "splice");
}

/// The client's own range and the failover offset add up: the rest of the
/// client's range is asked from `from + bytes already sent`.
#[test]
fn client_range_and_failover_offsets_add_up() {
    let pair = Pair::new(Fault::HangMidBody(CUT), BHas::Same, "copy");
    let from = 10_000usize;
    let nar = &pair.p.nar;
    let last = nar.len() - 1;
    let got = pair.get(&[("Range", &format!("bytes={from}-"))]);
    assert_eq!(got.status, 206, "{:?}\n{}", got.headers, pair.ncro.logs());
    let want_range = format!("bytes {from}-{last}/{}", nar.len());
    assert_eq!(got.header("Content-Range"), Some(want_range.as_str()));
    assert!(
        got.complete && got.body == nar[from..],
        "{} bytes",
        got.body.len()
    );
    let want = format!("bytes={}-{last}", from + CUT);
    assert_eq!(pair.b_ranges(), [Some(want)]);
    pair.failovers_reach("completed", 1.0);
}

/// The client gets the head and the first bytes, then a closed connection.
fn assert_cut_short(pair: &Pair, got: &Got) {
    let nar = &pair.p.nar;
    assert_eq!(got.status, 200, "{}", pair.ncro.logs());
    assert!(
        !got.complete && got.closed,
        "{:?}\n{}",
        got.headers,
        pair.ncro.logs()
    );
    assert!(got.body.len() < nar.len() && nar.starts_with(&got.body));
}

#[test]
fn a_different_size_object_is_not_spliced_in() {
    let pair = Pair::new(Fault::HangMidBody(CUT), BHas::Longer, "copy");
    let got = pair.get(&[]);
    assert_cut_short(&pair, &got);
    let last = pair.p.nar.len() - 1;
    assert_eq!(pair.b_ranges(), [Some(format!("bytes={CUT}-{last}"))]);
    pair.failovers_reach("mismatch", 1.0);
    assert_eq!(
        scrape(&pair.ncro).value("ncro_nar_failovers_total", &[("result", "completed")]),
        0.0
    );
}

#[test]
fn without_another_holder_the_connection_closes() {
    let pair = Pair::new(Fault::ResetMidBody(CUT), BHas::Nothing, "copy");
    let got = pair.get(&[]);
    assert_cut_short(&pair, &got);
    pair.failovers_reach("no_alternative", 1.0);
}

#[test]
fn with_failover_off_the_connection_closes_at_the_cut() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("off", &random_bytes(NAR_FILE));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(
            PathMatch::exact(&p.nar_request_path()),
            Fault::HangMidBody(CUT),
        )
        .start();
    let b = FakeUpstream::builder()
        .file(&p.nar_request_path(), p.nar.clone())
        .start();
    let db = db_dir();
    let ups = [entry(a.url(), 10, &k), entry(b.url(), 20, &k)];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("server", "nar_failover", false)
        .set("timeouts", "idle", "500ms")
        .start();
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    let got = fetch(ncro.addr(), &p.nar_request_path(), &[], LIMIT);
    assert!(
        !got.complete && got.closed,
        "{:?}\n{}",
        got.headers,
        ncro.logs()
    );
    assert_eq!(got.body, p.nar[..CUT], "{}", ncro.logs());
    assert_eq!(b.request_count(&p.nar_request_path()), 0, "B asked");
    let sc = scrape(&ncro);
    for r in ["completed", "no_alternative", "mismatch", "failed"] {
        assert_eq!(sc.value("ncro_nar_failovers_total", &[("result", r)]), 0.0);
    }
}

/// A spliced-in upstream that stalls too is left like the first; the next
/// one continues from the new offset. Without a third, the result is
/// `failed` and the client has both prefixes, in order.
#[test]
fn a_second_cut_moves_on_to_the_third_upstream() {
    let second_cut = 20 * 1024;
    for third in [true, false] {
        let k = TestKey::generate("k-1");
        let p = TestPath::with_contents("twice-cut", &random_bytes(NAR_FILE));
        let nar_path = p.nar_request_path();
        let a = FakeUpstream::builder()
            .path(&p, &k)
            .rule(PathMatch::exact(&nar_path), Fault::HangMidBody(CUT))
            .start();
        let b = FakeUpstream::builder()
            .file(&nar_path, p.nar.clone())
            .rule(PathMatch::exact(&nar_path), Fault::HangMidBody(second_cut))
            .start();
        let mut c = FakeUpstream::builder();
        if third {
            c = c.file(&nar_path, p.nar.clone());
        }
        let c = c.start();
        let db = db_dir();
        let ups = [
            entry(a.url(), 10, &k),
            entry(b.url(), 20, &k),
            entry(c.url(), 30, &k),
        ];
        let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
            .set("server", "workers", 1)
            .set("timeouts", "idle", "500ms")
            .start();
        assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
        let got = fetch(ncro.addr(), &nar_path, &[], LIMIT);
        let last = p.nar.len() - 1;
        let range_of = |up: &FakeUpstream| -> Vec<Option<String>> {
            up.requests()
                .into_iter()
                .filter(|r| r.path == nar_path)
                .map(|r| r.header("Range").map(str::to_owned))
                .collect()
        };
        assert_eq!(range_of(&b), [Some(format!("bytes={CUT}-{last}"))]);
        let scraped = || scrape(&ncro);
        let settled = |result: &str| {
            eventually(Duration::from_secs(5), || {
                scraped().value("ncro_nar_failovers_total", &[("result", result)]) == 1.0
            })
        };
        if third {
            assert!(got.complete && got.body == p.nar, "{}", ncro.logs());
            let from = CUT + second_cut;
            assert_eq!(range_of(&c), [Some(format!("bytes={from}-{last}"))]);
            assert!(settled("completed"), "{}", ncro.logs());
        } else {
            assert!(!got.complete && got.closed, "{}", ncro.logs());
            assert_eq!(got.body, p.nar[..CUT + second_cut]);
            assert!(settled("failed"), "{}", ncro.logs());
        }
    }
}
