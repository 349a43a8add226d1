//! Reading an upstream's RFC 0195 index into a NixBloom filter. COLD.
//!
//! One refresh: the manifest (conditional GET); every shard of its current
//! epoch, only when the epoch changed (shards are immutable per epoch);
//! the journal segments that may hold additions not yet compacted (a
//! segment that stopped being current is read once more, then kept); the
//! manifest again, which must not have moved meanwhile. The union of shard
//! keys and journal additions becomes a filter at
//! `index.false_positive_rate`.
//!
//! Choices made for safety, since a wrong "absent" becomes a sticky 404:
//! a shard missing from the current epoch fails the refresh instead of
//! being read from the previous epoch (whose journal may already be gone);
//! journal deletions are ignored (a deleted path stays "maybe", which costs
//! one request, never a wrong 404); a manifest that moved during the
//! refresh fails it.

use std::collections::HashMap;

use crate::config::IndexConfig;
use crate::http::client::{LocalClient, Origin};
use crate::index::RefreshErrorKind;
use crate::proto::cache_index::{self, shard, JournalOp, Manifest};
use crate::proto::nixbloom::{Bloom, BloomBuilder, Probe};

use super::fetch::{get, Fetched, Location, RefreshError};

/// Most shards read for one index: depth 2. Deeper indexes (the RFC picks
/// them from 10 M items up) are over any sensible `index.max_items`.
const MAX_SHARDS: u64 = 1024;

/// What one upstream's index looked like at its last refresh.
#[derive(Default)]
pub struct RfcCache {
    manifest_etag: Option<String>,
    manifest: Option<Manifest>,
    /// Keys of the shards of `epoch`.
    base: Option<(u64, Vec<Probe>)>,
    /// Journal additions by segment timestamp.
    segments: HashMap<u64, Segment>,
}

struct Segment {
    adds: Vec<Probe>,
    /// Read after it stopped being the current segment: it cannot grow.
    done: bool,
}

fn err(kind: RefreshErrorKind, what: impl Into<String>) -> RefreshError {
    RefreshError::new(kind, what)
}

/// The index at `manifest` as a filter; `None` when there is no index.
pub async fn refresh(
    client: &LocalClient,
    origin: &Origin,
    manifest: &Location,
    cache: &mut RfcCache,
    cfg: &IndexConfig,
) -> Result<Option<Bloom>, RefreshError> {
    let Some(m) = load_manifest(client, origin, manifest, cache, cfg).await? else {
        *cache = RfcCache::default();
        return Ok(None);
    };
    if m.item_count > cfg.max_items || m.shard_count() > MAX_SHARDS {
        return Err(err(
            RefreshErrorKind::TooLarge,
            format!(
                "index of {} items in {} shards",
                m.item_count,
                m.shard_count()
            ),
        ));
    }
    if cache.base.as_ref().map(|b| b.0) != Some(m.epoch) {
        cache.base = None; // never mix epochs, even on failure
        let keys = load_shards(client, origin, manifest, &m, cfg).await?;
        cache.base = Some((m.epoch, keys));
    }
    load_journal(client, origin, manifest, &m, cache, cfg).await?;
    let again = load_manifest(client, origin, manifest, cache, cfg).await?;
    if again.as_ref().map(|a| (a.epoch, a.current_segment)) != Some((m.epoch, m.current_segment)) {
        return Err(err(
            RefreshErrorKind::Inconsistent,
            "the index manifest changed during the refresh",
        ));
    }
    Ok(Some(build(cache, cfg.false_positive_rate)))
}

async fn load_manifest(
    client: &LocalClient,
    origin: &Origin,
    loc: &Location,
    cache: &mut RfcCache,
    cfg: &IndexConfig,
) -> Result<Option<Manifest>, RefreshError> {
    let etag = cache.manifest.as_ref().and(cache.manifest_etag.as_deref());
    match get(client, origin, loc, etag, cfg.max_bytes).await? {
        Fetched::Missing => Ok(None),
        Fetched::NotModified => Ok(cache.manifest.clone()),
        Fetched::Body { bytes, etag } => {
            let m =
                Manifest::parse(&bytes).map_err(|e| err(RefreshErrorKind::Parse, e.to_string()))?;
            cache.manifest = Some(m.clone());
            cache.manifest_etag = etag;
            Ok(Some(m))
        }
    }
}

async fn load_shards(
    client: &LocalClient,
    origin: &Origin,
    manifest: &Location,
    m: &Manifest,
    cfg: &IndexConfig,
) -> Result<Vec<Probe>, RefreshError> {
    let mut keys = Vec::with_capacity(m.item_count.min(cfg.max_items) as usize);
    for prefix in m.shard_prefixes() {
        let loc = manifest.sibling(&cache_index::shard_file(m.epoch, &prefix));
        let bytes = match get(client, origin, &loc, None, cfg.max_bytes).await? {
            Fetched::Body { bytes, .. } => bytes,
            _ => {
                return Err(err(
                    RefreshErrorKind::Inconsistent,
                    format!("{} is missing", loc.path()),
                ))
            }
        };
        let value = shard::prefix_value(&prefix).unwrap_or_default();
        let room = cfg.max_items.saturating_sub(keys.len() as u64);
        let before = keys.len();
        let decoded = shard::decode(&bytes, m.depth, value, room, |k| {
            keys.push(Probe::from_low128(k.low128()))
        });
        if let Err(e) = decoded {
            keys.truncate(before);
            let kind = match e {
                shard::ShardError::TooManyItems(_) => RefreshErrorKind::TooLarge,
                _ => RefreshErrorKind::Parse,
            };
            return Err(err(kind, format!("{}: {e}", loc.path())));
        }
    }
    Ok(keys)
}

async fn load_journal(
    client: &LocalClient,
    origin: &Origin,
    manifest: &Location,
    m: &Manifest,
    cache: &mut RfcCache,
    cfg: &IndexConfig,
) -> Result<(), RefreshError> {
    let live = m
        .live_segments()
        .map_err(|e| err(RefreshErrorKind::Inconsistent, e.to_string()))?;
    cache.segments.retain(|ts, _| live.contains(ts));
    for &ts in &live {
        if cache.segments.get(&ts).is_some_and(|s| s.done) {
            continue;
        }
        let loc = manifest.sibling(&cache_index::segment_file(ts));
        let adds = match get(client, origin, &loc, None, cfg.max_bytes).await? {
            Fetched::Body { bytes, .. } => additions(&bytes)
                .map_err(|e| err(RefreshErrorKind::Parse, format!("{}: {e}", loc.path())))?,
            // Not written yet, or rotated away and compacted.
            Fetched::Missing | Fetched::NotModified => Vec::new(),
        };
        let done = ts != m.current_segment;
        cache.segments.insert(ts, Segment { adds, done });
    }
    Ok(())
}

/// The `+` lines of a segment. A `-` cannot be taken out of a Bloom
/// filter; leaving the path "maybe present" only costs a request.
fn additions(text: &[u8]) -> Result<Vec<Probe>, cache_index::IndexError> {
    Ok(cache_index::parse_journal(text)?
        .into_iter()
        .filter_map(|op| match op {
            JournalOp::Add(h) => Some(Probe::of(&h)),
            JournalOp::Remove(_) => None,
        })
        .collect())
}

fn build(cache: &RfcCache, fpr: f64) -> Bloom {
    let base = cache.base.as_ref().map_or(&[][..], |b| &b.1[..]);
    let adds = cache.segments.values().flat_map(|s| &s.adds);
    let n = base.len() + cache.segments.values().map(|s| s.adds.len()).sum::<usize>();
    let mut b = BloomBuilder::roomy(n as u64, fpr);
    base.iter().chain(adds).for_each(|&p| b.insert(p));
    b.finish()
}
