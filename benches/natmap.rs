//! natmap on both firewall backends against the naive baseline (issues 6
//! and 13), side by side in one run.
//!
//! ```text
//! sudo cargo bench --bench natmap                 # or: sudo scripts/bench.sh
//! sudo cargo bench --bench natmap -- --out FILE --sizes 100,1000 --backends nftables,nft
//! ```
//!
//! Variants (`--backends`, default all present): `nftables` (the daemon with
//! `--backend nftables`: natmap's own nftables tables, element changes over
//! netlink), `nft` (`--backend iptables` on iptables-nft) and `legacy`
//! (`--backend iptables` on iptables-legacy). For every variant and every N
//! (100, 1000, 10000 existing mappings) it measures, each in its own fresh
//! network namespace:
//!
//! - **natmap**: the real `lab-ops` daemon (PATH points at a temp dir whose
//!   `iptables*`/`ip6tables*` are symlinks to the flavor's binaries) and the
//!   real CLI process for every request: bulk install of N (`apply FILE` when
//!   the build has it, and N sequential `dnat` adds), single add and single
//!   remove at N (median), `ping` and `ls --json` at N, daemon RSS, recovery
//!   at start into empty tables, idle CPU (the drift check), 50 concurrent CLI
//!   clients and 50 concurrent socket clients (no process per request).
//! - **naive baseline** (once per iptables flavor and N; the nftables variant
//!   is judged against iptables-nft's): the same 4 rules per mapping (nat
//!   PREROUTING and OUTPUT DNAT, 2 × filter FORWARD ACCEPT) with one
//!   `iptables` process per rule; removal lists each chain with line numbers
//!   and deletes by number; recovery runs `iptables -C` per rule and `-A` for
//!   the missing ones.
//! - **profile**: the pieces natmap's requests are made of, by hand: for the
//!   iptables variants, in a third namespace, `iptables-restore --noflush` of
//!   the payloads natmap sends, `iptables-save`, `conntrack -D`, a state write
//!   of the daemon's state.json size; for nftables, `nft -j list table` (the
//!   drift check's read) and an element change through the `nft` binary; for
//!   all, the daemon's `--dry-run` of the same requests and the CLI round trip.
//! - **packet path**: client ─ router ─ server namespaces joined by veth
//!   pairs, the daemon in the router with N − 1 mappings and then the
//!   measured one (last in iptables' chains), and a loop of real TCP connects
//!   from the client to the router's address, DNATed to a listener on the
//!   server: the median time from `connect()` to its return (SYN through the
//!   nat and filter hooks, SYN-ACK back) at N = 10 and at the largest N.
//!
//! At the end it prints every target of issue 13 with the measured value and
//! MET / NOT MET (or NOT MEASURED and why).
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
/// mappings, single adds, concurrent CLI adds, concurrent socket adds, the
/// packet path's measured mapping and the `nft` binary's element probe.
const BASE_PORT: u16 = 10_000;
const SAMPLE_PORT: u16 = 25_000;
const SINGLE_PORT: u16 = 27_000;
const CONC_PORT: u16 = 30_000;
const SOCK_PORT: u16 = 32_000;
const PKT_PORT: u16 = 45_000;
const PROBE_PORT: u16 = 46_000;
const MAX_SIZE: usize = 14_000;
/// The client's address on the packet path (the router's is `EXT_IP`, the
/// server's `INT_IP`, the router's inner one `ROUTER_INT_IP`).
const CLIENT_IP: &str = "192.0.2.2";
const ROUTER_INT_IP: &str = "198.51.100.1";
/// The packet path's small N (the target compares the largest N against it).
const PKT_SMALL: usize = 10;
/// Connects per packet-path measurement, and the bound on its time.
const PKT_CONNECTS: usize = 2000;
const PKT_WINDOW: Duration = Duration::from_secs(8);

/// Bound on any daemon start or stop (recovery of thousands on a loaded box).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the idle daemon is watched for its periodic drift-check CPU.
/// Repeated measurements stop after this long once `MIN_REPS` are in (a
/// remove at N = 10000 takes seconds through the naive baseline).
const REP_WINDOW: Duration = Duration::from_secs(8);
const MIN_REPS: usize = 5;
/// Concurrent clients stop sending new requests after this long.
const CONC_WINDOW: Duration = Duration::from_secs(12);
/// 6 s: three ticks of the 2 s drift check, 10 ms clock ticks = 0.17 %.
const IDLE_WINDOW: Duration = Duration::from_secs(6);

// ───────────────────────────── options ─────────────────────────────

#[derive(Debug, Clone)]
struct Opts {
    sizes: Vec<usize>,
    backends: Vec<String>,
    reps: usize,
    clients: usize,
    adds_per_client: usize,
    socket_adds_per_client: usize,
    packet: bool,
    out: PathBuf,
    budget: Duration,
    seq_max: usize,
    exact_baseline_max: usize,
    sample: usize,
}

const HELP: &str = "natmap benchmark (issues 6 and 13): natmap on both firewall backends vs. one
iptables process per rule, and every target of issue 13 judged.

Run as root:  sudo cargo bench --bench natmap [-- OPTIONS]   (or sudo scripts/bench.sh [OPTIONS])

Options:
  --out FILE               also write the results (markdown) here [target/bench-results.md]
  --sizes LIST             existing mappings N [100,1000,10000]
  --backends LIST          nftables (daemon --backend nftables), nft (--backend iptables on
                           iptables-nft), legacy (on iptables-legacy) [all, where present]
  --reps K                 repetitions of single add/remove/ls (median) [20]
  --clients C              concurrent clients [50]
  --adds-per-client K      adds each concurrent CLI client makes [4]
  --socket-adds-per-client K  adds each concurrent socket client makes [20]
  --no-packet              skip the packet path (TCP connects through a veth router)
  --budget-secs S          soft time budget; optional stages are skipped past it [1200]
  --seq-max N              largest N for the N-sequential-adds row when `apply` exists [1000]
  --exact-baseline-max N   above this N the naive install/recovery (O(N^2)) is estimated
                           from a sample at chain length N/2 instead of run in full [1000]
  --sample K               mappings in that sample [25]";

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let default_out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results.md");
    let mut o = Opts {
        sizes: vec![100, 1000, 10_000],
        backends: vec!["nftables".into(), "nft".into(), "legacy".into()],
        reps: 20,
        clients: 50,
        adds_per_client: 4,
        socket_adds_per_client: 20,
        packet: true,
        out: std::env::var_os("NATMAP_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or(default_out),
        budget: Duration::from_secs(1200),
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
                    .map(|s| match s.trim() {
                        "iptables-nft" => "nft".to_owned(),
                        "iptables-legacy" => "legacy".to_owned(),
                        other => other.to_owned(),
                    })
                    .collect()
            }
            "--reps" => o.reps = num(a, it.next())?,
            "--clients" => o.clients = num(a, it.next())?,
            "--adds-per-client" => o.adds_per_client = num(a, it.next())?,
            "--socket-adds-per-client" => o.socket_adds_per_client = num(a, it.next())?,
            "--no-packet" => o.packet = false,
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
    if o.backends
        .iter()
        .any(|b| !["nftables", "nft", "legacy"].contains(&b.as_str()))
    {
        return Err(
            "--backends: any of nftables, nft (iptables-nft), legacy (iptables-legacy)".into(),
        );
    }
    if o.reps == 0 || o.reps > 1000 || o.sample == 0 || o.sample > 1000 {
        return Err("--reps and --sample must be in 1..=1000".into());
    }
    if o.clients == 0 || o.adds_per_client == 0 || o.clients * o.adds_per_client > 2_000 {
        return Err("--clients × --adds-per-client must be in 1..=2000".into());
    }
    if o.socket_adds_per_client == 0 || o.clients * o.socket_adds_per_client > 10_000 {
        return Err("--clients × --socket-adds-per-client must be in 1..=10000".into());
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

/// Microseconds, for the packet path.
fn fmt_us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
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
    /// Takes `other`'s values and notes (a shared baseline or profile).
    fn merge(&mut self, other: &Run) {
        for (k, v) in &other.vals {
            self.vals.insert(k, v.clone());
        }
        self.notes.extend(other.notes.iter().cloned());
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
    /// The sizes measured: `--sizes`, with each N the open-file limit does
    /// not allow replaced by the largest that fits.
    sizes: Vec<usize>,
    /// N of `--sizes` → (the N measured instead, why).
    substituted: BTreeMap<usize, (usize, String)>,
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
        c.stdin(Stdio::null())
            .env("XTABLES_LOCKFILE", self.lockfile());
        c
    }

    /// The xtables lock of this bench's namespaces. `/run/xtables.lock` is
    /// one file for every namespace of the host, so other work running
    /// iptables-legacy made the baseline's `-w` waits time out; the tables
    /// here are the bench's own, so a lock of its own serializes what needs
    /// serializing (iptables-nft takes no lock).
    fn lockfile(&self) -> PathBuf {
        self.bindir.path().join("xtables.lock")
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

    /// DNAT lines of natmap's nat chain `NATMAP` and its port shards
    /// (`NATMAP-T<block>`, `NATMAP-U<block>`): one per mapping; `None`
    /// when there is no `NATMAP` chain.
    fn count_dnat(&self) -> Option<usize> {
        let out = output(self.cmd("iptables").args(["-w", "10", "-t", "nat", "-S"])).ok()?;
        if !out.status.success() {
            return None;
        }
        if !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "-N NATMAP")
        {
            return None;
        }
        let natmap_chain = |chain: &str| {
            chain == "NATMAP"
                || chain.strip_prefix("NATMAP-").is_some_and(|rest| {
                    rest.len() > 1
                        && (rest.starts_with('T') || rest.starts_with('U'))
                        && rest[1..].bytes().all(|b| b.is_ascii_digit())
                })
        };
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| {
                    let mut words = l.split_whitespace();
                    words.next() == Some("-A")
                        && words.next().is_some_and(natmap_chain)
                        && l.contains(" -j DNAT")
                })
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

// ───────────────────────────── variants ─────────────────────────────

/// The daemon's firewall backend (`daemon --backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fw {
    Iptables,
    Nftables,
}

/// One measured natmap configuration: a firewall backend, and the iptables
/// flavor on the daemon's PATH (the naive baseline it is compared with).
struct Variant<'a> {
    /// `nftables`, `nft`, `legacy`.
    name: &'static str,
    label: &'static str,
    fw: Fw,
    flavor: &'a Backend,
}

impl Variant<'_> {
    fn backend_arg(&self) -> &'static str {
        match self.fw {
            Fw::Iptables => "iptables",
            Fw::Nftables => "nftables",
        }
    }

    /// natmap's mappings in the kernel: DNAT lines of nat `NATMAP` and its
    /// shards (iptables), or
    /// elements of `ip natmap dnat_addr` (port ranges) and `dnat_port`
    /// (single ports, every bench mapping) (nftables); `None` when absent.
    /// Call it inside the namespace.
    fn count(&self) -> Option<usize> {
        match self.fw {
            Fw::Iptables => self.flavor.count_dnat(),
            Fw::Nftables => {
                Some(nft_elements("ip", "dnat_addr")? + nft_elements("ip", "dnat_port")?)
            }
        }
    }
}

/// Elements of natmap's map `map` in `family` (`nft -j list map`), `None`
/// when the table or map does not exist.
fn nft_elements(family: &str, map: &str) -> Option<usize> {
    let out =
        output(Command::new("nft").args(["-j", "list", "map", family, "natmap", map])).ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let m = items.iter().find_map(|i| i.get("map"))?;
    Some(m.get("elem").and_then(|e| e.as_array()).map_or(0, Vec::len))
}

// ───────────────────────────── the natmap daemon ─────────────────────────────

struct Daemon<'a> {
    ns: &'a Netns,
    path_env: OsString,
    backend: &'static str,
    lockfile: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    fn new(ns: &'a Netns, v: &Variant) -> Result<Daemon<'a>, String> {
        Ok(Daemon {
            ns,
            path_env: v.flavor.daemon_path(),
            backend: v.backend_arg(),
            lockfile: v.flavor.lockfile(),
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
            .args(["daemon", "--backend", self.backend, "--state"])
            .arg(self.state())
            .args(["--socket-group", "root", "--docker-socket"])
            // No Docker: the daemon must not watch the host's engine.
            .arg(self.dir.path().join("no-docker.sock"))
            .env("PATH", &self.path_env)
            .env("XTABLES_LOCKFILE", &self.lockfile)
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

fn expect_natmap_rules(v: &Variant, ns: &Netns, expected: usize) -> Result<(), String> {
    match ns.run(|| v.count()) {
        Some(n) if n == expected => Ok(()),
        other => Err(format!(
            "{}: natmap's mappings in the kernel: {other:?}, expected {expected}",
            v.name
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
                let t0 = Instant::now();
                for j in 0..per_client {
                    if t0.elapsed() > CONC_WINDOW {
                        break;
                    }
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

/// `clients` threads, each with its own connection to the daemon's socket
/// (connected before the common start), sending `per_client` `dnat`
/// requests one after the other: no process per request. Returns
/// acknowledged (`"ok": true`) adds per second.
fn concurrent_socket(d: &Daemon, clients: usize, per_client: usize) -> (f64, usize) {
    use std::io::BufRead as _;
    let acked = AtomicUsize::new(0);
    let barrier = Barrier::new(clients + 1);
    let socket = d.socket();
    let elapsed = std::thread::scope(|s| {
        for c in 0..clients {
            let (acked, barrier, socket) = (&acked, &barrier, &socket);
            s.spawn(move || {
                let conn = std::os::unix::net::UnixStream::connect(socket).and_then(|st| {
                    st.set_read_timeout(Some(DAEMON_TIMEOUT))?;
                    let reader = io::BufReader::new(st.try_clone()?);
                    Ok((st, reader))
                });
                barrier.wait();
                let Ok((mut stream, mut reader)) = conn else {
                    return;
                };
                let t0 = Instant::now();
                for j in 0..per_client {
                    if t0.elapsed() > CONC_WINDOW {
                        break;
                    }
                    let port = SOCK_PORT + (c * per_client + j) as u16;
                    let mut line = serde_json::json!({"version": 1, "request": {
                        "cmd": "dnat", "ext_ip": EXT_IP, "int_ip": INT_IP,
                        "ports": port.to_string(), "proto": "tcp", "delete": false,
                    }})
                    .to_string();
                    line.push('\n');
                    let mut answer = String::new();
                    if stream.write_all(line.as_bytes()).is_err()
                        || reader.read_line(&mut answer).unwrap_or(0) == 0
                    {
                        return;
                    }
                    let ok = serde_json::from_str::<serde_json::Value>(&answer)
                        .is_ok_and(|v| v["ok"] == true);
                    if ok {
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

fn natmap_phase(ctx: &Ctx, v: &Variant, n: usize, run: &mut Run) -> Result<(), String> {
    let tag = format!("[{} N={n}] natmap:", v.name);
    let ns = Netns::new()?;
    // natmap refuses a mapping of an address the host does not have.
    ip_in(&ns, &["addr", "add", &format!("{EXT_IP}/32"), "dev", "lo"])?;
    let mut d = Daemon::new(&ns, v)?;
    d.start()?;
    let ports: Vec<u16> = (1..=n).map(|i| BASE_PORT + i as u16).collect();

    // What the daemon does for `apply` short of the firewall and the state
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
        Err(e) if mode == BulkMode::Apply && n <= ctx.opts.seq_max => {
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
    expect_natmap_rules(v, &ns, n)?;
    progress(format!(
        "{tag} bulk install ({mode:?}): {}",
        run.vals[mode.key()]
    ));
    let mut live: BTreeSet<u16> = ports.iter().copied().collect();
    let reps = ctx.reps(n);

    // CLI round trip floor and ls --json.
    let mut pings = Vec::new();
    let mut ls = Vec::new();
    let t0 = Instant::now();
    for _ in 0..reps {
        if enough(t0, pings.len()) {
            break;
        }
        pings.push(d.cli_ok(&["ping"])?);
        ls.push(d.cli_ok(&["--json", "ls"])?);
    }
    run.set("ping", Val::Time(median(pings)));
    run.set("ls", Val::Time(median(ls)));
    if let Some(rss) = d.rss_bytes() {
        run.set("rss", Val::Bytes(rss));
    }

    // The state dir's size, and a whole-file state write of state.json's
    // size by hand (what a change cost before the journal).
    run.set(
        "state_size",
        Val::Bytes(dir_bytes(d.dir.path(), &["bulk.json", "daemon.log"])),
    );
    if let Ok(state) = fs::read(d.state()) {
        run.set(
            "p_state_write",
            Val::Time(state_write_cost(d.dir.path(), &state, 10)?),
        );
    }
    run.set(
        "p_journal",
        Val::Time(journal_append_cost(d.dir.path(), 10)?),
    );

    // Single add and remove short of the firewall and the state write.
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
    let t0 = Instant::now();
    for i in 0..reps {
        if enough(t0, adds.len()) {
            break;
        }
        let port = SINGLE_PORT + i as u16;
        adds.push(d.cli_ok(&strs(&dnat_args(port)))?);
        live.insert(port);
    }
    run.set("add", Val::Time(median(adds)));
    let mut removes = Vec::new();
    let t0 = Instant::now();
    for i in 0..reps {
        if enough(t0, removes.len()) {
            break;
        }
        let port = ports[i * n / reps];
        let mut args = dnat_args(port);
        args.push("--delete".into());
        removes.push(d.cli_ok(&strs(&args))?);
        live.remove(&port);
    }
    run.set("remove", Val::Time(median(removes)));
    expect_natmap_rules(v, &ns, live.len())?;
    progress(format!(
        "{tag} add {} remove {} ping {} ls --json {}",
        run.vals["add"], run.vals["remove"], run.vals["ping"], run.vals["ls"]
    ));

    // Recovery: stop (the daemon removes its rules), start into empty tables.
    d.stop()?;
    if let Some(left) = ns.run(|| v.count()) {
        return Err(format!(
            "after SIGTERM natmap's rules are still there ({left} mappings)"
        ));
    }
    let to_socket = d.start()?;
    let expected = live.len();
    let checking = Instant::now();
    let mut first = true;
    let recovered = loop {
        // The daemon binds its socket after the rules are in; check anyway,
        // and if they are not there yet, keep the clock running until they are.
        if ns.run(|| v.count()) == Some(expected) {
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

    // Idle CPU: the periodic drift check (iptables-save of both families,
    // or `nft -j list table` of both).
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

    // Many clients at once: CLI processes, then socket connections.
    let (rate, acked) = concurrent_natmap(&d, ctx.opts.clients, ctx.opts.adds_per_client);
    run.set("conc", Val::Rate(rate));
    let total = ctx.opts.clients * ctx.opts.adds_per_client;
    if acked != total {
        run.notes.push(format!(
            "natmap: {acked} of {total} concurrent CLI adds acknowledged (clients stop after {CONC_WINDOW:?})"
        ));
    }
    let (srate, sacked) = concurrent_socket(&d, ctx.opts.clients, ctx.opts.socket_adds_per_client);
    run.set("conc_sock", Val::Rate(srate));
    let stotal = ctx.opts.clients * ctx.opts.socket_adds_per_client;
    if sacked != stotal {
        run.notes.push(format!(
            "natmap: {sacked} of {stotal} concurrent socket adds acknowledged (clients stop after {CONC_WINDOW:?})"
        ));
    }
    expect_natmap_rules(v, &ns, live.len() + acked + sacked)?;
    progress(format!(
        "{tag} {} clients: {rate:.0} acked adds/s (CLI), {srate:.0}/s (socket)",
        ctx.opts.clients
    ));

    // nftables: what the drift check reads, and an element change through
    // the `nft` binary (a process per change, as the `nftables` crate does).
    if v.fw == Fw::Nftables {
        ns.run(|| {
            run.set(
                "p_nft_list",
                timed_median(5, || {
                    timed_ok(Command::new("nft").args(["-j", "list", "table", "ip", "natmap"]))
                }),
            );
            // A single port: natmap's hash map of single-port mappings
            // (`dnat_addr` holds port ranges, as intervals).
            let elem = format!("{{ {EXT_IP} . tcp . {PROBE_PORT} : {INT_IP} }}");
            let mut add = Vec::new();
            let mut del = Vec::new();
            for _ in 0..5 {
                let a = timed_ok(Command::new("nft").args([
                    "add",
                    "element",
                    "ip",
                    "natmap",
                    "dnat_port",
                    elem.as_str(),
                ]));
                let r = timed_ok(Command::new("nft").args([
                    "delete",
                    "element",
                    "ip",
                    "natmap",
                    "dnat_port",
                    elem.as_str(),
                ]));
                match (a, r) {
                    (Ok(a), Ok(r)) => {
                        add.push(a);
                        del.push(r);
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        run.set("p_nft_add", Val::Na(format!("error: {}", first_line(&e))));
                        return;
                    }
                }
            }
            run.set("p_nft_add", Val::Time(median(add)));
            run.set("p_nft_del", Val::Time(median(del)));
        });
    }
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
            let mut d2 = Daemon::new(&ns, v)?;
            d2.start()?;
            let t = bulk_install(&d2, &ports, BulkMode::Sequential)?;
            expect_natmap_rules(v, &ns, n)?;
            run.set("bulk_seq", Val::Time(t));
            progress(format!("{tag} {n} sequential adds: {}", fmt_dur(t)));
            d2.stop()?;
        }
    } else if !run.vals.contains_key("bulk") {
        run.set("bulk", Val::Na("n/a: this build has no `apply`".into()));
    }
    Ok(())
}

/// Wall time of a command that must succeed.
fn timed_ok(cmd: &mut Command) -> Result<Duration, String> {
    let t = Instant::now();
    output_ok(cmd)?;
    Ok(t.elapsed())
}

/// Bytes of the regular files in `dir`, except `skip`.
fn dir_bytes(dir: &Path, skip: &[&str]) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| !skip.iter().any(|s| e.file_name() == *s))
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Median of `reps` timed runs of `f`, or why it failed (optional measurements).
fn timed_median(reps: usize, mut f: impl FnMut() -> Result<Duration, String>) -> Val {
    let mut v = Vec::with_capacity(reps);
    let t0 = Instant::now();
    for _ in 0..reps {
        if enough(t0, v.len()) {
            break;
        }
        match f() {
            Ok(t) => v.push(t),
            Err(e) => return Val::Na(format!("error: {}", first_line(&e))),
        }
    }
    Val::Time(median(v))
}

/// Whether a repeated measurement begun at `start` with `done` samples has enough.
fn enough(start: Instant, done: usize) -> bool {
    done >= MIN_REPS && start.elapsed() > REP_WINDOW
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

/// One journal line appended and `fdatasync`ed: what natmap's state write
/// per change is now (a line of about this size).
fn journal_append_cost(dir: &Path, reps: usize) -> Result<Duration, String> {
    let path = dir.join("probe.journal");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let line = format!(
        "{{\"next_id\":8,\"forwarding\":false,\"forwarding_ipv6\":true,\"put\":[{}]}}\n",
        apply_document(&[SINGLE_PORT])
    );
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        v.push(t.elapsed());
    }
    drop(f);
    let _ = fs::remove_file(path);
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
                let t0 = Instant::now();
                for j in 0..per_client {
                    if t0.elapsed() > CONC_WINDOW {
                        break;
                    }
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
        let t0 = Instant::now();
        let mut added = 0;
        for i in 0..reps {
            if enough(t0, adds.len()) {
                break;
            }
            added += 1;
            let t = Instant::now();
            naive_add(b, SINGLE_PORT + i as u16)?;
            adds.push(t.elapsed());
        }
        run.set("b_add", Val::Time(median(adds)));
        let mut removes = Vec::new();
        let mut live: BTreeSet<u16> = ports.iter().copied().collect();
        live.extend((0..added).map(|i| SINGLE_PORT + i as u16));
        let t0 = Instant::now();
        for i in 0..reps {
            if enough(t0, removes.len()) {
                break;
            }
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
                "baseline: {acked} of {total} concurrent adds succeeded (clients stop after {CONC_WINDOW:?})"
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

// ───────────────────────────── the packet path ─────────────────────────────

/// New-TCP-connection setup through the router at one N.
#[derive(Debug, Clone)]
struct Pkt {
    median: Duration,
    p90: Duration,
    connects: usize,
    accepted: usize,
}

fn ip_in(ns: &Netns, args: &[&str]) -> Result<(), String> {
    ns.run(|| output_ok(Command::new("ip").args(args)).map(drop))
}

/// client ─ router ─ server, veth pairs, the router forwarding:
/// client `CLIENT_IP`/24 ─ `EXT_IP`/24 router `ROUTER_INT_IP`/24 ─ `INT_IP`/24 server.
struct Topo {
    client: Netns,
    router: Netns,
    server: Netns,
}

fn topology() -> Result<Topo, String> {
    let t = Topo {
        client: Netns::new()?,
        router: Netns::new()?,
        server: Netns::new()?,
    };
    // `ip … netns PATH` opens the namespace file; ours are fds of this process.
    let pid = std::process::id();
    let path = |ns: &Netns| format!("/proc/{pid}/fd/{}", ns.fd.as_raw_fd());
    let (cpath, spath) = (path(&t.client), path(&t.server));
    let r = &t.router;
    ip_in(
        r,
        &[
            "link", "add", "name", "r-c", "type", "veth", "peer", "name", "c-r", "netns", &cpath,
        ],
    )?;
    ip_in(
        r,
        &[
            "link", "add", "name", "r-s", "type", "veth", "peer", "name", "s-r", "netns", &spath,
        ],
    )?;
    ip_in(r, &["addr", "add", &format!("{EXT_IP}/24"), "dev", "r-c"])?;
    ip_in(
        r,
        &["addr", "add", &format!("{ROUTER_INT_IP}/24"), "dev", "r-s"],
    )?;
    ip_in(r, &["link", "set", "r-c", "up"])?;
    ip_in(r, &["link", "set", "r-s", "up"])?;
    for (ns, dev, addr, gw) in [
        (&t.client, "c-r", CLIENT_IP, EXT_IP),
        (&t.server, "s-r", INT_IP, ROUTER_INT_IP),
    ] {
        ip_in(ns, &["addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip_in(ns, &["link", "set", dev, "up"])?;
        ip_in(ns, &["route", "add", "default", "via", gw])?;
    }
    // Net sysctls are the opening thread's namespace's.
    r.run(|| fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .map_err(|e| format!("router ip_forward: {e}"))?;
    Ok(t)
}

/// One TCP connect to `addr` (SYN out, SYN-ACK back); closed with a reset
/// so neither side keeps TIME-WAIT.
fn connect_once(addr: &std::net::SocketAddr) -> Result<Duration, String> {
    let t = Instant::now();
    let s = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let took = t.elapsed();
    let _ = nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(s);
    Ok(took)
}

/// The daemon in the router with N − 1 mappings, then the measured one (a
/// `dnat` after them: last in iptables' chains), and a bounded loop of TCP
/// connects from the client through it to a listener on the server.
fn packet_phase(ctx: &Ctx, v: &Variant, n: usize) -> Result<Pkt, String> {
    let topo = topology()?;
    let mut d = Daemon::new(&topo.router, v)?;
    d.start()?;
    let others: Vec<u16> = (1..n).map(|i| BASE_PORT + i as u16).collect();
    if !others.is_empty() {
        let mode = if ctx.apply {
            BulkMode::Apply
        } else {
            BulkMode::Sequential
        };
        bulk_install(&d, &others, mode)?;
    }
    d.cli_ok(&strs(&dnat_args(PKT_PORT)))?;
    expect_natmap_rules(v, &topo.router, n)?;

    let listener = topo
        .server
        .run(|| std::net::TcpListener::bind((INT_IP, PKT_PORT)))
        .map_err(|e| format!("listen on the server: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let accepted = AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let addr: std::net::SocketAddr = format!("{EXT_IP}:{PKT_PORT}").parse().expect("address");
    let times = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        let r = topo.client.run(|| -> Result<Vec<Duration>, String> {
            // Warm-up (ARP, caches), and proof the path works at all.
            for _ in 0..50 {
                connect_once(&addr)?;
            }
            let mut v = Vec::with_capacity(PKT_CONNECTS);
            let t0 = Instant::now();
            while v.len() < PKT_CONNECTS && t0.elapsed() < PKT_WINDOW {
                v.push(connect_once(&addr)?);
            }
            Ok(v)
        });
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    d.stop()?;
    let accepted = accepted.into_inner();
    let connects = times.len();
    if connects == 0 {
        return Err("no connect completed".into());
    }
    // Every connect that returned reached the server's listener: DNAT worked.
    if accepted < connects / 2 {
        return Err(format!(
            "only {accepted} of {} connects reached the server",
            connects + 50
        ));
    }
    let mut sorted = times;
    sorted.sort();
    Ok(Pkt {
        median: median(sorted.clone()),
        p90: sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)],
        connects,
        accepted,
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
/// to the hard one it inherits: raise the hard limit to `needed` if it is
/// lower and this process may (CAP_SYS_RESOURCE); returns the hard limit in
/// effect (soft = hard).
fn raise_nofile(needed: u64) -> Result<u64, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if hard < needed && setrlimit(Resource::RLIMIT_NOFILE, needed, needed).is_ok() {
        return Ok(needed);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| e.to_string())?;
    }
    Ok(hard)
}

/// What the daemon keeps free beside its ports (src/daemon/fds.rs: 64
/// control connections + 1 + 128, and 2 × 1024 relayed connections), plus
/// a margin for what it has open at start.
const FD_KEPT: u64 = 64 + 1 + 128 + 2 * 1024 + 100;
/// The daemon budgets this many descriptors per reserved port on an
/// address other than loopback or the wildcard, as every bench mapping's
/// (src/daemon/fds.rs: two where the loopback relay serves the port).
const FD_PER_PORT: u64 = 1;

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
    // The daemon refuses a change unless FD_PER_PORT descriptors per new
    // port and FD_KEPT stay free under its limit (an `apply` of N into an
    // empty daemon needs N + FD_KEPT). Where the hard limit cannot be
    // raised far enough, a larger N is measured at the largest that fits.
    let extra = opts.reps + opts.clients * (opts.adds_per_client + opts.socket_adds_per_client);
    let wanted_max = opts.sizes.iter().copied().max().unwrap_or(0);
    let fd_hard = raise_nofile(FD_PER_PORT * (wanted_max + extra) as u64 + FD_KEPT)?;
    let fit = |n: usize| {
        FD_PER_PORT * n as u64 + FD_KEPT <= fd_hard
            && (n + extra) as u64 + FD_PER_PORT + FD_KEPT <= fd_hard
    };
    let mut sizes: Vec<usize> = Vec::new();
    let mut substituted: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    for &n in &opts.sizes {
        let m = if fit(n) {
            n
        } else {
            let cap = (fd_hard.saturating_sub(FD_KEPT) / FD_PER_PORT) as usize;
            let m = (cap / 500 * 500).max(1);
            let why = format!(
                "N = {n} cannot run on this machine: the open-file hard limit is {fd_hard} and \
                 cannot be raised (no CAP_SYS_RESOURCE), and the daemon budgets {FD_PER_PORT} \
                 descriptors per reserved port plus {FD_KEPT} kept free, so an `apply` of \
                 {n} needs {}; measured at N = {m} instead",
                FD_PER_PORT * n as u64 + FD_KEPT
            );
            progress(&why);
            substituted.insert(n, (m, why));
            m
        };
        if !sizes.contains(&m) {
            sizes.push(m);
        }
    }
    let max_n = sizes.iter().copied().max().unwrap_or(0);
    let apply = Command::new(LAB_OPS)
        .args(["natmap", "apply", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let ctx = Ctx {
        opts: opts.clone(),
        sizes,
        substituted,
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

    // The iptables flavors the requested variants need (nftables: iptables-nft's
    // baseline, and its symlinks on the daemon's PATH like the others).
    let mut flavors: Vec<Backend> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for name in ["nft", "legacy"] {
        let wanted = opts
            .backends
            .iter()
            .any(|v| v == name || (name == "nft" && v == "nftables"));
        if !wanted {
            continue;
        }
        match Backend::detect(name) {
            Ok(b) => flavors.push(b),
            Err(e) => {
                progress(format!("iptables-{name} skipped: {e}"));
                skipped.push(format!("iptables-{name}: {e}"));
            }
        }
    }
    let flavor = |name: &str| flavors.iter().find(|b| b.name == name);
    let mut variants: Vec<Variant> = Vec::new();
    for want in ["nftables", "nft", "legacy"] {
        if !opts.backends.iter().any(|v| v == want) {
            continue;
        }
        let (label, fw, fl) = match want {
            "nftables" => (
                "natmap --backend nftables (native: own tables, netlink)",
                Fw::Nftables,
                "nft",
            ),
            "nft" => (
                "natmap --backend iptables on iptables-nft",
                Fw::Iptables,
                "nft",
            ),
            _ => (
                "natmap --backend iptables on iptables-legacy",
                Fw::Iptables,
                "legacy",
            ),
        };
        let Some(f) = flavor(fl) else {
            if want == "nftables" {
                skipped.push("nftables: needs iptables-nft (its naive baseline)".into());
            }
            continue;
        };
        if fw == Fw::Nftables && find_tool("nft").is_none() {
            skipped.push("nftables: no `nft` binary".into());
            continue;
        }
        variants.push(Variant {
            name: want,
            label,
            fw,
            flavor: f,
        });
    }
    if variants.is_empty() {
        return Err(format!("no usable backend ({})", skipped.join("; ")));
    }

    // The naive baseline and the iptables pieces once per flavor and N.
    let mut baselines: BTreeMap<(&str, usize), Run> = BTreeMap::new();
    let mut profiles: BTreeMap<(&str, usize), Run> = BTreeMap::new();
    let mut results: Vec<(&Variant, usize, Run)> = Vec::new();
    for v in &variants {
        for &n in &ctx.sizes {
            let mut run = Run::default();
            if ctx.over_budget() {
                run.notes
                    .push(format!("skipped: time budget of {:?} used up", opts.budget));
                progress(format!("[{} N={n}] skipped (time budget)", v.name));
                results.push((v, n, run));
                continue;
            }
            if !ctx.apply && n > opts.seq_max {
                // Populating by sequential adds: project from the last N.
                let last = results
                    .iter()
                    .rev()
                    .find(|(rv, _, r)| rv.name == v.name && r.secs("add").is_some());
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
                if let Err(e) = natmap_phase(&ctx, v, n, &mut run) {
                    progress(format!("[{} N={n}] natmap phase failed: {e}", v.name));
                    run.notes
                        .push(format!("natmap phase failed: {}", first_line(&e)));
                }
            }
            let b = v.flavor;
            let base = baselines.entry((b.name, n)).or_insert_with(|| {
                let mut r = Run::default();
                if let Err(e) = baseline_phase(&ctx, b, n, &mut r) {
                    progress(format!("[{} N={n}] baseline phase failed: {e}", b.name));
                    r.notes
                        .push(format!("baseline phase failed: {}", first_line(&e)));
                }
                r
            });
            run.merge(base);
            if v.fw == Fw::Iptables {
                let prof = profiles.entry((b.name, n)).or_insert_with(|| {
                    let mut r = Run::default();
                    if let Err(e) = profile_phase(&ctx, b, n, &mut r) {
                        progress(format!("[{} N={n}] profile phase failed: {e}", b.name));
                        r.notes
                            .push(format!("profile phase failed: {}", first_line(&e)));
                    }
                    r
                });
                run.merge(prof);
            }
            progress(format!(
                "[{} N={n}] done, {} elapsed",
                v.name,
                fmt_dur(ctx.elapsed())
            ));
            results.push((v, n, run));
        }
    }

    // The packet path at N = 10 and the largest N.
    let mut packets: Vec<(&Variant, usize, Result<Pkt, String>)> = Vec::new();
    let pkt_sizes: Vec<usize> = if max_n > PKT_SMALL {
        vec![PKT_SMALL, max_n]
    } else {
        vec![max_n]
    };
    for v in &variants {
        for &n in &pkt_sizes {
            let r = if !opts.packet {
                Err("skipped (--no-packet)".to_owned())
            } else if ctx.over_budget() {
                Err("skipped (time budget)".to_owned())
            } else {
                packet_phase(&ctx, v, n)
            };
            match &r {
                Ok(p) => progress(format!(
                    "[{} N={n}] packet path: connect median {}, p90 {} ({} connects, {} accepted)",
                    v.name,
                    fmt_us(p.median),
                    fmt_us(p.p90),
                    p.connects,
                    p.accepted
                )),
                Err(e) => progress(format!("[{} N={n}] packet path: {e}", v.name)),
            }
            packets.push((v, n, r));
        }
    }

    let report = report(&ctx, &m, &flavors, &variants, &skipped, &results, &packets);
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

/// The iptables backend's per-change figures before issue 13's work
/// (docs/performance.md, run of 2026-11-22 00:45 UTC at commit 9144cbb, same
/// machine, CLI process included, load average about 2): (flavor, N, add
/// ms, remove ms, `ping` ms: the CLI round trip, to show the load's share).
const BEFORE: [(&str, usize, f64, f64, f64); 4] = [
    ("nft", 100, 3.35, 34.4, 0.76),
    ("nft", 1000, 9.45, 53.5, 0.80),
    ("legacy", 100, 4.53, 9.01, 1.37),
    ("legacy", 1000, 11.4, 15.8, 0.84),
];
/// "No slower than before" allows this much run-to-run noise on a shared box.
const NO_SLOWER: f64 = 1.10;

/// A target's verdict.
enum Verdict {
    Met,
    NotMet,
    NotMeasured(String),
}

impl Verdict {
    fn of(ok: Option<bool>, why: impl Into<String>) -> Verdict {
        match ok {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::NotMet,
            None => Verdict::NotMeasured(why.into()),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Met => f.write_str("MET"),
            Verdict::NotMet => f.write_str("**NOT MET**"),
            Verdict::NotMeasured(why) => write!(f, "NOT MEASURED: {why}"),
        }
    }
}

fn report(
    ctx: &Ctx,
    m: &Machine,
    flavors: &[Backend],
    variants: &[Variant],
    skipped: &[String],
    results: &[(&Variant, usize, Run)],
    packets: &[(&Variant, usize, Result<Pkt, String>)],
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
            "`cargo bench --bench natmap` (release profile)"
        }
    );
    let _ = writeln!(
        r,
        "- machine: {} CPUs ({}), {} RAM, kernel {}; load average at start {}, at end {} \
         (other work on the machine shows up as noise); run took {}",
        m.nproc,
        m.cpu,
        m.mem,
        m.kernel,
        m.load,
        loadavg(),
        fmt_dur(ctx.elapsed())
    );
    for b in flavors {
        let _ = writeln!(r, "- iptables-{}: `{}`", b.name, b.version);
    }
    if variants.iter().any(|v| v.fw == Fw::Nftables) {
        let nft = output_ok(Command::new("nft").arg("--version"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| e);
        let _ = writeln!(r, "- nft: `{nft}` (the nftables backend uses it for whole tables and reads; element changes go over netlink)");
    }
    for s in skipped {
        let _ = writeln!(r, "- skipped: {s}");
    }
    for (_, why) in ctx.substituted.values() {
        let _ = writeln!(r, "- {why}");
    }
    let _ = writeln!(
        r,
        "- single add/remove, `ping` and `ls`: median of {} (CLI process included); {} concurrent CLI clients × {} adds, \
         {} concurrent socket clients × {} adds; baseline install/recovery above N={} estimated from {} mappings at chain length N/2 (marked est.)",
        o.reps, o.clients, o.adds_per_client, o.clients, o.socket_adds_per_client, o.exact_baseline_max, o.sample
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
    let _ = writeln!(r, "- the naive baseline runs once per iptables flavor and N; the nftables variant is compared with iptables-nft's");
    let _ = writeln!(r, "- speed-up = baseline time / natmap time (for rates: natmap / baseline); > 1 means natmap is faster\n");

    let rows: [(&str, &str, &str, &str); 12] = [
        ("ping", "", "`ping` at N (no-op request, CLI process)", ""),
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
            "concurrent CLI clients, acked adds/s",
            "same clients, 4 × `-A` each",
        ),
        (
            "conc_sock",
            "",
            "concurrent socket clients, acked adds/s",
            "",
        ),
        ("ls", "", "`ls --json` at N", ""),
        ("rss", "", "daemon RSS at N", ""),
        (
            "idle_cpu",
            "",
            "idle daemon CPU (drift check every 2 s)",
            "",
        ),
        (
            "state_size",
            "",
            "state dir size at N (state + journal)",
            "",
        ),
    ];
    for v in variants {
        let _ = writeln!(r, "### {}: {}\n", v.name, v.label);
        let _ = writeln!(
            r,
            "| N | measurement | natmap | naive baseline (iptables-{}) | speed-up |\n|---:|---|---:|---:|---:|",
            v.flavor.name
        );
        for (_, n, run) in results.iter().filter(|(rv, _, _)| rv.name == v.name) {
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

    // The packet path.
    let pkt = |name: &str, n: usize| {
        packets
            .iter()
            .find(|(v, pn, _)| v.name == name && *pn == n)
            .map(|(_, _, p)| p)
    };
    let pkt_sizes: BTreeSet<usize> = packets.iter().map(|(_, n, _)| *n).collect();
    if !packets.is_empty() {
        let _ = writeln!(
            r,
            "### packet path: new TCP connection through the router (client → DNAT → server)\n"
        );
        let _ = writeln!(
            r,
            "Median (p90) time of `connect()` from the client namespace to the router's address, \
             DNATed to a listener in the server namespace, over up to {PKT_CONNECTS} connects \
             (≤ {} s) after 50 warm-up connects; the measured mapping is the last of N.\n",
            PKT_WINDOW.as_secs()
        );
        let head: Vec<String> = pkt_sizes.iter().map(|n| format!("N={n}")).collect();
        let _ = writeln!(
            r,
            "| variant | {} | largest N / N={PKT_SMALL} |\n|---|{}---:|",
            head.join(" | "),
            "---:|".repeat(pkt_sizes.len())
        );
        for v in variants {
            let cells: Vec<String> = pkt_sizes
                .iter()
                .map(|&n| match pkt(v.name, n) {
                    Some(Ok(p)) => format!(
                        "{} ({}; {} connects)",
                        fmt_us(p.median),
                        fmt_us(p.p90),
                        p.connects
                    ),
                    Some(Err(e)) => first_line(e).to_owned(),
                    None => "—".into(),
                })
                .collect();
            let growth =
                pkt_growth(packets, v.name).map_or("—".into(), |(_, _, x)| format!("{x:.2}×"));
            let _ = writeln!(r, "| {} | {} | {growth} |", v.name, cells.join(" | "));
        }
        let _ = writeln!(r);
    }

    // Where the time goes.
    let _ = writeln!(r, "### where the time goes (pieces timed by hand)\n");
    let prof: [(&str, &str); 19] = [
        ("ping", "CLI round trip (`ping`: process + socket + JSON)"),
        (
            "p_add_dry",
            "`--dry-run dnat` at N (everything but the firewall and the state write)",
        ),
        ("p_del_dry", "`--dry-run dnat --delete` at N"),
        (
            "p_apply_dry",
            "`--dry-run apply` of N into an empty daemon (table output)",
        ),
        ("p_apply_dry_json", "same with `--json` (no table)"),
        (
            "p_state_write",
            "whole-file write of state.json's size (tmp, fsync, rename, fsync dir; what a change cost before the journal)",
        ),
        ("state_size", "state dir size at N (state + journal)"),
        (
            "p_journal",
            "one journal line appended and `fdatasync`ed (natmap's state write per change now)",
        ),
        (
            "p_nft_list",
            "`nft -j list table ip natmap` at N (the drift check's read, every 2 s, per family)",
        ),
        (
            "p_nft_add",
            "`nft add element` of one mapping (a process per change, for comparison with netlink)",
        ),
        ("p_nft_del", "`nft delete element` of one mapping"),
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
    let residuals: [(&str, &str, &[&str]); 7] = [
        (
            "add − dry-run add (firewall change, state write, answer)",
            "add",
            &["p_add_dry"],
        ),
        (
            "remove − dry-run remove (firewall change, state write, conntrack, answer)",
            "remove",
            &["p_del_dry"],
        ),
        (
            "apply − dry-run apply (firewall, state write)",
            "bulk",
            &["p_apply_dry"],
        ),
        (
            "add − (dry-run add + append restore)",
            "add",
            &["p_add_dry", "p_add"],
        ),
        (
            "remove − (dry-run remove + removal restore + conntrack)",
            "remove",
            &["p_del_dry", "p_del", "p_conntrack"],
        ),
        (
            "apply − (dry-run apply + N into empty chains)",
            "bulk",
            &["p_apply_dry", "p_full"],
        ),
        ("recovery − N into empty chains", "recovery", &["p_full"]),
    ];
    for v in variants {
        let runs: Vec<&Run> = results
            .iter()
            .filter(|(rv, _, _)| rv.name == v.name)
            .map(|(_, _, run)| run)
            .collect();
        let sizes: Vec<String> = results
            .iter()
            .filter(|(rv, _, _)| rv.name == v.name)
            .map(|(_, n, _)| format!("N={n}"))
            .collect();
        let _ = writeln!(r, "| {} | {} |", v.name, sizes.join(" | "));
        let _ = writeln!(r, "|---|{}", "---:|".repeat(runs.len()));
        for (key, label) in prof {
            let cells: Vec<String> = runs.iter().map(|run| cell(run.get(key))).collect();
            if cells.iter().all(|c| c == "—") {
                continue;
            }
            let _ = writeln!(r, "| {label} | {} |", cells.join(" | "));
        }
        for (label, total, parts) in residuals {
            let cells: Vec<String> = runs.iter().map(|run| residual(run, total, parts)).collect();
            if cells.iter().all(|c| c == "—") {
                continue;
            }
            let _ = writeln!(r, "| {label} | {} |", cells.join(" | "));
        }
        let _ = writeln!(r);
    }

    targets(&mut r, ctx, results, packets);
    r
}

/// (time at N = PKT_SMALL, time at the largest N, ratio) of a variant.
fn pkt_growth(
    packets: &[(&Variant, usize, Result<Pkt, String>)],
    name: &str,
) -> Option<(Duration, Duration, f64)> {
    let small = packets
        .iter()
        .find(|(v, n, _)| v.name == name && *n == PKT_SMALL)
        .and_then(|(_, _, p)| p.as_ref().ok())?;
    let large = packets
        .iter()
        .filter(|(v, n, _)| v.name == name && *n > PKT_SMALL)
        .max_by_key(|(_, n, _)| *n)
        .and_then(|(_, _, p)| p.as_ref().ok())?;
    Some((
        small.median,
        large.median,
        large.median.as_secs_f64() / small.median.as_secs_f64(),
    ))
}

/// Every target of issue 13, with the value measured and MET / NOT MET.
fn targets(
    r: &mut String,
    ctx: &Ctx,
    results: &[(&Variant, usize, Run)],
    packets: &[(&Variant, usize, Result<Pkt, String>)],
) {
    let o = &ctx.opts;
    let find = |name: &str, n: usize| {
        results
            .iter()
            .find(|(v, rn, _)| v.name == name && *rn == n)
            .map(|(_, _, run)| run)
    };
    let ms = |run: Option<&Run>, k: &str| run.and_then(|r| r.secs(k)).map(|s| s * 1e3);
    let missing = |what: &str, n: usize| {
        if !o.sizes.contains(&n) {
            format!("N = {n} not in --sizes")
        } else if !o.backends.iter().any(|b| b == what) {
            format!("{what} not in --backends")
        } else {
            format!("{what} at N = {n}: no value (skipped or failed, see above)")
        }
    };
    // The N a target names → the N measured and, if they differ, why.
    let at = |n: usize| -> (usize, Option<&String>) {
        match ctx.substituted.get(&n) {
            Some((m, why)) => (*m, Some(why)),
            None => (n, None),
        }
    };
    // A value measured at another N than the target's is never MET (the
    // header says why that N could not run).
    let judge = |ok: Option<bool>, sub: Option<&String>, missing: String| -> Verdict {
        match (ok, sub) {
            (Some(ok), Some(_)) => Verdict::NotMeasured(format!(
                "N = 10000 does not fit this machine's open-file limit (see the header); \
                 at the N measured instead it is {}",
                if ok {
                    "within the target"
                } else {
                    "outside the target"
                }
            )),
            _ => Verdict::of(ok, missing),
        }
    };
    let pre = |n: usize, sub: Option<&String>| -> String {
        if sub.is_some() {
            format!("at N = {n}: ")
        } else {
            String::new()
        }
    };
    let rate = |run: Option<&Run>, k: &str| match run.and_then(|r| r.get(k)) {
        Some(Val::Rate(x)) => Some(*x),
        _ => None,
    };
    // Other variants' values beside the judged one, for comparison.
    let beside = |k: &str, n: usize, show: &dyn Fn(&Run) -> Option<String>| -> String {
        let v: Vec<String> = ["nft", "legacy"]
            .iter()
            .filter_map(|name| {
                let run = find(name, n)?;
                Some(format!("iptables-{name} {}", show(run)?))
            })
            .collect();
        let _ = k;
        if v.is_empty() {
            String::new()
        } else {
            format!(" (beside: {})", v.join(", "))
        }
    };
    let _ = writeln!(
        r,
        "### targets (issue 13)\n\n| target | measured | verdict |\n|---|---|---|"
    );
    let mut row = |name: String, measured: String, v: Verdict| {
        let _ = writeln!(r, "| {name} | {measured} | {v} |");
    };

    // nftables: add and remove ≤ 3 × ping at every N.
    for (key, what) in [("add", "add"), ("remove", "remove")] {
        for &n in &o.sizes {
            let (m, sub) = at(n);
            let run = find("nftables", m);
            let (x, p) = (ms(run, key), ms(run, "ping"));
            let ratio = x.zip(p).map(|(x, p)| x / p);
            row(
                format!("nftables: one `dnat` {what} ≤ 3× `ping` (CLI included), N = {n}"),
                match (x, p, ratio) {
                    (Some(x), Some(p), Some(q)) => {
                        format!("{}{x:.2} ms vs. ping {p:.2} ms = {q:.2}×", pre(m, sub))
                    }
                    _ => "—".into(),
                },
                judge(ratio.map(|q| q <= 3.0), sub, missing("nftables", n)),
            );
        }
        let (bn, bsub) = at(10_000);
        let (a, b) = (
            ms(find("nftables", 100), key),
            ms(find("nftables", bn), key),
        );
        let ratio = a.zip(b).map(|(a, b)| b / a);
        row(
            format!("nftables: {what} at N = 10000 within 1.5× of N = 100"),
            match (a, b, ratio) {
                (Some(a), Some(b), Some(q)) => {
                    format!("{}{b:.2} ms vs. {a:.2} ms = {q:.2}×", pre(bn, bsub))
                }
                _ => "—".into(),
            },
            judge(
                ratio.map(|q| q <= 1.5),
                bsub,
                if !o.sizes.contains(&100) {
                    missing("nftables", 100)
                } else {
                    missing("nftables", 10_000)
                },
            ),
        );
    }

    // nftables at N = 1000 against the naive baseline on iptables-nft.
    let nf = find("nftables", 1000);
    let (a, b) = (ms(nf, "add"), ms(nf, "b_add"));
    let q = a.zip(b).map(|(a, b)| a / b);
    row(
        "nftables at N = 1000: add ≤ 0.3× the naive 4 × `iptables -A` (iptables-nft)".into(),
        match (a, b, q) {
            (Some(a), Some(b), Some(q)) => format!("{a:.2} ms vs. {b:.2} ms = {q:.2}×"),
            _ => "—".into(),
        },
        Verdict::of(q.map(|q| q <= 0.3), missing("nftables", 1000)),
    );
    let (a, b) = (ms(nf, "remove"), ms(nf, "b_remove"));
    let q = a.zip(b).map(|(a, b)| b / a);
    row(
        "nftables at N = 1000: remove ≥ 30× faster than the naive list-and-delete-by-line".into(),
        match (a, b, q) {
            (Some(a), Some(b), Some(q)) => format!("{a:.2} ms vs. {b:.1} ms = {q:.1}× faster"),
            _ => "—".into(),
        },
        Verdict::of(q.map(|q| q >= 30.0), missing("nftables", 1000)),
    );

    // Bulk, recovery, concurrency, RSS, idle CPU at N = 10000 (nftables).
    let (big_n, big_sub) = at(10_000);
    let big = find("nftables", big_n);
    let show_ms =
        |k: &'static str| move |run: &Run| run.secs(k).map(|s| format!("{:.1} ms", s * 1e3));
    for (key, name, limit) in [
        ("bulk", "`apply` of 10000 mappings ≤ 200 ms", 200.0),
        ("recovery", "daemon start recovering 10000 ≤ 200 ms", 200.0),
    ] {
        let x = ms(big, key);
        row(
            format!("nftables: {name}"),
            format!(
                "{}{}{}",
                pre(big_n, big_sub),
                opt_ms(x),
                beside(key, big_n, &show_ms(key))
            ),
            judge(x.map(|x| x <= limit), big_sub, missing("nftables", 10_000)),
        );
    }
    let show_rate = |k: &'static str| {
        move |run: &Run| match run.get(k) {
            Some(Val::Rate(x)) => Some(format!("{x:.0}/s")),
            _ => None,
        }
    };
    for (key, how) in [
        (
            "conc_sock",
            "socket clients (a connection each, no process per add)",
        ),
        ("conc", "CLI clients (a `lab-ops` process per add)"),
    ] {
        let x = rate(big, key);
        row(
            format!(
                "nftables: {} concurrent {how} ≥ 3000 acknowledged adds/s, N = 10000",
                o.clients
            ),
            format!(
                "{}{}{}",
                pre(big_n, big_sub),
                x.map_or("—".into(), |x| format!("{x:.0}/s")),
                beside(key, big_n, &show_rate(key))
            ),
            judge(x.map(|x| x >= 3000.0), big_sub, missing("nftables", 10_000)),
        );
    }
    let rss = match big.and_then(|r| r.get("rss")) {
        Some(Val::Bytes(b)) => Some(*b),
        _ => None,
    };
    row(
        "nftables: daemon RSS at N = 10000 ≤ 40 MB".into(),
        format!(
            "{}{}{}",
            pre(big_n, big_sub),
            rss.map_or("—".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
            beside("rss", big_n, &|run: &Run| run
                .get("rss")
                .map(|v| v.to_string()))
        ),
        judge(
            rss.map(|b| b <= 40_000_000),
            big_sub,
            missing("nftables", 10_000),
        ),
    );
    let idle = match big.and_then(|r| r.get("idle_cpu")) {
        Some(Val::Pct(p)) => Some(*p),
        _ => None,
    };
    row(
        "nftables: idle CPU at N = 10000 ≤ 0.5 % of a core".into(),
        format!(
            "{}{}{}",
            pre(big_n, big_sub),
            idle.map_or("—".into(), |p| format!("{p:.2} %")),
            beside("idle_cpu", big_n, &|run: &Run| match run.get("idle_cpu") {
                Some(Val::Pct(p)) => Some(format!("{p:.2} %")),
                _ => None,
            })
        ),
        judge(idle.map(|p| p <= 0.5), big_sub, missing("nftables", 10_000)),
    );

    // Packet path.
    let g = pkt_growth(packets, "nftables");
    let large_n = packets.iter().map(|(_, n, _)| *n).max().unwrap_or(0);
    let ipt: Vec<String> = ["nft", "legacy"]
        .iter()
        .filter_map(|name| {
            pkt_growth(packets, name)
                .map(|(a, b, x)| format!("iptables-{name} {} → {} = {x:.2}×", fmt_us(a), fmt_us(b)))
        })
        .collect();
    let why = if !o.packet {
        "--no-packet".to_owned()
    } else if large_n != big_n {
        format!("largest N is {large_n}, not 10000")
    } else {
        packets
            .iter()
            .find(|(v, _, p)| v.name == "nftables" && p.is_err())
            .and_then(|(_, n, p)| {
                p.as_ref()
                    .err()
                    .map(|e| format!("N = {n}: {}", first_line(e)))
            })
            .unwrap_or_else(|| "nftables not measured".into())
    };
    row(
        format!("nftables: new TCP connection through the router at N = 10000 ≤ 1.2× N = {PKT_SMALL} (iptables' growth beside)"),
        format!(
            "{}{}{}",
            pre(large_n, big_sub),
            g.map_or("—".into(), |(a, b, x)| format!(
                "{} → {} = {x:.2}×",
                fmt_us(a),
                fmt_us(b)
            )),
            if ipt.is_empty() {
                String::new()
            } else {
                format!(" (beside: {})", ipt.join("; "))
            }
        ),
        judge(
            g.filter(|_| large_n == big_n).map(|(_, _, x)| x <= 1.2),
            big_sub,
            why,
        ),
    );

    // iptables backend: per change no slower than before.
    for flavor in ["nft", "legacy"] {
        let mut parts = Vec::new();
        let mut ok: Option<bool> = None;
        for (f, n, add0, rm0, ping0) in BEFORE {
            if f != flavor {
                continue;
            }
            let run = find(flavor, n);
            if let (Some(a), Some(rm)) = (ms(run, "add"), ms(run, "remove")) {
                let ping = ms(run, "ping").map_or("—".into(), |p| format!("{p:.2} ms"));
                parts.push(format!(
                    "N = {n}: add {a:.2} ms (before {add0} ms), remove {rm:.2} ms (before {rm0} ms), \
                     ping {ping} (before {ping0} ms)"
                ));
                let fine = a <= add0 * NO_SLOWER && rm <= rm0 * NO_SLOWER;
                ok = Some(ok.unwrap_or(true) && fine);
            }
        }
        row(
            format!(
                "iptables backend on iptables-{flavor}: add and remove per change no slower than before \
                 (≤ {NO_SLOWER}× the 2026-11-22 run at N = 100, 1000)"
            ),
            if parts.is_empty() { "—".into() } else { parts.join("; ") },
            Verdict::of(ok, missing(flavor, 1000)),
        );
    }
    // iptables backend: the engine's work per change flat in N.
    for flavor in ["nft", "legacy"] {
        let (a, b) = (find(flavor, 100), find(flavor, big_n));
        let mut parts = Vec::new();
        let mut ok: Option<bool> = None;
        for (k, what) in [("p_add_dry", "add"), ("p_del_dry", "remove")] {
            if let (Some(x), Some(y)) = (ms(a, k), ms(b, k)) {
                parts.push(format!(
                    "{}{what} {x:.2} → {y:.2} ms = {:.2}×",
                    pre(big_n, big_sub),
                    y / x
                ));
                ok = Some(ok.unwrap_or(true) && y <= 1.5 * x);
            }
        }
        row(
            format!(
                "iptables backend on iptables-{flavor}: engine work per change flat in N \
                 (`--dry-run` add/remove, CLI included, N = 10000 ≤ 1.5× N = 100; the issue names no factor)"
            ),
            if parts.is_empty() { "—".into() } else { parts.join("; ") },
            judge(
                ok,
                big_sub,
                if o.sizes.contains(&100) {
                    missing(flavor, 10_000)
                } else {
                    missing(flavor, 100)
                },
            ),
        );
    }
    row(
        "iptables backend: state write per change flat in N".into(),
        "the pieces table times a journal line append by hand, and the residual rows \
         (add − dry-run − restore)"
            .into(),
        Verdict::NotMeasured(
            "the journal append happens inside the daemon's request; the bench cannot time it \
             apart from the answer"
                .into(),
        ),
    );
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
