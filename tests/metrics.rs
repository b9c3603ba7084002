//! `--metrics-listen`: the real daemon in a router namespace serves
//! Prometheus metrics on the namespace's own loopback; real TCP traffic
//! through a real DNAT moves the counters, and the test scrapes them with a
//! plain HTTP request from inside the namespace.

pub mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::auto_discover::{daemon_must_exit, ConfigFile};
use common::*;

/// The scrape address inside the router namespace (its own loopback, so
/// every test can use the same port).
const METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9477);

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A daemon that does not talk to the host's Docker, with `extra` args.
fn daemon(ns: &Netns, extra: &[&str]) -> Daemon {
    let mut opts = DaemonOptions::isolated();
    opts.extra_args.extend(extra.iter().map(Into::into));
    Daemon::start_with_options(ns, &StateDir::new(), opts)
}

/// An HTTP answer: status code, headers (lowercase names), body.
struct Answer {
    code: u16,
    headers: String,
    body: String,
}

/// Sends `request` raw to `addr` from inside `ns`, reads the answer to the
/// end (the server closes), within 10 s.
fn http_raw(ns: &Netns, addr: SocketAddr, request: &[u8]) -> Result<Answer, String> {
    let mut stream = in_netns(ns, || TcpStream::connect_timeout(&addr, PROBE_TIMEOUT))
        .map_err(|e| format!("connect {addr} in {}: {e}", ns.name))?;
    let timeout = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request)
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("answer is not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {text:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(Answer {
        code,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

/// `GET /metrics`, expected to answer 200; returns the body.
#[track_caller]
fn scrape(ns: &Netns, addr: SocketAddr) -> String {
    let a = http_raw(ns, addr, b"GET /metrics HTTP/1.1\r\nHost: natmap\r\n\r\n")
        .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    assert_eq!(a.code, 200, "{}\n{}", a.headers, a.body);
    assert!(
        a.headers
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        a.headers
    );
    a.body
}

/// The value of the sample whose name-and-labels part is exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .and_then(|(_, v)| v.parse().ok())
}

#[track_caller]
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

fn add_dnat(d: &Daemon, port: &str) {
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", port));
}

const RULE_1: &str = r#"{id="1",kind="dnat",ext="192.0.2.1:8080/tcp",target="198.51.100.2:8080"}"#;

#[test]
fn scrape_shows_a_dnat_rules_traffic_statuses_docker_and_request_latency() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(&topo.server, v4(SERVER_V4, 8080));
    let d = daemon(&topo.router, &["--metrics-listen", "127.0.0.1:9477"]);
    add_dnat(&d, "8080");
    for _ in 0..3 {
        expect_tcp(&topo.client, v4(ROUTER_EXT_V4, 8080), CLIENT_V4, 8080);
    }
    let text = scrape(&topo.router, METRICS);

    let packets = value(&text, &format!("natmap_rule_packets_total{RULE_1}"));
    let bytes = value(&text, &format!("natmap_rule_bytes_total{RULE_1}"));
    // Three handshakes, replies and closes: well over 3 packets each way.
    assert!(packets >= 18.0, "{packets}\n{text}");
    assert!(bytes > packets * 40.0, "{bytes}\n{text}");
    // One nat-table hit per connection.
    assert_eq!(
        value(
            &text,
            &format!("natmap_rule_connections_opened_total{RULE_1}")
        ),
        3.0
    );
    assert_eq!(value(&text, r#"natmap_rules{status="active"}"#), 1.0);
    assert_eq!(value(&text, r#"natmap_rules{status="port_conflict"}"#), 0.0);
    // --docker-socket points nowhere.
    assert_eq!(value(&text, "natmap_docker_reachable"), 0.0);
    assert_eq!(value(&text, "natmap_repairs_total"), 0.0);
    assert!(
        !text.contains("natmap_last_repair_timestamp_seconds "),
        "{text}"
    );
    // The `dnat` request above went through the control socket.
    assert_eq!(
        value(
            &text,
            r#"natmap_request_duration_seconds_count{command="dnat"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"natmap_request_duration_seconds_bucket{command="dnat",le="+Inf"}"#
        ),
        1.0
    );
    assert!(
        text.contains("# TYPE natmap_request_duration_seconds histogram"),
        "{text}"
    );
    d.assert_clean_log();
}

#[test]
fn the_connections_gauge_follows_open_connections_and_repairs_are_counted() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let server = in_netns(&topo.server, || TcpListener::bind(v4(SERVER_V4, 8080))).unwrap();
    let d = daemon(&topo.router, &["--metrics-listen", "127.0.0.1:9477"]);
    add_dnat(&d, "8080");
    let gauge = format!("natmap_rule_connections{RULE_1}");

    let client = in_netns(&topo.client, || {
        TcpStream::connect_timeout(&v4(ROUTER_EXT_V4, 8080), PROBE_TIMEOUT)
    })
    .expect("connect through the dnat");
    let (accepted, _) = server.accept().unwrap();
    assert_eq!(value(&scrape(&topo.router, METRICS), &gauge), 1.0);

    // Closed on both sides: TIME_WAIT is no longer a current connection.
    drop(client);
    drop(accepted);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = value(&scrape(&topo.router, METRICS), &gauge);
        if now == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "still {now} open connections");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Someone flushes natmap's chain: the repair shows in the metrics.
    flush_natmap_dnat(&topo.router, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&topo.router, METRICS);
        if sample(&text, "natmap_repairs_total") == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no repair counted:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let at = value(&text, "natmap_last_repair_timestamp_seconds");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 30.0..=now + 1.0).contains(&at), "{at} vs now {now}");
    // Every metric exported now: the shipped dashboard asks for no other.
    dashboard_queries_only(&text);
    d.assert_clean_log_except(&["repaired"]);
}

/// Every `natmap_…` name in packaging/grafana/natmap.json's queries has
/// samples in `scrape`, and every panel takes the data source variable.
fn dashboard_queries_only(scrape: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/grafana/natmap.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for panel in panels {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
    }
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    let mut names: Vec<&str> = queries
        .iter()
        .flat_map(|q| q.match_indices("natmap_").map(|(at, _)| &q[at..]))
        .map(|tail| {
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            &tail[..end]
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let exported = scrape.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        });
        assert!(exported, "the dashboard queries {name}, not in\n{scrape}");
    }
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, out)),
        _ => {}
    }
}

#[test]
fn anything_but_get_metrics_is_refused() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = daemon(&topo.router, &["--metrics-listen", "127.0.0.1:9477"]);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let cases: [(&[u8], u16); 5] = [
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /state.json HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"hello\r\n\r\n", 400),
        (huge.as_bytes(), 431),
    ];
    for (request, code) in cases {
        let a = http_raw(&topo.router, METRICS, request).unwrap();
        assert_eq!(
            a.code,
            code,
            "{:?}: {}\n{}",
            String::from_utf8_lossy(&request[..request.len().min(40)]),
            a.headers,
            a.body
        );
        assert!(!a.body.contains("natmap_"), "{}", a.body);
    }
    // A client that says nothing is cut off; the server keeps serving.
    let silent = in_netns(&topo.router, || TcpStream::connect(METRICS)).unwrap();
    scrape(&topo.router, METRICS);
    drop(silent);
    d.assert_clean_log();
}

#[test]
fn a_bad_metrics_address_stops_the_start_before_any_rule_is_installed() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let config = ConfigFile::new("metrics_listen = \"9477\"\n");
    let config_arg = config.arg();
    let not_local = format!("{ROUTER_INT_V4}9:9477");
    let cases: [(Vec<&str>, &[&str]); 4] = [
        (
            vec!["--metrics-listen", "localhost:9477"],
            &["--metrics-listen", "ADDR:PORT", "localhost:9477"],
        ),
        (
            vec!["--metrics-listen", "127.0.0.1:0"],
            &["--metrics-listen", "port 1-65535"],
        ),
        (
            vec!["--config", &config_arg],
            &["metrics_listen", "ADDR:PORT", "line 1"],
        ),
        // Parses, but is not an address of this host.
        (
            vec!["--metrics-listen", &not_local],
            &["--metrics-listen", "cannot listen there"],
        ),
    ];
    for (args, needles) in cases {
        let failed = daemon_must_exit(&topo.router, &args, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(!failed.status.success(), "{args:?}: {}", failed.output);
        for needle in needles {
            assert!(
                failed.output.contains(needle),
                "{args:?}: no {needle:?} in\n{}",
                failed.output
            );
        }
        assert!(
            !chain_exists(&topo.router, false, "nat", "NATMAP"),
            "{args:?} left natmap's chains behind"
        );
        let left = natmap_left_behind(&topo.router);
        assert!(left.is_empty(), "{args:?} left behind: {left:?}");
    }
}

#[test]
fn metrics_are_off_by_default_and_the_flag_wins_over_the_config() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    {
        let d = daemon(&topo.router, &[]);
        d.cli_ok(&["ping"]);
        let listening = topo.router.run_ok(&["ss", "-Hltn"]);
        assert_eq!(listening.trim(), "", "something listens: {listening}");
        d.assert_clean_log();
    }
    let config = ConfigFile::new(&format!("metrics_listen = \"{ROUTER_EXT_V4}:9478\"\n"));
    {
        // From the config alone, on a non-loopback address: served, with a WARN.
        let d = daemon(&topo.router, &["--config", &config.arg()]);
        scrape(&topo.router, v4(ROUTER_EXT_V4, 9478));
        d.assert_clean_log_except(&["not a loopback address"]);
        assert!(
            d.log().contains("not a loopback address"),
            "no warning about {ROUTER_EXT_V4}:9478:\n{}",
            d.log()
        );
    }
    let d = daemon(
        &topo.router,
        &[
            "--config",
            &config.arg(),
            "--metrics-listen",
            "127.0.0.1:9477",
        ],
    );
    scrape(&topo.router, METRICS);
    let refused = http_raw(
        &topo.router,
        v4(ROUTER_EXT_V4, 9478),
        b"GET /metrics HTTP/1.1\r\n\r\n",
    );
    assert!(refused.is_err(), "the config's address answers too");
    d.assert_clean_log();
}

#[test]
fn a_dry_run_start_says_it_would_serve_metrics_and_serves_nothing() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let dir = StateDir::new();
    let state = dir.state_path().display().to_string();
    let out = topo.router.exec(&[
        LAB_OPS_BIN,
        "natmap",
        "--dry-run",
        "daemon",
        "--state",
        &state,
        "--metrics-listen",
        "127.0.0.1:9477",
        backend_flag()[0],
        backend_flag()[1],
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("serve Prometheus metrics at http://127.0.0.1:9477/metrics"),
        "{text}"
    );
    assert_eq!(topo.router.run_ok(&["ss", "-Hltn"]).trim(), "");
}
