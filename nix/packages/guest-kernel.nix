# The guest kernel of the fireactions microVMs: Linux's allnoconfig plus
# the options in nix/kernel/guest.config (and the architecture's own
# fragment), everything built in, no modules. Installs:
#
#   $out/vmlinux  x86_64: the uncompressed ELF with the PVH entry note that
#                 Firecracker and QEMU microvm boot; aarch64: the Image
#                 Firecracker boots
#   $out/config   the complete .config, for reference
{
  lib,
  stdenv,
  buildPackages,
  linux_6_12,
  flex,
  bison,
  bc,
  perl,
  elfutils,
  openssl,
  python3,
}:
let
  arch = stdenv.hostPlatform.linuxArch;
  fragments = [
    ../kernel/guest.config
    (
      if stdenv.hostPlatform.isx86_64 then
        ../kernel/guest-x86_64.config
      else if stdenv.hostPlatform.isAarch64 then
        ../kernel/guest-aarch64.config
      else
        throw "fireactions guest kernel: no configuration fragment for ${stdenv.hostPlatform.system}"
    )
  ];
  target = if stdenv.hostPlatform.isx86_64 then "vmlinux" else "Image";
  built = if stdenv.hostPlatform.isx86_64 then "vmlinux" else "arch/arm64/boot/Image";
in
stdenv.mkDerivation {
  pname = "fireactions-guest-kernel";
  inherit (linux_6_12) version src;

  depsBuildBuild = [ buildPackages.stdenv.cc ];
  nativeBuildInputs = [
    flex
    bison
    bc
    perl
    elfutils
    openssl
    python3
  ];

  makeFlags = [
    "ARCH=${arch}"
    "HOSTCC=${buildPackages.stdenv.cc.targetPrefix}cc"
  ]
  ++ lib.optional (stdenv.hostPlatform != stdenv.buildPlatform) "CROSS_COMPILE=${stdenv.cc.targetPrefix}";

  postPatch = ''
    patchShebangs scripts tools
  '';

  configurePhase = ''
    runHook preConfigure
    cat ${lib.escapeShellArgs fragments} > fireactions.config
    make $makeFlags KCONFIG_ALLCONFIG=fireactions.config allnoconfig
    sh ${../kernel/check-config.sh} .config ${lib.escapeShellArgs fragments}
    runHook postConfigure
  '';

  buildPhase = ''
    runHook preBuild
    make $makeFlags -j$NIX_BUILD_CORES ${target}
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    install -Dm0644 ${built} $out/vmlinux
    install -Dm0644 .config $out/config
    runHook postInstall
  '';

  # The kernel is not run on the build machine; nothing to strip or patch.
  dontStrip = true;
  dontPatchELF = true;

  meta = {
    description = "Guest kernel for fireactions microVMs (Firecracker, QEMU microvm)";
    license = lib.licenses.gpl2Only;
    platforms = [
      "x86_64-linux"
      "aarch64-linux"
    ];
  };
}
