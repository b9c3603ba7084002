//! `docker add | rm | remap`: publish ports of running containers.

use clap::{Args, Subcommand};

use crate::model::{parse_port, ContainerRef, PortSpec, Proto};
use crate::proto::{DockerAddRequest, DockerRemapRequest, DockerRmRequest, Request};

fn container(s: &str) -> Result<ContainerRef, String> {
    s.parse()
        .map_err(|e: crate::model::ParseError| e.to_string())
}

fn mapping(s: &str) -> Result<PortSpec, String> {
    s.parse()
        .map_err(|e: crate::model::ParseError| e.to_string())
}

/// `HOST_PORT[/tcp|udp]` or `FIRST-LAST[/tcp|udp]` (a range mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort {
    port: u16,
    last: Option<u16>,
    proto: Option<Proto>,
}

/// `PORT` or `FIRST-LAST`: (first, last when a range was given).
fn port_or_range(field: &'static str, s: &str) -> Result<(u16, Option<u16>), String> {
    let one = |p: &str| parse_port(field, p).map_err(|e| e.to_string());
    match s.split_once('-') {
        None => Ok((one(s)?, None)),
        Some((a, b)) => {
            let (first, last) = (one(a)?, one(b)?);
            if first > last {
                return Err(format!(
                    "invalid {field} \"{s}\": expected a port or a range FIRST-LAST, e.g. 8160-8161"
                ));
            }
            Ok((first, Some(last)))
        }
    }
}

fn host_port(s: &str) -> Result<HostPort, String> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (
            p,
            Some(
                proto
                    .parse::<Proto>()
                    .map_err(|e| e.with_field("HOST_PORT").to_string())?,
            ),
        ),
        None => (s, None),
    };
    let (port, last) = port_or_range("HOST_PORT", port)?;
    Ok(HostPort { port, last, proto })
}

/// `OLD:NEW[/tcp|udp]`, each side a port or a range (`8160-8161:9160-9161`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remap {
    old: u16,
    old_last: Option<u16>,
    new: u16,
    new_last: Option<u16>,
    proto: Option<Proto>,
}

fn remap(s: &str) -> Result<Remap, String> {
    const FORM: &str = "OLD_HOST_PORT:NEW_HOST_PORT[/tcp|udp], e.g. 8080:8081, or for a range \
                        its first port or the whole range: 8160:9160, 8160-8161:9160-9161";
    let (ports, proto) = match s.split_once('/') {
        Some((p, proto)) => (
            p,
            Some(
                proto
                    .parse::<Proto>()
                    .map_err(|_| format!("invalid remap {s:?}: expected {FORM}"))?,
            ),
        ),
        None => (s, None),
    };
    let (old, new) = ports
        .split_once(':')
        .ok_or_else(|| format!("invalid remap {s:?}: expected {FORM}"))?;
    let bad = |_| format!("invalid remap {s:?}: expected {FORM}");
    let (old, old_last) = port_or_range("remap", old).map_err(bad)?;
    let (new, new_last) = port_or_range("remap", new).map_err(bad)?;
    let len = |first: u16, last: Option<u16>| last.map_or(0, |l| l - first);
    if new_last.is_some() && len(old, old_last) != len(new, new_last) {
        return Err(format!(
            "invalid remap {s:?}: the old and new ranges must be of equal length, e.g. \
             8160-8161:9160-9161"
        ));
    }
    Ok(Remap {
        old,
        old_last,
        new,
        new_last,
        proto,
    })
}

/// Docker port mappings.
#[derive(Debug, Subcommand)]
pub enum DockerCommand {
    /// Publish a port of a running container, without restarting it.
    #[command(after_help = "Examples:
  lab-ops natmap docker add my-nginx 8080:80
  lab-ops natmap docker add my-nginx 203.0.113.10:8443:443/tcp
  lab-ops natmap docker add dns 5353:53/udp
  lab-ops natmap docker add web 8160-8161:80-81            # a range (one mapping)
  lab-ops natmap docker add web 127.0.0.1:8152:80          # on loopback only
  lab-ops natmap docker add 8080:80 --name my-nginx
  lab-ops natmap docker add 9000:192.0.2.50:9000 --name nas     # a non-Docker target")]
    Add(AddArgs),
    /// Remove a mapping.
    #[command(after_help = "Examples:
  lab-ops natmap docker rm my-nginx 8080
  lab-ops natmap docker rm --name dns 5353/udp
  lab-ops natmap docker rm web 8160-8161          # a range mapping (any of its ports names it)
  lab-ops natmap docker rm --id 7")]
    Rm(RmArgs),
    /// Move a mapping to another host port (the new port is reserved first).
    /// A range moves as a whole, to a range of the same length.
    #[command(after_help = "Examples:
  lab-ops natmap docker remap my-nginx 8080:8081
  lab-ops natmap docker remap web 8160-8161:9160-9161      # or: 8160:9160")]
    Remap(RemapArgs),
}

/// `docker add` arguments.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// CONTAINER MAPPING, or just MAPPING with --name.
    /// MAPPING: [HOST_IP:]HOST_PORT[:CONTAINER_PORT][/tcp|udp] or HOST_PORT:TARGET_IP:PORT[/tcp|udp];
    /// ports may be ranges of equal length (8160-8161:80-81); a loopback
    /// HOST_IP (127.0.0.1, [::1]) publishes on that address only.
    #[arg(value_name = "CONTAINER|MAPPING", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// The container (or, with HOST_PORT:TARGET_IP:PORT, a label for the target).
    #[arg(long, value_name = "NAME", value_parser = container)]
    pub name: Option<ContainerRef>,
    /// Docker network to take the container's address from, when it has several.
    #[arg(long, value_name = "NET", value_parser = container)]
    pub network: Option<ContainerRef>,
    /// Accept a HOST_IP this host does not have now (a VRRP/keepalived VIP):
    /// the mapping then matches only while the address is local.
    #[arg(long)]
    pub allow_nonlocal: bool,
}

/// `docker rm` arguments.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// CONTAINER HOST_PORT[/proto], or HOST_PORT with --name.
    #[arg(value_name = "CONTAINER|HOST_PORT", num_args = 0..=2)]
    pub args: Vec<String>,
    /// The container or label.
    #[arg(long, value_name = "NAME", value_parser = container, conflicts_with = "id")]
    pub name: Option<ContainerRef>,
    /// The mapping's id (from `ls`).
    #[arg(long, value_name = "N")]
    pub id: Option<u64>,
}

/// `docker remap` arguments.
#[derive(Debug, Args)]
pub struct RemapArgs {
    /// The container.
    #[arg(value_parser = container)]
    pub container: ContainerRef,
    /// OLD_HOST_PORT:NEW_HOST_PORT[/tcp|udp] (ranges: 8160-8161:9160-9161).
    #[arg(value_name = "OLD:NEW", value_parser = remap)]
    pub ports: Remap,
}

impl DockerCommand {
    /// The request these arguments make, or a usage error naming the argument.
    pub fn into_request(self) -> Result<Request, String> {
        match self {
            DockerCommand::Add(a) => {
                let (container_arg, spec) = match a.args.as_slice() {
                    [spec] => (None, spec),
                    [c, spec] => (Some(container(c)?), spec),
                    _ => unreachable!("clap bounds the count"),
                };
                if container_arg.is_none() && a.name.is_none() {
                    return Err("name the container: docker add CONTAINER MAPPING, or docker add MAPPING --name CONTAINER".into());
                }
                Ok(Request::DockerAdd(DockerAddRequest {
                    container: container_arg,
                    name: a.name,
                    mapping: mapping(spec)?,
                    network: a.network,
                    allow_nonlocal: a.allow_nonlocal,
                }))
            }
            DockerCommand::Rm(a) => {
                let (container_arg, port) = match (a.args.as_slice(), &a.name, a.id) {
                    ([], None, Some(_)) => (None, None),
                    ([port], Some(_), None) => (None, Some(host_port(port)?)),
                    ([c, port], None, None) => (Some(container(c)?), Some(host_port(port)?)),
                    _ => return Err("use: docker rm CONTAINER HOST_PORT | docker rm --name NAME HOST_PORT | docker rm --id N".into()),
                };
                Ok(Request::DockerRm(DockerRmRequest {
                    container: container_arg,
                    name: a.name,
                    host_port: port.map(|p| p.port),
                    host_port_last: port.and_then(|p| p.last),
                    proto: port.and_then(|p| p.proto),
                    id: a.id,
                }))
            }
            DockerCommand::Remap(a) => Ok(Request::DockerRemap(DockerRemapRequest {
                container: a.container,
                old_port: a.ports.old,
                new_port: a.ports.new,
                old_port_last: a.ports.old_last,
                new_port_last: a.ports.new_last,
                proto: a.ports.proto,
            })),
        }
    }
}
