# What every builder node in the VM tests shares (`node`): nix-hatch
# enabled, and (`user`, also for nodes without nix-hatch) an unprivileged
# user `alice` who starts the builds (through the daemon, as every non-root
# user on NixOS does), no substituters (no network), and the test
# expressions in /etc/nix-hatch-test (drvs.nix with the store paths it
# needs, made valid in the VM because the etc file refers to them).
{ pkgs, module, hatchLib }:

rec {
  # A builder node module.
  node = { ... }: {
    imports = [ module user ];
    services.nix-hatch.enable = true;
  };

  # What a node needs to build the test expressions as alice, with or
  # without nix-hatch.
  user = { lib, ... }: {
    users.users.alice = { isNormalUser = true; };
    nix.settings.substituters = lib.mkForce [ ];
    virtualisation.writableStore = true;
    virtualisation.memorySize = 1024;
    environment.etc."nix-hatch-test/default.nix".text = ''
      import ${./drvs.nix} {
        hatch = import ${hatchLib} { };
        bash = builtins.storePath "${pkgs.bash}";
        curl = builtins.storePath "${lib.getBin pkgs.curl}";
      }
    '';
  };

  # Python: build attribute `attr` of the test expressions as alice; returns
  # the output path. `expect` = False: the build must fail; returns stderr.
  pythonHelpers = ''
    import shlex

    def build_as_alice(machine, attr, expect=True):
        cmd = ("su - alice -c " + shlex.quote(
            f"nix-build --no-out-link /etc/nix-hatch-test -A {attr} 2>&1"))
        if expect:
            out = machine.succeed(cmd)
            return out.strip().splitlines()[-1]
        return machine.fail(cmd)

    def drv_of(machine, attr):
        return machine.succeed(
            f"su - alice -c 'nix-instantiate /etc/nix-hatch-test -A {attr}'").strip().splitlines()[-1]

    def nix_log(machine, drv):
        return machine.succeed(
            f"su - alice -c 'nix --extra-experimental-features nix-command log {drv}'")
  '';
}
