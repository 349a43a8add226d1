# ncro built from this checkout with nixpkgs' Rust tooling. Dependencies come
# from Cargo.lock (no vendor hash to update); the test suite runs in the
# check phase, minus the tests that need a Nix installation.
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
  python3,
}:
let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "ncro";
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests
      ../packaging
      # Cargo targets that may be added later; absent ones are skipped.
      (lib.fileset.maybeMissing ../benches)
      (lib.fileset.maybeMissing ../examples)
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ installShellFiles ];

  # The harness's own tests drive a python3 stand-in server (tomllib, 3.11+).
  nativeCheckInputs = [ python3 ];
  checkFlags = [
    # The real Nix client against real caches needs nix-store, a writable
    # store and the shared nix-harness: none exist in the build sandbox. They
    # run in CI (.ci/run) and as NixOS VM tests (nix/tests/e2e.nix).
    "--skip=e2e_nix"
  ];

  postInstall =
    lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
      installShellCompletion --cmd ncro \
        --bash <($out/bin/ncro completions bash) \
        --fish <($out/bin/ncro completions fish) \
        --zsh <($out/bin/ncro completions zsh)
      $out/bin/ncro man > ncro.1
      installManPage ncro.1
    ''
    + ''
      install -Dm644 packaging/ncro.socket $out/lib/systemd/system/ncro.socket
      substitute packaging/ncro.service $out/lib/systemd/system/ncro.service \
        --replace-fail /usr/local/bin/ncro $out/bin/ncro
    '';

  meta = {
    description = cargoToml.package.description;
    homepage = cargoToml.package.repository;
    license = lib.licenses.mit;
    mainProgram = "ncro";
    # io_uring/epoll, SO_REUSEPORT and sched_setaffinity: Linux only.
    platforms = lib.platforms.linux;
  };
}
