//! File system helpers: removing (read-only) trees and moving a finished
//! output to its store path.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Remove `path` and everything below it. Works on read-only trees (such as
/// store paths, whose directories are mode 0555): if removal is refused, the
/// directories are made writable for their owner and removal is retried.
/// Symlinks are removed, never followed. A path that does not exist is not
/// an error.
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
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            not_found_ok(fs::remove_dir_all(path))
        }
        r => not_found_ok(r),
    }
}

/// Add `u+rwx` to every directory at or below `path` (symlinks are not
/// followed).
pub(crate) fn make_dirs_writable(path: &Path) -> io::Result<()> {
    let mut todo = vec![path.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let md = fs::symlink_metadata(&dir)?;
        if !md.is_dir() {
            continue;
        }
        let mode = md.mode() & 0o7777;
        if mode & 0o700 != 0o700 {
            fs::set_permissions(&dir, Permissions::from_mode(mode | 0o700))?;
        }
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    Ok(())
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
    copy_tree(from, to)?;
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

/// Copy the tree at `from` to `to` (which must not exist). On failure,
/// whatever was created at `to` is removed again.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let mut created = false;
    let r = copy_nodes(from, to, &mut created);
    if r.is_err() && created {
        let _ = remove_tree(to);
    }
    r
}

fn copy_nodes(from: &Path, to: &Path, created: &mut bool) -> io::Result<()> {
    let mut todo = vec![(from.to_path_buf(), to.to_path_buf())];
    // Directories are created writable and sealed (0555) at the end,
    // deepest first.
    let mut dirs = Vec::new();
    while let Some((src, dst)) = todo.pop() {
        let md = fs::symlink_metadata(&src)?;
        let ft = md.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if ft.is_file() {
            let mut input = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&src)?;
            let mut output = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)?;
            *created = true;
            io::copy(&mut input, &mut output)?;
            let exec = md.mode() & 0o100 != 0;
            output.set_permissions(Permissions::from_mode(if exec { 0o555 } else { 0o444 }))?;
        } else if ft.is_dir() {
            DirBuilder::new().mode(0o700).create(&dst)?;
            *created = true;
            for entry in fs::read_dir(&src)? {
                let entry = entry?;
                todo.push((entry.path(), dst.join(entry.file_name())));
            }
            dirs.push(dst);
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' has an unsupported file type", src.display()),
            ));
        }
        *created = true;
    }
    for dir in dirs.iter().rev() {
        fs::set_permissions(dir, Permissions::from_mode(0o555))?;
    }
    Ok(())
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
    fn make_writable_adds_owner_bits() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/f"), b"x").unwrap();
        fs::set_permissions(root.join("a/f"), Permissions::from_mode(0o444)).unwrap();
        for d in ["a/b", "a", ""] {
            fs::set_permissions(root.join(d), Permissions::from_mode(0o555)).unwrap();
        }
        make_dirs_writable(&root).unwrap();
        for d in ["a/b", "a", ""] {
            let m = fs::symlink_metadata(root.join(d)).unwrap().mode() & 0o777;
            assert_eq!(m, 0o755, "{d}");
        }
        // Files are left alone.
        assert_eq!(
            fs::metadata(root.join("a/f")).unwrap().mode() & 0o777,
            0o444
        );
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
        copy_tree(&src, &dst).unwrap();
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
        assert!(copy_tree(&src, &dst).is_err());
        assert!(dst.join("d/plain").exists());
        remove_tree(&dst).unwrap();
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
