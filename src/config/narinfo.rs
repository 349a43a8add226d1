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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::env::MapEnv;
    use crate::config::{Config, Source};

    fn load(text: &str) -> Result<Config, ConfigError> {
        let env = MapEnv::new(&[("HOME", "/home/t")]);
        Config::from_toml(text, Source::Embedded, "test.toml", &env)
    }

    fn message(text: &str) -> String {
        load(text).expect_err("config must be refused").to_string()
    }

    #[test]
    fn defaults() {
        let c = load("").unwrap();
        assert!(c.fallback_cache.is_none(), "disabled by default");
        assert!(c.raw.server.want_mass_query);
        assert_eq!(c.cache.resolution_policy, ResolutionPolicy::Hedged);
        assert_eq!(c.cache.unavailable_answer, UnavailableAnswer::BadGateway);
        assert_eq!(c.upstreams[0].narinfo_timeout, None);
    }

    #[test]
    fn fallback_takes_the_nixos_defaults_when_enabled() {
        let c = load("[fallback_cache]\nenabled = true\n").unwrap();
        let f = c.fallback_cache.expect("enabled");
        assert_eq!(f.url, "https://cache.nixos.org");
        assert_eq!(f.public_keys, vec![NIXOS_KEY.to_owned()]);
        assert_eq!(f.narinfo_timeout, None);
    }

    #[test]
    fn fallback_is_checked_only_when_enabled_and_errors_name_it() {
        // A missing password file does not matter while disabled.
        let off = "[fallback_cache]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n";
        assert!(load(off).is_ok());
        let on = format!("{off}enabled = true\n");
        let m = message(&on);
        assert!(m.starts_with("fallback_cache: password_file"), "{m}");
        let m = message("[fallback_cache]\nenabled = true\nurl = \"ftp://x\"\n");
        assert!(m.starts_with("fallback_cache: invalid URL"), "{m}");
        let m = message("[fallback_cache]\nenabled = true\nurl = \"s3://bucket\"\n");
        assert!(m.contains("s3:// URLs are not supported"), "{m}");
        let m = message("[fallback_cache]\nenabled = true\nnarinfo_timeout = \"0s\"\n");
        assert!(
            m.contains("fallback_cache.narinfo_timeout must be positive"),
            "{m}"
        );
        let m = message("[fallback_cache]\nenabled = true\npriority = 5\n");
        assert!(m.contains("unknown field `priority`"), "{m}");
    }

    #[test]
    fn narinfo_timeout_per_upstream() {
        let c = load("[[upstreams]]\nurl = \"http://a\"\nnarinfo_timeout = \"750ms\"\n").unwrap();
        assert_eq!(
            c.upstreams[0].narinfo_timeout,
            Some(Duration::from_millis(750))
        );
        let m = message("[[upstreams]]\nurl = \"http://a\"\nnarinfo_timeout = \"0s\"\n");
        assert!(
            m.contains("upstream[0].narinfo_timeout must be positive"),
            "{m}"
        );
    }

    #[test]
    fn policy_and_unavailable_answer_spellings() {
        let c = load("[cache]\nresolution_policy = \"strict\"\nunavailable_answer = \"404\"\n")
            .unwrap();
        assert_eq!(c.cache.resolution_policy, ResolutionPolicy::Strict);
        assert_eq!(c.cache.unavailable_answer, UnavailableAnswer::NotFound);
        let c = load("[cache]\nunavailable_answer = 404\n").unwrap();
        assert_eq!(c.cache.unavailable_answer, UnavailableAnswer::NotFound);
        let c = load("[cache]\nunavailable_answer = 502\n").unwrap();
        assert_eq!(c.cache.unavailable_answer, UnavailableAnswer::BadGateway);
        let m = message("[cache]\nunavailable_answer = \"503\"\n");
        assert!(m.contains("unavailable_answer must be"), "{m}");
        let m = message("[cache]\nresolution_policy = \"eager\"\n");
        assert!(m.contains("unknown variant `eager`"), "{m}");
        // The effective config renders back to something that loads.
        let c = load("[cache]\nunavailable_answer = \"404\"\n[server]\nwant_mass_query = false\n")
            .unwrap();
        let again = load(&c.render_effective()).unwrap();
        assert_eq!(again.cache.unavailable_answer, UnavailableAnswer::NotFound);
        assert!(!again.raw.server.want_mass_query);
    }
}
