# Pure functions behind the NixOS module (nix/nixos-module.nix): the
# settings → TOML rendering, the defaults the module fills in, the checks
# that become NixOS assertions, and the `build-hook` setting for a given Nix.
#
# Builtins only (no nixpkgs), so that any Nix, down to Debian's 2.8, can
# evaluate them; tests/nix_module.rs renders sample settings here and runs
# `nix-hatch check` on the result. The module renders
# /etc/nix-hatch/config.toml with `toTOML` too (not with pkgs.formats.toml's
# generator): the function the tests exercise is the one that is deployed,
# and rendering needs no build step (remarshal) at all.
#
#   let r = import ./nix/render.nix; in
#   r.toTOML (r.complete { settings = { ... }; bwrap = "/usr/bin/bwrap"; })
let
  inherit (builtins)
    all any attrNames concatMap concatStringsSep elem filter foldl' fromJSON
    genList isAttrs isBool isFloat isInt isList isPath isString length
    match replaceStrings split stringLength substring toJSON typeOf;

  # --- strings ---------------------------------------------------------------

  hexDigit = n: substring n 1 "0123456789ABCDEF";
  hex2 = n: hexDigit (n / 16) + hexDigit (n - (n / 16) * 16);
  # Control characters U+0001 … U+001F and U+007F (Nix strings have no NUL).
  controlCodes = genList (i: i + 1) 31 ++ [ 127 ];
  controlChars = map (n: fromJSON "\"\\u00${hex2 n}\"") controlCodes;
  controlEscapes = map
    (n:
      if n == 8 then "\\b"
      else if n == 9 then "\\t"
      else if n == 10 then "\\n"
      else if n == 12 then "\\f"
      else if n == 13 then "\\r"
      else "\\u00${hex2 n}")
    controlCodes;

  # TOML basic string: "…" with \\, \" and control characters escaped.
  basicString = s:
    "\"" + replaceStrings ([ "\\" "\"" ] ++ controlChars) ([ "\\\\" "\\\"" ] ++ controlEscapes) s + "\"";

  hasControl = s: replaceStrings controlChars (map (_: "") controlChars) s != s;

  # Regular expressions read better as TOML literal strings ('^a\.b$'):
  # used when the string has a backslash, no quote and no control character.
  tomlString = s:
    if match ".*\\\\.*" s != null && match ".*'.*" s == null && !hasControl s
    then "'" + s + "'"
    else basicString s;

  tomlKey = k: if match "[A-Za-z0-9_-]+" k != null then k else basicString k;

  dotted = path: concatStringsSep "." (map tomlKey path);
  # [ "a" "b" ] → [ "a" "b[i]" ]: how a list element is named in messages.
  indexed = path: i:
    let n = length path; in
    if n == 0 then [ "[${toString i}]" ]
    else genList (j: builtins.elemAt path j) (n - 1) ++ [ "${builtins.elemAt path (n - 1)}[${toString i}]" ];
  showPath = path: concatStringsSep "." path;

  # --- values ----------------------------------------------------------------

  isDerivation = v: isAttrs v && (v.type or null) == "derivation" && v ? outPath;
  isTable = v: isAttrs v && !isDerivation v;
  isTableList = v: isList v && v != [ ] && all isTable v;
  withoutNulls = t: removeAttrs t (filter (n: t.${n} == null) (attrNames t));

  floatString = f:
    let s = toJSON f; in
    if match ".*[.eE].*" s != null then s else s + ".0";

  # One value on one line (scalars, arrays, inline tables).
  inline = path: v:
    if isString v then tomlString v
    else if isDerivation v then tomlString v.outPath
    else if isBool v then (if v then "true" else "false")
    else if isInt v then toString v
    else if isFloat v then floatString v
    else if isList v then
      "[" + concatStringsSep ", " (genList (i: inline (indexed path i) (builtins.elemAt v i)) (length v)) + "]"
    else if isAttrs v then
      let t = withoutNulls v; in
      if t == { } then "{}"
      else "{ " + concatStringsSep ", " (map (n: "${tomlKey n} = ${inline (path ++ [ n ]) t.${n}}") (attrNames t)) + " }"
    else if isPath v then
      throw "nix-hatch settings: ${showPath path} is a Nix path (${toString v}); write a string: \"/etc/…\" for a file on the machine, or \"\${./file}\" to copy it into the store on purpose"
    else if v == null then
      throw "nix-hatch settings: ${showPath path} is null inside a list"
    else throw "nix-hatch settings: ${showPath path}: cannot render a ${typeOf v} as TOML";

  # The lines of a table: its plain keys, then its sub-tables ([a.b]), then
  # its arrays of tables ([[a.b]]). Keys are sorted; null values are left out.
  tableLines = path: table:
    let
      t = withoutNulls table;
      names = attrNames t;
      plain = filter (n: !(isTable t.${n}) && !(isTableList t.${n})) names;
      subtables = filter (n: isTable t.${n}) names;
      tableLists = filter (n: isTableList t.${n}) names;
    in
    map (n: "${tomlKey n} = ${inline (path ++ [ n ]) t.${n}}") plain
    ++ concatMap
      (n:
        let
          sub = withoutNulls t.${n};
          # [a] before [a.b] only when `a` has keys of its own, or nothing at all.
          header = any (m: !(isTable sub.${m}) && !(isTableList sub.${m})) (attrNames sub) || sub == { };
        in
        (if header then [ "" "[${dotted (path ++ [ n ])}]" ] else [ ]) ++ tableLines (path ++ [ n ]) sub)
      subtables
    ++ concatMap
      (n: concatMap (e: [ "" "[[${dotted (path ++ [ n ])}]]" ] ++ tableLines (path ++ [ n ]) e) t.${n})
      tableLists;

  # --- settings --------------------------------------------------------------

  kindOf = e: if isAttrs e then e.kind or null else null;
  defaultUser = kind: if kind == "host" then "root" else "nobody";
  # Words of a Nix setting given as a list or as one string.
  words = v:
    if isList v then v
    else if isString v then filter (w: isString w && w != "") (split "[[:space:]]+" v)
    else [ ];

  executorsOf = settings: let e = settings.executors or { }; in if isAttrs e then e else { };
  routesOf = settings: let r = settings.routes or { }; in if isAttrs r then r else { };

  # Every Nix path value in `v`, as { path, value }.
  pathValues = path: v:
    if isPath v then [{ inherit path; value = v; }]
    else if isDerivation v then [ ]
    else if isAttrs v then concatMap (n: pathValues (path ++ [ n ]) v.${n}) (attrNames v)
    else if isList v then concatMap (i: pathValues (indexed path i) (builtins.elemAt v i)) (genList (i: i) (length v))
    else [ ];

  storeDir = builtins.storeDir or "/nix/store";
  inStore = s: isString s && substring 0 (stringLength storeDir + 1) s == storeDir + "/";

  # Secrets: files the hook reads at build time. { path, value } for each.
  secretsOf = settings:
    concatMap
      (name:
        let e = (executorsOf settings).${name}; in
        if !isAttrs e then [ ]
        else
          (if e ? identity then [{ path = [ "executors" name "identity" ]; value = e.identity; }] else [ ])
          ++ (
            let creds = e.credentials or [ ]; in
            if !isList creds then [ ]
            else concatMap
              (i:
                let c = builtins.elemAt creds i; in
                if isAttrs c && c ? "value-file"
                then [{ path = [ "executors" name "credentials[${toString i}]" "value-file" ]; value = c."value-file"; }]
                else [ ])
              (genList (i: i) (length creds))
          ))
      (attrNames (executorsOf settings));

  compareVersions = builtins.compareVersions;
  atLeast = v: min: compareVersions v min >= 0;
in
rec {
  inherit tomlString tomlKey;

  # settings (an attribute set) → the text of config.toml.
  toTOML = settings:
    let
      lines = tableLines [ ] settings;
      body = concatStringsSep "\n" (if lines != [ ] && builtins.head lines == "" then builtins.tail lines else lines);
    in
    "# Generated from services.nix-hatch.settings; see `nix-hatch check`.\n" + body + "\n";

  # The settings with what the module supplies: every `jail` executor
  # without a `bwrap` key gets `bwrap` (the path of bubblewrap's binary).
  complete = { settings, bwrap ? null }:
    if bwrap == null || !(settings ? executors) || !isAttrs settings.executors then settings
    else settings // {
      executors = builtins.mapAttrs
        (_: e: if kindOf e == "jail" && !(e ? bwrap) then e // { inherit bwrap; } else e)
        settings.executors;
    };

  # The local accounts executors run as (`host` and `jail`; an `ssh`
  # executor's `user` is an account on the far side), without root and
  # nobody: the accounts the module creates when they don't exist.
  localUsers = settings:
    let
      execs = executorsOf settings;
      users = concatMap
        (n:
          let e = execs.${n}; k = kindOf e; in
          if k == "host" || k == "jail" then [ (e.user or (defaultUser k)) ] else [ ])
        (attrNames execs);
      unique = foldl' (acc: u: if elem u acc then acc else acc ++ [ u ]) [ ] users;
    in
    filter (u: isString u && u != "root" && u != "nobody" && match "[0-9]+" u == null) unique;

  # Whether the daemon's unit must delegate its cgroup subtree: a `host`
  # or `jail` executor has limits (memory-max, tasks-max, cpu-max) and no
  # cgroup-parent of its own, so its builds' cgroups go beside the hook's,
  # i.e. below nix-daemon.service (the hook is the daemon's child).
  delegatesCgroups = settings:
    let execs = executorsOf settings; in
    any
      (n:
        let e = execs.${n}; k = kindOf e; in
        (k == "host" || k == "jail")
        && any (key: e ? ${key}) [ "memory-max" "tasks-max" "cpu-max" ]
        && !(e ? cgroup-parent))
      (attrNames execs);

  # The state dir the settings name (the hook's default otherwise).
  stateDir = settings: settings."state-dir" or "/var/lib/nix-hatch";

  # The admin mistakes nix-hatch cannot catch itself, or only too late, one
  # message each ([] when there are none). `systemFeatures`: Nix's
  # system-features (and extra-system-features), a list or one string.
  problems = { settings, systemFeatures ? [ ] }:
    let
      execs = executorsOf settings;
      routes = routesOf settings;
      features = words systemFeatures;
      execNames = attrNames execs;
      known = if execNames == [ ] then "none is defined" else "defined: ${concatStringsSep ", " execNames}";
    in
    (if settings ? routes && !isAttrs settings.routes then [ "settings.routes must be a table (escape feature = executor name)" ] else [ ])
    ++ (if settings ? executors && !isAttrs settings.executors then [ "settings.executors must be a table of executors" ] else [ ])
    # A route to an executor that does not exist.
    ++ concatMap
      (f:
        let e = routes.${f}; in
        if !isString e then [ "settings.routes.${f} must name an executor (a string)" ]
        else if !(execs ? ${e}) then [ "settings.routes.${f} = \"${e}\", but there is no executor \"${e}\" in settings.executors (${known})" ]
        else [ ])
      (attrNames routes)
    # An escape feature Nix itself claims: a build nix-hatch declines (broken
    # config, executor refused) would silently run in Nix's sandbox instead
    # of failing.
    ++ concatMap
      (f: if elem f features then [ "escape feature \"${f}\" is routed by nix-hatch (settings.routes) and also in nix.settings.system-features: if nix-hatch ever declined such a build, Nix would build it in its sandbox instead of failing. Remove \"${f}\" from system-features (nix-hatch does not need it there)." ] else [ ])
      (attrNames routes)
    ++ concatMap
      (n:
        let e = execs.${n}; k = kindOf e; in
        if !isAttrs e then [ "settings.executors.${n} must be a table" ]
        else if !(elem k [ "host" "jail" "ssh" ]) then [ "settings.executors.${n}.kind must be \"host\", \"jail\" or \"ssh\" (got ${if k == null then "nothing" else toJSON k})" ]
        else if k == "jail" && elem (e.user or "nobody") [ "root" "0" ] then [ "settings.executors.${n}.user: a jail never runs its builder as root; name an unprivileged account" ]
        else [ ])
      execNames
    # Secrets by path, never in the (world-readable) store.
    ++ concatMap
      (s:
        let where = "settings.${showPath s.path}"; in
        if isPath s.value then [ "${where} is a Nix path (${toString s.value}): it would be copied into the world-readable Nix store. Give the file on the machine as a string, e.g. \"/run/keys/nix-hatch-token\"." ]
        else if isDerivation s.value || inStore s.value then [ "${where} points into the Nix store, which every user can read: keep the secret outside the store and give its path as a string." ]
        else if !isString s.value then [ "${where} must be an absolute path (a string)" ]
        else [ ])
      (secretsOf settings)
    # Other Nix paths: rendering them would either copy them into the store
    # or name a file of the machine that evaluated the configuration.
    ++ map
      (p: "settings.${showPath p.path} is a Nix path (${toString p.value}); write a string: \"\${./file}\" copies it into the store on purpose, \"/etc/…\" names a file on the machine")
      (filter
        (p: !(any (s: s.path == p.path) (secretsOf settings)))
        (pathValues [ ] settings));

  # The `build-hook` setting for `nix` ({ pname, version } of nix.package):
  # the list form [ nix-hatch hook ] where Nix takes a list (Nix ≥ 2.19),
  # else the nix-hatch-hook program, which needs no arguments (Nix ≤ 2.18;
  # and Lix, forked from 2.18: its build-hook is a list too, but the
  # program works on every Lix that nix-hatch can serve).
  hookSetting = { hatch, nix }:
    if (nix.pname or "nix") == "nix" && atLeast (nix.version or "0") "2.19"
    then [ "${hatch}/bin/nix-hatch" "hook" ]
    else "${hatch}/bin/nix-hatch-hook";

  # Nix 2.25 … 2.33 overwrite `build-hook` from the system nix.conf with
  # their default right after reading it (NixOS/nix#15083, fixed in 2.34):
  # the daemon then needs the setting in NIX_CONFIG too.
  hookIgnoredInNixConf = nix:
    (nix.pname or "nix") == "nix"
    && atLeast (nix.version or "0") "2.25"
    && !(atLeast (nix.version or "0") "2.34");

  # Lix 2.94 and later talk to build hooks over Cap'n Proto RPC
  # (lix/libstore/build/hook-instance.capnp), not the stdio protocol
  # nix-hatch speaks: it cannot be their build-hook.
  lixRpcHooks = nix:
    (nix.pname or "nix") == "lix" && atLeast (nix.version or "0") "2.94";

  # A nix.conf value: lists joined with spaces.
  confValue = v: if isList v then concatStringsSep " " v else v;

  # The line sshd puts in the agent account's authorized_keys: the key may
  # only run the agent wrapper, with no pty, forwarding or agent.
  restrictKey = wrapper: key: "command=\"${wrapper}\",restrict ${key}";

  # The settings with `remote-clients` naming `clients` too (the accounts
  # of services.nix-hatch.remoteClients), so `nix-hatch check` knows them.
  withRemoteClients = clients: settings:
    if clients == [ ] then settings
    else
      let
        own = settings."remote-clients" or [ ];
        all = (if isList own then own else [ own ]) ++ clients;
      in
      settings // { "remote-clients" = foldl' (acc: c: if elem c acc then acc else acc ++ [ c ]) [ ] all; };

  # What keeps other machines' escapes from reaching nix-hatch through the
  # accounts they log in as (`clients`), one message each: an account in
  # Nix's trusted-users (its clients' Nix then sends bare derivations,
  # which never reach a build hook), one Nix's allowed-users turns away,
  # or a Nix whose daemon does not tell clients whether they are trusted
  # (before 2.15, NixOS/nix#7515). `groups`: account → its group names.
  remoteClientProblems = { clients, trustedUsers ? [ "root" ], allowedUsers ? [ "*" ], groups ? { }, nix ? { } }:
    let
      matches = entries: name: any
        (e: e == "*" || e == name
          || (substring 0 1 e == "@" && elem (substring 1 (stringLength e) e) (groups.${name} or [ ])))
        (words entries);
      showList = entries: concatStringsSep " " (words entries);
    in
    (if clients != [ ] && (nix.pname or "nix") == "nix" && nix ? version && !(atLeast nix.version "2.15")
     then [ "remoteClients: Nix ${nix.version} does not tell clients whether they are trusted (Nix >= 2.15, NixOS/nix#7515): their Nix would send bare derivations, which never reach nix-hatch. Use Nix >= 2.15 (nix.package)." ]
     else [ ])
    ++ concatMap
      (name:
        if name == "root" then [ "remoteClients.root: root is always trusted by Nix, so its clients' escapes would never reach nix-hatch; use an account of its own." ]
        else if matches trustedUsers name then [ "remoteClients.${name} is trusted by Nix (nix.settings.trusted-users: ${showList trustedUsers}): its clients' Nix would send bare derivations, which never reach nix-hatch, and their escape builds would fail for missing system features. Remove ${name} from trusted-users (directly, by group or \"*\")." ]
        else if !(matches allowedUsers name) then [ "remoteClients.${name} is not in nix.settings.allowed-users (${showList allowedUsers}): nix-daemon would refuse its connections. Add \"${name}\" (or its group) to allowed-users." ]
        else [ ])
      clients;

}
