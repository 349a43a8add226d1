//! HTTP/1.1 on the wire for the fake: request parsing, and answers shaped
//! by the fault a rule picked.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::{Fault, RequestRecord, Resource, Shared, CHUNK, MAX_HEAD};

/// How a connection ends after an answer.
pub(super) enum Next {
    KeepAlive,
    Close,
    Reset,
}

pub(super) enum Parsed {
    Complete(RequestRecord, usize),
    Partial,
    Bad(u16),
}

pub(super) fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Parsed::Bad(431),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Parsed::Bad(431),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(431),
        Err(_) => return Parsed::Bad(400),
    };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let record = RequestRecord {
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        headers,
        version: req.version.unwrap_or(1),
        conn: 0,
        at: Instant::now(),
    };
    if record.header("transfer-encoding").is_some() {
        return Parsed::Bad(501);
    }
    let body_len = match record
        .header("content-length")
        .map(|v| v.trim().parse::<usize>())
    {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Parsed::Bad(400),
    };
    if buf.len() < head_len + body_len {
        return Parsed::Partial;
    }
    Parsed::Complete(record, head_len + body_len)
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn wants_close(req: &RequestRecord) -> bool {
    let conn = req.header("connection");
    has_token(conn, "close") || (req.version == 0 && !has_token(conn, "keep-alive"))
}

/// Status, extra headers and body slice of a normal answer.
struct Reply<'a> {
    status: u16,
    headers: Vec<(String, String)>,
    body: &'a [u8],
}

pub(super) fn answer(stream: &mut TcpStream, req: &RequestRecord, sh: &Shared) -> io::Result<Next> {
    let (delay, fault) = sh.plan(&req.path);
    if !delay.is_zero() && !sh.sleep(delay) {
        return Ok(Next::Close);
    }
    let close = wants_close(req);
    let head_only = req.method == "HEAD";
    let next_ok = if close { Next::Close } else { Next::KeepAlive };
    if !matches!(req.method.as_str(), "GET" | "HEAD") {
        write_head(stream, 405, &[], Some(0), close)?;
        return Ok(next_ok);
    }
    let no_ranges = matches!(fault, Some(Fault::NoRanges));
    let reply = normal_reply(sh.resources.get(&req.path), req, no_ranges);
    let Some(fault) = fault else {
        send(stream, &reply, head_only, close)?;
        return Ok(next_ok);
    };
    match fault {
        Fault::Status(s) => write_head(stream, s, &[], Some(0), close).map(|_| next_ok),
        Fault::StatusWithHeaders(s, h) => {
            let len = (!h
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .then_some(0);
            write_head(stream, s, &h, len, close).map(|_| next_ok)
        }
        Fault::Body(body) => {
            let res = Resource {
                content_type: reply_type(&reply).to_owned(),
                body,
            };
            let forged = Reply {
                status: 200,
                headers: vec![("Content-Type".to_owned(), res.content_type.clone())],
                body: &res.body,
            };
            send(stream, &forged, head_only, close).map(|_| next_ok)
        }
        Fault::Redirect(to) => {
            write_head(stream, 302, &[("Location".into(), to)], Some(0), close).map(|_| next_ok)
        }
        Fault::Raw(bytes) => stream.write_all(&bytes).map(|_| Next::Close),
        Fault::Unsolicited(after, bytes) => {
            send(stream, &reply, head_only, close)?;
            if !sh.sleep(after) {
                return Ok(Next::Close);
            }
            stream.write_all(&bytes).map(|_| next_ok)
        }
        Fault::Close => Ok(Next::Close),
        Fault::Reset => Ok(Next::Reset),
        Fault::Hang => {
            sh.hang();
            Ok(Next::Close)
        }
        shaped => send_shaped(stream, reply, &shaped, head_only, close, sh),
    }
}

/// The Content-Type of a normal answer, or a generic one for a 404.
fn reply_type<'a>(r: &'a Reply) -> &'a str {
    r.headers
        .iter()
        .find(|(k, _)| k == "Content-Type")
        .map_or("application/octet-stream", |(_, v)| v.as_str())
}

/// The answer without faults: 200, 206, 416 or 404.
fn normal_reply<'a>(res: Option<&'a Resource>, req: &RequestRecord, no_ranges: bool) -> Reply<'a> {
    let Some(res) = res else {
        return Reply {
            status: 404,
            headers: Vec::new(),
            body: &[],
        };
    };
    let mut headers = vec![("Content-Type".to_owned(), res.content_type.clone())];
    if no_ranges {
        return Reply {
            status: 200,
            headers,
            body: &res.body,
        };
    }
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let total = res.body.len();
    match req.header("range").map(|r| parse_range(r, total)) {
        None | Some(RangeReq::Ignore) => Reply {
            status: 200,
            headers,
            body: &res.body,
        },
        Some(RangeReq::Unsatisfiable) => {
            headers.push(("Content-Range".into(), format!("bytes */{total}")));
            Reply {
                status: 416,
                headers,
                body: &[],
            }
        }
        Some(RangeReq::Bytes(start, end)) => {
            headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{end}/{total}"),
            ));
            Reply {
                status: 206,
                headers,
                body: &res.body[start..=end],
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum RangeReq {
    /// Malformed or multi-range: serve the whole body (RFC 9110 allows it).
    Ignore,
    Unsatisfiable,
    /// Inclusive byte positions.
    Bytes(usize, usize),
}

fn parse_range(value: &str, total: usize) -> RangeReq {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeReq::Ignore;
    };
    if spec.contains(',') {
        return RangeReq::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<usize>().ok();
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => match parse(b) {
            Some(0) => return RangeReq::Unsatisfiable,
            Some(n) => (total.saturating_sub(n), total.saturating_sub(1)),
            None => return RangeReq::Ignore,
        },
        (false, true) => match parse(a) {
            Some(s) => (s, total.saturating_sub(1)),
            None => return RangeReq::Ignore,
        },
        (false, false) => match (parse(a), parse(b)) {
            (Some(s), Some(e)) if s <= e => (s, e.min(total.saturating_sub(1))),
            _ => return RangeReq::Ignore,
        },
        (true, true) => return RangeReq::Ignore,
    };
    if start >= total {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Bytes(start, end)
}

fn send(stream: &mut TcpStream, r: &Reply, head_only: bool, close: bool) -> io::Result<()> {
    write_head(stream, r.status, &r.headers, Some(r.body.len()), close)?;
    if !head_only {
        stream.write_all(r.body)?;
    }
    Ok(())
}

/// Faults that change how a normal answer's head or body goes out.
fn send_shaped(
    stream: &mut TcpStream,
    mut r: Reply,
    fault: &Fault,
    head_only: bool,
    close: bool,
    sh: &Shared,
) -> io::Result<Next> {
    let next_ok = if close { Next::Close } else { Next::KeepAlive };
    let body = r.body;
    let cut = |n: usize| &body[..n.min(body.len())];
    match fault {
        Fault::Chunked | Fault::BadChunked => {
            r.headers
                .push(("Transfer-Encoding".into(), "chunked".into()));
            write_head(stream, r.status, &r.headers, None, close)?;
            if head_only {
                return Ok(next_ok);
            }
            if matches!(fault, Fault::BadChunked) {
                stream.write_all(b"zz\r\nnot a chunk\r\n")?;
                return Ok(Next::Close);
            }
            for part in body.chunks(CHUNK) {
                stream.write_all(format!("{:x}\r\n", part.len()).as_bytes())?;
                stream.write_all(part)?;
                stream.write_all(b"\r\n")?;
            }
            stream.write_all(b"0\r\n\r\n")?;
            Ok(next_ok)
        }
        Fault::EnormousHeaders => {
            let filler = "a".repeat(100);
            r.headers
                .extend((0..2000).map(|i| (format!("X-Filler-{i}"), filler.clone())));
            send(stream, &r, head_only, close).map(|_| next_ok)
        }
        Fault::NoRanges => send(stream, &r, head_only, close).map(|_| next_ok),
        Fault::TruncateNoLength(n) => {
            write_head(stream, r.status, &r.headers, None, true)?;
            if !head_only {
                stream.write_all(cut(*n))?;
            }
            Ok(Next::Close)
        }
        Fault::Truncate(n) | Fault::ResetMidBody(n) | Fault::HangMidBody(n) => {
            write_head(stream, r.status, &r.headers, Some(body.len()), close)?;
            if head_only {
                return Ok(next_ok);
            }
            stream.write_all(cut(*n))?;
            match fault {
                Fault::ResetMidBody(_) => Ok(Next::Reset),
                Fault::HangMidBody(_) => {
                    sh.hang();
                    Ok(Next::Close)
                }
                _ => Ok(Next::Close),
            }
        }
        Fault::Trickle(step, every) => {
            write_head(stream, r.status, &r.headers, Some(body.len()), close)?;
            if head_only {
                return Ok(next_ok);
            }
            for part in body.chunks((*step).max(1)) {
                stream.write_all(part)?;
                if !sh.sleep(*every) {
                    return Ok(Next::Close);
                }
            }
            Ok(next_ok)
        }
        other => unreachable!("fault {other:?} is handled by answer()"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Fake",
    }
}

/// Writes a head; `len` None means the caller frames the body otherwise.
pub(super) fn write_head(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    len: Option<usize>,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(n) = len {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}
