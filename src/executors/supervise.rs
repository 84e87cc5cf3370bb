//! Running a process with its output streamed to the build log, under
//! `timeout` / `max-silent-time`, and stoppable by a signal to the hook.
//! A killed process takes its whole tree with it: executors start their
//! builders so that killing the direct child ends every descendant (a pid
//! namespace whose init dies with it).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::Limits;
use crate::protocol::buildlog::LogSink;

/// A self-pipe that becomes readable when the hook gets SIGTERM, SIGINT or
/// SIGHUP.
pub struct Cancel {
    read: File,
}

impl Cancel {
    /// Installs the handlers (only after `# accept`: the `try` path stays
    /// free of them).
    pub fn install() -> io::Result<Cancel> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        let write_fd = write.as_raw_fd();
        // The write end lives as long as the process: handlers refer to it.
        std::mem::forget(write);
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set_handler(sig, write_fd)?;
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
}

static CANCEL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_: nix::libc::c_int) {
    let fd = CANCEL_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the fd stays open forever.
        unsafe {
            nix::libc::write(fd, b"x".as_ptr().cast(), 1);
        }
    }
}

fn set_handler(sig: Signal, write_fd: i32) -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    CANCEL_FD.store(write_fd, std::sync::atomic::Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only calls write(2) on a descriptor that is never closed.
    unsafe { sigaction(sig, &action) }.map_err(io::Error::from)?;
    Ok(())
}

#[derive(Debug)]
pub enum Outcome {
    Exited(ExitStatus),
    TimedOut(Duration),
    Silent(Duration),
    Cancelled,
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
    mut side: Option<&mut File>,
) -> io::Result<Outcome> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let write2 = write.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    let mut child = cmd.spawn()?;
    // Drop our copies of the write end (they live inside `cmd`).
    drop(cmd);
    let pidfd = crate::util::pidfd_open(child.id());
    let mut read = File::from(read);
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
                kill_and_drain(&mut child, &mut read, log, pipe_open);
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
        let (pipe_ready, exited, cancelled, side_ready) = {
            let mut fds = Vec::with_capacity(4);
            if pipe_open {
                fds.push(PollFd::new(read.as_fd(), PollFlags::POLLIN));
            }
            fds.push(PollFd::new(cancel.read.as_fd(), PollFlags::POLLIN));
            if let Some(p) = &pidfd {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(f) = &side {
                fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Not left running unsupervised while staging goes.
                    drop(fds);
                    kill_and_drain(&mut child, &mut read, log, false);
                    return Err(e.into());
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let mut i = 0;
            let pipe_ready = pipe_open && {
                i += 1;
                ready(&fds[0])
            };
            let cancelled = ready(&fds[i]);
            let exited = pidfd.is_some() && ready(&fds[i + 1]);
            let side_ready = side.is_some() && ready(&fds[fds.len() - 1]);
            (pipe_ready, exited, cancelled, side_ready)
        };
        if side_ready {
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
        if cancelled {
            kill_and_drain(&mut child, &mut read, log, pipe_open);
            return Ok(Outcome::Cancelled);
        }
        if pipe_ready {
            match read.read(&mut buf) {
                Ok(0) => pipe_open = false,
                Ok(n) => {
                    log.raw(&buf[..n]);
                    mid_line = buf[n - 1] != b'\n';
                    last_output = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    kill_and_drain(&mut child, &mut read, log, false);
                    return Err(e);
                }
            }
        }
        if exited || (!pipe_open && pidfd.is_none()) {
            let status = child.wait()?;
            // The tree is gone with the child (pid namespace); whatever is
            // still buffered in the pipe belongs in the log.
            drain(&mut read, log, pipe_open, Duration::from_secs(5));
            return Ok(Outcome::Exited(status));
        }
        if !pipe_open && !exited {
            // Output closed but the process lives on: keep waiting on the pidfd.
            continue;
        }
    }
}

fn kill_and_drain(child: &mut Child, read: &mut File, log: &mut dyn LogSink, pipe_open: bool) {
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
    drain(read, log, pipe_open, Duration::from_secs(10));
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

/// Copies what is left in the pipe until EOF (every writer gone) or `limit`.
fn drain(read: &mut File, log: &mut dyn LogSink, pipe_open: bool, limit: Duration) {
    if !pipe_open {
        return;
    }
    let end = Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
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
