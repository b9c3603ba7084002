//! Docker port mappings on running containers (issue 3), against the host's
//! real Docker engine: the real daemon runs in the ROOT network namespace
//! (where Docker lives) with a temporary state file and socket; traffic comes
//! from an "outside machine" (a namespace joined to the host by a veth pair,
//! host address 203.0.113.1), from the host itself (loopback and its own
//! address) and from other containers.
//!
//! The tests change the host, so they run one at a time ([`serial`]) and
//! every container, namespace, link, rule and socket they create is removed
//! by a guard, also when a test fails. Run them with
//! `cargo test --test docker -- --test-threads=1` (the lock serialises them
//! anyway). Each prints `TIMING <test>: <s>` to stderr. They refuse to run
//! while another natmap daemon runs in the root namespace (they would fight
//! over its chains); `NATMAP_TEST_ALLOW_FOREIGN_DAEMON=1` overrides that.

pub mod common;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::auto_discover::dnat_lines_of;
use common::docker::*;
use common::*;
use serde_json::Value;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Re-pointing after a container (re)start must take at most this long (issue 3).
const REPOINT_LIMIT: Duration = Duration::from_secs(2);

// ───────────────────────────── helpers ─────────────────────────────

/// `docker add …` (or any add form): asserts `result == "added"`, returns the rule.
#[track_caller]
fn added(d: &RootDaemon, args: &[&str]) -> Value {
    let t = Instant::now();
    let data = d.ok(args);
    let took = t.elapsed();
    assert_eq!(data["result"], "added", "{args:?}: {data}");
    let rule = data["rule"].clone();
    assert!(rule["id"].as_u64().is_some(), "rule without id: {rule}");
    assert_eq!(rule["kind"], "docker", "{rule}");
    report(&format!(
        "  natmap {} -> id {} in {} ms",
        args.join(" "),
        rule["id"],
        took.as_millis()
    ));
    rule
}

/// A removal command: asserts `result == "deleted"` for rule `id`.
#[track_caller]
fn deleted(d: &RootDaemon, args: &[&str], id: u64) {
    let data = d.ok(args);
    assert_eq!(data["result"], "deleted", "{args:?}: {data}");
    assert_eq!(
        data["rule"]["id"], id,
        "{args:?} removed another rule: {data}"
    );
}

fn id_of(rule: &Value) -> u64 {
    rule["id"].as_u64().expect("numeric id")
}

/// The subnet of Docker's default bridge, e.g. "172.17.0.0/16".
fn bridge_subnet() -> String {
    docker_ok(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
    ])
}

/// Checks the JSON of an active mapping of `web` on the default bridge.
#[track_caller]
fn check_container_rule(
    rule: &Value,
    web: &Container,
    host_ip: Option<Ipv4Addr>,
    host_port: u16,
    container_port: u16,
    proto: &str,
) {
    let ctx = format!("rule {rule}");
    assert_eq!(rule["kind"], "docker", "{ctx}");
    assert_eq!(rule["name"], web.name.as_str(), "{ctx}");
    assert_eq!(rule["container_id"], web.id(), "{ctx}");
    assert_eq!(rule["network"], "bridge", "{ctx}");
    match host_ip {
        None => assert!(rule["host_ip"].is_null(), "{ctx}"),
        Some(ip) => assert_eq!(rule["host_ip"], ip.to_string(), "{ctx}"),
    }
    assert_eq!(rule["host_port"], host_port, "{ctx}");
    assert_eq!(rule["container_port"], container_port, "{ctx}");
    assert_eq!(rule["proto"], proto, "{ctx}");
    assert_eq!(rule["external"], false, "{ctx}");
    assert_eq!(rule["target_v4"]["ip"], web.ip4().to_string(), "{ctx}");
    assert_eq!(rule["target_v4"]["subnet"], bridge_subnet(), "{ctx}");
    assert!(rule["target_v6"].is_null(), "{ctx}");
    assert_eq!(rule["status"], "active", "{ctx}");
}

/// After a removal: `ls` no longer has `id`, and the host port is free.
#[track_caller]
fn assert_gone(d: &RootDaemon, id: u64, port: u16, udp: bool) {
    let rules = d.ls(None);
    assert!(
        !rules.iter().any(|r| r["id"] == id),
        "rule {id} still listed after removal: {rules:?}"
    );
    let free = if udp {
        udp_port_free(port)
    } else {
        tcp_port_free(port)
    };
    assert!(
        free,
        "{} port {port} still held after removal:\n{}",
        if udp { "udp" } else { "tcp" },
        sockets_on_port(port, udp)
    );
}

/// `ss` lines of the root namespace's sockets on local `port`, for messages.
fn sockets_on_port(port: u16, udp: bool) -> String {
    let out = run_with_timeout(
        Command::new("ss")
            .arg(if udp { "-Huanp" } else { "-Htanp" })
            .arg(format!("( sport = :{port} )")),
        COMMAND_TIMEOUT,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `GET /` from `client` to `target` every 50 ms until it returns
/// `want`; panics if it returns `forbidden` (a stale target) or nothing
/// within `limit`. Returns how long it took.
#[track_caller]
fn poll_web(
    client: &Client,
    target: std::net::SocketAddr,
    want: &str,
    forbidden: Option<&str>,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let mut last;
    loop {
        let got = client.run(move || http_get(target, "/", Duration::from_millis(500)));
        match got {
            Ok(body) if body.trim() == want => return start.elapsed(),
            Ok(body) if Some(body.trim()) == forbidden => panic!(
                "traffic from {} to {target} reached the wrong container ({body:?}) after {:?}: \
                 the mapping still points at the old address",
                client.describe(),
                start.elapsed()
            ),
            Ok(body) => last = format!("answered {body:?}"),
            Err(e) => last = e,
        }
        if start.elapsed() >= limit {
            panic!(
                "traffic from {} to {target} did not reach {want:?} within {limit:?}; last: {last}",
                client.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Conntrack entries (as `conntrack -L` prints them) for UDP to `port`.
fn conntrack_udp_to(port: u16) -> Vec<String> {
    let out = run_with_timeout(
        Command::new("conntrack").args(["-L", "-p", "udp", "--dport", &port.to_string()]),
        COMMAND_TIMEOUT,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("udp"))
        .map(str::to_string)
        .collect()
}

/// A temporary iptables rule in the root namespace (`-I` now, `-D` on drop).
struct TempRule {
    table: &'static str,
    chain: &'static str,
    spec: Vec<String>,
}

impl TempRule {
    fn insert(table: &'static str, chain: &'static str, spec: &[&str]) -> TempRule {
        let out = run_with_timeout(
            Command::new("iptables")
                .args(["-w", "10", "-t", table, "-I", chain])
                .args(spec),
            COMMAND_TIMEOUT,
        );
        check_output("iptables -I", &out);
        TempRule {
            table,
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Drop for TempRule {
    fn drop(&mut self) {
        let _ = run_quiet(
            Command::new("iptables")
                .args(["-w", "10", "-t", self.table, "-D", self.chain])
                .args(&self.spec),
            COMMAND_TIMEOUT,
        );
    }
}

// ───────────────────────────── fixtures, without natmap ─────────────────────────────

/// The fixtures themselves, against plain Docker and no natmap: the web
/// container's HTTP, CGI and UDP answers; the outside machine (blocked by
/// Docker's FORWARD policy until a temporary ACCEPT, then seen with its own
/// address); another container reaching it; a fixed-port UDP flow; the
/// Docker socket proxy switching off and on; port helpers.
#[test]
fn fixtures_work_against_plain_docker() {
    let (_serial, _timer) = docker_setup!();
    assert!(
        natmap_lines_in_root().is_empty() || !remove_natmap_root_rules().is_empty(),
        "natmap rules in the root namespace that cannot be removed"
    );
    let outside = OutsideHost::new();
    let extra = free_port();
    let web = Container::web("fixture", "fixture-web", &[extra]);
    let ip = web.ip4();
    let host = Client::Host;
    let out = outside.client();

    expect_web(&host, sa(ip, 80), "fixture-web");
    expect_web(&host, sa(ip, extra), "fixture-web");
    let gw: IpAddr = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
        &web.name,
    ])
    .parse()
    .unwrap();
    assert_eq!(remote_addr_seen(&host, sa(ip, 80)), gw);
    expect_udp_echo(&host, sa(ip, UDP_ECHO_PORT), "fixture-web");

    // Docker's FORWARD chain drops what comes from outside...
    expect_no_web(&out, sa(ip, 80));
    expect_no_udp_echo(&out, sa(ip, UDP_ECHO_PORT));
    {
        let _accept = TempRule::insert(
            "filter",
            "DOCKER-USER",
            &[
                "-s",
                &OUTSIDE_V4.to_string(),
                "-d",
                &ip.to_string(),
                "-j",
                "ACCEPT",
            ],
        );
        // ...until accepted; then the container sees the outside address.
        expect_web(&out, sa(ip, 80), "fixture-web");
        assert_eq!(remote_addr_seen(&out, sa(ip, 80)), IpAddr::V4(OUTSIDE_V4));
        let udp = UdpClient::bind(&out, sa(OUTSIDE_V4, 40400)).unwrap();
        for p in [" one", " two"] {
            assert_eq!(
                udp.ask(sa(ip, UDP_ECHO_PORT), p, PROBE_TIMEOUT).unwrap(),
                format!("fixture-web{p}")
            );
        }
        assert_eq!(udp.local_addr(), sa(OUTSIDE_V4, 40400));
    }
    expect_no_web(&out, sa(ip, 80));

    // The premise of the stale-conntrack test: a UDP flow keeps being
    // DNATed to the container after its DNAT rule is gone, until its
    // conntrack entry is deleted.
    {
        let x = free_port();
        let _accept = TempRule::insert(
            "filter",
            "DOCKER-USER",
            &[
                "-s",
                &OUTSIDE_V4.to_string(),
                "-d",
                &ip.to_string(),
                "-j",
                "ACCEPT",
            ],
        );
        let dnat = TempRule::insert(
            "nat",
            "PREROUTING",
            &[
                "-d",
                &HOST_V4.to_string(),
                "-p",
                "udp",
                "--dport",
                &x.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{ip}:{UDP_ECHO_PORT}"),
            ],
        );
        let flow = UdpClient::bind(&out, sa(OUTSIDE_V4, 40401)).unwrap();
        assert_eq!(
            flow.ask(sa(HOST_V4, x), " s1", PROBE_TIMEOUT).unwrap(),
            "fixture-web s1"
        );
        drop(dnat);
        assert_eq!(
            flow.ask(sa(HOST_V4, x), " s2", PROBE_TIMEOUT).unwrap(),
            "fixture-web s2",
            "the flow should still be DNATed by its conntrack entry"
        );
        let del = run_with_timeout(
            Command::new("conntrack").args(["-D", "-p", "udp", "--dport", &x.to_string()]),
            COMMAND_TIMEOUT,
        );
        check_output("conntrack -D", &del);
        assert!(flow
            .ask(sa(HOST_V4, x), " s3", Duration::from_millis(1500))
            .is_err());
    }

    // Another container reaches it.
    let o = docker_run_oneshot(
        "wget",
        &["timeout", "5", "wget", "-qO-", &format!("http://{ip}/")],
        Duration::from_secs(30),
    );
    check_output("wget from another container", &o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "fixture-web");

    // The Docker socket proxy: off, on, off, on, and off cuts live streams.
    let mut proxy = DockerProxy::new();
    let version = |p: &DockerProxy| {
        run_with_timeout(
            Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", p.path().display()))
                .args(["version", "-f", "{{.Server.APIVersion}}"]),
            Duration::from_secs(20),
        )
    };
    assert!(!version(&proxy).status.success(), "proxy not started yet");
    proxy.start();
    let v = version(&proxy);
    check_output("docker version through the proxy", &v);
    {
        use std::io::{Read, Write};
        let mut events = std::os::unix::net::UnixStream::connect(proxy.path()).unwrap();
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
        assert_eq!(n, 0, "events stream not cut by proxy.stop()");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    assert!(!version(&proxy).status.success(), "proxy stopped");
    proxy.start();
    check_output("docker version after proxy restart", &version(&proxy));
    proxy.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    check_output("docker version through a slow proxy", &version(&proxy));
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    proxy.set_delay(Duration::ZERO);

    // Port helpers.
    let p = free_port();
    assert!(tcp_port_free(p) && udp_port_free(p));
    let held = TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, p)).unwrap();
    assert!(!tcp_port_free(p));
    drop(held);
    assert!(tcp_port_free(p));
    assert!(natmap_lines_in_root().is_empty());
}

// ───────────────────────────── 1. every argument form ─────────────────────────────

/// Every `docker add` form and every `docker rm` form, each proven by
/// traffic; `ls` filters by container name, id prefix and label. After each
/// removal the mapping's traffic stops, `ls` no longer shows it and the
/// host port can be bound again, while the others keep working.
#[test]
fn every_argument_form_adds_and_removes() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let same = free_port(); // `docker add C HP`: httpd listens on it inside too
    let web = Container::web("web", "forms-web", &[same]);
    let ip = web.ip4();
    let d = RootDaemon::start();
    let (out, host) = (outside.client(), Client::Host);
    let m = web.marker.as_str();
    let name = web.name.as_str();
    let label = format!("nmt-{}-label", std::process::id());
    let [p1, p2, p3, p4, p6, p7] = [(); 6].map(|_| free_port());

    // docker add C HP:CP
    let r1 = added(&d, &["docker", "add", name, &format!("{p1}:80")]);
    check_container_rule(&r1, &web, None, p1, 80, "tcp");
    // docker add C HOST_IP:HP:CP
    let r2 = added(&d, &["docker", "add", name, &format!("{HOST_V4}:{p2}:80")]);
    check_container_rule(&r2, &web, Some(HOST_V4), p2, 80, "tcp");
    // docker add C HP:CP/tcp
    let r3 = added(&d, &["docker", "add", name, &format!("{p3}:80/tcp")]);
    check_container_rule(&r3, &web, None, p3, 80, "tcp");
    // docker add C HP:CP/udp
    let r4 = added(
        &d,
        &["docker", "add", name, &format!("{p4}:{UDP_ECHO_PORT}/udp")],
    );
    check_container_rule(&r4, &web, None, p4, UDP_ECHO_PORT, "udp");
    // docker add C HP (same port inside)
    let r5 = added(&d, &["docker", "add", name, &same.to_string()]);
    check_container_rule(&r5, &web, None, same, same, "tcp");
    // docker add HP:CP --name C
    let r6 = added(&d, &["docker", "add", &format!("{p6}:80"), "--name", name]);
    check_container_rule(&r6, &web, None, p6, 80, "tcp");
    // docker add HP:TARGET_IP:PORT --name LABEL (non-Docker target, no inspect)
    let r7 = added(
        &d,
        &["docker", "add", &format!("{p7}:{ip}:80"), "--name", &label],
    );
    assert_eq!(r7["name"], label.as_str(), "{r7}");
    assert_eq!(r7["external"], true, "{r7}");
    assert!(r7["container_id"].is_null(), "{r7}");
    assert_eq!(r7["host_port"], p7, "{r7}");
    assert_eq!(r7["container_port"], 80, "{r7}");
    assert_eq!(r7["proto"], "tcp", "{r7}");
    assert_eq!(r7["target_v4"]["ip"], ip.to_string(), "{r7}");
    assert_eq!(r7["status"], "active", "{r7}");

    let ids: Vec<u64> = [&r1, &r2, &r3, &r4, &r5, &r6, &r7].map(id_of).to_vec();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7, "ids not distinct: {ids:?}");

    // ls FILTER: by name, by id prefix, by label.
    let listed = |f: &str| -> Vec<u64> {
        let mut v: Vec<u64> = d.ls(Some(f)).iter().map(id_of).collect();
        v.sort();
        v
    };
    let mut container_ids = ids[..6].to_vec();
    container_ids.sort();
    assert_eq!(listed(name), container_ids, "ls {name}");
    assert_eq!(listed(&web.id()[..12]), container_ids, "ls <id prefix>");
    assert_eq!(listed(&label), vec![ids[6]], "ls {label}");
    assert_eq!(d.ls(None).len(), 7);

    // Every port is reserved by the daemon.
    for p in [p1, p2, p3, same, p6, p7] {
        assert!(!tcp_port_free(p), "tcp port {p} not reserved");
    }
    assert!(!udp_port_free(p4), "udp port {p4} not reserved");

    // rm C HP
    expect_web(&out, sa(HOST_V4, p1), m);
    expect_web(&host, sa(LOOPBACK, p1), m);
    deleted(&d, &["docker", "rm", name, &p1.to_string()], ids[0]);
    expect_no_web(&out, sa(HOST_V4, p1));
    expect_no_web(&host, sa(LOOPBACK, p1));
    assert_gone(&d, ids[0], p1, false);

    // rm --id N (the HOST_IP form)
    expect_web(&out, sa(HOST_V4, p2), m);
    expect_web(&host, sa(HOST_V4, p2), m);
    deleted(&d, &["docker", "rm", "--id", &ids[1].to_string()], ids[1]);
    expect_no_web(&out, sa(HOST_V4, p2));
    expect_no_web(&host, sa(HOST_V4, p2));
    assert_gone(&d, ids[1], p2, false);

    // rm C HP/tcp
    expect_web(&out, sa(HOST_V4, p3), m);
    expect_web(&host, sa(LOOPBACK, p3), m);
    deleted(&d, &["docker", "rm", name, &format!("{p3}/tcp")], ids[2]);
    expect_no_web(&out, sa(HOST_V4, p3));
    expect_no_web(&host, sa(LOOPBACK, p3));
    assert_gone(&d, ids[2], p3, false);

    // rm C HP/udp
    expect_udp_echo(&out, sa(HOST_V4, p4), m);
    expect_udp_echo(&host, sa(LOOPBACK, p4), m);
    expect_udp_echo(&host, sa(HOST_V4, p4), m);
    deleted(&d, &["docker", "rm", name, &format!("{p4}/udp")], ids[3]);
    expect_no_udp_echo(&out, sa(HOST_V4, p4));
    expect_no_udp_echo(&host, sa(LOOPBACK, p4));
    assert_gone(&d, ids[3], p4, true);

    // rm --name C HP (the same-port form)
    expect_web(&out, sa(HOST_V4, same), m);
    expect_web(&host, sa(LOOPBACK, same), m);
    deleted(
        &d,
        &["docker", "rm", "--name", name, &same.to_string()],
        ids[4],
    );
    expect_no_web(&out, sa(HOST_V4, same));
    expect_no_web(&host, sa(LOOPBACK, same));
    assert_gone(&d, ids[4], same, false);

    // rm --id N (the --name C form)
    expect_web(&out, sa(HOST_V4, p6), m);
    expect_web(&host, sa(LOOPBACK, p6), m);
    deleted(&d, &["docker", "rm", "--id", &ids[5].to_string()], ids[5]);
    expect_no_web(&out, sa(HOST_V4, p6));
    expect_no_web(&host, sa(LOOPBACK, p6));
    assert_gone(&d, ids[5], p6, false);

    // rm --name LABEL HP (the non-Docker target)
    expect_web(&out, sa(HOST_V4, p7), m);
    expect_web(&host, sa(LOOPBACK, p7), m);
    expect_web(&host, sa(HOST_V4, p7), m);
    assert_eq!(
        remote_addr_seen(&out, sa(HOST_V4, p7)),
        IpAddr::V4(OUTSIDE_V4)
    );
    deleted(
        &d,
        &["docker", "rm", "--name", &label, &p7.to_string()],
        ids[6],
    );
    expect_no_web(&out, sa(HOST_V4, p7));
    expect_no_web(&host, sa(LOOPBACK, p7));
    assert_gone(&d, ids[6], p7, false);

    assert!(d.ls(None).is_empty(), "{:?}", d.ls(None));
    let left: Vec<String> = natmap_lines_in_root()
        .into_iter()
        .filter(|l| l.contains("natmap:docker:"))
        .collect();
    assert!(
        left.is_empty(),
        "rules left after removing every mapping: {left:?}"
    );

    // Unknown mapping / container: clear errors, nothing changes.
    let (code, msg) = d.err(&["docker", "rm", name, &p1.to_string()]);
    assert_eq!(code, "not_found", "{msg}");
    let (code, msg) = d.err(&["docker", "rm", "--id", "999"]);
    assert_eq!(code, "not_found", "{msg}");
    let ghost = format!("nmt-{}-no-such-container", std::process::id());
    let fresh = free_port();
    let (code, msg) = d.err(&["docker", "add", &ghost, &format!("{fresh}:80")]);
    assert_eq!(code, "container_not_found", "{msg}");
    assert!(
        tcp_port_free(fresh),
        "failed add left port {fresh} reserved"
    );
    // A malformed mapping is a usage error.
    let out = d.cli(&["docker", "add", name, "80:"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let (status, v) = d.cli_json_output(&["docker", "add", name, "80:"]);
    assert_eq!(status.code(), Some(2), "{v}");
    assert_eq!(v["error"]["code"], "invalid_argument", "{v}");
}

// ───────────────────────────── 2. reachability ─────────────────────────────

/// One mapping (`docker add web HP:80`) is reachable from an outside machine
/// (with its own source address preserved: kernel DNAT), from the host via
/// 127.0.0.1 and via its own address, and from another container; natmap's
/// nat chain holds exactly one DNAT line for it, and its jumps come first.
#[test]
fn one_mapping_is_reachable_from_everywhere_and_keeps_the_client_address() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "reach-web", &[]);
    let ip = web.ip4();
    let d = RootDaemon::start();
    let hp = free_port();
    let (out, host) = (outside.client(), Client::Host);

    let t = Instant::now();
    let rule = added(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    report(&format!(
        "  one `docker add` (CLI round trip): {} ms",
        t.elapsed().as_millis()
    ));
    let id = id_of(&rule);

    // From another machine, source address preserved.
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    assert_eq!(
        remote_addr_seen(&out, sa(HOST_V4, hp)),
        IpAddr::V4(OUTSIDE_V4),
        "the container must see the outside client's own address"
    );
    // From the host: loopback and its own non-loopback address.
    expect_web(&host, sa(LOOPBACK, hp), &web.marker);
    expect_web(&host, sa(HOST_V4, hp), &web.marker);
    // From another container, to the host's address.
    let o = docker_run_oneshot(
        "client",
        &[
            "timeout",
            "5",
            "wget",
            "-qO-",
            &format!("http://{HOST_V4}:{hp}/"),
        ],
        Duration::from_secs(30),
    );
    check_output("wget from another container to the host address", &o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), web.marker);

    // Exactly one DNAT line for the mapping, with its comment and target.
    let dnat = dnat_lines_of(None, id);
    assert_eq!(
        dnat.len(),
        1,
        "nat NATMAP: {:?}",
        root_chain(false, "nat", "NATMAP")
    );
    assert!(dnat[0].contains(&format!("--dport {hp}")), "{dnat:?}");
    assert!(
        dnat[0].contains(&format!("--to-destination {ip}:80")),
        "{dnat:?}"
    );
    // Every natmap rule carries this mapping's comment; no duplicates.
    let mut all = Vec::new();
    for (table, chain) in NATMAP_CHAINS {
        for l in root_chain(false, table, chain) {
            if l.starts_with("-A ") {
                assert!(
                    l.contains(&format!("\"natmap:docker:{id}\"")),
                    "{table} rule without the mapping's comment: {l}"
                );
                all.push(format!("{table} {l}"));
            }
        }
    }
    let mut dedup = all.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), all.len(), "duplicate rules: {all:#?}");
    // One jump each, first in its hook chain.
    for (table, hook, target) in NATMAP_JUMPS {
        let lines = root_chain(false, table, hook);
        let jump = format!("-A {hook} -j {target}");
        assert_eq!(
            lines.iter().filter(|l| **l == jump).count(),
            1,
            "{table} {hook}: {lines:?}"
        );
        assert_eq!(
            lines.iter().find(|l| l.starts_with("-A ")),
            Some(&jump),
            "{table} {hook}: natmap's jump is not first: {lines:?}"
        );
    }
}

// ───────────────────────────── 3. remap ─────────────────────────────

/// `docker remap web OLD:NEW` moves the mapping (new port works, old port is
/// dead and free); a remap to a port another process holds fails with
/// `port_in_use` naming the port, and the mapping keeps working as before.
#[test]
fn remap_moves_the_port_and_a_busy_target_port_changes_nothing() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "remap-web", &[]);
    let d = RootDaemon::start();
    let (out, host) = (outside.client(), Client::Host);
    let m = web.marker.as_str();
    let [p1, p2, p3] = [(); 3].map(|_| free_port());

    let rule = added(&d, &["docker", "add", &web.name, &format!("{p1}:80")]);
    let id = id_of(&rule);
    expect_web(&out, sa(HOST_V4, p1), m);

    let data = d.ok(&["docker", "remap", &web.name, &format!("{p1}:{p2}")]);
    assert_eq!(data["result"], "remapped", "{data}");
    assert_eq!(data["rule"]["host_port"], p2, "{data}");
    assert_eq!(data["rule"]["container_port"], 80, "{data}");
    // Ids are stable for the life of a mapping (DESIGN.md §1); a remap
    // moves the mapping, it does not make a new one.
    assert_eq!(
        data["rule"]["id"], id,
        "remap changed the mapping id: {data}"
    );

    expect_web(&out, sa(HOST_V4, p2), m);
    expect_web(&host, sa(LOOPBACK, p2), m);
    expect_web(&host, sa(HOST_V4, p2), m);
    expect_no_web(&out, sa(HOST_V4, p1));
    expect_no_web(&host, sa(LOOPBACK, p1));
    assert!(tcp_port_free(p1), "old port {p1} still held after remap");
    assert!(!tcp_port_free(p2), "new port {p2} not reserved");
    let rules = d.ls(Some(&web.name));
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["host_port"], p2);
    assert_eq!(dnat_lines_of(None, id).len(), 1);
    assert!(dnat_lines_of(None, id)[0].contains(&format!("--dport {p2}")));

    // A port held by another process: refused, nothing changes.
    let held = TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, p3)).unwrap();
    let (code, msg) = d.err(&["docker", "remap", &web.name, &format!("{p2}:{p3}")]);
    assert_eq!(code, "port_in_use", "{msg}");
    assert!(
        msg.contains(&p3.to_string()),
        "message does not name the port: {msg}"
    );
    expect_web(&out, sa(HOST_V4, p2), m);
    expect_web(&host, sa(LOOPBACK, p2), m);
    let rules = d.ls(Some(&web.name));
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["host_port"], p2, "{rules:?}");
    assert_eq!(rules[0]["status"], "active", "{rules:?}");
    assert_eq!(dnat_lines_of(None, id).len(), 1);
    assert!(dnat_lines_of(None, id)[0].contains(&format!("--dport {p2}")));
    assert!(
        !root_chain(false, "nat", "NATMAP")
            .iter()
            .any(|l| l.contains(&format!("--dport {p3}"))),
        "a rule for the refused port was installed"
    );
    assert!(!tcp_port_free(p2), "port {p2} released by a failed remap");
    drop(held);
    assert!(tcp_port_free(p3));
}

/// A TCP host port is usable again right after its mapping is removed or
/// remapped away, also when loopback clients used it (the daemon's relay
/// leaves TIME_WAIT sockets on the port): re-adding it, remapping back to
/// it, and another service binding it (with SO_REUSEADDR, as servers do)
/// all work at once.
#[test]
fn a_tcp_port_is_reusable_right_after_removal_even_after_loopback_traffic() {
    let (_serial, _timer) = docker_setup!();
    let web = Container::web("web", "reuse-web", &[]);
    let d = RootDaemon::start();
    let host = Client::Host;
    let [p, q] = [(); 2].map(|_| free_port());
    let spec = format!("{p}:80");

    let id = id_of(&added(&d, &["docker", "add", &web.name, &spec]));
    expect_web(&host, sa(LOOPBACK, p), &web.marker);
    deleted(&d, &["docker", "rm", &web.name, &p.to_string()], id);
    let (status, v) = d.cli_json_output(&["docker", "add", &web.name, &spec]);
    assert!(
        status.success() && v["ok"] == true,
        "re-adding {spec} right after `docker rm` failed: {v}\n{}",
        sockets_on_port(p, false)
    );
    expect_web(&host, sa(LOOPBACK, p), &web.marker);
    let (status, v) = d.cli_json_output(&["docker", "remap", &web.name, &format!("{p}:{q}")]);
    assert!(status.success() && v["ok"] == true, "remap {p}:{q}: {v}");
    let (status, v) = d.cli_json_output(&["docker", "remap", &web.name, &format!("{q}:{p}")]);
    assert!(
        status.success() && v["ok"] == true,
        "remapping back to {p} right after loopback traffic on it failed: {v}\n{}",
        sockets_on_port(p, false)
    );
    expect_web(&host, sa(LOOPBACK, p), &web.marker);
    let id = id_of(&v["data"]["rule"]);
    deleted(&d, &["docker", "rm", "--id", &id.to_string()], id);
    assert_gone(&d, id, p, false);
    assert!(tcp_port_free(q));
}

/// The UDP counterpart: after loopback datagrams went through the daemon's
/// relay, `docker rm` releases the UDP port at once (another service can
/// bind it, the same mapping can be added again), and so does a remap.
#[test]
fn a_udp_port_is_released_right_after_removal_even_after_loopback_traffic() {
    let (_serial, _timer) = docker_setup!();
    let web = Container::web("web", "reuse-udp", &[]);
    let d = RootDaemon::start();
    let host = Client::Host;
    let [p, q] = [(); 2].map(|_| free_port());
    let spec = format!("{p}:{UDP_ECHO_PORT}/udp");

    let id = id_of(&added(&d, &["docker", "add", &web.name, &spec]));
    expect_udp_echo(&host, sa(LOOPBACK, p), &web.marker);
    deleted(&d, &["docker", "rm", &web.name, &format!("{p}/udp")], id);
    assert_gone(&d, id, p, true);
    let (status, v) = d.cli_json_output(&["docker", "add", &web.name, &spec]);
    assert!(
        status.success() && v["ok"] == true,
        "re-adding {spec} right after `docker rm` failed: {v}\n{}",
        sockets_on_port(p, true)
    );
    expect_udp_echo(&host, sa(LOOPBACK, p), &web.marker);
    let data = d.ok(&["docker", "remap", &web.name, &format!("{p}:{q}/udp")]);
    assert!(
        udp_port_free(p),
        "udp port {p} still held after remapping away from it:\n{}",
        sockets_on_port(p, true)
    );
    expect_udp_echo(&host, sa(LOOPBACK, q), &web.marker);
    let id = id_of(&data["rule"]);
    deleted(&d, &["docker", "rm", "--id", &id.to_string()], id);
    assert_gone(&d, id, q, true);
}

/// Docker is up when the daemon starts: the very first `docker add`, sent as
/// soon as the control socket accepts, must not be refused as
/// `docker_unavailable` (a script doing `start daemon; docker add` must
/// work). The engine answers through a proxy that delays every new
/// connection by 300 ms, so the daemon's first connection is reliably still
/// under way when the request arrives.
#[test]
fn docker_add_right_after_daemon_start_works() {
    let (_serial, _timer) = docker_setup!();
    let web = Container::web("web", "early-web", &[]);
    let hp = free_port();
    let mut proxy = DockerProxy::new();
    proxy.set_delay(Duration::from_millis(300));
    proxy.start();
    let d = RootDaemon::start_with_docker_socket(proxy.path());
    let t = Instant::now();
    let (status, v) = d.cli_json_output(&["docker", "add", &web.name, &format!("{hp}:80")]);
    assert!(
        status.success() && v["ok"] == true,
        "first docker add right after daemon start (Docker up, answering after 300 ms): \
         {status}: {v}\n--- daemon log ---\n{}",
        d.log()
    );
    report(&format!(
        "  first docker add after start answered in {} ms",
        t.elapsed().as_millis()
    ));
    expect_web(&Client::Host, sa(LOOPBACK, hp), &web.marker);
}

// ───────────────────────────── 4. container lifecycle ─────────────────────────────

/// `docker stop`: the mapping stays, status `down`, no DNAT rule, host port
/// still reserved; `docker start` and `docker restart`: active again and
/// traffic flows within 2 s.
#[test]
fn stop_marks_down_and_keeps_the_port_start_and_restart_bring_it_back() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "stopstart-web", &[]);
    let d = RootDaemon::start();
    let out = outside.client();
    let hp = free_port();
    let id = id_of(&added(
        &d,
        &["docker", "add", &web.name, &format!("{hp}:80")],
    ));
    expect_web(&out, sa(HOST_V4, hp), &web.marker);

    web.stop();
    let (rule, took) = d.wait_rule(id, REPOINT_LIMIT, "down", |r| r["status"] == "down");
    report(&format!(
        "  stop -> status down after {} ms",
        took.as_millis()
    ));
    assert!(
        rule["target_v4"].is_null(),
        "a down mapping has no target: {rule}"
    );
    assert_eq!(rule["host_port"], hp);
    assert!(
        !tcp_port_free(hp),
        "port {hp} released while the container is stopped"
    );
    assert!(
        dnat_lines_of(None, id).is_empty(),
        "DNAT rule kept for a stopped container"
    );
    expect_no_web(&out, sa(HOST_V4, hp));

    let t = Instant::now();
    docker_ok(&["start", &web.name]);
    let took = poll_web(&out, sa(HOST_V4, hp), &web.marker, None, REPOINT_LIMIT * 3);
    report(&format!(
        "  start -> traffic flows {} ms after `docker start` returned ({} ms incl. the command)",
        took.as_millis(),
        t.elapsed().as_millis()
    ));
    assert!(
        took <= REPOINT_LIMIT,
        "re-point took {took:?} (> {REPOINT_LIMIT:?})"
    );
    let (rule, _) = d.wait_rule(id, REPOINT_LIMIT, "active", |r| r["status"] == "active");
    assert_eq!(rule["target_v4"]["ip"], web.ip4().to_string());
    expect_web(&Client::Host, sa(LOOPBACK, hp), &web.marker);

    let t = Instant::now();
    docker_ok(&["restart", "-t", "1", &web.name]);
    let took = poll_web(&out, sa(HOST_V4, hp), &web.marker, None, REPOINT_LIMIT * 3);
    report(&format!(
        "  restart -> traffic flows {} ms after `docker restart` returned ({} ms incl. the command)",
        took.as_millis(),
        t.elapsed().as_millis()
    ));
    assert!(
        took <= REPOINT_LIMIT,
        "re-point took {took:?} (> {REPOINT_LIMIT:?})"
    );
    assert_eq!(d.rule(id).unwrap()["status"], "active");
    assert_eq!(
        dnat_lines_of(None, id).len(),
        1,
        "{:?}",
        root_chain(false, "nat", "NATMAP")
    );
}

/// The container restarts with a NEW address (another container took its old
/// one while it was stopped): within 2 s the mapping points at the new
/// address — traffic reaches the web container, never the squatter — and
/// `ls` shows the new target.
#[test]
fn restart_with_a_changed_ip_repoints_within_two_seconds() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "moving-web", &[]);
    let d = RootDaemon::start();
    let out = outside.client();
    let hp = free_port();
    let old_ip = web.ip4();
    let id = id_of(&added(
        &d,
        &["docker", "add", &web.name, &format!("{hp}:80")],
    ));
    expect_web(&out, sa(HOST_V4, hp), &web.marker);

    web.stop();
    d.wait_rule(id, REPOINT_LIMIT, "down", |r| r["status"] == "down");
    // Docker's default bridge hands out the lowest free address: the
    // squatter gets the stopped container's.
    let squatter = Container::web("squatter", "squatter", &[]);
    assert_eq!(
        squatter.ip4(),
        old_ip,
        "the squatter did not get the stopped container's address; test precondition"
    );
    expect_no_web(&out, sa(HOST_V4, hp));

    let t = Instant::now();
    docker_ok(&["start", &web.name]);
    let started = t.elapsed();
    let took = poll_web(
        &out,
        sa(HOST_V4, hp),
        &web.marker,
        Some(&squatter.marker),
        Duration::from_secs(10),
    );
    let new_ip = web.ip4();
    report(&format!(
        "  RE-POINT DELAY (new IP {old_ip} -> {new_ip}): {} ms after `docker start` returned ({} ms for the command itself)",
        took.as_millis(),
        started.as_millis()
    ));
    assert_ne!(new_ip, old_ip);
    assert!(
        took <= REPOINT_LIMIT,
        "re-point took {took:?} (> {REPOINT_LIMIT:?})"
    );
    let rule = d.rule(id).expect("mapping kept");
    assert_eq!(rule["target_v4"]["ip"], new_ip.to_string(), "{rule}");
    assert_eq!(rule["status"], "active", "{rule}");
    assert_eq!(rule["container_id"], web.id(), "{rule}");
    expect_web(&Client::Host, sa(LOOPBACK, hp), &web.marker);
    expect_web(&Client::Host, sa(HOST_V4, hp), &web.marker);
    let dnat = dnat_lines_of(None, id);
    assert_eq!(dnat.len(), 1, "{dnat:?}");
    assert!(
        dnat[0].contains(&format!("--to-destination {new_ip}:80")),
        "{dnat:?}"
    );
}

/// A mapped container is removed: the mapping stays (down, port reserved);
/// a new container under the same name is picked up within 2 s.
#[test]
fn recreated_container_with_the_same_name_is_picked_up() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "first-web", &[]);
    let d = RootDaemon::start();
    let out = outside.client();
    let hp = free_port();
    let id = id_of(&added(
        &d,
        &["docker", "add", &web.name, &format!("{hp}:80")],
    ));
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    let name = web.name.clone();
    let old_id = web.id().to_string();
    drop(web); // docker rm -f

    let (rule, took) = d.wait_rule(id, REPOINT_LIMIT, "down", |r| r["status"] == "down");
    report(&format!(
        "  rm -f -> status down after {} ms",
        took.as_millis()
    ));
    assert_eq!(rule["name"], name.as_str());
    assert!(
        !tcp_port_free(hp),
        "port released when the container was removed"
    );
    expect_no_web(&out, sa(HOST_V4, hp));

    let t = Instant::now();
    let web2 = Container::web_named(&name, "second-web", &[]);
    let ready = t.elapsed();
    let took = poll_web(
        &out,
        sa(HOST_V4, hp),
        "second-web",
        None,
        Duration::from_secs(10),
    );
    report(&format!(
        "  recreate -> traffic flows {} ms after the new container answered directly ({} ms after `docker run`)",
        took.as_millis(),
        (ready + took).as_millis()
    ));
    assert!(
        took <= REPOINT_LIMIT,
        "re-point took {took:?} (> {REPOINT_LIMIT:?})"
    );
    assert_ne!(web2.id(), old_id);
    let rule = d.rule(id).expect("mapping kept");
    assert_eq!(rule["container_id"], web2.id(), "{rule}");
    assert_eq!(rule["status"], "active", "{rule}");
    expect_web(&Client::Host, sa(LOOPBACK, hp), "second-web");
}

// ───────────────────────────── 5. UDP after remap ─────────────────────────────

/// A UDP flow (fixed client port) to a mapping; after `remap` the same flow
/// to the new port is answered, and to the old port it is NOT (its conntrack
/// entry, which would keep DNATing to the container, was deleted).
#[test]
fn udp_after_remap_has_no_stale_conntrack() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "udp-web", &[]);
    let ip = web.ip4();
    let d = RootDaemon::start();
    let [p1, p2] = [(); 2].map(|_| free_port());
    let id = id_of(&added(
        &d,
        &[
            "docker",
            "add",
            &web.name,
            &format!("{p1}:{UDP_ECHO_PORT}/udp"),
        ],
    ));
    let flow = UdpClient::bind(&outside.client(), sa(OUTSIDE_V4, 40404)).unwrap();
    for p in [" a1", " a2", " a3"] {
        assert_eq!(
            flow.ask(sa(HOST_V4, p1), p, PROBE_TIMEOUT).unwrap(),
            format!("udp-web{p}")
        );
    }
    let before = conntrack_udp_to(p1);
    assert!(
        before.iter().any(|l| l.contains(&format!("src={ip}"))),
        "no conntrack entry DNATed to the container before remap: {before:?}"
    );

    let data = d.ok(&["docker", "remap", &web.name, &format!("{p1}:{p2}/udp")]);
    assert_eq!(data["result"], "remapped", "{data}");
    assert_eq!(data["rule"]["host_port"], p2);
    assert_eq!(data["rule"]["proto"], "udp");
    let stale: Vec<String> = conntrack_udp_to(p1)
        .into_iter()
        .filter(|l| l.contains(&format!("src={ip}")))
        .collect();
    assert!(
        stale.is_empty(),
        "conntrack entries to the container kept for old port {p1}: {stale:?}"
    );

    assert_eq!(
        flow.ask(sa(HOST_V4, p2), " b1", PROBE_TIMEOUT).unwrap(),
        "udp-web b1"
    );
    if let Ok(r) = flow.ask(sa(HOST_V4, p1), " c1", Duration::from_millis(1500)) {
        panic!(
            "the old port {p1} still answers the same flow after remap: {r:?} (stale conntrack)"
        );
    }
    if let Ok(r) = flow.ask(sa(HOST_V4, p1), " c2", Duration::from_millis(1500)) {
        panic!(
            "the old port {p1} still answers the same flow after remap: {r:?} (stale conntrack)"
        );
    }
    assert_eq!(
        flow.ask(sa(HOST_V4, p2), " b2", PROBE_TIMEOUT).unwrap(),
        "udp-web b2"
    );
    expect_udp_echo(&Client::Host, sa(LOOPBACK, p2), "udp-web");
    expect_no_udp_echo(&Client::Host, sa(LOOPBACK, p1));
    assert!(udp_port_free(p1), "old udp port {p1} still held");
    assert!(!udp_port_free(p2), "new udp port {p2} not reserved");
    assert_eq!(
        d.rule(id).map(|r| r["host_port"].clone()),
        Some(p2.into()),
        "remap keeps the mapping id"
    );
}

// ───────────────────────────── 6. Docker unavailable ─────────────────────────────

/// Docker unreachable at daemon start: `docker add` answers
/// `docker_unavailable` and reserves nothing, static rules still work. When
/// Docker comes back `docker add` works without a restart. When it goes away
/// again while the container moves to a new address, the mapping follows as
/// soon as Docker is back.
#[test]
fn docker_unavailable_then_back_without_daemon_restart() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let static_port = free_port();
    let web = Container::web("web", "unavail-web", &[static_port]);
    let ip = web.ip4();
    let mut proxy = DockerProxy::new();
    let mut d = RootDaemon::start_with_docker_socket(proxy.path());
    let daemon_pid = d.pid();
    let out = outside.client();
    let hp = free_port();

    let (code, msg) = d.err(&["docker", "add", &web.name, &format!("{hp}:80")]);
    assert_eq!(code, "docker_unavailable", "{msg}");
    assert!(tcp_port_free(hp), "a refused docker add reserved port {hp}");
    let (code, msg) = d.err(&["docker", "add", &format!("{hp}:80"), "--name", &web.name]);
    assert_eq!(code, "docker_unavailable", "{msg}");

    // Static rules are served meanwhile.
    let data = d.ok(&[
        "dnat",
        "--ext-ip",
        &HOST_V4.to_string(),
        "--int-ip",
        &ip.to_string(),
        "--ports",
        &static_port.to_string(),
    ]);
    assert_eq!(data["result"], "added", "{data}");
    let static_id = id_of(&data["rule"]);
    expect_web(&out, sa(HOST_V4, static_port), &web.marker);
    assert!(d.ls(None).iter().any(|r| r["id"] == static_id));

    // Docker comes back: no daemon restart needed.
    proxy.start();
    let t = Instant::now();
    let rule = loop {
        let (status, v) = d.cli_json_output(&["docker", "add", &web.name, &format!("{hp}:80")]);
        if status.success() && v["ok"] == true {
            break v["data"]["rule"].clone();
        }
        assert_eq!(
            v["error"]["code"], "docker_unavailable",
            "unexpected error while Docker comes back: {v}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "docker add still fails 10 s after Docker came back: {v}\n{}",
            log_tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    report(&format!(
        "  docker add works {} ms after Docker came back",
        t.elapsed().as_millis()
    ));
    assert!(
        d.is_running() && d.pid() == daemon_pid,
        "the daemon was restarted"
    );
    let id = id_of(&rule);
    check_container_rule(&rule, &web, None, hp, 80, "tcp");
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    expect_web(&Client::Host, sa(LOOPBACK, hp), &web.marker);
    // `ls` lists static rules and Docker mappings together.
    let kinds: Vec<Value> = d.ls(None).iter().map(|r| r["kind"].clone()).collect();
    assert_eq!(kinds, ["dnat", "docker"], "{:?}", d.ls(None));
    let table = d.cli_ok(&["ls"]);
    for want in [
        "dnat",
        "docker",
        web.name.as_str(),
        &web.id()[..12],
        &format!("{ip}:80"),
        "active",
    ] {
        assert!(table.contains(want), "`ls` table lacks {want:?}:\n{table}");
    }

    // Docker goes away again; the container moves to a new address meanwhile.
    proxy.stop();
    let (code, msg) = d.err(&["docker", "add", &web.name, &format!("{}:80", free_port())]);
    assert_eq!(code, "docker_unavailable", "{msg}");
    expect_web(&out, sa(HOST_V4, static_port), &web.marker);
    web.stop();
    let squatter = Container::sleeper("squatter");
    assert_eq!(
        squatter.ip(),
        Some(ip),
        "squatter did not take the old address"
    );
    web.start();
    let new_ip = web.ip4();
    assert_ne!(new_ip, ip);
    // Back: the mapping resumes at the new address.
    proxy.start();
    let took = poll_web(
        &out,
        sa(HOST_V4, hp),
        &web.marker,
        None,
        Duration::from_secs(10),
    );
    report(&format!(
        "  mapping re-pointed {} ms after Docker came back",
        took.as_millis()
    ));
    let (rule, _) = d.wait_rule(id, Duration::from_secs(5), "re-pointed", |r| {
        r["target_v4"]["ip"] == new_ip.to_string()
    });
    assert_eq!(rule["status"], "active", "{rule}");
}

// ───────────────────────────── 7. clear and SIGTERM ─────────────────────────────

/// `clear` removes every natmap rule, chain and jump from the host (no
/// `NATMAP` in `iptables-save`/`ip6tables-save`) and every reservation; the
/// daemon keeps working afterwards, and SIGTERM also leaves nothing behind.
#[test]
fn clear_and_sigterm_leave_no_natmap_rule_on_the_host() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let static_port = free_port();
    let web = Container::web("web", "clear-web", &[static_port]);
    let mut d = RootDaemon::start();
    let out = outside.client();
    let [p1, p2, p3] = [(); 3].map(|_| free_port());
    added(&d, &["docker", "add", &web.name, &format!("{p1}:80")]);
    added(
        &d,
        &[
            "docker",
            "add",
            &web.name,
            &format!("{p2}:{UDP_ECHO_PORT}/udp"),
        ],
    );
    d.ok(&[
        "dnat",
        "--ext-ip",
        &HOST_V4.to_string(),
        "--int-ip",
        &web.ip4().to_string(),
        "--ports",
        &static_port.to_string(),
    ]);
    expect_web(&out, sa(HOST_V4, p1), &web.marker);
    expect_udp_echo(&out, sa(HOST_V4, p2), &web.marker);
    expect_web(&out, sa(HOST_V4, static_port), &web.marker);
    assert!(!natmap_lines_in_root().is_empty());

    d.ok(&["clear"]);
    let left = natmap_lines_in_root();
    assert!(left.is_empty(), "natmap rules left after clear: {left:#?}");
    assert!(d.ls(None).is_empty(), "{:?}", d.ls(None));
    assert!(
        tcp_port_free(p1),
        "tcp port {p1} still reserved after clear"
    );
    assert!(
        udp_port_free(p2),
        "udp port {p2} still reserved after clear"
    );
    expect_no_web(&out, sa(HOST_V4, p1));
    expect_no_web(&out, sa(HOST_V4, static_port));
    expect_no_web(&Client::Host, sa(LOOPBACK, p1));

    // Still works after clear...
    added(&d, &["docker", "add", &web.name, &format!("{p3}:80")]);
    expect_web(&out, sa(HOST_V4, p3), &web.marker);
    // ...and SIGTERM removes everything too.
    let status = d.stop();
    assert!(
        status.success(),
        "daemon exit status after SIGTERM: {status}"
    );
    let left = natmap_lines_in_root();
    assert!(
        left.is_empty(),
        "natmap rules left after SIGTERM: {left:#?}"
    );
    expect_no_web(&out, sa(HOST_V4, p3));
    assert!(tcp_port_free(p3));
}

// ───────────────────────────── 8. Docker's rules untouched ─────────────────────────────

/// Docker's own chains (and the hooks, apart from natmap's one jump each) are
/// the same before the daemon starts, while mappings are active, after they
/// are removed, and after the daemon stops.
#[test]
fn dockers_own_rules_are_untouched() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "untouched-web", &[]);
    let before = docker_rules_snapshot();
    let mut d = RootDaemon::start();
    let [p1, p2, p3] = [(); 3].map(|_| free_port());
    let a = id_of(&added(
        &d,
        &["docker", "add", &web.name, &format!("{p1}:80")],
    ));
    let b = id_of(&added(
        &d,
        &[
            "docker",
            "add",
            &web.name,
            &format!("{HOST_V4}:{p2}:{UDP_ECHO_PORT}/udp"),
        ],
    ));
    expect_web(&outside.client(), sa(HOST_V4, p1), &web.marker);
    assert_eq!(docker_rules_snapshot(), before, "with mappings active");
    d.ok(&["docker", "remap", &web.name, &format!("{p1}:{p3}")]);
    assert_eq!(docker_rules_snapshot(), before, "after remap");
    deleted(&d, &["docker", "rm", "--id", &b.to_string()], b);
    deleted(&d, &["docker", "rm", &web.name, &p3.to_string()], a);
    assert_eq!(docker_rules_snapshot(), before, "after rm");
    let status = d.stop();
    assert!(status.success(), "{status}");
    assert_eq!(docker_rules_snapshot(), before, "after the daemon stopped");
}

/// Issue 5: the Docker engine restarts while mappings exist. natmap's jump
/// must be first in DOCKER-USER again within 5 s, and traffic flows again
/// once the container is back (restart policy) without restarting natmap.
#[test]
fn docker_engine_restart_keeps_natmap_first_and_traffic_flowing() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::spawn_web(
        &unique_name("always"),
        "survivor",
        &[],
        &["--restart", "always"],
    );
    web.wait_ready();
    let d = RootDaemon::start();
    d.wait_docker_connected(Duration::from_secs(10));
    let out = outside.client();
    let hp = free_port();
    added(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    expect_web(&out, sa(HOST_V4, hp), &web.marker);

    let t = Instant::now();
    restart_docker_engine();
    let engine_back = t.elapsed();
    let root_rules = |chain: &str| -> Vec<String> {
        let out = std::process::Command::new("iptables")
            .args(["-w", "10", "-t", "filter", "-S", chain])
            .output()
            .expect("iptables");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let jump_first = || {
        root_rules("DOCKER-USER")
            .iter()
            .find(|l| l.starts_with("-A "))
            .map(String::as_str)
            == Some("-A DOCKER-USER -j NATMAP")
    };
    let start = Instant::now();
    while !jump_first() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "natmap's jump is not first in DOCKER-USER 5 s after Docker came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let forward = root_rules("FORWARD");
    assert!(
        forward.iter().any(|l| l == "-A FORWARD -j DOCKER-USER"),
        "{forward:?}"
    );
    let took = poll_web(
        &out,
        sa(HOST_V4, hp),
        &web.marker,
        None,
        Duration::from_secs(20),
    );
    report(&format!(
        "  DOCKER RESTART: engine back after {} ms; jump first {} ms later; traffic flowing {} ms after the engine was back",
        engine_back.as_millis(),
        start.elapsed().as_millis(),
        took.as_millis()
    ));
}
