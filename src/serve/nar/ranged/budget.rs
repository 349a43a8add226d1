//! The memory all parallel transfers of the process may hold in range
//! buffers (`cache.nar_ranges.max_memory`): one atomic counter, reserved
//! whole by a transfer before it starts, given back when it ends. A
//! transfer that finds no room is relayed as one stream.

use std::sync::atomic::{AtomicU64, Ordering};

static RESERVED: AtomicU64 = AtomicU64::new(0);

/// `bytes` of the budget, held until dropped.
#[derive(Debug)]
pub struct Reservation {
    bytes: u64,
}

impl Reservation {
    /// Reserves `bytes` if the total stays within `max`.
    pub fn take(bytes: u64, max: u64) -> Option<Reservation> {
        RESERVED
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&t| t <= max)
            })
            .ok()
            .map(|_| Reservation { bytes })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        RESERVED.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_budget() {
        // Other tests of this process may hold some: measure relative to a
        // budget far above anything they hold.
        let base = RESERVED.load(Ordering::Acquire);
        let max = base + 100;
        let a = Reservation::take(60, max).expect("room for 60");
        assert!(Reservation::take(60, max).is_none(), "120 > 100");
        let b = Reservation::take(40, max).expect("room for 40");
        drop(a);
        let c = Reservation::take(60, max).expect("room again once given back");
        drop((b, c));
    }
}
