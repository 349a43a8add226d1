# Pure helpers behind nix/module.nix: everything the module derives from its
# options (the rendered settings, the systemd [Service] section, the keys to
# trust, warnings and assertions). Written with builtins only, so CI can
# evaluate and test it without nixpkgs (nix/tests/pure.nix).
let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    hasAttr
    length
    lessThan
    match
    sort
    substring
    ;

  unique = list: foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ] list;
  optional = cond: x: if cond then [ x ] else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  boolToYesNo = b: if b then "yes" else "no";
in
rec {
  inherit unique optional optionalAttrs;

  # Where systemd puts LoadCredential= files for ncro.service.
  credentialsDirectory = "/run/credentials/ncro.service";

  # The credential name of services.ncro.meshKeyFile.
  meshKeyCredential = "mesh-key";

  # As ncro (and the ncro 2.2 module) read server.listen: empty means the
  # default ":8080", and a leading ":" means every IPv4 address.
  normalizeListen =
    listen:
    if listen == "" then
      "0.0.0.0:8080"
    else if substring 0 1 listen == ":" then
      "0.0.0.0${listen}"
    else
      listen;

  listenOf = settings: normalizeListen (settings.server.listen or ":8080");

  # The port of HOST:PORT as an integer, or null when there is none.
  portOf =
    address:
    let
      m = match ".*:0*([0-9]+)" address;
    in
    if m == null then null else builtins.fromJSON (elemAt m 0);

  # services.ncro.settings with the module's own options applied on top:
  # workers, cpus and controlCpu (when set) win over settings.server, and a
  # meshKeyFile points mesh.private_key at its credential.
  finalSettings =
    cfg:
    let
      s = cfg.settings;
      server =
        (s.server or { })
        // optionalAttrs (cfg.workers != null) { workers = cfg.workers; }
        // optionalAttrs (cfg.cpus != null) { cpus = cfg.cpus; }
        // optionalAttrs (cfg.controlCpu != null) { control_cpu = cfg.controlCpu; };
      mesh = optionalAttrs (cfg.meshKeyFile != null) {
        mesh = (s.mesh or { }) // {
          private_key = "${credentialsDirectory}/${meshKeyCredential}";
        };
      };
    in
    s // { inherit server; } // mesh;

  # Every CPU ncro pins a thread to (server.cpus plus server.control_cpu),
  # sorted; null when the workers are not pinned explicitly. systemd's
  # CPUAffinity= then keeps the other threads (SQLite writer, resolver) on
  # the same CPUs and leaves the rest of the machine alone.
  cpuAffinity =
    settings:
    let
      srv = settings.server or { };
      cpus = srv.cpus or null;
      control = srv.control_cpu or null;
    in
    if cpus == null then null else sort lessThan (unique (cpus ++ optional (control != null) control));

  # Nix public keys of the configured upstreams (public_key and public_keys),
  # non-empty, in order of first appearance.
  upstreamPublicKeys =
    settings:
    unique (
      filter (k: k != "") (
        concatMap (u: [ (u.public_key or "") ] ++ (u.public_keys or [ ])) (settings.upstreams or [ ])
      )
    );

  # AF_UNIX for sd_notify and the resolver's local sockets; AF_NETLINK only
  # for mDNS discovery, which enumerates interfaces.
  addressFamilies =
    settings:
    [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ]
    ++ optional (settings.discovery.enabled or false) "AF_NETLINK";

  # Binding a port below 1024 itself needs CAP_NET_BIND_SERVICE; with
  # socket activation systemd binds it instead.
  needsBindCapability =
    cfg:
    let
      port = portOf (listenOf (finalSettings cfg));
    in
    !cfg.socketActivation && port != null && port < 1024;

  loadCredentials =
    cfg:
    map (name: "${name}:${toString cfg.credentials.${name}}") (attrNames cfg.credentials)
    ++ optional (cfg.meshKeyFile != null) "${meshKeyCredential}:${toString cfg.meshKeyFile}";

  # The io_uring calls are named explicitly: @system-service has them (in
  # @aio) only since systemd 248. @resources stays allowed because workers
  # pin themselves with sched_setaffinity. A call outside the list fails with
  # EPERM rather than killing ncro, so a missing io_uring call means the
  # epoll fallback, not a crash.
  systemCallFilter = [
    "@system-service"
    "io_uring_setup io_uring_enter io_uring_register"
    "~@privileged"
  ];

  # The [Service] section of ncro.service, shared by the NixOS module and
  # (by the consistency check in nix/tests/pure.nix) packaging/ncro.service.
  serviceConfig =
    { cfg, execStart }:
    let
      settings = finalSettings cfg;
      affinity = cpuAffinity settings;
      bind = needsBindCapability cfg;
      credentials = loadCredentials cfg;
    in
    {
      Type = "notify";
      NotifyAccess = "main";
      ExecStart = execStart;
      Restart = "on-failure";
      RestartSec = "5s";

      DynamicUser = true;
      StateDirectory = "ncro";
      StateDirectoryMode = "0700";
      UMask = "0077";

      LimitNOFILE = cfg.openFilesLimit;
      LimitMEMLOCK = cfg.memlockLimit;

      CapabilityBoundingSet = if bind then [ "CAP_NET_BIND_SERVICE" ] else [ "" ];
      NoNewPrivileges = true;
      PrivateTmp = true;
      PrivateDevices = true;
      PrivateMounts = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      ProtectProc = "invisible";
      ProtectHostname = true;
      ProtectClock = true;
      ProtectControlGroups = true;
      ProtectKernelLogs = true;
      ProtectKernelModules = true;
      ProtectKernelTunables = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      RestrictNamespaces = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = true;
      RemoveIPC = true;
      RestrictAddressFamilies = addressFamilies settings;
      SystemCallArchitectures = "native";
      SystemCallFilter = systemCallFilter;
      SystemCallErrorNumber = "EPERM";
    }
    // optionalAttrs bind { AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ]; }
    // optionalAttrs (affinity != null) {
      CPUAffinity = concatStringsSep " " (map toString affinity);
    }
    // optionalAttrs (cfg.watchdogSec != null) { WatchdogSec = cfg.watchdogSec; }
    // optionalAttrs (credentials != [ ]) { LoadCredential = credentials; }
    // optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = toString cfg.environmentFile; };

  # Secrets written inline end up world-readable in the Nix store. ncro 2.2
  # configurations did that, so it stays allowed, with a warning.
  warnings =
    cfg:
    map (
      u:
      "services.ncro.settings.upstreams: the password for ${u.url or "an upstream"} is stored "
      + "world-readable in the Nix store; set services.ncro.credentials.NAME = \"/path/to/secret\" "
      + "and password_file = \"${credentialsDirectory}/NAME\" instead."
    ) (filter (u: hasAttr "password" u) (cfg.settings.upstreams or [ ]));

  assertions =
    cfg:
    let
      cpus = if cfg.cpus == null then [ ] else cfg.cpus;
    in
    [
      {
        assertion = cfg.cpus == null || cpus != [ ];
        message = "services.ncro.cpus must list at least one CPU, or be null.";
      }
      {
        assertion = length (unique cpus) == length cpus;
        message = "services.ncro.cpus lists a CPU twice.";
      }
      {
        assertion = cfg.cpus == null || cfg.workers == null || cfg.workers == length cpus;
        message = "services.ncro.workers (${toString cfg.workers}) must equal the number of services.ncro.cpus (${toString (length cpus)}).";
      }
      {
        assertion = !(hasAttr meshKeyCredential cfg.credentials && cfg.meshKeyFile != null);
        message = "services.ncro.credentials.${meshKeyCredential} is reserved for services.ncro.meshKeyFile.";
      }
    ];

  # Parses a systemd unit file's [Service] section into { Key = [ values ]; }
  # (repeated keys accumulate; an empty assignment resets, as in systemd).
  parseServiceSection =
    text:
    let
      lines = filter builtins.isString (builtins.split "\n" text);
      step =
        acc: line:
        let
          section = match "[[]([A-Za-z]+)[]].*" line;
          kv = match "([A-Za-z]+)=(.*)" line;
        in
        if section != null then
          acc // { current = elemAt section 0; }
        else if kv == null || acc.current != "Service" then
          acc
        else
          let
            key = elemAt kv 0;
            value = elemAt kv 1;
            old = acc.values.${key} or [ ];
          in
          acc // { values = acc.values // { ${key} = if value == "" then [ "" ] else old ++ [ value ]; }; };
    in
    (foldl' step {
      current = "";
      values = { };
    } lines).values;

  # A serviceConfig value as the list of strings a unit file would hold.
  unitValues =
    v:
    if builtins.isBool v then
      [ (boolToYesNo v) ]
    else if builtins.isList v then
      map toString v
    else
      [ (toString v) ];

  # The defaults of the module's options beyond ncro 2.2's; the packaged
  # unit (packaging/ncro.service) uses the same values.
  defaults = {
    workers = null;
    cpus = null;
    controlCpu = null;
    # Each client connection, upstream connection and the route database
    # take a descriptor; see docs/operations.md for sizing.
    openFilesLimit = 65536;
    # io_uring rings count against RLIMIT_MEMLOCK on kernels before 5.12:
    # about 100 KiB per worker with ncro's 1024 entries.
    memlockLimit = "64M";
    watchdogSec = "30s";
    credentials = { };
    meshKeyFile = null;
    environmentFile = null;
  };

  # The module's view of a configuration that sets only ncro 2.2's options.
  configWithDefaults =
    cfg22:
    defaults
    // {
      settings = { };
      socketActivation = false;
      addUpstreamPublicKeys = true;
    }
    // cfg22;

  # Keys whose values packaging/ncro.service must share with the module's
  # defaults (ExecStart differs by design: the paths are not the store's).
  sharedServiceConfig = removeAttrs (serviceConfig {
    cfg = configWithDefaults { };
    execStart = "";
  }) [ "ExecStart" ];
}
