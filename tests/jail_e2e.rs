//! The `jail` executor as a security boundary: each test is a real escape
//! build through the hook whose builder probes the jail and records what it
//! could do in `$out`; a probe that succeeds where it must fail fails the
//! test.

mod common;

use common::*;
use std::collections::BTreeSet;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const JAIL_FEATURE: &str = "escape-j";

/// A jail executor (as `nobody`), plus `extra` lines in its table.
fn jail_config(env: &TestEnv, extra: &str) {
    write_jail_config(env, "nobody", extra);
}

fn expr(env: &TestEnv, name: &str, body: &str) -> std::path::PathBuf {
    jail_expr(env, name, body)
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

fn lines(text: &str) -> BTreeSet<String> {
    text.lines().map(str::to_owned).collect()
}

#[test]
fn host_secrets_are_invisible_and_the_store_holds_only_the_closure() {
    let env = TestEnv::new("jail-fs");
    jail_config(&env, "");
    let e = expr(
        &env,
        "fs.nix",
        r#"rec {
  dep = plain { name = "jail-dep"; script = "echo dep > $out"; };
  # An input that is a symlink to / must not bring the host's / along.
  root = plain { name = "jail-root-link"; script = "${bb}/bin/busybox ln -s / $out"; };
  probe = jailed { name = "jail-fs"; attrs = { inherit dep root; }; script = ''
    mkdir $out
    for p in /etc/shadow /root /home /var/lib /var/log @DIR@/config.toml $root/etc/shadow $root/root $root/var/lib; do
      if ls $p >/dev/null 2>&1 || cat $p >/dev/null 2>&1; then echo "$p readable"; else echo "$p hidden"; fi
    done > $out/probes
    ls /nix/store > $out/store
  ''; };
}"#,
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_ok();
    let p = out.store_paths()[0].clone();
    let probes = read(format!("{p}/probes"));
    let root = env.out_path(&e, "root");
    let via_link = [
        format!("{root}/etc/shadow"),
        format!("{root}/root"),
        format!("{root}/var/lib"),
    ];
    for path in ["/etc/shadow", "/root", "/home", "/var/lib", "/var/log"]
        .into_iter()
        .chain(via_link.iter().map(String::as_str))
    {
        assert!(
            probes.contains(&format!("{path} hidden")),
            "{path}: {probes}"
        );
    }
    assert!(!probes.contains("readable"), "{probes}");
    // Exactly the input closure (busybox, dep) plus the output.
    let dep = env.out_path(&e, "dep");
    let want: BTreeSet<String> = [busybox(), dep.as_str(), root.as_str(), p.as_str()]
        .iter()
        .map(|s| s.trim_start_matches("/nix/store/").to_owned())
        .collect();
    assert_eq!(lines(&read(format!("{p}/store"))), want);
    assert!(is_valid(&p));
}

/// A one-shot HTTP responder on 127.0.0.1 in the test (host) network.
fn serve_once() -> (u16, std::thread::JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    // Read the whole request head before answering, so the
                    // close is not a reset that loses the answer.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nreached\n");
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    return true;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    });
    (port, h)
}

fn network_probe(env: &TestEnv, port: u16) -> std::path::PathBuf {
    expr(
        env,
        "net.nix",
        &format!(
            r#"{{ probe = jailed {{ name = "jail-net"; script = ''
    if wget -q -O $TMPDIR/body http://127.0.0.1:{port}/; then echo "reached $(cat $TMPDIR/body)"; else echo unreachable; fi > $out
  ''; }}; }}"#
        ),
    )
}

#[test]
fn host_loopback_is_unreachable_without_network() {
    let env = TestEnv::new("jail-net-none");
    jail_config(&env, "");
    let (port, server) = serve_once();
    let out = env.nix_build(&network_probe(&env, port), &["probe"], &[]);
    out.assert_ok();
    assert_eq!(read(&out.store_paths()[0]), "unreachable\n");
    // Wake the server so its thread ends.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port)).map(|mut s| s.write_all(b"\r\n\r\n"));
    server.join().unwrap();
}

#[test]
fn host_network_is_reachable_and_announced() {
    let env = TestEnv::new("jail-net-host");
    jail_config(&env, "network = \"host\"\n");
    let (port, server) = serve_once();
    let e = network_probe(&env, port);
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_ok();
    assert_eq!(
        read(&out.store_paths()[0]),
        "reached reached\n",
        "{}",
        out.describe()
    );
    assert!(server.join().unwrap());
    let log = nix_log(&env.drv_path(&e, "probe"));
    assert!(log.stdout.contains("HOST NETWORK"), "{}", log.describe());
}

#[test]
fn builder_is_unprivileged_and_confined() {
    let env = TestEnv::new("jail-priv");
    // A setuid-root copy of busybox, offered to the jail.
    let suid = env.path("suid");
    fs::create_dir_all(&suid).unwrap();
    fs::copy("/bin/busybox", suid.join("busybox")).unwrap();
    fs::set_permissions(
        suid.join("busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    jail_config(
        &env,
        &format!(
            "ro-binds = [{}]\n",
            toml_str(&format!("{}:/opt/suid", suid.display()))
        ),
    );
    let e = expr(
        &env,
        "priv.nix",
        r#"{ probe = jailed { name = "jail-priv"; script = ''
    mkdir $out
    id -u > $out/uid
    /opt/suid/busybox id -u > $out/suid-uid
    for p in /etc/x /x /usr/x ${bb}/x ${bb}/bin/busybox; do
      if echo pwned >> $p 2>/dev/null; then echo "$p writable"; else echo "$p denied"; fi
    done > $out/writes
    touch $NIX_BUILD_TOP/ok && echo build-dir-writable >> $out/writes
    ls /proc | grep -c '^[0-9]' > $out/nprocs
    touch $TMPDIR/made-by-builder
    exit 1
  ''; }; }"#,
    );
    // keep-failed keeps the build dir, so the host-side owner of a file the
    // builder made can be checked (before any import canonicalises it).
    let out = env.nix_build(&e, &["probe"], &["--option", "keep-failed", "true"]);
    out.assert_failed();
    let kept = fs::read_dir(env.state_dir().join("kept"))
        .unwrap()
        .next()
        .expect("a kept build dir")
        .unwrap()
        .path();
    let made = kept.join("private/build/made-by-builder");
    let owner = fs::metadata(&made).unwrap().uid();
    assert_eq!(owner, 65534, "builder ran as uid {owner} on the host");
    let outp = kept
        .join("private/store")
        .join(env.out_path(&e, "probe").trim_start_matches("/nix/store/"));
    assert_eq!(read(outp.join("uid")), "1000\n");
    assert_eq!(
        read(outp.join("suid-uid")),
        "1000\n",
        "setuid gave privilege"
    );
    let writes = read(outp.join("writes"));
    assert!(writes.contains("build-dir-writable"), "{writes}");
    for l in writes.lines().filter(|l| l.starts_with('/')) {
        assert!(l.ends_with("denied"), "{l}");
    }
    let nprocs: u32 = read(outp.join("nprocs")).trim().parse().unwrap();
    assert!(nprocs <= 4, "jail sees {nprocs} processes");
    out.assert_stderr_contains("keeping build directory");
}

#[test]
fn configured_device_appears_unconfigured_does_not() {
    let env = TestEnv::new("jail-dev");
    let have = ["/dev/kvm", "/dev/fuse", "/dev/loop-control", "/dev/net/tun"];
    let present: Vec<&str> = have
        .iter()
        .copied()
        .filter(|d| Path::new(d).exists())
        .collect();
    assert!(present.len() >= 2, "need two host devices among {have:?}");
    let (granted, withheld) = (present[0], present[1]);
    jail_config(&env, &format!("devices = [{}]\n", toml_str(granted)));
    let e = expr(
        &env,
        "dev.nix",
        &format!(
            r#"{{ probe = jailed {{ name = "jail-dev"; script = ''
    for d in {granted} {withheld}; do if [ -e $d ]; then echo "$d present"; else echo "$d absent"; fi; done > $out
  ''; }}; }}"#
        ),
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_ok();
    assert_eq!(
        read(&out.store_paths()[0]),
        format!("{granted} present\n{withheld} absent\n")
    );
}

#[test]
fn missing_device_is_a_build_error_naming_it() {
    let env = TestEnv::new("jail-nodev");
    jail_config(&env, "devices = [\"/dev/nix-hatch-no-such-device\"]\n");
    let e = expr(
        &env,
        "nodev.nix",
        r#"{ probe = jailed { name = "jail-nodev"; script = "echo > $out"; }; }"#,
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("device /dev/nix-hatch-no-such-device does not exist");
}

/// A process the builder left running in the background is gone before
/// the outputs are hashed: it can't change them after the fact, and
/// nothing of the build is still running when nix-build returns.
#[test]
fn background_processes_end_before_the_import() {
    let env = TestEnv::new("jail-bg");
    jail_config(&env, "");
    let marker = format!("jail-bg-writer-{}", env.nonce);
    let e = expr(
        &env,
        "bg.nix",
        &format!(
            r#"{{ probe = jailed {{ name = "jail-bg"; script = ''
    mkdir $out
    sh -c 'exec >/dev/null 2>&1; while :; do echo x >> $out/f; done' {marker} &
    while [ ! -s $out/f ]; do :; done
    echo main done
  ''; }}; }}"#
        ),
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_ok();
    assert_eq!(
        processes_mentioning(&marker),
        Vec::new(),
        "a background process outlived the build"
    );
    let p = out.store_paths()[0].clone();
    run(
        nix_cmd("nix-store").args(["--verify-path", &p]),
        Duration::from_secs(60),
    )
    .assert_ok();
}

#[test]
fn timeout_leaves_no_process() {
    let env = TestEnv::new("jail-timeout");
    jail_config(&env, "");
    let mut cfg = read(env.config_path());
    cfg = cfg.replace("timeout = 120", "timeout = 2");
    env.write_config(&cfg);
    let marker = format!("jail-sleeper-{}", env.nonce);
    let e = expr(
        &env,
        "to.nix",
        &format!(
            r#"{{ probe = jailed {{ name = "jail-timeout"; script = "sh -c 'sleep 1000; :' {marker} & sh -c 'sleep 1000; :' {marker}"; }}; }}"#
        ),
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_failed();
    out.assert_stderr_contains("timed out after 2 seconds");
    // Gone by the time nix-build returns (the hook waits for them).
    assert_eq!(
        processes_mentioning(&marker),
        Vec::new(),
        "a jailed process survived the timeout"
    );
    // A later build cleans whatever the killed one left in staging.
    let staging = env.state_dir().join("staging");
    let left: Vec<_> = fs::read_dir(&staging)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging not cleaned: {left:?}");
}

#[test]
fn recursive_nix_through_the_daemon_socket() {
    let env = TestEnv::new("jail-daemon");
    let daemon = Daemon::start(&env, None);
    jail_config(
        &env,
        &format!(
            "nix-daemon = true\ndaemon-socket = {}\nro-binds = [\"/usr\", \"/lib\", \"/lib64\"]\n",
            toml_str(&daemon.socket.to_string_lossy())
        ),
    );
    let e = expr(
        &env,
        "rec.nix",
        r#"{ probe = jailed { name = "jail-recursive"; script = ''
    echo "made inside @NONCE@" > $TMPDIR/f
    /usr/bin/nix-store --add $TMPDIR/f > $out
    /usr/bin/nix-store -q --hash ${bb} >> $out
  ''; }; }"#,
    );
    let out = env.nix_build(&e, &["probe"], &[]);
    out.assert_ok();
    let text = read(&out.store_paths()[0]);
    let added = text.lines().next().unwrap().to_owned();
    assert!(
        added.starts_with("/nix/store/") && added.ends_with("-f"),
        "{text}"
    );
    assert!(is_valid(&added), "{added} not valid on the host");
    assert_eq!(read(&added), format!("made inside {}\n", env.nonce));
    assert!(
        text.lines().nth(1).unwrap().starts_with("sha256:"),
        "{text}"
    );
}

/// Builds `attr` with Nix's own sandbox (no hook), returns its NAR hashes,
/// deletes the outputs, builds again through the jail, and compares.
fn parity(env: &TestEnv, e: &Path, attr: &str) {
    let nix = env.nix_build_without_hook(
        e,
        &[attr],
        &[
            "--option",
            "sandbox",
            "true",
            "--option",
            "sandbox-paths",
            "/bin /lib /lib64 /usr",
            "--option",
            "system-features",
            JAIL_FEATURE,
        ],
    );
    nix.assert_ok();
    let drv = env.drv_path(e, attr);
    let q = run(
        nix_cmd("nix-store").args(["-q", "--outputs", &drv]),
        Duration::from_secs(30),
    );
    q.assert_ok();
    let paths: Vec<String> = q.stdout.lines().map(str::to_owned).collect();
    let hashes: Vec<String> = paths.iter().map(|p| nar_hash(p)).collect();
    let del = run(
        nix_cmd("nix-store").arg("--delete").args(&paths),
        Duration::from_secs(60),
    );
    del.assert_ok();
    let jail = env.nix_build(e, &[attr], &[]);
    jail.assert_ok();
    assert!(paths.iter().all(|p| is_valid(p)));
    let again: Vec<String> = paths.iter().map(|p| nar_hash(p)).collect();
    assert_eq!(
        hashes, again,
        "{attr}: Nix's sandbox and the jail built different bytes"
    );
}

fn nar_hash(p: &str) -> String {
    let o = run(
        nix_cmd("nix-store").args(["-q", "--hash", p]),
        Duration::from_secs(30),
    );
    o.assert_ok();
    o.stdout.trim().to_owned()
}

#[test]
fn same_bytes_as_nix_sandbox() {
    let env = TestEnv::new("jail-parity");
    jail_config(&env, "");
    let probe = r#"
      echo "top=$NIX_BUILD_TOP tmp=$TMPDIR home=$HOME path=$PATH pwd=$PWD store=$NIX_STORE"
      echo "uid=$(id -u) gid=$(id -g) host=$(hostname) cores=$NIX_BUILD_CORES"
      cat /etc/passwd /etc/group /etc/hosts
      ls -A $NIX_BUILD_TOP
    "#;
    let e = expr(
        &env,
        "parity.nix",
        &format!(
            r#"{{
  plain = jailed {{ name = "parity-plain"; script = ''{probe} > $out''; }};
  pass = jailed {{ name = "parity-pass"; attrs = {{ big = "passed as a file"; passAsFile = [ "big" ]; }};
    script = ''{{ {probe} echo "bigPath=$bigPath"; cat $bigPath; }} > $out''; }};
  structured = jailed {{ name = "parity-structured"; attrs = {{ __structuredAttrs = true; list = [ 1 "two" ]; }};
    script = ''out=$(sed -n 's/.*"outputs":{{"out":"\([^"]*\)".*/\1/p' $NIX_BUILD_TOP/.attrs.json); {{ {probe} cat $NIX_BUILD_TOP/.attrs.json; }} > $out''; }};
  multi = jailed {{ name = "parity-multi"; attrs = {{ outputs = [ "out" "dev" ]; }};
    script = ''{probe} > $out; echo "dev of $out" > $dev''; }};
}}"#
        ),
    );
    for attr in ["plain", "pass", "structured", "multi"] {
        parity(&env, &e, attr);
    }
}

/// The hook above `pid`: the outermost of the nearest chain of ancestors
/// running `exe` (the hook's namespace runner is the same binary).
fn ancestor_running(mut pid: u32, exe: &str) -> Option<u32> {
    let runs_exe = |pid: u32| {
        fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|p| p.to_string_lossy().starts_with(exe))
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name: state ppid ...
        let after = &stat[stat.rfind(')')? + 2..];
        after.split_whitespace().nth(1)?.parse().ok()
    };
    let mut found = None;
    for _ in 0..32 {
        if runs_exe(pid) {
            found = Some(pid);
        } else if found.is_some() {
            break;
        }
        pid = parent(pid)?;
    }
    found
}

#[test]
fn sigkill_of_the_hook_leaves_no_process_and_staging_is_cleaned_next_time() {
    let env = TestEnv::new("jail-sigkill");
    jail_config(&env, "");
    let marker = format!("jail-kill-{}", env.nonce);
    let e = expr(
        &env,
        "kill.nix",
        &format!(
            r#"{{
  victim = jailed {{ name = "jail-victim"; script = "sh -c 'sleep 1000; :' {marker} & sh -c 'sleep 1000; :' {marker}"; }};
  next = jailed {{ name = "jail-next"; script = "echo next > $out"; }};
}}"#
        ),
    );
    let mut cmd = env.nix_build_command(&e, &["victim"], &[]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut build = cmd.spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || processes_mentioning(&marker)
            .len()
            >= 2),
        "the jailed build never started"
    );
    let victim = processes_mentioning(&marker)[0].0;
    let hook = ancestor_running(victim, hook_exe()).expect("hook process above the jailed builder");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hook as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = build.wait().unwrap();
    assert!(
        !status.success(),
        "nix-build succeeded although its hook was killed"
    );
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&marker)
            .is_empty()),
        "jailed processes survived SIGKILL of the hook: {:?}",
        processes_mentioning(&marker)
    );
    let staging = env.state_dir().join("staging");
    let before: Vec<_> = fs::read_dir(&staging).unwrap().flatten().collect();
    assert_eq!(
        before.len(),
        1,
        "the killed build's staging dir should be left: {before:?}"
    );
    let out = env.nix_build(&e, &["next"], &[]);
    out.assert_ok();
    let after: Vec<_> = fs::read_dir(&staging).unwrap().flatten().collect();
    assert!(after.is_empty(), "stale staging not removed: {after:?}");
    assert!(!is_valid(&env.out_path(&e, "victim")));
}
