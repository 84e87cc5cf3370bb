//! A private sshd on 127.0.0.1 for tests that cross a (loopback) network:
//! generated host and user keys, a free port, stopped by PID on drop.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{run, wait_until, TestEnv};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// The user key authorized for root.
    pub identity: PathBuf,
    /// The host's public key line (`ssh-ed25519 AAAA…`).
    pub host_pub: String,
    /// `[127.0.0.1]:port <host key>`: a correct known_hosts line.
    pub known_hosts_line: String,
}

pub fn keygen(path: &Path) {
    keygen_type(path, "ed25519");
}

/// A key of type `kind` (`ed25519`, `ecdsa`, ...) at `path` (+ `.pub`).
pub fn keygen_type(path: &Path, kind: &str) {
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", "nix-hatch-test", "-f"])
            .arg(path),
        Duration::from_secs(30),
    )
    .assert_ok();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    /// An sshd whose `authorized_keys` (in its dir) lets root in with
    /// [`Sshd::identity`].
    pub fn start(env: &TestEnv) -> Sshd {
        Sshd::start_with(env, || Command::new(SSHD), "authorized_keys")
    }

    /// An sshd started by `launch` (a command that runs the program
    /// appended to it, e.g. `nsenter … --`, or sshd itself) whose keys are
    /// in `keys_file` in its dir (sshd's tokens: `authorized_keys.%u`, one
    /// file per account, see [`Sshd::authorize`]). Root's key,
    /// [`Sshd::identity`], is in `authorized_keys` only.
    pub fn start_with(env: &TestEnv, launch: impl Fn() -> Command, keys_file: &str) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} missing: apt-get install openssh-server"
        );
        // sshd insists on its privilege-separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let dir = env.path("sshd");
        fs::create_dir_all(&dir).unwrap();
        let host_key = dir.join("host_key");
        // A second host key, of another type: a client must pick the type
        // its known_hosts has for this host.
        let host_key_ecdsa = dir.join("host_key_ecdsa");
        let identity = dir.join("id_user");
        keygen(&host_key);
        keygen_type(&host_key_ecdsa, "ecdsa");
        keygen(&identity);
        fs::copy(dir.join("id_user.pub"), dir.join("authorized_keys")).unwrap();
        let host_pub_text = fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let host_pub: Vec<&str> = host_pub_text.split_whitespace().take(2).collect();
        let host_pub = host_pub.join(" ");
        for attempt in 0..5 {
            let port = free_port();
            let config = dir.join("sshd_config");
            fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nHostKey {hk2}\nPidFile {d}/sshd.pid\n\
                     AuthorizedKeysFile {d}/{keys_file}\nPermitRootLogin prohibit-password\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                     StrictModes no\nPrintMotd no\nLogLevel VERBOSE\nMaxStartups 50\n",
                    hk = host_key.display(),
                    hk2 = host_key_ecdsa.display(),
                    d = dir.display()
                ),
            )
            .unwrap();
            let log = fs::File::create(dir.join(format!("sshd.{attempt}.log"))).unwrap();
            let mut launcher = launch();
            if launcher.get_program() != SSHD {
                launcher.arg(SSHD);
            }
            let mut child = launcher
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start sshd");
            let up = wait_until(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return Sshd {
                    child,
                    port,
                    known_hosts_line: format!("[127.0.0.1]:{port} {host_pub}\n"),
                    host_pub,
                    identity,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not come up; logs in {}", dir.display());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets `account` in with a new key whose logins may only run
    /// `command` (`command="…",restrict`, as an admin restricts a key);
    /// returns the private key's path. Needs the `authorized_keys.%u`
    /// layout of [`Sshd::start_with`].
    pub fn authorize(&self, account: &str, command: &str) -> PathBuf {
        let key = self.dir.join(format!("id_{account}"));
        keygen(&key);
        let public = fs::read_to_string(key.with_extension("pub")).unwrap();
        fs::write(
            self.dir.join(format!("authorized_keys.{account}")),
            format!("command=\"{command}\",restrict {public}"),
        )
        .unwrap();
        key
    }

    /// The host's public key line, base64-encoded: the last column of a
    /// `builders` entry.
    pub fn host_key_base64(&self) -> String {
        let out = run(
            Command::new("base64")
                .arg("-w0")
                .arg(self.dir.join("host_key.pub")),
            Duration::from_secs(10),
        );
        out.assert_ok();
        out.stdout.trim().to_owned()
    }

    /// A known_hosts file trusting this sshd.
    pub fn known_hosts(&self) -> PathBuf {
        let p = self.dir.join("known_hosts");
        fs::write(&p, &self.known_hosts_line).unwrap();
        p
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        super::stop(&mut self.child);
    }
}
