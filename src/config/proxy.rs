//! The policy proxy's keys in a `jail` executor: `allow`, `credentials`,
//! `upstream-ca`, and what they compile to (a [`Rule`] per `allow` entry,
//! a [`CredentialSpec`] per credential). Parsing reports every problem as
//! one line (like the rest of the config); what only this machine can tell
//! (value files and their permissions, the CA bundle) is checked by
//! `nix-hatch check` (`cli::check`). How the rules decide is the proxy's
//! business (`proxy::rules`).

use std::path::{Path, PathBuf};

use regex::Regex;
use toml::Value;

use super::keys::{Keys, Problem, Problems};

/// The host trust store the upstream side is verified against by default
/// (Debian, NixOS and most distributions have this bundle).
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub rules: Vec<Rule>,
    pub credentials: Vec<CredentialSpec>,
    /// PEM bundle the upstream TLS side is verified against (default:
    /// [`HOST_CA_BUNDLE`]).
    pub upstream_ca: Option<PathBuf>,
}

impl ProxySettings {
    pub fn upstream_ca_path(&self) -> &Path {
        self.upstream_ca
            .as_deref()
            .unwrap_or(Path::new(HOST_CA_BUNDLE))
    }
}

/// `{ host = regex, header = "Authorization", value-file = "/root/x", prefix = "Bearer ", plain-http = false }`
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    pub host_src: String,
    pub host: Regex,
    pub header: String,
    pub value_file: PathBuf,
    pub prefix: String,
    /// `plain-http = true`: also added to requests sent upstream without
    /// TLS (an internal mirror on a trusted network). Default: TLS only.
    pub plain_http: bool,
}

/// One `allow` entry, compiled. The policy it takes part in (first match
/// wins, default deny, local hosts only by a rule naming them literally)
/// is `proxy::rules`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// As the admin wrote it (for messages).
    pub host_src: String,
    pub host: Regex,
    /// The one host `host_src` names when it is a plain literal (see
    /// [`literal_host`]).
    literal: Option<String>,
    pub path: Option<Regex>,
    /// Upper-case method names; `None` = any.
    pub methods: Option<Vec<String>>,
    /// Ports the rule allows; `None` = any.
    pub ports: Option<Vec<u16>>,
}

impl Rule {
    /// Compiles one rule; errors are one line.
    pub fn new(
        host: &str,
        path: Option<&str>,
        methods: Option<Vec<String>>,
    ) -> Result<Rule, Problem> {
        let host_re = compile(&format!("^(?:{host})$"), host)?;
        let path = match path {
            Some(p) => Some(compile(p, p)?),
            None => None,
        };
        let methods = match methods {
            Some(ms) => {
                let mut out = Vec::new();
                for m in ms {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                        return Err(Problem(format!("{m:?} is not an HTTP method")));
                    }
                    out.push(m.to_ascii_uppercase());
                }
                Some(out)
            }
            None => None,
        };
        Ok(Rule {
            host_src: host.to_owned(),
            host: host_re,
            literal: literal_host(host),
            path,
            methods,
            ports: None,
        })
    }

    /// The rule, restricted to `ports`.
    pub fn with_ports(mut self, ports: Vec<u16>) -> Rule {
        self.ports = Some(ports);
        self
    }

    /// Whether the rule names `host` (normalized) literally: its host
    /// pattern matches that one string and no other.
    pub fn names(&self, host: &str) -> bool {
        self.literal.as_deref() == Some(host)
    }
}

/// The one string `pattern` (a host regex, before anchoring) matches, when
/// it is a plain literal: metacharacters only escaped (`127\.0\.0\.1`),
/// optionally anchored (`^localhost$`). `None` when it might match more
/// than one string (`.*`, `127\..*`, `(localhost)`, `\d`, flags, ...):
/// for safety any syntax beyond escaped punctuation counts as a pattern.
pub fn literal_host(pattern: &str) -> Option<String> {
    let p = pattern.strip_prefix('^').unwrap_or(pattern);
    let p = p.strip_suffix('$').unwrap_or(p);
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            // `\<` and `\>` are word boundaries, not characters.
            '\\' => match chars.next() {
                Some(e) if e.is_ascii_punctuation() && !matches!(e, '<' | '>') => out.push(e),
                _ => return None,
            },
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => {
                return None
            }
            c => out.push(c),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Compiles `pattern`; a syntax error becomes one line naming `shown`.
pub fn compile(pattern: &str, shown: &str) -> Result<Regex, Problem> {
    Regex::new(pattern).map_err(|e| {
        let detail = match &e {
            regex::Error::Syntax(s) => s
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("syntax error")
                .trim()
                .trim_start_matches("error: ")
                .to_owned(),
            other => other.to_string(),
        };
        Problem(format!("invalid regex {shown:?}: {detail}"))
    })
}

/// Headers the proxy itself manages: a credential there would be replaced
/// or break framing.
pub fn is_reserved(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "upgrade"
            | "te"
            | "trailer"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Reads the proxy keys of `[executors.<name>]`; `Some` exactly when
/// `network = "proxy"`. With another network the keys are an error (they
/// would silently do nothing).
pub(super) fn parse(
    ctx: &str,
    k: &mut Keys,
    p: &mut Problems,
    proxy: bool,
) -> Option<ProxySettings> {
    let allow = k.value("allow");
    let creds = k.value("credentials");
    let upstream_ca = k.string(p, "upstream-ca").map(PathBuf::from);
    if !proxy {
        for (key, present) in [
            ("allow", allow.is_some()),
            ("credentials", creds.is_some()),
            ("upstream-ca", upstream_ca.is_some()),
        ] {
            if present {
                p.push(format!("{ctx}.{key}: only used with network = \"proxy\""));
            }
        }
        return None;
    }
    let mut s = ProxySettings {
        upstream_ca,
        ..Default::default()
    };
    if let Some(ca) = &s.upstream_ca {
        if !ca.is_absolute() {
            p.push(format!(
                "{ctx}.upstream-ca: must be an absolute path, got {:?}",
                ca.display()
            ));
        }
    }
    for (i, t) in tables(ctx, "allow", allow, p) {
        let at = format!("{ctx}.allow[{i}]");
        let host = str_key(&at, t, "host", p, true);
        let path = str_key(&at, t, "path", p, false);
        let methods = list_key(&at, t, "methods", "strings", p, |x| {
            x.as_str().map(str::to_owned)
        });
        let ports = list_key(&at, t, "ports", "port numbers (1-65535)", p, |x| {
            x.as_integer()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
        });
        unknown_keys(&at, t, &["host", "path", "methods", "ports"], p);
        if let Some(host) = host {
            match Rule::new(&host, path.as_deref(), methods) {
                Ok(r) => s.rules.push(match ports {
                    Some(ps) => r.with_ports(ps),
                    None => r,
                }),
                Err(e) => p.push(format!("{at}: {e}")),
            }
        }
    }
    for (i, t) in tables(ctx, "credentials", creds, p) {
        let at = format!("{ctx}.credentials[{i}]");
        let host = str_key(&at, t, "host", p, true);
        let header = str_key(&at, t, "header", p, true);
        let value_file = str_key(&at, t, "value-file", p, true).map(PathBuf::from);
        let prefix = str_key(&at, t, "prefix", p, false).unwrap_or_default();
        let plain_http = bool_key(&at, t, "plain-http", p).unwrap_or(false);
        unknown_keys(
            &at,
            t,
            &["host", "header", "value-file", "prefix", "plain-http"],
            p,
        );
        let host_re = host.as_ref().and_then(|h| {
            compile(&format!("^(?:{h})$"), h)
                .map_err(|e| p.push(format!("{at}.host: {e}")))
                .ok()
        });
        if let Some(h) = &header {
            if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                p.push(format!("{at}.header: {h:?} is not a valid header name"));
            } else if is_reserved(h) {
                p.push(format!(
                    "{at}.header: {h:?} is managed by the proxy and cannot carry a credential"
                ));
            }
        }
        if hyper::header::HeaderValue::from_str(&prefix).is_err() {
            p.push(format!("{at}.prefix: not a valid header value"));
        }
        if let Some(f) = &value_file {
            if !f.is_absolute() {
                p.push(format!(
                    "{at}.value-file: must be an absolute path, got {:?}",
                    f.display()
                ));
            }
        }
        if let (Some(host_src), Some(host), Some(header), Some(value_file)) =
            (host, host_re, header, value_file)
        {
            s.credentials.push(CredentialSpec {
                host_src,
                host,
                header,
                value_file,
                prefix,
                plain_http,
            });
        }
    }
    Some(s)
}

/// The array-of-tables under `key` (TOML `[[...]]` or an inline list).
fn tables<'a>(
    ctx: &str,
    key: &str,
    v: Option<&'a Value>,
    p: &mut Problems,
) -> Vec<(usize, &'a toml::Table)> {
    let Some(v) = v else { return Vec::new() };
    let Some(items) = v.as_array() else {
        p.push(format!("{ctx}.{key}: expected a list of tables"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_table() {
            Some(t) => out.push((i, t)),
            None => p.push(format!("{ctx}.{key}[{i}]: expected a table")),
        }
    }
    out
}

fn str_key(
    at: &str,
    t: &toml::Table,
    key: &str,
    p: &mut Problems,
    required: bool,
) -> Option<String> {
    match t.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            p.push(format!(
                "{at}.{key}: expected a string, got {}",
                other.type_str()
            ));
            None
        }
        None => {
            if required {
                p.push(format!("{at}: missing `{key}`"));
            }
            None
        }
    }
}

/// An optional boolean under `key`; anything else is one problem line.
fn bool_key(at: &str, t: &toml::Table, key: &str, p: &mut Problems) -> Option<bool> {
    match t.get(key)? {
        Value::Boolean(b) => Some(*b),
        other => {
            p.push(format!("{at}.{key}: expected true or false, got {other}"));
            None
        }
    }
}

/// An optional non-empty list under `key`, each item converted by `item`;
/// anything else is one problem line ("expected a non-empty list of `what`").
fn list_key<T>(
    at: &str,
    t: &toml::Table,
    key: &str,
    what: &str,
    p: &mut Problems,
    item: impl Fn(&Value) -> Option<T>,
) -> Option<Vec<T>> {
    let v = t.get(key)?;
    match v
        .as_array()
        .and_then(|a| a.iter().map(&item).collect::<Option<Vec<T>>>())
    {
        Some(list) if !list.is_empty() => Some(list),
        _ => {
            p.push(format!("{at}.{key}: expected a non-empty list of {what}"));
            None
        }
    }
}

fn unknown_keys(at: &str, t: &toml::Table, known: &[&str], p: &mut Problems) {
    for k in t.keys() {
        if !known.contains(&k.as_str()) {
            p.push(format!("{at}.{k}: unknown key"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::jail::Network;
    use crate::config::tests::parse;
    use crate::config::ExecutorKind;

    #[test]
    fn literal_hosts() {
        for (pattern, want) in [
            ("localhost", Some("localhost")),
            (r"127\.0\.0\.1", Some("127.0.0.1")),
            (r"^127\.0\.0\.1$", Some("127.0.0.1")),
            ("::1", Some("::1")),
            (r"svc-a\.localhost", Some("svc-a.localhost")),
            (r"svc\-a\.localhost", Some("svc-a.localhost")),
            // `.` is any character: this also matches `127x0y0z1`.
            ("127.0.0.1", None),
            (".*", None),
            (r"127\..*", None),
            (r"127\.0\.0\.[0-9]", None),
            ("(localhost)", None),
            ("localhost|evil", None),
            ("localhost?", None),
            (r"\d+\.0\.0\.1", None),
            (r"\x6cocalhost", None),
            ("(?i)localhost", None),
            (r"\<localhost\>", None),
            (r"localhost\$", None),
            ("", None),
            ("^$", None),
        ] {
            assert_eq!(literal_host(pattern).as_deref(), want, "{pattern}");
        }
    }

    #[test]
    fn bad_regex_is_one_line() {
        let e = Rule::new("(abc", None, None).unwrap_err().to_string();
        assert!(e.starts_with("invalid regex \"(abc\""), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(Rule::new("a", None, Some(vec!["G ET".into()])).is_err());
    }

    #[test]
    fn proxy_keys() {
        let c = parse(
            r#"
[executors.f]
kind = "jail"
network = "proxy"
allow = [ { host = '^github\.com$', ports = [443] }, { host = 'example\.org', path = '^/pub/', methods = ["get"] } ]
upstream-ca = "/etc/test-ca.pem"
[[executors.f.credentials]]
host = 'api\.example'
header = "Authorization"
value-file = "/root/token"
prefix = "Bearer "
[[executors.f.credentials]]
host = 'mirror\.lan'
header = "X-Token"
value-file = "/root/mirror-token"
plain-http = true
"#,
        )
        .unwrap();
        let ExecutorKind::Jail(j) = &c.executors["f"].kind else {
            panic!("not a jail")
        };
        assert_eq!(j.network, Network::Proxy);
        let px = j.proxy.as_ref().unwrap();
        assert_eq!(px.rules.len(), 2);
        assert_eq!(px.rules[0].ports.as_deref(), Some(&[443u16][..]));
        assert_eq!(px.rules[1].ports, None);
        assert_eq!(
            px.rules[1].methods.as_deref(),
            Some(&["GET".to_owned()][..])
        );
        assert_eq!(px.credentials[0].header, "Authorization");
        assert_eq!(px.credentials[0].prefix, "Bearer ");
        // TLS only unless the credential says otherwise.
        assert!(!px.credentials[0].plain_http);
        assert!(px.credentials[1].plain_http);
        assert_eq!(px.upstream_ca_path(), Path::new("/etc/test-ca.pem"));
    }

    #[test]
    fn proxy_key_problems() {
        let errs = parse(
            r#"
[executors.f]
kind = "jail"
network = "proxy"
allow = [ { host = '(unclosed' }, { path = '^/x' }, { host = 'a', port = 3 }, "str", { host = 'b', ports = [0] }, { host = 'c', ports = [70000] }, { host = 'd', ports = [] } ]
[[executors.f.credentials]]
host = 'api'
header = "Bad Header"
value-file = "relative"
plain-http = "yes"
[executors.g]
kind = "jail"
allow = [ { host = 'a' } ]
"#,
        )
        .unwrap_err();
        for w in [
            "executors.f.allow[0]: invalid regex \"(unclosed\"",
            "executors.f.allow[1]: missing `host`",
            "executors.f.allow[2].port: unknown key",
            "executors.f.allow[3]: expected a table",
            "executors.f.allow[4].ports: expected a non-empty list of port numbers",
            "executors.f.allow[5].ports: expected a non-empty list of port numbers",
            "executors.f.allow[6].ports: expected a non-empty list of port numbers",
            "executors.f.credentials[0].header: \"Bad Header\" is not a valid header name",
            "executors.f.credentials[0].value-file: must be an absolute path",
            "executors.f.credentials[0].plain-http: expected true or false, got \"yes\"",
            "executors.g.allow: only used with network = \"proxy\"",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "{w:?} not in {errs:#?}"
            );
        }
        assert!(errs.iter().all(|e| !e.contains('\n')), "{errs:#?}");
    }
}
