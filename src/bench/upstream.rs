//! `ncro bench upstream`: a synthetic binary cache served from memory on
//! the same runtime as ncro (one monoio thread per core, SO_REUSEPORT).
//! It answers `/nix-cache-info`, `/<hash>.narinfo` and `/nar/<...>.nar`
//! from a [`Dataset`], with optional latency, 500s and connection resets.
//! `/_bench/stats` answers the requests it has seen so far, by kind, as
//! JSON: how a script checks how many requests a proxy forwarded.
//!
//! Every response is prepared before the request arrives (narinfos are
//! rendered and signed at start, NAR bodies are slices of one shared
//! pattern), so answering costs a hash lookup and a write: the cache is
//! never what a proxy measurement measures.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

use super::dataset::{Dataset, PATTERN_LEN};
use super::rng::{mix, Rng};
use super::spec::LatencySpec;
use super::BenchError;
use crate::http::request::{self, Method, Parse};
use crate::http::response::{http_date, write_head, write_simple, Framing};
use crate::proto::store_path::StoreHash;
use crate::rt::Warning;

/// Bodies up to this size go out in the same write as their head.
const INLINE_BODY: u64 = 16 * 1024;

/// How the synthetic cache answers (see `bench upstream --help`).
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub holds: Range<u64>,
    pub hit_ratio: f64,
    pub latency: LatencySpec,
    pub fail_rate: f64,
    pub reset_rate: f64,
    /// Bytes per second of NAR body per connection; None: no cap.
    pub conn_rate: Option<u64>,
    /// Added round trip: at accept and before each answer.
    pub rtt: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            holds: 0..u64::MAX,
            hit_ratio: 1.0,
            latency: LatencySpec::default(),
            fail_rate: 0.0,
            reset_rate: 0.0,
            conn_rate: None,
            rtt: Duration::ZERO,
        }
    }
}

impl Behaviour {
    /// Whether path `index` is in this cache: inside `holds`, then a
    /// deterministic per-index draw against `hit_ratio` (so two runs with
    /// the same seed hold the same paths).
    pub fn holds_index(&self, seed: u64, index: u64) -> bool {
        if !self.holds.contains(&index) {
            return false;
        }
        let draw = mix(seed ^ mix(index ^ 0x5EED)) >> 11;
        (draw as f64 / (1u64 << 53) as f64) < self.hit_ratio
    }
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub cpus: Vec<usize>,
    pub behaviour: Behaviour,
}

/// Read-only state of every server thread.
struct Served {
    dataset: Arc<Dataset>,
    behaviour: Behaviour,
    /// `held[i]`: whether path `i` is answered (precomputed draw).
    held: Vec<bool>,
    cache_info: Bytes,
    /// One slot per server thread, written only by that thread.
    counts: Vec<Counts>,
}

/// Requests seen by one thread. Aligned to its own cache line so that
/// threads never share one.
#[derive(Default)]
#[repr(align(64))]
struct Counts {
    narinfo: AtomicU64,
    nar: AtomicU64,
    other: AtomicU64,
}

impl Served {
    fn count(&self, thread: usize, path: &str) {
        let Some(c) = self.counts.get(thread) else {
            return;
        };
        let slot = if path.ends_with(".narinfo") {
            &c.narinfo
        } else if path.starts_with("/nar/") {
            &c.nar
        } else {
            &c.other
        };
        // Only this thread writes the slot: a load and a store, no lock prefix.
        slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// `{"narinfo":N,"nar":N,"other":N}` summed over threads.
    fn stats_json(&self) -> Bytes {
        let sum = |f: fn(&Counts) -> &AtomicU64| -> u64 {
            self.counts
                .iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum()
        };
        let body = format!(
            "{{\"narinfo\":{},\"nar\":{},\"other\":{}}}\n",
            sum(|c| &c.narinfo),
            sum(|c| &c.nar),
            sum(|c| &c.other)
        );
        Bytes::from(body)
    }
}

/// Path of the request counters (not counted itself).
pub const STATS_PATH: &str = "/_bench/stats";

/// A running synthetic cache; [`UpstreamHandle::stop`] ends its threads.
pub struct UpstreamHandle {
    addr: SocketAddr,
    threads: Vec<(std::thread::JoinHandle<()>, flume::Sender<()>)>,
}

impl UpstreamHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, closes connections and joins every thread.
    pub fn stop(self) {
        for (_, stop) in &self.threads {
            // A thread that already exited dropped its receiver; nothing to stop.
            let _ = stop.try_send(());
        }
        for (thread, _) in self.threads {
            // A panicked server thread has already printed its message.
            let _ = thread.join();
        }
    }
}

/// Starts serving `dataset`; returns once every thread listens.
pub fn start(dataset: Arc<Dataset>, cfg: ServerConfig) -> Result<UpstreamHandle, BenchError> {
    let addr = crate::worker::check_listen(&cfg.listen.to_string())
        .map_err(|e| BenchError::Listen(format!("{e:#}")))?;
    let held = (0..dataset.len)
        .map(|i| cfg.behaviour.holds_index(dataset.seed, i))
        .collect();
    let served = Arc::new(Served {
        cache_info: crate::proto::cache_info::render(
            crate::proto::store_path::STORE_DIR,
            true,
            Some(40),
        )
        .into(),
        dataset,
        behaviour: cfg.behaviour.clone(),
        held,
        counts: (0..cfg.threads.max(1)).map(|_| Counts::default()).collect(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handle = UpstreamHandle {
        addr,
        threads: Vec::new(),
    };
    for i in 0..cfg.threads.max(1) {
        let (stop_tx, stop_rx) = flume::bounded(1);
        let (served, ready) = (served.clone(), ready_tx.clone());
        let cpu = cfg.cpus.get(i).copied();
        let thread = std::thread::Builder::new()
            .name(format!("bench-upstream-{i}"))
            .spawn(move || server_thread(i, cpu, addr, served, stop_rx, ready))
            .map_err(BenchError::Thread)?;
        handle.threads.push((thread, stop_tx));
    }
    drop(ready_tx);
    for _ in 0..handle.threads.len() {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                handle.stop();
                return Err(BenchError::Listen(msg));
            }
            Err(_) => {
                handle.stop();
                return Err(BenchError::Listen("server threads did not start".into()));
            }
        }
    }
    Ok(handle)
}

fn server_thread(
    index: usize,
    cpu: Option<usize>,
    addr: SocketAddr,
    served: Arc<Served>,
    stop: flume::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = crate::rt::build_pinned(cpu, |w| match w {
        Warning::Unpinned { cpu, error } => {
            eprintln!("bench upstream thread {index}: cannot pin to CPU {cpu}: {error:?}");
        }
        Warning::Epoll(e) => {
            eprintln!("bench upstream thread {index}: cannot set up io_uring, using epoll: {e}");
        }
    });
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            // The receiver is gone only if start() already gave up.
            let _ = ready.send(Err(format!("thread {index}: runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let opts = ListenerOpts::new().reuse_port(true).backlog(4096);
        let listener = match TcpListener::bind_with_config(addr, &opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("thread {index}: listen on {addr}: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let seed = (index as u64) << 32 ^ u64::from(std::process::id());
        let ctx = Rc::new(ThreadCtx {
            index,
            served,
            rng: RefCell::new(Rng::new(mix(seed))),
            date: RefCell::new((0, [b' '; 29])),
        });
        loop {
            monoio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => { monoio::spawn(serve_conn(ctx.clone(), stream)); }
                    // Out of fds or similar: back off rather than spin.
                    Err(_) => monoio::time::sleep(Duration::from_millis(20)).await,
                },
                _ = stop.recv_async() => break,
            }
        }
    });
}

/// Per-thread state shared by that thread's connections.
struct ThreadCtx {
    index: usize,
    served: Arc<Served>,
    rng: RefCell<Rng>,
    date: RefCell<(u64, [u8; 29])>,
}

impl ThreadCtx {
    fn date(&self) -> [u8; 29] {
        let now = crate::rt::unix_now();
        let mut d = self.date.borrow_mut();
        if d.0 != now {
            *d = (now, http_date(now));
        }
        d.1
    }
}

/// The answer to one request, decided before any await so it owns no
/// borrow of the read buffer.
enum Answer {
    Small(u16, &'static str, Bytes),
    /// A NAR of this size, whole or (`Range`) in part.
    Nar(u64, Option<NarRange>),
    BadRequest,
}

/// What a `Range` header asks of a body of a known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NarRange {
    /// Bytes `.0..=.1`.
    Bytes(u64, u64),
    Unsatisfiable,
}

/// One `bytes=A-B`, `bytes=A-` or `bytes=-N` range; anything else
/// (several ranges, another unit) is ignored, as RFC 9110 allows.
fn parse_nar_range(v: &[u8], size: u64) -> Option<NarRange> {
    let v = std::str::from_utf8(v).ok()?.trim().strip_prefix("bytes=")?;
    if v.contains(',') {
        return None;
    }
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (from, to) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return Some(NarRange::Unsatisfiable);
        }
        (size.saturating_sub(n), size.checked_sub(1)?)
    } else {
        let from: u64 = a.parse().ok()?;
        let to: u64 = if b.is_empty() {
            u64::MAX
        } else {
            b.parse().ok()?
        };
        if to < from {
            return None;
        }
        (from, to.min(size.saturating_sub(1)))
    };
    if from >= size {
        return Some(NarRange::Unsatisfiable);
    }
    Some(NarRange::Bytes(from, to))
}

fn decide(served: &Served, path: &str) -> Answer {
    const NOT_FOUND: Answer = Answer::Small(404, "text/plain", Bytes::from_static(b"not found\n"));
    if path == "/nix-cache-info" {
        return Answer::Small(200, "text/x-nix-cache-info", served.cache_info.clone());
    }
    if path == STATS_PATH {
        return Answer::Small(200, "application/json", served.stats_json());
    }
    let held = |i: u64| served.held.get(i as usize).copied().unwrap_or(false);
    if let Some(name) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        let Some(hash) = StoreHash::parse(name.as_bytes()) else {
            return Answer::Small(400, "text/plain", Bytes::from_static(b"bad hash\n"));
        };
        return match served.dataset.narinfos.get(&hash) {
            Some(e) if held(e.index) => Answer::Small(200, "text/x-nix-narinfo", e.narinfo.clone()),
            _ => NOT_FOUND,
        };
    }
    match path
        .strip_prefix('/')
        .and_then(|p| served.dataset.nars.get(p))
    {
        Some(&i) if held(i) => Answer::Nar(served.dataset.nar_size(i), None),
        _ => NOT_FOUND,
    }
}

async fn serve_conn(ctx: Rc<ThreadCtx>, mut stream: TcpStream) {
    // Small answers should leave at once, not wait for more segments.
    let _ = stream.set_nodelay(true);
    let mut rbuf: Vec<u8> = Vec::with_capacity(8192);
    let mut wbuf: Vec<u8> = Vec::with_capacity(8192);
    let rtt = ctx.served.behaviour.rtt;
    if !rtt.is_zero() {
        monoio::time::sleep(rtt).await; // the handshake's round trip
    }
    loop {
        let (answer, keep, head_only, consumed) = match request::parse(&rbuf) {
            Parse::Complete(req, len) => {
                let answer = if req.method == Method::Other || req.has_body {
                    Answer::BadRequest
                } else {
                    if req.path != STATS_PATH {
                        ctx.served.count(ctx.index, req.path);
                    }
                    match decide(&ctx.served, req.path) {
                        Answer::Nar(size, _) => {
                            Answer::Nar(size, req.range.and_then(|r| parse_nar_range(r, size)))
                        }
                        a => a,
                    }
                };
                (answer, req.keep_alive, req.method == Method::Head, len)
            }
            Parse::Partial => {
                if rbuf.capacity() - rbuf.len() < 1024 {
                    rbuf.reserve(8192);
                }
                let (len, cap) = (rbuf.len(), rbuf.capacity());
                let (res, slice) = stream.read(rbuf.slice_mut(len..cap)).await;
                rbuf = slice.into_inner();
                match res {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
            Parse::Bad(_) | Parse::TooLarge => (Answer::BadRequest, false, false, rbuf.len()),
        };
        rbuf.drain(..consumed);
        match respond(&ctx, &mut stream, wbuf, answer, keep, head_only).await {
            Some(buf) if keep => wbuf = buf,
            _ => return,
        }
    }
}

/// Sends one answer after the configured delay and faults. Returns the
/// write buffer, or `None` when the connection must close.
async fn respond(
    ctx: &ThreadCtx,
    stream: &mut TcpStream,
    mut wbuf: Vec<u8>,
    answer: Answer,
    keep: bool,
    head_only: bool,
) -> Option<Vec<u8>> {
    let b = &ctx.served.behaviour;
    let (delay, fail, reset) = {
        let mut rng = ctx.rng.borrow_mut();
        (
            b.latency.sample(&mut rng),
            rng.chance(b.fail_rate),
            rng.chance(b.reset_rate),
        )
    };
    let delay = delay + b.rtt;
    if !delay.is_zero() {
        monoio::time::sleep(delay).await;
    }
    if reset {
        reset_connection(stream);
        return None;
    }
    let date = ctx.date();
    wbuf.clear();
    let answer = match answer {
        _ if fail => Answer::Small(500, "text/plain", Bytes::from_static(b"injected failure\n")),
        a => a,
    };
    match answer {
        Answer::Small(status, ctype, body) => {
            let h = [("Content-Type", ctype.as_bytes())];
            write_simple(&mut wbuf, status, keep, head_only, &date, &h, &body);
        }
        Answer::BadRequest => {
            write_simple(&mut wbuf, 400, false, false, &date, &[], b"bad request\n");
        }
        Answer::Nar(size, Some(NarRange::Unsatisfiable)) => {
            let cr = format!("bytes */{size}");
            let h = [("Content-Range", cr.as_bytes())];
            write_simple(&mut wbuf, 416, keep, head_only, &date, &h, b"");
        }
        Answer::Nar(size, range) => {
            let (status, from, len, cr) = match range {
                Some(NarRange::Bytes(a, b)) => (206, a, b - a + 1, format!("bytes {a}-{b}/{size}")),
                _ => (200, 0, size, String::new()),
            };
            let mut h = vec![
                ("Content-Type", b"application/x-nix-nar".as_slice()),
                ("Accept-Ranges", b"bytes".as_slice()),
            ];
            if status == 206 {
                h.push(("Content-Range", cr.as_bytes()));
            }
            write_head(&mut wbuf, status, Framing::Length(len), keep, &date, &h);
            if !head_only {
                return send_nar(ctx, stream, wbuf, from, len).await;
            }
        }
    }
    let (res, buf) = stream.write_all(wbuf).await;
    res.ok().map(|_| buf)
}

/// Writes the head in `wbuf`, then bytes `from..from + len` of the body
/// (the repeating pattern), at most `conn_rate` bytes per second.
async fn send_nar(
    ctx: &ThreadCtx,
    stream: &mut TcpStream,
    mut wbuf: Vec<u8>,
    from: u64,
    len: u64,
) -> Option<Vec<u8>> {
    let pattern = &ctx.served.dataset.pattern;
    let rate = ctx.served.behaviour.conn_rate;
    let at = |o: u64| (o % PATTERN_LEN as u64) as usize;
    if len <= INLINE_BODY && rate.is_none() {
        let mut o = from;
        while o < from + len {
            let n = (PATTERN_LEN - at(o)).min((from + len - o) as usize);
            wbuf.extend_from_slice(&pattern[at(o)..at(o) + n]);
            o += n as u64;
        }
        let (res, buf) = stream.write_all(wbuf).await;
        return res.ok().map(|_| buf);
    }
    let (res, buf) = stream.write_all(wbuf).await;
    res.ok()?;
    // The cap paces in steps of at most 1/64 s of its rate.
    let step = rate.map_or(PATTERN_LEN, |r| {
        ((r / 64) as usize).clamp(1024, PATTERN_LEN)
    });
    let started = monoio::time::Instant::now();
    let mut o = from;
    while o < from + len {
        if let Some(r) = rate {
            let due = Duration::from_secs_f64((o - from) as f64 / r as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                monoio::time::sleep(due - elapsed).await;
            }
        }
        let n = (PATTERN_LEN - at(o))
            .min(step)
            .min((from + len - o) as usize);
        // A Bytes slice shares the pattern: no copy, no allocation.
        let (res, _) = stream.write_all(pattern.slice(at(o)..at(o) + n)).await;
        res.ok()?;
        o += n as u64;
    }
    Some(buf)
}

/// Closes with RST instead of FIN (SO_LINGER 0), like a crashed server.
fn reset_connection(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    // If it fails the close below is an ordinary FIN, still a failed request.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_ranges_parse_like_rfc_9110() {
        let r = |v: &str| parse_nar_range(v.as_bytes(), 100);
        assert_eq!(r("bytes=0-9"), Some(NarRange::Bytes(0, 9)));
        assert_eq!(r("bytes=90-"), Some(NarRange::Bytes(90, 99)));
        assert_eq!(r("bytes=90-200"), Some(NarRange::Bytes(90, 99)));
        assert_eq!(r("bytes=-10"), Some(NarRange::Bytes(90, 99)));
        assert_eq!(r("bytes=100-"), Some(NarRange::Unsatisfiable));
        assert_eq!(r("bytes=5-1"), None);
        assert_eq!(r("bytes=0-1,5-6"), None);
        assert_eq!(r("items=0-1"), None);
    }

    #[test]
    fn holdings_follow_range_and_ratio() {
        let all = Behaviour::default();
        assert!((0..100).all(|i| all.holds_index(1, i)));
        let range = Behaviour {
            holds: 10..20,
            ..Behaviour::default()
        };
        assert!(!range.holds_index(1, 9) && range.holds_index(1, 10) && !range.holds_index(1, 20));
        let half = Behaviour {
            hit_ratio: 0.5,
            ..Behaviour::default()
        };
        let n = (0..10_000).filter(|&i| half.holds_index(1, i)).count();
        assert!((4_500..5_500).contains(&n), "{n}");
        // Deterministic per seed, different across seeds.
        let a: Vec<bool> = (0..64).map(|i| half.holds_index(1, i)).collect();
        assert_eq!(
            a,
            (0..64).map(|i| half.holds_index(1, i)).collect::<Vec<_>>()
        );
        assert_ne!(
            a,
            (0..64).map(|i| half.holds_index(2, i)).collect::<Vec<_>>()
        );
    }
}
