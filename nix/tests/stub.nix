# The stand-ins for nixpkgs' lib and pkgs that the module checks evaluate
# against (nix/tests/module-stub.nix, nix/tests/darwin-stub.nix), and
# helpers that read back what a module rendered. Builtins only.
let
  inherit (builtins)
    attrNames
    filter
    foldl'
    isAttrs
    mapAttrs
    match
    toJSON
    ;
in
rec {
  check =
    what: name: got: want:
    if got == want then name else throw "${what} (stub): ${name}: got ${toJSON got}, want ${toJSON want}";

  # Types are never inspected here; a name is enough.
  stubType = name: { _type = "stub-type"; inherit name; };
  types = {
    bool = stubType "bool";
    str = stubType "str";
    path = stubType "path";
    port = stubType "port";
    package = stubType "package";
    nullOr = t: stubType "nullOr";
    listOf = t: stubType "listOf";
    attrsOf = t: stubType "attrsOf" // { elemType = t; };
    submodule = m: stubType "submodule" // { module = m; };
    ints = {
      positive = stubType "positive";
      unsigned = stubType "unsigned";
    };
  };

  # The module system's property wrappers, kept as data and resolved below.
  lib = {
    inherit types;
    inherit (builtins) concatMap filter listToAttrs;
    mkOption = o: o // { _type = "option"; };
    mkEnableOption = name: {
      _type = "option";
      default = false;
      description = "Whether to enable ${name}.";
    };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkAfter = content: { _type = "order"; inherit content; };
    mkBefore = content: { _type = "order"; inherit content; };
    mkDefault = content: { _type = "override"; inherit content; };
    mkForce = content: content;
  };

  # mkIf/mkMerge/mkAfter resolved the way the module system would for a
  # single definition: false conditions vanish, merges combine attrsets.
  resolve =
    v:
    if !(isAttrs v) then
      v
    else if v._type or null == "if" then
      (if v.condition then resolve v.content else null)
    else if v._type or null == "merge" then
      foldl' (a: b: a // b) { } (filter (x: x != null) (map resolve v.contents))
    else if v._type or null == "order" || v._type or null == "override" then
      resolve v.content
    else
      let
        r = mapAttrs (_: resolve) v;
      in
      removeAttrs r (filter (n: r.${n} == null) (attrNames r));

  # `cross`: the build machine cannot run the host's binaries.
  pkgsFor = cross: {
    formats.toml = _: {
      type = stubType "toml";
      # The rendered settings stay inspectable: JSON inside the "path".
      generate = name: value: "/nix/store/stub-${name}#${toJSON value}";
    };
    callPackage = _: _: "/nix/store/stub-ncro";
    stdenv = {
      buildPlatform.canExecute = _: !cross;
      hostPlatform = { };
    };
    # The build script stays inspectable too, on one line.
    runCommand =
      name: _env: script:
      "/nix/store/stub-checked-${name}!${builtins.replaceStrings [ "\n" ] [ " " ] script}";
  };
  # The settings in a checked (or, cross, unchecked) stub config file.
  fileSettings =
    file:
    let
      checked = match "/nix/store/stub-checked-[^!]*!.* ln -s /nix/store/stub-[^#]*#(.*) [$]out.*" file;
      plain = match "/nix/store/stub-[^#]*#(.*)" file;
      m = if checked != null then checked else plain;
    in
    if m == null then throw "not a stub config file: ${file}" else builtins.fromJSON (builtins.head m);
  # What `ncro --check` was given, or null when no check runs.
  checkedSettings =
    file:
    let
      m = match ".*/bin/ncro --check --config /nix/store/stub-check-[^#]*#(.*) ln -s .*" file;
    in
    if m == null then null else builtins.fromJSON (builtins.head m);
}
