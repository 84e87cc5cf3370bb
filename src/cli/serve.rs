//! What `nix-hatch check` says about `remote-clients`: the accounts other
//! machines log in as to build here (`ssh-ng://ACCOUNT@…` in their
//! `builders`, README "Serving other machines").
//!
//! Their escapes reach nix-hatch only when the daemon tells their Nix it is
//! *not* trusted (Nix ≥ 2.15 here, NixOS/nix#7515) and their Nix then
//! sends the .drv closure instead of a bare derivation (Nix ≥ 2.16 there,
//! NixOS/nix#3921). A trusted account gets a bare derivation
//! (`BuildDerivation`), which never reaches a build hook: its clients see
//! the far Nix fail it for missing system features. So a remote client in
//! `trusted-users` is the one mistake that silently turns this off.

use crate::config::Config;
use crate::hook::access;
use crate::hook::requester::{Requester, Via};

/// The oldest Nix whose daemon tells clients whether they are trusted
/// (worker protocol 1.35, NixOS/nix#7515).
pub const DAEMON_REPORTS_TRUST: (u32, u32) = (2, 15);

/// What check prints about the remote clients: `error:` lines (an account
/// that doesn't exist) and `warning:`/plain lines. `trusted` and `allowed`
/// are Nix's `trusted-users` and `allowed-users` as `nix show-config` has
/// them; `nix` the (major, minor) of this machine's Nix; `account` looks an
/// account up.
pub fn lines(
    config: &Config,
    trusted: Option<&str>,
    allowed: Option<&str>,
    nix: Option<(u32, u32)>,
    account: impl Fn(&str) -> Option<Requester>,
) -> Vec<String> {
    let mut out = Vec::new();
    if config.remote_clients.is_empty() {
        return out;
    }
    if let Some((major, minor)) = nix.filter(|v| *v < DAEMON_REPORTS_TRUST) {
        out.push(format!(
            "warning: remote-clients: Nix {major}.{minor}'s daemon does not tell clients whether they are trusted \
             (Nix >= 2.15, NixOS/nix#7515): their Nix sends bare derivations, which never reach nix-hatch \
             (\"you are not privileged to build input-addressed derivations\"); upgrade Nix on this machine"
        ));
    }
    let trusted_entries = words(trusted.unwrap_or("root"));
    let allowed_entries = words(allowed.unwrap_or("*"));
    for name in &config.remote_clients {
        let Some(who) = account(name) else {
            out.push(format!(
                "error: remote-clients: no account {name:?} on this machine"
            ));
            continue;
        };
        if who.uid == Some(0) || access::allows(&trusted_entries, &who) {
            out.push(format!(
                "warning: remote client {name} is trusted by Nix (trusted-users: {}): its clients' Nix sends bare \
                 derivations, which never reach nix-hatch, and their escape builds fail for missing system features \
                 (\"a '…' with features {{…}} is required to build\", or \"Reason: missing system features\"); \
                 remove {name} from trusted-users (directly, by group or *)",
                trusted_entries.join(" ")
            ));
            continue;
        }
        if !access::allows(&allowed_entries, &who) {
            out.push(format!(
                "warning: remote client {name} is not in Nix's allowed-users ({}): the daemon refuses its connections",
                allowed_entries.join(" ")
            ));
        }
        let usable: Vec<&str> = config
            .executors
            .values()
            .filter(|e| access::allows(&access::entries(e.allowed_users.as_deref(), trusted), &who))
            .map(|e| e.name.as_str())
            .collect();
        if usable.is_empty() {
            out.push(format!(
                "warning: remote client {name} may use no executor: add it to an executor's allowed-users"
            ));
        } else {
            out.push(format!(
                "remote client {name}: may use {}",
                usable.join(", ")
            ));
        }
    }
    out
}

/// The account `name` of this machine, as the hook would see it coming
/// through the daemon.
pub fn lookup(name: &str) -> Option<Requester> {
    let a = crate::util::lookup_user(name).ok()?;
    Some(Requester::account(a.uid, Via::Daemon))
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("/t.toml")).unwrap()
    }

    const CONFIG: &str = r#"
remote-clients = ["fleet", "ci"]
[routes]
escape-sign = "signer"
escape-fetch = "fetcher"
[executors.signer]
kind = "host"
command = ["/x"]
allowed-users = ["fleet"]
[executors.fetcher]
kind = "host"
command = ["/x"]
allowed-users = ["@builders"]
"#;

    fn who(name: &str, uid: u32, groups: &[u32]) -> Requester {
        Requester {
            user: Some(name.to_owned()),
            uid: Some(uid),
            groups: groups.to_vec(),
            via: Via::Daemon,
            unknown_because: None,
        }
    }

    /// "fleet" and "ci" exist; "ci" is in the root group (gid 0), which
    /// stands in for a group that might be trusted.
    fn accounts(name: &str) -> Option<Requester> {
        match name {
            "fleet" => Some(who("fleet", 4001, &[4001])),
            "ci" => Some(who("ci", 4002, &[4002, 0])),
            _ => None,
        }
    }

    #[test]
    fn untrusted_clients_are_listed_with_their_executors() {
        let l = lines(
            &config(CONFIG),
            Some("root"),
            Some("*"),
            Some((2, 26)),
            accounts,
        );
        assert_eq!(
            l,
            [
                "remote client fleet: may use signer",
                "warning: remote client ci may use no executor: add it to an executor's allowed-users",
            ]
        );
    }

    #[test]
    fn a_trusted_client_is_warned_about_directly_by_group_and_by_star() {
        for trusted in ["root fleet", "root @root", "*"] {
            let l = lines(
                &config(CONFIG),
                Some(trusted),
                None,
                Some((2, 26)),
                accounts,
            );
            let warned: Vec<&String> = l
                .iter()
                .filter(|l| l.contains("is trusted by Nix"))
                .collect();
            let want = match trusted {
                "root fleet" => vec!["fleet"],
                "root @root" => vec!["ci"],
                _ => vec!["fleet", "ci"],
            };
            assert_eq!(warned.len(), want.len(), "{trusted}: {l:#?}");
            for (w, name) in warned.iter().zip(want) {
                assert!(
                    w.starts_with(&format!("warning: remote client {name} is trusted by Nix (trusted-users: {trusted}): ")),
                    "{w}"
                );
                assert!(w.contains("missing system features"), "{w}");
                assert!(
                    w.ends_with(&format!(
                        "remove {name} from trusted-users (directly, by group or *)"
                    )),
                    "{w}"
                );
            }
        }
    }

    #[test]
    fn old_nix_missing_accounts_and_refused_connections() {
        let c = config(&CONFIG.replace("\"ci\"]", "\"ci\", \"gone\"]"));
        let l = lines(&c, None, Some("@wheel fleet"), Some((2, 8)), accounts);
        assert!(
            l[0].starts_with("warning: remote-clients: Nix 2.8's daemon does not tell clients whether they are trusted"),
            "{l:#?}"
        );
        assert!(
            l.contains(&"error: remote-clients: no account \"gone\" on this machine".to_owned()),
            "{l:#?}"
        );
        assert!(
            l.contains(&"warning: remote client ci is not in Nix's allowed-users (@wheel fleet): the daemon refuses its connections".to_owned()),
            "{l:#?}"
        );
        assert!(
            !l.iter().any(|l| l.contains("client fleet is not in")),
            "{l:#?}"
        );
        // Nothing to say without remote clients.
        assert!(lines(&config(""), Some("*"), None, Some((2, 8)), accounts).is_empty());
    }
}
