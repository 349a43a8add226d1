//! HOT read side of the route table: which upstream answered a store hash,
//! shared by every worker thread.
//!
//! Three sharded quick_caches, sized so that a million routes fit in a few
//! hundred megabytes:
//!
//! - `routes`: packed store hash (20 bytes) → expiry, upstream slot and
//!   the slot's generation and the route's database row id (16 bytes),
//!   for every route and negative entry;
//! - `nars`: 128-bit keyed hash of a NAR URL → the upstream asked first
//!   for that NAR: the first upstream whose *verified* narinfo named it
//!   (see [`RouteTable::nar_upstream`] for who may write it);
//! - `bodies`: the narinfo bytes to answer a hit with, bounded in bytes
//!   (`cache.narinfo_memory_mb`) rather than in routes. A route whose body
//!   fell out (or was never read, after a restart) is [`Cached::Cold`]: its
//!   body is read back from the database by the reader thread in
//!   [`reader`], never by the worker, and kept again.
//!
//! Upstreams are named by their slot in the upstream set (append-only;
//! discovery may give a retired slot to another URL). The table keeps each
//! slot's URL and a generation that moves on when the URL changes
//! ([`RouteTable::assign`], called before such a set is published), so a
//! reused slot never serves the routes of the URL that held it before.
//!
//! Lookups take one shard read lock per cache and allocate nothing. Writes
//! update the caches and queue a copy for the writer thread in [`persist`],
//! the only code that writes SQLite. quick_cache has no TTL, so every slot
//! carries its absolute expiry and a lookup that finds an expired slot
//! treats it as a miss and removes it.
//!
//! Why bodies are not all in memory: narinfos are 500–800 bytes, so a
//! million of them alone exceed a 300 MB budget, while the routing data
//! takes about 120 bytes per route. ncro 2.2 kept 1,024 routes in memory
//! and read every other hit from SQLite on the request path; here the hot
//! set stays in memory and only a cold hit pays for a read (tens of
//! microseconds, on another thread), still without asking an upstream.

mod key;
mod nar_index;
pub mod persist;
pub mod reader;
#[cfg(test)]
mod tests;

use std::hash::RandomState;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::proto::store_path::StoreHash;
use key::RouteKey;
use nar_index::{nar_index, NarClaim, NarClaimStats, NarKey, NarSlot};
pub use nar_index::{NarSource, NarUrlRule};
use persist::{Db, PersistError, RouteRow, RowIds, StoredRoute, WriteOp, WriterHandle};
use reader::BodyReader;

/// Memory for narinfo bodies when the configuration does not say.
pub const DEFAULT_NARINFO_MEMORY: u64 = 64 << 20;

/// A route as a race found it: what is stored in the database, and what the
/// table keeps of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEntry {
    /// Upstream URL as configured; it is the identity of an upstream.
    pub upstream: Arc<str>,
    /// Served as is on hits; clones share the buffer, never copy it.
    /// Build it with `Bytes::copy_from_slice` (exact size): a slice of a
    /// larger read buffer would keep the whole buffer alive for as long as
    /// the body stays cached.
    pub narinfo: Bytes,
    /// The narinfo `URL` field, leading '/' stripped, query kept.
    pub nar_url: Box<str>,
    pub nar_hash: Box<str>,
    pub nar_size: u64,
    /// Unix seconds; the route is dead from this second on.
    pub expires_at: u64,
    /// Unix seconds of the last successful verification.
    pub verified_at: u64,
    pub latency_ms: f32,
}

impl RouteEntry {
    /// The key of this route's NAR in the NAR index.
    pub fn nar_key(&self) -> &str {
        nar_key(&self.nar_url)
    }
}

/// The NAR index key of a narinfo `URL` field or a `/nar/...` request path:
/// leading '/' and query string removed, so both sides agree.
pub fn nar_key(nar_url: &str) -> &str {
    let s = nar_url.strip_prefix('/').unwrap_or(nar_url);
    s.split_once('?').map_or(s, |(key, _)| key)
}

/// A live route with its narinfo.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The upstream's slot in the upstream set.
    pub upstream: usize,
    pub narinfo: Bytes,
}

/// Answer of [`RouteTable::get`].
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    Hit(Hit),
    /// A live route whose narinfo is not in memory: read it with
    /// [`RouteTable::read_body`] (off the worker thread) before answering.
    Cold {
        upstream: usize,
    },
    /// No upstream had it recently; answer 404 without racing.
    Negative,
}

/// `upstream` value of a negative entry.
const NEGATIVE: u16 = u16::MAX;

/// 16 bytes per route: unix seconds fit in u32 until 2106 (later expiries
/// are clamped, which only shortens a route that would outlive the process).
/// `gen` is the generation of the upstream slot when the route was stored:
/// a slot given to another URL since no longer serves the route. `row` is
/// the route's row id in the database log (two u32 halves, so the slot
/// stays 4-byte aligned next to its 20-byte key): the reader reads the
/// body by it, and a route that replaces this one deletes that row.
#[derive(Clone, Copy)]
struct Slot {
    expires_at: u32,
    upstream: u16,
    gen: u16,
    row: [u32; 2],
}

fn row_halves(id: u64) -> [u32; 2] {
    [id as u32, (id >> 32) as u32]
}

impl Slot {
    #[inline]
    fn row(self) -> u64 {
        u64::from(self.row[0]) | u64::from(self.row[1]) << 32
    }

    /// The database row of the route this slot holds (none for a negative
    /// entry).
    fn route_row(self) -> Option<u64> {
        (self.upstream != NEGATIVE).then(|| self.row())
    }

    #[inline]
    fn live(self, now: u64) -> bool {
        u64::from(self.expires_at) > now
    }
}

/// Which URL an upstream slot names, and how many times it changed (wraps
/// after 65,536 reassignments of one slot; a route that old has long expired
/// in practice).
struct SlotName {
    url: RwLock<Option<Arc<str>>>,
    gen: AtomicU16,
    /// How the NAR URL of this slot's narinfos is served.
    nar: RwLock<NarUrlRule>,
}

impl SlotName {
    fn new(url: Option<Arc<str>>) -> Self {
        SlotName {
            url: RwLock::new(url),
            gen: AtomicU16::new(0),
            nar: RwLock::new(NarUrlRule::default()),
        }
    }
}

/// A narinfo body and what the mesh merge rule compares a peer's route with
/// (unknown for a body read back from the database).
#[derive(Clone)]
struct Body {
    /// As served: the `URL:` rewritten by the slot's [`NarUrlRule`].
    narinfo: Bytes,
    merit: Option<(f32, u64)>,
    /// The upstream's own `URL:` value when `narinfo` serves another one.
    /// Shared, not boxed: every hit clones the `Body` out of the cache, and
    /// a refcount is cheaper than an allocation and a copy.
    upstream_url: Option<Arc<str>>,
}

fn secs32(t: u64) -> u32 {
    t.min(u64::from(u32::MAX)) as u32
}

/// Weight of a cached body: its bytes plus what holding it costs besides
/// (cache slot, `Bytes` header and allocation), so the budget is in RSS.
#[derive(Clone)]
struct BodyWeight;

const BODY_OVERHEAD: u64 = 96;

impl Weighter<RouteKey, Body> for BodyWeight {
    fn weight(&self, _: &RouteKey, body: &Body) -> u64 {
        (body.narinfo.len() + body.upstream_url.as_ref().map_or(0, |u| u.len())) as u64
            + BODY_OVERHEAD
    }
}

fn body_cache(bytes: u64) -> Cache<RouteKey, Body, BodyWeight> {
    let bytes = bytes.max(BODY_OVERHEAD + 1);
    let items = (bytes / 700).clamp(16, 1 << 24) as usize;
    Cache::with_weighter(items, bytes, BodyWeight)
}

/// Counters of the cold path, for `/metrics`.
#[derive(Default)]
struct ColdStats {
    disk_reads: AtomicU64,
    disk_misses: AtomicU64,
}

/// Routes and negative entries shared by all workers (`Arc<RouteTable>`).
pub struct RouteTable {
    routes: Cache<RouteKey, Slot>,
    nars: Cache<NarKey, NarSlot>,
    bodies: Cache<RouteKey, Body, BodyWeight>,
    nar_hashers: (RandomState, RandomState),
    /// The URL of every upstream slot (`UpstreamSet` slot order, sized for
    /// its capacity); a route's `upstream` indexes this.
    names: Box<[SlotName]>,
    max_entries: usize,
    /// None when routes are not persisted (no database configured, tests).
    writer: Option<WriterHandle>,
    /// None without a database file (memory-only routing, `:memory:`): a
    /// route whose body fell out of memory is then raced again.
    reader: Option<BodyReader>,
    cold: ColdStats,
    nar_claims: NarClaimStats,
    /// Routes this node's races learned, for mesh gossip; set once at
    /// start when the mesh is enabled. The control thread drains it.
    learned: OnceLock<flume::Sender<Learned>>,
    /// Learned routes the gossip feed had no room for.
    learned_dropped: AtomicU64,
    /// NAR URL mode of a slot [`Self::assign`] gives to a discovered URL.
    discovered_nar: crate::proto::narinfo::NarUrlMode,
}

/// A route as it reaches the gossip feed.
pub type Learned = (StoreHash, Arc<RouteEntry>);

/// What [`RouteTable::load`] read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub routes: usize,
    pub negatives: usize,
    /// Unexpired rows that cannot be served: no narinfo stored (rows from
    /// ncro 2.2 before it stored them) or malformed.
    pub skipped: usize,
    /// Routes to upstreams no longer configured, with their database rows:
    /// not loaded, to be removed from the database.
    pub refused: Vec<(StoreHash, u64)>,
}

impl RouteTable {
    /// `max_entries` bounds routes and negative entries together (quick_cache
    /// holds it approximately, per shard). `upstreams` are the URLs of the
    /// upstream slots taken at start, in slot order; see
    /// [`Self::with_slot_capacity`] and [`Self::assign`] for the others.
    pub fn new(max_entries: usize, upstreams: Vec<Arc<str>>, writer: Option<WriterHandle>) -> Self {
        let max_entries = max_entries.max(1);
        let routes = Cache::new(max_entries);
        let nars = nar_index(max_entries);
        // Sized once for the full table (ghost slots included): growing the
        // slabs by doubling would leave up to half of them as slack, and each
        // doubling briefly holds both copies. Large reservations are mmapped
        // lazily, so an empty table does not cost its full size in RSS.
        routes.reserve(max_entries);
        nars.reserve(max_entries);
        RouteTable {
            routes,
            nars,
            bodies: body_cache(DEFAULT_NARINFO_MEMORY),
            nar_hashers: (RandomState::new(), RandomState::new()),
            names: upstreams
                .into_iter()
                .map(|u| SlotName::new(Some(u)))
                .collect(),
            max_entries,
            writer,
            reader: None,
            cold: ColdStats::default(),
            nar_claims: NarClaimStats::default(),
            learned: OnceLock::new(),
            learned_dropped: AtomicU64::new(0),
            discovered_nar: crate::proto::narinfo::NarUrlMode::Keep,
        }
    }

    /// Makes room for `capacity` upstream slots (the upstream set's
    /// capacity: configured plus discovered), so that routes won by a
    /// discovered upstream are kept too.
    pub fn with_slot_capacity(mut self, capacity: usize) -> Self {
        let mut names = std::mem::take(&mut self.names).into_vec();
        // NEGATIVE is reserved; nobody runs 65,535 upstreams.
        let capacity = capacity.min(usize::from(NEGATIVE));
        names.resize_with(capacity.max(names.len()), || SlotName::new(None));
        self.names = names.into();
        self
    }

    /// Upstream slot `slot` now names `url` (a discovered upstream joined,
    /// or took over a retired slot). When the URL changes, every route and
    /// NAR hint stored for the slot's previous URL stops being served.
    pub fn assign(&self, slot: usize, url: &Arc<str>) {
        let Some(name) = self.names.get(slot) else {
            return;
        };
        let mut held = name.url.write().unwrap_or_else(|e| e.into_inner());
        if held.as_deref() != Some(&**url) {
            *held = Some(url.clone());
            name.gen.fetch_add(1, Ordering::Relaxed);
            *name.nar.write().unwrap_or_else(|e| e.into_inner()) = NarUrlRule {
                mode: self.discovered_nar,
                storage: None,
            };
        }
    }

    /// The URL upstream slot `slot` names for the table.
    pub fn slot_url(&self, slot: usize) -> Option<Arc<str>> {
        let name = self.names.get(slot)?;
        name.url.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts feeding every route [`Self::insert`] stores to the returned
    /// receiver (at most `capacity` waiting; more are dropped and
    /// counted). Only the first call gets a feed.
    pub fn learned_feed(&self, capacity: usize) -> Option<flume::Receiver<Learned>> {
        let (tx, rx) = flume::bounded(capacity);
        self.learned.set(tx).ok().map(|()| rx)
    }

    /// Routes the gossip feed dropped because it was full.
    pub fn learned_dropped(&self) -> u64 {
        self.learned_dropped.load(Ordering::Relaxed)
    }

    /// Bounds the memory for narinfo bodies (bytes, overhead included).
    pub fn with_narinfo_memory(mut self, bytes: u64) -> Self {
        self.bodies = body_cache(bytes);
        self
    }

    /// Persists every change through `writer` from now on.
    pub fn with_writer(mut self, writer: WriterHandle) -> Self {
        self.writer = Some(writer);
        self
    }

    /// Reads bodies that are not in memory from the database.
    pub fn with_reader(mut self, reader: BodyReader) -> Self {
        self.reader = Some(reader);
        self
    }

    /// The live route or negative entry for `hash` at `now` (unix seconds).
    #[inline]
    pub fn get(&self, hash: &StoreHash, now: u64) -> Option<Cached> {
        let key = RouteKey::of(hash);
        let slot = self.routes.get(&key)?;
        if !self.holds(slot, now) {
            // Re-checked under the shard lock: another worker may have stored
            // a fresh slot since our read, and that one must stay.
            self.routes.remove_if(&key, |s| !self.holds(*s, now));
            return None;
        }
        if slot.upstream == NEGATIVE {
            return Some(Cached::Negative);
        }
        let upstream = usize::from(slot.upstream);
        Some(match self.bodies.get(&key) {
            Some(body) => Cached::Hit(Hit {
                upstream,
                narinfo: body.narinfo,
            }),
            None => Cached::Cold { upstream },
        })
    }

    /// Stores a route (replacing any slot for `hash`), indexes its NAR and
    /// queues it for persistence and, with the mesh on, for gossip. A route
    /// to a URL no upstream slot names (any more) is not kept.
    ///
    /// `entry.narinfo` is the upstream's body; what is kept in memory and
    /// returned is the body to serve, its `URL:` rewritten once here by the
    /// slot's [`NarUrlRule`] (so hits cost nothing more). The database and
    /// gossip keep the upstream's body.
    pub fn insert(&self, hash: StoreHash, entry: Arc<RouteEntry>) -> Bytes {
        if let Some(feed) = self.learned.get() {
            // Never waits: a full feed only means a peer hears of this
            // route later (when it races it itself).
            if feed.try_send((hash, entry.clone())).is_err() {
                self.learned_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.store(hash, entry)
    }

    /// Stores a route a mesh peer announced: like [`Self::insert`], but not
    /// fed back to gossip (peers hear each route from the node that raced it).
    pub fn insert_from_peer(&self, hash: StoreHash, entry: Arc<RouteEntry>) {
        self.store(hash, entry);
    }

    fn store(&self, hash: StoreHash, entry: Arc<RouteEntry>) -> Bytes {
        let Some((upstream, gen)) = self.upstream_index(&entry.upstream) else {
            return entry.narinfo.clone();
        };
        let key = RouteKey::of(&hash);
        let (narinfo, upstream_url) = self.serve_form(usize::from(upstream), &hash, &entry.narinfo);
        // Body first: a reader that sees the new slot finds its body.
        let body = Body {
            narinfo: narinfo.clone(),
            merit: Some((entry.latency_ms, entry.verified_at)),
            upstream_url: upstream_url.map(Arc::from),
        };
        self.bodies.insert(key, body);
        // The row of the route this one replaces (read, not locked: two
        // stores racing for one hash may both name it, and the loser's own
        // row then stays behind as an older copy, which the newest row
        // shadows at the load until the sweep or the cap deletes it).
        let replaces = self.routes.peek(&key).and_then(Slot::route_row);
        // The writer hands out row ids (0: not persisted).
        let id = self.writer.as_ref().map_or(0, |w| w.allocate_row_id());
        let slot = Slot {
            expires_at: secs32(entry.expires_at),
            upstream,
            gen,
            row: row_halves(id),
        };
        self.put(key, slot, entry.nar_key(), crate::rt::unix_now());
        if let Some(w) = &self.writer {
            // One allocation for the writer to free, not the entry's five
            // (`RouteRow`); the entry is freed here, where it was made.
            let row = RouteRow::of(&entry);
            self.enqueue(w, WriteOp::Route(hash, row, RowIds { id, replaces }));
        }
        narinfo
    }

    /// Remembers that no upstream has `hash` until `expires_at`.
    pub fn insert_negative(&self, hash: StoreHash, expires_at: u64) {
        let slot = Slot {
            expires_at: secs32(expires_at),
            upstream: NEGATIVE,
            gen: 0,
            row: [0; 2],
        };
        let key = RouteKey::of(&hash);
        let replaces = self.routes.peek(&key).and_then(Slot::route_row);
        self.routes.insert(key, slot);
        if let Some(w) = &self.writer {
            self.enqueue(w, WriteOp::Negative(hash, expires_at, replaces));
        }
    }

    /// Forgets `hash` (e.g. its upstream no longer serves it), here and in
    /// the database. Its NAR index entry stays: it expires with the route
    /// and at worst sends one NAR request to an upstream that answers 404.
    pub fn remove(&self, hash: &StoreHash) {
        let key = RouteKey::of(hash);
        let row = self.routes.remove(&key).and_then(|(_, s)| s.route_row());
        self.bodies.remove(&key);
        if let Some(w) = &self.writer {
            self.enqueue(w, WriteOp::Remove(*hash, row));
        }
    }

    /// Reads the narinfo of a [`Cached::Cold`] route from the database, on
    /// the reader thread. `None` when there is no database, the reader is
    /// saturated, or the stored row no longer names `upstream` (a newer
    /// race replaced it, or it expired): the caller then races.
    pub async fn read_body(&self, hash: &StoreHash, upstream: usize) -> Option<Bytes> {
        let reader = self.reader.as_ref()?;
        let url = self.slot_url(upstream)?;
        // The row of the route as the table holds it now (a newer race may
        // have replaced the one `get` answered for: then its upstream differs).
        let row = self
            .routes
            .peek(&RouteKey::of(hash))
            .filter(|s| usize::from(s.upstream) == upstream)
            .and_then(Slot::route_row);
        let body = match row {
            Some(id) => reader.read(*hash, id, url).await,
            None => None,
        };
        let counter = match body {
            Some(_) => &self.cold.disk_reads,
            None => &self.cold.disk_misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        body
    }

    /// Keeps a body read by [`read_body`](Self::read_body) (the upstream's,
    /// as stored) for the route of `upstream`, and returns it as served
    /// (see [`Self::insert`]).
    pub fn keep_body(&self, hash: &StoreHash, upstream: usize, narinfo: Bytes) -> Bytes {
        let (served, upstream_url) = self.serve_form(upstream, hash, &narinfo);
        let body = Body {
            narinfo: served.clone(),
            merit: None,
            upstream_url: upstream_url.map(Arc::from),
        };
        self.bodies.insert(RouteKey::of(hash), body);
        served
    }

    /// Latency (ms) and verification time of the route for `hash`, when
    /// its body is in memory and came from a race or a peer (for the mesh
    /// merge rule).
    pub fn merit(&self, hash: &StoreHash) -> Option<(f32, u64)> {
        self.bodies.get(&RouteKey::of(hash))?.merit
    }

    /// Hashes of the live routes (negative entries left out), for ncro's
    /// published filter. COLD: takes a shard's read lock per entry.
    pub fn route_hashes(&self, now: u64) -> impl Iterator<Item = StoreHash> + '_ {
        self.routes
            .iter()
            .filter(move |&(_, slot)| slot.upstream != NEGATIVE && self.serves(slot, now))
            .map(|(key, _)| key.hash())
    }

    /// Whether a route or negative entry is still to be served.
    #[inline]
    fn holds(&self, slot: Slot, now: u64) -> bool {
        if slot.upstream == NEGATIVE {
            slot.live(now)
        } else {
            self.serves(slot, now)
        }
    }

    /// Whether a live route or NAR hint still names its slot's URL.
    #[inline]
    fn serves(&self, slot: Slot, now: u64) -> bool {
        slot.live(now)
            && self
                .names
                .get(usize::from(slot.upstream))
                .is_some_and(|n| n.gen.load(Ordering::Relaxed) == slot.gen)
    }

    /// Routes plus negative entries currently held (expired ones included
    /// until a lookup or eviction drops them).
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Bytes held by the route and NAR caches' own slots and hash maps (for
    /// a metrics gauge and sizing); bodies are in [`Self::body_bytes`].
    pub fn structure_bytes(&self) -> usize {
        self.routes.memory_used().total() + self.nars.memory_used().total()
    }

    /// Weight of the narinfo bodies held in memory (bytes plus overhead).
    pub fn body_bytes(&self) -> u64 {
        self.bodies.weight()
    }

    /// Cold hits answered from the database, and cold hits it could not
    /// answer (raced instead).
    pub fn disk_reads(&self) -> (u64, u64) {
        (
            self.cold.disk_reads.load(Ordering::Relaxed),
            self.cold.disk_misses.load(Ordering::Relaxed),
        )
    }

    /// Writes refused because the writer queue was full or closed. The table
    /// itself stays correct; only persistence of those writes is lost.
    pub fn dropped_writes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.dropped_writes())
    }

    pub fn writer(&self) -> Option<&WriterHandle> {
        self.writer.as_ref()
    }

    /// Fills the table at startup from the database, writing nothing. Bodies
    /// stay on disk. Routes to upstreams the table does not know are left
    /// out and listed in the report. Rows come newest first: the first row
    /// of a hash is its route (older rows of it are left out), and when
    /// there are more routes than fit, the most recent are kept. Negative
    /// entries go last so that, as in ncro 2.2, a negative entry wins over a
    /// route for the same hash. New routes get row ids after the file's.
    pub fn load(&self, db: &Db, now: u64) -> Result<LoadReport, PersistError> {
        let mut report = LoadReport::default();
        let mut last: Option<(Arc<str>, u16, u16)> = None;
        // Hashes whose newest row was refused: their older rows are too.
        let mut refused = std::collections::HashSet::new();
        let mut sink = |hash: StoreHash, row: StoredRoute<'_>| {
            let key = RouteKey::of(&hash);
            if self.routes.peek(&key).is_some() || refused.contains(&key) {
                return false; // an older row of a route already loaded
            }
            // Rows come in runs of a few upstreams: try the last match first.
            let found = match &last {
                Some((url, i, gen)) if **url == *row.upstream => Some((*i, *gen)),
                _ => self.upstream_index(row.upstream),
            };
            let Some((upstream, gen)) = found else {
                refused.insert(key);
                report.refused.push((hash, row.id));
                return false;
            };
            last = Some((row.upstream.into(), upstream, gen));
            let slot = Slot {
                expires_at: secs32(row.expires_at),
                upstream,
                gen,
                row: row_halves(row.id),
            };
            self.put(key, slot, nar_key(row.nar_url), now);
            report.routes += 1;
            true
        };
        let skipped = db.load_routes(now, self.max_entries, &mut sink)?;
        let (negatives, bad) = db.load_negatives(now)?;
        report.skipped = skipped + bad;
        report.negatives = negatives.len();
        for (hash, expires_at) in negatives {
            let slot = Slot {
                expires_at: secs32(expires_at),
                upstream: NEGATIVE,
                gen: 0,
                row: [0; 2],
            };
            self.routes.insert(RouteKey::of(&hash), slot);
        }
        Ok(report)
    }

    /// Stores a route's slot, and claims its NAR for its upstream (see
    /// [`Self::nar_upstream`]). Callers hold a verified narinfo: a race
    /// winner or a verified mesh merge ([`Self::store`]), or a route
    /// written by one of those and loaded at start ([`Self::load`]).
    fn put(&self, key: RouteKey, slot: Slot, nar_key: &str, now: u64) {
        if !nar_key.is_empty() {
            self.claim_nar(nar_key, slot, NarClaim::Route, now);
        }
        self.routes.insert(key, slot);
    }

    /// The slot naming `url` and its generation, read together so that a
    /// concurrent [`Self::assign`] cannot pair one URL with another's
    /// generation. Linear: a few dozen slots, and only on the miss path.
    fn upstream_index(&self, url: &str) -> Option<(u16, u16)> {
        self.names.iter().enumerate().find_map(|(i, name)| {
            let held = name.url.read().unwrap_or_else(|e| e.into_inner());
            (held.as_deref() == Some(url)).then(|| (i as u16, name.gen.load(Ordering::Relaxed)))
        })
    }

    /// Never blocks: a worker waiting on the writer would stall every
    /// connection on its core. When the queue is full (the disk cannot keep
    /// up) the write is dropped and counted instead.
    fn enqueue(&self, w: &WriterHandle, op: WriteOp) {
        // A refusal is already counted in `dropped_writes`; logging it here
        // would put a log call on the request path exactly when the disk is
        // slow.
        let _queued = w.try_write(op);
    }
}
