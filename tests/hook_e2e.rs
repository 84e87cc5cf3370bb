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
    // busybox is in the input closure but not embedded: no references.
    assert_eq!(references(&want), BTreeSet::new());
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
    out.assert_stderr_contains(&format!("builder for '{drv}' failed"));
    out.assert_stderr_contains(&format!("the very last words {}", env.nonce));
    out.assert_stderr_contains("noise line 30");
    assert!(!is_valid(&want), "{want} valid after a failed build");
    assert!(
        !exists_on_disk(&want),
        "{want} left on disk after a failed build"
    );
}

#[test]
fn timeout_kills_command_and_its_background_children() {
    let env = TestEnv::new("timeout");
    let mut cfg = env.standard_config();
    cfg.timeout = 3;
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "timeout.nix",
        r#"{
  slow = escape { name = "slow"; script = ''
    echo $$ > "@DIR@/command.pid"
    sh -c 'echo $$ > "@DIR@/child.pid.tmp"; mv "@DIR@/child.pid.tmp" "@DIR@/child.pid"; exec sleep 600' &
    echo "started a background child"
    sleep 600
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
    for f in ["command.pid", "child.pid"] {
        let text = fs::read_to_string(env.path(f))
            .unwrap_or_else(|_| panic!("{f} missing: command never ran?\n{}", out.describe()));
        let pid: u32 = text.trim().parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || !pid_alive(pid)),
            "process {pid} ({f}) still alive after the timed-out build"
        );
    }
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
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
    readlink /proc/$$/exe > "$out/exe"
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
    out.assert_stderr_contains(&format!("is required to build '{drv}'"));
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
