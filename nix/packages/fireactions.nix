# One of the repository's Go programs: fireactions (CLI and daemon),
# firecracker-task-driver (the Nomad plugin) or fireactions-init (PID 1 in
# every VM). All three are static (CGO_ENABLED=0) and share one vendor hash,
# the hash of the module's dependencies (go.mod, go.sum).
#
# The vendor hash lives in vendor-hash.json and is filled on the first
# build, as docs/images.md describes: while it is empty, the build stops
# with a hash mismatch that prints the right value ("got: sha256-...").
{
  lib,
  buildGo126Module,
  pname ? "fireactions",
  version ? "dev",
}:
let
  hashes = lib.importJSON ./vendor-hash.json;
  vendorHash =
    if hashes.vendorHash != "" then
      hashes.vendorHash
    else
      lib.warn (
        "nix/packages/vendor-hash.json has no vendorHash yet: this build stops with a hash mismatch; "
        + "copy the \"got:\" value into vendorHash and the sha256 of go.sum into goSumSha256 (docs/images.md)"
      ) lib.fakeHash;
in
buildGo126Module {
  inherit pname version vendorHash;

  # Only what the Go build reads: editing docs or Nix files rebuilds nothing.
  src = lib.fileset.toSource {
    root = ../..;
    fileset = lib.fileset.unions [
      ../../go.mod
      ../../go.sum
      ../../cmd
      ../../internal
    ];
  };

  subPackages = [ "cmd/${pname}" ];

  env.CGO_ENABLED = 0;
  ldflags = [
    "-s"
    "-w"
    "-X github.com/fireactions/fireactions/internal/cli.Version=${version}"
  ];

  # The tests need QEMU, network namespaces, a registry and root; `make
  # test` runs them, the build sandbox cannot.
  doCheck = false;

  meta = {
    description =
      {
        fireactions = "Ephemeral GitHub Actions runners and OCI workloads in microVMs";
        firecracker-task-driver = "Nomad task driver running OCI images as Firecracker microVMs";
        fireactions-init = "PID 1 of fireactions microVMs";
      }
      .${pname};
    mainProgram = pname;
    platforms = lib.platforms.linux;
  };
}
