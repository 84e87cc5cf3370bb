# nix-hatch as a nixpkgs package: `pkgs.callPackage ./nix/package.nix { }`
# (what the flake's packages, overlay and the NixOS module's default use).
{ lib
, rustPlatform
, pkg-config
, openssl
, zlib
, libseccomp
, bubblewrap
, makeBinaryWrapper
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # Only what cargo needs: editing docs, tests or nix/ does not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../Cargo.toml ../Cargo.lock ../src ../vendor ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  # ssh2 → libssh2-sys (vendored and patched, vendor/libssh2-sys) links
  # OpenSSL and zlib (found with pkg-config); the jail's seccomp filter is
  # built with libseccomp (the library Nix's own sandbox uses).
  nativeBuildInputs = [ pkg-config makeBinaryWrapper ];
  buildInputs = [ openssl zlib libseccomp ];

  # The test suites need root, a Nix store to build in and an sshd; they
  # run in the repository's CI (scripts/test), the VM tests in `checks`.
  doCheck = false;

  # `jail` executors without a `bwrap` key look for bubblewrap on PATH: make
  # it the one from nixpkgs when the caller's PATH has none (the daemon's
  # PATH on NixOS does not). The module sets `bwrap` explicitly anyway.
  postFixup = ''
    for b in nix-hatch nix-hatch-hook; do
      wrapProgram $out/bin/$b --suffix PATH : ${lib.makeBinPath [ bubblewrap ]}
    done
  '';

  passthru = { inherit bubblewrap; };

  meta = {
    description = manifest.description;
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "nix-hatch";
    platforms = lib.platforms.linux;
  };
}
