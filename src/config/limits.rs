//! The resource limits every executor may have: `memory-max`, `tasks-max`,
//! `cpu-max` and where the builds' cgroups go (`cgroup-parent`). A jail's
//! `tmp-size` is read with the jail's keys. Enforcing them is the
//! executors' business (`executors::cgroup`); what this machine offers is
//! said by `nix-hatch check`.

use super::keys::{Keys, Problems};

/// Smallest `memory-max`: below it not even the runner starts.
pub const MIN_MEMORY: u64 = 1 << 20;
/// Smallest `tasks-max`: nix-hatch's runner and bubblewrap count too (a
/// jail's builder starts as the fourth task).
pub const MIN_TASKS: u64 = 8;
/// Smallest `cpu-max` (the kernel's smallest quota is 1 ms per 100 ms).
pub const MIN_CPU: f64 = 0.01;
/// Largest `cpu-max` taken (cores).
pub const MAX_CPU: f64 = 1_000_000.0;
/// The CFS period nix-hatch sets, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceLimits {
    /// Bytes of memory (RAM, page cache and tmpfs of the build included).
    pub memory_max: Option<u64>,
    /// Processes and threads.
    pub tasks_max: Option<u64>,
    /// Cores, fractional.
    pub cpu_max: Option<f64>,
    /// A cgroup path as in /proc/self/cgroup (`/nix-hatch`), below the root
    /// of each cgroup hierarchy; `None`: beside the hook's own cgroup.
    pub cgroup_parent: Option<String>,
}

impl ResourceLimits {
    /// Whether any limit is set (then a build needs a cgroup to run).
    pub fn any(&self) -> bool {
        self.memory_max.is_some() || self.tasks_max.is_some() || self.cpu_max.is_some()
    }

    /// Whether builds run in a cgroup of their own: with limits, or where
    /// the admin said where (then also for the accounting alone).
    pub fn wants_cgroup(&self) -> bool {
        self.any() || self.cgroup_parent.is_some()
    }

    /// `cpu-max` as CFS quota per [`CPU_PERIOD_US`], in microseconds.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu_max
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
    }

    /// The limits in one line, as `check` and the log show them:
    /// `memory-max 4 GiB, tasks-max 512, cpu-max 0.5`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.memory_max {
            parts.push(format!("memory-max {}", super::keys::human_bytes(m)));
        }
        if let Some(t) = self.tasks_max {
            parts.push(format!("tasks-max {t}"));
        }
        if let Some(c) = self.cpu_max {
            parts.push(format!("cpu-max {c}"));
        }
        if parts.is_empty() {
            return "no limits (the accounting only)".to_owned();
        }
        parts.join(", ")
    }
}

/// Reads the limits of the executor at `ctx`.
pub(super) fn parse(ctx: &str, k: &mut Keys, p: &mut Problems) -> ResourceLimits {
    let memory_max = k.size(p, "memory-max");
    if memory_max.is_some_and(|m| m < MIN_MEMORY) {
        p.push(format!(
            "{ctx}.memory-max: at least 1M (a build needs some memory to start at all)"
        ));
    }
    let tasks_max = k.uint(p, "tasks-max");
    if tasks_max.is_some_and(|t| t < MIN_TASKS) {
        p.push(format!(
            "{ctx}.tasks-max: at least {MIN_TASKS} (nix-hatch's runner and bubblewrap count too)"
        ));
    }
    let cpu_max = k.number(p, "cpu-max");
    if let Some(c) = cpu_max {
        if !(MIN_CPU..=MAX_CPU).contains(&c) {
            p.push(format!(
                "{ctx}.cpu-max: {c} is not a number of cores from {MIN_CPU} up (e.g. 0.5 or 4)"
            ));
        }
    }
    let cgroup_parent = k.string(p, "cgroup-parent");
    if let Some(c) = &cgroup_parent {
        if let Err(why) = check_cgroup_path(c) {
            p.push(format!("{ctx}.cgroup-parent: {why}"));
        }
    }
    ResourceLimits {
        memory_max,
        tasks_max,
        cpu_max,
        cgroup_parent: cgroup_parent.map(|c| normalize(&c)),
    }
}

/// A cgroup path: absolute, below the hierarchy's root, no `.` or `..`.
fn check_cgroup_path(c: &str) -> Result<(), String> {
    if !c.starts_with('/') {
        return Err(format!(
            "{c:?} must be an absolute cgroup path, e.g. \"/nix-hatch\""
        ));
    }
    if c.starts_with("/sys/fs/cgroup") {
        return Err(format!(
            "{c:?} is a file system path; give the cgroup path as /proc/self/cgroup shows it (\"/nix-hatch\" for /sys/fs/cgroup/nix-hatch)"
        ));
    }
    if c.split('/').any(|x| x == "." || x == "..") || c.contains(['\n', '\0']) {
        return Err(format!("{c:?} may not contain \".\" or \"..\""));
    }
    Ok(())
}

/// `/a//b/` → `/a/b`.
fn normalize(c: &str) -> String {
    let parts: Vec<&str> = c.split('/').filter(|x| !x.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

    fn host(extra: &str) -> String {
        format!("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\n{extra}")
    }

    #[test]
    fn limits_are_read_with_their_units() {
        let c = parse(&host(
            "memory-max = \"4G\"\ntasks-max = 512\ncpu-max = 0.5\ncgroup-parent = \"/nix-hatch//builds/\"\n",
        ))
        .unwrap();
        let l = &c.executors["a"].limits;
        assert_eq!(l.memory_max, Some(4 << 30));
        assert_eq!(l.tasks_max, Some(512));
        assert_eq!(l.cpu_max, Some(0.5));
        assert_eq!(l.cpu_quota_us(), Some(50_000));
        assert_eq!(l.cgroup_parent.as_deref(), Some("/nix-hatch/builds"));
        assert_eq!(l.describe(), "memory-max 4 GiB, tasks-max 512, cpu-max 0.5");
        assert!(l.any() && l.wants_cgroup());
        let c = parse(&host("cpu-max = 2\n")).unwrap();
        assert_eq!(c.executors["a"].limits.cpu_quota_us(), Some(200_000));
        let c = parse(&host("")).unwrap();
        assert!(!c.executors["a"].limits.wants_cgroup());
    }

    #[test]
    fn bad_limits_are_one_line_each() {
        let errs = parse(&host(
            "memory-max = \"lots\"\ntasks-max = 2\ncpu-max = 0\ncgroup-parent = \"/sys/fs/cgroup/x\"\n",
        ))
        .unwrap_err();
        for w in [
            "executors.a.memory-max: expected a size",
            "executors.a.tasks-max: at least 8",
            "executors.a.cpu-max: 0 is not a number of cores",
            "executors.a.cgroup-parent: \"/sys/fs/cgroup/x\" is a file system path",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(w)), "{w} not in {errs:?}");
        }
        for bad in ["\"nix-hatch\"", "\"/a/../b\"", "\"/a/./b\""] {
            let errs = parse(&host(&format!("cgroup-parent = {bad}\n"))).unwrap_err();
            assert!(errs[0].contains("cgroup-parent"), "{errs:?}");
        }
        let errs = parse(&host("memory-max = \"512K\"\ncpu-max = \"half\"\n")).unwrap_err();
        assert!(errs.iter().any(|e| e.contains("memory-max: at least 1M")));
        assert!(errs
            .iter()
            .any(|e| e.contains("cpu-max: expected a number")));
    }
}
