fn main() {
    if let Some(code) = nix_hatch::executors::runner::maybe_run() {
        std::process::exit(code);
    }
    std::process::exit(nix_hatch::cli::main());
}
