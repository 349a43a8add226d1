//! Replays the committed fuzz regressions (fuzz/regressions/<target>/) through the
//! same bodies the cargo-fuzz targets run, on stable Rust, so every input
//! the fuzzer kept (and every crash reproducer added to a corpus) is
//! checked on each `cargo test`.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

/// Runs every file of one target's corpus; reports all failing files, not
/// just the first, so one run shows the whole damage.
fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for path in &entries {
        let data = std::fs::read(path).expect("read corpus file");
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
}

#[test]
fn every_target_has_a_corpus_test() {
    let names: Vec<&str> = checks::TARGETS.iter().map(|(n, _)| *n).collect();
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for entry in std::fs::read_dir(targets).expect("fuzz_targets dir") {
        let path = entry.expect("entry").path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        assert!(names.contains(&stem), "target {stem} missing from TARGETS");
    }
}

macro_rules! corpus_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            replay(stringify!($name), checks::$name);
        }
    )*};
}

corpus_tests!(
    http_request,
    chunked,
    narinfo,
    signature,
    cache_info,
    base32,
    config,
    store_path,
    side_paths,
    mesh_packet,
    nixbloom,
    cache_index,
    content_address,
);
