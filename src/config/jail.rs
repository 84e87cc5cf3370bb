//! `kind = "jail"`: the derivation's own builder in bubblewrap, with
//! exactly the powers these keys grant (network, binds, devices, the
//! daemon socket); the policy proxy's keys are read by [`super::proxy`].

use std::path::PathBuf;

use super::keys::{Keys, Problem, Problems};
use super::proxy::{self, ProxySettings};

/// The derivation's own builder in bubblewrap with exactly these powers.
#[derive(Debug, Clone)]
pub struct JailExecutor {
    pub network: Network,
    /// Extra host paths, read-only.
    pub ro_binds: Vec<Bind>,
    /// Device nodes bound in read-write.
    pub devices: Vec<PathBuf>,
    /// Bind the daemon socket in (recursive Nix).
    pub nix_daemon: bool,
    pub daemon_socket: PathBuf,
    /// The bubblewrap program.
    pub bwrap: PathBuf,
    /// Rules, credentials and trust store of the policy proxy; `Some`
    /// exactly when `network = "proxy"`.
    pub proxy: Option<ProxySettings>,
    /// `tmp-size`: the build dir and /tmp are each a tmpfs of this many
    /// bytes; `None`: directories on the state dir's file system.
    pub tmp_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Own namespace, loopback only.
    None,
    /// The host's network.
    Host,
    /// Own namespace, loopback only; the one way out is the policy proxy.
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Bind {
    /// `"src"` or `"src:dst"`, both absolute.
    pub fn parse(s: &str) -> Result<Bind, Problem> {
        let (src, dst) = match s.split_once(':') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        if !src.starts_with('/') || !dst.starts_with('/') {
            return Err(Problem(format!(
                "{s:?}: paths must be absolute (\"src\" or \"src:dst\")"
            )));
        }
        if dst == "/" || dst.split('/').any(|c| c == "..") {
            return Err(Problem(format!(
                "{s:?}: the destination must be a path below / without \"..\""
            )));
        }
        Ok(Bind {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
        })
    }
}

pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// Reads the keys of a `kind = "jail"` executor that runs as `user`.
pub(super) fn parse(ctx: &str, k: &mut Keys, p: &mut Problems, user: &str) -> Option<JailExecutor> {
    if user == "root" || user == "0" {
        p.push(format!(
            "{ctx}.user: a jail never runs its builder as root; name an unprivileged account"
        ));
    }
    let network = match k.string(p, "network").as_deref() {
        None | Some("none") => Network::None,
        Some("host") => Network::Host,
        Some("proxy") => Network::Proxy,
        Some(other) => {
            p.push(format!(
                "{ctx}.network: expected \"none\", \"proxy\" or \"host\", got {other:?}"
            ));
            Network::None
        }
    };
    let mut ro_binds = Vec::new();
    for b in k.string_list(p, "ro-binds").unwrap_or_default() {
        match Bind::parse(&b) {
            Ok(b) => ro_binds.push(b),
            Err(e) => p.push(format!("{ctx}.ro-binds: {e}")),
        }
    }
    let mut devices = Vec::new();
    for d in k.string_list(p, "devices").unwrap_or_default() {
        if d.starts_with("/dev/") && !d.split('/').any(|c| c == "..") {
            devices.push(PathBuf::from(d));
        } else {
            p.push(format!("{ctx}.devices: {d:?} is not a path under /dev"));
        }
    }
    let nix_daemon = k.bool(p, "nix-daemon").unwrap_or(false);
    let daemon_socket = k
        .string(p, "daemon-socket")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_SOCKET));
    let bwrap = k
        .string(p, "bwrap")
        .map(PathBuf::from)
        .unwrap_or_else(find_bwrap);
    let proxy = proxy::parse(ctx, k, p, network == Network::Proxy);
    let tmp_size = k.size(p, "tmp-size");
    Some(JailExecutor {
        network,
        ro_binds,
        devices,
        nix_daemon,
        daemon_socket,
        bwrap,
        proxy,
        tmp_size,
    })
}

/// `bwrap` from PATH, else Debian's location (the daemon's PATH may be bare).
fn find_bwrap() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("bwrap");
            if c.is_file() {
                return c;
            }
        }
    }
    PathBuf::from("/usr/bin/bwrap")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;
    use crate::config::ExecutorKind;

    #[test]
    fn jail_config() {
        let c = parse(
            r#"
[routes]
escape-f = "f"
[executors.f]
kind = "jail"
network = "host"
ro-binds = ["/etc/ssl/certs", "/opt/x:/x"]
devices = ["/dev/kvm"]
nix-daemon = true
"#,
        )
        .unwrap();
        let e = &c.executors["f"];
        assert_eq!(e.user, "nobody");
        let ExecutorKind::Jail(j) = &e.kind else {
            panic!("not a jail")
        };
        assert_eq!(j.network, Network::Host);
        assert_eq!(
            j.ro_binds[1],
            Bind {
                src: "/opt/x".into(),
                dst: "/x".into()
            }
        );
        assert_eq!(j.devices, vec![PathBuf::from("/dev/kvm")]);
        assert!(j.nix_daemon);
        let errs = parse(
            "[executors.f]\nkind = \"jail\"\nuser = \"root\"\nnetwork = \"wifi\"\nro-binds = [\"rel\"]\ndevices = [\"/etc/passwd\"]\n",
        )
        .unwrap_err();
        for w in [
            "never runs its builder as root",
            "network: expected",
            "ro-binds: \"rel\"",
            "devices: \"/etc/passwd\"",
        ] {
            assert!(errs.iter().any(|e| e.contains(w)), "{w} not in {errs:?}");
        }
    }
}
