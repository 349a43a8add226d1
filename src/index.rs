//! Index-aware routing, the side workers read. HOT read / COLD write.
//!
//! The control thread fetches each upstream's membership summary (a
//! NixBloom filter it advertises, or its RFC 0195 index turned into one;
//! [`crate::control::index`]) and publishes them as one immutable
//! [`SummarySet`] through an `ArcSwap`. A race plan loads it once and, per
//! candidate, asks [`SummarySet::definitely_absent`]: a pointer compare, an
//! `Instant` compare and k bit tests. Only a *fresh* summary of *the same
//! upstream* can rule it out; a missing, stale or foreign one means "ask".
//!
//! ncro's own filter of the routes it knows ([`Published`]) lives here too:
//! the control thread rebuilds it, workers serve it at [`FILTER_PATH`].
//! docs/index-routing.md has the semantics and the measurements.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;

use crate::proto::nixbloom::{Bloom, Probe};
use crate::upstream::Upstream;

/// Where ncro serves its own filter, and the `BloomFilter:` value
/// (relative to the cache root) that announces it.
pub const FILTER_PATH: &str = "/bloom-filter";
pub const FILTER_LOCATION: &str = "bloom-filter";

/// What a summary was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummarySource {
    /// The upstream's own NixBloom filter, as fetched.
    NixBloom,
    /// The upstream's RFC 0195 index (shards plus journal additions),
    /// turned into a NixBloom filter by the control thread.
    Rfc0195,
}

impl SummarySource {
    pub fn label(self) -> &'static str {
        match self {
            SummarySource::NixBloom => "nixbloom",
            SummarySource::Rfc0195 => "rfc0195",
        }
    }
}

/// One upstream's membership summary. Immutable once published.
#[derive(Debug)]
pub struct Summary {
    /// The `Upstream::url` of the set it was fetched for, compared by
    /// pointer: a slot retired and given to another URL (or revived, which
    /// builds a new `Upstream`) never inherits it.
    pub upstream: Arc<str>,
    pub bloom: Bloom,
    pub source: SummarySource,
    /// Last successful fetch or revalidation.
    pub fetched_at: Instant,
    /// `fetched_at + index.max_age`: from then on it is ignored.
    pub fresh_until: Instant,
}

/// Summaries by upstream slot.
#[derive(Debug, Default)]
pub struct SummarySet {
    by_slot: Vec<Option<Arc<Summary>>>,
    /// Some slot has a summary (fresh or not).
    any: bool,
}

impl SummarySet {
    pub fn new(by_slot: Vec<Option<Arc<Summary>>>) -> SummarySet {
        let any = by_slot.iter().any(Option::is_some);
        SummarySet { by_slot, any }
    }

    /// No upstream has a summary: a race plan need not look (the common
    /// case when no upstream publishes one).
    #[inline]
    pub fn is_empty(&self) -> bool {
        !self.any
    }

    /// The summary of `slot` if it describes `upstream` and is fresh.
    #[inline]
    pub fn fresh(&self, slot: usize, upstream: &Upstream, now: Instant) -> Option<&Summary> {
        let s = self.by_slot.get(slot)?.as_deref()?;
        (Arc::ptr_eq(&s.upstream, &upstream.url) && now < s.fresh_until).then_some(s)
    }

    /// True only when a fresh summary of this upstream rules the path out.
    #[inline]
    pub fn definitely_absent(
        &self,
        slot: usize,
        upstream: &Upstream,
        probe: Probe,
        now: Instant,
    ) -> bool {
        self.fresh(slot, upstream, now)
            .is_some_and(|s| !s.bloom.may_contain(probe))
    }

    /// Whatever summary `slot` holds, fresh or not (for metrics).
    pub fn get(&self, slot: usize) -> Option<&Arc<Summary>> {
        self.by_slot.get(slot)?.as_ref()
    }
}

/// ncro's own filter as served: the body, its ETag, and how many routes
/// it holds.
#[derive(Debug)]
pub struct Published {
    pub body: Bytes,
    pub etag: String,
    pub routes: u64,
}

/// Why a summary refresh failed: a fixed set, for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshErrorKind {
    /// Transport error or timeout.
    Fetch,
    /// An HTTP status other than 200, 304 or an expected 404.
    Status,
    /// A body that is not a valid filter, manifest, shard or journal.
    Parse,
    /// Over `index.max_bytes` or `index.max_items`.
    TooLarge,
    /// The index changed under the refresh, or cannot be read completely.
    Inconsistent,
}

impl RefreshErrorKind {
    pub const ALL: [RefreshErrorKind; 5] = [
        RefreshErrorKind::Fetch,
        RefreshErrorKind::Status,
        RefreshErrorKind::Parse,
        RefreshErrorKind::TooLarge,
        RefreshErrorKind::Inconsistent,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefreshErrorKind::Fetch => "fetch",
            RefreshErrorKind::Status => "status",
            RefreshErrorKind::Parse => "parse",
            RefreshErrorKind::TooLarge => "too_large",
            RefreshErrorKind::Inconsistent => "inconsistent",
        }
    }
}

/// Shared by workers, the control thread and `/metrics`.
pub struct IndexState {
    summaries: ArcSwap<SummarySet>,
    published: ArcSwapOption<Published>,
    /// Refresh failures per slot and [`RefreshErrorKind`]; the control
    /// thread is the only writer.
    errors: Box<[[AtomicU64; 5]]>,
}

impl IndexState {
    /// For `slots` upstream slots (the set's capacity).
    pub fn new(slots: usize) -> IndexState {
        IndexState {
            summaries: ArcSwap::from_pointee(SummarySet::default()),
            published: ArcSwapOption::empty(),
            errors: (0..slots).map(|_| Default::default()).collect(),
        }
    }

    /// The current summaries (a cheap guard; do not hold it across awaits).
    #[inline]
    pub fn summaries(&self) -> arc_swap::Guard<Arc<SummarySet>> {
        self.summaries.load()
    }

    /// Control thread only.
    pub fn publish_summaries(&self, set: SummarySet) {
        self.summaries.store(Arc::new(set));
    }

    pub fn published(&self) -> Option<Arc<Published>> {
        self.published.load_full()
    }

    /// Control thread only.
    pub fn publish_filter(&self, p: Published) {
        self.published.store(Some(Arc::new(p)));
    }

    pub fn count_error(&self, slot: usize, kind: RefreshErrorKind) {
        if let Some(row) = self.errors.get(slot) {
            row[kind as usize].fetch_add(1, Relaxed);
        }
    }

    pub fn errors(&self, slot: usize, kind: RefreshErrorKind) -> u64 {
        self.errors
            .get(slot)
            .map_or(0, |row| row[kind as usize].load(Relaxed))
    }
}

#[cfg(test)]
mod tests;
