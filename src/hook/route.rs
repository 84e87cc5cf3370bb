//! Which executor, if any, takes a derivation. This runs for every `try`
//! Nix sends, so the common case — no escape feature — is a few hash
//! lookups and no allocation.

use crate::config::{Config, Executor};
use crate::protocol::hook::TryRequest;

#[derive(Debug)]
pub enum Route<'a> {
    /// An escape feature (the first one required that is routed) goes to
    /// this executor.
    Executor(&'a Executor, String),
    /// Escape features are required, but no executor can take it (reason).
    Refuse(String),
    /// No escape feature: not ours.
    NotOurs,
}

/// `local_systems`: what this machine runs (Nix's `system` and
/// `extra-platforms`); a jail without `systems` builds only for those, since
/// it runs the derivation's builder here.
pub fn route<'a>(config: &'a Config, req: &TryRequest, local_systems: &[String]) -> Route<'a> {
    let mut chosen: Option<(&str, &Executor)> = None;
    for feature in &req.required_features {
        let Some(exec) = config.executor_for_feature(feature) else {
            continue;
        };
        match chosen {
            None => chosen = Some((feature, exec)),
            Some((first, other)) if other.name != exec.name => {
                return Route::Refuse(format!(
                    "{} requires escape features {first:?} (executor {:?}) and {feature:?} (executor {:?}); one build can only go to one executor",
                    req.drv_path, other.name, exec.name
                ));
            }
            Some(_) => {}
        }
    }
    let Some((feature, exec)) = chosen else {
        return Route::NotOurs;
    };
    // Executors that run the derivation's own builder here can only run
    // this machine's systems; the rest (an admin command, ssh) say so
    // with `systems` if they care.
    let own_builder = match &exec.kind {
        crate::config::ExecutorKind::Jail(_) => true,
        crate::config::ExecutorKind::Host(h) => h.allow_any_builder,
        _ => false,
    };
    let systems = match &exec.systems {
        Some(s) => Some(s.as_slice()),
        None if own_builder && !local_systems.is_empty() => Some(local_systems),
        None => None,
    };
    if let Some(systems) = systems {
        if !systems.iter().any(|s| s == &req.system) {
            return Route::Refuse(format!(
                "{} needs system {:?}, but executor {:?} (feature {feature:?}) builds only for {}",
                req.drv_path,
                req.system,
                exec.name,
                systems.join(", ")
            ));
        }
    }
    Route::Executor(exec, feature.to_owned())
}

/// Nix's `system` plus `extra-platforms`, from its settings.
pub fn local_systems(system: Option<&str>, extra_platforms: Option<&str>) -> Vec<String> {
    system
        .into_iter()
        .chain(extra_platforms.unwrap_or("").split_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            r#"
[routes]
escape-j = "j"
escape-a = "a"
escape-a2 = "a"
escape-b = "b"
escape-any = "any"
escape-cmd = "cmd"
[executors.a]
kind = "host"
command = ["/bin/true"]
[executors.b]
kind = "host"
command = ["/bin/true"]
systems = ["aarch64-linux"]
[executors.j]
kind = "jail"
[executors.any]
kind = "host"
allow-any-builder = true
[executors.cmd]
kind = "host"
command = ["/bin/true"]
"#,
            Path::new("/t"),
        )
        .unwrap()
    }

    fn req(features: &[&str]) -> TryRequest {
        TryRequest {
            am_willing: true,
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/x.drv".into(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn routing() {
        let c = config();
        let local = local_systems(Some("x86_64-linux"), Some("i686-linux"));
        assert!(matches!(route(&c, &req(&[]), &local), Route::NotOurs));
        assert!(matches!(route(&c, &req(&["kvm"]), &local), Route::NotOurs));
        assert!(
            matches!(route(&c, &req(&["kvm", "escape-a"]), &local), Route::Executor(e, _) if e.name == "a")
        );
        assert!(
            matches!(route(&c, &req(&["escape-a", "escape-a2"]), &local), Route::Executor(e, _) if e.name == "a")
        );
        match route(&c, &req(&["escape-a", "escape-b"]), &local) {
            Route::Refuse(r) => assert!(r.contains("one build can only go to one executor")),
            other => panic!("{other:?}"),
        }
        match route(&c, &req(&["escape-b"]), &local) {
            Route::Refuse(r) => assert!(r.contains("builds only for aarch64-linux"), "{r}"),
            other => panic!("{other:?}"),
        }
        // A jail runs the builder here: only local systems.
        assert!(
            matches!(route(&c, &req(&["escape-j"]), &local), Route::Executor(e, _) if e.name == "j")
        );
        let mut arm = req(&["escape-j"]);
        arm.system = "aarch64-linux".into();
        match route(&c, &arm, &local) {
            Route::Refuse(r) => assert!(
                r.contains("builds only for x86_64-linux, i686-linux"),
                "{r}"
            ),
            other => panic!("{other:?}"),
        }
        // So does a host executor running the derivation's own builder; an
        // admin command may well handle a foreign system.
        let mut arm = req(&["escape-any"]);
        arm.system = "aarch64-linux".into();
        assert!(matches!(route(&c, &arm, &local), Route::Refuse(_)));
        arm.required_features = vec!["escape-cmd".into()];
        assert!(matches!(route(&c, &arm, &local), Route::Executor(e, _) if e.name == "cmd"));
    }
}
