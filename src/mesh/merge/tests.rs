use super::*;
use crate::config::{env::MapEnv, Config, Source};
use crate::proto::signature::SecretKey;

const NOW: u64 = 1_780_000_000;
const HASH: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

/// `http://a` signed by `key`, `http://open` without keys, `http://f`
/// denying names starting with "secret".
fn upstreams(key: &SecretKey) -> UpstreamSet {
    let toml = format!(
        "[[upstreams]]\nurl = \"http://a\"\npublic_key = \"{}\"\n\
         [[upstreams]]\nurl = \"http://open\"\n\
         [[upstreams]]\nurl = \"http://f\"\n\
         [[upstreams.filters]]\naction = \"deny\"\npattern = \"secret*\"\n",
        key.public().to_nix_string()
    );
    let cfg = Config::from_toml(&toml, Source::Embedded, "t", &MapEnv::new(&[])).unwrap();
    UpstreamSet::from_config(&cfg).unwrap()
}

fn narinfo(key: &SecretKey, name: &str) -> String {
    let mut info = NarInfo::parse(
        format!(
            "StorePath: /nix/store/{HASH}-{name}\nURL: nar/abc.nar.xz\nCompression: xz\n\
             NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 120\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let sig = key.sign(&info.fingerprint());
    info.sigs.push(sig);
    info.render()
}

fn wire(upstream: &str, narinfo: Option<String>) -> WireRoute {
    WireRoute {
        store_path: HASH.into(),
        upstream_url: upstream.into(),
        latency_ms: 20.0,
        latency_ema: 20.0,
        last_verified: NOW as i64 - 10,
        query_count: 1,
        failure_count: 0,
        ttl: NOW as i64 + 600,
        nar_hash: "ignored".into(),
        nar_size: 0,
        nar_url: "ignored".into(),
        narinfo: narinfo.map(String::into_bytes),
    }
}

struct Fixture {
    key: SecretKey,
    set: UpstreamSet,
    routes: RouteTable,
}

impl Fixture {
    fn new() -> Fixture {
        let key = SecretKey::generate("cache-a-1").unwrap();
        let set = upstreams(&key);
        let urls = set.list.iter().map(|u| u.url.clone()).collect();
        Fixture {
            key,
            set,
            routes: RouteTable::new(100, urls, None),
        }
    }

    fn adopt(&self, r: &WireRoute, listed: bool) -> Result<(StoreHash, Arc<RouteEntry>), Skip> {
        let local = Local {
            upstreams: &self.set,
            routes: &self.routes,
            max_ttl: 3600,
        };
        adopt(&local, r, listed, NOW)
    }
}

#[test]
fn a_verified_route_is_adopted_from_its_narinfo_not_its_claims() {
    let f = Fixture::new();
    let (hash, e) = f
        .adopt(&wire("http://a/", Some(narinfo(&f.key, "hello"))), true)
        .unwrap();
    assert_eq!(hash.as_str(), HASH);
    assert_eq!(&*e.upstream, "http://a", "trailing slash normalised");
    // NAR fields come from the verified narinfo, not the route's fields.
    assert_eq!(&*e.nar_url, "nar/abc.nar.xz");
    assert_eq!(e.nar_size, 120);
    assert!(e.nar_hash.starts_with("sha256:1b8m"));
    assert_eq!(
        (e.verified_at, e.expires_at, e.latency_ms),
        (NOW - 10, NOW + 600, 20.0)
    );
    assert!(NarInfo::parse(&e.narinfo).is_ok());
}

#[test]
fn a_peer_cannot_outlive_the_local_ttl_or_date_verification_ahead() {
    let f = Fixture::new();
    let mut r = wire("http://a", Some(narinfo(&f.key, "hello")));
    r.ttl = i64::MAX;
    r.last_verified = i64::MAX;
    let (_, e) = f.adopt(&r, true).unwrap();
    assert_eq!((e.expires_at, e.verified_at), (NOW + 3600, NOW));
}

#[test]
fn unknown_upstream_expired_and_missing_narinfo() {
    let f = Fixture::new();
    let good = narinfo(&f.key, "hello");
    let skip = |r: WireRoute| f.adopt(&r, true).unwrap_err();
    assert_eq!(
        skip(wire("http://elsewhere", Some(good.clone()))),
        Skip::UnknownUpstream
    );
    let mut expired = wire("http://a", Some(good.clone()));
    expired.ttl = NOW as i64;
    assert_eq!(skip(expired), Skip::Expired);
    assert_eq!(skip(wire("http://a", None)), Skip::NoNarinfo);
    let mut bad_hash = wire("http://a", Some(good.clone()));
    bad_hash.store_path = "not-a-hash".into();
    assert_eq!(skip(bad_hash), Skip::Malformed);
    let mut nan = wire("http://a", Some(good));
    nan.latency_ema = f64::NAN;
    assert_eq!(skip(nan), Skip::Malformed);
}

#[test]
fn narinfo_is_checked_like_a_race_winner() {
    let f = Fixture::new();
    let skip = |up: &str, n: String, listed| f.adopt(&wire(up, Some(n)), listed).unwrap_err();
    let forger = SecretKey::generate("cache-a-1").unwrap();
    assert_eq!(
        skip("http://a", narinfo(&forger, "x"), true),
        Skip::BadSignature
    );
    let unsigned = narinfo(&f.key, "x")
        .lines()
        .filter(|l| !l.starts_with("Sig:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(skip("http://a", unsigned, true), Skip::BadSignature);
    let other_path = narinfo(&f.key, "x").replace(HASH, "1mdqa9w1p6cmli6976v4wi0sw9r4p5pr");
    assert_eq!(skip("http://a", other_path, true), Skip::BadNarinfo);
    assert_eq!(skip("http://a", "garbage".into(), true), Skip::BadNarinfo);
    assert_eq!(
        skip("http://f", narinfo(&f.key, "secret-x"), true),
        Skip::BadNarinfo
    );
    assert!(f
        .adopt(&wire("http://f", Some(narinfo(&f.key, "public-x"))), true)
        .is_ok());
    // A keyless upstream: only a listed peer's word counts.
    assert!(f
        .adopt(&wire("http://open", Some(narinfo(&forger, "x"))), true)
        .is_ok());
    assert_eq!(
        skip("http://open", narinfo(&forger, "x"), false),
        Skip::Unverifiable
    );
}

#[test]
fn merge_rule_lower_ema_wins_then_newer_verification() {
    let f = Fixture::new();
    let n = narinfo(&f.key, "hello");
    let (hash, e) = f.adopt(&wire("http://a", Some(n.clone())), true).unwrap();
    f.routes.insert_from_peer(hash, e);
    let try_with = |ema: f64, verified: i64| {
        let mut r = wire("http://a", Some(n.clone()));
        r.latency_ema = ema;
        r.last_verified = verified;
        f.adopt(&r, true).map(|_| ())
    };
    let v = NOW as i64 - 10;
    assert_eq!(
        try_with(20.0, v),
        Err(Skip::NotBetter),
        "the same route again"
    );
    assert_eq!(
        try_with(25.0, v + 5),
        Err(Skip::NotBetter),
        "slower, even if newer"
    );
    assert_eq!(try_with(20.0, v - 1), Err(Skip::NotBetter), "tie, older");
    assert_eq!(try_with(20.0, v + 1), Ok(()), "tie, newer");
    assert_eq!(try_with(19.5, v - 100), Ok(()), "faster, even if older");
    // f64 noise below f32 precision is a tie, not an improvement.
    assert_eq!(try_with(20.000_000_1, v), Err(Skip::NotBetter));
}

#[test]
fn wins_is_the_documented_rule() {
    assert!(wins(9.0, 0, 10.0, 100));
    assert!(!wins(11.0, 1000, 10.0, 100));
    assert!(wins(10.0, 101, 10.0, 100));
    assert!(!wins(10.0, 100, 10.0, 100));
}
