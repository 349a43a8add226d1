//! HOT: `upstreams[].max_concurrent_requests`, the most NAR streams to one
//! upstream at once across all workers. One padded atomic counter per
//! upstream slot; taking a permit is one compare-and-swap, giving it back
//! one `fetch_sub` when the [`StreamPermit`] is dropped (the stream ended,
//! failed, or its task was cancelled). An upstream without a cap takes no
//! atomic at all. Nothing here waits: the caller decides what to do when
//! every holder of a file is full (docs/configuration.md).

use std::sync::atomic::{AtomicU32, Ordering};

/// One slot's counter on its own cache line, so that two upstreams'
/// streams never contend.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicU32);

/// NAR streams in flight per upstream slot.
#[derive(Debug)]
pub struct StreamGates {
    used: Box<[Counter]>,
}

impl StreamGates {
    pub fn new(slots: usize) -> StreamGates {
        StreamGates {
            used: (0..slots).map(|_| Counter::default()).collect(),
        }
    }

    /// A permit for one NAR stream to `slot`, or None when `max` streams are
    /// already in flight. `max` None: no cap, no counting.
    #[inline]
    pub fn try_take(&self, slot: usize, max: Option<u32>) -> Option<StreamPermit<'_>> {
        let Some(max) = max else {
            return Some(StreamPermit { used: None });
        };
        let used = &self.used.get(slot)?.0;
        // A CAS rather than fetch_add-then-undo: an over-count, however
        // brief, would refuse another worker's stream spuriously.
        used.fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| StreamPermit { used: Some(used) })
    }

    /// Streams to `slot` holding a permit now (capped upstreams only).
    pub fn in_use(&self, slot: usize) -> u32 {
        self.used
            .get(slot)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }
}

/// One NAR stream's place under its upstream's cap; given back on drop.
#[must_use = "the permit is given back when dropped"]
#[derive(Debug)]
pub struct StreamPermit<'a> {
    used: Option<&'a AtomicU32>,
}

impl StreamPermit<'_> {
    /// Whether this permit counts against a cap.
    pub fn is_counted(&self) -> bool {
        self.used.is_some()
    }
}

impl Drop for StreamPermit<'_> {
    fn drop(&mut self) {
        if let Some(used) = self.used {
            used.fetch_sub(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_exact_and_drop_gives_back() {
        let g = StreamGates::new(2);
        let a = g.try_take(0, Some(2)).expect("first");
        let b = g.try_take(0, Some(2)).expect("second");
        assert!(g.try_take(0, Some(2)).is_none(), "over the cap");
        assert_eq!(g.in_use(0), 2);
        assert!(g.try_take(1, Some(1)).is_some(), "slots are separate");
        drop(a);
        assert_eq!(g.in_use(0), 1);
        let c = g.try_take(0, Some(2)).expect("room again");
        drop((b, c));
        assert_eq!(g.in_use(0), 0);
        assert!(g.try_take(5, Some(1)).is_none(), "no such slot");
    }

    #[test]
    fn uncapped_streams_are_not_counted() {
        let g = StreamGates::new(1);
        let held: Vec<_> = (0..10).map(|_| g.try_take(0, None).expect("no cap")).collect();
        assert!(held.iter().all(|p| !p.is_counted()));
        assert_eq!(g.in_use(0), 0);
    }

    #[test]
    fn threads_never_exceed_the_cap() {
        let g = std::sync::Arc::new(StreamGates::new(1));
        let peak = std::sync::Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (g, peak) = (g.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = g.try_take(0, Some(3)) {
                            peak.fetch_max(g.in_use(0), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(g.in_use(0), 0);
    }
}
