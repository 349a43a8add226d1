//! Client-side abuse that the other server tests do not cover: more
//! connections than `server.max_connections`, a pipeline the client never
//! reads, and an endless request line.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::{cache_info_body, eventually, metric, start, Running};
use crate::harness::HttpConn;

/// Connections the test itself holds open at the cap.
const CAP: usize = 4;

/// Sum over workers of `ncro_worker_connections_open`, asked on `c`.
fn open_connections(c: &mut HttpConn, workers: usize) -> u64 {
    let page = c.get("/metrics").expect("metrics").text();
    (0..workers)
        .map(|w| {
            let name = format!("ncro_worker_connections_open{{worker=\"{w}\"}}");
            metric(&page, &name).expect("open-connections gauge")
        })
        .sum()
}

fn served(c: &mut HttpConn) -> bool {
    c.get("/nix-cache-info")
        .is_ok_and(|r| r.status == 200 && r.text() == cache_info_body(30))
}

/// Opens connections until `n` are served (a harness probe may still hold
/// a slot for a moment after it closed).
fn hold(n: &Running, count: usize) -> Vec<HttpConn> {
    let mut held = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < count {
        assert!(
            Instant::now() < deadline,
            "could not open {count} connections"
        );
        let mut c = HttpConn::connect(n.addr()).expect("connect");
        if served(&mut c) {
            held.push(c);
        }
    }
    held
}

#[test]
fn connections_over_max_connections_get_503_and_established_ones_keep_working() {
    // Two workers share one cap: the limit is per process, not per worker.
    let n = start(&[], "[server]\nworkers = 2\nmax_connections = 4\n");
    let mut held = hold(&n, CAP);
    assert_eq!(open_connections(&mut held[0], 2), CAP as u64);

    for attempt in 0..3 {
        let mut extra = HttpConn::connect(n.addr()).expect("the kernel accepts");
        let r = extra
            .get("/nix-cache-info")
            .expect("an answer, not a reset");
        assert_eq!(r.status, 503, "attempt {attempt}: {}", r.text());
        assert_eq!(r.header("Retry-After"), Some("1"));
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(
            extra.wait_closed(Duration::from_secs(5)).expect("read"),
            "a refused connection is closed"
        );
    }
    for (i, c) in held.iter_mut().enumerate() {
        assert!(served(c), "established connection {i} after the refusals");
    }
    let page = held[0].get("/metrics").expect("metrics").text();
    assert_eq!(
        metric(&page, "ncro_http_connections_rejected_total"),
        Some(3)
    );

    // Closing two frees two slots, once ncro has seen the closes.
    held.truncate(CAP - 2);
    let mut fresh = Vec::new();
    let freed = eventually(Duration::from_secs(5), || {
        let mut c = HttpConn::connect(n.addr()).expect("connect");
        if served(&mut c) {
            fresh.push(c);
        }
        fresh.len() == 2
    });
    assert!(freed, "closed connections never gave their slots back");
    let mut extra = HttpConn::connect(n.addr()).expect("connect");
    assert_eq!(extra.get("/nix-cache-info").unwrap().status, 503);
    drop(extra);
    // The refused connection is gone as soon as its client closes it.
    let settled = eventually(Duration::from_secs(5), || {
        open_connections(&mut held[0], 2) == CAP as u64
    });
    assert!(settled, "open connections never settled at the cap");
}

#[test]
fn max_connections_zero_means_no_cap() {
    let n = start(&[], "[server]\nworkers = 1\nmax_connections = 0\n");
    let held = hold(&n, 64);
    assert_eq!(held.len(), 64);
}

#[test]
fn unread_pipeline_is_bounded_by_the_write_timeout() {
    let n = start(&[], "[server]\nworkers = 1\nwrite_timeout = \"1s\"\n");
    // 2000 pipelined /metrics requests: tens of MB of answers, far more
    // than socket buffers hold, and this client reads none of them.
    const REQUESTS: usize = 2000;
    let one = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut greedy = TcpStream::connect(n.addr()).expect("connect");
    greedy
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    greedy
        .write_all(one.repeat(REQUESTS).as_bytes())
        .expect("the requests fit in the socket buffers");
    // Meanwhile everyone else is served.
    let mut other = HttpConn::connect(n.addr()).expect("connect");
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        assert!(served(&mut other), "another client starved");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Now read: ncro gave up writing after write_timeout and closed.
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let closed = loop {
        match greedy.read(&mut buf) {
            Ok(0) => break true,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "still open after {} bytes\n{}", got.len(), n.logs());
    let answers = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        answers < REQUESTS,
        "every answer was written: nothing bounded"
    );
    assert!(served(&mut other));
}

#[test]
fn endless_request_line_gets_431() {
    let n = start(&[], "");
    let mut c = HttpConn::connect(n.addr()).expect("connect");
    // No line end at all: ncro stops reading at its head limit (32 KiB).
    let line = format!("GET /{}", "a".repeat(40 * 1024));
    c.send_raw(line.as_bytes()).expect("send");
    let r = c.read_response(false).expect("an answer");
    assert_eq!((r.status, r.header("Connection")), (431, Some("close")));
    assert!(c.wait_closed(Duration::from_secs(5)).expect("read"));
}
