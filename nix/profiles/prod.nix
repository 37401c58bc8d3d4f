# Profile: production defaults for a fireactions host.
#
# - journald: bounded disk use and retention, a rate limit generous enough
#   for a host that starts many VMs, compressed and persistent logs;
# - fireactions: metrics on (loopback, 127.0.0.1:8081 unless set), JSON
#   logs, restarted whatever the exit status;
# - the Nix store cleans itself up.
#
# With the bootstrap, metrics are already on (the bootstrap turns them on)
# and the log format is the bootstrap's, so only the rest applies.
{ config, lib, ... }:
let
  inherit (lib) mkDefault mkIf;
  cfg = config.services.fireactions;
in
{
  imports = [ ../modules/fireactions.nix ];

  services.journald.extraConfig = ''
    Storage=persistent
    Compress=yes
    SystemMaxUse=2G
    SystemKeepFree=4G
    SystemMaxFileSize=128M
    MaxRetentionSec=1month
    RateLimitIntervalSec=30s
    RateLimitBurst=20000
  '';

  services.fireactions.metrics.enable = mkDefault true;
  services.fireactions.log.format = mkIf (!cfg.bootstrap.enable) (mkDefault "json");

  systemd.services.fireactions = mkIf cfg.enable {
    serviceConfig.Restart = lib.mkForce "always";
    # Keep trying after a bad minute instead of giving up for good.
    unitConfig.StartLimitIntervalSec = 0;
  };

  nix.gc = {
    automatic = mkDefault true;
    dates = mkDefault "weekly";
    options = mkDefault "--delete-older-than 14d";
  };
  nix.settings.auto-optimise-store = mkDefault true;

  # Clear /tmp at boot: nothing in it survives a host's reboot on purpose.
  boot.tmp.cleanOnBoot = mkDefault true;
}
