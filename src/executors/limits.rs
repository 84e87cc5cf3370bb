//! An executor's resource limits on a local build (`host`, `jail`): the
//! build's cgroup, or the one line saying why it cannot have one; what the
//! build used; and what a limit it hit means for its result. The `ssh`
//! executor's far side does the same in `ssh::agent` and reports back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::cgroup::{BuildCgroup, Cgroups, Liveness, Plan};
use super::runner::ProcessUsage;
use super::staging::Staging;
use super::Failure;
use crate::config::{Executor, ResourceLimits};
use crate::usage::{human_bytes, Source, Usage};

/// A build's limits while it runs.
pub struct Enforcement {
    cgroup: Option<BuildCgroup>,
    usage_file: PathBuf,
    start: Instant,
    /// Whether a process of the build was started at all (a command
    /// refused before it ran used nothing worth a line).
    spawned: std::cell::Cell<bool>,
}

impl Enforcement {
    /// Makes the cgroup of the build staged in `staging`, when the
    /// executor has limits (or says where cgroups go). With limits and no
    /// usable cgroup the build fails here, before anything runs: it never
    /// runs unlimited.
    pub fn start(executor: &Executor, staging: &Staging) -> Result<Enforcement, Failure> {
        let limits = &executor.limits;
        let name = staging
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup = if limits.wants_cgroup() {
            match cgroup_for(limits, &name) {
                Ok(c) => Some(c),
                Err(why) if limits.any() => {
                    return Err(Failure::Builder(format!(
                        "cannot enforce {}: no usable cgroup: {why}; nothing was run",
                        limits.describe()
                    )))
                }
                Err(why) => {
                    tracing::warn!(
                        "warning: no cgroup for this build (cgroup-parent is set): {why}; what it used is measured without one"
                    );
                    None
                }
            }
        } else {
            None
        };
        Ok(Enforcement {
            cgroup,
            usage_file: staging.root.join("usage.json"),
            start: Instant::now(),
            spawned: std::cell::Cell::new(false),
        })
    }

    /// Where the runner writes what the build's processes used.
    pub fn usage_file(&self) -> PathBuf {
        self.usage_file.clone()
    }

    /// Makes the process `cmd` starts (the runner) and everything below it
    /// part of the build's cgroup, from before it execs.
    pub fn join_on_spawn(&self, cmd: &mut Command) {
        self.spawned.set(true);
        if let Some(c) = &self.cgroup {
            c.join_on_spawn(cmd);
        }
    }

    /// Once every process of the build is gone: what it used (`None` when
    /// nothing was started), its cgroup removed, and `result` as the
    /// limits it hit make it.
    pub fn finish(
        mut self,
        executor: &Executor,
        result: Result<(), Failure>,
    ) -> (Result<(), Failure>, Option<Usage>) {
        if !self.spawned.get() {
            return (result, None);
        }
        let mut usage = Usage {
            wall: self.start.elapsed(),
            ..Usage::default()
        };
        if let Some(c) = self.cgroup.take() {
            let r = c.read();
            usage.peak_memory = r.peak_memory;
            usage.memory_source = Source::Cgroup;
            usage.cpu = r.cpu;
            usage.oom_kills = r.oom_kills;
            usage.memory_limit_hit = r.memory_limit_hit;
            usage.forks_refused = r.forks_refused;
            usage.throttled = r.throttled;
            if let Err(e) = c.remove() {
                tracing::warn!("warning: {e}; the next build removes it");
            }
        }
        if let Some(p) = ProcessUsage::read(&self.usage_file) {
            if usage.peak_memory.is_none() {
                usage.peak_memory = Some(p.max_rss);
                usage.memory_source = Source::Processes;
            }
            usage
                .cpu
                .get_or_insert(std::time::Duration::from_micros(p.cpu_us));
        }
        let result = judge(&executor.name, &executor.limits, &usage, result);
        (result, Some(usage))
    }
}

/// Removes the build cgroups that hooks which died left under the local
/// executors' cgroup parents: those of the staging dirs `dead` (just
/// removed as stale), of unlocked staging dirs of `state_dir`, and old
/// empty ones nobody claims. Best effort.
pub fn sweep<'a>(executors: impl Iterator<Item = &'a Executor>, state_dir: &Path, dead: &[String]) {
    use crate::config::ExecutorKind;
    let mut cg = None;
    let mut swept: Vec<PathBuf> = Vec::new();
    for e in executors {
        if matches!(e.kind, ExecutorKind::Ssh(_)) || !e.limits.wants_cgroup() {
            continue;
        }
        let cg = cg.get_or_insert_with(Cgroups::detect);
        let Ok(plan) = Plan::new(cg, &e.limits) else {
            continue;
        };
        let first = plan.containers().next().map(Path::to_path_buf);
        if first.as_ref().is_some_and(|c| swept.contains(c)) {
            continue;
        }
        // A locked staging dir is a live build, even one on the `dead`
        // list: a new hook with the same pid may have made it since.
        let n = plan.sweep(|name| match super::staging::owner_alive(state_dir, name) {
            Some(true) => Liveness::Live,
            Some(false) => Liveness::Dead,
            None if dead.iter().any(|d| d == name) => Liveness::Dead,
            None => Liveness::Unknown,
        });
        if n > 0 {
            tracing::debug!("removed {n} cgroup(s) of builds whose hook died");
        }
        swept.extend(first);
    }
}

/// Whether `limits` can be enforced for a process placed as `cg` says,
/// tried for real: the cgroup made with the limits set, a process moved
/// into it, removed. What enforces them, or why nothing can (`nix-hatch
/// check` here, the agent for `check --connect`).
pub fn probe(cg: &Cgroups, limits: &ResourceLimits) -> Result<String, String> {
    let plan = Plan::new(cg, limits)?;
    let cgroup = plan.create(&format!("check-{}", std::process::id()), limits)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cgroup.join_on_spawn(&mut cmd);
    let moved = cmd
        .spawn()
        .and_then(|child| wait_briefly(child, PROBE_WAIT));
    let removed = cgroup.remove();
    moved.map_err(|e| format!("moving a process into {}: {e}", plan.describe()))?;
    removed?;
    Ok(plan.describe())
}

/// How long the probe's process may take: a cgroup frozen by whoever
/// delegated it must not hang `check`.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for `child` at most `limit`; kills it after that.
fn wait_briefly(mut child: std::process::Child, limit: std::time::Duration) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let exited = match crate::util::pidfd_open(child.id()) {
        Some(fd) => {
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&fd),
                PollFlags::POLLIN,
            )];
            let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
            poll(&mut fds, PollTimeout::from(ms)).is_ok_and(|n| n > 0)
        }
        // No pidfd (Linux < 5.3): wait as before.
        None => true,
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::other(format!(
            "the process moved in did not finish within {} s (is the cgroup frozen?)",
            limit.as_secs()
        )));
    }
    child.wait().map(drop)
}

/// The cgroup of build `name` under `limits`, on this machine.
fn cgroup_for(limits: &ResourceLimits, name: &str) -> Result<BuildCgroup, String> {
    let plan = Plan::new(&Cgroups::detect(), limits)?;
    let c = plan.create(name, limits)?;
    tracing::debug!("limits {} in {}", limits.describe(), plan.describe());
    Ok(c)
}

/// What the limits of executor `name` hit make of the build's `result`:
/// the kernel's OOM kills at `memory-max` fail it with a line saying so
/// (not "killed by signal 9"); forks refused at `tasks-max` are a line of
/// the log. A timeout or a cancel stays what it was.
pub fn judge(
    name: &str,
    limits: &ResourceLimits,
    usage: &Usage,
    result: Result<(), Failure>,
) -> Result<(), Failure> {
    if let (Some(t), n) = (limits.tasks_max, usage.forks_refused) {
        if n > 0 {
            tracing::warn!(
                parent: None,
                "tasks-max {t} of executor {name:?} reached: {n} fork{} refused",
                if n == 1 { " was" } else { "s were" }
            );
        }
    }
    if let Some(m) = limits.memory_max {
        let killed = matches!(result, Err(Failure::Exited { status: 137, .. }));
        let hit = match usage.oom_kills {
            // The counter also counts kills by the machine-wide OOM killer:
            // only the limit's own (the cgroup was at its limit) are ours.
            Some(n) => n > 0 && usage.memory_limit_hit,
            // No OOM-kill counts: the limit was reached and the build died
            // of SIGKILL.
            None => usage.memory_limit_hit && killed,
        };
        if hit && !matches!(result, Err(Failure::Cancelled | Failure::TimedOut(_))) {
            return Err(Failure::Limit(format!(
                "memory limit {} of executor {name:?} reached",
                human_bytes(m)
            )));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ResourceLimits {
        ResourceLimits {
            memory_max: Some(4 << 30),
            tasks_max: Some(64),
            ..ResourceLimits::default()
        }
    }

    fn killed() -> Result<(), Failure> {
        Err(Failure::Exited {
            status: 137,
            message: "builder killed by signal 9".into(),
        })
    }

    #[test]
    fn an_oom_kill_is_the_memory_limit_not_a_signal() {
        let u = Usage {
            oom_kills: Some(1),
            memory_limit_hit: true,
            ..Usage::default()
        };
        // Killed by the machine-wide OOM killer, the limit never reached:
        // a signal, not the limit.
        let global = Usage {
            memory_limit_hit: false,
            ..u
        };
        assert!(matches!(
            judge("big", &limits(), &global, killed()),
            Err(Failure::Exited { status: 137, .. })
        ));
        let r = judge("big", &limits(), &u, killed()).unwrap_err();
        assert!(matches!(r, Failure::Limit(_)));
        assert_eq!(
            r.to_string(),
            "memory limit 4 GiB of executor \"big\" reached"
        );
        assert_eq!(r.exit_code(), 100);
        // Even when the builder went on and exited 0 (cgroup v1 kills one
        // process): its outputs may lack what that process would have made.
        assert!(matches!(
            judge("big", &limits(), &u, Ok(())),
            Err(Failure::Limit(_))
        ));
        // A timeout stays a timeout.
        let t = judge("big", &limits(), &u, Err(Failure::TimedOut("t".into()))).unwrap_err();
        assert!(matches!(t, Failure::TimedOut(_)));
        // Without a memory limit, nothing to say.
        let none = ResourceLimits::default();
        assert!(judge("big", &none, &u, Ok(())).is_ok());
    }

    #[test]
    fn without_oom_counts_the_limit_and_sigkill_together_decide() {
        let mut u = Usage {
            memory_limit_hit: true,
            ..Usage::default()
        };
        assert!(matches!(
            judge("x", &limits(), &u, killed()),
            Err(Failure::Limit(_))
        ));
        // Reaching the limit and reclaiming page cache is no failure.
        assert!(judge("x", &limits(), &u, Ok(())).is_ok());
        u.memory_limit_hit = false;
        assert!(matches!(
            judge("x", &limits(), &u, killed()),
            Err(Failure::Exited { .. })
        ));
    }

    #[test]
    fn refused_forks_are_a_line_of_the_log() {
        let u = Usage {
            forks_refused: 57,
            ..Usage::default()
        };
        let (r, text) =
            crate::protocol::messages::capture(|| judge("forky", &limits(), &u, Ok(())));
        assert!(r.is_ok());
        assert_eq!(
            text,
            "nix-hatch: tasks-max 64 of executor \"forky\" reached: 57 forks were refused\n"
        );
    }
}
