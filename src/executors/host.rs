//! The `host` executor: the admin's command (or, with `allow-any-builder`,
//! the derivation's own builder) on the host, outside any sandbox, as the
//! configured account. The store is seen through an overlay whose upper
//! layer is the staging dir, so `$out` is the real store path while every
//! write lands in staging until the import.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use super::runner::{self, Overlay, RunSpec};
use super::supervise::{self, Cancel, Outcome};
use super::{BuildRequest, Failure};
use crate::config::host::{ArgPaths, HostExecutor};
use crate::derivation::{builder_env, write_build_files, EnvContext};
use crate::protocol::buildlog::LogSink;
use crate::util::{lookup_user, Account};

/// PATH for admin commands: they are host programs, not store builders.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run(
    req: &BuildRequest,
    host: &HostExecutor,
    log: &mut dyn LogSink,
    cancel: &Cancel,
    limits: &super::limits::Enforcement,
) -> Result<(), Failure> {
    let account =
        lookup_user(&req.executor.user).map_err(|e| Failure::Internal(format!("{e:#}")))?;
    let staging = req.staging;
    let build_dir = staging.build.to_string_lossy().into_owned();
    let (argv, env) = if host.allow_any_builder {
        let (env, files) = builder_env(
            req.drv,
            &EnvContext {
                store_dir: &req.store.store_dir,
                build_dir: &build_dir,
                cores: &req.cores,
            },
        )
        .map_err(|e| Failure::Internal(format!("{e:#}")))?;
        write_build_files(&staging.build, &files)
            .map_err(|e| Failure::Internal(format!("{e:#}")))?;
        (req.drv.argv_with([req.drv.drv.builder()]), env)
    } else {
        // Each output is a variable of the admin's command: none may
        // replace one the executor sets, or PATH, LD_PRELOAD and the like.
        if let Some((o, why)) = crate::protocol::hatch::bad_output_name(req.drv.outputs.keys()) {
            return Err(Failure::Builder(format!(
                "output {o:?} cannot be an environment variable of the command: {why}"
            )));
        }
        if host.arg_paths == ArgPaths::Inputs {
            check_arg_paths(req, host)?;
        }
        let argv = req.drv.argv_with(host.command.iter().map(String::as_str));
        (argv, admin_env(req, host, &account, &build_dir))
    };
    prepare_dirs(staging, &account)?;
    let spec = RunSpec {
        overlay: Some(Overlay {
            lower: req.store.real_store_dir.clone(),
            upper: staging.store.clone(),
            work: staging.work.clone(),
        }),
        account: account.clone(),
        cwd: staging.build.clone(),
        argv,
        env: env
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_vec()))
            .collect(),
        fds: Vec::new(),
        usage_file: Some(limits.usage_file()),
    };
    let mut cmd = runner::prepare(&spec, staging)?;
    limits.join_on_spawn(&mut cmd);
    let outcome = supervise::run_logged(cmd, log, req.limits, cancel)
        .map_err(|e| Failure::Internal(format!("running the command: {e}")))?;
    // Whatever the outcome: paths the command registered must exist.
    let outputs: Vec<&str> = req.outputs.iter().map(|(_, p)| p.base_name()).collect();
    match crate::store::adopt_added_paths(req.store, &staging.store, &outputs) {
        Ok(adopted) => {
            for p in &adopted.moved {
                tracing::info!("the command added {p} to the store; moved it into place");
            }
            if !adopted.failed.is_empty() {
                for f in &adopted.failed {
                    tracing::error!("{f}");
                }
                // Valid in the database, files only here: keep them for
                // the admin rather than delete them with the staging dir.
                let kept = match staging.keep() {
                    Ok(p) => format!("kept in {}", p.display()),
                    Err(e) => format!("could not keep {}: {e}", staging.root.display()),
                };
                return Err(Failure::Internal(format!(
                    "{} store path(s) the command added could not be moved into the store (their files are {kept}); `nix-store --verify` drops them from the database",
                    adopted.failed.len()
                )));
            }
        }
        Err(e) => tracing::warn!("warning: checking what the command added to the store: {e}"),
    }
    interpret(outcome, host.allow_any_builder)
}

/// Turns how the process ended into the build's result.
pub fn interpret(outcome: Outcome, own_builder: bool) -> Result<(), Failure> {
    let what = if own_builder { "builder" } else { "command" };
    let exited = |status, message| Err(Failure::Exited { status, message });
    match outcome {
        Outcome::Exited(s) if s.success() => Ok(()),
        Outcome::Exited(s) => match s.code() {
            Some(runner::SETUP_FAILED) => exited(
                runner::SETUP_FAILED,
                format!(
                    "{what} could not be started or exited with status {}",
                    runner::SETUP_FAILED
                ),
            ),
            Some(c) if c > 128 => exited(c, format!("{what} killed by signal {}", c - 128)),
            Some(c) => exited(c, format!("{what} failed with exit code {c}")),
            None => Err(Failure::Builder(format!("{what} was killed"))),
        },
        Outcome::TimedOut(d) => Err(Failure::TimedOut(format!(
            "build timed out after {} seconds; killed",
            d.as_secs()
        ))),
        Outcome::Silent(d) => Err(Failure::TimedOut(format!(
            "no output for {} seconds (max-silent-time); killed",
            d.as_secs()
        ))),
        // No peer, and the build log is never gone: only a signal.
        Outcome::Cancelled | Outcome::ReaderGone => Err(Failure::Cancelled),
    }
}

/// What an admin command sees: the paths it must fill, the build dir, and
/// only the derivation variables the admin passes through (`pass-env`).
fn admin_env(
    req: &BuildRequest,
    host: &HostExecutor,
    account: &Account,
    build_dir: &str,
) -> BTreeMap<String, OsString> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        env.insert(k.to_owned(), OsString::from(v));
    };
    set("PATH", HOST_PATH);
    set("HOME", &account.home);
    set("USER", &account.name);
    set("NIX_STORE", &req.store.store_dir);
    set("NIX_BUILD_CORES", &req.cores);
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(k, build_dir);
    }
    set("NIX_LOG_FD", "2");
    set("TERM", "xterm-256color");
    set("NIX_HATCH_DRV", &req.drv.path);
    set("NIX_HATCH_EXECUTOR", &req.executor.name);
    let names: Vec<&str> = req.drv.outputs.keys().map(String::as_str).collect();
    set("outputs", &names.join(" "));
    for (name, info) in &req.drv.outputs {
        set(name, &info.path);
    }
    for var in &host.pass_env {
        if let Some(v) = req.drv.drv.environment().get(var) {
            env.insert(var.clone(), OsString::from_vec(v.clone()));
        } else if let Some(v) = req.drv.env_str(var) {
            env.insert(var.clone(), OsString::from(v));
        }
    }
    env
}

/// Under `arg-paths = "inputs"`, what the derivation hands the command —
/// each argument and each `pass-env` value — may name a file only as a
/// path the check can follow: an absolute path, on its own or as an
/// option's value (`--input=/x`, `-Dkey=/x`), that resolves (symlinks
/// followed) inside the derivation's input closure, or stays below one of
/// its outputs. Anything else with a `/` in it (`-f/etc/x`, `file:///x`,
/// `a/b`) and any `..` component is refused: a command may read a path out
/// of any spelling, so only the plain ones are let through.
fn check_arg_paths(req: &BuildRequest, host: &HostExecutor) -> Result<(), Failure> {
    let refuse = |what: String, why: &str| {
        Err(Failure::Builder(format!(
            "{what} {why} (arg-paths = \"inputs\"); the command was not run"
        )))
    };
    let args = req
        .drv
        .drv
        .arguments()
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("argument {}", i + 1), a.as_bytes().to_vec()));
    let env = host.pass_env.iter().filter_map(|var| {
        let v = match req.drv.drv.environment().get(var) {
            Some(v) => v.clone(),
            None => req.drv.env_str(var)?.into_bytes(),
        };
        Some((format!("variable {var}"), v))
    });
    for (what, bytes) in args.chain(env) {
        let shown: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
        let what = format!("{what} ({shown:?})");
        if !bytes.contains(&b'/') {
            continue;
        }
        // `--input=/x`, `-Dkey=/x`: an option's value is a path too.
        let value = match bytes.iter().position(|&b| b == b'=') {
            Some(eq) if bytes.starts_with(b"-") => &bytes[eq + 1..],
            _ => &bytes[..],
        };
        if !value.starts_with(b"/") || value[1..].contains(&b'=') {
            return refuse(
                what,
                "has a '/' but is not a path on its own or an option's value (--name=/path)",
            );
        }
        match path_is_allowed(req, value) {
            Ok(()) => {}
            Err(why) => return refuse(what, why),
        }
    }
    Ok(())
}

/// Whether the absolute path `value` resolves inside the input closure or
/// stays below an output; why not, if not.
fn path_is_allowed(req: &BuildRequest, value: &[u8]) -> Result<(), &'static str> {
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path};
    let path = Path::new(std::ffi::OsStr::from_bytes(value));
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("contains \"..\"");
    }
    let store = &req.store.real_store_dir;
    let real_store = std::fs::canonicalize(store).unwrap_or_else(|_| store.clone());
    // A logical store path is looked at where the store really is.
    let on_disk = |p: &Path| match p.strip_prefix(&req.store.store_dir) {
        Ok(rest) => store.join(rest),
        Err(_) => p.to_path_buf(),
    };
    let base_of = |real: &Path| {
        real.strip_prefix(&real_store)
            .ok()
            .and_then(|rest| rest.components().next())
            .map(|b| b.as_os_str().to_string_lossy().into_owned())
    };
    let inputs: std::collections::HashSet<&str> =
        req.inputs.iter().map(|p| p.base_name()).collect();
    let in_inputs = |base: &Option<String>| base.as_deref().is_some_and(|b| inputs.contains(b));
    if let Some(out) = req
        .drv
        .outputs
        .values()
        .find(|o| path.starts_with(o.path.as_str()))
    {
        // Not built yet: below it by its name. Already there (a valid
        // sibling output): followed, it must stay below it or in the inputs.
        return match std::fs::canonicalize(on_disk(path)) {
            Err(_) => Ok(()),
            Ok(real) => {
                let base = base_of(&real);
                let own = std::fs::canonicalize(on_disk(Path::new(out.path.as_str())))
                    .ok()
                    .and_then(|o| base_of(&o));
                if base.is_some() && (base == own || in_inputs(&base)) {
                    Ok(())
                } else {
                    Err("leads out of the derivation's outputs")
                }
            }
        };
    }
    match std::fs::canonicalize(on_disk(path)) {
        Ok(real) if in_inputs(&base_of(&real)) => Ok(()),
        _ => Err("names a file outside the derivation's inputs"),
    }
}

/// The build dir and the store's upper layer belong to the build account.
fn prepare_dirs(staging: &super::staging::Staging, account: &Account) -> std::io::Result<()> {
    staging.give_to(account, &[&staging.store])
}
