//! Where the proxy's decisions go: one line each in the build log
//! (`nix-hatch proxy: allow GET example.org/pub/a`) and one JSON object per
//! line in the audit file under `state-dir` (`proxy-audit.jsonl`, shared by
//! all builds, appended with single writes so concurrent builds don't
//! interleave).
//!
//! Build-log lines go through a non-blocking pipe that the supervisor copies
//! into the log next to the builder's output; if the pipe is full a line is
//! dropped rather than stalling the proxy (the audit file still has it).
//! Neither ever holds a credential value: they name the header only.
//!
//! What the build sends is bounded and defused in both. A log line shows
//! at most [`MAX_SHOWN`] bytes of a host, path, URI or method (cut with
//! `...(N bytes)`, N the original length), and every character outside
//! printable ASCII is escaped (`\u{2028}`), so a request can neither forge
//! nor visually reorder lines. An audit record keeps at most
//! [`MAX_AUDIT_FIELD`] bytes of each string (its `clipped` object names
//! the fields cut, with their lengths) and is ASCII-only JSON. One build
//! writes at most [`MAX_AUDIT_RECORDS`] records and [`MAX_AUDIT_BYTES`]
//! bytes: then one `audit-limit` record says so, the rest is only counted,
//! and a last `audit-limit` record, when the proxy stops, gives the count.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use serde::Serialize;

/// The audit file's name under `state-dir`.
pub const AUDIT_FILE: &str = "proxy-audit.jsonl";
/// Size past which the proxy's audit file is rotated (5 kept, as
/// `audit.jsonl`).
pub const MAX_AUDIT_FILE: u64 = 64 << 20;

/// Longest host, path, URI or method shown in a log line, in bytes.
pub const MAX_SHOWN: usize = 200;
/// Longest build-log message, in bytes: the line stays below PIPE_BUF
/// (4096), so it is written whole or not at all.
const MAX_LINE: usize = 2048;
/// Longest string field of an audit record, in bytes.
pub const MAX_AUDIT_FIELD: usize = 2048;
/// Audit records one build writes at most ...
pub const MAX_AUDIT_RECORDS: u64 = 100_000;
/// ... and bytes.
pub const MAX_AUDIT_BYTES: u64 = 64 << 20;

pub struct Events {
    log: Option<File>,
    audit: Option<File>,
    audit_path: PathBuf,
    drv: String,
    executor: String,
    budget: Mutex<Budget>,
    counts: std::sync::Arc<Counts>,
}

/// How many requests the proxy allowed and denied during the build (for
/// the build's own audit record).
#[derive(Debug, Default)]
pub struct Counts {
    pub allowed: std::sync::atomic::AtomicU64,
    pub denied: std::sync::atomic::AtomicU64,
}

/// What this build has written to the audit file, and what not.
struct Budget {
    max_records: u64,
    max_bytes: u64,
    records: u64,
    bytes: u64,
    /// Records not written since the limit was reached.
    suppressed: u64,
}

impl Default for Budget {
    /// The limits of a build's audit records.
    fn default() -> Budget {
        Budget::new(MAX_AUDIT_RECORDS, MAX_AUDIT_BYTES)
    }
}

impl Budget {
    fn new(max_records: u64, max_bytes: u64) -> Budget {
        Budget {
            max_records,
            max_bytes,
            records: 0,
            bytes: 0,
            suppressed: 0,
        }
    }
}

/// One decision.
#[derive(Debug, Serialize)]
pub struct Decision<'a> {
    /// "allow", "deny" or "error".
    pub decision: &'a str,
    pub method: &'a str,
    /// "http", "https" (intercepted) or "connect".
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<&'a str>,
    /// 1-based index of the allow rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// "forward", "tunnel" or "intercept".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'a str>,
    /// Names of headers a credential was injected into (never values).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub credentials: &'a [String],
    /// Names of headers whose credential matched but was not injected:
    /// the request went upstream without TLS (see `credentials`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub credentials_withheld: &'a [String],
    /// Names of headers the proxy removed from the request before
    /// forwarding it (method overrides under a rule with `methods`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub removed_headers: &'a [String],
}

#[derive(Serialize)]
struct Record<'a> {
    time: f64,
    drv: &'a str,
    executor: &'a str,
    #[serde(flatten)]
    d: &'a Decision<'a>,
    /// Field name → its length in bytes, for each field cut to
    /// [`MAX_AUDIT_FIELD`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    clipped: BTreeMap<&'static str, usize>,
}

/// A record about the audit file itself (`decision` is "audit-limit").
#[derive(Serialize)]
struct Note<'a> {
    time: f64,
    drv: &'a str,
    executor: &'a str,
    decision: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    suppressed: Option<u64>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.as_secs_f64())
        .unwrap_or(0.0)
}

impl Events {
    /// `log`: the write end of the pipe to the build log (made
    /// non-blocking here). `state_dir`: where the audit file goes.
    pub fn new(
        log: Option<File>,
        state_dir: &Path,
        drv: &str,
        executor: &str,
    ) -> anyhow::Result<Events> {
        if let Some(f) = &log {
            let flags = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| anyhow!("proxy log pipe: {e}"))?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFL(flags))
                .map_err(|e| anyhow!("proxy log pipe: {e}"))?;
        }
        // Bounded across builds like the escape audit log (one build's
        // share is bounded by its budget).
        crate::audit::rotate_if_larger(state_dir, AUDIT_FILE, MAX_AUDIT_FILE)
            .map_err(|e| anyhow!("rotating the audit file: {e}"))?;
        let audit_path = state_dir.join(AUDIT_FILE);
        let audit = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&audit_path)
            .map_err(|e| anyhow!("opening the audit file {}: {e}", audit_path.display()))?;
        Ok(Events {
            log,
            audit: Some(audit),
            audit_path,
            drv: drv.to_owned(),
            executor: executor.to_owned(),
            budget: Mutex::default(),
            counts: Default::default(),
        })
    }

    /// Events that go nowhere but `log` (benchmarks, tests).
    pub fn log_only(log: Option<File>) -> Events {
        Events {
            log,
            audit: None,
            audit_path: PathBuf::new(),
            drv: String::new(),
            executor: String::new(),
            budget: Mutex::default(),
            counts: Default::default(),
        }
    }

    /// The running counts of allowed and denied requests.
    pub fn counts(&self) -> std::sync::Arc<Counts> {
        std::sync::Arc::clone(&self.counts)
    }

    /// The same events with other audit limits (tests).
    #[cfg(test)]
    fn with_audit_limits(self, records: u64, bytes: u64) -> Events {
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = Budget::new(records, bytes);
        self
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    /// A build-log line (`nix-hatch proxy: ` is prefixed), escaped (see
    /// [`escape`]) and cut to [`MAX_LINE`]. Callers clip what the build
    /// chose with [`clip_shown`] first, so the rest of the line stays.
    pub fn line(&self, msg: &str) {
        if let Some(mut f) = self.log.as_ref() {
            let msg = clip_escaped(msg, MAX_LINE);
            let mut s = String::with_capacity(msg.len() + 20);
            s.push_str("nix-hatch proxy: ");
            s.push_str(&msg);
            s.push('\n');
            // One write: a line of less than PIPE_BUF bytes arrives whole.
            let _ = f.write(s.as_bytes());
        }
    }

    /// A decision: the log line `msg` and the audit record `d`, its
    /// strings cut to [`MAX_AUDIT_FIELD`].
    pub fn decision(&self, msg: &str, d: &Decision<'_>) {
        let counter = match d.decision {
            "allow" => Some(&self.counts.allowed),
            "deny" => Some(&self.counts.denied),
            _ => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.line(msg);
        if self.audit.is_none() {
            return;
        }
        let mut clipped = BTreeMap::new();
        let method = clip_field("method", d.method, &mut clipped);
        let host = clip_field("host", d.host, &mut clipped);
        let path = d.path.map(|p| clip_field("path", p, &mut clipped));
        let query = d.query.map(|q| clip_field("query", q, &mut clipped));
        let reason = d.reason.map(|r| clip_field("reason", r, &mut clipped));
        let d = Decision {
            method: &method,
            host: &host,
            path: path.as_deref(),
            query: query.as_deref(),
            reason: reason.as_deref(),
            ..*d
        };
        let rec = Record {
            time: now(),
            drv: &self.drv,
            executor: &self.executor,
            d: &d,
            clipped,
        };
        if let Some(line) = json_line(&rec) {
            self.record(&line);
        }
    }

    /// Appends a record (`line`, see [`json_line`]) if the build's budget
    /// allows; the first one refused writes the `audit-limit` record and
    /// log line.
    fn record(&self, line: &[u8]) {
        let Some(mut f) = self.audit.as_ref() else {
            return;
        };
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let len = line.len() as u64;
        if b.suppressed == 0 && b.records < b.max_records && b.bytes + len <= b.max_bytes {
            b.records += 1;
            b.bytes += len;
            let _ = f.write_all(line);
            return;
        }
        if b.suppressed == 0 {
            let reason = format!(
                "audit limit reached ({} records or {} bytes per build): further records of this build are suppressed",
                b.max_records, b.max_bytes
            );
            self.note(&reason, None);
            self.line(&format!(
                "{reason} from {} (decisions still appear here)",
                self.audit_path.display()
            ));
        }
        b.suppressed += 1;
    }

    /// Writes an `audit-limit` record (outside the budget: at most two per
    /// build).
    fn note(&self, reason: &str, suppressed: Option<u64>) {
        let Some(mut f) = self.audit.as_ref() else {
            return;
        };
        let n = Note {
            time: now(),
            drv: &self.drv,
            executor: &self.executor,
            decision: "audit-limit",
            reason,
            suppressed,
        };
        if let Some(line) = json_line(&n) {
            let _ = f.write_all(&line);
        }
    }
}

/// A record as one line of the audit file: ASCII-only JSON (see
/// [`ascii_json`]) and its newline.
fn json_line(v: &impl Serialize) -> Option<Vec<u8>> {
    let mut line = ascii_json(serde_json::to_string(v).ok()?).into_bytes();
    line.push(b'\n');
    Some(line)
}

impl Drop for Events {
    /// When the proxy stops: if records were suppressed, a last record and
    /// log line give their number.
    fn drop(&mut self) {
        let n = self
            .budget
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .suppressed;
        if n > 0 {
            let reason = format!("{n} further records suppressed");
            self.note(&reason, Some(n));
            self.line(&format!("audit limit: {reason}"));
        }
    }
}

/// `s` as a log line may show it: every character outside printable
/// ASCII (controls, U+2028, bidi overrides, any other non-ASCII) written
/// `\u{…}`, so the line stays one line and reads as it is stored.
/// Idempotent: the result is printable ASCII.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// The longest prefix of `s` with at most `max` bytes that ends on a
/// character boundary.
fn prefix(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` escaped and, if that is longer than `max` bytes, cut and marked
/// with the original length: `/pub/aaaa...(65536 bytes)`.
fn clip_escaped(s: &str, max: usize) -> Cow<'_, str> {
    let e = escape(s);
    if e.len() <= max {
        return e;
    }
    Cow::Owned(format!("{}...({} bytes)", prefix(&e, max), s.len()))
}

/// What the build chose (a host, path, URI or method) as a log line shows
/// it: escaped and cut to [`MAX_SHOWN`] bytes plus the clip mark.
pub fn clip_shown(s: &str) -> Cow<'_, str> {
    clip_escaped(s, MAX_SHOWN)
}

/// An audit record's string: cut to [`MAX_AUDIT_FIELD`] bytes and marked
/// with `…`, its length noted in `clipped` under `name`.
fn clip_field<'s>(
    name: &'static str,
    s: &'s str,
    clipped: &mut BTreeMap<&'static str, usize>,
) -> Cow<'s, str> {
    if s.len() <= MAX_AUDIT_FIELD {
        return Cow::Borrowed(s);
    }
    clipped.insert(name, s.len());
    Cow::Owned(format!("{}…", prefix(s, MAX_AUDIT_FIELD)))
}

/// JSON text with each non-ASCII character as a `\uXXXX` escape (JSON has
/// them only inside strings, where the escape means the same): a record
/// stays one line also for readers that break lines at U+2028 or U+0085.
fn ascii_json(json: String) -> String {
    if json.is_ascii() {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        }
    }
    out
}

/// A CONNECT's `host:port` as a log line shows it (an IPv6 address in
/// brackets, the host clipped and escaped).
pub fn authority(host: &str, port: u16) -> String {
    format!("{}:{port}", bracketed(host))
}

/// `host[:port]` + path as a log line shows it: the port only when it is
/// not the scheme's default, host and path clipped and escaped.
pub fn shown(host: &str, port: u16, default_port: u16, path: &str) -> String {
    let mut s = if port == default_port {
        bracketed(host)
    } else {
        authority(host, port)
    };
    s.push_str(&clip_shown(path));
    s
}

/// `host` clipped and escaped, an IPv6 address in brackets.
fn bracketed(host: &str) -> String {
    let host = clip_shown(host);
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn lines_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let ev = Events::new(Some(File::from(w)), dir.path(), "/nix/store/x.drv", "fetch").unwrap();
        let creds = vec!["authorization".to_owned()];
        ev.decision(
            "allow GET example.org/a",
            &Decision {
                decision: "allow",
                method: "GET",
                scheme: "http",
                host: "example.org",
                port: 80,
                path: Some("/a"),
                query: None,
                rule: Some(1),
                reason: None,
                mode: Some("forward"),
                credentials: &creds,
                credentials_withheld: &[],
                removed_headers: &[],
            },
        );
        ev.line("bad\nline");
        drop(ev);
        let mut s = String::new();
        File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(
            s,
            "nix-hatch proxy: allow GET example.org/a\nnix-hatch proxy: bad\\u{a}line\n"
        );
        let audit = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(audit.trim()).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["drv"], "/nix/store/x.drv");
        assert_eq!(v["credentials"][0], "authorization");
        assert_eq!(v["rule"], 1);
    }

    fn decision<'a>(path: &'a str, query: Option<&'a str>) -> Decision<'a> {
        Decision {
            decision: "deny",
            method: "GET",
            scheme: "http",
            host: "example.org",
            port: 80,
            path: Some(path),
            query,
            rule: None,
            reason: Some("no rule"),
            mode: Some("forward"),
            credentials: &[],
            credentials_withheld: &[],
            removed_headers: &[],
        }
    }

    fn records(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(AUDIT_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A 64 KiB path and query: the record keeps 2 KiB of each and says
    /// so, the log line 200 bytes with the original length.
    #[test]
    fn long_fields_are_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let ev = Events::new(Some(File::from(w)), dir.path(), "/nix/store/x.drv", "fetch").unwrap();
        let path = format!("/{}", "a".repeat(65535));
        let query = "q".repeat(70000);
        let msg = format!("deny GET {} (no rule)", shown("example.org", 80, 80, &path));
        ev.decision(&msg, &decision(&path, Some(&query)));
        ev.decision("short", &decision("/b", None));
        drop(ev);
        let mut log = String::new();
        File::from(r).read_to_string(&mut log).unwrap();
        let first = log.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "nix-hatch proxy: deny GET example.org/{}...(65536 bytes) (no rule)",
                "a".repeat(MAX_SHOWN - 1)
            )
        );
        let recs = records(dir.path());
        assert_eq!(recs.len(), 2);
        let p = recs[0]["path"].as_str().unwrap();
        assert_eq!(p, format!("{}…", &path[..MAX_AUDIT_FIELD]));
        assert_eq!(
            recs[0]["query"].as_str().unwrap().len(),
            MAX_AUDIT_FIELD + 3
        );
        assert_eq!(recs[0]["clipped"]["path"], 65536);
        assert_eq!(recs[0]["clipped"]["query"], 70000);
        assert!(recs[0]["clipped"].get("host").is_none());
        assert_eq!(recs[1]["path"], "/b");
        assert!(recs[1].get("clipped").is_none());
    }

    /// Whatever a line is given, it is one line of printable ASCII and
    /// less than PIPE_BUF bytes; the audit file is ASCII and decodes to
    /// the original.
    #[test]
    fn lines_are_escaped_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let ev = Events::new(Some(File::from(w)), dir.path(), "/nix/store/x.drv", "fetch").unwrap();
        let path = "/pub/a\u{2028}nix-hatch proxy: allow GET x/\u{202e}gpj.exe\r\u{85}\u{1f600}";
        ev.decision(
            &format!("deny GET {}", shown("example.org", 80, 80, path)),
            &decision(path, None),
        );
        ev.line(&"\u{202e}".repeat(10000));
        drop(ev);
        let mut log = String::new();
        File::from(r).read_to_string(&mut log).unwrap();
        let lines: Vec<&str> = log.split('\n').collect();
        assert_eq!(lines.len(), 3, "{log:?}");
        assert_eq!(
            lines[0],
            r"nix-hatch proxy: deny GET example.org/pub/a\u{2028}nix-hatch proxy: allow GET x/\u{202e}gpj.exe\u{d}\u{85}\u{1f600}"
        );
        assert!(lines[1].len() < 4096 && lines[1].ends_with("...(30000 bytes)"));
        assert!(log
            .bytes()
            .all(|b| b == b'\n' || (b' '..=b'~').contains(&b)));
        let audit = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        assert!(audit.is_ascii(), "{audit}");
        assert_eq!(records(dir.path())[0]["path"], path);
    }

    /// Past the record limit one `audit-limit` record says so; when the
    /// events go, a last one counts what was suppressed. The byte limit
    /// works the same way.
    #[test]
    fn audit_records_are_capped_per_build() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let ev = Events::new(Some(File::from(w)), dir.path(), "/nix/store/x.drv", "fetch")
            .unwrap()
            .with_audit_limits(3, 1 << 20);
        for i in 0..10 {
            ev.decision("d", &decision(&format!("/{i}"), None));
        }
        drop(ev);
        let recs = records(dir.path());
        assert_eq!(recs.len(), 5, "{recs:#?}");
        for (i, r) in recs[..3].iter().enumerate() {
            assert_eq!(r["path"], format!("/{i}"));
        }
        assert_eq!(recs[3]["decision"], "audit-limit");
        assert!(recs[3].get("suppressed").is_none());
        assert_eq!(recs[4]["decision"], "audit-limit");
        assert_eq!(recs[4]["suppressed"], 7);
        assert_eq!(recs[4]["reason"], "7 further records suppressed");
        assert!(recs.iter().all(|r| r["drv"] == "/nix/store/x.drv"));
        let mut log = String::new();
        File::from(r).read_to_string(&mut log).unwrap();
        assert_eq!(log.matches("nix-hatch proxy: d\n").count(), 10);
        assert_eq!(log.matches("audit limit reached").count(), 1, "{log}");
        assert!(log.ends_with("nix-hatch proxy: audit limit: 7 further records suppressed\n"));

        let dir = tempfile::tempdir().unwrap();
        let ev = Events::new(None, dir.path(), "/nix/store/x.drv", "fetch")
            .unwrap()
            .with_audit_limits(1000, 4000);
        let long = format!("/{}", "a".repeat(1500));
        for _ in 0..5 {
            ev.decision("d", &decision(&long, None));
        }
        drop(ev);
        let recs = records(dir.path());
        assert_eq!(recs.len(), 4, "{recs:#?}");
        assert_eq!(recs[3]["suppressed"], 3);
        let size = std::fs::metadata(dir.path().join(AUDIT_FILE))
            .unwrap()
            .len();
        assert!(size < 4000 + 1000, "{size}");
    }

    /// Without a `suppressed` count nothing is added at the end.
    #[test]
    fn no_limit_record_under_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ev = Events::new(None, dir.path(), "/nix/store/x.drv", "fetch").unwrap();
        ev.decision("d", &decision("/a", None));
        drop(ev);
        assert_eq!(records(dir.path()).len(), 1);
    }

    #[test]
    fn shown_hosts() {
        assert_eq!(shown("example.org", 80, 80, "/pub/a"), "example.org/pub/a");
        assert_eq!(shown("localhost", 8080, 80, "/"), "localhost:8080/");
        assert_eq!(shown("::1", 443, 443, "/"), "[::1]/");
        assert_eq!(authority("::1", 8443), "[::1]:8443");
        assert_eq!(authority("a\u{2028}b", 443), "a\\u{2028}b:443");
        let long = "h".repeat(300);
        assert_eq!(
            authority(&long, 443),
            format!("{}...(300 bytes):443", &long[..MAX_SHOWN])
        );
    }
}
