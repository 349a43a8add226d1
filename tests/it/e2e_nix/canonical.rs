//! The real Nix client substituting through ncro with canonical NAR URLs
//! (`nar_url_mode = "to_self"`, the default): the narinfos it reads name
//! `nar/<store hash><ext>`, so every NAR it downloads is a canonical
//! request, which ncro serves from the routing cache at that cache's real
//! file name. Caches A, B and C hold the diamond closure `app_ab` with
//! different compressions, so another cache's file is never the promised
//! one unless its narinfo proves it.

use super::{caches, fetch, serve, store_hash, summary, Report};
use crate::harness::{test_config, NcroProcess};

#[test]
fn nix_client_substitutes_through_canonical_nar_urls() {
    let c = caches();
    let served = serve(c, "canonical");
    let db = tempfile::tempdir().expect("tempdir");
    let ups: Vec<(&str, i32, &str)> = (0..3)
        .map(|i| (served.urls[i].as_str(), 50, c.keys[i].as_str()))
        .collect();
    let config = test_config("127.0.0.1:0", &ups, &db.path().join("routes.db"));
    assert!(
        !config.contains("nar_url_mode"),
        "the default mode is under test"
    );
    let ncro = NcroProcess::try_start(&config).unwrap_or_else(|e| panic!("start ncro: {e}"));
    let roles = ["app_ab", "split_top", "large_a"];
    let mut report = Report::default();
    for role in roles {
        let hash = store_hash(c.role(role));
        let r = ncro
            .request("GET", &format!("/{hash}.narinfo"), &[])
            .expect("narinfo");
        let url = r
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
            .unwrap_or_default();
        let canonical = url.starts_with(&format!("nar/{hash}.nar"));
        report.step(
            role,
            r.status == 200 && canonical,
            &format!("URL: {url}"),
            &r.text(),
        );
    }
    let keys = c.keys.join(" ");
    let paths: Vec<&str> = roles.iter().map(|r| c.role(r)).collect();
    let run = fetch(
        &c.scripts,
        &ncro.url(),
        &keys,
        &paths,
        &[],
        &db.path().join("fetch.log"),
    );
    report.step(
        "substitute",
        run.code == Some(0),
        &summary(&run),
        &run.output,
    );
    // No cache was ever asked for a canonical name: ncro translated each
    // one into the routing cache's own file name.
    let mut asked_canonical = Vec::new();
    let mut all_nar_requests = 0;
    for cache in ["A", "B", "C"] {
        let log = std::fs::read_to_string(served.root.join(format!("serve/{cache}.log")))
            .unwrap_or_default();
        let nar_requests = log.lines().filter(|l| l.contains("path=/nar/")).count();
        all_nar_requests += nar_requests;
        for role in roles {
            let name = format!("path=/nar/{}", store_hash(c.role(role)));
            if log.contains(&name) {
                asked_canonical.push(format!("{cache}: {name}"));
            }
        }
        report.step(
            &format!("log_{cache}"),
            true,
            &format!("{nar_requests} NAR requests"),
            "",
        );
    }
    report.step(
        "nars_fetched",
        all_nar_requests >= roles.len(),
        &format!("{all_nar_requests} NAR requests reached the caches"),
        "",
    );
    report.step(
        "real_names",
        asked_canonical.is_empty(),
        &format!("canonical names forwarded: {asked_canonical:?}"),
        &ncro.logs(),
    );
    let errors = crate::metrics::scrape(&ncro).value("ncro_nar_errors_total", &[]);
    report.step(
        "nar_errors",
        errors == 0.0,
        &format!("ncro_nar_errors_total = {errors}"),
        "",
    );
    report.finish(&format!(
        "nix client through {} with to_self URLs",
        ncro.url()
    ));
}
