//! `/status` (today's ncro's JSON snapshot) and `/health`'s status code,
//! through the real `ncro` binary in front of fake upstreams on loopback
//! that are stopped and brought back on their port to change their health.
//!
//! Probes run every 50 ms, so a stopped upstream (connection refused at
//! once) is DOWN (3 failures at x1, then 7 at x4 backoff) in about 3 s;
//! waits allow 30 s. The probe timeout is generous (2 s) so that a loaded
//! machine never fails a live upstream's probe.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::fake::{random_hash, FakeUpstream, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::server::eventually;

const STATE_WAIT: Duration = Duration::from_secs(30);

/// `upstreams`: (url, priority, extra TOML for that upstream).
fn config(upstreams: &[(&str, i32, &str)], db: &Path) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\ncache_priority = 42\n\n");
    for (url, priority, extra) in upstreams {
        out.push_str(&format!(
            "[[upstreams]]\nurl = {}\npriority = {priority}\n{extra}\n",
            q(url)
        ));
    }
    out.push_str(&format!(
        "[cache]\ndb_path = {}\n\n[health]\nenabled = true\nprobe_interval = \"50ms\"\n\
         probe_timeout = \"2s\"\n",
        q(&db.to_string_lossy())
    ));
    out
}

fn json_of(r: &crate::harness::Response) -> Value {
    assert_eq!(
        r.header("Content-Type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

fn status(ncro: &NcroProcess) -> Value {
    let r = ncro.get("/status");
    assert_eq!(r.status, 200, "{}", r.text());
    json_of(&r)
}

fn upstream<'a>(s: &'a Value, url: &str) -> &'a Value {
    s["upstreams"]
        .as_array()
        .and_then(|l| l.iter().find(|u| u["url"] == url))
        .unwrap_or_else(|| panic!("{url} not in /status: {s}"))
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn wait_status(ncro: &NcroProcess, url: &str, state: &str) {
    let reached = eventually(STATE_WAIT, || {
        upstream(&status(ncro), url)["status"] == state
    });
    assert!(reached, "{url} never became {state}: {}", status(ncro));
}

#[test]
fn status_has_todays_fields_and_follows_upstream_health() {
    let p = TestPath::new("status-hit");
    let key = TestKey::generate("status");
    let first = FakeUpstream::builder()
        .cache_info(40)
        .path(&p, &key)
        .start();
    let mut second = FakeUpstream::builder().cache_info(40).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = "username = \"alice\"\npassword = \"not-logged\"\n";
    let ncro = NcroProcess::start(&config(
        &[(&first.url(), 10, auth), (&second.url(), 20, "")],
        &dir.path().join("db"),
    ));

    // One hit, two misses (one found, one absent), one negative hit, one NAR.
    let missing = format!("/{}.narinfo", random_hash());
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(ncro.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(ncro.get(&missing).status, 404);
    assert_eq!(ncro.get(&missing).status, 404);
    assert_eq!(ncro.get(&p.nar_request_path()).status, 200);

    // Both probed at least once and ACTIVE.
    let probed = eventually(STATE_WAIT, || {
        let s = status(&ncro);
        [first.url(), second.url()].iter().all(|u| {
            let e = upstream(&s, u);
            e["status"] == "ACTIVE" && e["last_probe_secs_ago"].is_u64()
        })
    });
    assert!(probed, "never probed: {}", status(&ncro));

    let s = status(&ncro);
    assert_eq!(
        keys(&s),
        [
            "cache",
            "config",
            "fallback",
            "status",
            "upstreams",
            "uptime_secs",
            "version"
        ],
        "{s}"
    );
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_secs"].is_u64(), "{s}");
    assert_eq!(s["status"], "ok");
    assert_eq!(
        s["cache"],
        serde_json::json!({
            "route_entries": s["cache"]["route_entries"],
            "narinfo_hits": 1,
            "narinfo_misses": 2,
            "narinfo_negative_hits": 1,
            "nar_requests": 1,
        }),
        "{s}"
    );
    // The route to the path and the negative entry of the missing hash.
    assert!(s["cache"]["route_entries"].as_u64() >= Some(1), "{s}");
    assert_eq!(
        s["config"],
        serde_json::json!({"cache_priority": 42, "upstream_count": 2, "fallback_configured": false})
    );
    assert_eq!(s["fallback"], Value::Null);

    let a = upstream(&s, &first.url());
    assert_eq!(
        keys(a),
        [
            "authenticated",
            "consecutive_fails",
            "ema_latency_ms",
            "kind",
            "last_probe_secs_ago",
            "priority",
            "status",
            "total_queries",
            "url"
        ]
    );
    assert_eq!(
        (
            &a["priority"],
            &a["kind"],
            &a["authenticated"],
            &a["consecutive_fails"]
        ),
        (&10.into(), &"http".into(), &true.into(), &0.into()),
        "{a}"
    );
    assert!(a["ema_latency_ms"].as_f64() > Some(0.0), "{a}");
    assert!(a["total_queries"].as_u64() >= Some(1), "{a}");
    let b = upstream(&s, &second.url());
    assert_eq!(
        (&b["priority"], &b["authenticated"]),
        (&20.into(), &false.into())
    );
    assert!(
        !s.to_string().contains("not-logged"),
        "no password in /status"
    );

    // The second upstream goes away: DOWN, listed last, overall degraded.
    let addr = second.addr();
    second.stop();
    wait_status(&ncro, &second.url(), "DOWN");
    let s = status(&ncro);
    assert_eq!(s["status"], "degraded");
    assert_eq!(upstream(&s, &first.url())["status"], "ACTIVE");
    let b = upstream(&s, &second.url());
    assert!(b["consecutive_fails"].as_u64() >= Some(10), "{b}");
    assert_eq!(
        s["upstreams"][1]["url"],
        second.url().as_str(),
        "DOWN last: {s}"
    );

    // Back on its port: ACTIVE again.
    let back = FakeUpstream::builder()
        .cache_info(40)
        .start_on(addr)
        .expect("rebind the upstream's port");
    wait_status(&ncro, &back.url(), "ACTIVE");
    assert_eq!(
        upstream(&status(&ncro), &back.url())["consecutive_fails"],
        0
    );
}

#[test]
fn health_is_503_only_while_every_upstream_is_down() {
    let mut a = FakeUpstream::builder().cache_info(40).start();
    let mut b = FakeUpstream::builder().cache_info(40).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let ncro = NcroProcess::start(&config(
        &[(&a.url(), 10, ""), (&b.url(), 10, "")],
        &dir.path().join("db"),
    ));
    let health = || {
        let r = ncro.get("/health");
        (r.status, json_of(&r))
    };
    assert_eq!(health().0, 200);

    a.stop();
    wait_status(&ncro, &a.url(), "DOWN");
    let (code, h) = health();
    assert_eq!((code, &h["status"]), (200, &"degraded".into()), "{h}");

    let b_addr = b.addr();
    b.stop();
    wait_status(&ncro, &b.url(), "DOWN");
    let (code, h) = health();
    assert_eq!((code, &h["status"]), (503, &"down".into()), "{h}");
    assert_eq!(
        h["upstreams"].as_array().map(Vec::len),
        Some(2),
        "same body: {h}"
    );
    let head = ncro.request("HEAD", "/health", &[]).expect("HEAD /health");
    assert_eq!(head.status, 503);
    // /status itself stays 200 and says why.
    assert_eq!(status(&ncro)["status"], "down");

    let _b = FakeUpstream::builder()
        .cache_info(40)
        .start_on(b_addr)
        .expect("rebind the upstream's port");
    let back = eventually(STATE_WAIT, || health().0 == 200);
    assert!(back, "/health stayed 503: {}", health().1);
    assert_eq!(health().1["status"], "degraded");
}

/// What the NixOS module writes by default (`localhost:<port>`) is served
/// on 127.0.0.1 (the address its socket unit uses too).
#[test]
fn a_localhost_listen_address_is_served_on_127_0_0_1() {
    let up = FakeUpstream::builder().cache_info(40).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::harness::free_port();
    let cfg = config(&[(&up.url(), 10, "")], &dir.path().join("db")).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"localhost:{port}\""),
    );
    assert!(cfg.contains("localhost:"), "{cfg}");
    let ncro = NcroProcess::start(&cfg);
    let r = crate::harness::http_get(([127, 0, 0, 1], port).into(), "/status")
        .expect("GET /status on 127.0.0.1");
    assert_eq!(r.status, 200);
    assert_eq!(ncro.get("/nix-cache-info").status, 200);
}
