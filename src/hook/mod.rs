//! The hook state machine Nix talks to: settings, then a `try` loop answered
//! with accept / decline / postpone, then — for an accepted derivation —
//! the build itself (see `build`).
//!
//! Everything before `# accept` must be cheap (Nix re-asks declined
//! derivations whenever a build slot frees) and must never break a build
//! nix-hatch doesn't take: a broken config or state dir declines with the
//! reason shown once.

pub mod access;
pub mod build;
pub mod fallback;
pub mod requester;
pub mod route;
pub mod slots;

use std::collections::HashSet;
use std::io::{self, BufRead, Write};

use crate::config::{Config, Executor, Fallback};
use crate::derivation::Drv;
use crate::protocol::buildlog::LOG_FD;
use crate::protocol::hook::{self, AcceptedJob, CommandReader, Reply, Settings, TryRequest};
use crate::protocol::log::{msg_line, Level};
use crate::store::StoreLocation;
use requester::Requester;
use route::Route;

/// Everything the build phase needs once Nix's `# accept` handshake is done.
pub struct Accepted<'a> {
    pub config: &'a Config,
    pub settings: &'a Settings,
    pub store: &'a StoreLocation,
    pub executor: &'a Executor,
    pub drv: Drv,
    pub job: AcceptedJob,
    /// Who asked for it.
    pub requester: Requester,
    /// The escape feature that routed it.
    pub feature: String,
}

/// A build the requesting account may not have: accepted (so that Nix
/// neither builds it elsewhere nor waits for it) and failed at once,
/// with nothing run.
pub struct Refused<'a> {
    pub config: &'a Config,
    pub executor: &'a Executor,
    pub drv: Drv,
    pub job: AcceptedJob,
    pub requester: Requester,
    pub feature: String,
    /// The one line the user sees (without the `nix-hatch: ` prefix).
    pub reason: String,
}

/// Runs an accepted build, or reports a refused one, and returns the
/// hook's exit status.
pub trait Builder {
    /// `claim`: the build's slot, or its place in the queue (then the
    /// builder waits for a slot first).
    fn build(&self, accepted: Accepted<'_>, claim: slots::Claim) -> i32;
    fn refuse(&self, refused: Refused<'_>) -> i32;
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
    let args: Vec<String> = std::env::args().collect();
    let verbosity = fallback::verbosity(&args);
    crate::protocol::messages::init(crate::protocol::messages::verbosity_of(&verbosity));
    let config = Config::load(&path).map_err(|problems| {
        format!(
            "config {} is invalid, declining escape builds: {}{}",
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
    run(
        config,
        &mut input,
        &mut replies,
        &build::RealBuilder,
        &verbosity,
    )
}

/// The conversation with Nix over `input` (its commands) and `replies`
/// (our stderr): settings, then one [`Decider::decide`] per `try` and its
/// answer, until Nix is done or a build was accepted (ours or the
/// delegate's) — like Nix's own build-remote: settings → try → decide →
/// accept → build.
pub fn run(
    config: Result<Config, String>,
    input: &mut impl BufRead,
    replies: &mut impl Write,
    builder: &dyn Builder,
    verbosity: &str,
) -> i32 {
    run_for(config, input, replies, builder, verbosity, None)
}

/// [`run`], with the requesting account given (tests) rather than found
/// ([`Requester::identify`], on the first escape `try`).
pub fn run_for(
    config: Result<Config, String>,
    input: &mut impl BufRead,
    replies: &mut impl Write,
    builder: &dyn Builder,
    verbosity: &str,
    requester: Option<Requester>,
) -> i32 {
    let settings = match hook::read_settings(input) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(replies, "nix-hatch: {e}");
            return 1;
        }
    };
    if let Ok(cfg) = &config {
        // Staging left by a hook that was killed (one readdir when clean),
        // and the cgroups of its build.
        let dead = crate::executors::staging::remove_stale(&cfg.state_dir);
        if !dead.is_empty() {
            crate::executors::limits::sweep(cfg.executors.values(), &cfg.state_dir, &dead);
        }
    }
    let mut decider = Decider::new(&config, &settings);
    decider.requester = requester;
    let mut reader = CommandReader::default();
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
        let Decision { step, say } = decider.decide(req);
        if let Some(msg) = say {
            tell(&msg);
        }
        let reply = match step {
            Step::Reply(r) => r,
            Step::PassOn => {
                match delegate.reply(&decider, &settings, verbosity, req, input, replies) {
                    Ok(r) => r,
                    // The delegate accepted and ran the build.
                    Err(code) => return code,
                }
            }
            Step::Accept {
                config,
                executor,
                feature,
                drv,
                claim,
            } => {
                crate::util::fault_point("before-accept");
                // An idle delegate would hold the log pipe's read side
                // (fd 5) for the whole build; this hook waits for no other
                // derivation any more.
                drop(delegate);
                decider.waiting.clear();
                let Some(job) = accept(executor, input, replies) else {
                    return 1;
                };
                return builder.build(
                    Accepted {
                        config,
                        settings: &settings,
                        store: &decider.store,
                        executor,
                        drv: *drv,
                        job,
                        requester: decider.requester.take().unwrap_or_else(Requester::identify),
                        feature,
                    },
                    claim,
                );
            }
            Step::Refuse {
                config,
                executor,
                feature,
                drv,
                reason,
            } => {
                drop(delegate);
                decider.waiting.clear();
                let Some(job) = accept(executor, input, replies) else {
                    return 1;
                };
                return builder.refuse(Refused {
                    config,
                    executor,
                    drv: *drv,
                    job,
                    requester: decider.requester.take().unwrap_or_else(Requester::identify),
                    feature,
                    reason,
                });
            }
        };
        if hook::write_reply(replies, reply).is_err() {
            // Nix is gone.
            return 1;
        }
    }
}

/// What to do with one `try`.
enum Step<'c> {
    /// Answer Nix with this.
    Reply(Reply),
    /// Not nix-hatch's to build: the fallback (Nix's build-remote, another
    /// hook, or a decline) answers.
    PassOn,
    /// Build it with `executor` in its slot, or once its place in the
    /// queue has become one.
    Accept {
        config: &'c Config,
        executor: &'c Executor,
        feature: String,
        // Boxed: a parsed derivation is large, the other steps are a word.
        drv: Box<Drv>,
        claim: slots::Claim,
    },
    /// Accept it and fail it at once: the requester may not use
    /// `executor` (`reason` says so in one line).
    Refuse {
        config: &'c Config,
        executor: &'c Executor,
        feature: String,
        drv: Box<Drv>,
        reason: String,
    },
}

/// A [`Step`] and what the user should be told first (shown once per
/// derivation: Nix asks again whenever a build slot frees).
struct Decision<'c> {
    step: Step<'c>,
    say: Option<String>,
}

/// Decides each `try`; remembers what it has told the user already.
struct Decider<'c> {
    config: &'c Result<Config, String>,
    store: StoreLocation,
    local_systems: Vec<String>,
    /// Nix's `trusted-users`: who may use executors without `allowed-users`.
    trusted_users: Option<String>,
    /// Found on the first escape `try` (the hook's parent never changes).
    requester: Option<Requester>,
    /// Derivations postponed for a slot, shown as waiting in Nix's
    /// progress bar until they are decided otherwise.
    waiting: std::collections::HashMap<String, crate::protocol::activity::Activity>,
    reported: HashSet<String>,
    config_reported: bool,
}

impl<'c> Decider<'c> {
    fn new(config: &'c Result<Config, String>, settings: &Settings) -> Self {
        Decider {
            config,
            store: StoreLocation::from_setting(settings.get("store")),
            local_systems: route::local_systems(
                settings.get("system"),
                settings.get("extra-platforms"),
            ),
            trusted_users: settings.get("trusted-users").map(str::to_owned),
            requester: None,
            waiting: std::collections::HashMap::new(),
            reported: HashSet::new(),
            config_reported: false,
        }
    }

    /// Where non-escape derivations go and whether nix-hatch routes
    /// anything at all. A broken config must not break unrelated builds:
    /// they still go where they would have gone without nix-hatch.
    fn fallback(&self) -> (&Fallback, bool) {
        match self.config {
            Ok(cfg) => (&cfg.fallback, cfg.routes.is_empty()),
            Err(_) => (&Fallback::Auto, false),
        }
    }

    fn decide(&mut self, req: &TryRequest) -> Decision<'c> {
        // Decided otherwise than postponed, it waits no more (its activity
        // stops when this is dropped).
        let waiting = self.waiting.remove(&req.drv_path);
        let cfg = match self.config {
            Err(reason) => {
                let first = !req.required_features.is_empty() && !self.config_reported;
                self.config_reported |= first;
                return Decision {
                    step: Step::PassOn,
                    say: first.then(|| reason.clone()),
                };
            }
            Ok(cfg) => cfg,
        };
        let (executor, feature) = match route::route(cfg, req, &self.local_systems) {
            Route::NotOurs => return self.step(Step::PassOn),
            Route::Refuse(reason) => {
                return self.once(req, Step::PassOn, format!("declining: {reason}"))
            }
            Route::Executor(executor, feature) => (executor, feature),
        };
        crate::timing::mark("wait");
        let drv = match Drv::load(&self.store, &req.drv_path) {
            Ok(d) => d,
            // Nix only asks about valid .drv paths, so this is rare
            // (unreadable store, a .drv our parser can't take); exiting
            // would abort Nix's whole run, declining fails only this one.
            Err(e) => {
                return self.once(
                    req,
                    Step::Reply(Reply::Decline),
                    format!("declining: {e:#}"),
                )
            }
        };
        crate::timing::mark("drv-parse");
        if let Some(reason) = &drv.unsupported {
            let msg = format!("declining: {reason}");
            return self.once(req, Step::Reply(Reply::Decline), msg);
        }
        if let Some(reason) = self.refusal(executor) {
            return self.step(Step::Refuse {
                config: cfg,
                executor,
                feature,
                drv: Box::new(drv),
                reason,
            });
        }
        let slots = slots::Slots::new(
            &cfg.state_dir,
            &executor.name,
            executor.max_jobs,
            executor.queue,
        );
        match slots.admit() {
            Ok(Some(claim)) => self.step(Step::Accept {
                config: cfg,
                executor,
                feature,
                drv: Box::new(drv),
                claim,
            }),
            // Every slot busy and the queue full: Nix asks again after
            // its build-poll-interval.
            Ok(None) => {
                let activity = waiting.unwrap_or_else(|| {
                    let queue = match executor.queue {
                        0 => String::new(),
                        q => format!(", queue {q} full"),
                    };
                    crate::protocol::activity::Activity::start(
                        crate::protocol::activity::Kind::BuildWaiting,
                        &format!(
                            "waiting for a free slot of executor {:?} (max-jobs {}{queue}) to build '{}'",
                            executor.name, executor.max_jobs, req.drv_path
                        ),
                        &[],
                    )
                });
                self.waiting.insert(req.drv_path.clone(), activity);
                self.step(Step::Reply(Reply::Postpone))
            }
            Err(e) => self.once(
                req,
                Step::Reply(Reply::Decline),
                format!("declining {}: state dir unusable: {e}", req.drv_path),
            ),
        }
    }

    /// Why the requester may not use `executor`, if it may not.
    fn refusal(&mut self, executor: &Executor) -> Option<String> {
        let who = self.requester.get_or_insert_with(Requester::identify);
        let entries = access::entries(
            executor.allowed_users.as_deref(),
            self.trusted_users.as_deref(),
        );
        if access::allows(&entries, who) {
            return None;
        }
        let setting = match executor.allowed_users {
            Some(_) => "its allowed-users",
            None => "Nix's trusted-users (it has no allowed-users)",
        };
        let unknown = if who.uid.is_none() {
            "; an account nix-hatch cannot determine may use only executors with allowed-users = [\"*\"]"
        } else {
            ""
        };
        Some(format!(
            "executor {:?} refuses {who}: not in {setting}: {}{unknown}; nothing was run",
            executor.name,
            access::describe(&entries)
        ))
    }

    fn step(&self, step: Step<'c>) -> Decision<'c> {
        Decision { step, say: None }
    }

    /// `step`, saying `msg` the first time this derivation is decided.
    fn once(&mut self, req: &TryRequest, step: Step<'c>, msg: String) -> Decision<'c> {
        let first =
            !self.reported.contains(&req.drv_path) && self.reported.insert(req.drv_path.clone());
        Decision {
            step,
            say: first.then_some(msg),
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
    fn reply(
        &mut self,
        decider: &Decider<'_>,
        settings: &Settings,
        verbosity: &str,
        req: &TryRequest,
        input: &mut impl BufRead,
        replies: &mut impl Write,
    ) -> Result<Reply, i32> {
        let (fallback, routes_empty) = decider.fallback();
        if let Delegation::NotStarted = self {
            *self = match fallback::delegate_argv(fallback, settings, verbosity) {
                Ok(None) => Delegation::Done,
                Err(why) => {
                    tell(&why);
                    Delegation::Done
                }
                Ok(Some((prog, args))) => match fallback::Delegate::spawn(&prog, &args, settings) {
                    Ok(d) => Delegation::Running(d),
                    Err(e) => {
                        tell(&format!(
                            "cannot start fallback hook {}: {e}",
                            prog.display()
                        ));
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
                tell(&format!("{e}; not delegating any more"));
                *self = Delegation::Done;
                Ok(Reply::Decline)
            }
        }
    }
}

/// A message Nix shows the user before the reply (a warning: it explains
/// what Nix does next). It goes out as an `@nix` line, which reaches the
/// client even when the hook runs under nix-daemon (plain stderr does not).
fn tell(msg: &str) {
    tracing::warn!("{msg}");
}

/// Nix's `# accept` handshake: our reply and the machine line, then the
/// input closure and the wanted outputs. `None` when Nix is gone.
fn accept(
    executor: &Executor,
    input: &mut impl BufRead,
    replies: &mut impl Write,
) -> Option<AcceptedJob> {
    let machine = format!("nix-hatch:{}\n", executor.name);
    replies
        .write_all(Reply::Accept.line())
        .and_then(|_| replies.write_all(machine.as_bytes()))
        .and_then(|_| replies.flush())
        .ok()?;
    match hook::read_accepted_job(input) {
        Ok(j) => {
            ACCEPTED.store(true, std::sync::atomic::Ordering::Relaxed);
            // Nix's read side of the log pipe: with our copy closed, a log
            // write fails (EPIPE) instead of blocking on a full pipe should
            // Nix be gone while we live on.
            if NIX_FD5.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = nix::unistd::close(5);
            }
            crate::timing::mark("accept");
            Some(j)
        }
        Err(e) => {
            tracing::error!("{e}");
            None
        }
    }
}

#[cfg(test)]
mod tests;
