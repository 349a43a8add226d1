//! Who may gossip to this node, and replay protection. Pure: the caller
//! passes the clock, so every rule is tested without sockets.
//!
//! Checks, cheapest first: size, framing, sender on the allow-list,
//! signature, body, then the timestamp (inside the window around
//! now, and newer than the last accepted from that sender). Nothing about
//! the body is believed before the signature verified.

use std::collections::{HashMap, HashSet};
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

/// Senders tracked before stale ones are forgotten (only reachable with
/// `allow_unauthenticated`, where any key may send).
const MAX_TRACKED: usize = 4096;

pub struct Trust {
    listed: HashSet<[u8; KEY_LEN]>,
    /// Accept any sender whose packet verifies under its own key.
    open: bool,
    window_ns: i64,
    /// Timestamp of the last accepted message per sender.
    last: HashMap<[u8; KEY_LEN], i64>,
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
            listed: listed.into_iter().collect(),
            open,
            window_ns: i64::try_from(window.as_nanos()).unwrap_or(i64::MAX),
            last: HashMap::new(),
        }
    }

    /// Decides about one received datagram at `now_ns` (unix nanoseconds).
    pub fn check(&mut self, packet: &[u8], now_ns: i64) -> Result<Accepted, Reject> {
        if packet.len() > MAX_DATAGRAM {
            return Err(Reject::Oversized);
        }
        let d = Datagram::split(packet).map_err(|_| Reject::Malformed)?;
        let listed = self.listed.contains(&d.sender);
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

    fn fresh(&mut self, sender: [u8; KEY_LEN], ts: i64, now_ns: i64) -> Result<(), Reject> {
        if ts.abs_diff(now_ns) > self.window_ns.unsigned_abs() {
            return Err(Reject::Replayed);
        }
        if self.last.get(&sender).is_some_and(|&last| ts <= last) {
            return Err(Reject::Replayed);
        }
        if self.last.len() >= MAX_TRACKED && !self.last.contains_key(&sender) {
            // A sender last heard before the window opened cannot be
            // replayed anyway: any packet of its past is outside the window.
            let horizon = now_ns.saturating_sub(self.window_ns);
            self.last.retain(|_, &mut last| last > horizon);
        }
        self.last.insert(sender, ts);
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
        assert!(t.last.len() <= MAX_TRACKED, "{}", t.last.len());
    }
}
