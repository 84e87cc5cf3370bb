//! The hook state machine Nix talks to: settings, then a `try` loop answered
//! with accept / decline / postpone, then — for an accepted derivation —
//! the build itself (see `build`).
//!
//! Everything before `# accept` must be cheap (Nix re-asks declined
//! derivations whenever a build slot frees) and must never break a build
//! nix-hatch doesn't take: a broken config or state dir declines with the
//! reason shown once.

pub mod build;
pub mod fallback;
pub mod route;
pub mod slots;

use std::collections::HashSet;
use std::io::{self, BufRead, Write};

use crate::config::{Config, Fallback};
use crate::derivation::Drv;
use crate::protocol::buildlog::LOG_FD;
use crate::protocol::hook::{self, AcceptedJob, CommandReader, Reply, Settings, TryRequest};
use crate::protocol::log::{msg_line, Level};
use crate::store::StoreLocation;
use route::Route;

/// Everything the build phase needs once Nix's `# accept` handshake is done.
pub struct Accepted<'a> {
    pub config: &'a Config,
    pub settings: &'a Settings,
    pub store: &'a StoreLocation,
    pub executor: &'a crate::config::Executor,
    pub drv: Drv,
    pub job: AcceptedJob,
    pub slot: slots::Slot,
}

/// Runs an accepted build and returns the hook's exit status.
pub trait Builder {
    fn build(&self, accepted: Accepted<'_>) -> i32;
}

/// Set once Nix has accepted our `# accept`: from then on the build log
/// (fd 4) is where the user looks.
static ACCEPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The hook process: `nix-hatch-hook` and `nix-hatch hook` end up here.
///
/// A panic is a bug, but it must still read as one: Rust's exit status
/// for a panic (101) is what Nix takes for "timed out", and after accept
/// Nix drops stderr lines that are not `@nix` messages. So the panic is
/// reported as an `@nix` error (and in the build log once accepted) and the
/// hook exits with 1.
pub fn main() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("nix-hatch: internal error (a bug; please report it): {info}");
        let msg = msg.replace('\n', " ");
        let _ = io::stderr().write_all(msg_line(Level::Error, &msg).as_bytes());
        if ACCEPTED.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: fd 4 is Nix's log pipe for the whole life of the hook
            // (never closed by us); a plain write of a few bytes.
            let line = format!("{msg}\n");
            unsafe { nix::libc::write(LOG_FD, line.as_ptr().cast(), line.len()) };
        }
    }));
    std::panic::catch_unwind(hook_main).unwrap_or(1)
}

/// Whether Nix gave us fd 5 (the read side of the build log pipe, passed
/// for build-remote). Looked at before we open anything, so fd 5 is not one
/// of our own files.
static NIX_FD5: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn hook_main() -> i32 {
    NIX_FD5.store(
        crate::util::fd_is_open(5),
        std::sync::atomic::Ordering::Relaxed,
    );
    crate::timing::init();
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
    let args: Vec<String> = std::env::args().collect();
    let verbosity = fallback::verbosity(&args);
    run(
        config,
        &mut input,
        &mut replies,
        &build::RealBuilder,
        &verbosity,
    )
}

/// The conversation with Nix over `input` (its commands) and `replies`
/// (our stderr).
pub fn run(
    config: Result<Config, String>,
    input: &mut impl BufRead,
    replies: &mut impl Write,
    builder: &dyn Builder,
    verbosity: &str,
) -> i32 {
    let settings = match hook::read_settings(input) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(replies, "nix-hatch: {e}");
            return 1;
        }
    };
    if let Ok(cfg) = &config {
        // Staging left by a hook that was killed (one readdir when clean).
        crate::executors::staging::remove_stale(&cfg.state_dir);
    }
    let store = StoreLocation::from_setting(settings.get("store"));
    let local_systems =
        route::local_systems(settings.get("system"), settings.get("extra-platforms"));
    let mut reader = CommandReader::default();
    let mut reported: HashSet<String> = HashSet::new();
    let mut config_reported = false;
    // The hook non-escape derivations go to, started on first use.
    let mut delegate = Delegation::NotStarted;
    loop {
        let req = match reader.next(input) {
            Ok(Some(r)) => r,
            Ok(None) => return 0,
            Err(e) => {
                let _ = writeln!(replies, "nix-hatch: {e}");
                return 1;
            }
        };
        // A broken config must not break unrelated builds: they still go
        // where they would have gone without nix-hatch.
        let (fallback, routes_empty) = match &config {
            Ok(cfg) => (&cfg.fallback, cfg.routes.is_empty()),
            Err(_) => (&Fallback::Auto, false),
        };
        let mut pass_on = |req: &TryRequest, input: &mut _, replies: &mut _| {
            delegate.reply(
                fallback,
                routes_empty,
                &settings,
                verbosity,
                req,
                input,
                replies,
            )
        };
        let reply = match &config {
            Err(reason) => {
                if !req.required_features.is_empty() && !config_reported {
                    config_reported = true;
                    tell(replies, reason);
                }
                match pass_on(req, input, replies) {
                    Ok(r) => r,
                    Err(code) => return code,
                }
            }
            Ok(cfg) => match route::route(cfg, req, &local_systems) {
                Route::NotOurs => match pass_on(req, input, replies) {
                    Ok(r) => r,
                    Err(code) => return code,
                },
                Route::Refuse(reason) => {
                    if first_report(&mut reported, &req.drv_path) {
                        tell(replies, &format!("nix-hatch: declining: {reason}"));
                    }
                    match pass_on(req, input, replies) {
                        Ok(r) => r,
                        Err(code) => return code,
                    }
                }
                Route::Executor(executor) => {
                    crate::timing::mark("wait");
                    let drv = match Drv::load(&store, &req.drv_path) {
                        Ok(d) => d,
                        Err(e) => {
                            // Nix only asks about valid .drv paths, so this
                            // is rare (unreadable store, a .drv our parser
                            // can't take); exiting would abort Nix's whole
                            // run, declining fails only this derivation.
                            if first_report(&mut reported, &req.drv_path) {
                                tell(replies, &format!("nix-hatch: declining: {e:#}"));
                            }
                            if hook::write_reply(replies, Reply::Decline).is_err() {
                                return 1;
                            }
                            continue;
                        }
                    };
                    crate::timing::mark("drv-parse");
                    if let Some(reason) = &drv.unsupported {
                        if first_report(&mut reported, &req.drv_path) {
                            tell(replies, &format!("nix-hatch: declining: {reason}"));
                        }
                        let _ = hook::write_reply(replies, Reply::Decline);
                        continue;
                    }
                    match slots::try_acquire(&cfg.state_dir, &executor.name, executor.max_jobs) {
                        Ok(None) => Reply::Postpone,
                        Err(e) => {
                            if first_report(&mut reported, &req.drv_path) {
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
                            crate::util::fault_point("before-accept");
                            // An idle delegate would hold the log pipe's
                            // read side (fd 5) for the whole build.
                            drop(std::mem::replace(&mut delegate, Delegation::Done));
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

/// The hook that gets what nix-hatch doesn't build.
enum Delegation {
    NotStarted,
    Running(fallback::Delegate),
    /// None configured, failed, or it declined permanently.
    Done,
}

impl Delegation {
    /// The reply for a `try` nix-hatch doesn't build itself; `Err(status)`
    /// when the delegate accepted and ran the build (the hook is done).
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        fallback: &Fallback,
        routes_empty: bool,
        settings: &Settings,
        verbosity: &str,
        req: &TryRequest,
        input: &mut impl BufRead,
        replies: &mut impl Write,
    ) -> Result<Reply, i32> {
        if let Delegation::NotStarted = self {
            *self = match fallback::delegate_argv(fallback, settings, verbosity) {
                Ok(None) => Delegation::Done,
                Err(why) => {
                    tell(replies, &format!("nix-hatch: {why}"));
                    Delegation::Done
                }
                Ok(Some((prog, args))) => match fallback::Delegate::spawn(&prog, &args, settings) {
                    Ok(d) => Delegation::Running(d),
                    Err(e) => {
                        let msg = format!(
                            "nix-hatch: cannot start fallback hook {}: {e}",
                            prog.display()
                        );
                        tell(replies, &msg);
                        Delegation::Done
                    }
                },
            };
        }
        // With nothing routed and nowhere to delegate, Nix can stop asking
        // this hook at all (as its own build-remote does).
        let nothing_left = if routes_empty {
            Reply::DeclinePermanently
        } else {
            Reply::Decline
        };
        let Delegation::Running(d) = self else {
            return Ok(nothing_left);
        };
        match d.ask(req, replies) {
            Ok(Reply::Accept) => Err(d.hand_over(input, replies)),
            Ok(Reply::DeclinePermanently) => {
                *self = Delegation::Done;
                Ok(nothing_left)
            }
            Ok(other) => Ok(other),
            Err(e) => {
                tell(replies, &format!("nix-hatch: {e}; not delegating any more"));
                *self = Delegation::Done;
                Ok(Reply::Decline)
            }
        }
    }
}

/// Whether `drv` is reported for the first time (allocates only then).
fn first_report(reported: &mut HashSet<String>, drv: &str) -> bool {
    !reported.contains(drv) && reported.insert(drv.to_owned())
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
    store: &StoreLocation,
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
        Ok(j) => {
            ACCEPTED.store(true, std::sync::atomic::Ordering::Relaxed);
            // Nix's read side of the log pipe: with our copy closed, a log
            // write fails (EPIPE) instead of blocking on a full pipe should
            // Nix be gone while we live on.
            if NIX_FD5.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = nix::unistd::close(5);
            }
            crate::timing::mark("accept");
            j
        }
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
