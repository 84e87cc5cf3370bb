//! Delegation of derivations nix-hatch does not route to the hook that
//! would have handled them without nix-hatch: Nix's own `build-remote`
//! (when `builders` is set) or an admin-given hook program.
//!
//! The delegate is started once per hook process, on the first `try` that
//! isn't ours, with the settings Nix sent us. Each such `try` is forwarded
//! and its reply relayed; once the delegate accepts, the rest of the
//! conversation is handed over: Nix's job lists go to the delegate, its
//! stderr to Nix, and it writes the build log to the fds 4 and 5 it
//! inherits. Its exit status becomes ours.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::config::Fallback;
use crate::protocol::hook::{self, encode, Reply, Settings, TryRequest};

/// The verbosity Nix appends as the hook's last argument.
pub fn verbosity(args: &[String]) -> String {
    args.last()
        .filter(|_| args.len() >= 2)
        .filter(|v| v.parse::<u32>().is_ok())
        .cloned()
        .unwrap_or_else(|| "0".to_owned())
}

/// Whether Nix's `builders` setting names any machine. Like Nix, entries
/// are separated by `;` or newlines, and `@file` includes a machines file.
pub fn builders_configured(builders: &str) -> bool {
    builders.split(['\n', ';']).any(|entry| {
        let entry = entry.trim();
        if let Some(file) = entry.strip_prefix('@') {
            std::fs::read_to_string(file.trim()).is_ok_and(|text| {
                text.lines().any(|l| {
                    let l = l.split('#').next().unwrap_or("").trim();
                    !l.is_empty()
                })
            })
        } else {
            !entry.is_empty() && !entry.starts_with('#')
        }
    })
}

/// Set in a delegate's environment. A hook that finds it set never
/// delegates: a `fallback` naming nix-hatch itself (or two configs naming
/// each other) would otherwise start hook after hook, one per `try`.
pub const DELEGATED_ENV: &str = "NIX_HATCH_DELEGATED";

/// The delegate's command line, if there should be one; `Err` says why
/// there is none although there should be.
pub fn delegate_argv(
    fallback: &Fallback,
    settings: &Settings,
    verbosity: &str,
) -> Result<Option<(PathBuf, Vec<String>)>, String> {
    if std::env::var_os(DELEGATED_ENV).is_some() {
        return Ok(None);
    }
    match fallback {
        Fallback::Decline => Ok(None),
        Fallback::Hook(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Ok(None);
            };
            let mut args = args.to_vec();
            args.push(verbosity.to_owned());
            Ok(Some((PathBuf::from(prog), args)))
        }
        Fallback::Auto => {
            if !builders_configured(settings.get("builders").unwrap_or("")) {
                return Ok(None);
            }
            // The Nix that started us is the build-remote to use (same
            // version); from PATH only when we were not started by Nix.
            let nix = parent_nix().or_else(|| find_program("nix")).ok_or_else(|| {
                "'builders' is set, but Nix's build-remote was not found (neither the parent process nor 'nix' on PATH); declining, so Nix builds locally".to_owned()
            })?;
            // Nix ≤ 2.18 ships `libexec/nix/build-remote` (the nix binary
            // under that name); newer Nix has `nix __build-remote`.
            let real = std::fs::canonicalize(&nix).unwrap_or_else(|_| nix.clone());
            let libexec = real
                .parent()
                .and_then(Path::parent)
                .map(|prefix| prefix.join("libexec/nix/build-remote"));
            Ok(Some(match libexec.filter(|p| p.exists()) {
                Some(build_remote) => (build_remote, vec![verbosity.to_owned()]),
                None => (nix, vec!["__build-remote".to_owned(), verbosity.to_owned()]),
            }))
        }
    }
}

/// The Nix binary of our parent process (nix-build, nix-daemon: all the
/// multi-call `nix`), if that is what started us.
fn parent_nix() -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{}/exe", nix::unistd::getppid())).ok()?;
    (exe.file_name()? == "nix" && exe.is_file()).then_some(exe)
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/bin"),
            PathBuf::from("/run/current-system/sw/bin"),
            PathBuf::from("/nix/var/nix/profiles/default/bin"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct Delegate {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: BufReader<std::fs::File>,
    name: String,
}

impl Delegate {
    pub fn spawn(program: &Path, args: &[String], settings: &Settings) -> io::Result<Delegate> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let write2 = write.try_clone()?;
        let mut cmd = Command::new(program);
        // Like Nix does for its hook: stdout and stderr are one channel.
        cmd.args(args)
            .env(DELEGATED_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write2));
        // SAFETY: fcntl is async-signal-safe; it re-opens the build log
        // descriptors Nix gave us (4, 5) for the delegate.
        unsafe {
            cmd.pre_exec(|| {
                for fd in [4, 5] {
                    if crate::util::fd_is_open(fd) {
                        nix::libc::fcntl(fd, nix::libc::F_SETFD, 0);
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let items: Vec<(&str, &str)> = settings.iter().collect();
        encode::settings(&mut stdin, &items)?;
        stdin.flush()?;
        Ok(Delegate {
            child,
            stdin: Some(stdin),
            replies: BufReader::new(std::fs::File::from(read)),
            name: program.display().to_string(),
        })
    }

    /// Forwards one `try`; relays what the delegate says before its reply.
    pub fn ask(&mut self, req: &TryRequest, to_nix: &mut impl Write) -> io::Result<Reply> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("delegate finished"))?;
        encode::try_request(stdin, req)?;
        stdin.flush()?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.replies.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("fallback hook {} exited without answering", self.name),
                ));
            }
            if let Some(reply) = Reply::parse(&line) {
                return Ok(reply);
            }
            to_nix.write_all(line.as_bytes())?;
            if !line.ends_with('\n') {
                to_nix.write_all(b"\n")?;
            }
        }
    }

    /// After the delegate accepted: relay its machine line, give it Nix's
    /// job, then pass its stderr through until it exits.
    pub fn hand_over(&mut self, from_nix: &mut impl BufRead, to_nix: &mut impl Write) -> i32 {
        let mut machine = String::new();
        if self.replies.read_line(&mut machine).unwrap_or(0) == 0 {
            let _ = to_nix.write_all(b"# accept\nfallback\n");
            return 1;
        }
        if to_nix
            .write_all(Reply::Accept.line())
            .and_then(|_| to_nix.write_all(machine.as_bytes()))
            .and_then(|_| to_nix.flush())
            .is_err()
        {
            return 1;
        }
        match hook::read_accepted_job(from_nix) {
            Ok(job) => {
                if let Some(stdin) = self.stdin.as_mut() {
                    let _ = encode::accepted_job(stdin, &job).and_then(|_| stdin.flush());
                }
            }
            Err(e) => {
                let _ = to_nix.write_all(
                    crate::protocol::log::msg_line(
                        crate::protocol::log::Level::Error,
                        &format!("nix-hatch: {e}"),
                    )
                    .as_bytes(),
                );
            }
        }
        drop(self.stdin.take());
        let _ = io::copy(&mut self.replies, to_nix);
        let _ = to_nix.flush();
        match self.child.wait() {
            Ok(s) => s.code().unwrap_or(1),
            Err(_) => 1,
        }
    }
}

impl Drop for Delegate {
    fn drop(&mut self) {
        // Declined-only delegates end with us (as Nix ends idle hooks).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_setting() {
        assert!(!builders_configured(""));
        assert!(!builders_configured("  ;  \n"));
        assert!(builders_configured("ssh://box x86_64-linux"));
        assert!(!builders_configured("@/nonexistent/machines"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("machines");
        std::fs::write(&f, "# none yet\n\n").unwrap();
        assert!(!builders_configured(&format!("@{}", f.display())));
        std::fs::write(&f, "ssh://box x86_64-linux\n").unwrap();
        assert!(builders_configured(&format!("@{}", f.display())));
    }

    #[test]
    fn verbosity_is_the_last_argument() {
        assert_eq!(verbosity(&["nix-hatch-hook".into(), "3".into()]), "3");
        assert_eq!(
            verbosity(&[
                "nix-hatch".into(),
                "hook".into(),
                "--config".into(),
                "/c".into(),
                "4".into()
            ]),
            "4"
        );
        assert_eq!(verbosity(&["nix-hatch-hook".into()]), "0");
    }
}
