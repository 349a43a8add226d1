# nix/module.nix evaluated without nixpkgs, against a stub of the few lib
# functions it uses:
#   nix-instantiate --eval --strict nix/tests/module-stub.nix
#
# What this proves: the module is a well-formed NixOS module function; it
# declares every ncro 2.2 option (and every option the 2.2 examples set);
# with option defaults filled in, its `config` evaluates for the 2.2
# examples and a pinned setup, and yields the expected units, keys and
# firewall ports. What it cannot prove: option types, merging and priority
# semantics of the real module system. Those are checked with nixpkgs by
# compat-eval.nix (flake check `module-compat`) and the VM tests.
let
  inherit (builtins)
    attrNames
    filter
    foldl'
    isAttrs
    length
    mapAttrs
    match
    toJSON
    ;

  check =
    name: got: want:
    if got == want then name else throw "nix/module.nix (stub): ${name}: got ${toJSON got}, want ${toJSON want}";

  # Types are never inspected here; a name is enough.
  stubType = name: { _type = "stub-type"; inherit name; };
  types = {
    bool = stubType "bool";
    str = stubType "str";
    path = stubType "path";
    package = stubType "package";
    nullOr = t: stubType "nullOr";
    listOf = t: stubType "listOf";
    attrsOf = t: stubType "attrsOf";
    ints = {
      positive = stubType "positive";
      unsigned = stubType "unsigned";
    };
  };

  # The module system's property wrappers, kept as data and resolved below.
  lib = {
    inherit types;
    mkOption = o: o // { _type = "option"; };
    mkEnableOption = name: {
      _type = "option";
      default = false;
      description = "Whether to enable ${name}.";
    };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkAfter = content: { _type = "order"; inherit content; };
    mkDefault = content: { _type = "override"; inherit content; };
    mkForce = content: content;
  };

  # mkIf/mkMerge/mkAfter resolved the way the module system would for a
  # single definition: false conditions vanish, merges combine attrsets.
  resolve =
    v:
    if !(isAttrs v) then
      v
    else if v._type or null == "if" then
      (if v.condition then resolve v.content else null)
    else if v._type or null == "merge" then
      foldl' (a: b: a // b) { } (filter (x: x != null) (map resolve v.contents))
    else if v._type or null == "order" || v._type or null == "override" then
      resolve v.content
    else
      let
        r = mapAttrs (_: resolve) v;
      in
      removeAttrs r (filter (n: r.${n} == null) (attrNames r));

  pkgs = {
    formats.toml = _: {
      type = stubType "toml";
      # The rendered settings stay inspectable: JSON inside the "path".
      generate = name: value: "/nix/store/stub-${name}#${toJSON value}";
    };
    callPackage = _: _: "/nix/store/stub-ncro";
  };

  module = import ../module.nix;
  declared =
    (module {
      inherit lib pkgs;
      config.services.ncro = { };
    }).options.services.ncro;
  defaults = mapAttrs (_: o: o.default) declared;

  evalWith =
    user:
    let
      cfg = defaults // user;
    in
    {
      inherit cfg;
      config =
        let
          r = resolve
            (module {
              inherit lib pkgs;
              config.services.ncro = cfg;
            }).config;
        in
        if r == null then { } else r;
    };

  readmeModule = import ./compat-2.2.nix { inherit lib; };
  fullModule = import ./compat-2.2-full.nix { inherit lib; };
  readme = evalWith readmeModule.services.ncro;
  full = evalWith fullModule.services.ncro;
  pinned = evalWith (
    readmeModule.services.ncro
    // {
      cpus = [
        2
        3
      ];
      controlCpu = 1;
      openFirewall = true;
    }
  );
  off = evalWith { enable = false; };

  svc = e: e.config.systemd.services.ncro;
  renderedSettings =
    e:
    let
      m = match ".* --config /nix/store/stub-ncro.toml#(.*)" (svc e).serviceConfig.ExecStart;
    in
    if m == null then throw "ExecStart without --config" else builtins.fromJSON (builtins.head m);
  undeclared = e: filter (n: !(declared ? ${n})) (attrNames e);
in
[
  (check "2.2 options declared" (filter (n: !(declared ? ${n})) [
    "enable"
    "package"
    "settings"
    "socketActivation"
    "addUpstreamPublicKeys"
  ]) [ ])
  (check "2.2 defaults" {
    inherit (defaults) enable settings socketActivation addUpstreamPublicKeys;
  } {
    enable = false;
    settings = { };
    socketActivation = false;
    addUpstreamPublicKeys = true;
  })
  (check "README example sets only declared options" (undeclared readmeModule.services.ncro) [ ])
  (check "full 2.2 example sets only declared options" (undeclared fullModule.services.ncro) [ ])
  (check "disabled module defines nothing" off.config { })

  (check "README: ExecStart" (match "(/nix/store/stub-ncro/bin/ncro serve --config) .*"
    (svc readme).serviceConfig.ExecStart
  ) [ "/nix/store/stub-ncro/bin/ncro serve --config" ])
  (check "README: settings rendered as given" (renderedSettings readme) (
    readmeModule.services.ncro.settings // { server = { }; }
  ))
  (check "README: service" {
    inherit (svc readme) wantedBy after requires;
    inherit ((svc readme).serviceConfig) Type DynamicUser StateDirectory;
  } {
    wantedBy = [ "multi-user.target" ];
    after = [ "network-online.target" ];
    requires = [ ];
    Type = "notify";
    DynamicUser = true;
    StateDirectory = "ncro";
  })
  (check "README: no socket unit" readme.config.systemd.sockets { })
  (check "README: trusted keys" readme.config.nix.settings.trusted-public-keys [
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
    "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="
  ])
  (check "README: firewall untouched" (readme.config.networking ? firewall) false)
  (check "README: assertions hold" (filter (a: !a.assertion) readme.config.assertions) [ ])

  (check "2.2 full: socket unit" {
    inherit (full.config.systemd.sockets.ncro) listenStreams wantedBy;
  } {
    listenStreams = [ "0.0.0.0:8080" ];
    wantedBy = [ "sockets.target" ];
  })
  (check "2.2 full: service requires the socket" (svc full).requires [ "ncro.socket" ])
  (check "2.2 full: password warning" (length full.config.warnings) 1)
  (check "2.2 full: settings rendered as given" (renderedSettings full)
    fullModule.services.ncro.settings
  )

  (check "pinned: CPUAffinity" (svc pinned).serviceConfig.CPUAffinity "1 2 3")
  (check "pinned: ncro settings" {
    inherit ((renderedSettings pinned).server) cpus control_cpu;
  } {
    cpus = [
      2
      3
    ];
    control_cpu = 1;
  })
  (check "pinned: firewall" pinned.config.networking.firewall {
    allowedTCPPorts = [ 8080 ];
    allowedUDPPorts = [ ];
  })
]
