//! Running a process with its output streamed to a [`LogSink`], under
//! `timeout` / `max-silent-time` ([`Limits::deadline`]), and stoppable by a
//! signal ([`Cancel`]) or by the end of a peer. One loop serves every
//! executor and the `ssh` executor's far side (`ssh::agent`), whose sink
//! writes `Log` frames to the channel and whose peer is that channel.
//!
//! A stopped process takes its whole tree with it; the caller says how
//! ([`Tree`]). The local executors start their builders so that killing
//! the direct child ends every descendant (a pid namespace whose init dies
//! with it, [`RunnerTree`]); the agent kills the command's process group or
//! pid namespace and reaps its orphans as child subreaper.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SaFlags, Signal};
use nix::unistd::Pid;

use super::Limits;
use crate::protocol::buildlog::LogSink;

/// A self-pipe that becomes readable when this process gets SIGTERM,
/// SIGINT or SIGHUP.
pub struct Cancel {
    read: File,
}

impl Cancel {
    /// Installs the handlers (only after `# accept`: the `try` path stays
    /// free of them). Interrupted system calls are restarted.
    pub fn install() -> io::Result<Cancel> {
        Cancel::install_with(SaFlags::SA_RESTART)
    }

    /// As [`Cancel::install`], for a process that blocks writing to a peer
    /// that may stall (the agent's channel): a blocked read or write
    /// returns EINTR instead of being restarted, and a periodic no-op
    /// SIGALRM makes sure a signal that lands just before a blocking write
    /// still interrupts it; the writer then asks [`Cancel::signalled`].
    /// Interval timers are not inherited by children.
    pub fn install_interrupting() -> io::Result<Cancel> {
        use nix::sys::signal::{sigaction, SigAction, SigHandler, SigSet};
        let cancel = Cancel::install_with(SaFlags::empty())?;
        let tick = SigAction::new(
            SigHandler::Handler(on_tick),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing.
        unsafe { sigaction(Signal::SIGALRM, &tick) }.map_err(io::Error::from)?;
        let period = nix::libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let timer = nix::libc::itimerval {
            it_interval: period,
            it_value: period,
        };
        // SAFETY: plain syscall with valid pointers.
        if unsafe { nix::libc::setitimer(nix::libc::ITIMER_REAL, &timer, std::ptr::null_mut()) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cancel)
    }

    fn install_with(flags: SaFlags) -> io::Result<Cancel> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        let write_fd = write.as_raw_fd();
        // The write end lives as long as the process: handlers refer to it.
        std::mem::forget(write);
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set_handler(sig, write_fd, flags)?;
        }
        Ok(Cancel {
            read: File::from(read),
        })
    }

    /// A cancel that never fires (tests, CLI).
    pub fn never() -> io::Result<Cancel> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        std::mem::forget(write);
        Ok(Cancel {
            read: File::from(read),
        })
    }

    pub fn is_cancelled(&self) -> bool {
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Whether one of the signals has arrived: [`Cancel::is_cancelled`]
    /// without a system call, for a write loop that gets EINTR.
    pub fn signalled() -> bool {
        SIGNALLED.load(Ordering::Relaxed)
    }

    /// The flag behind [`Cancel::signalled`], for work that checks it
    /// between steps (reading outputs into the store).
    pub fn flag() -> &'static AtomicBool {
        &SIGNALLED
    }
}

/// Readable once one of the signals has arrived: for a caller that polls
/// other descriptors too.
impl AsFd for Cancel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

static CANCEL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
    let fd = CANCEL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the fd stays open forever.
        unsafe {
            nix::libc::write(fd, b"x".as_ptr().cast(), 1);
        }
    }
}

extern "C" fn on_tick(_: nix::libc::c_int) {}

fn set_handler(sig: Signal, write_fd: i32, flags: SaFlags) -> io::Result<()> {
    use nix::sys::signal::{sigaction, SigAction, SigHandler, SigSet};
    CANCEL_FD.store(write_fd, Ordering::Relaxed);
    let action = SigAction::new(SigHandler::Handler(on_signal), flags, SigSet::empty());
    // SAFETY: the handler only calls write(2) on a descriptor that is never closed.
    unsafe { sigaction(sig, &action) }.map_err(io::Error::from)?;
    Ok(())
}

#[derive(Debug)]
pub enum Outcome {
    Exited(ExitStatus),
    TimedOut(Duration),
    Silent(Duration),
    /// A signal to this process ([`Cancel`]).
    Cancelled,
    /// The output's reader went away: the peer ended, or the sink is
    /// [`LogSink::gone`]. Nothing is drained.
    ReaderGone,
}

/// Supervision itself failed; the process tree was ended.
#[derive(Debug)]
pub enum Error {
    Poll(nix::errno::Errno),
    /// Reading the process's output.
    Read(io::Error),
    /// Waiting for the process that exited.
    Wait(io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Poll(e) => e.into(),
            Error::Read(e) | Error::Wait(e) => e,
        }
    }
}

/// How a supervised process and everything it started are ended.
pub trait Tree {
    /// Kills the child and everything it started, and reaps the child;
    /// returns once none of it runs (or a bounded wait has passed).
    fn kill(&mut self, child: &mut Child);

    /// The child has exited and was reaped: ends what it left behind.
    fn exited(&mut self, _child: &mut Child) {}
}

/// The local executors' builders: the child is the runner, whose own child
/// is pid 1 of the build's pid namespace and dies with it.
pub struct RunnerTree;

impl Tree for RunnerTree {
    fn kill(&mut self, child: &mut Child) {
        // The runner's child is pid 1 of the build's pid namespace; it dies
        // with the runner, and its exit is reported only once the kernel has
        // reaped every process of the namespace: waiting for it means nothing
        // of the build runs on when we return (and remove staging).
        let inits: Vec<_> = children_of(child.id())
            .into_iter()
            .filter_map(crate::util::pidfd_open)
            .collect();
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        let end = Instant::now() + Duration::from_secs(10);
        for fd in &inits {
            let left = end.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, ms) {}
        }
    }
}

/// What a supervised process answers to besides its output.
pub struct Supervision<'a> {
    pub limits: Limits,
    pub cancel: &'a Cancel,
    /// A descriptor whose end stops the process ([`Outcome::ReaderGone`]):
    /// the agent's channel. Nothing is expected on it; what comes is
    /// dropped.
    pub peer: Option<&'a mut File>,
    /// Another writer of nix-hatch's own lines (e.g. the jail's proxy),
    /// copied into the log as they come; see [`run_logged_with`].
    pub side: Option<&'a mut File>,
}

/// Spawns `cmd` with stdout and stderr on one pipe copied to `log`, and
/// waits for it under `limits`. On timeout or cancel the child is killed
/// with SIGKILL and the pipe drained until every writer is gone.
pub fn run_logged(
    cmd: Command,
    log: &mut dyn LogSink,
    limits: Limits,
    cancel: &Cancel,
) -> io::Result<Outcome> {
    run_logged_with(cmd, log, limits, cancel, None)
}

/// [`run_logged`], also copying whole lines from `side` (another writer of
/// nix-hatch's own lines, e.g. the jail's proxy) into the log as they
/// come. Side lines do not count as the builder's output for
/// `max-silent-time`; a side line that arrives while the builder is in the
/// middle of a line starts on a new one.
pub fn run_logged_with(
    mut cmd: Command,
    log: &mut dyn LogSink,
    limits: Limits,
    cancel: &Cancel,
    side: Option<&mut File>,
) -> io::Result<Outcome> {
    let read = output_pipe(&mut cmd)?;
    let child = cmd.spawn()?;
    // Drop our copies of the write end (they live inside `cmd`).
    drop(cmd);
    let s = Supervision {
        limits,
        cancel,
        peer: None,
        side,
    };
    Ok(supervise(child, read, log, &mut RunnerTree, s)?)
}

/// Points `cmd`'s stdout and stderr at one new pipe (stdin at /dev/null)
/// and returns its read end. The write ends live in `cmd`: drop it once
/// the process is spawned.
pub fn output_pipe(cmd: &mut Command) -> io::Result<File> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let write2 = write.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    Ok(File::from(read))
}

/// Copies `child`'s output (`output`, see [`output_pipe`]) to `log` until
/// it exits, its limits pass, a signal or the end of the peer stops it, or
/// the log is gone. A stopped child is ended with `tree`; after a timeout
/// or a signal what it wrote last is still copied, until every writer is
/// gone.
pub fn supervise(
    mut child: Child,
    mut read: File,
    log: &mut dyn LogSink,
    tree: &mut dyn Tree,
    s: Supervision<'_>,
) -> Result<Outcome, Error> {
    let Supervision {
        limits,
        cancel,
        mut peer,
        mut side,
    } = s;
    let pidfd = crate::util::pidfd_open(child.id());
    let start = Instant::now();
    let mut last_output = start;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pipe_open = true;
    let mut mid_line = false;
    loop {
        let now = Instant::now();
        let deadline = limits.deadline(start, last_output);
        if let Some((when, total)) = deadline {
            if now >= when {
                tree.kill(&mut child);
                drain(&mut read, log, pipe_open, Duration::from_secs(10));
                return Ok(if total {
                    Outcome::TimedOut(limits.timeout.unwrap_or_default())
                } else {
                    Outcome::Silent(limits.max_silent.unwrap_or_default())
                });
            }
        }
        let timeout = match deadline {
            Some((when, _)) => PollTimeout::try_from(
                when.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1,
            )
            .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let ready = {
            // Where each descriptor is in `fds`, if it is polled.
            let mut at = Ready::<Option<usize>>::default();
            let mut fds = Vec::with_capacity(5);
            if pipe_open {
                at.pipe = push(&mut fds, read.as_fd());
            }
            at.cancel = push(&mut fds, cancel.read.as_fd());
            if let Some(p) = &pidfd {
                at.exited = push(&mut fds, p.as_fd());
            }
            if let Some(f) = &peer {
                at.peer = push(&mut fds, f.as_fd());
            }
            if let Some(f) = &side {
                at.side = push(&mut fds, f.as_fd());
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Not left running unsupervised while staging goes.
                    drop(fds);
                    tree.kill(&mut child);
                    return Err(Error::Poll(e));
                }
            }
            let ready = |i: Option<usize>| {
                i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
            };
            Ready {
                pipe: ready(at.pipe),
                cancel: ready(at.cancel),
                exited: ready(at.exited),
                peer: ready(at.peer),
                side: ready(at.side),
            }
        };
        if ready.side {
            if let Some(f) = side.as_deref_mut() {
                match f.read(&mut buf) {
                    Ok(0) => side = None,
                    Ok(n) => {
                        if mid_line {
                            log.raw(b"\n");
                            mid_line = false;
                        }
                        log.raw(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => side = None,
                }
            }
        }
        if ready.cancel {
            tree.kill(&mut child);
            drain(&mut read, log, pipe_open, Duration::from_secs(10));
            return Ok(Outcome::Cancelled);
        }
        if ready.peer {
            if let Some(f) = peer.as_deref_mut() {
                // Any readable state but data is the end of the peer.
                let mut b = [0u8; 256];
                if let Ok(0) | Err(_) = f.read(&mut b) {
                    tree.kill(&mut child);
                    return Ok(Outcome::ReaderGone);
                }
            }
        }
        if ready.pipe {
            match read.read(&mut buf) {
                Ok(0) => pipe_open = false,
                Ok(n) => {
                    log.raw(&buf[..n]);
                    mid_line = buf[n - 1] != b'\n';
                    last_output = Instant::now();
                    if log.gone() {
                        tree.kill(&mut child);
                        return Ok(Outcome::ReaderGone);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tree.kill(&mut child);
                    return Err(Error::Read(e));
                }
            }
        }
        if ready.exited || (!pipe_open && pidfd.is_none()) {
            let status = child.wait();
            tree.exited(&mut child);
            let status = status.map_err(Error::Wait)?;
            // The tree is gone with the child; whatever is still buffered
            // in the pipe belongs in the log.
            drain(&mut read, log, pipe_open, Duration::from_secs(5));
            return Ok(Outcome::Exited(status));
        }
        // Output closed but the process lives on: keep waiting on the pidfd.
    }
}

/// Polls `fd` for input; its index in `fds`.
fn push<'f>(fds: &mut Vec<PollFd<'f>>, fd: BorrowedFd<'f>) -> Option<usize> {
    fds.push(PollFd::new(fd, PollFlags::POLLIN));
    Some(fds.len() - 1)
}

/// One of each descriptor [`supervise`] polls.
#[derive(Default)]
struct Ready<T> {
    pipe: T,
    cancel: T,
    exited: T,
    peer: T,
    side: T,
}

/// The children of process `pid` (its main thread's), from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Copies what is left in the pipe until EOF (every writer gone), `limit`,
/// or the log is gone.
fn drain(read: &mut File, log: &mut dyn LogSink, pipe_open: bool, limit: Duration) {
    if !pipe_open {
        return;
    }
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    while !log.gone() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => return,
            Ok(_) => match read.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => log.raw(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::buildlog::BuildLog;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn output_is_streamed_and_status_returned() {
        let mut log = BuildLog::memory();
        let out = run_logged(
            sh("echo out; echo err >&2; exit 3"),
            &mut log,
            Limits::default(),
            &Cancel::never().unwrap(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::Exited(s) if s.code() == Some(3)));
        let text = String::from_utf8_lossy(log.contents());
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
    }

    #[test]
    fn timeout_kills() {
        let mut log = BuildLog::memory();
        let limits = Limits {
            timeout: Some(Duration::from_millis(300)),
            max_silent: None,
        };
        let t = Instant::now();
        let out = run_logged(
            sh("echo started; exec sleep 30"),
            &mut log,
            limits,
            &Cancel::never().unwrap(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::TimedOut(_)), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(String::from_utf8_lossy(log.contents()).contains("started"));
    }

    #[test]
    fn silence_kills_but_output_resets_it() {
        let mut log = BuildLog::memory();
        let limits = Limits {
            timeout: None,
            max_silent: Some(Duration::from_millis(700)),
        };
        let out = run_logged(
            sh("for i in 1 2 3 4; do echo tick; sleep 0.3; done; exit 0"),
            &mut log,
            limits,
            &Cancel::never().unwrap(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::Exited(s) if s.success()), "{out:?}");
        let out = run_logged(
            sh("exec sleep 30"),
            &mut log,
            limits,
            &Cancel::never().unwrap(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::Silent(_)), "{out:?}");
    }

    #[test]
    fn exit_is_noticed_while_a_descendant_holds_the_pipe() {
        let mut log = BuildLog::memory();
        // The background sleep keeps stdout open after the shell exits.
        let out = run_logged(
            sh("sleep 3 & echo bye"),
            &mut log,
            Limits::default(),
            &Cancel::never().unwrap(),
        )
        .unwrap();
        assert!(matches!(out, Outcome::Exited(s) if s.success()));
        assert!(String::from_utf8_lossy(log.contents()).contains("bye"));
    }
}
