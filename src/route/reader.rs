//! COLD thread for a HOT caller: reads the narinfo of a route whose body is
//! not in memory, so that workers, which must never touch SQLite, can still
//! answer such a hit without asking an upstream.
//!
//! One std thread with its own read-only connection (WAL lets it read while
//! the writer commits), fed by a bounded channel. A worker queues a request
//! without ever waiting for room and awaits the one-shot answer; a full
//! queue or a stopped thread answers `None`, and the worker races instead.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::persist::{unix_now, PersistError};
use crate::proto::store_path::StoreHash;

/// Reads waiting for the thread before new ones are refused (raced).
const QUEUE: usize = 4096;

struct Read {
    hash: StoreHash,
    /// The route's row in `route_log` and `route_body`.
    id: u64,
    /// The upstream the in-memory route names: a row naming another one was
    /// replaced by a newer race and is not this route's body.
    upstream: Arc<str>,
    reply: flume::Sender<Option<Bytes>>,
}

/// Cheap to share (inside the route table); the thread stops when the last
/// handle is dropped.
pub struct BodyReader {
    tx: flume::Sender<Read>,
}

impl BodyReader {
    /// Opens a second connection to the database at `path` (a file that the
    /// writer has already opened and migrated) and starts the thread.
    pub fn spawn(path: &str) -> Result<(BodyReader, std::thread::JoinHandle<()>), PersistError> {
        let err = |step, source| PersistError::Sqlite {
            path: path.to_owned(),
            step,
            source,
        };
        let conn = Connection::open(path).map_err(|e| err("open reader", e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| err("reader busy_timeout", e))?;
        conn.execute_batch("PRAGMA query_only = ON")
            .map_err(|e| err("reader query_only", e))?;
        let (tx, rx) = flume::bounded(QUEUE);
        let join = std::thread::Builder::new()
            .name("ncro-db-reader".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| PersistError::Thread("reader", e))?;
        Ok((BodyReader { tx }, join))
    }

    /// The stored narinfo of row `id` if the row is still there, is the
    /// route of `hash` to `upstream`, and has not expired.
    pub async fn read(&self, hash: StoreHash, id: u64, upstream: Arc<str>) -> Option<Bytes> {
        let (reply, answer) = flume::bounded(1);
        self.tx
            .try_send(Read {
                hash,
                id,
                upstream,
                reply,
            })
            .ok()?;
        answer.recv_async().await.ok().flatten()
    }
}

fn run(conn: Connection, rx: flume::Receiver<Read>) {
    let mut logged = false;
    while let Ok(read) = rx.recv() {
        let body = match lookup(&conn, &read) {
            Ok(body) => body,
            Err(e) => {
                // Once: a broken database would otherwise log on every cold hit.
                if !logged {
                    logged = true;
                    tracing::error!(error = %e, "reading a narinfo back from the route database failed; such hits are raced instead (logged once)");
                }
                None
            }
        };
        // The worker may have stopped waiting (its client left).
        let _ = read.reply.send(body);
    }
}

fn lookup(conn: &Connection, read: &Read) -> rusqlite::Result<Option<Bytes>> {
    // Two rowid lookups: no index on the hash is needed.
    let mut stmt = conn.prepare_cached(
        "SELECT l.hash, l.upstream, l.expires_at, b.narinfo FROM route_log l \
         JOIN route_body b ON b.id = l.id WHERE l.id = ?1",
    )?;
    let id = i64::try_from(read.id).unwrap_or(i64::MAX);
    let mut rows = stmt.query([id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let same_route = row.get_ref(0)?.as_str().ok() == Some(read.hash.as_str())
        && row.get_ref(1)?.as_str().ok() == Some(&*read.upstream);
    let live = matches!(row.get_ref(2)?, ValueRef::Integer(t) if t > unix_now() as i64);
    Ok(match row.get_ref(3)? {
        ValueRef::Blob(b) if same_route && live && !b.is_empty() => Some(Bytes::copy_from_slice(b)),
        _ => None,
    })
}
