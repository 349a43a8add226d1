//! Configuration: a TOML file (or the embedded default) parsed into
//! [`raw::RawConfig`], NCRO_* overrides applied, then validated into
//! [`Config`], the only type the rest of ncro sees.
//!
//! Every ncro 2.2 key is accepted with its meaning and default, so an
//! existing config.toml works unchanged. Unlike ncro 2.2, unknown keys are
//! an error naming the key and its line, and every value is validated.

pub mod compat;
mod dur;
pub mod env;
pub mod filter;
mod logging;
pub mod nar;
pub mod narinfo;
pub mod netrc;
pub mod peer;
pub mod precedence;
pub mod ranges;
pub mod raw;
pub mod s3;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use nar::{NarHedging, UpstreamNar};
use raw::RawConfig;
pub use raw::{AddressFamily, NarRelay};

use filter::FilterRule;
pub use logging::log_filter;
use logging::validate_logging;

/// The embedded default configuration (a real TOML file, compiled in).
pub const DEFAULT_TOML: &str = include_str!("config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Where the effective configuration came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub server: ServerConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub cache: CacheConfig,
    pub timeouts: TimeoutConfig,
    pub health: HealthConfig,
    pub logging: LoggingConfig,
    pub discovery: raw::RawDiscovery,
    pub mesh: raw::RawMesh,
    pub index: IndexConfig,
    /// `[fallback_cache]` as an upstream, when enabled (docs/routing.md).
    pub fallback_cache: Option<UpstreamConfig>,
    /// The merged raw form, for `check-config` output (secrets redacted there).
    pub raw: RawConfig,
    /// Problems that do not stop ncro (ignored keys, netrc overrides);
    /// `check-config` prints them, `serve` logs them at warn.
    pub warnings: Vec<String>,
    /// Which spelling wins where two name the same setting
    /// ([`precedence`]); printed by `check-config`, logged at info.
    pub precedence: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Normalised listen address (`:8080` -> `0.0.0.0:8080`); `None` when
    /// empty, which is only valid with socket activation.
    pub listen: Option<String>,
    pub cache_priority: i32,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// `None`: one worker per CPU in the affinity set.
    pub workers: Option<usize>,
    pub cpus: Option<Vec<usize>>,
    pub control_cpu: Option<usize>,
    pub nar_relay: NarRelay,
    /// Continue a NAR cut mid-stream from another upstream that proves it
    /// holds the same object (docs/nar-failover.md).
    pub nar_failover: bool,
    pub shutdown_grace: Duration,
    /// Open client connections across all workers; more are answered 503
    /// and closed. 0: no cap.
    pub max_connections: usize,
    /// Lame-duck time between SIGTERM and the drain (0: none).
    pub drain_delay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamKind {
    Http,
    S3(s3::S3Url),
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// As configured, minus a trailing slash; the upstream's identity in
    /// routes, metrics labels and /health.
    pub url: String,
    pub kind: UpstreamKind,
    pub priority: i32,
    /// Validated Nix public keys (`name:base64`), `public_key` first.
    pub public_keys: Vec<String>,
    /// Basic auth: (username, password).
    pub basic_auth: Option<(String, Option<String>)>,
    pub tls_ca_file: Option<PathBuf>,
    pub filters: Vec<FilterRule>,
    /// Total time for this upstream's narinfo request in a race.
    pub narinfo_timeout: Option<Duration>,
    /// `nar_url_mode` (docs/configuration.md, "NAR URLs").
    pub nar_url_mode: crate::proto::narinfo::NarUrlMode,
    /// `storage_url`, without a trailing slash.
    pub storage_url: Option<String>,
    /// NAR hedging and limits of this upstream.
    pub nar: UpstreamNar,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub db_path: String,
    pub max_entries: usize,
    /// Bytes of narinfo bodies kept in memory (`narinfo_memory_mb`).
    pub narinfo_memory: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub latency_alpha: f64,
    pub max_concurrent_races: u32,
    pub per_upstream_max_inflight: u32,
    pub in_memory_negative_ttl: Duration,
    pub upstream_cooldown: Duration,
    pub resolution_policy: narinfo::ResolutionPolicy,
    pub unavailable_answer: narinfo::UnavailableAnswer,
    pub nar_hedging: NarHedging,
    pub nar_ranges: ranges::NarRanges,
}

#[derive(Debug, Clone)]
pub struct TimeoutConfig {
    pub race_deadline: Duration,
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub enabled: bool,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub hedge_after: Duration,
    /// Early starts (docs/routing.md): budget in [0, 1] (0: off), window.
    pub early_start_budget: f64,
    pub early_start_window: Duration,
}

/// `[index]`, validated (docs/index-routing.md).
#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub enabled: bool,
    pub refresh_interval: Duration,
    pub max_age: Duration,
    pub max_bytes: usize,
    pub max_items: u64,
    /// Of the filters ncro builds (its own, and RFC 0195 indexes it reads).
    pub false_positive_rate: f64,
    pub publish: bool,
    pub publish_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
    /// `logging.timestamps`; also off when stdout is the journal.
    pub timestamps: bool,
}

impl Config {
    /// Loads `path` (or the embedded default when `None`), applies env
    /// overrides and validates.
    pub fn load(path: Option<&Path>, env: &dyn env::EnvLookup) -> Result<Config, ConfigError> {
        let (text, source) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                (text, Source::File(p.to_owned()))
            }
            None => (DEFAULT_TOML.to_owned(), Source::Embedded),
        };
        let name = match &source {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => "<embedded default>".to_owned(),
        };
        Self::from_toml(&text, source, &name, env)
    }

    pub fn from_toml(
        text: &str,
        source: Source,
        name: &str,
        env: &dyn env::EnvLookup,
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_owned(),
            message: e.to_string(),
        })?;
        let netrc = netrc::load(env);
        let precedence = precedence::report(&precedence::Inputs {
            file: &raw,
            env,
            netrc: netrc.as_ref(),
        });
        env::apply_overrides(&mut raw, env);
        let mut cfg = validate(raw, source, env, netrc.as_ref())?;
        cfg.precedence = precedence;
        Ok(cfg)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn render_effective(&self) -> String {
        let mut raw = self.raw.clone();
        raw.cache.db_path = Some(self.cache.db_path.clone());
        if raw.upstreams.is_none() {
            raw.upstreams = Some(raw_default_upstreams());
        }
        for u in raw.upstreams.iter_mut().flatten() {
            if u.password.is_some() {
                u.password = Some("<redacted>".into());
            }
        }
        if raw.fallback_cache.password.is_some() {
            raw.fallback_cache.password = Some("<redacted>".into());
        }
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn raw_default_upstreams() -> Vec<raw::RawUpstream> {
    let raw: RawConfig = toml::from_str(DEFAULT_TOML).expect("embedded default config parses");
    raw.upstreams
        .expect("embedded default config names upstreams")
}

fn validate(
    raw: RawConfig,
    source: Source,
    env: &dyn env::EnvLookup,
    netrc: Option<&netrc::Netrc>,
) -> Result<Config, ConfigError> {
    let mut warnings = compat::warnings(&raw);
    let server = validate_server(&raw.server)?;
    let raw_upstreams = raw.upstreams.clone().unwrap_or_else(raw_default_upstreams);
    if raw_upstreams.is_empty() {
        return Err(invalid("at least one upstream is required"));
    }
    let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw_upstreams.len());
    for (i, u) in raw_upstreams.iter().enumerate() {
        let v = validate_upstream(i, u, netrc, &mut warnings)?;
        if upstreams.iter().any(|o| o.url == v.url) {
            return Err(invalid(format!("upstream[{i}]: duplicate URL {:?}", v.url)));
        }
        upstreams.push(v);
    }
    let cache = validate_cache(&raw.cache, env)?;
    let r = &raw.timeouts;
    let timeouts = TimeoutConfig {
        race_deadline: positive("timeouts.race_deadline", r.race_deadline.0)?,
        connect: positive("timeouts.connect", r.connect.0)?,
        first_byte: positive("timeouts.first_byte", r.first_byte.0)?,
        idle: positive("timeouts.idle", r.idle.map_or(server.read_timeout, |d| d.0))?,
    };
    let h = &raw.health;
    let health = HealthConfig {
        enabled: h.enabled,
        probe_interval: positive("health.probe_interval", h.probe_interval.0)?,
        probe_timeout: positive("health.probe_timeout", h.probe_timeout.0)?,
        hedge_after: positive("health.hedge_after", h.hedge_after.0)?,
        early_start_budget: h.checked_early_start_budget().map_err(invalid)?,
        early_start_window: positive("health.early_start_window", h.early_start_window.0)?,
    };
    let logging = validate_logging(&raw.logging)?;
    validate_discovery(&raw.discovery)?;
    peer::validate_mesh(&raw.mesh)?;
    let index = validate_index(&raw.index)?;
    let fallback_cache = narinfo::validate_fallback(&raw.fallback_cache, |u| {
        validate_upstream(0, u, netrc, &mut warnings)
    })?;
    Ok(Config {
        source,
        server,
        upstreams,
        cache,
        timeouts,
        health,
        logging,
        discovery: raw.discovery.clone(),
        mesh: raw.mesh.clone(),
        index,
        fallback_cache,
        raw,
        warnings,
        precedence: Vec::new(),
    })
}

fn positive(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(format!("{key} must be positive")));
    }
    Ok(d)
}

/// `:8080` -> `0.0.0.0:8080`; empty -> None (socket activation).
pub fn normalize_listen(listen: &str) -> Option<String> {
    let l = listen.trim();
    if l.is_empty() {
        None
    } else if let Some(port) = l.strip_prefix(':') {
        Some(format!("0.0.0.0:{port}"))
    } else {
        Some(l.to_owned())
    }
}

fn validate_server(s: &raw::RawServer) -> Result<ServerConfig, ConfigError> {
    if s.cache_priority < 1 {
        return Err(invalid(format!(
            "server.cache_priority must be >= 1, got {}",
            s.cache_priority
        )));
    }
    let listen = normalize_listen(&s.listen);
    if let Some(l) = &listen {
        let (host, port) = l
            .rsplit_once(':')
            .ok_or_else(|| invalid(format!("server.listen {l:?}: expected HOST:PORT or :PORT")))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(invalid(format!(
                "server.listen {:?}: expected HOST:PORT or :PORT with a numeric port",
                s.listen
            )));
        }
    }
    let workers = match s.workers {
        None | Some(0) => None,
        Some(n) if n > 1024 => {
            return Err(invalid(format!("server.workers must be <= 1024, got {n}")))
        }
        Some(n) => Some(n),
    };
    if let Some(cpus) = &s.cpus {
        if cpus.is_empty() {
            return Err(invalid(
                "server.cpus must list at least one CPU (or be omitted)",
            ));
        }
        let mut sorted = cpus.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != cpus.len() {
            return Err(invalid("server.cpus lists a CPU twice"));
        }
        if let Some(n) = workers {
            if n != cpus.len() {
                return Err(invalid(format!(
                    "server.cpus lists {} CPUs but server.workers = {n}",
                    cpus.len()
                )));
            }
        }
    }
    Ok(ServerConfig {
        listen,
        cache_priority: s.cache_priority,
        read_timeout: positive("server.read_timeout", s.read_timeout.0)?,
        write_timeout: positive("server.write_timeout", s.write_timeout.0)?,
        workers,
        cpus: s.cpus.clone(),
        control_cpu: s.control_cpu,
        nar_relay: s.nar_relay,
        nar_failover: s.nar_failover,
        shutdown_grace: s.shutdown_grace.0,
        max_connections: s.max_connections,
        drain_delay: s.drain_delay.0,
    })
}

fn validate_upstream(
    i: usize,
    u: &raw::RawUpstream,
    netrc: Option<&netrc::Netrc>,
    warnings: &mut Vec<String>,
) -> Result<UpstreamConfig, ConfigError> {
    let url = u.url.trim();
    if url.is_empty() {
        return Err(invalid(format!("upstream[{i}]: URL is empty")));
    }
    let kind = if url.starts_with("s3://") {
        UpstreamKind::S3(s3::S3Url::parse(url).map_err(|e| invalid(format!("upstream[{i}]: {e}")))?)
    } else {
        check_http_url(url)
            .map_err(|e| invalid(format!("upstream[{i}]: invalid URL {url:?}: {e}")))?;
        UpstreamKind::Http
    };
    let mut public_keys = Vec::new();
    for k in std::iter::once(&u.public_key)
        .chain(u.public_keys.iter())
        .filter(|k| !k.is_empty())
    {
        crate::proto::signature::PublicKey::parse(k)
            .map_err(|e| invalid(format!("upstream[{i}]: invalid public_key {k:?}: {e}")))?;
        if !public_keys.contains(k) {
            public_keys.push(k.clone());
        }
    }
    for (j, f) in u.filters.iter().enumerate() {
        if f.pattern.is_empty() {
            return Err(invalid(format!(
                "upstream[{i}].filters[{j}]: pattern is empty"
            )));
        }
    }
    let password = match (&u.password, &u.password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "upstream[{i}]: set password or password_file, not both"
            )))
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| invalid(format!("upstream[{i}]: password_file {f:?}: {e}")))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    let what = format!("upstream[{i}]");
    let (user, password) = netrc::basic_auth(netrc, &what, url, &u.username, password, warnings);
    if password.is_some() && user.is_none() {
        return Err(invalid(format!(
            "upstream[{i}]: password given without username"
        )));
    }
    let basic_auth = user.map(|user| (user, password));
    let (nar_url_mode, storage_url) = nar::validate_nar_urls(i, u, &kind)?;
    Ok(UpstreamConfig {
        url: url.trim_end_matches('/').to_owned(),
        kind,
        priority: u.priority,
        public_keys,
        basic_auth,
        tls_ca_file: u.tls_ca_file.as_ref().map(PathBuf::from),
        filters: u.filters.clone(),
        narinfo_timeout: u
            .narinfo_timeout
            .map(|d| positive(&format!("upstream[{i}].narinfo_timeout"), d.0))
            .transpose()?,
        nar_url_mode,
        storage_url,
        nar: nar::validate_upstream(i, u)?,
    })
}

/// Light syntax check of an http(s) upstream URL; the client parses it fully.
pub(crate) fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("scheme must be http, https or s3")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("credentials in the URL are not supported; use username/password".into());
    }
    let host_port = authority;
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated IPv6 literal")?;
        (h, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if let Some(p) = port {
        p.parse::<u16>()
            .map_err(|_| format!("invalid port {p:?}"))?;
    }
    if url.contains('?') || url.contains('#') {
        return Err("query strings and fragments are not allowed in an upstream URL".into());
    }
    Ok(())
}

fn validate_cache(c: &raw::RawCache, env: &dyn env::EnvLookup) -> Result<CacheConfig, ConfigError> {
    if c.max_entries <= 0 {
        return Err(invalid("cache.max_entries must be positive"));
    }
    if c.narinfo_memory_mb <= 0 {
        return Err(invalid("cache.narinfo_memory_mb must be positive"));
    }
    if !(c.latency_alpha > 0.0 && c.latency_alpha < 1.0) {
        return Err(invalid(format!(
            "cache.latency_alpha must be between 0 and 1 exclusive, got {}",
            c.latency_alpha
        )));
    }
    let m = &c.mass_query;
    if m.max_concurrent_races < 1 {
        return Err(invalid(
            "cache.mass_query.max_concurrent_races must be >= 1",
        ));
    }
    if m.per_upstream_max_inflight < 1 {
        return Err(invalid(
            "cache.mass_query.per_upstream_max_inflight must be >= 1",
        ));
    }
    let db_path = match &c.db_path {
        Some(p) if !p.trim().is_empty() => p.clone(),
        _ => default_db_path(env),
    };
    Ok(CacheConfig {
        db_path,
        max_entries: c.max_entries as usize,
        narinfo_memory: (c.narinfo_memory_mb as u64).saturating_mul(1 << 20),
        ttl: positive("cache.ttl", c.ttl.0)?,
        negative_ttl: positive("cache.negative_ttl", c.negative_ttl.0)?,
        latency_alpha: c.latency_alpha,
        max_concurrent_races: m.max_concurrent_races,
        per_upstream_max_inflight: m.per_upstream_max_inflight,
        in_memory_negative_ttl: positive(
            "cache.mass_query.in_memory_negative_ttl",
            m.in_memory_negative_ttl.0,
        )?,
        upstream_cooldown: positive("cache.mass_query.upstream_cooldown", m.upstream_cooldown.0)?,
        resolution_policy: c.resolution_policy,
        unavailable_answer: c.unavailable_answer,
        nar_hedging: nar::validate_hedging(&c.nar_hedging)?,
        nar_ranges: ranges::validate(&c.nar_ranges)?,
    })
}

/// routes.db in the state directory: $STATE_DIRECTORY (systemd), else
/// /var/lib/ncro for root, else $XDG_STATE_HOME/ncro or ~/.local/state/ncro.
pub fn default_db_path(env: &dyn env::EnvLookup) -> String {
    let non_empty = |k: &str| env.get(k).filter(|v| !v.is_empty());
    let dir = if let Some(d) = non_empty("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories.
        PathBuf::from(d.split(':').next().unwrap_or(&d))
    } else if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/ncro")
    } else if let Some(x) = non_empty("XDG_STATE_HOME") {
        Path::new(&x).join("ncro")
    } else if let Some(h) = non_empty("HOME") {
        Path::new(&h).join(".local/state/ncro")
    } else {
        PathBuf::from("/var/lib/ncro")
    };
    dir.join("routes.db").display().to_string()
}

/// Upper bound of `discovery.max_upstreams`: per-upstream state is
/// allocated for every slot at start, in every worker.
pub const MAX_DISCOVERED: u32 = 1024;

fn validate_discovery(d: &raw::RawDiscovery) -> Result<(), ConfigError> {
    if d.discovery_time.0.is_zero() {
        return Err(invalid("discovery.discovery_time must be positive"));
    }
    if d.enabled && d.service_name.trim().is_empty() {
        return Err(invalid(
            "discovery.service_name is required when discovery is enabled",
        ));
    }
    if d.enabled && d.domain.trim().is_empty() {
        return Err(invalid(
            "discovery.domain is required when discovery is enabled",
        ));
    }
    if !(1..=MAX_DISCOVERED).contains(&d.max_upstreams) {
        return Err(invalid(format!(
            "discovery.max_upstreams must be between 1 and {MAX_DISCOVERED}, got {}",
            d.max_upstreams
        )));
    }
    Ok(())
}

fn validate_index(i: &raw::RawIndex) -> Result<IndexConfig, ConfigError> {
    let p = i.false_positive_rate;
    if !(p > 0.0 && p < 1.0) {
        return Err(invalid(format!(
            "index.false_positive_rate must be between 0 and 1 (exclusive), got {p}"
        )));
    }
    let max_bytes = usize::try_from(i.max_bytes)
        .ok()
        .filter(|&b| b >= 64)
        .ok_or_else(|| invalid("index.max_bytes must be at least 64"))?;
    if i.max_items == 0 {
        return Err(invalid("index.max_items must be positive"));
    }
    Ok(IndexConfig {
        enabled: i.enabled,
        refresh_interval: positive("index.refresh_interval", i.refresh_interval.0)?,
        max_age: positive("index.max_age", i.max_age.0)?,
        max_bytes,
        max_items: i.max_items,
        false_positive_rate: p,
        publish: i.publish,
        publish_interval: positive("index.publish_interval", i.publish_interval.0)?,
    })
}

#[cfg(test)]
mod tests;
