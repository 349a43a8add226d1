//! The byte stream under one upstream connection: plain TCP or TLS.
//!
//! An enum rather than a trait object because monoio's rent-based I/O
//! traits have generic async methods (not object safe) and because the
//! splice fast path needs to reach the raw `TcpStream` of plain connections.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use monoio_rustls::ClientTlsStream;

pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a rustls session is several KiB and idle pools hold many.
    /// The descriptor is the TCP socket under it (monoio-rustls does not
    /// lend out its inner stream), owned by the box for as long as it lives.
    Tls(Box<ClientTlsStream<TcpStream>>, RawFd),
}

/// What an idle connection's socket holds at checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleState {
    /// Nothing to read, connection open: safe to send a request on.
    Quiet,
    /// Bytes arrived while nobody asked (after a HEAD, 204 or 304 answer,
    /// or after a body that was complete): they would be read as the
    /// answer to the next request.
    Unsolicited,
    /// The peer closed or reset it (or the socket reports an error).
    Closed,
}

impl Stream {
    pub(crate) async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s, _) => s.read(buf).await,
        }
    }

    pub(crate) async fn write_all<T: IoBuf + 'static>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write_all(buf).await,
            Stream::Tls(s, _) => s.write_all(buf).await,
        }
    }

    /// Looks at the socket without waiting or consuming anything: one
    /// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte. For TLS this sees the
    /// TCP socket: nothing at all should arrive on an idle connection (a
    /// TLS close_notify also means the peer is done with it). Bytes the
    /// TLS layer already read past the last response are not seen; the
    /// response reader leaves none in its own buffer (`Body::finish`).
    pub(crate) fn idle_state(&self) -> IdleState {
        let fd = match self {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Tls(_, fd) => *fd,
        };
        let mut byte = 0u8;
        loop {
            // SAFETY: `fd` is the open socket this stream owns; the buffer
            // is one valid, writable byte that outlives the call.
            let n = unsafe {
                libc::recv(
                    fd,
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            return match n {
                0 => IdleState::Closed,
                n if n > 0 => IdleState::Unsolicited,
                _ => match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => IdleState::Quiet,
                    Some(libc::EINTR) => continue,
                    _ => IdleState::Closed,
                },
            };
        }
    }

    /// The raw socket when nothing sits between it and the HTTP bytes.
    pub(crate) fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(..) => None,
        }
    }
}

/// Errors that mean "the peer went away", as opposed to a local failure.
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}
