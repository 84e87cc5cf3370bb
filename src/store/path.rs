//! Store paths as they travel between modules: parsed once where they
//! enter nix-hatch (a `.drv`'s outputs, the input closure Nix sends after
//! `# accept`, a name found in the store), then passed as [`StorePath`].
//!
//! A [`StorePath`] pairs nix-derivation's parsed path with its rendering
//! in the store it belongs to: nix-derivation's own `Display` always says
//! `/nix/store`, while a store may have another logical directory
//! (`NIX_STORE_DIR`, the tests' private stores). Everything that shows or
//! passes on the path as text uses that rendering.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::path::Path;

use super::refscan::{self, HASH_PART_LEN};
use super::{ImportError, StoreLocation};

/// Longest name Nix allows after `<hash>-`.
const MAX_NAME_LEN: usize = 211;

/// A store path `<store dir>/<hash>-<name>`, checked the way Nix checks
/// one. Compares, hashes and orders as its text (so sets and maps of
/// paths keep the order Nix and nix-hatch always listed them in), and
/// derefs to it: a `&StorePath` goes where a `&str` path went.
#[derive(Clone)]
pub struct StorePath {
    /// The path as its store renders it.
    full: String,
    /// Where `<hash>-<name>` starts in `full`.
    base: usize,
    parsed: nix_derivation::StorePath,
}

impl StorePath {
    /// The absolute path, e.g. `/nix/store/<hash>-<name>`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// `<hash>-<name>`, the path's entry in the store directory.
    #[must_use]
    pub fn base_name(&self) -> &str {
        &self.full[self.base..]
    }

    /// The part after `<hash>-`.
    #[must_use]
    pub fn name(&self) -> &str {
        self.parsed.name()
    }

    /// The 32 nix-base32 characters of the hash part, as the reference
    /// scanner looks for them.
    #[must_use]
    pub fn hash_part(&self) -> [u8; HASH_PART_LEN] {
        let mut part = [0; HASH_PART_LEN];
        part.copy_from_slice(&self.base_name().as_bytes()[..HASH_PART_LEN]);
        part
    }

    /// nix-derivation's form of the path (its `Display` says `/nix/store`).
    #[must_use]
    pub fn parsed(&self) -> &nix_derivation::StorePath {
        &self.parsed
    }
}

impl StoreLocation {
    /// `path` as a store path of this store, checked the way Nix parses
    /// store paths: directly in the store directory, `<hash>-<name>` with
    /// a nix-base32 hash part and a name of at most 211 of Nix's
    /// characters. A name may start with a period (newer Nix; Nix 2.8
    /// refused them) unless it is `.` or `..` or starts with `.-` or `..-`.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, ImportError> {
        let bad = |reason| ImportError::BadPath {
            path: path.to_owned(),
            reason,
        };
        let store_dir = self.dir();
        let base_name = path
            .strip_prefix(store_dir)
            .and_then(|rest| {
                if store_dir.ends_with('/') {
                    Some(rest)
                } else {
                    rest.strip_prefix('/')
                }
            })
            .ok_or_else(|| bad("not in the store directory"))?;
        if base_name.contains('/') {
            return Err(bad("not a top-level store path"));
        }
        let bytes = base_name.as_bytes();
        if bytes.len() < HASH_PART_LEN + 2 || bytes[HASH_PART_LEN] != b'-' {
            return Err(bad("expected <hash>-<name>"));
        }
        if refscan::parse_hash_part(&bytes[..HASH_PART_LEN]).is_none() {
            return Err(bad("the hash part is not nix-base32"));
        }
        let name = &bytes[HASH_PART_LEN + 1..];
        if name.len() > MAX_NAME_LEN {
            return Err(bad("the name is too long"));
        }
        // Newer Nix (2.8 refused any leading period) allows names such as
        // `.config`; only these would be confusable with `.` and `..`.
        if name == b"." || name == b".." || name.starts_with(b".-") || name.starts_with(b"..-") {
            return Err(bad("the name is '.' or '..' or starts with '.-' or '..-'"));
        }
        if !name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
        {
            return Err(bad("the name contains a forbidden character"));
        }
        // nix-derivation accepts exactly these names and hash parts (32
        // nix-base32 characters are 160 bits, never a bad encoding); should
        // it ever refuse one, so do we.
        let parsed = nix_derivation::StorePath::from_basename(bytes)
            .map_err(|_| bad("nix-derivation refuses it"))?;
        Ok(StorePath {
            full: path.to_owned(),
            base: path.len() - base_name.len(),
            parsed,
        })
    }

    /// [`parse_path`](Self::parse_path) for each of `paths`; the first bad
    /// one is the error.
    pub fn parse_paths(&self, paths: &[String]) -> Result<Vec<StorePath>, ImportError> {
        paths.iter().map(|p| self.parse_path(p)).collect()
    }

    /// Where the store path `path` lives on disk.
    #[must_use]
    pub fn real_path(&self, path: &StorePath) -> std::path::PathBuf {
        self.real_store_dir.join(path.base_name())
    }
}

impl Deref for StorePath {
    type Target = str;

    fn deref(&self) -> &str {
        &self.full
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl AsRef<[u8]> for StorePath {
    fn as_ref(&self) -> &[u8] {
        self.full.as_bytes()
    }
}

impl AsRef<OsStr> for StorePath {
    fn as_ref(&self) -> &OsStr {
        OsStr::new(&self.full)
    }
}

impl AsRef<Path> for StorePath {
    fn as_ref(&self) -> &Path {
        Path::new(&self.full)
    }
}

impl Borrow<str> for StorePath {
    fn borrow(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.full, f)
    }
}

impl PartialEq for StorePath {
    fn eq(&self, other: &Self) -> bool {
        self.full == other.full
    }
}

impl Eq for StorePath {}

impl PartialEq<str> for StorePath {
    fn eq(&self, other: &str) -> bool {
        self.full == other
    }
}

impl PartialEq<String> for StorePath {
    fn eq(&self, other: &String) -> bool {
        &self.full == other
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        self.full.cmp(&other.full)
    }
}

impl Hash for StorePath {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.full.hash(state);
    }
}
