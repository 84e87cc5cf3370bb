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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The audit file's name under `state-dir`.
pub const AUDIT_FILE: &str = "proxy-audit.jsonl";

/// Longest path shown in a log line (the audit file has it whole).
const MAX_SHOWN_PATH: usize = 200;

pub struct Events {
    log: Option<File>,
    audit: Option<File>,
    audit_path: PathBuf,
    drv: String,
    executor: String,
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
}

#[derive(Serialize)]
struct Record<'a> {
    time: f64,
    drv: &'a str,
    executor: &'a str,
    #[serde(flatten)]
    d: &'a Decision<'a>,
}

impl Events {
    /// `log`: the write end of the pipe to the build log (made
    /// non-blocking here). `state_dir`: where the audit file goes.
    pub fn new(
        log: Option<File>,
        state_dir: &Path,
        drv: &str,
        executor: &str,
    ) -> Result<Events, String> {
        if let Some(f) = &log {
            let flags = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| format!("proxy log pipe: {e}"))?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFL(flags))
                .map_err(|e| format!("proxy log pipe: {e}"))?;
        }
        let audit_path = state_dir.join(AUDIT_FILE);
        let audit = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&audit_path)
            .map_err(|e| format!("opening the audit file {}: {e}", audit_path.display()))?;
        Ok(Events {
            log,
            audit: Some(audit),
            audit_path,
            drv: drv.to_owned(),
            executor: executor.to_owned(),
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
        }
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    /// A build-log line (`nix-hatch proxy: ` is prefixed).
    pub fn line(&self, msg: &str) {
        if let Some(mut f) = self.log.as_ref() {
            let mut s = String::with_capacity(msg.len() + 20);
            s.push_str("nix-hatch proxy: ");
            for c in msg.chars() {
                // One line, whatever the build put in a request.
                s.push(if c.is_control() { '?' } else { c });
            }
            s.push('\n');
            // One write: a line of less than PIPE_BUF bytes arrives whole.
            let _ = f.write(s.as_bytes());
        }
    }

    /// A decision: the log line `msg` and the audit record `d`.
    pub fn decision(&self, msg: &str, d: &Decision<'_>) {
        self.line(msg);
        if let Some(mut f) = self.audit.as_ref() {
            let rec = Record {
                time: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|t| t.as_secs_f64())
                    .unwrap_or(0.0),
                drv: &self.drv,
                executor: &self.executor,
                d,
            };
            if let Ok(mut json) = serde_json::to_vec(&rec) {
                json.push(b'\n');
                let _ = f.write_all(&json);
            }
        }
    }
}

/// `host[:port]` + path as a log line shows it: the port only when it is
/// not the scheme's default, the path cut to a sane length.
pub fn shown(host: &str, port: u16, default_port: u16, path: &str) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut s = if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    };
    if path.len() > MAX_SHOWN_PATH {
        let mut end = MAX_SHOWN_PATH;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        s.push_str(&path[..end]);
        s.push('…');
    } else {
        s.push_str(path);
    }
    s
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
            },
        );
        ev.line("bad\nline");
        drop(ev);
        let mut s = String::new();
        File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(
            s,
            "nix-hatch proxy: allow GET example.org/a\nnix-hatch proxy: bad?line\n"
        );
        let audit = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(audit.trim()).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["drv"], "/nix/store/x.drv");
        assert_eq!(v["credentials"][0], "authorization");
        assert_eq!(v["rule"], 1);
    }

    #[test]
    fn shown_hosts() {
        assert_eq!(shown("example.org", 80, 80, "/pub/a"), "example.org/pub/a");
        assert_eq!(shown("localhost", 8080, 80, "/"), "localhost:8080/");
        assert_eq!(shown("::1", 443, 443, "/"), "[::1]/");
    }
}
