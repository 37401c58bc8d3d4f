#!/usr/bin/env bash
# Builds a Nomad agent (v1.10.5) from the Go module proxy and caches it as
#   ${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/nomad/nomad-<version>
# printing that path as its last line. The end-to-end tests of the
# firecracker-task-driver (internal/nomad, `make e2e-nomad`) run it.
#
# Why a wrapper module: Nomad's go.mod has replace directives, so
# `go install github.com/hashicorp/nomad@v1.10.5` is refused. A throwaway
# module that requires the agent, pins the matching api pseudo-version and
# repeats Nomad's own hcl replace builds the real agent. go.sum is filled
# with `go list -mod=mod -deps` (not `go mod tidy`, which reaches for
# docker test-only packages), then the build runs with -mod=readonly.
#
# Idempotent: when the cached binary exists nothing is downloaded or built.
# Cold, on 2 cores, it takes about 8 minutes and ~2 GiB of module cache.
set -euo pipefail

version=v1.10.5
# The api module at the commit v1.10.5 was tagged from (Nomad builds its
# own ./api; this pseudo-version is the proxy's copy of that tree).
api_version=v0.0.0-20250909143645-a3b86c697f38
go_bin="${GO:-go}"

cache="${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/nomad"
out="$cache/nomad-$version"

log() { echo "nomad-agent: $*" >&2; }

if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
# One builder at a time: make test and make e2e-nomad may race.
exec 9>"$cache/.lock"
flock 9
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "building github.com/hashicorp/nomad@$version (several minutes on a cold module cache)"
cat >"$work/go.mod" <<EOF
module fireactions.local/nomad-agent

go 1.24.7

require (
	github.com/hashicorp/nomad $version
	github.com/hashicorp/nomad/api $api_version
)

replace (
	github.com/Microsoft/go-winio => github.com/endocrimes/go-winio v0.4.13-0.20190628114223-fb47a8b41948
	github.com/hashicorp/hcl => github.com/hashicorp/hcl v1.0.1-nomad-1
)
EOF

cd "$work"
# The agent's own main package is the module root.
GOFLAGS=-mod=mod "$go_bin" list -deps github.com/hashicorp/nomad >/dev/null
GOFLAGS=-mod=readonly "$go_bin" build -trimpath -o "$out.tmp" github.com/hashicorp/nomad
"$out.tmp" version >&2
mv "$out.tmp" "$out"
log "cached $out"
echo "$out"
