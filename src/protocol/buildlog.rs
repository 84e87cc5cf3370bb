//! The build log: fd 4, which Nix stores for `nix log` and whose tail it
//! prints when a build fails. This is where the builder's own output goes,
//! as raw bytes; nix-hatch's own lines (`nix-hatch: …`) go through
//! `tracing` ([`super::messages`]), which writes them to the same fd.
//!
//! Executors and the process supervisor write to a [`LogSink`], not to fd 4
//! itself: in the hook that is the [`BuildLog`]; in `nix-hatch agent` on
//! the far side of an `ssh` executor, `Log` frames on the channel.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;

use crate::protocol::log::{msg_line, Level};

pub const LOG_FD: i32 = 4;

/// How long a finished hook waits for Nix to read the rest of its log
/// ([`wait_until_read`]).
pub const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits, at most `limit`, until Nix has read everything written to the
/// build log (fd 4), so that nothing written to it is lost when the hook
/// exits.
///
/// Nix stops reading the log as soon as the hook's stderr ends, at its
/// exit, and reads at most 4 KiB per round: whatever is still in the pipe
/// then is missing from what Nix prints and from `nix log` alike. After a
/// builder that floods its output, that is the tail — the lines saying
/// why the build failed. A pipe has no event for "empty", so this looks
/// every millisecond (`FIONREAD`); at once when it is empty or not a pipe.
pub fn wait_until_read(limit: std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        let mut unread: nix::libc::c_int = 0;
        // SAFETY: FIONREAD on fd 4 writes one int; on a closed or
        // non-pipe descriptor it fails, which ends the wait.
        let ok = unsafe { nix::libc::ioctl(LOG_FD, nix::libc::FIONREAD, &mut unread) } == 0;
        if !ok || unread <= 0 || start.elapsed() >= limit {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Where a build's output goes: the builder's bytes as they come.
pub trait LogSink {
    /// Builder output, passed through as it comes.
    fn raw(&mut self, data: &[u8]);

    /// Whether the reader is gone for good: a supervised process whose
    /// output can no longer go anywhere is stopped. The build log never is
    /// (a write Nix does not take fails nothing; Nix notices on its own).
    fn gone(&self) -> bool {
        false
    }
}

/// The hook's build log (fd 4).
pub struct BuildLog {
    sink: Sink,
}

enum Sink {
    Fd(File),
    /// No fd 4 (run by hand): structured messages on stderr.
    Stderr,
    /// Tests.
    Memory(Vec<u8>),
}

impl BuildLog {
    /// The log Nix gave us on fd 4, or stderr when there is none.
    pub fn from_nix() -> BuildLog {
        if crate::util::fd_is_open(LOG_FD) {
            // SAFETY: fd 4 is open and nothing else in this process owns it;
            // Nix opened it for exactly this purpose.
            let f = unsafe { File::from_raw_fd(LOG_FD) };
            BuildLog { sink: Sink::Fd(f) }
        } else {
            BuildLog { sink: Sink::Stderr }
        }
    }

    pub fn memory() -> BuildLog {
        BuildLog {
            sink: Sink::Memory(Vec::new()),
        }
    }

    pub fn contents(&self) -> &[u8] {
        match &self.sink {
            Sink::Memory(v) => v,
            _ => &[],
        }
    }
}

impl LogSink for BuildLog {
    fn raw(&mut self, data: &[u8]) {
        // A log that can't be written (Nix went away) must not fail the
        // build by itself; Nix notices on its own.
        let _ = match &mut self.sink {
            Sink::Fd(f) => f.write_all(data),
            Sink::Stderr => {
                let text = String::from_utf8_lossy(data);
                let mut err = io::stderr().lock();
                text.lines()
                    .try_for_each(|l| err.write_all(msg_line(Level::Info, l).as_bytes()))
            }
            Sink::Memory(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        };
    }
}
