//! `ncro bench` command line (clap derive only). Values are parsed into
//! validated types here (durations, sizes, ranges); cross-field checks
//! happen when a plan is built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

pub use super::spec::NarSizes;
use super::spec::{parse_fraction, parse_range, parse_sizes, LatencySpec};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Load generator: one client thread per core, keep-alive HTTP/1.1.
    Run(RunArgs),
    /// A synthetic binary cache served from memory (signed narinfos, NARs).
    Upstream(UpstreamArgs),
    /// Demo: two synthetic upstreams and an ncro on loopback, a mixed
    /// scenario, a report, then everything is stopped.
    Local(LocalArgs),
}

/// What each request fetches.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `/<hash>.narinfo` for hashes from a list, rotating.
    NarinfoHit,
    /// `/<hash>.narinfo` for fresh random hashes (nobody has them).
    NarinfoMiss,
    /// NAR URLs from a list; bodies are counted and discarded.
    Nar,
    /// Like Nix: a narinfo, then the NAR its `URL:` names.
    Closure,
    /// Thundering herd: every connection asks for the same hash at the same
    /// moment, one list hash per round; the next round starts when every
    /// connection has its answer. Ends when the list is used up.
    NarinfoHerd,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::NarinfoHit => "narinfo-hit",
            Scenario::NarinfoMiss => "narinfo-miss",
            Scenario::Nar => "nar",
            Scenario::Closure => "closure",
            Scenario::NarinfoHerd => "narinfo-herd",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Base URL of the cache under test (plain http).
    #[arg(short = 't', long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    #[arg(short = 's', long, value_enum, default_value = "narinfo-hit")]
    pub scenario: Scenario,
    /// File of store hashes (narinfo-hit, closure) or NAR URLs (nar), one
    /// per line; `bench upstream --write-lists` writes both.
    #[arg(short = 'l', long, value_name = "PATH")]
    pub list: Option<PathBuf>,
    /// Instead of a list: the first N paths of the synthetic cache made by
    /// `bench upstream --seed` (same seed, same hashes).
    #[arg(long, value_name = "N", conflicts_with = "list")]
    pub synthetic: Option<u64>,
    /// Seed of the synthetic cache named by --synthetic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Open connections in total.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Client threads (default: one per CPU, at most one per connection).
    #[arg(long)]
    pub threads: Option<usize>,
    /// CPUs to pin client threads to, in order (e.g. `1` or `2,3`).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// How long to measure (after the warm-up).
    #[arg(short = 'd', long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many measured requests instead of after --duration.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Request each list entry exactly once (all connections share one
    /// cursor), then stop: first-time lookups only, e.g. to time misses
    /// that an upstream can answer.
    #[arg(long)]
    pub once: bool,
    /// Open loop: total requests per second, spread over the connections
    /// (closure: narinfo + NAR pairs per second). Latency counts from each
    /// request's intended send time.
    #[arg(short = 'r', long)]
    pub rate: Option<f64>,
    /// Traffic before measuring starts (not counted).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub warmup: Duration,
    /// Per-request limit; a request over it counts as a timeout error.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Also print the summary as a Markdown table row (with its header).
    #[arg(long)]
    pub markdown: bool,
    /// No live progress line, even on a terminal.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// Address to listen on; port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub behaviour: BehaviourArgs,
    /// Server threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// CPUs to pin server threads to, in order.
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// Write `hashes.txt` and `nars.txt` (inputs of `bench run --list`)
    /// into this directory, then serve.
    #[arg(long, value_name = "DIR")]
    pub write_lists: Option<PathBuf>,
    /// Stop after this long instead of waiting for SIGINT/SIGTERM.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub run_for: Option<Duration>,
}

/// What the synthetic cache contains.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Number of store paths (narinfos and NARs).
    #[arg(long, default_value_t = 10_000)]
    pub narinfos: u64,
    /// Seed of the hashes: the same seed gives the same cache.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// NAR sizes, assigned to paths in turn (e.g. `64KiB` or `4KiB,1MiB`).
    #[arg(long, value_parser = parse_sizes, default_value = "64KiB")]
    pub nar_size: NarSizes,
    /// Signing key file (Nix secret key format). Without it a key named
    /// `ncro-bench-1` is generated; its public key is printed either way.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
}

/// How the synthetic cache answers.
#[derive(Args, Debug, Clone)]
pub struct BehaviourArgs {
    /// Which path indices it holds (`A..B`, end excluded); others are 404.
    #[arg(long, value_parser = parse_range)]
    pub holds: Option<std::ops::Range<u64>>,
    /// Fraction of the held paths it really has (deterministic per index).
    #[arg(long, value_parser = parse_fraction, default_value = "1")]
    pub hit_ratio: f64,
    /// Delay before each answer: `2ms`, or `2ms..5ms` for uniform jitter.
    #[arg(long, value_parser = LatencySpec::parse, default_value = "0ms")]
    pub latency: LatencySpec,
    /// Fraction of requests answered `500 Internal Server Error`.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    pub fail_rate: f64,
    /// Fraction of requests answered by resetting the connection.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    pub reset_rate: f64,
    /// Cap on each connection's NAR body rate, per second (`16MiB`): a
    /// cache that limits every flow (S3, a CDN edge).
    #[arg(long, value_name = "SIZE", value_parser = super::spec::parse_size)]
    pub conn_rate: Option<u64>,
    /// Added round-trip time: one at each new connection (the handshake)
    /// and one before each answer, on top of `--latency`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    pub rtt: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct LocalArgs {
    /// Measured time of each scenario.
    #[arg(short = 'd', long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub duration: Duration,
    /// Connections of the load generator.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Store paths in the synthetic caches.
    #[arg(long, default_value_t = 2_000)]
    pub narinfos: u64,
    /// NAR size in the synthetic caches.
    #[arg(long, value_parser = parse_sizes, default_value = "64KiB")]
    pub nar_size: NarSizes,
    /// ncro worker threads (default: half the CPUs, at least one).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Also run the narinfo scenarios through nginx (this binary) as a
    /// fallback chain in front of the same two caches (the fast one, on 404
    /// the slow one; keep-alive; one worker per CPU), nothing pinned, and
    /// report ncro's rates against it.
    #[arg(long, value_name = "NGINX")]
    pub nginx: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;
    use crate::cli::{Cli, Command};

    fn bench(args: &[&str]) -> BenchCommand {
        let mut argv = vec!["ncro", "bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Some(Command::Bench(b)) => b.command,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_subcommand() {
        let BenchCommand::Run(r) = bench(&[
            "run",
            "-t",
            "http://h:1",
            "-s",
            "nar",
            "--connections",
            "8",
            "-n",
            "100",
            "--rate",
            "500",
            "--cpus",
            "1,2",
        ]) else {
            panic!("run")
        };
        assert_eq!(
            (r.scenario, r.connections, r.requests, r.rate),
            (Scenario::Nar, 8, Some(100), Some(500.0))
        );
        assert_eq!(r.cpus, vec![1, 2]);
        let BenchCommand::Upstream(u) = bench(&[
            "upstream",
            "--nar-size",
            "4KiB,1MiB",
            "--latency",
            "1ms..3ms",
            "--holds",
            "0..10",
            "--fail-rate",
            "0.1",
        ]) else {
            panic!("upstream")
        };
        assert_eq!(u.data.nar_size, NarSizes(vec![4096, 1 << 20]));
        assert_eq!(u.behaviour.holds, Some(0..10));
        assert_eq!(u.behaviour.latency.max, Duration::from_millis(3));
        let BenchCommand::Local(l) = bench(&["local", "--duration", "1s"]) else {
            panic!("local")
        };
        assert_eq!(l.duration, Duration::from_secs(1));
        assert!(Cli::try_parse_from(["ncro", "bench", "upstream", "--hit-ratio", "2"]).is_err());
    }
}
