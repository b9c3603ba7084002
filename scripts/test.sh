#!/usr/bin/env bash
# The one test command:  sudo scripts/test.sh [EXTRA TEST ARGS...]
#
# Root is required: the integration tests build network namespaces, write real
# iptables rules and start Docker containers (DESIGN.md §8). Runs, in order:
#   scripts/deps.sh                       tools, Docker engine, test image
#   cargo fmt --all -- --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets -- --test-threads=4 [EXTRA TEST ARGS...]
# Extra arguments go to the test harness, e.g. a name filter:
#   sudo scripts/test.sh docker_        or   sudo scripts/test.sh --nocapture
#
# NATMAP_REQUIRE_PRIVILEGED=1 is exported, so a privileged test whose
# prerequisites are missing fails instead of quietly skipping.
# Exits non-zero if any step fails; fmt, clippy and test all run regardless,
# so one run shows every problem.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# shellcheck source=scripts/lib.sh
. "${REPO}/scripts/lib.sh"

if [[ ${EUID} -ne 0 ]]; then
	printf 'scripts/test.sh must run as root: the tests create network namespaces,\n' >&2
	printf 'iptables rules and Docker containers. Run:\n\n    sudo %s' "$0" >&2
	(($#)) && printf ' %q' "$@" >&2
	printf '\n\n' >&2
	exit 1
fi

cd "${REPO}"

# Under sudo, PATH has lost ~/.cargo/bin; find cargo before spending time on deps.
ensure_cargo
trap 'return_target_to_sudo_user "${REPO}"' EXIT

export NATMAP_REQUIRE_PRIVILEGED=1
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

declare -a summary=()
failed=0

# run NAME CMD...: run one step, time it, record ok/FAIL, never abort the script.
run() {
	local name=$1 start rc=0
	shift
	printf '\n==> %s: %s\n' "${name}" "$*"
	start=${SECONDS}
	"$@" || rc=$?
	if ((rc == 0)); then
		summary+=("ok    ${name} ($((SECONDS - start))s)")
	else
		summary+=("FAIL  ${name} (exit ${rc}, $((SECONDS - start))s)")
		failed=1
	fi
	return "${rc}"
}

print_summary() {
	printf '\n==> summary\n'
	printf '    %s\n' "${summary[@]}"
}

# Without the engine, the image or iptables, every later result is noise: stop.
if ! run deps bash "${REPO}/scripts/deps.sh"; then
	print_summary
	printf 'natmap tests: FAILED (dependencies could not be prepared)\n'
	exit 1
fi

run fmt cargo fmt --all -- --check || true
run clippy cargo clippy --all-targets -- -D warnings || true
run test cargo test --all-targets -- --test-threads=4 "$@" || true

print_summary
if ((failed)); then
	printf 'natmap tests: FAILED\n'
	exit 1
fi
printf 'natmap tests: all passed (fmt, clippy, test)\n'
