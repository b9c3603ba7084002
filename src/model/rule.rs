//! The rules natmap owns, as stored in `state.json`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{DockerRule, Family, HostIp, IfName, Network, PortList, Proto};

/// A rule's id: a small integer, never reused, stable for the life of the rule.
pub type RuleId = u64;

/// One managed rule: its id and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable id, shown by `ls` and used by `rm --id`.
    pub id: RuleId,
    /// What the rule does.
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// What a rule does. The variants are the CLI's rule kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleSpec {
    /// Static port forward from an external address to an internal host.
    Dnat(DnatRule),
    /// Source NAT of an internal address or network leaving an interface.
    Snat(SnatRule),
    /// DNAT that internal hosts can also use through the external address.
    Hairpin(HairpinRule),
    /// A published port of a running container (or a fixed non-Docker target).
    Docker(DockerRule),
    /// Replies from a source address leave through a given gateway.
    PolicyRoute(PolicyRouteRule),
}

/// `policy-route --src-ip S --via G --table N`: `ip rule from S lookup N`
/// plus `default via G` in table N, so a service behind a gateway that
/// preserves client addresses answers through that gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRouteRule {
    /// Source address whose traffic is routed.
    pub src_ip: HostIp,
    /// The gateway.
    pub via: HostIp,
    /// Routing table number.
    pub table: u32,
}

/// `dnat --ext-ip E --int-ip I --ports P [--proto] [--ext-if X]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnatRule {
    /// Address the traffic arrives for.
    pub ext_ip: HostIp,
    /// Address it is forwarded to (same ports).
    pub int_ip: HostIp,
    /// Forwarded ports.
    pub ports: PortList,
    /// Protocol (tcp when left out of a document).
    #[serde(default)]
    pub proto: Proto,
    /// Only traffic arriving on this interface, when given.
    #[serde(default)]
    pub ext_if: Option<IfName>,
    /// Accept an address that is not this host's now (a VRRP/keepalived
    /// VIP): the rule then matches only while the address is local.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
}

/// `snat --int-ip I|CIDR --ext-if X --ext-ip E [--forward]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatRule {
    /// Source address or network that is rewritten.
    pub source: Network,
    /// Only traffic leaving this interface.
    pub ext_if: IfName,
    /// The new source address.
    pub ext_ip: HostIp,
    /// Also accept the traffic in natmap's filter chain (the source's
    /// traffic out of `ext_if` and the replies back), for hosts whose
    /// `FORWARD` policy is `DROP`. Absent in state files written before the
    /// flag existed, hence the default.
    #[serde(default)]
    pub forward: bool,
}

impl SnatRule {
    /// Whether `other` rewrites the same traffic (same source leaving the
    /// same interface). Of two such rules only the first ever matches, so
    /// natmap keeps one.
    pub fn same_traffic(&self, other: &SnatRule) -> bool {
        self.source == other.source && self.ext_if == other.ext_if
    }
}

impl HairpinRule {
    /// Whether this hairpin forwards exactly what `dnat` forwards (same
    /// addresses, protocol and ports): it then includes that rule.
    pub fn includes(&self, dnat: &DnatRule) -> bool {
        self.ext_ip == dnat.ext_ip
            && self.int_ip == dnat.int_ip
            && self.proto == dnat.proto
            && self.ports == dnat.ports
    }
}

/// `hairpin --ext-ip E --int-ip I --ports P [--proto]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HairpinRule {
    /// External address clients use.
    pub ext_ip: HostIp,
    /// Internal host serving it (same ports).
    pub int_ip: HostIp,
    /// Forwarded ports.
    pub ports: PortList,
    /// Protocol (tcp when left out of a document).
    #[serde(default)]
    pub proto: Proto,
    /// The internal network whose clients are masqueraded so the replies come
    /// back through the router; clients from elsewhere keep their address.
    pub int_net: Network,
    /// Accept an address that is not this host's now (a VRRP/keepalived
    /// VIP): the rule then matches only while the address is local.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_nonlocal: bool,
}

/// A host port natmap holds a socket on while the rule exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortClaim {
    /// Protocol of the socket.
    pub proto: Proto,
    /// Address and port the socket is bound to.
    pub bind: SocketAddr,
    /// Where a connection that reaches the socket itself (loopback) is relayed.
    pub target: SocketAddr,
}

impl RuleSpec {
    /// The kind's name, as in the CLI and the rule comments.
    pub fn kind(&self) -> &'static str {
        match self {
            RuleSpec::Dnat(_) => "dnat",
            RuleSpec::Snat(_) => "snat",
            RuleSpec::Hairpin(_) => "hairpin",
            RuleSpec::Docker(_) => "docker",
            RuleSpec::PolicyRoute(_) => "policy_route",
        }
    }

    /// The address of this host the rule forwards from (the external
    /// address of dnat and hairpin, a Docker mapping's HOST_IP), and whether
    /// it may be an address the host does not have now (`--allow-nonlocal`).
    pub fn ingress_address(&self) -> Option<(IpAddr, bool)> {
        match self {
            RuleSpec::Dnat(r) => Some((r.ext_ip.ip(), r.allow_nonlocal)),
            RuleSpec::Hairpin(r) => Some((r.ext_ip.ip(), r.allow_nonlocal)),
            // Loopback is always this host's.
            RuleSpec::Docker(r) => r
                .host_ip
                .filter(|h| !h.is_loopback())
                .map(|h| (h.ip(), r.allow_nonlocal)),
            RuleSpec::Snat(_) | RuleSpec::PolicyRoute(_) => None,
        }
    }

    /// Whether the rule needs IPv6 NAT (`ip6table_nat`): an IPv6 rule
    /// other than a mapping published on `[::1]` only, which the relay
    /// serves without any kernel rule.
    pub fn needs_v6_nat(&self) -> bool {
        self.family() == Family::V6 && !matches!(self, RuleSpec::Docker(d) if d.loopback_only())
    }

    /// The address family the rule lives in.
    pub fn family(&self) -> Family {
        match self {
            RuleSpec::Dnat(r) => r.ext_ip.family(),
            RuleSpec::Snat(r) => r.ext_ip.family(),
            RuleSpec::Hairpin(r) => r.ext_ip.family(),
            RuleSpec::Docker(r) => r.host_ip.map_or(Family::V4, |h| h.family()),
            RuleSpec::PolicyRoute(r) => r.src_ip.family(),
        }
    }

    /// Checks what single fields cannot: that the addresses are of one family
    /// and fit together. The error names the fields.
    pub fn check_consistent(&self) -> Result<(), String> {
        let mixed = |a: &str, b: &str| {
            format!("--{a} and --{b} must both be IPv4 or both be IPv6 (use one rule per family)")
        };
        match self {
            RuleSpec::Dnat(r) if r.ext_ip.family() != r.int_ip.family() => {
                Err(mixed("ext-ip", "int-ip"))
            }
            RuleSpec::Snat(r) if r.source.family() != r.ext_ip.family() => {
                Err(mixed("int-ip", "ext-ip"))
            }
            RuleSpec::Hairpin(r) if r.ext_ip.family() != r.int_ip.family() => {
                Err(mixed("ext-ip", "int-ip"))
            }
            RuleSpec::Hairpin(r) if !r.int_net.contains(&r.int_ip.ip()) => Err(format!(
                "--int-net {} does not contain --int-ip {}",
                r.int_net, r.int_ip
            )),
            RuleSpec::Dnat(r) if r.ext_ip == r.int_ip => {
                Err("--ext-ip and --int-ip are the same address".into())
            }
            RuleSpec::Docker(d) => d.check_fields(),
            RuleSpec::PolicyRoute(r) if r.src_ip.family() != r.via.family() => {
                Err(mixed("src-ip", "via"))
            }
            RuleSpec::PolicyRoute(r) if matches!(r.table, 0 | 253 | 254 | 255) => Err(format!(
                "--table {} is reserved (0 unspec, 253 default, 254 main, 255 local); use 1-252 or above 255",
                r.table
            )),
            _ => Ok(()),
        }
    }

    /// Whether `other` is the same rule, so adding it again changes nothing.
    /// A hairpin's internal network is derived, so it does not make a rule different.
    pub fn same_rule(&self, other: &RuleSpec) -> bool {
        match (self, other) {
            (RuleSpec::Docker(a), RuleSpec::Docker(b)) => {
                a.name == b.name
                    && a.host_ip == b.host_ip
                    && a.host_port == b.host_port
                    && a.container_port == b.container_port
                    && a.port_count == b.port_count
                    && a.proto == b.proto
                    && a.external == b.external
                    && (!a.external || a.target_v4 == b.target_v4 && a.target_v6 == b.target_v6)
                    && a.auto.as_ref().map(|x| &x.engine) == b.auto.as_ref().map(|x| &x.engine)
            }
            (RuleSpec::Hairpin(a), RuleSpec::Hairpin(b)) => {
                a.ext_ip == b.ext_ip
                    && a.int_ip == b.int_ip
                    && a.ports == b.ports
                    && a.proto == b.proto
            }
            _ => self == other,
        }
    }

    /// A key equal for two specs exactly when [`RuleSpec::same_rule`] holds,
    /// for hash-based matching of large rule sets (`apply`).
    pub fn identity_key(&self) -> String {
        match self {
            RuleSpec::Hairpin(r) => {
                format!("hairpin|{}|{}|{}|{}", r.ext_ip, r.int_ip, r.ports, r.proto)
            }
            RuleSpec::Docker(d) => {
                let targets = if d.external {
                    format!("{:?}|{:?}", d.target_v4, d.target_v6)
                } else {
                    String::new()
                };
                format!(
                    "docker|{}|{:?}|{}|{}|{}|{}|{}|{targets}|{:?}",
                    d.name,
                    d.host_ip,
                    d.host_port,
                    d.container_port,
                    d.port_count,
                    d.proto,
                    d.external,
                    d.auto.as_ref().map(|a| &a.engine)
                )
            }
            other => serde_json::to_string(other).expect("rules serialize"),
        }
    }

    /// The host ports this rule forwards, each of which natmap reserves.
    pub fn port_claims(&self) -> Vec<PortClaim> {
        let forward = |ext: &HostIp, int: &HostIp, ports: &PortList, proto: Proto| {
            ports
                .iter()
                .map(|p| PortClaim {
                    proto,
                    bind: SocketAddr::new(ext.ip(), p),
                    target: SocketAddr::new(int.ip(), p),
                })
                .collect()
        };
        match self {
            RuleSpec::Dnat(r) => forward(&r.ext_ip, &r.int_ip, &r.ports, r.proto),
            RuleSpec::Hairpin(r) => forward(&r.ext_ip, &r.int_ip, &r.ports, r.proto),
            RuleSpec::Snat(_) | RuleSpec::PolicyRoute(_) => Vec::new(),
            RuleSpec::Docker(r) => {
                // Published on every address: the port of both families is
                // held (another process could bind `[::]:PORT` with
                // IPV6_V6ONLY otherwise), and each family's loopback is
                // relayed to the container's address of that family.
                // Published on a loopback address: that address alone, its
                // relay the only way in, to the container's address of the
                // same family or else the other (as docker-proxy does).
                let v4_none = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
                let v6_none = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
                let binds: Vec<(IpAddr, IpAddr)> = match r.host_ip {
                    Some(h) if h.is_loopback() => {
                        let (same, other) = match h.family() {
                            Family::V4 => (r.target_v4, r.target_v6),
                            Family::V6 => (r.target_v6, r.target_v4),
                        };
                        let none = if h.ip().is_ipv4() { v4_none } else { v6_none };
                        vec![(h.ip(), same.or(other).map_or(none, |e| e.ip.ip()))]
                    }
                    Some(h) => {
                        let target = match h.family() {
                            Family::V4 => r.target_v4.map_or(v4_none, |e| e.ip.ip()),
                            Family::V6 => r.target_v6.map_or(v6_none, |e| e.ip.ip()),
                        };
                        vec![(h.ip(), target)]
                    }
                    None => vec![
                        (v4_none, r.target_v4.map_or(v4_none, |e| e.ip.ip())),
                        (v6_none, r.target_v6.map_or(v6_none, |e| e.ip.ip())),
                    ],
                };
                binds
                    .into_iter()
                    .flat_map(|(bind_ip, target)| {
                        r.port_pairs().map(move |(host, container)| PortClaim {
                            proto: r.proto,
                            bind: SocketAddr::new(bind_ip, host),
                            target: SocketAddr::new(target, container),
                        })
                    })
                    .collect()
            }
        }
    }

    /// The address loopback traffic on the rule's reserved sockets is relayed
    /// to, if the rule forwards anywhere right now.
    pub fn relay_target(&self) -> Option<IpAddr> {
        match self {
            RuleSpec::Dnat(r) => Some(r.int_ip.ip()),
            RuleSpec::Hairpin(r) => Some(r.int_ip.ip()),
            RuleSpec::Snat(_) | RuleSpec::PolicyRoute(_) => None,
            RuleSpec::Docker(r) => match r.host_ip.map(|h| h.family()) {
                Some(Family::V6) => r.target_v6.or(r.target_v4),
                _ => r.target_v4.or(r.target_v6),
            }
            .map(|e| e.ip.ip()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dnat(ext: &str, int: &str, ports: &str) -> RuleSpec {
        RuleSpec::Dnat(DnatRule {
            ext_ip: ext.parse().unwrap(),
            int_ip: int.parse().unwrap(),
            ports: ports.parse().unwrap(),
            proto: Proto::Tcp,
            ext_if: None,
            allow_nonlocal: false,
        })
    }

    #[test]
    fn mixed_families_are_refused_with_the_flags_named() {
        let err = dnat("192.0.2.1", "2001:db8::2", "25")
            .check_consistent()
            .unwrap_err();
        assert!(err.contains("--ext-ip and --int-ip"), "{err}");
        assert!(dnat("192.0.2.1", "198.51.100.2", "25")
            .check_consistent()
            .is_ok());
    }

    #[test]
    fn claims_one_socket_per_port() {
        let claims = dnat("192.0.2.1", "198.51.100.2", "25,465").port_claims();
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[1].bind, "192.0.2.1:465".parse().unwrap());
        assert_eq!(claims[1].target, "198.51.100.2:465".parse().unwrap());
    }

    fn docker(spec: &str, v4: Option<&str>, v6: Option<&str>) -> RuleSpec {
        let spec: super::super::PortSpec = spec.parse().unwrap();
        let endpoint = |ip: Option<&str>| {
            ip.map(|ip| super::super::Endpoint {
                ip: ip.parse().unwrap(),
                subnet: None,
            })
        };
        RuleSpec::Docker(DockerRule {
            name: "web".into(),
            container_id: None,
            network: None,
            host_ip: spec.host_ip,
            host_port: spec.host_port,
            container_port: spec.target_port,
            port_count: spec.port_count,
            proto: spec.proto,
            external: false,
            target_v4: endpoint(v4),
            target_v6: endpoint(v6),
            auto: None,
            allow_nonlocal: false,
        })
    }

    fn binds(spec: &RuleSpec) -> Vec<(String, String)> {
        spec.port_claims()
            .iter()
            .map(|c| (c.bind.to_string(), c.target.to_string()))
            .collect()
    }

    #[test]
    fn a_range_claims_every_port_at_its_offset() {
        let spec = docker("8160-8161:80-81", Some("172.17.0.2"), None);
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            binds(&spec),
            pairs(&[
                ("0.0.0.0:8160", "172.17.0.2:80"),
                ("0.0.0.0:8161", "172.17.0.2:81"),
                ("[::]:8160", "[::]:80"),
                ("[::]:8161", "[::]:81"),
            ])
        );
        // Another range sharing one port is the same rule for nobody.
        let other = docker("8161-8162:90-91", Some("172.17.0.3"), None);
        assert!(!spec.same_rule(&other));
        assert_ne!(
            spec.identity_key(),
            docker("8160-8162:80-82", None, None).identity_key()
        );
    }

    #[test]
    fn a_loopback_mapping_claims_only_its_address_and_relays_to_either_family() {
        let spec = docker("127.0.0.1:8152:80", Some("172.17.0.2"), None);
        assert_eq!(
            binds(&spec),
            [("127.0.0.1:8152".into(), "172.17.0.2:80".into())]
        );
        assert_eq!(spec.ingress_address(), None, "loopback is always local");
        // [::1] of a container without IPv6 is relayed to its IPv4 address.
        let v6 = docker("[::1]:8153:80", Some("172.17.0.2"), None);
        assert_eq!(binds(&v6), [("[::1]:8153".into(), "172.17.0.2:80".into())]);
        assert!(!v6.needs_v6_nat(), "served by the relay alone");
        let down = docker("[::1]:8153:80", None, None);
        assert_eq!(binds(&down), [("[::1]:8153".into(), "[::]:80".into())]);
        assert!(docker("[2001:db8::1]:8153:80", None, Some("2001:db8::2")).needs_v6_nat());
    }

    #[test]
    fn identity_keys_agree_with_same_rule() {
        let a = dnat("192.0.2.1", "198.51.100.2", "25,465");
        let b = dnat("192.0.2.1", "198.51.100.2", "465,25");
        let c = dnat("192.0.2.1", "198.51.100.3", "25,465");
        let hairpin = |net: &str| {
            RuleSpec::Hairpin(HairpinRule {
                ext_ip: "192.0.2.1".parse().unwrap(),
                int_ip: "198.51.100.2".parse().unwrap(),
                ports: "80".parse().unwrap(),
                proto: Proto::Tcp,
                int_net: net.parse().unwrap(),
                allow_nonlocal: false,
            })
        };
        let (h1, h2) = (hairpin("198.51.100.0/24"), hairpin("198.51.100.2/32"));
        for (x, y) in [(&a, &b), (&a, &c), (&h1, &h2), (&a, &h1)] {
            assert_eq!(
                x.same_rule(y),
                x.identity_key() == y.identity_key(),
                "{x:?} vs {y:?}"
            );
        }
    }

    #[test]
    fn an_snat_stored_before_forward_existed_loads_without_it() {
        let old =
            r#"{"id":3,"kind":"snat","source":"10.0.0.0/24","ext_if":"eth0","ext_ip":"192.0.2.1"}"#;
        let rule: Rule = serde_json::from_str(old).unwrap();
        let RuleSpec::Snat(s) = &rule.spec else {
            panic!("{rule:?}")
        };
        assert!(!s.forward);
    }

    #[test]
    fn stored_form_round_trips() {
        let rule = Rule {
            id: 7,
            spec: dnat("192.0.2.1", "198.51.100.2", "25,465"),
        };
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(
            json,
            r#"{"id":7,"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"25,465","proto":"tcp","ext_if":null}"#
        );
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
    }
}
