{
  description = "nix-hatch: a Nix build hook that builds feature-gated (escape) derivations with admin-defined executors";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      # Linux only: the executors use namespaces, bubblewrap and /proc.
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (system: pkgs: rec {
        nix-hatch = pkgs.callPackage ./nix/package.nix { };
        default = nix-hatch;
      });

      overlays.default = final: prev: {
        nix-hatch = final.callPackage ./nix/package.nix { };
      };

      # services.nix-hatch (the hook) and services.nix-hatch.agent (the far
      # side of ssh executors); the package defaults to this flake's.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/nixos-module.nix ];
        services.nix-hatch.package = lib.mkDefault
          (self.packages.${pkgs.stdenv.hostPlatform.system}.default
            or (pkgs.callPackage ./nix/package.nix { }));
      };
      nixosModules.nix-hatch = self.nixosModules.default;

      # Helpers for feature-gated derivations (nix/lib.nix):
      #   nix-hatch.lib.escape { system = "x86_64-linux"; feature = "escape-sign"; name = "x"; args = [ ]; }
      #   (nix-hatch.lib.forSystem "x86_64-linux").makeRunner "escape-sign" { } "release.sig" [ "${release}" ]
      # Flakes evaluate purely (no builtins.currentSystem): give `system` to
      # `escape`, or take the helpers from `forSystem`.
      lib = import ./nix/lib.nix {
        system = throw "nix-hatch lib: pass `system` to escape, or use nix-hatch.lib.forSystem <system> (pure evaluation has no builtins.currentSystem)";
      } // {
        forSystem = system: import ./nix/lib.nix { inherit system; };
      };

      # NixOS VM tests (need KVM): `nix flake check`, or one of them with
      # `nix build .#checks.x86_64-linux.vm-jail-proxy`.
      checks = forAllSystems (system: pkgs:
        import ./tests/nixos-vm {
          inherit pkgs;
          module = self.nixosModules.default;
          hatchLib = ./nix/lib.nix;
        } // {
          package = self.packages.${system}.default;
        });

      devShells = forAllSystems (system: pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.default ];
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer bubblewrap openssh busybox ];
        };
      });

      formatter = forAllSystems (system: pkgs: pkgs.nixpkgs-fmt);
    };
}
