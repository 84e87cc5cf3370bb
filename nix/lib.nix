# Helpers for writing feature-gated ("escape") derivations.
#
# Pure builtins: usable without nixpkgs, e.g.
#   let hatch = import ./nix/lib.nix { }; in
#   hatch.escape { feature = "escape-sign"; name = "release.sig"; args = [ "release.tar" ]; }
#
# A derivation that requires an escape feature is built by the executor the
# admin routed that feature to (see /etc/nix-hatch/config.toml), never by
# Nix's sandbox. For `host` and `ssh` executors the admin's command runs and
# the derivation only supplies `args` (and the variables the executor's
# `pass-env` lists); for `jail` executors `builder` runs inside the jail.
{ system ? builtins.currentSystem }:
let
  defaultSystem = system;
  lib = rec {
    # escape { feature, name, args ? [ ], env ? { }, ... }
    #   feature   the escape feature (a key of [routes])
    #   args      appended to the admin's command (host/ssh) or given to `builder` (jail)
    #   env       extra derivation attributes (strings, paths, lists); also how to
    #             declare a fixed output: env = { outputHash = "..."; outputHashMode = "recursive"; }
    #   builder   what runs in a jail or with allow-any-builder; host/ssh executors
    #             ignore it. The default names the feature, so a build that
    #             reaches a plain Nix builder fails with a telling path.
    #   outputs   output names
    #   features  further requiredSystemFeatures (e.g. "kvm")
    escape =
      { feature
      , name
      , args ? [ ]
      , env ? { }
      , builder ? "/nix-hatch-escape/${feature}"
      , outputs ? [ "out" ]
      , features ? [ ]
      , system ? defaultSystem
      }:
      assert builtins.isString feature && feature != "";
      derivation (env // {
        inherit name builder args outputs system;
        requiredSystemFeatures = [ feature ] ++ features;
      });

    # makeRunner "escape-sign" { } "release.sig" [ "release.tar" ]
    #   Curried form for a host/ssh executor's command: one feature, shared
    #   attributes, then a name and the command's arguments per call.
    makeRunner = feature: attrs: name: args:
      escape (attrs // { inherit feature name args; });
  };
in
lib
