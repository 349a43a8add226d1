//! HOT: per-worker request coalescing. Concurrent lookups of the same key
//! share one execution and its result, failures included, so a burst of
//! clients asking for one narinfo costs one race, not one each
//! (ncro 2.2 re-raced once per waiter after a miss or an error; reference
//! §13.2 item 4).
//!
//! Nothing is cached: the entry lives exactly as long as its flight. A
//! leader whose future is dropped (its client went away) does not strand
//! the others: its guard marks the flight abandoned and wakes them, and the
//! first waiter to run takes over with its own `make`, the rest join that
//! new flight. Callers never see an "abandoned" result.

use std::cell::RefCell;
use std::collections::HashMap;

use foldhash::fast::RandomState;

/// Flights in progress by key; foldhash, not SipHash: looked up on every
/// miss.
type FlightMap<K, V> = HashMap<K, Rc<Flight<V>>, RandomState>;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// How a caller of [`SingleFlight::run`] got its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This caller ran the work itself (first caller, or it took over from
    /// a leader that was dropped).
    Led,
    /// This caller waited for another caller's execution and got a clone of
    /// its result.
    Joined,
}

/// Coalesces concurrent executions per key on one worker thread. Cloning
/// is cheap and every clone shares the same flights; the type is `!Send`
/// on purpose (one per worker, no locks).
pub struct SingleFlight<K, V> {
    /// Flights in progress. An entry is inserted by its leader and removed by
    /// the leader's guard when the flight finishes or is abandoned.
    flights: Rc<RefCell<FlightMap<K, V>>>,
}

impl<K, V> Clone for SingleFlight<K, V> {
    fn clone(&self) -> Self {
        SingleFlight {
            flights: Rc::clone(&self.flights),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// An empty coalescer.
    pub fn new() -> Self {
        SingleFlight {
            flights: Rc::new(RefCell::new(HashMap::default())),
        }
    }

    /// Number of keys with a flight in progress (for a gauge and tests).
    pub fn in_flight(&self) -> usize {
        self.flights.borrow().len()
    }

    /// Runs `make()` for `key` unless a flight for `key` is already in
    /// progress, in which case waits for that flight and returns a clone of
    /// its value. `make` is called at most once, and only when this caller
    /// leads: first, or after the leader it was waiting for was dropped.
    pub async fn run<F, M>(&self, key: K, make: M) -> (V, Role)
    where
        M: FnOnce() -> F,
        F: Future<Output = V>,
    {
        loop {
            let existing = self.flights.borrow().get(&key).cloned();
            let Some(flight) = existing else {
                return (self.lead(key, make).await, Role::Led);
            };
            if let Some(value) = (Wait { flight, slot: None }).await {
                return (value, Role::Joined);
            }
            // The leader was dropped and its entry removed: look again, to
            // take over or to join whoever took over first.
        }
    }

    async fn lead<F, M>(&self, key: K, make: M) -> V
    where
        M: FnOnce() -> F,
        F: Future<Output = V>,
    {
        let flight = Rc::new(Flight {
            state: RefCell::new(State::Running(Vec::new())),
        });
        self.flights
            .borrow_mut()
            .insert(key.clone(), Rc::clone(&flight));
        let mut guard = LeaderGuard {
            flights: &self.flights,
            key,
            flight,
            finished: false,
        };
        let value = make().await;
        guard.finish(&value);
        value
    }
}

struct Flight<V> {
    state: RefCell<State<V>>,
}

enum State<V> {
    /// One waker slot per waiting caller; a dropped waiter empties its slot.
    Running(Vec<Option<Waker>>),
    Done(V),
    /// The leader was dropped before producing a value.
    Abandoned,
}

/// Owned by the leader for the duration of `make()`. Whether the leader
/// finishes or is dropped, the entry leaves the map and the waiters wake.
struct LeaderGuard<'a, K: Hash + Eq, V> {
    flights: &'a RefCell<FlightMap<K, V>>,
    key: K,
    flight: Rc<Flight<V>>,
    finished: bool,
}

impl<K: Hash + Eq, V: Clone> LeaderGuard<'_, K, V> {
    fn finish(&mut self, value: &V) {
        self.finished = true;
        self.unregister();
        // Only waiters still hold the flight now; clone only if one does.
        // With none left, the state is never read again.
        let next = if Rc::strong_count(&self.flight) > 1 {
            State::Done(value.clone())
        } else {
            State::Abandoned
        };
        self.settle(next);
    }
}

impl<K: Hash + Eq, V> LeaderGuard<'_, K, V> {
    fn unregister(&self) {
        let mut flights = self.flights.borrow_mut();
        if flights
            .get(&self.key)
            .is_some_and(|f| Rc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
    }

    fn settle(&self, next: State<V>) {
        let previous = self.flight.state.replace(next);
        // Woken after the borrow is released, so a waker that polls inline
        // cannot hit a RefCell conflict.
        if let State::Running(wakers) = previous {
            wakers.into_iter().flatten().for_each(Waker::wake);
        }
    }
}

impl<K: Hash + Eq, V> Drop for LeaderGuard<'_, K, V> {
    fn drop(&mut self) {
        if !self.finished {
            self.unregister();
            self.settle(State::Abandoned);
        }
    }
}

/// A joined caller waiting for a flight. Resolves to `None` when the leader
/// was abandoned.
struct Wait<V> {
    flight: Rc<Flight<V>>,
    /// This waiter's index in the waker list, once registered.
    slot: Option<usize>,
}

impl<V: Clone> Future for Wait<V> {
    type Output = Option<V>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<V>> {
        let this = self.get_mut();
        let mut state = this.flight.state.borrow_mut();
        let wakers = match &mut *state {
            State::Done(value) => return Poll::Ready(Some(value.clone())),
            State::Abandoned => return Poll::Ready(None),
            State::Running(wakers) => wakers,
        };
        match this.slot {
            Some(i) => match &mut wakers[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            },
            None => {
                this.slot = Some(wakers.len());
                wakers.push(Some(cx.waker().clone()));
            }
        }
        Poll::Pending
    }
}

impl<V> Drop for Wait<V> {
    fn drop(&mut self) {
        if let (Some(i), State::Running(wakers)) = (self.slot, &mut *self.flight.state.borrow_mut())
        {
            wakers[i] = None;
        }
    }
}

#[cfg(test)]
mod tests;
