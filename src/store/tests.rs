//! Tests against the real `nix-store` / `nix-hash` (Nix 2.8 on the test
//! machine), using private local stores under temporary directories.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix_derivation::{nixbase32, CAHash, NixHash};
use sha2::{Digest as _, Sha256};

use super::digest::{digest_path, digest_path_with, ExtraHash, PipelineConfig, TreeDigest};
use super::nar::{dump_path, DumpOptions, NarErrorKind, NodeKind};
use super::refscan::HashParts;
use super::*;

// ---------------------------------------------------------------- helpers

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn nix_hash(path: &Path) -> String {
    run(Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path))
    .trim()
    .to_owned()
}

fn nix_hash_with(path: &Path, algo: &str, flat: bool) -> NixHash {
    let mut cmd = Command::new("nix-hash");
    cmd.args(["--type", algo, "--base32"]);
    if flat {
        cmd.arg("--flat");
    }
    let h = run(cmd.arg(path));
    NixHash::parse(&format!("{algo}:{}", h.trim())).expect("parse nix-hash output")
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("spawn");
    assert!(out.status.success());
    out.stdout
}

fn no_parts() -> HashParts {
    HashParts::new([])
}

fn plain() -> DumpOptions {
    DumpOptions {
        seal: false,
        owner: None,
        ..Default::default()
    }
}

/// Our NAR, hash and size, checked against nix-store --dump and nix-hash, in
/// every pipeline configuration.
fn check_nar(path: &Path) {
    let mut ours = Vec::new();
    dump_path(path, &mut ours, &plain()).expect("dump");
    let theirs = nix_dump(path);
    assert!(
        ours == theirs,
        "NAR of {} differs from nix-store --dump",
        path.display()
    );
    let expect_hash = nix_hash(path);
    let configs = [
        PipelineConfig::default(),
        PipelineConfig {
            threaded: false,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            chunk_size: 1000,
            buffers: 2,
            threaded: true,
        },
        PipelineConfig {
            chunk_size: 333,
            buffers: 3,
            threaded: false,
        },
    ];
    for config in configs {
        let d = digest_path_with(path, &no_parts(), None, &plain(), &config).expect("digest");
        assert_eq!(nixbase32::encode(&d.nar_hash), expect_hash, "{config:?}");
        assert_eq!(d.nar_size, theirs.len() as u64, "{config:?}");
    }
}

/// A made-up but well-formed store path in `dir`.
fn fake_path_in(dir: &str, name: &str) -> String {
    let h = Sha256::digest(name.as_bytes());
    format!("{dir}/{}-{name}", nixbase32::encode(&h[..20]))
}

/// A made-up but well-formed path in `/nix/store`.
fn fake_path(name: &str) -> String {
    fake_path_in("/nix/store", name)
}

fn hash_part(path: &str) -> &str {
    let base = path.rfind('/').map_or(0, |i| i + 1);
    &path[base..base + 32]
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A private local store whose logical store directory is its real one,
/// `<tmp>/store`. (A `local?root=DIR` store can't be used: Nix 2.8's
/// `nix-store --register-validity` canonicalises the *logical* path, i.e.
/// `/nix/store/…` on the host, and fails.)
struct TestStore {
    _tmp: tempfile::TempDir,
    uri: String,
    location: StoreLocation,
    stage: PathBuf,
}

impl TestStore {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().display().to_string();
        let uri = format!("local?store={base}/store&state={base}/state&log={base}/log");
        let location = StoreLocation {
            store_dir: format!("{base}/store"),
            real_store_dir: tmp.path().join("store"),
            store_uri: Some(uri.clone()),
            nix_store: PathBuf::from("nix-store"),
        };
        let stage = tmp.path().join("stage");
        fs::create_dir(&stage).unwrap();
        let st = TestStore {
            _tmp: tmp,
            uri,
            location,
            stage,
        };
        // Opening the store creates its directories and database.
        run(st
            .nix_store()
            .args(["--check-validity", "--print-invalid", &st.path("init")]));
        st
    }

    fn path(&self, name: &str) -> String {
        fake_path_in(&self.location.store_dir, name)
    }

    fn nix_store(&self) -> Command {
        let mut c = Command::new("nix-store");
        c.arg("--store").arg(&self.uri);
        c
    }

    /// Make a valid path by adding a file with `contents`.
    fn add(&self, name: &str, contents: &[u8]) -> String {
        let dir = self.stage.join(format!("add-{name}"));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join(name);
        fs::write(&f, contents).unwrap();
        run(self.nix_store().arg("--add").arg(&f)).trim().to_owned()
    }

    fn references(&self, path: &str) -> BTreeSet<String> {
        run(self.nix_store().args(["-q", "--references", path]))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn is_valid(&self, path: &str) -> bool {
        self.nix_store()
            .args(["--check-validity", path])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// `path` as a store path of this store.
    fn store_path(&self, path: &str) -> StorePath {
        self.location.parse_path(path).unwrap()
    }

    fn real(&self, path: &str) -> PathBuf {
        self.location.real_path(&self.store_path(path))
    }

    /// [`import`], with the deriver (`""` for none) and the inputs parsed
    /// as the hook parses them.
    fn import(
        &self,
        deriver: &str,
        inputs: &[String],
        outputs: &[StagedOutput],
    ) -> Result<Vec<Registered>, ImportError> {
        let deriver = match deriver {
            "" => None,
            d => Some(self.location.parse_path(d)?),
        };
        let inputs = self.location.parse_paths(inputs)?;
        let registrar = Registrar::spawn(&self.location).unwrap();
        import(
            &ImportRequest {
                location: &self.location,
                deriver: deriver.as_ref(),
                inputs: &inputs,
                outputs,
                checks: &Default::default(),
                owner: None,
                deadline: None,
                cancel: None,
                max_size: None,
                progress: None,
            },
            registrar,
        )
    }

    /// [`import`] of trees the account `owner` built.
    fn import_as(
        &self,
        owner: u32,
        outputs: &[StagedOutput],
    ) -> Result<Vec<Registered>, ImportError> {
        let registrar = Registrar::spawn(&self.location).unwrap();
        import(
            &ImportRequest {
                location: &self.location,
                deriver: None,
                inputs: &[],
                outputs,
                checks: &Default::default(),
                owner: Some(owner),
                deadline: None,
                cancel: None,
                max_size: None,
                progress: None,
            },
            registrar,
        )
    }

    fn import_limited(
        &self,
        outputs: &[StagedOutput],
        deadline: Option<std::time::Instant>,
        max_size: Option<u64>,
    ) -> Result<Vec<Registered>, ImportError> {
        let registrar = Registrar::spawn(&self.location).unwrap();
        import(
            &ImportRequest {
                location: &self.location,
                deriver: None,
                inputs: &[],
                outputs,
                checks: &Default::default(),
                owner: None,
                deadline,
                cancel: None,
                max_size,
                progress: None,
            },
            registrar,
        )
    }
}

/// A staged output at `path`, a store path of the store whose directory
/// holds it.
fn output(name: &str, path: &str, staged: &Path, fixed: Option<CAHash>) -> StagedOutput {
    let location = StoreLocation {
        store_dir: path[..path.rfind('/').unwrap()].to_owned(),
        ..StoreLocation::system()
    };
    StagedOutput {
        name: name.into(),
        path: location.parse_path(path).unwrap(),
        staged: staged.into(),
        fixed,
    }
}

// ---------------------------------------------------------------- NAR

#[test]
fn nar_regular_executable_empty_files() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("file");
    fs::write(&f, b"hello world\n").unwrap();
    check_nar(&f);
    let x = tmp.path().join("exe");
    fs::write(&x, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&x, fs::Permissions::from_mode(0o755)).unwrap();
    check_nar(&x);
    // u+x alone is what counts.
    fs::set_permissions(&x, fs::Permissions::from_mode(0o700)).unwrap();
    check_nar(&x);
    let e = tmp.path().join("empty");
    fs::write(&e, b"").unwrap();
    check_nar(&e);
    let eight = tmp.path().join("eight");
    fs::write(&eight, b"12345678").unwrap();
    check_nar(&eight);
}

#[test]
fn nar_symlink_root() {
    let tmp = tempfile::tempdir().unwrap();
    let l = tmp.path().join("link");
    symlink("/nix/store/some/where/far/away", &l).unwrap();
    check_nar(&l);
    let d = tmp.path().join("dangling");
    symlink("x", &d).unwrap();
    check_nar(&d);
}

#[test]
fn nar_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let e = tmp.path().join("emptydir");
    fs::create_dir(&e).unwrap();
    check_nar(&e);

    let d = tmp.path().join("tree");
    fs::create_dir_all(d.join("a/b/c")).unwrap();
    fs::create_dir_all(d.join("empty")).unwrap();
    fs::write(d.join("a/b/c/deep"), b"deep").unwrap();
    fs::write(d.join("a/file"), vec![7u8; 1000]).unwrap();
    fs::write(d.join("top"), b"").unwrap();
    symlink("a/b", d.join("a-link")).unwrap();
    fs::write(d.join("a/b/run"), b"x").unwrap();
    fs::set_permissions(d.join("a/b/run"), fs::Permissions::from_mode(0o555)).unwrap();
    check_nar(&d);
}

#[test]
fn nar_odd_names_sorted_bytewise() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("names");
    fs::create_dir(&d).unwrap();
    for name in [
        "B",
        "a",
        "Z",
        ".hidden",
        "..dots",
        "a.b",
        "a-b",
        "a_b",
        "aa",
        "ä",
        "é",
        "z",
        "日本",
        "~tilde",
        "1",
        "10",
        "9",
        " space",
        "UPPER.lower",
    ] {
        fs::write(d.join(name), name.as_bytes()).unwrap();
    }
    // Non-UTF-8 name.
    use std::os::unix::ffi::OsStrExt;
    fs::write(d.join(std::ffi::OsStr::from_bytes(b"\xff\xfe")), b"bin").unwrap();
    check_nar(&d);
}

#[test]
fn nar_large_file_spans_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("big");
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 13u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&f, &data).unwrap();
    check_nar(&f);
    let d = tmp.path().join("dir");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("big"), &data).unwrap();
    fs::write(d.join("small"), b"s").unwrap();
    check_nar(&d);
}

#[test]
fn nar_seal_sets_canonical_modes_without_changing_the_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("t");
    fs::create_dir_all(d.join("sub")).unwrap();
    fs::write(d.join("sub/f"), b"f").unwrap();
    fs::write(d.join("x"), b"x").unwrap();
    fs::set_permissions(d.join("x"), fs::Permissions::from_mode(0o4775)).unwrap();
    fs::set_permissions(d.join("sub/f"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::set_permissions(d.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
    let before = nix_hash(&d);
    let dg = digest_path(
        &d,
        &no_parts(),
        None,
        &DumpOptions {
            seal: true,
            owner: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(nixbase32::encode(&dg.nar_hash), before);
    assert_eq!(mode(&d.join("x")), 0o555);
    assert_eq!(mode(&d.join("sub/f")), 0o444);
    assert_eq!(mode(&d.join("sub")), 0o555);
    assert_eq!(mode(&d), 0o755);
    assert_eq!(nix_hash(&d), before);
}

#[test]
fn unsupported_file_types_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("out");
    fs::create_dir_all(d.join("sub")).unwrap();
    fs::write(d.join("a"), b"a").unwrap();
    nix::unistd::mkfifo(
        &d.join("sub/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let e = dump_path(&d, &mut Vec::new(), &plain()).unwrap_err();
    assert!(matches!(e.kind, NarErrorKind::Unsupported("fifo")), "{e:?}");
    assert_eq!(e.path, b"sub/pipe");
    assert_eq!(
        e.display_with_root("/nix/store/x-y"),
        "'/nix/store/x-y/sub/pipe' is a fifo; store paths may only contain regular files, \
         directories and symlinks"
    );
    // A socket at the root.
    let s = tmp.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&s).unwrap();
    let e = dump_path(&s, &mut Vec::new(), &plain()).unwrap_err();
    assert!(
        matches!(e.kind, NarErrorKind::Unsupported("socket")),
        "{e:?}"
    );
    assert!(e.path.is_empty());

    // Through import: one clear line naming the path inside the output.
    let st = TestStore::new();
    let out = st.path("fifo-out");
    let err = st
        .import("", &[], &[output("out", &out, &d, None)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "output `out`: '{out}/sub/pipe' is a fifo; store paths may only contain regular \
             files, directories and symlinks"
        )
    );
    assert!(!st.real(&out).exists());
}

#[test]
fn very_deep_trees_fail_cleanly() {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let tmp = tempfile::tempdir().unwrap();
    let mut fd = nix::fcntl::open(tmp.path(), OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..nar::MAX_DEPTH + 5 {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(&fd, "d", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
    drop(fd);
    let e = dump_path(&tmp.path().join("d"), &mut Vec::new(), &plain()).unwrap_err();
    // With a low descriptor limit, running out of descriptors comes first.
    assert!(
        matches!(e.kind, NarErrorKind::TooDeep)
            || matches!(&e.kind, NarErrorKind::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EMFILE)),
        "{e}"
    );
    remove_tree(&tmp.path().join("d")).unwrap();
}

// ---------------------------------------------------------------- references

fn digest_with(path: &Path, cands: &[&str]) -> (TreeDigest, Vec<String>) {
    let parts = HashParts::new(
        cands
            .iter()
            .map(|c| refscan::parse_hash_part(hash_part(c).as_bytes()).unwrap()),
    );
    let d = digest_path(path, &parts, None, &plain()).unwrap();
    let found = d.references.iter().map(|&i| cands[i].to_owned()).collect();
    (d, found)
}

#[test]
fn scan_finds_contents_names_and_link_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, unused) = (
        fake_path("a"),
        fake_path("b"),
        fake_path("c"),
        fake_path("u"),
    );
    let d = tmp.path().join("t");
    fs::create_dir(&d).unwrap();
    fs::write(
        d.join("script"),
        format!("#!/bin/sh\nexec {a}/bin/a \"$@\"\n"),
    )
    .unwrap();
    fs::write(
        d.join(format!("cache-{}", hash_part(&b))),
        b"no refs in here",
    )
    .unwrap();
    symlink(format!("{c}/lib"), d.join("lib")).unwrap();
    // A non-candidate hash and a 31-character fragment of `unused`.
    fs::write(
        d.join("noise"),
        format!("{} {}", fake_path("other"), &hash_part(&unused)[..31]),
    )
    .unwrap();
    let (_, found) = digest_with(&d, &[&a, &b, &c, &unused]);
    assert_eq!(found, vec![a.clone(), b.clone(), c.clone()]);
}

#[test]
fn scan_finds_hash_straddling_chunk_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fake_path("straddle");
    let chunk = PipelineConfig::default().chunk_size;
    let parts = HashParts::new([refscan::parse_hash_part(hash_part(&target).as_bytes()).unwrap()]);
    // Root regular file: contents start at NAR offset 96. Place the hash so
    // that it covers the first chunk boundary, at several split positions.
    let file_with_hash_at = |name: &str, chunk: usize, split: usize, len: usize| {
        let mut data = vec![0u8; chunk + 64];
        let at = chunk - nar::FLAT_CONTENTS_OFFSET as usize - split;
        data[at..at + len].copy_from_slice(&hash_part(&target).as_bytes()[..len]);
        let f = tmp.path().join(name);
        fs::write(&f, &data).unwrap();
        f
    };
    // The default chunk size, threaded and not.
    for split in [1usize, 16, 31] {
        let f = file_with_hash_at(&format!("f{split}"), chunk, split, 32);
        for threaded in [true, false] {
            let config = PipelineConfig {
                threaded,
                ..PipelineConfig::default()
            };
            let d = digest_path_with(&f, &parts, None, &plain(), &config).unwrap();
            assert_eq!(d.references, vec![0], "split {split}");
        }
    }
    // Small chunks: every split position.
    for split in 1..32 {
        let config = PipelineConfig {
            chunk_size: 4096,
            buffers: 2,
            threaded: true,
        };
        let f = file_with_hash_at(&format!("s{split}"), 4096, split, 32);
        let d = digest_path_with(&f, &parts, None, &plain(), &config).unwrap();
        assert_eq!(d.references, vec![0], "split {split}");
    }
    // A 31-character fragment at the boundary is not a reference.
    let f = file_with_hash_at("frag", chunk, 15, 31);
    let d = digest_path(&f, &parts, None, &plain()).unwrap();
    assert!(d.references.is_empty());
}

// ---------------------------------------------------------------- fixed outputs

#[test]
fn fixed_output_flat_and_recursive() {
    let st = TestStore::new();
    let mk_file = |name: &str, data: &[u8]| {
        let p = st.stage.join(name);
        fs::write(&p, data).unwrap();
        p
    };

    // Flat, several algorithms: right hash passes.
    for algo in ["sha256", "sha1", "md5", "sha512"] {
        let f = mk_file(
            &format!("flat-{algo}"),
            format!("content {algo}").as_bytes(),
        );
        let h = nix_hash_with(&f, algo, true);
        let path = st.path(&format!("flat-{algo}"));
        let r = st
            .import("", &[], &[output("out", &path, &f, Some(CAHash::Flat(h)))])
            .unwrap();
        assert_eq!(r[0].references, BTreeSet::new());
        assert!(st.is_valid(&path));
    }

    // Flat, wrong hash: Nix's message, nothing moved or registered.
    let f = mk_file("flat-wrong", b"actual");
    let got = nix_hash_with(&f, "sha256", true);
    let wanted = NixHash::Sha256([0; 32]);
    let drv = st.path("fetch.drv");
    let path = st.path("flat-wrong");
    let err = st
        .import(
            &drv,
            &[],
            &[output("out", &path, &f, Some(CAHash::Flat(wanted.clone())))],
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "hash mismatch in fixed-output derivation '{drv}':\n  specified: {}\n     got:    {}",
            wanted.to_sri_string(),
            got.to_sri_string()
        )
    );
    assert!(!st.real(&path).exists() && f.exists());
    assert!(!st.is_valid(&path));

    // Flat on a directory and on an executable file.
    let d = st.stage.join("flat-dir");
    fs::create_dir(&d).unwrap();
    let path = st.path("flat-dir");
    let err = st
        .import(
            "",
            &[],
            &[output("out", &path, &d, Some(CAHash::Flat(got.clone())))],
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "output path '{path}' should be a non-executable regular file since recursive \
             hashing is not enabled (outputHashMode=flat)"
        )
    );
    let x = mk_file("flat-exe", b"actual");
    fs::set_permissions(&x, fs::Permissions::from_mode(0o755)).unwrap();
    let err = st
        .import(
            "",
            &[],
            &[output(
                "out",
                &st.path("flat-exe"),
                &x,
                Some(CAHash::Flat(got)),
            )],
        )
        .unwrap_err();
    assert!(matches!(err, ImportError::FlatNotRegular { .. }), "{err}");

    // Recursive: sha256 (reuses the NAR hash) and sha512 (second hasher).
    for algo in ["sha256", "sha512", "sha1"] {
        let d = st.stage.join(format!("rec-{algo}"));
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("sub/data"), algo.as_bytes()).unwrap();
        symlink("sub/data", d.join("link")).unwrap();
        let h = nix_hash_with(&d, algo, false);
        let path = st.path(&format!("rec-{algo}"));
        st.import("", &[], &[output("out", &path, &d, Some(CAHash::Nar(h)))])
            .unwrap();
        assert!(st.is_valid(&path));
    }
    let d = st.stage.join("rec-wrong");
    fs::create_dir(&d).unwrap();
    let got = nix_hash_with(&d, "sha512", false);
    let wanted = NixHash::Sha512(Box::new([1; 64]));
    let err = st
        .import(
            &drv,
            &[],
            &[output(
                "out",
                &st.path("rec-wrong"),
                &d,
                Some(CAHash::Nar(wanted.clone())),
            )],
        )
        .unwrap_err();
    match err {
        ImportError::HashMismatch {
            specified, got: g, ..
        } => {
            assert_eq!(specified, wanted.to_sri_string());
            assert_eq!(g, got.to_sri_string());
            assert!(g.starts_with("sha512-"));
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn fixed_output_unsupported_methods_and_references() {
    let st = TestStore::new();
    let input = st.add("dep", b"dep");
    let f = st.stage.join("fod");
    fs::write(&f, format!("points at {input}\n")).unwrap();
    let h = nix_hash_with(&f, "sha256", true);
    let drv = st.path("fod.drv");
    let path = st.path("fod");
    let err = st
        .import(
            &drv,
            std::slice::from_ref(&input),
            &[output("out", &path, &f, Some(CAHash::Flat(h)))],
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "illegal path references in fixed-output derivation '{drv}': output `out` \
             references 1 store path(s), e.g. '{input}'"
        )
    );
    assert!(!st.real(&path).exists());

    let err = st
        .import(
            &drv,
            &[],
            &[output("out", &path, &f, Some(CAHash::Text([0; 32])))],
        )
        .unwrap_err();
    assert!(err.to_string().contains("text content addressing"), "{err}");
    let git = CAHash::Git(NixHash::Sha1([0; 20]));
    let err = st
        .import(&drv, &[], &[output("out", &path, &f, Some(git))])
        .unwrap_err();
    assert!(err.to_string().contains("git content addressing"), "{err}");
}

// ---------------------------------------------------------------- end to end

#[test]
fn import_end_to_end() {
    let st = TestStore::new();
    let input = st.add("input", b"I am an input\n");
    let unused_input = st.add("unused", b"never referenced\n");
    let drv = st.path("pkg.drv");
    let (out, dev, bin, link) = (
        st.path("pkg"),
        st.path("pkg-dev"),
        st.path("pkg-bin"),
        st.path("pkg-link"),
    );

    // out: references the input, itself and dev.
    let s_out = st.stage.join("out");
    fs::create_dir_all(s_out.join("bin")).unwrap();
    fs::write(
        s_out.join("bin/prog"),
        format!("#!/bin/sh\nexec {input} {out}/share \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(s_out.join("bin/prog"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(s_out.join("dev-path"), format!("{dev}\n")).unwrap();
    // The deriver is not a candidate: mentioning it is not a reference.
    fs::write(s_out.join("built-by"), format!("{drv}\n")).unwrap();
    fs::create_dir(s_out.join("share")).unwrap();
    // dev: only the input, through a file name.
    let s_dev = st.stage.join("dev");
    fs::create_dir_all(s_dev.join("nix-support")).unwrap();
    fs::write(
        s_dev.join(format!("nix-support/{}", hash_part(&input))),
        b"x",
    )
    .unwrap();
    // bin: a single regular file referencing nothing.
    let s_bin = st.stage.join("bin");
    fs::write(&s_bin, b"just bytes").unwrap();
    // link: a symlink into out.
    let s_link = st.stage.join("link");
    symlink(format!("{out}/bin/prog"), &s_link).unwrap();

    // A stale, read-only, invalid leftover at out's path.
    let real_out = st.real(&out);
    fs::create_dir_all(real_out.join("junk")).unwrap();
    fs::write(real_out.join("junk/f"), b"old").unwrap();
    fs::set_permissions(real_out.join("junk"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(&real_out, fs::Permissions::from_mode(0o555)).unwrap();

    let outputs = [
        output("out", &out, &s_out, None),
        output("dev", &dev, &s_dev, None),
        output("bin", &bin, &s_bin, None),
        output("link", &link, &s_link, None),
    ];
    let inputs = [input.clone(), unused_input.clone()];
    let reg = st.import(&drv, &inputs, &outputs).unwrap();

    let set = |v: &[&String]| v.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();
    let expected = [
        (&out, set(&[&input, &out, &dev])),
        (&dev, set(&[&input])),
        (&bin, set(&[])),
        (&link, set(&[&out])),
    ];
    for ((path, refs), r) in expected.iter().zip(&reg) {
        assert_eq!(&r.path, *path);
        let references: BTreeSet<String> = r.references.iter().map(|p| p.to_string()).collect();
        assert_eq!(&references, refs, "{path}");
        assert_eq!(
            &st.references(path),
            refs,
            "nix-store -q --references {path}"
        );
        run(st.nix_store().args(["--verify-path", path]));
        assert_eq!(
            run(st.nix_store().args(["-q", "--deriver", path])).trim(),
            drv
        );
        // narHash as Nix sees it.
        let h = run(st.nix_store().args(["-q", "--hash", path]));
        assert_eq!(
            h.trim(),
            format!("sha256:{}", nixbase32::encode(&r.nar_hash))
        );
    }
    let verify = st
        .nix_store()
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(verify.status.success());
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        !stderr.contains("error") && !stderr.contains("modified") && !stderr.contains("path '"),
        "{stderr}"
    );

    // Contents in place, canonicalised (exec bit preserved), staged copies
    // gone, junk gone.
    assert_eq!(mode(&real_out.join("bin/prog")), 0o555);
    assert_eq!(mode(&real_out), 0o555);
    assert_eq!(fs::symlink_metadata(&real_out).unwrap().mtime(), 1);
    assert_eq!(mode(&real_out.join("dev-path")), 0o444);
    assert!(!real_out.join("junk").exists());
    assert_eq!(fs::read(st.real(&bin)).unwrap(), b"just bytes");
    assert_eq!(
        fs::read_link(st.real(&link)).unwrap(),
        PathBuf::from(format!("{out}/bin/prog"))
    );
    for s in [&s_out, &s_dev, &s_bin, &s_link] {
        assert!(fs::symlink_metadata(s).is_err());
    }
}

#[test]
fn valid_path_is_never_removed() {
    let st = TestStore::new();
    let valid = st.add("precious", b"keep me\n");
    let s = st.stage.join("new");
    fs::write(&s, b"replacement").unwrap();
    let err = st
        .import("", &[], &[output("out", &valid, &s, None)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("output path '{valid}' is already a valid store path; refusing to replace it")
    );
    assert_eq!(fs::read(st.real(&valid)).unwrap(), b"keep me\n");
    assert!(s.exists());

    // remove_stale_outputs: one valid among them → nothing removed.
    let stale = st.path("stale");
    fs::create_dir_all(st.real(&stale).join("d")).unwrap();
    fs::set_permissions(st.real(&stale).join("d"), fs::Permissions::from_mode(0o555)).unwrap();
    let missing = st.path("missing");
    let all = [&valid, &stale, &missing].map(|p| st.store_path(p));
    assert!(matches!(
        remove_stale_outputs(&st.location, &all),
        Err(ImportError::AlreadyValid { path }) if path == valid
    ));
    assert!(st.real(&stale).exists());
    let removed = remove_stale_outputs(&st.location, &all[1..]).unwrap();
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!st.real(&stale).exists());
    assert!(remove_stale_outputs(&st.location, &all[2..])
        .unwrap()
        .is_empty());
    assert!(st.is_valid(&valid));
}

#[test]
fn missing_output_and_cycles() {
    let st = TestStore::new();
    let out = st.path("m");
    let err = st
        .import(
            "",
            &[],
            &[output("out", &out, &st.stage.join("nothing"), None)],
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("builder did not produce output `out` ({out})")
    );

    let (a, b) = (st.path("cyc-a"), st.path("cyc-b"));
    let (sa, sb) = (st.stage.join("a"), st.stage.join("b"));
    fs::write(&sa, &b).unwrap();
    fs::write(&sb, &a).unwrap();
    let drv = st.path("cyc.drv");
    let err = st
        .import(
            &drv,
            &[],
            &[output("a", &a, &sa, None), output("b", &b, &sb, None)],
        )
        .unwrap_err();
    assert!(matches!(err, ImportError::ReferenceCycle { .. }), "{err}");
    assert!(err
        .to_string()
        .starts_with(&format!("cycle detected in build of '{drv}'")));
    assert!(!st.real(&a).exists() && !st.real(&b).exists());
}

#[test]
fn registrar_failures_and_drop() {
    let st = TestStore::new();
    // Dropping an unused registrar registers nothing and reaps nix-store.
    drop(Registrar::spawn(&st.location).unwrap());
    // An empty record list is harmless.
    Registrar::spawn(&st.location)
        .unwrap()
        .register(b"")
        .unwrap();

    // A reference to a path that is not valid in the store: nix-store
    // refuses, and the error carries its message on one line.
    let ghost = st.path("ghost");
    let out = st.path("needs-ghost");
    let s = st.stage.join("o");
    fs::write(&s, &ghost).unwrap();
    let err = st
        .import(
            "",
            std::slice::from_ref(&ghost),
            &[output("out", &out, &s, None)],
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("nix-store failed to register the outputs: error:"),
        "{msg}"
    );
    assert!(msg.contains(&ghost) && !msg.contains('\n'), "{msg}");
    assert!(!st.is_valid(&out));
    // The invalid leftover is cleaned up by the next attempt.
    fs::write(&s, b"fixed").unwrap();
    st.import("", &[], &[output("out", &out, &s, None)])
        .unwrap();
    assert!(st.is_valid(&out));

    // A nix-store that can't open its store: noticed before anything is
    // moved into place.
    let mut loc = st.location.clone();
    loc.store_uri = Some("bogus://nowhere".into());
    let mut registrar = Registrar::spawn(&loc).unwrap();
    registrar.wait_until_exited();
    let late = st.path("late");
    let s = st.stage.join("late");
    fs::write(&s, b"late").unwrap();
    let err = import(
        &ImportRequest {
            location: &loc,
            deriver: None,
            inputs: &[],
            outputs: &[output("out", &late, &s, None)],
            checks: &Default::default(),
            owner: None,
            deadline: None,
            cancel: None,
            max_size: None,
            progress: None,
        },
        registrar,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("nix-store failed to start registering the outputs: error:"),
        "{err}"
    );
    assert!(s.exists() && !st.real(&late).exists());

    // A nix-store that can't be started.
    let mut loc = st.location.clone();
    loc.nix_store = PathBuf::from("/nonexistent/nix-store");
    let err = Registrar::spawn(&loc).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot run '/nonexistent/nix-store':"),
        "{err}"
    );
}

#[test]
fn bad_request_paths() {
    let st = TestStore::new();
    let s = st.stage.join("x");
    fs::write(&s, b"x").unwrap();
    let dir = &st.location.store_dir;
    for (bad, reason) in [
        (format!("{dir}/short-x"), "expected <hash>-<name>"),
        (
            "/elsewhere/00000000000000000000000000000000-x".to_owned(),
            "not in the store directory",
        ),
        (
            format!("{dir}/0000000000000000000000000000000e-x"),
            "the hash part is not nix-base32",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-.."),
            "the name is '.' or '..' or starts with '.-' or '..-'",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-.-x"),
            "the name is '.' or '..' or starts with '.-' or '..-'",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-a/b"),
            "not a top-level store path",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-"),
            "expected <hash>-<name>",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-a b"),
            "the name contains a forbidden character",
        ),
        (
            format!("{dir}/00000000000000000000000000000000-{}", "a".repeat(212)),
            "the name is too long",
        ),
    ] {
        let err = st.location.parse_path(&bad).unwrap_err();
        assert!(matches!(err, ImportError::BadPath { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("invalid store path '{bad}': {reason}")
        );
    }
    // Names Nix 2.8 refused but newer Nix takes (and so does nix-hatch).
    for good in [".config", "..x", "a.-b"] {
        let p = format!("{dir}/00000000000000000000000000000000-{good}");
        let parsed = st.location.parse_path(&p).unwrap();
        assert_eq!((parsed.as_str(), parsed.name()), (p.as_str(), good));
    }
    let p = st.path("twice");
    let err = st
        .import(
            "",
            &[],
            &[output("a", &p, &s, None), output("b", &p, &s, None)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("more than one output"), "{err}");
    // Bad deriver.
    let err = st
        .import("/tmp/x.drv", &[], &[output("out", &st.path("d"), &s, None)])
        .unwrap_err();
    assert!(matches!(err, ImportError::BadPath { .. }), "{err}");
}

#[test]
fn store_location_real_paths() {
    let loc = StoreLocation::with_root(Path::new("/srv/chroot"));
    assert_eq!(loc.store_uri.as_deref(), Some("local?root=/srv/chroot"));
    let p = fake_path("thing");
    assert_eq!(
        loc.real_path(&loc.parse_path(&p).unwrap()),
        Path::new("/srv/chroot/nix/store").join(&p["/nix/store/".len()..])
    );
    let sys = StoreLocation::system();
    assert_eq!(sys.real_path(&sys.parse_path(&p).unwrap()), Path::new(&p));
    assert!(sys.parse_path("/nix/store/../etc/passwd").is_err());
}

#[test]
fn import_across_file_systems() {
    let shm = Path::new("/dev/shm");
    let st = TestStore::new();
    let Ok(tmp) = tempfile::tempdir_in(shm) else {
        eprintln!("no /dev/shm; skipping");
        return;
    };
    if fs::metadata(shm).unwrap().dev() == fs::metadata(&st.stage).unwrap().dev() {
        eprintln!("/dev/shm is on the same file system; skipping");
        return;
    }
    let s = tmp.path().join("out");
    fs::create_dir_all(s.join("bin")).unwrap();
    fs::write(s.join("bin/x"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(s.join("bin/x"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("bin/x", s.join("x")).unwrap();
    let out = st.path("xdev");
    st.import("", &[], &[output("out", &out, &s, None)])
        .unwrap();
    run(st.nix_store().args(["--verify-path", &out]));
    assert_eq!(mode(&st.real(&out).join("bin/x")), 0o555);
    assert_eq!(
        fs::read_link(st.real(&out).join("x")).unwrap(),
        Path::new("bin/x")
    );
    assert!(!s.exists());
}

#[test]
fn flat_extra_range_only_covers_contents() {
    let tmp = tempfile::tempdir().unwrap();
    for len in [0usize, 1, 7, 8, 9, 1000] {
        let f = tmp.path().join(format!("f{len}"));
        let data = vec![b'q'; len];
        fs::write(&f, &data).unwrap();
        let extra = ExtraHash::flat(nix_derivation::HashAlgorithm::Sha256, len as u64);
        for config in [
            PipelineConfig::default(),
            PipelineConfig {
                chunk_size: 64,
                buffers: 2,
                threaded: true,
            },
        ] {
            let d = digest_path_with(&f, &no_parts(), Some(&extra), &plain(), &config).unwrap();
            assert_eq!(
                d.extra,
                Some(nix_derivation::hash_bytes(
                    nix_derivation::HashAlgorithm::Sha256,
                    &data
                ))
            );
            assert_eq!(
                d.root,
                NodeKind::Regular {
                    executable: false,
                    size: len as u64
                }
            );
        }
    }
}

#[test]
fn location_from_nix_store_setting() {
    let s = StoreLocation::from_setting(Some("auto"));
    assert_eq!(s.real_store_dir, Path::new("/nix/store"));
    assert!(s.store_uri.is_none());
    let s = StoreLocation::from_setting(Some("local?root=/tmp/r"));
    assert_eq!(s.real_store_dir, Path::new("/tmp/r/nix/store"));
    assert_eq!(s.store_uri.as_deref(), Some("local?root=/tmp/r"));
    let s = StoreLocation::from_setting(Some("/tmp/q"));
    assert_eq!(s.real_store_dir, Path::new("/tmp/q/nix/store"));
    assert_eq!(s.base_name("/nix/store/abc-x"), Some("abc-x"));
    assert_eq!(s.base_name("/nix/store/abc-x/bin"), None);
    assert_eq!(s.base_name("/nix/storeabc"), None);
}

/// Paths a host command added through the local store: each is moved into
/// the real store; one that can't be does not stop the others, and is
/// reported.
#[test]
fn adoption_moves_what_it_can_and_reports_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    let names = [
        "00000000000000000000000000000000-added-a",
        "11111111111111111111111111111111-added-b",
    ];
    let stage = || {
        for n in names {
            fs::create_dir_all(upper.join(n)).unwrap();
            fs::write(upper.join(n).join("f"), n).unwrap();
        }
    };
    // A nix-store that calls every path valid.
    let fake = tmp.path().join("nix-store");
    fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let mut loc = StoreLocation::system();
    loc.nix_store = fake;

    stage();
    loc.real_store_dir = tmp.path().join("no-such-store");
    let a = adopt_added_paths(&loc, &upper, &[]).unwrap();
    assert!(a.moved.is_empty(), "{a:?}");
    assert_eq!(a.failed.len(), 2, "{a:?}");
    assert!(a.failed[0].contains("cannot move /nix/store/"), "{a:?}");

    loc.real_store_dir = tmp.path().join("store");
    fs::create_dir(&loc.real_store_dir).unwrap();
    // An output of the build itself is not adopted.
    let a = adopt_added_paths(&loc, &upper, &[names[1]]).unwrap();
    assert_eq!(a.moved, vec![format!("/nix/store/{}", names[0])]);
    assert!(a.failed.is_empty(), "{a:?}");
    assert_eq!(
        fs::read_to_string(loc.real_store_dir.join(names[0]).join("f")).unwrap(),
        names[0]
    );
}

// ---------------------------------------------------------- limits (#14)

/// A sparse file whose size alone passes the limit is refused before a
/// byte of it is read; a tree whose NAR passes it while being read is
/// refused then; nothing is registered either way.
#[test]
fn max_size_refuses_before_and_while_reading() {
    let st = TestStore::new();
    let big = st.path("sparse");
    let s = st.stage.join("sparse");
    let f = fs::File::create(&s).unwrap();
    f.set_len(24 << 30).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let err = st
        .import_limited(&[output("out", &big, &s, None)], None, Some(1 << 30))
        .unwrap_err();
    assert!(matches!(err, ImportError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("max-output-size"), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "it was read"
    );
    assert!(!st.is_valid(&big));
    // Empty files: no bytes by size, but each costs the NAR ~150 bytes.
    let many = st.path("many");
    let d = st.stage.join("many");
    fs::create_dir(&d).unwrap();
    for i in 0..100 {
        fs::write(d.join(format!("f{i}")), b"").unwrap();
    }
    let err = st
        .import_limited(&[output("out", &many, &d, None)], None, Some(4096))
        .unwrap_err();
    assert!(matches!(err, ImportError::TooLarge { .. }), "{err}");
    assert!(!st.is_valid(&many));
    // Under the limit: imported.
    let small = st.path("small");
    let s = st.stage.join("small");
    fs::write(&s, b"small").unwrap();
    st.import_limited(&[output("out", &small, &s, None)], None, Some(4096))
        .unwrap();
    assert!(st.is_valid(&small));
}

/// The build's deadline stops the import, even inside one large file.
#[test]
fn deadline_stops_the_import() {
    let st = TestStore::new();
    let big = st.path("slow");
    let s = st.stage.join("slow");
    let f = fs::File::create(&s).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let err = st
        .import_limited(
            &[output("out", &big, &s, None)],
            Some(std::time::Instant::now() + std::time::Duration::from_millis(200)),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, ImportError::TimedOut { .. }), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    assert!(!st.is_valid(&big));
}

/// The hook told to stop (SIGTERM) stops the import inside a large file,
/// and leaves nothing at the store path — also for an output that was
/// copied there from another file system before it was read.
#[test]
fn a_stop_ends_the_import_and_leaves_nothing_in_the_store() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    static STOP: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let st = TestStore::new();
    let shm = tempfile::tempdir_in("/dev/shm").ok().filter(|t| {
        fs::metadata(t.path()).unwrap().dev() != fs::metadata(&st.stage).unwrap().dev()
    });
    let mut stages = vec![("same-fs", st.stage.clone())];
    match &shm {
        Some(t) => stages.push(("other-fs", t.path().to_owned())),
        None => eprintln!("no /dev/shm on another file system: only the same-fs case"),
    }
    for (i, (case, dir)) in stages.into_iter().enumerate() {
        let big = st.path(&format!("stopped-{case}"));
        let s = dir.join(format!("stopped-{case}"));
        let f = fs::File::create(&s).unwrap();
        f.set_len(if case == "same-fs" {
            8 << 30
        } else {
            256 << 20
        })
        .unwrap();
        drop(f);
        let read = Arc::new(AtomicU64::new(0));
        let stopper = {
            let read = read.clone();
            std::thread::spawn(move || {
                // Once reading has begun (progress counts file bytes read).
                while read.load(Ordering::Relaxed) == 0 {
                    std::thread::park_timeout(std::time::Duration::from_millis(1));
                }
                STOP[i].store(true, Ordering::Relaxed);
            })
        };
        let registrar = Registrar::spawn(&st.location).unwrap();
        let outputs = [output("out", &big, &s, None)];
        let err = import(
            &ImportRequest {
                location: &st.location,
                deriver: None,
                inputs: &[],
                outputs: &outputs,
                checks: &Default::default(),
                owner: None,
                deadline: None,
                cancel: Some(&STOP[i]),
                max_size: None,
                progress: Some(&read),
            },
            registrar,
        )
        .unwrap_err();
        stopper.join().unwrap();
        assert!(matches!(err, ImportError::Cancelled), "{case}: {err}");
        assert!(!st.is_valid(&big), "{case}");
        assert!(
            fs::symlink_metadata(st.real(&big)).is_err(),
            "{case}: left at its store path"
        );
    }
}

/// A file someone still holds open for writing could be changed after it
/// was hashed: the import refuses it.
#[test]
fn a_file_open_for_writing_is_refused() {
    let st = TestStore::new();
    let p = st.path("held");
    let d = st.stage.join("held");
    fs::create_dir(&d).unwrap();
    let held = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(d.join("file"))
        .unwrap();
    // Built by another account (the one the build ran as).
    let nobody = crate::util::lookup_user("nobody").unwrap().uid;
    for e in ["", "file"] {
        std::os::unix::fs::chown(d.join(e), Some(nobody), None).unwrap();
    }
    let err = st
        .import_as(nobody, &[output("out", &p, &d, None)])
        .unwrap_err();
    assert!(err.to_string().contains("still open for writing"), "{err}");
    assert!(!st.is_valid(&p));
    drop(held);
}

/// A build that is not root's can only have a file of root's in its
/// output by hard-linking it (where protected_hardlinks is off): refused;
/// two links to a file of its own are fine.
#[test]
fn a_hard_link_to_a_file_of_roots_is_refused() {
    let st = TestStore::new();
    let secret = st.stage.join("root-secret");
    fs::write(&secret, b"root's").unwrap();
    let p = st.path("linked");
    let d = st.stage.join("linked");
    fs::create_dir(&d).unwrap();
    fs::hard_link(&secret, d.join("stolen")).unwrap();
    let nobody = crate::util::lookup_user("nobody").unwrap().uid;
    std::os::unix::fs::chown(&d, Some(nobody), None).unwrap();
    let err = st
        .import_as(nobody, &[output("out", &p, &d, None)])
        .unwrap_err();
    assert!(err.to_string().contains("invalid ownership"), "{err}");
    assert!(!st.is_valid(&p));
    // Its own file, linked twice: imported.
    let p = st.path("twice");
    let d = st.stage.join("twice");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("a"), b"same").unwrap();
    fs::hard_link(d.join("a"), d.join("b")).unwrap();
    for e in ["", "a"] {
        std::os::unix::fs::chown(d.join(e), Some(nobody), None).unwrap();
    }
    st.import_as(nobody, &[output("out", &p, &d, None)])
        .unwrap();
    assert!(st.is_valid(&p));
}
