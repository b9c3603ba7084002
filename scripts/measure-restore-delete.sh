#!/usr/bin/env bash
# What one rule change costs iptables-restore at large N, by chain layout:
#
#   sudo scripts/measure-restore-delete.sh [N] [SHARDS] [ROUNDS]   (default 20000 128 3)
#
# In a network namespace of its own (deleted on exit), loads N DNAT lines
# shaped like natmap's into one nat chain, then times single-line
# `iptables-restore --noflush` transactions: delete by full spec (what natmap
# sends), delete by rule number, append. Then the same N lines spread over
# SHARDS sub-chains jumped to from the parent, and the same delete and
# append in one sub-chain. Prints the median of ROUNDS per operation, in ms.
# docs/reliability.md (item 8) has the figures and what they mean.
set -euo pipefail

readonly N="${1:-20000}" SHARDS="${2:-128}" ROUNDS="${3:-3}"
if [[ ${EUID} -ne 0 ]]; then
	printf 'must run as root (creates a network namespace): sudo %s\n' "$0" >&2
	exit 1
fi
NS="natmap-measure-$$"
readonly NS
WORK="$(mktemp -d)"
readonly WORK
ip netns add "${NS}"
trap 'ip netns del "${NS}"; rm -rf "${WORK}"' EXIT

# natmap's rendering of dnat rule I in chain CHAIN.
line() {
	local i=$1 chain=$2 p=$((10000 + $1 % 50000))
	printf -- '-A %s -d 192.0.%d.%d/32 -p tcp -m tcp --dport %d -m comment --comment natmap:dnat:%d -j DNAT --to-destination 198.51.100.2:%d\n' \
		"${chain}" $((i / 250)) $((i % 250 + 1)) "${p}" "${i}" "${p}"
}
spec() { line "$1" X | cut -d' ' -f3-; }

restore() { ip netns exec "${NS}" iptables-restore --noflush; }
# Median wall time in ms of ROUNDS runs of: restore <<< "*nat\n$1\nCOMMIT",
# each followed (untimed) by the transaction that undoes it, $2.
timed() {
	local do=$1 undo=$2 r s times=()
	for ((r = 0; r < ROUNDS; r++)); do
		s=$(date +%s%N)
		printf '*nat\n%s\nCOMMIT\n' "${do}" | restore
		times+=($((($(date +%s%N) - s) / 1000000)))
		printf '*nat\n%s\nCOMMIT\n' "${undo}" | restore
	done
	printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((ROUNDS + 1) / 2))p"
}

{
	printf '*nat\n:NATMAP - [0:0]\n'
	for ((i = 1; i <= N; i++)); do line "${i}" NATMAP; done
	printf 'COMMIT\n'
} >"${WORK}/flat"
restore <"${WORK}/flat"
mid=$((N / 2))
s=$(spec "${mid}")
flat_spec=$(timed "-D NATMAP ${s}" "-I NATMAP ${mid} ${s}")
flat_num=$(timed "-D NATMAP ${mid}" "-I NATMAP ${mid} ${s}")
flat_add=$(timed "-A NATMAP $(spec $((N + 1)))" "-D NATMAP $((N + 1))")

{
	printf '*nat\n:NATMAP - [0:0]\n'
	for ((k = 0; k < SHARDS; k++)); do printf ':NATMAP-%d - [0:0]\n' "${k}"; done
	for ((k = 0; k < SHARDS; k++)); do printf -- '-A NATMAP -j NATMAP-%d\n' "${k}"; done
	for ((i = 1; i <= N; i++)); do line "${i}" "NATMAP-$((i % SHARDS))"; done
	printf 'COMMIT\n'
} >"${WORK}/sharded"
# Not --noflush: replaces the flat layout.
ip netns exec "${NS}" iptables-restore <"${WORK}/sharded"
k=$((mid % SHARDS))
shard_spec=$(timed "-D NATMAP-${k} ${s}" "-A NATMAP-${k} ${s}")
shard_add=$(timed "-A NATMAP-${k} $(spec $((N + 1)))" "-D NATMAP-${k} $(spec $((N + 1)))")

printf '[restore] %s, N=%d, one chain: delete by spec %s ms, delete by number %s ms, append %s ms\n' \
	"$(iptables --version)" "${N}" "${flat_spec}" "${flat_num}" "${flat_add}"
printf '[restore] N=%d in %d sub-chains (~%d lines each): delete by spec %s ms, append %s ms (load average %s)\n' \
	"${N}" "${SHARDS}" $((N / SHARDS)) "${shard_spec}" "${shard_add}" "$(cut -d' ' -f1-3 /proc/loadavg)"
