#!/usr/bin/env bash
# The demo (`make demo`, after `make deps build`):
#   1. fetch the guest kernel (scripts/test-kernel.sh, cached);
#   2. build a small OCI image from Debian's busybox-static, with no Docker
#      and no internet (scripts/demoimage), and push it to Debian's
#      docker-registry on 127.0.0.1;
#   3. run it as a microVM with `fireactions vm run`, twice: the first run
#      pulls and converts the image, the second boots from the cache;
#   4. show the bootstrap on the seed's example pools.json, with a
#      throwaway GitHub App key.
# Everything lives in a temporary directory that is removed on exit, with
# the registry process.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/bin
tmp=$(mktemp -d /tmp/fireactions-demo.XXXXXX)
registry_pid=""

cleanup() {
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  # A VM left by an interrupted run (the data directory is the demo's own).
  "$bin/fireactions" --config "$tmp/none.yaml" --data-dir "$tmp/data" vm ls >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fs", b - a }'; }

for b in fireactions fireactions-init; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b missing: run make build" >&2; exit 1; }
done

step "Guest kernel (Debian's cloud kernel, cut down to a PVH vmlinux)"
kernel_env=$("$root/scripts/test-kernel.sh" | tail -n 2)
eval "$kernel_env"
echo "kernel:  $KERNEL"
echo "modules: $MODULES"

step "Local registry (Debian's docker-registry) on 127.0.0.1"
free_port() {
  local p
  for p in $(seq 5100 5999); do
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  return 1
}
port=$(free_port)
cat >"$tmp/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $tmp/registry
http:
  addr: 127.0.0.1:$port
  secret: fireactions-demo
EOF
docker-registry serve "$tmp/registry.yml" >"$tmp/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
echo "registry: http://127.0.0.1:$port (pid $registry_pid)"

step "Demo image from /bin/busybox (no Docker, no internet)"
image=127.0.0.1:$port/demo:latest
(cd "$root" && go run ./scripts/demoimage --busybox /bin/busybox --push "$image")

fa() { "$bin/fireactions" --config "$tmp/none.yaml" --data-dir "$tmp/data" "$@"; }
export FIREACTIONS_KERNEL=$KERNEL FIREACTIONS_KERNEL_MODULES=$MODULES

step "fireactions vm run --insecure $image   (first run: pull + convert + boot)"
t0=$(now)
fa vm run --insecure "$image"
t1=$(now)
first=$(took "$t0" "$t1")

step "fireactions vm run --insecure $image   (second run: the image is cached)"
t0=$(now)
fa vm run --insecure "$image"
t1=$(now)
second=$(took "$t0" "$t1")

step "A command of our own, and its exit code"
set +e
fa vm run --insecure -e GREETING=bonjour "$image" -- sh -c 'echo "$GREETING from $(hostname)"; exit 7'
code=$?
set -e
echo "exit code: $code"

echo
echo "first run (pull, convert, boot, run):  $first"
echo "second run (cached image, boot, run):  $second"
echo "(the \"workload started\" lines give the guest's boot time, and pull= the image's: converted once, then cached)"

step "Bootstrap on the seed's example (examples/pools.json, throwaway App key)"
mkdir -p "$tmp/input"
cp "$root/examples/pools.json" "$tmp/input/pools.json"
echo 123456 >"$tmp/input/github-app-id"
openssl genrsa -out "$tmp/input/github-private-key.pem" 2048 2>/dev/null
fa bootstrap --input-dir "$tmp/input" --output "$tmp/config.yaml"
fa validate --config "$tmp/config.yaml" --check-files=false
echo "--- the pools of $tmp/config.yaml (the key is a secret: not shown)"
sed -n '/^pools:/,$p' "$tmp/config.yaml" | head -n 30
