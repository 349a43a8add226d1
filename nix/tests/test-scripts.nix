# The Python test scripts of the VM tests, rendered without nixpkgs (store
# paths are stand-ins), so CI can at least compile them where no VM can run:
#   nix-instantiate --eval --strict --json nix/tests/test-scripts.nix
# gives { name = script; }; .ci/run feeds each to `python3 -m py_compile`.
let
  fakePath = name: "/nix/store/00000000000000000000000000000000-${name}";
  pkgs = {
    writeText = name: _text: fakePath name;
  };
  lib = {
    mkForce = x: x;
  };
  self = {
    nixosModules.default = { };
  };
  script = file: ((import file { inherit self; }) { inherit pkgs lib; }).testScript;
in
{
  e2e = script ./e2e.nix;
  socket-activation = script ./socket-activation.nix;
  mesh = script ./mesh.nix;
}
