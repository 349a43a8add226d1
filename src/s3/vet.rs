//! HOT: what an S3 answer means for routing, decided before the caller
//! (race, NAR relay, probe) sees it.
//!
//! A 404 is a miss (unless the bucket itself is missing). A 403 is
//! ambiguous: AWS answers 403 `AccessDenied` for an absent key when the
//! credentials may not list the bucket, but Garage also answers 403
//! `AccessDenied` for a wrong secret key. So a 403 is a miss only once S3
//! has answered these very credentials with a 2xx, and never when its code
//! names a credential problem. A wrong key must give 502s, not sticky 404s.

use std::time::Duration;

use super::{Presigner, S3Error};
use crate::http::client::{ClientError, Method, Request, Response};

/// S3 error codes that say the request was not properly authenticated (or
/// the account or object cannot be used), as opposed to "no such key".
const CREDENTIAL_CODES: &[&str] = &[
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidObjectState",
    "InvalidSecurity",
    "InvalidToken",
    "NotSignedUp",
    "RequestTimeTooSkewed",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
];

/// Largest S3 error body read to find its code (they are a few hundred bytes).
const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// How long reading that body may take; on timeout the code is unknown.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The key is not there: pass the 403/404 on as a definite miss.
    Miss,
    /// S3 refused the request itself: transient for routing.
    Denied,
}

/// Classifies a 403 or 404 with its S3 error `code` (None: no body, as for
/// HEAD, or none found). `confirmed`: these credentials got a 2xx before.
pub fn classify(status: u16, code: Option<&str>, confirmed: bool) -> Verdict {
    match (status, code) {
        // Every key would be "missing": a configuration error, not a miss.
        (404, Some("NoSuchBucket")) => Verdict::Denied,
        (404, _) => Verdict::Miss,
        (403, Some(c)) if CREDENTIAL_CODES.contains(&c) => Verdict::Denied,
        (403, _) if confirmed => Verdict::Miss,
        _ => Verdict::Denied,
    }
}

/// The `<Code>` of an S3 XML error body, if it has a plausible one.
pub fn error_code(body: &[u8]) -> Option<&str> {
    let start = find(body, b"<Code>")? + b"<Code>".len();
    let len = find(&body[start..], b"</Code>")?;
    let code = std::str::from_utf8(&body[start..start + len]).ok()?.trim();
    let plausible =
        !code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric());
    plausible.then_some(code)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Vets `resp` to `req` (signed with credentials `generation`): passes
/// answers and misses through, turns refusals into [`S3Error::Denied`].
pub(super) async fn vet(
    p: &Presigner,
    mut resp: Response,
    req: &Request<'_>,
    generation: u64,
) -> Result<Response, ClientError> {
    let status = resp.status();
    if (200..300).contains(&status) || status == 304 {
        p.confirm(generation);
        return Ok(resp);
    }
    if status != 403 && status != 404 {
        return Ok(resp); // 5xx, 3xx, 412, 416...: the caller's rules apply
    }
    if status == 403 && req.path.split('?').next() == Some("/nix-cache-info") {
        p.unconfirm(generation);
    }
    let body = match req.method {
        Method::Get => read_error_body(&mut resp).await,
        Method::Head => None,
    };
    let code = body.as_deref().and_then(error_code);
    match classify(status, code, p.is_confirmed(generation)) {
        Verdict::Miss => Ok(resp),
        Verdict::Denied => {
            let code = code.unwrap_or("(no error code)").into();
            Err(S3Error::Denied { status, code }.into())
        }
    }
}

/// Reads a small error body to its end (which also returns the connection
/// to the pool); `None` when it is too large, broken or slow.
async fn read_error_body(resp: &mut Response) -> Option<Vec<u8>> {
    if resp
        .content_length()
        .is_some_and(|n| n > ERROR_BODY_LIMIT as u64)
    {
        return None;
    }
    let read = async {
        let mut body = Vec::new();
        while let Some(piece) = resp.read_chunk().await.ok()? {
            if body.len() + piece.len() > ERROR_BODY_LIMIT {
                return None;
            }
            body.extend_from_slice(piece);
        }
        Some(body)
    };
    monoio::time::timeout(ERROR_BODY_WAIT, read)
        .await
        .ok()
        .flatten()
}
