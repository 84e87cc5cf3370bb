//! Reading a `.drv` and preparing what its builder sees: the output paths
//! and the environment Nix itself would give it (docs/architecture.md,
//! "Builder environment").
//!
//! The `.drv`'s path and its output paths enter nix-hatch here and leave
//! as [`StorePath`]s. Errors: `anyhow`, one line with context, since no
//! caller tells one failure from another (the hook declines with it,
//! `nix-hatch explain` shows it, a build fails with it).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use crate::store::checks::OutputChecks;
use crate::store::{StoreLocation, StorePath};

use anyhow::{anyhow, bail, Context, Result};
use nix_derivation::{CAHash, Derivation, Output, StoreDir};
use sha2::{Digest, Sha256};

fn logical_dir(store: &StoreLocation) -> Result<StoreDir> {
    store
        .logical_dir()
        .map_err(|e| anyhow!("store dir {}: {e}", store.store_dir))
}

#[derive(Debug, Clone)]
pub struct OutputInfo {
    pub path: StorePath,
    pub fixed: Option<CAHash>,
}

/// A parsed derivation with its output paths resolved.
pub struct Drv {
    pub path: StorePath,
    pub drv: Derivation,
    pub outputs: BTreeMap<String, OutputInfo>,
    /// Why nix-hatch can't build this derivation, if it can't.
    pub unsupported: Option<String>,
}

impl Drv {
    pub fn load(store: &StoreLocation, drv_path: &str) -> Result<Drv> {
        let base = store
            .base_name(drv_path)
            .ok_or_else(|| anyhow!("{drv_path} is not in the store {}", store.store_dir))?;
        base.split_once('-')
            .map(|(_, n)| n)
            .and_then(|n| n.strip_suffix(".drv"))
            .ok_or_else(|| anyhow!("{drv_path} is not a derivation path"))?;
        let path = store.parse_path(drv_path)?;
        let real = store.real_path(&path);
        let bytes = std::fs::read(&real).with_context(|| format!("reading {}", real.display()))?;
        Drv::parse(store, path, &bytes)
    }

    /// The derivation `bytes` (ATerm) of the `.drv` at `drv_path`.
    pub fn parse(store: &StoreLocation, drv_path: StorePath, bytes: &[u8]) -> Result<Drv> {
        let name = drv_path
            .name()
            .strip_suffix(".drv")
            .ok_or_else(|| anyhow!("{drv_path} is not a derivation path"))?;
        let drv = Derivation::from_aterm_bytes_in(bytes, name, logical_dir(store)?)
            .map_err(|e| anyhow!("cannot parse {drv_path}: {e}"))?;
        let store_dir = logical_dir(store)?;
        let mut outputs = BTreeMap::new();
        let mut unsupported = None;
        for (out_name, output) in drv.outputs() {
            let (path, fixed) = match output {
                Output::InputAddressed { path } => (path.clone(), None),
                Output::Fixed { ca } => {
                    let p = output
                        .path_in(&store_dir, drv.name(), out_name)
                        .map_err(|e| anyhow!("{drv_path}: output {out_name}: {e}"))?
                        .ok_or_else(|| anyhow!("{drv_path}: output {out_name} has no path"))?;
                    (p, Some(ca.clone()))
                }
                Output::Floating { .. } | Output::Deferred => {
                    unsupported = Some(format!(
                        "{drv_path} is a floating content-addressed derivation; nix-hatch builds only input-addressed and fixed-output derivations"
                    ));
                    continue;
                }
                Output::Impure { .. } => {
                    unsupported = Some(format!(
                        "{drv_path} is an impure derivation; nix-hatch builds only input-addressed and fixed-output derivations"
                    ));
                    continue;
                }
            };
            // Nix's own rules on top of nix-derivation's (see
            // `StoreLocation::parse_path`).
            let path = store.parse_path(&path.to_absolute_path_in(&store_dir))?;
            outputs.insert(out_name.clone(), OutputInfo { path, fixed });
        }
        if outputs.is_empty() && unsupported.is_none() {
            bail!("{drv_path} has no outputs");
        }
        Ok(Drv {
            path: drv_path,
            drv,
            outputs,
            unsupported,
        })
    }

    /// `program` (words) followed by the derivation's `args`, as the argv
    /// an executor runs.
    pub fn argv_with<'a>(&self, program: impl IntoIterator<Item = &'a str>) -> Vec<Vec<u8>> {
        let mut argv: Vec<Vec<u8>> = program.into_iter().map(|a| a.as_bytes().to_vec()).collect();
        argv.extend(self.drv.arguments().iter().map(|a| a.as_bytes().to_vec()));
        argv
    }

    pub fn is_fixed_output(&self) -> bool {
        self.outputs.values().any(|o| o.fixed.is_some())
    }

    /// `requiredSystemFeatures`, from the environment or structured attrs.
    pub fn required_features(&self) -> Vec<String> {
        if let Some(attrs) = self.drv.structured_attrs() {
            return match attrs.get("requiredSystemFeatures") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
        }
        self.env_str("requiredSystemFeatures")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// A derivation attribute as text (environment, or structured attrs).
    pub fn env_str(&self, key: &str) -> Option<String> {
        if let Some(attrs) = self.drv.structured_attrs() {
            return match attrs.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => Some(v.to_string()),
            };
        }
        self.drv
            .environment()
            .get(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The output checks Nix would apply after building it itself, by
    /// output name: `outputChecks.<output>` with structured attrs, else
    /// `allowedReferences`, `allowedRequisites`, `disallowedReferences`,
    /// `disallowedRequisites` for every output (self references ignored
    /// for requisites, as Nix does). A specifier that is neither a path in
    /// `store` nor an output name is an error, as in Nix.
    pub fn output_checks(&self, store: &StoreLocation) -> Result<BTreeMap<String, OutputChecks>> {
        // One output's checks; `list(key)` is the attribute's specifiers.
        let checks = |output: &str,
                      list: &dyn Fn(&str) -> Option<Vec<String>>,
                      ignore_self_refs: bool,
                      max_size: Option<u64>,
                      max_closure_size: Option<u64>|
         -> Result<OutputChecks> {
            let set = |key: &str| -> Result<Option<BTreeSet<String>>> {
                let Some(items) = list(key) else {
                    return Ok(None);
                };
                items
                    .into_iter()
                    .map(|i| {
                        if store.base_name(&i).is_some() {
                            Ok(i)
                        } else if let Some(o) = self.outputs.get(&i) {
                            Ok(o.path.to_string())
                        } else {
                            bail!(
                                "derivation '{}' output check for '{output}' contains an illegal reference specifier '{i}', expected store path or output name (one of [{}])",
                                self.path,
                                self.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                            )
                        }
                    })
                    .collect::<Result<_>>()
                    .map(Some)
            };
            Ok(OutputChecks {
                ignore_self_refs,
                max_size,
                max_closure_size,
                allowed_references: set("allowedReferences")?,
                allowed_requisites: set("allowedRequisites")?,
                disallowed_references: set("disallowedReferences")?.unwrap_or_default(),
                disallowed_requisites: set("disallowedRequisites")?.unwrap_or_default(),
            })
        };
        let mut all = BTreeMap::new();
        if let Some(attrs) = self.drv.structured_attrs() {
            let Some(serde_json::Value::Object(per_output)) = attrs.get("outputChecks") else {
                return Ok(all);
            };
            for (output, v) in per_output {
                if !self.outputs.contains_key(output) {
                    continue;
                }
                let list = |key: &str| match v.get(key)? {
                    serde_json::Value::Array(a) => Some(
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect(),
                    ),
                    _ => None,
                };
                let c = checks(
                    output,
                    &list,
                    v.get("ignoreSelfRefs")
                        .and_then(serde_json::Value::as_bool)
                        .unwrap_or(false),
                    v.get("maxSize").and_then(serde_json::Value::as_u64),
                    v.get("maxClosureSize").and_then(serde_json::Value::as_u64),
                )?;
                all.insert(output.clone(), c);
            }
            return Ok(all);
        }
        let words = |key: &str| -> Option<Vec<String>> {
            let v = self.drv.environment().get(key)?;
            Some(
                String::from_utf8_lossy(v)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
            )
        };
        let keys = [
            "allowedReferences",
            "allowedRequisites",
            "disallowedReferences",
            "disallowedRequisites",
        ];
        if keys.iter().all(|k| words(k).is_none()) {
            return Ok(all);
        }
        for output in self.outputs.keys() {
            all.insert(output.clone(), checks(output, &words, true, None, None)?);
        }
        Ok(all)
    }

    /// A list-valued attribute (`impureEnvVars`, …).
    fn env_list(&self, key: &str) -> Vec<String> {
        if let Some(attrs) = self.drv.structured_attrs() {
            return match attrs.get(key) {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
        }
        self.env_str(key)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// Files the builder finds in its build directory before it starts.
pub type BuildFiles = Vec<(String, Vec<u8>)>;

/// Inputs to [`builder_env`] that come from the build, not the derivation.
pub struct EnvContext<'a> {
    pub store_dir: &'a str,
    /// The build directory as the builder sees it.
    pub build_dir: &'a str,
    pub cores: &'a str,
}

/// The environment Nix gives a builder (`DerivationGoal::initEnv`), and the
/// files it writes into the build dir (passAsFile, structured attrs).
pub fn builder_env(
    drv: &Drv,
    ctx: &EnvContext,
) -> Result<(BTreeMap<String, OsString>, BuildFiles)> {
    let mut env: BTreeMap<String, OsString> = BTreeMap::new();
    let mut files = Vec::new();
    let set = |env: &mut BTreeMap<String, OsString>, k: &str, v: &str| {
        env.insert(k.to_owned(), OsString::from(v));
    };
    set(&mut env, "PATH", "/path-not-set");
    set(&mut env, "HOME", "/homeless-shelter");
    set(&mut env, "NIX_STORE", ctx.store_dir);
    set(&mut env, "NIX_BUILD_CORES", ctx.cores);

    if drv.drv.structured_attrs().is_some() {
        let attrs = drv
            .drv
            .structured_attrs_files()
            .map_err(|e| anyhow!("{}: structured attributes: {e}", drv.path))?
            .ok_or_else(|| anyhow!("{}: structured attributes missing", drv.path))?;
        files.push((".attrs.json".to_owned(), attrs.json));
        files.push((".attrs.sh".to_owned(), attrs.shell));
        set(
            &mut env,
            "NIX_ATTRS_JSON_FILE",
            &format!("{}/.attrs.json", ctx.build_dir),
        );
        set(
            &mut env,
            "NIX_ATTRS_SH_FILE",
            &format!("{}/.attrs.sh", ctx.build_dir),
        );
    } else {
        let pass_as_file: Vec<String> = drv
            .env_str("passAsFile")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        for (k, v) in drv.drv.environment() {
            if pass_as_file.iter().any(|p| p == k) {
                let digest = Sha256::digest(k.as_bytes());
                let file = format!(".attr-{}", nix_derivation::nixbase32::encode(&digest));
                env.insert(
                    format!("{k}Path"),
                    OsString::from(format!("{}/{file}", ctx.build_dir)),
                );
                files.push((file, v.clone()));
            } else {
                env.insert(k.clone(), OsString::from_vec(v.clone()));
            }
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(&mut env, k, ctx.build_dir);
    }
    if drv.is_fixed_output() {
        set(&mut env, "NIX_OUTPUT_CHECKED", "1");
        for var in drv.env_list("impureEnvVars") {
            let value = std::env::var_os(&var).unwrap_or_default();
            env.insert(var, value);
        }
    }
    set(&mut env, "NIX_LOG_FD", "2");
    set(&mut env, "TERM", "xterm-256color");
    Ok((env, files))
}

/// Writes the build files into `dir` (owned by the caller's choice of user).
pub fn write_build_files(dir: &Path, files: &BuildFiles) -> Result<()> {
    for (name, contents) in files {
        let p = dir.join(name);
        std::fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
