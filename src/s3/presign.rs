//! HOT: SigV4 query-string presigning of one GET or HEAD, on the worker.
//!
//! The signature goes into the query (`X-Amz-Signature`, `SignedHeaders=host`),
//! so nothing but the request line changes: the client still sends its own
//! `Host`, `Range` and conditional headers, and S3 ignores unsigned ones.
//! Signing is pure hashing over the credentials snapshot (no SDK runtime,
//! no identity cache, no tokio), so a worker never waits for it.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    sign, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use super::{CredentialCell, Endpoint, S3Error};
use crate::config::s3::S3Url;
use crate::http::client::Method;

/// How long a presigned request stays valid. It is sent at once and never
/// leaves ncro, so the window only has to absorb clock skew between ncro
/// and the S3 service (S3 itself refuses more than 15 minutes ahead).
pub const PRESIGN_EXPIRY: Duration = Duration::from_secs(3600);

/// Presigns requests for one S3 upstream. Shared by every worker (inside
/// the upstream's [`Origin`](crate::http::client::Origin)).
pub struct Presigner {
    /// The configured `s3://` URL: the upstream's identity in logs.
    url: Arc<str>,
    region: String,
    profile: Option<String>,
    /// Value of the `Host` header the client sends, which is what is signed.
    host: String,
    /// `scheme://host[:port]`, to build the URL that is signed.
    base: String,
    key_prefix: String,
    creds: Arc<CredentialCell>,
    /// Generation of the newest credentials S3 answered with a 2xx (0: none
    /// yet): only then is a bare 403 trusted to mean "no such key".
    confirmed: AtomicU64,
    expiry: Duration,
}

/// A presigned request target and the credentials generation it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Path and query for the request line: `/bucket/key?X-Amz-...`.
    pub target: String,
    pub generation: u64,
}

impl Presigner {
    pub fn new(
        configured: &str,
        url: &S3Url,
        endpoint: &Endpoint,
        host: String,
        creds: Arc<CredentialCell>,
    ) -> Presigner {
        Presigner {
            url: Arc::from(configured),
            region: url.region.clone(),
            profile: url.profile.clone(),
            host,
            base: endpoint.base.clone(),
            key_prefix: endpoint.key_prefix.clone(),
            creds,
            confirmed: AtomicU64::new(0),
            expiry: PRESIGN_EXPIRY,
        }
    }

    /// The same presigner with another validity window (tests use AWS's
    /// published example, signed for a day).
    pub fn with_expiry(self, expiry: Duration) -> Presigner {
        Presigner { expiry, ..self }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    pub fn credentials(&self) -> &Arc<CredentialCell> {
        &self.creds
    }

    /// Presigns `method path` at `now`. A query in `path` is dropped: S3
    /// reads sub-resources (`?acl`, `?versionId=`) from it, and clients
    /// must not reach those with ncro's credentials.
    pub fn presign(&self, method: Method, path: &str, now: SystemTime) -> Result<Signed, S3Error> {
        let snap = self.creds.load().ok_or(S3Error::NoCredentials)?;
        if snap.expired(now) {
            return Err(S3Error::CredentialsExpired);
        }
        let key = path.split_once('?').map_or(path, |(p, _)| p);
        let mut target = String::with_capacity(self.key_prefix.len() + key.len() + 512);
        target.push_str(&self.key_prefix);
        encode_key_path(key, &mut target)?;
        let query = self.signature(&snap.identity, method, &target, now)?;
        for (i, (name, value)) in query.iter().enumerate() {
            target.push(if i == 0 { '?' } else { '&' });
            target.push_str(name);
            target.push('=');
            uri_encode(value.as_bytes(), false, &mut target);
        }
        Ok(Signed {
            target,
            generation: snap.generation,
        })
    }

    /// The `X-Amz-*` query parameters that sign `method` on the encoded
    /// key path `target` (bucket prefix included).
    fn signature(
        &self,
        identity: &Identity,
        method: Method,
        target: &str,
        now: SystemTime,
    ) -> Result<Vec<(&'static str, Cow<'static, str>)>, S3Error> {
        let sign_err = |e: &dyn fmt::Display| S3Error::Sign(e.to_string());
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(self.expiry);
        // S3 signs the path exactly as sent: encoded once, not normalised.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.region)
            .name("s3")
            .time(now)
            .settings(settings)
            .build()
            .map_err(|e| sign_err(&e))?
            .into();
        let method = match method {
            Method::Get => "GET",
            Method::Head => "HEAD",
        };
        let url = format!("{}{target}", self.base);
        let host = std::iter::once(("host", self.host.as_str()));
        let request = SignableRequest::new(method, url, host, SignableBody::UnsignedPayload)
            .map_err(|e| sign_err(&e))?;
        let (instructions, _) = sign(request, &params)
            .map_err(|e| sign_err(&e))?
            .into_parts();
        Ok(instructions.into_parts().1)
    }

    /// S3 answered a request signed with `generation` with a 2xx.
    pub(super) fn confirm(&self, generation: u64) {
        self.confirmed.fetch_max(generation, Ordering::Relaxed);
    }

    /// `nix-cache-info` exists in every Nix cache, so a 403 for it means the
    /// credentials (or their policy) stopped working.
    pub(super) fn unconfirm(&self, generation: u64) {
        // Fails harmlessly when newer credentials were confirmed meanwhile.
        let _ =
            self.confirmed
                .compare_exchange(generation, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(super) fn is_confirmed(&self, generation: u64) -> bool {
        generation != 0 && self.confirmed.load(Ordering::Relaxed) == generation
    }
}

impl fmt::Debug for Presigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presigner")
            .field("url", &self.url)
            .field("base", &self.base)
            .field("key_prefix", &self.key_prefix)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Appends the S3 key path for a request path: percent-decoded, then
/// encoded once the way SigV4 canonicalises it, so what is signed and what
/// is sent are the same bytes whatever escaping the client used. Dot
/// segments are refused rather than passed to a store that might resolve
/// them.
pub fn encode_key_path(path: &str, out: &mut String) -> Result<(), S3Error> {
    let decoded = percent_decode(path.as_bytes()).ok_or(S3Error::BadPath)?;
    if !decoded.starts_with(b"/")
        || decoded
            .split(|&b| b == b'/')
            .any(|seg| seg == b"." || seg == b"..")
    {
        return Err(S3Error::BadPath);
    }
    uri_encode(&decoded, true, out);
    Ok(())
}

/// AWS `UriEncode`: every byte but `A-Za-z0-9-._~` (and `/` in paths)
/// becomes `%XX` with upper-case hex.
fn uri_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            // Two ASCII hex digits: always valid UTF-8 and always a byte.
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}
