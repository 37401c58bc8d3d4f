#!/bin/sh
# Usage: check-config.sh DOTCONFIG FRAGMENT...
#
# Checks that every option a fragment sets came out of Kconfig as written:
# `make allnoconfig KCONFIG_ALLCONFIG=...` silently drops an option whose
# dependencies are not met or whose name no longer exists. Lists every
# option that differs and exits 1 if there is any.
set -eu

if [ $# -lt 2 ]; then
	echo "usage: $0 DOTCONFIG FRAGMENT..." >&2
	exit 2
fi
dotconfig=$1
shift

bad=0
for fragment in "$@"; do
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*)
			name=${line%%=*}
			got=$(grep -E "^$name=|^# $name is not set" "$dotconfig" || true)
			if [ "$got" != "$line" ]; then
				echo "$fragment: want $line, got ${got:-nothing (unknown option or unmet dependency)}" >&2
				bad=1
			fi
			;;
		"# CONFIG_"*" is not set")
			name=${line#\# }
			name=${name%% *}
			if grep -q -E "^$name=" "$dotconfig"; then
				echo "$fragment: want $line, got $(grep -E "^$name=" "$dotconfig")" >&2
				bad=1
			fi
			;;
		esac
	done <"$fragment"
done
exit $bad
