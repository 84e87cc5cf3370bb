//! The interface files of a build's cgroup, in both versions: setting the
//! limits, and reading back what the build used and which limits it hit.
//!
//! | | v2 | v1 |
//! |---|---|---|
//! | memory-max | `memory.max`, `memory.swap.max` = 0, `memory.oom.group` = 1 | `memory.limit_in_bytes`, `memory.memsw.limit_in_bytes` |
//! | tasks-max | `pids.max` | `pids.max` |
//! | cpu-max | `cpu.max` | `cpu.cfs_quota_us` / `cpu.cfs_period_us` |
//! | peak memory | `memory.peak` | `memory.max_usage_in_bytes` |
//! | CPU time | `cpu.stat` `usage_usec` | `cpuacct.usage` |
//! | OOM kills | `memory.events` `oom_kill` | `memory.oom_control` `oom_kill` (`memory.failcnt`) |
//! | forks refused | `pids.events` `max` | `pids.events` `max` |
//! | throttled | `cpu.stat` `throttled_usec` | `cpu.stat` `throttled_time` |

use std::path::Path;
use std::time::Duration;

use super::detect::{Controller, Version};
use crate::config::limits::CPU_PERIOD_US;
use crate::config::ResourceLimits;

/// Writes `value` to `dir/file`.
pub(super) fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(|e| format!("writing {value:?} to {}: {e}", p.display()))
}

/// Sets the limits a cgroup's `controllers` enforce.
pub(super) fn apply(
    version: Version,
    controllers: &[Controller],
    dir: &Path,
    limits: &ResourceLimits,
) -> Result<(), String> {
    for c in controllers {
        match (c, version) {
            (Controller::Memory, Version::V2) => {
                if let Some(m) = limits.memory_max {
                    write(dir, "memory.max", &m.to_string())?;
                    // The limit is all the memory the build gets: no swap
                    // beyond it, and an OOM kill ends the whole build rather
                    // than one of its processes.
                    if dir.join("memory.swap.max").exists() {
                        write(dir, "memory.swap.max", "0")?;
                    }
                    if dir.join("memory.oom.group").exists() {
                        write(dir, "memory.oom.group", "1")?;
                    }
                }
            }
            (Controller::Memory, Version::V1) => {
                if let Some(m) = limits.memory_max {
                    write(dir, "memory.limit_in_bytes", &m.to_string())?;
                    // With swap accounting (swapaccount=1), RAM + swap too.
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(dir, "memory.memsw.limit_in_bytes", &m.to_string())?;
                    }
                }
            }
            (Controller::Pids, _) => {
                if let Some(t) = limits.tasks_max {
                    write(dir, "pids.max", &t.to_string())?;
                }
            }
            (Controller::Cpu, Version::V2) => {
                if let Some(q) = limits.cpu_quota_us() {
                    write(dir, "cpu.max", &format!("{q} {CPU_PERIOD_US}"))?;
                }
            }
            (Controller::Cpu, Version::V1) => {
                if let Some(q) = limits.cpu_quota_us() {
                    write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &q.to_string())?;
                }
            }
            (Controller::CpuAcct, _) => {}
        }
    }
    Ok(())
}

/// What a build's cgroups say about it (summed over its hierarchies).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    pub peak_memory: Option<u64>,
    pub cpu: Option<Duration>,
    /// `None`: the kernel does not count them (v1 before Linux 4.13).
    pub oom_kills: Option<u64>,
    /// The memory limit was reached at least once.
    pub memory_limit_hit: bool,
    pub forks_refused: u64,
    pub throttled: Option<Duration>,
}

/// Adds what the cgroup `dir` (of `version`, with `controllers`) says to
/// `r`. Files that are missing or unreadable leave their figure unknown.
pub(super) fn read(version: Version, controllers: &[Controller], dir: &Path, r: &mut Reading) {
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let number = |f: &str| text(f).and_then(|t| t.trim().parse::<u64>().ok());
    if version == Version::V2 {
        if let Some(stat) = text("cpu.stat") {
            if let Some(us) = keyed(&stat, "usage_usec") {
                r.cpu = Some(Duration::from_micros(us));
            }
        }
    }
    for c in controllers {
        match (c, version) {
            (Controller::Memory, Version::V2) => {
                r.peak_memory = number("memory.peak").or(r.peak_memory);
                if let Some(ev) = text("memory.events") {
                    r.oom_kills = keyed(&ev, "oom_kill").or(r.oom_kills);
                    r.memory_limit_hit |= keyed(&ev, "max").is_some_and(|n| n > 0)
                        || keyed(&ev, "oom").is_some_and(|n| n > 0);
                }
                let limit = number("memory.max");
                r.memory_limit_hit |=
                    matches!((r.peak_memory, limit), (Some(peak), Some(limit)) if peak >= limit);
            }
            (Controller::Memory, Version::V1) => {
                r.peak_memory = number("memory.max_usage_in_bytes").or(r.peak_memory);
                if let Some(oc) = text("memory.oom_control") {
                    r.oom_kills = keyed(&oc, "oom_kill").or(r.oom_kills);
                    r.memory_limit_hit |= keyed(&oc, "under_oom").is_some_and(|n| n > 0);
                }
                // failcnt stays 0 on recent kernels even when the limit
                // was hit (Linux 6.18 here); the peak reaching the limit
                // is what tells, for memory and for memory+swap.
                r.memory_limit_hit |= ["memory.failcnt", "memory.memsw.failcnt"]
                    .iter()
                    .any(|f| number(f).is_some_and(|n| n > 0))
                    || ["memory.", "memory.memsw."].iter().any(|p| {
                        let peak = number(&format!("{p}max_usage_in_bytes"));
                        let limit = number(&format!("{p}limit_in_bytes"));
                        matches!((peak, limit), (Some(peak), Some(limit)) if peak >= limit)
                    });
            }
            (Controller::Pids, _) => {
                if let Some(ev) = text("pids.events") {
                    r.forks_refused += keyed(&ev, "max").unwrap_or(0);
                }
            }
            (Controller::Cpu, Version::V2) => {
                if let Some(stat) = text("cpu.stat") {
                    r.throttled = keyed(&stat, "throttled_usec").map(Duration::from_micros);
                }
            }
            (Controller::Cpu, Version::V1) => {
                if let Some(stat) = text("cpu.stat") {
                    r.throttled = keyed(&stat, "throttled_time").map(Duration::from_nanos);
                }
            }
            (Controller::CpuAcct, _) => {
                if let Some(ns) = number("cpuacct.usage") {
                    r.cpu = Some(Duration::from_nanos(ns));
                }
            }
        }
    }
}

/// The value of `key` in a flat-keyed file (`key value` lines).
pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ResourceLimits {
        ResourceLimits {
            memory_max: Some(64 << 20),
            tasks_max: Some(32),
            cpu_max: Some(0.5),
            cgroup_parent: None,
        }
    }

    const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::CpuAcct,
    ];

    fn file(dir: &Path, f: &str) -> String {
        std::fs::read_to_string(dir.join(f)).unwrap()
    }

    #[test]
    fn v2_limits_and_readings() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // What the kernel shows in a fresh cgroup with memory and swap.
        std::fs::write(dir.join("memory.swap.max"), "max\n").unwrap();
        std::fs::write(dir.join("memory.oom.group"), "0\n").unwrap();
        apply(Version::V2, &ALL, dir, &limits()).unwrap();
        assert_eq!(file(dir, "memory.max"), "67108864");
        assert_eq!(file(dir, "memory.swap.max"), "0");
        assert_eq!(file(dir, "memory.oom.group"), "1");
        assert_eq!(file(dir, "pids.max"), "32");
        assert_eq!(file(dir, "cpu.max"), "50000 100000");

        std::fs::write(dir.join("memory.peak"), "67100672\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 1233\noom 1\noom_kill 1\noom_group_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("pids.events"), "max 57\n").unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1520000\nuser_usec 1500000\nsystem_usec 20000\nnr_periods 30\nnr_throttled 29\nthrottled_usec 1480000\n",
        )
        .unwrap();
        let mut r = Reading::default();
        read(Version::V2, &ALL, dir, &mut r);
        assert_eq!(
            r,
            Reading {
                peak_memory: Some(67_100_672),
                cpu: Some(Duration::from_millis(1520)),
                oom_kills: Some(1),
                memory_limit_hit: true,
                forks_refused: 57,
                throttled: Some(Duration::from_millis(1480)),
            }
        );
    }

    #[test]
    fn v1_limits_and_readings_across_hierarchies() {
        let (mem, pids, cpu, acct) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        std::fs::write(mem.path().join("memory.memsw.limit_in_bytes"), "").unwrap();
        let l = limits();
        apply(Version::V1, &[Controller::Memory], mem.path(), &l).unwrap();
        apply(Version::V1, &[Controller::Pids], pids.path(), &l).unwrap();
        apply(Version::V1, &[Controller::Cpu], cpu.path(), &l).unwrap();
        assert_eq!(file(mem.path(), "memory.limit_in_bytes"), "67108864");
        assert_eq!(file(mem.path(), "memory.memsw.limit_in_bytes"), "67108864");
        assert_eq!(file(pids.path(), "pids.max"), "32");
        assert_eq!(file(cpu.path(), "cpu.cfs_quota_us"), "50000");
        assert_eq!(file(cpu.path(), "cpu.cfs_period_us"), "100000");

        std::fs::write(mem.path().join("memory.max_usage_in_bytes"), "67108864\n").unwrap();
        std::fs::write(
            mem.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(mem.path().join("memory.failcnt"), "310\n").unwrap();
        std::fs::write(pids.path().join("pids.events"), "max 9\n").unwrap();
        std::fs::write(
            cpu.path().join("cpu.stat"),
            "nr_periods 40\nnr_throttled 38\nthrottled_time 1900000000\n",
        )
        .unwrap();
        std::fs::write(acct.path().join("cpuacct.usage"), "2004000000\n").unwrap();
        let mut r = Reading::default();
        read(Version::V1, &[Controller::Memory], mem.path(), &mut r);
        read(Version::V1, &[Controller::Pids], pids.path(), &mut r);
        read(Version::V1, &[Controller::Cpu], cpu.path(), &mut r);
        read(Version::V1, &[Controller::CpuAcct], acct.path(), &mut r);
        assert_eq!(
            r,
            Reading {
                peak_memory: Some(64 << 20),
                cpu: Some(Duration::from_millis(2004)),
                oom_kills: Some(2),
                memory_limit_hit: true,
                forks_refused: 9,
                throttled: Some(Duration::from_millis(1900)),
            }
        );

        // Linux 6.18: failcnt stays 0 at the limit; the peak at the limit
        // tells. A kill by the machine's OOM killer below it is no hit.
        std::fs::write(mem.path().join("memory.failcnt"), "0\n").unwrap();
        let mut r = Reading::default();
        read(Version::V1, &[Controller::Memory], mem.path(), &mut r);
        assert!(r.memory_limit_hit);
        std::fs::write(mem.path().join("memory.max_usage_in_bytes"), "1048576\n").unwrap();
        let mut r = Reading::default();
        read(Version::V1, &[Controller::Memory], mem.path(), &mut r);
        assert_eq!((r.oom_kills, r.memory_limit_hit), (Some(2), false));
    }

    #[test]
    fn nothing_set_nothing_written() {
        let d = tempfile::tempdir().unwrap();
        apply(Version::V2, &ALL, d.path(), &ResourceLimits::default()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // A kernel without OOM-kill counts (v1 before 4.13).
        std::fs::write(
            d.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 1\n",
        )
        .unwrap();
        let mut r = Reading::default();
        read(Version::V1, &[Controller::Memory], d.path(), &mut r);
        assert_eq!(r.oom_kills, None);
        assert!(r.memory_limit_hit);
    }
}
