#!/usr/bin/env bash
# Runs every Go fuzz target in the module for FUZZTIME each (a duration such
# as 2m, or a count of inputs such as 20000x; default 10s).
# `make test` runs them briefly; `make fuzz` runs them longer.
set -euo pipefail
fuzztime=${FUZZTIME:-10s}
status=0
targets=$(git grep -o -E '^func Fuzz[A-Za-z0-9_]+\(' -- '*_test.go' |
  sed -E 's/^([^:]+):func (Fuzz[A-Za-z0-9_]+)\(/\1 \2/' | sort -u || true)
while read -r file func; do
  [ -n "$file" ] || continue
  pkg=./$(dirname "$file")
  echo "fuzz $pkg $func ($fuzztime)"
  go test -run='^$' -fuzz="^${func}\$" -fuzztime="$fuzztime" "$pkg" || status=1
done <<<"$targets"
exit $status
