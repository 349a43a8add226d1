//! Runs one matrix row: the fakes, an ncro in front of them, the faulty
//! request, and the checks behind every column of the row.

use std::path::Path;
use std::time::Duration;

use super::fetch::{fetch, still_usable, Got};
use super::{Beside, Counted, Inject, Kept, Row, Sees, Target};
use crate::fake::{random_bytes, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::metrics::{scrape, Scrape};
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

/// Short per-phase timeouts, so that every hang row ends in about a second.
const TIMEOUTS: [(&str, &str); 4] = [
    ("race_deadline", "1s"),
    ("first_byte", "800ms"),
    ("connect", "1s"),
    ("idle", "500ms"),
];
/// Longest a single exchange may take; far above every timeout above.
const LIMIT: Duration = Duration::from_secs(5);
/// The healthy upstream's narinfo delay: the faulty one answers first.
const HEALTHY_DELAY: Duration = Duration::from_millis(150);
/// Beside a healthy upstream, no narinfo answer may wait for the faulty
/// one's timeouts (`first_byte` is 800 ms).
const BESIDE_WITHIN: Duration = Duration::from_millis(750);
/// How long metrics and the route database may take to catch up.
const SETTLE: Duration = Duration::from_secs(5);

struct Setup {
    ncro: NcroProcess,
    p: TestPath,
    ka: TestKey,
    kb: TestKey,
    faulty: FakeUpstream,
    /// The second upstream of the tier, of the kind `beside` says.
    second: Option<FakeUpstream>,
    beside: Beside,
    /// Target of the redirect rows.
    redirect_to: String,
    _storage: FakeUpstream,
    db: tempfile::TempDir,
}

impl Setup {
    fn new(row: &Row, beside: Beside, relay: &str) -> Setup {
        let (ka, kb) = (
            TestKey::generate("faulty-1"),
            TestKey::generate("healthy-1"),
        );
        let p = TestPath::with_contents("matrix", &random_bytes(128 * 1024));
        let storage = FakeUpstream::builder().path(&p, &ka).start();
        let path = target_path(&p, row.target);
        let redirect_to = format!("{}{path}", storage.url());
        let fault = fault_for(row, &p, &ka, &redirect_to);
        let faulty = FakeUpstream::builder()
            .cache_info(40)
            .path(&p, &ka)
            .rule(PathMatch::exact(&path), fault)
            .start();
        let mut ups = vec![entry(faulty.url(), 10, &ka)];
        let second = match beside {
            Beside::Nothing => None,
            Beside::Healthy => Some(
                FakeUpstream::builder()
                    .cache_info(40)
                    .path(&p, &kb)
                    .rule(PathMatch::suffix(".narinfo"), Fault::Delay(HEALTHY_DELAY))
                    .start(),
            ),
            Beside::Empty => Some(FakeUpstream::builder().cache_info(40).start()),
        };
        if let Some(up) = &second {
            ups.push(entry(up.url(), 10, &kb));
        }
        let db = db_dir();
        let mut cfg = NcroConfig::new(&ups, &db.path().join("r.db"))
            .set("server", "workers", 1)
            .set("server", "nar_relay", relay)
            .set("cache", "negative_ttl", "1h");
        for (k, v) in TIMEOUTS {
            cfg = cfg.set("timeouts", k, v);
        }
        Setup {
            ncro: cfg.start(),
            p,
            ka,
            kb,
            faulty,
            second,
            beside,
            redirect_to,
            _storage: storage,
            db,
        }
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        fetch(self.ncro.addr(), path, headers, LIMIT)
    }

    fn healthy(&self) -> Option<&FakeUpstream> {
        self.second
            .as_ref()
            .filter(|_| self.beside == Beside::Healthy)
    }

    fn asked(&self, target: Target) -> usize {
        self.faulty.request_count(&target_path(&self.p, target))
    }
}

fn target_path(p: &TestPath, t: Target) -> String {
    match t {
        Target::Narinfo => p.narinfo_request_path(),
        Target::Nar => p.nar_request_path(),
    }
}

/// The fake's fault for a row; bodies are cut in their middle.
fn fault_for(row: &Row, p: &TestPath, key: &TestKey, redirect_to: &str) -> Fault {
    let narinfo = p.narinfo(&[key]);
    let (cut, step) = match row.target {
        Target::Narinfo => (narinfo.len() / 2, 64),
        Target::Nar => (p.nar.len() / 2, 16 * 1024),
    };
    let forged = |text: String| Fault::Body(text.into_bytes());
    match row.inject {
        Inject::Status(s) => Fault::Status(s),
        Inject::Unavailable => {
            Fault::StatusWithHeaders(503, vec![("Retry-After".into(), "30".into())])
        }
        Inject::ResetBeforeHead => Fault::Reset,
        Inject::ResetMidBody => Fault::ResetMidBody(cut),
        Inject::HangBeforeHead => Fault::Hang,
        Inject::HangMidBody => Fault::HangMidBody(cut),
        Inject::TruncatedWithLength => Fault::Truncate(cut),
        Inject::TruncatedNoLength => Fault::TruncateNoLength(cut),
        Inject::BadChunked => Fault::BadChunked,
        Inject::BadSignature => {
            let forger = TestKey::generate(key.name());
            forged(p.narinfo(&[&forger]))
        }
        Inject::WrongStorePath => forged(TestPath::new("other").narinfo(&[key])),
        Inject::Malformed => {
            let size = format!("NarSize: {}\n", p.nar_size());
            forged(narinfo.replace(&size, "NarSize: lots\n"))
        }
        Inject::Crlf => forged(narinfo.replace('\n', "\r\n")),
        Inject::ForgedCa => {
            let unsigned: String = narinfo
                .lines()
                .filter(|l| !l.starts_with("Sig:"))
                .map(|l| format!("{l}\n"))
                .collect();
            // A real-looking CA whose hash is of other content.
            forged(
                unsigned
                    + "CA: fixed:r:sha256:1b26xkfi12a87bd8yhnq5mhf6g52d7hb0b5sh63n5bmcg7alb5nk\n",
            )
        }
        Inject::Oversize => {
            let pad = 4 * 1024 * 1024 + 1 - narinfo.len();
            forged(format!("{narinfo}X-Padding: {}\n", "a".repeat(pad)))
        }
        Inject::Redirect => Fault::Redirect(redirect_to.to_owned()),
        Inject::EnormousHeaders => Fault::EnormousHeaders,
        Inject::Trickle => Fault::Trickle(step, Duration::from_millis(40)),
    }
}

/// Runs `row` with `beside` in the faulty upstream's tier, with this
/// `server.nar_relay` mode.
pub fn run(row: &Row, beside: Beside, relay: &str) {
    let s = Setup::new(row, beside, relay);
    if row.target == Target::Nar {
        // Nix always asks for the narinfo first; it routes the NAR to the
        // faulty upstream (the healthy one answers narinfos later).
        let got = s.get(&s.p.narinfo_request_path(), &[]);
        assert_narinfo(&s, &got, &s.ka);
    }
    let before = scrape(&s.ncro);
    let path = target_path(&s.p, row.target);
    let mut got = s.get(&path, &[]);
    let sees = match beside {
        Beside::Nothing => row.sees,
        Beside::Healthy => row.with_healthy,
        Beside::Empty => row.with_empty,
    };
    check_sees(&s, row.target, sees, &got);
    if matches!(
        sees,
        Sees::Status(_) | Sees::Served | Sees::FromHealthy | Sees::Redirected | Sees::FailedOver
    ) {
        assert!(
            still_usable(&mut got),
            "client connection lost after {sees:?}"
        );
    }
    if beside == Beside::Healthy {
        if sees == Sees::CutShort {
            // No healing: the resume must avoid the upstream that cut it.
            resume(&s, &got, true);
        }
        if row.target == Target::Narinfo {
            assert!(
                got.elapsed < BESIDE_WITHIN,
                "waited {:?} for the faulty upstream",
                got.elapsed
            );
        }
    } else {
        // Beside a healthy upstream the faulty attempt may still be running
        // when the other wins; it is then cancelled and not counted. An
        // upstream without the path changes none of this.
        check_counted(&s, row, &before);
        check_kept(&s, row, &got, sees);
    }
}

fn assert_narinfo(s: &Setup, got: &Got, signer: &TestKey) {
    assert_eq!(got.status, 200, "{got:?}\n{}", s.ncro.logs());
    assert!(got.complete, "{got:?}");
    let text = got.text();
    let want = format!("StorePath: {}\n", s.p.store_path());
    assert!(text.contains(&want) && !text.contains('\r'), "{text}");
    let sigs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .collect();
    assert_eq!(sigs, [signer.name()], "{text}");
}

fn check_sees(s: &Setup, target: Target, sees: Sees, got: &Got) {
    let nar = &s.p.nar;
    let shorter_prefix = got.body.len() < nar.len() && nar.starts_with(&got.body);
    let ctx = || {
        format!(
            "{sees:?}: got {} {:?}\n{}",
            got.status,
            got.headers,
            s.ncro.logs()
        )
    };
    match sees {
        Sees::Status(code) => {
            assert_eq!(got.status, code, "{}", ctx());
            assert!(got.complete, "{}", ctx());
        }
        Sees::Served | Sees::FromHealthy if target == Target::Narinfo => {
            let by_healthy = sees == Sees::FromHealthy;
            assert_narinfo(s, got, if by_healthy { &s.kb } else { &s.ka });
        }
        Sees::Served | Sees::FromHealthy => {
            assert_eq!(got.status, 200, "{}", ctx());
            assert!(
                got.complete && got.body == *nar,
                "{} bytes; {}",
                got.body.len(),
                ctx()
            );
            if let Some(h) = s.healthy() {
                let asked = h.request_count(&s.p.nar_request_path());
                let want = sees == Sees::FromHealthy;
                assert_eq!(asked > 0, want, "healthy upstream asked {asked} times");
            }
        }
        Sees::CutShort => {
            assert_eq!(got.status, 200, "{}", ctx());
            assert!(!got.complete && got.closed, "cut NAR not closed: {}", ctx());
            assert!(shorter_prefix, "{} bytes; {}", got.body.len(), ctx());
            if let Some(len) = got.header("Content-Length") {
                assert_eq!(len, nar.len().to_string(), "{}", ctx());
            }
            assert_eq!(got.header("Accept-Ranges"), Some("bytes"), "{}", ctx());
        }
        Sees::FailedOver => {
            assert_eq!(got.status, 200, "{}", ctx());
            assert!(
                got.complete && got.body == *nar,
                "{} bytes; {}",
                got.body.len(),
                ctx()
            );
            let h = s.healthy().expect("failover needs the healthy upstream");
            let last = nar.len() - 1;
            let ranges: Vec<_> = h
                .requests()
                .into_iter()
                .filter(|r| r.path == s.p.nar_request_path())
                .filter_map(|r| r.header("Range").map(str::to_owned))
                .collect();
            // A reset may lose bytes the faulty upstream wrote; never more.
            let from = |r: &String| {
                r.strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix(&format!("-{last}")))
                    .and_then(|n| n.parse::<usize>().ok())
            };
            assert!(
                ranges.len() == 1 && from(&ranges[0]).is_some_and(|n| n <= nar.len() / 2),
                "healthy upstream's ranges: {ranges:?}"
            );
        }
        Sees::Redirected => {
            assert_eq!(got.status, 302, "{}", ctx());
            assert_eq!(got.header("Location"), Some(s.redirect_to.as_str()));
        }
        Sees::LooksComplete => {
            assert_eq!(got.status, 200, "{}", ctx());
            assert!(got.complete && got.closed, "{}", ctx());
            assert!(shorter_prefix, "{} bytes; {}", got.body.len(), ctx());
        }
    }
}

/// Waits until `cond` holds for a fresh scrape; panics with the last one.
fn settle(s: &Setup, what: &str, cond: impl Fn(&Scrape) -> bool) {
    let mut last = String::new();
    let ok = eventually(SETTLE, || {
        let now = scrape(&s.ncro);
        let ok = cond(&now);
        last = now.text;
        ok
    });
    assert!(ok, "{what}; last scrape:\n{last}\n{}", s.ncro.logs());
}

fn check_counted(s: &Setup, row: &Row, before: &Scrape) {
    let delta = |now: &Scrape, name: &str, labels: &[(&str, &str)]| {
        now.value(name, labels) - before.value(name, labels)
    };
    let url = s.faulty.url();
    match row.counted {
        Counted::Outcome(o) => {
            let labels = [("upstream", url.as_str()), ("outcome", o)];
            settle(s, &format!("outcome {o} counted once"), |now| {
                delta(now, "ncro_upstream_requests_total", &labels) == 1.0
            });
        }
        Counted::NarError => settle(s, "one NAR error", |now| {
            delta(now, "ncro_nar_errors_total", &[]) == 1.0
        }),
        Counted::NarOk => {
            let ok = [("outcome", "ok")];
            settle(s, "one NAR request finished without error", |now| {
                delta(now, "ncro_nar_request_duration_seconds_count", &ok) == 1.0
                    && delta(now, "ncro_nar_errors_total", &[]) == 0.0
            });
        }
    }
}

/// Asks for the rest of a cut NAR the way Nix does (`Range: bytes=N-`, or
/// again from the start when nothing arrived).
fn resume(s: &Setup, cut: &Got, beside_healthy: bool) {
    let have = cut.body.len();
    let range = format!("bytes={have}-");
    let headers: &[(&str, &str)] = if have > 0 { &[("Range", &range)] } else { &[] };
    let got = s.get(&s.p.nar_request_path(), headers);
    let total = s.p.nar.len();
    let want_status = if have > 0 { 206 } else { 200 };
    assert_eq!(
        got.status,
        want_status,
        "resume: {got:?}\n{}",
        s.ncro.logs()
    );
    assert!(got.complete && got.body == s.p.nar[have..], "resume body");
    if have > 0 {
        let want = format!("bytes {have}-{}/{total}", total - 1);
        assert_eq!(got.header("Content-Range"), Some(want.as_str()));
    }
    if let (true, Some(h)) = (beside_healthy, s.healthy()) {
        let asked = h.request_count(&s.p.nar_request_path());
        assert!(asked >= 1, "the resume went back to the faulty upstream");
    }
}

fn check_kept(s: &Setup, row: &Row, first: &Got, sees: Sees) {
    let asked = s.asked(row.target);
    let path = target_path(&s.p, row.target);
    let negative_hits = |sc: &Scrape| sc.value("ncro_narinfo_memory_negative_hits_total", &[]);
    let before = scrape(&s.ncro);
    match row.kept {
        Kept::Negative => {
            for heal in [false, true] {
                if heal {
                    s.faulty.heal();
                }
                let got = s.get(&path, &[]);
                assert_eq!(got.status, 404, "negative entry: {got:?}");
                assert_eq!(s.asked(row.target), asked, "a negative entry asks nobody");
            }
            let hits = negative_hits(&scrape(&s.ncro)) - negative_hits(&before);
            assert_eq!(hits, 2.0, "answered from the negative entry twice");
            wait_in_db(s, "negative_cache");
        }
        Kept::Route => {
            let got = s.get(&path, &[]);
            assert_eq!((got.status, &got.body), (200, &first.body));
            assert_eq!(s.asked(row.target), asked, "a route asks nobody");
            wait_in_db(s, "route_log");
        }
        Kept::Nothing => {
            s.faulty.heal();
            if sees == Sees::CutShort {
                resume(s, first, false);
            } else {
                check_sees(s, row.target, Sees::Served, &s.get(&path, &[]));
            }
            assert!(s.asked(row.target) > asked, "the upstream was asked again");
            let hits = negative_hits(&scrape(&s.ncro)) - negative_hits(&before);
            assert_eq!(hits, 0.0, "no negative entry");
        }
    }
}

/// Waits until the route database holds `table` row for the path's hash.
fn wait_in_db(s: &Setup, table: &str) {
    let db = s.db.path().join("r.db");
    let found = eventually(SETTLE, || in_db(&db, table, &s.p.hash));
    assert!(
        found,
        "{} never reached {table}\n{}",
        s.p.hash,
        s.ncro.logs()
    );
}

fn in_db(db: &Path, table: &str, hash: &str) -> bool {
    use rusqlite::{Connection, OpenFlags};
    let Ok(c) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return false;
    };
    let _ = c.busy_timeout(Duration::from_secs(1)); // the default (0) applies otherwise
                                                    // The route log names the store hash `hash`; ncro 2.2's tables `store_path`.
    let column = if table == "route_log" {
        "hash"
    } else {
        "store_path"
    };
    let sql = format!("SELECT count(*) FROM {table} WHERE {column} = ?1");
    c.query_row(&sql, [hash], |r| r.get::<_, i64>(0))
        .is_ok_and(|n| n == 1)
}
