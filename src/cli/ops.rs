//! `daemon` (and its dry run), `ls`, `fwd`, `apply`, `save`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use color_eyre::eyre::{eyre, Result};

use crate::daemon::{self, DaemonConfig};
use crate::proto::{ApplyRequest, Document, FwdRequest, LsRequest};

/// `daemon`: run natmap's daemon in the foreground.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  sudo lab-ops natmap daemon
  sudo lab-ops natmap daemon --metrics-listen 127.0.0.1:9477
  sudo lab-ops -vv natmap daemon --state /tmp/natmap/state.json --socket /tmp/natmap.sock")]
pub struct DaemonArgs {
    /// State file: the rules natmap restores at start.
    #[arg(
        long = "state",
        value_name = "FILE",
        default_value = "/var/lib/natmap/state.json"
    )]
    pub state_path: PathBuf,
    /// Group allowed to use the socket (mode 0660).
    #[arg(long, value_name = "GROUP", default_value = "natmap")]
    pub socket_group: String,
    /// Config file (auto-discover); a missing default file means none.
    #[arg(long = "config", value_name = "PATH")]
    pub config_path: Option<PathBuf>,
    /// Docker's API socket (unix:// prefix accepted).
    #[arg(long, value_name = "PATH", default_value = crate::docker::DEFAULT_SOCKET)]
    pub docker_socket: String,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default;
    /// overrides `metrics_listen` in the config). Keep it on loopback unless
    /// a firewall guards it: the metrics show every rule's addresses.
    #[arg(long, value_name = "ADDR:PORT", value_parser = metrics_listen)]
    pub metrics_listen: Option<crate::config::MetricsListen>,
    /// Firewall driver: iptables (default) or nftables (natmap's own
    /// tables; snat not yet). Overrides `backend` in the config. Switching
    /// removes the other backend's natmap rules at start.
    #[arg(long, value_name = "iptables|nftables")]
    pub backend: Option<crate::firewall::Backend>,
}

fn metrics_listen(s: &str) -> Result<crate::config::MetricsListen, String> {
    crate::config::MetricsListen::parse_field("--metrics-listen", s).map_err(|e| e.to_string())
}

/// Runs the daemon until SIGTERM or SIGINT, listening on `socket_path`
/// (the global `--socket`).
pub fn run_daemon(args: DaemonArgs, socket_path: PathBuf) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        return Err(eyre!(
            "the natmap daemon must run as root (it changes iptables rules): sudo lab-ops natmap daemon"
        ));
    }
    let config = DaemonConfig {
        state_path: args.state_path,
        socket_path,
        socket_group: args.socket_group,
        docker_socket: crate::docker::socket_path(&args.docker_socket),
        metrics_listen: args.metrics_listen.map(|m| m.0),
        backend: args.backend,
        config_explicit: args.config_path.is_some(),
        config_path: args
            .config_path
            .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH)),
    };
    // Before the runtime starts its threads (see prepare_fd_table).
    daemon::prepare_fd_table();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime
        .block_on(async {
            // Register the handlers before anything else: a SIGTERM that
            // arrives during start-up must still remove natmap's rules.
            let shutdown = shutdown_signal();
            daemon::run(config, shutdown).await
        })
        .map_err(|e| eyre!(e))?;
    Ok(ExitCode::SUCCESS)
}

/// `daemon --dry-run`: reads the config file and the state file and prints
/// the transactions a daemon started now would run, then exits. It changes
/// nothing: no rule, no socket, no state file (a corrupt one is reported,
/// not moved aside), no reservation.
pub fn plan_daemon(args: DaemonArgs, g: &super::GlobalArgs) -> Result<ExitCode> {
    use crate::firewall::{Desired, Mode};
    use crate::model::Family;
    let config_path = args
        .config_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let file_config = crate::config::Config::load(&config_path, args.config_path.is_some())
        .map_err(|e| eyre!(e))?;
    let state = read_state(&args.state_path)?;
    // As the daemon would render it on this host now (br_netfilter decides
    // whom container mappings masquerade).
    let desired = Desired::on(
        state.rules.iter().cloned(),
        crate::daemon::bridge::netfilter(),
    );
    let backend = args.backend.or(file_config.backend).unwrap_or_default();
    let fw = crate::firewall::driver(backend, file_config.nftables.marks());
    let mut transactions = Vec::new();
    let mut effects = vec![format!(
        "listen on {} and restore {} rule(s) from {}",
        g.socket.display(),
        state.rules.len(),
        args.state_path.display()
    )];
    if let Some(m) = args.metrics_listen.or(file_config.metrics_listen) {
        effects.push(format!(
            "serve Prometheus metrics at http://{}/metrics",
            m.0
        ));
    }
    for family in Family::ALL {
        // What the kernel holds decides which hooks the start would repair.
        match fw.preview(&desired, &[family], Mode::Full) {
            Ok(plans) => {
                for (family, restore) in plans {
                    let program = fw.program(family);
                    transactions.push(crate::proto::Transaction {
                        family,
                        program,
                        restore,
                    });
                }
            }
            Err(e) => effects.push(format!(
                "cannot read the current {family} rules ({e}); a daemon would fail or keep \
                 these rules inactive"
            )),
        }
    }
    let report = crate::proto::DryRunReport {
        dry_run: true,
        transactions,
        effects,
    };
    super::output::Printer::new(g.json, g.color, true).dry_run_report(&report);
    Ok(ExitCode::SUCCESS)
}

/// The state as the daemon would load it (`state.json` with its journal
/// replayed), read-only (a missing file is an empty state).
fn read_state(path: &std::path::Path) -> Result<crate::state::State> {
    crate::state::read_current(path).map_err(|e| eyre!("{e}"))
}

fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

/// `ls`: list rules.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lab-ops natmap ls
  lab-ops natmap ls dnat
  lab-ops natmap ls 10.0.0.25
  lab-ops natmap ls -v            # with connections, packets and bytes
  lab-ops natmap --json ls")]
pub struct LsArgs {
    /// Only rules whose id, kind, address, interface or container (name or
    /// id prefix) matches.
    pub filter: Option<String>,
    /// Show connections, packets and bytes per rule (also with -v).
    #[arg(long)]
    pub counters: bool,
}

impl LsArgs {
    /// The request these arguments make; `verbose` (-v) asks for counters too.
    pub fn into_request(self, verbose: bool) -> LsRequest {
        LsRequest {
            filter: self.filter,
            counters: self.counters || verbose,
        }
    }
}

/// `fwd`: enable IP forwarding.
#[derive(Debug, Args)]
#[command(
    after_help = "IPv6 forwarding makes the kernel ignore router advertisements on interfaces
with accept_ra=1; use --no-ipv6 on hosts that get their IPv6 address by SLAAC."
)]
pub struct FwdArgs {
    /// Leave IPv6 forwarding alone.
    #[arg(long)]
    pub no_ipv6: bool,
}

impl FwdArgs {
    /// The request these arguments make.
    pub fn into_request(self) -> FwdRequest {
        FwdRequest {
            ipv6: !self.no_ipv6,
        }
    }
}

/// `apply`: make natmap's rules equal to a document.
#[derive(Debug, Args)]
#[command(
    after_help = "The document is what `export` prints: {\"schema_version\":1,\"rules\":[…]},
each rule an object as `ls --json` shows it without id and status.
Rules in the file and not in natmap are added, rules in natmap and not in the
file are removed, the rest are kept (same ids), in one transaction.

Examples:
  lab-ops natmap export > natmap.json      # edit, ship with Ansible/NixOS …
  lab-ops natmap apply --dry-run natmap.json
  lab-ops natmap apply natmap.json"
)]
pub struct ApplyArgs {
    /// The document (JSON), or - for standard input.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

impl ApplyArgs {
    /// Reads and parses the document; errors name the file and the field.
    pub fn into_request(self) -> std::result::Result<ApplyRequest, String> {
        let text = if self.file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| format!("reading standard input: {e}"))?;
            s
        } else {
            std::fs::read_to_string(&self.file)
                .map_err(|e| format!("reading {}: {e}", self.file.display()))?
        };
        let de = &mut serde_json::Deserializer::from_str(&text);
        let document: Document = serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: {}: {}", self.file.display(), e.path(), e.inner()))?;
        Ok(ApplyRequest {
            document,
            dry_run: false,
        })
    }
}

/// `save`: make the current rules survive reboot.
#[derive(Debug, Args)]
#[command(
    after_help = "natmap's rules survive reboot because the daemon restores them from its
state at start; `save` makes that explicit (the state is written and fsynced).
With --export it also writes natmap's own chains and hooks, and nothing else
(never Docker's), as iptables-restore --noflush fragments for hosts that
restore rules at boot without the daemon. Do not use `netfilter-persistent
save` on a Docker host: it saves Docker's transient rules too.

Examples:
  lab-ops natmap save
  lab-ops natmap save --export                    # /etc/iptables/natmap.rules (+ natmap6.rules)
  lab-ops natmap save --export /root/natmap.rules"
)]
pub struct SaveArgs {
    /// Also write the fragment (IPv6: the same name with 6 before the extension).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "/etc/iptables/natmap.rules")]
    pub export: Option<PathBuf>,
}

/// Where the IPv6 fragment of `path` goes: `natmap.rules` → `natmap6.rules`.
pub fn v6_path(path: &std::path::Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}6.{}", ext.to_string_lossy()),
        None => format!("{stem}6"),
    };
    path.with_file_name(name)
}

/// Writes a fragment atomically (temp file, fsync, rename), mode 0600.
pub fn write_fragment(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
