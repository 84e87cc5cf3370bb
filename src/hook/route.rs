//! Which executor, if any, takes a derivation. This runs for every `try`
//! Nix sends, so the common case — no escape feature — is a few hash
//! lookups and no allocation.

use crate::config::{Config, Executor};
use crate::protocol::hook::TryRequest;

#[derive(Debug)]
pub enum Route<'a> {
    /// An escape feature routed to this executor.
    Executor(&'a Executor),
    /// Escape features are required, but no executor can take it (reason).
    Refuse(String),
    /// No escape feature: not ours.
    NotOurs,
}

pub fn route<'a>(config: &'a Config, req: &TryRequest) -> Route<'a> {
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
    if let Some(systems) = &exec.systems {
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
    Route::Executor(exec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            r#"
[routes]
escape-a = "a"
escape-a2 = "a"
escape-b = "b"
[executors.a]
kind = "host"
command = ["/bin/true"]
[executors.b]
kind = "host"
command = ["/bin/true"]
systems = ["aarch64-linux"]
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
        assert!(matches!(route(&c, &req(&[])), Route::NotOurs));
        assert!(matches!(route(&c, &req(&["kvm"])), Route::NotOurs));
        assert!(
            matches!(route(&c, &req(&["kvm", "escape-a"])), Route::Executor(e) if e.name == "a")
        );
        assert!(
            matches!(route(&c, &req(&["escape-a", "escape-a2"])), Route::Executor(e) if e.name == "a")
        );
        match route(&c, &req(&["escape-a", "escape-b"])) {
            Route::Refuse(r) => assert!(r.contains("one build can only go to one executor")),
            other => panic!("{other:?}"),
        }
        match route(&c, &req(&["escape-b"])) {
            Route::Refuse(r) => assert!(r.contains("builds only for aarch64-linux"), "{r}"),
            other => panic!("{other:?}"),
        }
    }
}
