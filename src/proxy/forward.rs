//! HTTP forwarding: requests from the jail (absolute-form `GET http://…`,
//! or origin-form inside an intercepted TLS connection) are judged by the
//! policy, get their credentials (over TLS only, unless a credential sets
//! `plain-http`), and are sent upstream over a connection the proxy makes
//! from the host's network. Bodies stream both ways.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::audit::{clip_shown, shown, Decision};
use super::conn::Shared;
use super::credentials;
use super::rules::{local_host, local_ip, normalize_host, Verdict};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Header on every answer the proxy makes itself, saying why.
pub const REASON_HEADER: &str = "x-nix-hatch-proxy";

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a matching credential was not added (the decision's reason; the
/// log line names the headers after it).
const WITHHELD: &str = "credential withheld, not TLS";

/// Methods whose answer echoes the request (with its injected credentials).
const ECHO_METHODS: [&str; 2] = ["TRACE", "TRACK"];

/// Headers that tell a server to take the request for another method
/// (Rails, Laravel, Express's method-override and others honour them).
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An answer from the proxy itself: `status`, the reason in
/// [`REASON_HEADER`] and as the body.
pub fn answer(status: StatusCode, reason: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("nix-hatch proxy: {reason}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert(REASON_HEADER, v);
    }
    r
}

/// A request the policy refused: its decision line and record, and a 403
/// naming `what` (e.g. `GET host/path`) and the reason.
pub fn deny(shared: &Shared, d: Decision<'_>, what: &str, reason: &str) -> Response<Body> {
    let d = Decision {
        decision: "deny",
        reason: Some(reason),
        ..d
    };
    shared
        .events
        .decision(&format!("deny {what} ({reason})"), &d);
    answer(StatusCode::FORBIDDEN, &format!("denied {what} ({reason})"))
}

/// Where requests go: the upstream origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Normalized (what rules see and what is connected to).
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Origin {
    fn default_port(&self) -> u16 {
        if self.tls {
            443
        } else {
            80
        }
    }

    /// The Host header value.
    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.default_port() {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// One kept-alive upstream connection per client connection (a build
/// fetching many files from one server reuses it).
#[derive(Default)]
pub struct UpstreamCache {
    conn: Mutex<Option<(Origin, SendRequest<Body>)>>,
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and proxy-only ones: never forwarded.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

/// Removes the [`METHOD_OVERRIDE_HEADERS`] (header names are matched
/// case-insensitively) and returns the names that were there.
fn strip_method_overrides(h: &mut HeaderMap) -> Vec<String> {
    METHOD_OVERRIDE_HEADERS
        .into_iter()
        .filter(|name| h.remove(*name).is_some())
        .map(str::to_owned)
        .collect()
}

/// An absolute-form request (`GET http://host/path`) from the jail.
pub async fn plain(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    cache: Arc<UpstreamCache>,
) -> Result<Response<Body>, Infallible> {
    let uri = req.uri().clone();
    let origin = match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(host)) => Ok(Origin {
            host: normalize_host(host),
            port: uri.port_u16().unwrap_or(80),
            tls: false,
        }),
        (Some(s), Some(_)) => Err(format!(
            "cannot forward {s}:// URLs; use CONNECT (https_proxy) for https"
        )),
        _ => Err("this is a proxy: send absolute http:// URLs or CONNECT".to_owned()),
    };
    match origin {
        Ok(origin) => Ok(judge_and_send(req, &origin, &shared, &cache, "forward").await),
        Err(reason) => {
            shared.events.line(&format!(
                "error: {} {}: {reason}",
                clip_shown(req.method().as_str()),
                clip_shown(&uri.to_string())
            ));
            Ok(answer(StatusCode::BAD_REQUEST, &reason))
        }
    }
}

/// Judges one request to `origin` and, if allowed, sends it upstream.
pub async fn judge_and_send(
    mut req: Request<Incoming>,
    origin: &Origin,
    shared: &Shared,
    cache: &UpstreamCache,
    mode: &str,
) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let scheme = if origin.tls { "https" } else { "http" };
    let where_ = shown(&origin.host, origin.port, origin.default_port(), &path);
    let where_ = if origin.tls {
        format!("https://{where_}")
    } else {
        where_
    };
    // What a log line calls the request (method and where_ clipped).
    let what = format!("{} {where_}", clip_shown(&method));
    let mut d = Decision {
        decision: "allow",
        method: &method,
        scheme,
        host: &origin.host,
        port: origin.port,
        path: Some(&path),
        query: query.as_deref(),
        rule: None,
        reason: None,
        mode: Some(mode),
        credentials: &[],
        credentials_withheld: &[],
        removed_headers: &[],
    };
    // TRACE (and IIS's TRACK) make the server echo the request back,
    // credentials the proxy added included: never forwarded.
    if ECHO_METHODS.iter().any(|m| method.eq_ignore_ascii_case(m)) {
        return deny(
            shared,
            d,
            &what,
            "TRACE and TRACK are refused: the server would echo the request back",
        );
    }
    let verdict = shared
        .policy
        .request(&method, &origin.host, origin.port, &path);
    let rule = match verdict {
        Verdict::Deny { reason } => {
            return deny(shared, d, &what, &reason);
        }
        Verdict::Allow { rule } => rule,
    };
    // Upstream request: origin-form URI, our Host, no hop-by-hop headers.
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    *req.uri_mut() = match pq.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return answer(StatusCode::BAD_REQUEST, "unusable request target"),
    };
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // The rule allowed this method only: the server must not be told to
    // treat the request as another one (a GET as a DELETE).
    let removed = if shared.policy.restricts_methods(rule) {
        strip_method_overrides(headers)
    } else {
        Vec::new()
    };
    if let Ok(v) = HeaderValue::from_str(&origin.host_header()) {
        headers.insert(header::HOST, v);
    }
    let creds = credentials::inject(&shared.credentials, &origin.host, origin.tls, headers);
    d.rule = Some(rule + 1);
    d.credentials = &creds.added;
    d.credentials_withheld = &creds.withheld;
    d.removed_headers = &removed;
    let mut notes = Vec::new();
    if !removed.is_empty() {
        notes.push(format!(
            "method override removed (rule {} restricts methods): {}",
            rule + 1,
            removed.join(", ")
        ));
    }
    if !creds.added.is_empty() {
        notes.push(format!("credential: {}", creds.added.join(", ")));
    }
    if !creds.withheld.is_empty() {
        d.reason = Some(WITHHELD);
        notes.push(format!("{WITHHELD}: {}", creds.withheld.join(", ")));
    }
    let suffix = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    shared.events.decision(&format!("allow {what}{suffix}"), &d);
    let req = req.map(|b| b.boxed());
    match send(req, origin, shared, cache).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let reason = format!("upstream {}: {e}", clip_shown(&origin.host_header()));
            let d = Decision {
                decision: "error",
                reason: Some(&reason),
                credentials: &[],
                credentials_withheld: &[],
                removed_headers: &[],
                ..d
            };
            shared
                .events
                .decision(&format!("error: {what}: {reason}"), &d);
            answer(StatusCode::BAD_GATEWAY, &reason)
        }
    }
}

/// Sends over the cached connection when it goes to the same origin and
/// is still usable, else over a new one.
async fn send(
    req: Request<Body>,
    origin: &Origin,
    shared: &Shared,
    cache: &UpstreamCache,
) -> anyhow::Result<Response<Incoming>> {
    let mut slot = cache.conn.lock().await;
    let cached = match slot.take() {
        Some((o, mut s)) if &o == origin => s.ready().await.ok().map(|_| s),
        _ => None,
    };
    let mut sender = match cached {
        Some(s) => s,
        None => connect(origin, shared).await?,
    };
    let resp = sender.send_request(req).await?;
    *slot = Some((origin.clone(), sender));
    Ok(resp)
}

/// A new upstream HTTP/1.1 connection (TLS verified against the upstream
/// trust store when `origin.tls`).
async fn connect(origin: &Origin, shared: &Shared) -> anyhow::Result<SendRequest<Body>> {
    let tcp = connect_tcp(&origin.host, origin.port).await?;
    if origin.tls {
        let name = rustls::pki_types::ServerName::try_from(origin.host.clone())
            .map_err(|e| anyhow!("{}: {e}", origin.host))?;
        let tls = tokio_rustls::TlsConnector::from(shared.upstream_tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow!("TLS: {e}"))?;
        handshake(TokioIo::new(tls)).await
    } else {
        handshake(TokioIo::new(tcp)).await
    }
}

async fn handshake<T>(io: T) -> anyhow::Result<SendRequest<Body>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A TCP connection from the host's network, with a time limit.
pub async fn connect_tcp(host: &str, port: u16) -> anyhow::Result<TcpStream> {
    let attempt = async {
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((host, port)).await?.collect();
        let addrs = reachable(host, addrs)?;
        anyhow::Ok(TcpStream::connect(&addrs[..]).await?)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!(
            "no connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The addresses `host` may be reached at: a DNS name that resolves to
/// this machine (loopback, unspecified) or to link-local addresses (cloud
/// metadata at 169.254.169.254) is not followed there — an allowed domain
/// pointing at 127.0.0.1 would otherwise hand the build the host's own
/// services, which the proxy can reach from the host's namespace. A host
/// that is such an address by name (`localhost`, `127.0.0.1`, `::1`) is
/// reached: the policy allowed it only through a rule naming it literally
/// (see `rules`).
fn reachable(
    host: &str,
    addrs: Vec<std::net::SocketAddr>,
) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    if host.parse::<std::net::IpAddr>().is_ok() || local_host(host) {
        return Ok(addrs);
    }
    let (skipped, ok): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| local_ip(a.ip()));
    if ok.is_empty() {
        return Err(match skipped.first() {
            Some(a) => anyhow!(
                "{host} resolves to {} (this machine or link-local); a rule must name such a host literally",
                a.ip()
            ),
            None => anyhow!("{host} has no address"),
        });
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::{reachable, strip_method_overrides};
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    use std::net::SocketAddr;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn names_resolving_to_this_machine_or_link_local_are_not_followed() {
        for local in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "0.0.0.0:80",
            "169.254.169.254:80",
            "[::1]:80",
            "[::]:80",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            let err = reachable("registry.example.org", addrs(&[local])).unwrap_err();
            assert!(
                err.to_string().contains("name such a host literally"),
                "{local}: {err}"
            );
        }
        // Only the public addresses of a name with both are used.
        assert_eq!(
            reachable(
                "mixed.example.org",
                addrs(&["127.0.0.1:443", "192.0.2.7:443"])
            )
            .unwrap(),
            addrs(&["192.0.2.7:443"])
        );
        // Private (RFC 1918) addresses are ordinary: internal registries.
        assert_eq!(
            reachable("cache.internal", addrs(&["10.1.2.3:80"])).unwrap(),
            addrs(&["10.1.2.3:80"])
        );
    }

    #[test]
    fn hosts_named_literally_are_reached() {
        for (host, a) in [
            ("localhost", "127.0.0.1:80"),
            ("svc.localhost", "127.0.0.1:80"),
            ("127.0.0.1", "127.0.0.1:80"),
            ("::1", "[::1]:80"),
            ("169.254.169.254", "169.254.169.254:80"),
        ] {
            assert_eq!(reachable(host, addrs(&[a])).unwrap(), addrs(&[a]), "{host}");
        }
    }

    /// Every spelling and every value of the three override headers
    /// goes, and only they.
    #[test]
    fn method_overrides_are_stripped_in_any_case() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("X-HTTP-Method-Override", "DELETE"),
            ("x-http-method", "PUT"),
            ("X-Method-OVERRIDE", "PATCH"),
            ("x-http-method-override", "POST"),
            ("X-HTTP-Method-Override-Not", "kept"),
            ("Accept", "*/*"),
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        assert_eq!(
            strip_method_overrides(&mut h),
            vec![
                "x-http-method-override",
                "x-http-method",
                "x-method-override"
            ]
        );
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "x-http-method-override-not"]);
        assert!(strip_method_overrides(&mut h).is_empty());
    }
}
