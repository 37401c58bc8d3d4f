{
  description = "fireactions: ephemeral GitHub Actions runners and Nomad tasks in Firecracker microVMs";

  # One pinned nixpkgs release branch; `nix flake lock` records the exact
  # commit in flake.lock on the first build (see docs/images.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # The architecture an image-*-cross output targets.
      other = {
        x86_64-linux = "aarch64-linux";
        aarch64-linux = "x86_64-linux";
      };
      forAllSystems = f: lib.genAttrs systems f;

      version = self.shortRev or self.dirtyShortRev or "dev";

      # A NixOS image for `system`. The cross variants set only the target
      # platform, not a cross compiler: every derivation is then an ordinary
      # build for that architecture, substituted from the binary cache except
      # for this repository's packages, which the builder must run for that
      # architecture (binfmt emulation or a remote builder). A true cross
      # build would compile the whole system from source.
      image =
        system: module:
        (lib.nixosSystem {
          modules = [
            module
            {
              nixpkgs.hostPlatform = system;
              services.fireactions.version = version;
            }
          ];
        }).config.system.build.image;
    in
    {
      packages = forAllSystems (
        system:
        let
          own = nixpkgs.legacyPackages.${system}.callPackage ./nix/packages { inherit version; };
        in
        {
          inherit (own)
            fireactions
            firecracker-task-driver
            fireactions-init
            guest-kernel
            tc-redirect-tap
            ;
          default = own.fireactions;

          image-azure = image system ./images/azure.nix;
          image-qcow2 = image system ./images/qcow2.nix;
          image-azure-cross = image other.${system} ./images/azure.nix;
          image-qcow2-cross = image other.${system} ./images/qcow2.nix;
        }
      );

      # `nix flake check`: a NixOS VM test of the bootstrap and the
      # registry cache's render unit (nix/tests/bootstrap.nix).
      checks = forAllSystems (system: {
        bootstrap = import ./nix/tests/bootstrap.nix { pkgs = nixpkgs.legacyPackages.${system}; };
      });

      # Paths, not imported functions: NixOS then loads each file once even
      # when a profile imports the module as well.
      nixosModules = {
        fireactions = ./nix/modules/fireactions.nix;
        default = self.nixosModules.fireactions;
        registry-cache = ./nix/profiles/registry-cache.nix;
        security-hardened = ./nix/profiles/security-hardened.nix;
        prod = ./nix/profiles/prod.nix;
      };

      overlays.default = final: _prev: {
        fireactions-packages = final.callPackage ./nix/packages { inherit version; };
      };
    };
}
