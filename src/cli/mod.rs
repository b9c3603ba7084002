//! The command line: clap definitions, and `run`, which either starts the
//! daemon or sends one request to it and prints the answer.
//!
//! - `static_nat`: `dnat`, `snat`, `hairpin`.
//! - `ops`: `daemon`, `ls`, `fwd`, `clear`, `ping`.
//! - `output`: tables and JSON.
//! - `install`: `install`, `uninstall` and the systemd unit (local, no daemon).
//! - `completions`: `completions` and `man`, generated from these definitions.

mod completions;
mod docker;
mod install;
mod ops;
mod output;
mod static_nat;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use color_eyre::eyre::Result;

use crate::client;
use crate::proto::Request;

pub use ops::DaemonArgs;

/// Exit code when the daemon answered with an error.
pub const EXIT_REQUEST_FAILED: u8 = 1;
/// Exit code for a command line clap rejects (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the daemon could not be reached or understood.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code of `status` when something needs attention.
pub const EXIT_ATTENTION: u8 = 4;

/// lab-ops: tools for running a homelab or small server.
#[derive(Debug, Parser)]
#[command(name = "lab-ops", version, propagate_version = true)]
pub struct Opts {
    /// More log output: -v, -vv, -vvv.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: TopCommand,
}

/// The tool groups of lab-ops.
#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// NAT rules owned by one daemon: port forwards, SNAT, hairpin, Docker ports.
    Natmap(NatmapOpts),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions(completions::CompletionsArgs),
    /// Print the manual page (roff), or write one per command with --dir.
    Man(completions::ManArgs),
}

/// Options shared by every natmap command.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lab-ops natmap dnat --ext-ip 203.0.113.10 --int-ip 10.0.0.25 --ports 25,465,587
  lab-ops natmap snat --int-ip 10.0.0.0/24 --ext-if eth0 --ext-ip 203.0.113.10
  lab-ops natmap hairpin --ext-ip 203.0.113.10 --int-ip 10.0.0.80 --ports 80,443
  lab-ops natmap ls
  lab-ops natmap --json ls")]
pub struct NatmapOpts {
    /// The daemon's control socket (where `daemon` listens and clients connect).
    #[arg(
        long,
        global = true,
        env = "NATMAP_SOCKET",
        default_value = "/run/natmap.sock"
    )]
    pub socket: PathBuf,

    /// Print machine-readable JSON (results and errors) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Validate a change and show the exact iptables transactions it would
    /// run, changing nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,

    /// Colour in tables.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: NatmapCommand,
}

/// When to use colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal and NO_COLOR is not set.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// natmap's commands.
#[derive(Debug, Subcommand)]
pub enum NatmapCommand {
    /// Run the daemon (as root): owns the rules, listens on the socket.
    Daemon(DaemonArgs),
    /// Forward ports of an external address to an internal host (DNAT).
    Dnat(static_nat::DnatArgs),
    /// Rewrite the source of traffic leaving an interface (SNAT).
    Snat(static_nat::SnatArgs),
    /// Forward ports so internal hosts can use the external address too.
    Hairpin(static_nat::HairpinArgs),
    /// Route replies from a source address through a gateway (ip rule + table).
    PolicyRoute(static_nat::PolicyRouteArgs),
    /// List rules, optionally those matching FILTER.
    Ls(ops::LsArgs),
    /// Enable IP forwarding (IPv4, and IPv6 unless --no-ipv6).
    Fwd(ops::FwdArgs),
    /// Remove every natmap rule and reservation and reset the state.
    Clear,
    /// Make natmap's rules equal to a declarative file, in one transaction.
    Apply(ops::ApplyArgs),
    /// Print natmap's rules as a document for `apply`.
    Export,
    /// Make the current rules survive reboot (and export boot fragments).
    Save(ops::SaveArgs),
    /// Publish ports of running containers: add, rm, remap.
    #[command(subcommand)]
    Docker(docker::DockerCommand),
    /// Health: backend, IPv6 NAT, forwarding, Docker, rules, repairs,
    /// conflicts. Exits 4 when something needs attention.
    #[command(visible_alias = "doctor")]
    Status,
    /// Re-read the daemon's config file (as SIGHUP / systemctl reload does).
    Reload,
    /// Check that the daemon answers.
    Ping,
    /// Install natmap as a systemd service (binary, group, unit), as root.
    Install(install::InstallArgs),
    /// Stop the service and remove what `install` put in place.
    Uninstall(install::UninstallArgs),
}

/// Runs the parsed command line.
pub fn run(opts: Opts) -> Result<ExitCode> {
    let natmap = match opts.command {
        TopCommand::Natmap(natmap) => natmap,
        TopCommand::Completions(a) => return completions::run_completions(a),
        TopCommand::Man(a) => return completions::run_man(a),
    };
    match natmap.command {
        NatmapCommand::Install(a) => return install::run_install(a, natmap.dry_run),
        NatmapCommand::Uninstall(a) => return install::run_uninstall(a, natmap.dry_run),
        _ => {}
    }
    if let NatmapCommand::Daemon(args) = natmap.command {
        init_logging(opts.verbose, true);
        return ops::run_daemon(args, natmap.socket);
    }
    init_logging(opts.verbose, false);
    let mut export_to = None;
    let request = match natmap.command {
        NatmapCommand::Daemon(_) | NatmapCommand::Install(_) | NatmapCommand::Uninstall(_) => {
            unreachable!("handled above")
        }
        NatmapCommand::Dnat(a) => Request::Dnat(a.into_request()),
        NatmapCommand::Snat(a) => Request::Snat(a.into_request()),
        NatmapCommand::Hairpin(a) => Request::Hairpin(a.into_request()),
        NatmapCommand::PolicyRoute(a) => Request::PolicyRoute(a.into_request()),
        NatmapCommand::Ls(a) => Request::Ls(a.into_request(opts.verbose > 0)),
        NatmapCommand::Status => Request::Status(Default::default()),
        NatmapCommand::Reload => Request::Reload(Default::default()),
        NatmapCommand::Fwd(a) => Request::Fwd(a.into_request()),
        NatmapCommand::Clear => Request::Clear(Default::default()),
        NatmapCommand::Ping => Request::Ping(Default::default()),
        NatmapCommand::Apply(a) => match a.into_request() {
            Ok(r) => Request::Apply(r),
            Err(message) => return Ok(usage_error(natmap.json, &message)),
        },
        NatmapCommand::Export => Request::Export(Default::default()),
        NatmapCommand::Save(ref a) => {
            export_to = a.export.clone();
            Request::Save(Default::default())
        }
        NatmapCommand::Docker(d) => match d.into_request() {
            Ok(r) => r,
            Err(message) => {
                return Ok(usage_error(natmap.json, &message));
            }
        },
    };
    let request = if natmap.dry_run {
        if !request.is_change() {
            return Ok(usage_error(
                natmap.json,
                &format!("--dry-run: `{}` changes nothing", request.name()),
            ));
        }
        match request {
            // apply has its own plan output.
            Request::Apply(mut a) => {
                a.dry_run = true;
                Request::Apply(a)
            }
            other => Request::DryRun(crate::proto::DryRunRequest {
                request: Box::new(other),
            }),
        }
    } else {
        request
    };
    let printer = output::Printer::new(natmap.json, natmap.color);
    let mut response = client::call(&natmap.socket, request.clone());
    if let (Some(path), true) = (&export_to, response.ok) {
        if let Err(message) = write_fragments(path, &response) {
            response =
                crate::proto::Response::err(crate::proto::ErrorCode::InvalidArgument, message);
        }
    }
    Ok(ExitCode::from(printer.print(&request, &response)))
}

/// `save --export`: writes the daemon's fragments next to each other.
fn write_fragments(
    path: &std::path::Path,
    response: &crate::proto::Response,
) -> Result<(), String> {
    let report: crate::proto::SaveReport =
        serde_json::from_value(response.data.clone().unwrap_or_default())
            .map_err(|e| format!("unexpected answer from the daemon: {e}"))?;
    for t in report.fragments {
        let target = match t.family {
            crate::model::Family::V4 => path.to_path_buf(),
            crate::model::Family::V6 => ops::v6_path(path),
        };
        ops::write_fragment(&target, &t.restore)
            .map_err(|e| format!("writing {}: {e}", target.display()))?;
        eprintln!("wrote {}", target.display());
    }
    Ok(())
}

/// Prints a usage error (as JSON under `--json`) and returns exit code 2.
pub fn usage_error(json: bool, message: &str) -> ExitCode {
    if json {
        let response =
            crate::proto::Response::err(crate::proto::ErrorCode::InvalidArgument, message);
        println!("{}", serde_json::to_string(&response).expect("serializes"));
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(EXIT_USAGE)
}

fn init_logging(verbose: u8, daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let base = if daemon { 2 } else { 1 };
    let level = match base + verbose {
        0 | 1 => "warn",
        2 => "info",
        3 => "debug",
        _ => "trace",
    };
    // Verbosity is natmap's own; libraries (bollard, hyper) stay at warn.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,natmap={level},lab_ops={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Under systemd the journal stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Opts::command().debug_assert();
    }

    #[test]
    fn flags_are_validated_and_named_before_anything_is_sent() {
        let err = Opts::try_parse_from([
            "lab-ops",
            "natmap",
            "dnat",
            "--ext-ip",
            "192.0.2.1",
            "--int-ip",
            "127.0.0.1",
            "--ports",
            "25",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--int-ip"), "{err}");
        let err = Opts::try_parse_from([
            "lab-ops",
            "natmap",
            "dnat",
            "--ext-ip",
            "192.0.2.1",
            "--int-ip",
            "10.0.0.2",
            "--ports",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--ports"), "{err}");
        let ok = Opts::try_parse_from([
            "lab-ops",
            "natmap",
            "--socket",
            "/tmp/x.sock",
            "daemon",
            "--state",
            "/tmp/s.json",
        ]);
        assert!(ok.is_ok());
    }
}
