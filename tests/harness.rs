//! Self-tests of the end-to-end harness (tests/common): they need Nix but not
//! nix-hatch, so a failure here is a broken machine or harness, not a broken
//! hook.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[test]
fn busybox_store_path_is_stable_and_runs_as_builder() {
    let bb = busybox();
    assert!(is_valid(bb), "{bb} not valid");
    assert!(fs::metadata(format!("{bb}/bin/busybox")).unwrap().is_file());
    let env = TestEnv::new("harness-bb");
    let expr = env.write_expr(
        "plain.nix",
        r#"plain { name = "harness-plain"; script = "echo $nonce > $out; echo PATH=$PATH >> $out"; }"#,
    );
    let out = env.nix_build_without_hook(&expr, &[], &[]);
    out.assert_ok();
    let paths = out.store_paths();
    assert_eq!(paths.len(), 1, "{}", out.describe());
    assert_eq!(
        fs::read_to_string(&paths[0]).unwrap(),
        format!("{}\nPATH=/path-not-set\n", env.nonce)
    );
    assert!(is_valid(&paths[0]));
    // busybox is an input, not embedded: no references
    assert!(references(&paths[0]).is_empty());
    let log = nix_log(&paths[0]);
    log.assert_ok();
}

#[test]
fn private_daemon_serves_clients_and_stops() {
    let env = TestEnv::new("harness-daemon");
    let pid;
    {
        let d = Daemon::start(&env, None);
        pid = d.pid();
        assert!(pid_alive(pid));
        d.assert_used_by_clients(&env);
    }
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !pid_alive(pid)),
        "daemon {pid} still running after drop"
    );
}

#[test]
fn strip_ansi_and_quoting() {
    assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
    assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    assert_eq!(nix_str("a$b\"c"), r#""a\$b\"c""#);
}

/// Under `scripts/vm run` (it sets `NIX_HATCH_TEST_VM=1`): the VM is the
/// machine the cgroup-v2 runs of the suites are promised — cgroup2 at
/// /sys/fs/cgroup and no v1 hierarchy; the test in a cgroup shaped as
/// systemd's `Delegate=yes` + `DelegateSubgroup=supervisor` (its parent
/// offers the memory, pids, cpu and io controllers, holds no process and
/// has none enabled yet: what nix-hatch finds on NixOS); once enabled
/// there, a cgroup beside the test's own has them and the kernel enforces
/// them; and the Nix is the one the runner announces. Elsewhere there is
/// nothing to check.
#[test]
fn vm_is_a_cgroup2_machine_with_the_announced_nix() {
    if std::env::var_os("NIX_HATCH_TEST_VM").is_none() {
        return;
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            Some((pre.split(' ').nth(4)?, post.split(' ').next()?))
        })
        .collect();
    assert!(
        mounts.contains(&("/sys/fs/cgroup", "cgroup2")),
        "/sys/fs/cgroup is not cgroup2:\n{mountinfo}"
    );
    assert!(
        !mounts.iter().any(|(_, fstype)| *fstype == "cgroup"),
        "a cgroup v1 hierarchy is mounted:\n{mountinfo}"
    );
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own_path = own
        .trim()
        .strip_prefix("0::/")
        .unwrap_or_else(|| panic!("not (only) in a v2 cgroup: {own}"));
    let parent = Path::new("/sys/fs/cgroup").join(Path::new(own_path).parent().unwrap());
    assert_ne!(parent, Path::new("/sys/fs/cgroup"), "{own}");
    let offered = fs::read_to_string(parent.join("cgroup.controllers")).unwrap();
    let wanted = ["memory", "pids", "cpu", "io"];
    for controller in wanted {
        assert!(
            offered.split_whitespace().any(|c| c == controller),
            "{controller} not offered in {}: {offered}",
            parent.display()
        );
    }
    let control = parent.join("cgroup.subtree_control");
    assert_eq!(fs::read_to_string(&control).unwrap().trim(), "");
    assert_eq!(fs::read_to_string(parent.join("cgroup.procs")).unwrap(), "");
    let plus: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
    fs::write(&control, plus.join(" ")).unwrap();

    let beside = Cgroup::create(parent.join(format!("nhtest-vm-{}", nonce())));
    for file in ["memory.max", "memory.peak", "pids.max", "cpu.max", "io.max"] {
        assert!(
            beside.0.join(file).exists(),
            "no {file} in {}",
            beside.0.display()
        );
    }
    fs::write(beside.0.join("pids.max"), "1").unwrap();
    let procs = beside.0.join("cgroup.procs");
    let out = run(
        Command::new("/bin/sh").args([
            "-c",
            r#"echo $$ > "$1" || exit 9; (echo forked)"#,
            "sh",
            procs.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
    assert!(
        !out.success() && !out.stdout.contains("forked"),
        "a process could fork in a cgroup with pids.max = 1:\n{}",
        out.describe()
    );

    let want = std::env::var("NIX_HATCH_TEST_NIX").expect("scripts/vm sets NIX_HATCH_TEST_NIX");
    check_nix_under_test();
    assert!(
        nix_version().starts_with(&format!("{want}.")),
        "{}",
        nix_version()
    );
}

/// A cgroup, removed when dropped (once its processes are gone).
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(path: PathBuf) -> Cgroup {
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}
