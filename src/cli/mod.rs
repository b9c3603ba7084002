//! The command line: clap definitions, and `run`, which either starts the
//! daemon or sends one request to it and prints the answer.
//!
//! - `static_nat`: `dnat`, `snat`, `hairpin`.
//! - `ops`: `daemon`, `ls`, `fwd`, `apply`, `save`.
//! - `request`: turns a client command into a request, sends it, prints the answer.
//! - `output`: tables and JSON.
//! - `install`: `install`, `uninstall` and the systemd unit (local, no daemon).
//! - `completions`: `completions` and `man`, generated from these definitions.

mod completions;
mod docker;
mod install;
mod ops;
mod output;
mod request;
mod static_nat;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::proto::{ErrorCode, Response};

pub use ops::DaemonArgs;

/// Exit code when the daemon answered with an error, or a local command
/// (`install`, `uninstall`, `daemon`) failed.
pub const EXIT_REQUEST_FAILED: u8 = 1;
/// Exit code for a command line clap rejects (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the daemon could not be reached or understood.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code of `status` when something needs attention.
pub const EXIT_ATTENTION: u8 = 4;

/// The `--help` heading of the options every command takes.
const GLOBAL_OPTIONS: &str = "Global options";

/// lab-ops: tools for running a homelab or small server.
#[derive(Debug, Parser)]
#[command(name = "lab-ops", version, propagate_version = true)]
pub struct Opts {
    /// Options every command takes, before or after its name.
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: TopCommand,
}

/// The global options. Each is declared once, here, with `global = true`,
/// so `lab-ops --json natmap ping`, `lab-ops natmap --json ping` and
/// `lab-ops natmap ping --json` are the same command, and `--help` lists
/// them under their own heading, apart from each command's own flags.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// More output: -v (ls: counters; the daemon logs at debug), -vv (the
    /// client logs each request and its timing; the daemon logs at trace),
    /// -vvv (the client logs the exact protocol lines).
    #[arg(short, long, action = ArgAction::Count, global = true, help_heading = GLOBAL_OPTIONS)]
    pub verbose: u8,

    /// The daemon's control socket (where `daemon` listens and clients connect).
    #[arg(
        long,
        global = true,
        env = "NATMAP_SOCKET",
        default_value = "/run/natmap.sock",
        help_heading = GLOBAL_OPTIONS
    )]
    pub socket: PathBuf,

    /// Print machine-readable JSON (results and errors) instead of text.
    #[arg(long, global = true, help_heading = GLOBAL_OPTIONS)]
    pub json: bool,

    /// Change nothing: show what a command would change (iptables
    /// transactions, files, commands). Commands that only read run as usual.
    #[arg(long, global = true, help_heading = GLOBAL_OPTIONS)]
    pub dry_run: bool,

    /// Colour in tables.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, help_heading = GLOBAL_OPTIONS)]
    pub color: ColorChoice,
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

/// natmap's command (the global options are on [`Opts`]).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lab-ops natmap dnat --ext-ip 203.0.113.10 --int-ip 10.0.0.25 --ports 25,465,587
  lab-ops natmap snat --int-ip 10.0.0.0/24 --ext-if eth0 --ext-ip 203.0.113.10
  lab-ops natmap hairpin --ext-ip 203.0.113.10 --int-ip 10.0.0.80 --ports 80,443
  lab-ops natmap ls
  lab-ops natmap --json ls")]
pub struct NatmapOpts {
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

/// A command that runs here, without the daemon (`install`, `uninstall`,
/// `daemon`, `completions`, `man`), failed. Printed once, by `main`, as text
/// or, under `--json`, as an error response with this code.
#[derive(Debug)]
pub struct LocalFailure {
    /// Stable code for `--json`.
    pub code: ErrorCode,
    /// What went wrong, with its causes.
    pub error: color_eyre::Report,
}

impl LocalFailure {
    fn wrap(code: ErrorCode) -> impl FnOnce(color_eyre::Report) -> LocalFailure {
        move |error| LocalFailure { code, error }
    }

    /// Prints the failure (text on stderr, or the JSON error line on stdout)
    /// and returns the exit code.
    pub fn report(&self, json: bool) -> ExitCode {
        if json {
            let response = Response::err(self.code, format!("{:#}", self.error));
            output::print_line(&serde_json::to_string(&response).expect("serializes"));
        } else {
            eprintln!("error: {:#}", self.error);
        }
        ExitCode::from(EXIT_REQUEST_FAILED)
    }
}

/// Runs the parsed command line.
pub fn run(opts: Opts) -> Result<ExitCode, LocalFailure> {
    let g = opts.global;
    let natmap = match opts.command {
        TopCommand::Natmap(natmap) => natmap,
        other => return run_page(other, &g),
    };
    match natmap.command {
        NatmapCommand::Install(a) => install::run_install(a, g.dry_run, g.json)
            .map_err(LocalFailure::wrap(ErrorCode::InstallFailed)),
        NatmapCommand::Uninstall(a) => install::run_uninstall(a, g.dry_run, g.json)
            .map_err(LocalFailure::wrap(ErrorCode::InstallFailed)),
        NatmapCommand::Daemon(args) if g.dry_run => {
            ops::plan_daemon(args, &g).map_err(LocalFailure::wrap(ErrorCode::DaemonFailed))
        }
        NatmapCommand::Daemon(args) => {
            init_logging(g.verbose, true);
            ops::run_daemon(args, g.socket).map_err(LocalFailure::wrap(ErrorCode::DaemonFailed))
        }
        command => {
            // A client writes only to its terminal or a pipe: a reader that
            // goes away (`ls | head -1`) ends it quietly, as it does `cat`.
            output::exit_quietly_on_closed_pipe();
            init_logging(g.verbose, false);
            Ok(request::send(command, &g))
        }
    }
}

/// `completions` and `man`: they print a script or a page, so `--json` has
/// no meaning there, and `--dry-run` refuses `man --dir` (its only write).
fn run_page(command: TopCommand, g: &GlobalArgs) -> Result<ExitCode, LocalFailure> {
    let name = match &command {
        TopCommand::Completions(_) => "completions",
        _ => "man",
    };
    if g.json {
        return Ok(usage_error(
            true,
            &format!("--json: `{name}` prints a script or a page, not data; drop --json"),
        ));
    }
    output::exit_quietly_on_closed_pipe();
    let result =
        match command {
            TopCommand::Completions(a) => completions::run_completions(a),
            TopCommand::Man(a) if g.dry_run && a.dir.is_some() => return Ok(usage_error(
                false,
                "--dry-run: `man --dir DIR` writes files; `lab-ops man` prints the page instead",
            )),
            TopCommand::Man(a) => completions::run_man(a),
            TopCommand::Natmap(_) => unreachable!("handled by run"),
        };
    result.map_err(LocalFailure::wrap(ErrorCode::InvalidArgument))
}

/// Prints a usage error (as JSON under `--json`) and returns exit code 2.
pub fn usage_error(json: bool, message: &str) -> ExitCode {
    if json {
        let response = Response::err(ErrorCode::InvalidArgument, message);
        output::print_line(&serde_json::to_string(&response).expect("serializes"));
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
