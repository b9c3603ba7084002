//! `dnat`, `snat`, `hairpin`: static rules.

use clap::Args;

use crate::model::{HostIp, IfName, Network, PortList, Proto};
use crate::proto::{DnatRequest, HairpinRequest, SnatRequest};

fn ext_ip(s: &str) -> Result<HostIp, String> {
    HostIp::parse_field("--ext-ip", s).map_err(|e| e.to_string())
}

fn int_ip(s: &str) -> Result<HostIp, String> {
    HostIp::parse_field("--int-ip", s).map_err(|e| e.to_string())
}

fn int_net(s: &str) -> Result<Network, String> {
    Network::parse_field("--int-ip", s).map_err(|e| e.to_string())
}

fn ports(s: &str) -> Result<PortList, String> {
    s.parse::<PortList>()
        .map_err(|e| e.with_field("--ports").to_string())
}

fn iface(s: &str) -> Result<IfName, String> {
    s.parse::<IfName>().map_err(|e| e.to_string())
}

fn table(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(t) if !matches!(t, 0 | 253 | 254 | 255) => Ok(t),
        _ => Err(format!(
            "invalid --table {s:?}: expected a routing table number 1-252 or above 255 \
             (0, 253 default, 254 main and 255 local are reserved)"
        )),
    }
}

fn proto(s: &str) -> Result<Proto, String> {
    s.parse::<Proto>()
        .map_err(|e| e.with_field("--proto").to_string())
}

/// `dnat`: forward ports of an external address to an internal host.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  # mail server behind the router
  lab-ops natmap dnat --ext-ip 203.0.113.10 --int-ip 10.0.0.25 --ports 25,465,587
  # DNS over UDP, only from the WAN interface
  lab-ops natmap dnat --ext-ip 203.0.113.10 --int-ip 10.0.0.53 --ports 53 --proto udp --ext-if eth0
  # a keepalived VIP: forwards only on the node that holds it now
  lab-ops natmap dnat --ext-ip 203.0.113.20 --int-ip 10.0.0.25 --ports 443 --allow-nonlocal
  # remove it again
  lab-ops natmap dnat --ext-ip 203.0.113.10 --int-ip 10.0.0.25 --ports 25,465,587 --delete")]
pub struct DnatArgs {
    /// External address the traffic arrives for.
    #[arg(long, value_name = "IP", value_parser = ext_ip)]
    pub ext_ip: HostIp,
    /// Internal host to forward to (ports stay the same).
    #[arg(long, value_name = "IP", value_parser = int_ip)]
    pub int_ip: HostIp,
    /// Ports: 25,465 or ranges 8000-8010.
    #[arg(long, value_name = "LIST", value_parser = ports)]
    pub ports: PortList,
    /// Protocol.
    #[arg(long, value_name = "tcp|udp", default_value = "tcp", value_parser = proto)]
    pub proto: Proto,
    /// Only traffic arriving on this interface.
    #[arg(long, value_name = "IF", value_parser = iface)]
    pub ext_if: Option<IfName>,
    /// Accept an --ext-ip this host does not have now (a VRRP/keepalived
    /// VIP): the rule then matches only while the address is local.
    #[arg(long)]
    pub allow_nonlocal: bool,
    /// Delete the rule instead of adding it.
    #[arg(long)]
    pub delete: bool,
}

impl DnatArgs {
    /// The request these arguments make.
    pub fn into_request(self) -> DnatRequest {
        DnatRequest {
            ext_ip: self.ext_ip,
            int_ip: self.int_ip,
            ports: self.ports,
            proto: self.proto,
            ext_if: self.ext_if,
            allow_nonlocal: self.allow_nonlocal,
            delete: self.delete,
        }
    }
}

/// `snat`: rewrite the source of traffic leaving an interface.
#[derive(Debug, Args)]
#[command(
    after_help = "On a host whose FORWARD policy is DROP (every Docker host) the rewritten
traffic is dropped before it leaves unless something accepts it: --forward
makes natmap accept it (the source out of --ext-if, and the replies back).

Examples:
  lab-ops natmap snat --int-ip 10.0.0.0/24 --ext-if eth0 --ext-ip 203.0.113.10
  lab-ops natmap snat --int-ip 10.0.0.0/24 --ext-if eth0 --ext-ip 203.0.113.10 --forward
  lab-ops natmap snat --int-ip 10.0.0.5 --ext-if wg0 --ext-ip 100.64.0.1 --delete"
)]
pub struct SnatArgs {
    /// Source address or network (CIDR) to rewrite.
    #[arg(long, value_name = "IP|CIDR", value_parser = int_net)]
    pub int_ip: Network,
    /// Interface the traffic leaves by.
    #[arg(long, value_name = "IF", value_parser = iface)]
    pub ext_if: IfName,
    /// New source address.
    #[arg(long, value_name = "IP", value_parser = ext_ip)]
    pub ext_ip: HostIp,
    /// Also accept this traffic and its replies in natmap's FORWARD chain.
    #[arg(long)]
    pub forward: bool,
    /// Delete the rule instead of adding it.
    #[arg(long)]
    pub delete: bool,
}

impl SnatArgs {
    /// The request these arguments make.
    pub fn into_request(self) -> SnatRequest {
        SnatRequest {
            int_ip: self.int_ip,
            ext_if: self.ext_if,
            ext_ip: self.ext_ip,
            forward: self.forward,
            delete: self.delete,
        }
    }
}

/// `hairpin`: a forward that internal hosts can use through the external address.
#[derive(Debug, Args)]
#[command(
    after_help = "Internal clients (on --int-net, by default the network the host reaches
--int-ip through) are masqueraded so replies return through the host;
clients from outside keep their own address.

Examples:
  lab-ops natmap hairpin --ext-ip 203.0.113.10 --int-ip 10.0.0.80 --ports 80,443
  lab-ops natmap hairpin --ext-ip 203.0.113.10 --int-ip 10.0.0.80 --ports 80 --int-net 10.0.0.0/24"
)]
pub struct HairpinArgs {
    /// External address clients use.
    #[arg(long, value_name = "IP", value_parser = ext_ip)]
    pub ext_ip: HostIp,
    /// Internal host serving it (ports stay the same).
    #[arg(long, value_name = "IP", value_parser = int_ip)]
    pub int_ip: HostIp,
    /// Ports: 80,443 or ranges.
    #[arg(long, value_name = "LIST", value_parser = ports)]
    pub ports: PortList,
    /// Protocol.
    #[arg(long, value_name = "tcp|udp", default_value = "tcp", value_parser = proto)]
    pub proto: Proto,
    /// Internal network whose clients are masqueraded.
    #[arg(long, value_name = "CIDR", value_parser = |s: &str| Network::parse_field("--int-net", s).map_err(|e| e.to_string()))]
    pub int_net: Option<Network>,
    /// Accept an --ext-ip this host does not have now (a VRRP/keepalived
    /// VIP): the rule then matches only while the address is local.
    #[arg(long)]
    pub allow_nonlocal: bool,
    /// Delete the rule instead of adding it.
    #[arg(long)]
    pub delete: bool,
}

impl HairpinArgs {
    /// The request these arguments make.
    pub fn into_request(self) -> HairpinRequest {
        HairpinRequest {
            ext_ip: self.ext_ip,
            int_ip: self.int_ip,
            ports: self.ports,
            proto: self.proto,
            int_net: self.int_net,
            allow_nonlocal: self.allow_nonlocal,
            delete: self.delete,
        }
    }
}

/// `policy-route`: replies from a source address leave through a gateway.
#[derive(Debug, Args)]
#[command(
    after_help = "Installs `ip rule from SRC lookup TABLE` and `default via GW` in TABLE, owned
by natmap like every other rule (restored at start, removed on --delete and by clear).
Use it on a service node behind a gateway that preserves client addresses, so
replies go back through that gateway.

Examples:
  lab-ops natmap policy-route --src-ip 10.0.0.25 --via 10.0.0.1 --table 100
  lab-ops natmap policy-route --src-ip 10.0.0.25 --via 10.0.0.1 --table 100 --delete"
)]
pub struct PolicyRouteArgs {
    /// Source address whose traffic is routed.
    #[arg(long, value_name = "IP", value_parser = |s: &str| HostIp::parse_field("--src-ip", s).map_err(|e| e.to_string()))]
    pub src_ip: HostIp,
    /// The gateway.
    #[arg(long, value_name = "GW", value_parser = |s: &str| HostIp::parse_field("--via", s).map_err(|e| e.to_string()))]
    pub via: HostIp,
    /// Routing table number (1-252, or above 255).
    #[arg(long, value_name = "N", value_parser = table)]
    pub table: u32,
    /// Delete the route instead of adding it.
    #[arg(long)]
    pub delete: bool,
}

impl PolicyRouteArgs {
    /// The request these arguments make.
    pub fn into_request(self) -> crate::proto::PolicyRouteRequest {
        crate::proto::PolicyRouteRequest {
            src_ip: self.src_ip,
            via: self.via,
            table: self.table,
            delete: self.delete,
        }
    }
}
