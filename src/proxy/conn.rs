//! What every connection from the build shares, whoever serves it (the
//! accept loop, an intercepted TLS connection): the build's policy,
//! credentials, CA and events, the HTTP/1.1 settings and their limits, a
//! connection's slot, and the one error line for a connection hyper gave
//! up on. The request handlers (`forward`, `tunnel`, `intercept`) and the
//! accept loop (`server`) build on it; it builds on none of them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use rustls::ClientConfig;
use tokio::sync::OwnedSemaphorePermit;

use super::audit::Events;
use super::ca::Authority;
use super::credentials::Credential;
use super::rules::Policy;

/// A client must send its whole request header within this time (also
/// the limit for an idle kept-alive connection and a TLS handshake).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header accepted.
pub const MAX_HEADER: usize = 64 * 1024;

/// What every connection of one build's proxy shares.
pub struct Shared {
    pub policy: Policy,
    pub credentials: Vec<Credential>,
    pub ca: Authority,
    pub upstream_tls: Arc<ClientConfig>,
    pub events: Events,
}

/// The HTTP/1.1 server settings for connections from the build.
/// `half_close`: a client may end its sending side once its request is
/// out and still read the answer (HTTP/1.0 style, `printf … | nc`); hyper
/// would otherwise take that end of input for an abandoned request.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER)
        .keep_alive(true)
        .half_close(true);
    b
}

/// A connection's place under [`super::server::MAX_CONNECTIONS`]. The connection holds it
/// while hyper serves it, and a tunnel or interception it turns into holds
/// it until that ends: a CONNECT's upgraded connection outlives hyper's
/// (which is done once the 200 is sent), and it is what costs descriptors,
/// an upstream connection and buffers.
pub type Slot = Arc<OwnedSemaphorePermit>;

/// How many requests a connection from the build has made (its service
/// counts them), so `report` can tell an idle kept-alive connection from a
/// client that never completes a request.
#[derive(Clone, Default)]
pub struct Requests(Arc<AtomicUsize>);

impl Requests {
    pub fn one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One error line for a connection hyper gave up on. hyper's header
/// timeout also ends a kept-alive connection that stays idle after its
/// requests, and a client that got its answers may drop the connection
/// with the rest unread (a reset): routine, so no line for those.
pub fn report(shared: &Shared, e: &hyper::Error, what: &str, requests: &Requests) {
    let answered = requests.0.load(Ordering::Relaxed) > 0;
    if answered && (e.is_timeout() || reset_by_client(e)) {
        return;
    }
    let why = if e.is_timeout() {
        format!(
            "no complete request header within {}s (slow or idle client)",
            HEADER_TIMEOUT.as_secs()
        )
    } else if e.is_parse_too_large() {
        format!("request header larger than {MAX_HEADER} bytes")
    } else if e.is_parse() {
        format!("malformed request ({e})")
    } else if e.is_incomplete_message() {
        "the client closed it in the middle of a request".to_owned()
    } else if e.is_canceled() || e.is_closed() {
        return;
    } else {
        e.to_string()
    };
    shared
        .events
        .line(&format!("error: {what}: {why}; connection closed"));
}

fn reset_by_client(e: &hyper::Error) -> bool {
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    })
}
