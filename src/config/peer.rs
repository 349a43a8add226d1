//! Mesh peer addresses as written in `mesh.peers[].addr`: checked when
//! the config is validated, resolved by [`crate::mesh`] every round.

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
