//! Serving other machines (issue 17): a client with nothing but a
//! `builders = ssh-ng://ACCOUNT@far …` line gets its escape derivations
//! built by nix-hatch on the far machine.
//!
//! Two machines in one: the client is the test's own Nix and store; the far
//! machine is a nix-daemon with nix-hatch as its build hook and a store of
//! its own (its /nix and /etc/nix bind-mounted in a mount namespace of its
//! own, see [`Daemon::start_in_root`]), and an sshd on loopback in the same
//! namespace whose accounts' keys may only run `nix-daemon --stdio`, as an
//! admin sets them up. The client's build-remote logs in as that account;
//! the far daemon's worker serves it, and its hook sees the account as the
//! requester.
//!
//! What the client sees depends on the Nix on both ends: the trustless
//! path (the .drv closure copied, the far daemon asked to build the .drv,
//! which consults its hook) needs a far daemon that tells clients they are
//! not trusted (Nix >= 2.15, NixOS/nix#7515) and a client build-remote
//! that acts on it (Nix >= 2.16, NixOS/nix#3921). Here both ends run the
//! Nix under test: on Debian 12's 2.8 only the tests of what an old Nix
//! does run, the others skip with the reason.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// An account of the far machine its escape executors allow.
const SERVED: &str = "nhtest-served";
/// An account that logs in like [`SERVED`] but no executor allows.
const UNLISTED: &str = "nhtest-unlisted";
/// An account that is in the far daemon's `trusted-users`.
const TRUSTED: &str = "nhtest-trusted";
/// The far jail executor's build account.
const JAIL_USER: &str = "nhtest-srvjail";

/// Both ends take the trustless path (see the module comment).
fn trustless() -> bool {
    nix_minor() >= (2, 16)
}

/// Says why a test of the trustless path does not run on this Nix.
fn skipped_on_old_nix() -> bool {
    if trustless() {
        return false;
    }
    eprintln!(
        "skipped: Nix {} sends bare derivations to ssh-ng builders (trust reported by daemons from Nix 2.15, NixOS/nix#7515; used by build-remote from Nix 2.16, NixOS/nix#3921)",
        nix_version()
    );
    true
}

/// The far machine: its daemon (nix-hatch as hook, the env's config), its
/// sshd, and the directory holding its /nix.
struct Far {
    daemon: Daemon,
    sshd: Sshd,
    root: PathBuf,
}

impl Far {
    /// `nix_conf`: lines for the far nix.conf (`trusted-users`,
    /// `trusted-public-keys`).
    fn start(env: &TestEnv, nix_conf: &str) -> Far {
        let root = env.path("far");
        let daemon = Daemon::start_in_root(env, Some(&hook_bin()), nix_conf, &root);
        let pid = daemon.pid().to_string();
        let sshd = Sshd::start_with(
            env,
            || {
                let mut c = Command::new("nsenter");
                c.args(["--target", &pid, "--mount", "--"]);
                c
            },
            "authorized_keys.%u",
        );
        Far { daemon, sshd, root }
    }

    /// Lets `account` log in with a key of its own that runs nothing but
    /// `nix-daemon --stdio`; returns the client's `builders` value: one
    /// machine per escape feature in `features`, each feature mandatory
    /// (Nix sends a machine only derivations that require *all* of its
    /// mandatory features).
    fn builders_for(&self, account: &str, features: &[&str]) -> String {
        login_account(account);
        let key = self.sshd.authorize(account, "nix-daemon --stdio");
        let host_key = self.sshd.host_key_base64();
        features
            .iter()
            .map(|f| {
                format!(
                    "ssh-ng://{account}@127.0.0.1?ssh-key={} x86_64-linux - 1 1 {f} {f} {host_key}",
                    key.display()
                )
            })
            .collect::<Vec<_>>()
            .join(" ; ")
    }

    /// The client's `nix-build` with `builders` (its own store, Nix's own
    /// build hook: no nix-hatch on this side).
    fn client_build(
        &self,
        env: &TestEnv,
        builders: &str,
        expr: &Path,
        attrs: &[&str],
        extra: &[&str],
    ) -> Output {
        let mut args = vec!["--option", "builders", builders];
        args.extend_from_slice(extra);
        let mut cmd = env.nix_build_cmd(expr, attrs, &args);
        cmd.env(
            "NIX_SSHOPTS",
            format!("-p {} -o BatchMode=yes", self.sshd.port),
        );
        run(&mut cmd, NIX_LIMIT)
    }

    /// Whether `path` is a valid path of the far store.
    fn has(&self, path: &str) -> bool {
        let mut c = nix_cmd("nix-store");
        c.args(["--check-validity", path]);
        self.daemon.client_env(&mut c);
        run(&mut c, Duration::from_secs(60)).success()
    }

    /// Whether anything of `path` is on the far machine's disk.
    fn on_disk(&self, path: &str) -> bool {
        fs::symlink_metadata(self.root.join(path.trim_start_matches('/'))).is_ok()
    }

    /// `nix-hatch check` of the far config, run on the far machine (its
    /// nix.conf decides who is trusted).
    fn check(&self, env: &TestEnv) -> Output {
        let mut c = self.daemon.in_its_namespace(CLI);
        c.args(["check", "--config"]).arg(env.config_path());
        run(&mut c, Duration::from_secs(60))
    }
}

/// The far config: `escape-x` → host executor `hostx` (the harness's
/// run.sh) and `escape-j` → jail executor `jx`, both for `allowed`; the
/// far machine's `remote-clients`.
fn far_config(env: &TestEnv, allowed: &[&str], remote_clients: &[&str]) {
    let list = |l: &[&str]| l.iter().map(|a| toml_str(a)).collect::<Vec<_>>().join(", ");
    test_account(JAIL_USER, &[]);
    env.write_config(&format!(
        r#"state-dir = {state}
fallback = "decline"
remote-clients = [{clients}]

[routes]
escape-x = "hostx"
escape-j = "jx"

[executors.hostx]
kind = "host"
command = [{run}]
arg-paths = "any"
timeout = 60
allowed-users = [{allowed}]

[executors.jx]
kind = "jail"
user = {jail}
timeout = 60
allowed-users = [{allowed}]
"#,
        state = toml_str(&env.state_dir().to_string_lossy()),
        clients = list(remote_clients),
        run = toml_str(&env.run_script().to_string_lossy()),
        allowed = list(allowed),
        jail = toml_str(JAIL_USER),
    ));
}

/// The far side's audit records.
fn records(env: &TestEnv) -> Vec<serde_json::Value> {
    fs::read_to_string(env.state_dir().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn record_of<'a>(recs: &'a [serde_json::Value], drv: &str) -> &'a serde_json::Value {
    recs.iter()
        .find(|r| r["drv"] == drv)
        .unwrap_or_else(|| panic!("no audit record of {drv}: {recs:#?}"))
}

#[test]
fn host_and_jail_escapes_build_on_the_far_machine_and_plain_stays_here() {
    if skipped_on_old_nix() {
        return;
    }
    let env = TestEnv::new("serve-build");
    far_config(&env, &[SERVED], &[SERVED]);
    let far = Far::start(&env, "");
    let builders = far.builders_for(SERVED, &["escape-x", "escape-j"]);
    let expr = jail_expr(
        &env,
        "serve.nix",
        r#"{
  hosted = escape { name = "serve-hosted"; script = ''echo "by $NIX_HATCH_EXECUTOR with ${bb}" > "$out"''; };
  jailed = jailed { name = "serve-jailed"; script = ''echo "jailed as $(id -u) with ${bb}" > $out''; };
  plain = plain { name = "serve-plain"; script = "echo here > $out"; };
}"#,
    );
    let out = far.client_build(&env, &builders, &expr, &["hosted", "jailed", "plain"], &[]);
    out.assert_ok();
    let (hosted, jailed, plain) = (
        env.out_path(&expr, "hosted"),
        env.out_path(&expr, "jailed"),
        env.out_path(&expr, "plain"),
    );
    let bb = busybox();
    for (path, text) in [
        (&hosted, format!("by hostx with {bb}\n")),
        (&jailed, format!("jailed as 1000 with {bb}\n")),
    ] {
        assert!(is_valid(path), "{path} not valid here:\n{}", out.describe());
        assert_eq!(fs::read_to_string(path).unwrap(), text);
        assert_eq!(references(path), [bb.to_owned()].into(), "{path}");
        assert!(far.has(path), "{path} was not built on the far machine");
    }
    assert_eq!(deriver(&hosted), env.drv_path(&expr, "hosted"));
    // The plain derivation: built here, never sent (mandatory features).
    assert_eq!(fs::read_to_string(&plain).unwrap(), "here\n");
    assert!(
        !far.on_disk(&plain),
        "the plain derivation went to the far machine"
    );
    // The far log reaches the client: build-remote relays it as it comes…
    out.assert_stderr_contains(&format!(
        "building '{}' on 'nix-hatch:hostx'",
        env.drv_path(&expr, "hosted")
    ));
    out.assert_stderr_contains("on 'nix-hatch:jx'");
    // …and the client keeps it for `nix log`, starting with who asked there.
    let (uid, _) = account_ids(SERVED).unwrap();
    let asked = format!("nix-hatch: {SERVED} (uid {uid}, via daemon) asked for ");
    let log = nix_log(&env.drv_path(&expr, "hosted"));
    assert!(log.stdout.contains(&asked), "{}", log.describe());
    // The far side's record names the ssh account.
    let recs = records(&env);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for attr in ["hosted", "jailed"] {
        let r = record_of(&recs, &env.drv_path(&expr, attr));
        assert_eq!(
            (&r["user"], &r["uid"], &r["via"], &r["result"]),
            (
                &SERVED.into(),
                &uid.into(),
                &"daemon".into(),
                &"built".into()
            ),
            "{r}"
        );
    }
    // check on the far machine: the remote client, untrusted, and what it may use.
    let check = far.check(&env);
    check.assert_ok();
    assert!(
        check
            .stdout
            .contains(&format!("remote client {SERVED}: may use hostx, jx")),
        "{}",
        check.describe()
    );
    assert!(
        !check.stdout.contains("is trusted by Nix"),
        "{}",
        check.describe()
    );
}

/// A failing escape and a refused account: the client's build fails, and
/// what nix-hatch said on the far machine is in the client's output and in
/// its `nix log`. build-remote does not look at the far result on this
/// path (Nix 2.16 … 2.34): it goes on to copy the outputs back, and Nix's
/// last words are that the output "is not valid".
#[test]
fn a_failing_escape_and_a_refused_account_show_the_far_reason_on_the_client() {
    if skipped_on_old_nix() {
        return;
    }
    let env = TestEnv::new("serve-fail");
    far_config(&env, &[SERVED], &[SERVED, UNLISTED]);
    let far = Far::start(&env, "");
    let expr = env.write_expr(
        "fail.nix",
        r#"{
  fails = escape { name = "serve-fails"; script = ''echo about to fail; exit 3''; };
  refused = escape { name = "serve-refused"; script = ''touch "@DIR@/ran"; echo never > "$out"''; };
}"#,
    );
    let out = far.client_build(
        &env,
        &far.builders_for(SERVED, &["escape-x"]),
        &expr,
        &["fails"],
        &[],
    );
    out.assert_failed();
    let fails = env.out_path(&expr, "fails");
    out.assert_stderr_contains("about to fail");
    out.assert_stderr_contains("nix-hatch: executor \"hostx\": command failed with exit code 3");
    out.assert_stderr_contains(&format!("path '{fails}' is not valid"));
    assert!(!exists_on_disk(&fails));
    let log = nix_log(&env.drv_path(&expr, "fails"));
    assert!(
        log.stdout.contains("about to fail")
            && log.stdout.contains("command failed with exit code 3"),
        "{}",
        log.describe()
    );

    let out = far.client_build(
        &env,
        &far.builders_for(UNLISTED, &["escape-x"]),
        &expr,
        &["refused"],
        &[],
    );
    out.assert_failed();
    let (uid, _) = account_ids(UNLISTED).unwrap();
    out.assert_stderr_contains(&format!(
        "nix-hatch: executor \"hostx\" refuses {UNLISTED} (uid {uid}, via daemon): not in its allowed-users: root, {SERVED}; nothing was run"
    ));
    assert!(
        !env.path("ran").exists(),
        "the command ran for a refused account"
    );

    let recs = records(&env);
    let failed = record_of(&recs, &env.drv_path(&expr, "fails"));
    assert_eq!(
        (&failed["result"], &failed["exit_status"], &failed["user"]),
        (&"failed".into(), &3.into(), &SERVED.into()),
        "{failed}"
    );
    let refused = record_of(&recs, &env.drv_path(&expr, "refused"));
    assert_eq!(
        (&refused["result"], &refused["user"]),
        (&"refused".into(), &UNLISTED.into()),
        "{refused}"
    );
    // check names the account no executor lets in.
    let check = far.check(&env);
    assert!(
        check.stdout.contains(&format!(
            "warning: remote client {UNLISTED} may use no executor"
        )),
        "{}",
        check.describe()
    );
}

/// An input built on the client is input-addressed: an untrusted account
/// may only add it to the far store with a signature the far machine
/// trusts. Without one the build stops before anything runs there; with
/// the client signing what it builds (`secret-key-files`) and the far side
/// trusting that key (`trusted-public-keys`), it goes through.
#[test]
fn an_input_built_here_needs_a_signature_the_far_machine_trusts() {
    if skipped_on_old_nix() {
        return;
    }
    let env = TestEnv::new("serve-sign");
    far_config(&env, &[SERVED], &[SERVED]);
    let (secret, public) = (env.path("client-1.sec"), env.path("client-1.pub"));
    run(
        nix_cmd("nix-store")
            .args(["--generate-binary-cache-key", "client-1"])
            .args([&secret, &public]),
        Duration::from_secs(60),
    )
    .assert_ok();
    let trusted_key = fs::read_to_string(&public).unwrap();
    let far = Far::start(
        &env,
        &format!("trusted-public-keys = {}\n", trusted_key.trim()),
    );
    let builders = far.builders_for(SERVED, &["escape-x"]);
    let expr = env.write_expr(
        "sign.nix",
        r#"let
  input = n: plain { name = "serve-input-${n}"; script = "echo input ${n} > $out"; };
  uses = n: escape { name = "serve-uses-${n}"; script = ''{ cat ${input n}; echo ${input n}; } > "$out"''; };
in {
  unsigned = uses "unsigned"; unsignedInput = input "unsigned";
  signed = uses "signed"; signedInput = input "signed";
}"#,
    );

    let out = far.client_build(&env, &builders, &expr, &["unsigned"], &[]);
    out.assert_failed();
    let input = env.out_path(&expr, "unsignedInput");
    out.assert_stderr_contains(&format!(
        "cannot add path '{input}' because it lacks a signature by a trusted key"
    ));
    assert!(records(&env).is_empty(), "the far hook was asked");

    let secret_arg = secret.to_string_lossy().into_owned();
    let out = far.client_build(
        &env,
        &builders,
        &expr,
        &["signed"],
        &["--option", "secret-key-files", &secret_arg],
    );
    out.assert_ok();
    let (signed, input) = (
        env.out_path(&expr, "signed"),
        env.out_path(&expr, "signedInput"),
    );
    assert_eq!(
        fs::read_to_string(&signed).unwrap(),
        "input signed\n".to_owned() + &input + "\n"
    );
    assert_eq!(references(&signed), [input.clone()].into());
    assert!(far.has(&input) && far.has(&signed));
}

/// How the far Nix, building a bare derivation itself, says it lacks
/// `feature` (after build-remote's "build of '…' on '…' failed: "); the
/// words changed in Nix 2.30 and again in 2.34.
fn far_lacks_feature(drv: &str, feature: &str) -> Vec<String> {
    let v = nix_minor();
    if v < (2, 30) {
        vec![format!(
            "failed: error: a 'x86_64-linux' with features {{{feature}}} is required to build '{drv}', but I am a 'x86_64-linux' with features {{"
        )]
    } else if v < (2, 34) {
        vec![
            format!("failed: Cannot build '{drv}'."),
            format!("Required system: 'x86_64-linux' with features {{{feature}}}"),
        ]
    } else {
        vec![
            format!("failed: Cannot build '{drv}'."),
            "Reason: missing system features".to_owned(),
            format!("Required features: {{{feature}}}"),
        ]
    }
}

/// The misconfiguration: the account is trusted on the far machine. Its
/// client's Nix then sends a bare derivation (BuildDerivation), which never
/// reaches a build hook; the far Nix tries to build it itself and fails,
/// and the client sees exactly that. `nix-hatch check` on the far machine
/// warns about it. The same on every Nix version.
#[test]
fn a_trusted_account_gets_a_bare_derivation_the_far_hook_never_sees() {
    let env = TestEnv::new("serve-trusted");
    far_config(&env, &[TRUSTED], &[TRUSTED]);
    let far = Far::start(&env, &format!("trusted-users = root {TRUSTED}\n"));
    let builders = far.builders_for(TRUSTED, &["escape-x"]);
    let expr = env.write_expr(
        "trusted.nix",
        r#"{ esc = escape { name = "serve-trusted"; script = ''touch "@DIR@/ran"; echo never > "$out"''; }; }"#,
    );
    let drv = env.drv_path(&expr, "esc");
    let out = far.client_build(&env, &builders, &expr, &["esc"], &[]);
    out.assert_failed();
    out.assert_stderr_contains(&format!(
        "error: build of '{drv}' on 'ssh-ng://{TRUSTED}@127.0.0.1"
    ));
    for needle in far_lacks_feature(&drv, "escape-x") {
        out.assert_stderr_contains(&needle);
    }
    assert!(!env.path("ran").exists());
    assert!(records(&env).is_empty(), "the far hook was asked");

    let check = far.check(&env);
    let warning = format!(
        "warning: remote client {TRUSTED} is trusted by Nix (trusted-users: root {TRUSTED}): "
    );
    assert!(check.stdout.contains(&warning), "{}", check.describe());
}

/// What an old Nix does with an untrusted account (Debian 12's 2.8 on both
/// ends): the bare derivation is refused by the far daemon before any hook
/// could see it. On newer Nix the trustless tests above run instead.
#[test]
fn with_old_nix_an_untrusted_account_is_refused_before_the_far_hook() {
    if trustless() {
        eprintln!(
            "skipped: Nix {} takes the trustless path (the other tests)",
            nix_version()
        );
        return;
    }
    let env = TestEnv::new("serve-old");
    far_config(&env, &[SERVED], &[SERVED]);
    let far = Far::start(&env, "");
    let expr = env.write_expr(
        "old.nix",
        r#"{ esc = escape { name = "serve-old"; script = ''touch "@DIR@/ran"; echo never > "$out"''; }; }"#,
    );
    let out = far.client_build(
        &env,
        &far.builders_for(SERVED, &["escape-x"]),
        &expr,
        &["esc"],
        &[],
    );
    out.assert_failed();
    out.assert_stderr_contains(
        "error: you are not privileged to build input-addressed derivations",
    );
    assert!(!env.path("ran").exists());
    assert!(records(&env).is_empty(), "the far hook was asked");
    // check on such a machine says so.
    let check = far.check(&env);
    assert!(
        check
            .stdout
            .contains("'s daemon does not tell clients whether they are trusted"),
        "{}",
        check.describe()
    );
}
