//! Parallel ranged NAR fetches through the real `ncro` binary
//! (`[cache.nar_ranges]`, src/serve/nar/ranged.rs): a large NAR is fetched
//! as `Range` requests over several upstream connections and written to
//! the client in order, byte exact; wrong range answers fall back to one
//! stream; a dying holder's ranges come from another holder; a slow client
//! stops new ranges. Nothing here depends on timing: the assertions are on
//! bytes, and on the requests and connections the fake upstreams saw.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::faults::fetch::{fetch, still_usable, Got};
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

const CHUNK: usize = 64 * 1024;
const NAR_FILE: usize = 16 * CHUNK + 1000;
const CONNECTIONS: i64 = 4;
const LIMIT: Duration = Duration::from_secs(20);

fn ranges(enabled: bool) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("enabled".into(), enabled.into());
    t.insert("min_size".into(), "256KiB".into());
    t.insert("chunk_size".into(), "64KiB".into());
    t.insert("connections".into(), CONNECTIONS.into());
    t.insert("max_memory".into(), "16MiB".into());
    t.insert("stall_timeout".into(), "1s".into());
    // The fake upstreams are on loopback: ranges whatever their latency.
    t.insert("min_latency".into(), "0s".into());
    toml::Value::Table(t)
}

struct Setup {
    ncro: NcroProcess,
    p: TestPath,
    a: FakeUpstream,
    b: Option<FakeUpstream>,
    _db: tempfile::TempDir,
}

impl Setup {
    /// A holds the narinfo and the NAR (with `a_fault` on the NAR path);
    /// B, if `b`, holds the same NAR file at the same hash-named URL.
    fn new(size: usize, a_fault: Option<Fault>, b: bool) -> Setup {
        Setup::with(size, a_fault, b, |c| c)
    }

    /// [`Setup::new`] with more config set by `tweak`.
    fn with(
        size: usize,
        a_fault: Option<Fault>,
        b: bool,
        tweak: impl FnOnce(NcroConfig) -> NcroConfig,
    ) -> Setup {
        let k = TestKey::generate("k-1");
        let p = TestPath::with_contents("ranged", &random_bytes(size));
        let mut a = FakeUpstream::builder().path(&p, &k);
        if let Some(f) = a_fault {
            a = a.rule(PathMatch::exact(&p.nar_request_path()), f);
        }
        let a = a.start();
        let b = b.then(|| {
            FakeUpstream::builder()
                .file(&p.nar_request_path(), p.nar.clone())
                .start()
        });
        let db = db_dir();
        let mut ups = vec![entry(a.url(), 10, &k)];
        if let Some(b) = &b {
            ups.push(entry(b.url(), 20, &k));
        }
        let cfg = NcroConfig::new(&ups, &db.path().join("r.db"))
            .set("server", "workers", 1)
            .set("timeouts", "idle", "2s")
            .set("cache", "nar_hedging", {
                let mut t = toml::Table::new();
                t.insert("enabled".into(), false.into());
                toml::Value::Table(t)
            })
            .set("cache", "nar_ranges", ranges(true));
        let ncro = tweak(cfg).start();
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        Setup {
            ncro,
            p,
            a,
            b,
            _db: db,
        }
    }

    /// Waits until `ncro_nar_ranged_total{result}` is `want` (it is
    /// counted after the last byte went out).
    fn ranged_reaches(&self, result: &str, want: f64) {
        let mut last = 0.0;
        let ok = eventually(Duration::from_secs(5), || {
            last = scrape(&self.ncro).value("ncro_nar_ranged_total", &[("result", result)]);
            last == want
        });
        assert!(ok, "ranged{{{result}}} = {last}\n{}", self.ncro.logs());
    }

    fn get(&self, headers: &[(&str, &str)]) -> Got {
        fetch(self.ncro.addr(), &self.p.nar_request_path(), headers, LIMIT)
    }

    /// (Range header, connection) of every NAR request `up` saw.
    fn nar_requests(&self, up: &FakeUpstream) -> Vec<(Option<String>, usize)> {
        let path = self.p.nar_request_path();
        up.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .map(|r| (r.header("Range").map(str::to_owned), r.conn))
            .collect()
    }
}

/// `bytes=A-B` for range `i` of a transfer starting at `start`.
fn chunk_range(start: usize, i: usize, last: usize) -> String {
    let from = start + i * CHUNK;
    format!("bytes={from}-{}", last.min(from + CHUNK - 1))
}

fn assert_whole(s: &Setup, got: &Got) {
    let logs = || s.ncro.logs();
    assert_eq!(got.status, 200, "{:?}\n{}", got.headers, logs());
    assert!(
        got.complete,
        "{} of {} bytes\n{}",
        got.body.len(),
        s.p.nar.len(),
        logs()
    );
    assert!(got.body == s.p.nar, "the body differs from the NAR");
}

/// The whole NAR, byte exact, on a connection the client keeps; A saw
/// the client's request plus one `Range` request for every other range,
/// each exactly once, over several connections.
#[test]
fn a_large_nar_is_fetched_in_parallel_ranges() {
    let s = Setup::new(NAR_FILE, None, false);
    let mut got = s.get(&[]);
    assert_whole(&s, &got);
    let size = s.p.nar.len();
    assert_eq!(
        got.header("Content-Length"),
        Some(size.to_string().as_str())
    );
    assert!(still_usable(&mut got), "client connection lost");
    let reqs = s.nar_requests(&s.a);
    let plain: Vec<_> = reqs.iter().filter(|r| r.0.is_none()).collect();
    assert_eq!(plain.len(), 1, "{reqs:?}");
    let seen: Vec<String> = reqs.iter().filter_map(|r| r.0.clone()).collect();
    let n = size.div_ceil(CHUNK);
    let want: BTreeSet<String> = (1..n).map(|i| chunk_range(0, i, size - 1)).collect();
    assert_eq!(seen.len(), want.len(), "each range asked once: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), want);
    let conns: BTreeSet<usize> = reqs.iter().map(|r| r.1).collect();
    assert!(conns.len() >= 2, "one connection only: {reqs:?}");
    assert!(conns.len() <= n, "more connections than ranges: {conns:?}");
}

/// `max_concurrent_requests` counts range connections: with 2, the
/// client's first response and one range connection; with 1, no room for
/// a second connection, so one stream.
#[test]
fn max_concurrent_requests_bounds_the_range_connections() {
    for (limit, want_conns) in [(2, 2), (1, 1)] {
        let s = Setup::with(NAR_FILE, None, false, |c| {
            c.upstream(0, "max_concurrent_requests", limit)
        });
        assert_whole(&s, &s.get(&[]));
        let reqs = s.nar_requests(&s.a);
        let conns: BTreeSet<usize> = reqs.iter().map(|r| r.1).collect();
        assert_eq!(conns.len(), want_conns, "limit {limit}: {reqs:?}");
        let ranged = reqs.iter().filter(|r| r.0.is_some()).count();
        if limit == 1 {
            assert_eq!(ranged, 0, "{reqs:?}");
            s.ranged_reaches("no_room", 1.0);
        } else {
            assert_eq!(ranged, s.p.nar.len().div_ceil(CHUNK) - 1, "{reqs:?}");
        }
    }
}

/// Below `min_size` (and with the feature off) the NAR is one stream.
#[test]
fn small_nars_and_disabled_ranges_use_one_stream() {
    let s = Setup::new(200 * 1024, None, false);
    assert_whole(&s, &s.get(&[]));
    let reqs = s.nar_requests(&s.a);
    assert!(reqs.len() == 1 && reqs[0].0.is_none(), "{reqs:?}");

    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("off", &random_bytes(NAR_FILE));
    let a = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(a.url(), 10, &k)], &db.path().join("r.db"))
        .set("cache", "nar_ranges", ranges(false))
        .start();
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    let got = fetch(ncro.addr(), &p.nar_request_path(), &[], LIMIT);
    assert!(got.complete && got.body == p.nar, "{}", ncro.logs());
    assert_eq!(a.request_count(&p.nar_request_path()), 1);
}

/// `min_latency`: an upstream measured nearer than it gets one stream
/// (spliced), counted as `near`; one not measured yet still gets ranges.
#[test]
fn a_nearby_upstream_gets_one_stream() {
    let s = Setup::with(NAR_FILE, None, false, |c| {
        let mut t = ranges(true);
        // Every loopback upstream is "near" once its latency is measured.
        t.as_table_mut()
            .unwrap()
            .insert("min_latency".into(), "1h".into());
        // Probes measure A's latency; until the first one A counts as far.
        c.set("cache", "nar_ranges", t)
            .set("health", "enabled", true)
            .set("health", "probe_interval", "100ms")
    });
    let near = |s: &Setup| scrape(&s.ncro).value("ncro_nar_ranged_total", &[("result", "near")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while near(&s) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "never near\n{}\n{}",
            s.ncro.get("/status").text(),
            s.ncro.logs()
        );
        assert_whole(&s, &s.get(&[]));
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = s.nar_requests(&s.a).len();
    let completed = scrape(&s.ncro).value("ncro_nar_ranged_total", &[("result", "completed")]);
    assert_whole(&s, &s.get(&[]));
    s.ranged_reaches("near", near(&s).max(2.0));
    let reqs = s.nar_requests(&s.a);
    assert_eq!(reqs.len(), before + 1, "one request, no ranges: {reqs:?}");
    assert!(reqs[before].0.is_none(), "{reqs:?}");
    assert_eq!(
        scrape(&s.ncro).value("ncro_nar_ranged_total", &[("result", "completed")]),
        completed
    );
}

/// The client's own Range on top: a 206 of exactly its bytes, fetched as
/// ranges aligned on the client's first byte.
#[test]
fn a_client_range_is_split_into_ranges_too() {
    let s = Setup::new(NAR_FILE, None, false);
    let from = 100_000;
    let size = s.p.nar.len();
    let last = size - 1;
    let got = s.get(&[("Range", &format!("bytes={from}-"))]);
    assert_eq!(got.status, 206, "{:?}\n{}", got.headers, s.ncro.logs());
    let cr = format!("bytes {from}-{last}/{size}");
    assert_eq!(got.header("Content-Range"), Some(cr.as_str()));
    assert!(
        got.complete && got.body == s.p.nar[from..],
        "{}",
        s.ncro.logs()
    );
    let reqs = s.nar_requests(&s.a);
    let seen: BTreeSet<String> = reqs.iter().filter_map(|r| r.0.clone()).collect();
    let n = (size - from).div_ceil(CHUNK);
    let mut want: BTreeSet<String> = (1..n).map(|i| chunk_range(from, i, last)).collect();
    want.insert(format!("bytes={from}-")); // the client's own, forwarded
    assert_eq!(seen, want, "{reqs:?}");
}

/// An upstream that answers a range request with a 200 (the whole file)
/// or with the wrong `Content-Range`: detected on the first range request,
/// before the client's head; the NAR is relayed as one stream.
#[test]
fn wrong_range_answers_fall_back_to_one_stream() {
    let wrong_range = Fault::StatusWithHeaders(
        206,
        vec![(
            "Content-Range".to_owned(),
            format!("bytes 0-{}/{NAR_FILE}", CHUNK - 1),
        )],
    );
    for fault in [Fault::NoRanges, Fault::nth(2, wrong_range)] {
        let s = Setup::new(NAR_FILE, Some(fault.clone()), false);
        let got = s.get(&[]);
        assert_whole(&s, &got);
        let reqs = s.nar_requests(&s.a);
        assert_eq!(reqs.len(), 2, "{fault:?}: {reqs:?}");
        assert_eq!(reqs[1].0, Some(chunk_range(0, 1, s.p.nar.len() - 1)));
        s.ranged_reaches("declined", 1.0);
    }
}

/// A holder that dies mid-transfer (every NAR request after its first
/// three is reset): its ranges, and the bytes its cut ranges still
/// missed, come from the other holder; the client gets the exact NAR.
#[test]
fn a_dying_holder_is_replaced_by_another() {
    let s = Setup::new(
        64 * CHUNK,
        Some(Fault::AfterN(3, Box::new(Fault::Reset))),
        true,
    );
    let got = s.get(&[]);
    assert_whole(&s, &got);
    let b = s.b.as_ref().expect("B");
    let b_reqs = s.nar_requests(b);
    assert!(!b_reqs.is_empty(), "B never asked\n{}", s.ncro.logs());
    assert!(
        b_reqs.iter().all(|r| r.0.is_some()),
        "B asked without a Range: {b_reqs:?}"
    );
    // A is given up after a few failures, not asked for every range.
    let a_reqs = s.nar_requests(&s.a);
    // Each failure may be retried once by the client (a reused connection);
    // the bound is far below the 65 ranges whatever the timing.
    assert!(a_reqs.len() < 32, "{a_reqs:?}");
    s.ranged_reaches("completed", 1.0);
    let retries = scrape(&s.ncro).value("ncro_nar_range_retries_total", &[]);
    assert!(retries >= 3.0, "retries {retries}");
}

/// Without another holder the transfer fails: the client connection is
/// closed after a prefix of the NAR, never presented as complete.
#[test]
fn without_any_holder_left_the_connection_closes() {
    let s = Setup::new(
        NAR_FILE,
        Some(Fault::AfterN(3, Box::new(Fault::Reset))),
        false,
    );
    let got = s.get(&[]);
    assert_eq!(got.status, 200, "{}", s.ncro.logs());
    assert!(
        !got.complete && got.closed,
        "{:?}\n{}",
        got.headers,
        s.ncro.logs()
    );
    assert!(got.body.len() < s.p.nar.len() && s.p.nar.starts_with(&got.body));
    s.ranged_reaches("failed", 1.0);
}

/// A holder whose range stalls (no byte for `stall_timeout`): the range is
/// asked again for its missing bytes only.
#[test]
fn a_stalled_range_is_asked_again_for_its_missing_bytes() {
    let s = Setup::new(
        NAR_FILE,
        Some(Fault::nth(3, Fault::HangMidBody(1000))),
        false,
    );
    let got = s.get(&[]);
    assert_whole(&s, &got);
    let reqs = s.nar_requests(&s.a);
    // The rest of the stalled range starts 1000 bytes into it and ends
    // where it ends.
    let rests: Vec<String> = reqs
        .iter()
        .filter_map(|r| r.0.clone())
        .filter(|r| {
            let from = r.strip_prefix("bytes=").and_then(|r| r.split_once('-'));
            from.and_then(|(a, _)| a.parse::<usize>().ok())
                .is_some_and(|a| a % CHUNK == 1000)
        })
        .collect();
    assert_eq!(rests.len(), 1, "{reqs:?}");
    let from: usize = rests[0]["bytes=".len()..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let i = from / CHUNK;
    let last = s.p.nar.len() - 1;
    assert_eq!(
        rests[0],
        format!("bytes={from}-{}", last.min((i + 1) * CHUNK - 1))
    );
}

/// A client that does not read: ncro stops asking for new ranges once its
/// buffers and the socket buffers are full; the NAR still arrives whole
/// when the client reads again.
#[test]
fn a_slow_client_stops_new_ranges() {
    let size = 48 << 20; // 768 ranges: far more than socket buffers hold
    let s = Setup::new(size, None, false);
    let mut c = TcpStream::connect(s.ncro.addr()).expect("connect");
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        s.p.nar_request_path()
    );
    c.write_all(req.as_bytes()).expect("send");
    // Wait until the requests at A stop growing (bounded), not reading.
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let n = s.nar_requests(&s.a).len();
        if (n == last && n > 1) || Instant::now() > deadline {
            break;
        }
        last = n;
    }
    let asked = s.nar_requests(&s.a).len();
    assert!(
        asked < size / CHUNK / 2,
        "{asked} ranges asked while the client read nothing"
    );
    c.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut all = Vec::new();
    c.read_to_end(&mut all).expect("read");
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    assert!(all[at..] == s.p.nar[..], "{} body bytes", all.len() - at);
}
