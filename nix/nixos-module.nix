# NixOS module: services.nix-hatch (the build hook on this machine),
# services.nix-hatch.remoteClients (accounts other machines build through,
# `ssh-ng://ACCOUNT@this-machine` in their `builders`) and
# services.nix-hatch.agent (the far side of other machines' `ssh` executors).
#
#   services.nix-hatch = {
#     enable = true;
#     settings = {
#       routes.escape-sign = "signer";
#       executors.signer = { kind = "host"; command = [ "${signScript}" ]; };
#     };
#   };
#
# The rendering and the checks are pure functions in ./render.nix (tested
# without nixpkgs by tests/nix_module.rs).
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkDefault mkEnableOption mkIf mkMerge mkOption literalExpression types;

  render = import ./render.nix;
  cfg = config.services.nix-hatch;
  settingsFormat = pkgs.formats.toml { };

  remoteClientNames = lib.attrNames cfg.remoteClients;
  settings = render.complete {
    settings = render.withRemoteClients remoteClientNames cfg.settings;
    bwrap = "${cfg.bubblewrap}/bin/bwrap";
  };
  configFile = pkgs.writeText "nix-hatch-config.toml" (render.toTOML settings);
  stateDir = render.stateDir settings;
  localUsers = render.localUsers settings;

  nixPackage = config.nix.package;
  # A remote client's key runs this and nothing else: the daemon protocol
  # on stdio, as the account (untrusted: see remoteClients).
  daemonStdio = "${nixPackage}/bin/nix-daemon --stdio";
  nixId = { pname = nixPackage.pname or "nix"; version = nixPackage.version or "0"; };

  systemFeatures =
    let s = config.nix.settings; in
    lib.toList (s.system-features or [ ]) ++ lib.toList (s.extra-system-features or [ ]);

  # The far side runs this for every login with the agent's key. It runs
  # the agent whatever the client asked for, except `… --version` (what
  # `nix-hatch check --connect` runs), which only prints the version.
  agentCommand = pkgs.writeShellScript "nix-hatch-agent-ssh" ''
    case "''${SSH_ORIGINAL_COMMAND:-}" in
      *" --version") exec ${cfg.agent.package}/bin/nix-hatch --version ;;
      *) exec ${cfg.agent.package}/bin/nix-hatch agent ;;
    esac
  '';
in
{
  options.services.nix-hatch = {
    enable = mkEnableOption ''
      nix-hatch as this machine's Nix build hook: derivations whose
      `requiredSystemFeatures` name an escape feature routed in
      `settings.routes` are built by the executor it names, everything else
      goes where it would without nix-hatch'';

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The nix-hatch package (provides `nix-hatch` and `nix-hatch-hook`).";
    };

    bubblewrap = mkOption {
      type = types.package;
      default = pkgs.bubblewrap;
      defaultText = literalExpression "pkgs.bubblewrap";
      description = "bubblewrap for `jail` executors; set as their `bwrap` unless they name one.";
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      description = ''
        The contents of /etc/nix-hatch/config.toml (see the README's
        configuration reference). Secrets (`identity`, a credential's
        `value-file`) are given as strings naming files on this machine:
        they are never copied into the store.
      '';
      example = literalExpression ''
        {
          routes.escape-sign = "signer";
          routes.escape-fetch = "fetcher";
          executors.signer = {
            kind = "host";
            command = [ "''${signScript}" ];
            # The default: the derivation's argument paths must be its
            # inputs (it chooses them; the command runs as root).
            arg-paths = "inputs";
            # Who may sign (nix.conf's syntax; default: Nix's
            # trusted-users); every attempt goes to the audit log
            # (`nix-hatch audit`).
            allowed-users = [ "@release" ];
            max-jobs = 1;
            # Builds that may wait in the hook for the slot (default
            # 2 × max-jobs); more are postponed until Nix asks again.
            queue = 4;
            timeout = 600;
            max-output-size = "1M";
          };
          executors.fetcher = {
            kind = "jail";
            user = "nix-hatch-jail";
            network = "proxy";
            allowed-users = [ "*" ];
            allow = [ { host = "github\\.com"; } ];
            # Added to requests that leave over TLS; `plain-http = true;`
            # would send it on plain http:// requests too (trusted networks).
            credentials = [ { host = "api\\.example\\.com"; header = "Authorization";
                              value-file = "/run/keys/example-token"; prefix = "Bearer "; } ];
          };
        }
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      default = configFile;
      defaultText = literalExpression "the rendered settings";
      description = "The rendered config.toml (installed as /etc/nix-hatch/config.toml).";
    };

    buildHook = mkOption {
      type = types.either types.str (types.listOf types.str);
      default = render.hookSetting { hatch = cfg.package; nix = nixId; };
      defaultText = literalExpression ''
        [ "''${package}/bin/nix-hatch" "hook" ]   # Nix >= 2.19
        "''${package}/bin/nix-hatch-hook"          # older Nix, and Lix ≤ 2.93
      '';
      description = "The value of `nix.settings.build-hook`.";
    };

    createUsers = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Create the accounts `host` and `jail` executors run as (their `user`
        keys, except root and nobody) as system users in group nix-hatch.
        An account defined elsewhere keeps its definition.
      '';
    };

    remoteClients = mkOption {
      type = types.attrsOf (types.submodule {
        options.authorizedKeys = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "ssh-ed25519 AAAAC3Nza… root@client-1" ];
          description = "Public keys of the client machines that log in as this account (the `sshKey` of their `nix.buildMachines` entry).";
        };
      });
      default = { };
      example = literalExpression ''
        { fleet.authorizedKeys = [ "ssh-ed25519 AAAAC3Nza… root@client-1" "ssh-ed25519 AAAAC3Nza… root@client-2" ]; }
      '';
      description = ''
        Accounts other machines log in as to have their escape derivations
        built here: they list this machine as
        `ssh-ng://ACCOUNT@this-machine` in `builders` (`nix.buildMachines`
        with `protocol = "ssh-ng"`, one entry per escape feature, each in
        `supportedFeatures` and `mandatoryFeatures`). Each account is a
        system user whose keys may only run `nix-daemon --stdio` (forced
        command, `restrict`); it must not be trusted by Nix (a trusted
        client's Nix sends bare derivations, which never reach nix-hatch)
        and must be allowed to connect (`nix.settings.allowed-users`; the
        default `*` is): evaluation fails otherwise. The accounts are
        written to the config's `remote-clients`, which `nix-hatch check`
        checks. Name them in executors' `allowed-users` to let their
        clients use those executors.
      '';
    };

    agent = {
      enable = mkEnableOption ''
        the far side of `ssh` executors: an account whose authorized keys
        may only run `nix-hatch agent` (forced command, `restrict`)'';

      package = mkOption {
        type = types.package;
        default = cfg.package;
        defaultText = literalExpression "config.services.nix-hatch.package";
        description = "The nix-hatch package whose `nix-hatch agent` runs.";
      };

      user = mkOption {
        type = types.str;
        default = "nix-hatch";
        description = "The account the agent (and so the executors' `command`) runs as; the ssh executor's `user`.";
      };

      authorizedKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "ssh-ed25519 AAAAC3Nza… root@builder" ];
        description = "Public keys of the machines whose `ssh` executors build here (their `identity`).";
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      assertions = map
        (message: { assertion = false; message = "services.nix-hatch: ${message}"; })
        (render.problems { settings = cfg.settings; inherit systemFeatures; })
      ++ [ {
        assertion = !render.lixRpcHooks nixId;
        message = "services.nix-hatch: nix.package is Lix ${nixId.version}: Lix 2.94 and later talk to build hooks over Cap'n Proto RPC, which nix-hatch does not speak. Use Lix 2.93 or older, or Nix.";
      } ];

      environment.etc."nix-hatch/config.toml".source = configFile;
      environment.systemPackages = [ cfg.package ];

      nix.settings.build-hook = cfg.buildHook;

      # Nix 2.25 … 2.33 ignore build-hook from nix.conf; the daemon reads
      # NIX_CONFIG after it (the hook inherits the daemon's environment).
      # Nix ≥ 2.34 reads nix.conf again (NixOS/nix#15083) and gets none.
      systemd.services.nix-daemon.environment = mkIf (render.hookIgnoredInNixConf nixId) {
        NIX_CONFIG = "build-hook = ${render.confValue cfg.buildHook}";
      };

      # Executors with limits (memory-max, tasks-max, cpu-max) and no
      # cgroup-parent put each build in a cgroup beside the hook's own, and
      # the hook is a child of nix-daemon: the daemon's unit must hand its
      # cgroup subtree over (Delegate), and keep its own processes in a
      # leaf below it (DelegateSubgroup, systemd >= 254), because cgroup v2
      # only lets leaf cgroups hold processes and controllers can only be
      # enabled for the children of a cgroup without them. The daemon then
      # runs in nix-daemon.service/supervisor and the builds in
      # nix-daemon.service/nix-hatch/<build> (Nix's and Lix's own
      # use-cgroups builds go beside it the same way).
      systemd.services.nix-daemon.serviceConfig = mkIf (render.delegatesCgroups settings) {
        Delegate = mkDefault true;
        DelegateSubgroup = mkDefault "supervisor";
      };

      # Staging dirs, slot locks and the proxy audit log. The hook runs as
      # root (under the daemon); jailed builders reach their own staging dir.
      systemd.tmpfiles.rules = [ "d ${stateDir} 0755 root root - -" ];

      users.users = mkIf cfg.createUsers (lib.genAttrs localUsers (name: {
        isSystemUser = mkDefault (!config.users.users.${name}.isNormalUser);
        # Weaker than a default: NixOS gives normal users group "users".
        group = lib.mkOverride 1100 "nix-hatch";
        # Weaker than a default: the agent's account may be the same one.
        description = lib.mkOverride 1100 "nix-hatch executor account";
      }));
      users.groups = mkIf (cfg.createUsers && localUsers != [ ]) { nix-hatch = { }; };
    })

    (mkIf (cfg.remoteClients != { }) {
      assertions =
        [{
          assertion = cfg.enable;
          message = "services.nix-hatch.remoteClients: needs services.nix-hatch.enable (the hook that builds the clients' escapes).";
        }]
        ++ map
          (message: { assertion = false; message = "services.nix-hatch: ${message}"; })
          (render.remoteClientProblems {
            clients = remoteClientNames;
            trustedUsers = config.nix.settings.trusted-users or [ "root" ];
            allowedUsers = config.nix.settings.allowed-users or [ "*" ];
            groups = lib.genAttrs remoteClientNames (name:
              let u = config.users.users.${name}; in [ u.group ] ++ (u.extraGroups or [ ]));
            nix = nixId;
          });
      services.openssh.enable = mkDefault true;
      users.users = lib.mapAttrs
        (name: client: {
          isSystemUser = mkDefault true;
          group = lib.mkOverride 1100 "nix-hatch-clients";
          description = mkDefault "nix-hatch remote client (other machines' builds)";
          # sshd runs the forced command through the account's shell.
          useDefaultShell = mkDefault true;
          home = mkDefault "/var/empty";
          openssh.authorizedKeys.keys = map (render.restrictKey daemonStdio) client.authorizedKeys;
        })
        cfg.remoteClients;
      users.groups.nix-hatch-clients = { };
      warnings = lib.concatMap
        (name: lib.optional (cfg.remoteClients.${name}.authorizedKeys == [ ])
          "services.nix-hatch.remoteClients.${name} has no authorizedKeys: no machine can log in as it.")
        remoteClientNames;
    })

    (mkIf cfg.agent.enable {
      services.openssh.enable = mkDefault true;
      users.users.${cfg.agent.user} = {
        isSystemUser = mkDefault true;
        group = lib.mkOverride 1100 "nix-hatch";
        description = mkDefault "nix-hatch agent (far side of ssh executors)";
        # sshd runs the forced command through the account's shell.
        useDefaultShell = mkDefault true;
        home = mkDefault "/var/lib/nix-hatch-agent";
        createHome = mkDefault true;
        openssh.authorizedKeys.keys = map (render.restrictKey agentCommand) cfg.agent.authorizedKeys;
      };
      users.groups.nix-hatch = { };
      warnings = lib.optional (cfg.agent.authorizedKeys == [ ])
        "services.nix-hatch.agent is enabled without authorizedKeys: no executor can log in.";
    })
  ];
}
