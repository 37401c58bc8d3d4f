# Azure image (VHD) for VM scale sets: `nix build .#image-azure`.
#
# nixpkgs' azure-image module builds the VHD and brings the Hyper-V drivers
# and the Azure agent. cloud-init reads the user-data (--custom-data) from
# the Azure datasource. The data disk at LUN 0, when
# the scale set has one, holds fireactions' data directory.
{ lib, modulesPath, ... }:
{
  imports = [
    "${modulesPath}/virtualisation/azure-image.nix"
    ./common.nix
  ];

  # Generation 2 (UEFI). The image is not signed for Secure Boot: create
  # VMs with --security-type Standard.
  virtualisation.azureImage.vmGeneration = "v2";
  # A fixed size (MiB): with "auto" the VHD gets zeros appended after its
  # footer, which Azure rejects.
  virtualisation.diskSize = 8192;

  services.cloud-init.settings = {
    datasource_list = [ "Azure" ];
    datasource.Azure.apply_network_config = true;
  };

  # The first data disk (`az vmss create --data-disk-sizes-gb N`), by the
  # Azure agent's stable name. Encrypted with a per-boot key by the
  # security-hardened profile, formatted if empty, and mounted on the data
  # directory before any fireactions unit starts (RequiresMountsFor).
  services.fireactions.dataDisk.device = lib.mkDefault "/dev/disk/azure/scsi1/lun0";
}
