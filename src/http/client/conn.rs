//! The byte stream under one upstream connection: plain TCP or TLS.
//!
//! An enum rather than a trait object because monoio's rent-based I/O
//! traits have generic async methods (not object safe) and because the
//! splice fast path needs to reach the raw `TcpStream` of plain connections.

use std::io;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;
use monoio_rustls::ClientTlsStream;

pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a rustls session is several KiB and idle pools hold many.
    Tls(Box<ClientTlsStream<TcpStream>>),
}

impl Stream {
    pub(crate) async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    pub(crate) async fn write_all<T: IoBuf + 'static>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write_all(buf).await,
            Stream::Tls(s) => s.write_all(buf).await,
        }
    }

    /// The raw socket when nothing sits between it and the HTTP bytes.
    pub(crate) fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
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
