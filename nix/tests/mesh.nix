# NixOS VM test (flake check `mesh`): two ncro nodes share routes over the
# signed UDP gossip, with their private keys passed as systemd credentials
# (services.ncro.meshKeyFile), and a third node that neither trusts is
# ignored.
#
# Observable effect: a route that only node `a` resolved appears in node
# `b`'s route database (the `routes` table, keyed by store hash) without `b`
# ever being asked for it. Key files hold the raw 32-byte ed25519 seed, as
# in ncro 2.2.
{ self }:
{ pkgs, lib, ... }:
let
  keys = import ./keys.nix;
  secretKey = pkgs.writeText "cache1.secret" keys.cache1.secret;
  fromA = pkgs.writeText "ncro-mesh-from-a" "resolved by node a\n";
  fromIntruder = pkgs.writeText "ncro-mesh-from-intruder" "resolved by the intruder\n";
  hashOf = p: builtins.substring 0 32 (baseNameOf "${p}");

  node =
    {
      peers,
    }:
    {
      imports = [ self.nixosModules.default ];
      environment.systemPackages = [
        pkgs.sqlite
        pkgs.xxd
      ];
      services.ncro = {
        enable = true;
        openFirewall = true;
        meshKeyFile = "/run/keys/ncro-mesh.key";
        settings = {
          upstreams = [
            {
              url = "http://cache:5000";
              priority = 1;
              public_key = keys.cache1.public;
            }
          ];
          mesh = {
            enabled = true;
            bind_addr = "0.0.0.0:7946";
            gossip_interval = "2s";
            inherit peers;
          };
          logging.format = "text";
        };
      };
      # Started by the test once the key file exists.
      systemd.services.ncro.wantedBy = lib.mkForce [ ];
    };
  peer = name: key: {
    addr = "${name}:7946";
    public_key = key.public;
  };
in
{
  name = "ncro-mesh";

  nodes = {
    cache = {
      services.nix-serve = {
        enable = true;
        port = 5000;
        secretKeyFile = "${secretKey}";
        openFirewall = true;
      };
      system.extraDependencies = [
        fromA
        fromIntruder
      ];
    };
    a = node { peers = [ (peer "b" keys.meshB) ]; };
    b = node { peers = [ (peer "a" keys.meshA) ]; };
    # Announces to b, which does not list its key.
    intruder = node { peers = [ (peer "b" keys.meshB) ]; };
  };

  testScript = ''
    seeds = {a: "${keys.meshA.seed}", b: "${keys.meshB.seed}", intruder: "${keys.meshIntruder.seed}"}

    start_all()
    cache.wait_for_unit("nix-serve.service")
    cache.wait_for_open_port(5000)
    for machine, seed in seeds.items():
        machine.wait_for_unit("multi-user.target")
        machine.succeed(
            "install -d -m 700 /run/keys && "
            f"echo {seed} | xxd -r -p > /run/keys/ncro-mesh.key && chmod 600 /run/keys/ncro-mesh.key"
        )
        machine.succeed("systemctl start ncro.service")
        machine.wait_for_open_port(8080)

    def route_query(path_hash):
        return (
            "sqlite3 /var/lib/ncro/routes.db "
            f"\"SELECT upstream_url FROM routes WHERE store_path = '{path_hash}'\""
        )

    def route(machine, path_hash):
        return machine.succeed(route_query(path_hash)).strip()

    with subtest("the key is a credential, never in the store"):
        creds = a.succeed("systemctl show ncro -p LoadCredential --value")
        assert "mesh-key:/run/keys/ncro-mesh.key" in creds, creds
        config = a.succeed("systemctl show ncro -p ExecStart --value")
        config_file = config.split("--config ")[1].split()[0]
        a.succeed(f"grep -q 'private_key = \"/run/credentials/ncro.service/mesh-key\"' {config_file}")
        a.fail(f"grep -q '${keys.meshA.seed}' {config_file}")

    with subtest("gossip port open"):
        a.succeed("ss -Hlun 'sport = :7946' | grep -q 7946")

    with subtest("each node logs its identity from the key file"):
        a.succeed("journalctl -u ncro.service | grep -q 'mesh node identity.*${keys.meshA.public}'")
        b.succeed("journalctl -u ncro.service | grep -q 'mesh node identity.*${keys.meshB.public}'")

    with subtest("the intruder resolves a path and announces it to b"):
        intruder.succeed("curl -sf http://localhost:8080/${hashOf fromIntruder}.narinfo")

    with subtest("a route resolved by a reaches b"):
        a.succeed("curl -sf http://localhost:8080/${hashOf fromA}.narinfo")
        b.wait_until_succeeds(
            route_query("${hashOf fromA}") + " | grep -qx http://cache:5000", timeout=60
        )

    def metric(machine, sample):
        out = machine.succeed(f"curl -sf http://localhost:8080/metrics | grep -F '{sample} ' || true").strip()
        return float(out.split()[-1]) if out else 0.0

    with subtest("b never trusted the intruder"):
        # Each node announces a route once, in the round after its race:
        # wait until the intruder's announcement has reached b.
        b.wait_until_succeeds(
            "curl -sf http://localhost:8080/metrics"
            " | grep -Eq '^ncro_mesh_packets_total[{]result=\"unknown_sender\"[}] [1-9]'",
            timeout=60,
        )
        assert route(b, "${hashOf fromIntruder}") == "", route(b, "${hashOf fromIntruder}")
        assert route(intruder, "${hashOf fromIntruder}") == "http://cache:5000"
        assert metric(b, 'ncro_mesh_packets_total{result="unknown_sender"}') >= 1
        assert metric(b, 'ncro_mesh_packets_total{result="accepted"}') >= 1
        assert metric(b, "ncro_mesh_routes_merged_total") >= 1
        assert metric(a, "ncro_mesh_routes_sent_total") >= 1

    with subtest("b serves the gossiped path without racing it"):
        b.succeed("curl -sf http://localhost:8080/${hashOf fromA}.narinfo | grep -q '^StorePath: ${fromA}$'")
        assert metric(b, "ncro_narinfo_cache_hits_total") >= 1
        assert metric(b, "ncro_narinfo_races_total") == 0
  '';
}
