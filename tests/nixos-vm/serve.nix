# Serving other machines: `client` has no nix-hatch, only a
# `nix.buildMachines` entry (ssh-ng, the escape feature supported and
# mandatory) for `builder`, whose nix-hatch builds the escape with a host
# executor. The client logs in as the remote client account `fleet`
# (services.nix-hatch.remoteClients: its key only runs nix-daemon --stdio,
# it is not trusted), signs what it builds itself (the escape's input),
# and the builder trusts that key.
{ pkgs, module, hatchLib }:

let
  common = import ./common.nix { inherit pkgs module hatchLib; };
  keys = import (pkgs.path + "/nixos/tests/ssh-keys.nix") pkgs;
  system = pkgs.stdenv.hostPlatform.system;
  # Test-only signing key pair of the client (nix-store --generate-binary-cache-key).
  clientSecretKey = "nix-hatch-vm-client-1:ocGX8ir4A0BD/wRmnYMRu0SWUJ1FHLDED1CalY6hURIjXr4sQbr4nS+RwglNrie5l73rtuLD/LET6lKaAJRuaw==";
  clientPublicKey = "nix-hatch-vm-client-1:I16+LEG6+J0vkcIJTa4nuZe967biw/yxE+pSmgCUbms=";
  # The builder admin's command (bash builtins only: host executors get a
  # Debian-style PATH). Its argument is a file of the input closure.
  stamp = pkgs.writeShellScript "stamp" ''
    set -eu
    echo "stamping $1 on $HOSTNAME" >&2
    printf '%s stamped on %s\n' "$(< "$1")" "$HOSTNAME" > "$out"
  '';
in
{
  name = "nix-hatch-serve";

  nodes.builder = { ... }: {
    imports = [ common.node ];
    services.nix-hatch.remoteClients.fleet.authorizedKeys = [ keys.snakeOilPublicKey ];
    services.nix-hatch.settings = {
      fallback = "decline";
      routes.escape-stamp = "stamper";
      executors.stamper = {
        kind = "host";
        command = [ "${stamp}" ];
        allowed-users = [ "fleet" ];
        timeout = 60;
      };
    };
    # Inputs the client built are input-addressed: an untrusted account
    # may add them only with a signature this machine trusts.
    nix.settings.extra-trusted-public-keys = [ clientPublicKey ];
  };

  nodes.client = { ... }: {
    imports = [ common.user ];
    nix.distributedBuilds = true;
    nix.buildMachines = [{
      hostName = "builder";
      protocol = "ssh-ng";
      sshUser = "fleet";
      sshKey = "/root/.ssh/id_fleet";
      inherit system;
      maxJobs = 1;
      supportedFeatures = [ "escape-stamp" ];
      mandatoryFeatures = [ "escape-stamp" ];
    }];
    # Sign every path built here (what the builder checks).
    nix.settings.secret-key-files = [ "/etc/nix/client-1.sec" ];
    environment.etc."nix/client-1.sec" = { text = clientSecretKey; mode = "0600"; };
    # Test-only key: installed with mode 600 outside the store at run time.
    system.extraDependencies = [ keys.snakeOilPrivateKey ];
  };

  testScript = common.pythonHelpers + ''
    start_all()
    builder.wait_for_unit("sshd.service")
    builder.wait_for_open_port(22)
    client.wait_for_unit("multi-user.target")
    client.succeed(
        "install -d -m 700 /root/.ssh",
        "install -m 600 ${keys.snakeOilPrivateKey} /root/.ssh/id_fleet",
        "ssh-keyscan builder > /root/.ssh/known_hosts",
    )

    with subtest("check on the builder knows the remote client, untrusted"):
        out = builder.succeed("nix-hatch check")
        assert "remote client fleet: may use stamper" in out, out
        assert "is trusted by Nix" not in out, out

    with subtest("the client's key runs nix-daemon --stdio and nothing else"):
        _, out = client.execute(
            "ssh -i /root/.ssh/id_fleet -o BatchMode=yes fleet@builder id < /dev/null 2>&1")
        assert "uid=" not in out, out

    with subtest("alice's escape is built by nix-hatch on the builder"):
        out = build_as_alice(client, "stamped")
        text = client.succeed(f"cat {out}").strip()
        assert text == "to-stamp stamped on builder", text
        client.succeed(f"nix-store --check-validity {out}")
        drv = drv_of(client, "stamped")
        log = nix_log(client, drv)
        assert "nix-hatch: fleet (uid " in log and "via daemon) asked for" in log, log
        assert "stamping /nix/store/" in log, log
        audit = builder.succeed("nix-hatch audit --user fleet --json")
        assert '"result":"built"' in audit and drv in audit, audit

    with subtest("plain derivations stay on the client"):
        out = build_as_alice(client, "plain")
        assert client.succeed(f"cat {out}").strip() == "plain"
        builder.fail(f"test -e {out}")
  '';
}
