//! TLS interception of an allowed CONNECT: the proxy completes the TLS
//! handshake with the build using a certificate for the requested host
//! signed by the per-build CA (which the jail trusts), then judges and
//! forwards each request inside like plain HTTP, over its own TLS
//! connection to the real server (verified against the upstream trust
//! store). The requests always go to the CONNECT's host, whatever their
//! Host header says.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;

use super::audit::clip_shown;
use super::conn::{self, Shared, HEADER_TIMEOUT};
use super::forward::{answer, judge_and_send, Origin, UpstreamCache};

pub async fn serve(up: Upgraded, origin: Origin, shared: Arc<Shared>, cfg: Arc<ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(TokioIo::new(up))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.events.line(&format!(
                "error: TLS handshake with the build for {} failed: {e} (does the client trust $SSL_CERT_FILE?)",
                clip_shown(&origin.host)
            ));
            return;
        }
        Err(_) => {
            shared.events.line(&format!(
                "error: no TLS handshake for {} within {}s; connection closed",
                clip_shown(&origin.host),
                HEADER_TIMEOUT.as_secs()
            ));
            return;
        }
    };
    let cache = Arc::new(UpstreamCache::default());
    let s2 = shared.clone();
    let requests = conn::Requests::default();
    let counted = requests.clone();
    let svc = service_fn(move |req| {
        let (shared, cache, origin) = (s2.clone(), cache.clone(), origin.clone());
        counted.one();
        async move {
            if req.method() == Method::CONNECT {
                let reason = "CONNECT inside an intercepted connection";
                shared.events.line(&format!("error: {reason}"));
                return Ok::<_, std::convert::Infallible>(answer(
                    StatusCode::METHOD_NOT_ALLOWED,
                    reason,
                ));
            }
            Ok(judge_and_send(req, &origin, &shared, &cache, "intercept").await)
        }
    });
    if let Err(e) = conn::http1().serve_connection(TokioIo::new(tls), svc).await {
        conn::report(&shared, &e, "an intercepted connection", &requests);
    }
}
