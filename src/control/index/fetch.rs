//! HTTP side of the summary refresh: where an advertised file lives, and
//! one conditional GET with a size limit. COLD (control thread).

use bytes::Bytes;

use crate::http::client::{LocalClient, Origin, Request};
use crate::index::RefreshErrorKind;

/// A refresh failure: its metric kind and a message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct RefreshError {
    pub kind: RefreshErrorKind,
    pub what: String,
}

impl RefreshError {
    pub fn new(kind: RefreshErrorKind, what: impl Into<String>) -> RefreshError {
        RefreshError {
            kind,
            what: what.into(),
        }
    }
}

/// A file an upstream points at: on the upstream itself (its path prefix
/// and credentials apply) or at an absolute URL elsewhere.
#[derive(Debug, Clone)]
pub enum Location {
    /// Relative to the cache root; starts with `/`.
    Upstream(String),
    /// An absolute URL: its own origin (never given the upstream's
    /// credentials) and the path on it.
    Elsewhere(Origin, String),
}

impl Location {
    /// A `nix-cache-info` value: an absolute `http(s)://` URL, or a path
    /// relative to the cache root (a leading `/` is read the same way, so
    /// a cache behind a path prefix keeps working).
    pub fn parse(value: &str) -> Result<Location, RefreshError> {
        let bad =
            |why: &str| RefreshError::new(RefreshErrorKind::Parse, format!("{value:?}: {why}"));
        if value.starts_with("http://") || value.starts_with("https://") {
            let after_scheme = value.find("://").map_or(0, |i| i + 3);
            let split = value[after_scheme..]
                .find('/')
                .map_or(value.len(), |i| i + after_scheme);
            let (base, path) = value.split_at(split);
            let origin = Origin::parse(base, None).map_err(|e| bad(&e.to_string()))?;
            let path = if path.is_empty() { "/" } else { path };
            return Ok(Location::Elsewhere(origin, path.to_owned()));
        }
        let rel = value.trim_start_matches('/');
        if rel.is_empty() || rel.contains("://") {
            return Err(bad("not a path"));
        }
        Ok(Location::Upstream(format!("/{rel}")))
    }

    /// The same directory, another file (`dir/name` for `dir/file`).
    pub fn sibling(&self, name: &str) -> Location {
        let join = |p: &str| match p.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/{name}"),
            None => format!("/{name}"),
        };
        match self {
            Location::Upstream(p) => Location::Upstream(join(p)),
            Location::Elsewhere(o, p) => Location::Elsewhere(o.clone(), join(p)),
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Location::Upstream(p) | Location::Elsewhere(_, p) => p,
        }
    }
}

/// What a GET brought back.
#[derive(Debug)]
pub enum Fetched {
    Body {
        bytes: Bytes,
        etag: Option<String>,
    },
    /// 304 to our `If-None-Match`.
    NotModified,
    /// 404 or 410.
    Missing,
}

/// GETs `loc` (from `upstream` when it is relative), conditional on
/// `etag`, reading at most `limit` bytes.
pub async fn get(
    client: &LocalClient,
    upstream: &Origin,
    loc: &Location,
    etag: Option<&str>,
    limit: usize,
) -> Result<Fetched, RefreshError> {
    let (origin, path) = match loc {
        Location::Upstream(p) => (upstream, p.as_str()),
        Location::Elsewhere(o, p) => (o, p.as_str()),
    };
    let cond;
    let headers: &[(&str, &[u8])] = match etag {
        Some(e) => {
            cond = [("If-None-Match", e.as_bytes())];
            &cond
        }
        None => &[],
    };
    let fetch = |e: &dyn std::fmt::Display| {
        RefreshError::new(RefreshErrorKind::Fetch, format!("GET {path}: {e}"))
    };
    let req = Request::get(path).with_headers(headers);
    let resp = client.send(origin, &req).await.map_err(|e| fetch(&e))?;
    match resp.status() {
        200 => {
            let etag = resp
                .header("ETag")
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned);
            match resp.read_to_end(limit).await {
                Ok(bytes) => Ok(Fetched::Body { bytes, etag }),
                Err(e) if e.kind() == "too_large" => Err(RefreshError::new(
                    RefreshErrorKind::TooLarge,
                    format!("GET {path}: over index.max_bytes ({limit})"),
                )),
                Err(e) => Err(fetch(&e)),
            }
        }
        304 if etag.is_some() => Ok(Fetched::NotModified),
        404 | 410 => Ok(Fetched::Missing),
        s => Err(RefreshError::new(
            RefreshErrorKind::Status,
            format!("GET {path}: status {s}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let p = |v: &str| Location::parse(v).map(|l| l.path().to_owned());
        assert_eq!(p("bloom-filter").unwrap(), "/bloom-filter");
        assert_eq!(p("/bloom-filter").unwrap(), "/bloom-filter");
        assert_eq!(p("a/b?x=1").unwrap(), "/a/b?x=1");
        assert!(matches!(
            Location::parse("https://cdn.example/f/bloom"),
            Ok(Location::Elsewhere(ref o, ref path)) if o.host() == "cdn.example" && path == "/f/bloom"
        ));
        assert_eq!(p("http://h:81").unwrap(), "/");
        assert!(Location::parse("").is_err());
        assert!(Location::parse("ftp://x/y").is_err());
        assert!(Location::parse("http://user@h/x").is_err());
        let m = Location::parse("/nix-cache-index/manifest.json").unwrap();
        assert_eq!(
            m.sibling("shards/3/root.idx").path(),
            "/nix-cache-index/shards/3/root.idx"
        );
        assert_eq!(Location::parse("m.json").unwrap().sibling("x").path(), "/x");
    }
}
