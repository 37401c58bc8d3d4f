# The command lines of every systemd unit that the fireactions NixOS module
# and its profiles define, kept in one place.
#
# This file uses nothing but Nix's builtins, on purpose: internal/nixcheck
# evaluates it with `nix-instantiate --eval` (no nixpkgs needed) and runs the
# very argv lists it returns, with the real fireactions, squid, openssl and
# nft binaries, against a temporary root. The modules only turn each argv
# list into an Exec line with `utils.escapeSystemdExecArgs`, so what the test
# runs is what systemd runs, up to the paths passed in.
#
# Every Exec* attribute is a list of argv lists (systemd runs them in order).
{
  # Executables.
  fireactions,
  zot ? "zot",
  squid ? "squid",
  openssl ? "openssl",
  nft ? "nft",
  sh ? "/bin/sh",
  chown ? "chown",
  certgen ? "security_file_certgen",

  # Where things are.
  inputDir ? "/etc/fireactions",
  configFile ? "/run/fireactions/config.yaml",
  renderDir ? "/run/fireactions/registry-cache",
  # The NixOS-side squid.conf (a store file holding squid.configText below).
  squidConfigFile ? "/etc/squid/fireactions.conf",
  squidPidFile ? "/run/fireactions-squid/squid.pid",
  squidLogDir ? "/var/log/squid",
  squidUser ? "squid",
  squidGroup ? squidUser,
  squidCacheDir ? "/var/cache/squid",
  zotUser ? "zot",
  zotStorageDir ? "/var/lib/zot",
  caCertFile ? "/var/lib/fireactions-ca/ca.pem",
  caKeyFile ? "/var/lib/fireactions-ca/ca.key",
  caDays ? 3650,

  # The bootstrap's environment; null leaves the variable unset, so the
  # bootstrap applies its own default.
  kernel ? null,
  registryCacheEnable ? false,
  registryCacheGateway ? null,
  zotPort ? null,
  # Registry name -> upstream URL, e.g. { "docker.io" = "https://registry-1.docker.io"; }.
  mirrors ? null,

  # The daemon's drain deadline (server.drain_timeout, which the daemon
  # reads from its configuration): how long it may take to drain its
  # runners when stopped. Only TimeoutStopSec is computed from it here.
  drainTimeout ? "30m",
}:
let
  # Go durations as the module accepts them: whole hours, minutes and
  # seconds in that order ("30m", "1h30m", "90s"). Returns seconds.
  durationSeconds =
    name: s:
    let
      m = builtins.match "([0-9]+h)?([0-9]+m)?([0-9]+s)?" s;
      part =
        i: unit:
        let
          v = builtins.elemAt m i;
        in
        # fromJSON refuses leading zeros ("05"); drop them first.
        if v == null then
          0
        else
          unit * builtins.fromJSON (builtins.head (builtins.match "0*([0-9]+)[hms]" v));
    in
    if s == "" || m == null then
      throw "${name}: \"${s}\" is not a duration; write whole hours, minutes and seconds such as 30m, 1h30m or 90s"
    else
      part 0 3600 + part 1 60 + part 2 1;

  drainSeconds = durationSeconds "services.fireactions.drainTimeout" drainTimeout;

  # After the drain deadline the daemon still stops the VMs that are left,
  # releases their networks and deregisters their runners; systemd must not
  # SIGKILL it while it does.
  stopMarginSeconds = 300;

  dropNulls = attrs: builtins.removeAttrs attrs (builtins.filter (n: attrs.${n} == null) (builtins.attrNames attrs));

  render = path: "${renderDir}/${path}";
  certDB = "${squidCacheDir}-ssl_db";
  nftTable = "fireactions_registry_cache";
in
{
  inherit drainSeconds stopMarginSeconds;

  # fireactions-bootstrap.service: /run/fireactions/config.yaml from the files
  # cloud-init writes, on every boot.
  bootstrap = {
    # ConditionPathExists=: without them there is nothing to generate.
    inputFiles = map (f: "${inputDir}/${f}") [
      "github-app-id"
      "github-private-key.pem"
      "pools.json"
    ];
    environment = dropNulls {
      KERNEL_PATH = kernel;
      REGISTRY_CACHE_ENABLED = if registryCacheEnable then "true" else "false";
      REGISTRY_CACHE_GATEWAY = registryCacheGateway;
      ZOT_PORT = if zotPort == null then null else toString zotPort;
      ZOT_MIRRORS =
        if mirrors == null then null else builtins.toJSON (builtins.mapAttrs (_: url: { inherit url; }) mirrors);
    };
    ExecStart = [
      [ fireactions "bootstrap" "--input-dir" inputDir "--output" configFile ]
    ];
  };

  # The build-time check of a configuration written by the module: files it
  # names (the key, the kernel) do not exist in the build sandbox.
  checkConfig = [ fireactions "validate" "--check-files=false" "-c" configFile ];

  # fireactions.service.
  daemon = {
    ExecStartPre = [
      [ fireactions "validate" "-c" configFile ]
    ];
    ExecStart = [
      [ fireactions "serve" "-c" configFile ]
    ];
    TimeoutStopSec = drainSeconds + stopMarginSeconds;
  };

  # fireactions-host-setup.service: bridge, NAT, isolation tables, CNI conflist.
  hostSetup = {
    ExecStart = [
      [ fireactions "host" "setup" "-c" configFile ]
    ];
    ExecStop = [
      [ fireactions "host" "teardown" "-c" configFile ]
    ];
  };

  # fireactions-registry-cache-render.service: Zot, Squid and nftables
  # configuration for this boot's configuration.
  registryCacheRender = {
    ExecStart = [
      [ fireactions "registry-cache" "render" "-c" configFile "--out" renderDir ]
    ];
  };

  zot = {
    configFile = render "host/zot/config.json";
    storageScript = render "host/zot/storage.sh";
    ExecStartPre = [
      # Mounts the size-bounded storage volume; needs root.
      [ sh (render "host/zot/storage.sh") ]
      # A fresh volume's root belongs to root; Zot runs as its own user.
      [ chown "${zotUser}:${zotUser}" zotStorageDir ]
    ];
    ExecStart = [
      [ zot "serve" (render "host/zot/config.json") ]
    ];
  };

  squid = {
    renderedConfig = render "host/squid/squid.conf";
    # What the rendered squid.conf leaves to the host: where the pid file and
    # the logs go and which user Squid drops to. Squid reads the rendered
    # file through `include`, so a new configuration needs no rebuild.
    configText = ''
      # fireactions registry cache: host settings around the rendered squid.conf.
      pid_filename ${squidPidFile}
      cache_effective_user ${squidUser}
      cache_effective_group ${squidGroup}
      cache_log ${squidLogDir}/cache.log
      access_log stdio:${squidLogDir}/access.log
      cache_store_log none
      coredump_dir ${squidCacheDir}
      include ${render "host/squid/squid.conf"}
    '';
    ExecStartPre = [
      # Creates the cache_dir structure if it is missing.
      [ squid "--foreground" "-z" "-f" squidConfigFile ]
    ];
    ExecStart = [
      [ squid "--foreground" "-YCs" "-f" squidConfigFile ]
    ];
  };

  # fireactions-squid-certdb.service: the certificate store Squid's helper
  # keeps for bumped sites; created once (ConditionPathExists=!path).
  squidCertDB = {
    path = certDB;
    ExecStart = [
      [ certgen "-c" "-s" certDB "-M" "4MB" ]
      [ chown "-R" "${squidUser}:${squidGroup}" certDB ]
    ];
  };

  # fireactions-squid-ca.service: the CA Squid signs bumped sites with;
  # created once (ConditionPathExists=!cert), under UMask=0077.
  squidCA = {
    certFile = caCertFile;
    keyFile = caKeyFile;
    ExecStart = [
      [
        openssl
        "req"
        "-x509"
        "-newkey"
        "ec"
        "-pkeyopt"
        "ec_paramgen_curve:P-256"
        "-sha256"
        "-nodes"
        "-days"
        (toString caDays)
        "-subj"
        "/CN=fireactions registry cache CA"
        "-addext"
        "basicConstraints=critical,CA:TRUE"
        "-addext"
        "keyUsage=critical,keyCertSign,cRLSign"
        "-keyout"
        caKeyFile
        "-out"
        caCertFile
      ]
    ];
  };

  # fireactions-registry-cache-nft.service: the redirect of VM web traffic
  # to Squid. The file replaces its own table atomically and only that table.
  nftables = {
    file = render "host/nftables/registry-cache.nft";
    # registrycache.NftTable, the only table the file touches.
    table = nftTable;
    ExecStart = [
      [ nft "-f" (render "host/nftables/registry-cache.nft") ]
    ];
    ExecStop = [
      [ nft "delete" "table" "ip" nftTable ]
    ];
  };
}
