//! Per-worker upstream HTTP/1.1 client on httparse.
//!
//! One [`LocalClient`] per worker thread (`Rc` inside, never crosses
//! threads). It keeps a keep-alive idle pool per origin, reuses 256 KiB
//! body buffers and splice pipes, and bounds every phase with a timeout.
//! Why not monoio-http / monoio-transports: they buffer whole bodies (see
//! docs/architecture.md), and NARs are gigabytes.
//!
//! Connection lifecycle: checkout (or resolve + connect + TLS) → write the
//! request → read the head → the [`Response`] owns the connection until its
//! body is fully read, then returns it to the pool. Anything else — an
//! error, a timeout, a dropped response or a cancelled read — closes it.

mod conn;
mod error;
mod origin;
mod pool;
mod relay;
mod response;
mod signer;
mod splice;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::net::TcpStream;
use monoio_rustls::TlsConnector;

pub use error::ClientError;
pub use origin::{Origin, OriginError};
pub use pool::{PoolDiscards, PoolOptions};
pub use relay::{RelayError, RelayMode};
pub use response::Response;
pub use signer::{SignedSend, Signer, SignerError};

use crate::http::resolve::Resolver;
use conn::{is_disconnect, Stream};
use pool::Inner;
use response::{decide_framing, parse_head, Body, Framing, Head, HeadParse};

/// Body buffer per in-flight response; also the largest relay write.
pub const BODY_BUF_SIZE: usize = 256 * 1024;
/// Largest accepted response head (interim 1xx heads included).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most bytes of an upstream request that may come from a client: the
/// request target plus forwarded header fields (name, `: `, value, CRLF).
/// The server refuses a request over it with 400 before any upstream is
/// asked ([`Request::check_forwardable`]), so what it lets through fits
/// [`MAX_REQUEST_HEAD`] with ncro's own fields, and a client's request can
/// never make an upstream look faulty. Well above any NAR URL or side
/// path; common servers refuse request lines over 8 KiB anyway.
pub const MAX_FORWARDED: usize = 8 * 1024;
/// Room for what ncro adds to a request head: method, the origin's path
/// prefix, `Host`, `User-Agent`, `Accept`, `Authorization`, and an S3
/// upstream's presigning query.
const ORIGIN_HEAD_ROOM: usize = 8 * 1024;
/// Largest request head we are willing to send.
const MAX_REQUEST_HEAD: usize = MAX_FORWARDED + ORIGIN_HEAD_ROOM;
const USER_AGENT: &str = concat!("ncro/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

impl Method {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Method::Get => b"GET",
            Method::Head => b"HEAD",
        }
    }
}

/// One upstream request. `path` (with query) is appended to the origin's
/// path prefix and must start with `/`; `headers` are extra fields such as
/// `Range` or `If-None-Match` forwarded from the client.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: Method,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> Request<'a> {
    pub fn get(path: &'a str) -> Self {
        Request {
            method: Method::Get,
            path,
            headers: &[],
        }
    }

    pub fn head(path: &'a str) -> Self {
        Request {
            method: Method::Head,
            ..Self::get(path)
        }
    }

    pub fn with_headers(self, headers: &'a [(&'a str, &'a [u8])]) -> Self {
        Request { headers, ..self }
    }

    /// Whether this request, built from a client's, can be sent to any
    /// upstream: the bytes [`LocalClient::send`] accepts, and at most
    /// [`MAX_FORWARDED`] bytes from the client. The server calls it before
    /// asking any upstream and answers 400 when it fails. (An S3 upstream
    /// may still refuse a key it cannot encode; that is the request's
    /// fault too: [`ClientError::is_request_fault`].)
    pub fn check_forwardable(&self) -> Result<(), ClientError> {
        self.validate()?;
        let fields: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 4)
            .sum();
        if self.path.len() + fields > MAX_FORWARDED {
            return Err(ClientError::InvalidRequest(
                "request target and headers too large to forward",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ClientError> {
        if !self.path.starts_with('/') {
            return Err(ClientError::InvalidRequest("path must start with '/'"));
        }
        if !self.path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ClientError::InvalidRequest("invalid byte in path"));
        }
        for (name, value) in self.headers {
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(ClientError::InvalidRequest("invalid header name"));
            }
            if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(ClientError::InvalidRequest("invalid header value"));
            }
        }
        Ok(())
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Per-phase limits. A phase that runs out closes its connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// DNS lookup, each TCP connect attempt (per address) and the TLS
    /// handshake, each bounded separately.
    pub connect: Duration,
    /// From sending the request to having the complete response head.
    pub first_byte: Duration,
    /// Longest wait on any single body read or relay write.
    pub idle: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(15),
            idle: Duration::from_secs(30),
        }
    }
}

/// A failed exchange; `stale` means a reused connection died before any
/// response byte arrived, so sending again on a fresh one is safe.
struct Failed {
    error: ClientError,
    stale: bool,
}

impl From<ClientError> for Failed {
    fn from(error: ClientError) -> Self {
        Failed {
            error,
            stale: false,
        }
    }
}

/// The upstream client of one worker thread. Clones share the pools.
#[derive(Clone)]
pub struct LocalClient {
    inner: Rc<Inner>,
}

impl LocalClient {
    pub fn new(
        resolver: Resolver,
        tls: Arc<rustls::ClientConfig>,
        timeouts: ClientTimeouts,
        pool: PoolOptions,
    ) -> LocalClient {
        LocalClient {
            inner: Rc::new(Inner {
                resolver,
                tls: TlsConnector::from(tls),
                timeouts,
                pool,
                idle: RefCell::new(HashMap::default()),
                buffers: RefCell::new(Vec::new()),
                pipes: RefCell::new(Vec::new()),
                discards: Arc::default(),
            }),
        }
    }

    /// Counts idle connections discarded at checkout in `discards` (shared
    /// with `/metrics`) instead of a counter of its own. Call before the
    /// client is cloned.
    pub fn with_pool_discards(mut self, discards: Arc<PoolDiscards>) -> LocalClient {
        match Rc::get_mut(&mut self.inner) {
            Some(inner) => inner.discards = discards,
            None => debug_assert!(false, "with_pool_discards on a shared client"),
        }
        self
    }

    /// Idle connections discarded at checkout so far (see [`PoolDiscards`]).
    pub fn pool_discards(&self) -> &PoolDiscards {
        &self.inner.discards
    }

    /// Sends `req` to `origin` and returns once the response head arrived.
    /// A pooled connection that turns out to be dead is replaced by a fresh
    /// one once, transparently. Requests to origins with a [`Signer`] (S3)
    /// are signed and their refusals vetted by it.
    pub async fn send(&self, origin: &Origin, req: &Request<'_>) -> Result<Response, ClientError> {
        match origin.signer() {
            Some(signer) => signer.send(self, origin, req).await,
            None => self.send_plain(origin, req).await,
        }
    }

    /// [`Self::send`] without the S3 step: `req.path` goes out as is.
    pub(crate) async fn send_plain(
        &self,
        origin: &Origin,
        req: &Request<'_>,
    ) -> Result<Response, ClientError> {
        req.validate()?;
        if let Some(stream) = self.inner.checkout(origin.pool_key()) {
            match self.exchange(stream, origin, req).await {
                Err(Failed { stale: true, error }) => {
                    tracing::debug!(upstream = %origin, %error, "stale pooled connection; reconnecting");
                }
                other => return other.map_err(|f| f.error),
            }
        }
        // Boxed: a new connection is the exception (the pool serves the
        // rest), and its DNS, TCP and TLS futures would otherwise make
        // every request's future several times larger.
        let stream = Box::pin(self.connect(origin)).await?;
        self.exchange(stream, origin, req)
            .await
            .map_err(|f| f.error)
    }

    /// Idle connections currently pooled for `origin` (expired ones included
    /// until the next checkout or checkin sweeps them).
    pub fn idle_connections(&self, origin: &Origin) -> usize {
        self.inner
            .idle
            .borrow()
            .get(&**origin.pool_key())
            .map_or(0, VecDeque::len)
    }

    /// Closes every expired idle connection; call now and then from a timer.
    pub fn evict_expired(&self) {
        let expiry = self.inner.pool.idle_expiry;
        let mut idle = self.inner.idle.borrow_mut();
        for queue in idle.values_mut() {
            queue.retain(|c| c.since.elapsed() < expiry);
        }
        idle.retain(|_, q| !q.is_empty());
    }

    async fn connect(&self, origin: &Origin) -> Result<Stream, ClientError> {
        let timeout = self.inner.timeouts.connect;
        let lookup = self.inner.resolver.resolve(origin.host(), origin.port());
        let addrs = match monoio::time::timeout(timeout, lookup).await {
            Err(_) => return Err(ClientError::DnsTimeout),
            Ok(Err(e)) => return Err(ClientError::Dns(e)),
            Ok(Ok(addrs)) => addrs,
        };
        let tcp = connect_any(&addrs, timeout).await?;
        if !origin.is_tls() {
            return Ok(Stream::Plain(tcp));
        }
        let name = origin
            .server_name()
            .cloned()
            .ok_or(ClientError::InvalidRequest("origin has no TLS server name"))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
        match monoio::time::timeout(timeout, self.inner.tls.connect(name, tcp)).await {
            Err(_) => Err(ClientError::ConnectTimeout),
            Ok(Err(e)) => Err(ClientError::Tls(e.into())),
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls), fd)),
        }
    }

    async fn exchange(
        &self,
        mut stream: Stream,
        origin: &Origin,
        req: &Request<'_>,
    ) -> Result<Response, Failed> {
        let mut buf = self.inner.take_buffer();
        encode_request(&mut buf, origin, req)?;
        // One timer for the write and the wait for the head (the first
        // byte's deadline bounds both), not one per operation.
        let deadline = monoio::time::Instant::now() + self.inner.timeouts.first_byte;
        let stream_ref = &mut stream;
        let io = async move {
            let (written, mut buf) = stream_ref.write_all(buf).await;
            if let Err(e) = written {
                let stale = is_disconnect(&e);
                return Err(Failed {
                    error: ClientError::Io(e),
                    stale,
                });
            }
            buf.clear();
            read_head(stream_ref, buf).await
        };
        let (head, head_len, buf) = match monoio::time::timeout_at(deadline, io).await {
            Err(_) => return Err(ClientError::FirstByteTimeout.into()),
            Ok(result) => result?,
        };
        let decision = decide_framing(&head, req.method)?;
        let done = matches!(
            decision.framing,
            Framing::Empty | Framing::Length { remaining: 0 }
        );
        let mut body = Body {
            client: self.inner.clone(),
            key: origin.pool_key().clone(),
            stream: Some(stream),
            buf,
            pos: head_len,
            framing: decision.framing,
            keep_alive: decision.keep_alive,
            complete: false,
            failed: false,
            busy: false,
            idle: self.inner.timeouts.idle,
            read_idle: self.inner.timeouts.idle,
        };
        if done {
            body.finish();
        }
        Ok(Response {
            head,
            content_length: decision.content_length,
            body,
        })
    }
}

/// Tries each address in turn, each with its own connect timeout.
async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, ClientError> {
    let mut last = ClientError::Dns(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
    for &addr in addrs {
        match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Err(_) => last = ClientError::ConnectTimeout,
            Ok(Err(e)) => last = ClientError::Connect(e),
            Ok(Ok(tcp)) => {
                // Requests go out in one write; Nagle would only add delay
                // to a response-driven exchange. Failure is harmless.
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
        }
    }
    Err(last)
}

fn encode_request(
    buf: &mut Vec<u8>,
    origin: &Origin,
    req: &Request<'_>,
) -> Result<(), ClientError> {
    buf.clear();
    buf.extend_from_slice(req.method.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(origin.path_prefix().as_bytes());
    buf.extend_from_slice(req.path.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    buf.extend_from_slice(origin.host_header());
    buf.extend_from_slice(b"\r\nUser-Agent: ");
    buf.extend_from_slice(USER_AGENT.as_bytes());
    buf.extend_from_slice(b"\r\nAccept: */*\r\n");
    if let Some(auth) = origin.authorization() {
        buf.extend_from_slice(b"Authorization: ");
        buf.extend_from_slice(auth);
        buf.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.headers {
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value);
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    if buf.len() > MAX_REQUEST_HEAD {
        return Err(ClientError::InvalidRequest("request head too large"));
    }
    Ok(())
}

/// Reads until a final response head is complete. Returns the head, its
/// length in `buf` (body bytes may follow it) and the buffer. The caller
/// bounds the wait.
async fn read_head(
    stream: &mut Stream,
    mut buf: Vec<u8>,
) -> Result<(Head, usize, Vec<u8>), Failed> {
    let mut start = 0;
    loop {
        if buf.len() > start {
            match parse_head(&buf[start..])? {
                HeadParse::Final(_, len) if start + len > MAX_HEAD => {
                    return Err(ClientError::HeadTooLarge.into())
                }
                HeadParse::Final(head, len) => return Ok((head, start + len, buf)),
                HeadParse::Interim(len) => {
                    start += len;
                    continue;
                }
                HeadParse::Partial => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(ClientError::HeadTooLarge.into());
        }
        let got_any = !buf.is_empty();
        let end = buf.len();
        let cap = buf.capacity();
        let (result, slice) = stream.read(buf.slice_mut(end..cap)).await;
        buf = slice.into_inner();
        match result {
            Ok(0) => {
                return Err(Failed {
                    error: ClientError::ConnectionClosed,
                    stale: !got_any,
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Failed {
                    stale: !got_any && is_disconnect(&e),
                    error: ClientError::Io(e),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::chunked::ChunkedError;

    #[test]
    fn connect_walks_the_address_list() {
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let live = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let good = live.local_addr().expect("addr");
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(async {
                let tcp = connect_any(&[refused, good], Duration::from_secs(2))
                    .await
                    .expect("second address works");
                assert_eq!(tcp.peer_addr().expect("peer"), good);
                let err = connect_any(&[refused], Duration::from_secs(2)).await;
                assert!(matches!(err, Err(ClientError::Connect(_))));
                let err = connect_any(&[], Duration::from_secs(2)).await;
                assert!(matches!(err, Err(ClientError::Dns(_))));
            });
    }

    #[test]
    fn request_encoding() {
        let o = Origin::parse("http://h:81/pre/", Some(("u", Some("p")))).expect("origin");
        let headers = [("Range", &b"bytes=1-2"[..])];
        let req = Request::get("/a.narinfo").with_headers(&headers);
        let mut buf = Vec::new();
        encode_request(&mut buf, &o, &req).expect("encodes");
        let want = format!(
            "GET /pre/a.narinfo HTTP/1.1\r\nHost: h:81\r\nUser-Agent: {USER_AGENT}\r\n\
             Accept: */*\r\nAuthorization: Basic dTpw\r\nRange: bytes=1-2\r\n\r\n"
        );
        assert_eq!(String::from_utf8(buf).expect("ascii"), want);
        let long = "/".repeat(MAX_REQUEST_HEAD);
        let mut buf = Vec::new();
        assert!(encode_request(&mut buf, &o, &Request::head(&long)).is_err());
    }

    #[test]
    fn what_passes_the_forwarding_check_can_be_sent() {
        // The most a client may put in: target plus forwarded fields.
        let value = vec![b'x'; 1000];
        let headers = [("If-None-Match", &value[..])];
        let fields = "If-None-Match".len() + value.len() + 4;
        let path = format!("/nar/x.nar?{}", "a".repeat(MAX_FORWARDED - fields - 11));
        let req = Request::get(&path).with_headers(&headers);
        req.check_forwardable().expect("exactly at the limit");
        // A long origin prefix and credentials still fit beside it.
        let prefix = "p".repeat(1024);
        let url = format!("https://cache.example.org:8443/{prefix}/");
        let secret = "s".repeat(2048);
        let o = Origin::parse(&url, Some(("user", Some(secret.as_str())))).expect("origin");
        let mut buf = Vec::new();
        encode_request(&mut buf, &o, &req).expect("fits MAX_REQUEST_HEAD");
        // One byte more is refused up front, as the server refuses it.
        let over = format!("{path}a");
        let req = Request::get(&over).with_headers(&headers);
        assert!(matches!(
            req.check_forwardable(),
            Err(e) if e.is_request_fault()
        ));
        // Bytes the client would refuse to send: refused up front too.
        for bad in ["/nar/x.nar?\u{e9}", "/nar/x.nar?a b", "/nar/x\x7f", "nar/x"] {
            let e = Request::get(bad).check_forwardable().unwrap_err();
            assert!(e.is_request_fault(), "{bad}: {e}");
        }
        let bad_value = [("Range", &b"bytes=0-\x01"[..])];
        let e = Request::get("/nar/x.nar")
            .with_headers(&bad_value)
            .check_forwardable()
            .unwrap_err();
        assert!(e.is_request_fault());
    }

    #[test]
    fn every_error_kind_is_listed() {
        let errors = [
            ClientError::InvalidRequest("x"),
            ClientError::Dns(io::Error::other("x")),
            ClientError::DnsTimeout,
            ClientError::Connect(io::Error::other("x")),
            ClientError::ConnectTimeout,
            ClientError::Tls(io::Error::other("x")),
            ClientError::FirstByteTimeout,
            ClientError::IdleTimeout,
            ClientError::ConnectionClosed,
            ClientError::Io(io::ErrorKind::ConnectionReset.into()),
            ClientError::Io(io::Error::other("x")),
            ClientError::Protocol("x"),
            ClientError::HeadTooLarge,
            ClientError::Chunked(ChunkedError::InvalidSize),
            ClientError::BodyTooLarge,
            ClientError::Aborted,
            ClientError::from(crate::s3::S3Error::NoCredentials),
            ClientError::from(crate::s3::S3Error::BadPath),
        ];
        for e in &errors {
            assert!(ClientError::KINDS.contains(&e.kind()), "{e:?}");
        }
        assert_eq!(errors[9].kind(), "reset");
        assert_eq!(errors[10].kind(), "io");
    }
}
