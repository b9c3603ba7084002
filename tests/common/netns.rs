//! Named network namespaces: create, run commands and sysctls inside,
//! run a closure on a thread that entered one, delete on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use super::*;

/// Prefix of every namespace the harness creates (`nmt-<pid>-<n>-<role>`).
pub const NETNS_PREFIX: &str = "nmt-";

static NETNS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// The name is `nmt-<pid>-<n>-<role>`, unique per process (atomic counter)
/// and across concurrently running test processes (pid). On creation the
/// loopback interface is brought up, IPv6 duplicate address detection is
/// disabled (`accept_dad=0` for `all` and `default`), so IPv6 addresses are
/// usable (bindable, routable) immediately instead of staying "tentative"
/// for ~1-2 s, and the IPv4 settings a new namespace would otherwise copy
/// from the host are pinned: `ip_forward=0`, `rp_filter=0`,
/// `route_localnet=0` (all and default).
#[derive(Debug)]
pub struct Netns {
    /// The name as `ip netns list` shows it.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace; `role` (e.g. "router") only makes the name readable.
    pub fn new(role: &str) -> Netns {
        let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{n}-{role}", std::process::id());
        {
            let _guard = netns_lock();
            let out = run_with_timeout(
                Command::new("ip").args(["netns", "add", &name]),
                COMMAND_TIMEOUT,
            );
            check_output(&format!("ip netns add {name}"), &out);
        }
        let ns = Netns { name };
        ns.sysctl_set_many(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            // A new namespace inherits the IPv4 `all`/`default` settings of
            // the host (net.core.devconf_inherit_init_net=0 means exactly
            // that for IPv4; IPv6 starts from kernel defaults). Pin the ones
            // that change test outcomes so results don't depend on the host
            // (a Docker host has ip_forward=1, distributions set rp_filter).
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.route_localnet", "0"),
            ("net.ipv4.conf.default.route_localnet", "0"),
        ]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The bind-mounted namespace file, `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `ip netns exec <name> argv…` (bounded by [`COMMAND_TIMEOUT`]) and
    /// returns its output whatever the exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, argv: &[S]) -> Output {
        assert!(!argv.is_empty(), "Netns::exec needs a program");
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
            COMMAND_TIMEOUT,
        )
    }

    /// Like [`Netns::exec`] but panics (with stdout/stderr) unless the command
    /// succeeds; returns stdout.
    pub fn run_ok<S: AsRef<OsStr>>(&self, argv: &[S]) -> String {
        let out = self.exec(argv);
        check_output(&format!("[netns {}] {}", self.name, describe(argv)), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n <name> args…` (cheaper than `exec`: no mount namespace),
    /// panics on failure, returns stdout.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = run_with_timeout(
            Command::new("ip").args(["-n", &self.name]).args(args),
            COMMAND_TIMEOUT,
        );
        check_output(&format!("ip -n {} {}", self.name, describe(args)), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a sysctl of this namespace, e.g.
    /// `ns.sysctl_set("net.ipv4.ip_forward", "1")`. Done by writing
    /// `/proc/sys/...` from a thread inside the namespace (`/proc/sys/net`
    /// resolves against the calling *thread's* namespace), so no `sysctl`
    /// binary is needed. Panics if the key does not exist.
    pub fn sysctl_set(&self, key: &str, value: &str) {
        let path = sysctl_path(key);
        in_netns(self, || std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("[netns {}] sysctl {key}={value}: {e}", self.name));
    }

    /// Several [`Netns::sysctl_set`]s, in order, from one thread.
    pub fn sysctl_set_many(&self, settings: &[(&str, &str)]) {
        in_netns(self, || {
            for (key, value) in settings {
                std::fs::write(sysctl_path(key), value)
                    .unwrap_or_else(|e| panic!("[netns {}] sysctl {key}={value}: {e}", self.name));
            }
        })
    }

    /// Reads a sysctl of this namespace, trimmed; `None` if it does not exist.
    pub fn sysctl_get(&self, key: &str) -> Option<String> {
        let path = sysctl_path(key);
        in_netns(self, || std::fs::read_to_string(&path))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// True if `ip netns list` shows a namespace called `name`.
    pub fn exists(name: &str) -> bool {
        let out = run_with_timeout(Command::new("ip").args(["netns", "list"]), COMMAND_TIMEOUT);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _guard = netns_lock();
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "harness: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("harness: cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs `f` on a fresh thread that first entered `ns`'s network namespace
/// (`setns(open("/var/run/netns/NAME"), CLONE_NEWNET)`) and returns its
/// result; a panic in `f` is propagated.
///
/// Only the new thread switches namespace; the caller's does not. A socket
/// belongs to the namespace it was created in for its whole life, so a
/// listener or client socket made inside `f` and returned keeps living in
/// `ns` even when used from any other thread afterwards.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path();
    let name = &ns.name;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn_scoped(scope, move || {
                let file =
                    File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({}, CLONE_NEWNET): {e}", path.display()));
                f()
            })
            .expect("spawn in_netns thread");
        match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// Serialises `ip netns add/del` inside this process: concurrent first use of
/// `/run/netns` (which `ip` bind-mounts onto itself) is racy.
pub(super) fn netns_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits (≤ 5 s) until no process runs in `ns` any more: an
/// `iptables-restore` the killed daemon had started finishes on its own,
/// as systemd would also have killed it with the daemon's cgroup.
pub fn wait_namespace_idle(ns: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = run_with_timeout(
            Command::new("ip").args(["netns", "pids", &ns.name]),
            COMMAND_TIMEOUT,
        );
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still running in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
