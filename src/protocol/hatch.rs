//! The framed protocol between the `ssh` executor and `nix-hatch agent` on
//! the far side, over one SSH channel (the agent's stdin and stdout).
//!
//! Every message is a frame: a tag byte, the payload length (u32, little
//! endian) and the payload. Each tag has its own maximum length, checked
//! before anything is allocated, so a corrupt or hostile stream cannot make
//! either side allocate without limit.
//!
//! ```text
//! executor → agent:  Request
//! agent → executor:  Hello, Log*, [Data*], [Usage], Trailer     (or, at any point, Error)
//! ```
//!
//! - `Request` (`Q`): argv, environment, output names, limits (wire format
//!   of [`super::wire`]: u64 LE, length-prefixed padded byte strings).
//!   Version 1 has `timeout` and `max-silent-time`; version 2, sent only
//!   when the executor has resource limits (so that an older agent still
//!   serves executors without), adds them ([`RequestLimits`]) and may be a
//!   probe (`nix-hatch check --connect`: can the agent enforce them?).
//! - `Hello` (`H`): protocol version and the far side's temporary directory
//!   (outputs built there are relocated; the executor warns when an output
//!   still contains that path).
//! - `Log` (`G`): a chunk of the command's stdout/stderr, as it comes.
//! - `Usage` (`U`): what the command used there ([`Usage`]), right before
//!   the trailer; only in answer to a version 2 request.
//! - `Data` (`D`): a piece of the outputs' tar stream, only after the command
//!   exited successfully; each output is a top-level entry named after it.
//! - `Trailer` (`T`): how the command ended, the number of tar bytes, and the
//!   total length and blake3 digest of every byte the agent sent before the
//!   trailer (all frames, headers included). The executor verifies both
//!   before anything is imported.
//! - `Error` (`E`): the agent itself failed (one line); the stream ends.

use std::io::{self, Read, Write};

use super::wire::{self, WireError};
use crate::config::host::AGENT_VARS;
use crate::config::ResourceLimits;
use crate::usage::{Source, Usage};

pub const VERSION: u64 = 1;
/// The request version with resource limits.
pub const VERSION_LIMITS: u64 = 2;

pub const TAG_REQUEST: u8 = b'Q';
pub const TAG_HELLO: u8 = b'H';
pub const TAG_LOG: u8 = b'G';
pub const TAG_DATA: u8 = b'D';
pub const TAG_TRAILER: u8 = b'T';
pub const TAG_ERROR: u8 = b'E';
pub const TAG_USAGE: u8 = b'U';

/// Frame header: tag + u32 length.
pub const HEADER_LEN: usize = 5;
pub const MAX_REQUEST: u32 = 16 << 20;
pub const MAX_LOG: u32 = 64 << 10;
pub const MAX_DATA: u32 = 1 << 20;
pub const MAX_HELLO: u32 = 64 << 10;
pub const MAX_ERROR: u32 = 64 << 10;
pub const MAX_USAGE: u32 = 1 << 10;
pub const TRAILER_LEN: u32 = 8 + 8 + 32 + 1 + 8;
/// Longest single argv entry or environment value in a request.
const MAX_ITEM: u64 = 8 << 20;
const MAX_ITEMS: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended before a frame (`clean` = at a frame boundary).
    #[error("{}", if *clean { "stream ended" } else { "stream ended inside a frame" })]
    Eof { clean: bool },
    /// A tag this side does not expect here.
    #[error("unexpected frame tag 0x{0:02x}")]
    BadTag(u8),
    /// A length beyond the tag's limit.
    #[error("frame {:?} claims {len} bytes, more than allowed", *tag as char)]
    TooLong { tag: u8, len: u32 },
    /// A payload that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(io::Error),
}

impl From<WireError> for FrameError {
    fn from(e: WireError) -> Self {
        FrameError::Malformed(e.to_string())
    }
}

fn max_len(tag: u8) -> Option<u32> {
    Some(match tag {
        TAG_REQUEST => MAX_REQUEST,
        TAG_HELLO => MAX_HELLO,
        TAG_LOG => MAX_LOG,
        TAG_DATA => MAX_DATA,
        TAG_TRAILER => TRAILER_LEN,
        TAG_ERROR => MAX_ERROR,
        TAG_USAGE => MAX_USAGE,
        _ => return None,
    })
}

/// Reads exactly `buf.len()` bytes; `Eof` if the stream ends first.
fn fill(r: &mut impl Read, buf: &mut [u8], at_boundary: bool) -> Result<(), FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(FrameError::Eof {
                    clean: at_boundary && filled == 0,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Eof { clean: false })
            }
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one frame's header; returns (tag, length) after checking the
/// tag's limit. `header` receives the raw bytes (for the digest).
pub fn read_header(
    r: &mut impl Read,
    header: &mut [u8; HEADER_LEN],
) -> Result<(u8, u32), FrameError> {
    fill(r, header, true)?;
    let tag = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let max = max_len(tag).ok_or(FrameError::BadTag(tag))?;
    if len > max {
        return Err(FrameError::TooLong { tag, len });
    }
    Ok((tag, len))
}

/// Reads a payload of `len` bytes (already bounded by [`read_header`]) into
/// `buf`, which is resized.
pub fn read_payload(r: &mut impl Read, len: u32, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    buf.resize(len as usize, 0);
    fill(r, buf, false)
}

pub fn header(tag: u8, len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_le_bytes();
    [tag, l[0], l[1], l[2], l[3]]
}

/// Writes one frame (the caller keeps `payload` within the tag's limit).
pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    debug_assert!(max_len(tag).is_some_and(|m| payload.len() <= m as usize));
    w.write_all(&header(tag, payload.len()))?;
    w.write_all(payload)
}

/// What the executor asks the agent to run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// Program and arguments (the admin's command, then the derivation's args).
    pub argv: Vec<Vec<u8>>,
    /// Environment for the command; the agent adds the output variables,
    /// the build-dir variables, `PATH` and `HOME`.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Output names; each becomes a variable naming a temporary path.
    pub outputs: Vec<String>,
    /// Seconds; 0 = none.
    pub timeout: u64,
    pub max_silent: u64,
    /// Resource limits (version 2); `None`: none asked for.
    pub limits: Option<RequestLimits>,
}

/// The resource limits of a version 2 request, applied by the agent on
/// the far side.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestLimits {
    pub limits: ResourceLimits,
    /// Only say whether they can be enforced there; run nothing (`argv`
    /// is empty).
    pub probe: bool,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = (|| -> io::Result<()> {
            wire::write_u64(
                &mut b,
                if self.limits.is_some() {
                    VERSION_LIMITS
                } else {
                    VERSION
                },
            )?;
            wire::write_string_list(&mut b, &self.argv)?;
            wire::write_u64(&mut b, self.env.len() as u64)?;
            for (k, v) in &self.env {
                wire::write_bytes(&mut b, k)?;
                wire::write_bytes(&mut b, v)?;
            }
            wire::write_string_list(&mut b, &self.outputs)?;
            wire::write_u64(&mut b, self.timeout)?;
            wire::write_u64(&mut b, self.max_silent)?;
            if let Some(l) = &self.limits {
                let opt = |x: Option<u64>| x.unwrap_or(0);
                wire::write_u64(&mut b, opt(l.limits.memory_max))?;
                wire::write_u64(&mut b, opt(l.limits.tasks_max))?;
                wire::write_u64(&mut b, l.limits.cpu_max.map_or(0, f64::to_bits))?;
                wire::write_bytes(
                    &mut b,
                    l.limits.cgroup_parent.as_deref().unwrap_or("").as_bytes(),
                )?;
                wire::write_u64(&mut b, l.probe as u64)?;
            }
            Ok(())
        })();
        b
    }

    pub fn decode(mut p: &[u8]) -> Result<Request, FrameError> {
        let r = &mut p;
        let version = wire::read_u64(r, "protocol version")?;
        if version != VERSION && version != VERSION_LIMITS {
            return Err(FrameError::Malformed(format!(
                "protocol version {version}, this agent speaks {VERSION} and {VERSION_LIMITS}"
            )));
        }
        let argv = read_list(r, "argv")?;
        let n = wire::read_u64(r, "environment")?;
        if n > MAX_ITEMS {
            return Err(FrameError::Malformed(format!("{n} environment variables")));
        }
        let mut env = Vec::new();
        for _ in 0..n {
            let k = wire::read_bytes(r, MAX_ITEM, "variable name")?;
            let v = wire::read_bytes(r, MAX_ITEM, "variable value")?;
            env.push((k, v));
        }
        let outputs = wire::read_string_list(r, "outputs")?;
        for o in &outputs {
            if !valid_output_name(o) {
                return Err(FrameError::Malformed(format!("bad output name {o:?}")));
            }
        }
        let timeout = wire::read_u64(r, "timeout")?;
        let max_silent = wire::read_u64(r, "max-silent-time")?;
        let limits = if version == VERSION_LIMITS {
            Some(read_limits(r)?)
        } else {
            None
        };
        if !r.is_empty() {
            return Err(FrameError::Malformed(
                "trailing bytes after the request".into(),
            ));
        }
        if argv.is_empty() && !limits.as_ref().is_some_and(|l| l.probe) {
            return Err(FrameError::Malformed("empty command".into()));
        }
        Ok(Request {
            argv,
            env,
            outputs,
            timeout,
            max_silent,
            limits,
        })
    }
}

/// The limits of a version 2 request, checked as the config checks them:
/// the agent takes no value a config could not have.
fn read_limits(r: &mut &[u8]) -> Result<RequestLimits, FrameError> {
    use crate::config::limits::{MAX_CPU, MIN_CPU, MIN_MEMORY, MIN_TASKS};
    let some = |x: u64| (x != 0).then_some(x);
    let memory_max = some(wire::read_u64(r, "memory-max")?);
    let tasks_max = some(wire::read_u64(r, "tasks-max")?);
    let cpu_max = some(wire::read_u64(r, "cpu-max")?).map(f64::from_bits);
    let parent = wire::read_bytes(r, 4096, "cgroup-parent")?;
    let probe = wire::read_u64(r, "probe")? != 0;
    fn bad<T>(what: &str) -> Result<T, FrameError> {
        Err(FrameError::Malformed(format!("bad {what} in the request")))
    }
    if memory_max.is_some_and(|m| m < MIN_MEMORY) {
        return bad("memory-max");
    }
    if tasks_max.is_some_and(|t| t < MIN_TASKS) {
        return bad("tasks-max");
    }
    if cpu_max.is_some_and(|c| !(MIN_CPU..=MAX_CPU).contains(&c)) {
        return bad("cpu-max");
    }
    let cgroup_parent = match parent.as_slice() {
        [] => None,
        p => {
            let Ok(p) = String::from_utf8(p.to_vec()) else {
                return bad("cgroup-parent");
            };
            if !p.starts_with('/') || p.split('/').any(|c| c == "." || c == "..") {
                return bad("cgroup-parent");
            }
            Some(p)
        }
    };
    Ok(RequestLimits {
        limits: ResourceLimits {
            memory_max,
            tasks_max,
            cpu_max,
            cgroup_parent,
        },
        probe,
    })
}

fn read_list(r: &mut &[u8], what: &'static str) -> Result<Vec<Vec<u8>>, FrameError> {
    let n = wire::read_u64(r, what)?;
    if n > MAX_ITEMS {
        return Err(FrameError::Malformed(format!("{n} entries in {what}")));
    }
    (0..n)
        .map(|_| wire::read_bytes(r, MAX_ITEM, what).map_err(FrameError::from))
        .collect()
}

/// Output names as Nix allows them, and safe as a single path component.
pub fn valid_output_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

/// Lower-case variables with a meaning to common programs (curl, wget...).
const SPECIAL_LOWER: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
];

/// Why an output name cannot become a variable of the command (`$out`,
/// `$dev`...), if it cannot. Output names come from the derivation, i.e.
/// from anyone who can start a build; the command is the admin's. So none
/// may replace a variable the agent or the executor sets, nor one that
/// makes the loader, a shell or the C library load or run something
/// (`LD_PRELOAD`, `BASH_ENV`, `ENV`, `IFS`, `GCONV_PATH`...): those are
/// upper-case, the name space POSIX leaves to the system, so every name
/// without a lower-case letter is refused.
pub fn output_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Some("not a variable name");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Some(
            "upper-case names (PATH, LD_PRELOAD, BASH_ENV, IFS, TMPDIR...) belong to the system and are not set from output names",
        );
    }
    if name.starts_with("NIX_") || AGENT_VARS.contains(&name) {
        return Some("the agent or the executor sets this variable");
    }
    if SPECIAL_LOWER.contains(&name) || name.to_ascii_lowercase().ends_with("_proxy") {
        return Some("network tools read this variable");
    }
    None
}

/// The first of `names` that [`output_name_problem`] refuses, with why.
pub fn bad_output_name<'a>(
    names: impl IntoIterator<Item = &'a String>,
) -> Option<(&'a str, &'static str)> {
    names
        .into_iter()
        .find_map(|n| output_name_problem(n).map(|why| (n.as_str(), why)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u64,
    /// The far side's temporary directory; `$out` etc. live below it.
    pub temp_dir: String,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let _ = wire::write_u64(&mut b, self.version);
        let _ = wire::write_bytes(&mut b, self.temp_dir.as_bytes());
        b
    }

    pub fn decode(mut p: &[u8]) -> Result<Hello, FrameError> {
        let r = &mut p;
        let version = wire::read_u64(r, "version")?;
        let temp_dir = wire::read_bytes(r, MAX_HELLO as u64, "temp dir")?;
        Ok(Hello {
            version,
            temp_dir: String::from_utf8_lossy(&temp_dir).into_owned(),
        })
    }
}

/// How the far side's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signalled(i32),
    /// `timeout` (seconds) hit; killed.
    TimedOut(u64),
    /// `max-silent-time` (seconds) hit; killed.
    Silent(u64),
}

impl Status {
    fn encode(self) -> (u8, u64) {
        match self {
            Status::Exited(c) => (0, c as u32 as u64),
            Status::Signalled(s) => (1, s as u32 as u64),
            Status::TimedOut(s) => (2, s),
            Status::Silent(s) => (3, s),
        }
    }

    fn decode(kind: u8, v: u64) -> Result<Status, FrameError> {
        Ok(match kind {
            0 => Status::Exited(v as u32 as i32),
            1 => Status::Signalled(v as u32 as i32),
            2 => Status::TimedOut(v),
            3 => Status::Silent(v),
            k => return Err(FrameError::Malformed(format!("unknown status kind {k}"))),
        })
    }

    pub fn success(self) -> bool {
        self == Status::Exited(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Every byte the agent sent before the trailer frame.
    pub stream_bytes: u64,
    /// Bytes of tar data (payloads of `Data` frames).
    pub tar_bytes: u64,
    /// blake3 of every byte the agent sent before the trailer frame.
    pub digest: [u8; 32],
    pub status: Status,
}

impl Trailer {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TRAILER_LEN as usize);
        b.extend_from_slice(&self.stream_bytes.to_le_bytes());
        b.extend_from_slice(&self.tar_bytes.to_le_bytes());
        b.extend_from_slice(&self.digest);
        let (kind, v) = self.status.encode();
        b.push(kind);
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<Trailer, FrameError> {
        if p.len() != TRAILER_LEN as usize {
            return Err(FrameError::Malformed(format!(
                "trailer of {} bytes, expected {TRAILER_LEN}",
                p.len()
            )));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&p[16..48]);
        Ok(Trailer {
            stream_bytes: u64_at(0),
            tar_bytes: u64_at(8),
            digest,
            status: Status::decode(p[48], u64_at(49))?,
        })
    }
}

/// `Usage` frames: what the command used on the far side.
pub fn encode_usage(u: &Usage) -> Vec<u8> {
    let unknown = u64::MAX;
    let micros = |d: Option<std::time::Duration>| d.map_or(unknown, |d| d.as_micros() as u64);
    let mut b = Vec::new();
    for v in [
        match u.memory_source {
            Source::Cgroup => 0,
            Source::Processes => 1,
        },
        u.peak_memory.unwrap_or(unknown),
        micros(u.cpu),
        u.wall.as_micros() as u64,
        u.oom_kills.unwrap_or(unknown),
        u.memory_limit_hit as u64,
        u.forks_refused,
        micros(u.throttled),
    ] {
        let _ = wire::write_u64(&mut b, v);
    }
    b
}

pub fn decode_usage(mut p: &[u8]) -> Result<Usage, FrameError> {
    let r = &mut p;
    let mut v = [0u64; 8];
    for x in v.iter_mut() {
        *x = wire::read_u64(r, "usage")?;
    }
    let known = |x: u64| (x != u64::MAX).then_some(x);
    let micros = |x: u64| known(x).map(std::time::Duration::from_micros);
    Ok(Usage {
        memory_source: if v[0] == 0 {
            Source::Cgroup
        } else {
            Source::Processes
        },
        peak_memory: known(v[1]),
        cpu: micros(v[2]),
        wall: std::time::Duration::from_micros(v[3]),
        oom_kills: known(v[4]),
        memory_limit_hit: v[5] != 0,
        forks_refused: v[6],
        throttled: micros(v[7]),
    })
}

/// A writer that counts and hashes everything written through it (the
/// agent's stdout before the trailer).
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    pub fn frame(&mut self, tag: u8, payload: &[u8]) -> io::Result<()> {
        let h = header(tag, payload.len());
        self.hasher.update(&h);
        self.hasher.update(payload);
        self.bytes += (h.len() + payload.len()) as u64;
        self.inner.write_all(&h)?;
        self.inner.write_all(payload)
    }

    /// Digest and length so far.
    pub fn sum(&self) -> ([u8; 32], u64) {
        (*self.hasher.finalize().as_bytes(), self.bytes)
    }

    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Lowercase hex, for digests in messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            argv: vec![b"/opt/render".to_vec(), b"--x".to_vec(), vec![0xff, 0]],
            env: vec![(b"A".to_vec(), b"b c".to_vec())],
            outputs: vec!["out".into(), "dev".into()],
            timeout: 10,
            max_silent: 3,
            limits: None,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        // Without limits the request is what an older agent reads.
        assert_eq!(wire::read_u64(&mut &r.encode()[..], "v").unwrap(), VERSION);
        let mut l = r.clone();
        l.limits = Some(RequestLimits {
            limits: ResourceLimits {
                memory_max: Some(64 << 20),
                tasks_max: None,
                cpu_max: Some(0.5),
                cgroup_parent: Some("/nix-hatch-agent".into()),
            },
            probe: false,
        });
        assert_eq!(Request::decode(&l.encode()).unwrap(), l);
        let mut probe = l.clone();
        probe.argv.clear();
        probe.limits.as_mut().unwrap().probe = true;
        assert_eq!(Request::decode(&probe.encode()).unwrap(), probe);
        let mut bad = l.clone();
        bad.limits.as_mut().unwrap().limits.cgroup_parent = Some("/a/../b".into());
        assert!(Request::decode(&bad.encode()).is_err());
        let mut bad = l.clone();
        bad.limits.as_mut().unwrap().limits.tasks_max = Some(1);
        assert!(Request::decode(&bad.encode()).is_err());
        let mut bad = r.clone();
        bad.outputs = vec!["../x".into()];
        assert!(Request::decode(&bad.encode()).is_err());
        let enc = r.encode();
        assert!(Request::decode(&enc[..enc.len() - 3]).is_err());
    }

    #[test]
    fn trailer_round_trip() {
        for status in [
            Status::Exited(0),
            Status::Exited(-1),
            Status::Signalled(9),
            Status::TimedOut(5),
            Status::Silent(7),
        ] {
            let t = Trailer {
                stream_bytes: 1 << 40,
                tar_bytes: 12345,
                digest: [7; 32],
                status,
            };
            let enc = t.encode();
            assert_eq!(enc.len(), TRAILER_LEN as usize);
            assert_eq!(Trailer::decode(&enc).unwrap(), t);
        }
    }

    #[test]
    fn usage_round_trip() {
        use std::time::Duration;
        let u = Usage {
            memory_source: Source::Cgroup,
            peak_memory: Some(1 << 30),
            cpu: Some(Duration::from_micros(1_500_001)),
            wall: Duration::from_secs(3),
            oom_kills: Some(1),
            memory_limit_hit: true,
            forks_refused: 12,
            throttled: None,
        };
        assert_eq!(decode_usage(&encode_usage(&u)).unwrap(), u);
        let bare = Usage {
            memory_source: Source::Processes,
            ..Usage::default()
        };
        assert_eq!(decode_usage(&encode_usage(&bare)).unwrap(), bare);
        assert!(encode_usage(&u).len() <= MAX_USAGE as usize);
        assert!(decode_usage(&[1, 2, 3]).is_err());
    }

    #[test]
    fn frames_are_bounded() {
        let mut hdr = [0u8; HEADER_LEN];
        let big = header(TAG_LOG, MAX_LOG as usize + 1);
        assert!(matches!(
            read_header(&mut &big[..], &mut hdr),
            Err(FrameError::TooLong { .. })
        ));
        let bad = header(b'Z', 1);
        assert!(matches!(
            read_header(&mut &bad[..], &mut hdr),
            Err(FrameError::BadTag(b'Z'))
        ));
        assert!(matches!(
            read_header(&mut &[][..], &mut hdr),
            Err(FrameError::Eof { clean: true })
        ));
        assert!(matches!(
            read_header(&mut &[TAG_LOG, 1][..], &mut hdr),
            Err(FrameError::Eof { clean: false })
        ));
        let mut w = HashingWriter::new(Vec::new());
        w.frame(TAG_LOG, b"hello").unwrap();
        let (digest, n) = w.sum();
        let data = w.inner_mut().clone();
        assert_eq!(n, data.len() as u64);
        assert_eq!(&digest, blake3::hash(&data).as_bytes());
        let (tag, len) = read_header(&mut &data[..], &mut hdr).unwrap();
        assert_eq!((tag, len), (TAG_LOG, 5));
        let mut p = Vec::new();
        read_payload(&mut &data[HEADER_LEN..], len, &mut p).unwrap();
        assert_eq!(p, b"hello");
    }
}
