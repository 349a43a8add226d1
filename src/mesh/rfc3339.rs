//! RFC 3339 timestamps as ncro 2.2 puts them in routes (chrono's
//! `DateTime<Utc>` through serde): written as whole seconds with `Z`,
//! read with any fraction and any offset. Unix seconds on our side.

use crate::http::response::civil_from_days;

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-05-28T20:26:40Z` for unix seconds (years 0..=9999; clamped).
pub fn format(unix_secs: i64) -> String {
    const MIN: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let t = unix_secs.clamp(MIN, MAX);
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |acc, &b| acc * 10 + u32::from(b - b'0')))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Unix seconds (fraction dropped) of an RFC 3339 date-time; `T`, `t` or a
/// space between date and time, `Z`/`z` or `±hh:mm` as the offset.
pub fn parse(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let y = i64::from(digits(&b[0..4])?);
    let (mo, d) = (digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, sec) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return None;
    }
    // 60 is a leap second; chrono reads it as the last second of the minute.
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &b[19..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), hh @ .., b':', m1, m2] if hh.len() == 2 => {
            let (oh, om) = (digits(hh)?, digits(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3600 + om * 60);
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let day_secs = i64::from(h * 3600 + mi * 60 + sec.min(59));
    Some(days_from_civil(y, mo, d) * 86_400 + day_secs - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_chrono_whole_seconds() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_780_000_000), "2026-05-28T20:26:40Z");
        assert_eq!(format(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format(i64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn parses_fractions_offsets_and_separators() {
        let t = 1_780_000_000;
        for s in [
            "2026-05-28T20:26:40Z",
            "2026-05-28t20:26:40z",
            "2026-05-28 20:26:40Z",
            "2026-05-28T20:26:40.123Z",
            "2026-05-28T20:26:40.123456789Z",
            "2026-05-28T22:26:40+02:00",
            "2026-05-28T15:56:40-04:30",
        ] {
            assert_eq!(parse(s), Some(t), "{s}");
        }
    }

    #[test]
    fn round_trips_across_calendar_edges() {
        for t in [
            0,
            951_782_400,
            4_107_542_399,
            -86_400 * 365 * 300,
            253_402_300_799,
        ] {
            assert_eq!(parse(&format(t)), Some(t), "{}", format(t));
        }
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "2026-05-28",
            "2026-05-28T20:26:40",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-05-28T24:00:00Z",
            "2026-05-28T20:26:40.Z",
            "2026-05-28T20:26:40+0200",
            "2026-05-28X20:26:40Z",
            "+026-05-28T20:26:40Z",
            "2026-05-28T20:26:40Zjunk",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }
}
