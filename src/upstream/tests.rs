use super::*;
use crate::race::{AttemptReport, AttemptResult, FailKind};
use health::UpstreamHealth;

/// Three upstreams: `a` (priority 1, denies names starting with "secret"),
/// `b` and `c` (priority 2).
fn setup() -> (Config, UpstreamSet) {
    let toml = "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\npriority = 1\n\
        [[upstreams.filters]]\naction = \"deny\"\npattern = \"secret*\"\n\
        [[upstreams]]\nurl = \"http://127.0.0.1:2\"\npriority = 2\n\
        [[upstreams]]\nurl = \"http://127.0.0.1:3\"\npriority = 2\n";
    let cfg = Config::from_toml(
        toml,
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    let set = UpstreamSet::from_config(&cfg).expect("set");
    (cfg, set)
}

/// A snapshot where upstream `i` has `fails[i]` consecutive failures and
/// EMA `emas[i]`.
fn snapshot(set: &UpstreamSet, fails: &[u32], emas: &[f64]) -> HealthSnapshot {
    let now = Instant::now();
    let table: Vec<_> = fails
        .iter()
        .zip(emas)
        .map(|(&f, &e)| UpstreamHealth::restored(e, f, 1, now))
        .collect();
    HealthSnapshot::build(&set.priorities(), &table)
}

fn routing(fails: &[u32], emas: &[f64]) -> (Routing, UpstreamSet, flume::Receiver<Sample>) {
    let (cfg, set) = setup();
    let (r, rx) = Routing::new(&set, &cfg, snapshot(&set, fails, emas));
    (r, set, rx)
}

fn upstreams(plan: &RacePlan) -> Vec<usize> {
    plan.candidates.iter().map(|c| c.upstream).collect()
}

#[test]
fn races_skip_down_upstreams_unless_all_are_down() {
    let (r, set, _rx) = routing(&[0, 0, 10], &[10.0, 20.0, 5.0]);
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(upstreams(&plan), [0, 1]);
    assert!(plan.partial);
    r.publish(snapshot(&set, &[10, 10, 10], &[10.0, 20.0, 5.0]));
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(
        upstreams(&plan),
        [0, 2, 1],
        "everyone, in tier and EMA order"
    );
    assert!(!plan.partial, "every upstream was asked");
}

#[test]
fn cooling_upstreams_skip_races_until_all_are_cooling() {
    let (r, set, _rx) = routing(&[0, 0, 0], &[10.0, 20.0, 30.0]);
    let now = Instant::now();
    let failed = AttemptReport {
        result: AttemptResult::Failed(FailKind::Connect),
        latency: Duration::ZERO,
    };
    r.observe(1, &failed);
    let plan = r.plan_race(&set, now);
    assert_eq!(upstreams(&plan), [0, 2]);
    let cooling: Vec<usize> = plan.cooling.iter().map(|c| c.upstream).collect();
    assert_eq!(cooling, [1], "kept as the fallback");
    assert!(
        !plan.partial,
        "a cooling upstream is still asked in the end"
    );
    // A 5xx is an answer, not a transport failure: no cooldown.
    r.failed(2, FailKind::Status5xx(502));
    assert_eq!(upstreams(&r.plan_race(&set, now)), [0, 2]);
    r.failed(0, FailKind::Timeout);
    r.failed(2, FailKind::Reset);
    let plan = r.plan_race(&set, now);
    assert_eq!(upstreams(&plan), [0, 1, 2], "all cooling: ask all");
    assert!(plan.cooling.is_empty());
}

#[test]
fn each_tier_gets_the_hedge_delay_of_its_own_members() {
    let (r, set, _rx) = routing(&[0, 0, 0], &[40.0, 900.0, 300.0]);
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(plan.hedge_after.after(1), Duration::from_millis(120));
    // Tier 2's slowest member (900 ms): 2.7 s, capped at 2 s.
    assert_eq!(plan.hedge_after.after(2), Duration::from_secs(2));
    r.publish(snapshot(&set, &[0, 0, 0], &[40.0, 200.0, 300.0]));
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(plan.hedge_after.after(2), Duration::from_millis(900));
    // A priority with no candidate gets the cap.
    assert_eq!(plan.hedge_after.after(3), Duration::from_secs(2));
    // A DEGRADED member's stale EMA is left out: the other one decides.
    r.publish(snapshot(&set, &[0, 3, 0], &[40.0, 900.0, 100.0]));
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(plan.hedge_after.after(2), Duration::from_millis(300));
    // A tier with no measured member gets the cap, whatever tier 1 says.
    r.publish(snapshot(&set, &[0, 0, 0], &[40.0, 0.0, 0.0]));
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(plan.hedge_after.after(1), Duration::from_millis(120));
    assert_eq!(plan.hedge_after.after(2), Duration::from_secs(2));
    // With tier 1 DOWN, it is not raced: tier 2 keeps its own delay.
    r.publish(snapshot(&set, &[10, 0, 0], &[40.0, 200.0, 300.0]));
    let plan = r.plan_race(&set, Instant::now());
    assert_eq!(upstreams(&plan), [1, 2]);
    assert_eq!(plan.hedge_after.after(2), Duration::from_millis(900));
}

#[test]
fn winners_latencies_reach_the_control_thread() {
    let (r, _set, rx) = routing(&[0, 0, 0], &[1.0, 1.0, 1.0]);
    let won = AttemptReport {
        result: AttemptResult::Accepted,
        latency: Duration::from_millis(7),
    };
    r.observe(2, &won);
    let s = rx.try_recv().expect("a sample");
    assert_eq!((s.upstream, s.latency), (2, Duration::from_millis(7)));
    for _ in 0..SAMPLE_QUEUE + 10 {
        r.observe(0, &won); // never blocks, even with nobody reading
    }
    assert_eq!(rx.len(), SAMPLE_QUEUE);
}

#[test]
fn nar_order_puts_the_routed_upstream_first_and_cooling_ones_last() {
    let (r, _set, _rx) = routing(&[0, 0, 0], &[10.0, 30.0, 20.0]);
    let now = Instant::now();
    assert_eq!(r.nar_order(None, now), [0, 2, 1]);
    assert_eq!(r.nar_order(Some(1), now), [1, 0, 2]);
    r.failed(1, FailKind::Connect);
    assert_eq!(r.nar_order(Some(1), now), [0, 2, 1]);
}

#[test]
fn routes_to_down_upstreams_are_noticed_cheaply() {
    let (r, set, _rx) = routing(&[0, 0, 0], &[1.0, 1.0, 1.0]);
    let ups = Upstreams::new(set.clone());
    assert!(!r.route_is_down(&ups, "http://127.0.0.1:1"));
    r.publish(snapshot(&set, &[10, 0, 0], &[1.0, 1.0, 1.0]));
    assert!(r.route_is_down(&ups, "http://127.0.0.1:1"));
    assert!(!r.route_is_down(&ups, "http://127.0.0.1:2"));
    assert!(!r.route_is_down(&ups, "http://unknown"));
    assert_eq!(
        r.nar_order(Some(0), Instant::now()),
        [1, 2],
        "DOWN left out"
    );
    // Everything DOWN: serving a cached route beats racing nobody.
    r.publish(snapshot(&set, &[10, 10, 10], &[1.0, 1.0, 1.0]));
    assert!(!r.route_is_down(&ups, "http://127.0.0.1:1"));
}

fn stored_narinfo(name: &str) -> String {
    format!(
        "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-{name}\nURL: nar/x.nar\n\
         NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 5\n"
    )
}

#[test]
fn stored_narinfos_are_checked_against_the_current_filters() {
    let (_cfg, set) = setup();
    let accepts = |i: usize, name: &str| set.accepts_stored(i, stored_narinfo(name).as_bytes());
    assert!(accepts(0, "hello"));
    assert!(!accepts(0, "secret-key"), "upstream 0 denies secret*");
    assert!(accepts(1, "secret-key"), "filters are per upstream");
    assert!(!accepts(7, "hello"), "unknown upstream");
    assert!(
        !set.accepts_stored(0, b"not a narinfo"),
        "unparsable under a filter"
    );
    assert!(
        set.accepts_stored(1, b"not a narinfo"),
        "no filters, nothing to check"
    );
}

/// One upstream (no filters) trusting `keys`.
fn keyed_set(keys: &[&crate::proto::signature::SecretKey]) -> UpstreamSet {
    let list: Vec<String> = keys
        .iter()
        .map(|k| format!("{:?}", k.public().to_nix_string()))
        .collect();
    let toml = format!(
        "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\npublic_keys = [{}]\n",
        list.join(", ")
    );
    let cfg = Config::from_toml(
        &toml,
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    UpstreamSet::from_config(&cfg).expect("set")
}

#[test]
fn stored_narinfos_are_checked_against_the_current_keys() {
    use crate::proto::content_address::tests::DEP;
    use crate::proto::signature::SecretKey;
    let old = SecretKey::generate("cache-1").unwrap();
    let new = SecretKey::generate("cache-2").unwrap();
    let unsigned = stored_narinfo("hello");
    let mut info = NarInfo::parse(unsigned.as_bytes()).unwrap();
    info.sigs = vec![old.sign(&info.fingerprint())];
    let signed = info.render();
    let (before, after, both) = (
        keyed_set(&[&old]),
        keyed_set(&[&new]),
        keyed_set(&[&new, &old]),
    );
    let accepts = |set: &UpstreamSet, body: &str| set.accepts_stored(0, body.as_bytes());
    assert!(accepts(&before, &signed));
    assert!(
        !accepts(&after, &signed),
        "signed only by a key no longer trusted"
    );
    assert!(
        accepts(&both, &signed),
        "rotation: the old key is still listed"
    );
    assert!(!accepts(&before, &unsigned));
    assert!(!before.accepts_stored(0, b"not a narinfo"));
    // A route stored from a forged narinfo (signature dropped, a CA for
    // other content added) is not served, whatever keys are configured.
    info.sigs.clear();
    info.ca = Some("fixed:r:sha256:0i0g5h0y4w5xf5rynap2x27zaib43xl5qr5wlj9vw83ai7p732m1".into());
    assert!(!accepts(&before, &info.render()));
    assert!(!accepts(&after, &info.render()));
    // A genuine content-addressed path needs no signature.
    assert!(accepts(&after, DEP));
}

/// Not a timed assertion: prints what planning one race costs (snapshot
/// load, cooldown checks, candidate list, hedge delay) for 3 upstreams.
#[test]
#[ignore]
fn plan_cost() {
    let (r, set, _rx) = routing(&[0, 0, 0], &[10.0, 30.0, 20.0]);
    let ups = Upstreams::new(set.clone());
    const N: u32 = 1_000_000;
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(r.plan_race(&set, Instant::now()));
    }
    println!("plan_race, 3 upstreams: {:?}", started.elapsed() / N);
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(r.route_is_down(&ups, "http://127.0.0.1:2"));
    }
    println!("route_is_down, nothing DOWN: {:?}", started.elapsed() / N);
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(ups.load());
    }
    println!(
        "Upstreams::load (set snapshot): {:?}",
        started.elapsed() / N
    );
    let arc = Arc::new(set);
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(arc.clone());
    }
    println!(
        "Arc<UpstreamSet>::clone (before): {:?}",
        started.elapsed() / N
    );
}

/// Discovery: a cached route to a retired upstream is raced again, and so
/// is one whose URL the set forgot when its slot was recycled.
#[test]
fn routes_to_retired_or_recycled_upstreams_are_raced_again() {
    let (cfg, mut set) = setup();
    set.reserve_discovered(1);
    let t0 = Instant::now();
    set.discover("http://10.0.0.9:5000", 20).expect("url");
    let healthy = |set: &UpstreamSet| {
        let table = vec![UpstreamHealth::restored(1.0, 0, 1, t0); set.len()];
        HealthSnapshot::build_present(&set.priorities(), &table, |i| set.is_live(i))
    };
    let (r, _rx) = Routing::new(&set, &cfg, healthy(&set));
    let ups = Upstreams::new(set.clone());
    assert!(!r.route_is_down(&ups, "http://10.0.0.9:5000"));
    assert_eq!(upstreams(&r.plan_race(&set, t0)), [0, 1, 2, 3]);
    set.retire("http://10.0.0.9:5000", t0);
    ups.publish(Arc::new(set.clone()));
    r.publish(healthy(&set));
    assert!(r.route_is_down(&ups, "http://10.0.0.9:5000"));
    assert!(!r.route_is_down(&ups, "http://127.0.0.1:1"));
    let plan = r.plan_race(&set, t0);
    assert_eq!(upstreams(&plan), [0, 1, 2]);
    assert!(!plan.partial, "a retired upstream is not one left out");
    set.discover("http://10.0.0.8:5000", 20).expect("url");
    ups.publish(Arc::new(set.clone()));
    r.forget_urls();
    r.publish(healthy(&set));
    assert!(
        r.route_is_down(&ups, "http://10.0.0.9:5000"),
        "forgotten URL"
    );
    assert!(!r.route_is_down(&ups, "http://10.0.0.8:5000"));
}

/// A plan made from a health snapshot newer than the worker's set (a slot
/// it does not have yet) or older (a slot retired since) only names live
/// upstreams of the set it holds.
#[test]
fn plans_only_name_live_slots_of_the_callers_set() {
    let (cfg, mut set) = setup();
    set.reserve_discovered(2);
    let t0 = Instant::now();
    let old = set.clone();
    set.discover("http://10.0.0.9:5000", 1).expect("url");
    let table = vec![UpstreamHealth::restored(1.0, 0, 1, t0); set.len()];
    let snap = HealthSnapshot::build(&set.priorities(), &table);
    let (r, _rx) = Routing::new(&set, &cfg, snap);
    assert_eq!(upstreams(&r.plan_race(&old, t0)), [0, 1, 2]);
    set.retire("http://10.0.0.9:5000", t0);
    assert_eq!(upstreams(&r.plan_race(&set, t0)), [0, 1, 2]);
}
