//! Origins whose requests are signed, and whose refusals are vetted, by a
//! layer above the client: S3 upstreams (`crate::s3::Presigner`). The
//! client knows only this trait and error type, so it depends on nothing
//! above it; [`LocalClient::send`] hands requests to an origin's signer,
//! which sends them with [`LocalClient::send_plain`].

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use super::{ClientError, LocalClient, Origin, Request, Response};

/// The future of [`Signer::send`]; not `Send`, like the client.
pub type SignedSend<'a> = Pin<Box<dyn Future<Output = Result<Response, ClientError>> + 'a>>;

/// Signs an origin's requests and vets its answers (see the module docs).
pub trait Signer: fmt::Debug + Send + Sync {
    /// The origin's identity in logs (the configured URL), shown instead
    /// of the endpoint it sends to.
    fn url(&self) -> &str;

    /// Signs `req`, sends it to `origin` with `client` and vets the answer.
    fn send<'a>(
        &'a self,
        client: &'a LocalClient,
        origin: &'a Origin,
        req: &'a Request<'a>,
    ) -> SignedSend<'a>;
}

/// Why a [`Signer`] failed a request: it could not sign it, or the origin
/// refused it. Shows as the signer's own error, whose sources it keeps.
#[derive(Debug)]
pub struct SignerError {
    error: Box<dyn Error + Send + Sync>,
    bad_request: bool,
}

impl SignerError {
    /// `bad_request`: the request itself cannot be signed (a path that is
    /// no valid key), a fault of the request rather than of the origin.
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>, bad_request: bool) -> SignerError {
        SignerError {
            error: error.into(),
            bad_request,
        }
    }

    pub fn is_bad_request(&self) -> bool {
        self.bad_request
    }

    /// The signer's error, e.g. to downcast it.
    pub fn get_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl fmt::Display for SignerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl Error for SignerError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.error.source()
    }
}
