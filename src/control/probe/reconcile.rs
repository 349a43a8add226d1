//! COLD: the prober applies discovery's live list to the upstream set.
//!
//! Discovery sends the whole list of discovered URLs that answered
//! recently; the set's discovered slots are brought in line with it:
//! a live slot missing from the list is retired, a listed URL gets a slot
//! (a new one, its old one, or a recycled one). The new set is published
//! first, then the health snapshot that covers it, so a worker never finds
//! a slot in the health snapshot that its set lacks (it may find the
//! opposite, and skips such a slot).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::{LoopState, Prober};
use crate::control::discovery::{Discovered, Found};
use crate::upstream::health::UpstreamHealth;
use crate::upstream::slots::{Joined, Slot};
use crate::upstream::UpstreamSet;

impl Prober {
    /// Applies `d`; returns whether the set (and so the health snapshot)
    /// was published again.
    pub(super) fn reconcile(&mut self, d: Discovered, st: &mut LoopState, now: Instant) -> bool {
        let mut next = (*self.set).clone();
        let wanted: HashSet<&str> = d.found.iter().map(|f| f.url.as_str()).collect();
        let mut changed = false;
        for i in 0..next.len() {
            let url = next.list[i].url.clone();
            if next.slot(i) == Some(Slot::Discovered) && !wanted.contains(&*url) {
                next.retire(&url, now);
                st.renew(i);
                tracing::info!(url = %url, "removing stale peer");
                changed = true;
            }
        }
        for f in &d.found {
            changed |= self.join(&mut next, f, d.priority, st, now);
        }
        self.noted.retain(|url| wanted.contains(url.as_str()));
        if changed {
            if let Some(routes) = &self.routes {
                // Before publishing: a worker that sees a reused slot must
                // already find its old URL's routes invalid.
                for (i, u) in next.list.iter().enumerate() {
                    routes.assign(i, &u.url);
                }
            }
            let next = Arc::new(next);
            self.upstreams.publish(next.clone());
            self.set = next;
            self.publish();
        }
        changed
    }

    /// Gives `f` a live slot in `next`; returns whether `next` changed.
    fn join(
        &mut self,
        next: &mut UpstreamSet,
        f: &Found,
        priority: i32,
        st: &mut LoopState,
        now: Instant,
    ) -> bool {
        let url = f.url.as_str();
        let joined = match next.discover(url, priority) {
            Ok(j) => j,
            Err(e) => {
                if self.noted.insert(f.url.clone()) {
                    tracing::warn!(error = %e, "ignoring a discovered address");
                }
                return false;
            }
        };
        let slot = match joined {
            Joined::Live(_) => return false,
            Joined::Configured(i) => {
                if self.noted.insert(f.url.clone()) {
                    tracing::info!(url, instance = %f.instance, configured = %next.list[i].url, "discovered address is a configured upstream; keeping the configured one");
                }
                return false;
            }
            Joined::Full => {
                if self.noted.insert(f.url.clone()) {
                    tracing::warn!(url, instance = %f.instance, "every discovery slot holds a live upstream (discovery.max_upstreams); ignoring this one while they stay");
                }
                return false;
            }
            Joined::Added(i) | Joined::Revived(i) => i,
            Joined::Recycled { slot, replaced } => {
                tracing::info!(url, replaced = %replaced, slot, "reusing the slot of a discovered upstream gone longest");
                self.routing.forget_urls();
                self.routing.limits.cooldowns.clear(slot);
                slot
            }
        };
        // A fresh record, probed at once: whatever was measured in an
        // earlier life may not hold for the host now announcing.
        let fresh = UpstreamHealth::new(now);
        match self.table.get_mut(slot) {
            Some(h) => *h = fresh,
            None => self.table.push(fresh),
        }
        st.renew(slot);
        self.noted.remove(url);
        tracing::info!(url, instance = %f.instance, priority, slot, "discovered nix-serve instance");
        true
    }
}
