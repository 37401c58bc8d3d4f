# NixOS VM test (`nix flake check`, or `nix build .#checks.<system>.bootstrap`):
# a host with the image configuration's module and registry-cache profile
# gets the three cloud-init inputs, and the units turn them into the
# configuration and the cache's files, again after a reboot. It needs Nix
# and, to be quick, KVM; it has not been run on the development machines.
{ pkgs, ... }:
pkgs.testers.runNixOSTest {
  name = "fireactions-bootstrap";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [
        ../modules/fireactions.nix
        ../profiles/registry-cache.nix
      ];
      services.fireactions = {
        enable = true;
        bootstrap.enable = true;
        # A placeholder the test creates: building the guest kernel is not
        # what this test is about.
        kernel = "/var/lib/fireactions/kernels/vmlinux";
        registryCache.zot.port = 5001;
      };
      environment.systemPackages = [ pkgs.openssl ];
      virtualisation.memorySize = 2048;
    };

  testScript = ''
    machine.wait_for_unit("multi-user.target")

    # Without inputs the bootstrap and the daemon are skipped, not failed.
    machine.succeed("systemctl show -p ConditionResult fireactions-bootstrap | grep -q no")
    machine.fail("systemctl is-failed fireactions.service")

    # What cloud-init's write_files would do.
    machine.succeed(
        "mkdir -p /etc/fireactions /var/lib/fireactions/kernels",
        "touch /var/lib/fireactions/kernels/vmlinux",
        "echo 123456 > /etc/fireactions/github-app-id",
        "openssl genrsa -traditional -out /etc/fireactions/github-private-key.pem 2048",
        "cp ${../../examples/pools.json} /etc/fireactions/pools.json",
    )
    machine.succeed("systemctl restart fireactions-bootstrap")
    machine.succeed("fireactions validate -c /run/fireactions/config.yaml | grep -qx valid")
    machine.succeed("grep -q 'port: 5001' /run/fireactions/config.yaml")

    machine.succeed("systemctl restart fireactions-registry-cache-render")
    machine.succeed("test -f /run/fireactions/registry-cache/host/zot/config.json")
    machine.succeed("test -f /run/fireactions/registry-cache/host/nftables/registry-cache.nft")

    # /run is empty after a reboot; the bootstrap runs again on its own.
    machine.shutdown()
    machine.start()
    machine.wait_for_unit("fireactions-bootstrap.service")
    machine.succeed("fireactions validate -c /run/fireactions/config.yaml | grep -qx valid")
  '';
}
