//! Docker mappings: container references and `docker add` port specs.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{parse_port, HostIp, Network, ParseError, Proto};

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

/// The port argument of `docker add`:
/// `[HOST_IP:]HOST_PORT[:CONTAINER_PORT][/tcp|udp]` or, for a non-Docker
/// target, `HOST_PORT:TARGET_IP:PORT[/tcp|udp]`. IPv6 addresses go in
/// brackets: `[2001:db8::1]:8080:80`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortSpec {
    /// Host address to forward from (all local addresses when absent).
    pub host_ip: Option<HostIp>,
    /// Host port.
    pub host_port: u16,
    /// A fixed target address (non-Docker target).
    pub target_ip: Option<HostIp>,
    /// Port on the target.
    pub target_port: u16,
    /// Protocol.
    pub proto: Proto,
}

const PORT_SPEC_FORM: &str =
    "[HOST_IP:]HOST_PORT[:CONTAINER_PORT][/tcp|udp] or HOST_PORT:TARGET_IP:PORT[/tcp|udp], \
e.g. 8080:80, 203.0.113.10:8080:80/tcp, 5353:53/udp, 8080:192.0.2.10:80 ([v6] in brackets); \
HOST_IP is a non-loopback address of this host (127.0.0.1 is always served)";

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
    let inner = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    HostIp::parse_field(field, inner)
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
        let port = |p: &str| parse_port("mapping", p).map_err(|_| bad());
        let looks_like_ip = |p: &str| p.starts_with('[') || p.contains('.') || p.contains(':');
        let parts = split_colons(body);
        let spec = match parts.as_slice() {
            [hp] => PortSpec {
                host_ip: None,
                host_port: port(hp)?,
                target_ip: None,
                target_port: port(hp)?,
                proto,
            },
            [hp, cp] => PortSpec {
                host_ip: None,
                host_port: port(hp)?,
                target_ip: None,
                target_port: port(cp)?,
                proto,
            },
            [a, b, c] if looks_like_ip(a) => PortSpec {
                host_ip: Some(parse_addr("mapping host address", a).map_err(|_| bad())?),
                host_port: port(b)?,
                target_ip: None,
                target_port: port(c)?,
                proto,
            },
            [a, b, c] if looks_like_ip(b) => PortSpec {
                host_ip: None,
                host_port: port(a)?,
                target_ip: Some(parse_target(b).map_err(|e| e.unwrap_or_else(bad))?),
                target_port: port(c)?,
                proto,
            },
            _ => return Err(bad()),
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
        if let Some(h) = &self.host_ip {
            write!(f, "{}:", addr(h))?;
        }
        write!(f, "{}:", self.host_port)?;
        if let Some(t) = &self.target_ip {
            write!(f, "{}:", addr(t))?;
        }
        write!(f, "{}/{}", self.target_port, self.proto)
    }
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
    /// Host address to forward from (all local addresses when absent).
    #[serde(default)]
    pub host_ip: Option<HostIp>,
    /// Host port.
    pub host_port: u16,
    /// Container (target) port.
    pub container_port: u16,
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
        if self.external && !self.is_up() {
            return Err("a fixed (external) target needs target_v4 or target_v6".into());
        }
        Ok(())
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
        let loopback = "127.0.0.2:8080:80/udp".parse::<PortSpec>();
        assert!(loopback.is_err(), "loopback host ip refused");
        let s: PortSpec = "192.0.2.1:8080:80/udp".parse().unwrap();
        assert_eq!(s.host_ip.unwrap().to_string(), "192.0.2.1");
        assert_eq!(s.proto, Proto::Udp);
        let s: PortSpec = "[2001:db8::1]:8080:80".parse().unwrap();
        assert_eq!(s.to_string(), "[2001:db8::1]:8080:80/tcp");
        let s: PortSpec = "8080:192.0.2.10:80".parse().unwrap();
        assert_eq!(s.target_ip.unwrap().to_string(), "192.0.2.10");
        assert_eq!(s.host_ip, None);
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
