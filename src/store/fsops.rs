//! File system helpers: removing (read-only, arbitrarily deep) trees,
//! defusing kept ones and moving a finished output to its store path.

use std::ffi::{CStr, CString};
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Remove `path` and everything below it. Works on read-only trees (such as
/// store paths, whose directories are mode 0555) and on trees of any depth
/// (a builder may leave one deeper than a process has descriptors or a path
/// has bytes). Symlinks are removed, never followed. A path that does not
/// exist is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let not_found_ok = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if !md.is_dir() {
        return not_found_ok(fs::remove_file(path));
    }
    // Fast path: std's remove_dir_all walks with openat/unlinkat and is
    // immune to symlink swaps; as root, read-only directories don't stop it.
    // It holds a descriptor per level, though, so a deep tree (or a
    // read-only one when we are not root) is finished by the bounded walk.
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable_if_needed(path)?;
            walk_tree(
                path,
                |dir, name, st| {
                    if is_dir(st) {
                        ensure_owner_rwx(dir, name, st)
                    } else {
                        ignore_gone(nix::unistd::unlinkat(
                            dir,
                            name,
                            nix::unistd::UnlinkatFlags::NoRemoveDir,
                        ))
                    }
                },
                |parent, name| {
                    ignore_gone(nix::unistd::unlinkat(
                        parent,
                        name,
                        nix::unistd::UnlinkatFlags::RemoveDir,
                    ))
                },
            )?;
            not_found_ok(fs::remove_dir(path))
        }
    }
}

/// Clears every setuid and setgid bit at or below `path` (symlinks are not
/// followed): what stays of a failed build for an admin to look at must not
/// hand anyone the build account's rights.
pub fn defuse_tree(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    let strip = |mode: u32| mode & 0o7777 & !0o6000;
    if md.file_type().is_symlink() {
        return Ok(());
    }
    if md.mode() & 0o6000 != 0 {
        fs::set_permissions(path, Permissions::from_mode(strip(md.mode())))?;
    }
    if !md.is_dir() {
        return Ok(());
    }
    walk_tree(
        path,
        |dir, name, st| {
            let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            if st.st_mode & 0o6000 == 0 || !(kind == SFlag::S_IFREG || kind == SFlag::S_IFDIR) {
                return Ok(());
            }
            // Through a descriptor of the very entry that was looked at: a
            // name swapped meanwhile (for a link to another file) changes
            // nothing.
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC;
            let fd = match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT | Errno::ELOOP) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let now = nix::sys::stat::fstat(&fd)?;
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                return Ok(());
            }
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(strip(now.st_mode)))?;
            Ok(())
        },
        |_, _| Ok(()),
    )
}

/// The bytes the regular files at or below `path` hold by their sizes
/// (sparse or not): a lower bound of the tree's NAR size, found without
/// reading any file.
pub fn apparent_size(path: &Path) -> io::Result<u64> {
    let md = fs::symlink_metadata(path)?;
    if !md.is_dir() {
        return Ok(if md.is_file() { md.len() } else { 0 });
    }
    let mut total = 0u64;
    walk_tree(
        path,
        |_, _, st| {
            let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            if kind == SFlag::S_IFREG {
                total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(0));
            }
            Ok(())
        },
        |_, _| Ok(()),
    )?;
    Ok(total)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

fn ignore_gone(r: nix::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Adds `u+rwx` to the directory `name` in `dir` if it lacks it (a
/// read-only directory can't be listed or emptied unless we are root).
fn ensure_owner_rwx(dir: &OwnedFd, name: &CStr, st: &FileStat) -> io::Result<()> {
    let mode = st.st_mode & 0o7777;
    if mode & 0o700 == 0o700 || nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    ignore_gone(nix::sys::stat::fchmodat(
        dir,
        name,
        Mode::from_bits_truncate(mode | 0o700),
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    ))
}

fn make_writable_if_needed(path: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    let mode = md.mode() & 0o7777;
    if mode & 0o700 != 0o700 && !nix::unistd::geteuid().is_root() {
        fs::set_permissions(path, Permissions::from_mode(mode | 0o700))?;
    }
    Ok(())
}

/// One directory on the walk's stack: its entries (read when entered, so
/// no descriptor stays open for it) and its identity, checked when the
/// walk comes back up through `..`.
struct Level {
    name: Option<CString>,
    entries: Vec<CString>,
    next: usize,
    id: (u64, u64),
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Depth-first walk below the directory `root` holding one directory
/// descriptor at any depth (two while changing level): `visit(dir, name,
/// stat)` is called for every entry before a directory is entered (it may
/// remove a non-directory), `leave(parent, name)` after a directory's
/// entries are done. Symlinks are never followed; coming back up through
/// `..` checks that it is still the directory the walk came from, so a
/// tree moved meanwhile stops the walk with an error instead of leading it
/// elsewhere. Meant for trees nobody else can change (a staging dir after
/// its build, a stale store path).
pub(crate) fn walk_tree(
    root: &Path,
    mut visit: impl FnMut(&OwnedFd, &CStr, &FileStat) -> io::Result<()>,
    mut leave: impl FnMut(&OwnedFd, &CStr) -> io::Result<()>,
) -> io::Result<()> {
    let mut cur = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())?;
    let st = nix::sys::stat::fstat(&cur)?;
    let mut stack = vec![Level {
        name: None,
        entries: list_dir(&cur)?,
        next: 0,
        id: (st.st_dev, st.st_ino),
    }];
    while let Some(top) = stack.last_mut() {
        if let Some(name) = top.entries.get(top.next).cloned() {
            top.next += 1;
            let st = match nix::sys::stat::fstatat(
                &cur,
                name.as_c_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            visit(&cur, &name, &st)?;
            if !is_dir(&st) {
                continue;
            }
            let child = nix::fcntl::openat(&cur, name.as_c_str(), DIR_FLAGS, Mode::empty())?;
            let cst = nix::sys::stat::fstat(&child)?;
            if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino) {
                return Err(io::Error::other("a directory changed while it was walked"));
            }
            stack.push(Level {
                name: Some(name),
                entries: list_dir(&child)?,
                next: 0,
                id: (cst.st_dev, cst.st_ino),
            });
            cur = child;
        } else {
            let done = stack.pop();
            let (
                Some(parent),
                Some(Level {
                    name: Some(name), ..
                }),
            ) = (stack.last(), done)
            else {
                return Ok(());
            };
            let up = nix::fcntl::openat(&cur, c"..", DIR_FLAGS, Mode::empty())?;
            let ust = nix::sys::stat::fstat(&up)?;
            if (ust.st_dev, ust.st_ino) != parent.id {
                return Err(io::Error::other("a directory moved while it was walked"));
            }
            cur = up;
            leave(&cur, &name)?;
        }
    }
    Ok(())
}

/// The names in directory `dir` (without `.` and `..`).
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut d = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_fd())?)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Move `from` to `to`, which must not exist. Uses `rename(2)` (with
/// `RENAME_NOREPLACE` where available, so an existing `to` is never
/// clobbered); across file systems it copies the tree (file types, the
/// executable bit and symlink targets are preserved; modes become 0444/0555)
/// and then removes `from`. Returns whether a copy was needed.
pub(crate) fn move_into_place(from: &Path, to: &Path) -> io::Result<bool> {
    match rename_noreplace(from, to) {
        Ok(()) => return Ok(false),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {}
        Err(e) => return Err(e),
    }
    copy_tree(from, to, None, None, None)?;
    // The output is in place; a staged copy that can't be removed now is
    // left for the caller's clean-up of the staging directory.
    let _ = remove_tree(from);
    Ok(true)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // The file system doesn't support the flag.
        Err(Errno::EINVAL | Errno::ENOSYS) => rename_checked(from, to),
        Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rename_checked(from, to)
}

fn rename_checked(from: &Path, to: &Path) -> io::Result<()> {
    match fs::symlink_metadata(to) {
        Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to),
        Err(e) => Err(e),
    }
}

/// Copy the tree at `from` to `to` (which must not exist), stopping with
/// [`io::ErrorKind::TimedOut`] once `deadline` has passed, with
/// [`io::ErrorKind::Interrupted`] once `cancel` is set, and with
/// [`io::ErrorKind::FileTooLarge`] before more than `max_bytes` of file
/// contents are copied. The source is read through descriptors opened one
/// level at a time without following symlinks, so a tree someone else can
/// still rename in can't send the copy elsewhere. On failure, whatever
/// was created at `to` is removed again.
pub(crate) fn copy_tree(
    from: &Path,
    to: &Path,
    deadline: Option<std::time::Instant>,
    cancel: Option<&'static std::sync::atomic::AtomicBool>,
    max_bytes: Option<u64>,
) -> io::Result<()> {
    let mut copy = Copy {
        deadline,
        cancel,
        max_bytes,
        copied: 0,
        created: false,
        dirs: Vec::new(),
    };
    let r = copy.tree(from, to);
    if r.is_err() && copy.created {
        let _ = remove_tree(to);
    }
    r
}

/// One [`copy_tree`].
struct Copy {
    deadline: Option<std::time::Instant>,
    cancel: Option<&'static std::sync::atomic::AtomicBool>,
    max_bytes: Option<u64>,
    copied: u64,
    created: bool,
    /// Directories made, sealed (0555) at the end, deepest first.
    dirs: Vec<std::path::PathBuf>,
}

/// A source directory being copied: its descriptor, its entries (read
/// when entered) and where it goes.
struct CopyLevel {
    dir: OwnedFd,
    names: Vec<CString>,
    next: usize,
    dst: std::path::PathBuf,
}

impl Copy {
    fn check(&self) -> io::Result<()> {
        if self
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        match self.deadline {
            Some(d) if std::time::Instant::now() >= d => {
                Err(io::Error::from(io::ErrorKind::TimedOut))
            }
            _ => Ok(()),
        }
    }

    fn tree(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let parent = from.parent().unwrap_or(Path::new("/"));
        let name = from
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "nothing to copy"))?;
        let parent = nix::fcntl::open(
            parent,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let name = CString::new(name.as_bytes()).map_err(io::Error::other)?;
        let mut stack = Vec::new();
        if let Some(dir) = self.node(&parent, &name, to)? {
            stack.push(CopyLevel {
                names: list_dir(&dir)?,
                dir,
                next: 0,
                dst: to.to_path_buf(),
            });
        }
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.get(top.next).cloned() else {
                stack.pop();
                continue;
            };
            top.next += 1;
            let dst = top.dst.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
            if stack.len() >= super::nar::MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "'{}' is nested more than {} directories deep",
                    dst.display(),
                    super::nar::MAX_DEPTH
                )));
            }
            let Some(top) = stack.last() else { break };
            if let Some(dir) = self.node(&top.dir, &name, &dst)? {
                stack.push(CopyLevel {
                    names: list_dir(&dir)?,
                    dir,
                    next: 0,
                    dst,
                });
            }
        }
        for dir in self.dirs.iter().rev() {
            fs::set_permissions(dir, Permissions::from_mode(0o555))?;
        }
        Ok(())
    }

    /// Copies entry `name` of `dir` to `dst`; a directory is only created,
    /// and its descriptor returned to be walked.
    fn node(&mut self, dir: &OwnedFd, name: &CStr, dst: &Path) -> io::Result<Option<OwnedFd>> {
        self.check()?;
        let st = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let changed =
            || io::Error::other(format!("'{}' changed while it was copied", dst.display()));
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir, name).map_err(|_| changed())?;
                std::os::unix::fs::symlink(target, dst)?;
                self.created = true;
                Ok(None)
            }
            SFlag::S_IFREG => {
                let flags = OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC;
                let fd =
                    nix::fcntl::openat(dir, name, flags, Mode::empty()).map_err(|_| changed())?;
                let fst = nix::sys::stat::fstat(&fd)?;
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(changed());
                }
                let mut input = fs::File::from(fd);
                let mut output = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(dst)?;
                self.created = true;
                // In slices, so a deadline stops even a file of many
                // gigabytes, and the size limit holds whatever the file
                // said its size was.
                loop {
                    self.check()?;
                    let n = io::copy(&mut (&mut input).take(super::nar::LIMIT_SLICE), &mut output)?;
                    self.copied = self.copied.saturating_add(n);
                    if let Some(max) = self.max_bytes.filter(|&m| self.copied > m) {
                        return Err(io::Error::new(
                            io::ErrorKind::FileTooLarge,
                            format!("more than {max} bytes to copy"),
                        ));
                    }
                    if n < super::nar::LIMIT_SLICE {
                        break;
                    }
                }
                let exec = fst.st_mode & 0o100 != 0;
                output.set_permissions(Permissions::from_mode(if exec { 0o555 } else { 0o444 }))?;
                Ok(None)
            }
            SFlag::S_IFDIR => {
                let fd = nix::fcntl::openat(dir, name, DIR_FLAGS, Mode::empty())
                    .map_err(|_| changed())?;
                let fst = nix::sys::stat::fstat(&fd)?;
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(changed());
                }
                DirBuilder::new().mode(0o700).create(dst)?;
                self.created = true;
                self.dirs.push(dst.to_path_buf());
                Ok(Some(fd))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' has an unsupported file type", dst.display()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_read_only_and_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("a/link")).unwrap();
        for d in ["a/b", "a", ""] {
            fs::set_permissions(root.join(d), Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(Path::new("/etc").exists());
        remove_tree(&root).unwrap(); // missing: fine
                                     // A file and a dangling symlink.
        fs::write(tmp.path().join("f"), b"x").unwrap();
        remove_tree(&tmp.path().join("f")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", tmp.path().join("l")).unwrap();
        remove_tree(&tmp.path().join("l")).unwrap();
        assert!(fs::symlink_metadata(tmp.path().join("l")).is_err());
    }

    #[test]
    fn copy_tree_preserves_types_and_exec_bit() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/plain"), b"plain").unwrap();
        fs::write(src.join("d/exe"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("d/exe"), Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("../d/plain", src.join("d/e/link")).unwrap();
        let dst = tmp.path().join("dst");
        copy_tree(&src, &dst, None, None, None).unwrap();
        assert_eq!(fs::read(dst.join("d/plain")).unwrap(), b"plain");
        assert_eq!(
            fs::metadata(dst.join("d/plain")).unwrap().mode() & 0o777,
            0o444
        );
        assert_eq!(
            fs::metadata(dst.join("d/exe")).unwrap().mode() & 0o777,
            0o555
        );
        assert_eq!(
            fs::read_link(dst.join("d/e/link")).unwrap(),
            Path::new("../d/plain")
        );
        // Refuses to overwrite, and leaves the existing tree alone.
        assert!(copy_tree(&src, &dst, None, None, None).is_err());
        assert!(dst.join("d/plain").exists());
        remove_tree(&dst).unwrap();
    }

    /// A tree deeper than a process may have descriptors (or a path may
    /// have bytes), read-only on the way down, is removed completely.
    #[test]
    fn remove_tree_of_any_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("deep");
        fs::create_dir(&root).unwrap();
        let mut fd = nix::fcntl::open(&root, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..3000 {
            nix::sys::stat::mkdirat(&fd, c"a", Mode::from_bits_truncate(0o755)).unwrap();
            let f = nix::fcntl::openat(
                &fd,
                c"file",
                OFlag::O_CREAT | OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o444),
            );
            drop(f.unwrap());
            let next = nix::fcntl::openat(&fd, c"a", DIR_FLAGS, Mode::empty()).unwrap();
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o555)).unwrap();
            fd = next;
        }
        drop(fd);
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn defuse_clears_setuid_and_setgid_below() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("kept");
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::write(root.join("d/e/suid"), b"x").unwrap();
        fs::set_permissions(root.join("d/e/suid"), Permissions::from_mode(0o6755)).unwrap();
        fs::set_permissions(root.join("d"), Permissions::from_mode(0o2755)).unwrap();
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"x").unwrap();
        fs::set_permissions(&outside, Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        defuse_tree(&root).unwrap();
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("d/e/suid"), 0o755);
        assert_eq!(mode("d"), 0o755);
        // A link is not followed out of the tree.
        assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o7777, 0o4755);
    }

    #[test]
    fn move_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), b"a").unwrap();
        fs::write(tmp.path().join("b"), b"b").unwrap();
        let e = move_into_place(&tmp.path().join("a"), &tmp.path().join("b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(tmp.path().join("b")).unwrap(), b"b");
        assert!(!move_into_place(&tmp.path().join("a"), &tmp.path().join("c")).unwrap());
        assert_eq!(fs::read(tmp.path().join("c")).unwrap(), b"a");
    }
}
