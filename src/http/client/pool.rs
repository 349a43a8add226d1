//! Per-worker reusable resources: idle keep-alive connections per origin,
//! 256 KiB body buffers and splice pipes. Single-threaded (`RefCell`):
//! borrows never span an `.await`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio_rustls::TlsConnector;

use super::conn::Stream;
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
    pub(super) idle: RefCell<HashMap<Arc<str>, VecDeque<IdleConn>>>,
    pub(super) buffers: RefCell<Vec<Vec<u8>>>,
    /// Only fully drained pipes come back here.
    pub(super) pipes: RefCell<Vec<SplicePipe>>,
}

impl Inner {
    pub(super) fn checkout(&self, key: &str) -> Option<Stream> {
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
