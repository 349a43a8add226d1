use super::*;
use crate::proto::store_path::NIX_BASE32_ALPHABET;
use crate::route::persist::{open, spawn_writer, WriterConfig};

const A: &str = "https://a";
const B: &str = "https://b";

fn hash(i: u8) -> StoreHash {
    let mut s = *b"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    s[0] = NIX_BASE32_ALPHABET[usize::from(i % 32)];
    StoreHash::parse(&s).unwrap()
}

/// Hash number `i` (any u32), distinct for distinct `i`.
fn nth(i: u32) -> StoreHash {
    let mut s = [b'0'; 32];
    for (k, b) in s.iter_mut().rev().take(7).enumerate() {
        *b = NIX_BASE32_ALPHABET[((i >> (5 * k)) & 31) as usize];
    }
    StoreHash::parse(&s).unwrap()
}

fn table(max: usize, writer: Option<WriterHandle>) -> RouteTable {
    RouteTable::new(max, vec![A.into(), B.into()], writer)
}

fn entry(upstream: &str, nar_url: &str, expires_at: u64) -> Arc<RouteEntry> {
    Arc::new(RouteEntry {
        upstream: upstream.into(),
        narinfo: Bytes::from(format!("StorePath: /nix/store/x\nURL: {nar_url}\n")),
        nar_url: nar_url.into(),
        nar_hash: "sha256:abc".into(),
        nar_size: 1,
        expires_at,
        verified_at: 1,
        latency_ms: 1.0,
    })
}

fn hit(c: Option<Cached>) -> Option<Hit> {
    match c {
        Some(Cached::Hit(h)) => Some(h),
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
fn packed_keys_are_distinct_and_small() {
    assert_eq!(std::mem::size_of::<RouteKey>(), 20);
    assert_eq!(std::mem::size_of::<Slot>(), 16);
    assert_eq!(
        std::mem::align_of::<Slot>(),
        4,
        "no padding after the 20-byte key"
    );
    let mut seen = std::collections::HashSet::new();
    for i in 0..50_000 {
        assert!(seen.insert(RouteKey::of(&nth(i)).0), "collision at {i}");
    }
    // Every character position matters, including the last of each group.
    let base = StoreHash::parse(b"00000000000000000000000000000000").unwrap();
    for pos in 0..32 {
        let mut s = [b'0'; 32];
        s[pos] = b'z';
        let h = StoreHash::parse(&s).unwrap();
        assert!(RouteKey::of(&h) != RouteKey::of(&base), "position {pos}");
    }
}

#[test]
fn hit_until_expiry_then_miss_and_removed() {
    let t = table(100, None);
    let e = entry(A, "nar/x.nar.xz", 100);
    t.insert(hash(1), e.clone());
    let got = hit(t.get(&hash(1), 99)).unwrap();
    assert_eq!(got.upstream, 0);
    assert_eq!(
        got.narinfo.as_ptr(),
        e.narinfo.as_ptr(),
        "shared, not copied"
    );
    assert_eq!(t.len(), 1);
    assert!(t.get(&hash(1), 100).is_none());
    assert_eq!(t.len(), 0, "expired slot removed on lookup");
    assert!(t.get(&hash(2), 0).is_none());
}

#[test]
fn expiry_beyond_2106_is_clamped_not_wrapped() {
    let t = table(100, None);
    t.insert(hash(1), entry(A, "nar/x", u64::MAX));
    assert!(hit(t.get(&hash(1), u64::from(u32::MAX) - 1)).is_some());
    t.insert_negative(hash(2), u64::MAX);
    assert_eq!(t.get(&hash(2), 4_000_000_000), Some(Cached::Negative));
}

#[test]
fn negative_entries_expire_and_are_replaced_by_routes() {
    let t = table(100, None);
    t.insert_negative(hash(1), 50);
    assert_eq!(t.get(&hash(1), 49), Some(Cached::Negative));
    assert!(t.get(&hash(1), 50).is_none());
    t.insert_negative(hash(2), 50);
    t.insert(hash(2), entry(B, "nar/y", 80));
    assert_eq!(hit(t.get(&hash(2), 60)).unwrap().upstream, 1);
}

#[test]
fn insert_replaces_existing_route() {
    let t = table(100, None);
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.insert(hash(1), entry(B, "nar/x", 100));
    assert_eq!(hit(t.get(&hash(1), 0)).unwrap().upstream, 1);
    assert_eq!(t.len(), 1);
    // A's NAR claim had expired (by the clock) when B's narinfo came.
    assert_eq!(t.nar_upstream("nar/x", 0), Some(1));
}

/// An expiry this far past the wall clock (NAR claims are judged live or
/// not by the clock).
fn live(secs: u64) -> u64 {
    crate::worker::unix_now() + secs
}

#[test]
fn a_live_nar_claim_is_never_taken_by_another_upstream() {
    let t = table(100, None);
    let now = crate::worker::unix_now();
    // A's verified narinfo for P names P's NAR file first.
    t.insert(hash(1), entry(A, "nar/p.nar.xz", live(100)));
    // B wins the race for Q with a narinfo naming the same file (the URL
    // field is not signed): Q's route is B's, P's NAR stays A's.
    t.insert(hash(2), entry(B, "/nar/p.nar.xz?steer=1", live(100)));
    assert_eq!(hit(t.get(&hash(2), now)).unwrap().upstream, 1);
    assert_eq!(t.nar_upstream("nar/p.nar.xz", now), Some(0));
    // Through the mesh too (a verified merge stores the same way).
    t.insert_from_peer(hash(3), entry(B, "nar/p.nar.xz", live(300)));
    assert_eq!(t.nar_upstream("nar/p.nar.xz", now), Some(0));
    assert_eq!(t.nar_claims_refused(), (2, 0));
    // The claimant itself refreshes it: still A's after its first expiry.
    t.insert(hash(4), entry(A, "nar/p.nar.xz", live(200)));
    assert_eq!(t.nar_upstream("nar/p.nar.xz", now + 150), Some(0));
    assert_eq!(t.nar_claims_refused(), (2, 0));
}

#[test]
fn an_expired_or_reassigned_nar_claim_is_free_again() {
    const C: &str = "http://c";
    let t = table(100, None).with_slot_capacity(3);
    let now = crate::worker::unix_now();
    t.insert(hash(1), entry(A, "nar/old", now - 1));
    t.insert(hash(2), entry(B, "nar/old", live(100)));
    assert_eq!(t.nar_upstream("nar/old", now), Some(1), "expired: free");
    t.assign(2, &Arc::from(C));
    t.insert(hash(3), entry(C, "nar/moved", live(100)));
    assert_eq!(t.nar_upstream("nar/moved", now), Some(2));
    // Slot 2 now names another URL: C's claim no longer holds the key.
    t.assign(2, &Arc::from("http://d"));
    t.insert(hash(4), entry(A, "nar/moved", live(100)));
    assert_eq!(t.nar_upstream("nar/moved", now), Some(0));
    assert_eq!(t.nar_claims_refused(), (0, 0));
}

#[test]
fn debuginfo_pins_only_fill_free_nar_keys() {
    let t = table(100, None);
    let now = crate::worker::unix_now();
    t.insert(hash(1), entry(A, "nar/p.nar.xz", live(100)));
    // A pin never replaces a live claim, whoever holds it.
    assert!(!t.pin_nar("nar/p.nar.xz", 1, live(100)));
    assert!(!t.pin_nar("nar/p.nar.xz", 0, live(500)));
    assert_eq!(t.nar_upstream("nar/p.nar.xz", now), Some(0));
    assert_eq!(
        t.nar_upstream("nar/p.nar.xz", now + 200),
        None,
        "not extended"
    );
    // A free key takes a pin, and then no other pin.
    assert!(t.pin_nar("nar/dbg.nar.xz", 1, live(100)));
    assert!(!t.pin_nar("nar/dbg.nar.xz", 0, live(100)));
    assert_eq!(t.nar_upstream("nar/dbg.nar.xz", now), Some(1));
    assert_eq!(t.nar_claims_refused(), (0, 3));
    // A verified narinfo naming the file outranks the pin.
    t.insert(hash(2), entry(A, "nar/dbg.nar.xz", live(100)));
    assert_eq!(t.nar_upstream("nar/dbg.nar.xz", now), Some(0));
    // And an expired claim is free for a pin.
    t.insert(hash(3), entry(B, "nar/gone", now - 1));
    assert!(t.pin_nar("nar/gone", 0, live(100)));
    assert_eq!(t.nar_upstream("nar/gone", now), Some(0));
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
    let t = table(100, None);
    t.insert(hash(1), entry(A, "nar/abc.nar.xz?token=t", 100));
    assert_eq!(t.nar_upstream(nar_key("/nar/abc.nar.xz"), 99), Some(0));
    assert!(t.nar_upstream("nar/other.nar.xz", 0).is_none());
    assert!(t.nar_upstream("nar/abc.nar.xz", 100).is_none(), "expired");
    assert!(t.nar_upstream("nar/abc.nar.xz", 0).is_none(), "and removed");
    // Routes without a URL field are not indexed.
    t.insert(hash(2), entry(A, "", 100));
    assert!(t.nar_upstream("", 0).is_none());
}

#[test]
fn remove_forgets_route_and_body_and_persists() {
    let (w, rx) = WriterHandle::detached(16);
    let t = table(100, Some(w));
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.insert(hash(2), entry(B, "nar/y", 100));
    t.remove(&hash(1));
    assert!(t.get(&hash(1), 0).is_none());
    assert!(hit(t.get(&hash(2), 0)).is_some());
    // A route inserted again later does not find the old body.
    t.insert_negative(hash(1), 100);
    assert_eq!(t.get(&hash(1), 0), Some(Cached::Negative));
    let ops: Vec<_> = rx.drain().collect();
    assert!(
        matches!(ops[2], WriteOp::Remove(h, Some(1)) if h == hash(1)),
        "persisted too"
    );
    assert_eq!(ops.len(), 4);
}

#[test]
fn writes_name_their_row_and_the_row_they_replace() {
    let (w, rx) = WriterHandle::detached(16);
    let t = table(100, Some(w));
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.insert(hash(1), entry(B, "nar/y", 100));
    t.insert(hash(2), entry(B, "nar/z", 100));
    t.insert_negative(hash(1), 100);
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.remove(&hash(1));
    t.remove(&hash(1));
    let ops: Vec<_> = rx.drain().collect();
    let ids = |op: &WriteOp| match op {
        WriteOp::Route(h, _, ids) => (*h, Some(ids.id), ids.replaces),
        WriteOp::Negative(h, _, replaces) => (*h, None, *replaces),
        WriteOp::Remove(h, row) => (*h, None, *row),
        _ => panic!("unexpected op"),
    };
    let got: Vec<_> = ops.iter().map(ids).collect();
    assert_eq!(
        got,
        [
            (hash(1), Some(1), None),
            (hash(1), Some(2), Some(1)),
            (hash(2), Some(3), None),
            (hash(1), None, Some(2)),
            (hash(1), Some(4), None), // a negative entry has no row
            (hash(1), None, Some(4)),
            (hash(1), None, None),
        ]
    );
}

#[test]
fn writes_are_queued_and_a_full_queue_drops_without_blocking() {
    let (w, rx) = WriterHandle::detached(2);
    let t = table(100, Some(w));
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.insert_negative(hash(2), 100);
    t.insert(hash(3), entry(A, "nar/z", 100)); // queue full
    assert_eq!(t.dropped_writes(), 1);
    // The table itself is still right.
    assert!(hit(t.get(&hash(3), 0)).is_some());
    assert_eq!(t.get(&hash(2), 0), Some(Cached::Negative));
    let ops: Vec<_> = rx.drain().collect();
    assert!(
        matches!(&ops[0], WriteOp::Route(h, e, RowIds { id: 1, replaces: None })
        if *h == hash(1) && e.nar_url() == "nar/x")
    );
    assert!(matches!(ops[1], WriteOp::Negative(h, 100, None) if h == hash(2)));
    assert_eq!(table(1, None).dropped_writes(), 0);
}

#[test]
fn stays_near_max_entries() {
    let t = table(1000, None);
    for i in 0..5000 {
        t.insert(nth(i), entry(A, "nar/x", 100));
    }
    assert!(t.len() <= 1100, "{}", t.len());
    assert!(t.len() >= 900, "{}", t.len());
}

#[test]
fn bodies_are_bounded_in_bytes_and_routes_outlive_them() {
    // About 64 bodies of ~1 KB fit; 1000 routes stay.
    let t = table(2000, None).with_narinfo_memory(64 * (1024 + BODY_OVERHEAD));
    for i in 0..1000 {
        let mut e = (*entry(A, &format!("nar/{i}"), 100)).clone();
        e.narinfo = Bytes::from(vec![b'x'; 1024]);
        t.insert(nth(i), Arc::new(e));
    }
    assert!(t.body_bytes() <= 64 * (1024 + BODY_OVERHEAD));
    let (mut hot, mut cold) = (0, 0);
    for i in 0..1000 {
        match t.get(&nth(i), 0) {
            Some(Cached::Hit(_)) => hot += 1,
            Some(Cached::Cold { upstream: 0 }) => cold += 1,
            other => panic!("route {i}: {other:?}"),
        }
    }
    assert!((40..=64).contains(&hot), "{hot} bodies held");
    assert_eq!(hot + cold, 1000, "every route is still known");
    assert_eq!(t.nar_upstream("nar/5", 0), Some(0));
}

#[test]
fn cold_routes_have_no_reader_without_a_database() {
    let t = table(10, None).with_narinfo_memory(1);
    t.insert(hash(1), entry(A, "nar/x", 100));
    assert_eq!(t.get(&hash(1), 0), Some(Cached::Cold { upstream: 0 }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(t.read_body(&hash(1), 0)), None);
}

/// A database file holding `ops`, written through the real writer.
fn database(dir: &tempfile::TempDir, ops: Vec<WriteOp>) -> String {
    let path = dir.path().join("routes.db").to_str().unwrap().to_owned();
    let (w, join) = spawn_writer(open(&path).unwrap(), WriterConfig::default());
    for op in ops {
        assert!(w.try_write(op));
    }
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    path
}

/// A route write under row `id`, replacing nothing.
fn logged(id: u64, h: StoreHash, e: Arc<RouteEntry>) -> WriteOp {
    WriteOp::Route(h, RouteRow::of(&e), RowIds { id, replaces: None })
}

fn stored(upstream: &str, nar: &str, verified_at: u64) -> Arc<RouteEntry> {
    let mut e = (*entry(upstream, nar, 4_000_000_000)).clone();
    e.verified_at = verified_at;
    Arc::new(e)
}

#[test]
fn load_fills_routes_without_bodies_and_negatives_win() {
    let dir = tempfile::tempdir().unwrap();
    let path = database(
        &dir,
        vec![
            logged(1, hash(1), stored(A, "nar/1", 30)),
            logged(2, hash(2), stored(B, "nar/2", 10)),
            logged(3, hash(3), stored("https://gone", "nar/3", 20)),
            WriteOp::Negative(hash(4), 4_000_000_000, None),
        ],
    );
    // A negative entry stored beside a route (written by ncro 2.2) wins.
    let db = open(&path).unwrap();
    let t = table(100, None);
    let r = t.load(&db, 100).unwrap();
    assert_eq!((r.routes, r.negatives, r.skipped), (2, 1, 0));
    assert_eq!(
        r.refused,
        [(hash(3), 3)],
        "its upstream is no longer configured"
    );
    assert_eq!(t.get(&hash(1), 100), Some(Cached::Cold { upstream: 0 }));
    assert_eq!(t.get(&hash(2), 100), Some(Cached::Cold { upstream: 1 }));
    assert!(t.get(&hash(3), 100).is_none());
    assert_eq!(t.get(&hash(4), 100), Some(Cached::Negative));
    assert_eq!(t.nar_upstream("nar/2", 100), Some(1));
}

#[test]
fn load_takes_the_newest_row_of_a_hash_and_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = database(
        &dir,
        vec![
            logged(1, hash(1), stored(A, "nar/1", 30)),
            logged(4, hash(2), stored(A, "nar/2", 30)),
            logged(5, hash(1), stored(B, "nar/1b", 40)),
        ],
    );
    let db = open(&path).unwrap();
    let t = table(100, None);
    let r = t.load(&db, 100).unwrap();
    assert_eq!(
        (r.routes, r.skipped),
        (2, 0),
        "the older row of hash 1 is left out"
    );
    assert_eq!(t.get(&hash(1), 100), Some(Cached::Cold { upstream: 1 }));
    let (w, join) = spawn_writer(db, WriterConfig::default());
    let t = t.with_writer(w.clone());
    t.insert(hash(3), entry(A, "nar/3", 4_000_000_000));
    t.insert(hash(1), entry(A, "nar/1", 4_000_000_000));
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    // New rows after the file's; row 5, which the table held, is replaced.
    // Row 1 stays, shadowed, until the sweep or the cap deletes it.
    let mut rows = Vec::new();
    open(&path)
        .unwrap()
        .load_routes(100, 10, &mut |h, r| {
            rows.push((h, r.id, r.upstream.to_owned()));
            true
        })
        .unwrap();
    let want = [
        (hash(1), 7, A),
        (hash(3), 6, A),
        (hash(2), 4, A),
        (hash(1), 1, A),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(h, id, u)| (*h, *id, u.to_string()))
        .collect();
    assert_eq!(rows, want);
}

/// Row ids come from the writer, after its file's rows: a table never
/// reuses one (that write would be lost), even without a load or with two
/// tables on one writer.
#[test]
fn a_table_with_a_writer_allocates_ids_after_the_files_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = database(&dir, vec![logged(7, hash(1), stored(A, "nar/1", 30))]);
    let (w, join) = spawn_writer(open(&path).unwrap(), WriterConfig::default());
    let t = table(100, Some(w.clone()));
    t.insert(hash(2), entry(A, "nar/2", 4_000_000_000));
    let t2 = table(100, None).with_writer(w.clone());
    t2.insert(hash(3), entry(A, "nar/3", 4_000_000_000));
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    let (routes, _) = open(&path).unwrap().read_routes(100).unwrap();
    let mut hashes: Vec<_> = routes.iter().map(|(h, _)| *h).collect();
    hashes.sort();
    assert_eq!(hashes, [hash(1), hash(2), hash(3)]);
}

#[test]
fn loaded_routes_claim_nars_like_races_do() {
    let dir = tempfile::tempdir().unwrap();
    // Both rows name one NAR file: the first row loaded claims it.
    let path = database(
        &dir,
        vec![
            logged(4, hash(1), stored(B, "nar/same", 10)),
            logged(5, hash(2), stored(A, "nar/same", 30)),
        ],
    );
    let db = open(&path).unwrap();
    let t = table(100, None);
    let now = crate::worker::unix_now();
    assert_eq!(t.load(&db, now).unwrap().routes, 2);
    assert_eq!(t.get(&hash(1), now), Some(Cached::Cold { upstream: 1 }));
    assert_eq!(t.get(&hash(2), now), Some(Cached::Cold { upstream: 0 }));
    let held = t.nar_upstream("nar/same", now).expect("claimed");
    assert_eq!(t.nar_claims_refused(), (1, 0));
    // A race result of the other upstream after the start changes nothing.
    let other = if held == 0 { B } else { A };
    t.insert(hash(3), entry(other, "nar/same", live(100)));
    assert_eq!(t.nar_upstream("nar/same", now), Some(held));
    assert_eq!(t.nar_claims_refused(), (2, 0));
}

#[test]
fn load_over_capacity_keeps_the_most_recent() {
    let dir = tempfile::tempdir().unwrap();
    // Row ids grow with time: here in the order of verification.
    let path = database(
        &dir,
        vec![
            logged(30, hash(1), stored(A, "nar/1", 30)),
            logged(10, hash(2), stored(B, "nar/2", 10)),
            logged(40, hash(3), stored("https://gone", "nar/3", 40)),
            logged(20, hash(5), stored(A, "nar/5", 20)),
        ],
    );
    let t = table(2, None);
    let r = t.load(&open(&path).unwrap(), 100).unwrap();
    assert_eq!(
        (r.routes, r.refused.len()),
        (2, 1),
        "a refused row takes no room"
    );
    assert!(t.get(&hash(1), 100).is_some());
    assert!(t.get(&hash(5), 100).is_some());
    assert!(t.get(&hash(2), 100).is_none());
}

#[test]
fn cold_bodies_are_read_back_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let e = stored(A, "nar/1", 30);
    let path = database(
        &dir,
        vec![
            logged(1, hash(1), e.clone()),
            logged(2, hash(2), stored(A, "nar/2", 30)),
        ],
    );
    let db = open(&path).unwrap();
    let (reader, _thread) = reader::BodyReader::spawn(&path).unwrap();
    let t = table(100, None).with_reader(reader);
    t.load(&db, 100).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let body = rt.block_on(t.read_body(&hash(1), 0)).unwrap();
    assert_eq!(body, e.narinfo);
    assert_eq!(t.get(&hash(1), 100), Some(Cached::Cold { upstream: 0 }));
    t.keep_body(&hash(1), 0, body.clone());
    assert_eq!(hit(t.get(&hash(1), 100)).unwrap().narinfo, body);
    // The row names another upstream than asked: not this route's body.
    assert_eq!(rt.block_on(t.read_body(&hash(2), 1)), None);
    assert_eq!(rt.block_on(t.read_body(&hash(9), 0)), None, "no row");
    assert_eq!(t.disk_reads(), (1, 2));
}

#[test]
fn raced_routes_reach_the_learned_feed_and_peer_routes_do_not() {
    let t = table(100, None);
    t.insert(hash(1), entry(A, "nar/x", 100)); // before the feed
    let feed = t.learned_feed(2).unwrap();
    assert!(t.learned_feed(2).is_none(), "one feed only");
    t.insert(hash(2), entry(A, "nar/y", 100));
    t.insert_from_peer(hash(3), entry(A, "nar/z", 100));
    assert!(hit(t.get(&hash(3), 0)).is_some(), "peer routes are served");
    assert_eq!(t.nar_upstream("nar/z", 0), Some(0));
    t.insert(hash(4), entry(A, "nar/w", 100));
    t.insert(hash(5), entry(A, "nar/v", 100)); // feed full
    let got: Vec<StoreHash> = feed.drain().map(|(h, _)| h).collect();
    assert_eq!(got, [hash(2), hash(4)]);
    assert_eq!(t.learned_dropped(), 1);
    assert!(
        hit(t.get(&hash(5), 0)).is_some(),
        "a full feed never loses the route"
    );
}

#[test]
fn pinned_nar_is_routed_until_expiry() {
    let t = table(100, None);
    t.pin_nar("nar/dbg.nar.xz", 1, 50);
    assert_eq!(t.nar_upstream("nar/dbg.nar.xz", 49), Some(1));
    assert!(t.nar_upstream("nar/dbg.nar.xz", 50).is_none(), "expired");
    assert!(t.is_empty(), "a pin is no route");
    t.pin_nar("", 1, 50);
    assert!(t.nar_upstream("", 0).is_none());
    t.pin_nar("nar/far.nar.xz", 7, 50);
    assert!(
        t.nar_upstream("nar/far.nar.xz", 0).is_none(),
        "no such slot"
    );
}

#[test]
fn route_hashes_lists_live_routes_only() {
    let t = table(100, None);
    t.insert(hash(1), entry(A, "nar/x", 100));
    t.insert(hash(2), entry(A, "nar/y", 50));
    t.insert_negative(hash(3), 100);
    let mut got: Vec<_> = t.route_hashes(60).collect();
    got.sort();
    assert_eq!(got, [hash(1)]);
    assert_eq!(t.route_hashes(0).count(), 2);
    assert_eq!(RouteKey::of(&nth(123_456)).hash(), nth(123_456));
}

#[test]
fn discovered_slots_keep_routes_and_a_reused_slot_drops_its_old_urls() {
    const C: &str = "http://c";
    const D: &str = "http://d";
    let t = table(100, None).with_slot_capacity(3);
    t.insert(hash(1), entry(C, "nar/c", 100));
    assert!(t.get(&hash(1), 0).is_none(), "slot 2 not assigned yet");
    t.assign(2, &Arc::from(C));
    t.insert(hash(1), entry(C, "nar/c", 100));
    assert_eq!(hit(t.get(&hash(1), 0)).unwrap().upstream, 2);
    t.assign(2, &Arc::from(C));
    assert!(hit(t.get(&hash(1), 0)).is_some(), "same URL: routes stay");
    t.pin_nar("nar/pin", 2, 100);
    // Slot 2 is recycled for another URL: C's routes, NAR index entries
    // and pins stop at once, before anything is stored for D.
    t.assign(2, &Arc::from(D));
    assert!(t.get(&hash(1), 0).is_none());
    assert!(t.nar_upstream("nar/c", 0).is_none());
    assert!(t.nar_upstream("nar/pin", 0).is_none());
    assert_eq!(t.route_hashes(0).count(), 0);
    t.insert(hash(2), entry(C, "nar/c2", 100));
    assert!(t.get(&hash(2), 0).is_none(), "C names no slot any more");
    t.insert(hash(3), entry(D, "nar/d", 100));
    assert_eq!(hit(t.get(&hash(3), 0)).unwrap().upstream, 2);
    assert_eq!(t.slot_url(2).as_deref(), Some(D));
    t.assign(9, &Arc::from(D)); // beyond capacity: ignored
    assert_eq!(t.merit(&hash(3)), Some((1.0, 1)));
}

#[test]
fn nar_url_rules_rewrite_once_when_stored_and_keep_the_real_url() {
    use crate::proto::narinfo::NarUrlMode;
    let rules = vec![
        NarUrlRule {
            mode: NarUrlMode::ToSelf,
            storage: None,
        },
        NarUrlRule {
            mode: NarUrlMode::ToUpstream,
            storage: Some("https://files/b".into()),
        },
    ];
    let t = table(100, None).with_nar_urls(rules, NarUrlMode::ToSelf);
    let h = hash(1);
    let e = entry(A, "nar/abc.nar.xz?t=1", 100);
    let served = t.insert(h, e.clone());
    let want = format!("StorePath: /nix/store/x\nURL: nar/{h}.nar.xz\n");
    assert_eq!(served, want.as_bytes());
    // A hit serves the stored rewrite; the real URL stays known.
    assert_eq!(hit(t.get(&h, 50)).unwrap().narinfo, served);
    assert_eq!(
        t.nar_source(&h, 50),
        Some(NarSource::Hot {
            upstream: 0,
            narinfo: served.clone(),
            upstream_url: "nar/abc.nar.xz?t=1".into(),
        })
    );
    // A body read back from the database (the upstream's) is rewritten too.
    assert_eq!(t.keep_body(&h, 0, e.narinfo.clone()), served);
    assert_eq!(
        t.insert(hash(2), entry(B, "nar/y.nar", 100)),
        "StorePath: /nix/store/x\nURL: https://files/b/nar/y.nar\n".as_bytes()
    );
    // Absolute URLs are kept; so is everything under `keep`.
    let abs = entry(A, "https://blobs/z.nar", 100);
    assert_eq!(t.insert(hash(3), abs.clone()), abs.narinfo);
    let keep = table(100, None);
    let e = entry(A, "nar/k.nar", 100);
    assert_eq!(keep.insert(h, e.clone()), e.narinfo);
    match keep.nar_source(&h, 50) {
        Some(NarSource::Hot { upstream_url, .. }) => assert_eq!(&*upstream_url, "nar/k.nar"),
        other => panic!("{other:?}"),
    }
    assert_eq!(keep.nar_source(&hash(9), 50), None);
}
