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
    let mut line = String::from("@nix ");
    line.push_str(&json!({"action": "msg", "level": level as u8, "msg": msg}).to_string());
    line.push('\n');
    line
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
