//! Whether a gossiped route becomes one of ours. A peer is trusted to say
//! *which* upstream had a path, never *what* the path is: the narinfo it
//! sends must parse, name the route's hash, pass that upstream's filters
//! and verify under that upstream's keys, exactly as a race winner must.
//! Only then does the merge rule decide: lower latency EMA wins, a newer
//! verification breaks a tie.

use std::sync::Arc;

use bytes::Bytes;

use super::codec::WireRoute;
use crate::proto::narinfo::{relay_form, NarInfo};
use crate::proto::signature::verify_narinfo;
use crate::proto::store_path::StoreHash;
use crate::route::{Cached, RouteEntry, RouteTable};
use crate::upstream::{filter, UpstreamSet};

/// Why a gossiped route was not adopted; each is a `reason` label of
/// `ncro_mesh_routes_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a store hash, or a latency that is not a finite non-negative number.
    Malformed,
    /// The upstream is not configured here.
    UnknownUpstream,
    Expired,
    /// Sent without narinfo bytes (too big for a datagram, or an ncro 2.2
    /// row without them): nothing to serve from.
    NoNarinfo,
    /// The narinfo does not parse, names another path, or is filtered out.
    BadNarinfo,
    /// The upstream has keys and no signature on the narinfo verifies.
    BadSignature,
    /// The upstream has no keys and the sender is not a listed peer, so
    /// nothing vouches for the narinfo.
    Unverifiable,
    /// The route this node has is as good or better.
    NotBetter,
}

impl Skip {
    pub const ALL: [Skip; 8] = [
        Skip::Malformed,
        Skip::UnknownUpstream,
        Skip::Expired,
        Skip::NoNarinfo,
        Skip::BadNarinfo,
        Skip::BadSignature,
        Skip::Unverifiable,
        Skip::NotBetter,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Skip::Malformed => "malformed",
            Skip::UnknownUpstream => "unknown_upstream",
            Skip::Expired => "expired",
            Skip::NoNarinfo => "no_narinfo",
            Skip::BadNarinfo => "bad_narinfo",
            Skip::BadSignature => "bad_signature",
            Skip::Unverifiable => "unverifiable",
            Skip::NotBetter => "not_better",
        }
    }
}

/// What the receiving node knows, for [`adopt`].
pub struct Local<'a> {
    pub upstreams: &'a UpstreamSet,
    pub routes: &'a RouteTable,
    /// `cache.ttl` in seconds: a peer cannot make a route live longer here
    /// than a race result would.
    pub max_ttl: u64,
}

/// The route to insert for `r`, or why not. `listed`: the sender is a
/// configured peer key. `now`: unix seconds.
pub fn adopt(
    local: &Local<'_>,
    r: &WireRoute,
    listed: bool,
    now: u64,
) -> Result<(StoreHash, Arc<RouteEntry>), Skip> {
    let hash = StoreHash::parse(r.store_path.as_bytes()).ok_or(Skip::Malformed)?;
    if !(r.latency_ema.is_finite() && r.latency_ema >= 0.0) {
        return Err(Skip::Malformed);
    }
    let url = r.upstream_url.trim_end_matches('/');
    let i = local.upstreams.index_of(url).ok_or(Skip::UnknownUpstream)?;
    let up = local.upstreams.live(i).ok_or(Skip::UnknownUpstream)?;
    let ttl = u64::try_from(r.ttl).unwrap_or(0);
    if ttl <= now {
        return Err(Skip::Expired);
    }
    let bytes = r.narinfo.as_deref().ok_or(Skip::NoNarinfo)?;
    let info = NarInfo::parse(bytes).map_err(|_| Skip::BadNarinfo)?;
    if info.store_hash() != hash || !filter::allows(&up.filters, &info) {
        return Err(Skip::BadNarinfo);
    }
    if up.keys.is_empty() {
        if !listed {
            return Err(Skip::Unverifiable);
        }
    } else if !verify_narinfo(&info, &up.keys).is_accepted() {
        return Err(Skip::BadSignature);
    }
    let latency = r.latency_ema as f32;
    let verified_at = u64::try_from(r.last_verified).unwrap_or(0).min(now);
    match local.routes.get(&hash, now) {
        Some(Cached::Hit(_) | Cached::Cold { .. }) => {
            // A local route whose merit is unknown (its body was read back
            // from the database) is kept: it was verified here.
            let better = local
                .routes
                .merit(&hash)
                .is_some_and(|(l, v)| wins(latency, verified_at, l, v));
            if !better {
                return Err(Skip::NotBetter);
            }
        }
        Some(Cached::Negative) | None => {}
    }
    let entry = RouteEntry {
        upstream: up.url.clone(),
        // Served as a race result is: the upstream's bytes, with only the
        // lines Nix would misread rewritten.
        narinfo: Bytes::from(relay_form(bytes, None).into_owned()),
        nar_url: info.url.trim_start_matches('/').into(),
        nar_hash: info.nar_hash.as_str().into(),
        nar_size: info.nar_size,
        expires_at: ttl.min(now.saturating_add(local.max_ttl)),
        verified_at,
        latency_ms: latency,
    };
    Ok((hash, Arc::new(entry)))
}

/// The merge rule. Compared at the precision routes are stored with
/// (f32), so a route that comes back unchanged is never "better" than
/// itself.
/// `have_latency` and `have_verified` are the local route's.
pub fn wins(latency: f32, verified_at: u64, have_latency: f32, have_verified: u64) -> bool {
    match latency.total_cmp(&have_latency) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Equal => verified_at > have_verified,
        std::cmp::Ordering::Greater => false,
    }
}

#[cfg(test)]
#[path = "merge/tests.rs"]
mod tests;
