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
use super::{ImportError, StoreLocation};

/// Moves every entry of `upper` (the overlay's upper dir) that is a valid
/// store path, other than `outputs` (base names), into the real store.
/// Returns the paths moved.
pub fn adopt_added_paths(
    location: &StoreLocation,
    upper: &Path,
    outputs: &[&str],
) -> Result<Vec<String>, ImportError> {
    let Ok(entries) = std::fs::read_dir(upper) else {
        return Ok(Vec::new());
    };
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if outputs.contains(&name) || name.ends_with(".lock") || !looks_like_store_name(name) {
            continue;
        }
        // Overlay whiteouts (deletions) are character devices.
        if entry
            .file_type()
            .is_ok_and(|t| !(t.is_dir() || t.is_file() || t.is_symlink()))
        {
            continue;
        }
        candidates.push(format!("{}/{name}", location.store_dir));
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let invalid = invalid_paths(location, &refs)?;
    let mut moved = Vec::new();
    for path in candidates.iter().filter(|p| !invalid.contains(*p)) {
        let real = location.real_path(path)?;
        let name = path.rsplit('/').next().unwrap_or_default();
        if std::fs::symlink_metadata(&real).is_ok() {
            continue;
        }
        move_into_place(&upper.join(name), &real).map_err(|source| ImportError::Io {
            action: "move into place the store path the command added",
            path: path.clone(),
            source,
        })?;
        moved.push(path.clone());
    }
    Ok(moved)
}

/// `<32 nix-base32 chars>-<name>`.
fn looks_like_store_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 33 && b[32] == b'-' && b[..32].iter().all(|&c| super::refscan::is_base32(c))
}
