//! Benchmark fixture for `scripts/bench proxy`: an HTTPS server on the
//! loopback serving `/big` (`--size` bytes), and two nix-hatch proxies as a
//! jailed build meets them (each in a network namespace of its own, on
//! 127.0.0.1:3128): one whose rule lets `localhost` through as a blind
//! CONNECT tunnel, one whose path rule makes it intercept (TLS terminated
//! with the per-build CA and re-encrypted upstream).
//!
//! Prints one line of shell assignments (server port, CA files, each
//! proxy's namespace as a `/proc/PID/fd/N` path for `nsenter --net=`) and
//! serves until its standard input ends. Needs root (namespaces).

#[path = "../tests/common/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::io::Read;
use std::os::fd::AsRawFd;
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

fn main() {
    let mut size: usize = 256 << 20;
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                size = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--size BYTES")
            }
            "--dir" => dir = args.next().expect("--dir DIR").into(),
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
    let server_port = {
        let _g = server_rt.enter();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        server_rt.spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let (tls, chunk) = (tls.clone(), chunk.clone());
                tokio::spawn(async move {
                    let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(s).await else {
                        return;
                    };
                    let svc = service_fn(move |_req| {
                        let chunk = chunk.clone();
                        async move {
                            Ok::<_, Infallible>(Response::new(Big { left: size, chunk }.boxed()))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        port
    };

    // The two proxies, on the runtime a build's proxy uses, each listening
    // where a jailed build finds it: 127.0.0.1:3128 in a network namespace
    // of its own made as the hook makes it (proxy::netns), connecting
    // upstream from this one.
    let rt = proxy::runtime().unwrap();
    let mut line = format!(
        "SERVER_PORT={server_port} UPSTREAM_CA={}",
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
        let (shared, bundle) = proxy::shared(&settings, Events::log_only(None), "bench").unwrap();
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
    println!("{line}");
    // Serve until stdin ends.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
