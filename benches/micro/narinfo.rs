//! `NarInfo::parse` (typed fields, validated) against the untyped map the
//! predecessor (ncro 2.2) built: lines split on ": " into owned strings.

use std::collections::HashMap;
use std::sync::LazyLock;

use divan::black_box;
use ncro::proto::narinfo::NarInfo;

static BODY: LazyLock<String> = LazyLock::new(|| {
    let mut info = crate::sample_narinfo();
    info.sigs
        .push(format!("cache.example.org-1:{}", crate::fake_base32(5, 88)));
    info.render()
});

pub fn warm() {
    LazyLock::force(&BODY);
}

#[divan::bench(sample_size = 100)]
fn ncro() -> NarInfo {
    NarInfo::parse(black_box(BODY.as_bytes())).expect("sample narinfo parses")
}

#[divan::bench(sample_size = 100)]
fn baseline_lines_into_hashmap() -> HashMap<String, String> {
    black_box(BODY.as_str())
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
