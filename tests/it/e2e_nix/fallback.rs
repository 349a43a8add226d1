//! The real Nix client substituting through ncro when only the
//! `[fallback_cache]` is reachable: every normal upstream is a loopback
//! port nobody listens on, so each narinfo race ends "unavailable" and
//! each NAR request fails over to the fallback's single try.

use super::{caches, fetch, serve, summary};
use crate::harness::{free_port, tail, test_config, NcroProcess};

#[test]
fn nix_client_substitutes_from_the_fallback_cache_alone() {
    let c = caches();
    let served = serve(c, "fallback");
    let db = tempfile::tempdir().expect("tempdir");
    let dead: Vec<String> = (0..2)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let ups = [
        (dead[0].as_str(), 10, c.keys[1].as_str()),
        (dead[1].as_str(), 20, c.keys[2].as_str()),
    ];
    let mut config = test_config("127.0.0.1:0", &ups, &db.path().join("routes.db"));
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    config.push_str(&format!(
        "\n[fallback_cache]\nenabled = true\nurl = {}\npublic_key = {}\n",
        q(&served.urls[0]),
        q(&c.keys[0])
    ));
    let proxy =
        NcroProcess::try_start(&config).unwrap_or_else(|e| panic!("step `start ncro` failed: {e}"));
    let path = c.role("only_a");
    let r = fetch(
        &c.scripts,
        &proxy.url(),
        &c.keys.join(" "),
        &[path],
        &[],
        &db.path().join("fallback.log"),
    );
    assert_eq!(
        r.code,
        Some(0),
        "nix client through the fallback: {}\n{}\n--- ncro ---\n{}",
        summary(&r),
        tail(&r.output, 40),
        tail(&proxy.logs(), 40)
    );
    let narinfo = format!("/{}.narinfo", super::store_hash(path));
    let again = proxy.get(&narinfo);
    assert_eq!(again.status, 200);
    assert_eq!(again.header("X-Ncro-Route"), Some("fallback"));
}
