//! A farm of three `ncro` nodes (127.0.0.2-4) behind HAProxy running the
//! shipped `packaging/haproxy/ncro-farm.cfg` itself (its addresses come
//! from the environment: `NCRO_FRONTEND`, `NCRO_NODE1..3`), with the mesh
//! between the nodes and `server.drain_delay` on each:
//!
//! - the real Nix client substitutes closures through the balancer while
//!   every node in turn is stopped with SIGTERM and started again, then
//!   while the node serving a NAR is killed with SIGKILL in its middle:
//!   no failed substitution;
//! - `ncro bench run` through the balancer during another rolling restart:
//!   no answer other than 200 for paths the upstream has;
//! - locality: narinfo requests the upstream saw per distinct path (≤ 1.1
//!   across all of it), and, once narinfo URLs name the store hash
//!   (`nar_url_mode = "to_self"`), NAR requests served by the node that
//!   answered the path's narinfo (≥ 95 %).
//!
//! Plus the lame duck on its own: `/health` 503 while everything is served.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::e2e_nix::{fetch, harness_scripts, summary, Report};
use crate::fake::{Fault, FakeUpstream, PathMatch, TestKey, TestPath};
use crate::harness::{free_port, tail, test_config, NcroProcess};
use crate::mesh::{keygen, peer, udp_addr};
use crate::metrics::{scrape, Scrape};

/// The merger of `upstreams[].nar_url_mode` flips this to `true`: the nodes
/// then rewrite narinfo URLs to `nar/<storehash>...`, the shipped HAProxy
/// config hashes NARs to the node that answered the narinfo, and the NAR
/// locality assertion below becomes active (it also turns itself on
/// whenever served narinfo URLs name the store hash).
const TO_SELF: bool = false;

/// Lame duck of every node: longer than HAProxy needs to take a node out
/// (`fall 2` checks `inter 1s` apart in the shipped config, so ≤ 3 s).
const DRAIN_DELAY: &str = "4s";
/// Short gossip rounds keep the test quick (ncro's default is 30 s).
const GOSSIP_INTERVAL: &str = "500ms";
/// How long one node may take to leave and come back.
const NODE_LIMIT: Duration = Duration::from_secs(60);
const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

/// HAProxy in the foreground (`-db`) as our child; killed by PID on drop.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    frontend: SocketAddr,
}

impl Haproxy {
    fn start(nodes: &[SocketAddr]) -> Haproxy {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/haproxy/ncro-farm.cfg");
        let dir = tempfile::tempdir().expect("tempdir");
        let frontend: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-f").arg(&cfg).arg("-db");
        cmd.env("NCRO_FRONTEND", frontend.to_string());
        for (i, n) in nodes.iter().enumerate() {
            cmd.env(format!("NCRO_NODE{}", i + 1), n.to_string());
        }
        let out = std::fs::File::create(dir.path().join("haproxy.log")).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run haproxy (apt-get install haproxy; .ci/run installs it): {e}")
            });
        let h = Haproxy {
            child,
            dir,
            frontend,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = crate::harness::HttpConn::connect(frontend)
                .and_then(|mut c| c.request("GET", "/nix-cache-info", &[]))
                .is_ok_and(|r| r.status == 200);
            if ok {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not serve /nix-cache-info on {frontend} within 20s\n{}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.frontend)
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("haproxy.log"));
        tail(&log.unwrap_or_default(), 40)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- haproxy log ---\n{}", self.log());
        }
        let _ = self.child.kill(); // our own child, by PID; fails only if it exited
        let _ = self.child.wait();
    }
}

/// A child process killed by PID on drop (the bench load generator).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill(); // fails only if it already exited
        let _ = self.0.wait();
    }
}

/// One node: its config (fixed address, database and mesh key, so a
/// restart is the same node), the running process and the ones before.
struct Node {
    addr: SocketAddr,
    config: String,
    live: Option<NcroProcess>,
    past: Vec<NcroProcess>,
}

impl Node {
    fn start(&mut self) {
        self.live = Some(NcroProcess::start(&self.config));
    }

    fn proc(&self) -> &NcroProcess {
        self.live.as_ref().expect("node running")
    }

    /// Access-log lines of every process this node ran.
    fn access_lines(&self) -> Vec<serde_json::Value> {
        self.past
            .iter()
            .chain(self.live.as_ref())
            .flat_map(|p| {
                p.stdout()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["target"] == "ncro::access")
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `/health` answers with `status` in the live process's access log
    /// (HAProxy's checks: 2 in a row move a node in or out).
    fn health_answers(&self, status: u64) -> usize {
        let out = self.proc().stdout();
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["path"] == "/health" && v["fields"]["status"] == status)
            .count()
    }

    fn wait_health(&self, status: u64, n: usize, what: &str) {
        let deadline = Instant::now() + NODE_LIMIT;
        while self.health_answers(status) < n {
            assert!(
                Instant::now() < deadline,
                "{what}: HAProxy's checks did not get {n} × {status} from {}\n{}",
                self.addr,
                self.proc().logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: lame duck (checked from outside: /health 503 with
    /// "draining" while narinfo is served), HAProxy takes the node out,
    /// it exits 0; `down` runs while it is stopped; then the same node
    /// starts again and HAProxy takes it in. Returns how long the start
    /// took (from the command to accepting connections).
    fn rolling_restart(&mut self, probe: &str, down: impl FnOnce()) -> Duration {
        let p = self.live.as_ref().expect("node running");
        p.sigterm();
        assert!(
            p.wait_for_log("lame duck", NODE_LIMIT),
            "no lame-duck line\n{}",
            p.logs()
        );
        let h = p.get("/health");
        assert_eq!(h.status, 503, "lame duck: /health is 503\n{}", p.logs());
        assert!(h.text().contains("\"status\":\"draining\""), "{}", h.text());
        assert_eq!(p.get(probe).status, 200, "still serving during the lame duck");
        self.wait_health(503, 2, "lame duck");
        let mut p = self.live.take().expect("node running");
        let status = p.wait_exit(NODE_LIMIT);
        assert!(status.success(), "{status}\n{}", p.logs());
        self.past.push(p);
        down();
        let t = Instant::now();
        self.start();
        let took = t.elapsed();
        self.wait_health(200, 2, "restart");
        took
    }
}

fn node_config(
    addr: SocketAddr,
    up: &FakeUpstream,
    key: &TestKey,
    db: &Path,
    mesh: (&Path, SocketAddr, Vec<toml::Value>),
) -> String {
    let mut text = test_config(
        &addr.to_string(),
        &[(&up.url(), 10, &key.public_key())],
        db,
    );
    if TO_SELF {
        text = text.replacen(
            "priority = 10\n",
            "priority = 10\nnar_url_mode = \"to_self\"\n",
            1,
        );
    }
    let mut table: toml::Table = toml::from_str(&text).expect("valid TOML");
    let set = |t: &mut toml::Table, section: &str, k: &str, v: toml::Value| {
        let s = t
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        s.as_table_mut().expect("table").insert(k.into(), v);
    };
    set(&mut table, "server", "workers", 1.into());
    set(&mut table, "server", "drain_delay", DRAIN_DELAY.into());
    set(&mut table, "logging", "level", "info,ncro::access=debug".into());
    set(&mut table, "logging", "format", "json".into());
    set(&mut table, "mesh", "enabled", true.into());
    set(&mut table, "mesh", "bind_addr", mesh.1.to_string().into());
    let key_path = mesh.0.to_string_lossy().into_owned();
    set(&mut table, "mesh", "private_key", key_path.into());
    set(&mut table, "mesh", "gossip_interval", GOSSIP_INTERVAL.into());
    set(&mut table, "mesh", "peers", toml::Value::Array(mesh.2));
    toml::to_string(&table).expect("TOML")
}

/// Narinfo requests the upstream saw, per distinct path: (requests, paths).
fn narinfo_load(up: &FakeUpstream) -> (usize, usize) {
    let mut per: HashMap<String, usize> = HashMap::new();
    for r in up.requests() {
        if r.path.ends_with(".narinfo") {
            *per.entry(r.path).or_default() += 1;
        }
    }
    (per.values().sum(), per.len())
}

/// NAR requests answered 2xx by a node that also answered the narinfo of
/// the store hash the NAR path names: (local, all). Only meaningful when
/// NAR paths name the store hash (`to_self`).
fn nar_locality(nodes: &[Node]) -> (usize, usize) {
    let (mut local, mut all) = (0, 0);
    for n in nodes {
        let lines = n.access_lines();
        let field = |v: &serde_json::Value, k: &str| v["fields"][k].clone();
        let answered: HashSet<String> = lines
            .iter()
            .filter(|v| field(v, "status") == 200)
            .filter_map(|v| field(v, "path").as_str().map(str::to_owned))
            .filter_map(|p| p.strip_suffix(".narinfo").map(|h| h[1..].to_owned()))
            .collect();
        for v in &lines {
            let ok = field(v, "status").as_u64().is_some_and(|s| (200..300).contains(&s));
            let path = field(v, "path");
            let Some(hash) = path.as_str().and_then(|p| p.strip_prefix("/nar/")) else {
                continue;
            };
            if ok {
                all += 1;
                local += usize::from(answered.contains(hash.get(..32).unwrap_or(hash)));
            }
        }
    }
    (local, all)
}

/// Closures for the client: `CLOSURES` chains of 3 small paths each.
const CLOSURES: usize = 24;

#[test]
fn a_farm_behind_the_shipped_haproxy_config_restarts_without_failed_substitutions() {
    let scripts = harness_scripts().unwrap_or_else(|e| panic!("{e}"));
    let key = TestKey::generate("farm-cache-1");
    let mut builder = FakeUpstream::builder().cache_info(40);
    let mut tops = Vec::new();
    for c in 0..CLOSURES {
        let base = TestPath::new(&format!("farm-base-{c}"));
        let mid = TestPath::new(&format!("farm-mid-{c}")).reference(&base);
        let top = TestPath::new(&format!("farm-top-{c}")).reference(&mid);
        builder = builder.path(&base, &key).path(&mid, &key).path(&top, &key);
        tops.push(top.store_path());
    }
    // Cut mid-stream by a SIGKILL: its first NAR request trickles.
    let big = TestPath::with_contents("farm-big", &crate::fake::random_bytes(2 << 20));
    let trickle = Fault::Trickle(32 * 1024, Duration::from_millis(40));
    builder = builder.path(&big, &key).rule(
        PathMatch::exact(&big.nar_request_path()),
        Fault::first_n(1, trickle),
    );
    // For the load generator: paths only it asks for.
    let bench: Vec<TestPath> = (0..200)
        .map(|i| TestPath::new(&format!("farm-bench-{i}")))
        .collect();
    for p in &bench {
        builder = builder.path(p, &key);
    }
    let up = builder.start();

    let dir = tempfile::tempdir().expect("tempdir");
    let ids: Vec<(PathBuf, String)> = (0..3)
        .map(|i| keygen(dir.path(), &format!("node{i}.key")))
        .collect();
    let udps: Vec<SocketAddr> = IPS.iter().map(|ip| udp_addr(ip)).collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let addr: SocketAddr = format!("{}:{}", IPS[i], free_port()).parse().unwrap();
            let peers = (0..3)
                .filter(|&j| j != i)
                .map(|j| peer(udps[j], &ids[j].1))
                .collect();
            let db = dir.path().join(format!("routes{i}.db"));
            let config = node_config(addr, &up, &key, &db, (&ids[i].0, udps[i], peers));
            Node {
                addr,
                config,
                live: None,
                past: Vec::new(),
            }
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    let lb = Haproxy::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>());
    for n in &nodes {
        n.wait_health(200, 2, "farm start");
    }
    let url = lb.url();
    let keys = key.public_key();
    let mut report = Report::default();
    let probe = format!("/{}.narinfo", &tops[0]["/nix/store/".len()..][..32]);

    // (a) Rolling restart with SIGTERM while the client substitutes: run r
    // asks for closures 0..=r, so new paths keep coming while nodes are out.
    let started = Instant::now();
    let restarted = AtomicBool::new(false);
    let done_runs = AtomicUsize::new(0);
    let mut starts = Vec::new();
    let (runs, failed) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let (mut runs, mut failed) = (0usize, Vec::new());
            let mut after_restarts = 0;
            while after_restarts < 2 && runs < 120 && started.elapsed() < Duration::from_secs(300)
            {
                if restarted.load(Ordering::Relaxed) {
                    after_restarts += 1;
                }
                let paths: Vec<&str> = tops[..=runs.min(CLOSURES - 1)]
                    .iter()
                    .map(String::as_str)
                    .collect();
                let log = dir.path().join(format!("fetch-{runs}.log"));
                let r = fetch(&scripts, &url, &keys, &paths, &["-o", "--max-jobs 4"], &log);
                if r.code != Some(0) {
                    failed.push(format!("run {runs}: {}\n{}", summary(&r), tail(&r.output, 20)));
                }
                runs += 1;
                done_runs.store(runs, Ordering::Relaxed);
            }
            (runs, failed)
        });
        // Let the client warm the farm first.
        std::thread::sleep(Duration::from_secs(2));
        for n in nodes.iter_mut() {
            // Stay down for two client runs: they bring new paths, which
            // this node's peers race and gossip while it cannot hear it.
            let down = || {
                let (from, t) = (done_runs.load(Ordering::Relaxed), Instant::now());
                while done_runs.load(Ordering::Relaxed) < from + 2 && t.elapsed() < NODE_LIMIT {
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            starts.push(n.rolling_restart(&probe, down));
        }
        restarted.store(true, Ordering::Relaxed);
        client.join().expect("client thread")
    });
    report.step(
        "sigterm_roll",
        failed.is_empty() && runs >= 3,
        &format!("{runs} client runs during a rolling restart of 3 nodes, {} failed", failed.len()),
        &failed.join("\n"),
    );
    let slowest = starts.iter().max().copied().unwrap_or_default();
    let retried: Vec<String> = nodes
        .iter()
        .filter(|n| n.proc().stdout().contains("address in use; retrying"))
        .map(|n| n.addr.to_string())
        .collect();
    report.step(
        "restart_start",
        retried.is_empty(),
        &format!(
            "restarted at once on the same ports (HTTP and gossip): slowest start to accepting {:.2}s, port retries on {retried:?}",
            slowest.as_secs_f64()
        ),
        "",
    );
    // Paths first asked while a node was down come back to it when it
    // returns; without the mesh's catch-up it races them again (1.125
    // measured), with it the farm asks each path once.
    let (asked, distinct) = narinfo_load(&up);
    let roll_ratio = asked as f64 / distinct.max(1) as f64;

    // (b) SIGKILL the node serving a NAR in the middle of it.
    let before: Vec<f64> = nodes
        .iter()
        .map(|n| scrape(n.proc()).value("ncro_nar_requests_total", &[]))
        .collect();
    let (kill_run, killed) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let log = dir.path().join("fetch-big.log");
            fetch(&scripts, &url, &keys, &[&big.store_path()], &[], &log)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let serving = loop {
            let now: Vec<f64> = nodes
                .iter()
                .map(|n| scrape(n.proc()).value("ncro_nar_requests_total", &[]))
                .collect();
            if let Some(i) = (0..3).find(|&i| now[i] > before[i]) {
                break Some(i);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(i) = serving {
            // The trickle takes ~2.6 s; cut it well inside.
            std::thread::sleep(Duration::from_millis(500));
            let mut p = nodes[i].live.take().expect("node running");
            p.kill();
            nodes[i].past.push(p);
        }
        (client.join().expect("client thread"), serving)
    });
    let nar_asks = up.request_count(&big.nar_request_path());
    let ranged = up
        .requests()
        .iter()
        .filter(|r| r.path == big.nar_request_path() && r.header("range").is_some())
        .count();
    report.step(
        "sigkill_nar",
        killed.is_some() && kill_run.code == Some(0),
        &format!(
            "node {killed:?} killed mid-NAR; client {}; upstream NAR requests {nar_asks} ({ranged} with Range)",
            summary(&kill_run)
        ),
        &kill_run.output,
    );
    if let Some(i) = killed {
        nodes[i].start();
        nodes[i].wait_health(200, 2, "restart after SIGKILL");
    }

    // (c) Load through the balancer during another rolling restart.
    let list = dir.path().join("hashes.txt");
    let hashes: Vec<&str> = bench.iter().map(|p| p.hash.as_str()).collect();
    std::fs::write(&list, hashes.join("\n") + "\n").expect("write list");
    let bench_run = |extra: &[&str], json: &Path| -> ChildGuard {
        let child = Command::new(env!("CARGO_BIN_EXE_ncro"))
            .args(["bench", "run", "--quiet", "--target", &url, "--scenario"])
            .args(["narinfo-hit", "--list"])
            .arg(&list)
            .args(["--connections", "4", "--threads", "1", "--timeout", "20s"])
            .args(extra)
            .arg("--json")
            .arg(json)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ncro bench run");
        ChildGuard(child)
    };
    let wait_bench = |mut g: ChildGuard, limit: Duration| -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match g.0.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => return false, // killed by the guard
            }
        }
    };
    let warm_json = dir.path().join("warm.json");
    let warmed = wait_bench(bench_run(&["--once"], &warm_json), Duration::from_secs(60));
    let load_json = dir.path().join("load.json");
    let load = bench_run(&["--rate", "150", "--duration", "45s"], &load_json);
    let roll_started = Instant::now();
    for n in nodes.iter_mut() {
        n.rolling_restart(&probe, || ());
    }
    let roll_took = roll_started.elapsed();
    let finished = wait_bench(load, Duration::from_secs(120));
    let read = |p: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    };
    let (warm, load) = (read(&warm_json), read(&load_json));
    let non_200 = |v: &serde_json::Value| -> u64 {
        let statuses = v["statuses"].as_object().cloned().unwrap_or_default();
        let other: u64 = statuses
            .iter()
            .filter(|(k, _)| k.as_str() != "200")
            .filter_map(|(_, n)| n.as_u64())
            .sum();
        other + v["errors"].as_u64().unwrap_or(1)
    };
    let load_requests = load["requests"].as_u64().unwrap_or(0);
    report.step(
        "bench_roll",
        warmed && finished && non_200(&warm) == 0 && non_200(&load) == 0 && load_requests > 0
            && roll_took < Duration::from_secs(45),
        &format!(
            "{load_requests} requests during a {:.1}s rolling restart: statuses {}, errors {}",
            roll_took.as_secs_f64(),
            load["statuses"],
            load["errors"]
        ),
        &format!("warm: {warm}\nload: {load}"),
    );

    // Locality over everything above.
    {
        let (a, d) = narinfo_load(&up);
        report.step(
            "narinfo_local",
            (a as f64) <= 1.1 * d as f64 && roll_ratio <= 1.1,
            &format!(
                "upstream narinfo requests per distinct path {:.3} ({a} for {d} paths; {roll_ratio:.3} after the SIGTERM roll)",
                a as f64 / d.max(1) as f64
            ),
            "",
        );
    }
    let served = crate::harness::HttpConn::connect(lb.frontend)
        .and_then(|mut c| c.request("GET", &probe, &[]))
        .map(|r| r.text())
        .unwrap_or_default();
    let url_line = served.lines().find(|l| l.starts_with("URL: ")).unwrap_or("");
    let names_store_hash = url_line.starts_with(&format!("URL: nar/{}", &probe[1..33]));
    let (local, all) = nar_locality(&nodes);
    let pct = 100.0 * local as f64 / all.max(1) as f64;
    if TO_SELF || names_store_hash {
        report.step(
            "nar_local",
            names_store_hash && all > 0 && pct >= 95.0,
            &format!("NAR requests served by the node that answered the narinfo: {pct:.1}% ({local}/{all}); {url_line}"),
            "",
        );
    } else {
        eprintln!(
            "NAR locality not applicable: narinfo URLs name the file hash ({url_line}), not the store hash; {all} NAR requests"
        );
    }
    report.finish(&format!(
        "farm of 3 behind haproxy {} (packaging/haproxy/ncro-farm.cfg)",
        lb.url()
    ));
}

/// `server.drain_delay` on its own: after SIGTERM `/health` answers 503
/// with `"status":"draining"` and the phase metric says `lame_duck`, while
/// narinfo requests (hits and misses) are answered; then the node drains
/// and exits 0. Without it (the default, 0) SIGTERM drains at once.
#[test]
fn sigterm_with_a_drain_delay_is_a_lame_duck_then_drains() {
    let key = TestKey::generate("lame-duck-1");
    let (a, b) = (TestPath::new("hit"), TestPath::new("miss"));
    let up = FakeUpstream::builder()
        .path(&a, &key)
        .path(&b, &key)
        .start();
    let db = crate::routing::db_dir();
    let config = crate::routing::NcroConfig::new(
        &[crate::routing::entry(up.url(), 10, &key)],
        &db.path().join("r.db"),
    )
    .set("server", "drain_delay", "3s")
    .render();
    let mut ncro = NcroProcess::start(&config);
    assert_eq!(ncro.get(&a.narinfo_request_path()).status, 200);
    let h = ncro.get("/health");
    assert_eq!(h.status, 200);
    let phase = |m: &Scrape, p: &str| m.value("ncro_shutdown_phase", &[("phase", p)]);
    let m = scrape(&ncro);
    assert_eq!((phase(&m, "serving"), phase(&m, "lame_duck")), (1.0, 0.0));

    let t = Instant::now();
    ncro.sigterm();
    assert!(ncro.wait_for_log("lame duck", Duration::from_secs(10)), "{}", ncro.logs());
    let h = ncro.get("/health");
    assert_eq!(h.status, 503, "{}", h.text());
    let json: serde_json::Value = serde_json::from_slice(&h.body).expect("JSON");
    assert_eq!(json["status"], "draining");
    assert_eq!(h.header("content-type"), Some("application/json"));
    let m = scrape(&ncro);
    assert_eq!((phase(&m, "serving"), phase(&m, "lame_duck")), (0.0, 1.0));
    // Everything is still served: a hit, a miss raced upstream, /metrics.
    assert_eq!(ncro.get(&a.narinfo_request_path()).status, 200);
    assert_eq!(ncro.get(&b.narinfo_request_path()).status, 200);
    assert_eq!(ncro.get(&b.nar_request_path()).status, 200);
    let status = ncro.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(3), "exited after {took:?}, before the delay");
    let logs = ncro.stdout();
    let lame = logs.find("lame duck").expect("lame duck logged");
    let drain = logs.find("shutting down: draining connections").expect("drain logged");
    assert!(lame < drain, "the lame duck comes first\n{logs}");

    // The default: no lame duck, the drain starts at once.
    let mut plain = NcroProcess::start(
        &crate::routing::NcroConfig::new(
            &[crate::routing::entry(up.url(), 10, &key)],
            &db.path().join("r2.db"),
        )
        .render(),
    );
    let t = Instant::now();
    plain.sigterm();
    assert!(plain.wait_exit(Duration::from_secs(30)).success());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!plain.stdout().contains("lame duck"), "{}", plain.stdout());
}
