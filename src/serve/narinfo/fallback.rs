//! The `[fallback_cache]` on the narinfo side, and the provenance headers
//! of a served narinfo.

use std::sync::Arc;

use bytes::Bytes;

use crate::http::response::write_simple;
use crate::proto::store_path::StoreHash;
use crate::race::{Attempt, FailKind, RejectKind, Verdict};
use crate::route::Hit;
use crate::serve::Conn;
use crate::upstream::fallback::{Fallback, SLOT};
use crate::worker::{Resolved, Via, WorkerCtx};

/// Asks the fallback cache for `hash` once, after a race in which no
/// upstream could answer. A verified narinfo is served but never stored
/// (no route, no negative entry): the next request races the upstreams
/// again. Its 404 answers 404; anything else (a failure, a timeout, a bad
/// signature, a garbled body) answers 502.
pub(super) async fn ask(
    ctx: &WorkerCtx,
    fb: &Arc<Fallback>,
    hash: StoreHash,
    path: &str,
) -> Resolved {
    let up = &fb.upstream;
    fb.asked();
    let fetch = super::fetch_narinfo(&ctx.client, &up.origin, path);
    let attempt = monoio::time::timeout(fb.narinfo_timeout, fetch)
        .await
        .unwrap_or(Attempt::Failed(FailKind::Timeout));
    let unavailable = Resolved::Unavailable { timed_out: false };
    match attempt {
        Attempt::Found(body) => match super::judge(up, hash, &body) {
            Verdict::Accept((_, narinfo)) => {
                tracing::debug!(%hash, upstream = %up.url, "narinfo served by the fallback cache");
                found(narinfo)
            }
            Verdict::Reject(RejectKind::WrongStorePath) => Resolved::Miss,
            Verdict::Reject(kind) => {
                if kind == RejectKind::BadSignature {
                    ctx.metrics.bad_signatures.inc();
                }
                tracing::warn!(%hash, upstream = %up.url, reason = kind.label(), "fallback cache narinfo refused");
                unavailable
            }
        },
        Attempt::NotFound => Resolved::Miss,
        Attempt::Failed(kind) => {
            tracing::debug!(%hash, upstream = %up.url, error = kind.label(), "fallback cache gave no answer");
            unavailable
        }
    }
}

fn found(narinfo: Bytes) -> Resolved {
    Resolved::Found(
        Hit {
            upstream: SLOT,
            narinfo,
        },
        Via::Fallback,
    )
}

const NARINFO_TYPE: (&str, &[u8]) = ("Content-Type", b"text/x-nix-narinfo");
const UNKNOWN: &[u8] = b"unknown";

/// Buffers the 200 answer for a found narinfo (or its head), with
/// `X-Ncro-Upstream` (the host computed when the upstream was built,
/// copied as is) and `X-Ncro-Route`.
pub fn write_found(conn: &mut Conn, ctx: &WorkerCtx, keep: bool, head: bool, hit: &Hit, via: Via) {
    let date = ctx.date();
    let route = ("X-Ncro-Route", via.label());
    if via == Via::Fallback {
        let host = ctx
            .shared
            .fallback
            .as_ref()
            .map_or(UNKNOWN, |f| f.upstream.host.as_bytes());
        let headers = [NARINFO_TYPE, ("X-Ncro-Upstream", host), route];
        write_simple(
            &mut conn.wbuf,
            200,
            keep,
            head,
            &date,
            &headers,
            &hit.narinfo,
        );
    } else {
        let set = ctx.shared.upstreams.peek();
        let host = set.get(hit.upstream).map_or(UNKNOWN, |u| u.host.as_bytes());
        let headers = [NARINFO_TYPE, ("X-Ncro-Upstream", host), route];
        write_simple(
            &mut conn.wbuf,
            200,
            keep,
            head,
            &date,
            &headers,
            &hit.narinfo,
        );
    }
}
