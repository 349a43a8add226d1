use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::proto::store_path::StoreHash;
use crate::route::RouteEntry;
use crate::upstream::UpstreamSet;

fn set_with_room() -> UpstreamSet {
    let cfg = Config::from_toml(
        "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\npriority = 10\n",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .unwrap();
    let mut set = UpstreamSet::from_config(&cfg).unwrap();
    set.reserve_discovered(1);
    set
}

fn summary_for(up: &Upstream) -> Option<Arc<Summary>> {
    let now = Instant::now();
    Some(Arc::new(Summary {
        upstream: up.url.clone(),
        bloom: BloomBuilder::new(0, 0.01).finish(),
        source: SummarySource::NixBloom,
        fetched_at: now,
        fresh_until: now + Duration::from_secs(60),
    }))
}

#[test]
fn retired_and_reused_slots_lose_their_summary() {
    let mut set = set_with_room();
    set.discover("http://127.0.0.1:9", 20).unwrap();
    let (mut tracked, mut current) = (Vec::new(), Vec::new());
    reconcile(&mut tracked, &mut current, &set);
    assert_eq!(tracked.len(), 2);
    current = vec![summary_for(&set.list[0]), summary_for(&set.list[1])];
    reconcile(&mut tracked, &mut current, &set);
    assert!(current.iter().all(Option::is_some), "same upstreams: kept");
    set.retire("http://127.0.0.1:9", Instant::now());
    reconcile(&mut tracked, &mut current, &set);
    assert!(current[0].is_some());
    assert!(
        current[1].is_none() && tracked[1].is_none(),
        "retired: dropped"
    );
    // The only reserved slot goes to another URL.
    set.discover("http://127.0.0.1:10", 20).unwrap();
    assert_eq!(&*set.list[1].url, "http://127.0.0.1:10");
    current[1] = summary_for(&set.list[0]); // a stale entry for the slot
    reconcile(&mut tracked, &mut current, &set);
    assert!(
        current[1].is_none(),
        "a new upstream starts without a summary"
    );
    assert!(Arc::ptr_eq(
        &tracked[1].as_ref().unwrap().upstream,
        &set.list[1].url
    ));
}

fn hash(i: u32) -> StoreHash {
    let s: String = (0..32)
        .map(|k| {
            let d = (i.wrapping_mul(2_654_435_761) >> (k % 27)) as usize % 32;
            char::from(crate::proto::store_path::NIX_BASE32_ALPHABET[d])
        })
        .collect();
    StoreHash::parse(s.as_bytes()).unwrap()
}

#[test]
fn published_filter_holds_every_live_route_and_nothing_else_much() {
    let routes = Arc::new(RouteTable::new(10_000, vec!["http://a".into()], None));
    let now = crate::worker::unix_now();
    for i in 0..2000 {
        routes.insert(
            hash(i),
            Arc::new(RouteEntry {
                upstream: "http://a".into(),
                narinfo: Bytes::from_static(b"x"),
                nar_url: format!("nar/{i}").into(),
                nar_hash: "sha256:x".into(),
                nar_size: 1,
                expires_at: now + 3600,
                verified_at: now,
                latency_ms: 1.0,
            }),
        );
    }
    routes.insert_negative(hash(5000), now + 3600);
    let cfg = crate::config::Config::from_toml(
        "[[upstreams]]\nurl = \"http://a\"\n[index]\npublish = true\n",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .unwrap();
    let p = Publisher::new(&cfg.index, routes, Arc::new(IndexState::new(1))).build();
    assert_eq!(p.routes, 2000);
    let bloom = Bloom::parse(p.body.clone()).unwrap();
    assert!((0..2000).all(|i| bloom.may_contain(Probe::of(&hash(i)))));
    let fp = (10_000..20_000)
        .filter(|&i| bloom.may_contain(Probe::of(&hash(i))))
        .count();
    assert!(fp < 300, "{fp} false positives in 10 000 at 1 %");
    assert!(p.etag.starts_with('"') && p.etag.len() == 18, "{}", p.etag);
}
