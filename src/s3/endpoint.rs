//! Where an S3 upstream's requests go: ncro 2.2's addressing rules
//! (path-style with a custom endpoint or a dotted bucket name, else
//! virtual-hosted) turned into a base URL and a key prefix.

use crate::config::s3::S3Url;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]` requests are sent to (and signed for).
    pub base: String,
    /// Put before every object key: `/bucket` for path-style requests,
    /// empty for virtual-hosted ones (the bucket is in the host name).
    pub key_prefix: String,
}

impl Endpoint {
    pub fn for_url(url: &S3Url) -> Endpoint {
        // Without an endpoint this is AWS itself, which is HTTPS only;
        // ncro 2.2 also ignored `scheme` there.
        let (scheme, host) = match &url.endpoint {
            Some(e) => (url.scheme.as_str(), e.clone()),
            None => ("https", aws_host(&url.region)),
        };
        if url.path_style() {
            Endpoint {
                base: format!("{scheme}://{host}"),
                key_prefix: format!("/{}", url.bucket),
            }
        } else {
            Endpoint {
                base: format!("{scheme}://{}.{host}", url.bucket),
                key_prefix: String::new(),
            }
        }
    }
}

/// AWS's regional S3 endpoint. The China partition lives under its own
/// domain; every other region under amazonaws.com.
fn aws_host(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("s3.{region}.amazonaws.com.cn")
    } else {
        format!("s3.{region}.amazonaws.com")
    }
}
