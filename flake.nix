{
  description = "ncro: Nix Cache Route Optimizer, a thread-per-core io_uring proxy in front of several Nix binary caches";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # io_uring/epoll, SO_REUSEPORT and CPU pinning: Linux only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      vmTest = pkgs: file: pkgs.testers.runNixOSTest (import file { inherit self; });
    in
    {
      overlays.default = final: _prev: { ncro = final.callPackage ./nix/package.nix { }; };

      packages = forAllSystems (pkgs: rec {
        ncro = pkgs.callPackage ./nix/package.nix { };
        default = ncro;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.ncro;
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.ncro ];
          # What the test suite and .ci/run use, plus the usual tools.
          packages = with pkgs; [
            clippy
            rustfmt
            rust-analyzer
            nix
            nginx
            wrk
            curl
            openssl
            sqlite
            python3
          ];
        };
      });

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          # The flake's own build rather than a fresh callPackage per system.
          services.ncro.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.ncro;
        };
      nixosModules.ncro = self.nixosModules.default;

      # nix-darwin: a launchd daemon (nix/darwin-module.nix). ncro's package
      # builds for Linux only today; see docs/install.md.
      darwinModules.ncro = ./nix/darwin-module.nix;
      darwinModules.default = self.darwinModules.ncro;

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          package = self.packages.${system}.ncro;
          # Pure evaluation checks (CI runs these without nixpkgs, too).
          nix-lib = pkgs.writeText "ncro-nix-lib-tests" (builtins.toJSON (import ./nix/tests/pure.nix));
          module-stub = pkgs.writeText "ncro-module-stub-tests" (
            builtins.toJSON (import ./nix/tests/module-stub.nix)
          );
          darwin-stub = pkgs.writeText "ncro-darwin-stub-tests" (
            builtins.toJSON (import ./nix/tests/darwin-stub.nix)
          );
          # The ncro 2.2 example configuration through the real module system.
          module-compat = import ./nix/tests/compat-eval.nix { inherit self nixpkgs pkgs; };
          # NixOS VM tests (need KVM).
          e2e = vmTest pkgs ./nix/tests/e2e.nix;
          socket-activation = vmTest pkgs ./nix/tests/socket-activation.nix;
          mesh = vmTest pkgs ./nix/tests/mesh.nix;
        }
      );
    };
}
