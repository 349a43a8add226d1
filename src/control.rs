//! COLD: the control core. One thread, pinned to `server.control_cpu`,
//! running its own monoio runtime ([`crate::rt`]: io_uring, epoll
//! fallback; timers on) for background
//! work: health probes, mDNS discovery ([`discovery`]), upstream index
//! summaries ([`index`]), per-tier statistics for early starts
//! ([`tiers`]) and mesh gossip ([`crate::mesh`]). It publishes
//! immutable snapshots that workers read; it never serves
//! requests. Its jobs may be `!Send` (they own a per-thread
//! [`LocalClient`](crate::http::client::LocalClient), like a worker).
//! Work that needs tokio (S3 credential providers) gets its own thread.

pub mod discovery;
pub mod index;
pub mod probe;
pub mod tiers;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::rt::Warning;

/// A running control thread and the sender that stops it.
pub struct ControlHandle {
    pub thread: std::thread::JoinHandle<()>,
    /// Dropping or sending on it ends the runtime, and with it every job.
    stop: flume::Sender<()>,
}

impl ControlHandle {
    /// Stops the control thread and waits for it, at most `grace`.
    pub fn stop(self, grace: Duration) {
        let _ = self.stop.send(()); // the thread may already have exited
        let deadline = std::time::Instant::now() + grace;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

/// A background job: built on the control thread (so it may hold `Rc`s and
/// per-thread clients) and run there until the thread stops.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

pub fn spawn(cpu: Option<usize>, jobs: Vec<Job>) -> std::io::Result<ControlHandle> {
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let thread = std::thread::Builder::new().name("ncro-control".into()).spawn(move || {
        // Built here: a monoio runtime belongs to the thread that runs it.
        let built = crate::rt::build_pinned(cpu, |w| match w {
            Warning::Unpinned { cpu, error } => {
                tracing::warn!(cpu, error = ?error, "cannot pin the control thread; running unpinned");
            }
            Warning::Epoll(e) => {
                tracing::warn!(error = %e, "cannot set up io_uring; the control thread uses epoll");
            }
        });
        let mut rt = match built {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e)); // spawn() is waiting for this
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        rt.block_on(async move {
            // Polled here rather than spawned, so that stopping drops every
            // job (and the I/O it has in flight) while the runtime still
            // runs: see [`crate::rt::settle`].
            let jobs = futures_util::future::join_all(jobs.into_iter().map(|job| job()));
            monoio::select! {
                _ = jobs => {}
                _ = stop_rx.recv_async() => {} // a dropped sender means stop too
            }
            crate::rt::settle().await;
        });
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(ControlHandle {
            thread,
            stop: stop_tx,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other(
            "the control thread exited during start",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_jobs_until_stopped() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        let job: Job = Box::new(move || {
            // Built on the control thread: an Rc is fine here.
            let local = std::rc::Rc::new(t);
            Box::pin(async move {
                loop {
                    local.fetch_add(1, Ordering::SeqCst);
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        });
        let h = spawn(None, vec![job]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ticks.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ticks.load(Ordering::SeqCst) >= 3);
        h.stop(Duration::from_secs(2));
    }
}
