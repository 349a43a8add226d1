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
mod origin;
mod relay;
mod response;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::net::{Pipe, TcpStream};
use monoio_rustls::TlsConnector;

pub use origin::{Origin, OriginError};
pub use relay::{RelayError, RelayMode};
pub use response::Response;

use crate::http::chunked::ChunkedError;
use crate::http::resolve::Resolver;
use conn::{is_disconnect, Stream};
use response::{decide_framing, parse_head, Body, Framing, Head, HeadParse};

/// Body buffer per in-flight response; also the largest relay write.
pub const BODY_BUF_SIZE: usize = 256 * 1024;
/// Largest accepted response head (interim 1xx heads included).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest request head we are willing to send.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Idle buffers and pipes kept per worker; more are freed on return.
const MAX_POOLED_BUFFERS: usize = 16;
const MAX_POOLED_PIPES: usize = 8;
const USER_AGENT: &str = concat!("ncro/", env!("CARGO_PKG_VERSION"));

/// Why an upstream request failed. Cheap to build and to match on; the
/// race engine turns these into metric labels with [`ClientError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("DNS lookup failed: {0}")]
    Dns(io::Error),
    #[error("DNS lookup timed out")]
    DnsTimeout,
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("no response head within the first-byte timeout")]
    FirstByteTimeout,
    #[error("upstream sent nothing within the idle timeout")]
    IdleTimeout,
    #[error("upstream closed the connection before the response was complete")]
    ConnectionClosed,
    #[error("upstream I/O error: {0}")]
    Io(io::Error),
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunked(#[from] ChunkedError),
    #[error("response body larger than the limit")]
    BodyTooLarge,
    #[error("response body unusable after an earlier error or cancelled read")]
    Aborted,
}

impl ClientError {
    /// Every label [`ClientError::kind`] can return, for pre-registering metrics.
    pub const KINDS: &'static [&'static str] = &[
        "request",
        "dns",
        "connect",
        "tls",
        "timeout",
        "reset",
        "io",
        "protocol",
        "too_large",
        "aborted",
    ];

    /// Fixed, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::InvalidRequest(_) => "request",
            ClientError::Dns(_) => "dns",
            ClientError::Connect(_) => "connect",
            ClientError::Tls(_) => "tls",
            ClientError::DnsTimeout
            | ClientError::ConnectTimeout
            | ClientError::FirstByteTimeout
            | ClientError::IdleTimeout => "timeout",
            ClientError::ConnectionClosed => "reset",
            ClientError::Io(e) if is_disconnect(e) => "reset",
            ClientError::Io(_) => "io",
            ClientError::Protocol(_) | ClientError::HeadTooLarge | ClientError::Chunked(_) => {
                "protocol"
            }
            ClientError::BodyTooLarge => "too_large",
            ClientError::Aborted => "aborted",
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind() == "timeout"
    }

    /// Whether another upstream might well succeed where this one failed.
    /// False for faults in the request itself or in the content.
    pub fn retry_elsewhere(&self) -> bool {
        !matches!(
            self,
            ClientError::InvalidRequest(_) | ClientError::BodyTooLarge | ClientError::Aborted
        )
    }
}

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

/// Keep-alive pool limits, per worker and per origin.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub max_idle_per_origin: usize,
    /// Idle connections older than this are closed instead of reused; keep
    /// it below the upstreams' own keep-alive timeouts.
    pub idle_expiry: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_idle_per_origin: 8,
            idle_expiry: Duration::from_secs(20),
        }
    }
}

struct IdleConn {
    stream: Stream,
    since: Instant,
}

/// State shared by a worker's client and the responses it hands out.
struct Inner {
    resolver: Resolver,
    tls: TlsConnector,
    timeouts: ClientTimeouts,
    pool: PoolOptions,
    idle: RefCell<HashMap<Arc<str>, VecDeque<IdleConn>>>,
    buffers: RefCell<Vec<Vec<u8>>>,
    /// (read end, write end); only fully drained pipes come back here.
    pipes: RefCell<Vec<(Pipe, Pipe)>>,
}

impl Inner {
    fn checkout(&self, key: &str) -> Option<Stream> {
        let mut idle = self.idle.borrow_mut();
        let queue = idle.get_mut(key)?;
        // Most recently used first: the warmest connection is least likely
        // to have been closed by the upstream.
        while let Some(conn) = queue.pop_back() {
            if conn.since.elapsed() < self.pool.idle_expiry {
                return Some(conn.stream);
            }
        }
        None
    }

    fn checkin(&self, key: &Arc<str>, stream: Stream) {
        if self.pool.max_idle_per_origin == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let queue = idle.entry(key.clone()).or_default();
        while queue
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.pool.idle_expiry)
        {
            queue.pop_front();
        }
        if queue.len() >= self.pool.max_idle_per_origin {
            queue.pop_front();
        }
        queue.push_back(IdleConn { stream, since: now });
    }

    fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BODY_BUF_SIZE))
    }

    fn give_buffer(&self, mut buf: Vec<u8>) {
        let mut buffers = self.buffers.borrow_mut();
        if buf.capacity() == BODY_BUF_SIZE && buffers.len() < MAX_POOLED_BUFFERS {
            buf.clear();
            buffers.push(buf);
        }
    }

    fn take_pipe(&self) -> Option<(Pipe, Pipe)> {
        let pooled = self.pipes.borrow_mut().pop();
        pooled.or_else(|| monoio::net::unix::new_pipe().ok())
    }

    fn give_pipe(&self, pipe: (Pipe, Pipe)) {
        let mut pipes = self.pipes.borrow_mut();
        if pipes.len() < MAX_POOLED_PIPES {
            pipes.push(pipe);
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
                idle: RefCell::new(HashMap::new()),
                buffers: RefCell::new(Vec::new()),
                pipes: RefCell::new(Vec::new()),
            }),
        }
    }

    /// Sends `req` to `origin` and returns once the response head arrived.
    /// A pooled connection that turns out to be dead is replaced by a fresh
    /// one once, transparently.
    pub async fn send(&self, origin: &Origin, req: &Request<'_>) -> Result<Response, ClientError> {
        req.validate()?;
        if let Some(stream) = self.inner.checkout(origin.pool_key()) {
            match self.exchange(stream, origin, req).await {
                Err(Failed { stale: true, error }) => {
                    tracing::debug!(upstream = %origin, %error, "stale pooled connection; reconnecting");
                }
                other => return other.map_err(|f| f.error),
            }
        }
        let stream = self.connect(origin).await?;
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
        match monoio::time::timeout(timeout, self.inner.tls.connect(name, tcp)).await {
            Err(_) => Err(ClientError::ConnectTimeout),
            Ok(Err(e)) => Err(ClientError::Tls(e.into())),
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
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
        let deadline = monoio::time::Instant::now() + self.inner.timeouts.first_byte;
        let (written, mut buf) =
            match monoio::time::timeout_at(deadline, stream.write_all(buf)).await {
                Err(_) => return Err(ClientError::FirstByteTimeout.into()),
                Ok(result) => result,
            };
        if let Err(e) = written {
            let stale = is_disconnect(&e);
            return Err(Failed {
                error: ClientError::Io(e),
                stale,
            });
        }
        buf.clear();
        let (head, head_len, buf) = read_head(&mut stream, buf, deadline).await?;
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
/// length in `buf` (body bytes may follow it) and the buffer.
async fn read_head(
    stream: &mut Stream,
    mut buf: Vec<u8>,
    deadline: monoio::time::Instant,
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
        let read = monoio::time::timeout_at(deadline, stream.read(buf.slice_mut(end..cap))).await;
        let Ok((result, slice)) = read else {
            return Err(ClientError::FirstByteTimeout.into());
        };
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
