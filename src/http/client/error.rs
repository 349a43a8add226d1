//! The client's error type and its mapping onto metric labels.

use std::io;

use super::conn::is_disconnect;
use super::signer::SignerError;
use super::MAX_HEAD;
use crate::http::chunked::ChunkedError;

/// Why an upstream request failed. Cheap to build and to match on; the
/// race engine turns these into metric labels with [`ClientError::kind`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("DNS lookup failed: {0}")]
    Dns(io::Error),
    #[error("DNS lookup timed out")]
    DnsTimeout,
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("no response head within the first-byte timeout")]
    FirstByteTimeout,
    #[error("upstream sent nothing within the idle timeout")]
    IdleTimeout,
    #[error("upstream closed the connection before the response was complete")]
    ConnectionClosed,
    #[error("upstream I/O error: {0}")]
    Io(io::Error),
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid chunked body: {0}")]
    Chunked(#[from] ChunkedError),
    #[error("response body larger than the limit")]
    BodyTooLarge,
    #[error("response body unusable after an earlier error or cancelled read")]
    Aborted,
    /// An S3 upstream's request could not be signed, or S3 refused it
    /// (the origin's [`Signer`](super::Signer) failed it).
    #[error("S3: {0}")]
    S3(#[source] SignerError),
}

impl ClientError {
    /// Every label [`ClientError::kind`] can return, for pre-registering metrics.
    pub const KINDS: &'static [&'static str] = &[
        "request",
        "dns",
        "connect",
        "tls",
        "timeout",
        "reset",
        "io",
        "protocol",
        "too_large",
        "aborted",
        "auth",
    ];

    /// Fixed, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::InvalidRequest(_) => "request",
            ClientError::Dns(_) => "dns",
            ClientError::Connect(_) => "connect",
            ClientError::Tls(_) => "tls",
            ClientError::DnsTimeout
            | ClientError::ConnectTimeout
            | ClientError::FirstByteTimeout
            | ClientError::IdleTimeout => "timeout",
            ClientError::ConnectionClosed => "reset",
            ClientError::Io(e) if is_disconnect(e) => "reset",
            ClientError::Io(_) => "io",
            ClientError::Protocol(_) | ClientError::HeadTooLarge | ClientError::Chunked(_) => {
                "protocol"
            }
            ClientError::BodyTooLarge => "too_large",
            ClientError::Aborted => "aborted",
            ClientError::S3(e) if e.is_bad_request() => "request",
            ClientError::S3(_) => "auth",
        }
    }

    /// The request could not be built or sent as asked (a byte or a size
    /// the client refuses, a path S3 cannot take): the request's fault,
    /// never the upstream's. Such an error must not count against the
    /// upstream's health (cooldown, failure counters).
    pub fn is_request_fault(&self) -> bool {
        self.kind() == "request"
    }

    pub fn is_timeout(&self) -> bool {
        self.kind() == "timeout"
    }

    /// Whether another upstream might well succeed where this one failed.
    /// False for faults in the request itself or in the content.
    pub fn retry_elsewhere(&self) -> bool {
        !matches!(
            self,
            ClientError::InvalidRequest(_) | ClientError::BodyTooLarge | ClientError::Aborted
        ) && !matches!(self, ClientError::S3(e) if e.is_bad_request())
    }
}
