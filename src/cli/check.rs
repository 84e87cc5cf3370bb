//! `nix-hatch check`: every problem one line, exit 1 if any; else the routes.
//!
//! Parsing the config (`crate::config`) finds what the file itself gets
//! wrong; the probes here find what only this machine can tell: accounts,
//! programs, devices, key and known-hosts files, credential value files,
//! trust stores, and (with `--connect`) the far side of an `ssh` executor.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::jail::{Bind, JailExecutor};
use crate::config::proxy::ProxySettings;
use crate::config::ssh::SshExecutor;
use crate::config::{Config, ExecutorKind};

/// Problems only visible on this machine (accounts, programs).
pub fn environment_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for e in config.executors.values() {
        // An ssh executor's user is an account on the far side.
        if !matches!(e.kind, ExecutorKind::Ssh(_)) {
            if let Err(err) = crate::util::lookup_user(&e.user) {
                problems.push(format!("executors.{}.user: {err:#}", e.name));
            }
        }
        match &e.kind {
            ExecutorKind::Host(h) => {
                if let Some(prog) = h.command.first() {
                    match std::fs::metadata(prog) {
                        Ok(m) if m.is_file() => {
                            if m.permissions().mode() & 0o111 == 0 {
                                problems.push(format!(
                                    "executors.{}.command: {prog} is not executable",
                                    e.name
                                ));
                            }
                        }
                        Ok(_) => problems.push(format!(
                            "executors.{}.command: {prog} is not a file",
                            e.name
                        )),
                        Err(err) => {
                            problems.push(format!("executors.{}.command: {prog}: {err}", e.name))
                        }
                    }
                }
            }
            ExecutorKind::Jail(j) => problems.extend(jail_problems(&e.name, &e.user, j)),
            ExecutorKind::Ssh(s) => problems.extend(ssh_problems(&e.name, s)),
        }
    }
    problems
}

/// bwrap present and able to build a user namespace as the jail's account;
/// configured devices and ro-binds present.
fn jail_problems(name: &str, user: &str, j: &JailExecutor) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(px) = &j.proxy {
        problems.extend(proxy_problems(name, px, &j.ro_binds));
    }
    for d in &j.devices {
        if !d.exists() {
            problems.push(format!("executors.{name}.devices: {} does not exist on this machine (builds will fail naming it)", d.display()));
        }
    }
    for b in &j.ro_binds {
        if !b.src.exists() {
            problems.push(format!(
                "executors.{name}.ro-binds: {} does not exist",
                b.src.display()
            ));
        }
    }
    if j.nix_daemon && !j.daemon_socket.exists() {
        problems.push(format!(
            "executors.{name}.nix-daemon: no daemon socket at {}",
            j.daemon_socket.display()
        ));
    }
    if j.tmp_size.is_some() && j.bwrap.is_file() {
        let help = std::process::Command::new(&j.bwrap)
            .arg("--help")
            .stdin(std::process::Stdio::null())
            .output();
        if help.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("--size")) {
            problems.push(format!(
                "executors.{name}.tmp-size: bubblewrap at {} has no --size option (it came with bubblewrap 0.8)",
                j.bwrap.display()
            ));
        }
    }
    if !j.bwrap.is_file() {
        problems.push(format!(
            "executors.{name}: bubblewrap not found at {} (install Debian's `bubblewrap`, or set `bwrap`)",
            j.bwrap.display()
        ));
        return problems;
    }
    let Ok(account) = crate::util::lookup_user(user) else {
        return problems;
    };
    let mut cmd = std::process::Command::new(&j.bwrap);
    cmd.args([
        "--unshare-user",
        "--unshare-pid",
        "--ro-bind",
        "/",
        "/",
        "--",
        // /bin/sh is the one program NixOS has under /bin as well.
        "/bin/sh",
        "-c",
        "exit 0",
    ])
    .stdin(std::process::Stdio::null());
    crate::util::run_as(&mut cmd, &account);
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => problems.push(format!(
            "executors.{name}: bubblewrap cannot create a user namespace as {user:?}: {} (are unprivileged user namespaces disabled? see /proc/sys/user/max_user_namespaces)",
            crate::util::first_line(&String::from_utf8_lossy(&o.stderr))
        )),
        Err(e) => problems.push(format!("executors.{name}: running {}: {e}", j.bwrap.display())),
    }
    problems
}

/// What `nix-hatch check` verifies of a jail's proxy on this machine: every
/// value file is a root-owned regular file without group or other
/// permissions, readable, and not exposed to the jail by a `ro-binds`
/// entry; the upstream CA bundle holds certificates.
fn proxy_problems(name: &str, s: &ProxySettings, ro_binds: &[Bind]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in s.credentials.iter().enumerate() {
        let at = format!("executors.{name}.credentials[{i}].value-file");
        if let Err(e) = crate::proxy::credentials::read_value_file(&c.value_file) {
            out.push(format!("{at}: {e}"));
        }
        for b in ro_binds {
            if c.value_file.starts_with(&b.src) {
                out.push(format!(
                    "{at}: {} is inside ro-binds entry {}: the jail could read the secret",
                    c.value_file.display(),
                    b.src.display()
                ));
            }
        }
    }
    if let Err(e) = crate::proxy::ca::read_pem_bundle(s.upstream_ca_path()) {
        out.push(format!("executors.{name}.upstream-ca: {e}"));
    }
    out
}

/// An `ssh` executor's problems visible without connecting: key and
/// known-hosts files.
fn ssh_problems(name: &str, s: &SshExecutor) -> Vec<String> {
    let mut problems = Vec::new();
    match std::fs::metadata(&s.identity) {
        Err(e) => problems.push(format!(
            "executors.{name}.identity: {}: {e}",
            s.identity.display()
        )),
        Ok(m) if !m.is_file() => problems.push(format!(
            "executors.{name}.identity: {} is not a file",
            s.identity.display()
        )),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                problems.push(format!(
                    "executors.{name}.identity: {} is accessible by group or others (mode {mode:o}); chmod 600 it",
                    s.identity.display()
                ));
            }
            if let Err(e) = std::fs::File::open(&s.identity) {
                problems.push(format!(
                    "executors.{name}.identity: {}: {e}",
                    s.identity.display()
                ));
            }
        }
    }
    match std::fs::read_to_string(&s.known_hosts) {
        Err(e) => problems.push(format!(
            "executors.{name}.known-hosts: {}: {e}",
            s.known_hosts.display()
        )),
        Ok(text) => {
            if let Err(e) = crate::executors::ssh::connect::parse_known_hosts(&s.known_hosts) {
                problems.push(format!("executors.{name}.known-hosts: {e}"));
            } else if text.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with('#')
            }) {
                problems.push(format!(
                    "executors.{name}.known-hosts: {} has no host keys; every connection would be refused",
                    s.known_hosts.display()
                ));
            }
        }
    }
    problems
}

pub fn run(path: &Path) -> i32 {
    // Informational, except for a Nix nix-hatch cannot be the hook of
    // (Lix ≥ 2.94): then `check` fails after reporting on the config.
    let nix_lines = super::nix_version::check_lines();
    for line in &nix_lines {
        println!("{line}");
    }
    let nix_unusable = super::nix_version::unusable(&nix_lines);
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(problems) => {
            for p in problems {
                println!("error: {p}");
            }
            return 1;
        }
    };
    let mut problems = environment_problems(&config);
    let (limits_lines, limits_problems) = limits_report(&config);
    problems.extend(limits_problems);
    if !problems.is_empty() {
        for p in problems {
            println!("error: {p}");
        }
        return 1;
    }
    println!("config {}: ok", path.display());
    println!("state-dir: {}", config.state_dir.display());
    if config.routes.is_empty() {
        println!("no routes: every derivation goes where Nix would build it without nix-hatch");
    }
    for (feature, exec) in &config.routes {
        if let Some(e) = config.executors.get(exec) {
            println!(
                "route: {feature} -> {exec} (kind {}, user {}, max-jobs {})",
                e.kind.name(),
                e.user,
                e.max_jobs
            );
        }
    }
    let trusted = super::nix_version::trusted_users();
    for e in config.executors.values() {
        println!(
            "executor {}: {}",
            e.name,
            super::explain::who_may(e, trusted.as_deref())
        );
        println!("executor {}: {}", e.name, super::explain::queue_policy(e));
        if let Some(w) = open_privilege_warning(e, trusted.as_deref()) {
            println!("warning: {w}");
        }
    }
    let mut status = 0;
    if !config.remote_clients.is_empty() {
        let nix = super::nix_version::detect()
            .ok()
            .and_then(|v| super::nix_version::parse(&v))
            .map(|v| v.nix_equivalent());
        let allowed = super::nix_version::setting("allowed-users");
        for line in super::serve::lines(
            &config,
            trusted.as_deref(),
            allowed.as_deref(),
            nix,
            super::serve::lookup,
        ) {
            if line.starts_with("error:") {
                status = 1;
            }
            println!("{line}");
        }
    }
    for line in limits_lines {
        println!("{line}");
    }
    for e in config.executors.values() {
        if !config.routes.values().any(|r| r == &e.name) {
            println!("warning: executor {} has no route", e.name);
        }
        let local_account = !matches!(e.kind, ExecutorKind::Ssh(_));
        if local_account && e.user == "nobody" {
            println!(
                "warning: executor {} runs builds as nobody, which other services share: \
                 they could reach its builds' files; use an account of its own",
                e.name
            );
        }
    }
    if let crate::config::Fallback::Hook(argv) = &config.fallback {
        let name = argv
            .first()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("nix-hatch") {
            println!(
                "warning: fallback runs {name}: a nix-hatch hook does not delegate again, \
                 so derivations without an escape feature are declined there"
            );
        }
    }
    if nix_unusable {
        status = 1;
    }
    status
}

/// How each executor's resource limits will be enforced here, tried for
/// real (a cgroup made and removed, see `executors::limits::probe`), from
/// where the hook runs: beside nix-daemon's cgroup when a daemon runs,
/// else this process's. Lines to print, and the problems (limits that
/// could not be enforced: such builds would fail).
fn limits_report(config: &Config) -> (Vec<String>, Vec<String>) {
    use crate::executors::cgroup::Cgroups;
    let (mut lines, mut problems) = (Vec::new(), Vec::new());
    let mut placed: Option<(String, Cgroups)> = None;
    for e in config.executors.values() {
        let tmp = match &e.kind {
            ExecutorKind::Jail(j) => j.tmp_size,
            _ => None,
        };
        if let Some(size) = tmp {
            lines.push(format!(
                "limits: executor {}: tmp-size {}: the build dir and /tmp are each a tmpfs of that size (bubblewrap --size)",
                e.name,
                crate::usage::human_bytes(size)
            ));
        }
        if !e.limits.wants_cgroup() {
            continue;
        }
        let what = e.limits.describe();
        if let ExecutorKind::Ssh(_) = e.kind {
            lines.push(format!(
                "limits: executor {}: {what}: applied on the far side by its agent (`nix-hatch check --connect` tries them there)",
                e.name
            ));
            continue;
        }
        let (whose, cg) = placed.get_or_insert_with(hook_cgroups);
        match crate::executors::limits::probe(cg, &e.limits) {
            Ok(how) => lines.push(format!(
                "limits: executor {}: {what}: enforced by {how}{whose}",
                e.name
            )),
            Err(why) if e.limits.any() => problems.push(format!(
                "executors.{}: cannot enforce {what}: no usable cgroup: {why} (its builds would fail, never run unlimited)",
                e.name
            )),
            Err(why) => lines.push(format!(
                "warning: executor {}: cgroup-parent is set but no cgroup can be made there ({why}); builds run without one",
                e.name
            )),
        }
    }
    (lines, problems)
}

/// Where the hook runs, for the default `cgroup-parent` (beside the
/// hook's cgroup): where nix-daemon's main process is, when one runs
/// (its hooks are its children), else where this process is. Only a
/// root-owned `nix-daemon` counts (any account can name a process so,
/// and root's probe then works in that process's cgroup), and not a
/// `nix-daemon --stdio` of an ssh-ng session.
fn hook_cgroups() -> (String, crate::executors::cgroup::Cgroups) {
    use crate::executors::cgroup::Cgroups;
    use std::os::unix::fs::MetadataExt;
    let root_owned =
        |pid: &str| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == 0);
    let stdio = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"--stdio"))
    };
    let comm = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default()
    };
    let parent_comm = |pid: &str| {
        pid.parse()
            .ok()
            .and_then(crate::util::parent_pid)
            .map(|p| comm(&p.to_string()))
            .unwrap_or_default()
    };
    let daemon = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .find(|p| {
            comm(p) == "nix-daemon" && parent_comm(p) != "nix-daemon" && root_owned(p) && !stdio(p)
        });
    match daemon {
        Some(pid) => (
            format!(" (for hooks of nix-daemon, pid {pid})"),
            Cgroups::detect_for(&pid),
        ),
        None => (String::new(), Cgroups::detect()),
    }
}

/// What `check` warns about a privileged executor everyone may use: a
/// `host` command run as root, or any derivation's own builder run on the
/// host (`allow-any-builder`).
fn open_privilege_warning(e: &crate::config::Executor, trusted: Option<&str>) -> Option<String> {
    let entries = crate::hook::access::entries(e.allowed_users.as_deref(), trusted);
    if !entries.iter().any(|x| x == "*") {
        return None;
    }
    let ExecutorKind::Host(h) = &e.kind else {
        return None;
    };
    if h.allow_any_builder {
        Some(format!(
            "executor {} runs the derivation's own builder on the host as {} (allow-any-builder) and is open to everyone (*): anyone who can start a build here can run any code as {}",
            e.name, e.user, e.user
        ))
    } else if e.user == "root" || e.user == "0" {
        Some(format!(
            "executor {} runs its command as root and is open to everyone (*): anyone who can start a build here can run it with arguments of their choice",
            e.name
        ))
    } else {
        None
    }
}

/// `nix-hatch check --connect`: the usual checks, then one line per `ssh`
/// executor (ok, or why not); exit 1 if any check or connection failed.
pub fn run_connect(path: &Path) -> i32 {
    let mut status = run(path);
    let Ok(config) = Config::load(path) else {
        return 1;
    };
    for e in config.executors.values() {
        if let ExecutorKind::Ssh(s) = &e.kind {
            match connect_and_ask_version(&e.user, s) {
                Ok(line) => println!("connect: executor {}: {line}", e.name),
                Err(why) => {
                    println!("error: connect: executor {}: {why}", e.name);
                    status = 1;
                    continue;
                }
            }
            if e.limits.wants_cgroup() {
                match crate::executors::ssh::probe_limits(s, &e.user, &e.limits) {
                    Ok(line) => println!("limits: executor {} (far side): {line}", e.name),
                    Err(why) => {
                        println!("error: limits: executor {} (far side): {why}", e.name);
                        status = 1;
                    }
                }
            }
        }
    }
    status
}

/// For `check --connect`: log in to an `ssh` executor's machine, check the
/// host key, and run `<agent> --version` on the far side.
fn connect_and_ask_version(user: &str, s: &SshExecutor) -> Result<String, String> {
    use std::io::Read;
    let conn = crate::executors::ssh::connect::connect(s, user)?;
    let t = &conn.target;
    let mut ch = conn
        .session
        .channel_session()
        .map_err(|e| format!("ssh {t}: opening a channel: {e}"))?;
    let cmd = format!("{} --version", crate::executors::ssh::shell_quote(&s.agent));
    ch.exec(&cmd)
        .map_err(|e| format!("ssh {t}: running {cmd:?}: {e}"))?;
    let mut out = String::new();
    let mut err = String::new();
    let _ = ch.read_to_string(&mut out);
    let _ = ch.stderr().read_to_string(&mut err);
    let _ = ch.wait_close();
    let status = ch.exit_status().unwrap_or(-1);
    let _ = conn.session.disconnect(None, "done", None);
    if status != 0 {
        let why = crate::util::first_line(&err);
        return Err(format!(
            "ssh {t}: the agent does not run there: `{cmd}` exited with {status}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ));
    }
    Ok(format!(
        "ssh {t}: ok (host key {}, agent {})",
        conn.host_key,
        crate::util::first_line(&out)
    ))
}
