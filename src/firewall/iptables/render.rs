//! Rules to chain lines: the single place that decides what natmap installs.

use std::net::IpAddr;

use crate::model::{
    DockerRule, Endpoint, Family, HostIp, IfName, Network, PortDirection, PortList, Proto, Rule,
    RuleSpec, SnatRule,
};

use super::{Chain, FamilyRules, Ruleset};

/// Renders the desired ruleset of the given rules, in id order, for a host
/// whose bridges pass no traffic to iptables (see [`desired_on`]).
///
/// Rules that cannot be active (their ports are held by someone else) must
/// already be left out by the caller. A Docker mapping whose container is
/// down renders nothing.
pub fn desired<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Ruleset {
    desired_on(rules, BridgeNetfilter::default())
}

pub use crate::firewall::BridgeNetfilter;

/// [`desired`] for a host whose bridges do what `bridges` says.
pub fn desired_on<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    bridges: BridgeNetfilter,
) -> Ruleset {
    let mut rules: Vec<&Rule> = rules.into_iter().collect();
    rules.sort_by_key(|r| r.id);
    let mut set = Ruleset::default();
    for rule in rules {
        render_rule(rule, bridges, &mut set);
    }
    set
}

/// The comment every natmap line carries, so `iptables -S` shows its owner.
/// Built from a kind name and a number only, so it never needs quoting.
pub fn comment(kind: &str, id: u64) -> String {
    format!("-m comment --comment natmap:{kind}:{id}")
}

fn render_rule(rule: &Rule, bridges: BridgeNetfilter, set: &mut Ruleset) {
    let tag = comment(rule.spec.kind(), rule.id);
    match &rule.spec {
        RuleSpec::Dnat(r) => {
            let out = set.family_mut(r.ext_ip.family());
            // `--ext-if +` is every interface, the same as none (iptables
            // keeps no match for it).
            let ext_if = r.ext_if.as_ref().filter(|i| !i.is_any());
            let ext = dnat_lines(
                &r.ext_ip,
                ext_if,
                &r.int_ip,
                &r.ports,
                r.proto,
                &local_guard(r.allow_nonlocal, &tag),
            );
            // Traffic the host itself sends to the external address has no
            // ingress interface, so an interface-bound forward does not cover it.
            if ext_if.is_none() {
                for line in &ext {
                    out.push(Chain::NatOutput, line.clone());
                }
            }
            for line in ext {
                out.push(Chain::NatPrerouting, line);
            }
            push_accepts(out, &r.int_ip, &r.ports, r.proto, &tag);
        }
        RuleSpec::Hairpin(r) => {
            let out = set.family_mut(r.ext_ip.family());
            let guarded = local_guard(r.allow_nonlocal, &tag);
            for line in dnat_lines(&r.ext_ip, None, &r.int_ip, &r.ports, r.proto, &guarded) {
                out.push(Chain::NatPrerouting, line.clone());
                out.push(Chain::NatOutput, line);
            }
            for line in masquerade_lines(&r.int_net, &r.int_ip, &r.ports, r.proto, &tag) {
                out.push(Chain::NatPostrouting, line);
            }
            push_accepts(out, &r.int_ip, &r.ports, r.proto, &tag);
        }
        RuleSpec::Snat(r) => render_snat(r, &tag, set.family_mut(r.ext_ip.family())),
        // Routing, not netfilter: applied by the engine's route sync.
        RuleSpec::PolicyRoute(_) => {}
        RuleSpec::Docker(r) => {
            for (family, target) in docker_targets(r) {
                let bridged = bridges.filters(family);
                render_docker(r, &target, bridged, &tag, set.family_mut(family));
            }
        }
    }
}

/// The targets a Docker mapping has rules for, with their family: each
/// family it has a target in, unless its HOST_IP is of the other one. None
/// for a mapping published on loopback only: the relay on its reserved
/// socket serves it, and no kernel rule does (loopback DNAT would need
/// `route_localnet`).
pub fn docker_targets(r: &DockerRule) -> impl Iterator<Item = (Family, Endpoint)> + '_ {
    let kernel = !r.loopback_only();
    [(Family::V4, r.target_v4), (Family::V6, r.target_v6)]
        .into_iter()
        .filter(move |_| kernel)
        .filter_map(|(family, target)| Some((family, target?)))
        .filter(|(family, target)| {
            r.host_ip.is_none_or(|h| h.family() == *family) && target.ip.family() == *family
        })
}

/// The tag of a DNAT line, behind `-m addrtype --dst-type LOCAL` when the
/// rule's address may not be this host's (`--allow-nonlocal`, a VIP): the
/// line then matches only while the address is local, so traffic for the
/// address while the peer holds it is routed on, never captured.
fn local_guard(allow_nonlocal: bool, tag: &str) -> String {
    if allow_nonlocal {
        format!("-m addrtype --dst-type LOCAL {tag}")
    } else {
        tag.to_owned()
    }
}

/// The SNAT line and, with `--forward`, the FORWARD accepts: the source's
/// traffic out of the interface, and only replies (conntrack
/// RELATED,ESTABLISHED) back in, so the rule opens nothing towards the
/// source that it did not start.
fn render_snat(r: &SnatRule, tag: &str, out: &mut FamilyRules) {
    // Spelled as iptables prints them back (no `-s 0.0.0.0/0`, no `-o +`).
    let (src, dst) = (r.source.as_match("-s"), r.source.as_match("-d"));
    let (out_if, in_if) = (r.ext_if.as_match("-o"), r.ext_if.as_match("-i"));
    out.push(
        Chain::NatPostrouting,
        format!("{src}{out_if}{tag} -j SNAT --to-source {}", r.ext_ip),
    );
    if r.forward {
        out.push(
            Chain::FilterForward,
            format!("{src}{out_if}{tag} -j ACCEPT"),
        );
        out.push(
            Chain::FilterForward,
            format!("{dst}{in_if}-m conntrack --ctstate RELATED,ESTABLISHED {tag} -j ACCEPT"),
        );
    }
}

/// `-d E [-i X] -p P <ports> -j DNAT --to-destination I` (the port is kept).
fn dnat_lines(
    ext_ip: &HostIp,
    ext_if: Option<&IfName>,
    int_ip: &HostIp,
    ports: &PortList,
    proto: Proto,
    tag: &str,
) -> Vec<String> {
    let iface = ext_if
        .map(|i| format!(" {}", i.as_match("-i").trim_end()))
        .unwrap_or_default();
    ports
        .match_args(proto.as_str(), PortDirection::Destination)
        .into_iter()
        .map(|ports| {
            format!(
                "-d {}{iface} -p {proto} {ports} {tag} -j DNAT --to-destination {int_ip}",
                ext_ip.as_match(),
            )
        })
        .collect()
}

/// FORWARD ACCEPT for both directions of DNATed connections to the target,
/// so forwarding works on hosts whose FORWARD policy is DROP (every Docker
/// host). `--ctstate DNAT` keeps it from opening the target to anything that
/// natmap did not forward.
fn push_accepts(out: &mut FamilyRules, target: &HostIp, ports: &PortList, proto: Proto, tag: &str) {
    let p = proto.as_str();
    for (addr, dir) in [
        ("-d", PortDirection::Destination),
        ("-s", PortDirection::Source),
    ] {
        for ports in ports.match_args(p, dir) {
            out.push(
                Chain::FilterForward,
                format!(
                    "{addr} {} -p {p} {ports} -m conntrack --ctstate DNAT {tag} -j ACCEPT",
                    target.as_match()
                ),
            );
        }
    }
}

/// Clients on `net` reach the target through the host's address, so the
/// target's reply must come back through the host to be un-DNATed;
/// masquerading only that network's clients keeps outside clients' addresses.
fn masquerade_lines(
    net: &Network,
    target: &HostIp,
    ports: &PortList,
    proto: Proto,
    tag: &str,
) -> Vec<String> {
    ports
        .match_args(proto.as_str(), PortDirection::Destination)
        .into_iter()
        .map(|ports| {
            format!(
                "{}-d {} -p {proto} {ports} -m conntrack --ctstate DNAT {tag} -j MASQUERADE",
                net.as_match("-s"),
                target.as_match()
            )
        })
        .collect()
}

/// A Docker mapping's DNATs as (protocol and port match, DNAT target): one
/// for a range that keeps its ports, else one per port pair.
fn docker_dnats(r: &DockerRule, target: &Endpoint) -> Vec<(String, String)> {
    let p = r.proto.as_str();
    if r.port_count > 1 && r.host_port == r.container_port {
        let dport = r
            .host_ports()
            .match_args(p, PortDirection::Destination)
            .concat();
        return vec![(format!("-p {p} {dport}"), target.ip.to_string())];
    }
    r.port_pairs()
        .map(|(host, container)| {
            let to = match target.ip.ip() {
                IpAddr::V4(_) => format!("{}:{container}", target.ip),
                IpAddr::V6(_) => format!("[{}]:{container}", target.ip),
            };
            (format!("-p {p} -m {p} --dport {host}"), to)
        })
        .collect()
}

/// One DNAT of a Docker mapping as (the PREROUTING line, the OUTPUT line):
/// on its host address, or on any local address (OUTPUT leaving loopback
/// to the relay).
fn docker_dnat_lines(
    r: &DockerRule,
    target: &Endpoint,
    dport: &str,
    to: &str,
    tag: &str,
) -> (String, String) {
    match &r.host_ip {
        Some(h) => {
            let line = format!(
                "-d {} {dport} {} -j DNAT --to-destination {to}",
                h.as_match(),
                local_guard(r.allow_nonlocal, tag)
            );
            (line.clone(), line)
        }
        None => {
            let loopback = match target.ip.family() {
                Family::V4 => "127.0.0.0/8",
                Family::V6 => "::1/128",
            };
            (
                format!("{dport} -m addrtype --dst-type LOCAL {tag} -j DNAT --to-destination {to}"),
                format!(
                    "! -d {loopback} {dport} -m addrtype --dst-type LOCAL {tag} -j DNAT --to-destination {to}"
                ),
            )
        }
    }
}

/// A published container port: traffic for the host port on the given host
/// address, or on any local address (`addrtype LOCAL`, as Docker does), goes
/// to the container port. The host's own traffic to loopback is left to the
/// relay on the reserved socket (see `daemon::relay`).
///
/// A range whose host and container ports are the same is one line that
/// keeps the port (`--dport 8000:8010 -j DNAT --to-destination IP`); any
/// other range is one line per port, since DNAT to a port range picks any
/// port of it instead of the one at the same offset.
///
/// Clients on the container's own network reach it through the host's
/// address too, and whom that needs masqueraded depends on the bridge
/// (`bridged`: its frames pass iptables, br_netfilter):
/// - with br_netfilter, the DNAT happens as the frame crosses the bridge and
///   the container's replies to a neighbour cross it the same way, where
///   conntrack un-DNATs them: neighbours keep their address. Only the
///   container reaching its own mapping is masqueraded (`-s C -d C`, as
///   Docker does), else it would get a packet from itself to itself; the
///   engine puts its bridge port in hairpin mode so the bridge sends the
///   frame back out of the port it came in on (`engine::hairpin`);
/// - without, the DNAT happens on the routed path and a reply to a
///   neighbour goes straight over the bridge, past the host: the whole
///   network is masqueraded, so the replies come back through the host (the
///   container itself included, which then needs no hairpin).
fn render_docker(
    r: &DockerRule,
    target: &Endpoint,
    bridged: bool,
    tag: &str,
    out: &mut FamilyRules,
) {
    let p = r.proto.as_str();
    let container_ports = r.container_ports();
    for (dport, to) in docker_dnats(r, target) {
        let (inbound, local) = docker_dnat_lines(r, target, &dport, &to, tag);
        out.push(Chain::NatPrerouting, inbound);
        out.push(Chain::NatOutput, local);
    }
    if r.auto.as_ref().is_some_and(|a| a.masquerade) {
        // A remote node: its replies must come back through this host.
        for ports in container_ports.match_args(p, PortDirection::Destination) {
            out.push(
                Chain::NatPostrouting,
                format!(
                    "-d {} -p {p} {ports} -m conntrack --ctstate DNAT {tag} -j MASQUERADE",
                    target.ip.as_match(),
                ),
            );
        }
    }
    if let Some(subnet) = &target.subnet {
        let family = target.ip.family();
        let itself = Network::new(target.ip.ip(), family.host_prefix());
        let clients = if bridged {
            itself.as_ref()
        } else {
            Some(subnet)
        };
        for line in clients
            .into_iter()
            .flat_map(|c| masquerade_lines(c, &target.ip, &container_ports, r.proto, tag))
        {
            out.push(Chain::NatPostrouting, line);
        }
    }
    push_accepts(out, &target.ip, &container_ports, r.proto, tag);
}
