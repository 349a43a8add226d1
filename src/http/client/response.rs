//! Upstream response: head parsing, body framing and bounded body reads.
//!
//! The response owns its connection until the body is finished. Only a
//! body read to its exact end on a keep-alive connection hands the
//! connection back to the idle pool; every other path (error, timeout,
//! early drop, cancelled read) closes it, which is how lost races are
//! cancelled without leaking descriptors or reusing a confused stream.

use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;

use super::conn::Stream;
use super::{ClientError, Inner, Method, BODY_BUF_SIZE};
use crate::http::chunked::ChunkedDecoder;

/// Most header fields accepted in one response head.
const MAX_HEADERS: usize = 100;

/// Header bytes copied out of the connection buffer, which is then reused
/// for the body. One small allocation per response.
pub(super) struct Head {
    pub(super) status: u16,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(super) version: u8,
    raw: Box<[u8]>,
    fields: Vec<Field>,
}

#[derive(Clone, Copy)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

pub(super) enum HeadParse {
    Partial,
    /// A 1xx interim response of this many bytes; the real one follows.
    Interim(usize),
    Final(Head, usize),
}

/// Parses one response head from the start of `bytes`.
pub(super) fn parse_head(bytes: &[u8]) -> Result<HeadParse, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(HeadParse::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::Protocol("too many response headers"))
        }
        Err(_) => return Err(ClientError::Protocol("malformed response head")),
    };
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        return Err(ClientError::Protocol("unexpected 101 Switching Protocols"));
    }
    if (100..200).contains(&status) {
        return Ok(HeadParse::Interim(len));
    }
    let raw: Box<[u8]> = bytes[..len].into();
    let base = bytes.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = (s.as_ptr() as usize - base) as u32;
        (start, start + s.len() as u32)
    };
    let fields = resp
        .headers
        .iter()
        .map(|h| Field {
            name: offset(h.name.as_bytes()),
            value: offset(h.value),
        })
        .collect();
    let head = Head {
        status,
        version: resp.version.unwrap_or(1),
        raw,
        fields,
    };
    Ok(HeadParse::Final(head, len))
}

impl Head {
    fn field(&self, f: &Field) -> (&str, &[u8]) {
        let name = &self.raw[f.name.0 as usize..f.name.1 as usize];
        let value = &self.raw[f.value.0 as usize..f.value.1 as usize];
        // httparse only accepts token bytes in names, so this never fails.
        (std::str::from_utf8(name).unwrap_or_default(), value)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.fields.iter().map(|f| self.field(f))
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Comma-separated tokens across all fields called `name`.
    fn tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, Clone)]
pub(super) enum Framing {
    Empty,
    Length { remaining: u64 },
    Chunked(ChunkedDecoder),
    UntilClose,
}

pub(super) struct Decision {
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) content_length: Option<u64>,
}

/// How the body is delimited (RFC 9112 §6.3) and whether the connection
/// may be reused afterwards.
pub(super) fn decide_framing(head: &Head, method: Method) -> Result<Decision, ClientError> {
    let mut keep_alive = head.version == 1
        && !head
            .tokens("connection")
            .any(|t| t.eq_ignore_ascii_case(b"close"));
    let content_length = content_length(head)?;
    let no_body = method == Method::Head || head.status == 204 || head.status == 304;
    let codings: Vec<&[u8]> = head.tokens("transfer-encoding").collect();
    let framing = if no_body {
        Framing::Empty
    } else if let Some((last, earlier)) = codings.split_last() {
        if earlier.iter().any(|c| c.eq_ignore_ascii_case(b"chunked")) {
            return Err(ClientError::Protocol(
                "chunked is not the final transfer coding",
            ));
        }
        // Both framings present smells of response splitting: honour
        // Transfer-Encoding as RFC 9112 says, but never reuse the stream.
        if content_length.is_some() {
            keep_alive = false;
        }
        if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(ChunkedDecoder::new())
        } else {
            keep_alive = false;
            Framing::UntilClose
        }
    } else if let Some(len) = content_length {
        Framing::Length { remaining: len }
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    let content_length = match framing {
        Framing::Chunked(_) | Framing::UntilClose => None,
        _ => content_length,
    };
    Ok(Decision {
        framing,
        keep_alive,
        content_length,
    })
}

/// All Content-Length values must agree (repeats are legal, RFC 9110 §8.6).
fn content_length(head: &Head) -> Result<Option<u64>, ClientError> {
    let mut found = None;
    for value in head.values("content-length") {
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(ClientError::Protocol("invalid content-length"));
            }
            let n = part
                .iter()
                .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
            if found.is_some_and(|prev| prev != n) {
                return Err(ClientError::Protocol("conflicting content-length"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Body state shared by `read_chunk`, `read_to_end` and the relay.
pub(super) struct Body {
    pub(super) client: Rc<Inner>,
    pub(super) key: Arc<str>,
    /// `None` once the body finished (pooled or closed) or failed; also
    /// while an operation has taken it out.
    pub(super) stream: Option<Stream>,
    /// Valid bytes are `buf[pos..buf.len()]`; capacity stays BODY_BUF_SIZE.
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
    pub(super) complete: bool,
    /// Set on any error; the stream is gone and the body is unusable.
    pub(super) failed: bool,
    /// Set while an async body operation runs; still set on entry means the
    /// previous operation was cancelled mid-I/O and its state is unknown.
    pub(super) busy: bool,
    /// Bounds each write to the client in a relay.
    pub(super) idle: Duration,
    /// Bounds each read from the upstream ([`Response::set_read_timeout`]).
    pub(super) read_idle: Duration,
}

impl Body {
    pub(super) fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Marks the start of an async operation; refuses a broken body.
    pub(super) fn begin(&mut self) -> Result<(), ClientError> {
        if self.failed || self.busy {
            self.fail();
            return Err(ClientError::Aborted);
        }
        self.busy = true;
        Ok(())
    }

    pub(super) fn fail(&mut self) {
        self.failed = true;
        self.stream = None;
    }

    /// The body ended with correct framing: pool the connection if the
    /// response allowed it and the upstream sent nothing extra.
    pub(super) fn finish(&mut self) {
        self.complete = true;
        if let Some(stream) = self.stream.take() {
            if self.keep_alive && self.buffered() == 0 {
                self.client.checkin(&self.key, stream);
            }
        }
    }

    /// Replaces the (fully consumed) buffer contents with up to `want` new
    /// bytes. Returns 0 at end of stream.
    pub(super) async fn fill(&mut self, want: usize) -> Result<usize, ClientError> {
        let mut stream = self.stream.take().ok_or(ClientError::Aborted)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.pos = 0;
        if buf.capacity() == 0 {
            // Defensive: a timed-out relay write takes the buffer with it.
            buf = Vec::with_capacity(BODY_BUF_SIZE);
        }
        let want = want.clamp(1, buf.capacity());
        let read = monoio::time::timeout(self.read_idle, stream.read(buf.slice_mut(0..want))).await;
        let Ok((result, slice)) = read else {
            self.fail();
            return Err(ClientError::IdleTimeout);
        };
        self.buf = slice.into_inner();
        match result {
            Ok(n) => {
                self.stream = Some(stream);
                Ok(n)
            }
            Err(e) => {
                self.fail();
                Err(ClientError::Io(e))
            }
        }
    }

    /// Next run of decoded body data, as a range of `buf`.
    async fn next_data(&mut self) -> Result<Option<Range<usize>>, ClientError> {
        loop {
            if self.complete {
                return Ok(None);
            }
            let step = match self.framing {
                Framing::Empty => Ok(None),
                Framing::Length { remaining } => self.length_step(remaining).await,
                Framing::Chunked(_) => self.chunked_step().await,
                Framing::UntilClose => self.until_close_step().await,
            };
            match step {
                Ok(Some(range)) if range.is_empty() => continue,
                Ok(None) => {
                    self.finish();
                    return Ok(None);
                }
                Ok(Some(range)) => return Ok(Some(range)),
                Err(e) => {
                    self.fail();
                    return Err(e);
                }
            }
        }
    }

    async fn length_step(&mut self, remaining: u64) -> Result<Option<Range<usize>>, ClientError> {
        if remaining == 0 {
            return Ok(None);
        }
        if self.buffered() == 0 {
            let want = usize::try_from(remaining).unwrap_or(usize::MAX);
            if self.fill(want).await? == 0 {
                return Err(ClientError::ConnectionClosed);
            }
        }
        let n = self
            .buffered()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let range = self.pos..self.pos + n;
        self.pos += n;
        let left = remaining - n as u64;
        self.framing = Framing::Length { remaining: left };
        if left == 0 {
            self.finish();
        }
        Ok(Some(range))
    }

    async fn chunked_step(&mut self) -> Result<Option<Range<usize>>, ClientError> {
        if self.buffered() == 0 && self.fill(usize::MAX).await? == 0 {
            return Err(ClientError::ConnectionClosed);
        }
        let Framing::Chunked(decoder) = &mut self.framing else {
            return Err(ClientError::Aborted);
        };
        let progress = decoder.decode(&self.buf[self.pos..])?;
        let range = self.pos + progress.data.start..self.pos + progress.data.end;
        self.pos += progress.consumed;
        if decoder.is_done() {
            self.finish();
        }
        Ok(Some(range))
    }

    async fn until_close_step(&mut self) -> Result<Option<Range<usize>>, ClientError> {
        if self.buffered() == 0 && self.fill(usize::MAX).await? == 0 {
            return Ok(None);
        }
        let range = self.pos..self.buf.len();
        self.pos = self.buf.len();
        Ok(Some(range))
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // An unfinished body still holds its stream here: it closes now.
        self.client.give_buffer(std::mem::take(&mut self.buf));
    }
}

/// A response head plus its (not yet read) body.
pub struct Response {
    pub(super) head: Head,
    pub(super) content_length: Option<u64>,
    pub(super) body: Body,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.head.status)
            .field("content_length", &self.content_length)
            .field("chunked", &self.is_chunked())
            .field("complete", &self.body.complete)
            .finish_non_exhaustive()
    }
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// First header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.head
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All header fields in the order the upstream sent them.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.head.iter()
    }

    /// The body length when the response is Content-Length framed (for a
    /// HEAD response: the length the GET body would have).
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    pub fn is_chunked(&self) -> bool {
        matches!(self.body.framing, Framing::Chunked(_))
    }

    /// True once the whole body has been read with valid framing.
    pub fn is_complete(&self) -> bool {
        self.body.complete
    }

    /// Consumes a Content-Length body that has already arrived whole with
    /// the head, without any I/O, so that the connection goes back to the
    /// pool at once. Returns [`Self::is_complete`] afterwards.
    pub fn finish_buffered(&mut self) -> bool {
        let body = &mut self.body;
        if let Framing::Length { remaining } = body.framing {
            if !(body.complete || body.failed || body.busy) && body.buffered() as u64 >= remaining {
                body.pos += remaining as usize;
                body.framing = Framing::Length { remaining: 0 };
                body.finish();
            }
        }
        body.complete
    }

    /// Sets the longest wait for any single read of the rest of the body
    /// (default: the client's idle timeout). A body that keeps flowing is
    /// never cut by it, however long it takes in all.
    pub fn set_read_timeout(&mut self, d: Duration) {
        self.body.read_idle = d;
    }

    /// Waits until the first bytes after the head arrived (they stay
    /// buffered for the relay), or the body is known to be empty. Fails when
    /// the connection ends first on a body that owes bytes, or no byte comes
    /// within the read timeout. Dropping the future closes the connection.
    pub async fn wait_body_start(&mut self) -> Result<(), ClientError> {
        let owes = match self.body.framing {
            Framing::Empty | Framing::Length { remaining: 0 } => return Ok(()),
            Framing::Length { .. } | Framing::Chunked(_) => true,
            Framing::UntilClose => false,
        };
        if self.body.complete || self.body.buffered() > 0 {
            return Ok(());
        }
        self.body.begin()?;
        let want = match self.body.framing {
            Framing::Length { remaining } => usize::try_from(remaining).unwrap_or(usize::MAX),
            _ => BODY_BUF_SIZE,
        };
        let filled = self.body.fill(want).await;
        self.body.busy = false;
        match filled {
            Ok(0) if owes => {
                self.body.fail();
                Err(ClientError::ConnectionClosed)
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Next piece of decoded body data, `None` at the end of the body.
    /// The slice borrows the connection's buffer until the next call.
    pub async fn read_chunk(&mut self) -> Result<Option<&[u8]>, ClientError> {
        self.body.begin()?;
        let next = self.body.next_data().await;
        self.body.busy = false;
        Ok(next?.map(|range| &self.body.buf[range]))
    }

    /// Reads the whole body into memory, failing once it exceeds `limit`.
    /// The result owns a buffer of exactly its length.
    pub async fn read_to_end(mut self, limit: usize) -> Result<Bytes, ClientError> {
        let declared = match self.body.framing {
            Framing::Length { remaining } => Some(remaining),
            _ => None,
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ClientError::BodyTooLarge);
        }
        let mut out = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(piece) = self.read_chunk().await? {
            if out.len() + piece.len() > limit {
                return Err(ClientError::BodyTooLarge);
            }
            out.extend_from_slice(piece);
        }
        // Of its exact size, so that a caller may keep it (a cached
        // narinfo) without keeping spare capacity alive: only a body
        // without a declared length grew past it.
        if out.capacity() != out.len() {
            return Ok(Bytes::copy_from_slice(&out));
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        match parse_head(text.as_bytes()) {
            Ok(HeadParse::Final(h, len)) => {
                assert_eq!(len, text.len());
                h
            }
            _ => panic!("not a final head: {text:?}"),
        }
    }

    fn decide(text: &str, method: Method) -> Result<Decision, ClientError> {
        decide_framing(&head(text), method)
    }

    fn framing_name(d: &Decision) -> &'static str {
        match d.framing {
            Framing::Empty => "empty",
            Framing::Length { .. } => "length",
            Framing::Chunked(_) => "chunked",
            Framing::UntilClose => "close",
        }
    }

    #[test]
    fn header_lookup_is_case_insensitive_and_ordered() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Type: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(h.status, 200);
        assert_eq!(h.values("CONTENT-TYPE").next(), Some(&b"a"[..]));
        let xs: Vec<_> = h.values("x-a").collect();
        assert_eq!(xs, [&b"1"[..], &b"2"[..]]);
        assert_eq!(h.iter().count(), 3);
    }

    #[test]
    fn partial_interim_and_errors() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n"),
            Ok(HeadParse::Partial)
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            Ok(HeadParse::Interim(25))
        ));
        assert!(parse_head(b"HTTP/1.1 101 Switching\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            parse_head(many.as_bytes()),
            Err(ClientError::Protocol("too many response headers"))
        ));
    }

    #[test]
    fn framing_rules() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::Get,
                "length",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::Head,
                "empty",
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                Method::Get,
                "empty",
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Method::Get,
                "empty",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::Get,
                "chunked",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
                Method::Get,
                "chunked",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Method::Get,
                "close",
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Method::Get, "close", false),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: foo, Close\r\n\r\n",
                Method::Get,
                "length",
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
                Method::Get,
                "length",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::Get,
                "chunked",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
                Method::Get,
                "length",
                true,
            ),
        ];
        for (text, method, want, reuse) in cases {
            let d = decide(text, method).expect(text);
            assert_eq!(framing_name(&d), want, "{text:?}");
            assert_eq!(d.keep_alive, reuse, "{text:?}");
        }
    }

    #[test]
    fn content_length_is_reported_for_head_but_not_chunked() {
        let d = decide(
            "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n",
            Method::Head,
        )
        .expect("ok");
        assert_eq!(d.content_length, Some(42));
        let d = decide(
            "HTTP/1.1 200 OK\r\nContent-Length: 42\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
        )
        .expect("ok");
        assert_eq!(d.content_length, None);
    }

    #[test]
    fn bad_content_length_and_codings_are_rejected() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ] {
            assert!(
                matches!(decide(text, Method::Get), Err(ClientError::Protocol(_))),
                "{text:?}"
            );
        }
        let max = decide(
            "HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\n",
            Method::Get,
        )
        .expect("19 digits fit in u64");
        assert_eq!(max.content_length, Some(9_999_999_999_999_999_999));
    }
}
