#!/usr/bin/env bash
# Installs the Debian packages fireactions' build, tests and demo need.
# Idempotent: packages already present are not touched, and apt is not
# called at all when nothing is missing.
set -euo pipefail

packages=(
  qemu-system-x86      # qemu backend: boots real guests (TCG without KVM)
  e2fsprogs            # debugfs, e2fsck, mkfs.ext4 in tests
  cpio                 # inspecting initramfs archives in tests
  xz-utils lz4 zstd    # cutting the vmlinux out of Debian's bzImage
  squid-openssl        # `squid -k parse` on rendered configs (the OpenSSL build: ssl-bump)
  python3-yaml         # cloud-init's YAML parser, to check rendered user-data
  nftables             # `nft -c` on rendered rules; host isolation
  iproute2             # network namespaces in tests
  iptables             # CNI bridge/firewall plugins program it
  kmod                 # depmod: Debian kernel debs ship no modules.dep
  containernetworking-plugins  # CNI bridge/host-local/firewall
  docker-registry      # a real OCI registry with htpasswd auth
  apache2-utils        # htpasswd
  busybox-static       # test and demo images
  skopeo umoci         # the seed pipeline, for the image benchmark only
  debootstrap          # the image benchmark's Debian minbase
  nix-bin              # nix-instantiate --parse on the flake
  git ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts squid and docker-registry as services on install; the tests
# run their own instances on free ports.
for s in squid docker-registry; do
  $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true
done
