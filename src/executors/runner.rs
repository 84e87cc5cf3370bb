//! The namespace runner: a short-lived re-exec of our own binary that puts
//! a command in a private mount namespace (the output overlay) and a fresh
//! pid namespace, drops to the build account, and relays the exit status.
//!
//! Why a separate process: a pid namespace only applies to the children of
//! the process that unshares it, and the hook itself must stay outside.
//! The command is pid 1 of its namespace, so when it exits — or when the
//! runner is killed (parent-death signal) — the kernel kills every process
//! it left behind, and the runner's wait for it returns only once they are
//! all gone: when the runner exits, nothing of the build still runs.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// argv[1] that selects the runner in both binaries.
pub const RUNNER_ARG: &str = "__nix-hatch-runner";
/// Exit status when the runner itself failed before the command ran.
pub const SETUP_FAILED: i32 = 125;

#[derive(Debug, Serialize, Deserialize)]
pub struct Overlay {
    /// The real store dir; the overlay is mounted over it.
    pub lower: PathBuf,
    /// Receives every write to the store (outputs land here).
    pub upper: PathBuf,
    pub work: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub overlay: Option<Overlay>,
    /// Who the command runs as.
    pub account: crate::util::Account,
    pub cwd: PathBuf,
    /// Program and arguments (bytes: derivation args need not be UTF-8).
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Root-only files the command reads through descriptors: the runner
    /// opens each (as root, read-only, no symlink) and the command gets
    /// them as fds 3, 4, … in this order.
    pub fds: Vec<PathBuf>,
    /// Where the runner writes what the command's processes used once
    /// they are all gone ([`ProcessUsage`]), for builds without a cgroup.
    pub usage_file: Option<PathBuf>,
}

/// What the command and every process it started used, as the kernel
/// accounts them once reaped (`getrusage(RUSAGE_CHILDREN)` of the runner).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// User + system, microseconds.
    pub cpu_us: u64,
    /// The largest single process's peak resident set, bytes.
    pub max_rss: u64,
}

impl ProcessUsage {
    /// This process's reaped children so far.
    pub fn of_children() -> ProcessUsage {
        // SAFETY: getrusage writes the struct we pass.
        let mut ru: nix::libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a rusage.
        unsafe { nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, &mut ru) };
        let us =
            |t: nix::libc::timeval| t.tv_sec.max(0) as u64 * 1_000_000 + t.tv_usec.max(0) as u64;
        ProcessUsage {
            cpu_us: us(ru.ru_utime) + us(ru.ru_stime),
            max_rss: ru.ru_maxrss.max(0) as u64 * 1024,
        }
    }

    /// What a runner wrote to `path`, if it got that far.
    pub fn read(path: &std::path::Path) -> Option<ProcessUsage> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// The descriptor number the command gets for `RunSpec::fds[i]`.
pub fn fd_number(i: usize) -> i32 {
    3 + i as i32
}

/// If this process was started as the runner, runs it and returns the exit
/// status to exit with. Both binaries call this first.
pub fn maybe_run() -> Option<i32> {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(RUNNER_ARG)) {
        return None;
    }
    let Some(spec) = args.next() else {
        eprintln!("nix-hatch: runner: missing spec path");
        return Some(SETUP_FAILED);
    };
    Some(match run(PathBuf::from(spec)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nix-hatch: runner: {e:#}");
            SETUP_FAILED
        }
    })
}

/// Writes `spec` into the staging dir and returns the runner's command
/// line for it.
pub fn prepare(spec: &RunSpec, staging: &super::staging::Staging) -> std::io::Result<Command> {
    let json = serde_json::to_vec(spec)
        .map_err(|e| std::io::Error::other(format!("encoding run spec: {e}")))?;
    let spec_path = staging.write_root_only("run.json", &json)?;
    command(&spec_path).map_err(|e| std::io::Error::other(format!("{e:#}")))
}

/// The command line the executor spawns to run `spec_path`.
fn command(spec_path: &std::path::Path) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the nix-hatch binary")?;
    // Exec /proc/self/exe, the very binary running now: the path
    // current_exe() names is gone (ENOENT) or holds another version once the
    // file has been replaced while the hook runs (an upgrade, a rebuild).
    let mut c = Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut c, exe);
    c.arg(RUNNER_ARG).arg(spec_path);
    c.env_clear();
    // Die with the hook, from before exec on (the death signal survives
    // exec of a binary that is not set-id).
    let hook = crate::util::self_pidfd();
    // SAFETY: prctl and poll only (async-signal-safe).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            crate::util::die_with_parent(hook)
        });
    }
    Ok(c)
}

/// Opens the files the command gets as descriptors and puts each at its
/// number, inheritable. Done first thing, while only stdio is open: every
/// descriptor the runner opens later (the parent's pidfd, std's exec
/// error pipe) lands above them and none is replaced.
fn place_passed_fds(paths: &[PathBuf]) -> Result<()> {
    use nix::fcntl::OFlag;
    use std::os::fd::{AsRawFd, IntoRawFd};
    for (i, p) in paths.iter().enumerate() {
        let want = fd_number(i);
        if crate::util::fd_is_open(want) {
            bail!(
                "descriptor {want} is already in use: cannot pass {}",
                p.display()
            );
        }
        let f = nix::fcntl::open(
            p,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW,
            nix::sys::stat::Mode::empty(),
        )
        .with_context(|| format!("opening {}", p.display()))?;
        if f.as_raw_fd() == want {
            let _ = f.into_raw_fd();
            continue;
        }
        // SAFETY: dup2 onto a number checked free above; the copy is ours
        // for the rest of the process (the command inherits it).
        if unsafe { nix::libc::dup2(f.as_raw_fd(), want) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("passing {}", p.display()));
        }
    }
    Ok(())
}

fn run(spec_path: PathBuf) -> Result<i32> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};

    let spec: RunSpec = serde_json::from_slice(
        &std::fs::read(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .with_context(|| format!("parsing {}", spec_path.display()))?;
    // Whatever else the hook let through, the command inherits nothing but
    // stdio and the descriptors it is given.
    crate::util::close_from(fd_number(0));
    place_passed_fds(&spec.fds)?;
    // The death signal tied to the hook was set before exec (`command`).
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .context("creating mount and pid namespaces (needs root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private in the new mount namespace")?;
    if let Some(o) = &spec.overlay {
        for p in [&o.lower, &o.upper, &o.work] {
            let s = p.to_string_lossy();
            if s.contains(',') || s.contains(':') {
                bail!("overlay path {s:?} contains ',' or ':', which overlayfs cannot take");
            }
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            o.lower.display(),
            o.upper.display(),
            o.work.display()
        );
        mount(
            Some("overlay"),
            &o.lower,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .with_context(|| format!("mounting the output overlay on {}", o.lower.display()))?;
    }
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    let mut cmd = Command::new(OsString::from_vec(program.clone()));
    cmd.args(args.iter().map(|a| OsString::from_vec(a.clone())))
        .env_clear()
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from_vec(k.clone()), OsString::from_vec(v.clone()))),
        )
        .current_dir(&spec.cwd)
        .stdin(Stdio::null());
    // A /proc that matches the command's pid namespace (it is pid 1 there).
    // Registered before run_as: mounting needs the privileges it drops.
    // SAFETY: mount(2) is async-signal-safe; the strings are static.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>)?;
            Ok(())
        });
    }
    crate::util::run_as(&mut cmd, &spec.account);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", String::from_utf8_lossy(program)))?;
    let status = child.wait().context("waiting for the command")?;
    if let Some(p) = &spec.usage_file {
        // Every process of the namespace is gone (the kernel reaped them
        // with its init, the command): all of them are counted.
        if let Ok(json) = serde_json::to_vec(&ProcessUsage::of_children()) {
            let _ = std::fs::write(p, json);
        }
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => SETUP_FAILED,
    })
}
