//! Whether this process may run the real-kernel tests, and what happens when
//! it may not: skip with a visible `SKIP:` line, or fail under CI.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;

/// True if this process can run the real-kernel tests: euid 0, `ip`,
/// `iptables` and `ip6tables` on `PATH`, and network namespaces can actually
/// be created (checked once per process by creating and deleting one; root
/// inside an unprivileged container fails here).
///
/// If something is missing and the environment demands these tests
/// (`CI=true` or `NATMAP_REQUIRE_PRIVILEGED=1`), this PANICS naming what is
/// missing; otherwise it prints `SKIP: <reason> (<test name>)` to stderr
/// (uncaptured, so it shows in a normal `cargo test` run) and returns false.
///
/// The first successful call also removes namespaces left behind by earlier
/// test processes that died (`nmt-<pid>-…` whose pid no longer exists),
/// SIGKILLing whatever still runs inside them (e.g. a daemon of a test that
/// was itself SIGKILLed).
pub fn privileged() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        let mut missing = Vec::new();
        if !nix::unistd::geteuid().is_root() {
            missing.push("root (effective uid 0)".to_string());
        }
        for tool in ["ip", "iptables", "ip6tables"] {
            if find_on_path(tool).is_none() {
                missing.push(format!("`{tool}` on PATH"));
            }
        }
        if missing.is_empty() {
            if let Err(e) = probe_netns_creation() {
                missing.push(format!("permission to create network namespaces ({e})"));
            }
        }
        if missing.is_empty() {
            remove_stale_namespaces();
            Ok(())
        } else {
            Err(format!(
                "real-kernel integration test needs {}",
                missing.join(", ")
            ))
        }
    });
    match result {
        Ok(()) => true,
        Err(reason) => skip_or_fail(reason),
    }
}

/// A test's prerequisites are missing: panics when the environment demands
/// the test (`CI=true` or `NATMAP_REQUIRE_PRIVILEGED=1`), otherwise prints
/// `SKIP: <reason> (<test>)` and returns false.
pub fn skip_or_fail(reason: &str) -> bool {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("NATMAP_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    if required {
        panic!(
            "{reason} (CI=true or NATMAP_REQUIRE_PRIVILEGED=1 is set, so this is an \
             error, not a skip)"
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    // Written to the real stderr, not via eprintln!: libtest captures
    // the print macros of passing tests, and a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIP: {reason} ({test})");
    false
}

/// Full path of `tool` if it is an executable file in one of `PATH`'s directories.
pub fn find_on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn probe_netns_creation() -> Result<(), String> {
    let name = format!("{NETNS_PREFIX}{}-probe", std::process::id());
    let _guard = netns_lock();
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    Ok(())
}

/// Deletes `nmt-<pid>-…` namespaces whose creating process is gone.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let _guard = netns_lock();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Lines look like "nmt-123-4-router (id: 7)" or "nmt-123-4-router".
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its test process is still running (maybe in parallel)
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "harness: removing stale namespace {name}"
        );
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}
