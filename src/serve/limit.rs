//! `server.max_connections`: one process-wide cap on open client
//! connections, and the 503 that answers connections beyond it. HOT (one
//! atomic add per accepted connection).
//!
//! The cap is shared by all workers rather than split into per-worker
//! shares: `SO_REUSEPORT` spreads connections by a hash of their addresses
//! (and an inherited systemd socket by whichever worker wakes first), so a
//! per-worker share would refuse connections on one worker while another
//! still has room.
//!
//! A connection over the cap is still accepted, so that the client learns
//! why: it gets `503` with `Retry-After` and `Connection: close`, which Nix
//! retries with backoff, instead of a reset it would report as a network
//! error. Established connections never notice. What such a connection may
//! cost is bounded: the answer is written at most [`LINGER`] after accept,
//! and at most [`MAX_LINGERING`] of them per worker wait for the client to
//! read it; beyond that they are closed right after the write.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::response::write_simple;
use crate::worker::WorkerCtx;

/// How long a refused connection may take to get its answer out and be
/// read, before it is closed regardless.
pub const LINGER: Duration = Duration::from_secs(1);
/// Refused connections per worker that may linger at once; more are closed
/// right after the answer is written (a flood must not pin descriptors).
pub const MAX_LINGERING: usize = 256;
/// Request bytes read (and dropped) from a refused connection at most.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Open client connections across all workers against the configured cap.
#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicUsize,
    /// 0: no cap.
    max: usize,
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a slot for a new connection; false when the cap is reached.
    /// Every `true` must be matched by one [`ConnLimit::release`].
    #[inline]
    pub fn try_acquire(&self) -> bool {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if self.max == 0 || before < self.max {
            return true;
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        false
    }

    #[inline]
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// Refused connections of this worker still lingering.
    static LINGERING: Cell<usize> = const { Cell::new(0) };
}

/// Answers a connection over the cap with 503 and closes it; counted in
/// `ncro_http_connections_rejected_total`.
pub async fn refuse(ctx: Rc<WorkerCtx>, mut stream: TcpStream) {
    ctx.metrics.connections_rejected.inc();
    let mut answer = Vec::with_capacity(256);
    write_simple(
        &mut answer,
        503,
        false,
        false,
        &ctx.date(),
        &[
            ("Retry-After", b"1"),
            ("Content-Type", b"text/plain; charset=utf-8"),
        ],
        b"too many connections; retry shortly\n",
    );
    let linger = LINGERING.with(|n| {
        let ok = n.get() < MAX_LINGERING;
        n.set(n.get() + usize::from(ok));
        ok
    });
    let deadline = monoio::time::Instant::now() + LINGER;
    let written = monoio::time::timeout_at(deadline, stream.write_all(answer)).await;
    if linger {
        if matches!(written, Ok((Ok(_), _))) {
            drain(&mut stream, deadline).await;
        }
        LINGERING.with(|n| n.set(n.get() - 1));
    }
    ctx.metrics.connections_closed.inc();
}

/// Ends our side and reads what the client sent until it closes or the
/// deadline passes. Closing with its request still unread would make the
/// kernel send a reset, which can destroy the 503 before the client reads it.
async fn drain(stream: &mut TcpStream, deadline: monoio::time::Instant) {
    if stream.shutdown().await.is_err() {
        return; // the client is already gone
    }
    let mut buf = Vec::with_capacity(4096);
    let mut left = DRAIN_LIMIT;
    while left > 0 {
        buf.clear();
        let cap = buf.capacity();
        let read = stream.read(buf.slice_mut(0..cap));
        let Ok((res, slice)) = monoio::time::timeout_at(deadline, read).await else {
            return;
        };
        buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back() {
        let l = ConnLimit::new(2);
        assert!(l.try_acquire() && l.try_acquire());
        assert!(!l.try_acquire(), "third over a cap of 2");
        assert_eq!(l.open(), 2, "a refused attempt holds no slot");
        l.release();
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
    }

    #[test]
    fn zero_means_no_cap() {
        let l = ConnLimit::new(0);
        assert!((0..10_000).all(|_| l.try_acquire()));
        assert_eq!(l.open(), 10_000);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_cap() {
        let l = std::sync::Arc::new(ConnLimit::new(10));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut held = 0;
                    for _ in 0..10_000 {
                        if l.try_acquire() {
                            assert!(l.open() <= 10 + 3, "only racing attempts overshoot");
                            held += 1;
                            if held > 5 {
                                l.release();
                                held -= 1;
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        let held: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(held <= 10);
        assert_eq!(l.open(), held);
    }
}
