//! The optional access log: one debug-level event per request under the
//! target `ncro::access`, so `logging.level = "info,ncro::access=debug"`
//! turns it on alone. Off (the default), a request costs one cached
//! callsite check and no clock read. HOT.

use std::time::Instant;

pub const TARGET: &str = "ncro::access";

/// A request being timed for the access log.
#[derive(Debug)]
pub struct AccessMark {
    started: Instant,
    /// Where this request's response head starts in the connection's write
    /// buffer (0 once earlier buffered responses have been flushed).
    out_at: usize,
    status: Option<u16>,
}

/// Starts timing a request whose response will be appended at `out_at`;
/// `None` when the access log is off.
#[inline]
pub fn start(out_at: usize) -> Option<AccessMark> {
    if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        return None;
    }
    Some(AccessMark {
        started: Instant::now(),
        out_at,
        status: None,
    })
}

impl AccessMark {
    /// Notes the status if the response head is in `wbuf`; the connection
    /// calls this before every flush, since a streamed response (a NAR)
    /// flushes its head before the request ends.
    pub fn before_flush(&mut self, wbuf: &[u8]) {
        self.see(wbuf);
        self.out_at = 0;
    }

    fn see(&mut self, wbuf: &[u8]) {
        if self.status.is_none() {
            self.status = wbuf.get(self.out_at..).and_then(status_of);
        }
    }

    /// Emits the event. `status` 0 means no response was written (the
    /// client went away first).
    pub fn finish(mut self, worker: usize, method: &str, path: &str, wbuf: &[u8]) {
        self.see(wbuf);
        tracing::debug!(
            target: TARGET,
            worker,
            method,
            path,
            status = self.status.unwrap_or(0),
            micros = self.started.elapsed().as_micros() as u64,
            "request"
        );
    }
}

/// The status code of an `HTTP/1.x NNN ...` head at the start of `head`.
fn status_of(head: &[u8]) -> Option<u16> {
    let code = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(out_at: usize) -> AccessMark {
        AccessMark {
            started: Instant::now(),
            out_at,
            status: None,
        }
    }

    #[test]
    fn status_is_read_at_the_request_offset() {
        let earlier = b"HTTP/1.1 404 Not Found\r\n\r\n";
        let mut buf = earlier.to_vec();
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nbody");
        let mut m = mark(earlier.len());
        m.see(&buf);
        assert_eq!(m.status, Some(200));
    }

    #[test]
    fn streamed_head_is_caught_before_the_flush() {
        let mut m = mark(3);
        m.before_flush(b"xxxHTTP/1.1 206 Partial Content\r\n\r\n");
        // After the flush the buffer holds body bytes that must not be read
        // as a head.
        m.see(b"HTTP/1.1 999 ");
        assert_eq!(m.status, Some(206));
    }

    #[test]
    fn no_head_yet_then_head_after_flush() {
        let earlier = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut m = mark(earlier.len());
        m.before_flush(earlier); // the request's own answer is not written yet
        assert_eq!(m.status, None);
        m.see(b"HTTP/1.1 502 Bad Gateway\r\n");
        assert_eq!(m.status, Some(502));
    }

    #[test]
    fn garbage_is_not_a_status() {
        assert_eq!(status_of(b"HTTP/1.1 2x0 OK"), None);
        assert_eq!(status_of(b"HTTP/1."), None);
        assert_eq!(status_of(b""), None);
        assert_eq!(status_of(b"HTTP/1.0 304 Not Modified"), Some(304));
    }
}
