//! The `ssh` executor end to end: real escape builds through the hook and
//! Nix 2.8, over a private OpenSSH server on 127.0.0.1 (Debian's
//! `openssh-server`, started per test with its own sshd_config and freshly
//! generated host and user keys, stopped by PID), with the built
//! `nix-hatch` binary as the far side's agent.
//!
//! The far side is this machine, so "no leftovers on the far side" is
//! checked directly: every remote process carries the test's private
//! `TMPDIR` in its environment (the agent wrapper sets it), and the agent's
//! temporary dirs live below it.

mod common;

use common::sshd::{keygen, Sshd};
use common::*;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SSH_FEATURE: &str = "escape-s";

/// SIGKILLs every per-connection sshd process (the listener stays):
/// the connection drops as if the far machine had vanished.
fn kill_sessions(sshd: &Sshd) -> usize {
    let mut killed = 0;
    for pid in descendants(sshd.pid()) {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // OpenSSH >= 9.8 (Debian 13) names them sshd-session.
        if matches!(comm.trim(), "sshd" | "sshd-session") {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            killed += 1;
        }
    }
    killed
}

/// All pids below `root` (by the ppid field of /proc/*/stat).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &(c, pp) in &parent {
            if pp == p {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Live processes whose environment mentions `needle` (the test's remote TMPDIR).
fn processes_with_env(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !pid_alive(pid) {
            continue;
        }
        let Ok(environ) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|kv| String::from_utf8_lossy(kv).contains(needle))
        {
            let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    found
}

/// One test's far side: sshd, the agent wrapper, the remote command.
struct Remote {
    sshd: Sshd,
    /// TMPDIR of every remote process; the agent's temp dirs go here.
    tmp: PathBuf,
}

impl Remote {
    fn start(env: &TestEnv) -> Remote {
        let sshd = Sshd::start(env);
        let tmp = env.path("remote-tmp");
        fs::create_dir_all(&tmp).unwrap();
        // The admin's command on the far side: evals its first argument.
        env.write_script(
            "remote.sh",
            "#!/bin/sh\nset -eu\nscript=\"$1\"\nshift\neval \"$script\"\n",
        );
        Remote { sshd, tmp }
    }

    /// An agent program: `pipe` (may be empty) is a shell pipeline stage
    /// appended to the agent's stdout.
    fn agent(&self, env: &TestEnv, name: &str, pipe: &str) -> PathBuf {
        env.write_script(
            name,
            &format!(
                "#!/bin/sh\nexport TMPDIR={tmp}\nexec 3<&0\n{cli} \"$@\" {pipe}\n",
                tmp = self.tmp.display(),
                cli = CLI,
            ),
        )
    }

    /// The config: `escape-s` → executor `sshx`; `extra` lines go into its
    /// table (they override nothing: keys must not repeat).
    fn config(&self, env: &TestEnv, agent: &Path, known_hosts: &str, identity: &Path, extra: &str) {
        let kh = env.path("known_hosts");
        fs::write(&kh, known_hosts).unwrap();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "state-dir = {}",
            toml_str(&env.state_dir().to_string_lossy())
        );
        let _ = writeln!(
            s,
            "fallback = \"decline\"\n[routes]\n{SSH_FEATURE} = \"sshx\""
        );
        let _ = writeln!(s, "[executors.sshx]\nkind = \"ssh\"\nhost = \"127.0.0.1\"");
        let _ = writeln!(s, "port = {}\nuser = \"root\"", self.sshd.port);
        let _ = writeln!(s, "identity = {}", toml_str(&identity.to_string_lossy()));
        let _ = writeln!(s, "known-hosts = {}", toml_str(&kh.to_string_lossy()));
        let _ = writeln!(s, "agent = {}", toml_str(&agent.to_string_lossy()));
        let _ = writeln!(
            s,
            "command = [{}]\nmax-jobs = 2\ntimeout = 120",
            toml_str(&env.path("remote.sh").to_string_lossy())
        );
        s.push_str(extra);
        env.write_config(&s);
    }

    fn good_config(&self, env: &TestEnv, agent: &Path) {
        self.config(
            env,
            agent,
            &self.sshd.known_hosts_line,
            &self.sshd.identity,
            "",
        );
    }

    /// Nothing of the build is left on the far side: no process, no temp dir
    /// (bounded wait: the agent cleans up after the local side gave up).
    #[track_caller]
    fn assert_clean(&self) {
        let tmp = self.tmp.to_string_lossy().into_owned();
        let clean = wait_until(Duration::from_secs(20), || {
            processes_with_env(&tmp).is_empty()
                && fs::read_dir(&self.tmp)
                    .map(|d| d.count() == 0)
                    .unwrap_or(false)
        });
        assert!(
            clean,
            "leftovers on the far side: processes {:?}, temp entries {:?}",
            processes_with_env(&tmp),
            fs::read_dir(&self.tmp)
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
        );
    }
}

fn expr(env: &TestEnv, name: &str, body: &str) -> PathBuf {
    env.write_expr(name, body)
}

/// A derivation for the ssh executor whose remote script is `script`.
fn remote_drv(name: &str, script: &str) -> String {
    format!(
        "escape {{ name = {}; feature = \"{SSH_FEATURE}\"; script = {}; }}",
        nix_str(name),
        nix_str(script)
    )
}

/// The local side left nothing: output neither valid nor on disk, no
/// staging dir.
#[track_caller]
fn assert_nothing_registered(env: &TestEnv, out_path: &str) {
    assert!(!is_valid(out_path), "{out_path} was registered");
    assert!(!exists_on_disk(out_path), "{out_path} exists on disk");
    let staging = env.state_dir().join("staging");
    let left: Vec<_> = fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging dirs left: {left:?}");
}

#[test]
fn escape_build_runs_on_the_far_side_and_returns_valid_outputs() {
    let env = TestEnv::new("ssh-ok");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let e = expr(
        &env,
        "ok.nix",
        &format!(
            "{{ tree = {}; reloc = {}; }}",
            remote_drv(
                "ssh-tree",
                "echo remote-says-hello; echo on-stderr >&2; mkdir -p $out/sub; echo hi > $out/sub/greeting; \
                 printf '#!/bin/sh\\n' > $out/run; chmod +x $out/run; ln -s sub/greeting $out/link; \
                 echo \"$NIX_HATCH_STORE_PATH_out\" > $out/self",
            ),
            remote_drv("ssh-reloc", "echo \"built in $out\" > $out"),
        ),
    );
    let out = env.nix_build(&e, &["tree"], &[]);
    out.assert_ok();
    let p = out.store_paths()[0].clone();
    assert!(is_valid(&p));
    assert_eq!(
        fs::read_to_string(format!("{p}/sub/greeting")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        fs::read_to_string(format!("{p}/self")).unwrap(),
        format!("{p}\n")
    );
    assert_eq!(
        fs::read_link(format!("{p}/link")).unwrap(),
        PathBuf::from("sub/greeting")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(format!("{p}/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "executable bit lost: {mode:o}");
    // The self-reference written via NIX_HATCH_STORE_PATH_out is found.
    assert!(references(&p).contains(&p), "{:?}", references(&p));
    let log = nix_log(&p);
    log.assert_ok();
    for needle in [
        "remote-says-hello",
        "on-stderr",
        "digest verified",
        "connected to root@127.0.0.1",
        // The fast cipher of the vendored libssh2 is the one negotiated.
        "cipher chacha20-poly1305@openssh.com",
    ] {
        assert!(
            log.stdout.contains(needle),
            "log lacks {needle:?}:\n{}",
            log.stdout
        );
    }
    assert!(!log.stdout.contains("temporary path"), "{}", log.stdout);

    // An output that embeds the far side's $out: built, with a warning.
    // Its transfer shows in Nix's progress (an activity with its bytes).
    let out = env.nix_build(&e, &["reloc"], &["--log-format", "internal-json"]);
    out.assert_ok();
    let p = out.store_paths()[0].clone();
    let events: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l.strip_prefix("@nix ")?).ok())
        .collect();
    let drv = env.drv_path(&e, "reloc");
    let copy = events
        .iter()
        .find(|v| {
            v["action"] == "start"
                && v["type"] == 100
                && v["text"].as_str().is_some_and(|t| {
                    t.starts_with(&format!("copying outputs of '{drv}' from 'root@127.0.0.1"))
                })
        })
        .and_then(|v| v["id"].as_u64())
        .unwrap_or_else(|| panic!("no transfer activity:\n{}", out.stderr));
    let of_copy = |action: &str| {
        events
            .iter()
            .filter(|v| v["action"] == action && v["id"].as_u64() == Some(copy))
            .count()
    };
    assert!(
        of_copy("result") >= 1 && of_copy("stop") == 1,
        "{}",
        out.stderr
    );
    let text = fs::read_to_string(&p).unwrap();
    assert!(
        text.contains(&remote.tmp.to_string_lossy().into_owned()),
        "{text}"
    );
    let log = nix_log(&p);
    assert!(
        log.stdout
            .contains("warning: output \"out\" contains the far side's temporary path"),
        "{}",
        log.stdout
    );
    remote.assert_clean();
}

#[test]
fn failing_remote_command_fails_the_build() {
    let env = TestEnv::new("ssh-fail");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let e = expr(
        &env,
        "fail.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv("ssh-fail", "echo about-to-fail; mkdir $out; exit 7")
        ),
    );
    let out_path = env.out_path(&e, "d");
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("command failed on the far side with exit code 7");
    out.assert_stderr_contains("about-to-fail");
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

/// Host key and authentication failures: one clear line, nothing built.
#[test]
fn wrong_unknown_host_key_and_bad_auth_are_refused() {
    let env = TestEnv::new("ssh-refuse");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    let ran = env.path("command-ran");
    let e = expr(
        &env,
        "refuse.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv(
                "ssh-refuse",
                &format!("touch {}; echo x > $out", ran.display())
            )
        ),
    );
    let out_path = env.out_path(&e, "d");
    let other = env.path("other_key");
    keygen(&other);
    let other_pub = fs::read_to_string(env.path("other_key.pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let port = remote.sshd.port;
    let cases = [
        (
            "wrong host key",
            format!("[127.0.0.1]:{port} {} {}\n", other_pub[0], other_pub[1]),
            remote.sshd.identity.clone(),
            "host key CHANGED: 127.0.0.1:",
        ),
        (
            "unknown host key",
            format!("[127.0.0.2]:{port} {} {}\n", other_pub[0], other_pub[1]),
            remote.sshd.identity.clone(),
            "host key UNKNOWN: 127.0.0.1:",
        ),
        (
            "bad authentication",
            remote.sshd.known_hosts_line.clone(),
            other.clone(),
            "authentication with key",
        ),
    ];
    for (what, kh, identity, needle) in cases {
        remote.config(&env, &agent, &kh, &identity, "");
        let out = env.nix_build(&e, &["d"], &[]);
        out.assert_failed();
        out.assert_stderr_contains(needle);
        if what != "bad authentication" {
            // The line names the fingerprint the server presented.
            out.assert_stderr_contains("ED25519 SHA256:");
        } else {
            // And what the server would take instead.
            out.assert_stderr_contains("not authorized for root there");
            out.assert_stderr_contains("the server offers: publickey");
        }
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_owned();
        assert!(line.contains("nix-hatch: "), "{what}: {line}");
        assert!(!ran.exists(), "{what}: the command ran");
        assert_nothing_registered(&env, &out_path);
    }
    remote.assert_clean();
}

#[test]
fn truncated_stream_fails_and_leaves_nothing() {
    let env = TestEnv::new("ssh-trunc");
    let remote = Remote::start(&env);
    // The agent's answer is cut after 300 kB.
    let agent = remote.agent(&env, "agent-trunc.sh", "| head -c 300000");
    remote.good_config(&env, &agent);
    let e = expr(
        &env,
        "trunc.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv("ssh-trunc", "head -c 4000000 /dev/urandom > $out")
        ),
    );
    let out_path = env.out_path(&e, "d");
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("nothing imported");
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

#[test]
fn corrupted_frame_fails_and_leaves_nothing() {
    let env = TestEnv::new("ssh-corrupt");
    let remote = Remote::start(&env);
    // Flips one byte of the agent's answer, 200 kB in (inside the tar data).
    let flip = r#"| perl -e 'binmode STDIN; binmode STDOUT; $|=1; $n=200000; while (($r = sysread(STDIN, $b, 65536)) > 0) { if ($n >= 0 && $n < $r) { substr($b, $n, 1) = chr(ord(substr($b, $n, 1)) ^ 0x55); } $n -= $r; print $b; }'"#;
    let agent = remote.agent(&env, "agent-flip.sh", flip);
    remote.good_config(&env, &agent);
    let e = expr(
        &env,
        "corrupt.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv("ssh-corrupt", "head -c 2000000 /dev/zero > $out")
        ),
    );
    let out_path = env.out_path(&e, "d");
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("corrupted stream");
    out.assert_stderr_contains("nothing imported");
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

/// The connection dies mid-transfer (every sshd session process killed while
/// the agent is blocked sending): the build fails cleanly, and the agent
/// notices, kills what is left and removes its temp dir.
#[test]
fn connection_lost_mid_transfer_fails_cleanly() {
    let env = TestEnv::new("ssh-cut");
    let remote = Remote::start(&env);
    let stalled = env.path("stalled");
    // After 300 kB the stream stalls (nobody reads the agent's stdout) until
    // the channel's stdin ends.
    let agent = remote.agent(
        &env,
        "agent-stall.sh",
        &format!(
            "| {{ head -c 300000; : > {}; cat <&3 >/dev/null; }}",
            stalled.display()
        ),
    );
    remote.good_config(&env, &agent);
    let e = expr(
        &env,
        "cut.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv("ssh-cut", "head -c 8000000 /dev/urandom > $out")
        ),
    );
    let out_path = env.out_path(&e, "d");
    let (e2, env_ref) = (e.clone(), &env);
    std::thread::scope(|s| {
        let build = s.spawn(move || env_ref.nix_build(&e2, &["d"], &[]));
        assert!(
            wait_until(Duration::from_secs(120), || stalled.exists()),
            "the transfer never started"
        );
        assert!(kill_sessions(&remote.sshd) > 0, "no sshd session to kill");
        let out = build.join().unwrap();
        out.assert_failed();
        assert!(
            out.stderr.contains("lost") || out.stderr.contains("ended before its trailer"),
            "{}",
            out.describe()
        );
        out.assert_stderr_contains("nothing imported");
    });
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

/// The agent itself is stopped mid-transfer (SIGTERM: it notices even while
/// blocked sending; SIGKILL: its janitor process removes the temp dir): the
/// build fails, nothing is registered, nothing is left on either side.
#[test]
fn agent_killed_mid_transfer_fails_cleanly() {
    for sig in ["TERM", "KILL"] {
        let env = TestEnv::new(&format!("ssh-agent-{}", sig.to_lowercase()));
        let remote = Remote::start(&env);
        let stalled = env.path("stalled");
        let pidfile = env.path("agent.pid");
        // The agent runs in the background so its pid is known; after 300 kB
        // nobody reads its stdout until it is gone.
        let agent = env.write_script(
            "agent-pid.sh",
            &format!(
                "#!/bin/sh\nexport TMPDIR={tmp}\nexec 3<&0\n\
                 {{ {cli} \"$@\" <&3 & echo $! > {pid}; wait; }} | \
                 {{ head -c 300000; : > {st}; while [ ! -s {pid} ]; do :; done; \
                 tail --pid=\"$(cat {pid})\" -f /dev/null; }}\n",
                tmp = remote.tmp.display(),
                cli = CLI,
                pid = pidfile.display(),
                st = stalled.display(),
            ),
        );
        remote.good_config(&env, &agent);
        let e = expr(
            &env,
            "kill.nix",
            &format!(
                "{{ d = {}; }}",
                remote_drv("ssh-agent-kill", "head -c 8000000 /dev/urandom > $out")
            ),
        );
        let out_path = env.out_path(&e, "d");
        let env_ref = &env;
        std::thread::scope(|s| {
            let build = s.spawn(move || env_ref.nix_build(&e, &["d"], &[]));
            assert!(
                wait_until(Duration::from_secs(120), || stalled.exists()),
                "the transfer never started"
            );
            let pid = fs::read_to_string(&pidfile).unwrap();
            let st = Command::new("kill")
                .args([&format!("-{sig}"), pid.trim()])
                .status()
                .unwrap();
            assert!(st.success());
            let out = build.join().unwrap();
            out.assert_failed();
            out.assert_stderr_contains("nothing imported");
        });
        assert_nothing_registered(&env, &out_path);
        remote.assert_clean();
    }
}

/// known_hosts as `HashKnownHosts yes` (Debian's default) writes it, with
/// another host's entry of a key type the server also has coming first:
/// the server must be asked for the type this host's entry has.
#[test]
fn hashed_known_hosts_with_other_hosts_entries() {
    let env = TestEnv::new("ssh-hashed");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    let other = env.path("other_ecdsa");
    common::sshd::keygen_type(&other, "ecdsa");
    let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let kh = env.path("kh-plain");
    fs::write(
        &kh,
        format!(
            "other-box {}\n{}",
            other_pub.join(" "),
            remote.sshd.known_hosts_line
        ),
    )
    .unwrap();
    run(
        Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh),
        Duration::from_secs(30),
    )
    .assert_ok();
    let hashed = fs::read_to_string(&kh).unwrap();
    assert!(hashed.lines().all(|l| l.starts_with("|1|")), "{hashed}");
    remote.config(&env, &agent, &hashed, &remote.sshd.identity, "");
    let e = expr(
        &env,
        "hashed.nix",
        &format!("{{ d = {}; }}", remote_drv("ssh-hashed", "echo ok > $out")),
    );
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_ok();
    remote.assert_clean();
}

/// `timeout` is enforced on the far side: the command and what it left
/// running in the background are killed, and the build fails as timed out.
#[test]
fn timeout_kills_the_remote_command_and_its_children() {
    let env = TestEnv::new("ssh-timeout");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    let kh = remote.sshd.known_hosts_line.clone();
    remote.config(&env, &agent, &kh, &remote.sshd.identity, "");
    // Same config with timeout 2 instead of 120.
    let text = fs::read_to_string(env.config_path())
        .unwrap()
        .replace("timeout = 120", "timeout = 2");
    env.write_config(&text);
    let e = expr(
        &env,
        "timeout.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv(
                "ssh-timeout",
                "sleep 300 & sleep 301 & echo started; sleep 302"
            )
        ),
    );
    let out_path = env.out_path(&e, "d");
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("started");
    out.assert_stderr_contains("timed out after 2 seconds");
    assert!(out.elapsed < Duration::from_secs(60), "{}", out.describe());
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

/// Nix stopping the hook mid-build (both ways Nix does it, see
/// [`NixStop`]): the connection goes with the hook, and the agent ends the
/// far command and what it started in the background; nothing is
/// registered, and the next hook start leaves no staging dir.
#[test]
fn nix_stopping_the_hook_ends_the_far_command() {
    for stop in NIX_STOPS {
        let env = TestEnv::new(&format!("ssh-stop-{stop:?}"));
        let remote = Remote::start(&env);
        let agent = remote.agent(&env, "agent.sh", "");
        remote.good_config(&env, &agent);
        let e = expr(
            &env,
            "stop.nix",
            &format!(
                "{{ d = {}; next = {}; }}",
                remote_drv("ssh-stop", "sleep 300 & sleep 302"),
                remote_drv("ssh-stop-next", "echo x > $out")
            ),
        );
        let out_path = env.out_path(&e, "d");
        let mut cmd = env.nix_build_command(&e, &["d"], &[]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut build = cmd.spawn().unwrap();
        let tmp = remote.tmp.to_string_lossy().into_owned();
        assert!(
            wait_until(Duration::from_secs(60), || processes_with_env(&tmp)
                .iter()
                .filter(|p| p
                    .split_once(": ")
                    .is_some_and(|(_, cmd)| cmd.starts_with("sleep 30")))
                .count()
                == 2),
            "{stop:?}: the far command never started: {:?}",
            processes_with_env(&tmp)
        );
        stop.stop(nix_started_hook(&env));
        assert!(!build.wait().unwrap().success());
        remote.assert_clean();
        // The next hook start removes what a killed hook left in staging.
        env.nix_build(&e, &["next"], &[]).assert_ok();
        assert_nothing_registered(&env, &out_path);
    }
}

#[test]
fn check_validates_files_and_connect_reports_each_executor() {
    let env = TestEnv::new("ssh-check");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let check = |connect: bool| {
        let mut c = Command::new(CLI);
        c.arg("check").arg("--config").arg(env.config_path());
        if connect {
            c.arg("--connect");
        }
        run(&mut c, Duration::from_secs(60))
    };
    let out = check(true);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("connect: executor sshx: ssh root@127.0.0.1:")
            && out.stdout.contains(": ok (host key ED25519 SHA256:"),
        "{}",
        out.describe()
    );
    // A group-readable key is refused by `check`.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&remote.sshd.identity, fs::Permissions::from_mode(0o640)).unwrap();
    let out = check(false);
    out.assert_failed();
    assert!(
        out.stdout.contains("accessible by group or others"),
        "{}",
        out.describe()
    );
    fs::set_permissions(&remote.sshd.identity, fs::Permissions::from_mode(0o600)).unwrap();
    // A changed host key: one line naming host and fingerprint.
    let other = env.path("other_key");
    keygen(&other);
    let other_pub = fs::read_to_string(env.path("other_key.pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    let kh = format!(
        "[127.0.0.1]:{} {} {}\n",
        remote.sshd.port, other_pub[0], other_pub[1]
    );
    remote.config(&env, &agent, &kh, &remote.sshd.identity, "");
    let out = check(true);
    out.assert_failed();
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains("sshx")).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error: connect: executor sshx:")
                && l.contains("host key CHANGED")
                && l.contains("SHA256:")),
        "{}",
        out.describe()
    );
    // A missing agent on the far side.
    remote.config(
        &env,
        Path::new("/nonexistent/nix-hatch"),
        &remote.sshd.known_hosts_line,
        &remote.sshd.identity,
        "",
    );
    let out = check(true);
    out.assert_failed();
    assert!(
        out.stdout.contains("the agent does not run there"),
        "{}",
        out.describe()
    );
}

/// The benchmarks' size in MiB (`NIX_HATCH_BENCH_MIB`, default 512) and
/// rounds (`NIX_HATCH_BENCH_ROUNDS`, default 3).
fn bench_size_and_rounds() -> (u64, usize) {
    let var = |name: &str| std::env::var(name).ok();
    (
        var("NIX_HATCH_BENCH_MIB")
            .and_then(|s| s.parse().ok())
            .unwrap_or(512),
        var("NIX_HATCH_BENCH_ROUNDS")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    )
}

/// Benchmark (scripts/bench-ssh): a 512 MiB output returned through the
/// executor vs `ssh host cat` of the same bytes over the same sshd. Prints
/// the numbers and the ratio; asserts nothing about speed.
#[test]
#[ignore = "benchmark: run with scripts/bench-ssh"]
fn bench_transfer_512mib() {
    let (mib, rounds) = bench_size_and_rounds();
    let env = TestEnv::new("ssh-bench");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let data = env.path("data");
    run(
        Command::new("sh").arg("-c").arg(format!(
            "head -c {}M /dev/urandom > {}",
            mib,
            data.display()
        )),
        Duration::from_secs(300),
    )
    .assert_ok();
    let kh = env.path("known_hosts");
    let ssh = |remote_cmd: &str, sink: &Path| {
        let mut c = Command::new("ssh");
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .arg("-i")
            .arg(&remote.sshd.identity)
            .args(["-p", &remote.sshd.port.to_string(), "root@127.0.0.1"])
            .arg(remote_cmd)
            .stdout(fs::File::create(sink).unwrap());
        let t = std::time::Instant::now();
        let st = c.status().unwrap();
        assert!(st.success(), "ssh {remote_cmd}: {st}");
        t.elapsed().as_secs_f64()
    };
    let sink = env.path("ssh-cat.out");
    let mut cat_times = Vec::new();
    let mut setup_times = Vec::new();
    let mut hatch_times = Vec::new();
    let mut build_times = Vec::new();
    let mut session_times = Vec::new();
    // Each timed command writes 512 MiB: flush the previous one's dirty
    // pages first (sync), so neither side pays for the other's writeback.
    for round in 0..rounds {
        nix::unistd::sync();
        setup_times.push(ssh("true", &env.path("ssh-true.out")));
        cat_times.push(ssh(&format!("cat {}", data.display()), &sink));
        assert_eq!(fs::metadata(&sink).unwrap().len(), mib << 20);
        fs::remove_file(&sink).unwrap();
        let e = expr(
            &env,
            &format!("bench{round}.nix"),
            &format!(
                "{{ d = {}; }}",
                remote_drv(
                    &format!("ssh-bench-{round}"),
                    &format!("ln {} $out", data.display())
                )
            ),
        );
        nix::unistd::sync();
        let out = env.nix_build(&e, &["d"], &[]);
        out.assert_ok();
        let p = out.store_paths()[0].clone();
        build_times.push(out.elapsed.as_secs_f64());
        let log = nix_log(&p).stdout;
        let line = log
            .lines()
            .find(|l| l.contains("bytes of outputs in"))
            .unwrap_or_else(|| panic!("no transfer line in the log:\n{log}"))
            .to_owned();
        let num_after = |marker: &str| -> f64 {
            line.split(marker)
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("cannot parse {line:?}"))
        };
        let secs = num_after("bytes of outputs in ");
        session_times.push(num_after("digest verified; "));
        hatch_times.push(secs);
        let _ = run(
            nix_cmd("nix-store").args(["--delete", &p]),
            Duration::from_secs(120),
        );
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let mibs = mib as f64;
    let (cat, setup, hatch, session) = (
        best(&cat_times),
        best(&setup_times),
        best(&hatch_times),
        best(&session_times),
    );
    println!("bench-ssh: {mib} MiB, {rounds} rounds (best of each)");
    println!("bench-ssh: ssh cat (whole command)           {cat:.3} s  {:7.1} MiB/s  all: {cat_times:.3?}", mibs / cat);
    println!("bench-ssh: ssh true (connection setup)       {setup:.3} s");
    println!("bench-ssh: nix-hatch connect..verified        {session:.3} s  {:7.1} MiB/s  all: {session_times:.3?}", mibs / session);
    println!("bench-ssh: nix-hatch data phase              {hatch:.3} s  {:7.1} MiB/s  all: {hatch_times:.3?}", mibs / hatch);
    println!("bench-ssh: nix-hatch whole nix-build         {:.3} s  (eval, connect, transfer, NAR hash, register)", best(&build_times));
    println!(
        "bench-ssh: ratio whole   (ssh cat / nix-hatch connect..verified)     {:.2}",
        cat / session
    );
    println!(
        "bench-ssh: ratio transfer ((ssh cat - ssh true) / nix-hatch data phase) {:.2}",
        (cat - setup).max(1e-6) / hatch
    );
}

/// Benchmark (`scripts/bench ssh-vs-nix-remote`): one derivation whose
/// output is 512 MiB of random data in 4 files, built on the far side and
/// brought back, whole `nix-build` each (evaluation, connection set-up,
/// build, transfer, registration): through the ssh executor vs through
/// Nix's own build-remote over `ssh-ng://` to a `nix-daemon --stdio` with a
/// store of its own (a chroot store under the test dir), behind the same
/// loopback sshd. Both build scripts are the same busybox commands. Prints
/// best and median of each; asserts nothing about speed.
#[test]
#[ignore = "benchmark: run with scripts/bench ssh-vs-nix-remote"]
fn bench_vs_nix_remote_512mib() {
    let (mib, rounds) = bench_size_and_rounds();
    let env = TestEnv::new("ssh-vs-nix");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    // The far side's Nix: its own store, the settings an offline builder
    // has in its nix.conf (no substituters).
    let far = env.path("far");
    fs::create_dir_all(&far).unwrap();
    let far_store = format!("local?root={}", far.display());
    let daemon = env.write_script(
        "far-nix-daemon",
        "#!/bin/sh\nexec nix-daemon --option substituters '' \"$@\"\n",
    );
    let host_key = run(
        Command::new("base64")
            .arg("-w0")
            .arg(remote.sshd.dir.join("host_key.pub")),
        Duration::from_secs(10),
    );
    host_key.assert_ok();
    let builders = format!(
        "ssh-ng://root@127.0.0.1?remote-store={far_store}&remote-program={} x86_64-linux {} 1 1 - - {}",
        daemon.display(),
        remote.sshd.identity.display(),
        host_key.stdout.trim()
    );
    // 4 files of random bytes: the same busybox commands on both sides.
    let part = (mib << 20) / 4;
    let script = format!(
        "${{bb}}/bin/busybox mkdir $out && for i in 1 2 3 4; do ${{bb}}/bin/busybox head -c {part} /dev/urandom > $out/$i || exit 1; done"
    );
    let mut ours = Vec::new();
    let mut nix = Vec::new();
    for round in 0..rounds {
        let e = expr(
            &env,
            &format!("round{round}.nix"),
            &format!(
                "{{ ours = escape {{ name = \"ssh-vs-nix-ours-{round}\"; feature = \"{SSH_FEATURE}\"; script = ''{script}''; }};\n  \
                 nix = plain {{ name = \"ssh-vs-nix-nix-{round}\"; script = ''{script}''; }}; }}"
            ),
        );
        nix::unistd::sync();
        let out = env.nix_build(&e, &["ours"], &[]);
        out.assert_ok();
        ours.push(out.elapsed.as_secs_f64());
        let p = out.store_paths()[0].clone();
        assert_eq!(fs::metadata(format!("{p}/4")).unwrap().len(), part, "{p}/4");
        let _ = run(
            nix_cmd("nix-store").args(["--delete", &p]),
            Duration::from_secs(120),
        );

        nix::unistd::sync();
        let mut c = nix_cmd("nix-build");
        c.args(["--no-out-link", "--option", "substituters", ""])
            .args(["--option", "builders", &builders])
            .args(["--option", "max-jobs", "0"])
            .arg(&e)
            .args(["-A", "nix"])
            .env(
                "NIX_SSHOPTS",
                format!(
                    "-p {} -o UserKnownHostsFile={} -o BatchMode=yes",
                    remote.sshd.port,
                    remote.sshd.known_hosts().display()
                ),
            );
        let out = run(&mut c, NIX_LIMIT);
        out.assert_ok();
        out.assert_stderr_contains("on 'ssh-ng://root@127.0.0.1");
        nix.push(out.elapsed.as_secs_f64());
        let p = out.store_paths()[0].clone();
        assert_eq!(fs::metadata(format!("{p}/4")).unwrap().len(), part, "{p}/4");
        // It was built in the far store and copied back.
        assert!(
            far.join(p.trim_start_matches('/')).exists(),
            "{p} not built in {far_store}"
        );
        for store in ["", &far_store] {
            let mut c = nix_cmd("nix-store");
            if !store.is_empty() {
                c.args(["--store", store]);
            }
            let _ = run(c.args(["--delete", &p]), Duration::from_secs(120));
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("bench-ssh-nix: {mib} MiB in 4 files, {rounds} rounds");
    println!(
        "bench-ssh-nix: nix-hatch ssh executor   best {:.3} s  median {:.3} s  all: {ours:.3?}",
        best(&ours),
        median(&ours)
    );
    println!(
        "bench-ssh-nix: Nix build-remote ssh-ng  best {:.3} s  median {:.3} s  all: {nix:.3?}",
        best(&nix),
        median(&nix)
    );
    println!(
        "bench-ssh-nix: ratio (nix-hatch / Nix, best) {:.2}",
        best(&ours) / best(&nix)
    );
}

/// The agent on its own (no sshd), as an unprivileged account: no pid
/// namespace, so its process group, death signal and subreaper must do.
/// A finished build streams log, tar and a trailer whose digest covers
/// everything before it; a build whose stdin ends is killed with whatever it
/// left in the background, and the temp dir goes.
#[test]
fn agent_as_non_root_streams_and_dies_with_its_stdin() {
    use nix_hatch::protocol::hatch::{self, Request, Status, Trailer};
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let dir = tempfile::Builder::new()
        .prefix("nhtest-agent-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
    let start = |script: &str| {
        let mut child = Command::new(CLI)
            .arg("agent")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("TMPDIR", &tmp)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let req = Request {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                script.as_bytes().to_vec(),
            ],
            env: vec![(b"GREETING".to_vec(), b"hello".to_vec())],
            outputs: vec!["out".into()],
            timeout: 0,
            max_silent: 0,
            limits: None,
        }
        .encode();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&hatch::header(hatch::TAG_REQUEST, req.len()))
            .unwrap();
        stdin.write_all(&req).unwrap();
        (child, stdin)
    };
    // Reads one frame: (tag, header, payload).
    let frame = |r: &mut dyn Read| {
        let mut hdr = [0u8; hatch::HEADER_LEN];
        let mut r = r;
        let (tag, len) = hatch::read_header(&mut r, &mut hdr).unwrap();
        let mut p = Vec::new();
        hatch::read_payload(&mut r, len, &mut p).unwrap();
        (tag, hdr, p)
    };

    // A build that succeeds.
    let (mut child, stdin) =
        start("echo \"$GREETING from $(id -u)\"; mkdir $out; echo hi > $out/f");
    let mut out = child.stdout.take().unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    let (mut log, mut tar) = (Vec::new(), Vec::new());
    let trailer = loop {
        let (tag, hdr, p) = frame(&mut out);
        if tag == hatch::TAG_TRAILER {
            break Trailer::decode(&p).unwrap();
        }
        hasher.update(&hdr);
        hasher.update(&p);
        bytes += (hdr.len() + p.len()) as u64;
        match tag {
            hatch::TAG_LOG => log.extend_from_slice(&p),
            hatch::TAG_DATA => tar.extend_from_slice(&p),
            hatch::TAG_HELLO => {}
            t => panic!("unexpected frame {t}"),
        }
    };
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(String::from_utf8_lossy(&log), "hello from 65534\n");
    assert_eq!(trailer.status, Status::Exited(0));
    assert_eq!(trailer.stream_bytes, bytes);
    assert_eq!(&trailer.digest, hasher.finalize().as_bytes());
    assert_eq!(trailer.tar_bytes, tar.len() as u64);
    let mut ar = tar::Archive::new(&tar[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["out", "out/f"]);
    assert!(wait_until(Duration::from_secs(10), || fs::read_dir(&tmp)
        .unwrap()
        .count()
        == 0));

    // A build whose executor goes away.
    let (mut child, stdin) = start("sleep 300 & setsid sleep 301 & echo started; sleep 302");
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("started") {
        let (tag, _, p) = frame(&mut out);
        if tag == hatch::TAG_LOG {
            seen.extend_from_slice(&p);
        }
    }
    let needle = tmp.to_string_lossy().into_owned();
    assert!(!processes_with_env(&needle).is_empty());
    drop(stdin);
    assert!(wait_until(Duration::from_secs(20), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    let clean = wait_until(Duration::from_secs(20), || {
        processes_with_env(&needle).is_empty() && fs::read_dir(&tmp).unwrap().count() == 0
    });
    assert!(
        clean,
        "left behind: {:?} {:?}",
        processes_with_env(&needle),
        fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    );
}

/// Paths and symlink targets over 100 bytes: the agent sends GNU long name
/// and long link entries, which the executor reads itself (bounded).
#[test]
fn long_names_and_link_targets_come_back() {
    let env = TestEnv::new("ssh-long");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let dir = "d".repeat(120);
    let file = "f".repeat(200);
    let target = format!("{}/{}", "t".repeat(150), "u".repeat(150));
    let e = expr(
        &env,
        "long.nix",
        &format!(
            "{{ d = {}; }}",
            remote_drv(
                "ssh-long",
                &format!(
                    "mkdir -p $out/{dir}; echo deep > $out/{dir}/{file}; ln -s {target} $out/{dir}/l{file}"
                ),
            )
        ),
    );
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_ok();
    let p = out.store_paths()[0].clone();
    assert_eq!(
        fs::read_to_string(format!("{p}/{dir}/{file}")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        fs::read_link(format!("{p}/{dir}/l{file}")).unwrap(),
        PathBuf::from(&target)
    );
    remote.assert_clean();
}

/// A hostile far side that answers with a valid `Hello` and then never
/// stops sending: one-byte `Data` frames as fast as it can, or an endless
/// stderr. The hook's reads then never block; `timeout` and SIGTERM must
/// still end the build promptly (they used to wait for a pause that never
/// came).
#[test]
fn endless_stream_cannot_outrun_timeout_or_sigterm() {
    for (case, flood) in [
        ("timeout-data", "data"),
        ("timeout-stderr", "stderr"),
        ("sigterm-data", "data"),
    ] {
        let env = TestEnv::new(&format!("ssh-{case}"));
        let remote = Remote::start(&env);
        let started = env.path("started");
        let fake = env.write_script(
            "fake-agent.sh",
            &format!(
                "#!/bin/sh\nexport TMPDIR={tmp}\n: > {started}\nexec perl -e '{perl}' {tmp}/fake {flood}\n",
                tmp = remote.tmp.display(),
                started = started.display(),
                perl = r#"
binmode STDIN; binmode STDOUT; binmode STDERR;
my ($t, $flood) = @ARGV;
# The request first, as the real agent reads it before it answers.
my ($h, $b, $got) = ("", "", 0);
sysread(STDIN, $h, 5) == 5 or exit 1;
my $n = unpack("V", substr($h, 1, 4));
while ($got < $n) { my $r = sysread(STDIN, $b, $n - $got) or exit 1; $got += $r; }
my $hello = pack("Q<", 1) . pack("Q<", length $t) . $t . ("\0" x ((8 - length($t) % 8) % 8));
syswrite(STDOUT, "H" . pack("V", length $hello) . $hello);
my ($fh, $chunk) = $flood eq "stderr"
    ? (\*STDERR, "x" x 65536)
    : (\*STDOUT, ("D" . pack("V", 1) . "a") x 10000);
while (1) { defined(syswrite($fh, $chunk)) or exit 0; }
"#,
            ),
        );
        remote.good_config(&env, &fake);
        if case.starts_with("timeout") {
            let text = fs::read_to_string(env.config_path())
                .unwrap()
                .replace("timeout = 120", "timeout = 2");
            env.write_config(&text);
        }
        let e = expr(
            &env,
            "flood.nix",
            &format!(
                "{{ d = {}; }}",
                remote_drv(&format!("ssh-{case}"), "echo x > $out")
            ),
        );
        let out_path = env.out_path(&e, "d");
        let env_ref = &env;
        let out = std::thread::scope(|s| {
            let build = s.spawn(move || env_ref.nix_build(&e, &["d"], &[]));
            assert!(
                wait_until(Duration::from_secs(60), || started.exists()),
                "{case}: the fake agent never started"
            );
            if case.starts_with("sigterm") {
                // Well into the flood.
                std::thread::sleep(Duration::from_secs(2));
                let hooks = hooks_of(&env);
                assert!(!hooks.is_empty(), "{case}: no hook process found");
                for h in hooks {
                    let _ = Command::new("kill")
                        .args(["-TERM", &h.to_string()])
                        .status();
                }
            }
            build.join().unwrap()
        });
        out.assert_failed();
        // timeout 2 s + 15 s of grace, or SIGTERM at once.
        assert!(
            out.elapsed < Duration::from_secs(60),
            "{case}: the hook did not stop:\n{}",
            out.describe()
        );
        if case.starts_with("timeout") {
            out.assert_stderr_contains("timed out after 2 seconds");
        }
        assert_nothing_registered(&env, &out_path);
        remote.assert_clean();
    }
}

/// An output whose name would replace one of the command's own variables
/// (`PATH` here; `LD_PRELOAD`, `BASH_ENV`... alike) is refused before
/// anything runs on the far side.
#[test]
fn output_names_that_clobber_variables_are_refused() {
    let env = TestEnv::new("ssh-outnames");
    let remote = Remote::start(&env);
    let agent = remote.agent(&env, "agent.sh", "");
    remote.good_config(&env, &agent);
    let ran = env.path("command-ran");
    let e = expr(
        &env,
        "outnames.nix",
        &format!(
            "{{ d = escape {{ name = \"ssh-outnames\"; feature = \"{SSH_FEATURE}\"; attrs = {{ outputs = [ \"out\" \"PATH\" ]; }}; script = {}; }}; }}",
            nix_str(&format!(": > {}; echo x > $out; echo y > $PATH", ran.display()))
        ),
    );
    let out_path = env.out_path(&e, "d");
    let out = env.nix_build(&e, &["d"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("output \"PATH\" cannot be an environment variable");
    assert!(!ran.exists(), "the command ran");
    assert_nothing_registered(&env, &out_path);
    remote.assert_clean();
}

/// Runs `nix-hatch agent` directly (no sshd) with `req`; returns its frames
/// (tag, payload) up to the end of its output.
fn agent_frames(tmp: &Path, req: &nix_hatch::protocol::hatch::Request) -> Vec<(u8, Vec<u8>)> {
    use nix_hatch::protocol::hatch;
    use std::io::Write;
    let mut child = Command::new(CLI)
        .arg("agent")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let payload = req.encode();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&hatch::header(hatch::TAG_REQUEST, payload.len()))
        .unwrap();
    stdin.write_all(&payload).unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut frames = Vec::new();
    loop {
        let mut hdr = [0u8; hatch::HEADER_LEN];
        let Ok((tag, len)) = hatch::read_header(&mut out, &mut hdr) else {
            break;
        };
        let mut p = Vec::new();
        hatch::read_payload(&mut out, len, &mut p).unwrap();
        let end = tag == hatch::TAG_TRAILER || tag == hatch::TAG_ERROR;
        frames.push((tag, p));
        if end {
            break;
        }
    }
    drop(stdin);
    let _ = child.wait();
    frames
}

/// The agent on its own: a request with any 64-bit limits builds (no
/// `Instant` overflow panic), its own variables beat the request's, and
/// output names that would replace a variable are refused with an error
/// frame before the command runs.
#[test]
fn agent_takes_huge_limits_and_refuses_clobbering_outputs() {
    use nix_hatch::protocol::hatch::{self, Request, Status, Trailer};
    let dir = tempfile::Builder::new()
        .prefix("nhtest-agent-limits-")
        .tempdir()
        .unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let ran = dir.path().join("ran");
    let req = |outputs: &[&str]| Request {
        argv: vec![
            b"/bin/sh".to_vec(),
            b"-c".to_vec(),
            format!(
                "touch {}; echo \"path=$PATH tmp=$TMPDIR\"; echo x > $out",
                ran.display()
            )
            .into_bytes(),
        ],
        env: vec![
            (b"PATH".to_vec(), b"/evil/bin".to_vec()),
            (b"TMPDIR".to_vec(), b"/evil/tmp".to_vec()),
        ],
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        timeout: u64::MAX,
        max_silent: i64::MAX as u64,
        limits: None,
    };
    let frames = agent_frames(&tmp, &req(&["out"]));
    let log: Vec<u8> = frames
        .iter()
        .filter(|(t, _)| *t == hatch::TAG_LOG)
        .flat_map(|(_, p)| p.clone())
        .collect();
    let log = String::from_utf8_lossy(&log).into_owned();
    let (tag, last) = frames.last().expect("no frames");
    assert_eq!(
        *tag,
        hatch::TAG_TRAILER,
        "{log} {:?}",
        String::from_utf8_lossy(last)
    );
    assert_eq!(Trailer::decode(last).unwrap().status, Status::Exited(0));
    assert!(log.contains("path=/usr/bin:/bin tmp="), "{log}");
    assert!(!log.contains("/evil"), "{log}");
    assert!(ran.exists());
    fs::remove_file(&ran).unwrap();

    for bad in ["LD_PRELOAD", "BASH_ENV", "PATH", "TMPDIR", "IFS"] {
        let frames = agent_frames(&tmp, &req(&["out", bad]));
        let (tag, p) = frames.last().expect("no frames");
        let msg = String::from_utf8_lossy(p);
        assert_eq!(*tag, hatch::TAG_ERROR, "{bad}: {msg}");
        assert!(
            msg.contains(&format!("output {bad:?} cannot be an environment variable")),
            "{bad}: {msg}"
        );
        assert!(!ran.exists(), "{bad}: the command ran");
    }
    assert!(wait_until(Duration::from_secs(10), || fs::read_dir(&tmp)
        .unwrap()
        .count()
        == 0));
}
