//! The wire protocol between `lab-ops natmap` clients and the daemon.
//!
//! One JSON object per line each way. A request is
//! `{"version":1,"request":{"cmd":"dnat",…}}`; a response is
//! `{"version":1,"ok":true,"data":…}` or
//! `{"version":1,"ok":false,"error":{"code":"…","message":"…"}}`.
//! Request fields are typed values, so parsing a request validates it, and
//! unknown fields are refused.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::{
    ContainerRef, HostIp, IfName, Network, PortList, PortSpec, Proto, Rule, RuleSpec,
};

pub mod strict;

/// Version of this protocol; the daemon refuses requests of another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the daemon reads; a longer one closes the connection.
/// Large enough for an `apply` document of ~25,000 rules; the buffer only
/// grows with what a client actually sends.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Schema version of `apply`/`export` documents.
pub const DOCUMENT_VERSION: u32 = 1;

/// Longest `ls` filter accepted.
pub const MAX_FILTER_LEN: usize = 128;

/// A request with its protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What is asked.
    pub request: Request,
}

impl Envelope {
    /// Parses one request line (its trailing line break allowed) into the
    /// request, checking the version first: a client of another version gets
    /// `version_mismatch` whatever else its line holds. Straight into typed
    /// values, duplicate keys refused ([`strict`]); a bad line yields the
    /// error to answer.
    pub fn parse_line(line: &[u8]) -> Result<Request, ErrorBody> {
        let invalid = |message: String| ErrorBody {
            code: ErrorCode::InvalidRequest,
            message,
        };
        let text = std::str::from_utf8(line)
            .map_err(|_| invalid("request is not valid UTF-8".into()))?
            .trim_end_matches(['\n', '\r']);
        let env: strict::RawEnvelope = serde_json::from_str(text)
            .map_err(|e| invalid(format!("request is not a JSON object: {e}")))?;
        match env.version.map(|v| v.get().parse::<u64>()) {
            Some(Ok(v)) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(Ok(v)) => {
                return Err(ErrorBody {
                    code: ErrorCode::VersionMismatch,
                    message: format!("protocol version {v} is not supported, this daemon speaks {PROTOCOL_VERSION}: use a matching lab-ops"),
                })
            }
            _ => return Err(invalid("request needs a numeric \"version\" field".into())),
        }
        let request = env
            .request
            .ok_or_else(|| invalid("missing field \"request\"".into()))?;
        if let Some(unknown) = env.unknown {
            return Err(invalid(format!(
                "unknown field {unknown:?}; expected version and request"
            )));
        }
        Request::from_raw(request).map_err(|m| invalid(format!("request.{m}")))
    }
}

/// Every request a client can make, tagged by `cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the daemon there? Answers its version.
    Ping(Empty),
    /// Add or delete a static DNAT rule.
    Dnat(DnatRequest),
    /// Add or delete a SNAT rule.
    Snat(SnatRequest),
    /// Add or delete a hairpin NAT rule.
    Hairpin(HairpinRequest),
    /// Add or delete a policy route.
    PolicyRoute(PolicyRouteRequest),
    /// List rules.
    Ls(LsRequest),
    /// Enable IP forwarding.
    Fwd(FwdRequest),
    /// Remove every rule and reservation and reset state.
    Clear(Empty),
    /// Publish a port of a container (or of a fixed non-Docker target).
    DockerAdd(DockerAddRequest),
    /// Remove a Docker mapping.
    DockerRm(DockerRmRequest),
    /// Move a Docker mapping to another host port.
    DockerRemap(DockerRemapRequest),
    /// Make the rules equal to a declarative document, in one transaction.
    Apply(ApplyRequest),
    /// The current rules as a declarative document.
    Export(Empty),
    /// Health of the daemon and the host (`status`, `doctor`).
    Status(Empty),
    /// Make the current rules durable and return the boot fragments.
    Save(SaveRequest),
    /// Read the config file again.
    Reload(Empty),
    /// Validate the inner change and show the exact rule changes it would
    /// make, changing nothing (`--dry-run`).
    DryRun(DryRunRequest),
}

impl Request {
    /// Parses the `request` object of an envelope, straight into its typed
    /// arguments (see [`strict`]). The `cmd` tag is read first and the rest
    /// as that command's arguments, so an error names the exact field
    /// (`ext_if: invalid interface …`), which serde's buffered tagged-enum
    /// parsing cannot do. A key given twice is refused.
    pub fn from_raw(raw: &RawValue) -> Result<Request, String> {
        use strict::arguments as args;
        const COMMANDS: &str = "ping, dnat, snat, hairpin, policy_route, ls, fwd, clear, docker_add, docker_rm, docker_remap, apply, export, status, save, reload, dry_run";
        let cmd = match strict::command(raw) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(format!("cmd: missing; expected one of {COMMANDS}")),
            Err(e) => return Err(format!("cmd: {e}; expected one of {COMMANDS}")),
        };
        Ok(match cmd.as_str() {
            "ping" => Request::Ping(args(raw)?),
            "dnat" => Request::Dnat(args(raw)?),
            "snat" => Request::Snat(args(raw)?),
            "hairpin" => Request::Hairpin(args(raw)?),
            "policy_route" => Request::PolicyRoute(args(raw)?),
            "ls" => Request::Ls(args(raw)?),
            "fwd" => Request::Fwd(args(raw)?),
            "clear" => Request::Clear(args(raw)?),
            "docker_add" => Request::DockerAdd(args(raw)?),
            "docker_rm" => Request::DockerRm(args(raw)?),
            "docker_remap" => Request::DockerRemap(args(raw)?),
            "apply" => Request::Apply(apply_arguments(raw)?),
            "export" => Request::Export(args(raw)?),
            "status" => Request::Status(args(raw)?),
            "save" => Request::Save(args(raw)?),
            "reload" => Request::Reload(args(raw)?),
            "dry_run" => {
                let wrapped: DryRunRaw = args(raw)?;
                let inner =
                    Request::from_raw(wrapped.request).map_err(|m| format!("request.{m}"))?;
                if !inner.has_dry_run() {
                    return Err(format!(
                        "request: {} has no dry run (it changes nothing)",
                        inner.name()
                    ));
                }
                Request::DryRun(DryRunRequest {
                    request: Box::new(inner),
                })
            }
            _ => {
                return Err(format!(
                    "cmd: unknown command {:?}; expected one of {COMMANDS}",
                    cmd.escape_debug().to_string()
                ))
            }
        })
    }

    /// Whether the request changes rules or state (these are logged with the peer).
    pub fn is_change(&self) -> bool {
        match self {
            Request::Ping(_)
            | Request::Ls(_)
            | Request::Export(_)
            | Request::Status(_)
            | Request::Save(_)
            | Request::DryRun(_) => false,
            Request::Apply(a) => !a.dry_run,
            _ => true,
        }
    }

    /// Whether `--dry-run` can simulate the request: changes of rules and
    /// state (not `reload`, which reads a file, nor a nested dry run).
    pub fn has_dry_run(&self) -> bool {
        self.is_change() && !matches!(self, Request::Reload(_) | Request::DryRun(_))
    }

    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping(_) => "ping",
            Request::Dnat(_) => "dnat",
            Request::Snat(_) => "snat",
            Request::Hairpin(_) => "hairpin",
            Request::PolicyRoute(_) => "policy_route",
            Request::Ls(_) => "ls",
            Request::Fwd(_) => "fwd",
            Request::Clear(_) => "clear",
            Request::DockerAdd(_) => "docker_add",
            Request::DockerRm(_) => "docker_rm",
            Request::DockerRemap(_) => "docker_remap",
            Request::Apply(a) if a.dry_run => "apply --dry-run",
            Request::Apply(_) => "apply",
            Request::Export(_) => "export",
            Request::Status(_) => "status",
            Request::Save(_) => "save",
            Request::Reload(_) => "reload",
            Request::DryRun(_) => "dry_run",
        }
    }
}

/// No arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `dnat` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnatRequest {
    /// External address.
    pub ext_ip: HostIp,
    /// Internal target.
    pub int_ip: HostIp,
    /// Ports, kept the same on the target.
    pub ports: PortList,
    /// Protocol (default tcp).
    #[serde(default)]
    pub proto: Proto,
    /// Ingress interface, optional.
    #[serde(default)]
    pub ext_if: Option<IfName>,
    /// Accept an external address that is not this host's now (a VIP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
    /// Delete instead of add.
    #[serde(default)]
    pub delete: bool,
}

/// `snat` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatRequest {
    /// Source address or CIDR to rewrite.
    pub int_ip: Network,
    /// Egress interface.
    pub ext_if: IfName,
    /// New source address.
    pub ext_ip: HostIp,
    /// Also accept the traffic (and its replies) in natmap's filter chain,
    /// for hosts whose `FORWARD` policy is `DROP`.
    #[serde(default)]
    pub forward: bool,
    /// Delete instead of add.
    #[serde(default)]
    pub delete: bool,
}

/// `hairpin` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HairpinRequest {
    /// External address.
    pub ext_ip: HostIp,
    /// Internal target.
    pub int_ip: HostIp,
    /// Ports.
    pub ports: PortList,
    /// Protocol (default tcp).
    #[serde(default)]
    pub proto: Proto,
    /// Internal network whose clients are masqueraded; by default the
    /// connected network the host routes `int_ip` through.
    #[serde(default)]
    pub int_net: Option<Network>,
    /// Accept an external address that is not this host's now (a VIP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
    /// Delete instead of add.
    #[serde(default)]
    pub delete: bool,
}

/// `docker add` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerAddRequest {
    /// Container by id, id prefix or name.
    #[serde(default)]
    pub container: Option<ContainerRef>,
    /// `--name`: the container, or the label of a non-Docker target.
    #[serde(default)]
    pub name: Option<ContainerRef>,
    /// The port mapping.
    pub mapping: PortSpec,
    /// Docker network to take the address from, when the container has several.
    #[serde(default)]
    pub network: Option<ContainerRef>,
    /// Accept a HOST_IP that is not this host's now (a VIP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
}

/// `docker rm` arguments: a container (or `--name`) and host port, or an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerRmRequest {
    /// Container by name or id prefix.
    #[serde(default)]
    pub container: Option<ContainerRef>,
    /// `--name`.
    #[serde(default)]
    pub name: Option<ContainerRef>,
    /// Host port of the mapping (any port of a range names it).
    #[serde(default)]
    pub host_port: Option<u16>,
    /// With `host_port`, the last port of a range (`8160-8161`): the
    /// mapping must be exactly that range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port_last: Option<u16>,
    /// Protocol, when the port is mapped for both.
    #[serde(default)]
    pub proto: Option<Proto>,
    /// Mapping id (`--id`).
    #[serde(default)]
    pub id: Option<u64>,
}

/// `docker remap` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerRemapRequest {
    /// Container by name or id prefix.
    pub container: ContainerRef,
    /// Current host port (the first of a range).
    pub old_port: u16,
    /// New host port (the first of the new range).
    pub new_port: u16,
    /// The last port of the current range, when the request names it
    /// (`8160-8161:9160-9161`): the mapping must be exactly that range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_port_last: Option<u16>,
    /// The last port of the new range, when given: it must make a range
    /// of the mapping's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_port_last: Option<u16>,
    /// Protocol, when the port is mapped for both.
    #[serde(default)]
    pub proto: Option<Proto>,
}

/// A declarative description of every rule natmap should have: what
/// `export` prints and `apply` takes. Rules are the objects `ls --json`
/// shows, without `id` and `status`; Docker mappings name their container
/// (its address is looked up when applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Must be [`DOCUMENT_VERSION`].
    pub schema_version: u32,
    /// The rules.
    pub rules: Vec<RuleSpec>,
}

/// `apply` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The desired rules.
    pub document: Document,
    /// Only show the plan.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `apply` did (or would do, with `dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Whether this was only a plan.
    pub dry_run: bool,
    /// Rules added (with their new ids; 0 in a dry run).
    pub added: Vec<RuleView>,
    /// Rules removed.
    pub removed: Vec<RuleView>,
    /// How many rules stayed as they were.
    pub kept: usize,
}

/// `dry_run` arguments: the change to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// The change.
    pub request: Box<Request>,
}

/// `apply` arguments with the document's rules still as text, so they can
/// be read into a `Vec` of their exact length ([`strict::exact_vec`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyRaw<'a> {
    #[serde(borrow)]
    document: &'a RawValue,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentRaw<'a> {
    schema_version: u32,
    #[serde(borrow)]
    rules: &'a RawValue,
}

/// Reads `apply` arguments; errors name the path (`document.rules[3].ports`).
fn apply_arguments(raw: &RawValue) -> Result<ApplyRequest, String> {
    let apply: ApplyRaw = strict::arguments(raw)?;
    let document: DocumentRaw =
        strict::from_str(apply.document.get()).map_err(|m| format!("document.{m}"))?;
    let rules = strict::exact_vec(document.rules).map_err(|m| format!("document.rules{m}"))?;
    Ok(ApplyRequest {
        document: Document {
            schema_version: document.schema_version,
            rules,
        },
        dry_run: apply.dry_run,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunRaw<'a> {
    #[serde(borrow)]
    request: &'a RawValue,
}

/// What a `--dry-run` change would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunReport {
    /// Always true: says in the answer itself that nothing was changed.
    #[serde(default = "yes")]
    pub dry_run: bool,
    /// The firewall transactions (per family) it would send, in the
    /// driver's syntax (`iptables-restore --noflush` input); empty when
    /// nothing would change.
    pub transactions: Vec<Transaction>,
    /// Other effects (sysctls, routes) it would have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<String>,
}

/// One firewall transaction: the input of one run of the firewall
/// driver's program (`iptables-restore --noflush`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// `ipv4` or `ipv6`.
    pub family: crate::model::Family,
    /// The program the input is for (`iptables-restore --noflush`); empty
    /// from a daemon older than the firewall driver seam.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub program: String,
    /// The exact input.
    pub restore: String,
}

/// `status`: what an operator (or a monitor) needs to know.
// 14 fields because this is the `status` answer key for key: monitors read
// these top-level keys, and each is one line of the CLI's status table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Daemon version.
    pub daemon_version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The kernel interface the firewall driver uses: `nft` or `legacy`
    /// for iptables (iptables-nft or iptables-legacy; both are the iptables
    /// driver, not a native nftables one).
    pub backend: String,
    /// The firewall driver (`iptables`); empty from a daemon older than
    /// the driver seam.
    #[serde(default)]
    pub firewall: String,
    /// Whether IPv6 NAT works here.
    pub ipv6_nat: bool,
    /// `net.ipv4.ip_forward`.
    pub ipv4_forwarding: Option<bool>,
    /// Whether Docker answers, and where.
    pub docker: DockerStatus,
    /// Rules by kind and by status.
    pub rules: std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>>,
    /// Drift repairs since start.
    pub repairs: u64,
    /// The last repair: seconds ago and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair: Option<LastRepair>,
    /// Ports natmap forwards that something else also claims.
    pub conflicts: Vec<String>,
    /// Everything that needs attention; empty when all is well.
    pub problems: Vec<String>,
    /// Things to know that need no action (they do not change the exit code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The daemon's file descriptors against its limit (absent from older
    /// daemons, or if `/proc` cannot tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<OpenFiles>,
}

/// File descriptors: what reservations may still use before the daemon
/// refuses changes with `fd_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    /// Open now.
    pub open: usize,
    /// The open-file limit (`LimitNOFILE`).
    pub limit: usize,
    /// Kept free for clients, iptables and the state file.
    pub reserve: usize,
}

/// Docker's state as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    /// Whether Docker answers.
    pub reachable: bool,
    /// Why not, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// When and why natmap last repaired its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRepair {
    /// Seconds ago.
    pub secs_ago: u64,
    /// What was wrong.
    pub reasons: Vec<String>,
}

/// `save` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// Only return the fragments: the state file is not written.
    #[serde(default)]
    pub dry_run: bool,
}

/// What `save` did.
///
/// Protocol note (version 1): earlier builds called the rule count
/// `rules`, the name `ls` uses for a list; it is `rule_count` now, and
/// clients still read the old name from an older daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    /// The state file, now fsynced: the daemon restores from it at boot.
    pub state_path: String,
    /// How many rules it holds.
    #[serde(alias = "rules")]
    pub rule_count: usize,
    /// Whether this was a dry run (nothing written).
    #[serde(default)]
    pub dry_run: bool,
    /// `iptables-restore --noflush` fragments of natmap's chains and hooks
    /// only, per family, for hosts that restore rules without the daemon.
    pub fragments: Vec<Transaction>,
    /// The files `save --export` wrote the fragments to (filled in by the
    /// client; the daemon writes no fragment files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exported: Vec<String>,
}

/// `policy-route` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRouteRequest {
    /// Source address whose traffic is routed.
    pub src_ip: HostIp,
    /// Gateway.
    pub via: HostIp,
    /// Routing table.
    pub table: u32,
    /// Delete instead of add.
    #[serde(default)]
    pub delete: bool,
}

/// `ls` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LsRequest {
    /// Only rules whose id, kind, address, interface or container match.
    #[serde(default)]
    pub filter: Option<String>,
    /// Include per-rule counters from the kernel.
    #[serde(default)]
    pub counters: bool,
}

/// `fwd` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FwdRequest {
    /// Also enable IPv6 forwarding where the kernel has IPv6.
    #[serde(default = "yes")]
    pub ipv6: bool,
}

fn yes() -> bool {
    true
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// The daemon's protocol version.
    pub version: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Body>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A success carrying `data`.
    pub fn ok(data: impl Into<Body>) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            data: Some(data.into()),
            error: None,
        }
    }

    /// The result as JSON (`null` for a failure).
    pub fn data_json(&self) -> serde_json::Value {
        self.data.as_ref().map(Body::to_json).unwrap_or_default()
    }
}

/// A successful response's result.
///
/// The daemon answers with the typed report; it becomes JSON only when the
/// connection writes the line, off the engine thread (a 20,000-rule answer
/// costs the engine nothing to serialize). Reports are boxed: a response is
/// moved through channels and results. A client reads every answer as
/// [`Body::Json`]: the request it sent says which report that JSON is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    /// `ping`.
    Pong(Box<Pong>),
    /// A rule added, removed or already present.
    Change(Box<ChangeResult>),
    /// `ls`.
    List(Box<RuleList>),
    /// `clear`.
    Clear(Box<ClearReport>),
    /// `fwd`.
    Forwarding(Box<ForwardingReport>),
    /// `apply` (and its own dry run).
    Apply(Box<ApplyReport>),
    /// `--dry-run` of a change: what it would have done.
    DryRun(Box<DryRunReport>),
    /// `save`.
    Save(Box<SaveReport>),
    /// `export`.
    Document(Box<Document>),
    /// `status`.
    Status(Box<StatusReport>),
    /// JSON as read from the wire, or an answer without a report type.
    Json(serde_json::Value),
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Body, D::Error> {
        serde_json::Value::deserialize(d).map(Body::Json)
    }
}

impl Body {
    /// The result as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Body::Json(v) => v.clone(),
            typed => serde_json::to_value(typed).expect("response data serializes"),
        }
    }

    /// The result as JSON, editable in place (a typed report becomes JSON).
    pub fn json_mut(&mut self) -> &mut serde_json::Value {
        if !matches!(self, Body::Json(_)) {
            *self = Body::Json(self.to_json());
        }
        match self {
            Body::Json(v) => v,
            _ => unreachable!("made JSON above"),
        }
    }
}

macro_rules! body_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Body {
            fn from(report: $ty) -> Body {
                Body::$variant(report.into())
            }
        })*
    };
}

body_from!(
    Pong(Pong),
    Change(ChangeResult),
    List(RuleList),
    Clear(ClearReport),
    Forwarding(ForwardingReport),
    Apply(ApplyReport),
    DryRun(DryRunReport),
    Save(SaveReport),
    Document(Document),
    Status(StatusReport),
    Json(serde_json::Value),
);

impl Response {
    /// A failure.
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: false,
            data: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// An error's stable code and human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

/// Stable error codes. Scripts match on these; messages may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line was not a valid request (JSON, fields, values).
    InvalidRequest,
    /// A value was well-formed but not acceptable (mixed families, …).
    InvalidArgument,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// The request line exceeded [`MAX_LINE_BYTES`].
    LineTooLong,
    /// The rule to delete does not exist.
    NotFound,
    /// A port to forward is held by another process or another natmap rule.
    PortInUse,
    /// The firewall refused the transaction; nothing changed.
    ApplyFailed,
    /// The state could not be written; the change was rolled back.
    StateWriteFailed,
    /// IPv6 NAT is not available in this kernel.
    Ipv6Unavailable,
    /// A sysctl could not be written.
    SysctlFailed,
    /// The config file is invalid; the running config stays.
    InvalidConfig,
    /// Docker cannot be reached; static rules keep working.
    DockerUnavailable,
    /// No container by that id or name.
    ContainerNotFound,
    /// An external or host address is not an address of this host.
    AddressNotLocal,
    /// The client could not reach the daemon (client-side only).
    DaemonUnreachable,
    /// The daemon answered something the client could not read (client-side only).
    BadResponse,
    /// The change would take the daemon's file descriptors (up to two per
    /// reserved port: the socket and its loopback relay) too close to its open-file
    /// limit (`LimitNOFILE`); nothing changed.
    FdLimit,
    /// The rule contradicts an existing rule (named in the message), e.g. a
    /// second `snat` of the same source out of the same interface.
    RuleConflict,
    /// A bug: the daemon could not handle the request.
    Internal,
    /// `install` or `uninstall` failed (client-side only).
    InstallFailed,
    /// The daemon could not start, or stopped on an error (client-side only).
    DaemonFailed,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PortInUse => "port_in_use",
            ErrorCode::ApplyFailed => "apply_failed",
            ErrorCode::StateWriteFailed => "state_write_failed",
            ErrorCode::Ipv6Unavailable => "ipv6_unavailable",
            ErrorCode::SysctlFailed => "sysctl_failed",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::DockerUnavailable => "docker_unavailable",
            ErrorCode::ContainerNotFound => "container_not_found",
            ErrorCode::AddressNotLocal => "address_not_local",
            ErrorCode::DaemonUnreachable => "daemon_unreachable",
            ErrorCode::BadResponse => "bad_response",
            ErrorCode::FdLimit => "fd_limit",
            ErrorCode::RuleConflict => "rule_conflict",
            ErrorCode::Internal => "internal",
            ErrorCode::InstallFailed => "install_failed",
            ErrorCode::DaemonFailed => "daemon_failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule as shown by `ls` and in change results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    /// The stored rule.
    #[serde(flatten)]
    pub rule: Rule,
    /// Whether it is in force.
    pub status: RuleStatus,
    /// Why not, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Kernel counters, when asked for (`ls -v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
}

/// How much a rule is used, from the firewall's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Connections NATed (only a connection's first packet passes the nat table).
    pub connections: u64,
    /// Packets forwarded (both directions, filter table).
    pub packets: u64,
    /// Bytes forwarded (both directions, filter table).
    pub bytes: u64,
}

/// Whether a rule is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleStatus {
    /// Installed, ports reserved.
    Active,
    /// Kept in state but not installed: another process holds one of its ports.
    /// natmap retries every few seconds and installs it once the port is free.
    PortConflict,
    /// Kept in state but not installed: its family cannot be NATed here
    /// (IPv6 without `ip6table_nat`).
    Unavailable,
    /// A Docker mapping whose container is stopped or gone: no rules, the
    /// port stays reserved, and it comes back when the container does.
    Down,
    /// An auto-discovered mapping whose engine does not answer: its rules
    /// stay as they were until the engine is back.
    Stale,
    /// The rule's address is not this host's (yet): with `--allow-nonlocal`
    /// its rules are installed but match only once the address is local;
    /// without, nothing is installed until the address appears.
    WaitingForAddress,
    /// A Docker mapping natmap cannot confirm (Docker unreachable, or not
    /// asked yet since the daemon started): no rules until Docker confirms
    /// the container runs with that address.
    Unknown,
    /// Read from the state file but never installed: it fails the checks
    /// of a request or of the file (a duplicate id, rule or port); the
    /// detail says which. Kept in the file as it is for the operator to fix.
    Quarantined,
    /// Installed, but the interface it names does not exist (yet): it
    /// starts matching when the interface appears.
    WaitingForInterface,
}

impl RuleStatus {
    /// Its name on the wire (`status`, `ls --json`, metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            RuleStatus::Active => "active",
            RuleStatus::PortConflict => "port_conflict",
            RuleStatus::Unavailable => "unavailable",
            RuleStatus::Down => "down",
            RuleStatus::Stale => "stale",
            RuleStatus::WaitingForAddress => "waiting_for_address",
            RuleStatus::Unknown => "unknown",
            RuleStatus::Quarantined => "quarantined",
            RuleStatus::WaitingForInterface => "waiting_for_interface",
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The rule was added.
    Added,
    /// The same rule already existed; nothing changed.
    AlreadyPresent,
    /// The rule was deleted.
    Deleted,
    /// The mapping moved to another host port.
    Remapped,
    /// A `dnat` rule became a `hairpin` of the same ports and target: same
    /// id, same reservations, now masquerading internal clients too.
    Upgraded,
}

/// Result of an add or delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    /// What happened.
    pub result: ChangeKind,
    /// The rule concerned.
    pub rule: RuleView,
    /// What the operator should know about the change (e.g. traffic that
    /// will be dropped); empty when there is nothing to say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Result of `ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleList {
    /// Matching rules, in id order.
    pub rules: Vec<RuleView>,
    /// State file entries that are not even rules (they do not parse), so
    /// cannot be listed as one: quarantined like invalid rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<UnreadableEntry>,
    /// The firewall driver the rules are installed with (`iptables`,
    /// `nftables`); empty from a daemon older than `--backend`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub firewall: String,
}

/// A quarantined state file entry that does not parse as a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableEntry {
    /// Its position in the file's `rules` when the daemon started.
    pub index: usize,
    /// Its `id`, if it has a numeric one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<crate::model::RuleId>,
    /// Why it is quarantined.
    pub reason: String,
}

/// One sysctl `fwd` looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlChange {
    /// The sysctl, e.g. `net.ipv4.ip_forward`.
    pub name: String,
    /// Value before.
    pub before: String,
    /// Value after.
    pub after: String,
}

/// Result of `fwd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardingReport {
    /// Every sysctl looked at, changed or not.
    pub sysctls: Vec<SysctlChange>,
}

/// Result of `clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearReport {
    /// How many rules were removed.
    pub removed: usize,
}

/// Result of `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The daemon's version.
    pub daemon_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Envelope, String> {
        Ok(Envelope {
            version: PROTOCOL_VERSION,
            request: Envelope::parse_line(line.as_bytes()).map_err(|e| e.message)?,
        })
    }

    #[test]
    fn request_round_trips() {
        let env = Envelope {
            version: PROTOCOL_VERSION,
            request: Request::Dnat(DnatRequest {
                ext_ip: "192.0.2.1".parse().unwrap(),
                int_ip: "198.51.100.2".parse().unwrap(),
                ports: "25,465".parse().unwrap(),
                proto: Proto::Udp,
                ext_if: Some("eth0".parse().unwrap()),
                allow_nonlocal: false,
                delete: false,
            }),
        };
        let line = serde_json::to_string(&env).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25,465","proto":"udp","ext_if":"eth0","delete":false}}"#
        );
        assert_eq!(parse(&line).unwrap(), env);
        let clear = r#"{"version":1,"request":{"cmd":"clear"}}"#;
        assert_eq!(parse(clear).unwrap().request, Request::Clear(Empty {}));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (
                r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"0"}}"#,
                "ports",
            ),
            (
                r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","ext_if":"eth0\n-A X"}}"#,
                "ext_if",
            ),
            (
                r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","color":"red"}}"#,
                "color",
            ),
            (r#"{"version":1,"request":{"cmd":"clear","x":1}}"#, "x"),
            (r#"{"version":1,"request":{"cmd":"rm -rf"}}"#, "cmd"),
            (
                r#"{"version":1,"extra":true,"request":{"cmd":"clear"}}"#,
                "extra",
            ),
        ];
        for (line, field) in cases {
            let err = parse(line).unwrap_err();
            assert!(err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_level() {
        let cases = [
            (
                r#"{"version":1,"request":{"cmd":"ping","cmd":"clear"}}"#,
                "cmd",
            ),
            (
                r#"{"version":1,"version":1,"request":{"cmd":"ping"}}"#,
                "version",
            ),
            (
                r#"{"version":1,"request":{"cmd":"ping"},"request":{"cmd":"clear"}}"#,
                "request",
            ),
            (
                r#"{"version":1,"request":{"cmd":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","ports":"26"}}"#,
                "ports",
            ),
            (
                r#"{"version":1,"request":{"cmd":"dry_run","request":{"cmd":"clear","cmd":"clear"}}}"#,
                "cmd",
            ),
            (
                r#"{"version":1,"request":{"cmd":"apply","document":{"schema_version":1,"schema_version":1,"rules":[]}}}"#,
                "schema_version",
            ),
            (
                r#"{"version":1,"request":{"cmd":"apply","document":{"schema_version":1,"rules":[{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","int_ip":"198.51.100.3","ports":"25","proto":"tcp"}]}}}"#,
                "int_ip",
            ),
            (
                r#"{"version":1,"request":{"cmd":"apply","document":{"schema_version":1,"rules":[{"kind":"dnat","kind":"snat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","proto":"tcp"}]}}}"#,
                "kind",
            ),
        ];
        for (line, key) in cases {
            let err = parse(line).unwrap_err();
            assert!(
                err.contains("duplicate") && err.contains(key),
                "{line}: {err}"
            );
        }
        // The same keys once each are fine, in any order.
        let reordered = r#"{"request":{"ports":"25","int_ip":"198.51.100.2","cmd":"dnat","ext_ip":"192.0.2.1"},"version":1}"#;
        assert!(matches!(
            parse(reordered).unwrap().request,
            Request::Dnat(_)
        ));
    }

    #[test]
    fn the_version_is_checked_before_anything_else() {
        let err =
            Envelope::parse_line(br#"{"request":{"cmd":"nope"},"x":1,"version":2}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::VersionMismatch, "{}", err.message);
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let ok = serde_json::to_string(&Response::ok(ClearReport { removed: 2 })).unwrap();
        assert_eq!(ok, r#"{"version":1,"ok":true,"data":{"removed":2}}"#);
        let err =
            serde_json::to_string(&Response::err(ErrorCode::PortInUse, "port 25/tcp")).unwrap();
        assert_eq!(
            err,
            r#"{"version":1,"ok":false,"error":{"code":"port_in_use","message":"port 25/tcp"}}"#
        );
        for code in [
            ErrorCode::PortInUse,
            ErrorCode::Ipv6Unavailable,
            ErrorCode::DaemonUnreachable,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}

#[cfg(test)]
mod document_tests {
    use super::*;

    #[test]
    fn documents_refuse_misspelled_rule_fields_and_views_round_trip() {
        let good = r#"{"schema_version":1,"rules":[{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25","proto":"tcp","ext_if":null}]}"#;
        let doc: Document = serde_json::from_str(good).unwrap();
        assert_eq!(doc.rules.len(), 1);
        let typo = good.replace("ext_if", "ext_iff");
        assert!(serde_json::from_str::<Document>(&typo).is_err());
        let view = RuleView {
            rule: Rule {
                id: 3,
                spec: doc.rules[0].clone(),
            },
            status: RuleStatus::Active,
            detail: Some("x".into()),
            counters: Some(Counters {
                connections: 1,
                packets: 2,
                bytes: 3,
            }),
        };
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(serde_json::from_str::<RuleView>(&json).unwrap(), view);
    }
}
