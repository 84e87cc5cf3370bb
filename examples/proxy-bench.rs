//! Benchmark fixture for `scripts/bench proxy-*`: an HTTPS server on the
//! loopback serving `/big` (`--size` bytes), a plain HTTP server answering
//! every request with `--small` bytes (keep-alive), and two nix-hatch
//! proxies as a jailed build meets them (each in a network namespace of
//! its own, on 127.0.0.1:3128, its decisions written to a log pipe and an
//! audit file as in a build): one whose rule lets `localhost` through (a
//! blind CONNECT tunnel, plain requests forwarded), one whose path rule
//! makes it intercept (TLS terminated with the per-build CA and
//! re-encrypted upstream). With `--tinyproxy PATH` also tinyproxy, the
//! peer, twice, on loopback ports of this namespace with the equivalent
//! allow filter (`^localhost$`, default deny, CONNECT to the server's port
//! only), as its Debian package runs it (own account, a log file): at
//! `LogLevel Warning` and at Debian's `Info`.
//!
//! Prints one line of shell assignments (ports, CA files, each proxy's
//! namespace as a `/proc/PID/fd/N` path for `nsenter --net=`, tinyproxy's
//! PID) and serves until its standard input ends. Needs root (namespaces).

#[path = "../tests/common/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame};
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use nix_hatch::config::proxy::{ProxySettings, Rule};
use nix_hatch::proxy::{self, audit::Events};

const CHUNK: usize = 1024 * 1024;

struct Big {
    left: usize,
    chunk: Bytes,
}

impl hyper::body::Body for Big {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left as u64)
    }
}

/// A free loopback port (bound, then released for the peer to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tinyproxy in the foreground, configured as its users allow a single
/// host: a filter file, `FilterDefaultDeny`, CONNECT to `connect_port`
/// only, logging at `log_level` to a file; running as its Debian account
/// `tinyproxy` when that exists. Stopped by `main` when its input ends
/// (a parent-death signal does not survive tinyproxy's change of user).
fn tinyproxy(
    exe: &Path,
    dir: &Path,
    name: &str,
    log_level: &str,
    connect_port: u16,
) -> (Child, u16) {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let filter = dir.join("filter");
    std::fs::write(&filter, "^localhost$\n").unwrap();
    let account = nix::unistd::User::from_name("tinyproxy").ok().flatten();
    let user = match &account {
        Some(u) => {
            nix::unistd::chown(&dir, Some(u.uid), Some(u.gid)).unwrap();
            format!("User {0}\nGroup {0}\n", u.name)
        }
        None => String::new(),
    };
    let port = free_port();
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "{user}Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\nAllow 127.0.0.1\n\
             LogFile \"{d}/tinyproxy.log\"\nLogLevel {log_level}\nPidFile \"{d}/tinyproxy.pid\"\n\
             Filter \"{f}\"\nFilterType ere\nFilterDefaultDeny Yes\nConnectPort {connect_port}\n",
            d = dir.display(),
            f = filter.display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(exe)
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting tinyproxy");
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("tinyproxy exited: {st} (config {})", conf.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("tinyproxy did not listen on {port}");
}

/// Events as a build's proxy has them: decision lines into a pipe (read
/// here into `dir/NAME-build.log`, as the supervisor copies them into the
/// build log) and records in `dir/state`'s audit file.
fn build_events(dir: &Path, name: &str) -> Events {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let log: PathBuf = dir.join(format!("{name}-build.log"));
    std::thread::spawn(move || {
        let mut out = std::fs::File::create(log).unwrap();
        let _ = std::io::copy(&mut std::fs::File::from(r), &mut out);
    });
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    Events::new(
        Some(std::fs::File::from(w)),
        &state,
        "/nix/store/00000000000000000000000000000000-proxy-bench.drv",
        name,
    )
    .unwrap()
}

fn main() {
    let mut size: usize = 256 << 20;
    let mut small: usize = 4096;
    let mut dir = std::env::temp_dir();
    let mut tinyproxy_exe = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                size = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--size BYTES")
            }
            "--small" => {
                small = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--small BYTES")
            }
            "--dir" => dir = args.next().expect("--dir DIR").into(),
            "--tinyproxy" => {
                tinyproxy_exe = Some(PathBuf::from(args.next().expect("--tinyproxy PATH")))
            }
            other => panic!("unknown argument {other}"),
        }
    }
    // Upstream CA and server certificate.
    let (ca_file, tls) = tls::upstream_tls(
        &dir.join("upstream-ca.pem"),
        "proxy-bench upstream CA",
        &["localhost"],
    );

    // The server gets its own runtime, like a separate process would.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let server_port = serve(&server_rt, move |s| {
        let (tls, chunk) = (tls.clone(), chunk.clone());
        async move {
            let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(s).await else {
                return;
            };
            let svc = service_fn(move |_req| {
                let chunk = chunk.clone();
                async move { Ok::<_, Infallible>(Response::new(Big { left: size, chunk }.boxed())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    });
    // Small answers over plain HTTP, kept alive.
    let small_body = Bytes::from(vec![b's'; small]);
    let small_port = serve(&server_rt, move |s| {
        let body = small_body.clone();
        async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(http_body_util::Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    });

    // The two proxies, on the runtime a build's proxy uses, each listening
    // where a jailed build finds it: 127.0.0.1:3128 in a network namespace
    // of its own made as the hook makes it (proxy::netns), connecting
    // upstream from this one.
    let rt = proxy::runtime().unwrap();
    let mut line = format!(
        "SERVER_PORT={server_port} SMALL_PORT={small_port} UPSTREAM_CA={}",
        ca_file.display()
    );
    let mut namespaces = Vec::new();
    for (name, rule) in [
        ("TUNNEL", Rule::new("localhost", None, None).unwrap()),
        (
            "INTERCEPT",
            Rule::new("localhost", Some("^/"), None).unwrap(),
        ),
    ] {
        let settings = ProxySettings {
            rules: vec![rule],
            credentials: Vec::new(),
            upstream_ca: Some(ca_file.clone()),
        };
        let events = build_events(&dir, &name.to_lowercase());
        let (shared, bundle) = proxy::shared(&settings, events, "bench").unwrap();
        let bundle_file = dir.join(format!("{}-ca.pem", name.to_lowercase()));
        std::fs::write(&bundle_file, bundle).unwrap();
        let net = proxy::netns::JailNet::create(proxy::PORT).unwrap();
        let _g = rt.enter();
        let l = tokio::net::TcpListener::from_std(net.listener.try_clone().unwrap()).unwrap();
        rt.spawn(proxy::server::serve(l, Arc::new(shared)));
        line.push_str(&format!(
            " {name}_NS=/proc/{}/fd/{} {name}_PORT={} {name}_CA={}",
            std::process::id(),
            net.ns_fd().as_raw_fd(),
            proxy::PORT,
            bundle_file.display()
        ));
        namespaces.push(net);
    }
    // tinyproxy at its fastest (only problems logged, `Warning`: no line,
    // hence no fsync, per request) and as Debian configures it (`Info`:
    // every request logged, each line fsynced).
    let mut tinyproxies = Vec::new();
    if let Some(exe) = &tinyproxy_exe {
        for (name, level) in [("TINYPROXY", "Warning"), ("TINYPROXY_INFO", "Info")] {
            let (child, port) = tinyproxy(exe, &dir, &name.to_lowercase(), level, server_port);
            line.push_str(&format!(" {name}_PORT={port} {name}_PID={}", child.id()));
            tinyproxies.push(child);
        }
    }
    println!("{line}");
    // Serve until stdin ends.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    for mut t in tinyproxies {
        let _ = t.kill();
        let _ = t.wait();
    }
}

/// Serves each connection to a new loopback port on `rt` with `conn`;
/// returns the port.
fn serve<F, Fut>(rt: &tokio::runtime::Runtime, conn: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _g = rt.enter();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(conn(s));
        }
    });
    port
}
