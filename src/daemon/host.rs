//! Small host facts and actions: sysctls, the connected network of an
//! address, and conntrack cleanup. Each runs a fixed program with typed
//! arguments, never a shell.

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::model::{Family, Network, PolicyRouteRule, Proto};
use crate::proto::SysctlChange;

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Reads IPv4 forwarding (`None` if the sysctl cannot be read).
pub fn ipv4_forwarding() -> Option<bool> {
    fs::read_to_string(IPV4_FORWARD)
        .ok()
        .map(|v| v.trim() == "1")
}

/// Turns on IPv4 forwarding, and IPv6 forwarding when asked and present.
/// Returns every sysctl looked at with its value before and after.
pub fn enable_forwarding(ipv6: bool) -> Result<Vec<SysctlChange>, String> {
    let mut changes = vec![set_sysctl(IPV4_FORWARD, "net.ipv4.ip_forward")?];
    if ipv6 && Path::new(IPV6_FORWARD).exists() {
        changes.push(set_sysctl(IPV6_FORWARD, "net.ipv6.conf.all.forwarding")?);
    }
    Ok(changes)
}

/// What [`enable_forwarding`] would change, one line per sysctl.
pub fn forwarding_plan(ipv6: bool) -> Vec<String> {
    let mut plan = Vec::new();
    let mut look = |path: &str, name: &str| match fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => plan.push(format!("{name}: already 1")),
        Ok(v) => plan.push(format!("{name}: {} -> 1", v.trim())),
        Err(e) => plan.push(format!("{name}: cannot read ({e})")),
    };
    look(IPV4_FORWARD, "net.ipv4.ip_forward");
    if ipv6 && Path::new(IPV6_FORWARD).exists() {
        look(IPV6_FORWARD, "net.ipv6.conf.all.forwarding");
    }
    plan
}

fn set_sysctl(path: &str, name: &str) -> Result<SysctlChange, String> {
    let before = fs::read_to_string(path)
        .map_err(|e| format!("reading {name}: {e}"))?
        .trim()
        .to_owned();
    if before != "1" {
        fs::write(path, "1\n").map_err(|e| format!("setting {name}=1: {e}"))?;
    }
    Ok(SysctlChange {
        name: name.to_owned(),
        before,
        after: "1".to_owned(),
    })
}

/// The connected network through which the host reaches `ip`: the prefix of
/// the address on the outgoing interface that contains `ip`.
pub fn connected_network(ip: IpAddr) -> Result<Network, String> {
    let target = ip.to_string();
    let route = run_json("ip", &["-j", "route", "get", &target])?;
    let dev = route
        .get(0)
        .and_then(|r| r.get("dev"))
        .and_then(|d| d.as_str())
        .ok_or_else(|| format!("no route to {ip}"))?
        .to_owned();
    let addrs = run_json("ip", &["-j", "addr", "show", "dev", &dev])?;
    let infos = addrs
        .get(0)
        .and_then(|a| a.get("addr_info"))
        .and_then(|a| a.as_array())
        .cloned()
        .unwrap_or_default();
    for info in infos {
        let (Some(local), Some(prefix)) = (
            info.get("local").and_then(|l| l.as_str()),
            info.get("prefixlen").and_then(|p| p.as_u64()),
        ) else {
            continue;
        };
        let (Ok(local), Ok(prefix)) = (local.parse::<IpAddr>(), u8::try_from(prefix)) else {
            continue;
        };
        if let Some(net) = Network::new(local, prefix) {
            if net.contains(&ip) {
                return Ok(net);
            }
        }
    }
    Err(format!("{ip} is not on a network connected to {dev}"))
}

fn run_json(program: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("reading {program} output: {e}"))
}

/// Which conntrack entries to delete: connections a rule DNATed to `reply_src`.
#[derive(Debug, Clone, Copy)]
pub struct Flows {
    /// Protocol.
    pub proto: Proto,
    /// Original destination address, when the rule had one.
    pub orig_dst: Option<IpAddr>,
    /// Original destination port, when the rule matched one port.
    pub orig_port: Option<u16>,
    /// The target the connections were sent to.
    pub reply_src: IpAddr,
}

/// Deletes conntrack entries of connections that were DNATed to a target
/// that is no longer forwarded (or moved), so flows (UDP above all) stop
/// going there. Best effort: logs and carries on when the `conntrack` tool
/// is missing.
pub fn forget_connections(flows: Flows) {
    let family = if flows.reply_src.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    };
    let mut cmd = Command::new("conntrack");
    cmd.args(["-D", "-f", family, "-p", flows.proto.as_str()]);
    if let Some(dst) = flows.orig_dst {
        cmd.args(["--orig-dst", &dst.to_string()]);
    }
    if let Some(port) = flows.orig_port {
        cmd.args(["--orig-port-dst", &port.to_string()]);
    }
    let reply_src = flows.reply_src;
    let result = cmd
        .args(["--reply-src", &reply_src.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match result {
        // conntrack exits 1 when nothing matched: that is fine.
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "cannot run conntrack ({e}); existing connections to {reply_src} are not cut \
             (install the conntrack package)"
        ),
    }
}

/// `ip -4` or `ip -6` for an address family.
fn ip_family(rule: &PolicyRouteRule) -> &'static str {
    match rule.src_ip.family() {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip: {e} (install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs a policy route: exactly one `ip rule from SRC lookup TABLE` (any
/// copies left by a crash are removed first) and `default via GW` in the table.
pub fn route_add(rule: &PolicyRouteRule) -> Result<(), String> {
    let (fam, src, via, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.via.to_string(),
        rule.table.to_string(),
    );
    run_ip(&[
        fam, "route", "replace", "default", "via", &via, "table", &table,
    ])?;
    // `ip rule del` removes one matching rule per call; bounded.
    for _ in 0..16 {
        if run_ip(&[fam, "rule", "del", "from", &src, "lookup", &table]).is_err() {
            break;
        }
    }
    run_ip(&[fam, "rule", "add", "from", &src, "lookup", &table])
}

/// Whether both halves of a policy route are in the kernel.
pub fn route_present(rule: &PolicyRouteRule) -> bool {
    let (fam, src, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.table.to_string(),
    );
    let output = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let rule_there = !output(&[fam, "rule", "list", "from", &src, "lookup", &table])
        .trim()
        .is_empty();
    let route_there =
        output(&[fam, "route", "show", "table", &table, "default"]).contains(&rule.via.to_string());
    rule_there && route_there
}

/// Removes a policy route (both the rule and the table's default route).
pub fn route_del(rule: &PolicyRouteRule) -> Result<(), String> {
    let (fam, src, via, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.via.to_string(),
        rule.table.to_string(),
    );
    let mut result = Ok(());
    for _ in 0..16 {
        if run_ip(&[fam, "rule", "del", "from", &src, "lookup", &table]).is_err() {
            break;
        }
    }
    if let Err(e) = run_ip(&[fam, "route", "del", "default", "via", &via, "table", &table]) {
        result = Err(e);
    }
    result
}

/// The commands [`route_add`] runs, for `--dry-run`.
pub fn route_plan(rule: &PolicyRouteRule, add: bool) -> Vec<String> {
    let (fam, src, via, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.via,
        rule.table,
    );
    if add {
        vec![
            format!("ip {fam} route replace default via {via} table {table}"),
            format!("ip {fam} rule add from {src} lookup {table}"),
        ]
    } else {
        vec![
            format!("ip {fam} rule del from {src} lookup {table}"),
            format!("ip {fam} route del default via {via} table {table}"),
        ]
    }
}
