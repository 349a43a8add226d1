//! Exactly what a config file said: serde structs mirroring the TOML, with
//! every ncro 2.2 key, the same defaults, and unknown keys rejected (toml
//! reports the key and its line).

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::filter::FilterRule;

pub mod narinfo;

pub use super::dur::Dur;

fn secs(n: u64) -> Dur {
    Dur(Duration::from_secs(n))
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Vec<RawUpstream>>,
    pub cache: RawCache,
    pub timeouts: RawTimeouts,
    pub health: RawHealth,
    pub logging: RawLogging,
    pub discovery: RawDiscovery,
    pub mesh: RawMesh,
    pub index: RawIndex,
    pub fallback_cache: narinfo::RawFallbackCache,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NarRelay {
    /// Splice where measurement says it wins (epoll driver), copy elsewhere.
    #[default]
    Auto,
    Copy,
    Splice,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub cache_priority: i32,
    pub read_timeout: Dur,
    pub write_timeout: Dur,
    /// 0 or absent: one worker per CPU in the process's affinity set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_cpu: Option<usize>,
    pub nar_relay: NarRelay,
    /// Continue a NAR cut mid-stream from another upstream holding it.
    pub nar_failover: bool,
    pub shutdown_grace: Dur,
    /// Open client connections across all workers; 0 means no cap.
    pub max_connections: usize,
    /// `WantMassQuery` in `/nix-cache-info`.
    pub want_mass_query: bool,
    /// Lame-duck time on SIGTERM: `/health` answers 503 while everything
    /// is still served, so a load balancer moves traffic away first.
    pub drain_delay: Dur,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: ":8080".into(),
            cache_priority: 30,
            read_timeout: secs(30),
            write_timeout: secs(30),
            workers: None,
            cpus: None,
            control_cpu: None,
            nar_relay: NarRelay::Auto,
            nar_failover: true,
            shutdown_grace: secs(10),
            max_connections: 10_000,
            want_mass_query: true,
            drain_delay: secs(0),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: String,
    pub priority: i32,
    pub public_key: String,
    /// Several keys for one upstream (key rotation); merged with `public_key`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub public_keys: Vec<String>,
    pub username: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the password (kept out of the Nix store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Extra PEM CA bundle trusted for this HTTPS upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterRule>,
    /// Total time for this upstream's narinfo request in a race.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub narinfo_timeout: Option<Dur>,
    /// How this upstream's narinfo `URL:` is served (default `to_self`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nar_url_mode: Option<crate::proto::narinfo::NarUrlMode>,
    /// Base URL that relative narinfo `URL:`s resolve against instead of
    /// `url` (caches that keep NAR files on another host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_url: Option<String>,
    /// May be started as an extra NAR hedge (absent: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_hedging: Option<bool>,
    /// Idle (per-read) timeout of this upstream's NAR streams (absent:
    /// `timeouts.idle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nar_timeout: Option<Dur>,
    /// Most NAR streams to this upstream at once, all workers together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_path: Option<String>,
    pub max_entries: i64,
    /// MiB of narinfo bodies kept in memory; the rest are read back from
    /// the database when hit.
    pub narinfo_memory_mb: i64,
    pub ttl: Dur,
    pub negative_ttl: Dur,
    pub latency_alpha: f64,
    pub mass_query: RawMassQuery,
    pub resolution_policy: narinfo::ResolutionPolicy,
    pub unavailable_answer: narinfo::UnavailableAnswer,
    pub nar_hedging: RawNarHedging,
    pub nar_ranges: super::ranges::RawNarRanges,
    /// Today's ncro's slow-SQLite warning threshold: accepted and ignored
    /// (config::compat warns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_statement_threshold: Option<Dur>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            db_path: None,
            max_entries: 100_000,
            narinfo_memory_mb: 64,
            ttl: secs(3600),
            negative_ttl: secs(600),
            latency_alpha: 0.3,
            mass_query: RawMassQuery::default(),
            slow_statement_threshold: None,
            resolution_policy: Default::default(),
            unavailable_answer: Default::default(),
            nar_hedging: RawNarHedging::default(),
            nar_ranges: Default::default(),
        }
    }
}

/// `[cache.nar_hedging]`: extra NAR requests to other upstreams when the
/// first is slow to start its body (docs/nar-failover.md, "Hedging").
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawNarHedging {
    pub enabled: bool,
    pub delay: Dur,
    pub max_inflight: u32,
}

impl Default for RawNarHedging {
    fn default() -> Self {
        RawNarHedging {
            enabled: true,
            delay: secs(1),
            max_inflight: 2,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawMassQuery {
    pub max_concurrent_races: u32,
    pub per_upstream_max_inflight: u32,
    pub in_memory_negative_ttl: Dur,
    pub upstream_cooldown: Dur,
}

impl Default for RawMassQuery {
    fn default() -> Self {
        RawMassQuery {
            max_concurrent_races: 64,
            per_upstream_max_inflight: 32,
            in_memory_negative_ttl: secs(5),
            upstream_cooldown: secs(15),
        }
    }
}

/// Timeouts ncro 2.2 hard-coded.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    pub race_deadline: Dur,
    pub connect: Dur,
    pub first_byte: Dur,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Dur>,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            race_deadline: secs(5),
            connect: secs(5),
            first_byte: secs(15),
            idle: None,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// Active probing of `/nix-cache-info`; without it, health comes only
    /// from what races observe.
    pub enabled: bool,
    pub probe_interval: Dur,
    pub probe_timeout: Dur,
    pub hedge_after: Dur,
    /// Tier skipping (docs/routing.md, "Early starts"): extra upstream
    /// narinfo requests allowed over sequential tier order, as a fraction;
    /// 0 turns early starts off.
    pub early_start_budget: f64,
    /// Time constant of the per-tier found/404 statistics.
    pub early_start_window: Dur,
}

impl RawHealth {
    /// `early_start_budget`, checked: a fraction of extra requests in [0, 1].
    pub fn checked_early_start_budget(&self) -> Result<f64, String> {
        match self.early_start_budget {
            b if (0.0..=1.0).contains(&b) => Ok(b),
            b => Err(format!(
                "health.early_start_budget must be between 0 and 1 (a fraction of extra requests; 0 turns early starts off), got {b}"
            )),
        }
    }
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            enabled: true,
            probe_interval: secs(30),
            probe_timeout: secs(5),
            hedge_after: secs(2),
            early_start_budget: 0.1,
            early_start_window: secs(60),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogging {
    pub level: String,
    pub format: String,
    /// false: no timestamps (for journald, which adds its own).
    pub timestamps: bool,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            level: "info".into(),
            format: "json".into(),
            timestamps: true,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AddressFamily {
    #[default]
    Any,
    Ipv4,
    Ipv6,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawDiscovery {
    pub enabled: bool,
    pub service_name: String,
    pub domain: String,
    pub discovery_time: Dur,
    pub priority: i32,
    pub address_family: AddressFamily,
    /// Most discovered upstreams routed to at once (new in ncro 3).
    pub max_upstreams: u32,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        RawDiscovery {
            enabled: false,
            service_name: "_nix-serve._tcp".into(),
            domain: "local".into(),
            discovery_time: secs(5),
            priority: 20,
            address_family: AddressFamily::Any,
            max_upstreams: 64,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawPeer {
    pub addr: String,
    pub public_key: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawMesh {
    pub enabled: bool,
    pub bind_addr: String,
    pub peers: Vec<RawPeer>,
    pub private_key: String,
    pub gossip_interval: Dur,
    pub allow_unauthenticated: bool,
    /// How far a gossip timestamp may be from this node's clock (either
    /// way) before the packet is dropped as a replay.
    pub replay_window: Dur,
}

impl Default for RawMesh {
    fn default() -> Self {
        RawMesh {
            enabled: false,
            bind_addr: "0.0.0.0:7946".into(),
            peers: Vec::new(),
            private_key: String::new(),
            gossip_interval: secs(30),
            allow_unauthenticated: false,
            replay_window: secs(60),
        }
    }
}

/// Index-aware routing (new in ncro 3; docs/index-routing.md).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawIndex {
    /// Consume upstreams' membership summaries (NixBloom, RFC 0195 index).
    pub enabled: bool,
    pub refresh_interval: Dur,
    /// A summary older than this is ignored (the upstream is raced).
    pub max_age: Dur,
    /// Largest filter, manifest, shard or journal segment fetched.
    pub max_bytes: u64,
    /// Largest RFC 0195 index (items) turned into a summary.
    pub max_items: u64,
    pub false_positive_rate: f64,
    /// Serve ncro's own NixBloom of the routes it knows at /bloom-filter.
    pub publish: bool,
    pub publish_interval: Dur,
}

impl Default for RawIndex {
    fn default() -> Self {
        RawIndex {
            enabled: true,
            refresh_interval: secs(60),
            max_age: secs(300),
            max_bytes: 64 * 1024 * 1024,
            max_items: 2_000_000,
            false_positive_rate: 0.01,
            publish: false,
            publish_interval: secs(60),
        }
    }
}
