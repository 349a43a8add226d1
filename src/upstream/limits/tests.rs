use super::*;
use std::future::Future;
use std::sync::Arc;

fn block_on<F: Future>(fut: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(fut)
}

#[test]
fn gate_grants_up_to_its_size() {
    let gate = Gate::new(2);
    assert!(gate.try_take() && gate.try_take());
    assert!(!gate.try_take());
    assert_eq!(gate.in_use(), 2);
    gate.give_back();
    assert!(gate.try_take());
    // Zero is not a usable size; config validation forbids it anyway.
    assert!(Gate::new(0).try_take());
}

#[test]
fn cooldown_lasts_its_period() {
    let epoch = Instant::now();
    let c = Cooldowns::new(2, Duration::from_secs(15), epoch);
    let t = epoch + Duration::from_secs(100);
    assert!(!c.is_cooling(0, t));
    c.start(0, t);
    assert!(c.is_cooling(0, t));
    assert!(c.is_cooling(0, t + Duration::from_millis(14_999)));
    assert!(!c.is_cooling(0, t + Duration::from_secs(15)));
    assert!(!c.is_cooling(1, t), "per upstream");
    c.start(7, t); // out of range: ignored
    assert!(!c.is_cooling(7, t));
}

#[test]
fn only_transport_failures_cool_an_upstream_down() {
    for k in [
        FailKind::Dns,
        FailKind::Connect,
        FailKind::Tls,
        FailKind::Timeout,
        FailKind::Reset,
        FailKind::Protocol,
    ] {
        assert!(is_transport(k), "{k:?}");
    }
    for k in [
        FailKind::Status5xx(503),
        FailKind::OtherStatus(429),
        FailKind::TooLarge,
        FailKind::Request,
    ] {
        assert!(!is_transport(k), "{k:?}");
    }
}

fn limits(races: u32) -> Limits {
    let mut cfg = crate::config::Config::from_toml(
        "",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("default config")
    .cache;
    cfg.max_concurrent_races = races;
    cfg.per_upstream_max_inflight = 1;
    Limits::new(1, &cfg, Instant::now())
}

#[test]
fn full_queue_is_refused_at_once() {
    let shared = limits(1);
    let local = LocalLimits::new(1, 1, Duration::from_secs(5));
    block_on(async {
        let held = local.race(&shared).await.expect("free permit");
        // One waiter fits the queue...
        let mut first = std::pin::pin!(local.race(&shared));
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        assert_eq!(local.race_waiters(), 1);
        // ...a second does not.
        assert_eq!(local.race(&shared).await.err(), Some(LimitError::QueueFull));
        // A local release hands the permit to the queued waiter promptly.
        let started = monoio::time::Instant::now();
        drop(held);
        let got = first.await.expect("permit after release");
        assert!(
            started.elapsed() < RETRY,
            "woken by the release, not the poll"
        );
        drop(got);
        assert_eq!(shared.races.in_use(), 0);
        assert_eq!(local.race_waiters(), 0);
    });
}

#[test]
fn waiting_ends_with_a_timeout() {
    let shared = limits(1);
    let local = LocalLimits::new(1, 4, Duration::from_millis(30));
    block_on(async {
        let _held = local.race(&shared).await.expect("free permit");
        let started = monoio::time::Instant::now();
        assert_eq!(local.race(&shared).await.err(), Some(LimitError::Timeout));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(
            local.race_waiters(),
            0,
            "a timed-out waiter leaves the queue"
        );
    });
}

#[test]
fn a_permit_given_back_on_another_thread_is_picked_up_by_polling() {
    let shared = Arc::new(limits(1));
    assert!(shared.races.try_take());
    let other = shared.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        other.races.give_back();
    });
    let local = LocalLimits::new(1, 4, Duration::from_secs(5));
    block_on(async {
        let started = monoio::time::Instant::now();
        let permit = local.race(&shared).await.expect("permit");
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(permit);
    });
    releaser.join().expect("releaser");
    assert_eq!(shared.races.in_use(), 0);
}

#[test]
fn a_dropped_waiter_does_not_swallow_the_wakeup() {
    let shared = limits(1);
    let local = LocalLimits::new(1, 4, Duration::from_secs(5));
    block_on(async {
        let held = local.race(&shared).await.expect("free permit");
        {
            let mut gone = std::pin::pin!(local.race(&shared));
            assert!(futures_util::poll!(gone.as_mut()).is_pending());
        }
        let mut second = std::pin::pin!(local.race(&shared));
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        assert_eq!(local.race_waiters(), 1);
        let started = monoio::time::Instant::now();
        drop(held);
        let _p = second.await.expect("permit");
        assert!(started.elapsed() < RETRY);
    });
}

#[test]
fn upstream_permits_are_per_upstream() {
    let shared = limits(8);
    let local = LocalLimits::new(1, 4, Duration::from_secs(5));
    block_on(async {
        let p = local.upstream(&shared, 0).await.expect("permit");
        let mut next = std::pin::pin!(local.upstream(&shared, 0));
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        drop(p);
        assert!(next.await.is_some());
        assert!(local.upstream(&shared, 5).await.is_none(), "unknown index");
    });
}

/// Not a timed assertion: prints the cost of one uncontended race permit
/// (take plus give back, local wake included).
#[test]
#[ignore]
fn gate_cost() {
    let shared = limits(64);
    let local = LocalLimits::new(1, 64, Duration::from_secs(5));
    block_on(async {
        const N: u32 = 2_000_000;
        let started = std::time::Instant::now();
        for _ in 0..N {
            let p = local.race(&shared).await.expect("permit");
            std::hint::black_box(&p);
        }
        let per = started.elapsed() / N;
        println!("race permit take+give back, uncontended: {per:?}");
    });
    // Two threads on the same counter: the cache line moves between cores.
    let gate = Arc::new(Gate::new(64));
    let per_thread: Vec<Duration> = (0..2)
        .map(|_| {
            let gate = gate.clone();
            std::thread::spawn(move || {
                const N: u32 = 2_000_000;
                let started = std::time::Instant::now();
                for _ in 0..N {
                    if gate.try_take() {
                        gate.give_back();
                    }
                }
                started.elapsed() / N
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    println!("gate take+give back, 2 threads contending: {per_thread:?}");
}
