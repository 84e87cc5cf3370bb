# A jail executor with network = "proxy" against a web server node: the
# jailed builder (the derivation's own, run as the module-created account
# nix-hatch-jail) fetches an allowed path, gets 403 for a denied one, cannot
# connect directly, and never sees the credential the proxy adds.
{ pkgs, module, hatchLib }:

let
  common = import ./common.nix { inherit pkgs module hatchLib; };
  webroot = pkgs.runCommand "nix-hatch-test-webroot" { } ''
    mkdir -p $out/pub $out/private
    echo hello-from-web > $out/pub/hello.txt
    echo top-secret > $out/private/secret.txt
  '';
in
{
  name = "nix-hatch-jail-proxy";

  nodes.web = { ... }: {
    networking.firewall.allowedTCPPorts = [ 80 ];
    services.nginx = {
      enable = true;
      # Which token each request carried, to see the proxy's credential.
      commonHttpConfig = ''
        log_format hatch '$request token=$http_x_token';
      '';
      virtualHosts.web = {
        default = true;
        root = webroot;
        extraConfig = "access_log /var/log/nginx/hatch.log hatch;";
      };
    };
  };

  nodes.builder = { ... }: {
    imports = [ common.node ];
    services.nix-hatch.settings = {
      fallback = "decline";
      routes.escape-fetch = "fetcher";
      executors.fetcher = {
        kind = "jail";
        user = "nix-hatch-jail";
        network = "proxy";
        allow = [{ host = "web"; path = "^/pub/"; methods = [ "GET" ]; }];
        credentials = [{
          host = "web";
          header = "X-Token";
          value-file = "/var/lib/nix-hatch-secrets/web-token";
          # The web node speaks plain HTTP on the test network.
          plain-http = true;
        }];
        max-jobs = 2;
        timeout = 120;
      };
    };
  };

  testScript = common.pythonHelpers + ''
    start_all()
    web.wait_for_unit("nginx.service")
    web.wait_for_open_port(80)
    builder.wait_for_unit("multi-user.target")
    builder.succeed(
        "install -d -m 700 /var/lib/nix-hatch-secrets",
        "umask 077; printf tok-123 > /var/lib/nix-hatch-secrets/web-token",
    )

    with subtest("the module made the jail account and pointed the jail at bubblewrap"):
        builder.succeed("id nix-hatch-jail")
        conf = builder.succeed("cat /etc/nix-hatch/config.toml")
        assert "bwrap = \"/nix/store/" in conf, conf
        out = builder.succeed("nix-hatch check")
        assert "route: escape-fetch -> fetcher (kind jail, user nix-hatch-jail" in out, out

    with subtest("allowed path fetched, denied path 403, no direct route, no token inside"):
        out = build_as_alice(builder, "fetched")
        text = builder.succeed(f"cat {out}")
        print(text)
        lines = text.splitlines()
        assert lines[0] == "hello-from-web", text
        assert "private 403" in lines, text
        assert "direct refused" in lines, text
        assert "token in env: no" in lines, text
        assert "tok-123" not in text, text

    with subtest("every decision is in the build log and the audit log"):
        log = nix_log(builder, drv_of(builder, "fetched"))
        assert "nix-hatch proxy: allow GET web/pub/hello.txt" in log, log
        assert "nix-hatch proxy: deny GET web/private/secret.txt" in log, log
        builder.succeed("grep -q deny /var/lib/nix-hatch/proxy-audit.jsonl")

    with subtest("the web server got the credential, only on the allowed request"):
        web.succeed("grep -q 'GET /pub/hello.txt HTTP/1.1 token=tok-123' /var/log/nginx/hatch.log")
        web.fail("grep -q 'GET /private/' /var/log/nginx/hatch.log")
  '';
}
