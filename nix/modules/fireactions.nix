# NixOS module for fireactions: the daemon that keeps pools of ephemeral
# GitHub Actions runners in microVMs, its host network set-up, its
# configuration and the Nomad task driver plugin.
#
# The configuration comes from one of two places:
#
#  - bootstrap.enable = true (what the cloud images use): the
#    fireactions-bootstrap unit runs `fireactions bootstrap` on every boot
#    and writes /run/fireactions/config.yaml from the files cloud-init puts
#    in /etc/fireactions (github-app-id, github-private-key.pem, pools.json).
#    The module passes only what the bootstrap reads from its environment:
#    the kernel and the registry cache's switch, gateway, port and mirrors.
#  - bootstrap.enable = false: the module writes the whole configuration
#    from its options into the Nix store and checks it with
#    `fireactions validate` while the system is built. Secrets stay out of
#    the store: the GitHub App key and the API token are read at run time
#    from the files the options name.
#
# Options mirror the daemon's configuration (docs/configuration.md), in
# camelCase. An option left at null is left out, so the daemon's default
# applies.
#
# Every command line the units run comes from ../lib/units.nix; the Go test
# internal/nixcheck runs those same command lines.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    mkDefault
    types
    literalExpression
    ;

  cfg = config.services.fireactions;
  rcfg = cfg.registryCache;

  settingsLib = import ../lib/settings.nix;

  # The repository's own packages, built from the source next to this file,
  # so the module works whether it comes from the flake or from a path.
  ownPackages = pkgs.callPackage ../packages { inherit (cfg) version; };

  exec = utils.escapeSystemdExecArgs;
  execAll = map exec;

  runtimeDir = "/run/fireactions";
  renderDir = "${runtimeDir}/registry-cache";

  # The configuration the module writes when the bootstrap is off, checked
  # with the fireactions binary while the system is built.
  generatedConfig = pkgs.writeText "fireactions-config.json" (
    builtins.toJSON (settingsLib.toConfig cfg)
  );
  checkedConfig =
    pkgs.runCommand "fireactions-config-checked.json" { }
      ''
        ${lib.escapeShellArgs
          (import ../lib/units.nix {
            fireactions = lib.getExe' cfg.package "fireactions";
            configFile = "${generatedConfig}";
          }).checkConfig
        }
        cp ${generatedConfig} $out
      '';

  configFile = if cfg.bootstrap.enable then "${runtimeDir}/config.yaml" else "${checkedConfig}";

  units = import ../lib/units.nix {
    fireactions = lib.getExe' cfg.package "fireactions";
    inherit configFile renderDir;
    inputDir = cfg.bootstrap.inputDir;
    kernel = cfg.kernel;
    registryCacheEnable = rcfg.enable;
    registryCacheGateway = rcfg.gateway;
    zotPort = rcfg.zot.port;
    mirrors = rcfg.mirrors;
    drainTimeout = cfg.drainTimeout;
  };

  # Ports the VMs may reach on the gateway; the same list the host set-up's
  # isolation table allows (internal/hostnet).
  metadataPort = 8169;
  bridge = if cfg.network.bridge != null then cfg.network.bridge else "fireactions0";
  zotPort = if rcfg.zot.port != null then rcfg.zot.port else 5000;
  squidPorts = [
    (if rcfg.squid.httpPort != null then rcfg.squid.httpPort else 3128)
  ]
  ++ lib.optional (rcfg.squid.bumpDomains != [ ]) (
    if rcfg.squid.httpsPort != null then rcfg.squid.httpsPort else 3129
  );

  nullOr = t: default: description: mkOption {
    type = types.nullOr t;
    inherit default description;
  };
  unset = t: description: nullOr t null (description + " Null leaves it to the daemon's default.");

  # A path read at run time: it must not be copied into the Nix store.
  runtimePath = types.addCheck types.str (
    p: lib.hasPrefix "/" p && !lib.hasPrefix builtins.storeDir p
  ) // {
    description = "absolute path outside the Nix store";
  };

  # Sizes ("20GiB") and durations ("24h") are passed through as written;
  # the daemon parses and checks them.
  size = types.strMatching "[0-9]+(\\.[0-9]+)?[ ]*([KMGT]i?B?|B)?";
  duration = types.strMatching "([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+";

  poolModule = types.submodule {
    options = {
      name = mkOption {
        type = types.str;
        description = "Pool name: lowercase letters, digits and `-`; unique.";
      };
      minRunners = unset types.ints.unsigned "Warm minimum of idle runners (`min_runners`).";
      maxRunners = mkOption {
        type = types.ints.positive;
        description = "Maximum number of runners (`max_runners`).";
      };
      network = unset types.str "CNI network of the pool (`network`); null means `network.name`.";
      runner = {
        namePrefix = unset types.str "Prefix of every runner's name (`runner.name_prefix`).";
        image = unset types.str "OCI image the runner VMs boot (`runner.image`).";
        imagePullPolicy = unset (types.enum [
          "Always"
          "IfNotPresent"
          "Never"
        ]) "When the image is fetched (`runner.image_pull_policy`).";
        organization = unset types.str "Organization scope (`runner.organization`); set exactly one scope.";
        repository = unset types.str "Repository scope, `owner/name` (`runner.repository`).";
        enterprise = unset types.str "Enterprise scope, the enterprise slug (`runner.enterprise`).";
        groupId = unset types.ints.unsigned "Runner group ID (`runner.group_id`).";
        labels = unset (types.listOf types.str) "Runner labels (`runner.labels`).";
      };
      vm = {
        backend = unset (types.enum [
          "auto"
          "firecracker"
          "qemu"
        ]) "microVM backend (`vm.backend`).";
        vcpus = unset types.ints.positive "vCPUs per VM (`vm.vcpus`).";
        memoryMiB = unset types.ints.positive "Memory per VM in MiB (`vm.memory_mib`).";
        smt = unset types.bool "Simultaneous multithreading (`vm.smt`).";
        cpuTemplate = unset types.str "Firecracker CPU template (`vm.cpu_template`).";
        kernel = unset types.str "Guest kernel of this pool (`vm.kernel`); null means `services.fireactions.kernel`.";
        kernelModules = unset types.str "Directory of the guest kernel's modules (`vm.kernel_modules`).";
        kernelArgs = unset types.str "Guest kernel command line (`vm.kernel_args`).";
        diskSize = unset size "Writable disk per VM, e.g. `20GiB` (`vm.disk_size`).";
        metadata = mkOption {
          type = types.attrsOf types.str;
          default = { };
          description = "Extra meta-data leaves for every VM (`vm.metadata`).";
        };
        userData = unset types.str "cloud-init user-data for every VM, verbatim (`vm.user_data`).";
      };
    };
  };
in
{
  options.services.fireactions = {
    enable = mkEnableOption "fireactions, ephemeral GitHub Actions runners in microVMs";

    version = mkOption {
      type = types.str;
      default = "dev";
      description = "Version stamped into the packages built from this repository (`fireactions --version`).";
    };

    package = mkOption {
      type = types.package;
      default = ownPackages.fireactions;
      defaultText = literalExpression "the fireactions package built from this repository";
      description = "Package providing `bin/fireactions`.";
    };

    initPackage = mkOption {
      type = types.package;
      default = ownPackages.fireactions-init;
      defaultText = literalExpression "the fireactions-init package built from this repository";
      description = "Package providing the static `bin/fireactions-init` that runs as PID 1 in every VM.";
    };

    kernelPackage = mkOption {
      type = types.package;
      default = ownPackages.guest-kernel;
      defaultText = literalExpression "the guest kernel built from nix/kernel/guest.config";
      description = "Package providing the guest kernel as `vmlinux`.";
    };

    kernel = mkOption {
      type = types.str;
      default = "${cfg.kernelPackage}/vmlinux";
      defaultText = literalExpression ''"''${config.services.fireactions.kernelPackage}/vmlinux"'';
      description = ''
        Guest kernel of every pool that does not name its own. With the
        bootstrap this is its `KERNEL_PATH`.
      '';
    };

    drainTimeout = mkOption {
      type = types.strMatching "([0-9]+h)?([0-9]+m)?([0-9]+s)?";
      default = "30m";
      example = "1h30m";
      description = ''
        How long the daemon waits, when stopped, for busy runners to finish
        their jobs before it stops their VMs (`server.drain_timeout`). Whole
        hours, minutes and seconds, e.g. `30m`, `1h30m`. systemd's
        `TimeoutStopSec` is set 5 minutes longer, and `KillMode=mixed` sends
        SIGTERM to the daemon only, so the daemon, not systemd, decides when
        each VM stops. With the bootstrap it must stay at the daemon's
        default, `30m`, which is what the bootstrap writes.
      '';
    };

    bootstrap = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Generate the configuration on every boot with `fireactions
          bootstrap` from the files in `bootstrap.inputDir` (written by
          cloud-init). When off, the module writes the configuration from
          its options.
        '';
      };
      inputDir = mkOption {
        type = types.str;
        default = "/etc/fireactions";
        description = "Directory holding `github-app-id`, `github-private-key.pem` and `pools.json`.";
      };
    };

    configFile = mkOption {
      type = types.str;
      readOnly = true;
      default = configFile;
      defaultText = literalExpression ''"/run/fireactions/config.yaml" with the bootstrap, else a file in the Nix store'';
      description = "The configuration file every fireactions unit reads.";
    };

    dataDir = mkOption {
      type = runtimePath;
      default = settingsLib.defaultDataDir;
      description = "Images, VM state and caches (`data_dir`).";
    };

    dataDisk = {
      device = unset types.str ''
        A disk for the data directory (VM disks, images), e.g.
        `/dev/disk/azure/scsi1/lun0`. It is formatted (ext4) when it holds
        no file system and mounted on `dataDir` before any fireactions unit
        starts.
      '';
      encrypt = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Encrypt the data disk. Without `keyFile` it is opened with a key
          drawn from /dev/urandom at every boot (dm-crypt plain mode, as for
          encrypted swap) and formatted anew: it holds only caches and
          per-job disks, which are worthless after a reboot, so there is no
          key to keep. With `keyFile` it is a LUKS volume you format once.
        '';
      };
      keyFile = unset runtimePath ''
        Key of a LUKS data disk, read at boot. Format the disk once with
        `cryptsetup luksFormat --key-file KEYFILE DEVICE`.
      '';
    };

    server = {
      address = unset types.str "API listen address (`server.address`). A non-loopback address needs `authTokenFile`.";
      authTokenFile = unset runtimePath "File holding the API bearer token (`server.auth_token_file`), read at run time.";
    };

    metrics = {
      enable = unset types.bool "Prometheus metrics (`metrics.enabled`).";
      address = unset types.str "Metrics listen address (`metrics.address`).";
    };

    log = {
      level = unset (types.enum [
        "debug"
        "info"
        "warn"
        "error"
      ]) "Log level (`log.level`).";
      format = unset (types.enum [
        "text"
        "json"
      ]) "Log format (`log.format`).";
    };

    github = {
      appId = unset types.ints.positive ''
        The GitHub App's numeric ID (`github.app_id`). It is not a secret: it
        is part of every token request the App signs. With the bootstrap it
        comes from `''${bootstrap.inputDir}/github-app-id` instead.
      '';
      privateKeyFile = unset runtimePath ''
        The GitHub App's PEM private key (`github.private_key_file`), read at
        run time; never put it in the Nix store. With the bootstrap it comes
        from `''${bootstrap.inputDir}/github-private-key.pem` instead.
      '';
      apiUrl = unset types.str "REST API base URL (`github.api_url`); set it for GitHub Enterprise Server.";
    };

    network = {
      name = unset types.str "Default CNI network name (`network.name`).";
      confDir = unset types.str "CNI configuration directory (`network.conf_dir`).";
      binDirs = unset (types.listOf types.str) ''
        Directories searched for CNI plugins (`network.bin_dirs`). The module
        links the CNI plugins and tc-redirect-tap into /opt/cni/bin, one of
        the daemon's default directories.
      '';
      bridge = unset types.str "VM bridge (`network.bridge`).";
      subnet = unset types.str "VM subnet in CIDR form (`network.subnet`).";
      gateway = unset types.str "Bridge address, the VMs' gateway (`network.gateway`).";
      mtu = unset types.ints.positive "MTU of the VM network (`network.mtu`).";
      nameservers = unset (types.listOf types.str) "DNS servers given to the VMs (`network.nameservers`).";
    };

    registryCache = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Tell every VM to pull through the host's registry cache
          (`registry_cache.enabled`). The services themselves (Zot, Squid,
          nftables) come with the `registry-cache` profile.
        '';
      };
      gateway = unset types.str "Address the caches listen on (`registry_cache.gateway`).";
      mirrors = unset (types.attrsOf types.str) ''
        Registries served through Zot, registry name to upstream URL
        (`registry_cache.mirrors`), e.g.
        `{ "docker.io" = "https://registry-1.docker.io"; }`.
      '';
      zot = {
        port = unset types.port "Zot's port (`registry_cache.zot.port`).";
        storageDir = mkOption {
          type = runtimePath;
          default = settingsLib.defaultZotStorageDir;
          description = "Zot's storage (`registry_cache.zot.storage_dir`).";
        };
        maxSize = unset size "Bound of Zot's storage volume (`registry_cache.zot.max_size`).";
        gcInterval = unset duration "Zot's garbage collection interval (`registry_cache.zot.gc_interval`).";
      };
      squid = {
        enable = mkOption {
          type = types.bool;
          default = false;
          description = "Intercepting HTTP(S) cache for the VMs (`registry_cache.squid.enabled`).";
        };
        httpPort = unset types.port "`registry_cache.squid.http_port`.";
        httpsPort = unset types.port "`registry_cache.squid.https_port`.";
        memoryCache = unset size "`registry_cache.squid.memory_cache`.";
        diskCache = unset size "`registry_cache.squid.disk_cache`.";
        maxObjectSize = unset size "`registry_cache.squid.max_object_size`.";
        cacheDir = mkOption {
          type = runtimePath;
          default = settingsLib.defaultSquidCacheDir;
          description = "`registry_cache.squid.cache_dir`.";
        };
        bumpDomains = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ ".githubusercontent.com" ];
          description = ''
            Domains whose HTTPS Squid decrypts and caches
            (`registry_cache.squid.bump_domains`); everything else passes
            through untouched. When set, the registry-cache profile creates
            the CA once, with openssl, at `caCertFile`/`caKeyFile`.
          '';
        };
        caCertFile = mkOption {
          type = runtimePath;
          default = "/var/lib/fireactions-ca/ca.pem";
          description = "CA certificate for bumped sites (`registry_cache.squid.ca_cert_file`).";
        };
        caKeyFile = mkOption {
          type = runtimePath;
          default = "/var/lib/fireactions-ca/ca.key";
          description = "CA private key (`registry_cache.squid.ca_key_file`); created with mode 0600.";
        };
      };
    };

    pools = mkOption {
      type = types.listOf poolModule;
      default = [ ];
      description = "Runner pools (`pools`). With the bootstrap they come from `pools.json` instead.";
    };

    nomad = {
      enable = mkEnableOption "the firecracker-task-driver plugin in the Nomad client's plugin directory";
      package = mkOption {
        type = types.package;
        default = ownPackages.firecracker-task-driver;
        defaultText = literalExpression "the firecracker-task-driver package built from this repository";
        description = "Package providing `bin/firecracker-task-driver`.";
      };
      pluginConfig = mkOption {
        type = types.attrsOf types.anything;
        default = { };
        description = ''
          The plugin's `config` block in the Nomad agent configuration.
          Nomad skips a plugin in its plugin directory unless the agent
          configuration has a `plugin` block for it, so the block is always
          written, empty if need be.
        '';
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions =
        let
          conflicts = settingsLib.bootstrapConflicts cfg;
        in
        [
          {
            assertion = !cfg.bootstrap.enable || conflicts == [ ];
            message = ''
              services.fireactions.bootstrap.enable is true, so the configuration is the one
              `fireactions bootstrap` writes from ${cfg.bootstrap.inputDir}; it cannot carry
              these options, which would be ignored: ${lib.concatMapStringsSep ", " (n: "services.fireactions.${n}") conflicts}.
              Leave them unset, or set services.fireactions.bootstrap.enable = false to
              configure everything in Nix.
            '';
          }
          {
            assertion = cfg.bootstrap.enable || (cfg.github.appId != null && cfg.github.privateKeyFile != null);
            message = ''
              services.fireactions: github.appId and github.privateKeyFile are required unless
              bootstrap.enable = true (then they come from ${cfg.bootstrap.inputDir}).
            '';
          }
          {
            assertion = cfg.bootstrap.enable || cfg.pools != [ ];
            message = "services.fireactions.pools: list at least one pool, or set bootstrap.enable = true to read pools.json.";
          }
          {
            # systemd expands % in Environment=; a URL's %xx would be mangled.
            assertion = rcfg.mirrors == null || lib.all (u: !lib.hasInfix "%" u) (lib.attrValues rcfg.mirrors);
            message = "services.fireactions.registryCache.mirrors: write the URLs without %-escapes.";
          }
          {
            assertion = !cfg.nomad.enable || config.services.nomad.enable;
            message = "services.fireactions.nomad.enable needs services.nomad.enable = true (a Nomad client).";
          }
        ];

      # The guest VMs need KVM, TUN/TAP and vsock on the host.
      boot.kernelModules = [
        "kvm-intel"
        "kvm-amd"
        "tun"
        "vhost_vsock"
        "bridge"
        "veth"
      ];

      # The host routes the VMs' traffic; the host set-up enables it too, but
      # systemd-sysctl must not turn it off again later.
      boot.kernel.sysctl."net.ipv4.ip_forward" = mkDefault 1;

      environment.systemPackages = [ cfg.package ];

      # /run is read-only inside the hardened units: what they write there
      # must exist first. /opt/cni/bin is one of the daemon's default plugin
      # directories.
      systemd.tmpfiles.rules = [
        "d ${runtimeDir} 0750 root root -"
        "d /run/netns 0755 root root -"
        "f /run/xtables.lock 0600 root root -"
        "d /etc/cni/conf.d 0755 root root -"
        "d /var/lib/cni 0700 root root -"
        "L+ /opt/cni/bin - - - - ${ownPackages.cni-plugin-dir}/bin"
      ];

      # VM traffic to the host: only what the isolation table allows
      # (DNS, the metadata service, the registry cache).
      networking.firewall.interfaces.${bridge} = {
        allowedTCPPorts = [
          53
          metadataPort
        ]
        ++ lib.optional rcfg.enable zotPort
        ++ lib.optionals rcfg.squid.enable squidPorts;
        allowedUDPPorts = [ 53 ];
      };

      systemd.services.fireactions-host-setup = {
        description = "fireactions host network (bridge, NAT, isolation tables, CNI)";
        wantedBy = [ "multi-user.target" ];
        requiredBy = [ "fireactions.service" ];
        before = [ "fireactions.service" ];
        after = [
          "network.target"
          "fireactions-bootstrap.service"
        ];
        path = [
          pkgs.iproute2
          pkgs.nftables
        ];
        unitConfig = {
          ConditionPathExists = configFile;
          RequiresMountsFor = [ cfg.dataDir ];
        };
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = execAll units.hostSetup.ExecStart;
          ExecStop = execAll units.hostSetup.ExecStop;
          StateDirectory = mkIf (cfg.dataDir == settingsLib.defaultDataDir) "fireactions";
          ProtectHome = true;
          PrivateTmp = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = [
            "CAP_NET_ADMIN"
            "CAP_NET_RAW"
          ];
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_NETLINK"
            "AF_INET"
            "AF_INET6"
          ];
          LockPersonality = true;
          SystemCallArchitectures = "native";
        };
      };

      systemd.services.fireactions = {
        description = "fireactions runner pools";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [
          "network-online.target"
          "fireactions-bootstrap.service"
          "fireactions-host-setup.service"
        ];
        path = [
          pkgs.firecracker
          pkgs.qemu_kvm
          pkgs.iproute2
          pkgs.iptables
          pkgs.nftables
          pkgs.e2fsprogs
          pkgs.util-linux
        ];
        environment.FIREACTIONS_INIT = lib.getExe' cfg.initPackage "fireactions-init";
        restartTriggers = [ configFile ];
        unitConfig = {
          # With the bootstrap: no inputs, no configuration, nothing to run.
          ConditionPathExists = configFile;
          RequiresMountsFor = [ cfg.dataDir ];
        };
        serviceConfig = {
          ExecStartPre = execAll units.daemon.ExecStartPre;
          ExecStart = execAll units.daemon.ExecStart;
          Restart = "on-failure";
          RestartSec = 5;
          # SIGTERM goes to the daemon alone; it drains its runners and stops
          # its VMs itself. Whatever is left after TimeoutStopSec is killed.
          KillMode = "mixed";
          KillSignal = "SIGTERM";
          TimeoutStopSec = units.daemon.TimeoutStopSec;
          StateDirectory = mkIf (cfg.dataDir == settingsLib.defaultDataDir) "fireactions";
          UMask = "0027";

          # Hardening, as far as KVM and networking allow. The daemon creates
          # network namespaces, taps and nftables rules (CAP_NET_ADMIN),
          # mounts namespaces (CAP_SYS_ADMIN), and runs the VMMs.
          DevicePolicy = "closed";
          DeviceAllow = [
            "/dev/kvm rw"
            "/dev/net/tun rw"
            "/dev/vhost-vsock rw"
            "/dev/vhost-net rw"
          ];
          CapabilityBoundingSet = [
            "CAP_NET_ADMIN"
            "CAP_SYS_ADMIN"
            "CAP_NET_RAW"
            "CAP_KILL"
            "CAP_CHOWN"
            "CAP_FOWNER"
            "CAP_DAC_OVERRIDE"
          ];
          ProtectSystem = "strict";
          ReadWritePaths = [
            cfg.dataDir
            runtimeDir
            "/run/netns"
            "/var/lib/cni"
            "/run/xtables.lock"
          ];
          ProtectHome = true;
          PrivateTmp = true;
          NoNewPrivileges = true;
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_NETLINK"
            "AF_INET"
            "AF_INET6"
            "AF_VSOCK"
          ];
          RestrictNamespaces = [
            "net"
            "mnt"
          ];
          LockPersonality = true;
          SystemCallArchitectures = "native";
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelLogs = true;
          ProtectKernelModules = true;
          # Not set, on purpose: ProtectKernelTunables (CNI writes
          # /proc/sys/net), PrivateDevices (hides /dev/kvm),
          # MemoryDenyWriteExecute (QEMU's TCG generates code).
        };
      };
    }

    (mkIf (cfg.dataDisk.device != null) {
      environment.etc.crypttab = mkIf cfg.dataDisk.encrypt {
        text =
          if cfg.dataDisk.keyFile == null then
            "fireactions-data ${cfg.dataDisk.device} /dev/urandom plain,cipher=aes-xts-plain64,size=512\n"
          else
            "fireactions-data ${cfg.dataDisk.device} ${cfg.dataDisk.keyFile} luks\n";
      };
      fileSystems.${cfg.dataDir} = {
        device = if cfg.dataDisk.encrypt then "/dev/mapper/fireactions-data" else cfg.dataDisk.device;
        fsType = "ext4";
        autoFormat = true;
        options = [
          "nodev"
          "nosuid"
          "x-systemd.device-timeout=5min"
        ];
      };
    })

    (mkIf cfg.bootstrap.enable {
      systemd.services.fireactions-bootstrap = {
        description = "Generate ${runtimeDir}/config.yaml from ${cfg.bootstrap.inputDir}";
        wantedBy = [ "multi-user.target" ];
        before = [
          "fireactions.service"
          "fireactions-host-setup.service"
        ];
        # On the first boot cloud-init writes the inputs; later boots find
        # them on disk. Ordering on a unit that does not exist is ignored.
        after = [
          "local-fs.target"
          "cloud-init.service"
        ];
        environment = units.bootstrap.environment;
        unitConfig.ConditionPathExists = units.bootstrap.inputFiles;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = execAll units.bootstrap.ExecStart;
          # It reads files and writes one: no network, no privileges.
          PrivateNetwork = true;
          CapabilityBoundingSet = [ "" ];
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ReadWritePaths = [ runtimeDir ];
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          RestrictAddressFamilies = [ "AF_UNIX" ];
          LockPersonality = true;
          SystemCallArchitectures = "native";
          UMask = "0027";
        };
      };
      systemd.services.fireactions.requires = [ "fireactions-bootstrap.service" ];
    })

    (mkIf cfg.nomad.enable {
      services.nomad = {
        # Symlinked into the plugin directory given to the agent.
        extraSettingsPlugins = [ cfg.nomad.package ];
        settings.plugin.firecracker-task-driver.config = cfg.nomad.pluginConfig;
        # The driver needs root: /dev/kvm, network namespaces, taps.
        dropPrivileges = mkDefault false;
        extraPackages = [
          pkgs.firecracker
          pkgs.iproute2
          pkgs.iptables
          ownPackages.cni-plugin-dir
        ];
      };
    })
  ]);
}
