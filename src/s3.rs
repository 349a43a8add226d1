//! S3 upstreams (`s3://bucket?endpoint=..&region=..&profile=..`): COLD
//! credential refresh, HOT request presigning.
//!
//! A worker never waits on the AWS SDK. The credential provider chain
//! (env, shared files with `profile=`, web identity, ECS, IMDS) needs tokio
//! and does network and file I/O, so it runs on its own thread,
//! `ncro-s3-creds` ([`CredentialsThread`]), which keeps every S3 upstream's
//! credentials fresh and publishes them as an immutable snapshot
//! ([`CredentialCell`], one atomic load to read). A worker presigns each
//! GET/HEAD itself ([`Presigner`], SigV4 with the signature in the query
//! string, a few microseconds of hashing) and sends it with its own HTTP
//! client, so S3 bodies stream through the same relay, pools and timeouts
//! as any HTTP upstream. docs/s3.md has the why and the measurements.
//!
//! S3 answers are vetted before routing sees them ([`send`]): a 404 is a
//! miss; a 403 is a miss (S3 answers 403 for an absent key when the
//! credentials may not list the bucket) only once these credentials have
//! been seen to work, and never when its error code names a credential
//! problem. Everything else that is not an answer is an
//! [`S3Error`], which routing treats as transient (502, never cached).

mod credentials;
mod endpoint;
mod presign;
#[cfg(test)]
mod tests;
mod vet;

use std::sync::Arc;
use std::time::SystemTime;

pub use credentials::{CredentialCell, CredentialsThread};
pub use endpoint::Endpoint;
pub use presign::{Presigner, Signed, PRESIGN_EXPIRY};
pub use vet::{classify, error_code, Verdict};

use crate::config::s3::S3Url;
use crate::http::client::{
    ClientError, LocalClient, Origin, OriginError, Request, Response, SignedSend, Signer,
    SignerError,
};

/// Why an S3 request was not sent, or what S3 refused. All of these are
/// transient for routing: none says the object is absent.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("no credentials from the AWS provider chain yet")]
    NoCredentials,
    #[error("the credentials expired and have not been refreshed")]
    CredentialsExpired,
    #[error("cannot sign the request: {0}")]
    Sign(String),
    #[error("path cannot be an S3 key (bad percent-encoding or a dot segment)")]
    BadPath,
    /// A 403 that is not a miss, or a 404 for the bucket itself.
    #[error("S3 refused the request: {status} {code}")]
    Denied { status: u16, code: Box<str> },
    #[error("invalid S3 endpoint: {0}")]
    Endpoint(#[from] OriginError),
}

/// Everything but [`S3Error::BadPath`] is the origin's fault ("auth");
/// a path that cannot be a key is the request's ("request", not retried).
impl From<S3Error> for ClientError {
    fn from(e: S3Error) -> ClientError {
        let bad_request = matches!(e, S3Error::BadPath);
        ClientError::S3(SignerError::new(e, bad_request))
    }
}

/// The origin that workers and probes send `url`'s requests to: its
/// endpoint, with a presigner that reads `creds` (returned too, for the
/// credentials thread). `configured` is the upstream's identity (routes,
/// metrics, /health, logs).
pub fn origin(
    url: &S3Url,
    configured: &str,
    creds: Arc<CredentialCell>,
) -> Result<(Origin, Arc<Presigner>), S3Error> {
    let endpoint = Endpoint::for_url(url);
    let origin = Origin::parse(&endpoint.base, None)?;
    let host = String::from_utf8_lossy(origin.host_header()).into_owned();
    let presigner = Arc::new(Presigner::new(configured, url, &endpoint, host, creds));
    Ok((origin.with_signer(presigner.clone()), presigner))
}

impl Signer for Presigner {
    fn url(&self) -> &str {
        Presigner::url(self)
    }

    fn send<'a>(
        &'a self,
        client: &'a LocalClient,
        origin: &'a Origin,
        req: &'a Request<'a>,
    ) -> SignedSend<'a> {
        Box::pin(send(client, self, origin, req))
    }
}

/// Sends `req` to an S3 upstream: presigns it for `presigner`'s bucket,
/// sends it with the worker's client, then vets the answer (see the module
/// docs). Called by [`LocalClient::send`] for origins that carry a presigner
/// (through [`Signer::send`]).
pub(crate) async fn send(
    client: &LocalClient,
    presigner: &Presigner,
    origin: &Origin,
    req: &Request<'_>,
) -> Result<Response, ClientError> {
    let signed = presigner.presign(req.method, req.path, SystemTime::now())?;
    let presigned = Request {
        path: &signed.target,
        ..*req
    };
    let resp = client.send_plain(origin, &presigned).await?;
    vet::vet(presigner, resp, req, signed.generation).await
}
