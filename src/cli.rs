//! Command line (clap derive only; behaviour lives in `app`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ncro",
    version,
    about = "Nix Cache Route Optimizer: routes Nix substituter requests to the fastest cache that has each path"
)]
pub struct Cli {
    /// Config file (TOML). Without it the embedded default config is used.
    #[arg(
        short = 'c',
        long = "config",
        env = "NCRO_CONFIG",
        global = true,
        value_name = "PATH"
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
    /// Print a shell completion script for SHELL to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the ncro(1) man page (roff) to stdout.
    Man,
}

impl Cli {
    /// `NCRO_CONFIG=""` means the embedded default, as in ncro 2.2.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref().filter(|p| !p.as_os_str().is_empty())
    }
}

/// Writes the completion script for `shell`, generated from these definitions.
pub fn write_completions(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    use clap::CommandFactory;
    // clap_complete panics on a failed write (`ncro completions bash | head`);
    // render to memory and let the caller see the I/O error instead.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ncro", &mut script);
    out.write_all(&script)
}

/// Writes the man page, generated from these definitions.
pub fn write_man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(out)
}
