//! The bodies of the fuzz targets, one function per target.
//!
//! Shared by the cargo-fuzz binaries (nightly, libFuzzer) and by
//! `tests/it/fuzz_corpus.rs` (stable), which replays every committed regression
//! file through the same function, so CI checks the corpus without nightly.
//! Each function must never panic on any input except through one of its
//! own assertions, which state properties the parsers promise.

use ncro::config::env::MapEnv;
use ncro::config::{Config, Source};
use ncro::http::chunked::{ChunkedDecoder, ChunkedError};
use ncro::http::request::{self, Parse, MAX_HEAD};
use ncro::mesh::codec::{self, Datagram, MAX_DATAGRAM};
use ncro::mesh::trust::Trust;
use ncro::proto::cache_index::{self, shard, Manifest};
use ncro::proto::cache_info::CacheInfo;
use ncro::proto::content_address::{self, ContentAddress};
use ncro::proto::narinfo::{relay_form, NarInfo};
use ncro::proto::nixbloom::{Bloom, BloomBuilder, Probe};
use ncro::proto::signature::{self, PublicKey, SecretKey, Verdict};
use ncro::proto::store_path::{StoreHash, HASH_LEN};
use ncro::proto::{base32, cache_info};

/// A fuzz target's check: panics on a broken invariant.
pub type Check = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("http_request", http_request),
    ("chunked", chunked),
    ("narinfo", narinfo),
    ("signature", signature),
    ("cache_info", cache_info),
    ("base32", base32),
    ("config", config),
    ("store_path", store_path),
    ("side_paths", side_paths),
    ("mesh_packet", mesh_packet),
    ("nixbloom", nixbloom),
    ("cache_index", cache_index),
    ("content_address", content_address),
];

/// Client request heads, straight off the socket.
pub fn http_request(data: &[u8]) {
    match request::parse(data) {
        Parse::Complete(req, len) => {
            assert!(len <= data.len() && len <= MAX_HEAD, "head length {len}");
            assert!(
                req.target.starts_with(req.path),
                "path not a prefix of target"
            );
            if let Some(q) = req.query {
                assert_eq!(req.target.len(), req.path.len() + 1 + q.len());
            } else {
                assert_eq!(req.target, req.path);
            }
        }
        Parse::Partial => assert!(data.len() <= MAX_HEAD, "partial past the head limit"),
        Parse::Bad(_) | Parse::TooLarge => {}
    }
}

/// The outcome of feeding a chunked body through a decoder.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    /// Body bytes that belonged to the chunked framing.
    consumed: usize,
    data: Vec<u8>,
    done: bool,
    error: Option<ChunkedError>,
}

/// Upstream chunked bodies. The first byte picks where the rest is split
/// (sockets deliver arbitrary pieces); decoding in pieces must give exactly
/// what one call over the whole input gives, and `scan` must agree with
/// `decode` on where the body ends and whether it is valid.
pub fn chunked(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let whole = decode_pieces(body, &[body.len()]);
    let splits = split_points(seed, body.len());
    let pieces = decode_pieces(body, &splits);
    assert_eq!(whole, pieces, "split decoding differs; splits {splits:?}");
    let (scanned, scan_error) = scan_pieces(body, &splits);
    assert_eq!(
        scan_error, whole.error,
        "scan and decode disagree on validity"
    );
    if whole.error.is_none() {
        assert_eq!(
            scanned, whole.consumed,
            "scan and decode disagree on the end"
        );
        assert!(whole.data.len() <= whole.consumed);
    }
}

/// Piece lengths derived from `seed`: small pieces (1..=8 bytes) so that
/// every state boundary gets crossed, cycling through the seed's bits.
fn split_points(seed: u8, len: usize) -> Vec<usize> {
    let mut pieces = Vec::new();
    let (mut total, mut i) = (0, 0u32);
    while total < len {
        let n = usize::from((seed.rotate_left(i) & 7) + 1).min(len - total);
        pieces.push(n);
        total += n;
        i += 3;
    }
    pieces
}

fn decode_pieces(body: &[u8], pieces: &[usize]) -> Decoded {
    let mut dec = ChunkedDecoder::with_limits(64, 256);
    let mut out = Decoded {
        consumed: 0,
        data: Vec::new(),
        done: false,
        error: None,
    };
    let mut start = 0;
    for &n in pieces {
        let piece = &body[start..start + n];
        start += n;
        let mut pos = 0;
        while pos < piece.len() && !dec.is_done() {
            match dec.decode(&piece[pos..]) {
                Ok(p) => {
                    assert!(p.consumed <= piece.len() - pos && p.data.end <= p.consumed);
                    assert!(p.data.start <= p.data.end);
                    out.data
                        .extend_from_slice(&piece[pos + p.data.start..pos + p.data.end]);
                    out.consumed += p.consumed;
                    pos += p.consumed;
                    if p.consumed == 0 {
                        assert!(dec.is_done(), "decode made no progress");
                    }
                }
                Err(e) => {
                    // Where in a failing call the error sat is not reported,
                    // so only the error and the data before it are compared.
                    out.error = Some(e);
                    out.consumed = 0;
                    return out;
                }
            }
        }
        if dec.is_done() {
            break;
        }
    }
    out.done = dec.is_done();
    out
}

fn scan_pieces(body: &[u8], pieces: &[usize]) -> (usize, Option<ChunkedError>) {
    let mut dec = ChunkedDecoder::with_limits(64, 256);
    let (mut start, mut consumed) = (0, 0);
    for &n in pieces {
        match dec.scan(&body[start..start + n]) {
            Ok(used) => {
                assert!(used <= n);
                consumed += used;
                if used < n {
                    assert!(dec.is_done(), "scan stopped early before the end");
                }
            }
            Err(e) => return (consumed, Some(e)),
        }
        start += n;
        if dec.is_done() {
            break;
        }
    }
    (consumed, None)
}

/// Upstream narinfo bodies: whatever parses must render to text that parses
/// back to the same value with the same fingerprint.
pub fn narinfo(data: &[u8]) {
    let Ok(info) = NarInfo::parse(data) else {
        return;
    };
    let fingerprint = info.fingerprint();
    let rendered = info.render();
    let again = match NarInfo::parse(rendered.as_bytes()) {
        Ok(again) => again,
        Err(e) => panic!("rendered narinfo does not parse ({e}):\n{rendered}"),
    };
    assert_eq!(info, again, "render round trip changed the narinfo");
    assert_eq!(fingerprint, again.fingerprint());
    assert_eq!(rendered, again.render(), "render is not stable");
    // What clients get: the same narinfo, in a form Nix reads as ncro did,
    // and already final (relaying it again changes nothing).
    let relayed = relay_form(data, None);
    assert_eq!(
        NarInfo::parse(&relayed).as_ref(),
        Ok(&info),
        "relay_form changed the narinfo"
    );
    assert!(
        relayed.ends_with(b"\n"),
        "relayed narinfo lacks a final newline"
    );
    assert!(
        !relayed.starts_with(b"\n") && !relayed.windows(2).any(|w| w == b"\n\n"),
        "relayed narinfo keeps an empty line"
    );
    assert_eq!(
        &*relay_form(&relayed, None),
        &*relayed,
        "relay_form is not stable"
    );
}

/// Keys from config files and signatures from upstreams. Input: a public
/// key line, a secret key line, then a narinfo.
pub fn signature(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let public_text = parts.next().unwrap_or_default();
    let secret_text = parts.next().unwrap_or_default();
    let narinfo_text = parts.next().unwrap_or_default();

    let public = PublicKey::parse(public_text).ok();
    if let Some(key) = &public {
        let back = PublicKey::parse(&key.to_nix_string()).expect("public key round trip");
        assert!(back == *key, "public key round trip changed the key");
    }
    let secret = SecretKey::parse(secret_text).ok();
    if let Some(key) = &secret {
        let back = SecretKey::parse(&key.to_nix_string()).expect("secret key round trip");
        assert_eq!(back.name(), key.name());
        assert!(back.public() == key.public());
    }
    let Ok(mut info) = NarInfo::parse(narinfo_text.as_bytes()) else {
        return;
    };
    let keys: Vec<PublicKey> = public.into_iter().collect();
    let verdict = signature::verify_narinfo(&info, &keys);
    if keys.is_empty() {
        assert!(matches!(
            verdict,
            Verdict::NoTrustedSignature | Verdict::ContentAddressed | Verdict::BadContentAddress
        ));
    }
    if let Some(key) = secret {
        // Our own signature, alone, must always verify.
        info.sigs = vec![key.sign(&info.fingerprint())];
        let verdict = signature::verify_narinfo(&info, &[key.public()]);
        assert_eq!(
            verdict,
            Verdict::Valid {
                key_name: key.name().to_owned()
            }
        );
    }
}

/// `CA:` values from upstream narinfos and the store paths they imply.
/// Input: a `CA:` value, a newline, then a narinfo. The unsigned verdict
/// must agree with the proof, and a narinfo moved to the path its CA
/// computes must be proven by it.
pub fn content_address(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (ca_text, narinfo_text) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(ca) = ContentAddress::parse(ca_text) {
        let size = match ca.algo {
            "md5" => 16,
            "sha1" => 20,
            "sha256" => 32,
            "sha512" => 64,
            other => panic!("unknown algorithm {other} accepted"),
        };
        assert_eq!(ca.digest.len(), size, "{}", ca.algo);
    }
    let Ok(mut info) = NarInfo::parse(narinfo_text.as_bytes()) else {
        return;
    };
    if ca_text.is_empty() {
        return;
    }
    info.ca = Some(ca_text.to_owned());
    let proven = content_address::proves_store_path(&info);
    let verdict = signature::verify_narinfo(&info, &[]);
    let want = if proven {
        Verdict::ContentAddressed
    } else {
        Verdict::BadContentAddress
    };
    assert_eq!(verdict, want);
    // Without self references (they would name the old path), the path
    // the CA implies is one it proves.
    let own = info
        .store_path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    info.references.retain(|r| *r != own);
    if let Ok(Some(path)) = content_address::implied_store_path(&info) {
        assert!(StoreHash::from_store_path(&path).is_some(), "{path}");
        info.store_path = path;
        assert!(content_address::proves_store_path(&info), "{info:?}");
    }
}

/// Upstream `nix-cache-info` bodies. What parses must survive our render.
pub fn cache_info(data: &[u8]) {
    let Ok(info) = CacheInfo::parse(data) else {
        return;
    };
    if info.store_dir.contains(['\n', '\r']) {
        return;
    }
    let rendered = cache_info::render(&info.store_dir, info.want_mass_query, info.priority);
    let again = CacheInfo::parse(rendered.as_bytes()).expect("rendered cache info parses");
    assert_eq!(again.store_dir, info.store_dir);
    assert_eq!(again.want_mass_query, info.want_mass_query);
    assert_eq!(again.priority, info.priority);
}

/// Nix base32 (hashes in narinfos): decode accepts only canonical text, so
/// encoding what it decoded gives the input back.
pub fn base32(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = base32::decode(text) {
            assert_eq!(
                base32::encode(&bytes),
                text,
                "decode accepted a non-canonical text"
            );
        }
    }
    let encoded = base32::encode(data);
    assert_eq!(base32::decode(&encoded).as_deref(), Ok(data));
}

/// The config file (operator input, but also NCRO_* text): never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Only the outcome matters: errors are expected, panics are bugs.
    let _ = Config::from_toml(text, Source::Embedded, "fuzz", &MapEnv::new(&[]));
}

/// Request paths: `/<hash>.narinfo` and `/nar/...` validation.
pub fn store_path(data: &[u8]) {
    if let Some(hash) = StoreHash::parse(data) {
        assert_eq!(hash.as_bytes(), data);
        assert_eq!(hash.as_str().len(), HASH_LEN);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(hash) = StoreHash::from_store_path(text) {
        assert_eq!(&text[11..11 + HASH_LEN], hash.as_str());
    }
    if ncro::serve::valid_nar_path(text) {
        assert!(text.starts_with("/nar/"));
        assert!(!text.contains("/../") && !text.ends_with("/.."));
        assert!(!text.contains("//"), "empty segment accepted");
    }
}

/// Side paths (`log/`, `.ls`, `realisations/`, `build-trace-v2/`,
/// `debuginfo/`), batch request bodies and debuginfo records (upstream
/// JSON). An accepted side path is forwarded upstream as is, so it must be
/// plain: printable ASCII, no `%`, no empty, `.` or `..` segment, and its
/// routing hash must be the one it names.
pub fn side_paths(data: &[u8]) {
    use ncro::serve::{batch, side_paths};
    if let Ok(hashes) = batch::parse_hashes(data, 64) {
        assert!(hashes.len() <= 64);
        let mut seen = std::collections::HashSet::new();
        for h in &hashes {
            assert!(seen.insert(*h), "duplicate {h}");
            let needle = h.as_bytes();
            assert!(data.windows(HASH_LEN).any(|w| w == needle));
        }
    }
    if let Some(key) = side_paths::archive_nar_key(data) {
        assert!(ncro::serve::valid_nar_path(&format!("/{key}")), "{key}");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(Ok(target)) = side_paths::classify(text) {
        assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text:?}");
        assert!(!text.contains('%') && !text.contains("//"), "{text:?}");
        let segments = text.trim_start_matches('/').split('/');
        assert!(segments.into_iter().all(|s| !matches!(s, "" | "." | "..")));
        if let Some(hash) = target.route {
            assert!(text.contains(hash.as_str()), "{text:?} routes by {hash}");
        }
    }
}

/// Gossip datagrams from the network (any sender can reach the socket).
/// The whole input goes through the trust checks (framing, allow-list,
/// signature, which random bytes never pass) and, as a message body,
/// through the decoder. What decodes must re-encode to bytes that decode
/// to the same message (the encoding is canonical after one round trip),
/// and packing its routes must give datagrams of at most 1400 bytes that
/// carry every route that fits, in order.
pub fn mesh_packet(data: &[u8]) {
    let mut trust = Trust::new([[7u8; 32]], true, std::time::Duration::from_secs(60));
    let _ = trust.check(data, 0);
    let Ok(announce) = codec::decode_announce(data) else {
        return;
    };
    let once = codec::encode_announce(&announce);
    let again = codec::decode_announce(&once).expect("our own encoding decodes");
    assert_eq!(
        codec::encode_announce(&again),
        once,
        "encoding is canonical"
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let mut ts = 0;
    let packed = codec::pack(&key, &announce.node_id, &announce.routes, || {
        ts += 1;
        ts
    });
    let mut carried = Vec::new();
    for d in &packed.datagrams {
        assert!(
            d.bytes.len() <= MAX_DATAGRAM,
            "datagram of {} bytes",
            d.bytes.len()
        );
        let body = Datagram::split(&d.bytes).expect("framed").body;
        let msg = codec::decode_announce(body).expect("packed datagram decodes");
        assert_eq!(msg.routes.len(), d.routes);
        carried.extend(msg.routes);
    }
    assert_eq!(carried.len() + packed.unsendable, announce.routes.len());
    assert_eq!(carried.len(), packed.sent);
    // Compared as bytes: a NaN latency is not equal to itself.
    let enc = |r: &codec::WireRoute, narinfo: bool| {
        let mut v = Vec::new();
        codec::encode_route(&mut v, r, narinfo);
        v
    };
    let mut input = announce.routes.iter();
    for got in &carried {
        let g = enc(got, true);
        assert!(
            input.any(|r| enc(r, true) == g || enc(r, false) == g),
            "a packed route is an input route (whole or without narinfo), in input order"
        );
    }
}

/// Upstream NixBloom filters. A body that parses has exactly the size its
/// header gives and answers any probe; a filter built from the input's
/// 16-byte chunks parses back and holds every one of them.
pub fn nixbloom(data: &[u8]) {
    let probes: Vec<Probe> = data
        .chunks_exact(16)
        .map(|c| {
            let word = |r: std::ops::Range<usize>| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[r]);
                u64::from_le_bytes(b)
            };
            Probe {
                h1: word(0..8),
                h2: word(8..16),
            }
        })
        .collect();
    if let Ok(b) = Bloom::parse(data.to_vec()) {
        assert_eq!(b.body().len() as u64, 32 + b.m() / 8);
        probes.iter().for_each(|&p| {
            std::hint::black_box(b.may_contain(p));
        });
    }
    let mut builder = BloomBuilder::new(probes.len() as u64, 0.01);
    probes.iter().for_each(|&p| builder.insert(p));
    let built = Bloom::parse(builder.finish().body().clone()).expect("own filters parse");
    assert!(
        probes.iter().all(|&p| built.may_contain(p)),
        "false negative"
    );
}

/// RFC 0195 index files; the first byte picks manifest, journal or shard
/// (and the shard's depth). Live segments start at the current one and
/// go back in time; a shard's keys come out strictly ascending. The
/// shard's checksum is recomputed first so the fuzzer gets past it.
pub fn cache_index(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            if let Ok(m) = Manifest::parse(rest) {
                assert!(m.depth <= cache_index::MAX_DEPTH);
                if let Ok(segs) = m.live_segments() {
                    assert_eq!(segs.first(), Some(&m.current_segment));
                    assert!(segs.windows(2).all(|w| w[0] > w[1]), "{segs:?}");
                }
            }
        }
        1 => {
            std::hint::black_box(cache_index::parse_journal(rest).is_ok());
        }
        _ => {
            let mut buf = rest.to_vec();
            if let Ok(h) = shard::Header::parse(&buf) {
                if let Some(start) = shard::data_start(&h, buf.len()) {
                    let sum = shard::checksum(&buf[start..]);
                    buf[34..42].copy_from_slice(&sum.to_le_bytes());
                }
            }
            let depth = (sel / 3) % (cache_index::MAX_DEPTH + 1);
            let mut last = None;
            let decoded = shard::decode(&buf, depth, 0, 1 << 16, |k| {
                assert!(last.is_none_or(|l| k > l), "keys not ascending");
                last = Some(k);
            });
            if let Ok(n) = decoded {
                assert!(n <= 1 << 16);
            }
        }
    }
}
