//! `nix-hatch explain <drv>`: which route and executor would take a
//! derivation, or why none would.

use std::path::Path;

use crate::config::Config;
use crate::derivation::Drv;
use crate::hook::route::{local_systems, route, Route};
use crate::protocol::hook::TryRequest;
use crate::store::StoreLocation;

/// Who may use `e`, as `explain` and `check` say it. Without
/// `allowed-users`, Nix's `trusted-users` decide: `trusted` is their value
/// on this machine (the hook gets it in its settings), `None` if Nix could
/// not be asked.
pub fn who_may(e: &crate::config::Executor, trusted: Option<&str>) -> String {
    use crate::hook::access;
    match &e.allowed_users {
        Some(list) => format!(
            "allowed users: {} (allowed-users)",
            access::describe(&access::entries(Some(list), None))
        ),
        None => format!(
            "allowed users: {} (no allowed-users: Nix's trusted-users{})",
            access::describe(&access::entries(None, trusted)),
            if trusted.is_none() {
                ", not readable here; Nix's default is root"
            } else {
                ""
            }
        ),
    }
}

/// What happens to `e`'s builds when its slots are busy, as `explain`
/// and `check` say it.
pub fn queue_policy(e: &crate::config::Executor) -> String {
    let postponed = "Nix asks again every build-poll-interval (5 s by default)";
    if e.queue == 0 {
        return format!(
            "max-jobs {}, queue 0: when every slot is busy, builds are postponed; {postponed}",
            e.max_jobs
        );
    }
    format!(
        "max-jobs {}, queue {}: when every slot is busy, up to {} more builds are accepted \
         and wait in their hooks for a slot, first come first served (their timeout starts \
         when they do); further ones are postponed; {postponed}",
        e.max_jobs, e.queue, e.queue
    )
}

/// How many of `e`'s builds run and wait now (`state-dir/slots`), or why
/// that can't be read here.
fn occupancy_now(config: &Config, e: &crate::config::Executor) -> String {
    let slots = crate::hook::slots::Slots::new(&config.state_dir, &e.name, e.max_jobs, e.queue);
    match slots.occupancy() {
        Ok(o) => format!("now: {} running, {} waiting", o.running, o.waiting),
        Err(err) => format!("now: not readable here ({err})"),
    }
}

pub fn run(config_path: &Path, drv_path: &str, store: Option<&str>) -> i32 {
    let store = StoreLocation::from_setting(store);
    let drv = match Drv::load(&store, drv_path) {
        Ok(d) => d,
        Err(e) => {
            println!("error: {e:#}");
            return 1;
        }
    };
    let features = drv.required_features();
    println!("derivation: {drv_path}");
    println!("system: {}", drv.drv.system());
    println!(
        "requiredSystemFeatures: {}",
        if features.is_empty() {
            "(none)".to_owned()
        } else {
            features.join(" ")
        }
    );
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(problems) => {
            println!(
                "config {} is invalid, so the hook declines everything: {}",
                config_path.display(),
                problems.first().map(String::as_str).unwrap_or("")
            );
            return 1;
        }
    };
    let req = TryRequest {
        am_willing: true,
        system: drv.drv.system().to_owned(),
        drv_path: drv_path.to_owned(),
        required_features: features.clone(),
    };
    let local = local_systems(crate::util::nix_system(), None);
    match route(&config, &req, &local) {
        Route::Executor(e, feature) => {
            if let Some(reason) = &drv.unsupported {
                println!("not built by nix-hatch: {reason}");
                return 1;
            }
            println!(
                "route: feature {feature} -> executor {} (kind {}, user {}, max-jobs {})",
                e.name,
                e.kind.name(),
                e.user,
                e.max_jobs
            );
            let trusted = crate::cli::nix_version::trusted_users();
            println!("{}", who_may(e, trusted.as_deref()));
            println!("slots: {}", queue_policy(e));
            println!("{}", occupancy_now(&config, e));
            0
        }
        Route::Refuse(reason) => {
            println!("declined: {reason}");
            1
        }
        Route::NotOurs => {
            let routed: Vec<&str> = config.routes.keys().map(String::as_str).collect();
            println!(
                "not an escape build: none of its features is routed (routes: {}); Nix builds it as it would without nix-hatch",
                if routed.is_empty() { "none".to_owned() } else { routed.join(", ") }
            );
            0
        }
    }
}
