//! Unpacking the agent's tar stream into the staging dir. The stream is not
//! trusted to be well-formed: entries may only create regular files,
//! directories and symlinks, only below the wanted outputs' staging paths,
//! only inside directories this unpacker created itself (so a symlink in
//! the archive can never redirect a later entry), and never twice.
//!
//! The tar crate is used in raw mode: it would read GNU long name/link
//! (`L`/`K`) and pax (`x`) headers into memory whole, whatever size they
//! claim, so a hostile far side could exhaust the hook's memory with one
//! header. Those headers are read here, after checking their size against
//! [`MAX_LONG_NAME`] and [`MAX_PAX`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use memchr::memmem::Finder;

/// Largest GNU long name or long link name (`L`/`K` header) accepted.
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// Largest pax extended header (`x`) accepted.
pub const MAX_PAX: u64 = 1 << 20;
/// File data is scanned and written in pieces of at least this much (when
/// the file has it), however small the frames it arrived in.
const MIN_CHUNK: usize = 64 << 10;

/// What the extension headers before an entry said about it.
#[derive(Default)]
struct Ext {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
    pax_size: Option<u64>,
    /// Some `x` header was seen (even one without a record we use).
    pax: bool,
}

impl Ext {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && !self.pax
    }

    fn add_pax(&mut self, data: &[u8]) -> Result<(), String> {
        if self.pax {
            return Err("tar: two pax headers for the same entry".into());
        }
        self.pax = true;
        for rec in tar::PaxExtensions::new(data) {
            let rec = rec.map_err(|e| format!("tar: pax header: {e}"))?;
            match rec.key_bytes() {
                b"path" => self.pax_path = Some(rec.value_bytes().to_vec()),
                b"linkpath" => self.pax_link = Some(rec.value_bytes().to_vec()),
                b"size" => {
                    let v = rec
                        .value()
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| "tar: pax header: malformed size record".to_owned())?;
                    self.pax_size = Some(v);
                }
                // mtime, uid, xattrs...: not used for store paths.
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads the data of an `L`/`K`/`x` header, refusing one larger than `max`
/// before reading any of it.
fn read_ext<R: Read>(e: &mut tar::Entry<R>, max: u64, what: &str) -> Result<Vec<u8>, String> {
    let size = e.size();
    if size > max {
        return Err(format!(
            "tar: {what} header of {size} bytes exceeds the limit of {max} bytes"
        ));
    }
    // `size <= max`, a small number.
    let mut v = Vec::with_capacity(size as usize);
    e.take(max)
        .read_to_end(&mut v)
        .map_err(|err| format!("tar: reading a {what} header: {err}"))?;
    if v.len() as u64 != size {
        return Err(format!("tar: {what} header truncated"));
    }
    Ok(v)
}

/// A GNU long name's data: the name and a NUL terminator.
fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&0) {
        v.pop();
    }
    v
}

pub struct Unpacker<'n> {
    /// Output name → where it goes (`staging.output(base)`).
    roots: BTreeMap<String, PathBuf>,
    created: HashSet<PathBuf>,
    finder: Option<Finder<'n>>,
    /// Outputs in which the far side's temp path was found.
    pub temp_path_hits: BTreeSet<String>,
    pub files: u64,
    buf: Vec<u8>,
    /// Scratch for [`scan`].
    joined: Vec<u8>,
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
            joined: Vec::new(),
        }
    }

    /// Unpacks one archive from `src`; returns `src` positioned after the
    /// archive's end marker.
    pub fn unpack<R: Read>(&mut self, src: R) -> Result<R, String> {
        let mut ar = tar::Archive::new(src);
        let entries = ar.entries().map_err(|e| format!("tar: {e}"))?.raw(true);
        let mut ext = Ext::default();
        for entry in entries {
            let mut e = entry.map_err(|e| format!("tar: {e}"))?;
            match e.header().entry_type() {
                tar::EntryType::GNULongName => {
                    if ext.long_name.is_some() {
                        return Err("tar: two long names for the same entry".into());
                    }
                    let v = read_ext(&mut e, MAX_LONG_NAME, "GNU long name")?;
                    ext.long_name = Some(strip_nul(v));
                }
                tar::EntryType::GNULongLink => {
                    if ext.long_link.is_some() {
                        return Err("tar: two long link names for the same entry".into());
                    }
                    let v = read_ext(&mut e, MAX_LONG_NAME, "GNU long link name")?;
                    ext.long_link = Some(strip_nul(v));
                }
                tar::EntryType::XHeader => {
                    let v = read_ext(&mut e, MAX_PAX, "pax extended")?;
                    ext.add_pax(&v)?;
                }
                _ => self.entry(&mut e, std::mem::take(&mut ext))?,
            }
        }
        if !ext.is_empty() {
            return Err("tar: the archive ends with a long name or pax header but no entry".into());
        }
        Ok(ar.into_inner())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<R>, ext: Ext) -> Result<(), String> {
        if let Some(s) = ext.pax_size {
            if s != e.size() {
                return Err(format!(
                    "tar: pax size {s} differs from the header's {}",
                    e.size()
                ));
            }
        }
        let raw = match (ext.long_name, ext.pax_path) {
            (Some(_), Some(_)) => {
                return Err("tar: an entry with both a GNU long name and a pax path".into())
            }
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => e.path_bytes().into_owned(),
        };
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
                // Gather at least MIN_CHUNK (or the rest of the file): the
                // boundary scan then costs little however small the pieces
                // the stream arrives in.
                let mut n = 0;
                let mut end = false;
                while n < MIN_CHUNK {
                    match e.read(&mut self.buf[n..]) {
                        Ok(0) => {
                            end = true;
                            break;
                        }
                        Ok(k) => n += k,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => return Err(format!("tar: reading {shown:?}: {err}")),
                    }
                }
                if n == 0 {
                    break;
                }
                let chunk = &self.buf[..n];
                if !hit {
                    if let Some(fi) = &self.finder {
                        hit = scan(fi, &mut tail, &mut self.joined, chunk);
                    }
                }
                f.write_all(chunk)
                    .map_err(|err| format!("writing {}: {err}", dest.display()))?;
                if end {
                    break;
                }
            }
            if hit {
                self.temp_path_hits.insert(output);
            }
            self.files += 1;
        } else if kind.is_symlink() {
            let target = match (ext.long_link, ext.pax_link) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "tar symlink {shown:?} has both a GNU long link name and a pax linkpath"
                    ))
                }
                (Some(t), None) | (None, Some(t)) => t,
                (None, None) => e
                    .link_name_bytes()
                    .ok_or_else(|| format!("tar symlink {shown:?} has no target"))?
                    .into_owned(),
            };
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
/// previous chunk (`tail` keeps its last needle-length − 1 bytes; `joined`
/// is scratch space).
fn scan(fi: &Finder, tail: &mut Vec<u8>, joined: &mut Vec<u8>, chunk: &[u8]) -> bool {
    let k = fi.needle().len().saturating_sub(1);
    if !tail.is_empty() {
        joined.clear();
        joined.extend_from_slice(tail);
        joined.extend_from_slice(&chunk[..chunk.len().min(k)]);
        if fi.find(joined).is_some() {
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
            let a = scan(&fi, &mut tail, &mut Vec::new(), &data[..split]);
            let b = scan(&fi, &mut tail, &mut Vec::new(), &data[split..]);
            assert!(a || b, "split {split}");
        }
        // One byte at a time.
        let (mut tail, mut joined) = (Vec::new(), Vec::new());
        let found = b"xx/tmp/agent.Xyy"
            .iter()
            .any(|c| scan(&fi, &mut tail, &mut joined, std::slice::from_ref(c)));
        assert!(found);
        let mut tail = Vec::new();
        assert!(!scan(&fi, &mut tail, &mut joined, b"/tmp/agent.Y"));
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

    /// A tar stream: `head`, then `fill` bytes of `b'a'` (the body a
    /// hostile extension header claims); counts what was read of it.
    struct Hostile {
        head: Vec<u8>,
        fill: u64,
        served: u64,
    }

    impl Read for Hostile {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let head = self.head.len() as u64;
            let n = if self.served < head {
                let at = self.served as usize;
                let n = buf.len().min(self.head.len() - at);
                buf[..n].copy_from_slice(&self.head[at..at + n]);
                n
            } else {
                let left = (head + self.fill - self.served).min(buf.len() as u64) as usize;
                buf[..left].fill(b'a');
                left
            };
            self.served += n as u64;
            Ok(n)
        }
    }

    fn ext_header(kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// An `L`, `K` or `x` header claiming more than its limit is refused
    /// from its size alone: its body is never read (tar's own handling
    /// would read it all into memory).
    #[test]
    fn oversized_extension_headers_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                tar::EntryType::GNULongName,
                MAX_LONG_NAME + 1,
                "GNU long name",
            ),
            (
                tar::EntryType::GNULongLink,
                MAX_LONG_NAME + 1,
                "GNU long link name",
            ),
            (tar::EntryType::XHeader, MAX_PAX + 1, "pax extended"),
            (tar::EntryType::GNULongName, 1 << 40, "GNU long name"),
        ];
        for (kind, size, what) in cases {
            let roots = BTreeMap::from([("out".to_owned(), dir.path().join("x-out"))]);
            // The body really is there (up to 16 MiB), as a remote would
            // stream it.
            let mut src = Hostile {
                head: ext_header(kind, size),
                fill: size.min(16 << 20),
                served: 0,
            };
            let err = Unpacker::new(roots, b"").unpack(&mut src).err().unwrap();
            assert!(
                err.contains(&format!("{what} header of {size} bytes exceeds the limit")),
                "{kind:?}: {err}"
            );
            assert!(src.served <= 512, "{kind:?}: read {} bytes", src.served);
        }
    }

    #[test]
    fn long_names_link_targets_and_pax_paths_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("abc-out");
        let roots = BTreeMap::from([("out".to_owned(), root.clone())]);
        let long = "n".repeat(200);
        let target = format!("{}/{}", "t".repeat(150), "u".repeat(150));
        let pax_name = "p".repeat(180);
        let data = tar_of(|b| {
            b.append_data(
                &mut hdr(tar::EntryType::Directory, 0o755, 0),
                "out",
                io::empty(),
            )
            .unwrap();
            // GNU 'L' (path over 100 bytes), as the agent sends.
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o644, 3),
                format!("out/{long}"),
                &b"abc"[..],
            )
            .unwrap();
            // GNU 'L' and 'K'.
            b.append_link(
                &mut hdr(tar::EntryType::Symlink, 0o777, 0),
                format!("out/l{long}"),
                &target,
            )
            .unwrap();
            // A pax path.
            b.append_pax_extensions([("path", format!("out/{pax_name}").as_bytes())])
                .unwrap();
            b.append_data(
                &mut hdr(tar::EntryType::Regular, 0o644, 1),
                "out/short",
                &b"p"[..],
            )
            .unwrap();
        });
        let mut u = Unpacker::new(roots, b"");
        u.unpack(&data[..]).unwrap();
        assert_eq!(std::fs::read(root.join(&long)).unwrap(), b"abc");
        assert_eq!(
            std::fs::read_link(root.join(format!("l{long}"))).unwrap(),
            PathBuf::from(&target)
        );
        assert_eq!(std::fs::read(root.join(&pax_name)).unwrap(), b"p");
        assert!(!root.join("short").exists());
    }

    #[test]
    fn malformed_extension_sequences_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let long_hdr = |name: &[u8]| {
            let mut v = ext_header(tar::EntryType::GNULongName, name.len() as u64);
            let mut body = name.to_vec();
            body.resize(name.len().div_ceil(512) * 512, 0);
            v.extend_from_slice(&body);
            v
        };
        let end = vec![0u8; 1024];
        let cases: [(Vec<u8>, &str); 3] = [
            // Two long names for one entry.
            (
                [long_hdr(b"out/a\0"), long_hdr(b"out/b\0"), end.clone()].concat(),
                "two long names",
            ),
            // A long name with nothing after it.
            ([long_hdr(b"out/a\0"), end.clone()].concat(), "but no entry"),
            // A long name with a NUL inside.
            (
                [
                    long_hdr(b"out/a\0b\0"),
                    tar_of(|b| {
                        b.append_data(
                            &mut hdr(tar::EntryType::Directory, 0o755, 0),
                            "x",
                            io::empty(),
                        )
                        .unwrap();
                    }),
                ]
                .concat(),
                "unsafe path",
            ),
        ];
        for (i, (data, needle)) in cases.into_iter().enumerate() {
            let root = dir.path().join(format!("abc-out{i}"));
            std::fs::create_dir(&root).unwrap();
            let roots = BTreeMap::from([("out".to_owned(), root.clone())]);
            let mut u = Unpacker::new(roots, b"");
            // The output's own dir, so "out/..." entries have a parent.
            u.created.insert(root);
            let err = u.unpack(&data[..]).err().unwrap();
            assert!(err.contains(needle), "case {i}: {err}");
        }
    }
}
