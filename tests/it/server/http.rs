//! ncro's HTTP/1.1 server on the wire: endpoints, keep-alive, pipelining,
//! connection semantics, error answers, limits, input validation before
//! anything reaches an upstream, and read timeouts.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{cache_info_body, eventually, fake_with, metric, start, Running};
use crate::fake::{FakeUpstream, Fault, TestKey, TestPath};
use crate::harness::{HttpConn, Response};

/// How long a closing server gets to close the socket after its answer.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn conn(n: &Running) -> HttpConn {
    HttpConn::connect(n.addr()).expect("connect to ncro")
}

/// Writes `raw` and reads one response (HEAD when `head_only`).
fn raw_exchange(n: &Running, raw: &[u8], head_only: bool) -> (HttpConn, Response) {
    let mut c = conn(n);
    c.send_raw(raw).expect("write request");
    let r = c
        .read_response(head_only)
        .unwrap_or_else(|e| panic!("reading the answer to {:?}: {e}", show(raw)));
    (c, r)
}

fn show(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    s.chars().take(120).collect()
}

/// Asserts the server closes `c` (after any answer) within [`CLOSE_WITHIN`].
fn assert_closed(c: &mut HttpConn, what: &str) {
    assert!(
        c.wait_closed(CLOSE_WITHIN).expect("read"),
        "ncro kept the connection open after {what}"
    );
}

/// Asserts `c` is still usable: another request on it is answered.
fn assert_open(c: &mut HttpConn, what: &str) {
    let r = c
        .get("/nix-cache-info")
        .unwrap_or_else(|e| panic!("connection unusable after {what}: {e}"));
    assert_eq!(r.status, 200, "after {what}");
}

#[test]
fn nix_cache_info_get_and_head() {
    let n = start(&[], "");
    let mut c = conn(&n);
    let get = c.get("/nix-cache-info").unwrap();
    assert_eq!(get.status, 200);
    assert_eq!(get.text(), cache_info_body(30));
    assert_eq!(get.header("Content-Type"), Some("text/x-nix-cache-info"));
    let len = get.body.len().to_string();
    assert_eq!(get.header("Content-Length"), Some(len.as_str()));
    assert!(get.header("Date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(get.header("Connection"), None, "keep-alive is the default");

    let head = c.request("HEAD", "/nix-cache-info", &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some(len.as_str()));
    assert_eq!(head.header("Content-Type"), Some("text/x-nix-cache-info"));
    assert!(head.body.is_empty());
    // A HEAD answer that leaked its body would make this response unparsable.
    let again = c.get("/nix-cache-info").unwrap();
    assert_eq!(again.text(), cache_info_body(30));
}

#[test]
fn cache_priority_is_configurable() {
    let n = start(&[], "[server]\ncache_priority = 42\n");
    let r = n.get("/nix-cache-info");
    assert_eq!(r.text(), cache_info_body(42));
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    // One worker: its listener accepts in arrival order, so the harness's
    // readiness probes were all counted before this connection was served.
    let n = start(&[], "[server]\nworkers = 1\n");
    let mut c = conn(&n);
    let accepted = |c: &mut HttpConn| {
        let page = c.get("/metrics").unwrap().text();
        metric(&page, "ncro_worker_connections_total{worker=\"0\"}").expect("metric present")
    };
    let before = accepted(&mut c);
    for i in 0..100 {
        let r = match i % 3 {
            0 => c.get("/nix-cache-info").unwrap(),
            1 => c.request("HEAD", "/nix-cache-info", &[]).unwrap(),
            _ => c.get("/health").unwrap(),
        };
        assert_eq!(r.status, 200, "request {i}");
        assert!(!c.is_closed(), "closed after request {i}");
    }
    assert_eq!(
        accepted(&mut c),
        before,
        "every request used one connection"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let key = TestKey::generate("pipe-1");
    let p = TestPath::new("pipelined");
    // The upstream answer is slow, so later requests that are answered
    // from memory must wait their turn behind it.
    let up = FakeUpstream::builder()
        .path(&p, &key)
        .rule(
            p.narinfo_request_path().as_str(),
            Fault::Delay(Duration::from_millis(300)),
        )
        .start();
    let n = start(&[(&up.url(), &key.public_key())], "");
    let bad_hash = format!("/{}.narinfo", "e".repeat(32));
    let plan: Vec<(&str, String, u16)> = vec![
        ("GET", "/nix-cache-info".into(), 200),
        ("GET", "/foo".into(), 404),
        ("GET", p.narinfo_request_path(), 200),
        ("HEAD", "/nix-cache-info".into(), 200),
        ("GET", bad_hash, 400),
        ("GET", "/health".into(), 200),
        ("HEAD", p.narinfo_request_path(), 200),
        ("GET", p.nar_request_path(), 200),
        ("GET", "/metrics".into(), 200),
        ("GET", "/nix-cache-info".into(), 200),
    ];
    let mut batch = Vec::new();
    for (method, path, _) in &plan {
        write!(batch, "{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    }
    let mut c = conn(&n);
    c.send_raw(&batch).unwrap();
    for (i, (method, path, status)) in plan.iter().enumerate() {
        let r = c.read_response(*method == "HEAD").unwrap();
        assert_eq!(r.status, *status, "response {i} ({method} {path})");
        if path == "/health" {
            assert!(r.text().contains("\"status\""), "{}", r.text());
        }
        if *method == "GET" && path.ends_with(".narinfo") && *status == 200 {
            assert!(r.text().contains(&p.store_path()), "{}", r.text());
        }
        if path.starts_with("/nar/") {
            assert_eq!(r.body, p.nar, "NAR body in the pipeline");
        }
    }
    assert_open(&mut c, "a pipelined batch");
    assert_eq!(up.request_count(&p.narinfo_request_path()), 1);
}

#[test]
fn connection_close_is_honoured() {
    let n = start(&[], "");
    let mut c = conn(&n);
    let r = c
        .request("GET", "/nix-cache-info", &[("Connection", "close")])
        .unwrap();
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert_eq!(r.text(), cache_info_body(30));
    assert_closed(&mut c, "Connection: close");
}

#[test]
fn http10_closes_unless_asked_to_keep_alive() {
    let n = start(&[], "");
    let (mut c, r) = raw_exchange(&n, b"GET /nix-cache-info HTTP/1.0\r\n\r\n", false);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), cache_info_body(30));
    assert_eq!(r.header("Connection"), Some("close"));
    assert_closed(&mut c, "an HTTP/1.0 request");

    let ka = b"GET /nix-cache-info HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (mut c, r) = raw_exchange(&n, ka, false);
    assert_eq!(r.status, 200);
    assert_ne!(r.header("Connection"), Some("close"));
    for i in 0..3 {
        c.send_raw(ka).unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.text(), cache_info_body(30), "request {i}");
    }
    assert!(!c.wait_closed(Duration::from_millis(300)).unwrap());
}

#[test]
fn garbage_gets_400_and_the_connection_closes() {
    let n = start(&[], "");
    for raw in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"GET /nix-cache-info HTTP/7.1\r\n\r\n",
        b"GET /nix-cache-info\r\n\r\n",
        b"G\xffT / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
    ] {
        let (mut c, r) = raw_exchange(&n, raw, false);
        assert_eq!(r.status, 400, "{:?}", show(raw));
        assert_eq!(r.header("Connection"), Some("close"), "{:?}", show(raw));
        assert_closed(&mut c, &show(raw));
    }
}

#[test]
fn other_methods_get_405_with_allow() {
    let n = start(&[], "");
    let mut c = conn(&n);
    for method in ["POST", "PUT", "DELETE", "BREW", "OPTIONS", "PATCH"] {
        let r = c.request(method, "/nix-cache-info", &[]).unwrap();
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("Allow"), Some("GET, HEAD"), "{method}");
        assert_open(&mut c, method);
    }
    // With a body ncro will not read, it answers and then closes.
    let (mut c, r) = raw_exchange(
        &n,
        b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        false,
    );
    assert_eq!((r.status, r.header("Connection")), (405, Some("close")));
    assert_eq!(r.header("Allow"), Some("GET, HEAD"));
    assert_closed(&mut c, "a POST with a body");
}

#[test]
fn request_bodies_are_refused() {
    let n = start(&[], "");
    for raw in [
        &b"GET /nix-cache-info HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"GET /nix-cache-info HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let (mut c, r) = raw_exchange(&n, raw, false);
        assert_eq!(r.status, 400, "{:?}", show(raw));
        assert_eq!(r.header("Connection"), Some("close"));
        // The body is never taken for a second request.
        assert_closed(&mut c, &show(raw));
    }
}

#[test]
fn oversized_heads_get_431() {
    let n = start(&[], "");
    let huge = format!(
        "GET /nix-cache-info HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let (mut c, r) = raw_exchange(&n, huge.as_bytes(), false);
    assert_eq!((r.status, r.header("Connection")), (431, Some("close")));
    assert_closed(&mut c, "a 40 KiB header");

    let mut many = String::from("GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let (mut c, r) = raw_exchange(&n, many.as_bytes(), false);
    assert_eq!((r.status, r.header("Connection")), (431, Some("close")));
    assert_closed(&mut c, "100 headers");

    // A head just under the limits is fine.
    let mut ok = String::from("GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n");
    for i in 0..50 {
        ok.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(200)));
    }
    ok.push_str("\r\n");
    let (_, r) = raw_exchange(&n, ok.as_bytes(), false);
    assert_eq!(r.status, 200);
}

#[test]
fn unknown_paths_get_404_and_keep_the_connection() {
    let n = start(&[], "");
    let mut c = conn(&n);
    for path in [
        "/",
        "/foo",
        "/nar",
        "/narinfo",
        "/nix-cache-info/",
        "/nix-cache-info/x",
        "/healthz",
        "/nix/store",
    ] {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.header("Connection"), None, "{path}");
    }
    assert_open(&mut c, "404s");
}

#[test]
fn invalid_narinfo_names_get_400_and_never_reach_upstream() {
    let key = TestKey::generate("val-1");
    let good = TestPath::new("good");
    let up = fake_with(std::slice::from_ref(&good), &key);
    let n = start(&[(&up.url(), &key.public_key())], "");
    let h = good.hash.clone();
    let mut bad: Vec<String> = vec![
        format!("/{}.narinfo", &h[..31]),
        format!("/{h}0.narinfo"),
        "/.narinfo".into(),
        format!("/{}.narinfo", h.to_uppercase()),
        format!("/../{h}.narinfo"),
        format!("/x/{h}.narinfo"),
        format!("/nix/store/{h}.narinfo"),
        format!("/{}%2e.narinfo", &h[..29]),
    ];
    for letter in ['e', 'o', 'u', 't'] {
        bad.push(format!("/{letter}{}.narinfo", &h[1..]));
    }
    let mut c = conn(&n);
    for path in &bad {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 400, "{path}");
        assert_open(&mut c, path);
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // The check can fail: a valid name does go upstream.
    let r = c.get(&good.narinfo_request_path()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(up.requests().len(), 1, "{:?}", up.requests());
}

#[test]
fn invalid_nar_paths_get_400_and_never_reach_upstream() {
    let key = TestKey::generate("val-2");
    let good = TestPath::new("good-nar");
    let up = fake_with(std::slice::from_ref(&good), &key);
    let n = start(&[(&up.url(), &key.public_key())], "");
    let mut c = conn(&n);
    for path in [
        "/nar/../x",
        "/nar/a//b",
        "/nar/",
        "/nar/./x",
        "/nar/a/../../etc/passwd",
        "/nar/x.nar%00",
        "/nar/a\\b",
    ] {
        let r = c.get(path).unwrap();
        assert_eq!(r.status, 400, "{path}");
        assert_open(&mut c, path);
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    let r = c.get(&good.nar_request_path()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, good.nar);
    assert_eq!(up.requests().len(), 1, "{:?}", up.requests());
}

#[test]
fn request_targets_ncro_cannot_forward_get_400_and_leave_upstream_health_alone() {
    let key = TestKey::generate("val-3");
    let good = TestPath::new("good-nar-2");
    let a = fake_with(std::slice::from_ref(&good), &key);
    let b = fake_with(&[], &key);
    let n = start(
        &[(&a.url(), &key.public_key()), (&b.url(), &key.public_key())],
        "",
    );
    let upstream_lines = |page: &str| -> Vec<String> {
        page.lines()
            .filter(|l| l.starts_with("ncro_upstream_"))
            .map(str::to_owned)
            .collect()
    };
    let before = upstream_lines(&n.get("/metrics").text());
    let nar = good.nar_request_path();
    // A query byte the upstream client will not send, and a target within
    // the 32 KiB head limit but over what may be forwarded.
    let targets = [
        format!("{nar}?\u{e9}"),
        format!("{nar}?a=1&b=\u{e9}t\u{e9}"),
        format!("{nar}?{}", "q".repeat(31 * 1024)),
    ];
    let mut c = conn(&n);
    for t in &targets {
        let r = c.get(t).unwrap();
        let shown: String = t.chars().take(80).collect();
        assert_eq!(r.status, 400, "{shown}...");
        assert_open(&mut c, "an unforwardable target");
    }
    assert!(a.requests().is_empty(), "{:?}", a.requests());
    assert!(b.requests().is_empty(), "{:?}", b.requests());
    let health: serde_json::Value =
        serde_json::from_slice(&n.get("/health").body).expect("/health is JSON");
    let ups = health["upstreams"].as_array().expect("upstreams");
    assert_eq!(ups.len(), 2, "{health}");
    for u in ups {
        assert_eq!(u["cooling_down"], false, "{health}");
        assert_eq!(u["consecutive_fails"], 0, "{health}");
    }
    assert_eq!(upstream_lines(&n.get("/metrics").text()), before);
    // The upstreams are asked as usual afterwards.
    let r = c.get(&nar).unwrap();
    assert_eq!((r.status, r.body == good.nar), (200, true));
}

/// Opens a connection and sends `first` bytes of a request head.
fn slow_client(n: &Running, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(n.addr()).expect("connect");
    s.write_all(first).expect("write");
    s
}

/// How long until the server closes `s` (reading whatever it sends), or
/// `None` if it is still open after `limit`. With `trickle`, one more byte
/// of header is sent every `trickle` while waiting.
fn time_to_close(mut s: TcpStream, limit: Duration, trickle: Option<Duration>) -> Option<Duration> {
    use std::io::Read;
    let t = Instant::now();
    let step = trickle.unwrap_or(Duration::from_millis(200));
    s.set_read_timeout(Some(step)).expect("timeout");
    let mut buf = [0u8; 1024];
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t.elapsed()),
            Err(_) => {
                if trickle.is_some() && s.write_all(b"x").is_err() {
                    return Some(t.elapsed());
                }
            }
        }
    }
    None
}

#[test]
fn slow_and_idle_clients_are_dropped_after_read_timeout() {
    let n = start(&[], "[server]\nread_timeout = \"1s\"\n");
    let half = slow_client(&n, b"GET /nix-cache-info HTTP/1.1\r\nHost: slow\r\n");
    // Keeps sending a header byte every 300 ms, well inside the 1 s timeout
    // for each read, so only a deadline on the whole head can stop it.
    let trickler = slow_client(&n, b"GET /nix-cache-info HTTP/1.1\r\nX-Slow: ");
    let mut idle = conn(&n);
    assert_eq!(idle.get("/nix-cache-info").unwrap().status, 200);

    let limit = Duration::from_secs(8);
    let slow = std::thread::spawn(move || time_to_close(half, limit, None));
    let trickle = std::thread::spawn(move || {
        time_to_close(trickler, limit, Some(Duration::from_millis(300)))
    });
    // Meanwhile another client is served without delay.
    let mut busy = conn(&n);
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_millis(2500) {
        let r = busy.get("/nix-cache-info").unwrap();
        assert_eq!(r.status, 200);
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 10, "only {served} requests served");
    for (what, waited) in [
        ("half a head", slow.join().unwrap()),
        ("a trickled head", trickle.join().unwrap()),
    ] {
        let waited = waited.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            waited >= Duration::from_millis(500),
            "{what}: closed after {waited:?}, before read_timeout"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || idle
            .wait_closed(Duration::from_millis(100))
            .unwrap_or(true)),
        "an idle keep-alive connection outlived read_timeout"
    );
    assert_eq!(busy.get("/nix-cache-info").unwrap().status, 200);
}

#[test]
fn head_error_answers_carry_no_body() {
    // Nix asks `HEAD /<hash>.narinfo` to test for a path; a body after a
    // HEAD answer would be read as the start of the next response.
    let key = TestKey::generate("head-1");
    let up = fake_with(&[], &key);
    let n = start(&[(&up.url(), &key.public_key())], "");
    let mut c = conn(&n);
    let miss = format!("/{}.narinfo", crate::fake::random_hash());
    let bad = format!("/{}.narinfo", "e".repeat(32));
    for (path, status) in [
        (miss.as_str(), 404),
        (bad.as_str(), 400),
        ("/nope", 404),
        ("/nar/a//b", 400),
        (
            "/nar/0000000000000000000000000000000000000000000000000000.nar",
            404,
        ),
    ] {
        let r = c.request("HEAD", path, &[]).unwrap();
        assert_eq!(r.status, status, "HEAD {path}");
        let len: usize = r.header("Content-Length").unwrap().parse().unwrap();
        assert!(len > 0, "HEAD {path}: the GET answer has a body");
        let next = c.get("/nix-cache-info").unwrap();
        assert_eq!(next.text(), cache_info_body(30), "after HEAD {path}");
    }
}

#[test]
fn empty_lines_before_a_request_are_ignored() {
    // Regression: "\r\n\r\n" passed the server's blank-line scan for a
    // complete head while httparse (which skips leading empty lines) still
    // wanted more, and the worker panicked; in release builds
    // (panic = "abort") four bytes from any client ended the process.
    let n = start(&[], "[server]\nworkers = 1\n");
    for (first, rest) in [
        (
            "\r\n\r\n",
            "GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
        ("\n\n\n", "GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n\r\n"),
        (
            "\r\n\r\nGET /nix-cache-info HTTP/1.1\r\nHost: t\r\n\r\n",
            "",
        ),
    ] {
        let mut c = conn(&n);
        c.send_raw(first.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        c.send_raw(rest.as_bytes()).unwrap();
        let r = c.read_response(false).unwrap_or_else(|e| {
            panic!("after {first:?}: {e}\n{}", n.logs());
        });
        assert_eq!(r.text(), cache_info_body(30), "after {first:?}");
    }
    // The worker is alive and still accepting.
    assert_eq!(n.get("/nix-cache-info").status, 200);
    assert!(!n.stderr().contains("panicked"), "{}", n.logs());
}
