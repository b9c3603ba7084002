//! Proves the integration-test harness (`tests/common`) itself works, with no
//! natmap and no NAT involved: the topology routes, the router's FORWARD
//! policy really drops, the echo servers and probes report what the kernel
//! did, sockets made with `in_netns` live in their namespace, and nothing is
//! left behind.

pub mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn accept_forwarding(topo: &Topology) {
    for v6 in [false, true] {
        iptables(&topo.router, v6, &["-A", "FORWARD", "-j", "ACCEPT"]);
    }
}

/// Names of veth interfaces in the namespace the test process runs in.
fn root_veths() -> BTreeSet<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect()
}

#[test]
fn forward_drop_blocks_client_until_router_accepts_v4_v6_tcp_udp() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let tcp4 = TcpEcho::start(&topo.server, sa(SERVER_V4, 0));
    let udp4 = UdpEcho::start(&topo.server, sa(SERVER_V4, 0));
    let tcp6 = TcpEcho::start(&topo.server, sa(SERVER_V6, 0));
    let udp6 = UdpEcho::start(&topo.server, sa(SERVER_V6, 0));

    // The router reaches both sides itself (INPUT/OUTPUT are not filtered) ...
    expect_tcp(&topo.router, tcp4.addr(), ROUTER_INT_V4, tcp4.port());
    expect_tcp(&topo.router, tcp6.addr(), ROUTER_INT_V6, tcp6.port());
    let tcp_before = tcp4.connections() + tcp6.connections();
    assert_eq!(tcp_before, 2, "the router's two probes were answered");
    // ... but forwards nothing: FORWARD policy is DROP in both families.
    expect_no_tcp(&topo.client, tcp4.addr());
    expect_no_udp(&topo.client, udp4.addr());
    expect_no_tcp(&topo.client, tcp6.addr());
    expect_no_udp(&topo.client, udp6.addr());
    assert_eq!(
        tcp4.connections() + tcp6.connections(),
        tcp_before,
        "dropped SYNs must not reach the server"
    );
    assert_eq!(
        udp4.datagrams() + udp6.datagrams(),
        0,
        "dropped datagrams must not reach the server"
    );

    accept_forwarding(&topo);

    // Plain routing, no NAT: the server sees the client's own address.
    expect_tcp(&topo.client, tcp4.addr(), CLIENT_V4, tcp4.port());
    expect_udp(&topo.client, udp4.addr(), CLIENT_V4, udp4.port());
    expect_tcp(&topo.client, tcp6.addr(), CLIENT_V6, tcp6.port());
    expect_udp(&topo.client, udp6.addr(), CLIENT_V6, udp6.port());
    // And the other direction (server -> client) is routed too.
    let client_tcp = TcpEcho::start(&topo.client, "[::]:0".parse().unwrap()); // dual stack
    expect_tcp(
        &topo.server,
        sa(CLIENT_V4, client_tcp.port()),
        SERVER_V4,
        client_tcp.port(),
    );
    expect_tcp(
        &topo.server,
        sa(CLIENT_V6, client_tcp.port()),
        SERVER_V6,
        client_tcp.port(),
    );
    assert_eq!(
        tcp4.connections(),
        2,
        "one probe from the router, one from the client"
    );
    assert_eq!(udp4.datagrams(), 1, "one datagram from the client");
}

#[test]
fn topology_lives_only_in_its_namespaces_and_is_gone_after_drop() {
    if !privileged() {
        return;
    }
    let veths_before = root_veths();
    let topo = Topology::new();
    let names = topo.names();
    assert_eq!(names.len(), 4);
    for name in &names {
        assert!(name.starts_with(NETNS_PREFIX), "{name}");
        assert!(Netns::exists(name), "namespace {name} should exist");
    }
    assert_eq!(
        BTreeSet::from_iter(names.iter()).len(),
        4,
        "namespace names must be unique: {names:?}"
    );
    // No interface of the topology was created in the test's own namespace.
    assert_eq!(
        root_veths(),
        veths_before,
        "the topology must not create veths in the root namespace"
    );
    // The veths exist where they belong.
    let links = topo.router.ip(&["-o", "link", "show"]);
    for dev in [ROUTER_EXT_IF, ROUTER_INT_IF, "veth-srv", "veth-srv2"] {
        assert!(
            links.contains(&format!(": {dev}")),
            "router lacks {dev}:\n{links}"
        );
    }

    drop(topo);
    for name in &names {
        assert!(
            !Netns::exists(name),
            "namespace {name} still exists after drop"
        );
    }
    assert_eq!(
        root_veths(),
        veths_before,
        "veths leaked into the root namespace"
    );
}

#[test]
fn in_netns_sockets_stay_in_their_namespace() {
    if !privileged() {
        return;
    }
    let a = Netns::new("a");
    let b = Netns::new("b");

    // A listener created inside `a` on loopback, accepted on this thread.
    let listener = in_netns(&a, || TcpListener::bind("127.0.0.1:0")).expect("bind in a");
    let addr = listener.local_addr().unwrap();
    // Reachable from `a` (even via a different in_netns thread) ...
    let client = in_netns(&a, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    });
    assert!(
        client.is_ok(),
        "connect inside the same namespace failed: {client:?}"
    );
    let (_conn, peer) = listener.accept().expect("accept on the test thread");
    assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    // ... but not from `b`, nor from the test's own namespace.
    let from_b = in_netns(&b, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    });
    assert!(
        from_b.is_err(),
        "a socket of namespace a was reachable from namespace b"
    );
    let from_root = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(
        from_root.is_err(),
        "a socket of namespace a was reachable from the root namespace"
    );

    // Same with the echo helpers.
    let echo = TcpEcho::start(&a, "127.0.0.1:0".parse().unwrap());
    expect_tcp(&a, echo.addr(), Ipv4Addr::LOCALHOST, echo.port());
    expect_no_tcp(&b, echo.addr());
    let uecho = UdpEcho::start(&a, "[::1]:0".parse().unwrap());
    expect_udp(
        &a,
        uecho.addr(),
        std::net::Ipv6Addr::LOCALHOST,
        uecho.port(),
    );
    expect_no_udp(&b, uecho.addr());

    // The calling thread is not moved: /proc/thread-self/net shows the
    // namespace of the reading thread; inside `b` only `lo` exists.
    let dev_in_b = in_netns(&b, || {
        std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
    });
    let dev_here = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert_eq!(
        dev_in_b.lines().count(),
        3,
        "namespace b should only have lo:\n{dev_in_b}"
    );
    assert_ne!(
        dev_in_b, dev_here,
        "the calling thread must stay in its own namespace"
    );
}

#[test]
fn router_is_configured_like_a_docker_host() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let r = &topo.router;
    assert_eq!(topo.router_ext_if(), "ext0");
    assert_eq!(topo.router_int_if(), "br0");
    let ext = r.ip(&["addr", "show", "dev", topo.router_ext_if()]);
    assert!(ext.contains(&format!("{ROUTER_EXT_V4}/24")), "{ext}");
    assert!(ext.contains(&format!("{ROUTER_EXT_V6}/64")), "{ext}");
    let int = r.ip(&["addr", "show", "dev", topo.router_int_if()]);
    assert!(int.contains(&format!("{ROUTER_INT_V4}/24")), "{int}");
    assert!(int.contains(&format!("{ROUTER_INT_V6}/64")), "{int}");
    for ns in topo.all() {
        let v6 = ns.ip(&["-6", "addr"]);
        assert!(
            !v6.contains("tentative"),
            "[{}] DAD must be off:\n{v6}",
            ns.name
        );
    }
    assert_eq!(r.sysctl_get("net.ipv4.ip_forward").as_deref(), Some("1"));
    assert_eq!(
        r.sysctl_get("net.ipv6.conf.all.forwarding").as_deref(),
        Some("1")
    );
    assert_eq!(
        topo.client.sysctl_get("net.ipv4.ip_forward").as_deref(),
        Some("0")
    );
    assert_eq!(r.sysctl_get("net.no.such.key"), None);

    for v6 in [false, true] {
        assert_eq!(
            iptables_rules(r, v6, "filter", "FORWARD"),
            vec!["-P FORWARD DROP"]
        );
        assert!(iptables_save(r, v6).contains(":FORWARD DROP"));
        assert!(!chain_exists(r, v6, "nat", "NATMAP"));
        assert!(try_iptables_rules(r, v6, "nat", "NATMAP")
            .unwrap_err()
            .contains("NATMAP"));
        iptables(r, v6, &["-t", "nat", "-N", "NATMAP"]);
        iptables(
            r,
            v6,
            &[
                "-t", "nat", "-A", "NATMAP", "-p", "tcp", "--dport", "25", "-j", "RETURN",
            ],
        );
        assert_eq!(
            iptables_rules(r, v6, "nat", "NATMAP"),
            vec!["-N NATMAP", "-A NATMAP -p tcp -m tcp --dport 25 -j RETURN"]
        );
        assert_eq!(
            iptables_appended_rules(r, v6, "nat", "NATMAP"),
            vec!["-A NATMAP -p tcp -m tcp --dport 25 -j RETURN"]
        );
    }
    // Default routes of the hosts point at the router.
    let routes = topo.client.ip(&["-6", "route", "show", "default"]);
    assert!(routes.contains(&format!("via {ROUTER_EXT_V6}")), "{routes}");
}

#[test]
fn probes_from_a_chosen_source_and_the_router_itself() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let tcp = TcpEcho::start(&topo.server, "[::]:0".parse().unwrap()); // dual stack
    let udp = UdpEcho::start(&topo.server, "[::]:0".parse().unwrap());
    // The router's own traffic is OUTPUT, not FORWARD: allowed, source chosen.
    expect_tcp_from(
        &topo.router,
        ROUTER_EXT_V4,
        sa(SERVER_V4, tcp.port()),
        ROUTER_EXT_V4,
        tcp.port(),
    );
    expect_tcp_from(
        &topo.router,
        ROUTER_INT_V4,
        sa(SERVER_V4, tcp.port()),
        ROUTER_INT_V4,
        tcp.port(),
    );
    expect_tcp_from(
        &topo.router,
        ROUTER_EXT_V6,
        sa(SERVER_V6, tcp.port()),
        ROUTER_EXT_V6,
        tcp.port(),
    );
    expect_udp_from(
        &topo.router,
        ROUTER_EXT_V4,
        sa(SERVER_V4, udp.port()),
        ROUTER_EXT_V4,
        udp.port(),
    );
    expect_udp_from(
        &topo.router,
        ROUTER_EXT_V6,
        sa(SERVER_V6, udp.port()),
        ROUTER_EXT_V6,
        udp.port(),
    );
    assert_eq!(
        tcp_probe(&topo.router, sa(SERVER_V4, tcp.port())).unwrap(),
        format!("{ROUTER_INT_V4} {}", tcp.port())
    );
    // Binding a source the namespace does not own fails cleanly.
    let err = tcp_probe_from(
        &topo.router,
        IpAddr::V4(CLIENT_V4),
        sa(SERVER_V4, tcp.port()),
    )
    .unwrap_err();
    assert!(err.contains("Cannot assign requested address"), "{err}");
    // A closed port is refused quickly, not a timeout.
    let err = tcp_probe(&topo.router, sa(SERVER_V4, 1)).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    let err = udp_probe(&topo.router, sa(SERVER_V4, 1)).unwrap_err();
    assert!(err.contains("refused"), "{err}");
}

#[test]
fn server2_reaches_server_over_the_bridge_without_router_filtering() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let tcp = TcpEcho::start(&topo.server, "[::]:0".parse().unwrap());
    let udp = UdpEcho::start(&topo.server, "[::]:0".parse().unwrap());
    // FORWARD is DROP, but server2 -> server is bridged, not routed.
    expect_tcp(
        &topo.server2,
        sa(SERVER_V4, tcp.port()),
        SERVER2_V4,
        tcp.port(),
    );
    expect_tcp(
        &topo.server2,
        sa(SERVER_V6, tcp.port()),
        SERVER2_V6,
        tcp.port(),
    );
    expect_udp(
        &topo.server2,
        sa(SERVER_V4, udp.port()),
        SERVER2_V4,
        udp.port(),
    );
    // Routed traffic from server2 to the client side is still dropped.
    let client_tcp = TcpEcho::start(&topo.client, "[::]:0".parse().unwrap());
    expect_no_tcp(&topo.server2, sa(CLIENT_V4, client_tcp.port()));
    // The router's external address is reachable from server2 (router INPUT),
    // which is what hairpin NAT builds on.
    let router_tcp = TcpEcho::start(&topo.router, sa(ROUTER_EXT_V4, 0));
    expect_tcp(
        &topo.server2,
        router_tcp.addr(),
        SERVER2_V4,
        router_tcp.port(),
    );

    // With br_netfilter semantics (a Docker host), bridged traffic passes
    // the router's FORWARD chain and is dropped by its policy.
    if topo
        .router
        .sysctl_get("net.bridge.bridge-nf-call-iptables")
        .is_some()
    {
        topo.set_bridge_netfilter(true);
        expect_no_tcp(&topo.server2, sa(SERVER_V4, tcp.port()));
        topo.set_bridge_netfilter(false);
        expect_tcp(
            &topo.server2,
            sa(SERVER_V4, tcp.port()),
            SERVER2_V4,
            tcp.port(),
        );
    } else {
        eprintln!("note: br_netfilter not loaded, bridge-netfilter toggle not tested");
    }
}

#[test]
fn echo_servers_stop_when_dropped() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("echo");
    let tcp = TcpEcho::start(&ns, "127.0.0.1:0".parse().unwrap());
    let udp = UdpEcho::start(&ns, "127.0.0.1:0".parse().unwrap());
    let (taddr, uaddr) = (tcp.addr(), udp.addr());
    expect_tcp(&ns, taddr, Ipv4Addr::LOCALHOST, taddr.port());
    expect_udp(&ns, uaddr, Ipv4Addr::LOCALHOST, uaddr.port());
    drop(tcp);
    drop(udp);
    let err = tcp_probe(&ns, taddr).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    expect_no_udp(&ns, uaddr);
    // The port is free again right away (SO_REUSEADDR on the listener).
    let again = TcpEcho::start(&ns, taddr);
    expect_tcp(&ns, taddr, Ipv4Addr::LOCALHOST, taddr.port());
    drop(again);
}

#[test]
fn expect_no_tcp_panics_when_traffic_gets_through() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("neg");
    let tcp = TcpEcho::start(&ns, "127.0.0.1:0".parse().unwrap());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        expect_no_tcp(&ns, tcp.addr())
    }));
    let msg = *result
        .expect_err("expect_no_tcp must panic")
        .downcast::<String>()
        .unwrap();
    assert!(msg.contains("expected no connection"), "{msg}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        expect_tcp(&ns, tcp.addr(), CLIENT_V4, tcp.port())
    }));
    let msg = *result
        .expect_err("expect_tcp must panic")
        .downcast::<String>()
        .unwrap();
    assert!(msg.contains("instead of \"192.0.2.2"), "{msg}");
}

#[test]
#[should_panic(expected = "timed out")]
fn commands_are_bounded_by_a_timeout() {
    run_with_timeout(
        std::process::Command::new("sleep").arg("10"),
        Duration::from_millis(200),
    );
}

#[test]
fn state_dir_outlives_daemon_handles() {
    let dir = StateDir::new();
    let path = dir.path().to_path_buf();
    let clone = dir.clone();
    drop(dir);
    assert!(path.is_dir(), "a clone must keep the state dir alive");
    assert_eq!(clone.state_path(), path.join("state.json"));
    assert_eq!(clone.socket_path(), path.join("natmap.sock"));
    drop(clone);
    assert!(!path.exists(), "the last handle removes the state dir");
    assert!(std::path::Path::new(LAB_OPS_BIN).exists(), "{LAB_OPS_BIN}");
}
