//! CONNECT: judged on the authority alone. A host whose first matching
//! rule only names the host gets a blind tunnel (the bytes are copied,
//! TLS stays end to end between the build and the server); one whose rule
//! restricts paths or methods, or that has a credential, is intercepted
//! (see `intercept`).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::audit::Decision;
use super::forward::{self, answer, Body, Origin};
use super::rules::{normalize_host, ConnectVerdict};
use super::server::Shared;
use super::{credentials, intercept};

/// Copy buffer per direction: large, so a bulk download costs few syscalls.
const TUNNEL_BUF: usize = 256 * 1024;

pub async fn connect(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((normalize_host(a.host()), a.port_u16()?)))
    else {
        let reason = "CONNECT needs host:port";
        shared
            .events
            .line(&format!("error: CONNECT {}: {reason}", req.uri()));
        return answer(StatusCode::BAD_REQUEST, reason);
    };
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let creds: Vec<&str> = credentials::for_host(&shared.credentials, &host)
        .map(|c| c.header.as_str())
        .collect();
    let needs_inside = (!creds.is_empty()).then(|| format!("credential: {}", creds.join(", ")));
    let mut d = Decision {
        decision: "allow",
        method: "CONNECT",
        scheme: "connect",
        host: &host,
        port,
        path: None,
        query: None,
        rule: None,
        reason: None,
        mode: None,
        credentials: &[],
    };
    match shared.policy.connect(&host, needs_inside) {
        ConnectVerdict::Deny { reason } => {
            d.decision = "deny";
            d.reason = Some(&reason);
            shared
                .events
                .decision(&format!("deny CONNECT {shown} ({reason})"), &d);
            answer(
                StatusCode::FORBIDDEN,
                &format!("denied CONNECT {shown} ({reason})"),
            )
        }
        ConnectVerdict::Tunnel { rule } => {
            let upstream = match forward::connect_tcp(&host, port).await {
                Ok(s) => s,
                Err(e) => {
                    let reason = format!("upstream {shown}: {e}");
                    d.decision = "error";
                    d.reason = Some(&reason);
                    shared
                        .events
                        .decision(&format!("error: CONNECT {shown}: {e}"), &d);
                    return answer(StatusCode::BAD_GATEWAY, &reason);
                }
            };
            d.rule = Some(rule + 1);
            d.mode = Some("tunnel");
            shared
                .events
                .decision(&format!("allow CONNECT {shown} (tunnel)"), &d);
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(up) => {
                        if let Err(e) = relay(up, upstream).await {
                            shared
                                .events
                                .line(&format!("error: CONNECT {shown}: tunnel: {e}"));
                        }
                    }
                    Err(e) => shared.events.line(&format!("error: CONNECT {shown}: {e}")),
                }
            });
            Response::new(forward::full(""))
        }
        ConnectVerdict::Intercept { why } => {
            let cfg = match shared.ca.server_config(&host) {
                Ok(c) => c,
                Err(e) => {
                    d.decision = "error";
                    d.reason = Some(&e);
                    shared
                        .events
                        .decision(&format!("error: CONNECT {shown}: {e}"), &d);
                    return answer(StatusCode::INTERNAL_SERVER_ERROR, &e);
                }
            };
            d.mode = Some("intercept");
            d.reason = Some(&why);
            shared
                .events
                .decision(&format!("allow CONNECT {shown} (intercept; {why})"), &d);
            let origin = Origin {
                host,
                port,
                tls: true,
            };
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(up) => intercept::serve(up, origin, shared, cfg).await,
                    Err(e) => shared.events.line(&format!("error: CONNECT {shown}: {e}")),
                }
            });
            Response::new(forward::full(""))
        }
    }
}

/// Relays both ways until both sides are done.
async fn relay(up: Upgraded, mut upstream: TcpStream) -> std::io::Result<()> {
    match up.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let client = parts.io.into_inner();
            if !parts.read_buf.is_empty() {
                upstream.write_all(&parts.read_buf).await?;
            }
            tokio::try_join!(
                splice::one_way(&client, &upstream),
                splice::one_way(&upstream, &client)
            )?;
        }
        Err(up) => {
            let mut client = TokioIo::new(up);
            tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut upstream,
                TUNNEL_BUF,
                TUNNEL_BUF,
            )
            .await?;
        }
    }
    Ok(())
}

/// Zero-copy relaying between two sockets: splice(2) moves the data
/// socket → pipe → socket inside the kernel, so a bulk download through
/// the tunnel costs the proxy a few syscalls per MiB and no copying.
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Pipe capacity asked for (the default max of pipe-max-size).
    const PIPE_SIZE: usize = 1024 * 1024;

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        let flags = nix::libc::SPLICE_F_MOVE | nix::libc::SPLICE_F_NONBLOCK;
        // SAFETY: plain syscall on descriptors we own; null offsets.
        let n = unsafe {
            nix::libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Copies `src` to `dst` until `src` ends, then shuts down `dst`'s
    /// write side (so half-closed connections work).
    pub async fn one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
        let (pr, pw): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        let cap = nix::fcntl::fcntl(&pw, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map(|c| c as usize)
            .unwrap_or(64 * 1024);
        let mut total = 0u64;
        loop {
            let n = loop {
                src.readable().await?;
                match src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), pw.as_raw_fd(), cap)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // SAFETY: shutdown(2) on a socket we hold.
                unsafe { nix::libc::shutdown(dst.as_raw_fd(), nix::libc::SHUT_WR) };
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pr.as_raw_fd(), dst.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
        }
    }
}
