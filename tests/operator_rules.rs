//! Rule semantics operators meet first (issue 14): the mail-server script
//! (`dnat`, then `hairpin` of the same ports), `snat --forward` on a host
//! whose FORWARD policy is DROP, one `snat` per source and interface, an
//! `snat` waiting for its interface, and a loopback `docker add` target.
//! Real namespaces (client ─ router ─ server), the real daemon, real traffic.

pub mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The mail server's ports, as the original docs' script forwards them.
const MAIL_PORTS: &str = "25,465";

fn mail(d: &Daemon, kind: &str, int_ip: &str, ports: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        kind,
        "--ext-ip",
        "192.0.2.1",
        "--int-ip",
        int_ip,
        "--ports",
        ports,
    ];
    args.extend_from_slice(extra);
    d.cli_json(&args)
}

/// The error message of a JSON answer, checked to read as one sentence
/// (no runs of spaces from a broken string continuation).
#[track_caller]
fn error_message(v: &serde_json::Value) -> String {
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("  "), "{message:?}");
    message.to_owned()
}

/// The first note of a change answer, checked like [`error_message`].
#[track_caller]
fn first_note(v: &serde_json::Value) -> String {
    let note = v["data"]["notes"][0].as_str().unwrap_or_default();
    assert!(!note.contains("  "), "{note:?}");
    note.to_owned()
}

/// `dnat` the mail ports, then `hairpin` the same ports to the same host:
/// the second step upgrades rule #1 in place (same id, now a hairpin), so
/// internal clients reach the server through the external address while
/// outside clients keep their own. Re-running the script changes nothing,
/// another target is still a conflict, and `hairpin --delete` removes it.
#[test]
fn mail_script_dnat_then_hairpin_upgrades_the_rule_in_place() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let _smtps = TcpEcho::start(&topo.server, v4(SERVER_V4, 465));
    let d = Daemon::start(&topo.router);
    let added = mail(&d, "dnat", "198.51.100.2", MAIL_PORTS, &[]);
    assert_eq!(added["data"]["rule"]["id"], 1, "{added}");
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);
    // A plain dnat: the server answers its neighbour directly, which drops it.
    expect_no_tcp(&topo.server2, v4(ROUTER_EXT_V4, 25));

    let out = d.cli(&hairpin_args("192.0.2.1", "198.51.100.2", MAIL_PORTS));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(
        stdout.starts_with("upgraded dnat rule #1 to hairpin"),
        "{stdout}"
    );
    let ls = d.cli_json(&["ls"]);
    let rules = ls["data"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{ls}");
    assert_eq!(
        (&rules[0]["id"], &rules[0]["kind"]),
        (&1.into(), &"hairpin".into())
    );
    expect_tcp(&topo.server2, v4(ROUTER_EXT_V4, 25), ROUTER_INT_V4, 25);
    expect_tcp(&topo.server2, v4(ROUTER_EXT_V4, 465), ROUTER_INT_V4, 465);
    expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 465), CLIENT_V4, 465);
    let installed = natmap_installed(&topo.router, false);
    if testing_nftables() {
        // Rule #1's elements and nothing else: each port translated, its
        // forwarded traffic counted, and masqueraded for internal clients.
        let mut want = Vec::new();
        for port in [25, 465] {
            want.extend([
                format!("dnat_port 192.0.2.1 . tcp . {port} : 198.51.100.2"),
                format!("fwd_port 198.51.100.2 . tcp . {port}"),
                format!("masq_dnat 198.51.100.0/24 . 198.51.100.2 . tcp . {port}"),
            ]);
        }
        want.sort();
        assert_eq!(installed, want);
    } else {
        assert!(
            installed.iter().all(|l| l.contains("natmap:hairpin:1")),
            "{installed:?}"
        );
        assert_eq!(installed.len(), 5, "{installed:?}");
    }

    // Running the script again: both steps are already done.
    let again = mail(&d, "dnat", "198.51.100.2", MAIL_PORTS, &[]);
    assert_eq!(again["data"]["result"], "already_present", "{again}");
    assert!(first_note(&again).contains("hairpin rule #1"), "{again}");
    let again = mail(&d, "hairpin", "198.51.100.2", MAIL_PORTS, &[]);
    assert_eq!(again["data"]["result"], "already_present", "{again}");
    assert_eq!(natmap_installed(&topo.router, false), installed);
    d.assert_clean_log();
}

/// What does not upgrade: another target (a port conflict, as before), some
/// of the ports only, a dnat bound to an interface. Each is refused with the
/// rule named, and nothing changes. `dnat --delete` of an upgraded rule says
/// how to delete it; `hairpin --delete` does.
#[test]
fn hairpin_upgrade_refusals_and_delete() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _smtp = TcpEcho::start(&topo.server, v4(SERVER_V4, 25));
    let d = Daemon::start(&topo.router);
    mail(&d, "dnat", "198.51.100.2", MAIL_PORTS, &[]);
    let ext_if = ["--ext-if", topo.router_ext_if()];
    mail(&d, "dnat", "198.51.100.2", "587", &ext_if);
    let before = natmap_installed(&topo.router, false);

    let other = mail(&d, "hairpin", "198.51.100.3", MAIL_PORTS, &[]);
    assert_eq!(other["error"]["code"], "port_in_use", "{other}");
    assert!(error_message(&other).contains("rule #1"), "{other}");
    let some = mail(&d, "hairpin", "198.51.100.2", "25", &[]);
    assert_eq!(some["error"]["code"], "port_in_use", "{some}");
    assert!(
        error_message(&some).contains("exactly its ports (--ports 25,465)"),
        "{some}"
    );
    let bound = mail(&d, "hairpin", "198.51.100.2", "587", &[]);
    assert!(
        error_message(&bound).contains("only from interface"),
        "{bound}"
    );
    assert_eq!(natmap_installed(&topo.router, false), before);
    expect_no_tcp(&topo.server2, v4(ROUTER_EXT_V4, 25));

    mail(&d, "hairpin", "198.51.100.2", MAIL_PORTS, &[]);
    let (status, wrong) =
        d.cli_json_output(&dnat_args("192.0.2.1", "198.51.100.2", MAIL_PORTS).delete());
    assert_eq!(status.code(), Some(1));
    assert_eq!(wrong["error"]["code"], "not_found", "{wrong}");
    assert!(
        error_message(&wrong).contains("hairpin --delete"),
        "{wrong}"
    );
    let deleted = mail(&d, "hairpin", "198.51.100.2", MAIL_PORTS, &["--delete"]);
    assert_eq!(deleted["data"]["result"], "deleted", "{deleted}");
    assert_eq!(deleted["data"]["rule"]["id"], 1, "{deleted}");
    expect_no_tcp(&topo.client, v4(ROUTER_EXT_V4, 25));
    assert!(port_is_held(&topo.router, "tcp", v4(ROUTER_EXT_V4, 587)));
    assert!(!port_is_held(&topo.router, "tcp", v4(ROUTER_EXT_V4, 25)));
    d.assert_clean_log();
}

fn snat(d: &Daemon, ext_if: &str, ext_ip: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "snat",
        "--int-ip",
        "198.51.100.2",
        "--ext-if",
        ext_if,
        "--ext-ip",
        ext_ip,
    ];
    args.extend_from_slice(extra);
    d.cli_json(&args)
}

fn status_problems(d: &Daemon) -> Vec<String> {
    let status = d.cli_json(&["status"]);
    status["data"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// The router's FORWARD policy is DROP: a plain `snat` rewrites packets that
/// are then dropped, and says so at add time and in `status`. `--forward`
/// lets the source's traffic out and its replies back, and nothing else.
#[test]
fn snat_forward_passes_what_a_drop_policy_stops() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _outside = TcpEcho::start(&topo.client, v4(CLIENT_V4, 7000));
    let d = Daemon::start(&topo.router);
    let ext = topo.router_ext_if();

    let out = d.cli(&snat_args("198.51.100.2", ext, "192.0.2.1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: the FORWARD policy is DROP") && stderr.contains("--forward"),
        "{stderr}"
    );
    assert!(!stderr.contains("  "), "{stderr}");
    expect_no_tcp(&topo.server, v4(CLIENT_V4, 7000));
    let problems = status_problems(&d);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("snat rule #1: the FORWARD policy is DROP")),
        "{problems:?}"
    );

    // The same rule with --forward changed is a conflict naming the first;
    // --delete names the rule without the flag.
    let toggled = snat(&d, ext, "192.0.2.1", &["--forward"]);
    assert_eq!(toggled["error"]["code"], "rule_conflict", "{toggled}");
    assert!(error_message(&toggled).contains("rule #1"), "{toggled}");
    snat(&d, ext, "192.0.2.1", &["--delete"]);

    let added = snat(&d, ext, "192.0.2.1", &["--forward"]);
    assert_eq!(added["data"]["rule"]["forward"], true, "{added}");
    assert!(added["data"].get("notes").is_none(), "{added}");
    let id = added["data"]["rule"]["id"].as_u64().unwrap();
    expect_tcp(&topo.server, v4(CLIENT_V4, 7000), ROUTER_EXT_V4, 7000);
    // Only the given source is let through.
    expect_no_tcp(&topo.server2, v4(CLIENT_V4, 7000));
    let tag = format!("-m comment --comment \"natmap:snat:{id}\"");
    let want = if testing_nftables() {
        vec![
            format!("snat_fwd {ext} . 198.51.100.2"),
            format!("snat_out {ext} . 198.51.100.2 : 192.0.2.1"),
        ]
    } else {
        vec![
            format!("nat -A NATMAP-POSTROUTING -s 198.51.100.2/32 -o {ext} {tag} -j SNAT --to-source 192.0.2.1"),
            format!("filter -A NATMAP -s 198.51.100.2/32 -o {ext} {tag} -j ACCEPT"),
            format!("filter -A NATMAP -d 198.51.100.2/32 -i {ext} -m conntrack --ctstate RELATED,ESTABLISHED {tag} -j ACCEPT"),
        ]
    };
    assert_eq!(natmap_installed(&topo.router, false), want);
    assert!(status_problems(&d).is_empty());

    snat(&d, ext, "192.0.2.1", &["--delete"]);
    assert!(natmap_installed(&topo.router, false).is_empty());
    expect_no_tcp(&topo.server, v4(CLIENT_V4, 7000));
    d.assert_clean_log();
}

/// A second `snat` of the same source out of the same interface to another
/// address could never match: refused, naming the first rule, which stays
/// the only one and keeps working.
#[test]
fn a_second_snat_of_the_same_traffic_is_a_conflict() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _outside = TcpEcho::start(&topo.client, v4(CLIENT_V4, 7000));
    let d = Daemon::start(&topo.router);
    let ext = topo.router_ext_if();
    topo.router
        .ip(&["addr", "add", "192.0.2.9/24", "dev", ext, "nodad"]);
    snat(&d, ext, "192.0.2.1", &["--forward"]);
    let before = natmap_installed(&topo.router, false);

    let (status, second) =
        d.cli_json_output(&snat_args("198.51.100.2", ext, "192.0.2.9").arg("--forward"));
    assert_eq!(status.code(), Some(1));
    assert_eq!(second["error"]["code"], "rule_conflict", "{second}");
    let message = error_message(&second);
    assert!(
        message.contains("snat rule #1") && message.contains("192.0.2.9"),
        "{message}"
    );
    // The same pair in an `apply` document is refused as well.
    let snat_doc = |ext_ip: &str| {
        serde_json::json!({"kind": "snat", "source": "198.51.100.2/32", "ext_if": ext,
                           "ext_ip": ext_ip, "forward": true})
    };
    let applied = d.call(serde_json::json!({"cmd": "apply", "document": {
        "schema_version": 1, "rules": [snat_doc("192.0.2.1"), snat_doc("192.0.2.9")]}}));
    assert_eq!(applied["error"]["code"], "rule_conflict", "{applied}");
    assert!(error_message(&applied).contains("rules[1]"), "{applied}");
    let ls = d.cli_json(&["ls"]);
    assert_eq!(ls["data"]["rules"].as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(natmap_installed(&topo.router, false), before);
    expect_tcp(&topo.server, v4(CLIENT_V4, 7000), ROUTER_EXT_V4, 7000);
    d.assert_clean_log();
}

/// An `snat` (and an interface-bound `dnat`) naming an interface that does
/// not exist is installed and shown `waiting for interface`; when the
/// interface appears, the rule matches and shows `active`.
#[test]
fn snat_to_a_missing_interface_waits_for_it() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    let added = snat(&d, "ext1", "203.0.113.1", &["--forward"]);
    assert_eq!(added["data"]["result"], "added", "{added}");
    assert_eq!(added["data"]["rule"]["status"], "waiting_for_interface");
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "8080").ext_if("ext1"));
    let ls = d.cli_ok(&["ls"]);
    assert_eq!(ls.matches("waiting for interface").count(), 2, "{ls}");
    let status = d.cli_json(&["status"]);
    assert_eq!(
        status["data"]["rules"]["snat"]["waiting_for_interface"], 1,
        "{status}"
    );
    assert!(
        status["data"]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("ext1 does not exist")),
        "{status}"
    );
    assert!(natmap_installed(&topo.router, false).iter().any(|l| {
        if testing_nftables() {
            l.starts_with("snat_out ext1 . ")
        } else {
            l.contains("-o ext1") && l.contains("-j SNAT")
        }
    }));

    // The interface appears: a second link to the client's side.
    topo.router.ip(&[
        "link",
        "add",
        "ext1",
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &topo.client.name,
    ]);
    topo.router
        .ip(&["addr", "add", "203.0.113.1/24", "dev", "ext1", "nodad"]);
    topo.client
        .ip(&["addr", "add", "203.0.113.2/24", "dev", "eth1", "nodad"]);
    topo.router.ip(&["link", "set", "ext1", "up"]);
    topo.client.ip(&["link", "set", "eth1", "up"]);
    wait_link_up(&topo.router, "ext1", Duration::from_secs(5));
    wait_link_up(&topo.client, "eth1", Duration::from_secs(5));
    let _outside = TcpEcho::start(&topo.client, v4(Ipv4Addr::new(203, 0, 113, 2), 7001));
    expect_tcp(
        &topo.server,
        v4(Ipv4Addr::new(203, 0, 113, 2), 7001),
        Ipv4Addr::new(203, 0, 113, 1),
        7001,
    );
    let ls = d.cli_json(&["ls"]);
    for rule in ls["data"]["rules"].as_array().unwrap() {
        assert_eq!(rule["status"], "active", "{ls}");
    }
    d.assert_clean_log();
}

/// The seed's `docker add 8080:127.0.0.1:80 --name my-local-service`: a
/// loopback target cannot be reached by kernel DNAT from other hosts, so it
/// is refused with a message about the target (not about HOST_IP), by the
/// CLI and by the daemon, and nothing is installed.
#[test]
fn docker_add_of_a_loopback_target_is_refused_naming_the_target() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    let out = d.cli(&[
        "docker",
        "add",
        "8080:127.0.0.1:80",
        "--name",
        "my-local-service",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("mapping target address") && stderr.contains("not loopback"),
        "{stderr}"
    );
    assert!(!stderr.contains("HOST_IP"), "{stderr}");

    // The daemon refuses the same request sent straight to its socket.
    let answer = d.call(serde_json::json!({
        "cmd": "docker_add", "name": "my-local-service", "mapping": "8080:127.0.0.1:80"
    }));
    assert_eq!(answer["ok"], false, "{answer}");
    let message = error_message(&answer);
    assert!(
        message.contains("mapping target address") && message.contains("not loopback"),
        "{message}"
    );
    assert!(d.cli_ok(&["ls"]).contains("no rules"));
    assert!(natmap_installed(&ns, false).is_empty());
    assert!(!port_is_held(&ns, "tcp", v4(Ipv4Addr::UNSPECIFIED, 8080)));
    d.assert_clean_log();
}

/// A `dnat --allow-nonlocal` (a VIP) keeps its guard when a hairpin without
/// the flag upgrades it: the rule still matches only while the address is
/// this host's.
#[test]
fn an_upgraded_vip_dnat_keeps_its_guard() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(&topo.server, v4(SERVER_V4, 80));
    let d = Daemon::start(&topo.router);
    mail(&d, "dnat", "198.51.100.2", "80", &["--allow-nonlocal"]);
    let upgraded = mail(&d, "hairpin", "198.51.100.2", "80", &[]);
    assert_eq!(upgraded["data"]["result"], "upgraded", "{upgraded}");
    assert_eq!(
        upgraded["data"]["rule"]["allow_nonlocal"], true,
        "{upgraded}"
    );
    if testing_nftables() {
        // The mapping is an element of the NAT maps, and every rule that
        // translates through them is guarded by `fib daddr type local`.
        assert!(
            natmap_installed(&topo.router, false)
                .contains(&"dnat_port 192.0.2.1 . tcp . 80 : 198.51.100.2".to_owned()),
            "{:?}",
            natmap_installed(&topo.router, false)
        );
        let table = topo
            .router
            .run_ok(&["nft", "list", "table", "ip", "natmap"]);
        let dnats: Vec<&str> = table.lines().filter(|l| l.contains("dnat to")).collect();
        assert!(!dnats.is_empty(), "{table}");
        assert!(
            dnats.iter().all(|l| l.contains("fib daddr type local")),
            "{table}"
        );
    } else {
        let dnat_lines: Vec<String> = natmap_installed(&topo.router, false)
            .into_iter()
            .filter(|l| l.contains("-j DNAT"))
            .collect();
        assert_eq!(dnat_lines.len(), 2, "{dnat_lines:?}");
        assert!(
            dnat_lines
                .iter()
                .all(|l| l.contains("-m addrtype --dst-type LOCAL")),
            "{dnat_lines:?}"
        );
    }
    expect_tcp(&topo.server2, v4(ROUTER_EXT_V4, 80), ROUTER_INT_V4, 80);
    d.assert_clean_log();
}
