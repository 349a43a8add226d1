//! Standalone measurement (issue 18): CPU of one SQLite writer thread per
//! route written, for the route schema of ncro 2.2 (a `routes` table keyed
//! by the store path text, plus its indexes) against append-only layouts
//! keyed by an id ncro allocates. rusqlite directly, the writer's pragmas
//! (WAL, synchronous=NORMAL, 32 MiB cache, checkpoint every 10,000 pages),
//! batches of BATCH rows (a 50 ms linger at ~10,000 routes/s), random
//! store hashes, 700-byte narinfos, PREFILL rows written first (not
//! measured), then ROUTES measured.
//!
//!     cargo run --example route_log_bench -- [SCHEMA...]
//!
//! Env: ROUTES (50000), PREFILL (300000), BATCH (500), REPLACE (percent of
//! measured routes that replace a live one: 0), PAGE_SIZE (4096),
//! CHECKPOINT (wal_autocheckpoint pages: 10000).

use rusqlite::{params, Connection};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Schema {
    /// Today's: ncro 2.2's table and PK autoindex, idx_routes_load, idx_routes_last_verified.
    Old,
    /// One rowid table with everything, no index.
    Log1,
    /// route_log (routing columns) + route_body (narinfo), both rowid, no index.
    Log2,
    /// Log2 plus an index on expires_at (near-monotonic keys).
    Log2Exp,
}

const OLD: &str = "
CREATE TABLE routes (
    store_path TEXT PRIMARY KEY, upstream_url TEXT NOT NULL,
    latency_ms REAL NOT NULL DEFAULT 0, latency_ema REAL NOT NULL DEFAULT 0,
    query_count INTEGER NOT NULL DEFAULT 1, failure_count INTEGER NOT NULL DEFAULT 0,
    last_verified INTEGER NOT NULL DEFAULT 0, ttl INTEGER NOT NULL,
    nar_hash TEXT NOT NULL DEFAULT '', nar_size INTEGER NOT NULL DEFAULT 0,
    nar_url TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL DEFAULT 0,
    narinfo_bytes BLOB);
CREATE INDEX idx_routes_last_verified ON routes(last_verified);
CREATE INDEX idx_routes_load ON routes
    (ttl, store_path, upstream_url, nar_url, last_verified, length(narinfo_bytes));";

const LOG1: &str = "CREATE TABLE route_log (id INTEGER PRIMARY KEY, hash BLOB NOT NULL,
    upstream TEXT NOT NULL, nar_url TEXT NOT NULL, expires_at INTEGER NOT NULL,
    verified_at INTEGER NOT NULL, latency_ms REAL NOT NULL, nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL, narinfo BLOB NOT NULL);";

const LOG2: &str = "CREATE TABLE route_log (id INTEGER PRIMARY KEY, hash BLOB NOT NULL,
    upstream TEXT NOT NULL, nar_url TEXT NOT NULL, expires_at INTEGER NOT NULL,
    verified_at INTEGER NOT NULL);
CREATE TABLE route_body (id INTEGER PRIMARY KEY, latency_ms REAL NOT NULL,
    nar_hash TEXT NOT NULL, nar_size INTEGER NOT NULL, narinfo BLOB NOT NULL);";

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// xorshift64*: deterministic random bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn hash20(&mut self) -> [u8; 20] {
        let mut h = [0u8; 20];
        for c in h.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
        h
    }
}

const B32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn text32(h: &[u8; 20]) -> String {
    (0..32)
        .map(|i| {
            let bit = i * 5;
            let v = (u32::from(h[bit / 8]) << 8 | u32::from(*h.get(bit / 8 + 1).unwrap_or(&0)))
                >> (11 - bit % 8)
                & 31;
            B32[v as usize] as char
        })
        .collect()
}

struct Route {
    hash: [u8; 20],
    upstream: &'static str,
    nar_url: String,
    nar_hash: String,
    expires_at: i64,
    narinfo: Vec<u8>,
}

fn route(rng: &mut Rng, i: u64) -> Route {
    let hash = rng.hash20();
    let t = text32(&hash);
    let nar = format!("{t}{t}");
    let mut narinfo = format!(
        "StorePath: /nix/store/{t}-some-package-1.2.3\nURL: nar/{nar}.nar.xz\n\
         Compression: xz\nFileHash: sha256:{nar}\nFileSize: 123456\nNarHash: sha256:{nar}\n\
         NarSize: 654321\nReferences: "
    )
    .into_bytes();
    narinfo.resize(680, b'x');
    narinfo.extend_from_slice(b"\nSig: cache:abcdef\n");
    Route {
        hash,
        upstream: ["https://c0", "https://c1", "https://c2", "https://c3"][i as usize % 4],
        nar_url: format!("nar/{nar}.nar.xz"),
        nar_hash: format!("sha256:{nar}"),
        expires_at: 2_000_000_000 + (i / 10_000) as i64,
        narinfo,
    }
}

fn write(c: &Connection, s: Schema, id: i64, old: Option<i64>, r: &Route) -> rusqlite::Result<()> {
    match s {
        Schema::Old => {
            let t = text32(&r.hash);
            let n = c
                .prepare_cached(
                    "INSERT INTO routes (store_path, upstream_url, latency_ms, latency_ema, \
                     query_count, failure_count, last_verified, ttl, nar_hash, nar_size, nar_url, \
                     narinfo_bytes, created_at) VALUES (?1, ?2, ?3, ?3, 1, 0, ?4, ?5, ?6, ?7, ?8, \
                     ?9, ?10) ON CONFLICT(store_path) DO NOTHING",
                )?
                .execute(params![
                    t,
                    r.upstream,
                    12.5f64,
                    1_700_000_000i64,
                    r.expires_at,
                    r.nar_hash,
                    654321i64,
                    r.nar_url,
                    r.narinfo,
                    1_700_000_000i64
                ])?;
            assert_eq!(n, 1);
        }
        Schema::Log1 => {
            if let Some(o) = old {
                c.prepare_cached("DELETE FROM route_log WHERE id = ?1")?
                    .execute([o])?;
            }
            c.prepare_cached(
                "INSERT INTO route_log (id, hash, upstream, nar_url, expires_at, verified_at, \
                 latency_ms, nar_hash, nar_size, narinfo) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            )?
            .execute(params![
                id,
                &r.hash[..],
                r.upstream,
                r.nar_url,
                r.expires_at,
                1_700_000_000i64,
                12.5f64,
                r.nar_hash,
                654321i64,
                r.narinfo
            ])?;
        }
        Schema::Log2 | Schema::Log2Exp => {
            if let Some(o) = old {
                c.prepare_cached("DELETE FROM route_log WHERE id = ?1")?
                    .execute([o])?;
                c.prepare_cached("DELETE FROM route_body WHERE id = ?1")?
                    .execute([o])?;
            }
            c.prepare_cached(
                "INSERT INTO route_log (id, hash, upstream, nar_url, expires_at, verified_at) \
                 VALUES (?1,?2,?3,?4,?5,?6)",
            )?
            .execute(params![
                id,
                &r.hash[..],
                r.upstream,
                r.nar_url,
                r.expires_at,
                1_700_000_000i64
            ])?;
            c.prepare_cached(
                "INSERT INTO route_body (id, latency_ms, nar_hash, nar_size, narinfo) \
                 VALUES (?1,?2,?3,?4,?5)",
            )?
            .execute(params![id, 12.5f64, r.nar_hash, 654321i64, r.narinfo])?;
        }
    }
    Ok(())
}

fn run(s: Schema, routes: u64, prefill: u64, batch: u64, replace: u64) -> f64 {
    let dir = std::env::temp_dir().join(format!("route-log-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{s:?}.db"));
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    let c = Connection::open(&path).unwrap();
    let page = std::env::var("PAGE_SIZE").unwrap_or_else(|_| "4096".into());
    let ckpt = std::env::var("CHECKPOINT").unwrap_or_else(|_| "10000".into());
    c.execute_batch(&format!(
        "PRAGMA page_size={page}; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-32768; \
         PRAGMA wal_autocheckpoint={ckpt};"
    ))
    .unwrap();
    c.execute_batch(match s {
        Schema::Old => OLD,
        Schema::Log1 => LOG1,
        Schema::Log2 => LOG2,
        Schema::Log2Exp => LOG2,
    })
    .unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    if s == Schema::Log2Exp {
        c.execute_batch("CREATE INDEX route_log_exp ON route_log(expires_at)")
            .unwrap();
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut id = 1i64;
    let mut cpu = 0u64;
    let total = prefill + routes;
    let mut i = 0;
    while i < total {
        let rows: Vec<Route> = (i..(i + batch).min(total))
            .map(|j| route(&mut rng, j))
            .collect();
        let measured = i >= prefill;
        let t0 = thread_cpu_ns();
        c.execute_batch("BEGIN").unwrap();
        for r in &rows {
            // A replacement deletes the row of a random live route.
            let old = (measured && replace > 0 && rng.next() % 100 < replace)
                .then(|| 1 + (rng.next() % (id as u64 - 1)) as i64);
            write(&c, s, id, old, r).unwrap();
            id += 1;
        }
        c.execute_batch("COMMIT").unwrap();
        if measured {
            cpu += thread_cpu_ns() - t0;
        }
        i += rows.len() as u64;
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    cpu as f64 / 1e3 / routes as f64
}

fn main() {
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |v| v.parse().unwrap());
    let routes = env("ROUTES", 50_000);
    let prefill = env("PREFILL", 300_000);
    let batch = env("BATCH", 500);
    let replace = env("REPLACE", 0);
    let mut schemas: Vec<Schema> = std::env::args()
        .skip(1)
        .map(|a| match a.as_str() {
            "old" => Schema::Old,
            "log1" => Schema::Log1,
            "log2" => Schema::Log2,
            "log2exp" => Schema::Log2Exp,
            _ => panic!("schema: old, log1, log2, log2exp"),
        })
        .collect();
    if schemas.is_empty() {
        schemas = vec![Schema::Old, Schema::Log1, Schema::Log2, Schema::Log2Exp];
    }
    for s in schemas {
        let us = run(s, routes, prefill, batch, replace);
        println!(
            "{s:?}: {us:.2} us CPU per route ({routes} routes, {prefill} before, batches of \
             {batch}, {replace}% replacing)"
        );
    }
}
