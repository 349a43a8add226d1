use std::time::Duration;

use super::*;
use crate::http::client::Origin;
use crate::proto::nixbloom::BloomBuilder;
use crate::proto::store_path::StoreHash;

fn upstream(url: &str) -> Upstream {
    Upstream {
        url: Arc::from(url),
        origin: Origin::parse(url, None).unwrap(),
        s3: None,
        priority: 10,
        keys: Vec::new(),
        filters: Vec::new(),
        narinfo_timeout: None,
        host: "".into(),
        storage: None,
        nar: Default::default(),
    }
}

fn hash(s: &str) -> StoreHash {
    StoreHash::parse(s.as_bytes()).unwrap()
}

const MEMBER: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
const OTHER: &str = "kpcd173cq987hw957sx6m0868wv3x6d9";

fn summary(up: &Upstream, members: &[&str], at: Instant, max_age: Duration) -> Arc<Summary> {
    let mut b = BloomBuilder::new(1000, 0.001);
    members.iter().for_each(|h| b.insert(Probe::of(&hash(h))));
    Arc::new(Summary {
        upstream: up.url.clone(),
        bloom: b.finish(),
        source: SummarySource::NixBloom,
        fetched_at: at,
        fresh_until: at + max_age,
    })
}

#[test]
fn only_a_fresh_summary_of_the_same_upstream_rules_a_path_out() {
    let (a, b) = (
        upstream("http://127.0.0.1:1"),
        upstream("http://127.0.0.1:2"),
    );
    let t0 = Instant::now();
    let age = Duration::from_secs(60);
    let set = SummarySet::new(vec![Some(summary(&a, &[MEMBER], t0, age)), None]);
    let (member, other) = (Probe::of(&hash(MEMBER)), Probe::of(&hash(OTHER)));
    assert!(set.definitely_absent(0, &a, other, t0));
    assert!(
        !set.definitely_absent(0, &a, member, t0),
        "members are never ruled out"
    );
    assert!(!set.definitely_absent(1, &b, other, t0), "no summary: ask");
    assert!(
        !set.definitely_absent(7, &b, other, t0),
        "slot beyond the set: ask"
    );
    assert!(
        !set.definitely_absent(0, &a, other, t0 + age),
        "stale from fresh_until on: ask"
    );
    // The same URL in a new `Upstream` (a revived or reused slot) is
    // another life of the slot: the old summary does not apply.
    let revived = upstream("http://127.0.0.1:1");
    assert!(!set.definitely_absent(0, &revived, other, t0));
    assert!(set.get(0).is_some() && set.get(1).is_none());
    assert!(!set.is_empty());
    assert!(SummarySet::new(vec![None, None]).is_empty());
}

#[test]
fn refresh_errors_are_counted_per_slot_and_kind() {
    let s = IndexState::new(2);
    s.count_error(1, RefreshErrorKind::Parse);
    s.count_error(1, RefreshErrorKind::Parse);
    s.count_error(5, RefreshErrorKind::Fetch); // out of range: ignored
    assert_eq!(s.errors(1, RefreshErrorKind::Parse), 2);
    assert_eq!(s.errors(0, RefreshErrorKind::Parse), 0);
    assert_eq!(s.errors(5, RefreshErrorKind::Fetch), 0);
    let labels: Vec<_> = RefreshErrorKind::ALL.iter().map(|k| k.label()).collect();
    assert_eq!(
        labels,
        ["fetch", "status", "parse", "too_large", "inconsistent"]
    );
    for (i, k) in RefreshErrorKind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i, "ALL is in discriminant order");
    }
}

#[test]
fn published_filter_is_swapped_whole() {
    let s = IndexState::new(1);
    assert!(s.published().is_none());
    s.publish_filter(Published {
        body: Bytes::from_static(b"x"),
        etag: "\"1\"".into(),
        routes: 1,
    });
    assert_eq!(s.published().unwrap().routes, 1);
}
