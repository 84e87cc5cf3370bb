# An ssh executor between two nodes: `client` routes escape-render to
# `remote`, whose services.nix-hatch.agent account accepts the client's
# key for nothing but the agent.
{ pkgs, module, hatchLib }:

let
  common = import ./common.nix { inherit pkgs module hatchLib; };
  keys = import (pkgs.path + "/nixos/tests/ssh-keys.nix") pkgs;
  # The admin's command on the far side (bash builtins only: the agent's
  # PATH is the remote account's).
  render = pkgs.writeShellScript "render" ''
    set -eu
    echo "rendering $1 on $HOSTNAME as $USER" >&2
    printf 'rendered %s on %s\n' "$1" "$HOSTNAME" > "$out"
  '';
in
{
  name = "nix-hatch-ssh";

  nodes.remote = { ... }: {
    imports = [ module ];
    services.nix-hatch.agent = {
      enable = true;
      authorizedKeys = [ keys.snakeOilPublicKey ];
    };
    system.extraDependencies = [ render ];
  };

  nodes.client = { ... }: {
    imports = [ common.node ];
    # Test-only key: installed with mode 600 outside the store at run time.
    system.extraDependencies = [ keys.snakeOilPrivateKey ];
    services.nix-hatch.settings = {
      fallback = "decline";
      routes.escape-render = "remote";
      executors.remote = {
        kind = "ssh";
        host = "remote";
        user = "nix-hatch";
        # Strings: the key is installed at run time, never in the store.
        identity = "/var/lib/nix-hatch-keys/id_ecdsa";
        known-hosts = "/var/lib/nix-hatch-keys/known_hosts";
        command = [ "${render}" ];
        timeout = 120;
      };
    };
  };

  testScript = common.pythonHelpers + ''
    start_all()
    remote.wait_for_unit("sshd.service")
    remote.wait_for_open_port(22)
    client.wait_for_unit("multi-user.target")
    client.succeed(
        "install -d -m 700 /var/lib/nix-hatch-keys",
        "install -m 600 ${keys.snakeOilPrivateKey} /var/lib/nix-hatch-keys/id_ecdsa",
        "ssh-keyscan remote > /var/lib/nix-hatch-keys/known_hosts",
    )

    with subtest("check --connect logs in and reaches the agent"):
        out = client.succeed("nix-hatch check --connect")
        assert "connect: executor remote: ssh " in out and " ok (host key " in out, out

    with subtest("the key runs the agent and nothing else"):
        out = client.fail(
            "ssh -i /var/lib/nix-hatch-keys/id_ecdsa"
            " -o UserKnownHostsFile=/var/lib/nix-hatch-keys/known_hosts"
            " -o BatchMode=yes nix-hatch@remote id < /dev/null 2>&1")
        assert "uid=" not in out, out
        assert "nix-hatch agent" in out, out

    with subtest("an unprivileged user's nix-build is rendered on the remote node"):
        out = build_as_alice(client, "rendered")
        text = client.succeed(f"cat {out}").strip()
        assert text == "rendered scene-1 on remote", text
        log = nix_log(client, drv_of(client, "rendered"))
        assert "rendering scene-1 on remote as nix-hatch" in log, log
        remote.fail("test -e " + out)
  '';
}
