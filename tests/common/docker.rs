//! Fixtures for the Docker tests (issue 3): the host's real Docker engine,
//! the real daemon in the ROOT network namespace, an "outside machine",
//! web/UDP containers and a Docker socket proxy that can be switched off.
//!
//! Unlike the rest of `common`, these fixtures change the host: iptables of
//! the root namespace (natmap's chains), a veth pair, containers. So:
//!
//! * every test takes [`serial`] first (one process-wide mutex plus a file
//!   lock, so two test processes never overlap either);
//! * every fixture is a guard that removes what it created on drop, also
//!   when the test panics ([`Container`], [`OutsideHost`], [`RootDaemon`],
//!   [`DockerProxy`]);
//! * names carry the test process's pid (`nmt-<pid>-…`), and [`docker_ready`]
//!   removes containers of test processes that no longer exist.
//!
//! ```text
//!   outside netns                 host (root netns)                 docker0
//!   eth0 203.0.113.2 ──veth── nmt<pid>o<n> 203.0.113.1   ──   172.17.0.x containers
//!                              natmap daemon (--docker-socket proxy?)
//! ```
//!
//! Nothing here sends traffic anywhere but loopback, the host's own
//! addresses, containers and test namespaces; every network operation and
//! every command has a bounded timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::*;

// ───────────────────────────── constants ─────────────────────────────

/// The test image built by `scripts/deps.sh` (static busybox + `/bin/udp-echo`).
pub const TEST_IMAGE: &str = "natmap-test-busybox:latest";
/// The real Docker socket.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The host's "own non-loopback address" in these tests: the root side of
/// the veth pair to [`OutsideHost`].
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside machine's address.
pub const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// UDP port `udp-echo` listens on inside web containers.
pub const UDP_ECHO_PORT: u16 = 5353;
/// How long a container may take to answer after `docker run`/`start`.
pub const CONTAINER_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for `docker` CLI calls (`docker run` of a local image, `stop -t 2`).
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Lock file serialising Docker tests across test processes.
const CROSS_PROCESS_LOCK: &str = "/run/natmap-docker-tests.lock";

/// natmap's chains in the root namespace: (table, chain).
pub const NATMAP_CHAINS: [(&str, &str); 4] = [
    ("nat", "NATMAP"),
    ("nat", "NATMAP-OUTPUT"),
    ("nat", "NATMAP-POSTROUTING"),
    ("filter", "NATMAP"),
];
/// natmap's jumps: (table, hook chain, target).
pub const NATMAP_JUMPS: [(&str, &str, &str); 4] = [
    ("nat", "PREROUTING", "NATMAP"),
    ("nat", "OUTPUT", "NATMAP-OUTPUT"),
    ("nat", "POSTROUTING", "NATMAP-POSTROUTING"),
    ("filter", "DOCKER-USER", "NATMAP"),
];

/// `SocketAddr` shorthand.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Writes a line to the real stderr (not captured by libtest), e.g. timings.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ───────────────────────────── serialisation ─────────────────────────────

/// Starts every Docker test: takes the lock ([`serial`]), returns early
/// from the test when the environment skips it ([`docker_ready`]), starts
/// the timer; yields the guards to keep for the whole test.
#[allow(unused_macros)]
macro_rules! docker_setup {
    () => {{
        let serial = $crate::common::docker::serial();
        if !$crate::common::docker::docker_ready() {
            return;
        }
        (serial, $crate::common::docker::TestTimer::start())
    }};
}
#[allow(unused_imports)]
pub(crate) use docker_setup;

/// Held for the whole of a Docker test: the process-wide mutex (poison
/// tolerant: a failed test does not fail the next ones) and an exclusive
/// `flock` on [`CROSS_PROCESS_LOCK`].
pub struct Serial {
    _file: Option<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// Takes the Docker-test lock (see [`Serial`]). Call it first in every test,
/// so it is dropped last. Waits at most 10 minutes for another process.
pub fn serial() -> Serial {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(CROSS_PROCESS_LOCK)
        .ok(); // not root: docker_ready() skips or panics later anyway
    if let Some(f) = &file {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            // SAFETY: a valid open fd.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            if Instant::now() >= deadline {
                panic!("another test process holds {CROSS_PROCESS_LOCK} for 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Serial {
        _file: file,
        _guard: guard,
    }
}

/// Prints `TIMING <test>: <seconds>` to the real stderr when dropped.
pub struct TestTimer {
    name: String,
    start: Instant,
}

impl TestTimer {
    /// Starts timing the current test (named after the thread).
    pub fn start() -> TestTimer {
        TestTimer {
            name: std::thread::current().name().unwrap_or("?").to_string(),
            start: Instant::now(),
        }
    }
}

impl Drop for TestTimer {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "FAILED"
        } else {
            "ok"
        };
        report(&format!(
            "TIMING {}: {:.2} s ({outcome})",
            self.name,
            self.start.elapsed().as_secs_f64()
        ));
    }
}

// ───────────────────────────── environment check ─────────────────────────────

/// True if the Docker tests can run: [`privileged`] plus a Docker engine that
/// answers `docker info` and the test image [`TEST_IMAGE`]. Otherwise panics
/// when `CI=true` or `NATMAP_REQUIRE_PRIVILEGED=1` (hint: run
/// `scripts/deps.sh`), or prints `SKIP: …` and returns false.
///
/// The first successful call removes containers of earlier test processes
/// that no longer exist (`nmt-<pid>-…`), and natmap chains they left in the
/// root namespace.
pub fn docker_ready() -> bool {
    if !privileged() {
        return false;
    }
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        let mut missing = Vec::new();
        if find_on_path("docker").is_none() {
            missing.push("the `docker` CLI on PATH".to_string());
        } else {
            match run_quiet(Command::new("docker").arg("info"), Duration::from_secs(30)) {
                Ok(o) if o.status.success() => {
                    match run_quiet(
                        Command::new("docker").args(["image", "inspect", TEST_IMAGE]),
                        Duration::from_secs(30),
                    ) {
                        Ok(o) if o.status.success() => {}
                        _ => missing.push(format!("the test image {TEST_IMAGE}")),
                    }
                }
                Ok(o) => missing.push(format!(
                    "a running Docker engine (`docker info`: {})",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => missing.push(format!("a running Docker engine ({e})")),
            }
        }
        if missing.is_empty() {
            remove_stale_containers();
            Ok(())
        } else {
            Err(format!(
                "Docker integration test needs {} (run scripts/deps.sh)",
                missing.join(", ")
            ))
        }
    });
    match result {
        Ok(()) => true,
        Err(reason) => super::skip_or_fail(reason),
    }
}

fn remove_stale_containers() {
    let Ok(out) = run_quiet(
        Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            "name=^/?nmt-",
            "--format",
            "{{.Names}}",
        ]),
        DOCKER_TIMEOUT,
    ) else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = name
            .strip_prefix("nmt-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        report(&format!("harness: removing stale container {name}"));
        let _ = run_quiet(
            Command::new("docker").args(["rm", "-f", "-v", name]),
            DOCKER_TIMEOUT,
        );
    }
}

// ───────────────────────────── commands ─────────────────────────────

/// `docker args…` (bounded by [`DOCKER_TIMEOUT`]), output whatever the status.
pub fn docker(args: &[&str]) -> Output {
    run_with_timeout(Command::new("docker").args(args), DOCKER_TIMEOUT)
}

/// `docker args…`, panicking unless it succeeds; returns trimmed stdout.
#[track_caller]
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    check_output(&format!("docker {}", args.join(" ")), &out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A unique name `nmt-<pid>-<n>-<role>` for a container (or network).
pub fn unique_name(role: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "nmt-{}-{}-{role}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ───────────────────────────── containers ─────────────────────────────

/// A container of [`TEST_IMAGE`], removed (`docker rm -f -v`) on drop.
///
/// [`Container::web`] starts the standard web container:
/// * `busybox httpd` on port 80 (and on `extra_tcp_ports`) serving
///   `/index.html` = the marker line and the CGI `/cgi-bin/ip`, which prints
///   `$REMOTE_ADDR`, i.e. the client address the container saw;
/// * `/bin/udp-echo 5353 <marker>`: answers every datagram with the marker
///   followed by the payload.
pub struct Container {
    /// Container name.
    pub name: String,
    /// Marker text of a web container (its `index.html`, its UDP tag).
    pub marker: String,
    /// Extra TCP ports httpd listens on besides 80.
    pub extra_tcp_ports: Vec<u16>,
    id: String,
}

impl Container {
    /// Starts a web container named `unique_name(role)` (see the type docs)
    /// and waits until HTTP on every port and UDP on 5353 answer.
    pub fn web(role: &str, marker: &str, extra_tcp_ports: &[u16]) -> Container {
        Self::web_named(&unique_name(role), marker, extra_tcp_ports)
    }

    /// [`Container::web`] with an exact name (e.g. to recreate a container
    /// under the name of a removed one).
    pub fn web_named(name: &str, marker: &str, extra_tcp_ports: &[u16]) -> Container {
        let c = Self::spawn_web(name, marker, extra_tcp_ports, &[]);
        c.wait_ready();
        c
    }

    /// Runs a web container like [`Container::web_named`] with extra
    /// `docker run` options before the image (e.g. `--label`, `-p`), and
    /// returns as soon as `docker run -d` does (the container has started;
    /// its servers may not answer yet: see [`Container::wait_ready`]).
    pub fn spawn_web(
        name: &str,
        marker: &str,
        extra_tcp_ports: &[u16],
        run_args: &[&str],
    ) -> Container {
        assert!(
            !marker.is_empty()
                && marker
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "marker must be [A-Za-z0-9_-]+: {marker:?}"
        );
        let extra: Vec<String> = extra_tcp_ports.iter().map(|p| p.to_string()).collect();
        let script = format!(
            r#"set -e
mkdir -p /www/cgi-bin
echo {marker} > /www/index.html
printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%%s\\n" "$REMOTE_ADDR"\n' > /www/cgi-bin/ip
chmod 755 /www/cgi-bin/ip
for p in {extra}; do httpd -p "$p" -h /www; done
udp-echo {UDP_ECHO_PORT} {marker} &
exec httpd -f -p 80 -h /www
"#,
            extra = extra.join(" ")
        );
        let mut argv = vec!["run", "-d", "--name", name, "--label", "org.natmap.test=1"];
        argv.extend_from_slice(run_args);
        argv.extend_from_slice(&[TEST_IMAGE, "sh", "-c", &script]);
        let id = docker_ok(&argv);
        Container {
            name: name.to_string(),
            marker: marker.to_string(),
            extra_tcp_ports: extra_tcp_ports.to_vec(),
            id,
        }
    }

    /// Starts a container that tells its ports apart, for port ranges:
    /// `busybox httpd` on each of `tcp_ports`, serving `/index.html` =
    /// `t<port>`, and `udp-echo` on each of `udp_ports`, answering with
    /// `u<port>-` followed by the payload ([`per_port_tcp`],
    /// [`per_port_udp`]). Waits until every port answers at the
    /// container's address.
    pub fn per_port(role: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Container {
        let name = unique_name(role);
        let mut script = String::from("set -e\n");
        for p in tcp_ports {
            script.push_str(&format!(
                "mkdir -p /www{p} && echo {} > /www{p}/index.html && httpd -p {p} -h /www{p}\n",
                per_port_tcp(*p)
            ));
        }
        for p in udp_ports {
            script.push_str(&format!("udp-echo {p} {} &\n", per_port_udp(*p)));
        }
        script.push_str("exec sleep 3600\n");
        let id = docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "org.natmap.test=1",
            TEST_IMAGE,
            "sh",
            "-c",
            &script,
        ]);
        let c = Container {
            name,
            marker: String::new(),
            extra_tcp_ports: Vec::new(),
            id,
        };
        c.wait_per_port(tcp_ports, udp_ports);
        c
    }

    /// Waits until a [`Container::per_port`] container answers on every
    /// port at its address (after `docker start`, say).
    pub fn wait_per_port(&self, tcp_ports: &[u16], udp_ports: &[u16]) {
        let deadline = Instant::now() + CONTAINER_READY_TIMEOUT;
        loop {
            let ready = (|| -> Result<(), String> {
                let ip = self.ip().ok_or("no address yet")?;
                for p in tcp_ports {
                    let body = http_get(sa(ip, *p), "/", Duration::from_secs(1))?;
                    if body.trim() != per_port_tcp(*p) {
                        return Err(format!("port {p} answered {body:?}"));
                    }
                }
                for p in udp_ports {
                    let reply = udp_ask_once(
                        &Client::Host,
                        sa(ip, *p),
                        "ready",
                        Duration::from_millis(500),
                    )?;
                    if reply != format!("{}ready", per_port_udp(*p)) {
                        return Err(format!("udp {p} answered {reply:?}"));
                    }
                }
                Ok(())
            })();
            match ready {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "container {} not ready within {CONTAINER_READY_TIMEOUT:?}: {e}\n--- docker logs ---\n{}",
                    self.name,
                    self.logs()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Starts a container running `sleep` only (no servers), e.g. to occupy
    /// an address.
    pub fn sleeper(role: &str) -> Container {
        let name = unique_name(role);
        let id = docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "org.natmap.test=1",
            TEST_IMAGE,
            "sleep",
            "3600",
        ]);
        Container {
            name,
            marker: String::new(),
            extra_tcp_ports: Vec::new(),
            id,
        }
    }

    /// Full id (64 hex digits) of the container as created.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its IPv4 address (first network), `None` if it has none (stopped).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        let out = docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &self.name,
        ]);
        out.split_whitespace().find_map(|s| s.parse().ok())
    }

    /// [`Container::ip`], panicking if there is none.
    #[track_caller]
    pub fn ip4(&self) -> Ipv4Addr {
        self.ip()
            .unwrap_or_else(|| panic!("container {} has no IPv4 address", self.name))
    }

    /// `docker stop -t 2`.
    pub fn stop(&self) {
        docker_ok(&["stop", "-t", "2", &self.name]);
    }

    /// `docker start`, then waits until its servers answer (web containers).
    pub fn start(&self) {
        docker_ok(&["start", &self.name]);
        self.wait_ready();
    }

    /// `docker restart -t 2`, then waits until its servers answer.
    pub fn restart(&self) {
        docker_ok(&["restart", "-t", "2", &self.name]);
        self.wait_ready();
    }

    /// `docker rm -f -v` now (drop does it otherwise).
    pub fn remove(&self) {
        docker_ok(&["rm", "-f", "-v", &self.name]);
    }

    /// `docker logs` (stdout and stderr), for failure messages.
    pub fn logs(&self) -> String {
        match run_quiet(
            Command::new("docker").args(["logs", &self.name]),
            DOCKER_TIMEOUT,
        ) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e,
        }
    }

    /// Waits until a web container answers HTTP (its marker) on every port
    /// and UDP on [`UDP_ECHO_PORT`], directly at its address from the host.
    /// No-op for a container without marker.
    pub fn wait_ready(&self) {
        if self.marker.is_empty() {
            return;
        }
        let deadline = Instant::now() + CONTAINER_READY_TIMEOUT;
        let mut last;
        loop {
            let ready = (|| -> Result<(), String> {
                let ip = self.ip().ok_or("no address yet")?;
                for port in std::iter::once(80).chain(self.extra_tcp_ports.iter().copied()) {
                    let body = http_get(sa(ip, port), "/", Duration::from_secs(1))?;
                    if body.trim() != self.marker {
                        return Err(format!("port {port} answered {body:?}"));
                    }
                }
                let reply = udp_ask_once(
                    &Client::Host,
                    sa(ip, UDP_ECHO_PORT),
                    "ready",
                    Duration::from_millis(500),
                )?;
                if reply != format!("{}ready", self.marker) {
                    return Err(format!("udp answered {reply:?}"));
                }
                Ok(())
            })();
            match ready {
                Ok(()) => return,
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {} not ready within {CONTAINER_READY_TIMEOUT:?}: {last}\n--- docker logs ---\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "===== docker logs {} =====\n{}",
                self.name,
                self.logs()
            );
        }
        match run_quiet(
            Command::new("docker").args(["rm", "-f", "-v", &self.name]),
            DOCKER_TIMEOUT,
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No such container") => {}
            Ok(o) => report(&format!(
                "harness: docker rm -f {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => report(&format!("harness: docker rm -f {}: {e}", self.name)),
        }
    }
}

/// What a [`Container::per_port`] container serves on TCP `port`.
pub fn per_port_tcp(port: u16) -> String {
    format!("t{port}")
}

/// The marker a [`Container::per_port`] container's UDP `port` answers with.
pub fn per_port_udp(port: u16) -> String {
    format!("u{port}-")
}

/// Runs a throw-away container `docker run --rm --name nmt-… IMAGE argv…`
/// (removed by name afterwards even if it hangs) and returns its output.
pub fn docker_run_oneshot(role: &str, argv: &[&str], timeout: Duration) -> Output {
    let name = unique_name(role);
    struct RmOnDrop(String);
    impl Drop for RmOnDrop {
        fn drop(&mut self) {
            let _ = run_quiet(
                Command::new("docker").args(["rm", "-f", "-v", &self.0]),
                DOCKER_TIMEOUT,
            );
        }
    }
    let _rm = RmOnDrop(name.clone());
    let mut cmd = Command::new("docker");
    cmd.args([
        "run",
        "--rm",
        "--name",
        &name,
        "--label",
        "org.natmap.test=1",
        TEST_IMAGE,
    ])
    .args(argv);
    run_with_timeout(&mut cmd, timeout)
}

// ───────────────────────────── outside machine ─────────────────────────────

/// An "outside machine": a namespace joined to the ROOT namespace by a veth
/// pair. Root side `nmt<pid>o<n>` with [`HOST_V4`]/24, namespace side `eth0`
/// with [`OUTSIDE_V4`]/24 and a default route via [`HOST_V4`]. Drop deletes
/// the link (and the namespace).
pub struct OutsideHost {
    /// Root-namespace side of the veth pair.
    pub link: String,
    /// The outside machine.
    pub ns: Netns,
}

impl OutsideHost {
    /// Creates the namespace and the link and waits until both ends are up.
    pub fn new() -> OutsideHost {
        static N: AtomicUsize = AtomicUsize::new(0);
        let link = format!(
            "nmt{}o{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        assert!(link.len() <= 15, "interface name too long: {link}");
        let ns = Netns::new("outside");
        let host = OutsideHost { link, ns };
        let ip = |args: &[&str]| {
            let out = run_with_timeout(Command::new("ip").args(args), COMMAND_TIMEOUT);
            check_output(&format!("ip {}", args.join(" ")), &out);
        };
        ip(&[
            "link",
            "add",
            &host.link,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IF,
            "netns",
            &host.ns.name,
        ]);
        ip(&["addr", "add", &format!("{HOST_V4}/24"), "dev", &host.link]);
        ip(&["link", "set", &host.link, "up"]);
        host.ns
            .ip(&["addr", "add", &format!("{OUTSIDE_V4}/24"), "dev", HOST_IF]);
        host.ns.ip(&["link", "set", HOST_IF, "up"]);
        host.ns
            .ip(&["-4", "route", "add", "default", "via", &HOST_V4.to_string()]);
        wait_link_up(&host.ns, HOST_IF, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run_with_timeout(
                Command::new("ip").args(["-o", "link", "show", "dev", &host.link]),
                COMMAND_TIMEOUT,
            );
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("state UP") || text.contains("state UNKNOWN") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "link {} not up: {text}",
                host.link
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    /// This machine as a traffic source.
    pub fn client(&self) -> Client<'_> {
        Client::Ns(&self.ns)
    }
}

impl Default for OutsideHost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        match run_quiet(
            Command::new("ip").args(["link", "del", &self.link]),
            COMMAND_TIMEOUT,
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) => report(&format!(
                "harness: ip link del {} failed: {}",
                self.link,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => report(&format!("harness: ip link del {}: {e}", self.link)),
        }
        // self.ns is dropped (deleted) after this.
    }
}

// ───────────────────────────── traffic ─────────────────────────────

/// Where test traffic comes from: the host itself (the test process's own
/// namespace, i.e. the root namespace) or a test namespace.
#[derive(Clone, Copy)]
pub enum Client<'a> {
    /// The host (root namespace).
    Host,
    /// A test namespace (e.g. [`OutsideHost::ns`]).
    Ns(&'a Netns),
}

impl Client<'_> {
    /// Runs `f` where sockets belong to this client's namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match self {
            Client::Host => f(),
            Client::Ns(ns) => in_netns(ns, f),
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Client::Host => "the host".to_string(),
            Client::Ns(ns) => format!("netns {}", ns.name),
        }
    }
}

/// A minimal HTTP/1.0 GET: connects (bounded by `timeout`), sends the
/// request, reads the whole answer (same overall bound), and returns the
/// body if the status is 200. Any failure is an `Err` naming the step.
pub fn http_get(target: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let ctx = format!("GET http://{target}{path}");
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("{ctx}: connect: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10))
    };
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| format!("{ctx}: {e}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: natmap-test\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("{ctx}: send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| format!("{ctx}: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(format!(
                    "{ctx}: read: {e} (got so far: {:?})",
                    String::from_utf8_lossy(&buf)
                ))
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("{ctx}: no end of response within {timeout:?}"));
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("{ctx}: no HTTP header in {text:?}"));
    };
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{ctx}: status {status:?}, body {body:?}"));
    }
    Ok(body.to_string())
}

/// [`http_get`] from `client`'s namespace with [`PROBE_TIMEOUT`].
pub fn http_get_from(client: &Client, target: SocketAddr, path: &str) -> Result<String, String> {
    let path = path.to_string();
    client
        .run(move || http_get(target, &path, PROBE_TIMEOUT))
        .map_err(|e| format!("from {}: {e}", client.describe()))
}

/// Asserts that `GET /` from `client` to `target` returns `marker`.
#[track_caller]
pub fn expect_web(client: &Client, target: SocketAddr, marker: &str) {
    match http_get_from(client, target, "/") {
        Ok(body) if body.trim() == marker => {}
        Ok(body) => panic!(
            "expect_web: from {} to {target}: expected marker {marker:?}, got {body:?}",
            client.describe()
        ),
        Err(e) => panic!("expect_web: expected marker {marker:?}, but {e}"),
    }
}

/// Asserts that `GET /` from `client` to `target` gets NO answer within
/// [`NEGATIVE_TIMEOUT`] (refused, reset or timed out).
#[track_caller]
pub fn expect_no_web(client: &Client, target: SocketAddr) {
    let got = client.run(move || http_get(target, "/", NEGATIVE_TIMEOUT));
    if let Ok(body) = got {
        panic!(
            "expect_no_web: from {} to {target}: expected no answer, got {body:?}",
            client.describe()
        );
    }
}

/// The client address the web container saw for a request from `client` to
/// `target` (its `/cgi-bin/ip`), with `[::ffff:…]` unwrapped.
#[track_caller]
pub fn remote_addr_seen(client: &Client, target: SocketAddr) -> IpAddr {
    let body = http_get_from(client, target, "/cgi-bin/ip")
        .unwrap_or_else(|e| panic!("remote_addr_seen: {e}"));
    parse_remote_addr(&body).unwrap_or_else(|| panic!("CGI answered {body:?}"))
}

/// `"[::ffff:192.0.2.1]"`, `"192.0.2.1"` → the address (IPv4-mapped → IPv4).
pub fn parse_remote_addr(body: &str) -> Option<IpAddr> {
    let s = body.trim().trim_start_matches('[').trim_end_matches(']');
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Sends `payload` once from a fresh UDP socket in `client`'s namespace
/// (wildcard address, port 0) and returns the first reply from `target`.
pub fn udp_ask_once(
    client: &Client,
    target: SocketAddr,
    payload: &str,
    timeout: Duration,
) -> Result<String, String> {
    let sock = UdpClient::bind(client, sa(Ipv4Addr::UNSPECIFIED, 0))?;
    sock.ask(target, payload, timeout)
}

/// A UDP socket bound in a namespace to a fixed address/port, so several
/// exchanges share one flow (5-tuple) — what a stale conntrack entry keys on.
pub struct UdpClient {
    sock: UdpSocket,
    desc: String,
}

impl UdpClient {
    /// Binds `bind` inside `client`'s namespace.
    pub fn bind(client: &Client, bind: SocketAddr) -> Result<UdpClient, String> {
        let sock = client
            .run(|| UdpSocket::bind(bind))
            .map_err(|e| format!("udp bind {bind} in {}: {e}", client.describe()))?;
        Ok(UdpClient {
            desc: format!("udp from {} ({bind})", client.describe()),
            sock,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local_addr")
    }

    /// Sends `payload` to `target` and waits up to `timeout` for a reply
    /// from `target` that ends with `payload` (older replies and datagrams
    /// from elsewhere are skipped). Returns the reply.
    pub fn ask(
        &self,
        target: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let ctx = format!("{} to {target}", self.desc);
        self.sock
            .send_to(payload.as_bytes(), target)
            .map_err(|e| format!("{ctx}: send: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{ctx}: no reply to {payload:?} within {timeout:?}"));
            }
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|e| format!("{ctx}: {e}"))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if from == target && text.ends_with(payload) {
                        return Ok(text);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!("{ctx}: no reply to {payload:?} within {timeout:?}"))
                }
                // An ICMP error of an earlier datagram; keep waiting.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(format!("{ctx}: recv: {e}")),
            }
        }
    }
}

/// Asserts that UDP `payload` from `client` to `target` is answered by the
/// container with `marker` (udp-echo replies marker + payload).
#[track_caller]
pub fn expect_udp_echo(client: &Client, target: SocketAddr, marker: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let payload = format!(" probe{}", N.fetch_add(1, Ordering::Relaxed));
    match udp_ask_once(client, target, &payload, PROBE_TIMEOUT) {
        Ok(r) if r == format!("{marker}{payload}") => {}
        Ok(r) => panic!(
            "expect_udp_echo: from {} to {target}: expected {:?}, got {r:?}",
            client.describe(),
            format!("{marker}{payload}")
        ),
        Err(e) => panic!("expect_udp_echo: {e}"),
    }
}

/// Asserts that UDP from `client` to `target` gets no reply within
/// [`NEGATIVE_TIMEOUT`].
#[track_caller]
pub fn expect_no_udp_echo(client: &Client, target: SocketAddr) {
    if let Ok(r) = udp_ask_once(client, target, " nope", NEGATIVE_TIMEOUT) {
        panic!(
            "expect_no_udp_echo: from {} to {target}: expected no reply, got {r:?}",
            client.describe()
        );
    }
}

// ───────────────────────────── host ports ─────────────────────────────

/// True if a TCP listener can bind `0.0.0.0:port` in the root namespace now
/// (std sets SO_REUSEADDR, so TIME_WAIT leftovers do not count).
pub fn tcp_port_free(port: u16) -> bool {
    TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// True if a UDP socket can bind `0.0.0.0:port` in the root namespace now.
pub fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind(sa(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// `count` consecutive host ports free for TCP and UDP right now (the
/// first is returned), below the ephemeral range, as [`free_port`].
pub fn free_port_range(count: u16) -> u16 {
    for _ in 0..200 {
        let first = free_port();
        if first.checked_add(count).is_none() {
            continue;
        }
        if (1..count).all(|i| tcp_port_free(first + i) && udp_port_free(first + i)) {
            // Keep later free_port() calls out of this range.
            for _ in 1..count {
                free_port();
            }
            return first;
        }
    }
    panic!("no {count} consecutive free ports found");
}

/// A host port that is free for TCP and UDP right now, below the ephemeral
/// range (so no client socket picks it meanwhile), different on every call
/// and per test process.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 20000 + (std::process::id() as usize % 400) * 20;
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 10000) as u16;
        if tcp_port_free(port) && udp_port_free(port) {
            return port;
        }
    }
    panic!("no free port found");
}

// ───────────────────────────── the daemon, in the root namespace ─────────────────────────────

/// The natmap lines (mentioning `NATMAP` or `natmap:`) in the root
/// namespace's `iptables-save` and `ip6tables-save`, prefixed with the family.
pub fn natmap_lines_in_root() -> Vec<String> {
    let mut lines = Vec::new();
    for (fam, bin) in [("v4", "iptables-save"), ("v6", "ip6tables-save")] {
        let out = run_with_timeout(&mut Command::new(bin), COMMAND_TIMEOUT);
        check_output(bin, &out);
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if l.contains("NATMAP") || l.contains("natmap:") {
                lines.push(format!("{fam} {l}"));
            }
        }
    }
    lines
}

/// Removes natmap's jumps and chains from the root namespace (IPv4 and IPv6)
/// and nothing else: deletes `-j NATMAP…` jumps from PREROUTING, OUTPUT,
/// POSTROUTING and DOCKER-USER while they exist, then flushes and deletes
/// natmap's four chains. Never panics; returns what it removed.
pub fn remove_natmap_root_rules() -> Vec<String> {
    let mut removed = Vec::new();
    for bin in ["iptables", "ip6tables"] {
        let ipt = |args: &[&str]| {
            run_quiet(
                Command::new(bin).args(["-w", "10"]).args(args),
                COMMAND_TIMEOUT,
            )
            .map(|o| o.status.success())
            .unwrap_or(false)
        };
        for (table, hook, target) in NATMAP_JUMPS {
            for _ in 0..20 {
                if !ipt(&["-t", table, "-D", hook, "-j", target]) {
                    break;
                }
                removed.push(format!("{bin} -t {table} -D {hook} -j {target}"));
            }
        }
        for (table, chain) in NATMAP_CHAINS {
            if ipt(&["-t", table, "-S", chain]) {
                ipt(&["-t", table, "-F", chain]);
                if ipt(&["-t", table, "-X", chain]) {
                    removed.push(format!("{bin} -t {table} -X {chain}"));
                } else {
                    removed.push(format!("{bin} -t {table} -X {chain} FAILED"));
                }
            }
        }
        // The shards, once their parents (which jumped to them) are gone.
        for table in ["nat", "filter"] {
            let listed = run_quiet(
                Command::new(bin).args(["-w", "10", "-t", table, "-S"]),
                COMMAND_TIMEOUT,
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
            for shard in listed
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .filter(|name| {
                    natmap::firewall::iptables::Chain::ALL
                        .iter()
                        .any(|c| c.table() == table && c.is_shard_name(name))
                })
            {
                ipt(&["-t", table, "-F", shard]);
                if ipt(&["-t", table, "-X", shard]) {
                    removed.push(format!("{bin} -t {table} -X {shard}"));
                } else {
                    removed.push(format!("{bin} -t {table} -X {shard} FAILED"));
                }
            }
        }
    }
    removed
}

/// The real daemon in the ROOT namespace on a fresh temporary state dir:
/// `lab-ops -vv natmap daemon --state … --socket … --socket-group root
/// [extra args]`. Derefs to [`Daemon`] (cli, cli_json, log, …).
///
/// Before starting, natmap chains left in the root namespace by an earlier
/// crashed run are removed (and reported). On drop: SIGTERM and up to 5 s
/// for the daemon to remove its own chains and jumps, then SIGKILL; then any
/// natmap chain or jump still in the root namespace is removed with iptables
/// (reported on stderr, since a clean daemon leaves none).
pub struct RootDaemon {
    daemon: Daemon,
    _cleanup: RootRulesCleanup,
}

/// Removes natmap's rules from the root namespace when dropped (also when
/// the daemon failed to start).
struct RootRulesCleanup;

/// natmap daemons running in the test process's network namespace that this
/// process did not start: `(pid, command line)`.
pub fn foreign_root_daemons() -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(my_ns) = std::fs::read_link("/proc/self/ns/net") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_daemon = argv.first().is_some_and(|a| a.ends_with("lab-ops"))
            && argv.iter().any(|a| a == "natmap")
            && argv.iter().any(|a| a == "daemon");
        if !is_daemon {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) S ppid ...": state and parent after the last ')'.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if state == "Z" || ppid == Some(me) {
            continue;
        }
        if std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            != Some(&my_ns)
        {
            continue;
        }
        found.push((pid, argv.join(" ")));
    }
    found
}

/// Set to 1 to run the Docker tests although another natmap daemon runs in
/// the root namespace (its chains WILL be disturbed).
pub const ALLOW_FOREIGN_DAEMON_ENV: &str = "NATMAP_TEST_ALLOW_FOREIGN_DAEMON";

impl RootRulesCleanup {
    fn new() -> RootRulesCleanup {
        let foreign = foreign_root_daemons();
        if !foreign.is_empty() {
            let msg = format!(
                "another natmap daemon runs in the root network namespace: {foreign:?}. The \
                 Docker tests share its chains (NATMAP, NATMAP-OUTPUT, NATMAP-POSTROUTING) and \
                 remove them afterwards; stop it first, or set {ALLOW_FOREIGN_DAEMON_ENV}=1 to \
                 run anyway"
            );
            if std::env::var(ALLOW_FOREIGN_DAEMON_ENV).is_ok_and(|v| v == "1") {
                report(&format!("WARNING: {msg}"));
            } else {
                panic!("{msg}");
            }
        }
        let leftovers = remove_natmap_root_rules();
        if !leftovers.is_empty() {
            report(&format!(
                "harness: removed natmap rules left in the root namespace by an earlier run: {leftovers:?}"
            ));
        }
        RootRulesCleanup
    }
}

impl Drop for RootRulesCleanup {
    fn drop(&mut self) {
        let removed = remove_natmap_root_rules();
        if !removed.is_empty() {
            report(&format!(
                "harness: natmap chains/jumps were still in the root namespace after the daemon stopped; removed: {removed:?}"
            ));
        }
    }
}

impl RootDaemon {
    /// Starts the daemon with the real Docker socket (its default) and waits
    /// (≤ 5 s) until its log says it connected to Docker, so tests of
    /// other behaviour do not race the daemon's first connection (that race
    /// has a test of its own; see [`RootDaemon::start_no_wait`]).
    pub fn start() -> RootDaemon {
        let d = Self::start_no_wait();
        d.wait_docker_connected(Duration::from_secs(5));
        d
    }

    /// Starts the daemon with the real Docker socket and returns as soon as
    /// its control socket accepts.
    pub fn start_no_wait() -> RootDaemon {
        Self::start_with(&[] as &[&str])
    }

    /// Waits until the daemon log has a `connected to Docker` line; panics
    /// with the log after `timeout`.
    #[track_caller]
    pub fn wait_docker_connected(&self, timeout: Duration) {
        let start = Instant::now();
        while !self.daemon.log().contains("connected to Docker") {
            if start.elapsed() >= timeout {
                panic!(
                    "the daemon did not log `connected to Docker` within {timeout:?}\n--- daemon log ---\n{}",
                    self.daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon with `--docker-socket PATH`.
    pub fn start_with_docker_socket(path: &Path) -> RootDaemon {
        Self::start_with(&[std::ffi::OsStr::new("--docker-socket"), path.as_os_str()])
    }

    /// Starts the daemon with extra daemon arguments.
    pub fn start_with<S: AsRef<std::ffi::OsStr>>(extra: &[S]) -> RootDaemon {
        let cleanup = RootRulesCleanup::new();
        let daemon = Daemon::start_in_root_ns(&StateDir::new(), extra);
        RootDaemon {
            daemon,
            _cleanup: cleanup,
        }
    }

    /// Runs the CLI with `--json`, asserts exit 0 and `"ok": true`, returns `data`.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let (status, v) = self.daemon.cli_json_output(args);
        if !status.success() || v["ok"] != true || v["version"] != 1 {
            panic!(
                "lab-ops natmap --json {}: expected success, got {status}: {v}\n--- daemon log (tail) ---\n{}",
                args.join(" "),
                log_tail(&self.daemon.log(), 40)
            );
        }
        v["data"].clone()
    }

    /// Runs the CLI with `--json`, asserts exit 1 and `"ok": false`; returns
    /// (code, message).
    #[track_caller]
    pub fn err(&self, args: &[&str]) -> (String, String) {
        let (status, v) = self.daemon.cli_json_output(args);
        if status.code() != Some(1) || v["ok"] != false {
            panic!(
                "lab-ops natmap --json {}: expected an error (exit 1), got {status}: {v}",
                args.join(" ")
            );
        }
        (
            v["error"]["code"].as_str().unwrap_or("").to_string(),
            v["error"]["message"].as_str().unwrap_or("").to_string(),
        )
    }

    /// `ls [FILTER]` rules (JSON).
    #[track_caller]
    pub fn ls(&self, filter: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["ls"];
        args.extend(filter);
        let data = self.ok(&args);
        data["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("ls: no rules array: {data}"))
            .clone()
    }

    /// The rule with `id` in `ls`, if any.
    #[track_caller]
    pub fn rule(&self, id: u64) -> Option<serde_json::Value> {
        self.ls(None).into_iter().find(|r| r["id"] == id)
    }

    /// Polls `ls` (every 50 ms, up to `timeout`) until rule `id` satisfies
    /// `pred`; returns the rule and the time it took, or panics with the
    /// last rule seen.
    #[track_caller]
    pub fn wait_rule(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Duration) {
        let start = Instant::now();
        loop {
            let rule = self.rule(id);
            if let Some(r) = &rule {
                if pred(r) {
                    return (r.clone(), start.elapsed());
                }
            }
            if start.elapsed() >= timeout {
                panic!(
                    "rule {id} did not become {what} within {timeout:?}; last: {rule:?}\n--- daemon log (tail) ---\n{}",
                    log_tail(&self.daemon.log(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last `n` lines of `log`.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl std::ops::Deref for RootDaemon {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for RootDaemon {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl Drop for RootDaemon {
    fn drop(&mut self) {
        if self.daemon.is_running() && self.daemon.terminate(DAEMON_STOP_TIMEOUT).is_none() {
            report("harness: root-namespace daemon had to be SIGKILLed");
        }
        // Then: `daemon` drops (prints its log if the test panicked) and
        // `_cleanup` removes whatever natmap rules are left.
    }
}

// ───────────────────────────── Docker's own rules ─────────────────────────────

/// Docker's own rules (IPv4) as `iptables -S` prints them: filter DOCKER,
/// DOCKER-ISOLATION-STAGE-1/2, FORWARD, DOCKER-USER and nat DOCKER,
/// PREROUTING, OUTPUT, POSTROUTING, without any line mentioning NATMAP.
pub fn docker_rules_snapshot() -> Vec<String> {
    let mut lines = Vec::new();
    for (table, chain) in [
        ("filter", "DOCKER"),
        ("filter", "DOCKER-ISOLATION-STAGE-1"),
        ("filter", "DOCKER-ISOLATION-STAGE-2"),
        ("filter", "FORWARD"),
        ("filter", "DOCKER-USER"),
        ("nat", "DOCKER"),
        ("nat", "PREROUTING"),
        ("nat", "OUTPUT"),
        ("nat", "POSTROUTING"),
    ] {
        let out = run_with_timeout(
            Command::new("iptables").args(["-w", "10", "-t", table, "-S", chain]),
            COMMAND_TIMEOUT,
        );
        if !out.status.success() {
            lines.push(format!("{table} {chain}: <missing>"));
            continue;
        }
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if !l.contains("NATMAP") {
                lines.push(format!("{table} {l}"));
            }
        }
    }
    lines
}

/// `iptables -S` lines of the root namespace for `table`/`chain` (empty if
/// the chain does not exist).
pub fn root_chain(v6: bool, table: &str, chain: &str) -> Vec<String> {
    // natmap's sharded chains read as one (`expand_shards`); `read("")`
    // reads the whole table.
    let read = |chain: &str| {
        let args = ["-w", "10", "-t", table, "-S", chain];
        let args = if chain.is_empty() {
            &args[..5]
        } else {
            &args[..]
        };
        let out = run_with_timeout(Command::new(iptables_bin(v6)).args(args), COMMAND_TIMEOUT);
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
    };
    read(chain)
        .map(|lines| expand_shards(table, chain, lines, || read("").unwrap_or_default()))
        .unwrap_or_default()
}

// ───────────────────────────── engine restart ─────────────────────────────

/// Restarts the host's Docker engine: `systemctl restart docker` under
/// systemd, else SIGTERM to dockerd (which stops its containers) and
/// `scripts/deps.sh` to start it again (containers with a restart policy
/// come back).
pub fn restart_docker_engine() {
    if systemd_runs() {
        let out = run_quiet(
            Command::new("systemctl").args(["restart", "docker"]),
            Duration::from_secs(120),
        )
        .expect("systemctl restart docker");
        assert!(out.status.success(), "systemctl restart docker: {out:?}");
        return;
    }
    stop_docker_engine();
    start_docker_engine();
}

fn systemd_runs() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// Stops dockerd with SIGTERM (as `systemctl stop` would) and waits until it
/// is gone (≤ 60 s).
pub fn stop_docker_engine() {
    if systemd_runs() {
        let out = run_quiet(
            Command::new("systemctl").args(["stop", "docker", "docker.socket"]),
            Duration::from_secs(120),
        )
        .expect("systemctl stop docker");
        assert!(out.status.success(), "systemctl stop docker: {out:?}");
        return;
    }
    let pids = String::from_utf8_lossy(
        &Command::new("pidof")
            .arg("dockerd")
            .output()
            .expect("pidof")
            .stdout,
    )
    .into_owned();
    for pid in pids.split_whitespace() {
        let pid: i32 = pid.parse().expect("pid");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd {pid} did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Starts dockerd again (`systemctl start docker`, or `scripts/deps.sh`,
/// which starts it in the background) and waits until it answers.
pub fn start_docker_engine() {
    let out = if systemd_runs() {
        run_quiet(
            Command::new("systemctl").args(["start", "docker"]),
            Duration::from_secs(120),
        )
    } else {
        let deps = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps.sh");
        run_quiet(Command::new("bash").arg(&deps), Duration::from_secs(180))
    }
    .expect("start dockerd");
    assert!(out.status.success(), "starting dockerd failed: {out:?}");
}
