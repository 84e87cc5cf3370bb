//! The Nix version `nix-hatch check` reports: `nix-store --version` from
//! `PATH`, compared with the versions the end-to-end suite runs against
//! (`scripts/test`: Debian 12's 2.8 and Debian 13's 2.26).

use std::process::{Command, Stdio};

/// Oldest and newest (major, minor) the end-to-end suite runs on.
pub const TESTED: [(u32, u32); 2] = [(2, 8), (2, 26)];

/// `(major, minor, patch)` from `nix-store --version` output such as
/// `nix-store (Nix) 2.26.3` or `nix-store (Nix) 2.18.1pre20231201_dirty`.
pub fn parse(output: &str) -> Option<(u32, u32, u32)> {
    let word = output.split_whitespace().last()?;
    let mut parts = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// What `check` prints about `version` (the `nix-store --version` line):
/// one `nix:` line, then warnings.
pub fn report_lines(version: &str) -> Vec<String> {
    let version = version.trim();
    let [(lo_major, lo_minor), (hi_major, hi_minor)] = TESTED;
    let tested = format!("{lo_major}.{lo_minor} … {hi_major}.{hi_minor}");
    let Some((major, minor, patch)) = parse(version) else {
        return vec![format!(
            "warning: cannot tell the Nix version from {version:?} (nix-hatch is tested with Nix {tested})"
        )];
    };
    let mut lines = vec![format!("nix: {version} (tested: {tested})")];
    let v = (major, minor);
    if v < TESTED[0] || v > TESTED[1] {
        lines.push(format!(
            "warning: Nix {major}.{minor}.{patch} is outside the versions nix-hatch is tested with ({tested})"
        ));
    }
    if v < (2, 19) {
        lines.push(
            "note: this Nix runs `build-hook` as one path: use `build-hook = /path/to/nix-hatch-hook`"
                .to_owned(),
        );
    }
    // NixOS/nix#15083: `nix` sets build-hook's default after reading the
    // system nix.conf, overwriting it (fixed in 2.34).
    if ((2, 25)..(2, 34)).contains(&v) {
        lines.push(format!(
            "warning: Nix {major}.{minor} ignores `build-hook` in the system nix.conf (NixOS/nix#15083): set it for nix-daemon through NIX_CONFIG (see README)"
        ));
    }
    lines
}

/// Nix's `trusted-users` on this machine (whitespace-separated), as `nix
/// show-config` reports it; `None` when Nix can't be asked. The hook
/// itself gets the value in its settings.
pub fn trusted_users() -> Option<String> {
    setting("trusted-users")
}

/// A setting of Nix on this machine as `nix show-config` reports it, a
/// list joined with spaces; `None` when Nix can't be asked.
pub fn setting(name: &str) -> Option<String> {
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
            "--json",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    match &v.get(name)?["value"] {
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// `nix-store --version` of the Nix on `PATH`, or why there is none.
pub fn detect() -> Result<String, String> {
    let out = Command::new("nix-store")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nix-store: {e}"))?;
    if !out.status.success() {
        return Err(format!("nix-store --version failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The lines `nix-hatch check` prints about the Nix on `PATH`.
pub fn check_lines() -> Vec<String> {
    match detect() {
        Ok(v) => report_lines(&v),
        Err(e) => vec![format!("warning: {e}: cannot tell the Nix version")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_pre_versions() {
        assert_eq!(parse("nix-store (Nix) 2.8.0\n"), Some((2, 8, 0)));
        assert_eq!(parse("nix-store (Nix) 2.26.3"), Some((2, 26, 3)));
        assert_eq!(
            parse("nix-store (Nix) 2.18.1pre20231201_dirty"),
            Some((2, 18, 1))
        );
        assert_eq!(parse("nix-store (Lix, like Nix) 2.91"), Some((2, 91, 0)));
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn tested_versions_only_get_the_version_line_and_notes() {
        let l = report_lines("nix-store (Nix) 2.8.0");
        assert_eq!(l[0], "nix: nix-store (Nix) 2.8.0 (tested: 2.8 … 2.26)");
        assert!(!l.iter().any(|l| l.starts_with("warning:")), "{l:?}");
        assert!(l[1].contains("nix-hatch-hook"), "{l:?}");
        let l = report_lines("nix-store (Nix) 2.20.1");
        assert_eq!(l.len(), 1, "{l:?}");
    }

    #[test]
    fn outside_the_range_warns() {
        for v in ["2.3.16", "2.7.0", "2.27.0", "3.0.0"] {
            let l = report_lines(&format!("nix-store (Nix) {v}"));
            assert!(
                l.iter()
                    .any(|l| l.starts_with("warning:") && l.contains("outside")),
                "{v}: {l:?}"
            );
        }
        let l = report_lines("nix-store (Nix) 2.26.3");
        assert!(!l.iter().any(|l| l.contains("outside")), "{l:?}");
        assert!(report_lines("what")[0].starts_with("warning: cannot tell"));
    }

    #[test]
    fn versions_that_ignore_build_hook_in_nix_conf_say_so() {
        for (v, ignored) in [
            ("2.24.9", false),
            ("2.25.0", true),
            ("2.26.3", true),
            ("2.34.0", false),
        ] {
            let l = report_lines(&format!("nix-store (Nix) {v}"));
            assert_eq!(l.iter().any(|l| l.contains("15083")), ignored, "{v}: {l:?}");
        }
    }
}
