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
    listToAttrs
    lessThan
    match
    sort
    substring
    ;
  mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (attrNames attrs);
  filterAttrs =
    pred: attrs:
    listToAttrs (
      map (n: {
        name = n;
        value = attrs.${n};
      }) (filter (n: pred n attrs.${n}) (attrNames attrs))
    );

  unique = list: foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ] list;
  optional = cond: x: if cond then [ x ] else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  boolToYesNo = b: if b then "yes" else "no";
in
rec {
  inherit
    unique
    optional
    optionalAttrs
    mapAttrsToList
    filterAttrs
    ;

  # Where systemd puts LoadCredential= files for ncro.service.
  credentialsDirectory = "/run/credentials/ncro.service";

  # The credential name of services.ncro.meshKeyFile.
  meshKeyCredential = "mesh-key";

  # The credential name of services.ncro.netrcFile (and an instance's); ncro
  # reads it through NETRC, `%d` being the unit's credentials directory.
  netrcCredential = "netrc";
  netrcEnvironment = "NETRC=%d/netrc";

  # cache.nixos.org-1: what [fallback_cache] trusts unless public_key is set.
  fallbackDefaultKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

  # Instance names: they become unit names (ncro@NAME.service), state
  # directories and /etc/ncro/NAME.toml.
  validInstanceName = name: match "[a-zA-Z0-9_.-]+" name != null;

  # As ncro (and the ncro 2.2 module) read server.listen: empty means the
  # default ":8080", a leading ":" means every IPv4 address, and
  # "localhost" means 127.0.0.1 (ncro binds a host name's IPv4 address
  # first; a socket unit's ListenStream= takes no host names).
  normalizeListen =
    listen:
    let
      local = match "localhost:(.*)" listen;
    in
    if listen == "" then
      "0.0.0.0:8080"
    else if substring 0 1 listen == ":" then
      "0.0.0.0${listen}"
    else if local != null then
      "127.0.0.1:${elemAt local 0}"
    else
      listen;

  # A loopback listener needs no firewall port.
  isLoopback = listen: match "(127[.][0-9.]+|[[]::1[]]|localhost):[0-9]+" listen != null;

  listenOf = settings: normalizeListen (settings.server.listen or ":8080");

  # The port of HOST:PORT as an integer, or null when there is none.
  portOf =
    address:
    let
      m = match ".*:0*([0-9]+)" address;
    in
    if m == null then null else builtins.fromJSON (elemAt m 0);

  # services.ncro.settings with the module's own options applied on top:
  # port gives server.listen = "localhost:PORT" and meshPort gives an
  # enabled mesh's bind_addr = "0.0.0.0:PORT" unless settings set them;
  # workers, cpus and controlCpu (when set) win over settings.server, and a
  # meshKeyFile points mesh.private_key at its credential.
  finalSettings =
    cfg:
    let
      s = cfg.settings;
      s0 = s.server or { };
      server =
        s0
        // optionalAttrs (cfg.port != null && !(s0 ? listen)) {
          listen = "localhost:${toString cfg.port}";
        }
        // optionalAttrs (cfg.workers != null) { workers = cfg.workers; }
        // optionalAttrs (cfg.cpus != null) { cpus = cfg.cpus; }
        // optionalAttrs (cfg.controlCpu != null) { control_cpu = cfg.controlCpu; };
      m0 = s.mesh or { };
      mesh =
        m0
        // optionalAttrs ((m0.enabled or false) && cfg.meshPort != null && !(m0 ? bind_addr)) {
          bind_addr = "0.0.0.0:${toString cfg.meshPort}";
        }
        // optionalAttrs (cfg.meshKeyFile != null) {
          private_key = "${credentialsDirectory}/${meshKeyCredential}";
        };
    in
    s // { inherit server; } // optionalAttrs (s ? mesh || mesh != { }) { inherit mesh; };

  # What `ncro --check` reads at build time: secrets files do not exist in
  # the build sandbox (they are credentials, read at run time), so each
  # password_file (of an upstream without an inline password, and of the
  # fallback cache) is replaced by a placeholder password. Everything else
  # is checked as written.
  checkSettings =
    settings:
    let
      stand =
        t:
        if t ? password_file && !(t ? password) then
          removeAttrs t [ "password_file" ] // { password = "checked-at-run-time"; }
        else
          t;
    in
    settings
    // optionalAttrs (settings ? upstreams) { upstreams = map stand settings.upstreams; }
    // optionalAttrs (settings ? fallback_cache) { fallback_cache = stand settings.fallback_cache; };

  # The TCP port to open in the firewall for these settings, if any: none
  # for a loopback listener.
  firewallTcpPorts =
    settings:
    let
      listen = listenOf settings;
      port = portOf listen;
    in
    optional (port != null && !(isLoopback listen)) port;

  # The UDP mesh port, when the mesh is enabled.
  firewallUdpPorts =
    settings:
    let
      port = portOf (settings.mesh.bind_addr or "0.0.0.0:7946");
    in
    optional ((settings.mesh.enabled or false) && port != null) port;

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

  # Nix public keys of the configured upstreams (public_key and public_keys)
  # and of the fallback cache when it is enabled (its public_key defaults to
  # cache.nixos.org-1's), non-empty, in order of first appearance.
  upstreamPublicKeys =
    settings:
    let
      f = settings.fallback_cache or { };
      fallback = optional (f.enabled or false) (
        f // { public_key = f.public_key or fallbackDefaultKey; }
      );
    in
    unique (
      filter (k: k != "") (
        concatMap (u: [ (u.public_key or "") ] ++ (u.public_keys or [ ])) (
          (settings.upstreams or [ ]) ++ fallback
        )
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
    ++ optional (cfg.meshKeyFile != null) "${meshKeyCredential}:${toString cfg.meshKeyFile}"
    ++ optional (cfg.netrcFile != null) "${netrcCredential}:${toString cfg.netrcFile}";

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
    // optionalAttrs (cfg.netrcFile != null) { Environment = [ netrcEnvironment ]; }
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
      {
        assertion = !(hasAttr netrcCredential cfg.credentials && cfg.netrcFile != null);
        message = "services.ncro.credentials.${netrcCredential} is reserved for services.ncro.netrcFile.";
      }
    ]
    ++ instanceAssertions cfg;

  # services.ncro.instances.NAME as the record the helpers above take: the
  # instance's own options, the service-wide limits of services.ncro, and
  # nothing that names ncro.service's credentials (instances take secrets
  # through their netrcFile).
  instanceConfig =
    cfg: inst:
    defaults
    // {
      inherit (inst)
        settings
        port
        meshPort
        openFirewall
        socketActivation
        netrcFile
        ;
      inherit (cfg)
        openFilesLimit
        memlockLimit
        watchdogSec
        environmentFile
        ;
    };

  # Each instance's final settings, by name.
  instanceSettings = cfg: mapAttrsToList (name: inst: {
    inherit name;
    settings = finalSettings (instanceConfig cfg inst);
  }) cfg.instances;

  # Two addresses that cannot both be bound: the same address, or the same
  # port where one side is a wildcard (0.0.0.0 or [::] takes the port on
  # every address).
  addressesClash =
    a: b:
    let
      host =
        x:
        let
          m = match "(.*):[0-9]+" x;
        in
        if m == null then x else elemAt m 0;
      wildcard = x: elem (host x) [
        "0.0.0.0"
        "[::]"
      ];
    in
    a == b || (portOf a == portOf b && (wildcard a || wildcard b));

  # "NAME (ADDRESS) and NAME (ADDRESS)" for every clashing pair of
  # [ { name; address; } ].
  clashingPairs =
    items:
    let
      n = length items;
      at = elemAt items;
      describe = i: "${i.name} (${i.address})";
    in
    concatMap (
      i:
      map (j: "${describe (at i)} and ${describe (at j)}") (
        filter (j: j > i && addressesClash (at i).address (at j).address) (builtins.genList (x: x) n)
      )
    ) (builtins.genList (x: x) n);

  instanceAssertions =
    cfg:
    let
      all = instanceSettings cfg;
      listens = map (i: {
        inherit (i) name;
        address = listenOf i.settings;
      }) all;
      meshes = map (i: {
        inherit (i) name;
        address = i.settings.mesh.bind_addr or "0.0.0.0:7946";
      }) (filter (i: i.settings.mesh.enabled or false) all);
      listenClashes = clashingPairs listens;
      meshClashes = clashingPairs meshes;
    in
    map (name: {
      assertion = validInstanceName name;
      message = "services.ncro.instances.\"${name}\": an instance name may only contain letters, digits, '_', '.' and '-'.";
    }) (attrNames cfg.instances)
    ++ mapAttrsToList (name: inst: {
      assertion = inst.port != null || inst.settings ? server && inst.settings.server ? listen;
      message = "services.ncro.instances.${name}: set port or settings.server.listen.";
    }) cfg.instances
    ++ [
      {
        assertion = listenClashes == [ ];
        message = "services.ncro.instances: listen addresses must be unique; these instances would listen on the same address: ${concatStringsSep "; " listenClashes}.";
      }
      {
        assertion = meshClashes == [ ];
        message = "services.ncro.instances: mesh addresses must be unique; these mesh-enabled instances would bind the same UDP address: ${concatStringsSep "; " meshClashes}.";
      }
    ];

  # ncro@.service: what every instance shares. The instance name picks the
  # configuration (/etc/ncro/NAME.toml), the state directory and the route
  # database; NCRO_DB_PATH wins over cache.db_path.
  templateServiceConfig =
    { cfg, package }:
    serviceConfig {
      cfg = instanceConfig cfg {
        settings = { };
        port = null;
        meshPort = null;
        openFirewall = false;
        socketActivation = false;
        netrcFile = null;
      };
      execStart = "${package}/bin/ncro serve --config /etc/ncro/%i.toml";
    }
    // {
      StateDirectory = "ncro-%i";
      Environment = [ "NCRO_DB_PATH=/var/lib/ncro-%i/routes.db" ];
    };

  # The drop-in of ncro@NAME.service: the keys where the instance's unit
  # differs from the template (CPU pinning, the bind capability, netlink
  # for discovery, its netrc credential). systemd adds a drop-in's list
  # values (CPUAffinity=, RestrictAddressFamilies=, LoadCredential=,
  # Environment=) to the template's, and CapabilityBoundingSet= to the
  # template's empty set.
  instanceDropIn =
    { cfg, inst, package }:
    let
      t = templateServiceConfig { inherit cfg package; };
      own = serviceConfig {
        cfg = instanceConfig cfg inst;
        execStart = t.ExecStart;
      };
      mine =
        own
        // {
          inherit (t) StateDirectory;
          Environment = t.Environment ++ (own.Environment or [ ]);
        };
    in
    filterAttrs (k: v: !(t ? ${k}) || t.${k} != v) mine;

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
    port = 8080;
    meshPort = 7946;
    netrcFile = null;
    instances = { };
  };

  # nix-darwin (nix/darwin-module.nix): a launchd daemon as the _ncro user.
  darwinDefaults = rec {
    uid = 536;
    gid = 536;
    stateDir = "/var/lib/ncro";
    stateDirMode = "0750";
    dbPath = "${stateDir}/routes.db";
    logFile = "${stateDir}/ncro.log";
    openFiles = 65536;
  };

  # The darwin module's settings: port and meshPort as on NixOS, and the
  # route database in the state directory unless cache.db_path is set.
  darwinSettings =
    cfg:
    let
      s = finalSettings (
        defaults
        // {
          inherit (cfg) settings port meshPort;
        }
      );
      c = s.cache or { };
    in
    s // { cache = c // optionalAttrs (!(c ? db_path)) { db_path = darwinDefaults.dbPath; }; };

  # newsyslog.d entry: mode 640, 5 archives, rotated at 10 MiB, gzip.
  darwinNewsyslog = "${darwinDefaults.logFile} _ncro:_ncro 640 5 10240 * Z\n";

  # launchd.daemons.ncro.serviceConfig.
  darwinLaunchd =
    { cfg, programArguments }:
    {
      ProgramArguments = programArguments;
      KeepAlive = true;
      RunAtLoad = true;
      ThrottleInterval = 10;
      UserName = "_ncro";
      GroupName = "_ncro";
      WorkingDirectory = darwinDefaults.stateDir;
      StandardOutPath = darwinDefaults.logFile;
      StandardErrorPath = darwinDefaults.logFile;
      SoftResourceLimits.NumberOfFiles = darwinDefaults.openFiles;
      HardResourceLimits.NumberOfFiles = darwinDefaults.openFiles;
    }
    // optionalAttrs (cfg.netrcFile != null) {
      EnvironmentVariables.NETRC = toString cfg.netrcFile;
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
