//! Thread runtimes: every thread that runs a monoio runtime (workers, the
//! control thread, `ncro bench`'s client and upstream threads) is pinned
//! and builds it here, the same way; and the wall clock they share.
//!
//! The runtime is a FusionDriver one with timers: io_uring when the kernel
//! has it, epoll when it has not (or `MONOIO_FORCE_LEGACY_DRIVER=1`), and
//! also epoll when setting the ring up fails (ENOMEM from a low memlock
//! limit or memory pressure): a thread on epoll works, one that exits does
//! not.
//!
//! The ring is set up with `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1+;
//! older kernels refuse the flags and get a plain ring): a monoio ring is
//! only ever used by the thread that built it, and it reaps completions
//! only when it waits (`io_uring_enter` with `GETEVENTS`), which is exactly
//! when deferred task work runs. Without it every socket wake-up (a client
//! request arriving, a send completing) interrupts the worker with task
//! work at its next kernel entry, one at a time; with it the kernel runs
//! them in one batch when the worker has nothing else to do. On loopback
//! with the client on the same cores this cut ncro's CPU per narinfo hit
//! (docs/benchmarks.md, "CPU per request").

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The runtime [`build_pinned`] returns.
pub type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// Something [`build_pinned`] worked around; the caller logs it in its own
/// words.
pub enum Warning<'a> {
    /// The thread could not be pinned to `cpu`; it runs unpinned.
    Unpinned {
        cpu: usize,
        error: &'a dyn fmt::Debug,
    },
    /// io_uring could not be set up; the runtime uses epoll.
    Epoll(&'a std::io::Error),
}

/// Pins the calling thread to `cpu` (when given), then builds its runtime
/// (see the module docs). Called on the thread that will run it: a monoio
/// runtime belongs to the thread that built it.
pub fn build_pinned(cpu: Option<usize>, warn: impl Fn(Warning<'_>)) -> std::io::Result<Runtime> {
    if let Some(cpu) = cpu {
        if let Err(e) = monoio::utils::bind_to_cpu_set(Some(cpu)) {
            warn(Warning::Unpinned { cpu, error: &e });
        }
    }
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_single_issuer().setup_defer_taskrun();
    let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(1024)
        .uring_builder(tuned)
        .build()
        .or_else(|_| {
            // A kernel before 6.1 refuses the flags (EINVAL): a plain ring.
            monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .with_entries(1024)
                .build()
        });
    match built {
        Ok(rt) => Ok(rt),
        Err(e) => {
            warn(Warning::Epoll(&e));
            let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()?;
            Ok(rt.into())
        }
    }
}

/// The driver of the runtime the calling thread runs in: "io_uring" or
/// "epoll".
pub fn driver() -> &'static str {
    if monoio::utils::is_legacy() {
        "epoll"
    } else {
        "io_uring"
    }
}

/// Wall-clock seconds since the Unix epoch (0 before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How long [`settle`] lets the runtime run after its sockets are dropped.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// Called last in a runtime that owned sockets, after they were dropped:
/// dropping an io_uring operation still in flight (a `recv_from` or
/// `accept` waiting for a packet or a connection) only queues a cancel,
/// and dropping a socket only queues its close. Left queued, the kernel
/// cancels them when the ring is torn down, asynchronously, after the
/// process has exited: the socket outlives the process for a moment and a
/// restart at once fails to bind its port (`EADDRINUSE`; `ss -uanp` lists
/// the socket with no owner). Parking once on a short timer submits the
/// queued cancels and closes and reaps them, so the kernel lets go of the
/// ports before the thread exits.
pub async fn settle() {
    monoio::time::sleep(SETTLE).await;
}

/// How long a bind that fails with `EADDRINUSE` is retried at start
/// ([`bind_retrying`]); docs/operations.md, "Restarting".
pub const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `bind` until it does not fail with `EADDRINUSE`, for at most
/// [`BIND_RETRY`] (20 ms, doubling to 250 ms, between tries), and returns
/// its last result. A process that has just exited may hold its ports for a
/// moment after it is gone (its sockets are released by the kernel's
/// io_uring teardown, or a SIGKILLed one's never settled); a live process
/// holds them for good, and the last `EADDRINUSE` is returned as it was.
/// Logs one line when a retry is needed. `what` names the port (`server.listen
/// 127.0.0.1:8080`).
pub fn bind_retrying<T>(
    what: &dyn fmt::Display,
    bind: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    bind_retrying_for(BIND_RETRY, what, bind)
}

fn bind_retrying_for<T>(
    limit: std::time::Duration,
    what: &dyn fmt::Display,
    mut bind: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(20);
    let mut logged = false;
    loop {
        match bind() {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !logged {
                    logged = true;
                    tracing::warn!(
                        port = %what,
                        retry_for = ?limit,
                        "address in use; retrying (a process that just exited may still hold it)"
                    );
                }
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port freed while start-up retries is taken; one held throughout is
    /// refused with the bind's own `EADDRINUSE`, after the limit.
    #[test]
    fn bind_retrying_waits_for_a_port_that_is_let_go_and_no_longer() {
        use std::net::UdpSocket;
        let held = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let what = format!("test {addr}");
        let limit = std::time::Duration::from_millis(300);
        let start = std::time::Instant::now();
        let e = bind_retrying_for(limit, &what, || UdpSocket::bind(addr)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(start.elapsed() >= limit, "{:?}", start.elapsed());
        assert!(start.elapsed() < limit * 4, "{:?}", start.elapsed());

        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        let limit = std::time::Duration::from_secs(5);
        let s = bind_retrying_for(limit, &what, || UdpSocket::bind(addr)).unwrap();
        assert_eq!(s.local_addr().unwrap(), addr);
        release.join().unwrap();
    }
    use std::time::Duration;

    #[test]
    fn builds_a_runtime_with_timers_even_when_pinning_fails() {
        std::thread::spawn(|| {
            let warned = std::cell::Cell::new(None);
            let mut rt = build_pinned(Some(1 << 20), |w| {
                if let Warning::Unpinned { cpu, .. } = w {
                    warned.set(Some(cpu));
                }
            })
            .expect("runtime");
            assert_eq!(warned.get(), Some(1 << 20));
            let driver = rt.block_on(async {
                monoio::time::sleep(Duration::from_millis(1)).await;
                driver()
            });
            assert!(matches!(driver, "io_uring" | "epoll"), "{driver}");
        })
        .join()
        .expect("runtime thread");
    }
}
