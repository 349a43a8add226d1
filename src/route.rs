//! HOT read side of the route table: which upstream answered a store hash,
//! with the narinfo bytes to serve again, shared by every worker thread.
//!
//! Lookups are one sharded quick_cache read (no SQLite, no allocation, no
//! logging). Writes update the cache and hand a copy of the `Arc` to the
//! writer thread in [`persist`], which is the only code that touches SQLite.
//! quick_cache has no TTL, so every slot carries its absolute expiry and a
//! lookup that finds an expired slot treats it as a miss and removes it.

pub mod persist;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use quick_cache::sync::Cache;

use crate::proto::store_path::StoreHash;
use persist::{WriteOp, WriterHandle};

/// A route: the upstream that served `<hash>.narinfo`, and what it served.
/// One allocation per route (inside its `Arc`) plus the three byte buffers;
/// `upstream` is shared by every route to the same upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEntry {
    /// Upstream URL as configured; it is the identity of an upstream.
    pub upstream: Arc<str>,
    /// Served as is on hits; clones share the buffer, never copy it.
    /// Build it with `Bytes::copy_from_slice` (exact size): a slice of a
    /// larger read buffer would keep the whole buffer alive for as long as
    /// the route lives.
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

/// Answer of [`RouteTable::get`].
#[derive(Debug, Clone)]
pub enum Cached {
    Hit(Arc<RouteEntry>),
    /// No upstream had it recently; answer 404 without racing.
    Negative,
}

#[derive(Clone)]
enum Slot {
    Route(Arc<RouteEntry>),
    Negative { expires_at: u64 },
}

impl Slot {
    fn expires_at(&self) -> u64 {
        match self {
            Slot::Route(e) => e.expires_at,
            Slot::Negative { expires_at } => *expires_at,
        }
    }
}

/// The NAR index is keyed by a 128-bit keyed hash of the NAR key instead of
/// the string: this saves an ~80-byte allocation per route. The two SipHash
/// instances have random per-process keys, so nobody outside can aim for a
/// collision, and an accidental one (about 2^-89 for a million keys) would
/// only send a NAR request to an upstream that then answers 404.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct NarKey(u64, u64);

#[derive(Clone)]
struct NarSlot {
    upstream: Arc<str>,
    expires_at: u64,
}

/// The NAR index keeps no ghost slots (quick_cache's memory of recently
/// evicted keys, which costs a full slot each): a NAR key only comes back
/// when its route is inserted again, and the route cache already keeps
/// ghosts for that decision. This saves about 28 bytes per route.
fn nar_index(max_entries: usize) -> Cache<NarKey, NarSlot> {
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

/// Routes and negative entries shared by all workers (`Arc<RouteTable>`).
pub struct RouteTable {
    routes: Cache<StoreHash, Slot>,
    nars: Cache<NarKey, NarSlot>,
    nar_hashers: (RandomState, RandomState),
    max_entries: usize,
    /// None when routes are not persisted (no database configured, tests).
    writer: Option<WriterHandle>,
    /// Routes this node's races learned, for mesh gossip; set once at
    /// start when the mesh is enabled. The control thread drains it.
    learned: OnceLock<flume::Sender<Learned>>,
    /// Learned routes the gossip feed had no room for.
    learned_dropped: AtomicU64,
}

/// A route as it reaches the gossip feed.
pub type Learned = (StoreHash, Arc<RouteEntry>);

impl RouteTable {
    /// `max_entries` bounds routes and negative entries together (quick_cache
    /// holds it approximately, per shard).
    pub fn new(max_entries: usize, writer: Option<WriterHandle>) -> Self {
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
            nar_hashers: (RandomState::new(), RandomState::new()),
            max_entries,
            writer,
            learned: OnceLock::new(),
            learned_dropped: AtomicU64::new(0),
        }
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

    /// The live route or negative entry for `hash` at `now` (unix seconds).
    #[inline]
    pub fn get(&self, hash: &StoreHash, now: u64) -> Option<Cached> {
        let slot = self.routes.get(hash)?;
        if slot.expires_at() > now {
            return Some(match slot {
                Slot::Route(e) => Cached::Hit(e),
                Slot::Negative { .. } => Cached::Negative,
            });
        }
        // Re-checked under the shard lock: another worker may have stored a
        // fresh slot since our read, and that one must stay.
        self.routes.remove_if(hash, |s| s.expires_at() <= now);
        None
    }

    /// Stores a route (replacing any slot for `hash`), indexes its NAR and
    /// queues it for persistence and, with the mesh on, for gossip.
    pub fn insert(&self, hash: StoreHash, entry: Arc<RouteEntry>) {
        if let Some(feed) = self.learned.get() {
            // Never waits: a full feed only means a peer hears of this
            // route later (when it races it itself).
            if feed.try_send((hash, entry.clone())).is_err() {
                self.learned_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.store(hash, entry);
    }

    /// Stores a route a mesh peer announced: like [`Self::insert`], but not
    /// fed back to gossip (peers hear each route from the node that raced it).
    pub fn insert_from_peer(&self, hash: StoreHash, entry: Arc<RouteEntry>) {
        self.store(hash, entry);
    }

    fn store(&self, hash: StoreHash, entry: Arc<RouteEntry>) {
        self.index_nar(&entry);
        match &self.writer {
            Some(w) => {
                self.routes.insert(hash, Slot::Route(entry.clone()));
                self.enqueue(w, WriteOp::Route(hash, entry));
            }
            None => self.routes.insert(hash, Slot::Route(entry)),
        }
    }

    /// Remembers that no upstream has `hash` until `expires_at`.
    pub fn insert_negative(&self, hash: StoreHash, expires_at: u64) {
        self.routes.insert(hash, Slot::Negative { expires_at });
        if let Some(w) = &self.writer {
            self.enqueue(w, WriteOp::Negative(hash, expires_at));
        }
    }

    /// Forgets `hash` (e.g. its upstream no longer serves it), here and in
    /// the database. Its NAR index entry goes too if it still points to the
    /// same upstream.
    pub fn remove(&self, hash: &StoreHash) {
        if let Some((_, Slot::Route(e))) = self.routes.remove(hash) {
            let key = self.nar_index_key(e.nar_key());
            self.nars.remove_if(&key, |n| n.upstream == e.upstream);
        }
        if let Some(w) = &self.writer {
            self.enqueue(w, WriteOp::Remove(*hash));
        }
    }

    /// The upstream that served the narinfo naming this NAR, if still live.
    /// `nar_key` comes from [`nar_key`].
    #[inline]
    pub fn nar_upstream(&self, nar_key: &str, now: u64) -> Option<Arc<str>> {
        let key = self.nar_index_key(nar_key);
        let slot = self.nars.get(&key)?;
        if slot.expires_at > now {
            return Some(slot.upstream);
        }
        self.nars.remove_if(&key, |s| s.expires_at <= now);
        None
    }

    /// Sends requests for the NAR `nar_key` to `upstream` until
    /// `expires_at`, without a route (a debuginfo record naming a NAR of
    /// the cache that served it). Memory only: the hint is not persisted.
    pub fn pin_nar(&self, nar_key: &str, upstream: Arc<str>, expires_at: u64) {
        if nar_key.is_empty() {
            return;
        }
        let slot = NarSlot {
            upstream,
            expires_at,
        };
        self.nars.insert(self.nar_index_key(nar_key), slot);
    }

    /// Hashes of the live routes (negative entries left out), for ncro's
    /// published filter. COLD: takes a shard's read lock per entry.
    pub fn route_hashes(&self, now: u64) -> impl Iterator<Item = StoreHash> + '_ {
        self.routes
            .iter()
            .filter_map(move |(hash, slot)| match slot {
                Slot::Route(e) if e.expires_at > now => Some(hash),
                _ => None,
            })
    }

    /// Routes plus negative entries currently held (expired ones included
    /// until a lookup or eviction drops them).
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Bytes held by the two caches' own slots and hash maps, not counting
    /// the entries they point to (for a metrics gauge and sizing).
    pub fn structure_bytes(&self) -> usize {
        self.routes.memory_used().total() + self.nars.memory_used().total()
    }

    /// Writes refused because the writer queue was full or closed. The table
    /// itself stays correct; only persistence of those writes is lost.
    pub fn dropped_writes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.dropped_writes())
    }

    pub fn writer(&self) -> Option<&WriterHandle> {
        self.writer.as_ref()
    }

    /// Fills the table at startup from what [`persist::open_and_load`]
    /// read, without writing anything back. When there are more routes than
    /// fit, the most recently verified are kept. Negative entries go last so
    /// that, as in ncro 2.2, a negative entry wins over a route for the same
    /// hash.
    pub fn load(
        &self,
        mut routes: Vec<(StoreHash, Arc<RouteEntry>)>,
        negatives: Vec<(StoreHash, u64)>,
    ) {
        if routes.len() > self.max_entries {
            routes.sort_unstable_by_key(|(_, e)| std::cmp::Reverse(e.verified_at));
            routes.truncate(self.max_entries);
        }
        for (hash, entry) in routes {
            self.index_nar(&entry);
            self.routes.insert(hash, Slot::Route(entry));
        }
        for (hash, expires_at) in negatives {
            self.routes.insert(hash, Slot::Negative { expires_at });
        }
    }

    fn index_nar(&self, entry: &RouteEntry) {
        let key = entry.nar_key();
        if key.is_empty() {
            return;
        }
        let slot = NarSlot {
            upstream: entry.upstream.clone(),
            expires_at: entry.expires_at,
        };
        self.nars.insert(self.nar_index_key(key), slot);
    }

    fn nar_index_key(&self, key: &str) -> NarKey {
        NarKey(
            self.nar_hashers.0.hash_one(key),
            self.nar_hashers.1.hash_one(key),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u8) -> StoreHash {
        let mut s = *b"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
        s[0] = crate::proto::store_path::NIX_BASE32_ALPHABET[usize::from(i % 32)];
        StoreHash::parse(&s).unwrap()
    }

    fn entry(upstream: &str, nar_url: &str, expires_at: u64) -> Arc<RouteEntry> {
        Arc::new(RouteEntry {
            upstream: upstream.into(),
            narinfo: Bytes::from_static(b"StorePath: /nix/store/x\n"),
            nar_url: nar_url.into(),
            nar_hash: "sha256:abc".into(),
            nar_size: 1,
            expires_at,
            verified_at: 1,
            latency_ms: 1.0,
        })
    }

    fn hit(c: Option<Cached>) -> Option<Arc<RouteEntry>> {
        match c {
            Some(Cached::Hit(e)) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RouteTable>();
        assert_send_sync::<WriterHandle>();
    }

    #[test]
    fn hit_until_expiry_then_miss_and_removed() {
        let t = RouteTable::new(100, None);
        let e = entry("https://a", "nar/x.nar.xz", 100);
        t.insert(hash(1), e.clone());
        let got = hit(t.get(&hash(1), 99)).unwrap();
        assert!(Arc::ptr_eq(&got, &e), "a hit shares the entry, no copy");
        assert_eq!(t.len(), 1);
        assert!(t.get(&hash(1), 100).is_none());
        assert_eq!(t.len(), 0, "expired slot removed on lookup");
        assert!(t.get(&hash(2), 0).is_none());
    }

    #[test]
    fn negative_entries_expire_and_are_replaced_by_routes() {
        let t = RouteTable::new(100, None);
        t.insert_negative(hash(1), 50);
        assert!(matches!(t.get(&hash(1), 49), Some(Cached::Negative)));
        assert!(t.get(&hash(1), 50).is_none());
        t.insert_negative(hash(2), 50);
        t.insert(hash(2), entry("https://a", "nar/y", 80));
        assert_eq!(&*hit(t.get(&hash(2), 60)).unwrap().upstream, "https://a");
    }

    #[test]
    fn insert_replaces_existing_route() {
        let t = RouteTable::new(100, None);
        t.insert(hash(1), entry("https://a", "nar/x", 100));
        t.insert(hash(1), entry("https://b", "nar/x", 100));
        assert_eq!(&*hit(t.get(&hash(1), 0)).unwrap().upstream, "https://b");
        assert_eq!(t.len(), 1);
        assert_eq!(t.nar_upstream("nar/x", 0).as_deref(), Some("https://b"));
    }

    #[test]
    fn raced_routes_reach_the_learned_feed_and_peer_routes_do_not() {
        let t = RouteTable::new(100, None);
        t.insert(hash(1), entry("https://a", "nar/x", 100)); // before the feed
        let feed = t.learned_feed(2).unwrap();
        assert!(t.learned_feed(2).is_none(), "one feed only");
        t.insert(hash(2), entry("https://a", "nar/y", 100));
        t.insert_from_peer(hash(3), entry("https://a", "nar/z", 100));
        assert!(hit(t.get(&hash(3), 0)).is_some(), "peer routes are served");
        assert_eq!(t.nar_upstream("nar/z", 0).as_deref(), Some("https://a"));
        t.insert(hash(4), entry("https://a", "nar/w", 100));
        t.insert(hash(5), entry("https://a", "nar/v", 100)); // feed full
        let got: Vec<StoreHash> = feed.drain().map(|(h, _)| h).collect();
        assert_eq!(got, [hash(2), hash(4)]);
        assert_eq!(t.learned_dropped(), 1);
        assert!(
            hit(t.get(&hash(5), 0)).is_some(),
            "a full feed never loses the route"
        );
    }

    #[test]
    fn nar_key_strips_leading_slash_and_query() {
        assert_eq!(nar_key("nar/abc.nar.xz"), "nar/abc.nar.xz");
        assert_eq!(nar_key("/nar/abc.nar.xz?hash=1&x=2"), "nar/abc.nar.xz");
        assert_eq!(nar_key("nar/abc.nar?"), "nar/abc.nar");
        assert_eq!(nar_key(""), "");
    }

    #[test]
    fn nar_index_follows_routes_and_expiry() {
        let t = RouteTable::new(100, None);
        t.insert(hash(1), entry("https://a", "nar/abc.nar.xz?token=t", 100));
        assert_eq!(
            t.nar_upstream(nar_key("/nar/abc.nar.xz"), 99).as_deref(),
            Some("https://a")
        );
        assert!(t.nar_upstream("nar/other.nar.xz", 0).is_none());
        assert!(t.nar_upstream("nar/abc.nar.xz", 100).is_none(), "expired");
        assert!(t.nar_upstream("nar/abc.nar.xz", 0).is_none(), "and removed");
        // Routes without a URL field are not indexed.
        t.insert(hash(2), entry("https://a", "", 100));
        assert!(t.nar_upstream("", 0).is_none());
    }

    #[test]
    fn pinned_nar_is_routed_until_expiry() {
        let t = RouteTable::new(100, None);
        t.pin_nar("nar/dbg.nar.xz", "https://b".into(), 50);
        assert_eq!(
            t.nar_upstream("nar/dbg.nar.xz", 49).as_deref(),
            Some("https://b")
        );
        assert!(t.nar_upstream("nar/dbg.nar.xz", 50).is_none(), "expired");
        assert!(t.is_empty(), "a pin is no route");
        t.pin_nar("", "https://b".into(), 50);
        assert!(t.nar_upstream("", 0).is_none());
    }

    #[test]
    fn remove_forgets_route_and_its_nar() {
        let (w, rx) = WriterHandle::detached(16);
        let t = RouteTable::new(100, Some(w));
        t.insert(hash(1), entry("https://a", "nar/x", 100));
        t.insert(hash(2), entry("https://b", "nar/y", 100));
        t.remove(&hash(1));
        t.remove(&hash(2));
        assert!(t.get(&hash(1), 0).is_none());
        assert!(t.nar_upstream("nar/x", 0).is_none());
        assert!(t.nar_upstream("nar/y", 0).is_none());
        let ops: Vec<_> = rx.drain().collect();
        assert!(
            matches!(ops[2], WriteOp::Remove(h) if h == hash(1)),
            "persisted too"
        );
        assert_eq!(ops.len(), 4);
    }

    #[test]
    fn remove_keeps_nar_entry_owned_by_another_upstream() {
        let t = RouteTable::new(100, None);
        t.insert(hash(1), entry("https://a", "nar/x", 100));
        t.insert(hash(2), entry("https://b", "nar/x", 100));
        t.remove(&hash(1));
        assert_eq!(t.nar_upstream("nar/x", 0).as_deref(), Some("https://b"));
    }

    #[test]
    fn writes_are_queued_and_a_full_queue_drops_without_blocking() {
        let (w, rx) = WriterHandle::detached(2);
        let t = RouteTable::new(100, Some(w));
        t.insert(hash(1), entry("https://a", "nar/x", 100));
        t.insert_negative(hash(2), 100);
        t.insert(hash(3), entry("https://a", "nar/z", 100)); // queue full
        assert_eq!(t.dropped_writes(), 1);
        // The table itself is still right.
        assert!(hit(t.get(&hash(3), 0)).is_some());
        assert!(matches!(t.get(&hash(2), 0), Some(Cached::Negative)));
        let ops: Vec<_> = rx.drain().collect();
        assert!(matches!(&ops[0], WriteOp::Route(h, e) if *h == hash(1) && &*e.nar_url == "nar/x"));
        assert!(matches!(ops[1], WriteOp::Negative(h, 100) if h == hash(2)));
        assert_eq!(RouteTable::new(1, None).dropped_writes(), 0);
    }

    #[test]
    fn route_hashes_lists_live_routes_only() {
        let t = RouteTable::new(100, None);
        t.insert(hash(1), entry("https://a", "nar/x", 100));
        t.insert(hash(2), entry("https://a", "nar/y", 50));
        t.insert_negative(hash(3), 100);
        let mut got: Vec<_> = t.route_hashes(60).collect();
        got.sort();
        assert_eq!(got, [hash(1)]);
        assert_eq!(t.route_hashes(0).count(), 2);
    }

    #[test]
    fn stays_near_max_entries() {
        let t = RouteTable::new(1000, None);
        for i in 0..5000u32 {
            let mut s = [b'0'; 32];
            for (k, b) in s.iter_mut().rev().take(4).enumerate() {
                *b = crate::proto::store_path::NIX_BASE32_ALPHABET[((i >> (5 * k)) & 31) as usize];
            }
            t.insert(
                StoreHash::parse(&s).unwrap(),
                entry("https://a", "nar/x", 100),
            );
        }
        assert!(t.len() <= 1100, "{}", t.len());
        assert!(t.len() >= 900, "{}", t.len());
    }

    #[test]
    fn load_fills_without_writing_and_negatives_win() {
        let (w, rx) = WriterHandle::detached(16);
        let t = RouteTable::new(2, Some(w));
        let mut routes = Vec::new();
        for (i, verified) in [(1u8, 30u64), (2, 10), (3, 20)] {
            let mut e = (*entry("https://a", "nar/n", 100)).clone();
            e.verified_at = verified;
            e.nar_url = format!("nar/{i}").into();
            routes.push((hash(i), Arc::new(e)));
        }
        t.load(routes, vec![(hash(3), 100)]);
        assert!(rx.is_empty(), "loading writes nothing back");
        // Over capacity: the least recently verified (hash 2) is left out.
        assert!(hit(t.get(&hash(1), 0)).is_some());
        assert!(t.get(&hash(2), 0).is_none());
        assert!(t.nar_upstream("nar/2", 0).is_none());
        assert!(matches!(t.get(&hash(3), 0), Some(Cached::Negative)));
        assert_eq!(t.nar_upstream("nar/1", 0).as_deref(), Some("https://a"));
    }
}
