//! Static DNAT, SNAT and hairpin on a real kernel: a client ─ router ─ server
//! topology per test, the real daemon in the router namespace, real TCP and
//! UDP traffic, and the exact rules in natmap's chains.

pub mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn v6(ip: std::net::Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

fn dnat_mail(d: &Daemon) -> serde_json::Value {
    d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", "25,465"))
}

#[test]
fn multiport_dnat_forwards_tcp_and_keeps_the_client_address() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let _smtps = TcpEcho::start(&topo.server, v4(SERVER_V4, 465));
    let d = Daemon::start(&topo.router);
    // FORWARD policy is DROP: nothing passes before natmap's rule.
    expect_no_tcp(&topo.client, v4(ROUTER_EXT_V4, 25));

    let added = dnat_mail(&d);
    assert_eq!(added["ok"], true, "{added}");
    assert_eq!(added["data"]["result"], "added");
    assert_eq!(added["data"]["rule"]["id"], 1);

    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 465), CLIENT_V4, 465);
    // The router's own traffic to its external address is forwarded too.
    expect_tcp(&topo.router, v4(ROUTER_EXT_V4, 25), ROUTER_EXT_V4, 25);

    if testing_nftables() {
        // Each port an element of the dnat map and of the forward counters;
        // natmap's accept first in Docker's DOCKER-USER.
        assert_eq!(
            natmap_installed(&topo.router, false),
            [
                "dnat_port 192.0.2.1 . tcp . 25 : 198.51.100.2",
                "dnat_port 192.0.2.1 . tcp . 465 : 198.51.100.2",
                "fwd_port 198.51.100.2 . tcp . 25",
                "fwd_port 198.51.100.2 . tcp . 465",
            ]
        );
        assert_nft_accept_first(&topo.router, false);
        d.assert_clean_log();
        return;
    }
    assert_eq!(
        natmap_installed(&topo.router, false),
        [
            "nat -A NATMAP -d 192.0.2.1/32 -p tcp -m multiport --dports 25,465 -m comment --comment \"natmap:dnat:1\" -j DNAT --to-destination 198.51.100.2",
            "nat -A NATMAP-OUTPUT -d 192.0.2.1/32 -p tcp -m multiport --dports 25,465 -m comment --comment \"natmap:dnat:1\" -j DNAT --to-destination 198.51.100.2",
            "filter -A NATMAP -d 198.51.100.2/32 -p tcp -m multiport --dports 25,465 -m conntrack --ctstate DNAT -m comment --comment \"natmap:dnat:1\" -j ACCEPT",
            "filter -A NATMAP -s 198.51.100.2/32 -p tcp -m multiport --sports 25,465 -m conntrack --ctstate DNAT -m comment --comment \"natmap:dnat:1\" -j ACCEPT",
        ]
    );
    // One jump each, first in its hook chain.
    for (table, hook, target) in [
        ("nat", "PREROUTING", "NATMAP"),
        ("nat", "OUTPUT", "NATMAP-OUTPUT"),
        ("nat", "POSTROUTING", "NATMAP-POSTROUTING"),
        ("filter", "DOCKER-USER", "NATMAP"),
        ("filter", "FORWARD", "DOCKER-USER"),
    ] {
        let lines = iptables_rules(&topo.router, false, table, hook);
        let jump = format!("-A {hook} -j {target}");
        assert_eq!(
            lines.iter().filter(|l| **l == jump).count(),
            1,
            "{table} {hook}: {lines:?}"
        );
        assert_eq!(
            lines.iter().find(|l| l.starts_with("-A ")),
            Some(&jump),
            "{lines:?}"
        );
    }
    d.assert_clean_log();
}

#[test]
fn udp_dnat_with_ingress_interface() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _dns = UdpEcho::start(&topo.server, v4(SERVER_V4, 5353));
    let d = Daemon::start(&topo.router);
    d.cli_ok(
        &dnat_args("192.0.2.1", "198.51.100.2", "5353")
            .proto("udp")
            .ext_if(topo.router_ext_if()),
    );
    expect_udp(&topo.client, v4(ROUTER_EXT_V4, 5353), CLIENT_V4, 5353);
    let rules = natmap_installed(&topo.router, false);
    if testing_nftables() {
        // Bound to an interface: only in dnat_iif, which the output chain
        // (the host's own traffic) never looks up.
        assert_eq!(
            rules,
            [
                format!(
                    "dnat_iif {} . 192.0.2.1 . udp . 5353 : 198.51.100.2",
                    topo.router_ext_if()
                ),
                "fwd_port 198.51.100.2 . udp . 5353".to_owned(),
            ]
        );
        let output = topo
            .router
            .run_ok(&["nft", "list", "chain", "ip", "natmap", "output"]);
        assert!(!output.contains("dnat_iif"), "{output}");
        d.assert_clean_log();
        return;
    }
    assert_eq!(
        rules[0],
        format!(
            "nat -A NATMAP -d 192.0.2.1/32 -i {} -p udp -m udp --dport 5353 -m comment --comment \"natmap:dnat:1\" -j DNAT --to-destination 198.51.100.2",
            topo.router_ext_if()
        )
    );
    // Bound to an interface: no OUTPUT rule for the host's own traffic.
    assert!(
        !rules.iter().any(|r| r.contains("NATMAP-OUTPUT")),
        "{rules:?}"
    );
    d.assert_clean_log();
}

#[test]
fn ipv6_dnat_and_mixed_families_are_refused() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(&topo.server, v6(SERVER_V6, 8080));
    let d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("2001:db8:1::1", "2001:db8:2::2", "8080"));
    expect_tcp(&topo.client, v6(ROUTER_EXT_V6, 8080), CLIENT_V6, 8080);
    if testing_nftables() {
        assert_eq!(
            natmap_installed(&topo.router, true),
            [
                "dnat_port 2001:db8:1::1 . tcp . 8080 : 2001:db8:2::2",
                "fwd_port 2001:db8:2::2 . tcp . 8080",
            ]
        );
    } else {
        assert_eq!(natmap_installed(&topo.router, true).len(), 4);
    }
    assert!(natmap_installed(&topo.router, false).is_empty());

    let (status, mixed) = d.cli_json_output(&dnat_args("192.0.2.1", "2001:db8:2::2", "8081"));
    assert_eq!(status.code(), Some(1));
    assert_eq!(mixed["error"]["code"], "invalid_argument", "{mixed}");
    assert!(mixed["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--ext-ip and --int-ip"));
    d.assert_clean_log();
}

#[test]
fn hairpin_masquerades_only_internal_clients() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(&topo.server, v4(SERVER_V4, 80));
    let d = Daemon::start(&topo.router);
    let out = d.cli_json(&hairpin_args("192.0.2.1", "198.51.100.2", "80"));
    assert_eq!(out["data"]["rule"]["int_net"], "198.51.100.0/24", "{out}");
    // An outside client keeps its own address…
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 80), CLIENT_V4, 80);
    // …an internal neighbour is masqueraded, so the reply comes back via the router…
    expect_tcp(&topo.server2, v4(ROUTER_EXT_V4, 80), ROUTER_INT_V4, 80);
    // …and so is the server reaching itself through the external address.
    expect_tcp(&topo.server, v4(ROUTER_EXT_V4, 80), ROUTER_INT_V4, 80);
    d.assert_clean_log();
}

#[test]
fn snat_rewrites_only_the_given_source_on_the_given_interface() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _outside = TcpEcho::start(&topo.client, v4(CLIENT_V4, 7000));
    // Let the servers' own connections out (this is not natmap's business).
    iptables(&topo.router, false, &["-A", "FORWARD", "-j", "ACCEPT"]);
    let d = Daemon::start(&topo.router);
    expect_tcp(&topo.server, v4(CLIENT_V4, 7000), SERVER_V4, 7000);
    d.cli_ok(&snat_args(
        "198.51.100.2",
        topo.router_ext_if(),
        "192.0.2.1",
    ));
    expect_tcp(&topo.server, v4(CLIENT_V4, 7000), ROUTER_EXT_V4, 7000);
    // Another source is left alone.
    expect_tcp(&topo.server2, v4(CLIENT_V4, 7000), SERVER2_V4, 7000);
    let want = if testing_nftables() {
        format!(
            "snat_out {} . 198.51.100.2 : 192.0.2.1",
            topo.router_ext_if()
        )
    } else {
        format!(
            "nat -A NATMAP-POSTROUTING -s 198.51.100.2/32 -o {} -m comment --comment \"natmap:snat:1\" -j SNAT --to-source 192.0.2.1",
            topo.router_ext_if()
        )
    };
    assert_eq!(natmap_installed(&topo.router, false), [want]);
    d.cli_ok(&snat_args("198.51.100.2", topo.router_ext_if(), "192.0.2.1").delete());
    expect_tcp(&topo.server, v4(CLIENT_V4, 7000), SERVER_V4, 7000);
    d.assert_clean_log();
}

#[test]
fn delete_stops_traffic_releases_ports_and_readd_is_idempotent() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let d = Daemon::start(&topo.router);
    dnat_mail(&d);
    let before = natmap_installed(&topo.router, false);
    let again = dnat_mail(&d);
    assert_eq!(again["data"]["result"], "already_present", "{again}");
    // Same ports in another order are the same rule.
    let reordered = d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", "465,25"));
    assert_eq!(reordered["data"]["result"], "already_present");
    assert_eq!(
        natmap_installed(&topo.router, false),
        before,
        "no duplicate rules"
    );

    // The port is held while the rule exists.
    let bind = || {
        in_netns(&topo.router, || {
            std::net::TcpListener::bind(v4(ROUTER_EXT_V4, 25)).is_ok()
        })
    };
    assert!(!bind(), "port 25 must be reserved by natmap");

    let deleted = d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", "25,465").delete());
    assert_eq!(deleted["data"]["result"], "deleted", "{deleted}");
    expect_no_tcp(&topo.client, v4(ROUTER_EXT_V4, 25));
    assert!(natmap_installed(&topo.router, false).is_empty());
    assert!(bind(), "port 25 released after delete");

    let (status, missing) =
        d.cli_json_output(&dnat_args("192.0.2.1", "198.51.100.2", "25,465").delete());
    assert_eq!(status.code(), Some(1));
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    d.assert_clean_log();
}

#[test]
fn kill9_and_restart_rebuild_exactly_the_same_rules() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let _dns = UdpEcho::start(&topo.server, v4(SERVER_V4, 53));
    let mut d = Daemon::start(&topo.router);
    dnat_mail(&d);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "53").proto("udp"));
    d.cli_ok(&hairpin_args("192.0.2.1", "198.51.100.3", "80"));
    let rules = natmap_installed(&topo.router, false);
    let save_before = iptables_save(&topo.router, false);

    d.kill9();
    // The kernel keeps forwarding while the daemon is down.
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    d.respawn();
    assert_eq!(
        natmap_installed(&topo.router, false),
        rules,
        "restart with old rules present: no duplicates"
    );
    let jumps = |s: &str| {
        s.lines()
            .filter(|l| {
                l.contains("-j NATMAP")
                    || l.contains("-j DOCKER-USER")
                    || l.contains("natmap-nftables")
            })
            .count()
    };
    assert_eq!(
        jumps(&iptables_save(&topo.router, false)),
        jumps(&save_before)
    );
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    expect_udp(&topo.client, v4(ROUTER_EXT_V4, 53), CLIENT_V4, 53);

    // A reboot: the daemon is gone and the tables are empty.
    d.kill9();
    reboot_firewall(&topo.router);
    expect_no_tcp(&topo.client, v4(ROUTER_EXT_V4, 25));
    d.respawn();
    assert_eq!(
        natmap_installed(&topo.router, false),
        rules,
        "recovery into empty tables"
    );
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    expect_udp(&topo.client, v4(ROUTER_EXT_V4, 53), CLIENT_V4, 53);
    let ls = d.cli_json(&["ls"]);
    assert_eq!(ls["data"]["rules"].as_array().unwrap().len(), 3);
    d.assert_clean_log();
}

#[test]
fn busy_port_fails_whole_request_and_nothing_is_installed() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    let blocker = in_netns(&topo.router, || {
        std::net::TcpListener::bind(v4(ROUTER_EXT_V4, 2525)).unwrap()
    });
    let state_before = state_files(&d.state_path());
    let (status, out) = d.cli_json_output(&dnat_args("192.0.2.1", "198.51.100.2", "2524,2525"));
    assert_eq!(status.code(), Some(1));
    assert_eq!(out["error"]["code"], "port_in_use", "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(message.contains("2525/tcp"), "{message}");
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "owner named: {message}"
    );
    assert!(natmap_installed(&topo.router, false).is_empty());
    assert_eq!(
        state_files(&d.state_path()),
        state_before,
        "state untouched"
    );
    // 2524 was bound first and released again.
    assert!(in_netns(&topo.router, || std::net::TcpListener::bind(v4(
        ROUTER_EXT_V4,
        2524
    ))
    .is_ok()));

    drop(blocker);
    let ok = d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", "2524,2525"));
    assert_eq!(ok["data"]["result"], "added", "{ok}");
    // A second natmap rule on the same port names the rule that holds it.
    let (_, clash) = d.cli_json_output(&dnat_args("192.0.2.1", "198.51.100.3", "2525"));
    assert_eq!(clash["error"]["code"], "port_in_use");
    assert!(
        clash["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rule #1"),
        "{clash}"
    );
    d.assert_clean_log();
}

#[test]
fn restart_skips_rules_whose_port_was_taken_and_installs_them_when_free() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(&topo.server, v4(SERVER_V4, 8080));
    let mut d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "8080"));
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "8443"));
    d.kill9();
    let squatter = in_netns(&topo.router, || {
        std::net::TcpListener::bind(v4(ROUTER_EXT_V4, 8080)).unwrap()
    });
    d.respawn();
    let ls = d.cli_json(&["ls"]);
    let rules = ls["data"]["rules"].as_array().unwrap();
    assert_eq!(rules[0]["status"], "port_conflict", "{ls}");
    assert!(rules[0]["detail"].as_str().unwrap().contains("8080/tcp"));
    assert_eq!(rules[1]["status"], "active");
    assert!(d.log().contains("rule skipped"), "warning logged");
    let installed = natmap_installed(&topo.router, false);
    assert!(
        !installed.iter().any(|r| r.contains("8080")),
        "{installed:?}"
    );
    assert!(installed.iter().any(|r| r.contains("8443")));

    drop(squatter);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while natmap_installed(&topo.router, false)
        .iter()
        .all(|r| !r.contains("8080"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "rule not installed after the port was freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 8080), CLIENT_V4, 8080);
    d.assert_clean_log_except(&["rule skipped"]);
}

#[test]
fn twenty_concurrent_clients_all_land_and_survive_a_crash() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let mut d = Daemon::start(&topo.router);
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20u16)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let port = (10000 + i).to_string();
                    d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", port))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r["data"]["result"], "added", "{r}");
    }
    let mut ids: Vec<u64> = results
        .iter()
        .map(|r| r["data"]["rule"]["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=20).collect::<Vec<_>>(),
        "every request got its own id"
    );
    assert_eq!(natmap_dnat_entries(&topo.router), 20);
    d.kill9();
    let state = serde_json::to_value(current_state(&d.state_path())).unwrap();
    assert_eq!(
        state["rules"].as_array().unwrap().len(),
        20,
        "every acknowledged change is on disk"
    );
    d.respawn();
    assert_eq!(natmap_dnat_entries(&topo.router), 20);
    d.assert_clean_log();
}

#[test]
fn bad_input_is_refused_and_leaves_rules_and_state_byte_identical() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    dnat_mail(&d);
    let state_before = state_files(&d.state_path());
    let rules_before = iptables_save(&topo.router, false);
    let installed_before = natmap_installed(&topo.router, false);
    cli_refuses_bad_arguments(&d);
    socket_refuses_bad_requests(&d);
    assert_eq!(
        state_files(&d.state_path()),
        state_before,
        "state byte-identical"
    );
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(&iptables_save(&topo.router, false)),
        strip(&rules_before),
        "rules identical"
    );
    assert_eq!(
        natmap_installed(&topo.router, false),
        installed_before,
        "rules identical"
    );
    d.assert_clean_log();
}

/// Each malformed rule command line is a usage error (exit 2) naming the
/// offending argument.
fn cli_refuses_bad_arguments(d: &Daemon) {
    let cli_cases = [
        (dnat_args("192.0.2.1", "198.51.100.2", "0"), "--ports"),
        (dnat_args("192.0.2.1", "198.51.100.2", "70000"), "--ports"),
        (
            dnat_args("192.0.2.1", "198.51.100.2", "25;reboot"),
            "--ports",
        ),
        (dnat_args("192.0.2.300", "198.51.100.2", "25"), "--ext-ip"),
        (dnat_args("192.0.2.1", "127.0.0.1", "25"), "--int-ip"),
        (
            dnat_args("192.0.2.1", "198.51.100.2", "25").proto("icmp"),
            "--proto",
        ),
        (
            dnat_args("192.0.2.1", "198.51.100.2", "25").ext_if("eth0\n-A INPUT -j DROP"),
            "interface",
        ),
        (
            dnat_args("192.0.2.1", "198.51.100.2", "25").ext_if("averyveryverylongname"),
            "interface",
        ),
        (snat_args("10.0.0.0/40", "eth0", "192.0.2.1"), "--int-ip"),
        (snat_args("10.0.0.0/24", "../x", "192.0.2.1"), "interface"),
    ];
    for (args, field) in &cli_cases {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?} must be a usage error");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(field),
            "{args:?}: error must name {field}: {stderr}"
        );
    }
}

/// The same and worse sent straight onto the socket, past the CLI's checks:
/// every line gets an error answer (with a code), on one connection.
fn socket_refuses_bad_requests(d: &Daemon) {
    let raw_cases = [
        r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","ext_if":"x\n-A INPUT -j DROP"}}"#,
        r#"{"version":1,"request":{"cmd":"snat","int_ip":"10.0.0.0/24","ext_if":"eth0","ext_ip":"192.0.2.1 -j ACCEPT"}}"#,
        r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","delete":"yes"}}"#,
        r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","comment":"x"}}"#,
        r#"{"version":1,"request":{"cmd":"flush"}}"#,
        r#"{"version":7,"request":{"cmd":"clear"}}"#,
        r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"2001:db8::2","ports":"26"}}"#,
        "\u{0}\u{1}garbage",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];
    // One connection for all of them: a bad line must not end it.
    let mut client = d.connect();
    let answers: Vec<serde_json::Value> = raw_cases
        .iter()
        .map(|line| {
            client.send_raw(format!("{line}\n").as_bytes()).unwrap();
            client
                .read_response()
                .unwrap()
                .unwrap_or_else(|| panic!("{line}: the daemon closed the connection"))
        })
        .collect();
    for (line, answer) in raw_cases.iter().zip(&answers) {
        assert_eq!(answer["ok"], false, "{line} → {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ext_if"),
        "{}",
        answers[0]
    );
    assert_eq!(answers[5]["error"]["code"], "version_mismatch");
}

#[test]
fn fwd_enables_forwarding_and_reports_the_change() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    topo.router.sysctl_set("net.ipv4.ip_forward", "0");
    let d = Daemon::start(&topo.router);
    let out = d.cli_json(&["fwd"]);
    let sysctls = out["data"]["sysctls"].as_array().unwrap();
    assert_eq!(sysctls[0]["name"], "net.ipv4.ip_forward");
    assert_eq!(sysctls[0]["before"], "0");
    assert_eq!(sysctls[0]["after"], "1");
    assert_eq!(
        topo.router.sysctl_get("net.ipv4.ip_forward").as_deref(),
        Some("1")
    );
    let state = serde_json::to_value(current_state(&d.state_path())).unwrap();
    assert_eq!(state["forwarding"], true, "remembered for the next start");
    d.assert_clean_log();
}

#[test]
fn clear_removes_every_rule_chain_and_reservation() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    dnat_mail(&d);
    d.cli_ok(&dnat_args("2001:db8:1::1", "2001:db8:2::2", "25"));
    d.cli_ok(&snat_args("198.51.100.0/24", "ext0", "192.0.2.1"));
    let out = d.cli_json(&["clear"]);
    assert_eq!(out["data"]["removed"], 3, "{out}");
    for v6 in [false, true] {
        let save = iptables_save(&topo.router, v6);
        // natmap's chains (iptables), its DOCKER-USER accept (nftables).
        assert!(
            !save.contains("NATMAP") && !save.contains("natmap-nftables"),
            "natmap left something behind:\n{save}"
        );
        let left = natmap_installed(&topo.router, v6);
        assert!(left.is_empty(), "natmap left something behind: {left:?}");
    }
    assert!(in_netns(&topo.router, || std::net::TcpListener::bind(v4(
        ROUTER_EXT_V4,
        25
    ))
    .is_ok()));
    assert_eq!(
        d.cli_json(&["ls"])["data"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // natmap works again after a clear.
    assert_eq!(dnat_mail(&d)["data"]["result"], "added");
    assert_eq!(natmap_installed(&topo.router, false).len(), 4);
    d.assert_clean_log();
}

#[test]
fn socket_is_group_only_and_corrupt_state_is_moved_aside() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let topo = Topology::new();
    let dir = StateDir::new();
    std::fs::write(dir.state_path(), b"{\"schema_version\":1,\"rules\":[tru").unwrap();
    let d = Daemon::start_with_state_dir(&topo.router, &dir);
    let mode = std::fs::metadata(d.socket_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    assert!(d.log().contains("STATE FILE IS CORRUPT"), "{}", d.log());
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "corrupt file kept for inspection");
    assert_eq!(
        std::fs::read(moved[0].path()).unwrap(),
        b"{\"schema_version\":1,\"rules\":[tru"
    );
    let (status, report) = d.cli_json_output(&["status"]);
    assert_eq!(
        status.code(),
        Some(4),
        "a corrupt state needs attention: {report}"
    );
    assert!(
        report["data"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("corrupt"),
        "{report}"
    );
    assert_eq!(
        d.cli_json(&["ls"])["data"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    d.assert_clean_log_except(&["STATE FILE IS CORRUPT"]);
}

/// Waits (≤ 6 s) until `check` holds, returning how long it took.
fn wait_for(what: &str, check: impl Fn() -> bool) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(6),
            "{what}: not within 6 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn external_changes_to_natmap_rules_are_repaired() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let d = Daemon::start(&topo.router);
    dnat_mail(&d);
    d.cli_ok(&snat_args("198.51.100.0/24", "ext0", "192.0.2.1"));
    d.cli_ok(&hairpin_args("192.0.2.1", "198.51.100.3", "80"));
    let good = natmap_installed(&topo.router, false);
    // A quiet period first: correct rules are never "repaired".
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        !d.log().contains("changed from outside"),
        "false drift:\n{}",
        d.log()
    );
    if testing_nftables() {
        nft_sabotage_is_repaired(&topo, &d, &good);
        return;
    }

    let sabotage: &[&[&str]] = &[
        &["-t", "nat", "-F", "NATMAP"],
        &["-t", "nat", "-D", "PREROUTING", "-j", "NATMAP"],
        &["-t", "filter", "-D", "DOCKER-USER", "-j", "NATMAP"],
        &["-t", "nat", "-I", "POSTROUTING", "1", "-j", "RETURN"],
    ];
    // A rule put above a hook is routine (Docker does it on every network
    // it creates): that repair is logged as information, the others warn.
    let repairs_logged = || {
        let log = d.log();
        log.matches("changed from outside").count()
            + log.matches("moved them back to first").count()
    };
    for (i, args) in sabotage.iter().enumerate() {
        iptables(&topo.router, false, args);
        let took = wait_for(&format!("repair after iptables {args:?}"), || {
            repairs_logged() > i
        });
        eprintln!("repair after {args:?}: {took:?}");
        assert_eq!(natmap_installed(&topo.router, false), good);
        expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    }
    // The foreign rule stays, behind natmap's jump.
    let post = iptables_rules(&topo.router, false, "nat", "POSTROUTING");
    assert_eq!(post[1], "-A POSTROUTING -j NATMAP-POSTROUTING", "{post:?}");
    assert!(
        post.contains(&"-A POSTROUTING -j RETURN".to_string()),
        "{post:?}"
    );

    // A restore of a baseline without natmap (what a firewall reload does).
    let baseline = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    let path = d.dir().join("baseline.rules");
    std::fs::write(&path, baseline).unwrap();
    topo.router
        .run_ok(&["iptables-restore", path.to_str().unwrap()]);
    // (Until the repair, connections reach natmap's reserved socket and are
    // relayed without the client's address; the repair restores kernel DNAT.)
    wait_for("repair after a baseline restore", || {
        repairs_logged() > sabotage.len()
    });
    assert_eq!(
        d.log().matches("moved them back to first").count(),
        1,
        "the inserted RETURN alone is a routine repair"
    );
    assert_eq!(natmap_installed(&topo.router, false), good);
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    d.assert_clean_log_except(&["changed from outside"]);
}

/// [`external_changes_to_natmap_rules_are_repaired`] on the nftables
/// backend: natmap's map flushed, a chain flushed, its `DOCKER-USER`
/// accept deleted, its table deleted. Each is put back by the drift check
/// within 6 s, the elements are the good ones again and traffic is DNATed
/// (the client's address kept).
fn nft_sabotage_is_repaired(topo: &Topology, d: &Daemon, good: &[String]) {
    let repairs = || d.call(serde_json::json!({"cmd": "status"}))["data"]["repairs"].as_u64();
    let accept = natmap::firewall::nftables::docker_user::rule(
        natmap::firewall::nftables::marks::Marks::default().ct,
    );
    let delete_accept = format!("-D DOCKER-USER {accept}");
    let sabotage: [Vec<&str>; 4] = [
        vec!["nft", "flush", "map", "ip", "natmap", "dnat_port"],
        vec!["nft", "flush", "chain", "ip", "natmap", "prerouting"],
        ["iptables", "-w", "10"]
            .into_iter()
            .chain(delete_accept.split(' '))
            .collect(),
        vec!["nft", "delete", "table", "ip", "natmap"],
    ];
    for args in sabotage {
        let before = repairs();
        topo.router.run_ok(&args);
        let took = wait_for(&format!("repair after {args:?}"), || {
            repairs() > before
                && natmap_installed(&topo.router, false) == good
                && iptables_appended_rules(&topo.router, false, "filter", "DOCKER-USER")
                    .first()
                    .is_some_and(|l| l.contains("natmap-nftables"))
        });
        eprintln!("repair after {args:?}: {took:?}");
        let table = topo
            .router
            .run_ok(&["nft", "list", "chain", "ip", "natmap", "prerouting"]);
        assert!(table.contains("@dnat_port"), "{table}");
        expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    }
    d.assert_clean_log_except(&["changed from outside"]);
}

#[test]
fn dry_run_changes_nothing_and_shows_the_exact_transaction() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25"));
    let rules_before = natmap_installed(&topo.router, false);
    let state_before = state_files(&d.state_path());
    let add = [
        "--dry-run",
        "hairpin",
        "--ext-ip",
        "192.0.2.1",
        "--int-ip",
        "198.51.100.3",
        "--ports",
        "80,443",
    ];
    let plan = d.cli_json(&add);
    assert_eq!(plan["ok"], true, "{plan}");
    let transactions = plan["data"]["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 1, "{plan}");
    assert_eq!(
        natmap_installed(&topo.router, false),
        rules_before,
        "a dry run changes no rule"
    );
    assert_eq!(state_files(&d.state_path()), state_before, "nor the state");
    assert!(
        in_netns(&topo.router, || std::net::TcpListener::bind("192.0.2.1:80")
            .is_ok()),
        "nor reserves ports"
    );

    // The shown transaction is exactly what the real change does.
    let path = d.dir().join("plan.rules");
    std::fs::write(&path, transactions[0]["restore"].as_str().unwrap()).unwrap();
    // Load the shown transaction by hand, undo it by hand, then the real
    // change must leave exactly what the shown one did.
    let (load, undo, teardown_mark): (&[&str], String, &str) = if testing_nftables() {
        // An `nft -f` batch of element changes: every add a delete.
        let shown = transactions[0]["restore"].as_str().unwrap();
        assert!(shown.contains("add element ip natmap "), "{shown}");
        let undo = shown
            .lines()
            .map(|l| format!("{}\n", l.replacen("add element ", "delete element ", 1)))
            .collect();
        (&["nft", "-f"], undo, "delete table ip natmap")
    } else {
        // The same transaction with every -A turned into -D, and the
        // shards it declared (created: 443 is the first port of tcp block
        // 1) deleted after their lines instead of declared (which flushes).
        let undo = iptables_undo(transactions[0]["restore"].as_str().unwrap());
        assert!(undo.contains("-X NATMAP-T1\n"), "{undo}");
        (&["iptables-restore", "--noflush"], undo, "-X NATMAP")
    };
    let run_file = |file: &std::path::Path| {
        let mut argv: Vec<&str> = load.to_vec();
        argv.push(file.to_str().unwrap());
        topo.router.run_ok(&argv);
    };
    // The daemon is held (SIGSTOP) meanwhile: these are outside changes
    // to natmap's rules, which it would repair (at once on nftables, from
    // events) before the undo.
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(d.pid().expect("running") as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    run_file(&path);
    let by_hand = natmap_installed(&topo.router, false);
    assert_ne!(
        by_hand, rules_before,
        "the shown transaction changes the rules"
    );
    std::fs::write(&path, undo).unwrap();
    run_file(&path);
    assert_eq!(natmap_installed(&topo.router, false), rules_before);
    kill(pid, Signal::SIGCONT).unwrap();
    let real = d.cli_json(&add[1..]);
    assert_eq!(real["data"]["result"], "added", "{real}");
    assert_eq!(natmap_installed(&topo.router, false), by_hand);

    // Errors are the real errors; read-only commands have no dry run.
    let (status, busy) = d.cli_json_output(&[
        "--dry-run",
        "dnat",
        "--ext-ip",
        "192.0.2.1",
        "--int-ip",
        "198.51.100.4",
        "--ports",
        "25",
    ]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(busy["error"]["code"], "port_in_use");
    // A read-only command changes nothing anyway: it runs as usual.
    assert_eq!(d.cli(&["--dry-run", "ls"]).status.code(), Some(0));
    let clear = d.cli_json(&["--dry-run", "clear"]);
    assert!(
        clear["data"]["transactions"][0]["restore"]
            .as_str()
            .unwrap()
            .contains(teardown_mark),
        "{clear}"
    );
    assert_eq!(
        d.cli_json(&["ls"])["data"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    d.assert_clean_log();
}

#[test]
fn status_reports_health_and_ls_v_shows_counters() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25"));
    let (status, report) = d.cli_json_output(&["status"]);
    assert_eq!(status.code(), Some(0), "{report}");
    let s = &report["data"];
    // The iptables flavor, or how the nftables backend talks to the kernel.
    let backend = if testing_nftables() { "netlink" } else { "nft" };
    assert_eq!(s["backend"], backend);
    assert_eq!(s["ipv6_nat"], true);
    assert_eq!(s["ipv4_forwarding"], true);
    assert_eq!(s["rules"]["dnat"]["active"], 1);
    assert_eq!(s["problems"].as_array().unwrap().len(), 0, "{report}");

    for _ in 0..3 {
        expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    }
    let ls = d.cli_json(&["ls", "--counters"]);
    let c = &ls["data"]["rules"][0]["counters"];
    assert_eq!(c["connections"], 3, "{ls}");
    assert!(
        c["packets"].as_u64().unwrap() >= 12,
        "both directions of 3 connections: {ls}"
    );
    assert!(c["bytes"].as_u64().unwrap() > 0);
    let table = d.cli_ok(&["ls", "-v"]);
    assert!(
        table.contains("CONNS") && table.contains("BYTES"),
        "{table}"
    );

    // Something that needs attention: forwarding off → exit code 4 and a reason.
    topo.router.sysctl_set("net.ipv4.ip_forward", "0");
    let (status, report) = d.cli_json_output(&["doctor"]);
    assert_eq!(status.code(), Some(4), "{report}");
    assert!(
        report["data"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("ip_forward"),
        "{report}"
    );
    // A process also using the port on another address is a conflict.
    let other = in_netns(&topo.router, || {
        std::net::TcpListener::bind("[2001:db8:1::1]:25").unwrap()
    });
    let report = d.cli_json(&["status"]);
    let conflicts = report["data"]["conflicts"].as_array().unwrap();
    assert!(
        conflicts
            .iter()
            .any(|c| c.as_str().unwrap().contains("25/tcp")),
        "{report}"
    );
    drop(other);
    d.assert_clean_log();
}

#[test]
fn policy_route_sends_replies_through_the_given_gateway() {
    if !privileged() {
        return;
    }
    // natmap runs on the service node (server); server2 is a second gateway
    // on the same segment that forwards to the router.
    let topo = Topology::new();
    iptables(&topo.router, false, &["-A", "FORWARD", "-j", "ACCEPT"]);
    topo.server2.sysctl_set("net.ipv4.ip_forward", "1");
    topo.server2
        .sysctl_set("net.ipv4.conf.all.send_redirects", "0");
    topo.server2
        .sysctl_set("net.ipv4.conf.eth0.send_redirects", "0");
    iptables(
        &topo.server2,
        false,
        &["-A", "FORWARD", "-s", "198.51.100.2", "-j", "ACCEPT"],
    );
    let via_server2 = || -> u64 {
        let out = topo.server2.run_ok(&[
            "iptables", "-w", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n",
        ]);
        out.lines()
            .find(|l| l.contains("198.51.100.2"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    let _svc = TcpEcho::start(&topo.server, v4(SERVER_V4, 7000));
    let mut d = Daemon::start(&topo.server);
    expect_tcp(&topo.client, v4(SERVER_V4, 7000), CLIENT_V4, 7000);
    assert_eq!(
        via_server2(),
        0,
        "without the policy route replies go straight to the router"
    );

    let out = d.cli_json(&[
        "policy-route",
        "--src-ip",
        "198.51.100.2",
        "--via",
        "198.51.100.3",
        "--table",
        "100",
    ]);
    assert_eq!(out["data"]["result"], "added", "{out}");
    let rules = topo.server.run_ok(&["ip", "rule", "show"]);
    assert_eq!(
        rules.matches("from 198.51.100.2 lookup 100").count(),
        1,
        "{rules}"
    );
    let table = topo.server.run_ok(&["ip", "route", "show", "table", "100"]);
    assert!(table.contains("default via 198.51.100.3"), "{table}");
    expect_tcp(&topo.client, v4(SERVER_V4, 7000), CLIENT_V4, 7000);
    assert!(via_server2() > 0, "replies now leave through server2");

    // Someone deletes the rule: natmap puts it back.
    topo.server
        .run_ok(&["ip", "rule", "del", "from", "198.51.100.2", "lookup", "100"]);
    let start = std::time::Instant::now();
    while !topo
        .server
        .run_ok(&["ip", "rule", "show"])
        .contains("lookup 100")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(6),
            "policy route not repaired"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Restored after a crash without duplicates, and after a "reboot".
    d.kill9();
    d.respawn();
    let rules = topo.server.run_ok(&["ip", "rule", "show"]);
    assert_eq!(
        rules.matches("from 198.51.100.2 lookup 100").count(),
        1,
        "{rules}"
    );
    d.stop();
    assert!(
        !topo
            .server
            .run_ok(&["ip", "rule", "show"])
            .contains("lookup 100"),
        "shutdown removes it"
    );
    d.respawn();
    assert!(
        topo.server
            .run_ok(&["ip", "rule", "show"])
            .contains("lookup 100"),
        "start restores it"
    );

    // Reserved tables are refused; delete removes rule and route.
    let (status, bad) = d.cli_json_output(&[
        "policy-route",
        "--src-ip",
        "198.51.100.2",
        "--via",
        "198.51.100.3",
        "--table",
        "254",
    ]);
    assert_eq!(status.code(), Some(2));
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved"),
        "{bad}"
    );
    d.cli_ok(&[
        "policy-route",
        "--src-ip",
        "198.51.100.2",
        "--via",
        "198.51.100.3",
        "--table",
        "100",
        "--delete",
    ]);
    assert!(!topo
        .server
        .run_ok(&["ip", "rule", "show"])
        .contains("lookup 100"));
    assert!(topo
        .server
        .run_ok(&["ip", "route", "show", "table", "100"])
        .trim()
        .is_empty());
    let before = via_server2();
    expect_tcp(&topo.client, v4(SERVER_V4, 7000), CLIENT_V4, 7000);
    assert_eq!(
        via_server2(),
        before,
        "replies go straight to the router again"
    );
    d.assert_clean_log_except(&["policy route from 198.51.100.2 table 100 was removed; repaired"]);
}

#[test]
fn save_export_fragment_restores_cleanly_and_holds_only_natmap() {
    if !privileged()
        || !iptables_only(
            "the fragment is iptables-restore input (nftables' nft -f fragment: \
             tests/nftables.rs save_export_is_an_nft_fragment_…)",
        )
    {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    dnat_mail(&d);
    d.cli_ok(&hairpin_args("192.0.2.1", "198.51.100.3", "80"));
    d.cli_ok(&dnat_args("2001:db8:1::1", "2001:db8:2::2", "25"));
    let file = d.dir().join("etc/natmap.rules");
    let out = d.cli(&["save", "--export", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text4 = std::fs::read_to_string(&file).unwrap();
    let text6 = std::fs::read_to_string(d.dir().join("etc/natmap6.rules")).unwrap();
    assert!(text6.contains("2001:db8:2::2"), "{text6}");
    for line in text4.lines().chain(text6.lines()) {
        let ours = line.starts_with('*')
            || line == "COMMIT"
            || line.contains("NATMAP")
            || line.starts_with("# natmap");
        assert!(ours, "not natmap's: {line}");
    }
    let expected = natmap_installed(&topo.router, false);

    // A host that restores rules at boot without the daemon (FORWARD DROP).
    let fresh = Topology::new();
    let _smtp = TcpEcho::start(&fresh.server, v4(SERVER_V4, 25));
    // Through the netfilter-persistent plugin, which adds the hooks the
    // fragment names (tests/cli.rs tests the plugin itself).
    let plugin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/netfilter-persistent/25-natmap");
    fresh.router.run_ok(&[
        "env".to_owned(),
        format!("NATMAP_RULES_DIR={}", d.dir().join("etc").display()),
        format!("NATMAP_SOCKET={}", d.dir().join("none.sock").display()),
        format!("LAB_OPS={LAB_OPS_BIN}"),
        "sh".to_owned(),
        plugin.display().to_string(),
        "start".to_owned(),
    ]);
    assert_eq!(natmap_installed(&fresh.router, false), expected);
    expect_tcp(&fresh.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    // When the daemon starts there, its own hooks replace the boot hook.
    let d2 = Daemon::start(&fresh.router);
    d2.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25,465"));
    let forward = iptables_rules(&fresh.router, false, "filter", "FORWARD");
    assert!(
        !forward.iter().any(|l| l == "-A FORWARD -j NATMAP"),
        "{forward:?}"
    );
    d2.assert_clean_log();
    drop(d2);

    // A host with Docker's chains: they are left exactly as they were.
    let docker = Topology::new();
    for args in [
        &["-N", "DOCKER-USER"][..],
        &["-A", "DOCKER-USER", "-s", "203.0.113.7", "-j", "DROP"],
        &["-A", "DOCKER-USER", "-j", "RETURN"],
        &["-I", "FORWARD", "1", "-j", "DOCKER-USER"],
        &["-t", "nat", "-N", "DOCKER"],
        &[
            "-t",
            "nat",
            "-A",
            "DOCKER",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            "172.17.0.2:80",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            "DOCKER",
        ],
    ] {
        iptables(&docker.router, false, args);
    }
    let docker_lines = |t: &Topology| -> Vec<String> {
        iptables_save(&t.router, false)
            .lines()
            .filter(|l| l.contains("DOCKER") && !l.contains("NATMAP"))
            .map(str::to_owned)
            .collect()
    };
    let before = docker_lines(&docker);
    docker
        .router
        .run_ok(&["iptables-restore", "--noflush", file.to_str().unwrap()]);
    assert_eq!(docker_lines(&docker), before);
    assert_eq!(natmap_installed(&docker.router, false), expected);
    d.assert_clean_log();
}

#[test]
fn daemon_refuses_to_start_when_dockers_rules_are_in_the_other_backend() {
    if !privileged()
        || !iptables_only(
            "the iptables flavor check guards natmap's iptables chains; the nftables backend \
             writes only its DOCKER-USER accept, with the iptables on PATH (operator guide)",
        )
    {
        return;
    }
    if find_on_path("iptables-legacy").is_none() {
        panic!("iptables-legacy is missing (Debian's iptables package ships it)");
    }
    let topo = Topology::new();
    // Docker's chains in iptables-legacy while `iptables` is iptables-nft.
    topo.router
        .run_ok(&["iptables-legacy", "-w", "-t", "nat", "-N", "DOCKER"]);
    let dir = StateDir::new();
    let out = topo
        .router
        .exec(&daemon_argv(&dir.socket_path(), &dir.state_path()));
    assert!(!out.status.success(), "the daemon must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("iptables-legacy") && stderr.contains("update-alternatives"),
        "{stderr}"
    );
    assert!(
        natmap_installed(&topo.router, false).is_empty(),
        "nothing installed"
    );
    topo.router
        .run_ok(&["iptables-legacy", "-w", "-t", "nat", "-X", "DOCKER"]);
}

#[test]
fn one_daemon_per_namespace_and_ls_filters_whole_values() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    let other = StateDir::new();
    let out = topo
        .router
        .exec(&daemon_argv(&other.socket_path(), &other.state_path()));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another natmap daemon already runs in this network namespace"),
        "{stderr}"
    );

    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25"));
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.20", "26"));
    d.cli_ok(&[
        "policy-route",
        "--src-ip",
        "198.51.100.2",
        "--via",
        "198.51.100.1",
        "--table",
        "100",
    ]);
    let ids = |filter: &str| -> Vec<u64> {
        d.cli_json(&["ls", filter])["data"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids("198.51.100.2"), [1, 3], "whole addresses only");
    assert_eq!(ids("198.51.100.20"), [2]);
    assert_eq!(ids("2"), [2], "an id");
    assert_eq!(ids("policy-route"), [3]);
    assert_eq!(ids("dnat"), [1, 2]);
    d.assert_clean_log();
}

/// `state.json` and its journal, byte for byte (`None` for a missing one).
fn state_files(path: &std::path::Path) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let journal = path.with_file_name(format!(
        "{}.journal",
        path.file_name().unwrap().to_string_lossy()
    ));
    (std::fs::read(path).ok(), std::fs::read(journal).ok())
}

/// What undoes an `iptables-restore --noflush` transaction natmap showed:
/// every `-A` a `-D`, and the chains it declared deleted (`-X`) after
/// their lines instead of declared.
fn iptables_undo(shown: &str) -> String {
    let mut undo = String::new();
    let mut created = Vec::new();
    for line in shown.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            created.push(decl.split_whitespace().next().unwrap().to_owned());
        } else if line == "COMMIT" {
            for chain in created.drain(..) {
                undo.push_str(&format!("-X {chain}\n"));
            }
            undo.push_str("COMMIT\n");
        } else {
            undo.push_str(&format!("{}\n", line.replacen("-A ", "-D ", 1)));
        }
    }
    undo
}
