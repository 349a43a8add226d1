//! Nix's base32: the encoding of store path hashes and of `sha256:` hashes
//! in narinfos.
//!
//! It is not RFC 4648. The alphabet omits `e`, `o`, `u` and `t`, and the
//! bits are taken from the *end* of the byte string: the first character
//! carries the highest 5-bit group of the last byte. Any reimplementation
//! that walks the bytes front to back produces different strings, so the
//! tests pin outputs taken from `nix-hash --to-base32`.

use super::store_path::NIX_BASE32_ALPHABET;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Base32Error {
    #[error("invalid base32 character {ch:?} at position {pos}")]
    InvalidChar { ch: char, pos: usize },
    #[error("base32 string length {0} is not the encoding of a whole number of bytes")]
    InvalidLength(usize),
    /// The unused high bits of the first character were set. Nix rejects
    /// these too; accepting them would give one hash several spellings.
    #[error("base32 string has non-zero padding bits")]
    NonCanonical,
}

/// Character -> digit value, 0xff for characters outside the alphabet.
const fn build_digit_table() -> [u8; 256] {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < NIX_BASE32_ALPHABET.len() {
        t[NIX_BASE32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
}

static DIGIT: [u8; 256] = build_digit_table();

/// Number of characters [`encode`] produces for `n_bytes` bytes.
pub const fn encoded_len(n_bytes: usize) -> usize {
    if n_bytes == 0 {
        0
    } else {
        (n_bytes * 8 - 1) / 5 + 1
    }
}

/// Encodes `bytes` in Nix's base32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = u32::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&b| u32::from(b) << (8 - j));
        let digit = ((low | high) & 0x1f) as usize;
        out.push(char::from(NIX_BASE32_ALPHABET[digit]));
    }
    out
}

/// Decodes a Nix base32 string. Only the canonical spelling is accepted:
/// the length must be `encoded_len` of some byte count and the spare high
/// bits must be zero, so `encode(decode(s)?) == s` always holds.
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    let chars = s.as_bytes();
    let n_bytes = chars.len() * 5 / 8;
    if encoded_len(n_bytes) != chars.len() {
        return Err(Base32Error::InvalidLength(chars.len()));
    }
    let mut out = vec![0u8; n_bytes];
    for (pos, &c) in chars.iter().enumerate() {
        let digit = DIGIT[usize::from(c)];
        if digit == 0xff {
            return Err(invalid_char(s, pos));
        }
        // The last character holds bit group 0.
        let bit = (chars.len() - 1 - pos) * 5;
        let (i, j) = (bit / 8, bit % 8);
        let digit = u32::from(digit);
        out[i] |= (digit << j) as u8;
        let spill = (digit >> (8 - j)) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= spill,
            None if spill != 0 => return Err(Base32Error::NonCanonical),
            None => {}
        }
    }
    Ok(out)
}

fn invalid_char(s: &str, byte_pos: usize) -> Base32Error {
    // Report the whole character even when the offending byte starts a
    // multi-byte UTF-8 sequence.
    let ch = s[byte_pos..].chars().next().unwrap_or('\u{fffd}');
    Base32Error::InvalidChar { ch, pos: byte_pos }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (hex digest, `nix-hash --type <algo> --to-base32` output) pairs,
    /// produced with Nix 2.8.0.
    const VECTORS: &[(&str, &str)] = &[
        // sha256("")
        (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ),
        // sha256("abc")
        (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        ),
        // sha1("abc")
        (
            "a9993e364706816aba3e25717850c26c9cd0d89d",
            "kpcd173cq987hw957sx6m0868wv3x6d9",
        ),
        // md5("abc")
        (
            "900150983cd24fb0d6963f7d28e17f72",
            "3jgzhjhz9zjvbb0kyj7jc500ch",
        ),
        // sha512("abc")
        (
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1\
             ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx",
        ),
    ];

    #[test]
    fn matches_nix_hash_vectors() {
        for (hex_digest, b32) in VECTORS {
            let bytes = hex::decode(hex_digest).unwrap();
            assert_eq!(encode(&bytes), *b32, "encode {hex_digest}");
            assert_eq!(decode(b32).unwrap(), bytes, "decode {b32}");
            assert_eq!(encoded_len(bytes.len()), b32.len());
        }
    }

    #[test]
    fn encoded_lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(5), 8);
        assert_eq!(encoded_len(20), 32); // store path hash
        assert_eq!(encoded_len(32), 52); // sha256
        assert_eq!(encoded_len(64), 103); // sha512
    }

    #[test]
    fn empty_round_trips() {
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn single_bytes_use_reversed_bit_order() {
        // 0x01: group 0 (last char) is 1, group 1 (first char) is 0.
        assert_eq!(encode(&[0x01]), "01");
        // 0x20 = 0b0010_0000: group 0 = 0, group 1 = bits 5..7 = 1.
        assert_eq!(encode(&[0x20]), "10");
        assert_eq!(encode(&[0xff]), "7z");
    }

    #[test]
    fn rejects_bad_characters() {
        let valid = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        for bad in ['e', 'o', 'u', 't', 'A', '=', ' ', '-'] {
            let s = format!("{}{bad}", &valid[..51]);
            assert_eq!(
                decode(&s),
                Err(Base32Error::InvalidChar { ch: bad, pos: 51 }),
                "{s:?}"
            );
        }
        // A two-byte character in a string of valid length (4 bytes).
        assert_eq!(
            decode("0\u{e9}0"),
            Err(Base32Error::InvalidChar {
                ch: '\u{e9}',
                pos: 1
            })
        );
    }

    #[test]
    fn rejects_lengths_that_no_byte_count_encodes_to() {
        // 3 chars = 15 bits: 1 byte encodes to 2 chars, 2 bytes to 4.
        assert_eq!(decode("000"), Err(Base32Error::InvalidLength(3)));
        assert_eq!(decode("0"), Err(Base32Error::InvalidLength(1)));
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7"),
            Err(Base32Error::InvalidLength(51))
        );
    }

    #[test]
    fn rejects_non_canonical_padding_bits() {
        // 52 chars carry 260 bits for 256: the first char holds 4 bits only.
        let canonical = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert!(decode(canonical).is_ok());
        let mut bad = String::from("z");
        bad.push_str(&canonical[1..]);
        assert_eq!(decode(&bad), Err(Base32Error::NonCanonical));
        // 2 chars carry 10 bits for 8: first char must be < 8.
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
        assert_eq!(decode("8z"), Err(Base32Error::NonCanonical));
    }

    /// Deterministic generator for the property tests (splitmix64).
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn property_decode_inverts_encode() {
        let mut seed = 1;
        for round in 0..2000 {
            let len = round % 70;
            let bytes: Vec<u8> = (0..len).map(|_| next(&mut seed) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert!(s.bytes().all(super::super::store_path::is_base32_char));
            assert_eq!(decode(&s).unwrap(), bytes, "round {round}");
        }
    }

    #[test]
    fn property_every_accepted_string_is_canonical() {
        // Random strings over the alphabet either fail or re-encode to
        // themselves: one hash never has two accepted spellings.
        let mut seed = 7;
        let (mut accepted, mut rejected) = (0, 0);
        for round in 0..4000 {
            let len = round % 20;
            let s: String = (0..len)
                .map(|_| char::from(NIX_BASE32_ALPHABET[(next(&mut seed) % 32) as usize]))
                .collect();
            match decode(&s) {
                Ok(bytes) => {
                    accepted += 1;
                    assert_eq!(encode(&bytes), s);
                }
                Err(_) => rejected += 1,
            }
        }
        assert!(accepted > 100 && rejected > 100, "{accepted}/{rejected}");
    }
}
