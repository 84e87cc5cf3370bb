//! A derivation's output checks (`allowedReferences`, `disallowedRequisites`,
//! structured attrs' `outputChecks.<output>.maxSize`, ...), applied to the
//! scanned outputs before anything is registered, with Nix's semantics and
//! messages: Nix runs them only for builds it does itself, not for builds
//! a hook returns.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{nixstore, ImportError, StoreLocation, StorePath};

/// The checks for one output. Reference specifiers are already resolved to
/// paths (an output name stands for that output's path); they stay text,
/// as the derivation wrote them: Nix only compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputChecks {
    /// Leave the output itself out of its requisites (always, for the
    /// checks of derivations without structured attrs).
    pub ignore_self_refs: bool,
    pub max_size: Option<u64>,
    pub max_closure_size: Option<u64>,
    /// `Some(empty)` allows no references at all; `None` allows any.
    pub allowed_references: Option<BTreeSet<String>>,
    pub allowed_requisites: Option<BTreeSet<String>>,
    pub disallowed_references: BTreeSet<String>,
    pub disallowed_requisites: BTreeSet<String>,
}

impl OutputChecks {
    fn needs_closure(&self) -> bool {
        self.max_closure_size.is_some()
            || self.allowed_requisites.is_some()
            || !self.disallowed_requisites.is_empty()
    }
}

/// What the checks need to know of a built output.
pub struct Built<'a> {
    pub name: &'a str,
    pub path: &'a StorePath,
    pub nar_size: u64,
    pub references: &'a BTreeSet<StorePath>,
}

/// Applies `checks` (by output name) to `built`; the first failure is the
/// error, worded as Nix words it.
pub fn check(
    location: &StoreLocation,
    checks: &BTreeMap<String, OutputChecks>,
    built: &[Built<'_>],
) -> Result<(), ImportError> {
    let by_path: BTreeMap<&str, &Built<'_>> = built.iter().map(|b| (b.path.as_str(), b)).collect();
    for b in built {
        let Some(c) = checks.get(b.name) else {
            continue;
        };
        let rejected = |message: String| ImportError::OutputRejected { message };
        if let Some(max) = c.max_size {
            if b.nar_size > max {
                return Err(rejected(format!(
                    "path '{}' is too large at {} bytes; limit is {max} bytes",
                    b.path, b.nar_size
                )));
            }
        }
        let closure = if c.needs_closure() {
            Some(closure(location, b.path, &by_path)?)
        } else {
            None
        };
        if let (Some(max), Some((_, size))) = (c.max_closure_size, &closure) {
            if *size > max {
                return Err(rejected(format!(
                    "closure of path '{}' is too large at {size} bytes; limit is {max} bytes",
                    b.path
                )));
            }
        }
        let requisites = closure.map(|(mut paths, _)| {
            if c.ignore_self_refs {
                paths.remove(b.path.as_str());
            }
            paths
        });
        let empty = BTreeSet::new();
        let requisites = requisites.as_ref().unwrap_or(&empty);
        let references: BTreeSet<String> = b.references.iter().map(|r| r.to_string()).collect();
        let bad_paths = |used: &BTreeSet<String>, spec: &BTreeSet<String>, allowed: bool| {
            used.iter()
                .filter(|p| spec.contains(*p) != allowed)
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut bad = Vec::new();
        if let Some(spec) = &c.allowed_references {
            bad = bad_paths(&references, spec, true);
        }
        if bad.is_empty() {
            if let Some(spec) = &c.allowed_requisites {
                bad = bad_paths(requisites, spec, true);
            }
        }
        if bad.is_empty() {
            bad = bad_paths(&references, &c.disallowed_references, false);
        }
        if bad.is_empty() {
            bad = bad_paths(requisites, &c.disallowed_requisites, false);
        }
        if !bad.is_empty() {
            let list: String = bad.iter().map(|p| format!("\n  {p}")).collect();
            return Err(rejected(format!(
                "output '{}' is not allowed to refer to the following paths:{list}",
                b.path
            )));
        }
    }
    Ok(())
}

/// The closure of the built output `path` (itself included) and its NAR
/// size: through the outputs of this build, then the store (one
/// `nix-store --query --requisites` and one `--size` for what lies beyond).
fn closure(
    location: &StoreLocation,
    path: &str,
    built: &BTreeMap<&str, &Built<'_>>,
) -> Result<(BTreeSet<String>, u64), ImportError> {
    let mut done = BTreeSet::new();
    let mut size = 0u64;
    let mut outside = BTreeSet::new();
    let mut left = VecDeque::from([path.to_owned()]);
    while let Some(p) = left.pop_front() {
        if !done.insert(p.clone()) {
            continue;
        }
        match built.get(p.as_str()) {
            Some(b) => {
                size = size.saturating_add(b.nar_size);
                left.extend(b.references.iter().map(|r| r.to_string()));
            }
            None => {
                done.remove(&p);
                outside.insert(p);
            }
        }
    }
    if outside.is_empty() {
        return Ok((done, size));
    }
    let args: Vec<&str> = outside.iter().map(String::as_str).collect();
    let requisites = query(location, "--requisites", &args)?;
    let args: Vec<&str> = requisites.iter().map(String::as_str).collect();
    for line in query(location, "--size", &args)? {
        size = size.saturating_add(line.parse::<u64>().unwrap_or(0));
    }
    done.extend(requisites);
    Ok((done, size))
}

/// `nix-store --query <what> paths...`, one result per output line.
fn query(location: &StoreLocation, what: &str, paths: &[&str]) -> Result<Vec<String>, ImportError> {
    nixstore::lines_of(
        location,
        &["--query", what],
        paths,
        "query the closure of the references",
    )
}
