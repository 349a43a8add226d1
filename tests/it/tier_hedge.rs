//! Hedge delays per tier (docs/routing.md, "Hedge") through the real
//! binary, with three tiers counted at fake upstreams: X (priority 10,
//! empty, fast), Y (priority 20, every answer `SLOW`) and Z (priority 30,
//! fast). X's probe makes its tier late after the 50 ms floor; Y's own
//! probe and wins make its tier late only after 3 × `SLOW`. So a Y that
//! answers slowly but in its usual time is not hedged into Z (a hedge timed
//! by X's latency would ask Z on every lookup), while a Y that hangs is.
//! Early starts are off (budget 0): only the hedge moves tiers. The bounds
//! separate `SLOW` from 3 × `SLOW` and the 30 s deadline; none measures
//! speed.

use std::time::Duration;

use serde_json::Value;

use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::{NcroProcess, Response};
use crate::routing::{db_dir, entry, timed_get, NcroConfig};
use crate::server::eventually;

/// Y's delay before every answer, probes included.
const SLOW: Duration = Duration::from_millis(600);
const WAIT: Duration = Duration::from_secs(30);

struct Three {
    x: FakeUpstream,
    y: FakeUpstream,
    z: FakeUpstream,
    ncro: NcroProcess,
    _db: tempfile::TempDir,
}

/// Y and Z hold `paths`; Y never answers for `hang`'s narinfo (Z holds it).
fn three(paths: &[TestPath], hang: &TestPath) -> Three {
    let (kx, ky, kz) = (
        TestKey::generate("tier-x-1"),
        TestKey::generate("tier-y-1"),
        TestKey::generate("tier-z-1"),
    );
    let x = FakeUpstream::builder().start();
    let mut y = FakeUpstream::builder()
        .latency(SLOW)
        .path(hang, &ky)
        .rule(PathMatch::exact(&hang.narinfo_request_path()), Fault::Hang);
    let mut z = FakeUpstream::builder().path(hang, &kz);
    for p in paths {
        y = y.path(p, &ky);
        z = z.path(p, &kz);
    }
    let (y, z) = (y.start(), z.start());
    let db = db_dir();
    let ups = [
        entry(x.url(), 10, &kx),
        entry(y.url(), 20, &ky),
        entry(z.url(), 30, &kz),
    ];
    // Probes on (one at start-up, the next 30 s later); the cap and the
    // deadline far away: only an EMA-based delay hedges.
    let ncro = NcroConfig::new(&ups, &db.path().join("routes.db"))
        .set("health", "enabled", true)
        .set("health", "hedge_after", "30s")
        .set("health", "early_start_budget", 0.0)
        .set("timeouts", "race_deadline", "30s")
        .start();
    Three {
        x,
        y,
        z,
        ncro,
        _db: db,
    }
}

/// Each upstream's `latency_ms` in `/health` (0 while unmeasured).
fn emas(t: &Three) -> [f64; 3] {
    let r = t.ncro.get("/health");
    assert_eq!(r.status, 200);
    let h: Value = serde_json::from_slice(&r.body).expect("/health is JSON");
    [&t.x, &t.y, &t.z].map(|f| {
        h["upstreams"]
            .as_array()
            .and_then(|l| l.iter().find(|u| u["url"] == f.url()))
            .and_then(|u| u["latency_ms"].as_f64())
            .unwrap_or(0.0)
    })
}

fn signed_by(r: &Response, key_name: &str) -> bool {
    r.text().contains(&format!("\nSig: {key_name}:"))
}

fn asked(f: &FakeUpstream, p: &TestPath) -> usize {
    f.request_count(&p.narinfo_request_path())
}

#[test]
fn a_slow_tier_is_hedged_on_its_own_latency_not_the_tier_above() {
    let paths: Vec<TestPath> = (0..4)
        .map(|i| TestPath::new(&format!("slow-y-{i}")))
        .collect();
    let hang = TestPath::new("hung-y");
    let t = three(&paths, &hang);
    // The start-up probes: X fast, Y about SLOW.
    let measured = eventually(WAIT, || {
        let [x, y, z] = emas(&t);
        x > 0.0 && y >= SLOW.as_millis() as f64 * 0.9 && z > 0.0
    });
    assert!(
        measured,
        "probes: {:?}\n{}\n{}",
        emas(&t),
        t.ncro.get("/health").text(),
        t.ncro.logs()
    );

    // Y answers in its usual time: X, then Y, and never Z.
    for p in &paths {
        let (r, took) = timed_get(&t.ncro, &p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}\n{}", r.text(), t.ncro.logs());
        assert!(signed_by(&r, "tier-y-1"), "{}", r.text());
        assert!(took >= SLOW, "{took:?}");
        assert_eq!((asked(&t.x, p), asked(&t.y, p)), (1, 1));
        assert_eq!(asked(&t.z, p), 0, "Z asked for {}", p.basename());
    }

    // Y hangs: Z joins once Y's tier is late by Y's own clock (3 × its
    // EMA, at least 3 × SLOW · 0.9), long before the 30 s deadline.
    let (r, took) = timed_get(&t.ncro, &hang.narinfo_request_path());
    assert_eq!(r.status, 200, "{}\n{}", r.text(), t.ncro.logs());
    assert!(signed_by(&r, "tier-z-1"), "{}", r.text());
    assert!(
        took < Duration::from_secs(15),
        "waited for the deadline: {took:?}"
    );
    let at = |f: &FakeUpstream| {
        f.requests()
            .into_iter()
            .find(|q| q.path == hang.narinfo_request_path())
            .map(|q| q.at)
            .expect("asked")
    };
    let (y_at, z_at) = (at(&t.y), at(&t.z));
    assert!(
        z_at.duration_since(y_at) >= SLOW * 2,
        "Z joined {:?} after Y: not on Y's clock",
        z_at.duration_since(y_at)
    );
    assert_eq!(asked(&t.z, &hang), 1);
}
