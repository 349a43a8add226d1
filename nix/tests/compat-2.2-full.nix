# An ncro 2.2 configuration using every option of the 2.2 module and the
# full 2.2 example config (tests/data/ncro22-example.toml, as Nix),
# including an inline password (allowed, with a warning) and socket
# activation.
{ lib, ... }:
{
  services.ncro = {
    enable = true;
    socketActivation = true;
    addUpstreamPublicKeys = true;
    settings = {
      server = {
        listen = ":8080";
        read_timeout = "30s";
        write_timeout = "30s";
      };
      upstreams = [
        {
          url = "https://cache.nixos.org";
          priority = 10;
          public_key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        }
        {
          url = "https://nix-community.cachix.org";
          priority = 20;
          public_key = "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs=";
        }
        {
          url = "s3://my-bucket?endpoint=minio.example.com&scheme=https";
          priority = 15;
        }
        {
          url = "https://cache.internal.example.com";
          priority = 5;
          username = "ncro";
          password = "hunter2";
          filters = [
            {
              action = "allow";
              field = "name";
              pattern = "internal-*";
            }
          ];
        }
      ];
      cache = {
        db_path = "/var/lib/ncro/routes.db";
        max_entries = 100000;
        ttl = "1h";
        negative_ttl = "10m";
        latency_alpha = 0.3;
        mass_query = {
          max_concurrent_races = 64;
          per_upstream_max_inflight = 8;
          in_memory_negative_ttl = "5s";
          upstream_cooldown = "15s";
        };
      };
      logging = {
        level = "info";
        format = "json";
      };
      discovery = {
        enabled = false;
        service_name = "_nix-serve._tcp";
        domain = "local";
        discovery_time = "5s";
        priority = 20;
        address_family = "any";
      };
      mesh = {
        enabled = false;
        bind_addr = "0.0.0.0:7946";
        peers = [ ];
        private_key = "";
        gossip_interval = "30s";
      };
    };
  };
  nix.settings.substituters = lib.mkForce [ "http://localhost:8080" ];
}
