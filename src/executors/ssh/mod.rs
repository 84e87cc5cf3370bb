//! The `ssh` executor: the admin's command on another machine, run there by
//! `nix-hatch agent` (see `cli::agent`) over one SSH channel, its outputs
//! streamed back as tar inside the framed protocol of `protocol::hatch`.
//!
//! The far side builds into a temporary directory, not the store path:
//! outputs are relocated (unpacked into the staging dir under their store
//! base names) and go through the same `store::import` as every other
//! executor. Nothing is imported unless the trailer's length and blake3
//! digest match every byte received; a truncated or corrupted stream leaves
//! only the staging dir, which is removed.

pub mod config;
pub mod connect;
mod unpack;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use ssh2::{BlockDirections, Channel};

use super::supervise::Cancel;
use super::{BuildRequest, Failure};
use crate::hook::buildlog::BuildLog;
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

pub fn run(
    req: &BuildRequest,
    ssh: &SshExecutor,
    log: &mut BuildLog,
    cancel: &Cancel,
) -> Result<(), Failure> {
    let name = &req.executor.name;
    let request = build_request(req, ssh);
    let target = connect::target(ssh, &req.executor.user);
    log.line(&format!("connecting to {target}"));
    let conn = connect::connect(ssh, &req.executor.user).map_err(Failure::Internal)?;
    log.line(&format!(
        "connected to {} (host key {}); running {} agent",
        conn.target,
        conn.host_key,
        shell_quote(&ssh.agent)
    ));
    let mut channel = conn
        .session
        .channel_session()
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
    let reader = ChannelReader::new(&conn, &mut channel, cancel, req.limits);
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
    interpret(name, &received, log)
}

fn interpret(name: &str, r: &Received, log: &mut BuildLog) -> Result<(), Failure> {
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
            "received {} bytes of outputs in {:.3} s ({:.1} MiB/s), digest verified",
            r.trailer.tar_bytes,
            secs,
            r.trailer.tar_bytes as f64 / secs / (1024.0 * 1024.0)
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
    let mut argv: Vec<Vec<u8>> = ssh.command.iter().map(|a| a.as_bytes().to_vec()).collect();
    argv.extend(
        req.drv
            .drv
            .arguments()
            .iter()
            .map(|a| a.as_bytes().to_vec()),
    );
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut set = |k: &str, v: &[u8]| env.push((k.as_bytes().to_vec(), v.to_vec()));
    set("NIX_STORE", req.store.dir.as_bytes());
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
    log: &mut BuildLog,
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
    let needle = hello.temp_dir.as_bytes().to_vec();
    let mut unpacker = unpack::Unpacker::new(roots, &needle);
    let mut transfer = None;
    let trailer = loop {
        let tag = frames.next();
        frames.flush_stderr(log);
        match tag.map_err(stream_err)? {
            hatch::TAG_LOG => log.raw(&frames.payload),
            hatch::TAG_DATA => {
                let start = Instant::now();
                let mut src = TarSource {
                    frames: &mut *frames,
                    log: &mut *log,
                    pos: 0,
                    trailer: None,
                    far_error: None,
                };
                let res = unpacker.unpack(&mut src).and_then(|src| {
                    // Whatever follows the archive's end marker, up to
                    // the trailer.
                    io::copy(src, &mut io::sink())
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                if let Some(m) = src.far_error.take() {
                    return Err(RecvError::Far(m));
                }
                if let Err(m) = res {
                    return Err(RecvError::Stream(format!(
                        "truncated or corrupted output stream: {m}; nothing imported"
                    )));
                }
                let Some(t) = src.trailer.take() else {
                    return Err(RecvError::Stream(
                        "the stream ended before its trailer; nothing imported".to_owned(),
                    ));
                };
                transfer = Some(start.elapsed());
                break t;
            }
            hatch::TAG_TRAILER => break Trailer::decode(&frames.payload).map_err(stream_err)?,
            hatch::TAG_ERROR => return Err(RecvError::Far(lossy(&frames.payload))),
            t => {
                return Err(RecvError::Stream(format!(
                    "corrupted stream: unexpected frame {:?}; nothing imported",
                    t as char
                )))
            }
        }
    };
    let (digest, bytes) = (*frames.hasher.finalize().as_bytes(), frames.bytes);
    if trailer.stream_bytes != bytes || trailer.digest != digest {
        return Err(RecvError::Stream(format!(
            "corrupted stream: received {bytes} bytes with blake3 {}, the agent sent {} bytes with blake3 {}; nothing imported",
            hatch::hex(&digest),
            trailer.stream_bytes,
            hatch::hex(&trailer.digest)
        )));
    }
    if trailer.tar_bytes != frames.tar_bytes {
        return Err(RecvError::Stream(format!(
            "corrupted stream: {} tar bytes received, the agent sent {}; nothing imported",
            frames.tar_bytes, trailer.tar_bytes
        )));
    }
    Ok(Received {
        trailer,
        temp_dir: hello.temp_dir,
        temp_path_hits: unpacker.temp_path_hits.into_iter().collect(),
        transfer,
    })
}

fn lossy(b: &[u8]) -> String {
    crate::util::first_line(&String::from_utf8_lossy(b)).to_owned()
}

/// Frames as they arrive, hashed and counted (all but the trailer).
struct Frames<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    bytes: u64,
    tar_bytes: u64,
    hdr: [u8; HEADER_LEN],
    payload: Vec<u8>,
}

impl<'a> Frames<ChannelReader<'a>> {
    fn new(r: ChannelReader<'a>) -> Self {
        Frames {
            r,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            tar_bytes: 0,
            hdr: [0; HEADER_LEN],
            payload: Vec::with_capacity(MAX_DATA as usize),
        }
    }

    fn flush_stderr(&mut self, log: &mut BuildLog) {
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
        if tag != hatch::TAG_TRAILER {
            self.hasher.update(&self.hdr);
            self.hasher.update(&self.payload);
            self.bytes += (HEADER_LEN + self.payload.len()) as u64;
            if tag == hatch::TAG_DATA {
                self.tar_bytes += self.payload.len() as u64;
            }
        }
        Ok(tag)
    }
}

/// The tar stream: payloads of `Data` frames, log frames passed to the
/// log on the way, EOF at the trailer.
struct TarSource<'f, 'a> {
    frames: &'f mut Frames<ChannelReader<'a>>,
    log: &'f mut BuildLog,
    /// Position in the current `Data` payload.
    pos: usize,
    trailer: Option<Trailer>,
    far_error: Option<String>,
}

impl Read for TarSource<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.trailer.is_some() {
                return Ok(0);
            }
            let avail = &self.frames.payload[self.pos.min(self.frames.payload.len())..];
            if !avail.is_empty() {
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
                self.pos += n;
                return Ok(n);
            }
            let tag = self.frames.next();
            self.frames.flush_stderr(self.log);
            match tag.map_err(|e| match e {
                FrameError::Io(e) => e,
                FrameError::Eof { .. } => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended before its trailer",
                ),
                other => io::Error::other(format!("corrupted stream: {other}")),
            })? {
                hatch::TAG_DATA => self.pos = 0,
                hatch::TAG_LOG => {
                    self.log.raw(&self.frames.payload);
                    self.pos = self.frames.payload.len();
                }
                hatch::TAG_TRAILER => {
                    let t = Trailer::decode(&self.frames.payload)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    self.pos = self.frames.payload.len();
                    self.trailer = Some(t);
                }
                hatch::TAG_ERROR => {
                    let m = lossy(&self.frames.payload);
                    self.far_error = Some(m.clone());
                    return Err(io::Error::other(m));
                }
                t => {
                    return Err(io::Error::other(format!(
                        "corrupted stream: unexpected frame {:?}",
                        t as char
                    )))
                }
            }
        }
    }
}

/// Reads the channel with the session non-blocking: waits in poll(2) on the
/// socket, so timeouts, cancellation and a dead connection are noticed.
/// The agent's stderr is collected on the way (an unread stderr would
/// stall the channel).
struct ChannelReader<'a> {
    conn: &'a Connection,
    channel: &'a mut Channel,
    cancel: &'a Cancel,
    deadline: Option<(Instant, u64)>,
    silent: Option<(Duration, u64)>,
    last_data: Instant,
    last_inbound: Instant,
    pending_stderr: Vec<u8>,
    tail: Vec<u8>,
    stopped: Option<Failure>,
}

impl<'a> ChannelReader<'a> {
    fn new(
        conn: &'a Connection,
        channel: &'a mut Channel,
        cancel: &'a Cancel,
        limits: super::Limits,
    ) -> Self {
        let now = Instant::now();
        ChannelReader {
            conn,
            channel,
            cancel,
            deadline: limits.timeout.map(|t| (now + t + GRACE, t.as_secs())),
            silent: limits.max_silent.map(|s| (s + GRACE, s.as_secs())),
            last_data: now,
            last_inbound: now,
            pending_stderr: Vec::new(),
            tail: Vec::new(),
            stopped: None,
        }
    }

    fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }

    fn pump_stderr(&mut self) {
        let mut buf = [0u8; 8192];
        let mut s = self.channel.stderr();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
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
        if self.cancel.is_cancelled() {
            return Err(self.stop(Failure::Cancelled));
        }
        let now = Instant::now();
        let mut next = now + Duration::from_millis(250);
        if let Some((when, secs)) = self.deadline {
            if now >= when {
                return Err(self.stop(Failure::TimedOut(format!(
                    "build timed out after {secs} seconds (no answer from {}); connection closed",
                    self.conn.target
                ))));
            }
            next = next.min(when);
        }
        if let Some((d, secs)) = self.silent {
            if now >= self.last_data + d {
                return Err(self.stop(Failure::TimedOut(format!(
                    "no output for {secs} seconds (max-silent-time) from {}; connection closed",
                    self.conn.target
                ))));
            }
        }
        if now.duration_since(self.last_inbound) > DEAD_AFTER {
            return Err(io::Error::other(format!(
                "connection to {} lost: nothing received for {} seconds, not even keepalive replies",
                self.conn.target,
                DEAD_AFTER.as_secs()
            )));
        }
        let _ = self.conn.session.keepalive_send();
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
                    self.last_data = now;
                    self.last_inbound = now;
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
