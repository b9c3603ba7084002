//! Rules to chain lines: the single place that decides what natmap installs.

use crate::model::{
    Family, HostIp, IfName, Network, PortDirection, PortList, Proto, Rule, RuleSpec,
};

use super::{Chain, Ruleset};

/// Renders the desired ruleset of the given rules, in id order.
///
/// Rules that cannot be active (their ports are held by someone else) must
/// already be left out by the caller.
pub fn desired<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Ruleset {
    let mut rules: Vec<&Rule> = rules.into_iter().collect();
    rules.sort_by_key(|r| r.id);
    let mut set = Ruleset::default();
    for rule in rules {
        render_rule(rule, &mut set);
    }
    set
}

/// The comment every natmap line carries, so `iptables -S` shows its owner.
/// Built from a kind name and a number only, so it never needs quoting.
pub fn comment(kind: &str, id: u64) -> String {
    format!("-m comment --comment natmap:{kind}:{id}")
}

fn render_rule(rule: &Rule, set: &mut Ruleset) {
    let family = rule.spec.family();
    let out = set.family_mut(family);
    let tag = comment(rule.spec.kind(), rule.id);
    match &rule.spec {
        RuleSpec::Dnat(r) => {
            let inbound = Forward {
                ext_ip: &r.ext_ip,
                int_ip: &r.int_ip,
                ports: &r.ports,
                proto: r.proto,
                tag: &tag,
            };
            for line in inbound.dnat_lines(r.ext_if.as_ref()) {
                out.push(Chain::NatPrerouting, line);
            }
            // Traffic the host itself sends to the external address has no
            // ingress interface, so an interface-bound forward does not cover it.
            if r.ext_if.is_none() {
                for line in inbound.dnat_lines(None) {
                    out.push(Chain::NatOutput, line);
                }
            }
            for line in inbound.accept_lines() {
                out.push(Chain::FilterForward, line);
            }
        }
        RuleSpec::Hairpin(r) => {
            let inbound = Forward {
                ext_ip: &r.ext_ip,
                int_ip: &r.int_ip,
                ports: &r.ports,
                proto: r.proto,
                tag: &tag,
            };
            for line in inbound.dnat_lines(None) {
                out.push(Chain::NatPrerouting, line.clone());
                out.push(Chain::NatOutput, line);
            }
            for line in inbound.masquerade_lines(&r.int_net) {
                out.push(Chain::NatPostrouting, line);
            }
            for line in inbound.accept_lines() {
                out.push(Chain::FilterForward, line);
            }
        }
        RuleSpec::Snat(r) => {
            out.push(
                Chain::NatPostrouting,
                format!(
                    "-s {} -o {} {tag} -j SNAT --to-source {}",
                    r.source, r.ext_if, r.ext_ip
                ),
            );
        }
    }
    debug_assert!(family == Family::V4 || family == Family::V6);
}

/// The pieces shared by every rule that forwards ports to an internal host.
struct Forward<'a> {
    ext_ip: &'a HostIp,
    int_ip: &'a HostIp,
    ports: &'a PortList,
    proto: Proto,
    tag: &'a str,
}

impl Forward<'_> {
    /// `-d E -p P <ports> -j DNAT --to-destination I` (the port is kept).
    fn dnat_lines(&self, ext_if: Option<&IfName>) -> Vec<String> {
        let iface = ext_if.map(|i| format!(" -i {i}")).unwrap_or_default();
        self.ports
            .match_args(self.proto.as_str(), PortDirection::Destination)
            .into_iter()
            .map(|ports| {
                format!(
                    "-d {}{iface} -p {} {ports} {} -j DNAT --to-destination {}",
                    self.ext_ip.as_match(),
                    self.proto,
                    self.tag,
                    self.int_ip
                )
            })
            .collect()
    }

    /// FORWARD ACCEPT for both directions of DNATed connections to the target,
    /// so forwarding works on hosts whose FORWARD policy is DROP (every Docker
    /// host). `--ctstate DNAT` keeps it from opening the target to anything
    /// that natmap did not forward.
    fn accept_lines(&self) -> Vec<String> {
        let proto = self.proto.as_str();
        let mut lines = Vec::new();
        for (addr, dir) in [
            ("-d", PortDirection::Destination),
            ("-s", PortDirection::Source),
        ] {
            for ports in self.ports.match_args(proto, dir) {
                lines.push(format!(
                    "{addr} {} -p {proto} {ports} -m conntrack --ctstate DNAT {} -j ACCEPT",
                    self.int_ip.as_match(),
                    self.tag
                ));
            }
        }
        lines
    }

    /// Hairpin: clients on the internal network reach the target through the
    /// external address, so the target's reply must come back through the
    /// router to be un-DNATed; masquerading only that network's clients keeps
    /// outside clients' addresses intact.
    fn masquerade_lines(&self, int_net: &Network) -> Vec<String> {
        self.ports
            .match_args(self.proto.as_str(), PortDirection::Destination)
            .into_iter()
            .map(|ports| {
                format!(
                    "-s {int_net} -d {} -p {} {ports} -m conntrack --ctstate DNAT {} -j MASQUERADE",
                    self.int_ip.as_match(),
                    self.proto,
                    self.tag
                )
            })
            .collect()
    }
}
