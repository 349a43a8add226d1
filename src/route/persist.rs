//! COLD: the only code that touches SQLite. It runs on one dedicated std
//! thread fed by a bounded flume channel; workers never wait for it.
//!
//! Routes are an append-only log (`route_log` and `route_body`, keyed by a
//! row id the route table allocates: see `db`); `negative_cache` and
//! `upstream_health` are ncro 2.2's tables. A file from ncro 2.2 has its
//! `routes` table moved into the log once (`migrate`).
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction is in
//! the WAL file before `COMMIT` returns, so killing the process (even with
//! SIGKILL) loses nothing that was committed and never corrupts the file.
//! Only an OS crash or power loss can drop the commits since the last
//! checkpoint (the WAL is synced there; the writer checkpoints every
//! ~40 MB of WAL, `db::WAL_CHECKPOINT_BYTES`), still without corruption,
//! which is acceptable for a cache. A write is
//! acknowledged when its batch commits (counted in `rows_written`); what is
//! still queued or in the failing batch is lost on a kill or a write error.
//! docs/operations.md ("Crash safety") states the promise to operators and
//! `tests/it/crash.rs` checks it through the real binary.
//!
//! - `db`: the schema, opening the file, loading it back, and the
//!   transaction of a write batch;
//! - `batch`: the SQL of each write in a batch (new routes many to a
//!   statement);
//! - `migrate`: the one-time import of an older file's `routes` table;
//! - `stmt`: a prepared statement that binds without copying (the route
//!   INSERTs);
//! - `writer`: the writer thread, its queue and statistics, and the writes
//!   held back while the database fails.

mod batch;
mod db;
mod migrate;
mod stmt;
#[cfg(test)]
mod tests;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::RouteEntry;
use crate::proto::store_path::StoreHash;
pub use db::{open, open_and_load, Db, FullRoutes, Loaded, StoredRoute};
pub use writer::{spawn_writer, WriterConfig, WriterHandle, QUEUE_CAPACITY};

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

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a route goes in the log: its own row id (allocated by the route
/// table, increasing with time) and the row of the route it replaces, if
/// the table knew one (deleted in the same transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowIds {
    pub id: u64,
    pub replaces: Option<u64>,
}

/// A route as the writer stores it: the columns of its two rows, the
/// narinfo and the two strings in one allocation.
///
/// The route table builds it on the worker that learned the route, from
/// the worker's [`RouteEntry`], and drops the entry there. Queuing the
/// `Arc<RouteEntry>` itself made the writer thread free the last reference
/// to each route's five allocations (the entry, the narinfo and its
/// shared header, the NAR URL and hash), all made by a worker: with the
/// system allocator such frees take the worker arena's lock and miss the
/// cache, ~15 % of the writer's CPU per route (docs/benchmarks.md, "Route
/// writer CPU per route written"). It now frees one.
#[derive(Debug, Clone)]
pub struct RouteRow {
    pub upstream: Arc<str>,
    pub nar_size: u64,
    pub expires_at: u64,
    pub verified_at: u64,
    pub latency_ms: f32,
    /// The narinfo, then the NAR URL, then the NAR hash.
    bytes: Box<[u8]>,
    narinfo_len: usize,
    nar_url_len: usize,
}

impl RouteRow {
    pub fn of(e: &RouteEntry) -> Self {
        let mut bytes = Vec::with_capacity(e.narinfo.len() + e.nar_url.len() + e.nar_hash.len());
        bytes.extend_from_slice(&e.narinfo);
        bytes.extend_from_slice(e.nar_url.as_bytes());
        bytes.extend_from_slice(e.nar_hash.as_bytes());
        RouteRow {
            upstream: e.upstream.clone(),
            nar_size: e.nar_size,
            expires_at: e.expires_at,
            verified_at: e.verified_at,
            latency_ms: e.latency_ms,
            bytes: bytes.into_boxed_slice(),
            narinfo_len: e.narinfo.len(),
            nar_url_len: e.nar_url.len(),
        }
    }

    /// The upstream's narinfo, as received.
    pub fn narinfo(&self) -> &[u8] {
        &self.bytes[..self.narinfo_len]
    }

    /// The narinfo `URL` field, leading '/' stripped.
    pub fn nar_url(&self) -> &str {
        self.text(self.narinfo_len, self.narinfo_len + self.nar_url_len)
    }

    pub fn nar_hash(&self) -> &str {
        self.text(self.narinfo_len + self.nar_url_len, self.bytes.len())
    }

    fn text(&self, from: usize, to: usize) -> &str {
        // Copied from a `str` in `of`: always valid.
        std::str::from_utf8(&self.bytes[from..to]).unwrap_or_default()
    }
}

/// A request to the writer thread.
pub enum WriteOp {
    Route(StoreHash, RouteRow, RowIds),
    /// Hash, absolute expiry (unix seconds), and the row of the route it
    /// replaces (deleted).
    Negative(StoreHash, u64, Option<u64>),
    Health(HealthRow),
    /// Forget a route (its row, when known) and any negative entry for
    /// this hash.
    Remove(StoreHash, Option<u64>),
    /// Answered once every op queued before it has been committed (or has
    /// failed and been counted in `write_errors`).
    Flush(flume::Sender<()>),
    /// Commit what is queued before it and stop the thread.
    Shutdown,
}
