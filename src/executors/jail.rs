//! The `jail` executor: the derivation's own builder in bubblewrap, with
//! exactly the powers the admin granted (docs/architecture.md, "Jail contract").
//!
//! bwrap is started as the executor's account (never root) and builds its
//! sandbox in an unprivileged user namespace, so the builder is uid 1000
//! inside and that account on the host. `/nix/store` inside is the staging
//! dir with only the input closure bound in read-only; outputs are created
//! there at their real paths.
//!
//! Nothing the derivation controls reaches bwrap itself, which runs on the
//! host before any sandboxing: bwrap starts with an empty environment
//! (a derivation's `LD_PRELOAD` would otherwise run its code in bwrap), and
//! the builder's environment and bwrap's options come from a root-only file
//! handed over as a descriptor (`--args`), applied inside (`--clearenv`,
//! `--setenv`).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::runner::{self, RunSpec};
use super::supervise::{self, Cancel};
use super::{host, BuildRequest, Failure};
use crate::config::jail::{JailExecutor, Network};
use crate::derivation::{builder_env, write_build_files, EnvContext};
use crate::protocol::buildlog::LogSink;
use crate::proxy::Proxy;
use crate::util::{lookup_user, Account};

/// bubblewrap's limit on its arguments (`MAX_ARGS` in bubblewrap.c).
const BWRAP_MAX_ARGS: usize = 9000;

/// Where the build dir appears inside, as in Nix's sandbox.
pub const BUILD_DIR: &str = "/build";
/// The build user inside, as in Nix's sandbox.
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 100;

const PASSWD: &str = "root:x:0:0:Nix build user:/build:/noshell\nnixbld:x:1000:100:Nix build user:/build:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n";
const GROUP: &str = "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

pub fn run(
    req: &BuildRequest,
    jail: &JailExecutor,
    log: &mut dyn LogSink,
    cancel: &Cancel,
    report: &mut super::Report,
    limits: &super::limits::Enforcement,
) -> Result<(), Failure> {
    let account =
        lookup_user(&req.executor.user).map_err(|e| Failure::Internal(format!("{e:#}")))?;
    if account.uid == 0 {
        return Err(Failure::Internal(format!(
            "a jail never runs as root (user {:?})",
            account.name
        )));
    }
    for dev in &jail.devices {
        if !dev.exists() {
            return Err(Failure::Internal(format!(
                "device {} does not exist on this machine",
                dev.display()
            )));
        }
    }
    if jail.nix_daemon && !jail.daemon_socket.exists() {
        return Err(Failure::Internal(format!(
            "nix-daemon = true, but there is no daemon socket at {}",
            jail.daemon_socket.display()
        )));
    }
    let staging = req.staging;
    let (mut env, files) = builder_env(
        req.drv,
        &EnvContext {
            store_dir: &req.store.store_dir,
            build_dir: BUILD_DIR,
            cores: &req.cores,
        },
    )
    .map_err(|e| Failure::Internal(format!("{e:#}")))?;
    write_build_files(&staging.build, &files).map_err(|e| Failure::Internal(format!("{e:#}")))?;
    let etc = staging.root.join("etc");
    write_etc(&etc)?;
    prepare_dirs(staging, &account)?;
    if jail.nix_daemon {
        env.insert("NIX_REMOTE".into(), OsString::from("daemon"));
    }
    if jail.network == Network::Host {
        tracing::warn!("WARNING: this build gets the HOST NETWORK (network = \"host\")");
    }
    let mut proxy = match &jail.proxy {
        Some(settings) => {
            let p = start_proxy(req, settings)?;
            for k in Proxy::REMOVED_ENV {
                env.remove(*k);
            }
            for (k, v) in p.env() {
                env.insert(k.into(), OsString::from(v));
            }
            Some(p)
        }
        None => None,
    };

    // Descriptor 3 is the options file itself, the filters follow, then
    // (with tmp-size) the files nix-hatch wrote into the build dir.
    let filters = super::seccomp::write_filters(&staging.root).map_err(Failure::Internal)?;
    let build_files: Vec<(String, std::path::PathBuf)> = match jail.tmp_size {
        Some(_) => files
            .iter()
            .map(|(name, _)| (name.clone(), staging.build.join(name)))
            .collect(),
        None => Vec::new(),
    };
    let mut options = bwrap_args(
        req,
        jail,
        &etc,
        proxy.as_ref().map(|p| p.ca_bundle.as_path()),
        (1 + filters.len(), &build_files),
    );
    // bubblewrap takes at most 9000 arguments, --args files included.
    if options.len() + 8 > BWRAP_MAX_ARGS {
        return Err(Failure::Builder(format!(
            "the jail would need {} bubblewrap arguments ({} input paths, {} environment variables); bubblewrap takes at most {BWRAP_MAX_ARGS}",
            options.len(),
            req.inputs.len(),
            req.drv.drv.environment().len()
        )));
    }
    for i in 0..filters.len() {
        options.extend([
            "--add-seccomp-fd".into(),
            runner::fd_number(1 + i).to_string().into(),
        ]);
    }
    options.push("--clearenv".into());
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.as_bytes().contains(&0) {
            return Err(Failure::Builder(format!(
                "the derivation's environment variable {k:?} cannot be set (a name with '=' or a NUL byte)"
            )));
        }
        options.extend(["--setenv".into(), k.into(), v]);
    }
    let args_file = staging.write_root_only("bwrap.args", &nul_separated(&options))?;
    // bwrap runs as pid 1 of a pid namespace of the runner's: bwrap's own
    // sandbox init has no death signal for a moment after it left our
    // process group (bubblewrap#633), so if the hook died then, the build
    // would outlive it; killing our pid 1 ends every nested namespace too,
    // and the runner exits only once all of them are gone.
    let mut argv: Vec<Vec<u8>> = vec![
        jail.bwrap.clone().into_os_string().into_vec(),
        b"--args".to_vec(),
        runner::fd_number(0).to_string().into_bytes(),
        b"--".to_vec(),
    ];
    argv.push(req.drv.drv.builder().as_bytes().to_vec());
    argv.extend(
        req.drv
            .drv
            .arguments()
            .iter()
            .map(|a| a.as_bytes().to_vec()),
    );
    let spec = RunSpec {
        overlay: None,
        account: account.clone(),
        cwd: "/".into(),
        argv,
        // bwrap is an ordinary dynamically linked program running on the
        // host: no variable of the derivation's may reach its loader.
        env: Vec::new(),
        fds: std::iter::once(args_file)
            .chain(filters)
            .chain(build_files.into_iter().map(|(_, p)| p))
            .collect(),
        usage_file: Some(limits.usage_file()),
    };
    let mut cmd = runner::prepare(&spec, staging)?;
    limits.join_on_spawn(&mut cmd);
    if let Some(p) = &proxy {
        // The runner (root) enters the namespace; bwrap inherits it.
        p.enter_on_spawn(&mut cmd)
            .map_err(|e| Failure::Internal(format!("proxy network: {e}")))?;
    }
    let outcome = supervise::run_logged_with(
        cmd,
        log,
        req.limits,
        cancel,
        proxy.as_mut().map(|p| p.log_reader()),
    );
    if let Some(p) = proxy {
        let (allowed, denied) = p.counts();
        report.proxy = Some(crate::audit::ProxyCounts { allowed, denied });
        let rest = p.stop();
        if !rest.is_empty() {
            log.raw(&rest);
        }
    }
    let outcome = outcome
        .map_err(|e| Failure::Internal(format!("starting {}: {e}", jail.bwrap.display())))?;
    host::interpret(outcome, true)
}

/// The build's policy proxy (network = "proxy"), listening in the jail's
/// own network namespace.
fn start_proxy(
    req: &BuildRequest,
    settings: &crate::config::proxy::ProxySettings,
) -> Result<Proxy, Failure> {
    let root = &req.staging.root;
    let state_dir = root.parent().and_then(Path::parent).unwrap_or(root);
    Proxy::start(
        settings,
        &crate::proxy::BuildInfo {
            drv: &req.drv.path,
            executor: &req.executor.name,
            state_dir,
            staging_root: root,
        },
    )
    .map_err(|e| Failure::Internal(format!("proxy: {e}")))
}

/// bubblewrap's options (what comes before `--` and the builder). With
/// `tmp-size`, `build_files` (name, staged copy) are the files nix-hatch
/// wrote for the builder, copied into the build dir's tmpfs from the
/// descriptors numbered from `fd_index` on.
fn bwrap_args(
    req: &BuildRequest,
    jail: &JailExecutor,
    etc: &Path,
    proxy_ca: Option<&Path>,
    (fd_index, build_files): (usize, &[(String, std::path::PathBuf)]),
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |xs: &[&dyn AsRef<std::ffi::OsStr>]| {
        for x in xs {
            a.push(x.as_ref().to_owned());
        }
    };
    let uid = SANDBOX_UID.to_string();
    let gid = SANDBOX_GID.to_string();
    push(&[&"--unshare-user", &"--uid", &uid, &"--gid", &gid]);
    push(&[
        &"--unshare-pid",
        &"--unshare-ipc",
        &"--unshare-uts",
        &"--unshare-cgroup-try",
    ]);
    // network = "proxy": the child is started in the namespace the hook
    // made (loopback and the proxy only), see `proxy::netns`.
    if jail.network == Network::None {
        push(&[&"--unshare-net"]);
    }
    push(&[
        &"--hostname",
        &"localhost",
        &"--die-with-parent",
        &"--new-session",
    ]);
    push(&[&"--cap-drop", &"ALL"]);
    // Directories Nix's sandbox shows as world-readable.
    push(&[
        &"--perms", &"0755", &"--dir", &"/nix", &"--perms", &"0755", &"--dir", &"/etc",
    ]);
    // The store: staging (outputs are created here), inputs bound read-only.
    push(&[&"--bind", &req.staging.store, &req.store.store_dir]);
    for input in req.inputs {
        let real = req.store.real_path(input);
        // bwrap resolves a bind source's symlinks on the host, so a store
        // path that is a symlink (`ln -s / $out`) would mount its target —
        // the host's / — into the jail. Recreate the link instead, as Nix's
        // sandbox does.
        match std::fs::read_link(&real) {
            Ok(target) => push(&[&"--symlink", &target, input]),
            Err(_) => push(&[&"--ro-bind", &real, input]),
        }
    }
    match jail.tmp_size {
        // Each a tmpfs of that size, the build's own (gone with the jail):
        // the outputs are in the store dir above, on disk.
        Some(size) => {
            let size = size.to_string();
            for dir in [BUILD_DIR, "/tmp"] {
                push(&[&"--perms", &"0700", &"--size", &size, &"--tmpfs", &dir]);
            }
            for (i, (name, _)) in build_files.iter().enumerate() {
                let fd = runner::fd_number(fd_index + i).to_string();
                let dst = format!("{BUILD_DIR}/{name}");
                push(&[&"--perms", &"0644", &"--file", &fd, &dst]);
            }
        }
        None => {
            push(&[&"--bind", &req.staging.build, &BUILD_DIR]);
            push(&[&"--bind", &req.staging.tmp, &"/tmp"]);
        }
    }
    push(&[&"--proc", &"/proc", &"--dev", &"/dev"]);
    for f in ["passwd", "group", "hosts"] {
        let src = etc.join(f);
        let dst = format!("/etc/{f}");
        push(&[&"--ro-bind", &src, &dst]);
    }
    if jail.network == Network::Host {
        for f in ["/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/services"] {
            if Path::new(f).exists() {
                push(&[&"--ro-bind", &f, &f]);
            }
        }
    }
    for b in &jail.ro_binds {
        push(&[&"--ro-bind", &b.src, &b.dst]);
    }
    for d in &jail.devices {
        push(&[&"--dev-bind", d, d]);
    }
    // After ro-binds, so it wins over a bound /etc/ssl/certs.
    if let Some(ca) = proxy_ca {
        push(&[&"--ro-bind", &ca, &crate::proxy::JAIL_CA_FILE]);
    }
    if jail.nix_daemon {
        push(&[
            &"--bind",
            &jail.daemon_socket,
            &crate::config::jail::DEFAULT_DAEMON_SOCKET,
        ]);
    }
    // Everything not mounted above stays read-only.
    push(&[&"--remount-ro", &"/"]);
    push(&[&"--chdir", &BUILD_DIR]);
    a
}

/// bwrap's `--args` format: each argument followed by a NUL byte.
fn nul_separated(args: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

fn write_etc(etc: &Path) -> std::io::Result<()> {
    let with = |e: std::io::Error, what: &str, p: &Path| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(etc).map_err(|e| with(e, "creating", etc))?;
    for (name, text) in [("passwd", PASSWD), ("group", GROUP), ("hosts", HOSTS)] {
        let p = etc.join(name);
        std::fs::write(&p, text).map_err(|e| with(e, "writing", &p))?;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
    }
    Ok(())
}

/// Build dir, store staging and /tmp belong to the jail's account (0700:
/// no other account enters them; inside, the builder is their owner).
fn prepare_dirs(staging: &super::staging::Staging, account: &Account) -> std::io::Result<()> {
    staging.give_to(account, &[&staging.store, &staging.tmp])
}
