//! The upstream set snapshot a race or NAR request takes: `Upstreams::load`
//! (an `ArcSwap` load plus the `Arc` it hands out; discovery may replace the
//! set) against what it replaced, cloning the one `Arc<UpstreamSet>` built
//! at start. Also the route-cache hit's check for a DOWN upstream, with
//! every upstream up (one relaxed load) and with a retired discovered
//! upstream in the set (snapshot loads and a URL lookup on every hit).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use divan::black_box;
use ncro::config::{env::MapEnv, Config, Source};
use ncro::upstream::health::{HealthSnapshot, UpstreamHealth};
use ncro::upstream::{Routing, UpstreamSet, Upstreams};

const CONFIG: &str = "[[upstreams]]\nurl = \"https://cache.nixos.org\"\npriority = 10\n\
    [[upstreams]]\nurl = \"http://10.0.0.2:5000\"\npriority = 20\n";
const ROUTED: &str = "https://cache.nixos.org";

struct Fixture {
    upstreams: Upstreams,
    arc: Arc<UpstreamSet>,
    all_up: Routing,
    one_retired: (Routing, Upstreams),
}

fn routing(cfg: &Config, set: &UpstreamSet) -> Routing {
    let now = Instant::now();
    let table = vec![UpstreamHealth::restored(10.0, 0, 1, now); set.len()];
    let snap = HealthSnapshot::build_present(&set.priorities(), &table, |i| set.is_live(i));
    Routing::new(set, cfg, snap).0
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let env = MapEnv::new(&[]);
    let cfg = Config::from_toml(CONFIG, Source::Embedded, "bench", &env).expect("config");
    let mut set = UpstreamSet::from_config(&cfg).expect("set");
    set.reserve_discovered(8);
    let all_up = routing(&cfg, &set);
    let mut retired = set.clone();
    retired.discover("http://10.0.0.9:5000", 20).expect("url");
    retired.retire("http://10.0.0.9:5000", Instant::now());
    Fixture {
        upstreams: Upstreams::new(set.clone()),
        arc: Arc::new(set),
        all_up,
        one_retired: (routing(&cfg, &retired), Upstreams::new(retired)),
    }
});

pub fn warm() {
    LazyLock::force(&FIXTURE);
}

#[divan::bench(sample_size = 2000, threads = [1, 2])]
fn ncro() -> Arc<UpstreamSet> {
    FIXTURE.upstreams.load()
}

#[divan::bench(sample_size = 2000, threads = [1, 2])]
fn baseline_arc_clone() -> Arc<UpstreamSet> {
    black_box(&FIXTURE.arc).clone()
}

#[divan::bench(sample_size = 2000)]
fn route_check_all_up() -> bool {
    let f = &*FIXTURE;
    f.all_up.route_is_down(&f.upstreams, black_box(ROUTED))
}

#[divan::bench(sample_size = 2000)]
fn route_check_one_retired() -> bool {
    let (routing, upstreams) = &FIXTURE.one_retired;
    routing.route_is_down(upstreams, black_box(ROUTED))
}
