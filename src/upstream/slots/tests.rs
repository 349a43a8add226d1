use super::*;
use crate::config::Config;

/// Configured: `http://10.0.0.1:5000` (slot 0) and `http://[fd00::1]:80`
/// (slot 1); `reserved` discovered slots.
fn set(reserved: usize) -> UpstreamSet {
    let cfg = Config::from_toml(
        "[[upstreams]]\nurl = \"http://10.0.0.1:5000\"\npriority = 10\n\
         [[upstreams]]\nurl = \"http://[FD00:0::1]\"\npriority = 10\n",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    let mut set = UpstreamSet::from_config(&cfg).expect("set");
    set.reserve_discovered(reserved);
    set
}

#[test]
fn discovered_upstreams_take_the_next_slots_and_keep_them() {
    let mut s = set(4);
    assert_eq!(s.capacity(), 6);
    assert_eq!(
        s.discover("http://10.0.0.9:5000", 20).unwrap(),
        Joined::Added(2)
    );
    assert_eq!(
        s.discover("http://10.0.0.9:5000", 20).unwrap(),
        Joined::Live(2)
    );
    assert_eq!(
        s.discover("http://[fd00::9]:5000", 20).unwrap(),
        Joined::Added(3)
    );
    assert_eq!(s.live(2).map(|u| u.priority), Some(20));
    assert_eq!(s.discovered_len(), 2);
    assert_eq!((s.len(), s.live_len()), (4, 4));
}

#[test]
fn a_retired_upstream_keeps_its_slot_and_gets_it_back() {
    let mut s = set(4);
    s.discover("http://10.0.0.9:5000", 20).unwrap();
    let before = s.clone();
    assert_eq!(s.retire("http://10.0.0.9:5000", Instant::now()), Some(2));
    assert!(s.live(2).is_none(), "retired slots are not routed to");
    assert_eq!(s.index_of("http://10.0.0.9:5000"), Some(2), "still known");
    assert_eq!((s.len(), s.live_len(), s.discovered_len()), (3, 2, 0));
    assert!(before.live(2).is_some(), "an older snapshot is untouched");
    assert_eq!(
        s.discover("http://10.0.0.9:5000", 30).unwrap(),
        Joined::Revived(2)
    );
    assert_eq!(s.live(2).map(|u| u.priority), Some(30));
}

#[test]
fn configured_upstreams_are_never_replaced_or_retired() {
    let mut s = set(4);
    for (url, slot) in [
        ("http://10.0.0.1:5000", 0),
        ("http://[fd00::1]:80", 1),
        ("http://[fd00::1]", 1),
    ] {
        assert_eq!(
            s.discover(url, 20).unwrap(),
            Joined::Configured(slot),
            "{url}"
        );
    }
    assert_eq!(
        s.discover("http://10.0.0.1:5001", 20).unwrap(),
        Joined::Added(2)
    );
    assert_eq!(s.retire("http://10.0.0.1:5000", Instant::now()), None);
    assert_eq!(s.live(0).map(|u| u.priority), Some(10));
}

#[test]
fn a_full_set_recycles_the_longest_retired_slot_or_refuses() {
    let mut s = set(2);
    let t0 = Instant::now();
    s.discover("http://10.0.0.8:1", 20).unwrap();
    s.discover("http://10.0.0.9:1", 20).unwrap();
    assert_eq!(s.discover("http://10.0.0.7:1", 20).unwrap(), Joined::Full);
    s.retire("http://10.0.0.9:1", t0);
    s.retire("http://10.0.0.8:1", t0 + std::time::Duration::from_secs(1));
    let joined = s.discover("http://10.0.0.7:1", 20).unwrap();
    assert_eq!(
        joined,
        Joined::Recycled {
            slot: 3,
            replaced: Arc::from("http://10.0.0.9:1")
        }
    );
    assert_eq!(s.index_of("http://10.0.0.9:1"), None);
    assert_eq!(s.index_of("http://10.0.0.7:1"), Some(3));
    assert_eq!(s.len(), 4, "no slot beyond the capacity");
}

#[test]
fn live_urls_are_the_metric_labels() {
    let mut s = set(2);
    s.discover("http://10.0.0.9:1", 20).unwrap();
    s.retire("http://10.0.0.9:1", Instant::now());
    let urls: Vec<_> = s
        .live_urls()
        .into_iter()
        .map(|(i, u)| (i, u.to_string()))
        .collect();
    assert_eq!(
        urls,
        [
            (0, "http://10.0.0.1:5000".into()),
            (1, "http://[FD00:0::1]".into())
        ]
    );
}
