//! Opening an authenticated SSH session: TCP connect, handshake, strict
//! host-key check against the configured known-hosts file, public-key
//! authentication. Every failure is one line naming the host.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use ssh2::{CheckResult, HostKeyType, KnownHostFileKind, MethodType, Session};

use crate::config::ssh::SshExecutor;

/// An authenticated session and the socket under it (polled directly while
/// the session is non-blocking).
pub struct Connection {
    pub session: Session,
    pub socket: TcpStream,
    /// `user@host:port`, for messages.
    pub target: String,
    /// `ED25519 SHA256:…`
    pub host_key: String,
    /// The cipher negotiated for the server-to-client direction.
    pub cipher: String,
}

/// Ciphers in our order of preference. chacha20-poly1305 first: the
/// vendored libssh2 (vendor/libssh2-sys/NIX-HATCH.md) runs it on libcrypto
/// and decrypts whole packets, while its AES modes call the cipher once
/// per 16-byte block and are several times slower for bulk data.
const CIPHERS: &str = "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr";

pub fn target(s: &SshExecutor, user: &str) -> String {
    format!("{user}@{}", host_port(s))
}

fn host_port(s: &SshExecutor) -> String {
    if s.host.contains(':') {
        format!("[{}]:{}", s.host, s.port)
    } else {
        format!("{}:{}", s.host, s.port)
    }
}

/// Checks that the file parses as an OpenSSH known_hosts file.
pub fn parse_known_hosts(path: &Path) -> Result<u32, String> {
    let session = Session::new().map_err(|e| format!("libssh2: {e}"))?;
    let mut kh = session.known_hosts().map_err(|e| format!("libssh2: {e}"))?;
    kh.read_file(path, KnownHostFileKind::OpenSSH)
        .map_err(|e| format!("{}: cannot parse: {}", path.display(), e.message()))
}

pub fn connect(s: &SshExecutor, user: &str) -> Result<Connection, String> {
    let target = target(s, user);
    let hp = host_port(s);
    let limit = Duration::from_secs(s.connect_timeout);
    let addrs: Vec<_> = (s.host.as_str(), s.port)
        .to_socket_addrs()
        .map_err(|e| format!("ssh {target}: cannot resolve {}: {e}", s.host))?
        .collect();
    let mut last_err = None;
    let mut socket = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, limit) {
            Ok(t) => {
                socket = Some(t);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let socket = socket.ok_or_else(|| match last_err {
        Some(e) => format!("ssh {target}: cannot connect to {hp}: {e}"),
        None => format!("ssh {target}: {} resolves to no address", s.host),
    })?;
    let _ = socket.set_nodelay(true);
    let mut session = Session::new().map_err(|e| format!("ssh {target}: libssh2: {e}"))?;
    session.set_tcp_stream(
        socket
            .try_clone()
            .map_err(|e| format!("ssh {target}: {e}"))?,
    );
    session.set_timeout(limit.as_millis().min(u32::MAX as u128) as u32);
    // Offer only the host-key algorithms we have keys for (as OpenSSH does),
    // so a server with several host keys presents one we can check.
    if let Some(prefs) = host_key_prefs(&s.known_hosts, s) {
        let _ = session.method_pref(MethodType::HostKey, &prefs);
    }
    for dir in [MethodType::CryptCs, MethodType::CryptSc] {
        session
            .method_pref(dir, CIPHERS)
            .map_err(|e| format!("ssh {target}: libssh2: cipher preferences: {e}"))?;
    }
    session
        .handshake()
        .map_err(|e| format!("ssh {target}: SSH handshake failed: {}", e.message()))?;

    let (key, kind) = session
        .host_key()
        .ok_or_else(|| format!("ssh {target}: the server sent no host key"))?;
    let fingerprint = format!("{} {}", key_kind(kind), fingerprint(key));
    let mut kh = session
        .known_hosts()
        .map_err(|e| format!("ssh {target}: libssh2: {e}"))?;
    kh.read_file(&s.known_hosts, KnownHostFileKind::OpenSSH)
        .map_err(|e| {
            format!(
                "ssh {target}: cannot read known-hosts file {}: {}",
                s.known_hosts.display(),
                e.message()
            )
        })?;
    match kh.check_port(&s.host, s.port, key) {
        CheckResult::Match => {}
        CheckResult::Mismatch => {
            return Err(format!(
                "ssh {target}: host key CHANGED: {hp} presented {fingerprint}, which does not match its entry in {}; refusing to connect (if the key was legitimately replaced, update that file)",
                s.known_hosts.display()
            ))
        }
        CheckResult::NotFound => {
            return Err(format!(
                "ssh {target}: host key UNKNOWN: {hp} presented {fingerprint}, which is not in {}; refusing to connect (verify the fingerprint, then add the key to that file)",
                s.known_hosts.display()
            ))
        }
        CheckResult::Failure => {
            return Err(format!(
                "ssh {target}: could not check host key {fingerprint} against {}",
                s.known_hosts.display()
            ))
        }
    }
    session
        .userauth_pubkey_file(user, None, &s.identity, None)
        .map_err(|e| {
            format!(
                "ssh {target}: authentication with key {} failed: {}{}",
                s.identity.display(),
                e.message(),
                allowed_methods(&session, user)
            )
        })?;
    if !session.authenticated() {
        return Err(format!(
            "ssh {target}: authentication with key {} failed{}",
            s.identity.display(),
            allowed_methods(&session, user)
        ));
    }
    let cipher = session
        .methods(MethodType::CryptSc)
        .unwrap_or("unknown")
        .to_owned();
    Ok(Connection {
        session,
        socket,
        target,
        host_key: fingerprint,
        cipher,
    })
}

fn key_kind(k: HostKeyType) -> &'static str {
    match k {
        HostKeyType::Rsa => "RSA",
        HostKeyType::Dss => "DSA",
        HostKeyType::Ecdsa256 => "ECDSA-256",
        HostKeyType::Ecdsa384 => "ECDSA-384",
        HostKeyType::Ecdsa521 => "ECDSA-521",
        HostKeyType::Ed25519 => "ED25519",
        HostKeyType::Unknown => "unknown-type",
    }
}

/// `SHA256:<base64 without padding>`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &[u8]) -> String {
    format!("SHA256:{}", base64_nopad(&Sha256::digest(key)))
}

fn base64_nopad(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(data)
}

/// What the server still accepts for `user` after a failed attempt, for
/// the error line: libssh2's own message is the same whether the key is
/// not authorized or the server wants another (or a second) method.
fn allowed_methods(session: &Session, user: &str) -> String {
    match session.auth_methods(user) {
        Ok(m) if !m.is_empty() && !m.split(',').any(|x| x == "publickey") => format!(
            " (the server does not take public keys for {user}; it offers: {m})"
        ),
        Ok(m) if !m.is_empty() => format!(
            " (the key is not authorized for {user} there, or another method must follow; the server offers: {m})"
        ),
        _ => String::new(),
    }
}

/// Host-key algorithms for the key types the known-hosts file holds for
/// this host: the server then presents a key we can check, not one of a
/// type that only other hosts' entries have (which libssh2 would call a
/// changed key).
fn host_key_prefs(path: &Path, s: &SshExecutor) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let plain = if s.port == 22 {
        s.host.clone()
    } else {
        format!("[{}]:{}", s.host, s.port)
    };
    let mut types: Vec<&str> = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(mut hosts) = f.next() else { continue };
        if hosts.starts_with('#') {
            continue;
        }
        if hosts.starts_with('@') {
            // @revoked / @cert-authority: not a plain host key.
            continue;
        }
        let Some(kind) = f.next() else { continue };
        let ours = match hosts.strip_prefix("|1|") {
            Some(hashed) => hashed_host_matches(hashed, &plain),
            None => {
                hosts = hosts.trim();
                hosts.split(',').any(|h| h == plain)
            }
        };
        if ours && !types.contains(&kind) {
            types.push(kind);
        }
    }
    let mut algs: Vec<&str> = Vec::new();
    for t in types {
        match t {
            "ssh-rsa" => algs.extend(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]),
            "ssh-ed25519"
            | "ecdsa-sha2-nistp256"
            | "ecdsa-sha2-nistp384"
            | "ecdsa-sha2-nistp521"
            | "ssh-dss" => algs.push(t),
            _ => {}
        }
    }
    (!algs.is_empty()).then(|| algs.join(","))
}

/// Whether a hashed known-hosts entry (`|1|<salt>|<hash>`, as written with
/// `HashKnownHosts yes`, Debian's default) is for `host`: the hash is
/// HMAC-SHA1 of the host name under the salt, both base64.
fn hashed_host_matches(hashed: &str, host: &str) -> bool {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    ring::hmac::verify(&key, host.as_bytes(), &hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries made by `ssh-keygen -H` for the same host name and key.
    #[test]
    fn hashed_entries_match_only_their_host() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = [7u8; 20];
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let entry = |host: &str| {
            format!(
                "{}|{}",
                b64.encode(salt),
                b64.encode(ring::hmac::sign(&key, host.as_bytes()))
            )
        };
        assert!(hashed_host_matches(&entry("gpu-box"), "gpu-box"));
        assert!(!hashed_host_matches(&entry("gpu-box"), "other-box"));
        assert!(hashed_host_matches(
            &entry("[gpu-box]:2222"),
            "[gpu-box]:2222"
        ));
        assert!(!hashed_host_matches("garbage", "gpu-box"));
        assert!(!hashed_host_matches("!!|!!", "gpu-box"));
    }

    #[test]
    fn base64_matches_openssh() {
        assert_eq!(base64_nopad(b""), "");
        assert_eq!(base64_nopad(b"f"), "Zg");
        assert_eq!(base64_nopad(b"fo"), "Zm8");
        assert_eq!(base64_nopad(b"foo"), "Zm9v");
        assert_eq!(base64_nopad(b"foobar"), "Zm9vYmFy");
        // 32 bytes → 43 characters, as in `ssh-keygen -l`.
        assert_eq!(fingerprint(b"x").len(), "SHA256:".len() + 43);
    }
}
