//! Server side: writing response heads into a reused buffer. HOT.

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// How the body that follows the head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// No length and no chunking: the body (if any) ends when the
    /// connection closes, or there is none (304, HEAD without a length).
    None,
}

/// Appends a response head to `out`. `date` is the worker's cached
/// IMF-fixdate for the current second.
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    date: &[u8],
    headers: &[(&str, &[u8])],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // Digits by hand: `write!` goes through the formatting machinery, a
    // measurable part of a route-cache hit's user time.
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: ncro\r\nDate: ");
    out.extend_from_slice(date);
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"\r\nContent-Length: ");
            push_decimal(out, n);
        }
        Framing::Chunked => out.extend_from_slice(b"\r\nTransfer-Encoding: chunked"),
        Framing::None => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"\r\nConnection: close");
    }
    for (name, value) in headers {
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A complete small response: head plus body (omitted for HEAD).
pub fn write_simple(
    out: &mut Vec<u8>,
    status: u16,
    keep_alive: bool,
    head_only: bool,
    date: &[u8],
    headers: &[(&str, &[u8])],
    body: &[u8],
) {
    write_head(
        out,
        status,
        Framing::Length(body.len() as u64),
        keep_alive,
        date,
        headers,
    );
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// IMF-fixdate (RFC 9110) for a unix time, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(unix: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86400;
    let secs = unix % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    let s = format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    let mut out = [b' '; 29];
    out.copy_from_slice(&s.as_bytes()[..29]);
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_format() {
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(1_772_323_200), b"Sun, 01 Mar 2026 00:00:00 GMT");
    }

    #[test]
    fn head_layout() {
        let mut out = Vec::new();
        write_simple(
            &mut out,
            404,
            false,
            false,
            b"D",
            &[("Content-Type", b"text/plain")],
            b"nope",
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nServer: ncro\r\nDate: D\r\nContent-Length: 4\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nnope"
        );
        out.clear();
        write_simple(&mut out, 200, true, true, b"D", &[], b"body");
        assert!(out.ends_with(b"Content-Length: 4\r\n\r\n"));
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 99, 206, 4096, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes(), "{n}");
        }
        let mut out = Vec::new();
        write_head(
            &mut out,
            206,
            Framing::Length(123_456_789_012),
            true,
            b"D",
            &[],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 206 Partial Content\r\nServer: ncro\r\nDate: D\r\nContent-Length: 123456789012\r\n\r\n"
        );
    }
}
