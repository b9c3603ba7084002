//! A container reaching its own published port through the host's address
//! (issue 14, "Docker parity"), against the host's real Docker engine.
//!
//! `docker add web 8080:80` DNATs traffic for any host address to `web`.
//! When `web` itself connects to the host's address, the translated packet
//! goes back to where it came from:
//!
//! * with br_netfilter (`net.bridge.bridge-nf-call-iptables=1`, Docker's
//!   default) the DNAT happens while the frame crosses the bridge, which
//!   then must send it back out of the port it came in on: only with
//!   `hairpin_mode` on that port;
//! * in both cases the container would get a packet from itself to itself,
//!   so that flow (and only that one) is masqueraded.
//!
//! Traffic comes from inside the containers' own network namespaces (a
//! thread that `setns`es into `/proc/PID/ns/net`), so TCP and UDP use the
//! same probes as the other Docker tests. Root namespace, one test at a
//! time ([`serial`]); every container, network, rule, socket and sysctl is
//! put back by a guard.

pub mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use common::docker::*;
use common::*;

/// How long the mapping may take to work again after a container restart
/// (events re-point within 2 s; the bridge port is set in the same step).
const AFTER_RESTART: Duration = Duration::from_secs(5);
/// How long a change of br_netfilter may take to be followed (one tick is 2 s).
const AFTER_SYSCTL: Duration = Duration::from_secs(6);

// ───────────────────────────── helpers ─────────────────────────────

/// `docker add` through the daemon; returns the new rule's id.
#[track_caller]
fn add(d: &RootDaemon, args: &[&str]) -> u64 {
    let data = d.ok(args);
    assert_eq!(data["result"], "added", "{args:?}: {data}");
    data["rule"]["id"].as_u64().expect("id")
}

/// `docker add` of `web`'s HTTP (80) and UDP echo port on host port `hp`,
/// TCP and UDP: the two rule ids.
#[track_caller]
fn add_tcp_and_udp(d: &RootDaemon, web: &Container, hp: u16) -> (u64, u64) {
    let tcp = add(d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    let udp_spec = format!("{hp}:{UDP_ECHO_PORT}/udp");
    let udp = add(d, &["docker", "add", &web.name, &udp_spec]);
    (tcp, udp)
}

/// Runs `f` on a fresh thread inside the network namespace of container
/// `name` (its sockets are the container's), and returns its result.
fn in_container<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", name]);
    let path = format!("/proc/{pid}/ns/net");
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns({path}): {e}"));
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// One field of `docker inspect` for the container's only network.
fn net_field(name: &str, field: &str) -> String {
    docker_ok(&[
        "inspect",
        "-f",
        &format!("{{{{range .NetworkSettings.Networks}}}}{{{{.{field}}}}}{{{{end}}}}"),
        name,
    ])
}

/// The container's IPv4 gateway: the address of its network's bridge.
fn gateway_v4(name: &str) -> Ipv4Addr {
    let gw = net_field(name, "Gateway");
    gw.parse()
        .unwrap_or_else(|_| panic!("{name}: gateway {gw:?}"))
}

/// The container's IPv6 gateway, if its network has IPv6.
fn gateway_v6(name: &str) -> Option<Ipv6Addr> {
    net_field(name, "IPv6Gateway").parse().ok()
}

/// The container's global IPv6 address, if it has one.
fn ip_v6(name: &str) -> Option<Ipv6Addr> {
    net_field(name, "GlobalIPv6Address").parse().ok()
}

/// The host side of the container's `eth0`: the bridge port its traffic
/// enters the bridge through (found by the peer index `eth0` shows inside).
fn bridge_port(name: &str) -> String {
    let iflink = docker_ok(&["exec", name, "cat", "/sys/class/net/eth0/iflink"]);
    for entry in std::fs::read_dir("/sys/class/net").expect("/sys/class/net") {
        let entry = entry.expect("entry");
        let index = std::fs::read_to_string(entry.path().join("ifindex")).unwrap_or_default();
        if index.trim() == iflink.trim() {
            return entry.file_name().to_string_lossy().into_owned();
        }
    }
    panic!("no host interface with ifindex {iflink} (the peer of {name}'s eth0)");
}

/// `hairpin_mode` of a bridge port ("0"/"1"), `None` if it is gone.
fn hairpin_mode(port: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/class/net/{port}/brport/hairpin_mode"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Sets `hairpin_mode` of a bridge port behind natmap's back.
fn set_hairpin_mode(port: &str, value: &str) {
    write_sysctl(
        Path::new(&format!("/sys/class/net/{port}/brport/hairpin_mode")),
        value,
    );
}

/// Retries `probe` every 100 ms until it succeeds; panics with the last
/// error after `limit`. Returns what it returned.
#[track_caller]
fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= limit => {
                panic!("{what}: not within {limit:?}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `GET /` from inside container `from` to `target`: the body.
fn tcp_from(from: &str, target: SocketAddr) -> Result<String, String> {
    in_container(from, move || http_get(target, "/", PROBE_TIMEOUT))
        .map(|b| b.trim().to_owned())
        .map_err(|e| format!("from container {from}: {e}"))
}

/// The client address the web container behind `target` saw for a request
/// from inside container `from`.
fn seen_from(from: &str, target: SocketAddr) -> Result<IpAddr, String> {
    let body = in_container(from, move || http_get(target, "/cgi-bin/ip", PROBE_TIMEOUT))
        .map_err(|e| format!("from container {from}: {e}"))?;
    parse_remote_addr(&body).ok_or_else(|| format!("CGI answered {body:?}"))
}

/// One UDP datagram from inside container `from` to `target`; the reply.
fn udp_from(from: &str, target: SocketAddr, payload: &str) -> Result<String, String> {
    let bind = match target {
        SocketAddr::V4(_) => sa(Ipv4Addr::UNSPECIFIED, 0),
        SocketAddr::V6(_) => sa(Ipv6Addr::UNSPECIFIED, 0),
    };
    let payload = payload.to_owned();
    in_container(from, move || {
        UdpClient::bind(&Client::Host, bind)?.ask(target, &payload, PROBE_TIMEOUT)
    })
    .map_err(|e| format!("from container {from}: {e}"))
}

/// Asserts that `web` reaches its own mapping at `target` over TCP (its
/// marker) and UDP (`udp-echo`'s answer), retrying up to `limit`.
#[track_caller]
fn expect_own_port(web: &Container, target: SocketAddr, limit: Duration) {
    let body = eventually(&format!("{} → {target} tcp", web.name), limit, || {
        tcp_from(&web.name, target)
    });
    assert_eq!(body, web.marker, "tcp {target} from {}", web.name);
    let reply = eventually(&format!("{} → {target} udp", web.name), limit, || {
        udp_from(&web.name, target, " own")
    });
    assert_eq!(reply, format!("{} own", web.marker), "udp {target}");
}

/// natmap's lines of mapping `id` in nat `NATMAP-POSTROUTING` of a family.
fn masquerades_of(v6: bool, id: u64) -> Vec<String> {
    root_chain(v6, "nat", "NATMAP-POSTROUTING")
        .into_iter()
        .filter(|l| l.contains(&format!("natmap:docker:{id}\"")))
        .collect()
}

/// Every natmap line (both families) that names one of `ids`.
fn lines_of(ids: &[u64]) -> Vec<String> {
    natmap_lines_in_root()
        .into_iter()
        .filter(|l| {
            ids.iter()
                .any(|id| l.contains(&format!("natmap:docker:{id}\"")))
        })
        .collect()
}

/// `net.bridge.bridge-nf-call-ip{,6}tables` of the root namespace, put back
/// as found when dropped. `None` when br_netfilter is not loaded.
struct BridgeNetfilter {
    saved: Vec<(PathBuf, String)>,
}

const BRIDGE_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

impl BridgeNetfilter {
    fn take() -> Option<BridgeNetfilter> {
        let mut saved = Vec::new();
        for path in BRIDGE_SYSCTLS {
            let value = std::fs::read_to_string(path).ok()?;
            saved.push((PathBuf::from(path), value.trim().to_owned()));
        }
        Some(BridgeNetfilter { saved })
    }

    /// Bridged traffic passes iptables/ip6tables (`on`) or not.
    fn set(&self, on: bool) {
        for (path, _) in &self.saved {
            write_sysctl(path, if on { "1" } else { "0" });
        }
    }
}

fn write_sysctl(path: &Path, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Drop for BridgeNetfilter {
    fn drop(&mut self) {
        for (path, value) in &self.saved {
            if let Err(e) = std::fs::write(path, value) {
                report(&format!(
                    "harness: cannot restore {} to {value}: {e}",
                    path.display()
                ));
            }
        }
    }
}

/// A user-defined Docker bridge network (a `br-…` bridge) with IPv4 and
/// IPv6 subnets, removed on drop.
struct DockerNetwork {
    name: String,
}

impl DockerNetwork {
    fn dual_stack(role: &str) -> DockerNetwork {
        let name = unique_name(role);
        let n = std::process::id() % 200 + 20;
        docker_ok(&[
            "network",
            "create",
            "--ipv6",
            "--subnet",
            &format!("172.31.{n}.0/24"),
            "--subnet",
            &format!("fd00:6e6d:{n:x}::/64"),
            "--label",
            "org.natmap.test=1",
            &name,
        ]);
        DockerNetwork { name }
    }
}

impl Drop for DockerNetwork {
    fn drop(&mut self) {
        if let Err(e) = run_quiet(
            std::process::Command::new("docker").args(["network", "rm", &self.name]),
            DOCKER_TIMEOUT,
        ) {
            report(&format!("harness: docker network rm {}: {e}", self.name));
        }
    }
}

// ───────────────────────────── tests ─────────────────────────────

/// On the default bridge with br_netfilter (Docker's default): `web`
/// reaches its own TCP and UDP mapping through the bridge's address and
/// through another host address; only its own flow is masqueraded (another
/// container keeps its address); its bridge port is in hairpin mode while
/// the mapping exists, also after `docker restart` (a new port), and back to
/// off when the mappings are removed, leaving no rule behind.
#[test]
fn a_container_reaches_its_own_port_and_others_keep_their_address() {
    let (_serial, _timer) = docker_setup!();
    let Some(brnf) = BridgeNetfilter::take() else {
        skip_or_fail("br_netfilter is not loaded (Docker loads it): no bridged case to show");
        return;
    };
    brnf.set(true);
    let outside = OutsideHost::new();
    let web = Container::web("own", "own-web", &[]);
    let other = Container::sleeper("neighbour");
    let d = RootDaemon::start();
    let hp = free_port();
    let (tcp, udp) = add_tcp_and_udp(&d, &web, hp);
    let (ip, gw) = (web.ip4(), gateway_v4(&web.name));
    let port = bridge_port(&web.name);

    for host in [gw, HOST_V4] {
        expect_own_port(&web, sa(host, hp), PROBE_TIMEOUT);
    }
    assert_eq!(hairpin_mode(&port).as_deref(), Some("1"), "{port}");
    // Its own flow is masqueraded: it sees the bridge's address.
    assert_eq!(
        seen_from(&web.name, sa(gw, hp)).unwrap(),
        IpAddr::V4(gw),
        "{} reaching itself",
        web.name
    );
    // Nobody else is: another container on the same bridge keeps its
    // address, over TCP, and reaches the UDP mapping too.
    let other_ip = other.ip4();
    for host in [gw, HOST_V4] {
        assert_eq!(
            seen_from(&other.name, sa(host, hp)).unwrap(),
            IpAddr::V4(other_ip),
            "{} reaching {host}:{hp}",
            other.name
        );
        let reply = udp_from(&other.name, sa(host, hp), " other").unwrap();
        assert_eq!(reply, format!("{} other", web.marker));
    }
    // The outside machine too.
    assert_eq!(
        remote_addr_seen(&outside.client(), sa(HOST_V4, hp)),
        IpAddr::V4(OUTSIDE_V4)
    );
    // Exactly the container-to-itself masquerade, per protocol.
    assert_eq!(
        masquerades_of(false, tcp),
        vec![format!(
            "-A NATMAP-POSTROUTING -s {ip}/32 -d {ip}/32 -p tcp -m tcp --dport 80 -m conntrack \
             --ctstate DNAT -m comment --comment \"natmap:docker:{tcp}\" -j MASQUERADE"
        )]
    );
    assert_eq!(
        masquerades_of(false, udp),
        vec![format!(
            "-A NATMAP-POSTROUTING -s {ip}/32 -d {ip}/32 -p udp -m udp --dport {UDP_ECHO_PORT} \
             -m conntrack --ctstate DNAT -m comment --comment \"natmap:docker:{udp}\" -j MASQUERADE"
        )]
    );

    // `docker restart`: a new veth, a new bridge port.
    web.restart();
    d.wait_rule(tcp, AFTER_RESTART, "active", |r| r["status"] == "active");
    let new_port = bridge_port(&web.name);
    for host in [gw, HOST_V4] {
        expect_own_port(&web, sa(host, hp), AFTER_RESTART);
    }
    assert_eq!(hairpin_mode(&new_port).as_deref(), Some("1"), "{new_port}");
    assert_eq!(
        seen_from(&other.name, sa(gw, hp)).unwrap(),
        IpAddr::V4(other_ip)
    );

    // Removal leaves nothing: no rule, hairpin off again.
    d.ok(&["docker", "rm", "--id", &tcp.to_string()]);
    assert_eq!(
        hairpin_mode(&new_port).as_deref(),
        Some("1"),
        "the UDP mapping still needs it"
    );
    d.ok(&["docker", "rm", "--id", &udp.to_string()]);
    assert_eq!(lines_of(&[tcp, udp]), Vec::<String>::new());
    assert_eq!(hairpin_mode(&new_port).as_deref(), Some("0"), "{new_port}");
}

/// Without bridge netfilter (br_netfilter not loaded, or its sysctls off)
/// the DNAT happens on the routed path, so no hairpin is needed, but a
/// neighbour's replies would cross the bridge without the host un-DNATing
/// them: every client of the container's network is masqueraded then. When
/// the sysctl changes under a running daemon, the rules and the hairpin
/// setting follow within a few ticks, and the port keeps working.
#[test]
fn without_bridge_netfilter_it_works_too_and_follows_the_sysctl() {
    let (_serial, _timer) = docker_setup!();
    let Some(brnf) = BridgeNetfilter::take() else {
        // Nothing to switch: the host is already in the case under test.
        report("note: br_netfilter is not loaded; testing the routed case only");
        return routed_case_only();
    };
    brnf.set(false);
    let web = Container::web("own", "own-routed", &[]);
    let other = Container::sleeper("neighbour");
    let d = RootDaemon::start();
    let hp = free_port();
    let (tcp, udp) = add_tcp_and_udp(&d, &web, hp);
    let gw = gateway_v4(&web.name);
    let port = bridge_port(&web.name);
    let subnet = format!(
        "-s {}",
        docker_ok(&[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}}"
        ])
    );

    expect_own_port(&web, sa(gw, hp), PROBE_TIMEOUT);
    assert_eq!(
        hairpin_mode(&port).as_deref(),
        Some("0"),
        "not needed: {port}"
    );
    assert_eq!(
        seen_from(&other.name, sa(gw, hp)).unwrap(),
        IpAddr::V4(gw),
        "without bridge netfilter a neighbour is masqueraded"
    );
    for id in [tcp, udp] {
        let lines = masquerades_of(false, id);
        assert!(lines.len() == 1 && lines[0].contains(&subnet), "{lines:?}");
    }

    // br_netfilter switched on (Docker loads it when it starts): natmap
    // follows within a few ticks.
    brnf.set(true);
    let ip = web.ip4();
    eventually("self masquerade", AFTER_SYSCTL, || {
        let lines = masquerades_of(false, tcp);
        match lines.as_slice() {
            [one] if one.contains(&format!("-s {ip}/32 -d {ip}/32")) => Ok(()),
            _ => Err(format!("{lines:?}")),
        }
    });
    eventually("hairpin on", AFTER_SYSCTL, || match hairpin_mode(&port) {
        Some(m) if m == "1" => Ok(()),
        m => Err(format!("{m:?}")),
    });
    expect_own_port(&web, sa(gw, hp), PROBE_TIMEOUT);
    assert_eq!(
        seen_from(&other.name, sa(gw, hp)).unwrap(),
        IpAddr::V4(other.ip4())
    );

    // And off again: hairpin back to off, the network masqueraded again.
    brnf.set(false);
    eventually("hairpin off", AFTER_SYSCTL, || match hairpin_mode(&port) {
        Some(m) if m == "0" => Ok(()),
        m => Err(format!("{m:?}")),
    });
    eventually("network masquerade", AFTER_SYSCTL, || {
        let lines = masquerades_of(false, tcp);
        match lines.as_slice() {
            [one] if one.contains(&subnet) => Ok(()),
            _ => Err(format!("{lines:?}")),
        }
    });
    expect_own_port(&web, sa(gw, hp), PROBE_TIMEOUT);
    d.ok(&["docker", "rm", "--id", &tcp.to_string()]);
    d.ok(&["docker", "rm", "--id", &udp.to_string()]);
    assert_eq!(lines_of(&[tcp, udp]), Vec::<String>::new());
    assert_eq!(hairpin_mode(&port).as_deref(), Some("0"));
}

/// The routed case on a host without br_netfilter at all.
fn routed_case_only() {
    let web = Container::web("own", "own-routed", &[]);
    let d = RootDaemon::start();
    let hp = free_port();
    add_tcp_and_udp(&d, &web, hp);
    expect_own_port(&web, sa(gateway_v4(&web.name), hp), PROBE_TIMEOUT);
}

/// A user-defined bridge (`br-…`) with IPv6: the container reaches its own
/// mapping over IPv4 and IPv6, TCP and UDP; a neighbour on that network
/// keeps its addresses in both families; removal puts hairpin back.
#[test]
fn on_a_user_defined_dual_stack_bridge_both_families_work() {
    let (_serial, _timer) = docker_setup!();
    let brnf = BridgeNetfilter::take();
    if let Some(b) = &brnf {
        b.set(true);
    }
    let net = DockerNetwork::dual_stack("ownnet");
    let web = Container::spawn_web(
        &unique_name("own6"),
        "own-six",
        &[],
        &["--network", &net.name],
    );
    web.wait_ready();
    // A neighbour on the same network (its servers are not used).
    let neighbour = Container::spawn_web(
        &unique_name("neighbour6"),
        "neighbour6",
        &[],
        &["--network", &net.name],
    );
    let other = neighbour.name.as_str();
    let d = RootDaemon::start();
    let hp = free_port();
    let (tcp, udp) = add_tcp_and_udp(&d, &web, hp);
    let gw4 = gateway_v4(&web.name);
    let gw6 = gateway_v6(&web.name).expect("the network has IPv6");
    let (ip6, other6) = (
        ip_v6(&web.name).expect("web has IPv6"),
        ip_v6(other).expect("neighbour has IPv6"),
    );
    let port = bridge_port(&web.name);

    for target in [sa(gw4, hp), sa(gw6, hp)] {
        // The bridge's IPv6 address may still be tentative (DAD) for a second.
        expect_own_port(&web, target, Duration::from_secs(5));
    }
    if brnf.is_some() {
        assert_eq!(hairpin_mode(&port).as_deref(), Some("1"), "{port}");
        assert_eq!(
            masquerades_of(true, tcp),
            vec![format!(
                "-A NATMAP-POSTROUTING -s {ip6}/128 -d {ip6}/128 -p tcp -m tcp --dport 80 -m conntrack \
                 --ctstate DNAT -m comment --comment \"natmap:docker:{tcp}\" -j MASQUERADE"
            )]
        );
        assert_eq!(
            seen_from(other, sa(gw4, hp)).unwrap(),
            IpAddr::V4(net_field(other, "IPAddress").parse().unwrap())
        );
        assert_eq!(seen_from(other, sa(gw6, hp)).unwrap(), IpAddr::V6(other6));
    }
    d.ok(&["docker", "rm", "--id", &tcp.to_string()]);
    d.ok(&["docker", "rm", "--id", &udp.to_string()]);
    assert_eq!(lines_of(&[tcp, udp]), Vec::<String>::new());
    assert_eq!(hairpin_mode(&port).as_deref(), Some("0"), "{port}");
}

/// Who owns hairpin mode: natmap switches off only what it switched on.
/// Switched off by someone else while a mapping needs it, the tick puts it
/// back; SIGTERM and `clear` switch it off with natmap's rules, and a
/// restarted daemon switches it on again once Docker confirms the
/// container; a port already in hairpin mode before natmap (Docker does
/// that with `userland-proxy=false`) stays so after `docker rm`.
#[test]
fn natmap_switches_off_only_the_hairpin_mode_it_switched_on() {
    let (_serial, _timer) = docker_setup!();
    let Some(brnf) = BridgeNetfilter::take() else {
        skip_or_fail("br_netfilter is not loaded (Docker loads it): no hairpin mode to own");
        return;
    };
    brnf.set(true);
    let web = Container::web("own", "own-owner", &[]);
    let mut d = RootDaemon::start();
    let hp = free_port();
    let gw = gateway_v4(&web.name);
    let id = add(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    let port = bridge_port(&web.name);
    let mode = |want: &'static str| {
        let port = port.clone();
        move || match hairpin_mode(&port) {
            Some(m) if m == want => Ok(()),
            m => Err(format!("{port}: hairpin_mode {m:?}")),
        }
    };
    assert_eq!(hairpin_mode(&port).as_deref(), Some("1"));

    // Someone switches it off: repaired within a tick or two.
    set_hairpin_mode(&port, "0");
    eventually("hairpin repaired", AFTER_SYSCTL, mode("1"));
    eventually("own port after repair", PROBE_TIMEOUT, || {
        tcp_from(&web.name, sa(gw, hp))
    });
    assert!(
        d.log().contains("was switched off by something else"),
        "the repair is logged"
    );

    // SIGTERM takes it back with the rules; the next start sets it again.
    assert!(d.terminate(DAEMON_STOP_TIMEOUT).is_some(), "daemon stopped");
    assert_eq!(hairpin_mode(&port).as_deref(), Some("0"), "after SIGTERM");
    d.respawn();
    d.wait_rule(id, Duration::from_secs(5), "active", |r| {
        r["status"] == "active"
    });
    eventually("hairpin after restart", PROBE_TIMEOUT, mode("1"));
    assert_eq!(
        eventually("own port after restart", PROBE_TIMEOUT, || {
            tcp_from(&web.name, sa(gw, hp))
        }),
        web.marker
    );

    // `clear` too.
    d.ok(&["clear"]);
    assert_eq!(hairpin_mode(&port).as_deref(), Some("0"), "after clear");

    // Already on before natmap: someone else's, left on.
    set_hairpin_mode(&port, "1");
    let id = add(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    expect_own_port_tcp(&web, sa(gw, hp));
    d.ok(&["docker", "rm", "--id", &id.to_string()]);
    assert_eq!(
        hairpin_mode(&port).as_deref(),
        Some("1"),
        "natmap switched off a hairpin mode it did not switch on"
    );
    set_hairpin_mode(&port, "0");
}

/// [`expect_own_port`] for a TCP-only mapping.
#[track_caller]
fn expect_own_port_tcp(web: &Container, target: SocketAddr) {
    let body = eventually(
        &format!("{} → {target} tcp", web.name),
        PROBE_TIMEOUT,
        || tcp_from(&web.name, target),
    );
    assert_eq!(body, web.marker);
}

/// An auto-discovered mapping (a container labelled `natmap.ports`) gets
/// the same: the labelled container reaches its own TCP and UDP ports
/// through the host's address.
#[test]
fn a_labelled_container_reaches_its_own_port_too() {
    use common::auto_discover::{auto_config, labeled_web, ConfigFile, DEFAULT_LABEL};
    let (_serial, _timer) = docker_setup!();
    let brnf = BridgeNetfilter::take();
    if let Some(b) = &brnf {
        b.set(true);
    }
    let cfg = ConfigFile::new(&auto_config(true, false, &[]));
    let hp = free_port();
    let web = labeled_web(
        "own-auto",
        "own-auto",
        DEFAULT_LABEL,
        &format!("{hp}:80,{hp}:{UDP_ECHO_PORT}/udp"),
        &[],
    );
    web.wait_ready();
    let d = RootDaemon::start_with(&["--config", &cfg.arg()]);
    eventually("both auto mappings active", Duration::from_secs(5), || {
        let active = d
            .ls(None)
            .iter()
            .filter(|r| r["host_port"] == hp && r["status"] == "active")
            .count();
        if active == 2 {
            Ok(())
        } else {
            Err(format!("{active} active: {:?}", d.ls(None)))
        }
    });
    expect_own_port(&web, sa(gateway_v4(&web.name), hp), PROBE_TIMEOUT);
    if brnf.is_some() {
        assert_eq!(hairpin_mode(&bridge_port(&web.name)).as_deref(), Some("1"));
    }
}
