#!/usr/bin/env bash
# Usage: nix/kernel/check-on-debian.sh [ARCH]   (ARCH: x86_64, the default, or aarch64)
#
# Applies the guest kernel fragments to Debian's kernel source the way
# nix/packages/guest-kernel.nix applies them to nixpkgs' (make allnoconfig
# KCONFIG_ALLCONFIG=...) and runs check-config.sh on the result, without
# Nix. Debian 12 ships Linux 6.1; the Nix package builds 6.12, so this
# catches a fragment option that does not exist or whose dependencies are
# missing, not a change between the two versions.
#
# Needs the Debian packages linux-source-6.1, flex, bison, gcc, make, bc.
# The source is unpacked once into ${FIREACTIONS_CACHE:-~/.cache/fireactions}/linux-source.
set -euo pipefail

arch=${1:-x86_64}
case $arch in
x86_64) karch=x86_64 ;;
aarch64) karch=arm64 ;;
*)
	echo "unknown architecture $arch; use x86_64 or aarch64" >&2
	exit 2
	;;
esac

here=$(cd "$(dirname "$0")" && pwd)
tarball=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$tarball" ]; then
	echo "no /usr/src/linux-source-*.tar.xz: apt-get install linux-source-6.1 flex bison" >&2
	exit 1
fi
for tool in flex bison gcc make bc; do
	command -v "$tool" >/dev/null || {
		echo "$tool is missing: apt-get install $tool" >&2
		exit 1
	}
done
if [ "$karch" = arm64 ] && ! command -v aarch64-linux-gnu-gcc >/dev/null; then
	echo "aarch64 needs a cross compiler for Kconfig's compiler checks: apt-get install gcc-aarch64-linux-gnu" >&2
	exit 1
fi

cache="${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/linux-source"
name=$(basename "$tarball" .tar.xz)
src="$cache/$name"
if [ ! -f "$src/.unpacked" ]; then
	rm -rf "$src"
	mkdir -p "$cache"
	tar -C "$cache" -xf "$tarball"
	touch "$src/.unpacked"
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fragments=("$here/guest.config" "$here/guest-$arch.config")
cat "${fragments[@]}" >"$out/fragment.config"
cross=()
[ "$karch" = arm64 ] && cross=(CROSS_COMPILE=aarch64-linux-gnu-)
make -s -C "$src" O="$out" ARCH="$karch" "${cross[@]}" KCONFIG_ALLCONFIG="$out/fragment.config" allnoconfig >/dev/null
sh "$here/check-config.sh" "$out/.config" "${fragments[@]}"
echo "$name ($arch): every option of ${fragments[*]##*/} is set as written"
