//! Docker mappings: container references and `docker add` port specs.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{parse_port, HostIp, Network, ParseError, PortList, Proto};

/// A container named by full id, id prefix or name (as Docker accepts them),
/// or a label for a non-Docker target. Docker's name rules:
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128 characters here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerRef(String);

impl ContainerRef {
    /// The reference as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ContainerRef {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.strip_prefix('/').unwrap_or(s);
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(ContainerRef(name.to_owned()))
        } else {
            Err(ParseError::new(
                "container",
                s,
                "a container name, id or id prefix: letters, digits, _ . - (starting with a letter or digit)",
            ))
        }
    }
}

impl TryFrom<String> for ContainerRef {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ContainerRef> for String {
    fn from(c: ContainerRef) -> String {
        c.0
    }
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The port argument of `docker add`, as `docker run -p` takes it:
/// `[HOST_IP:]HOST_PORT[:CONTAINER_PORT][/tcp|udp]` or, for a non-Docker
/// target, `HOST_PORT:TARGET_IP:PORT[/tcp|udp]`. IPv6 addresses go in
/// brackets: `[2001:db8::1]:8080:80`. Each port may be a range
/// (`8160-8161:80-81`): host and container ranges of equal length, host
/// port `first + i` forwarding to container port `first + i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortSpec {
    /// Host address to forward from (all local addresses when absent; a
    /// loopback address publishes on loopback only).
    pub host_ip: Option<HostIp>,
    /// Host port (the first of a range).
    pub host_port: u16,
    /// A fixed target address (non-Docker target).
    pub target_ip: Option<HostIp>,
    /// Port on the target (the first of a range).
    pub target_port: u16,
    /// Number of ports (1 for a single port).
    pub port_count: u16,
    /// Protocol.
    pub proto: Proto,
}

/// The most ports one range mapping may publish: each is a reserved socket
/// (two with the loopback relay, per family), so a range is a few thousand
/// descriptors at most (`daemon::fds` checks the budget too).
pub const MAX_RANGE_PORTS: u16 = 1000;

const PORT_SPEC_FORM: &str =
    "[HOST_IP:]HOST_PORT[:CONTAINER_PORT][/tcp|udp] or HOST_PORT:TARGET_IP:PORT[/tcp|udp], \
e.g. 8080:80, 203.0.113.10:8080:80/tcp, 5353:53/udp, 8160-8161:80-81, 127.0.0.1:8080:80, \
8080:192.0.2.10:80 ([v6] in brackets); HOST_IP is an address of this host, or 127.0.0.1 / \
[::1] to publish on that loopback address only";

/// What a port range must look like.
const RANGE_FORM: &str = "HOST_PORT and CONTAINER_PORT ranges of equal length, \
e.g. 8160-8161:80-81 or 8160-8161 (the same ports on both sides), at most 1000 ports";

/// Splits on ':' outside of `[...]`.
fn split_colons(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_addr(field: &'static str, s: &str) -> Result<HostIp, ParseError> {
    HostIp::parse_field(field, unbracket(s))
}

fn unbracket(s: &str) -> &str {
    s.strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s)
}

/// A port or an inclusive range `FIRST-LAST`: (first, count). `None` when
/// it is neither; a range backwards or longer than [`MAX_RANGE_PORTS`] is
/// an error about the range.
fn parse_ports(s: &str, whole: &str) -> Result<Option<(u16, u16)>, ParseError> {
    let port = |p: &str| parse_port("mapping", p).ok();
    match s.split_once('-') {
        None => Ok(port(s).map(|p| (p, 1))),
        Some((a, b)) => {
            let (Some(first), Some(last)) = (port(a), port(b)) else {
                return Ok(None);
            };
            if first > last {
                return Err(ParseError::new(
                    "mapping port range",
                    whole,
                    format!("{RANGE_FORM} ({s} runs backwards)"),
                ));
            }
            let count = last - first + 1;
            if count > MAX_RANGE_PORTS {
                return Err(ParseError::new(
                    "mapping port range",
                    whole,
                    format!(
                        "{RANGE_FORM} ({s} is {count} ports; each is a reserved socket, so \
                         publish larger ranges as several mappings)"
                    ),
                ));
            }
            Ok(Some((first, count)))
        }
    }
}

/// Why a loopback target is refused, and what to use instead.
const LOOPBACK_TARGET: &str =
    "a target this host can forward to from other hosts, not loopback: kernel DNAT cannot \
send other hosts' traffic to 127.0.0.0/8 or ::1 (the packet is dropped). Make the service \
listen on this host's address and map to that (e.g. 8080:192.0.2.1:80), or map to the \
service's own host";

/// The TARGET_IP of `HOST_PORT:TARGET_IP:PORT`. A loopback target gets an
/// error of its own (`Some`), about the target; any other bad address gets
/// the general form (`None`).
fn parse_target(addr: &str) -> Result<HostIp, Option<ParseError>> {
    let inner = addr
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(addr);
    if inner.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return Err(Some(ParseError::new(
            "mapping target address",
            inner,
            LOOPBACK_TARGET,
        )));
    }
    parse_addr("mapping target address", addr).map_err(|_| None)
}

impl FromStr for PortSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::new("mapping", s, PORT_SPEC_FORM);
        let (body, proto) = match s.rsplit_once('/') {
            Some((b, p)) => (b, p.parse::<Proto>().map_err(|_| bad())?),
            None => (s, Proto::Tcp),
        };
        let ports = |p: &str| parse_ports(p, s)?.ok_or_else(bad);
        let looks_like_ip = |p: &str| p.starts_with('[') || p.contains('.') || p.contains(':');
        let parts = split_colons(body);
        let (host_ip, host, target_ip, target) = match parts.as_slice() {
            [hp] => (None, ports(hp)?, None, ports(hp)?),
            [hp, cp] => (None, ports(hp)?, None, ports(cp)?),
            [a, b, c] if looks_like_ip(a) => (
                Some(
                    HostIp::parse_publish("mapping host address", unbracket(a))
                        .map_err(|_| bad())?,
                ),
                ports(b)?,
                None,
                ports(c)?,
            ),
            [a, b, c] if looks_like_ip(b) => (
                None,
                ports(a)?,
                Some(parse_target(b).map_err(|e| e.unwrap_or_else(bad))?),
                ports(c)?,
            ),
            _ => return Err(bad()),
        };
        if host.1 != target.1 {
            return Err(ParseError::new(
                "mapping port range",
                s,
                format!(
                    "{RANGE_FORM} (here {} host port(s) and {} container port(s))",
                    host.1, target.1
                ),
            ));
        }
        let spec = PortSpec {
            host_ip,
            host_port: host.0,
            target_ip,
            target_port: target.0,
            port_count: host.1,
            proto,
        };
        if let (Some(h), Some(t)) = (&spec.host_ip, &spec.target_ip) {
            if h.family() != t.family() {
                return Err(bad());
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = |ip: &HostIp| match ip.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let range = |first: u16| PortList::range(first, port_last(first, self.port_count));
        if let Some(h) = &self.host_ip {
            write!(f, "{}:", addr(h))?;
        }
        write!(f, "{}:", range(self.host_port))?;
        if let Some(t) = &self.target_ip {
            write!(f, "{}:", addr(t))?;
        }
        write!(f, "{}/{}", range(self.target_port), self.proto)
    }
}

/// The last port of `count` ports from `first` (saturating: a count that
/// would run past 65535 is refused by the checks, never rendered).
fn port_last(first: u16, count: u16) -> u16 {
    first.saturating_add(count.max(1) - 1)
}

impl TryFrom<String> for PortSpec {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortSpec> for String {
    fn from(p: PortSpec) -> String {
        p.to_string()
    }
}

/// Where a mapping currently forwards to: an address and, for a container,
/// the network it sits on (whose members are masqueraded when they use the
/// mapping through the host, so replies come back through the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The target address.
    pub ip: HostIp,
    /// The target's network, when it is a container.
    #[serde(default)]
    pub subnet: Option<Network>,
}

/// A published port of a container (or of a fixed non-Docker target).
// 13 fields because this is the stored form of a mapping, key for key
// (state.json, the journal, `apply` documents): grouping them would change
// that format, and `deny_unknown_fields` rules out `#[serde(flatten)]` parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerRule {
    /// Container name (without Docker's leading `/`), or the label of a
    /// non-Docker target. The mapping follows the name: a container
    /// recreated under it is picked up.
    pub name: String,
    /// Full id of the container last seen under `name`.
    #[serde(default)]
    pub container_id: Option<String>,
    /// Docker network the address is taken from.
    #[serde(default)]
    pub network: Option<String>,
    /// Host address to forward from (all local addresses when absent). A
    /// loopback address (127.0.0.1, ::1) publishes on that address only,
    /// served by the relay alone: no kernel rule forwards it.
    #[serde(default, deserialize_with = "publish_ip")]
    pub host_ip: Option<HostIp>,
    /// Host port (the first of a range).
    pub host_port: u16,
    /// Container (target) port (the first of a range).
    pub container_port: u16,
    /// Ports in the mapping: host port `host_port + i` forwards to
    /// `container_port + i`. 1 (and left out of documents) for one port.
    #[serde(default = "one_port", skip_serializing_if = "is_one_port")]
    pub port_count: u16,
    /// Protocol (tcp when left out of a document).
    #[serde(default)]
    pub proto: Proto,
    /// A fixed, non-Docker target: never inspected.
    #[serde(default)]
    pub external: bool,
    /// Current IPv4 target; `None` with no IPv6 target either means down
    /// (container stopped or gone): no rules, port still reserved.
    #[serde(default)]
    pub target_v4: Option<Endpoint>,
    /// Current IPv6 target, when the container has an IPv6 address.
    #[serde(default)]
    pub target_v6: Option<Endpoint>,
    /// Set for mappings auto-discovery made from a container label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoSource>,
    /// Accept an address that is not this host's now (a VRRP/keepalived
    /// VIP): the mapping then matches only while the address is local.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
}

fn one_port() -> u16 {
    1
}

fn is_one_port(count: &u16) -> bool {
    *count == 1
}

/// A mapping's `host_ip`: any address `HostIp` takes, or loopback.
fn publish_ip<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<HostIp>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|s| HostIp::parse_publish("host_ip", &s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Where an auto-discovered mapping came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSource {
    /// The engine's name from the config.
    pub engine: String,
    /// Masquerade forwarded traffic (remote node, `preserve_src_ip = false`),
    /// so the node's replies come back without a policy route.
    pub masquerade: bool,
}

impl DockerRule {
    /// Checks what the types cannot: names as Docker spells them, ports
    /// 1-65535, a target for a fixed one. A rule from an `apply` document
    /// or a hand-edited state must pass the same checks as `docker add`.
    pub fn check_fields(&self) -> Result<(), String> {
        self.name
            .parse::<ContainerRef>()
            .map_err(|e| format!("name: {e}"))?;
        if let Some(net) = &self.network {
            net.parse::<ContainerRef>()
                .map_err(|e| format!("network: {}", e.with_field("network")))?;
        }
        if let Some(id) = &self.container_id {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("container_id: expected a hexadecimal Docker id".into());
            }
        }
        if self.host_port == 0 || self.container_port == 0 {
            return Err("host_port and container_port: expected ports 1-65535".into());
        }
        if self.port_count == 0 || self.port_count > MAX_RANGE_PORTS {
            return Err(format!(
                "port_count: expected 1-{MAX_RANGE_PORTS} ports (a range is one reserved socket per port)"
            ));
        }
        let end = |first: u16| u32::from(first) + u32::from(self.port_count) - 1;
        if end(self.host_port) > 65535 || end(self.container_port) > 65535 {
            return Err(format!(
                "port_count: {} ports from host port {} / container port {} run past 65535",
                self.port_count, self.host_port, self.container_port
            ));
        }
        if self.external && !self.is_up() {
            return Err("a fixed (external) target needs target_v4 or target_v6".into());
        }
        Ok(())
    }

    /// The host ports of the mapping (one, or a range).
    pub fn host_ports(&self) -> PortList {
        PortList::range(self.host_port, self.last_host_port())
    }

    /// The last host port (`host_port` for a single port).
    pub fn last_host_port(&self) -> u16 {
        port_last(self.host_port, self.port_count)
    }

    /// The container (target) ports, in the order of [`Self::host_ports`].
    pub fn container_ports(&self) -> PortList {
        PortList::range(
            self.container_port,
            port_last(self.container_port, self.port_count),
        )
    }

    /// The (host port, container port) pairs of the mapping.
    pub fn port_pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (0..self.port_count.max(1)).map(|i| {
            (
                self.host_port.saturating_add(i),
                self.container_port.saturating_add(i),
            )
        })
    }

    /// Whether host port `port` is one of the mapping's.
    pub fn has_host_port(&self, port: u16) -> bool {
        (self.host_port..=self.last_host_port()).contains(&port)
    }

    /// Whether the mapping is published on a loopback address only
    /// (`127.0.0.1:8080:80`): the relay serves it, no kernel rule does.
    pub fn loopback_only(&self) -> bool {
        self.host_ip.is_some_and(|h| h.is_loopback())
    }

    /// Whether the mapping forwards anywhere right now.
    pub fn is_up(&self) -> bool {
        self.target_v4.is_some() || self.target_v6.is_some()
    }

    /// Whether this mapping refers to container `reference` (name or id prefix).
    pub fn refers_to(&self, reference: &str) -> bool {
        self.name == reference
            || (reference.len() >= 4
                && self
                    .container_id
                    .as_deref()
                    .is_some_and(|id| id.starts_with(reference)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_spec_form_parses() {
        let s: PortSpec = "8080".parse().unwrap();
        assert_eq!(
            (s.host_port, s.target_port, s.proto),
            (8080, 8080, Proto::Tcp)
        );
        let s: PortSpec = "8080:80".parse().unwrap();
        assert_eq!((s.host_port, s.target_port), (8080, 80));
        let s: PortSpec = "127.0.0.2:8080:80/udp".parse().unwrap();
        assert!(s.host_ip.unwrap().is_loopback());
        let s: PortSpec = "192.0.2.1:8080:80/udp".parse().unwrap();
        assert_eq!(s.host_ip.unwrap().to_string(), "192.0.2.1");
        assert_eq!(s.proto, Proto::Udp);
        let s: PortSpec = "[2001:db8::1]:8080:80".parse().unwrap();
        assert_eq!(s.to_string(), "[2001:db8::1]:8080:80/tcp");
        let s: PortSpec = "8080:192.0.2.10:80".parse().unwrap();
        assert_eq!(s.target_ip.unwrap().to_string(), "192.0.2.10");
        assert_eq!(s.host_ip, None);
    }

    // Long because it is one table of cases, one per accepted form.
    #[test]
    fn port_ranges_parse_as_docker_run_p_takes_them() {
        for (text, host_ip, host, target, count, proto, shown) in [
            (
                "8160-8161:80-81",
                None,
                8160,
                80,
                2,
                Proto::Tcp,
                "8160-8161:80-81/tcp",
            ),
            (
                "8160-8161:80-81/udp",
                None,
                8160,
                80,
                2,
                Proto::Udp,
                "8160-8161:80-81/udp",
            ),
            (
                "8160-8161",
                None,
                8160,
                8160,
                2,
                Proto::Tcp,
                "8160-8161:8160-8161/tcp",
            ),
            (
                "10.0.0.1:8160-8161:80-81",
                Some("10.0.0.1"),
                8160,
                80,
                2,
                Proto::Tcp,
                "10.0.0.1:8160-8161:80-81/tcp",
            ),
            (
                "[2001:db8::1]:8160-8161:80-81/udp",
                Some("2001:db8::1"),
                8160,
                80,
                2,
                Proto::Udp,
                "[2001:db8::1]:8160-8161:80-81/udp",
            ),
            (
                "8160-8160:80-80",
                None,
                8160,
                80,
                1,
                Proto::Tcp,
                "8160:80/tcp",
            ),
            ("1-1000", None, 1, 1, 1000, Proto::Tcp, "1-1000:1-1000/tcp"),
        ] {
            let s: PortSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (
                    s.host_ip.map(|h| h.to_string()),
                    s.host_port,
                    s.target_port,
                    s.port_count,
                    s.proto
                ),
                (host_ip.map(String::from), host, target, count, proto),
                "{text}"
            );
            assert_eq!(s.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<PortSpec>().unwrap(), s, "{text} round trip");
        }
        let s: PortSpec = "9000-9001:192.0.2.50:9000-9001".parse().unwrap();
        assert_eq!(
            (s.port_count, s.target_ip.unwrap().to_string()),
            (2, "192.0.2.50".into())
        );
    }

    #[test]
    fn unequal_backwards_or_huge_ranges_are_refused_naming_the_range() {
        for (bad, says) in [
            ("8160-8162:80-81", "3 host port(s) and 2 container port(s)"),
            ("8160-8161:80", "2 host port(s) and 1 container port(s)"),
            ("8160:80-81/udp", "1 host port(s) and 2 container port(s)"),
            (
                "10.0.0.1:8160-8161:80-82",
                "2 host port(s) and 3 container port(s)",
            ),
            ("8161-8160:80-81", "runs backwards"),
            ("1-1001", "1001 ports"),
        ] {
            let err = bad.parse::<PortSpec>().unwrap_err();
            assert_eq!(err.field, "mapping port range", "{bad}: {err}");
            let text = err.to_string();
            assert!(text.contains(says), "{bad}: {text}");
            assert!(text.contains("equal length"), "{bad}: {text}");
            assert!(
                text.contains("8160-8161:80-81"),
                "the accepted form: {text}"
            );
            assert!(text.contains("at most 1000"), "{bad}: {text}");
        }
        for bad in [
            "8160-:80",
            "-8161:80",
            "8160-8161-8162:80",
            "0-5:0-5",
            "8160-x:80-81",
        ] {
            let err = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(err.contains("HOST_PORT"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_loopback_host_ip_publishes_on_loopback_only() {
        for (text, ip) in [
            ("127.0.0.1:8152:80", "127.0.0.1"),
            ("[::1]:8152:80/udp", "::1"),
            ("127.0.0.1:8152-8153:80-81", "127.0.0.1"),
        ] {
            let s: PortSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            let h = s.host_ip.unwrap();
            assert!(h.is_loopback(), "{text}");
            assert_eq!(h.to_string(), ip);
        }
        // Still not: the unspecified address, multicast, or loopback as a
        // plain host address elsewhere.
        for bad in ["0.0.0.0:8152:80", "[::]:8152:80", "224.0.0.1:8152:80"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
        assert!(
            "127.0.0.1".parse::<HostIp>().is_err(),
            "HostIp itself refuses loopback"
        );
    }

    fn web_rule(json_extra: serde_json::Value) -> Result<DockerRule, String> {
        let mut v = serde_json::json!({"name": "web", "host_port": 8160, "container_port": 80});
        v.as_object_mut()
            .unwrap()
            .extend(json_extra.as_object().unwrap().clone());
        let rule: DockerRule = serde_json::from_value(v).map_err(|e| e.to_string())?;
        rule.check_fields().map(|()| rule)
    }

    #[test]
    fn a_range_is_one_rule_with_a_port_count_and_stored_compactly() {
        let one = web_rule(serde_json::json!({})).unwrap();
        assert_eq!(one.port_count, 1);
        let json = serde_json::to_value(&one).unwrap();
        assert!(
            json.get("port_count").is_none(),
            "left out for one port: {json}"
        );
        let range = web_rule(serde_json::json!({"port_count": 2})).unwrap();
        assert_eq!(range.host_ports().to_string(), "8160-8161");
        assert_eq!(range.container_ports().to_string(), "80-81");
        assert_eq!(
            range.port_pairs().collect::<Vec<_>>(),
            [(8160, 80), (8161, 81)]
        );
        assert!(range.has_host_port(8161) && !range.has_host_port(8162));
        assert_eq!(serde_json::to_value(&range).unwrap()["port_count"], 2);
        let lo = web_rule(serde_json::json!({"host_ip": "127.0.0.1"})).unwrap();
        assert!(lo.loopback_only());
        let lo6 = web_rule(serde_json::json!({"host_ip": "::1"})).unwrap();
        assert!(lo6.loopback_only());
        assert!(web_rule(serde_json::json!({"host_ip": "224.0.0.1"})).is_err());
        for bad in [
            serde_json::json!({"port_count": 0}),
            serde_json::json!({"port_count": 1001}),
            serde_json::json!({"host_port": 65535, "port_count": 2}),
        ] {
            let err = web_rule(bad.clone()).unwrap_err();
            assert!(err.contains("port_count"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_port_specs_say_which_forms_are_accepted() {
        for bad in [
            "",
            "0",
            "8080:",
            ":80",
            "8080:80/sctp",
            "a:b",
            "1:2:3",
            "1:2:3:4",
            "8080:80\n",
            "x.y:1:2",
        ] {
            let err = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(err.contains("HOST_PORT"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_loopback_target_is_refused_with_a_message_about_the_target() {
        for spec in [
            "8080:127.0.0.1:80",
            "8080:[::1]:80/udp",
            "8080:127.0.0.2:80",
        ] {
            let err = spec.parse::<PortSpec>().unwrap_err();
            assert_eq!(err.field, "mapping target address", "{spec}: {err}");
            let text = err.to_string();
            assert!(text.contains("not loopback"), "{spec}: {text}");
            assert!(!text.contains("HOST_IP"), "{spec}: {text}");
        }
    }

    #[test]
    fn container_refs_follow_docker_names() {
        assert_eq!(
            "/my-nginx".parse::<ContainerRef>().unwrap().as_str(),
            "my-nginx"
        );
        for bad in ["", "-x", "a b", "a;b", "a\nb", &"x".repeat(129)] {
            assert!(bad.parse::<ContainerRef>().is_err(), "{bad:?}");
        }
    }
}
