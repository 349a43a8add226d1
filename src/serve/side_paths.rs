//! `GET/HEAD` of the binary-cache side paths: `log/<drv>`, `<hash>.ls`,
//! `realisations/<id>.doi`, `build-trace-v2/<drv>/<out>.doi` and
//! `debuginfo/<build-id>`. HOT, but off the narinfo/NAR fast path.
//!
//! Routing (docs/endpoints.md has the full rules):
//! - A path that names a store hash (`.ls`: its own; logs and build traces:
//!   the derivation's) is first asked of the upstream whose narinfo route
//!   for that hash is live, if that upstream is routable. Any other answer
//!   from it makes the others race, exactly like a narinfo miss.
//! - Paths naming no store hash (realisations, debuginfo) are raced.
//! - 404 only when every upstream asked (cooling ones last) said
//!   404/403/410; otherwise 502 (504 when only deadlines passed). Nothing is
//!   cached, positive or negative.
//! - A `debuginfo` answer points at a NAR *of the cache that wrote it*
//!   (`archive: "../nar/…"`): its NAR key is pinned in the NAR index to the
//!   upstream that answered, so the client's next request (that NAR) goes
//!   to the same upstream. Nothing signs the record, so a pin only fills a
//!   NAR key nobody holds: it never replaces a live entry.
//!
//! Bodies are streamed with the upstream client's bounded-buffer relay;
//! only a debuginfo answer (a small JSON) is read into memory.

mod fetch;
pub mod paths;

use std::io;

use crate::config::NarRelay;
use crate::http::client::{
    Method as UpMethod, RelayMode, Request as UpRequest, Response as UpResponse,
};
use crate::http::request::{Method, Request};
use crate::http::response::{write_head, Framing};
use crate::metrics::EndpointResult;
use crate::route::nar_key;
use crate::serve::{valid_nar_path, After, Conn};
use crate::worker::{unix_now, WorkerCtx};
use fetch::Fetched;
pub use paths::{classify, Kind, Target};

/// Response headers passed from the upstream. No range headers: ranges are
/// not forwarded (bodies here are small or compressed as a whole).
const PASSED_HEADERS: [&str; 6] = [
    "Content-Type",
    "Content-Encoding",
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Location",
];

/// Largest debuginfo record read to learn its NAR (Nix writes about 150
/// bytes); a bigger answer is no debuginfo record.
const MAX_DEBUGINFO: usize = 64 * 1024;

/// Answers one side-path request that [`classify`] recognised.
pub async fn serve(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    target: Result<Target, Kind>,
    keep: bool,
) -> io::Result<After> {
    let target = match target {
        Ok(t) => t,
        Err(kind) => {
            ctx.metrics
                .endpoint_finished(kind.label(), EndpointResult::BadRequest);
            return Ok(conn.error(ctx, 400, "invalid path\n", keep));
        }
    };
    let label = target.kind.label();
    let method = if req.method == Method::Head {
        UpMethod::Head
    } else {
        UpMethod::Get
    };
    // Only the validated path goes upstream, never the client's query.
    let up_req = UpRequest {
        method,
        path: req.path,
        headers: &[],
    };
    // `classify` already admits only what Nix writes; this keeps the rule
    // in one place: nothing is asked upstream that could not be sent.
    if let Err(e) = up_req.check_forwardable() {
        tracing::debug!(path = req.path, error = %e, "side path cannot be forwarded");
        ctx.metrics
            .endpoint_finished(label, EndpointResult::BadRequest);
        return Ok(conn.error(ctx, 400, "invalid path\n", keep));
    }
    let fetched = fetch::fetch(ctx, routed(ctx, &target), up_req).await;
    let keep = keep && !ctx.drain.is_fired();
    let (after, result) = respond(conn, ctx, req, target.kind, fetched, keep).await?;
    ctx.metrics.endpoint_finished(label, result);
    Ok(after)
}

/// Turns what the upstreams said into the client's answer.
async fn respond(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    kind: Kind,
    fetched: Fetched,
    keep: bool,
) -> io::Result<(After, EndpointResult)> {
    Ok(match fetched {
        Fetched::Found { upstream, resp } => {
            return answer(conn, ctx, req, kind, *resp, upstream, keep).await
        }
        Fetched::Miss => (
            conn.error(ctx, 404, "not found\n", keep),
            EndpointResult::NotFound,
        ),
        Fetched::Unavailable { timed_out } => {
            let status = if timed_out { 504 } else { 502 };
            let msg = "no upstream answered usably; try again\n";
            (conn.error(ctx, status, msg, keep), EndpointResult::Error)
        }
        Fetched::Overloaded => (
            crate::serve::narinfo::write_overloaded(conn, ctx, keep),
            EndpointResult::Error,
        ),
    })
}

/// The upstream to ask first: the one whose narinfo route for the path's
/// store hash is live, unless that upstream is DOWN.
fn routed(ctx: &WorkerCtx, target: &Target) -> Option<usize> {
    let hash = target.route?;
    let upstream = match ctx.shared.routes.get(&hash, unix_now())? {
        crate::route::Cached::Hit(h) => h.upstream,
        // The narinfo body is not needed here, only where it came from.
        crate::route::Cached::Cold { upstream } => upstream,
        // A definite narinfo miss says nothing about logs: Hydra keeps the
        // logs of builds whose outputs it never uploaded.
        crate::route::Cached::Negative => return None,
    };
    let url = ctx.shared.routes.slot_url(upstream)?;
    let upstreams = &ctx.shared.upstreams;
    if ctx.shared.routing.route_is_down(upstreams, &url) {
        return None;
    }
    upstreams.load().index_of(&url)
}

async fn answer(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    kind: Kind,
    resp: UpResponse,
    upstream: usize,
    keep: bool,
) -> io::Result<(After, EndpointResult)> {
    if kind == Kind::DebugInfo && req.method == Method::Get && resp.status() == 200 {
        return debuginfo(conn, ctx, resp, upstream, keep).await;
    }
    relay(conn, ctx, req, resp, keep).await
}

/// Reads a debuginfo record, pins its NAR to `upstream`, and answers it.
async fn debuginfo(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    resp: UpResponse,
    upstream: usize,
    keep: bool,
) -> io::Result<(After, EndpointResult)> {
    let mut headers: Vec<(&str, Vec<u8>)> = Vec::with_capacity(PASSED_HEADERS.len());
    for name in PASSED_HEADERS {
        if let Some(v) = resp.header(name) {
            headers.push((name, v.to_vec()));
        }
    }
    let encoded = headers.iter().any(|(n, _)| *n == "Content-Encoding");
    let body = match resp.read_to_end(MAX_DEBUGINFO).await {
        Ok(b) => b,
        Err(e) => {
            let set = ctx.shared.upstreams.load();
            let upstream_url = set.get(upstream).map(|u| u.url.clone());
            tracing::debug!(upstream = ?upstream_url, error = %e, "debuginfo body unreadable");
            let after = conn.error(ctx, 502, "upstream debuginfo unreadable\n", keep);
            return Ok((after, EndpointResult::Error));
        }
    };
    if !encoded {
        pin_archive(ctx, &body, upstream);
    }
    let date = ctx.date();
    let refs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    crate::http::response::write_simple(&mut conn.wbuf, 200, keep, false, &date, &refs, &body);
    Ok((After::keep_if(keep), EndpointResult::Ok))
}

/// Points the debuginfo record's NAR at the upstream that wrote the record,
/// for as long as a route lives (`cache.ttl`).
fn pin_archive(ctx: &WorkerCtx, body: &[u8], upstream: usize) {
    let Some(key) = archive_nar_key(body) else {
        return;
    };
    // Slots are append-only: the index names the same upstream in a newer
    // set unless it was retired, and then there is nothing to pin to.
    if !ctx.shared.upstreams.load().is_live(upstream) {
        return;
    }
    let expires_at = unix_now() + ctx.shared.config.cache.ttl.as_secs();
    // Nothing verified the record: it only fills a free key, never moves
    // a NAR another upstream's narinfo (or an earlier pin) claimed.
    if !ctx.shared.routes.pin_nar(&key, upstream, expires_at) {
        tracing::debug!(nar = %key, upstream, "debuginfo archive names a NAR already routed; not pinned");
    }
}

/// The NAR index key of a debuginfo record's `archive`, resolved against
/// `debuginfo/` the way a client resolves it; `None` unless it lands on a
/// NAR path ncro serves.
pub fn archive_nar_key(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let archive = json.get("archive")?.as_str()?;
    let mut parts: Vec<&str> = vec!["debuginfo"];
    let relative = match archive.strip_prefix('/') {
        Some(abs) => {
            parts.clear();
            abs
        }
        None => archive,
    };
    if relative.contains("://") {
        return None; // another host: nothing of ours to pin
    }
    for seg in relative.split('/') {
        match seg {
            ".." => {
                parts.pop()?;
            }
            "." | "" => {}
            s => parts.push(s),
        }
    }
    let path = format!("/{}", parts.join("/"));
    valid_nar_path(&path).then(|| nar_key(&path).to_owned())
}

/// Streams an upstream answer to the client.
async fn relay(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    mut resp: UpResponse,
    keep: bool,
) -> io::Result<(After, EndpointResult)> {
    let head_only = req.method == Method::Head;
    let (framing, keep) = if head_only {
        let framing = resp.content_length().map_or(Framing::None, Framing::Length);
        (framing, keep)
    } else if resp.is_chunked() && !req.http10 {
        (Framing::Chunked, keep)
    } else if let Some(n) = resp.content_length() {
        (Framing::Length(n), keep)
    } else {
        (Framing::None, false) // the body ends with the connection
    };
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(PASSED_HEADERS.len());
    for name in PASSED_HEADERS {
        if let Some(v) = resp.header(name) {
            headers.push((name, v));
        }
    }
    let date = ctx.date();
    write_head(
        &mut conn.wbuf,
        resp.status(),
        framing,
        keep,
        &date,
        &headers,
    );
    drop(headers);
    conn.flush(ctx).await?;
    if head_only {
        return Ok((After::keep_if(keep), EndpointResult::Ok));
    }
    let relayed = if resp.is_chunked() && req.http10 {
        super::nar::relay_decoded(&mut resp, &mut conn.stream, ctx.shared.config.timeouts.idle)
            .await
    } else {
        let mode = match ctx.shared.config.server.nar_relay {
            NarRelay::Splice => RelayMode::Splice,
            NarRelay::Copy | NarRelay::Auto => RelayMode::Copy,
        };
        resp.relay_to(&mut conn.stream, mode).await
    };
    match relayed {
        Ok(_) => Ok((After::keep_if(keep), EndpointResult::Ok)),
        Err(e) => {
            // The head promised a complete body: only closing says it is not.
            tracing::debug!(path = req.path, error = %e, "side-path relay cut short");
            Ok((After::Close, EndpointResult::Error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debuginfo_archive_resolves_to_a_nar_key() {
        let rec = |archive: &str| {
            let json = serde_json::json!({ "archive": archive, "member": "lib/debug/.build-id/ab/cd.debug" });
            archive_nar_key(json.to_string().as_bytes())
        };
        // What Nix writes: "../" + the narinfo URL.
        assert_eq!(
            rec("../nar/1abc.nar.xz").as_deref(),
            Some("nar/1abc.nar.xz")
        );
        assert_eq!(rec("/nar/1abc.nar").as_deref(), Some("nar/1abc.nar"));
        assert_eq!(rec("./../nar/x.nar.zst").as_deref(), Some("nar/x.nar.zst"));
        for bad in [
            "../../nar/x.nar",       // escapes the cache root
            "nar/x.nar",             // debuginfo/nar/x.nar: not a NAR path we serve
            "https://cdn/nar/x.nar", // another host
            "../log/x.drv",
            "../nar/",
        ] {
            assert_eq!(rec(bad), None, "{bad}");
        }
        assert_eq!(archive_nar_key(b"not json"), None);
        assert_eq!(archive_nar_key(b"{\"archive\": 3}"), None);
    }
}
