//! Catch-up for a node that starts (or restarts) while its peers run.
//! Gossip sends each route once, when it is learnt, so a node that was down
//! during a round never gets that round's routes. To close that gap a
//! starting node sends every peer a *hello* (a signed announcement with no
//! routes, [`super::codec::hello`]); a peer that receives one from a listed
//! peer answers that peer alone with the routes it announced since it last
//! answered that peer's hello (all it remembers, the first time).
//!
//! The routes travel as ordinary announcements, so the receiver checks them
//! exactly like any gossip (signature of the narinfo under the upstream's
//! key, the merge rule); a peer is trusted for nothing new. Strangers under
//! `allow_unauthenticated` get no answer: a forged sender address would
//! otherwise turn one small datagram into many sent elsewhere.
//!
//! Memory: the history holds the routes this node announced in the last
//! [`HISTORY_AGE`], at most [`HISTORY_ROUTES`]; each entry shares its
//! narinfo bytes with the route cache (an `Arc`), so it costs ~100 bytes
//! while the route is cached and the narinfo's size after it is evicted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::route::Learned;

/// Most routes remembered for catch-ups.
pub const HISTORY_ROUTES: usize = 16_384;
/// Routes older than this are not sent in a catch-up.
pub const HISTORY_AGE: Duration = Duration::from_secs(3600);

/// Routes this node announced, oldest first, and when it last answered
/// each peer's hello.
#[derive(Default)]
pub struct History {
    sent: VecDeque<(Instant, Learned)>,
    answered: HashMap<[u8; 32], Instant>,
}

impl History {
    /// Remembers routes announced at `now`; forgets the oldest beyond the
    /// bounds.
    pub fn record(&mut self, now: Instant, routes: impl IntoIterator<Item = Learned>) {
        for r in routes {
            if self.sent.len() == HISTORY_ROUTES {
                self.sent.pop_front();
            }
            self.sent.push_back((now, r));
        }
        while self
            .sent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > HISTORY_AGE)
        {
            self.sent.pop_front();
        }
    }

    /// The routes to send `peer`, which said hello at `now`: those
    /// announced since its last hello was answered (all, the first time),
    /// each store hash once (its latest route), unexpired at `unix_now`.
    /// Newest first, so a peer that restarts again soon gets the freshest.
    pub fn for_peer(&mut self, peer: [u8; 32], now: Instant, unix_now: u64) -> Vec<Learned> {
        let since = self.answered.insert(peer, now);
        let mut seen = HashSet::new();
        self.sent
            .iter()
            .rev()
            .take_while(|(at, _)| since.is_none_or(|s| *at >= s))
            .filter(|(_, (_, e))| e.expires_at > unix_now)
            .filter(|(_, (h, _))| seen.insert(*h))
            .map(|(_, l)| l.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::store_path::StoreHash;
    use crate::route::RouteEntry;
    use std::sync::Arc;

    fn learned(i: u8, expires_at: u64) -> Learned {
        let h = format!("{:0>32}", i % 10).replace('0', "a");
        let hash = StoreHash::parse(h.as_bytes()).expect("hash");
        let entry = RouteEntry {
            upstream: "http://u".into(),
            narinfo: bytes::Bytes::from_static(b"x"),
            nar_url: "nar/x".into(),
            nar_hash: "sha256:x".into(),
            nar_size: 1,
            expires_at,
            verified_at: 0,
            latency_ms: f32::from(i),
        };
        (hash, Arc::new(entry))
    }

    #[test]
    fn first_hello_gets_everything_later_ones_only_what_is_new() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.record(t0, [learned(1, 100), learned(2, 100)]);
        let peer = [7u8; 32];
        assert_eq!(h.for_peer(peer, t0 + Duration::from_secs(1), 50).len(), 2);
        assert!(h.for_peer(peer, t0 + Duration::from_secs(2), 50).is_empty());
        h.record(t0 + Duration::from_secs(3), [learned(3, 100)]);
        let again = h.for_peer(peer, t0 + Duration::from_secs(4), 50);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.latency_ms, 3.0);
        // Another peer still gets all three.
        assert_eq!(h.for_peer([8u8; 32], t0, 50).len(), 3);
    }

    #[test]
    fn expired_routes_and_duplicates_are_left_out_and_bounds_hold() {
        let t0 = Instant::now();
        let mut h = History::default();
        // Hashes repeat every 10; the newest of each is kept.
        h.record(t0, (0..20).map(|i| learned(i, if i == 15 { 10 } else { 100 })));
        let got = h.for_peer([1u8; 32], t0, 50);
        assert_eq!(got.len(), 9, "10 hashes, the newest of one expired");
        assert!(got.iter().all(|(_, e)| e.latency_ms >= 10.0));
        h.record(t0 + HISTORY_AGE + Duration::from_secs(1), [learned(1, 100)]);
        assert_eq!(h.len(), 1, "routes older than HISTORY_AGE forgotten");
        h.record(t0, (0..=255).cycle().take(HISTORY_ROUTES + 5).map(|i| learned(i, 100)));
        assert_eq!(h.len(), HISTORY_ROUTES);
    }
}
