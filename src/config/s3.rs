//! `s3://bucket?endpoint=..&scheme=..&region=..&profile=..&addressing-style=..`
//! upstream URLs, with ncro 2.2's defaults. Unknown parameters are an error
//! (ncro 2.2 ignored them, hiding typos), except the upload parameters of a
//! URL copied from `nix copy --to` ([`UPLOAD_ONLY`]), which are accepted,
//! listed in [`S3Url::upload_only`] and ignored (config warns).

/// `nix copy --to s3://..` parameters that only matter when writing to the
/// bucket; ncro only reads, so they are accepted and ignored.
pub const UPLOAD_ONLY: [&str; 10] = [
    "compression",
    "secret-key",
    "parallel-compression",
    "multipart-upload",
    "write-nar-listing",
    "ls-compression",
    "log-compression",
    "narinfo-compression",
    "index-debug-info",
    "buffer-size",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    Auto,
    Path,
    Virtual,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// host[:port] of an S3-compatible service.
    pub endpoint: Option<String>,
    pub scheme: String,
    pub region: String,
    pub profile: Option<String>,
    pub addressing: Addressing,
    /// Upload-only parameters present in the URL (ignored), in URL order.
    pub upload_only: Vec<String>,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("s3 upstream {url:?}: not an s3:// URL"))?;
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = bucket.trim_end_matches('/');
        if bucket.is_empty() {
            return Err(format!("s3 upstream {url:?}: missing bucket name"));
        }
        if bucket.contains('/') {
            return Err(format!(
                "s3 upstream {url:?}: key prefixes are not supported (bucket {bucket:?})"
            ));
        }
        let mut s = S3Url {
            bucket: bucket.to_owned(),
            endpoint: None,
            scheme: "https".into(),
            region: "us-east-1".into(),
            profile: None,
            addressing: Addressing::Auto,
            upload_only: Vec::new(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)
                .ok_or_else(|| format!("s3 upstream {url:?}: bad percent-encoding in {k}"))?;
            match k {
                "endpoint" => {
                    if v.contains("://") {
                        return Err(format!("s3 upstream {url:?}: endpoint must be host[:port] without a scheme; use scheme=http|https"));
                    }
                    if v.is_empty() || v.contains(['/', '?', '#', '@']) {
                        return Err(format!("s3 upstream {url:?}: endpoint must be host[:port], got {v:?}"));
                    }
                    s.endpoint = Some(v)
                }
                "scheme" if v == "http" || v == "https" => s.scheme = v,
                "scheme" => return Err(format!("s3 upstream {url:?}: unsupported scheme {v:?} (http or https)")),
                "region" if !v.is_empty() => s.region = v,
                "region" => return Err(format!("s3 upstream {url:?}: empty region")),
                "profile" => s.profile = Some(v).filter(|p| !p.is_empty()),
                "addressing-style" => {
                    s.addressing = match v.as_str() {
                        "auto" => Addressing::Auto,
                        "path" => Addressing::Path,
                        "virtual" => Addressing::Virtual,
                        _ => return Err(format!("s3 upstream {url:?}: unsupported addressing-style {v:?}")),
                    }
                }
                k if UPLOAD_ONLY.contains(&k) => {
                    if !s.upload_only.iter().any(|p| p == k) {
                        s.upload_only.push(k.to_owned());
                    }
                }
                other => {
                    return Err(format!(
                        "s3 upstream {url:?}: unknown parameter {other:?} (known: endpoint, scheme, region, profile, addressing-style; accepted and ignored as upload-only: {})",
                        UPLOAD_ONLY.join(", ")
                    ))
                }
            }
        }
        Ok(s)
    }

    /// Path-style requests: forced by `path`, or in `auto` when a custom
    /// endpoint is set or the bucket name contains a dot.
    pub fn path_style(&self) -> bool {
        match self.addressing {
            Addressing::Path => true,
            Addressing::Virtual => false,
            Addressing::Auto => self.endpoint.is_some() || self.bucket.contains('.'),
        }
    }

    /// `<scheme>://<endpoint>` when an endpoint is set.
    pub fn endpoint_url(&self) -> Option<String> {
        self.endpoint
            .as_ref()
            .map(|e| format!("{}://{}", self.scheme, e))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // from_str_radix alone would take "+f" as a hex number.
            let hex = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_params() {
        let s = S3Url::parse("s3://my-nix-cache").unwrap();
        assert_eq!(
            (s.region.as_str(), s.scheme.as_str(), s.path_style()),
            ("us-east-1", "https", false)
        );
        let s =
            S3Url::parse("s3://c?endpoint=minio.example.com&scheme=http&region=garage&profile=p")
                .unwrap();
        assert_eq!(s.endpoint_url().unwrap(), "http://minio.example.com");
        assert_eq!(s.profile.as_deref(), Some("p"));
        assert!(s.path_style());
        let s = S3Url::parse("s3://c?endpoint=e:3900&addressing-style=virtual").unwrap();
        assert!(!s.path_style());
        assert!(S3Url::parse("s3://my.cache").unwrap().path_style());
        assert!(S3Url::parse("s3://c?addressing-style=path")
            .unwrap()
            .path_style());
    }

    #[test]
    fn upload_only_parameters_are_listed_not_errors() {
        let s = S3Url::parse(
            "s3://c?compression=zstd&endpoint=e:1&secret-key=%2Fk&compression=xz&parallel-compression=true&multipart-upload=true&write-nar-listing=1&ls-compression=br&log-compression=br&narinfo-compression=xz&index-debug-info=true&buffer-size=8388608",
        )
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("e:1"));
        let mut want: Vec<&str> = UPLOAD_ONLY.to_vec();
        want.sort_unstable();
        let mut got: Vec<&str> = s.upload_only.iter().map(String::as_str).collect();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(s.upload_only[0], "compression", "URL order, no repeats");
        assert!(S3Url::parse("s3://c").unwrap().upload_only.is_empty());
        let err = S3Url::parse("s3://c?compresion=xz").unwrap_err();
        assert!(err.contains("unknown parameter \"compresion\""), "{err}");
        assert!(
            err.contains("upload-only: compression, secret-key"),
            "{err}"
        );
    }

    #[test]
    fn errors() {
        assert!(S3Url::parse("s3://")
            .unwrap_err()
            .contains("missing bucket name"));
        assert!(S3Url::parse("s3://b?addressing-style=odd")
            .unwrap_err()
            .contains("unsupported addressing-style"));
        assert!(S3Url::parse("s3://b?endpoit=x")
            .unwrap_err()
            .contains("unknown parameter \"endpoit\""));
        assert!(S3Url::parse("s3://b?endpoint=http://x")
            .unwrap_err()
            .contains("without a scheme"));
        for bad in ["", "h:1/p", "h?x", "u@h"] {
            let url = format!("s3://b?endpoint={}", bad.replace('?', "%3F"));
            let err = S3Url::parse(&url).unwrap_err();
            assert!(err.contains("endpoint must be host[:port]"), "{url}: {err}");
        }
        assert!(S3Url::parse("s3://b?region=%+f")
            .unwrap_err()
            .contains("bad percent-encoding"));
    }
}
