//! HOT: the mass-query limits (`cache.mass_query.*`) shared by all workers.
//!
//! - [`Gate`]: a counter of permits (races in flight, or one upstream's
//!   requests in flight) shared by every worker. Taking a permit is one
//!   compare-and-swap, giving it back one `fetch_sub`; there is no lock and
//!   no cross-thread wake.
//! - [`LocalLimits`]: one per worker. Requests that find a gate full wait in
//!   that worker's queue. A permit given back on the same worker wakes the
//!   oldest waiter at once; one given back on another worker is noticed by
//!   the waiters' [`RETRY`] poll, so no worker ever wakes another.
//! - [`Cooldowns`]: per upstream, an expiry set after a transport error;
//!   until it expires, races ask the upstream only after the others gave no
//!   answer.
//!
//! Cost: `limits::tests::gate_cost` (ignored; run it with `--ignored
//! --nocapture`) measures an uncontended take-and-give-back.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::race::FailKind;

pub mod streams;

/// How often a waiter looks for a permit given back by another worker.
pub const RETRY: Duration = Duration::from_millis(5);

/// Why no permit was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("too many requests are already waiting for a race")]
    QueueFull,
    #[error("no race permit within the wait limit")]
    Timeout,
}

/// Permits shared by every worker.
#[derive(Debug)]
pub struct Gate {
    used: AtomicUsize,
    max: usize,
}

impl Gate {
    pub fn new(max: usize) -> Gate {
        Gate {
            used: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    #[inline]
    fn try_take(&self) -> bool {
        // A CAS rather than fetch_add-then-undo: an over-count, however
        // brief, would make another worker's attempt fail spuriously.
        self.used
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    #[inline]
    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::Release);
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Per-upstream cooldown expiries, in milliseconds since `epoch` plus one
/// (0 means "not cooling down").
#[derive(Debug)]
pub struct Cooldowns {
    until: Box<[AtomicU64]>,
    epoch: Instant,
    period: Duration,
}

impl Cooldowns {
    pub fn new(upstreams: usize, period: Duration, epoch: Instant) -> Cooldowns {
        Cooldowns {
            until: (0..upstreams).map(|_| AtomicU64::new(0)).collect(),
            epoch,
            period,
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Demotes `upstream` in races (asked only after the others) until
    /// `now + period`.
    pub fn start(&self, upstream: usize, now: Instant) {
        if let Some(u) = self.until.get(upstream) {
            u.store(self.stamp(now + self.period), Ordering::Relaxed);
        }
    }

    /// Ends `upstream`'s cooldown (its slot now holds another upstream).
    pub fn clear(&self, upstream: usize) {
        if let Some(u) = self.until.get(upstream) {
            u.store(0, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn is_cooling(&self, upstream: usize, now: Instant) -> bool {
        self.until.get(upstream).is_some_and(|u| {
            let until = u.load(Ordering::Relaxed);
            until != 0 && self.stamp(now) < until
        })
    }
}

/// Transport-level failures: the upstream, not the path, is the problem.
/// A status answer (even 5xx) means it is reachable, so no cooldown.
pub fn is_transport(kind: FailKind) -> bool {
    matches!(
        kind,
        FailKind::Dns
            | FailKind::Connect
            | FailKind::Tls
            | FailKind::Timeout
            | FailKind::Reset
            | FailKind::Protocol
    )
}

/// The limits shared by all workers.
#[derive(Debug)]
pub struct Limits {
    /// `max_concurrent_races`: races (with their narinfo GETs) in flight.
    pub races: Gate,
    /// `per_upstream_max_inflight`, per upstream index: race requests in
    /// flight to that upstream. NAR streams and probes are not counted.
    pub upstreams: Box<[Gate]>,
    pub cooldowns: Cooldowns,
    /// `upstreams[].max_concurrent_requests`: NAR streams per upstream slot.
    pub nar_streams: streams::StreamGates,
}

impl Limits {
    pub fn new(upstreams: usize, c: &crate::config::CacheConfig, epoch: Instant) -> Limits {
        Limits {
            races: Gate::new(c.max_concurrent_races as usize),
            upstreams: (0..upstreams)
                .map(|_| Gate::new(c.per_upstream_max_inflight as usize))
                .collect(),
            cooldowns: Cooldowns::new(upstreams, c.upstream_cooldown, epoch),
            nar_streams: streams::StreamGates::new(upstreams),
        }
    }
}

/// One waiter's slot in a [`LocalWaiters`] queue; set when it is woken.
type Flag = Rc<Cell<bool>>;

/// A worker-local FIFO of tasks waiting for one gate.
#[derive(Default)]
pub struct LocalWaiters {
    queue: RefCell<VecDeque<(Flag, Waker)>>,
    waiting: Cell<usize>,
}

impl LocalWaiters {
    /// Wakes the oldest waiter still alive (a dropped waiter's slot is only
    /// referenced by the queue and is skipped).
    fn wake_one(&self) {
        let mut q = self.queue.borrow_mut();
        while let Some((flag, waker)) = q.pop_front() {
            if Rc::strong_count(&flag) > 1 {
                flag.set(true);
                waker.wake();
                return;
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.get()
    }
}

/// A granted permit; dropping it gives the permit back and wakes the next
/// waiter on this worker.
#[must_use = "the permit is given back when dropped"]
pub struct Permit<'a> {
    gate: &'a Gate,
    waiters: &'a LocalWaiters,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.gate.give_back();
        self.waiters.wake_one();
    }
}

/// Counts a waiter for as long as it waits, even when its future is
/// dropped (the client went away).
struct Waiting<'a>(&'a LocalWaiters);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get() - 1);
    }
}

/// Per-worker side of the limits.
pub struct LocalLimits {
    races: LocalWaiters,
    upstreams: Box<[LocalWaiters]>,
    /// Requests of this worker that may wait for a race permit; more get
    /// [`LimitError::QueueFull`].
    queue_bound: usize,
    /// Longest wait for a race permit before [`LimitError::Timeout`].
    max_wait: Duration,
}

impl LocalLimits {
    pub fn new(upstreams: usize, queue_bound: usize, max_wait: Duration) -> LocalLimits {
        LocalLimits {
            races: LocalWaiters::default(),
            upstreams: (0..upstreams).map(|_| LocalWaiters::default()).collect(),
            queue_bound,
            max_wait,
        }
    }

    /// The worker's limits for `cfg`: a queue as long as the global race
    /// limit (so one worker alone can keep every permit busy), and a wait no
    /// longer than a race tier may run.
    pub fn for_config(upstreams: usize, cfg: &crate::config::Config) -> LocalLimits {
        LocalLimits::new(
            upstreams,
            cfg.cache.max_concurrent_races as usize,
            cfg.timeouts.race_deadline,
        )
    }

    pub fn race_waiters(&self) -> usize {
        self.races.waiting()
    }

    /// A race permit, waiting in this worker's bounded queue if needed.
    pub async fn race<'a>(&'a self, shared: &'a Limits) -> Result<Permit<'a>, LimitError> {
        acquire(
            &shared.races,
            &self.races,
            Some(self.queue_bound),
            Some(self.max_wait),
        )
        .await
    }

    /// A permit for one request to `upstream`. The wait is bounded by the
    /// caller (the race drops this future at its tier deadline).
    pub async fn upstream<'a>(&'a self, shared: &'a Limits, upstream: usize) -> Option<Permit<'a>> {
        let gate = shared.upstreams.get(upstream)?;
        let waiters = self.upstreams.get(upstream)?;
        acquire(gate, waiters, None, None).await.ok()
    }
}

async fn acquire<'a>(
    gate: &'a Gate,
    waiters: &'a LocalWaiters,
    bound: Option<usize>,
    max_wait: Option<Duration>,
) -> Result<Permit<'a>, LimitError> {
    let permit = || Permit { gate, waiters };
    if gate.try_take() {
        return Ok(permit());
    }
    if bound.is_some_and(|b| waiters.waiting.get() >= b) {
        return Err(LimitError::QueueFull);
    }
    waiters.waiting.set(waiters.waiting.get() + 1);
    let _waiting = Waiting(waiters);
    let deadline = max_wait.map(|d| monoio::time::Instant::now() + d);
    let flag: Flag = Rc::new(Cell::new(true));
    // One timer for the whole wait, re-armed each time it fires, rather
    // than a new one registered and removed at every wake-up.
    let mut retry = std::pin::pin!(monoio::time::sleep(RETRY));
    loop {
        if flag.get() {
            // Woken (or first round): queue up again for the next release.
            flag.set(false);
            let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
            waiters.queue.borrow_mut().push_back((flag.clone(), waker));
        }
        // Woken by a permit given back on this worker, or the retry.
        std::future::poll_fn(|cx| {
            if flag.get() {
                return Poll::Ready(());
            }
            if retry.as_mut().poll(cx).is_ready() {
                retry.as_mut().reset(monoio::time::Instant::now() + RETRY);
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        if gate.try_take() {
            return Ok(permit());
        }
        if deadline.is_some_and(|d| monoio::time::Instant::now() >= d) {
            return Err(LimitError::Timeout);
        }
    }
}

#[cfg(test)]
mod tests;
