//! The RFC 0195 (draft) binary cache index: a JSON manifest, append-only
//! journal segments and immutable per-epoch shards, all static files under
//! `/nix-cache-index/` (shared/notes/cache-index.md §3.2–3.4). This module
//! parses the manifest and journal; [`shard`] decodes shards. Pure: the
//! control thread fetches, this only reads bytes.
//!
//! ncro consumes the index strictly as an advisory miss filter, so every
//! parser here is strict: anything it does not fully understand is an
//! error, and an error means "no summary, race as usual".

pub mod shard;

use serde::Deserialize;
use thiserror::Error;

use super::store_path::{StoreHash, NIX_BASE32_ALPHABET};

pub const MANIFEST_PATH: &str = "/nix-cache-index/manifest.json";
/// Largest sharding depth the RFC defines (32⁴ shards).
pub const MAX_DEPTH: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IndexError {
    #[error("manifest is not valid JSON for RFC 0195: {0}")]
    Json(String),
    #[error("manifest {field} = {value:?} is not supported")]
    Unsupported { field: &'static str, value: String },
    #[error("journal line {line} is neither +<hash> nor -<hash>")]
    JournalLine { line: usize },
    #[error("the manifest lists no way to find the live journal segments")]
    SegmentsUnknown,
}

#[derive(Deserialize)]
struct RawManifest {
    version: u64,
    format: String,
    #[serde(default)]
    item_count: u64,
    sharding: RawSharding,
    encoding: RawEncoding,
    journal: RawJournal,
    epoch: RawEpoch,
}

#[derive(Deserialize)]
struct RawSharding {
    depth: u8,
    alphabet: String,
}

#[derive(Deserialize)]
struct RawEncoding {
    #[serde(rename = "type")]
    kind: String,
    parameter: u32,
    hash_bits: u32,
    prefix_bits: u32,
}

#[derive(Deserialize)]
struct RawJournal {
    current_segment: u64,
    #[serde(default)]
    segment_duration_seconds: Option<u64>,
    #[serde(default)]
    retention_count: u64,
}

#[derive(Deserialize)]
struct RawEpoch {
    current: u64,
    #[serde(default)]
    previous: Option<u64>,
}

/// The parts of a manifest a consumer needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Approximate, as the RFC says.
    pub item_count: u64,
    pub depth: u8,
    /// Golomb-Rice parameter the manifest announces (each shard repeats it).
    pub k: u32,
    pub current_segment: u64,
    pub segment_duration: Option<u64>,
    pub retention_count: u64,
    pub epoch: u64,
    pub previous_epoch: Option<u64>,
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, IndexError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| IndexError::Json(e.to_string()))?;
        let unsupported = |field, value: String| Err(IndexError::Unsupported { field, value });
        if raw.version != 1 {
            return unsupported("version", raw.version.to_string());
        }
        if raw.format != "hlssi" {
            return unsupported("format", raw.format);
        }
        if raw.sharding.depth > MAX_DEPTH {
            return unsupported("sharding.depth", raw.sharding.depth.to_string());
        }
        if raw.sharding.alphabet.as_bytes() != NIX_BASE32_ALPHABET {
            return unsupported("sharding.alphabet", raw.sharding.alphabet);
        }
        let e = &raw.encoding;
        if e.kind != "golomb-rice" {
            return unsupported("encoding.type", e.kind.clone());
        }
        if e.hash_bits != 160 {
            return unsupported("encoding.hash_bits", e.hash_bits.to_string());
        }
        if e.prefix_bits != 5 * u32::from(raw.sharding.depth) {
            return unsupported("encoding.prefix_bits", e.prefix_bits.to_string());
        }
        Ok(Manifest {
            item_count: raw.item_count,
            depth: raw.sharding.depth,
            k: e.parameter,
            current_segment: raw.journal.current_segment,
            segment_duration: raw.journal.segment_duration_seconds.filter(|&d| d > 0),
            retention_count: raw.journal.retention_count,
            epoch: raw.epoch.current,
            previous_epoch: raw.epoch.previous,
        })
    }

    /// How many shards the current epoch has.
    pub fn shard_count(&self) -> u64 {
        32u64.pow(u32::from(self.depth))
    }

    /// Shard prefixes in key order: `root` at depth 0, else every
    /// `depth`-character Nix-base32 string.
    pub fn shard_prefixes(&self) -> impl Iterator<Item = String> + '_ {
        let depth = u32::from(self.depth);
        (0..self.shard_count()).map(move |n| {
            if depth == 0 {
                return "root".to_owned();
            }
            (0..depth)
                .rev()
                .map(|d| char::from(NIX_BASE32_ALPHABET[((n >> (5 * d)) & 31) as usize]))
                .collect()
        })
    }

    /// The journal segments that may still hold entries not yet compacted
    /// into the shards, newest first. The RFC never says how to list them;
    /// like ncps this steps back from the current segment by the segment
    /// duration, one step more than `retention_count + 1`: reading a gone
    /// segment costs one 404, while missing a rotated segment that is not
    /// compacted yet would lose its additions. Without a duration the
    /// previous segment cannot be found, so the index cannot be followed
    /// safely at all.
    pub fn live_segments(&self) -> Result<Vec<u64>, IndexError> {
        let d = self.segment_duration.ok_or(IndexError::SegmentsUnknown)?;
        Ok((0..=self.retention_count.saturating_add(1))
            .map_while(|i| self.current_segment.checked_sub(i.checked_mul(d)?))
            .collect())
    }
}

/// A shard's file, relative to the manifest's directory.
pub fn shard_file(epoch: u64, prefix: &str) -> String {
    format!("shards/{epoch}/{prefix}.idx")
}

/// A journal segment's file, relative to the manifest's directory.
pub fn segment_file(segment: u64) -> String {
    format!("journal/{segment}.log")
}

/// One journal line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalOp {
    Add(StoreHash),
    Remove(StoreHash),
}

/// Parses a journal segment. Blank lines are skipped. A last line without
/// its newline may be an append in progress and is ignored when it does
/// not parse; any other bad line makes the segment unusable.
pub fn parse_journal(text: &[u8]) -> Result<Vec<JournalOp>, IndexError> {
    let complete = text.ends_with(b"\n");
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let last = lines.len() - 1;
    let mut ops = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let hash = line.get(1..).and_then(StoreHash::parse);
        match (line[0], hash) {
            (b'+', Some(h)) => ops.push(JournalOp::Add(h)),
            (b'-', Some(h)) => ops.push(JournalOp::Remove(h)),
            _ if i == last && !complete => {}
            _ => return Err(IndexError::JournalLine { line: i + 1 }),
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests;
