//! Nix's `build-hook` on every Nix version: Nix ≤ 2.18 runs a single path
//! with argv `[name, verbosity]`, so this binary needs no arguments.
fn main() {
    if let Some(code) = nix_hatch::executors::runner::maybe_run() {
        std::process::exit(code);
    }
    std::process::exit(nix_hatch::hook::main());
}
