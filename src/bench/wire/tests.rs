use std::io::{Read, Write};
use std::net::TcpListener;

use super::*;

/// Serves `responses` in order on one connection, one per request head
/// received, then closes. Returns the target and the request heads seen.
fn canned(responses: Vec<&'static [u8]>) -> (Target, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut seen = Vec::new();
        for resp in responses {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).unwrap_or(0) == 0 {
                    return seen;
                }
                head.push(byte[0]);
            }
            seen.push(String::from_utf8(head).unwrap());
            s.write_all(resp).unwrap();
        }
        seen
    });
    let target = Target {
        addr,
        host: format!("{addr}"),
        prefix: "/cache".into(),
    };
    (target, thread)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn keep_alive_length_chunked_and_interim_heads() {
    let (target, server) = canned(vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ]);
    let out = block_on(async {
        let mut c = ClientConn::new(&target, 64);
        let a = c.get(&[b"/x", b".narinfo"], false).await.unwrap();
        let b = c.get(&[b"/y"], true).await.unwrap();
        let kept = c.captured.clone();
        let d = c.get(&[b"/z"], false).await.unwrap();
        (a, b, kept, d)
    });
    assert_eq!(
        out.0,
        Outcome {
            status: 200,
            bytes: 5
        }
    );
    assert_eq!(
        out.1,
        Outcome {
            status: 200,
            bytes: 5
        }
    );
    assert_eq!(out.2, b"abcde");
    assert_eq!(
        out.3,
        Outcome {
            status: 404,
            bytes: 0
        }
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 3, "one connection carried all three requests");
    assert!(seen[0].starts_with("GET /cache/x.narinfo HTTP/1.1\r\nHost: 127.0.0.1:"));
}

#[test]
fn body_until_close_and_connection_close() {
    let (target, server) = canned(vec![
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
    ]);
    let out = block_on(async {
        let mut c = ClientConn::new(&target, 4096);
        let r = c.get(&[b"/a"], true).await.unwrap();
        (r, c.captured.clone(), c.stream.is_none())
    });
    assert_eq!(out.0.bytes, 9);
    assert_eq!(out.1, b"all of it");
    assert!(
        out.2,
        "a close-delimited body leaves no reusable connection"
    );
    server.join().unwrap();
}

#[test]
fn truncated_and_malformed_responses_are_errors() {
    let (target, server) = canned(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]);
    let err = block_on(async { ClientConn::new(&target, 4096).get(&[b"/"], false).await });
    assert!(matches!(err, Err(WireError::Closed)), "{err:?}");
    server.join().unwrap();

    let (target, server) = canned(vec![b"NOT HTTP AT ALL\r\n\r\n"]);
    let err = block_on(async { ClientConn::new(&target, 4096).get(&[b"/"], false).await });
    assert!(matches!(err, Err(WireError::Protocol(_))), "{err:?}");
    server.join().unwrap();
}

#[test]
fn connect_failure_is_a_connect_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let target = Target {
        addr,
        host: "x".into(),
        prefix: String::new(),
    };
    let err = block_on(async { ClientConn::new(&target, 4096).get(&[b"/"], false).await });
    assert!(matches!(err, Err(WireError::Connect(_))), "{err:?}");
}
