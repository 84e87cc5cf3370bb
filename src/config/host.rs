//! `kind = "host"`: the admin's command on this machine, outside any
//! sandbox. Also what may reach such a command's environment from the
//! derivation (`pass-env`, shared with `kind = "ssh"`), and the variables
//! nix-hatch sets for it.

use super::keys::{Keys, Problems};

#[derive(Debug, Clone)]
pub struct HostExecutor {
    /// The admin's command; the derivation's `args` are appended.
    pub command: Vec<String>,
    /// Run the derivation's own builder instead of `command`.
    pub allow_any_builder: bool,
    /// Derivation environment variables handed to the admin command.
    pub pass_env: Vec<String>,
    /// Which files the derivation's arguments may name.
    pub arg_paths: ArgPaths,
}

/// `arg-paths`: what a host command's arguments may name. Anyone who can
/// start a build chooses them, and the command reads files as its account
/// (root by default), so by default an argument can only name what the
/// derivation could read anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgPaths {
    /// `"inputs"` (default): an argument that is an absolute path (or an
    /// option `-…=` whose value is one) must resolve, symlinks
    /// followed, inside the derivation's input closure or below one of its
    /// outputs; no argument may contain a `..` component.
    Inputs,
    /// `"any"`: arguments are not looked at (the command checks them).
    Any,
}

/// Variables the agent sets itself (besides one per output); a host
/// executor sets the same for its command.
pub const AGENT_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "NIX_BUILD_TOP",
    "TMPDIR",
    "TEMPDIR",
    "TMP",
    "TEMP",
    "PWD",
    "NIX_LOG_FD",
    "TERM",
    "outputs",
];

/// Why `name` may not be in `pass-env`, if it may not: the command's
/// environment is the admin's, so nothing from the derivation may make the
/// loader, the C library or an interpreter load or run something, nor
/// replace a variable nix-hatch sets. A list of what is known to do that,
/// so no guarantee for every program: `pass-env` should name variables of
/// the admin's own command (`pass-env = ["RELEASE_CHANNEL"]`).
pub fn pass_env_problem(name: &str) -> Option<&'static str> {
    const LOADER: &[&str] = &[
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TZDIR",
        "OPENSSL_CONF",
        "OPENSSL_ENGINES",
        "OPENSSL_MODULES",
        "GIO_EXTRA_MODULES",
        "GTK_MODULES",
        "GTK_PATH",
        "QT_PLUGIN_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "KRB5_CONFIG",
        "TERMINFO",
        "TERMINFO_DIRS",
    ];
    const LOADER_PREFIXES: &[&str] = &["LD_", "MALLOC_", "GLIBC_", "DYLD_"];
    const STARTUP: &[&str] = &[
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "IFS",
        "CDPATH",
        "ZDOTDIR",
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "PERL5DB",
        "NODE_OPTIONS",
        "NODE_PATH",
        "RUBYOPT",
        "RUBYLIB",
        "LUA_INIT",
        "LUA_PATH",
        "LUA_CPATH",
        "CLASSPATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
    ];
    const STARTUP_PREFIXES: &[&str] = &["BASH_FUNC_", "PYTHON", "GIT_", "GEM_"];
    if name.is_empty() || name.contains(['=', '\0']) {
        return Some("not a variable name");
    }
    if LOADER.contains(&name) || LOADER_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some("it makes the dynamic loader, the C library or a library load files");
    }
    if STARTUP.contains(&name) || STARTUP_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some("it makes a shell, an interpreter or a tool run code or load modules");
    }
    if name.to_ascii_lowercase().ends_with("_proxy") {
        return Some("network tools read it");
    }
    if name.starts_with("NIX_") || AGENT_VARS.contains(&name) || name == "out" {
        return Some("nix-hatch sets this variable for the command");
    }
    None
}

/// Reports every `pass-env` entry [`pass_env_problem`] refuses.
pub(super) fn check_pass_env(ctx: &str, names: &[String], p: &mut Problems) {
    for n in names {
        if let Some(why) = pass_env_problem(n) {
            p.push(format!("{ctx}.pass-env: {n:?} cannot be passed: {why}"));
        }
    }
}

/// Reads the keys of a `kind = "host"` executor; `None` when it cannot
/// be used (the problems say why).
pub(super) fn parse(ctx: &str, k: &mut Keys, p: &mut Problems) -> Option<HostExecutor> {
    let command = k.string_list(p, "command");
    let allow_any_builder = k.bool(p, "allow-any-builder").unwrap_or(false);
    let pass_env = k.string_list(p, "pass-env").unwrap_or_default();
    check_pass_env(ctx, &pass_env, p);
    let arg_paths = match k.string(p, "arg-paths").as_deref() {
        None | Some("inputs") => ArgPaths::Inputs,
        Some("any") => ArgPaths::Any,
        Some(other) => {
            p.push(format!(
                "{ctx}.arg-paths: expected \"inputs\" or \"any\", got {other:?}"
            ));
            ArgPaths::Inputs
        }
    };
    match command {
        Some(c) if !c.is_empty() => {
            if !c[0].starts_with('/') {
                p.push(format!(
                    "{ctx}.command: the program must be an absolute path, got {:?}",
                    c[0]
                ));
            }
            Some(HostExecutor {
                command: c,
                allow_any_builder,
                pass_env,
                arg_paths,
            })
        }
        Some(_) => {
            p.push(format!("{ctx}.command: must not be empty"));
            None
        }
        None if allow_any_builder => Some(HostExecutor {
            command: Vec::new(),
            allow_any_builder,
            pass_env,
            arg_paths,
        }),
        None => {
            p.push(format!(
                "{ctx}: missing `command` (the admin's program; or set allow-any-builder = true)"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;
    use crate::config::ExecutorKind;

    #[test]
    fn pass_env_refuses_loader_startup_and_own_variables() {
        for bad in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "OPENSSL_CONF",
            "GIT_SSH_COMMAND",
            "PYTHONUSERBASE",
            "ZDOTDIR",
            "ftps_proxy",
            "HTTPS_PROXY",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "MALLOC_CHECK_",
            "BASH_ENV",
            "BASH_FUNC_x%%",
            "PATH",
            "HOME",
            "NIX_BUILD_TOP",
            "out",
            "A=B",
        ] {
            assert!(pass_env_problem(bad).is_some(), "{bad}");
        }
        for good in ["FILE", "version", "src", "RELEASE_TAG"] {
            assert_eq!(pass_env_problem(good), None, "{good}");
        }
        let errs = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\npass-env = [\"FILE\", \"LD_PRELOAD\"]\narg-paths = \"some\"\n",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|e| {
                e.starts_with(
                "executors.a.pass-env: \"LD_PRELOAD\" cannot be passed: it makes the dynamic loader"
            )
            }),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("arg-paths: expected")),
            "{errs:?}"
        );
        let c = parse("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\n").unwrap();
        let ExecutorKind::Host(h) = &c.executors["a"].kind else {
            panic!("not host")
        };
        assert_eq!(h.arg_paths, ArgPaths::Inputs);
    }
}
