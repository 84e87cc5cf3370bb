//! The Nix side that can run without nixpkgs: every `.nix` file parses;
//! nix/render.nix (the NixOS module's settings → config.toml rendering and
//! its assertions) evaluated by the Nix on this machine produces TOML that
//! `nix-hatch check` accepts and that reads back as the settings; and
//! derivations made with nix/lib.nix build through the hook with a config
//! rendered by nix/render.nix. The NixOS VM tests themselves
//! (tests/nixos-vm) need nixpkgs and KVM: `nix flake check`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn render_nix() -> String {
    format!("{REPO}/nix/render.nix")
}

fn lib_nix() -> String {
    format!("{REPO}/nix/lib.nix")
}

/// `nix-instantiate --eval --strict --json -E expr`.
fn eval_cmd(expr: &str) -> Output {
    run(
        nix_cmd("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E"])
            .arg(expr),
        Duration::from_secs(120),
    )
}

#[track_caller]
fn eval_json(expr: &str) -> serde_json::Value {
    let out = eval_cmd(expr);
    out.assert_ok();
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

/// `r` is nix/render.nix in `expr`.
#[track_caller]
fn eval_render(expr: &str) -> serde_json::Value {
    eval_json(&format!("let r = import {}; in {expr}", render_nix()))
}

/// The problems (future NixOS assertions) for `settings` (a Nix expression).
#[track_caller]
fn problems(settings: &str, system_features: &str) -> Vec<String> {
    let v = eval_render(&format!(
        "r.problems {{ settings = {settings}; systemFeatures = {system_features}; }}"
    ));
    serde_json::from_value(v).unwrap()
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "corpus" | "artifacts") {
                nix_files(&p, out);
            }
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(Path::new(REPO), &mut files);
    files.sort();
    for want in [
        "flake.nix",
        "nix/lib.nix",
        "nix/render.nix",
        "nix/package.nix",
        "nix/nixos-module.nix",
        "tests/nixos-vm/default.nix",
        "tests/nixos-vm/common.nix",
        "tests/nixos-vm/drvs.nix",
        "tests/nixos-vm/host.nix",
        "tests/nixos-vm/jail-proxy.nix",
        "tests/nixos-vm/ssh.nix",
        "tests/nixos-vm/serve.nix",
        "tests/nixos-module-eval.nix",
    ] {
        assert!(
            files.contains(&Path::new(REPO).join(want)),
            "{want} not found among {files:#?}"
        );
    }
    for f in &files {
        run(
            nix_cmd("nix-instantiate").arg("--parse").arg(f),
            Duration::from_secs(60),
        )
        .assert_ok();
    }
}

/// Sample settings as a NixOS user writes them: a host, a jail with proxy
/// rules and a credential, an ssh executor. Files the check reads live in
/// `dir`.
fn sample_settings(dir: &Path) -> String {
    let d = dir.to_string_lossy();
    format!(
        r#"{{
  state-dir = "{d}/state";
  fallback = "auto";
  routes = {{ escape-sign = "signer"; escape-fetch = "fetcher"; escape-render = "gpu"; }};
  executors.signer = {{
    kind = "host";
    command = [ "/bin/true" "--key" "/root/key with space" ];
    user = "root";
    max-jobs = 2;
    queue = 3;
    timeout = 600;
    pass-env = [ "scene" ];
  }};
  executors.fetcher = {{
    kind = "jail";
    user = "nobody";
    network = "proxy";
    allow = [
      {{ host = "github\\.com"; }}
      {{ host = "^example\\.org$"; path = "^/pub/"; methods = [ "GET" "HEAD" ]; }}
    ];
    credentials = [
      {{ host = "api\\.example\\.com"; header = "Authorization"; value-file = "{d}/token"; prefix = "Bearer "; }}
      {{ host = "mirror\\.lan"; header = "X-Token"; value-file = "{d}/token"; plain-http = true; }}
    ];
    ro-binds = [ "/etc/ssl/certs" ];
    max-jobs = 4;
    max-silent-time = 30;
  }};
  executors.gpu = {{
    kind = "ssh";
    host = "gpu-box";
    port = 2222;
    user = "builder";
    identity = "{d}/id_ed25519";
    known-hosts = "{d}/known_hosts";
    command = [ "/opt/render/bin/render" ];
    connect-timeout = 10;
    unused = null;
  }};
}}"#
    )
}

fn toml_as_json(text: &str) -> serde_json::Value {
    let v: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("rendered TOML does not parse: {e}\n{text}"));
    serde_json::to_value(v).unwrap()
}

#[test]
fn rendered_settings_pass_nix_hatch_check() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(d.join("token"), "s3cret").unwrap();
    fs::set_permissions(d.join("token"), fs::Permissions::from_mode(0o600)).unwrap();
    sshd::keygen(&d.join("id_ed25519"));
    let host_pub = fs::read_to_string(d.join("id_ed25519.pub")).unwrap();
    fs::write(d.join("known_hosts"), format!("[gpu-box]:2222 {host_pub}")).unwrap();

    let settings = sample_settings(d);
    let v = eval_render(&format!(
        r#"let settings = {settings}; in {{
             toml = r.toTOML (r.complete {{ inherit settings; bwrap = "/usr/bin/bwrap"; }});
             problems = r.problems {{ inherit settings; systemFeatures = [ "kvm" "big-parallel" ]; }};
             users = r.localUsers settings;
           }}"#
    ));
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["users"], serde_json::json!([]), "root and nobody exist");
    let text = v["toml"].as_str().unwrap();
    // Regexes come out as literal strings, as one would write them.
    assert!(text.contains(r"host = 'github\.com'"), "{text}");
    assert!(text.contains("[[executors.fetcher.credentials]]"), "{text}");
    assert!(
        !text.contains("unused"),
        "null values are left out:\n{text}"
    );

    // What the Rust side reads is what the Nix side meant, plus bwrap.
    let mut want = eval_json(&format!("builtins.fromJSON (builtins.toJSON ({settings}))"));
    want["executors"]["gpu"]
        .as_object_mut()
        .unwrap()
        .remove("unused");
    want["executors"]["fetcher"]["bwrap"] = "/usr/bin/bwrap".into();
    assert_eq!(toml_as_json(text), want, "{text}");

    let cfg = d.join("config.toml");
    fs::write(&cfg, text).unwrap();
    let out = run(
        Command::new(CLI).arg("check").arg("--config").arg(&cfg),
        Duration::from_secs(60),
    );
    assert!(out.success(), "{text}\n{}", out.describe());
    for want in [
        "route: escape-sign -> signer (kind host, user root, max-jobs 2)",
        "route: escape-fetch -> fetcher (kind jail, user nobody, max-jobs 4)",
        "route: escape-render -> gpu (kind ssh, user builder, max-jobs 1)",
        "executor signer: max-jobs 2, queue 3: when every slot is busy",
        "executor fetcher: max-jobs 4, queue 8: when every slot is busy",
    ] {
        assert!(out.stdout.contains(want), "{want:?}:\n{}", out.describe());
    }
}

#[test]
fn toml_rendering_round_trips_awkward_values() {
    let v = eval_render(
        r#"let
             ctl = builtins.fromJSON "\"bell\\u0007 esc\\u001b del\\u007f\"";
             s = {
               "key with space" = "a \"quoted\" \\ backslash";
               "dotted.key" = "new\nline\ttab\rcr";
               "ünï" = "snowman ☃ and 'single' quotes";
               both = "it's a \\d+ regex";
               control = ctl;
               empty = "";
               int = -42;
               big = 9007199254740993;
               yes = true;
               no = false;
               half = 0.5;
               list = [ 1 2 3 ];
               mixed = [ 1 "two" { three = 3; } [ true ] ];
               nested = [ [ "a" ] [ ] ];
               inline = [ "x" { a = { b = [ 1 ]; }; } ];
               emptyList = [ ];
               emptyTable = { };
               gone = null;
               t.sub.subsub = { x = 1; };
               t.plain = "p";
               aot = [ { n = 1; inner.k = "v"; deeper = [ { m = 2; } ]; } { n = 2; } ];
             };
           in {
             toml = r.toTOML s;
             json = builtins.toJSON (removeAttrs s [ "gone" ]);
           }"#,
    );
    let text = v["toml"].as_str().unwrap();
    let want: serde_json::Value = serde_json::from_str(v["json"].as_str().unwrap()).unwrap();
    assert_eq!(toml_as_json(text), want, "{text}");
    assert!(
        text.contains(r#"both = "it's a \\d+ regex""#),
        "no literal string when there is a quote inside: {text}"
    );
    assert!(
        text.contains(r#"control = "bell\u0007 esc\u001B del\u007F""#),
        "{text}"
    );

    // Floats stay floats, even whole ones.
    let v = eval_render(r#"r.toTOML { f = 3.0; g = -1.25; }"#);
    let t: toml::Table = v.as_str().unwrap().parse().unwrap();
    assert_eq!(t["f"].as_float(), Some(3.0));
    assert_eq!(t["g"].as_float(), Some(-1.25));
}

#[test]
fn rendering_refuses_nix_paths() {
    let out = eval_cmd(&format!(
        "(import {}).toTOML {{ executors.x.command = [ /etc/sign.sh ]; }}",
        render_nix()
    ));
    out.assert_failed();
    out.assert_stderr_contains("executors.x.command[0] is a Nix path (/etc/sign.sh)");
}

#[test]
fn assertions_fire_for_admin_mistakes() {
    let good = r#"{ routes.escape-a = "a"; executors.a = { kind = "host"; command = [ "/bin/true" ]; }; }"#;
    assert_eq!(problems(good, r#"[ "kvm" ]"#), Vec::<String>::new());

    // A route to an executor that does not exist.
    let p = problems(
        r#"{ routes.escape-a = "a"; routes.escape-b = "typo"; executors.a = { kind = "host"; command = [ "/bin/true" ]; }; }"#,
        "[ ]",
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].starts_with(
            r#"settings.routes.escape-b = "typo", but there is no executor "typo" in settings.executors (defined: a)"#
        ),
        "{p:#?}"
    );

    // An escape feature Nix also claims, as a list and as nix.conf's string.
    for features in [r#"[ "kvm" "escape-a" ]"#, r#""kvm  escape-a big-parallel""#] {
        let p = problems(good, features);
        assert_eq!(p.len(), 1, "{features}: {p:#?}");
        assert!(
            p[0].starts_with(r#"escape feature "escape-a" is routed by nix-hatch (settings.routes) and also in nix.settings.system-features"#),
            "{p:#?}"
        );
    }

    // Secrets: never a Nix path, never in the store.
    let p = problems(
        r#"{
          executors.j = { kind = "jail"; network = "proxy";
            credentials = [ { host = "a"; header = "X"; value-file = /etc/token; }
                            { host = "b"; header = "Y"; value-file = "/nix/store/00000000000000000000000000000000-token"; } ]; };
          executors.s = { kind = "ssh"; host = "h"; command = [ "/x" ]; identity = /root/id; };
        }"#,
        "[ ]",
    );
    let want = [
        "settings.executors.j.credentials[0].value-file is a Nix path (/etc/token): it would be copied into the world-readable Nix store",
        "settings.executors.j.credentials[1].value-file points into the Nix store",
        "settings.executors.s.identity is a Nix path (/root/id)",
    ];
    assert_eq!(p.len(), want.len(), "{p:#?}");
    for w in want {
        assert!(p.iter().any(|l| l.starts_with(w)), "{w:?} not in {p:#?}");
    }

    // Other mistakes the hook would only report at build time.
    let p = problems(
        r#"{
          routes.escape-a = 3;
          executors.root-jail = { kind = "jail"; user = "root"; };
          executors.nokind = { command = [ "/bin/true" ]; };
          executors.h = { kind = "host"; command = [ /etc/sign.sh ]; };
        }"#,
        "[ ]",
    );
    let want = [
        "settings.routes.escape-a must name an executor (a string)",
        "settings.executors.root-jail.user: a jail never runs its builder as root",
        "settings.executors.nokind.kind must be \"host\", \"jail\" or \"ssh\" (got nothing)",
        "settings.executors.h.command[0] is a Nix path (/etc/sign.sh)",
    ];
    assert_eq!(p.len(), want.len(), "{p:#?}");
    for w in want {
        assert!(p.iter().any(|l| l.starts_with(w)), "{w:?} not in {p:#?}");
    }
}

#[test]
fn module_helpers_users_defaults_and_hook_setting() {
    let v = eval_render(
        r#"let s = {
             executors.h = { kind = "host"; command = [ "/x" ]; user = "signer"; };
             executors.h2 = { kind = "host"; command = [ "/x" ]; };
             executors.j = { kind = "jail"; user = "nix-hatch-jail"; };
             executors.j2 = { kind = "jail"; bwrap = "/opt/bwrap"; };
             executors.j3 = { kind = "jail"; user = "signer"; };
             executors.s = { kind = "ssh"; host = "h"; user = "far-away"; command = [ "/x" ]; };
           };
           c = (r.complete { settings = s; bwrap = "/nix/store/b/bin/bwrap"; }).executors;
           hook = version: r.hookSetting { hatch = "/H"; nix = { pname = "nix"; inherit version; }; };
           ignored = version: r.hookIgnoredInNixConf { pname = "nix"; inherit version; };
         in {
           users = r.localUsers s;
           bwrap = [ (c.j.bwrap or null) (c.j2.bwrap or null) (c.h.bwrap or null) ];
           stateDir = [ (r.stateDir { }) (r.stateDir { state-dir = "/srv/h"; }) ];
           hooks = map hook [ "2.8.0" "2.18.9" "2.19.0" "2.28.3" "2.34.1" ];
           lix = r.hookSetting { hatch = "/H"; nix = { pname = "lix"; version = "2.93.0"; }; };
           ignored = map ignored [ "2.18.1" "2.24.9" "2.25.0" "2.31.2" "2.33.9" "2.34.0" ];
           lixRpc = map (version: r.lixRpcHooks { pname = "lix"; inherit version; }) [ "2.90.0" "2.93.3" "2.94.0" "2.95.3" ]
             ++ [ (r.lixRpcHooks { pname = "nix"; version = "2.94.0"; }) ];
           conf = r.confValue [ "/H/bin/nix-hatch" "hook" ];
           delegates = map r.delegatesCgroups [
             s
             { executors.h = { kind = "host"; command = [ "/x" ]; memory-max = "4G"; }; }
             { executors.j = { kind = "jail"; tasks-max = 512; }; }
             { executors.j = { kind = "jail"; cpu-max = 0.5; cgroup-parent = "/nix-hatch"; }; }
             { executors.s = { kind = "ssh"; host = "h"; command = [ "/x" ]; memory-max = "4G"; }; }
           ];
           key = r.restrictKey "/nix/store/w-agent" "ssh-ed25519 AAAA k";
         }"#,
    );
    assert_eq!(
        v["users"],
        serde_json::json!(["signer", "nix-hatch-jail"]),
        "{v:#}"
    );
    assert_eq!(
        v["bwrap"],
        serde_json::json!(["/nix/store/b/bin/bwrap", "/opt/bwrap", null])
    );
    assert_eq!(
        v["stateDir"],
        serde_json::json!(["/var/lib/nix-hatch", "/srv/h"])
    );
    let list = serde_json::json!(["/H/bin/nix-hatch", "hook"]);
    assert_eq!(
        v["hooks"],
        serde_json::json!([
            "/H/bin/nix-hatch-hook",
            "/H/bin/nix-hatch-hook",
            list,
            list,
            list
        ])
    );
    assert_eq!(v["lix"], "/H/bin/nix-hatch-hook");
    assert_eq!(
        v["ignored"],
        serde_json::json!([false, false, true, true, true, false])
    );
    assert_eq!(
        v["lixRpc"],
        serde_json::json!([false, false, true, true, false])
    );
    assert_eq!(v["conf"], "/H/bin/nix-hatch hook");
    // The daemon delegates its cgroup subtree when local builds get limits
    // beside the hook's cgroup; not for a cgroup-parent of their own, nor
    // for ssh executors (the far side's agent applies theirs).
    assert_eq!(
        v["delegates"],
        serde_json::json!([false, true, true, false, false]),
        "{v:#}"
    );
    assert_eq!(
        v["key"],
        r#"command="/nix/store/w-agent",restrict ssh-ed25519 AAAA k"#
    );
}

/// services.nix-hatch.remoteClients, the pure half: the accounts join the
/// config's `remote-clients` (which `nix-hatch check` reads back), and
/// the admin mistakes that would keep their clients' escapes from ever
/// reaching the hook fail evaluation, one message each.
#[test]
fn remote_clients_join_the_config_and_their_mistakes_are_assertions() {
    let v = eval_render(
        r#"{
             toml = r.toTOML (r.withRemoteClients [ "fleet" "ci" ] { remote-clients = [ "ci" "old" ]; });
             none = r.withRemoteClients [ ] { fallback = "auto"; };
             ok = r.remoteClientProblems { clients = [ "fleet" ]; nix = { pname = "nix"; version = "2.26.3"; }; };
             lix = r.remoteClientProblems { clients = [ "fleet" ]; nix = { pname = "lix"; version = "2.93.0"; }; };
             bad = r.remoteClientProblems {
               clients = [ "fleet" "ci" "w" "root" "away" ];
               trustedUsers = "root ci @wheel";
               allowedUsers = [ "@wheel" "fleet" "ci" "@clients" ];
               groups = { w = [ "wheel" ]; fleet = [ "clients" ]; away = [ "other" ]; };
               nix = { pname = "nix"; version = "2.14.1"; };
             };
             star = r.remoteClientProblems { clients = [ "fleet" ]; trustedUsers = [ "*" ]; };
           }"#,
    );
    let toml = v["toml"].as_str().unwrap();
    let cfg =
        nix_hatch::config::Config::parse(toml, Path::new("/rendered.toml")).unwrap_or_else(|e| {
            panic!(
                "{e}
{toml}"
            )
        });
    assert_eq!(cfg.remote_clients, ["ci", "old", "fleet"], "{toml}");
    assert_eq!(v["none"], serde_json::json!({ "fallback": "auto" }));
    assert_eq!(v["ok"], serde_json::json!([]));
    assert_eq!(v["lix"], serde_json::json!([]));
    let bad: Vec<String> = serde_json::from_value(v["bad"].clone()).unwrap();
    let want = [
        "remoteClients: Nix 2.14.1 does not tell clients whether they are trusted (Nix >= 2.15, NixOS/nix#7515)",
        "remoteClients.ci is trusted by Nix (nix.settings.trusted-users: root ci @wheel): ",
        "remoteClients.w is trusted by Nix (nix.settings.trusted-users: root ci @wheel): ",
        "remoteClients.root: root is always trusted by Nix",
        "remoteClients.away is not in nix.settings.allowed-users (@wheel fleet ci @clients): nix-daemon would refuse its connections",
    ];
    assert_eq!(bad.len(), want.len(), "{bad:#?}");
    for (got, w) in bad.iter().zip(want) {
        assert!(got.starts_with(w), "{w:?} vs {got:?}");
    }
    assert!(
        bad[1].ends_with("Remove ci from trusted-users (directly, by group or \"*\")."),
        "{}",
        bad[1]
    );
    let star: Vec<String> = serde_json::from_value(v["star"].clone()).unwrap();
    assert_eq!(star.len(), 1, "{star:#?}");
    assert!(star[0]
        .starts_with("remoteClients.fleet is trusted by Nix (nix.settings.trusted-users: *)"));
}

/// The config for [`lib_nix_derivations_build_through_the_hook`], rendered
/// by nix/render.nix as the NixOS module renders it.
fn rendered_config(env: &TestEnv) -> String {
    let v = eval_render(&format!(
        r#"r.toTOML (r.complete {{
             bwrap = "/usr/bin/bwrap";
             settings = {{
               state-dir = {state};
               fallback = "decline";
               routes = {{ {FEATURE} = "hostx"; escape-j = "jx"; }};
               executors.hostx = {{ kind = "host"; command = [ {run} ]; timeout = 60; }};
               executors.jx = {{ kind = "jail"; user = "nobody"; timeout = 120; }};
             }};
           }})"#,
        state = nix_str(&env.state_dir().to_string_lossy()),
        run = nix_str(&env.run_script().to_string_lossy()),
    ));
    v.as_str().unwrap().to_owned()
}

#[test]
fn lib_nix_derivations_build_through_the_hook() {
    let env = TestEnv::new("nix-lib");
    env.write_config(&rendered_config(&env));
    let expr = env.write_expr(
        "lib.nix",
        &format!(
            r#"let hatch = import {lib} {{ }}; in {{
  # host executor: the admin's run.sh evals the first argument.
  signed = hatch.makeRunner "{FEATURE}" {{ env = {{ inherit nonce; }}; }} "lib-runner" [ "echo made-by-makeRunner > $out" ];
  # jail executor: the derivation's own builder, in bubblewrap.
  jailed = hatch.escape {{
    feature = "escape-j";
    name = "lib-jailed";
    builder = "${{bb}}/bin/busybox";
    args = [ "sh" "-c" "echo jailed as $(id -u) > $out; echo out >> $dev" ];
    outputs = [ "out" "dev" ];
    env = {{ inherit nonce; }};
  }};
}}"#,
            lib = lib_nix()
        ),
    );
    let out = env.nix_build(&expr, &["signed"], &[]);
    out.assert_ok();
    let paths = out.store_paths();
    assert_eq!(paths.len(), 1, "{}", out.describe());
    assert_eq!(
        fs::read_to_string(&paths[0]).unwrap(),
        "made-by-makeRunner\n"
    );
    assert_eq!(deriver(&paths[0]), env.drv_path(&expr, "signed"));

    let out = env.nix_build(&expr, &["jailed.out", "jailed.dev"], &[]);
    out.assert_ok();
    let paths = out.store_paths();
    assert_eq!(paths.len(), 2, "{}", out.describe());
    assert_eq!(fs::read_to_string(&paths[0]).unwrap(), "jailed as 1000\n");
    assert_eq!(fs::read_to_string(&paths[1]).unwrap(), "out\n");
}

/// nixpkgs' `lib` directory for [`module_evaluates_with_nixpkgs_lib`]:
/// `NIX_HATCH_NIXPKGS_LIB` if set, else `../shared/nixpkgs-lib/lib` next to
/// the repository (there for every CI run; scripts/nix-root binds either
/// into the Nix roots). Neither is a failure, not a skip: the module would
/// go untested.
fn nixpkgs_lib() -> PathBuf {
    let (lib, from) = match std::env::var_os("NIX_HATCH_NIXPKGS_LIB") {
        Some(v) => (PathBuf::from(v), "NIX_HATCH_NIXPKGS_LIB"),
        None => (
            Path::new(REPO).join("../shared/nixpkgs-lib/lib"),
            "the default (set NIX_HATCH_NIXPKGS_LIB to a nixpkgs lib/ directory)",
        ),
    };
    let lib = fs::canonicalize(&lib)
        .unwrap_or_else(|e| panic!("nixpkgs lib {} from {from}: {e}", lib.display()));
    assert!(
        lib.join("default.nix").is_file(),
        "{} (from {from}) is not nixpkgs' lib/: it has no default.nix",
        lib.display()
    );
    lib
}

/// The module itself through nixpkgs' module system (lib only, stub NixOS
/// options: tests/nixos-module-eval.nix), with nixpkgs' lib from
/// [`nixpkgs_lib`].
#[test]
fn module_evaluates_with_nixpkgs_lib() {
    let nixpkgs_lib = nixpkgs_lib();
    let eval_as = |config: &str, pname: &str, version: &str| -> serde_json::Value {
        let out = run(
            nix_cmd("nix-instantiate")
                .args(["--read-write-mode", "--eval", "--strict", "--json", "-E"])
                .arg(format!(
                    r#"import {REPO}/tests/nixos-module-eval.nix {{
                         nixpkgsLib = {lib};
                         configuration = {{ lib, ... }}: {config};
                         nixPname = "{pname}";
                         nixVersion = "{version}";
                       }}"#,
                    lib = nix_str(&nixpkgs_lib.to_string_lossy()),
                )),
            Duration::from_secs(120),
        );
        out.assert_ok();
        serde_json::from_str(out.stdout.trim()).unwrap()
    };
    let eval = |config: &str, version: &str| eval_as(config, "nix", version);
    let pkg = r#"{ type = "derivation"; outPath = "/nix/store/11111111111111111111111111111111-nix-hatch"; name = "nix-hatch"; }"#;
    let v = eval(
        &format!(
            r#"{{
              users.users.signer.isNormalUser = true;
              services.nix-hatch.enable = true;
              services.nix-hatch.package = {pkg};
              services.nix-hatch.settings = {{
                routes.escape-sign = "signer";
                executors.signer = {{ kind = "host"; command = [ "/run/sign" ]; user = "signer"; }};
                executors.j = {{ kind = "jail"; user = "nix-hatch-jail"; }};
              }};
              services.nix-hatch.agent = {{ enable = true; authorizedKeys = [ "ssh-ed25519 AAAA k" ]; }};
              services.nix-hatch.remoteClients.fleet.authorizedKeys = [ "ssh-ed25519 BBBB c1" "ssh-ed25519 CCCC c2" ];
              services.nix-hatch.remoteClients.lonely = {{ }};
            }}"#
        ),
        "2.28.3",
    );
    assert_eq!(v["failed"], serde_json::json!([]), "{v:#}");
    let h = "/nix/store/11111111111111111111111111111111-nix-hatch/bin/nix-hatch";
    assert_eq!(v["hook"], serde_json::json!([h, "hook"]), "{v:#}");
    assert_eq!(
        v["daemonEnv"]["NIX_CONFIG"],
        format!("build-hook = {h} hook"),
        "{v:#}"
    );
    let toml = v["config"].as_str().unwrap();
    assert!(
        toml.contains(
            "bwrap = \"/nix/store/00000000000000000000000000000000-bubblewrap/bin/bwrap\""
        ),
        "{toml}"
    );
    // A normal user stays one; the jail account is a system user.
    assert_eq!(v["users"]["signer"]["isSystemUser"], false, "{v:#}");
    assert_eq!(v["users"]["nix-hatch-jail"]["isSystemUser"], true, "{v:#}");
    assert_eq!(v["users"]["nix-hatch-jail"]["group"], "nix-hatch", "{v:#}");
    let key = v["users"]["nix-hatch"]["keys"][0].as_str().unwrap();
    assert!(
        key.starts_with("command=\"/nix/store/")
            && key.ends_with("-nix-hatch-agent-ssh\",restrict ssh-ed25519 AAAA k"),
        "{key}"
    );
    assert_eq!(v["sshd"], true);
    // Remote clients: system accounts whose keys only run the daemon on
    // stdio, known to `nix-hatch check` through remote-clients.
    let fleet = &v["users"]["fleet"];
    assert_eq!(
        (
            &fleet["isSystemUser"],
            &fleet["group"],
            &fleet["useDefaultShell"]
        ),
        (&true.into(), &"nix-hatch-clients".into(), &true.into()),
        "{v:#}"
    );
    assert_eq!(
        fleet["keys"],
        serde_json::json!([
            "command=\"/nix/store/00000000000000000000000000000000-nix/bin/nix-daemon --stdio\",restrict ssh-ed25519 BBBB c1",
            "command=\"/nix/store/00000000000000000000000000000000-nix/bin/nix-daemon --stdio\",restrict ssh-ed25519 CCCC c2"
        ]),
        "{v:#}"
    );
    assert!(
        toml.contains("remote-clients = [\"fleet\", \"lonely\"]"),
        "{toml}"
    );
    assert_eq!(
        v["warnings"],
        serde_json::json!([
            "services.nix-hatch.remoteClients.lonely has no authorizedKeys: no machine can log in as it."
        ]),
        "{v:#}"
    );
    // No limits: the daemon's unit is left as it is.
    assert_eq!(v["daemonService"], serde_json::json!({}), "{v:#}");
    let v = eval(
        &format!(
            r#"{{
              services.nix-hatch.enable = true;
              services.nix-hatch.package = {pkg};
              services.nix-hatch.settings = {{
                routes.escape-big = "big";
                executors.big = {{ kind = "jail"; user = "nix-hatch-jail"; memory-max = "4G"; tasks-max = 512; }};
              }};
            }}"#
        ),
        "2.28.3",
    );
    assert_eq!(v["failed"], serde_json::json!([]), "{v:#}");
    assert_eq!(
        v["daemonService"],
        serde_json::json!({ "Delegate": true, "DelegateSubgroup": "supervisor" }),
        "{v:#}"
    );

    let v = eval(
        &format!(
            r#"{{
              nix.settings.extra-system-features = [ "escape-sign" ];
              services.nix-hatch.enable = true;
              services.nix-hatch.package = {pkg};
              services.nix-hatch.settings = {{
                routes.escape-sign = "signer";
                routes.escape-typo = "signr";
                executors.signer = {{ kind = "host"; command = [ "/run/sign" ]; }};
              }};
            }}"#
        ),
        "2.18.1",
    );
    let failed: Vec<String> = serde_json::from_value(v["failed"].clone()).unwrap();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert!(
        failed[0].starts_with(
            "services.nix-hatch: settings.routes.escape-typo = \"signr\", but there is no executor"
        ),
        "{failed:#?}"
    );
    assert!(
        failed[1].starts_with("services.nix-hatch: escape feature \"escape-sign\" is routed"),
        "{failed:#?}"
    );
    assert_eq!(v["hook"], format!("{h}-hook"), "{v:#}");
    assert_eq!(v["daemonEnv"], serde_json::json!({}), "{v:#}");

    // A remote client that Nix trusts through a group, and remote clients
    // without the hook: evaluation fails, saying why.
    let v = eval(
        &format!(
            r#"{{
              nix.settings.trusted-users = [ "root" "@wheel" ];
              users.users.fleet.extraGroups = [ "wheel" ];
              services.nix-hatch.enable = true;
              services.nix-hatch.package = {pkg};
              services.nix-hatch.remoteClients.fleet.authorizedKeys = [ "ssh-ed25519 BBBB c1" ];
            }}"#
        ),
        "2.26.3",
    );
    let failed: Vec<String> = serde_json::from_value(v["failed"].clone()).unwrap();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].starts_with("services.nix-hatch: remoteClients.fleet is trusted by Nix (nix.settings.trusted-users: root @wheel)"),
        "{failed:#?}"
    );
    let v = eval(
        r#"{ services.nix-hatch.remoteClients.fleet.authorizedKeys = [ "ssh-ed25519 BBBB c1" ]; }"#,
        "2.26.3",
    );
    assert_eq!(
        v["failed"],
        serde_json::json!(["services.nix-hatch.remoteClients: needs services.nix-hatch.enable (the hook that builds the clients' escapes)."]),
        "{v:#}"
    );

    // Nix ≥ 2.34 reads build-hook from nix.conf again: no NIX_CONFIG.
    let minimal = format!(
        r#"{{
          services.nix-hatch.enable = true;
          services.nix-hatch.package = {pkg};
          services.nix-hatch.settings.routes.escape-sign = "signer";
          services.nix-hatch.settings.executors.signer = {{ kind = "host"; command = [ "/run/sign" ]; }};
        }}"#
    );
    let v = eval(&minimal, "2.34.8");
    assert_eq!(v["failed"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["hook"], serde_json::json!([h, "hook"]), "{v:#}");
    assert_eq!(v["daemonEnv"], serde_json::json!({}), "{v:#}");
    let v = eval(&minimal, "2.33.2");
    assert_eq!(
        v["daemonEnv"]["NIX_CONFIG"],
        format!("build-hook = {h} hook"),
        "{v:#}"
    );

    // Lix: the hook program up to 2.93; 2.94 (Cap'n Proto RPC hooks) is
    // refused with the reason.
    let v = eval_as(&minimal, "lix", "2.93.3");
    assert_eq!(v["failed"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["hook"], format!("{h}-hook"), "{v:#}");
    assert_eq!(v["daemonEnv"], serde_json::json!({}), "{v:#}");
    let v = eval_as(&minimal, "lix", "2.94.0");
    assert_eq!(
        v["failed"],
        serde_json::json!([
            "services.nix-hatch: nix.package is Lix 2.94.0: Lix 2.94 and later talk to build hooks over Cap'n Proto RPC, which nix-hatch does not speak. Use Lix 2.93 or older, or Nix."
        ]),
        "{v:#}"
    );
}
