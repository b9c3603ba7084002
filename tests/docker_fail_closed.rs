//! Docker mappings fail closed (issue: fail closed), against the host's real
//! Docker engine: a mapping has rules only while Docker confirms that its
//! container runs with that address. Root namespace, one test at a time
//! ([`serial`]); every container, rule and socket is removed by a guard.

pub mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::auto_discover::dnat_lines_of;
use common::docker::*;
use common::*;
use serde_json::Value;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// `docker add` through the daemon; returns the new rule's id.
#[track_caller]
fn add(d: &RootDaemon, args: &[&str]) -> u64 {
    let data = d.ok(args);
    assert_eq!(data["result"], "added", "{args:?}: {data}");
    data["rule"]["id"].as_u64().expect("id")
}

/// A TCP connect that must be refused like a closed port (not accepted and
/// closed, not timed out).
#[track_caller]
fn expect_refused(client: &Client, target: SocketAddr) {
    let got = client.run(move || std::net::TcpStream::connect_timeout(&target, NEGATIVE_TIMEOUT));
    match got {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!(
            "{target} from {}: expected refused, got {e}",
            client.describe()
        ),
        Ok(_) => panic!(
            "{target} from {}: expected refused, it connected",
            client.describe()
        ),
    }
}

/// The body of `GET /` (a web container's marker) or `None`, quickly.
fn marker_at(client: &Client, target: SocketAddr) -> Option<String> {
    client
        .run(move || http_get(target, "/", Duration::from_millis(400)))
        .ok()
        .map(|b| b.trim().to_owned())
}

#[test]
fn a_stopped_container_is_a_closed_port_and_die_withdraws_at_once() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "closed-web", &[]);
    let d = RootDaemon::start();
    let out = outside.client();
    let hp = free_port();
    let id = add(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    expect_web(&Client::Host, sa(LOOPBACK, hp), &web.marker);

    let t = Instant::now();
    docker_ok(&["kill", &web.name]);
    while !dnat_lines_of(None, id).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "rules kept after kill"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    report(&format!(
        "  docker kill -> rules withdrawn {} ms after the command started",
        t.elapsed().as_millis()
    ));
    // Refused like a closed port, from everywhere, and the port stays held.
    expect_refused(&out, sa(HOST_V4, hp));
    expect_refused(&Client::Host, sa(HOST_V4, hp));
    expect_refused(&Client::Host, sa(LOOPBACK, hp));
    assert!(!tcp_port_free(hp), "the port was released");
    let rule = d.rule(id).unwrap();
    assert_eq!(rule["status"], "down", "{rule}");

    web.remove();
    expect_refused(&Client::Host, sa(LOOPBACK, hp));
    expect_refused(&out, sa(HOST_V4, hp));
}

#[test]
fn docker_unreachable_withdraws_mappings_and_shows_unknown() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "unknown-web", &[]);
    let old_ip = web.ip4();
    let mut proxy = DockerProxy::new();
    proxy.start();
    let mut d = RootDaemon::start_with_docker_socket(proxy.path());
    d.wait_docker_connected(Duration::from_secs(5));
    d.allow_log("lost Docker");
    let out = outside.client();
    let hp = free_port();
    let id = add(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    expect_web(&out, sa(HOST_V4, hp), &web.marker);

    proxy.stop();
    let (rule, took) = d.wait_rule(id, Duration::from_secs(3), "unknown", |r| {
        r["status"] == "unknown"
    });
    report(&format!(
        "  Docker lost -> unknown after {} ms",
        took.as_millis()
    ));
    assert!(
        rule["detail"].as_str().unwrap_or("").contains("Docker"),
        "{rule}"
    );
    assert!(
        dnat_lines_of(None, id).is_empty(),
        "rules kept while Docker is unreachable"
    );
    // Meanwhile another container takes the old address: it gets nothing.
    web.stop();
    let squatter = Container::web("squatter", "squatter-web", &[]);
    assert_eq!(
        squatter.ip(),
        Some(old_ip),
        "the squatter did not take the address"
    );
    for _ in 0..5 {
        assert_ne!(
            marker_at(&out, sa(HOST_V4, hp)).as_deref(),
            Some("squatter-web")
        );
        assert_ne!(
            marker_at(&Client::Host, sa(LOOPBACK, hp)).as_deref(),
            Some("squatter-web")
        );
    }
    web.start();
    proxy.start();
    let (rule, _) = d.wait_rule(id, Duration::from_secs(10), "re-confirmed", |r| {
        r["status"] == "active"
    });
    assert_eq!(rule["target_v4"]["ip"], web.ip4().to_string(), "{rule}");
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
}

/// Probes `target` from `client` until `stop`; returns every marker that answered.
fn watch_markers(
    client: &Client,
    target: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<String> {
    let mut seen = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(m) = marker_at(client, target) {
            seen.push(m);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// The engine restarts: A (no restart policy) stays stopped, B (restart
/// always) comes back, possibly on A's old address. Nothing sent to A's
/// port may reach B.
fn engine_restart_case(kill_natmap: bool) {
    let outside = OutsideHost::new();
    let a = Container::web("a", "engine-a", &[]);
    let b = Container::spawn_web(&unique_name("b"), "engine-b", &[], &["--restart", "always"]);
    b.wait_ready();
    let a_ip = a.ip4();
    let mut d = RootDaemon::start();
    d.allow_log("lost Docker");
    d.allow_log("Docker");
    let out = outside.client();
    let hp = free_port();
    let id = add(&d, &["docker", "add", &a.name, &format!("{hp}:80")]);
    expect_web(&out, sa(HOST_V4, hp), &a.marker);

    if kill_natmap {
        d.kill9();
    }
    stop_docker_engine();
    start_docker_engine();
    b.wait_ready();
    if kill_natmap {
        d.respawn();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch_markers(&out, sa(HOST_V4, hp), &stop));
        let local = s.spawn(|| watch_markers(&Client::Host, sa(LOOPBACK, hp), &stop));
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut seen = watcher.join().unwrap();
        seen.extend(local.join().unwrap());
        seen
    });
    report(&format!(
        "  engine restart (natmap {}): B now at {:?} (A was at {a_ip}); answers on A's port: {seen:?}",
        if kill_natmap { "killed and restarted" } else { "running" },
        b.ip()
    ));
    assert!(
        !seen.iter().any(|m| m == &b.marker),
        "traffic for A's port reached B: {seen:?}"
    );
    let rule = d.rule(id).unwrap();
    assert_eq!(rule["status"], "down", "{rule}");
    assert!(dnat_lines_of(None, id).is_empty());
    // A comes back: the mapping follows it.
    a.start();
    let (rule, _) = d.wait_rule(id, Duration::from_secs(5), "active", |r: &Value| {
        r["status"] == "active"
    });
    assert_eq!(rule["target_v4"]["ip"], a.ip4().to_string());
    expect_web(&out, sa(HOST_V4, hp), &a.marker);
}

#[test]
fn an_engine_restart_never_sends_one_containers_traffic_to_another() {
    let (_serial, _timer) = docker_setup!();
    engine_restart_case(false);
}

#[test]
fn an_engine_restart_with_natmap_killed_meanwhile_sends_nothing_to_another() {
    let (_serial, _timer) = docker_setup!();
    engine_restart_case(true);
}

#[test]
fn a_renamed_container_keeps_its_mapping_and_a_new_namesake_does_not_take_it() {
    let (_serial, _timer) = docker_setup!();
    let outside = OutsideHost::new();
    let web = Container::web("web", "renamed-web", &[]);
    let d = RootDaemon::start();
    let out = outside.client();
    let hp = free_port();
    let id = add(&d, &["docker", "add", &web.name, &format!("{hp}:80")]);
    let new_name = format!("{}-renamed", web.name);
    docker_ok(&["rename", &web.name, &new_name]);
    let (rule, _) = d.wait_rule(id, Duration::from_secs(3), "renamed", |r| {
        r["name"] == new_name.as_str()
    });
    assert_eq!(rule["status"], "active", "{rule}");
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    // A new container under the old name does not take the port.
    let namesake = Container::web_named(&web.name, "namesake-web", &[]);
    std::thread::sleep(Duration::from_millis(500));
    expect_web(&out, sa(HOST_V4, hp), &web.marker);
    assert_eq!(d.rule(id).unwrap()["name"], new_name.as_str());
    // Renamed back for the guard's cleanup.
    drop(namesake);
    docker_ok(&["rename", &new_name, &web.name]);
}

#[test]
fn unusable_networks_and_ambiguous_prefixes_are_refused_by_name() {
    let (_serial, _timer) = docker_setup!();
    let web = Container::web("web", "nets-web", &[]);
    let d = RootDaemon::start();
    let hp = free_port().to_string();
    let none = unique_name("none");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &none,
        "--network",
        "none",
        "--label",
        "org.natmap.test=1",
        TEST_IMAGE,
        "sleep",
        "600",
    ]);
    let shared = unique_name("shared");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &shared,
        "--network",
        &format!("container:{}", web.name),
        "--label",
        "org.natmap.test=1",
        TEST_IMAGE,
        "sleep",
        "600",
    ]);
    let guard = RemoveOnDrop(vec![none.clone(), shared.clone()]);
    let (code, msg) = d.err(&["docker", "add", &none, &format!("{hp}:80")]);
    assert_eq!(code, "invalid_argument", "{msg}");
    assert!(msg.contains("--network none"), "{msg}");
    let (code, msg) = d.err(&["docker", "add", &shared, &format!("{hp}:80")]);
    assert_eq!(code, "invalid_argument", "{msg}");
    assert!(msg.contains(&web.name) || msg.contains(web.id()), "{msg}");
    assert!(
        tcp_port_free(hp.parse().unwrap()),
        "a refused add reserved the port"
    );

    // Two containers whose ids share their first hex digit.
    let mut created = Vec::new();
    let prefix = loop {
        let name = unique_name("prefix");
        let id = docker_ok(&[
            "create",
            "--name",
            &name,
            "--label",
            "org.natmap.test=1",
            TEST_IMAGE,
            "true",
        ]);
        created.push(name);
        let firsts: Vec<String> = created
            .iter()
            .map(|n| docker_ok(&["inspect", "-f", "{{.Id}}", n])[..1].to_owned())
            .collect();
        let mine = id[..1].to_owned();
        if firsts.iter().filter(|f| **f == mine).count() > 1 {
            break mine;
        }
        assert!(created.len() < 40, "no shared prefix among {created:?}");
    };
    let _prefix_guard = RemoveOnDrop(created);
    let (code, msg) = d.err(&["docker", "add", &prefix, &format!("{hp}:80")]);
    assert_eq!(code, "invalid_argument", "{msg}");
    assert!(msg.contains("several containers"), "{msg}");
    drop(guard);
}

/// Removes the named containers when dropped.
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = docker(&["rm", "-f", name]);
        }
    }
}

#[test]
fn a_hanging_docker_blocks_no_other_client() {
    let (_serial, _timer) = docker_setup!();
    let web = Container::web("web", "slow-web", &[]);
    let other = Container::web("other", "slow-other", &[]);
    let mut proxy = DockerProxy::new();
    proxy.start();
    let d = RootDaemon::start_with_docker_socket(proxy.path());
    d.wait_docker_connected(Duration::from_secs(5));
    let hp = free_port();
    let mapped = add(
        &d,
        &["docker", "add", &other.name, &format!("{}:80", free_port())],
    );
    // Docker now takes 3 s per request.
    proxy.set_request_delay(Duration::from_secs(3));
    let doc = d.dir().join("slow-apply.json");
    let rules = serde_json::json!({"schema_version": 1, "rules": [
        {"kind": "docker", "name": web.name, "host_port": free_port(), "container_port": 80}
    ]});
    std::fs::write(&doc, rules.to_string()).unwrap();
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            let t = Instant::now();
            let data = d.ok(&["docker", "add", &web.name, &format!("{hp}:80")]);
            (t.elapsed(), data)
        });
        // An `apply` document naming a container waits for Docker too
        // (a dry run: it still looks the container up).
        let slow_apply = s.spawn(|| {
            let t = Instant::now();
            let data = d.ok(&["apply", "--dry-run", doc.to_str().unwrap()]);
            (t.elapsed(), data)
        });
        // A container event makes the engine re-inspect too.
        docker_ok(&["restart", "-t", "1", &other.name]);
        std::thread::sleep(Duration::from_millis(300));
        for cmd in [&["ping"][..], &["ls"][..], &["status"][..]] {
            let t = Instant::now();
            let out = d.cli(cmd);
            let took = t.elapsed();
            report(&format!(
                "  {cmd:?} while Docker hangs: {} ms",
                took.as_millis()
            ));
            assert!(
                took < Duration::from_secs(1),
                "{cmd:?} waited {took:?} for a hanging Docker ({out:?})"
            );
        }
        let (took, data) = slow.join().unwrap();
        assert!(
            took >= Duration::from_secs(3),
            "the add did not wait for Docker: {took:?}"
        );
        assert_eq!(data["result"], "added", "{data}");
        let (took, plan) = slow_apply.join().unwrap();
        assert!(
            took >= Duration::from_secs(3),
            "the apply did not wait for Docker: {took:?}"
        );
        assert_eq!(plan["dry_run"], true, "{plan}");
        assert_eq!(plan["added"].as_array().map(Vec::len), Some(1), "{plan}");
    });
    proxy.set_request_delay(Duration::ZERO);
    let (rule, _) = d.wait_rule(
        mapped,
        Duration::from_secs(10),
        "re-pointed",
        |r: &Value| r["status"] == "active" && r["target_v4"]["ip"] == other.ip4().to_string(),
    );
    assert_eq!(rule["status"], "active");
}
