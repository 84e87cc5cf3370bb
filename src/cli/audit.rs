//! `nix-hatch audit`: who escaped, with what, and how it ended — read from
//! `state-dir/audit.jsonl` (see [`crate::audit`]). A table by default,
//! `--json` for one JSON object per line; filters combine.

use std::path::Path;
use std::time::SystemTime;

use crate::audit::{self, Outcome, Record};
use crate::config::Config;

/// What to show.
#[derive(Debug, Default)]
pub struct Filter {
    pub user: Option<String>,
    pub executor: Option<String>,
    /// Records that started at or after this.
    pub since: Option<SystemTime>,
    pub result: Option<Outcome>,
}

impl Filter {
    fn keeps(&self, r: &Record) -> bool {
        self.user
            .as_ref()
            .is_none_or(|u| r.user.as_ref() == Some(u))
            && self.executor.as_ref().is_none_or(|e| &r.executor == e)
            && self.result.is_none_or(|o| r.result == o)
            && self
                .since
                .is_none_or(|t| r.started().is_some_and(|s| s >= t))
    }
}

/// `--since`: an RFC 3339 time (`2026-12-01T09:00:00Z`), a date
/// (`2026-12-01`, midnight UTC), or an age (`90m`, `12h`, `7d`).
pub fn parse_since(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s}T00:00:00")) {
        return Ok(t);
    }
    if let Ok(age) = humantime::parse_duration(s) {
        return now
            .checked_sub(age)
            .ok_or_else(|| format!("--since {s}: that is before the epoch"));
    }
    Err(format!(
        "--since {s:?}: expected a time (2026-12-01T09:00:00Z), a date (2026-12-01) or an age (90m, 12h, 7d)"
    ))
}

pub fn parse_result(s: &str) -> Result<Outcome, String> {
    Outcome::parse(s).ok_or_else(|| {
        format!("--result {s:?}: expected built, failed, timed-out, refused or error")
    })
}

pub fn run(config_path: &Path, json: bool, filter: &Filter) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!(
                "error: config {}: {}",
                config_path.display(),
                problems.first().map(String::as_str).unwrap_or("invalid")
            );
            return 1;
        }
    };
    let (records, bad) = match audit::read_all(&config.state_dir) {
        Ok(Some(r)) => r,
        Ok(None) => {
            println!(
                "no audit log yet: {} does not exist (no escape build has run)",
                config.state_dir.join(audit::FILE).display()
            );
            return 0;
        }
        Err(e) => {
            eprintln!("error: reading the audit log: {e}");
            return 1;
        }
    };
    let shown: Vec<&Record> = records.iter().filter(|r| filter.keeps(r)).collect();
    if json {
        for r in &shown {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("error: {e}"),
            }
        }
    } else {
        print!("{}", table(&shown));
    }
    if bad > 0 {
        eprintln!("warning: skipped {bad} line(s) of the audit log that are not records");
    }
    0
}

/// The default view: time, user, executor, derivation, result, duration.
fn table(records: &[&Record]) -> String {
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            [
                r.time.clone(),
                match (&r.user, r.uid) {
                    (Some(u), _) => u.clone(),
                    (None, Some(uid)) => format!("uid {uid}"),
                    (None, None) => "(unknown)".to_owned(),
                },
                r.executor.clone(),
                r.drv_name().to_owned(),
                r.result.as_str().to_owned(),
                format!("{:.1}s", r.duration_s),
            ]
        })
        .collect();
    let head = [
        "TIME",
        "USER",
        "EXECUTOR",
        "DERIVATION",
        "RESULT",
        "DURATION",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&head);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_takes_times_dates_and_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_936_000);
        assert_eq!(parse_since("2025-12-05T12:00:00Z", now).unwrap(), now);
        assert_eq!(
            parse_since("2025-12-05", now).unwrap(),
            now - Duration::from_secs(12 * 3600)
        );
        assert_eq!(
            parse_since("2h", now).unwrap(),
            now - Duration::from_secs(7200)
        );
        assert_eq!(
            parse_since("7d", now).unwrap(),
            now - Duration::from_secs(7 * 86400)
        );
        assert!(parse_since("last tuesday", now)
            .unwrap_err()
            .contains("expected a time"));
        assert_eq!(parse_result("timed-out").unwrap(), Outcome::TimedOut);
        assert!(parse_result("ok").is_err());
    }
}
