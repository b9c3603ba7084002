//! Cutting a removed mapping's tracked connections over ctnetlink
//! (`src/daemon/conntrack.rs`): real flows through a `dnat` in the test
//! topology, and entries made with `conntrack -I` in a namespace of their
//! own, checked with `conntrack -L`.

pub mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use natmap::daemon::host::Flows;
use natmap::model::Proto;

/// A tracked connection as `conntrack -L` shows it, without its timer:
/// protocol, original source, destination and ports, reply source, zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Tracked {
    proto: String,
    src: String,
    dst: String,
    sport: String,
    dport: String,
    reply_src: String,
    zone: String,
}

impl Tracked {
    fn to(&self, proto: &str, dst: &str, reply_src: &str) -> bool {
        self.proto == proto && self.dst == dst && self.reply_src == reply_src
    }
}

/// `conntrack -L -f FAMILY` in `ns`.
fn tracked(ns: &Netns, family: &str) -> BTreeSet<Tracked> {
    let out = ns.run_ok(&["conntrack", "-L", "-f", family]);
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let proto = words.next()?.to_owned();
            let mut seen: Vec<(&str, &str)> = Vec::new();
            for w in words {
                if let Some(kv) = w.split_once('=') {
                    seen.push(kv);
                }
            }
            let nth = |key: &str, n: usize| {
                seen.iter()
                    .filter(|(k, _)| *k == key)
                    .nth(n)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default()
            };
            Some(Tracked {
                proto,
                src: nth("src", 0),
                dst: nth("dst", 0),
                sport: nth("sport", 0),
                dport: nth("dport", 0),
                reply_src: nth("src", 1),
                zone: nth("zone", 0),
            })
        })
        .collect()
}

/// One datagram from `socket` (a fixed flow), `Ok` with the echo or `Err`.
fn exchange(socket: &UdpSocket) -> Result<String, String> {
    socket.send(b"probe").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// A UDP socket in `ns` connected to `target`, for one flow that keeps its
/// source port.
fn udp_flow(ns: &Netns, target: SocketAddr) -> UdpSocket {
    let socket = in_netns(ns, || UdpSocket::bind("0.0.0.0:0")).expect("bind");
    socket.connect(target).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    socket
}

#[test]
fn delete_cuts_exactly_the_mappings_tracked_connections_over_netlink() {
    if !privileged() {
        return;
    }
    delete_cuts_exactly("iptables");
}

#[test]
fn delete_cuts_exactly_the_mappings_tracked_connections_on_nftables() {
    if !privileged() || (find_on_path("nft").is_none() && !skip_or_fail("`nft` on PATH")) {
        return;
    }
    delete_cuts_exactly("nftables");
}

/// Real flows through three `dnat`s on `backend`; deleting one cuts its
/// flows and nothing else, over netlink.
fn delete_cuts_exactly(backend: &str) {
    let topo = Topology::new();
    if backend == "nftables" {
        // The nftables backend has no `DOCKER-USER` accept yet (see
        // tests/nftables.rs): let forwarded traffic through.
        iptables(&topo.router, false, &["-P", "FORWARD", "ACCEPT"]);
    }
    let _dns = UdpEcho::start(&topo.server, SocketAddr::new(SERVER_V4.into(), 5353));
    let _smtp = TcpEcho::start(&topo.server, SocketAddr::new(SERVER_V4.into(), 25));
    let _other = UdpEcho::start(&topo.server2, SocketAddr::new(SERVER2_V4.into(), 5354));
    let mut opts = DaemonOptions::isolated();
    opts.extra_args.extend(["--backend".into(), backend.into()]);
    // The daemon says at debug level which way it cut.
    opts.env
        .push(("RUST_LOG".into(), "warn,natmap=debug,lab_ops=debug".into()));
    let d = Daemon::start_with_options(&topo.router, &StateDir::new(), opts);
    let (ext, server, server2) = (
        ROUTER_EXT_V4.to_string(),
        SERVER_V4.to_string(),
        SERVER2_V4.to_string(),
    );
    let udp = dnat_args(&ext, &server, "5353").proto("udp");
    d.cli_ok(&udp);
    d.cli_ok(&dnat_args(&ext, &server, "25"));
    d.cli_ok(&dnat_args(&ext, &server2, "5354").proto("udp"));

    // Two UDP flows and a TCP connection to the server, a UDP flow to
    // server2, and an entry answered by the server for another original
    // destination (not natmap's: made by hand).
    let ext_at = |port| SocketAddr::new(ROUTER_EXT_V4.into(), port);
    let flow = udp_flow(&topo.client, ext_at(5353));
    assert_eq!(exchange(&flow), Ok(format!("{CLIENT_V4} 5353")));
    expect_udp(&topo.client, ext_at(5353), CLIENT_V4, 5353);
    expect_tcp(&topo.client, ext_at(25), CLIENT_V4, 25);
    expect_udp(&topo.client, ext_at(5354), CLIENT_V4, 5354);
    topo.router.run_ok(&[
        "conntrack",
        "-I",
        "-p",
        "udp",
        "-s",
        "192.0.2.7",
        "-d",
        "192.0.2.9",
        "--sport",
        "1000",
        "--dport",
        "5353",
        "-r",
        &server,
        "-q",
        "192.0.2.7",
        "--reply-port-src",
        "5353",
        "--reply-port-dst",
        "1000",
        "-t",
        "120",
    ]);
    let before = tracked(&topo.router, "ipv4");
    let count = |set: &BTreeSet<Tracked>, proto, dst: &str, reply: &str| {
        set.iter().filter(|t| t.to(proto, dst, reply)).count()
    };
    assert_eq!(count(&before, "udp", &ext, &server), 2, "{before:#?}");
    assert_eq!(count(&before, "tcp", &ext, &server), 1, "{before:#?}");
    assert_eq!(count(&before, "udp", &ext, &server2), 1, "{before:#?}");
    assert_eq!(
        count(&before, "udp", "192.0.2.9", &server),
        1,
        "{before:#?}"
    );

    // Deleting the UDP mapping cuts its two flows and nothing else: not the
    // TCP connection to the same address pair, not server2's flow, not the
    // entry of another original destination.
    d.cli_ok(&udp.clone().delete());
    let after = tracked(&topo.router, "ipv4");
    let want: BTreeSet<Tracked> = before
        .iter()
        .filter(|t| !t.to("udp", &ext, &server))
        .cloned()
        .collect();
    assert_eq!(after, want, "before the delete: {before:#?}");
    // The same flow (same source port) is no longer sent to the server.
    assert!(
        exchange(&flow).is_err(),
        "the deleted mapping's flow is still answered (its entry was kept)"
    );

    // The TCP mapping next: its connection goes, server2's flow stays.
    d.cli_ok(&dnat_args(&ext, &server, "25").delete());
    let last = tracked(&topo.router, "ipv4");
    assert_eq!(count(&last, "tcp", &ext, &server), 0, "{last:#?}");
    assert_eq!(count(&last, "udp", &ext, &server2), 1, "{last:#?}");
    assert_eq!(count(&last, "udp", "192.0.2.9", &server), 1, "{last:#?}");

    let log = d.log();
    assert!(
        log.contains("tracked connections over netlink"),
        "the cut did not go over netlink:\n{log}"
    );
    assert!(
        !log.contains("running the conntrack program instead"),
        "the cut fell back to the conntrack program:\n{log}"
    );
    d.assert_clean_log();
}

/// `conntrack -I` of an entry `src:sport -> dst:dport` answered by
/// `reply_src` (ports mirrored), in `zone` (0: the default zone).
#[allow(clippy::too_many_arguments)]
fn insert_from(
    ns: &Netns,
    proto: &str,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    reply_src: &str,
    zone: u16,
) {
    in_netns(ns, || {
        insert_here(proto, src, sport, dst, dport, reply_src, zone);
    });
}

/// [`insert_from`] in the calling thread's namespace (no `ip netns exec`).
#[allow(clippy::too_many_arguments)]
fn insert_here(
    proto: &str,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    reply_src: &str,
    zone: u16,
) {
    let (sport, dport, zone) = (sport.to_string(), dport.to_string(), zone.to_string());
    let mut args = vec![
        "-I",
        "-p",
        proto,
        "-s",
        src,
        "-d",
        dst,
        "--sport",
        &sport,
        "--dport",
        &dport,
        "-r",
        reply_src,
        "-q",
        src,
        "--reply-port-src",
        &dport,
        "--reply-port-dst",
        &sport,
        "-t",
        "120",
        "--zone",
        &zone,
    ];
    if proto == "tcp" {
        args.extend(["--state", "ESTABLISHED"]);
    }
    let out = Command::new("conntrack")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run conntrack");
    assert!(
        out.status.success(),
        "conntrack {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn flows(proto: Proto, orig_dst: Option<&str>, port: Option<u16>, reply_src: &str) -> Flows {
    Flows {
        proto,
        orig_dst: orig_dst.map(|d| d.parse().unwrap()),
        orig_port: port,
        reply_src: reply_src.parse().unwrap(),
    }
}

/// Several filters of both families in one call (what a batch of removed
/// rules asks for): every entry one of them selects goes, in any zone;
/// entries none selects stay.
#[test]
fn one_cut_serves_several_filters_of_both_families_and_every_zone() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("ct");
    let cut_v4 = [
        ("udp", "192.0.2.1", 53, "198.51.100.2", 0),
        ("udp", "192.0.2.1", 53, "198.51.100.2", 7),
        ("tcp", "192.0.2.1", 8080, "198.51.100.3", 0),
    ];
    let keep_v4 = [
        ("tcp", "192.0.2.1", 53, "198.51.100.2", 0),
        ("tcp", "192.0.2.1", 8081, "198.51.100.3", 0),
        ("udp", "192.0.2.5", 53, "198.51.100.2", 0),
    ];
    let cut_v6 = [("tcp", "2001:db8:1::1", 443, "2001:db8:2::2", 0)];
    let keep_v6 = [("tcp", "2001:db8:1::1", 443, "2001:db8:2::3", 0)];
    // One source port each: no two entries share a reply tuple.
    let v4 = cut_v4.iter().chain(&keep_v4).map(|e| ("192.0.2.2", e));
    let v6 = cut_v6.iter().chain(&keep_v6).map(|e| ("2001:db8:1::2", e));
    for (i, (src, (proto, dst, port, reply, zone))) in v4.chain(v6).enumerate() {
        insert_from(&ns, proto, src, 1000 + i as u16, dst, *port, reply, *zone);
    }
    let filters = [
        flows(Proto::Udp, Some("192.0.2.1"), None, "198.51.100.2"),
        flows(Proto::Tcp, None, Some(8080), "198.51.100.3"),
        flows(
            Proto::Tcp,
            Some("2001:db8:1::1"),
            Some(443),
            "2001:db8:2::2",
        ),
    ];
    let cut = in_netns(&ns, || natmap::daemon::conntrack::cut(&filters)).expect("netlink cut");
    assert_eq!(cut, cut_v4.len() + cut_v6.len());
    let left = |family| -> BTreeSet<(String, String, String, String, String)> {
        tracked(&ns, family)
            .into_iter()
            .map(|t| (t.proto, t.dst, t.dport, t.reply_src, t.zone))
            .collect()
    };
    let want = |rows: &[(&str, &str, u16, &str, u16)]| -> BTreeSet<_> {
        rows.iter()
            .map(|(p, d, port, r, z)| {
                let zone = if *z == 0 {
                    String::new()
                } else {
                    z.to_string()
                };
                (
                    p.to_string(),
                    d.to_string(),
                    port.to_string(),
                    r.to_string(),
                    zone,
                )
            })
            .collect()
    };
    assert_eq!(left("ipv4"), want(&keep_v4));
    assert_eq!(left("ipv6"), want(&keep_v6));
    // Nothing left to select: a second cut deletes nothing and succeeds.
    let again = in_netns(&ns, || natmap::daemon::conntrack::cut(&filters)).expect("netlink cut");
    assert_eq!(again, 0);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time of one cut (one matching UDP entry among N unrelated ones) over
/// netlink and with the `conntrack -D` process, median of 21 each:
/// `sudo cargo test --test conntrack -- --ignored --nocapture measure`
/// (`NATMAP_CT_SIZES=0,1000,10000` to choose N).
#[test]
#[ignore = "measurement; run by hand"]
fn measure_cut_netlink_vs_conntrack_process() {
    if !privileged() {
        return;
    }
    let sizes: Vec<usize> = std::env::var("NATMAP_CT_SIZES")
        .unwrap_or_else(|_| "0,1000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("NATMAP_CT_SIZES: numbers"))
        .collect();
    let filter = flows(Proto::Udp, Some("192.0.2.1"), None, "198.51.100.2");
    for n in sizes {
        let ns = Netns::new("ctm");
        // N unrelated entries: another address pair, one source port each.
        in_netns(&ns, || {
            for i in 0..n {
                let src = format!("10.{}.{}.2", i / 60000, (i / 250) % 240);
                let sport = 1024 + (i % 60000) as u16;
                insert_here("udp", &src, sport, "10.255.0.1", 53, "10.255.0.2", 0);
            }
        });
        let (netlink, process) = in_netns(&ns, || {
            let (mut netlink, mut process) = (Vec::new(), Vec::new());
            for _ in 0..21 {
                insert_here("udp", "192.0.2.2", 1000, "192.0.2.1", 53, "198.51.100.2", 0);
                let t = Instant::now();
                let cut = natmap::daemon::conntrack::cut(&[filter]).expect("cut");
                netlink.push(t.elapsed());
                assert_eq!(cut, 1);
                insert_here("udp", "192.0.2.2", 1000, "192.0.2.1", 53, "198.51.100.2", 0);
                // What the daemon ran before: the same command, no shell.
                let t = Instant::now();
                let status = Command::new("conntrack")
                    .args(["-D", "-f", "ipv4", "-p", "udp", "--orig-dst", "192.0.2.1"])
                    .args(["--reply-src", "198.51.100.2"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("run conntrack");
                process.push(t.elapsed());
                assert!(status.success());
            }
            (netlink, process)
        });
        assert_eq!(
            tracked(&ns, "ipv4").len(),
            n,
            "only the matching entry went"
        );
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "N = {n:>6}: netlink {:>8.3} ms, conntrack -D {:>8.3} ms (median of 21; load {})",
            median(netlink).as_secs_f64() * 1e3,
            median(process).as_secs_f64() * 1e3,
            load.split_whitespace().next().unwrap_or("?"),
        );
    }
}
