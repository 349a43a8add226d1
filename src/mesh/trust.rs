//! Who may gossip to this node, and replay protection. Pure: the caller
//! passes the clock, so every rule is tested without sockets.
//!
//! Checks, cheapest first: size, framing, sender on the allow-list,
//! signature, body, then the timestamp (inside the window around
//! now, and newer than the last accepted from that sender). Nothing about
//! the body is believed before the signature verified.
//!
//! Memory is bounded: configured peers are few and always tracked;
//! self-signed strangers (`allow_unauthenticated`) are tracked up to
//! [`MAX_TRACKED`], the oldest-inserted forgotten first in O(1). Replay
//! protection stays sound for the forgotten ones through a floor: see
//! [`Trust::fresh`].

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};

use super::codec::{self, Announce, Datagram, KEY_LEN, MAX_DATAGRAM};

/// Why a datagram was dropped; each is a `result` label of
/// `ncro_mesh_packets_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Oversized,
    Malformed,
    UnknownSender,
    BadSignature,
    Replayed,
}

impl Reject {
    pub const ALL: [Reject; 5] = [
        Reject::BadSignature,
        Reject::UnknownSender,
        Reject::Malformed,
        Reject::Replayed,
        Reject::Oversized,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::Oversized => "oversized",
            Reject::Malformed => "malformed",
            Reject::UnknownSender => "unknown_sender",
            Reject::BadSignature => "bad_signature",
            Reject::Replayed => "replayed",
        }
    }
}

/// An authenticated, fresh message.
#[derive(Debug)]
pub struct Accepted {
    pub sender: [u8; KEY_LEN],
    /// The sender is a configured peer key (not merely self-signed under
    /// `allow_unauthenticated`).
    pub listed: bool,
    pub announce: Announce,
}

/// Unlisted senders tracked at most (only reachable with
/// `allow_unauthenticated`, where any key may send); a new one beyond it
/// makes the oldest-inserted one forgotten.
const MAX_TRACKED: usize = 4096;

pub struct Trust {
    /// Configured peers' keys, each with the timestamp of the last message
    /// accepted from it. Bounded by the configuration; never forgotten.
    listed: HashMap<[u8; KEY_LEN], Option<i64>>,
    /// Accept any sender whose packet verifies under its own key.
    open: bool,
    window_ns: i64,
    /// Timestamp of the last accepted message per unlisted sender; at most
    /// [`MAX_TRACKED`].
    strangers: HashMap<[u8; KEY_LEN], i64>,
    /// The keys of `strangers` in the order they were first tracked, each
    /// once: the front is the next to forget.
    order: VecDeque<[u8; KEY_LEN]>,
    /// The newest last-accepted timestamp of any forgotten stranger: an
    /// untracked sender must send something newer.
    floor: i64,
}

impl Trust {
    /// `listed`: the peers' public keys; `open`: also accept unlisted
    /// self-signed senders; `window`: how far a timestamp may be from now.
    pub fn new(
        listed: impl IntoIterator<Item = [u8; KEY_LEN]>,
        open: bool,
        window: Duration,
    ) -> Trust {
        Trust {
            listed: listed.into_iter().map(|k| (k, None)).collect(),
            open,
            window_ns: i64::try_from(window.as_nanos()).unwrap_or(i64::MAX),
            strangers: HashMap::new(),
            order: VecDeque::new(),
            floor: i64::MIN,
        }
    }

    /// Decides about one received datagram at `now_ns` (unix nanoseconds).
    pub fn check(&mut self, packet: &[u8], now_ns: i64) -> Result<Accepted, Reject> {
        if packet.len() > MAX_DATAGRAM {
            return Err(Reject::Oversized);
        }
        let d = Datagram::split(packet).map_err(|_| Reject::Malformed)?;
        let listed = self.listed.contains_key(&d.sender);
        if !listed && !self.open {
            return Err(Reject::UnknownSender);
        }
        let key = VerifyingKey::from_bytes(&d.sender).map_err(|_| Reject::BadSignature)?;
        key.verify_strict(d.body, &Signature::from_bytes(&d.signature))
            .map_err(|_| Reject::BadSignature)?;
        // The node id is not checked against the key: ncro 2.2 does not
        // either, and the signature already names the sender.
        let announce = codec::decode_announce(d.body).map_err(|_| Reject::Malformed)?;
        self.fresh(d.sender, announce.timestamp, now_ns)?;
        Ok(Accepted {
            sender: d.sender,
            listed,
            announce,
        })
    }

    /// Accepts `ts` from `sender` if it is inside the window around
    /// `now_ns` and newer than anything accepted from `sender`, and
    /// remembers it. O(1): one or two hash lookups, at most one eviction.
    ///
    /// Forgetting a stranger (the table is full and a new one arrives)
    /// must not let its old packets in again: its last timestamp raises
    /// [`Self::floor`], and a sender not in the table is accepted only
    /// with a timestamp above the floor. Every packet a forgotten sender
    /// ever had accepted is at or below its last timestamp, so none can be
    /// replayed, and the senders still tracked keep their own exact
    /// threshold. The price is paid only while more than [`MAX_TRACKED`]
    /// strangers send inside one window (a flood): a stranger new to the
    /// table, or forgotten, is then refused (`replayed`) until its clock
    /// passes the newest timestamp forgotten, at most one window later.
    /// Configured peers are tracked apart and never forgotten, so a flood
    /// of self-signed keys cannot touch them.
    fn fresh(&mut self, sender: [u8; KEY_LEN], ts: i64, now_ns: i64) -> Result<(), Reject> {
        if ts.abs_diff(now_ns) > self.window_ns.unsigned_abs() {
            return Err(Reject::Replayed);
        }
        if let Some(last) = self.listed.get_mut(&sender) {
            if last.is_some_and(|last| ts <= last) {
                return Err(Reject::Replayed);
            }
            *last = Some(ts);
            return Ok(());
        }
        if let Some(last) = self.strangers.get_mut(&sender) {
            if ts <= *last {
                return Err(Reject::Replayed);
            }
            *last = ts;
            return Ok(());
        }
        if ts <= self.floor {
            return Err(Reject::Replayed);
        }
        if self.strangers.len() >= MAX_TRACKED {
            if let Some(oldest) = self.order.pop_front() {
                if let Some(last) = self.strangers.remove(&oldest) {
                    self.floor = self.floor.max(last);
                }
            }
        }
        self.strangers.insert(sender, ts);
        self.order.push_back(sender);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::codec::{encode_announce, seal, HEADER_LEN};
    use ed25519_dalek::SigningKey;

    const NOW: i64 = 1_780_000_000_000_000_000;
    const WINDOW: Duration = Duration::from_secs(60);

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn packet(k: &SigningKey, ts: i64) -> Vec<u8> {
        let a = Announce {
            node_id: super::super::identity::node_id(k.verifying_key().as_bytes()),
            timestamp: ts,
            routes: Vec::new(),
        };
        seal(k, &encode_announce(&a))
    }

    fn trust(open: bool) -> Trust {
        Trust::new([*key(1).verifying_key().as_bytes()], open, WINDOW)
    }

    #[test]
    fn accepts_listed_sender_once_per_timestamp() {
        let mut t = trust(false);
        let p = packet(&key(1), NOW);
        let a = t.check(&p, NOW).unwrap();
        assert!(a.listed);
        assert_eq!(a.announce.timestamp, NOW);
        assert_eq!(t.check(&p, NOW + 1).unwrap_err(), Reject::Replayed);
        // Older but inside the window: still a replay.
        assert_eq!(
            t.check(&packet(&key(1), NOW - 5), NOW).unwrap_err(),
            Reject::Replayed
        );
        assert!(t.check(&packet(&key(1), NOW + 1), NOW).is_ok());
    }

    #[test]
    fn the_golden_ncro_2_2_packet_is_accepted() {
        use crate::mesh::codec::tests::{golden_body, GOLDEN_TIMESTAMP};
        let mut t = Trust::new([*key(7).verifying_key().as_bytes()], false, WINDOW);
        let packet = seal(&key(7), &golden_body());
        let a = t.check(&packet, GOLDEN_TIMESTAMP + 1_000_000_000).unwrap();
        assert_eq!(a.announce.node_id, "0011223344556677");
        assert_eq!(a.announce.routes.len(), 1);
        assert_eq!(
            t.check(&packet, GOLDEN_TIMESTAMP).unwrap_err(),
            Reject::Replayed
        );
    }

    #[test]
    fn replay_window_is_symmetric_around_now() {
        let w = WINDOW.as_nanos() as i64;
        let mut t = trust(false);
        assert_eq!(
            t.check(&packet(&key(1), NOW - w - 1), NOW).unwrap_err(),
            Reject::Replayed
        );
        assert_eq!(
            t.check(&packet(&key(1), NOW + w + 1), NOW).unwrap_err(),
            Reject::Replayed
        );
        assert!(t.check(&packet(&key(1), NOW - w), NOW).is_ok());
        assert!(t.check(&packet(&key(1), NOW + w), NOW).is_ok());
        // A stale packet from a restarted sender's past stays rejected
        // even though this node has forgotten nothing.
        assert_eq!(
            t.check(&packet(&key(1), i64::MIN), NOW).unwrap_err(),
            Reject::Replayed
        );
    }

    #[test]
    fn unknown_forged_malformed_and_oversized() {
        let mut t = trust(false);
        assert_eq!(
            t.check(&packet(&key(2), NOW), NOW).unwrap_err(),
            Reject::UnknownSender
        );
        // Listed key, but signed by someone else.
        let mut forged = packet(&key(2), NOW);
        forged[..32].copy_from_slice(key(1).verifying_key().as_bytes());
        assert_eq!(t.check(&forged, NOW).unwrap_err(), Reject::BadSignature);
        // A flipped body byte breaks the signature, not the decoder.
        let mut flipped = packet(&key(1), NOW);
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(t.check(&flipped, NOW).unwrap_err(), Reject::BadSignature);
        // Validly signed garbage.
        let junk = seal(&key(1), b"\xc1not msgpack");
        assert_eq!(t.check(&junk, NOW).unwrap_err(), Reject::Malformed);
        assert_eq!(
            t.check(&[0u8; HEADER_LEN - 1], NOW).unwrap_err(),
            Reject::Malformed
        );
        let big = vec![0u8; MAX_DATAGRAM + 1];
        assert_eq!(t.check(&big, NOW).unwrap_err(), Reject::Oversized);
        // None of these used up the sender's timestamp.
        assert!(t.check(&packet(&key(1), NOW), NOW).is_ok());
    }

    #[test]
    fn open_mode_accepts_self_signed_strangers_but_says_so() {
        let mut t = trust(true);
        let a = t.check(&packet(&key(9), NOW), NOW).unwrap();
        assert!(!a.listed);
        assert_eq!(
            t.check(&packet(&key(9), NOW), NOW).unwrap_err(),
            Reject::Replayed
        );
        let mut forged = packet(&key(9), NOW + 1);
        forged[..32].copy_from_slice(key(8).verifying_key().as_bytes());
        assert_eq!(t.check(&forged, NOW).unwrap_err(), Reject::BadSignature);
    }

    #[test]
    fn sender_table_stays_bounded() {
        let mut t = trust(true);
        let w = WINDOW.as_nanos() as i64;
        for i in 0..MAX_TRACKED + 10 {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let k = SigningKey::from_bytes(&seed);
            // Everyone sent a while ago; the later ones push the old out.
            let now = NOW + (i as i64) * (w / 100);
            t.check(&packet(&k, now), now).unwrap();
        }
        assert!(t.strangers.len() <= MAX_TRACKED, "{}", t.strangers.len());
    }

    /// A sender key that is only ever seen by `fresh` (no signature needed).
    fn sender(i: u64) -> [u8; KEY_LEN] {
        let mut k = [0xa5; KEY_LEN];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn ten_thousand_fresh_senders_in_one_window_stay_under_the_cap() {
        let mut t = trust(true);
        for i in 0..10_000u64 {
            // All inside one window: nobody has aged out.
            t.fresh(sender(i), NOW + i as i64, NOW).unwrap();
            assert!(t.strangers.len() <= MAX_TRACKED, "after {i}");
            assert_eq!(t.order.len(), t.strangers.len(), "after {i}");
        }
        assert_eq!(t.strangers.len(), MAX_TRACKED);
        // The oldest-inserted were forgotten; the newest are tracked.
        assert!(!t.strangers.contains_key(&sender(0)));
        assert!(t.strangers.contains_key(&sender(9_999)));
    }

    #[test]
    fn forgotten_senders_cannot_be_replayed_and_tracked_ones_keep_their_own_threshold() {
        let mut t = trust(true);
        let peer = *key(1).verifying_key().as_bytes();
        t.fresh(peer, NOW, NOW).unwrap();
        t.fresh(sender(0), NOW + 5, NOW).unwrap();
        // A flood of strangers forgets sender 0, never the listed peer.
        for i in 1..=MAX_TRACKED as u64 {
            t.fresh(sender(i), NOW + 10, NOW).unwrap();
        }
        assert!(!t.strangers.contains_key(&sender(0)), "forgotten");
        assert_eq!(t.fresh(sender(0), NOW + 5, NOW), Err(Reject::Replayed));
        assert_eq!(t.fresh(sender(0), NOW + 3, NOW), Err(Reject::Replayed));
        assert_eq!(t.fresh(peer, NOW, NOW), Err(Reject::Replayed));
        assert!(t.fresh(peer, NOW + 1, NOW).is_ok(), "peers keep their own");
        // A tracked sender is judged by its own last timestamp only.
        assert_eq!(
            t.fresh(sender(MAX_TRACKED as u64), NOW + 10, NOW),
            Err(Reject::Replayed)
        );
        assert!(t.fresh(sender(MAX_TRACKED as u64), NOW + 11, NOW).is_ok());
        // Past the newest forgotten timestamp, sender 0 is welcome again.
        assert!(t.fresh(sender(0), NOW + 6, NOW).is_ok());
    }

    #[test]
    fn per_sender_cost_does_not_grow_with_the_table() {
        // The fastest of several batches of new senders into a small
        // table, and into a full one that must forget one per sender.
        // With a scan of the table per new sender (as before), the second
        // is hundreds of times slower; O(1) keeps them within noise.
        fn fastest_batch(t: &mut Trust, from: u64) -> std::time::Duration {
            (0..8u64)
                .map(|b| {
                    let started = std::time::Instant::now();
                    for i in 0..100 {
                        let n = from + b * 100 + i;
                        t.fresh(sender(n), NOW + n as i64, NOW).unwrap();
                    }
                    started.elapsed()
                })
                .min()
                .unwrap()
        }
        let mut t = trust(true);
        let small = fastest_batch(&mut t, 0);
        for i in 800..10_000u64 {
            t.fresh(sender(i), NOW + i as i64, NOW).unwrap();
        }
        assert_eq!(t.strangers.len(), MAX_TRACKED);
        let full = fastest_batch(&mut t, 10_000);
        assert!(
            full <= small * 20 + std::time::Duration::from_micros(200),
            "100 new senders: {small:?} into a small table, {full:?} into a full one"
        );
    }
}
