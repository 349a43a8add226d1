//! `ncro bench local`: the demo. Two synthetic upstreams in this process
//! (one answers at once, one after 2–6 ms), an ncro child process in front
//! of them, all on loopback; then narinfo-miss, narinfo-hit and nar through
//! ncro and narinfo-hit straight to the fast upstream, a compact report,
//! and everything stopped (the child by its PID).
//!
//! With `--nginx PATH`, the narinfo scenarios also run through nginx as a
//! fallback chain in front of the same caches ([`nginx`]), and the report
//! gives ncro's rates against it. Nothing is pinned: ncro, nginx, the
//! caches and the load generator share the machine's cores, as they do
//! when the clients run on the proxy's host.

mod nginx;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::{LocalArgs, Scenario};
use super::dataset::{self, Dataset};
use super::report::{human_bytes, ms, Report};
use super::run::{self, Limit, Plan, Workload};
use super::spec::LatencySpec;
use super::upstream::{self, Behaviour, ServerConfig, UpstreamHandle};
use super::BenchError;
use crate::proto::signature::PublicKey;

const SEED: u64 = 1;
/// How long ncro may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long ncro may take to drain after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

pub fn run(a: &LocalArgs) -> Result<i32, BenchError> {
    if a.connections == 0 || a.narinfos == 0 {
        return Err(BenchError::Usage(
            "--connections and --narinfos must be at least 1".into(),
        ));
    }
    let key = super::load_key(None)?;
    let data = Arc::new(Dataset::build(SEED, a.narinfos, &a.nar_size.0, &key)?);
    let fast = start_upstream(&data, LatencySpec::default())?;
    let slow_latency = LatencySpec {
        min: Duration::from_millis(2),
        max: Duration::from_millis(6),
    };
    let slow = start_upstream(&data, slow_latency)?;
    let workers = a
        .workers
        .unwrap_or_else(|| (run::default_threads(usize::MAX) / 2).max(1));
    let mut proxy = Proxy::start(&[fast.url(), slow.url()], &key.public(), workers)?;
    println!(
        "ncro {} (workers: {workers}) in front of {} (no delay) and {} ({slow_latency} delay); {} paths, NARs {:?} bytes",
        proxy.url(),
        fast.url(),
        slow.url(),
        a.narinfos,
        a.nar_size.0
    );
    let chain = match &a.nginx {
        Some(bin) => match nginx::Nginx::start(bin, &fast.url(), &slow.url()) {
            Ok(n) => {
                println!(
                    "nginx fallback chain {} in front of the same caches",
                    n.url()
                );
                Some(n)
            }
            Err(e) => {
                let _ = proxy.stop();
                fast.stop();
                slow.stop();
                return Err(e);
            }
        },
        None => None,
    };
    let result = scenarios(
        a,
        &proxy.url(),
        &fast.url(),
        chain.as_ref().map(|n| n.url()),
    );
    if let Some(n) = chain {
        n.stop();
    }
    let stopped = proxy.stop();
    fast.stop();
    slow.stop();
    let rows = result?;
    print!("{}", render(&rows));
    let errors: u64 = rows.iter().map(|(_, r)| r.errors).sum();
    match stopped {
        Ok(()) if errors == 0 => Ok(0),
        Ok(()) => {
            eprintln!("error: {errors} requests failed (see the errors column)");
            Ok(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
    }
}

fn start_upstream(data: &Arc<Dataset>, latency: LatencySpec) -> Result<UpstreamHandle, BenchError> {
    let cfg = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        threads: 1,
        cpus: Vec::new(),
        behaviour: Behaviour {
            latency,
            ..Behaviour::default()
        },
    };
    upstream::start(data.clone(), cfg)
}

/// Runs the scenarios in order; each row is (what it went through, report).
fn scenarios(
    a: &LocalArgs,
    proxy: &str,
    direct: &str,
    chain: Option<String>,
) -> Result<Vec<(&'static str, Report)>, BenchError> {
    let hashes = || {
        Workload::Hashes(
            (0..a.narinfos)
                .map(|i| dataset::store_hash(SEED, i))
                .collect(),
        )
    };
    let nars = Workload::Urls(
        (0..a.narinfos)
            .map(|i| dataset::nar_url(SEED, i).into())
            .collect(),
    );
    // The hit runs warm up first so the route cache holds every path.
    let warm = a.duration.min(Duration::from_secs(1));
    let mut steps = vec![
        (
            "ncro",
            proxy,
            Scenario::NarinfoMiss,
            Workload::Random,
            Duration::ZERO,
        ),
        ("ncro", proxy, Scenario::NarinfoHit, hashes(), warm),
        ("ncro", proxy, Scenario::Nar, nars, Duration::ZERO),
        ("direct", direct, Scenario::NarinfoHit, hashes(), warm),
    ];
    if let Some(chain) = chain.as_deref() {
        // The chain keeps nothing: every request goes to the fast cache
        // (which has every path), a miss to both.
        steps.push((
            "nginx",
            chain,
            Scenario::NarinfoMiss,
            Workload::Random,
            Duration::ZERO,
        ));
        steps.push(("nginx", chain, Scenario::NarinfoHit, hashes(), warm));
    }
    let mut rows = Vec::new();
    for (via, url, scenario, workload, warmup) in steps {
        let mut plan = Plan::new(url, scenario, workload)?;
        plan.connections = a.connections;
        plan.threads = run::default_threads(a.connections);
        plan.limit = Limit::Duration(a.duration);
        plan.warmup = warmup;
        eprintln!(
            "running {} via {via} for {:?}",
            scenario.name(),
            a.duration + warmup
        );
        rows.push((via, run::execute(Arc::new(plan), true)?));
    }
    Ok(rows)
}

/// The compact table, then ncro's cached-narinfo rate against the
/// upstream's own.
fn render(rows: &[(&str, Report)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<13} {:<7} {:>9} {:>11} {:>8} {:>8} {:>8} {:>7}",
        "scenario", "via", "req/s", "bytes/s", "p50", "p99", "p99.9", "errors"
    );
    for (via, r) in rows {
        let l = &r.latency_us;
        let _ = writeln!(
            s,
            "{:<13} {:<7} {:>9.0} {:>11} {:>8} {:>8} {:>8} {:>7}",
            r.info.scenario,
            via,
            r.req_per_s,
            human_bytes(r.bytes_per_s),
            ms(l.p50),
            ms(l.p99),
            ms(l.p999),
            r.errors
        );
    }
    let rate = |via: &str, scenario: &str| {
        rows.iter()
            .find(|(v, r)| *v == via && r.info.scenario == scenario)
            .map(|(_, r)| r.req_per_s)
    };
    if let (Some(p), Some(d)) = (rate("ncro", "narinfo-hit"), rate("direct", "narinfo-hit")) {
        let _ = writeln!(
            s,
            "\nnarinfo-hit through ncro: {p:.0} req/s; the synthetic upstream directly: {d:.0} req/s (ncro/direct = {:.2}).\nAll processes share this machine's CPUs, so the ratio says more than the absolute numbers.",
            p / d.max(1e-9)
        );
    }
    for scenario in ["narinfo-hit", "narinfo-miss"] {
        if let (Some(p), Some(n)) = (rate("ncro", scenario), rate("nginx", scenario)) {
            let _ = writeln!(
                s,
                "{scenario}: ncro {p:.0} req/s, nginx fallback chain {n:.0} req/s (ncro/nginx = {:.2}; nothing pinned, same cores).",
                p / n.max(1e-9)
            );
        }
    }
    s
}

/// An ncro child process on a loopback port; killed on drop if still up.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    exited: bool,
}

impl Proxy {
    fn start(upstreams: &[String], key: &PublicKey, workers: usize) -> Result<Proxy, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "ncro-bench-local-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::Proxy(format!("temp dir: {e}")))?;
        let mut last = String::new();
        // A port found free can be taken before ncro binds it; try again.
        for _ in 0..3 {
            let addr = free_port()?;
            let config = config_toml(addr, upstreams, key, workers);
            let mut p = Proxy::spawn(&dir, addr, &config)?;
            match p.wait_accepting() {
                Ok(()) => return Ok(p),
                Err(logs) => last = logs,
            }
        }
        let _ = std::fs::remove_dir_all(&dir); // best effort; the error below matters more
        Err(BenchError::Proxy(format!("did not start:\n{last}")))
    }

    fn spawn(dir: &std::path::Path, addr: SocketAddr, config: &str) -> Result<Proxy, BenchError> {
        let io = |what: &str, e: std::io::Error| BenchError::Proxy(format!("{what}: {e}"));
        let path = dir.join("ncro.toml");
        std::fs::write(&path, config).map_err(|e| io("writing config", e))?;
        let exe = std::env::current_exe().map_err(|e| io("finding the ncro binary", e))?;
        let log = std::fs::File::create(dir.join("ncro.log")).map_err(|e| io("log file", e))?;
        let log2 = log.try_clone().map_err(|e| io("log file", e))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // The demo's config must win over the caller's NCRO_* settings.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("NCRO_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().map_err(|e| io("starting ncro", e))?;
        Ok(Proxy {
            child,
            addr,
            dir: dir.to_owned(),
            exited: false,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `Err(logs)` if ncro exited or never accepted.
    fn wait_accepting(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                return Err(format!("ncro exited with {status}\n{}", self.log_tail()));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "ncro did not accept on {} within {START_DEADLINE:?}\n{}",
            self.addr,
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("ncro.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then wait for the drain; SIGKILL after the deadline.
    fn stop(&mut self) -> Result<(), BenchError> {
        if self.exited {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| BenchError::Proxy("pid out of range".into()))?;
        // SAFETY: kill(2) on our own unreaped child, so the PID is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = true;
                    return if status.success() {
                        Ok(())
                    } else {
                        Err(BenchError::Proxy(format!(
                            "exited with {status}\n{}",
                            self.log_tail()
                        )))
                    };
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(BenchError::Proxy(format!("waiting for exit: {e}"))),
            }
        }
        self.kill();
        Err(BenchError::Proxy(
            "did not stop within 10s of SIGTERM; killed".into(),
        ))
    }

    fn kill(&mut self) {
        if !self.exited {
            // Fails only if the child already exited; it is reaped below.
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Proxy(format!("no free port: {e}")))?;
    l.local_addr()
        .map_err(|e| BenchError::Proxy(format!("no free port: {e}")))
}

fn config_toml(addr: SocketAddr, upstreams: &[String], key: &PublicKey, workers: usize) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = format!(
        "[server]\nlisten = {}\nworkers = {workers}\n\n",
        q(&addr.to_string())
    );
    for url in upstreams {
        let _ = writeln!(
            out,
            "[[upstreams]]\nurl = {}\npriority = 10\npublic_key = {}\n",
            q(url),
            q(&key.to_nix_string())
        );
    }
    out.push_str(
        "[cache]\ndb_path = \":memory:\"\n\n[logging]\nlevel = \"warn\"\nformat = \"text\"\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_ncro_config() {
        let key = crate::proto::signature::SecretKey::generate("k-1")
            .unwrap()
            .public();
        let text = config_toml(
            "127.0.0.1:1234".parse().unwrap(),
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            &key,
            1,
        );
        let cfg = crate::config::Config::from_toml(
            &text,
            crate::config::Source::Embedded,
            "t",
            &crate::config::env::MapEnv::new(&[]),
        )
        .unwrap();
        assert_eq!(cfg.upstreams.len(), 2);
        assert_eq!(cfg.cache.db_path, ":memory:");
        assert_eq!(cfg.server.workers, Some(1));
    }
}
