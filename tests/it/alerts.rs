//! The Prometheus alert rules in packaging/prometheus: `promtool check
//! rules` and `promtool test rules` pass (skipped with a note where
//! promtool is missing, a failure under `CI=true`), and every metric and
//! label the rules select is in the real binary's `/metrics`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fake::FakeUpstream;
use crate::harness::{test_config, NcroProcess};
use crate::metrics::scrape;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus")
}

/// Whether promtool can run; without it the test is skipped with a note,
/// except under `CI=true`, where .ci/run installs it (package prometheus).
fn promtool_present() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing under CI=true (.ci/run installs the prometheus package)"
        );
        eprintln!("note: promtool not found; skipping the promtool checks of the alert rules");
    }
    found
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    if !promtool_present() {
        return;
    }
    for args in [
        ["check", "rules", "ncro-alerts.yml"],
        ["test", "rules", "ncro-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir())
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `ncro_*` names in the rules' `expr:` lines (and their continuations).
fn rule_metric_names(rules: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = rules;
    while let Some(i) = rest.find("ncro_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_metric_the_alert_rules_use_is_exported() {
    let rules = std::fs::read_to_string(dir().join("ncro-alerts.yml")).expect("rules file");
    // Only expressions: comments and annotations may mention other words.
    let exprs: String = rules
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with('#') && !t.starts_with("summary:") && !t.starts_with("description:")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let names = rule_metric_names(&exprs);
    assert!(names.len() >= 6, "{names:?}");
    let up = FakeUpstream::builder().cache_info(40).start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(
        "127.0.0.1:0",
        &[(&up.url(), 10, "")],
        &dir.path().join("r.db"),
    );
    let ncro = NcroProcess::start(&cfg);
    let m = scrape(&ncro);
    let missing: Vec<_> = names.iter().filter(|n| !m.has_metric(n)).collect();
    assert!(
        missing.is_empty(),
        "alert rules use unknown metrics {missing:?}"
    );
    // The label values the rules select exist too.
    let url = up.url();
    assert_eq!(
        m.get(
            "ncro_upstream_health_state",
            &[("upstream", url.as_str()), ("state", "down")]
        ),
        Some(0.0),
        "a healthy upstream exports state=\"down\" as 0, so min() over upstreams works"
    );
    for reason in ["queue_full", "wait_timeout"] {
        assert!(
            m.get("ncro_narinfo_shed_total", &[("reason", reason)])
                .is_some(),
            "shed reason {reason}"
        );
    }
}

#[test]
fn rule_name_extraction() {
    let names = rule_metric_names("expr: sum(rate(ncro_a_total[5m])) / ncro_b{x=\"ncro_c\"}");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["ncro_a_total", "ncro_b", "ncro_c"]
    );
}
