//! The state machine driven by byte streams, with a fake build phase.

use super::requester::Via;
use super::*;
use crate::protocol::hook::{encode, TryRequest};
use std::cell::RefCell;
use std::path::Path;

/// (executor, input closure, wanted outputs) of each accepted build.
type Call = (String, Vec<String>, Vec<String>);

struct FakeBuilder {
    calls: RefCell<Vec<Call>>,
    /// The claim of each accepted build, kept (a queued one keeps its
    /// place in the queue until dropped).
    claims: RefCell<Vec<slots::Claim>>,
    /// (executor, requester, reason) of each refused build.
    refusals: RefCell<Vec<(String, Requester, String)>>,
    status: i32,
}

impl Builder for FakeBuilder {
    fn build(&self, a: Accepted<'_>, claim: slots::Claim) -> i32 {
        self.calls.borrow_mut().push((
            a.executor.name.clone(),
            a.job.inputs.clone(),
            a.job.wanted_outputs.clone(),
        ));
        self.claims.borrow_mut().push(claim);
        self.status
    }

    fn refuse(&self, r: Refused<'_>) -> i32 {
        self.refusals
            .borrow_mut()
            .push((r.executor.name.clone(), r.requester, r.reason));
        100
    }
}

fn fake() -> FakeBuilder {
    FakeBuilder {
        calls: RefCell::new(Vec::new()),
        claims: RefCell::new(Vec::new()),
        refusals: RefCell::new(Vec::new()),
        status: 0,
    }
}

/// A store dir with one real .drv in it, so routing can parse it.
struct Env {
    dir: tempfile::TempDir,
    drv_path: String,
    settings: Vec<(String, String)>,
}

const DRV: &str = r#"Derive([("out","/nix/store/0a7bxkf6f0gzjpdk6vnh9xdsg0gkbq84-esc","","")],[],["/nix/store/93hswik0brc6ppfajxk7zb4h1hkh5cb6-busybox"],"x86_64-linux","/nix/store/93hswik0brc6ppfajxk7zb4h1hkh5cb6-busybox/bin/busybox",["sh","-c","echo hi > $out"],[("builder","/nix/store/93hswik0brc6ppfajxk7zb4h1hkh5cb6-busybox/bin/busybox"),("name","esc"),("out","/nix/store/0a7bxkf6f0gzjpdk6vnh9xdsg0gkbq84-esc"),("requiredSystemFeatures","escape-x"),("system","x86_64-linux")])"#;

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("nix/store");
        std::fs::create_dir_all(&store).unwrap();
        let drv_path = "/nix/store/rb9irggdbdc3n1k6d0y3rg9z6j8j3fji-esc.drv".to_owned();
        std::fs::write(store.join("rb9irggdbdc3n1k6d0y3rg9z6j8j3fji-esc.drv"), DRV).unwrap();
        let settings = vec![
            (
                "store".to_owned(),
                dir.path().to_string_lossy().into_owned(),
            ),
            ("builders".to_owned(), String::new()),
        ];
        Env {
            dir,
            drv_path,
            settings,
        }
    }

    fn config(&self, max_jobs: u32) -> Config {
        Config::parse(
            &format!(
                r#"
state-dir = "{}/state"
fallback = "decline"
[routes]
escape-x = "hx"
[executors.hx]
kind = "host"
command = ["/bin/true"]
max-jobs = {max_jobs}
"#,
                self.dir.path().display()
            ),
            Path::new("/t"),
        )
        .unwrap()
    }

    fn stream(&self, tries: &[TryRequest], job: Option<&AcceptedJob>) -> Vec<u8> {
        let mut buf = Vec::new();
        let s: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        encode::settings(&mut buf, &s).unwrap();
        for t in tries {
            encode::try_request(&mut buf, t).unwrap();
        }
        if let Some(j) = job {
            encode::accepted_job(&mut buf, j).unwrap();
        }
        buf
    }

    fn try_(&self, features: &[&str]) -> TryRequest {
        TryRequest {
            am_willing: true,
            system: "x86_64-linux".into(),
            drv_path: self.drv_path.clone(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Runs the conversation as root (who may use every executor); returns
/// the exit status and the replies followed by nix-hatch's messages.
fn drive(config: Result<Config, String>, input: &[u8], b: &FakeBuilder) -> (i32, String) {
    drive_as(Requester::account(0, Via::Local), config, input, b)
}

fn drive_as(
    who: Requester,
    config: Result<Config, String>,
    input: &[u8],
    b: &FakeBuilder,
) -> (i32, String) {
    let mut out = Vec::new();
    let (code, said) = crate::protocol::messages::capture(|| {
        run_for(config, &mut &input[..], &mut out, b, "0", Some(who))
    });
    (code, String::from_utf8(out).unwrap() + &said)
}

/// An account that is not root.
fn someone(name: &str, groups: &[u32]) -> Requester {
    Requester {
        user: Some(name.into()),
        uid: Some(4242),
        groups: groups.to_vec(),
        via: Via::Daemon,
        unknown_because: None,
    }
}

#[test]
fn plain_derivations_are_declined_and_escapes_accepted() {
    let env = Env::new();
    let job = AcceptedJob {
        inputs: vec!["/nix/store/93hswik0brc6ppfajxk7zb4h1hkh5cb6-busybox".into()],
        wanted_outputs: vec!["out".into()],
    };
    let input = env.stream(
        &[env.try_(&[]), env.try_(&["kvm"]), env.try_(&["escape-x"])],
        Some(&job),
    );
    let b = fake();
    let (code, out) = drive(Ok(env.config(1)), &input, &b);
    assert_eq!(code, 0);
    assert_eq!(out, "# decline\n# decline\n# accept\nnix-hatch:hx\n");
    let calls = b.calls.borrow();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "hx");
    assert_eq!(calls[0].1, job.inputs);
    assert_eq!(calls[0].2, vec!["out"]);
}

#[test]
fn build_status_is_the_exit_status() {
    let env = Env::new();
    let job = AcceptedJob {
        inputs: vec![],
        wanted_outputs: vec!["out".into()],
    };
    let input = env.stream(&[env.try_(&["escape-x"])], Some(&job));
    let mut b = fake();
    b.status = 100;
    assert_eq!(drive(Ok(env.config(1)), &input, &b).0, 100);
}

/// A slot of `hx` held from outside, as another hook's running build.
fn hold_slot(cfg: &Config) -> slots::Claim {
    let e = &cfg.executors["hx"];
    slots::Slots::new(&cfg.state_dir, "hx", e.max_jobs, e.queue)
        .admit()
        .unwrap()
        .unwrap()
}

#[test]
fn busy_executor_without_a_queue_postpones() {
    let env = Env::new();
    let cfg = config_with(&env, "max-jobs = 1\nqueue = 0\n");
    let held = hold_slot(&cfg);
    assert!(matches!(held, slots::Claim::Slot(_)));
    let input = env.stream(&[env.try_(&["escape-x"]), env.try_(&[])], None);
    let b = fake();
    let (code, out) = drive(Ok(cfg), &input, &b);
    assert_eq!((code, out.as_str()), (0, "# postpone\n# decline\n"));
    assert!(b.calls.borrow().is_empty());
    drop(held);
}

/// With every slot busy, up to `queue` builds are accepted to wait in
/// their hooks; the next is postponed until one of them leaves.
#[test]
fn busy_executor_queues_up_to_its_bound_then_postpones() {
    let env = Env::new();
    let cfg = config_with(&env, "max-jobs = 1\nqueue = 2\n");
    let held = hold_slot(&cfg);
    let job = some_job();
    let accepts = env.stream(&[env.try_(&["escape-x"])], Some(&job));
    let b = fake();
    for _ in 0..2 {
        let (code, out) = drive(Ok(cfg.clone()), &accepts, &b);
        assert_eq!((code, out.as_str()), (0, "# accept\nnix-hatch:hx\n"));
    }
    assert!(b
        .claims
        .borrow()
        .iter()
        .all(|c| matches!(c, slots::Claim::Queued(_))));
    let postpones = env.stream(&[env.try_(&["escape-x"])], None);
    let (code, out) = drive(Ok(cfg.clone()), &postpones, &fake());
    assert_eq!((code, out.as_str()), (0, "# postpone\n"));
    // A waiting build leaves (its hook was killed): there is room again.
    drop(b.claims.borrow_mut().pop());
    let (code, out) = drive(Ok(cfg.clone()), &accepts, &b);
    assert_eq!((code, out.as_str()), (0, "# accept\nnix-hatch:hx\n"));
    drop(held);
}

/// A slot that frees while a build waits for one is that build's: a new
/// `try` queues behind it instead of taking the slot.
#[test]
fn a_new_try_does_not_overtake_a_waiting_build() {
    let env = Env::new();
    let cfg = config_with(&env, "max-jobs = 1\n");
    let held = hold_slot(&cfg);
    let job = some_job();
    let accepts = env.stream(&[env.try_(&["escape-x"])], Some(&job));
    let b = fake();
    drive(Ok(cfg.clone()), &accepts, &b);
    drop(held);
    drive(Ok(cfg.clone()), &accepts, &b);
    let claims = b.claims.borrow();
    assert!(
        claims.iter().all(|c| matches!(c, slots::Claim::Queued(_))),
        "the second try took the slot the first was waiting for"
    );
    drop(claims);
    // With nobody waiting, a free slot is taken at once.
    b.claims.borrow_mut().clear();
    drive(Ok(cfg), &accepts, &b);
    assert!(matches!(b.claims.borrow()[0], slots::Claim::Slot(_)));
}

#[test]
fn no_routes_and_no_builders_declines_permanently() {
    let env = Env::new();
    let cfg = Config::parse("fallback = \"decline\"\n", Path::new("/t")).unwrap();
    let input = env.stream(&[env.try_(&[])], None);
    let (code, out) = drive(Ok(cfg), &input, &fake());
    assert_eq!((code, out.as_str()), (0, "# decline-permanently\n"));
}

#[test]
fn broken_config_declines_and_says_why_once() {
    let env = Env::new();
    let input = env.stream(
        &[
            env.try_(&[]),
            env.try_(&["escape-x"]),
            env.try_(&["escape-x"]),
        ],
        None,
    );
    let (code, out) = drive(Err("config is broken".into()), &input, &fake());
    assert_eq!(code, 0);
    assert_eq!(
        out.matches("nix-hatch: config is broken").count(),
        1,
        "{out}"
    );
    assert_eq!(out.matches("# decline\n").count(), 3, "{out}");
}

/// Exiting would end Nix's whole run (it reads EOF where it wants a
/// reply); declining fails only this derivation and the hook goes on.
#[test]
fn unreadable_drv_is_declined_with_one_reason() {
    let env = Env::new();
    let mut t = env.try_(&["escape-x"]);
    t.drv_path = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-missing.drv".into();
    let input = env.stream(&[t.clone(), t, env.try_(&[])], None);
    let (code, out) = drive(Ok(env.config(1)), &input, &fake());
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("missing.drv").count(), 1, "{out}");
    assert!(out.contains("declining"), "{out}");
    assert_eq!(out.matches("# decline\n").count(), 3, "{out}");
}

/// Nix strings are bytes: a setting or feature that is not UTF-8 is read,
/// not fatal (such a feature just matches no route).
#[test]
fn non_utf8_strings_do_not_end_the_conversation() {
    use crate::protocol::wire::{write_bytes, write_string_list, write_u64};
    let env = Env::new();
    let mut input = Vec::new();
    for (k, v) in &env.settings {
        write_u64(&mut input, 1).unwrap();
        write_bytes(&mut input, k.as_bytes()).unwrap();
        write_bytes(&mut input, v.as_bytes()).unwrap();
    }
    write_u64(&mut input, 1).unwrap();
    write_bytes(&mut input, b"extra-note").unwrap();
    write_bytes(&mut input, b"caf\xe9").unwrap();
    write_u64(&mut input, 0).unwrap();
    write_bytes(&mut input, b"try").unwrap();
    write_u64(&mut input, 1).unwrap();
    write_bytes(&mut input, b"x86_64-linux").unwrap();
    write_bytes(&mut input, env.drv_path.as_bytes()).unwrap();
    write_string_list(&mut input, &[b"caf\xe9".as_slice()]).unwrap();
    encode::try_request(&mut input, &env.try_(&["escape-x"])).unwrap();
    let job = AcceptedJob {
        inputs: vec![],
        wanted_outputs: vec!["out".into()],
    };
    encode::accepted_job(&mut input, &job).unwrap();
    let (code, out) = drive(Ok(env.config(1)), &input, &fake());
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "# decline\n# accept\nnix-hatch:hx\n");
}

#[test]
fn truncated_and_garbage_streams_end_with_an_error_not_a_panic() {
    let env = Env::new();
    let job = AcceptedJob {
        inputs: vec!["/nix/store/93hswik0brc6ppfajxk7zb4h1hkh5cb6-busybox".into()],
        wanted_outputs: vec!["out".into()],
    };
    let full = env.stream(&[env.try_(&[]), env.try_(&["escape-x"])], Some(&job));
    let settings_len = env.stream(&[], None).len();
    let first_try_end = env.stream(&[env.try_(&[])], None).len();
    for cut in 0..full.len() {
        let b = fake();
        let (code, out) = drive(Ok(env.config(4)), &full[..cut], &b);
        // A cut exactly between commands is a clean end of stream.
        let clean = cut == settings_len || cut == first_try_end;
        if clean {
            assert_eq!(code, 0, "cut {cut}");
        } else {
            assert_eq!(code, 1, "cut {cut}: {out}");
            assert!(out.contains("nix-hatch:"), "cut {cut}: {out}");
        }
        assert!(
            b.calls.borrow().is_empty(),
            "cut {cut}: built from a truncated job"
        );
    }
    let mut garbage = env.stream(&[], None);
    garbage.extend_from_slice(&[0xff; 40]);
    let (code, out) = drive(Ok(env.config(1)), &garbage, &fake());
    assert_eq!(code, 1);
    assert!(
        out.starts_with("nix-hatch: malformed message from Nix"),
        "{out}"
    );
}

#[test]
fn two_executors_required_is_refused_with_reason() {
    let env = Env::new();
    let cfg = Config::parse(
        &format!(
            "state-dir = \"{}/s\"\n[routes]\na = \"x\"\nb = \"y\"\n[executors.x]\nkind = \"host\"\ncommand = [\"/bin/true\"]\n[executors.y]\nkind = \"host\"\ncommand = [\"/bin/true\"]\n",
            env.dir.path().display()
        ),
        Path::new("/t"),
    )
    .unwrap();
    let input = env.stream(&[env.try_(&["a", "b"])], None);
    let (code, out) = drive(Ok(cfg), &input, &fake());
    assert_eq!(code, 0);
    assert!(
        out.contains("one build can only go to one executor"),
        "{out}"
    );
    assert!(out.starts_with("# decline\n"), "{out}");
}

/// The job an accepted build reads (any will do for these tests).
fn some_job() -> AcceptedJob {
    AcceptedJob {
        inputs: vec![],
        wanted_outputs: vec!["out".into()],
    }
}

fn config_with(env: &Env, executor_extra: &str) -> Config {
    Config::parse(
        &format!(
            "state-dir = \"{}/state\"\nfallback = \"decline\"\n[routes]\nescape-x = \"hx\"\n[executors.hx]\nkind = \"host\"\ncommand = [\"/bin/true\"]\n{executor_extra}",
            env.dir.path().display()
        ),
        Path::new("/t"),
    )
    .unwrap()
}

/// A requester outside `allowed-users`: Nix gets `# accept` (it must
/// neither build it elsewhere nor wait), the build fails at once with one
/// line, and nothing runs.
#[test]
fn an_account_outside_allowed_users_is_refused_and_nothing_runs() {
    let env = Env::new();
    let input = env.stream(&[env.try_(&["escape-x"])], Some(&some_job()));
    let cfg = config_with(&env, "allowed-users = [\"ci\", \"@no-such-group-here\"]\n");
    let b = fake();
    let (code, out) = drive_as(someone("alice", &[]), Ok(cfg), &input, &b);
    assert_eq!(code, 100);
    assert_eq!(out, "# accept\nnix-hatch:hx\n");
    assert!(b.calls.borrow().is_empty(), "it was built");
    let refusals = b.refusals.borrow();
    assert_eq!(refusals.len(), 1);
    assert_eq!(
        refusals[0].2,
        "executor \"hx\" refuses alice (uid 4242, via daemon): not in its allowed-users: root, ci, @no-such-group-here; nothing was run"
    );
    // Named, or through a group: built.
    for (who, list) in [
        (someone("ci", &[]), "[\"ci\"]"),
        (someone("bob", &[0]), "[\"@root\"]"),
        (someone("eve", &[]), "[\"*\"]"),
    ] {
        let cfg = config_with(&env, &format!("allowed-users = {list}\n"));
        let b = fake();
        let (code, _) = drive_as(who, Ok(cfg), &input, &b);
        assert_eq!((code, b.calls.borrow().len()), (0, 1), "{list}");
    }
}

/// A refused account is refused before anything waits: not queued
/// behind a busy slot, not postponed when the queue is full.
#[test]
fn a_refused_account_never_waits_for_a_slot() {
    let env = Env::new();
    let input = env.stream(&[env.try_(&["escape-x"])], Some(&some_job()));
    for queue in [0, 2] {
        let cfg = config_with(
            &env,
            &format!("allowed-users = [\"ci\"]\nmax-jobs = 1\nqueue = {queue}\n"),
        );
        let held = hold_slot(&cfg);
        let b = fake();
        let (code, out) = drive_as(someone("alice", &[]), Ok(cfg), &input, &b);
        assert_eq!((code, out.as_str()), (100, "# accept\nnix-hatch:hx\n"));
        assert_eq!(b.refusals.borrow().len(), 1, "queue {queue}");
        assert!(b.claims.borrow().is_empty(), "queue {queue}: it queued");
        drop(held);
    }
}

/// Without `allowed-users`, Nix's `trusted-users` (in the hook's
/// settings) decide; root always may.
#[test]
fn without_allowed_users_nixs_trusted_users_decide() {
    let mut env = Env::new();
    env.settings
        .push(("trusted-users".into(), "root alice".into()));
    let input = env.stream(&[env.try_(&["escape-x"])], Some(&some_job()));
    for (who, built) in [("alice", true), ("bob", false)] {
        let b = fake();
        let (code, _) = drive_as(someone(who, &[]), Ok(config_with(&env, "")), &input, &b);
        assert_eq!(
            (code == 0, b.calls.borrow().len() == 1),
            (built, built),
            "{who}"
        );
        if !built {
            let r = &b.refusals.borrow()[0].2;
            assert!(
                r.contains("not in Nix's trusted-users (it has no allowed-users): root, alice"),
                "{r}"
            );
        }
    }
    let b = fake();
    assert_eq!(drive(Ok(config_with(&env, "")), &input, &b).0, 0);
    assert_eq!(b.calls.borrow().len(), 1, "root was refused");
}

/// An account nix-hatch could not determine reaches only executors open
/// to everyone, and the refusal says why.
#[test]
fn an_unknown_account_reaches_only_executors_open_to_everyone() {
    let env = Env::new();
    let input = env.stream(&[env.try_(&["escape-x"])], Some(&some_job()));
    let b = fake();
    let unknown = Requester::unknown("no parent");
    let cfg = config_with(&env, "allowed-users = [\"root\"]\n");
    assert_eq!(drive_as(unknown.clone(), Ok(cfg), &input, &b).0, 100);
    let r = &b.refusals.borrow()[0].2;
    assert!(r.contains("refuses an unknown account (no parent)"), "{r}");
    assert!(r.contains("allowed-users = [\"*\"]"), "{r}");
    let b = fake();
    let cfg = config_with(&env, "allowed-users = [\"*\"]\n");
    assert_eq!(drive_as(unknown, Ok(cfg), &input, &b).0, 0);
    assert_eq!(b.calls.borrow().len(), 1);
}
