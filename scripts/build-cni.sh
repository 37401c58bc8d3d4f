#!/usr/bin/env bash
# Builds the tc-redirect-tap CNI plugin from its pinned module version into
#   ${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/cni/bin/
# and prints that directory as its last line.
#
# tc-redirect-tap is not packaged by Debian. It is built from a throwaway
# module that requires the pinned version, because `go install pkg@version`
# can fail on the module proxy's deprecation lookup.
#
# Idempotent: when the binary for the pinned version is already in the cache,
# nothing is downloaded or built.
set -euo pipefail

module=github.com/awslabs/tc-redirect-tap
version=v0.0.0-20211025175357-e30dfca224c2
go_bin="${GO:-go}"

cache="${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/cni"
bin="$cache/bin"
stamp="$bin/.tc-redirect-tap.version"

log() { echo "build-cni: $*" >&2; }

if [ -x "$bin/tc-redirect-tap" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "building $module@$version"
cat >"$work/go.mod" <<EOF
module fireactions.local/build-cni

go 1.21

require $module $version
EOF
(
  cd "$work"
  # -mod=mod fills go.sum for exactly the pinned graph; no version lookups.
  CGO_ENABLED=0 "$go_bin" build -mod=mod -trimpath -o "$work/tc-redirect-tap" \
    "$module/cmd/tc-redirect-tap"
)
# Replace atomically so a concurrent reader never sees a partial binary.
install -m 0755 "$work/tc-redirect-tap" "$bin/.tc-redirect-tap.tmp"
mv -f "$bin/.tc-redirect-tap.tmp" "$bin/tc-redirect-tap"
echo "$version" >"$stamp"
log "installed $bin/tc-redirect-tap"
echo "$bin"
