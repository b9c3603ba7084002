#!/usr/bin/env bash
# Build the lab-ops Debian package with cargo-deb and check what it contains:
#
#   packaging/build-deb.sh [CARGO_DEB_ARGS...]     e.g. --no-build to reuse
#                                                 target/release/lab-ops
#
# Needs cargo-deb (cargo install cargo-deb --locked) and dpkg-deb. Builds a
# release binary (lto: a few minutes), writes target/debian/lab-ops_*.deb,
# then fails unless:
#   - the data lists ./usr/bin/lab-ops (mode 0755) and
#     ./usr/lib/systemd/system/natmap.service;
#   - the packaged unit is packaging/deb/natmap.service byte for byte and
#     points ExecStart at /usr/bin/lab-ops;
#   - the control part has a postinst that creates the natmap group and
#     enables the unit, a prerm that stops it and a postrm;
#   - the packaged binary runs (lab-ops --version).
# Prints the `dpkg -c` listing and the control fields.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly OUT_DIR="${REPO}/target/debian"

log() { printf 'build-deb: %s\n' "$*"; }
die() {
	printf 'build-deb: ERROR: %s\n' "$*" >&2
	exit 1
}

PATH="${PATH}:${HOME:-/root}/.cargo/bin:/usr/local/cargo/bin"
cargo deb --version >/dev/null 2>&1 || die "cargo-deb is not installed; install it with: cargo install cargo-deb --locked"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (package dpkg)"

cd "${REPO}"
mkdir -p "${OUT_DIR}"
log "cargo deb --locked -o ${OUT_DIR} $*"
deb="$(cargo deb --locked -o "${OUT_DIR}" "$@" | tail -n 1)"
[[ -f ${deb} ]] || die "cargo deb did not report a package file (got: ${deb})"
log "built ${deb}"

tmp="$(mktemp -d /tmp/lab-ops-deb.XXXXXX)"
trap 'rm -rf "${tmp}"' EXIT

printf '\n==== dpkg -c %s ====\n' "${deb##*/}"
dpkg -c "${deb}" | tee "${tmp}/listing"
printf '\n==== dpkg -I %s ====\n' "${deb##*/}"
dpkg -I "${deb}" | tee "${tmp}/info"
echo

fail=0
check() {
	if eval "$2"; then
		log "ok: $1"
	else
		printf 'build-deb: FAILED: %s\n' "$1" >&2
		fail=1
	fi
}

check "binary ./usr/bin/lab-ops, mode 0755" \
	"grep -Eq '^-rwxr-xr-x .* \\./usr/bin/lab-ops$' '${tmp}/listing'"
check "unit ./usr/lib/systemd/system/natmap.service" \
	"grep -Eq ' \\./usr/lib/systemd/system/natmap\\.service$' '${tmp}/listing'"
check "no /usr/local in the package (that is for natmap install)" \
	"! grep -q '/usr/local' '${tmp}/listing'"

dpkg-deb -x "${deb}" "${tmp}/root"
dpkg-deb -e "${deb}" "${tmp}/control"
check "packaged unit is packaging/deb/natmap.service" \
	"cmp -s '${tmp}/root/usr/lib/systemd/system/natmap.service' packaging/deb/natmap.service"
check "packaged unit runs /usr/bin/lab-ops" \
	"grep -q '^ExecStart=/usr/bin/lab-ops natmap ' '${tmp}/root/usr/lib/systemd/system/natmap.service'"
check "postinst creates the natmap group" \
	"grep -q 'groupadd --system natmap' '${tmp}/control/postinst'"
check "postinst enables and starts natmap.service" \
	"grep -q 'deb-systemd-helper enable natmap.service' '${tmp}/control/postinst' && grep -q 'deb-systemd-invoke' '${tmp}/control/postinst'"
check "the group is created before the unit starts" \
	"(( \$(grep -n 'groupadd --system natmap' '${tmp}/control/postinst' | cut -d: -f1 | head -n1) < \$(grep -n 'deb-systemd-invoke' '${tmp}/control/postinst' | cut -d: -f1 | head -n1) ))"
check "prerm stops natmap.service" \
	"grep -q 'deb-systemd-invoke stop natmap.service' '${tmp}/control/prerm'"
check "postrm purges the state and the unit's state" \
	"grep -q 'rm -rf /var/lib/natmap' '${tmp}/control/postrm' && grep -q 'deb-systemd-helper purge natmap.service' '${tmp}/control/postrm'"
scripts_ok() {
	local s
	for s in postinst prerm postrm; do
		[[ -x ${tmp}/control/${s} ]] && sh -n "${tmp}/control/${s}" || return 1
	done
}
check "maintainer scripts are executable and valid sh" scripts_ok
check "depends on iptables" "grep -q '^ Depends:.*iptables' '${tmp}/info'"
check "packaged binary runs" \
	"'${tmp}/root/usr/bin/lab-ops' --version | grep -q '^lab-ops '"

((fail == 0)) || die "package checks failed (see above)"
log "all checks passed: ${deb}"
