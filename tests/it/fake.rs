//! A fake upstream binary cache on a real loopback socket.
//!
//! It shares no code with ncro (std threads, std::net, httparse), so a bug in
//! ncro's HTTP layer cannot hide itself by also being in the test's server.
//! One thread per connection; keep-alive and pipelined requests are served in
//! order. Faults are attached to paths with [`FakeUpstreamBuilder::rule`].
//!
//! ```ignore
//! let up = FakeUpstream::builder()
//!     .cache_info(40)
//!     .path(&test_path, &key)                       // narinfo + NAR
//!     .rule(PathMatch::suffix(".nar"), Fault::nth(1, Fault::ResetMidBody(100)))
//!     .start();
//! ```

#![allow(dead_code)] // shared by test modules; not every test uses every helper

pub mod nix;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use nix::{random_bytes, random_hash, TestKey, TestPath};

/// Request heads larger than this are answered with 431.
const MAX_HEAD: usize = 64 * 1024;
/// Chunk size used by [`Fault::Chunked`].
const CHUNK: usize = 4096;

/// Which request paths a rule applies to (the path includes any query).
#[derive(Clone, Debug)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl PathMatch {
    pub fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.to_owned())
    }
    pub fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.to_owned())
    }
    pub fn suffix(p: &str) -> PathMatch {
        PathMatch::Suffix(p.to_owned())
    }
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Suffix(p) => path.ends_with(p.as_str()),
        }
    }
}

impl From<&str> for PathMatch {
    fn from(p: &str) -> PathMatch {
        PathMatch::exact(p)
    }
}

impl From<String> for PathMatch {
    fn from(p: String) -> PathMatch {
        PathMatch::Exact(p)
    }
}

/// What goes wrong for a matching request. "Body" counts apply to the body
/// that would have been sent (the range for a Range request).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer with this status, these headers and an empty body.
    StatusWithHeaders(u16, Vec<(String, String)>),
    /// Write these bytes verbatim, then close.
    Raw(Vec<u8>),
    /// Close gracefully (FIN) without answering.
    Close,
    /// Abort the connection (RST, SO_LINGER 0) without answering.
    Reset,
    /// Full head and Content-Length, `n` body bytes, then RST.
    ResetMidBody(usize),
    /// Never answer; the connection stays open until the fake stops.
    Hang,
    /// Full head, `n` body bytes, then silence until the fake stops.
    HangMidBody(usize),
    /// Full head and Content-Length, `n` body bytes, then FIN.
    Truncate(usize),
    /// Normal answer with `Transfer-Encoding: chunked` instead of a length.
    Chunked,
    /// Chunked head, then a malformed chunk-size line, then FIN.
    BadChunked,
    /// Normal head, then `bytes` body bytes per `interval`.
    Trickle(usize, Duration),
    /// `302 Found` to this location.
    Redirect(String),
    /// A 200 whose head carries about 200 KiB of extra headers.
    EnormousHeaders,
    /// Ignore `Range` (always 200, full body) and omit `Accept-Ranges`.
    NoRanges,
    /// Wait this long before the head, then keep evaluating later rules.
    Delay(Duration),
    /// Apply the fault only to the n-th (1-based) request this rule matched.
    Nth(usize, Box<Fault>),
    /// Apply the fault to the first n requests this rule matched.
    FirstN(usize, Box<Fault>),
}

impl Fault {
    pub fn nth(n: usize, f: Fault) -> Fault {
        Fault::Nth(n, Box::new(f))
    }
    pub fn first_n(n: usize, f: Fault) -> Fault {
        Fault::FirstN(n, Box::new(f))
    }
    /// The fault to apply to the `n`-th matching request, if any.
    fn effective(&self, n: usize) -> Option<&Fault> {
        match self {
            Fault::Nth(k, f) if *k == n => f.effective(n),
            Fault::FirstN(k, f) if n <= *k => f.effective(n),
            Fault::Nth(..) | Fault::FirstN(..) => None,
            other => Some(other),
        }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Request target as sent (path plus any query).
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// 0-based index of the TCP connection it arrived on.
    pub conn: usize,
    pub at: Instant,
}

impl RequestRecord {
    /// First header with this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Resource {
    content_type: String,
    body: Vec<u8>,
}

struct Rule {
    matcher: PathMatch,
    fault: Fault,
    seen: AtomicUsize,
}

#[derive(Default)]
pub struct FakeUpstreamBuilder {
    resources: HashMap<String, Resource>,
    rules: Vec<Rule>,
    latency: Duration,
}

impl FakeUpstreamBuilder {
    /// Serves `body` at `/<hash>.narinfo`.
    pub fn narinfo(self, hash: &str, body: impl Into<Vec<u8>>) -> Self {
        let path = format!("/{hash}.narinfo");
        self.file_with_type(&path, "text/x-nix-narinfo", body)
    }

    /// Serves `bytes` at `path` (which must start with `/`).
    pub fn file(self, path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        let ct = if path.contains(".nar") {
            "application/x-nix-nar"
        } else {
            "application/octet-stream"
        };
        self.file_with_type(path, ct, bytes)
    }

    pub fn file_with_type(
        mut self,
        path: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        assert!(path.starts_with('/'), "fake paths start with '/': {path}");
        let res = Resource {
            content_type: content_type.to_owned(),
            body: body.into(),
        };
        self.resources.insert(path.to_owned(), res);
        self
    }

    /// Serves a `/nix-cache-info` with `WantMassQuery: 1` and this priority.
    pub fn cache_info(self, priority: u32) -> Self {
        let body = format!("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n");
        self.file_with_type("/nix-cache-info", "text/x-nix-cache-info", body)
    }

    /// Serves `p`'s narinfo (signed by `key`) and its NAR.
    pub fn path(self, p: &TestPath, key: &TestKey) -> Self {
        self.narinfo(&p.hash, p.narinfo(&[key]))
            .file(&p.nar_request_path(), p.nar.clone())
    }

    /// Delay before every response head (adjustable later: `set_latency`).
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Rules are checked in order: `Delay`s add up, the first other
    /// matching fault decides the answer.
    pub fn rule(mut self, matcher: impl Into<PathMatch>, fault: Fault) -> Self {
        self.rules.push(Rule {
            matcher: matcher.into(),
            fault,
            seen: AtomicUsize::new(0),
        });
        self
    }

    /// Binds 127.0.0.1 on a kernel-chosen port. Panics if that fails.
    pub fn start(self) -> FakeUpstream {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        self.start_on(addr)
            .expect("bind fake upstream on 127.0.0.1:0")
    }

    /// Binds `addr`, e.g. to bring an upstream back on the port it had.
    pub fn start_on(self, addr: SocketAddr) -> io::Result<FakeUpstream> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            resources: self.resources,
            rules: self.rules,
            latency_ns: AtomicU64::new(duration_ns(self.latency)),
            log: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("fake-accept-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &sh))?;
        Ok(FakeUpstream {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// State shared by the acceptor and the connection threads.
struct Shared {
    resources: HashMap<String, Resource>,
    rules: Vec<Rule>,
    latency_ns: AtomicU64,
    log: Mutex<Vec<RequestRecord>>,
    accepted: AtomicUsize,
    /// Set once by `stop`; `wake` tells sleepers and hangers about it.
    stopped: Mutex<bool>,
    wake: Condvar,
    /// Clones of open connections so `stop` can shut them down; each
    /// connection thread removes its own entry before closing.
    open: Mutex<HashMap<usize, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Poison only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps up to `d`; false if the fake was stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.stopped);
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        !*guard
    }

    fn hang(&self) {
        let guard = lock(&self.stopped);
        let _stopped = self
            .wake
            .wait_while(guard, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Delay and terminal fault for one request (counts rule matches).
    fn plan(&self, path: &str) -> (Duration, Option<Fault>) {
        let mut delay = Duration::from_nanos(self.latency_ns.load(Ordering::Relaxed));
        for rule in self.rules.iter().filter(|r| r.matcher.matches(path)) {
            let n = rule.seen.fetch_add(1, Ordering::SeqCst) + 1;
            match rule.fault.effective(n) {
                Some(Fault::Delay(d)) => delay += *d,
                Some(f) => return (delay, Some(f.clone())),
                None => {}
            }
        }
        (delay, None)
    }
}

fn accept_loop(listener: &TcpListener, sh: &Arc<Shared>) {
    for (id, stream) in listener.incoming().enumerate() {
        if sh.is_stopped() {
            return;
        }
        let Ok(stream) = stream else { continue };
        sh.accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        lock(&sh.open).insert(id, clone);
        let sh2 = Arc::clone(sh);
        let spawned = std::thread::Builder::new()
            .name(format!("fake-conn-{id}"))
            .spawn(move || serve_conn(stream, id, &sh2));
        match spawned {
            Ok(handle) => lock(&sh.threads).push(handle),
            Err(_) => {
                lock(&sh.open).remove(&id);
            }
        }
    }
}

/// How a connection ends after an answer.
enum Next {
    KeepAlive,
    Close,
    Reset,
}

fn serve_conn(mut stream: TcpStream, id: usize, sh: &Shared) {
    // Small writes (heads, trickled bytes) must leave at once.
    let _ = stream.set_nodelay(true); // best effort: only affects timing
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let next = loop {
        match parse_request(&buf) {
            Parsed::Complete(mut req, used) => {
                buf.drain(..used);
                req.conn = id;
                lock(&sh.log).push(req.clone());
                match answer(&mut stream, &req, sh) {
                    Ok(Next::KeepAlive) => continue,
                    Ok(next) => break next,
                    Err(_) => break Next::Close,
                }
            }
            Parsed::Bad(status) => {
                let _ = write_head(&mut stream, status, &[], Some(0), true); // peer may be gone
                break Next::Close;
            }
            Parsed::Partial => {}
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break Next::Close,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    lock(&sh.open).remove(&id);
    finish(stream, next);
}

fn finish(stream: TcpStream, next: Next) {
    if let Next::Reset = next {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd owned by `stream`; the option struct outlives the call.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    } else {
        let _ = stream.shutdown(Shutdown::Write); // already closed by the peer is fine
    }
}

enum Parsed {
    Complete(RequestRecord, usize),
    Partial,
    Bad(u16),
}

fn parse_request(buf: &[u8]) -> Parsed {
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

fn answer(stream: &mut TcpStream, req: &RequestRecord, sh: &Shared) -> io::Result<Next> {
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
        Fault::Redirect(to) => {
            write_head(stream, 302, &[("Location".into(), to)], Some(0), close).map(|_| next_ok)
        }
        Fault::Raw(bytes) => stream.write_all(&bytes).map(|_| Next::Close),
        Fault::Close => Ok(Next::Close),
        Fault::Reset => Ok(Next::Reset),
        Fault::Hang => {
            sh.hang();
            Ok(Next::Close)
        }
        shaped => send_shaped(stream, reply, &shaped, head_only, close, sh),
    }
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
fn write_head(
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

/// A running fake upstream. Dropping it stops it.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn builder() -> FakeUpstreamBuilder {
        FakeUpstreamBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// How many requests had exactly this path.
    pub fn request_count(&self, path: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Accepted TCP connections so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Changes the delay before every later response head.
    pub fn set_latency(&self, d: Duration) {
        self.shared
            .latency_ns
            .store(duration_ns(d), Ordering::Relaxed);
    }

    /// Closes the port and every connection, wakes hung answers and joins
    /// all threads. Idempotent.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        *lock(&self.shared.stopped) = true;
        self.shared.wake.notify_all();
        // The acceptor blocks in accept(): one connection wakes it up.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)); // fails only if already gone
        let _ = acceptor.join(); // a panicked acceptor has nothing left to clean up
        for (_, s) in lock(&self.shared.open).drain() {
            let _ = s.shutdown(Shutdown::Both); // may already be closed
        }
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join(); // a panicked connection thread already ended
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
