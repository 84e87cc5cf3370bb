//! Build slots and the queue in front of them: at most `max-jobs` builds
//! run at once per executor, at most `queue` more wait inside their hooks,
//! in arrival order. Shared by every hook process on the machine (every
//! nix-daemon worker, every Nix run) through `flock`ed files under
//! `state-dir/slots`:
//!
//! - `NAME.I` (I < max-jobs): a slot, held by the build that runs in it;
//! - `NAME.wait-N`: the ticket of a build that was accepted while every
//!   slot was busy and now waits in its hook; N orders the waiting builds;
//! - `NAME.queue`: held for the microseconds a hook looks at and changes
//!   the executor's slots and tickets, so those steps never interleave.
//!
//! A lock lasts exactly as long as its file descriptor, so a hook that is
//! killed frees its slot or its place in the queue at once; a ticket file
//! whose lock nobody holds is a dead waiter's, and the next hook that looks
//! removes it.
//!
//! The order: a `try` takes a free slot only when nobody waits (it never
//! overtakes a waiting build), else it queues behind the last ticket, or
//! — with `queue` builds already waiting — is told to postpone. Only the
//! waiting build with the lowest ticket takes a slot that frees. A waiting
//! hook sleeps until one of the executor's files is closed or removed
//! (inotify on the directory: a finished build closes its slot; the kernel
//! closes a killed hook's files), looking again shortly after each change
//! and once a second regardless: the kernel reports a killed process's
//! close just before it drops that file's lock. Without inotify (the
//! account's instances used up) it looks every 50 ms.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// A held slot: the build may run until it is dropped.
pub struct Slot {
    _lock: Flock<File>,
    pub index: u32,
}

/// One executor's slots and queue.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
    name: String,
    max_jobs: u32,
    queue: u32,
}

/// What a `try` gets when it may go ahead: a slot now, or a place in the
/// queue ([`Ticket::wait`] turns it into a slot).
pub enum Claim {
    Slot(Slot),
    Queued(Ticket),
}

/// Builds of an executor at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub running: u32,
    /// Waiting inside their hooks (for a waiting build: itself and those
    /// ahead of it).
    pub waiting: u32,
}

/// Why [`Ticket::wait`] ended without a slot.
#[derive(Debug)]
pub enum Ended {
    /// `stop[i]` became readable or reported an error.
    Stopped(usize),
    Failed(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Self {
        Ended::Failed(e)
    }
}

/// How long after a change a waiting build looks again (a killed hook's
/// lock is dropped just after its close is reported), and how long it
/// sleeps at most.
const LOOK_AGAIN_MS: u16 = 20;
const LOOK_ANYWAY_MS: u16 = 1000;
/// How often a waiting build looks when it cannot watch the directory
/// (inotify instances are limited per account: 128 by default).
const POLL_MS: u16 = 50;
/// The queue lock's file: `NAME.queue`.
const QUEUE_SUFFIX: &str = "queue";

impl Slots {
    pub fn new(state_dir: &Path, executor: &str, max_jobs: u32, queue: u32) -> Slots {
        Slots {
            dir: state_dir.join("slots"),
            name: executor.to_owned(),
            max_jobs,
            queue,
        }
    }

    /// For a `try`: a free slot when nobody waits for one, else a place in
    /// the queue when fewer than `queue` builds wait, else `None` (Nix
    /// should postpone).
    pub fn admit(&self) -> io::Result<Option<Claim>> {
        self.ensure_dir()?;
        let _turn = self.lock_queue(crate::util::open_lock_file(&self.queue_path())?)?;
        let waiting = self.tickets(None, true)?;
        if waiting.is_empty() {
            if let Some(slot) = self.try_acquire()? {
                return Ok(Some(Claim::Slot(slot)));
            }
        }
        if waiting.len() >= self.queue as usize {
            return Ok(None);
        }
        let number = waiting.last().map_or(1, |n| n + 1);
        let path = self.ticket_path(number);
        let file = crate::util::open_lock_file(&path)?;
        // Free: it was absent or dead (removed above), and only a holder
        // of the queue lock makes tickets.
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| locking(&path, e))?;
        Ok(Some(Claim::Queued(Ticket {
            slots: self.clone(),
            number,
            path,
            _lock: lock,
        })))
    }

    /// How many builds run and wait now, for `nix-hatch explain`. Only
    /// reads: nothing is created or removed.
    pub fn occupancy(&self) -> io::Result<Occupancy> {
        let turn = match open_read_only(&self.queue_path())? {
            Some(f) => Some(self.lock_queue(f)?),
            // Never used: nothing runs, nothing waits.
            None => return Ok(Occupancy::default()),
        };
        let waiting = self.tickets(None, false)?.len() as u32;
        let mut running = 0;
        for index in 0..self.max_jobs {
            let path = self.slot_path(index);
            if let Some(f) = open_read_only(&path)? {
                if held(f, &path)? {
                    running += 1;
                }
            }
        }
        drop(turn);
        Ok(Occupancy { running, waiting })
    }

    /// Takes a free slot, or `None` when all are busy. Called with the
    /// queue lock held.
    fn try_acquire(&self) -> io::Result<Option<Slot>> {
        for index in 0..self.max_jobs {
            let path = self.slot_path(index);
            let file = crate::util::open_lock_file(&path)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(Slot { _lock: lock, index })),
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(locking(&path, e)),
            }
        }
        Ok(None)
    }

    /// The numbers of the live tickets, lowest first (`own`, the caller's,
    /// is live). With `clean`, dead ones are removed. Called with the
    /// queue lock held.
    fn tickets(&self, own: Option<u64>, clean: bool) -> io::Result<Vec<u64>> {
        let prefix = format!("{}.wait-", self.name);
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            io::Error::new(e.kind(), format!("reading {}: {e}", self.dir.display()))
        })?;
        let mut live = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(number) = ticket_number(&name, &prefix) else {
                continue;
            };
            if Some(number) == own {
                live.push(number);
                continue;
            }
            let path = entry.path();
            // A read-only probe: its close is no event for the waiters.
            let Some(file) = open_read_only(&path)? else {
                continue;
            };
            if held(file, &path)? {
                live.push(number);
            } else if clean {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("removing {}: {e}", path.display()),
                        ))
                    }
                    _ => {}
                }
            }
        }
        live.sort_unstable();
        Ok(live)
    }

    /// Waits for the queue lock (held by others for microseconds).
    /// `state-dir/slots`, made private (0700) if missing, and refused
    /// unless only this account can write it: whoever can make files
    /// there can hold a slot or the queue lock forever, forge a place in
    /// the queue, or plant a symlink for root to create a file through.
    fn ensure_dir(&self) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let with = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", self.dir.display()))
        };
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| with(e, "creating the parent of"))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with(e, "creating")),
        }
        let m = std::fs::symlink_metadata(&self.dir).map_err(|e| with(e, "reading"))?;
        let me = nix::unistd::geteuid().as_raw();
        if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} must be a directory of uid {me} that no other account can write \
                     (it is {}, uid {}, mode {:o}): another account could block or forge \
                     the executors' slots; fix it with chown/chmod or remove it",
                    self.dir.display(),
                    if m.is_symlink() {
                        "a symlink"
                    } else if m.is_dir() {
                        "a directory"
                    } else {
                        "not a directory"
                    },
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
        Ok(())
    }

    fn lock_queue(&self, file: File) -> io::Result<Flock<File>> {
        let mut file = file;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(locking(&self.queue_path(), e)),
            }
        }
    }

    fn slot_path(&self, index: u32) -> PathBuf {
        self.dir.join(format!("{}.{index}", self.name))
    }

    fn ticket_path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{}.wait-{number}", self.name))
    }

    fn queue_path(&self) -> PathBuf {
        self.dir.join(format!("{}.{QUEUE_SUFFIX}", self.name))
    }
}

/// A build's place in its executor's queue; dropped, it leaves the queue.
pub struct Ticket {
    slots: Slots,
    number: u64,
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Before the lock goes (the fields drop after this): a ticket file
        // without its lock would read as a dead waiter's.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Ticket {
    /// Waits for this build's turn and a free slot. `waiting` is called
    /// once, when the build has to wait (not when a slot is free at once),
    /// with the builds running and those waiting up to this one (itself
    /// and those ahead of it).
    /// Ends early when one of `stop` becomes readable or reports an error
    /// (a signal's self-pipe, the write end of a pipe whose reader left).
    pub fn wait(
        self,
        stop: &[BorrowedFd<'_>],
        waiting: impl FnOnce(Occupancy),
    ) -> Result<Slot, Ended> {
        // Watch first, look second: a change after a look is an event.
        let inotify = watch(&self.slots.dir);
        self.wait_watching(inotify, stop, waiting)
    }

    fn wait_watching(
        self,
        inotify: nix::Result<Inotify>,
        stop: &[BorrowedFd<'_>],
        waiting: impl FnOnce(Occupancy),
    ) -> Result<Slot, Ended> {
        let s = self.slots.clone();
        let inotify = match inotify {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::debug!(
                    "cannot watch {} ({e}): looking every {POLL_MS} ms",
                    s.dir.display()
                );
                None
            }
        };
        // Opened once and kept: looking at them again closes nothing, so a
        // waiting build wakes no other (nor itself).
        let mut slot_files = (0..s.max_jobs)
            .map(|i| crate::util::open_lock_file(&s.slot_path(i)).map(Some))
            .collect::<io::Result<Vec<Option<File>>>>()?;
        let mut turn = Some(crate::util::open_lock_file(&s.queue_path())?);
        let mut waiting = Some(waiting);
        let prefix = format!("{}.", s.name);
        let mut soon = false;
        loop {
            let Some(file) = turn.take() else {
                return Err(Ended::Failed(io::Error::other("queue lock lost")));
            };
            let locked = s.lock_queue(file)?;
            // Removed or replaced while it waited (an admin's clean-up):
            // its locks no longer count for the hooks that come after, so
            // it must not take a slot by them, and its place is gone.
            if !is_at(&locked, &s.queue_path()) || !is_at(&self._lock, &self.path) {
                return Err(Ended::Failed(io::Error::other(format!(
                    "{} was removed or replaced while the build waited",
                    s.dir.display()
                ))));
            }
            let tickets = s.tickets(Some(self.number), true)?;
            if tickets.first() == Some(&self.number) {
                if let Some(slot) = take_free(&s, &mut slot_files)? {
                    // Leaves the queue while still holding its lock.
                    drop(self);
                    return Ok(slot);
                }
            }
            let now = match waiting {
                // Those behind it don't delay it: its place in the queue.
                Some(_) => Some(Occupancy {
                    running: busy(&s, &mut slot_files)?,
                    waiting: tickets.iter().filter(|&&n| n <= self.number).count() as u32,
                }),
                None => None,
            };
            turn = Some(
                locked
                    .unlock()
                    .map_err(|(_, e)| locking(&s.queue_path(), e))?,
            );
            // Told without the queue lock: a slow log must not hold up the
            // executor's other hooks.
            if let (Some(tell), Some(now)) = (waiting.take(), now) {
                tell(now);
            }
            let ms = match (&inotify, soon) {
                (None, _) => POLL_MS,
                (Some(_), true) => LOOK_AGAIN_MS,
                (Some(_), false) => LOOK_ANYWAY_MS,
            };
            soon = matches!(
                sleep_until_change(inotify.as_ref(), stop, &prefix, ms)?,
                Wake::Changed
            );
        }
    }
}

/// Whether the open file `f` is still the one at `path`.
fn is_at(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether a change to file `name` can let a waiting build of executor
/// `prefix` (`NAME.`) move up: a slot or a ticket given up. Not the queue
/// lock: every `try` for the executor opens and closes it, and a waiting
/// build blocks on it rather than sleeping; waking every waiter for it
/// would make each `try` cost a scan of the queue per waiting build.
fn relevant(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest != QUEUE_SUFFIX)
}

/// An inotify instance watching `dir` for files closed after writing
/// (a slot, a ticket) and removed (a ticket).
fn watch(dir: &Path) -> nix::Result<Inotify> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    inotify.add_watch(
        dir,
        AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE,
    )?;
    Ok(inotify)
}

/// What ended a sleep of a waiting build.
enum Wake {
    /// One of the executor's files was closed or removed.
    Changed,
    TimedOut,
}

/// Sleeps until one of the executor's files (`prefix`…) is closed or
/// removed, a `stop` fires, or `ms` milliseconds have passed.
fn sleep_until_change(
    inotify: Option<&Inotify>,
    stop: &[BorrowedFd<'_>],
    prefix: &str,
    ms: u16,
) -> Result<Wake, Ended> {
    let deadline = Instant::now() + Duration::from_millis(ms.into());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Whole milliseconds, rounded up: never a busy loop.
        let left_ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(ms);
        let mut fds: Vec<PollFd<'_>> = stop
            .iter()
            .copied()
            .chain(inotify.map(AsFd::as_fd))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::from(left_ms)) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Ended::Failed(io::Error::other(format!("poll: {e}")))),
        }
        let fired = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if let Some(i) = fds[..stop.len()].iter().position(fired) {
            return Err(Ended::Stopped(i));
        }
        let Some(inotify) = inotify.filter(|_| fds.last().is_some_and(fired)) else {
            return Ok(Wake::TimedOut);
        };
        let mut changed = false;
        loop {
            match inotify.read_events() {
                Ok(events) => {
                    changed |= events.iter().any(|e| {
                        e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                            || e.name
                                .as_deref()
                                .and_then(OsStr::to_str)
                                .is_some_and(|n| relevant(n, prefix))
                    })
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Ended::Failed(io::Error::other(format!("inotify: {e}")))),
            }
        }
        if changed {
            return Ok(Wake::Changed);
        }
        // Another executor's file: sleep on.
    }
}

/// Takes the first free slot among the kept-open `files`.
fn take_free(s: &Slots, files: &mut [Option<File>]) -> io::Result<Option<Slot>> {
    for (index, f) in files.iter_mut().enumerate() {
        let Some(file) = f.take() else { continue };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                return Ok(Some(Slot {
                    _lock: lock,
                    index: index as u32,
                }))
            }
            Err((file, Errno::EWOULDBLOCK)) => *f = Some(file),
            Err((_, e)) => return Err(locking(&s.slot_path(index as u32), e)),
        }
    }
    Ok(None)
}

/// How many of the kept-open slot `files` are held (by running builds).
fn busy(s: &Slots, files: &mut [Option<File>]) -> io::Result<u32> {
    let mut n = 0;
    for (index, f) in files.iter_mut().enumerate() {
        let Some(file) = f.take() else { continue };
        let path = s.slot_path(index as u32);
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => *f = Some(lock.unlock().map_err(|(_, e)| locking(&path, e))?),
            Err((file, Errno::EWOULDBLOCK)) => {
                n += 1;
                *f = Some(file);
            }
            Err((_, e)) => return Err(locking(&path, e)),
        }
    }
    Ok(n)
}

/// Whether another open file holds `file`'s lock (probed with a shared
/// lock, given back at once).
fn held(file: File, path: &Path) -> io::Result<bool> {
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => Ok(false),
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(locking(path, e)),
    }
}

/// `N` of `NAME.wait-N`.
fn ticket_number(file_name: &OsStr, prefix: &str) -> Option<u64> {
    let digits = file_name.to_str()?.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `path` opened for reading (enough for `flock`), `None` if absent.
fn open_read_only(path: &Path) -> io::Result<Option<File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("opening {}: {e}", path.display()),
        )),
    }
}

fn locking(path: &Path, e: Errno) -> io::Error {
    io::Error::other(format!("locking {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::os::fd::AsFd;
    use std::process::{ChildStdin, Command, Stdio};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;

    fn slot(c: Option<Claim>) -> Slot {
        match c {
            Some(Claim::Slot(s)) => s,
            _ => panic!("no slot"),
        }
    }

    fn ticket(c: Option<Claim>) -> Ticket {
        match c {
            Some(Claim::Queued(t)) => t,
            _ => panic!("not queued"),
        }
    }

    #[test]
    fn slots_are_exclusive_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 2, 0);
        let a = slot(x.admit().unwrap());
        let b = slot(x.admit().unwrap());
        assert_ne!(a.index, b.index);
        assert!(x.admit().unwrap().is_none(), "queue 0: postpone");
        // Another executor has its own slots.
        assert!(Slots::new(dir.path(), "y", 1, 0).admit().unwrap().is_some());
        assert_eq!(
            x.occupancy().unwrap(),
            Occupancy {
                running: 2,
                waiting: 0
            }
        );
        drop(a);
        let c = slot(x.admit().unwrap());
        assert_eq!(c.index, 0);
        drop(b);
    }

    /// `state-dir/slots` is made private, and one another account could
    /// write (or a symlink in its place, or in place of a lock file) is
    /// refused: nothing is created through it.
    #[test]
    fn a_slots_dir_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 0);
        drop(x.admit().unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("slots")), 0o700);

        std::fs::set_permissions(
            dir.path().join("slots"),
            std::fs::Permissions::from_mode(0o1777),
        )
        .unwrap();
        let err = x
            .admit()
            .err()
            .expect("a world-writable slots dir was used");
        assert!(
            err.to_string().contains("no other account can write"),
            "{err}"
        );

        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::remove_dir_all(dir.path().join("slots")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("slots")).unwrap();
        let err = x.admit().err().expect("a symlinked slots dir was used");
        assert!(err.to_string().contains("a symlink"), "{err}");
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);

        std::fs::remove_file(dir.path().join("slots")).unwrap();
        std::fs::create_dir(dir.path().join("slots")).unwrap();
        let target = elsewhere.path().join("made-by-root");
        std::os::unix::fs::symlink(&target, dir.path().join("slots/x.queue")).unwrap();
        assert!(
            x.admit().is_err(),
            "the queue lock was opened through a symlink"
        );
        assert!(!target.exists(), "a file was created through the symlink");
    }

    /// A waiting build whose slots dir was removed (an admin's clean-up)
    /// stops waiting instead of taking a slot by locks that no longer
    /// count: the hooks that come after already use the new dir.
    #[test]
    fn a_waiting_build_whose_slots_dir_went_away_takes_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 1);
        let running = slot(x.admit().unwrap());
        let t = ticket(x.admit().unwrap());
        let (_release, never) = nix::unistd::pipe().unwrap();
        let (looked, first_look) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            t.wait(&[never.as_fd()], |_| looked.send(()).unwrap())
                .map(|s| s.index)
                .map_err(|e| format!("{e:?}"))
        });
        // Once it waits, holding its files.
        first_look.recv().unwrap();
        std::fs::remove_dir_all(dir.path().join("slots")).unwrap();
        let fresh = slot(x.admit().unwrap());
        drop(running);
        let got = waiter.join().unwrap();
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("removed or replaced")),
            "a second build ran beside {}: {got:?}",
            fresh.index
        );
    }

    /// Only a slot or a ticket given up wakes a waiting build: the queue
    /// lock, opened and closed by every `try`, does not.
    #[test]
    fn only_slots_and_tickets_wake_waiting_builds() {
        assert!(relevant("signer.0", "signer."));
        assert!(relevant("signer.wait-12", "signer."));
        assert!(!relevant("signer.queue", "signer."));
        assert!(!relevant("other.0", "signer."));
    }

    #[test]
    fn a_waiting_build_gets_the_slot_that_frees_and_leaves_no_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 1);
        let running = slot(x.admit().unwrap());
        let t = ticket(x.admit().unwrap());
        assert!(
            x.admit().unwrap().is_none(),
            "queue 1: the second waits no more"
        );
        assert_eq!(
            x.occupancy().unwrap(),
            Occupancy {
                running: 1,
                waiting: 1
            }
        );
        // The running build ends while the waiting one sleeps.
        let (release, never) = nix::unistd::pipe().unwrap();
        let waiter = std::thread::spawn(move || {
            t.wait(&[never.as_fd()], |now| {
                assert_eq!(
                    now,
                    Occupancy {
                        running: 1,
                        waiting: 1
                    }
                )
            })
            .map(|s| s.index)
            .map_err(|e| format!("{e:?}"))
        });
        drop(running);
        assert_eq!(waiter.join().unwrap(), Ok(0));
        drop(release);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("slots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("wait"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_stop_descriptor_ends_the_wait_and_frees_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 1);
        let _running = slot(x.admit().unwrap());
        let t = ticket(x.admit().unwrap());
        let (read, write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&write, b"x").unwrap();
        let told = std::cell::Cell::new(false);
        let r = t.wait(&[read.as_fd()], |_| told.set(true));
        assert!(matches!(r, Err(Ended::Stopped(0))), "{:?}", r.err());
        assert!(told.get(), "the wait was not reported");
        assert!(ticket(x.admit().unwrap()).number >= 1);
    }

    /// Without inotify (the account's instances used up), a waiting build
    /// still gets the slot that frees.
    #[test]
    fn without_inotify_a_waiting_build_still_gets_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 1);
        let running = slot(x.admit().unwrap());
        let t = ticket(x.admit().unwrap());
        let (_stop, never) = nix::unistd::pipe().unwrap();
        let (told, waits) = channel();
        let waiter = std::thread::spawn(move || {
            t.wait_watching(Err(Errno::EMFILE), &[never.as_fd()], |_| {
                told.send(()).unwrap()
            })
            .map(|s| s.index)
            .map_err(|e| format!("{e:?}"))
        });
        waits.recv_timeout(Duration::from_secs(60)).unwrap();
        drop(running);
        assert_eq!(waiter.join().unwrap(), Ok(0));
    }

    /// The log pipe's reader gone (Nix): a write end in `stop` reports an
    /// error, which ends the wait too.
    #[test]
    fn a_pipe_without_reader_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let x = Slots::new(dir.path(), "x", 1, 1);
        let _running = slot(x.admit().unwrap());
        let t = ticket(x.admit().unwrap());
        let (signals, _keep) = nix::unistd::pipe().unwrap();
        let (gone, log) = nix::unistd::pipe().unwrap();
        drop(gone);
        let r = t.wait(&[signals.as_fd(), log.as_fd()], |_| {});
        assert!(matches!(r, Err(Ended::Stopped(1))), "{:?}", r.err());
        assert!(x.tickets(None, false).unwrap().is_empty());
    }

    /// One hook of the cross-process tests (this test binary run again,
    /// see [`Hook::spawn`]): admits itself to executor `x` of the state
    /// dir in `NIX_HATCH_SLOTS_CHILD` and says on stdout what it got; a
    /// queued one waits for its slot (stdin closing stops it). It keeps a
    /// slot until its stdin closes.
    #[test]
    #[ignore = "a hook process of the cross-process queue tests"]
    fn queue_child() {
        let Some(dir) = std::env::var_os("NIX_HATCH_SLOTS_CHILD") else {
            return;
        };
        let queue: u32 = std::env::var("NIX_HATCH_SLOTS_QUEUE")
            .unwrap()
            .parse()
            .unwrap();
        let x = Slots::new(Path::new(&dir), "x", 1, queue);
        let say = |what: &str| println!("slots-child: {what}");
        let stdin = io::stdin();
        let got = match x.admit().unwrap() {
            None => return say("full"),
            Some(Claim::Slot(s)) => s,
            Some(Claim::Queued(t)) => {
                say("queued");
                match t.wait(&[stdin.as_fd()], |_| say("waiting")) {
                    Ok(s) => s,
                    Err(e) => return say(&format!("stopped {e:?}")),
                }
            }
        };
        say("running");
        let _ = stdin.lock().read_to_end(&mut Vec::new());
        drop(got);
    }

    /// A [`queue_child`] process.
    struct Hook {
        name: &'static str,
        process: std::process::Child,
        stdin: Option<ChildStdin>,
    }

    impl Hook {
        /// Starts it and waits until it has said what it got (`first`).
        fn spawn(
            dir: &Path,
            queue: u32,
            name: &'static str,
            said: &Sender<(&'static str, String)>,
            hear: &Receiver<(&'static str, String)>,
            first: &str,
        ) -> Hook {
            let mut process = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "hook::slots::tests::queue_child",
                    "--ignored",
                    "--nocapture",
                    "--quiet",
                ])
                .env("NIX_HATCH_SLOTS_CHILD", dir)
                .env("NIX_HATCH_SLOTS_QUEUE", queue.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = process.stdout.take().unwrap();
            let said = said.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some(what) = line.strip_prefix("slots-child: ") {
                        let _ = said.send((name, what.to_owned()));
                    }
                }
            });
            let stdin = process.stdin.take();
            let hook = Hook {
                name,
                process,
                stdin,
            };
            assert_eq!(next(hear), (name, first.to_owned()));
            hook
        }

        /// Ends its build (or its wait) and waits for it to exit.
        fn finish(mut self) {
            drop(self.stdin.take());
            self.process.wait().unwrap();
        }

        fn kill(mut self) {
            self.process.kill().unwrap();
            self.process.wait().unwrap();
        }
    }

    /// What the next hook said (bounded: a hang fails the test).
    fn next(hear: &Receiver<(&'static str, String)>) -> (&'static str, String) {
        hear.recv_timeout(Duration::from_secs(60))
            .expect("no hook said anything for 60 s")
    }

    /// Hooks in separate processes get the executor's one slot in the
    /// order they queued, whoever is woken first when it frees.
    #[test]
    fn waiting_hooks_get_the_slot_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let (said, hear) = channel();
        let x = Slots::new(dir.path(), "x", 1, 8);
        let held = slot(x.admit().unwrap());
        let names = ["a", "b", "c", "d", "e", "f"];
        let mut hooks: Vec<Hook> = Vec::new();
        for name in names {
            let h = Hook::spawn(dir.path(), 8, name, &said, &hear, "queued");
            assert_eq!(next(&hear), (name, "waiting".to_owned()));
            hooks.push(h);
        }
        drop(held);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(next(&hear), (*name, "running".to_owned()), "turn {i}");
            if i == 2 {
                // A newcomer while others wait queues behind them.
                let g = Hook::spawn(dir.path(), 8, "g", &said, &hear, "queued");
                assert_eq!(next(&hear), ("g", "waiting".to_owned()));
                hooks.push(g);
            }
            let h = hooks.remove(0);
            assert_eq!(h.name, *name);
            h.finish();
        }
        assert_eq!(next(&hear), ("g", "running".to_owned()));
        hooks.remove(0).finish();
    }

    /// A running hook that is killed frees its slot for the first in line
    /// (the kernel reports the close just before it drops the lock: the
    /// waiting build looks again shortly after).
    #[test]
    fn a_killed_running_hook_frees_its_slot_for_the_next_in_line() {
        let dir = tempfile::tempdir().unwrap();
        let (said, hear) = channel();
        let x = Slots::new(dir.path(), "x", 1, 2);
        let running = Hook::spawn(dir.path(), 2, "running", &said, &hear, "running");
        let t = ticket(x.admit().unwrap());
        let (_stop, never) = nix::unistd::pipe().unwrap();
        let waiter = std::thread::spawn(move || {
            t.wait(&[never.as_fd()], |_| {})
                .map(|s| s.index)
                .map_err(|e| format!("{e:?}"))
        });
        running.kill();
        assert_eq!(waiter.join().unwrap(), Ok(0));
    }

    /// A waiting hook that is killed frees its place at once: the queue
    /// has room again, and the one behind it is next.
    #[test]
    fn a_killed_waiting_hook_frees_its_place_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (said, hear) = channel();
        let x = Slots::new(dir.path(), "x", 1, 2);
        let held = slot(x.admit().unwrap());
        let a = Hook::spawn(dir.path(), 2, "a", &said, &hear, "queued");
        assert_eq!(next(&hear), ("a", "waiting".to_owned()));
        let b = Hook::spawn(dir.path(), 2, "b", &said, &hear, "queued");
        assert_eq!(next(&hear), ("b", "waiting".to_owned()));
        Hook::spawn(dir.path(), 2, "full", &said, &hear, "full").finish();
        a.kill();
        let c = Hook::spawn(dir.path(), 2, "c", &said, &hear, "queued");
        assert_eq!(next(&hear), ("c", "waiting".to_owned()));
        let tickets = |x: &Slots| x.tickets(None, false).unwrap();
        assert_eq!(tickets(&x).len(), 2, "a's ticket is dead and gone");
        drop(held);
        assert_eq!(next(&hear), ("b", "running".to_owned()));
        b.finish();
        assert_eq!(next(&hear), ("c", "running".to_owned()));
        c.finish();
        assert!(tickets(&x).is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("slots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            left.iter().all(|n| !n.contains("wait")),
            "left behind: {left:?}"
        );
    }
}
