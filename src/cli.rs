//! Command line (clap derive only; behaviour lives in `app`).

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ncro",
    version,
    about = "Nix Cache Route Optimizer: routes Nix substituter requests to the fastest cache that has each path"
)]
pub struct Cli {
    /// Config file (TOML). Without it the embedded default config is used.
    // The OsString parser accepts an empty value, which clap's PathBuf parser
    // rejects: `NCRO_CONFIG=""` must select the embedded default (ncro 2.2).
    #[arg(
        short = 'c',
        long = "config",
        env = "NCRO_CONFIG",
        global = true,
        value_name = "PATH",
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default when no command is given).
    Serve,
    /// Validate the configuration and print the effective config (exit 0),
    /// or the error (exit 1).
    CheckConfig,
    /// Measure a deployment: load generator (`run`), synthetic binary
    /// cache (`upstream`), or a self-contained demo on loopback (`local`).
    Bench(Box<crate::bench::args::BenchArgs>),
}

impl Cli {
    /// `NCRO_CONFIG=""` means the embedded default, as in ncro 2.2.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref().filter(|p| !p.as_os_str().is_empty())
    }
}
