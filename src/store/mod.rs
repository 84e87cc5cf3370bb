//! Turning a finished build into valid store paths (docs/architecture.md,
//! "The accepted build").
//!
//! [`import`] takes the outputs an executor left in its staging area and:
//!
//! 1. checks that every wanted output exists;
//! 2. reads each output exactly once: the NAR serialisation ([`nar`]) feeds
//!    SHA-256 (narHash, narSize), the fixed-output hash if any, and the
//!    reference scanner ([`refscan`]) looking for the hash parts of the input
//!    closure and of all outputs ([`digest`]). While reading, the tree is
//!    *sealed* (owner = effective user, modes 0444/0555 as Nix canonicalises
//!    them) so nobody else can modify it once it is visible in the store;
//! 3. verifies fixed-output hashes (flat or recursive) and that fixed outputs
//!    reference nothing;
//! 4. removes stale *invalid* leftovers at the output paths (never a valid
//!    path) and moves each output into place (`rename(2)`, copy across file
//!    systems);
//! 5. registers all outputs in one `nix-store --register-validity
//!    --hash-given` call through a [`Registrar`] started ahead of time.
//!
//! Nix holds the output locks while the hook runs, so registration through
//! the daemon would deadlock; `--register-validity` takes no lock.
//!
//! Errors: one `thiserror` enum, [`ImportError`], for everything here
//! (callers tell a timeout or a valid path in the way from the rest); the
//! NAR walk's [`nar::NarError`] travels inside it.

mod adopt;
pub mod checks;
pub mod digest;
mod fsops;
pub mod nar;
mod nixstore;
mod path;
pub mod refscan;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix_derivation::{CAHash, HashAlgorithm, NixHash};

pub use adopt::adopt_added_paths;
pub use fsops::{apparent_size, defuse_tree, remove_tree};
pub use nixstore::Registrar;
pub use path::StorePath;

use digest::ExtraHash;
use nar::{DumpOptions, NarError, NarErrorKind, NodeKind};
use refscan::HashParts;

/// Where the store lives and how to reach `nix-store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    /// Logical store directory, e.g. `/nix/store`.
    pub store_dir: String,
    /// On-disk store directory (differs for `local?root=/x`: `/x/nix/store`).
    pub real_store_dir: PathBuf,
    /// Passed to `nix-store` as `--store URI` when set.
    pub store_uri: Option<String>,
    /// The `nix-store` binary (`nix-store`, found through `PATH`, by default).
    pub nix_store: PathBuf,
}

impl StoreLocation {
    /// The system store `/nix/store`, as `nix-store` opens it by default.
    #[must_use]
    pub fn system() -> Self {
        StoreLocation {
            store_dir: "/nix/store".into(),
            real_store_dir: PathBuf::from("/nix/store"),
            store_uri: None,
            nix_store: PathBuf::from("nix-store"),
        }
    }

    /// A local store whose root is `root` (`local?root=ROOT`): logical paths
    /// under `/nix/store`, files under `ROOT/nix/store`.
    #[must_use]
    pub fn with_root(root: &Path) -> Self {
        StoreLocation {
            store_dir: "/nix/store".into(),
            real_store_dir: root.join("nix/store"),
            store_uri: Some(format!("local?root={}", root.display())),
            nix_store: PathBuf::from("nix-store"),
        }
    }

    fn dir(&self) -> &str {
        match self.store_dir.trim_end_matches('/') {
            "" => "/",
            d => d,
        }
    }

    /// The store Nix's `store` setting names (`auto`, `local`, `daemon`,
    /// `/root`, `local?root=/root`, …), with the logical store dir from
    /// `NIX_STORE_DIR` (default `/nix/store`).
    pub fn from_setting(setting: Option<&str>) -> Self {
        let store_dir = std::env::var("NIX_STORE_DIR")
            .ok()
            .filter(|d| d.starts_with('/'))
            .unwrap_or_else(|| "/nix/store".to_owned());
        let setting = setting.unwrap_or("auto").trim();
        let mut root: Option<&str> = None;
        let mut store_uri = None;
        if setting.starts_with('/') {
            root = Some(setting);
            store_uri = Some(setting.to_owned());
        } else if let Some(query) = setting.strip_prefix("local?") {
            root = query.split('&').find_map(|kv| kv.strip_prefix("root="));
            store_uri = Some(setting.to_owned());
        }
        let real_store_dir = match root {
            Some(r) => PathBuf::from(format!("{}{store_dir}", r.trim_end_matches('/'))),
            None => PathBuf::from(&store_dir),
        };
        StoreLocation {
            store_dir,
            real_store_dir,
            store_uri,
            nix_store: PathBuf::from("nix-store"),
        }
    }

    /// The name of an entry directly in this store's directory, not
    /// checked any further: for telling store paths from other words in a
    /// `.drv` (a path that crosses modules is a [`StorePath`]).
    pub fn base_name<'a>(&self, path: &'a str) -> Option<&'a str> {
        path.strip_prefix(self.dir())?
            .strip_prefix('/')
            .filter(|b| !b.is_empty() && !b.contains('/'))
    }

    /// The store dir as nix-derivation needs it.
    pub fn logical_dir(
        &self,
    ) -> Result<nix_derivation::StoreDir, nix_derivation::store_path::Error> {
        nix_derivation::StoreDir::new(self.store_dir.clone())
    }
}

/// One output as the executor left it.
#[derive(Debug, Clone)]
pub struct StagedOutput {
    /// Output name, e.g. `out`.
    pub name: String,
    /// Its store path.
    pub path: StorePath,
    /// Where the builder left it: a regular file, directory or symlink.
    pub staged: PathBuf,
    /// Fixed-output expectation (flat or recursive).
    pub fixed: Option<CAHash>,
}

/// What [`import`] needs to know.
#[derive(Debug, Clone, Copy)]
pub struct ImportRequest<'a> {
    /// The store.
    pub location: &'a StoreLocation,
    /// The `.drv` (registered as the deriver), if there is one.
    pub deriver: Option<&'a StorePath>,
    /// The input closure as Nix sent it. Include already-valid sibling
    /// outputs here so references to them are found.
    pub inputs: &'a [StorePath],
    /// The outputs Nix wants; all must be produced.
    pub outputs: &'a [StagedOutput],
    /// The derivation's output checks, by output name (see [`checks`]).
    pub checks: &'a BTreeMap<String, checks::OutputChecks>,
    /// The uid the build ran as: output files may be owned by it or by us,
    /// nobody else (see [`nar::DumpOptions::owner`]).
    pub owner: Option<u32>,
    /// The build's `timeout` covers its import too: reading stops here.
    pub deadline: Option<std::time::Instant>,
    /// Set when the hook is told to stop (SIGTERM): reading stops, and
    /// nothing that was not in the store yet is left there.
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
    /// NAR bytes all outputs together may have (`max-output-size`).
    pub max_size: Option<u64>,
    /// Gets the file content bytes read added as they are read.
    pub progress: Option<&'a std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// A registered output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The store path.
    pub path: StorePath,
    /// SHA-256 of its NAR.
    pub nar_hash: [u8; 32],
    /// Size of its NAR.
    pub nar_size: u64,
    /// Store paths it references (inputs, other outputs, itself).
    pub references: BTreeSet<StorePath>,
}

/// Why an import (or stale-path removal) failed. `Display` gives one line
/// (the fixed-output hash mismatch uses Nix's three-line form).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// A path is not a store path of this store (or is listed twice).
    #[error("invalid store path '{path}': {reason}")]
    BadPath {
        /// The offending path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two different candidate paths share a hash part.
    #[error("store paths '{first}' and '{second}' have the same hash part")]
    HashPartCollision {
        /// One path.
        first: String,
        /// The other.
        second: String,
    },
    /// The builder did not produce an output.
    #[error("builder did not produce output `{output}` ({path})")]
    MissingOutput {
        /// Output name.
        output: String,
        /// Its store path.
        path: String,
    },
    /// Reading an output failed (unsupported file type, I/O error, ...).
    #[error("output `{output}`: {}", error.display_with_root(path))]
    Archive {
        /// Output name.
        output: String,
        /// Its store path; the error names the entry below it.
        path: String,
        /// What happened.
        #[source]
        error: NarError,
    },
    /// A flat fixed output is not a non-executable regular file.
    #[error(
        "output path '{path}' should be a non-executable regular file since recursive \
         hashing is not enabled (outputHashMode=flat)"
    )]
    FlatNotRegular {
        /// The output's store path.
        path: String,
    },
    /// A fixed output uses text or Git content addressing.
    #[error(
        "output `{output}` ({path}) uses {method} content addressing \
         (outputHashMode={method}), which nix-hatch does not support"
    )]
    UnsupportedContentAddress {
        /// Output name.
        output: String,
        /// Its store path.
        path: String,
        /// `text` or `git`.
        method: &'static str,
    },
    /// A fixed output's hash differs from the declared one.
    #[error("hash mismatch in fixed-output derivation '{drv}':\n  specified: {specified}\n     got:    {got}")]
    HashMismatch {
        /// The derivation.
        drv: String,
        /// Declared hash, SRI form.
        specified: String,
        /// Actual hash, SRI form.
        got: String,
    },
    /// A fixed output contains references.
    #[error(
        "illegal path references in fixed-output derivation '{drv}': output `{output}` \
         references {} store path(s), e.g. '{}'",
        references.len(),
        references.iter().next().map_or("", String::as_str)
    )]
    IllegalReferences {
        /// The derivation.
        drv: String,
        /// Output name.
        output: String,
        /// The paths referenced.
        references: BTreeSet<String>,
    },
    /// Two outputs reference each other (directly or indirectly).
    #[error(
        "cycle detected in build of '{drv}' in the references of output '{output}' \
         from output '{from}'"
    )]
    ReferenceCycle {
        /// The derivation.
        drv: String,
        /// Output on the cycle.
        output: String,
        /// The output it was reached from.
        from: String,
    },
    /// Something valid already exists at an output path.
    #[error("output path '{path}' is already a valid store path; refusing to replace it")]
    AlreadyValid {
        /// The store path.
        path: String,
    },
    /// A file system operation failed.
    #[error("cannot {action} '{path}': {source}")]
    Io {
        /// The verb, e.g. `remove the stale path`.
        action: &'static str,
        /// The path acted upon.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// `nix-store` could not be started.
    #[error("cannot run '{}': {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `nix-store` failed.
    #[error("nix-store failed to {action}: {message}")]
    NixStore {
        /// What it was asked to do.
        action: &'static str,
        /// Its last error line.
        message: String,
    },
    /// An output check of the derivation failed (Nix's own message).
    #[error("{message}")]
    OutputRejected {
        /// The message.
        message: String,
    },
    /// The build's deadline passed during the import.
    #[error("build timed out while its output '{path}' was being read into the store")]
    TimedOut {
        /// The store path being read.
        path: String,
    },
    /// The hook was told to stop during the import.
    #[error("stopped while the outputs were being read into the store: the hook was told to stop")]
    Cancelled,
    /// The outputs are larger than `max-output-size`.
    #[error("the outputs are larger than max-output-size: at least {at_least} bytes, the limit is {limit} (NAR bytes)")]
    TooLarge {
        /// The limit (NAR bytes).
        limit: u64,
        /// What the outputs have at least (file sizes, or NAR bytes so far).
        at_least: u64,
    },
}

/// Remove leftovers at `paths` (logical store paths): those that exist on
/// disk are checked with one `nix-store --check-validity --print-invalid`
/// call; if any of them is valid, nothing is removed and
/// [`ImportError::AlreadyValid`] is returned; otherwise they are removed
/// (read-only trees included). Returns the paths removed.
pub fn remove_stale_outputs(
    location: &StoreLocation,
    paths: &[StorePath],
) -> Result<Vec<StorePath>, ImportError> {
    let mut existing = Vec::new();
    for path in paths {
        let real = location.real_path(path);
        match std::fs::symlink_metadata(&real) {
            Ok(_) => existing.push((path, real)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ImportError::Io {
                    action: "inspect",
                    path: real.display().to_string(),
                    source,
                })
            }
        }
    }
    if existing.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = existing.iter().map(|(p, _)| p.as_str()).collect();
    let invalid = nixstore::invalid_paths(location, &names)?;
    if let Some((valid, _)) = existing.iter().find(|(p, _)| !invalid.contains(p.as_str())) {
        return Err(ImportError::AlreadyValid {
            path: valid.to_string(),
        });
    }
    let mut removed = Vec::new();
    for (path, real) in existing {
        remove_tree(&real).map_err(|source| ImportError::Io {
            action: "remove the stale path",
            path: real.display().to_string(),
            source,
        })?;
        removed.push(path.clone());
    }
    Ok(removed)
}

/// The already-valid outputs of a derivation among `siblings` (logical
/// store paths of outputs Nix did not ask for): a partial rebuild's outputs
/// may refer to them, so they are reference candidates like the inputs.
/// One `nix-store` call, none when `siblings` is empty.
pub fn valid_siblings(
    location: &StoreLocation,
    siblings: &[&StorePath],
) -> Result<Vec<StorePath>, ImportError> {
    let names: Vec<&str> = siblings.iter().map(|p| p.as_str()).collect();
    let invalid = nixstore::invalid_paths(location, &names)?;
    Ok(siblings
        .iter()
        .filter(|p| !invalid.contains(p.as_str()))
        .map(|p| (*p).clone())
        .collect())
}

/// Whether two paths name the same existing file (same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Import the staged outputs of one build into the store and register them
/// valid through `registrar` (see the module documentation). Returns one
/// [`Registered`] per output, in request order.
///
/// Reference candidates are `inputs` plus all outputs; the deriver is
/// recorded as such but is not a candidate (as in Nix). Each staged tree is
/// sealed while it is read (see [`nar::DumpOptions::seal`]), so after a
/// failed import it may be read-only: clean up with [`remove_tree`]. On error
/// nothing is registered; outputs already moved into the store stay there as
/// invalid paths (removed by the next [`remove_stale_outputs`] or by Nix).
pub fn import<'a>(
    req: &ImportRequest<'a>,
    mut registrar: Registrar,
) -> Result<Vec<Registered>, ImportError> {
    let location = req.location;

    // Candidates for the reference scan: inputs, then outputs.
    let mut parts = HashParts::new([]);
    let mut candidates: Vec<&StorePath> = Vec::new();
    let mut add = |path: &'a StorePath| -> Result<usize, ImportError> {
        let i = parts.insert(path.hash_part());
        if i == candidates.len() {
            candidates.push(path);
        } else if candidates[i] != path {
            return Err(ImportError::HashPartCollision {
                first: candidates[i].to_string(),
                second: path.to_string(),
            });
        }
        Ok(i)
    };
    for input in req.inputs {
        add(input)?;
    }
    let mut output_index = Vec::with_capacity(req.outputs.len());
    let mut seen = HashSet::new();
    for o in req.outputs {
        if !seen.insert(o.path.as_str()) {
            return Err(ImportError::BadPath {
                path: o.path.to_string(),
                reason: "listed as more than one output",
            });
        }
        output_index.push(add(&o.path)?);
    }
    let candidates = candidates;

    // Every output exists; refused before anything is read when the file
    // sizes alone exceed the limit (a NAR is never smaller).
    let mut total = 0u64;
    for o in req.outputs {
        output_metadata(o, &o.staged)?;
        if let Some(limit) = req.max_size {
            total = total.saturating_add(fsops::apparent_size(&o.staged).map_err(|source| {
                ImportError::Io {
                    action: "measure the staged output",
                    path: o.staged.display().to_string(),
                    source,
                }
            })?);
            if total > limit {
                return Err(ImportError::TooLarge {
                    limit,
                    at_least: total,
                });
            }
        }
    }
    let reals: Vec<PathBuf> = req
        .outputs
        .iter()
        .map(|o| location.real_path(&o.path))
        .collect();
    // What is hashed is what goes into the store: an output that must be
    // copied to another file system is copied first and read at its store
    // path (a copy made after hashing would read the staged files again).
    let mut placed = Placed {
        location,
        paths: Vec::new(),
    };
    let reads = copy_across_file_systems(req, &reals, &mut registrar, &mut placed)?;

    // 1. Fixed-output preconditions.
    let mut extras: Vec<Option<ExtraHash>> = Vec::with_capacity(req.outputs.len());
    for (o, read) in req.outputs.iter().zip(&reads) {
        let md = output_metadata(o, read)?;
        extras.push(match &o.fixed {
            None => None,
            Some(CAHash::Flat(h)) => {
                if !md.file_type().is_file() || md.mode() & 0o100 != 0 {
                    return Err(ImportError::FlatNotRegular {
                        path: o.path.to_string(),
                    });
                }
                Some(ExtraHash::flat(h.algorithm(), md.len()))
            }
            Some(CAHash::Nar(h)) => match h.algorithm() {
                HashAlgorithm::Sha256 => None,
                algorithm => Some(ExtraHash::nar(algorithm)),
            },
            Some(ca @ (CAHash::Text(_) | CAHash::Git(_))) => {
                return Err(ImportError::UnsupportedContentAddress {
                    output: o.name.clone(),
                    path: o.path.to_string(),
                    method: if matches!(ca, CAHash::Text(_)) {
                        "text"
                    } else {
                        "git"
                    },
                })
            }
        });
    }

    // 2. One pass per output; 3. fixed-output checks.
    let drv = match req.deriver {
        Some(d) => d.as_str(),
        None => req.outputs.first().map_or("", |o| o.path.as_str()),
    };
    let mut digests = Vec::with_capacity(req.outputs.len());
    let mut used = 0u64;
    for ((o, extra), read) in req.outputs.iter().zip(&extras).zip(&reads) {
        let options = DumpOptions {
            seal: true,
            // A copy made here is ours, whoever built the original.
            owner: if *read == o.staged { req.owner } else { None },
            deadline: req.deadline,
            cancel: req.cancel,
            max_size: req.max_size.map(|m| m.saturating_sub(used)),
            progress: req.progress.cloned(),
        };
        let d =
            digest::digest_path(read, &parts, extra.as_ref(), &options).map_err(
                |error| match error.kind {
                    NarErrorKind::TimedOut => ImportError::TimedOut {
                        path: o.path.to_string(),
                    },
                    NarErrorKind::Cancelled => ImportError::Cancelled,
                    NarErrorKind::TooLarge { .. } => ImportError::TooLarge {
                        limit: req.max_size.unwrap_or(0),
                        at_least: req.max_size.unwrap_or(0).saturating_add(1),
                    },
                    _ => ImportError::Archive {
                        output: o.name.clone(),
                        path: o.path.to_string(),
                        error,
                    },
                },
            )?;
        used = used.saturating_add(d.nar_size);
        if let Some(wanted) = &o.fixed {
            let got = match wanted {
                CAHash::Flat(_) => match (d.root, extra) {
                    (
                        NodeKind::Regular {
                            executable: false,
                            size,
                        },
                        Some(e),
                    ) if e.range.end - e.range.start == size => d.extra.clone(),
                    _ => {
                        return Err(ImportError::Archive {
                            output: o.name.clone(),
                            path: o.path.to_string(),
                            error: NarError {
                                path: Vec::new(),
                                kind: NarErrorKind::Changed,
                            },
                        })
                    }
                },
                _ => match extra {
                    None => Some(NixHash::Sha256(d.nar_hash)),
                    Some(_) => d.extra.clone(),
                },
            };
            let wanted = wanted.hash();
            let Some(got) = got else {
                return Err(ImportError::Archive {
                    output: o.name.clone(),
                    path: o.path.to_string(),
                    error: NarError {
                        path: Vec::new(),
                        kind: NarErrorKind::Changed,
                    },
                });
            };
            if got != wanted {
                return Err(ImportError::HashMismatch {
                    drv: drv.to_owned(),
                    specified: wanted.to_sri_string(),
                    got: got.to_sri_string(),
                });
            }
            if !d.references.is_empty() {
                return Err(ImportError::IllegalReferences {
                    drv: drv.to_owned(),
                    output: o.name.clone(),
                    references: d
                        .references
                        .iter()
                        .map(|&i| candidates[i].to_string())
                        .collect(),
                });
            }
        }
        digests.push(d);
    }

    // Outputs referencing each other in a cycle can't be registered.
    check_output_cycles(req, drv, &output_index, &digests)?;
    let references: Vec<BTreeSet<StorePath>> = digests
        .iter()
        .map(|d| {
            d.references
                .iter()
                .map(|&i| candidates[i].clone())
                .collect()
        })
        .collect();
    if !req.checks.is_empty() {
        let built: Vec<checks::Built<'_>> = req
            .outputs
            .iter()
            .zip(&digests)
            .zip(&references)
            .map(|((o, d), refs)| checks::Built {
                name: &o.name,
                path: &o.path,
                nar_size: d.nar_size,
                references: refs,
            })
            .collect();
        checks::check(location, req.checks, &built)?;
    }

    // 4. Stale leftovers, then move into place (unless the executor already
    // built in place). Nothing goes into the store if registration can't
    // happen.
    registrar.ensure_running()?;
    let to_move: Vec<usize> = (0..req.outputs.len())
        .filter(|&i| !same_file(&reads[i], &reals[i]))
        .collect();
    let stale: Vec<StorePath> = to_move
        .iter()
        .map(|&i| req.outputs[i].path.clone())
        .collect();
    remove_stale_outputs(location, &stale)?;
    for &i in &to_move {
        fsops::move_into_place(&req.outputs[i].staged, &reals[i]).map_err(|source| {
            ImportError::Io {
                action: "move the output into place at",
                path: reals[i].display().to_string(),
                source,
            }
        })?;
        placed.paths.push(req.outputs[i].path.clone());
    }

    crate::util::fault_point("mid-import");

    // 5. Register everything in one call.
    let mut records = String::new();
    let mut registered = Vec::with_capacity(req.outputs.len());
    for ((o, d), references) in req.outputs.iter().zip(&digests).zip(references) {
        nixstore::append_record(
            &mut records,
            &o.path,
            &d.nar_hash,
            d.nar_size,
            req.deriver.map_or("", StorePath::as_str),
            &references,
        );
        registered.push(Registered {
            path: o.path.clone(),
            nar_hash: d.nar_hash,
            nar_size: d.nar_size,
            references,
        });
    }
    crate::timing::mark("import");
    registrar.register(records.as_bytes())?;
    placed.paths.clear();
    crate::timing::mark("register");
    Ok(registered)
}

/// Outputs this import put at their store paths (copied there from
/// another file system, or moved): removed again if the import fails or is
/// stopped before they are registered, so that it leaves nothing in the
/// store. Only invalid paths are removed (see [`remove_stale_outputs`]).
struct Placed<'a> {
    location: &'a StoreLocation,
    paths: Vec<StorePath>,
}

impl Drop for Placed<'_> {
    fn drop(&mut self) {
        if !self.paths.is_empty() {
            let _ = remove_stale_outputs(self.location, &self.paths);
        }
    }
}

/// The metadata of output `o` where it is read from (`at`); a missing one
/// is the builder's fault.
fn output_metadata(o: &StagedOutput, at: &Path) -> Result<std::fs::Metadata, ImportError> {
    std::fs::symlink_metadata(at).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImportError::MissingOutput {
                output: o.name.clone(),
                path: o.path.to_string(),
            }
        } else {
            ImportError::Io {
                action: "inspect the staged output",
                path: at.display().to_string(),
                source: e,
            }
        }
    })
}

/// Copies each output whose staging dir is on another file system than
/// the store to its store path (after removing a stale invalid leftover
/// there), and returns where each output is to be read: its store path
/// when copied, else where it was staged.
fn copy_across_file_systems(
    req: &ImportRequest<'_>,
    reals: &[PathBuf],
    registrar: &mut Registrar,
    placed: &mut Placed<'_>,
) -> Result<Vec<PathBuf>, ImportError> {
    let store_dev = std::fs::metadata(&req.location.real_store_dir)
        .map_err(|source| ImportError::Io {
            action: "inspect the store directory",
            path: req.location.real_store_dir.display().to_string(),
            source,
        })?
        .dev();
    let mut reads = Vec::with_capacity(req.outputs.len());
    for (o, real) in req.outputs.iter().zip(reals) {
        let staged_dev = o
            .staged
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.dev());
        if staged_dev.is_none_or(|d| d == store_dev) || same_file(&o.staged, real) {
            reads.push(o.staged.clone());
            continue;
        }
        // Nothing goes into the store if registration can't happen.
        registrar.ensure_running()?;
        remove_stale_outputs(req.location, std::slice::from_ref(&o.path))?;
        fsops::copy_tree(&o.staged, real, req.deadline, req.cancel, req.max_size).map_err(
            |source| {
                if source.kind() == io::ErrorKind::FileTooLarge {
                    ImportError::TooLarge {
                        limit: req.max_size.unwrap_or(0),
                        at_least: req.max_size.unwrap_or(0).saturating_add(1),
                    }
                } else if source.kind() == io::ErrorKind::TimedOut {
                    ImportError::TimedOut {
                        path: o.path.to_string(),
                    }
                } else if source.kind() == io::ErrorKind::Interrupted {
                    ImportError::Cancelled
                } else {
                    ImportError::Io {
                        action: "copy the output into place at",
                        path: real.display().to_string(),
                        source,
                    }
                }
            },
        )?;
        placed.paths.push(o.path.clone());
        // The staged tree is not needed any more; what is left of it goes
        // with the staging dir.
        let _ = remove_tree(&o.staged);
        reads.push(real.clone());
    }
    Ok(reads)
}

/// Fail like Nix if outputs reference each other in a cycle (self-references
/// are fine).
fn check_output_cycles(
    req: &ImportRequest<'_>,
    drv: &str,
    output_index: &[usize],
    digests: &[digest::TreeDigest],
) -> Result<(), ImportError> {
    let n = req.outputs.len();
    // edges[i] = outputs j != i that output i references.
    let edges: Vec<Vec<usize>> = digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (0..n)
                .filter(|&j| j != i && d.references.binary_search(&output_index[j]).is_ok())
                .collect()
        })
        .collect();
    // Iterative DFS with colours: 0 = new, 1 = on stack, 2 = done.
    let mut colour = vec![0u8; n];
    for start in 0..n {
        if colour[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        colour[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&child) = edges[node].get(*next) {
                *next += 1;
                match colour[child] {
                    0 => {
                        colour[child] = 1;
                        stack.push((child, 0));
                    }
                    1 => {
                        return Err(ImportError::ReferenceCycle {
                            drv: drv.to_owned(),
                            output: req.outputs[child].name.clone(),
                            from: req.outputs[node].name.clone(),
                        })
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}
