//! Private per-build directories under `state-dir/staging`. Each is locked
//! by the hook that owns it; a directory whose lock is free belongs to a
//! hook that died, and is removed by the next build.
//!
//! Who can reach what: `staging/`, each build's dir and its `private/` are
//! root's and mode 0711 (nobody lists them, names are guessable, so
//! nothing below may rely on its name; and the build account can't rename
//! what is in them). Everything the build account writes lives in the leaf
//! dirs of `private/` (`build`, `store`, `tmp`, `work`), mode 0700, which
//! belong to that account only while its command runs
//! ([`Staging::give_to`]) and to root again before anything of them is
//! read ([`Staging::take_back`]); both change them through descriptors.
//! No other account ever reaches a build's files, kept ones included
//! ([`Staging::keep`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub struct Staging {
    /// Root's (0711): the lock, the run spec, files nix-hatch writes for
    /// the command to read, `private/`.
    pub root: PathBuf,
    /// Root's (0711): holds the leaf dirs `store`, `work`, `build` and the
    /// jail's `tmp` (0700), which are the build account's while it runs.
    pub private: PathBuf,
    /// Where outputs appear, by store base name (the builder's `/nix/store`
    /// writes land here).
    pub store: PathBuf,
    /// Overlay work dir (host executor).
    pub work: PathBuf,
    /// The build directory (`NIX_BUILD_TOP`).
    pub build: PathBuf,
    /// The jail's `/tmp`.
    pub tmp: PathBuf,
    _lock: Flock<File>,
    /// Set once the dir has moved to `kept/` (then it is not removed).
    keep: std::sync::atomic::AtomicBool,
}

const LOCK: &str = "lock";
/// Kept dirs (`keep-failed`) beyond this many, oldest first, are removed.
pub const KEPT_MAX_COUNT: usize = 10;
/// Kept dirs older than this (seconds) are removed.
pub const KEPT_MAX_AGE: u64 = 7 * 24 * 3600;
/// Name prefix of a staging dir still being set up (see `create`).
const NEW_PREFIX: &str = ".new-";

impl Staging {
    /// Hands the build dir (with the files nix-hatch wrote into it) and the
    /// other leaf dirs `dirs` (of `private/`) over to `account`, mode 0700.
    /// The files go first, without following symlinks, while the build dir
    /// is still root's; each dir is changed through a descriptor opened
    /// without following symlinks.
    pub fn give_to(&self, account: &crate::util::Account, dirs: &[&Path]) -> io::Result<()> {
        use nix::fcntl::AtFlags;
        use nix::unistd::{fchownat, Gid, Uid};
        let (uid, gid) = (
            Some(Uid::from_raw(account.uid)),
            Some(Gid::from_raw(account.gid)),
        );
        let build = open_dir(&self.build)?;
        if let Ok(entries) = std::fs::read_dir(&self.build) {
            for e in entries.flatten() {
                fchownat(
                    &build,
                    e.file_name().as_os_str(),
                    uid,
                    gid,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|err| with_path(err.into(), "chown", &e.path()))?;
            }
        }
        for dir in std::iter::once(self.build.as_path()).chain(dirs.iter().copied()) {
            let fd = open_dir(dir)?;
            nix::unistd::fchown(&fd, uid, gid).map_err(|e| with_path(e.into(), "chown", dir))?;
            nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .map_err(|e| with_path(e.into(), "chmod", dir))?;
        }
        Ok(())
    }

    /// Takes the leaf dirs back from the build account once its last
    /// process is gone: from here on no process of that account can reach
    /// or change the outputs, which are read only after this.
    pub fn take_back(&self) -> io::Result<()> {
        let root = (
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        );
        for dir in [&self.store, &self.build, &self.tmp, &self.work] {
            let fd = match open_dir(dir) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            nix::unistd::fchown(&fd, root.0, root.1)
                .map_err(|e| with_path(e.into(), "chown", dir))?;
            nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o700))
                .map_err(|e| with_path(e.into(), "chmod", dir))?;
        }
        Ok(())
    }

    /// Creates a fresh staging dir for `drv_base` (the .drv's base name).
    pub fn create(state_dir: &Path, drv_base: &str) -> io::Result<Staging> {
        let parent = state_dir.join("staging");
        std::fs::create_dir_all(&parent).map_err(|e| with_path(e, "creating", &parent))?;
        // Not listable: which derivations build here is nobody's business.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| with_path(e, "setting permissions of", &parent))?;
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
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o711))?;
        let lock_path = fresh.join(LOCK);
        let file = crate::util::open_lock_file(&lock_path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| with_path(io::Error::from(e), "locking", &lock_path))?;
        std::fs::rename(&fresh, &root).map_err(|e| with_path(e, "renaming", &fresh))?;
        let private = root.join("private");
        let staging = Staging {
            store: private.join("store"),
            work: private.join("work"),
            build: private.join("build"),
            tmp: private.join("tmp"),
            private,
            root,
            _lock: lock,
            keep: std::sync::atomic::AtomicBool::new(false),
        };
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&staging.private)
            .map_err(|e| with_path(e, "creating", &staging.private))?;
        std::fs::set_permissions(&staging.private, std::fs::Permissions::from_mode(0o711))?;
        for d in [&staging.store, &staging.work, &staging.build, &staging.tmp] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(d)
                .map_err(|e| with_path(e, "creating", d))?;
        }
        Ok(staging)
    }

    /// Writes `name` in the staging root, readable by root only (what the
    /// runner reads, or hands on as a descriptor).
    pub fn write_root_only(&self, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        use std::io::Write;
        let path = self.root.join(name);
        let _ = std::fs::remove_file(&path);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| with_path(e, "writing", &path))?;
        Ok(path)
    }

    /// Where the builder left output `base` (a store base name).
    pub fn output(&self, base: &str) -> PathBuf {
        self.store.join(base)
    }

    /// Keeps the directory after the build (Nix's `keep-failed`): it moves
    /// out of the way of stale-dir cleanup to `state-dir/kept/` and is
    /// reported to the user. Any client may ask for this, so what stays is
    /// defused first: root's, reachable by root only, no setuid or setgid
    /// bit left; and it doesn't stay for ever ([`prune_kept`]).
    pub fn keep(&self) -> io::Result<PathBuf> {
        let state_dir = self
            .root
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| io::Error::other("staging dir has no state dir"))?;
        let kept = state_dir.join("kept");
        std::fs::create_dir_all(&kept)?;
        std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o700))?;
        self.take_back()?;
        crate::store::defuse_tree(&self.private)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        let target = kept.join(self.root.file_name().unwrap_or_default());
        std::fs::rename(&self.root, &target)?;
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
        // Its age (for pruning) counts from now.
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &target,
            &now,
            &now,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
        prune_kept(state_dir, KEPT_MAX_COUNT, KEPT_MAX_AGE);
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
/// Returns the names of those removed (their builds' cgroups, named the
/// same, go too: `executors::limits::sweep`); errors are skipped (best
/// effort).
pub fn remove_stale(state_dir: &Path) -> Vec<String> {
    let parent = state_dir.join("staging");
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(NEW_PREFIX) {
            // Being set up by a live hook, or left by one that died then.
            if is_older_than(&path, 60) && crate::store::remove_tree(&path).is_ok() {
                removed.push(name);
            }
            continue;
        }
        let Ok(file) = open_lock(&path) else {
            // No lock file: a dir half-created by a dying hook, or junk.
            // Only remove it if it is old enough not to be mid-creation.
            if is_older_than(&path, 60) && crate::store::remove_tree(&path).is_ok() {
                removed.push(name);
            }
            continue;
        };
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            if crate::store::remove_tree(&path).is_ok() {
                removed.push(name);
            }
            drop(lock);
        }
    }
    removed
}

/// Whether staging dir `name` of `state_dir` belongs to a live hook
/// (`Some(true)`), to one that died (`Some(false)`), or does not exist.
pub fn owner_alive(state_dir: &Path, name: &str) -> Option<bool> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let dir = state_dir.join("staging").join(name);
    if !dir.is_dir() {
        return None;
    }
    Some(is_locked(&dir))
}

/// Removes kept dirs beyond the newest `max_count` and those older than
/// `max_age` seconds; returns how many went. Best effort.
pub fn prune_kept(state_dir: &Path, max_count: usize, max_age: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join("kept")) else {
        return 0;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.path().symlink_metadata().ok()?;
            Some((m.modified().ok()?, e.path()))
        })
        .collect();
    // Newest first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut removed = 0;
    for (i, (mtime, path)) in dirs.iter().enumerate() {
        let too_old = mtime.elapsed().is_ok_and(|age| age.as_secs() >= max_age);
        if (i >= max_count || too_old) && crate::store::remove_tree(path).is_ok() {
            removed += 1;
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

/// A directory, opened without following a symlink at its last component
/// (its parents are root's: nobody else can swap them).
fn open_dir(p: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    nix::fcntl::open(
        p,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| with_path(e.into(), "opening", p))
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

    /// While a build runs its account owns the leaf dirs only: it can't
    /// rename them (say, for a symlink root would then chown or chmod), and
    /// another account can't enter them; afterwards they are root's.
    #[test]
    fn the_build_account_gets_the_leaf_dirs_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let st = Staging::create(dir.path(), "abc-leaf.drv").unwrap();
        std::fs::write(st.build.join(".attrs.json"), "{}").unwrap();
        let nobody = crate::util::lookup_user("nobody").unwrap();
        st.give_to(&nobody, &[&st.store, &st.tmp]).unwrap();
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.mode() & 0o7777)
        };
        assert_eq!(owner(&st.private), (0, 0o711));
        for d in [&st.build, &st.store, &st.tmp] {
            assert_eq!(owner(d), (nobody.uid, 0o700), "{}", d.display());
        }
        assert_eq!(owner(&st.build.join(".attrs.json")).0, nobody.uid);
        let as_nobody = |script: &str| {
            std::process::Command::new("setpriv")
                .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
                .args(["sh", "-c", script, "sh"])
                .arg(&st.private)
                .status()
                .unwrap()
                .success()
        };
        assert!(
            as_nobody("touch \"$1/tmp/mine\""),
            "the account can't use its dir"
        );
        assert!(
            !as_nobody("mv \"$1/tmp\" \"$1/elsewhere\""),
            "the account renamed a leaf"
        );
        assert!(
            !as_nobody("ln -s / \"$1/x\""),
            "the account wrote into private/"
        );
        st.take_back().unwrap();
        for d in [&st.build, &st.store, &st.tmp, &st.work] {
            assert_eq!(owner(d), (0, 0o700), "{}", d.display());
        }
        assert!(!as_nobody("touch \"$1/tmp/again\""));
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
        assert_eq!(remove_stale(dir.path()).len(), 1);
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
