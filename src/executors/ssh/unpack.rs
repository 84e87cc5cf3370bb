//! Unpacking the agent's tar stream into the staging dir. The stream is not
//! trusted to be well-formed: entries may only create regular files,
//! directories and symlinks, only below the wanted outputs' staging paths,
//! only inside directories this unpacker created itself (so a symlink in
//! the archive can never redirect a later entry), and never twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use memchr::memmem::Finder;

pub struct Unpacker<'n> {
    /// Output name → where it goes (`staging.output(base)`).
    roots: BTreeMap<String, PathBuf>,
    created: HashSet<PathBuf>,
    finder: Option<Finder<'n>>,
    /// Outputs in which the far side's temp path was found.
    pub temp_path_hits: BTreeSet<String>,
    pub files: u64,
    buf: Vec<u8>,
}

impl<'n> Unpacker<'n> {
    /// `needle`: the far side's temp dir; empty = no scan.
    pub fn new(roots: BTreeMap<String, PathBuf>, needle: &'n [u8]) -> Self {
        Unpacker {
            roots,
            created: HashSet::new(),
            finder: (!needle.is_empty()).then(|| Finder::new(needle)),
            temp_path_hits: BTreeSet::new(),
            files: 0,
            buf: vec![0u8; 1 << 20],
        }
    }

    /// Unpacks one archive from `src`; returns `src` positioned after the
    /// archive's end marker.
    pub fn unpack<R: Read>(&mut self, src: R) -> Result<R, String> {
        let mut ar = tar::Archive::new(src);
        let entries = ar.entries().map_err(|e| format!("tar: {e}"))?;
        for entry in entries {
            let mut e = entry.map_err(|e| format!("tar: {e}"))?;
            self.entry(&mut e)?;
        }
        Ok(ar.into_inner())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<R>) -> Result<(), String> {
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let mut comps = raw
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .peekable();
        let Some(first) = comps.next() else {
            return Err(format!("tar entry with an empty name {shown:?}"));
        };
        let output = String::from_utf8_lossy(first).into_owned();
        let Some(root) = self.roots.get(&output).cloned() else {
            // An output Nix did not ask for (or a stray name): skipped.
            return Ok(());
        };
        let mut dest = root.clone();
        for c in comps {
            if c == b"." || c == b".." || c.contains(&0) {
                return Err(format!("tar entry {shown:?} has an unsafe path"));
            }
            dest.push(OsStr::from_bytes(c));
        }
        let parent_ok = if dest == root {
            true
        } else {
            dest.parent().is_some_and(|p| self.created.contains(p))
        };
        if !parent_ok {
            return Err(format!(
                "tar entry {shown:?} is not inside a directory sent before it"
            ));
        }
        let header = e.header();
        let kind = header.entry_type();
        let exec = header.mode().map(|m| m & 0o100 != 0).unwrap_or(false);
        let exists = |p: &PathBuf| format!("creating {}: {}", p.display(), "duplicate tar entry");
        if kind.is_dir() {
            DirBuilder::new().mode(0o755).create(&dest).map_err(|err| {
                if err.kind() == io::ErrorKind::AlreadyExists {
                    exists(&dest)
                } else {
                    format!("creating {}: {err}", dest.display())
                }
            })?;
            self.created.insert(dest);
        } else if kind.is_file() {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if exec { 0o755 } else { 0o644 })
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&dest)
                .map_err(|err| {
                    if err.kind() == io::ErrorKind::AlreadyExists {
                        exists(&dest)
                    } else {
                        format!("creating {}: {err}", dest.display())
                    }
                })?;
            let mut tail: Vec<u8> = Vec::new();
            let mut hit = false;
            loop {
                let n = match e.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(format!("tar: reading {shown:?}: {err}")),
                };
                let chunk = &self.buf[..n];
                if !hit {
                    if let Some(fi) = &self.finder {
                        hit = scan(fi, &mut tail, chunk);
                    }
                }
                f.write_all(chunk)
                    .map_err(|err| format!("writing {}: {err}", dest.display()))?;
            }
            if hit {
                self.temp_path_hits.insert(output);
            }
            self.files += 1;
        } else if kind.is_symlink() {
            let target = e
                .link_name_bytes()
                .ok_or_else(|| format!("tar symlink {shown:?} has no target"))?
                .into_owned();
            if target.is_empty() || target.contains(&0) {
                return Err(format!("tar symlink {shown:?} has an invalid target"));
            }
            if let Some(fi) = &self.finder {
                if fi.find(&target).is_some() {
                    self.temp_path_hits.insert(output);
                }
            }
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest).map_err(|err| {
                if err.kind() == io::ErrorKind::AlreadyExists {
                    exists(&dest)
                } else {
                    format!("creating {}: {err}", dest.display())
                }
            })?;
        } else {
            return Err(format!(
                "tar entry {shown:?} has type {kind:?}; only regular files, directories and symlinks are accepted"
            ));
        }
        Ok(())
    }
}

/// Looks for the needle in `chunk` and across the boundary with the
/// previous chunk (`tail` keeps its last needle-length − 1 bytes).
fn scan(fi: &Finder, tail: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let k = fi.needle().len().saturating_sub(1);
    if !tail.is_empty() {
        let mut joined = tail.clone();
        joined.extend_from_slice(&chunk[..chunk.len().min(k)]);
        if fi.find(&joined).is_some() {
            return true;
        }
    }
    if fi.find(chunk).is_some() {
        return true;
    }
    let keep = chunk.len().min(k);
    if keep == k {
        tail.clear();
    } else {
        let drop = (tail.len() + keep).saturating_sub(k);
        tail.drain(..drop.min(tail.len()));
    }
    tail.extend_from_slice(&chunk[chunk.len() - keep..]);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn hdr(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h
    }

    #[test]
    fn scan_finds_needle_across_chunks() {
        let fi = Finder::new(b"/tmp/agent.X");
        for split in 0..20 {
            let data = b"....../tmp/agent.X/outputs/out.....";
            let split = split.min(data.len());
            let mut tail = Vec::new();
            let a = scan(&fi, &mut tail, &data[..split]);
            let b = scan(&fi, &mut tail, &data[split..]);
            assert!(a || b, "split {split}");
        }
        // One byte at a time.
        let mut tail = Vec::new();
        let found = b"xx/tmp/agent.Xyy"
            .iter()
            .any(|c| scan(&fi, &mut tail, std::slice::from_ref(c)));
        assert!(found);
        let mut tail = Vec::new();
        assert!(!scan(&fi, &mut tail, b"/tmp/agent.Y"));
    }

    #[test]
    fn unpacks_tree_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("abc-out");
        let roots = BTreeMap::from([("out".to_owned(), root.clone())]);
        let data = tar_of(|b| {
            b.append_data(
                &mut hdr(tar::EntryType::Directory, 0o755, 0),
                "out",
                io::empty(),
            )
            .unwrap();
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o755, 14),
                "out/run",
                &b"/tmp/needle/x\n"[..],
            )
            .unwrap();
            b.append_link(&mut hdr(tar::EntryType::Symlink, 0o777, 0), "out/l", "run")
                .unwrap();
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o644, 1),
                "dev",
                &b"x"[..],
            )
            .unwrap();
        });
        let mut u = Unpacker::new(roots.clone(), b"/tmp/needle");
        u.unpack(&data[..]).unwrap();
        assert_eq!(std::fs::read(root.join("run")).unwrap(), b"/tmp/needle/x\n");
        assert_eq!(
            std::fs::read_link(root.join("l")).unwrap(),
            PathBuf::from("run")
        );
        assert!(u.temp_path_hits.contains("out"));
        assert!(!dir.path().join("dev").exists());

        // A symlink followed by an entry through it.
        let root2 = dir.path().join("abc-out2");
        let roots2 = BTreeMap::from([("out".to_owned(), root2.clone())]);
        let evil = tar_of(|b| {
            b.append_data(
                &mut hdr(tar::EntryType::Directory, 0o755, 0),
                "out",
                io::empty(),
            )
            .unwrap();
            b.append_link(&mut hdr(tar::EntryType::Symlink, 0o777, 0), "out/l", "/etc")
                .unwrap();
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o644, 1),
                "out/l/x",
                &b"x"[..],
            )
            .unwrap();
        });
        let err = Unpacker::new(roots2, b"").unpack(&evil[..]).unwrap_err();
        assert!(err.contains("not inside a directory"), "{err}");
        assert!(!Path::new("/etc/x").exists());

        // Device nodes are refused.
        let root3 = dir.path().join("abc-out3");
        let roots3 = BTreeMap::from([("out".to_owned(), root3)]);
        let dev = tar_of(|b| {
            b.append_data(&mut hdr(tar::EntryType::Char, 0o644, 0), "out", io::empty())
                .unwrap();
        });
        let err = Unpacker::new(roots3, b"").unpack(&dev[..]).unwrap_err();
        assert!(err.contains("only regular files"), "{err}");
    }

    use std::path::Path;
}
