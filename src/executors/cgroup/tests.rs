//! The cgroup code against fake cgroup trees (plain directories laid out
//! as the kernel shows them): where builds go, what is written where, and
//! what is swept. The real kernel's side is in tests/limits_e2e.rs.

use super::*;
use std::fs;

fn limits(parent: Option<&str>) -> ResourceLimits {
    ResourceLimits {
        memory_max: Some(64 << 20),
        tasks_max: Some(32),
        cpu_max: Some(0.5),
        cgroup_parent: parent.map(str::to_owned),
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A cgroup v2 tree at `root` with controllers `cs` offered at its top,
/// and a process in `own`.
fn v2(root: &Path, cs: &str, own: &str) -> Cgroups {
    fs::write(root.join("cgroup.controllers"), cs).unwrap();
    let m = format!("30 23 0:27 / {} rw - cgroup2 cgroup2 rw\n", root.display());
    Cgroups::parse(&m, &format!("0::{own}\n"))
}

/// A directory of the fake v2 tree offering `cs`, with `enabled` for its
/// children.
fn v2_dir(dir: &Path, cs: &str, enabled: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("cgroup.controllers"), cs).unwrap();
    fs::write(dir.join("cgroup.subtree_control"), enabled).unwrap();
}

#[test]
fn v2_builds_go_beside_the_hooks_cgroup() {
    let t = tempfile::tempdir().unwrap();
    let cg = v2(
        t.path(),
        "cpuset cpu io memory pids",
        "/system.slice/nix-daemon.service/supervisor",
    );
    let plan = Plan::new(&cg, &limits(None)).unwrap();
    let container = t.path().join("system.slice/nix-daemon.service/nix-hatch");
    assert_eq!(
        plan.containers().collect::<Vec<_>>(),
        vec![container.as_path()]
    );
    assert_eq!(
        plan.describe(),
        format!("cgroup v2 in {} (memory, pids, cpu)", container.display())
    );
    // The hook at the top (a container, the test VM): builds below it.
    let top = Plan::new(&v2(t.path(), "memory pids cpu", "/"), &limits(None)).unwrap();
    assert_eq!(
        top.containers().collect::<Vec<_>>(),
        vec![t.path().join("nix-hatch").as_path()]
    );
    // cgroup-parent wins.
    let set = Plan::new(&cg, &limits(Some("/builds/x"))).unwrap();
    assert_eq!(
        set.containers().collect::<Vec<_>>(),
        vec![t.path().join("builds/x/nix-hatch").as_path()]
    );
}

#[test]
fn v2_build_cgroup_gets_its_limits() {
    let t = tempfile::tempdir().unwrap();
    let cg = v2(t.path(), "cpu memory pids", "/hook");
    let container = t.path().join(CONTAINER);
    v2_dir(&container, "cpu memory pids", "cpu memory pids");
    let plan = Plan::new(&cg, &limits(None)).unwrap();
    let build = plan.create("abc-x.42", &limits(None)).unwrap();
    let dir = container.join("abc-x.42");
    assert_eq!(build.dirs().collect::<Vec<_>>(), vec![dir.as_path()]);
    assert_eq!(read(&dir.join("memory.max")), "67108864");
    assert_eq!(read(&dir.join("pids.max")), "32");
    assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
    assert!(dir.join("cgroup.procs").exists());
    fs::write(dir.join("memory.events"), "max 3\noom 1\noom_kill 1\n").unwrap();
    fs::write(dir.join("memory.peak"), "67108864\n").unwrap();
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 250000\nthrottled_usec 100\n",
    )
    .unwrap();
    let r = build.read();
    assert_eq!(r.oom_kills, Some(1));
    assert_eq!(r.peak_memory, Some(64 << 20));
    assert_eq!(r.cpu, Some(Duration::from_millis(250)));
    for bad in ["", "a/b", ".hidden"] {
        assert!(plan.create(bad, &limits(None)).is_err(), "{bad:?}");
    }
}

#[test]
fn v2_controllers_are_enabled_from_the_deepest_existing_cgroup() {
    let t = tempfile::tempdir().unwrap();
    let cg = v2(t.path(), "cpu memory pids", "/");
    let parent = t.path().join("delegated");
    v2_dir(&parent, "cpu memory pids", "");
    // Only tasks-max: pids is required, memory is for the accounting.
    let l = ResourceLimits {
        tasks_max: Some(64),
        cgroup_parent: Some("/delegated".into()),
        ..ResourceLimits::default()
    };
    let plan = Plan::new(&cg, &l).unwrap();
    // The fake kernel does not make the new container's files: enabling
    // below it fails, but the parent was asked for the controllers first.
    let err = plan.create("b.1", &l).unwrap_err();
    assert!(
        err.contains("the pids controller is not available in") && err.contains("nix-hatch"),
        "{err}"
    );
    assert_eq!(read(&parent.join("cgroup.subtree_control")), "+memory");
}

#[test]
fn a_missing_controller_is_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    // A v2 tree whose top offers no pids controller.
    let cg = v2(t.path(), "cpu memory", "/");
    let err = Plan::new(&cg, &limits(None)).unwrap_err();
    assert!(
        err.starts_with("no cgroup hierarchy here has the pids controller (cgroup v2 ("),
        "{err}"
    );
    let container = t.path().join("p").join(CONTAINER);
    v2_dir(&container, "cpu memory", "cpu memory");
    let l = ResourceLimits {
        tasks_max: Some(64),
        cgroup_parent: Some("/p".into()),
        ..ResourceLimits::default()
    };
    // Offered at the top but not passed down to the container.
    let cg = v2(t.path(), "cpu memory pids", "/");
    let err = Plan::new(&cg, &l).unwrap().create("b.1", &l).unwrap_err();
    assert!(
        err.contains("the pids controller is not available in"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    // Nothing at all mounted.
    let none = Cgroups::parse("", "");
    let err = Plan::new(&none, &limits(None)).unwrap_err();
    assert!(err.contains("no cgroup file system mounted"), "{err}");
    assert!(Plan::new(&none, &ResourceLimits::default()).is_err());
}

/// v1 as on this project's Debian machines: a hierarchy per controller.
fn v1(root: &Path, own_memory: &str) -> Cgroups {
    let mut m = String::new();
    for (i, c) in ["cpu", "cpuacct", "memory", "pids"].iter().enumerate() {
        let dir = root.join(c);
        fs::create_dir_all(&dir).unwrap();
        m.push_str(&format!(
            "{} 31 0:{} / {} rw - cgroup cgroup rw,{c}\n",
            40 + i,
            30 + i,
            dir.display()
        ));
    }
    Cgroups::parse(
        &m,
        &format!("8:pids:/\n4:memory:{own_memory}\n2:cpuacct:/\n1:cpu:/\n"),
    )
}

#[test]
fn v1_gets_a_cgroup_per_hierarchy() {
    let t = tempfile::tempdir().unwrap();
    let cg = v1(t.path(), "/sessions/s1");
    let plan = Plan::new(&cg, &limits(None)).unwrap();
    let containers: Vec<PathBuf> = plan.containers().map(Path::to_path_buf).collect();
    // Beside the hook's cgroup in each hierarchy; CPU time from cpuacct.
    assert_eq!(
        containers,
        vec![
            t.path().join("memory/sessions/nix-hatch"),
            t.path().join("pids/nix-hatch"),
            t.path().join("cpu/nix-hatch"),
            t.path().join("cpuacct/nix-hatch"),
        ]
    );
    let l = limits(Some("/nhtest"));
    let build = Plan::new(&cg, &l).unwrap().create("b.7", &l).unwrap();
    let at = |c: &str, f: &str| read(&t.path().join(c).join("nhtest/nix-hatch/b.7").join(f));
    assert_eq!(at("memory", "memory.limit_in_bytes"), "67108864");
    assert_eq!(at("pids", "pids.max"), "32");
    assert_eq!(at("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(build.dirs().count(), 4);
    // Without limits: only the accounting (memory, cpuacct).
    let acct = ResourceLimits {
        cgroup_parent: Some("/nhtest".into()),
        ..ResourceLimits::default()
    };
    let plan = Plan::new(&cg, &acct).unwrap();
    assert_eq!(
        plan.describe(),
        format!(
            "cgroup v1: memory in {}, cpuacct in {}",
            t.path().join("memory/nhtest/nix-hatch").display(),
            t.path().join("cpuacct/nhtest/nix-hatch").display()
        )
    );
}

#[test]
fn sweep_removes_what_dead_builds_left() {
    let t = tempfile::tempdir().unwrap();
    let cg = v1(t.path(), "/");
    let l = limits(Some("/nhtest"));
    let plan = Plan::new(&cg, &l).unwrap();
    let mem = t.path().join("memory/nhtest/nix-hatch");
    for n in ["live.1", "dead.2", "other.3"] {
        fs::create_dir_all(mem.join(n)).unwrap();
    }
    let removed = plan.sweep(|name| match name {
        "live.1" => Liveness::Live,
        "dead.2" => Liveness::Dead,
        _ => Liveness::Unknown,
    });
    assert_eq!(removed, 1);
    assert!(mem.join("live.1").exists());
    assert!(!mem.join("dead.2").exists());
    // Unknown and young: could be another hook's, just made.
    assert!(mem.join("other.3").exists());
}
