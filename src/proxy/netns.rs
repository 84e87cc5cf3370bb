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
//!
//! Everything a jailed build downloads crosses the jail's loopback once
//! more than it would without the proxy, so that loopback takes BIG TCP
//! segments (up to 512 KiB instead of 64 KiB, Linux >= 6.3 for IPv4): the
//! per-segment work of that extra hop is what a bulk download pays for.

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
                // Best effort: an older kernel keeps 64 KiB segments.
                let _ = loopback_big_tcp();
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

    /// The namespace (`/proc/self/fd/N` names it, e.g. for `nsenter`).
    pub fn ns_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.ns.as_fd()
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

/// Largest GSO/GRO segment for the jail's loopback: the kernel's
/// GSO_MAX_SIZE, which is also loopback's `tso_max_size`.
const BIG_TCP_SIZE: u32 = 524_280;

/// `ip link set lo gso_max_size … gro_max_size … gso_ipv4_max_size …
/// gro_ipv4_max_size …`, as one rtnetlink request (RTM_NEWLINK on lo).
/// A kernel that doesn't know an attribute rejects or ignores it; either
/// way the namespace works, only with 64 KiB segments.
fn loopback_big_tcp() -> io::Result<()> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    const IFLA_GSO_MAX_SIZE: u16 = 41;
    const IFLA_GRO_MAX_SIZE: u16 = 58;
    const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
    const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;
    const NLMSG_ERROR: u16 = 2;

    let index = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
    let attrs = [
        IFLA_GSO_MAX_SIZE,
        IFLA_GRO_MAX_SIZE,
        IFLA_GSO_IPV4_MAX_SIZE,
        IFLA_GRO_IPV4_MAX_SIZE,
    ];
    let len = 16 + 16 + attrs.len() * 8;
    let mut msg = Vec::with_capacity(len);
    // struct nlmsghdr: length, type, flags, sequence, port id.
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&nix::libc::RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(
        &((nix::libc::NLM_F_REQUEST | nix::libc::NLM_F_ACK) as u16).to_ne_bytes(),
    );
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[nix::libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(index as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    for a in attrs {
        // struct rtattr: length, type; then the u32 value.
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&a.to_ne_bytes());
        msg.extend_from_slice(&BIG_TCP_SIZE.to_ne_bytes());
    }
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io::Error::from)?;
    sendto(
        sock.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut reply = [0u8; 1024];
    let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty()).map_err(io::Error::from)?;
    // The ack is an NLMSG_ERROR whose error field (after the header) is 0.
    let kind = (n >= 20).then(|| u16::from_ne_bytes([reply[4], reply[5]]));
    let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    match kind {
        Some(NLMSG_ERROR) if errno == 0 => Ok(()),
        Some(NLMSG_ERROR) => Err(io::Error::from_raw_os_error(-errno)),
        _ => Err(io::Error::other("unexpected rtnetlink reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The jail's loopback is up and takes BIG TCP segments (as root, like
    /// the hook; `ip` enters the namespace through /proc/PID/fd).
    #[test]
    fn jail_loopback_is_up_with_big_segments() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let net = JailNet::create(0).expect("network namespace");
        let out = Command::new("nsenter")
            .arg(format!(
                "--net=/proc/{}/fd/{}",
                std::process::id(),
                net.ns_fd().as_raw_fd()
            ))
            .args(["ip", "-d", "link", "show", "lo"])
            .output()
            .expect("nsenter ip");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("UP"), "{text}");
        // Kernels before BIG TCP (loopback tso_max_size 64 KiB) keep the
        // old sizes; the namespace works all the same.
        let tso_max = text
            .split_whitespace()
            .skip_while(|w| *w != "tso_max_size")
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        if tso_max < BIG_TCP_SIZE {
            eprintln!("kernel without BIG TCP on loopback: sizes not checked");
            return;
        }
        for key in ["gso_max_size", "gro_max_size"] {
            assert!(
                text.contains(&format!("{key} {BIG_TCP_SIZE}")),
                "{key} not raised: {text}"
            );
        }
        // Only the proxy's listener is there; nothing reaches the host's.
        assert!(net.listener.local_addr().unwrap().ip().is_loopback());
    }
}
