//! `[cache.nar_ranges]`: large NARs fetched as parallel `Range` requests
//! (docs/nar-failover.md, "Parallel ranges").

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dur::Dur;
use super::{invalid, positive, ConfigError};

/// A byte size written as `"4MiB"`, `"512KiB"`, `"1GiB"` or a plain number
/// of bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?} (use e.g. \"4MiB\", \"512KiB\")"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            u => {
                return Err(format!(
                    "invalid size unit {u:?} in {s:?} (B, KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Size::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let text = if n != 0 && n % (1 << 20) == 0 {
            format!("{}MiB", n >> 20)
        } else if n != 0 && n % (1 << 10) == 0 {
            format!("{}KiB", n >> 10)
        } else {
            n.to_string()
        };
        s.serialize_str(&text)
    }
}

/// `[cache.nar_ranges]` as written.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawNarRanges {
    pub enabled: bool,
    pub min_size: Size,
    pub chunk_size: Size,
    pub connections: u32,
    pub max_memory: Size,
    pub stall_timeout: Dur,
    pub min_latency: Dur,
}

impl Default for RawNarRanges {
    fn default() -> Self {
        RawNarRanges {
            enabled: true,
            min_size: Size(32 << 20),
            chunk_size: Size(2 << 20),
            connections: 8,
            max_memory: Size(256 << 20),
            stall_timeout: Dur(Duration::from_secs(10)),
            min_latency: Dur(Duration::from_millis(5)),
        }
    }
}

/// `[cache.nar_ranges]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarRanges {
    pub enabled: bool,
    /// NARs (or client ranges) at least this long are fetched in ranges.
    pub min_size: u64,
    pub chunk_size: u64,
    /// Most upstream connections of one transfer (>= 2).
    pub connections: u32,
    /// Bytes of range buffers of all transfers together; a transfer
    /// reserves `connections * chunk_size` or relays as one stream.
    pub max_memory: u64,
    /// A range that receives no byte for this long is fetched elsewhere.
    pub stall_timeout: std::time::Duration,
    /// Only upstreams whose measured latency (EMA) is at least this are
    /// fetched in ranges; an unmeasured one counts as far.
    pub min_latency: std::time::Duration,
}

impl NarRanges {
    /// The buffers one transfer holds at most.
    pub fn per_transfer(&self) -> u64 {
        self.chunk_size * u64::from(self.connections)
    }
}

pub(super) fn validate(r: &RawNarRanges) -> Result<NarRanges, ConfigError> {
    if r.connections < 2 {
        return Err(invalid("cache.nar_ranges.connections must be >= 2"));
    }
    if r.chunk_size.0 < 64 << 10 || r.chunk_size.0 > 64 << 20 {
        return Err(invalid(
            "cache.nar_ranges.chunk_size must be between 64KiB and 64MiB",
        ));
    }
    let ranges = NarRanges {
        enabled: r.enabled,
        min_size: r.min_size.0,
        chunk_size: r.chunk_size.0,
        connections: r.connections,
        max_memory: r.max_memory.0,
        stall_timeout: positive("cache.nar_ranges.stall_timeout", r.stall_timeout.0)?,
        min_latency: r.min_latency.0,
    };
    if ranges.enabled && ranges.max_memory < ranges.per_transfer() {
        return Err(invalid(format!(
            "cache.nar_ranges.max_memory ({} bytes) is less than one transfer's buffers (connections * chunk_size = {} bytes)",
            ranges.max_memory,
            ranges.per_transfer()
        )));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(Size::parse("4MiB"), Ok(Size(4 << 20)));
        assert_eq!(Size::parse("512KiB"), Ok(Size(512 << 10)));
        assert_eq!(Size::parse("1GiB"), Ok(Size(1 << 30)));
        assert_eq!(Size::parse("1000"), Ok(Size(1000)));
        assert!(Size::parse("4MB").is_err());
        assert!(Size::parse("MiB").is_err());
    }

    #[test]
    fn memory_must_hold_one_transfer() {
        let raw = RawNarRanges {
            max_memory: Size(1 << 20),
            ..RawNarRanges::default()
        };
        let e = validate(&raw).unwrap_err().to_string();
        assert!(e.contains("max_memory"), "{e}");
        assert!(validate(&RawNarRanges::default()).is_ok());
        let one = RawNarRanges {
            connections: 1,
            ..RawNarRanges::default()
        };
        assert!(validate(&one).is_err());
    }
}
