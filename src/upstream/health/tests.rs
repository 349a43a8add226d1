use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALPHA: f64 = 0.3;
const INTERVAL: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn up(latency_ms: u64) -> ProbeResult {
    ProbeResult::Up {
        latency: ms(latency_ms),
        cache_info: true,
    }
}

#[test]
fn first_sample_is_taken_as_is_then_smoothed() {
    assert_eq!(ema(None, 120.0, ALPHA), 120.0);
    let second = ema(Some(120.0), 20.0, ALPHA);
    assert!((second - (0.3 * 20.0 + 0.7 * 120.0)).abs() < 1e-9);
    let mut h = UpstreamHealth::new(Instant::now());
    h.record_latency(ms(100), ALPHA);
    assert_eq!(h.ema_ms, Some(100.0));
    h.record_latency(ms(200), ALPHA);
    assert!((h.ema_ms.unwrap() - 130.0).abs() < 1e-9);
    assert_eq!(h.total_queries, 2);
}

#[test]
fn property_ema_stays_between_previous_and_sample() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..10_000 {
        let prev: f64 = rng.gen_range(0.0..10_000.0);
        let sample: f64 = rng.gen_range(0.0..10_000.0);
        let alpha: f64 = rng.gen_range(0.001..0.999);
        let e = ema(Some(prev), sample, alpha);
        assert!(e >= prev.min(sample) - 1e-9 && e <= prev.max(sample) + 1e-9);
    }
}

#[test]
fn states_follow_consecutive_failures() {
    for n in 0..3 {
        assert_eq!(State::from_fails(n), State::Active);
    }
    for n in 3..10 {
        assert_eq!(State::from_fails(n), State::Degraded);
    }
    for n in [10, 11, 1000, u32::MAX] {
        assert_eq!(State::from_fails(n), State::Down);
    }
}

#[test]
fn backoff_schedule_is_one_four_ten_intervals() {
    let now = Instant::now();
    assert_eq!(next_probe(State::Active, INTERVAL, now), now + INTERVAL);
    assert_eq!(
        next_probe(State::Degraded, INTERVAL, now),
        now + INTERVAL * 4
    );
    assert_eq!(next_probe(State::Down, INTERVAL, now), now + INTERVAL * 10);
}

#[test]
fn dead_upstream_degrades_then_goes_down_then_recovers_on_one_success() {
    let mut now = Instant::now();
    let mut h = UpstreamHealth::new(now);
    let (mut seen, mut gaps) = (Vec::new(), Vec::new());
    let first = now;
    for _ in 0..10 {
        let (_, after) = h.record_probe(ProbeResult::Failed, ALPHA, INTERVAL, now);
        seen.push(after);
        gaps.push((h.next_probe - now) / INTERVAL.as_secs() as u32);
        now = h.next_probe;
    }
    assert_eq!(&seen[..2], &[State::Active; 2]);
    assert_eq!(&seen[2..9], &[State::Degraded; 7]);
    assert_eq!(seen[9], State::Down);
    let secs: Vec<u64> = gaps.iter().map(|g| g.as_secs()).collect();
    assert_eq!(secs, [1, 1, 4, 4, 4, 4, 4, 4, 4, 10]);
    // DOWN is reached at the tenth failed probe: 2 intervals at x1 and 7 at
    // x4 after the first one (15 minutes at the default 30 s).
    let down_at = now - INTERVAL * 10;
    assert_eq!(down_at - first, INTERVAL * 30);
    let (before, after) = h.record_probe(up(40), ALPHA, INTERVAL, now);
    assert_eq!((before, after), (State::Down, State::Active));
    assert_eq!(h.consecutive_fails, 0);
    assert_eq!(h.next_probe, now + INTERVAL);
}

#[test]
fn a_missing_cache_info_proves_the_host_alive() {
    let now = Instant::now();
    let mut h = UpstreamHealth::restored(15.0, 12, 40, now);
    assert_eq!(h.state(), State::Down);
    let missing = ProbeResult::Up {
        latency: ms(5),
        cache_info: false,
    };
    h.record_probe(missing, ALPHA, INTERVAL, now);
    assert_eq!(h.state(), State::Active);
    assert_eq!(h.cache_info, Some(false));
}

#[test]
fn restoring_treats_zero_as_unmeasured_and_probes_at_once() {
    let now = Instant::now();
    let h = UpstreamHealth::restored(0.0, 0, 0, now);
    assert_eq!(h.ema_ms, None);
    assert_eq!(h.next_probe, now);
    let h = UpstreamHealth::restored(12.5, 4, 9, now);
    assert_eq!((h.ema_ms, h.state()), (Some(12.5), State::Degraded));
}

#[test]
fn property_state_and_schedule_follow_the_probe_history() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..500 {
        let mut now = Instant::now();
        let mut h = UpstreamHealth::new(now);
        let mut fails_since_success = 0u32;
        for _ in 0..60 {
            let result = if rng.gen_bool(0.7) {
                fails_since_success += 1;
                ProbeResult::Failed
            } else {
                fails_since_success = 0;
                up(rng.gen_range(1..500))
            };
            h.record_probe(result, ALPHA, INTERVAL, now);
            let state = State::from_fails(fails_since_success);
            assert_eq!(h.state(), state);
            assert_eq!(h.next_probe, now + INTERVAL * state.backoff_factor());
            now += Duration::from_millis(rng.gen_range(0..100_000));
        }
    }
}

fn rank(priority: i32, state: State, ema_ms: Option<f64>) -> Rank {
    Rank {
        priority,
        state,
        ema_ms,
    }
}

#[test]
fn tiers_come_before_latency() {
    let ranks = [
        rank(20, State::Active, Some(1.0)),
        rank(10, State::Active, Some(500.0)),
        rank(10, State::Active, Some(50.0)),
    ];
    assert_eq!(routing_order(&ranks), vec![2, 1, 0]);
}

#[test]
fn near_ties_go_to_the_upstream_configured_first() {
    // 105 is within 10% of 100: configured order decides.
    let ranks = [
        rank(10, State::Active, Some(105.0)),
        rank(10, State::Active, Some(100.0)),
    ];
    assert_eq!(routing_order(&ranks), vec![0, 1]);
    // 111 is not: the faster one wins.
    let ranks = [
        rank(10, State::Active, Some(111.0)),
        rank(10, State::Active, Some(100.0)),
    ];
    assert_eq!(routing_order(&ranks), vec![1, 0]);
}

#[test]
fn tie_windows_do_not_chain() {
    // Neighbours are all within 10% of each other, yet 100 and 118 are not:
    // classes anchor on their leader, so [100, 105] and [111, 118].
    let ranks = [
        rank(1, State::Active, Some(118.0)),
        rank(1, State::Active, Some(111.0)),
        rank(1, State::Active, Some(105.0)),
        rank(1, State::Active, Some(100.0)),
    ];
    assert_eq!(routing_order(&ranks), vec![2, 3, 0, 1]);
}

#[test]
fn degraded_after_active_unmeasured_last_down_at_the_end() {
    let ranks = [
        rank(10, State::Down, Some(1.0)),
        rank(10, State::Active, None),
        rank(10, State::Degraded, Some(2.0)),
        rank(10, State::Active, Some(900.0)),
        rank(5, State::Down, Some(3.0)),
    ];
    assert_eq!(routing_order(&ranks), vec![3, 1, 2, 4, 0]);
}

fn random_ranks(rng: &mut StdRng) -> Vec<Rank> {
    let n = rng.gen_range(0..40);
    (0..n)
        .map(|_| {
            let state = match rng.gen_range(0..6) {
                0 => State::Down,
                1 => State::Degraded,
                _ => State::Active,
            };
            // Few distinct values, so ties and near-ties are common.
            let ema = match rng.gen_range(0..8) {
                0 => None,
                1 => Some(100.0),
                _ => Some(f64::from(rng.gen_range(90u32..140))),
            };
            rank(rng.gen_range(1..4), state, ema)
        })
        .collect()
}

#[test]
fn property_routing_order_keeps_every_documented_rule() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..3000 {
        let ranks = random_ranks(&mut rng);
        let order = routing_order(&ranks);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..ranks.len()).collect::<Vec<_>>(),
            "a permutation"
        );
        let pos = |i: usize| order.iter().position(|&x| x == i).unwrap();
        for a in 0..ranks.len() {
            for b in 0..ranks.len() {
                if a == b || pos(a) > pos(b) {
                    continue;
                }
                // `a` comes before `b`.
                let (ra, rb) = (ranks[a], ranks[b]);
                let down = |r: Rank| r.state == State::Down;
                assert!(down(ra) <= down(rb), "DOWN last: {ra:?} {rb:?}");
                if down(ra) != down(rb) {
                    continue;
                }
                assert!(ra.priority <= rb.priority, "tiers: {ra:?} {rb:?}");
                if ra.priority != rb.priority {
                    continue;
                }
                assert!(ra.state <= rb.state, "ACTIVE first: {ra:?} {rb:?}");
                if ra.state != rb.state {
                    continue;
                }
                match (ra.ema_ms, rb.ema_ms) {
                    (None, Some(_)) => panic!("unmeasured before measured: {ra:?} {rb:?}"),
                    (Some(x), Some(y)) => {
                        assert!(x < y * TIE_RATIO, "10% rule: {x} before {y}");
                        if x > y {
                            assert!(a < b, "a slower near-tie goes first only by config order");
                        }
                    }
                    (None, None) => assert!(a < b, "unmeasured in config order"),
                    (Some(_), None) => {}
                }
            }
        }
    }
}

#[test]
fn property_routing_order_depends_only_on_the_ranks() {
    // The same ranks always give the same order, whatever was computed
    // before (no hidden state), and equal ranks keep configured order.
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..500 {
        let ranks = random_ranks(&mut rng);
        assert_eq!(routing_order(&ranks), routing_order(&ranks));
        let same = vec![rank(1, State::Active, Some(10.0)); ranks.len()];
        assert_eq!(routing_order(&same), (0..ranks.len()).collect::<Vec<_>>());
    }
}

#[test]
fn hedge_follows_the_tier_latency_within_floor_and_cap() {
    let cap = Duration::from_secs(2);
    assert_eq!(hedge_delay([], cap), cap);
    assert_eq!(hedge_delay([rank(1, State::Active, None)], cap), cap);
    let tier = [
        rank(1, State::Active, Some(40.0)),
        rank(1, State::Active, Some(100.0)),
        // A failing member's EMA is stale; it does not stretch the delay.
        rank(1, State::Degraded, Some(400.0)),
    ];
    assert_eq!(hedge_delay(tier, cap), ms(300));
    assert_eq!(
        hedge_delay([rank(1, State::Active, Some(1.0))], cap),
        HEDGE_FLOOR
    );
    assert_eq!(
        hedge_delay([rank(1, State::Active, Some(5000.0))], cap),
        cap
    );
    assert_eq!(hedge_delay([rank(1, State::Degraded, Some(5.0))], cap), cap);
}

#[test]
fn property_hedge_is_bounded_and_monotone() {
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..5000 {
        let cap = ms(rng.gen_range(60..5000));
        let a: f64 = rng.gen_range(0.0..3000.0);
        let b: f64 = a + rng.gen_range(0.0..3000.0);
        let da = hedge_delay([rank(1, State::Active, Some(a))], cap);
        let db = hedge_delay([rank(1, State::Active, Some(b))], cap);
        assert!(da >= HEDGE_FLOOR && da <= cap);
        assert!(da <= db, "slower tier, later hedge");
    }
}

#[test]
fn snapshot_routes_live_upstreams_or_everything_when_all_are_down() {
    let now = Instant::now();
    let live = UpstreamHealth::restored(20.0, 0, 1, now);
    let down = UpstreamHealth::restored(5.0, 10, 1, now);
    let snap = HealthSnapshot::build(&[1, 1, 2], &[down.clone(), live.clone(), live]);
    assert_eq!(snap.routable(), &[1, 2]);
    assert!(snap.any_down() && snap.is_down(0) && !snap.is_down(1));
    assert_eq!(&*snap.order, &[1, 2, 0]);
    let snap = HealthSnapshot::build(&[2, 1], &[down.clone(), down]);
    assert_eq!(snap.routable(), &[1, 0]);
    assert_eq!(snap.live, 0);
}

#[test]
fn absent_slots_are_never_routed_and_read_as_down() {
    let now = Instant::now();
    let live = UpstreamHealth::restored(20.0, 0, 1, now);
    let fast = UpstreamHealth::restored(1.0, 0, 1, now);
    let down = UpstreamHealth::restored(5.0, 10, 1, now);
    let table = [live.clone(), fast.clone(), down.clone()];
    let snap = HealthSnapshot::build_present(&[1, 1, 1], &table, |i| i != 1);
    assert_eq!(snap.routable(), &[0], "the retired fast one is left out");
    assert_eq!(&*snap.order, &[0, 2]);
    assert!(snap.is_down(1) && snap.any_down());
    let snap = HealthSnapshot::build_present(&[1, 1], &[down, fast], |i| i == 0);
    assert_eq!(snap.live, 0);
    assert_eq!(snap.routable(), &[0], "all DOWN: still only present ones");
}
