//! One race's tier bookkeeping for the early-start rule (docs/routing.md,
//! "Early starts"): each tier's outcome (some member answered 200, or every
//! member answered a definite miss) goes to the worker's counters for the
//! control thread's statistics (`control::tiers`), and every request that
//! an armed early start sent before the tier above had answered is counted
//! by what that tier then said. Worker-local: an `Rc<RefCell>` shared by the
//! race's attempts, no lock.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::metrics::WorkerMetrics;
use crate::race::{Attempt, Candidate, EarlyStarts};

struct Tier {
    priority: i32,
    /// The tier's first candidate: its outcome is counted there.
    leader: usize,
    members: usize,
    missed: usize,
    /// The outcome is known (and counted); later answers change nothing.
    done: bool,
    /// Requests to the next tier sent while this one had not answered.
    early_requests: u64,
}

pub(super) struct TierTrack {
    /// Tier ordinal of each candidate, by position in `candidates`.
    tier_of: Vec<(usize, usize)>,
    tiers: Vec<Tier>,
    early: EarlyStarts,
    metrics: Arc<WorkerMetrics>,
}

impl TierTrack {
    /// Bookkeeping for a race over `candidates` (in tier order).
    pub(super) fn new(
        candidates: &[Candidate],
        early: EarlyStarts,
        metrics: Arc<WorkerMetrics>,
    ) -> Rc<RefCell<TierTrack>> {
        let mut tiers: Vec<Tier> = Vec::new();
        let mut tier_of = Vec::with_capacity(candidates.len());
        for c in candidates {
            match tiers.last_mut() {
                Some(t) if t.priority == c.priority => t.members += 1,
                _ => tiers.push(Tier {
                    priority: c.priority,
                    leader: c.upstream,
                    members: 1,
                    missed: 0,
                    done: false,
                    early_requests: 0,
                }),
            }
            tier_of.push((c.upstream, tiers.len() - 1));
        }
        Rc::new(RefCell::new(TierTrack {
            tier_of,
            tiers,
            early,
            metrics,
        }))
    }

    fn tier(&self, upstream: usize) -> Option<usize> {
        self.tier_of
            .iter()
            .find(|&&(u, _)| u == upstream)
            .map(|&(_, t)| t)
    }

    /// A request to `upstream` is being sent. Returns whether it must run
    /// to its end even if the race is decided first (its tier is armed:
    /// the next tier may win before it answers, and its answer is the
    /// statistics' only evidence; letting it finish also keeps its
    /// connection instead of closing it).
    pub(super) fn launched(&mut self, upstream: usize) -> bool {
        let Some(t) = self.tier(upstream) else {
            return false; // a cooling-down fallback: not part of the tiers
        };
        if let Some(above) = t.checked_sub(1).map(|a| &mut self.tiers[a]) {
            if !above.done && self.early.after(above.priority).is_some() {
                above.early_requests += 1;
            }
        }
        self.early.after(self.tiers[t].priority).is_some()
    }

    /// `upstream` answered `attempt`.
    pub(super) fn finished(&mut self, upstream: usize, attempt: &Attempt) {
        let Some(t) = self.tier(upstream) else {
            return;
        };
        let tier = &mut self.tiers[t];
        if tier.done {
            return;
        }
        // 0 useful, 1 wasted, 2 unknown (metrics::EARLY_START_RESULTS).
        let settled = match attempt {
            Attempt::Found(_) => {
                if let Some(u) = self.metrics.upstreams.get(tier.leader) {
                    u.tier_found.inc();
                }
                1
            }
            Attempt::NotFound => {
                tier.missed += 1;
                if tier.missed < tier.members {
                    return;
                }
                if let Some(u) = self.metrics.upstreams.get(tier.leader) {
                    u.tier_missed.inc();
                }
                0
            }
            Attempt::Failed(_) => 2,
        };
        tier.done = true;
        self.metrics.early_starts[settled].add(tier.early_requests);
    }
}
