//! `GET/HEAD /nar/...`: streamed from the upstream that served the
//! narinfo, else from the others in order, with bounded memory. HOT.

mod canonical;
mod failover;
mod fallback;
mod hedge;
mod ranged;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::config::NarRelay;
use crate::http::client::{
    ClientError, Method as UpMethod, RelayError, RelayMode, Request as UpRequest,
    Response as UpResponse,
};
use crate::http::request::{Method, Request};
use crate::http::response::{write_head, Framing};
use crate::race::FailKind;
use crate::serve::narinfo::fail_kind;
use crate::serve::{After, Conn};
use crate::upstream::UpstreamSet;
use crate::worker::WorkerCtx;
pub use canonical::{Candidate, Candidates, RouteKind};

/// Response headers passed from the upstream to the client.
const PASSED_HEADERS: [&str; 8] = [
    "Accept-Ranges",
    "Location",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Content-Encoding",
];

/// Answers that are the upstream's final word on an object it has (a range
/// or precondition answer, or a redirect to where it keeps it): relayed
/// rather than tried elsewhere.
pub(super) fn is_final(resp: &UpResponse) -> bool {
    let status = resp.status();
    (200..300).contains(&status) || matches!(status, 304 | 412 | 416) || is_absolute_redirect(resp)
}

/// A redirect to an absolute URL, such as the presigned storage URL that
/// Attic answers NAR requests with. Nix follows it (FINDINGS), so it goes
/// to the client as is. A relative one would resolve against ncro itself.
fn is_absolute_redirect(resp: &UpResponse) -> bool {
    let absolute = |l: &[u8]| {
        ["http://", "https://"].iter().any(|scheme| {
            l.get(..scheme.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes()))
        })
    };
    matches!(resp.status(), 301 | 302 | 303 | 307 | 308)
        && resp.header("Location").is_some_and(absolute)
}

pub async fn serve(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    keep: bool,
) -> io::Result<After> {
    // (a) The candidates, best first (canonical.rs): upstream, its real
    // path, how it was chosen; a canonical request's later candidates are
    // proved lazily, by a narinfo fetch each, when they are started.
    let set = ctx.shared.upstreams.load();
    let candidates = match Candidates::plan(ctx, set.clone(), req.target).await {
        Ok(c) => c,
        Err(refusal) => {
            conn.mark_nar_failed();
            return Ok(conn.error(ctx, refusal.status, refusal.body, keep));
        }
    };
    let fwd = forwarded_headers(req);
    let ask = hedge::Ask {
        method: upstream_method(req),
        headers: &fwd,
        // Another upstream's answer is the same file only when its
        // narinfo proved it (canonical) or the path names the file's hash
        // (docs/nar-failover.md); other names are asked one upstream at a
        // time, as before hedging.
        hedge: candidates.is_canonical() || failover::names_file_hash(req.target),
    };
    // (b) The first body to start, hedged (hedge.rs).
    let opened = hedge::open(ctx, &set, candidates, ask).await;
    match opened {
        hedge::Opened::Won(won) => {
            // (c) Relayed, with mid-stream failover to the candidates left.
            let from = Source {
                candidate: won.candidate,
                rest: won.rest,
            };
            let relayed = relay(conn, ctx, req, won.resp, from, keep).await;
            drop(won.stream);
            relayed
        }
        hedge::Opened::Full => {
            conn.mark_nar_failed();
            Ok(write_busy(conn, ctx, keep))
        }
        hedge::Opened::Failed(failures) => {
            unserved(conn, ctx, req, &fwd, &set, failures, keep).await
        }
    }
}

/// No upstream served the NAR: the `[fallback_cache]`'s one try with the
/// request as received, else the error `failures` add up to.
async fn unserved(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    fwd: &[(&str, &[u8])],
    set: &Arc<UpstreamSet>,
    mut failures: Failures,
    keep: bool,
) -> io::Result<After> {
    let up_req = upstream_request(req, fwd);
    let last = fallback::try_once(conn, ctx, req, &up_req, set, &mut failures, keep).await?;
    if let Some(after) = last {
        return Ok(after);
    }
    conn.mark_nar_failed();
    Ok(match failures.status_code() {
        404 => conn.error(ctx, 404, "not found\n", keep),
        s => conn.error(ctx, s, "no upstream could serve this NAR\n", keep),
    })
}

/// Every upstream holding the NAR was at its `max_concurrent_requests`
/// for the whole wait: 503 with `Retry-After`, which Nix retries.
fn write_busy(conn: &mut Conn, ctx: &WorkerCtx, keep: bool) -> After {
    let date = ctx.date();
    crate::http::response::write_simple(
        &mut conn.wbuf,
        503,
        keep,
        conn.head_request,
        &date,
        &[
            ("Retry-After", b"1"),
            ("Content-Type", b"text/plain; charset=utf-8"),
        ],
        b"every upstream holding this NAR is at its request limit; retry shortly\n",
    );
    After::keep_if(keep)
}

/// `X-Ncro-Upstream` for slot `i` of `set`, or for the fallback cache.
fn upstream_host<'a>(ctx: &'a WorkerCtx, set: &'a UpstreamSet, i: usize) -> Option<&'a str> {
    if i == crate::upstream::fallback::SLOT {
        return ctx.shared.fallback.as_ref().map(|f| &*f.upstream.host);
    }
    set.get(i).map(|up| &*up.host)
}

/// The client's header fields that go upstream with a NAR request.
fn forwarded_headers<'a>(req: &Request<'a>) -> Vec<(&'static str, &'a [u8])> {
    let mut fwd = Vec::with_capacity(4);
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
    fwd
}

fn upstream_method(req: &Request<'_>) -> UpMethod {
    if req.method == Method::Head {
        UpMethod::Head
    } else {
        UpMethod::Get
    }
}

/// The request sent upstream for a client's NAR request: its target
/// (query included) and the [`forwarded_headers`].
fn upstream_request<'a>(req: &Request<'a>, fwd: &'a [(&'a str, &'a [u8])]) -> UpRequest<'a> {
    UpRequest {
        method: upstream_method(req),
        path: req.target,
        headers: fwd,
    }
}

/// Whether a NAR request can be forwarded exactly as the upstream client
/// would send it (bytes and size of its target and forwarded headers).
/// Checked before any upstream is asked: a request ncro cannot forward is
/// the client's fault (400), never an upstream failure.
pub fn forwardable(req: &Request<'_>) -> Result<(), ClientError> {
    let fwd = forwarded_headers(req);
    upstream_request(req, &fwd).check_forwardable()
}

/// What the upstreams that did not serve a NAR said, folded into the
/// client's status the way narinfo lookups do it: 404 only when every one
/// gave a definite miss, 504 when the rest only timed out, 502 otherwise.
#[derive(Debug, Default)]
pub struct Failures {
    /// Some upstream gave no definite answer (error or unexpected status).
    transient: bool,
    /// Some upstream failed other than by a timeout.
    other_than_timeout: bool,
}

impl Failures {
    fn status(&mut self, status: u16) {
        if !matches!(status, 403 | 404 | 410) {
            self.transient = true;
            self.other_than_timeout = true;
        }
    }

    fn error(&mut self, e: &ClientError) {
        self.transient = true;
        self.other_than_timeout |= !e.is_timeout();
    }

    /// A narinfo fetch (a canonical candidate's proof) that failed.
    fn failed(&mut self, kind: FailKind) {
        self.transient = true;
        self.other_than_timeout |= kind != FailKind::Timeout;
    }

    /// A canonical candidate that could not prove the promised file.
    fn no_proof(&mut self, why: canonical::NoProof) {
        match why {
            canonical::NoProof::NotHeld => self.status(404),
            canonical::NoProof::Failed(kind) => self.failed(kind),
        }
    }

    fn status_code(&self) -> u16 {
        match (self.transient, self.other_than_timeout) {
            (false, _) => 404,
            (true, false) => 504,
            (true, true) => 502,
        }
    }
}

/// The candidate whose answer is relayed, and those not asked yet, best
/// first: the candidates for a mid-stream failover.
pub(super) struct Source {
    pub candidate: Candidate,
    pub rest: Candidates,
}

/// Relays `resp`, the answer of `from.candidate`, with `X-Ncro-Upstream`
/// and `X-Ncro-Route` (the candidate's `kind`).
pub(super) async fn relay(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    resp: UpResponse,
    from: Source,
    keep: bool,
) -> io::Result<After> {
    // Large NARs: parallel ranges when the upstream allows (ranged.rs).
    let (mut resp, from) = match ranged::try_relay(conn, ctx, req, resp, from, keep).await {
        ranged::Ranged::Done(after) => return after,
        ranged::Ranged::Declined(resp, from) => (resp, from),
    };
    let upstream = from.candidate.upstream;
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
    let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(PASSED_HEADERS.len() + 2);
    for name in PASSED_HEADERS {
        if let Some(v) = resp.header(name) {
            headers.push((name, v));
        }
    }
    let host = upstream_host(ctx, from.rest.set(), upstream);
    if let Some(host) = host {
        headers.push(("X-Ncro-Upstream", host.as_bytes()));
    }
    headers.push(("X-Ncro-Route", from.candidate.kind.as_str().as_bytes()));
    let date = ctx.date();
    write_head(&mut conn.wbuf, status, framing, keep, &date, &headers);
    drop(headers);
    conn.flush(ctx).await?;
    if head_only {
        return Ok(After::keep_if(keep));
    }
    let mode = match ctx.shared.config.server.nar_relay {
        NarRelay::Copy => RelayMode::Copy,
        // Measured (docs/benchmarks.md): splice costs the proxy 0.4x the CPU
        // per GB of copying, on both drivers (direct non-blocking calls, no
        // io-wq threads). It applies to plain-TCP Content-Length bodies;
        // TLS and chunked bodies are copied whatever the mode.
        NarRelay::Splice | NarRelay::Auto => RelayMode::Splice,
    };
    let relayed = if resp.is_chunked() && req.http10 {
        relay_decoded(&mut resp, &mut conn.stream, ctx.shared.config.timeouts.idle).await
    } else {
        resp.relay_to(&mut conn.stream, mode).await
    };
    let sent = match &relayed {
        Ok(n) => *n,
        Err(e) => e.sent(),
    };
    if let Some(u) = ctx.metrics.upstreams.get(upstream) {
        u.nar_bytes.add(sent);
    }
    ctx.metrics.nar_bytes.add(sent);
    let error = match relayed {
        Ok(_) => return Ok(After::keep_if(keep)),
        // Clients cancel downloads all the time: not ncro's problem.
        Err(e @ RelayError::Client { .. }) => {
            tracing::debug!(path = req.path, error = %e, "client went away during a NAR relay");
            conn.mark_nar_failed();
            return Ok(After::Close);
        }
        Err(RelayError::Upstream { error, .. }) => error,
    };
    // Without the cooldown, the client's Range resume would be routed
    // straight back to the upstream that cut it.
    ctx.shared.routing.failed(upstream, fail_kind(&error));
    let object = if !ctx.shared.config.server.nar_failover || (req.http10 && resp.is_chunked()) {
        None
    } else {
        failover::Object::of(&resp, &from.candidate.path)
    };
    drop(resp);
    let Some(object) = object else {
        tracing::warn!(path = req.path, sent, error = %error, "NAR relay cut short by the upstream; no failover (disabled, or the length is unknown); closing the client connection");
        conn.mark_nar_failed();
        return Ok(After::Close);
    };
    tracing::debug!(path = req.path, sent, error = %error, "NAR relay cut short by the upstream; continuing from another upstream");
    let cut = failover::Cut {
        path: from.candidate.path.clone(),
        object,
        sent,
    };
    continue_elsewhere(conn, ctx, req, cut, from, mode, keep).await
}

/// Finishes a cut body from the upstreams not asked yet, or closes the
/// client connection when none can.
async fn continue_elsewhere(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    mut cut: failover::Cut,
    from: Source,
    mode: RelayMode,
    keep: bool,
) -> io::Result<After> {
    let before = cut.sent;
    let mut rest = from.rest;
    let resumed = failover::resume(ctx, &mut rest, &mut conn.stream, mode, &mut cut).await;
    ctx.metrics.nar_bytes.add(cut.sent - before);
    if resumed == failover::Resumed::Completed {
        return Ok(After::keep_if(keep));
    }
    if resumed == failover::Resumed::GaveUp {
        tracing::warn!(
            path = req.path,
            sent = cut.sent,
            "no other upstream could continue the NAR; closing the client connection"
        );
    }
    // The head promised a complete body; closing the connection is the
    // only way to tell the client it did not get one (Nix then resumes
    // with a Range request).
    conn.mark_nar_failed();
    Ok(After::Close)
}

/// Relays a chunked upstream body without its framing, for an HTTP/1.0
/// client: it cannot parse chunks, so its body ends with the connection
/// (`relay_to` would pass the chunk-size lines through). Rare, so one
/// small copy per piece is fine.
pub(super) async fn relay_decoded(
    resp: &mut UpResponse,
    dst: &mut TcpStream,
    idle: Duration,
) -> Result<u64, RelayError> {
    let mut sent = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match resp.read_chunk().await {
            Ok(Some(piece)) => {
                buf.clear();
                buf.extend_from_slice(piece);
            }
            Ok(None) => return Ok(sent),
            Err(error) => return Err(RelayError::Upstream { error, sent }),
        }
        let n = buf.len() as u64;
        let (written, back) = match monoio::time::timeout(idle, dst.write_all(buf)).await {
            Ok(r) => r,
            Err(_) => {
                let error = io::Error::new(io::ErrorKind::TimedOut, "client write timed out");
                return Err(RelayError::Client { error, sent });
            }
        };
        if let Err(error) = written {
            return Err(RelayError::Client { error, sent });
        }
        buf = back;
        sent += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_fold_into_404_502_or_504() {
        let fold = |steps: &[Result<u16, ClientError>]| {
            let mut f = Failures::default();
            for s in steps {
                match s {
                    Ok(status) => f.status(*status),
                    Err(e) => f.error(e),
                }
            }
            f.status_code()
        };
        assert_eq!(fold(&[]), 404, "nobody asked: nothing to relay");
        assert_eq!(fold(&[Ok(404), Ok(403), Ok(410)]), 404);
        assert_eq!(fold(&[Ok(404), Err(ClientError::FirstByteTimeout)]), 504);
        assert_eq!(fold(&[Err(ClientError::ConnectTimeout)]), 504);
        assert_eq!(fold(&[Err(ClientError::FirstByteTimeout), Ok(500)]), 502);
        assert_eq!(fold(&[Err(ClientError::ConnectionClosed)]), 502);
        assert_eq!(fold(&[Ok(302), Ok(404)]), 502, "a relative redirect");
    }
}
