//! Client commands: the command line becomes one request, the daemon's
//! answer is printed, and `save --export` writes its fragments.

use std::process::ExitCode;

use crate::client;
use crate::proto::{DryRunRequest, ErrorCode, Request, Response, SaveReport, SaveRequest};

use super::{ops, output, usage_error, GlobalArgs, NatmapCommand};

/// Sends the request `command` makes and prints the answer; returns the
/// exit code.
pub fn send(command: NatmapCommand, g: &GlobalArgs) -> ExitCode {
    let mut export_to = None;
    let request = match build(command, g, &mut export_to) {
        Ok(r) => r,
        Err(message) => return usage_error(g.json, &message),
    };
    let request = match with_dry_run(request, g.dry_run) {
        Ok(r) => r,
        Err(message) => return usage_error(g.json, &message),
    };
    let printer = output::Printer::new(g.json, g.color, g.dry_run);
    let mut response = client::call(&g.socket, request.clone());
    if let (Some(path), true) = (&export_to, response.ok) {
        response = match write_fragments(path, &response, g.dry_run) {
            Ok(report) => Response::ok(report),
            Err(message) => Response::err(ErrorCode::InvalidArgument, message),
        };
    }
    ExitCode::from(printer.print(&request, &response))
}

/// The request a client command makes, or a usage error naming the argument.
fn build(
    command: NatmapCommand,
    g: &GlobalArgs,
    export_to: &mut Option<std::path::PathBuf>,
) -> Result<Request, String> {
    Ok(match command {
        NatmapCommand::Daemon(_) | NatmapCommand::Install(_) | NatmapCommand::Uninstall(_) => {
            unreachable!("run locally, see cli::run")
        }
        NatmapCommand::Dnat(a) => Request::Dnat(a.into_request()),
        NatmapCommand::Snat(a) => Request::Snat(a.into_request()),
        NatmapCommand::Hairpin(a) => Request::Hairpin(a.into_request()),
        NatmapCommand::PolicyRoute(a) => Request::PolicyRoute(a.into_request()),
        NatmapCommand::Ls(a) => Request::Ls(a.into_request(g.verbose > 0)),
        NatmapCommand::Status => Request::Status(Default::default()),
        NatmapCommand::Reload => Request::Reload(Default::default()),
        NatmapCommand::Fwd(a) => Request::Fwd(a.into_request()),
        NatmapCommand::Clear => Request::Clear(Default::default()),
        NatmapCommand::Ping => Request::Ping(Default::default()),
        NatmapCommand::Apply(a) => Request::Apply(a.into_request()?),
        NatmapCommand::Export => Request::Export(Default::default()),
        NatmapCommand::Save(a) => {
            *export_to = a.export;
            Request::Save(SaveRequest { dry_run: g.dry_run })
        }
        NatmapCommand::Docker(d) => d.into_request()?,
    })
}

/// `--dry-run` means one thing everywhere: change nothing. A change is sent
/// as a dry run (the daemon plans it and stops before the commit); a
/// command that only reads runs as usual; `save` knows its own dry run.
fn with_dry_run(request: Request, dry_run: bool) -> Result<Request, String> {
    if !dry_run {
        return Ok(request);
    }
    Ok(match request {
        // apply has its own plan output.
        Request::Apply(mut a) => {
            a.dry_run = true;
            Request::Apply(a)
        }
        Request::Reload(_) => {
            return Err(
                "--dry-run: `reload` cannot be simulated by the running daemon; \
                 check a config file with `lab-ops natmap daemon --dry-run --config FILE`"
                    .into(),
            )
        }
        r if r.has_dry_run() => Request::DryRun(DryRunRequest {
            request: Box::new(r),
        }),
        // ls, status, ping, export, save (dry_run set above): nothing to change.
        r => r,
    })
}

/// `save --export`: writes the daemon's fragments next to each other (in a
/// dry run, writes nothing) and returns the report naming the files.
fn write_fragments(
    path: &std::path::Path,
    response: &Response,
    dry_run: bool,
) -> Result<SaveReport, String> {
    let mut report: SaveReport = serde_json::from_value(response.data_json())
        .map_err(|e| format!("unexpected answer from the daemon: {e}"))?;
    for t in &report.fragments {
        let target = match t.family {
            crate::model::Family::V4 => path.to_path_buf(),
            crate::model::Family::V6 => ops::v6_path(path),
        };
        if !dry_run {
            ops::write_fragment(&target, &t.restore)
                .map_err(|e| format!("writing {}: {e}", target.display()))?;
        }
        report.exported.push(target.display().to_string());
    }
    Ok(report)
}
