//! Operations through the real binary: journald-framed logs
//! (`JOURNAL_STREAM`, `logging.timestamps`), `--check` and
//! `--generate-mesh-key`, netrc credentials against an upstream that
//! demands Basic auth, S3 upload-only parameters, and the `check-config`
//! notes on which spelling wins.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::cli::{config_file, ncro};
use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_port, HttpConn, NcroProcess};

const LIMIT: Duration = Duration::from_secs(30);

/// `ncro serve` with stdout and stderr in files of `dir`, `JOURNAL_STREAM`
/// set to `journal(stdout file)`; waits for `until` in stdout (or for the
/// exit when `until` is None), asks `poke` for `/nix-cache-info` when
/// given (a debug access-log line), then SIGTERM. Returns (exit code,
/// stdout).
fn serve_logs(
    config: &str,
    journal: impl Fn(&File) -> String,
    until: Option<&str>,
    poke: Option<&str>,
) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ncro.toml");
    std::fs::write(&cfg, config).unwrap();
    let out_path = dir.path().join("stdout");
    let out = File::create(&out_path).unwrap();
    let stream = journal(&out);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ncro"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NCRO_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("JOURNAL_STREAM", stream)
        .env("NETRC", "/dev/null")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let deadline = Instant::now() + LIMIT;
    let mut signalled = false;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), read());
        }
        if !signalled && until.is_some_and(|u| read().contains(u)) {
            if let Some(addr) = poke {
                let r = HttpConn::connect(addr.parse().unwrap())
                    .and_then(|mut c| c.request("GET", "/nix-cache-info", &[]))
                    .expect("GET /nix-cache-info");
                assert_eq!(r.status, 200);
            }
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            signalled = true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ncro did not finish within {LIMIT:?}:\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`serve_logs`] on a free loopback port until ncro listens, trying
/// another port when a parallel test took the chosen one first.
fn serve_listening(
    config_for: impl Fn(&str) -> String,
    journal: impl Fn(&File) -> String + Copy,
    poke: bool,
) -> (Option<i32>, String) {
    for _ in 0..5 {
        let listen = format!("127.0.0.1:{}", free_port());
        let (code, out) = serve_logs(
            &config_for(&listen),
            journal,
            Some("ncro listening"),
            poke.then_some(listen.as_str()),
        );
        if code == Some(1) && out.contains("in use") {
            continue;
        }
        return (code, out);
    }
    panic!("no free port for ncro after 5 tries");
}

fn dev_ino(f: &File) -> String {
    let m = f.metadata().unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

fn serve_config(listen: &str, upstream: &str, format: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nworkers = 1\n[[upstreams]]\nurl = \"{upstream}\"\n\
         [cache]\ndb_path = \":memory:\"\nslow_statement_threshold = \"1s\"\n\
         [health]\nenabled = false\n[index]\nenabled = false\n\
         [logging]\nlevel = \"debug\"\nformat = \"{format}\"\n{extra}"
    )
}

/// The level word a line of either format names.
fn level_of(line: &str) -> &'static str {
    for l in ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"] {
        if line.contains(&format!("\"level\":\"{l}\"")) || line.trim_start().starts_with(l) {
            return l;
        }
    }
    panic!("no level in {line:?}");
}

fn has_timestamp(line: &str) -> bool {
    // RFC 3339 as tracing writes it: 2026-12-06T22:10:00.123456Z
    line.as_bytes().windows(11).any(|w| {
        w[..4].iter().all(u8::is_ascii_digit) && w[4] == b'-' && w[7] == b'-' && w[10] == b'T'
    })
}

/// Every line starts with the syslog priority of its level and carries no
/// timestamp; returns the priorities seen.
fn assert_journal_lines(out: &str) -> Vec<&'static str> {
    let mut seen = Vec::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let (prefix, rest) = line.split_at(3.min(line.len()));
        let want = match level_of(rest) {
            "ERROR" => "<3>",
            "WARN" => "<4>",
            "INFO" => "<6>",
            _ => "<7>",
        };
        assert_eq!(prefix, want, "line {line:?}\n{out}");
        assert!(!has_timestamp(rest), "timestamp in {line:?}");
        if !seen.contains(&want) {
            seen.push(want);
        }
    }
    seen
}

#[test]
fn json_logs_to_the_journal_have_priorities_and_no_timestamps() {
    let up = FakeUpstream::builder().cache_info(40).start();
    let (code, out) = serve_listening(|l| serve_config(l, &up.url(), "json", ""), dev_ino, true);
    assert_eq!(code, Some(0), "{out}");
    let seen = assert_journal_lines(&out);
    for p in ["<4>", "<6>", "<7>"] {
        assert!(seen.contains(&p), "no {p} line:\n{out}");
    }
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(&line[3..]).expect("JSON after <N>");
        assert!(v.get("timestamp").is_none(), "{line}");
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(
        out.contains("slow_statement_threshold"),
        "the warning:\n{out}"
    );
}

#[test]
fn text_logs_to_the_journal_mark_errors_with_priority_3() {
    // A port already taken: ncro logs its failure at error and exits 1.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let cfg = serve_config(&listen, "http://127.0.0.1:9", "text", "");
    let (code, out) = serve_logs(&cfg, dev_ino, None, None);
    assert_eq!(code, Some(1), "{out}");
    let seen = assert_journal_lines(&out);
    assert!(seen.contains(&"<3>"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("<3>") && l.contains("ncro failed")),
        "{out}"
    );
}

#[test]
fn journal_stream_of_another_file_changes_nothing_but_timestamps_false_drops_them() {
    let up = FakeUpstream::builder().cache_info(40).start();
    let elsewhere = |f: &File| {
        let m = f.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino() + 1)
    };
    for (timestamps, extra) in [(true, ""), (false, "timestamps = false\n")] {
        let (code, out) = serve_listening(
            |l| serve_config(l, &up.url(), "json", extra),
            elsewhere,
            false,
        );
        assert_eq!(code, Some(0), "{out}");
        assert!(out.lines().count() >= 3, "{out}");
        for line in out.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            assert_eq!(v.get("timestamp").is_some(), timestamps, "{line}");
        }
    }
    // Text format without timestamps, not the journal.
    let (code, out) = serve_listening(
        |l| serve_config(l, &up.url(), "text", "timestamps = false\n"),
        elsewhere,
        false,
    );
    assert_eq!(code, Some(0), "{out}");
    for line in out.lines().filter(|l| !l.is_empty()) {
        assert!(!line.starts_with('<'), "{line}");
        assert!(!has_timestamp(line), "{line}");
        level_of(line);
    }
}

#[test]
fn generate_mesh_key_creates_then_reads_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sub/node.key");
    let k = key.to_str().unwrap();
    let first = ncro(&["--generate-mesh-key", k], &[]);
    assert_eq!(first.code, Some(0), "{}", first.all());
    assert_eq!(first.stderr, "", "{}", first.all());
    let hex = first.stdout.strip_suffix('\n').expect("newline");
    assert_eq!(hex.len(), 64, "{}", first.all());
    assert!(hex
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The file is a raw 32-byte ed25519 seed, the public key derived from it.
    let seed: [u8; 32] = std::fs::read(&key).unwrap().try_into().expect("32 bytes");
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    assert_eq!(hex, hex::encode(public.as_bytes()));
    // NCRO_CONFIG in the environment is not `--config`.
    let again = ncro(
        &["--generate-mesh-key", k],
        &[("NCRO_CONFIG", "/nonexistent")],
    );
    assert_eq!(
        (again.code, again.stdout.as_str(), again.stderr.as_str()),
        (Some(0), first.stdout.as_str(), "")
    );
    // A key `ncro keygen` wrote (what mesh.private_key reads) gives the
    // public key keygen printed.
    let other = dir.path().join("keygen.key");
    let made = ncro(&["keygen", "--out", other.to_str().unwrap()], &[]);
    assert_eq!(made.code, Some(0), "{}", made.all());
    let read = ncro(&["--generate-mesh-key", other.to_str().unwrap()], &[]);
    assert_eq!(read.stdout, made.stdout, "{}", read.all());
}

#[test]
fn generate_mesh_key_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    let k = k.to_str().unwrap();
    let (_cdir, cfg) = config_file("");
    let cfg = cfg.to_str().unwrap();
    for args in [
        &["--generate-mesh-key", ""][..],
        &["--generate-mesh-key", k, "--config", cfg],
        &["-c", cfg, "--generate-mesh-key", k],
        &["--generate-mesh-key", k, "check-config"],
    ] {
        let out = ncro(args, &[]);
        assert_eq!(out.code, Some(2), "{args:?}\n{}", out.all());
        assert_eq!(out.stdout, "", "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    assert!(
        !Path::new(k).exists(),
        "no key written by a refused command"
    );
    // A file of the wrong size is an error, not overwritten.
    std::fs::write(dir.path().join("bad"), b"short").unwrap();
    let bad = dir.path().join("bad");
    let out = ncro(&["--generate-mesh-key", bad.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("want 32 or 64 bytes"), "{}", out.all());
    assert_eq!(std::fs::read(&bad).unwrap(), b"short");
}

#[test]
fn check_flag_is_check_config() {
    let (_d, good) = config_file("[server]\nlisten = \":9999\"\n[logging]\ntimestamps = false\n");
    let good = good.to_str().unwrap();
    let a = ncro(&["--check", "--config", good], &[]);
    let b = ncro(&["check-config", "--config", good], &[]);
    assert_eq!(a.code, Some(0), "{}", a.all());
    assert_eq!(
        (a.code, &a.stdout, &a.stderr),
        (b.code, &b.stdout, &b.stderr)
    );
    let effective: toml::Table = toml::from_str(&a.stdout).unwrap();
    assert_eq!(effective["logging"]["timestamps"].as_bool(), Some(false));
    let (_d2, bad) = config_file("[logging]\ntimestamps = \"no\"\n");
    let out = ncro(&["--check", "-c", bad.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("timestamps"), "{}", out.all());
    let out = ncro(&["--check", "serve"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.all());
}

#[test]
fn s3_upload_only_parameters_warn_and_unknown_ones_fail() {
    let (_d, cfg) = config_file(
        "[[upstreams]]\nurl = \"s3://bucket?endpoint=127.0.0.1:9&scheme=http&compression=zstd&secret-key=/etc/nix/key&write-nar-listing=1\"\n",
    );
    let out = ncro(&["check-config", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stderr.contains("warning: upstream[0]: s3 parameters compression, secret-key, write-nar-listing only matter for uploads (nix copy --to) and are ignored by ncro"),
        "{}",
        out.all()
    );
    let (_d, cfg) = config_file("[[upstreams]]\nurl = \"s3://bucket?compresion=zstd\"\n");
    let out = ncro(&["check-config", "-c", cfg.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("unknown parameter \"compresion\""),
        "{}",
        out.all()
    );
}

#[test]
fn check_config_says_which_spelling_wins() {
    let a = TestKey::generate("a-1").public_key();
    let b = TestKey::generate("b-1").public_key();
    let netrc = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(netrc.path(), "machine cache.example login nl password np\n").unwrap();
    let (_d, cfg) = config_file(&format!(
        "[server]\nlisten = \":9000\"\n[timeouts]\nidle = \"2m\"\n\
         [[upstreams]]\nurl = \"https://cache.example\"\npublic_key = \"{a}\"\npublic_keys = [\"{b}\"]\nusername = \"me\"\n\
         [[upstreams]]\nurl = \"http://cache.example:8080\"\npassword = \"ignored\"\n"
    ));
    let out = ncro(
        &["--check", "-c", cfg.to_str().unwrap()],
        &[
            ("NCRO_LISTEN", "127.0.0.1:9001"),
            ("NETRC", netrc.path().to_str().unwrap()),
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.all());
    let np = netrc.path().display();
    for line in [
        "note: upstream[0]: public_key and public_keys are merged (2 distinct keys)".to_owned(),
        "note: NCRO_LISTEN=\"127.0.0.1:9001\" wins over server.listen = \":9000\" from the config".to_owned(),
        "note: timeouts.idle = 2m is the idle limit of relayed bodies".to_owned(),
        format!("note: upstream[0]: username is set, so the {np} entry for cache.example is not used"),
        format!("warning: upstream[1]: password is set without username; the login and password of {np} (machine cache.example) are used instead"),
    ] {
        assert!(out.stderr.contains(&line), "missing {line:?}\n{}", out.all());
    }
    assert!(
        !out.stdout.contains("np"),
        "netrc secrets stay out of the output"
    );
}

/// A loopback binary cache that answers 401 to any request without
/// `Authorization: Basic <user:pass>`; with it, `nix-cache-info` and one
/// narinfo. One request per connection.
struct AuthUpstream {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuthUpstream {
    fn start(user: &str, pass: &str, narinfo_path: String, narinfo: String) -> AuthUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let want = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => answer(s, &want, &narinfo_path, &narinfo),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        AuthUpstream {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AuthUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut s: TcpStream, want: &str, narinfo_path: &str, narinfo: &str) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorized = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("authorization") && v.trim().eq_ignore_ascii_case(want)
        })
    });
    let (status, body) = if !authorized {
        ("401 Unauthorized", String::new())
    } else if path == "/nix-cache-info" {
        (
            "200 OK",
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n".to_owned(),
        )
    } else if path == narinfo_path {
        ("200 OK", narinfo.to_owned())
    } else {
        ("404 Not Found", String::new())
    };
    let shown = if method == "HEAD" { "" } else { body.as_str() };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{shown}",
        body.len()
    );
}

#[test]
fn netrc_credentials_reach_an_upstream_that_demands_basic_auth() {
    let key = TestKey::generate("netrc-test-1");
    let path = TestPath::new("netrc-protected");
    let up = AuthUpstream::start(
        "alice",
        "s3cret pw",
        path.narinfo_request_path(),
        path.narinfo(&[&key]),
    );
    let dir = tempfile::tempdir().unwrap();
    let netrc = dir.path().join("netrc");
    std::fs::write(
        &netrc,
        "machine other.example login bob password nope\n\
         machine 127.0.0.1 login alice password \"s3cret pw\"\n",
    )
    .unwrap();
    let config = |db: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[upstreams]]\nurl = \"http://127.0.0.1:{}\"\npublic_key = \"{}\"\n\
             [cache]\ndb_path = \"{db}\"\n[logging]\nlevel = \"info\"\nformat = \"text\"\n",
            up.port,
            key.public_key()
        )
    };
    let with =
        NcroProcess::start_with_env(&config(":memory:"), &[("NETRC", netrc.to_str().unwrap())]);
    let r = with.get(&path.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", with.logs());
    assert!(with.stdout().contains("basic auth"), "{}", with.logs());
    // The same config without netrc: the upstream refuses ncro.
    let without = NcroProcess::start(&config(":memory:"));
    let r = without.get(&path.narinfo_request_path());
    assert_ne!(r.status, 200, "{}", without.logs());
}
