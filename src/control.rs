//! The control core: one thread, pinned to `server.control_cpu`, running a
//! tokio current-thread runtime for background work (health probes,
//! discovery, gossip, S3 credentials) so none of it ever runs on a worker.
//! It publishes immutable snapshots that workers read; it never serves
//! requests.

use std::time::Duration;

/// A running control thread and the sender that stops it.
pub struct ControlHandle {
    pub thread: std::thread::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
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

/// Background jobs the control thread runs until stopped.
pub type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub fn spawn(cpu: Option<usize>, jobs: Vec<Job>) -> std::io::Result<ControlHandle> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new().name("ncro-control".into()).spawn(move || {
        if let Some(cpu) = cpu {
            if let Err(e) = monoio::utils::bind_to_cpu_set(Some(cpu)) {
                tracing::warn!(cpu, error = ?e, "cannot pin the control thread; running unpinned");
            }
        }
        rt.block_on(async move {
            for job in jobs {
                tokio::spawn(job);
            }
            let _ = stop_rx.await; // a dropped sender means stop too
        });
    })?;
    Ok(ControlHandle {
        thread,
        stop: stop_tx,
    })
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
        let job: Job = Box::pin(async move {
            loop {
                t.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
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
