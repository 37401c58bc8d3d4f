#!/usr/bin/env bash
# Image engine benchmark (part of `make bench`): a Debian bookworm minbase
# image, built once with debootstrap and cached, served by a local
# docker-registry; then, in one run, fireactions' cold pull + conversion,
# the seed driver's skopeo/umoci/mkfs.ext4 pipeline, the decompression
# floor, a warm pull and scratch disk creation (bench/image/main.go).
#
# Needs root (debootstrap, and umoci/mkfs keep owners only as root) and
# the Debian packages debootstrap, docker-registry, skopeo, umoci and
# e2fsprogs (scripts/deps.sh installs them).
#   FIREACTIONS_CACHE  cache directory (default ~/.cache/fireactions)
#   BENCH_RUNS         runs of each cold pipeline (default 3)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/bench
runs=${BENCH_RUNS:-3}
mkdir -p "$cache"

if [ "$(id -u)" -ne 0 ]; then
  echo "bench/image/run.sh: needs root (debootstrap, and the seed pipeline keeps owners only as root)" >&2
  exit 1
fi
for tool in debootstrap docker-registry skopeo umoci mkfs.ext4 go; do
  command -v "$tool" >/dev/null || { echo "bench/image/run.sh: $tool not found; run scripts/deps.sh" >&2; exit 1; }
done

# The Debian mirror apt uses on this machine.
mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /debian$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

tarball=$cache/minbase-bookworm.tar
if [ ! -f "$tarball" ]; then
  echo "building the Debian bookworm minbase root file system (once) from $mirror"
  rm -rf "$cache/minbase.tmp"
  debootstrap --variant=minbase bookworm "$cache/minbase.tmp" "$mirror" > "$cache/debootstrap.log" 2>&1 ||
    { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  tar --numeric-owner --xattrs -C "$cache/minbase.tmp" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$cache/minbase.tmp"
fi
if [ ! -f "$cache/top-layer.tar" ]; then
  # A small upper layer: a new file and a whiteout over the base.
  t=$(mktemp -d)
  mkdir -p "$t/etc" "$t/var/cache/debconf"
  echo "fireactions image benchmark" > "$t/etc/fireactions-bench"
  : > "$t/var/cache/debconf/.wh.templates.dat-old"
  tar --numeric-owner --owner=0 --group=0 -C "$t" -cf "$cache/top-layer.tar" etc var
  rm -rf "$t"
fi

# A local registry; its storage is cached, so the image is pushed once.
work=$(mktemp -d "${TMPDIR:-/tmp}/fireactions-bench.XXXXXX")
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=$((20000 + RANDOM % 40000))
while listening "$port"; do port=$((20000 + RANDOM % 40000)); done
cat > "$work/registry.yml" <<CFG
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $cache/registry
http:
  addr: 127.0.0.1:$port
  secret: fireactions-bench
CFG
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
trap 'kill $registry_pid 2>/dev/null; wait $registry_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  listening "$port" && break
  sleep 0.1
done
listening "$port" || { cat "$work/registry.log" >&2; echo "bench/image/run.sh: docker-registry did not start" >&2; exit 1; }

cd "$root"
go run ./bench/image -rootfs-tar "$tarball" -registry "127.0.0.1:$port" -work "$work/runs" -runs "$runs"
