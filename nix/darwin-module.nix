# nix-darwin module for ncro: services.ncro, a launchd daemon.
#
# Options as today's ncro darwin module: enable, package, settings,
# addUpstreamPublicKeys (only when nix.enable), port, meshPort and
# netrcFile. ncro runs as _ncro (uid/gid 536 unless set), keeps its state in
# /var/lib/ncro (routes.db there unless cache.db_path is set) and logs to
# /var/lib/ncro/ncro.log, rotated by newsyslog. The rendered configuration
# is checked with `ncro --check` at build time (not when cross-compiling).
#
# ncro itself needs Linux today (io_uring/epoll, splice, CPU pinning):
# `package` must be a build that runs on the Mac for the daemon to start.
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
  d = ncroLib.darwinDefaults;
  settings = ncroLib.darwinSettings cfg;

  canCheck = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  file = format.generate "ncro.toml" settings;
  forCheck = format.generate "check-ncro.toml" (ncroLib.checkSettings settings);
  configFile =
    if !canCheck then
      file
    else
      pkgs.runCommand "ncro.toml" { } ''
        ${cfg.package}/bin/ncro --check --config ${forCheck}
        ln -s ${file} $out
      '';
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
      description = ''
        ncro's configuration (config.toml), rendered to TOML in the Nix
        store. `cache.db_path` defaults to ${d.dbPath}.
      '';
    };

    addUpstreamPublicKeys = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Append every upstream's `public_key` and `public_keys` (and the
        fallback cache's, when enabled) to
        {option}`nix.settings.trusted-public-keys`. Only when nix-darwin
        manages Nix ({option}`nix.enable`).
      '';
    };

    port = mkOption {
      type = types.nullOr types.port;
      default = ncroLib.defaults.port;
      description = ''
        Gives `server.listen = "localhost:PORT"` unless
        `settings.server.listen` is set.
      '';
    };

    meshPort = mkOption {
      type = types.nullOr types.port;
      default = ncroLib.defaults.meshPort;
      description = "Gives an enabled mesh's `mesh.bind_addr = \"0.0.0.0:PORT\"` unless set.";
    };

    netrcFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/ncro/netrc";
      description = ''
        A netrc file with upstream credentials, given to ncro as `NETRC`.
        It must be readable by the _ncro user and should not be in the Nix
        store.
      '';
    };
  };

  config = mkIf cfg.enable {
    # `nix.enable` is recent in nix-darwin; before it, nix-darwin always
    # managed Nix.
    nix.settings.trusted-public-keys = mkIf (cfg.addUpstreamPublicKeys && (config.nix.enable or true)) (
      lib.mkAfter (ncroLib.upstreamPublicKeys settings)
    );

    users.users._ncro = {
      uid = lib.mkDefault d.uid;
      gid = lib.mkDefault d.gid;
      home = d.stateDir;
      createHome = false;
      shell = "/usr/bin/false";
      isHidden = true;
      description = "ncro daemon";
    };
    users.groups._ncro = {
      gid = lib.mkDefault d.gid;
      description = "ncro daemon";
    };
    users.knownUsers = [ "_ncro" ];
    users.knownGroups = [ "_ncro" ];

    # nix-darwin's activation creates users and groups before it loads
    # launchd daemons: the directory is made in between.
    system.activationScripts.launchd.text = lib.mkBefore ''
      mkdir -p ${d.stateDir}
      chown _ncro:_ncro ${d.stateDir}
      chmod ${d.stateDirMode} ${d.stateDir}
    '';

    environment.etc."newsyslog.d/ncro.conf".text = ncroLib.darwinNewsyslog;

    launchd.daemons.ncro.serviceConfig = ncroLib.darwinLaunchd {
      inherit cfg;
      programArguments = [
        "${cfg.package}/bin/ncro"
        "serve"
        "--config"
        "${configFile}"
      ];
    };
  };
}
