//! Private per-build directories under `state-dir/staging`. Each is locked
//! by the hook that owns it; a directory whose lock is free belongs to a
//! hook that died, and is removed by the next build.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub struct Staging {
    pub root: PathBuf,
    /// Where outputs appear, by store base name (the builder's `/nix/store`
    /// writes land here).
    pub store: PathBuf,
    /// Overlay work dir (host executor).
    pub work: PathBuf,
    /// The build directory (`NIX_BUILD_TOP`).
    pub build: PathBuf,
    _lock: Flock<File>,
    /// Set once the dir has moved to `kept/` (then it is not removed).
    keep: std::sync::atomic::AtomicBool,
}

const LOCK: &str = "lock";
/// Name prefix of a staging dir still being set up (see `create`).
const NEW_PREFIX: &str = ".new-";

impl Staging {
    /// Hands the build dir (with the files nix-hatch wrote into it) and
    /// `dirs` (path, mode) over to `account`. The files go first, without
    /// following symlinks, while the build dir is still root's: once the
    /// account owns it, another process of that account could swap an entry
    /// for a symlink to a file root would then chown.
    pub fn give_to(
        &self,
        account: &crate::util::Account,
        dirs: &[(&Path, u32)],
    ) -> Result<(), String> {
        use nix::fcntl::AtFlags;
        use nix::unistd::{fchownat, Gid, Uid};
        let (uid, gid) = (
            Some(Uid::from_raw(account.uid)),
            Some(Gid::from_raw(account.gid)),
        );
        if let Ok(entries) = std::fs::read_dir(&self.build) {
            for e in entries.flatten() {
                fchownat(
                    nix::fcntl::AT_FDCWD,
                    e.path().as_path(),
                    uid,
                    gid,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|err| format!("chown {}: {err}", e.path().display()))?;
            }
        }
        for (dir, mode) in
            std::iter::once((self.build.as_path(), 0o700)).chain(dirs.iter().copied())
        {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
            nix::unistd::chown(dir, uid, gid)
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Creates a fresh staging dir for `drv_base` (the .drv's base name).
    pub fn create(state_dir: &Path, drv_base: &str) -> io::Result<Staging> {
        let parent = state_dir.join("staging");
        std::fs::create_dir_all(&parent).map_err(|e| with_path(e, "creating", &parent))?;
        let stem = drv_base.strip_suffix(".drv").unwrap_or(drv_base);
        // The directory is made and locked under a name the cleanup of
        // other hooks leaves alone, and appears under its own name only
        // once locked: a lock file that exists but isn't locked yet would
        // look like a dead hook's.
        let (root, fresh) = (0..)
            .map(|n| {
                let name = match n {
                    0 => format!("{stem}.{}", std::process::id()),
                    n => format!("{stem}.{}.{n}", std::process::id()),
                };
                (
                    parent.join(&name),
                    parent.join(format!("{NEW_PREFIX}{name}")),
                )
            })
            // A live hook with our pid (in another pid namespace sharing
            // this state dir) building the same derivation owns that name.
            .find(|(root, fresh)| !is_locked(root) && (!fresh.exists() || is_older_than(fresh, 60)))
            .ok_or_else(|| io::Error::other("no free staging dir name"))?;
        for old in [&root, &fresh] {
            if old.exists() {
                // A previous hook with our pid died: its lock is free.
                crate::store::remove_tree(old).map_err(|e| with_path(e, "removing", old))?;
            }
        }
        std::fs::create_dir(&fresh).map_err(|e| with_path(e, "creating", &fresh))?;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755))?;
        let lock_path = fresh.join(LOCK);
        let file = crate::util::open_lock_file(&lock_path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| with_path(io::Error::from(e), "locking", &lock_path))?;
        std::fs::rename(&fresh, &root).map_err(|e| with_path(e, "renaming", &fresh))?;
        let staging = Staging {
            store: root.join("store"),
            work: root.join("work"),
            build: root.join("build"),
            root,
            _lock: lock,
            keep: std::sync::atomic::AtomicBool::new(false),
        };
        for d in [&staging.store, &staging.work, &staging.build] {
            std::fs::create_dir(d).map_err(|e| with_path(e, "creating", d))?;
        }
        Ok(staging)
    }

    /// Where the builder left output `base` (a store base name).
    pub fn output(&self, base: &str) -> PathBuf {
        self.store.join(base)
    }

    /// Keeps the directory after the build (Nix's `keep-failed`): it moves
    /// out of the way of stale-dir cleanup and is reported to the user.
    pub fn keep(&self) -> io::Result<PathBuf> {
        let state_dir = self
            .root
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| io::Error::other("staging dir has no state dir"))?;
        let kept = state_dir.join("kept");
        std::fs::create_dir_all(&kept)?;
        let target = kept.join(self.root.file_name().unwrap_or_default());
        std::fs::rename(&self.root, &target)?;
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = crate::store::remove_tree(&self.root);
        }
    }
}

/// Removes staging dirs left by hooks that died (their lock is free).
/// Returns how many were removed; errors are skipped (best effort).
pub fn remove_stale(state_dir: &Path) -> usize {
    let parent = state_dir.join("staging");
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(NEW_PREFIX) {
            // Being set up by a live hook, or left by one that died then.
            if is_older_than(&path, 60) && crate::store::remove_tree(&path).is_ok() {
                removed += 1;
            }
            continue;
        }
        let Ok(file) = open_lock(&path) else {
            // No lock file: a dir half-created by a dying hook, or junk.
            // Only remove it if it is old enough not to be mid-creation.
            if is_older_than(&path, 60) && crate::store::remove_tree(&path).is_ok() {
                removed += 1;
            }
            continue;
        };
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            if crate::store::remove_tree(&path).is_ok() {
                removed += 1;
            }
            drop(lock);
        }
    }
    removed
}

/// The existing lock file of staging dir `dir` (never created here).
fn open_lock(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(dir.join(LOCK))
}

/// Whether staging dir `dir` is held by a live hook.
fn is_locked(dir: &Path) -> bool {
    open_lock(dir).is_ok_and(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err())
}

fn is_older_than(path: &Path, secs: u64) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() >= secs)
}

fn with_path(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hooks with the same pid (pid namespaces sharing a state dir)
    /// building the same derivation: the second takes another name and
    /// leaves the first one's dir alone.
    #[test]
    fn a_live_dir_of_the_same_name_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let first = Staging::create(dir.path(), "abc-same.drv").unwrap();
        std::fs::write(first.build.join("mine"), "x").unwrap();
        let second = Staging::create(dir.path(), "abc-same.drv").unwrap();
        assert_ne!(first.root, second.root);
        assert!(first.build.join("mine").exists());
        drop(second);
        drop(first);
        // A dead hook's dir of that name is reused.
        let third = Staging::create(dir.path(), "abc-same.drv").unwrap();
        assert_eq!(
            third.root.file_name().unwrap().to_string_lossy(),
            format!("abc-same.{}", std::process::id())
        );
    }

    #[test]
    fn stale_dirs_of_dead_hooks_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = Staging::create(dir.path(), "abc-live.drv").unwrap();
        std::fs::write(live.build.join("f"), "x").unwrap();
        // A dir whose owner died: lock file present, nobody holds it.
        let dead = dir.path().join("staging/abc-dead.1");
        std::fs::create_dir_all(dead.join("store/x")).unwrap();
        std::fs::write(dead.join(LOCK), "").unwrap();
        assert_eq!(remove_stale(dir.path()), 1);
        assert!(!dead.exists());
        assert!(live.build.join("f").exists());
        let root = live.root.clone();
        drop(live);
        assert!(!root.exists());
    }

    /// Many hooks start at once (`nix-build -j 8`): each one's cleanup must
    /// never take a directory another is setting up.
    #[test]
    fn cleanup_racing_creation_never_takes_a_live_dir() {
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    remove_stale(dir.path());
                }
            });
            let creators: Vec<_> = (0..3)
                .map(|t| {
                    let dir = dir.path();
                    s.spawn(move || {
                        for i in 0..300 {
                            let st = Staging::create(dir, &format!("abc-{t}-{i}.drv"))
                                .unwrap_or_else(|e| panic!("creation {t}/{i}: {e}"));
                            std::fs::write(st.build.join("f"), "x")
                                .unwrap_or_else(|e| panic!("dir {t}/{i} taken: {e}"));
                        }
                    })
                })
                .collect();
            let results: Vec<_> = creators.into_iter().map(|c| c.join()).collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(results.iter().all(Result::is_ok), "a creation failed");
        });
        let left: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
