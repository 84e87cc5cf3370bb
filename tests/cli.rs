//! `nix-hatch check` and `nix-hatch explain` as an admin runs them.

use std::path::Path;
use std::process::Command;

const CLI: &str = env!("CARGO_BIN_EXE_nix-hatch");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(CLI)
        .args(args)
        .output()
        .expect("running nix-hatch");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn check_lists_routes_of_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[routes]\nescape-sign = \"signer\"\n[executors.signer]\nkind = \"host\"\ncommand = [\"/bin/true\"]\nuser = \"root\"\nmax-jobs = 3\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("route: escape-sign -> signer (kind host, user root, max-jobs 3)"),
        "{out}"
    );
    // The queue: 2 × max-jobs unless set.
    assert!(
        out.contains("executor signer: max-jobs 3, queue 6: when every slot is busy, up to 6 more builds are accepted and wait in their hooks for a slot, first come first served"),
        "{out}"
    );
    let cfg = write(
        dir.path(),
        "q.toml",
        "[routes]\nescape-sign = \"signer\"\n[executors.signer]\nkind = \"host\"\ncommand = [\"/bin/true\"]\nqueue = 0\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("executor signer: max-jobs 1, queue 0: when every slot is busy, builds are postponed; Nix asks again every build-poll-interval"),
        "{out}"
    );
}

#[test]
fn check_reports_each_problem_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        r#"
colour = "blue"
[routes]
escape-a = "ghost"
[executors.a]
kind = "teleport"
[executors.b]
kind = "host"
[executors.c]
kind = "host"
command = ["/bin/true"]
user = "no-such-user-here"
"#,
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    for want in [
        "error: colour: unknown key",
        "error: routes.escape-a: routes to executor \"ghost\", which is not defined",
        "error: executors.a: unknown kind \"teleport\"",
        "error: executors.b: missing `command`",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(want)),
            "{want:?} missing in:\n{out}"
        );
    }
    // Structural problems come first; the unknown user is reported once the
    // structure is right.
    let cfg = write(
        dir.path(),
        "d.toml",
        "[executors.c]\nkind = \"host\"\ncommand = [\"/bin/true\"]\nuser = \"no-such-user-here\"\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: executors.c.user: unknown user \"no-such-user-here\""),
        "{out}"
    );
    let cfg = write(
        dir.path(),
        "e.toml",
        "[executors.c]\nkind = \"host\"\ncommand = [\"/nonexistent/sign\"]\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: executors.c.command: /nonexistent/sign:"),
        "{out}"
    );
}

#[test]
fn check_of_a_missing_file_says_so() {
    let (code, out) = run(&["check", "--config", "/nonexistent/nix-hatch.toml"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("cannot read config /nonexistent/nix-hatch.toml"),
        "{out}"
    );
}

/// A .drv made with nix/lib.nix, as a flake user would.
fn instantiate(expr: &str) -> String {
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/nix/lib.nix");
    let out = Command::new("nix-instantiate")
        .args(["--option", "substituters", "", "-E"])
        .arg(format!("let hatch = import {lib} {{ }}; in {expr}"))
        .output()
        .expect("nix-instantiate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.lines().last().unwrap().trim().to_owned()
}

#[test]
fn explain_names_the_route_or_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "state-dir = {:?}\n[routes]\nescape-sign = \"signer\"\n[executors.signer]\nkind = \"host\"\ncommand = [\"/bin/true\"]\nqueue = 3\n",
            state.display()
        ),
    );
    let esc = instantiate(
        r#"hatch.escape { feature = "escape-sign"; name = "explain-me"; args = [ "x" ]; }"#,
    );
    let (code, out) = run(&["explain", &esc, "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("route: feature escape-sign -> executor signer (kind host"),
        "{out}"
    );
    assert!(
        out.contains("slots: max-jobs 1, queue 3: when every slot is busy, up to 3 more builds are accepted and wait in their hooks"),
        "{out}"
    );
    assert!(out.contains("now: 0 running, 0 waiting"), "{out}");
    // A build running and one waiting, as hooks would hold them.
    let slots = nix_hatch::hook::slots::Slots::new(&state, "signer", 1, 3);
    let running = slots.admit().unwrap().unwrap();
    let waiting = slots.admit().unwrap().unwrap();
    let (_, out) = run(&["explain", &esc, "--config", &cfg]);
    assert!(out.contains("now: 1 running, 1 waiting"), "{out}");
    drop((running, waiting));

    let other =
        instantiate(r#"hatch.escape { feature = "escape-other"; name = "explain-other"; }"#);
    let (code, out) = run(&["explain", &other, "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("not an escape build: none of its features is routed (routes: escape-sign)"),
        "{out}"
    );

    let (code, out) = run(&[
        "explain",
        "/nix/store/00000000000000000000000000000000-nope.drv",
        "--config",
        &cfg,
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("error: reading /nix/store/00000000000000000000000000000000-nope.drv"),
        "{out}"
    );
}

#[test]
fn check_reports_a_missing_bwrap_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[routes]\nescape-j = \"j\"\n[executors.j]\nkind = \"jail\"\nbwrap = \"/nonexistent/bwrap\"\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("bubblewrap")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with("error: executors.j: bubblewrap not found at /nonexistent/bwrap"),
        "{out}"
    );
}

#[test]
fn check_accepts_a_working_jail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[routes]\nescape-j = \"j\"\n[executors.j]\nkind = \"jail\"\n",
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("route: escape-j -> j (kind jail, user nobody, max-jobs 1)"),
        "{out}"
    );
    assert!(
        out.contains("warning: executor j runs builds as nobody"),
        "{out}"
    );
}

#[test]
fn check_prints_the_nix_version_on_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", "");
    let version = Command::new("nix-store")
        .arg("--version")
        .output()
        .expect("nix-store --version");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    let want = format!("nix: {version} (tested: 2.8 … 2.34)");
    assert_eq!(out.lines().next(), Some(want.as_str()), "{out}");
    // Every version the suite runs on is in the tested range.
    assert!(!out.contains("outside"), "{out}");
    // A config error still comes with the version.
    let (code, out) = run(&["check", "--config", "/nonexistent/c.toml"]);
    assert_eq!(code, 1);
    assert!(out.starts_with("nix: "), "{out}");
}

/// With Lix on PATH, `check` names it and says whether nix-hatch can be its
/// hook: up to 2.93 (Nix's stdio hook protocol) with a warning, from 2.94
/// (Cap'n Proto RPC) not at all, which fails the check.
#[test]
fn check_recognises_lix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", "");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let check_with = |version: &str| {
        // What Lix prints (newer ones add their configuration).
        let script = write(
            &bin,
            "nix-store",
            &format!(
                "#!/bin/sh\nprintf '%s\\n' 'nix-store (Lix, like Nix) {version}' 'System type: x86_64-linux'\n"
            ),
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(CLI)
            .args(["check", "--config", &cfg])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .expect("running nix-hatch");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, out) = check_with("2.93.3");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().next(),
        Some(
            "nix: nix-store (Lix, like Nix) 2.93.3 (Lix; nix-hatch is tested with Nix 2.8 … 2.34)"
        ),
        "{out}"
    );
    assert!(
        out.contains("warning: Lix 2.93 is not among the versions nix-hatch is tested with"),
        "{out}"
    );
    assert!(out.contains("deprecates `build-hook`"), "{out}");
    assert!(out.contains(": ok"), "{out}");

    let (code, out) = check_with("2.94.1");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: Lix 2.94 talks to build hooks over Cap'n Proto RPC"),
        "{out}"
    );
    // The config is still checked and reported.
    assert!(out.contains(&format!("config {cfg}: ok")), "{out}");
}

/// `check` says who may use each executor, and warns about a privileged
/// one open to everyone.
#[test]
fn check_says_who_may_use_each_executor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        r#"
[routes]
escape-sign = "signer"
escape-ci = "ci"
escape-any = "any"
[executors.signer]
kind = "host"
command = ["/bin/true"]
allowed-users = ["*"]
[executors.ci]
kind = "host"
command = ["/bin/true"]
user = "nobody"
allowed-users = ["ci", "@release"]
[executors.any]
kind = "host"
user = "nobody"
allow-any-builder = true
"#,
    );
    let (code, out) = run(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{out}");
    for line in [
        "executor signer: allowed users: everyone (*) (allowed-users)",
        "executor ci: allowed users: root, ci, @release (allowed-users)",
        "warning: executor signer runs its command as root and is open to everyone (*)",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    // Without allowed-users: Nix's trusted-users, read from this Nix.
    assert!(
        out.contains("executor any: allowed users: root (no allowed-users: Nix's trusted-users"),
        "{out}"
    );
    assert!(
        !out.contains("executor ci runs its command as root"),
        "{out}"
    );
    assert!(
        !out.contains("warning: executor any runs the derivation's own"),
        "{out}"
    );
}
