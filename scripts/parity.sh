#!/usr/bin/env bash
# Side by side: `docker run -p` and `lab-ops natmap docker add`, measured.
#
#   sudo scripts/parity.sh [LAB_OPS]      LAB_OPS defaults to target/debug/lab-ops
#
# Runs, on this host's real Docker engine and the test image that
# scripts/deps.sh builds (natmap-test-busybox:latest), container A published
# with `docker run -p` (Docker's own publish, docker-proxy as configured) and
# container B published by a natmap daemon started here with
# `lab-ops natmap docker add` (no restart), and measures for each: who can
# reach the port (TCP and UDP) and which client address the container sees,
# connect latency and throughput, what a stopped container answers, a
# loopback-only publish, a port range, and adding/removing a port.
# Prints a Markdown table on stdout (progress on stderr).
#
# What it changes on the host, all removed on exit (also on failure):
# containers npar-<pid>-*, a network namespace npar-<pid> joined to the root
# namespace by a veth pair (198.18.70.1/24, fd00:70::1/64 on the host side:
# the "host address" and the "other machine"), a natmap daemon with its own
# socket and state dir under /tmp (its chains in the root namespace's
# iptables). It holds /run/natmap-docker-tests.lock for the whole run, as the
# Docker tests do, and refuses to run beside another natmap daemon in the root
# network namespace. Traffic goes only to loopback, the namespace and the
# containers. Every probe, wait and transfer is bounded in time.
#
# Environment: PARITY_PORT_BASE (default 18180): host ports used are
# BASE..BASE+19 and 8160-8161 (the range row); all are checked free first.
set -euo pipefail

PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
export PATH

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly IMAGE=natmap-test-busybox:latest
readonly LOCK_FILE=/run/natmap-docker-tests.lock
readonly HOST4=198.18.70.1 OUT4=198.18.70.2
readonly HOST6=fd00:70::1 OUT6=fd00:70::2
readonly UDP_PORT=5353 # udp-echo in the test image
readonly LAT_COUNT=200 LAT_SECS=10
readonly XFER_MB=32 XFER_RUNS=5 XFER_SECS=10

die() {
	printf 'parity: ERROR: %s\n' "$*" >&2
	exit 1
}
log() { printf 'parity: %s\n' "$*" >&2; }

LAB_OPS_ARG="${1:-target/debug/lab-ops}"
LAB_OPS="${LAB_OPS_ARG}"
[[ ${LAB_OPS} == /* ]] || LAB_OPS="${PWD}/${LAB_OPS}"
[[ $# -le 1 ]] || die "usage: $0 [LAB_OPS]"
[[ ${EUID} -eq 0 ]] || die "must run as root (containers, a network namespace, iptables): sudo $0 $*"
[[ -x ${LAB_OPS} ]] || die "${LAB_OPS} is not an executable (build it: cargo build)"
for c in docker ip iptables python3 flock nsenter ss; do
	command -v "${c}" >/dev/null 2>&1 || die "${c} not found"
done

BASE="${PARITY_PORT_BASE:-18180}"
if ! [[ ${BASE} =~ ^[0-9]+$ ]] || ((BASE < 1024 || BASE > 65000)); then
	die "PARITY_PORT_BASE must be 1024..65000"
fi
# Host ports. A_* are published by Docker, B_* by natmap.
readonly A_TCP=$((BASE)) A_UDP=$((BASE + 1)) A_LO=$((BASE + 2)) A_ADD=$((BASE + 3))
readonly A6_TCP=$((BASE + 4)) A6_UDP=$((BASE + 5))
readonly B_TCP=$((BASE + 10)) B_UDP=$((BASE + 11)) B_LO=$((BASE + 12)) B_ADD=$((BASE + 13))
readonly B6_TCP=$((BASE + 14)) B6_UDP=$((BASE + 15))
readonly V6_SUBNET=fd00:71::/64
readonly RANGE_LO=8160 RANGE_HI=8161
# natmap's range is its own: the ports -p just released stay in TCP
# TIME-WAIT for up to 60 s, which natmap's reservation (no SO_REUSEADDR,
# so nobody can share the port) cannot bind through.
readonly NRANGE_LO=8162 NRANGE_HI=8163

# ---------------------------------------------------------------------------
# The lock, then everything that must be undone.
# ---------------------------------------------------------------------------
exec 9>"${LOCK_FILE}"
log "waiting for ${LOCK_FILE} (other Docker tests)"
flock -w 1200 9 || die "could not take ${LOCK_FILE} within 20 min"
# A test that restarts the engine holds the lock while it does; give it a minute.
for ((i = 0; i < 60; i++)); do
	timeout 10 docker info >/dev/null 2>&1 && break
	sleep 1
done
timeout 10 docker info >/dev/null 2>&1 || die "the Docker engine does not answer (scripts/deps.sh starts one)"
docker image inspect "${IMAGE}" >/dev/null 2>&1 || die "no ${IMAGE}: run scripts/deps.sh"

TAG="npar-$$"
NS="${TAG}"
VETH="npar$$h"
((${#VETH} <= 15)) || VETH="npar${RANDOM}h"
WORK="$(mktemp -d /tmp/natmap-parity.XXXXXX)"
SOCK="${WORK}/natmap.sock"
DAEMON_PID=""
CONTAINERS=()
NETWORK=""

natmap() { "${LAB_OPS}" natmap --socket "${SOCK}" --color never "$@"; }

# Ends the processes this script started and that are still running (a probe
# in a command or process substitution when the script is interrupted),
# deepest first, so none is left behind reparented to init. The daemon is
# stopped by cleanup itself.
kill_tree() {
	local c
	for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
		[[ ${c} == "${DAEMON_PID}" ]] && continue
		kill_tree "${c}"
		kill -TERM "${c}" 2>/dev/null
	done
}

cleanup() {
	local rc=$?
	set +e
	kill_tree "$$"
	local c
	for c in "${CONTAINERS[@]}"; do
		docker rm -f "${c}" >/dev/null 2>&1
	done
	[[ -z ${NETWORK} ]] || docker network rm "${NETWORK}" >/dev/null 2>&1
	if [[ -n ${DAEMON_PID} ]] && kill -0 "${DAEMON_PID}" 2>/dev/null; then
		kill -TERM "${DAEMON_PID}"
		local i
		for ((i = 0; i < 100; i++)); do
			kill -0 "${DAEMON_PID}" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "${DAEMON_PID}" 2>/dev/null; then
			log "daemon ${DAEMON_PID} ignored SIGTERM for 10 s: SIGKILL"
			kill -KILL "${DAEMON_PID}"
		fi
		wait "${DAEMON_PID}" 2>/dev/null
	fi
	# A clean daemon removes its chains and jumps; after a SIGKILL remove them
	# here (no other natmap daemon runs in this namespace: checked at start).
	local t chain hook ipt
	for ipt in iptables ip6tables; do
		for t in "nat PREROUTING NATMAP" "nat OUTPUT NATMAP-OUTPUT" "nat POSTROUTING NATMAP-POSTROUTING" "filter DOCKER-USER NATMAP" "filter FORWARD NATMAP"; do
			read -r table hook chain <<<"${t}"
			while "${ipt}" -w 5 -t "${table}" -D "${hook}" -j "${chain}" 2>/dev/null; do
				log "removed a leftover ${ipt} -t ${table} ${hook} -j ${chain}"
			done
		done
		for t in "nat NATMAP" "nat NATMAP-OUTPUT" "nat NATMAP-POSTROUTING" "filter NATMAP"; do
			read -r table chain <<<"${t}"
			if "${ipt}" -w 5 -t "${table}" -S "${chain}" >/dev/null 2>&1; then
				log "removing leftover chain ${ipt} -t ${table} ${chain}"
				"${ipt}" -w 5 -t "${table}" -F "${chain}"
				"${ipt}" -w 5 -t "${table}" -X "${chain}"
			fi
		done
		# The shards (NATMAP-T12, NATMAP-OUTPUT-U3), once their parents,
		# which jumped to them, are gone.
		for table in nat filter; do
			"${ipt}" -w 5 -t "${table}" -S 2>/dev/null | sed -n 's/^-N \(NATMAP\(-OUTPUT\)\{0,1\}-[TU][0-9]\{1,\}\)$/\1/p' |
				while read -r chain; do
					log "removing leftover chain ${ipt} -t ${table} ${chain}"
					"${ipt}" -w 5 -t "${table}" -F "${chain}"
					"${ipt}" -w 5 -t "${table}" -X "${chain}"
				done
		done
	done
	ip link del "${VETH}" >/dev/null 2>&1
	ip netns del "${NS}" >/dev/null 2>&1
	if ((rc != 0)) && [[ -f ${WORK}/daemon.log ]]; then
		log "daemon log (tail):"
		tail -n 30 "${WORK}/daemon.log" >&2
	fi
	rm -rf "${WORK}"
	exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One natmap daemon per network namespace: another one would fight over the chains.
for p in /proc/[0-9]*; do
	[[ -r ${p}/cmdline ]] || continue
	[[ "$(readlink "${p}/ns/net" 2>/dev/null)" == "$(readlink /proc/self/ns/net)" ]] || continue
	mapfile -d '' -t argv <"${p}/cmdline" 2>/dev/null || continue
	((${#argv[@]} >= 3)) || continue
	if [[ ${argv[0]} == *lab-ops && " ${argv[*]} " == *" daemon "* ]]; then
		die "a natmap daemon already runs in the root network namespace (pid ${p#/proc/}: ${argv[*]}); stop it first"
	fi
done

for p in "${A_TCP}" "${A_LO}" "${A_ADD}" "${A6_TCP}" "${B_TCP}" "${B_LO}" "${B_ADD}" "${B6_TCP}" "${RANGE_LO}" "${RANGE_HI}" "${NRANGE_LO}" "${NRANGE_HI}"; do
	[[ -z "$(ss -Htln "( sport = :${p} )")" ]] || die "TCP port ${p} is in use (PARITY_PORT_BASE picks others)"
done
for p in "${A_UDP}" "${A6_UDP}" "${B_UDP}" "${B6_UDP}"; do
	[[ -z "$(ss -Huan "( sport = :${p} )")" ]] || die "UDP port ${p} is in use (PARITY_PORT_BASE picks others)"
done

# ---------------------------------------------------------------------------
# The probe: one small Python program for every measurement, so both sides are
# measured by the same code. Prints one line per call.
# ---------------------------------------------------------------------------
cat >"${WORK}/probe.py" <<'PY'
import errno, os, socket, statistics, subprocess, sys, time

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def fail(e):
    if isinstance(e, ConnectionRefusedError): return "refused"
    if isinstance(e, ConnectionResetError): return "reset"
    if isinstance(e, (socket.timeout, TimeoutError)): return "timeout"
    if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH): return "unreachable"
    return "error " + str(e).replace(" ", "_")

def http(host, port, path, timeout, want_body=True):
    """ok BODY | refused | timeout | closed (accepted, then EOF) | reset | ..."""
    deadline = time.monotonic() + timeout
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except OSError as e:
        s.close(); return fail(e)
    try:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\nHost: parity\r\n\r\n")
        data = b""
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
    except OSError as e:
        s.close()
        if data: return "partial " + fail(e)
        return "accepted-then-" + fail(e)
    s.close()
    if not data: return "accepted-then-closed"
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode(errors="replace")
    if " 200 " not in status: return "http " + status.replace(" ", "_")
    return "ok " + (body.decode(errors="replace").strip().replace(" ", "_") or "-")

def udp(host, port, timeout, tries=3):
    """ok REPLY | refused (ICMP port unreachable) | timeout | answered-from-ADDR
    (a reply came, but from another address than the one asked: a connected
    socket, as most UDP clients use, drops it)."""
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
        for _ in range(tries):
            s.send(b"parity")
            s.settimeout(timeout / tries)
            try:
                reply = s.recv(2048)
                return "ok " + reply.decode(errors="replace")[:-len("parity")]
            except (socket.timeout, TimeoutError):
                continue
    except OSError as e:
        return fail(e)
    finally:
        s.close()
    # No answer on the connected socket: did one come from elsewhere?
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    try:
        s.settimeout(1)
        s.sendto(b"parity", (host, port))
        _, src = s.recvfrom(2048)
        return "timeout (answered-from-%s)" % src[0].replace("::ffff:", "")
    except OSError:
        return "timeout"
    finally:
        s.close()

def target(t):
    host, _, port = t.rpartition(":")
    return host.strip("[]"), int(port)

def latency(count, secs, targets):
    """Per target: median connect time and median time of a whole GET /
    (connect to EOF). The targets take turns, so both see the same load."""
    conn = {t: [] for t in targets}; req = {t: [] for t in targets}; fails = {t: 0 for t in targets}
    end = time.monotonic() + secs * len(targets)
    i = 0
    while time.monotonic() < end:
        left = [t for t in targets if len(req[t]) + fails[t] < count]
        if not left: break
        t = left[i % len(left)]; i += 1
        host, port = target(t)
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            t0 = time.perf_counter()
            s.connect((host, port))
            t1 = time.perf_counter()
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while s.recv(65536): pass
            t2 = time.perf_counter()
            conn[t].append(t1 - t0); req[t].append(t2 - t0)
        except OSError:
            fails[t] += 1
        finally:
            s.close()
    ms = lambda v: "%.2f" % (statistics.median(v) * 1000)
    out = []
    for t in targets:
        if not req[t]:
            out.append("no connection (%d failed)" % fails[t]); continue
        o = "%s / %s ms (n=%d" % (ms(conn[t]), ms(req[t]), len(req[t]))
        out.append(o + (", %d failed)" % fails[t] if fails[t] else ")"))
    return "\t".join(out)

def throughput(path, runs, secs, targets):
    """Per target: median MB/s of `runs` GETs of path, each bounded by secs;
    the targets take turns, who goes first alternating."""
    rates = {t: [] for t in targets}; err = {}
    for i in range(runs):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            if t in err: continue
            host, port = target(t)
            s = socket.socket(family(host), socket.SOCK_STREAM)
            s.settimeout(secs)
            n, t0 = 0, time.perf_counter()
            end = time.monotonic() + secs
            try:
                s.connect((host, port))
                s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n\r\n")
                while time.monotonic() < end:
                    b = s.recv(1 << 20)
                    if not b: break
                    n += len(b)
                rates[t].append(n / (time.perf_counter() - t0) / 1e6)
            except OSError as e:
                err[t] = fail(e)
            finally:
                s.close()
    return "\t".join(err.get(t) or "%.0f MB/s" % statistics.median(rates[t]) for t in targets)

def until(check, secs):
    """Polls check() until it is true; returns ms, or None after secs."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        if check(): return (time.perf_counter() - t0) * 1000
        time.sleep(0.005)
    return None

def timed(argv, check, secs):
    """Runs a command, then polls; prints the command's own time and the time
    from its start to the poll succeeding."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    t1 = time.perf_counter()
    if r.returncode != 0:
        return "command failed: " + r.stderr.decode(errors="replace").strip().splitlines()[-1].replace(" ", "_")
    ms = until(check, secs)
    if ms is None: return "not within %d s" % secs
    return "%.0f ms (command %.0f ms)" % ((t1 - t0) * 1000 + ms, (t1 - t0) * 1000)

cmd, a = sys.argv[1], sys.argv[2:]
if cmd == "http": print(http(a[0], int(a[1]), a[2], float(a[3])))
elif cmd == "udp": print(udp(a[0], int(a[1]), float(a[2])))
elif cmd == "latency": print(latency(int(a[0]), float(a[1]), a[2:]))       # COUNT SECS HOST:PORT...
elif cmd == "throughput": print(throughput(a[0], int(a[1]), float(a[2]), a[3:]))  # PATH RUNS SECS HOST:PORT...
elif cmd == "timed-up":     # HOST PORT SECS -- argv: until GET / answers
    print(timed(a[4:], lambda: http(a[0], int(a[1]), "/", 0.2).startswith("ok"), float(a[2])))
elif cmd == "timed-down":   # HOST PORT SECS -- argv: until GET / no longer answers
    print(timed(a[4:], lambda: not http(a[0], int(a[1]), "/", 0.2).startswith("ok"), float(a[2])))
else: sys.exit("probe: unknown command " + cmd)
PY

# Where a probe runs from.
#   host       the root namespace
#   out        the other machine (namespace ${NS})
#   ctr:NAME   a container's network namespace (the probe itself is the host's
#              python3, run with nsenter -n: same sockets as a program in it)
probe() {
	local from=$1
	shift
	case "${from}" in
	host) timeout 150 python3 "${WORK}/probe.py" "$@" ;;
	out) timeout 150 ip netns exec "${NS}" python3 "${WORK}/probe.py" "$@" ;;
	ctr:*)
		local pid
		pid="$(docker inspect -f '{{.State.Pid}}' "${from#ctr:}")"
		timeout 150 nsenter -t "${pid}" -n python3 "${WORK}/probe.py" "$@"
		;;
	esac
}

# The last client address udp-echo logged in container $1 ("from ADDR PORT len N").
udp_peer() {
	local line
	line="$(docker logs "$1" 2>&1 | grep '^from ' | tail -n 1 || true)"
	[[ -n ${line} ]] || {
		echo "?"
		return
	}
	line="${line#from }"
	echo "${line%% *}"
}

# TCP cell: GET /cgi-bin/ip prints the client address the container saw.
tcp_cell() {
	local from=$1 host=$2 port=$3 r
	r="$(probe "${from}" http "${host}" "${port}" /cgi-bin/ip 3)"
	case "${r}" in
	ok\ *)
		r="${r#ok }"
		r="${r#[}"
		r="${r#::ffff:}"
		echo "✓ sees ${r%]}"
		;;
	*) echo "✗ ${r}" ;;
	esac
}

# UDP cell: an echo through the port; the source from udp-echo's log.
udp_cell() {
	local from=$1 host=$2 port=$3 ctr=$4 r
	r="$(probe "${from}" udp "${host}" "${port}" 3)"
	case "${r}" in
	ok\ *)
		sleep 0.2 # udp-echo's log line
		echo "✓ sees $(udp_peer "${ctr}")"
		;;
	*) echo "✗ ${r}" ;;
	esac
}

# What natmap says to a command: "ok" or "refused: <message>".
natmap_try() {
	local out
	if out="$(natmap "$@" 2>&1)"; then
		echo ok
	else
		out="$(grep -m1 -i 'error' <<<"${out}" || head -n1 <<<"${out}")"
		echo "refused: ${out#error: }"
	fi
}

# What docker run says: the container id, or "refused: <message>".
docker_try() {
	local out
	if out="$(timeout 120 docker run "$@" 2>&1)"; then
		echo ok
	else
		echo "refused: $(tail -n1 <<<"${out}")"
	fi
}

# The web container: httpd on 80 and 81 (different pages), a CGI printing the
# client address, a file for the transfer, udp-echo on ${UDP_PORT}.
web_script() {
	local tag=$1
	cat <<EOF
set -e
for p in 80 81; do
	mkdir -p /www\$p/cgi-bin
	echo ${tag}:\$p > /www\$p/index.html
	printf '#!/bin/sh\nprintf "Content-Type: text/plain\\\\r\\\\n\\\\r\\\\n%%s\\\\n" "\$REMOTE_ADDR"\n' > /www\$p/cgi-bin/ip
	chmod 755 /www\$p/cgi-bin/ip
done
dd if=/dev/zero of=/www80/big bs=1M count=${XFER_MB} 2>/dev/null
udp-echo ${UDP_PORT} ${tag}: &
httpd -p 81 -h /www81
exec httpd -f -p 80 -h /www80
EOF
}

# run_web NAME [docker run options...]: starts it, waits until it serves.
run_web() {
	local name=$1
	shift
	CONTAINERS+=("${name}")
	docker run -d --name "${name}" --label org.natmap.test=1 "$@" "${IMAGE}" sh -c "$(web_script "${name##*-}")" >/dev/null
	wait_web "${name}"
}

wait_web() {
	local name=$1 ip i
	for ((i = 0; i < 150; i++)); do
		ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "${name}")"
		ip="${ip%% *}"
		if [[ -n ${ip} ]] && [[ "$(probe host http "${ip}" 80 / 1)" == ok* ]]; then
			return 0
		fi
		sleep 0.1
	done
	docker logs "${name}" >&2 || true
	die "container ${name} does not serve HTTP within 15 s"
}

# ---------------------------------------------------------------------------
# Topology: the other machine, the natmap daemon, the containers.
# ---------------------------------------------------------------------------
log "topology: namespace ${NS}, veth ${VETH} (${HOST4}, ${HOST6})"
ip netns add "${NS}"
ip link add "${VETH}" type veth peer name eth0 netns "${NS}"
ip addr add "${HOST4}/24" dev "${VETH}"
ip addr add "${HOST6}/64" dev "${VETH}" nodad
ip link set "${VETH}" up
ip -n "${NS}" link set lo up
ip -n "${NS}" addr add "${OUT4}/24" dev eth0
ip -n "${NS}" addr add "${OUT6}/64" dev eth0 nodad
ip -n "${NS}" link set eth0 up
ip -n "${NS}" route add default via "${HOST4}"
ip -n "${NS}" -6 route add default via "${HOST6}"
for ((i = 0; i < 50; i++)); do
	ip netns exec "${NS}" ping -c1 -W1 "${HOST4}" >/dev/null 2>&1 && break
	sleep 0.1
done

log "daemon: ${LAB_OPS} (socket ${SOCK})"
: >"${WORK}/config.toml"
"${LAB_OPS}" natmap --socket "${SOCK}" daemon --state "${WORK}/state/state.json" \
	--socket-group root --config "${WORK}/config.toml" >"${WORK}/daemon.log" 2>&1 &
DAEMON_PID=$!
for ((i = 0; i < 100; i++)); do
	natmap ping >/dev/null 2>&1 && break
	kill -0 "${DAEMON_PID}" 2>/dev/null || die "the daemon exited at start: $(tail -n 5 "${WORK}/daemon.log")"
	sleep 0.1
done
natmap ping >/dev/null 2>&1 || die "the daemon does not answer within 10 s"

A="${TAG}-a" B="${TAG}-b" C="${TAG}-c"
log "containers: ${A} (-p), ${B} (natmap), ${C} (a neighbour on the bridge)"
run_web "${A}" -p "${A_TCP}:80" -p "${A_UDP}:${UDP_PORT}/udp"
run_web "${B}"
run_web "${C}"
# docker-proxy (userland-proxy, on unless daemon.json turns it off) for A's port?
userland_proxy="off"
if pgrep -a -x docker-proxy 2>/dev/null | grep -q -- "-host-port ${A_TCP} "; then
	userland_proxy="on"
fi

declare -A ROW_A ROW_B NOTE
ORDER=()
row() { # KEY LABEL A B NOTE
	ORDER+=("$1|$2")
	ROW_A[$1]=$3
	ROW_B[$1]=$4
	NOTE[$1]=$5
}

# Publishing B: the time from the command to the first answer from the other machine.
log "publish: natmap docker add ${B} ${B_TCP}:80 and ${B_UDP}:${UDP_PORT}/udp"
add_time="$(probe out timed-up "${HOST4}" "${B_TCP}" 15 -- "${LAB_OPS}" natmap --socket "${SOCK}" docker add "${B}" "${B_TCP}:80")"
add_note="$(natmap docker add "${B}" "${B_UDP}:${UDP_PORT}/udp" 2>&1 >/dev/null || true)"
add_note="${add_note//$'\n'/ }"

# ---------------------------------------------------------------------------
# Reachability and the client address the container sees.
# ---------------------------------------------------------------------------
log "reachability"
# The pair under test: containers PA (-p) and PB (natmap), their host ports.
PA="${A}" PB="${B}" PA_TCP="${A_TCP}" PA_UDP="${A_UDP}" PB_TCP="${B_TCP}" PB_UDP="${B_UDP}"
both() { # KEY LABEL FROM HOST NOTE   (TCP and UDP, to the pair's ports on HOST)
	local key=$1 label=$2 from=$3 host=$4 note=$5 a b
	a="TCP $(tcp_cell "${from}" "${host}" "${PA_TCP}"); UDP $(udp_cell "${from}" "${host}" "${PA_UDP}" "${PA}")"
	b="TCP $(tcp_cell "${from}" "${host}" "${PB_TCP}"); UDP $(udp_cell "${from}" "${host}" "${PB_UDP}" "${PB}")"
	row "${key}" "${label}" "${a}" "${b}" "${note}"
}
both lo4 "host → 127.0.0.1" host 127.0.0.1 \
	"Both proxy loopback in userland (docker-proxy; natmap's relay): the container sees the bridge gateway."
both lo6 "host → [::1]" host ::1 \
	"docker-proxy listens on [::] and proxies to the container's IPv4; natmap serves [::1] only to a container with IPv6 (the default bridge has none here)."
both host4 "host → host address ${HOST4}" host "${HOST4}" \
	"Kernel DNAT in OUTPUT on both sides."
both host6 "host → host address ${HOST6}" host "${HOST6}" \
	"docker-proxy answers on every IPv6 address of the host; natmap has no IPv6 target for a container without IPv6 and says so at \`docker add\`: ${add_note:-(nothing)}"
both out4 "other machine → ${HOST4}" out "${HOST4}" \
	"Kernel DNAT in PREROUTING on both sides: the client's address is kept."
both out6 "other machine → ${HOST6}" out "${HOST6}" \
	"Docker's IPv6 NAT is off (engine 20.10 default, no ip6tables): docker-proxy answers and hides the client; natmap does not publish an IPv4-only container over IPv6."
both nbr "other container → ${HOST4}" "ctr:${C}" "${HOST4}" \
	"Docker's nat DOCKER chain returns traffic from docker0, so docker-proxy serves it; its UDP reply leaves from 172.17.0.1, not the address asked. natmap DNATs it and, with br_netfilter, masquerades only a container's traffic to itself: the neighbour keeps its address."
row own "the container → its own port via ${HOST4}" \
	"TCP $(tcp_cell "ctr:${A}" "${HOST4}" "${A_TCP}"); UDP $(udp_cell "ctr:${A}" "${HOST4}" "${A_UDP}" "${A}")" \
	"TCP $(tcp_cell "ctr:${B}" "${HOST4}" "${B_TCP}"); UDP $(udp_cell "ctr:${B}" "${HOST4}" "${B_UDP}" "${B}")" \
	"Hairpin: the packet must leave the container's bridge port and come back through it. docker-proxy does it for TCP (UDP: wrong reply source); natmap sets hairpin mode on the container's bridge port and masquerades only that container's own flow."

# The same on a network with IPv6 (the default bridge has none unless
# daemon.json says so): a user-defined network created with --ipv6.
log "IPv6: a user-defined network ${V6_SUBNET}"
if out="$(docker network create --ipv6 --subnet "${V6_SUBNET}" "${TAG}-v6" 2>&1)"; then
	NETWORK="${TAG}-v6"
	PA="${TAG}-a6" PB="${TAG}-b6" PA_TCP="${A6_TCP}" PA_UDP="${A6_UDP}" PB_TCP="${B6_TCP}" PB_UDP="${B6_UDP}"
	run_web "${PA}" --network "${NETWORK}" -p "${PA_TCP}:80" -p "${PA_UDP}:${UDP_PORT}/udp"
	run_web "${PB}" --network "${NETWORK}"
	natmap docker add "${PB}" "${PB_TCP}:80" >/dev/null
	natmap docker add "${PB}" "${PB_UDP}:${UDP_PORT}/udp" >/dev/null
	v6_fwd="$(cat /proc/sys/net/ipv6/conf/all/forwarding)"
	both v6lo6 "IPv6 network: host → [::1]" host ::1 \
		"docker-proxy on [::]; natmap's relay on [::1] to the container's IPv6 address."
	both v6host6 "IPv6 network: host → host address ${HOST6}" host "${HOST6}" \
		"natmap: DNAT in ip6tables' OUTPUT."
	both v6out6 "IPv6 network: other machine → ${HOST6}" out "${HOST6}" \
		"Engine 20.10 without \"ip6tables\": true publishes IPv6 through docker-proxy only (client hidden); natmap DNATs in ip6tables (net.ipv6.conf.all.forwarding=${v6_fwd})."
	both v6out4 "IPv6 network: other machine → ${HOST4}" out "${HOST4}" \
		"IPv4 unchanged on a dual-stack network."
	docker rm -f "${PA}" "${PB}" >/dev/null
	docker network rm "${NETWORK}" >/dev/null
	NETWORK=""
else
	row v6 "IPv6 network" "not measured: docker network create --ipv6: ${out//$'\n'/ }" "not measured" "Docker could not create an IPv6 network here."
fi
PA="${A}" PB="${B}" PA_TCP="${A_TCP}" PA_UDP="${A_UDP}" PB_TCP="${B_TCP}" PB_UDP="${B_UDP}"

# ---------------------------------------------------------------------------
# Latency and throughput, both sides in the same run, interleaved.
# ---------------------------------------------------------------------------
log "latency (${LAT_COUNT} connects, at most ${LAT_SECS} s each) and throughput (${XFER_RUNS}× ${XFER_MB} MB, at most ${XFER_SECS} s each)"
pair() { # KEY LABEL FROM KIND ARGS... -- HOST (A's port, then B's, in turns)
	local key=$1 label=$2 from=$3 kind=$4 note=${!#} host=${*: -2:1} a b
	shift 4
	local -a args=("${@:1:$#-2}")
	IFS=$'\t' read -r a b < <(probe "${from}" "${kind}" "${args[@]}" "${host}:${A_TCP}" "${host}:${B_TCP}")
	row "${key}" "${label}" "${a}" "${b}" "${note}"
}
ip_a="$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "${A}")"
ip_b="$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "${B}")"
IFS=$'\t' read -r la lb < <(probe host latency "${LAT_COUNT}" "${LAT_SECS}" "${ip_a}:80" "${ip_b}:80")
row lat_base "baseline, no publish: connect / whole GET latency, median, host → the container's own address" "${la}" "${lb}" \
	"The same two containers without any NAT or proxy: the floor for the rows below."
pair lat_out "connect / whole GET latency, median, other machine → ${HOST4}" out latency "${LAT_COUNT}" "${LAT_SECS}" \
	"${HOST4}" "Same kernel path on both sides (conntrack, DNAT in PREROUTING, FORWARD); the GET includes busybox httpd's fork."
pair lat_lo "connect / whole GET latency, median, host → 127.0.0.1" host latency "${LAT_COUNT}" "${LAT_SECS}" \
	127.0.0.1 "Both are userland proxies: the proxy answers the connect; the GET includes its connection to the container."
pair xfer_out "throughput, ${XFER_MB} MB GET, median of ${XFER_RUNS}, other machine → ${HOST4}" out throughput /big "${XFER_RUNS}" "${XFER_SECS}" \
	"${HOST4}" "Kernel forwarding on both sides."
pair xfer_lo "throughput, ${XFER_MB} MB GET, median of ${XFER_RUNS}, host → 127.0.0.1" host throughput /big "${XFER_RUNS}" "${XFER_SECS}" \
	127.0.0.1 "docker-proxy (Go) vs natmap's relay (Rust, tokio), each copying every byte through userland."

# ---------------------------------------------------------------------------
# Adding and removing a port on a running container.
# ---------------------------------------------------------------------------
# recreate_a FILE [extra -p...]: writes a script that recreates A with its
# ports and the extra options (the only way to change -p).
recreate_a() {
	local file=$1
	shift
	printf 'set -e\ndocker rm -f %q >/dev/null\ndocker run -d --name %q --label org.natmap.test=1 -p %q -p %q' \
		"${A}" "${A}" "${A_TCP}:80" "${A_UDP}:${UDP_PORT}/udp" >"${file}"
	printf ' %q' "$@" "${IMAGE}" sh -c "$(web_script a)" >>"${file}"
	printf ' >/dev/null\n' >>"${file}"
}
log "adding a port: recreate ${A} with one more -p, vs natmap docker add"
recreate_a "${WORK}/recreate-add.sh" -p "${A_ADD}:81"
a_add="$(probe out timed-up "${HOST4}" "${A_ADD}" 30 -- bash "${WORK}/recreate-add.sh")"
wait_web "${A}"
b_add="$(probe out timed-up "${HOST4}" "${B_ADD}" 15 -- "${LAB_OPS}" natmap --socket "${SOCK}" docker add "${B}" "${B_ADD}:81")"
row add "add a port to a running container (command → first answer from the other machine)" \
	"restart needed: docker rm -f + docker run with one more -p: ${a_add}" \
	"no restart: docker add: ${b_add} (first mapping of ${B}: ${add_time})" \
	"-p is fixed at docker run: the container is recreated (its processes and unsaved state are gone)."
log "removing a port"
recreate_a "${WORK}/recreate-rm.sh"
a_rm="$(probe out timed-down "${HOST4}" "${A_ADD}" 30 -- bash "${WORK}/recreate-rm.sh")"
wait_web "${A}"
b_rm="$(probe out timed-down "${HOST4}" "${B_ADD}" 15 -- "${LAB_OPS}" natmap --socket "${SOCK}" docker rm "${B}" "${B_ADD}")"
row rm "remove a port (command → no answer)" \
	"restart needed: ${a_rm}" "no restart: docker rm: ${b_rm}" \
	"natmap also cuts the open connections of the removed mapping (conntrack)."

# ---------------------------------------------------------------------------
# Stopped containers.
# ---------------------------------------------------------------------------
log "stopping ${A} and ${B}"
docker stop -t 1 "${A}" "${B}" >/dev/null
sleep 1 # natmap follows Docker's events; give it the same second Docker gets
stopped() { # FROM HOST PORT-A PORT-B UDP-A UDP-B
	local a b
	a="TCP $(probe "$1" http "$2" "$3" / 3); UDP $(probe "$1" udp "$2" "$5" 3)"
	b="TCP $(probe "$1" http "$2" "$4" / 3); UDP $(probe "$1" udp "$2" "$6" 3)"
	printf '%s\t%s\n' "${a}" "${b}"
}
IFS=$'\t' read -r sa sb < <(stopped out "${HOST4}" "${A_TCP}" "${B_TCP}" "${A_UDP}" "${B_UDP}")
row stop_out "container stopped: other machine → ${HOST4}" "${sa}" "${sb}" \
	"Docker removes its DNAT and docker-proxy (the host answers RST / ICMP port unreachable); natmap keeps the port reserved by a socket that never listens (RST) and drops UDP silently."
IFS=$'\t' read -r sa sb < <(stopped host 127.0.0.1 "${A_TCP}" "${B_TCP}" "${A_UDP}" "${B_UDP}")
row stop_lo "container stopped: host → 127.0.0.1" "${sa}" "${sb}" \
	"docker-proxy stops with the container; natmap's relay stops while the mapping is down (UDP: silently dropped)."
docker rm -f "${A}" "${B}" >/dev/null

# ---------------------------------------------------------------------------
# Loopback-only publish and a port range: what each accepts, and what it serves.
# ---------------------------------------------------------------------------
reach3() { # PORT: 127.0.0.1, host address, other machine
	printf '127.0.0.1 %s, %s %s, other machine %s' \
		"$(probe host http 127.0.0.1 "$1" / 2 | cut -d' ' -f1)" \
		"${HOST4}" "$(probe host http "${HOST4}" "$1" / 2 | cut -d' ' -f1)" \
		"$(probe out http "${HOST4}" "$1" / 2 | cut -d' ' -f1)"
}
log "loopback-only publish"
A2="${TAG}-a2" B2="${TAG}-b2"
CONTAINERS+=("${A2}")
r="$(docker_try -d --name "${A2}" --label org.natmap.test=1 -p "127.0.0.1:${A_LO}:80" "${IMAGE}" sh -c "$(web_script a2)")"
if [[ ${r} == ok ]]; then
	wait_web "${A2}"
	la="$(reach3 "${A_LO}")"
else la="${r}"; fi
run_web "${B2}"
r="$(natmap_try docker add "${B2}" "127.0.0.1:${B_LO}:80")"
if [[ ${r} == ok ]]; then lb="$(reach3 "${B_LO}")"; else lb="${r}"; fi
row lo_only "loopback-only publish (-p 127.0.0.1:P:80 / docker add B 127.0.0.1:P:80)" "${la}" "${lb}" \
	"The usual way to keep a port private to the host."
docker rm -f "${A2}" "${B2}" >/dev/null

log "port range ${RANGE_LO}-${RANGE_HI}:80-81"
range3() {
	local p out=""
	for p in "$@"; do
		out+="${p}: other machine $(probe out http "${HOST4}" "${p}" / 2), 127.0.0.1 $(probe host http 127.0.0.1 "${p}" / 2); "
	done
	echo "${out%; }"
}
A3="${TAG}-a3" B3="${TAG}-b3"
CONTAINERS+=("${A3}")
r="$(docker_try -d --name "${A3}" --label org.natmap.test=1 -p "${RANGE_LO}-${RANGE_HI}:80-81" "${IMAGE}" sh -c "$(web_script a3)")"
if [[ ${r} == ok ]]; then
	wait_web "${A3}"
	ra="$(range3 "${RANGE_LO}" "${RANGE_HI}")"
else ra="${r}"; fi
docker rm -f "${A3}" >/dev/null
run_web "${B3}"
r="$(natmap_try docker add "${B3}" "${NRANGE_LO}-${NRANGE_HI}:80-81")"
if [[ ${r} == ok ]]; then rb="$(range3 "${NRANGE_LO}" "${NRANGE_HI}")"; else rb="${r}"; fi
row range "port range (-p ${RANGE_LO}-${RANGE_HI}:80-81 / docker add ${NRANGE_LO}-${NRANGE_HI}:80-81)" "${ra}" "${rb}" \
	"Ports map in order: first→80, second→81."
docker rm -f "${B3}" >/dev/null

# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------
brnf="$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo absent)"
cat <<EOF
Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -srm), $(nproc) CPUs;
Docker $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})'), userland-proxy ${userland_proxy},
default bridge IPv6 $(docker network inspect bridge --format '{{.EnableIPv6}}'), bridge-nf-call-iptables ${brnf},
$(iptables -V); natmap $("${LAB_OPS}" --version | awk '{print $NF}') (checkout at $(git -C "${REPO}" rev-parse --short HEAD 2>/dev/null || echo '?')).
Command: \`sudo scripts/parity.sh ${LAB_OPS_ARG}\`. "sees X": the client address the container saw;
latency "C/G ms": median connect / median whole GET of a tiny page.

| case | \`docker run -p\` | \`natmap docker add\` | why |
|---|---|---|---|
EOF
if warn="$(grep -E ' (WARN|ERROR) ' "${WORK}/daemon.log")"; then
	log "the daemon logged $(wc -l <<<"${warn}") warning/error line(s):"
	printf '%s\n' "${warn}" | tail -n 20 >&2
fi
cell() { printf '%s' "${1//|/\\|}"; }
for kl in "${ORDER[@]}"; do
	k="${kl%%|*}"
	printf '| %s | %s | %s | %s |\n' "${kl#*|}" "$(cell "${ROW_A[${k}]}")" "$(cell "${ROW_B[${k}]}")" "$(cell "${NOTE[${k}]}")"
done
