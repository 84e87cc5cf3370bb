//! The hook state machine Nix talks to: settings, then a `try` loop answered
//! with accept / decline / postpone, then — for an accepted derivation —
//! the build itself (see `build`).
//!
//! Everything before `# accept` must be cheap (Nix re-asks declined
//! derivations whenever a build slot frees) and must never break a build
//! nix-hatch doesn't take: a broken config or state dir declines with the
//! reason shown once.

pub mod build;
pub mod buildlog;
pub mod route;
pub mod slots;

use std::collections::HashSet;
use std::io::{self, BufRead, Write};

use crate::config::{Config, Fallback};
use crate::derivation::{Drv, Store};
use crate::protocol::hook::{self, AcceptedJob, CommandReader, Reply, Settings};
use crate::protocol::log::{msg_line, Level};
use route::Route;

/// Everything the build phase needs once Nix's `# accept` handshake is done.
pub struct Accepted<'a> {
    pub config: &'a Config,
    pub settings: &'a Settings,
    pub store: &'a Store,
    pub executor: &'a crate::config::Executor,
    pub drv: Drv,
    pub job: AcceptedJob,
    pub slot: slots::Slot,
}

/// Runs an accepted build and returns the hook's exit status.
pub trait Builder {
    fn build(&self, accepted: Accepted<'_>) -> i32;
}

/// The hook process: `nix-hatch-hook` and `nix-hatch hook` end up here.
pub fn main() -> i32 {
    crate::util::cloexec_from(3);
    let path = crate::config::default_path();
    let config = Config::load(&path).map_err(|problems| {
        format!(
            "nix-hatch: config {} is invalid, declining escape builds: {}{}",
            path.display(),
            problems
                .first()
                .map(String::as_str)
                .unwrap_or("unknown problem"),
            if problems.len() > 1 {
                format!(" (and {} more; run `nix-hatch check`)", problems.len() - 1)
            } else {
                " (run `nix-hatch check`)".to_owned()
            }
        )
    });
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut replies = io::stderr();
    run(config, &mut input, &mut replies, &build::RealBuilder)
}

/// The conversation with Nix over `input` (its commands) and `replies`
/// (our stderr).
pub fn run(
    config: Result<Config, String>,
    input: &mut impl BufRead,
    replies: &mut impl Write,
    builder: &dyn Builder,
) -> i32 {
    let settings = match hook::read_settings(input) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(replies, "nix-hatch: {e}");
            return 1;
        }
    };
    let store = Store::from_setting(settings.get("store"));
    let local_systems =
        route::local_systems(settings.get("system"), settings.get("extra-platforms"));
    let mut reader = CommandReader::default();
    let mut reported: HashSet<String> = HashSet::new();
    let mut config_reported = false;
    loop {
        let req = match reader.next(input) {
            Ok(Some(r)) => r,
            Ok(None) => return 0,
            Err(e) => {
                let _ = writeln!(replies, "nix-hatch: {e}");
                return 1;
            }
        };
        let reply = match &config {
            Err(reason) => {
                if !req.required_features.is_empty() && !config_reported {
                    config_reported = true;
                    tell(replies, reason);
                }
                Reply::Decline
            }
            Ok(cfg) => match route::route(cfg, &req, &local_systems) {
                Route::NotOurs => not_ours(cfg, &settings),
                Route::Refuse(reason) => {
                    if reported.insert(req.drv_path.clone()) {
                        tell(replies, &format!("nix-hatch: declining: {reason}"));
                    }
                    Reply::Decline
                }
                Route::Executor(executor) => {
                    let drv = match Drv::load(&store, &req.drv_path) {
                        Ok(d) => d,
                        Err(e) => {
                            // Nix only asks about valid .drv paths: one we
                            // can't read means something is badly wrong.
                            tell(replies, &format!("nix-hatch: {e:#}"));
                            return 1;
                        }
                    };
                    if let Some(reason) = &drv.unsupported {
                        if reported.insert(req.drv_path.clone()) {
                            tell(replies, &format!("nix-hatch: declining: {reason}"));
                        }
                        let _ = hook::write_reply(replies, Reply::Decline);
                        continue;
                    }
                    match slots::try_acquire(&cfg.state_dir, &executor.name, executor.max_jobs) {
                        Ok(None) => Reply::Postpone,
                        Err(e) => {
                            if reported.insert(req.drv_path.clone()) {
                                tell(
                                    replies,
                                    &format!(
                                        "nix-hatch: declining {}: state dir unusable: {e}",
                                        req.drv_path
                                    ),
                                );
                            }
                            Reply::Decline
                        }
                        Ok(Some(slot)) => {
                            return accept(
                                cfg, &settings, &store, executor, drv, slot, input, replies,
                                builder,
                            );
                        }
                    }
                }
            },
        };
        if hook::write_reply(replies, reply).is_err() {
            // Nix is gone.
            return 1;
        }
    }
}

/// A derivation without escape features.
fn not_ours(cfg: &Config, settings: &Settings) -> Reply {
    let builders_empty = settings
        .get("builders")
        .map(str::trim)
        .unwrap_or("")
        .is_empty();
    match &cfg.fallback {
        // With nothing routed and nowhere to delegate, Nix can stop asking
        // this hook at all (as its own build-remote does).
        Fallback::Decline | Fallback::Auto if cfg.routes.is_empty() && builders_empty => {
            Reply::DeclinePermanently
        }
        _ => Reply::Decline,
    }
}

/// A message Nix shows the user before the reply. `@nix` lines reach the
/// client even when the hook runs under nix-daemon, plain stderr does not.
fn tell(replies: &mut impl Write, msg: &str) {
    let _ = replies.write_all(msg_line(Level::Error, msg).as_bytes());
}

#[allow(clippy::too_many_arguments)]
fn accept(
    config: &Config,
    settings: &Settings,
    store: &Store,
    executor: &crate::config::Executor,
    drv: Drv,
    slot: slots::Slot,
    input: &mut impl BufRead,
    replies: &mut impl Write,
    builder: &dyn Builder,
) -> i32 {
    let machine = format!("nix-hatch:{}\n", executor.name);
    if replies
        .write_all(Reply::Accept.line())
        .and_then(|_| replies.write_all(machine.as_bytes()))
        .and_then(|_| replies.flush())
        .is_err()
    {
        return 1;
    }
    let job = match hook::read_accepted_job(input) {
        Ok(j) => j,
        Err(e) => {
            let _ =
                replies.write_all(msg_line(Level::Error, &format!("nix-hatch: {e}")).as_bytes());
            return 1;
        }
    };
    builder.build(Accepted {
        config,
        settings,
        store,
        executor,
        drv,
        job,
        slot,
    })
}

#[cfg(test)]
mod tests;
