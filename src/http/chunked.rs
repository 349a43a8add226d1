//! Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! A pure state machine over byte slices: it never allocates and never
//! buffers, so a body can be fed in whatever pieces the socket delivers. It
//! serves two callers: [`ChunkedDecoder::decode`] hands back the data bytes
//! (narinfo bodies), and [`ChunkedDecoder::scan`] only validates, so the relay
//! can forward the upstream's framing verbatim and still abort on garbage.
//!
//! Strictness: line endings must be CRLF, sizes must have at least one hex
//! digit, and the size line (with extensions) and the trailer section are
//! bounded so a hostile upstream cannot make us spin on an endless line.

use std::ops::Range;

/// Longest accepted chunk-size line, extensions included, CRLF excluded.
pub const DEFAULT_MAX_LINE: usize = 4096;
/// Largest accepted trailer section (all trailer lines with their CRLFs).
pub const DEFAULT_MAX_TRAILER: usize = 16 * 1024;

/// Why a chunked body was rejected. Every variant is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("chunk size line has no hex digits")]
    MissingSize,
    #[error("invalid byte in chunk size line")]
    InvalidSize,
    #[error("chunk size overflows 64 bits")]
    SizeOverflow,
    #[error("chunk size line longer than the limit")]
    LineTooLong,
    #[error("expected CRLF in chunked framing")]
    BadLineEnding,
    #[error("chunked trailer section larger than the limit")]
    TrailerTooLarge,
    #[error("invalid byte in chunked trailer")]
    InvalidTrailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size { value: u64, digits: usize },
    /// After the digits: optional whitespace and `;extensions` up to CR.
    Ext { value: u64, seen_semicolon: bool },
    /// Size line ended in CR; LF must follow.
    SizeLf { value: u64 },
    /// Inside chunk data.
    Data { remaining: u64 },
    /// Chunk data finished; CR must follow.
    DataCr,
    /// CR after chunk data seen; LF must follow.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a non-empty trailer line.
    TrailerLine,
    /// A trailer line ended in CR; LF must follow.
    TrailerLf { empty: bool },
    /// The whole body, final CRLF included, has been seen.
    Done,
}

/// One call's worth of progress, see [`ChunkedDecoder::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that were used (framing and data).
    pub consumed: usize,
    /// Body data found in this call, as a range of the input; empty if none.
    pub data: Range<usize>,
}

/// Incremental chunked-body decoder. Cheap to create; one per response.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes seen so far on the current size line (limits slow-drip lines).
    line_len: usize,
    /// Bytes seen so far in the trailer section.
    trailer_len: usize,
    max_line: usize,
    max_trailer: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder with the default line and trailer limits.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_LINE, DEFAULT_MAX_TRAILER)
    }

    /// A decoder with explicit limits on the size line and trailer section.
    pub fn with_limits(max_line: usize, max_trailer: usize) -> Self {
        Self {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            line_len: 0,
            trailer_len: 0,
            max_line,
            max_trailer,
        }
    }

    /// True once the terminating chunk, trailers and final CRLF were seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `input` up to and including the next run of
    /// chunk data, which is returned as a range of `input`.
    ///
    /// Stops early after a data run or at the end of the body; otherwise
    /// consumes all of `input`. Bytes after `consumed` were not looked at.
    pub fn decode(&mut self, input: &[u8]) -> Result<Progress, ChunkedError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::Done => break,
                State::Data { remaining } => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - pos);
                    self.advance_data(n as u64);
                    return Ok(Progress {
                        consumed: pos + n,
                        data: pos..pos + n,
                    });
                }
                _ => {
                    self.framing_byte(input[pos])?;
                    pos += 1;
                }
            }
        }
        Ok(Progress {
            consumed: pos,
            data: pos..pos,
        })
    }

    /// Validates `input` without extracting data: returns how many bytes
    /// belong to the body (all of `input` unless the body ends inside it).
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, ChunkedError> {
        let mut pos = 0;
        while pos < input.len() && !self.is_done() {
            pos += self.decode(&input[pos..])?.consumed;
        }
        Ok(pos)
    }

    fn advance_data(&mut self, n: u64) {
        if let State::Data { remaining } = self.state {
            let left = remaining - n;
            self.state = if left == 0 {
                State::DataCr
            } else {
                State::Data { remaining: left }
            };
        }
    }

    fn framing_byte(&mut self, b: u8) -> Result<(), ChunkedError> {
        self.state = match self.state {
            State::Size { value, digits } => self.size_byte(value, digits, b)?,
            State::Ext {
                value,
                seen_semicolon,
            } => self.ext_byte(value, seen_semicolon, b)?,
            State::SizeLf { value } => {
                expect_lf(b)?;
                self.line_len = 0;
                if value == 0 {
                    State::TrailerStart
                } else {
                    State::Data { remaining: value }
                }
            }
            State::DataCr => {
                expect_cr(b)?;
                State::DataLf
            }
            State::DataLf => {
                expect_lf(b)?;
                State::Size {
                    value: 0,
                    digits: 0,
                }
            }
            State::TrailerStart => self.trailer_byte(true, b)?,
            State::TrailerLine => self.trailer_byte(false, b)?,
            State::TrailerLf { empty } => {
                expect_lf(b)?;
                if empty {
                    State::Done
                } else {
                    self.count_trailer()?;
                    State::TrailerStart
                }
            }
            // decode() never feeds these states byte by byte.
            State::Data { .. } | State::Done => self.state,
        };
        Ok(())
    }

    fn count_line(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > self.max_line {
            return Err(ChunkedError::LineTooLong);
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > self.max_trailer {
            return Err(ChunkedError::TrailerTooLarge);
        }
        Ok(())
    }

    fn size_byte(&mut self, value: u64, digits: usize, b: u8) -> Result<State, ChunkedError> {
        if let Some(d) = hex_value(b) {
            self.count_line()?;
            if value > u64::MAX >> 4 {
                return Err(ChunkedError::SizeOverflow);
            }
            return Ok(State::Size {
                value: value << 4 | u64::from(d),
                digits: digits + 1,
            });
        }
        if digits == 0 {
            return Err(ChunkedError::MissingSize);
        }
        match b {
            b'\r' => Ok(State::SizeLf { value }),
            b';' | b' ' | b'\t' => {
                self.count_line()?;
                Ok(State::Ext {
                    value,
                    seen_semicolon: b == b';',
                })
            }
            _ => Err(ChunkedError::InvalidSize),
        }
    }

    fn ext_byte(&mut self, value: u64, seen_semicolon: bool, b: u8) -> Result<State, ChunkedError> {
        match b {
            b'\r' => Ok(State::SizeLf { value }),
            b'\n' => Err(ChunkedError::BadLineEnding),
            // Only whitespace may sit between the digits and the first ';'.
            b' ' | b'\t' if !seen_semicolon => {
                self.count_line()?;
                Ok(State::Ext {
                    value,
                    seen_semicolon: false,
                })
            }
            b';' => {
                self.count_line()?;
                Ok(State::Ext {
                    value,
                    seen_semicolon: true,
                })
            }
            _ if !seen_semicolon => Err(ChunkedError::InvalidSize),
            // Extension names and values (quoted strings included) are
            // forwarded untouched; only control bytes are refused.
            b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                self.count_line()?;
                Ok(State::Ext {
                    value,
                    seen_semicolon: true,
                })
            }
            _ => Err(ChunkedError::InvalidSize),
        }
    }

    fn trailer_byte(&mut self, line_start: bool, b: u8) -> Result<State, ChunkedError> {
        if b == b'\r' {
            self.count_trailer()?;
            return Ok(State::TrailerLf { empty: line_start });
        }
        if b == b'\n' {
            return Err(ChunkedError::BadLineEnding);
        }
        // Obsolete line folding and control bytes have no business in a
        // trailer; field syntax beyond that is the consumer's concern.
        if (line_start && (b == b' ' || b == b'\t')) || (b < 0x20 && b != b'\t') || b == 0x7f {
            return Err(ChunkedError::InvalidTrailer);
        }
        self.count_trailer()?;
        Ok(State::TrailerLine)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn expect_cr(b: u8) -> Result<(), ChunkedError> {
    if b == b'\r' {
        Ok(())
    } else {
        Err(ChunkedError::BadLineEnding)
    }
}

fn expect_lf(b: u8) -> Result<(), ChunkedError> {
    if b == b'\n' {
        Ok(())
    } else {
        Err(ChunkedError::BadLineEnding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Feeds `pieces` in order; returns the decoded data and total consumed.
    fn feed(dec: &mut ChunkedDecoder, pieces: &[&[u8]]) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let mut pos = 0;
            while pos < piece.len() && !dec.is_done() {
                let p = dec.decode(&piece[pos..])?;
                out.extend_from_slice(&piece[pos..][p.data]);
                pos += p.consumed;
            }
            consumed += pos;
        }
        Ok((out, consumed))
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut dec = ChunkedDecoder::new();
        let (out, consumed) = feed(&mut dec, &[input])?;
        Ok((out, consumed, dec.is_done()))
    }

    const BODY: &[u8] = b"5\r\nhello\r\n1;ext=1\r\n \r\nA ; a=\"q;x\" ;b\r\n0123456789\r\n000\r\nX-Trailer: yes\r\nX-Two:\tz\r\n\r\n";

    #[test]
    fn decodes_sizes_extensions_and_trailers() {
        let (out, consumed, done) = decode_all(BODY).expect("valid body");
        assert_eq!(out, b"hello 0123456789");
        assert_eq!(consumed, BODY.len());
        assert!(done);
    }

    #[test]
    fn split_at_every_byte_gives_same_result() {
        for cut in 0..=BODY.len() {
            let mut dec = ChunkedDecoder::new();
            let (out, consumed) = feed(&mut dec, &[&BODY[..cut], &BODY[cut..]]).expect("valid");
            assert_eq!(out, b"hello 0123456789", "cut at {cut}");
            assert_eq!(consumed, BODY.len());
            assert!(dec.is_done());
        }
    }

    #[test]
    fn byte_by_byte_feeding_works() {
        let pieces: Vec<&[u8]> = BODY.chunks(1).collect();
        let mut dec = ChunkedDecoder::new();
        let (out, consumed) = feed(&mut dec, &pieces).expect("valid");
        assert_eq!(out, b"hello 0123456789");
        assert_eq!(consumed, BODY.len());
        assert!(dec.is_done());
    }

    #[test]
    fn decode_stops_after_each_data_run() {
        let input = b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
        let mut dec = ChunkedDecoder::new();
        let p = dec.decode(input).expect("valid");
        assert_eq!(
            p,
            Progress {
                consumed: 6,
                data: 3..6
            }
        );
        let p = dec.decode(&input[6..]).expect("valid");
        assert_eq!(
            p,
            Progress {
                consumed: 8,
                data: 5..8
            }
        );
        let p = dec.decode(&input[14..]).expect("valid");
        assert_eq!(p.consumed, input.len() - 14);
        assert!(p.data.is_empty());
        assert!(dec.is_done());
    }

    #[test]
    fn scan_stops_at_end_of_body_and_leaves_the_rest() {
        let mut input = BODY.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let mut dec = ChunkedDecoder::new();
        assert_eq!(dec.scan(&input), Ok(BODY.len()));
        assert!(dec.is_done());
        assert_eq!(dec.scan(b"more"), Ok(0), "nothing is consumed once done");
    }

    #[test]
    fn scan_split_at_every_byte_matches_body_length() {
        for cut in 0..=BODY.len() {
            let mut dec = ChunkedDecoder::new();
            let a = dec.scan(&BODY[..cut]).expect("valid prefix");
            assert_eq!(a, cut);
            assert!(!dec.is_done() || cut == BODY.len());
            let b = dec.scan(&BODY[cut..]).expect("valid suffix");
            assert_eq!(a + b, BODY.len());
            assert!(dec.is_done());
        }
    }

    #[test]
    fn incomplete_body_is_not_done() {
        for end in [0, 3, 8, 10, BODY.len() - 1] {
            let (_, consumed, done) = decode_all(&BODY[..end]).expect("valid prefix");
            assert_eq!(consumed, end);
            assert!(!done, "prefix of {end} bytes");
        }
    }

    #[test]
    fn largest_size_is_accepted_and_one_more_digit_overflows() {
        let mut dec = ChunkedDecoder::new();
        let p = dec.decode(b"ffffffffffffffff\r\nab").expect("fits in u64");
        assert_eq!(p.data, 18..20);
        assert!(!dec.is_done());
        assert_eq!(
            decode_all(b"10000000000000000\r\n"),
            Err(ChunkedError::SizeOverflow)
        );
        assert_eq!(
            decode_all(b"00000000000000000000000001\r\nx\r\n0\r\n\r\n").map(|r| r.0),
            Ok(b"x".to_vec()),
            "leading zeros do not overflow"
        );
    }

    #[test]
    fn malformed_framing_is_rejected() {
        let cases: &[(&[u8], ChunkedError)] = &[
            (b"\r\n", ChunkedError::MissingSize),
            (b";ext\r\n", ChunkedError::MissingSize),
            (b"-5\r\n", ChunkedError::MissingSize),
            (b"0x5\r\n", ChunkedError::InvalidSize),
            (b"5g\r\n", ChunkedError::InvalidSize),
            (b"5 x\r\n", ChunkedError::InvalidSize),
            (b"5;a\x01\r\n", ChunkedError::InvalidSize),
            (b"5\nhello\r\n", ChunkedError::InvalidSize),
            (b"5;ext\nhello", ChunkedError::BadLineEnding),
            (b"5\rhello", ChunkedError::BadLineEnding),
            (b"5\r\nhelloX", ChunkedError::BadLineEnding),
            (b"5\r\nhello\rX", ChunkedError::BadLineEnding),
            (b"0\r\nX: y\n", ChunkedError::BadLineEnding),
            (b"0\r\n\n", ChunkedError::BadLineEnding),
            (b"0\r\n\rX", ChunkedError::BadLineEnding),
            (
                b"0\r\nX: y\r\n folded\r\n\r\n",
                ChunkedError::InvalidTrailer,
            ),
            (b"0\r\nX: \x00\r\n\r\n", ChunkedError::InvalidTrailer),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_all(input).map(|r| r.0),
                Err(*want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn size_line_and_trailer_limits_hold() {
        let mut dec = ChunkedDecoder::with_limits(8, 16);
        assert_eq!(dec.scan(b"5;abcdefg"), Err(ChunkedError::LineTooLong));
        let mut dec = ChunkedDecoder::with_limits(8, 16);
        assert!(
            dec.scan(b"5;abcdef\r\nhello\r\n").is_ok(),
            "limit is inclusive"
        );
        let mut dec = ChunkedDecoder::with_limits(8, 16);
        assert_eq!(dec.scan(b"000000005\r\n"), Err(ChunkedError::LineTooLong));

        let mut dec = ChunkedDecoder::with_limits(8, 16);
        assert_eq!(
            dec.scan(b"0\r\nX-Long-Trailer: 1\r\n\r\n"),
            Err(ChunkedError::TrailerTooLarge)
        );
        let mut dec = ChunkedDecoder::with_limits(8, 16);
        assert_eq!(dec.scan(b"0\r\nX: 12345678\r\n\r\n"), Ok(18));
        assert!(dec.is_done());
    }

    #[test]
    fn slow_drip_size_line_is_bounded_across_calls() {
        let mut dec = ChunkedDecoder::with_limits(16, 16);
        assert!(dec.scan(b"1;").is_ok());
        let mut result = Ok(0);
        for _ in 0..32 {
            result = dec.scan(b"x");
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ChunkedError::LineTooLong));
    }

    /// Encodes `body` with random chunk sizes, extensions and trailers.
    fn encode(rng: &mut StdRng, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(300));
            if rng.gen_bool(0.5) {
                out.extend_from_slice(format!("{n:x}").as_bytes());
            } else {
                out.extend_from_slice(format!("{n:04X};k=v").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        if rng.gen_bool(0.5) {
            out.extend_from_slice(b"Etag: \"x\"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn random_encodings_round_trip_under_random_splits() {
        let mut rng = StdRng::seed_from_u64(0x6e63726f);
        for _ in 0..200 {
            let len = rng.gen_range(0..2000);
            let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let wire = encode(&mut rng, &body);
            let mut pieces = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(64));
                pieces.push(&rest[..n]);
                rest = &rest[n..];
            }
            let mut dec = ChunkedDecoder::new();
            let (out, consumed) = feed(&mut dec, &pieces).expect("valid encoding");
            assert_eq!(out, body);
            assert_eq!(consumed, wire.len());
            assert!(dec.is_done());
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(7);
        let alphabet = b"0123456789abcdefABCDEF;= \t\r\nxX:\"";
        for _ in 0..2000 {
            let len = rng.gen_range(0..64);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let mut dec = ChunkedDecoder::new();
            if let Ok(n) = dec.scan(&input) {
                assert!(n <= input.len());
            }
        }
    }
}
