//! Executors run an accepted build: each kind behind the one [`run`] entry.
//! They all build into a private [`staging::Staging`] dir while the builder
//! sees the real output paths; `store` turns the result into valid paths.

pub mod cgroup;
pub mod host;
pub mod jail;
pub mod limits;
pub mod runner;
pub mod seccomp;
pub mod ssh;
pub mod staging;
pub mod supervise;

use std::time::{Duration, Instant};

use crate::config::{Executor, ExecutorKind};
use crate::derivation::Drv;
use crate::protocol::buildlog::LogSink;
use crate::store::{StoreLocation, StorePath};
use staging::Staging;
use supervise::Cancel;

/// One accepted build, as an executor sees it.
pub struct BuildRequest<'a> {
    pub drv: &'a Drv,
    pub executor: &'a Executor,
    pub store: &'a StoreLocation,
    /// The input closure Nix sent.
    pub inputs: &'a [StorePath],
    /// Wanted outputs: (name, store path).
    pub outputs: &'a [(String, StorePath)],
    /// `NIX_BUILD_CORES`.
    pub cores: String,
    pub limits: Limits,
    pub staging: &'a Staging,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
}

impl Limits {
    /// Longer limits are no limit: `Instant + Duration` must not overflow,
    /// and untrusted daemon clients may set `timeout` to any 64-bit value.
    pub const FOREVER: u64 = 100 * 365 * 24 * 3600;

    /// The smaller non-zero of Nix's setting and the executor's (seconds);
    /// anything at or beyond [`Limits::FOREVER`] means none.
    pub fn combine(
        nix_timeout: u64,
        exec_timeout: u64,
        nix_silent: u64,
        exec_silent: u64,
    ) -> Limits {
        fn min_nonzero(a: u64, b: u64) -> Option<Duration> {
            let forever = |x: u64| if x >= Limits::FOREVER { 0 } else { x };
            match (forever(a), forever(b)) {
                (0, 0) => None,
                (0, x) | (x, 0) => Some(Duration::from_secs(x)),
                (a, b) => Some(Duration::from_secs(a.min(b))),
            }
        }
        Limits {
            timeout: min_nonzero(nix_timeout, exec_timeout),
            max_silent: min_nonzero(nix_silent, exec_silent),
        }
    }

    /// When a build that started at `start` and last wrote at
    /// `last_output` must be stopped, and whether for `timeout` (`true`)
    /// or `max-silent-time` (`false`); `timeout` wins a tie. A deadline
    /// beyond what an `Instant` can hold is none.
    pub fn deadline(&self, start: Instant, last_output: Instant) -> Option<(Instant, bool)> {
        let total = self
            .timeout
            .and_then(|t| start.checked_add(t))
            .map(|w| (w, true));
        let silent = self
            .max_silent
            .and_then(|s| last_output.checked_add(s))
            .map(|w| (w, false));
        match (total, silent) {
            (Some(t), Some(s)) => Some(if s.0 < t.0 { s } else { t }),
            (t, s) => t.or(s),
        }
    }
}

/// Why a build did not produce its outputs: the executors' one error type
/// (their helpers return it, or `io::Result`, which converts). The
/// messages are one line each and do not name the executor: the build's
/// `executor` span does.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command or builder exited unsuccessfully (Nix: permanent
    /// failure); `status` is its exit status (128 + signal when killed).
    #[error("{message}")]
    Exited { status: i32, message: String },
    /// The build failed for another reason of its own (Nix: permanent
    /// failure): its outputs are unusable, refused, or it can't be run.
    #[error("{0}")]
    Builder(String),
    /// `timeout` or `max-silent-time` hit.
    #[error("{0}")]
    TimedOut(String),
    /// A resource limit stopped the build (Nix: permanent failure). The
    /// message names the executor itself: "memory limit 4 GiB of executor
    /// "X" reached".
    #[error("{0}")]
    Limit(String),
    /// Nix (or an admin) told the hook to stop.
    #[error("build cancelled by signal")]
    Cancelled,
    /// nix-hatch itself could not run the build.
    #[error("{0}")]
    Internal(String),
}

/// What nix-hatch could not do on the system (a file, a directory, a
/// process): the message already names the path or the step.
impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Internal(e.to_string())
    }
}

impl Failure {
    /// The hook's exit status: Nix reads 100 as a permanent build failure
    /// and 101 as a timeout, like its own builders.
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Exited { .. } | Failure::Builder(_) | Failure::Limit(_) => 100,
            Failure::TimedOut(_) => 101,
            Failure::Cancelled | Failure::Internal(_) => 1,
        }
    }
}

/// What an executor tells about a build besides its result (for the
/// build's audit record), whether it succeeded or not.
#[derive(Debug, Default)]
pub struct Report {
    /// A proxy jail's allowed and denied requests.
    pub proxy: Option<crate::audit::ProxyCounts>,
    /// What the build used, where it ran; `None` when nothing ran.
    pub usage: Option<crate::usage::Usage>,
}

/// Runs the build on its executor, under the executor's resource limits
/// (see [`limits`]); returns once no process of it is left.
pub fn run(
    req: &BuildRequest,
    log: &mut dyn LogSink,
    cancel: &Cancel,
    report: &mut Report,
) -> Result<(), Failure> {
    let local = match &req.executor.kind {
        ExecutorKind::Ssh(ssh) => return ssh::run(req, ssh, log, cancel, report),
        ExecutorKind::Host(_) | ExecutorKind::Jail(_) => {
            limits::Enforcement::start(req.executor, req.staging)?
        }
    };
    let result = match &req.executor.kind {
        ExecutorKind::Host(host) => host::run(req, host, log, cancel, &local),
        ExecutorKind::Jail(jail) => jail::run(req, jail, log, cancel, report, &local),
        ExecutorKind::Ssh(_) => unreachable!("ssh returned above"),
    };
    let (result, usage) = local.finish(req.executor, result);
    report.usage = usage;
    result
}

/// `NIX_BUILD_CORES` for Nix's `cores` setting as the hook received it.
/// Nix ≥ 2.31 sends its default, 0, and puts the number of CPUs it may use
/// in its own builders' `NIX_BUILD_CORES` (older Nix sent that number
/// itself): the same here, so a build sees the same value either way.
/// Absent (no Nix omits it): 1.
pub fn build_cores(setting: Option<&str>) -> String {
    match setting.map(str::trim) {
        Some("0") => std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .to_string(),
        Some(n) => n.to_owned(),
        None => "1".to_owned(),
    }
}

/// The local account (uid) that owns the files an executor leaves in the
/// staging dir: the account it ran the build as. `None` for `ssh`, whose
/// `user` is the far side's: its outputs are unpacked by the hook itself.
pub fn output_owner(executor: &Executor) -> Option<u32> {
    match &executor.kind {
        ExecutorKind::Host(_) | ExecutorKind::Jail(_) => {
            crate::util::lookup_user(&executor.user).ok().map(|u| u.uid)
        }
        ExecutorKind::Ssh(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_zero_means_the_cpus_this_process_may_use() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(build_cores(Some("0")), cpus.to_string());
        assert_eq!(build_cores(Some("3")), "3");
        assert_eq!(build_cores(None), "1");
    }

    #[test]
    fn limits_take_the_smaller_nonzero() {
        let l = Limits::combine(0, 0, 0, 0);
        assert!(l.timeout.is_none() && l.max_silent.is_none());
        let l = Limits::combine(10, 0, 0, 7);
        assert_eq!(l.timeout, Some(Duration::from_secs(10)));
        assert_eq!(l.max_silent, Some(Duration::from_secs(7)));
        let l = Limits::combine(10, 4, 3, 7);
        assert_eq!(l.timeout, Some(Duration::from_secs(4)));
        assert_eq!(l.max_silent, Some(Duration::from_secs(3)));
        // `--option timeout 9223372036854775807` must not overflow a deadline.
        let l = Limits::combine(i64::MAX as u64, 0, u64::MAX, 5);
        assert!(l.timeout.is_none());
        assert_eq!(l.max_silent, Some(Duration::from_secs(5)));
        let start = std::time::Instant::now();
        let _ = Limits::combine(Limits::FOREVER - 1, 0, 0, 0)
            .timeout
            .map(|t| start + t);
    }
}
