# The daemon configuration (internal/config's YAML keys) that the
# fireactions NixOS module writes from its options, and the options that
# `fireactions bootstrap` cannot carry.
#
# Like units.nix this file uses only Nix's builtins, so internal/nixcheck
# can evaluate it with `nix-instantiate --eval` and hand the result to the
# real `fireactions validate`.
#
# `cfg` is the value of `services.fireactions` (or any attribute set of the
# same shape). An option left at null is left out of the configuration, so
# the daemon's own default applies and is never restated here.
let
  # Remove null values, recursively through attribute sets and lists.
  prune =
    v:
    if builtins.isAttrs v then
      builtins.mapAttrs (_: prune) (
        builtins.removeAttrs v (builtins.filter (n: v.${n} == null) (builtins.attrNames v))
      )
    else if builtins.isList v then
      map prune (builtins.filter (x: x != null) v)
    else
      v;

  nonEmpty = l: if l == [ ] then null else l;

  # Where the daemon and the bootstrap agree without being told.
  defaultDataDir = "/var/lib/fireactions";
  defaultZotStorageDir = "/var/lib/zot";
  defaultSquidCacheDir = "/var/cache/squid";
  # config.DefaultDrainTimeout, what the bootstrap's configuration gets.
  defaultDrainTimeout = "30m";

  pool = cfg: p: {
    inherit (p) name;
    min_runners = p.minRunners;
    max_runners = p.maxRunners;
    network = p.network;
    runner = {
      name_prefix = p.runner.namePrefix;
      image = p.runner.image;
      image_pull_policy = p.runner.imagePullPolicy;
      organization = p.runner.organization;
      repository = p.runner.repository;
      enterprise = p.runner.enterprise;
      group_id = p.runner.groupId;
      labels = p.runner.labels;
    };
    vm = {
      backend = p.vm.backend;
      vcpus = p.vm.vcpus;
      memory_mib = p.vm.memoryMiB;
      smt = p.vm.smt;
      cpu_template = p.vm.cpuTemplate;
      # One kernel for the whole host unless a pool names its own.
      kernel = if p.vm.kernel != null then p.vm.kernel else cfg.kernel;
      kernel_modules = p.vm.kernelModules;
      kernel_args = p.vm.kernelArgs;
      disk_size = p.vm.diskSize;
      metadata = if p.vm.metadata == { } then null else p.vm.metadata;
      user_data = p.vm.userData;
    };
  };

  rc = cfg: cfg.registryCache;
in
{
  inherit
    defaultDataDir
    defaultZotStorageDir
    defaultSquidCacheDir
    defaultDrainTimeout
    ;

  # The configuration as an attribute set, ready for builtins.toJSON (JSON
  # is YAML; the daemon decodes it strictly).
  toConfig =
    cfg:
    prune {
      data_dir = cfg.dataDir;
      server = {
        address = cfg.server.address;
        auth_token_file = cfg.server.authTokenFile;
        # Always written: systemd's TimeoutStopSec is computed from it.
        drain_timeout = cfg.drainTimeout;
      };
      metrics = {
        enabled = cfg.metrics.enable;
        address = cfg.metrics.address;
      };
      log = {
        level = cfg.log.level;
        format = cfg.log.format;
      };
      github = {
        app_id = cfg.github.appId;
        private_key_file = cfg.github.privateKeyFile;
        api_url = cfg.github.apiUrl;
      };
      network = {
        inherit (cfg.network)
          name
          bridge
          subnet
          gateway
          mtu
          ;
        conf_dir = cfg.network.confDir;
        bin_dirs = cfg.network.binDirs;
        nameservers = cfg.network.nameservers;
      };
      registry_cache = {
        enabled = (rc cfg).enable;
        gateway = (rc cfg).gateway;
        zot = {
          port = (rc cfg).zot.port;
          storage_dir = (rc cfg).zot.storageDir;
          max_size = (rc cfg).zot.maxSize;
          gc_interval = (rc cfg).zot.gcInterval;
        };
        mirrors =
          if (rc cfg).mirrors == null then
            null
          else
            map (registry: {
              inherit registry;
              url = (rc cfg).mirrors.${registry};
            }) (builtins.attrNames (rc cfg).mirrors);
        squid =
          let
            sq = (rc cfg).squid;
          in
          {
            enabled = sq.enable;
            http_port = sq.httpPort;
            https_port = sq.httpsPort;
            memory_cache = sq.memoryCache;
            disk_cache = sq.diskCache;
            max_object_size = sq.maxObjectSize;
            cache_dir = sq.cacheDir;
            bump_domains = nonEmpty sq.bumpDomains;
            ca_cert_file = if sq.bumpDomains == [ ] then null else sq.caCertFile;
            ca_key_file = if sq.bumpDomains == [ ] then null else sq.caKeyFile;
          };
      };
      pools = map (pool cfg) cfg.pools;
    };

  # The options set to something `fireactions bootstrap` would not write,
  # by option name. With services.fireactions.bootstrap.enable the
  # configuration comes from the bootstrap alone, so each of these would be
  # silently ignored; the module refuses them instead.
  bootstrapConflicts =
    cfg:
    let
      sq = (rc cfg).squid;
      z = (rc cfg).zot;
      nullOptions = {
        "server.address" = cfg.server.address;
        "server.authTokenFile" = cfg.server.authTokenFile;
        "metrics.address" = cfg.metrics.address;
        "log.level" = cfg.log.level;
        "log.format" = cfg.log.format;
        "github.appId" = cfg.github.appId;
        "github.privateKeyFile" = cfg.github.privateKeyFile;
        "github.apiUrl" = cfg.github.apiUrl;
        "network.name" = cfg.network.name;
        "network.confDir" = cfg.network.confDir;
        "network.binDirs" = cfg.network.binDirs;
        "network.bridge" = cfg.network.bridge;
        "network.subnet" = cfg.network.subnet;
        "network.gateway" = cfg.network.gateway;
        "network.mtu" = cfg.network.mtu;
        "network.nameservers" = cfg.network.nameservers;
        "registryCache.zot.maxSize" = z.maxSize;
        "registryCache.zot.gcInterval" = z.gcInterval;
        "registryCache.squid.httpPort" = sq.httpPort;
        "registryCache.squid.httpsPort" = sq.httpsPort;
        "registryCache.squid.memoryCache" = sq.memoryCache;
        "registryCache.squid.diskCache" = sq.diskCache;
        "registryCache.squid.maxObjectSize" = sq.maxObjectSize;
      };
      others = {
        "dataDir" = cfg.dataDir != defaultDataDir;
        "drainTimeout" = cfg.drainTimeout != defaultDrainTimeout;
        # The bootstrap turns metrics on (on loopback).
        "metrics.enable" = cfg.metrics.enable == false;
        "registryCache.zot.storageDir" = z.storageDir != defaultZotStorageDir;
        "registryCache.squid.enable" = sq.enable;
        "registryCache.squid.cacheDir" = sq.cacheDir != defaultSquidCacheDir;
        "registryCache.squid.bumpDomains" = sq.bumpDomains != [ ];
        "pools" = cfg.pools != [ ];
      };
    in
    builtins.filter (n: nullOptions.${n} != null) (builtins.attrNames nullOptions)
    ++ builtins.filter (n: others.${n}) (builtins.attrNames others);
}
