//! In-process tests of the whole proxy: [`server::serve_limited`] on a
//! loopback port of the host (no namespace), test upstreams on loopback,
//! raw HTTP/1.1 from the client side. The end-to-end tests with real
//! jailed builds are in `tests/proxy_e2e.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::audit::Events;
use super::rules::Policy;
use super::{ca, server};
use crate::config::proxy::Rule;

const T: Duration = Duration::from_secs(10);

struct Proxy {
    addr: SocketAddr,
    /// The read end of the build-log lines (non-blocking).
    log: std::fs::File,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// The log lines written so far.
    fn lines(&mut self) -> String {
        use std::io::Read;
        let mut out = Vec::new();
        let _ = self.log.read_to_end(&mut out);
        String::from_utf8(out).expect("log lines are UTF-8")
    }
}

/// A proxy with `rules` and at most `max` connections.
async fn proxy(rules: Vec<Rule>, max: usize) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca::Authority::generate("test").unwrap();
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, ca.ca_pem()).unwrap();
    let (upstream_tls, _) = ca::upstream_config(&bundle).unwrap();
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
    let shared = super::conn::Shared {
        policy: Policy { rules },
        credentials: Vec::new(),
        ca,
        upstream_tls,
        events: Events::log_only(Some(std::fs::File::from(w))),
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(server::serve_limited(l, Arc::new(shared), max));
    Proxy {
        addr,
        log: std::fs::File::from(r),
        _dir: dir,
    }
}

/// What a test upstream received: each request's header, as sent.
type Seen = Arc<Mutex<Vec<String>>>;

/// The request lines of what the upstream received.
fn request_lines(seen: &Seen) -> Vec<String> {
    let heads = seen.lock().unwrap();
    heads
        .iter()
        .map(|h| h.lines().next().unwrap_or_default().to_owned())
        .collect()
}

/// An HTTP server that answers every request `200 ok` and records its
/// header.
async fn http_upstream() -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                seen.lock().unwrap().push(head);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (port, seen)
}

/// A TCP server that echoes what it gets until EOF, then closes.
async fn echo_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Reads up to the end of a header (or EOF); "" when the peer closed
/// without one.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(T, s.read(&mut b)).await {
            Ok(Ok(1)) => buf.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One request on a new connection; the answer's header.
async fn ask(proxy: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    read_head(&mut s).await
}

fn rule(host: &str, path: Option<&str>) -> Rule {
    Rule::new(host, path, None).unwrap()
}

/// TRACE and TRACK are answered by the proxy (403, with the reason), never
/// forwarded: the server's echo would carry injected credentials back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_and_track_are_refused() {
    let (up, seen) = http_upstream().await;
    let p = proxy(vec![rule(r"127\.0\.0\.1", None)], 8).await;
    for m in ["TRACE", "TRACK", "trace"] {
        let head = ask(
            p.addr,
            &format!("{m} http://127.0.0.1:{up}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{m}: {head}");
        assert!(
            head.contains("x-nix-hatch-proxy: denied")
                && head.contains("TRACE and TRACK are refused"),
            "{m}: {head}"
        );
    }
    let head = ask(
        p.addr,
        &format!("GET http://127.0.0.1:{up}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(request_lines(&seen), vec!["GET /x HTTP/1.1".to_owned()]);
}

/// Plain HTTP: an ambiguous path is refused under a path rule, with the
/// reason; what is allowed goes upstream byte for byte as judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_refused_and_allowed_ones_forwarded_as_judged() {
    let (up, seen) = http_upstream().await;
    let mut p = proxy(vec![rule(r"127\.0\.0\.1", Some("^/pub/"))], 8).await;
    for path in [
        "/pub/../secret",
        "/pub/%2e%2e/secret",
        "/pub/..%2fsecret",
        "/pub/..;/secret",
        "/pub/..\\secret",
        "/pub/a%00",
    ] {
        let head = ask(
            p.addr,
            &format!("GET http://127.0.0.1:{up}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{path}: {head}");
        assert!(head.contains("(ambiguous path: "), "{path}: {head}");
    }
    let log = p.lines();
    assert!(
        log.contains(&format!(
            "nix-hatch proxy: deny GET 127.0.0.1:{up}/pub/../secret (ambiguous path: a \".\" or \"..\" segment)\n"
        )),
        "{log}"
    );
    let head = ask(
        p.addr,
        &format!("GET http://127.0.0.1:{up}/pub/a%20b?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        request_lines(&seen),
        vec!["GET /pub/a%20b?q=1 HTTP/1.1".to_owned()]
    );
}

/// Under a rule with `methods`, the method-override headers, however
/// spelled, never reach the server (it would take the allowed GET for a
/// DELETE); the log line names them. Under a rule without `methods` they
/// pass, like any header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_overrides_never_reach_the_server_under_a_method_rule() {
    let (up, seen) = http_upstream().await;
    let mut p = proxy(
        vec![
            Rule::new(
                r"127\.0\.0\.1",
                Some("^/get-only/"),
                Some(vec!["GET".into()]),
            )
            .unwrap(),
            rule(r"127\.0\.0\.1", None),
        ],
        8,
    )
    .await;
    let overrides = "X-HTTP-Method-Override: DELETE\r\nx-http-method: DELETE\r\nX-Method-OVERRIDE: DELETE\r\nx-http-method-override: PUT\r\n";
    for path in ["/get-only/a", "/open/b"] {
        let head = ask(
            p.addr,
            &format!("GET http://127.0.0.1:{up}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Other: kept\r\n{overrides}\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    let restricted = heads[0].to_ascii_lowercase();
    assert!(restricted.starts_with("get /get-only/a "), "{restricted}");
    assert!(!restricted.contains("method"), "{restricted}");
    assert!(!restricted.contains("delete"), "{restricted}");
    assert!(restricted.contains("x-other: kept\r\n"), "{restricted}");
    let open = heads[1].to_ascii_lowercase();
    assert!(open.starts_with("get /open/b "), "{open}");
    assert_eq!(open.matches("method").count(), 4, "{open}");
    let log = p.lines();
    assert!(
        log.contains(&format!(
            "nix-hatch proxy: allow GET 127.0.0.1:{up}/get-only/a (method override removed (rule 1 restricts methods): x-http-method-override, x-http-method, x-method-override)\n"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "nix-hatch proxy: allow GET 127.0.0.1:{up}/open/b\n"
        )),
        "{log}"
    );
}

/// `{ host = '.*' }` does not hand the build this machine: a request and
/// a CONNECT to 127.0.0.1 are refused with the reason, and nothing reaches
/// the servers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_rule_does_not_reach_this_machine() {
    let (up, seen) = http_upstream().await;
    let echo = echo_upstream().await;
    let mut p = proxy(vec![rule(".*", None)], 8).await;
    let head = ask(
        p.addr,
        &format!("GET http://127.0.0.1:{up}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("(this machine or link-local: a rule must name this host literally)"),
        "{head}"
    );
    let head = ask(
        p.addr,
        &format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: 127.0.0.1:{echo}\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(seen.lock().unwrap().is_empty());
    let log = p.lines();
    for line in [
        format!("nix-hatch proxy: deny GET 127.0.0.1:{up}/x (this machine or link-local: a rule must name this host literally)\n"),
        format!("nix-hatch proxy: deny CONNECT 127.0.0.1:{echo} (this machine or link-local: a rule must name this host literally)\n"),
    ] {
        assert!(log.contains(&line), "no {line:?} in {log}");
    }
}

/// Opens a tunnel through the proxy to the echo server and checks it
/// echoes; `None` if the proxy closed the connection instead.
async fn tunnel(proxy: SocketAddr, echo: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: 127.0.0.1:{echo}\r\n\r\n");
    // A refused connection may be reset before or after the write.
    if s.write_all(req.as_bytes()).await.is_err() {
        return None;
    }
    let head = read_head(&mut s).await;
    if head.is_empty() {
        return None;
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    Some(s)
}

/// A tunnel keeps its connection's place under the cap until it ends: with
/// a cap of 2 and two tunnels open, a third connection is closed at once;
/// when a tunnel ends, its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_connection_cap() {
    let echo = echo_upstream().await;
    let p = proxy(vec![rule(r"127\.0\.0\.1", None)], 2).await;
    let first = tunnel(p.addr, echo).await.expect("first tunnel");
    let _second = tunnel(p.addr, echo).await.expect("second tunnel");
    assert!(
        tunnel(p.addr, echo).await.is_none(),
        "a third tunnel was opened past the cap of 2"
    );
    // An ordinary request is refused too while both places are taken.
    assert_eq!(
        ask(p.addr, "GET http://127.0.0.1:1/ HTTP/1.1\r\n\r\n").await,
        ""
    );
    drop(first);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if tunnel(p.addr, echo).await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed tunnel's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whatever a request carries, each log line it causes is one line of
/// printable ASCII, well below PIPE_BUF, with each URI, host or method the
/// build chose cut to 200 bytes and its original length given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_of_hostile_requests_are_bounded() {
    let (up, _) = http_upstream().await;
    let mut p = proxy(vec![rule(r"127\.0\.0\.1", Some("^/pub/"))], 8).await;
    let long = "a".repeat(30_000);
    let reqs = [
        // Denied, a 30 KB path.
        format!("GET http://127.0.0.1:{up}/{long} HTTP/1.1\r\n\r\n"),
        // A path with U+2028 and a bidi override, raw UTF-8.
        format!("GET http://127.0.0.1:{up}/x\u{2028}nix-hatch proxy: allow GET y/\u{202e}z HTTP/1.1\r\n\r\n"),
        // Not http://, a 30 KB URI and a 20 KB method.
        format!("{} ftp://127.0.0.1/{long} HTTP/1.1\r\n\r\n", "M".repeat(20_000)),
        // Origin-form, a 30 KB path.
        format!("GET /{long} HTTP/1.1\r\n\r\n"),
        // CONNECT to a 30 KB host.
        format!("CONNECT {long}.example:443 HTTP/1.1\r\n\r\n"),
        // CONNECT without a port.
        format!("CONNECT {long}.example HTTP/1.1\r\n\r\n"),
    ];
    for req in &reqs {
        let head = ask(p.addr, req).await;
        assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    }
    // The line of a malformed request comes when hyper closes the
    // connection, maybe after the answer: wait for all of them.
    let mut log = String::new();
    for _ in 0..100 {
        log.push_str(&p.lines());
        if log.lines().count() >= reqs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), reqs.len(), "{log}");
    for l in &lines {
        assert!(l.len() < 1024, "{} bytes: {}", l.len(), &l[..200]);
        assert!(l.bytes().all(|b| (b' '..=b'~').contains(&b)), "{l}");
        assert!(l.starts_with("nix-hatch proxy: "), "{l}");
    }
    let has = |needle: &str| {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no {needle:?} in:\n{log}"
        )
    };
    has("...(30001 bytes) (no rule for this path or method)");
    // hyper takes no raw non-ASCII in a request target (escaping in the
    // log is the second line of defence, see `audit`).
    has("malformed request");
    has("...(20000 bytes) ftp://127.0.0.1/aaa");
    has(&format!(
        "error: GET /{}...(30001 bytes): this is a proxy",
        &long[..199]
    ));
    has(&format!(
        "deny CONNECT {}...(30008 bytes):443 (no rule)",
        &long[..200]
    ));
    has(&format!(
        "error: CONNECT {}...(30008 bytes): CONNECT needs host:port",
        &long[..200]
    ));
}

/// A client that ends its sending side after the request (HTTP/1.0
/// style: `nc`, shell scripts, `printf … | nc`) still gets the whole
/// answer, allowed or denied, and nothing is logged as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_is_answered() {
    let (up, seen) = http_upstream().await;
    let mut p = proxy(vec![rule(r"127\.0\.0\.1", Some("^/pub/"))], 8).await;
    for (path, status, body) in [
        ("/pub/a", "200", "ok"),
        ("/secret", "403", "nix-hatch proxy: denied"),
    ] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!("GET http://127.0.0.1:{up}{path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut answer))
            .await
            .expect("the proxy neither answered nor closed")
            .expect("reading the answer");
        let answer = String::from_utf8_lossy(&answer);
        let status_line = answer.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.") && status_line.contains(&format!(" {status} ")),
            "{path}: {answer:?}"
        );
        let (_, got_body) = answer.split_once("\r\n\r\n").unwrap_or_default();
        assert!(got_body.starts_with(body), "{path}: {answer:?}");
    }
    assert_eq!(request_lines(&seen), vec!["GET /pub/a HTTP/1.0".to_owned()]);
    let log = p.lines();
    assert!(!log.contains("error"), "{log}");
}
