# Example: a farm of three ncro nodes behind one HAProxy host, as NixOS
# configurations (one module per host: use them with nixosConfigurations,
# colmena, nixops, ...). docs/scale-out.md explains each setting.
#
#   nodes = import ./nixos-farm.nix { ncroModule = ncro.nixosModules.default; };
#   nixosConfigurations.balancer = nixpkgs.lib.nixosSystem { modules = [ nodes.balancer ./hw.nix ]; ... };
#   nixosConfigurations.ncro1    = nixpkgs.lib.nixosSystem { modules = [ nodes.ncro1 ./hw.nix ]; ... };
#
# Addresses and mesh public keys below are placeholders: put in your own
# (`ncro keygen --out /run/secrets/ncro-mesh.key` prints a node's key).
{
  ncroModule ? ../../nix/module.nix,
}:
let
  port = 8080;
  meshPort = 7946;
  nodes = {
    ncro1 = {
      ip = "10.0.0.11";
      meshPublicKey = "<ncro1's public key, 64 hex characters>";
    };
    ncro2 = {
      ip = "10.0.0.12";
      meshPublicKey = "<ncro2's public key>";
    };
    ncro3 = {
      ip = "10.0.0.13";
      meshPublicKey = "<ncro3's public key>";
    };
  };

  # One node: listens on its address, lame duck for the balancer's checks,
  # full mesh with the other nodes, NARs named by store hash.
  ncroNode =
    name:
    { ... }:
    {
      imports = [ ncroModule ];
      services.ncro = {
        enable = true;
        openFirewall = true;
        meshKeyFile = "/run/secrets/ncro-mesh.key";
        settings = {
          server = {
            listen = "${nodes.${name}.ip}:${toString port}";
            # > (fall + 1) x inter of the balancer's checks (3 s shipped).
            drain_delay = "5s";
          };
          upstreams = [
            {
              url = "https://cache.nixos.org";
              priority = 10;
              public_key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
              # A NAR is fetched as nar/<storehash>..., which the balancer
              # hashes to the node that answered the narinfo.
              nar_url_mode = "to_self";
            }
          ];
          mesh = {
            enabled = true;
            bind_addr = "${nodes.${name}.ip}:${toString meshPort}";
            gossip_interval = "5s";
            peers = map (other: {
              addr = "${nodes.${other}.ip}:${toString meshPort}";
              public_key = nodes.${other}.meshPublicKey;
            }) (builtins.filter (other: other != name) (builtins.attrNames nodes));
          };
        };
      };
    };
in
{
  balancer =
    { ... }:
    {
      services.haproxy = {
        enable = true;
        # The shipped file, unchanged; its addresses come from the unit's
        # environment. A fourth node needs a `server ncro4` line in it.
        config = builtins.readFile ./ncro-farm.cfg;
      };
      systemd.services.haproxy.environment = {
        NCRO_FRONTEND = "0.0.0.0:${toString port}";
        NCRO_NODE1 = "${nodes.ncro1.ip}:${toString port}";
        NCRO_NODE2 = "${nodes.ncro2.ip}:${toString port}";
        NCRO_NODE3 = "${nodes.ncro3.ip}:${toString port}";
      };
      networking.firewall.allowedTCPPorts = [ port ];
    };
  ncro1 = ncroNode "ncro1";
  ncro2 = ncroNode "ncro2";
  ncro3 = ncroNode "ncro3";
}
