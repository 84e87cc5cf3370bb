//! Which cgroup hierarchies this machine has mounted, which controllers
//! each offers, and where a process sits in each: read from
//! `/proc/self/mountinfo` (or a process's own) and `/proc/PID/cgroup`.
//! cgroup v2 (one unified hierarchy, NixOS and current Debian), v1 (one
//! hierarchy per controller or group of controllers) and the hybrid of
//! both are all described the same way: per controller, the hierarchy that
//! has it.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The controllers a build's cgroup may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    /// v1 only: CPU time (v2 has it in every cgroup's `cpu.stat`).
    CpuAcct,
}

impl Controller {
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::CpuAcct => "cpuacct",
        }
    }
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    /// Where it is mounted (`/sys/fs/cgroup`, `/sys/fs/cgroup/memory`).
    pub mount: PathBuf,
    /// The cgroup the mount shows at its top (`/` unless in a container).
    pub mount_root: String,
    /// v1: the controllers bound to it; v2: those its top cgroup offers.
    pub controllers: Vec<String>,
    /// The process's cgroup in it, as `/proc/PID/cgroup` gives it.
    pub own: Option<String>,
}

impl Hierarchy {
    pub fn has(&self, c: Controller) -> bool {
        self.controllers.iter().any(|x| x == c.name())
    }

    /// The directory of cgroup `path` (a cgroup path like `/a/b`), if this
    /// mount shows it.
    pub fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rest = if self.mount_root == "/" {
            path
        } else {
            match path.strip_prefix(self.mount_root.as_str()) {
                Some(r) if r.is_empty() || r.starts_with('/') => r,
                _ => return None,
            }
        };
        let mut dir = self.mount.clone();
        for c in rest.split('/').filter(|c| !c.is_empty()) {
            // A cgroup outside this cgroup namespace's root shows as
            // `/../…`: not a directory of this mount.
            if c == "." || c == ".." {
                return None;
            }
            dir.push(c);
        }
        Some(dir)
    }
}

/// Every cgroup hierarchy mounted here, with a process's place in each.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    pub hierarchies: Vec<Hierarchy>,
}

/// v1 controller names that may appear among a cgroup mount's options.
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

impl Cgroups {
    /// This process's view.
    pub fn detect() -> Cgroups {
        Cgroups::detect_for("self")
    }

    /// The hierarchies mounted here, with process `pid`'s (`"self"` or a
    /// number) cgroups in them.
    pub fn detect_for(pid: &str) -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Cgroups::parse(&mountinfo, &own)
    }

    /// From the text of a mountinfo file and of a `/proc/PID/cgroup`.
    /// A v2 hierarchy's controllers are read from its top directory.
    pub fn parse(mountinfo: &str, proc_cgroup: &str) -> Cgroups {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                continue;
            }
            let (root, mount) = (unescape(pre[3]), PathBuf::from(unescape(pre[4])));
            let h = match post[0] {
                "cgroup2" => {
                    if hierarchies.iter().any(|h| h.version == Version::V2) {
                        continue;
                    }
                    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect();
                    Hierarchy {
                        version: Version::V2,
                        mount,
                        mount_root: root,
                        controllers,
                        own: None,
                    }
                }
                "cgroup" => {
                    let controllers: Vec<String> = post[2]
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(str::to_owned)
                        .collect();
                    // A named hierarchy without controllers (name=systemd)
                    // is nothing to limit with; the same one mounted twice
                    // (bind mounts) counts once.
                    if controllers.is_empty()
                        || hierarchies.iter().any(|h| h.controllers == controllers)
                    {
                        continue;
                    }
                    Hierarchy {
                        version: Version::V1,
                        mount,
                        mount_root: root,
                        controllers,
                        own: None,
                    }
                }
                _ => continue,
            };
            hierarchies.push(h);
        }
        for line in proc_cgroup.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(id), Some(names), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let h = if id == "0" && names.is_empty() {
                hierarchies.iter_mut().find(|h| h.version == Version::V2)
            } else {
                let mut names: Vec<&str> = names.split(',').collect();
                names.sort_unstable();
                hierarchies.iter_mut().find(|h| {
                    let mut c: Vec<&str> = h.controllers.iter().map(String::as_str).collect();
                    c.sort_unstable();
                    h.version == Version::V1 && c == names
                })
            };
            if let Some(h) = h {
                h.own = Some(path.to_owned());
            }
        }
        Cgroups { hierarchies }
    }

    /// The hierarchy that has controller `c`: a v1 hierarchy bound to it,
    /// else the v2 one if its top offers it.
    pub fn with(&self, c: Controller) -> Option<&Hierarchy> {
        let v1 = self
            .hierarchies
            .iter()
            .find(|h| h.version == Version::V1 && h.has(c));
        v1.or_else(|| {
            self.hierarchies
                .iter()
                .find(|h| h.version == Version::V2 && h.has(c))
        })
    }

    pub fn v2(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.version == Version::V2)
    }

    /// What is mounted, for messages: `cgroup v2 (/sys/fs/cgroup: cpu
    /// memory pids)`, `cgroup v1 (cpu, memory, pids)`.
    pub fn describe(&self) -> String {
        let v1: Vec<&str> = self
            .hierarchies
            .iter()
            .filter(|h| h.version == Version::V1)
            .flat_map(|h| h.controllers.iter().map(String::as_str))
            .filter(|c| ["memory", "pids", "cpu", "cpuacct"].contains(c))
            .collect();
        let mut parts = Vec::new();
        if !v1.is_empty() {
            parts.push(format!("cgroup v1 ({})", v1.join(", ")));
        }
        if let Some(h) = self.v2() {
            parts.push(format!(
                "cgroup v2 ({}: {})",
                h.mount.display(),
                if h.controllers.is_empty() {
                    "no controllers".to_owned()
                } else {
                    h.controllers.join(" ")
                }
            ));
        }
        if parts.is_empty() {
            "no cgroup file system mounted".to_owned()
        } else {
            parts.join(" and ")
        }
    }
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup path of `path`'s parent (`/a/b` → `/a`; the root stays).
pub fn parent_of(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// This machine's kind: cgroup v1 controllers in their own mounts,
    /// systemd's named hierarchy, and an empty unified (v2) mount.
    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /nonexistent/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_OWN: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/sessions/s1\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_hierarchies_per_controller() {
        let c = Cgroups::parse(V1_MOUNTS, V1_OWN);
        let mem = c.with(Controller::Memory).unwrap();
        assert_eq!(mem.version, Version::V1);
        assert_eq!(mem.mount, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(mem.own.as_deref(), Some("/sessions/s1"));
        assert_eq!(
            c.with(Controller::CpuAcct).unwrap().mount,
            Path::new("/sys/fs/cgroup/cpuacct")
        );
        assert_eq!(c.with(Controller::Pids).unwrap().own.as_deref(), Some("/"));
        // The unified mount of the hybrid layout offers nothing.
        assert!(c.v2().unwrap().controllers.is_empty());
        assert_eq!(
            c.describe(),
            "cgroup v1 (cpu, cpuacct, memory, pids) and cgroup v2 (/nonexistent/unified: no controllers)"
        );
    }

    #[test]
    fn co_mounted_v1_controllers_are_one_hierarchy() {
        let m = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpuacct,cpu\n";
        let c = Cgroups::parse(m, "3:cpu,cpuacct:/a/b\n");
        let cpu = c.with(Controller::Cpu).unwrap();
        assert_eq!(cpu, c.with(Controller::CpuAcct).unwrap());
        assert_eq!(cpu.own.as_deref(), Some("/a/b"));
    }

    #[test]
    fn v2_reads_its_controllers_and_container_roots() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let m = format!(
            "30 23 0:27 /lxc/c1 {} rw - cgroup2 cgroup2 rw,nsdelegate\n",
            dir.path().display()
        );
        let c = Cgroups::parse(&m, "0::/lxc/c1/system.slice/nix-daemon.service\n");
        let v2 = c.with(Controller::Memory).unwrap();
        assert_eq!(v2.version, Version::V2);
        assert!(c.with(Controller::CpuAcct).is_none());
        assert_eq!(
            v2.dir_of("/lxc/c1/system.slice"),
            Some(dir.path().join("system.slice"))
        );
        assert_eq!(v2.dir_of("/other"), None);
        assert_eq!(v2.dir_of("/lxc/c1"), Some(dir.path().to_path_buf()));
        // Outside the cgroup namespace's root: not below this mount.
        assert_eq!(v2.dir_of("/lxc/c1/../../x"), None);
    }

    #[test]
    fn parents_and_escapes() {
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("/"), "/");
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
    }
}
