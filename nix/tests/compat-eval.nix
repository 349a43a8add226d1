# Flake check `module-compat`: ncro 2.2 NixOS configurations (and one with
# instances) evaluated with the real module system (nixpkgs), no VM. A configuration passes when it
# evaluates, its assertions hold, and the units and trusted keys it yields
# are what ncro 2.2 users rely on. The output lists the rendered units, so
# a reviewer can read what the module produces.
{
  self,
  nixpkgs,
  pkgs,
}:
let
  inherit (nixpkgs) lib;

  eval =
    module:
    (lib.nixosSystem {
      modules = [
        self.nixosModules.default
        module
        {
          nixpkgs.hostPlatform = pkgs.stdenv.hostPlatform.system;
          # No bootloader or file systems to configure for an evaluation.
          boot.isContainer = true;
          system.stateVersion = lib.trivial.release;
        }
      ];
    }).config;

  expect = name: cond: if cond then true else throw "module-compat: ${name}";

  report =
    name: module:
    let
      c = eval module;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      service = c.systemd.units."ncro.service".text;
      socket = c.systemd.units."ncro.socket".text or null;
      keys = c.nix.settings.trusted-public-keys;
      ok =
        expect "${name}: assertions: ${lib.concatStringsSep "; " failed}" (failed == [ ])
        && expect "${name}: Type=notify" (lib.hasInfix "Type=notify" service)
        && expect "${name}: ExecStart" (lib.hasInfix "/bin/ncro serve --config /nix/store/" service)
        && expect "${name}: cache.nixos.org key trusted" (
          lib.elem "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" keys
        )
        && expect "${name}: nix-community key trusted" (
          lib.elem "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=" keys
        )
        && expect "${name}: substituters" (c.nix.settings.substituters == [ "http://localhost:8080" ])
        && expect "${name}: io_uring allowed" (
          lib.hasInfix "SystemCallFilter=io_uring_setup io_uring_enter io_uring_register" service
        );
    in
    assert ok;
    ''
      ### ${name}
      ${service}
      ${if socket == null then "(no ncro.socket)" else socket}
      trusted-public-keys = ${toString keys}
      warnings:
      ${lib.concatStringsSep "\n" c.warnings}
    '';

  # instances.NAME through the real module system: the template, an
  # instance's drop-in, its socket and configuration file, and the
  # assertion that two instances may not share a listen address.
  cno = {
    url = "https://cache.nixos.org";
    public_key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  };
  instances = {
    public = {
      port = 8080;
      settings.upstreams = [ cno ];
    };
    internal = {
      socketActivation = true;
      openFirewall = true;
      netrcFile = "/run/secrets/ncro-internal.netrc";
      settings = {
        server.listen = ":8081";
        upstreams = [ cno ];
      };
    };
  };
  instancesReport =
    let
      c = eval { services.ncro = { enable = true; inherit instances; }; };
      failed = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
      template = c.systemd.units."ncro@.service".text;
      internal = c.systemd.units."ncro@internal.service".text;
      clash = eval {
        services.ncro = {
          enable = true;
          # public listens where internal does (":8081" is 0.0.0.0:8081).
          instances = instances // {
            public.settings.server.listen = "0.0.0.0:8081";
          };
        };
      };
      clashes = lib.filter (a: !a.assertion) clash.assertions;
      ok =
        expect "instances: assertions: ${lib.concatStringsSep "; " failed}" (failed == [ ])
        && expect "instances: no ncro.service" (!(c.systemd.units ? "ncro.service"))
        && expect "instances: template" (
          lib.hasInfix "/bin/ncro serve --config /etc/ncro/%i.toml" template
          && lib.hasInfix "StateDirectory=ncro-%i" template
          && lib.hasInfix "NCRO_DB_PATH=/var/lib/ncro-%i/routes.db" template
        )
        && expect "instances: netrc credential" (
          lib.hasInfix "LoadCredential=netrc:/run/secrets/ncro-internal.netrc" internal
          && lib.hasInfix "NETRC=%d/netrc" internal
        )
        && expect "instances: socket" (c.systemd.units ? "ncro@internal.socket")
        && expect "instances: configuration files" (
          c.environment.etc ? "ncro/public.toml" && c.environment.etc ? "ncro/internal.toml"
        )
        && expect "instances: firewall" (lib.elem 8081 c.networking.firewall.allowedTCPPorts)
        && expect "instances: duplicate listen address refused" (lib.length clashes == 1);
    in
    assert ok;
    ''
      ### instances
      ${template}
      ### ncro@internal.service drop-in
      ${internal}
    '';
in
pkgs.writeText "ncro-module-compat" (
  report "ncro 2.2 README example" ./compat-2.2.nix
  + report "ncro 2.2 full example with socket activation" ./compat-2.2-full.nix
  + instancesReport
)
