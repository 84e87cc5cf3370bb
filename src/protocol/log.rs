//! `@nix {json}` lines: after `# accept`, Nix only understands structured log
//! messages on the hook's stderr (anything else is dropped).

use serde_json::json;

/// Nix's verbosity levels (`lvlError` … `lvlVomit`).
#[derive(Debug, Clone, Copy)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
}

/// A `msg` action line, newline included.
pub fn msg_line(level: Level, msg: &str) -> String {
    msg_line_at(level as u8, msg)
}

/// A `msg` action line at Nix level `level` (0 error … 7 vomit).
pub fn msg_line_at(level: u8, msg: &str) -> String {
    let mut line = String::from("@nix ");
    line.push_str(&json!({"action": "msg", "level": level, "msg": msg}).to_string());
    line.push('\n');
    line
}

/// Nix's level for a `tracing` level: error, warn and info as in Nix,
/// debug as talkative (`-v`), trace as debug (`-vvv`).
pub fn nix_level(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 0,
        tracing::Level::WARN => 1,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_is_one_json_line() {
        let line = msg_line(Level::Error, "a \"quoted\"\nmessage");
        assert!(line.starts_with("@nix {"));
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line[5..]).unwrap();
        assert_eq!(v["action"], "msg");
        assert_eq!(v["level"], 0);
        assert_eq!(v["msg"], "a \"quoted\"\nmessage");
    }
}
