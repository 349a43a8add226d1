//! COLD: mDNS discovery of LAN caches, a job on the control core.
//!
//! mdns-sd runs its own daemon thread and reports through a flume
//! receiver, which this job awaits on the control runtime (monoio's `sync`
//! feature lets the daemon thread wake it), so nothing here blocks.
//!
//! Discovery runs in rounds of `discovery.discovery_time` (at least
//! [`MIN_ROUND`]). Each round browses `<service_name>.<domain>.` afresh:
//! ending the browse empties mdns-sd's cache of that type, so every
//! `ServiceResolved` of the next round comes from an answer heard in it,
//! never from a cached record. (mdns-sd reports a resolved service only
//! when its records are new or changed, so with one long browse a cache that
//! keeps answering looks exactly like one that went quiet; ncro 2.2 expired
//! live caches for that reason.) Every routable address of a resolved
//! service becomes an upstream URL ([`track::urls`]); a URL stays live
//! while some round hears it and is dropped after [`SILENT_ROUNDS`] rounds
//! without. Goodbye packets are not acted on: a cache that restarts sends
//! one and is back seconds later.
//!
//! The job owns no upstream state: it sends the live list to the prober
//! ([`Discovered`]), which keeps the upstream set (see
//! `control/probe/reconcile.rs`).

pub mod track;

use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent};

use crate::config::raw::RawDiscovery;
use crate::config::AddressFamily;
use crate::control::Job;
pub use track::Found;
use track::Tracker;

/// Shortest round: the first query of a browse waits 20-120 ms (RFC 6762
/// jitter) and a responder as long again, so a shorter round may hear
/// nothing at all.
pub const MIN_ROUND: Duration = Duration::from_secs(1);
/// Rounds without an answer after which a URL is dropped.
pub const SILENT_ROUNDS: u32 = 3;

/// What discovery tells the prober: every URL heard within the last
/// [`SILENT_ROUNDS`] rounds. Sent whenever that list changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// `discovery.priority`, for every discovered upstream.
    pub priority: i32,
    pub found: Vec<Found>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot start the mDNS daemon: {0}")]
    Daemon(mdns_sd::Error),
    #[error("cannot browse {ty} (mDNS browses only `.local` domains): {source}")]
    Browse { ty: String, source: mdns_sd::Error },
}

/// `_nix-serve._tcp` + `local` -> `_nix-serve._tcp.local.` (stray dots of
/// either part are trimmed, as ncro 2.2 did).
pub fn service_type(service_name: &str, domain: &str) -> String {
    let name = service_name.trim().trim_matches('.');
    let domain = domain.trim().trim_matches('.');
    format!("{name}.{domain}.")
}

/// A started discovery: the mDNS daemon and its first browse.
pub struct Discovery {
    daemon: ServiceDaemon,
    ty: String,
    round: Duration,
    priority: i32,
    family: AddressFamily,
    /// The first round's events; later rounds browse afresh.
    first: Option<mdns_sd::Receiver<ServiceEvent>>,
    /// To the prober. Closed when the prober ends (the job then ends too).
    tx: flume::Sender<Discovered>,
}

impl Discovery {
    /// Starts the mDNS daemon and the first browse, on the calling thread,
    /// so that a service type mdns-sd refuses stops ncro at start.
    pub fn start(
        cfg: &RawDiscovery,
        tx: flume::Sender<Discovered>,
    ) -> Result<Discovery, DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(DiscoveryError::Daemon)?;
        let ty = service_type(&cfg.service_name, &cfg.domain);
        let first = match daemon.browse(&ty) {
            Ok(rx) => rx,
            Err(source) => {
                // Only the handle goes away otherwise; stop the thread too.
                let _stopping = daemon.shutdown();
                return Err(DiscoveryError::Browse { ty, source });
            }
        };
        let round = cfg.discovery_time.0.max(MIN_ROUND);
        if round != cfg.discovery_time.0 {
            tracing::warn!(discovery_time = ?cfg.discovery_time.0, round = ?round, "discovery.discovery_time is below the shortest useful round; using the minimum");
        }
        tracing::info!(service = %ty, round = ?round, priority = cfg.priority, address_family = ?cfg.address_family, "mDNS discovery started");
        Ok(Discovery {
            daemon,
            ty,
            round,
            priority: cfg.priority,
            family: cfg.address_family,
            first: Some(first),
            tx,
        })
    }

    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
    }

    async fn run(mut self) {
        let mut tracker = Tracker::new(self.round * SILENT_ROUNDS);
        let mut events = self.first.take();
        let mut failing = false;
        loop {
            let until = Instant::now() + self.round;
            let open = match events.take() {
                Some(rx) => self.listen(&rx, &mut tracker, until).await,
                None => {
                    monoio::time::sleep_until(monoio::time::Instant::from_std(until)).await;
                    true
                }
            };
            if !open {
                return; // the prober is gone: ncro is stopping
            }
            // Also empties mdns-sd's cache of this type (see the module doc).
            let stopped = self.daemon.stop_browse(&self.ty);
            let browsed = stopped.and_then(|()| self.daemon.browse(&self.ty));
            match browsed {
                Ok(rx) => {
                    failing = false;
                    events = Some(rx);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(service = %self.ty, error = %e, "mDNS browse failed; retrying every round");
                }
                Err(e) => {
                    tracing::debug!(service = %self.ty, error = %e, "mDNS browse failed again")
                }
            }
            if tracker.expire(Instant::now()) && !self.send(&tracker).await {
                return;
            }
        }
    }

    /// Handles `rx`'s events until `until`; false once the prober is gone.
    async fn listen(
        &self,
        rx: &mdns_sd::Receiver<ServiceEvent>,
        tracker: &mut Tracker,
        until: Instant,
    ) -> bool {
        let deadline = monoio::time::Instant::from_std(until);
        loop {
            let event = monoio::select! {
                e = rx.recv_async() => e,
                _ = monoio::time::sleep_until(deadline) => return true,
            };
            let service = match event {
                Ok(ServiceEvent::ServiceResolved(s)) => s,
                Ok(other) => {
                    tracing::trace!(event = ?other, "mDNS event");
                    continue;
                }
                Err(_) => {
                    // mdns-sd ended this browse (its daemon stopped, or the
                    // queue overflowed): wait for the next round's.
                    monoio::time::sleep_until(deadline).await;
                    return true;
                }
            };
            let addrs = service.addresses.iter().map(|a| a.to_ip_addr());
            let urls = track::urls(service.port, addrs, self.family);
            tracing::debug!(instance = %service.fullname, host = %service.host, port = service.port, addresses = ?service.addresses, urls = ?urls, "mDNS service resolved");
            let found = urls.into_iter().map(|url| Found {
                url,
                instance: service.fullname.clone(),
            });
            if tracker.heard(found, Instant::now()) && !self.send(tracker).await {
                return false;
            }
        }
    }

    async fn send(&self, tracker: &Tracker) -> bool {
        let update = Discovered {
            priority: self.priority,
            found: tracker.live(),
        };
        self.tx.send_async(update).await.is_ok()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        // Ends mdns-sd's daemon thread; nobody waits for its answer.
        let _stopping = self.daemon.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_type_trims_dots_like_ncro_22() {
        assert_eq!(
            service_type("_nix-serve._tcp", "local"),
            "_nix-serve._tcp.local."
        );
        assert_eq!(
            service_type("_nix-serve._tcp.", ".local."),
            "_nix-serve._tcp.local."
        );
        assert_eq!(
            service_type(" _harmonia._tcp ", "local"),
            "_harmonia._tcp.local."
        );
    }
}
