//! natmap against the naive baseline (issue 6), side by side in one run.
//!
//! ```text
//! sudo cargo bench --bench natmap                 # or: sudo scripts/bench.sh
//! sudo cargo bench --bench natmap -- --out FILE --sizes 100,1000 --backends nft
//! ```
//!
//! For every backend present (iptables-nft, iptables-legacy) and every N
//! (100, 1000, 5000 existing mappings) it measures, each in its own fresh
//! network namespace:
//!
//! - **natmap**: the real `lab-ops` daemon (PATH points at a temp dir whose
//!   `iptables*`/`ip6tables*` are symlinks to the backend's binaries) and the
//!   real CLI process for every request: bulk install of N (`apply FILE` when
//!   the build has it, and N sequential `dnat` adds), single add and single
//!   remove at N (median), `ls --json` at N, daemon RSS, recovery at start
//!   into empty tables, idle CPU (the drift check), and 50 concurrent clients.
//! - **naive baseline**: the same 4 rules per mapping (nat PREROUTING and
//!   OUTPUT DNAT, 2 × filter FORWARD ACCEPT) with one `iptables` process per
//!   rule; removal lists each chain with line numbers and deletes by number;
//!   recovery runs `iptables -C` per rule and `-A` for the missing ones.
//! - **profile**: the pieces natmap's requests are made of, by hand, in a
//!   third namespace: `iptables-restore --noflush` of the payloads natmap
//!   sends (one mapping's diff, N mappings), `iptables-save`, `conntrack -D`,
//!   a state write of the daemon's state.json size, the CLI round trip.
//!
//! The namespaces are anonymous (`unshare(CLONE_NEWNET)` held by a file
//! descriptor): no rule, address or socket is created outside them, and they
//! vanish when the bench exits, however it exits (daemons get
//! `PR_SET_PDEATHSIG`). The CLI runs in the bench's own namespace: it only
//! talks to the daemon's Unix socket, which is a path in a temp dir.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The CLI and daemon binary cargo built with this bench (same profile).
const LAB_OPS: &str = env!("CARGO_BIN_EXE_lab-ops");

/// The external address every mapping forwards, and the internal target.
const EXT_IP: &str = "192.0.2.1";
const INT_IP: &str = "198.51.100.2";
/// Port ranges, disjoint: population `BASE+1..=BASE+N`, sampled baseline
/// mappings, single adds, concurrent adds.
const BASE_PORT: u16 = 10_000;
const SAMPLE_PORT: u16 = 25_000;
const SINGLE_PORT: u16 = 27_000;
const CONC_PORT: u16 = 30_000;
const MAX_SIZE: usize = 14_000;

/// Bound on any daemon start or stop (recovery of thousands on a loaded box).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the idle daemon is watched for its periodic drift-check CPU.
const IDLE_WINDOW: Duration = Duration::from_secs(4);

// ───────────────────────────── options ─────────────────────────────

#[derive(Debug, Clone)]
struct Opts {
    sizes: Vec<usize>,
    backends: Vec<String>,
    reps: usize,
    clients: usize,
    adds_per_client: usize,
    out: PathBuf,
    budget: Duration,
    seq_max: usize,
    exact_baseline_max: usize,
    sample: usize,
}

const HELP: &str = "natmap benchmark (issue 6): natmap vs. one iptables process per rule.

Run as root:  sudo cargo bench --bench natmap [-- OPTIONS]   (or sudo scripts/bench.sh [OPTIONS])

Options:
  --out FILE               also write the results (markdown) here [target/bench-results.md]
  --sizes LIST             existing mappings N [100,1000,5000]
  --backends LIST          nft,legacy [both, where present]
  --reps K                 repetitions of single add/remove/ls (median) [20]
  --clients C              concurrent clients [50]
  --adds-per-client K      adds each concurrent client makes [4]
  --budget-secs S          soft time budget; optional stages are skipped past it [600]
  --seq-max N              largest N for the N-sequential-adds row when `apply` exists [1000]
  --exact-baseline-max N   above this N the naive install/recovery (O(N^2)) is estimated
                           from a sample at chain length N/2 instead of run in full [1000]
  --sample K               mappings in that sample [25]";

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let default_out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results.md");
    let mut o = Opts {
        sizes: vec![100, 1000, 5000],
        backends: vec!["nft".into(), "legacy".into()],
        reps: 20,
        clients: 50,
        adds_per_client: 4,
        out: std::env::var_os("NATMAP_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or(default_out),
        budget: Duration::from_secs(600),
        seq_max: 1000,
        exact_baseline_max: 1000,
        sample: 25,
    };
    let mut it = args.iter();
    let num = |flag: &str, v: Option<&String>| -> Result<usize, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse::<usize>()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "--out" => o.out = PathBuf::from(it.next().ok_or("--out needs a file")?),
            "--sizes" => {
                o.sizes = it
                    .next()
                    .ok_or("--sizes needs a list")?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--sizes: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--backends" => {
                o.backends = it
                    .next()
                    .ok_or("--backends needs a list")?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .collect()
            }
            "--reps" => o.reps = num(a, it.next())?,
            "--clients" => o.clients = num(a, it.next())?,
            "--adds-per-client" => o.adds_per_client = num(a, it.next())?,
            "--budget-secs" => o.budget = Duration::from_secs(num(a, it.next())? as u64),
            "--seq-max" => o.seq_max = num(a, it.next())?,
            "--exact-baseline-max" => o.exact_baseline_max = num(a, it.next())?,
            "--sample" => o.sample = num(a, it.next())?,
            other => return Err(format!("unknown argument {other:?}\n\n{HELP}")),
        }
    }
    if o.sizes.iter().any(|n| !(1..=MAX_SIZE).contains(n)) {
        return Err(format!("--sizes: each N must be in 1..={MAX_SIZE}"));
    }
    if o.backends.iter().any(|b| b != "nft" && b != "legacy") {
        return Err("--backends: nft and/or legacy".into());
    }
    if o.reps == 0 || o.reps > 1000 || o.sample == 0 || o.sample > 1000 {
        return Err("--reps and --sample must be in 1..=1000".into());
    }
    if o.clients == 0 || o.adds_per_client == 0 || o.clients * o.adds_per_client > 20_000 {
        return Err("--clients × --adds-per-client must be in 1..=20000".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`.
        println!("natmap bench: skipped (run it with `sudo cargo bench --bench natmap`)");
        return ExitCode::SUCCESS;
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("natmap bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "natmap bench: must run as root: it creates network namespaces, runs the natmap \
             daemon and writes iptables rules (all inside its own namespaces).\n\
             Run:  sudo cargo bench --bench natmap   (or: sudo scripts/bench.sh)"
        );
        return ExitCode::from(1);
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natmap bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ───────────────────────────── values and results ─────────────────────────────

/// One measured number, or why there is none.
#[derive(Debug, Clone)]
enum Val {
    Time(Duration),
    /// Extrapolated from a sample (the full run would take too long).
    Est(Duration),
    Rate(f64),
    Bytes(u64),
    Pct(f64),
    Na(String),
}

impl Val {
    fn secs(&self) -> Option<f64> {
        match self {
            Val::Time(d) | Val::Est(d) => Some(d.as_secs_f64()),
            _ => None,
        }
    }
}

fn fmt_dur(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{:.0} s", ms / 1e3)
    }
}

impl std::fmt::Display for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Val::Time(d) => f.write_str(&fmt_dur(*d)),
            Val::Est(d) => write!(f, "≈{} (est.)", fmt_dur(*d)),
            Val::Rate(r) => write!(f, "{r:.0}/s"),
            Val::Bytes(b) if *b < 1_000_000 => write!(f, "{:.0} KB", *b as f64 / 1e3),
            Val::Bytes(b) => write!(f, "{:.1} MB", *b as f64 / 1e6),
            Val::Pct(p) => write!(f, "{p:.1} % of a core"),
            Val::Na(s) => f.write_str(s),
        }
    }
}

/// The measurements of one backend at one N.
#[derive(Debug, Default)]
struct Run {
    vals: BTreeMap<&'static str, Val>,
    notes: Vec<String>,
}

impl Run {
    fn set(&mut self, key: &'static str, v: Val) {
        self.vals.insert(key, v);
    }
    fn get(&self, key: &str) -> Option<&Val> {
        self.vals.get(key)
    }
    fn secs(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Val::secs)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

// ───────────────────────────── context ─────────────────────────────

struct Ctx {
    opts: Opts,
    start: Instant,
    /// `lab-ops natmap apply` exists in this build.
    apply: bool,
    conntrack: bool,
}

impl Ctx {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    fn over_budget(&self) -> bool {
        self.elapsed() > self.opts.budget
    }
    fn reps(&self, n: usize) -> usize {
        self.opts.reps.min(n)
    }
}

fn progress(msg: impl AsRef<str>) {
    let _ = writeln!(io::stderr(), "natmap bench: {}", msg.as_ref());
}

// ───────────────────────────── processes ─────────────────────────────

fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

fn output(cmd: &mut Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))
}

fn output_ok(cmd: &mut Command) -> Result<String, String> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Runs `cmd` with `input` on stdin; returns how long it took from spawn to exit.
fn timed_with_stdin(cmd: &mut Command, input: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {cmd:?}: {e}"))?;
    let elapsed = t.elapsed();
    written.map_err(|e| format!("writing to {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(elapsed)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ───────────────────────────── namespaces ─────────────────────────────

/// An anonymous network namespace, alive while this fd (or a process in it) is.
struct Netns {
    fd: File,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let fd = std::thread::spawn(|| -> Result<File, String> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
            File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_string())??;
        let ns = Netns { fd };
        if let Some(ip) = find_tool("ip") {
            ns.run(|| output_ok(Command::new(ip).args(["link", "set", "lo", "up"])))?;
        }
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace; processes it spawns (and
    /// threads it starts) are in the namespace too.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                setns(&self.fd, CloneFlags::CLONE_NEWNET).expect("setns into the bench namespace");
                f()
            });
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

// ───────────────────────────── backends ─────────────────────────────

/// One iptables backend: its binaries, and a dir of generic-name symlinks
/// for the daemon's PATH.
struct Backend {
    name: &'static str,
    bins: BTreeMap<&'static str, PathBuf>,
    bindir: tempfile::TempDir,
    version: String,
}

const GENERIC: [&str; 6] = [
    "iptables",
    "iptables-restore",
    "iptables-save",
    "ip6tables",
    "ip6tables-restore",
    "ip6tables-save",
];

impl Backend {
    fn detect(name: &'static str) -> Result<Backend, String> {
        let bindir = tempfile::Builder::new()
            .prefix("natmap-bench-bin-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut bins = BTreeMap::new();
        for generic in GENERIC {
            let (fam, rest) = generic.split_once('-').unwrap_or((generic, ""));
            let real = if rest.is_empty() {
                format!("{fam}-{name}")
            } else {
                format!("{fam}-{name}-{rest}")
            };
            let path = find_tool(&real).ok_or_else(|| format!("{real} not found"))?;
            std::os::unix::fs::symlink(&path, bindir.path().join(generic))
                .map_err(|e| format!("symlink {generic}: {e}"))?;
            bins.insert(generic, path);
        }
        let version = output_ok(Command::new(bindir.path().join("iptables")).arg("--version"))?
            .trim()
            .to_owned();
        let expect = if name == "nft" { "nf_tables" } else { "legacy" };
        if !version.contains(expect) {
            return Err(format!(
                "`iptables --version` through the {name} symlinks says {version:?}"
            ));
        }
        let b = Backend {
            name,
            bins,
            bindir,
            version,
        };
        // The backend must work in a fresh namespace (legacy needs ip_tables).
        let ns = Netns::new()?;
        ns.run(|| output_ok(b.cmd("iptables").args(["-w", "10", "-t", "nat", "-S"])))
            .map_err(|e| format!("{name} does not work in a network namespace: {e}"))?;
        Ok(b)
    }

    fn cmd(&self, generic: &str) -> Command {
        let mut c = Command::new(&self.bins[generic]);
        c.stdin(Stdio::null());
        c
    }

    fn daemon_path(&self) -> OsString {
        let mut p = OsString::from(self.bindir.path());
        p.push(":");
        p.push(std::env::var_os("PATH").unwrap_or_default());
        p.push(":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin");
        p
    }

    /// `iptables -t TABLE -S CHAIN` lines starting `-A CHAIN `; `None` if the chain is absent.
    fn count(&self, table: &str, chain: &str) -> Option<usize> {
        let out = output(
            self.cmd("iptables")
                .args(["-w", "10", "-t", table, "-S", chain]),
        )
        .ok()?;
        if !out.status.success() {
            return None;
        }
        let prefix = format!("-A {chain} ");
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .count(),
        )
    }

    fn restore(&self, v6: bool, payload: &str) -> Result<Duration, String> {
        let tool = if v6 {
            "ip6tables-restore"
        } else {
            "iptables-restore"
        };
        timed_with_stdin(self.cmd(tool).args(["--noflush", "-w", "10"]), payload)
    }
}

// ───────────────────────────── the natmap daemon ─────────────────────────────

struct Daemon<'a> {
    ns: &'a Netns,
    path_env: OsString,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    fn new(ns: &'a Netns, b: &Backend) -> Result<Daemon<'a>, String> {
        Ok(Daemon {
            ns,
            path_env: b.daemon_path(),
            dir: tempfile::Builder::new()
                .prefix("natmap-bench-")
                .tempdir()
                .map_err(|e| format!("temp dir: {e}"))?,
            child: None,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("natmap.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Spawns the daemon inside the namespace and returns when its socket
    /// accepts; the duration is from just before the spawn.
    fn start(&mut self) -> Result<Duration, String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("daemon log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("daemon log: {e}"))?;
        let mut cmd = Command::new(LAB_OPS);
        cmd.args(["natmap", "--socket"])
            .arg(self.socket())
            .args(["daemon", "--state"])
            .arg(self.state())
            .args(["--socket-group", "root", "--docker-socket"])
            // No Docker: the daemon must not watch the host's engine.
            .arg(self.dir.path().join("no-docker.sock"))
            .env("PATH", &self.path_env)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let fd = self.ns.fd.as_raw_fd();
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Never outlive the bench (spawned from the main thread).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t0 = Instant::now();
        let child = cmd.spawn().map_err(|e| format!("spawn daemon: {e}"))?;
        self.child = Some(child);
        let socket = self.socket();
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(t0.elapsed());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "daemon exited ({status}) before answering\n{}",
                    self.log_tail()
                ));
            }
            if t0.elapsed() > DAEMON_TIMEOUT {
                self.kill9();
                return Err(format!(
                    "daemon did not answer within {DAEMON_TIMEOUT:?}\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// SIGTERM (the daemon removes its rules, keeps its state) and wait.
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let t = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if t.elapsed() < DAEMON_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("daemon did not stop within {DAEMON_TIMEOUT:?}"));
                }
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(LAB_OPS);
        c.arg("natmap")
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs one CLI command; returns its wall time (spawn to exit) and output.
    fn cli_timed(&self, args: &[&str]) -> Result<(Duration, Output), String> {
        let mut cmd = self.cli_cmd(args);
        let t = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run lab-ops: {e}"))?;
        Ok((t.elapsed(), out))
    }

    /// [`Daemon::cli_timed`] that fails unless the command succeeded.
    fn cli_ok(&self, args: &[&str]) -> Result<Duration, String> {
        let (t, out) = self.cli_timed(args)?;
        if out.status.success() {
            Ok(t)
        } else {
            Err(format!(
                "lab-ops natmap {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    fn rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time of the daemon and its waited-for children (iptables-save), in seconds.
    fn cpu_secs(&self) -> Option<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|x| x.parse().ok())
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f.len() == 4).then(|| f.iter().sum::<u64>() as f64 / hz)
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn dnat_args(port: u16) -> Vec<String> {
    ["dnat", "--ext-ip", EXT_IP, "--int-ip", INT_IP, "--ports"]
        .iter()
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// How N mappings get into the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BulkMode {
    /// `lab-ops natmap apply FILE`: one request, one transaction.
    Apply,
    /// N `lab-ops natmap dnat …` processes, one after the other.
    Sequential,
}

impl BulkMode {
    fn key(self) -> &'static str {
        match self {
            BulkMode::Apply => "bulk",
            BulkMode::Sequential => "bulk_seq",
        }
    }
}

/// The `apply` document making the daemon's rules exactly `ports`' mappings.
fn apply_document(ports: &[u16]) -> String {
    let rules: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| {
            serde_json::json!({
                "kind": "dnat", "ext_ip": EXT_IP, "int_ip": INT_IP,
                "ports": p.to_string(), "proto": "tcp", "ext_if": null,
            })
        })
        .collect();
    serde_json::json!({ "schema_version": 1, "rules": rules }).to_string()
}

/// Installs the mappings of `ports` into a daemon, timed end to end
/// (CLI processes included). The one place that knows how bulk is done.
fn bulk_install(d: &Daemon, ports: &[u16], mode: BulkMode) -> Result<Duration, String> {
    match mode {
        BulkMode::Apply => {
            let file = d.dir.path().join("bulk.json");
            fs::write(&file, apply_document(ports)).map_err(|e| format!("write doc: {e}"))?;
            let file = file.to_string_lossy().into_owned();
            d.cli_ok(&["apply", &file])
        }
        BulkMode::Sequential => {
            let t = Instant::now();
            for &p in ports {
                d.cli_ok(&strs(&dnat_args(p)))?;
            }
            Ok(t.elapsed())
        }
    }
}

fn expect_natmap_rules(b: &Backend, ns: &Netns, expected: usize) -> Result<(), String> {
    match ns.run(|| b.count("nat", "NATMAP")) {
        Some(n) if n == expected => Ok(()),
        other => Err(format!(
            "nat NATMAP holds {other:?} rules, expected {expected}"
        )),
    }
}

/// `clients` threads, each adding `per_client` mappings through the CLI.
/// Returns acknowledged adds per second (wall time from a common start).
fn concurrent_natmap(d: &Daemon, clients: usize, per_client: usize) -> (f64, usize) {
    let acked = AtomicUsize::new(0);
    let barrier = Barrier::new(clients + 1);
    let elapsed = std::thread::scope(|s| {
        for c in 0..clients {
            let (acked, barrier) = (&acked, &barrier);
            s.spawn(move || {
                barrier.wait();
                for j in 0..per_client {
                    let port = CONC_PORT + (c * per_client + j) as u16;
                    if d.cli_ok(&strs(&dnat_args(port))).is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        barrier.wait();
        // The scope joins every client before returning.
        Instant::now()
    })
    .elapsed();
    let acked = acked.into_inner();
    (acked as f64 / elapsed.as_secs_f64(), acked)
}

fn natmap_phase(ctx: &Ctx, b: &Backend, n: usize, run: &mut Run) -> Result<(), String> {
    let tag = format!("[{} N={n}] natmap:", b.name);
    let ns = Netns::new()?;
    let mut d = Daemon::new(&ns, b)?;
    d.start()?;
    let ports: Vec<u16> = (1..=n).map(|i| BASE_PORT + i as u16).collect();

    // What the daemon does for `apply` short of iptables and the state
    // write: `--dry-run` plans it (reservations, render, diff) and answers.
    if ctx.apply {
        let file = d.dir.path().join("bulk.json");
        fs::write(&file, apply_document(&ports)).map_err(|e| format!("write doc: {e}"))?;
        let file = file.to_string_lossy().into_owned();
        for (key, args) in [
            ("p_apply_dry", vec!["--dry-run", "apply", &file]),
            (
                "p_apply_dry_json",
                vec!["--json", "--dry-run", "apply", &file],
            ),
        ] {
            run.set(key, timed_median(3, || d.cli_ok(&args)));
        }
    }

    // Bulk install of N into an empty daemon.
    let mut mode = if ctx.apply {
        BulkMode::Apply
    } else {
        BulkMode::Sequential
    };
    match bulk_install(&d, &ports, mode) {
        Ok(t) => run.set(mode.key(), Val::Time(t)),
        Err(e) if mode == BulkMode::Apply => {
            progress(format!(
                "{tag} apply failed, populating by sequential adds: {e}"
            ));
            run.set("bulk", Val::Na(format!("error: {}", first_line(&e))));
            mode = BulkMode::Sequential;
            let t = bulk_install(&d, &ports, mode)?;
            run.set(mode.key(), Val::Time(t));
        }
        Err(e) => return Err(e),
    }
    expect_natmap_rules(b, &ns, n)?;
    progress(format!(
        "{tag} bulk install ({mode:?}): {}",
        run.vals[mode.key()]
    ));
    let mut live: BTreeSet<u16> = ports.iter().copied().collect();
    let reps = ctx.reps(n);

    // CLI round trip floor and ls --json.
    let mut pings = Vec::new();
    let mut ls = Vec::new();
    for _ in 0..reps {
        pings.push(d.cli_ok(&["ping"])?);
        ls.push(d.cli_ok(&["--json", "ls"])?);
    }
    run.set("ping", Val::Time(median(pings)));
    run.set("ls", Val::Time(median(ls)));
    if let Some(rss) = d.rss_bytes() {
        run.set("rss", Val::Bytes(rss));
    }

    // A state write of the size the daemon writes now, by hand.
    let state = fs::read(d.state()).map_err(|e| format!("read state: {e}"))?;
    run.set("state_size", Val::Bytes(state.len() as u64));
    run.set(
        "p_state_write",
        Val::Time(state_write_cost(d.dir.path(), &state, 10)?),
    );

    // Single add and remove short of iptables and the state write.
    let mut i = 0;
    run.set(
        "p_add_dry",
        timed_median(reps, || {
            i += 1;
            let mut args = vec!["--dry-run".to_owned()];
            args.extend(dnat_args(SINGLE_PORT + 1000 + i));
            d.cli_ok(&strs(&args))
        }),
    );
    let mut i = 0;
    run.set(
        "p_del_dry",
        timed_median(reps, || {
            i += 1;
            let mut args = vec!["--dry-run".to_owned()];
            args.extend(dnat_args(ports[(i as usize * n / reps) % n]));
            args.push("--delete".into());
            d.cli_ok(&strs(&args))
        }),
    );

    // Single add, then single remove of existing mappings spread over the set.
    let mut adds = Vec::new();
    for i in 0..reps {
        let port = SINGLE_PORT + i as u16;
        adds.push(d.cli_ok(&strs(&dnat_args(port)))?);
        live.insert(port);
    }
    run.set("add", Val::Time(median(adds)));
    let mut removes = Vec::new();
    for i in 0..reps {
        let port = ports[i * n / reps];
        let mut args = dnat_args(port);
        args.push("--delete".into());
        removes.push(d.cli_ok(&strs(&args))?);
        live.remove(&port);
    }
    run.set("remove", Val::Time(median(removes)));
    expect_natmap_rules(b, &ns, live.len())?;
    progress(format!(
        "{tag} add {} remove {} ls --json {}",
        run.vals["add"], run.vals["remove"], run.vals["ls"]
    ));

    // Recovery: stop (the daemon removes its chains), start into empty tables.
    d.stop()?;
    if let Some(left) = ns.run(|| b.count("nat", "NATMAP")) {
        return Err(format!(
            "after SIGTERM nat NATMAP still exists ({left} rules)"
        ));
    }
    let to_socket = d.start()?;
    let expected = live.len();
    let checking = Instant::now();
    let mut first = true;
    let recovered = loop {
        // The daemon binds its socket after the rules are in; check anyway,
        // and if they are not there yet, keep the clock running until they are.
        if ns.run(|| b.count("nat", "NATMAP")) == Some(expected) {
            break if first {
                to_socket
            } else {
                to_socket + checking.elapsed()
            };
        }
        first = false;
        if checking.elapsed() > DAEMON_TIMEOUT {
            return Err("recovered rules never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    run.set("recovery", Val::Time(recovered));
    progress(format!(
        "{tag} recovery of {expected}: {}",
        fmt_dur(recovered)
    ));

    // Idle CPU: the periodic drift check (iptables-save of both families).
    std::thread::sleep(Duration::from_millis(300));
    if let Some(c0) = d.cpu_secs() {
        std::thread::sleep(IDLE_WINDOW);
        if let Some(c1) = d.cpu_secs() {
            run.set(
                "idle_cpu",
                Val::Pct((c1 - c0) / IDLE_WINDOW.as_secs_f64() * 100.0),
            );
        }
    }

    // Many clients at once.
    let (rate, acked) = concurrent_natmap(&d, ctx.opts.clients, ctx.opts.adds_per_client);
    run.set("conc", Val::Rate(rate));
    let total = ctx.opts.clients * ctx.opts.adds_per_client;
    if acked != total {
        run.notes.push(format!(
            "natmap: {acked} of {total} concurrent adds were acknowledged"
        ));
    }
    expect_natmap_rules(b, &ns, live.len() + acked)?;
    progress(format!(
        "{tag} {} clients: {rate:.0} acked adds/s",
        ctx.opts.clients
    ));
    d.stop()?;
    drop(d);

    // The other bulk mode as an extra row.
    if mode == BulkMode::Apply {
        if n > ctx.opts.seq_max {
            run.set(
                "bulk_seq",
                Val::Na(format!("skipped (N > --seq-max {})", ctx.opts.seq_max)),
            );
        } else if ctx.over_budget() {
            run.set("bulk_seq", Val::Na("skipped (time budget)".into()));
        } else {
            let mut d2 = Daemon::new(&ns, b)?;
            d2.start()?;
            let t = bulk_install(&d2, &ports, BulkMode::Sequential)?;
            expect_natmap_rules(b, &ns, n)?;
            run.set("bulk_seq", Val::Time(t));
            progress(format!("{tag} {n} sequential adds: {}", fmt_dur(t)));
            d2.stop()?;
        }
    } else if !run.vals.contains_key("bulk") {
        run.set("bulk", Val::Na("n/a: this build has no `apply`".into()));
    }
    Ok(())
}

/// Median of `reps` timed runs of `f`, or why it failed (optional measurements).
fn timed_median(reps: usize, mut f: impl FnMut() -> Result<Duration, String>) -> Val {
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        match f() {
            Ok(t) => v.push(t),
            Err(e) => return Val::Na(format!("error: {}", first_line(&e))),
        }
    }
    Val::Time(median(v))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Write temp, fsync, rename, fsync dir: what natmap does per change.
fn state_write_cost(dir: &Path, bytes: &[u8], reps: usize) -> Result<Duration, String> {
    let tmp = dir.join("probe.json.tmp");
    let dst = dir.join("probe.json");
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut f = File::create(&tmp).map_err(|e| e.to_string())?;
        f.write_all(bytes).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        drop(f);
        fs::rename(&tmp, &dst).map_err(|e| e.to_string())?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())?;
        v.push(t.elapsed());
    }
    let _ = fs::remove_file(dst);
    Ok(median(v))
}

// ───────────────────────────── the naive baseline ─────────────────────────────

/// The 4 rules of one mapping as a naive script writes them (same matches
/// as natmap's, directly in the built-in chains).
fn naive_rules(port: u16) -> [(&'static str, &'static str, String); 4] {
    let c = format!("-m comment --comment naive:{port}");
    let dnat = format!(
        "-d {EXT_IP}/32 -p tcp -m tcp --dport {port} {c} -j DNAT --to-destination {INT_IP}"
    );
    [
        ("nat", "PREROUTING", dnat.clone()),
        ("nat", "OUTPUT", dnat),
        (
            "filter",
            "FORWARD",
            format!("-d {INT_IP}/32 -p tcp -m tcp --dport {port} -m conntrack --ctstate DNAT {c} -j ACCEPT"),
        ),
        (
            "filter",
            "FORWARD",
            format!("-s {INT_IP}/32 -p tcp -m tcp --sport {port} -m conntrack --ctstate DNAT {c} -j ACCEPT"),
        ),
    ]
}

fn ipt(b: &Backend, table: &str, op: &str, chain: &str, spec: &str) -> Result<Output, String> {
    output(
        b.cmd("iptables")
            .args(["-w", "10", "-t", table, op, chain])
            .args(spec.split_whitespace()),
    )
}

fn ipt_ok(b: &Backend, table: &str, op: &str, chain: &str, spec: &str) -> Result<(), String> {
    let out = ipt(b, table, op, chain, spec)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables -t {table} {op} {chain} {spec}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Add one mapping: 4 processes.
fn naive_add(b: &Backend, port: u16) -> Result<(), String> {
    for (t, c, spec) in naive_rules(port) {
        ipt_ok(b, t, "-A", c, &spec)?;
    }
    Ok(())
}

/// Remove one mapping: for each rule, list its chain with line numbers,
/// find the line, delete by number (8 processes).
fn naive_remove(b: &Backend, port: u16) -> Result<(), String> {
    let needle = format!("/* naive:{port} */");
    for (table, chain, _) in naive_rules(port) {
        let listing = output_ok(b.cmd("iptables").args([
            "-w",
            "10",
            "-t",
            table,
            "-L",
            chain,
            "--line-numbers",
            "-n",
        ]))?;
        let num = listing
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split_whitespace().next())
            .ok_or_else(|| format!("mapping {port} not found in {table} {chain}"))?
            .to_owned();
        ipt_ok(b, table, "-D", chain, &num)?;
    }
    Ok(())
}

/// Recover one mapping: `-C` per rule, `-A` if missing.
fn naive_recover(b: &Backend, port: u16) -> Result<(), String> {
    for (t, c, spec) in naive_rules(port) {
        if !ipt(b, t, "-C", c, &spec)?.status.success() {
            ipt_ok(b, t, "-A", c, &spec)?;
        }
    }
    Ok(())
}

/// Puts the mappings in with one restore (setup, not measured).
fn naive_populate(b: &Backend, ports: &[u16]) -> Result<(), String> {
    let mut nat = String::from("*nat\n");
    let mut filter = String::from("*filter\n");
    for &p in ports {
        for (t, c, spec) in naive_rules(p) {
            let out = if t == "nat" { &mut nat } else { &mut filter };
            let _ = writeln!(out, "-A {c} {spec}");
        }
    }
    b.restore(false, &format!("{nat}COMMIT\n{filter}COMMIT\n"))
        .map(drop)
}

fn naive_flush(b: &Backend) -> Result<(), String> {
    b.restore(
        false,
        "*nat\n-F PREROUTING\n-F OUTPUT\nCOMMIT\n*filter\n-F FORWARD\nCOMMIT\n",
    )
    .map(drop)
}

fn expect_naive(b: &Backend, expected: usize) -> Result<(), String> {
    match b.count("nat", "PREROUTING") {
        Some(n) if n == expected => Ok(()),
        other => Err(format!(
            "baseline nat PREROUTING holds {other:?} rules, expected {expected}"
        )),
    }
}

/// Time per mapping of `op` on the sampled mappings, at chain length `n/2`
/// (the mean length while N mappings go in one by one), times N.
fn naive_estimate(
    b: &Backend,
    n: usize,
    sample: usize,
    op: fn(&Backend, u16) -> Result<(), String>,
) -> Result<Duration, String> {
    let half: Vec<u16> = (1..=n / 2).map(|i| BASE_PORT + i as u16).collect();
    naive_flush(b)?;
    naive_populate(b, &half)?;
    let t = Instant::now();
    for i in 1..=sample {
        op(b, SAMPLE_PORT + i as u16)?;
    }
    Ok(t.elapsed() / sample as u32 * n as u32)
}

fn concurrent_naive(b: &Backend, clients: usize, per_client: usize) -> (f64, usize) {
    let acked = AtomicUsize::new(0);
    let barrier = Barrier::new(clients + 1);
    let elapsed = std::thread::scope(|s| {
        for c in 0..clients {
            let (acked, barrier) = (&acked, &barrier);
            s.spawn(move || {
                barrier.wait();
                for j in 0..per_client {
                    if naive_add(b, CONC_PORT + (c * per_client + j) as u16).is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        barrier.wait();
        Instant::now()
    })
    .elapsed();
    let acked = acked.into_inner();
    (acked as f64 / elapsed.as_secs_f64(), acked)
}

fn baseline_phase(ctx: &Ctx, b: &Backend, n: usize, run: &mut Run) -> Result<(), String> {
    let tag = format!("[{} N={n}] baseline:", b.name);
    let ns = Netns::new()?;
    ns.run(|| -> Result<(), String> {
        let ports: Vec<u16> = (1..=n).map(|i| BASE_PORT + i as u16).collect();
        let exact = n <= ctx.opts.exact_baseline_max;
        let sample = ctx.opts.sample;

        // Install N, one process per rule.
        if exact {
            let t = Instant::now();
            for &p in &ports {
                naive_add(b, p)?;
            }
            run.set("b_bulk", Val::Time(t.elapsed()));
        } else {
            let est = naive_estimate(b, n, sample, naive_add)?;
            run.set("b_bulk", Val::Est(est));
            naive_flush(b)?;
            naive_populate(b, &ports)?;
        }
        expect_naive(b, n)?;
        progress(format!("{tag} install {}", run.vals["b_bulk"]));

        // Single add and list-and-delete-by-number remove, as for natmap.
        let reps = ctx.reps(n);
        let mut adds = Vec::new();
        for i in 0..reps {
            let t = Instant::now();
            naive_add(b, SINGLE_PORT + i as u16)?;
            adds.push(t.elapsed());
        }
        run.set("b_add", Val::Time(median(adds)));
        let mut removes = Vec::new();
        let mut live: BTreeSet<u16> = ports.iter().copied().collect();
        live.extend((0..reps).map(|i| SINGLE_PORT + i as u16));
        for i in 0..reps {
            let port = ports[i * n / reps];
            let t = Instant::now();
            naive_remove(b, port)?;
            removes.push(t.elapsed());
            live.remove(&port);
        }
        run.set("b_remove", Val::Time(median(removes)));
        expect_naive(b, live.len())?;
        progress(format!(
            "{tag} add {} remove {}",
            run.vals["b_add"], run.vals["b_remove"]
        ));

        // Recovery into empty tables: -C per rule, -A the missing ones.
        if exact {
            naive_flush(b)?;
            let t = Instant::now();
            for &p in &live {
                naive_recover(b, p)?;
            }
            run.set("b_recovery", Val::Time(t.elapsed()));
        } else {
            let est = naive_estimate(b, live.len(), sample, naive_recover)?;
            run.set("b_recovery", Val::Est(est));
            naive_flush(b)?;
            naive_populate(b, &live.iter().copied().collect::<Vec<_>>())?;
        }
        expect_naive(b, live.len())?;
        progress(format!("{tag} recovery {}", run.vals["b_recovery"]));

        let (rate, acked) = concurrent_naive(b, ctx.opts.clients, ctx.opts.adds_per_client);
        run.set("b_conc", Val::Rate(rate));
        let total = ctx.opts.clients * ctx.opts.adds_per_client;
        if acked != total {
            run.notes.push(format!(
                "baseline: {acked} of {total} concurrent adds succeeded"
            ));
        }
        progress(format!(
            "{tag} {} clients: {rate:.0} adds/s",
            ctx.opts.clients
        ));
        Ok(())
    })
}

// ───────────────────────────── profile: natmap's pieces by hand ─────────────────────────────

fn natmap_lines(id: usize, port: u16) -> (String, String, String) {
    let c = format!("-m comment --comment natmap:dnat:{id}");
    (
        format!(
            "-d {EXT_IP}/32 -p tcp -m tcp --dport {port} {c} -j DNAT --to-destination {INT_IP}"
        ),
        format!(
            "-d {INT_IP}/32 -p tcp -m tcp --dport {port} -m conntrack --ctstate DNAT {c} -j ACCEPT"
        ),
        format!(
            "-s {INT_IP}/32 -p tcp -m tcp --sport {port} -m conntrack --ctstate DNAT {c} -j ACCEPT"
        ),
    )
}

const NAT_CHAINS: &str = ":NATMAP - [0:0]\n:NATMAP-OUTPUT - [0:0]\n:NATMAP-POSTROUTING - [0:0]\n";

/// natmap's chains declared (so flushed) and refilled with N mappings, as
/// natmap's full rewrite sends it; `insert_form` writes every line as
/// `-I CHAIN POS` the way a diff from empty chains does.
fn full_payload(n: usize, hooks: bool, insert_form: bool) -> String {
    let (mut pre, mut out, mut fwd) = (String::new(), String::new(), String::new());
    for id in 1..=n {
        let (dnat, acc_d, acc_s) = natmap_lines(id, BASE_PORT + id as u16);
        if insert_form {
            let _ = writeln!(pre, "-I NATMAP {id} {dnat}");
            let _ = writeln!(out, "-I NATMAP-OUTPUT {id} {dnat}");
            let _ = writeln!(fwd, "-I NATMAP {} {acc_d}", 2 * id - 1);
            let _ = writeln!(fwd, "-I NATMAP {} {acc_s}", 2 * id);
        } else {
            let _ = writeln!(pre, "-A NATMAP {dnat}");
            let _ = writeln!(out, "-A NATMAP-OUTPUT {dnat}");
            let _ = writeln!(fwd, "-A NATMAP {acc_d}");
            let _ = writeln!(fwd, "-A NATMAP {acc_s}");
        }
    }
    let (nat_hooks, filter_decl, filter_hooks) = if hooks {
        (
            "-I PREROUTING 1 -j NATMAP\n-I OUTPUT 1 -j NATMAP-OUTPUT\n-I POSTROUTING 1 -j NATMAP-POSTROUTING\n",
            ":DOCKER-USER - [0:0]\n",
            "-I DOCKER-USER 1 -j NATMAP\n-I FORWARD 1 -j DOCKER-USER\n",
        )
    } else {
        ("", "", "")
    };
    format!(
        "*nat\n{NAT_CHAINS}{pre}{out}{nat_hooks}COMMIT\n*filter\n:NATMAP - [0:0]\n{filter_decl}{fwd}{filter_hooks}COMMIT\n"
    )
}

fn empty_payload() -> String {
    format!("*nat\n{NAT_CHAINS}COMMIT\n*filter\n:NATMAP - [0:0]\nCOMMIT\n")
}

/// One mapping's diff as natmap sends it: appended (ids only grow).
fn add_payload(id: usize, port: u16) -> String {
    let (dnat, d, s) = natmap_lines(id, port);
    format!(
        "*nat\n-A NATMAP {dnat}\n-A NATMAP-OUTPUT {dnat}\nCOMMIT\n*filter\n-A NATMAP {d}\n-A NATMAP {s}\nCOMMIT\n"
    )
}

/// The same, inserted at the end position (`-I CHAIN N+1`), as natmap's
/// diff did before it appended: shows what positional inserts cost.
fn add_payload_insert(existing: usize, id: usize, port: u16) -> String {
    let (dnat, d, s) = natmap_lines(id, port);
    let e = existing;
    format!(
        "*nat\n-I NATMAP {} {dnat}\n-I NATMAP-OUTPUT {} {dnat}\nCOMMIT\n*filter\n-I NATMAP {} {d}\n-I NATMAP {} {s}\nCOMMIT\n",
        e + 1,
        e + 1,
        2 * e + 1,
        2 * e + 2
    )
}

/// One mapping's removal as natmap sends it: `-D` by full spec.
fn del_payload(id: usize, port: u16) -> String {
    let (dnat, d, s) = natmap_lines(id, port);
    format!(
        "*nat\n-D NATMAP {dnat}\n-D NATMAP-OUTPUT {dnat}\nCOMMIT\n*filter\n-D NATMAP {d}\n-D NATMAP {s}\nCOMMIT\n"
    )
}

fn profile_phase(ctx: &Ctx, b: &Backend, n: usize, run: &mut Run) -> Result<(), String> {
    let ns = Netns::new()?;
    ns.run(|| -> Result<(), String> {
        // Chains and hooks as natmap leaves them, then N rules into empty chains.
        b.restore(false, &full_payload(0, true, false))?;
        let mut full = Vec::new();
        for _ in 0..3 {
            b.restore(false, &empty_payload())?;
            full.push(b.restore(false, &full_payload(n, false, false))?);
        }
        run.set("p_full", Val::Time(median(full)));
        b.restore(false, &empty_payload())?;
        run.set(
            "p_full_insert",
            Val::Time(b.restore(false, &full_payload(n, false, true))?),
        );
        if b.count("nat", "NATMAP") != Some(n) {
            return Err("profile: chains not filled".into());
        }
        // One mapping in (appended, as natmap does), then one of the
        // existing ones out (spread over the set, as in the natmap phase).
        let reps = ctx.reps(n).min(10);
        let (mut adds, mut inserts, mut dels) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..reps {
            let (id, port) = (n + 1 + i, SINGLE_PORT + i as u16);
            adds.push(b.restore(false, &add_payload(id, port))?);
            let victim = 1 + i * n / reps;
            dels.push(b.restore(false, &del_payload(victim, BASE_PORT + victim as u16))?);
        }
        // The chains hold N mappings again (one in, one out per round).
        for i in 0..reps {
            let (id, port) = (n + 100 + i, SINGLE_PORT + 100 + i as u16);
            inserts.push(b.restore(false, &add_payload_insert(n + i, id, port))?);
        }
        run.set("p_add", Val::Time(median(adds)));
        run.set("p_add_insert", Val::Time(median(inserts)));
        run.set("p_del", Val::Time(median(dels)));
        let (mut s4, mut s6) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            output_ok(&mut b.cmd("iptables-save"))?;
            s4.push(t.elapsed());
            let t = Instant::now();
            output_ok(&mut b.cmd("ip6tables-save"))?;
            s6.push(t.elapsed());
        }
        run.set("p_save4", Val::Time(median(s4)));
        run.set("p_save6", Val::Time(median(s6)));
        if ctx.conntrack {
            let mut v = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                // Exits 1 when nothing matched, like in the daemon.
                output(Command::new("conntrack").args([
                    "-D",
                    "-f",
                    "ipv4",
                    "-p",
                    "tcp",
                    "--orig-dst",
                    EXT_IP,
                    "--reply-src",
                    INT_IP,
                ]))?;
                v.push(t.elapsed());
            }
            run.set("p_conntrack", Val::Time(median(v)));
        }
        Ok(())
    })
}

// ───────────────────────────── the run ─────────────────────────────

struct Machine {
    date: String,
    nproc: usize,
    cpu: String,
    mem: String,
    kernel: String,
    load: String,
    commit: String,
}

fn machine() -> Machine {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let date = output_ok(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "?".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| format!("{:.1} GB", kb as f64 / 1e6))
        .unwrap_or_else(|| "?".into());
    let commit = output_ok(Command::new("git").args([
        "-C",
        env!("CARGO_MANIFEST_DIR"),
        "describe",
        "--always",
        "--dirty",
    ]))
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "?".into());
    Machine {
        date,
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        mem,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        load: loadavg(),
        commit,
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The daemon keeps a socket per mapping and raises its soft RLIMIT_NOFILE
/// to the hard one it inherits: make sure the hard limit is enough.
fn raise_nofile(needed: u64) -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if hard >= needed {
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, needed).map_err(|e| {
        format!(
            "the open-file hard limit is {hard} and the daemon needs {needed} \
             (a socket per mapping); raising it failed: {e} (needs CAP_SYS_RESOURCE)"
        )
    })
}

fn run(opts: &Opts) -> Result<(), String> {
    let start = Instant::now();
    // Hard bound on the whole run, whatever hangs: exiting kills the daemons
    // (PDEATHSIG) and with them the namespaces.
    let hard = opts.budget * 3 + Duration::from_secs(300);
    std::thread::spawn(move || {
        std::thread::sleep(hard);
        eprintln!("natmap bench: still running after {hard:?}; giving up");
        std::process::exit(3);
    });
    let max_n = opts.sizes.iter().copied().max().unwrap_or(0);
    raise_nofile((max_n + opts.clients * opts.adds_per_client + 1024) as u64)?;
    let apply = Command::new(LAB_OPS)
        .args(["natmap", "apply", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let ctx = Ctx {
        opts: opts.clone(),
        start,
        apply,
        conntrack: find_tool("conntrack").is_some(),
    };
    let m = machine();
    progress(format!(
        "{} · {} × {} · kernel {} · `apply` {}",
        m.date,
        m.nproc,
        m.cpu,
        m.kernel,
        if apply {
            "present"
        } else {
            "absent: bulk = sequential adds"
        }
    ));

    let mut backends = Vec::new();
    let mut skipped_backends = Vec::new();
    for name in &opts.backends {
        let name: &'static str = if name == "nft" { "nft" } else { "legacy" };
        match Backend::detect(name) {
            Ok(b) => backends.push(b),
            Err(e) => {
                progress(format!("backend {name} skipped: {e}"));
                skipped_backends.push(format!("{name}: {e}"));
            }
        }
    }
    if backends.is_empty() {
        return Err(format!(
            "no usable iptables backend ({})",
            skipped_backends.join("; ")
        ));
    }

    let mut results: Vec<(&Backend, usize, Run)> = Vec::new();
    for b in &backends {
        for &n in &opts.sizes {
            let mut run = Run::default();
            if ctx.over_budget() {
                run.notes
                    .push(format!("skipped: time budget of {:?} used up", opts.budget));
                progress(format!("[{} N={n}] skipped (time budget)", b.name));
                results.push((b, n, run));
                continue;
            }
            if !ctx.apply && n > opts.seq_max {
                // Populating by sequential adds: project from the last N.
                let last = results
                    .iter()
                    .rev()
                    .find(|(rb, _, r)| rb.name == b.name && r.secs("add").is_some());
                if let Some((_, ln, lr)) = last {
                    let per = lr.secs("bulk_seq").unwrap_or(0.0) / *ln as f64;
                    let projected = Duration::from_secs_f64(per * n as f64 * 2.0);
                    if ctx.elapsed() + projected > opts.budget {
                        run.notes.push(format!(
                            "natmap skipped: populating {n} by sequential adds (no `apply`) \
                             would take ≈{} and exceed the time budget",
                            fmt_dur(projected)
                        ));
                    }
                }
            }
            if run.notes.is_empty() {
                if let Err(e) = natmap_phase(&ctx, b, n, &mut run) {
                    progress(format!("[{} N={n}] natmap phase failed: {e}", b.name));
                    run.notes
                        .push(format!("natmap phase failed: {}", first_line(&e)));
                }
            }
            if let Err(e) = baseline_phase(&ctx, b, n, &mut run) {
                progress(format!("[{} N={n}] baseline phase failed: {e}", b.name));
                run.notes
                    .push(format!("baseline phase failed: {}", first_line(&e)));
            }
            if let Err(e) = profile_phase(&ctx, b, n, &mut run) {
                progress(format!("[{} N={n}] profile phase failed: {e}", b.name));
                run.notes
                    .push(format!("profile phase failed: {}", first_line(&e)));
            }
            progress(format!(
                "[{} N={n}] done, {} elapsed",
                b.name,
                fmt_dur(ctx.elapsed())
            ));
            results.push((b, n, run));
        }
    }

    let report = report(&ctx, &m, &backends, &skipped_backends, &results);
    println!("{report}");
    if let Some(dir) = opts.out.parent() {
        let _ = fs::create_dir_all(dir);
    }
    fs::write(&opts.out, &report).map_err(|e| format!("write {}: {e}", opts.out.display()))?;
    progress(format!(
        "results written to {} ({} total)",
        opts.out.display(),
        fmt_dur(ctx.elapsed())
    ));
    Ok(())
}

// ───────────────────────────── the report ─────────────────────────────

/// Ratio as "natmap is X× faster": baseline time / natmap time, or natmap
/// rate / baseline rate.
fn speedup(natmap: Option<&Val>, baseline: Option<&Val>) -> String {
    match (natmap, baseline) {
        (Some(Val::Rate(a)), Some(Val::Rate(b))) if *b > 0.0 => format!("{:.1}×", a / b),
        (Some(a), Some(b)) => match (a.secs(), b.secs()) {
            (Some(a), Some(b)) if a > 0.0 => {
                let r = b / a;
                if r >= 10.0 {
                    format!("{r:.0}×")
                } else {
                    format!("{r:.2}×")
                }
            }
            _ => "—".into(),
        },
        _ => "—".into(),
    }
}

fn cell(v: Option<&Val>) -> String {
    v.map_or_else(|| "—".into(), |v| v.to_string())
}

fn report(
    ctx: &Ctx,
    m: &Machine,
    backends: &[Backend],
    skipped: &[String],
    results: &[(&Backend, usize, Run)],
) -> String {
    let o = &ctx.opts;
    let mut r = String::new();
    let _ = writeln!(r, "## natmap benchmark results\n");
    let _ = writeln!(
        r,
        "- date: {} · commit {} · {}",
        m.date,
        m.commit,
        if cfg!(debug_assertions) {
            "DEBUG build: not representative, use `cargo bench --bench natmap`"
        } else {
            "`cargo bench --bench natmap` (release profile, LTO)"
        }
    );
    let _ = writeln!(
        r,
        "- machine: {} CPUs ({}), {} RAM, kernel {}; load average at start {}, at end {} \
         (other work on the machine shows up as noise)",
        m.nproc,
        m.cpu,
        m.mem,
        m.kernel,
        m.load,
        loadavg()
    );
    for b in backends {
        let _ = writeln!(r, "- {}: `{}`", b.name, b.version);
    }
    for s in skipped {
        let _ = writeln!(r, "- backend skipped: {s}");
    }
    let _ = writeln!(
        r,
        "- single add/remove and `ls`: median of {} (CLI process included); {} concurrent clients × {} adds; \
         baseline install/recovery above N={} estimated from {} mappings at chain length N/2 (marked est.)",
        o.reps, o.clients, o.adds_per_client, o.exact_baseline_max, o.sample
    );
    let _ = writeln!(
        r,
        "- bulk: {}",
        if ctx.apply {
            "`lab-ops natmap apply FILE` (one request); N sequential `dnat` CLI calls as an extra row"
        } else {
            "this build has no `apply`: N sequential `dnat` CLI calls"
        }
    );
    let _ = writeln!(r, "- speed-up = baseline time / natmap time (for rates: natmap / baseline); > 1 means natmap is faster\n");

    let rows: [(&str, &str, &str, &str); 9] = [
        (
            "add",
            "b_add",
            "single `dnat` add at N, end to end",
            "4 × `iptables -A`",
        ),
        (
            "remove",
            "b_remove",
            "single remove at N, end to end",
            "4 × (`-L --line-numbers` + `-D NUM`)",
        ),
        (
            "bulk",
            "b_bulk",
            "bulk install of N: `apply FILE`",
            "4N × `iptables -A`",
        ),
        (
            "bulk_seq",
            "b_bulk",
            "bulk install of N: N sequential CLI adds",
            "4N × `iptables -A`",
        ),
        (
            "recovery",
            "b_recovery",
            "daemon start, recover N into empty tables",
            "4N × (`-C`, `-A`)",
        ),
        (
            "conc",
            "b_conc",
            "concurrent clients, acked adds/s",
            "same clients, 4 × `-A` each",
        ),
        ("ls", "", "`ls --json` at N", ""),
        ("rss", "", "daemon RSS at N", ""),
        (
            "idle_cpu",
            "",
            "idle daemon CPU (drift check every 2 s)",
            "",
        ),
    ];
    for b in backends {
        let _ = writeln!(r, "### {}\n", b.name);
        let _ = writeln!(
            r,
            "| N | measurement | natmap | naive baseline | speed-up |\n|---:|---|---:|---:|---:|"
        );
        for (_, n, run) in results.iter().filter(|(rb, _, _)| rb.name == b.name) {
            for (nk, bk, label, blabel) in rows {
                let nv = run.get(nk);
                let bv = if bk.is_empty() { None } else { run.get(bk) };
                if nv.is_none() && bv.is_none() {
                    continue;
                }
                let bcell = match bv {
                    Some(v) => format!("{v} ({blabel})"),
                    None => "—".into(),
                };
                let _ = writeln!(
                    r,
                    "| {n} | {label} | {} | {bcell} | {} |",
                    cell(nv),
                    speedup(nv, bv)
                );
            }
            for note in &run.notes {
                let _ = writeln!(r, "| {n} | note | {note} | | |");
            }
        }
        let _ = writeln!(r);
    }

    // Where the time goes.
    let _ = writeln!(r, "### where the time goes (pieces timed by hand)\n");
    let prof: [(&str, &str); 15] = [
        ("ping", "CLI round trip (`ping`: process + socket + JSON)"),
        (
            "p_add_dry",
            "`--dry-run dnat` at N (everything but iptables and the state write)",
        ),
        ("p_del_dry", "`--dry-run dnat --delete` at N"),
        (
            "p_apply_dry",
            "`--dry-run apply` of N into an empty daemon (table output)",
        ),
        ("p_apply_dry_json", "same with `--json` (no table)"),
        (
            "p_state_write",
            "state write at N (tmp, fsync, rename, fsync dir)",
        ),
        ("state_size", "state.json size at N"),
        (
            "p_add",
            "`iptables-restore --noflush`: one mapping appended (4 × `-A`)",
        ),
        (
            "p_add_insert",
            "same as `-I CHAIN N+1` (positional insert, for comparison)",
        ),
        (
            "p_del",
            "`iptables-restore --noflush`: one mapping removed (4 × `-D` by spec)",
        ),
        ("p_conntrack", "`conntrack -D` (run on every remove)"),
        (
            "p_full",
            "`iptables-restore`: N mappings into empty chains (`-A`)",
        ),
        (
            "p_full_insert",
            "same as `-I CHAIN POS` lines (for comparison)",
        ),
        ("p_save4", "`iptables-save` at N (drift check, every 2 s)"),
        ("p_save6", "`ip6tables-save` (drift check, every 2 s)"),
    ];
    let residuals: [(&str, &str, &[&str]); 4] = [
        (
            "add − (dry-run add + append restore + state write)",
            "add",
            &["p_add_dry", "p_add", "p_state_write"],
        ),
        (
            "remove − (dry-run remove + removal restore + state write + conntrack)",
            "remove",
            &["p_del_dry", "p_del", "p_state_write", "p_conntrack"],
        ),
        (
            "apply − (dry-run apply + N into empty chains + state write)",
            "bulk",
            &["p_apply_dry", "p_full", "p_state_write"],
        ),
        ("recovery − N into empty chains", "recovery", &["p_full"]),
    ];
    for b in backends {
        let runs: Vec<&Run> = results
            .iter()
            .filter(|(rb, _, _)| rb.name == b.name)
            .map(|(_, _, run)| run)
            .collect();
        let sizes: Vec<String> = results
            .iter()
            .filter(|(rb, _, _)| rb.name == b.name)
            .map(|(_, n, _)| format!("N={n}"))
            .collect();
        let _ = writeln!(r, "| {} | {} |", b.name, sizes.join(" | "));
        let _ = writeln!(r, "|---|{}", "---:|".repeat(runs.len()));
        for (key, label) in prof {
            let cells: Vec<String> = runs.iter().map(|run| cell(run.get(key))).collect();
            let _ = writeln!(r, "| {label} | {} |", cells.join(" | "));
        }
        for (label, total, parts) in residuals {
            let cells: Vec<String> = runs.iter().map(|run| residual(run, total, parts)).collect();
            let _ = writeln!(r, "| {label} | {} |", cells.join(" | "));
        }
        let _ = writeln!(r);
    }

    // Targets of issue 6: N = 1000, iptables-nft unless noted.
    let find = |backend: &str, n: usize| {
        results
            .iter()
            .find(|(b, rn, _)| b.name == backend && *rn == n)
            .map(|(_, _, run)| run)
    };
    let _ = writeln!(
        r,
        "### targets (issue 6; N = 1000, iptables-nft unless noted)\n"
    );
    let _ = writeln!(r, "| target | measured | met |\n|---|---|---|");
    let ms = |run: Option<&Run>, k: &str| run.and_then(|r| r.secs(k)).map(|s| s * 1e3);
    let nft = find("nft", 1000);
    let legacy = find("legacy", 1000);
    let mut target = |name: &str, measured: String, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(r, "| {name} | {measured} | {verdict} |");
    };
    let ratio = |run: Option<&Run>, a: &str, b: &str| -> Option<f64> {
        let run = run?;
        Some(run.secs(b)? / run.secs(a)?)
    };
    let (add, add_b) = (ms(nft, "add"), ms(nft, "b_add"));
    target(
        "single add ≤ 12 ms and not slower than 4 `iptables` calls",
        format!("{} vs. baseline {}", opt_ms(add), opt_ms(add_b)),
        add.zip(add_b).map(|(a, b)| a <= 12.0 && a <= b),
    );
    let (rm, rr) = (ms(nft, "remove"), ratio(nft, "remove", "b_remove"));
    target(
        "single remove ≤ 65 ms and ≥ 4× faster than list + delete by number",
        format!("{}, {}", opt_ms(rm), opt_x(rr)),
        rm.zip(rr).map(|(a, x)| a <= 65.0 && x >= 4.0),
    );
    let rml = ms(legacy, "remove");
    target(
        "legacy: single remove ≤ 20 ms",
        opt_ms(rml),
        rml.map(|a| a <= 20.0),
    );
    let (bulk, bx) = (ms(nft, "bulk"), ratio(nft, "bulk", "b_bulk"));
    target(
        "bulk `apply` of 1000 ≤ 120 ms and ≥ 60× one process per rule",
        format!("{}, {}", opt_ms(bulk), opt_x(bx)),
        bulk.zip(bx).map(|(a, x)| a <= 120.0 && x >= 60.0),
    );
    let rec = ms(nft, "recovery");
    target(
        "recovery of 1000 at start ≤ 250 ms",
        opt_ms(rec),
        rec.map(|a| a <= 250.0),
    );
    let conc = nft.and_then(|r| match r.get("conc") {
        Some(Val::Rate(x)) => Some(*x),
        _ => None,
    });
    target(
        &format!("{} concurrent clients ≥ 300 acked adds/s", o.clients),
        conc.map_or("—".into(), |x| format!("{x:.0}/s")),
        conc.map(|x| x >= 300.0),
    );
    let ls = ms(nft, "ls");
    target("`ls --json` ≤ 20 ms", opt_ms(ls), ls.map(|a| a <= 20.0));
    let rss = nft.and_then(|r| match r.get("rss") {
        Some(Val::Bytes(b)) => Some(*b),
        _ => None,
    });
    target(
        "daemon RSS with 1000 mappings ≤ 25 MB",
        rss.map_or("—".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        rss.map(|b| b <= 25_000_000),
    );
    r
}

fn residual(run: &Run, total: &str, parts: &[&str]) -> String {
    let Some(t) = run.secs(total) else {
        return "—".into();
    };
    let mut sum = 0.0;
    for p in parts {
        match run.secs(p) {
            Some(s) => sum += s,
            None => return "—".into(),
        }
    }
    format!("{:.2} ms", (t - sum) * 1e3)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1} ms"))
}

fn opt_x(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1}× faster"))
}
