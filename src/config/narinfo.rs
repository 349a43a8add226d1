//! Narinfo-side keys that ncro 2.2 did not have: `[fallback_cache]`, the
//! resolution policy between tiers and the answer to a partial outage
//! (docs/routing.md). Raw (serde) forms and their validation live here so
//! that `config.rs` only calls in.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::raw::{Dur, RawUpstream};
use super::{invalid, ConfigError, UpstreamConfig, UpstreamKind};

/// The key `cache.nixos.org-1` signs with: the fallback's default key.
pub const NIXOS_KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// `[fallback_cache]`: a last-resort cache asked only when no normal
/// upstream could give an answer. Same fields as an upstream that make
/// sense for a single, unranked, unfiltered cache.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawFallbackCache {
    pub enabled: bool,
    pub url: String,
    pub public_key: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public_keys: Vec<String>,
    pub username: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub narinfo_timeout: Option<Dur>,
}

impl Default for RawFallbackCache {
    fn default() -> Self {
        RawFallbackCache {
            enabled: false,
            url: "https://cache.nixos.org".into(),
            public_key: NIXOS_KEY.into(),
            public_keys: Vec::new(),
            username: String::new(),
            password: None,
            password_file: None,
            tls_ca_file: None,
            narinfo_timeout: None,
        }
    }
}

/// `cache.resolution_policy`: when a lower priority tier is asked.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResolutionPolicy {
    /// The next tier also starts once the current one is late (the hedge
    /// delay, capped by `health.hedge_after`).
    #[default]
    Hedged,
    /// The next tier starts only after every member of the current one
    /// has answered (a miss, a failure, or its deadline).
    Strict,
}

/// `cache.unavailable_answer`: the status of a lookup that found nothing
/// while some upstream could not be asked. Written `"502"` or `"404"`
/// (a bare integer is accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnavailableAnswer {
    /// 502 (504 when only deadlines passed): Nix does not cache it.
    #[default]
    BadGateway,
    /// 404, remembered by ncro only for the in-memory negative TTL.
    NotFound,
}

impl fmt::Display for UnavailableAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnavailableAnswer::BadGateway => "502",
            UnavailableAnswer::NotFound => "404",
        })
    }
}

impl<'de> Deserialize<'de> for UnavailableAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Spelled {
            Text(String),
            Number(i64),
        }
        let text = match Spelled::deserialize(d)? {
            Spelled::Text(s) => s,
            Spelled::Number(n) => n.to_string(),
        };
        match text.trim() {
            "502" => Ok(UnavailableAnswer::BadGateway),
            "404" => Ok(UnavailableAnswer::NotFound),
            other => Err(serde::de::Error::custom(format!(
                "cache.unavailable_answer must be \"502\" or \"404\", got {other:?}"
            ))),
        }
    }
}

impl Serialize for UnavailableAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The fallback cache as an upstream (`None` unless enabled). Its
/// password file and keys are only read and checked when it is enabled.
pub fn validate_fallback(
    f: &RawFallbackCache,
    check: impl FnOnce(&RawUpstream) -> Result<UpstreamConfig, ConfigError>,
) -> Result<Option<UpstreamConfig>, ConfigError> {
    if !f.enabled {
        return Ok(None);
    }
    let as_upstream = RawUpstream {
        url: f.url.clone(),
        public_key: f.public_key.clone(),
        public_keys: f.public_keys.clone(),
        username: f.username.clone(),
        password: f.password.clone(),
        password_file: f.password_file.clone(),
        tls_ca_file: f.tls_ca_file.clone(),
        narinfo_timeout: f.narinfo_timeout,
        ..RawUpstream::default()
    };
    // The upstream checks name the entry `upstream[0]`; say which it is.
    let u = check(&as_upstream).map_err(|e| match e {
        ConfigError::Invalid(m) => invalid(m.replacen("upstream[0]", "fallback_cache", 1)),
        other => other,
    })?;
    if matches!(u.kind, UpstreamKind::S3(_)) {
        return Err(invalid(
            "fallback_cache: s3:// URLs are not supported for the fallback cache; use an http(s) URL",
        ));
    }
    Ok(Some(u))
}
