//! Self-tests of the end-to-end harness (tests/common): they need Nix but not
//! nix-hatch, so a failure here is a broken machine or harness, not a broken
//! hook.

mod common;

use common::*;
use std::fs;

#[test]
fn busybox_store_path_is_stable_and_runs_as_builder() {
    let bb = busybox();
    assert!(is_valid(bb), "{bb} not valid");
    assert!(fs::metadata(format!("{bb}/bin/busybox")).unwrap().is_file());
    let env = TestEnv::new("harness-bb");
    let expr = env.write_expr(
        "plain.nix",
        r#"plain { name = "harness-plain"; script = "echo $nonce > $out; echo PATH=$PATH >> $out"; }"#,
    );
    let out = env.nix_build_without_hook(&expr, &[], &[]);
    out.assert_ok();
    let paths = out.store_paths();
    assert_eq!(paths.len(), 1, "{}", out.describe());
    assert_eq!(
        fs::read_to_string(&paths[0]).unwrap(),
        format!("{}\nPATH=/path-not-set\n", env.nonce)
    );
    assert!(is_valid(&paths[0]));
    // busybox is an input, not embedded: no references
    assert!(references(&paths[0]).is_empty());
    let log = nix_log(&paths[0]);
    log.assert_ok();
}

#[test]
fn private_daemon_serves_clients_and_stops() {
    let env = TestEnv::new("harness-daemon");
    let pid;
    {
        let d = Daemon::start(&env, None);
        pid = d.pid();
        assert!(pid_alive(pid));
        d.assert_used_by_clients(&env);
    }
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !pid_alive(pid)),
        "daemon {pid} still running after drop"
    );
}

#[test]
fn strip_ansi_and_quoting() {
    assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
    assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    assert_eq!(nix_str("a$b\"c"), r#""a\$b\"c""#);
}
