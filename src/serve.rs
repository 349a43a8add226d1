//! The per-connection HTTP/1.1 loop and endpoint dispatch. HOT.
//!
//! One task per client connection on its worker. Keep-alive and pipelining
//! are handled here: complete requests already in the read buffer are
//! answered back to back, and their in-memory responses are written with
//! one syscall.
//!
//! Memory per idle keep-alive connection is kept to a few kilobytes (10,000
//! idle connections cost about 40 MB): the task's future holds only the
//! request loop (the NAR relay and the race are boxed when used), the read
//! buffer starts at 1 KiB, and the write buffer goes back to a per-worker
//! pool whenever the connection waits for its next request.

pub mod batch;
pub mod bloom;
pub mod health;
pub mod limit;
pub mod nar;
pub mod narinfo;
pub mod side_paths;
pub mod status;

use std::cell::RefCell;
use std::rc::Rc;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::request::{self, Method, Parse, Request};
use crate::http::response::write_simple;
use crate::metrics::{access, NarOutcome};
use crate::worker::WorkerCtx;

/// Responses buffered from pipelined requests before a write is forced.
const MAX_BUFFERED_OUT: usize = 64 * 1024;

/// First read buffer of a connection: a Nix request head is 100-300 bytes.
/// It grows by doubling when a head needs more.
const READ_BUF: usize = 1024;
/// A read buffer grown past this (a long pipelined burst) is given back
/// when the connection goes idle.
const MAX_IDLE_READ_BUF: usize = 8 * 1024;
/// Write buffers: first size, the largest kept in the pool (a `/metrics`
/// body is not), and how many an idle worker keeps.
const WRITE_BUF: usize = 4096;
const MAX_POOLED_WRITE_BUF: usize = 64 * 1024;
const WRITE_POOL: usize = 256;

thread_local! {
    /// Write buffers of this worker's connections that wait for a request,
    /// so that an idle keep-alive connection holds none.
    static WRITE_BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_write_buf() -> Vec<u8> {
    WRITE_BUFS
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(WRITE_BUF))
}

fn give_write_buf(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > MAX_POOLED_WRITE_BUF {
        return;
    }
    buf.clear();
    WRITE_BUFS.with_borrow_mut(|pool| {
        if pool.len() < WRITE_POOL {
            pool.push(buf);
        }
    });
}

/// What to do with the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
}

impl After {
    /// `KeepAlive` when the client may send another request.
    pub fn keep_if(keep: bool) -> After {
        if keep {
            After::KeepAlive
        } else {
            After::Close
        }
    }
}

/// A connection a worker accepted ([`crate::worker::Accept`]): served while
/// `server.max_connections` has room, else answered 503 and closed
/// ([`limit::refuse`]).
pub fn accept(ctx: &Rc<WorkerCtx>, stream: TcpStream) {
    if ctx.shared.connections.try_acquire() {
        ctx.active.set(ctx.active.get() + 1);
        monoio::spawn(serve_conn(ctx.clone(), stream));
    } else {
        monoio::spawn(limit::refuse(ctx.clone(), stream));
    }
}

pub async fn serve_conn(ctx: Rc<WorkerCtx>, stream: TcpStream) {
    let _ = stream.set_nodelay(true); // latency of small responses matters more than segments
    let mut conn = Conn {
        stream,
        rbuf: Vec::with_capacity(READ_BUF),
        wbuf: Vec::new(),
        head_request: false,
        access: None,
        nar_failed: false,
    };
    if let Err(e) = conn.run(&ctx).await {
        tracing::debug!(worker = ctx.index, error = %e, "client connection ended with an error");
    }
    give_write_buf(std::mem::take(&mut conn.wbuf));
    ctx.metrics.connections_closed.inc();
    ctx.active.set(ctx.active.get() - 1);
    ctx.shared.connections.release();
}

pub struct Conn {
    pub stream: TcpStream,
    rbuf: Vec<u8>,
    /// Responses not yet written. Empty (no allocation) while the
    /// connection waits for a request; taken from the worker's pool when a
    /// request arrives.
    pub wbuf: Vec<u8>,
    /// The request being answered is a HEAD: [`Conn::error`] then sends no
    /// body, which the client would otherwise read as the next response.
    head_request: bool,
    /// The request being timed for the access log (debug level only).
    access: Option<access::AccessMark>,
    /// Set through [`Conn::mark_nar_failed`] by the NAR handler; read and reset
    /// by `dispatch` around each NAR request.
    nar_failed: bool,
}

enum Head {
    Ready,
    Closed,
}

impl Conn {
    async fn run(&mut self, ctx: &WorkerCtx) -> std::io::Result<()> {
        loop {
            match self.wait_head(ctx).await? {
                Head::Closed => return self.flush(ctx).await,
                Head::Ready => {}
            }
            let after = self.answer_one(ctx).await?;
            // Keep buffering pipelined answers while another full head is
            // already here; otherwise write now.
            if after == After::Close
                || !has_full_head(&self.rbuf)
                || self.wbuf.len() >= MAX_BUFFERED_OUT
            {
                self.flush(ctx).await?;
            }
            if after == After::Close {
                return Ok(());
            }
        }
    }

    /// Reads until the buffer holds a complete request head, the peer
    /// closes, `server.read_timeout` passes, or the worker drains.
    async fn wait_head(&mut self, ctx: &WorkerCtx) -> std::io::Result<Head> {
        // One deadline for the idle wait and the whole head, not one per
        // read: a client trickling a byte now and then must not hold the
        // connection forever (slowloris).
        let deadline = monoio::time::Instant::now() + ctx.shared.config.server.read_timeout;
        loop {
            skip_empty_lines(&mut self.rbuf);
            if has_full_head(&self.rbuf) {
                break;
            }
            if self.rbuf.len() > request::MAX_HEAD {
                return Ok(Head::Ready); // the parser answers 431
            }
            if !self.wbuf.is_empty() {
                self.flush(ctx).await?;
            }
            if self.rbuf.is_empty() && ctx.drain.is_fired() {
                return Ok(Head::Closed);
            }
            if self.rbuf.is_empty() {
                // Idle until the next request: hold as little as possible.
                give_write_buf(std::mem::take(&mut self.wbuf));
                if self.rbuf.capacity() > MAX_IDLE_READ_BUF {
                    self.rbuf = Vec::with_capacity(READ_BUF);
                }
            }
            let spare = self.rbuf.capacity() - self.rbuf.len();
            if spare < READ_BUF / 2 {
                self.rbuf.reserve(self.rbuf.capacity().max(READ_BUF));
            }
            let buf = std::mem::take(&mut self.rbuf);
            let len = buf.len();
            let cap = buf.capacity();
            let read = self.stream.read(buf.slice_mut(len..cap));
            let (res, slice) = monoio::select! {
                r = monoio::time::timeout_at(deadline, read) => match r {
                    Ok(r) => r,
                    Err(_) => return Ok(Head::Closed), // idle or slow client: drop it
                },
                _ = ctx.drain.wait(), if len == 0 => return Ok(Head::Closed),
            };
            self.rbuf = slice.into_inner();
            if res? == 0 {
                return Ok(Head::Closed);
            }
        }
        Ok(Head::Ready)
    }

    async fn answer_one(&mut self, ctx: &WorkerCtx) -> std::io::Result<After> {
        ctx.metrics.requests_total.inc();
        if self.wbuf.capacity() == 0 {
            self.wbuf = take_write_buf();
        }
        self.access = access::start(self.wbuf.len());
        let rbuf = std::mem::take(&mut self.rbuf);
        self.head_request = false;
        let (after, consumed) = match request::parse(&rbuf) {
            Parse::Complete(req, len) => {
                self.head_request = req.method == Method::Head;
                // The one endpoint that reads a request body.
                let (after, body) = if batch::is_batch(req.path) {
                    Box::pin(batch::serve(self, ctx, &req, &rbuf[..len], &rbuf[len..])).await?
                } else {
                    (self.dispatch(ctx, &req).await?, 0)
                };
                self.log_access(ctx, req.method_raw, req.target);
                (after, len + body)
            }
            // wait_head saw a blank line that httparse does not take as the
            // end of a head; a client's bytes must never panic the worker.
            Parse::Partial => (
                self.error(ctx, 400, "malformed request\n", false),
                rbuf.len(),
            ),
            Parse::TooLarge => (
                self.error(ctx, 431, "request header fields too large\n", false),
                rbuf.len(),
            ),
            Parse::Bad(why) => (self.error(ctx, 400, why, false), rbuf.len()),
        };
        // A request that did not parse is logged without method and path
        // (a parsed one was logged above and its mark is gone).
        self.log_access(ctx, "-", "-");
        self.rbuf = rbuf;
        self.rbuf.drain(..consumed.min(self.rbuf.len()));
        Ok(after)
    }

    async fn dispatch(&mut self, ctx: &WorkerCtx, req: &Request<'_>) -> std::io::Result<After> {
        let keep = req.keep_alive && !ctx.drain.is_fired();
        if req.method == Method::Other {
            ctx.metrics.bad_requests.inc();
            // An unread body may follow an unknown method; close after answering.
            let date = ctx.date();
            write_simple(
                &mut self.wbuf,
                405,
                keep && !req.has_body,
                false,
                &date,
                &[("Allow", b"GET, HEAD"), TEXT],
                b"method not allowed\n",
            );
            return Ok(if keep && !req.has_body {
                After::KeepAlive
            } else {
                After::Close
            });
        }
        if req.has_body {
            return Ok(self.error(ctx, 400, "request bodies are not accepted\n", false));
        }
        let head = req.method == Method::Head;
        let path = req.path;
        if path == "/nix-cache-info" {
            ctx.metrics.cache_info_requests.inc();
            let body = ctx.shared.cache_info.clone();
            self.ok(ctx, keep, head, b"text/x-nix-cache-info", &body);
        } else if path == "/health" {
            let (code, body) = health::render(ctx);
            self.answer(ctx, code, keep, head, b"application/json", body.as_bytes());
        } else if path == "/status" {
            let body = status::render(ctx, status::fallback_of(ctx));
            self.ok(ctx, keep, head, b"application/json", body.as_bytes());
        } else if path == "/metrics" {
            let body = ctx.shared.metrics.render();
            self.ok(
                ctx,
                keep,
                head,
                b"text/plain; version=0.0.4",
                body.as_bytes(),
            );
        } else if path == crate::index::FILTER_PATH {
            return Ok(bloom::serve(self, ctx, req, keep));
        } else if let Some(name) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix(".narinfo"))
        {
            let Some(hash) = crate::proto::store_path::StoreHash::parse(name.as_bytes()) else {
                ctx.metrics.narinfo_error.inc();
                return Ok(self.error(ctx, 400, "invalid store path hash\n", keep));
            };
            return Ok(self.narinfo(ctx, hash, head, keep).await);
        } else if path.starts_with("/nar/") {
            ctx.metrics.nar_requests.inc();
            if !valid_nar_path(path) {
                return Ok(self.error(ctx, 400, "invalid NAR path\n", keep));
            }
            // Its query and forwarded headers must be sendable as they are:
            // refused here, a request no upstream could be sent never
            // reaches one, nor counts against one's health.
            if let Err(e) = nar::forwardable(req) {
                tracing::debug!(path, error = %e, "NAR request cannot be forwarded; answered 400");
                return Ok(self.error(ctx, 400, "request cannot be forwarded\n", keep));
            }
            self.nar_failed = false;
            let started = std::time::Instant::now();
            // Boxed: the relay's state is large and only NAR requests need
            // it, so it is not part of every idle connection's task.
            let result = Box::pin(nar::serve(self, ctx, req, keep)).await;
            let outcome = if self.nar_failed || result.is_err() {
                NarOutcome::Error
            } else {
                NarOutcome::Ok
            };
            ctx.metrics.nar_finished(outcome, started.elapsed());
            return result;
        } else if let Some(target) = side_paths::classify(path) {
            // Boxed, like the NAR relay: rare, and large futures.
            return Box::pin(side_paths::serve(self, ctx, req, target, keep)).await;
        } else {
            return Ok(self.error(ctx, 404, "not found\n", keep));
        }
        Ok(After::keep_if(keep))
    }

    async fn narinfo(
        &mut self,
        ctx: &WorkerCtx,
        hash: crate::proto::store_path::StoreHash,
        head: bool,
        keep: bool,
    ) -> After {
        let resolved = narinfo::answer(ctx, hash).await;
        // A drain that began while the upstream answered: tell the client
        // this connection ends here rather than closing it unannounced.
        let keep = keep && !ctx.drain.is_fired();
        let status = narinfo::status_of(&resolved);
        match resolved {
            narinfo::Resolved::Found(hit, via) => {
                ctx.metrics.narinfo_ok.inc();
                narinfo::write_found(self, ctx, keep, head, &hit, via);
                if keep {
                    After::KeepAlive
                } else {
                    After::Close
                }
            }
            narinfo::Resolved::Miss => {
                ctx.metrics.narinfo_error.inc();
                self.error(ctx, status, "not found\n", keep)
            }
            narinfo::Resolved::Overloaded => {
                ctx.metrics.narinfo_error.inc();
                narinfo::write_overloaded(self, ctx, keep)
            }
            narinfo::Resolved::Unavailable { .. } => {
                ctx.metrics.narinfo_error.inc();
                self.error(
                    ctx,
                    status,
                    "no upstream answered usably; try again\n",
                    keep,
                )
            }
        }
    }

    /// Marks the current NAR request as failed (no upstream served it, or
    /// the relay was cut short); counted once it ends.
    pub fn mark_nar_failed(&mut self) {
        self.nar_failed = true;
    }

    fn log_access(&mut self, ctx: &WorkerCtx, method: &str, path: &str) {
        if let Some(mark) = self.access.take() {
            mark.finish(ctx.index, method, path, &self.wbuf);
        }
    }

    /// Buffers a 200 response with an in-memory body.
    fn ok(&mut self, ctx: &WorkerCtx, keep: bool, head: bool, content_type: &[u8], body: &[u8]) {
        self.answer(ctx, 200, keep, head, content_type, body)
    }

    /// Buffers a small in-memory response with `status`.
    fn answer(
        &mut self,
        ctx: &WorkerCtx,
        status: u16,
        keep: bool,
        head: bool,
        content_type: &[u8],
        body: &[u8],
    ) {
        let date = ctx.date();
        write_simple(
            &mut self.wbuf,
            status,
            keep,
            head,
            &date,
            &[("Content-Type", content_type)],
            body,
        );
    }

    /// Buffers a small plain-text error response.
    pub fn error(&mut self, ctx: &WorkerCtx, status: u16, body: &str, keep: bool) -> After {
        if matches!(status, 400 | 405 | 431) {
            ctx.metrics.bad_requests.inc();
        }
        let date = ctx.date();
        write_simple(
            &mut self.wbuf,
            status,
            keep,
            self.head_request,
            &date,
            &[TEXT],
            body.as_bytes(),
        );
        if keep {
            After::KeepAlive
        } else {
            After::Close
        }
    }

    /// Writes everything buffered, bounded by the write timeout.
    pub async fn flush(&mut self, ctx: &WorkerCtx) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        if let Some(mark) = self.access.as_mut() {
            mark.before_flush(&self.wbuf);
        }
        let buf = std::mem::take(&mut self.wbuf);
        let timeout = ctx.shared.config.server.write_timeout;
        let (res, mut buf) = match monoio::time::timeout(timeout, self.stream.write_all(buf)).await
        {
            Ok(r) => r,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client write timed out",
                ))
            }
        };
        buf.clear();
        self.wbuf = buf;
        res.map(|_| ())
    }
}

const TEXT: (&str, &[u8]) = ("Content-Type", b"text/plain; charset=utf-8");

/// Drops empty lines before a request line (RFC 9112 §2.2 asks servers to
/// ignore them; httparse skips them too), so that they are not taken for
/// the blank line that ends a head.
fn skip_empty_lines(buf: &mut Vec<u8>) {
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if blank > 0 {
        buf.drain(..blank);
    }
}

/// True once `buf` holds a request head's terminating blank line.
fn has_full_head(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// NAR paths are opaque but must not escape `/nar/` or carry control bytes
/// into an upstream request line. Anything not under `/nar/` is invalid
/// (found by fuzzing: slicing off the prefix unchecked panicked on short or
/// non-ASCII input and accepted paths outside `/nar/`).
pub fn valid_nar_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nar/") else {
        return false;
    };
    !rest.is_empty()
        && rest
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+=/,".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_path_validation() {
        assert!(valid_nar_path(
            "/nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz"
        ));
        assert!(valid_nar_path("/nar/sub/x.nar"));
        for bad in [
            "/nar/",
            "/nar/../etc/passwd",
            "/nar/a//b",
            "/nar/a/./b",
            "/nar/a%2e%2e",
            "/nar/a b",
            "/nar/a\x01",
            // Fuzz regressions: these panicked or were accepted.
            "",
            "/n",
            "/na\u{e9}x",
            "/nix/store/z3358nh04rrn2fw765nlbl8ff0w9p8cp-app-ab",
        ] {
            assert!(!valid_nar_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn empty_lines_before_a_request_are_skipped() {
        let mut buf = b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec();
        skip_empty_lines(&mut buf);
        assert_eq!(buf, b"GET / HTTP/1.1\r\n\r\n");
        let mut only = b"\r\n\r\n".to_vec();
        skip_empty_lines(&mut only);
        assert!(only.is_empty() && !has_full_head(&only));
    }

    /// Every idle keep-alive connection is one task of this size (plus a
    /// 1 KiB read buffer): 4,480 bytes before the NAR relay and the race
    /// were boxed.
    #[test]
    fn connection_task_stays_small() {
        fn future_size<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(serve_conn);
        println!("serve_conn future: {size} bytes");
        assert!(size <= 2048, "serve_conn's future is {size} bytes");
    }

    #[test]
    fn head_detection() {
        assert!(!has_full_head(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(has_full_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(has_full_head(b"GET / HTTP/1.1\nHost: x\n\n"));
    }
}
