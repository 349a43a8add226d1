//! Pure discovery bookkeeping: which announced addresses become upstream
//! URLs, and which URLs are still live. No I/O and no clock: callers pass
//! `now`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::AddressFamily;

/// A discovered upstream URL and the mDNS instance that announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `http://<ip>:<port>`, IPv6 bracketed.
    pub url: String,
    /// The instance's full name, e.g. `cache1._nix-serve._tcp.local.`.
    pub instance: String,
}

/// Whether `ip` can be an upstream address under `family`. Loopback and
/// unspecified addresses name the announcer's own host, not one this node
/// can reach it by; multicast and broadcast are not hosts at all; IPv6
/// link-local needs an interface scope that a URL cannot carry.
pub fn usable(ip: IpAddr, family: AddressFamily) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let wanted = match family {
        AddressFamily::Any => true,
        AddressFamily::Ipv4 => ip.is_ipv4(),
        AddressFamily::Ipv6 => ip.is_ipv6(),
    };
    let host = match ip {
        IpAddr::V4(v4) => !v4.is_broadcast(),
        // fe80::/10
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    };
    wanted && host && !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast()
}

/// Upstream URLs for a service on `port` at `addrs`: plain HTTP (as ncro
/// 2.2, and as nix-serve and Harmonia serve on a LAN), no path (ncro 2.2
/// ignored TXT records too), sorted and without duplicates.
pub fn urls(
    port: u16,
    addrs: impl IntoIterator<Item = IpAddr>,
    family: AddressFamily,
) -> Vec<String> {
    if port == 0 {
        return Vec::new();
    }
    let mut out: Vec<String> = addrs
        .into_iter()
        .filter(|&ip| usable(ip, family))
        .map(|ip| match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => format!("http://{v4}:{port}"),
                None => format!("http://[{v6}]:{port}"),
            },
            IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// When each discovered URL was last heard. A URL is live from the first
/// answer that names it until `silence` passes without one.
#[derive(Debug)]
pub struct Tracker {
    silence: Duration,
    heard: BTreeMap<String, (Instant, String)>,
}

impl Tracker {
    pub fn new(silence: Duration) -> Tracker {
        Tracker {
            silence,
            heard: BTreeMap::new(),
        }
    }

    /// Records an answer naming `found`; returns whether a URL became live.
    pub fn heard(&mut self, found: impl IntoIterator<Item = Found>, now: Instant) -> bool {
        let mut new = false;
        for f in found {
            new |= self.heard.insert(f.url, (now, f.instance)).is_none();
        }
        new
    }

    /// Forgets URLs silent for `silence` or longer; returns whether any was.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.heard.len();
        let silence = self.silence;
        self.heard
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < silence);
        self.heard.len() != before
    }

    /// Every live URL, in URL order.
    pub fn live(&self) -> Vec<Found> {
        self.heard
            .iter()
            .map(|(url, (_, instance))| Found {
                url: url.clone(),
                instance: instance.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
