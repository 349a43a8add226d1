//! The one-time move of a `routes` table (ncro 2.2's, which ncro 3 also
//! wrote until the route log) into `route_log` and `route_body`.
//!
//! Unexpired rows with a stored narinfo are copied, the least recently
//! verified first so that ids keep the order the load relies on (newest
//! last); rows without a narinfo (written by ncro 2.2 before it stored
//! them) could never be served and are left out. The `routes` table is
//! then dropped in the same transaction: a kill leaves either the old table
//! or the new rows, never both. An ncro that only knows `routes` (a
//! downgrade) creates it again, empty, and relearns its routes; its
//! routes are imported again at the next upgrade.
//!
//! A file with pages smaller than [`PAGE_SIZE`] is then rewritten once
//! (`VACUUM`) with the new page size, which halves the writer's CPU per
//! route (docs/benchmarks.md). That needs as much free disk as the file;
//! when it fails, the file keeps its pages and works as before.

use rusqlite::Connection;

/// Page size of a new database file (SQLite's default is 4 KiB). Appended
/// rows are written once to the WAL and once by the checkpoint, with
/// kernel work per page each time: 16 KiB pages cost about half the CPU
/// per route of 4 KiB ones (docs/benchmarks.md). A file with smaller pages
/// keeps them unless an import rewrites it ([`repage`]).
pub(super) const PAGE_SIZE: u32 = 16 * 1024;

type StepErr = (&'static str, rusqlite::Error);

/// Imports and drops `routes` if the file has one. Runs before the
/// connection is switched to WAL (see [`repage`]).
pub(super) fn import_routes_table(c: &Connection, path: &str, now: u64) -> Result<(), StepErr> {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let exists: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'routes')",
            [],
            |r| r.get(0),
        )
        .map_err(|e| ("inspect schema", e))?;
    if !exists {
        return Ok(());
    }
    let has_narinfo =
        has_column(c, "routes", "narinfo_bytes").map_err(|e| ("inspect schema", e))?;
    // Out of WAL mode (as `repage` needs anyway): the copy, about the size
    // of the file, then goes to the file once instead of to the WAL and
    // again at the checkpoint (docs/benchmarks.md). The rollback journal
    // keeps the import atomic. Another connection holding the WAL keeps it
    // in WAL mode: slower, still right.
    if path != ":memory:" {
        let _mode: String = c
            .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
            .map_err(|e| ("leave WAL mode for the import", e))?;
    }
    let tx = c
        .unchecked_transaction()
        .map_err(|e| ("begin route import", e))?;
    let total: i64 = tx
        .query_row("SELECT COUNT(*) FROM routes", [], |r| r.get(0))
        .map_err(|e| ("count old routes", e))?;
    let mut imported = 0;
    if has_narinfo {
        let base: i64 = tx
            .query_row("SELECT coalesce(max(id), 0) FROM route_log", [], |r| {
                r.get(0)
            })
            .map_err(|e| ("read the last row id", e))?;
        // The same filter and order in both statements give each row the
        // same id in both tables (rowid breaks ties).
        let pick = "FROM routes WHERE ttl > ?2 AND typeof(narinfo_bytes) = 'blob' \
                    AND length(narinfo_bytes) > 0";
        let id = "?1 + row_number() OVER (ORDER BY last_verified, rowid)";
        imported = tx
            .execute(
                &format!(
                    "INSERT INTO route_log (id, hash, upstream, nar_url, expires_at, verified_at) \
                     SELECT {id}, store_path, upstream_url, nar_url, ttl, last_verified {pick}"
                ),
                [base, now],
            )
            .map_err(|e| ("import old routes", e))?;
        tx.execute(
            &format!(
                "INSERT INTO route_body (id, latency_ms, nar_hash, nar_size, narinfo) \
                 SELECT {id}, latency_ms, nar_hash, nar_size, narinfo_bytes {pick}"
            ),
            [base, now],
        )
        .map_err(|e| ("import old narinfos", e))?;
    }
    tx.execute_batch("DROP TABLE routes")
        .map_err(|e| ("drop the old routes table", e))?;
    tx.commit().map_err(|e| ("commit route import", e))?;
    tracing::info!(
        path,
        imported,
        left_out = total as usize - imported,
        "route database: moved the routes of an older ncro into the route log \
         (expired rows and rows without a narinfo left out)"
    );
    repage(c, path);
    Ok(())
}

/// Rewrites the file with [`PAGE_SIZE`] pages if its pages are smaller.
/// Best effort: logged and skipped when it cannot be done (another
/// connection holds the WAL, not enough disk).
fn repage(c: &Connection, path: &str) {
    if path == ":memory:" {
        return;
    }
    let page: u32 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap_or(PAGE_SIZE);
    if page >= PAGE_SIZE {
        return;
    }
    let run = || -> rusqlite::Result<bool> {
        let mode: String = c.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Ok(false);
        }
        c.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE}; VACUUM"))?;
        Ok(true)
    };
    let started = std::time::Instant::now();
    match run() {
        Ok(true) => tracing::info!(
            path,
            from = page,
            to = PAGE_SIZE,
            ms = started.elapsed().as_millis() as u64,
            "route database: rewrote the file with larger pages"
        ),
        Ok(false) => tracing::warn!(
            path,
            page,
            "route database: the file keeps its page size (another process has it open)"
        ),
        Err(e) => tracing::warn!(path, page, error = %e,
            "route database: could not rewrite the file with larger pages; it keeps its page size"),
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
