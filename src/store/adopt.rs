//! Store paths a `host` command added through the local store while it ran.
//!
//! The host executor shows the command the store through an overlay whose
//! writes land in staging, so that `$out` can be the real path. A root
//! command that adds to the store directly (not through the daemon)
//! registers the path in the real database while its files land in the
//! overlay; those paths are moved into the real store afterwards, so the
//! database never lists a path that doesn't exist.

use std::path::Path;

use super::fsops::move_into_place;
use super::nixstore::invalid_paths;
use super::{ImportError, StoreLocation, StorePath};

/// What [`adopt_added_paths`] did.
#[derive(Debug, Default)]
pub struct Adoption {
    /// Paths moved into the real store.
    pub moved: Vec<StorePath>,
    /// One line per valid path that could not be moved: the database lists
    /// it, its files are still in the staging dir.
    pub failed: Vec<String>,
}

/// Moves every entry of `upper` (the overlay's upper dir) that is a valid
/// store path, other than `outputs` (base names), into the real store. A
/// path that fails does not stop the others.
pub fn adopt_added_paths(
    location: &StoreLocation,
    upper: &Path,
    outputs: &[&str],
) -> Result<Adoption, ImportError> {
    let mut done = Adoption::default();
    let Ok(entries) = std::fs::read_dir(upper) else {
        return Ok(done);
    };
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if outputs.contains(&name) || name.ends_with(".lock") {
            continue;
        }
        // Only names Nix takes as store paths: one it refuses would make
        // the validity check below fail for all of them.
        let Ok(path) = location.parse_path(&format!("{}/{name}", location.store_dir)) else {
            continue;
        };
        let real = location.real_path(&path);
        // Overlay whiteouts (deletions) are character devices.
        if entry
            .file_type()
            .is_ok_and(|t| !(t.is_dir() || t.is_file() || t.is_symlink()))
        {
            continue;
        }
        candidates.push((path, entry.path(), real));
    }
    if candidates.is_empty() {
        return Ok(done);
    }
    let refs: Vec<&str> = candidates.iter().map(|(p, _, _)| p.as_str()).collect();
    let invalid = invalid_paths(location, &refs)?;
    for (path, staged, real) in candidates
        .iter()
        .filter(|(p, _, _)| !invalid.contains(p.as_str()))
    {
        if std::fs::symlink_metadata(real).is_ok() {
            continue;
        }
        match move_into_place(staged, real) {
            Ok(_) => done.moved.push(path.clone()),
            // Another hook adopted the same path meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => done.failed.push(format!(
                "cannot move {path}, which the command added to the store, into place: {e}"
            )),
        }
    }
    Ok(done)
}
