//! A cgroup per build: every process of the build (the runner, the host
//! command or the whole jail, bwrap included) joins it before it execs, so
//! nothing of the build runs outside it even for a moment. It carries the
//! executor's limits and tells what the build used; it is removed when the
//! build ends, and a hook that was killed leaves one that the next hook
//! start removes ([`Plan::sweep`]).
//!
//! Where: under `cgroup-parent`, else beside the hook's own cgroup (in its
//! parent: on cgroup v2 only leaf cgroups may hold processes, and the
//! hook's holds the hook), in a directory `nix-hatch` that holds nothing
//! but build cgroups, one per build named after its staging dir. On cgroup
//! v2 the controllers a limit needs are enabled on the way down from the
//! deepest existing directory; on v1 each controller's hierarchy gets its
//! own directory (memory, pids, cpu, and cpuacct for the accounting).

pub mod detect;
mod knobs;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::config::ResourceLimits;
pub use detect::{Cgroups, Controller, Hierarchy, Version};
pub use knobs::Reading;

/// The directory, in the parent, that holds the builds' cgroups.
pub const CONTAINER: &str = "nix-hatch";

/// Where a build's cgroups go: one per hierarchy it uses.
#[derive(Debug, Clone)]
pub struct Plan {
    parts: Vec<PlannedPart>,
}

#[derive(Debug, Clone)]
struct PlannedPart {
    version: Version,
    /// `<parent>/nix-hatch`.
    container: PathBuf,
    /// Controllers a configured limit needs: the build fails without them.
    required: Vec<Controller>,
    /// Controllers for the accounting only (peak memory, v1 CPU time).
    optional: Vec<Controller>,
}

impl PlannedPart {
    fn empty(version: Version) -> PlannedPart {
        PlannedPart {
            version,
            container: PathBuf::new(),
            required: Vec::new(),
            optional: Vec::new(),
        }
    }
}

/// Whether the build a cgroup was made for still runs ([`Plan::sweep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// Its owner is gone: whatever is left in it is ended.
    Dead,
    /// Not ours to judge (another state dir, a `check`): removed once old
    /// and empty.
    Unknown,
}

/// An unknown build cgroup this old (seconds) and empty is a leftover.
const UNKNOWN_AGE: u64 = 60;

impl Plan {
    /// Where the builds of an executor with `limits` get their cgroups on
    /// a machine with `cg`; why there is no usable place, if not.
    pub fn new(cg: &Cgroups, limits: &ResourceLimits) -> Result<Plan, String> {
        let mut required = Vec::new();
        if limits.memory_max.is_some() {
            required.push(Controller::Memory);
        }
        if limits.tasks_max.is_some() {
            required.push(Controller::Pids);
        }
        if limits.cpu_max.is_some() {
            required.push(Controller::Cpu);
        }
        let mut wanted: Vec<(Controller, bool)> = required.iter().map(|&c| (c, true)).collect();
        for c in [Controller::Memory, Controller::CpuAcct] {
            if !required.contains(&c) {
                wanted.push((c, false));
            }
        }
        let mut parts: Vec<(&Hierarchy, PlannedPart)> = Vec::new();
        for (c, req) in wanted {
            let Some(h) = cg.with(c) else {
                if req {
                    return Err(format!(
                        "no cgroup hierarchy here has the {} controller ({})",
                        c.name(),
                        cg.describe()
                    ));
                }
                continue;
            };
            let i = match parts.iter().position(|(x, _)| x.mount == h.mount) {
                Some(i) => i,
                None => {
                    parts.push((h, PlannedPart::empty(h.version)));
                    parts.len() - 1
                }
            };
            let part = &mut parts[i].1;
            if req {
                part.required.push(c);
            } else {
                part.optional.push(c);
            }
        }
        if parts.is_empty() {
            // cgroup v2 counts CPU time in every cgroup, controller or not.
            match cg.v2() {
                Some(h) => parts.push((h, PlannedPart::empty(Version::V2))),
                None => return Err(format!("no usable cgroup hierarchy ({})", cg.describe())),
            }
        }
        let mut planned = Vec::new();
        for (h, mut part) in parts {
            let rel = match &limits.cgroup_parent {
                Some(p) => p.clone(),
                None => {
                    let own = h.own.as_deref().ok_or_else(|| {
                        format!(
                            "this process's cgroup in {} is not in /proc/self/cgroup; set cgroup-parent",
                            h.mount.display()
                        )
                    })?;
                    detect::parent_of(own).to_owned()
                }
            };
            let dir = h.dir_of(&rel).ok_or_else(|| {
                format!(
                    "cgroup {rel} is outside what is mounted at {} (which shows {})",
                    h.mount.display(),
                    h.mount_root
                )
            })?;
            part.container = dir.join(CONTAINER);
            planned.push(part);
        }
        Ok(Plan { parts: planned })
    }

    /// For messages: `cgroup v2 in /sys/fs/cgroup/x/nix-hatch (memory,
    /// pids)`, or on v1 `cgroup v1: memory in /sys/fs/cgroup/memory/x/
    /// nix-hatch, pids in …`.
    pub fn describe(&self) -> String {
        let names = |p: &PlannedPart| -> Vec<&str> {
            p.required
                .iter()
                .chain(&p.optional)
                .map(|c| c.name())
                .collect()
        };
        let mut out = Vec::new();
        let v1: Vec<String> = self
            .parts
            .iter()
            .filter(|p| p.version == Version::V1)
            .map(|p| format!("{} in {}", names(p).join(", "), p.container.display()))
            .collect();
        if !v1.is_empty() {
            out.push(format!("cgroup v1: {}", v1.join(", ")));
        }
        for p in self.parts.iter().filter(|p| p.version == Version::V2) {
            let cs = names(p);
            out.push(if cs.is_empty() {
                format!("cgroup v2 in {}", p.container.display())
            } else {
                format!("cgroup v2 in {} ({})", p.container.display(), cs.join(", "))
            });
        }
        out.join("; ")
    }

    /// The directories that hold the builds' cgroups.
    pub fn containers(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().map(|p| p.container.as_path())
    }

    /// Creates the cgroups of build `name` (a single path component) with
    /// `limits` set.
    pub fn create(&self, name: &str, limits: &ResourceLimits) -> Result<BuildCgroup, String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("{name:?} cannot name a cgroup"));
        }
        let mut made = BuildCgroup { parts: Vec::new() };
        for part in &self.parts {
            let controllers = match part.version {
                Version::V2 => prepare_v2(&part.container, &part.required, &part.optional)?,
                Version::V1 => {
                    if let Err(e) = std::fs::create_dir_all(&part.container) {
                        if part.required.is_empty() {
                            continue;
                        }
                        return Err(format!("creating {}: {e}", part.container.display()));
                    }
                    part.required
                        .iter()
                        .chain(&part.optional)
                        .copied()
                        .collect()
                }
            };
            let dir = part.container.join(name);
            if let Err(e) = make_dir(&dir) {
                if part.required.is_empty() && part.version == Version::V1 {
                    continue;
                }
                return Err(e);
            }
            made.parts.push(Part {
                version: part.version,
                dir: dir.clone(),
                controllers,
                procs: None,
            });
            let p = made.parts.last_mut().expect("just pushed");
            knobs::apply(p.version, &p.controllers, &dir, limits)?;
            let procs = dir.join("cgroup.procs");
            p.procs = Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&procs)
                    .map_err(|e| format!("opening {}: {e}", procs.display()))?,
            );
        }
        Ok(made)
    }

    /// Removes the build cgroups whose build is over: those `live` calls
    /// [`Liveness::Dead`] (ending what is left in them), and empty unknown
    /// ones older than a minute. Returns how many went; best effort.
    pub fn sweep(&self, live: impl Fn(&str) -> Liveness) -> usize {
        let mut removed = 0;
        for part in &self.parts {
            let Ok(entries) = std::fs::read_dir(&part.container) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let dir = e.path();
                let gone = match live(&name) {
                    Liveness::Live => continue,
                    Liveness::Dead => remove_leftover(&dir, Duration::from_secs(1)),
                    Liveness::Unknown if older_than(&dir, UNKNOWN_AGE) => std::fs::remove_dir(&dir),
                    Liveness::Unknown => continue,
                };
                match gone {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::debug!("leftover cgroup {} stays: {e}", dir.display()),
                }
            }
        }
        removed
    }
}

/// The cgroups of one build (one per hierarchy), removed on drop.
#[derive(Debug)]
pub struct BuildCgroup {
    parts: Vec<Part>,
}

#[derive(Debug)]
struct Part {
    version: Version,
    dir: PathBuf,
    controllers: Vec<Controller>,
    /// Its `cgroup.procs`, open for writing: a child joins by writing to it.
    procs: Option<File>,
}

impl BuildCgroup {
    /// Makes the process `cmd` starts join every cgroup of the build
    /// between fork and exec (it takes its children with it).
    pub fn join_on_spawn(&self, cmd: &mut Command) {
        let fds: Vec<i32> = self
            .parts
            .iter()
            .filter_map(|p| p.procs.as_ref().map(|f| f.as_raw_fd()))
            .collect();
        // SAFETY: only write(2) on descriptors that live as long as `self`
        // (which the caller keeps past the spawn); no allocation.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                for &fd in &fds {
                    // "0": the writing process itself.
                    if nix::libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// What the build's cgroups say about it.
    pub fn read(&self) -> Reading {
        let mut r = Reading::default();
        for p in &self.parts {
            knobs::read(p.version, &p.controllers, &p.dir, &mut r);
        }
        r
    }

    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().map(|p| p.dir.as_path())
    }

    /// Removes the cgroups (ending anything still in them); the first
    /// failure, if one stays.
    pub fn remove(mut self) -> Result<(), String> {
        self.remove_parts()
    }

    fn remove_parts(&mut self) -> Result<(), String> {
        let mut first = Ok(());
        for p in self.parts.drain(..) {
            drop(p.procs);
            if let Err(e) = remove_leftover(&p.dir, Duration::from_secs(2)) {
                if first.is_ok() {
                    first = Err(format!("removing cgroup {}: {e}", p.dir.display()));
                }
            }
        }
        first
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        // A cgroup that stays is removed by the next hook's sweep.
        let _ = self.remove_parts();
    }
}

/// Makes `container` (and what is missing above it) with the controllers
/// enabled for the build cgroups below it; returns the controllers the
/// build cgroup gets: every required one, and the optional ones that could
/// be had. Directories that exist are only changed by enabling a missing
/// controller.
fn prepare_v2(
    container: &Path,
    required: &[Controller],
    optional: &[Controller],
) -> Result<Vec<Controller>, String> {
    // From the deepest existing directory down to the container.
    let mut chain = vec![container.to_path_buf()];
    while !chain.last().expect("non-empty").exists() {
        let up = match chain.last().expect("non-empty").parent() {
            Some(p) => p.to_path_buf(),
            None => break,
        };
        chain.push(up);
    }
    chain.reverse();
    let mut got: Vec<Controller> = required.to_vec();
    let mut optional = optional.to_vec();
    for (i, dir) in chain.iter().enumerate() {
        if i > 0 {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("creating {}: {e}", dir.display())),
            }
        }
        for &c in required {
            enable(dir, c)?;
        }
        optional.retain(|&c| enable(dir, c).is_ok());
    }
    got.extend(optional);
    Ok(got)
}

/// Enables controller `c` for the children of cgroup `dir` (v2).
fn enable(dir: &Path, c: Controller) -> Result<(), String> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let has = |text: String| text.split_whitespace().any(|x| x == c.name());
    if has(read("cgroup.subtree_control")) {
        return Ok(());
    }
    if !has(read("cgroup.controllers")) {
        return Err(format!(
            "the {} controller is not available in {} (its parent does not pass it on: enable it in the parent's cgroup.subtree_control, or delegate that cgroup)",
            c.name(),
            dir.display()
        ));
    }
    let p = dir.join("cgroup.subtree_control");
    std::fs::write(&p, format!("+{}", c.name())).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            format!(
                "cannot enable the {} controller below {}: processes run in that cgroup itself, and cgroup v2 puts processes only in leaf cgroups; point cgroup-parent at a cgroup without processes, or run the daemon in a sub-cgroup of a delegated one (systemd: Delegate=yes and DelegateSubgroup=supervisor)",
                c.name(),
                dir.display()
            )
        } else {
            format!("enabling the {} controller in {}: {e}", c.name(), p.display())
        }
    })
}

/// Creates a build cgroup; one left with the same name (a dead hook with
/// our pid, see `Staging::create`) is removed first.
fn make_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        // Its owner is gone (we hold the staging lock of that name):
        // whatever it left running there ends with it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            remove_leftover(dir, Duration::from_secs(2))
                .and_then(|()| std::fs::create_dir(dir))
                .map_err(|e| format!("replacing the leftover cgroup {}: {e}", dir.display()))
        }
        Err(e) => Err(format!("creating {}: {e}", dir.display())),
    }
}

/// Removes the build cgroup `dir`, ending whatever still runs in it; for
/// a process that outlives the build's owner (the agent's janitor).
pub fn remove_leftover(dir: &Path, limit: Duration) -> io::Result<()> {
    kill_all(dir);
    remove_dir(dir, limit)
}

/// SIGKILLs whatever still runs in cgroup `dir`.
fn kill_all(dir: &Path) {
    // cgroup v2 (Linux 5.14 on): the kernel does it, forks racing included.
    if dir.join("cgroup.kill").exists() {
        let populated = std::fs::read_to_string(dir.join("cgroup.events"))
            .ok()
            .and_then(|t| knobs::keyed(&t, "populated"));
        if populated != Some(0) {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        return;
    }
    if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// rmdir of a cgroup, retried while its last processes finish exiting
/// (EBUSY) for at most `limit`.
fn remove_dir(dir: &Path, limit: Duration) -> io::Result<()> {
    let end = std::time::Instant::now() + limit;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EBUSY)
                    && std::time::Instant::now() < end =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn older_than(p: &Path, secs: u64) -> bool {
    std::fs::symlink_metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() >= secs)
}

#[cfg(test)]
mod tests;
