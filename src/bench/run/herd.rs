//! Rounds of the `narinfo-herd` scenario, shared by every client thread:
//! all connections wait for round `k` to open, ask for the same hash, and
//! the last one to get its answer opens round `k + 1` (or ends the run).
//! That makes every round a thundering herd on one fresh hash, which is
//! what single-flight must turn into one upstream request.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Round value that ends the run.
const STOP: u64 = u64::MAX;

#[derive(Debug)]
pub struct Herd {
    connections: u64,
    rounds: u64,
    /// Connections finished with a round, counted over all rounds: round
    /// `k` is complete at `connections * (k + 1)`.
    finished: AtomicU64,
    /// The open round (or [`STOP`]). A watch channel wakes waiting tasks on
    /// every client thread (monoio's `sync` feature carries the wake-ups).
    round: watch::Sender<u64>,
}

impl Herd {
    /// `rounds` is at least 1.
    pub fn new(connections: usize, rounds: u64) -> Herd {
        Herd {
            connections: connections.max(1) as u64,
            rounds: rounds.max(1),
            finished: AtomicU64::new(0),
            round: watch::Sender::new(0),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.round.subscribe()
    }

    /// Waits until round `k` opens; false once the run is over.
    pub async fn wait(rx: &mut watch::Receiver<u64>, k: u64) -> bool {
        match rx.wait_for(|&r| r >= k).await {
            Ok(r) => *r != STOP,
            Err(_) => false,
        }
    }

    /// Called by every connection once per round, success or not (a
    /// connection that skipped it would stall the others). The last one
    /// opens the next round, unless the run is `over` or out of rounds.
    pub fn finish(&self, k: u64, over: bool) {
        let done = self.finished.fetch_add(1, Ordering::AcqRel) + 1;
        if done == self.connections * (k + 1) {
            let next = if over || k + 1 >= self.rounds {
                STOP
            } else {
                k + 1
            };
            self.round.send_replace(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_connection_opens_the_next_round_and_the_end_stops_everyone() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let herd = Herd::new(2, 3);
        let mut rx = herd.subscribe();
        rt.block_on(async {
            assert!(Herd::wait(&mut rx, 0).await);
            herd.finish(0, false);
            assert_eq!(*rx.borrow(), 0, "one of two finished: round 0 still open");
            herd.finish(0, false);
            assert!(Herd::wait(&mut rx, 1).await);
            herd.finish(1, false);
            herd.finish(1, true); // the run's end was reached
            assert!(!Herd::wait(&mut rx, 2).await);
        });
        let herd = Herd::new(1, 1);
        let mut rx = herd.subscribe();
        herd.finish(0, false);
        assert!(!rt.block_on(Herd::wait(&mut rx, 1)), "out of rounds");
    }
}
