//! Reliability and security on a real kernel (issue 5): crash consistency
//! under load and at injected crash points, a full or read-only state
//! directory, the xtables lock held by another process, missing kernel
//! pieces and binaries, socket permissions across restarts, and a flood of
//! hostile lines on the control socket.
//!
//! Every test runs its daemon in a network namespace of its own (see
//! `tests/common`), is bounded in time, and ends with the daemon-log check
//! (`Daemon::assert_clean_log`) declaring the warnings it provokes.
//! Figures printed here (uncaptured, on stderr) are collected in
//! `docs/reliability.md`.

pub mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

/// Where every dnat of these tests is forwarded from and to.
const EXT: &str = "192.0.2.1";
const INT: &str = "198.51.100.2";

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn ext_addr(port: u16) -> SocketAddr {
    v4(ROUTER_EXT_V4, port)
}

/// Prints a figure for docs/reliability.md, uncaptured.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "[reliability] {line}");
}

/// A daemon that ignores the host's Docker engine, on a fresh state dir.
fn isolated_daemon(ns: &Netns) -> Daemon {
    Daemon::start_with_options(ns, &StateDir::new(), DaemonOptions::isolated())
}

// ───────────────────────────── 1. crash consistency ─────────────────────────────

const CRASH_ROUNDS: usize = 20;
const CRASH_CLIENTS: usize = 10;
const PORTS_PER_CLIENT: u16 = 4;

/// Client `c`'s rules: 4 ports of its own, TCP for even clients, UDP for odd.
fn client_keys(c: usize) -> Vec<(u16, &'static str)> {
    let proto = if c % 2 == 0 { "tcp" } else { "udp" };
    (0..PORTS_PER_CLIENT)
        .map(|k| (20000 + c as u16 * 10 + k, proto))
        .collect()
}

/// One client of a crash round: mixed adds and deletes of its own rules on
/// one connection until the daemon dies (or 400 requests, or 5 s).
fn crash_client(socket: &Path, c: usize, ledger: &mut AckLedger, rng: &mut TestRng) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(mut conn) = SocketClient::connect(socket) else {
        return problems; // the daemon died before this client connected
    };
    let keys = client_keys(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..400 {
        if Instant::now() > deadline {
            break;
        }
        let (port, proto) = *rng.pick(&keys);
        let delete = match ledger.expect(port, proto) {
            Presence::Present => rng.chance(0.7),
            Presence::Absent => rng.chance(0.2),
            Presence::Unknown => rng.chance(0.5),
        };
        let request = dnat_request(EXT, INT, &port.to_string(), proto, delete);
        match conn.call(&request) {
            Ok(answer) => {
                if let Err(e) = ledger.record(port, proto, delete, Some(&answer)) {
                    problems.push(format!("client {c}: {e}"));
                }
            }
            Err(_) => {
                let _ = ledger.record(port, proto, delete, None);
                break;
            }
        }
    }
    problems
}

#[test]
fn sigkill_under_concurrent_load_keeps_rules_state_and_acknowledgements_consistent() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let topo = Topology::new();
    let mut rng = TestRng::from_env("crash consistency");
    let mut d = isolated_daemon(&topo.router);
    let socket = d.socket_path();
    let mut ledgers: Vec<AckLedger> = vec![AckLedger::default(); CRASH_CLIENTS];
    let (mut acks, mut unanswered, mut max_rules) = (0u64, 0u64, 0usize);

    for round in 0..CRASH_ROUNDS {
        let delay = Duration::from_millis(rng.below(301));
        let mut rngs: Vec<TestRng> = (0..CRASH_CLIENTS).map(|_| rng.fork()).collect();
        let problems: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ledgers
                .iter_mut()
                .zip(rngs.iter_mut())
                .enumerate()
                .map(|(c, (ledger, r))| {
                    let socket = socket.clone();
                    s.spawn(move || crash_client(&socket, c, ledger, r))
                })
                .collect();
            std::thread::sleep(delay);
            d.kill9();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("client thread"))
                .collect()
        });
        assert!(problems.is_empty(), "round {round}: {problems:#?}");

        // What the killed daemon left on disk must parse; the restart must
        // bring the kernel to exactly that.
        let state = current_state(&d.state_path());
        wait_namespace_idle(&topo.router);
        d.respawn();
        // The restart folded the journal into state.json, which must now
        // hold exactly what state.json and the journal held together.
        if d.state_path().exists() {
            assert_eq!(
                read_state(&d.state_path()),
                state,
                "a restart alone does not change the state"
            );
        }
        assert_kernel_matches_state(&topo.router, &d, "iptables", "ip6tables");

        let keys = state_dnat_keys(&state);
        let mut mismatches = Vec::new();
        for (c, ledger) in ledgers.iter_mut().enumerate() {
            let mine: BTreeSet<(u16, String)> = client_keys(c)
                .into_iter()
                .map(|(p, proto)| (p, proto.to_string()))
                .filter(|k| keys.contains_key(k))
                .collect();
            for m in ledger.reconcile(&mine) {
                mismatches.push(format!("client {c}: {m}"));
            }
            // Ports of this client without a rule are free again.
            for (port, proto) in client_keys(c) {
                if !keys.contains_key(&(port, proto.to_string())) {
                    assert!(
                        !port_is_held(&topo.router, proto, ext_addr(port)),
                        "round {round}: port {port}/{proto} has no rule but is still held"
                    );
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "round {round} (killed after {delay:?}): {mismatches:#?}"
        );
        max_rules = max_rules.max(state.rules.len());
    }
    for l in &ledgers {
        acks += l.acks + l.refusals;
        unanswered += l.unanswered;
    }

    // The rules still forward after 20 crashes.
    let _echo = TcpEcho::start(&topo.server, v4(SERVER_V4, 20000));
    let out = d.call(dnat_request(EXT, INT, "20000", "tcp", false));
    assert_eq!(out["ok"], true, "{out}");
    expect_tcp(&topo.client, ext_addr(20000), CLIENT_V4, 20000);
    d.assert_clean_log();
    report(&format!(
        "crash consistency: {CRASH_ROUNDS} rounds x {CRASH_CLIENTS} clients, {acks} answered \
         requests checked, {unanswered} cut off by SIGKILL, up to {max_rules} rules in state, \
         0 lost acknowledgements, {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// Where `NATMAP_CRASH_AT` stops the daemon, and whether the crashed
/// request's rule must be in the state after a restart.
const CRASH_POINTS: [(&str, WriteKind, bool); 6] = [
    // Appending one change to the journal.
    ("before-append", WriteKind::Append, false),
    ("after-append", WriteKind::Append, true),
    // A compaction (`save`) after the change was journaled and answered:
    // whatever the point, the change stays.
    ("before-write", WriteKind::Compact, true),
    ("after-write", WriteKind::Compact, true),
    ("after-rename", WriteKind::Compact, true),
    ("after-journal-rename", WriteKind::Compact, true),
];

/// Which state write a crash point interrupts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum WriteKind {
    /// The journal line of a change.
    Append,
    /// A whole new state.json and journal.
    Compact,
}

#[test]
fn crash_at_each_state_write_point_leaves_old_or_new_state_and_matching_rules() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    for (point, write, new_expected) in CRASH_POINTS {
        let mut d = isolated_daemon(&topo.router);
        let first = d.call(dnat_request(EXT, INT, "30001", "tcp", false));
        assert_eq!(first["data"]["result"], "added", "{first}");
        // state.json holds the rule and the journal nothing: the next
        // start has nothing to fold in (which would reach the point first).
        assert_eq!(d.call(json!({"cmd": "save"}))["ok"], true);
        d.kill9();
        let old = current_state(&d.state_path());
        assert_eq!(old.rules.len(), 1);

        d.set_env("NATMAP_CRASH_AT", point);
        d.respawn();
        let change = dnat_request(EXT, INT, "30002", "udp", false);
        let answer = match write {
            WriteKind::Append => d.connect().call(&change),
            WriteKind::Compact => {
                let added = d.call(change);
                assert_eq!(added["data"]["result"], "added", "{point}: {added}");
                d.connect().call(&json!({"cmd": "save"}))
            }
        };
        assert!(
            answer.is_err(),
            "{point}: the daemon answered instead of crashing: {answer:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.is_running() {
            assert!(Instant::now() < deadline, "{point}: daemon still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            d.log()
                .contains(&format!("NATMAP_CRASH_AT={point}: aborting")),
            "{point}: crash point not reached\n{}",
            d.log()
        );

        let after = current_state(&d.state_path());
        assert!(
            after == old || (after.rules.len() == 2 && after.next_id == old.next_id + 1),
            "{point}: torn state {after:?}"
        );
        let is_new = after.rules.len() == 2;
        assert_eq!(is_new, new_expected, "{point}: state is {after:?}");

        d.remove_env("NATMAP_CRASH_AT");
        wait_namespace_idle(&topo.router);
        d.respawn();
        assert_eq!(
            current_state(&d.state_path()),
            after,
            "{point}: restart kept the state"
        );
        // The start folded any journaled change into state.json.
        assert_eq!(read_state(&d.state_path()), after, "{point}: state.json");
        assert_kernel_matches_state(&topo.router, &d, "iptables", "ip6tables");
        assert_eq!(
            port_is_held(&topo.router, "udp", ext_addr(30002)),
            is_new,
            "{point}: the crashed rule's port is held iff it is in state"
        );
        d.assert_clean_log();
        // The next point starts a daemon on a fresh state, which rewrites
        // natmap's chains to match it.
        d.kill9();
        wait_namespace_idle(&topo.router);
        report(&format!(
            "crash at {point} ({write:?}): state after restart is the {} one, rules match it",
            if is_new { "new" } else { "old" }
        ));
    }
}

/// `state.json` and its journal, byte for byte (`None` for a missing one).
fn state_files(path: &Path) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let journal = path.with_file_name(format!(
        "{}.journal",
        path.file_name().unwrap().to_string_lossy()
    ));
    (fs::read(path).ok(), fs::read(journal).ok())
}

/// [`assert_kernel_matches_state`] on a running daemon: `save` first
/// folds its journal into `state.json`, which that check reads.
#[track_caller]
fn assert_kernel_matches_saved_state(ns: &Netns, d: &Daemon, iptables: &str, ip6tables: &str) {
    let saved = d.call(json!({"cmd": "save"}));
    assert_eq!(saved["ok"], true, "{saved}");
    assert_kernel_matches_state(ns, d, iptables, ip6tables);
}

// ───────────────────────────── 2. disk full / read-only ─────────────────────────────

/// A tmpfs mounted on a directory for the life of the guard (umounted on
/// drop, lazily if still busy).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let out = run_with_timeout(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path),
            COMMAND_TIMEOUT,
        );
        check_output("mount tmpfs", &out);
        Tmpfs {
            path: path.to_owned(),
        }
    }

    /// Remounts the filesystem with `option` (`ro`, `rw`). Only possible
    /// while no daemon holds a file on it open for writing (its lock file).
    fn remount(&self, option: &str) {
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-o", &format!("remount,{option}")])
                .arg(&self.path),
            COMMAND_TIMEOUT,
        );
        check_output(&format!("remount {option}"), &out);
    }

    /// Sets or clears the immutable attribute (`chattr +i`) of the mount's
    /// root directory: nothing can be created or renamed in it, even by
    /// root. While the daemon runs this is how its state directory becomes
    /// unwritable (a read-only remount is refused while it holds its lock
    /// file open for writing). Done with the ioctl, so no e2fsprogs needed.
    fn set_immutable(&self, on: bool) {
        const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
        const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
        const FS_IMMUTABLE_FL: libc::c_int = 0x10;
        let dir = File::open(&self.path).unwrap();
        let mut flags: libc::c_int = 0;
        // SAFETY: the flags ioctls read/write one int through the pointer.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) };
        assert_eq!(
            rc,
            0,
            "FS_IOC_GETFLAGS: {}",
            std::io::Error::last_os_error()
        );
        if on {
            flags |= FS_IMMUTABLE_FL;
        } else {
            flags &= !FS_IMMUTABLE_FL;
        }
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SETFLAGS, &flags) };
        assert_eq!(
            rc,
            0,
            "FS_IOC_SETFLAGS: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Fills the filesystem of `dir` with one file until it is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).unwrap();
    let chunk = vec![0x55u8; 4096];
    for _ in 0..100_000 {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Smaller writes take the last partial page.
    while f.write_all(&[0x55]).is_ok() {}
    path
}

#[test]
fn full_or_read_only_state_dir_fails_the_change_rolls_back_and_keeps_serving() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let dir = StateDir::new();
    let tmpfs = Tmpfs::mount(&dir.path().join("state"), "256k");
    let mut opts = DaemonOptions::isolated();
    opts.state_path = Some(tmpfs.path.join("state.json"));
    let d = Daemon::start_with_options(&topo.router, &dir, opts);
    let _echo = TcpEcho::start(&topo.server, v4(SERVER_V4, 31001));

    assert_eq!(
        d.call(dnat_request(EXT, INT, "31001", "tcp", false))["ok"],
        true
    );
    // Rules a delete can fail on, below (added while there is space).
    for port in 31003..31008 {
        let port = port.to_string();
        assert_eq!(
            d.call(dnat_request(EXT, INT, &port, "tcp", false))["ok"],
            true
        );
    }
    let filler = fill(&tmpfs.path);

    // Disk full: a change is one journal line, which still fits while the
    // journal's last page has room (and is then durable like any other);
    // the first that does not fit fails, and nothing of it stays.
    let mut failed = None;
    for port in 31010..31090u16 {
        let lines_before = natmap_installed(&topo.router, false);
        let files_before = state_files(&d.state_path());
        let state_before = current_state(&d.state_path());
        let answer = d.call(dnat_request(EXT, INT, &port.to_string(), "tcp", false));
        if answer["ok"] == true {
            assert_eq!(
                current_state(&d.state_path()).rules.len(),
                state_before.rules.len() + 1
            );
            continue;
        }
        assert_eq!(answer["error"]["code"], "state_write_failed", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("No space left"), "{message}");
        assert_eq!(
            natmap_installed(&topo.router, false),
            lines_before,
            "rules rolled back"
        );
        assert_eq!(
            state_files(&d.state_path()),
            files_before,
            "state.json and journal untouched"
        );
        assert_eq!(current_state(&d.state_path()), state_before);
        assert!(
            !port_is_held(&topo.router, "tcp", ext_addr(port)),
            "port released"
        );
        failed = Some(port);
        break;
    }
    let failed_port = failed.expect("an add on a full disk failed within 80 tries");
    // Still serving, and the old rule still forwards.
    assert_eq!(d.call(json!({"cmd": "ping"}))["ok"], true);
    let listed = d.call(json!({"cmd": "ls"}))["data"]["rules"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(listed, current_state(&d.state_path()).rules.len());
    expect_tcp(&topo.client, ext_addr(31001), CLIENT_V4, 31001);
    // A delete fails the same way (a delete's line is shorter: up to a few
    // still fit) and keeps the rule and its port.
    let mut delete_failed = false;
    for port in 31003..31008u16 {
        let lines_before = natmap_installed(&topo.router, false);
        let files_before = state_files(&d.state_path());
        let answer = d.call(dnat_request(EXT, INT, &port.to_string(), "tcp", true));
        if answer["ok"] == true {
            continue;
        }
        assert_eq!(answer["error"]["code"], "state_write_failed", "{answer}");
        assert_eq!(natmap_installed(&topo.router, false), lines_before);
        assert_eq!(state_files(&d.state_path()), files_before);
        assert!(port_is_held(&topo.router, "tcp", ext_addr(port)));
        delete_failed = true;
        break;
    }
    assert!(
        delete_failed,
        "a delete on a full disk failed within 5 tries"
    );

    // Space again: the same add works.
    fs::remove_file(filler).unwrap();
    let ok = d.call(dnat_request(
        EXT,
        INT,
        &failed_port.to_string(),
        "tcp",
        false,
    ));
    assert_eq!(ok["data"]["result"], "added", "{ok}");
    assert_kernel_matches_saved_state(&topo.router, &d, "iptables", "ip6tables");

    // Unwritable directory: a change is appended to the journal, an
    // existing file, so it still works; what needs a new file there (a
    // compaction: `save`) fails and changes nothing; writable again: it works.
    tmpfs.set_immutable(true);
    let lines_before = natmap_installed(&topo.router, false);
    let files_before = state_files(&d.state_path());
    let failed = d.call(json!({"cmd": "save"}));
    let ok = d.call(dnat_request(
        EXT,
        INT,
        &failed_port.to_string(),
        "tcp",
        true,
    ));
    tmpfs.set_immutable(false);
    assert_eq!(failed["error"]["code"], "state_write_failed", "{failed}");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not permitted"),
        "{failed}"
    );
    assert_eq!(
        files_before.0,
        state_files(&d.state_path()).0,
        "state.json kept"
    );
    assert_eq!(ok["data"]["result"], "deleted", "{ok}");
    assert_ne!(natmap_installed(&topo.router, false), lines_before);
    assert!(!port_is_held(&topo.router, "tcp", ext_addr(failed_port)));
    let ports = failed_port.to_string();
    assert!(!current_state(&d.state_path())
        .rules
        .iter()
        .any(|r| serde_json::to_value(r).unwrap()["ports"] == ports.as_str()));
    assert_kernel_matches_saved_state(&topo.router, &d, "iptables", "ip6tables");
    d.assert_clean_log();

    // A read-only state directory at start: the daemon refuses, naming it.
    let mut d = d;
    d.kill9();
    wait_namespace_idle(&topo.router);
    tmpfs.remount("ro");
    let out = run_with_timeout(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.router.name,
                LAB_OPS_BIN,
                "natmap",
                "daemon",
                "--state",
            ])
            .arg(d.state_path())
            .arg("--socket")
            .arg(dir.path().join("ro-test.sock"))
            .args(["--docker-socket", "/nonexistent/docker.sock"])
            .args(backend_flag()),
        Duration::from_secs(10),
    );
    tmpfs.remount("rw");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a read-only state dir: {stderr}"
    );
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    report(&format!(
        "read-only state dir at start: exit {:?}: {}",
        out.status.code(),
        stderr.trim().lines().last().unwrap_or("")
    ));
    drop(d);
}

// ───────────────────────────── 3. xtables lock ─────────────────────────────

/// `/run/xtables.lock`, the lock every iptables-legacy process takes, held
/// by this test process until the guard drops (also on panic; and the
/// kernel releases it if the test process dies).
struct XtablesLock(File);

impl XtablesLock {
    fn hold() -> XtablesLock {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/xtables.lock")
            .expect("open /run/xtables.lock");
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(
                Instant::now() < deadline,
                "someone else holds /run/xtables.lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        XtablesLock(file)
    }
}

impl Drop for XtablesLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A directory of `iptables*` symlinks to the `*-legacy*` binaries, to put
/// first on the daemon's PATH.
fn legacy_path_dir(dir: &Path) -> OsString {
    let bin = dir.join("legacy-bin");
    fs::create_dir_all(&bin).unwrap();
    for v in ["", "6"] {
        for suffix in ["", "-restore", "-save"] {
            let target = find_on_path(&format!("ip{v}tables-legacy{suffix}"))
                .unwrap_or_else(|| panic!("ip{v}tables-legacy{suffix} not installed"));
            std::os::unix::fs::symlink(target, bin.join(format!("ip{v}tables{suffix}"))).unwrap();
        }
    }
    let mut path = bin.into_os_string();
    path.push(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path
}

#[test]
fn held_xtables_lock_delays_a_change_then_fails_it_cleanly() {
    if !privileged() || !iptables_only("the xtables lock is iptables-restore's") {
        return;
    }
    if find_on_path("iptables-legacy-restore").is_none() {
        panic!("iptables-legacy-restore is needed (Debian's iptables package ships it)");
    }
    let started = Instant::now();
    let ns = bare_router();
    let dir = StateDir::new();
    let mut opts = DaemonOptions::isolated();
    opts.env.push(("PATH".into(), legacy_path_dir(dir.path())));
    let mut d = Daemon::start_with_options(&ns, &dir, opts);
    // A refused incremental update is retried as a full rewrite, which warns.
    d.allow_log("incremental ipv4 update refused");
    assert!(
        d.log().contains("backend=\"legacy\""),
        "legacy backend in use:\n{}",
        d.log()
    );
    assert_eq!(
        d.call(dnat_request(EXT, INT, "32001", "tcp", false))["ok"],
        true
    );

    // Released within the wait: the request waits for it, then succeeds.
    let socket = d.socket_path();
    let hold = Duration::from_secs(3);
    let (waited, answer) = {
        let lock = XtablesLock::hold();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let t = Instant::now();
                let a = SocketClient::connect(&socket)
                    .and_then(|mut c| c.call(&dnat_request(EXT, INT, "32002", "tcp", false)));
                (t.elapsed(), a)
            });
            std::thread::sleep(hold);
            assert!(!h.is_finished(), "the request did not wait for the lock");
            drop(lock);
            h.join().unwrap()
        })
    };
    let answer = answer.expect("answer");
    assert_eq!(answer["data"]["result"], "added", "{answer}");
    assert!(
        waited >= hold && waited < hold + Duration::from_secs(5),
        "{waited:?}"
    );
    report(&format!(
        "xtables lock held {hold:?}: the change waited and succeeded after {waited:.2?}"
    ));

    // Held past the wait: the request fails with apply_failed, nothing changed.
    let lines_before = natmap_lines_with(&ns, "iptables-legacy");
    let state_before = state_files(&d.state_path());
    let (failed_after, answer) = {
        let _lock = XtablesLock::hold();
        let t = Instant::now();
        let a = d
            .connect()
            .call(&dnat_request(EXT, INT, "32003", "tcp", false));
        (t.elapsed(), a)
        // the lock is released here, also if the call panicked
    };
    let answer = answer.expect("answer");
    assert_eq!(answer["error"]["code"], "apply_failed", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("xtables lock"),
        "{answer}"
    );
    assert!(failed_after >= Duration::from_secs(10), "{failed_after:?}");
    assert_eq!(
        natmap_lines_with(&ns, "iptables-legacy"),
        lines_before,
        "nothing applied"
    );
    assert_eq!(
        state_files(&d.state_path()),
        state_before,
        "state.json and journal untouched"
    );
    assert!(!port_is_held(&ns, "tcp", ext_addr(32003)), "port released");
    report(&format!(
        "xtables lock held past the wait: apply_failed after {failed_after:.2?}"
    ));

    // Healthy afterwards.
    assert_eq!(
        d.call(dnat_request(EXT, INT, "32003", "tcp", false))["data"]["result"],
        "added"
    );
    assert_kernel_matches_saved_state(&ns, &d, "iptables-legacy", "ip6tables-legacy");
    d.assert_clean_log();
    let total = started.elapsed();
    assert!(total < Duration::from_secs(45), "took {total:?}");
    report(&format!("xtables lock test total {total:.1?}"));
}

// ───────────────────────────── 4. missing kernel pieces ─────────────────────────────

#[test]
fn without_ipv6_nat_ipv6_requests_fail_clearly_and_ipv4_forwards() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let dir = StateDir::new();
    let bin = dir.path().join("no-ip6nat-bin");
    fs::create_dir_all(&bin).unwrap();
    let fake = if testing_nftables() {
        // An nft whose batches that declare natmap's ip6 table fail as
        // the kernel refuses an ip6 nat chain without IPv6 NAT support;
        // everything else goes to the real nft.
        let real = find_on_path("nft").expect("nft on PATH");
        let fake = bin.join("nft");
        fs::write(
            &fake,
            format!(
                "#!/bin/sh\nif [ \"$1\" = -f ] && [ \"$2\" = - ]; then\n\
                 \tinput=$(cat)\n\
                 \tcase \"$input\" in *'table ip6 natmap {{'*)\n\
                 \t\techo 'Error: Could not process rule: No such file or directory' >&2; exit 1 ;;\n\
                 \tesac\n\
                 \tprintf '%s\\n' \"$input\" | {real} \"$@\"; exit $?\n\
                 fi\nexec {real} \"$@\"\n",
                real = real.display()
            ),
        )
        .unwrap();
        fake
    } else {
        // An ip6tables-restore that fails as it does without ip6table_nat.
        let fake = bin.join("ip6tables-restore");
        fs::write(
            &fake,
            "#!/bin/sh\ncat >/dev/null\necho \"ip6tables-restore v1.8.9 (nf_tables): can't initialize ip6tables table \\`nat': Table does not exist (do you need to insmod?)\" >&2\nexit 1\n",
        )
        .unwrap();
        fake
    };
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let mut path = bin.into_os_string();
    path.push(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let mut opts = DaemonOptions::isolated();
    opts.env.push(("PATH".into(), path));
    let mut d = Daemon::start_with_options(&topo.router, &dir, opts);
    d.allow_log("IPv6 NAT is unavailable");
    let _echo = TcpEcho::start(&topo.server, v4(SERVER_V4, 33001));

    let (status, v6) = d.cli_json_output(&dnat_args("2001:db8:1::1", "2001:db8:2::2", "33001"));
    assert_eq!(status.code(), Some(1));
    assert_eq!(v6["error"]["code"], "ipv6_unavailable", "{v6}");
    assert!(
        v6["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ip6table_nat"),
        "{v6}"
    );

    let v4out = d.cli_json(&dnat_args(EXT, INT, "33001"));
    assert_eq!(v4out["data"]["result"], "added", "{v4out}");
    expect_tcp(&topo.client, ext_addr(33001), CLIENT_V4, 33001);
    // Four lines (iptables); its dnat_port and fwd_port elements (nftables).
    let lines = if testing_nftables() { 2 } else { 4 };
    assert_eq!(natmap_installed(&topo.router, false).len(), lines);
    assert!(natmap_installed(&topo.router, true).is_empty());
    d.assert_clean_log();
}

#[test]
fn without_iptables_the_daemon_refuses_to_start_naming_it() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let dir = StateDir::new();
    let empty = dir.path().join("empty-bin");
    fs::create_dir_all(&empty).unwrap();
    let ip = find_on_path("ip").expect("ip");
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(ip)
            .args([
                "netns",
                "exec",
                &ns.name,
                LAB_OPS_BIN,
                "natmap",
                "daemon",
                "--state",
            ])
            .arg(dir.state_path())
            .arg("--socket")
            .arg(dir.socket_path())
            .args(["--docker-socket", "/nonexistent/docker.sock"])
            .args(backend_flag())
            .env_clear()
            .env("PATH", &empty)
            .env("NO_COLOR", "1"),
        Duration::from_secs(10),
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "daemon started without iptables: {stderr}"
    );
    // The firewall tool of the backend under test: iptables, or nft.
    let tool = if testing_nftables() {
        "nft"
    } else {
        "iptables"
    };
    assert!(stderr.contains(tool), "message names {tool}: {stderr}");
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    assert!(!dir.socket_path().exists(), "no socket left behind");
    assert!(!dir.state_path().exists(), "no state written");
    report(&format!(
        "no iptables on PATH: exit {:?} after {took:.2?}: {}",
        out.status.code(),
        stderr.trim().lines().last().unwrap_or("")
    ));
}

// ───────────────────────────── 5. permissions ─────────────────────────────

/// A test group and two users (one in it, one not), removed on drop. Names
/// carry the test process id; accounts of dead test processes are removed first.
struct Accounts {
    group: String,
    gid: u32,
    member: (String, u32),
    outsider: (String, u32),
}

impl Accounts {
    fn create() -> Accounts {
        remove_stale_accounts();
        let pid = std::process::id();
        let group = format!("nmtg{pid}");
        let member = format!("nmti{pid}");
        let outsider = format!("nmto{pid}");
        let run = |argv: &[&str]| {
            let out = run_with_timeout(Command::new(argv[0]).args(&argv[1..]), COMMAND_TIMEOUT);
            check_output(&argv.join(" "), &out);
        };
        run(&["groupadd", &group]);
        let mut accounts = Accounts {
            group: group.clone(),
            gid: 0,
            member: (member.clone(), 0),
            outsider: (outsider.clone(), 0),
        };
        run(&[
            "useradd",
            "-M",
            "-N",
            "-g",
            "nogroup",
            "-G",
            &group,
            "-s",
            "/usr/sbin/nologin",
            &member,
        ]);
        run(&[
            "useradd",
            "-M",
            "-N",
            "-g",
            "nogroup",
            "-s",
            "/usr/sbin/nologin",
            &outsider,
        ]);
        accounts.gid = nix::unistd::Group::from_name(&group)
            .unwrap()
            .unwrap()
            .gid
            .as_raw();
        for (name, uid) in [&mut accounts.member, &mut accounts.outsider] {
            *uid = nix::unistd::User::from_name(name)
                .unwrap()
                .unwrap()
                .uid
                .as_raw();
        }
        accounts
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in [&self.member.0, &self.outsider.0] {
            let _ = Command::new("userdel").arg(user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// Removes `nmt[gio]<pid>` accounts whose test process is gone.
fn remove_stale_accounts() {
    let stale = |file: &str| -> Vec<String> {
        fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|name| {
                ["nmtg", "nmti", "nmto"].iter().any(|p| {
                    name.strip_prefix(p)
                        .and_then(|pid| pid.parse::<u32>().ok())
                        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
                })
            })
            .map(str::to_string)
            .collect()
    };
    for user in stale("/etc/passwd") {
        let _ = Command::new("userdel").arg(&user).output();
    }
    for group in stale("/etc/group") {
        let _ = Command::new("groupdel").arg(&group).output();
    }
}

/// Runs the CLI as `uid` (with its groups) against `socket`; returns the
/// CLI's pid, exit code and parsed JSON output.
fn cli_as(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> (u32, Option<i32>, Value) {
    let mut child = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--init-groups",
        ])
        .arg(LAB_OPS_BIN)
        .args(["natmap", "--json", "--socket"])
        .arg(socket)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("CLI as uid {uid} {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .trim()
    .to_string();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("CLI as uid {uid} {args:?}: not JSON ({e}): {text}"));
    (pid, out.status.code(), json)
}

#[test]
fn socket_is_group_only_across_100_restarts_and_changes_are_logged_with_the_peer() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let accounts = Accounts::create();
    let ns = bare_router();
    let dir = StateDir::new();
    // Like /run: others may traverse the directory to reach the socket.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let mut opts = DaemonOptions::isolated();
    opts.socket_group = Some(accounts.group.clone());
    let mut d = Daemon::start_with_options(&ns, &dir, opts);
    let socket = d.socket_path();

    let check_socket = |when: &str| {
        let m = fs::symlink_metadata(&socket).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            0o660,
            "{when}: socket mode {:o}",
            m.mode()
        );
        assert_eq!((m.uid(), m.gid()), (0, accounts.gid), "{when}: owner");
    };
    check_socket("first start");

    // The outsider is refused by the kernel, before the daemon hears of it.
    let ouid = accounts.outsider.1;
    let (_, code, out) = cli_as(ouid, 65534, &socket, &["ping"]);
    assert_eq!(code, Some(3), "{out}");
    assert_eq!(out["error"]["code"], "daemon_unreachable", "{out}");
    let message = out["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("permission"), "{message}");
    let (_, code, out) = cli_as(
        ouid,
        65534,
        &socket,
        &["dnat", "--ext-ip", EXT, "--int-ip", INT, "--ports", "34000"],
    );
    assert_eq!(
        (code, out["error"]["code"].as_str()),
        (Some(3), Some("daemon_unreachable")),
        "{out}"
    );

    // The member can use every command.
    let muid = accounts.member.1;
    let mut change_pids = Vec::new();
    let dnat = ["dnat", "--ext-ip", EXT, "--int-ip", INT, "--ports", "34001"];
    let commands: Vec<(Vec<&str>, i32, bool)> = vec![
        (vec!["ping"], 0, false),
        (dnat.to_vec(), 0, true),
        (vec!["ls"], 0, false),
        ([&dnat[..], &["--delete"]].concat(), 0, true),
        (
            vec![
                "snat",
                "--int-ip",
                "198.51.100.0/24",
                "--ext-if",
                "ext0",
                "--ext-ip",
                EXT,
            ],
            0,
            true,
        ),
        (vec!["fwd"], 0, true),
        (vec!["clear"], 0, true),
        (
            vec!["dnat", "--ext-ip", EXT, "--int-ip", INT, "--ports", "34002"],
            0,
            true,
        ),
        // Docker is not reachable from this daemon: the daemon itself answers.
        (vec!["docker", "rm", "--id", "99"], 1, true),
    ];
    for (args, want, change) in &commands {
        let (pid, code, out) = cli_as(muid, 65534, &socket, args);
        assert_eq!(code, Some(*want), "member {args:?}: {out}");
        if *want == 1 {
            assert_ne!(out["error"]["code"], "daemon_unreachable", "{out}");
        }
        if *change {
            change_pids.push((pid, args[0]));
        }
    }
    let log = d.log();
    for (pid, cmd) in &change_pids {
        let needle = format!("uid={muid} pid={pid}");
        assert!(
            log.lines()
                .any(|l| l.contains("change requested") && l.contains(&needle)),
            "{cmd} by pid {pid} not logged with `{needle}`:\n{log}"
        );
    }

    // 100 restarts, watched: the socket is never anything but 0660
    // root:group, and the staging directory is never open to others.
    let stop = AtomicBool::new(false);
    let samples = AtomicU64::new(0);
    let seen_socket = AtomicU64::new(0);
    let seen_staging = AtomicU64::new(0);
    let bad = Mutex::new(Vec::<String>::new());
    let gid = accounts.gid;
    let dir_path = dir.path().to_owned();
    std::thread::scope(|s| {
        s.spawn(|| {
            let note = |what: String| {
                let mut b = bad.lock().unwrap();
                if b.len() < 20 {
                    b.push(what);
                }
            };
            while !stop.load(Ordering::Relaxed) {
                samples.fetch_add(1, Ordering::Relaxed);
                if let Ok(m) = fs::symlink_metadata(&socket) {
                    seen_socket.fetch_add(1, Ordering::Relaxed);
                    if m.mode() & 0o7777 != 0o660 || m.uid() != 0 || m.gid() != gid {
                        note(format!(
                            "socket mode {:o} owner {}:{}",
                            m.mode() & 0o7777,
                            m.uid(),
                            m.gid()
                        ));
                    }
                }
                let Ok(entries) = fs::read_dir(&dir_path) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !name.starts_with(".natmap-sock.") {
                        continue;
                    }
                    seen_staging.fetch_add(1, Ordering::Relaxed);
                    if let Ok(m) = fs::symlink_metadata(e.path()) {
                        if m.mode() & 0o077 != 0 {
                            note(format!("{name} mode {:o}", m.mode() & 0o7777));
                        }
                    }
                }
                std::thread::yield_now();
            }
        });
        for i in 0..100 {
            let status = d.stop();
            assert!(status.success(), "restart {i}: daemon exited {status}");
            assert!(
                !socket.exists(),
                "restart {i}: socket left behind after SIGTERM"
            );
            d.respawn();
            check_socket(&format!("restart {i}"));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let bad = bad.into_inner().unwrap();
    assert!(bad.is_empty(), "the watcher saw: {bad:#?}");
    let (_, code, out) = cli_as(muid, 65534, &socket, &["ls"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        out["data"]["rules"].as_array().unwrap().len(),
        1,
        "state survived 100 restarts"
    );
    d.assert_clean_log();
    report(&format!(
        "permissions: 100 SIGTERM restarts in {:.1} s, watcher took {} samples ({} saw the \
         socket, {} saw a staging dir), 0 bad modes",
        started.elapsed().as_secs_f64(),
        samples.load(Ordering::Relaxed),
        seen_socket.load(Ordering::Relaxed),
        seen_staging.load(Ordering::Relaxed),
    ));
}

// ───────────────────────────── 7. socket abuse ─────────────────────────────

/// One valid request of every kind (a base to corrupt).
fn request_templates() -> Vec<Value> {
    vec![
        json!({"cmd":"dnat","ext_ip":EXT,"int_ip":INT,"ports":"25,465","proto":"tcp","ext_if":"eth0","delete":false}),
        json!({"cmd":"snat","int_ip":"198.51.100.0/24","ext_if":"eth0","ext_ip":EXT,"delete":false}),
        json!({"cmd":"hairpin","ext_ip":EXT,"int_ip":INT,"ports":"80","proto":"udp","int_net":"198.51.100.0/24","delete":false}),
        json!({"cmd":"ls","filter":"dnat"}),
        json!({"cmd":"fwd","ipv6":true}),
        json!({"cmd":"ping"}),
        json!({"cmd":"clear"}),
        json!({"cmd":"docker_add","container":"web","mapping":"8080:80/tcp","network":"bridge"}),
        json!({"cmd":"docker_add","name":"web","mapping":"8080:192.0.2.10:80"}),
        json!({"cmd":"docker_rm","container":"web","name":"web","host_port":8080,"proto":"tcp","id":3}),
        json!({"cmd":"docker_remap","container":"web","old_port":8080,"new_port":8081,"proto":"udp"}),
    ]
}

fn envelope(request: &Value) -> Value {
    json!({"version": 1, "request": request})
}

fn line_of(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).unwrap();
    l.push(b'\n');
    l
}

/// Injections into string fields: line breaks (escaped in JSON, and raw,
/// which splits the line), rule syntax, quotes, NUL, Unicode separators.
const INJECTIONS: &[&str] = &[
    "\n-A INPUT -j ACCEPT",
    "\r\n-A PREROUTING -j DNAT --to-destination 6.6.6.6",
    "\nCOMMIT\n*filter\n-F\nCOMMIT",
    "\n",
    "\r",
    "\u{0}",
    "\" -j ACCEPT",
    " -j ACCEPT",
    "\u{2028}",
    "\u{85}",
    "$(reboot)",
    "`id`",
    ";reboot",
];

/// Values of the wrong type or range for any field.
fn wrong_values() -> Vec<Value> {
    vec![
        json!(1),
        json!(-1),
        json!(1.5),
        json!(true),
        json!([]),
        json!({}),
        json!(null),
        json!("x".repeat(2000)),
        json!(u64::MAX),
        json!(-0.0),
        json!(1e300),
        json!([1, 2]),
        json!({"a": "b"}),
        json!(""),
        json!("0"),
        json!("65536"),
        json!("999.1.1.1"),
        json!("eth0\n"),
        json!("../../etc/passwd"),
        json!("-j"),
        json!("!"),
    ]
}

/// ≥ 10,000 hostile lines, none of which is a valid request (checked with
/// the daemon's own parser), none longer than the limit. Each element is
/// the bytes to send; every `\n` in it ends one line the daemon answers.
fn hostile_lines(rng: &mut TestRng) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    // Newline (and other) injection into every string field of every command.
    for t in request_templates() {
        for (field, value) in t.as_object().unwrap() {
            let Some(s) = value.as_str() else { continue };
            for inj in INJECTIONS {
                for injected in [format!("{s}{inj}"), format!("{inj}{s}")] {
                    let mut r = t.clone();
                    r[field] = json!(injected);
                    let escaped = line_of(&envelope(&r));
                    // Raw: the JSON escape `\n` replaced by a real line break.
                    let raw = String::from_utf8(escaped.clone())
                        .unwrap()
                        .replacen("\\n", "\n", 1);
                    lines.push(escaped);
                    lines.push(raw.into_bytes());
                }
            }
        }
        // Unknown fields, in the request and in the envelope.
        let mut r = t.clone();
        r["comment"] = json!("x\n-A INPUT -j ACCEPT");
        lines.push(line_of(&envelope(&r)));
        let mut e = envelope(&t);
        e["extra"] = json!(true);
        lines.push(line_of(&e));
        // Wrong types for every field.
        for field in t.as_object().unwrap().keys() {
            for w in wrong_values() {
                let mut r = t.clone();
                r[field] = w;
                lines.push(line_of(&envelope(&r)));
            }
        }
        // Bad versions.
        for v in [
            json!(0),
            json!(2),
            json!("1"),
            json!(1.0),
            json!(-1),
            json!(4294967297u64),
            json!(null),
            json!([1]),
        ] {
            lines.push(line_of(&json!({"version": v, "request": t})));
        }
        lines.push(line_of(&json!({"request": t})));
        lines.push(line_of(&t));
    }
    // Deep nesting, below the length limit.
    for depth in [64, 127, 128, 129, 1000, 10_000, 30_000] {
        lines.push(format!("{}{}\n", "[".repeat(depth), "]".repeat(depth)).into_bytes());
        lines.push(
            format!(
                "{{\"version\":1,\"request\":{}1{}}}\n",
                "{\"a\":".repeat(depth.min(10_000)),
                "}".repeat(depth.min(10_000))
            )
            .into_bytes(),
        );
        lines.push(
            format!(
                "{{\"version\":1,\"request\":{{\"cmd\":\"ls\",\"filter\":{}\"x\"{}}}}}\n",
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes(),
        );
    }
    // Odd but short lines.
    for l in [
        "",
        " ",
        "\r",
        "{}",
        "[]",
        "null",
        "1",
        "\"x\"",
        "{\"version\":1}",
        "{\"version\":1,\"request\":null}",
        "{\"version\":1,\"request\":{}}",
        "{\"version\":1,\"request\":{\"cmd\":null}}",
        "{\"version\":1,\"request\":{\"cmd\":\"ping\"},\"request\":{\"cmd\":\"clear\"}}",
    ] {
        lines.push(format!("{l}\n").into_bytes());
    }
    // Random garbage: invalid UTF-8, NUL, control bytes, random JSON-ish text.
    let alphabet = b"{}[]\":,0123456789abcdefnulltrue\\ \t\x00\x01\x7f\xff\xfe\xc0\x80\xed\xa0";
    let templates = request_templates();
    while lines.len() < 10_500 {
        match rng.below(4) {
            0 => {
                let len = rng.below(300) as usize;
                let mut l: Vec<u8> = (0..len)
                    .map(|_| rng.below(256) as u8)
                    .filter(|b| *b != b'\n')
                    .collect();
                l.push(b'\n');
                lines.push(l);
            }
            1 => {
                let len = rng.below(200) as usize;
                let mut l: Vec<u8> = (0..len).map(|_| *rng.pick(alphabet)).collect();
                l.push(b'\n');
                lines.push(l);
            }
            2 => {
                // A valid request with one byte replaced (often invalid UTF-8 or NUL).
                let mut l = serde_json::to_vec(&envelope(rng.pick(&templates))).unwrap();
                let i = rng.below(l.len() as u64) as usize;
                l[i] = *rng.pick(&[0u8, 0xff, 0xc3, b'"', b'\\', b'}', b'\r', 0x7f]);
                l.push(b'\n');
                lines.push(l);
            }
            _ => {
                // A random field of a random command set to a random hostile value.
                let mut r = rng.pick(&templates).clone();
                let keys: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
                let field = rng.pick(&keys).clone();
                r[&field] = if rng.chance(0.5) {
                    rng.pick(&wrong_values()).clone()
                } else {
                    json!(format!(
                        "{}{}",
                        r[&field].as_str().unwrap_or("x"),
                        rng.pick(INJECTIONS)
                    ))
                };
                lines.push(line_of(&envelope(&r)));
            }
        }
    }
    // Keep only lines the daemon's own parser refuses: no line may be a
    // valid request (an accidental valid one would change the rules).
    lines.retain(|l| {
        l.split_inclusive(|b| *b == b'\n')
            .all(|part| natmap::daemon::server::parse_request(part).is_err())
    });
    lines
}

/// Sends every hostile line (4 connections at once, each line by line,
/// reading exactly one answer per line break). Returns the answers counted
/// by error code.
fn hostile_pass(socket: &Path, lines: &[Vec<u8>]) -> BTreeMap<String, usize> {
    let codes = Mutex::new(BTreeMap::<String, usize>::new());
    std::thread::scope(|s| {
        for chunk in lines.chunks(lines.len().div_ceil(4)) {
            let codes = &codes;
            s.spawn(move || {
                let mut conn = SocketClient::connect(socket).unwrap();
                let mut local = BTreeMap::<String, usize>::new();
                for l in chunk {
                    conn.send_raw(l).unwrap();
                    for _ in 0..l.iter().filter(|b| **b == b'\n').count() {
                        let shown = || String::from_utf8_lossy(&l[..l.len().min(300)]).into_owned();
                        let answer = conn
                            .read_response()
                            .unwrap_or_else(|e| panic!("{:?}: {e}", shown()))
                            .unwrap_or_else(|| panic!("closed after {:?}", shown()));
                        assert_eq!(answer["ok"], false, "{:?} → {answer}", shown());
                        assert!(
                            answer["error"]["message"]
                                .as_str()
                                .is_some_and(|m| !m.is_empty()),
                            "{answer}"
                        );
                        let code = answer["error"]["code"].as_str().expect("code").to_string();
                        *local.entry(code).or_default() += 1;
                    }
                }
                // Nothing more than one answer per line.
                conn.shutdown_write();
                assert!(conn.read_response().unwrap().is_none(), "extra answer");
                let mut all = codes.lock().unwrap();
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            });
        }
    });
    codes.into_inner().unwrap()
}

/// A line exactly at the limit (read and answered like any other, on a
/// connection that stays usable), then lines over it and a long stream
/// without any line break (each: one `line_too_long` answer, then the
/// connection closes). Returns the answers counted by error code.
fn big_lines_pass(socket: &Path) -> BTreeMap<String, usize> {
    let mut codes = BTreeMap::<String, usize>::new();
    let max = natmap::proto::MAX_LINE_BYTES;
    {
        let mut conn = SocketClient::connect(socket).unwrap();
        let mut at_limit = vec![b'x'; max];
        at_limit.push(b'\n');
        conn.send_raw(&at_limit).unwrap();
        let answer = conn.read_response().expect("answer").expect("one answer");
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        let pong = conn
            .call(&json!({"cmd": "ping"}))
            .expect("connection still usable");
        assert_eq!(pong["ok"], true, "{pong}");
        *codes.entry("invalid_request".into()).or_default() += 1;
    }
    for (size, newline) in [
        (max + 1, true),
        (max + 70 * 1024, true),
        (2 * max, true),
        (4 * max, true),
        (max + 200 * 1024, false),
    ] {
        let mut conn = SocketClient::connect(socket).unwrap();
        let mut huge = vec![if newline { b'{' } else { 0u8 }; size];
        if newline {
            huge.push(b'\n');
        }
        // The daemon may close before it has read all of it: EPIPE is fine.
        let _ = conn.send_raw(&huge);
        let answer = conn.read_response().expect("answer").expect("one answer");
        assert_eq!(answer["error"]["code"], "line_too_long", "{answer}");
        assert!(
            conn.read_response().map(|a| a.is_none()).unwrap_or(true),
            "closed after it"
        );
        *codes.entry("line_too_long".into()).or_default() += 1;
    }
    codes
}

#[test]
fn ten_thousand_hostile_lines_get_one_error_each_and_change_nothing() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let ns = bare_router();
    let d = isolated_daemon(&ns);
    let mut rng = TestRng::from_env("socket abuse");
    let lines = hostile_lines(&mut rng);
    let total: usize = lines
        .iter()
        .map(|l| l.iter().filter(|b| **b == b'\n').count())
        .sum();
    assert!(total >= 10_000, "only {total} lines");

    // Warm up, then measure the resident set: after the hostile lines,
    // after the lines at and over the limit (whose buffers raise the
    // allocator's high water once), and after the hostile lines twice more
    // (nothing may accumulate per line).
    for _ in 0..50 {
        assert_eq!(d.call(json!({"cmd": "ls"}))["ok"], true);
    }
    let socket = d.socket_path();
    let rss0 = d.rss_kib().expect("rss");
    let codes = hostile_pass(&socket, &lines);
    let rss1 = d.rss_kib().expect("daemon still running");
    let big = big_lines_pass(&socket);
    let rss2 = d.rss_kib().expect("daemon still running");
    for _ in 0..2 {
        assert_eq!(
            hostile_pass(&socket, &lines),
            codes,
            "the same lines, the same answers"
        );
    }
    let rss3 = d.rss_kib().expect("daemon still running");

    assert_eq!(d.call(json!({"cmd": "ping"}))["ok"], true, "still answers");
    for v6 in [false, true] {
        assert!(natmap_installed(&ns, v6).is_empty(), "a rule was installed");
    }
    assert!(
        current_state(&d.state_path()).rules.is_empty(),
        "state changed"
    );
    let growth = rss3.saturating_sub(rss0);
    let rss = format!(
        "{rss0} → {rss1} (hostile lines) → {rss2} (big lines) → {rss3} (hostile lines x2) KiB"
    );
    assert!(growth < 10 * 1024, "RSS grew {growth} KiB: {rss}");
    assert!(
        rss1.saturating_sub(rss0) < 2 * 1024,
        "RSS grew on short lines: {rss}"
    );
    assert!(rss3.saturating_sub(rss2) < 1024, "RSS keeps growing: {rss}");
    d.assert_clean_log();
    report(&format!(
        "socket abuse: {total} hostile lines over 4 connections (3 passes), answers per pass \
         by code {codes:?}; 6 lines at/over the {}-byte limit: {big:?}; RSS {rss} \
         (+{growth} KiB); {:.1} s",
        natmap::proto::MAX_LINE_BYTES,
        started.elapsed().as_secs_f64()
    ));
}

// ───────────────────────────── regressions ─────────────────────────────

/// Found while probing the `apply` document (a request whose rules are
/// `RuleSpec`s, not the typed request fields): a Docker rule in a document
/// is not validated like `docker add` is. Port 0 was accepted (the daemon
/// reserved a random ephemeral port and installed `--dport 0 … --to-
/// destination …:0`), and a name with a line break and terminal escape
/// sequences was stored and printed raw by `ls`. Every rule that reaches
/// the engine must pass the same checks as the command that adds it.
#[test]
fn apply_refuses_docker_rules_that_docker_add_would_refuse() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = isolated_daemon(&ns);
    let rule = |name: &str, host_port: u16, container_port: u16| {
        json!({"kind": "docker", "name": name, "host_port": host_port,
               "container_port": container_port, "proto": "tcp", "external": true,
               "target_v4": {"ip": INT}})
    };
    for (bad, field) in [
        (rule("web", 0, 80), "host_port"),
        (rule("web", 8080, 0), "container_port"),
        (rule("web\n\u{1b}[31mEVIL\u{1b}[0m", 8080, 80), "name"),
        (rule("", 8080, 80), "name"),
    ] {
        let answer =
            d.call(json!({"cmd": "apply", "document": {"schema_version": 1, "rules": [bad]}}));
        assert_eq!(answer["ok"], false, "accepted {bad}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(field),
            "{bad}: error does not name {field}: {answer}"
        );
        assert!(
            natmap_installed(&ns, false).is_empty(),
            "{bad}: rules installed"
        );
        assert!(
            current_state(&d.state_path()).rules.is_empty(),
            "{bad}: stored"
        );
    }
    d.assert_clean_log();
}
