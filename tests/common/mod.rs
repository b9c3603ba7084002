//! Integration-test harness for natmap: real network namespaces, real
//! iptables, real sockets (DESIGN.md §8).
//!
//! Use it from a test file with `mod common;` and start every test with
//!
//! ```ignore
//! if !common::privileged() { return; }
//! let topo = common::Topology::new();
//! ```
//!
//! Everything here happens inside namespaces this module creates and
//! destroys: no interface, address, route or rule is ever created in the
//! namespace the test process runs in, so tests may run in parallel (each
//! with its own [`Topology`]) and a crashed run leaves at most some named
//! namespaces behind, which the next run removes (see [`privileged`]).
//!
//! ```text
//!  client ──veth── router ──br0──┬──veth── server
//!  eth0            ext0   (bridge)└──veth── server2
//!  192.0.2.2       192.0.2.1   198.51.100.1     198.51.100.2 / .3
//!  2001:db8:1::2   2001:db8:1::1  2001:db8:2::1 2001:db8:2::2 / ::3
//! ```
//!
//! Traffic helpers ([`TcpEcho`], [`UdpEcho`], [`tcp_probe`], [`udp_probe`],
//! the `expect_*` assertions) create their sockets inside a namespace with
//! [`in_netns`], so no external helper program (nc, ping, curl) is needed.
//! Every network operation has a bounded timeout ([`PROBE_TIMEOUT`],
//! [`NEGATIVE_TIMEOUT`]) and every spawned command one as well
//! ([`COMMAND_TIMEOUT`]), so a broken test fails instead of hanging.
#![allow(dead_code)]

/// Fixtures for the Docker tests (root namespace, real engine).
pub mod docker;

/// Fixtures for the auto-discover tests (remote engine over TCP, service node, config file).
pub mod auto_discover;

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// ───────────────────────────── constants ─────────────────────────────

/// Default time a positive probe (connect + read the reply) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a negative probe ([`expect_no_tcp`], [`expect_no_udp`]) waits before
/// concluding that traffic does not get through.
pub const NEGATIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound for any external command the harness runs (`ip`, `iptables`,
/// the natmap CLI). A command running longer is killed and the test panics.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Daemon::start`] waits for the control socket to accept.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Daemon::stop`] waits for the daemon to exit after SIGTERM.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Prefix of every namespace the harness creates (`nmt-<pid>-<n>-<role>`).
pub const NETNS_PREFIX: &str = "nmt-";

/// Client address (on the client's `eth0`), the "outside world".
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Router address on the client-facing side ([`ROUTER_EXT_IF`]), i.e. the
/// host's public address that DNAT rules match.
pub const ROUTER_EXT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Router address on the internal side ([`ROUTER_INT_IF`], the bridge).
pub const ROUTER_INT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Internal server (the DNAT target, like a container or a VM).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Second internal host on the same bridge (for hairpin tests).
pub const SERVER2_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Prefix length of both IPv4 segments.
pub const PREFIX_V4: u8 = 24;

/// IPv6 counterpart of [`CLIENT_V4`].
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// IPv6 counterpart of [`ROUTER_EXT_V4`].
pub const ROUTER_EXT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// IPv6 counterpart of [`ROUTER_INT_V4`].
pub const ROUTER_INT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// IPv6 counterpart of [`SERVER_V4`].
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// IPv6 counterpart of [`SERVER2_V4`].
pub const SERVER2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3);
/// Prefix length of both IPv6 segments.
pub const PREFIX_V6: u8 = 64;

/// Router interface facing the client (a veth; its peer is the client's `eth0`).
pub const ROUTER_EXT_IF: &str = "ext0";
/// Router interface facing the servers: a bridge holding the router's
/// internal addresses, with one veth port per server.
pub const ROUTER_INT_IF: &str = "br0";
/// Interface name of client, server and server2 (each in its own namespace).
pub const HOST_IF: &str = "eth0";

// ───────────────────────────── privileges ─────────────────────────────

/// True if this process can run the real-kernel tests: euid 0, `ip`,
/// `iptables` and `ip6tables` on `PATH`, and network namespaces can actually
/// be created (checked once per process by creating and deleting one; root
/// inside an unprivileged container fails here).
///
/// If something is missing and the environment demands these tests
/// (`CI=true` or `NATMAP_REQUIRE_PRIVILEGED=1`), this PANICS naming what is
/// missing; otherwise it prints `SKIP: <reason> (<test name>)` to stderr
/// (uncaptured, so it shows in a normal `cargo test` run) and returns false.
///
/// The first successful call also removes namespaces left behind by earlier
/// test processes that died (`nmt-<pid>-…` whose pid no longer exists),
/// SIGKILLing whatever still runs inside them (e.g. a daemon of a test that
/// was itself SIGKILLed).
pub fn privileged() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        let mut missing = Vec::new();
        if !nix::unistd::geteuid().is_root() {
            missing.push("root (effective uid 0)".to_string());
        }
        for tool in ["ip", "iptables", "ip6tables"] {
            if find_on_path(tool).is_none() {
                missing.push(format!("`{tool}` on PATH"));
            }
        }
        if missing.is_empty() {
            if let Err(e) = probe_netns_creation() {
                missing.push(format!("permission to create network namespaces ({e})"));
            }
        }
        if missing.is_empty() {
            remove_stale_namespaces();
            Ok(())
        } else {
            Err(format!(
                "real-kernel integration test needs {}",
                missing.join(", ")
            ))
        }
    });
    match result {
        Ok(()) => true,
        Err(reason) => skip_or_fail(reason),
    }
}

/// A test's prerequisites are missing: panics when the environment demands
/// the test (`CI=true` or `NATMAP_REQUIRE_PRIVILEGED=1`), otherwise prints
/// `SKIP: <reason> (<test>)` and returns false.
pub fn skip_or_fail(reason: &str) -> bool {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("NATMAP_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    if required {
        panic!(
            "{reason} (CI=true or NATMAP_REQUIRE_PRIVILEGED=1 is set, so this is an \
             error, not a skip)"
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    // Written to the real stderr, not via eprintln!: libtest captures
    // the print macros of passing tests, and a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIP: {reason} ({test})");
    false
}

/// Full path of `tool` if it is an executable file in one of `PATH`'s directories.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn probe_netns_creation() -> Result<(), String> {
    let name = format!("{NETNS_PREFIX}{}-probe", std::process::id());
    let _guard = netns_lock();
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    Ok(())
}

/// Deletes `nmt-<pid>-…` namespaces whose creating process is gone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let _guard = netns_lock();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Lines look like "nmt-123-4-router (id: 7)" or "nmt-123-4-router".
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its test process is still running (maybe in parallel)
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "harness: removing stale namespace {name}"
        );
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}

/// Serialises `ip netns add/del` inside this process: concurrent first use of
/// `/run/netns` (which `ip` bind-mounts onto itself) is racy.
fn netns_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ───────────────────────────── commands ─────────────────────────────

/// Runs `cmd` with stdin closed and stdout/stderr captured, killing it and
/// panicking if it runs longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                panic!(
                    "command timed out after {timeout:?} and was killed: {desc}\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Panics with the command line, status, stdout and stderr unless `out` succeeded.
pub fn check_output(what: &str, out: &Output) {
    if !out.status.success() {
        panic!(
            "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn describe<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ───────────────────────────── namespaces ─────────────────────────────

static NETNS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// The name is `nmt-<pid>-<n>-<role>`, unique per process (atomic counter)
/// and across concurrently running test processes (pid). On creation the
/// loopback interface is brought up, IPv6 duplicate address detection is
/// disabled (`accept_dad=0` for `all` and `default`), so IPv6 addresses are
/// usable (bindable, routable) immediately instead of staying "tentative"
/// for ~1-2 s, and the IPv4 settings a new namespace would otherwise copy
/// from the host are pinned: `ip_forward=0`, `rp_filter=0`,
/// `route_localnet=0` (all and default).
#[derive(Debug)]
pub struct Netns {
    /// The name as `ip netns list` shows it.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace; `role` (e.g. "router") only makes the name readable.
    pub fn new(role: &str) -> Netns {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{n}-{role}", std::process::id());
        {
            let _guard = netns_lock();
            let out = run_with_timeout(
                Command::new("ip").args(["netns", "add", &name]),
                COMMAND_TIMEOUT,
            );
            check_output(&format!("ip netns add {name}"), &out);
        }
        let ns = Netns { name };
        ns.sysctl_set_many(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            // A new namespace inherits the IPv4 `all`/`default` settings of
            // the host (net.core.devconf_inherit_init_net=0 means exactly
            // that for IPv4; IPv6 starts from kernel defaults). Pin the ones
            // that change test outcomes so results don't depend on the host
            // (a Docker host has ip_forward=1, distributions set rp_filter).
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.route_localnet", "0"),
            ("net.ipv4.conf.default.route_localnet", "0"),
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The bind-mounted namespace file, `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `ip netns exec <name> argv…` (bounded by [`COMMAND_TIMEOUT`]) and
    /// returns its output whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        assert!(!argv.is_empty(), "Netns::exec needs a program");
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
            COMMAND_TIMEOUT,
        )
    }

    /// Like [`Netns::exec`] but panics (with stdout/stderr) unless the command
    /// succeeds; returns stdout.
    pub fn run_ok<S: AsRef<OsStr>>(&self, argv: &[S]) -> String {
        let out = self.exec(argv);
        check_output(&format!("[netns {}] {}", self.name, describe(argv)), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n <name> args…` (cheaper than `exec`: no mount namespace),
    /// panics on failure, returns stdout.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = run_with_timeout(
            Command::new("ip").args(["-n", &self.name]).args(args),
            COMMAND_TIMEOUT,
        );
        check_output(&format!("ip -n {} {}", self.name, describe(args)), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a sysctl of this namespace, e.g.
    /// `ns.sysctl_set("net.ipv4.ip_forward", "1")`. Done by writing
    /// `/proc/sys/...` from a thread inside the namespace (`/proc/sys/net`
    /// resolves against the calling *thread's* namespace), so no `sysctl`
    /// binary is needed. Panics if the key does not exist.
    pub fn sysctl_set(&self, key: &str, value: &str) {
        let path = sysctl_path(key);
        in_netns(self, || std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("[netns {}] sysctl {key}={value}: {e}", self.name));
    }

    /// Several [`Netns::sysctl_set`]s, in order, from one thread.
    pub fn sysctl_set_many(&self, settings: &[(&str, &str)]) {
        in_netns(self, || {
            for (key, value) in settings {
                std::fs::write(sysctl_path(key), value)
                    .unwrap_or_else(|e| panic!("[netns {}] sysctl {key}={value}: {e}", self.name));
            }
        })
    }

    /// Reads a sysctl of this namespace, trimmed; `None` if it does not exist.
    pub fn sysctl_get(&self, key: &str) -> Option<String> {
        let path = sysctl_path(key);
        in_netns(self, || std::fs::read_to_string(&path))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// True if `ip netns list` shows a namespace called `name`.
    pub fn exists(name: &str) -> bool {
        let out = run_with_timeout(Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _guard = netns_lock();
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "harness: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("harness: cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs `f` on a fresh thread that first entered `ns`'s network namespace
/// (`setns(open("/var/run/netns/NAME"), CLONE_NEWNET)`) and returns its
/// result; a panic in `f` is propagated.
///
/// Only the new thread switches namespace; the caller's does not. A socket
/// belongs to the namespace it was created in for its whole life, so a
/// listener or client socket made inside `f` and returned keeps living in
/// `ns` even when used from any other thread afterwards.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path();
    let name = &ns.name;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn_scoped(scope, move || {
                let file =
                    File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({}, CLONE_NEWNET): {e}", path.display()));
                f()
            })
            .expect("spawn in_netns thread");
        match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

// ───────────────────────────── topology ─────────────────────────────

/// The per-test network of DESIGN.md §8:
///
/// ```text
/// client(eth0) ─veth─ (ext0)router(br0) ─┬─veth─ (eth0)server
///                                        └─veth─ (eth0)server2
/// ```
///
/// * Addresses: see the `*_V4` / `*_V6` constants; client, server and
///   server2 have default routes (v4 and v6) via the router.
/// * Router: `net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`,
///   filter `FORWARD` policy `DROP` in iptables and ip6tables (like a Docker
///   host): nothing is forwarded until a rule (natmap's, or the test's)
///   accepts it.
/// * The internal side is a bridge (`br0`) holding the router's internal
///   addresses, so server2 can reach the router's *external* address
///   (hairpin) while server and server2 talk to each other directly at L2.
///   Bridged server↔server2 frames do NOT pass the router's iptables: the
///   harness sets `net.bridge.bridge-nf-call-ip{,6}tables=0` in the router
///   (br_netfilter, if loaded, defaults to 1 in new namespaces); see
///   [`Topology::set_bridge_netfilter`] to get the Docker-host behaviour.
/// * All links are created inside the namespaces (`ip -n router link add …
///   peer … netns other`), never in the test's own namespace, so interface
///   names are fixed and nothing leaks when namespaces are deleted.
///
/// Dropping the topology deletes all four namespaces (and with them every
/// interface, address, route and iptables rule in them).
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub server2: Netns,
}

impl Topology {
    /// Builds the whole topology and waits until its links are up.
    pub fn new() -> Topology {
        let topo = Topology {
            client: Netns::new("client"),
            router: Netns::new("router"),
            server: Netns::new("server"),
            server2: Netns::new("server2"),
        };
        let r = &topo.router;

        // Links, all created from inside the router namespace.
        r.ip(&[
            "link",
            "add",
            ROUTER_EXT_IF,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IF,
            "netns",
            &topo.client.name,
        ]);
        r.ip(&[
            "link",
            "add",
            ROUTER_INT_IF,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ]);
        for (port, host) in [("veth-srv", &topo.server), ("veth-srv2", &topo.server2)] {
            r.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", &host.name,
            ]);
            r.ip(&["link", "set", port, "master", ROUTER_INT_IF]);
            r.ip(&["link", "set", port, "up"]);
        }
        for (dev, v4, v6) in [
            (ROUTER_EXT_IF, ROUTER_EXT_V4, ROUTER_EXT_V6),
            (ROUTER_INT_IF, ROUTER_INT_V4, ROUTER_INT_V6),
        ] {
            r.ip(&["addr", "add", &format!("{v4}/{PREFIX_V4}"), "dev", dev]);
            r.ip(&[
                "addr",
                "add",
                &format!("{v6}/{PREFIX_V6}"),
                "dev",
                dev,
                "nodad",
            ]);
            r.ip(&["link", "set", dev, "up"]);
        }
        r.sysctl_set("net.ipv4.ip_forward", "1");
        r.sysctl_set("net.ipv6.conf.all.forwarding", "1");
        topo.set_bridge_netfilter(false);
        for v6 in [false, true] {
            iptables(r, v6, &["-P", "FORWARD", "DROP"]);
        }

        for (host, v4, v6, gw4, gw6) in [
            (
                &topo.client,
                CLIENT_V4,
                CLIENT_V6,
                ROUTER_EXT_V4,
                ROUTER_EXT_V6,
            ),
            (
                &topo.server,
                SERVER_V4,
                SERVER_V6,
                ROUTER_INT_V4,
                ROUTER_INT_V6,
            ),
            (
                &topo.server2,
                SERVER2_V4,
                SERVER2_V6,
                ROUTER_INT_V4,
                ROUTER_INT_V6,
            ),
        ] {
            host.ip(&["addr", "add", &format!("{v4}/{PREFIX_V4}"), "dev", HOST_IF]);
            host.ip(&[
                "addr",
                "add",
                &format!("{v6}/{PREFIX_V6}"),
                "dev",
                HOST_IF,
                "nodad",
            ]);
            host.ip(&["link", "set", HOST_IF, "up"]);
            host.ip(&["-4", "route", "add", "default", "via", &gw4.to_string()]);
            host.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()]);
        }

        for (ns, dev) in [
            (&topo.router, ROUTER_EXT_IF),
            (&topo.router, ROUTER_INT_IF),
            (&topo.client, HOST_IF),
            (&topo.server, HOST_IF),
            (&topo.server2, HOST_IF),
        ] {
            wait_link_up(ns, dev, Duration::from_secs(5));
        }
        topo
    }

    /// Router interface facing the client ("ext0"), e.g. for `--ext-if`.
    pub fn router_ext_if(&self) -> &'static str {
        ROUTER_EXT_IF
    }

    /// Router interface facing the servers (the bridge "br0"), e.g. for `snat --ext-if`
    /// in the reverse direction or for checking rules.
    pub fn router_int_if(&self) -> &'static str {
        ROUTER_INT_IF
    }

    /// The four namespaces, client first.
    pub fn all(&self) -> [&Netns; 4] {
        [&self.client, &self.router, &self.server, &self.server2]
    }

    /// Names of the four namespaces (e.g. to check they are gone after drop).
    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|ns| ns.name.clone()).collect()
    }

    /// Whether bridged server↔server2 traffic passes the router's
    /// iptables/ip6tables (`net.bridge.bridge-nf-call-ip{,6}tables`), as on
    /// a Docker host with br_netfilter. Off by default. Without the
    /// br_netfilter module the sysctls do not exist: turning it off is then
    /// a no-op, turning it on panics.
    pub fn set_bridge_netfilter(&self, on: bool) {
        let value = if on { "1" } else { "0" };
        for key in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ] {
            if self.router.sysctl_get(key).is_some() {
                self.router.sysctl_set(key, value);
            } else if on {
                panic!("{key} does not exist: br_netfilter is not loaded");
            }
        }
    }
}

/// Waits until `dev` in `ns` is operationally up (`state UP`, or `UNKNOWN`
/// for devices without carrier reporting); panics after `timeout`.
pub fn wait_link_up(ns: &Netns, dev: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = ns.ip(&["-o", "link", "show", "dev", dev]);
        if out.contains("state UP") || out.contains("state UNKNOWN") {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "[netns {}] link {dev} not up after {timeout:?}: {out}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ───────────────────────────── echo servers ─────────────────────────────

/// The reply line an echo server sends: `"<peer_ip> <local_port>"`, where
/// peer_ip is how the server sees the client (after any SNAT/MASQUERADE)
/// and local_port the port it was reached on (after any DNAT).
pub fn echo_reply(peer_ip: IpAddr, local_port: u16) -> String {
    format!("{} {local_port}", peer_ip.to_canonical())
}

/// A TCP server in a namespace: for every connection it writes one line
/// `"<peer_ip> <local_port>\n"` and closes. Runs on a background thread
/// until dropped; drop stops the thread and closes the listener (later
/// connections are refused).
///
/// Bind to a concrete address or to `0.0.0.0` / `[::]` (dual stack); port 0
/// picks a free port, see [`TcpEcho::addr`].
pub struct TcpEcho {
    addr: SocketAddr,
    ns_name: String,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    /// Listens on `bind` inside `ns`; panics if the bind fails.
    pub fn start(ns: &Netns, bind: SocketAddr) -> TcpEcho {
        let listener = in_netns(ns, || TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("[netns {}] TcpEcho bind {bind}: {e}", ns.name));
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let connections = connections.clone();
            let ns_name = ns.name.clone();
            std::thread::Builder::new()
                .name(format!("tcp-echo-{addr}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, peer)) => {
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                                let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
                                let line = format!("{}\n", echo_reply(peer.ip(), port));
                                let _ = stream.write_all(line.as_bytes());
                                connections.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                            Err(e) => {
                                eprintln!("[netns {ns_name}] TcpEcho {addr} accept: {e}");
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
                .expect("spawn TcpEcho thread")
        };
        TcpEcho {
            addr,
            ns_name: ns.name.clone(),
            stop,
            connections,
            thread: Some(thread),
        }
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections were answered so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server in a namespace: every datagram is answered with
/// `"<peer_ip> <local_port>"` sent back to the sender. Runs until dropped.
///
/// Note: a socket bound to a wildcard address answers from whatever source
/// address the routing table picks; on a host with several addresses a
/// client that sent to another one drops the reply. Bind to the concrete
/// address being tested when the namespace has more than one (the router),
/// the servers have one address per family so wildcard is fine there.
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    datagrams: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `bind` inside `ns`; panics if the bind fails.
    pub fn start(ns: &Netns, bind: SocketAddr) -> UdpEcho {
        let socket = in_netns(ns, || UdpSocket::bind(bind))
            .unwrap_or_else(|e| panic!("[netns {}] UdpEcho bind {bind}: {e}", ns.name));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set_read_timeout");
        let addr = socket.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let datagrams = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let datagrams = datagrams.clone();
            let ns_name = ns.name.clone();
            std::thread::Builder::new()
                .name(format!("udp-echo-{addr}"))
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buf) {
                            Ok((_, peer)) => {
                                let reply = echo_reply(peer.ip(), addr.port());
                                if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
                                    eprintln!(
                                        "[netns {ns_name}] UdpEcho {addr} reply to {peer}: {e}"
                                    );
                                }
                                datagrams.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            // ICMP errors from earlier replies surface here; ignore.
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                            Err(e) => {
                                eprintln!("[netns {ns_name}] UdpEcho {addr} recv: {e}");
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
                .expect("spawn UdpEcho thread")
        };
        UdpEcho {
            addr,
            stop,
            datagrams,
            thread: Some(thread),
        }
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many datagrams were answered so far.
    pub fn datagrams(&self) -> usize {
        self.datagrams.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ───────────────────────────── probes ─────────────────────────────

/// Connects from inside `ns` to `target` (source address chosen by the
/// kernel), reads the echo line and returns it trimmed, e.g.
/// `"192.0.2.2 25"`. Bounded by [`PROBE_TIMEOUT`].
pub fn tcp_probe(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    tcp_probe_opts(ns, None, target, PROBE_TIMEOUT)
}

/// Like [`tcp_probe`] but binds the client socket to `bind_src` (port 0)
/// first, e.g. to connect from the router's external address.
pub fn tcp_probe_from(ns: &Netns, bind_src: IpAddr, target: SocketAddr) -> Result<String, String> {
    tcp_probe_opts(ns, Some(bind_src), target, PROBE_TIMEOUT)
}

/// The general TCP probe: optional source address, explicit overall timeout
/// (connect + read).
pub fn tcp_probe_opts(
    ns: &Netns,
    bind_src: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    let ctx = match bind_src {
        Some(src) => format!("tcp from netns {} (src {src}) to {target}", ns.name),
        None => format!("tcp from netns {} to {target}", ns.name),
    };
    let deadline = Instant::now() + timeout;
    let mut stream = in_netns(ns, || match bind_src {
        None => TcpStream::connect_timeout(&target, timeout),
        Some(src) => connect_from(src, target, timeout),
    })
    .map_err(|e| format!("{ctx}: connect: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| format!("{ctx}: set_read_timeout: {e}"))?;
    let mut reply = String::new();
    match stream.read_to_string(&mut reply) {
        Ok(_) if !reply.is_empty() => Ok(reply.trim().to_string()),
        Ok(_) => Err(format!(
            "{ctx}: connected, but the peer closed without a reply"
        )),
        Err(e) => Err(format!("{ctx}: read: {e} (got so far: {reply:?})")),
    }
}

/// `connect_timeout` with the local address bound first (std cannot do that).
fn connect_from(src: IpAddr, target: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends one datagram from inside `ns` to `target` and waits (up to
/// [`PROBE_TIMEOUT`]) for the echo reply, returned trimmed.
pub fn udp_probe(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    udp_probe_opts(ns, None, target, PROBE_TIMEOUT)
}

/// Like [`udp_probe`] but sends from `bind_src` (port 0).
pub fn udp_probe_from(ns: &Netns, bind_src: IpAddr, target: SocketAddr) -> Result<String, String> {
    udp_probe_opts(ns, Some(bind_src), target, PROBE_TIMEOUT)
}

/// The general UDP probe. The client socket is `connect`ed to `target`, so
/// a reply from any other address is ignored (as a real client would) and
/// an ICMP port-unreachable shows up as "connection refused".
pub fn udp_probe_opts(
    ns: &Netns,
    bind_src: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    let ctx = format!("udp from netns {} to {target}", ns.name);
    let src = bind_src.unwrap_or(match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let socket = in_netns(ns, || UdpSocket::bind(SocketAddr::new(src, 0)))
        .map_err(|e| format!("{ctx}: bind {src}: {e}"))?;
    socket
        .connect(target)
        .map_err(|e| format!("{ctx}: connect: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("{ctx}: set_read_timeout: {e}"))?;
    socket
        .send(b"probe")
        .map_err(|e| format!("{ctx}: send: {e}"))?;
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(format!("{ctx}: no reply within {timeout:?}"))
        }
        Err(e) => Err(format!("{ctx}: recv: {e}")),
    }
}

/// Asserts that a TCP connection from `ns` to `target` is answered by an
/// echo server that saw the client as `expected_peer_ip` and was reached on
/// `expected_port` (both after NAT).
#[track_caller]
pub fn expect_tcp(
    ns: &Netns,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    check_reply(
        "expect_tcp",
        &ns.name,
        target,
        &expected,
        tcp_probe(ns, target),
    );
}

/// [`expect_tcp`] with the client socket bound to `bind_src`.
#[track_caller]
pub fn expect_tcp_from(
    ns: &Netns,
    bind_src: impl Into<IpAddr>,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    let got = tcp_probe_from(ns, bind_src.into(), target);
    check_reply("expect_tcp_from", &ns.name, target, &expected, got);
}

/// UDP counterpart of [`expect_tcp`].
#[track_caller]
pub fn expect_udp(
    ns: &Netns,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    check_reply(
        "expect_udp",
        &ns.name,
        target,
        &expected,
        udp_probe(ns, target),
    );
}

/// UDP counterpart of [`expect_tcp_from`].
#[track_caller]
pub fn expect_udp_from(
    ns: &Netns,
    bind_src: impl Into<IpAddr>,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    let got = udp_probe_from(ns, bind_src.into(), target);
    check_reply("expect_udp_from", &ns.name, target, &expected, got);
}

#[track_caller]
fn check_reply(
    what: &str,
    ns: &str,
    target: SocketAddr,
    expected: &str,
    got: Result<String, String>,
) {
    match got {
        Ok(reply) if reply == expected => {}
        Ok(reply) => panic!(
            "{what}: from netns {ns} to {target}: reached an echo server, but it replied \
             {reply:?} instead of {expected:?} (\"<peer ip as the server saw it> <port it was \
             reached on>\")"
        ),
        // `e` already names the namespace and the target.
        Err(e) => panic!("{what}: expected reply {expected:?}, but {e}"),
    }
}

/// Asserts that a TCP connection from `ns` to `target` does NOT get an echo
/// reply within [`NEGATIVE_TIMEOUT`] (refused, unreachable or timed out).
#[track_caller]
pub fn expect_no_tcp(ns: &Netns, target: SocketAddr) {
    if let Ok(reply) = tcp_probe_opts(ns, None, target, NEGATIVE_TIMEOUT) {
        panic!("expect_no_tcp: from netns {} to {target}: expected no connection, but got reply {reply:?}", ns.name);
    }
}

/// Asserts that a UDP datagram from `ns` to `target` gets no reply within
/// [`NEGATIVE_TIMEOUT`].
#[track_caller]
pub fn expect_no_udp(ns: &Netns, target: SocketAddr) {
    if let Ok(reply) = udp_probe_opts(ns, None, target, NEGATIVE_TIMEOUT) {
        panic!(
            "expect_no_udp: from netns {} to {target}: expected no reply, but got {reply:?}",
            ns.name
        );
    }
}

// ───────────────────────────── iptables ─────────────────────────────

/// `"iptables"` or `"ip6tables"`.
pub fn iptables_bin(v6: bool) -> &'static str {
    if v6 {
        "ip6tables"
    } else {
        "iptables"
    }
}

/// Runs `iptables -w 10 args…` (ip6tables for `v6`) in `ns`; panics on
/// failure, returns stdout. E.g. `iptables(&topo.router, false, &["-A", "FORWARD", "-j", "ACCEPT"])`.
pub fn iptables(ns: &Netns, v6: bool, args: &[&str]) -> String {
    let mut argv = vec![iptables_bin(v6), "-w", "10"];
    argv.extend_from_slice(args);
    ns.run_ok(&argv)
}

/// The lines of `iptables -w -t TABLE -S CHAIN` (policy line `-P …` or
/// `-N CHAIN` first, then the `-A` rules in order). Panics if the chain does
/// not exist; see [`try_iptables_rules`] / [`chain_exists`].
pub fn iptables_rules(ns: &Netns, v6: bool, table: &str, chain: &str) -> Vec<String> {
    try_iptables_rules(ns, v6, table, chain).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`iptables_rules`], but a missing chain (or any failure) is an `Err`
/// with iptables' message.
pub fn try_iptables_rules(
    ns: &Netns,
    v6: bool,
    table: &str,
    chain: &str,
) -> Result<Vec<String>, String> {
    let out = ns.exec(&[iptables_bin(v6), "-w", "10", "-t", table, "-S", chain]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    } else {
        Err(format!(
            "[netns {}] {} -t {table} -S {chain}: {}",
            ns.name,
            iptables_bin(v6),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// True if `chain` exists in `table`.
pub fn chain_exists(ns: &Netns, v6: bool, table: &str, chain: &str) -> bool {
    try_iptables_rules(ns, v6, table, chain).is_ok()
}

/// Only the `-A CHAIN …` lines of [`iptables_rules`] (no `-N`/`-P` line).
pub fn iptables_appended_rules(ns: &Netns, v6: bool, table: &str, chain: &str) -> Vec<String> {
    iptables_rules(ns, v6, table, chain)
        .into_iter()
        .filter(|l| l.starts_with("-A "))
        .collect()
}

/// The full `iptables-save` (`ip6tables-save`) output of `ns`.
pub fn iptables_save(ns: &Netns, v6: bool) -> String {
    ns.run_ok(&[if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    }])
}

// ───────────────────────────── daemon ─────────────────────────────

/// Path of the binary under test (built by cargo for integration tests).
pub const LAB_OPS_BIN: &str = env!("CARGO_BIN_EXE_lab-ops");

/// A temporary directory for one daemon's state file, socket and log.
/// Cloning shares it; it is deleted when the last clone is dropped, so it
/// outlives daemon restarts as long as a [`Daemon`] or the test holds it.
#[derive(Clone, Debug)]
pub struct StateDir(Arc<tempfile::TempDir>);

impl StateDir {
    /// Creates a fresh empty directory (under `$TMPDIR`, i.e. usually /tmp).
    pub fn new() -> StateDir {
        let dir = tempfile::Builder::new()
            .prefix("natmap-test-")
            .tempdir()
            .expect("create temp state dir");
        StateDir(Arc::new(dir))
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    /// `DIR/state.json`, passed as `--state`.
    pub fn state_path(&self) -> PathBuf {
        self.path().join("state.json")
    }
    /// `DIR/natmap.sock`, passed as `--socket`.
    pub fn socket_path(&self) -> PathBuf {
        self.path().join("natmap.sock")
    }
    /// `DIR/daemon.log`: stdout and stderr of every daemon started on this
    /// dir, appended, each start preceded by a `=== harness: …` line.
    pub fn log_path(&self) -> PathBuf {
        self.path().join("daemon.log")
    }
}

/// The real `lab-ops natmap daemon`, running in a namespace:
///
/// `ip netns exec NS lab-ops -vv natmap daemon --state DIR/state.json
/// --socket DIR/natmap.sock --socket-group root`, output to DIR/daemon.log.
///
/// `ip netns exec` execs the binary, so the child's pid is the daemon's.
/// Drop SIGKILLs it if still running and, if the test is panicking, prints
/// the daemon log to stderr. The daemon also gets SIGKILL when the *thread*
/// that started it exits (`PR_SET_PDEATHSIG`, so a killed test run leaves no
/// daemon behind): start it from the test's own thread, not from a
/// short-lived helper thread.
///
/// [`Daemon::start_in_root_ns`] runs it in the namespace the test process
/// itself runs in instead (no `ip netns exec`), for tests that need the
/// host's real Docker engine; see `common::docker::RootDaemon` for the guard
/// that also removes its chains from the host.
///
/// Restart on the same state (crash recovery tests):
///
/// ```ignore
/// let mut d = Daemon::start(&topo.router);
/// d.cli_ok(&["dnat", ...]);
/// d.kill9();
/// d.respawn();            // or Daemon::start_with_state_dir(&topo.router, &d.state_dir())
/// ```
pub struct Daemon {
    /// `None`: the namespace of the test process (the host's root namespace).
    ns_name: Option<String>,
    /// Extra daemon arguments after `daemon --state … --socket …`.
    extra_args: Vec<std::ffi::OsString>,
    dir: StateDir,
    child: Option<Child>,
    /// Socket group, environment, state path and allowed log lines
    /// ([`Daemon::start_with_options`], [`Daemon::allow_log`]).
    opts: DaemonOptions,
}

impl Daemon {
    /// Starts a daemon in `ns` on a fresh [`StateDir`] and waits until its
    /// socket accepts a connection.
    pub fn start(ns: &Netns) -> Daemon {
        Self::start_with_state_dir(ns, &StateDir::new())
    }

    /// Starts a daemon in `ns` on an existing state dir (e.g. one of a
    /// daemon that was killed), waits until its socket accepts.
    pub fn start_with_state_dir(ns: &Netns, dir: &StateDir) -> Daemon {
        let mut d = Daemon {
            ns_name: Some(ns.name.clone()),
            extra_args: Vec::new(),
            dir: dir.clone(),
            child: None,
            opts: DaemonOptions::default(),
        };
        d.respawn();
        d
    }

    /// Starts a daemon in the test process's own network namespace (the
    /// host's root namespace, where Docker lives) on `dir`, with
    /// `extra_args` appended to the daemon command line (e.g.
    /// `--docker-socket PATH`), and waits until its socket accepts.
    ///
    /// It changes the HOST's iptables: callers must serialise such tests and
    /// remove natmap's chains afterwards even if the daemon was killed (see
    /// `common::docker::RootDaemon`).
    pub fn start_in_root_ns<S: AsRef<OsStr>>(dir: &StateDir, extra_args: &[S]) -> Daemon {
        let mut d = Daemon {
            ns_name: None,
            extra_args: extra_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            dir: dir.clone(),
            child: None,
            opts: DaemonOptions::default(),
        };
        d.respawn();
        d
    }

    /// The command that runs `argv` in this daemon's namespace: `ip netns
    /// exec NS argv…`, or `argv…` directly for the root namespace.
    fn command_in_ns(&self, program: &str) -> Command {
        match &self.ns_name {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Human-readable place of the daemon for log lines.
    fn where_(&self) -> String {
        match &self.ns_name {
            Some(ns) => format!("netns {ns}"),
            None => "the root network namespace".to_string(),
        }
    }

    /// Starts a new daemon process on this daemon's namespace and state dir.
    /// The previous process must have exited ([`Daemon::kill9`],
    /// [`Daemon::stop`]); panics otherwise. Waits until the socket accepts
    /// a connection (≤ [`DAEMON_START_TIMEOUT`]); panics with the log if it
    /// does not, or if the daemon exits first.
    pub fn respawn(&mut self) {
        assert!(
            !self.is_running(),
            "Daemon::respawn: the previous daemon is still running"
        );
        let log_path = self.dir.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let mut cmd = self.command_in_ns(LAB_OPS_BIN);
        cmd.args(["-vv", "natmap", "daemon"])
            .arg("--state")
            .arg(self.state_path())
            .arg("--socket")
            .arg(self.dir.socket_path())
            .arg("--socket-group")
            .arg(self.opts.socket_group.as_deref().unwrap_or("root"))
            .args(&self.extra_args)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        // If the test process dies (Ctrl-C, a harness timeout), take the
        // daemon with it instead of leaving it running in a deleted namespace.
        // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = writeln!(
            log,
            "=== harness: starting daemon in {}: {cmd:?}",
            self.where_()
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn daemon: {e}"));
        self.note(&format!("daemon pid {}", child.id()));
        self.child = Some(child);

        let socket = self.dir.socket_path();
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "daemon exited ({status}) before its socket {} accepted\n--- daemon log ---\n{}",
                    socket.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "daemon socket {} did not accept within {DAEMON_START_TIMEOUT:?}\n--- daemon log ---\n{}",
                    socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `ip netns exec NS lab-ops natmap --socket SOCK args…` (bounded by
    /// [`COMMAND_TIMEOUT`]); returns the output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(&[], args)
    }

    fn cli_with(&self, global: &[&str], args: &[&str]) -> Output {
        run_with_timeout(
            self.command_in_ns(LAB_OPS_BIN)
                .args(["natmap", "--socket"])
                .arg(self.dir.socket_path())
                .args(global)
                .args(args)
                .env("NO_COLOR", "1"),
            COMMAND_TIMEOUT,
        )
    }

    /// [`Daemon::cli`] that panics (with stdout/stderr) unless the command
    /// succeeds; returns stdout.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        check_output(&format!("lab-ops natmap {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json` and returns the parsed JSON, also when the
    /// command failed (errors are JSON too under `--json`). Parses stdout,
    /// or stderr if stdout is empty; panics if neither is JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_json_output(args).1
    }

    /// [`Daemon::cli_json`] plus the exit status.
    #[track_caller]
    pub fn cli_json_output(&self, args: &[&str]) -> (ExitStatus, serde_json::Value) {
        let out = self.cli_with(&["--json"], args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = if stdout.trim().is_empty() {
            stderr.trim()
        } else {
            stdout.trim()
        };
        match serde_json::from_str(text) {
            Ok(v) => (out.status, v),
            Err(e) => panic!(
                "lab-ops natmap --json {}: output is not JSON ({e}; {})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                args.join(" "),
                out.status
            ),
        }
    }

    /// The daemon's pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the daemon process has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILLs the daemon and reaps it. State file, socket file and log are
    /// left as they are (a crash). No-op if not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.note(&format!("SIGKILL to daemon pid {}", child.id()));
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to [`DAEMON_STOP_TIMEOUT`] for the daemon to
    /// exit; returns its exit status. If it does not exit in time it is
    /// SIGKILLed and this panics with the log. Panics if not running.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("Daemon::stop: daemon is not running");
        self.note(&format!("SIGTERM to daemon pid {}", child.id()));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "daemon did not exit within {DAEMON_STOP_TIMEOUT:?} after SIGTERM (killed)\n\
                         --- daemon log ---\n{}",
                        self.log()
                    );
                }
            }
        }
    }

    /// Like [`Daemon::stop`] but never panics (usable from `Drop`): SIGTERM,
    /// wait up to `timeout`, then SIGKILL. Returns the exit status if the
    /// daemon exited by itself after SIGTERM, `None` if it was not running
    /// or had to be killed. The outcome is noted in the daemon log.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.note(&format!("SIGTERM to daemon pid {}", child.id()));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.note(&format!("daemon exited after SIGTERM: {status}"));
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.note(&format!(
                        "daemon did not exit within {timeout:?} after SIGTERM: SIGKILLed"
                    ));
                    return None;
                }
            }
        }
    }

    /// Appends a `=== harness: <text>` line to the daemon log, so the log
    /// shows where the test killed, stopped or restarted the daemon.
    pub fn note(&self, text: &str) {
        if let Ok(mut log) = OpenOptions::new().append(true).open(self.dir.log_path()) {
            let _ = writeln!(log, "=== harness: {text}");
        }
    }

    /// The daemon log so far (all starts on this state dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.log_path()).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// The state dir (a clone; keeps the directory alive).
    pub fn state_dir(&self) -> StateDir {
        self.dir.clone()
    }

    /// The directory holding state, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `DIR/state.json`, or the path given in [`DaemonOptions::state_path`].
    pub fn state_path(&self) -> PathBuf {
        self.opts
            .state_path
            .clone()
            .unwrap_or_else(|| self.dir.state_path())
    }

    /// `DIR/natmap.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.socket_path()
    }

    /// Name of the namespace the daemon runs in.
    /// `""` for a daemon started with [`Daemon::start_in_root_ns`].
    pub fn netns_name(&self) -> &str {
        self.ns_name.as_deref().unwrap_or("")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "===== natmap daemon log ({}) =====\n{}\n===== end of daemon log =====",
                self.dir.log_path().display(),
                self.log()
            );
        }
    }
}

// ──────────────────── daemon options, log check, raw socket ────────────────────
//
// Added for the reliability suite (tests/reliability.rs, tests/load.rs): a
// daemon with another socket group, environment or state path; a check that
// a test's daemon logged no WARN/ERROR it did not declare; a raw socket
// client; natmap's chains as installed and as the state renders them.

/// Non-default ways to start a [`Daemon`] ([`Daemon::start_with_options`]).
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// `--socket-group` (default `root`).
    pub socket_group: Option<String>,
    /// Extra daemon arguments, e.g. `--docker-socket /nonexistent`.
    pub extra_args: Vec<std::ffi::OsString>,
    /// Extra environment of the daemon process (e.g. `PATH`,
    /// `NATMAP_CRASH_AT`); see also [`Daemon::set_env`].
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// `--state` (default `DIR/state.json`), e.g. on a tiny tmpfs.
    pub state_path: Option<PathBuf>,
    /// Substrings of WARN/ERROR log lines the test expects ([`Daemon::allow_log`]).
    pub allowed_log: Vec<String>,
}

impl DaemonOptions {
    /// Options whose daemon does not talk to the host's Docker engine
    /// (`--docker-socket` pointing nowhere), so a Docker restart by another
    /// test cannot put a warning into this daemon's log.
    pub fn isolated() -> DaemonOptions {
        DaemonOptions {
            extra_args: vec![
                "--docker-socket".into(),
                "/nonexistent/natmap-test-no-docker.sock".into(),
            ],
            ..DaemonOptions::default()
        }
    }
}

/// WARN/ERROR lines that come from the host around the test, not from the
/// test's daemon doing something wrong: a daemon in a namespace still talks
/// to the host's Docker engine, which another test may restart.
pub const AMBIENT_LOG_NOISE: &[&str] = &["lost Docker"];

/// The lines of a daemon log that a happy-path test must not see: every
/// line logged at WARN or ERROR whose text contains none of `allowed` (nor
/// of [`AMBIENT_LOG_NOISE`]), and every panic (never allowed). Harness lines
/// (`=== harness: …`) are skipped.
pub fn log_problems(log: &str, allowed: &[String]) -> Vec<String> {
    log.lines()
        .filter(|line| !line.starts_with("=== harness:"))
        .filter(|line| {
            if line.contains("panicked at") {
                return true;
            }
            // tracing's fmt layout: `<time>  WARN target: message`, or
            // `WARN target: message` without time (under systemd).
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            let second = words.next().unwrap_or("");
            let leveled = |w: &str| w == "WARN" || w == "ERROR";
            (leveled(first) || leveled(second))
                && !allowed.iter().any(|a| line.contains(a.as_str()))
                && !AMBIENT_LOG_NOISE.iter().any(|a| line.contains(a))
        })
        .map(str::to_string)
        .collect()
}

impl Daemon {
    /// Starts a daemon in `ns` on `dir` with `opts`, waits until its socket accepts.
    pub fn start_with_options(ns: &Netns, dir: &StateDir, opts: DaemonOptions) -> Daemon {
        let mut d = Daemon {
            ns_name: Some(ns.name.clone()),
            extra_args: opts.extra_args.clone(),
            dir: dir.clone(),
            child: None,
            opts,
        };
        d.respawn();
        d
    }

    /// Sets an environment variable for the next [`Daemon::respawn`].
    pub fn set_env(&mut self, key: &str, value: impl AsRef<OsStr>) {
        self.remove_env(key);
        self.opts
            .env
            .push((key.into(), value.as_ref().to_os_string()));
    }

    /// Removes a variable set with [`Daemon::set_env`] (next respawn).
    pub fn remove_env(&mut self, key: &str) {
        self.opts.env.retain(|(k, _)| k != key);
    }

    /// Declares that WARN/ERROR lines containing `pattern` are expected, so
    /// [`Daemon::assert_clean_log`] does not fail on them.
    pub fn allow_log(&mut self, pattern: &str) -> &mut Daemon {
        self.opts.allowed_log.push(pattern.to_string());
        self
    }

    /// WARN/ERROR lines (and panics) in the log that were not declared.
    pub fn unexpected_log_lines(&self) -> Vec<String> {
        log_problems(&self.log(), &self.opts.allowed_log)
    }

    /// Fails the test if the daemon logged a WARN or ERROR the test did not
    /// declare with [`Daemon::allow_log`], or panicked. Call it at the end of
    /// every happy-path test (the log covers every start on this state dir).
    #[track_caller]
    pub fn assert_clean_log(&self) {
        let problems = self.unexpected_log_lines();
        assert!(
            problems.is_empty(),
            "the daemon logged {} unexpected WARN/ERROR line(s) (declare expected ones with \
             Daemon::allow_log):\n{}\n--- full daemon log ---\n{}",
            problems.len(),
            problems.join("\n"),
            self.log()
        );
    }

    /// [`Daemon::assert_clean_log`] with `expected` declared as allowed for
    /// this check (the WARN/ERROR lines the test provokes on purpose).
    #[track_caller]
    pub fn assert_clean_log_except(&self, expected: &[&str]) {
        let mut allowed = self.opts.allowed_log.clone();
        allowed.extend(expected.iter().map(|e| e.to_string()));
        let problems = log_problems(&self.log(), &allowed);
        assert!(
            problems.is_empty(),
            "the daemon logged {} unexpected WARN/ERROR line(s) (expected only lines \
             containing {expected:?}):\n{}\n--- full daemon log ---\n{}",
            problems.len(),
            problems.join("\n"),
            self.log()
        );
    }

    /// The daemon's `VmRSS` in KiB (from `/proc/PID/status`), if running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// A raw connection to the daemon's socket ([`SocketClient`]).
    pub fn connect(&self) -> SocketClient {
        SocketClient::connect(&self.socket_path())
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket_path().display()))
    }

    /// One request over a fresh raw connection; `request` is the inner
    /// object (`{"cmd":"ls"}`). Panics if the daemon does not answer.
    #[track_caller]
    pub fn call(&self, request: serde_json::Value) -> serde_json::Value {
        self.connect()
            .call(&request)
            .unwrap_or_else(|e| panic!("request {request}: {e}"))
    }
}

/// How long a [`SocketClient`] waits for one response line. Longer than
/// two xtables lock waits (a change may wait for the lock twice).
pub const SOCKET_RESPONSE_TIMEOUT: Duration = Duration::from_secs(45);

/// A raw client of the daemon's control socket: sends bytes, reads response
/// lines. Unix path sockets are reachable from any network namespace.
pub struct SocketClient {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl SocketClient {
    /// Connects to `path` (read timeout [`SOCKET_RESPONSE_TIMEOUT`]).
    pub fn connect(path: &Path) -> std::io::Result<SocketClient> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(SOCKET_RESPONSE_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_RESPONSE_TIMEOUT))?;
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(SocketClient { stream, reader })
    }

    /// Closes the sending side (the daemon then sees end of input).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Writes raw bytes (no newline added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response line; `Ok(None)` when the daemon closed the connection.
    /// A line that is not JSON is an `InvalidData` error.
    pub fn read_response(&mut self) -> std::io::Result<Option<serde_json::Value>> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, format!("{e}: {line:?}")))
    }

    /// Sends `{"version":1,"request":REQUEST}` and reads the answer. A closed
    /// connection is an `UnexpectedEof` error.
    pub fn call(&mut self, request: &serde_json::Value) -> std::io::Result<serde_json::Value> {
        let mut line = serde_json::to_vec(&serde_json::json!({"version": 1, "request": request}))
            .expect("serializes");
        line.push(b'\n');
        self.send_raw(&line)?;
        self.read_response()?.ok_or_else(|| {
            std::io::Error::new(ErrorKind::UnexpectedEof, "daemon closed the connection")
        })
    }
}

/// The `dnat` request object for the socket (`delete` true: remove it).
pub fn dnat_request(
    ext_ip: &str,
    int_ip: &str,
    ports: &str,
    proto: &str,
    delete: bool,
) -> serde_json::Value {
    serde_json::json!({
        "cmd": "dnat", "ext_ip": ext_ip, "int_ip": int_ip, "ports": ports,
        "proto": proto, "delete": delete,
    })
}

/// natmap's four chains, as `(table, chain)`, in the order the renderer uses.
pub const NATMAP_TABLE_CHAINS: [(&str, &str); 4] = [
    ("nat", "NATMAP"),
    ("nat", "NATMAP-OUTPUT"),
    ("nat", "NATMAP-POSTROUTING"),
    ("filter", "NATMAP"),
];

/// The `-A` lines of natmap's chains in `ns`, each prefixed with its table
/// (`nat -A NATMAP …`), read with `program` (`iptables`, `ip6tables`,
/// `iptables-legacy`, …). A missing chain contributes nothing.
pub fn natmap_lines_with(ns: &Netns, program: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for (table, chain) in NATMAP_TABLE_CHAINS {
        let out = ns.exec(&[program, "-w", "10", "-t", table, "-S", chain]);
        if !out.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with("-A ") {
                lines.push(format!("{table} {line}"));
            }
        }
    }
    lines
}

/// [`natmap_lines_with`] using `iptables` (or `ip6tables` for `v6`).
pub fn natmap_lines(ns: &Netns, v6: bool) -> Vec<String> {
    natmap_lines_with(ns, iptables_bin(v6))
}

/// Reads and parses a state file (panics with the text if it does not parse).
pub fn read_state(path: &Path) -> natmap::state::State {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} does not parse: {e}\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// What natmap's chains must hold for `state` when every rule is active,
/// in the form of [`natmap_lines`]: `(v4 lines, v6 lines)`.
pub fn rendered_lines(state: &natmap::state::State) -> (Vec<String>, Vec<String>) {
    use natmap::firewall::iptables::{render, Chain};
    use natmap::model::Family;
    let set = render::desired(&state.rules);
    let lines = |family| {
        let rules = set.family(family);
        Chain::ALL
            .iter()
            .flat_map(|c| {
                rules
                    .chain(*c)
                    .iter()
                    .map(move |l| format!("{} -A {} {l}", c.table(), c.name()))
            })
            .collect::<Vec<_>>()
    };
    (lines(Family::V4), lines(Family::V6))
}

/// True if a socket of `proto` ("tcp"/"udp") cannot be bound to `addr` in
/// `ns` because it is in use (natmap holds it); false if the bind works.
/// Panics on any other error (e.g. the address does not exist).
pub fn port_is_held(ns: &Netns, proto: &str, addr: SocketAddr) -> bool {
    let result = in_netns(ns, || match proto {
        "udp" => UdpSocket::bind(addr).map(drop),
        _ => TcpListener::bind(addr).map(drop),
    });
    match result {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::AddrInUse => true,
        Err(e) => panic!("[netns {}] bind {proto} {addr}: {e}", ns.name),
    }
}

// ───────────────────── seeded randomness, acknowledgement ledger ─────────────────────

/// A small seeded PRNG (SplitMix64) so fault and load tests are repeatable:
/// the seed is printed, and `NATMAP_TEST_SEED=N` replays a run.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// Seeded from `NATMAP_TEST_SEED` if set, else from the clock; prints the
    /// seed (uncaptured) with `what`.
    pub fn from_env(what: &str) -> TestRng {
        let seed = std::env::var("NATMAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let _ = writeln!(
            std::io::stderr(),
            "{what}: seed {seed} (replay with NATMAP_TEST_SEED={seed})"
        );
        TestRng(seed)
    }

    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A random element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A generator derived from this one (for a thread).
    pub fn fork(&mut self) -> TestRng {
        TestRng(self.next_u64())
    }
}

/// What a client may conclude about one of its rules from the answers it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Acknowledged absent (deleted, never added, or `not_found`).
    Absent,
    /// Acknowledged present (`added` or `already_present`).
    Present,
    /// A request was sent but never answered (the daemon died): either.
    Unknown,
}

/// One client's ledger of acknowledged changes, keyed by `(port, proto)` of
/// its dnat rules. Every answer is checked against what the earlier answers
/// imply (a rule acknowledged as added that a later add reports as `added`
/// again was lost), and [`AckLedger::reconcile`] checks the daemon's state.
#[derive(Debug, Clone, Default)]
pub struct AckLedger {
    rules: std::collections::BTreeMap<(u16, String), Presence>,
    /// Requests answered ok=true.
    pub acks: u64,
    /// Requests answered ok=false.
    pub refusals: u64,
    /// Requests sent but not answered.
    pub unanswered: u64,
}

impl AckLedger {
    /// What the answers so far say about the rule (absent if never touched).
    pub fn expect(&self, port: u16, proto: &str) -> Presence {
        self.rules
            .get(&(port, proto.to_string()))
            .copied()
            .unwrap_or(Presence::Absent)
    }

    /// Records the answer to an add (`delete` false) or delete; `answer`
    /// `None`: sent, but no answer came. Returns a description of any
    /// contradiction with earlier acknowledgements, or of an error answer
    /// other than `not_found`.
    pub fn record(
        &mut self,
        port: u16,
        proto: &str,
        delete: bool,
        answer: Option<&serde_json::Value>,
    ) -> Result<(), String> {
        let key = (port, proto.to_string());
        let before = self.expect(port, proto);
        let what = format!(
            "{} {port}/{proto} (ledger said {before:?})",
            if delete { "delete" } else { "add" }
        );
        let Some(answer) = answer else {
            self.unanswered += 1;
            let unchanged = if delete {
                Presence::Absent
            } else {
                Presence::Present
            };
            if before != unchanged {
                self.rules.insert(key, Presence::Unknown);
            }
            return Ok(());
        };
        let (after, contradiction) = if answer["ok"] == true {
            self.acks += 1;
            match answer["data"]["result"].as_str() {
                Some("added") if !delete => (Presence::Present, before == Presence::Present),
                Some("already_present") if !delete => {
                    (Presence::Present, before == Presence::Absent)
                }
                Some("deleted") if delete => (Presence::Absent, before == Presence::Absent),
                _ => return Err(format!("{what}: unexpected answer {answer}")),
            }
        } else {
            self.refusals += 1;
            match answer["error"]["code"].as_str() {
                Some("not_found") if delete => (Presence::Absent, before == Presence::Present),
                _ => return Err(format!("{what}: unexpected error {answer}")),
            }
        };
        self.rules.insert(key, after);
        if contradiction {
            return Err(format!(
                "{what}: answer {answer} contradicts an earlier acknowledgement"
            ));
        }
        Ok(())
    }

    /// Compares the ledger with the rules the daemon has (`actual`, the
    /// `(port, proto)` of this client's rules in state): every rule
    /// acknowledged present must be there, every one acknowledged absent
    /// must not. Unknown entries take the actual value. Returns the mismatches.
    pub fn reconcile(&mut self, actual: &std::collections::BTreeSet<(u16, String)>) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, presence) in self.rules.iter_mut() {
            let there = actual.contains(key);
            match presence {
                Presence::Present if !there => problems.push(format!(
                    "{}/{}: acknowledged as present, missing from state (lost acknowledgement)",
                    key.0, key.1
                )),
                Presence::Absent if there => problems.push(format!(
                    "{}/{}: acknowledged as absent, but in state",
                    key.0, key.1
                )),
                _ => {}
            }
            *presence = if there {
                Presence::Present
            } else {
                Presence::Absent
            };
        }
        for key in actual {
            if !self.rules.contains_key(key) {
                problems.push(format!(
                    "{}/{}: in state, but never requested",
                    key.0, key.1
                ));
            }
        }
        problems
    }
}

/// Percentile `p` (0–100) of sorted `values` (nearest rank); zero if empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ───────────────────── consistency checks shared by the reliability tests ─────────────────────

/// The `(port, proto)` of every dnat rule in a state, with its id.
pub fn state_dnat_keys(
    state: &natmap::state::State,
) -> std::collections::BTreeMap<(u16, String), u64> {
    let mut keys = std::collections::BTreeMap::new();
    for rule in &state.rules {
        let natmap::model::RuleSpec::Dnat(r) = &rule.spec else {
            panic!("unexpected rule kind in state: {rule:?}");
        };
        for port in r.ports.iter() {
            let old = keys.insert((port, r.proto.to_string()), rule.id);
            assert!(old.is_none(), "two rules forward {port}/{}", r.proto);
        }
    }
    keys
}

/// The state the daemon last wrote (empty if it never wrote one).
pub fn state_or_empty(path: &Path) -> natmap::state::State {
    if path.exists() {
        read_state(path)
    } else {
        natmap::state::State::default()
    }
}

/// Checks that the kernel holds exactly what the state renders: natmap's
/// chains equal the rendering line for line (so every stored rule has its
/// lines, no line lacks a stored rule, nothing is duplicated), every
/// `natmap:dnat:<id>` comment names a stored rule and every stored rule has
/// at least one line, each hook has exactly one jump, `ls` lists exactly
/// the stored rules as active, and every forwarded port is held.
#[track_caller]
pub fn assert_kernel_matches_state(ns: &Netns, d: &Daemon, iptables: &str, ip6tables: &str) {
    let state = state_or_empty(&d.state_path());
    let (want4, want6) = rendered_lines(&state);
    // iptables -S quotes the comment; the rendering does not (natmap's
    // comments have no spaces): compare without the quotes, as the daemon does.
    let unquote = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .map(|l| {
                if l.contains("--comment \"natmap:") {
                    l.replace('"', "")
                } else {
                    l
                }
            })
            .collect()
    };
    let got4 = unquote(natmap_lines_with(ns, iptables));
    let got6 = unquote(natmap_lines_with(ns, ip6tables));
    assert_eq!(got4, want4, "IPv4 chains differ from the state's rendering");
    assert_eq!(got6, want6, "IPv6 chains differ from the state's rendering");

    let ids: std::collections::BTreeSet<u64> = state.rules.iter().map(|r| r.id).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut unique = std::collections::BTreeSet::new();
    for line in &got4 {
        assert!(unique.insert(line.clone()), "duplicate line: {line}");
        let id = line
            .split("natmap:dnat:")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("line without a natmap:dnat:<id> comment: {line}"));
        assert!(ids.contains(&id), "line of rule #{id} not in state: {line}");
        seen.insert(id);
    }
    assert_eq!(seen, ids, "every stored rule has its lines");

    let save = String::from_utf8_lossy(&ns.exec(&[format!("{iptables}-save")]).stdout).into_owned();
    if !state.rules.is_empty() {
        for (table, hook, target) in [
            ("nat", "PREROUTING", "NATMAP"),
            ("nat", "OUTPUT", "NATMAP-OUTPUT"),
            ("nat", "POSTROUTING", "NATMAP-POSTROUTING"),
            ("filter", "DOCKER-USER", "NATMAP"),
        ] {
            let jump = format!("-A {hook} -j {target}");
            let count = save.lines().filter(|l| *l == jump).count();
            assert_eq!(
                count, 1,
                "{table} {hook}: {count} jumps to {target}\n{save}"
            );
        }
    }

    let ls = d.call(serde_json::json!({"cmd": "ls"}));
    let listed: Vec<&serde_json::Value> = ls["data"]["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("ls: {ls}"))
        .iter()
        .collect();
    let listed_ids: std::collections::BTreeSet<u64> =
        listed.iter().filter_map(|r| r["id"].as_u64()).collect();
    assert_eq!(listed_ids, ids, "ls lists the stored rules");
    for r in &listed {
        assert_eq!(r["status"], "active", "{r}");
    }
    for ((port, proto), id) in state_dnat_keys(&state) {
        assert!(
            port_is_held(ns, &proto, SocketAddr::new(IpAddr::V4(ROUTER_EXT_V4), port)),
            "port {port}/{proto} of rule #{id} is not held by the daemon"
        );
    }
}

/// Waits (≤ 5 s) until no process runs in `ns` any more: an
/// `iptables-restore` the killed daemon had started finishes on its own,
/// as systemd would also have killed it with the daemon's cgroup.
pub fn wait_namespace_idle(ns: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = run_with_timeout(
            Command::new("ip").args(["netns", "pids", &ns.name]),
            COMMAND_TIMEOUT,
        );
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still running in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A namespace with the router's external address on loopback, enough for
/// reservations and port checks.
pub fn bare_router() -> Netns {
    let ns = Netns::new("router");
    ns.ip(&["addr", "add", &format!("{ROUTER_EXT_V4}/32"), "dev", "lo"]);
    ns
}

/// natmap's rules in `ns` as `iptables -S` prints them: the `-A` lines of its
/// four chains, each prefixed with its table (`nat -A NATMAP …`). Chains that
/// do not exist contribute nothing.
pub fn natmap_rules(ns: &Netns, v6: bool) -> Vec<String> {
    let mut lines = Vec::new();
    for (table, chain) in [
        ("nat", "NATMAP"),
        ("nat", "NATMAP-OUTPUT"),
        ("nat", "NATMAP-POSTROUTING"),
        ("filter", "NATMAP"),
    ] {
        for line in try_iptables_rules(ns, v6, table, chain).unwrap_or_default() {
            if line.starts_with("-A ") {
                lines.push(format!("{table} {line}"));
            }
        }
    }
    lines
}
