# NixOS module for ncro: services.ncro.
#
# Every option of the ncro 2.2 module keeps its name, type and default
# (enable, package, settings, socketActivation, addUpstreamPublicKeys), so an
# existing configuration evaluates unchanged. New: CPU pinning (workers,
# cpus, controlCpu), resource limits, the watchdog, secrets through systemd
# credentials, and openFirewall. The derived values live in ./lib.nix, which
# CI tests without nixpkgs.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.ncro;
  ncroLib = import ./lib.nix;
  inherit (lib) mkIf mkOption types;

  format = pkgs.formats.toml { };
  settings = ncroLib.finalSettings cfg;
  configFile = format.generate "ncro.toml" settings;
  listen = ncroLib.listenOf settings;
  port = ncroLib.portOf listen;
  meshPort = ncroLib.portOf (settings.mesh.bind_addr or "0.0.0.0:7946");
  meshEnabled = settings.mesh.enabled or false;
  d = ncroLib.defaults;
in
{
  options.services.ncro = {
    enable = lib.mkEnableOption "ncro, the Nix Cache Route Optimizer";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The ncro package to run.";
    };

    settings = mkOption {
      type = format.type;
      default = { };
      example = lib.literalExpression ''
        {
          server.listen = ":8080";
          upstreams = [
            {
              url = "https://cache.nixos.org";
              priority = 10;
              public_key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
            }
          ];
        }
      '';
      description = ''
        ncro's configuration (config.toml), rendered to TOML in the Nix store.
        Every key of ncro 2.2 is accepted; see `ncro check-config` and the
        embedded default (src/config/default.toml). Keep secrets out of it:
        use `password_file` with {option}`services.ncro.credentials`.
      '';
    };

    socketActivation = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Let systemd own the listening socket (ncro.socket, on the normalised
        `settings.server.listen`). Restarts then lose no connections, and a
        port below 1024 needs no capability.
      '';
    };

    addUpstreamPublicKeys = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Append every upstream's `public_key` (and `public_keys`) to
        {option}`nix.settings.trusted-public-keys`, so this machine's Nix
        trusts what ncro serves.
      '';
    };

    workers = mkOption {
      type = types.nullOr types.ints.positive;
      default = d.workers;
      example = 8;
      description = ''
        Number of worker threads (`server.workers`). Null: one per CPU the
        service may run on, or one per entry of {option}`services.ncro.cpus`.
      '';
    };

    cpus = mkOption {
      type = types.nullOr (types.listOf types.ints.unsigned);
      default = d.cpus;
      example = [
        2
        3
        4
        5
      ];
      description = ''
        CPUs the workers are pinned to, one worker each (`server.cpus`). Also
        sets systemd's `CPUAffinity=` to these CPUs plus
        {option}`services.ncro.controlCpu`, so ncro's other threads stay there
        too. Keep them off the CPUs that handle the NIC's interrupts
        (docs/operations.md).
      '';
    };

    controlCpu = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = d.controlCpu;
      example = 1;
      description = "CPU of the control thread (probes, discovery, gossip): `server.control_cpu`.";
    };

    openFilesLimit = mkOption {
      type = types.ints.positive;
      default = d.openFilesLimit;
      description = ''
        `LimitNOFILE=`: client connections, upstream connections (per worker
        and upstream) and the route database each take a descriptor.
      '';
    };

    memlockLimit = mkOption {
      type = types.str;
      default = d.memlockLimit;
      description = ''
        `LimitMEMLOCK=`: io_uring rings are charged to it on kernels before
        5.12 (about 100 KiB per worker). Too low a limit makes ncro fall back
        to epoll, which it logs at start.
      '';
    };

    watchdogSec = mkOption {
      type = types.nullOr types.str;
      default = d.watchdogSec;
      description = ''
        `WatchdogSec=`: ncro pings systemd at half this interval while every
        worker thread is alive, and asks for a restart when one is not. Null
        disables the watchdog.
      '';
    };

    credentials = mkOption {
      type = types.attrsOf types.path;
      default = d.credentials;
      example = {
        internal-cache = "/run/secrets/ncro-internal-cache";
      };
      description = ''
        Secret files passed with systemd's `LoadCredential=` (read by root,
        never copied to the Nix store). Each is readable by ncro as
        `''${config.services.ncro.credentialsDirectory}/NAME`, e.g. for an
        upstream's `password_file`.
      '';
    };

    credentialsDirectory = mkOption {
      type = types.str;
      default = ncroLib.credentialsDirectory;
      readOnly = true;
      description = "Where ncro finds {option}`services.ncro.credentials` at run time.";
    };

    meshKeyFile = mkOption {
      type = types.nullOr types.path;
      default = d.meshKeyFile;
      example = "/run/secrets/ncro-mesh.key";
      description = ''
        The mesh node's private key, passed as a credential; sets
        `settings.mesh.private_key` to it. Null: `settings.mesh.private_key`
        as configured.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = d.environmentFile;
      example = "/run/secrets/ncro-aws.env";
      description = "`EnvironmentFile=` for S3 upstreams' AWS credentials (`AWS_ACCESS_KEY_ID=...`).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the HTTP port, and the mesh UDP port when the mesh is enabled.";
    };
  };

  config = mkIf cfg.enable {
    assertions = ncroLib.assertions cfg;
    warnings = ncroLib.warnings cfg;

    nix.settings.trusted-public-keys = mkIf cfg.addUpstreamPublicKeys (
      lib.mkAfter (ncroLib.upstreamPublicKeys settings)
    );

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = ncroLib.optional (port != null) port;
      allowedUDPPorts = ncroLib.optional (meshEnabled && meshPort != null) meshPort;
    };

    systemd.sockets.ncro = mkIf cfg.socketActivation {
      description = "Nix Cache Route Optimizer socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ listen ];
      socketConfig = {
        # Matches the backlog ncro asks for on its own listeners.
        Backlog = 4096;
        NoDelay = true;
      };
    };

    systemd.services.ncro = {
      description = "Nix Cache Route Optimizer";
      documentation = [ "man:ncro(1)" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ ncroLib.optional cfg.socketActivation "ncro.socket";
      requires = ncroLib.optional cfg.socketActivation "ncro.socket";
      serviceConfig = ncroLib.serviceConfig {
        inherit cfg;
        execStart = "${cfg.package}/bin/ncro serve --config ${configFile}";
      };
    };
  };
}
