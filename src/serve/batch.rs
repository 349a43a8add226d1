//! `GetNarInfosV1`: many narinfos in one request. HOT.
//!
//! Advertised in `/nix-cache-info` as `GetNarInfosV1: /get-narinfos-v1`.
//! The client sends `QUERY` (or `POST`, which the protocol used first) with
//! a body of store path hash parts, one per line; ncro answers 200 with one
//! JSON object per line (store object info v2 plus `path`, see [`json`]) for
//! every hash it found. A hash absent from the answer is not in any cache.
//!
//! Each hash is answered exactly like `GET /<hash>.narinfo` (route cache,
//! negative cache, single-flight, race), up to [`CONCURRENCY`] at once per
//! request and within the `cache.mass_query` limits. Because absence means
//! "definitely not there", a batch in which any hash got no definite answer
//! (an upstream error or timeout) is answered 502/504 as a whole, and a
//! batch refused a race permit 503: never a partial answer that a client
//! would read as misses.

mod body;
pub mod json;

use std::io::{self, Write as _};

use futures_util::stream::{self, StreamExt};

use crate::http::request::{Method, Request};
use crate::http::response::{write_head, write_simple, Framing};
use crate::metrics::{BatchPath, EndpointResult};
use crate::proto::narinfo::NarInfo;
use crate::proto::store_path::StoreHash;
use crate::route::Hit;
use crate::serve::narinfo::{self, Resolved};
use crate::serve::{After, Conn};
use crate::worker::WorkerCtx;
use body::BodyError;

/// Where the endpoint lives, as advertised.
pub const PATH: &str = "/get-narinfos-v1";
/// The `nix-cache-info` line that advertises it.
pub const CACHE_INFO_LINE: &str = "GetNarInfosV1: /get-narinfos-v1\n";
/// Most store hashes in one request; more is 413. A large closure is a few
/// thousand paths.
pub const MAX_HASHES: usize = 10_000;
/// Largest request body: [`MAX_HASHES`] lines of 32 characters plus CRLF,
/// with room for blank lines.
pub const MAX_BODY: usize = MAX_HASHES * 34 + 4096;
/// Hashes of one request resolved at once (further bounded by
/// `cache.mass_query.max_concurrent_races`), so one batch cannot take
/// every race permit from the single-path clients.
pub const CONCURRENCY: usize = 32;
/// Answer bytes buffered before a write.
const FLUSH_AT: usize = 64 * 1024;

const METRIC: &str = "get_narinfos";

/// Whether this request is for the batch endpoint. A client that joins the
/// advertised path to the cache URL with an extra slash is served too.
pub fn is_batch(path: &str) -> bool {
    path == PATH || path.strip_prefix('/') == Some(PATH)
}

/// Serves one batch request; returns what to do with the connection and
/// how many bytes of `tail` (the buffer after the head) the body used.
pub async fn serve(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    head: &[u8],
    tail: &[u8],
) -> io::Result<(After, usize)> {
    let keep = req.keep_alive && !ctx.drain.is_fired();
    if !matches!(req.method_raw, "POST" | "QUERY") {
        return Ok((method_not_allowed(conn, ctx, req, keep), 0));
    }
    let deadline = monoio::time::Instant::now() + ctx.shared.config.server.read_timeout;
    let read = async {
        let framing = body::framing(head)?;
        if framing.expect_continue {
            conn.flush(ctx).await?; // earlier pipelined answers go first
        }
        body::read(&mut conn.stream, framing, tail, MAX_BODY, deadline).await
    };
    let body = match read.await {
        Ok(b) => b,
        Err(e) => return Ok((refuse_body(conn, ctx, &e), tail.len())),
    };
    let keep = keep && !body.overshot;
    let hashes = match parse_hashes(&body.bytes, MAX_HASHES) {
        Ok(h) => h,
        Err(e) => {
            let status = match e {
                HashesError::TooMany => 413,
                HashesError::BadLine(_) => 400,
            };
            ctx.metrics
                .endpoint_finished(METRIC, EndpointResult::BadRequest);
            let after = conn.error(ctx, status, &format!("{e}\n"), keep);
            return Ok((after, body.from_tail));
        }
    };
    let after = answer(conn, ctx, &hashes, keep, req.http10).await?;
    Ok((after, body.from_tail))
}

/// 405 for any method but POST and QUERY; closes when an unread body may
/// follow.
fn method_not_allowed(conn: &mut Conn, ctx: &WorkerCtx, req: &Request<'_>, keep: bool) -> After {
    ctx.metrics
        .endpoint_finished(METRIC, EndpointResult::BadRequest);
    ctx.metrics.bad_requests.inc();
    let keep = keep && !req.has_body;
    let date = ctx.date();
    let types = ("Content-Type", &b"text/plain; charset=utf-8"[..]);
    let allow = ("Allow", &b"POST, QUERY"[..]);
    write_simple(
        &mut conn.wbuf,
        405,
        keep,
        req.method == Method::Head,
        &date,
        &[allow, types],
        b"use POST or QUERY with one store hash per line\n",
    );
    After::keep_if(keep)
}

/// Answers a body that could not be read; the connection closes, since
/// the rest of the body may still be on its way.
fn refuse_body(conn: &mut Conn, ctx: &WorkerCtx, e: &BodyError) -> After {
    tracing::debug!(error = %e, "batch narinfo request body refused");
    let status = match e {
        BodyError::TooLarge(_) => 413,
        BodyError::Malformed(_) => 400,
        BodyError::Timeout => 408,
        BodyError::Closed | BodyError::Io(_) => {
            ctx.metrics.endpoint_finished(METRIC, EndpointResult::Error);
            return After::Close;
        }
    };
    ctx.metrics
        .endpoint_finished(METRIC, EndpointResult::BadRequest);
    conn.error(ctx, status, &format!("{e}\n"), false)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashesError {
    #[error("line {0}: not a store path hash (32 Nix-base32 characters)")]
    BadLine(usize),
    #[error("more than {MAX_HASHES} store hashes in one request")]
    TooMany,
}

/// One hash per line; blank lines and surrounding whitespace (a CRLF) are
/// ignored, duplicates asked once, order kept.
pub fn parse_hashes(body: &[u8], max: usize) -> Result<Vec<StoreHash>, HashesError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (n, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let hash = StoreHash::parse(line).ok_or(HashesError::BadLine(n + 1))?;
        if seen.insert(hash) {
            if out.len() == max {
                return Err(HashesError::TooMany);
            }
            out.push(hash);
        }
    }
    Ok(out)
}

/// Why a batch gets no 200.
enum Failed {
    Unavailable { timed_out: bool },
    Overloaded,
}

/// Resolves every hash (bounded concurrency) and writes the answer.
async fn answer(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    hashes: &[StoreHash],
    keep: bool,
    http10: bool,
) -> io::Result<After> {
    let found = match resolve_all(ctx, hashes).await {
        Ok(found) => found,
        Err(failed) => {
            ctx.metrics.endpoint_finished(METRIC, EndpointResult::Error);
            return Ok(match failed {
                Failed::Overloaded => narinfo::write_overloaded(conn, ctx, keep),
                Failed::Unavailable { timed_out } => {
                    let status = if timed_out { 504 } else { 502 };
                    let msg =
                        "some store hash got no definite answer from the upstreams; try again\n";
                    conn.error(ctx, status, msg, keep)
                }
            });
        }
    };
    write_lines(conn, ctx, &found, keep && !http10, http10).await
}

/// The routes found, in request order; stops at the first hash without a
/// definite answer (the in-flight lookups are dropped, as when a client
/// disconnects).
async fn resolve_all(ctx: &WorkerCtx, hashes: &[StoreHash]) -> Result<Vec<Hit>, Failed> {
    let limit = CONCURRENCY
        .min(ctx.shared.config.cache.max_concurrent_races as usize)
        .max(1);
    let mut results: Vec<Option<Hit>> = vec![None; hashes.len()];
    let mut lookups = stream::iter(hashes.iter().copied().enumerate())
        .map(|(i, hash)| async move { (i, narinfo::answer(ctx, hash).await) })
        .buffer_unordered(limit);
    while let Some((i, resolved)) = lookups.next().await {
        let counted = |p: BatchPath| ctx.metrics.batch_paths[p as usize].inc();
        match resolved {
            Resolved::Found(entry, _) => {
                counted(BatchPath::Found);
                results[i] = Some(entry);
            }
            Resolved::Miss => counted(BatchPath::Absent),
            Resolved::Unavailable { timed_out } => {
                counted(BatchPath::Failed);
                return Err(Failed::Unavailable { timed_out });
            }
            Resolved::Overloaded => {
                counted(BatchPath::Failed);
                return Err(Failed::Overloaded);
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// 200 with one NDJSON line per route, chunked (HTTP/1.0: ended by
/// closing), rendered and written in pieces of about [`FLUSH_AT`] so a
/// large answer is never held whole.
async fn write_lines(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    found: &[Hit],
    keep: bool,
    http10: bool,
) -> io::Result<After> {
    let framing = if http10 {
        Framing::None
    } else {
        Framing::Chunked
    };
    let date = ctx.date();
    let ctype = ("Content-Type", &b"application/x-ndjson"[..]);
    write_head(&mut conn.wbuf, 200, framing, keep, &date, &[ctype]);
    for entry in found {
        let Some(line) = NarInfo::parse(&entry.narinfo)
            .ok()
            .and_then(|info| json::line(&info))
        else {
            // Stored narinfos are ncro's own renderings, so this is a bug.
            // Leaving the path out would claim it is absent: end the answer
            // unfinished instead (no last chunk), which the client sees as
            // a failed transfer.
            tracing::error!(
                upstream = entry.upstream,
                "stored narinfo cannot be rendered as JSON"
            );
            ctx.metrics.endpoint_finished(METRIC, EndpointResult::Error);
            return Ok(After::Close);
        };
        if framing == Framing::Chunked {
            let _ = write!(conn.wbuf, "{:x}\r\n", line.len()); // Vec writes cannot fail
            conn.wbuf.extend_from_slice(line.as_bytes());
            conn.wbuf.extend_from_slice(b"\r\n");
        } else {
            conn.wbuf.extend_from_slice(line.as_bytes());
        }
        if conn.wbuf.len() >= FLUSH_AT {
            conn.flush(ctx).await?;
        }
    }
    if framing == Framing::Chunked {
        conn.wbuf.extend_from_slice(b"0\r\n\r\n");
    }
    ctx.metrics.endpoint_finished(METRIC, EndpointResult::Ok);
    Ok(After::keep_if(keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    const B: &str = "2fm1sqz6wgmsbrp89lvl9kdxxw610dnb";

    #[test]
    fn hashes_one_per_line() {
        let body = format!("{A}\r\n\n  {B}\n{A}\n");
        let got = parse_hashes(body.as_bytes(), 10).expect("parses");
        let want: Vec<StoreHash> = [A, B]
            .iter()
            .filter_map(|h| StoreHash::parse(h.as_bytes()))
            .collect();
        assert_eq!(
            got, want,
            "blank lines skipped, CRLF trimmed, duplicate asked once"
        );
        assert_eq!(parse_hashes(b"", 10), Ok(Vec::new()));
    }

    #[test]
    fn bad_lines_and_limits() {
        let body = format!("{A}\n/nix/store/{B}-x\n");
        assert_eq!(
            parse_hashes(body.as_bytes(), 10),
            Err(HashesError::BadLine(2))
        );
        assert_eq!(
            parse_hashes(format!("{A}\n{}e\n", &B[..31]).as_bytes(), 10),
            Err(HashesError::BadLine(2))
        );
        let two = format!("{A}\n{B}\n");
        assert_eq!(parse_hashes(two.as_bytes(), 1), Err(HashesError::TooMany));
        // Duplicates do not count against the limit.
        assert!(parse_hashes(format!("{A}\n{A}\n").as_bytes(), 1).is_ok());
    }

    #[test]
    fn batch_path() {
        assert!(is_batch("/get-narinfos-v1"));
        assert!(is_batch("//get-narinfos-v1"));
        assert!(!is_batch("/get-narinfos-v1/"));
        assert!(!is_batch("/get-narinfos"));
    }
}
