//! Per-core worker threads: CPU pinning, one monoio runtime each
//! ([`crate::rt`], FusionDriver: io_uring when the kernel allows it, epoll
//! otherwise; `MONOIO_FORCE_LEGACY_DRIVER=1` forces epoll), one
//! SO_REUSEPORT listener each, and the drain on shutdown.

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

mod conn_limit;

use crate::config::Config;
use crate::metrics::{Metrics, WorkerMetrics};
pub use crate::rt::unix_now;
use crate::rt::{self, Warning};
pub use conn_limit::ConnLimit;

/// What a resolution produced; shared by every request that joined it.
#[derive(Clone, Debug)]
pub enum Resolved {
    /// A narinfo to serve, and where it came from (`X-Ncro-Route`).
    Found(crate::route::Hit, Via),
    Miss,
    Unavailable {
        timed_out: bool,
    },
    /// The race queue was full (or the wait too long): 503 + Retry-After.
    Overloaded,
}

/// How a served narinfo was found: the value of `X-Ncro-Route`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A stored route (in memory, or read back from SQLite).
    CacheHit,
    /// A race this request started or joined.
    Race,
    /// The `[fallback_cache]` (the hit's upstream is
    /// [`crate::upstream::fallback::SLOT`], not a slot of the set).
    Fallback,
}

impl Via {
    /// The header value.
    pub fn label(self) -> &'static [u8] {
        match self {
            Via::CacheHit => b"cache-hit",
            Via::Race => b"race",
            Via::Fallback => b"fallback",
        }
    }
}

/// State shared by every worker. Immutable after start, or internally
/// synchronised (read lock-free on the request path).
pub struct SharedState {
    pub config: Arc<Config>,
    /// The full `/nix-cache-info` body, rendered once.
    pub cache_info: Bytes,
    pub metrics: Arc<Metrics>,
    pub routes: Arc<crate::route::RouteTable>,
    /// The upstream set snapshot; discovery publishes new ones.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    /// Health snapshot, cooldowns and mass-query limits.
    pub routing: Arc<crate::upstream::Routing>,
    /// Upstreams' membership summaries and ncro's own published filter.
    pub index: Arc<crate::index::IndexState>,
    pub resolver: crate::http::resolve::Resolver,
    pub tls: Arc<rustls::ClientConfig>,
    /// Races in flight across workers (cross-worker single-flight); an
    /// entry lives only while its race runs.
    pub flights: quick_cache::sync::Cache<
        crate::proto::store_path::StoreHash,
        (Resolved, std::time::Instant),
    >,
    /// `server.max_connections`: taken on accept, given back when the
    /// connection task ends (`serve::serve_conn`).
    pub connections: ConnLimit,
    /// `[fallback_cache]`, when enabled (its config: `config.fallback_cache`).
    pub fallback: Option<Arc<crate::upstream::fallback::Fallback>>,
}

/// Which CPU each worker runs on, and the control thread's CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub worker_cpus: Vec<Option<usize>>,
    pub control_cpu: Option<usize>,
}

/// The CPUs this process may run on (sched_getaffinity), in order.
pub fn affinity_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Workers default to one per CPU of the affinity set, pinned in order;
/// explicit `server.cpus` pins exactly there. More workers than CPUs run
/// unpinned (pinning two to one core would only add contention).
pub fn plan(server: &crate::config::ServerConfig, affinity: &[usize]) -> Plan {
    let n = server
        .workers
        .or(server.cpus.as_ref().map(Vec::len))
        .unwrap_or(affinity.len().max(1));
    let worker_cpus = match &server.cpus {
        Some(cpus) => cpus.iter().map(|&c| Some(c)).collect(),
        None if n <= affinity.len() => affinity[..n].iter().map(|&c| Some(c)).collect(),
        None => vec![None; n],
    };
    Plan {
        worker_cpus,
        control_cpu: server.control_cpu,
    }
}

/// Where workers get their listening socket.
#[derive(Debug, Clone, Copy)]
pub enum ListenSource {
    /// Each worker binds its own SO_REUSEPORT socket on this address.
    Bind(SocketAddr),
    /// An inherited listening socket (systemd), shared by all workers.
    Inherited(RawFd),
}

/// A one-shot, worker-local broadcast: fired once when the worker drains.
///
/// Every waiting [`DrainWait`] owns one slot, refreshed when polled again
/// and freed when the future is dropped, so the registry holds at most one
/// waker per current waiter. (Pushing a waker on every poll grew it by one
/// entry per request served until the drain: an unbounded leak.)
#[derive(Default)]
pub struct Drain {
    fired: Cell<bool>,
    slots: RefCell<Vec<Option<Waker>>>,
    /// Indices of `slots` no waiter holds, reused before the Vec grows.
    free: RefCell<Vec<usize>>,
}

impl Drain {
    pub fn fire(&self) {
        self.fired.set(true);
        // Collected first: a woken task may run and drop its DrainWait,
        // which borrows `slots` again.
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves once [`Drain::fire`] was called.
    pub fn wait(&self) -> DrainWait<'_> {
        DrainWait {
            drain: self,
            slot: None,
        }
    }

    /// Wakers currently registered (for tests and debugging).
    pub fn waiters(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.is_some()).count()
    }
}

/// The future returned by [`Drain::wait`].
pub struct DrainWait<'a> {
    drain: &'a Drain,
    slot: Option<usize>,
}

impl std::future::Future for DrainWait<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let drain = self.drain;
        if drain.fired.get() {
            return std::task::Poll::Ready(());
        }
        let mut slots = drain.slots.borrow_mut();
        match self.slot {
            Some(i) => match &mut slots[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                entry => *entry = Some(cx.waker().clone()),
            },
            None => {
                let waker = Some(cx.waker().clone());
                let i = match drain.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = waker;
                        i
                    }
                    None => {
                        slots.push(waker);
                        slots.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        std::task::Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            if let Some(entry) = self.drain.slots.borrow_mut().get_mut(i) {
                *entry = None;
            }
            self.drain.free.borrow_mut().push(i);
        }
    }
}

/// Per-worker context, shared by that worker's connection tasks only.
pub struct WorkerCtx {
    pub index: usize,
    pub shared: Arc<SharedState>,
    pub metrics: Arc<WorkerMetrics>,
    pub drain: Drain,
    pub client: crate::http::client::LocalClient,
    pub flights: crate::race::SingleFlight<crate::proto::store_path::StoreHash, Resolved>,
    /// This worker's queues for the shared mass-query limits.
    pub limits: crate::upstream::limits::LocalLimits,
    /// "io_uring" or "epoll".
    pub driver: &'static str,
    /// Connections being served; the drain waits for it to reach zero.
    pub active: Cell<usize>,
    date: RefCell<(u64, [u8; 29])>,
}

/// The worker's keep-alive pool: room for as many idle connections per
/// upstream as the race may keep busy at once
/// (`mass_query.per_upstream_max_inflight`, all workers together, so one
/// worker may hold all of them), and never fewer than the client's default.
/// With a smaller pool, every burst of answers closed the connections past
/// it and the next burst opened new ones: a TCP handshake, a close and a
/// TIME-WAIT socket for about one miss in ten under a c64 miss load
/// (docs/benchmarks.md, "Where a miss's CPU goes").
fn pool_options(config: &crate::config::Config) -> crate::http::client::PoolOptions {
    let default = crate::http::client::PoolOptions::default();
    crate::http::client::PoolOptions {
        max_idle_per_origin: default
            .max_idle_per_origin
            .max(config.cache.per_upstream_max_inflight as usize),
        ..default
    }
}

impl WorkerCtx {
    pub fn new(index: usize, shared: Arc<SharedState>, driver: &'static str) -> WorkerCtx {
        let metrics = shared.metrics.workers[index].clone();
        let t = &shared.config.timeouts;
        let timeouts = crate::http::client::ClientTimeouts {
            connect: t.connect,
            first_byte: t.first_byte,
            idle: t.idle,
        };
        let client = crate::http::client::LocalClient::new(
            shared.resolver.clone(),
            shared.tls.clone(),
            timeouts,
            pool_options(&shared.config),
        )
        .with_pool_discards(metrics.pool_discards.clone());
        WorkerCtx {
            index,
            metrics,
            drain: Drain::default(),
            client,
            flights: crate::race::SingleFlight::new(),
            limits: crate::upstream::limits::LocalLimits::for_config(
                shared.upstreams.load().capacity(),
                &shared.config,
            ),
            driver,
            active: Cell::new(0),
            date: RefCell::new((0, [b' '; 29])),
            shared,
        }
    }

    /// The Date header value for this second (re-rendered once a second).
    pub fn date(&self) -> [u8; 29] {
        let now = unix_now();
        let mut d = self.date.borrow_mut();
        if d.0 != now {
            *d = (now, crate::http::response::http_date(now));
        }
        d.1
    }
}

/// A running worker: its thread and the sender that stops it.
pub struct WorkerHandle {
    pub thread: std::thread::JoinHandle<()>,
    pub stop: flume::Sender<()>,
}

/// What a worker reports once its listener is ready (or why it failed).
pub type Ready = Result<(usize, &'static str), String>;

/// What a worker does with each connection it accepts: starts its task on
/// the worker's runtime (`serve::accept`, handed in by `app`, so that this
/// module does not depend on the endpoints it runs).
pub type Accept = fn(&Rc<WorkerCtx>, TcpStream);

pub fn spawn(
    index: usize,
    cpu: Option<usize>,
    shared: Arc<SharedState>,
    listen: ListenSource,
    accept: Accept,
    ready: std::sync::mpsc::Sender<Ready>,
) -> std::io::Result<WorkerHandle> {
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let thread = std::thread::Builder::new().name(format!("ncro-worker-{index}")).spawn(move || {
        let built = rt::build_pinned(cpu, |w| match w {
            Warning::Unpinned { cpu, error } => {
                tracing::warn!(worker = index, cpu, error = ?error, "cannot pin worker to its CPU; running unpinned");
            }
            Warning::Epoll(e) => {
                tracing::warn!(worker = index, error = %e, "cannot set up io_uring; this worker uses epoll");
            }
        });
        let mut rt = match built {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("worker {index}: cannot build runtime: {e}")));
                return;
            }
        };
        rt.block_on(run(index, shared, listen, accept, stop_rx, ready));
    })?;
    Ok(WorkerHandle {
        thread,
        stop: stop_tx,
    })
}

/// Resolves `server.listen` and proves the port is free: monoio sets
/// SO_REUSEPORT on every listener, so without this check a second ncro (or
/// anything else using SO_REUSEPORT) would silently share the port.
///
/// A host name (`localhost:8080`, what the NixOS module writes) may resolve
/// to several addresses; ncro listens on one, IPv4 first, so `localhost`
/// means `127.0.0.1` (the address the NixOS module's socket unit uses)
/// whatever the resolver's order: glibc puts `::1` first, which would leave
/// `127.0.0.1` clients refused, and fails where IPv6 is disabled. An address
/// that cannot be bound on this host (EADDRNOTAVAIL, EAFNOSUPPORT) gives
/// way to the next.
pub fn check_listen(listen: &str) -> anyhow::Result<SocketAddr> {
    let addrs = listen_candidates(
        listen
            .to_socket_addrs()
            .with_context(|| format!("server.listen {listen:?}: cannot resolve"))?,
    );
    let Some((last, rest)) = addrs.split_last() else {
        bail!("server.listen {listen:?}: no address");
    };
    for &addr in rest {
        match std::net::TcpListener::bind(addr) {
            Err(e) if unusable_here(&e) => {
                tracing::debug!(%addr, error = %e, "server.listen: address not usable here; trying the next");
            }
            _ => return check_addr(addr),
        }
    }
    check_addr(*last)
}

/// Resolved listen addresses in the order they are tried: IPv4 first,
/// otherwise as resolved.
fn listen_candidates(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = addrs.collect();
    v.sort_by_key(|a| a.is_ipv6()); // stable
    v.dedup();
    v
}

fn unusable_here(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
    )
}

fn check_addr(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    // std's bind sets SO_REUSEADDR but not SO_REUSEPORT, so it fails with
    // EADDRINUSE if anything is already listening there.
    // A port still held by a process that has just exited is retried for a
    // few seconds (crate::rt::bind_retrying); one held by a live process
    // stays in use and is refused below.
    let what = format!("server.listen {addr}");
    match crate::rt::bind_retrying(&what, || std::net::TcpListener::bind(addr)) {
        Ok(probe) => Ok(probe.local_addr()?), // resolves port 0 too
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{addr} is already in use (another ncro or another server is listening there); refusing to share the port")
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

fn open_listener(listen: ListenSource) -> std::io::Result<TcpListener> {
    match listen {
        ListenSource::Bind(addr) => {
            let opts = ListenerOpts::new()
                .reuse_port(true)
                .reuse_addr(true)
                .backlog(4096);
            TcpListener::bind_with_config(addr, &opts)
        }
        ListenSource::Inherited(fd) => {
            use std::os::fd::FromRawFd;
            // Each worker owns a dup of the inherited socket.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let std_listener = unsafe { std::net::TcpListener::from_raw_fd(dup) };
            std_listener.set_nonblocking(true)?;
            TcpListener::from_std(std_listener)
        }
    }
}

async fn run(
    index: usize,
    shared: Arc<SharedState>,
    listen: ListenSource,
    accept: Accept,
    stop: flume::Receiver<()>,
    ready: std::sync::mpsc::Sender<Ready>,
) {
    let driver = rt::driver();
    let listener = match open_listener(listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "worker {index}: cannot listen on {listen:?}: {e}"
            )));
            return;
        }
    };
    let _ = shared.metrics.drivers[index].set(driver);
    let grace = shared.config.server.shutdown_grace;
    let ctx = Rc::new(WorkerCtx::new(index, shared, driver));
    let _ = ready.send(Ok((index, driver)));
    drop(ready);
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    ctx.metrics.connections_total.inc();
                    accept(&ctx, stream);
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    tracing::warn!(worker = index, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.recv_async() => break,
        }
    }
    drop(listener);
    ctx.drain.fire();
    let deadline = monoio::time::Instant::now() + grace;
    while ctx.active.get() > 0 && monoio::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if ctx.active.get() > 0 {
        tracing::warn!(
            worker = index,
            open = ctx.active.get(),
            "shutdown grace period over; closing remaining connections"
        );
    }
    // The accept in flight and the listener's close are only queued.
    crate::rt::settle().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_candidates_put_ipv4_first() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let got = super::listen_candidates(
            [
                a("[::1]:80"),
                a("127.0.0.1:80"),
                a("[::1]:80"),
                a("10.0.0.1:80"),
            ]
            .into_iter(),
        );
        assert_eq!(got, [a("127.0.0.1:80"), a("10.0.0.1:80"), a("[::1]:80")]);
    }

    use super::*;

    fn server(workers: Option<usize>, cpus: Option<Vec<usize>>) -> crate::config::ServerConfig {
        let c = crate::config::Config::from_toml(
            "",
            crate::config::Source::Embedded,
            "t",
            &crate::config::env::MapEnv::new(&[]),
        )
        .unwrap();
        let mut s = c.server;
        s.workers = workers;
        s.cpus = cpus;
        s
    }

    fn noop_waker() -> Waker {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        Waker::from(Arc::new(Noop))
    }

    /// Regression: every poll used to push a waker that only the drain
    /// removed, one per request served on a keep-alive connection.
    #[test]
    fn drain_keeps_one_waker_per_live_waiter() {
        use std::future::Future;
        let drain = Drain::default();
        let waker = noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        for _ in 0..1000 {
            let mut w = std::pin::pin!(drain.wait());
            for _ in 0..3 {
                assert!(w.as_mut().poll(&mut cx).is_pending());
            }
            assert_eq!(drain.waiters(), 1);
        }
        assert_eq!(drain.waiters(), 0);
        assert!(drain.slots.borrow().len() <= 1);

        let mut a = Box::pin(drain.wait());
        let mut b = Box::pin(drain.wait());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        assert_eq!(drain.waiters(), 2);
        drain.fire();
        assert!(drain.is_fired() && drain.waiters() == 0);
        assert!(a.as_mut().poll(&mut cx).is_ready());
        assert!(b.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(drain.wait()).as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn plan_defaults_to_affinity_set() {
        let p = plan(&server(None, None), &[2, 3, 5]);
        assert_eq!(p.worker_cpus, vec![Some(2), Some(3), Some(5)]);
        let p = plan(&server(Some(2), None), &[2, 3, 5]);
        assert_eq!(p.worker_cpus, vec![Some(2), Some(3)]);
        let p = plan(&server(Some(4), None), &[0, 1]);
        assert_eq!(p.worker_cpus, vec![None; 4]);
        let p = plan(&server(None, Some(vec![7, 1])), &[0, 1]);
        assert_eq!(p.worker_cpus, vec![Some(7), Some(1)]);
    }
}
