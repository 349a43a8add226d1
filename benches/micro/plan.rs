//! Planning one race (`Routing::plan_race`: health snapshot load, cooldown
//! checks, the candidate list, the hedge delay) for three upstreams in two
//! tiers, all up. Baseline: building the same three-candidate `Vec`, the
//! allocation every plan makes.
//!
//! `index_*`: the plan a narinfo miss builds with index-aware routing
//! (`serve::narinfo::plan_with_index`: the summary snapshot load, the
//! hash's two probe words, and per upstream a pointer and `Instant`
//! compare plus up to k = 7 bit tests), against `ncro` as baseline. Each
//! upstream has a 1 %-filter of 1 M paths (1.2 MB, so bit tests miss the
//! cache as they would in production); `none` has no summaries at all,
//! `maybe` asks for paths all three filters hold, `absent` for paths none
//! holds (all three skipped, apart from false positives).

use std::cell::Cell;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use divan::{black_box, Bencher};
use ncro::config::{env::MapEnv, Config, Source};
use ncro::index::{IndexState, Summary, SummarySet, SummarySource};
use ncro::proto::nixbloom::{BloomBuilder, Probe};
use ncro::proto::store_path::StoreHash;
use ncro::race::Candidate;
use ncro::upstream::health::{HealthSnapshot, UpstreamHealth};
use ncro::upstream::{RacePlan, Routing, UpstreamSet};

const CONFIG: &str = "[[upstreams]]\nurl = \"http://10.0.0.1:5000\"\npriority = 10\n\
    [[upstreams]]\nurl = \"http://10.0.0.2:5000\"\npriority = 20\n\
    [[upstreams]]\nurl = \"http://10.0.0.3:5000\"\npriority = 20\n";

pub struct Fixture {
    pub set: UpstreamSet,
    pub routing: Routing,
    no_summaries: IndexState,
    summaries: IndexState,
    members: Vec<StoreHash>,
    others: Vec<StoreHash>,
}

/// Paths in each upstream's filter.
const PATHS: u64 = 1_000_000;
/// Hashes the benches cycle through.
const SAMPLES: u64 = 4096;

fn hash(seed: u64) -> StoreHash {
    StoreHash::parse(crate::fake_base32(seed, 32).as_bytes()).expect("fake hash is base32")
}

pub static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let env = MapEnv::new(&[]);
    let cfg = Config::from_toml(CONFIG, Source::Embedded, "bench", &env).expect("config");
    let set = UpstreamSet::from_config(&cfg).expect("set");
    let now = Instant::now();
    let table: Vec<_> = [10.0, 30.0, 20.0]
        .iter()
        .map(|&ema| UpstreamHealth::restored(ema, 0, 1, now))
        .collect();
    let snap = HealthSnapshot::build_present(&set.priorities(), &table, |i| set.is_live(i));
    let routing = Routing::new(&set, &cfg, snap).0;
    let members: Vec<StoreHash> = (0..SAMPLES).map(hash).collect();
    let others: Vec<StoreHash> = (0..SAMPLES).map(|i| hash(i + 10 * PATHS)).collect();
    let summaries = IndexState::new(set.len());
    let by_slot = set
        .list
        .iter()
        .map(|up| {
            // The sampled members plus the rest of the 1 M paths.
            let mut b = BloomBuilder::new(PATHS, 0.01);
            members.iter().for_each(|h| b.insert(Probe::of(h)));
            (SAMPLES..PATHS).for_each(|i| b.insert(Probe::of(&hash(i + PATHS))));
            Some(Arc::new(Summary {
                upstream: up.url.clone(),
                bloom: b.finish(),
                source: SummarySource::NixBloom,
                fetched_at: now,
                fresh_until: now + Duration::from_secs(86_400),
            }))
        })
        .collect();
    summaries.publish_summaries(SummarySet::new(by_slot));
    Fixture {
        no_summaries: IndexState::new(set.len()),
        summaries,
        members,
        others,
        set,
        routing,
    }
});

thread_local! {
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

fn next(of: &[StoreHash]) -> StoreHash {
    NEXT.with(|n| {
        let i = (n.get() + 409) % of.len();
        n.set(i);
        of[i]
    })
}

/// What `serve::narinfo::plan_with_index` does, minus the metric counter.
fn plan_with_index(state: &IndexState, hash: StoreHash) -> RacePlan {
    let f = &*FIXTURE;
    let now = Instant::now();
    let summaries = state.summaries();
    if summaries.is_empty() {
        return f.routing.plan_race(&f.set, now);
    }
    let probe = Probe::of(&hash);
    f.routing.plan_race_skipping(&f.set, now, |i, up| {
        summaries.definitely_absent(i, up, probe, now)
    })
}

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

#[divan::bench(sample_size = 2000)]
fn index_none(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher
        .with_inputs(|| next(&f.members))
        .bench_values(|h| plan_with_index(&f.no_summaries, h).candidates.len());
}

#[divan::bench(sample_size = 2000)]
fn index_maybe(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher
        .with_inputs(|| next(&f.members))
        .bench_values(|h| plan_with_index(&f.summaries, h).candidates.len());
}

#[divan::bench(sample_size = 2000)]
fn index_absent(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher
        .with_inputs(|| next(&f.others))
        .bench_values(|h| plan_with_index(&f.summaries, h).index_skipped);
}
