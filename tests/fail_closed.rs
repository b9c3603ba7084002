//! natmap forwards only what the operator asked for (issue: fail closed).
//!
//! Real namespaces, the real daemon in the router namespace, real traffic:
//! a reserved port that the rules did not translate is a closed port (TCP
//! refused at the handshake, UDP unanswered, spoofed sources never
//! reflected), even while someone has flushed natmap's chains; addresses
//! that are not the host's are refused unless `--allow-nonlocal`, and then
//! match only while local (a VIP that moves between two routers).

pub mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// An address outside the topology, for "another machine's" service.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// The operator's own firewall on the router lets routed traffic to and
/// from `ip` through (the topology's FORWARD policy is DROP).
fn forward_through(router: &Netns, ip: Ipv4Addr) {
    for dir in ["-d", "-s"] {
        iptables(
            router,
            false,
            &["-A", "FORWARD", dir, &format!("{ip}/32"), "-j", "ACCEPT"],
        );
    }
}

/// A TCP connect from `ns` that must be refused (RST), not time out and not
/// be accepted and closed: what a closed port answers.
#[track_caller]
fn expect_refused(ns: &Netns, target: SocketAddr) {
    let result = in_netns(ns, || TcpStream::connect_timeout(&target, NEGATIVE_TIMEOUT));
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("{target} from {}: expected refused, got {e}", ns.name),
        Ok(_) => panic!(
            "{target} from {}: expected refused, but it connected",
            ns.name
        ),
    }
}

/// Sends one datagram from `ns`, from `src` (which need not be the
/// namespace's own address: `IP_TRANSPARENT` lets a test spoof it).
fn send_udp_from(ns: &Netns, src: SocketAddr, target: SocketAddr, payload: &[u8]) {
    in_netns(ns, || {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let one: libc::c_int = 1;
        // SAFETY: valid fd and option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TRANSPARENT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_TRANSPARENT: {}", std::io::Error::last_os_error());
        nix::sys::socket::bind(
            socket.as_raw_fd(),
            &nix::sys::socket::SockaddrStorage::from(src),
        )
        .expect("bind the spoofed source");
        let socket = UdpSocket::from(socket);
        socket.send_to(payload, target).expect("send");
    });
}

#[test]
fn an_ingress_bound_forward_is_a_closed_port_on_every_other_path() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _tcp = TcpEcho::start(&topo.server, v4(SERVER_V4, 8080));
    let udp = UdpEcho::start(&topo.server, v4(SERVER_V4, 5353));
    // The attacker's best case: no reverse-path filter on the router.
    topo.router.sysctl_set("net.ipv4.conf.all.rp_filter", "0");
    topo.router.sysctl_set("net.ipv4.conf.br0.rp_filter", "0");
    let d = Daemon::start(&topo.router);
    for (port, proto) in [("8080", "tcp"), ("5353", "udp")] {
        d.cli_ok(
            &dnat_args("192.0.2.1", "198.51.100.2", port)
                .proto(proto)
                .ext_if("ext0"),
        );
    }
    // The interface the operator named: forwarded, client address kept.
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 8080), CLIENT_V4, 8080);
    expect_udp(&topo.client, v4(ROUTER_EXT_V4, 5353), CLIENT_V4, 5353);
    // The echo counts a datagram after answering it: let the count settle.
    std::thread::sleep(Duration::from_millis(200));
    let seen_before = udp.datagrams();

    // Another interface (the LAN side) and the router itself: a closed port.
    expect_refused(&topo.server2, v4(ROUTER_EXT_V4, 8080));
    expect_refused(&topo.router, v4(ROUTER_EXT_V4, 8080));
    expect_no_udp(&topo.server2, v4(ROUTER_EXT_V4, 5353));

    // A spoofed UDP source from the LAN side: nothing is reflected to the
    // "victim" (the client), and nothing reaches the target.
    let victim = in_netns(&topo.client, || {
        let s = UdpSocket::bind(v4(CLIENT_V4, 40000)).expect("victim socket");
        s.set_read_timeout(Some(NEGATIVE_TIMEOUT)).unwrap();
        s
    });
    send_udp_from(
        &topo.server2,
        v4(CLIENT_V4, 40000),
        v4(ROUTER_EXT_V4, 5353),
        b"reflect me",
    );
    let mut buf = [0u8; 256];
    if let Ok((n, from)) = victim.recv_from(&mut buf) {
        panic!(
            "reflected to the spoofed source: {:?} from {from}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    assert_eq!(
        udp.datagrams(),
        seen_before,
        "the target got the spoofed datagram"
    );
    d.assert_clean_log();
}

#[test]
fn a_flushed_chain_forwards_nothing_until_the_repair() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _tcp = TcpEcho::start(&topo.server, v4(SERVER_V4, 8081));
    let mut d = Daemon::start(&topo.router);
    d.allow_log("drift");
    d.allow_log("repair");
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "8081"));
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 8081), CLIENT_V4, 8081);
    // The daemon is held (SIGSTOP) across the flush and one probe: on
    // nftables, events repair within tens of milliseconds, a race for the
    // probe. A held daemon cannot repair, and its reservations (bound,
    // never listening) still refuse in the kernel.
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(d.pid().expect("running") as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    flush_natmap_dnat(&topo.router, false);
    let held = tcp_probe_opts(
        &topo.client,
        None,
        v4(ROUTER_EXT_V4, 8081),
        NEGATIVE_TIMEOUT,
    );
    kill(pid, Signal::SIGCONT).unwrap();
    let e = held.expect_err("a flushed mapping forwards nothing");
    assert!(e.contains("refused"), "a closed port is refused: {e}");
    // Until the repair (≤ one 2 s tick) the port is closed; never proxied
    // by the daemon (the server would then see the router's address).
    let deadline = Instant::now() + Duration::from_secs(4);
    let (mut refused, mut repaired) = (1, false);
    while Instant::now() < deadline {
        match tcp_probe_opts(
            &topo.client,
            None,
            v4(ROUTER_EXT_V4, 8081),
            NEGATIVE_TIMEOUT,
        ) {
            Ok(reply) => {
                assert_eq!(
                    reply,
                    echo_reply(CLIENT_V4.into(), 8081),
                    "proxied, not NATed"
                );
                repaired = true;
                break;
            }
            Err(e) => {
                assert!(e.contains("refused"), "a closed port is refused: {e}");
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused > 0, "the flushed window was never observed");
    assert!(repaired, "not repaired within 4 s");
}

/// A server in `ns` that accepts and holds connections open, echoing bytes.
fn start_holder(ns: &Netns, bind: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = in_netns(ns, || TcpListener::bind(bind).expect("bind holder"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut held = Vec::new();
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let (mut from, mut to) = (s.try_clone().unwrap(), s.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                    });
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
}

/// Connects from the router to 127.0.0.1:`port` and checks an echo.
fn relayed(ns: &Netns, port: u16) -> std::io::Result<TcpStream> {
    let mut s = in_netns(ns, || {
        TcpStream::connect_timeout(&v4(Ipv4Addr::LOCALHOST, port), PROBE_TIMEOUT)
    })?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}

#[test]
fn the_relay_serves_loopback_only_is_bounded_and_refuses_self_loops() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _holder = start_holder(&topo.server, v4(SERVER_V4, 9200));
    let dir = StateDir::new();
    std::fs::write(
        dir.path().join("config.toml"),
        "[relay]\nmax_connections = 3\nidle_timeout_secs = 2\n",
    )
    .unwrap();
    let mut opts = DaemonOptions::isolated();
    opts.extra_args.push("--config".into());
    opts.extra_args.push(dir.path().join("config.toml").into());
    let mut d = Daemon::start_with_options(&topo.router, &dir, opts);
    d.allow_log("relay limit reached");
    d.cli_ok(&["docker", "add", "9200:198.51.100.2:9200", "--name", "svc"]);

    // Loopback is relayed; the cap holds at 3 connections.
    let mut open: Vec<TcpStream> = (0..3)
        .map(|i| relayed(&topo.router, 9200).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert!(
        relayed(&topo.router, 9200).is_err(),
        "a 4th relayed connection"
    );
    // An idle connection is closed after the idle timeout, freeing a slot.
    std::thread::sleep(Duration::from_millis(2600));
    let mut b = [0u8; 1];
    assert_eq!(
        open[0].read(&mut b).unwrap_or(0),
        0,
        "idle connection still open"
    );
    open.clear();
    relayed(&topo.router, 9200).expect("a slot is free again");

    // A target that is natmap's own reserved port is refused at add time.
    let out = d.cli(&["docker", "add", "9300:192.0.2.1:9300", "--name", "loop"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forward to itself"), "{err}");
    let out = d.cli(&["docker", "add", "9301:192.0.2.1:9200", "--name", "loop2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("rule #1"));
    d.assert_clean_log();
}

#[test]
fn removing_a_mapping_cuts_its_relayed_connections() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _holder = start_holder(&topo.server, v4(SERVER_V4, 9210));
    let d = Daemon::start_with_options(&topo.router, &StateDir::new(), DaemonOptions::isolated());
    d.cli_ok(&["docker", "add", "9210:198.51.100.2:9210", "--name", "svc"]);
    let mut conn = relayed(&topo.router, 9210).expect("relayed");
    d.cli_ok(&["docker", "rm", "--name", "svc", "9210"]);
    let mut b = [0u8; 1];
    let _ = conn.write_all(b"y");
    match conn.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("the relayed connection survived docker rm"),
    }
    // And the port is a closed port now, on loopback too.
    expect_refused(&topo.router, v4(Ipv4Addr::LOCALHOST, 9210));
    d.assert_clean_log();
}

#[test]
fn a_nonlocal_address_is_refused_unless_allowed_and_then_never_captures() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    // "Another machine": server2 also owns 203.0.113.5, routed through the router.
    topo.server2
        .ip(&["addr", "add", &format!("{ELSEWHERE}/32"), "dev", HOST_IF]);
    topo.router.ip(&[
        "route",
        "add",
        &format!("{ELSEWHERE}/32"),
        "via",
        "198.51.100.3",
    ]);
    forward_through(&topo.router, ELSEWHERE);
    let _theirs = TcpEcho::start(&topo.server2, v4(ELSEWHERE, 8185));
    let _ours = TcpEcho::start(&topo.server, v4(SERVER_V4, 8185));
    let d = Daemon::start(&topo.router);
    let dnat = |extra: &[&str]| {
        let mut args = vec![
            "dnat",
            "--ext-ip",
            "203.0.113.5",
            "--int-ip",
            "198.51.100.2",
            "--ports",
            "8185",
        ];
        args.extend_from_slice(extra);
        d.cli_json_output(&args)
    };
    let (status, out) = dnat(&[]);
    assert!(!status.success());
    assert_eq!(out["error"]["code"], "address_not_local", "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(message.contains("203.0.113.5") && message.contains("--allow-nonlocal"));
    assert!(
        natmap_installed(&topo.router, false).is_empty(),
        "nothing installed"
    );
    // Typed HOST_IP of a docker mapping: the same.
    let out = d.cli(&[
        "docker",
        "add",
        "203.0.113.5:8186:192.0.2.9:80",
        "--name",
        "x",
    ]);
    assert!(!out.status.success());

    let (status, out) = dnat(&["--allow-nonlocal"]);
    assert!(status.success(), "{out}");
    assert_eq!(
        out["data"]["rule"]["status"], "waiting_for_address",
        "{out}"
    );
    // The remote service keeps its traffic: the rule does not capture it.
    expect_tcp(&topo.client, v4(ELSEWHERE, 8185), CLIENT_V4, 8185);
    let reply = tcp_probe(&topo.client, v4(ELSEWHERE, 8185)).unwrap();
    assert_eq!(reply, echo_reply(CLIENT_V4.into(), 8185));
    assert_eq!(
        _ours.connections(),
        0,
        "our server captured another machine's traffic"
    );

    // The address arrives here: the forward works at once, status active.
    topo.server2
        .ip(&["addr", "del", &format!("{ELSEWHERE}/32"), "dev", HOST_IF]);
    topo.router
        .ip(&["addr", "add", &format!("{ELSEWHERE}/32"), "dev", "ext0"]);
    expect_tcp(&topo.client, v4(ELSEWHERE, 8185), CLIENT_V4, 8185);
    assert_eq!(_ours.connections(), 1);
    let ls = d.cli_json(&["ls"]);
    assert_eq!(ls["data"]["rules"][0]["status"], "active", "{ls}");
    d.assert_clean_log();
}

#[test]
fn a_rule_whose_address_leaves_is_withdrawn_and_comes_back_with_it() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    topo.router
        .ip(&["addr", "add", "192.0.2.50/24", "dev", "ext0"]);
    let _tcp = TcpEcho::start(&topo.server, v4(SERVER_V4, 8190));
    let mut d = Daemon::start(&topo.router);
    d.allow_log("address left this host");
    d.cli_ok(&dnat_args("192.0.2.50", "198.51.100.2", "8190"));
    expect_tcp(
        &topo.client,
        v4(Ipv4Addr::new(192, 0, 2, 50), 8190),
        CLIENT_V4,
        8190,
    );
    topo.router
        .ip(&["addr", "del", "192.0.2.50/24", "dev", "ext0"]);
    let gone = wait_for(Duration::from_secs(5), || {
        natmap_installed(&topo.router, false).is_empty()
    });
    assert!(
        gone,
        "rules still in place: {:?}",
        natmap_installed(&topo.router, false)
    );
    let ls = d.cli_json(&["ls"]);
    assert_eq!(
        ls["data"]["rules"][0]["status"], "waiting_for_address",
        "{ls}"
    );
    topo.router
        .ip(&["addr", "add", "192.0.2.50/24", "dev", "ext0"]);
    let back = wait_for(Duration::from_secs(5), || {
        tcp_probe(&topo.client, v4(Ipv4Addr::new(192, 0, 2, 50), 8190)).is_ok()
    });
    assert!(back, "the rule did not come back with its address");
    d.assert_clean_log();
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vip_moving_between_two_natmap_routers_moves_the_forward_within_a_second() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    // Two routers: `router` and `server2` (a second gateway on the LAN),
    // both with the same --allow-nonlocal forward of the VIP to `server`.
    let vip = ELSEWHERE;
    topo.router
        .ip(&["route", "add", &format!("{vip}/32"), "via", "198.51.100.3"]);
    topo.server2.sysctl_set("net.ipv4.ip_forward", "1");
    forward_through(&topo.router, vip);
    // server2 masquerades what it forwards to the server, so replies come back through it.
    iptables(
        &topo.server2,
        false,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "198.51.100.2",
            "-j",
            "MASQUERADE",
        ],
    );
    let _svc = TcpEcho::start(&topo.server, v4(SERVER_V4, 443));
    let a = Daemon::start(&topo.router);
    let b = Daemon::start(&topo.server2);
    for d in [&a, &b] {
        d.cli_ok(&dnat_args("203.0.113.5", "198.51.100.2", "443").arg("--allow-nonlocal"));
    }
    let target = v4(vip, 443);
    // On router A: A forwards (client address kept), B forwards nothing.
    topo.router
        .ip(&["addr", "add", &format!("{vip}/32"), "dev", "ext0"]);
    expect_tcp(&topo.client, target, CLIENT_V4, 443);
    assert_eq!(
        counter_of(&topo.server2),
        0,
        "the node without the VIP translated traffic"
    );
    // Move it to B: traffic follows (through A's routing to B) within 1 s.
    topo.router
        .ip(&["addr", "del", &format!("{vip}/32"), "dev", "ext0"]);
    topo.server2
        .ip(&["addr", "add", &format!("{vip}/32"), "dev", HOST_IF]);
    let moved = Instant::now();
    let followed = wait_for(Duration::from_secs(1), || {
        tcp_probe_opts(&topo.client, None, target, Duration::from_millis(300))
            .is_ok_and(|r| r == echo_reply(SERVER2_V4.into(), 443))
    });
    let took = moved.elapsed();
    report_line(&format!("VIP failover: traffic followed in {took:?}"));
    assert!(followed, "traffic did not follow the VIP within 1 s");
    assert!(counter_of(&topo.server2) > 0);
    a.assert_clean_log();
    b.assert_clean_log();
}

/// Packets natmap's DNAT translated in `ns` (counters of nat `NATMAP`,
/// hooked from PREROUTING, and of its shards; on the nftables pass, of
/// the elements of natmap's dnat maps).
fn counter_of(ns: &Netns) -> u64 {
    use natmap::firewall::iptables::Chain;
    if testing_nftables() {
        return nft_dnat_packets(ns, false);
    }
    let mut ours = false;
    let mut sum = 0;
    for l in iptables(ns, false, &["-t", "nat", "-L", "-v", "-n", "-x"]).lines() {
        if let Some(rest) = l.strip_prefix("Chain ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            ours = name == "NATMAP" || Chain::NatPrerouting.is_shard_name(name);
        } else if ours && l.contains("DNAT") {
            sum += l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    sum
}

/// A figure for the closing note, on the real stderr.
fn report_line(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn a_mapping_on_every_address_holds_both_families_and_relays_each_loopback() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _v4 = TcpEcho::start(&topo.server, v4(SERVER_V4, 9400));
    let _v6 = TcpEcho::start(&topo.server, SocketAddr::new(SERVER_V6.into(), 9401));
    let d = Daemon::start_with_options(&topo.router, &StateDir::new(), DaemonOptions::isolated());
    d.cli_ok(&["docker", "add", "9400:198.51.100.2:9400", "--name", "svc4"]);
    d.cli_ok(&[
        "docker",
        "add",
        "9401:[2001:db8:2::2]:9401",
        "--name",
        "svc6",
    ]);
    let lo6 = |port| SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port);
    // Both families' ports are held, also against IPV6_V6ONLY binders.
    for port in [9400, 9401] {
        let taken = in_netns(&topo.router, || {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet6,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true).unwrap();
            let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
            nix::sys::socket::bind(s.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(any))
                .is_err()
        });
        assert!(taken, "[::]:{port} could be bound by another process");
    }
    // Each loopback reaches the target of its family; the other is closed.
    let reply = tcp_probe(&topo.router, v4(Ipv4Addr::LOCALHOST, 9400)).expect("127.0.0.1 relayed");
    assert!(reply.ends_with(" 9400"), "{reply}");
    expect_refused(&topo.router, lo6(9400));
    let reply = tcp_probe(&topo.router, lo6(9401)).expect("[::1] relayed");
    assert!(reply.ends_with(" 9401"), "{reply}");
    expect_refused(&topo.router, v4(Ipv4Addr::LOCALHOST, 9401));
    d.assert_clean_log();
}
