//! `install` and `uninstall`: put natmap on a host (or take it off) without
//! talking to the daemon. Install copies the binary, creates the socket
//! group, writes the systemd unit and hands the daemon to systemd; uninstall
//! reverses that.
//!
//! Every step is checked before it acts, so a second run changes nothing and
//! says so; `--dry-run` prints exactly what would be written and run; every
//! external program is started with an argv, never through a shell.
//!
//! `--root DIR` treats DIR as the target system's `/` (images, tests): files
//! go under it, the group is edited with `groupadd --prefix DIR`, and nothing
//! is asked of the running systemd.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::Args;
use color_eyre::eyre::{bail, eyre, Result, WrapErr};

/// One line of progress, through [`Steps::line`]: printed (ignoring a
/// closed stdout, `| head`: a half-done install is worse than lost progress
/// lines), or kept for the JSON report under `--json`.
macro_rules! say {
    ($steps:expr, $($arg:tt)*) => {{
        $steps.line(format!($($arg)*))
    }};
}

/// Where `install` puts the binary (and where its unit's `ExecStart` points).
pub const INSTALLED_BINARY: &str = "/usr/local/bin/lab-ops";
/// Where the Debian package puts the binary (its unit points there).
pub const PACKAGED_BINARY: &str = "/usr/bin/lab-ops";
/// The unit `install` writes. It overrides a packaged unit of the same name.
pub const UNIT_PATH: &str = "/etc/systemd/system/natmap.service";
/// The unit the Debian package ships.
pub const PACKAGED_UNIT_PATH: &str = "/usr/lib/systemd/system/natmap.service";
/// The unit's name, for systemctl.
pub const UNIT_NAME: &str = "natmap.service";
/// The group allowed to use the daemon's socket.
pub const GROUP: &str = "natmap";
/// The daemon's state directory (systemd's `StateDirectory=natmap`).
pub const STATE_DIR: &str = "/var/lib/natmap";
/// The daemon's state file.
pub const STATE_FILE: &str = "/var/lib/natmap/state.json";
/// The daemon's control socket.
pub const SOCKET: &str = "/run/natmap.sock";

/// `install`: put natmap on this host and start it under systemd.
#[derive(Debug, Args)]
#[command(after_help = "Steps (each skipped when already done):
  1. copy this binary to /usr/local/bin/lab-ops (mode 0755)
  2. create the natmap system group; add $SUDO_USER to it
  3. write /etc/systemd/system/natmap.service
  4. systemctl daemon-reload; systemctl enable --now natmap.service
With --dry-run: prints every step (file contents, exact commands), changes nothing.

Examples:
  sudo lab-ops natmap install
  lab-ops natmap install --dry-run
  sudo lab-ops natmap install --root /mnt/image --binary target/release/lab-ops")]
pub struct InstallArgs {
    /// Install into DIR as if it were / (an image, a test tree): no
    /// systemctl, the group via `groupadd --prefix DIR` (DIR/etc/group must
    /// exist).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Install this lab-ops binary instead of the one running.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

/// `uninstall`: stop natmap and remove what `install` put in place.
#[derive(Debug, Args)]
#[command(after_help = "With --dry-run: prints every step, changes nothing.
Keeps the saved rules (/var/lib/natmap) and the natmap group unless --purge.
The rules natmap put in the kernel stay until the next reboot or
`lab-ops natmap clear` (run that first to remove them now).

Examples:
  sudo lab-ops natmap uninstall
  sudo lab-ops natmap uninstall --purge
  lab-ops natmap uninstall --dry-run")]
pub struct UninstallArgs {
    /// Also remove the state directory (the saved rules) and the natmap group.
    #[arg(long)]
    pub purge: bool,
    /// Uninstall from DIR as if it were / (no systemctl).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

/// The systemd unit, with `ExecStart` running `binary`.
///
/// One text for both installs: `install` renders it with
/// [`INSTALLED_BINARY`] (`packaging/natmap.service`), the Debian package
/// with [`PACKAGED_BINARY`] (`packaging/deb/natmap.service`). Unit tests keep
/// both files equal to this function.
pub fn render_unit(binary: &str) -> String {
    assert!(
        binary.starts_with('/')
            && binary
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b)),
        "ExecStart path must be absolute and need no quoting: {binary:?}"
    );
    UNIT_TEMPLATE
        .replace("@BINARY@", binary)
        .replace("@SOCKET@", SOCKET)
        .replace("@STATE_FILE@", STATE_FILE)
        .replace("@GROUP@", GROUP)
}

const UNIT_TEMPLATE: &str = r#"# natmap: the daemon that owns this host's NAT rules (lab-ops natmap).
# Written by `lab-ops natmap install`, or shipped by the lab-ops Debian package.
# Generated from src/cli/install.rs (render_unit); edit there, not here.
# Local changes belong in a drop-in: systemctl edit natmap

[Unit]
Description=natmap NAT rule daemon (lab-ops)
# Docker rebuilds its own chains when it starts; natmap starts after it so its
# jumps go in front of Docker's (the daemon repairs them if Docker restarts
# later). Wants= on a unit that does not exist is ignored, so hosts without
# Docker need no other unit.
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
# The daemon does not speak sd_notify: simple it is.
Type=simple
ExecStart=@BINARY@ natmap --socket @SOCKET@ daemon --state @STATE_FILE@ --socket-group @GROUP@
Restart=on-failure
RestartSec=2s
# SIGTERM removes natmap's rules (the state stays for the next start) before
# the daemon exits: at most a change in flight (two iptables-restore runs of
# up to 10 s xtables-lock wait each, and their rollback) plus the removal
# (two more), 60 s in the worst case, well under 1 s without lock contention,
# also with every connection slot taken by hostile clients. A SIGKILL after
# the timeout would leave DNAT rules in the kernel with no ports held.
TimeoutStopSec=90s
LimitNOFILE=65536
# `systemctl reload natmap` re-reads /etc/natmap/config.toml (auto-discover);
# a broken file keeps the running config. Rules and state are not touched.
ExecReload=/bin/kill -HUP $MAINPID

# Root, but with only the capabilities it uses. CAP_NET_ADMIN: iptables-restore,
# ip rule/route, conntrack -D and the net.* sysctls (ip_forward). CAP_NET_RAW:
# iptables-legacy talks to the kernel over a raw socket. CAP_NET_BIND_SERVICE:
# holding forwarded ports below 1024 so nothing else takes them. Without
# CAP_DAC_OVERRIDE it reaches only root-owned files: its state, its socket,
# /run/xtables.lock and Docker's socket (root:docker 0660) all are.
# AmbientCapabilities= matters only for a non-root User=; kept equal so a
# drop-in that sets User= keeps working.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
# The daemon gives its socket to the @GROUP@ group. Without CAP_CHOWN a file's
# owner may only hand it to a group it is a member of, so the daemon must be
# one (else it stops with "cannot chown ...: EPERM"). The group must exist
# before the unit starts: `lab-ops natmap install` and the package create it.
# A drop-in that changes --socket-group must change this line too.
SupplementaryGroups=@GROUP@

# The whole file system is read-only except:
# - the state directory (StateDirectory= creates it, 0700, and makes it
#   writable; listed again so the intent is visible);
# - /run: the socket is /run/natmap.sock, a path clients know, and the daemon
#   creates it without a world-connectable moment by binding in a private
#   directory next to it and renaming it into place, so it needs /run itself.
#   RuntimeDirectory= would only give /run/natmap/ and move the socket.
# - /run/xtables.lock, iptables' lock, shared with Docker and other tools.
#   Already covered by /run; named so narrowing /run later keeps it. The "-"
#   prefix ignores it when absent (iptables-nft never creates it).
# Docker's socket (/var/run/docker.sock, i.e. /run/docker.sock) needs no
# entry: connect(2) checks only the socket's own permission bits, and a
# read-only mount refuses writes to files, directories and links, not
# connections to sockets.
# /proc/sys stays writable: ProtectSystem= leaves /proc alone, and
# ProtectKernelTunables= is deliberately off because `fwd` and the self-repair
# of a reset ip_forward write /proc/sys/net/ipv{4,6}/....
ProtectSystem=strict
StateDirectory=natmap
StateDirectoryMode=0700
ReadWritePaths=/var/lib/natmap /run -/run/xtables.lock
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
UMask=0077

# Netlink (nftables, ip rule, conntrack), inet and inet6 (iptables-legacy's raw
# sockets, port reservations, the loopback relay), unix (its socket, Docker's).
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
# Module loading stays with the kernel: when iptables-restore asks for the nat
# table or a match (xt_multiport, nft_chain_nat, ...) the kernel loads the
# module itself via its modprobe helper, which runs outside this sandbox, and
# ProtectKernelModules= does not stop that. What it blocks is this process
# loading modules itself, which needs CAP_SYS_MODULE, already not in the
# bounding set. (Consequence: iptables-legacy's own "modprobe ip_tables"
# fallback cannot work here; a legacy host whose ip_tables module is not
# loaded at boot needs it in /etc/modules-load.d/.)
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"#;

/// Runs `install`; `dry_run` and `json` are the global `--dry-run` and `--json`.
pub fn run_install(args: InstallArgs, dry_run: bool, json: bool) -> Result<ExitCode> {
    let target = Target::new(args.root.as_deref())?;
    require_root(dry_run, &target, "install")?;
    let mut out = Steps::new(dry_run, json);
    out.banner("install", &target);

    // 1. The binary.
    let (source, shown_source) = binary_source(args.binary.as_deref())?;
    let binary_changed = out.install_file(
        "binary",
        &target.path(INSTALLED_BINARY),
        FileSource::Copy {
            from: &source,
            shown: &shown_source,
        },
        0o755,
    )?;

    // 2. The group, and the user who ran sudo.
    out.ensure_group(&target)?;

    // 3. The unit.
    if target.join(PACKAGED_UNIT_PATH).exists() {
        out.note(&format!(
            "unit: the lab-ops Debian package's {PACKAGED_UNIT_PATH} (running \
             {PACKAGED_BINARY}) is present; {UNIT_PATH} takes precedence over it"
        ));
    }
    let unit = render_unit(INSTALLED_BINARY);
    let unit_changed = out.install_file(
        "unit",
        &target.path(UNIT_PATH),
        FileSource::Bytes(unit.as_bytes()),
        0o644,
    )?;

    // 4. systemd.
    if target.is_host() {
        out.start_service(unit_changed, binary_changed)?;
    } else {
        out.note(&format!(
            "systemd: not touched (--root); on that system run: systemctl daemon-reload && \
             systemctl enable --now {UNIT_NAME}"
        ));
    }
    out.summary("install");
    out.finish("install");
    Ok(ExitCode::SUCCESS)
}

/// The binary `install` copies and the name it prints for it: `--binary`
/// (checked to be an executable file), else this program read through
/// /proc/self/exe, which still works when the running file was replaced or
/// deleted (then current_exe ends " (deleted)").
fn binary_source(binary: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    Ok(match binary {
        Some(p) => {
            let meta = fs::metadata(p).wrap_err_with(|| format!("--binary {}", p.display()))?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                bail!("--binary {}: not an executable file", p.display());
            }
            (p.to_owned(), p.to_owned())
        }
        None => (
            PathBuf::from("/proc/self/exe"),
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        ),
    })
}

/// Runs `uninstall`; `dry_run` and `json` are the global `--dry-run` and `--json`.
pub fn run_uninstall(args: UninstallArgs, dry_run: bool, json: bool) -> Result<ExitCode> {
    let target = Target::new(args.root.as_deref())?;
    require_root(dry_run, &target, "uninstall")?;
    let mut out = Steps::new(dry_run, json);
    out.banner("uninstall", &target);

    let unit = target.path(UNIT_PATH);
    let packaged = target.join(PACKAGED_UNIT_PATH).exists();
    if target.is_host() {
        out.stop_service()?;
    }
    let unit_removed = out.remove("unit", &unit, false)?;
    if target.is_host() && unit_removed && systemd_is_pid1() {
        out.run("systemd", &["systemctl", "daemon-reload"])?;
    }
    if packaged {
        out.note(&format!(
            "unit: {PACKAGED_UNIT_PATH} from the lab-ops Debian package remains \
             (remove it with: apt remove lab-ops)"
        ));
    }
    out.remove("binary", &target.path(INSTALLED_BINARY), false)?;

    let state = target.path(STATE_DIR);
    if args.purge {
        out.remove("state", &state, true)?;
    } else if state.exists() {
        out.note(&format!(
            "state: kept {} (the saved rules; --purge removes it)",
            state.display()
        ));
    }

    match lookup_group(&target)? {
        None => out.note(&format!("group: {GROUP} does not exist")),
        Some(_) if args.purge && packaged => out.note(&format!(
            "group: kept {GROUP}: the packaged unit {PACKAGED_UNIT_PATH} needs it              (SupplementaryGroups=)"
        )),
        Some(_) if args.purge => {
            let mut argv = vec![os("groupdel")];
            argv.extend(target.prefix_args());
            argv.push(os(GROUP));
            out.run("group", &argv)?;
        }
        Some(_) => out.note(&format!(
            "group: kept {GROUP} (files or sudoers rules may refer to it; --purge removes it)"
        )),
    }
    if target.is_host() && !dry_run {
        if let Ok(_stream) = std::os::unix::net::UnixStream::connect(SOCKET) {
            out.note(&format!(
                "warning: a natmap daemon still answers on {SOCKET} (started by hand?); \
                 stop it yourself"
            ));
        }
    }
    out.summary("uninstall");
    out.finish("uninstall");
    Ok(ExitCode::SUCCESS)
}

fn require_root(dry_run: bool, target: &Target, what: &str) -> Result<()> {
    if dry_run || !target.is_host() || nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    bail!(
        "`lab-ops natmap {what}` changes /usr/local/bin, /etc and systemd, so it must run as \
         root: sudo lab-ops natmap {what} (or see what it would do: lab-ops natmap {what} --dry-run)"
    )
}

/// The system being changed: this host (`/`) or a directory standing in for it.
struct Target {
    root: Option<PathBuf>,
}

impl Target {
    fn new(root: Option<&Path>) -> Result<Target> {
        let Some(root) = root else {
            return Ok(Target { root: None });
        };
        let abs =
            std::path::absolute(root).wrap_err_with(|| format!("--root {}", root.display()))?;
        if !abs.is_dir() {
            bail!("--root {}: not a directory", root.display());
        }
        Ok(Target { root: Some(abs) })
    }

    fn is_host(&self) -> bool {
        self.root.is_none()
    }

    /// `path` (absolute, as seen on the target) on this machine.
    fn path(&self, path: &str) -> PathBuf {
        self.join(path)
    }

    fn join(&self, path: &str) -> PathBuf {
        match &self.root {
            None => PathBuf::from(path),
            Some(root) => root.join(path.trim_start_matches('/')),
        }
    }

    /// `--prefix DIR` for groupadd/usermod/groupdel, or nothing.
    fn prefix_args(&self) -> Vec<OsString> {
        match &self.root {
            None => Vec::new(),
            Some(root) => vec![os("--prefix"), root.clone().into_os_string()],
        }
    }
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

/// What a file is made from.
enum FileSource<'a> {
    /// Copied from a file (`shown` is the name printed for it).
    Copy { from: &'a Path, shown: &'a Path },
    /// These bytes.
    Bytes(&'a [u8]),
}

impl FileSource<'_> {
    /// Whether `dest` already holds exactly these bytes (false when it is missing).
    fn same_as(&self, dest: &Path) -> io::Result<bool> {
        match self {
            FileSource::Copy { from, .. } => same_file_contents(from, dest),
            FileSource::Bytes(bytes) => match fs::read(dest) {
                Ok(have) => Ok(have == *bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    /// What the source is, as a step prints it, and its length in bytes.
    fn describe(&self, step: &str, dry_run: bool) -> Result<(String, u64)> {
        Ok(match self {
            FileSource::Copy { from, shown } => {
                let len = fs::metadata(from)
                    .wrap_err_with(|| format!("{step}: {}", shown.display()))?
                    .len();
                (format!("a copy of {}", shown.display()), len)
            }
            FileSource::Bytes(b) => {
                let what = if dry_run {
                    "the text below"
                } else {
                    "generated text"
                };
                (what.to_owned(), b.len() as u64)
            }
        })
    }
}

/// Prints and performs (or, in a dry run, only prints) the steps, counting
/// the changes. Under `--json` nothing is printed as it happens: the lines,
/// the changes and (in a dry run) the files' text make one JSON report at
/// the end ([`Steps::finish`]).
struct Steps {
    dry_run: bool,
    json: bool,
    changes: usize,
    /// Under `--json`: every progress line, in order.
    lines: RefCell<Vec<String>>,
    /// Under `--json`: each change, as `{"step": …, "action": …}`.
    changed: Vec<serde_json::Value>,
    /// Under `--json`, in a dry run: the files that would be written.
    files: Vec<serde_json::Value>,
}

impl Steps {
    fn new(dry_run: bool, json: bool) -> Steps {
        Steps {
            dry_run,
            json,
            changes: 0,
            lines: RefCell::new(Vec::new()),
            changed: Vec::new(),
            files: Vec::new(),
        }
    }

    /// One progress line (see [`say!`]).
    fn line(&self, text: String) {
        if self.json {
            self.lines.borrow_mut().push(text);
        } else {
            let _ = writeln!(io::stdout(), "{text}");
        }
    }

    /// Under `--json`, prints the report of `command` (the text lines were
    /// printed as they happened otherwise).
    fn finish(&self, command: &str) {
        if !self.json {
            return;
        }
        let report = serde_json::json!({
            "command": command,
            "dry_run": self.dry_run,
            "changes": self.changes,
            "changed": self.changed,
            "files": self.files,
            "lines": *self.lines.borrow(),
        });
        let line = serde_json::to_string(&crate::proto::Response::ok(report)).expect("serializes");
        let _ = writeln!(io::stdout(), "{line}");
    }

    fn banner(&self, what: &str, target: &Target) {
        let root = match &target.root {
            None => String::new(),
            Some(r) if what == "install" => format!(" into {}", r.display()),
            Some(r) => format!(" from {}", r.display()),
        };
        if self.dry_run {
            say!(
                self,
                "natmap {what}{root}: dry run, nothing will be changed"
            );
        } else {
            say!(self, "natmap {what}{root}");
        }
    }

    fn note(&self, line: &str) {
        say!(self, "{line}");
    }

    /// Records one change and prints it as done or, in a dry run, as planned.
    /// Called after the change is made (commands: just before they run).
    fn change(&mut self, step: &str, done: &str, planned: &str) {
        self.changes += 1;
        let action = if self.dry_run { planned } else { done };
        self.changed
            .push(serde_json::json!({"step": step, "action": action}));
        if self.dry_run {
            say!(self, "{step}: would {planned}");
        } else {
            say!(self, "{step}: {done}");
        }
    }

    fn summary(&self, what: &str) {
        match (self.dry_run, self.changes) {
            (true, 0) => say!(
                self,
                "dry run: nothing would change; natmap {what} has nothing to do"
            ),
            (true, n) => say!(
                self,
                "dry run: {n} change(s) would be made; nothing was changed"
            ),
            (false, 0) => say!(self, "nothing changed: natmap was already {what}ed"),
            (false, n) => say!(self, "done: {n} change(s)"),
        }
    }

    /// Makes `dest` hold `source` with `mode`: nothing when it already does,
    /// only a chmod when just the mode differs, else an atomic replace.
    /// Returns whether the content changed.
    fn install_file(
        &mut self,
        step: &str,
        dest: &Path,
        source: FileSource<'_>,
        mode: u32,
    ) -> Result<bool> {
        let same = source
            .same_as(dest)
            .wrap_err_with(|| format!("{step}: comparing with {}", dest.display()))?;
        if same {
            self.set_mode(step, dest, mode)?;
            return Ok(false);
        }
        let (what, len) = source.describe(step, self.dry_run)?;
        let verb = if dest.exists() { "replace" } else { "write" };
        if !self.dry_run {
            write_atomic(dest, &source, mode)
                .wrap_err_with(|| format!("{step}: writing {}", dest.display()))?;
        }
        self.change(
            step,
            &format!(
                "wrote {} ({what}, {len} bytes, mode {mode:04o})",
                dest.display()
            ),
            &format!(
                "{verb} {} with {what} ({len} bytes, mode {mode:04o}; via a temporary file \
                 in the same directory and rename)",
                dest.display()
            ),
        );
        if let FileSource::Bytes(b) = &source {
            self.show_planned_text(dest, b);
        }
        Ok(true)
    }

    /// Gives `dest`, whose content is already right, `mode` (a chmod when it
    /// differs, counted as a change).
    fn set_mode(&mut self, step: &str, dest: &Path, mode: u32) -> Result<()> {
        let have = fs::metadata(dest)?.permissions().mode() & 0o7777;
        if have == mode {
            say!(self, "{step}: {} is up to date", dest.display());
            return Ok(());
        }
        if !self.dry_run {
            fs::set_permissions(dest, fs::Permissions::from_mode(mode))
                .wrap_err_with(|| format!("chmod {}", dest.display()))?;
        }
        self.change(
            step,
            &format!("{}: mode {have:04o} -> {mode:04o}", dest.display()),
            &format!("chmod {mode:04o} {} (now {have:04o})", dest.display()),
        );
        Ok(())
    }

    /// In a dry run, shows the text that would be written to `dest`: in the
    /// JSON report under `--json`, else printed between two marker lines.
    fn show_planned_text(&mut self, dest: &Path, text: &[u8]) {
        if self.dry_run && self.json {
            self.files.push(serde_json::json!({
                "path": dest.display().to_string(),
                "content": String::from_utf8_lossy(text),
            }));
        } else if self.dry_run {
            say!(self, "--- {} ---", dest.display());
            let _ = io::stdout().write_all(text);
            say!(self, "--- end of {} ---", dest.display());
        }
    }

    /// Removes `path` (a whole tree when `recursive`). Returns whether it existed.
    fn remove(&mut self, step: &str, path: &Path, recursive: bool) -> Result<bool> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                say!(self, "{step}: {} is not there", path.display());
                return Ok(false);
            }
            Err(e) => return Err(e).wrap_err_with(|| format!("{step}: {}", path.display())),
        };
        let shown = path.display();
        if recursive && meta.is_dir() {
            if !self.dry_run {
                fs::remove_dir_all(path).wrap_err_with(|| format!("removing {shown}"))?;
            }
            self.change(
                step,
                &format!("removed {shown}/"),
                &format!("remove {shown}/ and everything in it"),
            );
        } else {
            if !self.dry_run {
                fs::remove_file(path).wrap_err_with(|| format!("removing {shown}"))?;
            }
            self.change(
                step,
                &format!("removed {shown}"),
                &format!("remove {shown}"),
            );
        }
        Ok(true)
    }

    /// Runs `argv` (printed first), failing with its stderr when it fails.
    fn run<S: AsRef<OsStr>>(&mut self, step: &str, argv: &[S]) -> Result<()> {
        let shown = display_argv(argv);
        self.change(step, &format!("$ {shown}"), &format!("run: {shown}"));
        if self.dry_run {
            return Ok(());
        }
        let out = command(argv)
            .stdin(Stdio::null())
            .output()
            .wrap_err_with(|| format!("{step}: cannot run {shown}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{step}: `{shown}` failed ({}): {}\n(steps before this one are done; \
                 fix the cause and run again: every step is skipped when already done)",
                out.status,
                stderr.trim()
            );
        }
        Ok(())
    }

    /// Creates the group and adds `$SUDO_USER` to it, each only when needed.
    fn ensure_group(&mut self, target: &Target) -> Result<()> {
        if let Some(root) = &target.root {
            let group_file = root.join("etc/group");
            if !group_file.is_file() {
                bail!(
                    "group: {} does not exist; --root must hold a system tree with \
                     etc/group (groupadd --prefix edits it)",
                    group_file.display()
                );
            }
        }
        let members = lookup_group(target)?;
        let created = members.is_none();
        if created {
            let mut argv = vec![os("groupadd"), os("--system")];
            argv.extend(target.prefix_args());
            argv.push(os(GROUP));
            self.run("group", &argv)?;
        } else {
            say!(self, "group: {GROUP} exists");
        }
        let user = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root");
        match user {
            None => say!(
                self,
                "group: SUDO_USER is not set (not run via sudo); let a user manage natmap \
                 without sudo with: usermod -aG {GROUP} USER"
            ),
            Some(user) if members.as_ref().is_some_and(|m| m.contains(&user)) => {
                say!(self, "group: {user} is already a member of {GROUP}")
            }
            Some(user) => {
                let mut argv = vec![os("usermod")];
                argv.extend(target.prefix_args());
                argv.extend([os("-aG"), os(GROUP), os(&user)]);
                self.run("group", &argv)?;
                if !self.dry_run {
                    say!(
                        self,
                        "group: {user} can use natmap without sudo after logging in again \
                         (or in a shell started with: newgrp {GROUP})"
                    );
                }
            }
        }
        Ok(())
    }

    /// daemon-reload, enable and start, or restart, as needed.
    fn start_service(&mut self, unit_changed: bool, binary_changed: bool) -> Result<()> {
        if !systemd_is_pid1() {
            let pid1 = fs::read_to_string("/proc/1/comm").unwrap_or_default();
            say!(
                self,
                "systemd: NOT started: systemd is not PID 1 here (PID 1 is {:?}; a container?), \
                 so there is no service manager to hand natmap to. The unit is in place for a \
                 system booted with systemd. Start the daemon by hand instead:\n    \
                 sudo {INSTALLED_BINARY} natmap daemon\n\
                 (scripts/install.sh does that in the background)",
                pid1.trim()
            );
            return Ok(());
        }
        if unit_changed {
            self.run("systemd", &["systemctl", "daemon-reload"])?;
        }
        let enabled = query(&["systemctl", "is-enabled", "--quiet", UNIT_NAME]);
        let active = query(&["systemctl", "is-active", "--quiet", UNIT_NAME]);
        if !enabled || !active {
            self.run("systemd", &["systemctl", "enable", "--now", UNIT_NAME])?;
        } else if unit_changed || binary_changed {
            self.run("systemd", &["systemctl", "restart", UNIT_NAME])?;
            say!(
                self,
                "systemd: restarted so the new {} takes effect",
                if binary_changed { "binary" } else { "unit" }
            );
        } else {
            say!(self, "systemd: {UNIT_NAME} is enabled and running");
            return Ok(());
        }
        if !self.dry_run {
            say!(
                self,
                "systemd: check it with: systemctl status natmap; journalctl -u natmap"
            );
        }
        Ok(())
    }

    /// `systemctl disable --now` when the unit is enabled or running.
    fn stop_service(&mut self) -> Result<()> {
        if !systemd_is_pid1() {
            say!(
                self,
                "systemd: not PID 1 here, nothing to stop through systemctl (a daemon \
                 started by hand must be stopped by hand)"
            );
            return Ok(());
        }
        let enabled = query(&["systemctl", "is-enabled", "--quiet", UNIT_NAME]);
        let active = query(&["systemctl", "is-active", "--quiet", UNIT_NAME]);
        if enabled || active {
            self.run("systemd", &["systemctl", "disable", "--now", UNIT_NAME])?;
        } else {
            say!(self, "systemd: {UNIT_NAME} is neither enabled nor running");
        }
        Ok(())
    }
}

/// A `Command` for `argv`, the program found on PATH or in the sbin
/// directories a plain `su` leaves off PATH.
fn command<S: AsRef<OsStr>>(argv: &[S]) -> Command {
    let mut cmd = Command::new(find_program(argv[0].as_ref()));
    cmd.args(&argv[1..]);
    cmd
}

fn find_program(name: &OsStr) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a read-only query (safe in a dry run); true when it exits 0.
fn query(argv: &[&str]) -> bool {
    command(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The argv as a person would type it (quoted where a shell would need it).
/// Only for display: nothing is ever run through a shell.
fn display_argv<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| {
            let a = a.as_ref().to_string_lossy();
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
            {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when systemd runs this machine: sd_booted(3)'s test, plus PID 1's
/// name, since a container may have the host's /run/systemd bind-mounted.
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// The members of [`GROUP`] on the target, or `None` when it does not exist.
/// On the host through NSS (`getent`), under `--root` from its etc/group.
fn lookup_group(target: &Target) -> Result<Option<Vec<String>>> {
    let line = match &target.root {
        Some(root) => {
            let path = root.join("etc/group");
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).wrap_err_with(|| format!("reading {}", path.display())),
            };
            text.lines()
                .find(|l| l.split(':').next() == Some(GROUP))
                .map(str::to_owned)
        }
        None => {
            let out = command(&["getent", "group", GROUP])
                .stdin(Stdio::null())
                .output()
                .wrap_err("cannot run getent")?;
            match out.status.code() {
                Some(0) => Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
                Some(2) => None,
                _ => {
                    return Err(eyre!(
                        "getent group {GROUP} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            }
        }
    };
    Ok(line.map(|l| {
        l.split(':')
            .nth(3)
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect()
    }))
}

/// True when `b` exists and has exactly the bytes of `a`.
fn same_file_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let mut fb = match fs::File::open(b) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut fa = fs::File::open(a)?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes `dest` so that it is at every moment either the old file or the
/// complete new one: temporary file in the same directory, fsync, chmod,
/// rename, fsync the directory.
fn write_atomic(dest: &Path, source: &FileSource<'_>, mode: u32) -> io::Result<()> {
    let dir = dest.parent().expect("absolute path");
    fs::create_dir_all(dir)?;
    let name = dest.file_name().expect("file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.natmap-install.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        match source {
            FileSource::Copy { from, .. } => {
                io::copy(&mut fs::File::open(from)?, &mut file)?;
            }
            FileSource::Bytes(b) => file.write_all(b)?,
        }
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dest)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaging_units_are_the_rendered_unit() {
        assert_eq!(
            include_str!("../../packaging/natmap.service"),
            render_unit(INSTALLED_BINARY),
            "packaging/natmap.service is stale: regenerate it with \
             `lab-ops natmap install --root` or from render_unit(INSTALLED_BINARY)"
        );
        assert_eq!(
            include_str!("../../packaging/deb/natmap.service"),
            render_unit(PACKAGED_BINARY),
            "packaging/deb/natmap.service is stale: it is render_unit(PACKAGED_BINARY)"
        );
    }

    /// The directive values of the rendered unit, comments dropped.
    fn directives(unit: &str) -> Vec<(String, String)> {
        unit.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('['))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn value(unit: &str, key: &str) -> String {
        let found: Vec<_> = directives(unit)
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "{key}= must appear exactly once: {found:?}");
        found.into_iter().next().unwrap()
    }

    #[test]
    fn unit_is_hardened_as_designed() {
        let unit = render_unit(INSTALLED_BINARY);
        assert_eq!(
            value(&unit, "ExecStart"),
            "/usr/local/bin/lab-ops natmap --socket /run/natmap.sock daemon \
             --state /var/lib/natmap/state.json --socket-group natmap"
        );
        let caps = "CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE";
        for (key, want) in [
            ("Type", "simple"),
            ("Restart", "on-failure"),
            ("After", "network-online.target docker.service"),
            ("Wants", "network-online.target docker.service"),
            ("CapabilityBoundingSet", caps),
            ("AmbientCapabilities", caps),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", "/var/lib/natmap /run -/run/xtables.lock"),
            ("StateDirectory", "natmap"),
            (
                "RestrictAddressFamilies",
                "AF_UNIX AF_NETLINK AF_INET AF_INET6",
            ),
            ("SupplementaryGroups", "natmap"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("LimitNOFILE", "65536"),
            ("TimeoutStopSec", "90s"),
            ("WantedBy", "multi-user.target"),
        ] {
            assert_eq!(value(&unit, key), want, "{key}=");
        }
        let keys: Vec<String> = directives(&unit).into_iter().map(|(k, _)| k).collect();
        assert_eq!(value(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
        // /proc/sys must stay writable for ip_forward.
        for absent in ["ProtectKernelTunables", "RuntimeDirectory", "User"] {
            assert!(
                !keys.iter().any(|k| k == absent),
                "{absent}= must not be set"
            );
        }
    }

    #[test]
    fn unit_paths_match_the_daemon_defaults() {
        use clap::Parser;
        let opts = crate::cli::Opts::try_parse_from(["lab-ops", "natmap", "daemon"]).unwrap();
        assert_eq!(opts.global.socket, Path::new(SOCKET));
        let crate::cli::TopCommand::Natmap(natmap) = opts.command else {
            panic!("natmap")
        };
        let crate::cli::NatmapCommand::Daemon(d) = natmap.command else {
            panic!("daemon")
        };
        assert_eq!(d.state_path, Path::new(STATE_FILE));
        assert_eq!(d.socket_group, GROUP);
        assert_eq!(Path::new(STATE_FILE).parent(), Some(Path::new(STATE_DIR)));
    }

    #[test]
    fn commands_are_displayed_as_typed() {
        assert_eq!(
            display_argv(&["groupadd", "--system", "--prefix", "/tmp/a b", "natmap"]),
            "groupadd --system --prefix '/tmp/a b' natmap"
        );
        assert_eq!(display_argv(&["x", "it's"]), r"x 'it'\''s'");
    }

    #[test]
    #[should_panic(expected = "need no quoting")]
    fn unit_refuses_a_binary_path_that_needs_quoting() {
        render_unit("/opt/my tools/lab-ops");
    }
}
