//! Entry points for fuzzing (`fuzz/`, `scripts/fuzz`) and for replaying the
//! inputs it found (`tests/fuzz_regressions.rs`). Each takes arbitrary
//! bytes and must neither panic nor allocate without bound.

use std::io::BufReader;
use std::path::Path;

use crate::config::Config;
use crate::derivation::{builder_env, Drv, EnvContext};
use crate::hook::{self, Accepted, Builder};
use crate::protocol::{hatch, wire};
use crate::store::StoreLocation;

/// Nix's primitives: numbers, strings, string lists in any order.
pub fn wire(data: &[u8]) {
    let mut r = data;
    while !r.is_empty() {
        let Some(&op) = r.first() else { return };
        r = &r[1..];
        let res = match op % 3 {
            0 => wire::read_u64(&mut r, "n").map(drop),
            1 => wire::read_bytes(&mut r, wire::MAX_STRING, "s").map(drop),
            _ => wire::read_string_list(&mut r, "l").map(drop),
        };
        if res.is_err() {
            return;
        }
    }
}

struct NoBuild;

impl Builder for NoBuild {
    fn build(&self, _: Accepted<'_>, _: crate::hook::slots::Claim) -> i32 {
        0
    }

    fn refuse(&self, _: crate::hook::Refused<'_>) -> i32 {
        100
    }
}

/// The whole hook conversation (settings, tries, an accepted job) with a
/// build phase that does nothing.
pub fn hook_stream(data: &[u8]) {
    let config = Config::parse(
        "state-dir = \"/tmp/nix-hatch-fuzz/state\"\nfallback = \"decline\"\n[routes]\nescape-x = \"x\"\n[executors.x]\nkind = \"host\"\ncommand = [\"/bin/true\"]\nmax-jobs = 64\n",
        Path::new("/fuzz"),
    );
    let mut input = BufReader::new(data);
    let mut out = Vec::new();
    let _ = hook::run(
        config.map_err(|e| e.join("; ")),
        &mut input,
        &mut out,
        &NoBuild,
        "0",
    );
}

/// A .drv (ATerm) parsed and turned into a builder environment, as the
/// hook does for an accepted derivation.
pub fn drv_env(data: &[u8]) {
    let store = StoreLocation::from_setting(Some("auto"));
    let Ok(path) = store.parse_path("/nix/store/00000000000000000000000000000000-fuzz.drv") else {
        return;
    };
    let Ok(drv) = Drv::parse(&store, path, data) else {
        return;
    };
    let _ = drv.required_features();
    let _ = builder_env(
        &drv,
        &EnvContext {
            store_dir: "/nix/store",
            build_dir: "/build",
            cores: "1",
        },
    );
}

/// The ssh agent's framed stream: headers, payloads, and the messages the
/// local side decodes.
pub fn hatch_frames(data: &[u8]) {
    let mut r = data;
    let mut header = [0u8; hatch::HEADER_LEN];
    let mut payload = Vec::new();
    let mut writer = hatch::HashingWriter::new(std::io::sink());
    loop {
        let Ok((tag, len)) = hatch::read_header(&mut r, &mut header) else {
            return;
        };
        if hatch::read_payload(&mut r, len, &mut payload).is_err() {
            return;
        }
        let _ = writer.frame(tag, &payload);
        let _ = hatch::Request::decode(&payload);
        let _ = hatch::Hello::decode(&payload);
        let _ = hatch::Trailer::decode(&payload);
    }
}
