//! The set of upstream caches as workers see it: an immutable
//! [`UpstreamSet`] built at start, plus [`Routing`], the part that changes:
//! the health snapshot the control thread publishes, cooldowns and the
//! mass-query limits. Workers index upstreams by position; routes name an
//! upstream by its URL, which survives snapshot changes.

pub mod filter;
pub mod health;
pub mod limits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Config, UpstreamKind};
use crate::http::client::Origin;
use crate::proto::narinfo::NarInfo;
use crate::proto::signature::PublicKey;
use crate::proto::store_path::StoreHash;
use crate::race::Candidate;
use crate::route::RouteEntry;
use filter::FilterRule;
use health::HealthSnapshot;
use limits::Limits;

/// One upstream cache, ready for requests.
#[derive(Debug)]
pub struct Upstream {
    /// As configured (no trailing slash): the identity used by routes,
    /// metric labels and /health.
    pub url: Arc<str>,
    pub origin: Origin,
    pub priority: i32,
    /// Empty: narinfos from this upstream are not verified (as in ncro 2.2
    /// without `public_key`); Nix clients still check them.
    pub keys: Vec<PublicKey>,
    pub filters: Vec<FilterRule>,
}

#[derive(Debug, Default)]
pub struct UpstreamSet {
    pub list: Vec<Upstream>,
    by_url: HashMap<Arc<str>, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {url}: {why}")]
    Invalid { url: String, why: String },
}

impl UpstreamSet {
    /// Builds the upstreams of `cfg`. An S3 upstream gets an empty
    /// credentials cell that [`crate::s3::CredentialsThread`] fills.
    pub fn from_config(cfg: &Config) -> Result<UpstreamSet, UpstreamError> {
        let mut set = UpstreamSet::default();
        for u in &cfg.upstreams {
            let invalid = |why: String| UpstreamError::Invalid {
                url: u.url.clone(),
                why,
            };
            let auth = u
                .basic_auth
                .as_ref()
                .map(|(user, pw)| (user.as_str(), pw.as_deref()));
            let origin = match &u.kind {
                UpstreamKind::S3(s3) => crate::s3::origin(s3, &u.url, Default::default())
                    .map_err(|e| invalid(e.to_string()))?,
                UpstreamKind::Http => {
                    Origin::parse(&u.url, auth).map_err(|e| invalid(e.to_string()))?
                }
            };
            let keys = u
                .public_keys
                .iter()
                .map(|k| PublicKey::parse(k).map_err(|e| invalid(e.to_string())))
                .collect::<Result<_, _>>()?;
            set.push(Upstream {
                url: Arc::from(u.url.as_str()),
                origin,
                priority: u.priority,
                keys,
                filters: u.filters.clone(),
            });
        }
        Ok(set)
    }

    pub fn push(&mut self, u: Upstream) {
        self.by_url.insert(u.url.clone(), self.list.len());
        self.list.push(u);
    }

    pub fn index_of(&self, url: &str) -> Option<usize> {
        self.by_url.get(url).copied()
    }

    pub fn get(&self, i: usize) -> Option<&Upstream> {
        self.list.get(i)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Priority of every upstream, by index.
    pub fn priorities(&self) -> Vec<i32> {
        self.list.iter().map(|u| u.priority).collect()
    }

    /// Whether a route loaded from the database may still be served under
    /// the current configuration: its upstream is still configured and its
    /// filters (which may have changed since the route was stored) accept
    /// the narinfo.
    pub fn still_routes(&self, entry: &RouteEntry) -> bool {
        let Some(up) = self.index_of(&entry.upstream).map(|i| &self.list[i]) else {
            return false;
        };
        up.filters.is_empty()
            || NarInfo::parse(&entry.narinfo).is_ok_and(|info| filter::allows(&up.filters, &info))
    }

    /// Drops the routes [`Self::still_routes`] refuses; returns their hashes
    /// so the caller can forget them in the database too.
    pub fn recheck_routes(&self, routes: &mut Vec<(StoreHash, Arc<RouteEntry>)>) -> Vec<StoreHash> {
        let mut dropped = Vec::new();
        routes.retain(|(hash, e)| {
            let keep = self.still_routes(e);
            if !keep {
                dropped.push(*hash);
            }
            keep
        });
        dropped
    }
}

/// A latency observed by a worker (its race winner's time to an accepted
/// narinfo), on its way to the control thread's EMA.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub upstream: usize,
    pub latency: Duration,
}

/// Worker-reported samples queued before new ones are dropped: the EMA
/// needs a trickle, not every sample, and a worker must never wait.
const SAMPLE_QUEUE: usize = 4096;

/// What a race should ask, decided from the health snapshot and cooldowns.
#[derive(Debug, Clone, PartialEq)]
pub struct RacePlan {
    /// In routing order (so in tier order).
    pub candidates: Vec<Candidate>,
    /// When the next tier joins in ([`health::hedge_delay`] of the first).
    pub hedge_after: Duration,
    /// Some upstream was left out (DOWN or cooling down), so a miss is not
    /// the final word of every configured upstream.
    pub partial: bool,
    /// A routable upstream was left out only because it is cooling down
    /// after a transport error: it may well hold the path, so a miss from
    /// the others is not definite (answered 502, never a sticky 404).
    pub cooling_skipped: bool,
}

/// The changing side of the upstreams, shared by all workers and the
/// control thread. Workers only read the snapshot (one atomic load, no
/// lock); the control thread alone replaces it.
pub struct Routing {
    health: ArcSwap<HealthSnapshot>,
    /// Mirrors `health.any_down()`, so the check on every route cache hit
    /// is one relaxed load, not a snapshot load.
    any_down: AtomicBool,
    /// To the control thread; the receiver lives in its prober.
    samples: flume::Sender<Sample>,
    pub limits: Limits,
    /// `health.hedge_after`: upper bound of the hedge delay.
    hedge_cap: Duration,
}

impl Routing {
    /// Routing state for `set`, starting from `initial` (restored health).
    pub fn new(
        set: &UpstreamSet,
        cfg: &Config,
        initial: HealthSnapshot,
    ) -> (Routing, flume::Receiver<Sample>) {
        let (tx, rx) = flume::bounded(SAMPLE_QUEUE);
        let routing = Routing {
            any_down: AtomicBool::new(initial.any_down()),
            health: ArcSwap::from_pointee(initial),
            samples: tx,
            limits: Limits::new(set.len(), &cfg.cache, Instant::now()),
            hedge_cap: cfg.health.hedge_after,
        };
        (routing, rx)
    }

    /// The current snapshot (a cheap guard; do not hold it across awaits).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<HealthSnapshot>> {
        self.health.load()
    }

    /// Control thread only: replaces the snapshot.
    pub fn publish(&self, snap: HealthSnapshot) {
        let down = snap.any_down();
        self.health.store(Arc::new(snap));
        self.any_down.store(down, Ordering::Relaxed);
    }

    /// Whether a cached route names a DOWN upstream (and so must be raced
    /// again). Costs one relaxed load while every upstream is up.
    #[inline]
    pub fn route_is_down(&self, set: &UpstreamSet, upstream: &str) -> bool {
        if !self.any_down.load(Ordering::Relaxed) {
            return false;
        }
        let snap = self.health.load();
        snap.live > 0 && set.index_of(upstream).is_some_and(|i| snap.is_down(i))
    }

    /// Hands a race winner's latency to the control thread; dropped when
    /// its queue is full.
    pub fn report_win(&self, upstream: usize, latency: Duration) {
        // A full queue only loses one EMA sample.
        let _ = self.samples.try_send(Sample { upstream, latency });
    }

    /// Candidates for one race: routable upstreams (not DOWN, unless all
    /// are) that are not cooling down (unless all are), in routing order.
    pub fn plan_race(&self, set: &UpstreamSet, now: Instant) -> RacePlan {
        let snap = self.health.load();
        let routable = snap.routable();
        let candidate = |&i: &usize| {
            let priority = set.get(i)?.priority;
            Some(Candidate {
                upstream: i,
                priority,
            })
        };
        let mut candidates = Vec::with_capacity(routable.len());
        candidates.extend(
            routable
                .iter()
                .filter(|&&i| !self.limits.cooldowns.is_cooling(i, now))
                .filter_map(candidate),
        );
        if candidates.is_empty() {
            candidates.extend(routable.iter().filter_map(candidate));
        }
        let cooling_skipped = candidates.len() < routable.len();
        let first = candidates.first().map(|c| c.priority);
        let first_tier = candidates
            .iter()
            .take_while(|c| Some(c.priority) == first)
            .filter_map(|c| snap.rank(c.upstream, c.priority));
        RacePlan {
            hedge_after: health::hedge_delay(first_tier, self.hedge_cap),
            partial: candidates.len() < set.len(),
            cooling_skipped,
            candidates,
        }
    }

    /// Order in which to ask for a NAR: the upstream that served its
    /// narinfo first, then the other routable upstreams in routing order;
    /// upstreams cooling down go last rather than nowhere (the NAR may
    /// exist only there).
    pub fn nar_order(&self, routed: Option<usize>, now: Instant) -> Vec<usize> {
        let snap = self.health.load();
        let routable = snap.routable();
        let routed = routed.filter(|r| routable.contains(r));
        let all = routed
            .into_iter()
            .chain(routable.iter().copied().filter(|&i| Some(i) != routed));
        let (mut ready, cooling): (Vec<usize>, Vec<usize>) =
            all.partition(|&i| !self.limits.cooldowns.is_cooling(i, now));
        ready.extend(cooling);
        ready
    }
}

impl Routing {
    /// Feeds one finished race attempt back: a winner's latency goes to the
    /// EMA, a transport failure starts the upstream's cooldown.
    pub fn observe(&self, upstream: usize, report: &crate::race::AttemptReport) {
        use crate::race::AttemptResult;
        match report.result {
            AttemptResult::Accepted => self.report_win(upstream, report.latency),
            AttemptResult::Failed(kind) => self.failed(upstream, kind),
            _ => {}
        }
    }

    /// A request to `upstream` failed with `kind` (race or NAR): transport
    /// failures start its cooldown.
    pub fn failed(&self, upstream: usize, kind: crate::race::FailKind) {
        if limits::is_transport(kind) {
            self.limits.cooldowns.start(upstream, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
