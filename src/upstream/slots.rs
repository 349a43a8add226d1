//! Slots of the upstream set: how discovered upstreams join and leave a set
//! whose indexes workers hold. COLD (the control thread builds new
//! snapshots with these; workers only read [`UpstreamSet::live`]).
//!
//! The set is append-only. Configured upstreams take the first slots, in
//! configuration order; a discovered upstream gets the next free slot, up
//! to `discovery.max_upstreams` of them. Everything indexed by slot (limits,
//! cooldowns, per-worker metrics and waiter queues) is sized for that
//! capacity at start, so it never has to grow under a reader. Removal only
//! marks a slot retired: a request that loaded the set before still finds
//! its upstream at the index it holds. A URL announced again gets its old
//! slot back (so its metrics continue). Only when every reserved slot has
//! been used is the longest-retired one given to a new URL ("recycled").

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{Upstream, UpstreamSet};
use crate::http::client::Origin;

/// Where a slot's upstream came from, and whether it is still routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Configured,
    Discovered,
    /// A discovered upstream that went silent, since `at`.
    Retired {
        at: Instant,
    },
}

/// What [`UpstreamSet::discover`] did with a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The same host and port is configured: the configured upstream (its
    /// priority, keys, filters, health) stays, the announcement is ignored.
    Configured(usize),
    /// Already live in this slot: nothing changed.
    Live(usize),
    /// A new slot.
    Added(usize),
    /// Its old slot, retired before, is live again.
    Revived(usize),
    /// The longest-retired slot, which named `replaced` before.
    Recycled { slot: usize, replaced: Arc<str> },
    /// Every reserved slot holds a live discovered upstream.
    Full,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("discovered upstream {url}: {why}")]
    Invalid { url: String, why: String },
}

impl UpstreamSet {
    pub(super) fn push_slot(&mut self, u: Upstream, slot: Slot) {
        self.by_url.insert(u.url.clone(), self.list.len());
        self.list.push(Arc::new(u));
        self.slots.push(slot);
    }

    /// Reserves `n` slots for discovered upstreams (call once, after the
    /// configured upstreams are in).
    pub fn reserve_discovered(&mut self, n: usize) {
        self.reserved = n;
    }

    /// How many slots this set may ever use: everything indexed by slot is
    /// sized for this.
    pub fn capacity(&self) -> usize {
        self.configured_len() + self.reserved
    }

    fn configured_len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| **s == Slot::Configured)
            .count()
    }

    pub fn slot(&self, i: usize) -> Option<Slot> {
        self.slots.get(i).copied()
    }

    /// The upstream in slot `i`, unless that slot is retired.
    #[inline]
    pub fn live(&self, i: usize) -> Option<&Upstream> {
        match self.slots.get(i)? {
            Slot::Retired { .. } => None,
            _ => self.get(i),
        }
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.live(i).is_some()
    }

    /// Upstreams that races may ask: every slot but the retired ones.
    pub fn live_len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !matches!(s, Slot::Retired { .. }))
            .count()
    }

    /// Discovered upstreams currently routed to.
    pub fn discovered_len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| **s == Slot::Discovered)
            .count()
    }

    /// `(slot, url)` of every live upstream, for metric labels.
    pub fn live_urls(&self) -> Vec<(usize, Arc<str>)> {
        (0..self.len())
            .filter_map(|i| Some((i, self.live(i)?.url.clone())))
            .collect()
    }

    /// Makes `url` a live discovered upstream with `priority`, unless a
    /// configured upstream serves the same host and port.
    pub fn discover(&mut self, url: &str, priority: i32) -> Result<Joined, SlotError> {
        let origin = Origin::parse(url, None).map_err(|e| SlotError::Invalid {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
        if let Some(i) = self.configured_twin(&origin) {
            return Ok(Joined::Configured(i));
        }
        let upstream = || Upstream {
            url: Arc::from(url),
            origin: origin.clone(),
            s3: None,
            priority,
            keys: Vec::new(),
            filters: Vec::new(),
            narinfo_timeout: None,
            host: super::fallback::host_of(url),
            storage: None,
            nar: Default::default(),
        };
        if let Some(i) = self.index_of(url) {
            let slot = &mut self.slots[i];
            return Ok(match *slot {
                Slot::Retired { .. } => {
                    *slot = Slot::Discovered;
                    // Priority may have changed across a restart's config.
                    self.list[i] = Arc::new(upstream());
                    Joined::Revived(i)
                }
                _ => Joined::Live(i),
            });
        }
        if self.len() < self.capacity() {
            self.push_slot(upstream(), Slot::Discovered);
            return Ok(Joined::Added(self.len() - 1));
        }
        let Some(slot) = self.longest_retired() else {
            return Ok(Joined::Full);
        };
        let replaced = self.list[slot].url.clone();
        self.by_url.remove(&replaced);
        self.by_url.insert(Arc::from(url), slot);
        self.list[slot] = Arc::new(upstream());
        self.slots[slot] = Slot::Discovered;
        Ok(Joined::Recycled { slot, replaced })
    }

    /// Retires the discovered upstream `url`; returns its slot, or `None`
    /// when `url` is not a live discovered upstream.
    pub fn retire(&mut self, url: &str, now: Instant) -> Option<usize> {
        let i = self.index_of(url)?;
        if self.slots[i] != Slot::Discovered {
            return None;
        }
        self.slots[i] = Slot::Retired { at: now };
        Some(i)
    }

    /// A configured upstream on the same host and port as `origin` (IP
    /// literals compared as addresses, names case-insensitively).
    fn configured_twin(&self, origin: &Origin) -> Option<usize> {
        let same_host = |a: &str, b: &str| match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a.eq_ignore_ascii_case(b),
        };
        (0..self.len()).find(|&i| {
            let o = &self.list[i].origin;
            self.slots[i] == Slot::Configured
                && o.port() == origin.port()
                && same_host(o.host(), origin.host())
        })
    }

    fn longest_retired(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Retired { at } => Some((*at, i)),
                _ => None,
            })
            .min()
            .map(|(_, i)| i)
    }
}

#[cfg(test)]
mod tests;
