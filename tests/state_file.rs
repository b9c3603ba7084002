//! The state file is not trusted (issue 11, items 4 and 5): every rule read
//! from it passes the checks of a request and of the file as a whole, a bad
//! one is quarantined (not installed, shown, kept verbatim) while the good
//! ones start; corrupt copies never overwrite each other; the daemon
//! refuses a state directory others can write in, and never follows a link
//! planted beside its state file.
//!
//! Every daemon runs in a network namespace the test creates; traffic goes
//! only between the test's own namespaces.

pub mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::*;

const EXT: &str = "192.0.2.1";
const INT: &str = "198.51.100.2";
const NOBODY: u32 = 65534;

fn ext_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ROUTER_EXT_V4), port)
}

fn dnat(id: u64, int_ip: &str, ports: &str) -> Value {
    json!({"id": id, "kind": "dnat", "ext_ip": EXT, "int_ip": int_ip,
           "ports": ports, "proto": "tcp", "ext_if": null})
}

fn state_file(next_id: u64, rules: &[Value]) -> Value {
    json!({"schema_version": 1, "next_id": next_id, "forwarding": false,
           "forwarding_ipv6": true, "rules": rules})
}

fn write_state(dir: &StateDir, state: &Value) {
    fs::write(dir.state_path(), serde_json::to_vec_pretty(state).unwrap()).unwrap();
}

fn state_json(dir: &StateDir) -> Value {
    serde_json::from_slice(&fs::read(dir.state_path()).unwrap()).unwrap()
}

fn isolated(ns: &Netns, dir: &StateDir) -> Daemon {
    let mut d = Daemon::start_with_options(ns, dir, DaemonOptions::isolated());
    d.allow_log("QUARANTINED");
    d
}

/// `ls` as JSON: the rule with `id` whose status is `status`.
fn listed(d: &Daemon, id: u64, status: &str) -> Value {
    let ls = d.call(json!({"cmd": "ls"}));
    ls["data"]["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("ls: {ls}"))
        .iter()
        .find(|r| r["id"] == id && r["status"] == status)
        .cloned()
        .unwrap_or_else(|| panic!("no {status} rule #{id} in {ls}"))
}

/// Starts a daemon on `dir` in `ns` that must refuse to start; returns its stderr.
fn start_refused(ns: &Netns, dir: &Path) -> String {
    let out = run_with_timeout(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, LAB_OPS_BIN, "natmap", "daemon"])
            .arg("--state")
            .arg(dir.join("state.json"))
            .arg("--socket")
            .arg(dir.join("natmap.sock"))
            .args(["--socket-group", "root"])
            .args(["--docker-socket", "/nonexistent/natmap-test-no-docker.sock"])
            .args(backend_flag()),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the daemon started: {stderr}");
    stderr
}

// ───────────────────────────── 4. the state file is trusted ─────────────────────────────

/// Each bad entry, next to a good rule: the daemon starts, the good rule
/// forwards, the bad one is quarantined with its reason, has no iptables
/// line, and stays in the file verbatim across a state write.
#[test]
fn each_bad_rule_is_quarantined_and_the_good_one_starts() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _echo = TcpEcho::start(&topo.server, SocketAddr::new(INT.parse().unwrap(), 31001));
    let port_0 = json!({"id": 2, "kind": "docker", "name": "fixed", "host_port": 0,
        "container_port": 80, "proto": "tcp", "external": true,
        "target_v4": {"ip": INT, "subnet": null}});
    let cases: [(&str, Value, &str); 4] = [
        ("host_port 0", port_0, "host_port"),
        ("ext_ip == int_ip", dnat(2, EXT, "31002"), "same address"),
        (
            "mixed family",
            dnat(2, "2001:db8:2::2", "31002"),
            "both be IPv4 or both be IPv6",
        ),
        (
            "duplicate port",
            dnat(2, "198.51.100.3", "31001"),
            "port 31001/tcp on 192.0.2.1 is already forwarded by rule #1",
        ),
    ];
    for (what, bad, reason) in cases {
        let dir = StateDir::new();
        write_state(&dir, &state_file(3, &[dnat(1, INT, "31001"), bad.clone()]));
        let mut d = isolated(&topo.router, &dir);
        let q = listed(&d, 2, "quarantined");
        let detail = q["detail"].as_str().unwrap();
        assert!(detail.contains(reason), "{what}: {detail}");
        listed(&d, 1, "active");
        expect_tcp(&topo.client, ext_addr(31001), CLIENT_V4, 31001);
        assert!(port_is_held(&topo.router, "tcp", ext_addr(31001)), "{what}");
        let lines = natmap_installed(&topo.router, false).join("\n");
        assert!(!lines.contains("natmap:dnat:2"), "{what}: {lines}");
        assert!(!lines.contains("natmap:docker:2"), "{what}: {lines}");
        assert!(!lines.contains("--dport 0 "), "{what}: {lines}");
        let status = d.call(json!({"cmd": "status"}));
        let problems = status["data"]["problems"].to_string();
        assert!(
            problems.contains("rule #2") && problems.contains(reason),
            "{what}: {problems}"
        );

        // A change rewrites the file: the entry is still there, verbatim.
        let added = d.call(dnat_request(EXT, INT, "31009", "tcp", false));
        assert_eq!(added["data"]["rule"]["id"], 3, "{what}: {added}");
        let rules = state_json(&dir)["rules"].as_array().unwrap().clone();
        assert!(
            rules.contains(&bad),
            "{what}: the quarantined entry was dropped: {rules:?}"
        );
        assert_eq!(rules.len(), 3, "{what}: {rules:?}");
        d.assert_clean_log();
        d.stop();
    }
}

/// Two rules with one id: the first starts, the second is quarantined.
/// Today the second's reservation replaced the first's, so another process
/// could bind a port `ls` showed active; and a `next_id` at or below an
/// existing id gave a new rule an id in use, so deleting it freed the
/// other rule's port.
#[test]
fn duplicate_ids_never_share_a_reservation() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _echo = TcpEcho::start(&topo.server, SocketAddr::new(INT.parse().unwrap(), 31101));
    let dir = StateDir::new();
    let twin = dnat(1, INT, "31102");
    write_state(&dir, &state_file(2, &[dnat(1, INT, "31101"), twin.clone()]));
    let d = isolated(&topo.router, &dir);
    listed(&d, 1, "active");
    let q = listed(&d, 1, "quarantined");
    assert!(
        q["detail"]
            .as_str()
            .unwrap()
            .contains("id 1 is used by an earlier rule"),
        "{q}"
    );
    assert!(
        port_is_held(&topo.router, "tcp", ext_addr(31101)),
        "another process could bind the port of active rule #1"
    );
    assert!(!port_is_held(&topo.router, "tcp", ext_addr(31102)));
    expect_tcp(&topo.client, ext_addr(31101), CLIENT_V4, 31101);
    // Deleting the active rule frees its port only; the twin stays in the file.
    let deleted = d.call(dnat_request(EXT, INT, "31101", "tcp", true));
    assert_eq!(deleted["data"]["result"], "deleted", "{deleted}");
    assert!(!port_is_held(&topo.router, "tcp", ext_addr(31101)));
    assert!(state_json(&dir)["rules"]
        .as_array()
        .unwrap()
        .contains(&twin));
    drop(d);

    // next_id not above every id: raised, so a new rule never reuses one.
    let dir = StateDir::new();
    write_state(&dir, &state_file(1, &[dnat(1, INT, "31101")]));
    let mut d = isolated(&topo.router, &dir);
    d.allow_log("is not above every rule id");
    let added = d.call(dnat_request(EXT, INT, "31103", "tcp", false));
    assert_eq!(added["data"]["rule"]["id"], 2, "{added}");
    assert!(port_is_held(&topo.router, "tcp", ext_addr(31101)));
    let deleted = d.call(dnat_request(EXT, INT, "31103", "tcp", true));
    assert_eq!(deleted["data"]["result"], "deleted", "{deleted}");
    assert!(
        port_is_held(&topo.router, "tcp", ext_addr(31101)),
        "deleting the new rule freed rule #1's port"
    );
    expect_tcp(&topo.client, ext_addr(31101), CLIENT_V4, 31101);
    d.assert_clean_log();
}

/// An entry that is not a rule at all is quarantined too (shown apart by
/// `ls`), and `clear`, the operator's reset, removes quarantined entries.
#[test]
fn unreadable_entries_are_quarantined_and_clear_removes_them() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let dir = StateDir::new();
    let junk = json!({"id": 7, "kind": "dnat", "ext_ip": EXT, "int_ip": INT, "ports": "0"});
    write_state(&dir, &state_file(8, &[dnat(1, INT, "31201"), junk.clone()]));
    let d = isolated(&ns, &dir);
    listed(&d, 1, "active");
    let ls = d.call(json!({"cmd": "ls"}));
    let unreadable = &ls["data"]["unreadable"][0];
    assert_eq!(unreadable["id"], 7, "{ls}");
    assert_eq!(unreadable["index"], 1, "{ls}");
    let reason = unreadable["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not parse") && reason.contains("ports"),
        "{reason}"
    );
    let out = d.cli(&["ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("quarantined (id 7)"), "{table}");
    let cleared = d.call(json!({"cmd": "clear"}));
    assert_eq!(cleared["data"]["removed"], 2, "{cleared}");
    assert_eq!(state_json(&dir)["rules"], json!([]));
    d.assert_clean_log();
}

/// Only this build's schema version loads: 0 (never written by natmap) and
/// a newer one are refused with a clear message, and the file is kept.
#[test]
fn schema_version_0_and_unknown_versions_are_refused() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    for (version, says) in [(0, "which no natmap writes"), (2, "upgrade natmap")] {
        let dir = StateDir::new();
        let mut state = state_file(2, &[dnat(1, INT, "31301")]);
        state["schema_version"] = json!(version);
        write_state(&dir, &state);
        let before = fs::read(dir.state_path()).unwrap();
        let stderr = start_refused(&ns, dir.path());
        assert!(
            stderr.contains(&format!("schema version {version}")) && stderr.contains(says),
            "{stderr}"
        );
        assert_eq!(fs::read(dir.state_path()).unwrap(), before, "file kept");
    }
}

/// Two corrupt starts in one second used to rename onto the same
/// `.corrupt-<secs>` name, losing the first copy. Copies already there for
/// every second around now stand in for earlier starts: none is touched.
#[test]
fn corrupt_copies_never_overwrite_each_other() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let dir = StateDir::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let earlier = |secs: u64| dir.path().join(format!("state.json.corrupt-{secs}"));
    for secs in now - 2..now + 60 {
        fs::write(earlier(secs), format!("earlier copy {secs}")).unwrap();
    }
    fs::write(dir.state_path(), b"{\"schema_version\":1,\"rules\":[tru").unwrap();
    let mut d = Daemon::start_with_options(&ns, &dir, DaemonOptions::isolated());
    d.allow_log("STATE FILE IS CORRUPT");
    d.kill9();
    fs::write(dir.state_path(), b"second corrupt file").unwrap();
    d.respawn();
    for secs in now - 2..now + 60 {
        let text = fs::read_to_string(earlier(secs)).unwrap();
        assert_eq!(
            text,
            format!("earlier copy {secs}"),
            "copy of {secs} overwritten"
        );
    }
    let mut copies: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .filter(|t| !t.starts_with("earlier copy"))
        .collect();
    copies.sort();
    assert!(
        copies.contains(&"second corrupt file".to_string()),
        "{copies:?}"
    );
    assert!(
        copies.iter().any(|c| c.ends_with("[tru")),
        "first corrupt file lost: {copies:?}"
    );
    let status = d.call(json!({"cmd": "status"}));
    assert!(
        status["data"]["problems"].to_string().contains("corrupt-"),
        "{status}"
    );
    d.assert_clean_log();
}

// ───────────────────────────── 5. links beside the state file ─────────────────────────────

/// A file only the test owns, standing in for `/etc/shadow`.
fn precious(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("precious");
    fs::write(&target, b"precious\n").unwrap();
    target
}

/// A state directory others can write in (mode 0777 with a link planted by
/// `nobody`, 0770, or owned by `nobody`) is refused at start, with the
/// commands that fix it; nothing is written.
#[test]
fn unsafe_state_directories_are_refused_with_the_fix() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let outside = tempfile::tempdir().unwrap();
    let target = precious(outside.path());
    for (mode, owner, says) in [
        (0o777, 0, "writable by group or others (mode 0777)"),
        (0o770, 0, "writable by group or others (mode 0770)"),
        (0o700, NOBODY, "owned by uid 65534, not root"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("state.json.tmp");
        symlink(&target, &tmp).unwrap();
        lchown(&tmp, Some(NOBODY), Some(NOBODY)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(owner), None).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        let stderr = start_refused(&ns, dir.path());
        let shown = dir.path().display();
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            stderr.contains(&format!("chown root: {shown} && chmod 0700 {shown}")),
            "{stderr}"
        );
        assert_eq!(fs::read(&target).unwrap(), b"precious\n");
        assert!(!dir.path().join("state.json").exists());
        assert!(!dir.path().join("state.json.lock").exists());
    }
}

/// In a correct directory a link planted as a temporary file (of the state
/// or of its journal) is removed, not written through; one planted as the
/// lock file or as the journal stops the start.
#[test]
fn links_beside_the_state_file_are_never_followed() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let outside = tempfile::tempdir().unwrap();
    let target = precious(outside.path());
    let dir = StateDir::new();
    // tempfile's directory: root's, not writable by group or others.
    let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o022, 0, "{mode:o}");
    symlink(&target, dir.path().join("state.json.tmp")).unwrap();
    symlink(&target, dir.path().join("state.json.journal.tmp")).unwrap();
    let mut d = Daemon::start_with_options(&ns, &dir, DaemonOptions::isolated());
    let added = d.call(dnat_request(EXT, INT, "31401", "tcp", false));
    assert_eq!(added["data"]["result"], "added", "{added}");
    assert_eq!(
        fs::read(&target).unwrap(),
        b"precious\n",
        "written through the link"
    );
    let meta = fs::symlink_metadata(dir.state_path()).unwrap();
    assert!(
        meta.file_type().is_file(),
        "state.json is not a regular file"
    );
    let journal = dir.path().join("state.json.journal");
    assert!(fs::symlink_metadata(&journal)
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(state_json(&dir)["rules"][0]["ports"], "31401");
    // The next change is appended to the journal, not through a link.
    let added = d.call(dnat_request(EXT, INT, "31402", "tcp", false));
    assert_eq!(added["data"]["result"], "added", "{added}");
    assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    d.stop();

    // A link as the journal stops the start (it is read with O_NOFOLLOW).
    let kept = fs::read(&journal).unwrap();
    fs::remove_file(&journal).unwrap();
    symlink(&target, &journal).unwrap();
    let stderr = start_refused(&ns, dir.path());
    assert!(stderr.contains("state.json.journal"), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    fs::remove_file(&journal).unwrap();
    fs::write(&journal, kept).unwrap();

    let lock = dir.path().join("state.json.lock");
    fs::remove_file(&lock).unwrap();
    symlink(&target, &lock).unwrap();
    let stderr = start_refused(&ns, dir.path());
    assert!(stderr.contains("state.json.lock"), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    d.assert_clean_log();
}
