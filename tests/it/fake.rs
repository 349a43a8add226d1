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
mod wire;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use nix::{random_bytes, random_hash, TestKey, TestPath};
use wire::{answer, parse_request, write_head, Next, Parsed};

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
    /// Head without a length (the body ends with the connection), `n` body
    /// bytes, then FIN: indistinguishable from a complete body on the wire.
    TruncateNoLength(usize),
    /// A 200 with this body instead of the resource's (a forged, garbled or
    /// misnamed narinfo); ranges are ignored.
    Body(Vec<u8>),
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
    /// The normal answer, then, this long after it, these bytes that no
    /// request asked for (a fake response head, say); the connection stays
    /// open and serves later requests after them.
    Unsolicited(Duration, Vec<u8>),
    /// Wait this long before the head, then keep evaluating later rules.
    Delay(Duration),
    /// Apply the fault only to the n-th (1-based) request this rule matched.
    Nth(usize, Box<Fault>),
    /// Apply the fault to the first n requests this rule matched.
    FirstN(usize, Box<Fault>),
    /// Apply the fault to every request this rule matched after the first
    /// n (an upstream that dies during a transfer).
    AfterN(usize, Box<Fault>),
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
            Fault::AfterN(k, f) if n > *k => f.effective(n),
            Fault::Nth(..) | Fault::FirstN(..) | Fault::AfterN(..) => None,
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
    idle_timeout: Option<Duration>,
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

    /// Closes (FIN, without a word) any connection that sends nothing for
    /// `d`, like an upstream's keep-alive timeout: clients holding it in a
    /// pool find it dead on their next request.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        assert!(!d.is_zero(), "an idle timeout must be positive");
        self.idle_timeout = Some(d);
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
            idle_timeout: self.idle_timeout,
            log: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            healed: AtomicBool::new(false),
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
    /// Read timeout on every connection; see [`FakeUpstreamBuilder::idle_timeout`].
    idle_timeout: Option<Duration>,
    log: Mutex<Vec<RequestRecord>>,
    accepted: AtomicUsize,
    /// Set by [`FakeUpstream::heal`]: rules are no longer applied.
    healed: AtomicBool,
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
        if self.healed.load(Ordering::SeqCst) {
            return (delay, None);
        }
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

fn serve_conn(mut stream: TcpStream, id: usize, sh: &Shared) {
    // Small writes (heads, trickled bytes) must leave at once.
    let _ = stream.set_nodelay(true); // best effort: only affects timing
    if let Some(idle) = sh.idle_timeout {
        // A read that times out ends the loop below like a peer close. The
        // builder refuses zero, the only duration this call rejects.
        let _ = stream.set_read_timeout(Some(idle));
    }
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

    /// The upstream recovers: later requests are answered without any rule
    /// (`Delay`s included); answers already hanging stay hung until `stop`.
    pub fn heal(&self) {
        self.shared.healed.store(true, Ordering::SeqCst);
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
