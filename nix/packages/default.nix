# The packages this repository builds, for callPackage:
#   pkgs.callPackage ./nix/packages { version = "..."; }
{
  callPackage,
  symlinkJoin,
  cni-plugins,
  version ? "dev",
}:
rec {
  fireactions = callPackage ./fireactions.nix { inherit version; };
  firecracker-task-driver = callPackage ./fireactions.nix {
    inherit version;
    pname = "firecracker-task-driver";
  };
  fireactions-init = callPackage ./fireactions.nix {
    inherit version;
    pname = "fireactions-init";
  };
  guest-kernel = callPackage ./guest-kernel.nix { };
  tc-redirect-tap = callPackage ./tc-redirect-tap.nix { };
  # The CNI plugins the default network runs (bridge, host-local, firewall,
  # tc-redirect-tap) in one bin/ directory.
  cni-plugin-dir = symlinkJoin {
    name = "fireactions-cni-plugins";
    paths = [
      cni-plugins
      tc-redirect-tap
    ];
  };
}
