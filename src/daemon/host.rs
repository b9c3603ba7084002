//! Small host facts and actions: sysctls, the connected network of an
//! address, and conntrack cleanup. Each runs a fixed program with typed
//! arguments, never a shell (conntrack cleanup talks netlink first).

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

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
/// going there: the entries `conntrack -D -f FAMILY -p PROTO [--orig-dst
/// IP] [--orig-port-dst PORT] --reply-src IP` deletes. Over ctnetlink from
/// the daemon ([`super::conntrack`]); when that fails (no
/// `nf_conntrack_netlink`, no permission), by running that `conntrack`
/// command. Best effort: logs and carries on when neither works.
pub fn forget_connections(flows: Flows) {
    forget_connections_all(&[flows]);
}

/// [`forget_connections`] for several filters at once: one dump of the
/// connection table per address family among them, whatever their number
/// (the `conntrack` fallback still runs once per filter).
pub fn forget_connections_all(all: &[Flows]) {
    static FELL_BACK: AtomicBool = AtomicBool::new(false);
    if all.is_empty() {
        return;
    }
    match super::conntrack::cut(all) {
        Ok(n) => tracing::debug!(
            "cut {n} tracked connections over netlink ({} filters)",
            all.len()
        ),
        Err(e) => {
            if !FELL_BACK.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    "cutting tracked connections over netlink failed ({e}); running the \
                     conntrack program instead"
                );
            }
            for flows in all {
                forget_by_process(*flows);
            }
        }
    }
}

/// `conntrack -D` of one filter, as a process.
fn forget_by_process(flows: Flows) {
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

/// The routing protocol number natmap tags its policy routes and `ip
/// rule`s with (`proto 157`; unassigned in iproute2's `rt_protos`). The
/// tag is how natmap tells its own routes and rules from the operator's,
/// also across a crash: it only ever deletes entries that carry it, and a
/// table holding routes without it is the operator's.
pub const RT_PROTO: &str = "157";

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

/// The routes of the rule's table in its family, from `ip -j -N route
/// list table all` (a table that does not exist yet is simply empty).
fn table_routes(rule: &PolicyRouteRule) -> Result<Vec<serde_json::Value>, String> {
    let routes = run_json(
        "ip",
        &["-j", "-N", ip_family(rule), "route", "list", "table", "all"],
    )?;
    let table = rule.table.to_string();
    Ok(routes
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|r| r.get("table").and_then(|t| t.as_str()) == Some(table.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default())
}

fn field<'a>(entry: &'a serde_json::Value, name: &str) -> &'a str {
    entry.get(name).and_then(|v| v.as_str()).unwrap_or("")
}

fn is_natmaps(entry: &serde_json::Value) -> bool {
    field(entry, "protocol") == RT_PROTO
}

/// Routes in the rule's table that natmap did not create, as `ip route`
/// would show them (`10.20.0.0/16 via 192.0.2.254 dev eth0`). natmap
/// refuses such a table: replacing its default route and emptying it on
/// delete would break whatever the operator uses it for.
pub fn foreign_routes(rule: &PolicyRouteRule) -> Result<Vec<String>, String> {
    Ok(table_routes(rule)?
        .iter()
        .filter(|r| !is_natmaps(r))
        .map(|r| {
            let mut shown = field(r, "dst").to_owned();
            for (key, word) in [("gateway", "via"), ("dev", "dev")] {
                if !field(r, key).is_empty() {
                    shown += &format!(" {word} {}", field(r, key));
                }
            }
            shown
        })
        .collect())
}

/// natmap's own `ip rule`s from the rule's source to its table.
fn own_rules(rule: &PolicyRouteRule) -> Result<usize, String> {
    let (fam, src, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.table.to_string(),
    );
    let rules = run_json(
        "ip",
        &[
            "-j", "-N", fam, "rule", "list", "from", &src, "lookup", &table,
        ],
    )?;
    Ok(rules
        .as_array()
        .map_or(0, |all| all.iter().filter(|r| is_natmaps(r)).count()))
}

/// Installs a policy route: `default via GW` in the table and exactly one
/// `ip rule from SRC lookup TABLE`, both tagged [`RT_PROTO`] (copies of
/// natmap's rule left by a crash are removed first; the operator's rules
/// are never touched). Refuses a table holding routes natmap did not
/// create, naming them.
pub fn route_add(rule: &PolicyRouteRule) -> Result<(), String> {
    let foreign = foreign_routes(rule)?;
    if !foreign.is_empty() {
        return Err(foreign_table_message(rule.table, &foreign));
    }
    let (fam, src, via, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.via.to_string(),
        rule.table.to_string(),
    );
    run_ip(&[
        fam, "route", "replace", "default", "via", &via, "table", &table, "proto", RT_PROTO,
    ])?;
    del_own_rules(rule)?;
    run_ip(&[
        fam, "rule", "add", "from", &src, "lookup", &table, "protocol", RT_PROTO,
    ])
}

/// The refusal of a table the operator uses.
pub fn foreign_table_message(table: u32, foreign: &[String]) -> String {
    format!(
        "routing table {table} already holds routes natmap did not create ({}); natmap \
         would replace its default route and empty it on delete: choose another --table",
        foreign.join(", ")
    )
}

/// Deletes natmap's own `ip rule`s for the route (there is one, unless a
/// crash left copies); succeeds when none is left, whatever was there.
fn del_own_rules(rule: &PolicyRouteRule) -> Result<(), String> {
    let (fam, src, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.table.to_string(),
    );
    // `ip rule del` removes one matching rule per call; bounded.
    for _ in 0..16 {
        if own_rules(rule)? == 0 {
            return Ok(());
        }
        run_ip(&[
            fam, "rule", "del", "from", &src, "lookup", &table, "protocol", RT_PROTO,
        ])?;
    }
    Err(format!(
        "ip rule from {src} lookup {table} keeps coming back after 16 deletes"
    ))
}

/// Whether both halves of a policy route are in the kernel, as natmap's.
pub fn route_present(rule: &PolicyRouteRule) -> bool {
    let rule_there = own_rules(rule).is_ok_and(|n| n > 0);
    let via = rule.via.to_string();
    let route_there = table_routes(rule).is_ok_and(|routes| {
        routes
            .iter()
            .any(|r| is_natmaps(r) && field(r, "dst") == "default" && field(r, "gateway") == via)
    });
    rule_there && route_there
}

/// Removes a policy route: natmap's `ip rule`, and the table's default
/// route unless `keep_table` (another policy route still uses the table).
/// Idempotent: what is already gone is not an error, so `clear` always
/// gets through.
pub fn route_del(rule: &PolicyRouteRule, keep_table: bool) -> Result<(), String> {
    del_own_rules(rule)?;
    if keep_table {
        return Ok(());
    }
    let (fam, table) = (ip_family(rule), rule.table.to_string());
    let own_default = |routes: &[serde_json::Value]| {
        routes
            .iter()
            .any(|r| is_natmaps(r) && field(r, "dst") == "default")
    };
    if own_default(&table_routes(rule)?) {
        run_ip(&[
            fam, "route", "del", "default", "table", &table, "proto", RT_PROTO,
        ])?;
    }
    Ok(())
}

/// The commands [`route_add`] or [`route_del`] run, for `--dry-run`.
pub fn route_plan(rule: &PolicyRouteRule, add: bool, keep_table: bool) -> Vec<String> {
    let (fam, src, via, table) = (
        ip_family(rule),
        rule.src_ip.as_match(),
        rule.via,
        rule.table,
    );
    if add {
        vec![
            format!("ip {fam} route replace default via {via} table {table} proto {RT_PROTO}"),
            format!("ip {fam} rule add from {src} lookup {table} protocol {RT_PROTO}"),
        ]
    } else {
        let mut plan = vec![format!(
            "ip {fam} rule del from {src} lookup {table} protocol {RT_PROTO}"
        )];
        if !keep_table {
            plan.push(format!(
                "ip {fam} route del default table {table} proto {RT_PROTO}"
            ));
        }
        plan
    }
}
