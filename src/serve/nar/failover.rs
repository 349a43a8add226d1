//! Mid-stream NAR failover: when the upstream relaying a NAR body dies or
//! stalls, the rest of the same response comes from another upstream that
//! proves it holds the same object, by a `Range` request from the first
//! byte the client does not have yet (docs/nar-failover.md).
//!
//! The proof is conservative: the other upstream must answer 206 with a
//! `Content-Range` of exactly the missing bytes of an object of exactly the
//! same total size, the same `Content-Encoding`, and either the URL names
//! the object's hash (`nar/<52-char nix-base32 FileHash>.<ext>`, as Nix
//! writes it) or both upstreams sent the same strong `ETag`. Anything else
//! is not spliced in; the client connection is then closed as before, and
//! Nix resumes with a `Range` request of its own.

use std::rc::Rc;

use monoio::net::TcpStream;

use crate::http::client::{
    Method as UpMethod, RelayError, RelayMode, Request as UpRequest, Response as UpResponse,
};
use crate::metrics::FailoverResult;
use crate::serve::narinfo::{discard_body, fail_kind};
use crate::worker::WorkerCtx;

use super::{Candidates, Failures};

/// The object a cut response was relaying, as far as its head told: which
/// bytes of it the response carried and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Offset in the object of the response's first body byte.
    start: u64,
    /// Offset of its last body byte (inclusive).
    end: u64,
    total: u64,
    etag: Option<Vec<u8>>,
    encoding: Option<Vec<u8>>,
    /// The URL names the object's hash, so equal URLs mean equal objects.
    content_addressed: bool,
}

impl Object {
    /// What `resp` (the head already sent to the client) promised, when it
    /// is precise enough to continue elsewhere: a Content-Length framed 200,
    /// or a 206 with a single, complete `Content-Range`.
    pub fn of(resp: &UpResponse, path: &str) -> Option<Object> {
        let len = resp.content_length().filter(|&n| n > 0)?;
        if resp.is_chunked() {
            return None;
        }
        let (start, end, total) = match resp.status() {
            200 => (0, len - 1, len),
            206 => parse_content_range(resp.header("Content-Range")?)?,
            _ => return None,
        };
        if end - start + 1 != len {
            return None;
        }
        Some(Object {
            start,
            end,
            total,
            etag: strong_etag(resp),
            encoding: resp.header("Content-Encoding").map(<[u8]>::to_vec),
            content_addressed: names_file_hash(path),
        })
    }

    /// The response's first and last body byte in the object (inclusive),
    /// and whether its URL names the object's hash.
    pub(super) fn span(&self) -> (u64, u64, bool) {
        (self.start, self.end, self.content_addressed)
    }

    /// Whether a strong ETag identifies the object.
    pub(super) fn has_etag(&self) -> bool {
        self.etag.is_some()
    }

    /// Whether `resp`, answering a request for the bytes from `offset` on,
    /// carries exactly those bytes of this same object. `known_same`: its
    /// identity is already proved (the same content-addressed path, or
    /// narinfos that describe the same file), so no ETag is needed.
    fn continued_by(&self, resp: &UpResponse, offset: u64, known_same: bool) -> bool {
        self.carries(resp, offset, self.end, known_same)
    }

    /// Whether `resp`, answering a request for the bytes `from..=to` of
    /// this object, carries exactly those bytes of it (see
    /// [`Object::continued_by`]). Used by parallel ranges (ranged.rs).
    pub(super) fn carries(&self, resp: &UpResponse, from: u64, to: u64, known_same: bool) -> bool {
        let range = resp.header("Content-Range").and_then(parse_content_range);
        let same_bytes = resp.status() == 206
            && !resp.is_chunked()
            && range == Some((from, to, self.total))
            && resp.content_length() == Some(to - from + 1);
        let same_encoding = resp.header("Content-Encoding") == self.encoding.as_deref();
        let same_object = known_same
            || self
                .etag
                .as_deref()
                .is_some_and(|e| strong_etag(resp).as_deref() == Some(e));
        same_bytes && same_encoding && same_object
    }
}

/// `bytes S-E/T` with a known total; None for anything else.
fn parse_content_range(v: &[u8]) -> Option<(u64, u64, u64)> {
    let v = std::str::from_utf8(v).ok()?.trim();
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (s, e, t): (u64, u64, u64) = (s.parse().ok()?, e.parse().ok()?, total.parse().ok()?);
    (s <= e && e < t).then_some((s, e, t))
}

/// A strong ETag: a weak one only says "equivalent", not "same bytes".
fn strong_etag(resp: &UpResponse) -> Option<Vec<u8>> {
    resp.header("ETag")
        .filter(|e| !e.starts_with(b"W/") && e.len() > 2)
        .map(<[u8]>::to_vec)
}

/// Whether the file name of the NAR path is a sha256 in nix-base32 (the
/// FileHash Nix names NAR files by), followed by an extension.
pub(super) fn names_file_hash(path: &str) -> bool {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let name = path.rsplit('/').next().unwrap_or_default();
    let stem = name.split_once('.').map_or(name, |(s, _)| s);
    stem.len() == 52 && stem.bytes().all(|b| ALPHABET.contains(&b))
}

/// Where a cut relay stands when failover begins.
pub struct Cut {
    /// The path the cut response was asked for.
    pub path: Rc<str>,
    pub object: Object,
    /// Body bytes the client already has from this response.
    pub sent: u64,
}

/// How the failover ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The client got the whole body.
    Completed,
    /// No upstream could finish it: the client connection must close.
    GaveUp,
    /// The client went away while the rest was relayed.
    ClientGone,
}

/// What the alternatives did, folded into the metric's result.
#[derive(Debug, Default)]
struct Tally {
    /// Some upstream answered 2xx but could not prove the same object.
    mismatch: bool,
    /// Some upstream was spliced in and then failed too.
    spliced: bool,
}

impl Tally {
    fn result(&self) -> FailoverResult {
        if self.spliced {
            FailoverResult::Failed
        } else if self.mismatch {
            FailoverResult::Mismatch
        } else {
            FailoverResult::NoAlternative
        }
    }
}

/// Continues `cut` on `dst` from the `candidates` not asked yet (best
/// first, each asked at most once, at its own path: for a canonical
/// request only those whose narinfo proved the same file).
/// `cut.sent` grows by every byte relayed, whatever the outcome.
pub async fn resume(
    ctx: &WorkerCtx,
    candidates: &mut Candidates,
    dst: &mut TcpStream,
    mode: RelayMode,
    cut: &mut Cut,
) -> Resumed {
    let mut tally = Tally::default();
    let set = candidates.set().clone();
    // What candidates that could not prove the file said: not needed here.
    let mut unproved = Failures::default();
    while let Some(pending) = candidates.take(&mut unproved) {
        let i = pending.upstream();
        let Some(up) = set.live(i) else { continue };
        // A stream like any other under `max_concurrent_requests`, taken
        // before the proof so that a full upstream costs no request.
        let Some(_stream) = super::hedge::Held::take(ctx, i, up) else {
            continue;
        };
        let Ok(c) = pending.prove(ctx, &set).await else {
            continue;
        };
        let offset = cut.object.start + cut.sent;
        let range = format!("bytes={offset}-{}", cut.object.end);
        let headers = [("Range", range.as_bytes())];
        let req = UpRequest {
            method: UpMethod::Get,
            path: &c.path,
            headers: &headers,
        };
        let mut resp = match ctx.client.send(up.nar_origin(), &req).await {
            Ok(resp) => resp,
            Err(e) => {
                if !e.is_request_fault() {
                    ctx.shared.routing.failed(i, fail_kind(&e));
                }
                tracing::debug!(upstream = %up.url, error = %e, path = &*c.path, "NAR failover: request failed");
                continue;
            }
        };
        if let Some(t) = up.nar.timeout {
            resp.set_read_timeout(t);
        }
        let same_name = cut.object.content_addressed && c.path == cut.path;
        if !cut
            .object
            .continued_by(&resp, offset, c.proven || same_name)
        {
            tally.mismatch |= (200..300).contains(&resp.status());
            tracing::debug!(upstream = %up.url, status = resp.status(), path = &*c.path, "NAR failover: not provably the same object; not spliced in");
            discard_body(resp);
            continue;
        }
        tally.spliced = true;
        let relayed = resp.relay_to(dst, mode).await;
        let n = relayed.as_ref().map_or_else(RelayError::sent, |n| *n);
        cut.sent += n;
        if let Some(u) = ctx.metrics.upstreams.get(i) {
            u.nar_bytes.add(n);
        }
        match relayed {
            Ok(_) => {
                ctx.metrics.nar_failed_over(FailoverResult::Completed);
                tracing::info!(upstream = %up.url, path = &*c.path, from = offset, "NAR failover completed the body");
                return Resumed::Completed;
            }
            Err(RelayError::Client { .. }) => return Resumed::ClientGone,
            Err(RelayError::Upstream { error, .. }) => {
                ctx.shared.routing.failed(i, fail_kind(&error));
                tracing::warn!(upstream = %up.url, path = &*c.path, error = %error, "NAR failover: the next upstream cut it too");
            }
        }
    }
    ctx.metrics.nar_failed_over(tally.result());
    Resumed::GaveUp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_needs_a_known_total_and_a_sane_range() {
        assert_eq!(parse_content_range(b"bytes 0-9/10"), Some((0, 9, 10)));
        assert_eq!(parse_content_range(b"bytes 5-9/100"), Some((5, 9, 100)));
        assert_eq!(parse_content_range(b"bytes 5-9/*"), None);
        assert_eq!(parse_content_range(b"bytes */10"), None);
        assert_eq!(parse_content_range(b"bytes 9-5/10"), None);
        assert_eq!(parse_content_range(b"bytes 0-10/10"), None);
        assert_eq!(parse_content_range(b"items 0-9/10"), None);
    }

    #[test]
    fn only_file_hash_names_are_content_addressed() {
        let h = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3";
        assert!(names_file_hash(&format!("/nar/{h}.nar.xz")));
        assert!(names_file_hash(&format!("nar/{h}.nar?hash=x")));
        assert!(!names_file_hash("/nar/abc.nar"));
        // 'e', 'o', 't' and 'u' are not in the nix-base32 alphabet.
        let bad = h.replace('1', "e");
        assert!(!names_file_hash(&format!("/nar/{bad}.nar")));
        // A store-path hash (32 characters), as some caches use.
        assert!(!names_file_hash(
            "/nar/0c2kb5n5bj6y6nm1nbcbc4m0akasqiam.nar"
        ));
    }
}
