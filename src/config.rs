//! The admin's configuration (`/etc/nix-hatch/config.toml`, or
//! `$NIX_HATCH_CONFIG`). Parsing collects every problem it finds, one line
//! each, so `nix-hatch check` can list them all and the hook can decline
//! with the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

pub use crate::executors::ssh::config::SshExecutor;

pub const DEFAULT_PATH: &str = "/etc/nix-hatch/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nix-hatch";

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
    /// Seconds; 0 = none. The smaller non-zero of this and Nix's wins.
    pub timeout: u64,
    pub max_silent_time: u64,
    /// Systems this executor builds for; `None` = any.
    pub systems: Option<Vec<String>>,
    /// NAR bytes all outputs of one build may have; `None` = no limit.
    pub max_output_size: Option<u64>,
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
    pub proxy: Option<crate::proxy::ProxySettings>,
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
    pub fn parse(s: &str) -> Result<Bind, String> {
        let (src, dst) = match s.split_once(':') {
            Some((a, b)) => (a, b),
            None => (s, s),
        };
        if !src.starts_with('/') || !dst.starts_with('/') {
            return Err(format!(
                "{s:?}: paths must be absolute (\"src\" or \"src:dst\")"
            ));
        }
        if dst == "/" || dst.split('/').any(|c| c == "..") {
            return Err(format!(
                "{s:?}: the destination must be a path below / without \"..\""
            ));
        }
        Ok(Bind {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
        })
    }
}

pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

#[derive(Debug, Clone)]
pub struct HostExecutor {
    /// The admin's command; the derivation's `args` are appended.
    pub command: Vec<String>,
    /// Run the derivation's own builder instead of `command`.
    pub allow_any_builder: bool,
    /// Derivation environment variables handed to the admin command.
    pub pass_env: Vec<String>,
    /// Which files the derivation's arguments may name.
    pub arg_paths: ArgPaths,
}

/// `arg-paths`: what a host command's arguments may name. Anyone who can
/// start a build chooses them, and the command reads files as its account
/// (root by default), so by default an argument can only name what the
/// derivation could read anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgPaths {
    /// `"inputs"` (default): an argument that is an absolute path (or an
    /// option `-…=` whose value is one) must resolve, symlinks
    /// followed, inside the derivation's input closure or below one of its
    /// outputs; no argument may contain a `..` component.
    Inputs,
    /// `"any"`: arguments are not looked at (the command checks them).
    Any,
}

/// Why `name` may not be in `pass-env`, if it may not: the command's
/// environment is the admin's, so nothing from the derivation may make the
/// loader, the C library or an interpreter load or run something, nor
/// replace a variable nix-hatch sets.
pub fn pass_env_problem(name: &str) -> Option<&'static str> {
    const LOADER: &[&str] = &[
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
    ];
    const LOADER_PREFIXES: &[&str] = &["LD_", "MALLOC_", "GLIBC_", "DYLD_"];
    const STARTUP: &[&str] = &[
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "IFS",
        "CDPATH",
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "PYTHONSTARTUP",
        "PYTHONPATH",
        "PYTHONHOME",
        "NODE_OPTIONS",
        "RUBYOPT",
        "RUBYLIB",
        "LUA_INIT",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
    ];
    if name.is_empty() || name.contains(['=', '\0']) {
        return Some("not a variable name");
    }
    if LOADER.contains(&name) || LOADER_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some("it makes the dynamic loader or the C library load files");
    }
    if STARTUP.contains(&name) || name.starts_with("BASH_FUNC_") {
        return Some("it makes a shell or an interpreter run code at start");
    }
    if name.starts_with("NIX_")
        || crate::protocol::hatch::AGENT_VARS.contains(&name)
        || name == "out"
    {
        return Some("nix-hatch sets this variable for the command");
    }
    None
}

/// Reports every `pass-env` entry [`pass_env_problem`] refuses.
pub(crate) fn check_pass_env(ctx: &str, names: &[String], p: &mut Problems) {
    for n in names {
        if let Some(why) = pass_env_problem(n) {
            p.push(format!("{ctx}.pass-env: {n:?} cannot be passed: {why}"));
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read config {}: {e}", path.display())])?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, Vec<String>> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| vec![format!("{}: {}", path.display(), one_line(&e))])?;
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

        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            fallback,
            routes,
            executors,
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
        Some("ssh") => crate::executors::ssh::config::local_user_name(),
        _ => "nobody".to_owned(),
    };
    let user = k.string(p, "user").unwrap_or(user_default);
    let max_jobs = k.uint(p, "max-jobs").unwrap_or(1);
    if max_jobs == 0 {
        p.push(format!("{ctx}.max-jobs: must be at least 1"));
    }
    let timeout = k.uint(p, "timeout").unwrap_or(0);
    let max_silent_time = k.uint(p, "max-silent-time").unwrap_or(0);
    let systems = k.string_list(p, "systems");
    let max_output_size = k.size(p, "max-output-size");
    let kind = match kind.as_deref() {
        None => {
            p.push(format!(
                "{ctx}: missing `kind` (one of \"host\", \"jail\", \"ssh\")"
            ));
            None
        }
        Some("host") => {
            let command = k.string_list(p, "command");
            let allow_any_builder = k.bool(p, "allow-any-builder").unwrap_or(false);
            let pass_env = k.string_list(p, "pass-env").unwrap_or_default();
            check_pass_env(&ctx, &pass_env, p);
            let arg_paths = match k.string(p, "arg-paths").as_deref() {
                None | Some("inputs") => ArgPaths::Inputs,
                Some("any") => ArgPaths::Any,
                Some(other) => {
                    p.push(format!(
                        "{ctx}.arg-paths: expected \"inputs\" or \"any\", got {other:?}"
                    ));
                    ArgPaths::Inputs
                }
            };
            match command {
                Some(c) if !c.is_empty() => {
                    if !c[0].starts_with('/') {
                        p.push(format!(
                            "{ctx}.command: the program must be an absolute path, got {:?}",
                            c[0]
                        ));
                    }
                    Some(ExecutorKind::Host(HostExecutor {
                        command: c,
                        allow_any_builder,
                        pass_env,
                        arg_paths,
                    }))
                }
                Some(_) => {
                    p.push(format!("{ctx}.command: must not be empty"));
                    None
                }
                None if allow_any_builder => Some(ExecutorKind::Host(HostExecutor {
                    command: Vec::new(),
                    allow_any_builder,
                    pass_env,
                    arg_paths,
                })),
                None => {
                    p.push(format!(
                        "{ctx}: missing `command` (the admin's program; or set allow-any-builder = true)"
                    ));
                    None
                }
            }
        }
        Some("jail") => parse_jail(&ctx, &mut k, p, &user),
        Some("ssh") => crate::executors::ssh::config::parse(&ctx, &mut k, p),
        Some(other) => {
            p.push(format!(
                "{ctx}: unknown kind {other:?} (expected \"host\", \"jail\" or \"ssh\")"
            ));
            None
        }
    };
    k.finish(p);
    Some(Executor {
        name: name.to_owned(),
        kind: kind?,
        user,
        max_jobs: max_jobs.clamp(1, u32::MAX as u64) as u32,
        timeout,
        max_silent_time,
        systems,
        max_output_size,
    })
}

fn parse_jail(ctx: &str, k: &mut Keys, p: &mut Problems, user: &str) -> Option<ExecutorKind> {
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
    let proxy = crate::proxy::config::parse(ctx, k, p, network == Network::Proxy);
    Some(ExecutorKind::Jail(JailExecutor {
        network,
        ro_binds,
        devices,
        nix_daemon,
        daemon_socket,
        bwrap,
        proxy,
    }))
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

/// `"512"`, `"64K"`, `"512M"`, `"10G"`, `"2T"` (powers of 1024; a
/// trailing `B` or `iB` is allowed); `None` for anything else or zero.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift).filter(|&v| v > 0)
}

fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
    match e.span() {
        Some(span) => format!("TOML syntax error at byte {}: {msg}", span.start),
        None => format!("TOML syntax error: {msg}"),
    }
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_owned))
        .collect()
}

#[derive(Default)]
pub(crate) struct Problems(Vec<String>);

impl Problems {
    pub(crate) fn push(&mut self, s: String) {
        self.0.push(s);
    }
}

/// Typed access to a table that remembers which keys were read, so the
/// rest can be reported as unknown.
pub(crate) struct Keys<'a> {
    table: &'a Table,
    ctx: String,
    seen: Vec<&'static str>,
}

impl<'a> Keys<'a> {
    fn new(table: &'a Table, ctx: &str) -> Self {
        Keys {
            table,
            ctx: ctx.to_owned(),
            seen: Vec::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.ctx.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.ctx)
        }
    }

    fn seen(&mut self, key: &'static str) {
        self.seen.push(key);
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.table.get(key)
    }

    /// The raw value of `key` (marked as read), for structured keys.
    pub(crate) fn value(&mut self, key: &'static str) -> Option<&'a Value> {
        self.get(key)
    }

    pub(crate) fn string(&mut self, p: &mut Problems, key: &'static str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                p.push(format!(
                    "{}: expected a string, got {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    pub(crate) fn uint(&mut self, p: &mut Problems, key: &'static str) -> Option<u64> {
        match self.get(key)? {
            Value::Integer(i) if *i >= 0 => Some(*i as u64),
            other => {
                p.push(format!(
                    "{}: expected a non-negative integer, got {other}",
                    self.key(key)
                ));
                None
            }
        }
    }

    /// A size in bytes: an integer, or a string with a K, M, G or T suffix
    /// (powers of 1024), e.g. `"10G"`.
    pub(crate) fn size(&mut self, p: &mut Problems, key: &'static str) -> Option<u64> {
        let parsed = match self.get(key)? {
            Value::Integer(i) if *i > 0 => Some(*i as u64),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            p.push(format!(
                "{}: expected a size in bytes, a positive integer or a string like \"512M\" or \"10G\"",
                self.key(key)
            ));
        }
        parsed
    }

    pub(crate) fn bool(&mut self, p: &mut Problems, key: &'static str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                p.push(format!(
                    "{}: expected true or false, got {other}",
                    self.key(key)
                ));
                None
            }
        }
    }

    pub(crate) fn string_list(
        &mut self,
        p: &mut Problems,
        key: &'static str,
    ) -> Option<Vec<String>> {
        let v = self.get(key)?;
        match string_list(v) {
            Some(l) => Some(l),
            None => {
                p.push(format!("{}: expected a list of strings", self.key(key)));
                None
            }
        }
    }

    fn table(&mut self, p: &mut Problems, key: &'static str) -> Option<&'a Table> {
        match self.get(key)? {
            Value::Table(t) => Some(t),
            other => {
                p.push(format!(
                    "{}: expected a table, got {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    fn finish(self, p: &mut Problems) {
        for k in self.table.keys() {
            if !self.seen.contains(&k.as_str()) {
                p.push(format!("{}: unknown key", self.key(k)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, Vec<String>> {
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

    #[test]
    fn pass_env_refuses_loader_startup_and_own_variables() {
        for bad in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "MALLOC_CHECK_",
            "BASH_ENV",
            "BASH_FUNC_x%%",
            "PATH",
            "HOME",
            "NIX_BUILD_TOP",
            "out",
            "A=B",
        ] {
            assert!(pass_env_problem(bad).is_some(), "{bad}");
        }
        for good in ["FILE", "version", "src", "GIT_REV"] {
            assert_eq!(pass_env_problem(good), None, "{good}");
        }
        let errs = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\npass-env = [\"FILE\", \"LD_PRELOAD\"]\narg-paths = \"some\"\n",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| {
                e.starts_with(
                "executors.a.pass-env: \"LD_PRELOAD\" cannot be passed: it makes the dynamic loader"
            )
            }),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("arg-paths: expected")),
            "{errs:?}"
        );
        let c = parse("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\n").unwrap();
        let ExecutorKind::Host(h) = &c.executors["a"].kind else {
            panic!("not host")
        };
        assert_eq!(h.arg_paths, ArgPaths::Inputs);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2TB"), Some(2 << 40));
        for bad in ["", "G", "-1G", "1.5G", "0", "10X", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        let c =
            parse("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-output-size = \"1G\"\n")
                .unwrap();
        assert_eq!(c.executors["a"].max_output_size, Some(1 << 30));
        let errs = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-output-size = \"lots\"\n",
        )
        .unwrap_err();
        assert!(
            errs[0].contains("max-output-size: expected a size"),
            "{errs:?}"
        );
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
