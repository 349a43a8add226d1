//! An upstream's base URL, parsed once at config time into everything the
//! per-request path needs precomputed (Host header, Authorization bytes,
//! TLS server name, pool key).

use std::fmt;
use std::net::Ipv6Addr;
use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::ServerName;

use super::Signer;

/// Why an upstream URL was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("URL must start with http:// or https://")]
    UnsupportedScheme,
    #[error("URL has no host")]
    MissingHost,
    #[error("invalid host in URL")]
    InvalidHost,
    #[error("invalid port in URL")]
    InvalidPort,
    #[error("credentials in the URL are not supported; configure basic auth separately")]
    UserInfo,
    #[error("query strings and fragments are not allowed in an upstream base URL")]
    QueryOrFragment,
    #[error("invalid character in URL path")]
    InvalidPath,
    #[error("basic auth user must be non-empty and contain no ':' or control characters")]
    InvalidCredentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A parsed upstream base URL. Immutable and `Send + Sync`, so it can live
/// in snapshots shared by all workers.
#[derive(Clone)]
pub struct Origin {
    scheme: Scheme,
    /// Lower-cased, without IPv6 brackets: what the resolver and SNI take.
    host: Box<str>,
    port: u16,
    /// Empty or `/segment...` without a trailing slash.
    prefix: Box<str>,
    host_header: Box<[u8]>,
    /// Complete header value, `Basic <base64>`.
    authorization: Option<Box<[u8]>>,
    /// `Some` whenever the host is a valid TLS name; required for https.
    server_name: Option<ServerName<'static>>,
    /// `scheme://host:port`: idle connections are shared per key, so two
    /// origins that differ only in path prefix or credentials share them.
    key: Arc<str>,
    /// Set for S3 upstreams: every request is presigned ([`Signer`]).
    signer: Option<Arc<dyn Signer>>,
}

impl Origin {
    /// Parses `http[s]://host[:port][/prefix]`. `basic_auth` is
    /// `(user, password)`; the password may be absent.
    pub fn parse(
        url: &str,
        basic_auth: Option<(&str, Option<&str>)>,
    ) -> Result<Origin, OriginError> {
        let (scheme, rest) = split_scheme(url)?;
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(OriginError::UserInfo);
        }
        let (host, bracketed, port) = split_authority(authority, scheme)?;
        let prefix = parse_prefix(path)?;

        let server_name = ServerName::try_from(host.clone()).ok();
        if scheme == Scheme::Https && server_name.is_none() {
            return Err(OriginError::InvalidHost);
        }
        let mut host_header = if bracketed {
            format!("[{host}]")
        } else {
            host.clone()
        };
        if port != scheme.default_port() {
            host_header.push_str(&format!(":{port}"));
        }
        let key: Arc<str> = Arc::from(format!(
            "{}://{}",
            scheme.as_str(),
            authority_with_port(&host, bracketed, port)
        ));
        Ok(Origin {
            scheme,
            host: host.into_boxed_str(),
            port,
            prefix: prefix.into(),
            host_header: host_header.into_bytes().into_boxed_slice(),
            authorization: basic_auth.map(basic_header).transpose()?,
            server_name,
            key,
            signer: None,
        })
    }

    /// This origin with its requests signed by `signer`.
    pub fn with_signer(self, signer: Arc<dyn Signer>) -> Origin {
        Origin {
            signer: Some(signer),
            ..self
        }
    }

    pub fn signer(&self) -> Option<&Arc<dyn Signer>> {
        self.signer.as_ref()
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Https
    }

    /// Host as given to the resolver: no brackets around IPv6 literals.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path prefix prepended to every request path (may be empty).
    pub fn path_prefix(&self) -> &str {
        &self.prefix
    }

    /// Value of the `Host` header sent to this origin.
    pub fn host_header(&self) -> &[u8] {
        &self.host_header
    }

    /// Value of the `Authorization` header, when basic auth is configured.
    pub fn authorization(&self) -> Option<&[u8]> {
        self.authorization.as_deref()
    }

    pub(crate) fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// Connection pool key: `scheme://host:port`.
    pub fn pool_key(&self) -> &Arc<str> {
        &self.key
    }
}

/// Shows the URL without credentials, so it is safe to log.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(signer) = &self.signer {
            return f.write_str(signer.url());
        }
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            String::from_utf8_lossy(&self.host_header),
            self.prefix
        )
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("url", &self.to_string())
            .field("basic_auth", &self.authorization.is_some())
            .field("s3", &self.signer)
            .finish()
    }
}

fn split_scheme(url: &str) -> Result<(Scheme, &str), OriginError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or(OriginError::UnsupportedScheme)?;
    if scheme.eq_ignore_ascii_case("http") {
        Ok((Scheme::Http, rest))
    } else if scheme.eq_ignore_ascii_case("https") {
        Ok((Scheme::Https, rest))
    } else {
        Err(OriginError::UnsupportedScheme)
    }
}

/// Returns (host without brackets, was bracketed, port).
fn split_authority(authority: &str, scheme: Scheme) -> Result<(String, bool, u16), OriginError> {
    if authority.is_empty() {
        return Err(OriginError::MissingHost);
    }
    let (host, bracketed, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(OriginError::InvalidHost)?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| OriginError::InvalidHost)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(OriginError::InvalidHost)?),
        };
        (v6, true, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, false, Some(p)),
            None => (authority, false, None),
        }
    };
    if host.is_empty() {
        return Err(OriginError::MissingHost);
    }
    if !bracketed
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(OriginError::InvalidHost);
    }
    let port = match port {
        None => scheme.default_port(),
        Some(p) => parse_port(p)?,
    };
    Ok((host.to_ascii_lowercase(), bracketed, port))
}

fn parse_port(p: &str) -> Result<u16, OriginError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OriginError::InvalidPort);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(OriginError::InvalidPort),
        Ok(n) => Ok(n),
    }
}

fn parse_prefix(path: &str) -> Result<String, OriginError> {
    if path.contains(['?', '#']) {
        return Err(OriginError::QueryOrFragment);
    }
    if !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(OriginError::InvalidPath);
    }
    Ok(path.trim_end_matches('/').to_owned())
}

fn authority_with_port(host: &str, bracketed: bool, port: u16) -> String {
    if bracketed {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn basic_header((user, password): (&str, Option<&str>)) -> Result<Box<[u8]>, OriginError> {
    let bad = |s: &str| s.chars().any(char::is_control);
    if user.is_empty() || user.contains(':') || bad(user) || password.is_some_and(bad) {
        return Err(OriginError::InvalidCredentials);
    }
    let plain = format!("{user}:{}", password.unwrap_or(""));
    let encoded = base64::engine::general_purpose::STANDARD.encode(plain);
    Ok(format!("Basic {encoded}").into_bytes().into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Origin, OriginError> {
        Origin::parse(url, None)
    }

    #[test]
    fn plain_http_with_defaults() {
        let o = parse("http://Cache.Example.org").expect("valid");
        assert!(!o.is_tls());
        assert_eq!(o.host(), "cache.example.org");
        assert_eq!(o.port(), 80);
        assert_eq!(o.path_prefix(), "");
        assert_eq!(o.host_header(), b"cache.example.org");
        assert_eq!(&**o.pool_key(), "http://cache.example.org:80");
        assert_eq!(o.to_string(), "http://cache.example.org");
    }

    #[test]
    fn https_with_port_and_prefix() {
        let o = parse("HTTPS://h.example:8443/nix/cache/").expect("valid");
        assert!(o.is_tls());
        assert_eq!(o.port(), 8443);
        assert_eq!(o.path_prefix(), "/nix/cache");
        assert_eq!(o.host_header(), b"h.example:8443");
        assert!(o.server_name().is_some());
    }

    #[test]
    fn default_port_is_not_in_host_header() {
        assert_eq!(parse("https://h:443").expect("valid").host_header(), b"h");
        assert_eq!(parse("http://h:80/").expect("valid").host_header(), b"h");
        assert_eq!(
            parse("http://h:443").expect("valid").host_header(),
            b"h:443"
        );
    }

    #[test]
    fn ip_literals() {
        let v4 = parse("http://127.0.0.1:8080/p").expect("v4");
        assert_eq!(v4.host(), "127.0.0.1");
        assert_eq!(v4.host_header(), b"127.0.0.1:8080");
        let v6 = parse("http://[::1]:5000").expect("v6");
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.host_header(), b"[::1]:5000");
        assert_eq!(&**v6.pool_key(), "http://[::1]:5000");
        let v6tls = parse("https://[::1]").expect("v6 tls");
        assert_eq!(v6tls.host_header(), b"[::1]");
        assert!(v6tls.server_name().is_some());
    }

    #[test]
    fn trailing_slashes_are_dropped() {
        assert_eq!(parse("http://h/").expect("valid").path_prefix(), "");
        assert_eq!(parse("http://h/p//").expect("valid").path_prefix(), "/p");
    }

    #[test]
    fn basic_auth_header() {
        let o = Origin::parse("http://h", Some(("Aladdin", Some("open sesame")))).expect("valid");
        assert_eq!(
            o.authorization(),
            Some(&b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="[..])
        );
        let no_pass = Origin::parse("http://h", Some(("u", None))).expect("valid");
        assert_eq!(no_pass.authorization(), Some(&b"Basic dTo="[..]));
        assert!(
            !format!("{o:?}").contains("QWxh"),
            "Debug hides credentials"
        );
        assert!(parse("http://h").expect("valid").authorization().is_none());
    }

    #[test]
    fn rejects_bad_urls() {
        let cases = [
            ("ftp://h", OriginError::UnsupportedScheme),
            ("h:80", OriginError::UnsupportedScheme),
            ("http://", OriginError::MissingHost),
            ("http:///p", OriginError::MissingHost),
            ("http://:80", OriginError::MissingHost),
            ("http://h:", OriginError::InvalidPort),
            ("http://h:0", OriginError::InvalidPort),
            ("http://h:65536", OriginError::InvalidPort),
            ("http://h:8x", OriginError::InvalidPort),
            ("http://h:+80", OriginError::InvalidPort),
            ("http://u:p@h", OriginError::UserInfo),
            ("http://h/?priority=40", OriginError::QueryOrFragment),
            ("http://h#x", OriginError::QueryOrFragment),
            ("http://h/a b", OriginError::InvalidPath),
            ("http://h\r\nX: y", OriginError::InvalidHost),
            ("http://[::1", OriginError::InvalidHost),
            ("http://[nothex]", OriginError::InvalidHost),
            ("http://[::1]x", OriginError::InvalidHost),
            ("http://h%41", OriginError::InvalidHost),
            ("https://-bad-.example", OriginError::InvalidHost),
        ];
        for (url, want) in cases {
            assert_eq!(parse(url).map(|_| ()), Err(want), "{url}");
        }
        let creds = [("", None), ("a:b", None), ("a", Some("x\ny"))];
        for c in creds {
            assert_eq!(
                Origin::parse("http://h", Some(c)).map(|_| ()),
                Err(OriginError::InvalidCredentials)
            );
        }
    }

    #[test]
    fn origin_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Origin>();
    }
}
