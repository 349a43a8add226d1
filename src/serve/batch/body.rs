//! Reading the one request body ncro accepts: a batch of store hashes.
//!
//! Everywhere else a body is refused before it is read. Here it is read
//! with a hard size cap and one deadline for the whole body, framed by
//! `Content-Length` or `Transfer-Encoding: chunked` (curl sends the latter
//! when the size is not known up front), and `Expect: 100-continue` is
//! honoured so curl does not stall a second waiting for it.

use std::io;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::http::chunked::ChunkedDecoder;
use crate::http::request::MAX_HEADERS;

/// How the request says its body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub length: Option<u64>,
    pub chunked: bool,
    pub expect_continue: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// 413.
    #[error("request body over the {0}-byte limit")]
    TooLarge(usize),
    /// 400.
    #[error("{0}")]
    Malformed(&'static str),
    /// 408.
    #[error("request body not received in time")]
    Timeout,
    #[error("client closed the connection mid-body")]
    Closed,
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
}

/// Reads the framing headers of a request head (parsed again here, so the
/// shared request parser stays as lean as the GET path needs).
pub fn framing(head: &[u8]) -> Result<Framing, BodyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return Err(BodyError::Malformed("malformed request"));
    }
    let mut f = Framing {
        length: None,
        chunked: false,
        expect_continue: false,
    };
    let mut transfer_encoding = false;
    for h in req.headers.iter() {
        let v = h.value.trim_ascii();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(BodyError::Malformed("invalid Content-Length"))?;
            if f.length.is_some_and(|m| m != n) {
                return Err(BodyError::Malformed("conflicting Content-Length"));
            }
            f.length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            f.chunked = v.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("expect") {
            f.expect_continue = v.eq_ignore_ascii_case(b"100-continue");
        }
    }
    // Both framings at once is how requests are smuggled past proxies.
    if transfer_encoding && (!f.chunked || f.length.is_some()) {
        return Err(BodyError::Malformed("unsupported Transfer-Encoding"));
    }
    Ok(f)
}

/// A body read off the connection.
pub struct Body {
    pub bytes: Vec<u8>,
    /// Bytes of the buffered tail (after the head) that belonged to it.
    pub from_tail: usize,
    /// Bytes after the body were read too (a pipelined request behind a
    /// chunked body): the connection must close after the answer.
    pub overshot: bool,
}

/// Reads the body framed by `f`: first from `tail` (what arrived with the
/// head), then from `stream` until `deadline`. At most `max` body bytes.
pub async fn read(
    stream: &mut TcpStream,
    f: Framing,
    tail: &[u8],
    max: usize,
    deadline: Instant,
) -> Result<Body, BodyError> {
    if f.length.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    if f.chunked {
        return read_chunked(stream, f, tail, max, deadline).await;
    }
    let want = f.length.unwrap_or(0) as usize; // <= max, checked above
    let from_tail = want.min(tail.len());
    let mut bytes = Vec::with_capacity(want);
    bytes.extend_from_slice(&tail[..from_tail]);
    if bytes.len() < want && f.expect_continue {
        send_continue(stream, deadline).await?;
    }
    while bytes.len() < want {
        let missing = want - bytes.len();
        read_some(stream, &mut bytes, missing, deadline).await?;
    }
    Ok(Body {
        bytes,
        from_tail,
        overshot: false,
    })
}

async fn read_chunked(
    stream: &mut TcpStream,
    f: Framing,
    tail: &[u8],
    max: usize,
    deadline: Instant,
) -> Result<Body, BodyError> {
    let mut decoder = ChunkedDecoder::new();
    let mut body = Vec::new();
    let from_tail = decode(&mut decoder, tail, &mut body, max)?;
    if decoder.is_done() {
        return Ok(Body {
            bytes: body,
            from_tail,
            overshot: false,
        });
    }
    if f.expect_continue {
        send_continue(stream, deadline).await?;
    }
    let mut raw = Vec::with_capacity(16 * 1024);
    loop {
        raw.clear();
        read_some(stream, &mut raw, 16 * 1024, deadline).await?;
        let used = decode(&mut decoder, &raw, &mut body, max)?;
        if decoder.is_done() {
            return Ok(Body {
                bytes: body,
                from_tail,
                overshot: used < raw.len(),
            });
        }
    }
}

/// Feeds `input` to the decoder until it is used up or the body ends;
/// returns how much of `input` was consumed.
fn decode(
    decoder: &mut ChunkedDecoder,
    input: &[u8],
    body: &mut Vec<u8>,
    max: usize,
) -> Result<usize, BodyError> {
    let mut used = 0;
    while used < input.len() && !decoder.is_done() {
        let p = decoder
            .decode(&input[used..])
            .map_err(|_| BodyError::Malformed("malformed chunked body"))?;
        let data = &input[used..][p.data];
        if body.len() + data.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(data);
        used += p.consumed;
    }
    Ok(used)
}

/// An interim `100 Continue`: the client holds the body back until it
/// sees one (curl waits a second, then sends anyway).
async fn send_continue(stream: &mut TcpStream, deadline: Instant) -> Result<(), BodyError> {
    let write = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
    match monoio::time::timeout_at(deadline, write).await {
        Ok((res, _)) => res.map(|_| ()).map_err(BodyError::Io),
        Err(_) => Err(BodyError::Timeout),
    }
}

/// Appends up to `limit` bytes from `stream` to `buf`.
async fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
) -> Result<(), BodyError> {
    buf.reserve(limit);
    let taken = std::mem::take(buf);
    let start = taken.len();
    let end = start + limit.min(taken.capacity() - start);
    let read = monoio::time::timeout_at(deadline, stream.read(taken.slice_mut(start..end))).await;
    let Ok((res, slice)) = read else {
        return Err(BodyError::Timeout);
    };
    *buf = slice.into_inner();
    match res? {
        0 => Err(BodyError::Closed),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(head: &str) -> Result<Framing, BodyError> {
        framing(head.as_bytes())
    }

    #[test]
    fn framing_headers() {
        let cl = f("POST /x HTTP/1.1\r\nContent-Length: 66\r\n\r\n").expect("ok");
        assert_eq!(
            (cl.length, cl.chunked, cl.expect_continue),
            (Some(66), false, false)
        );
        let ch =
            f("QUERY /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
                .expect("ok");
        assert_eq!(
            (ch.length, ch.chunked, ch.expect_continue),
            (None, true, true)
        );
        let none = f("POST /x HTTP/1.1\r\n\r\n").expect("ok");
        assert_eq!((none.length, none.chunked), (None, false));
        let same = f("POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(same.expect("ok").length, Some(5));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for head in [
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
        ] {
            assert!(matches!(f(head), Err(BodyError::Malformed(_))), "{head}");
        }
    }

    #[test]
    fn chunked_decoding_is_bounded() {
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        let input = b"5\r\nabcde\r\n3\r\nfgh\r\n0\r\n\r\nGET / HTTP/1.1";
        let used = decode(&mut d, input, &mut body, 100).expect("decodes");
        assert!(d.is_done());
        assert_eq!(body, b"abcdefgh");
        assert_eq!(&input[used..], b"GET / HTTP/1.1");
        let mut d = ChunkedDecoder::new();
        let mut body = Vec::new();
        assert!(matches!(
            decode(&mut d, b"5\r\nabcde\r\n", &mut body, 4),
            Err(BodyError::TooLarge(4))
        ));
    }
}
