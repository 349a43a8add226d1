//! The fake checked against plain std TcpStream clients, so that tests
//! built on it can trust what it does on the wire.

use super::*;
use std::io::ErrorKind;

const BODY: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A parsed response; `body` is de-chunked.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    head_len: usize,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        let h = self
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name));
        h.map(|(_, v)| v.as_str())
    }
}

impl Raw {
    fn connect(up: &FakeUpstream) -> Raw {
        let s = TcpStream::connect(up.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).unwrap();
    }

    fn get(&mut self, path: &str) -> Resp {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        self.read(false).unwrap()
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = self.take(i + 2)?;
                return Ok(String::from_utf8_lossy(&l[..i]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn read(&mut self, head_only: bool) -> io::Result<Resp> {
        let (status, headers, head_len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 4096];
            let mut r = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let h = r.headers.iter();
                let h = h.map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into()));
                break (r.code.unwrap(), h.collect::<Vec<_>>(), n);
            }
            if self.fill()? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        };
        self.buf.drain(..head_len);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            head_len,
        };
        if head_only {
            return Ok(resp);
        }
        if resp.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line()?, 16)
                    .map_err(|_| io::Error::new(ErrorKind::InvalidData, "chunk size"))?;
                if size == 0 {
                    self.line()?;
                    return Ok(resp);
                }
                resp.body.extend(self.take(size)?);
                self.take(2)?;
            }
        }
        let len: usize = resp.header("content-length").unwrap().parse().unwrap();
        resp.body = self.take(len)?;
        Ok(resp)
    }

    /// Everything until EOF or error; the error (if any) is returned too.
    fn rest(&mut self) -> (Vec<u8>, Option<io::Error>) {
        loop {
            match self.fill() {
                Ok(0) => return (std::mem::take(&mut self.buf), None),
                Ok(_) => {}
                Err(e) => return (std::mem::take(&mut self.buf), Some(e)),
            }
        }
    }
}

fn with_rule(path: &str, fault: Fault) -> FakeUpstream {
    FakeUpstream::builder()
        .file("/f", BODY)
        .rule(path, fault)
        .start()
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let h = random_hash();
    let up = FakeUpstream::builder()
        .narinfo(&h, "StorePath: x\n")
        .cache_info(40)
        .start();
    let mut c = Raw::connect(&up);
    let r = c.get(&format!("/{h}.narinfo"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"StorePath: x\n"[..]));
    assert_eq!(r.header("content-type"), Some("text/x-nix-narinfo"));
    let r = c.get("/nix-cache-info");
    assert_eq!(
        r.body,
        b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    );
    assert_eq!(c.get("/missing.narinfo").status, 404);
    assert_eq!(up.connections(), 1);
    let log = up.requests();
    assert_eq!(log.len(), 3);
    assert!(log
        .iter()
        .all(|r| r.conn == 0 && r.method == "GET" && r.version == 1));
    assert_eq!(log[0].header("HOST"), Some("x"));
    assert_eq!(up.request_count("/nix-cache-info"), 1);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = FakeUpstream::builder()
        .file("/a", "AAA")
        .file("/b", "B")
        .start();
    let mut c = Raw::connect(&up);
    c.send("GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /zz HTTP/1.1\r\n\r\n");
    assert_eq!(c.read(false).unwrap().body, b"AAA");
    let head = c.read(true).unwrap();
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("1"))
    );
    assert_eq!(c.read(false).unwrap().body, b"B");
    assert_eq!(c.read(false).unwrap().status, 404);
    assert_eq!(up.connections(), 1);
}

#[test]
fn request_bodies_are_skipped_and_other_methods_get_405() {
    let up = FakeUpstream::builder().file("/a", "A").start();
    let mut c = Raw::connect(&up);
    c.send("POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /a HTTP/1.1\r\n\r\n");
    assert_eq!(c.read(false).unwrap().status, 405);
    assert_eq!(c.read(false).unwrap().body, b"A");
}

#[test]
fn connection_close_and_http10_end_the_connection() {
    let up = FakeUpstream::builder().file("/a", "A").start();
    for req in [
        "GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /a HTTP/1.0\r\n\r\n",
    ] {
        let mut c = Raw::connect(&up);
        c.send(req);
        let r = c.read(false).unwrap();
        assert_eq!(
            (r.body.as_slice(), r.header("connection")),
            (&b"A"[..], Some("close"))
        );
        assert!(matches!(c.rest(), (ref b, None) if b.is_empty()));
    }
}

#[test]
fn single_byte_ranges_follow_rfc_9110() {
    let up = FakeUpstream::builder().file("/nar/x.nar", BODY).start();
    let mut c = Raw::connect(&up);
    let mut ask = |range: &str| {
        c.send(&format!(
            "GET /nar/x.nar HTTP/1.1\r\nRange: {range}\r\n\r\n"
        ));
        c.read(false).unwrap()
    };
    let r = ask("bytes=2-5");
    assert_eq!((r.status, r.body.as_slice()), (206, &b"2345"[..]));
    assert_eq!(r.header("content-range"), Some("bytes 2-5/36"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("content-type"), Some("application/x-nix-nar"));
    let r = ask("bytes=30-");
    assert_eq!((r.status, r.body.as_slice()), (206, &b"uvwxyz"[..]));
    let r = ask("bytes=-3");
    assert_eq!((r.status, r.body.as_slice()), (206, &b"xyz"[..]));
    assert_eq!(r.header("content-range"), Some("bytes 33-35/36"));
    let r = ask("bytes=30-999");
    assert_eq!(r.header("content-range"), Some("bytes 30-35/36"));
    let r = ask("bytes=36-");
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */36"))
    );
    for ignored in ["bytes=0-1,4-5", "bytes=5-2", "items=0-1"] {
        let r = ask(ignored);
        assert_eq!((r.status, r.body.len()), (200, BODY.len()), "{ignored}");
    }
}

#[test]
fn status_faults_answer_with_empty_bodies() {
    let up = with_rule("/f", Fault::Status(503));
    let r = Raw::connect(&up).get("/f");
    assert_eq!((r.status, r.body.len()), (503, 0));
    let h = vec![("Retry-After".to_owned(), "1".to_owned())];
    let up = with_rule("/f", Fault::StatusWithHeaders(429, h));
    let mut c = Raw::connect(&up);
    let r = c.get("/f");
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    assert_eq!(c.get("/f").status, 429, "connection stays usable");
}

#[test]
fn redirect_points_at_the_location() {
    let up = with_rule("/f", Fault::Redirect("http://127.0.0.1:1/g".into()));
    let r = Raw::connect(&up).get("/f");
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("http://127.0.0.1:1/g"))
    );
}

#[test]
fn raw_close_and_reset_end_the_connection_as_described() {
    let up = with_rule("/f", Fault::Raw(b"HTTP/1.1 2OO nonsense\r\n\r\n".to_vec()));
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\n\r\n");
    assert_eq!(c.rest().0, b"HTTP/1.1 2OO nonsense\r\n\r\n");

    let up = with_rule("/f", Fault::Close);
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\n\r\n");
    let (bytes, err) = c.rest();
    assert!(bytes.is_empty() && err.is_none(), "{err:?}");

    let up = with_rule("/f", Fault::Reset);
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\n\r\n");
    let (bytes, err) = c.rest();
    assert!(bytes.is_empty());
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
}

#[test]
fn mid_body_faults_send_the_full_length_and_part_of_the_body() {
    for (fault, want_err) in [
        (Fault::Truncate(10), None),
        (Fault::ResetMidBody(10), Some(ErrorKind::ConnectionReset)),
    ] {
        let up = with_rule("/f", fault);
        let mut c = Raw::connect(&up);
        c.send("GET /f HTTP/1.1\r\n\r\n");
        let r = c.read(true).unwrap();
        assert_eq!(r.header("content-length"), Some("36"));
        let (bytes, err) = c.rest();
        assert_eq!(bytes, &BODY[..10]);
        assert_eq!(err.map(|e| e.kind()), want_err);
    }
}

#[test]
fn truncate_without_length_ends_the_body_with_the_connection() {
    let up = with_rule("/f", Fault::TruncateNoLength(10));
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\n\r\n");
    let r = c.read(true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, None));
    assert_eq!(r.header("connection"), Some("close"));
    let (bytes, err) = c.rest();
    assert_eq!(bytes, &BODY[..10]);
    assert!(err.is_none(), "{err:?}");
}

#[test]
fn body_fault_replaces_the_resource_and_heal_restores_it() {
    let up = with_rule("/f", Fault::Body(b"forged".to_vec()));
    let mut c = Raw::connect(&up);
    let r = c.get("/f");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"forged"[..]));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    up.heal();
    assert_eq!(c.get("/f").body, BODY, "healed: the real resource");

    let up = FakeUpstream::builder()
        .file("/f", BODY)
        .latency(Duration::from_millis(100))
        .rule(PathMatch::Any, Fault::Delay(Duration::from_secs(5)))
        .rule("/f", Fault::Status(500))
        .start();
    up.heal();
    let t = Instant::now();
    assert_eq!(Raw::connect(&up).get("/f").status, 200);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(100),
        "latency stays: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "delays go: {took:?}");
}

#[test]
fn hang_faults_stay_silent_until_stop() {
    for fault in [Fault::Hang, Fault::HangMidBody(4)] {
        let mut up = with_rule("/f", fault.clone());
        let mut c = Raw::connect(&up);
        c.s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.send("GET /f HTTP/1.1\r\n\r\n");
        let (bytes, err) = c.rest();
        let kind = err.map(|e| e.kind());
        assert!(
            matches!(kind, Some(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "{kind:?}"
        );
        if let Fault::HangMidBody(_) = fault {
            assert!(bytes.ends_with(b"\r\n\r\n0123"), "{bytes:?}");
        } else {
            assert!(bytes.is_empty());
        }
        let t = Instant::now();
        up.stop();
        assert!(t.elapsed() < Duration::from_secs(2));
        c.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(c.rest().1.is_none(), "stop closes hung connections");
    }
}

#[test]
fn chunked_encodes_the_body_in_several_chunks() {
    let big = nix::random_bytes(3 * CHUNK + 17);
    let up = FakeUpstream::builder()
        .file("/n", big.clone())
        .rule("/n", Fault::Chunked)
        .start();
    let mut c = Raw::connect(&up);
    let r = c.get("/n");
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.body, big);
    assert_eq!(c.get("/n").body, big, "keep-alive after a chunked body");
    c.send("HEAD /n HTTP/1.1\r\n\r\n");
    assert_eq!(
        c.read(true).unwrap().header("transfer-encoding"),
        Some("chunked")
    );

    let up = with_rule("/f", Fault::BadChunked);
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\n\r\n");
    let err = c.read(false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidData);
}

#[test]
fn trickle_and_delay_slow_the_answer_down() {
    let up = with_rule("/f", Fault::Trickle(12, Duration::from_millis(50)));
    let t = Instant::now();
    assert_eq!(Raw::connect(&up).get("/f").body, BODY);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );

    let up = FakeUpstream::builder()
        .file("/f", BODY)
        .rule(PathMatch::Any, Fault::Delay(Duration::from_millis(150)))
        .rule("/f", Fault::Status(500))
        .start();
    let t = Instant::now();
    assert_eq!(
        Raw::connect(&up).get("/f").status,
        500,
        "delay falls through"
    );
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[test]
fn latency_applies_to_every_answer_and_can_change() {
    let up = FakeUpstream::builder()
        .file("/f", BODY)
        .latency(Duration::from_millis(500))
        .start();
    let mut c = Raw::connect(&up);
    let t = Instant::now();
    c.get("/f");
    assert!(t.elapsed() >= Duration::from_millis(500));
    up.set_latency(Duration::ZERO);
    let t = Instant::now();
    c.get("/f");
    assert!(t.elapsed() < Duration::from_millis(400));
}

#[test]
fn enormous_headers_make_a_huge_head() {
    let up = with_rule("/f", Fault::EnormousHeaders);
    let r = Raw::connect(&up).get("/f");
    assert!(r.head_len > 150 * 1024, "{}", r.head_len);
    assert_eq!(r.body, BODY);
}

#[test]
fn no_ranges_ignores_range_and_hides_accept_ranges() {
    let up = with_rule("/f", Fault::NoRanges);
    let mut c = Raw::connect(&up);
    c.send("GET /f HTTP/1.1\r\nRange: bytes=3-\r\n\r\n");
    let r = c.read(false).unwrap();
    assert_eq!(
        (r.status, r.body.as_slice(), r.header("accept-ranges")),
        (200, BODY, None)
    );
}

#[test]
fn nth_and_first_n_pick_requests_by_count() {
    let up = FakeUpstream::builder()
        .file("/f", BODY)
        .file("/g", BODY)
        .rule("/f", Fault::nth(2, Fault::Status(500)))
        .rule(
            PathMatch::prefix("/g"),
            Fault::first_n(2, Fault::Status(502)),
        )
        .start();
    let mut c = Raw::connect(&up);
    let f: Vec<u16> = (0..3).map(|_| c.get("/f").status).collect();
    assert_eq!(f, [200, 500, 200]);
    let g: Vec<u16> = (0..3).map(|_| c.get("/g").status).collect();
    assert_eq!(g, [502, 502, 200]);
}

#[test]
fn path_match_kinds() {
    assert!(PathMatch::Any.matches("/x"));
    assert!(PathMatch::suffix(".narinfo").matches("/abc.narinfo"));
    assert!(!PathMatch::suffix(".narinfo").matches("/abc.nar"));
    assert!(PathMatch::prefix("/nar/").matches("/nar/x.nar"));
    assert!(!PathMatch::from("/a").matches("/ab"));
}

#[test]
fn oversized_and_malformed_requests_are_refused() {
    let up = FakeUpstream::builder().start();
    let mut c = Raw::connect(&up);
    c.send(&format!(
        "GET /x HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    ));
    assert_eq!(c.read(false).unwrap().status, 431);
    let mut c = Raw::connect(&up);
    c.send("NOT HTTP\r\n\r\n");
    assert_eq!(c.read(false).unwrap().status, 400);
}

#[test]
fn serves_test_paths_and_restarts_on_the_same_port() {
    let key = TestKey::generate("k-1");
    let p = TestPath::new("hello");
    let mut up = FakeUpstream::builder().path(&p, &key).start();
    let addr = up.addr();
    let mut c = Raw::connect(&up);
    assert_eq!(
        c.get(&p.narinfo_request_path()).body,
        p.narinfo(&[&key]).as_bytes()
    );
    assert_eq!(c.get(&p.nar_request_path()).body, p.nar);
    up.stop();
    assert!(TcpStream::connect(addr).is_err(), "port closed after stop");
    let up2 = FakeUpstream::builder()
        .file("/a", "again")
        .start_on(addr)
        .unwrap();
    assert_eq!(Raw::connect(&up2).get("/a").body, b"again");
    assert_eq!(up2.url(), format!("http://{addr}"));
}

#[test]
fn idle_timeout_closes_quiet_connections_only() {
    let up = FakeUpstream::builder()
        .file("/a", BODY)
        .idle_timeout(Duration::from_millis(300))
        .start();
    let mut c = Raw::connect(&up);
    assert_eq!(c.get("/a").body, BODY);
    // Busy: requests closer together than the timeout keep it open.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.get("/a").status, 200);
    }
    let t = Instant::now();
    let (rest, err) = c.rest();
    assert!(rest.is_empty() && err.is_none(), "{rest:?} {err:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(up.connections(), 1);
}
