//! End-to-end tests of the queue in front of an executor's slots: builds
//! that find every slot busy are accepted and wait inside their hooks (up
//! to `queue` of them, in arrival order), say so in their build log and in
//! Nix's progress bar, and get the slot when it frees; builds beyond the
//! bound are postponed as before. A hook stopped while waiting leaves
//! nothing behind, and the waiting does not count against `timeout`.
//!
//! The builders that must overlap wait for a `go` file the test writes
//! once Nix has reported the other builds waiting (`--log-format
//! internal-json`); nothing here depends on timing.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

/// A builder snippet that waits (bounded) for `@DIR@/NAME`.
fn wait_for_file(name: &str) -> String {
    format!(
        r#"i=0; while [ ! -e "@DIR@/{name}" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done"#
    )
}

/// The text of Nix's activity for a build waiting inside its hook, and
/// for one postponed because the queue is full.
const WAITING_IN_HOOK: &str = "waiting for a free slot of executor \"hostx\" (max-jobs 1) to build";
const POSTPONED: &str = "full) to build";

/// A `nix-build --log-format internal-json` in the background; a thread
/// passes on each `@nix` message it prints.
struct Watched {
    child: Child,
    messages: Receiver<serde_json::Value>,
    raw: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Watched {
    /// `nix-build` with nix-hatch as its hook.
    fn start(env: &TestEnv, expr: &Path, attrs: &[&str], extra: &[&str]) -> Watched {
        let mut args = vec!["--log-format", "internal-json"];
        args.extend_from_slice(extra);
        Watched::spawn(env.nix_build_command(expr, attrs, &args))
    }

    /// `nix-build` as a client of `daemon`, whose own hook is nix-hatch.
    fn via(daemon: &Daemon, expr: &Path, attr: &str) -> Watched {
        let mut cmd = nix_cmd("nix-build");
        cmd.args(["--no-out-link", "--log-format", "internal-json"])
            .args(["--option", "substituters", "", "--option", "builders", ""])
            .arg(expr)
            .args(["-A", attr]);
        daemon.client_env(&mut cmd);
        Watched::spawn(cmd)
    }

    fn spawn(mut cmd: std::process::Command) -> Watched {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, messages) = channel();
        let raw = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let text = std::sync::Arc::clone(&raw);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut t) = text.lock() {
                    t.push_str(&line);
                    t.push('\n');
                }
                if let Some(v) = line
                    .strip_prefix("@nix ")
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
                {
                    let _ = send.send(v);
                }
            }
        });
        Watched {
            child,
            messages,
            raw,
        }
    }

    /// Waits (bounded) until Nix has started `n` activities whose text
    /// contains `text`.
    fn wait_for_activities(&self, text: &str, n: usize) {
        let mut seen = 0;
        while seen < n {
            let Ok(v) = self.messages.recv_timeout(Duration::from_secs(120)) else {
                panic!(
                    "saw {seen} of {n} activities {text:?}; nix-build printed:\n{}",
                    self.raw()
                );
            };
            if v["action"] == "start"
                && v["type"] == 111
                && v["text"].as_str().is_some_and(|t| t.contains(text))
            {
                seen += 1;
            }
        }
    }

    fn raw(&self) -> String {
        self.raw.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Waits for nix-build to end; its status and what it printed.
    fn finish(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        // The reader ends with the pipe; give it the last lines.
        while self.messages.recv_timeout(Duration::from_secs(5)).is_ok() {}
        let raw = self.raw();
        (status, raw)
    }
}

/// max-jobs = 1 and a `queue` of N: N builds started together all get
/// built, one at a time, and the log of every build but the first says
/// once that it waited, with how many ran and waited.
#[test]
fn builds_that_find_the_slot_busy_wait_in_the_hook_and_all_succeed() {
    const N: usize = 3;
    let env = TestEnv::new("queue-all");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 1;
    cfg.extra = format!("queue = {N}\n");
    env.write_host_config(&cfg);
    let script = format!(
        r#"
    mkdir "@DIR@/one-at-a-time" 2>/dev/null || echo "$out" >> "@DIR@/overlaps"
    {}
    echo "$out" > "$out"
    rmdir "@DIR@/one-at-a-time" 2>/dev/null || true
"#,
        wait_for_file("go")
    );
    let mut body = format!("let s = ''{script}''; in {{\n");
    let attrs: Vec<String> = (1..=N).map(|i| format!("q{i}")).collect();
    for a in &attrs {
        body.push_str(&format!(
            "  {a} = escape {{ name = \"queue-{a}\"; script = s; }};\n"
        ));
    }
    body.push('}');
    let expr = env.write_expr("queue.nix", &body);
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let build = Watched::start(&env, &expr, &attrs, &["-j", &N.to_string()]);
    build.wait_for_activities(WAITING_IN_HOOK, N - 1);
    fs::write(env.path("go"), "").unwrap();
    let (status, raw) = build.finish();
    assert!(status.success(), "{raw}");
    assert!(
        !env.path("overlaps").exists(),
        "max-jobs = 1 but builds overlapped: {}",
        fs::read_to_string(env.path("overlaps")).unwrap_or_default()
    );
    assert!(!raw.contains(POSTPONED), "nothing was postponed: {raw}");
    let mut waited = BTreeSet::new();
    for a in &attrs {
        let out = env.out_path(&expr, a);
        assert!(is_valid(&out), "{out} not valid");
        let log = nix_log(&out).stdout;
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("waiting for a free slot"))
            .collect();
        match lines[..] {
            [] => {}
            [line] => {
                waited.insert(line.to_owned());
            }
            _ => panic!("said more than once: {log}"),
        }
    }
    // The second one found 1 running, 1 waiting (itself); the third 2.
    let want: BTreeSet<String> = (1..N)
        .map(|w| {
            format!(
                "nix-hatch: waiting for a free slot of executor \"hostx\": 1 running, {w} waiting"
            )
        })
        .collect();
    assert_eq!(waited, want);
    let audit = fs::read_to_string(env.state_dir().join("audit.jsonl")).unwrap();
    assert_eq!(
        audit.matches("\"waited_s\":").count(),
        N - 1,
        "the records of the builds that waited say so: {audit}"
    );
}

/// With the queue full, a further build is postponed (as without a
/// queue) and still gets built.
#[test]
fn builds_beyond_the_queue_are_postponed_and_still_finish() {
    let env = TestEnv::new("queue-full");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 1;
    cfg.extra = "queue = 1\n".into();
    env.write_host_config(&cfg);
    let script = format!("{}\necho \"$out\" > \"$out\"\n", wait_for_file("go"));
    let expr = env.write_expr(
        "full.nix",
        &format!(
            "let s = ''{script}''; in {{\n  a = escape {{ name = \"full-a\"; script = s; }};\n  b = escape {{ name = \"full-b\"; script = s; }};\n  c = escape {{ name = \"full-c\"; script = s; }};\n}}"
        ),
    );
    let build = Watched::start(
        &env,
        &expr,
        &["a", "b", "c"],
        &["-j", "3", "--option", "build-poll-interval", "1"],
    );
    // One runs, one waits in its hook, one is postponed.
    build.wait_for_activities("queue 1 full) to build", 1);
    fs::write(env.path("go"), "").unwrap();
    let (status, raw) = build.finish();
    assert!(status.success(), "{raw}");
    // (In the JSON lines the executor's name is in escaped quotes.)
    assert!(raw.contains("(max-jobs 1) to build"), "{raw}");
    for a in ["a", "b", "c"] {
        let out = env.out_path(&expr, a);
        assert!(is_valid(&out), "{out} not valid");
    }
}

/// The ticket files of waiting builds in the state dir.
fn tickets(env: &TestEnv) -> Vec<String> {
    dir_names(&env.state_dir().join("slots"))
        .into_iter()
        .filter(|n| n.contains(".wait-"))
        .collect()
}

/// A hook stopped while its build waits for a slot — SIGTERM (Nix ≥ 2.35
/// stopping a build, an admin), SIGKILL (older Nix, the OOM killer), or
/// its Nix SIGKILLed (Nix starts hooks with SIGKILL as their parent-death
/// signal) — leaves nothing behind: no staging, no place in the queue, no
/// output, no audit record that claims it ran. The next build takes its
/// place.
#[test]
fn a_hook_stopped_while_waiting_leaves_nothing_and_the_next_build_gets_the_slot() {
    // Nix stopping the hook (SIGKILL to its group up to Nix 2.34, SIGTERM
    // then SIGKILL 500 ms later from 2.35), and Nix itself killed.
    let stops = NIX_STOPS.map(Some).into_iter().chain([None]);
    for stop in stops {
        let signal = match stop {
            Some(NixStop::Kill) => "nix-kill",
            Some(NixStop::TermThenKill) => "nix-term-then-kill",
            None => "nix-gone",
        };
        let env = TestEnv::new(&format!("queue-{signal}"));
        let mut cfg = env.standard_config();
        cfg.max_jobs = 1;
        cfg.extra = "queue = 2\n".into();
        env.write_host_config(&cfg);
        let expr = env.write_expr(
            "stop.nix",
            &format!(
                r#"{{
  first = escape {{ name = "stop-first"; script = ''
    touch "@DIR@/first-started"
    {}
    echo first > "$out"
  ''; }};
  stopped = escape {{ name = "stop-stopped"; script = ''echo stopped > "$out"''; }};
  next = escape {{ name = "stop-next"; script = ''echo next > "$out"''; }};
}}"#,
                wait_for_file("go")
            ),
        );
        let first = Watched::start(&env, &expr, &["first"], &[]);
        assert!(
            wait_until(Duration::from_secs(120), || env
                .path("first-started")
                .exists()),
            "the first build never started: {}",
            first.raw()
        );
        let before: BTreeSet<u32> = hooks_of(&env).into_iter().collect();
        let stopped = Watched::start(&env, &expr, &["stopped"], &[]);
        stopped.wait_for_activities(WAITING_IN_HOOK, 1);
        let new: Vec<u32> = hooks_of(&env)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        assert_eq!(new.len(), 1, "the waiting hook: {new:?}");
        assert_eq!(tickets(&env).len(), 1, "one build waits");
        let hook = new[0];
        let sigkilled = match stop {
            Some(how) => how.stop(hook),
            None => {
                // nix-build itself, SIGKILLed: its hook is left waiting alone.
                let killed = std::process::Command::new("kill")
                    .args(["-KILL", &stopped.child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(killed.success());
                true
            }
        };
        let (status, raw) = stopped.finish();
        assert!(!status.success(), "{signal}: {raw}");
        assert!(
            wait_until(Duration::from_secs(60), || !pid_alive(hook)),
            "{signal}: the hook still runs"
        );
        if !sigkilled {
            // It left the queue itself (a SIGKILLed hook's ticket is dead
            // and removed by the next hook that looks).
            assert!(tickets(&env).is_empty(), "{signal}: {:?}", tickets(&env));
        }
        if stop == Some(NixStop::TermThenKill) && !sigkilled {
            assert!(
                raw.contains(
                    "cancelled by a signal while waiting for a free slot; nothing was run"
                ),
                "{raw}"
            );
        }
        let stopped_out = env.out_path(&expr, "stopped");
        assert!(!is_valid(&stopped_out), "{signal}: {stopped_out} is valid");
        let staged: Vec<String> = env
            .staging_entries()
            .into_iter()
            .filter(|e| e.contains("stop-stopped"))
            .collect();
        assert!(staged.is_empty(), "{signal}: staging left: {staged:?}");
        let stopped_drv = env.drv_path(&expr, "stopped");
        let audit = fs::read_to_string(env.state_dir().join("audit.jsonl")).unwrap_or_default();
        let records: Vec<serde_json::Value> = audit
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &serde_json::Value| r["drv"] == stopped_drv.as_str())
            .collect();
        if sigkilled {
            assert!(records.is_empty(), "a SIGKILLed hook wrote {records:?}");
        } else {
            assert_eq!(records.len(), 1, "{audit}");
            assert_eq!(records[0]["result"], "error", "{audit}");
            assert_eq!(records[0]["outputs"], serde_json::json!([]), "{audit}");
            assert_eq!(
                records[0]["reason"],
                "cancelled by a signal while waiting for a free slot; nothing was run",
                "{audit}"
            );
        }

        // The next build queues in its place (the stopped one no longer
        // counts) and is built once the first finishes.
        let next = Watched::start(&env, &expr, &["next"], &[]);
        next.wait_for_activities(WAITING_IN_HOOK, 1);
        fs::write(env.path("go"), "").unwrap();
        let (status, raw) = next.finish();
        assert!(status.success(), "{signal}: {raw}");
        let (status, raw) = first.finish();
        assert!(status.success(), "{signal}: {raw}");
        let next_out = env.out_path(&expr, "next");
        assert!(is_valid(&next_out));
        let log = nix_log(&next_out).stdout;
        assert!(
            log.contains(
                "nix-hatch: waiting for a free slot of executor \"hostx\": 1 running, 1 waiting"
            ),
            "{signal}: {log}"
        );
        assert!(
            tickets(&env).is_empty(),
            "{signal}: left in the queue: {:?}",
            tickets(&env)
        );
        assert!(
            env.staging_entries().is_empty(),
            "{signal}: staging left: {:?}",
            env.staging_entries()
        );
    }
}

/// `timeout` limits the build, not its wait: a build whose timeout is
/// shorter than its wait for the slot still gets built.
#[test]
fn the_timeout_starts_when_the_build_does_not_while_it_waits() {
    let env = TestEnv::new("queue-timeout");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 1;
    env.write_host_config(&cfg);
    let expr = env.write_expr(
        "timeout.nix",
        &format!(
            r#"{{
  long = escape {{ name = "timeout-long"; script = ''
    touch "@DIR@/long-started"
    {}
    sleep 4
    echo long > "$out"
  ''; }};
  short = escape {{ name = "timeout-short"; script = ''echo short > "$out"''; }};
}}"#,
            wait_for_file("go")
        ),
    );
    let long = Watched::start(&env, &expr, &["long"], &[]);
    assert!(
        wait_until(Duration::from_secs(120), || env
            .path("long-started")
            .exists()),
        "the long build never started: {}",
        long.raw()
    );
    // Nix's own `timeout` for this run: 2 s, less than the 4 s it waits.
    let short = Watched::start(&env, &expr, &["short"], &["--option", "timeout", "2"]);
    short.wait_for_activities(WAITING_IN_HOOK, 1);
    fs::write(env.path("go"), "").unwrap();
    let (status, raw) = short.finish();
    assert!(status.success(), "{raw}");
    let (status, raw) = long.finish();
    assert!(status.success(), "{raw}");
    let out = env.out_path(&expr, "short");
    assert_eq!(fs::read_to_string(&out).unwrap(), "short\n");
    let audit = fs::read_to_string(env.state_dir().join("audit.jsonl")).unwrap();
    let record: serde_json::Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|r: &serde_json::Value| r["outputs"][0]["path"] == out.as_str())
        .unwrap_or_else(|| panic!("no record of {out}: {audit}"));
    assert!(
        record["waited_s"].as_f64().is_some_and(|w| w > 2.0),
        "it waited longer than its timeout: {record}"
    );
}

/// The queue spans hook processes of different daemon workers: a build
/// of a second client waits for the slot a first client's build holds,
/// and both are built.
#[test]
fn clients_of_one_daemon_share_the_queue() {
    let env = TestEnv::new("queue-daemon");
    let mut cfg = env.standard_config();
    cfg.max_jobs = 1;
    env.write_host_config(&cfg);
    let daemon = Daemon::start(&env, Some(&hook_bin()));
    let expr = env.write_expr(
        "daemon.nix",
        &format!(
            r#"{{
  first = escape {{ name = "daemon-first"; script = ''
    touch "@DIR@/first-started"
    {}
    echo first > "$out"
  ''; }};
  second = escape {{ name = "daemon-second"; script = ''echo second > "$out"''; }};
}}"#,
            wait_for_file("go")
        ),
    );
    let first = Watched::via(&daemon, &expr, "first");
    assert!(
        wait_until(Duration::from_secs(120), || env
            .path("first-started")
            .exists()),
        "the first build never started: {}",
        first.raw()
    );
    let second = Watched::via(&daemon, &expr, "second");
    second.wait_for_activities(WAITING_IN_HOOK, 1);
    fs::write(env.path("go"), "").unwrap();
    for (name, build) in [("first", first), ("second", second)] {
        let (status, raw) = build.finish();
        assert!(
            status.success(),
            "{name}: {raw}\ndaemon log:\n{}",
            daemon.log_text()
        );
    }
    let log = nix_log(&env.out_path(&expr, "second")).stdout;
    assert!(
        log.contains(
            "nix-hatch: waiting for a free slot of executor \"hostx\": 1 running, 1 waiting"
        ),
        "{log}"
    );
}
