# NixOS VM tests for the module, the hook and the executors. They need KVM
# and nixpkgs, so they run with `nix flake check` (flake.nix wires them into
# `checks`), not in this repository's Debian CI:
#
#   nix build -L .#checks.x86_64-linux.vm-host
#   nix build -L .#checks.x86_64-linux.vm-jail-proxy
#   nix build -L .#checks.x86_64-linux.vm-ssh
#   nix build -L .#checks.x86_64-linux.vm-serve
#
# `module`: the flake's nixosModules.default; `hatchLib`: nix/lib.nix.
{ pkgs, module, hatchLib }:

let
  args = { inherit pkgs module hatchLib; };
in
{
  vm-host = pkgs.testers.runNixOSTest (import ./host.nix args);
  vm-jail-proxy = pkgs.testers.runNixOSTest (import ./jail-proxy.nix args);
  vm-ssh = pkgs.testers.runNixOSTest (import ./ssh.nix args);
  vm-serve = pkgs.testers.runNixOSTest (import ./serve.nix args);
}
