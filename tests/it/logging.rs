//! Logging through the real binary: JSON and text shapes, config errors for
//! bad `logging.*` values, no per-request lines at info, the debug access
//! log, and secrets kept out of logs and `check-config`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{test_config, HarnessError, HttpConn, NcroProcess};

const PASSWORD: &str = "pw-Zq8!never-log-me";
const USERNAME: &str = "builder";

/// [`test_config`] with one upstream and this `[logging]` section.
fn config(upstream: &str, key: &str, db: &Path, level: &str, format: &str) -> String {
    let base = test_config("127.0.0.1:0", &[(upstream, 10, key)], db);
    let tail = "[logging]\nlevel = \"debug\"\nformat = \"text\"\n";
    assert!(base.ends_with(tail), "test_config layout changed:\n{base}");
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "{}[logging]\nlevel = {}\nformat = {}\n",
        &base[..base.len() - tail.len()],
        q(level),
        q(format)
    )
}

fn with_basic_auth(cfg: &str, upstream: &str) -> String {
    let url_line = format!("url = \"{upstream}\"\n");
    assert!(cfg.contains(&url_line), "{cfg}");
    cfg.replacen(
        &url_line,
        &format!("{url_line}username = \"{USERNAME}\"\npassword = \"{PASSWORD}\"\n"),
        1,
    )
}

struct Fixture {
    up: FakeUpstream,
    key: TestKey,
    path: TestPath,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let key = TestKey::generate("logging-test-1");
    let path = TestPath::new("logged");
    let up = FakeUpstream::builder()
        .cache_info(40)
        .path(&path, &key)
        .start();
    Fixture {
        up,
        key,
        path,
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Fixture {
    fn config(&self, level: &str, format: &str) -> String {
        let db = self.dir.path().join("routes.db");
        config(&self.up.url(), &self.key.public_key(), &db, level, format)
    }
}

fn wait_listening(ncro: &NcroProcess) {
    assert!(
        ncro.wait_for_log("ncro listening", Duration::from_secs(10)),
        "{}",
        ncro.logs()
    );
}

#[test]
fn json_lines_have_timestamp_level_fields_and_target() {
    let f = fixture();
    let ncro = NcroProcess::start(&f.config("info", "json"));
    wait_listening(&ncro);
    let out = ncro.stdout();
    let mut messages = Vec::new();
    for line in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(
            v["target"].as_str().is_some_and(|t| t.starts_with("ncro")),
            "{line}"
        );
        let msg = v["fields"]["message"].as_str().expect("fields.message");
        messages.push((msg.to_owned(), v));
    }
    let find = |m: &str| {
        messages
            .iter()
            .find(|(msg, _)| msg == m)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {m:?} event in\n{out}"))
    };
    let listening = find("ncro listening");
    assert_eq!(listening["level"], "INFO");
    let driver = listening["fields"]["driver"]
        .as_str()
        .expect("driver field");
    assert!(["io_uring", "epoll"].contains(&driver), "{driver}");
    assert!(listening["fields"]["workers"].is_number());
    let summary = find("configuration loaded");
    let upstreams = summary["fields"]["upstreams"].as_str().expect("upstreams");
    assert!(upstreams.contains(&f.up.url()), "{upstreams}");
    let db = summary["fields"]["db"].as_str().expect("db");
    assert!(db.ends_with("routes.db"), "{db}");
    assert!(ncro.stderr().trim().is_empty(), "{}", ncro.stderr());
}

#[test]
fn text_format_is_not_json() {
    let f = fixture();
    let ncro = NcroProcess::start(&f.config("info", "text"));
    wait_listening(&ncro);
    let out = ncro.stdout();
    let line = out
        .lines()
        .find(|l| l.contains("ncro listening"))
        .expect("listening line");
    assert!(
        serde_json::from_str::<serde_json::Value>(line).is_err(),
        "{line}"
    );
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("driver="), "{line}");
    // Not a terminal: no colour escapes.
    assert!(!out.contains('\u{1b}'), "{out}");
}

#[test]
fn invalid_logging_values_are_config_errors_naming_the_key() {
    let f = fixture();
    for (level, format, key) in [
        ("ncro=loudest", "json", "logging.level"),
        ("info,ncro=[", "json", "logging.level"),
        ("info", "xml", "logging.format"),
    ] {
        match NcroProcess::try_start(&f.config(level, format)) {
            Err(HarnessError::EarlyExit { status, logs, .. }) => {
                assert_eq!(status.code(), Some(1), "{logs}");
                assert!(logs.contains(key), "expected {key} in\n{logs}");
            }
            Err(e) => panic!("{level}/{format}: unexpected harness error {e}"),
            Ok(p) => panic!("{level}/{format} accepted\n{}", p.logs()),
        }
        let (code, out) = check_config(&f.config(level, format), f.dir.path());
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains(key), "{out}");
    }
}

/// Runs `ncro check-config`; returns the exit code and stdout+stderr.
fn check_config(cfg: &str, dir: &Path) -> (Option<i32>, String) {
    let file = dir.join("check.toml");
    std::fs::write(&file, cfg).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_ncro"))
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .env_remove("NCRO_CONFIG")
        .env_remove("NCRO_LOG_LEVEL")
        .output()
        .expect("run ncro check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Sends `n` GETs of `path` on one keep-alive connection, all 200.
fn hits(ncro: &NcroProcess, path: &str, n: usize) {
    let mut conn = HttpConn::connect(ncro.addr()).expect("connect");
    for _ in 0..n {
        let r = conn.get(path).expect("GET");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn info_level_writes_nothing_per_request() {
    let f = fixture();
    let ncro = NcroProcess::start(&f.config("info", "json"));
    wait_listening(&ncro);
    let p = f.path.narinfo_request_path();
    hits(&ncro, &p, 1); // the miss that races and stores the route
    let before = ncro.stdout();
    hits(&ncro, &p, 100);
    assert_eq!(ncro.get(&f.path.nar_request_path()).status, 200);
    let after = ncro.stdout();
    assert!(after.starts_with(&before), "log rewritten?\n{after}");
    let new: Vec<&str> = after[before.len()..].lines().collect();
    // Background events (a health change) may appear; 101 requests may not.
    assert!(new.len() <= 3, "requests logged at info: {new:#?}");
    assert!(!after.contains(&f.path.hash), "{after}");
}

#[test]
fn debug_access_log_has_one_line_per_request() {
    let f = fixture();
    let ncro = NcroProcess::start(&f.config("info,ncro::access=debug", "json"));
    wait_listening(&ncro);
    let p = f.path.narinfo_request_path();
    hits(&ncro, &p, 20);
    assert_eq!(ncro.get(&f.path.nar_request_path()).status, 200);
    assert_eq!(ncro.get("/nope").status, 404);
    // A request is logged once its handler returns, which for the NAR can be
    // a moment after the client has read the last byte: poll, bounded.
    let access_lines = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "ncro::access")
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut out = ncro.stdout();
    while access_lines(&out).len() < 22 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        out = ncro.stdout();
    }
    let access = access_lines(&out);
    assert_eq!(access.len(), 22, "{out}");
    let narinfo = access.iter().filter(|v| v["fields"]["path"] == p.as_str());
    assert_eq!(narinfo.clone().count(), 20);
    assert!(narinfo.clone().all(|v| v["fields"]["status"] == 200));
    assert!(narinfo.clone().all(|v| v["level"] == "DEBUG"));
    let nar = f.path.nar_request_path();
    let nar_line = access
        .iter()
        .find(|v| v["fields"]["path"] == nar.as_str())
        .expect("NAR access line");
    // The NAR head is flushed before the body streams; its status is still seen.
    assert_eq!(nar_line["fields"]["status"], 200);
    // Found by path: the NAR's line may come after it (see above).
    let nope = access
        .iter()
        .find(|v| v["fields"]["path"] == "/nope")
        .expect("404 access line");
    assert_eq!(nope["fields"]["status"], 404);
    assert_eq!(nope["fields"]["method"], "GET");
    assert!(access[0]["fields"]["micros"].is_number());
}

#[test]
fn upstream_password_never_logged_even_at_debug() {
    let f = fixture();
    let cfg = with_basic_auth(&f.config("debug", "text"), &f.up.url());
    let ncro = NcroProcess::start(&cfg);
    wait_listening(&ncro);
    hits(&ncro, &f.path.narinfo_request_path(), 3);
    assert_eq!(ncro.get(&f.path.nar_request_path()).status, 200);
    assert_eq!(
        ncro.get(&format!("/{}.narinfo", crate::fake::random_hash()))
            .status,
        404
    );
    // The password was used: the upstream saw Basic Auth.
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{PASSWORD}"));
    let sent = f.up.requests();
    assert!(
        sent.iter()
            .any(|r| r.header("authorization") == Some(&format!("Basic {b64}"))),
        "upstream never saw the credentials"
    );
    let logs = format!("{}{}", ncro.stdout(), ncro.stderr());
    assert!(
        logs.contains("basic auth"),
        "summary says auth is on:\n{logs}"
    );
    for secret in [PASSWORD, b64.as_str()] {
        assert!(!logs.contains(secret), "secret in logs:\n{logs}");
    }
    let (code, out) = check_config(&cfg, f.dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(USERNAME), "{out}");
    assert!(!out.contains(PASSWORD), "{out}");
}
