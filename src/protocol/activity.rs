//! Nix activities the hook reports (`@nix {"action":"start"…}`, `result`,
//! `stop` on stderr), so that a long stage — waiting for a slot, an ssh
//! transfer, reading a large output into the store — shows in `nix
//! build`'s progress bar as build-remote's copies do, instead of a silent
//! pause. Nix parses these lines from a hook before and after `# accept`
//! (`handleJSONLogMessage`, trusted), on 2.8 as on current versions.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

/// Nix's activity types used here (`ActivityType` in Nix's logging.hh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `actCopyPath`: one path copied between stores.
    CopyPath = 100,
    /// `actBuildWaiting`: a build waiting for a free slot.
    BuildWaiting = 111,
}

/// Nix's result type for progress (`resProgress`: done, expected,
/// running, failed).
const RES_PROGRESS: u64 = 105;
/// Nix's level for activities shown in the progress bar (`lvlInfo`).
const LEVEL: u64 = 3;

/// A running activity; stopped when dropped.
#[derive(Debug)]
pub struct Activity {
    id: u64,
    /// The last `done` reported, to send only real progress.
    last: u64,
}

impl Activity {
    /// Starts an activity of `kind` with the text Nix shows and its
    /// `fields` (for [`Kind::CopyPath`]: path, from, to).
    pub fn start(kind: Kind, text: &str, fields: &[&str]) -> Activity {
        let id = next_id();
        emit(&json!({
            "action": "start",
            "id": id,
            "level": LEVEL,
            "type": kind as u64,
            "text": text,
            "parent": 0,
            "fields": fields,
        }));
        Activity { id, last: 0 }
    }

    /// Reports `done` of `expected` units (bytes for copies).
    pub fn progress(&mut self, done: u64, expected: u64) {
        if done == self.last && done != 0 {
            return;
        }
        self.last = done;
        emit(&json!({
            "action": "result",
            "id": self.id,
            "type": RES_PROGRESS,
            "fields": [done, expected, 0, 0],
        }));
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        emit(&json!({"action": "stop", "id": self.id}));
    }
}

/// Ids unique within this process and unlike another hook's (Nix keeps
/// one map of a hook's activities, keyed by these ids).
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The line, as one write on stderr (Nix reads the hook's stderr by lines).
fn emit(v: &serde_json::Value) {
    let line = format!("@nix {v}\n");
    let _ = line_sink(|out| out.write_all(line.as_bytes()));
}

#[cfg(not(test))]
fn line_sink(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    f(&mut std::io::stderr().lock())
}

#[cfg(test)]
thread_local! {
    static LINES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
fn line_sink(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    LINES.with(|l| f(&mut *l.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<serde_json::Value> {
        LINES.with(|l| {
            String::from_utf8(std::mem::take(&mut *l.borrow_mut()))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l.strip_prefix("@nix ").unwrap()).unwrap())
                .collect()
        })
    }

    #[test]
    fn start_progress_stop_are_well_formed_nix_lines() {
        {
            let mut a = Activity::start(
                Kind::CopyPath,
                "copying outputs of x from 'gpu'",
                &["/nix/store/x", "ssh://gpu", "local"],
            );
            a.progress(10, 100);
            a.progress(10, 100);
            a.progress(100, 100);
        }
        let l = lines();
        assert_eq!(l.len(), 4, "{l:?}");
        assert_eq!(l[0]["action"], "start");
        assert_eq!(l[0]["type"], 100);
        assert_eq!(l[0]["fields"][1], "ssh://gpu");
        let id = l[0]["id"].as_u64().unwrap();
        assert_eq!(id >> 32, u64::from(std::process::id()));
        assert_eq!(l[1]["action"], "result");
        assert_eq!(l[1]["type"], 105);
        assert_eq!(l[1]["fields"], json!([10, 100, 0, 0]));
        assert_eq!(l[2]["fields"][0], 100);
        assert_eq!(l[3], json!({"action": "stop", "id": id}));
    }
}
