//! Rules to map elements: the single place that decides what the nftables
//! driver installs. Pure, so it is tested against exact text.
//!
//! One table per family (`table ip natmap`, `table ip6 natmap`) holds a
//! fixed set of chains and rules; every mapping is only elements of its
//! maps, so an add or remove is an element change, never a rule change.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use std::fmt::Write as _;

use crate::model::{DockerRule, Endpoint, Family, IfName, PortList, Proto, Rule, RuleSpec};

use super::netlink;

/// natmap's table name, in both families.
pub const TABLE: &str = "natmap";

/// The maps and sets of natmap's table. Keys are `daddr . l4proto . dport`
/// (with the ingress interface in front for interface-bound mappings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Map {
    /// Static dnat and hairpin, port kept: `daddr . l4proto . dport : target`.
    Dnat,
    /// Interface-bound dnat (prerouting only): `iifname . daddr . l4proto . dport : target`.
    DnatIf,
    /// Docker mappings on one host address: `daddr . l4proto . dport : target . port`.
    Docker,
    /// Docker mappings on every local address: `l4proto . dport : target . port`.
    DockerAny,
    /// Masquerade after DNAT (hairpin, container to its own published port,
    /// remote nodes): a set of `saddr . daddr . l4proto . dport`.
    Masq,
}

impl Map {
    /// Every map, in the order they are declared.
    pub const ALL: [Map; 5] = [
        Map::Dnat,
        Map::DnatIf,
        Map::Docker,
        Map::DockerAny,
        Map::Masq,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            // `dnat`, `masq` and the like are nft keywords.
            Map::Dnat => "dnat_addr",
            Map::DnatIf => "dnat_iif",
            Map::Docker => "docker_addr",
            Map::DockerAny => "docker_any",
            Map::Masq => "masq_dnat",
        }
    }

    /// The declaration body (type and flags) in `family`.
    fn declaration(self, family: Family) -> String {
        let addr = addr_type(family);
        match self {
            Map::Dnat => {
                format!("type {addr} . inet_proto . inet_service : {addr}; flags interval;")
            }
            Map::DnatIf => format!(
                "type ifname . {addr} . inet_proto . inet_service : {addr}; flags interval;"
            ),
            Map::Docker => {
                format!("type {addr} . inet_proto . inet_service : {addr} . inet_service;")
            }
            Map::DockerAny => format!("type inet_proto . inet_service : {addr} . inet_service;"),
            Map::Masq => {
                format!("type {addr} . {addr} . inet_proto . inet_service; flags interval;")
            }
        }
    }

    /// Whether its keys hold intervals (then the kernel wants a key end).
    pub fn interval(self) -> bool {
        matches!(self, Map::Dnat | Map::DnatIf | Map::Masq)
    }

    /// `map` or `set`.
    fn keyword(self) -> &'static str {
        match self {
            Map::Masq => "set",
            _ => "map",
        }
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn nfproto(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The nft family keyword of natmap's table in `family` (`ip`, `ip6`).
pub fn table_family(family: Family) -> &'static str {
    nfproto(family)
}

/// One part of an element's key or value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// An address.
    Addr(IpAddr),
    /// A network (an interval of addresses).
    Net(IpNet),
    /// A layer-4 protocol.
    Proto(Proto),
    /// A port or an inclusive range of ports.
    Ports(u16, u16),
    /// An interface name (already checked to need no quoting).
    Iface(String),
}

impl Part {
    fn text(&self) -> String {
        match self {
            Part::Addr(ip) => ip.to_string(),
            Part::Net(n) => n.to_string(),
            Part::Proto(p) => p.as_str().to_owned(),
            Part::Ports(a, b) if a == b => a.to_string(),
            Part::Ports(a, b) => format!("{a}-{b}"),
            Part::Iface(i) => format!("\"{i}\""),
        }
    }

    /// The register bytes of the part's first (`end` false) or last value.
    fn bytes(&self, end: bool, out: &mut Vec<u8>) {
        let ip = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let raw = match self {
            Part::Addr(a) => ip(*a),
            Part::Net(n) => ip(if end { n.broadcast() } else { n.network() }),
            Part::Proto(Proto::Tcp) => vec![6],
            Part::Proto(Proto::Udp) => vec![17],
            Part::Ports(a, b) => (if end { *b } else { *a }).to_be_bytes().to_vec(),
            Part::Iface(i) => {
                // `ifname` is IFNAMSIZ bytes, zero padded.
                let mut v = i.as_bytes().to_vec();
                v.resize(16, 0);
                v
            }
        };
        netlink::push_part(out, &raw);
    }
}

/// One element: a key and, for a map, a value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Elem {
    /// The key, a concatenation.
    pub key: Vec<Part>,
    /// The value (empty for a set).
    pub value: Vec<Part>,
}

impl Elem {
    /// As nft spells it inside `{ … }`.
    pub fn text(&self) -> String {
        let join = |parts: &[Part]| parts.iter().map(Part::text).collect::<Vec<_>>().join(" . ");
        if self.value.is_empty() {
            join(&self.key)
        } else {
            format!("{} : {}", join(&self.key), join(&self.value))
        }
    }

    /// As the kernel stores it: key, key end for interval maps, value.
    pub fn netlink(&self, interval: bool) -> netlink::Element {
        let mut key = Vec::new();
        let mut end = Vec::new();
        for p in &self.key {
            p.bytes(false, &mut key);
            p.bytes(true, &mut end);
        }
        let data = (!self.value.is_empty()).then(|| {
            let mut v = Vec::new();
            for p in &self.value {
                p.bytes(false, &mut v);
            }
            v
        });
        netlink::Element {
            key,
            key_end: interval.then_some(end),
            data,
        }
    }
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// One element of one map.
pub type Element = (Map, Elem);

/// The elements of one family's table.
pub type Elements = BTreeSet<Element>;

fn elem(key: Vec<Part>, value: Vec<Part>) -> Elem {
    Elem { key, value }
}

/// What the nftables backend cannot do yet: a rule kind or option it would
/// otherwise have to ignore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The rule's id.
    pub id: u64,
    /// What of it is not done.
    pub what: String,
}

/// The elements of `family` for `rules`, or the first rule the backend
/// cannot express yet (never silently left out).
pub fn elements<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    family: Family,
) -> Result<Elements, Unsupported> {
    let mut out = Elements::new();
    for rule in rules {
        render_rule(rule, family, &mut out)?;
    }
    Ok(out)
}

fn render_rule(rule: &Rule, family: Family, out: &mut Elements) -> Result<(), Unsupported> {
    let unsupported = |what: &str| Unsupported {
        id: rule.id,
        what: what.to_owned(),
    };
    match &rule.spec {
        RuleSpec::Dnat(r) => {
            if r.ext_ip.family() != family {
                return Ok(());
            }
            let ext_if = r.ext_if.as_ref().filter(|i| !i.is_any());
            let iface = match ext_if {
                Some(i) => Some(ifname(i).ok_or_else(|| {
                    unsupported(&format!(
                        "dnat --ext-if {}: only plain interface names (letters, digits, _ . - @), no wildcard",
                        i.as_str()
                    ))
                })?),
                None => None,
            };
            let (ext, int) = (Part::Addr(r.ext_ip.ip()), Part::Addr(r.int_ip.ip()));
            for ports in ranges(&r.ports) {
                let key = vec![ext.clone(), Part::Proto(r.proto), ports];
                match &iface {
                    Some(i) => {
                        let mut k = vec![Part::Iface(i.clone())];
                        k.extend(key);
                        out.insert((Map::DnatIf, elem(k, vec![int.clone()])))
                    }
                    None => out.insert((Map::Dnat, elem(key, vec![int.clone()]))),
                };
            }
        }
        RuleSpec::Hairpin(r) => {
            if r.ext_ip.family() != family {
                return Ok(());
            }
            if r.int_net.family() != family {
                return Err(unsupported(
                    "hairpin with an internal network of the other family",
                ));
            }
            let (ext, int) = (Part::Addr(r.ext_ip.ip()), Part::Addr(r.int_ip.ip()));
            let p = Part::Proto(r.proto);
            for ports in ranges(&r.ports) {
                out.insert((
                    Map::Dnat,
                    elem(
                        vec![ext.clone(), p.clone(), ports.clone()],
                        vec![int.clone()],
                    ),
                ));
                out.insert((
                    Map::Masq,
                    elem(
                        vec![network(&r.int_net), int.clone(), p.clone(), ports],
                        vec![],
                    ),
                ));
            }
        }
        RuleSpec::Snat(_) => {
            return Err(unsupported("snat is not done in the nftables backend yet"))
        }
        RuleSpec::PolicyRoute(_) => {}
        RuleSpec::Docker(r) => {
            let target = match family {
                Family::V4 => r.target_v4.as_ref(),
                Family::V6 => r.target_v6.as_ref(),
            };
            let Some(target) = target else { return Ok(()) };
            if r.host_ip.is_some_and(|h| h.family() != family) || target.ip.family() != family {
                return Ok(());
            }
            // A loopback-only publish is the relay's alone: a DNAT of
            // 127.0.0.1 in the output hook would take the host's own
            // connections away from it (and martian-drop them).
            if r.loopback_only() {
                return Ok(());
            }
            render_docker(r, target, family, out);
        }
    }
    Ok(())
}

fn render_docker(r: &DockerRule, target: &Endpoint, family: Family, out: &mut Elements) {
    let p = Part::Proto(r.proto);
    let to = Part::Addr(target.ip.ip());
    // A port range maps port by port (8160→80, 8161→81): a map's value
    // cannot shift a port by an offset, so one element per port.
    for offset in 0..r.port_count.max(1) {
        let (host, container) = (r.host_port + offset, r.container_port + offset);
        let value = vec![to.clone(), Part::Ports(container, container)];
        let host_port = Part::Ports(host, host);
        match &r.host_ip {
            Some(h) => out.insert((
                Map::Docker,
                elem(vec![Part::Addr(h.ip()), p.clone(), host_port], value),
            )),
            None => out.insert((Map::DockerAny, elem(vec![p.clone(), host_port], value))),
        };
    }
    let last = r.container_port + (r.port_count.max(1) - 1);
    let port = Part::Ports(r.container_port, last);
    if r.auto.as_ref().is_some_and(|a| a.masquerade) {
        let any = match family {
            Family::V4 => IpNet::V4(Default::default()),
            Family::V6 => IpNet::V6(Default::default()),
        };
        out.insert((
            Map::Masq,
            elem(
                vec![Part::Net(any), to.clone(), p.clone(), port.clone()],
                vec![],
            ),
        ));
    }
    if let Some(subnet) = &target.subnet {
        out.insert((Map::Masq, elem(vec![network(subnet), to, p, port], vec![])));
    }
}

/// A network as an element part.
fn network(net: &crate::model::Network) -> Part {
    let n: IpNet = net.to_string().parse().expect("a Network prints as a CIDR");
    Part::Net(n.trunc())
}

/// The interface as a quoted nft string, when its name needs no escaping.
/// `IfName` already holds the kernel's rules; nft's syntax is narrower
/// (a quote or brace would end the string or the element).
fn ifname(i: &IfName) -> Option<String> {
    let s = i.as_str();
    let plain = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b));
    plain.then(|| s.to_owned())
}

/// The list's ports as runs of consecutive ports.
fn ranges(ports: &PortList) -> Vec<Part> {
    let mut out = Vec::new();
    let mut iter = ports.iter();
    let Some(mut first) = iter.next() else {
        return out;
    };
    let mut last = first;
    for p in iter {
        if u32::from(p) == u32::from(last) + 1 {
            last = p;
        } else {
            out.push(Part::Ports(first, last));
            first = p;
            last = p;
        }
    }
    out.push(Part::Ports(first, last));
    out
}

/// The whole table of `family` holding `elements`, created from nothing in
/// one transaction (the table is removed first if it exists: `add` then
/// `delete` so the input works whether or not it does).
pub fn full(family: Family, elements: &Elements) -> String {
    let mut s = teardown(family);
    s.push_str(&table(family, elements));
    s
}

/// The table definition alone (`save --export`).
pub fn table(family: Family, elements: &Elements) -> String {
    let f = nfproto(family);
    let loopback = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1",
    };
    let mut s = format!("table {f} {TABLE} {{\n");
    for map in Map::ALL {
        let _ = writeln!(s, "\t{} {} {{", map.keyword(), map.name());
        let _ = writeln!(s, "\t\t{}", map.declaration(family));
        let items: Vec<String> = elements
            .iter()
            .filter(|(m, _)| *m == map)
            .map(|(_, e)| e.text())
            .collect();
        if !items.is_empty() {
            let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(", "));
        }
        s.push_str("\t}\n");
    }
    // `fib daddr type local` guards every DNAT: a rule matches only while
    // its address is this host's (fail closed, DESIGN.md §9), the same as
    // iptables' `--dst-type LOCAL` on `--allow-nonlocal` rules and Docker
    // mappings without a host address.
    let key = format!("{f} daddr . meta l4proto . th dport");
    let pre = [
        format!("fib daddr type local dnat to iifname . {key} map @dnat_iif"),
        format!("fib daddr type local dnat to {key} map @dnat_addr"),
        format!("fib daddr type local dnat to {key} map @docker_addr"),
        "fib daddr type local dnat to meta l4proto . th dport map @docker_any".to_owned(),
    ];
    // The host's own traffic has no ingress interface; its loopback
    // traffic is the relay's (DESIGN.md §4).
    let output = [
        format!("fib daddr type local dnat to {key} map @dnat_addr"),
        format!("fib daddr type local dnat to {key} map @docker_addr"),
        format!(
            "{f} daddr != {loopback} fib daddr type local dnat to meta l4proto . th dport map @docker_any"
        ),
    ];
    let post = [format!(
        "ct status dnat {f} saddr . {f} daddr . meta l4proto . th dport @masq_dnat masquerade"
    )];
    for (name, hook, prio, rules) in [
        ("prerouting", "prerouting", "dstnat", &pre[..]),
        ("output", "output", "-100", &output[..]),
        ("postrouting", "postrouting", "srcnat", &post[..]),
    ] {
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook {hook} priority {prio}; policy accept;"
        );
        for r in rules {
            let _ = writeln!(s, "\t\tmeta l4proto {{ tcp, udp }} {r}");
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The number of rules each chain holds, as [`table`] writes them.
pub const CHAIN_RULES: [(&str, usize); 3] = [("prerouting", 4), ("output", 3), ("postrouting", 1)];

/// Removes natmap's table of `family` whether or not it exists.
pub fn teardown(family: Family) -> String {
    let f = nfproto(family);
    format!("add table {f} {TABLE}\ndelete table {f} {TABLE}\n")
}

/// The element changes from `applied` to `desired`, one transaction;
/// `None` when they are equal.
pub fn diff(family: Family, applied: &Elements, desired: &Elements) -> Option<String> {
    let f = nfproto(family);
    let mut s = String::new();
    for (map, e) in applied.difference(desired) {
        let _ = writeln!(s, "delete element {f} {TABLE} {} {{ {e} }}", map.name());
    }
    for (map, e) in desired.difference(applied) {
        let _ = writeln!(s, "add element {f} {TABLE} {} {{ {e} }}", map.name());
    }
    (!s.is_empty()).then_some(s)
}

/// The element changes from `applied` to `desired` as netlink set-element
/// messages: deletes first, so an element whose value changed is replaced.
pub fn netlink_diff(applied: &Elements, desired: &Elements) -> Vec<netlink::SetChange> {
    let mut out: Vec<netlink::SetChange> = Vec::new();
    for (add, from, to) in [(false, applied, desired), (true, desired, applied)] {
        for map in Map::ALL {
            let elements: Vec<netlink::Element> = from
                .difference(to)
                .filter(|(m, _)| *m == map)
                .map(|(_, e)| e.netlink(map.interval()))
                .collect();
            if !elements.is_empty() {
                out.push(netlink::SetChange {
                    set: map.name(),
                    add,
                    elements,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DnatRule;

    fn dnat(id: u64, ext: &str, int: &str, ports: &str, ext_if: Option<&str>) -> Rule {
        Rule {
            id,
            spec: RuleSpec::Dnat(DnatRule {
                ext_ip: ext.parse().unwrap(),
                int_ip: int.parse().unwrap(),
                ports: ports.parse().unwrap(),
                proto: Proto::Udp,
                ext_if: ext_if.map(|i| i.parse().unwrap()),
                allow_nonlocal: false,
            }),
        }
    }

    #[test]
    fn a_dnat_is_one_element_per_port_range() {
        let rules = [dnat(1, "192.0.2.1", "10.0.0.2", "25,465,8000-8010", None)];
        let e = elements(&rules, Family::V4).unwrap();
        let got: Vec<String> = e.iter().map(|(_, s)| s.text()).collect();
        assert_eq!(
            got,
            [
                "192.0.2.1 . udp . 25 : 10.0.0.2",
                "192.0.2.1 . udp . 465 : 10.0.0.2",
                "192.0.2.1 . udp . 8000-8010 : 10.0.0.2"
            ]
        );
        assert!(elements(&rules, Family::V6).unwrap().is_empty());
    }

    fn docker(id: u64, fields: serde_json::Value) -> Rule {
        let mut rule = serde_json::json!({"name": "web", "container_port": 80,
            "target_v4": {"ip": "172.17.0.2", "subnet": "172.17.0.0/16"}});
        for (k, v) in fields.as_object().unwrap() {
            rule[k] = v.clone();
        }
        Rule {
            id,
            spec: RuleSpec::Docker(serde_json::from_value(rule).unwrap()),
        }
    }

    #[test]
    fn a_docker_range_maps_port_by_port_and_loopback_only_renders_nothing() {
        let range = docker(1, serde_json::json!({"host_port": 8160, "port_count": 2}));
        let e = elements(&[range], Family::V4).unwrap();
        let got: Vec<String> = e.iter().map(|(_, s)| s.text()).collect();
        assert_eq!(
            got,
            [
                "tcp . 8160 : 172.17.0.2 . 80",
                "tcp . 8161 : 172.17.0.2 . 81",
                "172.17.0.0/16 . 172.17.0.2 . tcp . 80-81"
            ]
        );
        let private = docker(
            2,
            serde_json::json!({"host_port": 8152, "host_ip": "127.0.0.1"}),
        );
        assert!(elements(&[private], Family::V4).unwrap().is_empty());
    }

    #[test]
    fn an_interface_bound_dnat_goes_to_its_own_map() {
        let rules = [dnat(1, "2001:db8::1", "2001:db8:1::2", "53", Some("eth0"))];
        let e = elements(&rules, Family::V6).unwrap();
        let got: Vec<(Map, String)> = e.iter().map(|(m, s)| (*m, s.text())).collect();
        assert_eq!(
            got,
            [(
                Map::DnatIf,
                "\"eth0\" . 2001:db8::1 . udp . 53 : 2001:db8:1::2".to_owned()
            )]
        );
    }

    #[test]
    fn a_wildcard_interface_is_refused_not_ignored() {
        let rules = [dnat(7, "192.0.2.1", "10.0.0.2", "25", Some("eth+"))];
        let err = elements(&rules, Family::V4).unwrap_err();
        assert_eq!(err.id, 7);
        assert!(err.what.contains("wildcard"), "{err:?}");
    }

    #[test]
    fn a_change_is_element_lines_only() {
        let a = elements(&[dnat(1, "192.0.2.1", "10.0.0.2", "25", None)], Family::V4).unwrap();
        let b = elements(&[dnat(2, "192.0.2.1", "10.0.0.3", "26", None)], Family::V4).unwrap();
        assert_eq!(
            diff(Family::V4, &a, &b).unwrap(),
            "delete element ip natmap dnat_addr { 192.0.2.1 . udp . 25 : 10.0.0.2 }\n\
             add element ip natmap dnat_addr { 192.0.2.1 . udp . 26 : 10.0.0.3 }\n"
        );
        assert_eq!(diff(Family::V4, &a, &a), None);
    }

    #[test]
    fn ranges_group_consecutive_ports() {
        let p: PortList = "1,2,3,5,7-9".parse().unwrap();
        let text: Vec<String> = ranges(&p).iter().map(Part::text).collect();
        assert_eq!(text, ["1-3", "5", "7-9"]);
    }
}
