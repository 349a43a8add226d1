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
    length
    mapAttrs
    match
    ;

  stub = import ./stub.nix;
  inherit (stub)
    lib
    resolve
    pkgsFor
    fileSettings
    checkedSettings
    ;
  check = stub.check "nix/module.nix";

  pkgs = pkgsFor false;

  module = import ../module.nix;
  declared =
    (module {
      inherit lib pkgs;
      config.services.ncro = { };
    }).options.services.ncro;
  defaults = mapAttrs (_: o: o.default) declared;
  declaredInstance = declared.instances.type.elemType.module.options;
  instanceDefaults = mapAttrs (_: o: o.default) declaredInstance;

  evalFor =
    pkgs: user:
    let
      cfg =
        defaults
        // user
        // {
          instances = mapAttrs (_: i: instanceDefaults // i) (user.instances or { });
        };
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
  evalWith = evalFor pkgs;

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
  configOf =
    e:
    let
      m = match "[^ ]*/bin/ncro serve --config (.*)" (svc e).serviceConfig.ExecStart;
    in
    if m == null then throw "ExecStart without --config" else builtins.head m;
  renderedSettings = e: fileSettings (configOf e);
  undeclared = e: filter (n: !(declared ? ${n})) (attrNames e);
  failing = e: map (a: a.message) (filter (a: !a.assertion) e.config.assertions);

  cnoKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  ncKey = "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
  upstream = url: key: {
    inherit url;
    public_key = key;
  };

  # Every top-level option set, to values other than their defaults, and
  # no instances: ncro.service carries them all.
  single = {
    enable = true;
    package = "/nix/store/other-ncro";
    settings = {
      upstreams = [
        (upstream "https://cache.nixos.org" cnoKey)
        {
          url = "https://private.example";
          password_file = "/run/credentials/ncro.service/private";
          public_keys = [ "private-1:AAAA" ];
        }
      ];
      mesh.enabled = true;
      fallback_cache = {
        enabled = true;
        public_keys = [ "fallback-2:BBBB" ];
      };
    };
    socketActivation = true;
    addUpstreamPublicKeys = true;
    workers = 2;
    cpus = [
      2
      3
    ];
    controlCpu = 1;
    openFilesLimit = 1000;
    memlockLimit = "32M";
    watchdogSec = "60s";
    credentials.private = "/run/secrets/private";
    meshKeyFile = "/run/secrets/mesh.key";
    environmentFile = "/run/secrets/aws.env";
    openFirewall = true;
    port = 9090;
    meshPort = 7950;
    netrcFile = "/run/secrets/netrc";
  };
  everything = single // {
    instances = {
      a = {
        port = 8081;
        meshPort = 7951;
        netrcFile = "/run/secrets/a.netrc";
        openFirewall = true;
        settings = {
          upstreams = [ (upstream "https://cache.nixos.org" cnoKey) ];
          server = {
            cpus = [
              4
              5
            ];
            control_cpu = 6;
          };
          mesh.enabled = true;
        };
      };
      "b.internal" = {
        socketActivation = true;
        openFirewall = true;
        settings = {
          server.listen = ":8082";
          upstreams = [ (upstream "https://nix-community.cachix.org" ncKey) ];
          mesh.enabled = true;
          fallback_cache.enabled = true;
        };
      };
    };
  };
  singleE = evalWith single;
  everyE = evalWith everything;
  crossE = evalFor (pkgsFor true) single;
  dropIn = name: everyE.config.systemd.services."ncro@${name}";
  template = everyE.config.systemd.services."ncro@";
  etc = everyE.config.environment.etc;

  twoOn =
    a: b:
    evalWith {
      enable = true;
      instances = {
        one = a;
        two = b;
      };
    };

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
  # As today's ncro module: port = 8080 gives localhost:8080.
  (check "README: settings rendered as given, listening on localhost:8080" (renderedSettings readme) (
    readmeModule.services.ncro.settings // { server.listen = "localhost:8080"; }
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
  (check "pinned: firewall (localhost:8080 needs no port)" pinned.config.networking.firewall {
    allowedTCPPorts = [ ];
    allowedUDPPorts = [ ];
  })
  (check "open firewall for :8080" (evalWith (readmeModule.services.ncro // {
    openFirewall = true;
    settings = readmeModule.services.ncro.settings // { server.listen = ":8080"; };
  })).config.networking.firewall {
    allowedTCPPorts = [ 8080 ];
    allowedUDPPorts = [ ];
  })
  (check "README: config checked at build time" (checkedSettings (configOf readme)) (
    renderedSettings readme
  ))

  # Every option set, no instances: ncro.service.
  (check "every option is set by the test" (filter (n: !(everything ? ${n}) && !(declared.${n}.readOnly or false)) (attrNames declared)) [ ])
  (check "every instance option is set by the test" (
    filter (n: !(everything.instances.a ? ${n} || everything.instances."b.internal" ? ${n})) (
      attrNames declaredInstance
    )
  ) [ ])
  (check "single: assertions hold" (failing singleE) [ ])
  (check "single: port and meshPort" (
    let
      r = renderedSettings singleE;
    in
    {
      inherit (r.server) listen;
      inherit (r.mesh) bind_addr private_key;
    }
  ) {
    listen = "localhost:9090";
    bind_addr = "0.0.0.0:7950";
    private_key = "/run/credentials/ncro.service/mesh-key";
  })
  (check "single: secrets files stood in for in the check" (
    (checkedSettings (configOf singleE)).upstreams
  ) [
    (upstream "https://cache.nixos.org" cnoKey)
    {
      url = "https://private.example";
      password = "checked-at-run-time";
      public_keys = [ "private-1:AAAA" ];
    }
  ])
  (check "single: the check runs the configured package" (
    match ".*(/nix/store/other-ncro/bin/ncro --check --config).*" (configOf singleE)
  ) [ "/nix/store/other-ncro/bin/ncro --check --config" ])
  (check "cross: no check, the file itself" (
    match "(/nix/store/stub-ncro.toml)#.*" (configOf crossE)
  ) [ "/nix/store/stub-ncro.toml" ])
  (check "single: netrc credential and NETRC" {
    inherit ((svc singleE).serviceConfig) LoadCredential Environment;
  } {
    LoadCredential = [
      "private:/run/secrets/private"
      "mesh-key:/run/secrets/mesh.key"
      "netrc:/run/secrets/netrc"
    ];
    Environment = [ "NETRC=%d/netrc" ];
  })
  (check "single: socket on 127.0.0.1" singleE.config.systemd.sockets.ncro.listenStreams [
    "127.0.0.1:9090"
  ])
  (check "single: firewall: mesh only (HTTP on loopback)" singleE.config.networking.firewall {
    allowedTCPPorts = [ ];
    allowedUDPPorts = [ 7950 ];
  })
  (check "single: keys of upstreams and the enabled fallback" singleE.config.nix.settings.trusted-public-keys [
    cnoKey
    "private-1:AAAA"
    "fallback-2:BBBB"
  ])
  (check "addUpstreamPublicKeys = false" (
    (evalWith (single // { addUpstreamPublicKeys = false; })).config.nix.settings or { }
  ) { })

  # Every option and two instances: ncro@.service and its drop-ins.
  (check "instances: assertions hold" (failing everyE) [ ])
  (check "instances: top-level settings unused, with a warning" {
    ncro = everyE.config.systemd.services ? ncro;
    socket = everyE.config.systemd.sockets ? ncro;
    warned = builtins.any (w: match ".*settings is not used.*" w != null) everyE.config.warnings;
  } {
    ncro = false;
    socket = false;
    warned = true;
  })
  (check "instances: template" {
    inherit (template.serviceConfig) ExecStart StateDirectory Environment Type DynamicUser LimitNOFILE;
    inherit (template) description;
    pinned = template.serviceConfig ? CPUAffinity;
  } {
    ExecStart = "/nix/store/other-ncro/bin/ncro serve --config /etc/ncro/%i.toml";
    StateDirectory = "ncro-%i";
    Environment = [ "NCRO_DB_PATH=/var/lib/ncro-%i/routes.db" ];
    Type = "notify";
    DynamicUser = true;
    LimitNOFILE = 1000;
    description = "Nix Cache Route Optimizer instance %i";
    pinned = false;
  })
  (check "instances: a's drop-in" {
    inherit (dropIn "a") overrideStrategy wantedBy requires;
    inherit ((dropIn "a").serviceConfig) CPUAffinity LoadCredential Environment;
    keys = attrNames (dropIn "a").serviceConfig;
  } {
    overrideStrategy = "asDropin";
    wantedBy = [ "multi-user.target" ];
    requires = [ ];
    CPUAffinity = "4 5 6";
    LoadCredential = [ "netrc:/run/secrets/a.netrc" ];
    Environment = [
      "NCRO_DB_PATH=/var/lib/ncro-%i/routes.db"
      "NETRC=%d/netrc"
    ];
    keys = [
      "CPUAffinity"
      "Environment"
      "LoadCredential"
    ];
  })
  (check "instances: b's drop-in" {
    inherit (dropIn "b.internal") requires after;
    serviceConfig = (dropIn "b.internal").serviceConfig;
  } {
    requires = [ "ncro@b.internal.socket" ];
    after = [ "ncro@b.internal.socket" ];
    serviceConfig = { };
  })
  (check "instances: configuration files" {
    a = (fileSettings etc."ncro/a.toml".source).server;
    b = (fileSettings etc."ncro/b.internal.toml".source).server;
    aMesh = (fileSettings etc."ncro/a.toml".source).mesh.bind_addr;
    checked = checkedSettings etc."ncro/a.toml".source != null;
    trigger = (dropIn "a").restartTriggers == [ etc."ncro/a.toml".source ];
  } {
    a = {
      listen = "localhost:8081";
      cpus = [
        4
        5
      ];
      control_cpu = 6;
    };
    b.listen = ":8082";
    aMesh = "0.0.0.0:7951";
    checked = true;
    trigger = true;
  })
  (check "instances: sockets" (mapAttrs (_: s: s.listenStreams) everyE.config.systemd.sockets) {
    "ncro@b.internal" = [ "0.0.0.0:8082" ];
  })
  (check "instances: firewall" everyE.config.networking.firewall {
    allowedTCPPorts = [ 8082 ];
    allowedUDPPorts = [
      7951
      7946
    ];
  })
  (check "instances: keys of every instance and b's fallback" everyE.config.nix.settings.trusted-public-keys [
    cnoKey
    ncKey
  ])

  # Assertion failures.
  (check "duplicate listen addresses" (failing (twoOn { port = 8081; } {
    settings.server.listen = "localhost:8081";
  })) [
    "services.ncro.instances: listen addresses must be unique; these instances would listen on the same address: one (127.0.0.1:8081) and two (127.0.0.1:8081)."
  ])
  (check "a wildcard listener takes the port on every address" (failing (twoOn { port = 8081; } {
    settings.server.listen = ":8081";
  })) [
    "services.ncro.instances: listen addresses must be unique; these instances would listen on the same address: one (127.0.0.1:8081) and two (0.0.0.0:8081)."
  ])
  (check "same port on two specific addresses is fine" (failing (twoOn { port = 8081; } {
    settings.server.listen = "10.0.0.1:8081";
  })) [ ])
  (check "duplicate mesh addresses" (failing (twoOn {
    port = 8081;
    settings.mesh.enabled = true;
  } {
    port = 8082;
    settings.mesh.enabled = true;
  })) [
    "services.ncro.instances: mesh addresses must be unique; these mesh-enabled instances would bind the same UDP address: one (0.0.0.0:7946) and two (0.0.0.0:7946)."
  ])
  (check "distinct mesh ports pass" (failing (twoOn {
    port = 8081;
    meshPort = 7001;
    settings.mesh.enabled = true;
  } {
    port = 8082;
    settings.mesh.enabled = true;
  })) [ ])
  (check "bad instance name" (failing (evalWith {
    enable = true;
    instances."a/b".port = 8081;
  })) [
    "services.ncro.instances.\"a/b\": an instance name may only contain letters, digits, '_', '.' and '-'."
  ])
  (check "an instance needs port or listen" (failing (twoOn { port = 8081; } { })) [
    "services.ncro.instances.two: set port or settings.server.listen."
  ])
  (check "netrc credential name reserved" (failing (evalWith (single // {
    credentials.netrc = "/x";
  }))) [ "services.ncro.credentials.netrc is reserved for services.ncro.netrcFile." ])
]
