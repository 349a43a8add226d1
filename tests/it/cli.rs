//! The `ncro` command line, run as a process with no inherited `NCRO_*`
//! variables: version and help, and `check-config` on files, on
//! `NCRO_CONFIG` and on the embedded default.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// None of these commands does I/O beyond reading one file.
const RUN_LIMIT: Duration = Duration::from_secs(20);

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// `ncro` with `args`, `NCRO_*` removed, no netrc (`NETRC=/dev/null`)
/// and `env` added, killed after [`RUN_LIMIT`].
pub fn ncro(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ncro"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NCRO_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(args)
        .env("NETRC", "/dev/null")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn ncro");
    let code = wait(child, args);
    Output {
        code,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

fn wait(mut child: Child, args: &[&str]) -> Option<i32> {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill(); // our own child, reaped below
            let _ = child.wait();
            panic!("ncro {args:?} still running after {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .expect("read output");
    s
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ncro22-example.toml")
}

/// A config file in a fresh temp dir (kept alive by the returned guard).
pub fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ncro.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

#[test]
fn version_and_help() {
    let v = ncro(&["--version"], &[]);
    assert_eq!(v.code, Some(0), "{}", v.all());
    assert_eq!(
        v.stdout.trim(),
        format!("ncro {}", env!("CARGO_PKG_VERSION")),
        "{}",
        v.all()
    );
    let h = ncro(&["--help"], &[]);
    assert_eq!(h.code, Some(0), "{}", h.all());
    for needle in ["check-config", "serve", "--config", "NCRO_CONFIG"] {
        assert!(h.stdout.contains(needle), "{needle} missing:\n{}", h.all());
    }
    let bad = ncro(&["no-such-command"], &[]);
    assert_eq!(bad.code, Some(2), "{}", bad.all());
}

#[test]
fn check_config_prints_the_effective_ncro22_example() {
    let path = example();
    let out = ncro(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let effective: toml::Table = toml::from_str(&out.stdout).expect("output is TOML");
    let ups = effective["upstreams"].as_array().expect("upstreams");
    let urls: Vec<&str> = ups.iter().filter_map(|u| u["url"].as_str()).collect();
    assert_eq!(
        urls,
        [
            "https://cache.nixos.org",
            "https://nix-community.cachix.org",
            "s3://my-bucket?endpoint=minio.example.com&scheme=https",
            "https://cache.internal.example.com",
        ]
    );
    assert_eq!(ups[3]["password"].as_str(), Some("<redacted>"));
    assert!(!out.stdout.contains("hunter2"), "{}", out.all());
    assert_eq!(
        effective["cache"]["db_path"].as_str(),
        Some("/var/lib/ncro/routes.db")
    );
    // Keys the example leaves out show their defaults.
    assert_eq!(effective["server"]["cache_priority"].as_integer(), Some(30));
    assert_eq!(
        effective["timeouts"]["race_deadline"].as_str(),
        Some("5s"),
        "{}",
        out.all()
    );
}

#[test]
fn misspelled_key_names_the_key_and_its_line() {
    let (_dir, path) = config_file("[server]\nlisten = \":8080\"\nread_timout = \"30s\"\n");
    let out = ncro(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("read_timout"), "{}", out.all());
    assert!(out.stderr.contains("line 3"), "{}", out.all());
    assert!(out.stdout.is_empty(), "{}", out.all());

    // The same file makes `serve` refuse to start, with the same message.
    let serve = ncro(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(serve.code, Some(1), "{}", serve.all());
    assert!(serve.stderr.contains("read_timout"), "{}", serve.all());
}

#[test]
fn missing_config_file_is_an_error() {
    let out = ncro(&["check-config", "--config", "/nonexistent/ncro.toml"], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("/nonexistent/ncro.toml"),
        "{}",
        out.all()
    );
}

#[test]
fn ncro_config_variable_is_honoured() {
    let (_dir, path) = config_file("[server]\ncache_priority = 77\n");
    let p = path.to_str().unwrap();
    let out = ncro(&["check-config"], &[("NCRO_CONFIG", p)]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let effective: toml::Table = toml::from_str(&out.stdout).expect("TOML");
    assert_eq!(effective["server"]["cache_priority"].as_integer(), Some(77));

    // --config wins over the variable.
    let example = example();
    let out = ncro(
        &["check-config", "--config", example.to_str().unwrap()],
        &[("NCRO_CONFIG", p)],
    );
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("nix-community.cachix.org"),
        "{}",
        out.all()
    );
    assert!(!out.stdout.contains("77"), "{}", out.all());
}

#[test]
fn ncro_variables_override_single_keys() {
    let (_dir, path) = config_file("[server]\nlisten = \":8080\"\n");
    let out = ncro(
        &["check-config", "--config", path.to_str().unwrap()],
        &[
            ("NCRO_LISTEN", "127.0.0.1:9999"),
            ("NCRO_DB_PATH", "/tmp/ncro-cli-test.db"),
            ("NCRO_LOG_LEVEL", "debug"),
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.all());
    let effective: toml::Table = toml::from_str(&out.stdout).expect("TOML");
    assert_eq!(
        effective["server"]["listen"].as_str(),
        Some("127.0.0.1:9999")
    );
    assert_eq!(
        effective["cache"]["db_path"].as_str(),
        Some("/tmp/ncro-cli-test.db")
    );
    assert_eq!(effective["logging"]["level"].as_str(), Some("debug"));
}

#[test]
fn without_a_config_the_embedded_default_is_used() {
    for env in [&[][..], &[("NCRO_CONFIG", "")][..]] {
        let out = ncro(&["check-config"], env);
        assert_eq!(out.code, Some(0), "{env:?}\n{}", out.all());
        let effective: toml::Table = toml::from_str(&out.stdout).expect("TOML");
        let ups = effective["upstreams"].as_array().expect("upstreams");
        assert_eq!(ups.len(), 1, "{}", out.all());
        assert_eq!(ups[0]["url"].as_str(), Some("https://cache.nixos.org"));
        assert_eq!(
            ups[0]["public_key"].as_str(),
            Some("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
        );
        assert_eq!(effective["server"]["listen"].as_str(), Some(":8080"));
    }
}

#[test]
fn invalid_values_are_named() {
    for (text, needle) in [
        ("[server]\nread_timeout = \"soon\"\n", "soon"),
        ("[server]\ncache_priority = 0\n", "server.cache_priority"),
        ("[[upstreams]]\nurl = \"ftp://x\"\n", "scheme"),
        ("[server]\nlisten = 8080\n", "line 2"),
    ] {
        let (_dir, path) = config_file(text);
        let out = ncro(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(out.code, Some(1), "{text}\n{}", out.all());
        assert!(out.stderr.contains(needle), "{needle}:\n{}", out.all());
    }
}
