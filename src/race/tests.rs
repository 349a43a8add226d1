//! Race engine tests with scripted fetchers: each upstream sleeps for a
//! given time and then returns a given [`Attempt`]. Timings use real monoio
//! timers, so assertions leave wide margins for a loaded 2-core machine.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use monoio::time::Instant;

use super::*;

const HANG: Duration = Duration::from_secs(3600);

fn block_on<F: Future>(fut: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
        .block_on(fut)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn good(tag: &'static str) -> Attempt {
    Attempt::Found(Bytes::from_static(tag.as_bytes()))
}

fn body(kind: &'static str) -> Attempt {
    Attempt::Found(Bytes::from_static(kind.as_bytes()))
}

/// Bodies named after a rejection are rejected; anything else is accepted.
fn judge(_upstream: usize, body: &Bytes) -> Verdict<Bytes> {
    match &body[..] {
        b"badsig" => Verdict::Reject(RejectKind::BadSignature),
        b"malformed" => Verdict::Reject(RejectKind::Malformed),
        b"filtered" => Verdict::Reject(RejectKind::Filtered),
        b"wrongpath" => Verdict::Reject(RejectKind::WrongStorePath),
        _ => Verdict::Accept(body.clone()),
    }
}

/// Counts attempt futures dropped before they produced their answer.
struct DropGuard {
    finished: bool,
    unfinished_drops: Rc<Cell<usize>>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.unfinished_drops.set(self.unfinished_drops.get() + 1);
        }
    }
}

/// Upstream `i` answers `plan[i].1` after `plan[i].0`.
struct Fake {
    plan: Vec<(Duration, Attempt)>,
    unfinished_drops: Rc<Cell<usize>>,
    /// Upstreams in the order their fetch started, with the start time.
    started: RefCell<Vec<(usize, Instant)>>,
}

impl Fake {
    fn new(plan: Vec<(Duration, Attempt)>) -> Self {
        Fake {
            plan,
            unfinished_drops: Rc::default(),
            started: RefCell::default(),
        }
    }

    fn fetch(&self, i: usize) -> impl Future<Output = Attempt> + 'static {
        let (delay, attempt) = self.plan[i].clone();
        let guard = DropGuard {
            finished: false,
            unfinished_drops: Rc::clone(&self.unfinished_drops),
        };
        self.started.borrow_mut().push((i, Instant::now()));
        async move {
            // Rebinding moves the whole guard in; naming only a field would
            // capture just that field and drop the guard right here.
            let mut guard = guard;
            monoio::time::sleep(delay).await;
            guard.finished = true;
            attempt
        }
    }

    fn started_order(&self) -> Vec<usize> {
        self.started.borrow().iter().map(|(i, _)| *i).collect()
    }
}

struct Run {
    outcome: Outcome<Bytes>,
    /// (upstream, label) per report call, in call order.
    reports: Vec<(usize, &'static str)>,
    elapsed: Duration,
    /// Attempts dropped unfinished, read the instant `race` returned.
    dropped_at_return: usize,
}

fn candidates(priorities: &[i32]) -> Vec<Candidate> {
    priorities
        .iter()
        .enumerate()
        .map(|(upstream, &priority)| Candidate { upstream, priority })
        .collect()
}

fn cfg(deadline: Duration, hedge: Option<Duration>) -> RaceConfig {
    RaceConfig {
        tier_deadline: deadline,
        hedge_after: hedge.map(Hedges::uniform),
        early: crate::race::EarlyStarts::NONE,
    }
}

async fn run_race(fake: &Fake, priorities: &[i32], cfg: &RaceConfig) -> Run {
    let mut reports = Vec::new();
    let start = Instant::now();
    let outcome = race(
        &candidates(priorities),
        cfg,
        |i| fake.fetch(i),
        judge,
        |i, r: &AttemptReport| reports.push((i, r.result.label())),
    )
    .await;
    Run {
        outcome,
        reports,
        elapsed: start.elapsed(),
        dropped_at_return: fake.unfinished_drops.get(),
    }
}

fn race_once(plan: Vec<(Duration, Attempt)>, priorities: &[i32], cfg: RaceConfig) -> (Run, Fake) {
    let fake = Fake::new(plan);
    let run = block_on(run_race(&fake, priorities, &cfg));
    (run, fake)
}

fn winner(outcome: &Outcome<Bytes>) -> usize {
    match outcome {
        Outcome::Found { upstream, .. } => *upstream,
        other => panic!("expected a winner, got {other:?}"),
    }
}

fn sorted(mut reports: Vec<(usize, &'static str)>) -> Vec<(usize, &'static str)> {
    reports.sort();
    reports
}

#[test]
fn fastest_good_answer_wins() {
    let plan = vec![
        (ms(300), good("a")),
        (ms(10), good("b")),
        (ms(150), good("c")),
    ];
    let (run, _) = race_once(plan, &[0, 0, 0], cfg(ms(5000), None));
    assert_eq!(winner(&run.outcome), 1);
    let Outcome::Found {
        accepted, latency, ..
    } = &run.outcome
    else {
        unreachable!()
    };
    assert_eq!(&accepted[..], b"b");
    assert!(
        *latency >= ms(10) && *latency < ms(150),
        "latency {latency:?}"
    );
    assert_eq!(run.reports, vec![(1, "accepted")]);
}

#[test]
fn fast_bad_signature_falls_through_to_slower_good_answer() {
    let plan = vec![(ms(5), body("badsig")), (ms(60), good("ok"))];
    let (run, _) = race_once(plan, &[0, 0], cfg(ms(5000), None));
    assert_eq!(winner(&run.outcome), 1);
    assert_eq!(run.reports, vec![(0, "bad_signature"), (1, "accepted")]);
}

#[test]
fn all_not_found_falls_through_to_next_tier_without_waiting_for_the_deadline() {
    let plan = vec![
        (ms(5), Attempt::NotFound),
        (ms(10), Attempt::NotFound),
        (ms(5), good("t2")),
    ];
    let (run, fake) = race_once(plan, &[1, 1, 2], cfg(ms(5000), None));
    assert_eq!(winner(&run.outcome), 2);
    assert!(
        run.elapsed < ms(2000),
        "waited for the deadline: {:?}",
        run.elapsed
    );
    assert_eq!(fake.started_order(), vec![0, 1, 2]);
    assert_eq!(
        run.reports,
        vec![(0, "not_found"), (1, "not_found"), (2, "accepted")]
    );
}

#[test]
fn definite_misses_everywhere_give_miss() {
    let plan = vec![
        (ms(5), Attempt::NotFound),
        (ms(5), body("filtered")),
        (ms(5), body("wrongpath")),
        (ms(5), Attempt::from_unexpected_status(410)),
    ];
    let (run, _) = race_once(plan, &[0, 0, 1, 1], cfg(ms(5000), None));
    assert_eq!(run.outcome, Outcome::Miss);
    assert_eq!(run.reports.len(), 4);
}

#[test]
fn deadline_abandons_a_hanging_tier_and_falls_through() {
    let plan = vec![(HANG, good("never")), (ms(5), good("t2"))];
    let (run, fake) = race_once(plan, &[0, 1], cfg(ms(100), None));
    assert_eq!(winner(&run.outcome), 1);
    assert!(
        run.elapsed >= ms(100),
        "tier 2 started early: {:?}",
        run.elapsed
    );
    assert_eq!(run.reports, vec![(0, "timeout"), (1, "accepted")]);
    // The hung attempt was dropped at the deadline, not left running.
    assert_eq!(run.dropped_at_return, 1);
    let started = fake.started.borrow();
    assert!(started[1].1 - started[0].1 >= ms(100));
}

#[test]
fn everything_hanging_is_unavailable_timed_out() {
    let plan = vec![(HANG, good("x")), (HANG, good("y")), (HANG, good("z"))];
    let (run, _) = race_once(plan, &[0, 0, 1], cfg(ms(60), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: true });
    assert!(
        run.elapsed >= ms(120) && run.elapsed < ms(3000),
        "{:?}",
        run.elapsed
    );
    assert_eq!(
        sorted(run.reports),
        vec![(0, "timeout"), (1, "timeout"), (2, "timeout")]
    );
    assert_eq!(run.dropped_at_return, 3);
}

#[test]
fn server_error_plus_not_found_is_unavailable_not_miss() {
    let plan = vec![
        (ms(5), Attempt::from_unexpected_status(503)),
        (ms(5), Attempt::NotFound),
    ];
    let (run, _) = race_once(plan, &[0, 0], cfg(ms(5000), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: false });
    assert_eq!(
        sorted(run.reports),
        vec![(0, "status_5xx"), (1, "not_found")]
    );
}

#[test]
fn regression_unreachable_tier1_plus_404_in_tier2_is_not_a_miss() {
    // ncro 2.2 answered (and negative-cached) 404 here.
    let plan = vec![(HANG, good("unreachable")), (ms(5), Attempt::NotFound)];
    let (run, _) = race_once(plan, &[1, 2], cfg(ms(60), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: true });

    let plan = vec![
        (ms(5), Attempt::Failed(FailKind::Connect)),
        (ms(5), Attempt::NotFound),
    ];
    let (run, _) = race_once(plan, &[1, 2], cfg(ms(5000), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: false });
}

#[test]
fn only_rejected_bodies_that_prove_nothing_are_unavailable() {
    let plan = vec![
        (ms(5), body("badsig")),
        (ms(5), body("malformed")),
        (ms(5), Attempt::NotFound),
    ];
    let (run, _) = race_once(plan, &[0, 0, 0], cfg(ms(5000), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: false });

    // A timeout mixed with another failure is a plain 502, not a 504.
    let plan = vec![(HANG, good("x")), (ms(5), body("badsig"))];
    let (run, _) = race_once(plan, &[0, 0], cfg(ms(60), None));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: false });
}

#[test]
fn losers_are_dropped_the_moment_the_winner_wins() {
    let plan = vec![
        (ms(10), good("w")),
        (ms(10_000), good("slow")),
        (HANG, good("hung")),
        (ms(5), good("t2")),
    ];
    let (run, fake) = race_once(plan, &[0, 0, 0, 1], cfg(ms(60_000), None));
    assert_eq!(winner(&run.outcome), 0);
    assert_eq!(
        run.dropped_at_return, 2,
        "losers still alive after race returned"
    );
    assert!(
        run.elapsed < ms(5000),
        "waited for a loser: {:?}",
        run.elapsed
    );
    assert_eq!(fake.started_order(), vec![0, 1, 2], "tier 2 must not start");
    assert_eq!(run.reports, vec![(0, "accepted")]);
}

#[test]
fn hedge_starts_next_tier_early_and_it_wins_when_tier1_hangs() {
    let plan = vec![(HANG, good("hung")), (ms(5), good("t2"))];
    let (run, fake) = race_once(plan, &[0, 1], cfg(ms(10_000), Some(ms(40))));
    assert_eq!(winner(&run.outcome), 1);
    assert!(
        run.elapsed >= ms(40) && run.elapsed < ms(5000),
        "{:?}",
        run.elapsed
    );
    let started = fake.started.borrow();
    assert!(started[1].1 - started[0].1 >= ms(40), "hedged too early");
    assert_eq!(run.dropped_at_return, 1);
    // Tier 1 was cancelled, not timed out: nothing to report for it.
    assert_eq!(run.reports, vec![(1, "accepted")]);
}

#[test]
fn hedged_tier_keeps_the_first_tier_running() {
    // Tier 2 misses quickly after the hedge; tier 1's slower answer still wins.
    let plan = vec![(ms(150), good("t1")), (ms(5), Attempt::NotFound)];
    let (run, fake) = race_once(plan, &[0, 1], cfg(ms(10_000), Some(ms(20))));
    assert_eq!(winner(&run.outcome), 0);
    assert_eq!(fake.started_order(), vec![0, 1]);
    assert_eq!(run.reports, vec![(1, "not_found"), (0, "accepted")]);
}

#[test]
fn hedges_chain_through_hanging_tiers() {
    let plan = vec![(HANG, good("t1")), (HANG, good("t2")), (ms(5), good("t3"))];
    let (run, fake) = race_once(plan, &[0, 1, 2], cfg(ms(10_000), Some(ms(30))));
    assert_eq!(winner(&run.outcome), 2);
    assert!(
        run.elapsed >= ms(60) && run.elapsed < ms(5000),
        "{:?}",
        run.elapsed
    );
    assert_eq!(fake.started_order(), vec![0, 1, 2]);
    assert_eq!(run.dropped_at_return, 2);
}

#[test]
fn without_hedge_the_next_tier_waits() {
    let plan = vec![(ms(80), good("t1")), (ms(1), good("t2"))];
    let (run, fake) = race_once(plan, &[0, 1], cfg(ms(10_000), None));
    assert_eq!(winner(&run.outcome), 0);
    assert_eq!(fake.started_order(), vec![0]);
}

#[test]
fn report_covers_every_finished_attempt_with_its_latency() {
    let plan = vec![
        (ms(5), Attempt::NotFound),
        (ms(20), Attempt::Failed(FailKind::Reset)),
        (ms(40), body("filtered")),
        (ms(5), good("t2")),
    ];
    let fake = Fake::new(plan);
    let mut seen = Vec::new();
    let outcome = block_on(race(
        &candidates(&[0, 0, 0, 1]),
        &cfg(ms(5000), None),
        |i| fake.fetch(i),
        judge,
        |i, r: &AttemptReport| seen.push((i, r.result, r.latency)),
    ));
    assert_eq!(winner(&outcome), 3);
    let results: Vec<_> = seen.iter().map(|(i, r, _)| (*i, *r)).collect();
    assert_eq!(
        results,
        vec![
            (0, AttemptResult::NotFound),
            (1, AttemptResult::Failed(FailKind::Reset)),
            (2, AttemptResult::Rejected(RejectKind::Filtered)),
            (3, AttemptResult::Accepted),
        ]
    );
    let latency = |i: usize| seen[i].2;
    assert!(latency(0) >= ms(5) && latency(1) >= ms(20) && latency(2) >= ms(40));
    // Tier 2 latency counts from tier 2's own start.
    assert!(
        latency(3) >= ms(5) && latency(3) < latency(2) + ms(5),
        "{seen:?}"
    );
}

#[test]
fn no_candidates_is_unavailable_without_fetching() {
    let fake = Fake::new(Vec::new());
    let run = block_on(run_race(&fake, &[], &cfg(ms(100), None)));
    assert_eq!(run.outcome, Outcome::Unavailable { timed_out: false });
    assert!(fake.started_order().is_empty() && run.reports.is_empty());
}

#[test]
fn unsorted_candidates_are_tiered_by_priority_keeping_caller_order() {
    let plan = vec![(ms(5), Attempt::NotFound); 4];
    let (run, fake) = race_once(plan, &[5, -1, 5, 2], cfg(ms(5000), None));
    assert_eq!(run.outcome, Outcome::Miss);
    assert_eq!(fake.started_order(), vec![1, 3, 0, 2]);
}

#[test]
fn status_classification_and_labels() {
    for s in [403, 404, 410] {
        assert_eq!(Attempt::from_unexpected_status(s), Attempt::NotFound);
    }
    assert_eq!(
        Attempt::from_unexpected_status(502),
        Attempt::Failed(FailKind::Status5xx(502))
    );
    for s in [401, 429, 206, 301] {
        assert_eq!(
            Attempt::from_unexpected_status(s),
            Attempt::Failed(FailKind::OtherStatus(s))
        );
    }
    assert_eq!(FailKind::Status5xx(500).label(), "status_5xx");
    assert_eq!(
        AttemptResult::Rejected(RejectKind::BadSignature).label(),
        "bad_signature"
    );
    assert!(RejectKind::Filtered.is_definite_miss() && !RejectKind::Malformed.is_definite_miss());
}

/// Not a timed assertion: prints the cost of one race over three fetchers
/// that are ready on first poll. Run with
/// `cargo test --release --lib race::tests::overhead -- --ignored --nocapture`.
#[test]
#[ignore]
fn overhead_of_three_instant_fetchers() {
    const RACES: u32 = 200_000;
    let body = Bytes::from_static(b"StorePath: /nix/store/x\n");
    let cands = candidates(&[0, 0, 0]);
    let config = cfg(ms(5000), None);
    let elapsed = block_on(async {
        let start = std::time::Instant::now();
        for _ in 0..RACES {
            let outcome = race(
                &cands,
                &config,
                |_| std::future::ready(Attempt::Found(body.clone())),
                |i, _: &Bytes| Verdict::Accept(i),
                |_, _: &AttemptReport| {},
            )
            .await;
            assert!(matches!(outcome, Outcome::Found { .. }));
        }
        start.elapsed()
    });
    println!(
        "race(): {} ns per race (3 instant fetchers)",
        elapsed.as_nanos() / u128::from(RACES)
    );
}

fn early(cfg: RaceConfig, after: &[(i32, Duration)]) -> RaceConfig {
    let mut early = EarlyStarts::NONE;
    for &(p, d) in after {
        assert!(early.push(p, d));
    }
    RaceConfig { early, ..cfg }
}

#[test]
fn an_early_start_at_zero_asks_the_next_tier_at_once_and_only_that_one() {
    // Tier 10 misses after 200 ms; tier 20 has the path; tier 30 too.
    let plan = vec![
        (ms(200), Attempt::NotFound),
        (ms(5), good("t2")),
        (ms(5), good("t3")),
    ];
    let c = early(cfg(ms(5000), None), &[(10, Duration::ZERO)]);
    let (run, fake) = race_once(plan, &[10, 20, 30], c);
    assert_eq!(winner(&run.outcome), 1);
    assert!(
        run.elapsed < ms(150),
        "waited for tier 10: {:?}",
        run.elapsed
    );
    // Tier 30 follows tier 20's own rule (none armed): never asked.
    assert_eq!(fake.started_order(), vec![0, 1]);
}

#[test]
fn an_early_start_for_another_tier_changes_nothing() {
    let plan = vec![(ms(60), Attempt::NotFound), (ms(5), good("t2"))];
    let c = early(cfg(ms(5000), None), &[(20, Duration::ZERO)]);
    let (run, fake) = race_once(plan, &[10, 20], c);
    assert_eq!(winner(&run.outcome), 1);
    assert!(run.elapsed >= ms(60), "tier 20 asked before tier 10 ended");
    let started = fake.started.borrow();
    assert!(started[1].1 >= started[0].1 + ms(60));
}

#[test]
fn the_earlier_of_hedge_and_early_start_applies() {
    let plan = vec![(HANG, Attempt::NotFound), (ms(5), good("t2"))];
    let c = early(cfg(ms(5000), Some(ms(2000))), &[(10, ms(100))]);
    let (run, _) = race_once(plan, &[10, 20], c);
    assert_eq!(winner(&run.outcome), 1);
    assert!(
        run.elapsed >= ms(100) && run.elapsed < ms(1500),
        "{:?}",
        run.elapsed
    );
}

#[test]
fn early_starts_hold_at_most_max_tiers() {
    let mut e = EarlyStarts::NONE;
    for p in 0..EarlyStarts::MAX as i32 {
        assert!(e.push(p, ms(p as u64)));
    }
    assert!(!e.push(99, ms(1)));
    assert_eq!(e.after(2), Some(ms(2)));
    assert_eq!(e.after(99), None);
}

/// `cfg` with its own hedge delay for each listed tier.
fn hedges(cfg: RaceConfig, per_tier: &[(i32, Duration)]) -> RaceConfig {
    let mut h = cfg.hedge_after.expect("a hedged config");
    for &(p, d) in per_tier {
        assert!(h.push(p, d));
    }
    RaceConfig {
        hedge_after: Some(h),
        ..cfg
    }
}

#[test]
fn each_tier_is_hedged_on_its_own_delay() {
    // Tier 10 hangs and is late after 30 ms; tier 20 answers after 150 ms
    // and is late only after 3 s, so tier 30 (which would answer at once)
    // is never asked. One delay for every tier (30 ms) would ask it.
    let plan = vec![
        (HANG, good("t1")),
        (ms(150), good("t2")),
        (ms(1), good("t3")),
    ];
    let c = hedges(
        cfg(ms(10_000), Some(ms(30))),
        &[(10, ms(30)), (20, ms(3000))],
    );
    let (run, fake) = race_once(plan, &[10, 20, 30], c);
    assert_eq!(winner(&run.outcome), 1);
    assert_eq!(fake.started_order(), vec![0, 1], "tier 30 asked");
    let started = fake.started.borrow();
    assert!(started[1].1 - started[0].1 >= ms(30), "hedged too early");
    assert!(run.elapsed < ms(2500), "{:?}", run.elapsed);
}

#[test]
fn a_tier_started_by_a_hedge_is_hedged_on_its_own_delay() {
    // Tiers 10 and 20 hang: tier 20 joins after tier 10's 20 ms, tier 30
    // after tier 20's own 250 ms, counted from tier 20's start.
    let plan = vec![(HANG, good("t1")), (HANG, good("t2")), (ms(1), good("t3"))];
    let c = hedges(
        cfg(ms(10_000), Some(ms(5000))),
        &[(10, ms(20)), (20, ms(250))],
    );
    let (run, fake) = race_once(plan, &[10, 20, 30], c);
    assert_eq!(winner(&run.outcome), 2);
    assert_eq!(fake.started_order(), vec![0, 1, 2]);
    let started = fake.started.borrow();
    assert!(started[1].1 - started[0].1 >= ms(20));
    assert!(
        started[2].1 - started[1].1 >= ms(250),
        "tier 30 joined on tier 10's delay"
    );
    // Not tier 40's default (5 s): tier 20's own delay applied.
    assert!(run.elapsed < ms(4000), "{:?}", run.elapsed);
}

#[test]
fn a_tier_started_early_is_hedged_on_its_own_delay() {
    // Tier 10 is armed (early start at zero) and misses after 300 ms; its
    // own hedge delay (20 ms) does not time tier 20, which answers after
    // 100 ms and is late only after 3 s: tier 30 is never asked.
    let plan = vec![
        (ms(300), Attempt::NotFound),
        (ms(100), good("t2")),
        (ms(1), good("t3")),
    ];
    let c = hedges(
        cfg(ms(10_000), Some(ms(20))),
        &[(10, ms(20)), (20, ms(3000))],
    );
    let c = early(c, &[(10, Duration::ZERO)]);
    let (run, fake) = race_once(plan, &[10, 20, 30], c);
    assert_eq!(winner(&run.outcome), 1);
    assert_eq!(fake.started_order(), vec![0, 1], "tier 30 asked");
    assert!(run.elapsed < ms(2500), "{:?}", run.elapsed);

    // The same race with tier 20 hanging: tier 30 joins on tier 20's delay.
    let plan = vec![
        (ms(300), Attempt::NotFound),
        (HANG, good("t2")),
        (ms(1), good("t3")),
    ];
    let c = hedges(
        cfg(ms(10_000), Some(ms(20))),
        &[(10, ms(20)), (20, ms(200))],
    );
    let (run, fake) = race_once(plan, &[10, 20, 30], early(c, &[(10, Duration::ZERO)]));
    assert_eq!(winner(&run.outcome), 2);
    let started = fake.started.borrow();
    assert!(started[2].1 - started[1].1 >= ms(200), "hedged too early");
}

#[test]
fn unlisted_tiers_get_the_default_and_at_most_max_are_listed() {
    let mut h = Hedges::uniform(ms(2000));
    assert_eq!(h.after(7), ms(2000));
    for p in 0..Hedges::MAX as i32 {
        assert!(h.push(p, ms(p as u64 + 1)));
    }
    assert!(!h.push(99, ms(1)));
    assert_eq!(h.after(3), ms(4));
    assert_eq!(h.after(99), ms(2000));
}
