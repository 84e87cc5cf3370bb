//! NAR (Nix ARchive) serialisation, byte-for-byte what `nix-store --dump`
//! produces.
//!
//! Format: the string `nix-archive-1` followed by one node. Every string
//! (token, name, link target, file contents) is written as its length
//! (u64, little endian), its bytes, and zero padding up to a multiple of 8.
//!
//! ```text
//! node      = "(" "type" ( regular | directory | symlink ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! symlink   = "symlink" "target" <target>
//! ```
//!
//! Directory entries are sorted by name, bytewise. A regular file is
//! executable when its owner-execute bit (`S_IXUSR`) is set; no other
//! metadata is recorded. Other file types (devices, fifos, sockets) cannot be
//! archived.
//!
//! [`dump_path`] walks a tree with `openat`-style calls relative to open
//! directory descriptors (never following symlinks), streams file contents
//! through [`NarSink::contents`] without holding a whole file in memory, and
//! can *seal* the tree while it reads it (see [`DumpOptions::seal`]).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{open, openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, getegid, geteuid, Gid, Uid};

/// The magic string every NAR starts with.
pub const NAR_VERSION_MAGIC: &[u8] = b"nix-archive-1";

/// Offset of the first content byte in the NAR of a non-executable regular
/// file: `nix-archive-1`, `(`, `type`, `regular`, `contents`, then the
/// 8-byte length. The flat hash of such a file is the hash of the NAR bytes
/// `FLAT_CONTENTS_OFFSET .. FLAT_CONTENTS_OFFSET + size`.
pub const FLAT_CONTENTS_OFFSET: u64 = 96;

/// Number of zero bytes that pad a string of `len` bytes to a multiple of 8.
#[must_use]
pub const fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Length of a NAR string of `len` bytes, including length field and padding.
#[must_use]
pub const fn string_len(len: u64) -> u64 {
    8 + len + padding_len(len) as u64
}

/// Failure while copying file contents into a sink.
#[derive(Debug)]
pub enum ContentsError {
    /// Reading the file failed.
    Read(io::Error),
    /// The file ended after `got` bytes, before its recorded size.
    Truncated {
        /// Bytes read before end of file.
        got: u64,
    },
    /// The sink failed.
    Sink(io::Error),
}

/// `read(2)` that retries on `EINTR`.
pub fn read_retry(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Where NAR bytes go.
pub trait NarSink {
    /// Append `data` to the archive.
    fn write(&mut self, data: &[u8]) -> io::Result<()>;

    /// Append exactly `size` bytes of contents read from `file` (the length
    /// field and the padding are written by the caller). Bytes beyond `size`
    /// are ignored, like Nix does. Sinks with their own buffers override this
    /// to read straight into them.
    fn contents(&mut self, file: &mut File, size: u64) -> Result<(), ContentsError> {
        let mut buf = vec![0u8; size.min(256 * 1024) as usize];
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = read_retry(file, &mut buf[..want]).map_err(ContentsError::Read)?;
            if n == 0 {
                return Err(ContentsError::Truncated { got: size - left });
            }
            self.write(&buf[..n]).map_err(ContentsError::Sink)?;
            left -= n as u64;
        }
        Ok(())
    }
}

impl NarSink for Vec<u8> {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }
}

/// Adapter writing a NAR to any [`io::Write`].
#[derive(Debug)]
pub struct WriteSink<W>(pub W);

impl<W: io::Write> NarSink for WriteSink<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }
}

/// Write one NAR string (length, bytes, padding).
pub fn write_str<S: NarSink + ?Sized>(sink: &mut S, s: &[u8]) -> io::Result<()> {
    sink.write(&(s.len() as u64).to_le_bytes())?;
    sink.write(s)?;
    write_padding(sink, s.len() as u64)
}

/// Write the zero padding that follows `len` bytes of string data.
pub fn write_padding<S: NarSink + ?Sized>(sink: &mut S, len: u64) -> io::Result<()> {
    let pad = padding_len(len);
    if pad > 0 {
        sink.write(&[0u8; 8][..pad])?;
    }
    Ok(())
}

/// What the top-level node of a dumped tree was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file.
    Regular {
        /// Whether `S_IXUSR` was set.
        executable: bool,
        /// Size in bytes.
        size: u64,
    },
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
}

/// Options for [`dump_path`].
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Seal the tree while reading it: every regular file and directory not
    /// owned by the effective user is `chown`ed to it (effective uid and gid),
    /// and every regular file gets mode 0444 or 0555 (by its `S_IXUSR` bit),
    /// every directory 0555, except the top-level directory, which gets 0755
    /// so that it can still be renamed into the store by a non-root user.
    /// These are the modes Nix canonicalises store paths to, so the NAR is
    /// unchanged; afterwards nobody but the effective user can modify the
    /// tree. Changes go through the descriptors being read, never by path.
    /// Symlinks are left alone (their owner and mode grant nothing).
    pub seal: bool,
    /// When sealing: the account the build ran as. Unless that is the
    /// effective user (who could do anything anyway), an entry owned by
    /// anyone else but these two is refused, as Nix refuses it: a build
    /// could hard-link a file of another user it may write into its output,
    /// and sealing would make that file root's and read-only.
    pub owner: Option<u32>,
    /// Stop with [`NarErrorKind::TimedOut`] once this instant has passed
    /// (checked between entries and every [`LIMIT_SLICE`] bytes of a file).
    pub deadline: Option<std::time::Instant>,
    /// Stop with [`NarErrorKind::Cancelled`] once this is set (checked with
    /// the deadline): the hook was told to stop, and Nix sends SIGKILL
    /// 500 ms after its SIGTERM.
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
    /// Stop with [`NarErrorKind::TooLarge`] before the archive would grow
    /// past this many bytes.
    pub max_size: Option<u64>,
    /// Gets every file content byte read added, as it is read (someone
    /// else reports the progress).
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// How much of a file is read between two checks of the deadline.
pub const LIMIT_SLICE: u64 = 64 << 20;

/// Error while archiving a tree; `path` is relative to the tree's root
/// (empty for the root itself). `Display` names the entry below `.`;
/// [`NarError::display_with_root`] below another root.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.display_with_root("."))]
pub struct NarError {
    /// Path of the offending entry relative to the root, `/`-separated.
    pub path: Vec<u8>,
    /// What went wrong.
    #[source]
    pub kind: NarErrorKind,
}

/// The kinds of [`NarError`]; each `Display`s as what it is, without the
/// entry (the [`NarError`] message names it).
#[derive(Debug, thiserror::Error)]
pub enum NarErrorKind {
    /// A device, fifo, socket or other file type NARs cannot hold.
    #[error("a {0}, which store paths cannot contain")]
    Unsupported(&'static str),
    /// A system call failed; `op` is the verb (`open`, `read`, ...).
    #[error("cannot {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A regular file had fewer bytes than its size said.
    #[error("shrank while being read ({got} of {expected} bytes)")]
    Truncated {
        /// Size recorded by `fstat`.
        expected: u64,
        /// Bytes actually read.
        got: u64,
    },
    /// An entry changed type between listing and opening it.
    #[error("changed while being read")]
    Changed,
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error("nested more than {MAX_DEPTH} directories deep")]
    TooDeep,
    /// The sink refused the data.
    #[error("writing the archive failed")]
    Sink(#[source] io::Error),
    /// Owned by neither the build's account nor us.
    #[error("owned by neither the build's account nor root")]
    Ownership,
    /// A regular file is still open for writing by some process (which
    /// could change it after it was hashed).
    #[error("still open for writing by another process")]
    OpenForWriting,
    /// [`DumpOptions::deadline`] passed.
    #[error("ran out of time")]
    TimedOut,
    /// [`DumpOptions::cancel`] was set.
    #[error("stopped: the hook was told to stop")]
    Cancelled,
    /// The archive would exceed [`DumpOptions::max_size`].
    #[error("past the size limit of {limit} bytes (NAR)")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

impl NarError {
    /// Render the error with the tree's root spelled as `root` (for example
    /// the store path the tree will have), e.g. `/nix/store/…-x/sub/fifo`.
    #[must_use]
    pub fn display_with_root(&self, root: &str) -> String {
        let path = if self.path.is_empty() {
            root.to_owned()
        } else {
            format!(
                "{}/{}",
                root.trim_end_matches('/'),
                String::from_utf8_lossy(&self.path)
            )
        };
        match &self.kind {
            NarErrorKind::Unsupported(what) => format!(
                "'{path}' is a {what}; store paths may only contain regular files, directories and symlinks"
            ),
            NarErrorKind::Io { op, source } => format!("cannot {op} '{path}': {source}"),
            NarErrorKind::Truncated { expected, got } => format!(
                "'{path}' shrank while being read ({got} of {expected} bytes)"
            ),
            NarErrorKind::Changed => format!("'{path}' changed while being read"),
            NarErrorKind::TooDeep => format!(
                "'{path}' is nested more than {MAX_DEPTH} directories deep"
            ),
            NarErrorKind::Sink(e) => format!("writing the archive of '{path}' failed: {e}"),
            NarErrorKind::Ownership => format!(
                "invalid ownership on file '{path}' (owned by neither the build's account nor root; a hard link to someone else's file?)"
            ),
            NarErrorKind::OpenForWriting => format!(
                "'{path}' is still open for writing by another process, which could change it after it was hashed"
            ),
            NarErrorKind::TimedOut => format!("ran out of time while reading '{path}'"),
            NarErrorKind::Cancelled => {
                format!("stopped while reading '{path}': the hook was told to stop")
            }
            NarErrorKind::TooLarge { limit } => format!(
                "'{path}' takes the outputs past the size limit of {limit} bytes (NAR)"
            ),
        }
    }
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn type_name(mode: u32) -> Result<Type, &'static str> {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Ok(Type::File),
        SFlag::S_IFDIR => Ok(Type::Directory),
        SFlag::S_IFLNK => Ok(Type::Symlink),
        SFlag::S_IFIFO => Err("fifo"),
        SFlag::S_IFSOCK => Err("socket"),
        SFlag::S_IFCHR => Err("character device"),
        SFlag::S_IFBLK => Err("block device"),
        _ => Err("file of unknown type"),
    }
}

fn hint_unsupported(t: Type) -> Option<&'static str> {
    match t {
        Type::File | Type::Directory | Type::Symlink => None,
        Type::Fifo => Some("fifo"),
        Type::Socket => Some("socket"),
        Type::CharacterDevice => Some("character device"),
        Type::BlockDevice => Some("block device"),
    }
}

const S_IXUSR: u32 = 0o100;

/// Maximum directory nesting [`dump_path`] accepts (the walk is iterative,
/// but keeps one open descriptor per level). Real trees are nowhere near it.
pub const MAX_DEPTH: usize = 1000;

struct Dumper<'s, S: ?Sized> {
    sink: &'s mut S,
    seal: Option<(Uid, Gid)>,
    owner: Option<u32>,
    deadline: Option<std::time::Instant>,
    cancel: Option<&'static std::sync::atomic::AtomicBool>,
    max_size: Option<u64>,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Bytes of archive written so far.
    written: u64,
    /// Hard-linked files this pass made ours (see [`Dumper::seal_fd`]).
    sealed: std::collections::HashSet<(u64, u64)>,
    rel: Vec<u8>,
}

impl<S: NarSink + ?Sized> Dumper<'_, S> {
    fn err(&self, kind: NarErrorKind) -> NarError {
        NarError {
            path: self.rel.clone(),
            kind,
        }
    }

    fn io(&self, op: &'static str, e: Errno) -> NarError {
        self.err(NarErrorKind::Io {
            op,
            source: errno_io(e),
        })
    }

    fn tokens(&mut self, toks: &[&[u8]]) -> Result<(), NarError> {
        for t in toks {
            self.grow(string_len(t.len() as u64))?;
            if let Err(e) = write_str(self.sink, t) {
                return Err(self.err(NarErrorKind::Sink(e)));
            }
        }
        Ok(())
    }

    /// Accounts for `n` more bytes of archive, refusing them past the size
    /// limit.
    fn grow(&mut self, n: u64) -> Result<(), NarError> {
        let total = self.written.saturating_add(n);
        if let Some(limit) = self.max_size.filter(|&l| total > l) {
            return Err(self.err(NarErrorKind::TooLarge { limit }));
        }
        self.written = total;
        Ok(())
    }

    fn check_stop(&self) -> Result<(), NarError> {
        if self
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(self.err(NarErrorKind::Cancelled));
        }
        match self.deadline {
            Some(d) if std::time::Instant::now() >= d => Err(self.err(NarErrorKind::TimedOut)),
            _ => Ok(()),
        }
    }

    /// When sealing a tree another account built: refuses a file some
    /// process still has open for writing. A read lease is granted only when nobody does (open
    /// descriptors and shared writable mappings alike), and once the file
    /// is sealed nobody else can open it for writing again. File systems
    /// without leases are taken as they are.
    fn check_not_open_for_writing(&self, fd: BorrowedFd<'_>) -> Result<(), NarError> {
        // Only a tree another account built can have a writer we don't
        // know of (ours, or root's own command's, has none left).
        let Some((uid, _)) = self.seal else {
            return Ok(());
        };
        if self.owner.is_none_or(|o| o == uid.as_raw()) {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let fd = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; the lease is given back at
        // once (it was only a question).
        let rc = unsafe { nix::libc::fcntl(fd, nix::libc::F_SETLEASE, nix::libc::F_RDLCK) };
        if rc == 0 {
            // SAFETY: as above.
            unsafe { nix::libc::fcntl(fd, nix::libc::F_SETLEASE, nix::libc::F_UNLCK) };
            return Ok(());
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EBUSY => Err(self.err(NarErrorKind::OpenForWriting)),
            _ => Ok(()),
        }
    }

    fn seal_fd(&mut self, fd: BorrowedFd<'_>, st: &FileStat, mode: u32) -> Result<(), NarError> {
        let Some((uid, gid)) = self.seal else {
            return Ok(());
        };
        let id = (st.st_dev, st.st_ino);
        if let Some(owner) = self.owner.filter(|&o| o != uid.as_raw()) {
            if st.st_uid != uid.as_raw() && st.st_uid != owner {
                return Err(self.err(NarErrorKind::Ownership));
            }
            // A build that is not ours can only have a file of ours by
            // hard-linking it in (where protected_hardlinks is off): unless
            // this pass sealed it (another link to the same file).
            if st.st_uid == uid.as_raw() && st.st_nlink > 1 && !self.sealed.contains(&id) {
                return Err(self.err(NarErrorKind::Ownership));
            }
        }
        let mut chowned = false;
        if st.st_uid != uid.as_raw() {
            fchown(fd, Some(uid), Some(gid)).map_err(|e| self.io("change the owner of", e))?;
            chowned = true;
            if st.st_nlink > 1 {
                self.sealed.insert(id);
            }
        }
        if chowned || st.st_mode & 0o7777 != mode {
            fchmod(fd, Mode::from_bits_truncate(mode))
                .map_err(|e| self.io("change the mode of", e))?;
        }
        Ok(())
    }

    /// The type of entry `name` of `dir`: the `d_type` hint from the
    /// directory listing if there is one, else `fstatat`.
    fn kind_of(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        hint: Option<Type>,
    ) -> Result<Type, NarError> {
        match hint {
            Some(t) => match hint_unsupported(t) {
                Some(what) => Err(self.err(NarErrorKind::Unsupported(what))),
                None => Ok(t),
            },
            None => {
                let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io("stat", e))?;
                type_name(st.st_mode).map_err(|what| self.err(NarErrorKind::Unsupported(what)))
            }
        }
    }

    fn push_rel(&mut self, name: &CStr) {
        if !self.rel.is_empty() {
            self.rel.push(b'/');
        }
        self.rel.extend_from_slice(name.to_bytes());
    }

    fn pop_rel(&mut self) {
        let cut = self.rel.iter().rposition(|&b| b == b'/').unwrap_or(0);
        self.rel.truncate(cut);
    }

    /// Archive the entry `name` of the directory `parent` (the root of the
    /// tree). Directories are walked with an explicit stack, so depth costs
    /// no call stack.
    fn root(&mut self, parent: BorrowedFd<'_>, name: &CStr) -> Result<NodeKind, NarError> {
        match self.kind_of(parent, name, None)? {
            Type::File => return self.regular(parent, name),
            Type::Directory => {}
            _ => return self.symlink(parent, name),
        }
        let mut stack = vec![self.open_directory(parent, name, true)?];
        loop {
            let depth = stack.len();
            let Some(top) = stack.last_mut() else {
                break;
            };
            let Some(slot) = top.entries.get_mut(top.next) else {
                // End of this directory's node, then of the entry holding it.
                self.tokens(&[b")"])?;
                stack.pop();
                if !stack.is_empty() {
                    self.tokens(&[b")"])?;
                    self.pop_rel();
                }
                continue;
            };
            top.next += 1;
            let (child, hint) = std::mem::take(slot);
            self.push_rel(&child);
            self.check_stop()?;
            self.tokens(&[b"entry", b"(", b"name", child.as_bytes(), b"node"])?;
            match self.kind_of(top.dir.as_fd(), &child, hint)? {
                Type::Directory => {
                    if depth >= MAX_DEPTH {
                        return Err(self.err(NarErrorKind::TooDeep));
                    }
                    let frame = self.open_directory(top.dir.as_fd(), &child, false)?;
                    stack.push(frame);
                }
                Type::File => {
                    self.regular(top.dir.as_fd(), &child)?;
                    self.tokens(&[b")"])?;
                    self.pop_rel();
                }
                _ => {
                    self.symlink(top.dir.as_fd(), &child)?;
                    self.tokens(&[b")"])?;
                    self.pop_rel();
                }
            }
        }
        Ok(NodeKind::Directory)
    }

    fn regular(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<NodeKind, NarError> {
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK;
        let fd = match openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => return Err(self.err(NarErrorKind::Changed)),
            Err(e) => return Err(self.io("open", e)),
        };
        let st = fstat(&fd).map_err(|e| self.io("stat", e))?;
        if type_name(st.st_mode) != Ok(Type::File) {
            return Err(self.err(NarErrorKind::Changed));
        }
        let executable = st.st_mode & S_IXUSR != 0;
        self.seal_fd(fd.as_fd(), &st, if executable { 0o555 } else { 0o444 })?;
        self.check_not_open_for_writing(fd.as_fd())?;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if executable {
            self.tokens(&[b"(", b"type", b"regular", b"executable", b"", b"contents"])?;
        } else {
            self.tokens(&[b"(", b"type", b"regular", b"contents"])?;
        }
        self.grow(
            8u64.saturating_add(size)
                .saturating_add(padding_len(size) as u64),
        )?;
        if let Err(e) = self.sink.write(&size.to_le_bytes()) {
            return Err(self.err(NarErrorKind::Sink(e)));
        }
        let mut file = File::from(fd);
        // In slices, so a deadline or a stop stops even a file of many
        // gigabytes.
        let mut done = 0;
        while done < size {
            self.check_stop()?;
            let slice = (size - done).min(LIMIT_SLICE);
            self.sink.contents(&mut file, slice).map_err(|e| match e {
                ContentsError::Read(source) => self.err(NarErrorKind::Io { op: "read", source }),
                ContentsError::Truncated { got } => self.err(NarErrorKind::Truncated {
                    expected: size,
                    got: done + got,
                }),
                ContentsError::Sink(e) => self.err(NarErrorKind::Sink(e)),
            })?;
            done += slice;
            if let Some(p) = &self.progress {
                p.fetch_add(slice, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Err(e) = write_padding(self.sink, size) {
            return Err(self.err(NarErrorKind::Sink(e)));
        }
        self.tokens(&[b")"])?;
        Ok(NodeKind::Regular { executable, size })
    }

    fn symlink(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<NodeKind, NarError> {
        let target = match readlinkat(dir, name) {
            Ok(t) => t,
            Err(Errno::EINVAL) => return Err(self.err(NarErrorKind::Changed)),
            Err(e) => return Err(self.io("read the link", e)),
        };
        self.tokens(&[
            b"(",
            b"type",
            b"symlink",
            b"target",
            target.as_bytes(),
            b")",
        ])?;
        Ok(NodeKind::Symlink)
    }

    /// Open, seal and list a directory, and write the start of its node.
    fn open_directory(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        root: bool,
    ) -> Result<Frame, NarError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(self.err(NarErrorKind::Changed)),
            Err(e) => return Err(self.io("open", e)),
        };
        let st = fstat(&fd).map_err(|e| self.io("stat", e))?;
        self.seal_fd(fd.as_fd(), &st, if root { 0o755 } else { 0o555 })?;
        let mut dir = Dir::from_fd(fd).map_err(|e| self.io("open", e))?;
        let mut entries: Vec<(CString, Option<Type>)> = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| self.io("list", e))?;
            let n = entry.file_name();
            if n.to_bytes() == b"." || n.to_bytes() == b".." {
                continue;
            }
            entries.push((n.to_owned(), entry.file_type()));
        }
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        self.tokens(&[b"(", b"type", b"directory"])?;
        Ok(Frame {
            dir,
            entries,
            next: 0,
        })
    }
}

/// A directory being archived: its open descriptor and sorted entries.
struct Frame {
    dir: Dir,
    entries: Vec<(CString, Option<Type>)>,
    next: usize,
}

/// Serialise the tree at `path` (a regular file, directory or symlink; a
/// symlink is archived as a link, never followed) into `sink`, and return
/// what the top-level node was.
pub fn dump_path<S: NarSink + ?Sized>(
    path: &Path,
    sink: &mut S,
    options: &DumpOptions,
) -> Result<NodeKind, NarError> {
    let mut dumper = Dumper {
        sink,
        seal: options.seal.then(|| (geteuid(), getegid())),
        owner: options.owner,
        deadline: options.deadline,
        cancel: options.cancel,
        max_size: options.max_size,
        progress: options.progress.clone(),
        written: 0,
        sealed: std::collections::HashSet::new(),
        rel: Vec::new(),
    };
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        ),
        // `/`, `..` and the like: open the directory itself.
        _ => (path, std::ffi::OsStr::new(".")),
    };
    let name = CString::new(name.as_bytes()).map_err(|_| NarError {
        path: Vec::new(),
        kind: NarErrorKind::Io {
            op: "open",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        },
    })?;
    let parent_fd = open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| dumper.io("open the parent directory of", e))?;
    dumper.tokens(&[NAR_VERSION_MAGIC])?;
    dumper.root(parent_fd.as_fd(), &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_offset_matches_header() {
        let mut v = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
        ] {
            write_str(&mut v, t).unwrap();
        }
        v.extend_from_slice(&5u64.to_le_bytes());
        assert_eq!(v.len() as u64, FLAT_CONTENTS_OFFSET);
    }

    #[test]
    fn string_encoding() {
        let mut v = Vec::new();
        write_str(&mut v, b"abc").unwrap();
        assert_eq!(v, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0");
        assert_eq!(string_len(3), 16);
        assert_eq!(string_len(0), 8);
        assert_eq!(string_len(8), 16);
        let mut v = Vec::new();
        write_str(&mut v, b"").unwrap();
        assert_eq!(v, [0u8; 8]);
    }
}
