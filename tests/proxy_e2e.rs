//! `network = "proxy"`: real escape builds through the hook whose jailed
//! builder (the harness's busybox) fetches from HTTP and HTTPS servers the
//! test runs on the host's loopback, through the build's policy proxy.
//!
//! HTTPS client in the jail: Debian's `/usr/bin/curl`, bound in read-only
//! with the libraries `ldd` names (busybox wget has no TLS). The test
//! servers' certificates come from a test CA given to the executor as
//! `upstream-ca`; the jail trusts the per-build CA plus that bundle.
//!
//! Addresses: `localhost` is allowed, `127.0.0.2` is never allowed,
//! `127.0.0.1` is allowed only for some paths (which makes CONNECTs to it
//! intercepted).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const FEATURE_P: &str = "escape-p";

// ---------------------------------------------------------------------------
// Test servers (host network, loopback)
// ---------------------------------------------------------------------------

/// Bytes of `/slow`: streamed in 64 KiB pieces over about two seconds.
const SLOW_LEN: usize = 2 * 1024 * 1024;

fn slow_byte(i: usize) -> u8 {
    b"0123456789abcdef"[(i * 7 + i / 4096) % 16]
}

struct Servers {
    http: u16,
    https: u16,
    /// The test CA (PEM), for `upstream-ca`.
    ca_file: PathBuf,
    /// One line per request: `<scheme> <method> <path> auth=<ok|none|wrong>`,
    /// then ` override=<value>` for each method-override header.
    seen: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl Servers {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

type TestBody = BoxBody<Bytes, Infallible>;

/// The body of `/slow`: [`SLOW_LEN`] bytes in 64 KiB pieces, 60 ms apart.
struct Slow {
    pos: usize,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for Slow {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        use std::task::Poll;
        if self.pos >= SLOW_LEN {
            return Poll::Ready(None);
        }
        if let Some(s) = self.sleep.as_mut() {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_millis(60))));
        let start = self.pos;
        let end = (start + 64 * 1024).min(SLOW_LEN);
        self.pos = end;
        let piece: Vec<u8> = (start..end).map(slow_byte).collect();
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(piece)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact((SLOW_LEN - self.pos) as u64)
    }
}

fn body(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).boxed()
}

async fn respond(
    req: Request<Incoming>,
    scheme: &'static str,
    secret: Arc<String>,
    seen: Arc<Mutex<Vec<String>>>,
) -> Result<Response<TestBody>, Infallible> {
    let auth = match req.headers().get("authorization") {
        None => "none",
        Some(v) if v.as_bytes() == format!("Bearer {secret}").as_bytes() => "ok",
        Some(_) => "wrong",
    };
    let path = req.uri().path().to_owned();
    // Method-override headers, when the request has any.
    let overrides: String = [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ]
    .iter()
    .flat_map(|h| req.headers().get_all(*h))
    .map(|v| format!(" override={}", String::from_utf8_lossy(v.as_bytes())))
    .collect();
    seen.lock().unwrap().push(format!(
        "{scheme} {} {path} auth={auth}{overrides}",
        req.method()
    ));
    let resp = match path.as_str() {
        "/pub/a" => Response::new(body(format!("pub-a over {scheme}\n"))),
        "/priv/b" => Response::new(body(format!("priv-b over {scheme}\n"))),
        "/secret" if auth == "ok" => Response::new(body(format!("authorized over {scheme}\n"))),
        "/secret" => {
            let mut r = Response::new(body("missing credential\n"));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
        "/slow" => Response::new(
            Slow {
                pos: 0,
                sleep: None,
            }
            .boxed(),
        ),
        _ => {
            let mut r = Response::new(body("not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

/// Starts the HTTP and HTTPS servers on 127.0.0.1; `/secret` wants
/// `Authorization: Bearer <secret>`.
fn start_servers(env: &TestEnv, secret: &str) -> Servers {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Test CA and a server certificate for the loopback names.
    let (ca_file, tls) = common::tls::upstream_tls(
        &env.path("upstream-ca.pem"),
        "nix-hatch test upstream CA",
        &["localhost", "127.0.0.1", "127.0.0.2"],
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let secret = Arc::new(secret.to_owned());
    let bind = |rt: &tokio::runtime::Runtime| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let _g = rt.enter();
        (tokio::net::TcpListener::from_std(l).unwrap(), port)
    };
    let (http_l, http) = bind(&rt);
    let (https_l, https) = bind(&rt);
    for (listener, tls) in [(http_l, None), (https_l, Some(tls))] {
        let (seen, secret) = (seen.clone(), secret.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, secret, tls) = (seen.clone(), secret.clone(), tls.clone());
                tokio::spawn(async move {
                    let scheme = if tls.is_some() { "https" } else { "http" };
                    let svc =
                        service_fn(move |req| respond(req, scheme, secret.clone(), seen.clone()));
                    let b = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(cfg) => {
                            let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                            else {
                                return;
                            };
                            let _ = b.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                });
            }
        });
    }
    Servers {
        http,
        https,
        ca_file,
        seen,
        _rt: rt,
    }
}

// ---------------------------------------------------------------------------
// Config and expressions
// ---------------------------------------------------------------------------

/// Read-only binds that make Debian's curl run in the jail: the binary, the
/// directories of the libraries `ldd` lists, and the ELF interpreter.
fn curl_binds() -> Vec<String> {
    let out = run(
        std::process::Command::new("ldd").arg("/usr/bin/curl"),
        Duration::from_secs(30),
    );
    out.assert_ok();
    let mut binds: BTreeSet<String> = BTreeSet::new();
    binds.insert("/usr/bin/curl".into());
    for line in out.stdout.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        if line.contains("=>") {
            binds.insert(Path::new(path).parent().unwrap().display().to_string());
        } else {
            // The interpreter, e.g. /lib64/ld-linux-x86-64.so.2.
            binds.insert(path.to_owned());
        }
    }
    binds.into_iter().collect()
}

/// The config: escape-p → a proxy jail with `extra` lines in its table.
fn proxy_config(env: &TestEnv, servers: &Servers, extra: &str) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "state-dir = {}\nfallback = \"decline\"\n[routes]\n{FEATURE_P} = \"px\"",
        toml_str(&env.state_dir().to_string_lossy())
    );
    let binds: Vec<String> = curl_binds().iter().map(|b| toml_str(b)).collect();
    let _ = writeln!(
        s,
        "[executors.px]\nkind = \"jail\"\nuser = \"nobody\"\nmax-jobs = 4\ntimeout = 180\nnetwork = \"proxy\"\nupstream-ca = {}\nro-binds = [{}]",
        toml_str(&servers.ca_file.to_string_lossy()),
        binds.join(", ")
    );
    s.push_str(extra);
    env.write_config(&s);
    let check = run(
        std::process::Command::new(cli_bin())
            .args(["check", "--config"])
            .arg(env.config_path()),
        Duration::from_secs(60),
    );
    check.assert_ok();
}

/// `probe`: busybox `sh -c script` in the proxy jail. `r CMD…` runs a
/// command and prints `ok <stdout>` or `fail <stderr>` on one line.
fn probe_expr(env: &TestEnv, script: &str) -> PathBuf {
    let body = format!(
        r#"{{ probe = builtins.derivation {{
  name = "proxy-probe";
  inherit system nonce;
  builder = "${{bb}}/bin/busybox";
  args = [ "sh" "-c" ''
    set -u
    export PATH=${{bb}}/bin
    r() {{ if "$@" >$TMPDIR/o 2>$TMPDIR/e; then echo "ok $(tr '\n' ' ' <$TMPDIR/o)"; else echo "fail $(tr '\n' ' ' <$TMPDIR/e)"; fi; }}
    mkdir $out
    {script}
  '' ];
  requiredSystemFeatures = [ "{FEATURE_P}" ];
}}; }}"#
    );
    env.write_expr("probe.nix", &body)
}

/// Builds the probe and returns (output dir, build log).
fn build_probe(env: &TestEnv, e: &Path) -> (String, String) {
    build_probe_by(env, e, None)
}

/// [`build_probe`], through a private nix-daemon as the unprivileged
/// `user` when there is one (an untrusted client on a shared machine).
fn build_probe_by(env: &TestEnv, e: &Path, user: Option<&str>) -> (String, String) {
    let daemon = user.map(|_| Daemon::start(env, Some(&hook_bin())));
    let out = match (&daemon, user) {
        (Some(d), Some(u)) => env.nix_build_via_as_user(d, u, e, &["probe"], &[]),
        _ => env.nix_build(e, &["probe"], &[]),
    };
    let log = nix_log(&env.drv_path(e, "probe")).stdout;
    assert!(
        out.success(),
        "{}\n--- build log ---\n{log}",
        out.describe()
    );
    (out.store_paths()[0].clone(), log)
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[track_caller]
fn assert_has(text: &str, needle: &str, what: &str) {
    assert!(text.contains(needle), "{what}: no {needle:?} in:\n{text}");
}

/// `text` with the hex digits of every percent-escape in upper case.
fn upper_percent_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut hex_left = 0;
    for c in text.chars() {
        if hex_left > 0 && c.is_ascii_hexdigit() {
            out.push(c.to_ascii_uppercase());
            hex_left -= 1;
            continue;
        }
        hex_left = if c == '%' { 2 } else { 0 };
        out.push(c);
    }
    out
}

const CURL: &str = "/usr/bin/curl -sS -f --max-time 30";

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn allowed_denied_and_path_rules_over_http_and_https() {
    let env = TestEnv::new("proxy-rules");
    let srv = start_servers(&env, "unused");
    proxy_config(
        &env,
        &srv,
        &format!(
            "allow = [ {{ host = 'localhost', ports = [{}, {}] }}, {{ host = '127\\.0\\.0\\.1', path = '^/pub/' }} ]\n",
            srv.http, srv.https
        ),
    );
    let (h, s) = (srv.http, srv.https);
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r wget -q -O - http://localhost:{h}/pub/a > $out/http-allowed
    r wget -q -O - http://127.0.0.2:{h}/pub/a > $out/http-denied-host
    r wget -q -O - http://127.0.0.1:{h}/pub/a > $out/http-path-allowed
    r wget -q -O - http://127.0.0.1:{h}/priv/b > $out/http-path-denied
    r {CURL} https://localhost:{s}/pub/a > $out/https-tunnel
    r {CURL} https://127.0.0.2:{s}/pub/a > $out/https-denied-host
    r {CURL} https://127.0.0.1:{s}/pub/a > $out/https-path-allowed
    r {CURL} https://127.0.0.1:{s}/priv/b > $out/https-path-denied
    r wget -q -O - http://localhost:1/x > $out/http-denied-port
    r {CURL} https://localhost:1/x > $out/https-denied-port
    r /usr/bin/curl -sS -o /dev/null -w '%{{http_code}} %header{{x-nix-hatch-proxy}}' http://127.0.0.2:{h}/x > $out/reason
    echo "$http_proxy $https_proxy $HTTP_PROXY $HTTPS_PROXY" > $out/env
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    assert_eq!(got("http-allowed"), "ok pub-a over http \n");
    assert_has(&got("http-denied-host"), "fail", "denied host");
    assert_has(&got("http-denied-host"), "403", "denied host");
    assert_eq!(got("http-path-allowed"), "ok pub-a over http \n");
    assert_has(&got("http-path-denied"), "403", "denied path");
    assert_eq!(got("https-tunnel"), "ok pub-a over https \n");
    assert_has(&got("https-denied-host"), "403", "denied CONNECT");
    assert_eq!(got("https-path-allowed"), "ok pub-a over https \n");
    assert_has(&got("https-path-denied"), "403", "denied path inside TLS");
    assert_has(&got("http-denied-port"), "403", "denied port");
    assert_has(&got("https-denied-port"), "403", "denied CONNECT port");
    assert_eq!(
        got("reason"),
        format!("ok 403 denied GET 127.0.0.2:{h}/x (no rule)\n"),
        "the reason header"
    );
    let url = format!("http://127.0.0.1:{}", nix_hatch::proxy::PORT);
    assert_eq!(got("env"), format!("{url} {url} {url} {url}\n"));
    // Every decision is one line in the build log.
    for line in [
        format!("nix-hatch proxy: allow GET localhost:{h}/pub/a"),
        format!("nix-hatch proxy: deny GET 127.0.0.2:{h}/pub/a (no rule)"),
        format!("nix-hatch proxy: allow GET 127.0.0.1:{h}/pub/a"),
        format!("nix-hatch proxy: deny GET 127.0.0.1:{h}/priv/b (no rule for this path or method)"),
        format!("nix-hatch proxy: allow CONNECT localhost:{s} (tunnel)"),
        format!("nix-hatch proxy: deny CONNECT 127.0.0.2:{s} (no rule)"),
        format!("nix-hatch proxy: allow CONNECT 127.0.0.1:{s} (intercept; rule 2 restricts paths or methods)"),
        format!("nix-hatch proxy: allow GET https://127.0.0.1:{s}/pub/a"),
        format!("nix-hatch proxy: deny GET https://127.0.0.1:{s}/priv/b (no rule for this path or method)"),
        "nix-hatch proxy: deny GET localhost:1/x (no rule for this port)".to_owned(),
        "nix-hatch proxy: deny CONNECT localhost:1 (no rule for this port)".to_owned(),
    ] {
        assert_has(&log, &line, "build log");
    }
    // Denied requests never reached a server.
    let seen = srv.seen();
    assert!(!seen.iter().any(|l| l.contains("/priv/b")), "{seen:#?}");
    // And one JSON line each in the audit file.
    let audit = read(env.state_dir().join(nix_hatch::proxy::audit::AUDIT_FILE));
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records
        .iter()
        .any(|r| r["decision"] == "deny" && r["host"] == "127.0.0.2" && r["method"] == "CONNECT"));
    assert!(records
        .iter()
        .any(|r| r["decision"] == "allow" && r["mode"] == "tunnel" && r["rule"] == 1));
    assert!(records
        .iter()
        .all(|r| r["drv"] == env.drv_path(&e, "probe").as_str()));
}

/// curl printing the status and the proxy's reason header, sending the
/// path as given (no dot-segment removal).
const CURL_REASON: &str = "/usr/bin/curl -sS --max-time 30 --path-as-is -o /dev/null -w '%{http_code} %header{x-nix-hatch-proxy}'";

/// The review's bypasses of a path rule (`127.0.0.1` only `^/pub/`), over
/// plain HTTP and inside an intercepted TLS connection: refused with the
/// reason, never forwarded. TRACE is refused too; a 40 KB path is clipped
/// in the log line and the audit record.
#[test]
fn ambiguous_paths_trace_and_long_paths_are_refused() {
    let env = TestEnv::new("proxy-paths");
    let srv = start_servers(&env, "unused");
    proxy_config(
        &env,
        &srv,
        "allow = [ { host = '127\\.0\\.0\\.1', path = '^/pub/' } ]\n",
    );
    let (h, s) = (srv.http, srv.https);
    let variants = [
        "/pub/../priv/b",
        "/pub/%2e%2e/priv/b",
        "/pub/..%2fpriv/b",
        "/pub/..;/priv/b",
        "/pub/..\\priv/b",
    ];
    let mut script = String::new();
    for (i, v) in variants.iter().enumerate() {
        let _ = writeln!(
            script,
            "    r {CURL_REASON} 'http://127.0.0.1:{h}{v}' > $out/http-{i}"
        );
        let _ = writeln!(
            script,
            "    r {CURL_REASON} 'https://127.0.0.1:{s}{v}' > $out/https-{i}"
        );
    }
    let _ = write!(
        script,
        r#"
    r {CURL_REASON} http://127.0.0.1:{h}/pub/a > $out/http-ok
    r {CURL_REASON} https://127.0.0.1:{s}/pub/a > $out/https-ok
    r {CURL_REASON} -X TRACE http://127.0.0.1:{h}/pub/a > $out/http-trace
    r {CURL_REASON} -X TRACE https://127.0.0.1:{s}/pub/a > $out/https-trace
    r {CURL_REASON} -X TRACK https://127.0.0.1:{s}/pub/a > $out/https-track
    r {CURL_REASON} "http://127.0.0.2:{h}/$(head -c 40000 /dev/zero | tr '\0' a)" > $out/long
"#
    );
    let e = probe_expr(&env, &script);
    let (out, log) = build_probe(&env, &e);
    // Newer curl (Debian sid's 8.23) upper-cases percent-escapes in some
    // requests it sends (`%2e` → `%2E`, the same URL).
    let log = upper_percent_escapes(&log);
    let got = |f: &str| upper_percent_escapes(&read(format!("{out}/{f}")));
    for (i, v) in variants.iter().enumerate() {
        let v = upper_percent_escapes(v);
        for (f, shown) in [
            (format!("http-{i}"), format!("127.0.0.1:{h}{v}")),
            (format!("https-{i}"), format!("https://127.0.0.1:{s}{v}")),
        ] {
            let g = got(&f);
            assert!(
                g.starts_with(&format!("ok 403 denied GET {shown} (ambiguous path: ")),
                "{f}: {g}"
            );
            assert_has(
                &log,
                &format!("nix-hatch proxy: deny GET {shown} (ambiguous path: "),
                "build log",
            );
        }
    }
    assert!(got("http-ok").starts_with("ok 200"), "{}", got("http-ok"));
    assert!(got("https-ok").starts_with("ok 200"), "{}", got("https-ok"));
    for (f, m) in [
        ("http-trace", "TRACE"),
        ("https-trace", "TRACE"),
        ("https-track", "TRACK"),
    ] {
        let g = got(f);
        assert!(g.starts_with(&format!("ok 403 denied {m} ")), "{f}: {g}");
        assert_has(&g, "(TRACE and TRACK are refused", f);
    }
    // Nothing but the two allowed GETs reached a server.
    assert_eq!(
        srv.seen(),
        vec![
            "http GET /pub/a auth=none".to_owned(),
            "https GET /pub/a auth=none".to_owned()
        ]
    );
    // The long path: 200 bytes in the log line and the reason header,
    // 2 KiB in the audit record, each with the original length.
    let a199 = "a".repeat(199);
    assert_eq!(
        got("long"),
        format!("ok 403 denied GET 127.0.0.2:{h}/{a199}...(40001 bytes) (no rule)\n")
    );
    assert_has(
        &log,
        &format!("nix-hatch proxy: deny GET 127.0.0.2:{h}/{a199}...(40001 bytes) (no rule)\n"),
        "build log",
    );
    let audit = read(env.state_dir().join(nix_hatch::proxy::audit::AUDIT_FILE));
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let long = records
        .iter()
        .find(|r| r["host"] == "127.0.0.2")
        .expect("the long path's record");
    assert_eq!(long["clipped"]["path"], 40001);
    assert_eq!(
        long["path"].as_str().unwrap(),
        format!("/{}…", "a".repeat(2047))
    );
    assert!(audit.lines().all(|l| l.len() < 8192), "a long audit line");
    assert_eq!(
        records
            .iter()
            .filter(|r| r["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("ambiguous path")))
            .count(),
        2 * variants.len()
    );
}

#[test]
fn direct_connections_bypassing_the_proxy_fail() {
    let env = TestEnv::new("proxy-bypass");
    let srv = start_servers(&env, "unused");
    proxy_config(&env, &srv, "allow = [ { host = 'localhost' } ]\n");
    let (h, s) = (srv.http, srv.https);
    let p = nix_hatch::proxy::PORT;
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r wget -q -O - http://localhost:{h}/pub/a > $out/via-proxy
    unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY
    r wget -q -O - http://127.0.0.1:{h}/pub/a > $out/direct-http
    r wget -q -O - http://localhost:{h}/pub/a > $out/direct-localhost
    r {CURL} --noproxy '*' https://localhost:{s}/pub/a > $out/direct-https
    r nc -w 3 127.0.0.1 {h} < /dev/null > $out/direct-nc
    r wget -q -O - http://127.0.0.1:{p}/ > $out/proxy-origin-form
    tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > $out/interfaces
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    assert_eq!(got("via-proxy"), "ok pub-a over http \n");
    for f in [
        "direct-http",
        "direct-localhost",
        "direct-https",
        "direct-nc",
    ] {
        let v = got(f);
        assert!(v.starts_with("fail"), "{f}: {v}");
    }
    // The proxy itself is no web server.
    assert_has(&got("proxy-origin-form"), "400", "origin-form request");
    assert_eq!(got("interfaces"), "lo\n");
    // Only the proxied request reached the server.
    assert_eq!(srv.seen(), vec!["http GET /pub/a auth=none".to_owned()]);
    assert_has(&log, "nix-hatch proxy: error: GET /", "build log");
}

#[test]
fn credentials_are_injected_and_never_reach_the_jail() {
    let env = TestEnv::new("proxy-cred");
    let secret = format!("nhsecret{}", nonce());
    let srv = start_servers(&env, &secret);
    let value_file = env.path("token");
    fs::write(&value_file, format!("{secret}\n")).unwrap();
    fs::set_permissions(&value_file, fs::Permissions::from_mode(0o600)).unwrap();
    proxy_config(
        &env,
        &srv,
        &format!(
            "allow = [ {{ host = 'localhost' }} ]\n[[executors.px.credentials]]\nhost = 'localhost'\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue-file = {}\n",
            toml_str(&value_file.to_string_lossy())
        ),
    );
    let (h, s) = (srv.http, srv.https);
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r {CURL} https://localhost:{s}/secret > $out/https
    r {CURL} -H 'Authorization: Bearer forged' https://localhost:{s}/secret > $out/forged
    r {CURL_REASON} -X TRACE https://localhost:{s}/secret > $out/trace
    r {CURL_REASON} -X TRACE http://localhost:{h}/secret > $out/trace-http
    r cat {vf} > $out/value-file
    env > $out/env
    mkdir $out/jail
    for d in /etc /build /tmp; do tar -cf $out/jail/$(echo $d | tr / _).tar $d 2>/dev/null; done
    cat /proc/self/environ > $out/environ
"#,
            vf = value_file.display()
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    assert_eq!(got("https"), "ok authorized over https \n");
    // A header the build sets is replaced by the credential.
    assert_eq!(got("forged"), "ok authorized over https \n");
    // TRACE would have the server echo the credential back: refused.
    for f in ["trace", "trace-http"] {
        let g = got(f);
        assert!(g.starts_with("ok 403 denied TRACE "), "{f}: {g}");
    }
    assert_has(&got("value-file"), "fail", "value file in the jail");
    let seen = srv.seen();
    assert_eq!(
        seen.iter()
            .filter(|l| l.ends_with("/secret auth=ok"))
            .count(),
        2,
        "{seen:#?}"
    );
    assert!(!seen.iter().any(|l| l.contains("TRACE")), "{seen:#?}");
    assert_has(
        &log,
        &format!(
            "nix-hatch proxy: allow CONNECT localhost:{s} (intercept; credential: authorization)"
        ),
        "build log",
    );
    // No trace of the secret: outputs (env, environ, /etc, /build, /tmp
    // of the jail), the build log, the audit file, the staging area.
    let grep = run(
        std::process::Command::new("grep")
            .args(["-r", "-a", "-l", &secret])
            .arg(&out)
            .arg(env.state_dir()),
        Duration::from_secs(60),
    );
    assert_eq!(grep.stdout, "", "secret found in: {}", grep.stdout);
    assert!(!log.contains(&secret), "secret in the build log");
    let jail_env = got("env");
    assert_has(
        &jail_env,
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        "env",
    );
    assert!(!jail_env.contains(&secret));
}

/// A credential goes only into requests the proxy sends upstream over
/// TLS: a plain `http://` request to its host still goes out, without it,
/// and the build log and the audit record name the header withheld. A
/// credential with `plain-http = true` is sent over plain HTTP too.
/// Finding 4 of the security review (issue 14): a credential matching a
/// host went out on plain `http://` requests too, in cleartext.
#[test]
fn credentials_are_withheld_from_plain_http_unless_plain_http_is_set() {
    let env = TestEnv::new("proxy-cred-plain");
    let secret = format!("nhsecret{}", nonce());
    let srv = start_servers(&env, &secret);
    let value_file = env.path("token");
    fs::write(&value_file, format!("{secret}\n")).unwrap();
    fs::set_permissions(&value_file, fs::Permissions::from_mode(0o600)).unwrap();
    let vf = toml_str(&value_file.to_string_lossy());
    proxy_config(
        &env,
        &srv,
        &format!(
            r#"allow = [ {{ host = 'localhost' }}, {{ host = '127\.0\.0\.1' }} ]
allowed-users = ["nhtest-mallory"]
[[executors.px.credentials]]
host = 'localhost'
header = "Authorization"
prefix = "Bearer "
value-file = {vf}
[[executors.px.credentials]]
host = '127\.0\.0\.1'
header = "Authorization"
prefix = "Bearer "
value-file = {vf}
plain-http = true
"#
        ),
    );
    let (h, s) = (srv.http, srv.https);
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r {CURL_REASON} http://localhost:{h}/secret > $out/withheld
    r {CURL} https://localhost:{s}/secret > $out/tls
    r {CURL} http://127.0.0.1:{h}/secret > $out/plain-http
"#
        ),
    );
    // As on a shared build machine: an unprivileged account asks, through
    // the daemon.
    test_account("nhtest-mallory", &[]);
    let (out, log) = build_probe_by(&env, &e, Some("nhtest-mallory"));
    let got = |f: &str| read(format!("{out}/{f}"));
    // The server answered the plain request itself: it got no credential.
    assert_eq!(got("withheld"), "ok 401 \n");
    assert_eq!(got("tls"), "ok authorized over https \n");
    assert_eq!(got("plain-http"), "ok authorized over http \n");
    assert_eq!(
        srv.seen(),
        vec![
            "http GET /secret auth=none".to_owned(),
            "https GET /secret auth=ok".to_owned(),
            "http GET /secret auth=ok".to_owned(),
        ]
    );
    assert_has(
        &log,
        &format!(
            "nix-hatch proxy: allow GET localhost:{h}/secret (credential withheld, not TLS: authorization)\n"
        ),
        "build log",
    );
    assert_has(
        &log,
        &format!("nix-hatch proxy: allow GET 127.0.0.1:{h}/secret (credential: authorization)\n"),
        "build log",
    );
    let audit = read(env.state_dir().join(nix_hatch::proxy::audit::AUDIT_FILE));
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let plain = |host: &str| {
        records
            .iter()
            .find(|r| r["scheme"] == "http" && r["host"] == host)
            .unwrap_or_else(|| panic!("no record for http://{host}: {audit}"))
    };
    let withheld = plain("localhost");
    assert_eq!(withheld["decision"], "allow");
    assert_eq!(withheld["credentials_withheld"][0], "authorization");
    assert_eq!(withheld["reason"], "credential withheld, not TLS");
    assert!(withheld.get("credentials").is_none(), "{withheld}");
    let sent = plain("127.0.0.1");
    assert_eq!(sent["credentials"][0], "authorization");
    assert!(sent.get("credentials_withheld").is_none(), "{sent}");
    assert!(!log.contains(&secret), "secret in the build log");
    assert!(!audit.contains(&secret), "secret in the audit file");
    // The build's own record (issue 16): who, and the proxy's counts; no
    // secret either.
    let escapes = read(env.state_dir().join("audit.jsonl"));
    assert!(!escapes.contains(&secret), "secret in the escape audit log");
    let rec: serde_json::Value = serde_json::from_str(escapes.lines().last().unwrap()).unwrap();
    assert_eq!(rec["user"], "nhtest-mallory", "{rec}");
    assert_eq!(rec["result"], "built", "{rec}");
    assert!(rec["proxy"]["allowed"].as_u64().unwrap() >= 3, "{rec}");
    assert_eq!(rec["proxy"]["denied"], 0, "{rec}");
}

/// A rule with `methods = ["GET"]` allows the GET, but the server never
/// sees a method-override header that would make it a DELETE: neither
/// over plain HTTP nor inside the intercepted TLS connection. Under a rule
/// without `methods` the header passes like any other.
#[test]
fn method_overrides_never_reach_the_server_under_a_method_rule() {
    let env = TestEnv::new("proxy-override");
    let srv = start_servers(&env, "unused");
    proxy_config(
        &env,
        &srv,
        "allow = [ { host = '127\\.0\\.0\\.1', methods = [\"GET\"] }, { host = 'localhost' } ]\n",
    );
    let (h, s) = (srv.http, srv.https);
    let o = "-H 'X-HTTP-Method-Override: DELETE' -H 'x-method-override: DELETE'";
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r {CURL} {o} http://127.0.0.1:{h}/pub/a > $out/http
    r {CURL} {o} https://127.0.0.1:{s}/pub/a > $out/https
    r {CURL} {o} http://localhost:{h}/pub/a > $out/unrestricted
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    for f in ["http", "https", "unrestricted"] {
        assert!(got(f).starts_with("ok pub-a over http"), "{f}: {}", got(f));
    }
    assert_eq!(
        srv.seen(),
        vec![
            "http GET /pub/a auth=none".to_owned(),
            "https GET /pub/a auth=none".to_owned(),
            "http GET /pub/a auth=none override=DELETE override=DELETE".to_owned(),
        ]
    );
    for shown in [format!("127.0.0.1:{h}"), format!("https://127.0.0.1:{s}")] {
        assert_has(
            &log,
            &format!("nix-hatch proxy: allow GET {shown}/pub/a (method override removed (rule 1 restricts methods): x-http-method-override, x-method-override)\n"),
            "build log",
        );
    }
    let audit = read(env.state_dir().join(nix_hatch::proxy::audit::AUDIT_FILE));
    let removed: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r.get("removed_headers").cloned())
        .collect();
    assert_eq!(
        removed,
        vec![serde_json::json!(["x-http-method-override", "x-method-override"]); 2]
    );
}

/// The proxy connects from the host's network: `{ host = '.*' }` must not
/// hand the build the host's own services. With that rule alone, the test
/// servers on the host's 127.0.0.1 (also as `localhost` and `[::1]`) and
/// the metadata address are refused, over HTTP and CONNECT, with the
/// reason; a later rule `127\.0\.0\.1` names the address literally and
/// reaches them.
#[test]
fn a_pattern_rule_does_not_reach_this_machine() {
    let env = TestEnv::new("proxy-local");
    let srv = start_servers(&env, "unused");
    proxy_config(&env, &srv, "allow = [ { host = '.*' } ]\n");
    let (h, s) = (srv.http, srv.https);
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r {CURL_REASON} http://127.0.0.1:{h}/pub/a > $out/http
    r {CURL} https://127.0.0.1:{s}/pub/a > $out/https
    r {CURL_REASON} http://localhost:{h}/pub/a > $out/localhost
    r {CURL_REASON} 'http://[::1]:{h}/pub/a' > $out/ipv6
    r {CURL_REASON} http://169.254.169.254/latest/meta-data/ > $out/metadata
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    let why = "(this machine or link-local: a rule must name this host literally)";
    for (f, shown) in [
        ("http", format!("127.0.0.1:{h}/pub/a")),
        ("localhost", format!("localhost:{h}/pub/a")),
        ("ipv6", format!("[::1]:{h}/pub/a")),
        ("metadata", "169.254.169.254/latest/meta-data/".to_owned()),
    ] {
        assert_eq!(got(f), format!("ok 403 denied GET {shown} {why}\n"), "{f}");
        assert_has(
            &log,
            &format!("nix-hatch proxy: deny GET {shown} {why}\n"),
            "build log",
        );
    }
    let https = got("https");
    assert!(
        https.starts_with("fail") && https.contains("403"),
        "{https}"
    );
    assert_has(
        &log,
        &format!("nix-hatch proxy: deny CONNECT 127.0.0.1:{s} {why}\n"),
        "build log",
    );
    assert_eq!(srv.seen(), Vec::<String>::new());

    // A rule naming the address literally reaches it, after `.*` too.
    proxy_config(
        &env,
        &srv,
        "allow = [ { host = '.*' }, { host = '127\\.0\\.0\\.1' } ]\n",
    );
    let e = probe_expr(
        &env,
        &format!(
            r#"
    r {CURL} http://127.0.0.1:{h}/pub/a > $out/http
    r {CURL} https://127.0.0.1:{s}/pub/a > $out/https
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    assert_eq!(got("http"), "ok pub-a over http \n");
    assert_eq!(got("https"), "ok pub-a over https \n");
    assert_has(
        &log,
        &format!("nix-hatch proxy: allow CONNECT 127.0.0.1:{s} (tunnel)\n"),
        "build log",
    );
    // Both allowed by rule 2, the literal one.
    let audit = read(env.state_dir().join(nix_hatch::proxy::audit::AUDIT_FILE));
    let allowed: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["decision"] == "allow")
        .map(|r| r["rule"].clone())
        .collect();
    assert_eq!(allowed, vec![serde_json::json!(2); 2], "{audit}");
    assert_eq!(
        srv.seen(),
        vec![
            "http GET /pub/a auth=none".to_owned(),
            "https GET /pub/a auth=none".to_owned()
        ]
    );
}

#[test]
fn bad_traffic_does_not_stop_a_concurrent_download() {
    let env = TestEnv::new("proxy-bad");
    let srv = start_servers(&env, "unused");
    proxy_config(&env, &srv, "allow = [ { host = 'localhost' } ]\n");
    let h = srv.http;
    let p = nix_hatch::proxy::PORT;
    let e = probe_expr(
        &env,
        &format!(
            r#"
    # A client that never finishes its request header (held open 13s).
    ( printf 'GET http://localhost:{h}/pub/a HTTP/1.1\r\nHost: localhost\r\nX-Slow: '; sleep 13 ) | nc 127.0.0.1 {p} > $out/slow &
    slow=$!
    # A kept-alive connection that goes idle after one answered request.
    ( printf 'GET http://localhost:{h}/pub/a HTTP/1.1\r\nHost: localhost\r\n\r\n'; sleep 12 ) | nc 127.0.0.1 {p} > $out/keepalive &
    keepalive=$!
    sleep 1
    # The download starts, and while it runs, garbage and a huge header.
    wget -q -O $TMPDIR/dl http://localhost:{h}/slow &
    dl=$!
    sleep 0.3
    printf 'THIS IS NOT HTTP\r\n\r\n' | nc -w 5 127.0.0.1 {p} > $out/malformed
    ( printf 'GET http://localhost:{h}/pub/a HTTP/1.1\r\nHost: localhost\r\nX-Big: '; head -c 100000 /dev/zero | tr '\0' a; printf '\r\n\r\n' ) | nc -w 5 127.0.0.1 {p} > $out/oversized
    r wget -q -O - http://localhost:{h}/pub/a > $out/meanwhile
    wait $dl; echo "download exit $?" > $out/download
    sha256sum < $TMPDIR/dl | cut -d' ' -f1 >> $out/download
    wc -c < $TMPDIR/dl >> $out/download
    wait $slow
    wait $keepalive
"#
        ),
    );
    let (out, log) = build_probe(&env, &e);
    let got = |f: &str| read(format!("{out}/{f}"));
    let expected: Vec<u8> = (0..SLOW_LEN).map(slow_byte).collect();
    let sha = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&expected);
        d.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    assert_eq!(
        got("download"),
        format!("download exit 0\n{sha}\n{SLOW_LEN}\n")
    );
    assert_eq!(got("meanwhile"), "ok pub-a over http \n");
    assert_has(&got("malformed"), "400", "malformed answer");
    assert_has(&got("oversized"), "431", "oversized answer");
    assert_has(
        &log,
        "nix-hatch proxy: error: a connection from the build: malformed request",
        "log",
    );
    assert_has(
        &log,
        "nix-hatch proxy: error: a connection from the build: request header larger than 65536 bytes",
        "log",
    );
    assert_has(
        &log,
        "nix-hatch proxy: error: a connection from the build: no complete request header within 10s",
        "log",
    );
    // The idle kept-alive connection was answered, and its close is not an
    // error: the one header-timeout line is the slow client's.
    let kept = got("keepalive");
    assert_has(&kept, "200 OK", "keep-alive answer");
    assert_has(&kept, "pub-a over http", "keep-alive answer");
    assert_eq!(
        log.matches("no complete request header").count(),
        1,
        "log:\n{log}"
    );
    // The slow request was never forwarded: /pub/a came from the
    // `meanwhile` fetch and the kept-alive connection only.
    let seen = srv.seen();
    assert_eq!(
        seen.iter()
            .filter(|l| l.as_str() == "http GET /pub/a auth=none")
            .count(),
        2,
        "{seen:#?}"
    );
}

#[test]
fn check_validates_rules_and_value_files() {
    let env = TestEnv::new("proxy-check");
    let token = env.path("token");
    fs::write(&token, "x").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = format!(
        "state-dir = {}\n[routes]\nescape-p = \"px\"\n[executors.px]\nkind = \"jail\"\nnetwork = \"proxy\"\nallow = [ {{ host = '(unclosed' }} ]\n[[executors.px.credentials]]\nhost = 'x'\nheader = \"Authorization\"\nvalue-file = {}\n",
        toml_str(&env.state_dir().to_string_lossy()),
        toml_str(&token.to_string_lossy())
    );
    env.write_config(&cfg);
    let check = |env: &TestEnv| {
        run(
            std::process::Command::new(cli_bin())
                .args(["check", "--config"])
                .arg(env.config_path()),
            Duration::from_secs(60),
        )
    };
    let out = check(&env);
    out.assert_failed();
    assert_has(
        &out.stdout,
        "error: executors.px.allow[0]: invalid regex \"(unclosed\"",
        "check",
    );
    // Fix the regex: now the file's permissions are the problem.
    env.write_config(&cfg.replace("(unclosed", "x"));
    let out = check(&env);
    out.assert_failed();
    assert_has(
        &out.stdout,
        "error: executors.px.credentials[0].value-file:",
        "check",
    );
    assert_has(
        &out.stdout,
        "must not be group or world accessible",
        "check",
    );
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    check(&env).assert_ok();
}
