//! COLD: per-tier statistics and the early-start rule (docs/routing.md,
//! "Early starts"). Workers count, per race tier, whether some member
//! answered 200 or every member answered a definite miss (counters in their
//! own [`WorkerMetrics`](crate::metrics::WorkerMetrics), on the tier's first
//! member). Once a second this job sums them over workers, folds them into
//! decaying per-priority counts (time constant `health.early_start_window`)
//! and decides, for each pair of adjacent tiers, whether the lower one
//! should start at once instead of after the upper one's answers. The
//! decision is published as an immutable [`EarlyStarts`] that workers load
//! once per race plan: nothing on the request path takes a lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::control::Job;
use crate::metrics::Metrics;
use crate::race::EarlyStarts;
use crate::upstream::{Routing, Upstreams};

/// How often the counters are read and the decision is remade.
const TICK: Duration = Duration::from_secs(1);

/// Tier outcomes (decayed) a tier needs before it may be skipped: a few
/// misses after a restart say little about the next thousand lookups.
pub const MIN_SAMPLES: f64 = 20.0;

/// How long the next tier waits once armed: it starts together with the
/// tier above. The budget already bounds the requests this can waste, the
/// upper tier's request is sent anyway (and, in an armed race, completes
/// in the background), and any delay here would be added to every lookup
/// the upper tier misses.
pub const EARLY_DELAY: Duration = Duration::ZERO;

/// One tier as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierStat {
    pub priority: i32,
    /// Routable upstreams in the tier.
    pub members: usize,
    /// Decayed counts of the tier's recent outcomes.
    pub found: f64,
    pub missed: f64,
}

/// The early-start rule. `tiers` in ascending priority, each with at least
/// one member. The tier after tier `k` is armed when `k` has at least
/// [`MIN_SAMPLES`] recent outcomes and starting its successor at once
/// would cost at most `budget` extra requests over sequential order:
///
/// with `f` the fraction of lookups tier `k` found, `n_k` and `n_{k+1}` the
/// member counts, sequential order sends `n_k + (1-f)·n_{k+1}` requests per
/// lookup that reaches tier `k`, starting at once sends `n_k + n_{k+1}`, so
/// the extra is `f·n_{k+1}`; armed when `f·n_{k+1} ≤ budget·(n_k +
/// (1-f)·n_{k+1})`. With one member each and the default budget of 0.1,
/// that is a tier that found at most 18% of recent lookups.
pub fn decide(tiers: &[TierStat], budget: f64) -> EarlyStarts {
    let mut early = EarlyStarts::NONE;
    if budget <= 0.0 {
        return early;
    }
    for pair in tiers.windows(2) {
        let (upper, next) = (pair[0], pair[1]);
        let total = upper.found + upper.missed;
        if total < MIN_SAMPLES || upper.members == 0 {
            continue;
        }
        let f = upper.found / total;
        let (nk, nn) = (upper.members as f64, next.members as f64);
        if f * nn <= budget * (nk + (1.0 - f) * nn) && !early.push(upper.priority, EARLY_DELAY) {
            break;
        }
    }
    early
}

/// The control job: reads the workers' tier counters and publishes
/// [`decide`]'s answer to [`Routing`].
pub struct TierWatch {
    metrics: Arc<Metrics>,
    upstreams: Arc<Upstreams>,
    routing: Arc<Routing>,
    budget: f64,
    window: Duration,
}

impl TierWatch {
    /// Under `resolution_policy = "strict"` the statistics are kept (and
    /// exported) but nothing is armed: pass `budget` 0.
    pub fn new(
        metrics: Arc<Metrics>,
        upstreams: Arc<Upstreams>,
        routing: Arc<Routing>,
        cfg: &crate::config::Config,
    ) -> TierWatch {
        let strict =
            cfg.cache.resolution_policy == crate::config::narinfo::ResolutionPolicy::Strict;
        TierWatch {
            metrics,
            upstreams,
            routing,
            budget: if strict {
                0.0
            } else {
                cfg.health.early_start_budget
            },
            window: cfg.health.early_start_window,
        }
    }

    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
    }

    async fn run(self) {
        let decay = (-TICK.as_secs_f64() / self.window.as_secs_f64()).exp();
        // Last cumulative (found, missed) per slot, and decayed counts per
        // priority.
        let mut seen: Vec<(u64, u64)> = Vec::new();
        let mut counts: BTreeMap<i32, (f64, f64)> = BTreeMap::new();
        let mut published = EarlyStarts::NONE;
        loop {
            monoio::time::sleep(TICK).await;
            let set = self.upstreams.load();
            let snap = self.routing.snapshot();
            for c in counts.values_mut() {
                c.0 *= decay;
                c.1 *= decay;
            }
            let mut members: BTreeMap<i32, usize> = BTreeMap::new();
            for &i in snap.routable() {
                if let Some(up) = set.live(i) {
                    *members.entry(up.priority).or_default() += 1;
                }
            }
            for (i, up) in set.list.iter().enumerate() {
                let found = self
                    .metrics
                    .workers
                    .iter()
                    .filter_map(|w| w.upstreams.get(i))
                    .map(|u| u.tier_found.get())
                    .sum::<u64>();
                let missed = self
                    .metrics
                    .workers
                    .iter()
                    .filter_map(|w| w.upstreams.get(i))
                    .map(|u| u.tier_missed.get())
                    .sum::<u64>();
                if seen.len() <= i {
                    seen.resize(i + 1, (0, 0));
                }
                let (f0, m0) = std::mem::replace(&mut seen[i], (found, missed));
                let c = counts.entry(up.priority).or_default();
                c.0 += found.wrapping_sub(f0) as f64;
                c.1 += missed.wrapping_sub(m0) as f64;
            }
            drop(snap);
            let tiers: Vec<TierStat> = members
                .iter()
                .map(|(&priority, &n)| {
                    let (found, missed) = counts.get(&priority).copied().unwrap_or_default();
                    TierStat {
                        priority,
                        members: n,
                        found,
                        missed,
                    }
                })
                .collect();
            let early = decide(&tiers, self.budget);
            self.metrics.tiers.set(
                tiers
                    .iter()
                    .map(|t| crate::metrics::tiers::TierRow {
                        priority: t.priority,
                        found: t.found,
                        missed: t.missed,
                        armed: early.after(t.priority).is_some(),
                    })
                    .collect(),
            );
            if early != published {
                tracing::info!(?tiers, ?early, "tier early starts changed");
                self.routing.publish_early(early);
                published = early;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(priority: i32, members: usize, found: f64, missed: f64) -> TierStat {
        TierStat {
            priority,
            members,
            found,
            missed,
        }
    }

    #[test]
    fn a_tier_that_mostly_misses_arms_its_successor() {
        let e = decide(&[tier(10, 1, 0.0, 50.0), tier(20, 1, 50.0, 0.0)], 0.1);
        assert_eq!(e.after(10), Some(EARLY_DELAY));
        assert_eq!(e.after(20), None);
    }

    #[test]
    fn a_tier_that_mostly_hits_or_has_few_samples_does_not() {
        assert!(decide(&[tier(10, 1, 40.0, 10.0), tier(20, 1, 0.0, 0.0)], 0.1).is_empty());
        assert!(decide(&[tier(10, 1, 0.0, 19.0), tier(20, 1, 0.0, 0.0)], 0.1).is_empty());
        assert!(decide(&[tier(10, 1, 0.0, 50.0), tier(20, 1, 0.0, 0.0)], 0.0).is_empty());
        // The last tier has no successor.
        assert!(decide(&[tier(10, 1, 0.0, 50.0)], 0.1).is_empty());
    }

    #[test]
    fn the_budget_is_the_threshold() {
        // One member each, budget b: armed while f <= 2b/(1+b).
        let at = |f: f64, b: f64| {
            !decide(
                &[
                    tier(1, 1, f * 100.0, (1.0 - f) * 100.0),
                    tier(2, 1, 0.0, 0.0),
                ],
                b,
            )
            .is_empty()
        };
        assert!(at(0.18, 0.1));
        assert!(!at(0.19, 0.1));
        assert!(at(0.66, 0.5));
        assert!(!at(0.67, 0.5));
        // A wider next tier costs more per early start.
        assert!(decide(&[tier(1, 1, 15.0, 85.0), tier(2, 3, 0.0, 0.0)], 0.1).is_empty());
        assert!(!decide(&[tier(1, 1, 15.0, 85.0), tier(2, 1, 0.0, 0.0)], 0.1).is_empty());
    }

    #[test]
    fn every_qualifying_pair_is_armed() {
        let e = decide(
            &[
                tier(1, 1, 0.0, 100.0),
                tier(2, 1, 5.0, 95.0),
                tier(3, 1, 100.0, 0.0),
                tier(4, 1, 0.0, 0.0),
            ],
            0.1,
        );
        assert!(e.after(1).is_some() && e.after(2).is_some());
        assert!(e.after(3).is_none());
    }
}
