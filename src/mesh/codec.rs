//! The gossip wire format, byte-compatible with ncro 2.2 (see
//! docs/mesh.md): a datagram is the sender's 32-byte ed25519 public key,
//! a 64-byte signature over the body, then the MessagePack body, an array
//! `["Announce", node_id, timestamp_ns, [route, ...]]` where each route is
//! a 12-element array. Pure functions only: no sockets, no clocks.

use ed25519_dalek::{Signer as _, SigningKey};
use thiserror::Error;

use super::msgpack::{self as mp, Container, DecodeError, Reader};
use super::rfc3339;

/// Largest datagram sent or accepted: ncro 2.2 receivers read into a
/// buffer of this size, and it stays under a 1500-byte Ethernet MTU.
pub const MAX_DATAGRAM: usize = 1400;
pub const KEY_LEN: usize = 32;
pub const SIG_LEN: usize = 64;
/// Public key plus signature, before the body.
pub const HEADER_LEN: usize = KEY_LEN + SIG_LEN;
/// The only message type (a serde unit variant, sent as its name).
const ANNOUNCE: &str = "Announce";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("packet too short: {0} bytes")]
    TooShort(usize),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("message has {0} fields, want 4")]
    MessageLength(usize),
    #[error("route has {0} fields, want 12")]
    RouteLength(usize),
    #[error("unknown message type")]
    UnknownType,
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("field {0} is not an RFC 3339 timestamp")]
    BadTimestamp(&'static str),
    #[error("{0} bytes after the message")]
    TrailingBytes(usize),
}

/// One route as gossiped (ncro 2.2's `RouteEntry`). Times are unix seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct WireRoute {
    /// The 32-character store hash (not validated here).
    pub store_path: String,
    pub upstream_url: String,
    pub latency_ms: f64,
    pub latency_ema: f64,
    pub last_verified: i64,
    pub query_count: u32,
    pub failure_count: u32,
    /// Absolute expiry.
    pub ttl: i64,
    pub nar_hash: String,
    pub nar_size: u64,
    pub nar_url: String,
    pub narinfo: Option<Vec<u8>>,
}

/// A decoded `Announce` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    pub node_id: String,
    /// Nanoseconds since the Unix epoch at send time.
    pub timestamp: i64,
    pub routes: Vec<WireRoute>,
}

/// A datagram split into its parts (nothing verified yet).
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub sender: [u8; KEY_LEN],
    pub signature: [u8; SIG_LEN],
    pub body: &'a [u8],
}

impl<'a> Datagram<'a> {
    pub fn split(packet: &'a [u8]) -> Result<Self, CodecError> {
        if packet.len() < HEADER_LEN {
            return Err(CodecError::TooShort(packet.len()));
        }
        let (key, rest) = packet.split_at(KEY_LEN);
        let (sig, body) = rest.split_at(SIG_LEN);
        Ok(Datagram {
            sender: key.try_into().expect("split at KEY_LEN"),
            signature: sig.try_into().expect("split at SIG_LEN"),
            body,
        })
    }
}

/// Key, signature over `body`, body.
pub fn seal(key: &SigningKey, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(key.verifying_key().as_bytes());
    out.extend_from_slice(&key.sign(body).to_bytes());
    out.extend_from_slice(body);
    out
}

/// One route, encoded exactly as rmp-serde encodes ncro 2.2's struct.
pub fn encode_route(out: &mut Vec<u8>, r: &WireRoute, with_narinfo: bool) {
    mp::write_array_len(out, 12);
    mp::write_str(out, &r.store_path);
    mp::write_str(out, &r.upstream_url);
    mp::write_f64(out, r.latency_ms);
    mp::write_f64(out, r.latency_ema);
    mp::write_str(out, &rfc3339::format(r.last_verified));
    mp::write_uint(out, u64::from(r.query_count));
    mp::write_uint(out, u64::from(r.failure_count));
    mp::write_str(out, &rfc3339::format(r.ttl));
    mp::write_str(out, &r.nar_hash);
    mp::write_uint(out, r.nar_size);
    mp::write_str(out, &r.nar_url);
    match &r.narinfo {
        Some(b) if with_narinfo => mp::write_byte_array(out, b),
        _ => mp::write_nil(out),
    }
}

/// The message header up to (and including) the routes array length.
fn encode_header(out: &mut Vec<u8>, node_id: &str, timestamp: i64, routes: usize) {
    mp::write_array_len(out, 4);
    mp::write_str(out, ANNOUNCE);
    mp::write_str(out, node_id);
    mp::write_sint(out, timestamp);
    mp::write_array_len(out, routes);
}

/// A whole message body.
pub fn encode_announce(a: &Announce) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + a.routes.len() * 256);
    encode_header(&mut out, &a.node_id, a.timestamp, a.routes.len());
    for r in &a.routes {
        encode_route(&mut out, r, true);
    }
    out
}

/// A signed `Announce` with no routes: a node sends it to every peer when
/// it starts, and peers answer with the routes it missed
/// (`super::catch_up`). ncro 2.2 reads it as an announcement of nothing.
pub fn hello(key: &SigningKey, node_id: &str, timestamp: i64) -> Outgoing {
    let mut body = Vec::with_capacity(48);
    encode_header(&mut body, node_id, timestamp, 0);
    Outgoing {
        bytes: seal(key, &body),
        routes: 0,
    }
}

/// One signed datagram ready to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    /// Routes it carries.
    pub routes: usize,
}

/// Routes packed into datagrams of at most [`MAX_DATAGRAM`] bytes.
#[derive(Debug, Default)]
pub struct Packed {
    pub datagrams: Vec<Outgoing>,
    /// Routes sent without their narinfo bytes to fit.
    pub stripped: usize,
    /// Routes that do not fit a datagram even without narinfo bytes.
    pub unsendable: usize,
    pub sent: usize,
}

/// Splits `routes` into signed datagrams none above [`MAX_DATAGRAM`]
/// bytes, in order. `next_timestamp` gives each datagram its timestamp;
/// receivers require them strictly increasing per sender.
pub fn pack(
    key: &SigningKey,
    node_id: &str,
    routes: &[WireRoute],
    mut next_timestamp: impl FnMut() -> i64,
) -> Packed {
    let mut out = Packed::default();
    // Worst case header: a 9-byte timestamp and a 3-byte array16 length.
    let mut probe = Vec::new();
    encode_header(&mut probe, node_id, i64::MAX, 0xffff);
    let budget = MAX_DATAGRAM.saturating_sub(HEADER_LEN + probe.len());
    let mut group: Vec<u8> = Vec::with_capacity(MAX_DATAGRAM);
    let mut count = 0usize;
    let mut one = Vec::with_capacity(MAX_DATAGRAM);
    let mut flush = |group: &mut Vec<u8>, count: &mut usize, out: &mut Packed| {
        if *count == 0 {
            return;
        }
        let mut body = Vec::with_capacity(probe.len() + group.len());
        encode_header(&mut body, node_id, next_timestamp(), *count);
        body.extend_from_slice(group);
        out.datagrams.push(Outgoing {
            bytes: seal(key, &body),
            routes: *count,
        });
        group.clear();
        *count = 0;
    };
    for r in routes {
        one.clear();
        encode_route(&mut one, r, true);
        if one.len() > budget {
            one.clear();
            encode_route(&mut one, r, false);
            if one.len() > budget {
                out.unsendable += 1;
                continue;
            }
            out.stripped += usize::from(r.narinfo.is_some());
        }
        if group.len() + one.len() > budget {
            flush(&mut group, &mut count, &mut out);
        }
        group.extend_from_slice(&one);
        count += 1;
        out.sent += 1;
    }
    flush(&mut group, &mut count, &mut out);
    out
}

/// Decodes a message body, array form or map form.
pub fn decode_announce(body: &[u8]) -> Result<Announce, CodecError> {
    let mut r = Reader::new(body);
    let msg = match r.container()? {
        Container::Array(4) => {
            message_type(&mut r)?;
            let node_id = r.str()?.to_owned();
            let timestamp = r.i64("timestamp")?;
            let routes = decode_routes(&mut r)?;
            Announce {
                node_id,
                timestamp,
                routes,
            }
        }
        Container::Array(n) => return Err(CodecError::MessageLength(n)),
        Container::Map(n) => decode_announce_map(&mut r, n)?,
    };
    match r.remaining() {
        0 => Ok(msg),
        n => Err(CodecError::TrailingBytes(n)),
    }
}

/// serde reads a unit variant from its name or its index (0).
fn message_type(r: &mut Reader<'_>) -> Result<(), CodecError> {
    let ok = match r.peek()? {
        0xa0..=0xbf | 0xd9..=0xdb => r.str()? == ANNOUNCE,
        _ => r.int()? == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(CodecError::UnknownType)
    }
}

fn decode_announce_map(r: &mut Reader<'_>, n: usize) -> Result<Announce, CodecError> {
    let (mut seen_type, mut node_id, mut timestamp, mut routes) = (false, None, None, None);
    for _ in 0..n {
        match r.str()? {
            "type" => {
                message_type(r)?;
                seen_type = true;
            }
            "node_id" => node_id = Some(r.str()?.to_owned()),
            "timestamp" => timestamp = Some(r.i64("timestamp")?),
            "routes" => routes = Some(decode_routes(r)?),
            _ => r.skip(0)?,
        }
    }
    if !seen_type {
        return Err(CodecError::MissingField("type"));
    }
    Ok(Announce {
        node_id: node_id.ok_or(CodecError::MissingField("node_id"))?,
        timestamp: timestamp.ok_or(CodecError::MissingField("timestamp"))?,
        routes: routes.ok_or(CodecError::MissingField("routes"))?,
    })
}

fn decode_routes(r: &mut Reader<'_>) -> Result<Vec<WireRoute>, CodecError> {
    let n = match r.container()? {
        Container::Array(n) => n,
        Container::Map(_) => {
            return Err(DecodeError::Unexpected {
                expected: "routes array",
                marker: 0x80,
            }
            .into())
        }
    };
    (0..n).map(|_| decode_route(r)).collect()
}

/// Field order of a route, as in ncro 2.2's struct.
const ROUTE_FIELDS: [&str; 12] = [
    "store_path",
    "upstream_url",
    "latency_ms",
    "latency_ema",
    "last_verified",
    "query_count",
    "failure_count",
    "ttl",
    "nar_hash",
    "nar_size",
    "nar_url",
    "narinfo_bytes",
];

#[derive(Default)]
struct RouteFields {
    store_path: Option<String>,
    upstream_url: Option<String>,
    latency_ms: Option<f64>,
    latency_ema: Option<f64>,
    last_verified: Option<i64>,
    query_count: Option<u32>,
    failure_count: Option<u32>,
    ttl: Option<i64>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    nar_url: Option<String>,
    /// Outer None: absent; inner None: nil.
    narinfo: Option<Option<Vec<u8>>>,
}

fn time(r: &mut Reader<'_>, field: &'static str) -> Result<i64, CodecError> {
    rfc3339::parse(r.str()?).ok_or(CodecError::BadTimestamp(field))
}

fn u32_field(r: &mut Reader<'_>, field: &'static str) -> Result<u32, CodecError> {
    u32::try_from(r.int()?).map_err(|_| DecodeError::OutOfRange(field).into())
}

impl RouteFields {
    /// Reads the value of field `i` of [`ROUTE_FIELDS`].
    fn read(&mut self, r: &mut Reader<'_>, i: usize) -> Result<(), CodecError> {
        match i {
            0 => self.store_path = Some(r.str()?.to_owned()),
            1 => self.upstream_url = Some(r.str()?.to_owned()),
            2 => self.latency_ms = Some(r.f64()?),
            3 => self.latency_ema = Some(r.f64()?),
            4 => self.last_verified = Some(time(r, "last_verified")?),
            5 => self.query_count = Some(u32_field(r, "query_count")?),
            6 => self.failure_count = Some(u32_field(r, "failure_count")?),
            7 => self.ttl = Some(time(r, "ttl")?),
            8 => self.nar_hash = Some(r.str()?.to_owned()),
            9 => self.nar_size = Some(r.u64("nar_size")?),
            10 => self.nar_url = Some(r.str()?.to_owned()),
            _ => self.narinfo = Some(if r.nil()? { None } else { Some(r.bytes()?) }),
        }
        Ok(())
    }

    fn finish(self) -> Result<WireRoute, CodecError> {
        let missing = |i: usize| CodecError::MissingField(ROUTE_FIELDS[i]);
        Ok(WireRoute {
            store_path: self.store_path.ok_or(missing(0))?,
            upstream_url: self.upstream_url.ok_or(missing(1))?,
            latency_ms: self.latency_ms.ok_or(missing(2))?,
            latency_ema: self.latency_ema.ok_or(missing(3))?,
            last_verified: self.last_verified.ok_or(missing(4))?,
            query_count: self.query_count.ok_or(missing(5))?,
            failure_count: self.failure_count.ok_or(missing(6))?,
            ttl: self.ttl.ok_or(missing(7))?,
            nar_hash: self.nar_hash.ok_or(missing(8))?,
            nar_size: self.nar_size.ok_or(missing(9))?,
            nar_url: self.nar_url.ok_or(missing(10))?,
            // serde fills a missing Option field with None.
            narinfo: self.narinfo.unwrap_or(None),
        })
    }
}

fn decode_route(r: &mut Reader<'_>) -> Result<WireRoute, CodecError> {
    let mut f = RouteFields::default();
    match r.container()? {
        Container::Array(12) => {
            for i in 0..12 {
                f.read(r, i)?;
            }
        }
        Container::Array(n) => return Err(CodecError::RouteLength(n)),
        Container::Map(n) => {
            for _ in 0..n {
                let name = r.str()?;
                match ROUTE_FIELDS.iter().position(|&f| f == name) {
                    Some(i) => f.read(r, i)?,
                    None => r.skip(0)?,
                }
            }
        }
    }
    f.finish()
}

#[cfg(test)]
#[path = "codec/tests.rs"]
pub(crate) mod tests;
