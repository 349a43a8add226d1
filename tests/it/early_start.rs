//! Early starts (docs/routing.md, "Early starts") through the real binary:
//! a tier that keeps missing has the next tier started with it; a tier that
//! mostly hits does not; `resolution_policy = "strict"` never does; and
//! `health.early_start_budget` bounds the extra upstream requests. Requests
//! are counted at fake upstreams; the upper tier is made slow (a delay
//! before its answers) only after the statistics are learnt, so "answered
//! before the upper tier could" is a wide, one-sided bound.

use std::time::{Duration, Instant};

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::metrics::{scrape, scrape_until, Scrape};
use crate::routing::{db_dir, entry, NcroConfig};
use crate::server::eventually;

/// The upper tier's delay once the statistics are learnt.
const SLOW: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(30);

struct Tiers {
    upper: FakeUpstream,
    lower: FakeUpstream,
    ncro: NcroProcess,
    _db: tempfile::TempDir,
}

/// Tier 10 holds `upper_holds` of `paths`, tier 20 holds all of them.
/// Probes off (the statistics come from races alone); hedge and deadline
/// far away, so only an early start starts tier 20 before tier 10 answered.
fn tiers(paths: &[TestPath], upper_holds: &[usize], set: &[(&str, &str, toml::Value)]) -> Tiers {
    let (ku, kl) = (TestKey::generate("upper-1"), TestKey::generate("lower-1"));
    let mut upper = FakeUpstream::builder();
    for &i in upper_holds {
        upper = upper.path(&paths[i], &ku);
    }
    let mut lower = FakeUpstream::builder();
    for p in paths {
        lower = lower.path(p, &kl);
    }
    let (upper, lower) = (upper.start(), lower.start());
    let db = db_dir();
    let ups = [entry(upper.url(), 10, &ku), entry(lower.url(), 20, &kl)];
    let mut cfg = NcroConfig::new(&ups, &db.path().join("routes.db"))
        .set("health", "enabled", false)
        .set("health", "hedge_after", "30s")
        .set("timeouts", "race_deadline", "30s");
    for (section, key, value) in set {
        cfg = cfg.set(section, key, value.clone());
    }
    Tiers {
        upper,
        lower,
        ncro: cfg.start(),
        _db: db,
    }
}

fn paths(tag: &str, n: usize) -> Vec<TestPath> {
    (0..n)
        .map(|i| TestPath::new(&format!("{tag}-{i}")))
        .collect()
}

/// Looks every path up once, in order; each must be found.
fn look_up(t: &Tiers, paths: &[TestPath]) -> Vec<Duration> {
    paths
        .iter()
        .map(|p| {
            let at = Instant::now();
            let r = t.ncro.get(&p.narinfo_request_path());
            assert_eq!(r.status, 200, "{}\n{}", r.text(), t.ncro.logs());
            at.elapsed()
        })
        .collect()
}

/// Waits until the statistics of tier 10 hold at least `n` outcomes (the
/// decision of that tick is then published too).
fn learnt(t: &Tiers, n: f64) -> Scrape {
    scrape_until(&t.ncro, "tier 10 statistics", WAIT, |m| {
        let v = |r| {
            m.get(
                "ncro_narinfo_tier_outcomes",
                &[("priority", "10"), ("result", r)],
            )
        };
        v("found").unwrap_or(0.0) + v("missed").unwrap_or(0.0) >= n
    })
}

fn armed(m: &Scrape) -> f64 {
    m.value("ncro_narinfo_tier_early_start", &[("priority", "10")])
}

fn early(m: &Scrape, result: &str) -> f64 {
    m.value("ncro_narinfo_early_starts_total", &[("result", result)])
}

fn early_total(m: &Scrape) -> f64 {
    early(m, "useful") + early(m, "wasted") + early(m, "unknown")
}

/// Narinfo requests for `p` a fake received.
fn asked(f: &FakeUpstream, p: &TestPath) -> usize {
    f.request_count(&p.narinfo_request_path())
}

#[test]
fn a_tier_that_keeps_missing_has_the_next_tier_started_with_it() {
    let all = paths("skip", 34);
    let (learn, after) = all.split_at(24);
    let t = tiers(&all, &[], &[]);
    look_up(&t, learn);
    let m = learnt(&t, 20.0);
    assert_eq!(armed(&m), 1.0, "{}\n{}", m.text, t.ncro.logs());
    assert_eq!(early_total(&m), 0.0, "nothing started early while learning");

    t.upper.set_latency(SLOW);
    let took = look_up(&t, after);
    for (p, took) in after.iter().zip(&took) {
        // Sequential order cannot answer before tier 10's 404 (SLOW).
        assert!(*took < SLOW, "{took:?}: tier 20 waited for tier 10");
        assert_eq!(asked(&t.lower, p), 1);
    }
    // Tier 10 is still asked (its answers keep the statistics alive) and
    // its late 404s are counted once they arrive: every early request was
    // one that sequential order would have sent too.
    let m = scrape_until(&t.ncro, "early starts settled", WAIT, |m| {
        early(m, "useful") >= 10.0
    });
    assert_eq!(early(&m, "useful"), 10.0, "{}", m.text);
    assert_eq!(
        early(&m, "wasted") + early(&m, "unknown"),
        0.0,
        "{}",
        m.text
    );
    assert!(eventually(WAIT, || after
        .iter()
        .all(|p| asked(&t.upper, p) == 1)));
    assert_eq!(armed(&scrape(&t.ncro)), 1.0);
}

#[test]
fn a_tier_that_mostly_hits_keeps_tier_order() {
    let all = paths("hit", 28);
    // Tier 10 holds 20 of the 24 learnt paths (83%), none of the rest.
    let t = tiers(&all, &(0..20).collect::<Vec<_>>(), &[]);
    look_up(&t, &all[..24]);
    let m = learnt(&t, 20.0);
    assert_eq!(armed(&m), 0.0, "{}", m.text);

    t.upper.set_latency(SLOW);
    let after = &all[24..];
    for took in look_up(&t, after) {
        assert!(took >= SLOW, "{took:?}: answered before tier 10's 404");
    }
    let m = scrape(&t.ncro);
    assert_eq!(early_total(&m), 0.0, "{}", m.text);
    for p in after {
        assert_eq!((asked(&t.upper, p), asked(&t.lower, p)), (1, 1));
    }
}

#[test]
fn strict_resolution_never_starts_a_tier_early() {
    let all = paths("strict", 27);
    let t = tiers(
        &all,
        &[],
        &[("cache", "resolution_policy", "strict".into())],
    );
    look_up(&t, &all[..24]);
    // The same statistics that arm tier 20 under "hedged" (first test).
    let m = learnt(&t, 20.0);
    let missed = m.value(
        "ncro_narinfo_tier_outcomes",
        &[("priority", "10"), ("result", "missed")],
    );
    assert!(missed >= 20.0, "{}", m.text);
    assert_eq!(armed(&m), 0.0, "{}", m.text);

    t.upper.set_latency(SLOW);
    for took in look_up(&t, &all[24..]) {
        assert!(
            took >= SLOW,
            "{took:?}: tier 20 asked before tier 10 answered"
        );
    }
    assert_eq!(early_total(&scrape(&t.ncro)), 0.0);
}

#[test]
fn the_budget_bounds_the_extra_requests() {
    // Tier 10 holds 3 of the 30 learnt paths (10%, learnt last so that
    // decay cannot make the fraction look smaller) and 2 of the next 20.
    let all = paths("budget", 50);
    let holds: Vec<usize> = vec![27, 28, 29, 35, 45];
    // Budget 3%: 10% found would cost 10% extra requests; not armed.
    let t = tiers(
        &all,
        &holds,
        &[("health", "early_start_budget", 0.03.into())],
    );
    look_up(&t, &all[..30]);
    let m = learnt(&t, 25.0);
    assert_eq!(armed(&m), 0.0, "{}", m.text);
    drop(t);

    // Default budget 10%: armed; tier 20 is asked for every path, and the
    // requests tier 10 made needless stay within 10% of sequential order's.
    let t = tiers(&all, &holds, &[]);
    look_up(&t, &all[..30]);
    let m = learnt(&t, 25.0);
    assert_eq!(armed(&m), 1.0, "{}", m.text);
    let before = scrape(&t.ncro);
    let after = &all[30..];
    // Tier 10 answers (found or 404) only after tier 20 was asked.
    t.upper.set_latency(Duration::from_millis(300));
    look_up(&t, after);
    let m = scrape_until(&t.ncro, "early starts settled", WAIT, |m| {
        early_total(m) - early_total(&before) >= 20.0
    });
    let wasted = early(&m, "wasted") - early(&before, "wasted");
    assert_eq!(
        early(&m, "useful") - early(&before, "useful"),
        18.0,
        "{}",
        m.text
    );
    assert_eq!(wasted, 2.0, "{}", m.text);
    // Counted at the fakes: what sequential order would have sent, and
    // what was sent beyond it (tier 20 asked for a path tier 10 held).
    let held = |p: &TestPath| holds.iter().any(|&i| all[i].store_path() == p.store_path());
    let sequential: usize = after
        .iter()
        .map(|p| asked(&t.upper, p) + usize::from(!held(p)))
        .sum();
    let extra: usize = after
        .iter()
        .filter(|p| held(p))
        .map(|p| asked(&t.lower, p))
        .sum();
    assert_eq!(sequential, 38);
    assert!(
        extra as f64 <= wasted,
        "{extra} extra requests, {wasted} counted"
    );
    assert!(
        extra as f64 <= 0.1 * sequential as f64,
        "{extra} extra requests over {sequential}"
    );
}
