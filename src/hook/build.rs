//! The accepted build: staging, executor, import, exit status. Every failure
//! ends as one `nix-hatch: …` line in the build log (Nix prints its tail)
//! and an exit status Nix understands.

use std::time::{Instant, SystemTime};

use super::requester::Requester;
use super::slots::{Claim, Ended, Slot, Ticket};
use super::{Accepted, Builder, Refused};
use crate::audit::{self, Outcome};
use crate::config::Executor;
use crate::derivation::Drv;
use crate::executors::staging::{self, Staging};
use crate::executors::supervise::Cancel;
use crate::executors::{self, BuildRequest, Failure, Limits};
use crate::protocol::buildlog::{BuildLog, LogSink};
use crate::store::{self, ImportRequest, Registered, Registrar, StagedOutput, StorePath};

pub struct RealBuilder;

impl Builder for RealBuilder {
    fn build(&self, a: Accepted<'_>, claim: Claim) -> i32 {
        let (started, clock) = (SystemTime::now(), Instant::now());
        let mut log = BuildLog::from_nix();
        messages_to_build_log();
        tracing::info!(
            "{} asked for {} (feature {:?})",
            a.requester,
            a.drv.path,
            a.feature
        );
        // Every message of the build names the executor (this span).
        let span = tracing::error_span!("executor", name = %a.executor.name);
        let mut report = executors::Report::default();
        let mut waited = None;
        let ran = Cancel::install()
            .map_err(|e| Failure::Internal(format!("installing signal handlers: {e}")))
            .and_then(|cancel| {
                let slot = match claim {
                    Claim::Slot(slot) => slot,
                    Claim::Queued(ticket) => {
                        let from = Instant::now();
                        let slot = wait_for_slot(&a, ticket, &cancel);
                        waited = Some(from.elapsed());
                        crate::timing::mark("queue");
                        slot?
                    }
                };
                // The build's `timeout` starts here, with the build.
                span.in_scope(|| build(&a, &slot, &cancel, &mut log, &mut report))
            });
        let (code, outcome, reason, status, outputs) = match ran {
            Ok(registered) => (0, Outcome::Built, None, Some(0), registered),
            Err(f) => {
                match f {
                    // It names the executor itself.
                    Failure::Limit(_) => tracing::error!("{f}"),
                    _ => span.in_scope(|| tracing::error!("{f}")),
                }
                let (outcome, status) = match f {
                    Failure::Exited { status, .. } => (Outcome::Failed, Some(status)),
                    Failure::Builder(_) | Failure::Limit(_) => (Outcome::Failed, None),
                    Failure::TimedOut(_) => (Outcome::TimedOut, None),
                    Failure::Cancelled | Failure::Internal(_) => (Outcome::Error, None),
                };
                (
                    f.exit_code(),
                    outcome,
                    Some(f.to_string()),
                    status,
                    Vec::new(),
                )
            }
        };
        // Asked for explicitly (NIX_HATCH_TIMING=1): whatever the verbosity.
        if let Some(t) = crate::timing::report() {
            log.raw(format!("nix-hatch: timing: {t}\n").as_bytes());
        }
        // The log's last line of nix-hatch's: what the build used.
        if let Some(u) = &report.usage {
            span.in_scope(|| tracing::info!("used {}", u.describe()));
        }
        let mut record = record_of(
            a.executor,
            &a.drv,
            &a.requester,
            &a.feature,
            started,
            clock,
            outcome,
        );
        if let Some(r) = &reason {
            record.set_reason(r);
        }
        record.exit_status = status;
        record.waited_s = waited.map(audit::seconds);
        record.proxy = report.proxy;
        if let Some(u) = &report.usage {
            record.set_usage(u);
        }
        record.outputs = outputs
            .iter()
            .map(|r| audit::OutputRecord {
                path: r.path.to_string(),
                nar_hash: format!("sha256:{}", nix_derivation::nixbase32::encode(&r.nar_hash)),
                size: r.nar_size,
            })
            .collect();
        write_record(&a.config.state_dir, &record);
        log_read_by_nix();
        code
    }

    fn refuse(&self, r: Refused<'_>) -> i32 {
        let (started, clock) = (SystemTime::now(), Instant::now());
        messages_to_build_log();
        tracing::error!("{}", r.reason);
        let mut record = record_of(
            r.executor,
            &r.drv,
            &r.requester,
            &r.feature,
            started,
            clock,
            Outcome::Refused,
        );
        record.set_reason(&r.reason);
        write_record(&r.config.state_dir, &record);
        log_read_by_nix();
        // A permanent failure: Nix neither retries nor builds it elsewhere.
        100
    }
}

/// Before the hook exits: Nix has read the whole build log (see
/// [`crate::protocol::buildlog::wait_until_read`]) — unless Nix is
/// stopping the hook (SIGTERM), when it reads nothing more and SIGKILLs
/// the hook 500 ms later.
fn log_read_by_nix() {
    if !Cancel::signalled() {
        crate::protocol::buildlog::wait_until_read(crate::protocol::buildlog::READ_WAIT);
    }
}

/// Outputs at least this large (by file sizes) show their import in Nix's
/// progress bar.
const IMPORT_PROGRESS_FROM: u64 = 16 << 20;

/// Runs `import` (reading the outputs into the store, which `read` counts
/// in bytes); a large import reports itself as a Nix activity meanwhile,
/// so Nix's progress bar shows bytes rather than a silent pause.
fn with_import_progress<T>(
    a: &Accepted<'_>,
    staged: &[StagedOutput],
    read: &std::sync::atomic::AtomicU64,
    import: impl FnOnce() -> T,
) -> T {
    use crate::protocol::activity::{Activity, Kind};
    use std::sync::atomic::Ordering;
    let expected: u64 = staged
        .iter()
        .filter_map(|o| store::apparent_size(&o.staged).ok())
        .sum();
    if expected < IMPORT_PROGRESS_FROM {
        return import();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reporter = s.spawn(|| {
            let mut activity = Activity::start(
                Kind::CopyPath,
                &format!("reading the outputs of '{}' into the store", a.drv.path),
                &[
                    &a.drv.path,
                    &format!("nix-hatch:{}", a.executor.name),
                    "local",
                ],
            );
            while !done.load(Ordering::Relaxed) {
                activity.progress(read.load(Ordering::Relaxed), expected);
                std::thread::park_timeout(std::time::Duration::from_millis(250));
            }
            activity.progress(read.load(Ordering::Relaxed), expected);
        });
        let r = import();
        done.store(true, Ordering::Relaxed);
        reporter.thread().unpark();
        r
    })
}

/// From now on nix-hatch's messages are lines of the build log (fd 4).
fn messages_to_build_log() {
    use std::os::fd::BorrowedFd;
    if !crate::util::fd_is_open(crate::protocol::buildlog::LOG_FD) {
        return;
    }
    // SAFETY: fd 4 is Nix's log pipe, open for the life of the hook.
    let fd = unsafe { BorrowedFd::borrow_raw(crate::protocol::buildlog::LOG_FD) };
    // Close-on-exec: nothing the build starts may inherit the log.
    if let Ok(copy) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3)) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
        let copy = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
        crate::protocol::messages::to_build_log(std::fs::File::from(copy));
    }
}

/// The audit record of an escape attempt, without its outcome's details.
fn record_of(
    executor: &Executor,
    drv: &Drv,
    requester: &Requester,
    feature: &str,
    started: SystemTime,
    clock: Instant,
    result: Outcome,
) -> audit::Record {
    let mut record = audit::Record {
        time: audit::timestamp(started),
        duration_s: audit::seconds(clock.elapsed()),
        user: requester.user.clone(),
        uid: requester.uid,
        via: requester.via.as_str().to_owned(),
        drv: drv.path.to_string(),
        feature: feature.to_owned(),
        executor: executor.name.clone(),
        kind: executor.kind.name().to_owned(),
        args: Vec::new(),
        args_total: None,
        result,
        exit_status: None,
        reason: None,
        outputs: Vec::new(),
        proxy: None,
        waited_s: None,
        peak_memory_bytes: None,
        cpu_s: None,
        wall_s: None,
    };
    record.set_args(drv.drv.arguments().iter().map(|a| a.as_bytes()));
    record
}

/// Appends to the audit log; a log that can't be written is said in the
/// build log (the build's own result stands).
fn write_record(state_dir: &std::path::Path, record: &audit::Record) {
    if let Err(e) = audit::append(state_dir, record) {
        tracing::warn!("cannot write the audit record: {e}");
    }
}

/// Waits inside the accepted hook for the build's turn and a free slot,
/// saying so once in the build log and in Nix's progress bar. Ends,
/// having run nothing, on a signal (Nix stopping the build) or when Nix
/// is gone (the log pipe has no reader any more).
fn wait_for_slot(a: &Accepted<'_>, ticket: Ticket, cancel: &Cancel) -> Result<Slot, Failure> {
    use crate::protocol::activity::{Activity, Kind};
    use std::os::fd::{AsFd, BorrowedFd};
    let name = &a.executor.name;
    let mut stop = vec![cancel.as_fd()];
    if crate::util::fd_is_open(crate::protocol::buildlog::LOG_FD) {
        // SAFETY: fd 4 is Nix's log pipe, open for the life of the hook.
        stop.push(unsafe { BorrowedFd::borrow_raw(crate::protocol::buildlog::LOG_FD) });
    }
    let mut activity = None;
    let got = ticket.wait(&stop, |now| {
        tracing::info!(
            "waiting for a free slot of executor {name:?}: {} running, {} waiting",
            now.running,
            now.waiting
        );
        activity = Some(Activity::start(
            Kind::BuildWaiting,
            &format!(
                "waiting for a free slot of executor {name:?} (max-jobs {}) to build '{}'",
                a.executor.max_jobs, a.drv.path
            ),
            &[],
        ));
    });
    drop(activity);
    got.map_err(|e| {
        Failure::Internal(match e {
            Ended::Stopped(0) => {
                "cancelled by a signal while waiting for a free slot; nothing was run".to_owned()
            }
            Ended::Stopped(_) => {
                "Nix went away while the build waited for a free slot; nothing was run".to_owned()
            }
            Ended::Failed(e) => format!("waiting for a free slot: {e}; nothing was run"),
        })
    })
}

/// Maps what Nix sent as wanted outputs to (name, path). Nix ≥ 2.4 sends
/// output names; older versions sent store paths.
pub fn wanted_outputs(a: &Accepted<'_>) -> Result<Vec<(String, StorePath)>, Failure> {
    let mut out = Vec::new();
    for w in &a.job.wanted_outputs {
        let found = if w.starts_with('/') {
            a.drv.outputs.iter().find(|(_, o)| &o.path == w)
        } else {
            a.drv.outputs.get_key_value(w)
        };
        match found {
            Some((name, o)) => out.push((name.clone(), o.path.clone())),
            None => {
                return Err(Failure::Internal(format!(
                    "Nix wants output {w:?}, which {} does not have",
                    a.drv.path
                )))
            }
        }
    }
    if out.is_empty() {
        // Nix asked for nothing: rebuild everything (e.g. --check).
        out = a
            .drv
            .outputs
            .iter()
            .map(|(n, o)| (n.clone(), o.path.clone()))
            .collect();
    }
    Ok(out)
}

fn build(
    a: &Accepted<'_>,
    slot: &Slot,
    cancel: &Cancel,
    log: &mut BuildLog,
    report: &mut executors::Report,
) -> Result<Vec<Registered>, Failure> {
    let internal = |e: String| Failure::Internal(e);
    let outputs = wanted_outputs(a)?;
    // The input closure as Nix sent it, refused here if it isn't one.
    let inputs = a
        .store
        .parse_paths(&a.job.inputs)
        .map_err(|e| Failure::Builder(e.to_string()))?;
    let location = a.store.clone();
    // Started now so its start-up cost overlaps the build.
    let registrar = Registrar::spawn(&location).map_err(|e| internal(e.to_string()))?;

    // A dead hook's cgroups are known by its staging dir's name.
    let dead = staging::remove_stale(&a.config.state_dir);
    executors::limits::sweep(a.config.executors.values(), &a.config.state_dir, &dead);
    let drv_base = a.drv.path.base_name();
    let staging = Staging::create(&a.config.state_dir, drv_base)
        .map_err(|e| internal(format!("creating staging dir: {e}")))?;

    let paths: Vec<StorePath> = outputs.iter().map(|(_, p)| p.clone()).collect();
    let removed =
        store::remove_stale_outputs(&location, &paths).map_err(|e| internal(e.to_string()))?;
    for p in removed {
        tracing::info!("removed stale invalid leftover {p}");
    }

    let limits = Limits::combine(
        a.settings.u64_or_zero("timeout"),
        a.executor.timeout,
        a.settings.u64_or_zero("max-silent-time"),
        a.executor.max_silent_time,
    );
    tracing::info!(
        "building {} ({}, slot {})",
        a.drv.path,
        a.executor.kind.name(),
        slot.index
    );
    tracing::debug!(
        "staging in {}; timeout {}, max-silent-time {}{}; {} input paths, outputs {}",
        staging.root.display(),
        limits
            .timeout
            .map_or("none".to_owned(), |t| format!("{}s", t.as_secs())),
        limits
            .max_silent
            .map_or("none".to_owned(), |t| format!("{}s", t.as_secs())),
        if a.executor.limits.any() {
            format!(", {}", a.executor.limits.describe())
        } else {
            String::new()
        },
        a.job.inputs.len(),
        outputs
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let req = BuildRequest {
        drv: &a.drv,
        executor: a.executor,
        store: a.store,
        inputs: &inputs,
        outputs: &outputs,
        cores: executors::build_cores(a.settings.get("cores")),
        limits,
        staging: &staging,
    };
    crate::util::fault_point("before-build");
    crate::timing::mark("prepare");
    // `timeout` is for the whole build: reading the outputs into the store
    // stops at the same deadline as the builder.
    let deadline = limits
        .timeout
        .and_then(|t| std::time::Instant::now().checked_add(t));
    let ran = executors::run(&req, log, cancel, report);
    crate::timing::mark("executor");
    // No process of the build is left (executors return only then): from
    // here on its account can neither reach nor change what it left.
    staging
        .take_back()
        .map_err(|e| internal(format!("taking the staging dir back: {e}")))?;
    if let Err(f) = ran {
        if a.settings.get("keep-failed") == Some("true") && !matches!(f, Failure::Cancelled) {
            match staging.keep() {
                Ok(p) => tracing::info!("keeping build directory {}", p.display()),
                Err(e) => tracing::warn!("could not keep the build directory: {e}"),
            }
        }
        return Err(f);
    }
    if cancel.is_cancelled() {
        return Err(Failure::Cancelled);
    }

    // A partial rebuild (some outputs still valid) may refer to the valid
    // siblings; Nix never lists a derivation's own outputs as inputs.
    let siblings: Vec<&StorePath> = a
        .drv
        .outputs
        .values()
        .map(|o| &o.path)
        .filter(|p| !paths.contains(p))
        .collect();
    let mut candidates = inputs.clone();
    if !siblings.is_empty() {
        candidates.extend(
            store::valid_siblings(&location, &siblings).map_err(|e| internal(e.to_string()))?,
        );
    }

    let checks = a
        .drv
        .output_checks(a.store)
        .map_err(|e| Failure::Builder(format!("{e:#}")))?;

    let staged: Vec<StagedOutput> = outputs
        .iter()
        .map(|(name, path)| StagedOutput {
            name: name.clone(),
            path: path.clone(),
            staged: staging.output(path.base_name()),
            fixed: a.drv.outputs.get(name).and_then(|o| o.fixed.clone()),
        })
        .collect();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let import = || {
        store::import(
            &ImportRequest {
                location: &location,
                deriver: Some(&a.drv.path),
                inputs: &candidates,
                outputs: &staged,
                checks: &checks,
                owner: executors::output_owner(a.executor),
                deadline,
                // Nix >= 2.35 stops a hook with SIGTERM and SIGKILLs it
                // 500 ms later: leave at once, with nothing in the store.
                cancel: Some(Cancel::flag()),
                max_size: a.executor.max_output_size,
                progress: Some(&read),
            },
            registrar,
        )
    };
    let registered = with_import_progress(a, &staged, &read, import).map_err(|e| match e {
        store::ImportError::Cancelled => Failure::Cancelled,
        store::ImportError::TimedOut { .. } => Failure::TimedOut(format!(
            "{e}; timeout is {} seconds",
            limits.timeout.unwrap_or_default().as_secs()
        )),
        e => Failure::Builder(e.to_string()),
    })?;
    crate::util::fault_point("after-register");
    for r in &registered {
        tracing::info!(
            "registered {} ({} bytes, {} references)",
            r.path,
            r.nar_size,
            r.references.len()
        );
    }
    Ok(registered)
}
