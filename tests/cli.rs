//! The command line as operators meet it, through the real binary against a
//! real daemon in a namespace: global flags, closed pipes, one spelling in
//! text and JSON, `--dry-run` everywhere, the boot fragment and its
//! netfilter-persistent plugin, and what natmap leaves behind when it stops.

pub mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn v4(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `lab-ops ARGS…` in `ns`, exactly as typed (global flags wherever the
/// caller puts them); `SOCK` in `args` is replaced by the daemon's socket.
fn lab_ops(ns: &Netns, d: &Daemon, args: &[&str]) -> Output {
    let socket = d.socket_path();
    let mut argv: Vec<String> = vec![LAB_OPS_BIN.into()];
    argv.extend(args.iter().map(|a| match *a {
        "SOCK" => socket.display().to_string(),
        other => other.to_owned(),
    }));
    ns.exec(&argv)
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n--- stderr ---\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn dnat(d: &Daemon, port: &str) -> serde_json::Value {
    d.cli_json(&dnat_args("192.0.2.1", "198.51.100.2", port))
}

/// The plugin shipped for netfilter-persistent.
fn plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/netfilter-persistent/25-natmap")
}

/// Runs the plugin's `action` in `ns` with its fragments in `dir`; no
/// daemon answers on the socket it is given.
fn run_plugin(ns: &Netns, dir: &Path, action: &str) -> Output {
    ns.exec(&[
        "env".to_owned(),
        format!("NATMAP_RULES_DIR={}", dir.display()),
        format!("NATMAP_SOCKET={}", dir.join("no-daemon.sock").display()),
        format!("LAB_OPS={LAB_OPS_BIN}"),
        "sh".to_owned(),
        plugin().display().to_string(),
        action.to_owned(),
    ])
}

/// `iptables-save` without counters and comments: what two states of the
/// tables are compared by.
fn tables(ns: &Netns) -> String {
    iptables_save(ns, false)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_closed_stdout_ends_the_client_quietly() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    for port in ["25", "26", "27"] {
        dnat(&d, port);
    }
    // A pipe whose reader is gone: the first write fails with EPIPE, as in
    // `lab-ops natmap ls | head -1` once head has exited.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, LAB_OPS_BIN, "natmap", "--socket"])
        .arg(d.socket_path())
        .arg("ls")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.trim().is_empty(), "a quiet end: {stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "exit 0 or SIGPIPE (141 in a shell), not {}",
        out.status
    );
    d.assert_clean_log();
}

#[test]
fn global_flags_mean_the_same_before_and_after_natmap_and_the_command() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    for args in [
        &["--json", "natmap", "--socket", "SOCK", "ping"][..],
        &["natmap", "--json", "--socket", "SOCK", "ping"],
        &["natmap", "ping", "--socket", "SOCK", "--json"],
    ] {
        let out = lab_ops(&ns, &d, args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(
            json_of(&out)["data"]["daemon_version"],
            env!("CARGO_PKG_VERSION")
        );
    }
    // -vv: the client logs the request and its timing; -vvv the protocol lines.
    let quiet = lab_ops(&ns, &d, &["natmap", "--socket", "SOCK", "ping"]);
    assert!(text(&quiet.stderr).is_empty(), "{quiet:?}");
    let vv = text(&lab_ops(&ns, &d, &["-vv", "natmap", "--socket", "SOCK", "ping"]).stderr);
    assert!(
        vv.contains("answer received") && !vv.contains("sent:"),
        "{vv}"
    );
    let vvv = text(&lab_ops(&ns, &d, &["natmap", "--socket", "SOCK", "ping", "-vvv"]).stderr);
    assert!(
        vvv.contains(r#"sent: {"version":1,"request":{"cmd":"ping"}}"#),
        "{vvv}"
    );
    assert!(vvv.contains("received: {"), "{vvv}");

    // Global options are listed apart from the command's own.
    let help = text(&lab_ops(&ns, &d, &["natmap", "dnat", "--help"]).stdout);
    let heading = help
        .find("Global options:")
        .expect("a Global options heading");
    assert!(help.find("--ext-ip").unwrap() < heading, "{help}");
    for flag in ["--json", "--dry-run", "--socket", "--color", "--verbose"] {
        assert!(help[heading..].contains(flag), "{flag}: {help}");
    }
    d.assert_clean_log();
}

#[test]
fn install_uninstall_and_daemon_answer_json_under_json() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/group"), "root:x:0:\n").unwrap();
    let root_arg = root.path().to_str().unwrap();
    let out = lab_ops(
        &ns,
        &d,
        &[
            "--json",
            "natmap",
            "install",
            "--dry-run",
            "--root",
            root_arg,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let plan = json_of(&out);
    assert_eq!(plan["ok"], true, "{plan}");
    assert_eq!(plan["data"]["dry_run"], true, "{plan}");
    let changes = plan["data"]["changed"].as_array().unwrap().len();
    assert!(changes >= 3, "binary, group, unit: {plan}");
    assert_eq!(plan["data"]["changes"], changes, "{plan}");
    assert!(plan["data"]["files"][0]["content"]
        .as_str()
        .unwrap()
        .contains("[Service]"));
    assert!(
        !root.path().join("usr").exists(),
        "a dry run writes nothing"
    );
    let out = lab_ops(
        &ns,
        &d,
        &["natmap", "uninstall", "--root", root_arg, "--json"],
    );
    assert_eq!(json_of(&out)["data"]["command"], "uninstall", "{out:?}");

    // A daemon that cannot start says why, as JSON.
    let other = StateDir::new();
    let state = other.state_path();
    let out = lab_ops(
        &ns,
        &d,
        &[
            "natmap",
            "--json",
            "--socket",
            "SOCK",
            "daemon",
            "--state",
            state.to_str().unwrap(),
            backend_flag()[0],
            backend_flag()[1],
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = json_of(&out);
    assert_eq!(err["error"]["code"], "daemon_failed", "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another natmap daemon"));
    d.assert_clean_log();
}

#[test]
fn dry_run_changes_nothing_for_every_command_and_says_so() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    dnat(&d, "25");
    let rules = natmap_installed(&ns, false);
    let state = std::fs::read(d.state_path()).unwrap();

    // Commands that only read run as usual.
    for cmd in ["ls", "status", "ping", "export"] {
        let (status, v) = d.cli_json_output(&["--dry-run", cmd]);
        // status exits 4 here: ip_forward is off in this namespace.
        assert!(matches!(status.code(), Some(0 | 4)), "{cmd}: {v}");
        assert_eq!(v["data"]["dry_run"], true, "{cmd}: {v}");
    }
    // A change: the plan, marked as one; an add of a present rule too.
    let plan = d.cli_json(&[
        "dnat",
        "--dry-run",
        "--ext-ip",
        "192.0.2.1",
        "--int-ip",
        "198.51.100.2",
        "--ports",
        "26",
    ]);
    assert_eq!(plan["data"]["dry_run"], true, "{plan}");
    assert!(plan["data"]["transactions"].is_array(), "{plan}");
    let same = d.cli_json(&[
        "--dry-run",
        "dnat",
        "--ext-ip",
        "192.0.2.1",
        "--int-ip",
        "198.51.100.2",
        "--ports",
        "25",
    ]);
    assert_eq!(same["data"]["result"], "already_present", "{same}");
    assert_eq!(same["data"]["dry_run"], true, "{same}");

    // save --dry-run --export: names the files and writes none.
    let file = d.dir().join("boot/natmap.rules");
    let save = d.cli_json(&["save", "--dry-run", "--export", file.to_str().unwrap()]);
    assert_eq!(save["data"]["dry_run"], true, "{save}");
    assert_eq!(
        save["data"]["exported"][0],
        file.display().to_string(),
        "{save}"
    );
    assert!(!file.exists() && !d.dir().join("boot").exists());

    // daemon --dry-run: the start plan, and no daemon, socket or rule.
    let fresh = bare_router();
    let dir = StateDir::new();
    std::fs::copy(d.state_path(), dir.state_path()).unwrap();
    let out = fresh.exec(&[
        LAB_OPS_BIN,
        "natmap",
        "--dry-run",
        "--socket",
        dir.socket_path().to_str().unwrap(),
        "daemon",
        "--state",
        dir.state_path().to_str().unwrap(),
        backend_flag()[0],
        backend_flag()[1],
    ]);
    assert!(out.status.success(), "{out:?}");
    let shown = text(&out.stdout);
    assert!(shown.contains("dry run: nothing was changed"), "{shown}");
    if testing_nftables() {
        // Port 25: an element of dnat_port in the table `nft -f -` would load.
        assert!(shown.contains("would run `nft -f -`"), "{shown}");
        assert!(
            shown.contains("192.0.2.1 . tcp . 25 : 198.51.100.2"),
            "{shown}"
        );
    } else {
        // Port 25: the DNAT line is in the shard of tcp block 0.
        assert!(shown.contains("-A NATMAP-T0 -d 192.0.2.1/32"), "{shown}");
    }
    assert!(natmap_installed(&fresh, false).is_empty());
    assert!(!dir.socket_path().exists());

    assert_eq!(natmap_installed(&ns, false), rules, "no rule changed");
    assert_eq!(
        std::fs::read(d.state_path()).unwrap(),
        state,
        "nor the state"
    );
    d.assert_clean_log();
}

#[test]
fn text_and_json_each_use_one_spelling() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    // A connected network for the policy route's gateway.
    ns.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]);
    ns.ip(&["link", "set", "lan1", "up"]);
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "lan0"]);
    ns.ip(&["link", "set", "lan0", "up"]);
    let mut d = Daemon::start(&ns);
    dnat(&d, "8080");
    // The command's name in text; the protocol's kind in JSON.
    let added = d.cli_ok(&[
        "policy-route",
        "--src-ip",
        "198.51.100.2",
        "--via",
        "198.51.100.254",
        "--table",
        "100",
    ]);
    assert!(added.starts_with("added policy-route rule #2"), "{added}");
    assert!(d.cli_ok(&["ls"]).contains("policy-route"));
    assert_eq!(
        d.cli_json(&["ls", "2"])["data"]["rules"][0]["kind"],
        "policy_route"
    );

    // A rule whose port another process holds: "port conflict" in text.
    d.kill9();
    let squatter = in_netns(&ns, || {
        std::net::TcpListener::bind(v4(ROUTER_EXT_V4, 8080)).unwrap()
    });
    d.respawn();
    let ls = d.cli_ok(&["ls"]);
    let status = text(&d.cli(&["status"]).stdout);
    for shown in [&ls, &status] {
        assert!(shown.contains("port conflict"), "{shown}");
        assert!(!shown.contains("port_conflict"), "{shown}");
    }
    let json = d.cli_json(&["status"]);
    assert_eq!(json["data"]["rules"]["dnat"]["port_conflict"], 1, "{json}");
    drop(squatter);

    // save: a count is a count, results go to stdout.
    let save = d.cli_json(&["save"]);
    assert_eq!(save["data"]["rule_count"], 2, "{save}");
    assert!(save["data"].get("rules").is_none(), "{save}");
    let file = d.dir().join("natmap.rules");
    let out = d.cli(&["save", "--export", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stderr).is_empty(), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("saved 2 rule(s)"), "{stdout}");
    assert!(
        stdout.contains(&format!("wrote {}", file.display())),
        "{stdout}"
    );
    d.assert_clean_log_except(&["rule skipped"]);
}

#[test]
fn docker_rm_by_id_refuses_a_rule_that_is_not_a_docker_mapping() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    dnat(&d, "25");
    let rules = natmap_installed(&ns, false);
    let (status, v) = d.cli_json_output(&["docker", "rm", "--id", "1"]);
    assert_eq!(status.code(), Some(1), "{v}");
    assert_eq!(v["error"]["code"], "invalid_argument", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("rule #1 is a dnat rule") && message.contains("dnat … --delete"),
        "{message}"
    );
    assert_eq!(natmap_installed(&ns, false), rules, "nothing removed");
    assert_eq!(
        d.cli_json(&["ls"])["data"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    d.assert_clean_log();
}

/// Docker's chains as a Docker engine creates them when it starts.
fn start_docker_shaped_chains(ns: &Netns) {
    for args in [
        &["-N", "DOCKER-USER"][..],
        &["-A", "DOCKER-USER", "-j", "RETURN"],
        &["-N", "DOCKER-FORWARD"],
        &["-I", "FORWARD", "1", "-j", "DOCKER-USER"],
        &["-A", "FORWARD", "-j", "DOCKER-FORWARD"],
        &["-t", "nat", "-N", "DOCKER"],
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
        iptables(ns, false, args);
    }
}

fn docker_lines(ns: &Netns) -> Vec<String> {
    iptables_save(ns, false)
        .lines()
        .filter(|l| l.contains("DOCKER") && !l.contains("NATMAP"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_boot_fragment_restored_twice_changes_nothing_with_and_without_docker() {
    if !privileged()
        || !iptables_only(
            "the netfilter-persistent plugin restores iptables-restore fragments \
             (nftables' save --export is an nft -f fragment: tests/nftables.rs)",
        )
    {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25,465"));
    let dir = d.dir().join("etc");
    d.cli_ok(&[
        "save",
        "--export",
        dir.join("natmap.rules").to_str().unwrap(),
    ]);
    let fragment = dir.join("natmap.rules");
    let expected = natmap_installed(&topo.router, false);

    // The fragment alone, restored twice: the same tables as once.
    let bare = bare_router();
    bare.run_ok(&["iptables-restore", "--noflush", fragment.to_str().unwrap()]);
    let once = tables(&bare);
    bare.run_ok(&["iptables-restore", "--noflush", fragment.to_str().unwrap()]);
    assert_eq!(tables(&bare), once);

    // Boot without Docker: the plugin, twice; one jump per hook; traffic.
    let plain = Topology::new();
    let _smtp = TcpEcho::start(&plain.server, v4(SERVER_V4, 25));
    for _ in 0..2 {
        let out = run_plugin(&plain.router, &dir, "start");
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(natmap_installed(&plain.router, false), expected);
    let save = iptables_save(&plain.router, false);
    for jump in [
        "-A PREROUTING -j NATMAP",
        "-A OUTPUT -j NATMAP-OUTPUT",
        "-A POSTROUTING -j NATMAP-POSTROUTING",
        "-A FORWARD -j NATMAP",
    ] {
        assert_eq!(
            save.lines().filter(|l| *l == jump).count(),
            1,
            "{jump}:\n{save}"
        );
    }
    expect_tcp(&plain.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);

    // Boot with Docker starting after natmap's plugin, then the plugin again.
    let before = Topology::new();
    let _smtp2 = TcpEcho::start(&before.server, v4(SERVER_V4, 25));
    assert!(run_plugin(&before.router, &dir, "start").status.success());
    start_docker_shaped_chains(&before.router);
    let docker = docker_lines(&before.router);
    let once = tables(&before.router);
    assert!(run_plugin(&before.router, &dir, "reload").status.success());
    assert_eq!(tables(&before.router), once, "a reload changes nothing");
    expect_tcp(&before.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);

    // Boot with Docker's chains already there: they stay as they were.
    let after = Topology::new();
    let _smtp3 = TcpEcho::start(&after.server, v4(SERVER_V4, 25));
    start_docker_shaped_chains(&after.router);
    assert!(run_plugin(&after.router, &dir, "start").status.success());
    assert_eq!(docker_lines(&after.router), docker);
    assert_eq!(natmap_installed(&after.router, false), expected);
    expect_tcp(&after.client, v4(ROUTER_EXT_V4, 25), CLIENT_V4, 25);

    // flush takes natmap's hooks and chains away, and nothing of Docker's.
    assert!(run_plugin(&after.router, &dir, "flush").status.success());
    assert!(!iptables_save(&after.router, false).contains("NATMAP"));
    assert_eq!(docker_lines(&after.router), docker);
    d.assert_clean_log();
}

#[test]
fn the_plugin_leaves_a_running_daemon_alone() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start(&ns);
    dnat(&d, "25");
    let dir = d.dir().join("etc");
    d.cli_ok(&[
        "save",
        "--export",
        dir.join("natmap.rules").to_str().unwrap(),
    ]);
    let before = tables(&ns);
    let installed = natmap_installed(&ns, false);
    let out = ns.exec(&[
        "env".to_owned(),
        format!("NATMAP_RULES_DIR={}", dir.display()),
        format!("NATMAP_SOCKET={}", d.socket_path().display()),
        format!("LAB_OPS={LAB_OPS_BIN}"),
        "sh".to_owned(),
        plugin().display().to_string(),
        "start".to_owned(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("the daemon is running"),
        "{out:?}"
    );
    assert_eq!(tables(&ns), before);
    assert_eq!(natmap_installed(&ns, false), installed);
    d.assert_clean_log();
}

fn has_docker_user(ns: &Netns) -> bool {
    iptables_save(ns, false).contains("DOCKER-USER")
}

#[test]
fn clear_and_shutdown_remove_the_docker_user_chain_natmap_created_only() {
    if !privileged() {
        return;
    }
    if iptables_only(
        "natmap creating DOCKER-USER: the nftables backend never does (operator guide)",
    ) {
        let ns = bare_router();
        let mut d = Daemon::start(&ns);
        dnat(&d, "25");
        assert!(
            has_docker_user(&ns),
            "natmap creates DOCKER-USER without Docker"
        );
        d.cli_ok(&["clear"]);
        assert!(!has_docker_user(&ns), "{}", iptables_save(&ns, false));
        dnat(&d, "25");
        assert!(has_docker_user(&ns));
        assert!(d.stop().success());
        assert!(!has_docker_user(&ns), "{}", iptables_save(&ns, false));
    }

    // A DOCKER-USER that was there before natmap (with a rule) stays, jump and all.
    let own = bare_router();
    iptables(&own, false, &["-N", "DOCKER-USER"]);
    iptables(
        &own,
        false,
        &["-A", "DOCKER-USER", "-s", "203.0.113.7", "-j", "DROP"],
    );
    iptables(&own, false, &["-I", "FORWARD", "1", "-j", "DOCKER-USER"]);
    let theirs = |ns: &Netns| -> Vec<String> {
        iptables_save(ns, false)
            .lines()
            .filter(|l| l.contains("DOCKER-USER") && !ours(l))
            .map(str::to_owned)
            .collect()
    };
    // natmap's lines: its chains' (iptables), its connmark accept (nftables).
    fn ours(line: &str) -> bool {
        line.contains("NATMAP") || line.contains("natmap-nftables")
    }
    let before = theirs(&own);
    let mut d2 = Daemon::start(&own);
    dnat(&d2, "25");
    assert!(
        iptables_save(&own, false).lines().any(ours),
        "natmap's hook in DOCKER-USER"
    );
    d2.cli_ok(&["clear"]);
    assert_eq!(theirs(&own), before);
    dnat(&d2, "25");
    assert!(d2.stop().success());
    assert_eq!(theirs(&own), before);
    assert!(!iptables_save(&own, false).lines().any(ours));
}

#[test]
fn a_daemon_that_gives_up_at_start_leaves_no_rules() {
    if !privileged() {
        return;
    }
    let first = bare_router();
    let d = Daemon::start(&first);
    dnat(&d, "25");
    // A second daemon, in another namespace, with rules in its state and
    // the first one's socket: it must give up before installing anything.
    let second = bare_router();
    let dir = StateDir::new();
    std::fs::copy(d.state_path(), dir.state_path()).unwrap();
    let out = second.exec(&daemon_argv(&d.socket_path(), &dir.state_path()));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("already answers"), "{out:?}");
    let save = iptables_save(&second, false);
    assert!(
        !save.contains("NATMAP") && !save.contains("DOCKER-USER"),
        "left behind:\n{save}"
    );
    let left = natmap_left_behind(&second);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(in_netns(&second, || std::net::TcpListener::bind(v4(
        ROUTER_EXT_V4,
        25
    ))
    .is_ok()));
    d.assert_clean_log();
}
