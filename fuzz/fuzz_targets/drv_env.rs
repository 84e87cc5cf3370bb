#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nix_hatch::fuzzing::drv_env(data));
