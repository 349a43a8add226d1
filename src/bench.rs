//! `ncro bench`: measure a deployment with the same runtime ncro runs on.
//!
//! - `bench run` ([`run`]): a load generator, one monoio client thread per
//!   core, closed or open loop, HDR-histogram latencies ([`report`]).
//! - `bench upstream` ([`upstream`]): a synthetic binary cache served from
//!   memory ([`dataset`]: deterministic signed narinfos and NARs), with
//!   latency and failure injection.
//! - `bench local` ([`local`]): both of them plus an ncro child process on
//!   loopback, a mixed scenario and a report: the first thing to try.
//!
//! COLD for ncro itself: nothing here runs inside the proxy.

pub mod args;
pub mod dataset;
pub mod local;
pub mod report;
mod rng;
pub mod run;
mod spec;
pub mod upstream;
pub mod wire;

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use args::{BenchArgs, BenchCommand, RunArgs, UpstreamArgs};
use dataset::{Dataset, DatasetError};
use upstream::{Behaviour, ServerConfig};

use crate::proto::signature::SecretKey;

/// Name of the key generated when none is given.
pub const DEFAULT_KEY_NAME: &str = "ncro-bench-1";

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("target {url}: {why}")]
    Target { url: String, why: String },
    #[error("reading {path}: {source}")]
    ReadList {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a store hash or URL path: {text:?}")]
    ListLine {
        path: String,
        line: usize,
        text: String,
    },
    #[error("key file {path}: {why}")]
    Key { path: String, why: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("cannot listen: {0}")]
    Listen(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Runtime(String),
    #[error("writing {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
    #[error("ncro: {0}")]
    Proxy(String),
}

/// Runs a bench subcommand; returns the process exit code.
pub fn main(args: &BenchArgs) -> i32 {
    let result = match &args.command {
        BenchCommand::Run(a) => run_command(a),
        BenchCommand::Upstream(a) => upstream_command(a),
        BenchCommand::Local(a) => local::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `bench run`: exit 0 once the run completed, whatever the server
/// answered (errors are in the report); 1 if it could not run.
fn run_command(a: &RunArgs) -> Result<i32, BenchError> {
    let plan = Arc::new(run::Plan::from_args(a)?);
    let report = run::execute(plan, !a.quiet)?;
    print!("{}", report.render_text());
    if a.markdown {
        println!(
            "{}\n{}",
            report::Report::MARKDOWN_HEADER,
            report.markdown_row()
        );
    }
    if let Some(path) = &a.json {
        let err = |source| BenchError::Output {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| err(e.into()))?;
        std::fs::write(path, text + "\n").map_err(err)?;
    }
    Ok(0)
}

/// A Nix secret key from a file, or a fresh one.
pub fn load_key(path: Option<&Path>) -> Result<SecretKey, BenchError> {
    let Some(path) = path else {
        return SecretKey::generate(DEFAULT_KEY_NAME).map_err(|e| BenchError::Key {
            path: "(generated)".into(),
            why: e.to_string(),
        });
    };
    let bad = |why: String| BenchError::Key {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    SecretKey::parse(&text).map_err(|e| bad(e.to_string()))
}

/// `bench upstream`: serves until SIGINT/SIGTERM or `--for`.
fn upstream_command(a: &UpstreamArgs) -> Result<i32, BenchError> {
    let key = load_key(a.data.key_file.as_deref())?;
    let started = std::time::Instant::now();
    let data = Dataset::build(a.data.seed, a.data.narinfos, &a.data.nar_size.0, &key)?;
    if let Some(dir) = &a.write_lists {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Output {
            path: dir.display().to_string(),
            source,
        })?;
        data.write_lists(dir)?;
    }
    let b = &a.behaviour;
    let cfg = ServerConfig {
        listen: a.listen,
        threads: a
            .threads
            .unwrap_or_else(|| run::default_threads(usize::MAX)),
        cpus: a.cpus.clone(),
        behaviour: Behaviour {
            holds: b.holds.clone().unwrap_or(0..u64::MAX),
            hit_ratio: b.hit_ratio,
            latency: b.latency,
            fail_rate: b.fail_rate,
            reset_rate: b.reset_rate,
            conn_rate: b.conn_rate,
            rtt: b.rtt,
        },
    };
    // Before any thread starts, so only the sigwait below sees them.
    let signals = crate::signals::block();
    let server = upstream::start(Arc::new(data), cfg.clone())?;
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the server; the lines are informational.
    let _ = writeln!(out, "public key: {}", key.public().to_nix_string());
    let _ = writeln!(out, "listening on {}", server.url());
    let _ = writeln!(
        out,
        "serving {} paths (seed {}, NAR sizes {:?}, latency {}, built in {:.1}s){}",
        a.data.narinfos,
        a.data.seed,
        a.data.nar_size.0,
        cfg.behaviour.latency,
        started.elapsed().as_secs_f64(),
        a.write_lists
            .as_ref()
            .map_or(String::new(), |d| format!("; lists in {}", d.display())),
    );
    let _ = out.flush();
    drop(out);
    let _ = crate::signals::wait(&signals, a.run_for); // a signal or the end of --for: stop either way
    server.stop();
    Ok(0)
}
