#!/usr/bin/env bash
# Make a Debian 12 machine ready to build and test natmap (see DESIGN.md §8).
#
# Idempotent and cheap on a ready machine: every step checks first and only acts
# on what is missing. Assumes root, reachable Debian package mirrors and nothing
# else (no Docker Hub, no internet), and no systemd as PID 1 unless detected.
#
#   scripts/deps.sh                   everything: tools, Docker engine, test image
#   scripts/deps.sh --no-docker       tools only; no docker.io, no engine, no image
#   scripts/deps.sh --runtime         what building and running the daemon needs:
#                                     no busybox-static, no test image
#                                     (the Docker engine unless --no-docker too)
#
# Prints one line per step. Exits non-zero, with the reason, if a step fails.
set -euo pipefail

readonly IMAGE=natmap-test-busybox:latest
# The static busybox shipped by Debian's busybox-static. The image has no libc,
# so a dynamically linked busybox (package `busybox`) would not run in it.
readonly BUSYBOX=/bin/busybox
readonly DOCKERD_LOG=/var/log/natmap-test-dockerd.log
readonly DOCKERD_PIDFILE=/run/docker.pid
readonly DOCKER_WAIT_SECS=60
readonly APT_LOG=/var/log/natmap-deps-apt.log
readonly LOCK_FILE=/run/natmap-deps.lock
readonly IMAGE_LABEL=org.natmap.test-image.inputs
readonly TEST_IMAGE_RECIPE=1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UDP_ECHO_SRC="${SCRIPT_DIR}/test-image/udp-echo.c"

with_docker=1
with_test_tools=1

usage() {
	sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

while (($#)); do
	case "$1" in
	--no-docker) with_docker=0 ;;
	--runtime) with_test_tools=0 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		printf 'deps: unknown argument: %s\n' "$1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done

log() { printf 'deps: %s\n' "$*"; }
die() {
	printf 'deps: ERROR: %s\n' "$*" >&2
	exit 1
}

[[ ${EUID} -eq 0 ]] || die "must run as root (apt-get, modprobe, dockerd): sudo $0"

# iptables, ip, conntrack and dockerd live in sbin, which a plain `su` or a CI
# runner may leave off PATH. Append, so an operator's /usr/local/bin still wins.
PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
export PATH

# test.sh and .ci/run both call us, and CI may run jobs side by side: serialise so
# two runs never race to start two dockerds or import the image twice. flock comes
# from util-linux, which is Essential on Debian, so it is there before step 1.
if command -v flock >/dev/null 2>&1; then
	exec 9>"${LOCK_FILE}"
	flock -w 600 9 || die "could not take ${LOCK_FILE} within 600 s (another deps.sh stuck?)"
fi

have() { command -v "$1" >/dev/null 2>&1; }

pkg_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null || true)" == ii* ]]
}

systemd_is_pid1() {
	# /run/systemd/system is sd_booted(3)'s test; PID 1's name guards against a
	# container that has the host's /run/systemd bind-mounted.
	[[ -d /run/systemd/system ]] && [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]
}

# ---------------------------------------------------------------------------
# 1. Packages. Decide per command which package is missing, then install only
# those: installing the whole list would drag docker.io onto a host that runs
# Docker CE (the two conflict, and apt -y would remove docker-ce).
# ---------------------------------------------------------------------------
step_packages() {
	local -a missing=() pkgs=()
	local -A want=()
	local cmd pkg
	local -A cmd_pkg=(
		[iptables]=iptables [ip6tables]=iptables [iptables-restore]=iptables
		[ip]=iproute2 [conntrack]=conntrack [flock]=util-linux [ps]=procps
		[modprobe]=kmod [systemd-analyze]=systemd
		# `daemon --backend nftables` applies its table with `nft -f -`.
		[nft]=nftables
	)
	if ((with_docker)); then
		cmd_pkg[dockerd]=docker.io
		cmd_pkg[docker]=docker.io
	fi
	for cmd in "${!cmd_pkg[@]}"; do
		if ! have "${cmd}"; then
			missing+=("${cmd}")
			want[${cmd_pkg[${cmd}]}]=1
		fi
	done
	# rustc links through `cc` and needs glibc's crt files and libc.a from
	# libc6-dev (the test image's udp-echo is linked statically against it).
	if ! have cc; then
		missing+=(cc)
		want[gcc]=1
	fi
	if ! pkg_installed libc6-dev; then
		missing+=(libc6-dev)
		want[libc6-dev]=1
	fi
	# Check the package, not `command -v busybox`: the dynamic `busybox` package
	# also provides /bin/busybox, and that one cannot run inside the image.
	if ((with_test_tools)) && { ! pkg_installed busybox-static || [[ ! -x ${BUSYBOX} ]]; }; then
		missing+=("${BUSYBOX}(static)")
		want[busybox-static]=1
	fi
	if [[ -n "${want[docker.io]:-}" ]] && pkg_installed docker-ce; then
		die "docker-ce is installed but ${missing[*]} missing; fix that install (docker.io would conflict with it)"
	fi
	if ((${#missing[@]} == 0)); then
		log "packages: all present, nothing to install"
		return 0
	fi
	for pkg in "${!want[@]}"; do pkgs+=("${pkg}"); done
	log "packages: missing ${missing[*]}; installing ${pkgs[*]} (apt log: ${APT_LOG})"
	export DEBIAN_FRONTEND=noninteractive
	# One `apt-get update`, and only now: a fresh image has empty package lists,
	# and a ready machine never gets here.
	if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >>"${APT_LOG}" 2>&1; then
		tail -n 25 "${APT_LOG}" >&2
		die "apt-get failed (full log: ${APT_LOG})"
	fi
	for cmd in "${missing[@]}"; do
		[[ ${cmd} == *"(static)" || ${cmd} == libc6-dev ]] && continue
		have "${cmd}" || die "installed ${pkgs[*]} but ${cmd} is still missing"
	done
	log "packages: installed ${pkgs[*]}"
}

# ---------------------------------------------------------------------------
# 2. Kernel modules. Best effort: in a container or on a kernel with everything
# built in, modprobe fails and that is fine; the tests report what is really
# missing (e.g. IPv6 NAT, DESIGN.md §4). br_netfilter is deliberately NOT loaded:
# it sends bridged traffic through iptables and changes what the tests measure.
# ---------------------------------------------------------------------------
step_modules() {
	# nf_nat/nft_chain_nat/xt_MASQUERADE: the nft backend's NAT chains and the
	# hairpin MASQUERADE; the rest are the tables and matches natmap renders.
	local -a mods=(nf_conntrack nf_nat iptable_nat ip6table_nat nft_chain_nat
		xt_conntrack xt_multiport xt_comment xt_addrtype xt_MASQUERADE
		nft_fib_inet nft_fib_ipv4 nft_fib_ipv6 nft_nat nft_ct)
	if ! have modprobe; then
		log "modules: modprobe not available; skipped"
		return 0
	fi
	if [[ ! -e /proc/modules ]]; then
		log "modules: kernel has no loadable module support (no /proc/modules); skipped"
		return 0
	fi
	local -a loaded=() present=() unavailable=()
	local m
	for m in "${mods[@]}"; do
		if [[ -d /sys/module/${m} ]]; then
			present+=("${m}")
		elif modprobe -q "${m}" 2>/dev/null; then
			loaded+=("${m}")
		else
			unavailable+=("${m}")
		fi
	done
	log "modules: loaded [${loaded[*]}] already present [${present[*]}] unavailable, ignored [${unavailable[*]}]"
}

# ---------------------------------------------------------------------------
# 3. A Docker engine that answers.
# ---------------------------------------------------------------------------
docker_answers() {
	# timeout: a wedged engine can accept the connection and never reply.
	timeout 10 docker info >/dev/null 2>&1
}

# PID of a live dockerd named by the default pid file, if any.
running_dockerd_pid() {
	local pid
	[[ -s ${DOCKERD_PIDFILE} ]] || return 1
	pid="$(<"${DOCKERD_PIDFILE}")"
	[[ ${pid} =~ ^[0-9]+$ ]] || return 1
	[[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == dockerd ]] || return 1
	printf '%s\n' "${pid}"
}

step_docker_engine() {
	if docker_answers; then
		log "docker: engine answers ($(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null || echo 'version unknown'))"
		return 0
	fi

	local pid="" how log_start=0
	if systemd_is_pid1; then
		how="ran systemctl start docker"
		systemctl start docker || true # the wait below reports the failure
	elif pid="$(running_dockerd_pid)"; then
		# Started by someone else moments ago and still initialising: a second
		# dockerd would only fail on the pid file. Wait for this one.
		how="dockerd pid ${pid} is already running, not starting another"
	else
		how="started dockerd in the background, log ${DOCKERD_LOG}"
		# Remember where this attempt starts, to show only its own lines on failure.
		log_start="$(stat -c %s "${DOCKERD_LOG}" 2>/dev/null || echo 0)"
		printf '\n==== %s deps.sh: starting dockerd ====\n' "$(date -Is)" >>"${DOCKERD_LOG}"
		# Not under systemd, so detach it ourselves: setsid so a Ctrl-C on the
		# terminal running the tests does not reach it (Go re-enables the SIGINT
		# that bash ignores for background jobs), nohup for the hangup, cwd / so
		# it does not pin the checkout. Every inherited fd above 2 is closed: our
		# lock (fd 9) would otherwise be held for ever, and a pipe passed down by
		# a CI runner would keep the job from ever seeing EOF.
		(
			cd /
			for fd_path in "/proc/${BASHPID}/fd/"*; do
				fd=${fd_path##*/}
				if [[ ${fd} =~ ^[0-9]+$ ]] && ((fd > 2)); then
					eval "exec ${fd}>&-"
				fi
			done
			exec setsid nohup dockerd </dev/null >>"${DOCKERD_LOG}" 2>&1
		) &
		pid=$!
	fi
	log "docker: engine not answering; ${how}; waiting up to ${DOCKER_WAIT_SECS}s"

	local waited
	for ((waited = 0; waited < DOCKER_WAIT_SECS; waited++)); do
		if docker_answers; then
			log "docker: engine answers after ${waited}s ($(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}' 2>/dev/null || echo 'version unknown'))"
			return 0
		fi
		# Fail at once instead of sleeping out the minute if it already died.
		if [[ -n ${pid} ]] && ! kill -0 "${pid}" 2>/dev/null; then
			break
		fi
		sleep 1
	done

	printf 'deps: ERROR: the Docker engine did not answer "docker info" (%s)\n' "${how}" >&2
	if [[ -n ${pid} ]] && ! kill -0 "${pid}" 2>/dev/null; then
		printf 'deps: dockerd (pid %s) exited\n' "${pid}" >&2
	fi
	if systemd_is_pid1; then
		journalctl -u docker --no-pager -n 40 >&2 || true
	else
		if ((log_start == 0)) && [[ ${how} == dockerd\ pid* ]]; then
			printf 'deps: that dockerd was not started by this script; its log may be elsewhere\n' >&2
		fi
		printf -- '---- %s (this attempt, last 40 lines) ----\n' "${DOCKERD_LOG}" >&2
		tail -c "+$((log_start + 1))" "${DOCKERD_LOG}" 2>/dev/null | tail -n 40 >&2 || true
	fi
	exit 1
}

# ---------------------------------------------------------------------------
# 4. The test image. No registry is reachable, so `docker pull busybox` is not an
# option: build a one-binary root filesystem from the host's static busybox and
# `docker import` it.
# ---------------------------------------------------------------------------
is_static() {
	local out
	if have file; then
		out="$(LC_ALL=C file -L "$1" 2>&1 || true)"
		[[ ${out} == *"statically linked"* || ${out} == *"static-pie linked"* ]]
	else
		# ldd is in libc-bin (Essential); it says so for a static binary.
		out="$(LC_ALL=C ldd "$1" 2>&1 || true)"
		[[ ${out} == *"not a dynamic executable"* || ${out} == *"statically linked"* ]]
	fi
}

# What the image is made of. Stored as a label, so that a busybox upgrade or an
# edit of udp-echo.c (or of the recipe: bump TEST_IMAGE_RECIPE) rebuilds it,
# while an unchanged machine pays one `docker image inspect`.
test_image_inputs() {
	local bb src
	bb="$(sha256sum "${BUSYBOX}" | cut -c1-16)"
	src="$(sha256sum "${UDP_ECHO_SRC}" | cut -c1-16)"
	printf 'recipe=%s busybox=%s udp-echo=%s\n' "${TEST_IMAGE_RECIPE}" "${bb}" "${src}"
}

step_test_image() {
	[[ -x ${BUSYBOX} ]] || die "image: ${BUSYBOX} missing (package busybox-static)"
	[[ -f ${UDP_ECHO_SRC} ]] || die "image: ${UDP_ECHO_SRC} missing (run this script from the checkout)"
	local want have_inputs old_id=""
	want="$(test_image_inputs)"
	have_inputs="$(docker image inspect --format "{{ index .Config.Labels \"${IMAGE_LABEL}\" }}" "${IMAGE}" 2>/dev/null || true)"
	if [[ ${have_inputs} == "${want}" ]]; then
		log "image: ${IMAGE} present and up to date"
		return 0
	fi
	# Empty when there is no image yet; else the one this build supersedes.
	old_id="$(docker image inspect --format '{{.Id}}' "${IMAGE}" 2>/dev/null || true)"
	is_static "${BUSYBOX}" || die "image: ${BUSYBOX} is not statically linked; install busybox-static (it replaces the dynamic busybox)"

	local tmp
	tmp="$(mktemp -d /tmp/natmap-image.XXXXXX)"
	# shellcheck disable=SC2064 # expand now: tmp is local and gone by EXIT time
	trap "rm -rf '${tmp}'" EXIT
	local root="${tmp}/rootfs"
	mkdir -p "${root}"/{bin,etc,www,root,proc,sys,dev,tmp,var/tmp}
	chmod 1777 "${root}/tmp" "${root}/var/tmp"
	cp "${BUSYBOX}" "${root}/bin/busybox"
	chmod 0755 "${root}/bin/busybox"

	# Every applet as a symlink in /bin, so tests can run `httpd`, `nc`, `ip`...
	# directly. `--list` comes from the binary itself, so it always matches it.
	local -a applets
	mapfile -t applets < <("${BUSYBOX}" --list)
	local a
	for a in "${applets[@]}"; do
		[[ -n ${a} && ${a} != busybox && ${a} != */* ]] || continue
		ln -s busybox "${root}/bin/${a}"
	done
	for a in sh httpd nc sleep ip ifconfig cat echo ls hostname wget; do
		[[ -L ${root}/bin/${a} ]] || die "image: ${BUSYBOX} lacks the applet '${a}' the tests need"
	done

	# Debian's busybox has no UDP server (its nc lacks -u; no udpsvd), so the UDP
	# target is a tiny static C program. The image has no libc: link statically.
	if ! cc -static -O2 -s -Wall -Wextra -Werror -o "${root}/bin/udp-echo" "${UDP_ECHO_SRC}" 2>"${tmp}/cc.log"; then
		cat "${tmp}/cc.log" >&2
		die "image: compiling ${UDP_ECHO_SRC} failed (needs gcc and libc6-dev)"
	fi
	is_static "${root}/bin/udp-echo" || die "image: udp-echo came out dynamically linked"

	# Just enough for `id`, `whoami` and `httpd -u` to resolve names.
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"${root}/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"${root}/etc/group"

	# Imported images carry no ENV; set PATH so `docker exec ID sh` works too.
	if ! tar -C "${root}" --numeric-owner --owner=0 --group=0 -cf - . |
		docker import \
			--change 'CMD ["/bin/sh"]' \
			--change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
			--change "LABEL ${IMAGE_LABEL}=\"${want}\"" \
			--message "natmap test image: ${BUSYBOX} (${#applets[@]} applets) + udp-echo" \
			- "${IMAGE}" >/dev/null; then
		die "image: docker import of ${IMAGE} failed (see the engine's message above)"
	fi
	rm -rf "${tmp}"
	trap - EXIT

	if ! docker run --rm --network none "${IMAGE}" /bin/busybox true; then
		docker image rm "${IMAGE}" >/dev/null 2>&1 || true
		die "image: ${IMAGE} was imported but does not run; removed it"
	fi
	# The superseded image is now untagged; drop it unless a container still uses it.
	if [[ -n ${old_id} && ${old_id} != "$(docker image inspect --format '{{.Id}}' "${IMAGE}")" ]]; then
		docker image rm "${old_id}" >/dev/null 2>&1 || true
	fi
	log "image: built ${IMAGE} (${#applets[@]} busybox applets + udp-echo${old_id:+, inputs changed}) and checked it runs"
}

# ---------------------------------------------------------------------------
# 5. Rust. Informational only: Debian 12's rustc (1.63) is older than the crate's
# rust-version and the toolchain servers are not reachable, so this script cannot
# install it. test.sh also looks in ~/.cargo/bin.
# ---------------------------------------------------------------------------
step_toolchain() {
	if have cargo; then
		log "toolchain: $(cargo --version 2>/dev/null || echo 'cargo (version unknown)')"
	else
		log "toolchain: cargo not on PATH here (test.sh also looks in ~/.cargo/bin, /root/.cargo/bin, /usr/local/cargo/bin)"
	fi
}

step_packages
step_modules
if ((with_docker)); then
	step_docker_engine
	if ((with_test_tools)); then
		step_test_image
	else
		log "image: skipped (--runtime)"
	fi
else
	log "docker: skipped (--no-docker)"
fi
step_toolchain
log "done"
