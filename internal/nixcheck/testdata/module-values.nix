# Values of services.fireactions as the NixOS module hands them to
# nix/lib/settings.nix: every option present, the module's defaults where
# the comment says so. `root` prefixes every path, so the test can point
# them into a temporary directory. `bootstrap` selects the image set-up
# (defaults plus the registry cache) instead of a configuration written in
# Nix.
{
  root,
  bootstrap ? false,
}:
let
  defaults = {
    enable = true;
    version = "dev";
    kernel = "${root}/kernel/vmlinux";
    drainTimeout = "30m";
    bootstrap = {
      enable = bootstrap;
      inputDir = "/etc/fireactions";
    };
    dataDir = "/var/lib/fireactions";
    dataDisk = {
      device = null;
      encrypt = false;
      keyFile = null;
    };
    server = {
      address = null;
      authTokenFile = null;
    };
    metrics = {
      enable = null;
      address = null;
    };
    log = {
      level = null;
      format = null;
    };
    github = {
      appId = null;
      privateKeyFile = null;
      apiUrl = null;
    };
    network = {
      name = null;
      confDir = null;
      binDirs = null;
      bridge = null;
      subnet = null;
      gateway = null;
      mtu = null;
      nameservers = null;
    };
    registryCache = {
      enable = false;
      gateway = null;
      mirrors = null;
      zot = {
        port = null;
        storageDir = "/var/lib/zot";
        maxSize = null;
        gcInterval = null;
      };
      squid = {
        enable = false;
        httpPort = null;
        httpsPort = null;
        memoryCache = null;
        diskCache = null;
        maxObjectSize = null;
        cacheDir = "/var/cache/squid";
        bumpDomains = [ ];
        caCertFile = "/var/lib/fireactions-ca/ca.pem";
        caKeyFile = "/var/lib/fireactions-ca/ca.key";
      };
    };
    pools = [ ];
    nomad = {
      enable = false;
      pluginConfig = { };
    };
  };

  pool = name: overrides: {
    inherit name;
    minRunners = null;
    maxRunners = 4;
    network = null;
    runner = {
      namePrefix = null;
      image = null;
      imagePullPolicy = null;
      organization = null;
      repository = null;
      enterprise = null;
      groupId = null;
      labels = null;
    } // (overrides.runner or { });
    vm = {
      backend = null;
      vcpus = null;
      memoryMiB = null;
      smt = null;
      cpuTemplate = null;
      kernel = null;
      kernelModules = null;
      kernelArgs = null;
      diskSize = null;
      metadata = { };
      userData = null;
    } // (overrides.vm or { });
  };

  # Everything a host configured in Nix would set.
  full = defaults // {
    drainTimeout = "45m";
    dataDir = "${root}/var/lib/fireactions";
    server = {
      address = "127.0.0.1:9080";
      authTokenFile = "${root}/secrets/api-token";
    };
    metrics = {
      enable = true;
      address = "127.0.0.1:9081";
    };
    log = {
      level = "debug";
      format = "json";
    };
    github = {
      appId = 123456;
      privateKeyFile = "${root}/secrets/github-app.pem";
      apiUrl = "https://github.example.com/api/v3/";
    };
    network = {
      name = "runners";
      confDir = "${root}/etc/cni/conf.d";
      binDirs = [ "${root}/opt/cni/bin" ];
      bridge = "fa-test0";
      subnet = "10.201.0.0/24";
      gateway = "10.201.0.1";
      mtu = 1450;
      nameservers = [ "10.201.0.1" ];
    };
    registryCache = {
      enable = true;
      gateway = "10.201.0.1";
      mirrors = {
        "docker.io" = "https://registry-1.docker.io";
        "ghcr.io" = "https://ghcr.io";
      };
      zot = {
        port = 5100;
        storageDir = "${root}/var/lib/zot";
        maxSize = "20GiB";
        gcInterval = "12h";
      };
      squid = {
        enable = true;
        httpPort = 3138;
        httpsPort = 3139;
        memoryCache = "64MiB";
        diskCache = "1GiB";
        maxObjectSize = "512MiB";
        cacheDir = "${root}/var/cache/squid";
        bumpDomains = [ ".githubusercontent.com" ];
        caCertFile = "${root}/ca/ca.pem";
        caKeyFile = "${root}/ca/ca.key";
      };
    };
    pools = [
      (pool "org" {
        runner = {
          organization = "octo-org";
          labels = [
            "self-hosted"
            "nix"
          ];
        };
        vm = {
          vcpus = 2;
          memoryMiB = 4096;
          diskSize = "30GiB";
          metadata = {
            team = "infra";
          };
        };
      })
      (pool "repo-qemu" {
        runner = {
          repository = "octo-org/hello";
          imagePullPolicy = "Always";
        };
        vm = {
          backend = "qemu";
          kernel = "${root}/kernel/other-vmlinux";
        };
      })
    ];
  };

  # The images: everything from the bootstrap, the cache on.
  images = defaults // {
    registryCache = defaults.registryCache // {
      enable = true;
      zot = defaults.registryCache.zot // {
        port = 5001;
      };
      mirrors = {
        "docker.io" = "https://registry-1.docker.io";
        "quay.io" = "https://quay.io";
      };
    };
    # prod.nix
    metrics = defaults.metrics // {
      enable = true;
    };
  };
in
if bootstrap then images else full
