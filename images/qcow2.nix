# QCOW2 image for QEMU/KVM platforms (libvirt, Proxmox, OpenStack):
# `nix build .#image-qcow2`.
#
# On x86_64 one disk boots with BIOS (SeaBIOS, the default of Proxmox and
# virt-install) and with UEFI (OVMF): GRUB is installed both in a BIOS boot
# partition and, as the removable EFI loader, in the ESP. On aarch64 the
# image is UEFI only. cloud-init reads the user-data from a config drive
# (OpenStack, Proxmox's cloud-init drive) or a NoCloud seed (cidata volume
# or SMBIOS serial, e.g. virt-install --cloud-init).
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  hybrid = pkgs.stdenv.hostPlatform.isx86_64;
in
{
  imports = [
    "${modulesPath}/profiles/qemu-guest.nix"
    ./common.nix
  ];

  boot.loader.grub = {
    enable = true;
    device = if hybrid then "/dev/vda" else "nodev";
    efiSupport = true;
    efiInstallAsRemovable = true;
  };
  boot.loader.timeout = lib.mkDefault 1;
  boot.kernelParams = [
    "console=tty0"
    "console=ttyS0,115200"
  ];

  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };
  fileSystems."/boot" = {
    device = "/dev/disk/by-label/ESP";
    fsType = "vfat";
    options = [ "umask=0077" ];
  };

  # The QEMU guest agent: shutdown, freeze and IP reporting for libvirt and
  # Proxmox.
  services.qemuGuest.enable = true;

  services.cloud-init.settings.datasource_list = [
    "ConfigDrive"
    "NoCloud"
  ];

  system.build.image = import "${modulesPath}/../lib/make-disk-image.nix" {
    inherit lib config pkgs;
    name = "fireactions-qcow2";
    baseName = "nixos";
    format = "qcow2";
    partitionTableType = if hybrid then "hybrid" else "efi";
    diskSize = "auto";
    additionalSpace = "2048M";
  };
}
