//! Faults: the hook killed at every stage, SIGTERM mid-build, Nix stopping
//! the hook (both ways Nix does it), a full state dir, and load through one
//! daemon. Whatever happens, the store stays
//! consistent (no valid path without its contents, no half-registered
//! output), no build process survives, and staging is cleaned (at once, or
//! by the next build).

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// An escape build whose output references an input (busybox) and itself.
const REFS: &str = r#"{
  e = escape { name = "fault"; script = ''
    mkdir -p "$out"
    echo "@BB@ $out" > "$out/refs"
  ''; };
  next = plain { name = "fault-next"; script = "echo > $out"; };
}"#;

fn nix_build_with(env: &TestEnv, expr: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = env.nix_build_command(expr, &[], args);
    cmd.envs(vars.iter().copied());
    run(&mut cmd, NIX_LIMIT)
}

#[test]
fn hook_killed_at_every_stage_leaves_a_consistent_store() {
    for stage in [
        "before-accept",
        "before-build",
        "mid-import",
        "after-register",
    ] {
        let env = TestEnv::new(&format!("kill-{stage}"));
        env.write_host_config(&env.standard_config());
        let expr = env.write_expr("fault.nix", REFS);
        let want = env.out_path(&expr, "e");
        let e = ["-A", "e"];
        let out = nix_build_with(&env, &expr, &e, &[("NIX_HATCH_FAULT", stage)]);
        out.assert_failed();
        if stage == "after-register" {
            // Registered before the kill: valid and complete.
            assert!(is_valid(&want), "{stage}: {want} not valid");
            run(
                nix_cmd("nix-store").args(["--verify-path", &want]),
                NIX_LIMIT,
            )
            .assert_ok();
        } else {
            assert!(
                !is_valid(&want),
                "{stage}: {want} valid after the hook was killed"
            );
        }
        // The next build succeeds (a leftover at the output path is stale
        // and invalid: it is replaced) and leaves staging empty.
        let again = nix_build_with(&env, &expr, &e, &[]);
        again.assert_ok();
        // Any later hook start removes what a killed hook left in staging.
        nix_build_with(&env, &expr, &["-A", "next"], &[]).assert_ok();
        assert!(is_valid(&want), "{stage}: {want} not valid after the retry");
        assert_eq!(
            read(format!("{want}/refs")),
            format!("{} {want}\n", busybox())
        );
        let refs = references(&want);
        assert!(
            refs.contains(busybox()) && refs.contains(&want),
            "{stage}: {refs:?}"
        );
        assert!(
            env.staging_entries().is_empty(),
            "{stage}: staging left: {:?}",
            env.staging_entries()
        );
    }
}

/// The hook processes serving this test env (by their NIX_HATCH_CONFIG).
/// A bug in the hook (a panic) fails the build with a line saying so — in
/// what nix-build prints and in the build log — not as a "timeout" (Rust's
/// panic status 101 is Nix's hook status for one).
#[test]
fn a_panic_in_the_hook_is_reported_as_an_internal_error() {
    for stage in ["before-accept", "before-build"] {
        let env = TestEnv::new(&format!("panic-{stage}"));
        env.write_host_config(&env.standard_config());
        let expr = env.write_expr("fault.nix", REFS);
        let out = nix_build_with(
            &env,
            &expr,
            &["-A", "e"],
            &[("NIX_HATCH_FAULT", &format!("panic:{stage}"))],
        );
        out.assert_failed();
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(
            all.contains("nix-hatch: internal error") && all.contains("injected fault"),
            "{stage}: {}",
            out.describe()
        );
        assert!(
            !all.contains("timed out"),
            "{stage}: a panic reported as a timeout\n{}",
            out.describe()
        );
        // Nothing half-done is left behind: the next build works.
        nix_build_with(&env, &expr, &["-A", "e"], &[]).assert_ok();
    }
}

#[test]
fn sigterm_mid_build_stops_the_command_and_cleans_staging_at_once() {
    let env = TestEnv::new("sigterm");
    env.write_host_config(&env.standard_config());
    let (mut child, want) = env.spawn_sleeping_build();
    let hooks = hooks_of(&env);
    assert!(!hooks.is_empty(), "no hook process found");
    for h in &hooks {
        let _ = Command::new("kill")
            .args(["-TERM", &h.to_string()])
            .status();
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    let sleeper = env.root().to_string_lossy().into_owned();
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&sleeper)
            .is_empty()),
        "command survived SIGTERM of the hook: {:?}",
        processes_mentioning(&sleeper)
    );
    // The hook removed its staging dir itself before exiting.
    assert!(
        env.staging_entries().is_empty(),
        "staging left: {:?}",
        env.staging_entries()
    );
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
}

/// Nix killed (OOM, SIGKILL) while the hook builds: the hook runs in its
/// own process group, but dies with Nix (its parent-death signal), and the
/// command with it; the next hook cleans the staging dir.
#[test]
fn nix_killed_mid_build_stops_the_hook_and_the_command() {
    let env = TestEnv::new("nixkilled");
    env.write_host_config(&env.standard_config());
    let marker = format!("nixkilled-{}", env.nonce);
    let expr = env.write_expr(
        "talk.nix",
        &format!(
            r#"{{
  e = escape {{ name = "talker"; script = "sh -c 'while :; do echo tick; sleep 0.05; done' {marker}"; }};
  next = escape {{ name = "talker-next"; script = "echo > $out"; }};
}}"#
        ),
    );
    let mut cmd = env.nix_build_command(&expr, &[], &["-A", "e"]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut build = cmd.spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || !processes_mentioning(&marker)
            .is_empty()),
        "the build never started"
    );
    let hooks = hooks_of(&env);
    assert!(!hooks.is_empty(), "no hook process found");
    build.kill().unwrap();
    build.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&marker)
            .is_empty()
            && hooks_of(&env).is_empty()),
        "still running after nix-build was killed: command {:?}, hooks {:?}",
        processes_mentioning(&marker),
        hooks_of(&env)
    );
    env.nix_build(&expr, &["next"], &[]).assert_ok();
    assert!(
        env.staging_entries().is_empty(),
        "staging left: {:?}",
        env.staging_entries()
    );
}

/// Live processes running as `uid`.
fn processes_of_uid(uid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        if real_uid == Some(uid) && pid_alive(pid) {
            let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

/// The account the jail of the stop tests runs as: only these tests use
/// it, so every process it has is one of their builds.
const STOP_JAIL_USER: &str = "nhtest-stop";

/// Nix stopping the hook while the build runs (it no longer needs it: the
/// user interrupted, another build failed), both ways Nix does it, for a
/// host command and a jailed builder: nothing of the build keeps running,
/// the output is not valid and not on disk, and the next hook start leaves
/// staging empty.
#[test]
fn nix_stopping_the_hook_mid_build_leaves_nothing_running() {
    let (jail_uid, _) = test_account(STOP_JAIL_USER, &[]);
    for stop in NIX_STOPS {
        for kind in ["host", "jail"] {
            let env = TestEnv::new(&format!("stop-{kind}-{stop:?}"));
            std::os::unix::fs::symlink("/bin/sleep", env.path("long-sleep")).unwrap();
            // `next` goes through the same executor: a later hook start.
            let (expr, attr) = if kind == "host" {
                env.write_host_config(&env.standard_config());
                let e = env.write_expr(
                    "stop.nix",
                    r#"{
  s = escape { name = "stopped"; script = ''"@DIR@/long-sleep" 600; echo late > "$out"''; };
  next = escape { name = "stopped-next"; script = "echo > $out"; };
}"#,
                );
                (e, "s")
            } else {
                write_jail_config(&env, STOP_JAIL_USER, "");
                // A child in the background too: the whole jail must go.
                let e = jail_expr(
                    &env,
                    "stop.nix",
                    r#"{
  j = jailed { name = "stopped-jail"; script = "sleep 600 & sleep 600; echo late > $out"; };
  next = jailed { name = "stopped-next"; script = "echo > $out"; };
}"#,
                );
                (e, "j")
            };
            let want = env.out_path(&expr, attr);
            let mut cmd = env.nix_build_command(&expr, &[attr], &[]);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let mut build = cmd.spawn().unwrap();
            let sleeper = env.path("long-sleep").to_string_lossy().into_owned();
            let running = || {
                if kind == "host" {
                    processes_mentioning(&sleeper)
                } else {
                    processes_of_uid(jail_uid)
                }
            };
            let sleeping = || {
                running()
                    .iter()
                    .filter(|(_, cmd)| cmd.contains("sleep 600"))
                    .count()
            };
            assert!(
                wait_until(Duration::from_secs(60), || sleeping()
                    >= if kind == "host" { 1 } else { 2 }),
                "{kind} {stop:?}: the build never started"
            );
            let hook = nix_started_hook(&env);
            stop.stop(hook);
            assert!(!build.wait().unwrap().success());
            assert!(
                wait_until(Duration::from_secs(10), || running().is_empty()
                    && build_processes(&env, &sleeper).is_empty()),
                "{kind} {stop:?}: still running after Nix stopped the hook: {:?} {:?}",
                running(),
                build_processes(&env, &sleeper)
            );
            assert!(!is_valid(&want), "{kind} {stop:?}");
            assert!(!exists_on_disk(&want), "{kind} {stop:?}: {want} on disk");
            // The next hook start removes what a killed hook left.
            env.nix_build(&expr, &["next"], &[]).assert_ok();
            assert!(
                env.staging_entries().is_empty(),
                "{kind} {stop:?}: staging left: {:?}",
                env.staging_entries()
            );
        }
    }
}

/// A build whose output takes seconds to read into the store (a sparse
/// 4 GiB file: hashing reads every byte), started with Nix's activity log
/// on; returns once the hook has begun reading it, with the output path.
fn spawn_build_in_import(
    env: &TestEnv,
) -> (
    std::process::Child,
    std::thread::JoinHandle<String>,
    String,
    PathBuf,
) {
    use std::io::BufRead;
    env.write_host_config(&env.standard_config());
    let expr = env.write_expr(
        "import.nix",
        r#"{
  big = escape { name = "stopped-import"; script = ''truncate -s 4G "$out"''; };
  next = escape { name = "stopped-import-next"; script = "echo > $out"; };
}"#,
    );
    let want = env.out_path(&expr, "big");
    let drv = env.drv_path(&expr, "big");
    let mut cmd = env.nix_build_command(&expr, &["big"], &["--log-format", "internal-json"]);
    let mut build = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = build.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut raw = String::new();
        let needle = format!("reading the outputs of '{drv}' into the store");
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(&needle) {
                let _ = tx.send(());
            }
            raw.push_str(&line);
            raw.push('\n');
        }
        raw
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = build.kill();
        panic!("the import never began:\n{}", reader.join().unwrap());
    }
    (build, reader, want, expr)
}

/// Nix stopping the hook while it reads the outputs into the store, both
/// ways: the output is neither valid nor on disk, nothing keeps running,
/// and the next hook start leaves staging empty.
#[test]
fn nix_stopping_the_hook_mid_import_leaves_no_output() {
    for stop in NIX_STOPS {
        let env = TestEnv::new(&format!("stop-import-{stop:?}"));
        let (mut build, reader, want, expr) = spawn_build_in_import(&env);
        let hook = nix_started_hook(&env);
        stop.stop(hook);
        assert!(!build.wait().unwrap().success());
        let raw = reader.join().unwrap();
        let dir = env.root().to_string_lossy().into_owned();
        assert!(
            wait_until(Duration::from_secs(10), || build_processes(&env, &dir)
                .is_empty()),
            "{stop:?}: still running: {:?}",
            build_processes(&env, &dir)
        );
        assert!(!is_valid(&want), "{stop:?}");
        assert!(!exists_on_disk(&want), "{stop:?}: {want} on disk\n{raw}");
        env.nix_build(&expr, &["next"], &[]).assert_ok();
        assert!(
            env.staging_entries().is_empty(),
            "{stop:?}: staging left: {:?}",
            env.staging_entries()
        );
    }
}

/// What the hook does with the 500 ms Nix >= 2.35 gives it after SIGTERM
/// (here without the SIGKILL, so that its own clean-up is what is seen):
/// mid-import it stops reading, leaves nothing in the store or in staging,
/// and records the attempt as stopped.
#[test]
fn sigterm_mid_import_ends_the_build_cleanly() {
    let env = TestEnv::new("term-import");
    let (mut build, reader, want, _) = spawn_build_in_import(&env);
    let hook = nix_started_hook(&env);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-(hook as i32)),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(!build.wait().unwrap().success());
    let raw = reader.join().unwrap();
    assert!(
        raw.contains("build cancelled by signal"),
        "no reason in the build log:\n{raw}"
    );
    // The hook exited by itself: it cleaned up before it did.
    assert!(hooks_of(&env).is_empty(), "{:?}", hooks_of(&env));
    assert!(
        env.staging_entries().is_empty(),
        "staging left: {:?}",
        env.staging_entries()
    );
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} on disk");
    let audit = read(env.state_dir().join("audit.jsonl"));
    let record: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(record["result"], "error", "{audit}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cancelled by signal")),
        "{audit}"
    );
}

/// A tmpfs of `size` mounted on `path` for the test's lifetime.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: &Path, size: &str) -> SmallFs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", path.display());
        SmallFs(path.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_state_dir_fails_the_build_cleanly() {
    let env = TestEnv::new("diskfull");
    env.write_host_config(&env.standard_config());
    let _fs = SmallFs::mount(&env.state_dir(), "2m");
    let expr = env.write_expr(
        "full.nix",
        r#"{ e = escape { name = "too-big"; script = ''
    head -c 8388608 /dev/zero > "$out"
  ''; }; }"#,
    );
    let want = env.out_path(&expr, "e");
    let out = env.nix_build(&expr, &["e"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("No space left on device");
    assert!(!is_valid(&want));
    assert!(!exists_on_disk(&want), "{want} left on disk");
    assert!(
        env.staging_entries().is_empty(),
        "staging left: {:?}",
        env.staging_entries()
    );
}

#[test]
fn load_through_one_daemon_respects_slots_and_keeps_the_store_valid() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 10; // half escape, half plain
    let env = TestEnv::new("load");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 2;
    env.write_host_config(&cfg);
    let d = env.path("conc");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("running"), "0\n").unwrap();
    fs::write(d.join("max"), "0\n").unwrap();
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    // Each escape build records how many run at once (under flock) and
    // does a little work so that builds overlap.
    let script = r#"
    D="@DIR@/conc"
    exec 9>"$D/lock"
    flock 9; n=$(( $(cat "$D/running") + 1 )); echo "$n" > "$D/running"
    m=$(cat "$D/max"); if [ "$n" -gt "$m" ]; then echo "$n" > "$D/max"; fi; flock -u 9
    head -c 4000000 /dev/urandom | sha256sum > "$out"
    flock 9; echo $(( $(cat "$D/running") - 1 )) > "$D/running"; flock -u 9
"#;
    let mut exprs = Vec::new();
    for c in 0..CLIENTS {
        let mut body = format!("let work = ''{script}''; in {{\n");
        for i in 0..PER_CLIENT {
            if i % 2 == 0 {
                body.push_str(&format!(
                    "  d{i} = escape {{ name = \"load-{c}-{i}\"; script = work; }};\n"
                ));
            } else {
                body.push_str(&format!(
                    "  d{i} = plain {{ name = \"load-{c}-{i}\"; script = \"echo {c}-{i} > $out\"; }};\n"
                ));
            }
        }
        body.push('}');
        exprs.push(env.write_expr(&format!("load{c}.nix"), &body));
    }
    let handles: Vec<_> = exprs
        .iter()
        .map(|e| {
            let mut cmd = nix_cmd("nix-build");
            cmd.args(["--no-out-link", "-j", "4"]).arg(e);
            daemon.client_env(&mut cmd);
            std::thread::spawn(move || run(&mut cmd, NIX_LIMIT))
        })
        .collect();
    for h in handles {
        h.join().unwrap().assert_ok();
    }
    for e in &exprs {
        for i in 0..PER_CLIENT {
            let p = env.out_path(e, &format!("d{i}"));
            assert!(is_valid(&p), "{p} not valid");
        }
    }
    let max: u32 = read(d.join("max")).trim().parse().unwrap();
    assert!(
        (1..=2).contains(&max),
        "max-jobs = 2 but {max} escape builds ran at once"
    );
    assert!(env.staging_entries().is_empty());
    verify_store().assert_ok();
}
