//! `server.max_connections`: the process-wide count of open client
//! connections against the cap, taken when a worker accepts a connection
//! and given back when its task ends (the 503 for connections beyond it is
//! [`crate::serve::limit`]). HOT: one atomic add per accepted connection.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Open client connections across all workers against the configured cap.
#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicUsize,
    /// 0: no cap.
    max: usize,
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a slot for a new connection; false when the cap is reached.
    /// Every `true` must be matched by one [`ConnLimit::release`].
    #[inline]
    pub fn try_acquire(&self) -> bool {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if self.max == 0 || before < self.max {
            return true;
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
        false
    }

    #[inline]
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back() {
        let l = ConnLimit::new(2);
        assert!(l.try_acquire() && l.try_acquire());
        assert!(!l.try_acquire(), "third over a cap of 2");
        assert_eq!(l.open(), 2, "a refused attempt holds no slot");
        l.release();
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
    }

    #[test]
    fn zero_means_no_cap() {
        let l = ConnLimit::new(0);
        assert!((0..10_000).all(|_| l.try_acquire()));
        assert_eq!(l.open(), 10_000);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_cap() {
        let l = std::sync::Arc::new(ConnLimit::new(10));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut held = 0;
                    for _ in 0..10_000 {
                        if l.try_acquire() {
                            assert!(l.open() <= 10 + 3, "only racing attempts overshoot");
                            held += 1;
                            if held > 5 {
                                l.release();
                                held -= 1;
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        let held: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(held <= 10);
        assert_eq!(l.open(), held);
    }
}
