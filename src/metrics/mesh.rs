//! Mesh gossip counters. The control thread's gossip task is their only
//! writer (plain load + store, like a worker slot); scrapes read them.
//! Exported with zeros when the mesh is off, so dashboards and the docs
//! check see the same families everywhere. COLD.

use prometheus::proto::{Metric, MetricFamily, MetricType};

use super::family::{counter_metric, family};
use super::{LocalCounter, Metrics};

/// `result` labels of `ncro_mesh_packets_total`, by index.
pub const PACKET_RESULTS: [&str; 6] = [
    "accepted",
    "bad_signature",
    "unknown_sender",
    "malformed",
    "replayed",
    "oversized",
];

/// `reason` labels of `ncro_mesh_routes_rejected_total`, by index.
pub const ROUTE_REJECTS: [&str; 8] = [
    "malformed",
    "unknown_upstream",
    "expired",
    "no_narinfo",
    "bad_narinfo",
    "bad_signature",
    "unverifiable",
    "not_better",
];

#[derive(Default)]
pub struct MeshCounters {
    pub packets: [LocalCounter; 6],
    pub routes_merged: LocalCounter,
    /// Route announcements put on the wire, once per peer.
    pub routes_sent: LocalCounter,
    pub routes_rejected: [LocalCounter; 8],
    pub datagrams_sent: LocalCounter,
    pub send_errors: LocalCounter,
    /// Catch-ups sent to peers that said hello after (re)starting.
    pub catch_ups: LocalCounter,
}

impl MeshCounters {
    /// Counts a received datagram under its `result` label.
    pub fn packet(&self, result: &str) {
        if let Some(i) = PACKET_RESULTS.iter().position(|&r| r == result) {
            self.packets[i].inc();
        }
    }

    /// Counts a gossiped route that was not adopted.
    pub fn rejected(&self, reason: &str) {
        if let Some(i) = ROUTE_REJECTS.iter().position(|&r| r == reason) {
            self.routes_rejected[i].inc();
        }
    }
}

pub(super) fn families(m: &Metrics) -> Vec<MetricFamily> {
    let c = &m.mesh;
    let by = |label: &str, names: &[&str], counters: &[LocalCounter]| -> Vec<Metric> {
        names
            .iter()
            .zip(counters)
            .map(|(n, v)| counter_metric(&[(label, n)], v.get()))
            .collect()
    };
    let single = |name: &str, help: &str, v: u64| {
        family(
            name,
            help,
            MetricType::COUNTER,
            vec![counter_metric(&[], v)],
        )
    };
    let feed_dropped = m.gauges.get().map_or(0, |g| g.routes.learned_dropped());
    vec![
        family(
            "ncro_mesh_packets_total",
            "Gossip datagrams received, by result (accepted, bad_signature, unknown_sender, malformed, replayed, oversized).",
            MetricType::COUNTER,
            by("result", &PACKET_RESULTS, &c.packets),
        ),
        single(
            "ncro_mesh_routes_merged_total",
            "Gossiped routes adopted into the route cache.",
            c.routes_merged.get(),
        ),
        family(
            "ncro_mesh_routes_rejected_total",
            "Gossiped routes in accepted datagrams that were not adopted, by reason.",
            MetricType::COUNTER,
            by("reason", &ROUTE_REJECTS, &c.routes_rejected),
        ),
        single(
            "ncro_mesh_routes_sent_total",
            "Route announcements sent, counted once per peer.",
            c.routes_sent.get(),
        ),
        single(
            "ncro_mesh_datagrams_sent_total",
            "Gossip datagrams sent, counted once per peer.",
            c.datagrams_sent.get(),
        ),
        single(
            "ncro_mesh_send_errors_total",
            "Gossip datagrams that could not be sent (peer unresolvable, socket error).",
            c.send_errors.get(),
        ),
        single(
            "ncro_mesh_catch_ups_total",
            "Catch-ups sent: routes announced lately, sent to a peer that said hello after (re)starting.",
            c.catch_ups.get(),
        ),
        single(
            "ncro_mesh_feed_dropped_total",
            "Learned routes not gossiped because the feed to the gossip task was full.",
            feed_dropped,
        ),
    ]
}
