//! The one NAR try at the `[fallback_cache]`, after every upstream failed.

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use super::{is_final, relay, Candidate, Candidates, Failures, RouteKind, Source};
use crate::http::client::Request as UpRequest;
use crate::http::request::Request;
use crate::serve::narinfo::discard_body;
use crate::serve::{After, Conn};
use crate::upstream::fallback::SLOT;
use crate::upstream::UpstreamSet;
use crate::worker::WorkerCtx;

/// Sends the client's request (its path and query as received, its
/// forwarded headers) to the fallback cache once. Its answer is relayed
/// when it is one an upstream's would be; otherwise it joins `failures`
/// and `None` lets the caller answer the error. No cooldown, health or
/// per-upstream metric is touched, and a body cut mid-stream is not
/// continued elsewhere (the upstreams already failed).
pub(super) async fn try_once(
    conn: &mut Conn,
    ctx: &WorkerCtx,
    req: &Request<'_>,
    up_req: &UpRequest<'_>,
    set: &Arc<UpstreamSet>,
    failures: &mut Failures,
    keep: bool,
) -> io::Result<Option<After>> {
    let Some(fb) = &ctx.shared.fallback else {
        return Ok(None);
    };
    let url = &fb.upstream.url;
    fb.asked();
    match ctx.client.send(&fb.upstream.origin, up_req).await {
        Ok(mut resp) if is_final(&resp) => {
            if let Some(t) = fb.upstream.nar.timeout {
                resp.set_read_timeout(t);
            }
            tracing::debug!(upstream = %url, path = req.path, "NAR served by the fallback cache");
            let from = Source {
                candidate: Candidate {
                    upstream: SLOT,
                    path: Rc::from(up_req.path),
                    kind: RouteKind::Fallback,
                    proven: false,
                },
                rest: Candidates::none(set.clone()),
            };
            relay(conn, ctx, req, resp, from, keep).await.map(Some)
        }
        Ok(resp) => {
            failures.status(resp.status());
            tracing::debug!(upstream = %url, status = resp.status(), path = req.path, "NAR not served by the fallback cache");
            discard_body(resp);
            Ok(None)
        }
        Err(e) => {
            failures.error(&e);
            tracing::debug!(upstream = %url, error = %e, path = req.path, "NAR request to the fallback cache failed");
            Ok(None)
        }
    }
}
