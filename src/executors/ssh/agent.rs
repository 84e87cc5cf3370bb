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
//! The command dies with the channel: stdin stays open for the whole build
//! and its end (the executor or the connection went away), SIGHUP, SIGTERM
//! or SIGINT kill it. It runs in its own process group, with a parent-death
//! signal, below this process as child subreaper (orphans come back to us
//! and are killed), and — when the agent runs as root — as pid 1 of a fresh
//! pid namespace, so that nothing it started survives it. The temporary
//! directory is removed however the agent ends (short of SIGKILL).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::executors::Limits;
use crate::protocol::hatch::{
    self, FrameError, HashingWriter, Hello, Request, Status, Trailer, HEADER_LEN, MAX_DATA,
    MAX_ERROR, MAX_LOG,
};

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
    if let Some((o, why)) = hatch::bad_output_name(&req.outputs) {
        return Err(report(format!(
            "output {o:?} cannot be an environment variable of the command: {why}"
        )));
    }
    let signals = SignalPipe::install().map_err(|e| report(format!("signal handlers: {e}")))?;
    // Orphans of the command are re-parented to us, so we can kill them.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let temp = TempDir::create().map_err(|e| report(format!("creating a temporary dir: {e}")))?;
    let janitor = temp
        .janitor()
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

    let status = run_command(
        &req,
        &build,
        &outputs_dir,
        &mut stdin,
        out,
        &signals,
        Tree { pid_ns, janitor },
    )?;
    let mut tar_bytes = 0;
    if status.success() {
        let mut data = DataWriter {
            out,
            buf: Vec::with_capacity(MAX_DATA as usize),
            bytes: 0,
            signals: &signals,
        };
        write_tar(&mut data, &outputs_dir, &req.outputs).map_err(|e| match e {
            TarError::Io(e) => gone(e),
            TarError::Report(m) => report(m),
        })?;
        data.finish().map_err(gone)?;
        tar_bytes = data.bytes;
    }
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
        .map_err(gone)?;
    drop(temp);
    Ok(())
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
                && !hatch::AGENT_VARS.contains(&k)
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

/// When the command must be stopped (see [`Limits::deadline`]), with the
/// status that reports it.
fn next_deadline(
    start: Instant,
    last_output: Instant,
    limits: &Limits,
    req: &Request,
) -> Option<(Instant, Status)> {
    let (when, total) = limits.deadline(start, last_output)?;
    Some((
        when,
        if total {
            Status::TimedOut(req.timeout)
        } else {
            Status::Silent(req.max_silent)
        },
    ))
}

/// How the command's process tree is contained.
struct Tree {
    /// The command is pid 1 of its own pid namespace.
    pid_ns: bool,
    /// Our temp dir janitor: a child that must survive the cleanup.
    janitor: Pid,
}

/// Runs the command with its output streamed as `Log` frames; returns how
/// it ended. Aborts (killing it) when stdin ends or a signal arrives.
fn run_command(
    req: &Request,
    build: &Path,
    outputs_dir: &Path,
    stdin: &mut File,
    out: &mut HashingWriter<Stdout>,
    signals: &SignalPipe,
    tree: Tree,
) -> Result<Status, AgentError> {
    let Tree { pid_ns, janitor } = tree;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| report(format!("pipe: {e}")))?;
    let write2 = write
        .try_clone()
        .map_err(|e| report(format!("pipe: {e}")))?;
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| report("empty command"))?;
    let mut cmd = Command::new(OsString::from_vec(program.clone()));
    cmd.args(args.iter().map(|a| OsString::from_vec(a.clone())))
        .env_clear()
        .envs(command_env(req, build, outputs_dir))
        .current_dir(build)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    if !pid_ns {
        cmd.process_group(0);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Err(report(format!(
                "cannot start {}: {e}",
                String::from_utf8_lossy(program)
            )))
        }
    };
    drop(cmd);
    let pid = Pid::from_raw(child.id() as i32);
    let kill_tree = |pid_ns: bool| {
        if pid_ns {
            let _ = kill(pid, Signal::SIGKILL);
        } else {
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        }
    };
    let pidfd = crate::util::pidfd_open(child.id());
    let mut read = File::from(read);
    let start = Instant::now();
    let mut last_output = start;
    let limits = Limits {
        timeout: (req.timeout > 0).then(|| Duration::from_secs(req.timeout)),
        max_silent: (req.max_silent > 0).then(|| Duration::from_secs(req.max_silent)),
    };
    let mut buf = vec![0u8; MAX_LOG as usize];
    let mut pipe_open = true;
    let mut stdin_open = true;
    let ended: Result<Status, AgentError> = loop {
        let now = Instant::now();
        let deadline = next_deadline(start, last_output, &limits, req);
        if let Some((when, st)) = deadline {
            if now >= when {
                kill_tree(pid_ns);
                let _ = child.wait();
                break Ok(st);
            }
        }
        let wait = match deadline {
            Some((when, _)) => PollTimeout::try_from(
                when.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1,
            )
            .unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = Vec::with_capacity(4);
        let mut idx = [usize::MAX; 4]; // pipe, stdin, signals, pidfd
        if pipe_open {
            idx[0] = fds.len();
            fds.push(PollFd::new(read.as_fd(), PollFlags::POLLIN));
        }
        if stdin_open {
            idx[1] = fds.len();
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        idx[2] = fds.len();
        fds.push(PollFd::new(signals.read.as_fd(), PollFlags::POLLIN));
        if let Some(p) = &pidfd {
            idx[3] = fds.len();
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, wait) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(report(format!("poll: {e}"))),
        }
        let ready: Vec<bool> = idx
            .iter()
            .map(|&i| i != usize::MAX && fds[i].revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[2] {
            kill_tree(pid_ns);
            let _ = child.wait();
            break Err(AgentError::Gone("terminated by a signal".into()));
        }
        if ready[1] {
            // The executor sends nothing after the request: any readable
            // state is the end of the channel.
            let mut b = [0u8; 256];
            match stdin.read(&mut b) {
                Ok(0) | Err(_) => {
                    kill_tree(pid_ns);
                    let _ = child.wait();
                    break Err(AgentError::Gone(
                        "the executor closed the channel; command killed".into(),
                    ));
                }
                Ok(_) => stdin_open = true,
            }
        }
        if ready[0] {
            match read.read(&mut buf) {
                Ok(0) => pipe_open = false,
                Ok(n) => {
                    last_output = Instant::now();
                    if let Err(e) = out.frame(hatch::TAG_LOG, &buf[..n]) {
                        kill_tree(pid_ns);
                        let _ = child.wait();
                        break Err(gone(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(report(format!("reading the command's output: {e}"))),
            }
        }
        let exited = ready[3] || (pidfd.is_none() && !pipe_open);
        if exited {
            let status = child.wait();
            // The group (or namespace) goes with it: leftovers would keep
            // writing into outputs we are about to send.
            kill_tree(pid_ns);
            break match status {
                Ok(s) => Ok(match (s.code(), s.signal()) {
                    (Some(c), _) => Status::Exited(c),
                    (None, Some(sig)) => Status::Signalled(sig),
                    _ => Status::Exited(-1),
                }),
                Err(e) => Err(report(format!("waiting for the command: {e}"))),
            };
        }
    };
    kill_orphans(janitor);
    // What the command wrote last is still in the pipe (every writer is dead now).
    if pipe_open && ended.is_ok() {
        drain(&mut read, out).map_err(gone)?;
    }
    ended
}

fn drain(read: &mut File, out: &mut HashingWriter<Stdout>) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_LOG as usize];
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
        match poll(&mut fds, ms) {
            Ok(0) => return Ok(()),
            Ok(_) => match read.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => out.frame(hatch::TAG_LOG, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(()),
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Ok(()),
        }
    }
}

/// Kills and reaps every remaining child of this process (the command's
/// orphans, re-parented to us as subreaper), except the temp dir janitor.
fn kill_orphans(janitor: Pid) {
    let me = std::process::id().to_string();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1));
                if ppid == Some(me.as_str()) && pid != janitor.as_raw() {
                    any = true;
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
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
    signals: &'a SignalPipe,
}

impl DataWriter<'_> {
    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.signals.fired() {
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
                    if SIGNALLED.load(std::sync::atomic::Ordering::Relaxed) {
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
    fn janitor(&self) -> io::Result<Pid> {
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

/// A self-pipe that becomes readable on SIGHUP, SIGTERM or SIGINT.
struct SignalPipe {
    read: File,
}

static SIGNAL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    SIGNALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    let fd = SIGNAL_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the fd is never closed.
        unsafe {
            nix::libc::write(fd, b"x".as_ptr().cast(), 1);
        }
    }
}

extern "C" fn on_tick(_: nix::libc::c_int) {}

impl SignalPipe {
    fn install() -> io::Result<SignalPipe> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        SIGNAL_FD.store(write.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
        std::mem::forget(write);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            // No SA_RESTART: a write blocked on a stalled channel returns
            // EINTR, and `Stdout` turns that into an error.
            SaFlags::empty(),
            SigSet::empty(),
        );
        for sig in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
            // SAFETY: the handler only calls write(2).
            unsafe { sigaction(sig, &action) }.map_err(io::Error::from)?;
        }
        // A stop signal that lands just before a blocking write would not
        // interrupt it: a periodic no-op SIGALRM (no SA_RESTART either)
        // makes every blocked write return, and `Stdout` then looks at the
        // flag. Interval timers are not inherited by children.
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
        Ok(SignalPipe {
            read: File::from(read),
        })
    }

    fn fired(&self) -> bool {
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
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

    /// Any 64-bit timeout in a request: no `Instant` overflow, no deadline.
    #[test]
    fn huge_limits_are_no_deadline() {
        let req = Request {
            timeout: u64::MAX,
            max_silent: i64::MAX as u64,
            ..Request::default()
        };
        let now = Instant::now();
        let t = Some(Duration::from_secs(req.timeout));
        let s = Some(Duration::from_secs(req.max_silent));
        let limits = |timeout, max_silent| Limits {
            timeout,
            max_silent,
        };
        assert!(next_deadline(now, now, &limits(t, s), &req).is_none());
        let small = Some(Duration::from_secs(5));
        let (when, st) = next_deadline(now, now, &limits(t, small), &req).unwrap();
        assert_eq!(when, now + Duration::from_secs(5));
        assert_eq!(st, Status::Silent(req.max_silent));
        let (_, st) = next_deadline(now, now, &limits(small, s), &req).unwrap();
        assert_eq!(st, Status::TimedOut(req.timeout));
    }
}
