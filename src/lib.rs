//! nix-hatch: a Nix build hook that routes derivations requiring a configured
//! escape feature to admin-defined executors, and leaves every other
//! derivation where Nix would have built it.
//!
//! Layout (docs/architecture.md, "Modules"): `config` (the bottom layer:
//! the admin's configuration, data and parsing only) is read by everything
//! above it; `protocol` speaks Nix's hook wire format, `hook` is the state
//! machine Nix talks to, `executors` run accepted builds, `store` turns a
//! finished build into valid store paths.

pub mod audit;
pub mod cli;
pub mod config;
pub mod derivation;
pub mod executors;
#[doc(hidden)]
pub mod fuzzing;
pub mod hook;
pub mod protocol;
pub mod proxy;
pub mod store;
#[doc(hidden)]
pub mod timing;
pub mod usage;
pub mod util;
