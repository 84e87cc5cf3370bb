//! The admin's configuration (`/etc/nix-hatch/config.toml`, or
//! `$NIX_HATCH_CONFIG`). Parsing collects every problem it finds, one line
//! each, so `nix-hatch check` can list them all and the hook can decline
//! with the first. Errors are those [`Problems`] (one value's: a
//! [`keys::Problem`]), both `thiserror` types: nothing distinguishes one
//! problem from another, but they are listed, not chained.
//!
//! The bottom layer: data and its parsing only, importing nothing of
//! nix-hatch above it. This file reads the top level and the keys every
//! executor has; one module per executor kind reads the rest (`host`,
//! `jail` with the policy proxy's keys in `proxy`, `ssh`), all with the
//! key reader of `keys`. What only this machine can tell (files,
//! permissions, accounts, connecting) is checked by `nix-hatch check`.

pub mod host;
pub mod jail;
pub mod keys;
pub mod limits;
pub mod proxy;
pub mod ssh;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use host::HostExecutor;
use jail::JailExecutor;
pub use keys::Problems;
use keys::{one_line, string_list, Keys};
pub use limits::ResourceLimits;
use ssh::SshExecutor;

pub const DEFAULT_PATH: &str = "/etc/nix-hatch/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nix-hatch";
/// The largest `queue` an executor may have.
pub const MAX_QUEUE: u64 = 1000;

/// The config file the hook and the CLI read by default.
pub fn default_path() -> PathBuf {
    match std::env::var_os("NIX_HATCH_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub fallback: Fallback,
    /// Escape feature → executor name (always an existing executor).
    pub routes: BTreeMap<String, String>,
    pub executors: BTreeMap<String, Executor>,
    /// Accounts through which other machines reach this one's nix-daemon
    /// (`ssh-ng://ACCOUNT@…` in their `builders`): what `nix-hatch check`
    /// checks for trust and access (README, "Serving other machines").
    pub remote_clients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// Nix's own remote-build hook when `builders` is set, else decline.
    Auto,
    Decline,
    /// Another hook program (argv) that gets every non-escape `try`.
    Hook(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Executor {
    pub name: String,
    pub kind: ExecutorKind,
    /// Account the command or builder runs as.
    pub user: String,
    pub max_jobs: u32,
    /// Builds that may wait inside the hook for a free slot (after
    /// `# accept`); further ones are postponed. 0 = never wait.
    pub queue: u32,
    /// Seconds; 0 = none. The smaller non-zero of this and Nix's wins.
    pub timeout: u64,
    pub max_silent_time: u64,
    /// Systems this executor builds for; `None` = any.
    pub systems: Option<Vec<String>>,
    /// NAR bytes all outputs of one build may have; `None` = no limit.
    pub max_output_size: Option<u64>,
    /// Who may use the executor, in nix.conf's syntax (names, `@group`,
    /// `*`); `None`: Nix's `trusted-users`.
    pub allowed_users: Option<Vec<String>>,
    /// `memory-max`, `tasks-max`, `cpu-max`, `cgroup-parent`.
    pub limits: ResourceLimits,
}

#[derive(Debug, Clone)]
pub enum ExecutorKind {
    Host(HostExecutor),
    Jail(JailExecutor),
    Ssh(SshExecutor),
}

impl ExecutorKind {
    pub fn name(&self) -> &'static str {
        match self {
            ExecutorKind::Host(_) => "host",
            ExecutorKind::Jail(_) => "jail",
            ExecutorKind::Ssh(_) => "ssh",
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems::from(vec![format!("cannot read config {}: {e}", path.display())])
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, Problems> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            Problems::from(vec![format!("{}: {}", path.display(), one_line(&e))])
        })?;
        let mut p = Problems::default();
        let mut top = Keys::new(&table, "");
        let state_dir = top
            .string(&mut p, "state-dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            p.push(format!(
                "state-dir: must be an absolute path, got {:?}",
                state_dir.display()
            ));
        }
        let fallback = match table.get("fallback") {
            None => Fallback::Auto,
            Some(Value::String(s)) if s == "auto" => Fallback::Auto,
            Some(Value::String(s)) if s == "decline" => Fallback::Decline,
            Some(v @ Value::Array(_)) => match string_list(v) {
                Some(argv) if !argv.is_empty() => Fallback::Hook(argv),
                _ => {
                    p.push("fallback: an argv list must be non-empty strings".into());
                    Fallback::Decline
                }
            },
            Some(other) => {
                p.push(format!(
                    "fallback: expected \"auto\", \"decline\" or an argv list, got {other}"
                ));
                Fallback::Decline
            }
        };
        top.seen("fallback");
        let remote_clients = top
            .string_list(&mut p, "remote-clients")
            .unwrap_or_default();
        for a in &remote_clients {
            if a.is_empty() || a.starts_with(['@', '*']) || a.contains(char::is_whitespace) {
                p.push(format!(
                    "remote-clients: {a:?} is not an account name (list the accounts other machines log in as)"
                ));
            }
        }
        let routes_table = top.table(&mut p, "routes");
        let executors_table = top.table(&mut p, "executors");
        top.finish(&mut p);

        let mut executors = BTreeMap::new();
        if let Some(t) = executors_table {
            for (name, v) in t {
                match v {
                    Value::Table(et) => {
                        if let Some(e) = parse_executor(name, et, &mut p) {
                            executors.insert(name.clone(), e);
                        }
                    }
                    _ => p.push(format!("executors.{name}: must be a table")),
                }
            }
        }

        let mut routes = BTreeMap::new();
        if let Some(t) = routes_table {
            for (feature, v) in t {
                match v {
                    Value::String(exec) => {
                        if !table_has_executor(&table, exec) {
                            p.push(format!(
                                "routes.{feature}: routes to executor {exec:?}, which is not defined under [executors]"
                            ));
                        } else if executors.contains_key(exec) {
                            routes.insert(feature.clone(), exec.clone());
                        }
                    }
                    _ => p.push(format!(
                        "routes.{feature}: must be the name of an executor (a string)"
                    )),
                }
            }
        }

        if !p.is_empty() {
            return Err(p);
        }
        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            fallback,
            routes,
            executors,
            remote_clients,
        })
    }

    pub fn executor_for_feature(&self, feature: &str) -> Option<&Executor> {
        self.routes
            .get(feature)
            .and_then(|name| self.executors.get(name))
    }
}

fn table_has_executor(table: &Table, name: &str) -> bool {
    matches!(table.get("executors"), Some(Value::Table(t)) if t.contains_key(name))
}

fn parse_executor(name: &str, t: &Table, p: &mut Problems) -> Option<Executor> {
    let ctx = format!("executors.{name}");
    let mut k = Keys::new(t, &ctx);
    let kind = k.string(p, "kind");
    let user_default = match kind.as_deref() {
        Some("host") => "root".to_owned(),
        // Like ssh(1): the remote account defaults to the local one.
        Some("ssh") => ssh::local_user_name(),
        _ => "nobody".to_owned(),
    };
    let user = k.string(p, "user").unwrap_or(user_default);
    let max_jobs = k.uint(p, "max-jobs").unwrap_or(1);
    if max_jobs == 0 {
        p.push(format!("{ctx}.max-jobs: must be at least 1"));
    }
    let max_jobs = max_jobs.clamp(1, u32::MAX as u64) as u32;
    // Every waiting build is a hook process that rescans the queue when
    // it changes: the bound keeps that cheap. The default stays within
    // it (a config without `queue` never fails on it).
    let queue = k
        .uint(p, "queue")
        .unwrap_or_else(|| (2 * u64::from(max_jobs)).min(MAX_QUEUE));
    if queue > MAX_QUEUE {
        p.push(format!(
            "{ctx}.queue: at most {MAX_QUEUE} builds can wait for a slot, got {queue}"
        ));
    }
    let timeout = k.uint(p, "timeout").unwrap_or(0);
    let max_silent_time = k.uint(p, "max-silent-time").unwrap_or(0);
    let systems = k.string_list(p, "systems");
    let max_output_size = k.size(p, "max-output-size");
    let allowed_users = k.string_list(p, "allowed-users");
    let limits = limits::parse(&ctx, &mut k, p);
    for u in allowed_users.iter().flatten() {
        if u.is_empty() || u == "@" || u.contains(char::is_whitespace) {
            p.push(format!(
                "{ctx}.allowed-users: {u:?} is not an account name, @group or \"*\""
            ));
        }
    }
    let kind = match kind.as_deref() {
        None => {
            p.push(format!(
                "{ctx}: missing `kind` (one of \"host\", \"jail\", \"ssh\")"
            ));
            None
        }
        Some("host") => host::parse(&ctx, &mut k, p).map(ExecutorKind::Host),
        Some("jail") => jail::parse(&ctx, &mut k, p, &user).map(ExecutorKind::Jail),
        Some("ssh") => ssh::parse(&ctx, &mut k, p).map(ExecutorKind::Ssh),
        Some(other) => {
            p.push(format!(
                "{ctx}: unknown kind {other:?} (expected \"host\", \"jail\" or \"ssh\")"
            ));
            None
        }
    };
    if t.contains_key("tmp-size") && !matches!(kind, Some(ExecutorKind::Jail(_))) {
        k.seen("tmp-size");
        p.push(format!(
            "{ctx}.tmp-size: only a jail's build dir and /tmp can be made a tmpfs of a given size"
        ));
    }
    k.finish(p);
    Some(Executor {
        name: name.to_owned(),
        kind: kind?,
        user,
        max_jobs,
        queue: queue.min(MAX_QUEUE) as u32,
        timeout,
        max_silent_time,
        systems,
        max_output_size,
        allowed_users,
        limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `s` as the config file `/test.toml` (for the tests of every module
    /// of `config`).
    pub(super) fn parse(s: &str) -> Result<Config, Problems> {
        Config::parse(s, Path::new("/test.toml"))
    }

    const GOOD: &str = r#"
state-dir = "/var/lib/nix-hatch"
fallback = "decline"
[routes]
escape-sign = "signer"
[executors.signer]
kind = "host"
command = ["/usr/local/bin/sign", "--key", "/k"]
user = "root"
max-jobs = 2
timeout = 600
pass-env = ["FILE"]
"#;

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.fallback, Fallback::Decline);
        let e = c.executor_for_feature("escape-sign").unwrap();
        assert_eq!(e.max_jobs, 2);
        assert_eq!(e.queue, 4, "the default queue is 2 × max-jobs");
        assert_eq!(e.timeout, 600);
        let ExecutorKind::Host(h) = &e.kind else {
            panic!("not host")
        };
        assert_eq!(h.command[0], "/usr/local/bin/sign");
        assert_eq!(h.pass_env, vec!["FILE"]);
        assert!(c.executor_for_feature("other").is_none());
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.fallback, Fallback::Auto);
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert!(c.routes.is_empty());
    }

    #[test]
    fn every_problem_is_one_line() {
        let errs = parse(
            r#"
statedir = "/x"
[routes]
escape-a = "missing"
escape-b = "broken"
escape-c = 3
[executors.broken]
kind = "host"
comand = ["/bin/true"]
[executors.weird]
kind = "teleport"
[executors.nokind]
user = "root"
"#,
        )
        .unwrap_err();
        let want = [
            "statedir: unknown key",
            "routes.escape-a: routes to executor \"missing\", which is not defined under [executors]",
            "routes.escape-c: must be the name of an executor (a string)",
            "executors.broken: missing `command`",
            "executors.broken.comand: unknown key",
            "executors.weird: unknown kind \"teleport\"",
            "executors.nokind: missing `kind`",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "{w:?} not in {errs:#?}"
            );
        }
        assert!(errs.iter().all(|e| !e.contains('\n')), "{errs:#?}");
    }

    #[test]
    fn allowed_users() {
        let c = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nallowed-users = [\"ci\", \"@release\", \"*\"]\n[executors.b]\nkind = \"host\"\ncommand = [\"/x\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.executors["a"].allowed_users.as_deref(),
            Some(&["ci".to_owned(), "@release".to_owned(), "*".to_owned()][..])
        );
        assert_eq!(c.executors["b"].allowed_users, None);
        let errs = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nallowed-users = [\"@\", \"a b\"]\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("executors.a.allowed-users: \"@\" is not"));
    }

    #[test]
    fn remote_clients_are_account_names() {
        let c = parse("remote-clients = [\"fleet-a\", \"ci\"]\n").unwrap();
        assert_eq!(c.remote_clients, ["fleet-a", "ci"]);
        assert!(parse("").unwrap().remote_clients.is_empty());
        let errs = parse("remote-clients = [\"@fleet\", \"*\", \"a b\"]\n").unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("remote-clients: \"@fleet\" is not an account name"));
        let errs = parse("remote-clients = \"fleet-a\"\n").unwrap_err();
        assert!(errs[0].starts_with("remote-clients: expected"), "{errs:?}");
    }

    #[test]
    fn queue() {
        let exec = |extra: &str| {
            format!("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-jobs = 3\n{extra}")
        };
        assert_eq!(parse(&exec("")).unwrap().executors["a"].queue, 6);
        assert_eq!(parse(&exec("queue = 0")).unwrap().executors["a"].queue, 0);
        assert_eq!(
            parse(&exec("queue = 1000")).unwrap().executors["a"].queue,
            1000
        );
        let errs = parse(&exec("queue = 1001")).unwrap_err();
        assert_eq!(
            errs[0],
            "executors.a.queue: at most 1000 builds can wait for a slot, got 1001"
        );
        let errs = parse(&exec("queue = -1")).unwrap_err();
        assert!(errs[0].starts_with("executors.a.queue: expected a non-negative integer"));
        // A large max-jobs without `queue` stays a valid config.
        let big = "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-jobs = 600\n";
        assert_eq!(parse(big).unwrap().executors["a"].queue, 1000);
    }

    #[test]
    fn syntax_error_is_one_line() {
        let errs = parse("[routes\nx=").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("TOML syntax error"), "{errs:?}");
        assert!(!errs[0].contains('\n'));
    }

    #[test]
    fn relative_command_and_zero_jobs() {
        let errs = parse("[executors.a]\nkind = \"host\"\ncommand = [\"sign\"]\nmax-jobs = 0\n")
            .unwrap_err();
        assert!(errs.iter().any(|e| e.contains("absolute path")));
        assert!(errs
            .iter()
            .any(|e| e.contains("max-jobs: must be at least 1")));
    }
}
