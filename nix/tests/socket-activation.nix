# NixOS VM test (flake check `socket-activation`): systemd owns ncro's
# listening socket, on a privileged port, and hands it to ncro as fd 3;
# restarts lose no connections.
{ self }:
{ pkgs, ... }:
let
  keys = import ./keys.nix;
  secretKey = pkgs.writeText "cache1.secret" keys.cache1.secret;
  path = pkgs.writeText "ncro-socket-payload" "served through an inherited socket\n";
  hash = builtins.substring 0 32 (baseNameOf "${path}");
in
{
  name = "ncro-socket-activation";

  nodes.machine = {
    imports = [ self.nixosModules.default ];
    services.nix-serve = {
      enable = true;
      port = 5000;
      bindAddress = "127.0.0.1";
      secretKeyFile = "${secretKey}";
    };
    system.extraDependencies = [ path ];
    services.ncro = {
      enable = true;
      socketActivation = true;
      settings = {
        # Port 80 without CAP_NET_BIND_SERVICE: only systemd binds it.
        server.listen = ":80";
        upstreams = [
          {
            url = "http://127.0.0.1:5000";
            priority = 1;
            public_key = keys.cache1.public;
          }
        ];
        logging.format = "text";
      };
    };
    # Socket activation proper: nothing starts ncro but a connection.
    systemd.services.ncro.wantedBy = pkgs.lib.mkForce [ ];
  };

  testScript = ''
    machine.wait_for_unit("ncro.socket")
    machine.wait_for_unit("nix-serve.service")
    machine.wait_for_open_port(5000)

    with subtest("the socket is systemd's until the first connection"):
        # ss, not wait_for_open_port: a probing connection would start ncro.
        machine.succeed("ss -Hltn 'sport = :80' | grep -q LISTEN")
        machine.fail("systemctl is-active ncro.service")
        info = machine.succeed("curl -sf http://127.0.0.1/nix-cache-info")
        assert "StoreDir: /nix/store" in info, info
        machine.succeed("systemctl is-active ncro.service")

    with subtest("ncro took the inherited socket, no capability needed"):
        machine.succeed("journalctl -u ncro.service | grep -q 'socket activation: using inherited listener (fd 3)'")
        assert machine.succeed("systemctl show ncro -p Type --value").strip() == "notify"
        caps = machine.succeed("systemctl show ncro -p CapabilityBoundingSet --value").strip()
        assert caps == "", caps

    with subtest("every worker serves the shared listener"):
        for _ in range(20):
            machine.succeed("curl -sf http://127.0.0.1/nix-cache-info")
        assert "Sig: ncro-e2e-cache1:" in machine.succeed("curl -sf http://127.0.0.1/${hash}.narinfo")

    with subtest("a restart refuses no connection"):
        machine.succeed(
            "(for i in $(seq 200); do curl -sf -o /dev/null http://127.0.0.1/nix-cache-info || echo FAIL; done) "
            "> /tmp/during-restart & "
            "sleep 0.2; systemctl restart ncro.service; wait"
        )
        machine.fail("grep -q FAIL /tmp/during-restart")
        machine.succeed("systemctl is-active ncro.service")
  '';
}
