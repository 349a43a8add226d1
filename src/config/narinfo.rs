//! Narinfo-side keys that ncro 2.2 did not have: `[fallback_cache]`, the
//! resolution policy between tiers and the answer to a partial outage
//! (docs/routing.md). Their raw (serde) forms are in `raw::narinfo`; the
//! validation lives here so that `config.rs` only calls in.

pub use super::raw::narinfo::{RawFallbackCache, ResolutionPolicy, UnavailableAnswer, NIXOS_KEY};
use super::raw::RawUpstream;
use super::{invalid, ConfigError, UpstreamConfig, UpstreamKind};

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
        nar_timeout: f.nar_timeout,
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
