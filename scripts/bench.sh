#!/usr/bin/env bash
# The benchmark command:  sudo scripts/bench.sh [OPTIONS]
#
# Same as `sudo cargo bench --bench natmap -- [OPTIONS]`, but finds cargo when
# sudo has reset PATH and hands target/ back to the invoking user afterwards.
# Root is required: the bench creates network namespaces, runs the natmap
# daemon on both firewall backends and writes iptables and nftables rules, all
# inside its own namespaces (nothing on the host changes). It ends with every
# target of issue 13, MET or NOT MET. Options (--out FILE, --sizes,
# --backends nftables,nft,legacy, --no-packet, ...): see
# `scripts/bench.sh --help` and docs/performance.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# shellcheck source=scripts/lib.sh
. "${REPO}/scripts/lib.sh"

if [[ ${EUID} -ne 0 ]]; then
	printf 'scripts/bench.sh must run as root: the benchmark creates network namespaces,\n' >&2
	printf 'runs the natmap daemon and writes iptables and nftables rules inside them. Run:\n\n    sudo %s' "$0" >&2
	(($#)) && printf ' %q' "$@" >&2
	printf '\n\n' >&2
	exit 1
fi

cd "${REPO}"
ensure_cargo
trap 'return_target_to_sudo_user "${REPO}"' EXIT
cargo bench --bench natmap -- "$@"
