//! COLD: the health prober on the control thread.
//!
//! Every upstream gets `HEAD /nix-cache-info` when its probe is due
//! (`health.probe_interval` times its state's backoff), bounded by
//! `health.probe_timeout`. An upstream that refuses HEAD (Harmonia answers
//! it with an error status) is asked with GET instead, from then on.
//! Results, and the race winners' latencies that workers send over a
//! bounded channel, update the table ([`UpstreamHealth`] per upstream);
//! each change is published to workers as a new [`HealthSnapshot`], and
//! changed rows go to the SQLite writer at most once per probe interval.
//!
//! The prober is also the only writer of the upstream set: discovery sends
//! it the discovered URLs that are live ([`Discovered`]); it reconciles the
//! set's slots with them (see [`crate::upstream::slots`]), publishes the new
//! set, then the health snapshot that covers it. With `health.enabled =
//! false` it runs for that alone: no probes, and race samples are not read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::config::Config;
use crate::control::discovery::Discovered;
use crate::control::Job;
use crate::http::client::{ClientTimeouts, LocalClient, Origin, Request};
use crate::http::resolve::Resolver;
use crate::route::persist::{HealthRow, WriteOp, WriterHandle};
use crate::route::RouteTable;
use crate::upstream::health::{HealthSnapshot, ProbeResult, State, UpstreamHealth};
use crate::upstream::slots::Slot;
use crate::upstream::{Routing, Sample, UpstreamSet, Upstreams};

/// Race samples change only EMAs; publishing them this often at most
/// keeps a busy proxy from building a snapshot per request.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// After a batch of latency samples, the control thread stops listening
/// for more for this long: they queue (`SAMPLE_QUEUE` holds 4,096, far more
/// than a pause's worth at any miss rate) and are taken together. Each
/// sample would otherwise wake this thread from another core (an eventfd
/// write on the worker, a wake-up and a park here), a few microseconds of
/// CPU per race won; the EMAs are published every `PUBLISH_EVERY` anyway.
const SAMPLE_PAUSE: Duration = Duration::from_millis(20);
/// Largest `/nix-cache-info` body read by a GET probe.
const CACHE_INFO_LIMIT: usize = 64 * 1024;
/// Discovery's updates queued for the prober. Each one is the whole live
/// list, so a short queue loses nothing that the next update does not say.
const DISCOVERED_QUEUE: usize = 16;

/// The probe knobs, validated by the config.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub alpha: f64,
    /// `health.enabled`.
    pub probing: bool,
}

/// Everything the prober needs, built on the main thread and moved to the
/// control thread by [`Prober::into_job`].
pub struct Prober {
    /// The set last published in `upstreams`.
    set: Arc<UpstreamSet>,
    upstreams: Arc<Upstreams>,
    routing: Arc<Routing>,
    /// Race winners' latencies; `None` with probes off
    /// (`health.enabled = false` has never fed them back).
    samples: Option<flume::Receiver<Sample>>,
    /// Discovery's updates; `None` unless [`Self::discovery_sender`] was
    /// called (discovery is off).
    discovered: Option<flume::Receiver<Discovered>>,
    /// Discovered URLs whose refusal (configured twin, no free slot) was
    /// logged, so an unchanged refusal is logged once.
    noted: std::collections::HashSet<String>,
    table: Vec<UpstreamHealth>,
    /// Told of every slot (re)assignment before the set naming it is
    /// published, so a reused slot never serves its old URL's routes.
    routes: Option<Arc<RouteTable>>,
    writer: Option<WriterHandle>,
    resolver: Resolver,
    tls: Arc<rustls::ClientConfig>,
    cfg: ProbeConfig,
}

/// The health table for `set` from persisted rows: rows of upstreams no
/// longer configured are ignored, upstreams without a row start fresh.
pub fn restore(set: &UpstreamSet, rows: &[HealthRow], now: Instant) -> Vec<UpstreamHealth> {
    let mut table = vec![UpstreamHealth::new(now); set.len()];
    for row in rows {
        if let Some(i) = set.index_of(&row.url) {
            table[i] = UpstreamHealth::restored(
                row.ema_latency,
                row.consecutive_fails,
                row.total_queries,
                now,
            );
        }
    }
    table
}

/// Builds the shared routing state (starting from the restored health, so
/// a restored DOWN applies before the first probe) and the prober that
/// keeps it and the upstream set current.
pub fn setup(
    cfg: &Config,
    upstreams: Arc<Upstreams>,
    rows: &[HealthRow],
    writer: Option<WriterHandle>,
    resolver: Resolver,
    tls: Arc<rustls::ClientConfig>,
) -> (Arc<Routing>, Prober) {
    let set = upstreams.load();
    let table = restore(&set, rows, Instant::now());
    let snap = HealthSnapshot::build_present(&set.priorities(), &table, |i| set.is_live(i));
    let (routing, samples) = Routing::new(&set, cfg, snap);
    let routing = Arc::new(routing);
    let prober = Prober {
        set,
        upstreams,
        routing: routing.clone(),
        samples: cfg.health.enabled.then_some(samples),
        discovered: None,
        noted: Default::default(),
        table,
        routes: None,
        writer,
        resolver,
        tls,
        cfg: ProbeConfig {
            interval: cfg.health.probe_interval,
            timeout: cfg.health.probe_timeout,
            alpha: cfg.cache.latency_alpha,
            probing: cfg.health.enabled,
        },
    };
    (routing, prober)
}

/// One probe's result, tagged with its upstream.
struct Probed {
    upstream: usize,
    result: ProbeResult,
    /// The upstream refused HEAD but answered GET.
    needs_get: bool,
}

/// The prober loop's bookkeeping, per upstream and overall.
struct LoopState {
    /// A probe is in flight (never two at once per upstream).
    running: Vec<bool>,
    /// Bumped when a slot is retired or given a new upstream, so that a
    /// probe still in flight for its earlier life is ignored.
    life: Vec<u32>,
    /// HEAD was refused: probe with GET.
    use_get: Vec<bool>,
    /// Changed since the last write to the database.
    dirty: Vec<bool>,
    /// The table changed since the last publication.
    unpublished: bool,
    last_publish: Instant,
    persist_at: Instant,
    samples_open: bool,
    /// Samples are listened for again from then on ([`SAMPLE_PAUSE`]).
    samples_at: Instant,
    discovered_open: bool,
}

impl LoopState {
    fn new(n: usize, interval: Duration, samples_open: bool, discovered_open: bool) -> LoopState {
        let now = Instant::now();
        LoopState {
            running: vec![false; n],
            life: vec![0; n],
            use_get: vec![false; n],
            dirty: vec![false; n],
            unpublished: false,
            last_publish: now,
            persist_at: now + interval,
            samples_open,
            samples_at: now,
            discovered_open,
        }
    }

    /// Slot `i` starts a new life: a new upstream, or none.
    fn renew(&mut self, i: usize) {
        if i >= self.running.len() {
            let n = i + 1;
            self.running.resize(n, false);
            self.life.resize(n, 0);
            self.use_get.resize(n, false);
            self.dirty.resize(n, false);
        }
        self.running[i] = false;
        self.life[i] = self.life[i].wrapping_add(1);
        self.use_get[i] = false;
        self.dirty[i] = false;
    }
}

enum Event {
    /// A probe's result and the life of the slot it was sent for.
    Probed(u32, Probed),
    Sample(Sample),
    SamplesClosed,
    Discovered(Discovered),
    DiscoveredClosed,
    Tick,
}

/// The next message of `rx`; never ready without a receiver.
async fn recv_or_pending<T>(rx: Option<&flume::Receiver<T>>) -> Result<T, flume::RecvError> {
    match rx {
        Some(rx) => rx.recv_async().await,
        None => std::future::pending().await,
    }
}

impl Prober {
    /// Keeps `routes`' upstream slots in step with the sets this prober
    /// publishes.
    pub fn follow_routes(&mut self, routes: Arc<RouteTable>) {
        self.routes = Some(routes);
    }

    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
    }

    /// Where discovery sends the live discovered URLs.
    pub fn discovery_sender(&mut self) -> flume::Sender<Discovered> {
        let (tx, rx) = flume::bounded(DISCOVERED_QUEUE);
        self.discovered = Some(rx);
        tx
    }

    async fn run(mut self) {
        let t = self.cfg.timeout;
        let timeouts = ClientTimeouts {
            connect: t,
            first_byte: t,
            idle: t,
        };
        let client = LocalClient::new(
            self.resolver.clone(),
            self.tls.clone(),
            timeouts,
            Default::default(),
        );
        let (samples, discovered) = (self.samples.is_some(), self.discovered.is_some());
        let mut st = LoopState::new(self.set.len(), self.cfg.interval, samples, discovered);
        let mut probes = FuturesUnordered::new();
        let client = &client;
        loop {
            let now = Instant::now();
            for i in (0..self.set.len()).filter(|_| self.cfg.probing) {
                if self.set.is_live(i) && !st.running[i] && self.table[i].next_probe <= now {
                    st.running[i] = true;
                    let (up, life, get) = (self.set.list[i].clone(), st.life[i], st.use_get[i]);
                    probes.push(async move { (life, probe(client, &up.origin, i, get, t).await) });
                }
            }
            let wake = monoio::time::Instant::from_std(self.next_wake(&st));
            let event = monoio::select! {
                Some((life, p)) = probes.next(), if !probes.is_empty() => Event::Probed(life, p),
                s = recv_or_pending(self.samples.as_ref()), if st.samples_open && now >= st.samples_at => {
                    s.map_or(Event::SamplesClosed, Event::Sample)
                }
                d = recv_or_pending(self.discovered.as_ref()), if st.discovered_open => {
                    d.map_or(Event::DiscoveredClosed, Event::Discovered)
                }
                _ = monoio::time::sleep_until(wake) => Event::Tick,
            };
            self.handle(event, &mut st, Instant::now());
            if Instant::now() >= st.persist_at {
                self.persist(&mut st.dirty);
                client.evict_expired();
                st.persist_at = Instant::now() + self.cfg.interval;
            }
        }
    }

    fn handle(&mut self, event: Event, st: &mut LoopState, now: Instant) {
        match event {
            // A retired or recycled slot's late answer.
            Event::Probed(life, p) if st.life.get(p.upstream) != Some(&life) => {}
            Event::Probed(_, p) => {
                st.running[p.upstream] = false;
                st.use_get[p.upstream] |= p.needs_get;
                st.dirty[p.upstream] = true;
                self.apply_probe(p, now);
                // Probes are rare and may change states: publish at once.
                self.publish();
                (st.unpublished, st.last_publish) = (false, now);
            }
            Event::Sample(s) => {
                self.apply_sample(s, &mut st.dirty);
                while let Some(s) = self.samples.as_ref().and_then(|r| r.try_recv().ok()) {
                    self.apply_sample(s, &mut st.dirty);
                }
                st.unpublished = true;
                st.samples_at = now + SAMPLE_PAUSE;
            }
            Event::SamplesClosed => st.samples_open = false,
            Event::Discovered(d) => {
                if self.reconcile(d, st, now) {
                    (st.unpublished, st.last_publish) = (false, now);
                }
            }
            Event::DiscoveredClosed => st.discovered_open = false,
            Event::Tick => {}
        }
        if st.unpublished && now >= st.last_publish + PUBLISH_EVERY {
            self.publish();
            (st.unpublished, st.last_publish) = (false, now);
        }
    }

    /// The earliest of: a probe falling due, a pending publication, a
    /// pending write of changed rows.
    fn next_wake(&self, st: &LoopState) -> Instant {
        let mut wake = self
            .table
            .iter()
            .zip(&st.running)
            .enumerate()
            .filter(|&(i, (_, &r))| !r && self.cfg.probing && self.set.is_live(i))
            .map(|(_, (h, _))| h.next_probe)
            .min()
            .unwrap_or_else(|| Instant::now() + self.cfg.interval);
        if st.unpublished {
            wake = wake.min(st.last_publish + PUBLISH_EVERY);
        }
        if st.samples_open && st.samples_at > Instant::now() {
            wake = wake.min(st.samples_at);
        }
        if st.dirty.iter().any(|&d| d) {
            wake = wake.min(st.persist_at);
        }
        wake
    }

    fn apply_probe(&mut self, p: Probed, now: Instant) {
        let c = self.cfg;
        let h = &mut self.table[p.upstream];
        let had_cache_info = h.cache_info;
        let (before, after) = h.record_probe(p.result, c.alpha, c.interval, now);
        let url = &self.set.list[p.upstream].url;
        if before != after {
            let fails = h.consecutive_fails;
            match after {
                State::Active => {
                    tracing::info!(upstream = %url, from = before.label(), "upstream is ACTIVE again")
                }
                _ => {
                    tracing::warn!(upstream = %url, from = before.label(), to = after.label(), consecutive_fails = fails, "upstream health changed")
                }
            }
        } else if p.result == ProbeResult::Failed {
            tracing::debug!(upstream = %url, consecutive_fails = h.consecutive_fails, "health probe failed");
        }
        if h.cache_info == Some(false) && had_cache_info != Some(false) {
            tracing::warn!(upstream = %url, "upstream has no /nix-cache-info (404); its answer still counts as alive");
        }
    }

    fn apply_sample(&mut self, s: Sample, dirty: &mut [bool]) {
        if !self.set.is_live(s.upstream) {
            return; // won a race that started before its slot was retired
        }
        if let Some(h) = self.table.get_mut(s.upstream) {
            let before = h.state();
            h.record_latency(s.latency, self.cfg.alpha);
            dirty[s.upstream] = true;
            if before != State::Active {
                let url = &self.set.list[s.upstream].url;
                tracing::info!(upstream = %url, from = before.label(), "upstream won a race; ACTIVE again");
            }
        }
    }

    fn publish(&self) {
        let set = &self.set;
        let snap =
            HealthSnapshot::build_present(&set.priorities(), &self.table, |i| set.is_live(i));
        self.routing.publish(snap);
    }

    /// Queues the changed rows for the writer (never waits for it).
    fn persist(&self, dirty: &mut [bool]) {
        let Some(w) = &self.writer else {
            dirty.fill(false);
            return;
        };
        for (i, d) in dirty.iter_mut().enumerate() {
            // Discovered upstreams start fresh when they (re)appear, so
            // their rows would only pile up in the database.
            let configured = self.set.slot(i) == Some(Slot::Configured);
            if !std::mem::take(d) || !configured {
                continue;
            }
            let h = &self.table[i];
            let row = HealthRow {
                url: self.set.list[i].url.to_string(),
                ema_latency: h.ema_ms.unwrap_or(0.0),
                consecutive_fails: h.consecutive_fails,
                total_queries: h.total_queries,
            };
            // A refusal is counted by the writer; the next change retries.
            let _queued = w.try_write(WriteOp::Health(row));
        }
    }
}

/// One probe of `origin`, bounded by `timeout` as a whole.
async fn probe(
    client: &LocalClient,
    origin: &Origin,
    upstream: usize,
    use_get: bool,
    timeout: Duration,
) -> Probed {
    let run = async {
        if !use_get {
            match ask(client, origin, false).await {
                Answer::Ok(latency) => {
                    return (
                        ProbeResult::Up {
                            latency,
                            cache_info: true,
                        },
                        false,
                    )
                }
                Answer::Failed => return (ProbeResult::Failed, false),
                Answer::Status(_) => {} // refused or unknown: try GET
            }
        }
        match ask(client, origin, true).await {
            Answer::Ok(latency) => (
                ProbeResult::Up {
                    latency,
                    cache_info: true,
                },
                !use_get,
            ),
            Answer::Status((404 | 410, latency)) => (
                ProbeResult::Up {
                    latency,
                    cache_info: false,
                },
                !use_get,
            ),
            Answer::Status(_) | Answer::Failed => (ProbeResult::Failed, false),
        }
    };
    let (result, needs_get) = monoio::time::timeout(timeout, run)
        .await
        .unwrap_or((ProbeResult::Failed, false));
    Probed {
        upstream,
        result,
        needs_get,
    }
}

/// What one probe request got.
enum Answer {
    /// 2xx (with the whole body, for a GET), after this long.
    Ok(Duration),
    /// Any other status, and how long it took.
    Status((u16, Duration)),
    /// Transport error or a body that could not be read.
    Failed,
}

async fn ask(client: &LocalClient, origin: &Origin, get: bool) -> Answer {
    let started = Instant::now();
    let req = if get {
        Request::get("/nix-cache-info")
    } else {
        Request::head("/nix-cache-info")
    };
    let resp = match client.send(origin, &req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(upstream = %origin, error = %e, "health probe request failed");
            return Answer::Failed;
        }
    };
    let status = resp.status();
    // Reading the body keeps the connection reusable for the next probe.
    let body = if get {
        resp.read_to_end(CACHE_INFO_LIMIT).await.is_ok()
    } else {
        drop(resp);
        true
    };
    match (status, body) {
        (200..=299, true) => Answer::Ok(started.elapsed()),
        (200..=299, false) => Answer::Failed,
        (s, _) => Answer::Status((s, started.elapsed())),
    }
}

mod reconcile;
#[cfg(test)]
mod tests;
