//! The record of every escape attempt (docs/architecture.md, "Who
//! asked, and the record"): `state-dir/audit.jsonl`, one JSON object per line, read
//! back by `nix-hatch audit`.
//!
//! A record is written with one `write(2)` on a file opened `O_APPEND`, so
//! concurrent builds never interleave; the file is mode 0600 and belongs to
//! the hook's account (root under nix-daemon). Nothing secret goes in: the
//! derivation's own arguments (bounded), paths, hashes and counts — never a
//! credential, which only the proxy ever holds. The file is bounded: past
//! [`MAX_BYTES`] it is renamed `audit.jsonl.1` (older ones shift up to
//! `.5`, the oldest is dropped).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The log's file name in the state dir.
pub const FILE: &str = "audit.jsonl";
/// Size past which the log is rotated.
pub const MAX_BYTES: u64 = 16 << 20;
/// Rotated files kept (`audit.jsonl.1` … `.5`).
pub const KEEP: usize = 5;
/// Arguments recorded per build, characters per argument, and in all: a
/// record stays a few KiB whatever the derivation (a refused build costs
/// its account little, so records must not let it flush the log fast).
pub const MAX_ARGS: usize = 32;
pub const MAX_ARG_BYTES: usize = 256;
pub const MAX_ARGS_TOTAL: usize = 2048;
/// Characters of `reason` recorded.
pub const MAX_REASON: usize = 1024;

/// How an escape attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Its outputs were registered.
    Built,
    /// The command or builder failed, or its outputs were refused.
    Failed,
    /// `timeout` or `max-silent-time` stopped it.
    TimedOut,
    /// The requesting account may not use the executor: nothing ran.
    Refused,
    /// nix-hatch itself could not run it (or it was cancelled).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Built => "built",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed-out",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        [
            Outcome::Built,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Refused,
            Outcome::Error,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// One output of a built derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub path: String,
    /// `sha256:` and the NAR hash in Nix's base32, as `nix path-info` shows.
    pub nar_hash: String,
    /// NAR bytes.
    pub size: u64,
}

/// The jail proxy's decisions during the build (the per-request records
/// are in `proxy-audit.jsonl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounts {
    pub allowed: u64,
    pub denied: u64,
}

/// One escape attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When it started: RFC 3339, UTC.
    pub time: String,
    pub duration_s: f64,
    /// The requesting account's name (absent when unknown).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uid: Option<u32>,
    /// `daemon`, `local` or `unknown`.
    pub via: String,
    pub drv: String,
    /// The escape feature that routed it.
    pub feature: String,
    pub executor: String,
    /// `host`, `jail` or `ssh`.
    pub kind: String,
    /// The derivation's arguments (at most [`MAX_ARGS`], each at most
    /// [`MAX_ARG_BYTES`]; `args_total` gives their number when cut).
    pub args: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub args_total: Option<usize>,
    pub result: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exit_status: Option<i32>,
    /// Why it did not build, in one line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub outputs: Vec<OutputRecord>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proxy: Option<ProxyCounts>,
    /// Seconds it waited inside the hook for a free slot (part of
    /// `duration_s`), when it had to.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub waited_s: Option<f64>,
    /// Peak memory of the build in bytes: its cgroup's, or without one its
    /// largest process's (absent where nothing measured it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_memory_bytes: Option<u64>,
    /// CPU time of all its processes, user + system, in seconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_s: Option<f64>,
    /// How long the builder (or command) ran, in seconds: what `cpu_s`
    /// compares with (`duration_s` is the whole attempt).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub wall_s: Option<f64>,
}

impl Record {
    /// Sets what the build used.
    pub fn set_usage(&mut self, u: &crate::usage::Usage) {
        self.peak_memory_bytes = u.peak_memory;
        self.cpu_s = u.cpu.map(seconds);
        self.wall_s = Some(seconds(u.wall));
    }

    /// Sets `args` from the derivation's arguments, bounded.
    pub fn set_args<'a>(&mut self, args: impl ExactSizeIterator<Item = &'a [u8]>) {
        let total = args.len();
        let mut budget = MAX_ARGS_TOTAL;
        self.args = Vec::new();
        for a in args.take(MAX_ARGS) {
            if budget == 0 {
                break;
            }
            let arg = clip(&String::from_utf8_lossy(a), MAX_ARG_BYTES.min(budget));
            budget = budget.saturating_sub(arg.chars().count());
            self.args.push(arg);
        }
        self.args_total = (self.args.len() < total).then_some(total);
    }

    /// Sets `reason`, bounded.
    pub fn set_reason(&mut self, reason: &str) {
        self.reason = Some(clip(reason, MAX_REASON));
    }

    /// The derivation's name (`hello-1.0` of `/nix/store/…-hello-1.0.drv`).
    pub fn drv_name(&self) -> &str {
        let base = self.drv.rsplit('/').next().unwrap_or(&self.drv);
        let base = base.strip_suffix(".drv").unwrap_or(base);
        base.split_once('-').map_or(base, |(_, n)| n)
    }

    /// When it started, if `time` parses.
    pub fn started(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.time).ok()
    }
}

/// `s` cut to `max` characters (`…` marks a cut).
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// RFC 3339 (UTC, seconds) of `t`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Appends `record` to the log in `state_dir` (rotating it first when it
/// has grown past [`MAX_BYTES`]).
pub fn append(state_dir: &Path, record: &Record) -> io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
    line.push(b'\n');
    let path = state_dir.join(FILE);
    rotate_if_larger(state_dir, FILE, MAX_BYTES)?;
    let mut f = open_for_append(&path)?;
    // One write: O_APPEND makes it land whole after every other record.
    let n = f.write(&line)?;
    if n != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "{}: short write ({n} of {} bytes)",
                path.display(),
                line.len()
            ),
        ));
    }
    Ok(())
}

fn open_for_append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// When `dir/name` has grown to `max` bytes: `name` → `name.1` → … →
/// `name.KEEP` (dropped), under a lock so that concurrent hooks rotate
/// once. (The proxy's own log rotates this way too.)
pub fn rotate_if_larger(dir: &Path, name: &str, max: u64) -> io::Result<()> {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.join(name);
    if !std::fs::metadata(&path).is_ok_and(|m| m.len() >= max) {
        return Ok(());
    }
    let lock = crate::util::open_lock_file(&dir.join(format!("{name}.lock")))?;
    let _held = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    // Another hook may have rotated while we waited.
    if !std::fs::metadata(&path).is_ok_and(|m| m.len() >= max) {
        return Ok(());
    }
    let rotated = |i: usize| dir.join(format!("{name}.{i}"));
    for i in (1..KEEP).rev() {
        let from = rotated(i);
        if from.exists() {
            std::fs::rename(&from, rotated(i + 1))?;
        }
    }
    std::fs::rename(&path, rotated(1))
}

fn rotated(state_dir: &Path, i: usize) -> PathBuf {
    state_dir.join(format!("{FILE}.{i}"))
}

/// Every record in the log, oldest first (rotated files included), and
/// how many lines were not records. `Ok(None)` when there is no log.
pub fn read_all(state_dir: &Path) -> io::Result<Option<(Vec<Record>, usize)>> {
    let mut files: Vec<PathBuf> = (1..=KEEP).rev().map(|i| rotated(state_dir, i)).collect();
    files.push(state_dir.join(FILE));
    let mut records = Vec::new();
    let mut bad = 0;
    let mut any = false;
    for p in files {
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        };
        any = true;
        for line in io::BufReader::new(f).split(b'\n') {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Record>(&line) {
                Ok(r) => records.push(r),
                Err(_) => bad += 1,
            }
        }
    }
    Ok(any.then_some((records, bad)))
}

/// Seconds of `d`, rounded to milliseconds.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str, result: Outcome) -> Record {
        Record {
            time: timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_936_000)),
            duration_s: 1.5,
            user: Some(user.into()),
            uid: Some(1001),
            via: "daemon".into(),
            drv: "/nix/store/rb9irggdbdc3n1k6d0y3rg9z6j8j3fji-hello-1.0.drv".into(),
            feature: "escape-sign".into(),
            executor: "signer".into(),
            kind: "host".into(),
            args: vec!["/nix/store/x-payload".into()],
            args_total: None,
            result,
            exit_status: Some(0),
            reason: None,
            outputs: vec![OutputRecord {
                path: "/nix/store/0a7bxkf6f0gzjpdk6vnh9xdsg0gkbq84-hello-1.0".into(),
                nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
                size: 120,
            }],
            proxy: None,
            waited_s: None,
            peak_memory_bytes: None,
            cpu_s: None,
            wall_s: None,
        }
    }

    #[test]
    fn records_are_one_json_line_each_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &record("alice", Outcome::Built)).unwrap();
        append(dir.path(), &record("bob", Outcome::Refused)).unwrap();
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["time"], "2025-12-05T12:00:00Z");
        assert_eq!(first["result"], "built");
        assert_eq!(first["outputs"][0]["size"], 120);
        assert!(first.get("proxy").is_none());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, format!("{text}not json\n{{\"time\": 1}}\n")).unwrap();
        let (records, bad) = read_all(dir.path()).unwrap().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(bad, 2);
        assert_eq!(records[1].user.as_deref(), Some("bob"));
        assert_eq!(records[0].drv_name(), "hello-1.0");
        assert!(read_all(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn arguments_are_bounded() {
        let mut r = record("alice", Outcome::Failed);
        let long = "x".repeat(5000);
        let args: Vec<&[u8]> = (0..40).map(|_| long.as_bytes()).collect();
        r.set_args(args.into_iter());
        // The total budget holds: 2048 characters, 8 of 256 (+ the marks).
        assert_eq!(r.args.len(), MAX_ARGS_TOTAL / MAX_ARG_BYTES);
        assert_eq!(r.args_total, Some(40));
        assert!(r.args[0].chars().count() <= MAX_ARG_BYTES + 1);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.len() < 4 * 1024, "{} bytes", json.len());
        r.set_reason(&"z".repeat(5000));
        assert_eq!(r.reason.as_ref().unwrap().chars().count(), MAX_REASON + 1);
        r.set_args([b"a".as_slice(), b"\xffb"].into_iter());
        assert_eq!(r.args, vec!["a".to_owned(), "\u{fffd}b".to_owned()]);
        assert_eq!(r.args_total, None);
    }

    /// Many writers at once: every line is a whole record.
    #[test]
    fn concurrent_appends_never_interleave() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record("alice", Outcome::Built);
        r.reason = Some("y".repeat(3000));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        append(dir.path(), &r).unwrap();
                    }
                });
            }
        });
        let (records, bad) = read_all(dir.path()).unwrap().unwrap();
        assert_eq!((records.len(), bad), (800, 0));
    }

    #[test]
    fn the_log_rotates_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        for i in 0..(KEEP + 2) {
            // A full log, marked by its first record's user.
            let mut f = File::create(&path).unwrap();
            let line = serde_json::to_string(&record(&format!("u{i}"), Outcome::Built)).unwrap();
            writeln!(f, "{line}").unwrap();
            f.set_len(MAX_BYTES).unwrap();
            drop(f);
            append(dir.path(), &record("last", Outcome::Built)).unwrap();
        }
        for i in 1..=KEEP {
            assert!(rotated(dir.path(), i).exists(), "{i}");
        }
        assert!(!rotated(dir.path(), KEEP + 1).exists());
        let now = std::fs::read_to_string(&path).unwrap();
        assert_eq!(now.lines().count(), 1);
    }
}
