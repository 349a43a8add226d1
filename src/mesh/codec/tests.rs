use super::*;
use ed25519_dalek::{Signature, Verifier as _};

/// Concatenates hex pieces and quoted text, for readable golden bytes.
fn bytes(pieces: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p.strip_prefix('"') {
            Some(text) => out.extend_from_slice(text.strip_suffix('"').unwrap().as_bytes()),
            None => out.extend(hex::decode(p.replace(' ', "")).unwrap()),
        }
    }
    out
}

/// The one-route body ncro 2.2 sends, as captured with its locked crate
/// versions (rmp-serde 1.3.1) and written down in the reference, byte for
/// byte: array of 4, variant name, node id, `cf` timestamp, array of one
/// 12-field route, float64 latencies, RFC 3339 strings, narinfo bytes as
/// an array of uints (0xff as `cc ff`).
pub(crate) fn golden_body() -> Vec<u8> {
    bytes(&[
        "94",
        "a8",
        "\"Announce\"",
        "b0",
        "\"0011223344556677\"",
        "cf 18 b3 d4 91 bb 8d cd 15",
        "91 9c",
        "a3",
        "\"abc\"",
        "a8",
        "\"http://u\"",
        "cb 3ff8000000000000",
        "cb 4000000000000000",
        "b4",
        "\"2026-05-28T20:26:40Z\"",
        "01 00",
        "b4",
        "\"2026-05-28T20:26:40Z\"",
        "a8",
        "\"sha256:x\"",
        "cd 01 2c",
        "a9",
        "\"nar/x.nar\"",
        "92 53 cc ff",
    ])
}

pub(crate) fn golden_route() -> WireRoute {
    WireRoute {
        store_path: "abc".into(),
        upstream_url: "http://u".into(),
        latency_ms: 1.5,
        latency_ema: 2.0,
        last_verified: 1_780_000_000,
        query_count: 1,
        failure_count: 0,
        ttl: 1_780_000_000,
        nar_hash: "sha256:x".into(),
        nar_size: 300,
        nar_url: "nar/x.nar".into(),
        narinfo: Some(vec![0x53, 0xff]),
    }
}

pub(crate) const GOLDEN_TIMESTAMP: i64 = 1_780_000_000_123_456_789;

fn golden_announce() -> Announce {
    Announce {
        node_id: "0011223344556677".into(),
        timestamp: GOLDEN_TIMESTAMP,
        routes: vec![golden_route()],
    }
}

fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

#[test]
fn encodes_exactly_like_ncro_2_2() {
    assert_eq!(encode_announce(&golden_announce()), golden_body());
}

#[test]
fn decodes_the_ncro_2_2_body() {
    assert_eq!(decode_announce(&golden_body()).unwrap(), golden_announce());
}

/// The full datagram: key, deterministic ed25519 signature, body. Pinned
/// so a change in what is signed (or in framing) shows up here.
#[test]
fn golden_datagram_layout() {
    let key = test_key();
    let packet = seal(&key, &golden_body());
    assert_eq!(
        hex::encode(&packet[..KEY_LEN]),
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
    );
    assert_eq!(&packet[HEADER_LEN..], golden_body());
    let d = Datagram::split(&packet).unwrap();
    assert_eq!(d.body, golden_body());
    let sig = Signature::from_bytes(&d.signature);
    key.verifying_key().verify(d.body, &sig).unwrap();
    assert_eq!(hex::encode(d.signature), GOLDEN_SIGNATURE);
}

/// Ed25519 is deterministic; cross-checked with an independent
/// implementation (Python `cryptography`, seed 07 x 32, same body).
const GOLDEN_SIGNATURE: &str = "29daa13304b4fd8077832151e2fba632876c3f98a4427d7409a4c58833d9721ea5f6f9cec0aa9301b2b6ff8bcb2ea754e6e8108a22b903467d7517076c24410b";

#[test]
fn map_form_and_tolerated_variants_decode() {
    // {"type": 0, "node_id": .., "timestamp": i64, "routes": [{..}], "extra": [1]}
    let mut b = vec![0x85];
    mp::write_str(&mut b, "type");
    b.push(0x00); // variant index instead of its name
    mp::write_str(&mut b, "node_id");
    mp::write_str(&mut b, "n");
    mp::write_str(&mut b, "extra");
    b.extend_from_slice(&[0x91, 0x01]);
    mp::write_str(&mut b, "timestamp");
    b.extend_from_slice(&[0xd3]);
    b.extend_from_slice(&5i64.to_be_bytes());
    mp::write_str(&mut b, "routes");
    b.push(0x91);
    b.push(0x8c);
    let r = golden_route();
    mp::write_str(&mut b, "narinfo_bytes");
    b.extend_from_slice(&[0xc4, 2, 0x53, 0xff]); // bin instead of array
    mp::write_str(&mut b, "store_path");
    mp::write_str(&mut b, &r.store_path);
    mp::write_str(&mut b, "upstream_url");
    mp::write_str(&mut b, &r.upstream_url);
    mp::write_str(&mut b, "latency_ms");
    b.extend_from_slice(&[0xca]);
    b.extend_from_slice(&1.5f32.to_be_bytes());
    mp::write_str(&mut b, "latency_ema");
    b.push(0x02); // an integer for a float
    mp::write_str(&mut b, "last_verified");
    mp::write_str(&mut b, "2026-05-28T22:26:40.5+02:00");
    mp::write_str(&mut b, "query_count");
    b.extend_from_slice(&[0xce, 0, 0, 0, 1]);
    mp::write_str(&mut b, "failure_count");
    b.push(0x00);
    mp::write_str(&mut b, "ttl");
    mp::write_str(&mut b, "2026-05-28T20:26:40Z");
    mp::write_str(&mut b, "nar_hash");
    mp::write_str(&mut b, &r.nar_hash);
    mp::write_str(&mut b, "nar_size");
    b.extend_from_slice(&[0xcd, 0x01, 0x2c]);
    mp::write_str(&mut b, "nar_url");
    mp::write_str(&mut b, &r.nar_url);
    let a = decode_announce(&b).unwrap();
    assert_eq!(a.node_id, "n");
    assert_eq!(a.timestamp, 5);
    assert_eq!(a.routes, vec![r]);
}

#[test]
fn rejects_what_ncro_2_2_rejects() {
    let mut body = golden_body();
    body[0] = 0x93; // array of 3
    assert!(matches!(
        decode_announce(&body),
        Err(CodecError::MessageLength(3) | CodecError::Decode(_))
    ));
    let mut body = golden_body();
    let route_at = body.iter().position(|&b| b == 0x9c).unwrap();
    body[route_at] = 0x9b; // route of 11 fields
    assert!(matches!(
        decode_announce(&body),
        Err(CodecError::RouteLength(11))
    ));
    // Variant index 1 does not exist.
    let mut b = vec![0x94, 0x01];
    mp::write_str(&mut b, "n");
    b.extend_from_slice(&[0x00, 0x90]);
    assert_eq!(decode_announce(&b), Err(CodecError::UnknownType));
    let mut b = golden_body();
    b.push(0xc0);
    assert_eq!(decode_announce(&b), Err(CodecError::TrailingBytes(1)));
    let truncated = &golden_body()[..40];
    assert!(decode_announce(truncated).is_err());
    assert_eq!(
        Datagram::split(&[0; 95]).unwrap_err(),
        CodecError::TooShort(95)
    );
}

fn route(i: usize, narinfo_len: usize) -> WireRoute {
    WireRoute {
        store_path: format!("{i:032}"),
        upstream_url: "https://cache.example.org".into(),
        latency_ms: 12.25,
        latency_ema: 12.25,
        last_verified: 1_780_000_000,
        query_count: 1,
        failure_count: 0,
        ttl: 1_780_003_600,
        nar_hash: format!("sha256:{}", "1".repeat(52)),
        nar_size: 123_456,
        nar_url: format!("nar/{}.nar.xz", "2".repeat(52)),
        narinfo: Some(vec![b'x'; narinfo_len]),
    }
}

fn unpack(datagrams: &[Outgoing]) -> Vec<(i64, WireRoute)> {
    let mut out = Vec::new();
    for d in datagrams {
        assert!(d.bytes.len() <= MAX_DATAGRAM, "{} bytes", d.bytes.len());
        let a = decode_announce(Datagram::split(&d.bytes).unwrap().body).unwrap();
        assert_eq!(a.routes.len(), d.routes);
        out.extend(a.routes.into_iter().map(|r| (a.timestamp, r)));
    }
    out
}

#[test]
fn splits_at_1400_bytes_without_losing_routes() {
    let routes: Vec<WireRoute> = (0..60).map(|i| route(i, 100 + i * 7)).collect();
    let mut ts = 0;
    let packed = pack(&test_key(), "0011223344556677", &routes, || {
        ts += 1;
        ts
    });
    assert!(packed.datagrams.len() > 10, "{}", packed.datagrams.len());
    let got = unpack(&packed.datagrams);
    assert_eq!(
        got.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        routes
    );
    // One timestamp per datagram, strictly increasing.
    let stamps: Vec<i64> = got.iter().map(|(t, _)| *t).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*stamps.last().unwrap() as usize, packed.datagrams.len());
    assert_eq!(
        (packed.sent, packed.stripped, packed.unsendable),
        (60, 0, 0)
    );
    // Datagrams are full: none but the last could have taken the next route.
    let sizes: Vec<usize> = packed.datagrams.iter().map(|d| d.bytes.len()).collect();
    assert!(
        sizes[..sizes.len() - 1]
            .iter()
            .all(|&s| s > MAX_DATAGRAM - 800),
        "{sizes:?}"
    );
}

#[test]
fn a_route_too_big_loses_its_narinfo_not_its_place() {
    let routes = vec![route(1, 200), route(2, 5000), route(3, 1400 - 96 - 300)];
    let packed = pack(&test_key(), "n", &routes, || 1);
    let got: Vec<WireRoute> = unpack(&packed.datagrams)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], routes[0]);
    assert_eq!(got[1].narinfo, None, "narinfo dropped to fit");
    assert_eq!(got[1].store_path, routes[1].store_path);
    assert_eq!((packed.stripped, packed.unsendable), (1, 0));
    // The largest narinfo that still fits is sent whole.
    let at_limit = packed
        .datagrams
        .iter()
        .map(|d| d.bytes.len())
        .max()
        .unwrap();
    assert!(at_limit <= MAX_DATAGRAM);
}

#[test]
fn a_route_that_cannot_fit_at_all_is_counted_not_sent() {
    let mut huge = route(1, 10);
    huge.upstream_url = format!("https://{}", "u".repeat(1500));
    let packed = pack(&test_key(), "n", &[huge, route(2, 10)], || 1);
    assert_eq!((packed.sent, packed.unsendable), (1, 1));
    assert_eq!(unpack(&packed.datagrams).len(), 1);
    assert!(pack(&test_key(), "n", &[], || 1).datagrams.is_empty());
}

/// ncro 2.2's own types, as its crates declare them, serialised by the
/// same rmp-serde and chrono it locks: our bytes must equal theirs and
/// decode with their decoder.
mod against_rmp_serde {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum MessageType {
        Announce = 1,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct RouteEntry {
        store_path: String,
        upstream_url: String,
        latency_ms: f64,
        latency_ema: f64,
        last_verified: DateTime<Utc>,
        query_count: u32,
        failure_count: u32,
        ttl: DateTime<Utc>,
        nar_hash: String,
        nar_size: u64,
        nar_url: String,
        narinfo_bytes: Option<Vec<u8>>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Message {
        r#type: MessageType,
        node_id: String,
        timestamp: i64,
        routes: Vec<RouteEntry>,
    }

    fn theirs(a: &Announce) -> Message {
        let t = |s: i64| Utc.timestamp_opt(s, 0).unwrap();
        Message {
            r#type: MessageType::Announce,
            node_id: a.node_id.clone(),
            timestamp: a.timestamp,
            routes: a
                .routes
                .iter()
                .map(|r| RouteEntry {
                    store_path: r.store_path.clone(),
                    upstream_url: r.upstream_url.clone(),
                    latency_ms: r.latency_ms,
                    latency_ema: r.latency_ema,
                    last_verified: t(r.last_verified),
                    query_count: r.query_count,
                    failure_count: r.failure_count,
                    ttl: t(r.ttl),
                    nar_hash: r.nar_hash.clone(),
                    nar_size: r.nar_size,
                    nar_url: r.nar_url.clone(),
                    narinfo_bytes: r.narinfo.clone(),
                })
                .collect(),
        }
    }

    fn sample() -> Announce {
        let mut routes: Vec<WireRoute> = (0..20).map(|i| route(i, i * 13)).collect();
        routes[3].narinfo = None;
        routes[4].narinfo = Some((0..=255).collect());
        routes[5].nar_size = u64::MAX;
        routes[6].query_count = u32::MAX;
        routes[7].latency_ema = 0.1;
        Announce {
            node_id: "da0cfc18462fdd76".into(),
            timestamp: GOLDEN_TIMESTAMP,
            routes,
        }
    }

    #[test]
    fn same_bytes_as_rmp_serde() {
        for a in [golden_announce(), sample()] {
            let want = rmp_serde::to_vec(&theirs(&a)).unwrap();
            assert_eq!(encode_announce(&a), want);
        }
    }

    #[test]
    fn rmp_serde_reads_ours_and_we_read_its_map_form() {
        let a = sample();
        let back: Message = rmp_serde::from_slice(&encode_announce(&a)).unwrap();
        assert_eq!(back, theirs(&a));
        let named = rmp_serde::to_vec_named(&theirs(&a)).unwrap();
        assert_eq!(decode_announce(&named).unwrap(), a);
    }
}
