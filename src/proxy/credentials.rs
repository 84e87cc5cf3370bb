//! Credentials the proxy adds to matching requests. The value lives in a
//! root-only file read by the hook when the build starts; it is kept in
//! memory (as a header value marked sensitive) and never written anywhere
//! the jail can see: not the environment, files, the build log, the audit
//! file or the outputs. Log lines name the header, never the value.
//!
//! A credential goes only into requests the proxy sends upstream over TLS
//! (inside an intercepted CONNECT): on a plain `http://` request anyone on
//! the path could read it. The request itself still goes out, without
//! the credential; a credential with `plain-http = true` (an internal
//! mirror on a trusted network) is added there too.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::anyhow;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use crate::config::proxy::CredentialSpec;

/// Values larger than this are surely a mistake.
const MAX_VALUE: u64 = 64 * 1024;

pub struct Credential {
    pub host: Regex,
    pub header: HeaderName,
    value: HeaderValue,
    /// Also added to requests that go upstream without TLS.
    pub plain_http: bool,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("host", &self.host.as_str())
            .field("header", &self.header)
            .field("value", &"<secret>")
            .field("plain_http", &self.plain_http)
            .finish()
    }
}

/// Reads a value file after checking it is safe: a regular file owned by
/// root (or by the account the hook runs as), with no group or other
/// permissions. Trailing newlines are not part of the value.
pub fn read_value_file(path: &Path) -> anyhow::Result<String> {
    let f = std::fs::File::open(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(anyhow!("{} is not a regular file", path.display()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(anyhow!(
            "{} is owned by uid {}, not by root: anyone who can change it controls the credential",
            path.display(),
            m.uid()
        ));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(anyhow!(
            "{} has mode {mode:04o}: a credential file must not be group or world accessible (chmod 600)",
            path.display()
        ));
    }
    if m.len() > MAX_VALUE {
        return Err(anyhow!(
            "{} is larger than {MAX_VALUE} bytes",
            path.display()
        ));
    }
    let mut s = String::new();
    f.take(MAX_VALUE)
        .read_to_string(&mut s)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let v = s.trim_end_matches(['\n', '\r']).to_owned();
    if v.is_empty() {
        return Err(anyhow!("{} is empty", path.display()));
    }
    Ok(v)
}

/// Loads every credential (the build fails if one cannot be loaded: a
/// build that silently fetched without its token would fail obscurely).
pub fn load(specs: &[CredentialSpec]) -> anyhow::Result<Vec<Credential>> {
    let mut out = Vec::new();
    for (i, c) in specs.iter().enumerate() {
        let value = read_value_file(&c.value_file).map_err(|e| anyhow!("credentials[{i}]: {e}"))?;
        let header = HeaderName::from_bytes(c.header.as_bytes())
            .map_err(|_| anyhow!("credentials[{i}]: invalid header name {:?}", c.header))?;
        let mut value = HeaderValue::from_str(&format!("{}{value}", c.prefix)).map_err(|_| {
            anyhow!(
                "credentials[{i}]: the value in {} is not a valid header value (control characters?)",
                c.value_file.display()
            )
        })?;
        value.set_sensitive(true);
        out.push(Credential {
            host: c.host.clone(),
            header,
            value,
            plain_http: c.plain_http,
        });
    }
    Ok(out)
}

/// The credentials for `host` (normalized).
pub fn for_host<'a>(
    creds: &'a [Credential],
    host: &'a str,
) -> impl Iterator<Item = &'a Credential> + 'a {
    creds.iter().filter(move |c| c.host.is_match(host))
}

/// Header names of the credentials [`inject`] added and withheld, for
/// the log and the audit record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub added: Vec<String>,
    /// Matching credentials not added: the request goes upstream without
    /// TLS and they lack `plain-http`.
    pub withheld: Vec<String>,
}

/// Sets the header of every credential matching `host` (replacing what the
/// build sent) when the request goes upstream over TLS (`tls`) or the
/// credential allows plain HTTP; the others are withheld, the request
/// keeping what the build sent.
pub fn inject(creds: &[Credential], host: &str, tls: bool, headers: &mut HeaderMap) -> Injected {
    let mut out = Injected::default();
    for c in for_host(creds, host) {
        let name = c.header.as_str().to_owned();
        if tls || c.plain_http {
            headers.insert(c.header.clone(), c.value.clone());
            out.added.push(name);
        } else {
            out.withheld.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_file_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_value_file(&p).unwrap_err();
        assert!(e.to_string().contains("mode 0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_value_file(&p).unwrap(), "s3cret");
        assert!(read_value_file(&dir.path().join("missing")).is_err());
    }

    /// A credential for `host` in header `header`, value `s3cret`.
    fn credential(host: &str, header: &str, plain_http: bool) -> Credential {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spec = CredentialSpec {
            host_src: host.into(),
            host: Regex::new(&format!("^(?:{host})$")).unwrap(),
            header: header.into(),
            value_file: p,
            prefix: "Bearer ".into(),
            plain_http,
        };
        load(&[spec]).unwrap().remove(0)
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn injection_replaces_and_hides() {
        let creds = [credential(r"api\.example", "Authorization", false)];
        assert!(!format!("{creds:?}").contains("s3cret"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer forged"));
        assert_eq!(
            inject(&creds, "api.example", true, &mut h).added,
            names(&["authorization"])
        );
        assert_eq!(h["authorization"], "Bearer s3cret");
        assert!(h["authorization"].is_sensitive());
        let mut h = HeaderMap::new();
        assert_eq!(
            inject(&creds, "other.example", true, &mut h),
            Injected::default()
        );
        assert!(h.is_empty());
    }

    /// Without TLS only a `plain-http` credential is added; the others are
    /// named as withheld and the request keeps what the build sent.
    #[test]
    fn plain_http_gets_only_plain_http_credentials() {
        let creds = [
            credential(r"api\.example", "Authorization", false),
            credential(r"api\.example", "X-Mirror-Token", true),
        ];
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer mine"));
        assert_eq!(
            inject(&creds, "api.example", false, &mut h),
            Injected {
                added: names(&["x-mirror-token"]),
                withheld: names(&["authorization"]),
            }
        );
        assert_eq!(h["authorization"], "Bearer mine");
        assert_eq!(h["x-mirror-token"], "Bearer s3cret");
        let mut h = HeaderMap::new();
        assert_eq!(
            inject(&creds, "api.example", true, &mut h),
            Injected {
                added: names(&["authorization", "x-mirror-token"]),
                withheld: Vec::new(),
            }
        );
        assert_eq!(h["authorization"], "Bearer s3cret");
    }
}
