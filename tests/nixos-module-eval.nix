# Evaluates nix/nixos-module.nix with nixpkgs' real module system (only
# nixpkgs' lib/, e.g. a checkout of nix-community/nixpkgs.lib) and stub
# options for the parts of NixOS the module touches: what
# tests/nix_module.rs runs when NIX_HATCH_NIXPKGS_LIB names that lib dir.
# Needs --read-write-mode (the rendered config is read back).
{ nixpkgsLib, hatchModule ? ../nix/nixos-module.nix, configuration, nixVersion ? "2.28.3", nixPname ? "nix" }:
let
  lib = import nixpkgsLib;
  inherit (lib) types mkOption;
  drv = name: { type = "derivation"; outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit name; };
  valueType = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path (types.attrsOf valueType) (types.listOf valueType) ]) // { description = "TOML value"; };
  pkgs = {
    formats.toml = { }: { type = valueType; };
    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name text;
    bubblewrap = drv "bubblewrap";
    callPackage = _: _: drv "nix-hatch-default";
  };
  stubs = { ... }: {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.etc = mkOption { type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; }); default = { }; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      nix.package = mkOption { type = types.raw; default = drv "nix" // { pname = nixPname; version = nixVersion; }; };
      nix.settings = mkOption { type = types.attrsOf types.anything; default = { system-features = [ "nixos-test" "benchmark" "big-parallel" "kvm" ]; }; };
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule {
          options.environment = mkOption { type = types.attrsOf types.str; default = { }; };
          options.serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
        });
        default = { };
      };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      users.users = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            isSystemUser = mkOption { type = types.bool; default = false; };
            isNormalUser = mkOption { type = types.bool; default = false; };
            extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
            group = mkOption { type = types.str; default = ""; };
            description = mkOption { type = types.str; default = ""; };
            useDefaultShell = mkOption { type = types.bool; default = false; };
            home = mkOption { type = types.str; default = "/var/empty"; };
            createHome = mkOption { type = types.bool; default = false; };
            openssh.authorizedKeys.keys = mkOption { type = types.listOf types.str; default = [ ]; };
          };
        });
        default = { };
      };
      users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
      services.openssh.enable = mkOption { type = types.bool; default = false; };
    };
  };
  eval = lib.evalModules {
    modules = [ stubs hatchModule configuration ];
    specialArgs = { inherit pkgs; };
  };
  c = eval.config;
in
{
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
  warnings = c.warnings;
  config = if builtins.any (a: !a.assertion) c.assertions then null else if c.environment.etc ? "nix-hatch/config.toml" then builtins.readFile c.environment.etc."nix-hatch/config.toml".source else null;
  hook = c.nix.settings.build-hook or null;
  daemonEnv = c.systemd.services.nix-daemon.environment or { };
  daemonService = c.systemd.services.nix-daemon.serviceConfig or { };
  tmpfiles = c.systemd.tmpfiles.rules;
  users = lib.mapAttrs (_: u: { inherit (u) isSystemUser isNormalUser group description useDefaultShell; keys = u.openssh.authorizedKeys.keys; }) c.users.users;
  groups = builtins.attrNames c.users.groups;
  sshd = c.services.openssh.enable;
}
