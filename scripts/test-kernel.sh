#!/usr/bin/env bash
# Fetches Debian's cloud kernel and prepares it for microVM guests:
#   - the uncompressed PVH ELF vmlinux, cut out of the bzImage (QEMU's
#     microvm machine and Firecracker boot an ELF vmlinux directly, and
#     decompressing a bzImage under TCG costs seconds on every boot);
#   - lib/modules/<version>/ with uncompressed .ko files and a modules.dep
#     (the Debian package ships no modules.dep: depmod makes it at install).
#
# Idempotent: the result is cached under
#   ${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/kernel/<version>/
# and a second run downloads nothing. The last two lines of output are
#   KERNEL=<vmlinux path>
#   MODULES=<modules dir>
#
# Needs: apt-get, dpkg, flock, lz4/xz/zstd/gzip (whichever compressed the
# kernel), depmod (Debian package kmod).
set -euo pipefail

cache="${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/kernel"
meta=linux-image-cloud-amd64

log() { echo "test-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

# resolve_package prints the versioned image package the metapackage
# currently depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_package() {
  apt-cache depends "$meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}

# newest_cached prints the kernel version of the newest complete cache entry.
newest_cached() {
  local d
  for d in $(ls -1dt "$cache"/*/ 2>/dev/null); do
    if [ -f "$d/.complete" ]; then basename "$d"; return 0; fi
  done
  return 1
}

# hex_at FILE OFFSET COUNT prints COUNT bytes at OFFSET as hex.
hex_at() { od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

# is_pvh_elf succeeds when $1 is an x86-64 ELF carrying the Xen PVH entry
# note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12) that direct ELF boot needs.
is_pvh_elf() {
  [ -s "$1" ] || return 1
  [ "$(hex_at "$1" 0 4)" = "7f454c46" ] || return 1
  if command -v readelf >/dev/null; then
    readelf -n "$1" 2>/dev/null | grep -q 'Xen.*(0x00000012)' || return 1
  fi
}

# decompress_at DECOMPRESSOR OFFSET LENGTH IN OUT. Decompressors exit
# non-zero on the kernel's trailing size word; the ELF check decides.
decompress_at() {
  local tool=$1 off=$2 len=$3 in=$4 out=$5
  if [ "$len" -gt 0 ]; then
    tail -c +"$((off + 1))" "$in" | head -c "$len" | $tool >"$out" 2>/dev/null || true
  else
    tail -c +"$((off + 1))" "$in" | $tool >"$out" 2>/dev/null || true
  fi
}

tool_for_magic() {
  case "$1" in
    fd377a585a00*) echo "xz -dc" ;;
    02214c18*) echo "lz4 -dc" ;;
    28b52ffd*) echo "zstd -dc" ;;
    1f8b08*) echo "gzip -dc" ;;
    *) return 1 ;;
  esac
}

# extract_vmlinux BZIMAGE OUT cuts the compressed payload out of a bzImage.
# The setup header says where it is (setup_sects at 0x1f1, payload_offset and
# payload_length at 0x248/0x24c, relative to the protected-mode code); when
# that fails, scan for compression magics as scripts/extract-vmlinux does.
extract_vmlinux() {
  local in=$1 out=$2 sects poff plen base magic tool
  sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$in" | tr -d ' ')
  [ "$sects" -eq 0 ] && sects=4
  read -r poff plen < <(od -An -tu4 -j $((0x248)) -N8 "$in")
  base=$(((sects + 1) * 512 + poff))
  magic=$(hex_at "$in" "$base" 6)
  if tool=$(tool_for_magic "$magic"); then
    command -v "${tool%% *}" >/dev/null || die "the kernel payload is ${tool%% *}-compressed: install ${tool%% *}"
    decompress_at "$tool" "$base" "$plen" "$in" "$out"
    is_pvh_elf "$out" && return 0
  fi
  log "setup header payload did not decompress to a PVH ELF; scanning for magics"
  local pattern off
  for pattern in '\xfd7zXZ\x00' '\x02\x21\x4c\x18' '\x28\xb5\x2f\xfd' '\x1f\x8b\x08'; do
    for off in $(LC_ALL=C grep -obaP "$pattern" "$in" | cut -d: -f1 | head -20); do
      magic=$(hex_at "$in" "$off" 6)
      tool=$(tool_for_magic "$magic") || continue
      command -v "${tool%% *}" >/dev/null || continue
      decompress_at "$tool" "$off" 0 "$in" "$out"
      is_pvh_elf "$out" && return 0
    done
  done
  die "no PVH ELF vmlinux found inside $in"
}

# prepare_modules DIR KVER decompresses modules (finit_module in the guest
# reads plain ELF; the initramfs then needs no decompressor) and (re)builds
# modules.dep.
prepare_modules() {
  local root=$1 kver=$2 f
  while IFS= read -r -d '' f; do
    case "$f" in
      *.ko.xz) xz -d "$f" ;;
      *.ko.zst) zstd -q -d --rm "$f" ;;
      *.ko.gz) gzip -d "$f" ;;
    esac
  done < <(find "$root/lib/modules/$kver" -name '*.ko.*' -print0)
  command -v depmod >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
  command -v depmod >/dev/null || die "depmod not found: install the Debian package kmod"
  depmod -b "$root" "$kver"
}

# apt-cache takes over a second where the binary package cache is off
# (Docker-style images); the answer only changes when the package lists do,
# so it is remembered next to the cache.
resolved="$cache/.resolved"
lists=/var/lib/apt/lists
pkg=""
if [ -s "$resolved" ] && [ -z "$(find "$lists" -maxdepth 1 -newer "$resolved" -name '*Packages*' 2>/dev/null)" ]; then
  pkg=$(cat "$resolved")
  [ -f "$cache/${pkg#linux-image-}/.complete" ] || pkg=""
fi
[ -n "$pkg" ] || pkg=$(resolve_package || true)
if [ -z "$pkg" ]; then
  if kver=$(newest_cached); then
    log "package lists cannot resolve $meta; using cached $kver"
  else
    log "package lists are empty: running apt-get update"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq || die "apt-get update failed"
    pkg=$(resolve_package) || true
    [ -n "$pkg" ] || die "apt-cache cannot resolve $meta (is a Debian amd64 archive in sources.list?)"
  fi
fi
if [ -n "$pkg" ]; then
  kver=${pkg#linux-image-}
fi

dir="$cache/$kver"
if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$cache"
  # Test packages run in parallel and may all call this script on a fresh
  # machine: one downloads, the others wait and reuse its result.
  exec 9>"$cache/.lock"
  flock 9
fi
if [ ! -f "$dir/.complete" ]; then
  rm -rf "$cache"/.tmp-* # left by an interrupted run
  work=$(mktemp -d "$cache/.tmp-$kver.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log "downloading $pkg"
  # _apt cannot write into a root-only temp dir; download as the caller.
  (cd "$work" && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null 2>"$work/apt.err") ||
    { cat "$work/apt.err" >&2; die "apt-get download $pkg failed"; }
  deb=$(ls "$work"/*.deb)
  dpkg -x "$deb" "$work/x"
  rm -f "$deb"
  [ -d "$work/x/lib/modules/$kver" ] || die "$pkg has no lib/modules/$kver"
  extract_vmlinux "$work/x/boot/vmlinuz-$kver" "$work/vmlinux"
  prepare_modules "$work/x" "$kver"
  mkdir -p "$work/out/lib/modules"
  mv "$work/vmlinux" "$work/out/vmlinux"
  mv "$work/x/boot/config-$kver" "$work/out/config"
  mv "$work/x/lib/modules/$kver" "$work/out/lib/modules/$kver"
  touch "$work/out/.complete"
  rm -rf "$dir"
  mv "$work/out" "$dir"
  log "cached $kver in $dir"
fi

if [ -n "$pkg" ] && [ "$(cat "$resolved" 2>/dev/null)" != "$pkg" ]; then
  echo "$pkg" >"$resolved.tmp" && mv "$resolved.tmp" "$resolved"
fi

echo "KERNEL=$dir/vmlinux"
echo "MODULES=$dir/lib/modules/$kver"
