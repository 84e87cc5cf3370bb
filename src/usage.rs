//! What one escape build used (peak memory, CPU time, wall time) and which
//! of its limits it hit, as measured where it ran: by its cgroup, or,
//! without one, by the kernel's accounting of the build's processes.
//! Plain data: the executors fill it in, the `ssh` agent sends it over the
//! channel, the hook writes it to the build log and the audit record.

use std::time::Duration;

pub use crate::config::keys::human_bytes;

/// Where the figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// The build's own cgroup (v1 or v2): every process of the build.
    Cgroup,
    /// `getrusage` of the build's processes once they were reaped: CPU
    /// time of all of them, peak memory of the largest one.
    #[default]
    Processes,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Where the peak memory figure comes from.
    pub memory_source: Source,
    /// Bytes; `None` where nothing measured it.
    pub peak_memory: Option<u64>,
    /// User + system.
    pub cpu: Option<Duration>,
    /// From the start of the builder to its end.
    pub wall: Duration,
    /// Processes the kernel killed at `memory-max`; `None` where it does
    /// not count them (cgroup v1 before Linux 4.13, no cgroup).
    pub oom_kills: Option<u64>,
    /// The memory limit was reached at least once (v1 without OOM-kill
    /// counts: `memory.failcnt`).
    pub memory_limit_hit: bool,
    /// Forks refused at `tasks-max`.
    pub forks_refused: u64,
    /// Time the build was held back by `cpu-max`.
    pub throttled: Option<Duration>,
}

impl Usage {
    /// The build log's closing line (after `used `), e.g. `peak memory
    /// 45.2 MiB, CPU 1.52 s (user+system), wall 3.01 s`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (self.peak_memory, self.memory_source) {
            (Some(m), Source::Cgroup) => parts.push(format!("peak memory {}", human_bytes(m))),
            (Some(m), Source::Processes) => {
                parts.push(format!("peak memory {} (largest process)", human_bytes(m)))
            }
            (None, _) => {}
        }
        if let Some(c) = self.cpu {
            parts.push(format!("CPU {:.2} s (user+system)", c.as_secs_f64()));
        }
        parts.push(format!("wall {:.2} s", self.wall.as_secs_f64()));
        if let Some(t) = self.throttled.filter(|t| !t.is_zero()) {
            parts.push(format!("throttled by cpu-max for {:.2} s", t.as_secs_f64()));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_config() {
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(47_400_000), "45.2 MiB");
        assert_eq!(human_bytes(900), "900 bytes");
    }

    #[test]
    fn the_line_says_where_memory_was_measured() {
        let mut u = Usage {
            memory_source: Source::Cgroup,
            peak_memory: Some(47_400_000),
            cpu: Some(Duration::from_millis(1520)),
            wall: Duration::from_millis(3010),
            ..Usage::default()
        };
        assert_eq!(
            u.describe(),
            "peak memory 45.2 MiB, CPU 1.52 s (user+system), wall 3.01 s"
        );
        u.memory_source = Source::Processes;
        u.throttled = Some(Duration::from_millis(1250));
        assert_eq!(
            u.describe(),
            "peak memory 45.2 MiB (largest process), CPU 1.52 s (user+system), wall 3.01 s, throttled by cpu-max for 1.25 s"
        );
        let bare = Usage {
            wall: Duration::from_secs(2),
            ..Usage::default()
        };
        assert_eq!(bare.describe(), "wall 2.00 s");
    }
}
