//! Harness for end-to-end tests against the real Nix installed on the machine
//! (Debian 12: Nix 2.8 from `nix-bin`), or Nix 2.26 in a Debian 13 root, or
//! Nix 2.34 in a Debian sid root.
//!
//! Which Nix and which hook form (both set by `scripts/test`):
//! - `NIX_HATCH_TEST_NIX=2.26` or `2.34`: the test binary runs inside a
//!   Debian trixie or sid root (`scripts/nix-root --nix V run`, cargo's
//!   target runner), so every Nix command,
//!   the hook and the test's own reads of /nix/store and /proc see that
//!   root's Nix and store. The harness only checks that `nix-store
//!   --version` is the announced one (a misconfigured run fails loudly
//!   instead of testing the wrong Nix).
//! - `NIX_HATCH_TEST_HOOK=list`: `build-hook = <nix-hatch> hook --config
//!   <config>` (the list form Nix ≥ 2.19 accepts); default `path`:
//!   `build-hook = <nix-hatch-hook>` with `NIX_HATCH_CONFIG` (every Nix).
//!
//! Every test gets a [`TestEnv`]: a private temp dir holding the hook's
//! config, its state dir, the admin command scripts and the Nix expressions,
//! plus a nonce that goes into every derivation so that outputs are never
//! already valid from an earlier run (all tests share the real /nix/store and
//! run in parallel).
//!
//! Facts about Nix 2.8 this harness relies on (checked on Debian 12):
//! - `--option build-hook ""` does not disable the hook in 2.8 (it tries to
//!   exec ""), so "no hook" means "leave the option at its default".
//! - `nix-daemon` and clients both honour `NIX_DAEMON_SOCKET_PATH`; a client
//!   goes through the daemon with `NIX_REMOTE=daemon`. The daemon takes its
//!   settings from `$NIX_CONF_DIR/nix.conf` and passes its own environment to
//!   the hook it spawns.
//! - `nix log` is `nix --extra-experimental-features nix-command log`; give it
//!   `--option substituters ""` or it first retries cache.nixos.org.
//! - Nix prints ANSI colour codes even when stderr is a pipe (errors), so
//!   [`Output::stderr`] has them stripped.
//!
//! And about Nix 2.26 (Debian 13) and 2.34 (Debian sid), where they differ:
//! - `build-hook` is a list; `--option build-hook "prog arg…"` splits it on
//!   whitespace. Nix 2.25 … 2.33 ignore `build-hook` from the system
//!   nix.conf (see [`nix_conf_build_hook_ignored`]); [`Daemon`] then also
//!   passes it in `NIX_CONFIG` (2.34 reads nix.conf again, so there the
//!   daemon tests use nix.conf alone).
//! - Nix's words for a failed build and for a derivation nothing can build
//!   changed in 2.29 … 2.32 ([`Output::assert_builder_failed`],
//!   [`Output::says_unbuildable_here`]).
//! - Everything else above holds (daemon socket variable, `nix log`
//!   spelling).
#![allow(dead_code)]

pub mod sshd;
pub mod tls;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The hook binary Nix execs (`build-hook = ...` on Nix 2.8).
pub const HOOK: &str = env!("CARGO_BIN_EXE_nix-hatch-hook");
/// The CLI binary.
pub const CLI: &str = env!("CARGO_BIN_EXE_nix-hatch");

/// Wall-clock limit for any single Nix command a test runs. A hung build
/// fails the test instead of hanging `cargo test`.
pub const NIX_LIMIT: Duration = Duration::from_secs(300);

/// The feature routed to the host executor in the standard test config.
pub const FEATURE: &str = "escape-x";
/// The executor name in the standard test config.
pub const EXECUTOR: &str = "hostx";

pub fn hook_bin() -> PathBuf {
    PathBuf::from(HOOK)
}

/// How the tests configure `build-hook` (`NIX_HATCH_TEST_HOOK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookForm {
    /// `build-hook = /path/nix-hatch-hook`, config from `NIX_HATCH_CONFIG`.
    Path,
    /// `build-hook = /path/nix-hatch hook --config /path/config.toml`.
    List,
}

pub fn hook_form() -> HookForm {
    match std::env::var("NIX_HATCH_TEST_HOOK").as_deref() {
        Ok("list") => HookForm::List,
        Ok("path") | Ok("") | Err(_) => HookForm::Path,
        Ok(other) => panic!("NIX_HATCH_TEST_HOOK={other:?}: expected \"path\" or \"list\""),
    }
}

/// The `build-hook` value that runs nix-hatch with `config`.
pub fn hook_setting(config: &Path) -> String {
    match hook_form() {
        HookForm::Path => HOOK.to_owned(),
        HookForm::List => format!("{CLI} hook --config {}", config.display()),
    }
}

/// The executable of the hook process Nix starts.
pub fn hook_exe() -> &'static str {
    match hook_form() {
        HookForm::Path => HOOK,
        HookForm::List => CLI,
    }
}

/// `nix-store --version` of the Nix under test, e.g. `2.26.3`.
pub fn nix_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let out = run(
            nix_cmd("nix-store").arg("--version"),
            Duration::from_secs(30),
        );
        out.assert_ok();
        out.stdout
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned()
    })
}

/// (major, minor) of [`nix_version`].
pub fn nix_minor() -> (u32, u32) {
    let mut it = nix_version().split('.').map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Nix 2.25 … 2.33 overwrite `build-hook` from the system nix.conf with
/// their default (`nix __build-remote`) right after reading it
/// (NixOS/nix#15083, fixed in 2.34); `NIX_CONFIG`, user config files and
/// `--option` still work.
pub fn nix_conf_build_hook_ignored() -> bool {
    ((2, 25)..(2, 34)).contains(&nix_minor())
}

/// Fails unless the Nix on PATH is the one `NIX_HATCH_TEST_NIX` announces
/// and it supports the hook form under test.
#[track_caller]
pub fn check_nix_under_test() {
    if let Ok(want) = std::env::var("NIX_HATCH_TEST_NIX") {
        let have = nix_version();
        assert!(
            have == want || have.starts_with(&format!("{want}.")),
            "NIX_HATCH_TEST_NIX={want} but nix-store on PATH is {have} (run the suite through scripts/test --nix {want})"
        );
    }
    if hook_form() == HookForm::List {
        assert!(
            nix_minor() >= (2, 19),
            "NIX_HATCH_TEST_HOOK=list needs Nix >= 2.19 (build-hook as a list); this is {}",
            nix_version()
        );
    }
}

pub fn cli_bin() -> PathBuf {
    PathBuf::from(CLI)
}

/// A string unique to this process and call: goes into derivation names and
/// attributes so every run produces fresh output paths.
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{:x}{:x}{n}", nanos, std::process::id())
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// The result of a command: status plus captured output (ANSI stripped).
#[derive(Debug)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics (showing everything) unless the command succeeded.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "command failed:\n{}", self.describe());
        self
    }

    /// Panics (showing everything) unless the command failed.
    #[track_caller]
    pub fn assert_failed(&self) -> &Self {
        assert!(
            !self.success(),
            "command unexpectedly succeeded:\n{}",
            self.describe()
        );
        self
    }

    /// Panics unless stderr contains `needle`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr does not contain {needle:?}:\n{}",
            self.describe()
        );
        self
    }

    /// Whether Nix said nothing can build `drv` (any derivation: `None`)
    /// for its system or features, in the words of every Nix here:
    /// "a '…' with features {…} is required to build '…'" (≤ 2.29),
    /// "Cannot build '…'." with "Reason: required system or feature not
    /// available" (2.30, 2.31) or "Reason: missing system features" (≥ 2.32).
    pub fn says_unbuildable_here(&self, drv: Option<&str>) -> bool {
        let old = match drv {
            Some(d) => format!("is required to build '{d}'"),
            None => "is required to build".to_owned(),
        };
        let new = match drv {
            Some(d) => format!("Cannot build '{d}'."),
            None => "Cannot build '".to_owned(),
        };
        self.stderr.contains(&old)
            || (self.stderr.contains(&new)
                && (self.stderr.contains("Reason: missing system features")
                    || self
                        .stderr
                        .contains("Reason: required system or feature not available")))
    }

    /// Panics unless [`Output::says_unbuildable_here`].
    #[track_caller]
    pub fn assert_unbuildable_here(&self, drv: Option<&str>) -> &Self {
        assert!(
            self.says_unbuildable_here(drv),
            "Nix does not say that nothing can build {}:\n{}",
            drv.unwrap_or("the derivation"),
            self.describe()
        );
        self
    }

    /// Panics unless Nix reported `drv`'s builder (or the hook building
    /// it) as failed: "builder for '…' failed" (≤ 2.28), "Cannot build
    /// '…'." with "Reason: builder failed" (≥ 2.29).
    #[track_caller]
    pub fn assert_builder_failed(&self, drv: &str) -> &Self {
        let old = format!("builder for '{drv}' failed");
        let new = format!("Cannot build '{drv}'.");
        assert!(
            self.stderr.contains(&old)
                || (self.stderr.contains(&new) && self.stderr.contains("Reason: builder failed")),
            "Nix does not report {drv}'s builder as failed:\n{}",
            self.describe()
        );
        self
    }

    /// Store paths printed on stdout (what nix-build prints for its results).
    pub fn store_paths(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("/nix/store/"))
            .map(str::to_owned)
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "$ {}\nstatus: {} (after {:.1}s)\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmdline,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn render_cmdline(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            let _ = write!(s, " '{a}'");
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Runs `cmd` to completion with a wall-clock `limit`; stdin is /dev/null.
/// Panics (with the output so far) when the limit is exceeded.
#[track_caller]
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let cmdline = render_cmdline(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{cmdline}`: {e}"));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            let out = Output {
                cmdline,
                status: st,
                stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into(),
                stderr: strip_ansi(&String::from_utf8_lossy(&t_err.join().unwrap_or_default())),
                elapsed: start.elapsed(),
            };
            panic!(
                "command exceeded its {}s limit and was killed:\n{}",
                limit.as_secs(),
                out.describe()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = strip_ansi(&String::from_utf8_lossy(&t_err.join().unwrap_or_default()));
    Output {
        cmdline,
        status,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// A `Command` for a Nix tool talking to the local store directly (never a
/// daemon picked up from the environment).
pub fn nix_cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("NIX_REMOTE")
        .env_remove("NIX_DAEMON_SOCKET_PATH")
        .env_remove("NIX_HATCH_CONFIG")
        .env_remove("NIX_CONF_DIR")
        .env_remove("NIX_CONFIG");
    c
}

// ---------------------------------------------------------------------------
// Store queries
// ---------------------------------------------------------------------------

/// The store path of a directory holding `bin/busybox` (a copy of the static
/// /bin/busybox), added once per test process. `nix-store --add` is
/// idempotent: the same content always yields the same path.
pub fn busybox() -> &'static str {
    static BB: OnceLock<String> = OnceLock::new();
    BB.get_or_init(|| {
        let src = Path::new("/bin/busybox");
        assert!(
            src.exists(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let tmp = tempfile::Builder::new()
            .prefix("nhtest-bb-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().join("hatch-busybox");
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::copy(src, dir.join("bin/busybox")).unwrap();
        fs::set_permissions(dir.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        let out = run(
            nix_cmd("nix-store").arg("--add").arg(&dir),
            Duration::from_secs(60),
        );
        out.assert_ok();
        let p = out.stdout.trim().to_owned();
        assert!(p.starts_with("/nix/store/"), "{}", out.describe());
        p
    })
}

/// A command prefix that runs what follows as `user` (its primary group
/// only), e.g. `as_user("nobody").args(["cat", "/x"])`.
pub fn as_user(user: &str) -> Command {
    let (_, gid) = account_ids(user).unwrap_or_else(|| panic!("no account {user}"));
    let mut c = nix_cmd("setpriv");
    c.args([
        "--reuid",
        user,
        "--regid",
        &gid.to_string(),
        "--clear-groups",
    ]);
    c
}

/// (uid, gid) of `name`, if the account exists.
pub fn account_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| {
        let o = Command::new("id").args([flag, name]).output().ok()?;
        if !o.status.success() {
            return None;
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A system account only the tests use (created on first use, with a group
/// of its own; `groups` are extra groups it is made a member of, created
/// too). Returns (uid, gid).
pub fn test_account(name: &str, groups: &[&str]) -> (u32, u32) {
    let _held = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    create_account(name, groups)
}

/// Serialises this process's changes to the user database (useradd and
/// usermod fail while another holds its lock).
static ACCOUNTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A [`test_account`] that sshd lets in with a key: a shell (sshd runs a
/// forced command through it), a home that exists, and a password field
/// that is not locked (`*`: no password works, but the account is not
/// disabled, which sshd without PAM would refuse).
pub fn login_account(name: &str) -> (u32, u32) {
    let _held = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let ids = create_account(name, &[]);
    run(
        Command::new("usermod").args([
            "--shell",
            "/bin/sh",
            "--home",
            "/",
            "--password",
            "*",
            name,
        ]),
        Duration::from_secs(60),
    )
    .assert_ok();
    ids
}

fn create_account(name: &str, groups: &[&str]) -> (u32, u32) {
    for g in groups {
        if !Command::new("getent")
            .args(["group", g])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            // Another test binary may create it at the same moment.
            let _ = Command::new("groupadd").args(["--system", g]).output();
        }
    }
    if account_ids(name).is_none() {
        let out = run(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                name,
            ]),
            Duration::from_secs(60),
        );
        assert!(
            out.success() || account_ids(name).is_some(),
            "cannot create test account {name}:\n{}",
            out.describe()
        );
    }
    for g in groups {
        run(
            Command::new("usermod").args(["--append", "--groups", g, name]),
            Duration::from_secs(60),
        )
        .assert_ok();
    }
    account_ids(name).unwrap_or_else(|| panic!("no account {name} after creating it"))
}

/// The LD_PRELOAD probe library (tests/support/preload.c), compiled with
/// the machine's C compiler into cargo's test temp dir. Inside a Nix root
/// (no compiler there) the copy scripts/test built on the host is used.
pub fn preload_library() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/preload.c");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hatch-preload.so");
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (mtime(&out), mtime(&src)) {
        (Some(o), Some(s)) => o >= s,
        (Some(_), None) => true,
        _ => false,
    };
    if !fresh {
        let built = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .output();
        match built {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "cc failed to build {}: {}",
                src.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "no C compiler to build {} ({e}); scripts/test builds it on the host before the suites run in a Nix root",
                src.display()
            ),
        }
    }
    out
}

/// The end-to-end tests use the system Nix store as root (single-user
/// mode, `--option build-hook`, their own nix-daemon).
#[track_caller]
pub fn require_root() {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "the end-to-end tests must run as root (they build in the system Nix store and start a nix-daemon); use scripts/test as root"
    );
}

/// `nix-store --check-validity`.
pub fn is_valid(path: &str) -> bool {
    run(
        nix_cmd("nix-store").args(["--check-validity", path]),
        Duration::from_secs(60),
    )
    .success()
}

/// Whether anything (file, dir, dangling symlink) exists at `path`.
pub fn exists_on_disk(path: &str) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// `nix-store -q --references`, as a set.
#[track_caller]
pub fn references(path: &str) -> BTreeSet<String> {
    let out = run(
        nix_cmd("nix-store").args(["-q", "--references", path]),
        Duration::from_secs(60),
    );
    out.assert_ok();
    out.stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `nix-store -q --deriver`.
#[track_caller]
pub fn deriver(path: &str) -> String {
    let out = run(
        nix_cmd("nix-store").args(["-q", "--deriver", path]),
        Duration::from_secs(60),
    );
    out.assert_ok();
    out.stdout.trim().to_owned()
}

/// `nix log <drv or output>` (Nix 2.8 spelling).
pub fn nix_log(path: &str) -> Output {
    run(
        nix_cmd("nix").args([
            "--extra-experimental-features",
            "nix-command",
            "log",
            "--option",
            "substituters",
            "",
            path,
        ]),
        Duration::from_secs(60),
    )
}

/// `nix-store --verify --check-contents` over the whole store.
pub fn verify_store() -> Output {
    run(
        nix_cmd("nix-store").args(["--verify", "--check-contents"]),
        NIX_LIMIT,
    )
}

/// `nix-hash --type sha256 [--flat] path` in base16: the oracle for
/// fixed-output hashes (recursive = NAR hash).
#[track_caller]
pub fn nix_hash(path: &Path, flat: bool) -> String {
    let mut c = nix_cmd("nix-hash");
    c.args(["--type", "sha256"]);
    if flat {
        c.arg("--flat");
    }
    let out = run(c.arg(path), Duration::from_secs(60));
    out.assert_ok();
    out.stdout.trim().to_owned()
}

/// Whether process `pid` is alive (a zombie counts as dead: PID 1 in this
/// container does not reap orphans promptly).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // state is the field after the ")" closing the command name
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

/// Polls `cond` every 50ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Nix double-quoted string literal.
pub fn nix_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '$' => o.push_str("\\$"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// One `host` executor routed from one feature; renders the TOML config.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub feature: String,
    pub executor: String,
    /// `None` leaves `command` out (for `allow-any-builder`).
    pub command: Option<Vec<String>>,
    pub user: String,
    pub max_jobs: u32,
    pub timeout: u64,
    pub allow_any_builder: bool,
    pub pass_env: Vec<String>,
    /// `arg-paths` (`None`: the default, "inputs").
    pub arg_paths: Option<&'static str>,
    /// Appended verbatim at the end of the executor table.
    pub extra: String,
}

impl HostConfig {
    pub fn new(command: &[&str]) -> Self {
        HostConfig {
            feature: FEATURE.into(),
            executor: EXECUTOR.into(),
            command: Some(command.iter().map(|s| s.to_string()).collect()),
            user: "root".into(),
            max_jobs: 2,
            timeout: 60,
            allow_any_builder: false,
            pass_env: Vec::new(),
            arg_paths: None,
            extra: String::new(),
        }
    }

    pub fn render(&self, state_dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "state-dir = {}", toml_str(&state_dir.to_string_lossy()));
        let _ = writeln!(s, "fallback = \"decline\"");
        let _ = writeln!(s, "\n[routes]");
        let _ = writeln!(s, "{} = {}", self.feature, toml_str(&self.executor));
        let _ = writeln!(s, "\n[executors.{}]", self.executor);
        let _ = writeln!(s, "kind = \"host\"");
        if let Some(cmd) = &self.command {
            let items: Vec<String> = cmd.iter().map(|c| toml_str(c)).collect();
            let _ = writeln!(s, "command = [{}]", items.join(", "));
        }
        let _ = writeln!(s, "user = {}", toml_str(&self.user));
        let _ = writeln!(s, "max-jobs = {}", self.max_jobs);
        let _ = writeln!(s, "timeout = {}", self.timeout);
        if self.allow_any_builder {
            let _ = writeln!(s, "allow-any-builder = true");
        }
        if let Some(a) = self.arg_paths {
            let _ = writeln!(s, "arg-paths = {}", toml_str(a));
        }
        if !self.pass_env.is_empty() {
            let items: Vec<String> = self.pass_env.iter().map(|c| toml_str(c)).collect();
            let _ = writeln!(s, "pass-env = [{}]", items.join(", "));
        }
        s.push_str(&self.extra);
        s
    }
}

/// A `jail` executor `jx` routed from `escape-j`, run as `user`, plus
/// `extra` lines in its table (max-jobs 4, timeout 120).
pub fn write_jail_config(env: &TestEnv, user: &str, extra: &str) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "state-dir = {}\nfallback = \"decline\"\n[routes]\nescape-j = \"jx\"\n[executors.jx]\nkind = \"jail\"\nuser = {}\nmax-jobs = 4\ntimeout = 120",
        toml_str(&env.state_dir().to_string_lossy()),
        toml_str(user)
    );
    s.push_str(extra);
    env.write_config(&s);
}

/// `jailed { name, script, attrs }`: busybox `sh -c script` in the jail of
/// [`write_jail_config`].
pub const JAILED: &str = r#"
  jailed = { name, script, attrs ? { } }:
    builtins.derivation ({
      inherit name system nonce;
      builder = "${bb}/bin/busybox";
      args = [ "sh" "-c" script ];
      requiredSystemFeatures = [ "escape-j" ];
    } // attrs);
"#;

/// [`TestEnv::write_expr`] with [`JAILED`] in scope.
pub fn jail_expr(env: &TestEnv, name: &str, body: &str) -> PathBuf {
    env.write_expr(name, &format!("let {JAILED} in {body}"))
}

// ---------------------------------------------------------------------------
// Per-test environment
// ---------------------------------------------------------------------------

/// The Nix prelude every test expression starts with. `@BB@`/`@NONCE@` are
/// substituted. `escape` derivations are routed to the host executor, whose
/// standard admin command ([`TestEnv::run_script`]) evaluates the first
/// derivation arg as a shell snippet; `plain` derivations are built by Nix
/// with busybox.
const PRELUDE: &str = r#"
let
  bb = builtins.storePath "@BB@";
  nonce = "@NONCE@";
  system = builtins.currentSystem;
  escape = { name, script, feature ? "escape-x", attrs ? { } }:
    builtins.derivation ({
      inherit name system nonce;
      builder = "${bb}/bin/busybox";
      args = [ script ];
      requiredSystemFeatures = [ feature ];
    } // attrs);
  plain = { name, script, attrs ? { } }:
    builtins.derivation ({
      inherit name system nonce;
      builder = "${bb}/bin/busybox";
      args = [ "sh" "-c" script ];
    } // attrs);
in
"#;

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub nonce: String,
    pub name: String,
}

impl TestEnv {
    /// A fresh temp dir (`/tmp/nhtest-<name>-XXXX`) with a `state` dir.
    pub fn new(name: &str) -> Self {
        require_root();
        check_nix_under_test();
        // NIX_HATCH_KEEP_TEST_DIRS=1 keeps the dirs (config, scripts,
        // expressions, daemon log) for debugging.
        let keep = std::env::var_os("NIX_HATCH_KEEP_TEST_DIRS").is_some_and(|v| v != "0");
        let dir = tempfile::Builder::new()
            .prefix(&format!("nhtest-{name}-"))
            .disable_cleanup(keep)
            .tempdir()
            .expect("tempdir");
        fs::create_dir_all(dir.path().join("state")).unwrap();
        let env = TestEnv {
            dir,
            nonce: nonce(),
            name: name.to_owned(),
        };
        // The standard admin command.
        env.write_script(
            "run.sh",
            "#!/bin/sh\n# test admin command: the derivation's first arg is a shell snippet\nset -eu\nscript=\"$1\"\nshift\neval \"$script\"\n",
        );
        env
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// What is in `state-dir/staging` (staging dirs of builds).
    pub fn staging_entries(&self) -> Vec<String> {
        dir_names(&self.state_dir().join("staging"))
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// The standard admin command: `run.sh <snippet>` evals the snippet.
    pub fn run_script(&self) -> PathBuf {
        self.path("run.sh")
    }

    /// Writes the config file verbatim.
    pub fn write_config(&self, toml: &str) {
        fs::write(self.config_path(), toml).unwrap();
    }

    /// Writes a `host` executor config.
    pub fn write_host_config(&self, cfg: &HostConfig) {
        self.write_config(&cfg.render(&self.state_dir()));
    }

    /// The standard config: `escape-x` → `hostx`, command `run.sh`,
    /// max-jobs 2, timeout 60. run.sh evals its first argument, a shell
    /// snippet with paths in it, so `arg-paths = "any"` (it is the tests'
    /// deliberately unsafe command).
    pub fn standard_config(&self) -> HostConfig {
        let cmd = self.run_script();
        let mut c = HostConfig::new(&[cmd.to_str().unwrap()]);
        c.arg_paths = Some("any");
        c
    }

    /// Writes an executable script and returns its path.
    pub fn write_script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Writes `<PRELUDE> body` to `name` (`@BB@`, `@NONCE@`, `@DIR@` are
    /// substituted everywhere) and returns its path.
    pub fn write_expr(&self, name: &str, body: &str) -> PathBuf {
        let text = format!("{PRELUDE}{body}\n")
            .replace("@BB@", busybox())
            .replace("@NONCE@", &self.nonce)
            .replace("@DIR@", &self.root().to_string_lossy());
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p
    }

    /// `nix-build` against the local store with the hook under test:
    /// `--no-out-link --option substituters "" --option build-hook <hook>
    /// --option builders "" <extra...> <expr> -A <attr>...`, with
    /// `NIX_HATCH_CONFIG` pointing at this env's config.
    pub fn nix_build(&self, expr: &Path, attrs: &[&str], extra: &[&str]) -> Output {
        let mut c = self.nix_build_cmd(expr, attrs, extra);
        self.use_hook(&mut c, &self.config_path());
        run(&mut c, NIX_LIMIT)
    }

    /// Adds `--option build-hook <nix-hatch with config>` (in the form under
    /// test, see [`hook_setting`]) and `NIX_HATCH_CONFIG=config` to `cmd`.
    pub fn use_hook(&self, cmd: &mut Command, config: &Path) {
        cmd.args(["--option", "build-hook", &hook_setting(config)]);
        cmd.env("NIX_HATCH_CONFIG", config);
    }

    /// Like [`TestEnv::nix_build`] but with `NIX_HATCH_CONFIG` set to
    /// `config` (e.g. a missing file).
    pub fn nix_build_config(
        &self,
        config: &Path,
        expr: &Path,
        attrs: &[&str],
        extra: &[&str],
    ) -> Output {
        let mut c = self.nix_build_cmd(expr, attrs, extra);
        self.use_hook(&mut c, config);
        run(&mut c, NIX_LIMIT)
    }

    /// `nix-build` with Nix's default hook (no nix-hatch at all).
    pub fn nix_build_without_hook(&self, expr: &Path, attrs: &[&str], extra: &[&str]) -> Output {
        run(&mut self.nix_build_cmd(expr, attrs, extra), NIX_LIMIT)
    }

    /// `nix-build` as a client of `daemon`. No hook option on the client:
    /// the daemon's own nix.conf decides.
    pub fn nix_build_via(
        &self,
        daemon: &Daemon,
        expr: &Path,
        attrs: &[&str],
        extra: &[&str],
    ) -> Output {
        let mut c = self.nix_build_cmd(expr, attrs, extra);
        daemon.client_env(&mut c);
        run(&mut c, NIX_LIMIT)
    }

    /// `nix-build` as a client of `daemon`, run as the unprivileged `user`
    /// (an untrusted client, as on a multi-user install). The temp dir is
    /// made world-readable so the user can read the expression.
    pub fn nix_build_via_as_user(
        &self,
        daemon: &Daemon,
        user: &str,
        expr: &Path,
        attrs: &[&str],
        extra: &[&str],
    ) -> Output {
        let mut c = self.nix_build_via_as_user_command(daemon, user, expr, attrs, extra);
        run(&mut c, NIX_LIMIT)
    }

    /// The command [`TestEnv::nix_build_via_as_user`] runs, for tests that
    /// start it in the background.
    pub fn nix_build_via_as_user_command(
        &self,
        daemon: &Daemon,
        user: &str,
        expr: &Path,
        attrs: &[&str],
        extra: &[&str],
    ) -> Command {
        fs::set_permissions(self.root(), fs::Permissions::from_mode(0o755)).unwrap();
        let inner = self.nix_build_cmd(expr, attrs, extra);
        let mut c = as_user(user);
        c.arg("env")
            .arg("HOME=/tmp")
            .arg(inner.get_program())
            .args(inner.get_args());
        daemon.client_env(&mut c);
        c
    }

    /// The command [`TestEnv::nix_build`] runs, for tests that spawn it
    /// themselves (to signal it, or to add environment variables).
    pub fn nix_build_command(&self, expr: &Path, attrs: &[&str], extra: &[&str]) -> Command {
        let mut c = self.nix_build_cmd(expr, attrs, extra);
        self.use_hook(&mut c, &self.config_path());
        c
    }

    /// Starts (in the background) a hooked nix-build of one escape build
    /// whose command signals that it started and then sleeps for ten
    /// minutes, and waits until it has started. Returns the nix-build
    /// process and the output path. Every process of the build mentions
    /// this env's dir on its command line (see [`processes_mentioning`]).
    pub fn spawn_sleeping_build(&self) -> (Child, String) {
        std::os::unix::fs::symlink("/bin/sleep", self.path("long-sleep")).unwrap();
        let expr = self.write_expr(
            "sleeping.nix",
            r#"{ s = escape { name = "sleeping"; script = ''
    touch "@DIR@/started"
    "@DIR@/long-sleep" 600
    echo late > "$out"
  ''; }; }"#,
        );
        let want = self.out_path(&expr, "s");
        let mut cmd = self.nix_build_command(&expr, &[], &[]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        if !wait_until(Duration::from_secs(60), || self.path("started").exists()) {
            let _ = child.kill();
            panic!("the command never started");
        }
        (child, want)
    }

    /// The `nix-build` command line of [`TestEnv::nix_build`] without a
    /// hook (Nix's default build hook, i.e. its own remote building).
    pub fn nix_build_cmd(&self, expr: &Path, attrs: &[&str], extra: &[&str]) -> Command {
        let mut c = nix_cmd("nix-build");
        c.args([
            "--no-out-link",
            "--option",
            "substituters",
            "",
            "--option",
            "builders",
            "",
        ]);
        c.args(extra);
        c.arg(expr);
        for a in attrs {
            c.args(["-A", a]);
        }
        c
    }

    /// `nix-instantiate expr -A attr`: writes the .drv and returns its path.
    #[track_caller]
    pub fn drv_path(&self, expr: &Path, attr: &str) -> String {
        let out = run(
            nix_cmd("nix-instantiate").arg(expr).args(["-A", attr]),
            Duration::from_secs(120),
        );
        out.assert_ok();
        let p = out.store_paths();
        assert_eq!(p.len(), 1, "{}", out.describe());
        p[0].clone()
    }

    /// The output path of `attr` (e.g. `multi.dev`) without building it.
    #[track_caller]
    pub fn out_path(&self, expr: &Path, attr: &str) -> String {
        let out = run(
            nix_cmd("nix-instantiate")
                .arg("--eval")
                .arg(expr)
                .args(["-A", &format!("{attr}.outPath")]),
            Duration::from_secs(120),
        );
        out.assert_ok();
        let s = out.stdout.trim().trim_matches('"').to_owned();
        assert!(s.starts_with("/nix/store/"), "{}", out.describe());
        s
    }
}

// ---------------------------------------------------------------------------
// Private nix-daemon
// ---------------------------------------------------------------------------

/// A `nix-daemon` private to one test: its socket and nix.conf live in the
/// test's temp dir; it serves the real /nix/store. Stopped (SIGTERM, then
/// SIGKILL) by PID on drop.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub conf_dir: PathBuf,
    pub log: PathBuf,
    /// A system feature only this daemon has (see [`Daemon::assert_used_by_clients`]).
    pub marker_feature: String,
}

impl Daemon {
    /// Starts a daemon whose nix.conf sets `build-hook = hook` (if given;
    /// [`hook_bin`] stands for nix-hatch in the form under test, see
    /// [`hook_setting`]), and whose environment has `NIX_HATCH_CONFIG` = the
    /// env's config.
    pub fn start(env: &TestEnv, hook: Option<&Path>) -> Daemon {
        Daemon::start_with(env, hook, "")
    }

    /// [`Daemon::start`] with `extra` lines appended to its nix.conf.
    pub fn start_with(env: &TestEnv, hook: Option<&Path>, extra: &str) -> Daemon {
        Daemon::spawn(env, hook, extra, None, nix_conf_build_hook_ignored())
    }

    /// A daemon that gets `build-hook = hook` from its nix.conf only, as an
    /// admin writes it: no `NIX_CONFIG` work-around, even on the versions
    /// that ignore the line ([`nix_conf_build_hook_ignored`]).
    pub fn start_nix_conf_only(env: &TestEnv, hook: &Path) -> Daemon {
        Daemon::spawn(env, Some(hook), "", None, false)
    }

    /// A daemon with a store of its own, as on another machine: in a mount
    /// namespace of its own, `root/nix` is its /nix and `root/etc/nix` its
    /// /etc/nix (its nix.conf is there, with `extra` appended); its socket
    /// is the default one of that /nix. Run other programs in that view
    /// with [`Daemon::in_its_namespace`].
    pub fn start_in_root(env: &TestEnv, hook: Option<&Path>, extra: &str, root: &Path) -> Daemon {
        Daemon::spawn(env, hook, extra, Some(root), nix_conf_build_hook_ignored())
    }

    /// `work_around`: also pass the hook in `NIX_CONFIG`, as the README
    /// tells users of Nix 2.25 … 2.33.
    fn spawn(
        env: &TestEnv,
        hook: Option<&Path>,
        extra: &str,
        root: Option<&Path>,
        work_around: bool,
    ) -> Daemon {
        let (conf_dir, socket) = match root {
            None => (env.path("daemon-conf"), env.path("daemon.sock")),
            Some(r) => (
                r.join("etc/nix"),
                r.join("nix/var/nix/daemon-socket/socket"),
            ),
        };
        fs::create_dir_all(&conf_dir).unwrap();
        let log = env.path("daemon.log");
        let marker_feature = format!("hatch-marker-{}", env.nonce);
        let mut conf = String::new();
        conf.push_str("build-users-group = nixbld\n");
        conf.push_str("sandbox = false\n");
        conf.push_str("substituters =\n");
        conf.push_str("builders =\n");
        let _ = writeln!(conf, "extra-system-features = {marker_feature}");
        let mut hook_setting_value = None;
        if let Some(h) = hook {
            let setting = if h == Path::new(HOOK) {
                hook_setting(&env.config_path())
            } else {
                h.display().to_string()
            };
            let _ = writeln!(conf, "build-hook = {setting}");
            hook_setting_value = Some(setting);
        }
        conf.push_str(extra);
        fs::write(conf_dir.join("nix.conf"), conf).unwrap();
        let logf = fs::File::create(&log).unwrap();
        let mut cmd = match root {
            None => {
                let mut c = nix_cmd("nix-daemon");
                c.env("NIX_CONF_DIR", &conf_dir)
                    .env("NIX_DAEMON_SOCKET_PATH", &socket);
                c
            }
            Some(r) => {
                fs::create_dir_all(r.join("nix")).unwrap();
                // The default paths, seen through the namespace's mounts:
                // what the daemon's clients (`nix-daemon --stdio` run by
                // sshd in the same namespace) find without any setting.
                let mut c = nix_cmd("unshare");
                c.args([
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "/bin/sh",
                    "-euc",
                ])
                .arg("mount --bind \"$1\" /nix; mount --bind \"$2\" /etc/nix; shift 2; exec \"$@\"")
                .arg("sh")
                .arg(r.join("nix"))
                .arg(&conf_dir)
                .arg("nix-daemon");
                c
            }
        };
        if let Some(setting) = hook_setting_value.filter(|_| work_around) {
            // What the README tells users of these versions to do.
            cmd.env("NIX_CONFIG", format!("build-hook = {setting}"));
        }
        let child = cmd
            .env("NIX_USER_CONF_FILES", conf_dir.join("no-user.conf"))
            .env("NIX_HATCH_CONFIG", env.config_path())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start nix-daemon");
        let mut d = Daemon {
            child,
            socket,
            conf_dir,
            log,
            marker_feature,
        };
        let sock = d.socket.clone();
        let up = wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        if !up {
            let exited = d.child.try_wait().ok().flatten();
            panic!(
                "nix-daemon did not come up on {} (exit: {exited:?}); log:\n{}",
                d.socket.display(),
                d.log_text()
            );
        }
        d
    }

    /// `program` run in the daemon's mount namespace (for a daemon of
    /// [`Daemon::start_in_root`]: that machine's /nix and /etc/nix).
    pub fn in_its_namespace(&self, program: &str) -> Command {
        let mut c = nix_cmd("nsenter");
        c.args([
            "--target",
            &self.pid().to_string(),
            "--mount",
            "--",
            program,
        ]);
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Makes `cmd` a client of this daemon.
    pub fn client_env(&self, cmd: &mut Command) {
        cmd.env("NIX_REMOTE", "daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &self.socket);
    }

    /// Proves that clients set up with [`Daemon::client_env`] really go
    /// through this daemon: a derivation requiring the daemon's private
    /// marker feature fails locally ([`Output::says_unbuildable_here`]) but
    /// builds through the daemon, and the daemon logs the connection.
    #[track_caller]
    pub fn assert_used_by_clients(&self, env: &TestEnv) {
        let expr = env.write_expr(
            "daemon-marker.nix",
            &format!(
                r#"plain {{ name = "daemon-marker"; script = "echo marker > $out"; attrs = {{ requiredSystemFeatures = [ "{}" ]; }}; }}"#,
                self.marker_feature
            ),
        );
        let local = env.nix_build_without_hook(&expr, &[], &[]);
        local.assert_failed();
        local.assert_unbuildable_here(None);
        let before = self.log_text().matches("accepted connection").count();
        let via = env.nix_build_via(self, &expr, &[], &[]);
        via.assert_ok();
        let out = via.store_paths();
        assert_eq!(out.len(), 1, "{}", via.describe());
        assert_eq!(fs::read_to_string(&out[0]).unwrap(), "marker\n");
        let after = self.log_text().matches("accepted connection").count();
        assert!(
            after > before,
            "daemon log shows no new connection:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Stops a server the test started: SIGTERM, then SIGKILL after 10 s.
pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stopped = wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !stopped {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Host processes whose command line mentions `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(marker) && pid_alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The hook processes (by `NIX_HATCH_CONFIG` in their environment).
pub fn hooks_of(env: &TestEnv) -> Vec<u32> {
    let want = format!("NIX_HATCH_CONFIG={}", env.config_path().display());
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|p| p.to_string_lossy().contains("nix-hatch"))
                && fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v == want.as_bytes()))
        })
        .collect()
}

/// How Nix stops a hook it no longer needs (the user interrupted, another
/// build failed, Nix exits): `HookInstance`'s destructor kills the hook's
/// process group (Nix makes the hook a group leader).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NixStop {
    /// Nix <= 2.34: SIGKILL to the group at once.
    Kill,
    /// Nix >= 2.35 (NixOS/nix#15105): SIGTERM to the group, then SIGKILL
    /// to it 500 ms later unless the hook has exited.
    TermThenKill,
}

/// Both ways, so every version's behaviour is tested on each Nix here.
pub const NIX_STOPS: [NixStop; 2] = [NixStop::Kill, NixStop::TermThenKill];

impl NixStop {
    /// Stops `hook` (the process Nix started, see [`nix_started_hook`]) the
    /// way Nix does; returns whether it took the SIGKILL.
    pub fn stop(self, hook: u32) -> bool {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let group = Pid::from_raw(-(hook as i32));
        match self {
            NixStop::Kill => {
                kill(group, Signal::SIGKILL).expect("killing the hook's process group");
                true
            }
            NixStop::TermThenKill => {
                // Nix waits for the hook itself (waitpid), not its group.
                let pidfd = pidfd(hook);
                kill(group, Signal::SIGTERM).expect("signalling the hook's process group");
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&pidfd),
                    nix::poll::PollFlags::POLLIN,
                )];
                let exited = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16))
                    .is_ok_and(|n| n > 0);
                if !exited {
                    let _ = kill(group, Signal::SIGKILL);
                }
                !exited
            }
        }
    }
}

/// A pidfd for `pid` (readable once it has exited, child or not).
fn pidfd(pid: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just gave us this descriptor.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// The hook process Nix started for `env` (a process group leader; its
/// runner helpers are not), once there is exactly one.
pub fn nix_started_hook(env: &TestEnv) -> u32 {
    let leaders = || {
        hooks_of(env)
            .into_iter()
            .filter(|&p| {
                nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(p as i32)))
                    .is_ok_and(|g| g.as_raw() == p as i32)
            })
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(60), || leaders().len() == 1),
        "not exactly one hook process of {}: {:?}",
        env.root().display(),
        leaders()
    );
    leaders()[0]
}

/// Everything of `env`'s builds still running: processes mentioning
/// `marker` or the env's dir (commands, runners, staging paths) and hooks.
pub fn build_processes(env: &TestEnv, marker: &str) -> Vec<(u32, String)> {
    let mut all = processes_mentioning(marker);
    all.extend(processes_mentioning(&env.root().to_string_lossy()));
    all.extend(hooks_of(env).into_iter().map(|p| (p, "hook".to_owned())));
    all.sort();
    all.dedup();
    all
}

/// The names in directory `dir` (none if it is missing).
pub fn dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
