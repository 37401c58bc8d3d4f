# Profile: the host's registry cache for the runner VMs.
#
# Zot (a pull-through OCI registry) and, when registryCache.squid.enable is
# set, Squid (an intercepting HTTP/HTTPS cache) run on the VM bridge's
# address. Their configuration is not written by Nix: on every boot
# fireactions-registry-cache-render runs `fireactions registry-cache render`
# on the daemon's configuration (which, with the bootstrap, only exists at
# run time) into /run/fireactions/registry-cache, and the units below read
# the files from there:
#
#   host/zot/config.json              zot serve
#   host/zot/storage.sh               mounts Zot's size-bounded storage first
#   host/squid/squid.conf             included by the NixOS-side squid.conf
#   host/nftables/registry-cache.nft  loaded with nft -f (redirect to Squid)
#
# With bump domains, a oneshot creates Squid's CA once with openssl.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.fireactions;
  rcfg = cfg.registryCache;
  sq = rcfg.squid;
  bumping = sq.enable && sq.bumpDomains != [ ];

  exec = utils.escapeSystemdExecArgs;
  execAll = map exec;
  # "+": run with full privileges, outside the unit's sandbox and user.
  privileged = map (argv: "+" + exec argv);
  # "-": a failure does not fail the unit.
  ignoreFailure = map (argv: "-" + exec argv);

  renderDir = "/run/fireactions/registry-cache";
  squidConfig = pkgs.writeText "fireactions-squid.conf" units.squid.configText;

  units = import ../lib/units.nix {
    fireactions = lib.getExe' cfg.package "fireactions";
    zot = lib.getExe' pkgs.zot "zot";
    squid = lib.getExe' pkgs.squid "squid";
    openssl = lib.getExe' pkgs.openssl "openssl";
    nft = lib.getExe' pkgs.nftables "nft";
    sh = pkgs.runtimeShell;
    chown = lib.getExe' pkgs.coreutils "chown";
    certgen = "${pkgs.squid}/libexec/security_file_certgen";
    configFile = cfg.configFile;
    inherit renderDir;
    squidConfigFile = "${squidConfig}";
    squidCacheDir = sq.cacheDir;
    zotStorageDir = rcfg.zot.storageDir;
    caCertFile = sq.caCertFile;
    caKeyFile = sq.caKeyFile;
  };

  sandbox = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    NoNewPrivileges = true;
    LockPersonality = true;
    SystemCallArchitectures = "native";
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectControlGroups = true;
  };

  caDir = dirOf sq.caCertFile;
in
{
  imports = [ ../modules/fireactions.nix ];

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      { services.fireactions.registryCache.enable = lib.mkDefault true; }

      (lib.mkIf rcfg.enable {
        assertions = [
          {
            assertion = !bumping || dirOf sq.caKeyFile == caDir;
            message = "services.fireactions.registryCache.squid: keep caCertFile and caKeyFile in one directory.";
          }
        ];

        users.users.zot = {
          isSystemUser = true;
          group = "zot";
        };
        users.groups.zot = { };

        systemd.tmpfiles.rules = [
          # Zot's storage volume is mounted here by storage.sh; the directory
          # must exist before the sandbox is set up.
          "d ${rcfg.zot.storageDir} 0750 zot zot -"
        ];

        systemd.services.fireactions-registry-cache-render = {
          description = "Render the registry cache's Zot, Squid and nftables configuration";
          wantedBy = [ "multi-user.target" ];
          after = [
            "fireactions-bootstrap.service"
          ]
          ++ lib.optional bumping "fireactions-squid-ca.service";
          before = [
            "fireactions-zot.service"
            "fireactions-squid.service"
            "fireactions-registry-cache-nft.service"
          ];
          unitConfig.ConditionPathExists = cfg.configFile;
          serviceConfig = sandbox // {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = execAll units.registryCacheRender.ExecStart;
            ReadWritePaths = [ "/run/fireactions" ];
            PrivateNetwork = true;
            CapabilityBoundingSet = [ "" ];
            UMask = "0022";
          };
        };

        systemd.services.fireactions-zot = {
          description = "Zot pull-through registry cache for the fireactions VMs";
          wantedBy = [ "multi-user.target" ];
          requires = [ "fireactions-registry-cache-render.service" ];
          partOf = [ "fireactions-registry-cache-render.service" ];
          # Zot listens on the bridge address, which the host set-up adds.
          after = [
            "network-online.target"
            "fireactions-host-setup.service"
            "fireactions-registry-cache-render.service"
          ];
          wants = [
            "network-online.target"
            "fireactions-host-setup.service"
          ];
          # storage.sh: mountpoint, mount (util-linux), truncate, stat
          # (coreutils), mkfs.ext4, e2fsck, resize2fs (e2fsprogs).
          path = [
            pkgs.coreutils
            pkgs.util-linux
            pkgs.e2fsprogs
          ];
          unitConfig = {
            ConditionPathExists = units.zot.configFile;
            RequiresMountsFor = [ (dirOf rcfg.zot.storageDir) ];
          };
          serviceConfig = sandbox // {
            User = "zot";
            Group = "zot";
            ExecStartPre = privileged units.zot.ExecStartPre;
            ExecStart = execAll units.zot.ExecStart;
            Restart = "on-failure";
            RestartSec = 5;
            ReadWritePaths = [ rcfg.zot.storageDir ];
            CapabilityBoundingSet = [ "" ];
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_NETLINK"
              "AF_INET"
              "AF_INET6"
            ];
            MemoryDenyWriteExecute = true;
            LimitNOFILE = 65536;
          };
        };
      })

      (lib.mkIf (rcfg.enable && sq.enable) {
        users.users.squid = {
          isSystemUser = true;
          group = "squid";
        };
        users.groups.squid = { };

        systemd.tmpfiles.rules = [
          "d ${sq.cacheDir} 0750 squid squid -"
          "d /var/log/squid 0750 squid squid -"
        ];

        services.logrotate.settings."/var/log/squid/*.log" = {
          frequency = "daily";
          rotate = 7;
          compress = true;
          missingok = true;
          notifempty = true;
          copytruncate = true;
        };

        systemd.services.fireactions-squid = {
          description = "Squid intercepting cache for the fireactions VMs";
          wantedBy = [ "multi-user.target" ];
          requires = [ "fireactions-registry-cache-render.service" ];
          partOf = [ "fireactions-registry-cache-render.service" ];
          after = [
            "network-online.target"
            "fireactions-host-setup.service"
            "fireactions-registry-cache-render.service"
          ]
          ++ lib.optional bumping "fireactions-squid-certdb.service";
          wants = [
            "network-online.target"
            "fireactions-host-setup.service"
          ];
          unitConfig = {
            ConditionPathExists = units.squid.renderedConfig;
            RequiresMountsFor = [ sq.cacheDir ];
          };
          serviceConfig = {
            # Squid starts as root to read the CA key and bind, then drops
            # to cache_effective_user.
            ExecStartPre = execAll units.squid.ExecStartPre;
            ExecStart = execAll units.squid.ExecStart;
            ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
            RuntimeDirectory = "fireactions-squid";
            KillMode = "mixed";
            Restart = "on-failure";
            RestartSec = 5;
            ProtectSystem = "strict";
            ReadWritePaths = [
              sq.cacheDir
              "/var/log/squid"
            ]
            ++ lib.optional bumping units.squidCertDB.path;
            ProtectHome = true;
            PrivateTmp = true;
            LockPersonality = true;
            SystemCallArchitectures = "native";
            RestrictAddressFamilies = [
              "AF_UNIX"
              "AF_INET"
              "AF_INET6"
              "AF_NETLINK"
            ];
          };
        };
      })

      (lib.mkIf (rcfg.enable && bumping) {
        systemd.tmpfiles.rules = [
          "d ${caDir} 0700 root root -"
          # The rendered squid.conf names Debian's path of the certificate
          # helper (registrycache.SquidCertgen); on NixOS it is in the store.
          "L+ /usr/lib/squid/security_file_certgen - - - - ${pkgs.squid}/libexec/security_file_certgen"
        ];

        systemd.services.fireactions-squid-ca = {
          description = "Create the CA the registry cache's Squid signs bumped sites with";
          wantedBy = [ "multi-user.target" ];
          before = [
            "fireactions-registry-cache-render.service"
            "fireactions-squid.service"
            "fireactions.service"
          ];
          unitConfig.ConditionPathExists = "!${units.squidCA.certFile}";
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = execAll units.squidCA.ExecStart;
            UMask = "0077";
            PrivateNetwork = true;
            ProtectSystem = "strict";
            ReadWritePaths = [ caDir ];
            ProtectHome = true;
            PrivateTmp = true;
            NoNewPrivileges = true;
          };
        };

        systemd.services.fireactions-squid-certdb = {
          description = "Create Squid's store of generated certificates";
          wantedBy = [ "multi-user.target" ];
          before = [ "fireactions-squid.service" ];
          unitConfig = {
            ConditionPathExists = "!${units.squidCertDB.path}";
            RequiresMountsFor = [ (dirOf units.squidCertDB.path) ];
          };
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = execAll units.squidCertDB.ExecStart;
          };
        };
      })

      (lib.mkIf rcfg.enable {
        systemd.services.fireactions-registry-cache-nft = {
          description = "Redirect the fireactions VMs' web traffic to Squid (nftables)";
          wantedBy = [ "multi-user.target" ];
          requires = [ "fireactions-registry-cache-render.service" ];
          partOf = [ "fireactions-registry-cache-render.service" ];
          after = [
            "fireactions-registry-cache-render.service"
            "nftables.service"
            "firewall.service"
          ];
          unitConfig.ConditionPathExists = units.nftables.file;
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            # The file replaces its own table atomically and touches nothing
            # else; with Squid off it only removes the table.
            ExecStart = execAll units.nftables.ExecStart;
            # Without Squid the table does not exist; nothing to remove.
            ExecStop = ignoreFailure units.nftables.ExecStop;
            CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
            RestrictAddressFamilies = [ "AF_NETLINK" ];
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            NoNewPrivileges = true;
          };
        };
      })
    ]
  );
}
