//! Rules to map elements: the single place that decides what the nftables
//! driver installs. Pure, so it is tested against exact text.
//!
//! One table per family (`table ip natmap`, `table ip6 natmap`) holds a
//! fixed set of chains and rules; every mapping is only elements of its
//! maps, so an add or remove is an element change, never a rule change.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use std::fmt::Write as _;

use crate::model::{
    DnatRule, DockerRule, Endpoint, Family, HairpinRule, IfName, PortList, Proto, Rule, RuleId,
    RuleSpec, SnatRule,
};

use super::marks::Marks;

use super::netlink;

/// natmap's table name, in both families.
pub const TABLE: &str = "natmap";

/// The maps and sets of natmap's table. Keys are `daddr . l4proto . dport`
/// (with the ingress interface in front for interface-bound mappings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Map {
    /// Static dnat and hairpin of a port range, port kept:
    /// `daddr . l4proto . dport-range : target`.
    Dnat,
    /// The same for a single port, in a hash map: an element's removal
    /// costs the same at any N (the kernel's interval sets of
    /// concatenations take time linear in their size to remove one).
    DnatPort,
    /// Interface-bound dnat (prerouting only): `iifname . daddr . l4proto . dport : target`.
    DnatIf,
    /// Docker mappings on one host address: `daddr . l4proto . dport : target . port`.
    Docker,
    /// Docker mappings on every local address: `l4proto . dport : target . port`.
    DockerAny,
    /// Masquerade after DNAT (hairpin, container to its own published port,
    /// remote nodes): a set of `saddr . daddr . l4proto . dport`.
    Masq,
    /// Source NAT: `oifname . saddr : new source`.
    Snat,
    /// `snat --forward`: the connections of `oifname . saddr` are marked,
    /// so `DOCKER-USER` accepts them and their replies.
    SnatFwd,
    /// Per-mapping packet and byte counters of forwarded traffic: a set of
    /// the targets `daddr . l4proto . dport-range` (replies: the source side).
    Fwd,
    /// The same for a single port, in a hash set.
    FwdPort,
}

impl Map {
    /// Every map, in the order they are declared.
    pub const ALL: [Map; 10] = [
        Map::Dnat,
        Map::DnatPort,
        Map::DnatIf,
        Map::Docker,
        Map::DockerAny,
        Map::Masq,
        Map::Snat,
        Map::SnatFwd,
        Map::Fwd,
        Map::FwdPort,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            // `dnat`, `masq` and the like are nft keywords.
            Map::Dnat => "dnat_addr",
            Map::DnatPort => "dnat_port",
            Map::DnatIf => "dnat_iif",
            Map::Docker => "docker_addr",
            Map::DockerAny => "docker_any",
            Map::Masq => "masq_dnat",
            Map::Snat => "snat_out",
            Map::SnatFwd => "snat_fwd",
            Map::Fwd => "fwd_count",
            Map::FwdPort => "fwd_port",
        }
    }

    /// The declaration body (type, flags, counters) in `family`.
    fn declaration(self, family: Family) -> String {
        let body = self.type_and_flags(family);
        if self.counted() {
            // Every element gets a counter, also one added over netlink
            // (the kernel gives it the set's expressions).
            format!("{body} counter;")
        } else {
            body
        }
    }

    /// Whether its elements count packets and bytes (`ls -v`, metrics).
    pub fn counted(self) -> bool {
        !matches!(self, Map::Masq | Map::SnatFwd)
    }

    /// Whether a lookup in it is a NAT of the connection's first packet
    /// (then every connection passes it twice: see [`table`]).
    pub fn translates(self) -> bool {
        !matches!(self, Map::Masq | Map::SnatFwd | Map::Fwd | Map::FwdPort)
    }

    fn type_and_flags(self, family: Family) -> String {
        let addr = addr_type(family);
        match self {
            Map::Dnat => {
                format!("type {addr} . inet_proto . inet_service : {addr}; flags interval;")
            }
            Map::DnatPort => format!("type {addr} . inet_proto . inet_service : {addr};"),
            Map::FwdPort => format!("type {addr} . inet_proto . inet_service;"),
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
            Map::Snat => format!("type ifname . {addr} : {addr}; flags interval;"),
            Map::SnatFwd => format!("type ifname . {addr}; flags interval;"),
            Map::Fwd => format!("type {addr} . inet_proto . inet_service; flags interval;"),
        }
    }

    /// Whether its keys hold intervals (then the kernel wants a key end).
    pub fn interval(self) -> bool {
        !matches!(
            self,
            Map::Docker | Map::DockerAny | Map::DnatPort | Map::FwdPort
        )
    }

    /// `map` or `set`.
    fn keyword(self) -> &'static str {
        match self {
            Map::Masq | Map::SnatFwd | Map::Fwd | Map::FwdPort => "set",
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
    /// An interface name (already checked to need no quoting); a trailing
    /// `*` is nft's wildcard (iptables' `eth+`).
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
                // `ifname` is IFNAMSIZ bytes, zero padded; a wildcard is the
                // interval of every name with its prefix (as nft stores it).
                let (name, pad) = match i.strip_suffix('*') {
                    Some(prefix) if end => (prefix, 0xff),
                    Some(prefix) => (prefix, 0),
                    None => (i.as_str(), 0),
                };
                let mut v = name.as_bytes().to_vec();
                v.resize(16, pad);
                v
            }
        };
        netlink::push_part(out, &raw);
    }

    /// The part as `nft -j` prints it, normalised (see [`json_key`]):
    /// addresses as Rust prints them, a full-length network as its
    /// address, a range `A-B`, an interface unquoted.
    pub fn norm(&self) -> String {
        match self {
            Part::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
            Part::Iface(i) => i.clone(),
            other => other.text(),
        }
    }
}

/// An element key of `nft -j list` output in the form of [`Elem::norm`]:
/// `{"concat": [..]}` parts joined by ` . `, a `{"prefix"}` as `A/L`, a
/// `{"range"}` as `A-B`. `None` for anything else.
pub fn json_key(v: &serde_json::Value) -> Option<String> {
    fn part(v: &serde_json::Value) -> Option<String> {
        Some(match v {
            serde_json::Value::String(s) => match s.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) => s.clone(),
            },
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Object(o) => {
                if let Some(p) = o.get("prefix") {
                    let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
                    format!("{addr}/{}", p.get("len")?.as_u64()?)
                } else if let Some(r) = o.get("range").and_then(|r| r.as_array()) {
                    let (a, b) = (part(r.first()?)?, part(r.get(1)?)?);
                    if a == b {
                        a
                    } else {
                        format!("{a}-{b}")
                    }
                } else {
                    return None;
                }
            }
            _ => return None,
        })
    }
    match v.get("concat").and_then(|c| c.as_array()) {
        Some(parts) => Some(
            parts
                .iter()
                .map(part)
                .collect::<Option<Vec<_>>>()?
                .join(" . "),
        ),
        None => part(v),
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

impl Elem {
    /// The key normalised as [`json_key`] reads it back from the kernel.
    pub fn norm(&self) -> String {
        self.key
            .iter()
            .map(Part::norm)
            .collect::<Vec<_>>()
            .join(" . ")
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

/// Which rule each counted element counts for, by map and normalised key
/// ([`Elem::norm`]): the first rule (lowest id) that renders it, as the
/// first of equal iptables lines is the one that counts.
pub type Owners = HashMap<(Map, String), RuleId>;

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

/// Elements that more than one rule renders, with how many rules beyond the
/// first render them (two mappings to one target share its forwarding
/// counter): an element leaves the kernel with the last rule that renders
/// it.
pub type Shared = HashMap<Element, u32>;

/// [`elements`], and which of them more than one rule renders.
pub fn counted<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    family: Family,
) -> Result<(Elements, Shared), Unsupported> {
    let mut out = Elements::new();
    let mut shared = Shared::new();
    let mut mine = Elements::new();
    for rule in rules {
        render_rule(rule, family, &mut mine)?;
        for e in std::mem::take(&mut mine) {
            if out.contains(&e) {
                *shared.entry(e).or_insert(0) += 1;
            } else {
                out.insert(e);
            }
        }
    }
    Ok((out, shared))
}

/// The elements one rule renders in `family`.
pub fn of_rule(rule: &Rule, family: Family) -> Result<Elements, Unsupported> {
    let mut out = Elements::new();
    render_rule(rule, family, &mut out)?;
    Ok(out)
}

/// [`elements`] and the owner of each counted element (for reading
/// counters: the per-change path renders no owners).
pub fn rendered<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    family: Family,
) -> Result<(Elements, Owners), Unsupported> {
    let mut out = Elements::new();
    let mut owners = Owners::new();
    let mut mine = Elements::new();
    for rule in rules {
        render_rule(rule, family, &mut mine)?;
        for (map, e) in &mine {
            if map.counted() {
                owners.entry((*map, e.norm())).or_insert(rule.id);
            }
        }
        // Inserted one by one: `append` merges the whole of `out` again
        // for every rule (quadratic in N).
        out.extend(std::mem::take(&mut mine));
    }
    Ok((out, owners))
}

fn render_rule(rule: &Rule, family: Family, out: &mut Elements) -> Result<(), Unsupported> {
    let unsupported = |what: &str| Unsupported {
        id: rule.id,
        what: what.to_owned(),
    };
    match &rule.spec {
        RuleSpec::Dnat(r) => render_dnat(r, family, out).map_err(|w| unsupported(&w)),
        RuleSpec::Hairpin(r) => render_hairpin(r, family, out).map_err(|w| unsupported(&w)),
        RuleSpec::Snat(r) => render_snat(r, family, out).map_err(|w| unsupported(&w)),
        RuleSpec::PolicyRoute(_) => Ok(()),
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
            if !r.loopback_only() {
                render_docker(r, target, family, out);
            }
            Ok(())
        }
    }
}

/// A `dnat`'s elements: the translation (per ingress interface when it
/// names one) and the forwarding counter, per run of ports. `Err`: what the
/// backend cannot express.
fn render_dnat(r: &DnatRule, family: Family, out: &mut Elements) -> Result<(), String> {
    if r.ext_ip.family() != family {
        return Ok(());
    }
    let iface = match r.ext_if.as_ref().filter(|i| !i.is_any()) {
        Some(i) => Some(ifname(i).ok_or_else(|| {
            format!(
                "dnat --ext-if {}: only interface names of letters, digits, _ . - @ and a trailing +",
                i.as_str()
            )
        })?),
        None => None,
    };
    let (ext, int) = (Part::Addr(r.ext_ip.ip()), Part::Addr(r.int_ip.ip()));
    for ports in ranges(&r.ports) {
        let p = Part::Proto(r.proto);
        out.insert(fwd(vec![int.clone(), p.clone(), ports.clone()]));
        let key = vec![ext.clone(), p, ports];
        match &iface {
            Some(i) => {
                let mut k = vec![Part::Iface(i.clone())];
                k.extend(key);
                out.insert((Map::DnatIf, elem(k, vec![int.clone()])))
            }
            None => out.insert(dnat(key, int.clone())),
        };
    }
    Ok(())
}

/// A `hairpin`'s elements: a dnat's, and the masquerade of its internal
/// network's connections to the target.
fn render_hairpin(r: &HairpinRule, family: Family, out: &mut Elements) -> Result<(), String> {
    if r.ext_ip.family() != family {
        return Ok(());
    }
    if r.int_net.family() != family {
        return Err("hairpin with an internal network of the other family".into());
    }
    let (ext, int) = (Part::Addr(r.ext_ip.ip()), Part::Addr(r.int_ip.ip()));
    let p = Part::Proto(r.proto);
    for ports in ranges(&r.ports) {
        out.insert(dnat(
            vec![ext.clone(), p.clone(), ports.clone()],
            int.clone(),
        ));
        out.insert(fwd(vec![int.clone(), p.clone(), ports.clone()]));
        let masq = vec![network(&r.int_net), int.clone(), p.clone(), ports];
        out.insert((Map::Masq, elem(masq, vec![])));
    }
    Ok(())
}

/// A `snat`'s elements: the new source by interface and source, and with
/// `--forward` the mark that lets its connections through `DOCKER-USER`.
fn render_snat(r: &SnatRule, family: Family, out: &mut Elements) -> Result<(), String> {
    if r.ext_ip.family() != family {
        return Ok(());
    }
    if r.source.family() != family {
        return Err("snat of a source of the other family".into());
    }
    let iface = ifname(&r.ext_if).ok_or_else(|| {
        format!(
            "snat --ext-if {}: only interface names of letters, digits, _ . - @ and a trailing + \
             (nft has no wildcard for every interface)",
            r.ext_if.as_str()
        )
    })?;
    let key = vec![Part::Iface(iface), network(&r.source)];
    out.insert((
        Map::Snat,
        elem(key.clone(), vec![Part::Addr(r.ext_ip.ip())]),
    ));
    if r.forward {
        out.insert((Map::SnatFwd, elem(key, vec![])));
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
    out.insert(fwd(vec![to.clone(), p.clone(), port.clone()]));
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

/// Whether a key's last part (the port) is one port, not a range.
fn single_port(key: &[Part]) -> bool {
    matches!(key.last(), Some(Part::Ports(a, b)) if a == b)
}

/// A dnat element: the hash map for one port, the interval map for a range.
fn dnat(key: Vec<Part>, target: Part) -> Element {
    let map = if single_port(&key) {
        Map::DnatPort
    } else {
        Map::Dnat
    };
    (map, elem(key, vec![target]))
}

/// A counter element of a target: hash set for one port, interval set for a range.
fn fwd(key: Vec<Part>) -> Element {
    let map = if single_port(&key) {
        Map::FwdPort
    } else {
        Map::Fwd
    };
    (map, elem(key, vec![]))
}

/// A network as an element part.
fn network(net: &crate::model::Network) -> Part {
    let n: IpNet = net.to_string().parse().expect("a Network prints as a CIDR");
    Part::Net(n.trunc())
}

/// The interface as nft spells it inside quotes, when its name needs no
/// escaping: `IfName` already holds the kernel's rules; nft's syntax is
/// narrower (a quote or brace would end the string or the element).
/// iptables' wildcard `eth+` is nft's `eth*`; the bare `+` (every
/// interface) has no nft spelling.
fn ifname(i: &IfName) -> Option<String> {
    let s = i.as_str();
    let (name, wildcard) = match s.strip_suffix('+') {
        Some(prefix) => (prefix, true),
        None => (s, false),
    };
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b));
    plain.then(|| {
        if wildcard {
            format!("{name}*")
        } else {
            name.to_owned()
        }
    })
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
pub fn full(family: Family, elements: &Elements, marks: &Marks) -> String {
    let mut s = teardown(family);
    s.push_str(&table(family, elements, marks));
    s
}

/// The table definition alone (`save --export`).
///
/// Every NAT rule looks its key up first and translates through the same
/// map after: the lookup guards the connection mark (only connections
/// natmap translates get it), and it makes every translated connection
/// pass its element's counter exactly twice (see [`Map::translates`]).
pub fn table(family: Family, elements: &Elements, marks: &Marks) -> String {
    let f = nfproto(family);
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
    for (name, hook, prio, rules) in chains(family, marks) {
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(
            s,
            "\t\ttype {} hook {hook} priority {prio}; policy accept;",
            if name == "forward" { "filter" } else { "nat" }
        );
        for r in rules {
            let _ = writeln!(s, "\t\t{r}");
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The chains of natmap's table: (name, hook, priority, rules).
// Long because it is the table's whole rule set, hook by hook: read top to
// bottom, it is the table it renders.
fn chains(
    family: Family,
    marks: &Marks,
) -> Vec<(&'static str, &'static str, &'static str, Vec<String>)> {
    let f = nfproto(family);
    let loopback = match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1",
    };
    let l4 = "meta l4proto { tcp, udp }";
    let key = format!("{f} daddr . meta l4proto . th dport");
    let any = "meta l4proto . th dport";
    let iif = format!("iifname . {key}");
    // `fib daddr type local` guards every DNAT: a rule matches only while
    // its address is this host's (fail closed, DESIGN.md §9), the same as
    // iptables' `--dst-type LOCAL` on `--allow-nonlocal` rules and Docker
    // mappings without a host address.
    let ct = marks.ct.set("ct mark");
    let pre = [
        (&iif, "dnat_iif"),
        (&key, "dnat_addr"),
        (&key, "dnat_port"),
        (&key, "docker_addr"),
    ]
    .into_iter()
    .map(|(k, m)| format!("{l4} fib daddr type local {k} @{m} {ct} dnat to {k} map @{m}"))
    .chain([format!(
        "{l4} fib daddr type local {any} @docker_any {ct} dnat to {any} map @docker_any"
    )])
    .collect();
    // The host's own traffic has no ingress interface and is not
    // forwarded (no mark); its loopback traffic is the relay's (DESIGN.md §4).
    let output = [(&key, "dnat_addr"), (&key, "dnat_port"), (&key, "docker_addr")]
        .into_iter()
        .map(|(k, m)| format!("{l4} fib daddr type local {k} @{m} dnat to {k} map @{m}"))
        .chain([format!(
            "{l4} {f} daddr != {loopback} fib daddr type local {any} @docker_any dnat to {any} map @docker_any"
        )])
        .collect();
    let snat_key = format!("oifname . {f} saddr");
    let post = vec![
        format!("{l4} ct status dnat {f} saddr . {f} daddr . meta l4proto . th dport @masq_dnat masquerade"),
        format!("{snat_key} @snat_out snat to {snat_key} map @snat_out"),
    ];
    // Before Docker's and iptables' filter (priority 0): marks the
    // connections of `snat --forward`, marks the packets of natmap's
    // connections for Docker 29, counts them per mapping.
    let ours = marks.ct.matches("ct mark");
    let mut forward = vec![format!("{snat_key} @snat_fwd {ct}")];
    if let Some(fw) = marks.fw {
        forward.push(format!("{ours} {}", fw.set("meta mark")));
    }
    for set in ["fwd_port", "fwd_count"] {
        forward.push(format!(
            "{l4} {ours} ct direction original {f} daddr . meta l4proto . th dport @{set}"
        ));
        forward.push(format!(
            "{l4} {ours} ct direction reply {f} saddr . meta l4proto . th sport @{set}"
        ));
    }
    vec![
        ("prerouting", "prerouting", "dstnat", pre),
        ("output", "output", "-100", output),
        ("postrouting", "postrouting", "srcnat", post),
        ("forward", "forward", "-10", forward),
    ]
}

/// The number of rules each chain holds, as [`table`] writes them.
pub fn chain_rules(marks: &Marks) -> Vec<(&'static str, usize)> {
    chains(Family::V4, marks)
        .into_iter()
        .map(|(name, _, _, rules)| (name, rules.len()))
        .collect()
}

/// Removes natmap's table of `family` whether or not it exists.
pub fn teardown(family: Family) -> String {
    let f = nfproto(family);
    format!("add table {f} {TABLE}\ndelete table {f} {TABLE}\n")
}

/// The element changes from `applied` to `desired`, one transaction;
/// `None` when they are equal.
pub fn diff(family: Family, applied: &Elements, desired: &Elements) -> Option<String> {
    let gone: Elements = applied.difference(desired).cloned().collect();
    let new: Elements = desired.difference(applied).cloned().collect();
    changes_text(family, &gone, &new)
}

/// The element changes from `applied` to `desired` as netlink set-element
/// messages: deletes first, so an element whose value changed is replaced.
pub fn netlink_diff(applied: &Elements, desired: &Elements) -> Vec<netlink::SetChange> {
    let gone: Elements = applied.difference(desired).cloned().collect();
    let new: Elements = desired.difference(applied).cloned().collect();
    netlink_changes(&gone, &new)
}

/// Deleting `gone` and adding `new` as netlink set-element messages, one
/// per map: deletes first, so an element whose value changed is replaced.
pub fn netlink_changes(gone: &Elements, new: &Elements) -> Vec<netlink::SetChange> {
    let mut out: Vec<netlink::SetChange> = Vec::new();
    for (add, elements) in [(false, gone), (true, new)] {
        for map in Map::ALL {
            let elements: Vec<netlink::Element> = elements
                .iter()
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

/// Deleting `gone` and adding `new` as `nft -f` text (dry run).
pub fn changes_text(family: Family, gone: &Elements, new: &Elements) -> Option<String> {
    let f = nfproto(family);
    let mut s = String::new();
    for (map, e) in gone {
        let _ = writeln!(s, "delete element {f} {TABLE} {} {{ {e} }}", map.name());
    }
    for (map, e) in new {
        let _ = writeln!(s, "add element {f} {TABLE} {} {{ {e} }}", map.name());
    }
    (!s.is_empty()).then_some(s)
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

    /// The elements that translate (not the forward accepts), as text.
    fn translating(e: &Elements) -> Vec<(Map, String)> {
        e.iter()
            .filter(|(m, _)| m.translates())
            .map(|(m, s)| (*m, s.text()))
            .collect()
    }

    #[test]
    fn a_dnat_is_one_element_per_port_range() {
        let rules = [dnat(1, "192.0.2.1", "10.0.0.2", "25,465,8000-8010", None)];
        let e = elements(&rules, Family::V4).unwrap();
        let got = translating(&e);
        assert_eq!(
            got,
            [
                (
                    Map::Dnat,
                    "192.0.2.1 . udp . 8000-8010 : 10.0.0.2".to_owned()
                ),
                (Map::DnatPort, "192.0.2.1 . udp . 25 : 10.0.0.2".to_owned()),
                (Map::DnatPort, "192.0.2.1 . udp . 465 : 10.0.0.2".to_owned()),
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
                "172.17.0.0/16 . 172.17.0.2 . tcp . 80-81",
                "172.17.0.2 . tcp . 80-81"
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
        let got = translating(&e);
        assert_eq!(
            got,
            [(
                Map::DnatIf,
                "\"eth0\" . 2001:db8::1 . udp . 53 : 2001:db8:1::2".to_owned()
            )]
        );
    }

    #[test]
    fn a_wildcard_interface_is_an_interval_of_names() {
        let rules = [dnat(7, "192.0.2.1", "10.0.0.2", "25", Some("eth+"))];
        let e = elements(&rules, Family::V4).unwrap();
        let (_, iif) = e.iter().find(|(m, _)| *m == Map::DnatIf).unwrap();
        assert_eq!(iif.text(), "\"eth*\" . 192.0.2.1 . udp . 25 : 10.0.0.2");
        assert_eq!(iif.norm(), "eth* . 192.0.2.1 . udp . 25");
        let nl = iif.netlink(true);
        assert_eq!(&nl.key[..4], b"eth\0");
        assert_eq!(&nl.key_end.as_ref().unwrap()[..4], b"eth\xff");
        // Every interface has no nft spelling: refused, never ignored.
        let snat = Rule {
            id: 8,
            spec: RuleSpec::Snat(crate::model::SnatRule {
                source: "10.0.0.0/24".parse().unwrap(),
                ext_if: "+".parse().unwrap(),
                ext_ip: "192.0.2.1".parse().unwrap(),
                forward: false,
            }),
        };
        let err = elements(&[snat], Family::V4).unwrap_err();
        assert_eq!(err.id, 8);
        assert!(err.what.contains("wildcard"), "{err:?}");
    }

    #[test]
    fn snat_is_one_element_and_forward_marks_it() {
        let rule = |id, forward| Rule {
            id,
            spec: RuleSpec::Snat(crate::model::SnatRule {
                source: "10.0.0.0/24".parse().unwrap(),
                ext_if: "eth+".parse().unwrap(),
                ext_ip: "192.0.2.1".parse().unwrap(),
                forward,
            }),
        };
        let (e, owners) = rendered(&[rule(3, true)], Family::V4).unwrap();
        let got: Vec<(Map, String)> = e.iter().map(|(m, s)| (*m, s.text())).collect();
        assert_eq!(
            got,
            [
                (Map::Snat, "\"eth*\" . 10.0.0.0/24 : 192.0.2.1".to_owned()),
                (Map::SnatFwd, "\"eth*\" . 10.0.0.0/24".to_owned())
            ]
        );
        assert_eq!(owners[&(Map::Snat, "eth* . 10.0.0.0/24".to_owned())], 3);
        assert!(elements(&[rule(3, false)], Family::V6).unwrap().is_empty());
    }

    #[test]
    fn the_table_marks_translated_connections_and_their_packets() {
        let marks = Marks::default();
        let t = table(Family::V4, &Elements::new(), &marks);
        assert!(
            t.contains("ip daddr . meta l4proto . th dport @dnat_port ct mark set ct mark & 0xefffffff | 0x10000000 dnat to ip daddr . meta l4proto . th dport map @dnat_port"),
            "{t}"
        );
        assert!(
            t.contains("ct mark & 0x10000000 == 0x10000000 meta mark set meta mark & 0xefffffff | 0x10000000"),
            "{t}"
        );
        let off = Marks { fw: None, ..marks };
        assert!(!table(Family::V4, &Elements::new(), &off).contains("meta mark set"));
        assert_eq!(
            chain_rules(&marks),
            [
                ("prerouting", 5),
                ("output", 4),
                ("postrouting", 2),
                ("forward", 6)
            ]
        );
    }

    #[test]
    fn a_change_is_element_lines_only() {
        let a = elements(&[dnat(1, "192.0.2.1", "10.0.0.2", "25", None)], Family::V4).unwrap();
        let b = elements(&[dnat(2, "192.0.2.1", "10.0.0.3", "26", None)], Family::V4).unwrap();
        assert_eq!(
            diff(Family::V4, &a, &b).unwrap(),
            "delete element ip natmap dnat_port { 192.0.2.1 . udp . 25 : 10.0.0.2 }\n\
             delete element ip natmap fwd_port { 10.0.0.2 . udp . 25 }\n\
             add element ip natmap dnat_port { 192.0.2.1 . udp . 26 : 10.0.0.3 }\n\
             add element ip natmap fwd_port { 10.0.0.3 . udp . 26 }\n"
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
