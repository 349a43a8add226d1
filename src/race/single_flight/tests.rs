use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use super::*;

fn block_on<F: Future>(fut: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
        .block_on(fut)
}

/// Spawns `n` callers of `sf.run(key, ..)`, each of whose `make` counts a
/// call, sleeps `work` and returns `value`. Returns every caller's result.
async fn callers<V: Clone + 'static>(
    sf: &SingleFlight<u32, V>,
    key: u32,
    n: usize,
    work: Duration,
    value: V,
    calls: &Rc<Cell<usize>>,
) -> Vec<(V, Role)> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (sf, calls, value) = (sf.clone(), Rc::clone(calls), value.clone());
            monoio::spawn(async move {
                sf.run(key, || async move {
                    calls.set(calls.get() + 1);
                    monoio::time::sleep(work).await;
                    value
                })
                .await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await);
    }
    out
}

fn count_led<V>(results: &[(V, Role)]) -> usize {
    results.iter().filter(|(_, r)| *r == Role::Led).count()
}

#[test]
fn hundred_concurrent_callers_share_one_execution() {
    block_on(async {
        let sf = SingleFlight::<u32, Rc<str>>::new();
        let calls = Rc::new(Cell::new(0));
        let results = callers(
            &sf,
            7,
            100,
            Duration::from_millis(20),
            Rc::from("narinfo"),
            &calls,
        )
        .await;
        assert_eq!(calls.get(), 1);
        assert_eq!(results.len(), 100);
        assert!(results.iter().all(|(v, _)| &**v == "narinfo"));
        assert_eq!(count_led(&results), 1);
        assert_eq!(sf.in_flight(), 0, "entry must leave with its flight");
    });
}

#[test]
fn failures_are_shared_too() {
    block_on(async {
        let sf = SingleFlight::<u32, Result<u8, &'static str>>::new();
        let calls = Rc::new(Cell::new(0));
        let results = callers(
            &sf,
            1,
            100,
            Duration::from_millis(20),
            Err("upstreams down"),
            &calls,
        )
        .await;
        assert_eq!(calls.get(), 1);
        assert!(results.iter().all(|(v, _)| *v == Err("upstreams down")));
        assert_eq!(count_led(&results), 1);
    });
}

#[test]
fn nothing_is_cached_after_a_flight_ends() {
    block_on(async {
        let sf = SingleFlight::<u32, u8>::new();
        let calls = Rc::new(Cell::new(0));
        callers(&sf, 1, 3, Duration::from_millis(1), 1, &calls).await;
        callers(&sf, 1, 3, Duration::from_millis(1), 2, &calls).await;
        assert_eq!(calls.get(), 2);
    });
}

#[test]
fn keys_are_independent() {
    block_on(async {
        let sf = SingleFlight::<u32, u32>::new();
        let calls = Rc::new(Cell::new(0));
        let a = callers(&sf, 1, 10, Duration::from_millis(30), 100, &calls);
        let b = callers(&sf, 2, 10, Duration::from_millis(30), 200, &calls);
        let (a, b) = futures_util::future::join(a, b).await;
        assert_eq!(calls.get(), 2);
        assert!(a.iter().all(|(v, _)| *v == 100) && b.iter().all(|(v, _)| *v == 200));
        assert_eq!((count_led(&a), count_led(&b)), (1, 1));
    });
}

#[test]
fn dropped_leader_hands_over_to_a_waiter() {
    block_on(async {
        let sf = SingleFlight::<u32, u32>::new();
        let leader_calls = Rc::new(Cell::new(0));
        let leader = {
            let (sf, calls) = (sf.clone(), Rc::clone(&leader_calls));
            // The leader's client goes away after 30 ms: its future is dropped.
            monoio::spawn(async move {
                let flight = sf.run(9, || async move {
                    calls.set(calls.get() + 1);
                    monoio::time::sleep(Duration::from_secs(3600)).await;
                    0
                });
                monoio::time::timeout(Duration::from_millis(30), flight).await
            })
        };
        monoio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(sf.in_flight(), 1);
        let waiter_calls = Rc::new(Cell::new(0));
        let waiters = callers(&sf, 9, 20, Duration::from_millis(10), 42, &waiter_calls);
        let results = monoio::time::timeout(Duration::from_secs(10), waiters)
            .await
            .expect("waiters hung after the leader was dropped");
        assert!(leader.await.is_err(), "leader should have been cut off");
        assert_eq!(leader_calls.get(), 1);
        assert_eq!(waiter_calls.get(), 1, "exactly one waiter takes over");
        assert!(results.iter().all(|(v, _)| *v == 42));
        assert_eq!(count_led(&results), 1);
        assert_eq!(sf.in_flight(), 0);
    });
}

#[test]
fn dropped_waiter_does_not_disturb_the_flight() {
    block_on(async {
        let sf = SingleFlight::<u32, u32>::new();
        let calls = Rc::new(Cell::new(0));
        let quitter = {
            let sf = sf.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::from_millis(2)).await;
                let wait = sf.run(3, || async { unreachable!("a joiner must not run make") });
                monoio::time::timeout(Duration::from_millis(5), wait).await
            })
        };
        let results = callers(&sf, 3, 5, Duration::from_millis(40), 5, &calls).await;
        assert!(quitter.await.is_err());
        assert_eq!(calls.get(), 1);
        assert!(results.iter().all(|(v, _)| *v == 5));
    });
}
