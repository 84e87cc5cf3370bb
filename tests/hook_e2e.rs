//! End-to-end tests of `nix-hatch-hook` as Nix's `build-hook`, against the
//! real Nix on the machine (Nix 2.8 on Debian 12), as root.
//!
//! Each test asserts what a user would notice: what nix-build prints, what is
//! in the store, what `nix-store -q`/`nix log` report. Every derivation carries
//! the test's nonce, so outputs are fresh on every run (see tests/common).

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Parses `key=value` lines.
fn kv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn read(path: impl AsRef<Path>) -> String {
    let p = path.as_ref();
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `nix-store --verify-path`: the contents still hash to the registered narHash.
#[track_caller]
fn assert_verify_path(path: &str) {
    run(
        nix_cmd("nix-store").args(["--verify-path", path]),
        Duration::from_secs(60),
    )
    .assert_ok();
}

/// Nothing left in the executor's staging area after a build finished.
#[track_caller]
fn assert_no_staging_leftovers(env: &TestEnv) {
    let left = env.staging_entries();
    assert!(
        left.is_empty(),
        "left in {}: {left:?}",
        env.state_dir().join("staging").display()
    );
}

/// The script of the basic escape derivation: records what the admin command
/// saw, and reads a host file no sandbox would let it see.
const BASIC: &str = r#"{
  basic = escape { name = "basic"; script = ''
    mkdir -p "$out"
    echo "hello from the host" > "$out/greeting"
    cat "@DIR@/host-only-secret" > "$out/secret"
    {
      echo "out=$out"
      echo "outputs=$outputs"
      echo "pwd=$(pwd)"
      echo "top=$NIX_BUILD_TOP"
      echo "tmpdir=$TMPDIR"
      echo "home=$HOME"
      echo "path=$PATH"
      echo "drv=$NIX_HATCH_DRV"
      echo "store=$NIX_STORE"
      echo "logfd=$NIX_LOG_FD"
      echo "uid=$(id -u)"
    } > "$out/env"
    echo "basic build done"
  ''; };
}"#;

/// Checks the output of [`BASIC`].
fn check_basic(env: &TestEnv, expr: &Path, out: &Output) {
    out.assert_ok();
    let want = env.out_path(expr, "basic");
    assert_eq!(out.store_paths(), vec![want.clone()], "{}", out.describe());
    assert!(is_valid(&want), "{want} is not valid");
    assert_eq!(read(format!("{want}/greeting")), "hello from the host\n");
    assert_eq!(
        read(format!("{want}/secret")),
        format!("secret {}\n", env.nonce)
    );
    let drv = env.drv_path(expr, "basic");
    let e = kv(&read(format!("{want}/env")));
    let show = format!("{e:#?}");
    assert_eq!(e["out"], want, "$out must be the real store path: {show}");
    assert_eq!(e["outputs"], "out", "{show}");
    assert_eq!(e["drv"], drv, "NIX_HATCH_DRV: {show}");
    assert_eq!(e["pwd"], e["top"], "cwd must be NIX_BUILD_TOP: {show}");
    assert_eq!(e["tmpdir"], e["top"], "{show}");
    assert!(
        !e["top"].is_empty() && !e["top"].starts_with("/nix/store"),
        "{show}"
    );
    assert_eq!(e["home"], "/root", "HOME of user root: {show}");
    assert!(e["path"].split(':').any(|p| p == "/usr/bin"), "{show}");
    assert_eq!(e["store"], "/nix/store", "{show}");
    assert_eq!(e["logfd"], "2", "{show}");
    assert_eq!(e["uid"], "0", "user = root: {show}");
    assert_eq!(deriver(&want), drv, "deriver registered");
    // `env` embeds $out; busybox is in the input closure but not embedded.
    assert_eq!(references(&want), set(&[want.as_str()]));
    assert_verify_path(&want);
    assert!(
        !exists_on_disk(&e["top"]),
        "build dir {} left behind after a successful build",
        e["top"]
    );
}

#[test]
fn escape_derivation_built_by_host_command() {
    let env = TestEnv::new("basic");
    fs::write(
        env.path("host-only-secret"),
        format!("secret {}\n", env.nonce),
    )
    .unwrap();
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr("basic.nix", BASIC);
    let out = env.nix_build(&expr, &["basic"], &[]);
    check_basic(&env, &expr, &out);
    assert_no_staging_leftovers(&env);
    // The command's output is shown while building.
    out.assert_stderr_contains("basic build done");
}

#[test]
fn escape_derivation_built_through_private_daemon() {
    let env = TestEnv::new("daemon");
    fs::write(
        env.path("host-only-secret"),
        format!("secret {}\n", env.nonce),
    )
    .unwrap();
    env.write_host_config(&env.standard_config());
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    daemon.assert_used_by_clients(&env);
    let expr = env.write_expr("basic.nix", BASIC);
    // No hook option on the client: the daemon's nix.conf decides.
    let out = env.nix_build_via(&daemon, &expr, &["basic"], &[]);
    if !out.success() {
        panic!(
            "build through daemon failed:\n{}\ndaemon log:\n{}",
            out.describe(),
            daemon.log_text()
        );
    }
    check_basic(&env, &expr, &out);
}

/// An admin's set-up: `build-hook` only in the daemon's own nix.conf (a
/// private NIX_CONF_DIR), no `NIX_CONFIG`, no `--option` anywhere. Nix ≤
/// 2.24 and ≥ 2.34 use it: escapes reach nix-hatch. Nix 2.25 … 2.33
/// overwrite it with their default hook (NixOS/nix#15083), so nix-hatch is
/// never asked and the escape fails as an unroutable feature does — what
/// the README's `NIX_CONFIG` drop-in and the NixOS module work around.
#[test]
fn daemon_takes_build_hook_from_its_nix_conf() {
    let env = TestEnv::new("conf-hook");
    env.write_host_config(&env.standard_config());
    let daemon = Daemon::start_nix_conf_only(&env, &hook_bin());
    let expr = env.write_expr(
        "conf-hook.nix",
        r#"{ e = escape { name = "conf-hook"; script = ''echo "built from nix.conf's hook" > "$out"''; }; }"#,
    );
    let out = env.nix_build_via(&daemon, &expr, &["e"], &[]);
    let audit = env.state_dir().join("audit.jsonl");
    if nix_conf_build_hook_ignored() {
        out.assert_failed();
        out.assert_unbuildable_here(None);
        assert!(
            !audit.exists(),
            "Nix {} is known to ignore build-hook in nix.conf, yet nix-hatch saw the escape",
            nix_version()
        );
        return;
    }
    if !out.success() {
        panic!("{}\ndaemon log:\n{}", out.describe(), daemon.log_text());
    }
    let p = env.out_path(&expr, "e");
    assert_eq!(out.store_paths(), vec![p.clone()]);
    assert!(is_valid(&p));
    assert_eq!(read(&p), "built from nix.conf's hook\n");
    assert!(
        read(&audit).contains(r#""result":"built""#),
        "no audit record of the build:\n{}",
        read(&audit)
    );
}

#[test]
fn unprivileged_user_builds_escape_through_the_daemon() {
    let env = TestEnv::new("untrusted");
    let mut cfg = env.standard_config();
    cfg.extra = "allowed-users = [\"nobody\"]\n".into();
    env.write_host_config(&cfg);
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let expr = env.write_expr(
        "untrusted.nix",
        r#"{ e = escape { name = "untrusted"; script = ''echo "built for $NIX_HATCH_DRV" > "$out"''; }; }"#,
    );
    let out = env.nix_build_via_as_user(&daemon, "nobody", &expr, &["e"], &[]);
    if !out.success() {
        panic!("{}\ndaemon log:\n{}", out.describe(), daemon.log_text());
    }
    let p = env.out_path(&expr, "e");
    assert_eq!(out.store_paths(), vec![p.clone()]);
    assert!(is_valid(&p));
    assert_eq!(
        read(&p),
        format!("built for {}\n", env.drv_path(&expr, "e"))
    );
    assert!(
        daemon.log_text().contains("user nobody"),
        "the daemon did not see user nobody:\n{}",
        daemon.log_text()
    );
}

#[test]
fn outputs_references_multiple_outputs_file_symlink_and_modes() {
    let env = TestEnv::new("refs");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "refs.nix",
        r#"let
  dep = plain { name = "refs-dep"; script = "echo dep > $out"; };
in {
  inherit dep;
  multi = escape { name = "refs-multi"; attrs = { outputs = [ "out" "dev" ]; }; script = ''
    mkdir -p "$out/bin" "$out/share" "$dev/include"
    echo "${dep}" > "$out/share/uses-input"
    echo "$out" > "$out/share/self"
    echo "$dev" > "$out/share/sibling"
    printf '#!/bin/sh\necho tool\n' > "$out/bin/tool"
    chmod 755 "$out/bin/tool"
    echo data > "$out/share/data"
    chmod 644 "$out/share/data"
    echo "int x;" > "$dev/include/x.h"
  ''; };
  file = escape { name = "refs-file"; script = ''
    printf 'just a file\n' > "$out"
  ''; };
  exe = escape { name = "refs-exe"; script = ''
    printf '#!/bin/sh\necho hi\n' > "$out"
    chmod 700 "$out"
  ''; };
  link = escape { name = "refs-link"; script = ''
    ln -s "${dep}" "$out"
  ''; };
}"#,
    );
    let out = env.nix_build(
        &expr,
        &["multi", "multi.dev", "file", "exe", "link"],
        &["-j", "4"],
    );
    out.assert_ok();

    let dep = env.out_path(&expr, "dep");
    let m_out = env.out_path(&expr, "multi");
    let m_dev = env.out_path(&expr, "multi.dev");
    let file = env.out_path(&expr, "file");
    let exe = env.out_path(&expr, "exe");
    let link = env.out_path(&expr, "link");
    for p in [&dep, &m_out, &m_dev, &file, &exe, &link] {
        assert!(is_valid(p), "{p} not valid\n{}", out.describe());
        assert_verify_path(p);
    }

    // Multiple outputs, real paths embedded.
    assert_eq!(
        read(format!("{m_out}/share/uses-input")),
        format!("{dep}\n")
    );
    assert_eq!(read(format!("{m_out}/share/self")), format!("{m_out}\n"));
    assert_eq!(read(format!("{m_out}/share/sibling")), format!("{m_dev}\n"));
    assert_eq!(read(format!("{m_dev}/include/x.h")), "int x;\n");

    // References: exactly what is embedded (busybox is an input, not embedded).
    assert_eq!(
        references(&m_out),
        set(&[dep.as_str(), m_out.as_str(), m_dev.as_str()]),
        "references of {m_out}"
    );
    assert_eq!(references(&m_dev), BTreeSet::new(), "references of {m_dev}");
    assert_eq!(references(&file), BTreeSet::new());
    assert_eq!(references(&link), set(&[dep.as_str()]));

    // File output.
    assert!(fs::symlink_metadata(&file).unwrap().is_file());
    assert_eq!(read(&file), "just a file\n");

    // Symlink output.
    let lm = fs::symlink_metadata(&link).unwrap();
    assert!(lm.file_type().is_symlink(), "{link} is not a symlink");
    assert_eq!(fs::read_link(&link).unwrap().to_str().unwrap(), dep);

    // Modes as in any store path: executables 0555, other files 0444.
    let mode = |p: &str| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&format!("{m_out}/bin/tool")), 0o555, "executable bit");
    assert_eq!(mode(&format!("{m_out}/share/data")), 0o444);
    assert_eq!(mode(&exe), 0o555, "executable file output");
    assert_eq!(mode(&file), 0o444);
    assert_eq!(mode(&m_out), 0o555);
    // Canonical metadata: mtime 1, owned by root.
    let md = fs::symlink_metadata(format!("{m_out}/share/data")).unwrap();
    assert_eq!(md.mtime(), 1, "mtime canonicalised");
    assert_eq!(md.uid(), 0);
    let run_out = run(
        std::process::Command::new(format!("{m_out}/bin/tool")).env_clear(),
        Duration::from_secs(10),
    );
    run_out.assert_ok();
    assert_eq!(run_out.stdout, "tool\n");
}

/// Nix applies a derivation's output checks only to builds it does itself;
/// nix-hatch applies them (same semantics, same messages) before anything
/// is registered.
#[test]
fn output_checks_are_enforced_like_nix() {
    let env = TestEnv::new("checks");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "checks.nix",
        r#"rec {
  dep = plain { name = "checks-dep"; script = "echo dep > $out"; };
  mid = plain { name = "checks-mid"; script = "echo ${dep} > $out"; };
  refsDep = escape { name = "checks-refs-dep"; attrs = { allowedReferences = [ ]; }; script = ''echo "${dep}" > "$out"''; };
  okDep = escape { name = "checks-ok-dep"; attrs = { allowedReferences = [ dep "out" ]; }; script = ''echo "${dep} $out" > "$out"''; };
  viaMid = escape { name = "checks-via-mid"; attrs = { disallowedRequisites = [ dep ]; }; script = ''echo "${mid}" > "$out"''; };
  selfOk = escape { name = "checks-self"; attrs = { allowedRequisites = [ mid dep ]; }; script = ''echo "${mid} $out" > "$out"''; };
  big = escape { name = "checks-big"; attrs = { __structuredAttrs = true; outputChecks.out.maxSize = 1000; }; script = ''
    i=0; while [ $i -lt 100 ]; do echo "0123456789012345678901234567890123456789" >> "$out"; i=$((i+1)); done
  ''; };
  bad = escape { name = "checks-bad-spec"; attrs = { allowedReferences = [ "nonsense" ]; }; script = ''echo > "$out"''; };
}"#,
    );
    let dep = env.out_path(&expr, "dep");
    for (attr, message) in [
        (
            "refsDep",
            "is not allowed to refer to the following paths:".to_owned(),
        ),
        (
            "viaMid",
            format!("is not allowed to refer to the following paths:\n  {dep}"),
        ),
        ("big", "is too large at".to_owned()),
        (
            "bad",
            "contains an illegal reference specifier 'nonsense'".to_owned(),
        ),
    ] {
        let out = env.nix_build(&expr, &[attr], &[]);
        out.assert_failed();
        assert!(
            out.stderr.contains(&message),
            "{attr}: want {message:?}\n{}",
            out.describe()
        );
        assert!(!is_valid(&env.out_path(&expr, attr)), "{attr} registered");
    }
    let out = env.nix_build(&expr, &["okDep", "selfOk"], &[]);
    out.assert_ok();
    let ok = env.out_path(&expr, "okDep");
    assert_eq!(references(&ok), set(&[dep.as_str(), ok.as_str()]));
}

/// Nix asks the hook only for the outputs that are not valid; an output
/// rebuilt next to a still-valid sibling keeps its reference to it.
#[test]
fn partial_rebuild_keeps_the_reference_to_a_valid_sibling() {
    let env = TestEnv::new("partial");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "partial.nix",
        r#"{
  multi = escape { name = "partial-multi"; attrs = { outputs = [ "out" "dev" ]; }; script = ''
    echo out > "$out"
    echo "$out" > "$dev"
  ''; };
}"#,
    );
    env.nix_build(&expr, &["multi", "multi.dev"], &[])
        .assert_ok();
    let m_out = env.out_path(&expr, "multi");
    let m_dev = env.out_path(&expr, "multi.dev");
    assert_eq!(references(&m_dev), set(&[m_out.as_str()]));
    run(
        nix_cmd("nix-store").args(["--delete", &m_dev]),
        Duration::from_secs(60),
    )
    .assert_ok();
    assert!(!is_valid(&m_dev) && is_valid(&m_out));

    let out = env.nix_build(&expr, &["multi.dev"], &[]);
    out.assert_ok();
    assert!(is_valid(&m_dev), "{}", out.describe());
    assert_eq!(read(&m_dev), format!("{m_out}\n"));
    assert_eq!(
        references(&m_dev),
        set(&[m_out.as_str()]),
        "references of the rebuilt {m_dev}\n{}",
        out.describe()
    );
    assert_verify_path(&m_dev);
}

#[test]
fn failing_command_fails_build_shows_log_tail_and_leaves_no_output() {
    let env = TestEnv::new("fail");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "fail.nix",
        r#"{
  fail = escape { name = "fail"; script = ''
    mkdir -p "$out"
    echo partial > "$out/partial"
    i=1
    while [ $i -le 30 ]; do echo "noise line $i"; i=$((i + 1)); done
    echo "the very last words ${nonce}" >&2
    exit 7
  ''; };
}"#,
    );
    let drv = env.drv_path(&expr, "fail");
    let want = env.out_path(&expr, "fail");
    let out = env.nix_build(&expr, &["fail"], &[]);
    out.assert_failed();
    out.assert_builder_failed(&drv);
    out.assert_stderr_contains(&format!("the very last words {}", env.nonce));
    out.assert_stderr_contains("noise line 30");
    assert!(!is_valid(&want), "{want} valid after a failed build");
    assert!(
        !exists_on_disk(&want),
        "{want} left on disk after a failed build"
    );
    assert_no_staging_leftovers(&env);
}

/// A build that floods its log right before it fails: Nix stops reading
/// the log once the hook's stderr ends, so the hook waits for Nix to have
/// read it all before it exits — the lines saying why the build failed are
/// in what Nix prints and in `nix log`, not lost in the pipe.
#[test]
fn a_build_that_floods_its_log_still_shows_why_it_failed() {
    let env = TestEnv::new("flood");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 3;
    env.write_host_config(&cfg);
    // Three at once: one Nix process reads all three logs, so it falls
    // behind and each hook exits with its log pipe full.
    let one = |n: u32| {
        format!(
            r#"f{n} = escape {{ name = "flood-{n}"; script = ''
    head -c 1500000 /dev/zero | tr '\0' '\n'
    echo "the very last words {n} ${{nonce}}"
    exit 7
  ''; }};"#
        )
    };
    let expr = env.write_expr(
        "flood.nix",
        &format!("{{ {} {} {} }}", one(1), one(2), one(3)),
    );
    let out = env.nix_build(&expr, &["f1", "f2", "f3"], &["-j", "3", "--keep-going"]);
    out.assert_failed();
    for n in 1..=3 {
        let drv = env.drv_path(&expr, &format!("f{n}"));
        out.assert_stderr_contains(&format!("the very last words {n} {}", env.nonce));
        let log = nix_log(&drv).stdout;
        let tail = log.trim_end().rsplit('\n').take(3).collect::<Vec<_>>();
        assert!(
            log.contains("command failed with exit code 7"),
            "f{n}: not in nix log; it ends with {tail:?}"
        );
    }
}

#[test]
fn timeout_kills_command_and_its_background_children() {
    let env = TestEnv::new("timeout");
    let mut cfg = env.standard_config();
    cfg.timeout = 3;
    env.write_host_config(&cfg);
    // The sleeps run as symlinks into the test dir, so every process the
    // build leaves behind is recognisable by its command line on the host
    // (whatever pid namespace the executor uses). The background child
    // also writes its pid (as it sees it) before sleeping.
    std::os::unix::fs::symlink("/bin/sleep", env.path("bg-sleep")).unwrap();
    std::os::unix::fs::symlink("/bin/sleep", env.path("fg-sleep")).unwrap();
    let marker = env.root().to_string_lossy().into_owned();
    let expr = env.write_expr(
        "timeout.nix",
        r#"{
  slow = escape { name = "slow"; script = ''
    sh -c 'echo $$ > "@DIR@/child.pid.tmp"; mv "@DIR@/child.pid.tmp" "@DIR@/child.pid"; exec "@DIR@/bg-sleep" 600' &
    echo "started a background child"
    "@DIR@/fg-sleep" 600
    echo ok > "$out"
  ''; };
}"#,
    );
    let want = env.out_path(&expr, "slow");
    let out = env.nix_build(&expr, &["slow"], &[]);
    out.assert_failed();
    assert!(
        out.elapsed < Duration::from_secs(90),
        "timeout = 3 but nix-build took {:?}",
        out.elapsed
    );
    let lower = out.stderr.to_lowercase();
    assert!(
        lower.contains("timed out") || lower.contains("timeout"),
        "stderr does not say the build timed out:\n{}",
        out.describe()
    );
    assert!(
        env.path("child.pid").exists(),
        "the background child never ran:\n{}",
        out.describe()
    );
    // Gone by the time nix-build returns (the hook waits for them).
    assert_eq!(
        processes_mentioning(&marker),
        Vec::new(),
        "processes of the timed-out build still running"
    );
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
    assert_no_staging_leftovers(&env);
}

#[test]
fn fixed_output_derivation_hash_checked() {
    let env = TestEnv::new("fod");
    env.write_host_config(&env.standard_config());
    // Oracles: nix-hash of the exact content the command will produce.
    let content = format!("fixed {}\n", env.nonce);
    fs::write(env.path("flat"), &content).unwrap();
    let right_flat = nix_hash(&env.path("flat"), true);
    fs::create_dir_all(env.path("rec")).unwrap();
    fs::write(env.path("rec/data"), &content).unwrap();
    let right_rec = nix_hash(&env.path("rec"), false);
    fs::write(env.path("other"), "not the content\n").unwrap();
    let wrong = nix_hash(&env.path("other"), true);
    let body = r#"{
  wrong = escape { name = "fod-wrong-${nonce}";
    attrs = { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "@WRONG@"; };
    script = ''printf 'fixed %s\n' "${nonce}" > "$out"''; };
  right = escape { name = "fod-right-${nonce}";
    attrs = { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "@RIGHT_FLAT@"; };
    script = ''printf 'fixed %s\n' "${nonce}" > "$out"''; };
  recursive = escape { name = "fod-rec-${nonce}";
    attrs = { outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "@RIGHT_REC@"; };
    script = ''mkdir "$out"; printf 'fixed %s\n' "${nonce}" > "$out/data"''; };
}"#
    .replace("@WRONG@", &wrong)
    .replace("@RIGHT_FLAT@", &right_flat)
    .replace("@RIGHT_REC@", &right_rec);
    let expr = env.write_expr("fod.nix", &body);

    let wrong_out = env.out_path(&expr, "wrong");
    let out = env.nix_build(&expr, &["wrong"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("specified:");
    out.assert_stderr_contains("got:");
    assert!(
        !is_valid(&wrong_out),
        "{wrong_out} valid despite hash mismatch"
    );
    assert!(!exists_on_disk(&wrong_out), "{wrong_out} left on disk");

    let out = env.nix_build(&expr, &["right", "recursive"], &[]);
    out.assert_ok();
    let right = env.out_path(&expr, "right");
    let rec = env.out_path(&expr, "recursive");
    assert!(is_valid(&right));
    assert!(is_valid(&rec));
    assert_eq!(read(&right), content);
    assert_eq!(read(format!("{rec}/data")), content);
    assert_verify_path(&right);
    assert_verify_path(&rec);
}

#[test]
fn nix_log_shows_command_output() {
    let env = TestEnv::new("log");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "log.nix",
        r#"{
  logged = escape { name = "logged"; script = ''
    echo "to stdout ${nonce}"
    echo "to stderr ${nonce}" >&2
    echo ok > "$out"
  ''; };
}"#,
    );
    let out = env.nix_build(&expr, &["logged"], &[]);
    out.assert_ok();
    out.assert_stderr_contains(&format!("to stdout {}", env.nonce));
    let drv = env.drv_path(&expr, "logged");
    let outp = env.out_path(&expr, "logged");
    for p in [&drv, &outp] {
        let log = nix_log(p);
        log.assert_ok();
        for needle in ["to stdout", "to stderr"] {
            let n = format!("{needle} {}", env.nonce);
            assert!(
                log.stdout.contains(&n),
                "`nix log {p}` lacks {n:?}:\n{}",
                log.describe()
            );
        }
    }
}

#[test]
fn plain_derivation_builds_normally_in_the_same_run() {
    let env = TestEnv::new("mixed");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "mixed.nix",
        r#"{
  esc = escape { name = "mixed-escape"; script = ''echo "escape $NIX_HATCH_DRV" > "$out"''; };
  pl = plain { name = "mixed-plain"; script = "echo plain $nonce $PATH > $out"; };
}"#,
    );
    let out = env.nix_build(&expr, &["esc", "pl"], &["-j", "2"]);
    out.assert_ok();
    let esc = env.out_path(&expr, "esc");
    let pl = env.out_path(&expr, "pl");
    assert!(is_valid(&esc) && is_valid(&pl));
    assert_eq!(
        read(&esc),
        format!("escape {}\n", env.drv_path(&expr, "esc"))
    );
    // Built by Nix itself: Nix's builder environment.
    assert_eq!(read(&pl), format!("plain {} /path-not-set\n", env.nonce));
}

#[test]
fn max_jobs_bounds_concurrent_builds() {
    const N: usize = 6;
    let env = TestEnv::new("slots");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 2;
    env.write_host_config(&cfg);
    let d = env.path("conc");
    fs::create_dir_all(&d).unwrap();
    for f in ["running", "max", "done"] {
        fs::write(d.join(f), "0\n").unwrap();
    }
    fs::write(d.join("events"), "").unwrap();
    // Each job enters (running+1, max updated under flock), then waits,
    // bounded, for a peer to be running alongside it (or for being the last
    // job), then leaves. With max-jobs = 2 the observed maximum must be 2.
    let script = r#"
    D="@DIR@/conc"
    exec 9>"$D/lock"
    flock 9
    n=$(( $(cat "$D/running") + 1 )); echo "$n" > "$D/running"
    m=$(cat "$D/max"); if [ "$n" -gt "$m" ]; then echo "$n" > "$D/max"; fi
    echo "start $out running=$n" >> "$D/events"
    flock -u 9
    i=0
    while :; do
      flock 9; r=$(cat "$D/running"); d=$(cat "$D/done"); flock -u 9
      if [ "$r" -ge 2 ]; then break; fi
      if [ $((r + d)) -ge @N@ ]; then break; fi
      i=$((i + 1))
      if [ "$i" -ge 200 ]; then echo "no peer within 10s"; break; fi
      sleep 0.05
    done
    flock 9
    echo $(( $(cat "$D/running") - 1 )) > "$D/running"
    echo $(( $(cat "$D/done") + 1 )) > "$D/done"
    echo "end $out" >> "$D/events"
    flock -u 9
    echo "$n" > "$out"
"#
    .replace("@N@", &N.to_string());
    let mut body = format!("let conc = ''{script}''; in {{\n");
    let mut attrs = Vec::new();
    for i in 1..=N {
        body.push_str(&format!(
            "  j{i} = escape {{ name = \"slot-{i}\"; script = conc; }};\n"
        ));
        attrs.push(format!("j{i}"));
    }
    body.push('}');
    let expr = env.write_expr("slots.nix", &body);
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let out = env.nix_build(&expr, &attrs, &["-j", &N.to_string()]);
    let events = read(d.join("events"));
    if !out.success() {
        panic!("{}\nevents:\n{events}", out.describe());
    }
    for a in &attrs {
        let p = env.out_path(&expr, a);
        assert!(is_valid(&p), "{p} not valid");
    }
    let max: u32 = read(d.join("max")).trim().parse().unwrap();
    assert_eq!(
        read(d.join("done")).trim(),
        N.to_string(),
        "events:\n{events}"
    );
    assert_eq!(
        max, 2,
        "max-jobs = 2 but {max} ran at once; events:\n{events}"
    );
}

#[test]
fn allow_any_builder_runs_the_derivations_own_builder() {
    let env = TestEnv::new("anybuilder");
    let mut cfg = env.standard_config();
    cfg.command = None;
    cfg.allow_any_builder = true;
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "any.nix",
        r#"{
  own = plain { name = "own-builder"; attrs = { requiredSystemFeatures = [ "escape-x" ]; }; script = ''
    mkdir "$out"
    readlink /proc/self/exe > "$out/exe"
    env > "$out/env"
    id -u > "$out/uid"
  ''; };
}"#,
    );
    let out = env.nix_build(&expr, &["own"], &[]);
    out.assert_ok();
    let p = env.out_path(&expr, "own");
    assert!(is_valid(&p));
    assert_eq!(
        read(format!("{p}/exe")),
        format!("{}/bin/busybox\n", busybox())
    );
    assert_eq!(read(format!("{p}/uid")), "0\n");
    let e = kv(&read(format!("{p}/env")));
    let show = format!("{e:#?}");
    assert_eq!(e["PATH"], "/path-not-set", "{show}");
    assert_eq!(e["HOME"], "/homeless-shelter", "{show}");
    assert_eq!(e["out"], p, "{show}");
    assert_eq!(e["nonce"], env.nonce, "derivation env: {show}");
    assert_eq!(e["NIX_STORE"], "/nix/store", "{show}");
    assert!(!e.contains_key("NIX_HATCH_DRV"), "not Nix's env: {show}");
}

#[test]
fn allow_any_builder_environment_matches_nix() {
    let env = TestEnv::new("anyenv");
    let mut cfg = env.standard_config();
    cfg.command = None;
    cfg.allow_any_builder = true;
    env.write_host_config(&cfg);
    // Same builder and script; one routed to nix-hatch, one built by Nix
    // locally (`benchmark` is one of Nix's default local features).
    let expr = env.write_expr(
        "anyenv.nix",
        r#"let script = "env > $out"; in {
  hatch = plain { name = "envcmp"; inherit script; attrs = { requiredSystemFeatures = [ "escape-x" ]; }; };
  nix = plain { name = "envcmp"; inherit script; attrs = { requiredSystemFeatures = [ "benchmark" ]; }; };
}"#,
    );
    let out = env.nix_build(&expr, &["hatch", "nix"], &[]);
    out.assert_ok();
    let h = kv(&read(env.out_path(&expr, "hatch")));
    let n = kv(&read(env.out_path(&expr, "nix")));
    let hk: BTreeSet<_> = h.keys().collect();
    let nk: BTreeSet<_> = n.keys().collect();
    assert_eq!(hk, nk, "variable names differ:\nhatch: {h:#?}\nnix: {n:#?}");
    for k in [
        "PATH",
        "HOME",
        "TERM",
        "NIX_STORE",
        "NIX_LOG_FD",
        "NIX_BUILD_CORES",
        "builder",
        "name",
        "system",
        "nonce",
        "SHLVL",
    ] {
        assert_eq!(h.get(k), n.get(k), "{k}:\nhatch: {h:#?}\nnix: {n:#?}");
    }
    for k in ["TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        assert_eq!(h.get(k), h.get("NIX_BUILD_TOP"), "{k}: {h:#?}");
    }
}

#[test]
fn pass_env_passes_only_listed_variables() {
    let env = TestEnv::new("passenv");
    let mut cfg = env.standard_config();
    cfg.pass_env = vec!["HATCH_PASSED".into()];
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "passenv.nix",
        r#"{
  p = escape { name = "passenv"; attrs = { HATCH_PASSED = "yes-${nonce}"; HATCH_HIDDEN = "no"; }; script = ''
    for v in HATCH_PASSED HATCH_HIDDEN nonce; do
      echo "$v=$(printenv $v || echo unset)"
    done > "$out"
  ''; };
}"#,
    );
    let out = env.nix_build(&expr, &["p"], &[]);
    out.assert_ok();
    let e = kv(&read(env.out_path(&expr, "p")));
    assert_eq!(e["HATCH_PASSED"], format!("yes-{}", env.nonce));
    assert_eq!(e["HATCH_HIDDEN"], "unset", "not in pass-env");
    assert_eq!(
        e["nonce"], "unset",
        "derivation env is not passed to commands"
    );
}

#[test]
fn store_verifies_clean_after_escape_builds() {
    let env = TestEnv::new("verify");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "verify.nix",
        r#"{
  d = escape { name = "verify-dir"; script = ''
    mkdir -p "$out/a/b"; echo x > "$out/a/b/c"; ln -s b "$out/a/l"; echo "$out" > "$out/self"
    printf '#!/bin/sh\n' > "$out/x"; chmod +x "$out/x"
  ''; };
  f = escape { name = "verify-file"; script = ''echo "${nonce}" > "$out"''; };
  l = escape { name = "verify-link"; script = ''ln -s /nonexistent "$out"''; };
}"#,
    );
    let out = env.nix_build(&expr, &["d", "f", "l"], &["-j", "3"]);
    out.assert_ok();
    for a in ["d", "f", "l"] {
        assert_verify_path(&env.out_path(&expr, a));
    }
    let v = verify_store();
    v.assert_ok();
    for bad in [
        "modified",
        "hash mismatch",
        "disappeared",
        "error",
        "invalid",
    ] {
        assert!(
            !v.stderr.contains(bad),
            "nix-store --verify --check-contents reports {bad:?}:\n{}",
            v.describe()
        );
    }
}

/// A broken config must not break plain builds; escape derivations fail the
/// way Nix fails a derivation needing a feature nobody has, and the hook says
/// why exactly once.
fn check_bad_config(env: &TestEnv, config: &Path) {
    let expr = env.write_expr(
        "badcfg.nix",
        r#"{
  pl = plain { name = "badcfg-plain"; script = "echo plain > $out"; };
  esc = escape { name = "badcfg-escape"; script = ''echo never > "$out"''; };
}"#,
    );
    let out = env.nix_build_config(config, &expr, &["pl"], &[]);
    out.assert_ok();
    assert_eq!(read(env.out_path(&expr, "pl")), "plain\n");

    let drv = env.drv_path(&expr, "esc");
    let out = env.nix_build_config(config, &expr, &["esc"], &[]);
    out.assert_failed();
    out.assert_unbuildable_here(Some(&drv));
    out.assert_stderr_contains("escape-x");
    let cfg = config.to_string_lossy();
    let reasons = out.stderr.lines().filter(|l| l.contains(&*cfg)).count();
    assert_eq!(
        reasons,
        1,
        "expected nix-hatch's reason (naming {cfg}) exactly once:\n{}",
        out.describe()
    );
    assert!(!is_valid(&env.out_path(&expr, "esc")));
}

#[test]
fn missing_config_declines_with_reason_once() {
    let env = TestEnv::new("nocfg");
    check_bad_config(&env, &env.path("does-not-exist.toml"));
}

#[test]
fn invalid_config_declines_with_reason_once() {
    let env = TestEnv::new("badcfg");
    let p = env.path("broken.toml");
    fs::write(&p, "state-dir = [this is not toml\n[routes\n").unwrap();
    check_bad_config(&env, &p);
}

#[test]
fn command_succeeding_without_creating_outputs_fails() {
    let env = TestEnv::new("noout");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "noout.nix",
        r#"{
  none = escape { name = "no-output"; script = ''echo "forgot to write the output"''; };
  half = escape { name = "half-output"; attrs = { outputs = [ "out" "doc" ]; }; script = ''echo only-out > "$out"''; };
}"#,
    );
    for attr in ["none", "half"] {
        let out = env.nix_build(&expr, &[attr], &[]);
        out.assert_failed();
        let drv = env.drv_path(&expr, attr);
        out.assert_builder_failed(&drv);
        let o = env.out_path(&expr, attr);
        assert!(!is_valid(&o), "{o} valid");
        assert!(!exists_on_disk(&o), "{o} left on disk");
    }
    let doc = env.out_path(&expr, "half.doc");
    assert!(!is_valid(&doc));
}

#[test]
fn stale_invalid_leftover_at_output_path_is_replaced() {
    let env = TestEnv::new("stale");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "stale.nix",
        r#"{ s = escape { name = "stale"; script = ''mkdir "$out"; echo fresh > "$out/f"''; }; }"#,
    );
    let want = env.out_path(&expr, "s");
    // Debris from an interrupted build: an invalid path at the output path.
    fs::create_dir_all(format!("{want}/junk")).unwrap();
    fs::write(format!("{want}/junk/old"), "stale").unwrap();
    assert!(!is_valid(&want));
    let out = env.nix_build(&expr, &["s"], &[]);
    out.assert_ok();
    assert!(is_valid(&want));
    assert_eq!(read(format!("{want}/f")), "fresh\n");
    assert!(
        !exists_on_disk(&format!("{want}/junk")),
        "stale content kept"
    );
    assert_verify_path(&want);
}

#[test]
fn fifo_in_output_is_rejected_with_a_clear_error() {
    let env = TestEnv::new("fifo");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "fifo.nix",
        r#"{ f = escape { name = "fifo"; script = ''mkdir "$out"; mkfifo "$out/pipe"''; }; }"#,
    );
    let out = env.nix_build(&expr, &["f"], &[]);
    out.assert_failed();
    let lower = out.stderr.to_lowercase();
    assert!(
        lower.contains("fifo") || lower.contains("unsupported"),
        "error does not name the problem:\n{}",
        out.describe()
    );
    let want = env.out_path(&expr, "f");
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
}

#[test]
fn nix_timeout_option_applies_when_smaller() {
    let env = TestEnv::new("nixtimeout");
    env.write_host_config(&env.standard_config()); // timeout = 60
    let expr = env.write_expr(
        "nixtimeout.nix",
        r#"{ s = escape { name = "nix-timeout"; script = ''sleep 120; echo late > "$out"''; }; }"#,
    );
    let out = env.nix_build(&expr, &["s"], &["--option", "timeout", "2"]);
    out.assert_failed();
    assert!(
        out.elapsed < Duration::from_secs(30),
        "Nix's timeout = 2 ignored: took {:?}",
        out.elapsed
    );
    assert!(!is_valid(&env.out_path(&expr, "s")));
}

#[test]
fn max_silent_time_kills_a_silent_command() {
    let env = TestEnv::new("silent");
    let mut cfg = env.standard_config();
    cfg.extra = "max-silent-time = 2\n".into();
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "silent.nix",
        r#"{ s = escape { name = "silent"; script = ''echo "one line, then silence"; sleep 120; echo late > "$out"''; }; }"#,
    );
    let out = env.nix_build(&expr, &["s"], &[]);
    out.assert_failed();
    assert!(
        out.elapsed < Duration::from_secs(30),
        "max-silent-time = 2 ignored: took {:?}",
        out.elapsed
    );
    out.assert_stderr_contains("one line, then silence");
    assert!(!is_valid(&env.out_path(&expr, "s")));
}

#[test]
fn host_command_runs_as_the_configured_unprivileged_user() {
    let env = TestEnv::new("nobody");
    // The command must be reachable by nobody.
    fs::set_permissions(env.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = env.standard_config();
    cfg.user = "nobody".into();
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "nobody.nix",
        r#"{ n = escape { name = "as-nobody"; script = ''
    mkdir -p "$out/sub"
    id -u > "$out/uid"
    echo "$HOME" > "$out/home"
    echo x > "$out/sub/x"
    touch "$NIX_BUILD_TOP/scratch"
  ''; }; }"#,
    );
    let out = env.nix_build(&expr, &["n"], &[]);
    out.assert_ok();
    let p = env.out_path(&expr, "n");
    assert!(is_valid(&p));
    let nobody_uid = run(
        std::process::Command::new("id").args(["-u", "nobody"]),
        Duration::from_secs(10),
    )
    .stdout
    .trim()
    .to_owned();
    assert_eq!(read(format!("{p}/uid")).trim(), nobody_uid);
    // Registered paths belong to root like every store path.
    for f in [p.clone(), format!("{p}/sub"), format!("{p}/sub/x")] {
        let md = fs::symlink_metadata(&f).unwrap();
        assert_eq!(md.uid(), 0, "{f} owned by {}", md.uid());
    }
    assert_verify_path(&p);
}

/// Outputs are variables of the admin's command: one named PATH (or
/// LD_PRELOAD, BASH_ENV...) would replace what the executor sets.
#[test]
fn output_names_that_clobber_the_commands_variables_are_refused() {
    let env = TestEnv::new("outnames");
    env.write_host_config(&env.standard_config());
    let ran = env.path("command-ran");
    let expr = env.write_expr(
        "outnames.nix",
        &format!(
            r#"{{ d = escape {{ name = "outnames"; attrs = {{ outputs = [ "out" "LD_PRELOAD" ]; }}; script = ''
    : > {}; echo x > "$out"; echo y > "$LD_PRELOAD"
  ''; }}; }}"#,
            ran.display()
        ),
    );
    let out = env.nix_build(&expr, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("output \"LD_PRELOAD\" cannot be an environment variable");
    assert!(!ran.exists(), "the command ran");
}

/// A command may hard-link into its output a file of another user that it
/// can write; sealing the output would make that file root's and read-only.
/// Like Nix, the import refuses entries the build's account doesn't own.
#[test]
fn hard_link_to_another_users_file_is_refused() {
    let env = TestEnv::new("hardlink");
    fs::set_permissions(env.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let victim_dir = env.path("victim");
    fs::create_dir(&victim_dir).unwrap();
    let victim = victim_dir.join("shared.conf");
    fs::write(&victim, "shared\n").unwrap();
    // Owned by `daemon` (uid 1), writable by everyone.
    std::os::unix::fs::chown(&victim, Some(1), Some(1)).unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o666)).unwrap();
    let mut cfg = env.standard_config();
    cfg.user = "nobody".into();
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "hardlink.nix",
        &format!(
            r#"{{ h = escape {{ name = "hardlink"; script = ''
    mkdir -p "$out"
    ln {} "$(dirname "$NIX_BUILD_TOP")/store/$(basename $out)/stolen"
  ''; }}; }}"#,
            victim.display()
        ),
    );
    let out = env.nix_build(&expr, &["h"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("invalid ownership on file");
    assert!(!is_valid(&env.out_path(&expr, "h")));
    let md = fs::metadata(&victim).unwrap();
    assert_eq!(
        (md.uid(), md.permissions().mode() & 0o7777),
        (1, 0o666),
        "the other user's file was changed"
    );
}

#[test]
fn config_problem_is_reported_to_daemon_clients() {
    let env = TestEnv::new("daemoncfg");
    // No config written: NIX_HATCH_CONFIG names a missing file.
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let expr = env.write_expr(
        "dcfg.nix",
        r#"{
  pl = plain { name = "dcfg-plain"; script = "echo plain > $out"; };
  esc = escape { name = "dcfg-escape"; script = ''echo never > "$out"''; };
}"#,
    );
    env.nix_build_via(&daemon, &expr, &["pl"], &[]).assert_ok();
    let out = env.nix_build_via(&daemon, &expr, &["esc"], &[]);
    out.assert_failed();
    out.assert_unbuildable_here(None);
    let cfg = env.config_path().to_string_lossy().into_owned();
    let n = out.stderr.lines().filter(|l| l.contains(&cfg)).count();
    assert_eq!(
        n,
        1,
        "the client should see nix-hatch's reason once:\n{}\ndaemon log:\n{}",
        out.describe(),
        daemon.log_text()
    );
}

#[test]
fn failure_log_tail_reaches_daemon_clients() {
    let env = TestEnv::new("daemonfail");
    env.write_host_config(&env.standard_config());
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let expr = env.write_expr(
        "dfail.nix",
        r#"{ f = escape { name = "dfail"; script = ''echo "last words ${nonce}"; exit 3''; }; }"#,
    );
    let out = env.nix_build_via(&daemon, &expr, &["f"], &[]);
    out.assert_failed();
    let drv = env.drv_path(&expr, "f");
    out.assert_builder_failed(&drv);
    out.assert_stderr_contains(&format!("last words {}", env.nonce));
}

#[test]
fn escape_output_can_be_the_input_of_another_escape() {
    let env = TestEnv::new("chain");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "chain.nix",
        r#"rec {
  a = escape { name = "chain-a"; script = ''mkdir "$out"; echo "$out" > "$out/self"''; };
  b = escape { name = "chain-b"; script = ''mkdir "$out"; cat "${a}/self" > "$out/from-a"''; };
}"#,
    );
    let out = env.nix_build(&expr, &["b"], &[]);
    out.assert_ok();
    let a = env.out_path(&expr, "a");
    let b = env.out_path(&expr, "b");
    assert_eq!(read(format!("{b}/from-a")), format!("{a}\n"));
    assert_eq!(references(&b), set(&[a.as_str()]));
    assert_eq!(references(&a), set(&[a.as_str()]));
}

#[test]
fn interrupting_nix_build_stops_the_command() {
    let env = TestEnv::new("interrupt");
    env.write_host_config(&env.standard_config());
    let (mut child, want) = env.spawn_sleeping_build();
    // What Ctrl-C does.
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
        panic!("nix-build did not exit within 30s of SIGINT");
    }
    let marker = env.root().to_string_lossy().into_owned();
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&marker)
            .is_empty()),
        "processes left after interrupting nix-build: {:?}",
        processes_mentioning(&marker)
    );
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
}

#[test]
fn allow_any_builder_structured_attrs_and_pass_as_file_match_nix() {
    let env = TestEnv::new("anyattrs");
    let mut cfg = env.standard_config();
    cfg.command = None;
    cfg.allow_any_builder = true;
    env.write_host_config(&cfg);
    // `benchmark` is one of Nix's default local features: built by Nix.
    let expr = env.write_expr(
        "anyattrs.nix",
        r#"let
  script = ''
    # structured attrs: no $out in the environment (Nix 2.8 has no NIX_ATTRS_*)
    if [ -e .attrs.json ]; then out=$(grep -o '"out":"[^"]*"' .attrs.json | head -n 1 | cut -d '"' -f 4); fi
    mkdir "$out"
    env | sort | grep -v -e '^out=' -e '^NIX_BUILD_TOP=' -e '^TMP' -e '^TEMP' -e '^PWD=' \
      -e '^NIX_ATTRS_' -e '^requiredSystemFeatures=' -e '^bigPath=' > "$out/env"
    if [ -e .attrs.json ]; then sed -e "s|$out|OUT|g" .attrs.json > "$out/attrs.json"; fi
    if [ -e .attrs.sh ]; then sed -e "s|$out|OUT|g" -e "s|$NIX_BUILD_TOP|TOP|g" .attrs.sh > "$out/attrs.sh"; fi
    if [ -n "''${bigPath:-}" ]; then cat "$bigPath" > "$out/big"; fi
  '';
  both = feature: extra: plain { name = "anyattrs"; inherit script;
    attrs = { requiredSystemFeatures = [ feature ]; } // extra; };
  sa = { __structuredAttrs = true; list = [ 1 "two" { three = 3; } ]; flag = true; };
  paf = { passAsFile = [ "big" ]; big = "a value passed as a file"; };
in {
  saHatch = both "escape-x" sa;
  saNix = both "benchmark" sa;
  pafHatch = both "escape-x" paf;
  pafNix = both "benchmark" paf;
}"#,
    );
    let out = env.nix_build(
        &expr,
        &["saHatch", "saNix", "pafHatch", "pafNix"],
        &["-j", "4"],
    );
    out.assert_ok();
    let sa = env.out_path(&expr, "saHatch");
    let paf = env.out_path(&expr, "pafHatch");
    for f in [
        format!("{sa}/attrs.json"),
        format!("{sa}/attrs.sh"),
        format!("{paf}/big"),
    ] {
        assert!(exists_on_disk(&f), "{f} missing: the file was not provided");
    }
    assert_eq!(read(format!("{paf}/big")), "a value passed as a file");
    for (h, n) in [("saHatch", "saNix"), ("pafHatch", "pafNix")] {
        let hp = env.out_path(&expr, h);
        let np = env.out_path(&expr, n);
        for f in ["env", "attrs.json", "attrs.sh", "big"] {
            let a = fs::read_to_string(format!("{hp}/{f}")).ok();
            let b = fs::read_to_string(format!("{np}/{f}")).ok();
            let a = a.map(|s| s.replace("escape-x", "FEATURE"));
            let b = b.map(|s| s.replace("benchmark", "FEATURE"));
            assert_eq!(a, b, "{h} vs {n}: {f} differs");
        }
    }
}

/// A host command is a host program: if it adds something to the store (here
/// `nix-store --add`, as root against the local store), that path must really
/// be in the store afterwards. Today the store write lands in the build's
/// private overlay and is thrown away while the database keeps the path
/// valid: a valid path that does not exist (`nix-store --verify` reports
/// "disappeared").
#[test]
fn host_command_adding_to_the_store_leaves_a_consistent_store() {
    let env = TestEnv::new("storeadd");
    env.write_host_config(&env.standard_config());
    fs::write(env.path("to-add"), format!("added {}\n", env.nonce)).unwrap();
    let expr = env.write_expr(
        "storeadd.nix",
        r#"{ a = escape { name = "store-add"; script = ''
    p=$(nix-store --add "@DIR@/to-add")
    echo "$p" > "$out"
  ''; }; }"#,
    );
    let out = env.nix_build(&expr, &["a"], &[]);
    out.assert_ok();
    let added = read(env.out_path(&expr, "a")).trim().to_owned();
    let valid = is_valid(&added);
    let present = exists_on_disk(&added);
    if valid && !present {
        // Repair the database (it drops the vanished path) before failing.
        let _ = run(nix_cmd("nix-store").arg("--verify"), NIX_LIMIT);
    }
    assert!(
        !valid || present,
        "{added} is registered valid but does not exist"
    );
    assert!(valid, "{added} not valid");
}

#[test]
fn special_mode_bits_are_stripped_from_outputs() {
    let env = TestEnv::new("modes");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "modes.nix",
        r#"{ m = escape { name = "modes"; script = ''
    mkdir -p "$out/bin" "$out/shared"
    cp /bin/true "$out/bin/suid"
    chmod 4755 "$out/bin/suid"
    cp /bin/true "$out/bin/sgid"
    chmod 2755 "$out/bin/sgid"
    chmod 1777 "$out/shared"
    echo w > "$out/world-writable"
    chmod 666 "$out/world-writable"
    chown nobody "$out/world-writable"
  ''; }; }"#,
    );
    env.nix_build(&expr, &["m"], &[]).assert_ok();
    let p = env.out_path(&expr, "m");
    for (f, want) in [
        ("bin/suid", 0o555),
        ("bin/sgid", 0o555),
        ("shared", 0o555),
        ("world-writable", 0o444),
    ] {
        let md = fs::symlink_metadata(format!("{p}/{f}")).unwrap();
        assert_eq!(
            md.permissions().mode() & 0o7777,
            want,
            "{f}: mode {:o}",
            md.permissions().mode() & 0o7777
        );
        assert_eq!(md.uid(), 0, "{f} owned by uid {}", md.uid());
    }
    assert_verify_path(&p);
}

#[test]
fn fixed_output_sha1_and_sha512() {
    let env = TestEnv::new("fodalgo");
    env.write_host_config(&env.standard_config());
    let content = format!("algo {}\n", env.nonce);
    fs::write(env.path("flat"), &content).unwrap();
    fs::create_dir_all(env.path("rec")).unwrap();
    fs::write(env.path("rec/data"), &content).unwrap();
    let hash = |algo: &str, p: &Path, flat: bool| {
        let mut c = nix_cmd("nix-hash");
        c.args(["--type", algo]);
        if flat {
            c.arg("--flat");
        }
        let o = run(c.arg(p), Duration::from_secs(30));
        o.assert_ok();
        o.stdout.trim().to_owned()
    };
    let body = r#"{
  s1 = escape { name = "fod-sha1-${nonce}";
    attrs = { outputHashMode = "flat"; outputHashAlgo = "sha1"; outputHash = "@SHA1@"; };
    script = ''printf 'algo %s\n' "${nonce}" > "$out"''; };
  s512 = escape { name = "fod-sha512-${nonce}";
    attrs = { outputHashMode = "recursive"; outputHashAlgo = "sha512"; outputHash = "@SHA512@"; };
    script = ''mkdir "$out"; printf 'algo %s\n' "${nonce}" > "$out/data"''; };
}"#
    .replace("@SHA1@", &hash("sha1", &env.path("flat"), true))
    .replace("@SHA512@", &hash("sha512", &env.path("rec"), false));
    let expr = env.write_expr("fodalgo.nix", &body);
    env.nix_build(&expr, &["s1", "s512"], &[]).assert_ok();
    let s1 = env.out_path(&expr, "s1");
    let s512 = env.out_path(&expr, "s512");
    assert_eq!(read(&s1), content);
    assert_eq!(read(format!("{s512}/data")), content);
    assert_verify_path(&s1);
    assert_verify_path(&s512);
}

#[test]
fn escape_builds_even_with_max_jobs_zero() {
    // max-jobs = 0: no local builds at all (everything remote); escapes are
    // still nix-hatch's.
    let env = TestEnv::new("jzero");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "jzero.nix",
        r#"{ e = escape { name = "j-zero"; script = ''echo zero > "$out"''; }; }"#,
    );
    env.nix_build(&expr, &["e"], &["-j", "0"]).assert_ok();
    assert_eq!(read(env.out_path(&expr, "e")), "zero\n");
}

/// `fallback = [argv]`: derivations nix-hatch does not route go to that hook.
/// Here the other hook is a second nix-hatch (`nix-hatch hook --config`, the
/// list form newer Nix uses) routing `escape-y`.
#[test]
fn fallback_hook_gets_derivations_nix_hatch_does_not_route() {
    let env = TestEnv::new("fallback");
    let run_sh = env.run_script();
    let other = HostConfig {
        feature: "escape-y".into(),
        executor: "hosty".into(),
        arg_paths: Some("any"),
        ..HostConfig::new(&[run_sh.to_str().unwrap()])
    };
    let other_path = env.path("other.toml");
    fs::create_dir_all(env.path("state-y")).unwrap();
    fs::write(&other_path, other.render(&env.path("state-y"))).unwrap();
    let mut text = env.standard_config().render(&env.state_dir());
    text = text.replace(
        "fallback = \"decline\"",
        &format!(
            "fallback = [{}, \"hook\", \"--config\", {}]",
            toml_str(CLI),
            toml_str(&other_path.to_string_lossy())
        ),
    );
    env.write_config(&text);
    let expr = env.write_expr(
        "fallback.nix",
        r#"{
  x = escape { name = "fb-x"; script = ''echo "$NIX_HATCH_EXECUTOR" > "$out"''; };
  y = escape { name = "fb-y"; feature = "escape-y"; script = ''echo "$NIX_HATCH_EXECUTOR" > "$out"''; };
  p = plain { name = "fb-plain"; script = "echo plain > $out"; };
}"#,
    );
    env.nix_build(&expr, &["x", "y", "p"], &["-j", "3"])
        .assert_ok();
    assert_eq!(read(env.out_path(&expr, "x")), "hostx\n");
    assert_eq!(read(env.out_path(&expr, "y")), "hosty\n");
    assert_eq!(read(env.out_path(&expr, "p")), "plain\n");
}

/// A `fallback` that names nix-hatch with the same config would start hook
/// after hook; a delegated nix-hatch never delegates again, so plain
/// derivations are declined there and Nix builds them locally.
#[test]
fn fallback_to_itself_does_not_loop() {
    let env = TestEnv::new("fallback-loop");
    let mut text = env.standard_config().render(&env.state_dir());
    text = text.replace(
        "fallback = \"decline\"",
        &format!(
            "fallback = [{}, \"hook\", \"--config\", {}]",
            toml_str(CLI),
            toml_str(&env.config_path().to_string_lossy())
        ),
    );
    env.write_config(&text);
    let expr = env.write_expr(
        "loop.nix",
        r#"{
  x = escape { name = "loop-x"; script = ''echo x > "$out"''; };
  p = plain { name = "loop-plain"; script = "echo plain > $out"; };
}"#,
    );
    env.nix_build(&expr, &["x", "p"], &["-j", "2"]).assert_ok();
    assert_eq!(read(env.out_path(&expr, "p")), "plain\n");
    let check = run(
        std::process::Command::new(CLI).args([
            "check",
            "--config",
            &env.config_path().to_string_lossy(),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        check.stdout.contains("warning: fallback runs nix-hatch"),
        "{}",
        check.describe()
    );
}

/// `fallback = "auto"` with `builders` set: derivations nix-hatch does not
/// route go to Nix's own build-remote (`libexec/nix/build-remote` on 2.8 and
/// Debian's 2.26, else `nix __build-remote`), which tries the builder (an
/// ssh connection refused at once); escape derivations in the same run are
/// still nix-hatch's.
#[test]
fn fallback_auto_hands_other_derivations_to_nix_build_remote() {
    let env = TestEnv::new("fbauto");
    let text = env
        .standard_config()
        .render(&env.state_dir())
        .replace("fallback = \"decline\"", "fallback = \"auto\"");
    env.write_config(&text);
    let expr = env.write_expr(
        "fbauto.nix",
        r#"{
  x = escape { name = "fbauto-x"; script = ''echo "$NIX_HATCH_EXECUTOR" > "$out"''; };
  r = plain { name = "fbauto-remote"; script = "echo never > $out";
    attrs = { requiredSystemFeatures = [ "remote-only" ]; }; };
}"#,
    );
    let builders = format!(
        "ssh://root@127.0.0.1 {}-linux - 1 1 remote-only",
        std::env::consts::ARCH
    );
    // (Two runs: Nix aborts the whole run, even with --keep-going, when no
    // machine can build a derivation.)
    let build = |attr: &str| {
        let mut c = nix_cmd("nix-build");
        c.arg("--no-out-link")
            .args(["--option", "substituters", ""])
            .args(["--option", "builders", &builders]);
        env.use_hook(&mut c, &env.config_path());
        c.arg(&expr).args(["-A", attr]).env("NIX_SSHOPTS", "-p 1");
        run(&mut c, NIX_LIMIT)
    };
    build("x").assert_ok();
    assert_eq!(read(env.out_path(&expr, "x")), "hostx\n");
    let out = build("r");
    out.assert_failed();
    out.assert_stderr_contains("cannot build on 'ssh://root@127.0.0.1'");
    out.assert_unbuildable_here(Some(&env.drv_path(&expr, "r")));
    assert!(!is_valid(&env.out_path(&expr, "r")));
}

/// The command is pid 1 of its own pid namespace, and /proc agrees: it sees
/// its own processes, not the host's.
#[test]
fn host_command_sees_its_own_proc() {
    let env = TestEnv::new("proc");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "proc.nix",
        r#"{ p = escape { name = "own-proc"; script = ''
    { echo "pid=$$"; tr '\0\n' '  ' < /proc/1/cmdline; echo; ls /proc | grep -c '^[0-9]'; } > "$out"
  ''; }; }"#,
    );
    env.nix_build(&expr, &["p"], &[]).assert_ok();
    let text = read(env.out_path(&expr, "p"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "pid=1", "{text}");
    assert!(
        lines[1].contains("run.sh"),
        "/proc/1 is not the command: {text}"
    );
    let n: u32 = lines[2].trim().parse().unwrap();
    assert!(n < 10, "the command sees {n} processes: {text}");
}

/// Long stages report themselves as Nix activities, which reach Nix and
/// come out of its logger (`--log-format internal-json`): waiting for a
/// slot of a busy executor, and reading a large output into the store,
/// with its bytes.
#[test]
fn waiting_for_a_slot_and_a_large_import_show_as_nix_activities() {
    use std::io::BufRead;
    let env = TestEnv::new("activities");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 1;
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "activities.nix",
        r#"{
  # Both wait until the test has seen one of them wait for the slot.
  big = escape { name = "activities-big"; script = ''
    i=0; while [ ! -e "@DIR@/go" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
    head -c 20971520 /dev/zero > "$out"
  ''; };
  other = escape { name = "activities-other"; script = ''
    i=0; while [ ! -e "@DIR@/go" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
    echo other > "$out"
  ''; };
}"#,
    );
    let mut cmd = env.nix_build_command(
        &expr,
        &["big", "other"],
        &["-j", "2", "--log-format", "internal-json"],
    );
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let mut raw = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        raw.push_str(&line);
        raw.push('\n');
        let Some(v) = line
            .strip_prefix("@nix ")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        else {
            continue;
        };
        let waiting = v["action"] == "start"
            && v["type"] == 111
            && v["text"]
                .as_str()
                .is_some_and(|t| t.contains("waiting for a free slot of executor \"hostx\""));
        if waiting {
            fs::write(env.path("go"), "").unwrap();
        }
        lines.push(v);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{raw}");
    let start = |ty: u64, text: &str| {
        lines
            .iter()
            .find(|v| {
                v["action"] == "start"
                    && v["type"] == ty
                    && v["text"].as_str().is_some_and(|t| t.contains(text))
            })
            .and_then(|v| v["id"].as_u64())
            .unwrap_or_else(|| panic!("no activity {ty} {text:?} in:\n{raw}"))
    };
    let stopped = |id: u64| {
        lines
            .iter()
            .any(|v| v["action"] == "stop" && v["id"].as_u64() == Some(id))
    };
    let waited = start(
        111,
        "waiting for a free slot of executor \"hostx\" (max-jobs 1)",
    );
    assert!(stopped(waited), "the wait never ended:\n{raw}");
    let big = env.drv_path(&expr, "big");
    let import = start(
        100,
        &format!("reading the outputs of '{big}' into the store"),
    );
    assert!(stopped(import), "the import activity never ended:\n{raw}");
    let last_progress = lines
        .iter()
        .rfind(|v| v["action"] == "result" && v["type"] == 105 && v["id"].as_u64() == Some(import))
        .unwrap_or_else(|| panic!("no progress of the import:\n{raw}"));
    assert_eq!(
        last_progress["fields"],
        serde_json::json!([20971520, 20971520, 0, 0]),
        "{raw}"
    );
}

/// nix-hatch's lines follow Nix's verbosity: its progress notes at the
/// default, its detail from `-v`, nothing but errors with `--quiet`
/// (the builder's own output is always kept).
#[test]
fn nix_hatch_lines_follow_nixs_verbosity() {
    let env = TestEnv::new("verbosity");
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "verbosity.nix",
        r#"{
  quiet = escape { name = "verbosity-quiet"; script = ''echo "said ${nonce}"; echo ok > "$out"''; };
  normal = escape { name = "verbosity-normal"; script = ''echo "said ${nonce}"; echo ok > "$out"''; };
  verbose = escape { name = "verbosity-verbose"; script = ''echo "said ${nonce}"; echo ok > "$out"''; };
}"#,
    );
    let said = format!("said {}", env.nonce);
    for (attr, flag, building, detail) in [
        ("quiet", "--quiet", false, false),
        ("normal", "", true, false),
        ("verbose", "-v", true, true),
    ] {
        let extra: Vec<&str> = if flag.is_empty() { vec![] } else { vec![flag] };
        env.nix_build(&expr, &[attr], &extra).assert_ok();
        let log = nix_log(&env.out_path(&expr, attr)).stdout;
        assert!(log.contains(&said), "{attr}: {log}");
        assert_eq!(
            log.contains("nix-hatch: executor \"hostx\": building "),
            building,
            "{attr}: {log}"
        );
        assert_eq!(
            log.contains("nix-hatch: executor \"hostx\": staging in "),
            detail,
            "{attr}: {log}"
        );
    }
}
