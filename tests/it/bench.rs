//! `ncro bench` end to end: the real binary as synthetic upstream
//! (`bench upstream`, in the background), as load generator (`bench run`,
//! checked through its `--json` output) and as the demo (`bench local`).
//! Every child has a deadline and is killed by its own PID.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ncro::proto::narinfo::NarInfo;
use ncro::proto::signature::{verify_narinfo, PublicKey};
use serde_json::Value;

use crate::harness::{http_get, tail, test_config, NcroProcess};

const NCRO: &str = env!("CARGO_BIN_EXE_ncro");
/// Upper bound for one `bench run` or `bench local` in these tests.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// A background `ncro bench upstream`; killed on drop.
struct Upstream {
    child: Child,
    addr: SocketAddr,
    public_key: String,
}

impl Upstream {
    fn start(args: &[&str]) -> Upstream {
        let mut child = Command::new(NCRO)
            .args([
                "bench",
                "upstream",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
            ])
            .args(["--for", "300s"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ncro bench upstream");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut addr, mut public_key) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while addr.is_none() || public_key.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => {
                    let _ = child.kill();
                    panic!("bench upstream did not print its address and key: {e:?}");
                }
            };
            if let Some(url) = line.strip_prefix("listening on http://") {
                addr = Some(url.parse().expect("listen address"));
            } else if let Some(k) = line.strip_prefix("public key: ") {
                public_key = Some(k.to_owned());
            }
        }
        Upstream {
            child,
            addr: addr.expect("set above"),
            public_key: public_key.expect("set above"),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill(); // fails only if it already exited
        let _ = self.child.wait();
    }
}

/// Runs `ncro <args>` to completion within [`RUN_LIMIT`]; returns
/// (success, stdout, stderr).
fn ncro(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(NCRO)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn ncro");
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ncro {args:?} ran over {RUN_LIMIT:?}\nstderr: {}",
                tail(&std::fs::read_to_string(&err).unwrap_or_default(), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status.success(), read(&out), read(&err))
}

/// `ncro bench run <args> --json FILE --quiet`; returns the JSON report.
fn bench_run(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut all = vec!["bench", "run", "--quiet", "--timeout", "20s"];
    all.extend_from_slice(args);
    let json_arg = json.to_str().unwrap().to_owned();
    all.extend_from_slice(&["--json", &json_arg]);
    let (ok, stdout, stderr) = ncro(&all);
    assert!(
        ok,
        "bench run {args:?} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("latency    p50"), "{stdout}");
    let text = std::fs::read_to_string(&json).expect("--json wrote the report");
    serde_json::from_str(&text).expect("report is JSON")
}

fn count(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64().unwrap_or(0)
}

#[test]
fn upstream_serves_signed_narinfos_nars_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let lists = dir.path().to_str().unwrap();
    let up = Upstream::start(&[
        "--narinfos",
        "5",
        "--nar-size",
        "3KiB",
        "--write-lists",
        lists,
    ]);
    let hashes = std::fs::read_to_string(dir.path().join("hashes.txt")).unwrap();
    let nars = std::fs::read_to_string(dir.path().join("nars.txt")).unwrap();
    assert_eq!((hashes.lines().count(), nars.lines().count()), (5, 5));
    let key = PublicKey::parse(&up.public_key).unwrap();
    let first = hashes.lines().next().unwrap();
    let r = http_get(up.addr, &format!("/{first}.narinfo")).unwrap();
    assert_eq!(r.status, 200);
    let info = NarInfo::parse(&r.body).unwrap();
    assert!(verify_narinfo(&info, &[key]).is_accepted());
    assert_eq!(info.url, nars.lines().next().unwrap());
    let nar = http_get(up.addr, &format!("/{}", info.url)).unwrap();
    assert_eq!((nar.status, nar.body.len()), (200, 3072));
    assert_eq!(http_get(up.addr, "/nix-cache-info").unwrap().status, 200);
    let missing = "/00000000000000000000000000000000.narinfo";
    assert_eq!(http_get(up.addr, missing).unwrap().status, 404);
}

#[test]
fn count_bounded_hit_run_reports_exactly_that_many_requests() {
    let up = Upstream::start(&["--narinfos", "50"]);
    let url = up.url();
    let v = bench_run(&[
        "-t",
        &url,
        "--synthetic",
        "50",
        "-n",
        "500",
        "--connections",
        "4",
    ]);
    assert_eq!(count(&v, &["requests"]), 500, "{v:#}");
    assert_eq!(count(&v, &["errors"]), 0, "{v:#}");
    assert_eq!(count(&v, &["statuses", "200"]), 500, "{v:#}");
    assert_eq!(v["scenario"], "narinfo-hit");
    assert_eq!(v["mode"], "closed");
    assert!(v["req_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        count(&v, &["bytes"]) > 500 * 300,
        "narinfos are a few hundred bytes"
    );
    for field in ["min", "p50", "p90", "p99", "p999", "max"] {
        assert!(
            count(&v, &["latency_us", field]) > 0,
            "latency_us.{field}: {v:#}"
        );
    }
    assert!(count(&v, &["latency_us", "p50"]) <= count(&v, &["latency_us", "max"]));
}

#[test]
fn miss_scenario_counts_404s_as_answers_and_hit_scenario_as_errors() {
    let up = Upstream::start(&["--narinfos", "50", "--holds", "0..25"]);
    let url = up.url();
    let v = bench_run(&[
        "-t",
        &url,
        "-s",
        "narinfo-miss",
        "-n",
        "200",
        "--connections",
        "2",
    ]);
    assert_eq!(count(&v, &["requests"]), 200, "{v:#}");
    assert_eq!(count(&v, &["statuses", "404"]), 200, "{v:#}");
    assert_eq!(count(&v, &["errors"]), 0, "{v:#}");
    // One connection walks the list in order: half of each pass is held.
    let v = bench_run(&[
        "-t",
        &url,
        "--synthetic",
        "50",
        "-n",
        "100",
        "--connections",
        "1",
    ]);
    assert_eq!(count(&v, &["statuses", "200"]), 50, "{v:#}");
    assert_eq!(count(&v, &["statuses", "404"]), 50, "{v:#}");
    assert_eq!(count(&v, &["errors_by_kind", "http_4xx"]), 50, "{v:#}");
}

#[test]
fn nar_and_closure_scenarios_fetch_and_count_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let lists = dir.path().to_str().unwrap();
    let up = Upstream::start(&[
        "--narinfos",
        "10",
        "--nar-size",
        "100KiB,1KiB",
        "--write-lists",
        lists,
    ]);
    let (url, nars) = (up.url(), dir.path().join("nars.txt"));
    let v = bench_run(&[
        "-t",
        &url,
        "-s",
        "nar",
        "-l",
        nars.to_str().unwrap(),
        "-n",
        "20",
        "--connections",
        "1",
    ]);
    assert_eq!(count(&v, &["statuses", "200"]), 20, "{v:#}");
    assert_eq!(count(&v, &["bytes"]), 10 * 102_400 + 10 * 1024, "{v:#}");
    let hashes = dir.path().join("hashes.txt");
    let v = bench_run(&[
        "-t",
        &url,
        "-s",
        "closure",
        "-l",
        hashes.to_str().unwrap(),
        "-n",
        "20",
        "--connections",
        "1",
    ]);
    // Ten narinfo + NAR pairs: paths 0..9 alternate 100 KiB and 1 KiB.
    assert_eq!(count(&v, &["statuses", "200"]), 20, "{v:#}");
    assert!(count(&v, &["bytes"]) > 5 * 102_400 + 5 * 1024, "{v:#}");
    assert_eq!(count(&v, &["errors"]), 0, "{v:#}");
}

#[test]
fn open_loop_follows_the_rate() {
    let up = Upstream::start(&["--narinfos", "20"]);
    let url = up.url();
    let v = bench_run(&[
        "-t",
        &url,
        "--synthetic",
        "20",
        "--rate",
        "200",
        "-d",
        "1s",
        "--connections",
        "2",
    ]);
    assert_eq!(v["mode"], "open");
    let n = count(&v, &["requests"]);
    assert!(
        (195..=205).contains(&n),
        "200 req/s for 1 s sent {n}: {v:#}"
    );
    assert_eq!(count(&v, &["errors"]), 0, "{v:#}");
}

#[test]
fn injected_failures_are_counted_by_kind() {
    let up = Upstream::start(&["--narinfos", "10", "--fail-rate", "1"]);
    let url = up.url();
    let v = bench_run(&[
        "-t",
        &url,
        "--synthetic",
        "10",
        "-n",
        "30",
        "--connections",
        "2",
    ]);
    assert_eq!(count(&v, &["errors_by_kind", "http_5xx"]), 30, "{v:#}");
    drop(up);
    let up = Upstream::start(&["--narinfos", "10", "--reset-rate", "1"]);
    let url = up.url();
    let v = bench_run(&[
        "-t",
        &url,
        "--synthetic",
        "10",
        "-n",
        "30",
        "--connections",
        "2",
    ]);
    let broken = count(&v, &["errors_by_kind", "reset"]) + count(&v, &["errors_by_kind", "closed"]);
    assert_eq!((count(&v, &["requests"]), broken), (30, 30), "{v:#}");
}

/// Single-flight, end to end: 100 clients ask for each fresh hash at the
/// same moment, on a multi-worker ncro; the synthetic upstream's own
/// counter must show one narinfo request per hash.
#[test]
fn herd_of_clients_costs_one_upstream_request_per_hash() {
    let up = Upstream::start(&["--narinfos", "20", "--latency", "5ms"]);
    let db = tempfile::tempdir().unwrap();
    let url = up.url();
    let upstreams = [(url.as_str(), 10, up.public_key.as_str())];
    let mut config = test_config("127.0.0.1:0", &upstreams, &db.path().join("r.db"));
    config = config.replace("[server]\n", "[server]\nworkers = 2\n");
    let proxy = NcroProcess::start(&config);
    let v = bench_run(&[
        "-t",
        &proxy.url(),
        "-s",
        "narinfo-herd",
        "--synthetic",
        "20",
        "--connections",
        "100",
    ]);
    assert_eq!(count(&v, &["statuses", "200"]), 2000, "{v:#}");
    let stats = http_get(up.addr, "/_bench/stats").unwrap();
    let stats: Value = serde_json::from_slice(&stats.body).expect("stats JSON");
    assert_eq!(
        (count(&stats, &["narinfo"]), count(&stats, &["nar"])),
        (20, 0),
        "{stats}\n{}",
        proxy.logs()
    );
}

#[test]
fn synthetic_narinfos_pass_through_ncro() {
    let up = Upstream::start(&["--narinfos", "40", "--latency", "1ms..3ms"]);
    let db = tempfile::tempdir().unwrap();
    let url = up.url();
    let upstreams = [(url.as_str(), 10, up.public_key.as_str())];
    let proxy = NcroProcess::start(&test_config(
        "127.0.0.1:0",
        &upstreams,
        &db.path().join("r.db"),
    ));
    let target = proxy.url();
    let v = bench_run(&[
        "-t",
        &target,
        "--synthetic",
        "40",
        "-n",
        "200",
        "--connections",
        "4",
    ]);
    assert_eq!(
        count(&v, &["statuses", "200"]),
        200,
        "{v:#}\n{}",
        proxy.logs()
    );
    let v = bench_run(&[
        "-t",
        &target,
        "-s",
        "closure",
        "--synthetic",
        "40",
        "-n",
        "40",
        "--connections",
        "2",
    ]);
    assert_eq!(
        (count(&v, &["statuses", "200"]), count(&v, &["errors"])),
        (40, 0),
        "{v:#}"
    );
}

#[test]
fn local_demo_runs_and_cleans_up() {
    let (ok, stdout, stderr) = ncro(&[
        "bench",
        "local",
        "--duration",
        "1s",
        "--narinfos",
        "200",
        "--connections",
        "8",
    ]);
    assert!(ok, "bench local failed\nstdout: {stdout}\nstderr: {stderr}");
    for needle in [
        "narinfo-miss",
        "narinfo-hit",
        "nar ",
        "direct",
        "ncro/direct =",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    // The ncro it started is gone: its port no longer accepts.
    let proxy: SocketAddr = stdout
        .strip_prefix("ncro http://")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no ncro address in:\n{stdout}"));
    assert!(std::net::TcpStream::connect_timeout(&proxy, Duration::from_secs(1)).is_err());
}
