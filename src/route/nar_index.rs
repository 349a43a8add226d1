//! The NAR index: which upstream to ask first for a NAR file, claimed by
//! routes stored from verified narinfos (docs/security.md, "What may steer
//! routing"). Part of [`RouteTable`]; its own file because the claim rules
//! are a subject of their own.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quick_cache::sync::{Cache, EntryAction, EntryResult};

use super::{secs32, Cached, RouteTable, Slot};
use crate::proto::narinfo::{relay_form, served_url, NarUrlMode};
use crate::proto::store_path::StoreHash;

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
            row: [0; 2],
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

/// How the `URL:` of one upstream slot's narinfos is served
/// (`upstreams[].nar_url_mode`, `storage_url`). The table's default keeps
/// it (the configuration's default is set by [`RouteTable::with_nar_urls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarUrlRule {
    pub mode: NarUrlMode,
    /// `storage_url`: where `to_upstream` resolves relative URLs (else
    /// the slot's URL).
    pub storage: Option<Arc<str>>,
}

impl Default for NarUrlRule {
    fn default() -> Self {
        NarUrlRule {
            mode: NarUrlMode::Keep,
            storage: None,
        }
    }
}

/// Where a canonical NAR request (`/nar/<store hash>...`) goes first:
/// the route of its store hash ([`RouteTable::nar_source`]).
#[derive(Debug, Clone, PartialEq)]
pub enum NarSource {
    /// A live route with its narinfo in memory.
    Hot {
        upstream: usize,
        /// The narinfo as served to clients (its file fields are what the
        /// client was promised; its `URL:` may be the rewritten one).
        narinfo: Bytes,
        /// The upstream's own `URL:` value for the NAR file.
        upstream_url: Box<str>,
    },
    /// A live route whose narinfo is only in the database.
    Cold { upstream: usize },
}

impl RouteTable {
    /// Sets the NAR URL rule of the configured slots (by slot order), and
    /// the mode a slot given to a discovered URL gets.
    pub fn with_nar_urls(mut self, rules: Vec<NarUrlRule>, discovered: NarUrlMode) -> Self {
        for (name, rule) in self.names.iter().zip(rules) {
            *name.nar.write().unwrap_or_else(|e| e.into_inner()) = rule;
        }
        self.discovered_nar = discovered;
        self
    }

    /// The body to serve for `narinfo` (an upstream's, as stored) under
    /// slot `upstream`'s rule, and the upstream's own `URL:` when it was
    /// rewritten. Miss path only (race win, read-back, peer route).
    pub(super) fn serve_form(
        &self,
        upstream: usize,
        hash: &StoreHash,
        narinfo: &Bytes,
    ) -> (Bytes, Option<Box<str>>) {
        let Some(name) = self.names.get(upstream) else {
            return (narinfo.clone(), None);
        };
        let rule = name.nar.read().unwrap_or_else(|e| e.into_inner()).clone();
        if rule.mode == NarUrlMode::Keep {
            return (narinfo.clone(), None);
        }
        let Some(url) = url_of(narinfo) else {
            return (narinfo.clone(), None);
        };
        let slot_url = name.url.read().unwrap_or_else(|e| e.into_inner()).clone();
        let base = rule
            .storage
            .as_deref()
            .or(slot_url.as_deref())
            .unwrap_or("");
        match served_url(rule.mode, hash, url, base) {
            Some(new) => match relay_form(narinfo, Some(&new)) {
                Cow::Owned(v) => (Bytes::from(v), Some(url.into())),
                Cow::Borrowed(_) => (narinfo.clone(), None),
            },
            None => (narinfo.clone(), None),
        }
    }

    /// The route of `hash` for a canonical NAR request: its upstream, and
    /// with its body in memory the narinfo served and the upstream's real
    /// NAR `URL:`. None for no route or a negative entry.
    pub fn nar_source(&self, hash: &StoreHash, now: u64) -> Option<NarSource> {
        let upstream = match self.get(hash, now)? {
            Cached::Hit(hit) => hit.upstream,
            Cached::Cold { upstream } => return Some(NarSource::Cold { upstream }),
            Cached::Negative => return None,
        };
        // Served body and real URL from one entry, so they always agree; a
        // body evicted since the lookup above is read back like a cold one.
        let Some(body) = self.bodies.get(&super::RouteKey::of(hash)) else {
            return Some(NarSource::Cold { upstream });
        };
        let upstream_url = match body.upstream_url {
            Some(u) => Box::from(&*u),
            // Not rewritten: the served `URL:` is the upstream's own.
            None => url_of(&body.narinfo)?.into(),
        };
        Some(NarSource::Hot {
            upstream,
            narinfo: body.narinfo,
            upstream_url,
        })
    }
}

/// The value of a narinfo body's `URL:` line (one space after the colon
/// dropped), without parsing the rest.
fn url_of(body: &[u8]) -> Option<&str> {
    let line = body
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"URL:"))?;
    let value = line.strip_prefix(b" ").unwrap_or(line);
    std::str::from_utf8(value).ok().filter(|v| !v.is_empty())
}
