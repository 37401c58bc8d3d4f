# What every fireactions cloud image shares: the module with the
# bootstrap, the three production profiles, cloud-init and the host's
# basics. azure.nix and qcow2.nix add their platform's boot, disk and
# datasource settings.
#
# The user-data contract (docs/images.md): cloud-init's write_files puts
#   /etc/fireactions/github-app-id           the GitHub App's ID
#   /etc/fireactions/github-private-key.pem  its private key
#   /etc/fireactions/pools.json              the pools (seed format)
# and fireactions-bootstrap.service turns them into
# /run/fireactions/config.yaml on every boot, before the daemon starts. The
# user-data needs no runcmd.
{ lib, pkgs, ... }:
{
  imports = [
    ../nix/modules/fireactions.nix
    ../nix/profiles/security-hardened.nix
    ../nix/profiles/registry-cache.nix
    ../nix/profiles/prod.nix
  ];

  services.fireactions = {
    enable = true;
    bootstrap.enable = true;
    # The defaults of `fireactions bootstrap` for the cache (gateway
    # 10.200.0.1, Zot on port 5000, Docker Hub, GHCR, Quay and GCR) apply;
    # set registryCache.mirrors here to mirror other registries.
    registryCache.enable = true;
  };

  # cloud-init writes the inputs (write_files) and the platform's SSH keys.
  # The modules listed are the ones the contract needs; none runs user
  # commands (no runcmd, no scripts-user), and no user is created: with
  # users.mutableUsers = false (security-hardened) a user cloud-init created
  # would vanish at the next boot. The platform's keys go to root, whose
  # password is locked.
  services.cloud-init = {
    enable = true;
    network.enable = true;
    settings = {
      disable_root = false;
      users = [ ];
      ssh_pwauth = false;
      cloud_init_modules = [
        "seed_random"
        "bootcmd"
        "write_files"
        "growpart"
        "resizefs"
        "set_hostname"
        "update_hostname"
        "update_etc_hosts"
        "ssh"
      ];
      cloud_config_modules = [
        "ssh_import_id"
        "timezone"
      ];
      cloud_final_modules = [
        "ssh_authkey_fingerprints"
        "keys_to_console"
        "final_message"
      ];
    };
  };

  # No SSH key is baked in: the platform hands one to cloud-init per
  # instance, so NixOS cannot see one when it builds the image.
  users.allowNoPasswordLogin = true;

  networking = {
    # The platform names the host.
    hostName = lib.mkDefault "";
    useDHCP = lib.mkDefault true;
    firewall.allowedTCPPorts = [ 22 ];
  };

  boot.growPartition = true;
  # The host runs KVM guests.
  boot.kernelModules = [
    "kvm-intel"
    "kvm-amd"
  ];

  environment.systemPackages = with pkgs; [
    curl
    jq
    htop
    tcpdump
    iproute2
    nftables
  ];

  system.stateVersion = "26.05";
}
