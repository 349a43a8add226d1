//! The binary-cache side paths (`log/`, `.ls`, `realisations/`,
//! `build-trace-v2/`, `debuginfo/`) through the real `ncro` binary and fake
//! upstreams: affinity to the upstream that served the related narinfo,
//! racing when there is none, 404 only for definite misses, strict path
//! validation, streaming, and the debuginfo → NAR pin. The batch narinfo
//! endpoint is in [`batch`].

mod batch;

use std::time::Duration;

use crate::fake::{random_bytes, random_hash, FakeUpstream, Fault, TestKey, TestPath};
use crate::harness::{HttpConn, NcroProcess};
use crate::metrics::scrape_until;
use crate::routing::{db_dir, entry, NcroConfig};

/// A derivation path (name ends in `.drv`) whose narinfo a fake can serve.
fn drv(name: &str) -> TestPath {
    TestPath::new(&format!("{name}.drv"))
}

fn log_path(d: &TestPath) -> String {
    format!("/log/{}", d.basename())
}

fn ls_path(p: &TestPath) -> String {
    format!("/{}.ls", p.hash)
}

fn trace_path(d: &TestPath) -> String {
    format!("/build-trace-v2/{}/out.doi", d.basename())
}

fn realisation_path() -> String {
    let hex: String = random_bytes(32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("/realisations/sha256:{hex}!out.doi")
}

/// Requests an upstream received, probes left out.
fn asked(up: &FakeUpstream) -> Vec<String> {
    up.requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p != "/nix-cache-info")
        .collect()
}

fn start(ups: &[(String, i32, String)]) -> (NcroProcess, tempfile::TempDir) {
    let db = db_dir();
    let ncro = NcroConfig::new(ups, &db.path().join("routes.db"))
        .set("health", "hedge_after", "10s")
        .start();
    (ncro, db)
}

/// Waits (up to 5 s) for `ncro_endpoint_requests_total{endpoint, result}`
/// to read `want`, and fails with the value it reads otherwise. A request
/// is counted once its answer is complete, which can be a moment after the
/// client has read the last byte.
fn assert_endpoint_count(ncro: &NcroProcess, endpoint: &str, result: &str, want: u64) {
    let labels = [("endpoint", endpoint), ("result", result)];
    let what = format!("ncro_endpoint_requests_total{labels:?} = {want}");
    scrape_until(ncro, &what, Duration::from_secs(5), |m| {
        m.value("ncro_endpoint_requests_total", &labels) == want as f64
    });
}

#[test]
fn side_paths_go_to_the_upstream_that_served_the_narinfo() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let d = drv("affine");
    let p = TestPath::new("listed");
    let side = |up: &str| {
        FakeUpstream::builder()
            .file(&log_path(&d), format!("log from {up}\n"))
            .file(&ls_path(&p), format!("{{\"from\":\"{up}\"}}"))
            .file(&trace_path(&d), format!("{{\"from\":\"{up}\"}}"))
    };
    // A is faster and preferred, but only B has the narinfos.
    let a = side("a").start();
    let b = side("b")
        .path(&d, &kb)
        .path(&p, &kb)
        .latency(Duration::from_millis(50))
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 20, &kb)]);
    assert_eq!(ncro.get(&d.narinfo_request_path()).status, 200);
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);

    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    for (path, want) in [
        (log_path(&d), "log from b\n"),
        (ls_path(&p), "{\"from\":\"b\"}"),
        (trace_path(&d), "{\"from\":\"b\"}"),
    ] {
        let r = c.get(&path).expect("answer");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, want),
            "{path}\n{}",
            ncro.logs()
        );
        assert!(
            !asked(&a).contains(&path),
            "{path}: the other upstream was asked"
        );
    }
    // HEAD goes the same way and gets the length without a body.
    let h = c.request("HEAD", &log_path(&d), &[]).expect("HEAD");
    assert_eq!((h.status, h.header("Content-Length")), (200, Some("11")));
    assert!(!asked(&a).contains(&log_path(&d)));
    assert_endpoint_count(&ncro, "log", "ok", 2);
    assert_endpoint_count(&ncro, "ls", "ok", 1);
    assert_endpoint_count(&ncro, "build_trace", "ok", 1);
}

#[test]
fn without_a_route_the_upstreams_are_raced() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let d = drv("unrouted");
    let real = realisation_path();
    let dbg = "/debuginfo/00112233445566778899aabbccddeeff00112233";
    // Same tier: A is slow, B fast; only A has the realisation.
    let a = FakeUpstream::builder()
        .file(&log_path(&d), "slow log\n")
        .file(&real, "{\"outPath\":\"a\"}")
        .latency(Duration::from_millis(300))
        .start();
    let b = FakeUpstream::builder()
        .file(&log_path(&d), "fast log\n")
        .file(dbg, "{}")
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 10, &kb)]);
    let r = ncro.get(&log_path(&d));
    assert_eq!((r.status, r.text().as_str()), (200, "fast log\n"));
    let r = ncro.get(&real);
    assert_eq!((r.status, r.text().as_str()), (200, "{\"outPath\":\"a\"}"));
    assert_eq!(b.request_count(&real), 1, "both upstreams are asked");
    let r = ncro.get(dbg);
    assert_eq!((r.status, r.text().as_str()), (200, "{}"));
    assert_endpoint_count(&ncro, "realisation", "ok", 1);
    assert_endpoint_count(&ncro, "debuginfo", "ok", 1);
}

#[test]
fn a_miss_at_the_routed_upstream_asks_the_others() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let d = drv("log-elsewhere");
    let a = FakeUpstream::builder().path(&d, &ka).start();
    let b = FakeUpstream::builder()
        .file(&log_path(&d), "hydra kept the log\n")
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 20, &kb)]);
    assert_eq!(ncro.get(&d.narinfo_request_path()).status, 200);
    let r = ncro.get(&log_path(&d));
    assert_eq!((r.status, r.text().as_str()), (200, "hydra kept the log\n"));
    assert_eq!(
        a.request_count(&log_path(&d)),
        1,
        "the routed upstream first"
    );
}

#[test]
fn not_found_only_when_every_upstream_says_so() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let (gone, flaky) = (drv("nowhere"), drv("flaky"));
    let a = FakeUpstream::builder().start();
    let b = FakeUpstream::builder()
        .file(&log_path(&flaky), "back again\n")
        .rule(
            log_path(&flaky).as_str(),
            Fault::first_n(1, Fault::Status(500)),
        )
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 10, &kb)]);
    for _ in 0..2 {
        assert_eq!(ncro.get(&log_path(&gone)).status, 404);
    }
    assert_eq!(
        b.request_count(&log_path(&gone)),
        2,
        "misses are not cached"
    );
    // A 404 and a 500: not a definite miss.
    assert_eq!(ncro.get(&log_path(&flaky)).status, 502);
    // Nothing was remembered from the failure: the next request succeeds.
    let r = ncro.get(&log_path(&flaky));
    assert_eq!((r.status, r.text().as_str()), (200, "back again\n"));
    assert_endpoint_count(&ncro, "log", "not_found", 2);
    assert_endpoint_count(&ncro, "log", "error", 1);
}

#[test]
fn a_deadline_alone_is_a_gateway_timeout() {
    let k = TestKey::generate("a-1");
    let d = drv("hung");
    let a = FakeUpstream::builder()
        .rule(log_path(&d).as_str(), Fault::Hang)
        .start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(a.url(), 10, &k)], &db.path().join("r.db"))
        .set("timeouts", "race_deadline", "500ms")
        .start();
    assert_eq!(ncro.get(&log_path(&d)).status, 504);
}

#[test]
fn malformed_side_paths_are_refused_and_never_forwarded() {
    let k = TestKey::generate("a-1");
    let a = FakeUpstream::builder().start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let h = random_hash();
    let bad = [
        format!("/log/{h}-not-a-derivation"),
        format!("/log/../{h}-x.drv"),
        format!("/log/{h}-x.drv/extra"),
        format!("/log/{h}-%2e%2e.drv"),
        format!("/{}.ls", &h[..31]),
        format!("/build-trace-v2/{h}-x.drv/../out.doi"),
        format!("/build-trace-v2/{h}-x/out.doi"),
        "/realisations/sha256:abc!out.doi".to_owned(),
        format!("/realisations/sha256:{}!out", "a".repeat(64)),
        "/debuginfo/not-hex".to_owned(),
        "/debuginfo/../../etc/passwd".to_owned(),
    ];
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    for path in &bad {
        let r = c.get(path).expect("answer");
        assert_eq!(r.status, 400, "{path}");
    }
    assert_eq!(asked(&a), Vec::<String>::new(), "nothing was forwarded");
    assert_endpoint_count(&ncro, "log", "bad_request", 4);
    assert_endpoint_count(&ncro, "debuginfo", "bad_request", 2);
}

#[test]
fn large_and_chunked_bodies_are_streamed_intact() {
    let k = TestKey::generate("a-1");
    let d = drv("big-log");
    let p = TestPath::new("big-listing");
    let log = random_bytes(3 << 20);
    let listing = random_bytes(600 << 10);
    let a = FakeUpstream::builder()
        .file(&log_path(&d), log.clone())
        .file(&ls_path(&p), listing.clone())
        .rule(ls_path(&p).as_str(), Fault::Chunked)
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    let r = c.get(&log_path(&d)).expect("log");
    assert!(r.status == 200 && r.body == log, "log relayed intact");
    let r = c.get(&ls_path(&p)).expect("listing");
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert!(
        r.status == 200 && r.body == listing,
        "chunked listing relayed intact"
    );
    // The connection is still usable after both relays.
    assert_eq!(c.get("/nix-cache-info").expect("again").status, 200);
}

#[test]
fn an_upstream_dying_mid_body_closes_the_client_connection() {
    let k = TestKey::generate("a-1");
    let d = drv("cut-log");
    let a = FakeUpstream::builder()
        .file(&log_path(&d), random_bytes(256 << 10))
        .rule(log_path(&d).as_str(), Fault::ResetMidBody(1000))
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &k)]);
    let mut c = HttpConn::connect(ncro.addr()).expect("connect");
    let r = c.get(&log_path(&d));
    // The head promised 256 KiB: the client must see a short body, never a
    // complete-looking one.
    assert!(r.is_err() || r.is_ok_and(|r| r.body.len() < 256 << 10));
    assert_endpoint_count(&ncro, "log", "error", 1);
}

#[test]
fn debuginfo_pins_its_nar_to_the_upstream_that_answered() {
    let (ka, kb) = (TestKey::generate("a-1"), TestKey::generate("b-1"));
    let nar = format!("nar/{}.nar.xz", random_hash());
    let id = "0123456789abcdef0123456789abcdef01234567";
    let record = format!(
        "{{\"archive\":\"../{nar}\",\"member\":\"lib/debug/.build-id/01/23456789abcdef0123456789abcdef01234567.debug\"}}"
    );
    // A is preferred and holds a file under the same NAR name, but only B
    // wrote the debuginfo record: its NAR must come from B.
    let a = FakeUpstream::builder()
        .file(&format!("/{nar}"), b"not this one".to_vec())
        .start();
    let b = FakeUpstream::builder()
        .file(&format!("/debuginfo/{id}"), record.clone())
        .file(&format!("/{nar}"), b"debug symbols".to_vec())
        .start();
    let (ncro, _db) = start(&[entry(a.url(), 10, &ka), entry(b.url(), 20, &kb)]);
    let r = ncro.get(&format!("/debuginfo/{id}"));
    assert_eq!((r.status, r.text()), (200, record));
    let r = ncro.get(&format!("/{nar}"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"debug symbols"[..]));
    assert_eq!(
        a.request_count(&format!("/{nar}")),
        0,
        "the NAR went to B only"
    );
}
