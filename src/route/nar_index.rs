//! The NAR index: which upstream to ask first for a NAR file, claimed by
//! routes stored from verified narinfos (docs/security.md, "What may steer
//! routing"). Part of [`RouteTable`]; its own file because the claim rules
//! are a subject of their own.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, EntryAction, EntryResult};

use super::{secs32, RouteTable, Slot};

/// The NAR index is keyed by a 128-bit keyed hash of the NAR key instead of
/// the string: this saves an ~80-byte allocation per route. The two SipHash
/// instances have random per-process keys, so nobody outside can aim for a
/// collision, and an accidental one (about 2^-89 for a million keys) would
/// only send a NAR request to an upstream that then answers 404.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct NarKey(u64, u64);

/// The NAR index keeps no ghost slots (quick_cache's memory of recently
/// evicted keys, which costs a full slot each): a NAR key only comes back
/// when its route is inserted again, and the route cache already keeps
/// ghosts for that decision.
pub(super) fn nar_index(max_entries: usize) -> Cache<NarKey, NarSlot> {
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(max_entries)
        .weight_capacity(max_entries as u64)
        .ghost_allocation(0.0)
        .build()
        .expect("valid quick_cache options");
    Cache::with_options(
        options,
        Default::default(),
        Default::default(),
        Default::default(),
    )
}

/// Who writes a NAR index entry, and what that write may replace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum NarClaim {
    /// A route stored from a narinfo that verified for its upstream: takes
    /// a free key, refreshes the upstream's own live entry, or replaces a
    /// pin; never another upstream's live claim.
    Route,
    /// A debuginfo record's `archive` (nothing verified it): only a free key.
    Pin,
}

/// A NAR index entry: where to ask first, and whether only a debuginfo
/// pin (not a verified narinfo) put it there.
#[derive(Clone, Copy)]
pub(super) struct NarSlot {
    slot: Slot,
    pinned: bool,
}

/// NAR index writes refused because a live entry named another upstream
/// (or, for pins, any live entry), by [`NarClaim`]; for `/metrics`.
#[derive(Default)]
pub(super) struct NarClaimStats {
    route_refused: AtomicU64,
    pin_refused: AtomicU64,
}

impl RouteTable {
    /// The upstream (index) to ask first for this NAR, if still live.
    /// `nar_key` comes from [`nar_key`].
    ///
    /// Nothing signs a narinfo's `URL` field, so an entry here only says
    /// which upstream *first* claimed the NAR file with a narinfo that
    /// verified for it. Writes (docs/security.md, "What may steer routing"):
    /// - only a route stored from a verified narinfo (a race winner, a
    ///   verified mesh merge, a route loaded at start) claims its NAR;
    /// - a live claim naming another upstream is never replaced: the first
    ///   verified claimant keeps the key until it expires (or its slot is
    ///   given to another URL); the same upstream may refresh it;
    /// - a debuginfo pin ([`Self::pin_nar`]) only takes a free key, and a
    ///   verified claim replaces a pin.
    ///
    /// So an upstream that wins the race for one path cannot pull another
    /// upstream's NAR file to itself by naming it in its own narinfo.
    #[inline]
    pub fn nar_upstream(&self, nar_key: &str, now: u64) -> Option<usize> {
        let key = self.nar_index_key(nar_key);
        let held = self.nars.get(&key)?;
        if self.serves(held.slot, now) {
            return Some(usize::from(held.slot.upstream));
        }
        self.nars.remove_if(&key, |s| !self.serves(s.slot, now));
        None
    }

    /// Sends requests for the NAR `nar_key` to upstream slot `upstream`
    /// until `expires_at`, without a route (a debuginfo record naming a NAR
    /// of the cache that served it). Nothing verified the record, so the
    /// pin only fills a free key: a live entry (a verified route's claim,
    /// or an earlier pin) is never replaced. Memory only: the hint is not
    /// persisted. Returns whether the pin was set.
    pub fn pin_nar(&self, nar_key: &str, upstream: usize, expires_at: u64) -> bool {
        let Some(name) = self.names.get(upstream) else {
            return false;
        };
        if nar_key.is_empty() {
            return false;
        }
        let slot = Slot {
            expires_at: secs32(expires_at),
            upstream: upstream as u16,
            gen: name.gen.load(Ordering::Relaxed),
        };
        self.claim_nar(nar_key, slot, NarClaim::Pin, crate::rt::unix_now())
    }

    /// NAR index writes refused so far: `(route claims, debuginfo pins)`.
    pub fn nar_claims_refused(&self) -> (u64, u64) {
        (
            self.nar_claims.route_refused.load(Ordering::Relaxed),
            self.nar_claims.pin_refused.load(Ordering::Relaxed),
        )
    }

    /// Writes `slot` for `nar_key` unless a live entry keeps the key: any
    /// live entry refuses a pin; a live route claim naming another
    /// upstream (slot and generation) refuses a route's claim. Atomic per
    /// key (under the shard's lock), and never waits: a claim being written
    /// by another thread at this instant is a live claim, and wins.
    /// Returns whether `slot` was written.
    pub(super) fn claim_nar(&self, nar_key: &str, slot: Slot, claim: NarClaim, now: u64) -> bool {
        let key = self.nar_index_key(nar_key);
        let new = NarSlot {
            slot,
            pinned: claim == NarClaim::Pin,
        };
        let keeps = |held: NarSlot| {
            let same = (held.slot.upstream, held.slot.gen) == (slot.upstream, slot.gen);
            self.serves(held.slot, now)
                && match claim {
                    NarClaim::Pin => true,
                    NarClaim::Route => !held.pinned && !same,
                }
        };
        let update = |_: &NarKey, held: &mut NarSlot| {
            if keeps(*held) {
                EntryAction::Retain(false)
            } else {
                *held = new;
                EntryAction::Retain(true)
            }
        };
        let written = match self.nars.entry(&key, Some(Duration::ZERO), update) {
            EntryResult::Retained(written) => written,
            EntryResult::Vacant(guard) => guard.insert(new).is_ok(),
            // Not returned for `Retain`; a placeholder of another writer.
            EntryResult::Removed(..) | EntryResult::Replaced(..) | EntryResult::Timeout => false,
        };
        if !written {
            let refused = match claim {
                NarClaim::Route => &self.nar_claims.route_refused,
                NarClaim::Pin => &self.nar_claims.pin_refused,
            };
            refused.fetch_add(1, Ordering::Relaxed);
        }
        written
    }

    fn nar_index_key(&self, key: &str) -> NarKey {
        NarKey(
            self.nar_hashers.0.hash_one(key),
            self.nar_hashers.1.hash_one(key),
        )
    }
}
