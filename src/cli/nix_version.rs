//! The Nix `nix-hatch check` reports: `nix-store --version` from `PATH`
//! (Nix or Lix), compared with the versions the end-to-end suite runs
//! against (`scripts/test`: Debian 12's 2.8, Debian 13's 2.26 and Debian
//! sid's 2.34) and with what each speaks to a build hook.
//!
//! Lix (read from its source, lix-project/lix; not in the test matrix):
//! 2.90 … 2.93 run `build-hook` (a list, as Nix ≥ 2.19) with Nix's stdio
//! hook protocol — settings, `try`, `# accept`, fd 4 — so nix-hatch works
//! there; 2.91 deprecated the setting (a warning wherever it is set).
//! From 2.94 the hook's stdout is a socket speaking Cap'n Proto RPC
//! (`lix/libstore/build/hook-instance.capnp`), which nix-hatch does not.

use std::process::{Command, Stdio};

/// Oldest and newest (major, minor) of Nix the end-to-end suite runs on.
pub const TESTED: [(u32, u32); 2] = [(2, 8), (2, 34)];

/// The first Lix that talks to build hooks over Cap'n Proto RPC.
pub const LIX_RPC_HOOKS: (u32, u32) = (2, 94);

/// Which implementation printed the version line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    Nix,
    Lix,
}

/// A parsed `nix-store --version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub implementation: Implementation,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    fn minor(&self) -> (u32, u32) {
        (self.major, self.minor)
    }

    /// (major, minor) of the Nix whose daemon protocol this one speaks:
    /// itself, or for Lix the Nix 2.18 it forked from (Lix keeps that
    /// worker protocol for good, rl-2.91).
    pub fn nix_equivalent(&self) -> (u32, u32) {
        match self.implementation {
            Implementation::Nix => self.minor(),
            Implementation::Lix => (2, 18),
        }
    }
}

/// The version from `nix-store --version` output such as `nix-store (Nix)
/// 2.26.3`, `nix-store (Nix) 2.18.1pre20231201_dirty` or `nix-store (Lix,
/// like Nix) 2.93.3` (newer Lix print more lines after it: only the first
/// counts).
pub fn parse(output: &str) -> Option<Version> {
    let line = output.trim_start().lines().next()?;
    let implementation = if line.contains("(Lix") {
        Implementation::Lix
    } else {
        Implementation::Nix
    };
    let word = line.split_whitespace().last()?;
    let mut parts = word.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some(Version {
        implementation,
        major,
        minor,
        patch,
    })
}

/// What `check` prints about `version` (the `nix-store --version` output):
/// one `nix:` line, then warnings and notes, and an `error:` line when
/// nix-hatch cannot be this Nix's build hook at all (see [`unusable`]).
pub fn report_lines(version: &str) -> Vec<String> {
    let first = version.trim().lines().next().unwrap_or_default().trim();
    let [(lo_major, lo_minor), (hi_major, hi_minor)] = TESTED;
    let tested = format!("{lo_major}.{lo_minor} … {hi_major}.{hi_minor}");
    let Some(v) = parse(first) else {
        return vec![format!(
            "warning: cannot tell the Nix version from {first:?} (nix-hatch is tested with Nix {tested})"
        )];
    };
    let Version {
        major,
        minor,
        patch,
        ..
    } = v;
    if v.implementation == Implementation::Lix {
        return lix_lines(first, v, &tested);
    }
    let mut lines = vec![format!("nix: {first} (tested: {tested})")];
    if v.minor() < TESTED[0] || v.minor() > TESTED[1] {
        lines.push(format!(
            "warning: Nix {major}.{minor}.{patch} is outside the versions nix-hatch is tested with ({tested})"
        ));
    }
    if v.minor() < (2, 19) {
        lines.push(
            "note: this Nix runs `build-hook` as one path: use `build-hook = /path/to/nix-hatch-hook`"
                .to_owned(),
        );
    }
    // NixOS/nix#15083: `nix` sets build-hook's default after reading the
    // system nix.conf, overwriting it (fixed in 2.34).
    if ((2, 25)..(2, 34)).contains(&v.minor()) {
        lines.push(format!(
            "warning: Nix {major}.{minor} ignores `build-hook` in the system nix.conf (NixOS/nix#15083): set it for nix-daemon through NIX_CONFIG (see README)"
        ));
    }
    lines
}

/// [`report_lines`] for Lix: the stdio protocol up to 2.93, RPC after.
fn lix_lines(first: &str, v: Version, tested: &str) -> Vec<String> {
    let Version { major, minor, .. } = v;
    let mut lines = vec![format!(
        "nix: {first} (Lix; nix-hatch is tested with Nix {tested})"
    )];
    if v.minor() >= LIX_RPC_HOOKS {
        lines.push(format!(
            "error: Lix {major}.{minor} talks to build hooks over Cap'n Proto RPC (Lix 2.94 and later), \
             not Nix's stdio hook protocol that nix-hatch speaks: nix-hatch cannot be its build-hook \
             (use Lix 2.90 … 2.93, or Nix; see README)"
        ));
        return lines;
    }
    lines.push(format!(
        "warning: Lix {major}.{minor} is not among the versions nix-hatch is tested with; \
         Lix up to 2.93 runs build hooks with Nix's stdio protocol, so either `build-hook` form should work"
    ));
    if v.minor() >= (2, 91) {
        lines.push(format!(
            "note: Lix {major}.{minor} deprecates `build-hook` and says so (\"deprecated setting 'build-hook' found\") wherever it is set; it still works up to Lix 2.93"
        ));
    }
    lines
}

/// Whether [`report_lines`] found that nix-hatch cannot work with this Nix
/// (`check` then fails).
pub fn unusable(lines: &[String]) -> bool {
    lines.iter().any(|l| l.starts_with("error:"))
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

    fn v(implementation: Implementation, major: u32, minor: u32, patch: u32) -> Version {
        Version {
            implementation,
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn parses_release_and_pre_versions() {
        use Implementation::*;
        assert_eq!(parse("nix-store (Nix) 2.8.0\n"), Some(v(Nix, 2, 8, 0)));
        assert_eq!(parse("nix-store (Nix) 2.26.3"), Some(v(Nix, 2, 26, 3)));
        assert_eq!(
            parse("nix-store (Nix) 2.18.1pre20231201_dirty"),
            Some(v(Nix, 2, 18, 1))
        );
        assert_eq!(
            parse("nix-store (Lix, like Nix) 2.91"),
            Some(v(Lix, 2, 91, 0))
        );
        assert_eq!(
            parse("nix (Lix, like Nix) 2.92.0-dev-pre20250117-0d14c2b"),
            Some(v(Lix, 2, 92, 0))
        );
        // Newer Lix print their configuration after the version line.
        assert_eq!(
            parse("nix-store (Lix, like Nix) 2.94.1\nSystem type: x86_64-linux\nData directory: /nix/store/x-lix/share\n"),
            Some(v(Lix, 2, 94, 1))
        );
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn tested_versions_only_get_the_version_line_and_notes() {
        let l = report_lines("nix-store (Nix) 2.8.0");
        assert_eq!(l[0], "nix: nix-store (Nix) 2.8.0 (tested: 2.8 … 2.34)");
        assert!(!l.iter().any(|l| l.starts_with("warning:")), "{l:?}");
        assert!(l[1].contains("nix-hatch-hook"), "{l:?}");
        for version in ["2.20.1", "2.34.8"] {
            let l = report_lines(&format!("nix-store (Nix) {version}"));
            assert_eq!(l.len(), 1, "{l:?}");
            assert!(!unusable(&l));
        }
    }

    #[test]
    fn outside_the_range_warns() {
        for v in ["2.3.16", "2.7.0", "2.35.0", "3.0.0"] {
            let l = report_lines(&format!("nix-store (Nix) {v}"));
            assert!(
                l.iter()
                    .any(|l| l.starts_with("warning:") && l.contains("outside")),
                "{v}: {l:?}"
            );
            assert!(!unusable(&l));
        }
        for v in ["2.26.3", "2.34.0"] {
            let l = report_lines(&format!("nix-store (Nix) {v}"));
            assert!(!l.iter().any(|l| l.contains("outside")), "{l:?}");
        }
        assert!(report_lines("what")[0].starts_with("warning: cannot tell"));
    }

    #[test]
    fn versions_that_ignore_build_hook_in_nix_conf_say_so() {
        for (v, ignored) in [
            ("2.24.9", false),
            ("2.25.0", true),
            ("2.26.3", true),
            ("2.33.9", true),
            ("2.34.0", false),
        ] {
            let l = report_lines(&format!("nix-store (Nix) {v}"));
            assert_eq!(l.iter().any(|l| l.contains("15083")), ignored, "{v}: {l:?}");
        }
    }

    #[test]
    fn lix_up_to_2_93_works_and_2_94_does_not() {
        let l = report_lines("nix-store (Lix, like Nix) 2.90.0");
        assert_eq!(
            l[0],
            "nix: nix-store (Lix, like Nix) 2.90.0 (Lix; nix-hatch is tested with Nix 2.8 … 2.34)"
        );
        assert!(l[1].starts_with("warning: Lix 2.90 is not among"), "{l:?}");
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(!unusable(&l));
        let l = report_lines("nix-store (Lix, like Nix) 2.93.3");
        assert!(
            l.iter().any(|l| l.contains("deprecates `build-hook`")),
            "{l:?}"
        );
        // Nix's own quirks are not Lix's.
        assert!(
            !l.iter()
                .any(|l| l.contains("15083") || l.contains("one path")),
            "{l:?}"
        );
        assert!(!unusable(&l));
        for version in ["2.94.0", "2.95.3", "3.0.0"] {
            let l = report_lines(&format!(
                "nix-store (Lix, like Nix) {version}\nSystem type: x86_64-linux"
            ));
            assert_eq!(l[0], format!("nix: nix-store (Lix, like Nix) {version} (Lix; nix-hatch is tested with Nix 2.8 … 2.34)"));
            assert!(
                l[1].starts_with("error: Lix ") && l[1].contains("Cap'n Proto RPC"),
                "{l:?}"
            );
            assert!(unusable(&l));
        }
    }
}
