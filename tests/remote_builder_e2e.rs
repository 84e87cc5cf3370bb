//! nix-hatch as a drop-in build hook next to Nix's own remote builders: in
//! one nix-build, a plain derivation goes to a real Nix remote builder (a
//! second store behind sshd on loopback) through Nix's build-remote, while
//! an escape derivation goes to nix-hatch's executor; and an escape
//! feature no local route takes goes to a remote builder that advertises it.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::path::Path;

/// `builders` entry for the sshd's second store under `root`, with extra
/// supported features. Nix wants the host key base64-encoded.
fn builders(env: &TestEnv, sshd: &Sshd, root: &Path, features: &str) -> String {
    format!(
        "ssh://root@127.0.0.1?remote-store=local?root={}&remote-program={} x86_64-linux {} 1 1 {} - {}",
        root.display(),
        env.path("remote-nix-store").display(),
        sshd.identity.display(),
        if features.is_empty() { "-" } else { features },
        sshd.host_key_base64()
    )
}

/// The remote side's nix-store: the second store, with the features the
/// machine advertises (so it accepts what build-remote sends it).
fn remote_program(env: &TestEnv, features: &str) {
    env.write_script(
        "remote-nix-store",
        &format!("#!/bin/sh\nexec nix-store --option system-features '{features}' --option substituters '' \"$@\"\n"),
    );
}

/// The remote store's root: not under /tmp, because Nix ≥ 2.30 refuses to
/// build in a store whose build dir has a world-writable ancestor ("Path
/// \"/tmp\" is world-writable or a symlink"); cargo's per-test temp dir
/// lies in the target directory.
struct RemoteRoot(tempfile::TempDir);

impl RemoteRoot {
    fn new(name: &str) -> RemoteRoot {
        let dir = tempfile::Builder::new()
            .prefix(&format!("nhtest-{name}-store-"))
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("remote store dir");
        RemoteRoot(dir)
    }
}

impl std::ops::Deref for RemoteRoot {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

/// A test env whose config routes `escape-x` to the host executor with
/// `fallback = "auto"`, a private sshd, and the remote store's root (whose
/// nix-store accepts `features`).
fn remote_setup(name: &str, features: &str) -> (TestEnv, Sshd, RemoteRoot) {
    let env = TestEnv::new(name);
    env.write_host_config(&env.standard_config());
    // fallback = "auto" (the default): Nix's build-remote gets the rest.
    let text = fs::read_to_string(env.config_path())
        .unwrap()
        .replace("fallback = \"decline\"\n", "");
    env.write_config(&text);
    let sshd = Sshd::start(&env);
    let root = RemoteRoot::new(name);
    remote_program(&env, features);
    (env, sshd, root)
}

fn nix_build_remote(
    env: &TestEnv,
    sshd: &Sshd,
    expr: &Path,
    attrs: &[&str],
    builders: &str,
) -> Output {
    let mut cmd = env.nix_build_command(
        expr,
        attrs,
        &[
            "--option", "builders", builders, "--option", "max-jobs", "0", "-j", "0",
        ],
    );
    cmd.env(
        "NIX_SSHOPTS",
        format!(
            "-p {} -o UserKnownHostsFile={} -o BatchMode=yes",
            sshd.port,
            sshd.known_hosts().display()
        ),
    );
    run(&mut cmd, NIX_LIMIT)
}

#[test]
fn plain_goes_to_nix_remote_builder_and_escape_to_nix_hatch_in_one_build() {
    let (env, sshd, root) = remote_setup("remote", "benchmark big-parallel");
    let expr = env.write_expr(
        "remote.nix",
        r#"{
  plain = plain { name = "remote-plain"; script = "echo built-remotely > $out"; };
  esc = escape { name = "remote-esc"; script = ''echo "by $NIX_HATCH_EXECUTOR" > "$out"''; };
}"#,
    );
    let out = nix_build_remote(
        &env,
        &sshd,
        &expr,
        &["plain", "esc"],
        &builders(&env, &sshd, &root, ""),
    );
    out.assert_ok();
    let plain = env.out_path(&expr, "plain");
    let esc = env.out_path(&expr, "esc");
    assert!(is_valid(&plain) && is_valid(&esc));
    assert_eq!(fs::read_to_string(&plain).unwrap(), "built-remotely\n");
    assert_eq!(fs::read_to_string(&esc).unwrap(), "by hostx\n");
    // The plain one was built in the remote store and copied back.
    let remote_copy = root.join(plain.trim_start_matches('/'));
    assert!(
        remote_copy.exists(),
        "{} not in the remote store",
        remote_copy.display()
    );
    let esc_remote = root.join(esc.trim_start_matches('/'));
    assert!(
        !esc_remote.exists(),
        "the escape build went to the remote builder"
    );
    out.assert_stderr_contains("on 'nix-hatch:hostx'");
    out.assert_stderr_contains("on 'ssh://root@127.0.0.1");
}

#[test]
fn unrouted_escape_feature_goes_to_a_remote_builder_that_advertises_it() {
    let (env, sshd, root) = remote_setup("remote-feature", "escape-gpu");
    let expr = env.write_expr(
        "feature.nix",
        r#"{ gpu = plain { name = "remote-gpu"; script = "echo on-the-gpu-box > $out"; attrs = { requiredSystemFeatures = [ "escape-gpu" ]; }; }; }"#,
    );
    let out = nix_build_remote(
        &env,
        &sshd,
        &expr,
        &["gpu"],
        &builders(&env, &sshd, &root, "escape-gpu"),
    );
    out.assert_ok();
    let gpu = env.out_path(&expr, "gpu");
    assert_eq!(fs::read_to_string(&gpu).unwrap(), "on-the-gpu-box\n");
    assert!(root.join(gpu.trim_start_matches('/')).exists());
}
