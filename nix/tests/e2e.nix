# NixOS VM test (flake check `e2e`): ncro between Nix clients and two binary
# caches, nix-serve-ng and Perl nix-serve, set up through services.ncro with CPU
# pinning and the module's hardening.
{ self }:
{ pkgs, lib, ... }:
let
  keys = import ./keys.nix;
  # Test-only signing keys (keys.nix); in the store on purpose.
  secretKey = name: pkgs.writeText "${name}.secret" keys.${name}.secret;
  payload = name: pkgs.writeText "ncro-e2e-${name}" "ncro e2e payload ${name}\n";
  only1 = payload "only-cache1";
  only2 = payload "only-cache2";
  both = payload "both";
  bothAfterOutage = payload "both-after-outage";
  hashOf = p: builtins.substring 0 32 (baseNameOf "${p}");
in
{
  name = "ncro-e2e";

  defaults.imports = [ self.nixosModules.default ];

  nodes = {
    cache1 = {
      services.nix-serve = {
        enable = true;
        package = pkgs.nix-serve-ng;
        port = 5000;
        secretKeyFile = "${secretKey "cache1"}";
        openFirewall = true;
      };
      system.extraDependencies = [
        only1
        both
        bothAfterOutage
      ];
    };

    cache2 = {
      # The original Perl nix-serve: a second, independent HTTP server.
      services.nix-serve = {
        enable = true;
        package = pkgs.nix-serve;
        port = 5000;
        secretKeyFile = "${secretKey "cache2"}";
        openFirewall = true;
      };
      system.extraDependencies = [
        only2
        both
        bothAfterOutage
      ];
    };

    proxy =
      { lib, ... }:
      {
        virtualisation.cores = 3;
        environment.systemPackages = [ pkgs.util-linux ];
        services.ncro = {
          enable = true;
          openFirewall = true;
          cpus = [
            1
            2
          ];
          controlCpu = 1;
          settings = {
            server.listen = ":8080";
            upstreams = [
              {
                url = "http://cache1:5000";
                priority = 1;
                public_key = keys.cache1.public;
              }
              {
                url = "http://cache2:5000";
                priority = 2;
                public_key = keys.cache2.public;
              }
            ];
            cache = {
              ttl = "5m";
              negative_ttl = "30s";
            };
            logging.format = "text";
          };
        };
        # The module added both cache keys to trusted-public-keys.
        nix.settings.substituters = lib.mkForce [ "http://localhost:8080" ];
      };

    client =
      { lib, ... }:
      {
        nix.settings = {
          substituters = lib.mkForce [ "http://proxy:8080" ];
          trusted-public-keys = [
            keys.cache1.public
            keys.cache2.public
          ];
        };
      };
  };

  testScript = ''
    import json

    start_all()
    cache1.wait_for_unit("nix-serve.service")
    cache1.wait_for_open_port(5000)
    cache2.wait_for_unit("nix-serve.service")
    cache2.wait_for_open_port(5000)
    proxy.wait_for_unit("ncro.service")
    proxy.wait_for_open_port(8080)

    def narinfo(machine, path_hash, base="http://localhost:8080"):
        return machine.succeed(f"curl -sf {base}/{path_hash}.narinfo")

    with subtest("systemd: notify, watchdog, limits"):
        show = proxy.succeed("systemctl show ncro -p Type -p WatchdogUSec -p LimitNOFILE -p StatusText")
        assert "Type=notify" in show, show
        assert "WatchdogUSec=30s" in show, show
        assert "LimitNOFILE=65536" in show, show
        assert "StatusText=serving on 0.0.0.0:8080 with 2 workers" in show, show

    with subtest("io_uring survives the hardening"):
        health = json.loads(proxy.succeed("curl -sf http://localhost:8080/health"))
        assert health["driver"] == "io_uring", health
        assert health["workers"] == 2, health

    with subtest("/status in today's ncro's shape"):
        status = json.loads(proxy.succeed("curl -sf http://localhost:8080/status"))
        assert status["config"]["upstream_count"] == 2, status
        assert status["fallback"] is None, status
        assert [u["kind"] for u in status["upstreams"]] == ["http", "http"], status

    with subtest("workers pinned to cpus, control thread to controlCpu"):
        pid = proxy.succeed("systemctl show -p MainPID --value ncro").strip()
        threads = proxy.succeed(
            f"for t in /proc/{pid}/task/*; do "
            "echo \"$(cat $t/comm) $(taskset -pc ''${t##*/} | sed 's/.*: //')\"; done"
        )
        print(threads)
        assert "ncro-worker-0 1\n" in threads, threads
        assert "ncro-worker-1 2\n" in threads, threads
        assert "ncro-control 1\n" in threads, threads
        process = proxy.succeed(f"taskset -pc {pid}")
        assert process.strip().endswith(": 1,2"), process

    with subtest("each cache's path is served with its own signature"):
        assert "Sig: ncro-e2e-cache1:" in narinfo(proxy, "${hashOf only1}")
        assert "Sig: ncro-e2e-cache2:" in narinfo(proxy, "${hashOf only2}")

    with subtest("a path in both caches comes from the priority-1 cache"):
        assert "Sig: ncro-e2e-cache1:" in narinfo(proxy, "${hashOf both}")

    with subtest("a path in no cache is a 404"):
        code = proxy.succeed(
            "curl -s -o /dev/null -w '%{http_code}' "
            "http://localhost:8080/00000000000000000000000000000000.narinfo"
        )
        assert code == "404", code

    with subtest("Nix substitutes through ncro, trusting the keys the module added"):
        proxy.succeed("nix-store --realise ${only1}")
        proxy.succeed("grep -q 'payload only-cache1' ${only1}")
        client.succeed("nix-store --realise ${only2} ${both}")
        client.succeed("grep -q 'payload only-cache2' ${only2}")

    with subtest("metrics"):
        metrics = proxy.succeed("curl -sf http://localhost:8080/metrics")
        assert "# TYPE" in metrics

    with subtest("cache1 down: its tier fails over to cache2"):
        cache1.succeed("systemctl stop nix-serve.service")
        assert "Sig: ncro-e2e-cache2:" in narinfo(client, "${hashOf bothAfterOutage}", "http://proxy:8080")

    with subtest("routes persist in the state directory"):
        proxy.succeed("test -s /var/lib/ncro/routes.db")

    with subtest("stop drains and exits cleanly"):
        proxy.succeed("systemctl stop ncro.service")
        proxy.succeed("journalctl -u ncro.service | grep -q 'draining connections'")
        proxy.succeed("journalctl -u ncro.service | grep -q 'ncro stopped'")
        result = proxy.succeed("systemctl show ncro -p Result --value").strip()
        assert result == "success", result
  '';
}
