//! Per-worker reusable resources: idle keep-alive connections per origin,
//! 256 KiB body buffers and splice pipes. Single-threaded (`RefCell`):
//! borrows never span an `.await`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio_rustls::TlsConnector;

use super::conn::{IdleState, Stream};
use super::splice::SplicePipe;
use super::{ClientTimeouts, BODY_BUF_SIZE};
use crate::http::resolve::Resolver;

/// Idle buffers and pipes kept per worker; more are freed on return.
const MAX_POOLED_BUFFERS: usize = 16;
const MAX_POOLED_PIPES: usize = 8;

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

/// Idle connections closed at checkout instead of reused, by why; read at
/// scrape time (`ncro_upstream_pool_discards_total`). One writer: the
/// worker whose client holds it.
#[derive(Debug, Default)]
pub struct PoolDiscards {
    unsolicited: AtomicU64,
    eof: AtomicU64,
}

impl PoolDiscards {
    /// Every `reason` label, in the order of [`Self::counts`].
    pub const REASONS: [&'static str; 2] = ["unsolicited", "eof"];

    /// `[unsolicited, eof]`: the upstream had sent bytes nobody asked
    /// for, or had closed (or reset) the connection.
    pub fn counts(&self) -> [u64; 2] {
        [self.unsolicited.load(Relaxed), self.eof.load(Relaxed)]
    }

    fn count(&self, c: &AtomicU64) {
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
    }
}

pub(super) struct IdleConn {
    pub(super) stream: Stream,
    pub(super) since: Instant,
}

/// State shared by a worker's client and the responses it hands out.
pub(super) struct Inner {
    pub(super) resolver: Resolver,
    pub(super) tls: TlsConnector,
    pub(super) timeouts: ClientTimeouts,
    pub(super) pool: PoolOptions,
    /// foldhash, not SipHash: looked up twice per request (checkout and
    /// checkin); the keys are the client's own origins.
    pub(super) idle: RefCell<HashMap<Arc<str>, VecDeque<IdleConn>, foldhash::fast::RandomState>>,
    pub(super) buffers: RefCell<Vec<Vec<u8>>>,
    /// Only fully drained pipes come back here.
    pub(super) pipes: RefCell<Vec<SplicePipe>>,
    pub(super) discards: Arc<PoolDiscards>,
}

impl Inner {
    /// An idle connection to `key` that is still open and has nothing
    /// unread. Each candidate is checked with one non-blocking peek
    /// ([`Stream::idle_state`]): bytes an upstream sent after its last
    /// answer was complete would otherwise be parsed as the answer to the
    /// next request, so such a connection is closed, as is one the
    /// upstream closed, and counted in [`PoolDiscards`].
    pub(super) fn checkout(&self, key: &str) -> Option<Stream> {
        let mut idle = self.idle.borrow_mut();
        let queue = idle.get_mut(key)?;
        // Most recently used first: the warmest connection is least likely
        // to have been closed by the upstream.
        while let Some(conn) = queue.pop_back() {
            if conn.since.elapsed() >= self.pool.idle_expiry {
                continue;
            }
            match conn.stream.idle_state() {
                IdleState::Quiet => return Some(conn.stream),
                IdleState::Unsolicited => self.discards.count(&self.discards.unsolicited),
                IdleState::Closed => self.discards.count(&self.discards.eof),
            }
        }
        None
    }

    pub(super) fn checkin(&self, key: &Arc<str>, stream: Stream) {
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

    pub(super) fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BODY_BUF_SIZE))
    }

    pub(super) fn give_buffer(&self, mut buf: Vec<u8>) {
        let mut buffers = self.buffers.borrow_mut();
        if buf.capacity() == BODY_BUF_SIZE && buffers.len() < MAX_POOLED_BUFFERS {
            buf.clear();
            buffers.push(buf);
        }
    }

    pub(super) fn take_pipe(&self) -> Option<SplicePipe> {
        let pooled = self.pipes.borrow_mut().pop();
        pooled.or_else(|| SplicePipe::new().ok())
    }

    pub(super) fn give_pipe(&self, pipe: SplicePipe) {
        let mut pipes = self.pipes.borrow_mut();
        if pipes.len() < MAX_POOLED_PIPES {
            pipes.push(pipe);
        }
    }
}
