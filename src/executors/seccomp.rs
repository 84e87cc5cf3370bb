//! The jail's system call filter: Nix's sandbox filter as a floor, a little
//! stricter where Nix's can be walked around. bwrap loads it (`--seccomp
//! FD`) right before it starts the builder, under no-new-privileges.
//!
//! As in Nix (`setupSeccomp`), for the native architecture and its 32-bit
//! companions (x86 and x32 on x86_64, arm on aarch64):
//! - no setuid or setgid bit through `chmod`, `fchmod`, `fchmodat`,
//!   `fchmodat2` (EPERM);
//! - no extended attributes or ACLs: `{,l,f}{get,set,list}xattr` (ENOTSUP).
//!
//! Beyond Nix, because those rules alone leave doors open:
//! - the same bits are refused where a file is *created* with them: `open`
//!   and `openat` with `O_CREAT` or `O_TMPFILE`, `creat`, `mknod`,
//!   `mknodat` (the kernel keeps a setuid bit given at creation);
//! - `setxattrat`, `getxattrat`, `listxattrat`, `removexattrat` (Linux
//!   6.13) and the `removexattr` family are refused like the others;
//! - `openat2` and `io_uring_setup` answer ENOSYS: a filter cannot look
//!   into `openat2`'s mode, and io_uring opens files without passing
//!   through the filter at all; callers fall back to `openat` and plain
//!   system calls.

use std::path::{Path, PathBuf};

use libseccomp::ScmpSyscall;
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};

const S_ISUID: u64 = 0o4000;
const S_ISGID: u64 = 0o2000;
/// `O_CREAT` and the `O_TMPFILE` bit without `O_DIRECTORY` (the same on
/// every architecture nix-hatch runs on).
const O_CREAT: u64 = 0o100;
const O_TMPFILE_BIT: u64 = 0o20000000;

/// Calls whose mode argument (by index) may carry the bits.
const MODE_SETTERS: &[(&str, u32)] = &[
    ("chmod", 1),
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
    ("creat", 1),
    ("mknod", 1),
    ("mknodat", 2),
];
/// `fchmodat2`'s number (the common table), for libseccomp without its name.
const FCHMODAT2_NUMBER: i32 = 452;
/// Calls that create a file only with a flag: (name, flags index, mode index).
const CREATING_OPENS: &[(&str, u32, u32)] = &[("open", 1, 2), ("openat", 2, 3)];
const XATTR_CALLS: &[&str] = &[
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
];
/// Linux 6.13's xattr calls, numbered alike on every architecture (the
/// common table since Linux 5.1): libseccomp before 2.6 has no name for
/// them.
const XATTRAT_CALLS: [(&str, i32); 4] = [
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
];
const UNINSPECTABLE: &[&str] = &["openat2", "io_uring_setup"];

/// Writes the filter as BPF programs (what `bwrap --add-seccomp-fd`
/// reads, one descriptor each) into `dir` as `seccomp-N.bpf`, readable by
/// root only, and returns their paths.
pub fn write_filters(dir: &Path) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (main, native) = build().map_err(|e| format!("building the seccomp filter: {e}"))?;
    let mut paths = Vec::new();
    for (i, filter) in std::iter::once(main).chain(native).enumerate() {
        let path = dir.join(format!("seccomp-{i}.bpf"));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        filter
            .export_bpf(&file)
            .map_err(|e| format!("writing the seccomp filter to {}: {e}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// One filter for the native architecture and its companions: each rule
/// names a call, and libseccomp puts in every architecture's own number.
/// Calls this libseccomp has no name for go into a second filter for the
/// native architecture only (the one place a bare number is unambiguous).
fn build() -> Result<(ScmpFilterContext, Option<ScmpFilterContext>), String> {
    let fail = |what: String| move |e: libseccomp::error::SeccompError| format!("{what}: {e}");
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(fail("init".into()))?;
    for &arch in companions() {
        ctx.add_arch(arch)
            .map_err(fail(format!("architecture {arch:?}")))?;
    }
    let eperm = ScmpAction::Errno(nix::libc::EPERM);
    let enotsup = ScmpAction::Errno(nix::libc::ENOTSUP);
    let enosys = ScmpAction::Errno(nix::libc::ENOSYS);
    // A call no architecture here has can't be made.
    let call = |name: &str| ScmpSyscall::from_name(name).ok();
    let has_bit =
        |arg: u32, bit: u64| ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(bit), bit);
    let mut native: Option<ScmpFilterContext> = None;
    for bit in [S_ISUID, S_ISGID] {
        for &(name, mode) in MODE_SETTERS {
            if let Some(sc) = call(name) {
                ctx.add_rule_conditional(eperm, sc, &[has_bit(mode, bit)])
                    .map_err(fail(name.into()))?;
            } else if name == "fchmodat2" {
                // A libseccomp older than the call (Linux 6.6): by its
                // number, for the native architecture.
                let n = match native.as_mut() {
                    Some(n) => n,
                    None => native.insert(native_only().map_err(fail("native filter".into()))?),
                };
                n.add_rule_conditional_exact(
                    eperm,
                    ScmpSyscall::from(FCHMODAT2_NUMBER),
                    &[has_bit(mode, bit)],
                )
                .map_err(fail(name.into()))?;
            }
        }
        for &(name, flags, mode) in CREATING_OPENS {
            let Some(sc) = call(name) else { continue };
            for flag in [O_CREAT, O_TMPFILE_BIT] {
                ctx.add_rule_conditional(eperm, sc, &[has_bit(flags, flag), has_bit(mode, bit)])
                    .map_err(fail(name.into()))?;
            }
        }
    }
    for &name in XATTR_CALLS {
        if let Some(sc) = call(name) {
            ctx.add_rule(enotsup, sc).map_err(fail(name.into()))?;
        }
    }
    for (name, nr) in XATTRAT_CALLS {
        match call(name) {
            Some(sc) => {
                ctx.add_rule(enotsup, sc).map_err(fail(name.into()))?;
            }
            // libseccomp before 2.6 has no name for these: a 32-bit builder
            // there can still use them for user.* attributes (nothing the
            // NAR keeps, nothing that grants a right).
            None => {
                let n = match native.as_mut() {
                    Some(n) => n,
                    None => native.insert(native_only().map_err(fail("native filter".into()))?),
                };
                n.add_rule_exact(enotsup, ScmpSyscall::from(nr))
                    .map_err(fail(name.into()))?;
            }
        }
    }
    for &name in UNINSPECTABLE {
        if let Some(sc) = call(name) {
            ctx.add_rule(enosys, sc).map_err(fail(name.into()))?;
        }
    }
    Ok((ctx, native))
}

/// An empty filter for the native architecture that leaves every other
/// architecture's calls to the main filter.
fn native_only() -> Result<ScmpFilterContext, libseccomp::error::SeccompError> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    ctx.set_act_badarch(ScmpAction::Allow)?;
    Ok(ctx)
}

/// The 32-bit architectures a builder on this machine may also use.
fn companions() -> &'static [ScmpArch] {
    if cfg!(target_arch = "x86_64") {
        &[ScmpArch::X86, ScmpArch::X32]
    } else if cfg!(target_arch = "aarch64") {
        &[ScmpArch::Arm]
    } else {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `probe` in a child that has the filter loaded (this test
    /// binary again, into `child_probe`) and returns what it printed.
    fn filtered(probe: &str, dir: &Path) -> String {
        let filters = write_filters(dir).unwrap();
        let bpf = std::env::join_paths(&filters).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "executors::seccomp::tests::child_probe",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HATCH_SECCOMP_PROBE", probe)
            .env("HATCH_SECCOMP_BPF", &bpf)
            .env("HATCH_SECCOMP_DIR", dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .find_map(|l| l.split_once("probe: ").map(|(_, v)| v.trim()))
            .unwrap_or_else(|| panic!("no probe line in {text}"))
            .to_owned()
    }

    /// Not a test of its own: the body of [`filtered`]'s child.
    #[test]
    fn child_probe() {
        let (Ok(probe), Ok(bpf), Ok(dir)) = (
            std::env::var("HATCH_SECCOMP_PROBE"),
            std::env::var("HATCH_SECCOMP_BPF"),
            std::env::var("HATCH_SECCOMP_DIR"),
        ) else {
            return;
        };
        // SAFETY: prctl with BPF programs that outlive the calls.
        unsafe {
            assert_eq!(
                nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                0
            );
        }
        for path in std::env::split_paths(&bpf) {
            let prog = std::fs::read(path).unwrap();
            let fprog = nix::libc::sock_fprog {
                len: (prog.len() / 8) as u16,
                filter: prog.as_ptr() as *mut nix::libc::sock_filter,
            };
            // SAFETY: as above.
            let rc = unsafe {
                nix::libc::prctl(
                    nix::libc::PR_SET_SECCOMP,
                    nix::libc::SECCOMP_MODE_FILTER,
                    &fprog as *const _ as usize,
                    0,
                    0,
                )
            };
            assert_eq!(rc, 0);
        }
        let dir = Path::new(&dir);
        let c = |p: &str| std::ffi::CString::new(dir.join(p).to_str().unwrap()).unwrap();
        let errno = |rc: i64| {
            if rc < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            }
        };
        // SAFETY: plain system calls on C strings that live across them.
        let rc = unsafe {
            match probe.as_str() {
                "chmod-suid" => nix::libc::chmod(c("plain").as_ptr(), 0o4755) as i64,
                "chmod-sgid" => nix::libc::chmod(c("plain").as_ptr(), 0o2755) as i64,
                "chmod-plain" => nix::libc::chmod(c("plain").as_ptr(), 0o755) as i64,
                "fchmodat2-suid" => {
                    nix::libc::syscall(452, nix::libc::AT_FDCWD, c("plain").as_ptr(), 0o4755, 0)
                }
                "open-create-suid" => nix::libc::open(
                    c("new-suid").as_ptr(),
                    nix::libc::O_CREAT | nix::libc::O_WRONLY,
                    0o4755,
                ) as i64,
                "open-create-plain" => nix::libc::open(
                    c("new-plain").as_ptr(),
                    nix::libc::O_CREAT | nix::libc::O_WRONLY,
                    0o755,
                ) as i64,
                "openat-tmpfile-sgid" => nix::libc::openat(
                    nix::libc::AT_FDCWD,
                    c("").as_ptr(),
                    nix::libc::O_TMPFILE | nix::libc::O_WRONLY,
                    0o2755,
                ) as i64,
                "open-read" => {
                    nix::libc::open(c("plain").as_ptr(), nix::libc::O_RDONLY, 0o4755) as i64
                }
                "creat-suid" => nix::libc::creat(c("creat-suid").as_ptr(), 0o4755) as i64,
                "mknod-suid" => {
                    nix::libc::mknod(c("mknod-suid").as_ptr(), nix::libc::S_IFREG | 0o4755, 0)
                        as i64
                }
                "setxattr" => nix::libc::setxattr(
                    c("plain").as_ptr(),
                    c"user.x".as_ptr(),
                    b"1".as_ptr().cast(),
                    1,
                    0,
                ) as i64,
                "setxattrat" => nix::libc::syscall(
                    463,
                    nix::libc::AT_FDCWD,
                    c("plain").as_ptr(),
                    0,
                    c"user.x".as_ptr(),
                    0usize,
                    0usize,
                ),
                "openat2" => nix::libc::syscall(
                    437,
                    nix::libc::AT_FDCWD,
                    c("plain").as_ptr(),
                    0usize,
                    0usize,
                ),
                "io_uring_setup" => nix::libc::syscall(425, 1, 0usize),
                other => panic!("unknown probe {other}"),
            }
        };
        println!("probe: {}", errno(rc));
    }

    #[test]
    fn setuid_setgid_and_xattrs_are_refused_plain_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        let e = |name: &str| filtered(name, dir.path());
        let (eperm, enotsup, enosys) = (
            nix::libc::EPERM.to_string(),
            nix::libc::ENOTSUP.to_string(),
            nix::libc::ENOSYS.to_string(),
        );
        for probe in [
            "chmod-suid",
            "chmod-sgid",
            "fchmodat2-suid",
            "open-create-suid",
            "openat-tmpfile-sgid",
            "creat-suid",
            "mknod-suid",
        ] {
            assert_eq!(e(probe), eperm, "{probe}");
        }
        for probe in ["setxattr", "setxattrat"] {
            assert_eq!(e(probe), enotsup, "{probe}");
        }
        for probe in ["openat2", "io_uring_setup"] {
            assert_eq!(e(probe), enosys, "{probe}");
        }
        for probe in ["chmod-plain", "open-create-plain", "open-read"] {
            assert_eq!(e(probe), "0", "{probe}");
        }
        let mode = |p: &str| {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(dir.path().join(p))
                .map(|m| m.mode() & 0o7777)
                .ok()
        };
        assert_eq!(mode("new-suid"), None);
        assert_eq!(mode("creat-suid"), None);
        assert_eq!(mode("mknod-suid"), None);
    }
}
