//! `server.max_connections`: one process-wide cap on open client
//! connections, and the 503 that answers connections beyond it. HOT (one
//! atomic add per accepted connection).
//!
//! The count is [`ConnLimit`] (in [`crate::worker`], which takes a slot on
//! accept). The cap is shared by all workers rather than split into per-worker
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
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::response::write_simple;
pub use crate::worker::ConnLimit;
use crate::worker::WorkerCtx;

/// How long a refused connection may take to get its answer out and be
/// read, before it is closed regardless.
pub const LINGER: Duration = Duration::from_secs(1);
/// Refused connections per worker that may linger at once; more are closed
/// right after the answer is written (a flood must not pin descriptors).
pub const MAX_LINGERING: usize = 256;
/// Request bytes read (and dropped) from a refused connection at most.
const DRAIN_LIMIT: usize = 64 * 1024;

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
