//! Build slots: at most `max-jobs` concurrent builds per executor, shared by
//! every hook process on the machine through `flock`ed files under
//! `state-dir/slots`. A slot is held exactly as long as its file
//! descriptor, so a killed hook frees its slot at once.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

pub struct Slot {
    _lock: Flock<File>,
    pub index: u32,
}

/// Takes a free slot of `executor`, or `None` when all are busy.
pub fn try_acquire(state_dir: &Path, executor: &str, max_jobs: u32) -> io::Result<Option<Slot>> {
    let dir = state_dir.join("slots");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Err(io::Error::new(
            e.kind(),
            format!("creating {}: {e}", dir.display()),
        ));
    }
    for index in 0..max_jobs {
        let path = dir.join(format!("{executor}.{index}"));
        let file = crate::util::open_lock_file(&path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(Slot { _lock: lock, index })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => {
                return Err(io::Error::other(format!("locking {}: {e}", path.display())))
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exclusive_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = try_acquire(dir.path(), "x", 2).unwrap().unwrap();
        let b = try_acquire(dir.path(), "x", 2).unwrap().unwrap();
        assert_ne!(a.index, b.index);
        assert!(try_acquire(dir.path(), "x", 2).unwrap().is_none());
        // Another executor has its own slots.
        assert!(try_acquire(dir.path(), "y", 1).unwrap().is_some());
        drop(a);
        let c = try_acquire(dir.path(), "x", 2).unwrap().unwrap();
        assert_eq!(c.index, 0);
        drop(b);
    }
}
