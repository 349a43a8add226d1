use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

fn found(url: &str) -> Found {
    Found {
        url: url.into(),
        instance: "c._nix-serve._tcp.local.".into(),
    }
}

#[test]
fn every_routable_address_becomes_a_url_ipv6_bracketed() {
    let addrs = ["10.0.0.5", "fd00::5", "192.168.1.5", "10.0.0.5"].map(ip);
    assert_eq!(
        urls(5000, addrs, AddressFamily::Any),
        [
            "http://10.0.0.5:5000",
            "http://192.168.1.5:5000",
            "http://[fd00::5]:5000"
        ]
    );
    assert_eq!(
        urls(0, addrs, AddressFamily::Any),
        Vec::<String>::new(),
        "no port"
    );
}

#[test]
fn address_family_keeps_one_family() {
    let addrs = ["10.0.0.5", "2001:db8::5"].map(ip);
    assert_eq!(urls(80, addrs, AddressFamily::Ipv4), ["http://10.0.0.5:80"]);
    assert_eq!(
        urls(80, addrs, AddressFamily::Ipv6),
        ["http://[2001:db8::5]:80"]
    );
    // An IPv4-mapped IPv6 address is the IPv4 host.
    assert_eq!(
        urls(80, [ip("::ffff:10.0.0.7")], AddressFamily::Ipv4),
        ["http://10.0.0.7:80"]
    );
}

#[test]
fn unreachable_addresses_are_skipped() {
    for bad in [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "0.0.0.0",
        "::",
        "224.0.0.251",
        "ff02::fb",
        "255.255.255.255",
        "fe80::1",
        "::ffff:127.0.0.1",
    ] {
        assert!(!usable(ip(bad), AddressFamily::Any), "{bad}");
    }
    assert!(
        usable(ip("169.254.3.4"), AddressFamily::Any),
        "IPv4 link-local needs no scope"
    );
}

#[test]
fn a_url_lives_until_three_silent_rounds_pass() {
    let round = Duration::from_secs(5);
    let t0 = Instant::now();
    let mut t = Tracker::new(3 * round);
    assert!(t.heard([found("http://10.0.0.5:80")], t0));
    assert!(
        !t.heard([found("http://10.0.0.5:80")], t0 + round),
        "already live"
    );
    // Still answering every round: never expires, however long it runs.
    for n in 2..100 {
        assert!(!t.expire(t0 + round * n - Duration::from_millis(1)));
        t.heard([found("http://10.0.0.5:80")], t0 + round * n);
    }
    let last = t0 + round * 99;
    assert!(!t.expire(last + 3 * round - Duration::from_millis(1)));
    assert_eq!(t.live().len(), 1);
    assert!(t.expire(last + 3 * round));
    assert!(t.live().is_empty());
    assert!(
        t.heard([found("http://10.0.0.5:80")], last + 4 * round),
        "back again"
    );
}

#[test]
fn addresses_of_one_instance_expire_separately() {
    let t0 = Instant::now();
    let mut t = Tracker::new(Duration::from_secs(15));
    t.heard(
        [found("http://10.0.0.5:80"), found("http://10.0.0.6:80")],
        t0,
    );
    t.heard([found("http://10.0.0.6:80")], t0 + Duration::from_secs(10));
    assert!(t.expire(t0 + Duration::from_secs(15)));
    let live: Vec<_> = t.live().into_iter().map(|f| f.url).collect();
    assert_eq!(
        live,
        ["http://10.0.0.6:80"],
        "the address it stopped announcing is gone"
    );
}
