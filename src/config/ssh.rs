//! `kind = "ssh"`: the admin's command on another machine, reached over
//! SSH. What `nix-hatch check` verifies on this machine (the key and
//! known-hosts files) is in `cli::check`.

use std::path::PathBuf;

use super::host::check_pass_env;
use super::keys::{Keys, Problems};

pub const DEFAULT_KNOWN_HOSTS: &str = "/etc/ssh/ssh_known_hosts";
pub const DEFAULT_AGENT: &str = "nix-hatch";
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 30;

/// The admin's command on another machine, reached over SSH; the far side
/// runs `nix-hatch agent` (see `executors::ssh::agent`).
#[derive(Debug, Clone)]
pub struct SshExecutor {
    pub host: String,
    pub port: u16,
    /// Private key file (unencrypted; the hook cannot ask for a passphrase).
    pub identity: PathBuf,
    /// OpenSSH known_hosts file; an unknown or changed host key refuses.
    pub known_hosts: PathBuf,
    /// The remote program, run as `<agent> agent`.
    pub agent: String,
    /// The admin's command on the far side; the derivation's `args` are appended.
    pub command: Vec<String>,
    /// Derivation environment variables handed to the command.
    pub pass_env: Vec<String>,
    /// Seconds for TCP connect, handshake and authentication.
    pub connect_timeout: u64,
}

/// The account this process runs as (ssh's default remote user).
pub fn local_user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".to_owned())
}

/// Reads the keys of a `kind = "ssh"` executor; `None` when it cannot be
/// used (the problems say why).
pub(super) fn parse(ctx: &str, k: &mut Keys, p: &mut Problems) -> Option<SshExecutor> {
    let host = k.string(p, "host");
    let port = k.uint(p, "port").unwrap_or(22);
    let identity = k.string(p, "identity");
    let known_hosts = k
        .string(p, "known-hosts")
        .unwrap_or_else(|| DEFAULT_KNOWN_HOSTS.to_owned());
    let agent = k
        .string(p, "agent")
        .unwrap_or_else(|| DEFAULT_AGENT.to_owned());
    let command = k.string_list(p, "command");
    let pass_env = k.string_list(p, "pass-env").unwrap_or_default();
    check_pass_env(ctx, &pass_env, p);
    let connect_timeout = k
        .uint(p, "connect-timeout")
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let mut ok = true;
    let mut bad = |p: &mut Problems, m: String| {
        p.push(m);
        ok = false;
    };
    let host = match host {
        Some(h) if !h.is_empty() && !h.starts_with('-') && !h.contains(char::is_whitespace) => h,
        Some(h) => {
            bad(
                p,
                format!("{ctx}.host: {h:?} is not a host name or address"),
            );
            String::new()
        }
        None => {
            bad(
                p,
                format!("{ctx}: missing `host` (the machine to build on)"),
            );
            String::new()
        }
    };
    if port == 0 || port > 65535 {
        bad(p, format!("{ctx}.port: {port} is not a TCP port"));
    }
    let identity = match identity {
        Some(i) if i.starts_with('/') => PathBuf::from(i),
        Some(i) => {
            bad(
                p,
                format!("{ctx}.identity: must be an absolute path, got {i:?}"),
            );
            PathBuf::new()
        }
        None => {
            bad(
                p,
                format!("{ctx}: missing `identity` (the private key file to log in with)"),
            );
            PathBuf::new()
        }
    };
    if !known_hosts.starts_with('/') {
        bad(
            p,
            format!("{ctx}.known-hosts: must be an absolute path, got {known_hosts:?}"),
        );
    }
    if agent.is_empty() {
        bad(p, format!("{ctx}.agent: must not be empty"));
    }
    let command = match command {
        Some(c) if !c.is_empty() => {
            if !c[0].starts_with('/') {
                bad(
                    p,
                    format!(
                        "{ctx}.command: the program must be an absolute path on the far side, got {:?}",
                        c[0]
                    ),
                );
            }
            c
        }
        Some(_) => {
            bad(p, format!("{ctx}.command: must not be empty"));
            Vec::new()
        }
        None => {
            bad(
                p,
                format!("{ctx}: missing `command` (the admin's program on the far side)"),
            );
            Vec::new()
        }
    };
    if connect_timeout == 0 {
        bad(p, format!("{ctx}.connect-timeout: must be at least 1"));
    }
    ok.then(|| SshExecutor {
        host,
        port: port as u16,
        identity,
        known_hosts: PathBuf::from(known_hosts),
        agent,
        command,
        pass_env,
        connect_timeout,
    })
}
