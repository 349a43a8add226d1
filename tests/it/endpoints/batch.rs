//! `GetNarInfosV1` through the real `ncro` binary: advertisement, mixed
//! batches, body framing and limits, the all-or-nothing rule for transient
//! failures, and concurrency against a slow upstream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{asked, start};
use crate::fake::nix::sha256;
use crate::fake::{random_hash, FakeUpstream, Fault, TestKey, TestPath};
use crate::harness::{HttpConn, NcroProcess, Response};
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::metric;

const PATH: &str = "/get-narinfos-v1";

/// One batch request on `c` with a Content-Length body.
fn batch_on(c: &mut HttpConn, method: &str, body: &str) -> Response {
    let req = format!(
        "{method} {PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.send_raw(req.as_bytes()).expect("send");
    c.read_response(false).expect("answer")
}

fn batch(ncro: &NcroProcess, body: &str) -> Response {
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    batch_on(&mut c, "QUERY", body)
}

/// The NDJSON answer, one object per line.
fn objects(r: &Response) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/x-ndjson"));
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn lines(hashes: &[&str]) -> String {
    hashes.iter().map(|h| format!("{h}\n")).collect()
}

fn sri_of(nar: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(sha256(nar))
    )
}

#[test]
fn advertised_in_nix_cache_info() {
    let k = TestKey::generate("a-1");
    let a = FakeUpstream::builder().start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let info = ncro.get("/nix-cache-info").text();
    assert!(
        info.lines().any(|l| l == "GetNarInfosV1: /get-narinfos-v1"),
        "{info}"
    );
}

#[test]
fn mixed_batch_answers_found_paths_and_leaves_out_absent_ones() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let dep = TestPath::new("dep");
    let cached = TestPath::new("cached").reference(&dep);
    let raced = TestPath::new("raced");
    let absent = random_hash();
    let a = FakeUpstream::builder()
        .path(&cached, &ka)
        .path(&dep, &ka)
        .start();
    let b = FakeUpstream::builder().path(&raced, &kb).start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 10, &kb)]);
    assert_eq!(ncro.get(&cached.narinfo_request_path()).status, 200);

    // QUERY, CRLF lines, a blank line and a duplicate.
    let body = format!(
        "{}\r\n{absent}\r\n\r\n{}\r\n{}\r\n",
        cached.hash, raced.hash, cached.hash
    );
    let got = objects(&batch(&ncro, &body));
    let paths: Vec<&str> = got.iter().filter_map(|o| o["path"].as_str()).collect();
    assert_eq!(
        paths,
        [cached.basename(), raced.basename()],
        "request order, absent left out"
    );
    let o = &got[0];
    assert_eq!(o["version"], 2);
    assert_eq!(o["storeDir"], "/nix/store");
    assert_eq!(o["narHash"], sri_of(&cached.nar));
    assert_eq!(o["narSize"], cached.nar_size());
    assert_eq!(o["references"], serde_json::json!([dep.basename()]));
    // As `GET /<hash>.narinfo` serves it: canonical (`to_self`).
    assert_eq!(o["url"], format!("nar/{}.nar", cached.hash));
    let sig = o["signatures"][0].as_str().unwrap_or_default();
    assert!(sig.starts_with("a-1:"), "{o}");
    assert_eq!(
        a.request_count(&cached.narinfo_request_path()),
        1,
        "the cached route was used"
    );
    assert_eq!(b.request_count(&format!("/{absent}.narinfo")), 1);

    // POST works too; the absent hash is now a negative-cache hit.
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    let again = objects(&batch_on(&mut c, "POST", &lines(&[&absent, &raced.hash])));
    assert_eq!(again.len(), 1);
    assert_eq!(
        b.request_count(&format!("/{absent}.narinfo")),
        1,
        "negative entry reused"
    );
    // The body was consumed exactly: the connection serves the next request.
    assert_eq!(c.get("/nix-cache-info").expect("next").status, 200);
    let page = ncro.get("/metrics").text();
    let count = |r: &str| {
        metric(
            &page,
            &format!("ncro_narinfo_batch_paths_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!((count("found"), count("absent")), (Some(3), Some(2)));
    let ok = "ncro_endpoint_requests_total{endpoint=\"get_narinfos\",result=\"ok\"}";
    assert_eq!(metric(&page, ok), Some(2));
}

#[test]
fn empty_batch_is_an_empty_answer() {
    let k = TestKey::generate("a-1");
    let a = FakeUpstream::builder().start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    assert!(objects(&batch(&ncro, "")).is_empty());
    assert!(objects(&batch(&ncro, "\n\n")).is_empty());
}

#[test]
fn a_transient_failure_fails_the_whole_batch() {
    let k = TestKey::generate("a-1");
    let (ok, broken) = (TestPath::new("ok"), TestPath::new("broken"));
    let a = FakeUpstream::builder()
        .path(&ok, &k)
        .path(&broken, &k)
        .rule(
            broken.narinfo_request_path().as_str(),
            Fault::first_n(1, Fault::Status(500)),
        )
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let body = lines(&[&ok.hash, &broken.hash]);
    let r = batch(&ncro, &body);
    assert_eq!(
        r.status,
        502,
        "never a partial answer read as misses: {}",
        r.text()
    );
    // Nothing negative was remembered: the retry gets both.
    assert_eq!(objects(&batch(&ncro, &body)).len(), 2);
}

#[test]
fn invalid_bodies_and_limits() {
    let k = TestKey::generate("a-1");
    let a = FakeUpstream::builder().start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let h = random_hash();
    for body in [
        format!("{h}\n/nix/store/{h}-name\n"),
        format!("{h}-name\n"),
        format!("{}\n", &h[..31]),
        "not a hash\n".to_owned(),
    ] {
        let r = batch(&ncro, &body);
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
    }
    // Too many distinct hashes (the cap is 10,000).
    let many: Vec<String> = (0..10_001).map(|_| random_hash()).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(batch(&ncro, &lines(&refs)).status, 413);
    // A declared body over the byte limit is refused before it is read.
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    c.send_raw(
        format!("POST {PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let r = c.read_response(false).expect("answer");
    assert_eq!((r.status, r.header("Connection")), (413, Some("close")));
    // GET is not the protocol.
    let r = ncro.get(PATH);
    assert_eq!((r.status, r.header("Allow")), (405, Some("POST, QUERY")));
    // Chunked and Content-Length together: refused.
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    let smuggle = format!(
        "POST {PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    c.send_raw(smuggle.as_bytes()).expect("send");
    assert_eq!(c.read_response(false).expect("answer").status, 400);
    assert_eq!(asked(&a), Vec::<String>::new(), "no upstream was asked");
}

#[test]
fn chunked_body_with_expect_continue() {
    let k = TestKey::generate("a-1");
    let p = TestPath::new("chunky");
    let a = FakeUpstream::builder().path(&p, &k).start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let mut s = TcpStream::connect(ncro.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "QUERY {PATH} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    // The body in two chunks, split inside the hash.
    let (x, y) = p.hash.split_at(10);
    let body = format!(
        "{:x}\r\n{x}\r\n{:x}\r\n{y}\n\r\n0\r\n\r\n",
        x.len(),
        y.len() + 1
    );
    s.write_all(body.as_bytes()).expect("body");
    let mut c = HttpConn::from_stream(s).expect("wrap");
    let got = objects(&c.read_response(false).expect("answer"));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["path"], p.basename());
}

#[test]
fn pipelined_request_after_a_batch_is_answered() {
    let k = TestKey::generate("a-1");
    let p = TestPath::new("piped");
    let a = FakeUpstream::builder().path(&p, &k).start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let body = format!("{}\n", p.hash);
    let both = format!(
        "POST {PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}GET {} HTTP/1.1\r\nHost: t\r\n\r\n",
        body.len(),
        p.narinfo_request_path()
    );
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    c.send_raw(both.as_bytes()).expect("send");
    assert_eq!(objects(&c.read_response(false).expect("batch")).len(), 1);
    let r = c.read_response(false).expect("narinfo");
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&p.store_path()));
}

#[test]
fn misses_are_resolved_concurrently() {
    // 32 misses against an upstream that takes 400 ms per answer: one after
    // another that is 12.8 s; concurrently about one latency.
    let k = TestKey::generate("a-1");
    let latency = Duration::from_millis(400);
    let a = FakeUpstream::builder().latency(latency).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(a.url(), 10, &k)], &db.path().join("r.db"))
        .set("health", "enabled", false)
        .set("cache", "mass_query", mass_query_inflight(64))
        .start();
    let hashes: Vec<String> = (0..32).map(|_| random_hash()).collect();
    let refs: Vec<&str> = hashes.iter().map(String::as_str).collect();
    let t = Instant::now();
    let got = objects(&batch(&ncro, &lines(&refs)));
    let took = t.elapsed();
    assert!(got.is_empty());
    assert!(took < latency * 4, "took {took:?}: not concurrent");
    let asked = a
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count();
    assert_eq!(asked, 32);
    // Max concurrency seen by the upstream: every lookup was in flight at once.
    let starts: Vec<Instant> = a.requests().iter().map(|r| r.at).collect();
    let spread = starts
        .iter()
        .max()
        .zip(starts.iter().min())
        .map(|(x, n)| *x - *n);
    assert!(
        spread.is_some_and(|s| s < latency),
        "requests spread over {spread:?}"
    );
}

/// `[cache.mass_query]` with this many race requests in flight per upstream.
fn mass_query_inflight(n: i64) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("per_upstream_max_inflight".into(), n.into());
    toml::Value::Table(t)
}

#[test]
fn batch_and_single_requests_share_the_route_cache() {
    let k = TestKey::generate("a-1");
    let p = TestPath::new("shared");
    let a = FakeUpstream::builder().path(&p, &k).start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    assert_eq!(objects(&batch(&ncro, &lines(&[&p.hash]))).len(), 1);
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(
        a.request_count(&p.narinfo_request_path()),
        1,
        "the batch's route served the single request"
    );
}
