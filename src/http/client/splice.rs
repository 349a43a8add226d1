//! Zero-copy relay of a plain-TCP Content-Length body: upstream socket →
//! pipe → client socket, by non-blocking `splice(2)` calls made on the
//! worker thread, waiting for readiness through the runtime when a side
//! has nothing to give or no room.
//!
//! Why not monoio's splice API: on io_uring every `IORING_OP_SPLICE` is
//! punted to an io-wq kernel thread (one thread per in-flight splice, so
//! 16 transfers ran 16 extra threads and cost more CPU than copying), and
//! monoio 0.2.4's `Pipe` cannot be resized, which caps each step at the
//! default 64 KiB. A non-blocking splice never sleeps, so calling it
//! directly is as cheap on io_uring as on epoll, and a pipe enlarged to
//! 1 MiB moves a socket's whole receive queue per call.
//!
//! io_uring sockets are blocking (monoio leaves O_NONBLOCK off under
//! io_uring, where a non-blocking socket would make reads fail with EAGAIN
//! instead of waiting), so both sockets are switched to non-blocking for
//! the relay and switched back afterwards by [`NonBlocking`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use monoio::net::TcpStream;

/// Pipe capacity asked for. Linux allows up to `fs.pipe-max-size` (1 MiB
/// by default) unless the user is over `fs.pipe-user-pages-soft`; a pipe
/// that cannot grow keeps its 64 KiB and still works.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A pipe owned by the relay (read end, write end, capacity in bytes).
/// Only a fully drained pipe may be reused.
pub(crate) struct SplicePipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl SplicePipe {
    pub(crate) fn new() -> io::Result<SplicePipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe fd we own; failure leaves the default size.
        let mut cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        if cap < 0 {
            // SAFETY: as above.
            cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        Ok(SplicePipe {
            r,
            w,
            cap: usize::try_from(cap).unwrap_or(0).max(4096),
        })
    }
}

/// Sets O_NONBLOCK on a socket for as long as it lives, then restores the
/// flags it found (a no-op on epoll, where sockets are non-blocking).
struct NonBlocking {
    fd: RawFd,
    flags: libc::c_int,
}

impl NonBlocking {
    fn set(fd: RawFd) -> io::Result<NonBlocking> {
        // SAFETY: fcntl on a socket fd borrowed from a live TcpStream.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(NonBlocking { fd, flags })
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        if self.flags & libc::O_NONBLOCK == 0 {
            // SAFETY: the socket outlives this guard (declared after it). A
            // failure would leave it non-blocking, and its next io_uring read
            // would fail and close the connection: safe, just a lost reuse.
            unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
        }
    }
}

/// One non-blocking splice; `Ok(None)` when it would block.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<Option<usize>> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: plain fds, no offsets (both are sockets or pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

/// Which side stopped a splice relay.
#[derive(Debug)]
pub(crate) enum SpliceError {
    /// Reading the upstream failed, or it closed before the body ended.
    Upstream(io::Error),
    /// Writing to the client failed or timed out.
    Client(io::Error),
    /// The upstream sent nothing for the idle timeout while it owed bytes.
    UpstreamIdle,
}

/// Per-wait limits of a splice relay: a read from the upstream, a write
/// to the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idle {
    pub(crate) read: Duration,
    pub(crate) write: Duration,
}

/// Moves exactly `len` body bytes from `up` to `client` through `pipe`.
/// `sent` counts bytes that reached the client, also on error. On success
/// the pipe is empty again; on error it must be dropped.
pub(crate) async fn relay(
    up: &TcpStream,
    client: &TcpStream,
    pipe: &SplicePipe,
    len: u64,
    idle: Idle,
    sent: &mut u64,
) -> Result<(), SpliceError> {
    let _up_mode = NonBlocking::set(up.as_raw_fd()).map_err(SpliceError::Upstream)?;
    let _client_mode = NonBlocking::set(client.as_raw_fd()).map_err(SpliceError::Client)?;
    let (mut left, mut in_pipe) = (len, 0usize);
    while left > 0 || in_pipe > 0 {
        let mut moved = false;
        if left > 0 && in_pipe < pipe.cap {
            // Never ask for more than the body: the upstream stays reusable.
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(pipe.cap - in_pipe);
            match splice(up.as_raw_fd(), pipe.w.as_raw_fd(), want) {
                Ok(Some(0)) => {
                    return Err(SpliceError::Upstream(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(Some(n)) => {
                    (left, in_pipe, moved) = (left - n as u64, in_pipe + n, true);
                }
                Ok(None) => {}
                Err(e) => return Err(SpliceError::Upstream(e)),
            }
        }
        if in_pipe > 0 {
            match splice(pipe.r.as_raw_fd(), client.as_raw_fd(), in_pipe) {
                Ok(Some(n)) if n > 0 => {
                    (in_pipe, moved) = (in_pipe - n, true);
                    *sent += n as u64;
                }
                Ok(Some(_)) => {
                    return Err(SpliceError::Client(io::ErrorKind::WriteZero.into()));
                }
                Ok(None) => {}
                Err(e) => return Err(SpliceError::Client(e)),
            }
        }
        if !moved {
            wait(up, client, in_pipe > 0, idle).await?;
        }
    }
    Ok(())
}

/// Waits until the client can take more (while the pipe holds bytes) or
/// the upstream has data (once the pipe is empty). Never both: a pipe also
/// fills up by slots (one per socket buffer fragment), so "upstream
/// readable" can hold while the upstream splice keeps failing, and waiting
/// for it would spin; the pipe is always drained first.
async fn wait(
    up: &TcpStream,
    client: &TcpStream,
    drain: bool,
    idle: Idle,
) -> Result<(), SpliceError> {
    // Not relaxed: on epoll the runtime's cached readiness does not know
    // about our own EAGAIN, so it must ask the kernel again.
    if drain {
        match monoio::time::timeout(idle.write, client.writable(false)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SpliceError::Client(e)),
            Err(_) => Err(SpliceError::Client(io::Error::new(
                io::ErrorKind::TimedOut,
                "client write timed out",
            ))),
        }
    } else {
        match monoio::time::timeout(idle.read, up.readable(false)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SpliceError::Upstream(e)),
            Err(_) => Err(SpliceError::UpstreamIdle),
        }
    }
}
