//! The `ssh` executor: the admin's command on another machine, run there by
//! `nix-hatch agent` (see [`agent`]) over one SSH channel, its outputs
//! streamed back as tar inside the framed protocol of `protocol::hatch`.
//!
//! The far side builds into a temporary directory, not the store path:
//! outputs are relocated (unpacked into the staging dir under their store
//! base names) and go through the same `store::import` as every other
//! executor. Nothing is imported unless the trailer's length and blake3
//! digest match every byte received; a truncated or corrupted stream leaves
//! only the staging dir, which is removed.

pub mod agent;
pub mod config;
pub mod connect;
mod unpack;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use ssh2::{BlockDirections, Channel};

use super::supervise::Cancel;
use super::{BuildRequest, Failure};
use crate::protocol::buildlog::LogSink;
use crate::protocol::hatch::{
    self, FrameError, Hello, Request, Status, Trailer, HEADER_LEN, MAX_DATA,
};
use config::SshExecutor;
use connect::Connection;

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

pub fn run(
    req: &BuildRequest,
    ssh: &SshExecutor,
    log: &mut dyn LogSink,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let name = &req.executor.name;
    // The agent refuses these too; saying so before connecting is clearer.
    if let Some((o, why)) = hatch::bad_output_name(req.drv.outputs.keys()) {
        return Err(Failure::Builder(format!(
            "executor {name:?}: output {o:?} cannot be an environment variable of the command on the far side: {why}"
        )));
    }
    let request = build_request(req, ssh);
    let target = connect::target(ssh, &req.executor.user);
    log.line(&format!("connecting to {target}"));
    let started = Instant::now();
    let conn = connect::connect(ssh, &req.executor.user).map_err(Failure::Internal)?;
    log.line(&format!(
        "connected to {} (host key {}, cipher {}); running {} agent",
        conn.target,
        conn.host_key,
        conn.cipher,
        shell_quote(&ssh.agent)
    ));
    let mut channel = conn
        .session
        .channel_open("session", CHANNEL_WINDOW, CHANNEL_PACKET, None)
        .map_err(|e| Failure::Internal(format!("ssh {target}: opening a channel: {e}")))?;
    let remote = format!("{} agent", shell_quote(&ssh.agent));
    channel
        .exec(&remote)
        .map_err(|e| Failure::Internal(format!("ssh {target}: running {remote:?}: {e}")))?;
    let payload = request.encode();
    if payload.len() > hatch::MAX_REQUEST as usize {
        return Err(Failure::Internal(format!(
            "executor {name:?}: request of {} bytes is too large",
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

    let roots: BTreeMap<String, std::path::PathBuf> = req
        .outputs
        .iter()
        .map(|(out, path)| {
            (
                out.clone(),
                req.staging
                    .output(req.store.base_name(path).unwrap_or(path)),
            )
        })
        .collect();
    let cancelled = || cancel.is_cancelled();
    let reader = ChannelReader::new(&conn, &mut channel, &cancelled, req.limits);
    let mut frames = Frames::new(reader);
    let result = receive(&mut frames, log, roots);
    let stderr_tail = frames.r.stderr_tail();
    let stopped = frames.r.stopped.take();
    drop(frames);
    // Closing the session ends the channel: the agent sees its stdin end
    // and kills whatever still runs there.
    let _ = conn.session.disconnect(None, "done", None);
    if let Some(f) = stopped {
        return Err(f);
    }
    let received = result.map_err(|e| match e {
        RecvError::Far(m) => Failure::Builder(format!("executor {name:?}: far side: {m}")),
        RecvError::Stream(m) => {
            let tail = crate::util::first_line(&stderr_tail);
            let extra = if tail.is_empty() {
                String::new()
            } else {
                format!(" (agent stderr: {tail})")
            };
            Failure::Internal(format!("executor {name:?}: ssh {target}: {m}{extra}"))
        }
    })?;
    interpret(name, &received, started.elapsed(), log)
}

fn interpret(
    name: &str,
    r: &Received,
    session: Duration,
    log: &mut dyn LogSink,
) -> Result<(), Failure> {
    match r.trailer.status {
        Status::Exited(0) => {}
        Status::Exited(c) => {
            return Err(Failure::Builder(format!(
                "executor {name:?}: command failed on the far side with exit code {c}"
            )))
        }
        Status::Signalled(s) => {
            return Err(Failure::Builder(format!(
                "executor {name:?}: command killed by signal {s} on the far side"
            )))
        }
        Status::TimedOut(s) => {
            return Err(Failure::TimedOut(format!(
                "executor {name:?}: build timed out after {s} seconds; killed"
            )))
        }
        Status::Silent(s) => {
            return Err(Failure::TimedOut(format!(
                "executor {name:?}: no output for {s} seconds (max-silent-time); killed"
            )))
        }
    }
    if let Some(t) = r.transfer {
        let secs = t.as_secs_f64().max(1e-6);
        log.line(&format!(
            "received {} bytes of outputs in {:.3} s ({:.1} MiB/s), digest verified; {:.3} s from connecting to verified outputs",
            r.trailer.tar_bytes,
            secs,
            r.trailer.tar_bytes as f64 / secs / (1024.0 * 1024.0),
            session.as_secs_f64()
        ));
    }
    for o in &r.temp_path_hits {
        log.line(&format!(
            "warning: output {o:?} contains the far side's temporary path {}: outputs built over ssh are relocated into the store, so that path will not exist here (see the README, ssh executor)",
            r.temp_dir
        ));
    }
    Ok(())
}

/// The request: the admin's command plus the derivation's args, and the
/// variables an admin command sees (as for `host`), minus what only makes
/// sense locally.
fn build_request(req: &BuildRequest, ssh: &SshExecutor) -> Request {
    let argv = req.drv.argv_with(ssh.command.iter().map(String::as_str));
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut set = |k: &str, v: &[u8]| env.push((k.as_bytes().to_vec(), v.to_vec()));
    set("NIX_STORE", req.store.store_dir.as_bytes());
    set("NIX_BUILD_CORES", req.cores.as_bytes());
    set("NIX_HATCH_DRV", req.drv.path.as_bytes());
    set("NIX_HATCH_EXECUTOR", req.executor.name.as_bytes());
    for (name, info) in &req.drv.outputs {
        // The store path each output will have here (the command's own
        // `$out` is a temporary path on the far side).
        set(
            &format!("NIX_HATCH_STORE_PATH_{name}"),
            info.path.as_bytes(),
        );
    }
    for var in &ssh.pass_env {
        if let Some(v) = req.drv.drv.environment().get(var) {
            env.push((var.as_bytes().to_vec(), v.to_vec()));
        } else if let Some(v) = req.drv.env_str(var) {
            env.push((var.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
    }
    Request {
        argv,
        env,
        outputs: req.drv.outputs.keys().cloned().collect(),
        timeout: req.limits.timeout.map_or(0, |d| d.as_secs().max(1)),
        max_silent: req.limits.max_silent.map_or(0, |d| d.as_secs().max(1)),
    }
}

/// POSIX shell single-quoting (the remote command line goes through the
/// remote user's shell).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

struct Received {
    trailer: Trailer,
    temp_dir: String,
    temp_path_hits: Vec<String>,
    transfer: Option<Duration>,
}

enum RecvError {
    /// The agent reported a failure (an `Error` frame).
    Far(String),
    /// The stream broke: truncated, corrupted, connection lost.
    Stream(String),
}

fn stream_err(e: FrameError) -> RecvError {
    RecvError::Stream(match e {
        FrameError::Eof { .. } => {
            "the stream ended before its trailer (agent or connection gone); nothing imported"
                .to_owned()
        }
        FrameError::Io(e) => format!("{e}; nothing imported"),
        other => format!("corrupted stream: {other}; nothing imported"),
    })
}

fn receive(
    frames: &mut Frames<ChannelReader<'_>>,
    log: &mut dyn LogSink,
    roots: BTreeMap<String, std::path::PathBuf>,
) -> Result<Received, RecvError> {
    let first = frames.next();
    frames.flush_stderr(log);
    let tag = first.map_err(|e| match e {
        FrameError::Eof { clean: true } => RecvError::Stream(
            "the agent sent nothing: is nix-hatch installed on the far side (executor key `agent`)?"
                .to_owned(),
        ),
        FrameError::BadTag(t) => RecvError::Stream(format!(
            "the far side did not answer as a nix-hatch agent (first byte 0x{t:02x}; does the login shell print something?)"
        )),
        other => stream_err(other),
    })?;
    let hello = match tag {
        hatch::TAG_HELLO => Hello::decode(&frames.payload).map_err(stream_err)?,
        hatch::TAG_ERROR => return Err(RecvError::Far(lossy(&frames.payload))),
        t => {
            return Err(RecvError::Stream(format!(
                "the far side did not answer as a nix-hatch agent (frame {:?} first)",
                t as char
            )))
        }
    };
    if hello.version != hatch::VERSION {
        return Err(RecvError::Stream(format!(
            "the agent speaks protocol version {}, this nix-hatch speaks {}: install the same nix-hatch on both sides",
            hello.version,
            hatch::VERSION
        )));
    }
    check_temp_dir(&hello.temp_dir).map_err(RecvError::Stream)?;
    let mut digest = Digest::default();
    digest.add(&frames.hdr, &frames.payload);
    let needle = hello.temp_dir.as_bytes().to_vec();
    let unpacker = unpack::Unpacker::new(roots, &needle);

    // This thread reads and decrypts; a second one hashes every frame and
    // unpacks the tar data, so both cores work on the transfer.
    let (tx, rx) = mpsc::sync_channel::<Msg>(8);
    let (pool_tx, pool_rx) = mpsc::channel::<Vec<u8>>();
    let mut transfer_start = None;
    let (ended, worker) = std::thread::scope(|s| {
        let worker = s.spawn(move || unpack_worker(rx, pool_tx, digest, unpacker));
        let ended = loop {
            let mut payload = pool_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(MAX_DATA as usize));
            std::mem::swap(&mut payload, &mut frames.payload);
            let tag = frames.next();
            frames.flush_stderr(log);
            let tag = match tag {
                Ok(t) => t,
                Err(e) => break Err(stream_err(e)),
            };
            let mut payload = std::mem::replace(&mut frames.payload, payload);
            match tag {
                hatch::TAG_TRAILER => break Trailer::decode(&payload).map_err(stream_err),
                hatch::TAG_LOG | hatch::TAG_DATA => {
                    let data = tag == hatch::TAG_DATA;
                    if data && transfer_start.is_none() {
                        transfer_start = Some(Instant::now());
                    }
                    if !data {
                        log.raw(&payload);
                    }
                    let hdr = frames.hdr;
                    if tx
                        .send(Msg {
                            hdr,
                            payload: std::mem::take(&mut payload),
                            data,
                        })
                        .is_err()
                    {
                        break Err(RecvError::Stream(
                            "the unpacker thread stopped; nothing imported".into(),
                        ));
                    }
                }
                hatch::TAG_ERROR => break Err(RecvError::Far(lossy(&payload))),
                t => {
                    break Err(RecvError::Stream(format!(
                        "corrupted stream: unexpected frame {:?}; nothing imported",
                        t as char
                    )))
                }
            }
        };
        drop(tx);
        (ended, worker.join())
    });
    let worker = worker.map_err(|_| RecvError::Stream("the unpacker thread panicked".into()))?;
    let trailer = ended?;
    let transfer = transfer_start.map(|s| s.elapsed());
    let (digest, bytes) = (worker.digest, worker.bytes);
    if trailer.stream_bytes != bytes || trailer.digest != digest {
        return Err(RecvError::Stream(format!(
            "corrupted stream: received {bytes} bytes with blake3 {}, the agent sent {} bytes with blake3 {}; nothing imported",
            hatch::hex(&digest),
            trailer.stream_bytes,
            hatch::hex(&trailer.digest)
        )));
    }
    if trailer.tar_bytes != worker.tar_bytes {
        return Err(RecvError::Stream(format!(
            "corrupted stream: {} tar bytes received, the agent sent {}; nothing imported",
            worker.tar_bytes, trailer.tar_bytes
        )));
    }
    // The digest matched: a tar error now is the agent's archive, not the
    // transport (only relevant when the command succeeded).
    if trailer.status.success() {
        if let Err(m) = worker.result {
            return Err(RecvError::Stream(format!(
                "unusable output archive: {m}; nothing imported"
            )));
        }
    }
    Ok(Received {
        trailer,
        temp_dir: hello.temp_dir,
        temp_path_hits: worker.temp_path_hits,
        transfer,
    })
}

/// Longest far-side temporary directory accepted in the `Hello` (it is
/// searched for in every output byte).
const MAX_TEMP_DIR: usize = 4096;

fn check_temp_dir(t: &str) -> Result<(), String> {
    if !t.starts_with('/') || t.len() > MAX_TEMP_DIR {
        return Err(format!(
            "the agent's temporary directory ({} bytes, {:?}...) is not an absolute path of at most {MAX_TEMP_DIR} bytes; nothing imported",
            t.len(),
            t.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    crate::util::first_line(&String::from_utf8_lossy(b)).to_owned()
}

/// Length and blake3 of the frames before the trailer.
#[derive(Default)]
struct Digest {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Digest {
    fn add(&mut self, hdr: &[u8], payload: &[u8]) {
        self.hasher.update(hdr);
        self.hasher.update(payload);
        self.bytes += (hdr.len() + payload.len()) as u64;
    }
}

/// A frame handed to the unpacker thread (every frame before the trailer
/// goes there, in order, for the digest; `data` ones also feed the tar).
struct Msg {
    hdr: [u8; HEADER_LEN],
    payload: Vec<u8>,
    data: bool,
}

struct WorkerResult {
    result: Result<(), String>,
    digest: [u8; 32],
    bytes: u64,
    tar_bytes: u64,
    temp_path_hits: Vec<String>,
}

fn unpack_worker(
    rx: mpsc::Receiver<Msg>,
    pool: mpsc::Sender<Vec<u8>>,
    digest: Digest,
    mut unpacker: unpack::Unpacker<'_>,
) -> WorkerResult {
    let mut src = ChanSource {
        rx,
        pool,
        cur: Vec::new(),
        pos: 0,
        digest,
        tar_bytes: 0,
    };
    let result = (|| {
        // Only start the archive once data comes (a failed command sends
        // none).
        if !src.advance() {
            return Ok(());
        }
        let src = unpacker.unpack(&mut src)?;
        // Whatever follows the archive's end marker, up to the trailer.
        io::copy(src, &mut io::sink())
            .map(|_| ())
            .map_err(|e| e.to_string())
    })();
    // After an error, keep hashing to the end: the digest then tells a
    // corrupted transfer from a bad archive (nothing is imported either way).
    while src.advance() {}
    WorkerResult {
        result,
        digest: *src.digest.hasher.finalize().as_bytes(),
        bytes: src.digest.bytes,
        tar_bytes: src.tar_bytes,
        temp_path_hits: unpacker.temp_path_hits.into_iter().collect(),
    }
}

/// The tar stream, from the frames the reader thread passes on.
struct ChanSource {
    rx: mpsc::Receiver<Msg>,
    pool: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    digest: Digest,
    tar_bytes: u64,
}

impl ChanSource {
    /// Takes the next frame; false at the end of the stream.
    fn advance(&mut self) -> bool {
        loop {
            let Ok(m) = self.rx.recv() else {
                return false;
            };
            self.digest.add(&m.hdr, &m.payload);
            if m.data {
                self.tar_bytes += m.payload.len() as u64;
                let old = std::mem::replace(&mut self.cur, m.payload);
                let _ = self.pool.send(old);
                self.pos = 0;
                return true;
            }
            let _ = self.pool.send(m.payload);
        }
    }
}

impl Read for ChanSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            if !self.advance() {
                return Ok(0);
            }
        }
        let n = (self.cur.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Frames as they arrive.
struct Frames<R: Read> {
    r: R,
    hdr: [u8; HEADER_LEN],
    payload: Vec<u8>,
}

impl<'a> Frames<ChannelReader<'a>> {
    fn new(r: ChannelReader<'a>) -> Self {
        Frames {
            r,
            hdr: [0; HEADER_LEN],
            payload: Vec::with_capacity(MAX_DATA as usize),
        }
    }

    fn flush_stderr(&mut self, log: &mut dyn LogSink) {
        if !self.r.pending_stderr.is_empty() {
            log.raw(&self.r.pending_stderr);
            self.r.pending_stderr.clear();
        }
    }
}

impl<R: Read> Frames<R> {
    fn next(&mut self) -> Result<u8, FrameError> {
        let (tag, len) = hatch::read_header(&mut self.r, &mut self.hdr)?;
        hatch::read_payload(&mut self.r, len, &mut self.payload)?;
        Ok(tag)
    }
}

/// How often cancellation (a poll(2) on the signal pipe) and the limits
/// are looked at while data keeps coming.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// At most this much of the agent's stderr is taken per call of
/// [`ChannelReader::pump_stderr`]: a far side that never stops writing
/// there must not keep the reader from its checks.
const STDERR_PER_PUMP: usize = 64 << 10;

/// `now + limit + GRACE`; `None` (no deadline) when that is beyond what an
/// `Instant` can hold (`--option timeout 9223372036854775807`).
fn deadline_after(now: Instant, limit: Duration) -> Option<Instant> {
    now.checked_add(limit)?.checked_add(GRACE)
}

/// The local side's limits: cancellation, `timeout` and `max-silent-time`
/// (each with [`GRACE`]). Checked both while waiting for the channel and
/// while data flows, so neither a quiet nor a never-ending stream escapes
/// them.
struct Watch<'a> {
    cancelled: &'a dyn Fn() -> bool,
    target: String,
    deadline: Option<(Instant, u64)>,
    silent: Option<(Duration, u64)>,
    last_data: Instant,
    last_checks: Instant,
}

impl<'a> Watch<'a> {
    fn new(cancelled: &'a dyn Fn() -> bool, target: &str, limits: super::Limits) -> Self {
        let now = Instant::now();
        Watch {
            cancelled,
            target: target.to_owned(),
            deadline: limits
                .timeout
                .and_then(|t| Some((deadline_after(now, t)?, t.as_secs()))),
            silent: limits
                .max_silent
                .and_then(|s| Some((s.checked_add(GRACE)?, s.as_secs()))),
            last_data: now,
            last_checks: now,
        }
    }

    /// `timeout` and `max-silent-time` (plain `Instant` comparisons);
    /// `Some` = stop the build.
    fn limits(&self, now: Instant) -> Option<Failure> {
        if let Some((when, secs)) = self.deadline {
            if now >= when {
                return Some(Failure::TimedOut(format!(
                    "build timed out after {secs} seconds ({} did not end it in time); connection closed",
                    self.target
                )));
            }
        }
        if let Some((d, secs)) = self.silent {
            if self.last_data.checked_add(d).is_some_and(|w| now >= w) {
                return Some(Failure::TimedOut(format!(
                    "no output for {secs} seconds (max-silent-time) from {}; connection closed",
                    self.target
                )));
            }
        }
        None
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
struct ChannelReader<'a> {
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
    fn new(
        conn: &'a Connection,
        channel: &'a mut Channel,
        cancelled: &'a dyn Fn() -> bool,
        limits: super::Limits,
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

    fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
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
        if let Some((when, _)) = self.watch.deadline {
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

/// `nix-hatch check --connect`: log in, check the host key, and run
/// `<agent> --version` on the far side.
pub fn check_connect(user: &str, s: &SshExecutor) -> Result<String, String> {
    let conn = connect::connect(s, user)?;
    let t = &conn.target;
    let mut ch = conn
        .session
        .channel_session()
        .map_err(|e| format!("ssh {t}: opening a channel: {e}"))?;
    let cmd = format!("{} --version", shell_quote(&s.agent));
    ch.exec(&cmd)
        .map_err(|e| format!("ssh {t}: running {cmd:?}: {e}"))?;
    let mut out = String::new();
    let mut err = String::new();
    let _ = ch.read_to_string(&mut out);
    let _ = ch.stderr().read_to_string(&mut err);
    let _ = ch.wait_close();
    let status = ch.exit_status().unwrap_or(-1);
    let _ = conn.session.disconnect(None, "done", None);
    if status != 0 {
        let why = crate::util::first_line(&err);
        return Err(format!(
            "ssh {t}: the agent does not run there: `{cmd}` exited with {status}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ));
    }
    Ok(format!(
        "ssh {t}: ok (host key {}, agent {})",
        conn.host_key,
        crate::util::first_line(&out)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn temp_dir_must_be_absolute_and_short() {
        assert!(check_temp_dir("/tmp/nix-hatch-agent.abc123").is_ok());
        assert!(check_temp_dir(&format!("/{}", "a".repeat(MAX_TEMP_DIR - 1))).is_ok());
        for bad in [
            String::new(),
            "tmp/x".to_owned(),
            format!("/{}", "a".repeat(MAX_TEMP_DIR)),
            format!("/{}", "a".repeat(64 << 10)),
        ] {
            let err = check_temp_dir(&bad).unwrap_err();
            assert!(
                err.contains("not an absolute path of at most 4096 bytes"),
                "{err}"
            );
        }
    }

    /// `--option timeout 9223372036854775807` (and a max-silent-time just
    /// as large) means no deadline, not an `Instant` overflow panic.
    #[test]
    fn huge_limits_mean_no_deadline() {
        let now = Instant::now();
        assert!(deadline_after(now, Duration::from_secs(i64::MAX as u64)).is_none());
        assert!(deadline_after(now, Duration::MAX).is_none());
        assert!(deadline_after(now, Duration::from_secs(60)).is_some());
        let never = || false;
        for secs in [i64::MAX as u64, u64::MAX] {
            let limits = super::super::Limits {
                timeout: Some(Duration::from_secs(secs)),
                max_silent: Some(Duration::from_secs(secs)),
            };
            let mut w = Watch::new(&never, "far", limits);
            assert!(w.deadline.is_none());
            assert!(w.limits(Instant::now()).is_none());
            assert!(w.data(Instant::now() + CHECK_EVERY).is_none());
        }
        let w = Watch::new(
            &never,
            "far",
            super::super::Limits {
                timeout: None,
                max_silent: Some(Duration::MAX - Duration::from_secs(1)),
            },
        );
        assert!(w.silent.is_none());
    }

    /// Data that never pauses still meets the deadline and cancellation:
    /// checked on the data path, at most `CHECK_EVERY` late.
    #[test]
    fn data_path_checks_deadline_and_cancel() {
        let never = || false;
        let limits = super::super::Limits {
            timeout: Some(Duration::from_secs(1)),
            max_silent: None,
        };
        let mut w = Watch::new(&never, "far", limits);
        w.deadline = Some((Instant::now(), 1));
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
        let mut w = Watch::new(&cancelled, "far", super::super::Limits::default());
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
