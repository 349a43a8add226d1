//! Streaming an upstream body to a client socket with bounded memory.
//!
//! Copy mode moves at most one 256 KiB buffer at a time through userspace;
//! chunked bodies are forwarded with their framing, validated on the way.
//! Splice mode moves plain-TCP Content-Length bodies through a pipe without
//! touching userspace ([`super::splice`]: direct non-blocking splice calls
//! on the worker, on both drivers).

use std::io;

use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::response::{Body, Framing};
use super::splice::{self, SpliceError};
use super::{ClientError, Response, BODY_BUF_SIZE};

/// How `Response::relay_to` moves the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    Copy,
    /// Zero-copy through a pipe; used only for plain-TCP Content-Length
    /// bodies larger than one copy buffer, everything else silently uses
    /// `Copy`.
    Splice,
}

/// A relay cut short. `sent` bytes already reached the client, so the
/// caller must close the client connection: a truncated NAR must never
/// look complete.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("upstream failed after {sent} bytes: {error}")]
    Upstream { error: ClientError, sent: u64 },
    #[error("client write failed after {sent} bytes: {error}")]
    Client { error: io::Error, sent: u64 },
}

impl RelayError {
    /// Bytes written to the client before the failure.
    pub fn sent(&self) -> u64 {
        match self {
            RelayError::Upstream { sent, .. } | RelayError::Client { sent, .. } => *sent,
        }
    }
}

/// Tracks bytes sent so every error can report them.
struct Progress {
    sent: u64,
}

impl Progress {
    fn upstream(&self, error: ClientError) -> RelayError {
        RelayError::Upstream {
            error,
            sent: self.sent,
        }
    }

    fn client(&self, error: io::Error) -> RelayError {
        RelayError::Client {
            error,
            sent: self.sent,
        }
    }
}

impl Response {
    /// Writes the rest of the body to `dst` and returns the number of bytes
    /// written. Chunked bodies are forwarded *with* their chunked framing
    /// (the caller announced `Transfer-Encoding: chunked`); other bodies
    /// are forwarded as is. Client writes are bounded by the idle timeout.
    ///
    /// On success the upstream connection goes back to the idle pool when
    /// reusable. Do not mix with `read_chunk` on the same response.
    pub async fn relay_to(
        &mut self,
        dst: &mut TcpStream,
        mode: RelayMode,
    ) -> Result<u64, RelayError> {
        let body = &mut self.body;
        let mut progress = Progress { sent: 0 };
        body.begin().map_err(|e| progress.upstream(e))?;
        // A body that fits one copy buffer moves with one read and one
        // write; splicing it would cost more system calls (socket mode
        // switches, splices, readiness waits) than the copy saves.
        let unread = match body.framing {
            Framing::Length { remaining } => remaining.saturating_sub(body.buffered() as u64),
            _ => 0,
        };
        let splice = mode == RelayMode::Splice
            && unread > BODY_BUF_SIZE as u64
            && body
                .stream
                .as_mut()
                .is_some_and(|s| s.plain_tcp().is_some());
        let result = if splice {
            relay_splice(body, dst, &mut progress).await
        } else {
            relay_copy(body, dst, &mut progress).await
        };
        body.busy = false;
        if result.is_err() {
            body.fail();
        }
        result.map(|()| progress.sent)
    }
}

/// How many buffered bytes may be forwarded now, and whether the body ends
/// with them.
fn forwardable(body: &mut Body) -> Result<(usize, bool), ClientError> {
    let buffered = body.buffered();
    Ok(match &mut body.framing {
        Framing::Empty => (0, true),
        Framing::Length { remaining } => {
            let n = buffered.min(usize::try_from(*remaining).unwrap_or(usize::MAX));
            *remaining -= n as u64;
            (n, *remaining == 0)
        }
        Framing::Chunked(decoder) => {
            let n = decoder.scan(&body.buf[body.pos..])?;
            (n, decoder.is_done())
        }
        Framing::UntilClose => (buffered, false),
    })
}

async fn relay_copy(
    body: &mut Body,
    dst: &mut TcpStream,
    progress: &mut Progress,
) -> Result<(), RelayError> {
    if body.complete {
        return Ok(());
    }
    loop {
        let (n, done) = forwardable(body).map_err(|e| progress.upstream(e))?;
        if n > 0 {
            forward(body, dst, n)
                .await
                .map_err(|e| progress.client(e))?;
            progress.sent += n as u64;
        }
        if done {
            body.finish();
            return Ok(());
        }
        let want = match body.framing {
            Framing::Length { remaining } => usize::try_from(remaining).unwrap_or(usize::MAX),
            _ => BODY_BUF_SIZE,
        };
        if body.fill(want).await.map_err(|e| progress.upstream(e))? == 0 {
            if matches!(body.framing, Framing::UntilClose) {
                body.finish();
                return Ok(());
            }
            return Err(progress.upstream(ClientError::ConnectionClosed));
        }
    }
}

/// Writes `buf[pos..pos + n]` to the client and consumes it.
async fn forward(body: &mut Body, dst: &mut TcpStream, n: usize) -> io::Result<()> {
    let buf = std::mem::take(&mut body.buf);
    let range = body.pos..body.pos + n;
    let write = monoio::time::timeout(body.idle, dst.write_all(buf.slice(range))).await;
    let Ok((result, slice)) = write else {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client write timed out",
        ));
    };
    body.buf = slice.into_inner();
    result?;
    body.pos += n;
    Ok(())
}

async fn relay_splice(
    body: &mut Body,
    dst: &mut TcpStream,
    progress: &mut Progress,
) -> Result<(), RelayError> {
    // Whatever arrived with the head goes first, through userspace.
    let (n, done) = forwardable(body).map_err(|e| progress.upstream(e))?;
    if n > 0 {
        forward(body, dst, n)
            .await
            .map_err(|e| progress.client(e))?;
        progress.sent += n as u64;
    }
    let Framing::Length { remaining } = body.framing else {
        return Err(progress.upstream(ClientError::Aborted));
    };
    if done || remaining == 0 {
        body.finish();
        return Ok(());
    }
    let Some(pipe) = body.client.take_pipe() else {
        // No pipe (fd exhaustion): the copy path still works.
        return relay_copy(body, dst, progress).await;
    };
    let mut stream = body
        .stream
        .take()
        .ok_or_else(|| progress.upstream(ClientError::Aborted))?;
    let tcp = stream
        .plain_tcp()
        .ok_or_else(|| progress.upstream(ClientError::Aborted))?;
    let idle = splice::Idle {
        read: body.read_idle,
        write: body.idle,
    };
    let moved = splice::relay(tcp, dst, &pipe, remaining, idle, &mut progress.sent).await;
    match moved {
        Ok(()) => {}
        Err(SpliceError::Upstream(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(progress.upstream(ClientError::ConnectionClosed))
        }
        Err(SpliceError::Upstream(e)) => return Err(progress.upstream(ClientError::Io(e))),
        Err(SpliceError::UpstreamIdle) => return Err(progress.upstream(ClientError::IdleTimeout)),
        Err(SpliceError::Client(e)) => return Err(progress.client(e)),
    }
    // Only a fully drained pipe is reusable; every error path above drops it.
    body.client.give_pipe(pipe);
    body.framing = Framing::Length { remaining: 0 };
    body.stream = Some(stream);
    body.finish();
    Ok(())
}
