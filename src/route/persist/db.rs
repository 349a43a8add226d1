//! The route database itself: schema, opening and migrating the file,
//! reading it back, and the transaction of each write batch (its SQL is in
//! `batch`). Only `writer`'s thread writes through it.
//!
//! Routes are an append-only log keyed by a row id that the route table
//! allocates ([`RowIds`](super::RowIds)): `route_log` holds the routing
//! columns (what the startup load reads), `route_body` the narinfo and the
//! rest, under the same id. Neither has an index on the store hash: a new
//! route appends a row to each table (no random B-tree page per route,
//! which is what made ncro 2.2's `routes` table cost ~30 µs of writer CPU
//! per route with random store hashes); a route that replaces or removes
//! another names the old row, deleted by id. The newest row of a hash wins
//! at the load.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row};

use super::batch::{to_i64, Batch, RouteInserts};
use super::migrate::{self, PAGE_SIZE};
use super::{unix_now, HealthRow, PersistError, WriteOp};
use crate::proto::store_path::StoreHash;
use crate::route::RouteEntry;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache of the writer's connection (see [`Db::tune_for_writes`]).
pub(super) const WRITER_CACHE_KIB: u32 = 8 * 1024;
/// WAL bytes after which a commit checkpoints (SQLite's default: 1,000
/// pages, 4 MB with 4 KiB pages).
pub(super) const WAL_CHECKPOINT_BYTES: u32 = 40 << 20;

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
    /// Its row in `route_log` and `route_body`.
    pub id: u64,
    pub upstream: &'a str,
    /// As stored: the narinfo `URL` field, leading '/' stripped.
    pub nar_url: &'a str,
    pub expires_at: u64,
}

/// An open database. Move it to the writer with [`spawn_writer`](super::spawn_writer).
pub struct Db {
    /// The route INSERTs, prepared at the first route written. Declared
    /// before `conn`: fields drop in order, so they are finalized before
    /// the connection closes (the contract of `StaticStmt::prepare`).
    inserts: Option<RouteInserts>,
    pub(super) conn: Connection,
    pub(super) path: String,
    /// Exact row count of `route_log`, kept in step with every statement so
    /// the cap check never needs a `COUNT(*)` over a million rows.
    pub(super) route_count: u64,
    /// One past the highest row id in `route_log` when the file was opened:
    /// where the route table's ids start ([`Db::next_row_id`]).
    next_row_id: u64,
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

/// Routes: an append-only log keyed by the row id the route table gives
/// each route (module docs). `hash` is the 32-character store hash.
/// `route_log` holds what the startup load reads (about 150 bytes a row),
/// so the load does not walk the narinfos in `route_body`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS route_log (
    id INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    upstream TEXT NOT NULL,
    nar_url TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    verified_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS route_body (
    id INTEGER PRIMARY KEY,
    latency_ms REAL NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    narinfo BLOB NOT NULL
);
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
            inserts: None,
            conn: Connection::open(path).map_err(|e| open_err(path, &dir, "open", e))?,
            path: path.to_owned(),
            route_count: 0,
            next_row_id: 1,
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
        // Only takes effect on a new (empty) file: before anything is written.
        c.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE}"))
            .map_err(|e| ("page_size", e))?;
        c.execute_batch(SCHEMA).map_err(|e| ("create schema", e))?;
        // A file from ncro 2.2 (or an ncro 3 before the route log): its
        // `routes` table is moved into the log once (and the file may be
        // rewritten with larger pages, out of WAL mode: hence before it).
        migrate::import_routes_table(c, &self.path, unix_now())?;
        let mode: String = c
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| ("journal_mode", e))?;
        c.execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(|e| ("synchronous", e))?;
        self.route_count = c
            .query_row("SELECT COUNT(*) FROM route_log", [], |r| r.get::<_, i64>(0))
            .map_err(|e| ("count routes", e))? as u64;
        let max: Option<i64> = c
            .query_row("SELECT max(id) FROM route_log", [], |r| r.get(0))
            .map_err(|e| ("read the last row id", e))?;
        self.next_row_id = max.map_or(1, |m| m.max(0) as u64 + 1);
        self.reload_negatives()
            .map_err(|e| ("read negative entries", e))?;
        Ok(mode)
    }

    /// The first row id not used in `route_log` when the file was opened.
    /// The route table allocates the ids of new routes from here.
    pub fn next_row_id(&self) -> u64 {
        self.next_row_id
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
    /// The cache holds 8 MiB of pages (SQLite's default: 2 MB): more than
    /// the pages a batch of 4,096 routes dirties (~5 MB), so that a batch
    /// never spills pages to the WAL before its commit. Not more: new routes
    /// are appended to pages the writer never reads again, and the rows
    /// deleted by id land on random pages of a file of up to ~1 GB, which
    /// a cache of 32 MiB missed almost as often as one of 8 (the OS page
    /// cache holds them either way), while growing to 32 MiB (a `malloc`
    /// and page faults per new page) cost ~17 % of the writer's CPU for
    /// the first ~25,000 routes after a start. Checkpointing every ~40 MB
    /// of WAL instead of every 4 MB lets a page touched by several batches
    /// be copied into the database file once. Measured in
    /// docs/benchmarks.md ("Route writer CPU per route written").
    pub(super) fn tune_for_writes(&self) -> rusqlite::Result<()> {
        let page: u32 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = WAL_CHECKPOINT_BYTES / page.max(512);
        self.conn.execute_batch(&format!(
            "PRAGMA cache_size = -{WRITER_CACHE_KIB}; \
             PRAGMA wal_autocheckpoint = {pages};"
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

    /// Rows in `route_log`, expired ones and older copies included.
    pub fn route_count(&self) -> u64 {
        self.route_count
    }

    /// Streams the routing columns of every unexpired route into `sink`,
    /// newest row first, until it has accepted `limit` of them (`sink`
    /// returns false for a route it does not take: an older row of a hash
    /// it already holds, an upstream it does not know). Returns how many
    /// unexpired rows were malformed.
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
        // Newest first: the rowid B-tree walked backwards, no sort.
        let mut stmt = self.conn.prepare(
            "SELECT id, hash, upstream, nar_url, expires_at FROM route_log \
             WHERE expires_at > ?1 ORDER BY id DESC",
        )?;
        let mut rows = stmt.query([to_i64(now)])?;
        let (mut loaded, mut skipped) = (0usize, 0usize);
        while let Some(row) = rows.next()? {
            let route = (|| {
                let hash = StoreHash::parse(text(row, 1)?.as_bytes())?;
                let stored = StoredRoute {
                    id: int(row, 0)?,
                    upstream: text(row, 2)?,
                    nar_url: text(row, 3)?,
                    expires_at: int(row, 4)?,
                };
                Some((hash, stored))
            })();
            match route {
                Some(_) if loaded >= limit => break,
                Some((hash, stored)) => loaded += usize::from(sink(hash, stored)),
                None => skipped += 1,
            }
        }
        Ok(skipped)
    }

    /// Every unexpired route in full (narinfo included), the newest row of
    /// each hash, and the number of malformed unexpired rows. Reads the
    /// whole log: tests and tools only.
    pub fn read_routes(&self, now: u64) -> rusqlite::Result<(FullRoutes, usize)> {
        let mut stmt = self.conn.prepare(
            "SELECT l.hash, l.upstream, b.latency_ms, l.verified_at, l.expires_at, \
             b.nar_hash, b.nar_size, l.nar_url, b.narinfo FROM route_log l \
             JOIN route_body b ON b.id = l.id WHERE l.expires_at > ?1 ORDER BY l.id DESC",
        )?;
        // Every route names one of a handful of upstreams: share one Arc each.
        let mut upstreams: HashSet<Arc<str>> = HashSet::new();
        let mut seen = HashSet::new();
        let mut rows = stmt.query([to_i64(now)])?;
        let (mut out, mut skipped) = (Vec::new(), 0);
        while let Some(row) = rows.next()? {
            match decode_route(row, &mut upstreams) {
                Some(route) if seen.insert(route.0) => out.push(route),
                Some(_) => {}
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
        let tx = self.conn.transaction()?;
        let (delta, rows);
        // Negative rows deleted by this batch: forgotten only once it commits.
        let mut cleared = Vec::new();
        {
            let mut b = Batch {
                tx: &tx,
                negatives: &mut self.negatives,
                cleared: &mut cleared,
                inserts: &mut self.inserts,
            };
            (delta, rows) = b.run(ops)?;
        }
        tx.commit()?;
        for h in cleared {
            self.negatives.remove(&h);
        }
        self.route_count = self.route_count.saturating_add_signed(delta);
        Ok(rows)
    }

    /// Deletes the oldest rows beyond `max_entries` (ids grow with time: a
    /// route verified again is a new row).
    pub(super) fn enforce_cap(&mut self, max_entries: u64) -> rusqlite::Result<()> {
        if self.route_count <= max_entries {
            return Ok(());
        }
        let excess = to_i64(self.route_count - max_entries);
        let tx = self.conn.transaction()?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT id FROM route_log ORDER BY id LIMIT 1 OFFSET ?1",
                [excess - 1],
                |r| r.get(0),
            )
            .optional()?;
        let mut n = 0;
        if let Some(last) = last {
            n = tx.execute("DELETE FROM route_log WHERE id <= ?1", [last])?;
            tx.execute("DELETE FROM route_body WHERE id <= ?1", [last])?;
        }
        tx.commit()?;
        self.route_count = self.route_count.saturating_sub(n as u64);
        Ok(())
    }

    /// Deletes expired routes and negative entries. `route_log` has no
    /// index on the expiry (each new route would pay for one): the sweep
    /// walks its ~150-byte rows, every `sweep_interval` (5 minutes).
    pub(super) fn sweep(&mut self, now: u64) -> rusqlite::Result<()> {
        let now = to_i64(now);
        let tx = self.conn.transaction()?;
        let ids = {
            let mut stmt =
                tx.prepare("DELETE FROM route_log WHERE expires_at <= ?1 RETURNING id")?;
            let ids = stmt.query_map([now], |r| r.get::<_, i64>(0))?;
            ids.collect::<rusqlite::Result<Vec<i64>>>()?
        };
        {
            let mut body = tx.prepare("DELETE FROM route_body WHERE id = ?1")?;
            for id in &ids {
                body.execute([id])?;
            }
        }
        tx.execute("DELETE FROM negative_cache WHERE expires_at <= ?1", [now])?;
        tx.commit()?;
        self.route_count = self.route_count.saturating_sub(ids.len() as u64);
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
