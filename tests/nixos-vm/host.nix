# A host executor: an unprivileged user's plain nix-build of a derivation
# made with nix/lib.nix is signed by the admin's command with a root-only
# key; everything else is left to Nix.
{ pkgs, module, hatchLib }:

let
  common = import ./common.nix { inherit pkgs module hatchLib; };
  # HOST executors get a Debian-style PATH: use absolute paths.
  sign = pkgs.writeShellScript "sign" ''
    set -eu
    echo "signing $1 as $(${pkgs.coreutils}/bin/id -un)" >&2
    key=$(< /root/sign.key)
    printf '%s signed with %s\n' "$1" "$(printf '%s' "$key$1" | ${pkgs.coreutils}/bin/sha256sum | ${pkgs.coreutils}/bin/cut -c1-16)" > "$out"
  '';
in
{
  name = "nix-hatch-host";

  nodes.machine = { ... }: {
    imports = [ common.node ];
    services.nix-hatch.settings = {
      fallback = "decline";
      routes.escape-sign = "signer";
      executors.signer = {
        kind = "host";
        command = [ "${sign}" ];
        user = "root";
        max-jobs = 1;
        timeout = 60;
      };
    };
  };

  testScript = common.pythonHelpers + ''
    machine.wait_for_unit("multi-user.target")
    machine.succeed("umask 077; printf s3cret > /root/sign.key")

    with subtest("the module's config passes nix-hatch check"):
        out = machine.succeed("nix-hatch check")
        assert "route: escape-sign -> signer (kind host, user root" in out, out
        machine.succeed("test -d /var/lib/nix-hatch")
        conf = machine.succeed("cat /etc/nix/nix.conf")
        assert "build-hook = " in conf and "nix-hatch" in conf, conf

    with subtest("an unprivileged user's nix-build is signed by the host executor"):
        machine.fail("su - alice -c 'cat /root/sign.key'")
        out = build_as_alice(machine, "signed")
        text = machine.succeed(f"cat {out}")
        assert text.startswith("release-1.0 signed with "), text
        machine.succeed(f"nix-store --check-validity {out}")
        drv = drv_of(machine, "signed")
        assert drv == machine.succeed(f"nix-store -q --deriver {out}").strip()
        log = nix_log(machine, drv)
        assert "signing release-1.0 as root" in log, log

    with subtest("explain names the route"):
        drv = drv_of(machine, "signed")
        out = machine.succeed(f"nix-hatch explain {drv}")
        assert "route: feature escape-sign -> executor signer" in out, out

    with subtest("unrouted escapes fail, plain derivations build as before"):
        err = build_as_alice(machine, "unrouted", expect=False)
        # Nix <= 2.29: "... is required to build"; newer: "Cannot build ...
        # Reason: required system or feature not available" (2.30, 2.31) or
        # "Reason: missing system features" (>= 2.32).
        assert any(t in err for t in ["is required to build", "feature not available", "missing system features"]), err
        out = build_as_alice(machine, "plain")
        assert machine.succeed(f"cat {out}").strip() == "plain"
  '';
}
