//! The `nix-hatch` command line: `check`, `explain`, and `hook` (the build
//! hook entry for Nix versions whose `build-hook` takes arguments).

pub mod check;
pub mod explain;
pub mod nix_version;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nix-hatch",
    version,
    about = "Escape hatches for Nix builds, as a build hook"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the configuration and print the routes.
    Check {
        /// Config file (default: $NIX_HATCH_CONFIG, else /etc/nix-hatch/config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also log in to every `ssh` executor and run its agent (one line each).
        #[arg(long)]
        connect: bool,
    },
    /// The far side of the `ssh` executor: reads one request on stdin, runs
    /// the command, streams log, outputs and trailer on stdout. Needs no Nix.
    Agent,
    /// Say which executor would build a derivation, or why none would.
    Explain {
        /// A .drv store path.
        drv: String,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Nix's `store` setting, if not the default store.
        #[arg(long)]
        store: Option<String>,
    },
    /// Run as Nix's build hook (`build-hook = nix-hatch hook` on Nix ≥ 2.19).
    Hook {
        /// Config file for this hook.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Nix appends its verbosity; ignored.
        #[arg(hide = true)]
        rest: Vec<String>,
    },
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match cli.command {
        Cmd::Check { config, connect } => {
            let path = config.unwrap_or_else(crate::config::default_path);
            if connect {
                check::run_connect(&path)
            } else {
                check::run(&path)
            }
        }
        Cmd::Agent => crate::executors::ssh::agent::run(),
        Cmd::Explain { drv, config, store } => explain::run(
            &config.unwrap_or_else(crate::config::default_path),
            &drv,
            store.as_deref(),
        ),
        Cmd::Hook { config, rest: _ } => {
            if let Some(c) = config {
                std::env::set_var("NIX_HATCH_CONFIG", c);
            }
            crate::hook::main()
        }
    }
}
