//! `GET/HEAD /nar/...`: streamed from the upstream that served the
//! narinfo, else from the others in order, with bounded memory. HOT.

use std::io;

use crate::config::NarRelay;
use crate::http::client::{
    Method as UpMethod, RelayMode, Request as UpRequest, Response as UpResponse,
};
use crate::http::request::{Method, Request};
use crate::http::response::{write_head, Framing};
use crate::route;
use crate::serve::{After, Conn};
use crate::worker::{unix_now, WorkerCtx};

/// Response headers passed from the upstream to the client.
const PASSED_HEADERS: [&str; 7] = [
    "Accept-Ranges",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Content-Encoding",
];

/// Statuses that are the upstream's final word on an object it has (a range
/// or precondition answer): relayed rather than tried elsewhere.
fn is_final(status: u16) -> bool {
    (200..300).contains(&status) || matches!(status, 304 | 412 | 416)
}

pub async fn serve(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    keep: bool,
) -> io::Result<After> {
    let set = ctx.shared.upstreams.clone();
    let key = route::nar_key(req.path);
    let routed = ctx
        .shared
        .routes
        .nar_upstream(key, unix_now())
        .and_then(|u| set.index_of(&u));
    let order = ctx
        .shared
        .routing
        .nar_order(routed, std::time::Instant::now());

    let mut fwd: Vec<(&str, &[u8])> = Vec::with_capacity(4);
    for (name, v) in [
        ("Range", req.range),
        ("If-Range", req.if_range),
        ("If-None-Match", req.if_none_match),
        ("If-Modified-Since", req.if_modified_since),
    ] {
        if let Some(v) = v {
            fwd.push((name, v));
        }
    }
    let method = if req.method == Method::Head {
        UpMethod::Head
    } else {
        UpMethod::Get
    };
    let up_req = UpRequest {
        method,
        path: req.target,
        headers: &fwd,
    };
    let mut transient = false;
    for i in order {
        let up = &set.list[i];
        match ctx.client.send(&up.origin, &up_req).await {
            Ok(resp) if is_final(resp.status()) => {
                return relay(conn, ctx, req, resp, i, keep).await
            }
            Ok(resp) => {
                let s = resp.status();
                transient |= !matches!(s, 403 | 404 | 410);
                tracing::debug!(upstream = %up.url, status = s, path = req.path, "NAR not served here; trying the next upstream");
            }
            Err(e) => {
                transient = true;
                ctx.shared
                    .routing
                    .failed(i, crate::serve::narinfo::fail_kind(&e));
                tracing::debug!(upstream = %up.url, error = %e, path = req.path, "NAR request failed; trying the next upstream");
            }
        }
    }
    ctx.metrics.nar_errors.inc();
    Ok(if transient {
        conn.error(ctx, 502, "no upstream could serve this NAR\n", keep)
    } else {
        conn.error(ctx, 404, "not found\n", keep)
    })
}

async fn relay(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    mut resp: UpResponse,
    upstream: usize,
    keep: bool,
) -> io::Result<After> {
    let status = resp.status();
    let head_only = req.method == Method::Head || status == 304;
    let (framing, keep) = if head_only {
        (
            resp.content_length().map_or(Framing::None, Framing::Length),
            keep,
        )
    } else if resp.is_chunked() && !req.http10 {
        (Framing::Chunked, keep)
    } else if let Some(n) = resp.content_length() {
        (Framing::Length(n), keep)
    } else {
        // Length unknown and no chunking possible: the end of the body is
        // the end of the connection.
        (Framing::None, false)
    };
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(PASSED_HEADERS.len());
    for name in PASSED_HEADERS {
        if let Some(v) = resp.header(name) {
            headers.push((name, v));
        }
    }
    let date = ctx.date();
    write_head(&mut conn.wbuf, status, framing, keep, &date, &headers);
    drop(headers);
    conn.flush(ctx).await?;
    if head_only {
        return Ok(if keep { After::KeepAlive } else { After::Close });
    }
    let mode = match ctx.shared.config.server.nar_relay {
        NarRelay::Copy => RelayMode::Copy,
        NarRelay::Splice => RelayMode::Splice,
        // Measured (docs/benchmarks.md): splice wins on epoll and loses under
        // concurrency on io_uring, where every splice runs on an io-wq thread.
        NarRelay::Auto if ctx.driver == "epoll" => RelayMode::Splice,
        NarRelay::Auto => RelayMode::Copy,
    };
    let result = resp.relay_to(&mut conn.stream, mode).await;
    let sent = match &result {
        Ok(n) => *n,
        Err(e) => e.sent(),
    };
    if let Some(u) = ctx.metrics.upstreams.get(upstream) {
        u.nar_bytes.add(sent);
    }
    match result {
        Ok(n) => {
            ctx.metrics.nar_bytes.add(n);
            Ok(if keep { After::KeepAlive } else { After::Close })
        }
        Err(e) => {
            ctx.metrics.nar_bytes.add(e.sent());
            ctx.metrics.nar_errors.inc();
            // The head promised a complete body; closing the connection is
            // the only way to tell the client it did not get one (Nix then
            // resumes with a Range request).
            tracing::warn!(path = req.path, error = %e, "NAR relay cut short; closing the client connection");
            Ok(After::Close)
        }
    }
}
