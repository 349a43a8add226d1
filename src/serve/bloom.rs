//! `GET/HEAD /bloom-filter`: ncro's own NixBloom filter of the routes it
//! knows, as the control thread last built it (docs/index-routing.md).
//! Served from memory with an ETag; `If-None-Match` gets a 304. 404 while
//! publishing is off (`index.publish = false`) or before the first build.

use crate::http::request::Request;
use crate::http::response::{write_head, write_simple, Framing};
use crate::serve::{After, Conn};
use crate::worker::WorkerCtx;

pub fn serve(conn: &mut Conn, ctx: &WorkerCtx, req: &Request<'_>, keep: bool) -> After {
    let head = req.method == crate::http::request::Method::Head;
    let Some(filter) = ctx.shared.index.published() else {
        return conn.error(ctx, 404, "no filter published\n", keep);
    };
    let date = ctx.date();
    let max_age = format!(
        "max-age={}",
        ctx.shared.config.index.publish_interval.as_secs()
    );
    let headers: [(&str, &[u8]); 3] = [
        ("Content-Type", b"application/octet-stream"),
        ("ETag", filter.etag.as_bytes()),
        ("Cache-Control", max_age.as_bytes()),
    ];
    if req.if_none_match == Some(filter.etag.as_bytes()) {
        write_head(&mut conn.wbuf, 304, Framing::None, keep, &date, &headers);
    } else {
        write_simple(
            &mut conn.wbuf,
            200,
            keep,
            head,
            &date,
            &headers,
            &filter.body,
        );
    }
    After::keep_if(keep)
}
