# NixOS module for ncro: services.ncro.
#
# Every option of the ncro 2.2 module keeps its name, type and default
# (enable, package, settings, socketActivation, addUpstreamPublicKeys), so an
# existing configuration evaluates unchanged. New: port and meshPort (as
# today's ncro module: the listener defaults to localhost:8080), CPU pinning
# (workers, cpus, controlCpu), resource limits, the watchdog, secrets through
# systemd credentials and netrcFile, openFirewall, and instances.NAME
# (ncro@NAME.service from one ncro@.service template). Every rendered
# configuration is checked with `ncro --check` at build time (not when
# cross-compiling). The derived values live in ./lib.nix, which CI tests
# without nixpkgs.
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

  # The rendered file, checked by the package's own `ncro --check` (with
  # secrets files stood in for: ncroLib.checkSettings). Skipped when the
  # build machine cannot run the package.
  canCheck = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  checkedConfig =
    name: s:
    let
      file = format.generate name s;
      forCheck = format.generate "check-${name}" (ncroLib.checkSettings s);
    in
    if !canCheck then
      file
    else
      pkgs.runCommand name { } ''
        ${cfg.package}/bin/ncro --check --config ${forCheck}
        ln -s ${file} $out
      '';

  configFile = checkedConfig "ncro.toml" settings;
  listen = ncroLib.listenOf settings;
  d = ncroLib.defaults;

  instances = cfg.instances;
  hasInstances = instances != { };
  instanceSettings = name: ncroLib.finalSettings (ncroLib.instanceConfig cfg instances.${name});
  instanceList = ncroLib.mapAttrsToList (
    name: inst:
    let
      s = instanceSettings name;
    in
    {
      inherit name inst;
      settings = s;
      file = checkedConfig "ncro-${name}.toml" s;
    }
  ) instances;
  # (settings, openFirewall) of every unit this configuration runs.
  served =
    if hasInstances then
      map (i: {
        inherit (i) settings;
        inherit (i.inst) openFirewall;
      }) instanceList
    else
      [
        {
          inherit settings;
          inherit (cfg) openFirewall;
        }
      ];
  opened = lib.filter (s: s.openFirewall) served;
  allKeys = ncroLib.unique (lib.concatMap (s: ncroLib.upstreamPublicKeys s.settings) served);

  instanceOptions = {
    options = {
      settings = mkOption {
        type = format.type;
        default = { };
        description = "This instance's config.toml, as {option}`services.ncro.settings`.";
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
        example = 8081;
        description = ''
          Gives `server.listen = "localhost:PORT"` unless
          `settings.server.listen` is set. One of the two is required.
        '';
      };
      meshPort = mkOption {
        type = types.nullOr types.port;
        default = null;
        description = "Gives an enabled mesh's `mesh.bind_addr = \"0.0.0.0:PORT\"` unless set.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open this instance's TCP port (unless it listens on loopback) and, with the mesh, its UDP port.";
      };
      socketActivation = mkOption {
        type = types.bool;
        default = false;
        description = "Let systemd own this instance's listening socket (ncro@NAME.socket).";
      };
      netrcFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "A netrc file for this instance's upstreams, passed as a credential (NETRC).";
      };
    };
  };
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

    port = mkOption {
      type = types.nullOr types.port;
      default = d.port;
      description = ''
        Gives `server.listen = "localhost:PORT"` (ncro listens on
        127.0.0.1) unless `settings.server.listen` is set. Null: ncro's own
        default, `:8080` on every IPv4 address.
      '';
    };

    meshPort = mkOption {
      type = types.nullOr types.port;
      default = d.meshPort;
      description = ''
        When `settings.mesh.enabled`, gives `mesh.bind_addr =
        "0.0.0.0:PORT"` unless that is set.
      '';
    };

    netrcFile = mkOption {
      type = types.nullOr types.path;
      default = d.netrcFile;
      example = "/run/secrets/ncro-netrc";
      description = ''
        A netrc file with upstream credentials (machine = the upstream's
        host; used for upstreams without a `username`), passed with
        `LoadCredential=` and read by ncro through `NETRC`.
      '';
    };

    instances = mkOption {
      type = types.attrsOf (types.submodule instanceOptions);
      default = d.instances;
      example = lib.literalExpression ''
        {
          public = { port = 8080; settings.upstreams = [ { url = "https://cache.nixos.org"; } ]; };
          internal = { port = 8081; settings.upstreams = [ { url = "https://cache.internal"; } ]; };
        }
      '';
      description = ''
        Several ncro processes on one host, each ncro@NAME.service from one
        ncro@.service template, with its own configuration
        (/etc/ncro/NAME.toml), state directory (/var/lib/ncro-NAME) and
        route database. While any instance is defined, ncro.service (and
        the top-level `settings`, `port`, `meshPort`, `socketActivation`,
        `openFirewall`, `netrcFile`) is not used. Names match
        `[a-zA-Z0-9_.-]+`; listen addresses (and mesh addresses of
        mesh-enabled instances) must differ.
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
      description = ''
        Open the HTTP port (unless ncro listens on loopback only), and the
        mesh UDP port when the mesh is enabled.
      '';
    };
  };

  config = mkIf cfg.enable (
    lib.mkMerge [
      {
        assertions = ncroLib.assertions cfg;
        warnings =
          ncroLib.warnings cfg
          ++ ncroLib.optional (hasInstances && cfg.settings != { })
            "services.ncro.settings is not used while services.ncro.instances is set.";

        nix.settings.trusted-public-keys = mkIf cfg.addUpstreamPublicKeys (lib.mkAfter allKeys);

        networking.firewall = mkIf (opened != [ ]) {
          allowedTCPPorts = lib.concatMap (s: ncroLib.firewallTcpPorts s.settings) opened;
          allowedUDPPorts = lib.concatMap (s: ncroLib.firewallUdpPorts s.settings) opened;
        };
      }

      (mkIf (!hasInstances) {
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
      })

      (mkIf hasInstances {
        environment.etc = lib.listToAttrs (
          map (i: {
            name = "ncro/${i.name}.toml";
            value.source = i.file;
          }) instanceList
        );

        systemd.services = {
          "ncro@" = {
            description = "Nix Cache Route Optimizer instance %i";
            documentation = [ "man:ncro(1)" ];
            wants = [ "network-online.target" ];
            after = [ "network-online.target" ];
            serviceConfig = ncroLib.templateServiceConfig {
              inherit cfg;
              inherit (cfg) package;
            };
          };
        }
        // lib.listToAttrs (
          map (i: {
            name = "ncro@${i.name}";
            value = {
              overrideStrategy = "asDropin";
              wantedBy = [ "multi-user.target" ];
              after = ncroLib.optional i.inst.socketActivation "ncro@${i.name}.socket";
              requires = ncroLib.optional i.inst.socketActivation "ncro@${i.name}.socket";
              # The unit's ExecStart names /etc/ncro/NAME.toml, not the file.
              restartTriggers = [ i.file ];
              serviceConfig = ncroLib.instanceDropIn {
                inherit cfg;
                inherit (i) inst;
                inherit (cfg) package;
              };
            };
          }) instanceList
        );

        systemd.sockets = lib.listToAttrs (
          map (i: {
            name = "ncro@${i.name}";
            value = {
              description = "Nix Cache Route Optimizer socket, instance ${i.name}";
              wantedBy = [ "sockets.target" ];
              listenStreams = [ (ncroLib.listenOf i.settings) ];
              socketConfig = {
                Backlog = 4096;
                NoDelay = true;
              };
            };
          }) (lib.filter (i: i.inst.socketActivation) instanceList)
        );
      })
    ]
  );
}
