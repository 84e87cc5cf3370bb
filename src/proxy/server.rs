//! The accept loop: one task per client connection, HTTP/1.1 by hyper,
//! with limits that keep one bad client from hurting the others — a time
//! limit for the request header (slow clients), a size limit for it, a cap
//! on open connections. A connection that breaks a limit or sends
//! something that is not HTTP is closed with one error line in the build
//! log; the other connections keep being served.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::Method;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::conn::{http1, report, Requests, Shared, Slot};
use super::forward::{self, UpstreamCache};
use super::tunnel;

/// Open client connections at most, tunnels and intercepted connections
/// included; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_limited(listener, shared, MAX_CONNECTIONS).await
}

/// [`serve`] with at most `max` client connections (tunnels included).
pub async fn serve_limited(listener: TcpListener, shared: Arc<Shared>, max: usize) {
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                shared
                    .events
                    .line(&format!("error: accepting a connection: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.events.line(&format!(
                "error: more than {max} open connections from the build (tunnels included); closing the new one"
            ));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(client(stream, shared, Arc::new(slot)));
    }
}

async fn client(stream: tokio::net::TcpStream, shared: Arc<Shared>, slot: Slot) {
    let cache = Arc::new(UpstreamCache::default());
    let s2 = shared.clone();
    let requests = Requests::default();
    let counted = requests.clone();
    let svc_slot = slot.clone();
    let svc = service_fn(move |req| {
        let (shared, cache, slot) = (s2.clone(), cache.clone(), svc_slot.clone());
        counted.one();
        async move {
            if req.method() == Method::CONNECT {
                Ok(tunnel::connect(req, shared, slot).await)
            } else {
                forward::plain(req, shared, cache).await
            }
        }
    });
    // A second descriptor of the socket, for a lingering close (below).
    let spare = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned().ok();
    let conn = http1()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        report(&shared, &e, "a connection from the build", &requests);
        if e.is_parse() || e.is_parse_too_large() {
            if let Some(fd) = spare {
                linger(fd).await;
            }
        }
    }
    // Held through the lingering close too.
    drop(slot);
}

/// How long, and how much, a rejected client's remaining input is drained.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Closes a connection whose request was rejected (400, 431) so that the
/// client gets the answer: closing a socket with unread input sends a
/// reset, which can destroy the answer in flight (e.g. the rest of a
/// 100 KB header). So: end our side, then read and discard what the client
/// still sends, for a bounded time and amount, then close.
async fn linger(fd: std::os::fd::OwnedFd) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let std = std::net::TcpStream::from(fd);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(mut s) = tokio::net::TcpStream::from_std(std) else {
        return;
    };
    let _ = s.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
