//! `nix-hatch agent`: the far side of the `ssh` executor. Needs no Nix.
//!
//! Reads one [`Request`] frame from stdin, runs the command in a fresh
//! temporary directory with `$out` (and every other output variable) set to
//! paths below it, and answers on stdout with frames (see
//! `protocol::hatch`): `Hello`, the command's output as `Log` chunks as it
//! comes, then — if the command succeeded — the outputs as a tar stream in
//! `Data` frames, then the `Trailer` (status, tar byte count, length and
//! blake3 digest of everything sent before it).
//!
//! The command runs under the executors' supervisor (`supervise`): its
//! output goes out as `Log` frames (`LogFrames`), and `timeout` and
//! `max-silent-time` from the request are enforced here, on the far side.
//!
//! The command dies with the channel: stdin stays open for the whole build
//! and its end (the executor or the connection went away), SIGHUP, SIGTERM
//! or SIGINT kill it. It runs in its own process group, with a parent-death
//! signal, below this process as child subreaper (orphans come back to us
//! and are killed), and — when the agent runs as root — as pid 1 of a fresh
//! pid namespace, so that nothing it started survives it (`CommandTree`).
//! The temporary directory is removed however the agent ends: on return,
//! and by a janitor process even when the agent is SIGKILLed.
//!
//! A request with resource limits (version 2) runs the command in a cgroup
//! of its own with them, as the local executors do (`executors::limits`),
//! named after the temporary directory and removed with it (the janitor
//! too removes it); with limits and no cgroup to be had here, nothing runs.
//! What the command used goes back in a `Usage` frame before the trailer.
//! A probe request (`nix-hatch check --connect`) only tries whether the
//! limits can be enforced here.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::ResourceLimits;
use crate::executors::cgroup::{BuildCgroup, Cgroups, Liveness, Plan};
use crate::executors::runner::ProcessUsage;
use crate::executors::supervise::{self, Cancel, Outcome, Supervision};
use crate::executors::Limits;
use crate::protocol::buildlog::LogSink;
use crate::protocol::hatch::{
    self, FrameError, HashingWriter, Hello, Request, Status, Trailer, HEADER_LEN, MAX_DATA,
    MAX_ERROR, MAX_LOG,
};
use crate::usage::{Source, Usage};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run() -> i32 {
    // SAFETY: fds 0 and 1 are the SSH channel; this process owns them from
    // here on (nothing else in the agent uses stdin/stdout).
    let stdin = unsafe { File::from_raw_fd(0) };
    let stdout = Stdout(unsafe { File::from_raw_fd(1) });
    let mut out = HashingWriter::new(stdout);
    match agent(stdin, &mut out) {
        Ok(()) => 0,
        Err(AgentError::Report(msg)) => {
            let msg = format!("nix-hatch agent: {msg}");
            let cut = &msg.as_bytes()[..msg.len().min(MAX_ERROR as usize)];
            let _ = out
                .inner_mut()
                .write_all(&hatch::header(hatch::TAG_ERROR, cut.len()));
            let _ = out.inner_mut().write_all(cut);
            eprintln!("{msg}");
            1
        }
        Err(AgentError::Gone(why)) => {
            eprintln!("nix-hatch agent: stopping: {why}");
            1
        }
    }
}

enum AgentError {
    /// Something to tell the executor (an `Error` frame).
    Report(String),
    /// The executor is gone (stdin closed, stdout broken) or we were told
    /// to stop: nobody to tell.
    Gone(String),
}

fn report(s: impl Into<String>) -> AgentError {
    AgentError::Report(s.into())
}

fn gone(e: io::Error) -> AgentError {
    AgentError::Gone(format!("writing to the executor: {e}"))
}

fn agent(mut stdin: File, out: &mut HashingWriter<Stdout>) -> Result<(), AgentError> {
    let req = read_request(&mut stdin).map_err(|e| report(format!("reading the request: {e}")))?;
    if let Some(l) = req.limits.as_ref().filter(|l| l.probe) {
        return probe(&l.limits, out);
    }
    if let Some((o, why)) = hatch::bad_output_name(&req.outputs) {
        return Err(report(format!(
            "output {o:?} cannot be an environment variable of the command: {why}"
        )));
    }
    let cancel =
        Cancel::install_interrupting().map_err(|e| report(format!("signal handlers: {e}")))?;
    // Orphans of the command are re-parented to us, so we can kill them.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let temp = TempDir::create().map_err(|e| report(format!("creating a temporary dir: {e}")))?;
    // The command's cgroup, named after the temporary dir; the janitor
    // removes it too if this process is killed.
    let cgroup = match &req.limits {
        Some(l) => build_cgroup(&l.limits, &temp.path)?,
        None => None,
    };
    let cgroup_dirs: Vec<PathBuf> = cgroup
        .iter()
        .flat_map(|c| c.dirs().map(Path::to_path_buf))
        .collect();
    let janitor = temp
        .janitor(cgroup_dirs)
        .map_err(|e| report(format!("starting the temp dir janitor: {e}")))?;
    // As root: the command becomes pid 1 of a new pid namespace; when it
    // dies (or we kill it) the kernel kills everything it left behind.
    let pid_ns = nix::unistd::geteuid().is_root()
        && nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).is_ok();
    let build = temp.path.join("build");
    let outputs_dir = temp.path.join("outputs");
    for d in [&build, &outputs_dir] {
        std::fs::create_dir(d).map_err(|e| report(format!("creating {}: {e}", d.display())))?;
    }
    out.frame(
        hatch::TAG_HELLO,
        &Hello {
            version: hatch::VERSION,
            temp_dir: temp.path.to_string_lossy().into_owned(),
        }
        .encode(),
    )
    .map_err(gone)?;

    let started = Instant::now();
    let before = ProcessUsage::of_children();
    let status = run_command(
        &req,
        &build,
        &outputs_dir,
        &mut stdin,
        out,
        &cancel,
        CommandTree {
            pid_ns,
            janitor,
            cgroup: cgroup.as_ref(),
        },
    )?;
    // Only an executor that asked for limits understands a `Usage` frame.
    let usage = req
        .limits
        .is_some()
        .then(|| measure(cgroup, started, before));
    let mut tar_bytes = 0;
    if status.success() {
        let mut data = DataWriter {
            out,
            buf: Vec::with_capacity(MAX_DATA as usize),
            bytes: 0,
            cancel: &cancel,
        };
        write_tar(&mut data, &outputs_dir, &req.outputs).map_err(|e| match e {
            TarError::Io(e) => gone(e),
            TarError::Report(m) => report(m),
        })?;
        data.finish().map_err(gone)?;
        tar_bytes = data.bytes;
    }
    if let Some(u) = usage {
        out.frame(hatch::TAG_USAGE, &hatch::encode_usage(&u))
            .map_err(gone)?;
    }
    send_trailer(out, tar_bytes, status)?;
    drop(temp);
    Ok(())
}

/// The trailer: how the command ended, and the length and digest of all
/// that was sent before it.
fn send_trailer(
    out: &mut HashingWriter<Stdout>,
    tar_bytes: u64,
    status: Status,
) -> Result<(), AgentError> {
    let (digest, stream_bytes) = out.sum();
    let trailer = Trailer {
        stream_bytes,
        tar_bytes,
        digest,
        status,
    };
    let inner = out.inner_mut();
    inner
        .write_all(&hatch::header(
            hatch::TAG_TRAILER,
            hatch::TRAILER_LEN as usize,
        ))
        .and_then(|_| inner.write_all(&trailer.encode()))
        .and_then(|_| inner.flush())
        .map_err(gone)
}

/// The command's cgroup under `limits`, named after the temporary dir
/// `temp`. With limits and none to be had here, the build fails at once
/// (it never runs unlimited); with only `cgroup-parent`, it runs without.
fn build_cgroup(limits: &ResourceLimits, temp: &Path) -> Result<Option<BuildCgroup>, AgentError> {
    let name = temp
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let made = Plan::new(&Cgroups::detect(), limits).and_then(|plan| {
        // Leftovers of agents whose janitor died too.
        plan.sweep(|_| Liveness::Unknown);
        plan.create(&name, limits)
    });
    match made {
        Ok(c) => Ok(Some(c)),
        Err(why) if limits.any() => Err(report(format!(
            "cannot enforce {} here: no usable cgroup: {why}; nothing was run",
            limits.describe()
        ))),
        Err(_) => Ok(None),
    }
}

/// What the command used: its cgroup's figures (the cgroup is removed),
/// else what the kernel accounted for the processes this agent reaped.
fn measure(cgroup: Option<BuildCgroup>, started: Instant, before: ProcessUsage) -> Usage {
    let mut u = Usage {
        wall: started.elapsed(),
        ..Usage::default()
    };
    if let Some(c) = cgroup {
        let r = c.read();
        u.memory_source = Source::Cgroup;
        u.peak_memory = r.peak_memory;
        u.cpu = r.cpu;
        u.oom_kills = r.oom_kills;
        u.memory_limit_hit = r.memory_limit_hit;
        u.forks_refused = r.forks_refused;
        u.throttled = r.throttled;
        if let Err(e) = c.remove() {
            eprintln!("nix-hatch agent: {e}");
        }
    }
    let after = ProcessUsage::of_children();
    if u.peak_memory.is_none() {
        u.memory_source = Source::Processes;
        u.peak_memory = Some(after.max_rss);
    }
    u.cpu.get_or_insert(Duration::from_micros(
        after.cpu_us.saturating_sub(before.cpu_us),
    ));
    u
}

/// `nix-hatch check --connect`: whether the limits can be enforced here,
/// tried for real (a cgroup made, a process moved into it, removed). The
/// answer is one `Log` line and a successful trailer, or an `Error`.
fn probe(limits: &ResourceLimits, out: &mut HashingWriter<Stdout>) -> Result<(), AgentError> {
    let how = crate::executors::limits::probe(&Cgroups::detect(), limits).map_err(|why| {
        report(format!(
            "cannot enforce {} here: no usable cgroup: {why}",
            limits.describe()
        ))
    })?;
    out.frame(
        hatch::TAG_HELLO,
        &Hello {
            version: hatch::VERSION,
            temp_dir: "/".into(),
        }
        .encode(),
    )
    .map_err(gone)?;
    let line = format!("{}: enforced by {how}\n", limits.describe());
    out.frame(hatch::TAG_LOG, line.as_bytes()).map_err(gone)?;
    send_trailer(out, 0, Status::Exited(0))
}

fn read_request(stdin: &mut File) -> Result<Request, FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    let (tag, len) = hatch::read_header(stdin, &mut hdr)?;
    if tag != hatch::TAG_REQUEST {
        return Err(FrameError::BadTag(tag));
    }
    let mut payload = Vec::new();
    hatch::read_payload(stdin, len, &mut payload)?;
    Request::decode(&payload)
}

/// The environment the command sees: the request's variables, then what
/// the agent owns (far-side account, build dir, output paths), which
/// therefore wins. Output names that would replace one of the agent's own
/// variables were refused before (see [`hatch::output_name_problem`]).
fn command_env(req: &Request, build: &Path, outputs_dir: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(ek, _)| ek.as_bytes() != k.as_bytes());
        env.push((OsString::from(k), v));
    };
    for (k, v) in &req.env {
        if let Ok(k) = std::str::from_utf8(k) {
            // The agent's own are not taken from the request, even those it
            // leaves unset (HOME when it has none).
            if !k.is_empty()
                && !k.contains('=')
                && !k.contains('\0')
                && !crate::config::host::AGENT_VARS.contains(&k)
            {
                set(k, OsString::from_vec(v.clone()));
            }
        }
    }
    set(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
    );
    for k in ["HOME", "USER", "LOGNAME"] {
        if let Some(v) = std::env::var_os(k) {
            set(k, v);
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(k, build.as_os_str().to_owned());
    }
    set("NIX_LOG_FD", "2".into());
    set("TERM", "xterm-256color".into());
    set("outputs", req.outputs.join(" ").into());
    for o in &req.outputs {
        if hatch::output_name_problem(o).is_none() {
            set(o, outputs_dir.join(o).into_os_string());
        }
    }
    env
}

/// The request's limits (seconds, 0 for none); any 64-bit value is taken
/// (see [`Limits::deadline`]).
fn request_limits(req: &Request) -> Limits {
    Limits {
        timeout: (req.timeout > 0).then(|| Duration::from_secs(req.timeout)),
        max_silent: (req.max_silent > 0).then(|| Duration::from_secs(req.max_silent)),
    }
}

/// How the command's process tree is contained: its own process group
/// (or, as root, its own pid namespace), below this process as child
/// subreaper.
struct CommandTree<'a> {
    /// The command is pid 1 of its own pid namespace.
    pid_ns: bool,
    /// Our temp dir janitor: a child that must survive the cleanup.
    janitor: Pid,
    /// The cgroup the command starts in (with limits).
    cgroup: Option<&'a BuildCgroup>,
}

impl CommandTree<'_> {
    /// SIGKILL to the command's pid namespace (its pid 1) or process group.
    fn kill_group(&self, child: &Child) {
        let pid = Pid::from_raw(child.id() as i32);
        if self.pid_ns {
            let _ = kill(pid, Signal::SIGKILL);
        } else {
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        }
    }
}

impl supervise::Tree for CommandTree<'_> {
    fn kill(&mut self, child: &mut Child) {
        self.kill_group(child);
        let _ = child.wait();
        kill_orphans(self.janitor);
    }

    fn exited(&mut self, child: &mut Child) {
        // The group (or namespace) goes with it: leftovers would keep
        // writing into outputs we are about to send.
        self.kill_group(child);
        kill_orphans(self.janitor);
    }
}

/// Runs the command under the supervisor with its output streamed as
/// `Log` frames; returns how it ended. Aborts (killing it) when stdin ends
/// or a signal arrives.
fn run_command(
    req: &Request,
    build: &Path,
    outputs_dir: &Path,
    stdin: &mut File,
    out: &mut HashingWriter<Stdout>,
    cancel: &Cancel,
    mut tree: CommandTree,
) -> Result<Status, AgentError> {
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| report("empty command"))?;
    let mut cmd = Command::new(OsString::from_vec(program.clone()));
    cmd.args(args.iter().map(|a| OsString::from_vec(a.clone())))
        .env_clear()
        .envs(command_env(req, build, outputs_dir))
        .current_dir(build);
    let read = supervise::output_pipe(&mut cmd).map_err(|e| report(format!("pipe: {e}")))?;
    if !tree.pid_ns {
        cmd.process_group(0);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    if let Some(c) = tree.cgroup {
        c.join_on_spawn(&mut cmd);
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let in_cgroup = match tree.cgroup {
                Some(_) => {
                    " in its cgroup (an agent that is not root needs a delegated cgroup it runs in)"
                }
                None => "",
            };
            return Err(report(format!(
                "cannot start {}{in_cgroup}: {e}",
                String::from_utf8_lossy(program)
            )));
        }
    };
    drop(cmd);
    let mut log = LogFrames { out, unsent: None };
    let ran = supervise::supervise(
        child,
        read,
        &mut log,
        &mut tree,
        Supervision {
            limits: request_limits(req),
            cancel,
            // The executor sends nothing after the request: any readable
            // state is the end of the channel.
            peer: Some(stdin),
            side: None,
        },
    );
    status(ran, log.unsent, req)
}

/// What the trailer says about how the command ended, or why nothing more
/// is sent.
fn status(
    ran: Result<Outcome, supervise::Error>,
    unsent: Option<io::Error>,
    req: &Request,
) -> Result<Status, AgentError> {
    let outcome = ran.map_err(|e| {
        report(match e {
            supervise::Error::Poll(e) => format!("poll: {e}"),
            supervise::Error::Read(e) => format!("reading the command's output: {e}"),
            supervise::Error::Wait(e) => format!("waiting for the command: {e}"),
        })
    })?;
    match (outcome, unsent) {
        (Outcome::Cancelled, _) => Err(AgentError::Gone("terminated by a signal".into())),
        (_, Some(e)) => Err(gone(e)),
        (Outcome::ReaderGone, None) => Err(AgentError::Gone(
            "the executor closed the channel; command killed".into(),
        )),
        (Outcome::Exited(s), None) => Ok(match (s.code(), s.signal()) {
            (Some(c), _) => Status::Exited(c),
            (None, Some(sig)) => Status::Signalled(sig),
            _ => Status::Exited(-1),
        }),
        (Outcome::TimedOut(_), None) => Ok(Status::TimedOut(req.timeout)),
        (Outcome::Silent(_), None) => Ok(Status::Silent(req.max_silent)),
    }
}

/// The command's output as `Log` frames on the channel. A write that fails
/// leaves the sink gone (the supervisor then stops the command); once the
/// agent is told to stop, nothing more is sent (as for `Data` frames).
struct LogFrames<'a> {
    out: &'a mut HashingWriter<Stdout>,
    /// Why a frame could not be written.
    unsent: Option<io::Error>,
}

impl LogSink for LogFrames<'_> {
    fn raw(&mut self, data: &[u8]) {
        if self.unsent.is_some() || Cancel::signalled() {
            return;
        }
        for chunk in data.chunks(MAX_LOG as usize) {
            if let Err(e) = self.out.frame(hatch::TAG_LOG, chunk) {
                self.unsent = Some(e);
                return;
            }
        }
    }

    fn gone(&self) -> bool {
        self.unsent.is_some()
    }
}

/// Kills and reaps every remaining child of this process (the command's
/// orphans, re-parented to us as subreaper), except the temp dir janitor.
fn kill_orphans(janitor: Pid) {
    let me = std::process::id();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if crate::util::parent_pid(pid) == Some(me) && pid as i32 != janitor.as_raw() {
                    any = true;
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        // Reap whatever died.
        while let Ok(s) =
            nix::sys::wait::waitpid(None::<Pid>, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
        {
            if s == nix::sys::wait::WaitStatus::StillAlive || s.pid() == Some(janitor) {
                break;
            }
        }
        if !any || Instant::now() > end {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Chunks the tar stream into `Data` frames.
struct DataWriter<'a> {
    out: &'a mut HashingWriter<Stdout>,
    buf: Vec<u8>,
    bytes: u64,
    cancel: &'a Cancel,
}

impl DataWriter<'_> {
    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.cancel.is_cancelled() {
            return Err(io::Error::other("terminated by a signal"));
        }
        self.out.frame(hatch::TAG_DATA, &self.buf)?;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.emit()
    }
}

impl Write for DataWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = MAX_DATA as usize - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_DATA as usize {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum TarError {
    Io(io::Error),
    Report(String),
}

/// Each existing output as a top-level entry named after it. Only regular
/// files (executable or not), directories and symlinks: what a store path
/// may hold. Missing outputs are left out (the executor reports them).
fn write_tar(w: &mut DataWriter, outputs_dir: &Path, outputs: &[String]) -> Result<(), TarError> {
    let mut b = tar::Builder::new(w);
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for o in outputs {
        let p = outputs_dir.join(o);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        append(&mut b, &p, Path::new(o), o)?;
    }
    b.finish().map_err(TarError::Io)?;
    Ok(())
}

fn append<W: Write>(
    b: &mut tar::Builder<W>,
    fs_path: &Path,
    name: &Path,
    output: &str,
) -> Result<(), TarError> {
    let md = std::fs::symlink_metadata(fs_path)
        .map_err(|e| TarError::Report(format!("reading {}: {e}", fs_path.display())))?;
    let ft = md.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    if ft.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, io::empty())
            .map_err(TarError::Io)?;
        let mut entries: Vec<_> = std::fs::read_dir(fs_path)
            .map_err(|e| TarError::Report(format!("reading {}: {e}", fs_path.display())))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| TarError::Report(format!("reading {}: {e}", fs_path.display())))?;
        entries.sort();
        for e in entries {
            append(b, &fs_path.join(&e), &name.join(&e), output)?;
        }
    } else if ft.is_file() {
        let f = File::open(fs_path)
            .map_err(|e| TarError::Report(format!("opening {}: {e}", fs_path.display())))?;
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(if md.mode() & 0o100 != 0 { 0o755 } else { 0o644 });
        h.set_size(md.len());
        // A file that changes size under us would corrupt the archive.
        // Large reads: io::copy uses a BufReader's own buffer.
        let mut limited = io::BufReader::with_capacity(MAX_DATA as usize, f.take(md.len()));
        b.append_data(&mut h, name, &mut limited)
            .map_err(TarError::Io)?;
        if limited.get_ref().limit() != 0 || !limited.buffer().is_empty() {
            return Err(TarError::Report(format!(
                "{} shrank while it was being sent",
                fs_path.display()
            )));
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(fs_path)
            .map_err(|e| TarError::Report(format!("reading {}: {e}", fs_path.display())))?;
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, name, &target).map_err(TarError::Io)?;
    } else {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "a fifo"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device node"
        };
        return Err(TarError::Report(format!(
            "output {output:?} contains {kind} at {}: only regular files, directories and symlinks can go into the store",
            name.display()
        )));
    }
    Ok(())
}

/// The channel (fd 1). A write interrupted by SIGHUP/SIGTERM/SIGINT fails
/// instead of being retried, so a stop request is obeyed even while the
/// agent is blocked sending.
struct Stdout(File);

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if Cancel::signalled() {
                        return Err(io::Error::other("terminated by a signal"));
                    }
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The agent's private directory, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Starts a janitor process that removes the directory once the agent
    /// is gone, however it ended (even SIGKILL): it waits for the end of a
    /// pipe only this process holds. Must run while the agent has no other
    /// threads (it forks without exec) and before the pid namespace.
    fn janitor(&self, cgroups: Vec<PathBuf>) -> io::Result<Pid> {
        use nix::unistd::{fork, ForkResult};
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let path = self.path.clone();
        // SAFETY: the agent is single-threaded here; the child only reads,
        // removes files and exits.
        match unsafe { fork() }.map_err(io::Error::from)? {
            ForkResult::Child => {
                drop(write);
                // Off the channel (sshd must not wait for us), immune to the
                // session's end, in a process group of its own.
                if let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    for fd in 0..3 {
                        // SAFETY: dup2 onto the standard descriptors.
                        unsafe { nix::libc::dup2(null.as_raw_fd(), fd) };
                    }
                }
                let _ = nix::unistd::setsid();
                // SAFETY: SIG_IGN / SIG_DFL are always sound; the agent's
                // handlers would write into its signal pipe.
                unsafe {
                    use nix::sys::signal::{signal, SigHandler};
                    let _ = signal(Signal::SIGHUP, SigHandler::SigIgn);
                    let _ = signal(Signal::SIGTERM, SigHandler::SigDfl);
                    let _ = signal(Signal::SIGINT, SigHandler::SigDfl);
                }
                let mut f = File::from(read);
                let mut b = [0u8; 16];
                loop {
                    match f.read(&mut b) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = crate::store::remove_tree(&path);
                for c in &cgroups {
                    let _ = crate::executors::cgroup::remove_leftover(c, Duration::from_secs(5));
                }
                // SAFETY: ends the forked child without running the parent's
                // destructors or atexit handlers.
                unsafe { nix::libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop(read);
                // Held until this process ends (CLOEXEC: the command never
                // gets it).
                std::mem::forget(write);
                Ok(child)
            }
        }
    }

    fn create() -> io::Result<TempDir> {
        let base = std::env::var_os("TMPDIR")
            .filter(|t| Path::new(t).is_absolute())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let path =
            nix::unistd::mkdtemp(&base.join("nix-hatch-agent.XXXXXX")).map_err(io::Error::from)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = crate::store::remove_tree(&self.path) {
            eprintln!(
                "nix-hatch agent: could not remove {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_that_would_clobber_variables_are_refused() {
        for ok in [
            "out", "dev", "lib", "bin", "man", "doc", "debug", "py3", "out-2", "Path",
        ] {
            assert_eq!(hatch::output_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "PATH",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "BASH_ENV",
            "ENV",
            "IFS",
            "HOME",
            "TMPDIR",
            "TERM",
            "NIX_BUILD_TOP",
            "NIX_HATCH_STORE_PATH_out",
            "NIX_STORE",
            "outputs",
            "http_proxy",
            "PATH=x",
            "",
            "X",
            "_1",
        ] {
            assert!(
                hatch::output_name_problem(bad).is_some(),
                "{bad:?} accepted"
            );
        }
    }

    fn value<'a>(env: &'a [(OsString, OsString)], k: &str) -> Option<&'a OsString> {
        env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v)
    }

    /// The agent's own variables are set last: neither the request's
    /// variables nor output names replace them.
    #[test]
    fn agent_variables_win() {
        let req = Request {
            argv: vec![b"/bin/true".to_vec()],
            env: vec![
                (b"PATH".to_vec(), b"/evil/bin".to_vec()),
                (b"TMPDIR".to_vec(), b"/evil/tmp".to_vec()),
                (b"HOME".to_vec(), b"/evil/home".to_vec()),
                (b"outputs".to_vec(), b"evil".to_vec()),
                (b"GREETING".to_vec(), b"hello".to_vec()),
                (b"A=B".to_vec(), b"x".to_vec()),
            ],
            outputs: vec!["out".into(), "dev".into(), "LD_PRELOAD".into()],
            timeout: 0,
            max_silent: 0,
            limits: None,
        };
        let build = Path::new("/far/tmp/build");
        let outs = Path::new("/far/tmp/outputs");
        let env = command_env(&req, build, outs);
        let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
        assert_eq!(value(&env, "PATH"), Some(&path));
        assert_eq!(
            value(&env, "TMPDIR"),
            Some(&OsString::from("/far/tmp/build"))
        );
        assert_eq!(
            value(&env, "HOME").cloned(),
            std::env::var_os("HOME"),
            "HOME from the request"
        );
        assert_eq!(
            value(&env, "outputs"),
            Some(&OsString::from("out dev LD_PRELOAD"))
        );
        assert_eq!(value(&env, "GREETING"), Some(&OsString::from("hello")));
        assert_eq!(
            value(&env, "out"),
            Some(&OsString::from("/far/tmp/outputs/out"))
        );
        assert_eq!(value(&env, "LD_PRELOAD"), None);
        assert!(env.iter().all(|(k, _)| !k.as_bytes().contains(&b'=')));
        let names: Vec<_> = env.iter().map(|(k, _)| k).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "{names:?}");
    }

    /// Any 64-bit timeout in a request: no `Instant` overflow, no deadline;
    /// a limit that is hit is reported with the request's own value.
    #[test]
    fn huge_limits_are_no_deadline() {
        let req = Request {
            timeout: u64::MAX,
            max_silent: i64::MAX as u64,
            ..Request::default()
        };
        let now = Instant::now();
        let limits = request_limits(&req);
        assert!(limits.deadline(now, now).is_none());
        let small = Some(Duration::from_secs(5));
        let silent = Limits {
            max_silent: small,
            ..limits
        };
        let (when, total) = silent.deadline(now, now).unwrap();
        assert_eq!(when, now + Duration::from_secs(5));
        assert!(!total);
        let st = status(Ok(Outcome::Silent(Duration::from_secs(5))), None, &req);
        assert!(matches!(st, Ok(s) if s == Status::Silent(req.max_silent)));
        let timed = Limits {
            timeout: small,
            ..limits
        };
        let (_, total) = timed.deadline(now, now).unwrap();
        assert!(total);
        let st = status(Ok(Outcome::TimedOut(Duration::from_secs(5))), None, &req);
        assert!(matches!(st, Ok(s) if s == Status::TimedOut(req.timeout)));
    }
}
