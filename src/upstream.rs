//! The set of upstream caches as workers see it: an immutable
//! [`UpstreamSet`] snapshot, published through [`Upstreams`] (replaced
//! whole when discovery adds or retires an upstream), plus [`Routing`], the
//! other part that changes: the health snapshot the control thread
//! publishes, cooldowns and the mass-query limits. Workers index upstreams
//! by slot; slots are append-only (see [`slots`]), so an index never names
//! another upstream while a request holds it. Routes name an upstream by
//! its URL, which survives snapshot changes.

pub mod fallback;
pub mod filter;
pub mod health;
pub mod limits;
pub mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Config, UpstreamKind};
use crate::http::client::Origin;
use crate::proto::narinfo::NarInfo;
use crate::proto::signature::{verify_narinfo, PublicKey};
use crate::race::{Candidate, EarlyStarts, Hedges};
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
    /// An S3 upstream's presigner (the one that signs `origin`'s
    /// requests), whose credentials [`crate::s3::CredentialsThread`] keeps
    /// fresh.
    pub s3: Option<Arc<crate::s3::Presigner>>,
    pub priority: i32,
    /// Empty: narinfos from this upstream are not verified (as in ncro 2.2
    /// without `public_key`); Nix clients still check them.
    pub keys: Vec<PublicKey>,
    pub filters: Vec<FilterRule>,
    /// Total time for one narinfo request to it inside a race; `None`:
    /// only the race's own deadline applies.
    pub narinfo_timeout: Option<Duration>,
    /// Its URL's host, the value of `X-Ncro-Upstream`, computed once so
    /// that an answer only copies it ([`fallback::host_of`]).
    pub host: Box<str>,
    /// Where NAR files are fetched when they are not at `origin`
    /// (`storage_url`; same credentials). Its own host gets its own
    /// connection pool (pools are keyed by scheme, host and port).
    pub storage: Option<Origin>,
    /// NAR hedging and limits (`allow_hedging`, `nar_timeout`,
    /// `max_concurrent_requests`); discovered upstreams get the defaults.
    pub nar: crate::config::UpstreamNar,
}

impl Upstream {
    /// The origin NAR requests go to: `storage_url`'s, else `origin`.
    pub fn nar_origin(&self) -> &Origin {
        self.storage.as_ref().unwrap_or(&self.origin)
    }
}

#[derive(Debug, Default, Clone)]
pub struct UpstreamSet {
    /// By slot. `Arc` so that a new snapshot (discovery) copies pointers,
    /// not upstreams.
    pub list: Vec<Arc<Upstream>>,
    /// Every slot's URL, retired discovered ones included (so a route to a
    /// retired upstream is recognised, and a returning one gets its slot).
    by_url: HashMap<Arc<str>, usize>,
    /// Per slot: configured, discovered or retired ([`slots`]).
    slots: Vec<slots::Slot>,
    /// Slots reserved for discovered upstreams after the configured ones.
    reserved: usize,
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
            let (origin, s3) = match &u.kind {
                UpstreamKind::S3(s3) => crate::s3::origin(s3, &u.url, Default::default())
                    .map(|(origin, presigner)| (origin, Some(presigner)))
                    .map_err(|e| invalid(e.to_string()))?,
                UpstreamKind::Http => (
                    Origin::parse(&u.url, auth).map_err(|e| invalid(e.to_string()))?,
                    None,
                ),
            };
            let keys = u
                .public_keys
                .iter()
                .map(|k| PublicKey::parse(k).map_err(|e| invalid(e.to_string())))
                .collect::<Result<_, _>>()?;
            let storage = u
                .storage_url
                .as_deref()
                .map(|url| {
                    let auth = auth.filter(|_| u.kind == UpstreamKind::Http);
                    Origin::parse(url, auth).map_err(|e| invalid(format!("storage_url: {e}")))
                })
                .transpose()?;
            set.push(Upstream {
                url: Arc::from(u.url.as_str()),
                origin,
                s3,
                priority: u.priority,
                keys,
                filters: u.filters.clone(),
                narinfo_timeout: u.narinfo_timeout,
                host: fallback::host_of(&u.url),
                storage,
                nar: u.nar,
            });
        }
        Ok(set)
    }

    /// Appends a configured upstream.
    pub fn push(&mut self, u: Upstream) {
        self.push_slot(u, slots::Slot::Configured);
    }

    pub fn index_of(&self, url: &str) -> Option<usize> {
        self.by_url.get(url).copied()
    }

    pub fn get(&self, i: usize) -> Option<&Upstream> {
        self.list.get(i).map(|u| &**u)
    }

    /// Slots in use, retired ones included (indexes run below this).
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

    /// Whether upstream `i`'s filters and keys (which may have changed
    /// since the route was stored) accept a narinfo read back from the
    /// database. With keys, it must verify against the *current* ones
    /// ([`verify_narinfo`]: a valid signature or a `CA:` that proves the
    /// path), as a race would check it.
    pub fn accepts_stored(&self, i: usize, narinfo: &[u8]) -> bool {
        let Some(up) = self.live(i) else {
            return false;
        };
        if up.filters.is_empty() && up.keys.is_empty() {
            return true;
        }
        NarInfo::parse(narinfo).is_ok_and(|info| {
            filter::allows(&up.filters, &info)
                && (up.keys.is_empty() || verify_narinfo(&info, &up.keys).is_accepted())
        })
    }
}

/// The published upstream set. The control thread alone replaces it (when
/// discovery adds or retires an upstream); workers load it once per race or
/// NAR request, one atomic load and no lock, and keep that snapshot for the
/// whole request.
pub struct Upstreams {
    current: ArcSwap<UpstreamSet>,
}

impl Upstreams {
    pub fn new(set: UpstreamSet) -> Upstreams {
        Upstreams {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// The current snapshot.
    #[inline]
    pub fn load(&self) -> Arc<UpstreamSet> {
        self.current.load_full()
    }

    /// The current snapshot, borrowed without touching its reference
    /// count: for a short look (a hit's `X-Ncro-Upstream`), never held
    /// across an await.
    #[inline]
    pub fn peek(&self) -> arc_swap::Guard<Arc<UpstreamSet>> {
        self.current.load()
    }

    /// Control thread only: replaces the snapshot. Published before the
    /// health snapshot that covers a new slot, so a worker that sees the
    /// slot in the health snapshot finds it in the set it loads next.
    pub fn publish(&self, set: Arc<UpstreamSet>) {
        self.current.store(set);
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
    /// When the next tier joins in: for each tier of `candidates`, the
    /// [`health::hedge_delay`] of its own members (`health.hedge_after`
    /// for any other tier).
    pub hedge_after: Hedges,
    /// Some upstream is left out for being DOWN, so even a miss from every
    /// other one is not the final word of every configured upstream.
    pub partial: bool,
    /// Routable upstreams left out of `candidates` only because they are
    /// cooling down after a transport error, in routing order. They may
    /// well hold the path: the caller asks them when the candidates give
    /// no answer, before concluding anything.
    pub cooling: Vec<Candidate>,
    /// Upstreams left out because their fresh index summary rules the
    /// path out; with no candidates left that is a definite miss.
    pub index_skipped: usize,
    /// Tiers after which the next one starts early, as the control
    /// thread's per-tier statistics last decided (`control::tiers`). The
    /// caller leaves it out under `resolution_policy = "strict"`.
    pub early: EarlyStarts,
}

/// The changing side of the upstreams, shared by all workers and the
/// control thread. Workers only read the snapshot (one atomic load, no
/// lock); the control thread alone replaces it.
pub struct Routing {
    health: ArcSwap<HealthSnapshot>,
    /// Mirrors `health.any_down()`, so the check on every route cache hit
    /// is one relaxed load, not a snapshot load.
    any_down: AtomicBool,
    /// Set once a discovered upstream's slot was given to another URL
    /// ([`Self::forget_urls`]); keeps `any_down` on from then on.
    recycled: AtomicBool,
    /// To the control thread; the receiver lives in its prober.
    samples: flume::Sender<Sample>,
    pub limits: Limits,
    /// `health.hedge_after`: upper bound of the hedge delay.
    hedge_cap: Duration,
    /// Early starts armed by the control thread (`control::tiers`); one
    /// atomic load per race plan.
    early: ArcSwap<EarlyStarts>,
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
            recycled: AtomicBool::new(false),
            health: ArcSwap::from_pointee(initial),
            samples: tx,
            // Sized for every slot the set may ever use: limits are read
            // lock-free by index, so they cannot grow later.
            limits: Limits::new(set.capacity(), &cfg.cache, Instant::now()),
            hedge_cap: cfg.health.hedge_after,
            early: ArcSwap::from_pointee(EarlyStarts::NONE),
        };
        (routing, rx)
    }

    /// The current snapshot (a cheap guard; do not hold it across awaits).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<HealthSnapshot>> {
        self.health.load()
    }

    /// Control thread only: replaces the snapshot.
    pub fn publish(&self, snap: HealthSnapshot) {
        let down = snap.any_down() || self.recycled.load(Ordering::Relaxed);
        self.health.store(Arc::new(snap));
        self.any_down.store(down, Ordering::Relaxed);
    }

    /// Control thread only: the tiers whose next tier starts early.
    pub fn publish_early(&self, early: EarlyStarts) {
        self.early.store(Arc::new(early));
    }

    /// The early starts armed now.
    pub fn early(&self) -> EarlyStarts {
        **self.early.load()
    }

    /// Whether any upstream is DOWN (or a slot was reused): only then can
    /// [`Self::route_is_down`] say yes. One relaxed load.
    #[inline]
    pub fn any_down(&self) -> bool {
        self.any_down.load(Ordering::Relaxed)
    }

    /// Whether a cached route names a DOWN upstream (and so must be raced
    /// again). Costs one relaxed load while every upstream is up. A retired
    /// discovered upstream counts as DOWN, and so does a URL the set no
    /// longer knows (its slot was recycled for another discovered one).
    #[inline]
    pub fn route_is_down(&self, upstreams: &Upstreams, upstream: &str) -> bool {
        if !self.any_down.load(Ordering::Relaxed) {
            return false;
        }
        let snap = self.health.load();
        let set = upstreams.current.load();
        let forgotten = || self.recycled.load(Ordering::Relaxed);
        snap.live > 0
            && set
                .index_of(upstream)
                .map_or_else(forgotten, |i| snap.is_down(i))
    }

    /// A discovered upstream's slot now serves another URL: routes naming
    /// the old URL must be checked on every hit from now on.
    pub fn forget_urls(&self) {
        self.recycled.store(true, Ordering::Relaxed);
        self.any_down.store(true, Ordering::Relaxed);
    }

    /// Hands a race winner's latency to the control thread; dropped when
    /// its queue is full.
    pub fn report_win(&self, upstream: usize, latency: Duration) {
        // A full queue only loses one EMA sample.
        let _ = self.samples.try_send(Sample { upstream, latency });
    }

    /// Candidates for one race: routable upstreams (not DOWN, unless all
    /// are) that are not cooling down (unless all are), in routing order;
    /// the cooling ones separately, as a fallback.
    pub fn plan_race(&self, set: &UpstreamSet, now: Instant) -> RacePlan {
        self.plan_race_skipping(set, now, |_, _| false)
    }

    /// [`Self::plan_race`] leaving out the upstreams `absent` rules out
    /// (a fresh index summary says the path is certainly not there:
    /// docs/index-routing.md). Those count in [`RacePlan::index_skipped`]
    /// and make the plan `partial`; they are not cooling fallbacks.
    pub fn plan_race_skipping(
        &self,
        set: &UpstreamSet,
        now: Instant,
        mut absent: impl FnMut(usize, &Upstream) -> bool,
    ) -> RacePlan {
        let snap = self.health.load();
        let routable = snap.routable();
        let mut index_skipped = 0;
        let mut all = Vec::with_capacity(routable.len());
        // `live`: the health snapshot may be older or newer than `set`.
        for &i in routable {
            let Some(up) = set.live(i) else { continue };
            if absent(i, up) {
                index_skipped += 1;
                continue;
            }
            all.push(Candidate {
                upstream: i,
                priority: up.priority,
            });
        }
        let (mut candidates, mut cooling): (Vec<Candidate>, Vec<Candidate>) = all
            .into_iter()
            .partition(|c| !self.limits.cooldowns.is_cooling(c.upstream, now));
        if candidates.is_empty() {
            std::mem::swap(&mut candidates, &mut cooling);
        }
        // Each tier is late by its own members' clock: a slow tier is not
        // hedged on a fast tier's latency (docs/routing.md, "Races and hedging").
        let mut hedge_after = Hedges::uniform(self.hedge_cap);
        for tier in candidates.chunk_by(|a, b| a.priority == b.priority) {
            let ranks = tier
                .iter()
                .filter_map(|c| snap.rank(c.upstream, c.priority));
            if !hedge_after.push(tier[0].priority, health::hedge_delay(ranks, self.hedge_cap)) {
                break;
            }
        }
        RacePlan {
            hedge_after,
            partial: candidates.len() + cooling.len() < set.live_len(),
            cooling,
            index_skipped,
            candidates,
            early: **self.early.load(),
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
