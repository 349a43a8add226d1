//! The slice of MessagePack the gossip format uses, written by hand so the
//! exact bytes ncro 2.2 (rmp-serde 1.3) produces are under our control and
//! the reader can be fuzzed without a serde layer in between.
//!
//! Writers always pick the smallest encoding, as rmp does. The reader is
//! tolerant where rmp-serde is (any integer width, float32 or integers for
//! floats, `bin` or an array of integers for bytes) and strict elsewhere.
//! Every length is checked against the bytes left before anything is
//! allocated, so a hostile length costs nothing.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message ends early")]
    Truncated,
    #[error("expected {expected}, found marker 0x{marker:02x}")]
    Unexpected { expected: &'static str, marker: u8 },
    #[error("integer out of range for {0}")]
    OutOfRange(&'static str),
    #[error("string is not UTF-8")]
    NotUtf8,
    #[error("values nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Nesting allowed when skipping a value nobody asked for (unknown map keys).
pub const MAX_DEPTH: usize = 16;

pub fn write_array_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x90 | n as u8),
        16..=0xffff => {
            out.push(0xdc);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdd);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    match n {
        0..=31 => out.push(0xa0 | n as u8),
        32..=0xff => out.extend_from_slice(&[0xd9, n as u8]),
        0x100..=0xffff => {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

/// Smallest unsigned form; rmp writes non-negative signed values this way too.
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0x7f => out.push(v as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// rmp's `write_sint`: non-negative values as [`write_uint`], negative
/// ones in the smallest signed form.
pub fn write_sint(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        return write_uint(out, v as u64);
    }
    match v {
        -32..=-1 => out.push(v as i8 as u8),
        -128..=-33 => out.extend_from_slice(&[0xd0, v as i8 as u8]),
        -32768..=-129 => {
            out.push(0xd1);
            out.extend_from_slice(&(v as i16).to_be_bytes());
        }
        -2_147_483_648..=-32769 => {
            out.push(0xd2);
            out.extend_from_slice(&(v as i32).to_be_bytes());
        }
        _ => {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

/// Bytes the way serde writes a `Vec<u8>` without serde_bytes: an array
/// with one unsigned integer per byte (ncro 2.2's `narinfo_bytes`).
pub fn write_byte_array(out: &mut Vec<u8>, bytes: &[u8]) {
    write_array_len(out, bytes.len());
    for &b in bytes {
        write_uint(out, u64::from(b));
    }
}

/// Encoded size of [`write_byte_array`] without writing it.
pub fn byte_array_len(bytes: &[u8]) -> usize {
    let header = match bytes.len() {
        0..=15 => 1,
        16..=0xffff => 3,
        _ => 5,
    };
    header
        + bytes
            .iter()
            .map(|&b| if b < 0x80 { 1 } else { 2 })
            .sum::<usize>()
}

/// A container header: array or map, with its element count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Array(usize),
    Map(usize),
}

/// A cursor over one MessagePack value sequence.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn peek(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated)
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
    }

    /// A length that must be coverable by what is left (each element or
    /// byte takes at least `per_item` bytes).
    fn checked_len(&self, n: u64, per_item: usize) -> Result<usize, DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        match n.checked_mul(per_item) {
            Some(need) if need <= self.remaining() => Ok(n),
            _ => Err(DecodeError::Truncated),
        }
    }

    pub fn container(&mut self) -> Result<Container, DecodeError> {
        let m = self.byte()?;
        let (map, n) = match m {
            0x90..=0x9f => (false, u64::from(m & 0x0f)),
            0x80..=0x8f => (true, u64::from(m & 0x0f)),
            0xdc => (false, self.be(2)?),
            0xdd => (false, self.be(4)?),
            0xde => (true, self.be(2)?),
            0xdf => (true, self.be(4)?),
            _ => {
                return Err(DecodeError::Unexpected {
                    expected: "array or map",
                    marker: m,
                })
            }
        };
        if map {
            Ok(Container::Map(self.checked_len(n, 2)?))
        } else {
            Ok(Container::Array(self.checked_len(n, 1)?))
        }
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let m = self.byte()?;
        let n = match m {
            0xa0..=0xbf => u64::from(m & 0x1f),
            0xd9 => self.be(1)?,
            0xda => self.be(2)?,
            0xdb => self.be(4)?,
            _ => {
                return Err(DecodeError::Unexpected {
                    expected: "string",
                    marker: m,
                })
            }
        };
        let n = self.checked_len(n, 1)?;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::NotUtf8)
    }

    /// Any integer, as i128 so every msgpack integer fits.
    pub fn int(&mut self) -> Result<i128, DecodeError> {
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => i128::from(m),
            0xe0..=0xff => i128::from(m as i8),
            0xcc => i128::from(self.be(1)?),
            0xcd => i128::from(self.be(2)?),
            0xce => i128::from(self.be(4)?),
            0xcf => i128::from(self.be(8)?),
            0xd0 => i128::from(self.be(1)? as u8 as i8),
            0xd1 => i128::from(self.be(2)? as u16 as i16),
            0xd2 => i128::from(self.be(4)? as u32 as i32),
            0xd3 => i128::from(self.be(8)? as i64),
            _ => {
                return Err(DecodeError::Unexpected {
                    expected: "integer",
                    marker: m,
                })
            }
        })
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        u64::try_from(self.int()?).map_err(|_| DecodeError::OutOfRange(what))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        i64::try_from(self.int()?).map_err(|_| DecodeError::OutOfRange(what))
    }

    /// float64, float32 or any integer (serde's f64 visitor takes all three).
    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        match self.peek()? {
            0xcb => {
                self.pos += 1;
                Ok(f64::from_bits(self.be(8)?))
            }
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_bits(self.be(4)? as u32)))
            }
            _ => Ok(self.int()? as f64),
        }
    }

    /// Consumes a nil if one is next.
    pub fn nil(&mut self) -> Result<bool, DecodeError> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// `bin 8/16/32`, or an array of integers each 0..=255.
    pub fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let m = self.peek()?;
        let n = match m {
            0xc4..=0xc6 => {
                self.pos += 1;
                let width = 1 << (m - 0xc4);
                let n = self.be(width)?;
                let n = self.checked_len(n, 1)?;
                return Ok(self.take(n)?.to_vec());
            }
            _ => match self.container()? {
                Container::Array(n) => n,
                Container::Map(_) => {
                    return Err(DecodeError::Unexpected {
                        expected: "bytes",
                        marker: m,
                    })
                }
            },
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = u8::try_from(self.int()?).map_err(|_| DecodeError::OutOfRange("byte"))?;
            out.push(b);
        }
        Ok(out)
    }

    /// Skips one value of any type (an unknown map entry's value).
    pub fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth >= MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let m = self.peek()?;
        let data = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xca | 0xce | 0xd2 => 4,
            0xcb | 0xcf | 0xd3 => 8,
            0xd4 => 2,
            0xd5 => 3,
            0xd6 => 5,
            0xd7 => 9,
            0xd8 => 17,
            0xa0..=0xbf | 0xd9..=0xdb => return self.str().map(drop),
            0xc4..=0xc6 => return self.bytes().map(drop),
            0xc7..=0xc9 => {
                self.pos += 1;
                let n = self.be(1 << (m - 0xc7))?;
                let n = self.checked_len(n, 1)? + 1; // + the type byte
                return self.take(n).map(drop);
            }
            _ => {
                let items = match self.container()? {
                    Container::Array(n) => n,
                    Container::Map(n) => n * 2,
                };
                for _ in 0..items {
                    self.skip(depth + 1)?;
                }
                return Ok(());
            }
        };
        self.take(1 + data).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_forms_like_rmp() {
        let enc = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = Vec::new();
            f(&mut v);
            v
        };
        assert_eq!(enc(&|o| write_uint(o, 1)), [0x01]);
        assert_eq!(enc(&|o| write_uint(o, 255)), [0xcc, 0xff]);
        assert_eq!(enc(&|o| write_uint(o, 300)), [0xcd, 0x01, 0x2c]);
        assert_eq!(enc(&|o| write_uint(o, 70_000)), [0xce, 0, 1, 0x11, 0x70]);
        assert_eq!(enc(&|o| write_sint(o, 5)), [0x05]);
        assert_eq!(enc(&|o| write_sint(o, -1)), [0xff]);
        assert_eq!(enc(&|o| write_sint(o, -33)), [0xd0, 0xdf]);
        assert_eq!(enc(&|o| write_str(o, "abc")), b"\xa3abc");
        assert_eq!(enc(&|o| write_str(o, &"x".repeat(32)))[..2], [0xd9, 32]);
        assert_eq!(enc(&|o| write_array_len(o, 12)), [0x9c]);
        assert_eq!(enc(&|o| write_array_len(o, 16)), [0xdc, 0, 16]);
        assert_eq!(
            enc(&|o| write_byte_array(o, b"S\xff")),
            [0x92, 0x53, 0xcc, 0xff]
        );
        assert_eq!(byte_array_len(b"S\xff"), 4);
        let long: Vec<u8> = (0..=255).collect();
        assert_eq!(
            byte_array_len(&long),
            enc(&|o| write_byte_array(o, &long)).len()
        );
    }

    #[test]
    fn reads_every_integer_width_and_float_form() {
        let cases: &[(&[u8], i128)] = &[
            (&[0x7f], 127),
            (&[0xe0], -32),
            (&[0xcc, 0xff], 255),
            (&[0xd0, 0x80], -128),
            (&[0xd1, 0xff, 0xfe], -2),
            (
                &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                u64::MAX as i128,
            ),
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], i64::MIN as i128),
        ];
        for (bytes, want) in cases {
            assert_eq!(Reader::new(bytes).int().unwrap(), *want, "{bytes:02x?}");
        }
        assert_eq!(Reader::new(&[0xca, 0x3f, 0xc0, 0, 0]).f64().unwrap(), 1.5);
        assert_eq!(Reader::new(&[0x03]).f64().unwrap(), 3.0);
        let mut r = Reader::new(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.i64("t"), Err(DecodeError::OutOfRange("t")));
    }

    #[test]
    fn bytes_as_bin_or_array() {
        assert_eq!(Reader::new(&[0xc4, 2, 9, 8]).bytes().unwrap(), [9, 8]);
        assert_eq!(
            Reader::new(&[0x92, 0x53, 0xcc, 0xff]).bytes().unwrap(),
            [0x53, 0xff]
        );
        assert_eq!(
            Reader::new(&[0x91, 0xcd, 1, 0]).bytes(),
            Err(DecodeError::OutOfRange("byte"))
        );
    }

    #[test]
    fn hostile_lengths_fail_before_allocating() {
        // An array claiming 4 billion elements in a 5-byte message.
        assert_eq!(
            Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff]).container(),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']).str(),
            Err(DecodeError::Truncated)
        );
        let deep = [0x91; 64];
        assert_eq!(Reader::new(&deep).skip(0), Err(DecodeError::TooDeep));
    }

    #[test]
    fn skip_steps_over_any_value() {
        let mut v = Vec::new();
        v.extend_from_slice(&[0x82, 0xa1, b'a', 0x92, 0xcb]);
        v.extend_from_slice(&1.0f64.to_be_bytes());
        v.extend_from_slice(&[0xc4, 1, 0, 0xa1, b'b', 0xd6, 1, 0, 0, 0, 0, 0x07]);
        let mut r = Reader::new(&v);
        r.skip(0).unwrap();
        assert_eq!(r.int().unwrap(), 7);
        assert_eq!(r.remaining(), 0);
    }
}
