//! The candidates of a NAR request: which upstreams may serve it, at which
//! path, and how each was chosen (docs/nar-failover.md, "Canonical NAR
//! URLs").
//!
//! A request for a canonical path, `/nar/<store hash><ext>` (what
//! `nar_url_mode = "to_self"` puts in narinfos), names a store path, not a
//! file. The file the client was promised is the one the narinfo it got
//! describes: that of the stored route. So:
//!
//! - the routed upstream comes first, at its own real NAR path (its
//!   narinfo's `URL:`), and only if the requested extension is its file's;
//! - any other upstream is a candidate only once its own narinfo for the
//!   store hash (fetched when the candidate is needed, verified under its
//!   keys and filters as a race would) describes the **same file**: same
//!   NarHash, Compression, FileHash and FileSize
//!   ([`crate::proto::narinfo::same_file`]); never another compression or
//!   another file under the name the client was promised;
//! - with no route (a fresh database, another node of a farm) the store
//!   hash is resolved like a narinfo request (route cache, read-back, race),
//!   which also stores the route.
//!
//! Any other NAR path, and one the NAR index knows as an upstream's real
//! file name, is forwarded unchanged to every candidate, the indexed
//! upstream first, as before.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::narinfo::{canonical_request, is_absolute, nar_ext, same_file, NarInfo};
use crate::proto::store_path::StoreHash;
use crate::race::{Attempt, FailKind, Verdict};
use crate::route::{self, NarSource};
use crate::serve::narinfo::{self as narinfo_serve, Resolved};
use crate::upstream::UpstreamSet;
use crate::worker::{unix_now, WorkerCtx};

use super::Failures;

/// How the upstream that answers a NAR request was chosen; sent to the
/// client as `X-Ncro-Route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// A stored route (the store hash's route, or the NAR index) chose it.
    CacheHit,
    /// No stored route: the first candidate that served it.
    Direct,
    /// An extra candidate started by NAR hedging won (set by the hedging).
    Hedge,
    /// The fallback cache served it (set by the fallback).
    Fallback,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::CacheHit => "cache-hit",
            RouteKind::Direct => "direct",
            RouteKind::Hedge => "hedge",
            RouteKind::Fallback => "fallback",
        }
    }
}

/// One upstream that may serve a NAR request. The request goes to
/// `set.list[upstream].nar_origin()` (its `storage_url`, else its URL) as
/// `GET/HEAD <path>` with the client's Range and conditional headers.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Slot in the request's upstream set.
    pub upstream: usize,
    /// Request target at that upstream, query included: the client's own
    /// target, or for a canonical request the upstream's real NAR path.
    pub path: Rc<str>,
    /// `X-Ncro-Route` if this candidate's answer is relayed.
    pub kind: RouteKind,
    /// Its narinfo proved that it holds the very file the client was
    /// promised (a canonical request), so a `Range` continuation from it
    /// is the same bytes whatever its file is called.
    pub proven: bool,
}

/// A canonical request's promise: the store hash and the file the
/// client's narinfo describes.
struct Promise {
    hash: StoreHash,
    /// The routed narinfo (as served; the file fields are the upstream's).
    info: NarInfo,
}

/// A candidate taken from [`Candidates`] and not started yet: either known
/// already, or an upstream of a canonical request whose narinfo must
/// first prove that it holds the same file ([`Pending::prove`], one
/// upstream request). Taking one is free, so a caller can check the
/// upstream's health and stream permit before paying for the proof.
#[derive(Clone)]
pub struct Pending {
    upstream: usize,
    state: State,
}

#[derive(Clone)]
enum State {
    Known(Candidate),
    Unproved(Rc<Promise>),
}

/// Why an upstream of a canonical request was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoProof {
    /// It has no narinfo for the store hash, its narinfo was refused, or
    /// it describes another file: a miss.
    NotHeld,
    /// Its narinfo could not be fetched.
    Failed(FailKind),
}

impl Pending {
    /// The upstream's slot.
    pub fn upstream(&self) -> usize {
        self.upstream
    }

    /// Whether [`Pending::prove`] will ask the upstream for its narinfo.
    pub fn needs_proof(&self) -> bool {
        matches!(self.state, State::Unproved(_))
    }

    /// A candidate already known (proved, or of a non-canonical request).
    pub fn known(c: Candidate) -> Pending {
        Pending {
            upstream: c.upstream,
            state: State::Known(c),
        }
    }

    /// The candidate, proving it first when it needs a proof (a narinfo
    /// fetch from that upstream; a failed fetch also starts its cooldown).
    pub async fn prove(self, ctx: &WorkerCtx, set: &UpstreamSet) -> Result<Candidate, NoProof> {
        match self.state {
            State::Known(c) => Ok(c),
            State::Unproved(promise) => {
                let path = prove(ctx, set, self.upstream, &promise).await?;
                Ok(Candidate {
                    upstream: self.upstream,
                    path,
                    kind: RouteKind::Direct,
                    proven: true,
                })
            }
        }
    }
}

/// The candidates of one NAR request, best first (see the module docs).
pub struct Candidates {
    set: Arc<UpstreamSet>,
    /// Offered before `order`: the routed upstream, or after a hedged
    /// open the candidates that were passed over.
    front: VecDeque<Pending>,
    /// Slots not offered yet, in NAR order.
    order: std::vec::IntoIter<usize>,
    /// Offered after `order`: after a hedged open, those that were full or
    /// cancelled.
    back: VecDeque<Pending>,
    /// The routed slot: never offered again from `order`.
    routed: Option<usize>,
    /// Non-canonical requests: the path every candidate is asked for.
    target: Rc<str>,
    promise: Option<Rc<Promise>>,
    /// The routed upstream of a canonical request is DOWN (left out of
    /// the order): if nobody else proves the file, that is no miss.
    routed_down: bool,
}

/// Why a canonical request is answered without asking for the NAR.
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
}

impl Candidates {
    /// The candidates for `target` (the client's request target), or the
    /// answer to give at once.
    pub async fn plan(
        ctx: &WorkerCtx,
        set: Arc<UpstreamSet>,
        target: &str,
    ) -> Result<Candidates, Refusal> {
        let now = std::time::Instant::now();
        let routed = ctx
            .shared
            .routes
            .nar_upstream(route::nar_key(target), unix_now())
            .filter(|&i| i < set.len());
        // A name in the NAR index is some upstream's real file name (its
        // narinfo's `URL:`, or a debuginfo record's archive), even when it
        // looks canonical (a cache that names files by store hash, such as
        // another ncro): forwarded as it is.
        let canonical = canonical_request(target).filter(|_| routed.is_none());
        let Some((hash, ext)) = canonical else {
            let order = ctx.shared.routing.nar_order(routed, now).into_iter();
            return Ok(Candidates {
                set,
                front: VecDeque::new(),
                order,
                back: VecDeque::new(),
                routed,
                target: Rc::from(target),
                promise: None,
                routed_down: false,
            });
        };
        let (upstream, narinfo, upstream_url, kind) = route_of(ctx, hash).await?;
        let Ok(info) = NarInfo::parse(&narinfo) else {
            return Err(Refusal {
                status: 502,
                body: "the stored narinfo of this path does not parse\n",
            });
        };
        if nar_ext(&upstream_url) != ext {
            // The route's file is not the one this name promised (the route
            // moved to a cache that compresses differently since the client
            // read its narinfo): the client must not get other bytes.
            return Err(Refusal {
                status: 404,
                body: "no NAR file with this extension for this store path\n",
            });
        }
        let order = ctx.shared.routing.nar_order(Some(upstream), now);
        // A routed upstream that is DOWN is left out of the order; the
        // others may still prove the same file.
        let first =
            (order.first() == Some(&upstream) && !is_absolute(&upstream_url)).then(|| Candidate {
                upstream,
                path: real_path(&upstream_url),
                kind,
                proven: true,
            });
        Ok(Candidates {
            set,
            routed_down: order.first() != Some(&upstream),
            front: first.map(Pending::known).into_iter().collect(),
            order: order.into_iter(),
            back: VecDeque::new(),
            routed: Some(upstream),
            target: Rc::from(target),
            promise: Some(Rc::new(Promise { hash, info })),
        })
    }

    /// The upstream set the candidates' slots index.
    pub fn set(&self) -> &Arc<UpstreamSet> {
        &self.set
    }

    /// Whether this is a canonical request (`/nar/<store hash>...`).
    pub fn is_canonical(&self) -> bool {
        self.promise.is_some()
    }

    /// No candidates (the fallback cache's relay has none to fail over to).
    pub fn none(set: Arc<UpstreamSet>) -> Candidates {
        Candidates {
            set,
            front: VecDeque::new(),
            order: Vec::new().into_iter(),
            back: VecDeque::new(),
            routed: None,
            target: Rc::from(""),
            promise: None,
            routed_down: false,
        }
    }

    /// The next candidate, not proved yet, or None when none is left. Free:
    /// no upstream is asked. A routed upstream that was DOWN goes into
    /// `failures` once (its absence is no miss).
    pub fn take(&mut self, failures: &mut Failures) -> Option<Pending> {
        if let Some(p) = self.front.pop_front() {
            return Some(p);
        }
        if std::mem::take(&mut self.routed_down) {
            failures.failed(FailKind::Connect);
        }
        for i in self.order.by_ref() {
            // The health snapshot may be newer or older than `set`.
            if self.set.live(i).is_none() {
                continue;
            }
            let Some(promise) = &self.promise else {
                let kind = if Some(i) == self.routed {
                    RouteKind::CacheHit
                } else {
                    RouteKind::Direct
                };
                return Some(Pending::known(Candidate {
                    upstream: i,
                    path: self.target.clone(),
                    kind,
                    proven: false,
                }));
            };
            if Some(i) == self.routed {
                continue; // offered first, or DOWN/absolute: not again
            }
            return Some(Pending {
                upstream: i,
                state: State::Unproved(promise.clone()),
            });
        }
        self.back.pop_front()
    }

    /// Gives back candidates taken and not used: `front` ones are offered
    /// next, `back` ones after every candidate not taken yet.
    pub fn give_back(
        &mut self,
        front: impl IntoIterator<Item = Pending>,
        back: impl IntoIterator<Item = Pending>,
    ) {
        for p in front.into_iter().collect::<Vec<_>>().into_iter().rev() {
            self.front.push_front(p);
        }
        self.back.extend(back);
    }
}

/// The route of `hash` for a canonical request: upstream, served narinfo,
/// the upstream's real `URL:` and how it was found. Without a usable
/// stored route the hash is resolved as a narinfo request would be.
async fn route_of(
    ctx: &WorkerCtx,
    hash: StoreHash,
) -> Result<(usize, Bytes, Box<str>, RouteKind), Refusal> {
    let routes = &ctx.shared.routes;
    let kind = match routes.nar_source(&hash, unix_now()) {
        Some(NarSource::Hot {
            upstream,
            narinfo,
            upstream_url,
        }) => return Ok((upstream, narinfo, upstream_url, RouteKind::CacheHit)),
        Some(NarSource::Cold { .. }) => RouteKind::CacheHit,
        None => RouteKind::Direct,
    };
    // Reads a cold body back, or races the upstreams (and stores the route).
    let refusal = |status, body| Err(Refusal { status, body });
    match narinfo_serve::answer(ctx, hash).await {
        Resolved::Found(..) => {}
        Resolved::Miss => return refusal(404, "not found\n"),
        Resolved::Unavailable { timed_out: true } => {
            return refusal(504, "no upstream answered for this store path in time\n")
        }
        Resolved::Unavailable { timed_out: false } => {
            return refusal(502, "no upstream could resolve this store path\n")
        }
        Resolved::Overloaded => return refusal(503, "too many lookups in flight; retry shortly\n"),
    }
    match routes.nar_source(&hash, unix_now()) {
        Some(NarSource::Hot {
            upstream,
            narinfo,
            upstream_url,
        }) => Ok((upstream, narinfo, upstream_url, kind)),
        // Found but not kept (a stale route to a DOWN upstream was served,
        // or the body cache let it go at once): nothing proves a file.
        _ => refusal(502, "the route of this store path could not be kept\n"),
    }
}

/// `/` + a narinfo's relative `URL:` (query kept): the request target at
/// the upstream's NAR origin.
fn real_path(url: &str) -> Rc<str> {
    Rc::from(format!("/{}", url.trim_start_matches('/')))
}

/// Asks upstream `i` for its narinfo of the promised store hash and
/// returns its real NAR path when that narinfo verifies for it and
/// describes the same file. Anything else leaves it out.
async fn prove(
    ctx: &WorkerCtx,
    set: &UpstreamSet,
    i: usize,
    promise: &Promise,
) -> Result<Rc<str>, NoProof> {
    let up = set.live(i).ok_or(NoProof::NotHeld)?;
    let path = format!("/{}.narinfo", promise.hash);
    let attempt = {
        let _permit = ctx.limits.upstream(&ctx.shared.routing.limits, i).await;
        narinfo_serve::fetch_narinfo(&ctx.client, &up.origin, &path).await
    };
    let body = match attempt {
        Attempt::Found(body) => body,
        Attempt::NotFound => return Err(NoProof::NotHeld),
        Attempt::Failed(kind) => {
            ctx.shared.routing.failed(i, kind);
            return Err(NoProof::Failed(kind));
        }
    };
    let info = match narinfo_serve::judge(up, promise.hash, &body) {
        Verdict::Accept((info, _)) => info,
        Verdict::Reject(why) => {
            tracing::debug!(upstream = %up.url, hash = %promise.hash, ?why, "NAR candidate left out: its narinfo was refused");
            return Err(NoProof::NotHeld);
        }
    };
    if let Err(why) = same_file(&promise.info, &info) {
        tracing::debug!(upstream = %up.url, hash = %promise.hash, ?why, "NAR candidate left out: not the same file as the one promised");
        return Err(NoProof::NotHeld);
    }
    if is_absolute(&info.url) {
        return Err(NoProof::NotHeld);
    }
    Ok(real_path(&info.url))
}
