//! A route-cache hit: `RouteTable::get` (sharded quick_cache, expiry
//! check) against the simplest shared map, a `Mutex<HashMap>` with the same
//! key and value types. With two threads the mutex is contended on every
//! lookup; the sharded cache mostly is not.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use divan::{black_box, Bencher};
use ncro::proto::store_path::StoreHash;
use ncro::route::{Cached, RouteEntry, RouteTable};

/// Routes held: a warm cache for a mid-sized build farm.
const ROUTES: usize = 10_000;
const NOW: u64 = 1_700_000_000;

struct Fixture {
    hashes: Vec<StoreHash>,
    table: RouteTable,
    mutex_map: Mutex<HashMap<StoreHash, Arc<RouteEntry>>>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let upstream: Arc<str> = Arc::from("https://cache.nixos.org");
    let table = RouteTable::new(ROUTES * 2, vec![upstream.clone()], None);
    let mut map = HashMap::with_capacity(ROUTES);
    let mut hashes = Vec::with_capacity(ROUTES);
    for i in 0..ROUTES as u64 {
        let text = crate::fake_base32(i + 1000, 32);
        let hash = StoreHash::parse(text.as_bytes()).expect("fake hash is base32");
        let entry = Arc::new(entry(&upstream, &text));
        table.insert(hash, entry.clone());
        map.insert(hash, entry);
        hashes.push(hash);
    }
    Fixture {
        hashes,
        table,
        mutex_map: Mutex::new(map),
    }
});

fn entry(upstream: &Arc<str>, hash: &str) -> RouteEntry {
    RouteEntry {
        upstream: upstream.clone(),
        narinfo: Bytes::from(format!("StorePath: /nix/store/{hash}-x\n")),
        nar_url: format!("nar/{hash}.nar.xz").into(),
        nar_hash: format!("sha256:{hash}").into(),
        nar_size: 1024,
        expires_at: u64::MAX,
        verified_at: NOW,
        latency_ms: 12.5,
    }
}

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

/// The next key for this thread. A prime stride walks every route in an
/// order unrelated to insertion; it runs outside the timed section.
fn next_hash() -> StoreHash {
    let f = &*FIXTURE;
    NEXT.with(|n| {
        let i = (n.get() + 7919) % f.hashes.len();
        n.set(i);
        f.hashes[i]
    })
}

pub fn warm() {
    LazyLock::force(&FIXTURE);
    LazyLock::force(&INSERT);
}

#[divan::bench(sample_size = 1000, threads = [1, 2])]
fn ncro(bencher: Bencher) {
    let table = &FIXTURE.table;
    bencher
        .with_inputs(next_hash)
        .bench_refs(|hash| match table.get(black_box(hash), NOW) {
            Some(Cached::Hit(e)) => e,
            _ => panic!("every benched hash was inserted"),
        });
}

#[divan::bench(sample_size = 1000, threads = [1, 2])]
fn baseline_mutex_hashmap(bencher: Bencher) {
    let map = &FIXTURE.mutex_map;
    bencher.with_inputs(next_hash).bench_refs(|hash| {
        let guard = map.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .get(black_box(hash))
            .cloned()
            .expect("every benched hash was inserted")
    });
}

/// Storing a race winner: `RouteTable::insert` as the mesh leaves it
/// (no feed) against the same insert with the gossip feed on (one extra
/// `Arc` clone and a non-blocking `try_send`). The feed is drained while
/// inputs are made, outside the timed section, so it never fills (as in
/// service, where the gossip task empties it every round). Tables have no
/// writer, so the SQLite queue is not part of either figure.
struct InsertFixture {
    plain: RouteTable,
    fed: RouteTable,
    feed: flume::Receiver<ncro::route::Learned>,
    entry: Arc<RouteEntry>,
}

static INSERT: LazyLock<InsertFixture> = LazyLock::new(|| {
    let upstream: Arc<str> = Arc::from("https://cache.nixos.org");
    let plain = RouteTable::new(ROUTES * 2, vec![upstream.clone()], None);
    let fed = RouteTable::new(ROUTES * 2, vec![upstream.clone()], None);
    let feed = fed.learned_feed(1 << 16).expect("first feed");
    let text = crate::fake_base32(7, 32);
    InsertFixture {
        plain,
        fed,
        feed,
        entry: Arc::new(entry(&upstream, &text)),
    }
});

fn insert_input() -> (StoreHash, Arc<RouteEntry>) {
    let f = &*INSERT;
    f.feed.drain().for_each(drop);
    (next_hash(), f.entry.clone())
}

#[divan::bench(sample_size = 200)]
fn ncro_insert_with_gossip_feed(bencher: Bencher) {
    bencher
        .with_inputs(insert_input)
        .bench_values(|(hash, e)| INSERT.fed.insert(black_box(hash), e));
}

#[divan::bench(sample_size = 200)]
fn baseline_insert_without_feed(bencher: Bencher) {
    bencher
        .with_inputs(insert_input)
        .bench_values(|(hash, e)| INSERT.plain.insert(black_box(hash), e));
}
