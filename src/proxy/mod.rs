//! The network policy proxy for `network = "proxy"` jails (docs/architecture.md,
//! "Jail contract"): the jail's network namespace has only loopback, and
//! the one way out is this build's proxy, listening on 127.0.0.1:3128 in
//! that namespace and announced in `http_proxy`/`https_proxy` (and the
//! upper-case forms). Default deny; every decision is a build-log line and
//! an audit record; credentials are added on the way out (to requests
//! that leave over TLS, unless a credential sets `plain-http`) and never
//! enter the jail.
//!
//! Modules, one responsibility each: `netns` (namespace and listener),
//! `server` (accept loop, limits), `rules` (the policy), `forward` (plain
//! HTTP), `tunnel` (CONNECT), `intercept` + `ca` (TLS interception with a
//! per-build CA), `credentials`, `audit`. The executor's keys (rules,
//! credentials, trust store) are read by `config::proxy`.
//!
//! Errors: `anyhow`, each one line with its cause written in (callers show
//! it with `{}`: the build fails with it, `nix-hatch check` lists it, a
//! refused upstream connection becomes the request's decision). Nothing
//! tells one failure from another, so no error enum.

pub mod audit;
pub mod ca;
pub mod conn;
pub mod credentials;
pub mod forward;
pub mod intercept;
pub mod netns;
pub mod rules;
pub mod server;
pub mod tunnel;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

use crate::config::proxy::ProxySettings;

/// The proxy's port inside the jail (each jail has its own namespace, so
/// a fixed port never collides).
pub const PORT: u16 = 3128;
/// Where the CA bundle (per-build CA + upstream bundle) appears in the jail.
pub const JAIL_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the proxy needs to know about the build.
pub struct BuildInfo<'a> {
    pub drv: &'a str,
    pub executor: &'a str,
    pub state_dir: &'a Path,
    /// A root-owned private directory for this build (the CA bundle goes here).
    pub staging_root: &'a Path,
}

/// A running proxy for one jailed build.
pub struct Proxy {
    runtime: Option<tokio::runtime::Runtime>,
    net: netns::JailNet,
    log_read: File,
    counts: Arc<audit::Counts>,
    /// Host path of the CA bundle to bind at [`JAIL_CA_FILE`].
    pub ca_bundle: PathBuf,
}

/// The shared state of a proxy from its settings: credentials loaded,
/// a fresh CA, the upstream trust store.
pub fn shared(
    settings: &ProxySettings,
    events: audit::Events,
    label: &str,
) -> anyhow::Result<(conn::Shared, String)> {
    let credentials = credentials::load(&settings.credentials)?;
    let ca = ca::Authority::generate(label)?;
    let (upstream_tls, upstream_pem) = ca::upstream_config(settings.upstream_ca_path())
        .map_err(|e| anyhow!("upstream trust store: {e}"))?;
    let jail_bundle = format!("{}\n{upstream_pem}", ca.ca_pem());
    Ok((
        conn::Shared {
            policy: rules::Policy {
                rules: settings.rules.clone(),
            },
            credentials,
            ca,
            upstream_tls,
            events,
        },
        jail_bundle,
    ))
}

/// A multi-threaded runtime for a proxy. Its threads are created from the
/// calling thread, so they live in the host's network namespace.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nix-hatch-proxy")
        .enable_io()
        .enable_time()
        .build()
}

impl Proxy {
    pub fn start(settings: &ProxySettings, info: &BuildInfo) -> anyhow::Result<Proxy> {
        let (log_read, log_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| anyhow!("proxy log pipe: {e}"))?;
        let events = audit::Events::new(
            Some(File::from(log_write)),
            info.state_dir,
            info.drv,
            info.executor,
        )?;
        let counts = events.counts();
        let label = info
            .drv
            .rsplit('/')
            .next()
            .unwrap_or(info.drv)
            .trim_end_matches(".drv");
        let (shared, jail_bundle) = shared(settings, events, label)?;
        let ca_bundle = info.staging_root.join("proxy-ca.crt");
        std::fs::write(&ca_bundle, jail_bundle)
            .map_err(|e| anyhow!("writing {}: {e}", ca_bundle.display()))?;
        let _ = std::fs::set_permissions(&ca_bundle, std::fs::Permissions::from_mode(0o644));
        let net = netns::JailNet::create(PORT).map_err(|e| anyhow!("proxy network: {e}"))?;
        let runtime = runtime().map_err(|e| anyhow!("starting the proxy: {e}"))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(net.listener.try_clone()?)
                .map_err(|e| anyhow!("proxy listener: {e}"))?
        };
        runtime.spawn(server::serve(listener, Arc::new(shared)));
        Ok(Proxy {
            runtime: Some(runtime),
            net,
            log_read: File::from(log_read),
            counts,
            ca_bundle,
        })
    }

    /// The variables that point the build at the proxy and its CA.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let url = format!("http://127.0.0.1:{PORT}");
        let mut v: Vec<(&'static str, String)> =
            ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]
                .into_iter()
                .map(|k| (k, url.clone()))
                .collect();
        for k in [
            "SSL_CERT_FILE",
            "NIX_SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "REQUESTS_CA_BUNDLE",
        ] {
            v.push((k, JAIL_CA_FILE.to_owned()));
        }
        v
    }

    /// Variables the proxy owns; whatever the derivation says, they are
    /// replaced (`no_proxy` would let a client try to bypass it).
    pub const REMOVED_ENV: &'static [&'static str] =
        &["no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"];

    /// Starts `cmd` in the jail's network namespace (call before the
    /// privilege drop is registered).
    pub fn enter_on_spawn(&self, cmd: &mut Command) -> io::Result<()> {
        self.net.enter_on_spawn(cmd)
    }

    /// (allowed, denied) requests so far.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counts.allowed.load(Relaxed),
            self.counts.denied.load(Relaxed),
        )
    }

    /// The read end of the decision lines, for the supervisor to copy into
    /// the build log while the builder runs.
    pub fn log_reader(&mut self) -> &mut File {
        &mut self.log_read
    }

    /// Stops serving and returns the lines not yet copied to the log.
    pub fn stop(mut self) -> Vec<u8> {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        // The write end went with the runtime; never block on a straggler.
        if let Ok(flags) = nix::fcntl::fcntl(&self.log_read, nix::fcntl::FcntlArg::F_GETFL) {
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            let _ = nix::fcntl::fcntl(&self.log_read, nix::fcntl::FcntlArg::F_SETFL(flags));
        }
        let mut rest = Vec::new();
        let _ = self.log_read.read_to_end(&mut rest);
        rest
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
