# Flake check `module-compat`: ncro 2.2 NixOS configurations evaluated with
# the real module system (nixpkgs), no VM. A configuration passes when it
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
in
pkgs.writeText "ncro-module-compat" (
  report "ncro 2.2 README example" ./compat-2.2.nix
  + report "ncro 2.2 full example with socket activation" ./compat-2.2-full.nix
)
