//! Who asked for the build (DESIGN.md, "Who asked, and the record of
//! it"): the account behind the hook's `try`s, found once per hook process.
//!
//! Nix forks the hook from the process that runs the build (Nix 2.8 and
//! 2.26 alike, `HookInstance`): under nix-daemon that is the daemon's
//! per-connection worker, and the account is the peer of the one
//! connection it serves (found by taking a copy of the worker's socket
//! with `pidfd_getfd(2)` and asking it for `SO_PEERCRED`; a `ssh-ng://`
//! client arrives as the account that ran `nix-daemon --stdio`). Without a
//! daemon, the process running Nix is the requester's own. When two clients
//! want the same derivation, only one worker builds it: its client is the
//! requester.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How the request reached this machine's Nix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A client of nix-daemon (local or over `ssh-ng://`).
    Daemon,
    /// Nix run directly by the account (root's or a single-user install).
    Local,
    /// The hook could not tell.
    Unknown,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Daemon => "daemon",
            Via::Local => "local",
            Via::Unknown => "unknown",
        }
    }
}

/// The requesting account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// The account's name (`None` when unknown or not in the user
    /// database).
    pub user: Option<String>,
    pub uid: Option<u32>,
    /// Primary and supplementary groups (from the group database).
    pub groups: Vec<u32>,
    pub via: Via,
    /// Why the account is unknown, for the build log.
    pub unknown_because: Option<String>,
}

impl Requester {
    /// A known account.
    pub fn account(uid: u32, via: Via) -> Requester {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let groups = user
            .as_ref()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name.as_bytes()).ok()?;
                nix::unistd::getgrouplist(&name, u.gid).ok()
            })
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .or_else(|| user.as_ref().map(|u| vec![u.gid.as_raw()]))
            .unwrap_or_default();
        Requester {
            user: user.map(|u| u.name),
            uid: Some(uid),
            groups,
            via,
            unknown_because: None,
        }
    }

    /// An account the hook could not determine, and why.
    pub fn unknown(why: impl Into<String>) -> Requester {
        Requester {
            user: None,
            uid: None,
            groups: Vec::new(),
            via: Via::Unknown,
            unknown_because: Some(why.into()),
        }
    }

    /// Finds the requester of this hook process's builds.
    pub fn identify() -> Requester {
        let ppid = nix::unistd::getppid().as_raw();
        match parent_kind(ppid) {
            Some(ParentKind::Daemon) => peer_of_worker(ppid),
            Some(ParentKind::Local(uid)) => Requester::account(uid, Via::Local),
            None => Requester::unknown(format!(
                "the hook's parent (pid {ppid}) is gone or unreadable"
            )),
        }
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.user, self.uid) {
            (Some(name), Some(uid)) => write!(f, "{name} (uid {uid}, via {})", self.via.as_str()),
            (None, Some(uid)) => write!(f, "uid {uid} (via {})", self.via.as_str()),
            _ => write!(
                f,
                "an unknown account ({})",
                self.unknown_because.as_deref().unwrap_or("not determined")
            ),
        }
    }
}

enum ParentKind {
    Daemon,
    /// Nix itself, run by this real uid.
    Local(u32),
}

/// Whether process `pid` is a nix-daemon (its per-connection worker keeps
/// the daemon's command line: `nix-daemon …` or `nix daemon …`).
fn parent_kind(pid: i32) -> Option<ParentKind> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    let argv0 = args.next().unwrap_or_default();
    let base = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
    let daemon = base.starts_with(b"nix-daemon")
        || (base == b"nix" && args.next() == Some(b"daemon".as_slice()));
    if daemon {
        return Some(ParentKind::Daemon);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let real_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())?;
    Some(ParentKind::Local(real_uid))
}

/// The peer of the client connection the daemon worker `pid` serves.
fn peer_of_worker(pid: i32) -> Requester {
    let Some(pidfd) = crate::util::pidfd_open(pid as u32) else {
        return Requester::unknown(format!("cannot open the daemon worker {pid} (pidfd_open)"));
    };
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Requester::unknown(format!("cannot list the daemon worker {pid}'s descriptors"));
    };
    let mut peers: Vec<u32> = Vec::new();
    for e in entries.flatten() {
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let Some(sock) = pidfd_getfd(&pidfd, fd) else {
            continue;
        };
        if let Some(cred) = unix_peer(&sock) {
            // The worker's own end of something it made, or unconnected.
            if cred.pid() != pid && cred.pid() > 0 && !peers.contains(&cred.uid()) {
                peers.push(cred.uid());
            }
        }
    }
    match peers.as_slice() {
        [uid] => Requester::account(*uid, Via::Daemon),
        [] => Requester::unknown(format!(
            "the daemon worker {pid} has no client connection the hook can see"
        )),
        _ => Requester::unknown(format!(
            "the daemon worker {pid} has connections from several accounts ({peers:?})"
        )),
    }
}

/// A copy of descriptor `fd` of the process behind `pidfd`.
fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_getfd(2) returns a new descriptor (close-on-exec) or -1.
    let n = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd,
            0 as nix::libc::c_uint,
        )
    };
    if n < 0 {
        return None;
    }
    // SAFETY: the kernel just gave us this descriptor.
    Some(unsafe { OwnedFd::from_raw_fd(n as i32) })
}

/// The credentials of the peer of a connected Unix socket.
fn unix_peer(sock: &OwnedFd) -> Option<nix::sys::socket::UnixCredentials> {
    use nix::sys::socket::{getsockopt, sockopt};
    if getsockopt(sock, sockopt::SockType).ok()? != nix::sys::socket::SockType::Stream {
        return None;
    }
    getsockopt(sock, sockopt::PeerCredentials).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test process runs this one's parent role: a socket pair stands
    /// for a daemon worker's client connection.
    #[test]
    fn the_peer_of_a_connection_is_found_through_a_pidfd() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = std::process::id() as i32;
        let pidfd = crate::util::pidfd_open(me as u32).unwrap();
        let copy = pidfd_getfd(&pidfd, a.as_raw_fd()).expect("pidfd_getfd on ourselves");
        let cred = unix_peer(&copy).unwrap();
        assert_eq!(cred.uid(), nix::unistd::getuid().as_raw());
        assert_eq!(cred.pid(), me);
        drop(b);
    }

    #[test]
    fn accounts_display_with_name_uid_and_way() {
        let root = Requester::account(0, Via::Local);
        assert_eq!(root.user.as_deref(), Some("root"));
        assert!(root.groups.contains(&0));
        assert_eq!(root.to_string(), "root (uid 0, via local)");
        let u = Requester::unknown("no parent");
        assert_eq!(u.to_string(), "an unknown account (no parent)");
    }

    #[test]
    fn a_local_parent_is_its_real_uid() {
        // The test harness is not a nix-daemon: its real uid.
        match parent_kind(std::process::id() as i32) {
            Some(ParentKind::Local(uid)) => assert_eq!(uid, nix::unistd::getuid().as_raw()),
            _ => panic!("the test process taken for a daemon"),
        }
    }
}
