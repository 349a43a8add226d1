//! One raw HTTP/1.1 exchange that tells a complete response from one cut
//! short. The harness client turns a cut body into an error; the matrix
//! needs what arrived, whether the framing says it is whole, and how the
//! connection ended.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What one request got back.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes received, de-chunked.
    pub body: Vec<u8>,
    /// The framing says the body is whole: Content-Length reached, the last
    /// chunk seen, or a close-delimited body ended by the close.
    pub complete: bool,
    /// The server closed the connection (FIN or RST) before `fetch` returned.
    pub closed: bool,
    pub elapsed: Duration,
    /// The connection, when the answer completed and the server kept it.
    pub conn: Option<TcpStream>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the body of a parsed head is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// GET `path` with `headers` on a fresh connection; reads until the answer
/// is complete, the server closes, or `limit` passes (then `complete` and
/// `closed` are both false). Panics only if no head arrives at all.
pub fn fetch(addr: SocketAddr, path: &str, headers: &[(&str, &str)], limit: Duration) -> Got {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: ncro-test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut closed = false;
    loop {
        if let Some(got) = parse(&raw, false) {
            if got.complete {
                let keep = got.header("Connection") != Some("close");
                return Got {
                    elapsed: t.elapsed(),
                    conn: keep.then_some(s),
                    ..got
                };
            }
        }
        if t.elapsed() >= limit {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let got = parse(&raw, closed).unwrap_or_else(|| {
        panic!(
            "no response head for GET {path} after {:?} (closed: {closed}): {:?}",
            t.elapsed(),
            String::from_utf8_lossy(&raw)
        )
    });
    Got {
        closed,
        elapsed: t.elapsed(),
        ..got
    }
}

/// Whether another request on a kept connection is answered: an upstream's
/// failure must not cost the client its keep-alive connection.
pub fn still_usable(got: &mut Got) -> bool {
    let Some(s) = got.conn.as_mut() else {
        return false;
    };
    let sent = s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: ncro-test\r\n\r\n");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent.is_ok() && Instant::now() < deadline {
        if parse(&raw, false).is_some_and(|g| g.complete) {
            return parse(&raw, false).is_some_and(|g| g.status == 200);
        }
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    false
}

/// The response in `raw` so far; `eof` means the connection has ended.
fn parse(raw: &[u8], eof: bool) -> Option<Got> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let status = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            let v = String::from_utf8_lossy(h.value).into_owned();
            (h.name.to_owned(), v)
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let framing = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        Framing::Chunked
    } else if let Some(n) = find("content-length").and_then(|v| v.parse().ok()) {
        Framing::Length(n)
    } else if status == 304 || status == 204 {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    let rest = &raw[head_len..];
    let (body, complete) = match framing {
        Framing::Length(n) => (rest[..rest.len().min(n)].to_vec(), rest.len() >= n),
        Framing::Chunked => dechunk(rest),
        Framing::UntilClose => (rest.to_vec(), eof),
    };
    Some(Got {
        status,
        headers,
        body,
        complete,
        closed: false,
        elapsed: Duration::ZERO,
        conn: None,
    })
}

/// Decodes chunks as far as they are whole and valid; true once the last
/// chunk and the end of the trailer section were seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let line = String::from_utf8_lossy(&raw[..eol]);
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return (body, false);
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            // No trailers are expected: the next line must be the empty one.
            return (body, raw.starts_with(b"\r\n"));
        }
        if raw.len() < size + 2 {
            body.extend_from_slice(&raw[..raw.len().min(size)]);
            return (body, false);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[test]
fn parse_tells_whole_from_cut() {
    let whole = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false).unwrap();
    assert!(whole.complete && whole.body == b"abc");
    let cut = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", true).unwrap();
    assert!(!cut.complete && cut.body == b"abc");
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let c = parse(chunked, false).unwrap();
    assert!(c.complete && c.body == b"abc");
    let c = parse(&chunked[..chunked.len() - 5], true).unwrap();
    assert!(!c.complete && c.body == b"abc");
    let bad = parse(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        true,
    );
    assert!(!bad.unwrap().complete);
    let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nab";
    assert!(!parse(close, false).unwrap().complete);
    assert!(parse(close, true).unwrap().complete);
}
