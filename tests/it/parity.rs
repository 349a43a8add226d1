//! A config written for today's ncro (manic-systems/ncro main, 2.2.2),
//! using every key of its configuration table, is accepted by `--check`
//! and served by the real binary; each key's own behaviour is tested
//! where it lives (narinfo_side, canonical, hedge, ops, status, farm).

use crate::cli::{config_file, ncro};
use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_port, NcroProcess};

/// Every key of today's ncro's table (peers note §1.1), with values a
/// user of it would write; `{..}` placeholders are filled in per test.
const TODAYS_CONFIG: &str = r#"
[server]
listen = "{listen}"
read_timeout = "30s"
write_timeout = "30s"
cache_priority = 40
want_mass_query = false

[[upstreams]]
url = "{up}"
priority = 10
public_key = "{key}"
public_keys = ["{key}"]
username = "builder"
password_file = "{password_file}"
narinfo_timeout = "3s"
nar_timeout = "20s"
nar_url_mode = "to_self"
allow_hedging = true
filters = [{ action = "deny", field = "name", pattern = "*-secret-*" }]

[[upstreams]]
url = "{second}"
priority = 20
public_key = "{key}"
username = "other"
password = "hunter2"
nar_url_mode = "keep"
allow_hedging = false

[fallback_cache]
enabled = true
url = "{fallback}"
public_key = "{key}"
public_keys = []
username = "fallback-user"
password_file = "{password_file}"

[cache]
db_path = "{db}"
max_entries = 5000
ttl = "30m"
negative_ttl = "5m"
latency_alpha = 0.25
slow_statement_threshold = "1s"

[cache.mass_query]
max_concurrent_races = 32
per_upstream_max_inflight = 4
in_memory_negative_ttl = "3s"
upstream_cooldown = "10s"

[cache.nar_hedging]
enabled = true
delay = "500ms"
max_inflight = 2

[discovery]
enabled = false
service_name = "_nix-serve._tcp"
domain = "local"
discovery_time = "5s"
priority = 20
address_family = "ipv4"

[mesh]
enabled = false
bind_addr = "127.0.0.1:0"
private_key = ""
gossip_interval = "30s"
peers = []

[logging]
level = "debug"
format = "text"
timestamps = false
"#;

#[test]
fn a_config_using_every_key_of_todays_ncro_checks_and_serves() {
    let key = TestKey::generate("parity-1");
    let p = TestPath::new("parity");
    let up = FakeUpstream::builder().path(&p, &key).start();
    let second = FakeUpstream::builder().start();
    let fallback = FakeUpstream::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let text = TODAYS_CONFIG
        .replace("{listen}", &listen)
        .replace("{up}", &up.url())
        .replace("{second}", &second.url())
        .replace("{fallback}", &fallback.url())
        .replace("{key}", &key.public_key())
        .replace("{password_file}", password_file.to_str().unwrap())
        .replace("{db}", dir.path().join("routes.db").to_str().unwrap());

    let (_d, path) = config_file(&text);
    let check = ncro(&["--check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(check.code, Some(0), "{}", check.all());
    // Accepted-and-ignored keys are named, never silently dropped.
    assert!(
        check.stderr.contains("slow_statement_threshold"),
        "{}",
        check.all()
    );

    let ncro = NcroProcess::start(&text);
    let info = ncro.get("/nix-cache-info");
    assert_eq!(info.status, 200);
    assert!(info.text().contains("WantMassQuery: 0"), "{}", info.text());
    assert!(info.text().contains("Priority: 40"), "{}", info.text());

    // The narinfo comes from the first upstream, with today's headers and
    // its URL rewritten to ncro's canonical NAR path (nar_url_mode).
    let r = ncro.get(&p.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", ncro.logs());
    assert_eq!(r.header("X-Ncro-Route"), Some("race"));
    assert_eq!(r.header("X-Ncro-Upstream"), Some("127.0.0.1"));
    let url = r
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .expect("URL line");
    assert!(url.starts_with(&format!("nar/{}", p.hash)), "{url}");
    // password_file: the upstream was asked with Basic auth builder:s3cret.
    let asked = up
        .requests()
        .into_iter()
        .find(|q| q.path == p.narinfo_request_path())
        .expect("the upstream was asked");
    assert_eq!(
        asked.header("Authorization"),
        Some("Basic YnVpbGRlcjpzM2NyZXQ="),
        "{asked:?}"
    );

    let status: serde_json::Value = serde_json::from_str(&ncro.get("/status").text()).unwrap();
    assert_eq!(status["config"]["cache_priority"], 40);
    assert_eq!(status["config"]["upstream_count"], 2);
    assert_eq!(status["config"]["fallback_configured"], true);
    assert_eq!(
        status["fallback"]["url"],
        fallback.url().trim_end_matches('/')
    );
    assert_eq!(status["upstreams"][0]["authenticated"], true);
    let health = ncro.get("/health");
    assert_eq!(health.status, 200, "{}", health.text());
}
