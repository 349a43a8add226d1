//! The route database itself: schema (ncro 2.2's), opening and migrating
//! the file, reading it back, and the SQL of each write. Only
//! `writer`'s thread writes through it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode, Row};

use super::{unix_now, HealthRow, PersistError, WriteOp};
use crate::proto::store_path::StoreHash;
use crate::route::RouteEntry;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache of the writer's connection (see [`Db::tune_for_writes`]).
pub(super) const WRITER_CACHE_KIB: u32 = 32 * 1024;
/// WAL pages (4 KiB each) after which a commit checkpoints (SQLite: 1000).
pub(super) const WAL_CHECKPOINT_PAGES: u32 = 10_000;

/// Every live row in full, as [`open_and_load`] reads it back: for tests and
/// tools. The server does not hold this; it streams the routing columns
/// into the route table ([`Db::load_routes`]) and leaves bodies on disk.
#[derive(Debug, Default)]
pub struct Loaded {
    pub routes: Vec<(StoreHash, Arc<RouteEntry>)>,
    /// Unexpired negative entries: hash and absolute expiry (unix seconds).
    pub negatives: Vec<(StoreHash, u64)>,
    pub health: Vec<HealthRow>,
    /// Unexpired rows that cannot be served from memory: written by ncro 2.2
    /// without `narinfo_bytes`, or malformed.
    pub skipped: usize,
}

/// Routes read back in full, with their hashes.
pub type FullRoutes = Vec<(StoreHash, Arc<RouteEntry>)>;

/// The routing columns of one stored route, borrowed from the row.
#[derive(Debug, Clone, Copy)]
pub struct StoredRoute<'a> {
    pub upstream: &'a str,
    /// As stored: the narinfo `URL` field, leading '/' stripped.
    pub nar_url: &'a str,
    pub expires_at: u64,
}

/// An open database. Move it to the writer with [`spawn_writer`](super::spawn_writer).
pub struct Db {
    pub(super) conn: Connection,
    pub(super) path: String,
    /// Exact row count of `routes`, kept in step with every statement so the
    /// cap check never needs a `COUNT(*)` over a million rows.
    pub(super) route_count: u64,
    /// Every store hash that may have a `negative_cache` row (a superset:
    /// rows the sweep deleted stay here until the next sweep reloads it).
    /// A route written for a hash not in here skips the `DELETE` from
    /// `negative_cache`, which cost ~10 % of the writer's CPU per route.
    pub(super) negatives: HashSet<StoreHash>,
}

/// Opens (creating or migrating as needed) the database at `path`.
pub fn open(path: &str) -> Result<Db, PersistError> {
    Db::open(path)
}

/// Opens the database at `path` and reads every unexpired row in full.
pub fn open_and_load(path: &str, now: u64) -> Result<(Loaded, Db), PersistError> {
    let db = Db::open(path)?;
    let (routes, skipped) = db.read_routes(now).map_err(|e| db.err("load", e))?;
    let (negatives, bad) = db.load_negatives(now)?;
    let loaded = Loaded {
        routes,
        negatives,
        health: db.load_health()?,
        skipped: skipped + bad,
    };
    Ok((loaded, db))
}

/// Covers the startup scan: every column [`Db::load_routes`] reads, so the
/// scan walks this index (about 150 bytes a row) instead of the table,
/// whose rows carry the narinfo (500-800 bytes). Measured on 1M routes:
/// 0.14 s of CPU against 1.5 s. An extra index is invisible to ncro 2.2,
/// which keeps it up to date like any other when it writes the file.
const LOAD_INDEX: &str = "CREATE INDEX IF NOT EXISTS idx_routes_load ON routes \
    (ttl, store_path, upstream_url, nar_url, last_verified, length(narinfo_bytes))";

/// ncro 2.2's indexes that ncro 3 never reads, dropped because every route
/// written paid for them (a B-tree insert each, ~1 KB of WAL per batch):
/// `idx_routes_ttl` is the leading column of `idx_routes_load`, which the
/// sweep uses instead, and nothing looks routes up by NAR URL. ncro 2.2
/// creates both again (`IF NOT EXISTS`) if it opens the file.
const DROP_INDEXES: &str = "DROP INDEX IF EXISTS idx_routes_ttl; \
    DROP INDEX IF EXISTS idx_routes_nar_url;";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS routes (
    store_path TEXT PRIMARY KEY,
    upstream_url TEXT NOT NULL,
    latency_ms REAL NOT NULL DEFAULT 0,
    latency_ema REAL NOT NULL DEFAULT 0,
    query_count INTEGER NOT NULL DEFAULT 1,
    failure_count INTEGER NOT NULL DEFAULT 0,
    last_verified INTEGER NOT NULL DEFAULT 0,
    ttl INTEGER NOT NULL,
    nar_hash TEXT NOT NULL DEFAULT '',
    nar_size INTEGER NOT NULL DEFAULT 0,
    nar_url TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE INDEX IF NOT EXISTS idx_routes_last_verified ON routes(last_verified);
CREATE TABLE IF NOT EXISTS upstream_health (
    url TEXT PRIMARY KEY,
    ema_latency REAL NOT NULL DEFAULT 0,
    consecutive_fails INTEGER NOT NULL DEFAULT 0,
    total_queries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS negative_cache (
    store_path TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_negative_expires ON negative_cache(expires_at);
";

impl Db {
    fn open(path: &str) -> Result<Self, PersistError> {
        let dir = parent_dir(path);
        if path != ":memory:" {
            std::fs::create_dir_all(&dir).map_err(|source| PersistError::CreateDir {
                dir: dir.clone(),
                source,
            })?;
        }
        let mut db = Db {
            conn: Connection::open(path).map_err(|e| open_err(path, &dir, "open", e))?,
            path: path.to_owned(),
            route_count: 0,
            negatives: HashSet::new(),
        };
        let mode = db
            .init()
            .map_err(|(step, e)| open_err(path, &dir, step, e))?;
        // `:memory:` answers "memory"; anything else but "wal" would mean
        // other durability than the module documents.
        if !mode.eq_ignore_ascii_case("wal") && path != ":memory:" {
            let path = path.to_owned();
            return Err(PersistError::NotWal { path, mode });
        }
        Ok(db)
    }

    /// Pragmas, schema and migration; returns the journal mode in effect.
    fn init(&mut self) -> Result<String, (&'static str, rusqlite::Error)> {
        let c = &self.conn;
        c.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| ("busy_timeout", e))?;
        let mode: String = c
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| ("journal_mode", e))?;
        c.execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(|e| ("synchronous", e))?;
        c.execute_batch(SCHEMA).map_err(|e| ("create schema", e))?;
        // ncro 2.2 added this column by the same "add if missing" migration.
        if !has_column(c, "routes", "narinfo_bytes").map_err(|e| ("inspect schema", e))? {
            c.execute_batch("ALTER TABLE routes ADD COLUMN narinfo_bytes BLOB")
                .map_err(|e| ("add narinfo_bytes", e))?;
        }
        // After the migration: the index covers narinfo_bytes' length. Built
        // once on a file from ncro 2.2 (about 4 s per million rows).
        c.execute_batch(LOAD_INDEX)
            .map_err(|e| ("create load index", e))?;
        c.execute_batch(DROP_INDEXES)
            .map_err(|e| ("drop unused indexes", e))?;
        self.route_count = c
            .query_row("SELECT COUNT(*) FROM routes", [], |r| r.get::<_, i64>(0))
            .map_err(|e| ("count routes", e))? as u64;
        self.reload_negatives()
            .map_err(|e| ("read negative entries", e))?;
        Ok(mode)
    }

    /// Refills [`Db::negatives`] from the table (a few thousand rows at most
    /// under a normal load: entries live for `negative_ttl`).
    fn reload_negatives(&mut self) -> rusqlite::Result<()> {
        let mut set = HashSet::new();
        let mut stmt = self.conn.prepare("SELECT store_path FROM negative_cache")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            // A row that is not a valid hash can never match one we delete.
            if let Some(h) = text(row, 0).and_then(|s| StoreHash::parse(s.as_bytes())) {
                set.insert(h);
            }
        }
        drop(rows);
        drop(stmt);
        self.negatives = set;
        Ok(())
    }

    /// Settings for the writer's connection, applied when its thread starts
    /// (after the startup load, which reads every row once and has no use
    /// for a big cache).
    ///
    /// Store hashes are random, so each new route lands on a random leaf of
    /// the `store_path` index: with the default 2 MB cache, most of those
    /// pages are read back from the OS first, and each commit rewrites every
    /// page it touched. A cache that holds the index of a million routes
    /// (~40 MB) saves the reads, and checkpointing every ~40 MB of WAL
    /// instead of every 4 MB lets a page touched by several batches be
    /// copied into the database file once. Measured in docs/benchmarks.md
    /// ("Route writer CPU per route written").
    pub(super) fn tune_for_writes(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch(&format!(
            "PRAGMA cache_size = -{WRITER_CACHE_KIB}; \
             PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES};"
        ))
    }

    fn err(&self, step: &'static str, source: rusqlite::Error) -> PersistError {
        PersistError::Sqlite {
            path: self.path.clone(),
            step,
            source,
        }
    }

    /// Result of `PRAGMA integrity_check` ("ok" when the file is sound).
    pub fn integrity_check(&self) -> Result<String, PersistError> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err("integrity_check", e))
    }

    /// Rows in `routes`, expired ones included.
    pub fn route_count(&self) -> u64 {
        self.route_count
    }

    /// Streams the routing columns of every unexpired route with a stored
    /// narinfo into `sink` until it has accepted `limit` of them (the most
    /// recently verified first when there are more rows than that). Returns
    /// how many unexpired rows were skipped: no narinfo stored, or malformed.
    pub fn load_routes(
        &self,
        now: u64,
        limit: usize,
        sink: &mut dyn FnMut(StoreHash, StoredRoute<'_>) -> bool,
    ) -> Result<usize, PersistError> {
        self.scan_routes(now, limit, sink)
            .map_err(|e| self.err("load routes", e))
    }

    fn scan_routes(
        &self,
        now: u64,
        limit: usize,
        sink: &mut dyn FnMut(StoreHash, StoredRoute<'_>) -> bool,
    ) -> rusqlite::Result<usize> {
        // Ordering costs a sort of every row, so only when some must be left out.
        let order = if self.route_count > limit as u64 {
            "ORDER BY last_verified DESC"
        } else {
            ""
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT store_path, upstream_url, nar_url, ttl, length(narinfo_bytes) \
             FROM routes INDEXED BY idx_routes_load WHERE ttl > ?1 {order}"
        ))?;
        let mut rows = stmt.query([to_i64(now)])?;
        let (mut loaded, mut skipped) = (0usize, 0usize);
        while let Some(row) = rows.next()? {
            let route = (|| {
                let hash = StoreHash::parse(text(row, 0)?.as_bytes())?;
                let stored = StoredRoute {
                    upstream: text(row, 1)?,
                    nar_url: text(row, 2)?,
                    expires_at: int(row, 3)?,
                };
                (int(row, 4)? > 0).then_some((hash, stored))
            })();
            match route {
                Some(_) if loaded >= limit => break,
                Some((hash, stored)) => loaded += usize::from(sink(hash, stored)),
                None => skipped += 1,
            }
        }
        Ok(skipped)
    }

    /// Every unexpired route in full (narinfo included), and the number of
    /// unexpired rows skipped. Reads the whole table: tests and tools only.
    pub fn read_routes(&self, now: u64) -> rusqlite::Result<(FullRoutes, usize)> {
        let mut stmt = self.conn.prepare(
            "SELECT store_path, upstream_url, latency_ms, last_verified, ttl, \
             nar_hash, nar_size, nar_url, narinfo_bytes FROM routes WHERE ttl > ?1",
        )?;
        // Every route names one of a handful of upstreams: share one Arc each.
        let mut upstreams: HashSet<Arc<str>> = HashSet::new();
        let mut rows = stmt.query([to_i64(now)])?;
        let (mut out, mut skipped) = (Vec::new(), 0);
        while let Some(row) = rows.next()? {
            match decode_route(row, &mut upstreams) {
                Some(route) => out.push(route),
                None => skipped += 1,
            }
        }
        Ok((out, skipped))
    }

    /// Unexpired negative entries, and the number of malformed rows.
    pub fn load_negatives(&self, now: u64) -> Result<(Vec<(StoreHash, u64)>, usize), PersistError> {
        let run = || -> rusqlite::Result<_> {
            let mut stmt = self.conn.prepare(
                "SELECT store_path, expires_at FROM negative_cache WHERE expires_at > ?1",
            )?;
            let mut rows = stmt.query([to_i64(now)])?;
            let (mut out, mut bad) = (Vec::new(), 0);
            while let Some(row) = rows.next()? {
                let hash = text(row, 0).and_then(|s| StoreHash::parse(s.as_bytes()));
                match (hash, int(row, 1)) {
                    (Some(h), Some(exp)) => out.push((h, exp)),
                    _ => bad += 1,
                }
            }
            Ok((out, bad))
        };
        run().map_err(|e| self.err("load negatives", e))
    }

    /// Every `upstream_health` row.
    pub fn load_health(&self) -> Result<Vec<HealthRow>, PersistError> {
        let run = || -> rusqlite::Result<_> {
            let mut stmt = self.conn.prepare(
                "SELECT url, ema_latency, consecutive_fails, total_queries FROM upstream_health",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(HealthRow {
                    url: r.get(0)?,
                    ema_latency: r.get(1)?,
                    consecutive_fails: r.get::<_, i64>(2)?.clamp(0, u32::MAX as i64) as u32,
                    total_queries: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        };
        run().map_err(|e| self.err("load health", e))
    }

    /// Applies one batch in a single transaction. `route_count` only moves
    /// when the commit succeeds.
    pub(super) fn write_batch(&mut self, ops: &[WriteOp]) -> rusqlite::Result<u64> {
        let now = to_i64(unix_now());
        let tx = self.conn.transaction()?;
        let mut delta: i64 = 0;
        let mut rows = 0;
        // Negative rows deleted by this batch: forgotten only once it commits.
        let mut cleared = Vec::new();
        {
            let mut b = Batch {
                tx: &tx,
                now,
                negatives: &mut self.negatives,
                cleared: &mut cleared,
                insert: None,
            };
            for op in ops {
                delta += b.apply(op)?;
                rows += u64::from(!matches!(op, WriteOp::Flush(_) | WriteOp::Shutdown));
            }
        }
        tx.commit()?;
        for h in cleared {
            self.negatives.remove(&h);
        }
        self.route_count = self.route_count.saturating_add_signed(delta);
        Ok(rows)
    }

    /// Deletes the least recently verified routes beyond `max_entries`.
    pub(super) fn enforce_cap(&mut self, max_entries: u64) -> rusqlite::Result<()> {
        if self.route_count <= max_entries {
            return Ok(());
        }
        let excess = to_i64(self.route_count - max_entries);
        let n = self.conn.execute(
            "DELETE FROM routes WHERE store_path IN \
             (SELECT store_path FROM routes ORDER BY last_verified ASC LIMIT ?1)",
            [excess],
        )?;
        self.route_count -= n as u64;
        Ok(())
    }

    /// Deletes expired routes and negative entries.
    pub(super) fn sweep(&mut self, now: u64) -> rusqlite::Result<()> {
        let now = to_i64(now);
        let n = self
            .conn
            .execute("DELETE FROM routes WHERE ttl <= ?1", [now])?;
        self.route_count = self.route_count.saturating_sub(n as u64);
        self.conn
            .execute("DELETE FROM negative_cache WHERE expires_at <= ?1", [now])?;
        self.reload_negatives()
    }
}

pub(super) fn parent_dir(path: &str) -> PathBuf {
    match Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn open_err(path: &str, dir: &Path, step: &'static str, source: rusqlite::Error) -> PersistError {
    match source.sqlite_error_code() {
        Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly) => PersistError::NotWritable {
            path: path.to_owned(),
            dir: dir.to_path_buf(),
            source,
        },
        _ => PersistError::Sqlite {
            path: path.to_owned(),
            step,
            source,
        },
    }
}

fn has_column(c: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut stmt = c.prepare(&format!("PRAGMA table_info({table})"))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if row.get_ref(1)?.as_str().ok() == Some(column) {
            return Ok(true);
        }
    }
    Ok(false)
}

// Tolerant column readers: a row of an odd type is skipped, never fatal.
fn text<'r>(row: &'r Row<'_>, i: usize) -> Option<&'r str> {
    row.get_ref(i).ok()?.as_str().ok()
}

fn int(row: &Row<'_>, i: usize) -> Option<u64> {
    match row.get_ref(i).ok()? {
        ValueRef::Integer(v) => Some(v.max(0) as u64),
        ValueRef::Real(v) => Some(v.max(0.0) as u64),
        _ => None,
    }
}

fn real(row: &Row<'_>, i: usize) -> Option<f64> {
    match row.get_ref(i).ok()? {
        ValueRef::Integer(v) => Some(v as f64),
        ValueRef::Real(v) => Some(v),
        _ => None,
    }
}

fn decode_route(
    row: &Row<'_>,
    upstreams: &mut HashSet<Arc<str>>,
) -> Option<(StoreHash, Arc<RouteEntry>)> {
    let hash = StoreHash::parse(text(row, 0)?.as_bytes())?;
    let narinfo = match row.get_ref(8).ok()? {
        ValueRef::Blob(b) if !b.is_empty() => b,
        _ => return None,
    };
    let url = text(row, 1)?;
    let upstream = match upstreams.get(url) {
        Some(u) => u.clone(),
        None => {
            let u: Arc<str> = Arc::from(url);
            upstreams.insert(u.clone());
            u
        }
    };
    let entry = RouteEntry {
        upstream,
        narinfo: Bytes::copy_from_slice(narinfo),
        nar_url: text(row, 7)?.into(),
        nar_hash: text(row, 5)?.into(),
        nar_size: int(row, 6)?,
        expires_at: int(row, 4)?,
        verified_at: int(row, 3)?,
        latency_ms: real(row, 2)? as f32,
    };
    Some((hash, Arc::new(entry)))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const INSERT_ROUTE: &str = "INSERT INTO routes (store_path, upstream_url, latency_ms, \
    latency_ema, query_count, failure_count, last_verified, ttl, nar_hash, nar_size, nar_url, \
    narinfo_bytes, created_at) VALUES (?1, ?2, ?3, ?3, 1, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
    ON CONFLICT(store_path) DO NOTHING";

const UPDATE_ROUTE: &str = "UPDATE routes SET upstream_url = ?2, latency_ms = ?3, \
    latency_ema = ?3, query_count = 1, failure_count = 0, last_verified = ?4, ttl = ?5, \
    nar_hash = ?6, nar_size = ?7, nar_url = ?8, narinfo_bytes = ?9 WHERE store_path = ?1";

/// One batch's transaction and what it keeps between ops.
struct Batch<'t> {
    tx: &'t rusqlite::Transaction<'t>,
    /// `created_at` of the routes it writes (unix seconds).
    now: i64,
    negatives: &'t mut HashSet<StoreHash>,
    cleared: &'t mut Vec<StoreHash>,
    /// The route INSERT, looked up in the statement cache once per batch
    /// rather than once per route (hashing the SQL text each time).
    insert: Option<rusqlite::CachedStatement<'t>>,
}

impl Batch<'_> {
    /// Runs one op; returns the change in the number of `routes` rows.
    fn apply(&mut self, op: &WriteOp) -> rusqlite::Result<i64> {
        let tx = self.tx;
        match op {
            WriteOp::Route(hash, e) => self.upsert_route(hash, e),
            WriteOp::Negative(hash, expires_at) => {
                tx.prepare_cached(
                    "INSERT INTO negative_cache (store_path, expires_at) VALUES (?1, ?2) \
                     ON CONFLICT(store_path) DO UPDATE SET expires_at = excluded.expires_at",
                )?
                .execute(params![hash.as_str(), to_i64(*expires_at)])?;
                // At once, even if the batch fails: a superset is harmless.
                self.negatives.insert(*hash);
                // One state per hash: a stale route would win over the
                // negative entry after a restart.
                delete_route(tx, hash)
            }
            WriteOp::Health(h) => {
                tx.prepare_cached(
                    "INSERT INTO upstream_health (url, ema_latency, consecutive_fails, \
                     total_queries) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(url) DO UPDATE SET \
                     ema_latency = excluded.ema_latency, \
                     consecutive_fails = excluded.consecutive_fails, \
                     total_queries = excluded.total_queries",
                )?
                .execute(params![
                    h.url,
                    h.ema_latency,
                    h.consecutive_fails,
                    to_i64(h.total_queries)
                ])?;
                Ok(0)
            }
            WriteOp::Remove(hash) => {
                self.delete_negative(hash)?;
                delete_route(tx, hash)
            }
            WriteOp::Flush(_) | WriteOp::Shutdown => Ok(0),
        }
    }

    /// INSERT unless the path is there, then UPDATE when it was: tells us
    /// exactly whether the table grew, and a new route (the common case
    /// under a miss load) costs one statement, not a failed UPDATE and an
    /// INSERT.
    fn upsert_route(&mut self, hash: &StoreHash, e: &RouteEntry) -> rusqlite::Result<i64> {
        let p = params![
            hash.as_str(),
            &*e.upstream,
            f64::from(e.latency_ms),
            to_i64(e.verified_at),
            to_i64(e.expires_at),
            &*e.nar_hash,
            to_i64(e.nar_size),
            &*e.nar_url,
            &e.narinfo[..],
            self.now,
        ];
        let insert = match &mut self.insert {
            Some(s) => s,
            None => self.insert.insert(self.tx.prepare_cached(INSERT_ROUTE)?),
        };
        let inserted = insert.execute(p)?;
        if inserted == 0 {
            // `created_at` (the last parameter) keeps its first value.
            self.tx.prepare_cached(UPDATE_ROUTE)?.execute(&p[..9])?;
        }
        self.delete_negative(hash)?;
        Ok(inserted as i64)
    }

    fn delete_negative(&mut self, hash: &StoreHash) -> rusqlite::Result<()> {
        if self.negatives.contains(hash) {
            self.tx
                .prepare_cached("DELETE FROM negative_cache WHERE store_path = ?1")?
                .execute([hash.as_str()])?;
            self.cleared.push(*hash);
        }
        Ok(())
    }
}

fn delete_route(tx: &rusqlite::Transaction<'_>, hash: &StoreHash) -> rusqlite::Result<i64> {
    let n = tx
        .prepare_cached("DELETE FROM routes WHERE store_path = ?1")?
        .execute([hash.as_str()])?;
    Ok(-(n as i64))
}
