//! The daemon under test as a process: its state directory, start (in a
//! namespace or the root namespace), restart, stop, kill, and its log.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;

/// Path of the binary under test (built by cargo for integration tests).
pub const LAB_OPS_BIN: &str = env!("CARGO_BIN_EXE_lab-ops");

/// How long [`Daemon::start`] waits for the control socket to accept.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Daemon::stop`] waits for the daemon to exit after SIGTERM.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable that picks the firewall backend of every
/// daemon the tests start: `iptables` (the default when unset) or
/// `nftables`. `scripts/test.sh` runs the namespace-only tests once more
/// with `NATMAP_TEST_BACKEND=nftables`.
pub const TEST_BACKEND_ENV: &str = "NATMAP_TEST_BACKEND";

/// The backend this test run's daemons use: [`TEST_BACKEND_ENV`]'s value,
/// `"iptables"` when unset. Panics on any other value, naming the accepted
/// ones.
pub fn test_backend() -> &'static str {
    match std::env::var(TEST_BACKEND_ENV) {
        Err(std::env::VarError::NotPresent) => "iptables",
        Ok(v) if v == "iptables" => "iptables",
        Ok(v) if v == "nftables" => "nftables",
        Ok(v) => panic!("{TEST_BACKEND_ENV}={v:?}: accepted values are iptables and nftables"),
        Err(e) => panic!("{TEST_BACKEND_ENV}: {e}; accepted values are iptables and nftables"),
    }
}

/// True when this run's daemons use the nftables backend ([`test_backend`]).
pub fn testing_nftables() -> bool {
    test_backend() == "nftables"
}

/// For a test whose body checks something only the iptables backend has:
/// on the nftables pass prints `skipped on nftables: NAME: REASON` on the
/// real stderr (shown without `--nocapture`) and returns false (the
/// iptables pass runs the body), true otherwise.
///
/// ```ignore
/// if !common::privileged() || !common::iptables_only("the shard layout") { return; }
/// ```
pub fn iptables_only(reason: &str) -> bool {
    if testing_nftables() {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let _ = writeln!(std::io::stderr(), "skipped on nftables: {test}: {reason}");
        false
    } else {
        true
    }
}

/// `--backend <test_backend()>` unless `args` already holds a `--backend`
/// (a test that picks its backend keeps its choice), or no backend was
/// asked for (then the daemon's own default is what runs, and is tested).
pub fn backend_args<S: AsRef<OsStr>>(args: &[S]) -> Vec<String> {
    let chosen = args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a == "--backend" || a.starts_with("--backend=")
    });
    if chosen || std::env::var_os(TEST_BACKEND_ENV).is_none() {
        Vec::new()
    } else {
        vec!["--backend".to_owned(), test_backend().to_owned()]
    }
}

/// `["--backend", test_backend()]`, for a test that spells a daemon's
/// command line itself.
pub fn backend_flag() -> [&'static str; 2] {
    ["--backend", test_backend()]
}

/// The command line of a daemon that a test runs to completion itself
/// rather than through [`Daemon`] (one that must refuse to start), for
/// [`Netns::exec`]: `lab-ops natmap --socket SOCKET daemon --state STATE
/// --socket-group root --backend BACKEND` ([`test_backend`]).
pub fn daemon_argv(socket: &Path, state: &Path) -> Vec<String> {
    let (socket, state) = (socket.display().to_string(), state.display().to_string());
    let argv = [
        LAB_OPS_BIN,
        "natmap",
        "--socket",
        &socket,
        "daemon",
        "--state",
        &state,
        "--socket-group",
        "root",
        backend_flag()[0],
        backend_flag()[1],
    ];
    argv.map(str::to_owned).to_vec()
}

/// A temporary directory for one daemon's state file, socket and log.
/// Cloning shares it; it is deleted when the last clone is dropped, so it
/// outlives daemon restarts as long as a [`Daemon`] or the test holds it.
#[derive(Clone, Debug)]
pub struct StateDir(Arc<tempfile::TempDir>);

impl StateDir {
    /// Creates a fresh empty directory (under `$TMPDIR`, i.e. usually /tmp).
    pub fn new() -> StateDir {
        let dir = tempfile::Builder::new()
            .prefix("natmap-test-")
            .tempdir()
            .expect("create temp state dir");
        StateDir(Arc::new(dir))
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    /// `DIR/state.json`, passed as `--state`.
    pub fn state_path(&self) -> PathBuf {
        self.path().join("state.json")
    }
    /// `DIR/natmap.sock`, passed as `--socket`.
    pub fn socket_path(&self) -> PathBuf {
        self.path().join("natmap.sock")
    }
    /// `DIR/daemon.log`: stdout and stderr of every daemon started on this
    /// dir, appended, each start preceded by a `=== harness: …` line.
    pub fn log_path(&self) -> PathBuf {
        self.path().join("daemon.log")
    }
}

impl Default for StateDir {
    fn default() -> Self {
        Self::new()
    }
}

/// The real `lab-ops natmap daemon`, running in a namespace:
///
/// `ip netns exec NS lab-ops -vv natmap daemon --state DIR/state.json
/// --socket DIR/natmap.sock --socket-group root`, output to DIR/daemon.log.
///
/// `ip netns exec` execs the binary, so the child's pid is the daemon's.
/// Drop SIGKILLs it if still running and, if the test is panicking, prints
/// the daemon log to stderr. The daemon also gets SIGKILL when the *thread*
/// that started it exits (`PR_SET_PDEATHSIG`, so a killed test run leaves no
/// daemon behind): start it from the test's own thread, not from a
/// short-lived helper thread.
///
/// [`Daemon::start_in_root_ns`] runs it in the namespace the test process
/// itself runs in instead (no `ip netns exec`), for tests that need the
/// host's real Docker engine; see `common::docker::RootDaemon` for the guard
/// that also removes its chains from the host.
///
/// Restart on the same state (crash recovery tests):
///
/// ```ignore
/// let mut d = Daemon::start(&topo.router);
/// d.cli_ok(&["dnat", ...]);
/// d.kill9();
/// d.respawn();            // or Daemon::start_with_state_dir(&topo.router, &d.state_dir())
/// ```
pub struct Daemon {
    /// `None`: the namespace of the test process (the host's root namespace).
    ns_name: Option<String>,
    /// Extra daemon arguments after `daemon --state … --socket …`.
    extra_args: Vec<std::ffi::OsString>,
    dir: StateDir,
    child: Option<Child>,
    /// Socket group, environment, state path and allowed log lines
    /// ([`Daemon::start_with_options`], [`Daemon::allow_log`]).
    opts: DaemonOptions,
}

impl Daemon {
    /// Starts a daemon in `ns` on a fresh [`StateDir`] and waits until its
    /// socket accepts a connection.
    pub fn start(ns: &Netns) -> Daemon {
        Self::start_with_state_dir(ns, &StateDir::new())
    }

    /// Starts a daemon in `ns` on an existing state dir (e.g. one of a
    /// daemon that was killed), waits until its socket accepts.
    pub fn start_with_state_dir(ns: &Netns, dir: &StateDir) -> Daemon {
        let mut d = Daemon {
            ns_name: Some(ns.name.clone()),
            extra_args: Vec::new(),
            dir: dir.clone(),
            child: None,
            opts: DaemonOptions::default(),
        };
        d.respawn();
        d
    }

    /// Starts a daemon in the test process's own network namespace (the
    /// host's root namespace, where Docker lives) on `dir`, with
    /// `extra_args` appended to the daemon command line (e.g.
    /// `--docker-socket PATH`), and waits until its socket accepts.
    ///
    /// It changes the HOST's iptables: callers must serialise such tests and
    /// remove natmap's chains afterwards even if the daemon was killed (see
    /// `common::docker::RootDaemon`).
    pub fn start_in_root_ns<S: AsRef<OsStr>>(dir: &StateDir, extra_args: &[S]) -> Daemon {
        let mut d = Daemon {
            ns_name: None,
            extra_args: extra_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            dir: dir.clone(),
            child: None,
            opts: DaemonOptions::default(),
        };
        d.respawn();
        d
    }

    /// The command that runs `argv` in this daemon's namespace: `ip netns
    /// exec NS argv…`, or `argv…` directly for the root namespace.
    pub(super) fn command_in_ns(&self, program: &str) -> Command {
        match &self.ns_name {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Human-readable place of the daemon for log lines.
    fn where_(&self) -> String {
        match &self.ns_name {
            Some(ns) => format!("netns {ns}"),
            None => "the root network namespace".to_string(),
        }
    }

    /// Starts a new daemon process on this daemon's namespace and state dir.
    /// The previous process must have exited ([`Daemon::kill9`],
    /// [`Daemon::stop`]); panics otherwise. Waits until the socket accepts
    /// a connection (≤ [`DAEMON_START_TIMEOUT`]); panics with the log if it
    /// does not, or if the daemon exits first.
    pub fn respawn(&mut self) {
        assert!(
            !self.is_running(),
            "Daemon::respawn: the previous daemon is still running"
        );
        let log_path = self.dir.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let mut cmd = self.command_in_ns(LAB_OPS_BIN);
        cmd.args(["-vv", "natmap", "daemon"])
            .arg("--state")
            .arg(self.state_path())
            .arg("--socket")
            .arg(self.dir.socket_path())
            .arg("--socket-group")
            .arg(self.opts.socket_group.as_deref().unwrap_or("root"))
            .args(&self.extra_args)
            .args(backend_args(&self.extra_args))
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        // If the test process dies (Ctrl-C, a harness timeout), take the
        // daemon with it instead of leaving it running in a deleted namespace.
        // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = writeln!(
            log,
            "=== harness: starting daemon in {}: {cmd:?}",
            self.where_()
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn daemon: {e}"));
        self.note(&format!("daemon pid {}", child.id()));
        self.child = Some(child);

        let socket = self.dir.socket_path();
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "daemon exited ({status}) before its socket {} accepted\n--- daemon log ---\n{}",
                    socket.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "daemon socket {} did not accept within {DAEMON_START_TIMEOUT:?}\n--- daemon log ---\n{}",
                    socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// The daemon's pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the daemon process has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILLs the daemon and reaps it. State file, socket file and log are
    /// left as they are (a crash). No-op if not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.note(&format!("SIGKILL to daemon pid {}", child.id()));
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to [`DAEMON_STOP_TIMEOUT`] for the daemon to
    /// exit; returns its exit status. If it does not exit in time it is
    /// SIGKILLed and this panics with the log. Panics if not running.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("Daemon::stop: daemon is not running");
        self.note(&format!("SIGTERM to daemon pid {}", child.id()));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "daemon did not exit within {DAEMON_STOP_TIMEOUT:?} after SIGTERM (killed)\n\
                         --- daemon log ---\n{}",
                        self.log()
                    );
                }
            }
        }
    }

    /// Like [`Daemon::stop`] but never panics (usable from `Drop`): SIGTERM,
    /// wait up to `timeout`, then SIGKILL. Returns the exit status if the
    /// daemon exited by itself after SIGTERM, `None` if it was not running
    /// or had to be killed. The outcome is noted in the daemon log.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.note(&format!("SIGTERM to daemon pid {}", child.id()));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.note(&format!("daemon exited after SIGTERM: {status}"));
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.note(&format!(
                        "daemon did not exit within {timeout:?} after SIGTERM: SIGKILLed"
                    ));
                    return None;
                }
            }
        }
    }

    /// Appends a `=== harness: <text>` line to the daemon log, so the log
    /// shows where the test killed, stopped or restarted the daemon.
    pub fn note(&self, text: &str) {
        if let Ok(mut log) = OpenOptions::new().append(true).open(self.dir.log_path()) {
            let _ = writeln!(log, "=== harness: {text}");
        }
    }

    /// The daemon log so far (all starts on this state dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.log_path()).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// The state dir (a clone; keeps the directory alive).
    pub fn state_dir(&self) -> StateDir {
        self.dir.clone()
    }

    /// The directory holding state, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `DIR/state.json`, or the path given in [`DaemonOptions::state_path`].
    pub fn state_path(&self) -> PathBuf {
        self.opts
            .state_path
            .clone()
            .unwrap_or_else(|| self.dir.state_path())
    }

    /// `DIR/natmap.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.socket_path()
    }

    /// Name of the namespace the daemon runs in.
    /// `""` for a daemon started with [`Daemon::start_in_root_ns`].
    pub fn netns_name(&self) -> &str {
        self.ns_name.as_deref().unwrap_or("")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "===== natmap daemon log ({}) =====\n{}\n===== end of daemon log =====",
                self.dir.log_path().display(),
                self.log()
            );
        }
    }
}

/// Non-default ways to start a [`Daemon`] ([`Daemon::start_with_options`]).
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// `--socket-group` (default `root`).
    pub socket_group: Option<String>,
    /// Extra daemon arguments, e.g. `--docker-socket /nonexistent`.
    pub extra_args: Vec<std::ffi::OsString>,
    /// Extra environment of the daemon process (e.g. `PATH`,
    /// `NATMAP_CRASH_AT`); see also [`Daemon::set_env`].
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// `--state` (default `DIR/state.json`), e.g. on a tiny tmpfs.
    pub state_path: Option<PathBuf>,
    /// Substrings of WARN/ERROR log lines the test expects ([`Daemon::allow_log`]).
    pub allowed_log: Vec<String>,
}

impl DaemonOptions {
    /// Options whose daemon does not talk to the host's Docker engine
    /// (`--docker-socket` pointing nowhere), so a Docker restart by another
    /// test cannot put a warning into this daemon's log.
    pub fn isolated() -> DaemonOptions {
        DaemonOptions {
            extra_args: vec![
                "--docker-socket".into(),
                "/nonexistent/natmap-test-no-docker.sock".into(),
            ],
            ..DaemonOptions::default()
        }
    }
}

impl Daemon {
    /// Starts a daemon in `ns` on `dir` with `opts`, waits until its socket accepts.
    pub fn start_with_options(ns: &Netns, dir: &StateDir, opts: DaemonOptions) -> Daemon {
        let mut d = Daemon {
            ns_name: Some(ns.name.clone()),
            extra_args: opts.extra_args.clone(),
            dir: dir.clone(),
            child: None,
            opts,
        };
        d.respawn();
        d
    }

    /// Sets an environment variable for the next [`Daemon::respawn`].
    pub fn set_env(&mut self, key: &str, value: impl AsRef<OsStr>) {
        self.remove_env(key);
        self.opts
            .env
            .push((key.into(), value.as_ref().to_os_string()));
    }

    /// Removes a variable set with [`Daemon::set_env`] (next respawn).
    pub fn remove_env(&mut self, key: &str) {
        self.opts.env.retain(|(k, _)| k != key);
    }

    /// The log patterns declared with [`Daemon::allow_log`] so far.
    pub(super) fn allowed_log(&self) -> &[String] {
        &self.opts.allowed_log
    }

    /// Declares that WARN/ERROR lines containing `pattern` are expected, so
    /// [`Daemon::assert_clean_log`] does not fail on them.
    pub fn allow_log(&mut self, pattern: &str) -> &mut Daemon {
        self.opts.allowed_log.push(pattern.to_string());
        self
    }

    /// The daemon's `VmRSS` in KiB (from `/proc/PID/status`), if running.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}
