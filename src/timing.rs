//! Stage timings of one hook process, for `scripts/bench`: with
//! `NIX_HATCH_TIMING=1` in the hook's environment an accepted build ends
//! with one `nix-hatch: timing: …` line in its build log.
//!
//! Marks are points in time named after the stage that just ended; the
//! report gives each stage's duration in milliseconds. Disabled (the
//! default), a mark costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Vec<(&'static str, Instant)>> = Mutex::new(Vec::new());
static START_CPU_MS: Mutex<f64> = Mutex::new(0.0);

/// Called first thing in the hook: reads `NIX_HATCH_TIMING` and, when set
/// to `1`, starts the clock. The process's CPU time so far is what loading,
/// relocating and initialising the binary cost before `main`.
pub fn init() {
    if std::env::var_os("NIX_HATCH_TIMING").is_none_or(|v| v != "1") {
        return;
    }
    let now = Instant::now();
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if let Ok(mut cpu) = START_CPU_MS.lock() {
        *cpu = ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6;
    }
    if let Ok(mut marks) = MARKS.lock() {
        marks.clear();
        marks.push(("main", now));
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Ends the stage `stage` now.
#[inline]
pub fn mark(stage: &'static str) {
    if ENABLED.load(Ordering::Relaxed) {
        if let Ok(mut marks) = MARKS.lock() {
            marks.push((stage, Instant::now()));
        }
    }
}

/// `hook-start=0.84 wait=… drv-parse=… … total=…` (milliseconds), or
/// `None` when timing is off.
pub fn report() -> Option<String> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let marks = MARKS.lock().ok()?;
    let cpu = START_CPU_MS.lock().map(|c| *c).unwrap_or(0.0);
    let mut out = format!("hook-start={cpu:.3}");
    for pair in marks.windows(2) {
        let ms = pair[1].1.duration_since(pair[0].1).as_secs_f64() * 1e3;
        out.push_str(&format!(" {}={ms:.3}", pair[1].0));
    }
    if let (Some(first), Some(last)) = (marks.first(), marks.last()) {
        let ms = last.1.duration_since(first.1).as_secs_f64() * 1e3;
        out.push_str(&format!(" total={ms:.3}"));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn off_by_default() {
        super::mark("x");
        // Other tests may have enabled it in this process; only check the
        // disabled path when it is disabled.
        if !super::ENABLED.load(super::Ordering::Relaxed) {
            assert!(super::report().is_none());
        }
    }
}
