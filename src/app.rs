//! Startup and shutdown wiring: config, logging, the listening address,
//! worker and control threads, signals. COLD.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::{env::ProcessEnv, Config, LogFormat};
use crate::http::resolve::Resolver;
use crate::metrics::Metrics;
use crate::route::persist::{self, WriterConfig, WriterHandle};
use crate::route::RouteTable;
use crate::upstream::UpstreamSet;
use crate::worker::{self, ListenSource, SharedState};

/// Process entry point; returns the exit code.
pub fn main_entry() -> i32 {
    let cli = Cli::parse();
    match cli.command.as_ref().unwrap_or(&Command::Serve) {
        Command::Bench(args) => crate::bench::main(args),
        Command::CheckConfig => match Config::load(cli.config_path(), &ProcessEnv) {
            Ok(cfg) => {
                print!("{}", cfg.render_effective());
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Completions { shell } => print_or_fail(crate::cli::write_completions(
            *shell,
            &mut std::io::stdout(),
        )),
        Command::Man => print_or_fail(crate::cli::write_man(&mut std::io::stdout())),
        Command::Serve => {
            let cfg = match Config::load(cli.config_path(), &ProcessEnv) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            };
            init_logging(&cfg);
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

/// Installs the global subscriber: `logging.level` is an EnvFilter
/// directive (validated by config), `logging.format` picks one JSON object
/// per line (`timestamp`, `level`, `fields`, `target`) or human text.
/// Writes go to stdout synchronously, which is fine because nothing on the
/// request path logs at info (the access log is debug, target
/// `ncro::access`).
fn init_logging(cfg: &Config) {
    let filter = crate::config::log_filter(&cfg.logging.level).unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(std::io::stdout);
    // A second init (tests running in-process) is harmless; ignore it.
    let _ = match cfg.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    log_config_summary(cfg);
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

/// Resolves `server.listen` and proves the port is free: monoio sets
/// SO_REUSEPORT on every listener, so without this check a second ncro (or
/// anything else using SO_REUSEPORT) would silently share the port.
pub fn check_listen(listen: &str) -> anyhow::Result<SocketAddr> {
    let addr = listen
        .to_socket_addrs()
        .with_context(|| format!("server.listen {listen:?}: cannot resolve"))?
        .next()
        .with_context(|| format!("server.listen {listen:?}: no address"))?;
    // std's bind sets SO_REUSEADDR but not SO_REUSEPORT, so it fails with
    // EADDRINUSE if anything is already listening there.
    match std::net::TcpListener::bind(addr) {
        Ok(probe) => Ok(probe.local_addr()?), // resolves port 0 too
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{addr} is already in use (another ncro or another server is listening there); refusing to share the port")
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
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
    let (upstreams, s3_skipped) = UpstreamSet::from_config(&cfg)?;
    let urls = upstreams.list.iter().map(|u| u.url.clone()).collect();
    let metrics = Arc::new(Metrics::new(plan.worker_cpus.len(), urls));
    for url in &s3_skipped {
        tracing::warn!(upstream = %url, "S3 upstreams are not supported by this build yet; leaving it out of routing");
    }
    if cfg.discovery.enabled {
        tracing::warn!("discovery.enabled is set, but mDNS discovery is not implemented in this build yet; only configured upstreams are used");
    }
    if cfg.mesh.enabled {
        tracing::warn!("mesh.enabled is set, but mesh gossip is not implemented in this build yet; routes are not shared with peers");
    }
    let (routes, writer, health_rows) = open_routes(&cfg, &upstreams)?;
    let _ = metrics.gauges.set(crate::metrics::Gauges {
        routes: routes.clone(),
    });
    let upstreams = Arc::new(upstreams);
    let resolver = Resolver::new(Duration::from_secs(60));
    let tls = tls_config(&cfg)?;
    let (routing, prober) = crate::control::probe::setup(
        &cfg,
        upstreams.clone(),
        &health_rows,
        routes.writer().cloned(),
        resolver.clone(),
        tls.clone(),
    );
    install_health_metrics(&metrics, &routing, &upstreams);
    let shared = Arc::new(SharedState {
        cache_info: crate::proto::cache_info::render(
            crate::proto::store_path::STORE_DIR,
            true,
            Some(cfg.server.cache_priority),
        )
        .into(),
        config: cfg.clone(),
        metrics,
        routes,
        upstreams,
        routing,
        resolver,
        tls,
        flights: quick_cache::sync::Cache::new(
            (cfg.cache.max_concurrent_races as usize * 4).max(1024),
        ),
    });

    let jobs = if cfg.health.enabled {
        vec![prober.into_job()]
    } else {
        tracing::info!("health probes are disabled (health.enabled = false); upstream health comes from races only");
        Vec::new()
    };
    let control =
        crate::control::spawn(plan.control_cpu, jobs).context("cannot start the control thread")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut workers = Vec::with_capacity(plan.worker_cpus.len());
    for (i, cpu) in plan.worker_cpus.iter().enumerate() {
        workers.push(
            worker::spawn(i, *cpu, shared.clone(), listen, ready_tx.clone())
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
    tracing::info!(
        signal = if sig == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        },
        "shutting down: draining connections"
    );
    systemd.stopping("draining connections");
    stop_workers(workers, cfg.server.shutdown_grace);
    control.stop(Duration::from_secs(2));
    if let Some((handle, thread)) = writer {
        if let Err(e) = handle.shutdown_blocking() {
            tracing::warn!(error = %e, "route database writer did not shut down cleanly");
        }
        let _ = thread.join();
    }
    tracing::info!("ncro stopped");
    Ok(())
}

/// `/metrics` reads upstream health from the published snapshot.
fn install_health_metrics(
    metrics: &Metrics,
    routing: &Arc<crate::upstream::Routing>,
    set: &Arc<UpstreamSet>,
) {
    use crate::metrics::{HealthSample, HealthState};
    use crate::upstream::health::State;
    let (routing, set) = (routing.clone(), set.clone());
    let source: crate::metrics::HealthSource = Box::new(move |url| {
        let i = set.index_of(url)?;
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

/// Opens the route database, loads every live route into memory, and starts
/// the writer thread; also returns the persisted health rows. Routes whose
/// upstream is gone or whose filters now refuse them are dropped (here and
/// in the database). A database that cannot be opened degrades to
/// memory-only routing with a loud log rather than refusing to serve.
fn open_routes(
    cfg: &Config,
    upstreams: &UpstreamSet,
) -> anyhow::Result<(Arc<RouteTable>, Writer, Vec<persist::HealthRow>)> {
    let c = &cfg.cache;
    let started = std::time::Instant::now();
    match persist::open_and_load(&c.db_path, persist::unix_now()) {
        Ok((mut loaded, db)) => {
            let refused = upstreams.recheck_routes(&mut loaded.routes);
            let wcfg = WriterConfig {
                max_entries: c.max_entries,
                ..WriterConfig::default()
            };
            let (handle, thread) = persist::spawn_writer(db, wcfg);
            let table = RouteTable::new(c.max_entries, Some(handle.clone()));
            let (n, neg, skipped) = (loaded.routes.len(), loaded.negatives.len(), loaded.skipped);
            table.load(loaded.routes, loaded.negatives);
            for hash in &refused {
                // A refusal is counted by the writer; the route is gone from memory anyway.
                let _ = handle.try_write(persist::WriteOp::Remove(*hash));
            }
            tracing::info!(db = %c.db_path, routes = n, negatives = neg, skipped, refused = refused.len(), ms = started.elapsed().as_millis() as u64, "route database loaded");
            Ok((Arc::new(table), Some((handle, thread)), loaded.health))
        }
        Err(e) => {
            tracing::error!(db = %c.db_path, error = %e, "cannot open the route database; routing from memory only, nothing will persist");
            Ok((
                Arc::new(RouteTable::new(c.max_entries, None)),
                None,
                Vec::new(),
            ))
        }
    }
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
