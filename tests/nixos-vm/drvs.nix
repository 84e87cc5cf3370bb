# The derivations the VM tests build, made with nix/lib.nix as a user's
# flake would. `bash` and `curl` are store paths valid in the VM (see
# common.nix); `nonce` is only there to vary outputs between test runs.
{ hatch, bash, curl, nonce ? "1" }:

rec {
  # host executor "signer": the admin's command gets the args.
  signed = hatch.makeRunner "escape-sign" { env = { inherit nonce; }; } "signed-release" [ "release-1.0" ];

  # No executor routes this feature and Nix doesn't have it: fails.
  unrouted = hatch.escape {
    feature = "escape-nobody-routes";
    name = "unrouted";
    env = { inherit nonce; };
  };

  # An ordinary derivation: Nix builds it in its sandbox, as without nix-hatch.
  plain = derivation {
    name = "plain";
    system = builtins.currentSystem;
    builder = "${bash}/bin/bash";
    args = [ "-c" "echo plain > $out" ];
    inherit nonce;
  };

  # jail executor "fetcher" (network = "proxy"): the derivation's own
  # builder, whose only way out is the policy proxy. Records the body of an
  # allowed URL, then the status codes of a denied path and of a direct
  # connection that bypasses the proxy.
  fetched = hatch.escape {
    feature = "escape-fetch";
    name = "fetched";
    builder = "${bash}/bin/bash";
    args = [
      "-c"
      ''
        set -eu
        ${curl}/bin/curl -sS --fail http://web/pub/hello.txt > $out
        ${curl}/bin/curl -sS -o /dev/null -w 'private %{http_code}\n' http://web/private/secret.txt >> $out
        if ${curl}/bin/curl -sS --noproxy '*' --max-time 5 -o /dev/null http://web/pub/hello.txt; then
          echo "direct connected" >> $out
        else
          echo "direct refused" >> $out
        fi
        if [[ "$(declare -px)" == *tok-123* ]]; then
          echo "token in env: yes" >> $out
        else
          echo "token in env: no" >> $out
        fi
      ''
    ];
    env = { inherit nonce; };
  };

  # Built on another machine through Nix's own remote building
  # (serve.nix): its argument, an input-addressed derivation, is built on
  # the client first and travels signed.
  stampInput = derivation {
    name = "to-stamp";
    system = builtins.currentSystem;
    builder = "${bash}/bin/bash";
    args = [ "-c" "echo to-stamp > $out" ];
    inherit nonce;
  };
  stamped = hatch.makeRunner "escape-stamp" { env = { inherit nonce; }; } "stamped" [ "${stampInput}" ];

  # ssh executor "remote": the admin's command on the other machine.
  rendered = hatch.makeRunner "escape-render" { env = { inherit nonce; }; } "rendered" [ "scene-1" ];
}
