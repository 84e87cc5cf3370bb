//! Who may use an executor: its `allowed-users` (nix.conf's syntax: account
//! names, `@group`, `*`) against the [`Requester`]. Without the key, Nix's
//! own `trusted-users` (as Nix sends them in the hook's settings) decide:
//! a fresh config opens no privileged escape to everyone. Root may always
//! (it owns the config anyway).

use super::requester::Requester;

/// The entries that decide for an executor: its own `allowed-users`, else
/// the `trusted-users` setting (whitespace-separated; Nix's default is
/// `root`).
pub fn entries(allowed_users: Option<&[String]>, trusted_users: Option<&str>) -> Vec<String> {
    match allowed_users {
        Some(list) => list.to_vec(),
        None => trusted_users
            .unwrap_or("root")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    }
}

/// Whether `who` is root or matches one of `entries`. An account nix-hatch
/// could not determine matches only `*`.
pub fn allows(entries: &[String], who: &Requester) -> bool {
    if who.uid == Some(0) {
        return true;
    }
    entries.iter().any(|e| {
        if e == "*" {
            return true;
        }
        if let Some(group) = e.strip_prefix('@') {
            return group_gid(group).is_some_and(|g| who.groups.contains(&g));
        }
        who.user.as_deref() == Some(e.as_str())
    })
}

fn group_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// How `entries` read in a message: `root, alice, @release` or `everyone
/// (*)`.
pub fn describe(entries: &[String]) -> String {
    if entries.iter().any(|e| e == "*") {
        return "everyone (*)".to_owned();
    }
    let mut shown = vec!["root"];
    shown.extend(entries.iter().map(String::as_str).filter(|e| *e != "root"));
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::requester::Via;
    use super::*;

    fn who(user: &str, groups: &[u32]) -> Requester {
        Requester {
            user: Some(user.into()),
            uid: Some(4242),
            groups: groups.to_vec(),
            via: Via::Daemon,
            unknown_because: None,
        }
    }

    fn list(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn names_groups_and_everyone() {
        let root_gid = group_gid("root").unwrap();
        assert!(allows(&list(&["ci", "alice"]), &who("alice", &[])));
        assert!(!allows(&list(&["ci", "alice"]), &who("bob", &[root_gid])));
        assert!(allows(&list(&["@root"]), &who("bob", &[root_gid])));
        assert!(!allows(&list(&["@root"]), &who("bob", &[root_gid + 12345])));
        assert!(!allows(
            &list(&["@no-such-group-here"]),
            &who("bob", &[root_gid])
        ));
        assert!(allows(&list(&["*"]), &who("anyone", &[])));
        assert!(!allows(&[], &who("alice", &[])));
        assert_eq!(who("alice", &[]).uid, Some(4242));
        // Names are exact: no prefixes, no case folding.
        assert!(!allows(&list(&["alic"]), &who("alice", &[])));
        assert!(!allows(&list(&["Alice"]), &who("alice", &[])));
    }

    #[test]
    fn an_unknown_account_matches_only_everyone() {
        let u = Requester::unknown("test");
        assert!(!allows(&list(&["root", "@root", ""]), &u));
        assert!(allows(&list(&["ci", "*"]), &u));
    }

    #[test]
    fn the_default_is_nixs_trusted_users_and_root_may_always() {
        assert_eq!(
            entries(None, Some("alice @wheel")),
            list(&["alice", "@wheel"])
        );
        assert_eq!(entries(None, None), list(&["root"]));
        assert_eq!(entries(Some(&list(&["ci"])), Some("alice")), list(&["ci"]));
        let mut root = who("root", &[]);
        root.uid = Some(0);
        assert!(allows(&list(&["ci"]), &root));
        assert!(allows(&[], &root));
        assert_eq!(describe(&list(&["ci", "@release"])), "root, ci, @release");
        assert_eq!(describe(&list(&["root", "ci"])), "root, ci");
        assert_eq!(describe(&list(&["ci", "*"])), "everyone (*)");
    }
}
