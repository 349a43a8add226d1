//! The load generator's HTTP/1.1 connection: keep-alive GETs written by
//! hand, response heads parsed with httparse, bodies counted and thrown
//! away (Content-Length, chunked, or until close).
//!
//! Deliberately leaner than ncro's `LocalClient` (no pool, no TLS, no
//! retries): a load generator should add as little of its own time as it
//! can, and a retried request would hide a server's error. Buffers are
//! allocated once per connection; a request allocates nothing.

use std::io;
use std::net::SocketAddr;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::chunked::ChunkedDecoder;

/// Largest narinfo body kept for the closure scenario.
pub const MAX_CAPTURE: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 64;

/// Why a request got no complete response.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connection reset")]
    Reset,
    #[error("connection closed before the response was complete")]
    Closed,
    #[error("i/o: {0}")]
    Io(io::Error),
    #[error("bad response: {0}")]
    Protocol(&'static str),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => WireError::Reset,
            io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        }
    }
}

/// Where requests go: resolved once, before any client thread starts.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path prefix of the base URL (`""` or `/segment...`).
    pub prefix: String,
}

/// A complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    /// Body bytes received (after de-chunking).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// One keep-alive connection, reconnected on demand.
pub struct ClientConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    /// The request head under construction; kept between requests.
    req: Vec<u8>,
    /// Read buffer; `rbuf[pos..]` is received but not yet consumed.
    rbuf: Vec<u8>,
    pos: usize,
    buf_size: usize,
    /// Body of the last response, when the caller asked to keep it.
    pub captured: Vec<u8>,
    host: String,
    prefix: String,
}

impl ClientConn {
    pub fn new(target: &Target, buf_size: usize) -> ClientConn {
        ClientConn {
            addr: target.addr,
            stream: None,
            req: Vec::with_capacity(256),
            rbuf: Vec::with_capacity(buf_size),
            pos: 0,
            buf_size,
            captured: Vec::new(),
            host: target.host.clone(),
            prefix: target.prefix.clone(),
        }
    }

    /// Drops the connection (after an error or a timeout: an operation
    /// cut short may have lost bytes, so the stream is never reused).
    pub fn close(&mut self) {
        self.stream = None;
        self.pos = 0;
        self.rbuf.clear();
        // A cancelled read or write kept its buffer; give it a new one.
        if self.rbuf.capacity() < self.buf_size {
            self.rbuf = Vec::with_capacity(self.buf_size);
        }
    }

    /// `GET <prefix><parts...>`; the path is the concatenation of `parts`.
    /// With `capture` the body is also kept in [`ClientConn::captured`].
    pub async fn get(&mut self, parts: &[&[u8]], capture: bool) -> Result<Outcome, WireError> {
        self.captured.clear();
        if self.stream.is_none() {
            let s = TcpStream::connect_addr(self.addr)
                .await
                .map_err(WireError::Connect)?;
            // Requests are single small writes; never hold them back.
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
        }
        self.write_request(parts).await?;
        let (status, framing, keep) = self.read_head().await?;
        let bytes = match framing {
            Framing::Length(n) => self.skip_length(n, capture).await?,
            Framing::Chunked => self.skip_chunked(capture).await?,
            Framing::UntilClose => self.skip_to_close(capture).await?,
        };
        // Whatever follows the body stays for the next response.
        self.rbuf.drain(..self.pos);
        self.pos = 0;
        if !keep || matches!(framing, Framing::UntilClose) {
            self.stream = None;
        }
        Ok(Outcome { status, bytes })
    }

    async fn write_request(&mut self, parts: &[&[u8]]) -> Result<(), WireError> {
        let mut req = std::mem::take(&mut self.req);
        req.clear();
        req.extend_from_slice(b"GET ");
        req.extend_from_slice(self.prefix.as_bytes());
        for p in parts {
            req.extend_from_slice(p);
        }
        req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        req.extend_from_slice(self.host.as_bytes());
        req.extend_from_slice(b"\r\nUser-Agent: ncro-bench\r\nAccept: */*\r\n\r\n");
        let stream = self.stream.as_mut().ok_or(WireError::Closed)?;
        let (res, req) = stream.write_all(req).await;
        self.req = req;
        res?;
        Ok(())
    }

    /// Reads more bytes after `rbuf`'s end (compacting first when full).
    async fn fill(&mut self) -> Result<(), WireError> {
        if self.pos > 0 && self.rbuf.len() == self.rbuf.capacity() {
            self.rbuf.drain(..self.pos);
            self.pos = 0;
        }
        let stream = self.stream.as_mut().ok_or(WireError::Closed)?;
        let buf = std::mem::take(&mut self.rbuf);
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = stream.read(buf.slice_mut(len..cap)).await;
        self.rbuf = slice.into_inner();
        match res? {
            0 => Err(WireError::Closed),
            _ => Ok(()),
        }
    }

    /// Parses the status line and headers, skipping interim 1xx heads.
    async fn read_head(&mut self) -> Result<(u16, Framing, bool), WireError> {
        loop {
            match parse_head(&self.rbuf[self.pos..])? {
                Some(Head {
                    len,
                    status: 100..=199,
                    ..
                }) => self.pos += len,
                Some(h) => {
                    self.pos += h.len;
                    return Ok((h.status, h.framing, h.keep_alive));
                }
                None if self.rbuf.len() - self.pos >= self.buf_size => {
                    return Err(WireError::Protocol("response head too large"));
                }
                None => self.fill().await?,
            }
        }
    }

    /// Consumes up to `max` buffered body bytes; returns how many.
    fn take_buffered(&mut self, max: u64, capture: bool) -> Result<u64, WireError> {
        let n = ((self.rbuf.len() - self.pos) as u64).min(max) as usize;
        if capture {
            self.keep(self.pos..self.pos + n)?;
        }
        self.pos += n;
        Ok(n as u64)
    }

    fn keep(&mut self, range: std::ops::Range<usize>) -> Result<(), WireError> {
        if self.captured.len() + range.len() > MAX_CAPTURE {
            return Err(WireError::Protocol("kept body over 64 KiB"));
        }
        self.captured.extend_from_slice(&self.rbuf[range]);
        Ok(())
    }

    /// Makes room at the start of the buffer once everything is consumed.
    fn recycle(&mut self) {
        if self.pos == self.rbuf.len() {
            self.rbuf.clear();
            self.pos = 0;
        }
    }

    async fn skip_length(&mut self, total: u64, capture: bool) -> Result<u64, WireError> {
        let mut left = total;
        loop {
            left -= self.take_buffered(left, capture)?;
            if left == 0 {
                return Ok(total);
            }
            self.recycle();
            self.fill().await?;
        }
    }

    async fn skip_chunked(&mut self, capture: bool) -> Result<u64, WireError> {
        let mut dec = ChunkedDecoder::new();
        let mut bytes = 0u64;
        loop {
            while self.pos < self.rbuf.len() && !dec.is_done() {
                let p = dec
                    .decode(&self.rbuf[self.pos..])
                    .map_err(|_| WireError::Protocol("bad chunked body"))?;
                if capture && !p.data.is_empty() {
                    self.keep(self.pos + p.data.start..self.pos + p.data.end)?;
                }
                bytes += p.data.len() as u64;
                self.pos += p.consumed;
            }
            if dec.is_done() {
                return Ok(bytes);
            }
            self.recycle();
            self.fill().await?;
        }
    }

    async fn skip_to_close(&mut self, capture: bool) -> Result<u64, WireError> {
        let mut bytes = 0u64;
        loop {
            bytes += self.take_buffered(u64::MAX, capture)?;
            self.recycle();
            match self.fill().await {
                Ok(()) => {}
                Err(WireError::Closed) => return Ok(bytes),
                Err(e) => return Err(e),
            }
        }
    }
}

struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// `Ok(None)` while the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, WireError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(WireError::Protocol("malformed response head")),
    };
    let status = resp.code.ok_or(WireError::Protocol("no status"))?;
    let mut keep_alive = resp.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(WireError::Protocol("bad Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(WireError::Protocol("conflicting Content-Length"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked")
                || h.value.ends_with(b", chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = h.value.trim_ascii();
            if v.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = match (status, chunked, length) {
        (100..=199 | 204 | 304, _, _) => Framing::Length(0),
        (_, true, _) => Framing::Chunked,
        (_, false, Some(n)) => Framing::Length(n),
        (_, false, None) => Framing::UntilClose,
    };
    Ok(Some(Head {
        len,
        status,
        framing,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests;
