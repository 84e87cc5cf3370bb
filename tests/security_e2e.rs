//! The attacks of the security review (issue 14), each replayed as a
//! regression test: an unprivileged account (`nhtest-mallory`) starts the
//! builds through a nix-daemon, as on a shared build machine, and the test
//! checks that what the attack needs is refused. Each of these failed on
//! the code before the fixes.

mod common;

use common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The account that starts builds and tries to abuse them.
const MALLORY: &str = "nhtest-mallory";
/// The account jailed builders run as.
const JAIL_USER: &str = "nhtest-jail";

fn accounts() {
    test_account(MALLORY, &[]);
    test_account(JAIL_USER, &[]);
}

/// A `jail` executor run as [`JAIL_USER`] that [`MALLORY`] may use, plus
/// `extra` lines in its table.
fn jail_config(env: &TestEnv, extra: &str) {
    write_jail_config(
        env,
        JAIL_USER,
        &format!("allowed-users = [\"{MALLORY}\"]\n{extra}"),
    );
}

fn expr(env: &TestEnv, name: &str, body: &str) -> PathBuf {
    jail_expr(env, name, body)
}

/// A directory every account may write into (for probes and signals).
fn open_dir(env: &TestEnv, name: &str) -> PathBuf {
    let d = env.path(name);
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

/// Runs `sh -c script` as `user`; returns (success, output).
fn sh_as(user: &str, script: &str, args: &[&Path]) -> (bool, String) {
    let out = run(
        as_user(user).args(["sh", "-c", script, "sh"]).args(args),
        Duration::from_secs(60),
    );
    (out.success(), format!("{}{}", out.stdout, out.stderr))
}

/// Starts building `attr` of `e` as [`MALLORY`] through `daemon`, and
/// waits (bounded) until its builder has made `$out/ready`: returns the
/// running nix-build, the output's base name and the build's staging dir.
fn start_until_ready(
    env: &TestEnv,
    daemon: &Daemon,
    e: &Path,
    attr: &str,
) -> (std::process::Child, String, PathBuf) {
    let base = env
        .out_path(e, attr)
        .trim_start_matches("/nix/store/")
        .to_owned();
    let mut child = env
        .nix_build_via_as_user_command(daemon, MALLORY, e, &[attr], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let staging = env.state_dir().join("staging");
    let mut found = None;
    let ok = wait_until(Duration::from_secs(120), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the build ended ({st}) before it was ready");
        }
        found = fs::read_dir(&staging).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.join("private/store").join(&base).join("ready").exists())
        });
        found.is_some()
    });
    assert!(ok, "the build never got ready");
    (child, base, found.unwrap_or_default())
}

fn finish(mut child: std::process::Child) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (st.success(), strip_ansi(&err));
        }
        assert!(start.elapsed() < NIX_LIMIT, "nix-build hangs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finding 1 (critical): every attribute of the derivation became bwrap's
/// environment, so the loader ran a derivation's `LD_PRELOAD` library in
/// bwrap, on the host, before any sandboxing.
#[test]
fn a_derivations_ld_preload_never_runs_outside_the_jail() {
    let env = TestEnv::new("sec-preload");
    accounts();
    jail_config(&env, "");
    let probe = open_dir(&env, "probe");
    let control = open_dir(&env, "control");
    // The library, as a store path any derivation can refer to.
    let libdir = env.path("hatch-preload-lib");
    fs::create_dir_all(&libdir).unwrap();
    fs::copy(preload_library(), libdir.join("preload.so")).unwrap();
    let added = run(
        nix_cmd("nix-store").arg("--add").arg(&libdir),
        Duration::from_secs(60),
    );
    added.assert_ok();
    let lib = added.stdout.trim().to_owned();
    // Control: wherever a loader honours LD_PRELOAD, the library runs.
    let ran = Command::new("/bin/true")
        .env("LD_PRELOAD", format!("{lib}/preload.so"))
        .env("HATCH_PROBE_DIR", &control)
        .status()
        .unwrap();
    assert!(ran.success());
    assert_eq!(
        fs::read_dir(&control).unwrap().count(),
        1,
        "the probe library does not work"
    );

    let e = expr(
        &env,
        "preload.nix",
        &format!(
            r#"{{ p = jailed {{ name = "sec-preload"; attrs = {{
    LD_PRELOAD = "${{builtins.storePath "{lib}"}}/preload.so";
    HATCH_PROBE_DIR = "{}";
  }}; script = ''echo "$LD_PRELOAD" > $out''; }}; }}"#,
            probe.display()
        ),
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &["p"], &[]);
    out.assert_ok();
    // The builder itself still sees its variable, inside the jail.
    let path = out.store_paths()[0].clone();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("{lib}/preload.so\n")
    );
    let ran: Vec<String> = fs::read_dir(&probe)
        .unwrap()
        .flatten()
        .map(|f| fs::read_to_string(f.path()).unwrap_or_default())
        .collect();
    assert!(
        ran.is_empty(),
        "the derivation's LD_PRELOAD ran outside the jail: {ran:?}"
    );
}

/// Finding 2 (high): a jailed build made a setuid copy of a program in its
/// output, and another account ran it from the (world-reachable) staging
/// dir while the build was still running, becoming the jail's account.
#[test]
fn a_running_builds_files_are_out_of_other_accounts_reach() {
    let env = TestEnv::new("sec-suid");
    accounts();
    let signal = open_dir(&env, "signal");
    jail_config(
        &env,
        &format!(
            "ro-binds = [{}]\n",
            toml_str(&format!("{}:/signal", signal.display()))
        ),
    );
    let e = expr(
        &env,
        "suid.nix",
        r#"{ s = jailed { name = "sec-suid"; script = ''
    mkdir $out
    cp ${bb}/bin/busybox $out/sh
    chmod 4755 $out/sh 2> $out/chmod-error; echo $? > $out/chmod-status
    touch $out/ready
    while [ ! -e /signal/done ]; do sleep 0.1; done
  ''; }; }"#,
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let (child, base, staging) = start_until_ready(&env, &daemon, &e, "s");
    let sh = staging.join("private/store").join(&base).join("sh");
    let suid = fs::metadata(&sh).unwrap().mode() & 0o6000;
    // Another account can neither list the staging dirs nor reach a file.
    let (listed, listing) = sh_as(MALLORY, "ls \"$1\"", &[&env.state_dir().join("staging")]);
    let (ran, who) = sh_as(MALLORY, "\"$1\" id -u", &[&sh]);
    let (read, _) = sh_as(
        MALLORY,
        "cat \"$1\" > /dev/null",
        &[&staging.join("run.json")],
    );
    fs::write(signal.join("done"), "").unwrap();
    let (ok, log) = finish(child);
    assert!(ok, "{log}");
    assert_eq!(suid, 0, "the jail made a setuid file");
    assert!(
        !listed,
        "another account listed the staging dirs: {listing}"
    );
    assert!(!ran, "another account ran the build's program: uid {who}");
    assert!(!read, "another account read the build's run spec");
    let out = format!("/nix/store/{base}");
    assert_ne!(
        fs::read_to_string(format!("{out}/chmod-status"))
            .unwrap()
            .trim(),
        "0"
    );
}

/// Finding 2, after the build: `--keep-failed` (any client may ask for it)
/// left the unsealed setuid file usable in `state-dir/kept/`, for ever.
#[test]
fn a_kept_build_dir_holds_nothing_another_account_can_use() {
    let env = TestEnv::new("sec-kept");
    accounts();
    // A host command (no seccomp there) run as an unprivileged account.
    let mut cfg = env.standard_config();
    cfg.user = JAIL_USER.into();
    cfg.extra = format!("allowed-users = [\"{MALLORY}\"]\n");
    env.write_host_config(&cfg);
    let e = env.write_expr(
        "kept.nix",
        r#"{ k = escape { name = "sec-kept"; script = ''
    mkdir "$out"
    cp /bin/busybox "$out/sh"
    chmod 6755 "$out/sh"
    mkdir "$NIX_BUILD_TOP/d"; cp /bin/busybox "$NIX_BUILD_TOP/d/sh"; chmod 4755 "$NIX_BUILD_TOP/d/sh"
    exit 1
  ''; }; }"#,
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &["k"], &["--keep-failed"]);
    out.assert_failed();
    out.assert_stderr_contains("keeping build directory");
    let kept_root = env.state_dir().join("kept");
    let kept = fs::read_dir(&kept_root)
        .unwrap()
        .next()
        .expect("a kept dir")
        .unwrap()
        .path();
    let base = env
        .out_path(&e, "k")
        .trim_start_matches("/nix/store/")
        .to_owned();
    let sh = kept.join("private/store").join(&base).join("sh");
    assert!(sh.exists(), "the kept dir lacks the build's files");
    // Root-only, and nothing in it hands out the build account's rights.
    for d in [&kept_root, &kept] {
        let m = fs::metadata(d).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700), "{}", d.display());
    }
    let suid = Command::new("find")
        .arg(&kept)
        .args(["-perm", "/6000"])
        .output()
        .unwrap();
    assert!(suid.status.success());
    assert_eq!(
        String::from_utf8_lossy(&suid.stdout),
        "",
        "setuid/setgid files kept"
    );
    let (ran, who) = sh_as(MALLORY, "\"$1\" id -u", &[&sh]);
    assert!(!ran, "another account ran the kept program: uid {who}");
}

/// Finding 3 (high): the demo's signer copied its argument into `$out` as
/// root, so anyone could have the signing key or /etc/shadow copied into
/// the world-readable store. Now the command never sees such an argument
/// (`arg-paths = "inputs"`, the default), and copies nothing anyway.
#[test]
fn the_demo_signer_signs_only_the_derivations_inputs() {
    let env = TestEnv::new("sec-signer");
    accounts();
    let secret = env.path("secret");
    fs::create_dir(&secret).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    let key = secret.join("signing.key");
    run(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key),
        Duration::from_secs(60),
    )
    .assert_ok();
    let signer = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sign");
    let mut cfg = HostConfig::new(&[signer.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    cfg.feature = "escape-sign".into();
    cfg.extra = format!("allowed-users = [\"{MALLORY}\"]\n");
    env.write_host_config(&cfg);
    let e = env.write_expr(
        "sign.nix",
        &format!(
            r#"rec {{
  payload = plain {{ name = "payload"; script = "echo release > $out"; }};
  shadow-link = plain {{ name = "shadow-link"; script = "${{bb}}/bin/busybox ln -s /etc/shadow $out"; }};
  sign = arg: builtins.derivation {{
    name = "signed"; inherit system nonce; builder = "/bin/sh"; args = [ arg ];
    requiredSystemFeatures = [ "escape-sign" ];
  }};
  good = sign "${{payload}}";
  shadow = sign "/etc/shadow";
  key = sign "{}";
  via-link = sign "${{shadow-link}}";
  climbing = sign "${{payload}}/../../../etc/shadow";
  # Paths the command may read out of other spellings (review of the fix).
  attached = sign "-f/etc/shadow";
  assigned = sign "if=/etc/shadow";
  url = sign "file:///etc/shadow";
}}"#,
            key.display()
        ),
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    for attr in [
        "shadow", "key", "via-link", "climbing", "attached", "assigned", "url",
    ] {
        let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &[attr], &[]);
        out.assert_failed();
        assert!(
            out.stderr.contains("outside the derivation's inputs")
                || out.stderr.contains("contains \"..\"")
                || out.stderr.contains("is not a path on its own"),
            "{attr}: {}",
            out.describe()
        );
        out.assert_stderr_contains("the command was not run");
        // Nothing ran, so no line about what it used.
        assert!(!out.stderr.contains("\": used "), "{attr}: {}", out.stderr);
        assert!(
            !exists_on_disk(&env.out_path(&e, attr)),
            "{attr} has an output"
        );
    }
    let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &["good"], &[]);
    out.assert_ok();
    let signed = out.store_paths()[0].clone();
    let payload = env.out_path(&e, "payload");
    let verified = run(
        Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(format!("{signed}/public-key.pem"))
            .args(["-rawin", "-in", &payload, "-sigfile"])
            .arg(format!("{signed}/signature")),
        Duration::from_secs(60),
    );
    verified.assert_ok();
    for f in fs::read_dir(&signed).unwrap().flatten() {
        let text = String::from_utf8_lossy(&fs::read(f.path()).unwrap()).into_owned();
        assert!(
            !text.contains("release"),
            "the payload was copied into {}",
            f.path().display()
        );
        assert!(
            !text.contains("PRIVATE KEY"),
            "the key reached {}",
            f.path().display()
        );
    }
}

/// Finding 5 (medium): with `timeout = 5`, a builder that left a 24 GiB
/// sparse file held its slot for a minute while it was hashed, and the
/// 24 GiB path was registered. `timeout` now covers the import, and
/// `max-output-size` refuses such outputs before reading them.
#[test]
fn a_huge_sparse_output_is_stopped_by_timeout_and_max_output_size() {
    let env = TestEnv::new("sec-sparse");
    accounts();
    let e = expr(
        &env,
        "sparse.nix",
        r#"{ big = jailed { name = "sec-sparse"; script = ''
    mkdir $out
    truncate -s 24G $out/big
  ''; }; }"#,
    );
    let path = env.out_path(&e, "big");
    let daemon_env = |extra: &str| {
        jail_config(&env, extra);
    };
    daemon_env("");
    // The jail's timeout is 120 s; Nix's own `timeout` (5 s) is smaller.
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let t = Instant::now();
    let out = env.nix_build_via_as_user(
        &daemon,
        MALLORY,
        &e,
        &["big"],
        &["--option", "timeout", "5"],
    );
    let took = t.elapsed();
    out.assert_failed();
    out.assert_stderr_contains("timed out");
    assert!(
        took < Duration::from_secs(40),
        "the import went on after the timeout: {took:?}"
    );
    assert!(!is_valid(&path));
    drop(daemon);
    daemon_env("max-output-size = \"1G\"\n");
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &["big"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("larger than max-output-size");
    assert!(!is_valid(&path));
}

/// Suspected (now refuted): a process of the build's account could change
/// an output after it was hashed — here one that opened the output file
/// for writing while the build ran and writes after the build.
#[test]
fn an_output_cannot_be_changed_after_it_was_hashed() {
    let env = TestEnv::new("sec-swap");
    accounts();
    let signal = open_dir(&env, "signal");
    jail_config(
        &env,
        &format!(
            "ro-binds = [{}]\n",
            toml_str(&format!("{}:/signal", signal.display()))
        ),
    );
    let e = expr(
        &env,
        "swap.nix",
        r#"{ s = jailed { name = "sec-swap"; script = ''
    mkdir $out
    echo original > $out/file
    touch $out/ready
    while [ ! -e /signal/holding ]; do sleep 0.1; done
  ''; }; }"#,
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let (child, base, staging) = start_until_ready(&env, &daemon, &e, "s");
    let file = staging.join("private/store").join(&base).join("file");
    // The accomplice: the jail's account, outside the jail, holding the
    // output file open for writing until told to write.
    let go = signal.join("go");
    let mut accomplice = as_user(JAIL_USER)
        .args([
            "sh",
            "-c",
            "exec 3>>\"$1\" && touch \"$2\" && while [ ! -e \"$3\" ]; do sleep 0.1; done; echo tampered >&3",
            "sh",
        ])
        .arg(&file)
        .arg(signal.join("holding"))
        .arg(&go)
        .spawn()
        .unwrap();
    let (ok, log) = finish(child);
    fs::write(&go, "").unwrap();
    let _ = accomplice.wait();
    let out = format!("/nix/store/{base}");
    if ok {
        // Had the build been registered, its content must be what was hashed.
        assert_eq!(
            fs::read_to_string(format!("{out}/file")).unwrap(),
            "original\n"
        );
        run(
            nix_cmd("nix-store").args(["--verify-path", &out]),
            Duration::from_secs(60),
        )
        .assert_ok();
        panic!("an output held open for writing by another process was registered");
    }
    assert!(log.contains("still open for writing"), "{log}");
    assert!(!is_valid(&out));
}

/// Finding 6 (low): a 21,000-level directory tree in the build dir left
/// its staging dir behind for good (removal ran out of descriptors: the
/// machine's limit is 20,000).
#[test]
fn a_very_deep_build_dir_is_removed() {
    let env = TestEnv::new("sec-deep");
    accounts();
    jail_config(&env, "");
    let e = expr(
        &env,
        "deep.nix",
        r#"{ d = jailed { name = "sec-deep"; script = ''
    # 2,000 levels per step (a path of 4,000 bytes, under PATH_MAX),
    # nested 10 times by renaming: 22,000 levels in all.
    p=$(printf "a/%.0s" $(seq 2000))
    mkdir -p "t/$p"
    i=0
    while [ $i -lt 10 ]; do mkdir -p "n/$p" && mv t "n/$p"t && mv n t || exit 2; i=$((i+1)); done
    echo "made a tree 22000 levels deep"
    exit 1
  ''; }; }"#,
    );
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let out = env.nix_build_via_as_user(&daemon, MALLORY, &e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("made a tree 22000 levels deep");
    let left: Vec<_> = fs::read_dir(env.state_dir().join("staging"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}
