//! NAR serving through the real `ncro` binary: the NAR comes from the
//! upstream that served the narinfo, unknown NARs fall back in priority
//! order, ranges pass through, and a broken upstream body is never
//! presented to the client as a complete one.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::routing::{db_dir, entry, CannedUpstream, NcroConfig};

/// One fake per `(priority, builder)`, all trusted with `key`, and an ncro
/// in front of them.
fn front(
    fakes: Vec<(i32, FakeUpstream)>,
    key: &TestKey,
    extra: &[(&str, &str, &str)],
) -> (NcroProcess, Vec<FakeUpstream>, tempfile::TempDir) {
    let db = db_dir();
    let ups: Vec<_> = fakes
        .iter()
        .map(|(prio, f)| entry(f.url(), *prio, key))
        .collect();
    let mut cfg = NcroConfig::new(&ups, &db.path().join("routes.db"));
    for (section, k, v) in extra {
        cfg = cfg.set(section, k, *v);
    }
    let ncro = cfg.start();
    (ncro, fakes.into_iter().map(|(_, f)| f).collect(), db)
}

fn nar_requests(up: &FakeUpstream, path: &str) -> usize {
    up.request_count(path)
}

#[test]
fn nar_comes_from_the_upstream_that_served_the_narinfo() {
    let k = TestKey::generate("k-1");
    let hash = crate::fake::random_hash();
    let pa = TestPath::with_hash(&hash, "twice", b"bytes as cache A has them");
    let pb = TestPath::with_hash(&hash, "twice", b"bytes as cache B has them!!");
    // Both caches publish the NAR under A's URL, with their own contents
    // (the signature does not cover URL, so B's narinfo stays valid).
    let url = pa.nar_request_path();
    let b_narinfo = pb.narinfo(&[&k]).replace(&pb.nar_url(), &pa.nar_url());
    let a = FakeUpstream::builder()
        .path(&pa, &k)
        .rule(
            PathMatch::suffix(".narinfo"),
            Fault::Delay(Duration::from_millis(300)),
        )
        .start();
    let b = FakeUpstream::builder()
        .narinfo(&hash, b_narinfo)
        .file(&url, pb.nar.clone())
        .start();
    // Same tier, A listed first: without a route, A would be asked first.
    let (ncro, ups, _db) = front(vec![(10, a), (10, b)], &k, &[]);
    let (a, b) = (&ups[0], &ups[1]);

    let r = ncro.get(&pa.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert!(r.text().contains(&format!("NarHash: {}\n", pb.nar_hash())));
    let nar = ncro.get(&url);
    assert_eq!(nar.status, 200);
    assert!(nar.body == pb.nar, "the NAR must match the narinfo served");
    assert_eq!((nar_requests(a, &url), nar_requests(b, &url)), (0, 1));
}

#[test]
fn a_narinfo_cannot_pull_another_upstreams_nar_file_to_its_upstream() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("held-by-the-upper-tier");
    let q = TestPath::new("names-p-file");
    let p_url = p.nar_request_path();
    // The lower tier's narinfo for Q is validly signed, but its URL (which
    // no signature covers) names P's NAR file, where it serves other bytes.
    let q_narinfo = q.narinfo(&[&k]).replace(&q.nar_url(), &p.nar_url());
    let upper = FakeUpstream::builder().path(&p, &k).start();
    let lower = FakeUpstream::builder()
        .narinfo(&q.hash, q_narinfo)
        .file(&p_url, b"not the NAR of P".to_vec())
        .start();
    let (ncro, ups, _db) = front(vec![(10, upper), (20, lower)], &k, &[]);
    let (upper, lower) = (&ups[0], &ups[1]);

    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    let r = ncro.get(&q.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", ncro.logs());
    // Served canonical (`to_self`); the upstream's own URL, P's file name,
    // is what the NAR index is asked to claim.
    assert!(r.text().contains(&format!("URL: nar/{}.nar\n", q.hash)));
    assert_eq!(lower.request_count(&q.narinfo_request_path()), 1);

    // P's NAR is asked of the upstream whose narinfo named it first.
    let nar = ncro.get(&p_url);
    assert_eq!(nar.status, 200);
    assert!(nar.body == p.nar, "P's NAR, from the upper tier");
    assert_eq!(
        (nar_requests(upper, &p_url), nar_requests(lower, &p_url)),
        (1, 0)
    );
    let page = ncro.get("/metrics").text();
    let refused = "ncro_route_nar_claims_refused_total{source=\"route\"}";
    assert_eq!(crate::server::metric(&page, refused), Some(1));
}

#[test]
fn unrouted_nar_falls_back_in_priority_order() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("fallback");
    let url = p.nar_request_path();
    // Listed in reverse so that the order can only come from priorities.
    let has = FakeUpstream::builder().file(&url, p.nar.clone()).start();
    let lacks = FakeUpstream::builder().start();
    let (ncro, ups, _db) = front(vec![(20, has), (10, lacks)], &k, &[]);
    let r = ncro.get(&url);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert!(r.body == p.nar);
    let (has, lacks) = (&ups[0], &ups[1]);
    assert_eq!((nar_requests(lacks, &url), nar_requests(has, &url)), (1, 1));
    assert!(
        lacks.requests()[0].at <= has.requests()[0].at,
        "priority 10 first"
    );
}

#[test]
fn unrouted_nar_everywhere_404_is_404() {
    let k = TestKey::generate("k-1");
    let url = TestPath::new("nowhere").nar_request_path();
    let fakes = vec![
        (10, FakeUpstream::builder().start()),
        (20, FakeUpstream::builder().start()),
    ];
    let (ncro, ups, _db) = front(fakes, &k, &[]);
    assert_eq!(ncro.get(&url).status, 404);
    assert!(ups.iter().all(|u| nar_requests(u, &url) == 1));
}

#[test]
fn unrouted_nar_500_plus_404_is_502() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("broken");
    let url = p.nar_request_path();
    let failing = FakeUpstream::builder()
        .file(&url, p.nar.clone())
        .rule(PathMatch::prefix("/nar/"), Fault::Status(500))
        .start();
    let (ncro, ups, _db) = front(
        vec![(10, failing), (20, FakeUpstream::builder().start())],
        &k,
        &[],
    );
    let r = ncro.get(&url);
    assert_eq!(r.status, 502, "a failing upstream may have it: not a 404");
    assert!(ups.iter().all(|u| nar_requests(u, &url) == 1));
}

fn one_nar(
    p: &TestPath,
    faults: &[(PathMatch, Fault)],
    extra: &[(&str, &str, &str)],
) -> (NcroProcess, FakeUpstream, tempfile::TempDir) {
    let k = TestKey::generate("k-1");
    let mut b = FakeUpstream::builder().path(p, &k);
    for (m, f) in faults {
        b = b.rule(m.clone(), f.clone());
    }
    let (ncro, mut ups, db) = front(vec![(10, b.start())], &k, extra);
    (ncro, ups.remove(0), db)
}

#[test]
fn ranges_and_head_pass_through() {
    let p = TestPath::with_contents("ranged", &random_bytes(1000));
    let total = p.nar.len();
    let url = p.nar_request_path();
    let (ncro, _up, _db) = one_nar(&p, &[], &[]);

    let r = ncro
        .request("GET", &url, &[("Range", "bytes=100-199")])
        .expect("range request");
    assert_eq!(r.status, 206, "{}", ncro.logs());
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes 100-199/{total}").as_str())
    );
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"));
    assert_eq!(r.body, &p.nar[100..200]);

    let r = ncro
        .request("GET", &url, &[("Range", "bytes=100-")])
        .expect("open range request");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes 100-{}/{total}", total - 1).as_str())
    );
    assert_eq!(r.body, &p.nar[100..]);

    let r = ncro.get(&url);
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"), "resumable NARs");
    assert!(r.body == p.nar);

    // HEAD on a connection the server closes afterwards: every byte after
    // the head would be a body that must not be there.
    let raw = raw_exchange(
        ncro.addr(),
        &format!("HEAD {url} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        Duration::from_secs(10),
    );
    assert_eq!(raw.status, 200);
    assert_eq!(raw.content_length, Some(total as u64));
    assert_eq!(raw.body_len, 0, "HEAD has no body");
    assert!(matches!(raw.end, End::Eof), "{:?}", raw.end);
}

#[test]
fn chunked_upstream_body_is_relayed_exactly() {
    let p = TestPath::with_contents("chunked", &random_bytes(300_000));
    let url = p.nar_request_path();
    let (ncro, _up, _db) = one_nar(&p, &[(PathMatch::exact(&url), Fault::Chunked)], &[]);
    let r = ncro.get(&url);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert!(
        r.body == p.nar,
        "got {} of {} bytes",
        r.body.len(),
        p.nar.len()
    );
    // Twice on one connection: the chunked relay leaves it usable.
    let mut c = crate::harness::HttpConn::connect(ncro.addr()).expect("connect");
    for _ in 0..2 {
        let r = c.get(&url).expect("keep-alive NAR");
        assert!(r.body == p.nar);
    }
}

fn large_nar_identical(relay: &str) {
    let p = TestPath::with_contents("large", &random_bytes(50 << 20));
    let url = p.nar_request_path();
    let k = TestKey::generate("k-1");
    let _up = FakeUpstream::builder().path(&p, &k).start();
    let _db = db_dir();
    // One stream, in the relay mode under test: parallel ranges
    // (tests/it/ranged.rs) would take a NAR this large.
    let mut off = toml::Table::new();
    off.insert("enabled".into(), false.into());
    let ncro = NcroConfig::new(&[entry(_up.url(), 10, &k)], &_db.path().join("r.db"))
        .set("server", "nar_relay", relay)
        .set("cache", "nar_ranges", toml::Value::Table(off))
        .start();
    let r = ncro.get(&url);
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert_eq!(
        r.header("Content-Length"),
        Some(p.nar.len().to_string().as_str())
    );
    assert_eq!(r.body.len(), p.nar.len());
    assert!(r.body == p.nar, "50 MiB NAR differs ({relay})");
}

#[test]
fn large_nar_is_byte_identical_with_copy_relay() {
    large_nar_identical("copy");
}

#[test]
fn large_nar_is_byte_identical_with_splice_relay() {
    large_nar_identical("splice");
}

/// How a raw read ended.
#[derive(Debug)]
enum End {
    Eof,
    Reset,
    TimedOut,
}

/// What came back on one raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    content_length: Option<u64>,
    /// Bytes after the head.
    body_len: usize,
    end: End,
    elapsed: Duration,
}

/// Writes `request` and reads until the server closes or `limit` passes.
fn raw_exchange(addr: SocketAddr, request: &str, limit: Duration) -> Raw {
    raw_exchange_body(addr, request, limit).0
}

/// [`raw_exchange`], also returning the raw bytes after the head.
fn raw_exchange_body(addr: SocketAddr, request: &str, limit: Duration) -> (Raw, Vec<u8>) {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break End::Eof,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if t.elapsed() >= limit {
                    break End::TimedOut;
                }
            }
            Err(_) => break End::Reset,
        }
    };
    let elapsed = t.elapsed();
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    let head_len = match resp.parse(&got) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "no complete head ({other:?}): {:?}",
            String::from_utf8_lossy(&got)
        ),
    };
    let content_length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
    let raw = Raw {
        status: resp.code.unwrap_or(0),
        content_length,
        body_len: got.len() - head_len,
        end,
        elapsed,
    };
    (raw, got[head_len..].to_vec())
}

fn get_raw(ncro: &NcroProcess, url: &str, limit: Duration) -> Raw {
    raw_exchange(
        ncro.addr(),
        &format!("GET {url} HTTP/1.1\r\nHost: t\r\n\r\n"),
        limit,
    )
}

fn reset_mid_body(relay: &str) {
    let p = TestPath::with_contents("reset", &random_bytes(2 << 20));
    let url = p.nar_request_path();
    let cut = 300_000;
    let (ncro, _up, _db) = one_nar(
        &p,
        &[(PathMatch::exact(&url), Fault::ResetMidBody(cut))],
        &[("server", "nar_relay", relay)],
    );
    let raw = get_raw(&ncro, &url, Duration::from_secs(20));
    assert_eq!(raw.status, 200, "{}", ncro.logs());
    assert_eq!(raw.content_length, Some(p.nar.len() as u64));
    assert!(
        raw.body_len < p.nar.len(),
        "a cut NAR looked complete ({relay})"
    );
    assert!(
        raw.body_len <= cut,
        "more than the upstream sent: {}",
        raw.body_len
    );
    assert!(
        !matches!(raw.end, End::TimedOut),
        "ncro kept the client waiting after the upstream reset ({relay})\n{}",
        ncro.logs()
    );
}

#[test]
fn upstream_reset_mid_body_closes_the_client_copy() {
    reset_mid_body("copy");
}

#[test]
fn upstream_reset_mid_body_closes_the_client_splice() {
    reset_mid_body("splice");
}

fn hang_mid_body(relay: &str) {
    let p = TestPath::with_contents("stalled", &random_bytes(1 << 20));
    let url = p.nar_request_path();
    let sent = 100_000;
    let (ncro, _up, _db) = one_nar(
        &p,
        &[(PathMatch::exact(&url), Fault::HangMidBody(sent))],
        &[("server", "nar_relay", relay), ("timeouts", "idle", "1s")],
    );
    let raw = get_raw(&ncro, &url, Duration::from_secs(20));
    assert_eq!(raw.status, 200, "{}", ncro.logs());
    assert_eq!(raw.body_len, sent, "what the upstream sent is relayed");
    assert!(
        !matches!(raw.end, End::TimedOut),
        "{:?}\n{}",
        raw,
        ncro.logs()
    );
    assert!(
        raw.elapsed >= Duration::from_millis(900) && raw.elapsed < Duration::from_secs(8),
        "closed after {:?}, idle timeout is 1s ({relay})",
        raw.elapsed
    );
}

#[test]
fn upstream_hang_mid_body_closes_after_idle_timeout_copy() {
    hang_mid_body("copy");
}

#[test]
fn upstream_hang_mid_body_closes_after_idle_timeout_splice() {
    hang_mid_body("splice");
}

/// Regression: NAR misses were dropped unread, closing the upstream
/// connection each time (see the narinfo twin in `routing`).
#[test]
fn regression_nar_404_with_body_keeps_upstream_connections() {
    let page = "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n";
    let (a, b) = (
        CannedUpstream::answering(page),
        CannedUpstream::answering(page),
    );
    let db = db_dir();
    let ups = [(a.url(), 10, String::new()), (b.url(), 20, String::new())];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("server", "workers", 1)
        .start();
    for i in 0..4 {
        let url = TestPath::new(&format!("absent-{i}")).nar_request_path();
        assert_eq!(ncro.get(&url).status, 404, "{}", ncro.logs());
    }
    assert_eq!((a.requests(), b.requests()), (4, 4));
    assert_eq!((a.accepted(), b.accepted()), (1, 1), "one connection each");
}

/// Regression: an upstream that redirects NAR downloads to storage (Attic
/// with S3 answers 307 to a presigned URL) got 502: the redirect counted as
/// "not served here". Nix follows redirects, so ncro passes them on.
#[test]
fn regression_nar_redirect_to_absolute_url_is_relayed() {
    let k = TestKey::generate("k-1");
    let p = TestPath::new("redirected");
    let url = p.nar_request_path();
    let storage = FakeUpstream::builder()
        .file("/presigned/x.nar", p.nar.clone())
        .start();
    let location = format!("{}/presigned/x.nar?sig=abc", storage.url());
    let redirector = FakeUpstream::builder()
        .rule(PathMatch::exact(&url), Fault::Redirect(location.clone()))
        .start();
    let (ncro, _ups, _db) = front(
        vec![(10, redirector), (20, FakeUpstream::builder().start())],
        &k,
        &[],
    );
    let r = ncro.get(&url);
    assert_eq!(r.status, 302, "{}", ncro.logs());
    assert_eq!(r.header("Location"), Some(location.as_str()));
    // The relative kind would resolve against ncro itself: not relayed.
    let relative = FakeUpstream::builder()
        .rule(PathMatch::exact(&url), Fault::Redirect("/elsewhere".into()))
        .start();
    let (ncro2, _ups2, _db2) = front(vec![(10, relative)], &k, &[]);
    assert_eq!(ncro2.get(&url).status, 502);
}

/// Regression: an HTTP/1.0 client cannot take chunked framing, so ncro ends
/// the body by closing; the relay still forwarded the upstream's chunked
/// framing, and the client got chunk-size lines inside its NAR.
#[test]
fn regression_chunked_nar_to_http10_client_is_dechunked() {
    let p = TestPath::with_contents("old-client", &random_bytes(100_000));
    let url = p.nar_request_path();
    let (ncro, _up, _db) = one_nar(&p, &[(PathMatch::exact(&url), Fault::Chunked)], &[]);
    let (raw, body) = raw_exchange_body(
        ncro.addr(),
        &format!("GET {url} HTTP/1.0\r\nHost: t\r\n\r\n"),
        Duration::from_secs(10),
    );
    assert_eq!(raw.status, 200, "{}", ncro.logs());
    assert!(matches!(raw.end, End::Eof), "{:?}", raw.end);
    assert_eq!(body.len(), p.nar.len(), "{}", ncro.logs());
    assert!(body == p.nar);
}

/// Regression: a client that cancels a download (common: Ctrl-C, a killed
/// build) was logged at warn level like an upstream failure.
#[test]
fn regression_client_going_away_is_not_a_warning() {
    let p = TestPath::with_contents("cancelled", &random_bytes(32 << 20));
    let url = p.nar_request_path();
    let (ncro, _up, _db) = one_nar(&p, &[], &[]);
    let mut s = TcpStream::connect(ncro.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .expect("send");
    let mut first = [0u8; 64 * 1024];
    let n = s.read(&mut first).expect("first bytes");
    assert!(n > 0);
    drop(s); // unread data pending: the kernel answers ncro with RST
    assert!(
        ncro.wait_for_log(
            "client went away during a NAR relay",
            Duration::from_secs(20)
        ),
        "{}",
        ncro.logs()
    );
    let out = ncro.stdout();
    let line = out
        .lines()
        .find(|l| l.contains("client went away during a NAR relay"))
        .unwrap_or_default();
    assert!(line.contains("DEBUG"), "{line}");
    assert!(!out.contains(" WARN "), "{}", ncro.logs());
}
