# Tests of nix/lib.nix (what the module derives from its options) and of
# packaging/ncro.service against it, with builtins only:
#   nix-instantiate --eval --strict nix/tests/pure.nix
# Evaluates to the list of passed checks; a failure throws with got/want.
let
  l = import ../lib.nix;
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    length
    toJSON
    ;

  check =
    name: got: want:
    if got == want then name else throw "nix/lib.nix: ${name}: got ${toJSON got}, want ${toJSON want}";

  # Just enough of nixpkgs' lib for the 2.2 example modules' own use of it.
  stubLib = {
    mkForce = x: x;
  };
  readme = (import ./compat-2.2.nix { lib = stubLib; }).services.ncro;
  full = (import ./compat-2.2-full.nix { lib = stubLib; }).services.ncro;
  cfg = l.configWithDefaults;
  service = c: l.serviceConfig {
    cfg = c;
    execStart = "ncro";
  };

  pinned = cfg (readme // {
    workers = 4;
    cpus = [ 5 3 4 2 ];
    controlCpu = 1;
  });
  lowPort = cfg { settings.server.listen = ":80"; };
  withSecrets = cfg (readme // {
    credentials.internal = "/run/secrets/internal";
    meshKeyFile = "/run/secrets/mesh.key";
  });
  failing = c: map (a: a.message) (filter (a: !a.assertion) (l.assertions c));

  # packaging/ncro.service must carry the module's hardening and limits.
  unit = l.parseServiceSection (builtins.readFile ../../packaging/ncro.service);
  joined = vs: concatStringsSep " " vs;
  shared = l.sharedServiceConfig;
  unitChecks = map (
    k: check "packaging/ncro.service ${k}" (joined (unit.${k} or [ "<missing>" ])) (
      joined (l.unitValues shared.${k})
    )
  ) (attrNames shared);
  extraUnitKeys = filter (k: !(shared ? ${k}) && k != "ExecStart") (attrNames unit);
in
[
  (check "listen :8080" (l.normalizeListen ":8080") "0.0.0.0:8080")
  (check "listen empty" (l.normalizeListen "") "0.0.0.0:8080")
  (check "listen v6" (l.normalizeListen "[::]:8080") "[::]:8080")
  (check "listen localhost" (l.normalizeListen "localhost:8080") "127.0.0.1:8080")
  (check "loopback listeners" (map l.isLoopback [
    "localhost:8080"
    "127.0.0.1:80"
    "127.1.2.3:80"
    "[::1]:80"
    "0.0.0.0:80"
    "[::]:80"
    "10.0.0.1:80"
    "localhost.example:80"
  ]) [ true true true true false false false false ])
  (check "firewall ports" {
    local = l.firewallTcpPorts { server.listen = "localhost:8080"; };
    all = l.firewallTcpPorts { server.listen = ":8080"; };
    default = l.firewallTcpPorts { };
    meshOff = l.firewallUdpPorts { mesh.bind_addr = "0.0.0.0:1"; };
    meshOn = l.firewallUdpPorts { mesh.enabled = true; };
  } {
    local = [ ];
    all = [ 8080 ];
    default = [ 8080 ];
    meshOff = [ ];
    meshOn = [ 7946 ];
  })
  (check "port null keeps ncro's default listener" (l.finalSettings (cfg { port = null; })).server { })
  (check "settings.server.listen wins over port" (l.finalSettings (cfg {
    port = 1;
    settings.server.listen = "[::1]:2";
  })).server.listen "[::1]:2")
  (check "meshPort only for an enabled mesh" {
    off = l.finalSettings (cfg { settings.mesh.peers = [ ]; });
    on = (l.finalSettings (cfg { meshPort = 9; settings.mesh.enabled = true; })).mesh;
    set = (l.finalSettings (cfg { settings.mesh = { enabled = true; bind_addr = "10.0.0.1:1"; }; })).mesh;
  } {
    off = {
      server.listen = "localhost:8080";
      mesh.peers = [ ];
    };
    on = {
      enabled = true;
      bind_addr = "0.0.0.0:9";
    };
    set = {
      enabled = true;
      bind_addr = "10.0.0.1:1";
    };
  })
  (check "fallback keys only when enabled" {
    off = l.upstreamPublicKeys { fallback_cache.public_key = "x-1:AA"; };
    default = l.upstreamPublicKeys { fallback_cache.enabled = true; };
    own = l.upstreamPublicKeys {
      upstreams = [ { public_key = "a-1:AA"; } ];
      fallback_cache = {
        enabled = true;
        public_key = "a-1:AA";
        public_keys = [ "b-1:BB" ];
      };
    };
  } {
    off = [ ];
    default = [ l.fallbackDefaultKey ];
    own = [
      "a-1:AA"
      "b-1:BB"
    ];
  })
  (check "check settings: secrets files stood in for" (l.checkSettings {
    upstreams = [
      { url = "a"; password_file = "/run/x"; }
      { url = "b"; password = "p"; password_file = "/run/x"; }
    ];
    fallback_cache.password_file = "/run/y";
  }) {
    upstreams = [
      { url = "a"; password = "checked-at-run-time"; }
      # Both set is an error ncro must report: left as written.
      { url = "b"; password = "p"; password_file = "/run/x"; }
    ];
    fallback_cache.password = "checked-at-run-time";
  })
  (check "instance names" (map l.validInstanceName [
    "a"
    "b.internal"
    "x_1-2"
    "a/b"
    "a b"
    ""
    "ä"
  ]) [ true true true false false false false ])
  (check "port" (map l.portOf [
    "0.0.0.0:8080"
    "[::1]:080"
    "host"
  ]) [ 8080 80 null ])

  # ncro 2.2's README example: settings pass through untouched.
  (check "2.2 options are all declared" (filter (
    n:
    !(builtins.elem n [
      "enable"
      "package"
      "settings"
      "socketActivation"
      "addUpstreamPublicKeys"
    ])
  ) (attrNames readme ++ attrNames full)) [ ])
  # Only the listener is added (port = 8080, as today's ncro module).
  (check "2.2 settings unchanged but the listener" (l.finalSettings (cfg readme)) (
    readme.settings // { server.listen = "localhost:8080"; }
  ))
  (check "2.2 full settings unchanged" (l.finalSettings (cfg full)) full.settings)
  (check "2.2 trusted keys" (l.upstreamPublicKeys readme.settings) [
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
    "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="
  ])
  (check "2.2 service has no pinning or credentials" (
    builtins.intersectAttrs {
      CPUAffinity = 0;
      LoadCredential = 0;
      AmbientCapabilities = 0;
      EnvironmentFile = 0;
    } (service (cfg readme))
  ) { })
  (check "2.2 service basics" {
    inherit (service (cfg readme)) Type WatchdogSec RestrictAddressFamilies CapabilityBoundingSet;
  } {
    Type = "notify";
    WatchdogSec = "30s";
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    CapabilityBoundingSet = [ "" ];
  })
  (check "2.2 inline password warns" (length (l.warnings (cfg full))) 1)
  (check "no warning without passwords" (l.warnings (cfg readme)) [ ])

  # CPU pinning reaches both ncro and systemd.
  (check "pinned server settings" (l.finalSettings pinned).server {
    listen = "localhost:8080";
    workers = 4;
    cpus = [ 5 3 4 2 ];
    control_cpu = 1;
  })
  (check "pinned CPUAffinity" (service pinned).CPUAffinity "1 2 3 4 5")
  (check "pinning from settings alone" (l.cpuAffinity {
    server = {
      cpus = [ 0 2 ];
      control_cpu = 2;
    };
  }) [ 0 2 ])
  (check "no affinity without cpus" (l.cpuAffinity { server.control_cpu = 1; }) null)
  (check "pinned assertions pass" (failing pinned) [ ])
  (check "workers must match cpus" (length (failing (pinned // { workers = 3; }))) 1)
  (check "cpus listed twice" (length (failing (pinned // { cpus = [ 1 1 ]; workers = null; }))) 1)

  # Address families, capabilities, secrets.
  (check "discovery needs netlink" (l.addressFamilies { discovery.enabled = true; }) [
    "AF_INET"
    "AF_INET6"
    "AF_UNIX"
    "AF_NETLINK"
  ])
  (check "port 80 needs the bind capability" {
    inherit (service lowPort) CapabilityBoundingSet AmbientCapabilities;
  } {
    CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
    AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
  })
  (check "socket activation binds for us" (service (lowPort // { socketActivation = true; }))
    .CapabilityBoundingSet [ "" ])
  (check "credentials" (service withSecrets).LoadCredential [
    "internal:/run/secrets/internal"
    "mesh-key:/run/secrets/mesh.key"
  ])
  (check "mesh key path" (l.finalSettings withSecrets).mesh.private_key "/run/credentials/ncro.service/mesh-key")
  (check "mesh-key credential is reserved" (length (failing (withSecrets // {
    credentials.mesh-key = "/x";
  }))) 1)
  (check "watchdog can be disabled" ((service (cfg { watchdogSec = null; })) ? WatchdogSec) false)

  (check "unit file parser" (l.parseServiceSection ''
    [Unit]
    Type=simple
    [Service]
    Type=notify
    SystemCallFilter=@system-service
    SystemCallFilter=~@privileged
    CapabilityBoundingSet=
  '') {
    Type = [ "notify" ];
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
    CapabilityBoundingSet = [ "" ];
  })
  (check "packaging/ncro.service has nothing the module lacks" extraUnitKeys [ ])
]
++ unitChecks
