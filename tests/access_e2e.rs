//! Who may escape, and the record of every escape (issue 16): builds
//! through a private nix-daemon by unprivileged accounts, against
//! executors' `allowed-users` (or Nix's `trusted-users` without it), and
//! the audit log they leave, read back with `nix-hatch audit`.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const ALICE: &str = "nhtest-alice";
const BOB: &str = "nhtest-bob";
const CAROL: &str = "nhtest-carol";
const RELEASE: &str = "nhtest-release";

fn accounts() -> (u32, u32, u32) {
    (
        test_account(ALICE, &[]).0,
        test_account(BOB, &[]).0,
        test_account(CAROL, &[RELEASE]).0,
    )
}

/// The standard host executor (run.sh evals the derivation's first
/// argument), `extra` appended to its table; `marks/` records which
/// commands ran.
fn config(env: &TestEnv, extra: &str) {
    let mut cfg = env.standard_config();
    cfg.timeout = 30;
    cfg.max_jobs = 4;
    cfg.extra = extra.to_owned();
    env.write_host_config(&cfg);
    let marks = env.path("marks");
    fs::create_dir_all(&marks).unwrap();
    fs::set_permissions(&marks, fs::Permissions::from_mode(0o1777)).unwrap();
}

/// `name`: an escape build that marks that its command ran.
fn escape_expr(env: &TestEnv, file: &str, names: &[&str]) -> std::path::PathBuf {
    let attrs: String = names
        .iter()
        .map(|n| {
            format!(
                r#"  {n} = escape {{ name = "access-{n}"; script = ''touch "@DIR@/marks/{n}"; echo {n} > "$out"''; }};
"#
            )
        })
        .collect();
    env.write_expr(file, &format!("{{\n{attrs}}}"))
}

fn ran(env: &TestEnv, name: &str) -> bool {
    env.path("marks").join(name).exists()
}

#[track_caller]
fn assert_refused(out: &Output, env: &TestEnv, expr: &Path, name: &str, line: &str) {
    out.assert_failed();
    out.assert_stderr_contains(line);
    assert!(
        !out.says_unbuildable_here(None),
        "declined instead of refused:\n{}",
        out.describe()
    );
    assert!(!ran(env, name), "the command ran for a refused account");
    assert!(
        !exists_on_disk(&env.out_path(expr, name)),
        "{name} was built anyway"
    );
}

#[test]
fn an_allowed_account_builds_and_a_refused_ones_command_never_runs() {
    let env = TestEnv::new("access-list");
    let (alice, bob, _) = accounts();
    config(&env, &format!("allowed-users = [\"{ALICE}\"]\n"));
    let expr = escape_expr(&env, "list.nix", &["forAlice", "forBob"]);
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(&daemon, ALICE, &expr, &["forAlice"], &[]);
    out.assert_ok();
    assert!(ran(&env, "forAlice"));
    // The first line of the build log names the account.
    let log = nix_log(&env.out_path(&expr, "forAlice"));
    let first = log
        .stdout
        .lines()
        .find(|l| l.starts_with("nix-hatch: "))
        .unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "nix-hatch: {ALICE} (uid {alice}, via daemon) asked for "
        )),
        "{}",
        log.stdout
    );
    let out = env.nix_build_via_as_user(&daemon, BOB, &expr, &["forBob"], &[]);
    assert_refused(
        &out,
        &env,
        &expr,
        "forBob",
        &format!(
            "nix-hatch: executor \"hostx\" refuses {BOB} (uid {bob}, via daemon): not in its allowed-users: root, {ALICE}; nothing was run"
        ),
    );
}

#[test]
fn membership_of_a_group_counts() {
    let env = TestEnv::new("access-group");
    let (_, bob, _) = accounts();
    config(&env, &format!("allowed-users = [\"@{RELEASE}\"]\n"));
    let expr = escape_expr(&env, "group.nix", &["forCarol", "forBob"]);
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    // Carol's group is a supplementary one.
    env.nix_build_via_as_user(&daemon, CAROL, &expr, &["forCarol"], &[])
        .assert_ok();
    assert!(ran(&env, "forCarol"));
    let out = env.nix_build_via_as_user(&daemon, BOB, &expr, &["forBob"], &[]);
    assert_refused(
        &out,
        &env,
        &expr,
        "forBob",
        &format!(
            "refuses {BOB} (uid {bob}, via daemon): not in its allowed-users: root, @{RELEASE}"
        ),
    );
}

/// Without `allowed-users`, the daemon's `trusted-users` decide: a trusted
/// account builds, an untrusted one is refused, root's local build goes.
#[test]
fn without_allowed_users_nixs_trusted_users_decide() {
    let env = TestEnv::new("access-trusted");
    let (_, bob, _) = accounts();
    config(&env, "");
    let expr = escape_expr(&env, "trusted.nix", &["forAlice", "forBob", "forRoot"]);
    let daemon = Daemon::start_with(
        &env,
        Some(&hook_bin()),
        &format!("trusted-users = root {ALICE}\n"),
    );
    env.nix_build_via_as_user(&daemon, ALICE, &expr, &["forAlice"], &[])
        .assert_ok();
    let out = env.nix_build_via_as_user(&daemon, BOB, &expr, &["forBob"], &[]);
    assert_refused(
        &out,
        &env,
        &expr,
        "forBob",
        &format!(
            "refuses {BOB} (uid {bob}, via daemon): not in Nix's trusted-users (it has no allowed-users): root, {ALICE}"
        ),
    );
    env.nix_build(&expr, &["forRoot"], &[]).assert_ok();
    assert!(ran(&env, "forRoot"));
}

fn records(env: &TestEnv) -> Vec<serde_json::Value> {
    let path = env.state_dir().join("audit.jsonl");
    let md = fs::metadata(&path).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (0, 0o600), "audit file");
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn audit(env: &TestEnv, args: &[&str]) -> Output {
    let out = run(
        std::process::Command::new(cli_bin())
            .args(["audit", "--config"])
            .arg(env.config_path())
            .args(args),
        Duration::from_secs(60),
    );
    out.assert_ok();
    out
}

/// Built, failed, timed-out and refused attempts, four of them at once:
/// one whole JSON record each, with who, what and how it ended; and
/// `nix-hatch audit` finds them by user, result, executor and time.
#[test]
fn every_escape_attempt_is_one_record_and_audit_reads_them() {
    let env = TestEnv::new("access-audit");
    let (alice, bob, _) = accounts();
    config(&env, &format!("allowed-users = [\"{ALICE}\"]\n"));
    let expr = env.write_expr(
        "audit.nix",
        r#"{
  built1 = escape { name = "audit-built1"; script = ''echo one > "$out"''; };
  built2 = escape { name = "audit-built2"; script = ''echo two > "$out"''; };
  failed = escape { name = "audit-failed"; script = ''echo about to fail; exit 3''; };
  slow = escape { name = "audit-slow"; script = ''exec sleep 60''; };
  refused = escape { name = "audit-refused"; script = ''echo never > "$out"''; };
}"#,
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(
        &daemon,
        ALICE,
        &expr,
        &["built1", "built2", "failed", "slow"],
        &["-j", "4", "--keep-going", "--option", "timeout", "3"],
    );
    out.assert_failed();
    let out = env.nix_build_via_as_user(&daemon, BOB, &expr, &["refused"], &[]);
    out.assert_failed();
    let recs = records(&env);
    assert_eq!(recs.len(), 5, "{recs:#?}");
    let by_name = |n: &str| {
        recs.iter()
            .find(|r| {
                r["drv"]
                    .as_str()
                    .is_some_and(|d| d.ends_with(&format!("-audit-{n}.drv")))
            })
            .unwrap_or_else(|| panic!("no record of {n}: {recs:#?}"))
    };
    for (name, result, status, user, uid) in [
        ("built1", "built", Some(0), ALICE, alice),
        ("built2", "built", Some(0), ALICE, alice),
        ("failed", "failed", Some(3), ALICE, alice),
        ("slow", "timed-out", None, ALICE, alice),
        ("refused", "refused", None, BOB, bob),
    ] {
        let r = by_name(name);
        assert_eq!(r["result"], result, "{r}");
        assert_eq!(r["exit_status"].as_i64(), status.map(i64::from), "{r}");
        assert_eq!(r["user"], user, "{r}");
        assert_eq!(r["uid"], uid, "{r}");
        assert_eq!(r["via"], "daemon", "{r}");
        assert_eq!(r["feature"], "escape-x", "{r}");
        assert_eq!(r["executor"], "hostx", "{r}");
        assert_eq!(r["kind"], "host", "{r}");
        assert_eq!(r["drv"], env.drv_path(&expr, name), "{r}");
        assert!(r["args"][0].as_str().is_some_and(|a| !a.is_empty()), "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    }
    assert!(by_name("slow")["duration_s"].as_f64().unwrap() >= 2.5);
    assert!(by_name("refused")["reason"]
        .as_str()
        .unwrap()
        .contains("nothing was run"));
    // A built record names its outputs as Nix has them.
    let built = by_name("built1");
    let path = env.out_path(&expr, "built1");
    let q = |flag: &str| {
        let o = run(
            nix_cmd("nix-store").args(["-q", flag, &path]),
            Duration::from_secs(60),
        );
        o.assert_ok();
        o.stdout.trim().to_owned()
    };
    assert_eq!(built["outputs"][0]["path"], path.as_str());
    assert_eq!(built["outputs"][0]["nar_hash"], q("--hash").as_str());
    assert_eq!(built["outputs"][0]["size"].to_string(), q("--size"));

    // nix-hatch audit: a table, and filters.
    let table = audit(&env, &[]).stdout;
    let rows: Vec<&str> = table.lines().collect();
    assert!(
        rows[0].starts_with("TIME") && rows[0].contains("RESULT"),
        "{table}"
    );
    assert_eq!(rows.len(), 6, "{table}");
    assert!(
        table.contains("audit-refused") && table.contains("timed-out"),
        "{table}"
    );
    let bobs = audit(&env, &["--user", BOB]).stdout;
    assert_eq!(bobs.lines().count(), 2, "{bobs}");
    assert!(bobs.contains("refused"), "{bobs}");
    let failed = audit(&env, &["--result", "failed", "--json"]).stdout;
    let failed: Vec<serde_json::Value> = failed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["exit_status"], 3);
    assert_eq!(
        audit(&env, &["--executor", "hostx", "--since", "1h", "--json"])
            .stdout
            .lines()
            .count(),
        5
    );
    assert_eq!(
        audit(&env, &["--since", "2999-01-01"])
            .stdout
            .lines()
            .count(),
        1
    );
    assert_eq!(
        audit(&env, &["--executor", "other"]).stdout.lines().count(),
        1
    );
}

#[test]
fn audit_says_when_there_is_no_log_and_skips_corrupt_lines() {
    let env = TestEnv::new("access-nolog");
    config(&env, "");
    let out = audit(&env, &[]);
    assert!(
        out.stdout.starts_with("no audit log yet:"),
        "{}",
        out.stdout
    );
    fs::write(
        env.state_dir().join("audit.jsonl"),
        "{\"broken\n\nnot json either\n",
    )
    .unwrap();
    let out = audit(&env, &[]);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    out.assert_stderr_contains("skipped 2 line(s)");
    let bad = run(
        std::process::Command::new(cli_bin())
            .args(["audit", "--result", "exploded", "--config"])
            .arg(env.config_path()),
        Duration::from_secs(60),
    );
    assert_eq!(bad.status.code(), Some(2));
    bad.assert_stderr_contains(
        "--result \"exploded\": expected built, failed, timed-out, refused or error",
    );
}

/// A program between Nix and the hook (here a wrapper script that does not
/// `exec` it) hides who asked: the account is unknown, so only executors
/// open to everyone take the build — never "whoever runs the wrapper".
#[test]
fn a_hook_behind_a_wrapper_cannot_tell_who_asked() {
    let env = TestEnv::new("access-wrapper");
    config(&env, "allowed-users = [\"root\"]\n");
    let wrapper = env.write_script(
        "wrapper.sh",
        &format!("#!/bin/sh\n{} \"$@\"\nexit $?\n", hook_bin().display()),
    );
    let expr = escape_expr(&env, "wrapper.nix", &["behind"]);
    let mut cmd = nix_cmd("nix-build");
    cmd.args([
        "--no-out-link",
        "--option",
        "substituters",
        "",
        "--option",
        "builders",
        "",
        "--option",
        "build-hook",
    ])
    .arg(&wrapper)
    .arg(&expr)
    .args(["-A", "behind"])
    .env("NIX_HATCH_CONFIG", env.config_path());
    let out = run(&mut cmd, NIX_LIMIT);
    assert_refused(
        &out,
        &env,
        &expr,
        "behind",
        "refuses an unknown account (the hook's parent",
    );
    out.assert_stderr_contains("is not Nix");
}
