//! Startup and shutdown wiring: config, logging, the listening address,
//! worker and control threads, signals. COLD.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{Cli, Command};
use crate::config::{env::ProcessEnv, Config};
use crate::http::resolve::Resolver;
use crate::metrics::Metrics;
use crate::proto::narinfo::NarUrlMode;
use crate::route::persist::{self, WriterConfig, WriterHandle};
use crate::route::reader::BodyReader;
use crate::route::{LoadReport, RouteTable};
use crate::upstream::{UpstreamSet, Upstreams};
use crate::worker::{self, check_listen, ListenSource, SharedState};

mod logging;

/// Process entry point; returns the exit code.
pub fn main_entry() -> i32 {
    let cli = Cli::parse_checked();
    if let Some(path) = &cli.generate_mesh_key {
        return generate_mesh_key(path);
    }
    let command = match (&cli.command, cli.check) {
        (_, true) => &Command::CheckConfig,
        (Some(c), false) => c,
        (None, false) => &Command::Serve,
    };
    match command {
        Command::Bench(args) => crate::bench::main(args),
        Command::CheckConfig => check_config(&cli),
        Command::Completions { shell } => print_or_fail(crate::cli::write_completions(
            *shell,
            &mut std::io::stdout(),
        )),
        Command::Man => print_or_fail(crate::cli::write_man(&mut std::io::stdout())),
        Command::Keygen { out } => match crate::mesh::keygen(out) {
            Ok(public) => {
                println!("{public}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Serve => {
            let cfg = match Config::load(cli.config_path(), &ProcessEnv) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            };
            logging::init(&cfg);
            match serve(cfg) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "ncro failed");
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
    }
}

fn print_or_fail(written: std::io::Result<()>) -> i32 {
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            1
        }
    }
}

/// `check-config` and `--check`: the effective config on stdout, then the
/// warnings and which spellings won on stderr (`warning: `, `note: `).
fn check_config(cli: &Cli) -> i32 {
    match Config::load(cli.config_path(), &ProcessEnv) {
        Ok(cfg) => {
            print!("{}", cfg.render_effective());
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            for p in &cfg.precedence {
                eprintln!("note: {p}");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `--generate-mesh-key PATH`: the key file's public key in hex, creating
/// the file (mode 0600) first when it does not exist. Nothing on stderr
/// unless it fails.
fn generate_mesh_key(path: &std::path::Path) -> i32 {
    match crate::mesh::generate_or_read_key(path) {
        Ok(public) => {
            println!("{public}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// One info line describing this instance. Credentials are never logged:
/// an upstream shows only whether it uses Basic Auth (URLs cannot carry
/// userinfo; config rejects it).
fn log_config_summary(cfg: &Config) {
    let upstreams: Vec<String> = cfg
        .upstreams
        .iter()
        .map(|u| {
            let auth = if u.basic_auth.is_some() {
                ", basic auth"
            } else {
                ""
            };
            let keys = u.public_keys.len();
            format!("{} (priority {}, {keys} keys{auth})", u.url, u.priority)
        })
        .collect();
    let source = match &cfg.source {
        crate::config::Source::File(p) => p.display().to_string(),
        crate::config::Source::Embedded => "embedded default".to_owned(),
    };
    let workers = cfg
        .server
        .workers
        .map_or_else(|| "one per CPU".to_owned(), |n| n.to_string());
    tracing::info!(
        config = %source,
        listen = cfg.server.listen.as_deref().unwrap_or("(inherited socket)"),
        upstreams = %upstreams.join(", "),
        workers,
        cpus = ?cfg.server.cpus,
        nar_relay = ?cfg.server.nar_relay,
        db = %cfg.cache.db_path,
        log_level = %cfg.logging.level,
        "configuration loaded"
    );
}

/// A panic anywhere in a serving process is a bug that may have left shared
/// state half-updated: log it and abort so the service manager restarts a
/// clean process, rather than limping on with a dead worker.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "panic; aborting");
        default(info);
        std::process::abort();
    }));
}

/// How long start-up waits for S3 upstreams' first credentials (env and
/// files answer in milliseconds; IMDS on a machine without it takes longer).
const S3_FIRST_CREDENTIALS: Duration = Duration::from_secs(5);

/// Runs the proxy until SIGTERM or SIGINT, then drains and returns.
pub fn serve(cfg: Config) -> anyhow::Result<()> {
    abort_on_panic();
    // Blocked before the first thread (resolver, SQLite writer, workers)
    // starts, so every thread inherits the mask and only sigwait below
    // takes them. A thread started earlier would keep the default action,
    // and a second SIGTERM during the drain would kill the process there.
    let sigset = crate::signals::block();
    let cfg = Arc::new(cfg);
    // First, while no other thread exists: it unsets the LISTEN_* variables.
    let inherited = crate::systemd::take_listener()?;
    let mut systemd = crate::systemd::Supervisor::from_env();
    let affinity = worker::affinity_cpus();
    let plan = worker::plan(&cfg.server, &affinity);
    // An inherited socket is systemd's to own, so there is no port to check.
    let listen = match (inherited, &cfg.server.listen) {
        (Some(fd), _) => ListenSource::Inherited(fd),
        (None, Some(l)) => ListenSource::Bind(check_listen(l)?),
        (None, None) => bail!("server.listen is empty and no listening socket was inherited"),
    };
    let mut upstreams = UpstreamSet::from_config(&cfg)?;
    if cfg.discovery.enabled {
        upstreams.reserve_discovered(cfg.discovery.max_upstreams as usize);
    }
    let urls = upstreams.list.iter().map(|u| u.url.clone()).collect();
    let metrics = Arc::new(Metrics::with_slots(
        plan.worker_cpus.len(),
        urls,
        upstreams.capacity(),
    ));
    let presigners = upstreams.list.iter().filter_map(|u| u.s3.clone());
    let s3_credentials =
        crate::s3::CredentialsThread::start(presigners.collect(), S3_FIRST_CREDENTIALS)
            .context("cannot start the S3 credentials thread")?;
    let (routes, writer, health_rows) = open_routes(&cfg, &upstreams)?;
    let _ = metrics.gauges.set(crate::metrics::Gauges {
        routes: routes.clone(),
    });
    let index = Arc::new(crate::index::IndexState::new(upstreams.capacity()));
    let _ = metrics.index.set(index.clone()); // set once, at start
    let upstreams = Arc::new(Upstreams::new(upstreams));
    let resolver = Resolver::new(Duration::from_secs(60));
    let tls = tls_config(&cfg)?;
    let (routing, mut prober) = crate::control::probe::setup(
        &cfg,
        upstreams.clone(),
        &health_rows,
        routes.writer().cloned(),
        resolver.clone(),
        tls.clone(),
    );
    prober.follow_routes(routes.clone());
    install_health_metrics(&metrics, &routing, &upstreams);
    let mut cache_info = crate::proto::cache_info::render(
        crate::proto::store_path::STORE_DIR,
        cfg.raw.server.want_mass_query,
        Some(cfg.server.cache_priority),
    );
    if cfg.index.publish {
        cache_info.push_str(&format!("BloomFilter: {}\n", crate::index::FILTER_LOCATION));
    }
    let shared = Arc::new(SharedState {
        cache_info: (cache_info + crate::serve::batch::CACHE_INFO_LINE).into(),
        config: cfg.clone(),
        metrics,
        routes,
        upstreams,
        routing,
        index: index.clone(),
        resolver,
        tls,
        flights: quick_cache::sync::Cache::new(
            (cfg.cache.max_concurrent_races as usize * 4).max(1024),
        ),
        connections: worker::ConnLimit::new(cfg.server.max_connections),
        fallback: crate::upstream::fallback::Fallback::from_config(&cfg)
            .context("fallback_cache")?,
    });

    let mut jobs = Vec::new();
    if cfg.discovery.enabled {
        let discovery =
            crate::control::discovery::Discovery::start(&cfg.discovery, prober.discovery_sender())
                .context("discovery.enabled")?;
        jobs.push(discovery.into_job());
    }
    if !cfg.health.enabled {
        tracing::info!("health probes are disabled (health.enabled = false); upstream health comes from races only");
    }
    // Without probes the prober still runs for discovery: it keeps the set.
    if cfg.health.enabled || cfg.discovery.enabled {
        jobs.push(prober.into_job());
    }
    let mut mesh_flush = None;
    if cfg.mesh.enabled {
        let s = &shared;
        let (job, flush) = crate::mesh::start(
            &cfg,
            &s.routes,
            s.upstreams.clone(),
            s.metrics.mesh.clone(),
            s.resolver.clone(),
        )
        .context("cannot start mesh gossip")?;
        jobs.push(job);
        mesh_flush = Some(flush);
    }
    index_jobs(&cfg, &shared, &mut jobs);
    // Per-tier statistics; they arm early starts only when the budget and
    // the resolution policy allow it.
    jobs.push(
        crate::control::tiers::TierWatch::new(
            shared.metrics.clone(),
            shared.upstreams.clone(),
            shared.routing.clone(),
            &cfg,
        )
        .into_job(),
    );
    let control =
        crate::control::spawn(plan.control_cpu, jobs).context("cannot start the control thread")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut workers = Vec::with_capacity(plan.worker_cpus.len());
    for (i, cpu) in plan.worker_cpus.iter().enumerate() {
        workers.push(
            worker::spawn(
                i,
                *cpu,
                shared.clone(),
                listen,
                crate::serve::accept,
                ready_tx.clone(),
            )
            .context("cannot start worker thread")?,
        );
    }
    drop(ready_tx);
    let mut drivers = Vec::new();
    for _ in 0..workers.len() {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok((_, d))) => drivers.push(d),
            Ok(Err(msg)) => {
                stop_workers(workers, Duration::from_secs(1));
                bail!(msg);
            }
            Err(_) => bail!("workers did not start within 10s"),
        }
    }
    let addr = match listen {
        ListenSource::Bind(a) => a.to_string(),
        ListenSource::Inherited(fd) => format!("inherited fd {fd}"),
    };
    tracing::info!(
        addr,
        upstreams = cfg.upstreams.len(),
        workers = workers.len(),
        cpus = ?plan.worker_cpus,
        driver = drivers.first().copied().unwrap_or("?"),
        version = env!("CARGO_PKG_VERSION"),
        "ncro listening"
    );
    let status = format!("serving on {addr} with {} workers", workers.len());
    systemd.ready(&status, workers_alive(&workers));
    let sig = crate::signals::wait(&sigset, None).unwrap_or(libc::SIGTERM);
    let signal = if sig == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    };
    lame_duck(&shared, &sigset, signal, &mut systemd);
    shared.metrics.phase.set(crate::signals::Stage::Draining);
    tracing::info!(signal, "shutting down: draining connections");
    systemd.stopping("draining connections");
    stop_workers(workers, cfg.server.shutdown_grace);
    if let Some(flush) = mesh_flush {
        if !flush.run(MESH_FLUSH_LIMIT) {
            tracing::warn!("mesh: the last gossip round was not sent within 1s; peers race this node's newest routes themselves");
        }
    }
    control.stop(Duration::from_secs(2));
    if let Some(creds) = s3_credentials {
        creds.stop(Duration::from_secs(1));
    }
    if let Some((handle, thread)) = writer {
        if let Err(e) = handle.shutdown_blocking() {
            tracing::warn!(error = %e, "route database writer did not shut down cleanly");
        }
        let _ = thread.join();
    }
    tracing::info!("ncro stopped");
    Ok(())
}

/// How long the drain waits for the mesh's last gossip round (routes
/// learnt since the previous round, sent before the control thread stops).
const MESH_FLUSH_LIMIT: Duration = Duration::from_secs(1);

/// `server.drain_delay`: from SIGTERM on `/health` answers 503 while every
/// request is still served, so a load balancer's health checks take the
/// node out before its listeners close. A second signal ends it early.
fn lame_duck(
    shared: &SharedState,
    sigset: &libc::sigset_t,
    signal: &str,
    systemd: &mut crate::systemd::Supervisor,
) {
    let delay = shared.config.server.drain_delay;
    if delay.is_zero() {
        return;
    }
    shared.metrics.phase.set(crate::signals::Stage::LameDuck);
    tracing::info!(
        signal,
        drain_delay = ?delay,
        "shutting down: lame duck; /health answers 503 while requests are still served"
    );
    systemd.stopping("lame duck: /health answers 503, still serving");
    if let Some(again) = crate::signals::wait(sigset, Some(delay)) {
        tracing::info!(signal = again, "second signal: lame duck cut short");
    }
}

/// The control-thread jobs of index-aware routing (docs/index-routing.md).
fn index_jobs(cfg: &Config, shared: &SharedState, jobs: &mut Vec<crate::control::Job>) {
    use crate::control::index::{Publisher, Refresher};
    if cfg.index.enabled {
        let r = Refresher::new(
            cfg,
            shared.upstreams.clone(),
            shared.index.clone(),
            shared.resolver.clone(),
            shared.tls.clone(),
        );
        jobs.push(r.into_job());
    }
    if cfg.index.publish {
        let p = Publisher::new(&cfg.index, shared.routes.clone(), shared.index.clone());
        jobs.push(p.into_job());
    }
}

/// `/metrics` reads the upstream set and their health from the published
/// snapshots.
fn install_health_metrics(
    metrics: &Metrics,
    routing: &Arc<crate::upstream::Routing>,
    upstreams: &Arc<Upstreams>,
) {
    use crate::metrics::{HealthSample, HealthState, UpstreamSlots};
    use crate::upstream::health::State;
    let ups = upstreams.clone();
    let slots: crate::metrics::UpstreamSource = Box::new(move || {
        let set = ups.load();
        UpstreamSlots {
            live: set.live_urls(),
            discovered: set.discovered_len(),
        }
    });
    let _ = metrics.upstream_source.set(slots); // set once, at start
    let (routing, ups) = (routing.clone(), upstreams.clone());
    let source: crate::metrics::HealthSource = Box::new(move |url| {
        let i = ups.load().index_of(url)?;
        let snap = routing.snapshot();
        let e = snap.entries.get(i)?;
        let state = match e.state {
            State::Active => HealthState::Active,
            State::Degraded => HealthState::Degraded,
            State::Down => HealthState::Down,
        };
        Some(HealthSample {
            state,
            ema: e.ema_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            consecutive_failures: e.consecutive_fails,
        })
    });
    let _ = metrics.health.set(source); // set once, at start
}

type Writer = Option<(WriterHandle, std::thread::JoinHandle<()>)>;

/// Opens the route database, loads every live route into memory (bodies
/// stay on disk, read back by the reader thread when hit), and starts the
/// writer and reader threads; also returns the persisted health rows.
/// Routes whose upstream is gone are dropped (here and in the database);
/// filters are checked again when a body is read back. A database that
/// cannot be opened degrades to memory-only routing with a loud log rather
/// than refusing to serve.
fn open_routes(
    cfg: &Config,
    upstreams: &UpstreamSet,
) -> anyhow::Result<(Arc<RouteTable>, Writer, Vec<persist::HealthRow>)> {
    let c = &cfg.cache;
    let started = std::time::Instant::now();
    let urls: Vec<Arc<str>> = upstreams.list.iter().map(|u| u.url.clone()).collect();
    let memory_only = || {
        RouteTable::new(c.max_entries, urls.clone(), None)
            .with_slot_capacity(upstreams.capacity())
            .with_narinfo_memory(c.narinfo_memory)
            .with_nar_urls(nar_url_rules(cfg), NarUrlMode::default())
    };
    let db = match persist::open(&c.db_path) {
        Ok(db) => db,
        Err(e) => {
            tracing::error!(db = %c.db_path, error = %e, "cannot open the route database; routing from memory only, nothing will persist");
            return Ok((Arc::new(memory_only()), None, Vec::new()));
        }
    };
    let health = db.load_health().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read persisted upstream health; starting fresh");
        Vec::new()
    });
    let table = memory_only();
    let report = table.load(&db, persist::unix_now()).unwrap_or_else(|e| {
        tracing::error!(db = %c.db_path, error = %e, "cannot load routes from the database; starting with an empty route table");
        LoadReport::default()
    });
    let (handle, thread) = persist::spawn_writer(
        db,
        WriterConfig {
            max_entries: c.max_entries,
            ..WriterConfig::default()
        },
    );
    for &(hash, row) in &report.refused {
        // A refusal is counted by the writer; the route is not in memory anyway.
        let _ = handle.try_write(persist::WriteOp::Remove(hash, Some(row)));
    }
    let mut table = table.with_writer(handle.clone());
    if c.db_path != ":memory:" {
        match BodyReader::spawn(&c.db_path) {
            Ok((reader, _detached)) => table = table.with_reader(reader),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the route database reader; routes whose narinfo is not in memory are raced again")
            }
        }
    }
    tracing::info!(db = %c.db_path, routes = report.routes, negatives = report.negatives, skipped = report.skipped, refused = report.refused.len(), ms = started.elapsed().as_millis() as u64, "route database loaded");
    Ok((Arc::new(table), Some((handle, thread)), health))
}

/// The NAR URL rule of each configured upstream, in slot order.
fn nar_url_rules(cfg: &Config) -> Vec<crate::route::NarUrlRule> {
    cfg.upstreams
        .iter()
        .map(|u| crate::route::NarUrlRule {
            mode: u.nar_url_mode,
            storage: u.storage_url.as_deref().map(Arc::from),
        })
        .collect()
}

/// One TLS client configuration for all workers: web PKI roots plus every
/// upstream's extra CA file. (A CA added for one upstream is trusted for
/// all; the file is the operator's own, so this is a deliberate trade for
/// one shared connector.)
fn tls_config(cfg: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut files: Vec<&std::path::Path> = cfg
        .upstreams
        .iter()
        .filter_map(|u| u.tls_ca_file.as_deref())
        .collect();
    files.sort();
    files.dedup();
    Ok(crate::http::tls::client_config_with(&files)?)
}

/// The watchdog's liveness check: every worker thread is still running (a
/// worker's stop receiver lives exactly as long as its event loop).
fn workers_alive(workers: &[worker::WorkerHandle]) -> crate::systemd::LivenessCheck {
    let stops: Vec<_> = workers.iter().map(|w| w.stop.clone()).collect();
    Box::new(
        move || match stops.iter().position(|s| s.is_disconnected()) {
            Some(i) => Err(format!("worker {i} exited")),
            None => Ok(()),
        },
    )
}

fn stop_workers(workers: Vec<worker::WorkerHandle>, grace: Duration) {
    for w in &workers {
        let _ = w.stop.try_send(()); // a worker that already exited has dropped its receiver
    }
    let deadline = std::time::Instant::now() + grace + Duration::from_secs(2);
    for w in workers {
        while !w.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if w.thread.is_finished() {
            let _ = w.thread.join();
        }
    }
}
