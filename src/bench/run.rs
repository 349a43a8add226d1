//! `ncro bench run`: the load generator.
//!
//! N client threads, each a monoio runtime (FusionDriver, timers on)
//! running its share of the connections; each connection does keep-alive
//! GETs one at a time ([`conn`]). Closed loop: a connection sends its next
//! request when the previous one completes. Open loop (`--rate`): each
//! connection follows its own schedule of intended send times and latency
//! is counted from the intended time, so a server that falls behind shows
//! its queueing instead of silently slowing the client down.
//!
//! Threads keep their own [`Stats`] (HDR histogram and counters) and hand
//! them back at the end, where they are merged; the only cross-thread
//! traffic while running is a few relaxed atomic counters for the live
//! progress line.

mod conn;
mod herd;

use std::io::IsTerminal as _;
use std::net::ToSocketAddrs as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::args::{RunArgs, Scenario};
use super::dataset;
use super::report::{human_bytes, Report, RunInfo, Stats};
use super::wire::Target;
use super::BenchError;
use crate::http::client::Origin;
use crate::proto::store_path::StoreHash;

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// Measure for this long after the warm-up.
    Duration(Duration),
    /// Stop after this many measured requests.
    Requests(u64),
}

/// What the requests name.
#[derive(Debug, Clone)]
pub enum Workload {
    /// `/<hash>.narinfo` (narinfo-hit and -herd; closure adds the NARs).
    Hashes(Vec<StoreHash>),
    /// URL paths without the leading `/` (nar).
    Urls(Vec<Box<str>>),
    /// Fresh random hashes (narinfo-miss).
    Random,
}

impl Workload {
    /// Entries in the list (1 for random hashes: one endless source).
    pub fn len(&self) -> usize {
        match self {
            Workload::Hashes(v) => v.len(),
            Workload::Urls(v) => v.len(),
            Workload::Random => 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A validated run: everything the threads need, immutable.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub target_url: String,
    pub scenario: Scenario,
    pub workload: Workload,
    pub connections: usize,
    pub threads: usize,
    pub cpus: Vec<usize>,
    pub limit: Limit,
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub seed: u64,
    /// `--once`: the list cursor all connections share (None: each
    /// connection walks the list on its own, wrapping around).
    pub once: Option<Arc<AtomicUsize>>,
    /// Set for the narinfo-herd scenario.
    pub herd: Option<Arc<herd::Herd>>,
}

impl Plan {
    /// A closed-loop plan with defaults, for programmatic use (`bench local`).
    pub fn new(
        target_url: &str,
        scenario: Scenario,
        workload: Workload,
    ) -> Result<Plan, BenchError> {
        Ok(Plan {
            target: resolve_target(target_url)?,
            target_url: target_url.trim_end_matches('/').to_owned(),
            scenario,
            workload,
            connections: 64,
            threads: default_threads(64),
            cpus: Vec::new(),
            limit: Limit::Duration(Duration::from_secs(10)),
            rate: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(10),
            seed: 1,
            once: None,
            herd: None,
        })
    }

    pub fn from_args(a: &RunArgs) -> Result<Plan, BenchError> {
        if a.connections == 0 {
            return Err(BenchError::Usage("--connections must be at least 1".into()));
        }
        if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err(BenchError::Usage("--rate must be a positive number".into()));
        }
        if a.requests == Some(0) {
            return Err(BenchError::Usage("--requests must be at least 1".into()));
        }
        if a.once && a.scenario == Scenario::NarinfoMiss {
            return Err(BenchError::Usage(
                "--once walks a list; narinfo-miss has none".into(),
            ));
        }
        if a.scenario == Scenario::NarinfoHerd && (a.rate.is_some() || a.once) {
            return Err(BenchError::Usage(
                "narinfo-herd sets its own pace: no --rate or --once".into(),
            ));
        }
        let workload = workload(a.scenario, a.list.as_deref(), a.synthetic, a.seed)?;
        let mut plan = Plan::new(&a.target, a.scenario, workload)?;
        plan.connections = a.connections;
        plan.threads = a.threads.unwrap_or_else(|| default_threads(a.connections));
        plan.threads = plan.threads.clamp(1, a.connections);
        plan.cpus = a.cpus.clone();
        plan.limit = match a.requests {
            Some(n) => Limit::Requests(n),
            None => Limit::Duration(a.duration),
        };
        plan.rate = a.rate;
        plan.warmup = a.warmup;
        plan.timeout = a.timeout;
        plan.seed = a.seed;
        plan.once = a.once.then(Arc::default);
        if a.scenario == Scenario::NarinfoHerd {
            let len = plan.workload.len() as u64;
            let rounds = a
                .requests
                .map_or(len, |n| len.min(n / a.connections as u64));
            plan.herd = Some(Arc::new(herd::Herd::new(a.connections, rounds)));
        }
        Ok(plan)
    }

    fn info(&self) -> RunInfo {
        RunInfo {
            scenario: self.scenario.name(),
            target: self.target_url.clone(),
            connections: self.connections,
            threads: self.threads,
            rate: self.rate,
        }
    }
}

pub fn default_threads(connections: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.clamp(1, connections.max(1))
}

/// Parses and resolves `http://host:port[/prefix]` (on the calling
/// thread, before any runtime starts: resolution may block).
pub fn resolve_target(url: &str) -> Result<Target, BenchError> {
    let bad = |why: String| BenchError::Target {
        url: url.to_owned(),
        why,
    };
    let origin = Origin::parse(url.trim_end_matches('/'), None).map_err(|e| bad(e.to_string()))?;
    if origin.is_tls() {
        return Err(bad(
            "https is not supported; load ncro's plain HTTP listener".into(),
        ));
    }
    let addr = (origin.host(), origin.port())
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    Ok(Target {
        addr,
        host: String::from_utf8_lossy(origin.host_header()).into_owned(),
        prefix: origin.path_prefix().to_owned(),
    })
}

/// The workload a scenario needs, from a list file or the synthetic cache.
fn workload(
    scenario: Scenario,
    list: Option<&Path>,
    synthetic: Option<u64>,
    seed: u64,
) -> Result<Workload, BenchError> {
    if scenario == Scenario::NarinfoMiss {
        return Ok(Workload::Random);
    }
    let w = match (scenario, list, synthetic) {
        (Scenario::Nar, Some(path), _) => Workload::Urls(read_list(path, parse_url_line)?),
        (_, Some(path), _) => Workload::Hashes(read_list(path, parse_hash_line)?),
        (Scenario::Nar, None, Some(n)) => {
            Workload::Urls((0..n).map(|i| dataset::nar_url(seed, i).into()).collect())
        }
        (_, None, Some(n)) => {
            Workload::Hashes((0..n).map(|i| dataset::store_hash(seed, i)).collect())
        }
        (_, None, None) => {
            return Err(BenchError::Usage(format!(
                "scenario {} needs --list FILE or --synthetic N",
                scenario.name()
            )))
        }
    };
    match &w {
        Workload::Hashes(v) if v.is_empty() => Err(BenchError::Usage("the list is empty".into())),
        Workload::Urls(v) if v.is_empty() => Err(BenchError::Usage("the list is empty".into())),
        _ => Ok(w),
    }
}

/// Reads non-empty, non-`#` lines through `parse`.
fn read_list<T>(path: &Path, parse: fn(&str) -> Option<T>) -> Result<Vec<T>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::ReadList {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse(line).ok_or_else(|| BenchError::ListLine {
            path: path.display().to_string(),
            line: i + 1,
            text: line.chars().take(80).collect(),
        })?);
    }
    Ok(out)
}

/// A store hash, `<hash>.narinfo` (with or without `/`), or a store path.
pub fn parse_hash_line(line: &str) -> Option<StoreHash> {
    if let Some(h) = StoreHash::from_store_path(line) {
        return Some(h);
    }
    let s = line.trim_start_matches('/');
    StoreHash::parse(s.strip_suffix(".narinfo").unwrap_or(s).as_bytes())
}

/// A URL path relative to the target (`nar/x.nar` or `/nar/x.nar`).
pub fn parse_url_line(line: &str) -> Option<Box<str>> {
    let s = line.trim_start_matches('/');
    (!s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))).then(|| s.into())
}

/// Live counters a thread bumps per measured request; read by the
/// progress line only.
#[derive(Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// The instants every thread shares.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub warm_end: Instant,
    /// `None` for a request-count run.
    pub end: Option<Instant>,
}

/// Runs `plan` to completion and returns the merged report. With
/// `progress`, a live line is drawn on stderr when it is a terminal.
pub fn execute(plan: Arc<Plan>, progress: bool) -> Result<Report, BenchError> {
    let lives: Vec<Arc<Live>> = (0..plan.threads).map(|_| Arc::default()).collect();
    let (threads, clocks) = spawn_clients(&plan, &lives)?;
    // Every thread is ready: one shared start keeps the schedules aligned.
    let start = Instant::now() + Duration::from_millis(2);
    let warm_end = start + plan.warmup;
    let end = match plan.limit {
        Limit::Duration(d) => Some(warm_end + d),
        Limit::Requests(_) => None,
    };
    let clock = Clock {
        start,
        warm_end,
        end,
    };
    for c in &clocks {
        // A thread that is gone reports its error through join below.
        let _ = c.send(clock);
    }
    if progress && std::io::stderr().is_terminal() {
        show_progress(&plan, &clock, &lives, &threads);
    }
    let mut total = Stats::default();
    for h in threads {
        match h.join() {
            Ok(Ok(stats)) => total.merge(&stats),
            Ok(Err(msg)) => return Err(BenchError::Runtime(msg)),
            Err(_) => return Err(BenchError::Runtime("a client thread panicked".into())),
        }
    }
    let measured = total
        .last_done()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(warm_end));
    Ok(Report::new(plan.info(), &total, measured))
}

type ClientThread = std::thread::JoinHandle<Result<Stats, String>>;

/// Starts the client threads and waits until each has its runtime; each
/// then waits for its [`Clock`] on the returned senders. On error the
/// senders are dropped, which makes threads already started exit.
fn spawn_clients(
    plan: &Arc<Plan>,
    lives: &[Arc<Live>],
) -> Result<(Vec<ClientThread>, Vec<std::sync::mpsc::Sender<Clock>>), BenchError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(plan.threads);
    let mut clocks = Vec::with_capacity(plan.threads);
    for (t, live) in lives.iter().enumerate() {
        let (clock_tx, clock_rx) = std::sync::mpsc::channel();
        let (plan, ready, live) = (plan.clone(), ready_tx.clone(), live.clone());
        let h = std::thread::Builder::new()
            .name(format!("bench-client-{t}"))
            .spawn(move || conn::client_thread(t, plan, ready, clock_rx, live))
            .map_err(BenchError::Thread)?;
        threads.push(h);
        clocks.push(clock_tx);
    }
    drop(ready_tx);
    for _ in 0..plan.threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(BenchError::Runtime(msg)),
            Err(_) => return Err(BenchError::Runtime("a client thread exited early".into())),
        }
    }
    Ok((threads, clocks))
}

/// Draws the live line until every client thread has finished.
fn show_progress<T>(
    plan: &Plan,
    clock: &Clock,
    lives: &[Arc<Live>],
    threads: &[std::thread::JoinHandle<T>],
) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let sum = |f: fn(&Live) -> &AtomicU64| {
        lives
            .iter()
            .map(|l| f(l).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let (mut last_n, mut last_b, mut last_t) = (0u64, 0u64, Instant::now());
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        let (n, b, e) = (sum(|l| &l.requests), sum(|l| &l.bytes), sum(|l| &l.errors));
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-3);
        let of = match plan.limit {
            Limit::Requests(total) => format!("/{total}"),
            Limit::Duration(_) => String::new(),
        };
        let phase = if now < clock.warm_end {
            "warming up  "
        } else {
            ""
        };
        bar.set_message(format!(
            "{phase}{} {n}{of} requests  {:.0} req/s  {}/s  errors {e}",
            plan.scenario.name(),
            (n - last_n) as f64 / dt,
            human_bytes((b - last_b) as f64 / dt),
        ));
        bar.tick();
        (last_n, last_b, last_t) = (n, b, now);
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_in_every_accepted_form() {
        let h = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";
        for line in [
            h.to_owned(),
            format!("{h}.narinfo"),
            format!("/{h}.narinfo"),
            format!("/nix/store/{h}-hello-2.12"),
        ] {
            assert_eq!(
                parse_hash_line(&line).map(|x| x.to_string()),
                Some(h.to_owned()),
                "{line}"
            );
        }
        assert_eq!(parse_hash_line("tooshort"), None);
        assert_eq!(parse_url_line("/nar/x.nar").as_deref(), Some("nar/x.nar"));
        assert_eq!(parse_url_line("nar/x y.nar"), None);
    }

    #[test]
    fn workloads_from_lists_and_the_synthetic_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.txt");
        std::fs::write(
            &path,
            "# comment\n\n0c6kzph7l0dcbfmjap64f0czdafn3b7x\nbad line\n",
        )
        .unwrap();
        let err = workload(Scenario::NarinfoHit, Some(&path), None, 1).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
        std::fs::write(&path, "nar/a.nar\n/nar/b.nar\n").unwrap();
        let Workload::Urls(u) = workload(Scenario::Nar, Some(&path), None, 1).unwrap() else {
            panic!("nar reads URLs")
        };
        assert_eq!(u.len(), 2);
        let Workload::Hashes(h) = workload(Scenario::Closure, None, Some(3), 9).unwrap() else {
            panic!("closure reads hashes")
        };
        assert_eq!(h[2], dataset::store_hash(9, 2));
        assert!(matches!(
            workload(Scenario::NarinfoMiss, None, None, 1),
            Ok(Workload::Random)
        ));
        assert!(workload(Scenario::Nar, None, None, 1).is_err());
    }

    #[test]
    fn once_and_herd_plans() {
        use clap::Parser as _;
        let plan = |args: &[&str]| {
            let mut argv = vec!["ncro", "bench", "run", "-t", "http://127.0.0.1:9"];
            argv.extend_from_slice(args);
            let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
            let Some(crate::cli::Command::Bench(b)) = cli.command else {
                panic!("bench")
            };
            let crate::bench::args::BenchCommand::Run(r) = b.command else {
                panic!("run")
            };
            Plan::from_args(&r)
        };
        let p = plan(&["--synthetic", "50", "--once"]).unwrap();
        assert!(p.once.is_some() && p.herd.is_none());
        let p = plan(&[
            "-s",
            "narinfo-herd",
            "--synthetic",
            "50",
            "--connections",
            "10",
        ])
        .unwrap();
        assert!(p.herd.is_some() && p.once.is_none());
        assert!(plan(&["-s", "narinfo-miss", "--once"]).is_err());
        assert!(plan(&["-s", "narinfo-herd", "--synthetic", "5", "--rate", "10"]).is_err());
    }

    #[test]
    fn targets() {
        let t = resolve_target("http://127.0.0.1:8080/cache/").unwrap();
        assert_eq!(t.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(t.prefix, "/cache");
        assert_eq!(t.host, "127.0.0.1:8080");
        assert!(resolve_target("https://127.0.0.1").is_err());
        assert!(resolve_target("ftp://x").is_err());
    }
}
