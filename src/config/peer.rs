//! Mesh peer addresses as written in `mesh.peers[].addr`: checked when
//! the config is validated, resolved by [`crate::mesh`] every round.

use super::raw::RawMesh;
use super::{invalid, ConfigError};

/// `host:port`, `[v6]:port`; the host is not resolved here.
pub fn parse_peer_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.trim().rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.parse::<std::net::Ipv6Addr>().ok()?;
            v6
        }
        // An IPv6 literal needs brackets: its last colon is ambiguous.
        None if host.contains([':', '[', ']']) => return None,
        None => host,
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_owned(), port))
}

/// `[mesh]`: peers, keys and addresses as written.
pub fn validate_mesh(m: &RawMesh) -> Result<(), ConfigError> {
    if m.enabled && m.peers.is_empty() {
        return Err(invalid("mesh.enabled is true but no peers configured"));
    }
    if m.gossip_interval.0.is_zero() {
        return Err(invalid("mesh.gossip_interval must be positive"));
    }
    if m.replay_window.0.is_zero() {
        return Err(invalid("mesh.replay_window must be positive"));
    }
    if m.enabled {
        m.bind_addr
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid(format!("mesh.bind_addr {:?}: {e}", m.bind_addr)))?;
    }
    for (i, p) in m.peers.iter().enumerate() {
        if p.addr.trim().is_empty() {
            return Err(invalid(format!("mesh.peers[{i}]: addr is empty")));
        }
        if m.enabled && parse_peer_addr(&p.addr).is_none() {
            return Err(invalid(format!(
                "mesh.peers[{i}]: addr {:?} must be host:port (an IPv6 address in brackets: [fd00::1]:7946)",
                p.addr
            )));
        }
        let key_ok = p.public_key.is_empty()
            || hex::decode(&p.public_key)
                .map(|b| b.len() == 32)
                .unwrap_or(false);
        if !key_ok {
            return Err(invalid(format!(
                "mesh.peers[{i}]: public_key must be a hex-encoded 32-byte ed25519 key"
            )));
        }
        if m.enabled && p.public_key.is_empty() && !m.allow_unauthenticated {
            return Err(invalid(format!(
                "mesh.peers[{i}]: public_key is required when mesh is enabled (or set mesh.allow_unauthenticated = true)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses() {
        let ok =
            |s: &str, h: &str, p: u16| assert_eq!(parse_peer_addr(s), Some((h.into(), p)), "{s}");
        ok("b:7946", "b", 7946);
        ok("10.0.0.2:7946", "10.0.0.2", 7946);
        ok("[fd00::2]:7946", "fd00::2", 7946);
        ok(" node.example:1 ", "node.example", 1);
        for bad in [
            "b",
            "b:",
            ":7946",
            "b:0",
            "b:70000",
            "fd00::2:7946",
            "[b:1",
            "[]:1",
        ] {
            assert_eq!(parse_peer_addr(bad), None, "{bad}");
        }
    }
}
