//! Running `nix-store`: validity registration (`--register-validity
//! --hash-given`, started early as a [`Registrar`]) and validity queries.
//!
//! Checked against Nix 2.8 (`src/nix-store/nix-store.cc`,
//! `decodeValidPathInfo` in `src/libstore/store-api.cc`):
//! `--register-validity --hash-given` reads records until end of input, each
//! record being the lines *path*, *narHash* (`sha256:` + base16 or
//! nix-base32), *narSize*, *deriver* (empty for none), *number of
//! references*, then one reference per line. Each path not yet valid has its
//! metadata canonicalised when its record is read; all records are then
//! registered in one database transaction (references must be valid or
//! registered in the same call; cycles other than self-references are
//! rejected). An empty input registers nothing and exits 0.
//! `--check-validity --print-invalid PATH…` prints the invalid ones.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{ImportError, StoreLocation, StorePath};

/// A `nix-store` command for `location` (with `--store URI` if set).
pub(crate) fn command(location: &StoreLocation) -> Command {
    let mut cmd = Command::new(&location.nix_store);
    if let Some(uri) = &location.store_uri {
        cmd.arg("--store").arg(uri);
    }
    cmd
}

/// The most useful line of `nix-store`'s stderr: the last `error:` line, or
/// else the last non-empty line.
pub(crate) fn error_line(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or_else(|| lines.last())
        .map(|l| (*l).to_owned())
        .unwrap_or_else(|| format!("{status} and no error message"))
}

/// A running `nix-store --register-validity --hash-given`, started ahead of
/// time (process start-up costs ~16 ms) and waiting for its records on
/// stdin. [`import`](super::import) feeds and finishes it. Dropping an
/// unused `Registrar` closes its stdin, so `nix-store` registers nothing,
/// and reaps the process.
#[derive(Debug)]
pub struct Registrar {
    child: Option<Child>,
    program: PathBuf,
}

impl Registrar {
    /// Start `nix-store --register-validity --hash-given` for `location`.
    pub fn spawn(location: &StoreLocation) -> Result<Registrar, ImportError> {
        let child = command(location)
            .args(["--register-validity", "--hash-given"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ImportError::Spawn {
                program: location.nix_store.clone(),
                source,
            })?;
        Ok(Registrar {
            child: Some(child),
            program: location.nix_store.clone(),
        })
    }

    /// Fail early if `nix-store` has already exited (it could not open the
    /// store, say), before anything is moved into the store. Best effort: a
    /// process still starting up passes.
    pub(crate) fn ensure_running(&mut self) -> Result<(), ImportError> {
        let Some(child) = &mut self.child else {
            return Ok(());
        };
        let status = match child.try_wait() {
            Ok(None) => return Ok(()),
            Ok(Some(status)) => status,
            Err(source) => {
                return Err(ImportError::Io {
                    action: "check on",
                    path: self.program.display().to_string(),
                    source,
                })
            }
        };
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_end(&mut stderr);
        }
        self.child = None;
        Err(ImportError::NixStore {
            action: "start registering the outputs",
            message: error_line(&stderr, status),
        })
    }

    /// Waits until `nix-store` has exited by itself (tests: a registrar
    /// that can't open its store), leaving its stdin open.
    #[cfg(test)]
    pub(crate) fn wait_until_exited(&mut self) {
        if let Some(child) = &mut self.child {
            while matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    /// Write `records`, close stdin and wait for `nix-store`.
    pub(crate) fn register(mut self, records: &[u8]) -> Result<(), ImportError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(mut stdin) = child.stdin.take() {
            // A broken pipe means nix-store exited early; its status and
            // stderr say why.
            let _ = stdin.write_all(records);
        }
        let output = child.wait_with_output().map_err(|source| ImportError::Io {
            action: "wait for",
            path: self.program.display().to_string(),
            source,
        })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ImportError::NixStore {
                action: "register the outputs",
                message: error_line(&output.stderr, output.status),
            })
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            // Reaps the process; its output (nothing for an empty input)
            // is discarded.
            let _ = child.wait_with_output();
        }
    }
}

/// The record `nix-store --register-validity --hash-given` reads for one path.
pub(crate) fn append_record(
    out: &mut String,
    path: &str,
    nar_hash: &[u8; 32],
    nar_size: u64,
    deriver: &str,
    references: &BTreeSet<StorePath>,
) {
    let _ = writeln!(out, "{path}");
    out.push_str("sha256:");
    for b in nar_hash {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\n');
    let _ = writeln!(out, "{nar_size}");
    let _ = writeln!(out, "{deriver}");
    let _ = writeln!(out, "{}", references.len());
    for r in references {
        let _ = writeln!(out, "{r}");
    }
}

/// Which of `paths` are *not* valid in the store, in one `nix-store` call.
pub(crate) fn invalid_paths(
    location: &StoreLocation,
    paths: &[&str],
) -> Result<BTreeSet<String>, ImportError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    lines_of(
        location,
        &["--check-validity", "--print-invalid"],
        paths,
        "check the validity of the output paths",
    )
}

/// `nix-store <args> <paths>`: its non-empty output lines, trimmed; on
/// failure its last error line, saying it failed to `action`.
pub(crate) fn lines_of<C: FromIterator<String>>(
    location: &StoreLocation,
    args: &[&str],
    paths: &[&str],
    action: &'static str,
) -> Result<C, ImportError> {
    let output = command(location)
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImportError::Spawn {
            program: location.nix_store.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImportError::NixStore {
            action,
            message: error_line(&output.stderr, output.status),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}
