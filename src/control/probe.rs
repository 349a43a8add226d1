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

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::config::Config;
use crate::control::Job;
use crate::http::client::{ClientTimeouts, LocalClient, Origin, Request};
use crate::http::resolve::Resolver;
use crate::route::persist::{HealthRow, WriteOp, WriterHandle};
use crate::upstream::health::{HealthSnapshot, ProbeResult, State, UpstreamHealth};
use crate::upstream::{Routing, Sample, UpstreamSet};

/// Race samples change only EMAs; publishing them this often at most
/// keeps a busy proxy from building a snapshot per request.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Largest `/nix-cache-info` body read by a GET probe.
const CACHE_INFO_LIMIT: usize = 64 * 1024;

/// The probe knobs, validated by the config.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub alpha: f64,
}

/// Everything the prober needs, built on the main thread and moved to the
/// control thread by [`Prober::into_job`].
pub struct Prober {
    set: Arc<UpstreamSet>,
    routing: Arc<Routing>,
    samples: flume::Receiver<Sample>,
    table: Vec<UpstreamHealth>,
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
/// keeps it current.
pub fn setup(
    cfg: &Config,
    set: Arc<UpstreamSet>,
    rows: &[HealthRow],
    writer: Option<WriterHandle>,
    resolver: Resolver,
    tls: Arc<rustls::ClientConfig>,
) -> (Arc<Routing>, Prober) {
    let table = restore(&set, rows, Instant::now());
    let snap = HealthSnapshot::build(&set.priorities(), &table);
    let (routing, samples) = Routing::new(&set, cfg, snap);
    let routing = Arc::new(routing);
    let prober = Prober {
        set,
        routing: routing.clone(),
        samples,
        table,
        writer,
        resolver,
        tls,
        cfg: ProbeConfig {
            interval: cfg.health.probe_interval,
            timeout: cfg.health.probe_timeout,
            alpha: cfg.cache.latency_alpha,
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
    /// HEAD was refused: probe with GET.
    use_get: Vec<bool>,
    /// Changed since the last write to the database.
    dirty: Vec<bool>,
    /// The table changed since the last publication.
    unpublished: bool,
    last_publish: Instant,
    persist_at: Instant,
    samples_open: bool,
}

impl LoopState {
    fn new(n: usize, interval: Duration) -> LoopState {
        let now = Instant::now();
        LoopState {
            running: vec![false; n],
            use_get: vec![false; n],
            dirty: vec![false; n],
            unpublished: false,
            last_publish: now,
            persist_at: now + interval,
            samples_open: true,
        }
    }
}

enum Event {
    Probed(Probed),
    Sample(Sample),
    SamplesClosed,
    Tick,
}

impl Prober {
    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
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
        let set = self.set.clone();
        let mut st = LoopState::new(set.len(), self.cfg.interval);
        let mut probes = FuturesUnordered::new();
        loop {
            let now = Instant::now();
            for i in 0..set.len() {
                if !st.running[i] && self.table[i].next_probe <= now {
                    st.running[i] = true;
                    probes.push(probe(&client, &set.list[i].origin, i, st.use_get[i], t));
                }
            }
            let wake = monoio::time::Instant::from_std(self.next_wake(&st));
            let event = monoio::select! {
                Some(p) = probes.next(), if !probes.is_empty() => Event::Probed(p),
                s = self.samples.recv_async(), if st.samples_open => {
                    s.map_or(Event::SamplesClosed, Event::Sample)
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
            Event::Probed(p) => {
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
                while let Ok(s) = self.samples.try_recv() {
                    self.apply_sample(s, &mut st.dirty);
                }
                st.unpublished = true;
            }
            Event::SamplesClosed => st.samples_open = false,
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
            .filter(|(_, &r)| !r)
            .map(|(h, _)| h.next_probe)
            .min()
            .unwrap_or_else(|| Instant::now() + self.cfg.interval);
        if st.unpublished {
            wake = wake.min(st.last_publish + PUBLISH_EVERY);
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
        let snap = HealthSnapshot::build(&self.set.priorities(), &self.table);
        self.routing.publish(snap);
    }

    /// Queues the changed rows for the writer (never waits for it).
    fn persist(&self, dirty: &mut [bool]) {
        let Some(w) = &self.writer else {
            dirty.fill(false);
            return;
        };
        for (i, d) in dirty.iter_mut().enumerate() {
            if !std::mem::take(d) {
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

#[cfg(test)]
mod tests;
