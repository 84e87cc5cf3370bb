//! The agent's SSH channel, as this side uses it: opened on an
//! authenticated session, `<agent> agent` run on it and the request sent
//! ([`start`]); then read with the session non-blocking ([`ChannelReader`]),
//! waiting in poll(2) on the socket so that this side's limits (`timeout`
//! and `max-silent-time`, each with [`GRACE`]), cancellation and a dead
//! connection are noticed whether the channel is quiet or never pauses.
//! The agent's stderr is collected on the way.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use ssh2::{BlockDirections, Channel};

use super::connect::Connection;
use super::shell_quote;
use crate::executors::{Failure, Limits};
use crate::protocol::buildlog::LogSink;
use crate::protocol::hatch::{self, Request};

/// Extra time the local side allows beyond the limits the agent enforces,
/// so the agent's own report wins when it is alive.
const GRACE: Duration = Duration::from_secs(15);
/// Keepalives while the channel is quiet; no byte from the server for
/// `DEAD_AFTER` means the connection is gone.
const KEEPALIVE_SECS: u32 = 10;
const DEAD_AFTER: Duration = Duration::from_secs(45);

/// Receive window of the agent's channel: twice libssh2's 2 MiB, so the far
/// side keeps sending while this side writes a burst to disk (0.78-0.91 →
/// 0.90-1.00 of `ssh cat`). 8 and 16 MiB were faster at best but stalled
/// some transfers (16 MiB: to a third of the speed).
const CHANNEL_WINDOW: u32 = 4 << 20;
/// Largest packet we take: OpenSSH sends 32 KiB; libssh2 accepts ~39 KiB.
const CHANNEL_PACKET: u32 = 32 << 10;

/// Opens the agent's channel on `conn`, runs `<agent> agent` there and
/// sends it `request`. From then on the session is non-blocking, with
/// keepalives.
pub fn start(conn: &Connection, agent: &str, request: &Request) -> Result<Channel, Failure> {
    let target = &conn.target;
    let mut channel = conn
        .session
        .channel_open("session", CHANNEL_WINDOW, CHANNEL_PACKET, None)
        .map_err(|e| Failure::Internal(format!("ssh {target}: opening a channel: {e}")))?;
    let remote = format!("{} agent", shell_quote(agent));
    channel
        .exec(&remote)
        .map_err(|e| Failure::Internal(format!("ssh {target}: running {remote:?}: {e}")))?;
    let payload = request.encode();
    if payload.len() > hatch::MAX_REQUEST as usize {
        return Err(Failure::Internal(format!(
            "request of {} bytes is too large",
            payload.len()
        )));
    }
    channel
        .write_all(&hatch::header(hatch::TAG_REQUEST, payload.len()))
        .and_then(|_| channel.write_all(&payload))
        .and_then(|_| channel.flush())
        .map_err(|e| Failure::Internal(format!("ssh {target}: sending the request: {e}")))?;
    conn.session.set_blocking(false);
    conn.session.set_keepalive(true, KEEPALIVE_SECS);
    Ok(channel)
}

/// How often cancellation (a poll(2) on the signal pipe) and the limits
/// are looked at while data keeps coming.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// At most this much of the agent's stderr is taken per call of
/// [`ChannelReader::pump_stderr`]: a far side that never stops writing
/// there must not keep the reader from its checks.
const STDERR_PER_PUMP: usize = 64 << 10;

/// The local side's limits: cancellation, `timeout` and `max-silent-time`
/// (each with [`GRACE`], through [`Limits::deadline`]). Checked both while
/// waiting for the channel and while data flows, so neither a quiet nor a
/// never-ending stream escapes them.
struct Watch<'a> {
    cancelled: &'a dyn Fn() -> bool,
    target: String,
    /// The build's limits plus [`GRACE`]; none where that is beyond what a
    /// `Duration` holds (`--option timeout 9223372036854775807`).
    limits: Limits,
    /// The build's `timeout` and `max-silent-time` in seconds, for messages.
    secs: (u64, u64),
    start: Instant,
    last_data: Instant,
    last_checks: Instant,
}

impl<'a> Watch<'a> {
    fn new(cancelled: &'a dyn Fn() -> bool, target: &str, limits: Limits) -> Self {
        let now = Instant::now();
        let graced = |l: Option<Duration>| l.and_then(|l| l.checked_add(GRACE));
        let secs = |l: Option<Duration>| l.map_or(0, |l| l.as_secs());
        Watch {
            cancelled,
            target: target.to_owned(),
            limits: Limits {
                timeout: graced(limits.timeout),
                max_silent: graced(limits.max_silent),
            },
            secs: (secs(limits.timeout), secs(limits.max_silent)),
            start: now,
            last_data: now,
            last_checks: now,
        }
    }

    /// When the build must be stopped here, and whether for `timeout`
    /// (`true`) or `max-silent-time`.
    fn deadline(&self) -> Option<(Instant, bool)> {
        self.limits.deadline(self.start, self.last_data)
    }

    /// `timeout` and `max-silent-time` (plain `Instant` comparisons);
    /// `Some` = stop the build.
    fn limits(&self, now: Instant) -> Option<Failure> {
        let (when, total) = self.deadline()?;
        if now < when {
            return None;
        }
        Some(Failure::TimedOut(if total {
            format!(
                "build timed out after {} seconds ({} did not end it in time); connection closed",
                self.secs.0, self.target
            )
        } else {
            format!(
                "no output for {} seconds (max-silent-time) from {}; connection closed",
                self.secs.1, self.target
            )
        }))
    }

    /// Data arrived. Every [`CHECK_EVERY`] (an `Instant` comparison
    /// otherwise, so a fast stream stays fast): cancellation and the limits.
    fn data(&mut self, now: Instant) -> Option<Failure> {
        self.last_data = now;
        if now.saturating_duration_since(self.last_checks) < CHECK_EVERY {
            return None;
        }
        self.last_checks = now;
        if (self.cancelled)() {
            return Some(Failure::Cancelled);
        }
        self.limits(now)
    }
}

/// Reads the channel with the session non-blocking: waits in poll(2) on the
/// socket, so timeouts, cancellation and a dead connection are noticed.
/// The agent's stderr is collected on the way (an unread stderr would
/// stall the channel).
pub struct ChannelReader<'a> {
    conn: &'a Connection,
    channel: &'a mut Channel,
    watch: Watch<'a>,
    last_inbound: Instant,
    last_keepalive: Instant,
    pending_stderr: Vec<u8>,
    tail: Vec<u8>,
    stopped: Option<Failure>,
}

impl<'a> ChannelReader<'a> {
    pub fn new(
        conn: &'a Connection,
        channel: &'a mut Channel,
        cancelled: &'a dyn Fn() -> bool,
        limits: Limits,
    ) -> Self {
        let now = Instant::now();
        ChannelReader {
            conn,
            channel,
            watch: Watch::new(cancelled, &conn.target, limits),
            last_inbound: now,
            last_keepalive: now,
            pending_stderr: Vec::new(),
            tail: Vec::new(),
            stopped: None,
        }
    }

    /// The last 4 KiB the agent wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }

    /// Why this side stopped the build (limits, cancellation), if it did.
    pub fn take_stopped(&mut self) -> Option<Failure> {
        self.stopped.take()
    }

    /// Copies what the agent wrote to stderr since the last call to `log`.
    pub fn flush_stderr(&mut self, log: &mut dyn LogSink) {
        if !self.pending_stderr.is_empty() {
            log.raw(&self.pending_stderr);
            self.pending_stderr.clear();
        }
    }

    /// Takes what the agent wrote to stderr, at most [`STDERR_PER_PUMP`].
    fn pump_stderr(&mut self) {
        let mut buf = [0u8; 8192];
        let mut s = self.channel.stderr();
        let mut taken = 0;
        while taken < STDERR_PER_PUMP {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            taken += n;
            if self.pending_stderr.len() < (1 << 20) {
                self.pending_stderr.extend_from_slice(&buf[..n]);
            }
            self.tail.extend_from_slice(&buf[..n]);
            if self.tail.len() > 4096 {
                let cut = self.tail.len() - 4096;
                self.tail.drain(..cut);
            }
        }
    }

    fn stop(&mut self, f: Failure) -> io::Error {
        let msg = f.to_string();
        self.stopped = Some(f);
        io::Error::other(msg)
    }

    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        // A poll(2) of its own: at most every CHECK_EVERY while data flows.
        if now.saturating_duration_since(self.last_keepalive) >= CHECK_EVERY {
            self.last_keepalive = now;
            if (self.watch.cancelled)() {
                return Err(self.stop(Failure::Cancelled));
            }
            let _ = self.conn.session.keepalive_send();
        }
        let mut next = now + Duration::from_millis(250);
        if let Some(f) = self.watch.limits(now) {
            return Err(self.stop(f));
        }
        if let Some((when, _)) = self.watch.deadline() {
            next = next.min(when);
        }
        if now.duration_since(self.last_inbound) > DEAD_AFTER {
            return Err(io::Error::other(format!(
                "connection to {} lost: nothing received for {} seconds, not even keepalive replies",
                self.conn.target,
                DEAD_AFTER.as_secs()
            )));
        }
        let events = match self.conn.session.block_directions() {
            BlockDirections::Outbound => PollFlags::POLLOUT,
            BlockDirections::Both => PollFlags::POLLIN | PollFlags::POLLOUT,
            _ => PollFlags::POLLIN,
        };
        let mut fds = [PollFd::new(self.conn.socket.as_fd(), events)];
        let ms = next
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, 250) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::other(format!("poll: {e}"))),
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
        {
            self.last_inbound = Instant::now();
        }
        Ok(())
    }
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.channel.read(buf) {
                Ok(0) => {
                    if self.channel.eof() {
                        self.pump_stderr();
                        return Ok(0);
                    }
                }
                Ok(n) => {
                    let now = Instant::now();
                    self.last_inbound = now;
                    // A stream that never pauses (or a far side sending
                    // one-byte frames) never reaches `wait`: the limits
                    // and cancellation are checked here too.
                    if let Some(f) = self.watch.data(now) {
                        return Err(self.stop(f));
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "connection to {} lost: {e}",
                        self.conn.target
                    )))
                }
            }
            self.pump_stderr();
            if self.channel.eof() {
                return Ok(0);
            }
            self.wait()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// `--option timeout 9223372036854775807` (and a max-silent-time just
    /// as large) means no deadline, not an `Instant` overflow panic.
    #[test]
    fn huge_limits_mean_no_deadline() {
        let never = || false;
        let w = Watch::new(
            &never,
            "far",
            Limits {
                timeout: Some(Duration::from_secs(60)),
                max_silent: None,
            },
        );
        assert!(w.deadline().is_some());
        for secs in [i64::MAX as u64, u64::MAX] {
            let limits = Limits {
                timeout: Some(Duration::from_secs(secs)),
                max_silent: Some(Duration::from_secs(secs)),
            };
            let mut w = Watch::new(&never, "far", limits);
            assert!(w.deadline().is_none());
            assert!(w.limits(Instant::now()).is_none());
            assert!(w.data(Instant::now() + CHECK_EVERY).is_none());
        }
        let w = Watch::new(
            &never,
            "far",
            Limits {
                timeout: None,
                max_silent: Some(Duration::MAX - Duration::from_secs(1)),
            },
        );
        assert!(w.limits.max_silent.is_none());
        assert!(w.deadline().is_none());
    }

    /// Data that never pauses still meets the deadline and cancellation:
    /// checked on the data path, at most `CHECK_EVERY` late.
    #[test]
    fn data_path_checks_deadline_and_cancel() {
        let never = || false;
        let limits = Limits {
            timeout: Some(Duration::from_secs(1)),
            max_silent: None,
        };
        let mut w = Watch::new(&never, "far", limits);
        // The deadline (1 s + grace) is now.
        w.limits.timeout = Some(Duration::ZERO);
        let start = Instant::now();
        let f = loop {
            if let Some(f) = w.data(Instant::now()) {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "deadline ignored");
        };
        assert!(matches!(f, Failure::TimedOut(ref m) if m.contains("timed out after 1 seconds")));
        assert!(start.elapsed() <= CHECK_EVERY * 4, "{:?}", start.elapsed());

        let flag = Cell::new(false);
        let calls = Cell::new(0u64);
        let cancelled = || {
            calls.set(calls.get() + 1);
            flag.get()
        };
        let mut w = Watch::new(&cancelled, "far", Limits::default());
        // A fast stream: the (syscall) cancel check is rate-limited.
        for _ in 0..100_000 {
            assert!(w.data(Instant::now()).is_none());
        }
        assert!(calls.get() < 100, "{} cancel checks", calls.get());
        flag.set(true);
        let start = Instant::now();
        let f = loop {
            if let Some(f) = w.data(Instant::now()) {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "cancel ignored");
        };
        assert!(matches!(f, Failure::Cancelled));
        assert!(start.elapsed() <= CHECK_EVERY * 4, "{:?}", start.elapsed());
    }
}
