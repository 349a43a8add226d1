//! The writer thread: the only owner of the database once started. Workers
//! queue writes without ever waiting ([`WriterHandle::try_write`]); it
//! commits them in batches, sweeps expired rows, enforces the row cap, and
//! holds back writes that failed for a reason that passes until the
//! database works again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::ErrorCode;

use super::{unix_now, Db, PersistError, WriteOp};
use crate::proto::store_path::StoreHash;

/// Ops queued for the writer before `try_write` starts dropping them.
/// A route op holds its row, narinfo included (~1 KB): a full queue holds
/// ~70 MB, reached only by a writer far behind (it needs ~4-5 us of CPU
/// a route, ~5 once the database is full, docs/benchmarks.md).
pub const QUEUE_CAPACITY: usize = 65_536;

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Cap on rows in `route_log`; the oldest go first.
    pub max_entries: usize,
    /// How often expired routes and negative entries are deleted.
    pub sweep_interval: Duration,
    /// Most ops committed in one transaction.
    pub batch_max: usize,
    /// How long the writer keeps gathering ops after the first one of a
    /// batch before committing (unless `batch_max` is reached or a flush
    /// or shutdown asks for it sooner). Each commit rewrites every page it
    /// touched in the WAL, so a batch of 14 routes cost ~20 us of CPU per
    /// route against ~10 us for 1000 (docs/benchmarks.md).
    pub linger: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_entries: 1_000_000,
            sweep_interval: Duration::from_secs(300),
            batch_max: 4096,
            linger: Duration::from_millis(50),
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
    /// The next route row id to hand out: [`Db::next_row_id`] of the
    /// database the writer owns at first.
    next_row_id: AtomicU64,
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
    /// The writer thread, unparked after a flush or shutdown is queued so
    /// that it commits at once instead of at the end of its linger.
    thread: Option<std::thread::Thread>,
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
        self.wake();
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
        self.wake();
        done.recv().map_err(|_| PersistError::WriterClosed)
    }

    /// Asks the writer to commit what is queued and exit (blocks while the
    /// queue is full). Join its thread to wait for the exit.
    pub fn shutdown_blocking(&self) -> Result<(), PersistError> {
        self.tx
            .send(WriteOp::Shutdown)
            .map_err(|_| PersistError::WriterClosed)?;
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.unpark();
        }
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
    /// A row id for a new route (see [`super::RowIds`]): after every row
    /// of the database, and growing with time, so the log is appended to.
    /// One counter per writer, shared by every handle.
    pub fn allocate_row_id(&self) -> u64 {
        self.stats.next_row_id.fetch_add(1, Ordering::Relaxed)
    }
    /// Rows in `route_log` after the last batch or sweep (older copies of
    /// a route not yet deleted included).
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
        let stats = Arc::new(WriterStats {
            next_row_id: AtomicU64::new(1),
            ..WriterStats::default()
        });
        let thread = None;
        (WriterHandle { tx, stats, thread }, rx)
    }
}

/// Starts the writer thread that owns `db` from now on.
pub fn spawn_writer(db: Db, cfg: WriterConfig) -> (WriterHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = flume::bounded(QUEUE_CAPACITY);
    let stats = Arc::new(WriterStats::default());
    stats.stored_routes.store(db.route_count, Ordering::Relaxed);
    stats.next_row_id.store(db.next_row_id(), Ordering::Relaxed);
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
    let thread = Some(join.thread().clone());
    (WriterHandle { tx, stats, thread }, join)
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
        WriteOp::Route(h, ..) | WriteOp::Negative(h, ..) | WriteOp::Remove(h, _) => {
            Some(HeldKey::Path(*h))
        }
        WriteOp::Health(row) => Some(HeldKey::Health(row.url.clone())),
        WriteOp::Flush(_) | WriteOp::Shutdown => None,
    }
}

/// The row an op deletes (the route it replaces or removes).
fn deleted_row(op: &mut WriteOp) -> Option<&mut Option<u64>> {
    match op {
        WriteOp::Route(_, _, ids) => Some(&mut ids.replaces),
        WriteOp::Negative(_, _, row) | WriteOp::Remove(_, row) => Some(row),
        _ => None,
    }
}

/// `op` replaces `held`, a write for the same path that never committed:
/// the row `held` was to delete (an older route) is now `op`'s to delete,
/// when `op` would only delete `held`'s own row (never written) or none.
/// Without this, that older row would outlive the route that replaced it.
fn inherit_deletion(op: &mut WriteOp, held: &WriteOp) {
    let (own, owed) = match held {
        WriteOp::Route(_, _, ids) => (Some(ids.id), ids.replaces),
        WriteOp::Negative(_, _, row) | WriteOp::Remove(_, row) => (None, *row),
        _ => return,
    };
    let Some(owed) = owed else { return };
    if let Some(row) = deleted_row(op) {
        if row.is_none() || *row == own {
            *row = Some(owed);
        }
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
        let r = self.db.tune_for_writes();
        self.check("tune the connection", r);
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
                    let stop = self.gather(&rx, op, &mut batch, batch_max);
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

    /// Collects `first` and what follows it into `batch`, for up to
    /// `cfg.linger`. Between two looks at the queue the thread parks until
    /// the deadline: one wake-up per batch, not one per op nor a polling
    /// step (each wake-up costs more CPU than the ops it gathers save). A
    /// flush or shutdown unparks it (see [`WriterHandle::wake`]). Stops
    /// early at `batch_max`, a flush (someone waits for it) or a shutdown;
    /// returns true at a shutdown.
    fn gather(
        &self,
        rx: &flume::Receiver<WriteOp>,
        first: WriteOp,
        batch: &mut Vec<WriteOp>,
        batch_max: usize,
    ) -> bool {
        let deadline = Instant::now() + self.cfg.linger;
        let mut next = Some(first);
        loop {
            while let Some(op) = next.take() {
                let (stop, urgent) = match op {
                    WriteOp::Shutdown => (true, true),
                    WriteOp::Flush(_) => (false, true),
                    _ => (false, false),
                };
                batch.push(op);
                if urgent || batch.len() >= batch_max {
                    return stop;
                }
                next = rx.try_recv().ok();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // May return early (an unpark, or spuriously): the loop looks
            // at the queue and parks again for what is left.
            std::thread::park_timeout(left);
            next = rx.try_recv().ok();
        }
    }

    fn commit(&mut self, batch: &mut Vec<WriteOp>) {
        if !self.held.is_empty() {
            // Newer writes replace held-back ones for the same path, so the
            // two can commit in either order; the newer one takes over the
            // row deletion the held one still owes.
            for op in batch.iter_mut() {
                if let Some(held) = held_key(op).and_then(|k| self.held.remove(&k)) {
                    inherit_deletion(op, &held);
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
pub(super) fn error_kind(e: &rusqlite::Error) -> (u32, &'static str) {
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
