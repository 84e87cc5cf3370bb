//! The accepted build: staging, executor, import, exit status. Every failure
//! ends as one `nix-hatch: …` line in the build log (Nix prints its tail)
//! and an exit status Nix understands.

use super::{Accepted, Builder};
use crate::executors::staging::{self, Staging};
use crate::executors::supervise::Cancel;
use crate::executors::{self, BuildRequest, Failure, Limits};
use crate::protocol::buildlog::{BuildLog, LogSink};
use crate::store::{self, ImportRequest, Registrar, StagedOutput};

pub struct RealBuilder;

impl Builder for RealBuilder {
    fn build(&self, a: Accepted<'_>) -> i32 {
        let mut log = BuildLog::from_nix();
        match build(&a, &mut log) {
            Ok(()) => 0,
            Err(f) => {
                log.line(&f.to_string());
                f.exit_code()
            }
        }
    }
}

/// Maps what Nix sent as wanted outputs to (name, path). Nix ≥ 2.4 sends
/// output names; older versions sent store paths.
pub fn wanted_outputs(a: &Accepted<'_>) -> Result<Vec<(String, String)>, Failure> {
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

fn build(a: &Accepted<'_>, log: &mut BuildLog) -> Result<(), Failure> {
    let internal = |e: String| Failure::Internal(e);
    let cancel =
        Cancel::install().map_err(|e| internal(format!("installing signal handlers: {e}")))?;
    let outputs = wanted_outputs(a)?;
    let location = a.store.clone();
    // Started now so its start-up cost overlaps the build.
    let registrar = Registrar::spawn(&location).map_err(|e| internal(e.to_string()))?;

    staging::remove_stale(&a.config.state_dir);
    let drv_base = a.store.base_name(&a.drv.path).unwrap_or("unknown.drv");
    let staging = Staging::create(&a.config.state_dir, drv_base)
        .map_err(|e| internal(format!("creating staging dir: {e}")))?;

    let paths: Vec<String> = outputs.iter().map(|(_, p)| p.clone()).collect();
    let removed =
        store::remove_stale_outputs(&location, &paths).map_err(|e| internal(e.to_string()))?;
    for p in removed {
        log.line(&format!("removed stale invalid leftover {p}"));
    }

    let limits = Limits::combine(
        a.settings.u64_or_zero("timeout"),
        a.executor.timeout,
        a.settings.u64_or_zero("max-silent-time"),
        a.executor.max_silent_time,
    );
    log.line(&format!(
        "building {} with executor {:?} ({}, slot {})",
        a.drv.path,
        a.executor.name,
        a.executor.kind.name(),
        a.slot.index
    ));
    let req = BuildRequest {
        drv: &a.drv,
        executor: a.executor,
        store: a.store,
        inputs: &a.job.inputs,
        outputs: &outputs,
        cores: a.settings.get("cores").unwrap_or("1").to_owned(),
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
    let ran = executors::run(&req, log, &cancel);
    crate::timing::mark("executor");
    // No process of the build is left (executors return only then): from
    // here on its account can neither reach nor change what it left.
    staging
        .take_back()
        .map_err(|e| internal(format!("taking the staging dir back: {e}")))?;
    if let Err(f) = ran {
        if a.settings.get("keep-failed") == Some("true") && !matches!(f, Failure::Cancelled) {
            match staging.keep() {
                Ok(p) => log.line(&format!("keeping build directory {}", p.display())),
                Err(e) => log.line(&format!("could not keep the build directory: {e}")),
            }
        }
        return Err(f);
    }
    if cancel.is_cancelled() {
        return Err(Failure::Cancelled);
    }

    // A partial rebuild (some outputs still valid) may refer to the valid
    // siblings; Nix never lists a derivation's own outputs as inputs.
    let siblings: Vec<&str> = a
        .drv
        .outputs
        .values()
        .map(|o| o.path.as_str())
        .filter(|p| !paths.iter().any(|w| w == p))
        .collect();
    let mut candidates = a.job.inputs.clone();
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
            staged: staging.output(a.store.base_name(path).unwrap_or(path)),
            fixed: a.drv.outputs.get(name).and_then(|o| o.fixed.clone()),
        })
        .collect();
    let registered = store::import(
        &ImportRequest {
            location: &location,
            deriver: &a.drv.path,
            inputs: &candidates,
            outputs: &staged,
            checks: &checks,
            owner: executors::output_owner(a.executor),
            deadline,
            max_size: a.executor.max_output_size,
        },
        registrar,
    )
    .map_err(|e| match e {
        store::ImportError::TimedOut { .. } => Failure::TimedOut(format!(
            "executor {:?}: {e}; timeout is {} seconds",
            a.executor.name,
            limits.timeout.unwrap_or_default().as_secs()
        )),
        e => Failure::Builder(e.to_string()),
    })?;
    crate::util::fault_point("after-register");
    for r in &registered {
        log.line(&format!(
            "registered {} ({} bytes, {} references)",
            r.path,
            r.nar_size,
            r.references.len()
        ));
    }
    if let Some(t) = crate::timing::report() {
        log.line(&format!("timing: {t}"));
    }
    Ok(())
}
