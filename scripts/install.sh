#!/usr/bin/env bash
# Install natmap and start its daemon on a Debian 12 machine:
#
#   sudo scripts/install.sh [--with-docker] [--binary PATH]
#
#   --with-docker   also install and start Debian's Docker engine (docker.io);
#                   without it natmap serves static rules and its Docker
#                   commands answer that Docker is unreachable.
#   --binary PATH   install this prebuilt lab-ops instead of building one.
#   --restart-only  start the already installed daemon again (used by
#                   scripts/test.sh after it paused natmap for the tests).
#
# Steps: runtime packages (scripts/deps.sh --runtime), `cargo build --release
# --locked`, then `lab-ops natmap install`, which sets up the systemd service.
# Where systemd is not PID 1 (containers, CI) there is no service manager to
# hand the daemon to, so the binary goes to /usr/local/bin and the daemon is
# started in the background (log /var/log/natmap.log). Safe to re-run: it
# replaces the binary and restarts the daemon it started before.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# shellcheck source=scripts/lib.sh
. "${REPO}/scripts/lib.sh"

readonly DEST=/usr/local/bin/lab-ops
readonly SOCK=/run/natmap.sock
readonly LOG=/var/log/natmap.log
# Written only by this script, so a re-run knows which process it may stop.
readonly PIDFILE=/run/natmap-install-daemon.pid
readonly SOCK_WAIT_SECS=10

with_docker=0
restart_only=0
binary=""
orig_args=("$@")

usage() { sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while (($#)); do
	case "$1" in
	--with-docker) with_docker=1 ;;
	--restart-only)
		restart_only=1
		binary=${DEST}
		;;
	--binary)
		(($# >= 2)) || {
			usage >&2
			exit 2
		}
		binary=$2
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		printf 'install: unknown argument: %s\n' "$1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done

log() { printf 'install: %s\n' "$*"; }
die() {
	printf 'install: ERROR: %s\n' "$*" >&2
	exit 1
}

if [[ ${EUID} -ne 0 ]]; then
	# Root for apt-get, /usr/local/bin, the systemd unit and iptables itself.
	printf 'install: must run as root. Run:\n\n    sudo %s' "$0" >&2
	((${#orig_args[@]})) && printf ' %q' "${orig_args[@]}" >&2
	printf '\n\n' >&2
	exit 1
fi
[[ -z ${binary} || -x ${binary} ]] || die "--binary ${binary}: not an executable file"

cd "${REPO}"
PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
export PATH

# 1. Runtime packages only: no busybox-static and no test image, which are for
# the test suite. Docker only when asked for.
deps_args=(--runtime)
((with_docker)) || deps_args+=(--no-docker)
((restart_only)) || bash "${REPO}/scripts/deps.sh" "${deps_args[@]}"

# 2. Build. --locked: install exactly the dependency versions that were tested.
if [[ -z ${binary} ]]; then
	ensure_cargo
	trap 'return_target_to_sudo_user "${REPO}"' EXIT
	log "building: cargo build --release --locked (a few minutes the first time)"
	cargo build --release --locked
	binary="${REPO}/target/release/lab-ops"
	[[ -x ${binary} ]] || die "cargo succeeded but ${binary} is missing"
fi
log "binary: ${binary} ($("${binary}" --version 2>/dev/null || echo 'version unknown'))"

# True when a daemon answers on ${SOCK}, asked with the lab-ops binary $1. The
# socket file alone proves nothing (it outlives a crashed daemon), and `ss` does
# not help: the daemon binds a private name and renames it into place, so ss
# lists the old name. Exit codes of the client: 0 ok, 1 the daemon answered with
# an error (still alive), 3 unreachable.
daemon_answers() {
	local rc=0
	[[ -S ${SOCK} ]] || return 1
	timeout 5 "$1" natmap --socket "${SOCK}" ls >/dev/null 2>&1 || rc=$?
	((rc == 0 || rc == 1))
}

print_usage() {
	cat <<EOF

natmap is running; its socket is ${SOCK}.
Try:
    sudo lab-ops natmap ls
    sudo lab-ops natmap dnat --ext-ip EXT_IP --int-ip INT_IP --ports 8080
    lab-ops natmap --help
EOF
}

# 3a. systemd: the binary installs itself, its unit and the natmap group, and
# starts the service. It knows the unit's hardening (DESIGN.md §6); we do not
# duplicate that here.
if systemd_is_pid1; then
	log "systemd is PID 1: running ${binary} natmap install"
	"${binary}" natmap install
	for ((i = 0; i < SOCK_WAIT_SECS * 5; i++)); do
		daemon_answers "${DEST}" && break
		sleep 0.2
	done
	daemon_answers "${DEST}" || die "the service does not answer on ${SOCK} after ${SOCK_WAIT_SECS}s; see: journalctl -u natmap -n 50"
	print_usage
	printf '\nMembers of the natmap group may use it without sudo:\n    sudo usermod -aG natmap %s   (then log in again)\n' "${SUDO_USER:-YOUR_USER}"
	exit 0
fi

# 3b. No systemd (container, CI): run the daemon ourselves.
log "systemd is not PID 1: installing ${DEST} and starting the daemon in the background"

# Stop the daemon a previous run of this script started, and only that one: the
# pid file must name a live process running our binary (or its replaced copy).
if [[ -s ${PIDFILE} ]]; then
	old_pid="$(<"${PIDFILE}")"
	old_exe="$(readlink "/proc/${old_pid}/exe" 2>/dev/null || true)"
	if [[ ${old_pid} =~ ^[0-9]+$ && (${old_exe} == "${DEST}" || ${old_exe} == "${DEST} (deleted)") ]]; then
		log "stopping the daemon started by a previous install (pid ${old_pid})"
		kill -TERM "${old_pid}" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			kill -0 "${old_pid}" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "${old_pid}" 2>/dev/null; then
			# State is written atomically (DESIGN.md §6), so SIGKILL loses nothing.
			log "pid ${old_pid} ignored SIGTERM for 10s; sending SIGKILL"
			kill -KILL "${old_pid}" 2>/dev/null || true
			sleep 0.5
		fi
	fi
	rm -f "${PIDFILE}"
fi
if daemon_answers "${binary}"; then
	die "a natmap daemon not started by this script is listening on ${SOCK}; stop it first (or use it: lab-ops natmap ls)"
fi

if [[ ${binary} != "${DEST}" ]]; then
	install -m 0755 "${binary}" "${DEST}"
	log "installed ${DEST}"
fi

# The daemon makes its socket 0660 root:natmap by default (DESIGN.md §6) and
# `natmap install` creates that group on systemd hosts; do the same here so the
# daemon starts and the group works the same way.
socket_group_args=()
if getent group natmap >/dev/null; then
	:
elif command -v groupadd >/dev/null && groupadd --system natmap; then
	log "created system group natmap (its members may use ${SOCK} without sudo)"
else
	log "no natmap group and cannot create one; the socket will be root-only"
	socket_group_args=(--socket-group root)
fi

printf '\n==== %s install.sh: starting %s natmap daemon ====\n' "$(date -Is)" "${DEST}" >>"${LOG}"
log_start="$(stat -c %s "${LOG}")"
# setsid + nohup: survive the terminal or CI job that ran us; cwd / so the
# checkout is not pinned; inherited fds above 2 closed so no pipe of a caller
# (a CI runner's log pipe) is held open by the daemon for ever.
(
	cd /
	for fd_path in "/proc/${BASHPID}/fd/"*; do
		fd=${fd_path##*/}
		if [[ ${fd} =~ ^[0-9]+$ ]] && ((fd > 2)); then
			eval "exec ${fd}>&-"
		fi
	done
	exec setsid nohup "${DEST}" natmap --socket "${SOCK}" daemon "${socket_group_args[@]}" </dev/null >>"${LOG}" 2>&1
) &
pid=$!
printf '%s\n' "${pid}" >"${PIDFILE}"

for ((i = 0; i < SOCK_WAIT_SECS * 5; i++)); do
	daemon_answers "${DEST}" && break
	kill -0 "${pid}" 2>/dev/null || break
	sleep 0.2
done
if ! daemon_answers "${DEST}"; then
	if kill -0 "${pid}" 2>/dev/null; then
		printf 'install: ERROR: the daemon (pid %s) does not answer on %s after %ss; leaving it running\n' "${pid}" "${SOCK}" "${SOCK_WAIT_SECS}" >&2
	else
		printf 'install: ERROR: the daemon exited before opening %s\n' "${SOCK}" >&2
		rm -f "${PIDFILE}"
	fi
	printf -- '---- %s (this start) ----\n' "${LOG}" >&2
	tail -c "+$((log_start + 1))" "${LOG}" | tail -n 30 >&2 || true
	exit 1
fi

log "daemon running: pid ${pid}, log ${LOG}"
print_usage
cat <<EOF

Without systemd nothing restarts it after a crash or a reboot: re-run
scripts/install.sh to (re)start it. Stop it with: kill \$(cat ${PIDFILE})
EOF
