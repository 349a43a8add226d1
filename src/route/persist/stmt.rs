//! A prepared statement that binds text and blobs without copying them.
//!
//! rusqlite binds every non-empty text or blob as `SQLITE_TRANSIENT`, so
//! SQLite allocates a copy of each value before it runs the statement: for
//! the route INSERTs that is the narinfo (~1 KB) and four strings per
//! route, about an eighth of the writer thread's CPU (docs/benchmarks.md,
//! "Route writer CPU per route written"). [`StaticStmt::execute`] binds
//! them as `SQLITE_STATIC` instead, which is sound because the values are
//! borrowed for the whole call and the statement lets go of them before
//! it returns (see the safety comment there).
//!
//! This is the only `unsafe` code of the route database.

use std::ffi::{c_int, CStr};
use std::ptr::NonNull;

use rusqlite::{ffi, Connection};

/// One value to bind.
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'a> {
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// A prepared statement of one connection, finalized on drop.
///
/// It does not borrow its connection (so that [`super::Db`] can keep it
/// next to the connection it was prepared on): whoever holds one must drop
/// it before that connection closes ([`StaticStmt::prepare`]).
pub(super) struct StaticStmt {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
}

// SAFETY: rusqlite opens connections in SQLite's multi-thread mode, where a
// connection and its statements may be used by any one thread at a time;
// `Connection` is `Send` on those grounds and a statement moves with it
// (`Db` owns both). Every use takes `&mut self`, so never two at once.
unsafe impl Send for StaticStmt {}

impl StaticStmt {
    /// Prepares `sql` (one statement) on `conn`.
    ///
    /// # Safety
    /// The statement must be dropped before `conn` is closed (SQLite frees
    /// what a statement points to when the connection closes; rusqlite
    /// panics closing a connection with statements left).
    pub(super) unsafe fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Self> {
        let len = c_int::try_from(sql.len())
            .map_err(|_| failure(ffi::SQLITE_TOOBIG, Some("SQL text too long".into())))?;
        // SAFETY: `conn` is open and used by this thread (a `Connection` is
        // not `Sync`); `sql` is valid for `len` bytes and SQLite keeps no
        // pointer to it. The caller drops the statement before `conn`
        // closes; `Drop` finalizes it.
        unsafe {
            let db = conn.handle();
            let mut stmt = std::ptr::null_mut();
            let rc = ffi::sqlite3_prepare_v2(
                db,
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            );
            if rc != ffi::SQLITE_OK {
                // Nothing to finalize: on error SQLite sets `stmt` to NULL.
                return Err(db_error(db, rc));
            }
            let stmt = NonNull::new(stmt).ok_or_else(|| {
                failure(ffi::SQLITE_MISUSE, Some(format!("no statement in {sql:?}")))
            })?;
            Ok(StaticStmt { stmt, db })
        }
    }

    /// Binds `values` to parameters 1.. (texts and blobs as `SQLITE_STATIC`,
    /// not copied), runs the statement to completion, and returns the
    /// number of rows it changed.
    pub(super) fn execute(&mut self, values: &[Val<'_>]) -> rusqlite::Result<usize> {
        let stmt = self.stmt.as_ptr();
        // SAFETY: `stmt` is a live statement of the open connection `db`
        // (see `prepare`), used by this thread only (`&mut self`).
        // `SQLITE_STATIC` tells SQLite that each text and blob outlives its
        // use: it reads them during `sqlite3_step` (copying them into the
        // record it writes) and not after a rebind or
        // `sqlite3_clear_bindings`. Every value is borrowed for this whole
        // call, and `finish` clears the bindings before the call returns,
        // on every path (error ones included), so no pointer to them is
        // left in the statement.
        unsafe {
            let mut rc = ffi::SQLITE_OK;
            for (i, v) in values.iter().enumerate() {
                let Ok(col) = c_int::try_from(i + 1) else {
                    rc = ffi::SQLITE_RANGE;
                    break;
                };
                rc = match *v {
                    Val::Int(n) => ffi::sqlite3_bind_int64(stmt, col, n),
                    Val::Real(x) => ffi::sqlite3_bind_double(stmt, col, x),
                    Val::Text(s) => match c_int::try_from(s.len()) {
                        Ok(n) => ffi::sqlite3_bind_text(
                            stmt,
                            col,
                            s.as_ptr().cast(),
                            n,
                            ffi::SQLITE_STATIC(),
                        ),
                        Err(_) => ffi::SQLITE_TOOBIG,
                    },
                    Val::Blob(b) => match c_int::try_from(b.len()) {
                        Ok(n) => ffi::sqlite3_bind_blob(
                            stmt,
                            col,
                            b.as_ptr().cast(),
                            n,
                            ffi::SQLITE_STATIC(),
                        ),
                        Err(_) => ffi::SQLITE_TOOBIG,
                    },
                };
                if rc != ffi::SQLITE_OK {
                    break;
                }
            }
            if rc == ffi::SQLITE_OK {
                rc = loop {
                    match ffi::sqlite3_step(stmt) {
                        // A statement with RETURNING yields rows: not ours.
                        ffi::SQLITE_ROW => continue,
                        rc => break rc,
                    }
                };
            }
            // Read before the reset, which may overwrite the message.
            let result = match rc {
                ffi::SQLITE_DONE => Ok(ffi::sqlite3_changes64(self.db).max(0) as usize),
                rc => Err(db_error(self.db, rc)),
            };
            self.finish();
            result
        }
    }

    /// Resets the statement and drops every binding (NULL again).
    fn finish(&mut self) {
        // SAFETY: a live statement of this thread (see `execute`). Their
        // results only repeat the error `execute` already reports.
        unsafe {
            ffi::sqlite3_reset(self.stmt.as_ptr());
            ffi::sqlite3_clear_bindings(self.stmt.as_ptr());
        }
    }
}

impl Drop for StaticStmt {
    fn drop(&mut self) {
        // SAFETY: the statement's connection is still open (the contract of
        // `prepare`); it is finalized once, here.
        unsafe {
            ffi::sqlite3_finalize(self.stmt.as_ptr());
        }
    }
}

fn failure(code: c_int, msg: Option<String>) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), msg)
}

/// The error `rc` of `db`, with SQLite's message when it is about `rc`.
///
/// # Safety
/// `db` must be an open connection used by this thread.
unsafe fn db_error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    let msg = if ffi::sqlite3_extended_errcode(db) == rc || ffi::sqlite3_errcode(db) == rc {
        let p = ffi::sqlite3_errmsg(db);
        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
    } else {
        None
    };
    failure(rc, msg)
}
