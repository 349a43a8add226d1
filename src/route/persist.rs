//! COLD: the only code that touches SQLite. It runs on one dedicated std
//! thread fed by a bounded flume channel; workers never wait for it.
//!
//! The file format stays the one ncro 2.2 wrote (`routes`, `negative_cache`,
//! `upstream_health`, same columns and indexes), so an existing `routes.db`
//! is opened unchanged and ncro 2.2 can still read what we write. No
//! `user_version` is set for the same reason.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction is in
//! the WAL file before `COMMIT` returns, so killing the process (even with
//! SIGKILL) loses nothing that was committed and never corrupts the file.
//! Only an OS crash or power loss can drop the last few commits (still
//! without corruption), which is acceptable for a cache. A write is
//! acknowledged when its batch commits (counted in `rows_written`); what is
//! still queued or in the failing batch is lost on a kill or a write error.
//! docs/operations.md ("Crash safety") states the promise to operators and
//! `tests/it/crash.rs` checks it through the real binary.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode, Row};

use super::RouteEntry;
use crate::proto::store_path::StoreHash;

/// Ops queued for the writer before `try_write` starts dropping them.
/// At ~100 bytes per op this bounds the queue to a few MB.
pub const QUEUE_CAPACITY: usize = 65_536;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create directory {dir} for the route database: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "route database {path} is not writable ({source}): SQLite must be able to \
         write the file and create {path}-wal and {path}-shm in {dir}; check that \
         the directory exists and that this user may write there"
    )]
    NotWritable {
        path: String,
        dir: PathBuf,
        source: rusqlite::Error,
    },
    #[error("route database {path}: {step} failed: {source}")]
    Sqlite {
        path: String,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "route database {path}: journal_mode is {mode}, not wal (the file system \
         may not support the shared memory WAL mode needs)"
    )]
    NotWal { path: String, mode: String },
    #[error("the route database writer thread has stopped")]
    WriterClosed,
    #[error("cannot start the route database {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

/// One `upstream_health` row.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthRow {
    pub url: String,
    pub ema_latency: f64,
    pub consecutive_fails: u32,
    pub total_queries: u64,
}

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

/// An open database. Move it to the writer with [`spawn_writer`].
pub struct Db {
    conn: Connection,
    path: String,
    /// Exact row count of `routes`, kept in step with every statement so the
    /// cap check never needs a `COUNT(*)` over a million rows.
    route_count: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
CREATE INDEX IF NOT EXISTS idx_routes_ttl ON routes(ttl);
CREATE INDEX IF NOT EXISTS idx_routes_last_verified ON routes(last_verified);
CREATE INDEX IF NOT EXISTS idx_routes_nar_url ON routes(nar_url);
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
        self.route_count = c
            .query_row("SELECT COUNT(*) FROM routes", [], |r| r.get::<_, i64>(0))
            .map_err(|e| ("count routes", e))? as u64;
        Ok(mode)
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
    fn write_batch(&mut self, ops: &[WriteOp]) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
        let mut delta: i64 = 0;
        let mut rows = 0;
        for op in ops {
            delta += apply_op(&tx, op)?;
            rows += u64::from(!matches!(op, WriteOp::Flush(_) | WriteOp::Shutdown));
        }
        tx.commit()?;
        self.route_count = self.route_count.saturating_add_signed(delta);
        Ok(rows)
    }

    /// Deletes the least recently verified routes beyond `max_entries`.
    fn enforce_cap(&mut self, max_entries: u64) -> rusqlite::Result<()> {
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
    fn sweep(&mut self, now: u64) -> rusqlite::Result<()> {
        let now = to_i64(now);
        let n = self
            .conn
            .execute("DELETE FROM routes WHERE ttl <= ?1", [now])?;
        self.route_count = self.route_count.saturating_sub(n as u64);
        self.conn
            .execute("DELETE FROM negative_cache WHERE expires_at <= ?1", [now])?;
        Ok(())
    }
}

fn parent_dir(path: &str) -> PathBuf {
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

/// Runs one op inside the batch transaction; returns the change in the
/// number of `routes` rows.
fn apply_op(tx: &rusqlite::Transaction<'_>, op: &WriteOp) -> rusqlite::Result<i64> {
    match op {
        WriteOp::Route(hash, e) => upsert_route(tx, hash, e),
        WriteOp::Negative(hash, expires_at) => {
            tx.prepare_cached(
                "INSERT INTO negative_cache (store_path, expires_at) VALUES (?1, ?2) \
                 ON CONFLICT(store_path) DO UPDATE SET expires_at = excluded.expires_at",
            )?
            .execute(params![hash.as_str(), to_i64(*expires_at)])?;
            // One state per hash: a stale route would win over the negative
            // entry after a restart.
            delete_route(tx, hash)
        }
        WriteOp::Health(h) => {
            tx.prepare_cached(
                "INSERT INTO upstream_health (url, ema_latency, consecutive_fails, total_queries) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT(url) DO UPDATE SET \
                 ema_latency = excluded.ema_latency, consecutive_fails = excluded.consecutive_fails, \
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
            delete_negative(tx, hash)?;
            delete_route(tx, hash)
        }
        WriteOp::Flush(_) | WriteOp::Shutdown => Ok(0),
    }
}

/// UPDATE, then INSERT when nothing matched: same cost as an upsert, and
/// tells us exactly whether the table grew.
fn upsert_route(
    tx: &rusqlite::Transaction<'_>,
    hash: &StoreHash,
    e: &RouteEntry,
) -> rusqlite::Result<i64> {
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
    ];
    let updated = tx
        .prepare_cached(
            "UPDATE routes SET upstream_url = ?2, latency_ms = ?3, latency_ema = ?3, \
             query_count = 1, failure_count = 0, last_verified = ?4, ttl = ?5, nar_hash = ?6, \
             nar_size = ?7, nar_url = ?8, narinfo_bytes = ?9 WHERE store_path = ?1",
        )?
        .execute(p)?;
    let inserted = if updated == 0 {
        tx.prepare_cached(
            "INSERT INTO routes (store_path, upstream_url, latency_ms, latency_ema, query_count, \
             failure_count, last_verified, ttl, nar_hash, nar_size, nar_url, narinfo_bytes) \
             VALUES (?1, ?2, ?3, ?3, 1, 0, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(p)?
    } else {
        0
    };
    delete_negative(tx, hash)?;
    Ok(inserted as i64)
}

fn delete_route(tx: &rusqlite::Transaction<'_>, hash: &StoreHash) -> rusqlite::Result<i64> {
    let n = tx
        .prepare_cached("DELETE FROM routes WHERE store_path = ?1")?
        .execute([hash.as_str()])?;
    Ok(-(n as i64))
}

fn delete_negative(tx: &rusqlite::Transaction<'_>, hash: &StoreHash) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM negative_cache WHERE store_path = ?1")?
        .execute([hash.as_str()])?;
    Ok(())
}

/// A request to the writer thread.
pub enum WriteOp {
    Route(StoreHash, Arc<RouteEntry>),
    /// Hash and absolute expiry (unix seconds).
    Negative(StoreHash, u64),
    Health(HealthRow),
    /// Forget a route (and any negative entry) for this hash.
    Remove(StoreHash),
    /// Answered once every op queued before it has been committed (or has
    /// failed and been counted in `write_errors`).
    Flush(flume::Sender<()>),
    /// Commit what is queued before it and stop the thread.
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Cap on rows in `routes`; the least recently verified go first.
    pub max_entries: usize,
    /// How often expired routes and negative entries are deleted.
    pub sweep_interval: Duration,
    /// Most ops committed in one transaction.
    pub batch_max: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_entries: 1_000_000,
            sweep_interval: Duration::from_secs(300),
            batch_max: 1024,
        }
    }
}

#[derive(Default)]
struct WriterStats {
    write_errors: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    rows: AtomicU64,
    stored_routes: AtomicU64,
    /// Set while the last write transaction failed (full disk, read-only
    /// file system): routes are then served from memory only.
    degraded: AtomicBool,
}

/// Cheap to clone; every worker holds one. Only the writer thread owns the
/// receiving end: when it exits (Shutdown, or every handle dropped), sends
/// fail and are counted as dropped.
#[derive(Clone)]
pub struct WriterHandle {
    tx: flume::Sender<WriteOp>,
    stats: Arc<WriterStats>,
}

impl WriterHandle {
    /// Queues `op` without ever blocking; returns false (and counts a dropped
    /// write) when the queue is full or the writer has stopped.
    pub fn try_write(&self, op: WriteOp) -> bool {
        let ok = self.tx.try_send(op).is_ok();
        if !ok {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Waits (asynchronously, on any runtime) until everything queued before
    /// this call has been processed.
    pub async fn flush(&self) -> Result<(), PersistError> {
        let (reply, done) = flume::bounded(1);
        self.tx
            .send_async(WriteOp::Flush(reply))
            .await
            .map_err(|_| PersistError::WriterClosed)?;
        done.recv_async()
            .await
            .map_err(|_| PersistError::WriterClosed)
    }

    /// [`flush`](Self::flush) for COLD threads only: it blocks.
    pub fn flush_blocking(&self) -> Result<(), PersistError> {
        let (reply, done) = flume::bounded(1);
        self.tx
            .send(WriteOp::Flush(reply))
            .map_err(|_| PersistError::WriterClosed)?;
        done.recv().map_err(|_| PersistError::WriterClosed)
    }

    /// Asks the writer to commit what is queued and exit (blocks while the
    /// queue is full). Join its thread to wait for the exit.
    pub fn shutdown_blocking(&self) -> Result<(), PersistError> {
        self.tx
            .send(WriteOp::Shutdown)
            .map_err(|_| PersistError::WriterClosed)
    }

    /// Failed SQLite operations (batches, sweeps, evictions) so far.
    pub fn write_errors(&self) -> u64 {
        self.stats.write_errors.load(Ordering::Relaxed)
    }
    /// Ops refused because the queue was full or the writer had stopped.
    pub fn dropped_writes(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }
    pub fn batches_written(&self) -> u64 {
        self.stats.batches.load(Ordering::Relaxed)
    }
    pub fn rows_written(&self) -> u64 {
        self.stats.rows.load(Ordering::Relaxed)
    }
    /// Rows in the `routes` table after the last batch or sweep.
    pub fn stored_routes(&self) -> u64 {
        self.stats.stored_routes.load(Ordering::Relaxed)
    }
    /// True while the last write transaction failed: new routes live in
    /// memory only until a later batch commits again.
    pub fn is_degraded(&self) -> bool {
        self.stats.degraded.load(Ordering::Relaxed)
    }

    /// A handle whose ops go to the returned receiver instead of a thread.
    #[cfg(test)]
    pub(crate) fn detached(capacity: usize) -> (Self, flume::Receiver<WriteOp>) {
        let (tx, rx) = flume::bounded(capacity);
        let stats = Arc::default();
        (WriterHandle { tx, stats }, rx)
    }
}

/// Starts the writer thread that owns `db` from now on.
pub fn spawn_writer(db: Db, cfg: WriterConfig) -> (WriterHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = flume::bounded(QUEUE_CAPACITY);
    let stats = Arc::new(WriterStats::default());
    stats.stored_routes.store(db.route_count, Ordering::Relaxed);
    let writer = Writer {
        db,
        cfg,
        stats: stats.clone(),
        logged_kinds: 0,
        held: HashMap::new(),
        next_retry: Instant::now(),
        held_full_logged: false,
    };
    let join = std::thread::Builder::new()
        .name("ncro-db-writer".into())
        .spawn(move || writer.run(rx))
        .expect("spawning the database writer thread");
    (WriterHandle { tx, stats }, join)
}

/// Writes that failed for a reason that passes (full disk, read-only or
/// unreachable file system, lock, I/O error) are held back, newest per key,
/// and retried at most this often until they commit.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Most writes held back (a narinfo each, about 1 KB): past this, further
/// failed writes are dropped and live in memory only.
const MAX_HELD: usize = 16_384;

/// What a write is about: a later write with the same key replaces an
/// earlier one, so only the newest is held back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HeldKey {
    Path(StoreHash),
    Health(String),
}

fn held_key(op: &WriteOp) -> Option<HeldKey> {
    match op {
        WriteOp::Route(h, _) | WriteOp::Negative(h, _) | WriteOp::Remove(h) => {
            Some(HeldKey::Path(*h))
        }
        WriteOp::Health(row) => Some(HeldKey::Health(row.url.clone())),
        WriteOp::Flush(_) | WriteOp::Shutdown => None,
    }
}

/// Errors a later attempt can get past: every kind [`error_kind`] names
/// except corruption and the rest ("other": a malformed row would fail
/// again).
fn is_passing(e: &rusqlite::Error) -> bool {
    error_kind(e).0 & (32 | 64) == 0
}

struct Writer {
    db: Db,
    cfg: WriterConfig,
    stats: Arc<WriterStats>,
    /// Bit per error kind already logged at error level.
    logged_kinds: u32,
    /// Failed writes waiting for the database to work again (newest per key).
    held: HashMap<HeldKey, WriteOp>,
    next_retry: Instant,
    /// `MAX_HELD` was reached (logged once per failure episode).
    held_full_logged: bool,
}

impl Writer {
    fn run(mut self, rx: flume::Receiver<WriteOp>) {
        let batch_max = self.cfg.batch_max.max(1);
        let mut batch = Vec::with_capacity(batch_max);
        // ncro 2.2 also swept once at startup.
        let mut next_sweep = Instant::now();
        loop {
            let mut until = next_sweep;
            if !self.held.is_empty() {
                until = until.min(self.next_retry);
            }
            let wait = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(op) => {
                    let mut stop = matches!(op, WriteOp::Shutdown);
                    batch.push(op);
                    while !stop && batch.len() < batch_max {
                        let Ok(op) = rx.try_recv() else { break };
                        stop = matches!(op, WriteOp::Shutdown);
                        batch.push(op);
                    }
                    self.commit(&mut batch);
                    if stop {
                        self.give_up_held();
                        return;
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {
                    if !self.held.is_empty() && Instant::now() >= self.next_retry {
                        self.retry_held();
                        self.publish();
                    }
                }
                Err(flume::RecvTimeoutError::Disconnected) => {
                    self.give_up_held();
                    return;
                }
            }
            if Instant::now() >= next_sweep {
                let r = self.db.sweep(unix_now());
                self.check("sweep", r);
                let r = self.db.enforce_cap(self.cfg.max_entries as u64);
                self.check("evict", r);
                self.publish();
                next_sweep = Instant::now() + self.cfg.sweep_interval;
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<WriteOp>) {
        if !self.held.is_empty() {
            // Newer writes replace held-back ones for the same path, so the
            // two can commit in either order.
            for op in batch.iter() {
                if let Some(k) = held_key(op) {
                    self.held.remove(&k);
                }
            }
        }
        let hold = match self.db.write_batch(batch) {
            Ok(rows) => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats.rows.fetch_add(rows, Ordering::Relaxed);
                if !self.held.is_empty() {
                    self.retry_held();
                }
                self.recovered_if_clear();
                false
            }
            Err(e) => {
                self.stats.degraded.store(true, Ordering::Relaxed);
                let hold = is_passing(&e);
                self.check("write batch", Err(e));
                hold
            }
        };
        let r = self.db.enforce_cap(self.cfg.max_entries as u64);
        self.check("evict", r);
        self.publish();
        for op in batch.drain(..) {
            match op {
                WriteOp::Flush(reply) => {
                    // The flusher may have given up waiting; nothing to tell it.
                    let _ = reply.send(());
                }
                WriteOp::Shutdown => {}
                op if hold => self.hold(op),
                _ => {}
            }
        }
    }

    /// Keeps a failed write for a later attempt, newest per key.
    fn hold(&mut self, op: WriteOp) {
        let Some(k) = held_key(&op) else { return };
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&k) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if !std::mem::replace(&mut self.held_full_logged, true) {
                tracing::error!(path = %self.db.path, held = MAX_HELD,
                    "route database still failing; further routes are kept in memory only and \
                     will not be written when it recovers");
            }
            return;
        }
        if self.held.is_empty() {
            self.next_retry = Instant::now() + RETRY_EVERY;
        }
        self.held.insert(k, op);
    }

    /// One attempt to commit the held-back writes, at most every
    /// [`RETRY_EVERY`].
    fn retry_held(&mut self) {
        let now = Instant::now();
        if now < self.next_retry {
            return;
        }
        self.next_retry = now + RETRY_EVERY;
        let ops: Vec<WriteOp> = self.held.drain().map(|(_, op)| op).collect();
        match self.db.write_batch(&ops) {
            Ok(rows) => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats.rows.fetch_add(rows, Ordering::Relaxed);
                tracing::info!(path = %self.db.path, rows,
                    "route database writes held back while it failed are now stored");
                self.recovered_if_clear();
            }
            Err(e) => {
                self.stats.degraded.store(true, Ordering::Relaxed);
                let passing = is_passing(&e);
                self.check("write held-back batch", Err(e));
                if passing {
                    for op in ops {
                        if let Some(k) = held_key(&op) {
                            self.held.insert(k, op);
                        }
                    }
                }
            }
        }
    }

    /// Clears `degraded` once the last write committed and nothing is held
    /// back.
    fn recovered_if_clear(&mut self) {
        if self.held.is_empty() && self.stats.degraded.swap(false, Ordering::Relaxed) {
            // Errors of a kind are logged once; say when they stop, so the
            // log shows how long persistence was off.
            self.logged_kinds = 0;
            self.held_full_logged = false;
            tracing::warn!(path = %self.db.path,
                "route database writes succeed again; routes are persisted again");
        }
    }

    /// At exit: one last attempt, then say what is lost.
    fn give_up_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        self.next_retry = Instant::now();
        self.retry_held();
        if !self.held.is_empty() {
            tracing::error!(path = %self.db.path, lost = self.held.len(),
                "route database still failing at exit; routes held back for it are not stored");
        }
    }

    fn publish(&self) {
        self.stats
            .stored_routes
            .store(self.db.route_count, Ordering::Relaxed);
    }

    /// Counts a failure and logs it at error level once per kind, so a full
    /// disk does not flood the log while the in-memory table keeps serving.
    fn check(&mut self, what: &'static str, r: rusqlite::Result<()>) {
        let Err(e) = r else { return };
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        let (bit, kind) = error_kind(&e);
        if self.logged_kinds & bit == 0 {
            self.logged_kinds |= bit;
            tracing::error!(path = %self.db.path, what, kind, error = %e,
                "route database write failed; routes stay in memory but are not persisted \
                 (further errors of this kind are logged at debug level)");
        } else {
            tracing::debug!(what, kind, error = %e, "route database write failed");
        }
    }
}

/// A fixed set of error kinds (also usable as a metric label).
fn error_kind(e: &rusqlite::Error) -> (u32, &'static str) {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => (1, "disk_full"),
        Some(ErrorCode::ReadOnly) => (2, "read_only"),
        Some(ErrorCode::CannotOpen) => (4, "cannot_open"),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => (8, "busy"),
        Some(ErrorCode::SystemIoFailure) => (16, "io"),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => (32, "corrupt"),
        _ => (64, "other"),
    }
}

#[cfg(test)]
mod tests {
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

    fn cfg(max_entries: usize) -> WriterConfig {
        WriterConfig {
            max_entries,
            sweep_interval: Duration::from_secs(3600),
            batch_max: 64,
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

    fn columns(c: &Connection, table: &str) -> Vec<String> {
        let mut stmt = c.prepare(&format!("PRAGMA table_info({table})")).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(1)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn creates_ncro_2_2_schema_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let (loaded, db) = open_and_load(&path, 0).unwrap();
        assert!(loaded.routes.is_empty() && loaded.negatives.is_empty());
        assert_eq!(
            columns(&db.conn, "routes"),
            [
                "store_path",
                "upstream_url",
                "latency_ms",
                "latency_ema",
                "query_count",
                "failure_count",
                "last_verified",
                "ttl",
                "nar_hash",
                "nar_size",
                "nar_url",
                "created_at",
                "narinfo_bytes"
            ]
        );
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
                WriteOp::Route(hash(1), entry("https://a", FAR, 10)),
                WriteOp::Route(hash(2), entry("https://a", FAR, 11)),
                WriteOp::Negative(hash(3), FAR),
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
                WriteOp::Route(hash(1), entry("https://a", FAR, 10)),
                WriteOp::Route(hash(1), entry("https://b", FAR, 20)),
                WriteOp::Route(hash(2), entry("https://a", FAR, 10)),
                WriteOp::Negative(hash(2), FAR),
                WriteOp::Negative(hash(3), FAR),
                WriteOp::Route(hash(3), entry("https://c", FAR, 30)),
                WriteOp::Route(hash(4), entry("https://c", FAR, 30)),
                WriteOp::Remove(hash(4)),
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
    fn evicts_least_recently_verified_beyond_max_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let ops = (0..10)
            .map(|i| WriteOp::Route(hash(i), entry("https://a", FAR, 100 + u64::from(i))))
            .collect();
        let w = write_all(&path, 4, ops);
        assert_eq!(w.stored_routes(), 4);
        let (loaded, db) = open_and_load(&path, 0).unwrap();
        let mut kept: Vec<_> = loaded.routes.iter().map(|(h, _)| *h).collect();
        kept.sort();
        assert_eq!(kept, [hash(6), hash(7), hash(8), hash(9)]);
        assert_eq!(db.route_count(), 4);
    }

    #[test]
    fn load_skips_expired_and_sweep_deletes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        write_all(
            &path,
            100,
            vec![
                WriteOp::Route(hash(1), entry("https://a", FAR, 1)),
                WriteOp::Route(hash(2), entry("https://a", FAR + 1, 1)),
                WriteOp::Negative(hash(3), FAR),
                WriteOp::Negative(hash(4), FAR + 1),
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
        let negatives: i64 = db
            .conn
            .query_row("SELECT COUNT(*) FROM negative_cache", [], |r| r.get(0))
            .unwrap();
        assert_eq!(negatives, 1);
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
        assert!(w.try_write(WriteOp::Route(hash(1), entry("https://a", soon, 1))));
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

    #[test]
    fn opens_pre_migration_ncro_2_2_database_and_skips_rows_without_narinfo() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        std::fs::create_dir_all(parent_dir(&path)).unwrap();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(NCRO_2_2_ROUTES).unwrap();
            old_row(&c, hash(1), FAR);
            old_row(&c, hash(2), FAR);
            old_row(&c, hash(3), 10); // expired: neither loaded nor skipped
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
        assert!(columns(&db.conn, "routes").contains(&"narinfo_bytes".to_owned()));
        assert!(loaded.routes.is_empty());
        assert_eq!(loaded.skipped, 2);
        assert_eq!(loaded.negatives, [(hash(4), FAR)]);
        assert_eq!(loaded.health[0].url, "https://old");
        assert_eq!(db.route_count(), 3);
        // A migrated row that now has narinfo bytes is served with its old columns.
        db.conn
            .execute(
                "UPDATE routes SET narinfo_bytes = x'4e' WHERE store_path = ?1",
                [hash(1).as_str()],
            )
            .unwrap();
        drop(db);
        let (loaded, _db) = open_and_load(&path, 100).unwrap();
        assert_eq!(loaded.skipped, 1);
        let (h, e) = &loaded.routes[0];
        assert_eq!(*h, hash(1));
        assert_eq!(&*e.upstream, "https://old");
        assert_eq!(
            (&e.narinfo[..], &*e.nar_url, e.nar_size),
            (&b"N"[..], "nar/x.nar", 9)
        );
        assert_eq!((e.verified_at, e.expires_at, e.latency_ms), (7, FAR, 5.0));
    }

    #[test]
    fn memory_database_works() {
        let (loaded, db) = open_and_load(":memory:", 0).unwrap();
        assert_eq!(loaded.routes.len(), 0);
        let (w, join) = spawn_writer(db, cfg(10));
        assert!(w.try_write(WriteOp::Route(hash(1), entry("https://a", FAR, 1))));
        w.flush_blocking().unwrap();
        assert_eq!((w.stored_routes(), w.batches_written() >= 1), (1, true));
        w.shutdown_blocking().unwrap();
        join.join().unwrap();
        // After the thread is gone, writes are refused and counted.
        assert!(!w.try_write(WriteOp::Negative(hash(2), FAR)));
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
            assert!(w.try_write(WriteOp::Route(hash(1), entry("https://a", FAR, 1))));
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
            assert!(w.try_write(WriteOp::Route(hash(i), Arc::new(e))));
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
        assert!(w.try_write(WriteOp::Route(hash(1), Arc::new(big))));
        w.flush_blocking().unwrap();
        assert!(w.is_degraded(), "a failed batch degrades");
        assert_eq!(w.stored_routes(), 0);
        assert!(w.try_write(WriteOp::Route(hash(2), entry("https://a", FAR, 1))));
        w.flush_blocking().unwrap();
        assert_eq!(w.stored_routes(), 1, "new writes commit past the held one");
        assert!(w.is_degraded(), "the 64 KiB route is still held back");
        // A newer write for the same path replaces the held-back one.
        assert!(w.try_write(WriteOp::Route(hash(1), entry("https://a", FAR, 1))));
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
            assert!(w.try_write(WriteOp::Route(hash(i), entry("https://a", FAR, 1))));
        }
        assert!(w.try_write(WriteOp::Remove(hash(2))));
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
}
