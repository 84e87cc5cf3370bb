//! The `ssh` executor: the admin's command on another machine, run there by
//! `nix-hatch agent` ([`agent`]) over one SSH channel, its outputs
//! streamed back as tar inside the framed protocol of `protocol::hatch`.
//!
//! The far side builds into a temporary directory, not the store path:
//! outputs are relocated (unpacked into the staging dir under their store
//! base names) and go through the same `store::import` as every other
//! executor. Nothing is imported unless the trailer's length and blake3
//! digest match every byte received; a truncated or corrupted stream leaves
//! only the staging dir, which is removed.
//!
//! This side, by layer: [`connect`] logs in, `channel` runs the agent and
//! reads its channel under this side's limits, `receive` takes its frames
//! apart and checks the trailer, `unpack` writes the archive into staging.
//! This file turns a build into a request and the answer into a result.

pub mod agent;
mod channel;
pub mod connect;
mod receive;
mod unpack;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::supervise::Cancel;
use super::{BuildRequest, Failure};
use crate::config::ssh::SshExecutor;
use crate::protocol::activity::{Activity, Kind as ActivityKind};
use crate::protocol::buildlog::LogSink;
use crate::protocol::hatch::{self, Request, Status};
use channel::ChannelReader;
use receive::{Frames, Received, RecvError};

/// Builds on the far side: the request to the agent, its answer into the
/// staging dir, the trailer's status as the result.
pub fn run(
    req: &BuildRequest,
    ssh: &SshExecutor,
    log: &mut dyn LogSink,
    cancel: &Cancel,
    report: &mut super::Report,
) -> Result<(), Failure> {
    // The agent refuses these too; saying so before connecting is clearer.
    if let Some((o, why)) = hatch::bad_output_name(req.drv.outputs.keys()) {
        return Err(Failure::Builder(format!(
            "output {o:?} cannot be an environment variable of the command on the far side: {why}"
        )));
    }
    let request = build_request(req, ssh);
    let target = connect::target(ssh, &req.executor.user);
    tracing::info!("connecting to {target}");
    let started = Instant::now();
    let conn = connect::connect(ssh, &req.executor.user).map_err(Failure::Internal)?;
    tracing::info!(
        "connected to {} (host key {}, cipher {}); running {} agent",
        conn.target,
        conn.host_key,
        conn.cipher,
        shell_quote(&ssh.agent)
    );
    let mut channel = channel::start(&conn, &ssh.agent, &request)?;

    let roots: BTreeMap<String, std::path::PathBuf> = req
        .outputs
        .iter()
        .map(|(out, path)| (out.clone(), req.staging.output(path.base_name())))
        .collect();
    let cancelled = || cancel.is_cancelled();
    let reader = ChannelReader::new(&conn, &mut channel, &cancelled, req.limits);
    let mut frames = Frames::new(reader);
    // The transfer shows in Nix's progress bar, as build-remote's copies do.
    let mut copying: Option<Activity> = None;
    let mut on_data = |bytes: u64| {
        copying
            .get_or_insert_with(|| {
                Activity::start(
                    ActivityKind::CopyPath,
                    &format!("copying outputs of '{}' from '{target}'", req.drv.path),
                    &[&req.drv.path, &format!("ssh://{target}"), "local"],
                )
            })
            .progress(bytes, 0);
    };
    let result = receive::receive(&mut frames, log, roots, &mut on_data);
    drop(copying);
    let mut reader = frames.into_reader();
    let stderr_tail = reader.stderr_tail();
    let stopped = reader.take_stopped();
    drop(reader);
    // Closing the session ends the channel: the agent sees its stdin end
    // and kills whatever still runs there.
    let _ = conn.session.disconnect(None, "done", None);
    if let Some(f) = stopped {
        return Err(f);
    }
    let received = result.map_err(|e| match e {
        // An agent from before limits does not know a request with them.
        RecvError::Far(m) if m.contains("protocol version 2") => Failure::Builder(format!(
            "the agent on {target} is older than resource limits: update it there, \
             or remove the limits from executor {:?} (far side: {m})",
            req.executor.name
        )),
        RecvError::Far(m) => Failure::Builder(format!("far side: {m}")),
        RecvError::Stream(m) => {
            let tail = crate::util::first_line(&stderr_tail);
            let extra = if tail.is_empty() {
                String::new()
            } else {
                format!(" (agent stderr: {tail})")
            };
            Failure::Internal(format!("ssh {target}: {m}{extra}"))
        }
    })?;
    // What the far side measured (an agent asked for limits says), else
    // the session's wall time here.
    let usage = received.usage.unwrap_or(crate::usage::Usage {
        wall: started.elapsed(),
        ..crate::usage::Usage::default()
    });
    report.usage = Some(usage);
    let result = interpret(&received, started.elapsed());
    super::limits::judge(&req.executor.name, &req.executor.limits, &usage, result)
}

/// `nix-hatch check --connect` for an executor with `limits`: asks the
/// agent whether it can enforce them there (it tries: a cgroup made, a
/// process moved in, removed). Its one-line answer, or why not.
pub fn probe_limits(
    ssh: &SshExecutor,
    user: &str,
    limits: &crate::config::ResourceLimits,
) -> Result<String, String> {
    let conn = connect::connect(ssh, user)?;
    let request = Request {
        limits: Some(hatch::RequestLimits {
            limits: limits.clone(),
            probe: true,
        }),
        ..Request::default()
    };
    let mut channel = channel::start(&conn, &ssh.agent, &request).map_err(|f| f.to_string())?;
    let never = || false;
    let limits = super::Limits {
        timeout: Some(Duration::from_secs(ssh.connect_timeout)),
        max_silent: None,
    };
    let reader = ChannelReader::new(&conn, &mut channel, &never, limits);
    let mut frames = Frames::new(reader);
    let mut answer = crate::protocol::buildlog::BuildLog::memory();
    let result = receive::receive(&mut frames, &mut answer, BTreeMap::new(), &mut |_| {});
    drop(frames);
    let _ = conn.session.disconnect(None, "done", None);
    match result {
        Ok(_) => Ok(String::from_utf8_lossy(answer.contents()).trim().to_owned()),
        // An agent from before limits does not know the request.
        Err(RecvError::Far(m)) if m.contains("protocol version 2") => Err(format!(
            "the agent on {} is older than resource limits: update it there ({m})",
            conn.target
        )),
        Err(RecvError::Far(m)) | Err(RecvError::Stream(m)) => Err(m),
    }
}

/// What the command's status on the far side means here; the transfer and
/// relocation notes for the build log.
fn interpret(r: &Received, session: Duration) -> Result<(), Failure> {
    match r.trailer.status {
        Status::Exited(0) => {}
        Status::Exited(c) => {
            return Err(Failure::Exited {
                status: c,
                message: format!("command failed on the far side with exit code {c}"),
            })
        }
        Status::Signalled(s) => {
            return Err(Failure::Exited {
                status: 128 + s,
                message: format!("command killed by signal {s} on the far side"),
            })
        }
        Status::TimedOut(s) => {
            return Err(Failure::TimedOut(format!(
                "build timed out after {s} seconds; killed"
            )))
        }
        Status::Silent(s) => {
            return Err(Failure::TimedOut(format!(
                "no output for {s} seconds (max-silent-time); killed"
            )))
        }
    }
    if let Some(t) = r.transfer {
        let secs = t.as_secs_f64().max(1e-6);
        tracing::info!(
            "received {} bytes of outputs in {:.3} s ({:.1} MiB/s), digest verified; {:.3} s from connecting to verified outputs",
            r.trailer.tar_bytes,
            secs,
            r.trailer.tar_bytes as f64 / secs / (1024.0 * 1024.0),
            session.as_secs_f64()
        );
    }
    for o in &r.temp_path_hits {
        tracing::warn!(
            "warning: output {o:?} contains the far side's temporary path {}: outputs built over ssh are relocated into the store, so that path will not exist here (see the README, ssh executor)",
            r.temp_dir
        );
    }
    Ok(())
}

/// The request: the admin's command plus the derivation's args, and the
/// variables an admin command sees (as for `host`), minus what only makes
/// sense locally.
fn build_request(req: &BuildRequest, ssh: &SshExecutor) -> Request {
    let argv = req.drv.argv_with(ssh.command.iter().map(String::as_str));
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut set = |k: &str, v: &[u8]| env.push((k.as_bytes().to_vec(), v.to_vec()));
    set("NIX_STORE", req.store.store_dir.as_bytes());
    set("NIX_BUILD_CORES", req.cores.as_bytes());
    set("NIX_HATCH_DRV", req.drv.path.as_bytes());
    set("NIX_HATCH_EXECUTOR", req.executor.name.as_bytes());
    for (name, info) in &req.drv.outputs {
        // The store path each output will have here (the command's own
        // `$out` is a temporary path on the far side).
        set(
            &format!("NIX_HATCH_STORE_PATH_{name}"),
            info.path.as_bytes(),
        );
    }
    for var in &ssh.pass_env {
        if let Some(v) = req.drv.drv.environment().get(var) {
            env.push((var.as_bytes().to_vec(), v.to_vec()));
        } else if let Some(v) = req.drv.env_str(var) {
            env.push((var.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
    }
    Request {
        argv,
        env,
        outputs: req.drv.outputs.keys().cloned().collect(),
        timeout: req.limits.timeout.map_or(0, |d| d.as_secs().max(1)),
        max_silent: req.limits.max_silent.map_or(0, |d| d.as_secs().max(1)),
        // Only with limits: an agent older than them still serves the rest.
        limits: req
            .executor
            .limits
            .wants_cgroup()
            .then(|| hatch::RequestLimits {
                limits: req.executor.limits.clone(),
                probe: false,
            }),
    }
}

/// POSIX shell single-quoting (the remote command line goes through the
/// remote user's shell).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}
