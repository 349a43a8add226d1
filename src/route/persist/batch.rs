//! The SQL of one write batch ([`super::Db::write_batch`]): the route
//! INSERTs, negative entries, health rows and deletions by row id.

use std::collections::HashSet;

use rusqlite::params;

use super::stmt::{StaticStmt, Val};
use super::{RouteRow, RowIds, WriteOp};
use crate::proto::store_path::StoreHash;

const INSERT_LOG: &str = "INSERT INTO route_log (id, hash, upstream, nar_url, expires_at, \
    verified_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(id) DO NOTHING";

const INSERT_BODY: &str = "INSERT OR REPLACE INTO route_body (id, latency_ms, nar_hash, \
    nar_size, narinfo) VALUES (?1, ?2, ?3, ?4, ?5)";

/// New routes written by one statement per table ([`Batch::append_many`]).
const MANY: usize = 64;

// The statements for [`MANY`] rows are `INSERT OR IGNORE`. A statement
// that writes several rows and may stop half-way with an error that undoes
// only that statement (`ON CONFLICT ... DO NOTHING` still aborts on a NOT
// NULL column, and `OR REPLACE` does too for a column without a default)
// makes SQLite first copy every page it changes that existed before the
// statement into a statement journal: ~5 % of the writer's CPU in a
// profile (docs/benchmarks.md). With IGNORE nothing stops it half-way, and
// no statement needs undoing on its own: on any error `Db::write_batch`
// drops the whole transaction. The values are never NULL, so IGNORE skips
// exactly the rows whose id is taken, as the one-row statements do.

/// [`INSERT_LOG`] for [`MANY`] rows.
fn insert_log_many() -> String {
    format!(
        "INSERT OR IGNORE INTO route_log (id, hash, upstream, nar_url, expires_at, \
         verified_at) VALUES {}",
        vec!["(?, ?, ?, ?, ?, ?)"; MANY].join(", ")
    )
}

/// [`INSERT_BODY`] for [`MANY`] rows, except that a body already under one
/// of the ids stays: [`Batch::append_many`] then replaces them one at a
/// time.
fn insert_body_many() -> String {
    format!(
        "INSERT OR IGNORE INTO route_body (id, latency_ms, nar_hash, nar_size, narinfo) \
         VALUES {}",
        vec!["(?, ?, ?, ?, ?)"; MANY].join(", ")
    )
}

/// The route INSERTs of the writer's connection, prepared once: one row
/// and [`MANY`] rows per table. They bind the narinfo and the strings
/// without copying them (`stmt`).
pub(super) struct RouteInserts {
    log: StaticStmt,
    body: StaticStmt,
    log_many: StaticStmt,
    body_many: StaticStmt,
}

/// One batch's transaction and what it keeps between ops.
pub(super) struct Batch<'t> {
    pub(super) tx: &'t rusqlite::Transaction<'t>,
    pub(super) negatives: &'t mut HashSet<StoreHash>,
    pub(super) cleared: &'t mut Vec<StoreHash>,
    /// The connection's route INSERTs ([`super::Db`] keeps them).
    pub(super) inserts: &'t mut Option<RouteInserts>,
}

/// A route that replaces no row: consecutive ones are written [`MANY`] at
/// a time.
fn is_new_route(op: &WriteOp) -> bool {
    match op {
        WriteOp::Route(_, _, ids) => ids.replaces.is_none() || ids.replaces == Some(ids.id),
        _ => false,
    }
}

impl Batch<'_> {
    /// Runs `ops` in order; returns the change in the number of
    /// `route_log` rows and the number of ops written.
    ///
    /// Runs of new routes (no row to delete) go [`MANY`] to a statement:
    /// one statement keeps its cursors on the last page of each table from
    /// row to row, where one statement per row seeks from the root of both
    /// B-trees and starts and stops a statement each time (a quarter of
    /// the CPU in the statements, docs/benchmarks.md). Only new routes: a
    /// route that replaces a row deletes it first, as one op at a time
    /// does.
    pub(super) fn run(&mut self, ops: &[WriteOp]) -> rusqlite::Result<(i64, u64)> {
        let (mut delta, mut rows) = (0i64, 0u64);
        let mut i = 0;
        while i < ops.len() {
            let run = ops[i..].iter().take_while(|op| is_new_route(op)).count();
            let many = run / MANY * MANY;
            if many > 0 {
                for chunk in ops[i..i + many].chunks_exact(MANY) {
                    delta += self.append_many(chunk)?;
                }
                rows += many as u64;
                i += many;
                continue;
            }
            let op = &ops[i];
            delta += self.apply(op)?;
            rows += u64::from(!matches!(op, WriteOp::Flush(_) | WriteOp::Shutdown));
            i += 1;
        }
        Ok((delta, rows))
    }

    /// The connection's route INSERTs, prepared at the first route.
    fn inserts(&mut self) -> rusqlite::Result<&mut RouteInserts> {
        Ok(match self.inserts {
            Some(s) => s,
            // SAFETY: kept in `Db::inserts`, dropped before `Db::conn`, the
            // connection under `tx`.
            None => self.inserts.insert(unsafe {
                RouteInserts {
                    log: StaticStmt::prepare(self.tx, INSERT_LOG)?,
                    body: StaticStmt::prepare(self.tx, INSERT_BODY)?,
                    log_many: StaticStmt::prepare(self.tx, &insert_log_many())?,
                    body_many: StaticStmt::prepare(self.tx, &insert_body_many())?,
                }
            }),
        })
    }

    /// Appends [`MANY`] new routes (see [`Self::run`]), as many calls of
    /// [`Self::append_route`] would. A row id already in `route_log` (a
    /// write retried after it committed) keeps its body: when the log
    /// took fewer rows than it was given, the bodies go one at a time and
    /// only where there is none.
    fn append_many(&mut self, chunk: &[WriteOp]) -> rusqlite::Result<i64> {
        let mut vals = Vec::with_capacity(6 * MANY);
        let routes = || {
            chunk.iter().filter_map(|op| match op {
                WriteOp::Route(h, e, ids) => Some((h, e, to_i64(ids.id))),
                _ => None,
            })
        };
        for (hash, e, id) in routes() {
            vals.extend(log_row(hash, e, id));
        }
        let ins = self.inserts()?;
        let inserted = ins.log_many.execute(&vals)?;
        vals.clear();
        if inserted == MANY {
            for (_, e, id) in routes() {
                vals.extend(body_row(e, id));
            }
            if ins.body_many.execute(&vals)? < MANY {
                // A body whose log row is gone (a hand-edited file, say):
                // the new route's replaces it, as `INSERT_BODY` does.
                for (_, e, id) in routes() {
                    ins.body.execute(&body_row(e, id))?;
                }
            }
        } else {
            // Rare: a retried batch. Rows are new or left as they are.
            let mut stmt = self.tx.prepare_cached(
                "INSERT OR IGNORE INTO route_body (id, latency_ms, nar_hash, nar_size, narinfo) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (_, e, id) in routes() {
                stmt.execute(params![
                    id,
                    f64::from(e.latency_ms),
                    e.nar_hash(),
                    to_i64(e.nar_size),
                    e.narinfo()
                ])?;
            }
        }
        for (hash, ..) in routes() {
            self.delete_negative(hash)?;
        }
        Ok(inserted as i64)
    }

    /// Runs one op; returns the change in the number of `route_log` rows.
    fn apply(&mut self, op: &WriteOp) -> rusqlite::Result<i64> {
        let tx = self.tx;
        match op {
            WriteOp::Route(hash, e, ids) => self.append_route(hash, e, *ids),
            WriteOp::Negative(hash, expires_at, replaces) => {
                tx.prepare_cached(
                    "INSERT INTO negative_cache (store_path, expires_at) VALUES (?1, ?2) \
                     ON CONFLICT(store_path) DO UPDATE SET expires_at = excluded.expires_at",
                )?
                .execute(params![hash.as_str(), to_i64(*expires_at)])?;
                // At once, even if the batch fails: a superset is harmless.
                self.negatives.insert(*hash);
                // One state per hash: the route it replaces goes.
                delete_route(tx, *replaces)
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
            WriteOp::Remove(hash, id) => {
                self.delete_negative(hash)?;
                delete_route(tx, *id)
            }
            WriteOp::Flush(_) | WriteOp::Shutdown => Ok(0),
        }
    }

    /// Appends the route under its row id (both tables) and deletes the
    /// row it replaces. A row id already present (a write retried after it
    /// committed) is left as it is.
    fn append_route(
        &mut self,
        hash: &StoreHash,
        e: &RouteRow,
        ids: RowIds,
    ) -> rusqlite::Result<i64> {
        let id = to_i64(ids.id);
        let mut delta = match ids.replaces {
            Some(old) if old != ids.id => delete_route(self.tx, Some(old))?,
            _ => 0,
        };
        let RouteInserts { log, body, .. } = self.inserts()?;
        let inserted = log.execute(&log_row(hash, e, id))?;
        if inserted == 1 {
            body.execute(&body_row(e, id))?;
            delta += 1;
        }
        self.delete_negative(hash)?;
        Ok(delta)
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

/// Deletes route row `id` (when there is one) from both tables.
fn delete_route(tx: &rusqlite::Transaction<'_>, id: Option<u64>) -> rusqlite::Result<i64> {
    let Some(id) = id else { return Ok(0) };
    let id = to_i64(id);
    let n = tx
        .prepare_cached("DELETE FROM route_log WHERE id = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM route_body WHERE id = ?1")?
        .execute([id])?;
    Ok(-(n as i64))
}

/// SQLite's integers are signed: values past `i64::MAX` are stored as it.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `route_log` columns of a route, in the order of its INSERTs.
fn log_row<'a>(hash: &'a StoreHash, e: &'a RouteRow, id: i64) -> [Val<'a>; 6] {
    [
        Val::Int(id),
        Val::Text(hash.as_str()),
        Val::Text(&e.upstream),
        Val::Text(e.nar_url()),
        Val::Int(to_i64(e.expires_at)),
        Val::Int(to_i64(e.verified_at)),
    ]
}

/// The `route_body` columns of a route, in the order of its INSERTs.
fn body_row(e: &RouteRow, id: i64) -> [Val<'_>; 5] {
    [
        Val::Int(id),
        Val::Real(f64::from(e.latency_ms)),
        Val::Text(e.nar_hash()),
        Val::Int(to_i64(e.nar_size)),
        Val::Blob(e.narinfo()),
    ]
}
