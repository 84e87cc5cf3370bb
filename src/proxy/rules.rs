//! The policy: ordered `allow` rules, first match wins, default deny.
//!
//! A rule's `host` regex must match the whole host name (`config::proxy`
//! compiles it as `^(?:host)$`, so `github\.com` cannot be widened to
//! `github.com.evil.example` by a forgotten anchor); `path` is an ordinary
//! (unanchored) regex over the path without the query; `methods` lists the
//! allowed methods (a request it allows is forwarded without
//! method-override headers, see `forward`); `ports` the allowed ports (any
//! when absent).
//!
//! A `path` regex never matches an *ambiguous* path (see
//! [`ambiguous_path`]): one a server may resolve to another resource than
//! the one the regex saw, such as `/pub/../secret`.
//!
//! A host that is this machine or link-local by its name ([`local_host`]:
//! `localhost`, `127.0.0.1`, `::1`, `169.254.169.254`, ...) is matched only
//! by a rule that names it literally ([`Rule::names`]): the proxy connects
//! from the host's network, and `.*` must not hand the build the host's
//! own services or the cloud metadata service.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::config::proxy::Rule;

/// What a rule decides; the rule itself (its data and compilation) is
/// `config::proxy`.
impl Rule {
    /// Whether the rule applies to `host` (normalized; `local` when it is
    /// [`local_host`]): its regex matches, and for a local host the rule
    /// names it literally.
    fn reaches(&self, host: &str, local: bool) -> bool {
        self.host.is_match(host) && (!local || self.names(host))
    }

    fn allows_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|ps| ps.contains(&port))
    }

    /// Whether the rule only decides on the host (so a CONNECT tunnel can be
    /// allowed without looking inside).
    fn host_only(&self) -> bool {
        self.path.is_none() && self.methods.is_none()
    }
}

/// Whether `host` (normalized) is this machine or link-local by its name:
/// `localhost`, a name under `.localhost`, or an IP address [`local_ip`]
/// calls local. (A DNS name that resolves there is refused when the proxy
/// connects, see `forward`.)
pub fn local_host(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => local_ip(ip),
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    }
}

/// Loopback, unspecified or link-local (169.254.0.0/16 with the cloud
/// metadata service, fe80::/10); an IPv4-mapped IPv6 address counts as the
/// IPv4 address it carries.
pub fn local_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_unicast_link_local(),
    }
}

/// Why a local host (see [`local_host`]) that only patterns matched is denied.
pub const NOT_NAMED_LITERALLY: &str =
    "this machine or link-local: a rule must name this host literally";

/// What to do with one HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by rule `rule` (0-based).
    Allow {
        rule: usize,
    },
    Deny {
        reason: String,
    },
}

/// What to do with a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// A blind tunnel, allowed by rule `rule` (0-based).
    Tunnel {
        rule: usize,
    },
    /// The requests inside must be seen: terminate TLS with the per-build
    /// CA and judge each request.
    Intercept {
        why: String,
    },
    Deny {
        reason: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

/// Lower-case, without a trailing dot or IPv6 brackets: the form rules see.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let h = h.strip_suffix('.').unwrap_or(h);
    h.to_ascii_lowercase()
}

/// Why the server may take `path` (as sent, without the query) for
/// another resource than the one a `path` regex sees in it, or `None`.
///
/// Ambiguous are: a `.` or `..` segment, also percent-encoded (`%2e%2e`)
/// or followed by `;params` (which Tomcat and Jetty cut off: `..;`); an
/// encoded `/` or `\` (`%2f`, `%5c`: some servers decode them into
/// separators); a raw `\` (a separator on Windows servers); `%00` (it
/// truncates the path in C servers). The path is checked as sent and after
/// each of up to [`DECODE_LEVELS`] rounds of percent-decoding, for servers
/// that decode twice.
///
/// Why refuse rather than canonicalise (RFC 3986 §5.2.4) and forward the
/// canonical form: servers disagree on what these forms mean (nginx
/// resolves `..` after decoding `%2e`, Tomcat drops `;params`, IIS splits
/// on `\`, most never split on `%2f`), so no single canonical path means
/// the same to every server; and well-behaved clients never send them
/// (curl and wget remove dot segments themselves). Refusing keeps the
/// request's bytes as they are: the path judged is the path forwarded.
pub fn ambiguous_path(path: &str) -> Option<&'static str> {
    if path.contains('\\') {
        return Some(r#"ambiguous path: a "\""#);
    }
    let mut level = Cow::Borrowed(path.as_bytes());
    for round in 0..=DECODE_LEVELS {
        if has_dot_segment(&level) {
            return Some(r#"ambiguous path: a "." or ".." segment"#);
        }
        if round == DECODE_LEVELS {
            break;
        }
        match decode_once(&level) {
            Err(why) => return Some(why),
            Ok(None) => return None,
            Ok(Some(next)) => level = Cow::Owned(next),
        }
    }
    None
}

/// One round of percent-decoding: `Ok(None)` when there is nothing to
/// decode; `Err` for an encoded NUL or separator.
fn decode_once(s: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let hex = |j: usize| s.get(j).and_then(|&c| (c as char).to_digit(16));
    let mut next = Vec::with_capacity(s.len());
    let mut decoded = false;
    let mut i = 0;
    while i < s.len() {
        let (b'%', Some(h), Some(l)) = (s[i], hex(i + 1), hex(i + 2)) else {
            next.push(s[i]);
            i += 1;
            continue;
        };
        match (h << 4 | l) as u8 {
            0 => return Err("ambiguous path: an encoded NUL (%00)"),
            b'/' | b'\\' => return Err(r#"ambiguous path: an encoded "/" or "\" (%2f, %5c)"#),
            c => next.push(c),
        }
        decoded = true;
        i += 3;
    }
    Ok(decoded.then_some(next))
}

/// Rounds of percent-decoding [`ambiguous_path`] looks through.
pub const DECODE_LEVELS: usize = 3;

/// Whether a `/`-separated segment is `.` or `..`, once `;params` are cut.
fn has_dot_segment(path: &[u8]) -> bool {
    path.split(|&b| b == b'/').any(|seg| {
        let seg = seg.split(|&b| b == b';').next().unwrap_or(seg);
        seg == b"." || seg == b".."
    })
}

impl Policy {
    /// `host` normalized, `path` without the query. Rules with a `path`
    /// regex skip an ambiguous path (see [`ambiguous_path`]); a rule
    /// without one allows any path, so the path's ambiguity cannot matter
    /// to it.
    pub fn request(&self, method: &str, host: &str, port: u16, path: &str) -> Verdict {
        let local = local_host(host);
        let (mut host_seen, mut port_seen) = (false, false);
        // Computed when a path regex is first consulted; when it says the
        // path is ambiguous, every path rule was skipped for that.
        let mut ambiguity: Option<Option<&'static str>> = None;
        for (i, r) in self.rules.iter().enumerate() {
            if !r.reaches(host, local) {
                continue;
            }
            host_seen = true;
            if !r.allows_port(port) {
                continue;
            }
            port_seen = true;
            if let Some(p) = &r.path {
                if ambiguity
                    .get_or_insert_with(|| ambiguous_path(path))
                    .is_some()
                {
                    continue;
                }
                if !p.is_match(path) {
                    continue;
                }
            }
            if r.methods
                .as_ref()
                .is_some_and(|ms| !ms.iter().any(|m| m == method))
            {
                continue;
            }
            return Verdict::Allow { rule: i };
        }
        Verdict::Deny {
            reason: match (host_seen, port_seen, ambiguity.flatten()) {
                (false, _, _) => self.no_rule(host, local).into(),
                (true, false, _) => "no rule for this port".into(),
                (true, true, Some(why)) => why.into(),
                (true, true, None) => "no rule for this path or method".into(),
            },
        }
    }

    /// Why no rule applies to `host`: none matches it, or (a local host)
    /// only patterns do.
    fn no_rule(&self, host: &str, local: bool) -> &'static str {
        if local && self.rules.iter().any(|r| r.host.is_match(host)) {
            NOT_NAMED_LITERALLY
        } else {
            "no rule"
        }
    }

    /// Whether rule `rule` (0-based) allows only some methods.
    pub fn restricts_methods(&self, rule: usize) -> bool {
        self.rules.get(rule).is_some_and(|r| r.methods.is_some())
    }

    /// A CONNECT to `host` (normalized):`port`. `needs_inside` is set when
    /// something other than the rules (a credential) must see the requests.
    pub fn connect(&self, host: &str, port: u16, needs_inside: Option<String>) -> ConnectVerdict {
        let local = local_host(host);
        let mut hosts = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.reaches(host, local));
        let Some((i, r)) = hosts.clone().find(|(_, r)| r.allows_port(port)) else {
            let reason = if hosts.next().is_some() {
                "no rule for this port"
            } else {
                self.no_rule(host, local)
            };
            return ConnectVerdict::Deny {
                reason: reason.into(),
            };
        };
        if let Some(why) = needs_inside {
            return ConnectVerdict::Intercept { why };
        }
        if r.host_only() {
            ConnectVerdict::Tunnel { rule: i }
        } else {
            ConnectVerdict::Intercept {
                why: format!("rule {} restricts paths or methods", i + 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Spec<'a> = (&'a str, Option<&'a str>, Option<&'a [&'a str]>);

    fn policy(rules: &[Spec]) -> Policy {
        Policy {
            rules: rules
                .iter()
                .map(|(h, p, m)| {
                    Rule::new(h, *p, m.map(|m| m.iter().map(|s| s.to_string()).collect())).unwrap()
                })
                .collect(),
        }
    }

    #[test]
    fn first_match_wins_and_default_deny() {
        let p = policy(&[
            (r"example\.org", Some("^/pub/"), None),
            (r"github\.com", None, Some(&["get", "HEAD"])),
        ]);
        assert_eq!(
            p.request("GET", "example.org", 443, "/pub/a"),
            Verdict::Allow { rule: 0 }
        );
        assert!(
            matches!(p.request("GET", "example.org", 443, "/priv"), Verdict::Deny { reason } if reason.contains("path"))
        );
        assert_eq!(
            p.request("HEAD", "github.com", 443, "/x"),
            Verdict::Allow { rule: 1 }
        );
        assert!(matches!(
            p.request("POST", "github.com", 443, "/x"),
            Verdict::Deny { .. }
        ));
        assert_eq!(
            p.request("GET", "evil.example", 443, "/"),
            Verdict::Deny {
                reason: "no rule".into()
            }
        );
    }

    #[test]
    fn host_regex_matches_the_whole_host() {
        let p = policy(&[(r"github\.com", None, None)]);
        assert!(matches!(
            p.request("GET", "github.com.evil.example", 443, "/"),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            p.request("GET", "xgithub.com", 443, "/"),
            Verdict::Deny { .. }
        ));
        let p = policy(&[(r"^(.*\.)?github\.com$", None, None)]);
        assert_eq!(
            p.request("GET", "api.github.com", 443, "/"),
            Verdict::Allow { rule: 0 }
        );
    }

    #[test]
    fn connect_tunnels_or_intercepts() {
        let p = policy(&[
            (r"a\.example", None, None),
            (r"b\.example", Some("^/x"), None),
        ]);
        assert_eq!(
            p.connect("a.example", 443, None),
            ConnectVerdict::Tunnel { rule: 0 }
        );
        assert!(matches!(
            p.connect("b.example", 443, None),
            ConnectVerdict::Intercept { .. }
        ));
        assert!(matches!(
            p.connect("a.example", 443, Some("credential".into())),
            ConnectVerdict::Intercept { .. }
        ));
        assert_eq!(
            p.connect("c.example", 443, Some("credential".into())),
            ConnectVerdict::Deny {
                reason: "no rule".into()
            }
        );
    }

    /// A rule with `ports` only matches those; the next rule for the host
    /// may still allow another port.
    #[test]
    fn ports_restrict_a_rule() {
        let p = Policy {
            rules: vec![
                Rule::new(r"a\.example", None, None)
                    .unwrap()
                    .with_ports(vec![443]),
                Rule::new(r"b\.example", Some("^/x"), None)
                    .unwrap()
                    .with_ports(vec![80, 8080]),
                Rule::new(r"b\.example", None, None)
                    .unwrap()
                    .with_ports(vec![9000]),
            ],
        };
        assert_eq!(
            p.connect("a.example", 443, None),
            ConnectVerdict::Tunnel { rule: 0 }
        );
        assert_eq!(
            p.connect("a.example", 22, None),
            ConnectVerdict::Deny {
                reason: "no rule for this port".into()
            }
        );
        assert_eq!(
            p.connect("b.example", 9000, None),
            ConnectVerdict::Tunnel { rule: 2 }
        );
        assert_eq!(
            p.request("GET", "b.example", 8080, "/x"),
            Verdict::Allow { rule: 1 }
        );
        assert_eq!(
            p.request("GET", "b.example", 81, "/x"),
            Verdict::Deny {
                reason: "no rule for this port".into()
            }
        );
        assert_eq!(
            p.request("GET", "b.example", 8080, "/y"),
            Verdict::Deny {
                reason: "no rule for this path or method".into()
            }
        );
        assert_eq!(
            p.request("GET", "b.example", 9000, "/y"),
            Verdict::Allow { rule: 2 }
        );
    }

    /// The review's bypasses of `{ host = 'example\.org', path = '^/pub/' }`:
    /// each was allowed as sent, and nginx served `/secret`.
    #[test]
    fn ambiguous_paths_never_match_a_path_rule() {
        let p = policy(&[(r"example\.org", Some("^/pub/"), None)]);
        for path in [
            "/pub/../secret",
            "/pub/./../secret",
            "/pub/..",
            "/pub/%2e%2e/secret",
            "/pub/%2E%2e/secret",
            "/pub/.%2e/secret",
            "/pub/..%2fsecret",
            "/pub/..%2Fsecret",
            "/pub/..;/secret",
            "/pub/..;x=1/secret",
            "/pub/.;/x",
            "/pub/..%3b/secret",
            "/pub/..\\secret",
            "/pub/..%5csecret",
            "/pub/x%00.tar",
            "/pub/%252e%252e/secret",
            "/pub/%25252e%25252e/secret",
            "/pub/a%252fb",
        ] {
            let v = p.request("GET", "example.org", 80, path);
            assert!(
                matches!(&v, Verdict::Deny { reason } if reason.starts_with("ambiguous path")),
                "{path}: {v:?}"
            );
        }
        // Ordinary paths, odd but unambiguous ones included.
        for path in [
            "/pub/a",
            "/pub/a%20b",
            "/pub/.hidden",
            "/pub/a..b/...",
            "/pub/%2e%2ex",
            "/pub/a;v=1",
            "/pub/100%",
            "/pub/%zz",
            "/pub/%2525",
        ] {
            assert_eq!(
                p.request("GET", "example.org", 80, path),
                Verdict::Allow { rule: 0 },
                "{path}"
            );
        }
        // Outside the path rule the reason is the usual one.
        assert_eq!(
            p.request("GET", "example.org", 80, "/priv"),
            Verdict::Deny {
                reason: "no rule for this path or method".into()
            }
        );
    }

    /// A rule without `path` allows every path of its host, so an
    /// ambiguous path is not refused there.
    #[test]
    fn ambiguous_paths_pass_rules_without_a_path() {
        let p = policy(&[
            (r"example\.org", Some("^/pub/"), None),
            (r"example\.org", None, Some(&["HEAD"])),
            (r"any\.example", None, None),
        ]);
        assert_eq!(
            p.request("HEAD", "example.org", 80, "/pub/../secret"),
            Verdict::Allow { rule: 1 }
        );
        assert_eq!(
            p.request("GET", "any.example", 80, "/a/%2e%2e/b%2fc"),
            Verdict::Allow { rule: 2 }
        );
        assert_eq!(
            ambiguous_path("/a/../b"),
            Some(r#"ambiguous path: a "." or ".." segment"#)
        );
        assert_eq!(ambiguous_path("/a/b"), None);
    }

    #[test]
    fn local_hosts_by_name() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "localhost",
            "svc.localhost",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in [
            "example.org",
            "10.1.2.3",
            "192.168.1.1",
            "2001:db8::1",
            "localhost.example",
            "notlocalhost",
        ] {
            assert!(!local_host(host), "{host}");
        }
    }

    /// `{ host = '.*' }` does not reach this machine or link-local hosts,
    /// for requests and CONNECTs alike; a rule naming the host literally
    /// does, also after a pattern that matched first.
    #[test]
    fn local_hosts_need_a_rule_naming_them_literally() {
        let not_named = || NOT_NAMED_LITERALLY.to_owned();
        let p = policy(&[(".*", None, None)]);
        for host in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "169.254.169.254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "localhost",
            "svc.localhost",
        ] {
            assert_eq!(
                p.request("GET", host, 80, "/"),
                Verdict::Deny {
                    reason: not_named()
                },
                "{host}"
            );
            assert_eq!(
                p.connect(host, 443, None),
                ConnectVerdict::Deny {
                    reason: not_named()
                },
                "{host}"
            );
        }
        for host in ["example.org", "10.1.2.3", "192.168.1.1"] {
            assert_eq!(
                p.request("GET", host, 80, "/"),
                Verdict::Allow { rule: 0 },
                "{host}"
            );
            assert_eq!(
                p.connect(host, 443, None),
                ConnectVerdict::Tunnel { rule: 0 }
            );
        }

        let p = policy(&[
            (".*", Some("^/x"), None),
            (r"127\.0\.0\.1", None, None),
            ("localhost", None, Some(&["GET"])),
            ("::1", None, None),
        ]);
        assert_eq!(
            p.request("GET", "127.0.0.1", 80, "/y"),
            Verdict::Allow { rule: 1 }
        );
        // Rule 1 would intercept: it is not the one that applies.
        assert_eq!(
            p.connect("127.0.0.1", 443, None),
            ConnectVerdict::Tunnel { rule: 1 }
        );
        assert_eq!(
            p.request("GET", "localhost", 80, "/x"),
            Verdict::Allow { rule: 2 }
        );
        assert_eq!(
            p.request("POST", "localhost", 80, "/x"),
            Verdict::Deny {
                reason: "no rule for this path or method".into()
            }
        );
        assert!(matches!(
            p.connect("localhost", 443, None),
            ConnectVerdict::Intercept { .. }
        ));
        assert_eq!(p.request("GET", "::1", 80, "/"), Verdict::Allow { rule: 3 });
        assert_eq!(
            p.request("GET", "127.0.0.2", 80, "/x"),
            Verdict::Deny {
                reason: not_named()
            }
        );

        // Unescaped, `127.0.0.1` is a pattern; no rule at all is "no rule".
        let p = policy(&[("127.0.0.1", None, None), (r"example\.org", None, None)]);
        assert_eq!(
            p.request("GET", "127.0.0.1", 80, "/"),
            Verdict::Deny {
                reason: not_named()
            }
        );
        assert_eq!(
            p.connect("localhost", 443, None),
            ConnectVerdict::Deny {
                reason: "no rule".into()
            }
        );
    }

    #[test]
    fn rules_with_methods_restrict_methods() {
        let p = policy(&[
            (r"a\.example", None, Some(&["GET"])),
            (r"b\.example", None, None),
        ]);
        assert!(p.restricts_methods(0));
        assert!(!p.restricts_methods(1));
        assert!(!p.restricts_methods(2));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.ORG."), "example.org");
        assert_eq!(normalize_host("[::1]"), "::1");
    }
}
