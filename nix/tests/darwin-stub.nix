# nix/darwin-module.nix evaluated without nixpkgs or nix-darwin, against
# the stubs of ./stub.nix:
#   nix-instantiate --eval --strict nix/tests/darwin-stub.nix
#
# What this proves: the module is a well-formed module function; it
# declares today's ncro darwin options; with defaults filled in, its
# `config` evaluates and yields the launchd daemon, the _ncro user and
# group, the state directory, log rotation, settings and trusted keys
# expected. What it cannot prove: nix-darwin's own option types and
# merging (there is no nix-darwin here, nor a Mac).
let
  inherit (builtins)
    attrNames
    filter
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
  check = stub.check "nix/darwin-module.nix";
  pkgs = pkgsFor false;

  module = import ../darwin-module.nix;
  declared =
    (module {
      inherit lib pkgs;
      config = {
        services.ncro = { };
        nix.enable = true;
      };
    }).options.services.ncro;
  defaults = mapAttrs (_: o: o.default) declared;

  evalFor =
    {
      pkgs ? pkgsFor false,
      nixEnable ? true,
    }:
    user:
    let
      r = resolve
        (module {
          inherit lib pkgs;
          config = {
            services.ncro = defaults // user;
            nix.enable = nixEnable;
          };
        }).config;
    in
    if r == null then { } else r;
  evalWith = evalFor { };

  cnoKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  upstreams = [
    {
      url = "https://cache.nixos.org";
      public_key = cnoKey;
    }
    {
      url = "https://private.example";
      public_keys = [ "private-1:AAAA" ];
      password_file = "/etc/ncro/private-password";
    }
  ];
  # Every option set.
  everything = {
    enable = true;
    package = "/nix/store/other-ncro";
    settings = {
      inherit upstreams;
      mesh.enabled = true;
      fallback_cache = {
        enabled = true;
        public_keys = [ "fallback-2:BBBB" ];
      };
    };
    addUpstreamPublicKeys = true;
    port = 9090;
    meshPort = 7950;
    netrcFile = "/etc/ncro/netrc";
  };
  basic = evalWith {
    enable = true;
    settings = { inherit upstreams; };
  };
  every = evalWith everything;
  daemon = c: c.launchd.daemons.ncro.serviceConfig;
  configOf =
    c:
    let
      args = (daemon c).ProgramArguments;
    in
    builtins.elemAt args 3;
in
[
  (check "options" (attrNames declared) [
    "addUpstreamPublicKeys"
    "enable"
    "meshPort"
    "netrcFile"
    "package"
    "port"
    "settings"
  ])
  (check "every option is set by the test" (filter (n: !(everything ? ${n})) (attrNames declared)) [ ])
  (check "disabled module defines nothing" (evalWith { enable = false; }) { })

  (check "launchd daemon" (removeAttrs (daemon basic) [ "ProgramArguments" ]) {
    KeepAlive = true;
    RunAtLoad = true;
    ThrottleInterval = 10;
    UserName = "_ncro";
    GroupName = "_ncro";
    WorkingDirectory = "/var/lib/ncro";
    StandardOutPath = "/var/lib/ncro/ncro.log";
    StandardErrorPath = "/var/lib/ncro/ncro.log";
    SoftResourceLimits.NumberOfFiles = 65536;
    HardResourceLimits.NumberOfFiles = 65536;
  })
  (check "program" (builtins.genList (builtins.elemAt (daemon basic).ProgramArguments) 3) [
    "/nix/store/stub-ncro/bin/ncro"
    "serve"
    "--config"
  ])
  (check "settings: listener and route database" (fileSettings (configOf basic)) {
    inherit upstreams;
    server.listen = "localhost:8080";
    cache.db_path = "/var/lib/ncro/routes.db";
  })
  (check "checked at build time, secrets files stood in for" (
    (checkedSettings (configOf basic)).upstreams
  ) [
    (builtins.head upstreams)
    {
      url = "https://private.example";
      public_keys = [ "private-1:AAAA" ];
      password = "checked-at-run-time";
    }
  ])
  (check "cross: not checked" (
    match "(/nix/store/stub-ncro.toml)#.*" (
      configOf (evalFor { pkgs = pkgsFor true; } {
        enable = true;
        settings = { inherit upstreams; };
      })
    )
  ) [ "/nix/store/stub-ncro.toml" ])
  (check "user and group" {
    inherit (basic.users) knownUsers knownGroups;
    user = {
      inherit (basic.users.users._ncro) uid gid home shell isHidden;
    };
    group = basic.users.groups._ncro.gid;
  } {
    knownUsers = [ "_ncro" ];
    knownGroups = [ "_ncro" ];
    user = {
      uid = 536;
      gid = 536;
      home = "/var/lib/ncro";
      shell = "/usr/bin/false";
      isHidden = true;
    };
    group = 536;
  })
  (check "state directory made before the daemon is loaded" basic.system.activationScripts.launchd.text ''
    mkdir -p /var/lib/ncro
    chown _ncro:_ncro /var/lib/ncro
    chmod 0750 /var/lib/ncro
  '')
  (check "log rotation" basic.environment.etc."newsyslog.d/ncro.conf".text
    "/var/lib/ncro/ncro.log _ncro:_ncro 640 5 10240 * Z\n"
  )
  (check "trusted keys" basic.nix.settings.trusted-public-keys [
    cnoKey
    "private-1:AAAA"
  ])
  (check "no keys without nix.enable" (
    (evalFor { nixEnable = false; } {
      enable = true;
      settings = { inherit upstreams; };
    }).nix.settings or { }
  ) { })

  (check "every option: program" (builtins.head (daemon every).ProgramArguments) "/nix/store/other-ncro/bin/ncro")
  (check "every option: NETRC" (daemon every).EnvironmentVariables { NETRC = "/etc/ncro/netrc"; })
  (check "every option: settings" (
    let
      s = fileSettings (configOf every);
    in
    {
      inherit (s.server) listen;
      inherit (s.mesh) bind_addr;
      inherit (s.cache) db_path;
    }
  ) {
    listen = "localhost:9090";
    bind_addr = "0.0.0.0:7950";
    db_path = "/var/lib/ncro/routes.db";
  })
  (check "every option: own db_path kept" (
    (fileSettings (configOf (evalWith (everything // {
      settings = everything.settings // { cache.db_path = "/Volumes/ncro/routes.db"; };
    })))).cache.db_path
  ) "/Volumes/ncro/routes.db")
  (check "every option: keys with the fallback's" every.nix.settings.trusted-public-keys [
    cnoKey
    "private-1:AAAA"
    "fallback-2:BBBB"
  ])
]
