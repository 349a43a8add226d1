//! COLD: index summaries on the control thread (docs/index-routing.md).
//!
//! [`Refresher`] asks every live upstream, each `index.refresh_interval`,
//! for its `nix-cache-info`: a `BloomFilter:` line names a NixBloom filter
//! (fetched with `If-None-Match`); an `Index…` line, or failing both a
//! probe of `/nix-cache-index/manifest.json`, an RFC 0195 index ([`rfc`]).
//! The results are published as one [`SummarySet`]. Any failure drops that
//! upstream's summary (it is raced as usual) and is counted by kind. A
//! cache without an index is probed for one again only every
//! [`ABSENT_RECHECK`] rounds.
//!
//! [`Publisher`] rebuilds ncro's own filter of the routes it knows every
//! `index.publish_interval`, off the workers.

mod fetch;
mod rfc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::config::{Config, IndexConfig};
use crate::control::Job;
use crate::http::client::{ClientTimeouts, LocalClient};
use crate::http::resolve::Resolver;
use crate::index::{IndexState, Published, RefreshErrorKind, Summary, SummarySet, SummarySource};
use crate::proto::cache_index::MANIFEST_PATH;
use crate::proto::cache_info::{CacheInfo, MAX_CACHE_INFO_SIZE};
use crate::proto::nixbloom::{Bloom, BloomBuilder, Probe};
use crate::route::RouteTable;
use crate::upstream::{Upstream, Upstreams};
use fetch::{get, Fetched, Location, RefreshError};

/// Rounds between two manifest probes of a cache that answered 404.
const ABSENT_RECHECK: u32 = 10;

/// What the refresher remembers about one slot's upstream.
struct Tracked {
    /// The `Upstream::url` it was built for (pointer identity).
    upstream: Arc<str>,
    /// The filter location, its ETag and the filter last fetched from it.
    bloom: Option<(String, Option<String>, Bloom)>,
    rfc: rfc::RfcCache,
    /// Rounds left before probing for a manifest again.
    absent_rounds: u32,
    /// The last round failed (so a lasting failure is logged once).
    failing: bool,
}

impl Tracked {
    fn new(upstream: Arc<str>) -> Tracked {
        Tracked {
            upstream,
            bloom: None,
            rfc: rfc::RfcCache::default(),
            absent_rounds: 0,
            failing: false,
        }
    }
}

pub struct Refresher {
    upstreams: Arc<Upstreams>,
    state: Arc<IndexState>,
    cfg: IndexConfig,
    timeouts: ClientTimeouts,
    resolver: Resolver,
    tls: Arc<rustls::ClientConfig>,
}

impl Refresher {
    pub fn new(
        cfg: &Config,
        upstreams: Arc<Upstreams>,
        state: Arc<IndexState>,
        resolver: Resolver,
        tls: Arc<rustls::ClientConfig>,
    ) -> Refresher {
        let t = &cfg.timeouts;
        Refresher {
            upstreams,
            state,
            cfg: cfg.index.clone(),
            timeouts: ClientTimeouts {
                connect: t.connect,
                first_byte: t.first_byte,
                idle: t.idle,
            },
            resolver,
            tls,
        }
    }

    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
    }

    async fn run(self) {
        let client = LocalClient::new(
            self.resolver.clone(),
            self.tls.clone(),
            self.timeouts,
            Default::default(),
        );
        let mut tracked: Vec<Option<Tracked>> = Vec::new();
        let mut current: Vec<Option<Arc<Summary>>> = Vec::new();
        loop {
            let set = self.upstreams.load();
            reconcile(&mut tracked, &mut current, &set);
            self.state
                .publish_summaries(SummarySet::new(current.clone()));
            let mut failed: Vec<Option<RefreshError>> = vec![None; tracked.len()];
            let mut rounds = FuturesUnordered::new();
            for (i, t) in tracked.iter_mut().enumerate() {
                if let (Some(t), Some(up)) = (t.as_mut(), set.list.get(i)) {
                    let (client, cfg) = (&client, &self.cfg);
                    rounds.push(async move { (i, refresh(client, up, t, cfg).await) });
                }
            }
            while let Some((i, result)) = rounds.next().await {
                current[i] = match result {
                    Ok(found) => found.map(|f| self.summary(&set.list[i], f)),
                    Err(e) => {
                        self.state.count_error(i, e.kind);
                        failed[i] = Some(e);
                        None
                    }
                };
                // At once, not after the slowest upstream's round.
                self.state
                    .publish_summaries(SummarySet::new(current.clone()));
            }
            drop(rounds);
            log_changes(&mut tracked, &failed);
            client.evict_expired();
            monoio::time::sleep(self.cfg.refresh_interval).await;
        }
    }

    fn summary(&self, up: &Upstream, (bloom, source): (Bloom, SummarySource)) -> Arc<Summary> {
        let now = Instant::now();
        Arc::new(Summary {
            upstream: up.url.clone(),
            bloom,
            source,
            fetched_at: now,
            fresh_until: now + self.cfg.max_age,
        })
    }
}

/// A failure is logged when it starts (later ones at debug), and the
/// recovery once.
fn log_changes(tracked: &mut [Option<Tracked>], failed: &[Option<RefreshError>]) {
    for (t, e) in tracked.iter_mut().zip(failed) {
        let Some(t) = t else { continue };
        match (e, t.failing) {
            (Some(e), false) => {
                tracing::warn!(upstream = %t.upstream, kind = e.kind.label(), error = %e, "index summary refresh failed; this upstream is raced as usual until it works again");
            }
            (Some(e), true) => {
                tracing::debug!(upstream = %t.upstream, kind = e.kind.label(), error = %e, "index summary refresh failed again");
            }
            (None, true) => {
                tracing::info!(upstream = %t.upstream, "index summary refresh works again");
            }
            (None, false) => {}
        }
        t.failing = e.is_some();
    }
}

/// Keeps one [`Tracked`] per live slot, for the upstream now in it; a
/// retired or reused slot loses its summary at once.
fn reconcile(
    tracked: &mut Vec<Option<Tracked>>,
    current: &mut Vec<Option<Arc<Summary>>>,
    set: &crate::upstream::UpstreamSet,
) {
    let n = set.len().max(tracked.len());
    tracked.resize_with(n, || None);
    current.resize(n, None);
    for (i, t) in tracked.iter_mut().enumerate() {
        match set.live(i) {
            Some(up)
                if t.as_ref()
                    .is_some_and(|t| Arc::ptr_eq(&t.upstream, &up.url)) => {}
            Some(up) => {
                *t = Some(Tracked::new(up.url.clone()));
                current[i] = None;
            }
            None => {
                *t = None;
                current[i] = None;
            }
        }
    }
}

/// One round for one upstream.
async fn refresh(
    client: &LocalClient,
    up: &Upstream,
    t: &mut Tracked,
    cfg: &IndexConfig,
) -> Result<Option<(Bloom, SummarySource)>, RefreshError> {
    let info = cache_info(client, up).await?;
    let value = |pred: &dyn Fn(&str) -> bool| {
        info.extra
            .iter()
            .find(|(k, _)| pred(k))
            .map(|(_, v)| v.clone())
    };
    if let Some(at) = value(&|k| k == "BloomFilter") {
        t.rfc = rfc::RfcCache::default();
        return nixbloom(client, up, &at, t, cfg)
            .await
            .map(|b| Some((b, SummarySource::NixBloom)));
    }
    t.bloom = None;
    let manifest = match value(&|k| k.starts_with("Index")) {
        Some(at) => Location::parse(&at)?,
        None if t.absent_rounds > 0 => {
            t.absent_rounds -= 1;
            return Ok(None);
        }
        None => Location::Upstream(MANIFEST_PATH.to_owned()),
    };
    match rfc::refresh(client, &up.origin, &manifest, &mut t.rfc, cfg).await? {
        Some(b) => Ok(Some((b, SummarySource::Rfc0195))),
        None => {
            t.absent_rounds = ABSENT_RECHECK;
            Ok(None)
        }
    }
}

/// The upstream's `nix-cache-info`; a 404 reads as an empty one.
async fn cache_info(client: &LocalClient, up: &Upstream) -> Result<CacheInfo, RefreshError> {
    let loc = Location::Upstream("/nix-cache-info".to_owned());
    match get(client, &up.origin, &loc, None, MAX_CACHE_INFO_SIZE).await? {
        Fetched::Body { bytes, .. } => CacheInfo::parse(&bytes)
            .map_err(|e| RefreshError::new(RefreshErrorKind::Parse, e.to_string())),
        Fetched::Missing | Fetched::NotModified => Ok(CacheInfo::default()),
    }
}

/// The advertised NixBloom filter, revalidated with its ETag.
async fn nixbloom(
    client: &LocalClient,
    up: &Upstream,
    at: &str,
    t: &mut Tracked,
    cfg: &IndexConfig,
) -> Result<Bloom, RefreshError> {
    let loc = Location::parse(at)?;
    let known = t.bloom.take().filter(|(was, _, _)| was == at);
    let etag = known.as_ref().and_then(|(_, e, _)| e.as_deref());
    match get(client, &up.origin, &loc, etag, cfg.max_bytes).await? {
        Fetched::NotModified => {
            let (was, etag, bloom) = known.ok_or_else(|| {
                RefreshError::new(RefreshErrorKind::Status, "304 to an unconditional GET")
            })?;
            t.bloom = Some((was, etag, bloom.clone()));
            Ok(bloom)
        }
        Fetched::Missing => Err(RefreshError::new(
            RefreshErrorKind::Status,
            format!("advertised filter {} is missing", loc.path()),
        )),
        Fetched::Body { bytes, etag } => {
            let bloom = Bloom::parse(bytes)
                .map_err(|e| RefreshError::new(RefreshErrorKind::Parse, e.to_string()))?;
            t.bloom = Some((at.to_owned(), etag, bloom.clone()));
            Ok(bloom)
        }
    }
}

/// Rebuilds ncro's own filter of known routes.
pub struct Publisher {
    routes: Arc<RouteTable>,
    state: Arc<IndexState>,
    interval: Duration,
    fpr: f64,
}

impl Publisher {
    pub fn new(cfg: &IndexConfig, routes: Arc<RouteTable>, state: Arc<IndexState>) -> Publisher {
        Publisher {
            routes,
            state,
            interval: cfg.publish_interval,
            fpr: cfg.false_positive_rate,
        }
    }

    pub fn into_job(self) -> Job {
        Box::new(move || {
            Box::pin(async move {
                loop {
                    self.state.publish_filter(self.build());
                    monoio::time::sleep(self.interval).await;
                }
            })
        })
    }

    /// The filter of every live route now.
    pub fn build(&self) -> Published {
        let now = crate::rt::unix_now();
        let probes: Vec<Probe> = self
            .routes
            .route_hashes(now)
            .map(|h| Probe::of(&h))
            .collect();
        let mut b = BloomBuilder::roomy(probes.len() as u64, self.fpr);
        probes.iter().for_each(|&p| b.insert(p));
        let body = b.finish().body().clone();
        let etag = format!("\"{:016x}\"", xxhash_rust::xxh64::xxh64(&body, 0));
        Published {
            body,
            etag,
            routes: probes.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
