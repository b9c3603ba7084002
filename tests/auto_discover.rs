//! Auto-discover (issue 7): label-driven mappings from the local Docker
//! engine and from remote engines, stale engines, source-IP preservation
//! through a gateway, the config file and its reload.
//!
//! Like tests/docker.rs these run against the host's real Docker engine:
//! most run the daemon in the ROOT network namespace (where Docker lives)
//! with a temporary state file, socket and `--config`; the source
//! preservation test runs a gateway daemon and a service-node daemon in
//! test namespaces and reaches Docker through a TCP proxy listening inside
//! the gateway's namespace. A "remote engine" is the same Docker engine
//! exposed on a loopback TCP endpoint by an in-test proxy
//! ([`TcpDockerProxy`]), configured with a `host_ip` of a test namespace.
//!
//! They change the host, so they run one at a time ([`serial`]) and every
//! container, namespace, link, proxy, daemon and rule is removed by a guard,
//! also when a test fails. Run with
//! `cargo test --test auto_discover -- --test-threads=1`. Each prints
//! `TIMING <test>: <s>` and its measured delays to stderr.

pub mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::auto_discover::*;
use common::docker::*;
use common::*;
use serde_json::Value;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Reconnects back off at most 10 s (contract), plus time to resync.
const RECONNECT_LIMIT: Duration = Duration::from_secs(12);
/// How long an engine that went away may take to be shown stale.
const STALE_LIMIT: Duration = Duration::from_secs(15);

// ───────────────────────────── helpers ─────────────────────────────

/// The daemon in the root namespace with `--config cfg`.
fn root_daemon(cfg: &ConfigFile) -> RootDaemon {
    RootDaemon::start_with(&["--config", &cfg.arg()])
}

fn is_active(r: &Value) -> bool {
    r["status"] == "active"
}

/// Checks an active auto mapping of the LOCAL engine: a Docker-kind rule to
/// the container's own address and port, no masquerade.
#[track_caller]
fn check_local_rule(rule: &Value, web: &Container, host_port: u16, cport: u16, proto: &str) {
    let ctx = format!("auto mapping {rule}");
    assert_eq!(rule["kind"], "docker", "{ctx}");
    assert_eq!(rule["auto"]["engine"], "local", "{ctx}");
    assert_eq!(rule["auto"]["masquerade"], false, "{ctx}");
    assert_eq!(rule["name"], web.name.as_str(), "{ctx}");
    assert_eq!(rule["container_id"], web.id(), "{ctx}");
    assert_eq!(rule["host_port"], host_port, "{ctx}");
    assert_eq!(rule["container_port"], cport, "{ctx}");
    assert_eq!(rule["proto"], proto, "{ctx}");
    assert_eq!(rule["target_v4"]["ip"], web.ip4().to_string(), "{ctx}");
    assert_eq!(rule["status"], "active", "{ctx}");
}

/// Checks an active auto mapping of a REMOTE engine: DNAT to `host_ip` and
/// the port the container publishes, in `ls` and in nat NATMAP of `ns`
/// (None: root namespace); with or without its MASQUERADE line.
#[track_caller]
fn check_remote_rule(
    ns: Option<&Netns>,
    rule: &Value,
    engine: &str,
    web: &Container,
    host_ip: Ipv4Addr,
    published: u16,
    masquerade: bool,
) {
    let ctx = format!("auto mapping {rule}");
    assert_eq!(rule["kind"], "docker", "{ctx}");
    assert_eq!(rule["auto"]["engine"], engine, "{ctx}");
    assert_eq!(rule["auto"]["masquerade"], masquerade, "{ctx}");
    assert_eq!(rule["name"], web.name.as_str(), "{ctx}");
    assert_eq!(rule["target_v4"]["ip"], host_ip.to_string(), "{ctx}");
    assert_eq!(rule["status"], "active", "{ctx}");
    let id = rule_id(rule);
    let dnat = dnat_lines_of(ns, id);
    assert_eq!(
        dnat.len(),
        1,
        "{ctx}: nat NATMAP: {:#?}",
        chain_in(ns, "nat", "NATMAP")
    );
    assert!(
        dnat[0].contains(&format!("--to-destination {host_ip}:{published}")),
        "{ctx}: the DNAT goes elsewhere than {host_ip}:{published} (the port the container \
         publishes): {dnat:?}"
    );
    let masq = lines_of(ns, "nat", "NATMAP-POSTROUTING", id);
    if masquerade {
        assert!(
            masq.iter()
                .any(|l| l.contains("MASQUERADE") || l.contains("SNAT")),
            "{ctx}: masquerade on, but nat NATMAP-POSTROUTING has no line of the mapping: {:#?}",
            chain_in(ns, "nat", "NATMAP-POSTROUTING")
        );
    } else {
        assert!(
            masq.is_empty(),
            "{ctx}: preserve_src_ip, but nat NATMAP-POSTROUTING rewrites its source: {masq:#?}"
        );
    }
}

/// Waits until the host port is free again (TCP, or UDP for `udp`).
#[track_caller]
fn wait_port_free(d: &Daemon, port: u16, udp: bool) {
    wait_until(
        d,
        &format!("port {port} to be released"),
        Duration::from_secs(2),
        || {
            let free = if udp {
                udp_port_free(port)
            } else {
                tcp_port_free(port)
            };
            if free {
                Ok(())
            } else {
                Err("still held".into())
            }
        },
    );
}

/// The `status --json` strings of `problems` and `warnings`.
#[track_caller]
fn status_notes(d: &Daemon) -> Vec<String> {
    let data = status_data(d);
    let mut notes = Vec::new();
    for key in ["problems", "warnings"] {
        if let Some(a) = data[key].as_array() {
            notes.extend(a.iter().map(|v| match v.as_str() {
                Some(s) => s.to_string(),
                None => v.to_string(),
            }));
        }
    }
    notes
}

/// `reload` must succeed; returns `data`.
#[track_caller]
fn reload_ok(d: &Daemon) -> Value {
    let data = ok_data(d, &["reload"]);
    assert!(
        data["engines"].is_array(),
        "reload: no engines list: {data}"
    );
    assert!(
        data["auto_discover"].is_boolean(),
        "reload: no auto_discover flag: {data}"
    );
    data
}

fn engines_of(data: &Value) -> Vec<String> {
    data["engines"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e.as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

// ───────────────────────────── 0. fixtures, without natmap ─────────────────────────────

/// The fixtures themselves against plain Docker, no natmap: the TCP proxy
/// relays the Docker API (root namespace and inside a test namespace, where
/// the root namespace's loopback does not see it), cuts live streams when
/// stopped, listens again when restarted, hangs when asked; the service
/// node answers from its address and sees the root side's; a labeled,
/// publishing web container carries its label and published port.
#[test]
fn fixtures_work_without_natmap() {
    let (_serial, _timer) = docker_setup!();
    let docker_via = |ns: Option<&Netns>, endpoint: &str, timeout: Duration| {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "docker"]);
                c
            }
            None => Command::new("docker"),
        };
        cmd.args(["-H", endpoint, "version", "-f", "{{.Server.APIVersion}}"]);
        run_quiet(&mut cmd, timeout)
    };

    // Root-namespace proxy.
    let mut proxy = TcpDockerProxy::new();
    let ep = proxy.endpoint();
    let v = docker_via(None, &ep, Duration::from_secs(10)).unwrap();
    assert!(!v.status.success(), "nothing listens before start");
    proxy.start();
    let v = docker_via(None, &ep, Duration::from_secs(20)).unwrap();
    check_output("docker version through the TCP proxy", &v);
    report(&format!(
        "  Docker API {} via {ep}",
        String::from_utf8_lossy(&v.stdout).trim()
    ));
    {
        use std::io::{Read, Write};
        let mut events = std::net::TcpStream::connect(proxy.addr()).unwrap();
        events
            .write_all(b"GET /events HTTP/1.1\r\nHost: docker\r\n\r\n")
            .unwrap();
        events
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = events.read(&mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        proxy.stop();
        let t = Instant::now();
        let n = events.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "events stream not cut by stop()");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    let v = docker_via(None, &ep, Duration::from_secs(10)).unwrap();
    assert!(!v.status.success(), "proxy stopped but answering");
    proxy.start();
    check_output(
        "docker version after restart",
        &docker_via(None, &ep, Duration::from_secs(20)).unwrap(),
    );
    proxy.set_hang(true);
    assert!(
        docker_via(None, &ep, Duration::from_secs(3)).is_err(),
        "a hanging proxy answered"
    );
    proxy.set_hang(false);
    proxy.stop(); // cuts the held connection too
    proxy.start();
    check_output(
        "docker version after hang",
        &docker_via(None, &ep, Duration::from_secs(20)).unwrap(),
    );
    drop(proxy);

    // A proxy inside a namespace: reachable there, not from the root namespace.
    let ns = Netns::new("gw");
    let mut inner = TcpDockerProxy::new_in_netns(&ns);
    inner.start();
    let v = docker_via(Some(&ns), &inner.endpoint(), Duration::from_secs(20)).unwrap();
    check_output("docker version through the in-netns proxy", &v);
    assert!(inner.accepted() >= 1);
    let before = inner.accepted();
    let _ = std::net::TcpStream::connect_timeout(&inner.addr(), Duration::from_millis(300));
    assert_eq!(
        inner.accepted(),
        before,
        "the in-netns proxy accepted a connection from the root namespace"
    );
    inner.stop();
    assert!(
        !docker_via(Some(&ns), &inner.endpoint(), Duration::from_secs(10))
            .unwrap()
            .status
            .success()
    );

    // The service node.
    let node = ServiceNode::new();
    let echo = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, 0));
    expect_echo(
        &Client::Host,
        sa(NODE_V4, echo.port()),
        NODE_LINK_V4,
        echo.port(),
    );

    // A labeled web container publishing a port.
    let (p, h) = (free_port(), free_port());
    let web = labeled_web(
        "fixture",
        "fixture-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[format!("{p}:80")],
    );
    web.wait_ready();
    assert_eq!(
        docker_ok(&[
            "inspect",
            "-f",
            &format!("{{{{index .Config.Labels \"{DEFAULT_LABEL}\"}}}}"),
            &web.name
        ]),
        format!("{h}:80")
    );
    assert_eq!(published_port(&web.name, 80), Some(p));
    expect_web(&Client::Host, sa(web.ip4(), 80), "fixture-web");
    assert!(natmap_lines_in_root().is_empty());
}

// ───────────────────────────── 1. local engine ─────────────────────────────

/// A container labeled before the daemon starts is mapped at start. A
/// container started with `natmap.ports=H:80,U:5353/udp,HOST_IP:H2:80` gets
/// three mappings within 2 s of `docker run` (measured): reachable from an
/// outside machine (which keeps its address: no masquerade), from the host
/// via 127.0.0.1 and its own address, over UDP, and on the given host
/// address only for the third. `docker rm -f` removes them within 2 s: gone
/// from `ls`, no rule left, ports free, traffic stops.
#[test]
fn local_label_maps_within_two_seconds_and_docker_rm_removes_it() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let (out, host) = (outside.client(), Client::Host);
    let cfg = ConfigFile::new(&auto_config(true, false, &[]));

    let h0 = free_port();
    let early = labeled_web(
        "early",
        "early-web",
        DEFAULT_LABEL,
        &format!("{h0}:80"),
        &[],
    );
    early.wait_ready();
    let d = root_daemon(&cfg);
    let (r0, took) = wait_auto(&d, h0, "tcp", Duration::from_secs(5), "active", is_active);
    report(&format!(
        "  container labeled before the daemon started: mapped {} ms after the daemon's socket accepted",
        took.as_millis()
    ));
    check_local_rule(&r0, &early, h0, 80, "tcp");
    expect_web(&out, sa(HOST_V4, h0), "early-web");

    let (h, u, h2) = (free_port(), free_port(), free_port());
    let label = format!("{h}:80,{u}:{UDP_ECHO_PORT}/udp,{HOST_V4}:{h2}:80");
    let t = Instant::now();
    let web = labeled_web("auto", "auto-web", DEFAULT_LABEL, &label, &[]);
    let run_took = t.elapsed();
    let started = Instant::now();
    let (rule, listed) = wait_auto(&d, h, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    poll_web_until(&out, sa(HOST_V4, h), "auto-web", None, APPEAR_LIMIT * 3);
    let traffic = started.elapsed();
    report(&format!(
        "  AUTO-DISCOVER DELAY (local): listed {} ms, traffic from outside flows {} ms after \
         `docker run -d` returned (the command itself took {} ms)",
        listed.as_millis(),
        traffic.as_millis(),
        run_took.as_millis()
    ));
    assert!(listed <= APPEAR_LIMIT, "mapping listed after {listed:?}");
    assert!(traffic <= APPEAR_LIMIT, "traffic flows after {traffic:?}");
    web.wait_ready();
    check_local_rule(&rule, &web, h, 80, "tcp");
    let id = rule_id(&rule);

    let (urule, _) = wait_auto(&d, u, "udp", APPEAR_LIMIT, "active", is_active);
    check_local_rule(&urule, &web, u, UDP_ECHO_PORT, "udp");
    let (hrule, _) = wait_auto(&d, h2, "tcp", APPEAR_LIMIT, "active", is_active);
    check_local_rule(&hrule, &web, h2, 80, "tcp");
    assert_eq!(hrule["host_ip"], HOST_V4.to_string(), "{hrule}");
    assert!(rule["host_ip"].is_null(), "{rule}");
    let ids = [id, rule_id(&urule), rule_id(&hrule)];
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "ids {ids:?}"
    );

    // Traffic: like `docker add`.
    assert_eq!(
        remote_addr_seen(&out, sa(HOST_V4, h)),
        IpAddr::V4(OUTSIDE_V4),
        "the container must see the outside client's address (no masquerade for local mappings)"
    );
    expect_web(&host, sa(LOOPBACK, h), "auto-web");
    expect_web(&host, sa(HOST_V4, h), "auto-web");
    expect_udp_echo(&out, sa(HOST_V4, u), "auto-web");
    expect_udp_echo(&host, sa(LOOPBACK, u), "auto-web");
    expect_web(&out, sa(HOST_V4, h2), "auto-web");
    let dnat = dnat_lines_of(None, id);
    assert_eq!(dnat.len(), 1, "{dnat:?}");
    assert!(
        dnat[0].contains(&format!("--to-destination {}:80", web.ip4())),
        "{dnat:?}"
    );
    assert!(!tcp_port_free(h), "port {h} not reserved");
    assert!(!udp_port_free(u), "udp port {u} not reserved");
    assert!(!tcp_port_free(h2), "port {h2} not reserved");
    let table = d.cli_ok(&["ls"]);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains(&format!("*:{h} ")))
        .collect();
    assert!(
        rows.len() == 1
            && rows[0].contains(&web.name)
            && rows[0].contains(&format!("{}:80", web.ip4()))
            && rows[0].contains("auto")
            && rows[0].contains("local"),
        "`ls` table does not show the auto mapping with its source and engine:\n{table}"
    );

    // docker rm -f removes every mapping of the container.
    let t = Instant::now();
    web.remove();
    let rm_took = t.elapsed();
    for (port, proto) in [(h, "tcp"), (u, "udp"), (h2, "tcp")] {
        wait_auto_gone(&d, port, proto, APPEAR_LIMIT + rm_took);
    }
    report(&format!(
        "  docker rm -f -> all three mappings gone {} ms after the command returned",
        (t.elapsed() - rm_took).as_millis()
    ));
    for id in ids {
        let left = all_lines_of(None, id);
        assert!(left.is_empty(), "rules of removed mapping {id}: {left:#?}");
    }
    wait_port_free(&d, h, false);
    wait_port_free(&d, u, true);
    wait_port_free(&d, h2, false);
    expect_no_web(&out, sa(HOST_V4, h));
    expect_no_udp_echo(&out, sa(HOST_V4, u));
    // The other container's mapping is untouched.
    let r0b = auto_rule_on(&d, h0, "tcp").expect("the early container's mapping");
    assert_eq!(rule_id(&r0b), rule_id(&r0));
    expect_web(&out, sa(HOST_V4, h0), "early-web");
    d.assert_clean_log();
}

/// An auto mapping follows its container: `docker restart` (traffic within
/// 2 s, same mapping id), `docker stop` (status down, no DNAT, port kept),
/// and a start at a NEW address (another container took the old one):
/// within 2 s traffic reaches the container, never the squatter.
#[test]
fn local_auto_mapping_follows_restart_stop_and_a_new_address() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let out = outside.client();
    let cfg = ConfigFile::new(&auto_config(true, false, &[EngineCfg::local()]));
    let mut d = root_daemon(&cfg);
    let h = free_port();
    let web = labeled_web(
        "follow",
        "follow-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[],
    );
    let (rule, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    web.wait_ready();
    check_local_rule(&rule, &web, h, 80, "tcp");
    let id = rule_id(&rule);
    let old_ip = web.ip4();
    poll_web_until(&out, sa(HOST_V4, h), &web.marker, None, APPEAR_LIMIT);

    // Restart.
    docker_ok(&["restart", "-t", "1", &web.name]);
    let took = poll_web_until(&out, sa(HOST_V4, h), &web.marker, None, APPEAR_LIMIT * 3);
    report(&format!(
        "  restart -> traffic {} ms after `docker restart` returned",
        took.as_millis()
    ));
    assert!(took <= APPEAR_LIMIT, "after restart: {took:?}");
    let (rule, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    assert_eq!(
        rule_id(&rule),
        id,
        "the mapping id changed across a restart: {rule}"
    );
    assert_eq!(rule["target_v4"]["ip"], web.ip4().to_string(), "{rule}");

    // Stop: down, no DNAT, and the port is free for others while it is
    // stopped (`docker start` of a `-p` owner of that port must work).
    web.stop();
    let (rule, took) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "down", |r| {
        r["status"] == "down"
    });
    report(&format!("  stop -> down after {} ms", took.as_millis()));
    assert_eq!(rule_id(&rule), id, "{rule}");
    assert!(
        rule["target_v4"].is_null(),
        "a down mapping has no target: {rule}"
    );
    assert!(
        dnat_lines_of(None, id).is_empty(),
        "DNAT kept for a stopped container"
    );
    wait_port_free(&d, h, false);
    expect_no_web(&out, sa(HOST_V4, h));

    // Start at a new address.
    let squatter = Container::web("squatter", "squatter", &[]);
    assert_eq!(
        squatter.ip4(),
        old_ip,
        "the squatter did not get the stopped container's address; test precondition"
    );
    docker_ok(&["start", &web.name]);
    let took = poll_web_until(
        &out,
        sa(HOST_V4, h),
        &web.marker,
        Some(&squatter.marker),
        Duration::from_secs(10),
    );
    let new_ip = web.ip4();
    report(&format!(
        "  start at a new address ({old_ip} -> {new_ip}) -> traffic {} ms after `docker start` returned",
        took.as_millis()
    ));
    assert_ne!(new_ip, old_ip);
    assert!(took <= APPEAR_LIMIT, "re-point took {took:?}");
    let (rule, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "re-pointed", |r| {
        r["target_v4"]["ip"] == new_ip.to_string()
    });
    assert_eq!(rule_id(&rule), id, "{rule}");
    check_local_rule(&rule, &web, h, 80, "tcp");
    let dnat = dnat_lines_of(None, id);
    assert_eq!(dnat.len(), 1, "{dnat:?}");
    assert!(
        dnat[0].contains(&format!("--to-destination {new_ip}:80")),
        "{dnat:?}"
    );
    expect_web(&Client::Host, sa(LOOPBACK, h), &web.marker);

    // A daemon crash and restart: the mapping is back, once.
    d.kill9();
    d.respawn();
    let (rule, took) = wait_auto(
        &d,
        h,
        "tcp",
        APPEAR_LIMIT,
        "active after restart",
        is_active,
    );
    report(&format!(
        "  daemon SIGKILL + restart -> mapping active {} ms after the socket accepted",
        took.as_millis()
    ));
    check_local_rule(&rule, &web, h, 80, "tcp");
    let dnat: Vec<String> = chain_in(None, "nat", "NATMAP")
        .into_iter()
        .filter(|l| l.contains(&format!("--dport {h} ")))
        .collect();
    assert_eq!(dnat.len(), 1, "after restart: {dnat:#?}");
    poll_web_until(&out, sa(HOST_V4, h), &web.marker, None, APPEAR_LIMIT);
    d.assert_clean_log();
}

/// A manual `docker add` of host port H made first wins over a container
/// labeled with the same H: the auto mapping is skipped with a WARN naming
/// the conflict, `status` lists the conflict, traffic keeps reaching the
/// manual target, and the auto container's other (free) port is mapped.
#[test]
fn a_manual_mapping_wins_over_a_label_on_the_same_port() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let out = outside.client();
    let cfg = ConfigFile::new(&auto_config(true, false, &[]));
    let mut d = root_daemon(&cfg);
    let [h, free, hs] = [(); 3].map(|_| free_port());
    let manual = Container::web("manual", "manual-web", &[hs]);
    let data = ok_data(&d, &["docker", "add", &manual.name, &format!("{h}:80")]);
    assert_eq!(data["result"], "added", "{data}");
    let manual_id = rule_id(&data["rule"]);
    expect_web(&out, sa(HOST_V4, h), "manual-web");
    // A static forward is a manual mapping too.
    let data = ok_data(
        &d,
        &[
            "dnat",
            "--ext-ip",
            &HOST_V4.to_string(),
            "--int-ip",
            &manual.ip4().to_string(),
            "--ports",
            &hs.to_string(),
        ],
    );
    let static_id = rule_id(&data["rule"]);
    expect_web(&out, sa(HOST_V4, hs), "manual-web");

    let mark = log_mark(&d);
    let contender = labeled_web(
        "contender",
        "contender-web",
        DEFAULT_LABEL,
        &format!("{h}:80,{free}:80,{hs}:80"),
        &[],
    );
    // The free port is mapped: the container was processed.
    let (other, _) = wait_auto(&d, free, "tcp", APPEAR_LIMIT, "active", is_active);
    contender.wait_ready();
    check_local_rule(&other, &contender, free, 80, "tcp");
    let line = wait_warn(&d, mark, &["conflict", &h.to_string()], APPEAR_LIMIT);
    report(&format!("  conflict log line: {line}"));
    let line = wait_warn(&d, mark, &["conflict", &hs.to_string()], APPEAR_LIMIT);
    report(&format!("  conflict with the static rule: {line}"));
    assert!(
        auto_rule_on(&d, hs, "tcp").is_none(),
        "an auto mapping on the static rule's port {hs}"
    );
    assert!(
        ls_rules(&d)
            .iter()
            .any(|r| rule_id(r) == static_id && is_active(r)),
        "the static rule is not active any more: {:#?}",
        ls_rules(&d)
    );

    let on_h = rules_on_port(&d, h, "tcp");
    assert_eq!(on_h.len(), 1, "rules on port {h}: {on_h:#?}");
    assert_eq!(rule_id(&on_h[0]), manual_id, "{:#?}", on_h);
    assert!(
        on_h[0]["auto"].is_null(),
        "the manual mapping became an auto one: {}",
        on_h[0]
    );
    assert_eq!(on_h[0]["target_v4"]["ip"], manual.ip4().to_string());
    assert_eq!(on_h[0]["status"], "active");
    for _ in 0..3 {
        expect_web(&out, sa(HOST_V4, h), "manual-web");
    }
    let nat = chain_in(None, "nat", "NATMAP");
    assert!(
        !nat.iter().any(|l| l.contains(&format!("--dport {h} "))
            && !l.contains(&format!("\"natmap:docker:{manual_id}\""))),
        "another rule on port {h}: {nat:#?}"
    );
    let status = status_data(&d);
    let conflicts: Vec<String> = status["conflicts"]
        .as_array()
        .unwrap_or_else(|| panic!("status without conflicts: {status}"))
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| c.to_string())
        })
        .collect();
    report(&format!("  status conflicts: {conflicts:?}"));
    for port in [h, hs] {
        assert!(
            conflicts.iter().any(|c| c.contains(&port.to_string())),
            "status does not list the conflict on port {port}: {status}"
        );
    }
    for _ in 0..3 {
        expect_web(&out, sa(HOST_V4, hs), "manual-web");
    }

    // A restart of the contender does not flip the port either.
    docker_ok(&["restart", "-t", "1", &contender.name]);
    contender.wait_ready();
    wait_auto(&d, free, "tcp", APPEAR_LIMIT, "active again", |r| {
        is_active(r) && r["target_v4"]["ip"] == contender.ip4().to_string()
    });
    for _ in 0..3 {
        expect_web(&out, sa(HOST_V4, h), "manual-web");
    }
    let on_h = rules_on_port(&d, h, "tcp");
    assert_eq!(on_h.len(), 1, "{on_h:#?}");
    assert_eq!(rule_id(&on_h[0]), manual_id);

    // Not part of the contract: a manual add on a port an auto mapping holds.
    let (st, v) = d.cli_json_output(&["docker", "add", &manual.name, &format!("{free}:80")]);
    report(&format!(
        "  (observation) `docker add` on port {free} held by an auto mapping: {st}: {v}"
    ));
    if v["ok"] == true {
        ok_data(&d, &["docker", "rm", &manual.name, &free.to_string()]);
    }

    // Not part of the contract: what happens when the manual one goes.
    ok_data(&d, &["docker", "rm", &manual.name, &h.to_string()]);
    let t = Instant::now();
    let mut taken_over = None;
    while t.elapsed() < Duration::from_secs(4) {
        if let Some(r) = auto_rule_on(&d, h, "tcp") {
            taken_over = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    report(&format!(
        "  (observation) after the manual mapping was removed, the labeled container {} port {h}{}",
        if taken_over.is_some() {
            "took over"
        } else {
            "did NOT take over"
        },
        taken_over
            .map(|r| format!(" after {} ms: {r}", t.elapsed().as_millis()))
            .unwrap_or_default()
    ));
    d.allow_log("conflict");
    d.assert_clean_log();
}

/// Invalid labels (`notaport`, a port out of range, an unknown protocol, a
/// zero port) each get a WARN/ERROR line mentioning the label and the
/// container, and no rule; a valid container after them is still mapped.
#[test]
fn an_invalid_label_is_logged_and_gets_no_rule() {
    let (_serial, _timer) = docker_setup!();
    let cfg = ConfigFile::new(&auto_config(true, false, &[]));
    let mut d = root_daemon(&cfg);
    let p = free_port();
    let mark = log_mark(&d);
    let bad_values = [
        "notaport".to_string(),
        "70000:80".to_string(),
        format!("{p}:80/sctp"),
        format!("{p}:0"),
        format!("{p}:80:90:100"),
    ];
    let bad: Vec<(String, Container)> = bad_values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                v.clone(),
                labeled_web(
                    &format!("bad{i}"),
                    &format!("bad{i}"),
                    DEFAULT_LABEL,
                    v,
                    &[],
                ),
            )
        })
        .collect();
    let h = free_port();
    let good = labeled_web("good", "good-web", DEFAULT_LABEL, &format!("{h}:80"), &[]);
    wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    good.wait_ready();

    for (value, c) in &bad {
        let found = wait_until(&d, "log line", APPEAR_LIMIT, || {
            log_since(&d, mark)
                .into_iter()
                .find(|l| {
                    is_warn_or_error(l)
                        && l.to_lowercase().contains("label")
                        && (l.contains(&c.name) || l.contains(&c.id()[..12]))
                })
                .ok_or_else(|| "none".to_string())
        });
        report(&format!("  label {value:?}: {}", found.0));
    }
    let autos = auto_rules(&d);
    assert_eq!(
        autos.len(),
        1,
        "only the valid container may have an auto mapping: {autos:#?}"
    );
    assert_eq!(autos[0]["host_port"], h);
    assert!(tcp_port_free(p), "port {p} of an invalid label is held");
    expect_web(&Client::Host, sa(LOOPBACK, h), "good-web");
    d.allow_log("label");
    d.assert_clean_log();
}

// ───────────────────────────── 2. remote engine ─────────────────────────────

/// A remote engine (the host's engine on a loopback TCP endpoint, `host_ip`
/// = the service node): a container run with `-p P:80` and label `H:80`
/// gets a mapping to `host_ip:P` (masqueraded: preserve_src_ip is off),
/// reachable from outside and from the host's loopback. The engine goes
/// away: its mappings turn `stale`, rules and traffic stay. Meanwhile a
/// container is removed and another started. The engine comes back: stale
/// mappings are active again (same id), the removed one is gone and its
/// port free, the new one is mapped.
#[test]
fn remote_engine_maps_to_the_published_port_goes_stale_and_is_refreshed() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let (out, host) = (outside.client(), Client::Host);
    let node = ServiceNode::new();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let cfg = ConfigFile::new(&auto_config(
        true,
        false,
        &[EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4)],
    ));
    let mut d = root_daemon(&cfg);
    let [p1, h1, p2, h2, p3, h3] = [(); 6].map(|_| free_port());
    let _echo1 = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p1));
    let _echo2 = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p2));
    let _echo3 = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p3));

    let t = Instant::now();
    let c1 = labeled_web(
        "r1",
        "r1-web",
        DEFAULT_LABEL,
        &format!("{h1}:80"),
        &[format!("{p1}:80")],
    );
    let started = Instant::now();
    let run_took = t.elapsed();
    let (r1, listed) = wait_auto(&d, h1, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    wait_until(
        &d,
        "traffic through the remote mapping",
        APPEAR_LIMIT * 3,
        || echo_line(&out, sa(HOST_V4, h1), Duration::from_millis(500)),
    );
    let traffic = started.elapsed();
    report(&format!(
        "  AUTO-DISCOVER DELAY (remote over TCP): listed {} ms, traffic {} ms after `docker run -d` \
         returned ({} ms for the command)",
        listed.as_millis(),
        traffic.as_millis(),
        run_took.as_millis()
    ));
    assert!(listed <= APPEAR_LIMIT, "listed after {listed:?}");
    assert!(traffic <= APPEAR_LIMIT, "traffic after {traffic:?}");
    check_remote_rule(None, &r1, "node2", &c1, NODE_V4, p1, true);
    let id1 = rule_id(&r1);
    let table = d.cli_ok(&["ls"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains(&format!("{NODE_V4}:{p1}")) && l.contains("node2")),
        "`ls` does not show the target {NODE_V4}:{p1} and the engine:\n{table}"
    );
    let c2 = labeled_web(
        "r2",
        "r2-web",
        DEFAULT_LABEL,
        &format!("{h2}:80"),
        &[format!("{p2}:80")],
    );
    let (r2, _) = wait_auto(&d, h2, "tcp", APPEAR_LIMIT, "active", is_active);
    check_remote_rule(None, &r2, "node2", &c2, NODE_V4, p2, true);
    let id2 = rule_id(&r2);

    // Masqueraded (preserve_src_ip = false): the node sees the gateway side.
    expect_echo(&out, sa(HOST_V4, h1), NODE_LINK_V4, p1);
    expect_echo(&host, sa(LOOPBACK, h1), NODE_LINK_V4, p1);
    expect_echo(&out, sa(HOST_V4, h2), NODE_LINK_V4, p2);
    assert!(
        !tcp_port_free(h1) && !tcp_port_free(h2),
        "ports not reserved"
    );

    // The engine goes away.
    let before1 = all_lines_of(None, id1);
    let before2 = all_lines_of(None, id2);
    proxy.stop();
    let (r1s, took) = wait_auto(&d, h1, "tcp", STALE_LIMIT, "stale", |r| {
        r["status"] == "stale"
    });
    report(&format!(
        "  engine unreachable -> stale after {} ms",
        took.as_millis()
    ));
    assert_eq!(rule_id(&r1s), id1);
    wait_auto(&d, h2, "tcp", APPEAR_LIMIT, "stale", |r| {
        r["status"] == "stale"
    });
    assert_eq!(
        all_lines_of(None, id1),
        before1,
        "rules of a stale mapping changed"
    );
    assert_eq!(
        all_lines_of(None, id2),
        before2,
        "rules of a stale mapping changed"
    );
    expect_echo(&out, sa(HOST_V4, h1), NODE_LINK_V4, p1);
    expect_echo(&out, sa(HOST_V4, h2), NODE_LINK_V4, p2);
    assert!(
        !tcp_port_free(h1) && !tcp_port_free(h2),
        "stale ports released"
    );
    let table = d.cli_ok(&["ls"]);
    assert!(
        table.contains("stale"),
        "`ls` table does not say stale:\n{table}"
    );

    // Meanwhile on the node: one container goes, another comes.
    c2.remove();
    let c3 = labeled_web(
        "r3",
        "r3-web",
        DEFAULT_LABEL,
        &format!("{h3}:80"),
        &[format!("{p3}:80")],
    );
    std::thread::sleep(Duration::from_millis(500));
    let r2s = auto_rule_on(&d, h2, "tcp")
        .expect("a stale engine's mapping disappeared while the engine was unreachable");
    assert_eq!(r2s["status"], "stale", "{r2s}");
    assert!(auto_rule_on(&d, h3, "tcp").is_none());

    // The daemon crashes and restarts while the engine is still away: the
    // last known mappings are kept (stale), rules and traffic too.
    d.kill9();
    d.respawn();
    for (h, id) in [(h1, id1), (h2, id2)] {
        let (r, _) = wait_auto(
            &d,
            h,
            "tcp",
            STALE_LIMIT,
            "stale after a daemon restart",
            |r| r["status"] == "stale",
        );
        assert_eq!(rule_id(&r), id, "{r}");
    }
    assert_eq!(
        all_lines_of(None, id1),
        before1,
        "rules changed over the restart"
    );
    expect_echo(&out, sa(HOST_V4, h1), NODE_LINK_V4, p1);
    assert!(auto_rule_on(&d, h3, "tcp").is_none());

    // The engine is back: refreshed.
    proxy.start();
    let back = Instant::now();
    let (r1b, took) = wait_auto(&d, h1, "tcp", RECONNECT_LIMIT, "active again", is_active);
    report(&format!(
        "  engine back -> active again after {} ms",
        took.as_millis()
    ));
    assert_eq!(rule_id(&r1b), id1, "the mapping id changed: {r1b}");
    check_remote_rule(None, &r1b, "node2", &c1, NODE_V4, p1, true);
    let (r3, _) = wait_auto(
        &d,
        h3,
        "tcp",
        RECONNECT_LIMIT.saturating_sub(back.elapsed()) + APPEAR_LIMIT,
        "active",
        is_active,
    );
    check_remote_rule(None, &r3, "node2", &c3, NODE_V4, p3, true);
    wait_auto_gone(&d, h2, "tcp", APPEAR_LIMIT);
    report(&format!(
        "  engine back -> refreshed (new container mapped, removed one gone) after {} ms",
        back.elapsed().as_millis()
    ));
    assert!(
        all_lines_of(None, id2).is_empty(),
        "rules of the removed container kept"
    );
    wait_port_free(&d, h2, false);
    expect_echo(&out, sa(HOST_V4, h3), NODE_LINK_V4, p3);
    expect_echo(&out, sa(HOST_V4, h1), NODE_LINK_V4, p1);
    expect_no_tcp_root(&out, sa(HOST_V4, h2));
    d.allow_log("node2");
    d.allow_log("engine");
    d.assert_clean_log();
}

/// Reconnects to an engine that keeps failing back off, capped at 10 s:
/// for 30 s the proxy accepts and at once closes every connection; the
/// daemon's attempts (bursts of connections) come further apart, never more
/// than 10 s, and are not a flood; the mapping stays stale with its rules.
/// Once the engine answers again it is active within 10 s.
#[test]
fn a_failing_engine_is_retried_with_backoff_capped_at_ten_seconds() {
    let (_serial, _timer) = docker_setup!();
    let node = ServiceNode::new();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let cfg = ConfigFile::new(&auto_config(
        true,
        false,
        &[EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4)],
    ));
    let mut d = root_daemon(&cfg);
    let [p, h] = [(); 2].map(|_| free_port());
    let _echo = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p));
    let c = labeled_web(
        "retry",
        "retry-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[format!("{p}:80")],
    );
    let (r, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    let id = rule_id(&r);
    let lines = all_lines_of(None, id);

    // From now on every connection is closed unanswered.
    proxy.set_close(true);
    proxy.stop();
    let since = Instant::now();
    proxy.start();
    wait_auto(&d, h, "tcp", STALE_LIMIT, "stale", |r| {
        r["status"] == "stale"
    });
    let window = Duration::from_secs(30);
    std::thread::sleep(window.saturating_sub(since.elapsed()));
    let times: Vec<Instant> = proxy
        .accept_times()
        .into_iter()
        .filter(|t| *t >= since)
        .collect();
    // Attempts: bursts of connections less than 500 ms apart.
    let mut attempts: Vec<Instant> = Vec::new();
    let mut last: Option<Instant> = None;
    for t in &times {
        if last.is_none_or(|l| t.duration_since(l) > Duration::from_millis(500)) {
            attempts.push(*t);
        }
        last = Some(*t);
    }
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    report(&format!(
        "  {} connections in {} attempts over {window:?}; gaps between attempts: {:?}",
        times.len(),
        attempts.len(),
        gaps.iter()
            .map(|g| format!("{:.1}s", g.as_secs_f64()))
            .collect::<Vec<_>>()
    ));
    assert!(
        attempts.len() >= 3,
        "the daemon stopped retrying: {} attempts in {window:?}",
        attempts.len()
    );
    assert!(
        attempts.len() <= 20 && times.len() <= 100,
        "no back-off: {} connections in {} attempts within {window:?}",
        times.len(),
        attempts.len()
    );
    let (first, last_gap) = (gaps[0], *gaps.last().unwrap());
    assert!(
        last_gap >= Duration::from_secs(4) && last_gap > first,
        "reconnects do not back off: gaps {gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(11_500)),
        "a reconnect gap exceeds 10 s: {gaps:?}"
    );
    let r = auto_rule_on(&d, h, "tcp").expect("mapping kept");
    assert_eq!(r["status"], "stale", "{r}");
    assert_eq!(
        all_lines_of(None, id),
        lines,
        "rules of the stale mapping changed"
    );
    expect_echo(&Client::Host, sa(LOOPBACK, h), NODE_LINK_V4, p);

    // The engine answers again.
    proxy.set_close(false);
    let (r, took) = wait_auto(&d, h, "tcp", RECONNECT_LIMIT, "active again", is_active);
    report(&format!(
        "  engine answering again -> active after {} ms",
        took.as_millis()
    ));
    assert!(took <= Duration::from_secs(11), "{took:?}");
    assert_eq!(rule_id(&r), id);
    d.allow_log("node2");
    d.allow_log("engine");
    d.assert_clean_log();
}

/// No echo reply from `client` to `target` within the negative timeout.
#[track_caller]
fn expect_no_tcp_root(client: &Client, target: std::net::SocketAddr) {
    if let Ok(r) = echo_line(client, target, NEGATIVE_TIMEOUT) {
        panic!(
            "expected no answer from {} to {target}, got {r:?}",
            client.describe()
        );
    }
}

/// A remote engine's container that is stopped: its mapping stays, status
/// `down` (no DNAT, port still reserved), like a local one; started again:
/// active with the same id and traffic flows.
#[test]
fn remote_container_stop_marks_down_and_start_restores() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let out = outside.client();
    let node = ServiceNode::new();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let cfg = ConfigFile::new(&auto_config(
        true,
        false,
        &[EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4)],
    ));
    let mut d = root_daemon(&cfg);
    let [p, h] = [(); 2].map(|_| free_port());
    let _echo = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p));
    let c = labeled_web(
        "rstop",
        "rstop-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[format!("{p}:80")],
    );
    let (r, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    let id = rule_id(&r);
    expect_echo(&out, sa(HOST_V4, h), NODE_LINK_V4, p);

    c.stop();
    let (r, took) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "down", |r| {
        r["status"] == "down"
    });
    report(&format!(
        "  remote container stopped -> down after {} ms",
        took.as_millis()
    ));
    assert_eq!(rule_id(&r), id, "{r}");
    assert!(
        dnat_lines_of(None, id).is_empty(),
        "DNAT kept for a stopped container"
    );
    assert!(
        !tcp_port_free(h),
        "port {h} released while the container is stopped"
    );
    expect_no_tcp_root(&out, sa(HOST_V4, h));

    docker_ok(&["start", &c.name]);
    let (r, took) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    report(&format!(
        "  remote container started -> active after {} ms",
        took.as_millis()
    ));
    assert_eq!(
        rule_id(&r),
        id,
        "the mapping id changed over stop/start: {r}"
    );
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    expect_echo(&out, sa(HOST_V4, h), NODE_LINK_V4, p);
    d.allow_log("node2");
    d.assert_clean_log();
}

/// A label port the container does not publish on its node is reported
/// (WARN "not published") and gets no rule, not a guess; the published
/// port of the same label is mapped.
#[test]
fn remote_label_port_not_published_is_reported_not_guessed() {
    let (_serial, _timer) = docker_setup!();
    let node = ServiceNode::new();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let cfg = ConfigFile::new(&auto_config(
        true,
        false,
        &[EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4)],
    ));
    let mut d = root_daemon(&cfg);
    let [p, h, h_unpub, h_none] = [(); 4].map(|_| free_port());
    let _echo = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p));
    let mark = log_mark(&d);
    let c = labeled_web(
        "partial",
        "partial-web",
        DEFAULT_LABEL,
        &format!("{h}:80,{h_unpub}:8080"),
        &[format!("{p}:80")],
    );
    let none = labeled_web(
        "unpub",
        "unpub-web",
        DEFAULT_LABEL,
        &format!("{h_none}:80"),
        &[],
    );
    let (r, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    let line = wait_warn(&d, mark, &["not published", "8080"], APPEAR_LIMIT);
    report(&format!("  {line}"));
    let line = wait_warn(&d, mark, &["not published", &none.name], APPEAR_LIMIT);
    report(&format!("  {line}"));
    assert!(
        auto_rule_on(&d, h_unpub, "tcp").is_none(),
        "a rule for an unpublished port"
    );
    assert!(
        auto_rule_on(&d, h_none, "tcp").is_none(),
        "a rule for an unpublished port"
    );
    assert!(
        tcp_port_free(h_unpub) && tcp_port_free(h_none),
        "unpublished ports reserved"
    );
    let autos = auto_rules(&d);
    assert_eq!(autos.len(), 1, "{autos:#?}");
    expect_echo(&Client::Host, sa(LOOPBACK, h), NODE_LINK_V4, p);
    d.allow_log("not published");
    d.assert_clean_log();
}

/// One failing engine blocks neither the others nor static rules: with the
/// local engine, a remote engine and an engine nobody listens for, local
/// labels are mapped within 2 s; then the remote engine HANGS (accepts,
/// never answers) and still a new local container is mapped within 2 s,
/// `ls`, `dnat`, `status` and `reload` answer promptly.
#[test]
fn a_dead_or_hanging_engine_blocks_neither_others_nor_static_rules() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let out = outside.client();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let cfg = ConfigFile::new(&auto_config(
        true,
        false,
        &[
            EngineCfg::local(),
            EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4),
            EngineCfg::remote("dead", &closed_endpoint(), NODE_V4),
        ],
    ));
    let d = root_daemon(&cfg);
    let [h1, h2, sp] = [(); 3].map(|_| free_port());
    let t = Instant::now();
    let l1 = labeled_web("l1", "l1-web", DEFAULT_LABEL, &format!("{h1}:80"), &[]);
    let (r1, took) = wait_auto(&d, h1, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    report(&format!(
        "  local mapping with a dead engine configured: listed {} ms after docker run returned ({} ms incl.)",
        took.as_millis(),
        t.elapsed().as_millis()
    ));
    assert!(took <= APPEAR_LIMIT, "{took:?}");
    l1.wait_ready();
    check_local_rule(&r1, &l1, h1, 80, "tcp");

    // node2 hangs from now on (its live connections are cut, new ones held).
    proxy.set_hang(true);
    proxy.stop();
    proxy.start();
    std::thread::sleep(Duration::from_millis(300));
    let l2 = labeled_web("l2", "l2-web", DEFAULT_LABEL, &format!("{h2}:80"), &[]);
    let (r2, took) = wait_auto(&d, h2, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    report(&format!(
        "  local mapping while node2 hangs: listed after {} ms",
        took.as_millis()
    ));
    assert!(took <= APPEAR_LIMIT, "{took:?}");
    l2.wait_ready();
    check_local_rule(&r2, &l2, h2, 80, "tcp");
    poll_web_until(&out, sa(HOST_V4, h2), "l2-web", None, APPEAR_LIMIT);

    let timed = |what: &str, args: &[&str]| {
        let t = Instant::now();
        let data = ok_data(&d, args);
        let took = t.elapsed();
        report(&format!(
            "  `{what}` while node2 hangs: {} ms",
            took.as_millis()
        ));
        assert!(took <= Duration::from_secs(2), "`{what}` took {took:?}");
        data
    };
    timed("ls", &["ls"]);
    let data = timed(
        "dnat",
        &[
            "dnat",
            "--ext-ip",
            &HOST_V4.to_string(),
            "--int-ip",
            &l2.ip4().to_string(),
            "--ports",
            &sp.to_string(),
        ],
    );
    assert_eq!(data["result"], "added", "{data}");
    let static_id = rule_id(&data["rule"]);
    let tag = format!("\"natmap:dnat:{static_id}\"");
    assert!(
        chain_in(None, "nat", "NATMAP")
            .iter()
            .any(|l| l.contains(&tag)),
        "the static rule is not installed: {:#?}",
        chain_in(None, "nat", "NATMAP")
    );
    let t = Instant::now();
    let data = status_data(&d);
    report(&format!(
        "  `status` while node2 hangs: {} ms",
        t.elapsed().as_millis()
    ));
    assert!(
        t.elapsed() <= Duration::from_secs(2),
        "`status` took {:?}",
        t.elapsed()
    );
    report(&format!(
        "  status notes: problems={} warnings={}",
        data["problems"], data["warnings"]
    ));
    let data = timed("reload", &["reload"]);
    let mut engines = engines_of(&data);
    engines.sort();
    assert_eq!(engines, ["dead", "local", "node2"], "{data}");
    let [h3] = [(); 1].map(|_| free_port());
    let l3 = labeled_web("l3", "l3-web", DEFAULT_LABEL, &format!("{h3}:80"), &[]);
    let (_, took) = wait_auto(&d, h3, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    report(&format!(
        "  local mapping after a reload while node2 hangs: listed after {} ms",
        took.as_millis()
    ));
    assert!(took <= APPEAR_LIMIT, "{took:?}");
    l3.wait_ready();
    proxy.set_hang(false);
}

/// Reload with an engine removed from the config removes that engine's
/// auto mappings (rules and ports); SIGHUP with it back maps them again.
#[test]
fn reload_removing_an_engine_removes_its_mappings() {
    let (_serial, _timer) = docker_setup!();
    let node = ServiceNode::new();
    let mut proxy = TcpDockerProxy::new();
    proxy.start();
    let with_node2 = auto_config(
        true,
        false,
        &[EngineCfg::remote("node2", &proxy.endpoint(), NODE_V4)],
    );
    let without = auto_config(
        true,
        false,
        &[EngineCfg::remote("other", &closed_endpoint(), NODE_V4)],
    );
    let cfg = ConfigFile::new(&with_node2);
    let d = root_daemon(&cfg);
    let [p, h] = [(); 2].map(|_| free_port());
    let _echo = TcpEcho::start(&node.ns, sa(Ipv4Addr::UNSPECIFIED, p));
    let c = labeled_web(
        "eng",
        "eng-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[format!("{p}:80")],
    );
    let (r, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    let id = rule_id(&r);

    cfg.write(&without);
    let data = reload_ok(&d);
    assert_eq!(engines_of(&data), ["other"], "{data}");
    assert_eq!(data["auto_discover"], true, "{data}");
    let took = wait_auto_gone(&d, h, "tcp", APPEAR_LIMIT);
    report(&format!(
        "  engine removed by reload -> its mapping gone after {} ms",
        took.as_millis()
    ));
    assert!(
        all_lines_of(None, id).is_empty(),
        "rules of the removed engine kept"
    );
    wait_port_free(&d, h, false);
    expect_no_tcp_root(&Client::Host, sa(LOOPBACK, h));

    cfg.write(&with_node2);
    sighup(&d);
    let (r, took) = wait_auto(&d, h, "tcp", APPEAR_LIMIT * 2, "active", is_active);
    report(&format!(
        "  engine back by SIGHUP -> mapped after {} ms",
        took.as_millis()
    ));
    check_remote_rule(None, &r, "node2", &c, NODE_V4, p, true);
    expect_echo(&Client::Host, sa(LOOPBACK, h), NODE_LINK_V4, p);
}

// ───────────────────────────── 3. source preservation ─────────────────────────────

/// client ─ gateway (natmap with auto-discover, preserve_src_ip) ─ service
/// node (natmap with a policy route). The service node's default route
/// leads elsewhere (server2, which does not forward). The remote engine is
/// the host's Docker through a TCP proxy listening inside the gateway's
/// namespace; its `host_ip` is the service node, where a TCP echo server
/// stands in for the published port P.
///
/// preserve_src_ip = true: no MASQUERADE for the mapping, `status` warns;
/// without the node's policy route the replies go astray; with
/// `policy-route --src-ip <node> --via <gateway> --table 100` on the node
/// the echo sees the client's real address and the reply reaches the
/// client. Reload with preserve_src_ip = false: masqueraded, the echo sees
/// the gateway. SIGHUP with it on again: the client's address again.
#[test]
fn preserve_src_ip_end_to_end_through_gateway_and_service_node() {
    let (_serial, _timer) = docker_setup!();
    let topo = Topology::new();
    topo.server.ip(&[
        "-4",
        "route",
        "replace",
        "default",
        "via",
        &SERVER2_V4.to_string(),
    ]);
    let mut proxy = TcpDockerProxy::new_in_netns(&topo.router);
    proxy.start();
    let engines = [EngineCfg::remote("node", &proxy.endpoint(), SERVER_V4)];
    let cfg = ConfigFile::new(&auto_config(true, true, &engines));
    let mut gw = Daemon::start_with_options(
        &topo.router,
        &StateDir::new(),
        DaemonOptions {
            extra_args: vec!["--config".into(), cfg.path().into()],
            ..DaemonOptions::default()
        },
    );
    let [p, h] = [(); 2].map(|_| free_port());
    let _svc = TcpEcho::start(&topo.server, sa(Ipv4Addr::UNSPECIFIED, p));
    let web = labeled_web(
        "svc",
        "svc-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[format!("{p}:80")],
    );
    let (rule, took) = wait_auto(&gw, h, "tcp", APPEAR_LIMIT * 3, "active", is_active);
    report(&format!(
        "  gateway mapping (engine over TCP inside the gateway netns) listed {} ms after docker run",
        took.as_millis()
    ));
    let r = Some(&topo.router);
    check_remote_rule(r, &rule, "node", &web, SERVER_V4, p, false);
    let notes = status_notes(&gw);
    report(&format!("  gateway status notes: {notes:?}"));
    assert!(
        notes.iter().any(|n| n.contains("preserve_src_ip")),
        "status does not mention preserve_src_ip in problems/warnings: {notes:?}"
    );

    // Without the node's policy route the replies leave through server2.
    let target = sa(ROUTER_EXT_V4, h);
    if let Ok(reply) = tcp_probe_opts(&topo.client, None, target, NEGATIVE_TIMEOUT) {
        panic!(
            "the client got {reply:?} before the service node had its policy route: the reply \
             came back through the gateway, so its source address was rewritten"
        );
    }
    // status's check (replies seen in conntrack as ASSURED) notices the
    // unanswered connection.
    let notes_unanswered = status_notes(&gw);
    report(&format!(
        "  gateway status after an unanswered connection: {notes_unanswered:?}"
    ));
    assert_ne!(
        notes_unanswered, notes,
        "status's preserve_src_ip check did not change after a connection without replies"
    );

    // natmap on the service node installs the policy route.
    let node_cfg = ConfigFile::new("[auto_discover]\nenabled = false\n");
    let node_d = Daemon::start_with_options(
        &topo.server,
        &StateDir::new(),
        DaemonOptions {
            extra_args: vec!["--config".into(), node_cfg.path().into()],
            ..DaemonOptions::isolated()
        },
    );
    let data = ok_data(
        &node_d,
        &[
            "policy-route",
            "--src-ip",
            &SERVER_V4.to_string(),
            "--via",
            &ROUTER_INT_V4.to_string(),
            "--table",
            "100",
        ],
    );
    assert_eq!(data["result"], "added", "{data}");
    expect_tcp(&topo.client, target, CLIENT_V4, p);
    expect_tcp(&topo.client, target, CLIENT_V4, p);
    report(
        "  preserve_src_ip = true: the service saw the client's own address, the reply reached it",
    );
    let notes_answered = status_notes(&gw);
    report(&format!(
        "  gateway status after answered connections: {notes_answered:?}"
    ));
    assert_ne!(
        notes_answered, notes_unanswered,
        "status's preserve_src_ip check did not change after connections with replies"
    );

    // preserve_src_ip off, by `reload`.
    cfg.write(&auto_config(true, false, &engines));
    let data = reload_ok(&gw);
    assert_eq!(data["auto_discover"], true, "{data}");
    assert_eq!(engines_of(&data), ["node"], "{data}");
    let (rule, took) = wait_auto(&gw, h, "tcp", APPEAR_LIMIT, "masqueraded", |r| {
        is_active(r) && r["auto"]["masquerade"] == true
    });
    report(&format!(
        "  reload preserve_src_ip=false applied after {} ms",
        took.as_millis()
    ));
    check_remote_rule(r, &rule, "node", &web, SERVER_V4, p, true);
    expect_tcp(&topo.client, target, ROUTER_INT_V4, p);
    let notes = status_notes(&gw);
    assert!(
        !notes.iter().any(|n| n.contains("preserve_src_ip")),
        "status still warns about preserve_src_ip after it was turned off: {notes:?}"
    );

    // On again, by SIGHUP.
    cfg.write(&auto_config(true, true, &engines));
    sighup(&gw);
    let (rule, _) = wait_auto(&gw, h, "tcp", APPEAR_LIMIT, "not masqueraded", |r| {
        is_active(r) && r["auto"]["masquerade"] == false
    });
    check_remote_rule(r, &rule, "node", &web, SERVER_V4, p, false);
    expect_tcp(&topo.client, target, CLIENT_V4, p);
    gw.allow_log("preserve_src_ip");
    gw.assert_clean_log();
    node_d.assert_clean_log();
}

// ───────────────────────────── 4. config file ─────────────────────────────

/// Every invalid key or value stops the daemon at start, quickly and
/// non-zero, with its own message naming the key and the line.
#[test]
fn invalid_config_at_start_names_key_and_line() {
    if !privileged() {
        return;
    }
    let _timer = TestTimer::start();
    let ns = Netns::new("cfg");
    let eng = "[auto_discover]\nenabled = true\n\n[[auto_discover.engines]]\n";
    // (case, file, acceptable line numbers, substrings the output must contain)
    let cases: Vec<(&str, String, Vec<u32>, Vec<&str>)> = vec![
        (
            "unknown key",
            "[auto_discover]\nenabled = true\nenabeld = true\n".into(),
            vec![3],
            vec!["enabeld"],
        ),
        (
            "unknown section",
            "[autodiscover]\nenabled = true\n".into(),
            vec![1],
            vec!["autodiscover"],
        ),
        (
            "enabled not a bool",
            "[auto_discover]\nenabled = \"yes\"\n".into(),
            vec![2],
            vec!["enabled"],
        ),
        (
            "preserve_src_ip not a bool",
            "[auto_discover]\nenabled = true\npreserve_src_ip = 1\n".into(),
            vec![3],
            vec!["preserve_src_ip"],
        ),
        (
            "label not a string",
            "[auto_discover]\nenabled = true\nlabel = 5\n".into(),
            vec![3],
            vec!["label"],
        ),
        (
            "empty label",
            "[auto_discover]\nenabled = true\nlabel = \"\"\n".into(),
            vec![3],
            vec!["label"],
        ),
        (
            "auto_discover not a table",
            "auto_discover = 5\n".into(),
            vec![1],
            vec!["auto_discover"],
        ),
        (
            "TOML syntax",
            "[auto_discover]\nenabled = tru\n".into(),
            vec![2],
            vec!["enabled"],
        ),
        (
            "bad endpoint scheme",
            format!("{eng}name = \"n\"\nendpoint = \"http://127.0.0.1:2375\"\nhost_ip = \"198.51.100.2\"\n"),
            vec![6],
            vec!["endpoint"],
        ),
        (
            "bad endpoint port",
            format!("{eng}name = \"n\"\nendpoint = \"tcp://127.0.0.1:99999\"\nhost_ip = \"198.51.100.2\"\n"),
            vec![6],
            vec!["endpoint"],
        ),
        (
            "bad host_ip",
            format!("{eng}name = \"n\"\nendpoint = \"tcp://127.0.0.1:2375\"\nhost_ip = \"198.51.100.300\"\n"),
            vec![7],
            vec!["host_ip"],
        ),
        (
            "unknown engine key",
            format!("{eng}name = \"n\"\nendpoint = \"tcp://127.0.0.1:2375\"\nhostip = \"198.51.100.2\"\n"),
            vec![7],
            vec!["hostip"],
        ),
        (
            "engine without endpoint",
            format!("{eng}name = \"n\"\n"),
            vec![4, 5],
            vec!["endpoint"],
        ),
        (
            "engine without name",
            format!("{eng}endpoint = \"unix:///var/run/docker.sock\"\n"),
            vec![4, 5],
            vec!["name"],
        ),
        (
            "empty engine name",
            format!("{eng}name = \"\"\nendpoint = \"unix:///var/run/docker.sock\"\n"),
            vec![5],
            vec!["name", "engine"],
        ),
        (
            "duplicate engine name",
            format!(
                "{eng}name = \"a\"\nendpoint = \"unix:///var/run/docker.sock\"\n\n\
                 [[auto_discover.engines]]\nname = \"a\"\nendpoint = \"tcp://127.0.0.1:2375\"\nhost_ip = \"198.51.100.2\"\n"
            ),
            vec![5, 9],
            vec!["name", "duplicate|twice"],
        ),
        (
            // The daemon refuses this (a tcp:// engine is taken to be on
            // another node); a refusal must name the line like the others.
            "tcp engine without host_ip",
            format!("{eng}name = \"t\"\nendpoint = \"tcp://127.0.0.1:2375\"\n"),
            vec![4, 5, 6],
            vec!["host_ip"],
        ),
        (
            "unspecified host_ip",
            format!("{eng}name = \"n\"\nendpoint = \"tcp://127.0.0.1:2375\"\nhost_ip = \"0.0.0.0\"\n"),
            vec![7],
            vec!["host_ip"],
        ),
        (
            "label with a space",
            "[auto_discover]\nenabled = true\nlabel = \"natmap ports\"\n".into(),
            vec![3],
            vec!["label"],
        ),
    ];
    let mut failures = Vec::new();
    let mut messages: Vec<(String, String)> = Vec::new();
    for (case, text, lines, needles) in &cases {
        let cfg = ConfigFile::new(text);
        match daemon_must_exit(&ns, &["--config", &cfg.arg()], Duration::from_secs(5)) {
            Err(e) => failures.push(format!("{case}: ACCEPTED by the daemon\n{text}\n{e}")),
            Ok(f) => {
                let lower = f.output.to_lowercase();
                let line_ok = lines
                    .iter()
                    .any(|n| f.output.contains(&format!("line {n}")));
                // A needle "a|b" is satisfied by either.
                let missing: Vec<&&str> = needles
                    .iter()
                    .filter(|n| !n.split('|').any(|alt| lower.contains(&alt.to_lowercase())))
                    .collect();
                let first = f
                    .output
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join(" ⏎ ");
                report(&format!(
                    "  [{case}] exit {:?} after {} ms: {first}",
                    f.status.code(),
                    f.took.as_millis()
                ));
                if f.status.success() {
                    failures.push(format!("{case}: exited 0\n{}", f.output));
                }
                if !line_ok {
                    failures.push(format!(
                        "{case}: the message does not name line {lines:?}\n--- config ---\n{text}--- output ---\n{}",
                        f.output
                    ));
                }
                if !missing.is_empty() {
                    failures.push(format!(
                        "{case}: the message lacks {missing:?}\n--- config ---\n{text}--- output ---\n{}",
                        f.output
                    ));
                }
                if f.took > Duration::from_secs(3) {
                    failures.push(format!("{case}: took {:?} to exit", f.took));
                }
                messages.push((case.to_string(), f.output));
            }
        }
    }
    // Each case gets its own message.
    for (i, (a, ma)) in messages.iter().enumerate() {
        for (b, mb) in &messages[i + 1..] {
            if ma == mb {
                failures.push(format!("{a} and {b} give the same message:\n{ma}"));
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} config error case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// `--config` naming a missing file is an error naming the file; without
/// `--config` and without the default file the daemon starts with
/// auto-discover off (`reload` says so); a valid minimal file starts.
#[test]
fn config_file_missing_explicit_is_an_error_default_is_off() {
    if !privileged() {
        return;
    }
    let _timer = TestTimer::start();
    let ns = Netns::new("cfg");
    let missing = "/nonexistent/natmap-test/config.toml";
    let f = daemon_must_exit(&ns, &["--config", missing], Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the daemon started with a missing --config file: {e}"));
    report(&format!(
        "  missing --config: exit {:?}: {}",
        f.status.code(),
        f.output.trim().replace('\n', " ⏎ ")
    ));
    assert!(!f.status.success());
    assert!(
        f.output.contains(missing),
        "the error does not name the file: {}",
        f.output
    );

    assert!(
        !std::path::Path::new("/etc/natmap/config.toml").exists(),
        "/etc/natmap/config.toml exists on this host; this test needs it absent"
    );
    let d = Daemon::start_with_options(&ns, &StateDir::new(), DaemonOptions::isolated());
    let data = ok_data(&d, &["reload"]);
    report(&format!("  reload without a config file: {data}"));
    assert_eq!(data["auto_discover"], false, "{data}");
    assert_eq!(engines_of(&data), Vec::<String>::new(), "{data}");
    d.assert_clean_log();
    drop(d);

    let ns2 = Netns::new("cfg2");
    let cfg = ConfigFile::new("# nothing\n");
    let mut opts = DaemonOptions::isolated();
    opts.extra_args
        .extend(["--config".into(), cfg.path().into()]);
    let d = Daemon::start_with_options(&ns2, &StateDir::new(), opts);
    let data = ok_data(&d, &["reload"]);
    assert_eq!(data["auto_discover"], false, "an empty file: {data}");
}

/// With a running auto-discover config: a broken file makes `reload`
/// answer `invalid_config` naming the line, and SIGHUP log an ERROR
/// mentioning the reload; in both cases the daemon keeps running its old
/// config (mappings kept, new labeled containers still mapped). A fixed
/// file reloads; `enabled = false` removes every auto mapping but no manual
/// one; SIGHUP with it enabled again brings them back.
#[test]
fn a_broken_reload_keeps_the_old_config_and_disabling_removes_auto_mappings() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let out = outside.client();
    let good = auto_config(true, false, &[]);
    let cfg = ConfigFile::new(&good);
    let mut d = root_daemon(&cfg);
    let pid = d.pid();
    let [h1, h2, h3, hm] = [(); 4].map(|_| free_port());
    let c1 = labeled_web("k1", "k1-web", DEFAULT_LABEL, &format!("{h1}:80"), &[]);
    wait_auto(&d, h1, "tcp", APPEAR_LIMIT, "active", is_active);
    c1.wait_ready();
    let manual = Container::web("manual", "manual-web", &[]);
    let data = ok_data(&d, &["docker", "add", &manual.name, &format!("{hm}:80")]);
    let manual_id = rule_id(&data["rule"]);

    // A broken file, by `reload`.
    // Would disable auto-discover if any of it were applied.
    let broken = "[auto_discover]\nenabled = false\npreserve_src_ip = false\nlabell = \"x\"\n";
    cfg.write(broken);
    let (status, v) = d.cli_json_output(&["reload"]);
    report(&format!("  reload with a broken file: {v}"));
    assert_eq!(status.code(), Some(1), "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["code"], "invalid_config", "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("line 4"),
        "the message does not name line 4: {msg}"
    );
    assert!(
        msg.contains("labell"),
        "the message does not name the key: {msg}"
    );
    let c2 = labeled_web("k2", "k2-web", DEFAULT_LABEL, &format!("{h2}:80"), &[]);
    wait_auto(
        &d,
        h2,
        "tcp",
        APPEAR_LIMIT,
        "active (old config still running)",
        is_active,
    );
    c2.wait_ready();
    assert!(auto_rule_on(&d, h1, "tcp").is_some_and(|r| is_active(&r)));

    // The same file, by SIGHUP.
    let mark = log_mark(&d);
    sighup(&d);
    let line = wait_warn(&d, mark, &["reload"], APPEAR_LIMIT);
    report(&format!("  SIGHUP with a broken file: {line}"));
    assert!(line.contains("ERROR"), "not logged as an ERROR: {line}");
    let after: String = log_since(&d, mark).join("\n");
    assert!(
        after.contains("line 4"),
        "the log does not say why (line 4):\n{after}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.is_running() && d.pid() == pid,
        "the daemon exited or restarted"
    );

    // Valid TOML, invalid config (one engine name twice; the second would
    // point the local engine nowhere): refused as a whole too.
    cfg.write(
        "[auto_discover]\nenabled = true\n\n[[auto_discover.engines]]\nname = \"local\"\n\
         endpoint = \"unix:///var/run/docker.sock\"\n\n[[auto_discover.engines]]\nname = \"local\"\n\
         endpoint = \"unix:///nonexistent/natmap-test.sock\"\n",
    );
    let (status, v) = d.cli_json_output(&["reload"]);
    report(&format!("  reload with a duplicate engine name: {v}"));
    assert_eq!(status.code(), Some(1), "{v}");
    assert_eq!(v["error"]["code"], "invalid_config", "{v}");
    let c3 = labeled_web("k3", "k3-web", DEFAULT_LABEL, &format!("{h3}:80"), &[]);
    wait_auto(
        &d,
        h3,
        "tcp",
        APPEAR_LIMIT,
        "active (old config still running)",
        is_active,
    );
    c3.wait_ready();
    for (h, c) in [(h1, &c1), (h2, &c2), (h3, &c3)] {
        let r = auto_rule_on(&d, h, "tcp").expect("auto mapping kept");
        assert!(is_active(&r), "{r}");
        expect_web(&out, sa(HOST_V4, h), &c.marker);
    }

    // Fixed.
    cfg.write(&good);
    let data = reload_ok(&d);
    assert_eq!(engines_of(&data), ["local"], "{data}");
    assert_eq!(data["auto_discover"], true, "{data}");

    // Disabled: every auto mapping goes, the manual one stays.
    cfg.write(&auto_config(false, false, &[]));
    let data = reload_ok(&d);
    assert_eq!(data["auto_discover"], false, "{data}");
    let t = Instant::now();
    wait_until(&d, "auto mappings to disappear", APPEAR_LIMIT, || {
        let autos = auto_rules(&d);
        if autos.is_empty() {
            Ok(())
        } else {
            Err(format!("{autos:#?}"))
        }
    });
    report(&format!(
        "  disabled -> auto mappings gone after {} ms",
        t.elapsed().as_millis()
    ));
    for h in [h1, h2, h3] {
        wait_port_free(&d, h, false);
        expect_no_web(&out, sa(HOST_V4, h));
    }
    let nat = chain_in(None, "nat", "NATMAP");
    assert!(
        nat.iter()
            .filter(|l| l.starts_with("-A "))
            .all(|l| l.contains(&format!("\"natmap:docker:{manual_id}\""))),
        "rules other than the manual mapping's left: {nat:#?}"
    );
    let rules = ls_rules(&d);
    assert_eq!(rules.len(), 1, "{rules:#?}");
    assert_eq!(rule_id(&rules[0]), manual_id);
    expect_web(&out, sa(HOST_V4, hm), "manual-web");

    // Enabled again by SIGHUP.
    cfg.write(&good);
    sighup(&d);
    for (h, c) in [(h1, &c1), (h2, &c2), (h3, &c3)] {
        wait_auto(&d, h, "tcp", APPEAR_LIMIT * 2, "active again", is_active);
        poll_web_until(&out, sa(HOST_V4, h), &c.marker, None, APPEAR_LIMIT);
    }
    expect_web(&out, sa(HOST_V4, hm), "manual-web");
    d.allow_log("reload");
    d.allow_log("config");
    d.assert_clean_log();
}

/// Two labels ask for one host port: the first gets it, the second is a
/// conflict that names the holder and both labels (counted by `status`),
/// and gets the port within a tick of the first container going away,
/// without being restarted.
#[test]
fn a_label_conflict_names_the_holder_and_resolves_when_the_port_frees() {
    let (_serial, _timer) = docker_setup!();
    let cfg = ConfigFile::new(&auto_config(true, false, &[EngineCfg::local()]));
    let d = root_daemon(&cfg);
    let h = free_port();
    let first = labeled_web("first", "first-web", DEFAULT_LABEL, &format!("{h}:80"), &[]);
    let (rule, _) = wait_auto(&d, h, "tcp", APPEAR_LIMIT, "active", is_active);
    assert_eq!(rule["name"], first.name.as_str(), "{rule}");
    let second = labeled_web(
        "second",
        "second-web",
        DEFAULT_LABEL,
        &format!("{h}:80"),
        &[],
    );
    second.wait_ready();
    let deadline = Instant::now() + APPEAR_LIMIT * 2;
    let conflict = loop {
        let status = d.cli_json(&["status"]);
        let found = status["data"]["conflicts"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|m| m.as_str().unwrap_or("").contains(&second.name))
            })
            .cloned();
        if let Some(found) = found {
            assert!(
                status["data"]["problems"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p.as_str().unwrap_or("").contains("port conflict")),
                "{status}"
            );
            break found.as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no conflict reported: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        conflict.contains(&first.name),
        "the holder is not named: {conflict}"
    );
    assert!(
        conflict.contains(&format!("{h}:80")),
        "the label is not shown: {conflict}"
    );
    assert!(
        !conflict.contains("pid"),
        "natmap named itself as a process: {conflict}"
    );

    first.remove();
    let (rule, took) = wait_auto(&d, h, "tcp", Duration::from_secs(5), "second active", |r| {
        is_active(r) && r["name"] == second.name.as_str()
    });
    report(&format!(
        "  the port went to the waiting label {} ms after the holder was removed",
        took.as_millis()
    ));
    check_local_rule(&rule, &second, h, 80, "tcp");
    let status = d.cli_json(&["status"]);
    assert!(
        !status["data"]["conflicts"]
            .to_string()
            .contains(&second.name),
        "the conflict message stayed: {status}"
    );
}
