//! The jail's network namespace and the proxy's listening socket in it.
//!
//! The hook creates the namespace itself, from a short-lived thread
//! (`unshare(CLONE_NEWNET)` moves only the calling thread): it brings `lo`
//! up and binds the proxy's listener on 127.0.0.1 there, then keeps a
//! descriptor of the namespace. bwrap is started in it (a `setns` between
//! fork and exec, while the child is still root) and is not given
//! `--unshare-net`. The listener stays in the jail's namespace, while the
//! proxy's tokio threads — started from the hook's own threads — connect
//! upstream from the host's. The kernel enforces the rest: the only
//! interface in the jail is loopback, and the namespace belongs to the
//! host's user namespace, so nothing in the jail can configure it.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sched::CloneFlags;

pub struct JailNet {
    /// `/proc/thread-self/ns/net` of the thread that made it.
    ns: OwnedFd,
    /// The proxy's listening socket inside.
    pub listener: TcpListener,
}

impl JailNet {
    /// A new network namespace with `lo` up and a listener on
    /// 127.0.0.1:`port` in it. Needs CAP_SYS_ADMIN (the hook runs as root).
    pub fn create(port: u16) -> io::Result<JailNet> {
        std::thread::Builder::new()
            .name("nix-hatch-netns".into())
            .spawn(move || -> io::Result<JailNet> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("creating a network namespace (needs root): {e}"),
                    )
                })?;
                loopback_up()?;
                let ns = File::open("/proc/thread-self/ns/net")?;
                let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
                listener.set_nonblocking(true)?;
                Ok(JailNet {
                    ns: ns.into(),
                    listener,
                })
            })?
            .join()
            .map_err(|_| io::Error::other("the network namespace thread panicked"))?
    }

    /// Makes `cmd` start in this namespace. Must be called before anything
    /// that drops privileges in `pre_exec` (setns needs them).
    pub fn enter_on_spawn(&self, cmd: &mut Command) -> io::Result<()> {
        let fd = self.ns.try_clone()?;
        // SAFETY: setns(2) is async-signal-safe; the descriptor is owned by
        // the closure and stays open until exec (it is close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::setns(fd.as_raw_fd(), nix::libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// `ip link set lo up`, with the ioctls (no netlink dependency).
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq we own.
    unsafe {
        let s = nix::libc::socket(
            nix::libc::AF_INET,
            nix::libc::SOCK_DGRAM | nix::libc::SOCK_CLOEXEC,
            0,
        );
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s);
        let mut req: nix::libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as nix::libc::c_char;
        }
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |=
            (nix::libc::IFF_UP | nix::libc::IFF_RUNNING) as nix::libc::c_short;
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
