//! Replays every input the fuzzer ever found interesting enough to keep
//! (fuzz/regressions/<target>/): each must be handled without a panic.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            f(&std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    n
}

#[test]
fn wire() {
    replay("wire", nix_hatch::fuzzing::wire);
}

#[test]
fn hook_stream() {
    std::fs::create_dir_all("/tmp/nix-hatch-fuzz/state").unwrap();
    replay("hook_stream", nix_hatch::fuzzing::hook_stream);
}

#[test]
fn drv_env() {
    assert!(
        replay("drv_env", nix_hatch::fuzzing::drv_env) > 0,
        "no seed .drv kept"
    );
}

#[test]
fn hatch_frames() {
    replay("hatch_frames", nix_hatch::fuzzing::hatch_frames);
}
