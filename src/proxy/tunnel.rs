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
use tokio::net::TcpStream;

use super::audit::{self, clip_shown, Decision};
use super::conn::{Shared, Slot};
use super::forward::{self, answer, Body, Origin};
use super::rules::{normalize_host, ConnectVerdict};
use super::{credentials, intercept};

/// Copy buffer per direction: large, so a bulk download costs few syscalls
/// and each write fills big segments.
const TUNNEL_BUF: usize = 256 * 1024;

/// Answers a CONNECT; the tunnel or interception it starts holds `slot`
/// (the client connection's place under the connection cap) until it ends.
pub async fn connect(req: Request<Incoming>, shared: Arc<Shared>, slot: Slot) -> Response<Body> {
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((normalize_host(a.host()), a.port_u16()?)))
    else {
        let reason = "CONNECT needs host:port";
        shared.events.line(&format!(
            "error: CONNECT {}: {reason}",
            clip_shown(&req.uri().to_string())
        ));
        return answer(StatusCode::BAD_REQUEST, reason);
    };
    let shown = audit::authority(&host, port);
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
        credentials_withheld: &[],
        removed_headers: &[],
    };
    match shared.policy.connect(&host, port, needs_inside) {
        ConnectVerdict::Deny { reason } => {
            forward::deny(&shared, d, &format!("CONNECT {shown}"), &reason)
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
                drop(slot);
            });
            Response::new(forward::full(""))
        }
        ConnectVerdict::Intercept { why } => {
            let cfg = match shared.ca.server_config(&host) {
                Ok(c) => c,
                Err(e) => {
                    let e = e.to_string();
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
                drop(slot);
            });
            Response::new(forward::full(""))
        }
    }
}

/// Relays both ways until both sides are done (what hyper had already
/// read from the client comes first: `Upgraded` replays it).
///
/// Copying, not splice(2): splicing moves the data as 4 KiB page
/// fragments, so the socket into the jail sends skbs of at most 17 pages,
/// while copied data is packed into the large (BIG TCP, see `netns`)
/// segments the jail's loopback takes. Measured on a 256 MiB download:
/// splice 1.59, copy into 512 KiB segments 1.25 times the direct time.
async fn relay(up: Upgraded, mut upstream: TcpStream) -> std::io::Result<()> {
    tokio::io::copy_bidirectional_with_sizes(
        &mut TokioIo::new(up),
        &mut upstream,
        TUNNEL_BUF,
        TUNNEL_BUF,
    )
    .await?;
    Ok(())
}
