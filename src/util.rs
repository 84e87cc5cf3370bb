//! Small system helpers shared by the hook, executors and CLI.

use std::ffi::CString;
use std::os::fd::RawFd;

use anyhow::{anyhow, Context, Result};

/// Marks every inherited descriptor from `first` up close-on-exec, so
/// builders never inherit Nix's pipes (Nix leaks several into the hook,
/// among them fd 5, the read side of the build log).
pub fn cloexec_from(first: RawFd) {
    for_fds_from(first, true)
}

/// Closes every descriptor from `first` up (a process about to start
/// something that must inherit nothing of its own).
pub fn close_from(first: RawFd) {
    for_fds_from(first, false)
}

/// close_range(2) from `first` up, marking close-on-exec (`cloexec`) or
/// closing; on older kernels the same through /proc/self/fd.
fn for_fds_from(first: RawFd, cloexec: bool) {
    let flags = if cloexec {
        nix::libc::CLOSE_RANGE_CLOEXEC as nix::libc::c_uint
    } else {
        0
    };
    // SAFETY: close_range only flips flags on or closes descriptors of
    // this process, which nothing here uses any more.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first as nix::libc::c_uint,
            nix::libc::c_uint::MAX,
            flags,
        )
    };
    if rc == 0 {
        return;
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<RawFd> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd >= first)
            .collect();
        for fd in fds {
            // SAFETY: on a descriptor of ours, or EBADF for one already
            // gone (the one read_dir used).
            unsafe {
                if cloexec {
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
                } else {
                    nix::libc::close(fd);
                }
            }
        }
    }
}

/// The parent of process `pid`, from `/proc/PID/stat` (its name, in
/// parentheses, may hold anything: the fields after the last `)`).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `fd` is an open descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) != -1 }
}

/// A resolved account: what a command runs as.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

pub fn lookup_user(name: &str) -> Result<Account> {
    let user = nix::unistd::User::from_name(name)
        .with_context(|| format!("looking up user {name:?}"))?
        .ok_or_else(|| anyhow!("unknown user {name:?}"))?;
    let cname = CString::new(name).map_err(|_| anyhow!("user name {name:?} contains NUL"))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()]);
    Ok(Account {
        name: name.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        home: user.dir.to_string_lossy().into_owned(),
    })
}

/// First line of a possibly multi-line message, for one-line reports.
pub fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// Makes `cmd` run as `account` (supplementary groups included: device
/// access such as `kvm` goes through them) and die with its parent.
pub fn run_as(cmd: &mut std::process::Command, account: &Account) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<nix::unistd::Gid> = account
        .groups
        .iter()
        .copied()
        .map(nix::unistd::Gid::from_raw)
        .collect();
    let (uid, gid) = (account.uid, account.gid);
    let parent = self_pidfd();
    // SAFETY: only async-signal-safe syscalls between fork and exec, on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
            // After setuid: a credential change clears the death signal.
            die_with_parent(parent)?;
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
}

/// This process's pidfd, opened once and kept: children check it (see
/// [`die_with_parent`]). `None` on kernels without pidfd_open.
pub fn self_pidfd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    static FD: std::sync::OnceLock<Option<std::os::fd::OwnedFd>> = std::sync::OnceLock::new();
    FD.get_or_init(|| pidfd_open(std::process::id()))
        .as_ref()
        .map(|f| f.as_raw_fd())
}

/// For a child between fork and exec: SIGKILL when the parent dies, and
/// fail at once if it already has — a parent killed between fork and the
/// prctl would otherwise leave the child running unwatched. `parent` is the
/// parent's [`self_pidfd`] (readable once it has exited); it works where
/// getppid() can't, e.g. for pid 1 of a new pid namespace (getppid() = 0).
/// Async-signal-safe: no allocation.
pub fn die_with_parent(parent: Option<std::os::fd::RawFd>) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if let Some(fd) = parent {
        let mut p = nix::libc::pollfd {
            fd,
            events: nix::libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, zero timeout.
        if unsafe { nix::libc::poll(&mut p, 1, 0) } > 0 {
            return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
        }
    }
    Ok(())
}

/// This machine's Nix system type (`x86_64-linux`, …), as Nix derives it.
pub fn nix_system() -> Option<&'static str> {
    match (std::env::consts::ARCH, std::env::consts::OS) {
        ("x86_64", "linux") => Some("x86_64-linux"),
        ("aarch64", "linux") => Some("aarch64-linux"),
        ("x86", "linux") => Some("i686-linux"),
        ("riscv64", "linux") => Some("riscv64-linux"),
        ("powerpc64", "linux") => Some("powerpc64le-linux"),
        _ => None,
    }
}

/// Fault injection for the fault tests: when `NIX_HATCH_FAULT` names this
/// point, the process SIGKILLs itself right here, as if Nix or an admin had
/// killed the hook at exactly this stage; `panic:<point>` panics there
/// instead (a bug's path). Only consulted after `# accept` (and once before
/// it, for an escape build), never on the `try` path.
pub fn fault_point(name: &str) {
    let Some(v) = std::env::var_os("NIX_HATCH_FAULT") else {
        return;
    };
    if v == name {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if v.as_encoded_bytes().strip_prefix(b"panic:") == Some(name.as_bytes()) {
        panic!("injected fault at {name}");
    }
}

/// A pidfd for `pid` (close-on-exec), so a process's exit can be polled for
/// even while a descendant holds its output pipe open. `None` on kernels
/// without pidfd_open.
pub fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open returns a new descriptor or -1; PIDFD_NONBLOCK is
    // not asked for, and the descriptor is close-on-exec by definition.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if fd < 0 {
        None
    } else {
        // SAFETY: the kernel just gave us this descriptor.
        Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }
}

/// Opens (creating, mode 0600, close-on-exec) a lock file, for `flock`.
pub fn open_lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // A symlink planted in its place must not make root create or
        // lock a file elsewhere.
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
}
