//! Raw (serde) forms of the narinfo-side keys that ncro 2.2 did not have:
//! `[fallback_cache]`, `cache.resolution_policy`, `cache.unavailable_answer`
//! (validated in `config::narinfo`; docs/routing.md).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Dur;

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
    /// Idle timeout of its NAR stream (absent: `timeouts.idle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nar_timeout: Option<Dur>,
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
            nar_timeout: None,
        }
    }
}

/// `cache.resolution_policy`: when a lower priority tier is asked.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResolutionPolicy {
    /// The next tier also starts once the current one is late (its own
    /// hedge delay, capped by `health.hedge_after`).
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
