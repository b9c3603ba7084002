//! Fixtures for the auto-discover tests (issue 7): the host's Docker engine
//! exposed as a "remote" engine on a loopback TCP endpoint, a service node
//! joined to the root namespace, the daemon's config file, and helpers to
//! read auto mappings, wait for log lines and reload.
//!
//! ```text
//!  TcpDockerProxy: 127.0.0.1:<port> (root netns, or inside a test netns)
//!                  ──► /var/run/docker.sock (a path: reachable from any netns)
//!
//!  outside netns                 host (root netns)               service node netns
//!  eth0 203.0.113.2 ──veth── 203.0.113.1   natmap   198.18.0.1 ──veth── eth0 198.18.0.2
//! ```
//!
//! Like [`super::docker`], everything here is a guard that removes what it
//! created on drop, and every network operation has a bounded timeout.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::docker::*;
use super::*;

// ───────────────────────────── constants ─────────────────────────────

/// Root-namespace side of the link to [`ServiceNode`].
pub const NODE_LINK_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The service node's address (the remote engine's `host_ip`).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The label auto-discover reads by default.
pub const DEFAULT_LABEL: &str = "natmap.ports";
/// Auto mappings must appear within this long of the container starting.
pub const APPEAR_LIMIT: Duration = Duration::from_secs(2);

// ───────────────────────────── an unreachable engine ─────────────────────────────

/// A loopback TCP endpoint of the root namespace where nothing listens
/// (bound once to get a port, then closed): an unreachable engine.
pub fn closed_endpoint() -> String {
    let l = TcpListener::bind(sa(Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local_addr");
    drop(l);
    format!("tcp://{addr}")
}

// ───────────────────────────── service node ─────────────────────────────

/// A "service node" (the machine a remote engine's containers publish their
/// ports on): a namespace joined to the ROOT namespace by a veth pair. Root
/// side `nmt<pid>s<n>` with [`NODE_LINK_V4`]/24, namespace side `eth0` with
/// [`NODE_V4`]/24 and a default route via [`NODE_LINK_V4`]. Drop deletes
/// the link and the namespace.
pub struct ServiceNode {
    /// Root-namespace side of the veth pair.
    pub link: String,
    /// The node.
    pub ns: Netns,
}

impl ServiceNode {
    /// Creates the namespace and the link and waits until both ends are up.
    pub fn new() -> ServiceNode {
        static N: AtomicUsize = AtomicUsize::new(0);
        let link = format!(
            "nmt{}s{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        assert!(link.len() <= 15, "interface name too long: {link}");
        let node = ServiceNode {
            link,
            ns: Netns::new("node"),
        };
        let ip = |args: &[&str]| {
            let out = run_with_timeout(Command::new("ip").args(args), COMMAND_TIMEOUT);
            check_output(&format!("ip {}", args.join(" ")), &out);
        };
        ip(&[
            "link",
            "add",
            &node.link,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IF,
            "netns",
            &node.ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{NODE_LINK_V4}/24"),
            "dev",
            &node.link,
        ]);
        ip(&["link", "set", &node.link, "up"]);
        node.ns
            .ip(&["addr", "add", &format!("{NODE_V4}/24"), "dev", HOST_IF]);
        node.ns.ip(&["link", "set", HOST_IF, "up"]);
        node.ns.ip(&[
            "-4",
            "route",
            "add",
            "default",
            "via",
            &NODE_LINK_V4.to_string(),
        ]);
        wait_link_up(&node.ns, HOST_IF, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run_with_timeout(
                Command::new("ip").args(["-o", "link", "show", "dev", &node.link]),
                COMMAND_TIMEOUT,
            );
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("state UP") || text.contains("state UNKNOWN") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "link {} not up: {text}",
                node.link
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }
}

impl Default for ServiceNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ServiceNode {
    fn drop(&mut self) {
        match run_quiet(
            Command::new("ip").args(["link", "del", &self.link]),
            COMMAND_TIMEOUT,
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) => report(&format!(
                "harness: ip link del {} failed: {}",
                self.link,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => report(&format!("harness: ip link del {}: {e}", self.link)),
        }
    }
}

// ───────────────────────────── traffic ─────────────────────────────

/// Connects from `client` to a [`TcpEcho`] at `target` and returns its reply
/// line trimmed (`"<peer ip> <port>"`); bounded by `timeout`.
pub fn echo_line(client: &Client, target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let ctx = format!("tcp from {} to {target}", client.describe());
    client.run(move || {
        let deadline = Instant::now() + timeout;
        let mut s = TcpStream::connect_timeout(&target, timeout)
            .map_err(|e| format!("{ctx}: connect: {e}"))?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left))
            .map_err(|e| format!("{ctx}: {e}"))?;
        let mut reply = String::new();
        match s.read_to_string(&mut reply) {
            Ok(_) if !reply.is_empty() => Ok(reply.trim().to_string()),
            Ok(_) => Err(format!("{ctx}: closed without a reply")),
            Err(e) => Err(format!("{ctx}: read: {e} (got {reply:?})")),
        }
    })
}

/// Asserts that [`echo_line`] from `client` to `target` answers
/// `"<expected_peer> <expected_port>"`.
#[track_caller]
pub fn expect_echo(
    client: &Client,
    target: SocketAddr,
    expected_peer: impl Into<IpAddr>,
    expected_port: u16,
) {
    let want = echo_reply(expected_peer.into(), expected_port);
    match echo_line(client, target, PROBE_TIMEOUT) {
        Ok(got) if got == want => {}
        Ok(got) => panic!(
            "expect_echo: from {} to {target}: the echo server answered {got:?}, expected \
             {want:?} (\"<client address it saw> <port it was reached on>\")",
            client.describe()
        ),
        Err(e) => panic!("expect_echo: expected {want:?}, but {e}"),
    }
}

/// Polls `GET /` from `client` to `target` every 50 ms until it returns
/// `want`; panics if it returns `forbidden` (a stale target) or nothing
/// within `limit`. Returns how long it took.
#[track_caller]
pub fn poll_web_until(
    client: &Client,
    target: SocketAddr,
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

// ───────────────────────────── containers ─────────────────────────────

/// A web container (see [`Container::web`]) run with `--label
/// <label>=<value>` and `-p` for each of `publish` (`"HOST:CONTAINER"`).
/// Returns right after `docker run -d` (the container has started), not
/// waiting for its servers, so the caller can time from that moment.
pub fn labeled_web(
    role: &str,
    marker: &str,
    label: &str,
    value: &str,
    publish: &[String],
) -> Container {
    let label_arg = format!("{label}={value}");
    let mut args: Vec<&str> = vec!["--label", &label_arg];
    for p in publish {
        args.push("-p");
        args.push(p);
    }
    Container::spawn_web(&unique_name(role), marker, &[], &args)
}

/// The host port Docker publishes for `container_port/tcp` of `name`
/// (`docker port`), e.g. to cross-check `-p`.
pub fn published_port(name: &str, container_port: u16) -> Option<u16> {
    let out = docker(&["port", name, &format!("{container_port}/tcp")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit(':').next()?.trim().parse().ok())
        .next()
}

// ───────────────────────────── config file ─────────────────────────────

/// One `[[auto_discover.engines]]` entry.
#[derive(Debug, Clone)]
pub struct EngineCfg {
    /// `name`.
    pub name: String,
    /// `endpoint`.
    pub endpoint: String,
    /// `host_ip` (a remote engine), if any.
    pub host_ip: Option<String>,
}

impl EngineCfg {
    /// The local engine at the real Docker socket.
    pub fn local() -> EngineCfg {
        EngineCfg {
            name: "local".into(),
            endpoint: format!("unix://{DOCKER_SOCKET}"),
            host_ip: None,
        }
    }

    /// A remote engine at `endpoint` whose containers publish on `host_ip`.
    pub fn remote(name: &str, endpoint: &str, host_ip: impl ToString) -> EngineCfg {
        EngineCfg {
            name: name.into(),
            endpoint: endpoint.into(),
            host_ip: Some(host_ip.to_string()),
        }
    }
}

/// The text of a config file with `[auto_discover]` `enabled`,
/// `preserve_src_ip` and the given engines (none listed: the default local
/// engine). The label is left at its default.
pub fn auto_config(enabled: bool, preserve_src_ip: bool, engines: &[EngineCfg]) -> String {
    let mut text = format!(
        "# natmap test config\n[auto_discover]\nenabled = {enabled}\npreserve_src_ip = {preserve_src_ip}\n"
    );
    for e in engines {
        text.push_str(&format!(
            "\n[[auto_discover.engines]]\nname = \"{}\"\nendpoint = \"{}\"\n",
            e.name, e.endpoint
        ));
        if let Some(ip) = &e.host_ip {
            text.push_str(&format!("host_ip = \"{ip}\"\n"));
        }
    }
    text
}

/// A config file the test rewrites (atomically: temp file + rename, so a
/// reload never reads half a file). Kept in its own temporary directory.
pub struct ConfigFile {
    dir: tempfile::TempDir,
}

impl ConfigFile {
    /// A new file holding `text`.
    pub fn new(text: &str) -> ConfigFile {
        let dir = tempfile::Builder::new()
            .prefix("natmap-test-config-")
            .tempdir()
            .expect("tempdir");
        let c = ConfigFile { dir };
        c.write(text);
        c
    }

    /// `DIR/config.toml`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The path as a string, for `--config`.
    pub fn arg(&self) -> String {
        self.path().display().to_string()
    }

    /// Replaces the file's content.
    pub fn write(&self, text: &str) {
        let tmp = self.dir.path().join("config.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.path()).expect("rename config");
    }
}

// ───────────────────────────── talking to the daemon ─────────────────────────────

/// Runs the CLI with `--json`, asserts exit 0 and `"ok": true`, returns `data`.
#[track_caller]
pub fn ok_data(d: &Daemon, args: &[&str]) -> Value {
    let (status, v) = d.cli_json_output(args);
    if !status.success() || v["ok"] != true {
        panic!(
            "lab-ops natmap --json {}: expected success, got {status}: {v}\n--- daemon log (tail) ---\n{}",
            args.join(" "),
            log_tail(&d.log(), 40)
        );
    }
    v["data"].clone()
}

/// `status --json` `data`: exit 0 (all well) or 4 (problems listed) with
/// `"ok": true`; anything else panics.
#[track_caller]
pub fn status_data(d: &Daemon) -> Value {
    let (status, v) = d.cli_json_output(&["status"]);
    if !matches!(status.code(), Some(0) | Some(4)) || v["ok"] != true {
        panic!(
            "lab-ops natmap --json status: expected exit 0 or 4 with ok, got {status}: {v}\n--- daemon log (tail) ---\n{}",
            log_tail(&d.log(), 40)
        );
    }
    v["data"].clone()
}

/// `ls --json` rules.
#[track_caller]
pub fn ls_rules(d: &Daemon) -> Vec<Value> {
    let data = ok_data(d, &["ls"]);
    data["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("ls: no rules array: {data}"))
        .clone()
}

/// The rules of `ls` that are auto mappings (carry an `auto` object).
#[track_caller]
pub fn auto_rules(d: &Daemon) -> Vec<Value> {
    ls_rules(d)
        .into_iter()
        .filter(|r| r["auto"].is_object())
        .collect()
}

/// The rules of `ls` on host port `port`/`proto`, auto or not.
#[track_caller]
pub fn rules_on_port(d: &Daemon, port: u16, proto: &str) -> Vec<Value> {
    ls_rules(d)
        .into_iter()
        .filter(|r| r["host_port"] == port && r["proto"] == proto)
        .collect()
}

/// The auto mapping on host port `port`/`proto`, if any (panics if there
/// are several).
#[track_caller]
pub fn auto_rule_on(d: &Daemon, port: u16, proto: &str) -> Option<Value> {
    let mut found: Vec<Value> = auto_rules(d)
        .into_iter()
        .filter(|r| r["host_port"] == port && r["proto"] == proto)
        .collect();
    assert!(
        found.len() <= 1,
        "several auto mappings on {port}/{proto}: {found:#?}"
    );
    found.pop()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `timeout`;
/// returns the value and the time it took, or panics naming `what` with the
/// last value `f` described and the daemon log's tail.
#[track_caller]
pub fn wait_until<T>(
    d: &Daemon,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(v) => return (v, start.elapsed()),
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            panic!(
                "{what}: not within {timeout:?}; last: {last}\n--- daemon log (tail) ---\n{}",
                log_tail(&d.log(), 60)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `ls` shows an auto mapping on `port`/`proto` that satisfies
/// `pred`; returns it and the time it took.
#[track_caller]
pub fn wait_auto(
    d: &Daemon,
    port: u16,
    proto: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    wait_until(
        d,
        &format!("auto mapping on {port}/{proto} {what}"),
        timeout,
        || match auto_rule_on(d, port, proto) {
            Some(r) if pred(&r) => Ok(r),
            Some(r) => Err(format!("{r}")),
            None => Err("no auto mapping on that port".into()),
        },
    )
}

/// Waits until no auto mapping is listed on `port`/`proto`.
#[track_caller]
pub fn wait_auto_gone(d: &Daemon, port: u16, proto: &str, timeout: Duration) -> Duration {
    wait_until(
        d,
        &format!("auto mapping on {port}/{proto} to disappear"),
        timeout,
        || match auto_rule_on(d, port, proto) {
            Some(r) => Err(format!("still listed: {r}")),
            None => Ok(()),
        },
    )
    .1
}

/// Sends SIGHUP to the daemon.
pub fn sighup(d: &Daemon) {
    let pid = d.pid().expect("daemon running");
    d.note(&format!("SIGHUP to daemon pid {pid}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("kill -HUP");
}

// ───────────────────────────── the daemon log ─────────────────────────────

/// A position in the daemon log: lines logged afterwards are "new".
#[derive(Debug, Clone, Copy)]
pub struct LogMark(usize);

/// The current end of the daemon log.
pub fn log_mark(d: &Daemon) -> LogMark {
    LogMark(d.log().len())
}

/// The log lines written after `mark` (harness lines excluded).
pub fn log_since(d: &Daemon, mark: LogMark) -> Vec<String> {
    let log = d.log();
    log.get(mark.0..)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.starts_with("=== harness:"))
        .map(str::to_string)
        .collect()
}

/// True if the line was logged at WARN or ERROR (tracing's fmt layout).
pub fn is_warn_or_error(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let (a, b) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    ["WARN", "ERROR"].contains(&a) || ["WARN", "ERROR"].contains(&b)
}

/// Waits until a WARN/ERROR line logged after `mark` contains every one of
/// `needles` (case-insensitive); returns it.
#[track_caller]
pub fn wait_warn(d: &Daemon, mark: LogMark, needles: &[&str], timeout: Duration) -> String {
    let lower: Vec<String> = needles.iter().map(|n| n.to_lowercase()).collect();
    wait_until(
        d,
        &format!("a WARN/ERROR log line containing {needles:?}"),
        timeout,
        || {
            log_since(d, mark)
                .into_iter()
                .find(|l| {
                    let ll = l.to_lowercase();
                    is_warn_or_error(l) && lower.iter().all(|n| ll.contains(n.as_str()))
                })
                .ok_or_else(|| "no such line yet".to_string())
        },
    )
    .0
}

// ───────────────────────────── iptables ─────────────────────────────

/// `iptables -S` lines of `table`/`chain`, in `ns` or (None) the root
/// namespace; empty if the chain does not exist.
pub fn chain_in(ns: Option<&Netns>, table: &str, chain: &str) -> Vec<String> {
    match ns {
        None => root_chain(false, table, chain),
        Some(ns) => try_iptables_rules(ns, false, table, chain).unwrap_or_default(),
    }
}

/// The lines of `table`/`chain` carrying mapping `id`'s comment.
pub fn lines_of(ns: Option<&Netns>, table: &str, chain: &str, id: u64) -> Vec<String> {
    let tag = format!("\"natmap:docker:{id}\"");
    chain_in(ns, table, chain)
        .into_iter()
        .filter(|l| l.starts_with("-A ") && l.contains(&tag))
        .collect()
}

/// Every natmap line (all four chains) carrying mapping `id`'s comment.
pub fn all_lines_of(ns: Option<&Netns>, id: u64) -> Vec<String> {
    NATMAP_CHAINS
        .iter()
        .flat_map(|(table, chain)| {
            lines_of(ns, table, chain, id)
                .into_iter()
                .map(move |l| format!("{table} {l}"))
        })
        .collect()
}

/// The DNAT lines of mapping `id` in nat `NATMAP`.
pub fn dnat_lines_of(ns: Option<&Netns>, id: u64) -> Vec<String> {
    lines_of(ns, "nat", "NATMAP", id)
        .into_iter()
        .filter(|l| l.contains("-j DNAT"))
        .collect()
}

/// The numeric id of a rule object.
#[track_caller]
pub fn rule_id(rule: &Value) -> u64 {
    rule["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("rule without numeric id: {rule}"))
}

// ───────────────────────────── a daemon that must refuse to start ─────────────────────────────

/// What a daemon start that should fail did.
#[derive(Debug)]
pub struct FailedStart {
    /// Exit status.
    pub status: ExitStatus,
    /// stdout and stderr, concatenated.
    pub output: String,
    /// How long until it exited.
    pub took: Duration,
}

/// Runs `lab-ops -vv natmap daemon --state … --socket … --socket-group root
/// extra…` in `ns` (on a fresh state dir) and expects it to exit by itself
/// within `limit`. `Err` (with the output so far) if it is still running
/// then: it is killed, and the test learns that it accepted its input.
pub fn daemon_must_exit(
    ns: &Netns,
    extra: &[&str],
    limit: Duration,
) -> Result<FailedStart, String> {
    let dir = StateDir::new();
    let out_path = dir.path().join("out.log");
    let out = File::create(&out_path).expect("create out.log");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            LAB_OPS_BIN,
            "-vv",
            "natmap",
            "daemon",
        ])
        .arg("--state")
        .arg(dir.state_path())
        .arg("--socket")
        .arg(dir.socket_path())
        .args(["--socket-group", "root"])
        .args(["--docker-socket", "/nonexistent/natmap-test-no-docker.sock"])
        .args(extra)
        .args(backend_args(extra))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone fd"))
        .stderr(out)
        .spawn()
        .expect("spawn daemon");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Ok(FailedStart {
                status,
                output: std::fs::read_to_string(&out_path).unwrap_or_default(),
                took: start.elapsed(),
            });
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the daemon was still running {limit:?} after start (killed)\n--- output ---\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
