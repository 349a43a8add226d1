//! Value syntax of the bench options: sizes (`64KiB`), index ranges
//! (`0..1000`), fractions and latencies (`2ms`, `2ms..5ms`).

use std::ops::Range;
use std::time::Duration;

use super::rng::Rng;

/// A per-request delay: fixed, or uniform between two bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySpec {
    pub min: Duration,
    pub max: Duration,
}

impl LatencySpec {
    /// `2ms` (fixed) or `2ms..5ms` (uniform jitter); humantime units.
    pub fn parse(s: &str) -> Result<LatencySpec, String> {
        let dur = |p: &str| {
            humantime::parse_duration(p.trim()).map_err(|e| format!("latency {p:?}: {e}"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (dur(a)?, dur(b)?),
            None => {
                let d = dur(s)?;
                (d, d)
            }
        };
        if max < min {
            return Err(format!("latency range {s:?} ends before it starts"));
        }
        Ok(LatencySpec { min, max })
    }

    pub fn is_zero(&self) -> bool {
        self.max.is_zero()
    }

    /// The delay for one request.
    pub fn sample(&self, rng: &mut Rng) -> Duration {
        let span = self.max - self.min;
        if span.is_zero() {
            return self.min;
        }
        self.min + span.mul_f64(rng.unit())
    }
}

impl std::fmt::Display for LatencySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        if self.min == self.max {
            write!(f, "{}", h(self.min))
        } else {
            write!(f, "{}..{}", h(self.min), h(self.max))
        }
    }
}

/// A byte size: a number with an optional unit (`B`, `KiB`/`K`, `MiB`/`M`,
/// `GiB`/`G`; powers of 1024, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {s:?}: no number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// NAR sizes in bytes, in the order they are assigned to paths (a
/// newtype so clap takes the whole comma list as one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSizes(pub Vec<u64>);

/// A comma-separated list of sizes, at least one.
pub fn parse_sizes(s: &str) -> Result<NarSizes, String> {
    s.split(',')
        .map(parse_size)
        .collect::<Result<_, _>>()
        .map(NarSizes)
}

/// `A..B` (B excluded), `..B` (from 0) or `A..` (to the end of the cache).
pub fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("range {s:?}: expected A..B"))?;
    let num = |p: &str, default: u64| -> Result<u64, String> {
        if p.trim().is_empty() {
            Ok(default)
        } else {
            p.trim()
                .parse()
                .map_err(|_| format!("range {s:?}: {p:?} is not a number"))
        }
    };
    let r = num(a, 0)?..num(b, u64::MAX)?;
    if r.end < r.start {
        return Err(format!("range {s:?} ends before it starts"));
    }
    Ok(r)
}

/// A number in `[0, 1]`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{s} is not between 0 and 1"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2 gib"), Ok(2 << 30));
        assert_eq!(
            parse_sizes("4KiB,1MiB").map(|s| s.0),
            Ok(vec![4096, 1 << 20])
        );
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn ranges_and_fractions() {
        assert_eq!(parse_range("0..10"), Ok(0..10));
        assert_eq!(parse_range("..5"), Ok(0..5));
        assert_eq!(parse_range("7.."), Ok(7..u64::MAX));
        assert!(parse_range("5..2").is_err());
        assert!(parse_range("5").is_err());
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("x").is_err());
    }

    #[test]
    fn latencies_fixed_and_jittered() {
        let fixed = LatencySpec::parse("2ms").unwrap();
        assert_eq!(fixed.min, Duration::from_millis(2));
        assert_eq!(fixed.max, fixed.min);
        assert_eq!(fixed.to_string(), "2ms");
        let j = LatencySpec::parse("2ms..5ms").unwrap();
        assert_eq!(j.to_string(), "2ms..5ms");
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let d = j.sample(&mut rng);
            assert!(d >= j.min && d <= j.max, "{d:?}");
        }
        assert!(LatencySpec::parse("5ms..2ms").is_err());
        assert!(LatencySpec::parse("soon").is_err());
        assert!(LatencySpec::parse("0ms").unwrap().is_zero());
    }
}
