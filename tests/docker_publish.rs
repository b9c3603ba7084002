//! `docker add` forms operators know from `docker run -p` (issue 14,
//! "Docker parity"), against the host's real Docker engine:
//!
//! * port ranges, `8160-8161:80-81` (and `/udp`, and with a HOST_IP): one
//!   mapping per range, every port answering at its own offset, reserved
//!   and removed as a whole, refused (changing nothing) when the lengths
//!   differ or a port is another mapping's;
//! * loopback-only publish, `127.0.0.1:8152:80` and `[::1]:8152:80`:
//!   reachable on that address and nowhere else (not on the host's other
//!   addresses, not from another machine), and refusing like a closed port
//!   while the container is stopped.
//!
//! Same harness as `tests/docker.rs`: the real daemon in the root network
//! namespace, an "outside machine" namespace routed to the host, one test
//! at a time ([`serial`]), every fixture removed by a guard.

pub mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::docker::*;
use common::*;
use serde_json::Value;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LOOPBACK6: Ipv6Addr = Ipv6Addr::LOCALHOST;
/// How long a mapping may take to follow its container going down or up.
const FOLLOW_LIMIT: Duration = Duration::from_secs(5);

/// `docker add …`: asserts `result == "added"`, returns the rule.
#[track_caller]
fn added(d: &RootDaemon, args: &[&str]) -> Value {
    let data = d.ok(args);
    assert_eq!(data["result"], "added", "{args:?}: {data}");
    data["rule"].clone()
}

fn id_of(rule: &Value) -> u64 {
    rule["id"].as_u64().expect("numeric id")
}

/// natmap's lines in the root namespace for rule `id`.
fn lines_of(id: u64) -> Vec<String> {
    let tag = format!("natmap:docker:{id} ");
    natmap_lines_in_root()
        .into_iter()
        .filter(|l| l.contains(&tag) || l.ends_with(&format!("natmap:docker:{id}")))
        .collect()
}

/// The state file's bytes (`None` before the first change).
fn state_bytes(d: &RootDaemon) -> Option<Vec<u8>> {
    std::fs::read(d.state_path()).ok()
}

/// A TCP connection from the host to `target` is refused (RST), as by a
/// closed port.
#[track_caller]
fn expect_refused(target: std::net::SocketAddr) {
    match TcpStream::connect_timeout(&target, PROBE_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("{target}: expected a refused connection (closed port), got {e}"),
        Ok(_) => panic!("{target}: expected a refused connection (closed port), but it connected"),
    }
}

/// Whether anyone but natmap can bind `ip:port` (TCP) now.
fn tcp_bindable(ip: IpAddr, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok()
}

fn udp_bindable(ip: IpAddr, port: u16) -> bool {
    UdpSocket::bind((ip, port)).is_ok()
}

// ───────────────────────────── port ranges ─────────────────────────────

/// `docker add C P-(P+1):80-81` and `Q-(Q+1):5353-5354/udp`: one mapping
/// per range; from another machine and from the host's loopback each host
/// port reaches the container port at the same offset (8160→80, 8161→81);
/// `ls` shows the range compactly; `docker rm` by one port removes the
/// whole range and frees every port.
#[test]
fn docker_range_maps_every_port_at_its_offset_over_tcp_and_udp() {
    let _guard = docker_setup!();
    let outside = OutsideHost::new();
    let c = Container::per_port("range", &[80, 81], &[5353, 5354]);
    let d = RootDaemon::start();
    let p = free_port_range(2);
    let q = free_port_range(2);
    let tcp_spec = format!("{p}-{}:80-81", p + 1);
    let udp_spec = format!("{q}-{}:5353-5354/udp", q + 1);

    let tcp = added(&d, &["docker", "add", &c.name, &tcp_spec]);
    assert_eq!(tcp["host_port"], p, "{tcp}");
    assert_eq!(tcp["container_port"], 80, "{tcp}");
    assert_eq!(tcp["port_count"], 2, "{tcp}");
    assert_eq!(tcp["status"], "active", "{tcp}");
    let udp = added(&d, &["docker", "add", &c.name, &udp_spec]);
    assert_eq!(
        (udp["host_port"].as_u64(), udp["port_count"].as_u64()),
        (Some(q.into()), Some(2))
    );
    let rules = d.ls(Some(&c.name));
    assert_eq!(rules.len(), 2, "one mapping per range: {rules:?}");

    for (host, container) in [(p, 80), (p + 1, 81)] {
        let want = per_port_tcp(container);
        expect_web(&outside.client(), sa(HOST_V4, host), &want);
        expect_web(&Client::Host, sa(LOOPBACK, host), &want);
        expect_web(&Client::Host, sa(HOST_V4, host), &want);
    }
    for (host, container) in [(q, 5353), (q + 1, 5354)] {
        let want = per_port_udp(container);
        expect_udp_echo(&outside.client(), sa(HOST_V4, host), &want);
        expect_udp_echo(&Client::Host, sa(LOOPBACK, host), &want);
    }
    // Every port of both ranges is held, for both families.
    for port in [p, p + 1] {
        assert!(!tcp_port_free(port), "tcp {port} not reserved");
        assert!(!tcp_bindable(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    for port in [q, q + 1] {
        assert!(!udp_port_free(port), "udp {port} not reserved");
    }

    // `ls` lists each range on one line, compactly.
    let text = d.cli_ok(&["ls", &c.name]);
    report(&format!("  ls {}:\n{text}", c.name));
    assert!(text.contains(&format!("*:{p}-{}", p + 1)), "{text}");
    assert!(text.contains(":80-81"), "{text}");
    assert!(text.contains(&format!("*:{q}-{}", q + 1)), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(&c.name)).count(),
        2,
        "{text}"
    );

    // Removed as a whole, named by any of its ports (or the range).
    let data = d.ok(&["docker", "rm", &c.name, &(p + 1).to_string()]);
    assert_eq!(data["rule"]["id"], id_of(&tcp), "{data}");
    let data = d.ok(&["docker", "rm", &c.name, &format!("{q}-{}/udp", q + 1)]);
    assert_eq!(data["rule"]["id"], id_of(&udp), "{data}");
    assert!(d.ls(None).is_empty());
    for port in [p, p + 1] {
        assert!(tcp_port_free(port), "tcp {port} still held after rm");
        expect_no_web(&outside.client(), sa(HOST_V4, port));
    }
    for port in [q, q + 1] {
        assert!(udp_port_free(port), "udp {port} still held after rm");
    }
    assert!(lines_of(id_of(&tcp)).is_empty() && lines_of(id_of(&udp)).is_empty());
}

/// A range with a HOST_IP forwards that address only.
#[test]
fn docker_range_with_a_host_ip_forwards_that_address_only() {
    let _guard = docker_setup!();
    let outside = OutsideHost::new();
    let c = Container::per_port("rangeip", &[80, 81], &[]);
    let d = RootDaemon::start();
    let p = free_port_range(2);
    let rule = added(
        &d,
        &[
            "docker",
            "add",
            &c.name,
            &format!("{HOST_V4}:{p}-{}:80-81", p + 1),
        ],
    );
    assert_eq!(rule["host_ip"], HOST_V4.to_string(), "{rule}");
    for (host, container) in [(p, 80), (p + 1, 81)] {
        expect_web(
            &outside.client(),
            sa(HOST_V4, host),
            &per_port_tcp(container),
        );
        // The port is free on other addresses: loopback is not published.
        expect_no_web(&Client::Host, sa(LOOPBACK, host));
    }
}

/// Ranges of different lengths are refused with the field and the accepted
/// form, and change nothing: no rule, no state, no port.
#[test]
fn docker_unequal_ranges_are_refused_and_change_nothing() {
    let _guard = docker_setup!();
    let c = Container::per_port("unequal", &[80, 81], &[]);
    let d = RootDaemon::start();
    let p = free_port_range(3);
    // One mapping first, so the state file exists and must stay as it is.
    let keep = added(&d, &["docker", "add", &c.name, &format!("{p}:80")]);
    let (rules_before, state_before) = (natmap_lines_in_root(), state_bytes(&d));
    for spec in [
        format!("{}-{}:80/udp", p + 1, p + 2),
        format!("{}-{}:80-82", p + 1, p + 2),
        format!("{}:80-81", p + 1),
    ] {
        let out = d.cli(&["docker", "add", &c.name, &spec]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains("mapping port range"), "{spec}: {stderr}");
        assert!(stderr.contains("equal length"), "{spec}: {stderr}");
        assert!(
            stderr.contains("8160-8161:80-81"),
            "accepted form shown: {stderr}"
        );
    }
    // A client that skips the CLI's check gets the same answer from the daemon.
    let raw = format!(
        r#"{{"version":1,"request":{{"cmd":"docker_add","container":"{}","mapping":"{}-{}:80"}}}}"#,
        c.name,
        p + 1,
        p + 2
    );
    let answer = raw_request(&d, &raw);
    assert!(answer.contains("mapping port range"), "{answer}");
    assert_eq!(natmap_lines_in_root(), rules_before, "iptables changed");
    assert_eq!(state_bytes(&d), state_before, "state changed");
    assert_eq!(d.ls(None).len(), 1);
    assert_eq!(d.ls(None)[0]["id"], keep["id"]);
    assert!(tcp_port_free(p + 1) && tcp_port_free(p + 2));
}

/// Sends one raw JSON line to the daemon's socket and returns its answer.
fn raw_request(d: &RootDaemon, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.socket_path()).expect("connect");
    s.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer
}

/// A range overlapping another mapping's port is a conflict naming that
/// mapping (its container and range); nothing of it is reserved.
#[test]
fn docker_range_overlapping_another_mapping_is_refused_naming_it() {
    let _guard = docker_setup!();
    let a = Container::per_port("ovla", &[80, 81], &[]);
    let b = Container::per_port("ovlb", &[80, 81], &[]);
    let d = RootDaemon::start();
    let p = free_port_range(3);
    let first = added(
        &d,
        &["docker", "add", &a.name, &format!("{p}-{}:80-81", p + 1)],
    );
    let (rules_before, state_before) = (natmap_lines_in_root(), state_bytes(&d));
    let (code, message) = d.err(&[
        "docker",
        "add",
        &b.name,
        &format!("{}-{}:80-81", p + 1, p + 2),
    ]);
    assert_eq!(code, "port_in_use", "{message}");
    let holder = format!(
        "natmap rule #{} (docker {} {p}-{}/tcp)",
        id_of(&first),
        a.name,
        p + 1
    );
    assert!(message.contains(&holder), "{message}");
    assert!(
        message.contains(&format!("port {}/tcp", p + 1)),
        "{message}"
    );
    assert_eq!(natmap_lines_in_root(), rules_before);
    assert_eq!(state_bytes(&d), state_before);
    assert!(tcp_port_free(p + 2), "nothing of the refused range is held");
    // The same range of another protocol does not collide.
    added(
        &d,
        &[
            "docker",
            "add",
            &b.name,
            &format!("{}-{}:80-81/udp", p + 1, p + 2),
        ],
    );
}

// ───────────────────────────── loopback-only publish ─────────────────────────────

/// `docker add web 127.0.0.1:P:80` (and `[::1]:P6:80`, and UDP): answers on
/// that loopback address; refuses on the host's other addresses (its own,
/// Docker's bridge), on the other loopback family, and from another
/// machine; installs no kernel rule; holds the port against other binders;
/// refuses like a closed port (TCP reset, UDP silence) while the container
/// is stopped, and answers again once it runs.
#[test]
fn docker_loopback_publish_answers_on_that_address_only() {
    let _guard = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("lopub", "lopub-marker", &[]);
    let d = RootDaemon::start();
    let (p, p6, u) = (free_port(), free_port(), free_port());

    let v4 = added(
        &d,
        &["docker", "add", &web.name, &format!("127.0.0.1:{p}:80")],
    );
    assert_eq!(v4["host_ip"], "127.0.0.1", "{v4}");
    assert_eq!(v4["status"], "active", "{v4}");
    let v6 = added(&d, &["docker", "add", &web.name, &format!("[::1]:{p6}:80")]);
    assert_eq!(v6["host_ip"], "::1", "{v6}");
    let udp = added(
        &d,
        &[
            "docker",
            "add",
            &web.name,
            &format!("127.0.0.1:{u}:{UDP_ECHO_PORT}/udp"),
        ],
    );
    let ids = [id_of(&v4), id_of(&v6), id_of(&udp)];

    // Served on the loopback address, by the relay.
    expect_web(&Client::Host, sa(LOOPBACK, p), &web.marker);
    // The container has no IPv6: [::1] is relayed to its IPv4 address, as
    // docker-proxy does.
    expect_web(&Client::Host, sa(LOOPBACK6, p6), &web.marker);
    expect_udp_echo(&Client::Host, sa(LOOPBACK, u), &web.marker);

    // Nowhere else: the host's own address, Docker's bridge address, the
    // other loopback family, another machine.
    let bridge_gw: Ipv4Addr = docker_ok(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
    ])
    .parse()
    .expect("bridge gateway");
    for ip in [IpAddr::V4(HOST_V4), IpAddr::V4(bridge_gw)] {
        expect_refused(std::net::SocketAddr::new(ip, p));
        expect_no_udp_echo(&Client::Host, std::net::SocketAddr::new(ip, u));
    }
    expect_refused(sa(LOOPBACK6, p));
    expect_refused(sa(LOOPBACK, p6));
    expect_no_web(&outside.client(), sa(HOST_V4, p));
    expect_no_web(&outside.client(), sa(HOST_V4, p6));
    expect_no_udp_echo(&outside.client(), sa(HOST_V4, u));
    // No kernel rule: nothing could forward another machine's traffic.
    for id in ids {
        assert!(lines_of(id).is_empty(), "rule #{id}: {:?}", lines_of(id));
    }

    // The port is held: no other process binds it, on loopback or the wildcard.
    assert!(!tcp_bindable(IpAddr::V4(LOOPBACK), p));
    assert!(!tcp_bindable(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p));
    assert!(!tcp_bindable(IpAddr::V6(LOOPBACK6), p6));
    assert!(!udp_bindable(IpAddr::V4(LOOPBACK), u));

    // Every datagram reaches the container (one socket serves the port,
    // so none is lost to a second socket of the same address).
    for i in 0..20 {
        let payload = format!(" n{i}");
        let reply = udp_ask_once(&Client::Host, sa(LOOPBACK, u), &payload, PROBE_TIMEOUT)
            .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        assert_eq!(reply, format!("{}{payload}", web.marker));
    }

    // Stopped: a closed port, still reserved.
    web.stop();
    for id in ids {
        d.wait_rule(id, FOLLOW_LIMIT, "down", |r| r["status"] == "down");
    }
    expect_refused(sa(LOOPBACK, p));
    expect_refused(sa(LOOPBACK6, p6));
    expect_no_udp_echo(&Client::Host, sa(LOOPBACK, u));
    assert!(
        !tcp_bindable(IpAddr::V4(LOOPBACK), p),
        "still reserved while down"
    );
    assert!(
        !udp_bindable(IpAddr::V4(LOOPBACK), u),
        "still reserved while down"
    );

    // Running again: served again.
    web.start();
    for id in ids {
        d.wait_rule(id, FOLLOW_LIMIT, "active", |r| r["status"] == "active");
    }
    expect_web(&Client::Host, sa(LOOPBACK, p), &web.marker);
    expect_web(&Client::Host, sa(LOOPBACK6, p6), &web.marker);
    expect_udp_echo(&Client::Host, sa(LOOPBACK, u), &web.marker);

    // Removed: the ports are free for anyone.
    for id in ids {
        d.ok(&["docker", "rm", "--id", &id.to_string()]);
    }
    assert!(tcp_bindable(IpAddr::V4(LOOPBACK), p));
    assert!(tcp_bindable(IpAddr::V6(LOOPBACK6), p6));
    assert!(udp_bindable(IpAddr::V4(LOOPBACK), u));
}

/// A loopback range: each port relayed to its own container port.
#[test]
fn docker_loopback_range_relays_each_port_at_its_offset() {
    let _guard = docker_setup!();
    let outside = OutsideHost::new();
    let c = Container::per_port("lorange", &[80, 81], &[5353, 5354]);
    let d = RootDaemon::start();
    let (p, q) = (free_port_range(2), free_port_range(2));
    added(
        &d,
        &[
            "docker",
            "add",
            &c.name,
            &format!("127.0.0.1:{p}-{}:80-81", p + 1),
        ],
    );
    added(
        &d,
        &[
            "docker",
            "add",
            &c.name,
            &format!("127.0.0.1:{q}-{}:5353-5354/udp", q + 1),
        ],
    );
    expect_web(&Client::Host, sa(LOOPBACK, p), &per_port_tcp(80));
    expect_web(&Client::Host, sa(LOOPBACK, p + 1), &per_port_tcp(81));
    expect_udp_echo(&Client::Host, sa(LOOPBACK, q), &per_port_udp(5353));
    expect_udp_echo(&Client::Host, sa(LOOPBACK, q + 1), &per_port_udp(5354));
    expect_refused(sa(HOST_V4, p + 1));
    expect_no_web(&outside.client(), sa(HOST_V4, p));
    expect_no_udp_echo(&outside.client(), sa(HOST_V4, q));
}
