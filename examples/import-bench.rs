//! Benchmark driver for `scripts/bench import`: nix-hatch's import (the
//! code the hook runs after a build: NAR hash + reference scan, move into
//! the store, `nix-store --register-validity`) on a private Nix store, so
//! the system store is never touched.
//!
//! ```text
//! import-bench setup  WORK [MIB FILES]  private store WORK/store, tree WORK/tree
//! import-bench import WORK              import WORK/tree as a new output, then move it back
//! import-bench scan   WORK [RUNS]       reference scan alone (read + NAR + scan, one thread)
//! ```
//!
//! The tree holds `FILES` files of mixed sizes (about `MIB` MiB in all):
//! mostly small files, a tail of large ones, a fifth of them text (long
//! nix-base32 runs are the scanner's slow path), a few executables and
//! symlinks, and references to one valid input path. Each `import` picks a
//! fresh output path, so Nix canonicalises and registers the whole tree
//! every time; afterwards the tree is renamed back to WORK/tree.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nix_hatch::store::nar::{dump_path, DumpOptions, NarSink};
use nix_hatch::store::refscan::{parse_hash_part, HashParts, RefScanner, NIX_BASE32_CHARS};
use nix_hatch::store::{self, ImportRequest, Registrar, StagedOutput, StoreLocation};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Work {
    dir: PathBuf,
    uri: String,
    location: StoreLocation,
}

impl Work {
    fn new(dir: &Path) -> Result<Work> {
        let dir = fs::canonicalize(dir)?;
        let base = dir.display().to_string();
        let uri = format!("local?store={base}/store&state={base}/state&log={base}/log");
        let location = StoreLocation {
            store_dir: format!("{base}/store"),
            real_store_dir: dir.join("store"),
            store_uri: Some(uri.clone()),
            nix_store: PathBuf::from("nix-store"),
        };
        Ok(Work { dir, uri, location })
    }

    fn nix_store(&self) -> Command {
        let mut c = Command::new("nix-store");
        c.arg("--store").arg(&self.uri);
        c
    }

    fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// The valid input path the tree references.
    fn input(&self) -> Result<String> {
        Ok(fs::read_to_string(self.dir.join("input"))?
            .trim()
            .to_owned())
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// xorshift64*: deterministic, fast enough to write a GiB in a second.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    fn base32(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| NIX_BASE32_CHARS[(self.next() >> 59) as usize] as char)
            .collect()
    }
}

fn setup(work: &Work, mib: u64, files: u64) -> Result<()> {
    fs::create_dir_all(&work.dir)?;
    // Opening the store creates its directories and database.
    let probe = format!("{}/{}-init", work.location.store_dir, "0".repeat(32));
    run(work
        .nix_store()
        .args(["--check-validity", "--print-invalid", &probe]))?;
    let src = work.dir.join("input-src");
    fs::write(&src, b"an input the tree references\n")?;
    let input = run(work.nix_store().arg("--add").arg(&src))?;
    fs::write(work.dir.join("input"), &input)?;
    let input = input.trim();

    let tree = work.tree();
    if tree.exists() {
        store::remove_tree(&tree)?;
    }
    // Sizes: 90% small (1-16 KiB), 9% medium (64-512 KiB), 1% large;
    // the large ones take what is left of the total.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sizes: Vec<u64> = (0..files)
        .map(|i| match i % 100 {
            0 => 0,
            1..=9 => (64 + rng.next() % 448) << 10,
            _ => (1 + rng.next() % 16) << 10,
        })
        .collect();
    let used: u64 = sizes.iter().sum();
    let large = files.div_ceil(100);
    let each = ((mib << 20).saturating_sub(used) / large.max(1)).max(1 << 20);
    for (i, s) in sizes.iter_mut().enumerate() {
        if i % 100 == 0 {
            *s = each;
        }
    }
    let mut buf = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let dir = tree.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&dir)?;
        }
        let path = dir.join(format!("f{i:05}"));
        buf.resize(size as usize, 0);
        if i % 5 == 1 {
            // Text: words and long base32 runs, as in scripts and .pc files.
            let mut text = String::with_capacity(buf.len() + 64);
            while text.len() < buf.len() {
                let len = 1 + (rng.next() % 40) as usize;
                text.push_str(&rng.base32(len));
                text.push(if rng.next() % 8 == 0 { '\n' } else { ' ' });
            }
            let n = buf.len();
            buf.copy_from_slice(&text.as_bytes()[..n]);
        } else {
            rng.fill(&mut buf);
        }
        if i % 97 == 3 && buf.len() > input.len() + 2 {
            let at = (rng.next() as usize) % (buf.len() - input.len());
            buf[at..at + input.len()].copy_from_slice(input.as_bytes());
        }
        let mut f = fs::File::create(&path)?;
        f.write_all(&buf)?;
        if i % 50 == 7 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
        if i % 500 == 11 {
            symlink(input, dir.join(format!("l{i:05}")))?;
        }
    }
    let total: u64 = sizes.iter().sum();
    eprintln!(
        "tree: {} files, {:.1} MiB, input {input}",
        files,
        total as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Candidates as the hook has them: the input closure (one valid path the
/// tree references plus 63 it doesn't) and the output.
fn candidates(work: &Work, rng: &mut Rng) -> Result<(Vec<String>, String)> {
    let dir = &work.location.store_dir;
    let mut inputs = vec![work.input()?];
    for i in 0..63 {
        inputs.push(format!("{dir}/{}-dep-{i}", rng.base32(32)));
    }
    let output = format!("{dir}/{}-bench-out", rng.base32(32));
    Ok((inputs, output))
}

fn import(work: &Work) -> Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut rng = Rng(seed | 1);
    let (inputs, output) = candidates(work, &mut rng)?;
    let inputs = work.location.parse_paths(&inputs)?;
    let output = work.location.parse_path(&output)?;
    nix_hatch::timing::init();
    let t0 = Instant::now();
    // As in the hook: started before the build, so its start-up is hidden.
    let registrar = Registrar::spawn(&work.location)?;
    let staged = [StagedOutput {
        name: "out".into(),
        path: output.clone(),
        staged: work.tree(),
        fixed: None,
    }];
    let registered = store::import(
        &ImportRequest {
            location: &work.location,
            deriver: None,
            inputs: &inputs,
            outputs: &staged,
            checks: &Default::default(),
            owner: None,
            deadline: None,
            cancel: None,
            max_size: None,
            progress: None,
        },
        registrar,
    )?;
    let took = t0.elapsed();
    let real = work.location.real_path(&output);
    fs::rename(&real, work.tree())?;
    let r = &registered[0];
    eprintln!(
        "imported {:.1} MiB NAR in {:.3} s ({:.2} GB/s), {} reference(s)",
        r.nar_size as f64 / (1 << 20) as f64,
        took.as_secs_f64(),
        r.nar_size as f64 / took.as_secs_f64() / 1e9,
        r.references.len()
    );
    if let Some(t) = nix_hatch::timing::report() {
        eprintln!("timing: {t}");
    }
    // This process alone (nix-store's own memory is Nix's, not the hook's).
    let status = fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    println!("peak-rss-kib {hwm}");
    Ok(())
}

struct ScanSink<'a> {
    scanner: RefScanner<'a>,
    bytes: u64,
}

impl NarSink for ScanSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.scanner.feed(data);
        self.bytes += data.len() as u64;
        Ok(())
    }
}

fn scan(work: &Work, runs: usize) -> Result<()> {
    let mut rng = Rng(7);
    let (inputs, output) = candidates(work, &mut rng)?;
    let parts = HashParts::new(inputs.iter().chain([&output]).filter_map(|p| {
        let base = p.rsplit('/').next()?;
        parse_hash_part(base.as_bytes().get(..32)?)
    }));
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let mut sink = ScanSink {
            scanner: RefScanner::new(&parts),
            bytes: 0,
        };
        let t0 = Instant::now();
        dump_path(&work.tree(), &mut sink, &DumpOptions::default())?;
        rates.push(sink.bytes as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    // One line for scripts/bench: median throughput in GB/s.
    println!("{:.3}", rates[rates.len() / 2]);
    Ok(())
}

/// The digest pass alone with a given pipeline (for tuning).
fn digest(work: &Work, chunk_kib: usize, buffers: usize, threaded: bool) -> Result<()> {
    let mut rng = Rng(7);
    let (inputs, output) = candidates(work, &mut rng)?;
    let parts = HashParts::new(inputs.iter().chain([&output]).filter_map(|p| {
        let base = p.rsplit('/').next()?;
        parse_hash_part(base.as_bytes().get(..32)?)
    }));
    let config = nix_hatch::store::digest::PipelineConfig {
        chunk_size: chunk_kib << 10,
        buffers,
        threaded,
    };
    let t0 = Instant::now();
    let d = nix_hatch::store::digest::digest_path_with(
        &work.tree(),
        &parts,
        None,
        &DumpOptions::default(),
        &config,
    )?;
    let s = t0.elapsed().as_secs_f64();
    println!(
        "chunk {chunk_kib} KiB x {buffers}: {s:.3} s, {:.2} GB/s",
        d.nar_size as f64 / s / 1e9
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: import-bench setup WORK [MIB FILES] | import WORK | scan WORK [RUNS]";
    let (Some(mode), Some(dir)) = (args.first(), args.get(1)) else {
        return Err(usage.into());
    };
    let num = |i: usize, default: u64| -> Result<u64> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    if mode == "setup" {
        fs::create_dir_all(dir)?;
    }
    let work = Work::new(Path::new(dir))?;
    match mode.as_str() {
        "setup" => setup(&work, num(2, 1024)?, num(3, 10_000)?),
        "import" => import(&work),
        "scan" => scan(&work, num(2, 5)? as usize),
        "digest" => digest(
            &work,
            num(2, 4096)? as usize,
            num(3, 4)? as usize,
            num(4, 1)? != 0,
        ),
        _ => Err(usage.into()),
    }
}
