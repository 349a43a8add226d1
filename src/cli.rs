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

    /// Validate the configuration and exit, as `check-config` does (today's
    /// ncro's spelling).
    #[arg(long, conflicts_with = "generate_mesh_key")]
    pub check: bool,

    /// Print the public key (64 hex digits) of the mesh key file PATH,
    /// creating it (mode 0600) when missing; same output on every run.
    #[arg(
        long,
        value_name = "PATH",
        value_parser = clap::builder::NonEmptyStringValueParser::new().map(PathBuf::from)
    )]
    pub generate_mesh_key: Option<PathBuf>,

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
    /// Print a shell completion script for SHELL to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the ncro(1) man page (roff) to stdout.
    Man,
    /// Write a new mesh node key (raw 32-byte ed25519 seed, mode 0600) and
    /// print its public key in hex, for the peers' `mesh.peers[].public_key`.
    Keygen {
        /// Where to write the key (`mesh.private_key`); never overwritten.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

impl Cli {
    /// Parses the process's arguments (exits on errors, as clap does),
    /// then rejects what clap cannot express: `--check` or
    /// `--generate-mesh-key` next to a subcommand, and
    /// `--generate-mesh-key` with `--config` on the command line
    /// (`NCRO_CONFIG` in the environment does not count).
    pub fn parse_checked() -> Cli {
        Cli::try_parse_checked(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Cli::command();
        let matches = cmd.try_get_matches_from_mut(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let conflict = |msg: &str| {
            Err(cmd
                .clone()
                .error(clap::error::ErrorKind::ArgumentConflict, msg))
        };
        let flag = if cli.check {
            Some("--check")
        } else if cli.generate_mesh_key.is_some() {
            Some("--generate-mesh-key")
        } else {
            None
        };
        if let (Some(flag), Some(_)) = (flag, &cli.command) {
            return conflict(&format!("{flag} cannot be used with a subcommand"));
        }
        let config_on_command_line =
            matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
        if cli.generate_mesh_key.is_some() && config_on_command_line {
            return conflict("--generate-mesh-key cannot be used with --config");
        }
        Ok(cli)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_man_page_name_every_subcommand() {
        let mut man = Vec::new();
        write_man(&mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.contains(".TH ncro 1"), "{man}");
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
            let mut script = Vec::new();
            write_completions(shell, &mut script).unwrap();
            let script = String::from_utf8(script).unwrap();
            for sub in ["serve", "check-config", "completions", "man", "keygen"] {
                assert!(script.contains(sub), "{shell:?} lacks {sub}");
                // roff escapes the hyphen.
                let roff = sub.replace('-', "\\-");
                assert!(man.contains(&roff), "man page lacks {sub}");
            }
        }
    }

    #[test]
    fn parses_the_new_subcommands() {
        let cli = Cli::try_parse_from(["ncro", "completions", "fish"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Completions {
                shell: clap_complete::Shell::Fish
            })
        ));
        assert!(Cli::try_parse_from(["ncro", "completions", "cmd"]).is_err());
        let cli = Cli::try_parse_from(["ncro", "man"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Man)));
    }

    #[test]
    fn check_and_generate_mesh_key_flags() {
        let p = |args: &[&str]| Cli::try_parse_checked(args.iter().copied());
        let cli = p(&["ncro", "--check", "-c", "x.toml"]).unwrap();
        assert!(cli.check && cli.command.is_none());
        let cli = p(&["ncro", "--generate-mesh-key", "k"]).unwrap();
        assert_eq!(cli.generate_mesh_key, Some(PathBuf::from("k")));
        for bad in [
            &["ncro", "--generate-mesh-key", ""][..],
            &["ncro", "--generate-mesh-key", "k", "--config", "c"],
            &["ncro", "-c", "c", "--generate-mesh-key", "k"],
            &["ncro", "--generate-mesh-key", "k", "--check"],
            &["ncro", "--check", "serve"],
            &["ncro", "--generate-mesh-key", "k", "man"],
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
