use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection, ErrorCode};

use super::db::parent_dir;
use super::writer::error_kind;
use super::*;

fn hash(i: u32) -> StoreHash {
    let a = crate::proto::store_path::NIX_BASE32_ALPHABET;
    let mut s = [b'0'; 32];
    let mut n = i;
    for b in s.iter_mut().rev().take(7) {
        *b = a[(n % 32) as usize];
        n /= 32;
    }
    StoreHash::parse(&s).unwrap()
}

fn entry(upstream: &str, expires_at: u64, verified_at: u64) -> Arc<RouteEntry> {
    Arc::new(RouteEntry {
        upstream: upstream.into(),
        narinfo: Bytes::from_static(b"StorePath: /nix/store/x\nURL: nar/abc.nar.xz\n"),
        nar_url: "nar/abc.nar.xz".into(),
        nar_hash: "sha256:abc".into(),
        nar_size: 1234,
        expires_at,
        verified_at,
        latency_ms: 12.5,
    })
}

thread_local! {
    /// What the route table keeps for these tests: the next row id and the
    /// row of each hash's current route (see [`route`]).
    static LEDGER: std::cell::RefCell<(u64, std::collections::HashMap<StoreHash, u64>)> =
        std::cell::RefCell::new((1, Default::default()));
}

/// A route write as the route table makes it: a new row id, replacing the
/// row of the hash's previous route written by this test.
fn route(h: StoreHash, e: Arc<RouteEntry>) -> WriteOp {
    let ids = LEDGER.with_borrow_mut(|(next, rows)| {
        let id = *next;
        *next += 1;
        RowIds {
            id,
            replaces: rows.insert(h, id),
        }
    });
    WriteOp::Route(h, RouteRow::of(&e), ids)
}

/// The row of `h`'s current route, forgotten (a negative entry or a
/// removal replaces it).
fn take_row(h: StoreHash) -> Option<u64> {
    LEDGER.with_borrow_mut(|(_, rows)| rows.remove(&h))
}

fn negative(h: StoreHash, expires_at: u64) -> WriteOp {
    WriteOp::Negative(h, expires_at, take_row(h))
}

fn remove(h: StoreHash) -> WriteOp {
    WriteOp::Remove(h, take_row(h))
}

fn cfg(max_entries: usize) -> WriterConfig {
    WriterConfig {
        max_entries,
        sweep_interval: Duration::from_secs(3600),
        batch_max: 64,
        ..WriterConfig::default()
    }
}

const FAR: u64 = 4_000_000_000;

fn db_path(dir: &tempfile::TempDir) -> String {
    dir.path()
        .join("sub/routes.db")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Writes `ops` through a real writer thread and waits for its exit.
fn write_all(path: &str, max: usize, ops: Vec<WriteOp>) -> WriterHandle {
    let (_, db) = open_and_load(path, 0).unwrap();
    let (w, join) = spawn_writer(db, cfg(max));
    for op in ops {
        assert!(w.try_write(op));
    }
    w.flush_blocking().unwrap();
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    w
}

fn bodies(db: &Db) -> i64 {
    db.conn
        .query_row("SELECT COUNT(*) FROM route_body", [], |r| r.get(0))
        .unwrap()
}

fn columns(c: &Connection, table: &str) -> Vec<String> {
    let mut stmt = c.prepare(&format!("PRAGMA table_info({table})")).unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, String>(1)).unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn creates_the_route_log_and_ncro_2_2_tables_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (loaded, db) = open_and_load(&path, 0).unwrap();
    assert!(loaded.routes.is_empty() && loaded.negatives.is_empty());
    assert_eq!(
        columns(&db.conn, "route_log"),
        [
            "id",
            "hash",
            "upstream",
            "nar_url",
            "expires_at",
            "verified_at"
        ]
    );
    assert_eq!(
        columns(&db.conn, "route_body"),
        ["id", "latency_ms", "nar_hash", "nar_size", "narinfo"]
    );
    assert!(
        columns(&db.conn, "routes").is_empty(),
        "no ncro 2.2 routes table"
    );
    // No index on the route tables: a new route only appends.
    let indexes: i64 = db
        .conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
             AND tbl_name IN ('route_log', 'route_body')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0);
    let page: i64 = db
        .conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(page, 16384);
    assert_eq!(
        columns(&db.conn, "negative_cache"),
        ["store_path", "expires_at"]
    );
    assert_eq!(
        columns(&db.conn, "upstream_health"),
        ["url", "ema_latency", "consecutive_fails", "total_queries"]
    );
    let mode: String = db
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = db
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 1, "synchronous=NORMAL");
}

#[test]
fn round_trip_routes_negatives_health() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let health = HealthRow {
        url: "https://cache.nixos.org".into(),
        ema_latency: 33.0,
        consecutive_fails: 2,
        total_queries: 99,
    };
    let w = write_all(
        &path,
        100,
        vec![
            route(hash(1), entry("https://a", FAR, 10)),
            route(hash(2), entry("https://a", FAR, 11)),
            negative(hash(3), FAR),
            WriteOp::Health(health.clone()),
        ],
    );
    assert_eq!(w.rows_written(), 4);
    assert_eq!(w.stored_routes(), 2);
    assert_eq!(w.write_errors(), 0);
    let (loaded, db) = open_and_load(&path, 100).unwrap();
    assert_eq!(db.route_count(), 2);
    let mut routes = loaded.routes;
    routes.sort_by_key(|(h, _)| *h);
    assert_eq!(routes.len(), 2);
    assert_eq!(
        (routes[0].0, &routes[0].1),
        (hash(1), &entry("https://a", FAR, 10))
    );
    // Both rows share one upstream allocation.
    assert!(Arc::ptr_eq(&routes[0].1.upstream, &routes[1].1.upstream));
    assert_eq!(loaded.negatives, [(hash(3), FAR)]);
    assert_eq!(loaded.health, [health]);
    assert_eq!(loaded.skipped, 0);
    assert_eq!(db.integrity_check().unwrap(), "ok");
}

#[test]
fn upsert_replaces_and_one_state_per_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_all(
        &path,
        100,
        vec![
            route(hash(1), entry("https://a", FAR, 10)),
            route(hash(1), entry("https://b", FAR, 20)),
            route(hash(2), entry("https://a", FAR, 10)),
            negative(hash(2), FAR),
            negative(hash(3), FAR),
            route(hash(3), entry("https://c", FAR, 30)),
            route(hash(4), entry("https://c", FAR, 30)),
            remove(hash(4)),
        ],
    );
    let (loaded, db) = open_and_load(&path, 100).unwrap();
    let mut routes = loaded.routes;
    routes.sort_by_key(|(h, _)| *h);
    let got: Vec<_> = routes.iter().map(|(h, e)| (*h, &*e.upstream)).collect();
    assert_eq!(got, [(hash(1), "https://b"), (hash(3), "https://c")]);
    assert_eq!(loaded.negatives, [(hash(2), FAR)]);
    assert_eq!(db.route_count(), 2);
}

#[test]
fn evicts_the_oldest_rows_beyond_max_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let ops = (0..10)
        .map(|i| route(hash(i), entry("https://a", FAR, 100 + u64::from(i))))
        .collect();
    let w = write_all(&path, 4, ops);
    assert_eq!(w.stored_routes(), 4);
    let (loaded, db) = open_and_load(&path, 0).unwrap();
    let mut kept: Vec<_> = loaded.routes.iter().map(|(h, _)| *h).collect();
    kept.sort();
    assert_eq!(kept, [hash(6), hash(7), hash(8), hash(9)]);
    assert_eq!(db.route_count(), 4);
    assert_eq!(bodies(&db), 4, "their narinfos go with them");
}

#[test]
fn load_skips_expired_and_sweep_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_all(
        &path,
        100,
        vec![
            route(hash(1), entry("https://a", FAR, 1)),
            route(hash(2), entry("https://a", FAR + 1, 1)),
            negative(hash(3), FAR),
            negative(hash(4), FAR + 1),
        ],
    );
    // Expiry is exclusive: at `now == expires_at` the entry is dead.
    let (loaded, mut db) = open_and_load(&path, FAR).unwrap();
    let routes: Vec<_> = loaded.routes.iter().map(|(h, _)| *h).collect();
    assert_eq!(routes, [hash(2)]);
    assert_eq!(loaded.negatives, [(hash(4), FAR + 1)]);
    assert_eq!(loaded.skipped, 0, "expired rows are not 'skipped'");
    db.sweep(FAR).unwrap();
    assert_eq!(db.route_count(), 1);
    assert_eq!(bodies(&db), 1, "the expired route's narinfo goes with it");
    let negatives: i64 = db
        .conn
        .query_row("SELECT COUNT(*) FROM negative_cache", [], |r| r.get(0))
        .unwrap();
    assert_eq!(negatives, 1);
}

#[test]
fn a_route_clears_a_negative_entry_stored_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_all(
        &path,
        100,
        vec![negative(hash(5), FAR), negative(hash(6), FAR)],
    );
    // A new process: its writer only knows of these entries from the file.
    write_all(&path, 100, vec![route(hash(5), entry("https://a", FAR, 1))]);
    let (loaded, _) = open_and_load(&path, 0).unwrap();
    let routes: Vec<_> = loaded.routes.iter().map(|(h, _)| *h).collect();
    assert_eq!(routes, [hash(5)]);
    assert_eq!(loaded.negatives, [(hash(6), FAR)], "one state per hash");
}

#[test]
fn a_negative_delete_rolled_back_with_its_batch_is_done_by_the_next_one() {
    let mut db = open(":memory:").unwrap();
    db.write_batch(&[negative(hash(1), FAR)]).unwrap();
    // The batch fails after the route (and its negative DELETE) ran.
    db.conn
        .execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON upstream_health \
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
    let health = HealthRow {
        url: "https://a".into(),
        ema_latency: 1.0,
        consecutive_fails: 0,
        total_queries: 1,
    };
    let failing = [
        route(hash(1), entry("https://a", FAR, 1)),
        WriteOp::Health(health),
    ];
    assert!(db.write_batch(&failing).is_err());
    assert_eq!(db.load_negatives(0).unwrap().0, [(hash(1), FAR)]);
    db.conn.execute_batch("DROP TRIGGER fail").unwrap();
    db.write_batch(&[route(hash(1), entry("https://a", FAR, 1))])
        .unwrap();
    assert_eq!(db.load_negatives(0).unwrap().0, []);
    assert_eq!(db.route_count(), 1);
}

#[test]
fn flush_and_shutdown_do_not_wait_for_the_linger() {
    let (_, db) = open_and_load(":memory:", 0).unwrap();
    let linger = Duration::from_secs(120);
    let (w, join) = spawn_writer(db, WriterConfig { linger, ..cfg(100) });
    w.flush_blocking().unwrap(); // the startup sweep
    let t = Instant::now();
    assert!(w.try_write(route(hash(1), entry("https://a", FAR, 1))));
    // The writer is parked for the linger with one route gathered.
    std::thread::sleep(Duration::from_millis(50));
    w.flush_blocking().unwrap();
    assert_eq!(w.rows_written(), 1);
    assert!(w.try_write(route(hash(2), entry("https://a", FAR, 1))));
    std::thread::sleep(Duration::from_millis(50));
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    assert_eq!(w.rows_written(), 2);
    assert!(t.elapsed() < linger / 2, "{:?}", t.elapsed());
}

#[test]
fn writer_sweeps_periodically() {
    let (_, db) = open_and_load(":memory:", 0).unwrap();
    let cfg = WriterConfig {
        sweep_interval: Duration::from_millis(20),
        ..cfg(100)
    };
    let (w, join) = spawn_writer(db, cfg);
    // Expires one second from now: present after the flush, gone after a sweep.
    let soon = unix_now() + 1;
    assert!(w.try_write(route(hash(1), entry("https://a", soon, 1))));
    w.flush_blocking().unwrap();
    assert_eq!(w.stored_routes(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.stored_routes() != 0 {
        assert!(Instant::now() < deadline, "expired route never swept");
        std::thread::sleep(Duration::from_millis(20));
    }
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
}

const NCRO_2_2_ROUTES: &str = "
        CREATE TABLE routes (
            store_path TEXT PRIMARY KEY, upstream_url TEXT NOT NULL,
            latency_ms REAL NOT NULL DEFAULT 0, latency_ema REAL NOT NULL DEFAULT 0,
            query_count INTEGER NOT NULL DEFAULT 1, failure_count INTEGER NOT NULL DEFAULT 0,
            last_verified INTEGER NOT NULL DEFAULT 0, ttl INTEGER NOT NULL,
            nar_hash TEXT NOT NULL DEFAULT '', nar_size INTEGER NOT NULL DEFAULT 0,
            nar_url TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')));
        CREATE INDEX idx_routes_ttl ON routes(ttl);
        CREATE TABLE upstream_health (url TEXT PRIMARY KEY,
            ema_latency REAL NOT NULL DEFAULT 0, consecutive_fails INTEGER NOT NULL DEFAULT 0,
            total_queries INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE negative_cache (store_path TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
    ";

fn old_row(c: &Connection, h: StoreHash, ttl: u64) {
    c.execute(
        "INSERT INTO routes (store_path, upstream_url, latency_ms, last_verified, ttl, \
         nar_hash, nar_size, nar_url) VALUES (?1, 'https://old', 5.0, 7, ?2, 'sha256:x', 9, 'nar/x.nar')",
        params![h.as_str(), ttl as i64],
    )
    .unwrap();
}

/// A file written by ncro 2.2 (4 KiB pages, `routes` without
/// `narinfo_bytes`, then with it as 2.2's migration adds it): its routes
/// with a narinfo move into the log, keep their columns, and win over
/// nothing else; the rest of the file is kept; the file gets 16 KiB pages.
#[test]
fn imports_an_ncro_2_2_database_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::create_dir_all(parent_dir(&path)).unwrap();
    {
        let c = Connection::open(&path).unwrap();
        c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
            .unwrap();
        c.execute_batch(NCRO_2_2_ROUTES).unwrap();
        old_row(&c, hash(1), FAR);
        old_row(&c, hash(2), FAR);
        old_row(&c, hash(3), 10); // expired: left out
        c.execute_batch("ALTER TABLE routes ADD COLUMN narinfo_bytes BLOB")
            .unwrap();
        // hash(2) keeps no narinfo (written before 2.2 stored them): left out.
        c.execute(
            "UPDATE routes SET narinfo_bytes = x'4e' WHERE store_path = ?1",
            [hash(1).as_str()],
        )
        .unwrap();
        old_row(&c, hash(7), FAR);
        c.execute(
            "UPDATE routes SET narinfo_bytes = x'4f', last_verified = 9, upstream_url = 'https://new' \
             WHERE store_path = ?1",
            [hash(7).as_str()],
        )
        .unwrap();
        c.execute(
            "INSERT INTO negative_cache VALUES (?1, ?2)",
            params![hash(4).as_str(), FAR as i64],
        )
        .unwrap();
        c.execute(
            "INSERT INTO upstream_health VALUES ('https://old', 4.5, 1, 8)",
            [],
        )
        .unwrap();
    }
    let (loaded, db) = open_and_load(&path, 100).unwrap();
    assert!(
        columns(&db.conn, "routes").is_empty(),
        "the old table is dropped"
    );
    assert_eq!(db.route_count(), 2);
    assert_eq!(db.next_row_id(), 3);
    assert_eq!(loaded.skipped, 0);
    assert_eq!(loaded.negatives, [(hash(4), FAR)]);
    assert_eq!(loaded.health[0].url, "https://old");
    let mut routes = loaded.routes;
    routes.sort_by_key(|(h, _)| *h);
    assert_eq!(routes.len(), 2);
    let (h, e) = &routes[0];
    assert_eq!(*h, hash(1));
    assert_eq!(&*e.upstream, "https://old");
    assert_eq!(
        (&e.narinfo[..], &*e.nar_url, &*e.nar_hash, e.nar_size),
        (&b"N"[..], "nar/x.nar", "sha256:x", 9)
    );
    assert_eq!((e.verified_at, e.expires_at, e.latency_ms), (7, FAR, 5.0));
    assert_eq!(
        (routes[1].0, &*routes[1].1.upstream),
        (hash(7), "https://new")
    );
    // Ids follow the verification order: the most recently verified last.
    let mut ids = Vec::new();
    db.load_routes(100, 10, &mut |h, r| {
        ids.push((h, r.id));
        true
    })
    .unwrap();
    assert_eq!(ids, [(hash(7), 2), (hash(1), 1)]);
    let page: i64 = db
        .conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(page, 16384, "rewritten with larger pages");
    let mode: String = db
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(db.integrity_check().unwrap(), "ok");
    drop(db);
    // Opened again: nothing more to import, the same routes.
    let (again, db) = open_and_load(&path, 100).unwrap();
    assert_eq!((again.routes.len(), db.route_count()), (2, 2));
}

/// A downgrade recreates `routes` and writes to it; the next start imports
/// those routes as newer than the log's.
#[test]
fn routes_written_by_a_downgrade_are_imported_as_newest() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    write_all(&path, 100, vec![route(hash(1), entry("https://a", FAR, 1))]);
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            NCRO_2_2_ROUTES
                .replace(
                    "CREATE TABLE upstream_health",
                    "CREATE TABLE IF NOT EXISTS upstream_health",
                )
                .replace(
                    "CREATE TABLE negative_cache",
                    "CREATE TABLE IF NOT EXISTS negative_cache",
                )
                .as_str(),
        )
        .unwrap();
        c.execute_batch("ALTER TABLE routes ADD COLUMN narinfo_bytes BLOB")
            .unwrap();
        old_row(&c, hash(1), FAR);
        c.execute("UPDATE routes SET narinfo_bytes = x'4e'", [])
            .unwrap();
    }
    let (loaded, db) = open_and_load(&path, 100).unwrap();
    assert_eq!(db.route_count(), 2, "the older copy stays until swept");
    let routes: Vec<_> = loaded
        .routes
        .iter()
        .map(|(h, e)| (*h, &*e.upstream))
        .collect();
    assert_eq!(routes, [(hash(1), "https://old")]);
}

#[test]
fn memory_database_works() {
    let (loaded, db) = open_and_load(":memory:", 0).unwrap();
    assert_eq!(loaded.routes.len(), 0);
    let (w, join) = spawn_writer(db, cfg(10));
    assert!(w.try_write(route(hash(1), entry("https://a", FAR, 1))));
    w.flush_blocking().unwrap();
    assert_eq!((w.stored_routes(), w.batches_written() >= 1), (1, true));
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    // After the thread is gone, writes are refused and counted.
    assert!(!w.try_write(negative(hash(2), FAR)));
    assert_eq!(w.dropped_writes(), 1);
    assert!(matches!(
        w.flush_blocking(),
        Err(PersistError::WriterClosed)
    ));
}

#[test]
fn async_flush_works_from_a_runtime_thread() {
    let (_, db) = open_and_load(":memory:", 0).unwrap();
    let (w, join) = spawn_writer(db, cfg(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(w.try_write(route(hash(1), entry("https://a", FAR, 1))));
        w.flush().await.unwrap();
    });
    assert_eq!(w.stored_routes(), 1);
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    let closed = rt.block_on(w.flush());
    assert!(matches!(closed, Err(PersistError::WriterClosed)));
}

#[test]
fn unwritable_directory_is_a_precise_open_error() {
    // root ignores permission bits, so as root use a directory in which
    // nobody can create files; otherwise a mode 0555 directory, both
    // fresh and holding a database created before the chmod.
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let paths = if unsafe { libc::geteuid() } == 0 {
        vec!["/proc/ncro-routes.db".to_owned()]
    } else {
        use std::os::unix::fs::PermissionsExt;
        let existing = ro.join("existing.db").to_str().unwrap().to_owned();
        drop(open_and_load(&existing, 0).unwrap());
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        vec![ro.join("fresh.db").to_str().unwrap().to_owned(), existing]
    };
    for path in paths {
        let err = match open_and_load(&path, 0) {
            Err(e) => e,
            Ok(_) => panic!("opened {path} in an unwritable directory"),
        };
        assert!(matches!(err, PersistError::NotWritable { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path) && msg.contains("writable"), "{msg}");
        assert!(msg.contains(parent_dir(&path).to_str().unwrap()), "{msg}");
    }
}

#[test]
fn missing_parent_is_created_and_uncreatable_parent_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let path = file.join("routes.db");
    let err = open_and_load(path.to_str().unwrap(), 0).err().unwrap();
    assert!(matches!(err, PersistError::CreateDir { .. }), "{err:?}");
    assert!(err.to_string().contains(file.to_str().unwrap()));
}

/// `errors`: the three failed batches, plus the startup sweep when the
/// setup makes every statement fail.
#[test]
fn garbage_file_is_an_open_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    std::fs::create_dir_all(parent_dir(&path)).unwrap();
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = open_and_load(&path, 0).err().unwrap();
    assert!(matches!(err, PersistError::Sqlite { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path) && msg.contains("not a database"),
        "{msg}"
    );
}

fn write_error_case(setup: &str, errors: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (_, db) = open_and_load(&path, 0).unwrap();
    db.conn.execute_batch(setup).unwrap();
    let (w, join) = spawn_writer(db, cfg(1000));
    for i in 0..3 {
        // A big blob so the page limit is hit on the first batch.
        let mut e = (*entry("https://a", FAR, 1)).clone();
        e.narinfo = Bytes::from(vec![b'x'; 64 * 1024]);
        assert!(w.try_write(route(hash(i), Arc::new(e))));
        w.flush_blocking().unwrap();
    }
    assert_eq!(w.write_errors(), errors, "{setup}");
    assert_eq!(w.stored_routes(), 0);
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
}

#[test]
fn write_errors_are_counted_and_writer_keeps_going() {
    write_error_case("PRAGMA query_only = ON", 4);
    // A page cap is SQLite's own way to produce "database or disk is full".
    let (_, db) = open_and_load(":memory:", 0).unwrap();
    let pages: i64 = db
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    write_error_case(&format!("PRAGMA max_page_count = {pages}"), 3);
}

#[test]
fn degraded_while_writes_fail_and_cleared_by_the_next_commit() {
    let (_, db) = open_and_load(":memory:", 0).unwrap();
    let pages: i64 = db
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    // No page may be added: a 64 KiB narinfo cannot be stored, a small
    // row still fits in the existing leaf pages.
    db.conn
        .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
        .unwrap();
    let (w, join) = spawn_writer(db, cfg(1000));
    assert!(!w.is_degraded());
    let mut big = (*entry("https://a", FAR, 1)).clone();
    big.narinfo = Bytes::from(vec![b'x'; 64 * 1024]);
    assert!(w.try_write(route(hash(1), Arc::new(big))));
    w.flush_blocking().unwrap();
    assert!(w.is_degraded(), "a failed batch degrades");
    assert_eq!(w.stored_routes(), 0);
    assert!(w.try_write(route(hash(2), entry("https://a", FAR, 1))));
    w.flush_blocking().unwrap();
    assert_eq!(w.stored_routes(), 1, "new writes commit past the held one");
    assert!(w.is_degraded(), "the 64 KiB route is still held back");
    // A newer write for the same path replaces the held-back one.
    assert!(w.try_write(route(hash(1), entry("https://a", FAR, 1))));
    w.flush_blocking().unwrap();
    assert!(
        !w.is_degraded(),
        "a commit with nothing held back clears it"
    );
    assert_eq!(w.stored_routes(), 2);
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
}

#[test]
fn writes_that_failed_on_a_lock_are_stored_once_it_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (_, db) = open_and_load(&path, 0).unwrap();
    db.conn.busy_timeout(Duration::from_millis(20)).unwrap();
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (w, join) = spawn_writer(db, cfg(1000));
    for i in 0..3 {
        assert!(w.try_write(route(hash(i), entry("https://a", FAR, 1))));
    }
    assert!(w.try_write(remove(hash(2))));
    w.flush_blocking().unwrap();
    assert!(w.is_degraded(), "the lock makes the batch fail");
    assert_eq!(w.stored_routes(), 0);
    other.execute_batch("COMMIT").unwrap();
    // Nothing new arrives: the writer retries by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.is_degraded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!w.is_degraded(), "held-back writes never committed");
    assert_eq!(w.stored_routes(), 2, "routes 0 and 1; 2 was removed after");
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    let (routes, _) = open_and_load(&path, 0).unwrap();
    let mut hashes: Vec<_> = routes.routes.iter().map(|r| r.0).collect();
    hashes.sort();
    assert_eq!(hashes, [hash(0), hash(1)]);
}

/// A write held back while the database fails, then replaced by a newer
/// one for the same path, still gets the older row it replaced deleted.
#[test]
fn a_held_write_replaced_by_a_newer_one_passes_on_its_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (_, db) = open_and_load(&path, 0).unwrap();
    db.conn.busy_timeout(Duration::from_millis(20)).unwrap();
    let (w, join) = spawn_writer(db, cfg(1000));
    assert!(w.try_write(route(hash(1), entry("https://a", FAR, 1))));
    w.flush_blocking().unwrap();
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Replaces the first row; fails on the lock and is held back.
    assert!(w.try_write(route(hash(1), entry("https://b", FAR, 2))));
    w.flush_blocking().unwrap();
    assert!(w.is_degraded());
    // Replaces the held one (whose row was never written).
    assert!(w.try_write(route(hash(1), entry("https://c", FAR, 3))));
    w.flush_blocking().unwrap();
    other.execute_batch("COMMIT").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.is_degraded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!w.is_degraded(), "held-back writes never committed");
    assert_eq!(w.stored_routes(), 1, "the first row was deleted too");
    w.shutdown_blocking().unwrap();
    join.join().unwrap();
    let (loaded, _) = open_and_load(&path, 0).unwrap();
    assert_eq!(loaded.routes.len(), 1);
    assert_eq!(&*loaded.routes[0].1.upstream, "https://c");
}

#[test]
fn error_kinds_are_distinct_bits() {
    let e = |code| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error {
                code,
                extended_code: 0,
            },
            None,
        )
    };
    let kinds = [
        ErrorCode::DiskFull,
        ErrorCode::ReadOnly,
        ErrorCode::CannotOpen,
        ErrorCode::DatabaseBusy,
        ErrorCode::SystemIoFailure,
        ErrorCode::DatabaseCorrupt,
        ErrorCode::InternalMalfunction,
    ];
    let bits: Vec<u32> = kinds.iter().map(|&c| error_kind(&e(c)).0).collect();
    assert_eq!(bits.iter().fold(0, |acc, b| acc | b).count_ones(), 7);
}

/// The ops of a busy batch: 150 new routes (distinct narinfos), with a
/// route that replaces an earlier one of the same batch, a negative entry
/// and the route that clears it among them. Explicit row ids, so that two
/// databases get the same ops.
fn busy_batch() -> Vec<WriteOp> {
    let new = |i: u32, id: u64, replaces: Option<u64>| {
        let mut e = (*entry(&format!("https://u{}", i % 3), FAR, u64::from(i))).clone();
        e.narinfo = Bytes::from(format!("StorePath: /nix/store/{i}\nURL: nar/{i}.nar\n"));
        e.nar_url = format!("nar/{i}.nar").into();
        WriteOp::Route(hash(i), RouteRow::of(&e), RowIds { id, replaces })
    };
    let mut ops: Vec<WriteOp> = (0..70).map(|i| new(i, u64::from(i) + 1, None)).collect();
    ops.push(new(3, 71, Some(4))); // hash 3's route (row 4) replaced
    ops.extend((71..100).map(|i| new(i, u64::from(i) + 1, None)));
    ops.push(WriteOp::Negative(hash(500), FAR, None));
    ops.push(new(500, 500, None)); // clears that negative entry
    ops.extend((100..150).map(|i| new(i, u64::from(i) + 1, None)));
    ops
}

/// Every row of the route and negative tables, in order.
fn dump(db: &Db) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT id, hash, upstream, nar_url, expires_at, verified_at FROM route_log ORDER BY id",
        "SELECT id, latency_ms, nar_hash, nar_size, hex(narinfo) FROM route_body ORDER BY id",
        "SELECT store_path, expires_at FROM negative_cache ORDER BY store_path",
    ] {
        let mut stmt = db.conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let cols: Vec<String> = (0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect();
                Ok(cols.join("|"))
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
        out.push("--".into());
    }
    out
}

#[test]
fn new_routes_written_many_to_a_statement_match_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let open_db = |name: &str| open(dir.path().join(name).to_str().unwrap()).unwrap();
    // One batch: the runs of new routes go 64 to a statement.
    let mut many = open_db("many.db");
    assert_eq!(many.write_batch(&busy_batch()).unwrap(), 152);
    // One op per batch: every route through the one-row statements.
    let mut one = open_db("one.db");
    for op in busy_batch() {
        one.write_batch(std::slice::from_ref(&op)).unwrap();
    }
    let rows = dump(&one);
    assert_eq!(rows.len(), 150 + 1 + 150 + 1 + 1, "{rows:?}");
    assert_eq!(dump(&many), rows);
    assert_eq!((many.route_count(), one.route_count()), (150, 150));
    // The same batch again (a write retried after it committed): rows
    // already there are left as they are, none is added.
    assert_eq!(many.write_batch(&busy_batch()).unwrap(), 152);
    assert_eq!(dump(&many), rows);
    assert_eq!(many.route_count(), 150);
    assert_eq!(many.integrity_check().unwrap(), "ok");
}

#[test]
fn a_body_without_its_log_row_is_replaced_by_the_new_route_of_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let open_db = |name: &str| {
        let db = open(dir.path().join(name).to_str().unwrap()).unwrap();
        // Row 5's body, its log row gone (a hand-edited file, say).
        db.conn
            .execute(
                "INSERT INTO route_body (id, latency_ms, nar_hash, nar_size, narinfo) \
                 VALUES (5, 1.0, 'sha256:old', 1, x'6f6c64')",
                [],
            )
            .unwrap();
        db
    };
    let mut many = open_db("many.db");
    assert_eq!(many.write_batch(&busy_batch()).unwrap(), 152);
    let mut one = open_db("one.db");
    for op in busy_batch() {
        one.write_batch(std::slice::from_ref(&op)).unwrap();
    }
    assert_eq!(dump(&many), dump(&one));
    let body: Vec<u8> = many
        .conn
        .query_row("SELECT narinfo FROM route_body WHERE id = 5", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(body, b"StorePath: /nix/store/4\nURL: nar/4.nar\n");
    assert_eq!(many.integrity_check().unwrap(), "ok");
}
