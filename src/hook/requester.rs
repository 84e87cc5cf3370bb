//! Who asked for the build (docs/architecture.md, "Who asked, and
//! the record"): the account behind the hook's `try`s, found once per hook process.
//!
//! Nix forks the hook from the process that runs the build (Nix 2.8 and
//! 2.26 alike, `HookInstance`): under nix-daemon that is the daemon's
//! per-connection worker, and the account is the peer of the one
//! connection it serves (found by taking a copy of the worker's sockets
//! with `pidfd_getfd(2)`: the served connection is the Unix stream socket
//! the worker *accepted*, the one whose own address is the daemon's socket
//! path, and `SO_PEERCRED` names its client; a `ssh-ng://` client arrives
//! as the account that ran `nix-daemon --stdio`). A worker is recognised
//! by that socket, never by its command line (the daemon overwrites its
//! workers' arguments). A parent that serves no connection and is Nix
//! itself (its executable is `nix…`) is a local run: the account running
//! it. Anything else — a wrapper in between, several client accounts, an
//! unreadable parent — is unknown, which only executors open to everyone
//! accept. When two clients want the same derivation, only one worker
//! builds it: its client is the requester.

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
        match served_peers(ppid) {
            Err(why) => Requester::unknown(why),
            Ok(peers) => match peers.as_slice() {
                [uid] => Requester::account(*uid, Via::Daemon),
                [] => match local_nix(ppid) {
                    Ok(uid) => Requester::account(uid, Via::Local),
                    Err(why) => Requester::unknown(why),
                },
                _ => Requester::unknown(format!(
                    "the hook's parent (pid {ppid}) serves connections from several accounts ({peers:?})"
                )),
            },
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

/// The accounts (uids) of the clients process `pid` serves: the peers of
/// the Unix stream sockets it accepted (whose own address is a path).
/// Sockets it connected itself (to journald, to another daemon) are
/// unnamed on its side and do not count.
fn served_peers(pid: i32) -> Result<Vec<u32>, String> {
    let pidfd = crate::util::pidfd_open(pid as u32)
        .ok_or_else(|| format!("cannot open the hook's parent (pid {pid}) with pidfd_open"))?;
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("cannot list the hook's parent's descriptors (pid {pid}): {e}"))?;
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
            return Err(format!(
                "cannot inspect the hook's parent's socket {fd} (pid {pid}, pidfd_getfd)"
            ));
        };
        if !accepted_unix_stream(&sock) {
            continue;
        }
        if let Some(cred) = unix_peer(&sock) {
            if !peers.contains(&cred.uid()) {
                peers.push(cred.uid());
            }
        }
    }
    Ok(peers)
}

/// The real uid running process `pid`, if it is Nix itself (its
/// executable's name starts with `nix`: `nix`, `nix-build`, `nix-store`…).
fn local_nix(pid: i32) -> Result<u32, String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("cannot read the hook's parent's executable (pid {pid}): {e}"))?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.starts_with("nix") {
        return Err(format!(
            "the hook's parent (pid {pid}, {}) is not Nix: nix-hatch must be Nix's build-hook itself, not run by another program",
            exe.display()
        ));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the hook's parent's status (pid {pid}): {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| format!("no real uid in the status of the hook's parent (pid {pid})"))
}

/// Whether `sock` is a Unix stream connection this side accepted: not
/// listening, and its own address is a path (a connecting side's is
/// unnamed).
fn accepted_unix_stream(sock: &OwnedFd) -> bool {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    if getsockopt(sock, sockopt::SockType).ok() != Some(SockType::Stream)
        || getsockopt(sock, sockopt::AcceptConn).unwrap_or(true)
    {
        return false;
    }
    getsockname::<UnixAddr>(sock.as_raw_fd()).is_ok_and(|a| a.path().is_some())
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

    /// A listening socket's accepted connection counts, the connecting
    /// side and a socket pair don't.
    #[test]
    fn only_accepted_connections_are_served_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (server, _) = l.accept().unwrap();
        let me = crate::util::pidfd_open(std::process::id()).unwrap();
        let own = |fd: i32| pidfd_getfd(&me, fd).unwrap();
        assert!(accepted_unix_stream(&own(server.as_raw_fd())));
        assert!(!accepted_unix_stream(&own(client.as_raw_fd())));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!accepted_unix_stream(&own(a.as_raw_fd())));
        assert!(!accepted_unix_stream(&own(l.as_raw_fd())));
    }

    /// The test's parent (cargo, a shell) is not Nix: a local run needs
    /// Nix as the parent.
    #[test]
    fn a_parent_that_is_not_nix_is_no_local_run() {
        let e = local_nix(nix::unistd::getppid().as_raw()).unwrap_err();
        assert!(e.contains("is not Nix"), "{e}");
    }
}
