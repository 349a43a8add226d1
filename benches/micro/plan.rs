//! Planning one race (`Routing::plan_race`: health snapshot load, cooldown
//! checks, the candidate list, the hedge delay) for three upstreams in two
//! tiers, all up. Baseline: building the same three-candidate `Vec`, the
//! allocation every plan makes.

use std::sync::LazyLock;
use std::time::Instant;

use divan::black_box;
use ncro::config::{env::MapEnv, Config, Source};
use ncro::race::Candidate;
use ncro::upstream::health::{HealthSnapshot, UpstreamHealth};
use ncro::upstream::{Routing, UpstreamSet};

const CONFIG: &str = "[[upstreams]]\nurl = \"http://10.0.0.1:5000\"\npriority = 10\n\
    [[upstreams]]\nurl = \"http://10.0.0.2:5000\"\npriority = 20\n\
    [[upstreams]]\nurl = \"http://10.0.0.3:5000\"\npriority = 20\n";

pub struct Fixture {
    pub set: UpstreamSet,
    pub routing: Routing,
}

pub static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let env = MapEnv::new(&[]);
    let cfg = Config::from_toml(CONFIG, Source::Embedded, "bench", &env).expect("config");
    let (set, _) = UpstreamSet::from_config(&cfg).expect("set");
    let now = Instant::now();
    let table: Vec<_> = [10.0, 30.0, 20.0]
        .iter()
        .map(|&ema| UpstreamHealth::restored(ema, 0, 1, now))
        .collect();
    let snap = HealthSnapshot::build_present(&set.priorities(), &table, |i| set.is_live(i));
    let routing = Routing::new(&set, &cfg, snap).0;
    Fixture { set, routing }
});

pub fn warm() {
    LazyLock::force(&FIXTURE);
}

#[divan::bench(sample_size = 2000)]
fn ncro() -> usize {
    let f = &*FIXTURE;
    f.routing.plan_race(&f.set, Instant::now()).candidates.len()
}

#[divan::bench(sample_size = 2000)]
fn baseline_three_candidates() -> usize {
    let v: Vec<Candidate> = (0..3)
        .map(|i| Candidate {
            upstream: black_box(i),
            priority: 10,
        })
        .collect();
    black_box(v).len()
}
