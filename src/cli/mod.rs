//! The `nix-hatch` command line: `check`, `explain`, `audit`, and `hook`
//! (the build hook entry for Nix versions whose `build-hook` takes
//! arguments).

pub mod audit;
pub mod check;
pub mod explain;
pub mod nix_version;
pub mod serve;

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
    /// Show the record of escape builds (state-dir/audit.jsonl): who ran
    /// which executor, when, and how it ended.
    Audit {
        #[arg(long)]
        config: Option<PathBuf>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Only builds requested by this account.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Only builds of this executor.
        #[arg(long, value_name = "NAME")]
        executor: Option<String>,
        /// Only builds started since: 2026-12-01T09:00:00Z, 2026-12-01, or an age (12h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only builds that ended so: built, failed, timed-out, refused, error.
        #[arg(long, value_name = "RESULT")]
        result: Option<String>,
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
        Cmd::Audit {
            config,
            json,
            user,
            executor,
            since,
            result,
        } => {
            let now = std::time::SystemTime::now();
            let since = since.map(|s| audit::parse_since(&s, now)).transpose();
            let result = result.map(|r| audit::parse_result(&r)).transpose();
            let (since, result) = match (since, result) {
                (Ok(s), Ok(r)) => (s, r),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: {e}");
                    return 2;
                }
            };
            audit::run(
                &config.unwrap_or_else(crate::config::default_path),
                json,
                &audit::Filter {
                    user,
                    executor,
                    since,
                    result,
                },
            )
        }
        Cmd::Hook { config, rest: _ } => {
            if let Some(c) = config {
                std::env::set_var("NIX_HATCH_CONFIG", c);
            }
            crate::hook::main()
        }
    }
}
