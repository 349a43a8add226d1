//! Canonical NAR URLs through the real `ncro` binary
//! (`upstreams[].nar_url_mode`, `storage_url`; docs/nar-failover.md,
//! "Canonical NAR URLs"): the narinfo `URL:` each mode serves, canonical
//! `/nar/<store hash><ext>` requests served from the routing upstream at
//! its real path, from another upstream only when its own narinfo proves
//! the same file, resolved without a route, continued mid-stream, and NAR
//! files kept on another host. The real corpus and a real Nix client are
//! in `realdata/urls.rs` and `e2e_nix/canonical.rs`.

use std::time::Duration;

use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::faults::fetch::{fetch, Got};
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

const LIMIT: Duration = Duration::from_secs(10);

/// The `URL:` value of a narinfo answer.
fn url_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap_or_else(|| panic!("no URL line in {text}"))
        .to_owned()
}

fn canonical(p: &TestPath) -> String {
    format!("/nar/{}.nar", p.hash)
}

/// `p`'s narinfo as another cache would write it: the same store path and
/// NAR (the signature still verifies: it does not cover the file fields),
/// its file at `url`, with `Compression` and `FileHash` replaced.
fn variant(p: &TestPath, k: &TestKey, url: &str, compression: &str, file_hash: &str) -> String {
    p.narinfo(&[k])
        .replace(&p.nar_url(), url)
        .replace("Compression: none", &format!("Compression: {compression}"))
        .replace(
            &format!("FileHash: {}", p.nar_hash()),
            &format!("FileHash: {file_hash}"),
        )
}

struct Two {
    ncro: NcroProcess,
    p: TestPath,
    a: FakeUpstream,
    b: FakeUpstream,
    _db: tempfile::TempDir,
}

/// A (priority 10: it wins the race) and B (20), both trusted under `k`.
fn two(p: TestPath, k: &TestKey, a: FakeUpstream, b: FakeUpstream) -> Two {
    let db = db_dir();
    let ups = [entry(a.url(), 10, k), entry(b.url(), 20, k)];
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("server", "workers", 1)
        .set("timeouts", "idle", "500ms")
        .start();
    Two {
        ncro,
        p,
        a,
        b,
        _db: db,
    }
}

impl Two {
    fn get(&self, path: &str) -> Got {
        fetch(self.ncro.addr(), path, &[], LIMIT)
    }

    /// Like Nix: the narinfo first (routed to A); returns its URL line.
    fn narinfo(&self) -> String {
        let r = self.get(&self.p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", self.ncro.logs());
        url_line(&r.body)
    }
}

#[test]
fn canonical_nar_is_served_by_the_routing_upstream_at_its_real_path() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("canon", &random_bytes(40_000));
    let a = FakeUpstream::builder().path(&p, &k).start();
    let b = FakeUpstream::builder().path(&p, &k).start();
    let t = two(p.clone(), &k, a, b);
    assert_eq!(
        t.narinfo(),
        format!("nar/{}.nar", p.hash),
        "to_self is the default"
    );
    let got = t.get(&canonical(&p));
    assert_eq!(got.status, 200, "{}", t.ncro.logs());
    assert!(got.body == p.nar, "the NAR, byte for byte");
    assert_eq!(got.header("X-Ncro-Route"), Some("cache-hit"));
    assert_eq!(got.header("X-Ncro-Upstream"), Some("127.0.0.1"));
    // A was asked at its own file name; B for nothing NAR.
    assert_eq!(t.a.request_count(&p.nar_request_path()), 1);
    assert_eq!(t.b.request_count(&p.nar_request_path()), 0);
    assert_eq!(t.a.request_count(&canonical(&p)), 0);
    // Another extension than the route's file is not this file.
    let xz = t.get(&format!("/nar/{}.nar.xz", p.hash));
    assert_eq!(xz.status, 404, "{}", xz.text());
    // The upstream's own name still works (forwarded unchanged).
    let direct = t.get(&p.nar_request_path());
    assert_eq!(direct.status, 200);
    assert!(direct.body == p.nar);
    assert_eq!(direct.header("X-Ncro-Route"), Some("cache-hit"));
    // A NAR no narinfo routed: the first candidate, `direct`.
    let q = TestPath::with_contents("unrouted", b"unrouted");
    let c = FakeUpstream::builder().path(&q, &k).start();
    let db = db_dir();
    let ncro = NcroConfig::new(&[entry(c.url(), 10, &k)], &db.path().join("r.db")).start();
    let got = fetch(ncro.addr(), &q.nar_request_path(), &[], LIMIT);
    assert_eq!(got.status, 200);
    assert_eq!(got.header("X-Ncro-Route"), Some("direct"));
    assert_eq!(got.header("X-Ncro-Upstream"), Some("127.0.0.1"));
}

/// A holds the narinfo but its NAR answers 404; B holds the path as
/// `b_narinfo` describes it, with a file at `b_url`.
fn a_lost_its_nar(b_narinfo: impl Fn(&TestPath, &TestKey) -> String, b_url: &str) -> (Two, Got) {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("moved", &random_bytes(20_000));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(PathMatch::exact(&p.nar_request_path()), Fault::Status(404))
        .start();
    let b = FakeUpstream::builder()
        .narinfo(&p.hash, b_narinfo(&p, &k))
        .file(&format!("/{b_url}"), p.nar.clone())
        .start();
    let t = two(p.clone(), &k, a, b);
    t.narinfo();
    let got = t.get(&canonical(&p));
    (t, got)
}

#[test]
fn another_upstream_serves_a_canonical_nar_only_when_it_proves_the_same_file() {
    // The same file under another name: proved by its narinfo, served.
    let (t, got) = a_lost_its_nar(
        |p, k| p.narinfo(&[k]).replace(&p.nar_url(), "blobs/renamed.nar"),
        "blobs/renamed.nar",
    );
    assert_eq!(got.status, 200, "{}", t.ncro.logs());
    assert!(got.body == t.p.nar);
    assert_eq!(got.header("X-Ncro-Route"), Some("direct"));
    assert_eq!(t.b.request_count("/blobs/renamed.nar"), 1);
    assert!(
        t.b.request_count(&t.p.narinfo_request_path()) >= 1,
        "B proved it"
    );

    // Same store path, another compression: never served under this name.
    let (t, got) = a_lost_its_nar(
        |p, k| {
            variant(
                p,
                k,
                "nar/x.nar.xz",
                "xz",
                "sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3",
            )
        },
        "nar/x.nar.xz",
    );
    assert_eq!(got.status, 404, "{}", got.text());
    assert_eq!(
        t.b.request_count("/nar/x.nar.xz"),
        0,
        "B's file is never asked for"
    );

    // Same compression, another FileHash (another file): refused too.
    let (t, got) = a_lost_its_nar(
        |p, k| {
            variant(
                p,
                k,
                "nar/y.nar",
                "none",
                "sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3",
            )
        },
        "nar/y.nar",
    );
    assert_eq!(got.status, 404, "{}", got.text());
    assert_eq!(t.b.request_count("/nar/y.nar"), 0);
}

#[test]
fn a_canonical_nar_without_a_route_is_resolved_first() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("fresh", &random_bytes(10_000));
    let a = FakeUpstream::builder().path(&p, &k).start();
    let b = FakeUpstream::builder().start();
    // A fresh database: no narinfo was asked (a restart, another node).
    let t = two(p.clone(), &k, a, b);
    let got = t.get(&canonical(&p));
    assert_eq!(got.status, 200, "{}", t.ncro.logs());
    assert!(got.body == p.nar);
    assert_eq!(got.header("X-Ncro-Route"), Some("direct"));
    assert_eq!(
        t.a.request_count(&p.narinfo_request_path()),
        1,
        "resolved once"
    );
    // That resolution stored the route: the next one is a hit, with no
    // further narinfo request.
    let again = t.get(&canonical(&p));
    assert_eq!(again.status, 200);
    assert_eq!(again.header("X-Ncro-Route"), Some("cache-hit"));
    assert_eq!(t.a.request_count(&p.narinfo_request_path()), 1);
    // A store path nobody has: 404, never a 200.
    let none = t.get(&format!("/nar/{}.nar", crate::fake::random_hash()));
    assert_eq!(none.status, 404);
}

#[test]
fn a_cut_canonical_nar_is_finished_by_a_proved_upstream_at_its_own_path() {
    const CUT: usize = 48 * 1024;
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("cut", &random_bytes(160 * 1024));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(
            PathMatch::exact(&p.nar_request_path()),
            Fault::ResetMidBody(CUT),
        )
        .start();
    // B names the same file differently: only its narinfo proves it.
    let b_narinfo = p.narinfo(&[&k]).replace(&p.nar_url(), "store/cut-copy.nar");
    let b = FakeUpstream::builder()
        .narinfo(&p.hash, b_narinfo)
        .file("/store/cut-copy.nar", p.nar.clone())
        .start();
    let t = two(p.clone(), &k, a, b);
    t.narinfo();
    let got = t.get(&canonical(&p));
    assert_eq!(got.status, 200, "{}", t.ncro.logs());
    assert!(
        got.complete,
        "{} of {} bytes\n{}",
        got.body.len(),
        p.nar.len(),
        t.ncro.logs()
    );
    assert!(
        got.body == p.nar,
        "the spliced body is the NAR, byte for byte"
    );
    let ranges: Vec<Option<String>> =
        t.b.requests()
            .into_iter()
            .filter(|r| r.path == "/store/cut-copy.nar")
            .map(|r| r.header("Range").map(str::to_owned))
            .collect();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let range = ranges[0].clone().expect("a Range continuation");
    let last = p.nar.len() - 1;
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix(&format!("-{last}")))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected Range {range}"));
    assert!(start > 0 && start <= CUT, "{range}");
    let ok = eventually(Duration::from_secs(5), || {
        scrape(&t.ncro).value("ncro_nar_failovers_total", &[("result", "completed")]) == 1.0
    });
    assert!(ok, "{}", t.ncro.logs());
}

#[test]
fn a_cut_canonical_nar_is_not_finished_from_another_file() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("cut2", &random_bytes(100 * 1024));
    let a = FakeUpstream::builder()
        .path(&p, &k)
        .rule(
            PathMatch::exact(&p.nar_request_path()),
            Fault::ResetMidBody(32 * 1024),
        )
        .start();
    // B: the same store path, compressed: its bytes are another file.
    let b = FakeUpstream::builder()
        .narinfo(
            &p.hash,
            variant(&p, &k, "nar/z.nar.xz", "xz", &p.nar_hash()),
        )
        .file("/nar/z.nar.xz", p.nar.clone())
        .start();
    let t = two(p.clone(), &k, a, b);
    t.narinfo();
    let got = t.get(&canonical(&p));
    assert_eq!(got.status, 200);
    assert!(
        !got.complete,
        "cut short, never completed from another file"
    );
    assert!(got.closed);
    assert_eq!(t.b.request_count("/nar/z.nar.xz"), 0);
}

#[test]
fn storage_url_holds_the_nar_files() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("stored", &random_bytes(30_000));
    // The narinfo host has no NARs; the storage host has only NARs, under
    // a path prefix.
    let info = FakeUpstream::builder()
        .narinfo(&p.hash, p.narinfo(&[&k]))
        .start();
    let files = FakeUpstream::builder()
        .file(&format!("/bucket{}", p.nar_request_path()), p.nar.clone())
        .start();
    let storage = format!("{}/bucket", files.url());
    for (mode, path) in [
        ("to_self", canonical(&p)),
        ("keep", p.nar_request_path()),
        ("to_upstream", String::new()),
    ] {
        let db = db_dir();
        let ncro = NcroConfig::new(&[entry(info.url(), 10, &k)], &db.path().join("r.db"))
            .upstream(0, "nar_url_mode", mode)
            .upstream(0, "storage_url", storage.as_str())
            .start();
        let r = fetch(ncro.addr(), &p.narinfo_request_path(), &[], LIMIT);
        assert_eq!(r.status, 200, "{mode}: {}", ncro.logs());
        let url = url_line(&r.body);
        if mode == "to_upstream" {
            // Absolute, at the storage host: the client goes there itself.
            assert_eq!(url, format!("{storage}/{}", p.nar_url()));
            continue;
        }
        assert_eq!(format!("/{url}"), path, "{mode}");
        let got = fetch(ncro.addr(), &path, &[], LIMIT);
        assert_eq!(got.status, 200, "{mode}: {}", ncro.logs());
        assert!(got.body == p.nar, "{mode}");
    }
    assert_eq!(
        info.request_count(&p.nar_request_path()),
        0,
        "never at the narinfo host"
    );
    assert_eq!(
        files.request_count(&format!("/bucket{}", p.nar_request_path())),
        2
    );
}

#[test]
fn a_bad_storage_url_or_mode_is_refused_at_start() {
    let k = TestKey::generate("k-1");
    let db = db_dir();
    let base = || {
        NcroConfig::new(
            &[entry("http://127.0.0.1:9".into(), 10, &k)],
            &db.path().join("r.db"),
        )
    };
    let err = NcroProcess::try_start(&base().upstream(0, "storage_url", "ftp://x").render())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("storage_url"), "{err}");
    let err = NcroProcess::try_start(&base().upstream(0, "nar_url_mode", "self").render())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("nar_url_mode"), "{err}");
    // An s3:// upstream has no URL a client could fetch from.
    let s3 = NcroConfig::new(
        &[entry("s3://bucket?region=eu-west-1".into(), 10, &k)],
        &db.path().join("r.db"),
    )
    .upstream(0, "nar_url_mode", "to_upstream");
    let err = NcroProcess::try_start(&s3.render()).err().expect("refused");
    assert!(err.to_string().contains("needs storage_url"), "{err}");
    // Valid values start.
    let ok = base().upstream(0, "nar_url_mode", "to_upstream").upstream(
        0,
        "storage_url",
        "https://files.example/nars/",
    );
    NcroProcess::try_start(&ok.render()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn after_a_restart_a_canonical_nar_follows_the_stored_route() {
    let k = TestKey::generate("k-1");
    let p = TestPath::with_contents("kept", &random_bytes(12_000));
    let a = FakeUpstream::builder().path(&p, &k).start();
    let b = FakeUpstream::builder().path(&p, &k).start();
    let db = db_dir();
    let cfg = NcroConfig::new(
        &[entry(a.url(), 10, &k), entry(b.url(), 20, &k)],
        &db.path().join("r.db"),
    )
    .set("server", "workers", 1);
    let mut first = cfg.start();
    let r = fetch(first.addr(), &p.narinfo_request_path(), &[], LIMIT);
    let served = r.body;
    assert_eq!(url_line(&served), format!("nar/{}.nar", p.hash));
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(20)).success());
    let asked = |u: &FakeUpstream| u.request_count(&p.narinfo_request_path());
    let before = (asked(&a), asked(&b));

    // The route comes back from the database (its body read back and
    // rewritten there), not from a new lookup.
    let second = cfg.start();
    let got = fetch(second.addr(), &canonical(&p), &[], LIMIT);
    assert_eq!(got.status, 200, "{}", second.logs());
    assert!(got.body == p.nar);
    assert_eq!(got.header("X-Ncro-Route"), Some("cache-hit"));
    assert_eq!(t_nar(&a, &p), 1, "A's real file name, at A");
    let r = fetch(second.addr(), &p.narinfo_request_path(), &[], LIMIT);
    assert!(r.body == served, "the same narinfo as before the restart");
    assert_eq!((asked(&a), asked(&b)), before, "no new lookup");
}

fn t_nar(u: &FakeUpstream, p: &TestPath) -> usize {
    u.request_count(&p.nar_request_path())
}
