//! Address families, host addresses and networks.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ParseError;

/// IPv4 or IPv6: decides between `iptables` and `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4, `iptables`.
    V4,
    /// IPv6, `ip6tables`.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Prefix length of a single host address.
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// An address a rule may forward to or from: a unicast, non-loopback,
/// specified host address.
///
/// Loopback is refused on purpose: the kernel drops 127.0.0.0/8 packets that
/// are DNATed onto the wire unless `route_localnet` is on, which re-opens
/// CVE-2020-8558.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostIp(IpAddr);

impl HostIp {
    /// Parses `s` as the value of `field`, naming the field in the error.
    pub fn parse_field(field: &'static str, s: &str) -> Result<HostIp, ParseError> {
        const FORM: &str = "a unicast IPv4 or IPv6 address such as 192.0.2.10 or 2001:db8::10 \
                            (not loopback, multicast, broadcast or unspecified)";
        let ip: IpAddr = s.parse().map_err(|_| ParseError::new(field, s, FORM))?;
        let bad = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || v6.to_ipv4_mapped().is_some()
            }
        };
        if bad {
            return Err(ParseError::new(field, s, FORM));
        }
        Ok(HostIp(ip))
    }

    /// Parses a Docker mapping's HOST_IP: a host address as
    /// [`HostIp::parse_field`] takes it, or a loopback address
    /// (127.0.0.0/8, ::1). A loopback HOST_IP is never DNATed: the daemon's
    /// relay serves it alone (see `daemon::relay`), so the CVE-2020-8558
    /// reason to refuse loopback does not apply.
    pub fn parse_publish(field: &'static str, s: &str) -> Result<HostIp, ParseError> {
        match s.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => Ok(HostIp(ip)),
            _ => HostIp::parse_field(field, s),
        }
    }

    /// Whether this is a loopback address (only a Docker mapping's HOST_IP
    /// can be: see [`HostIp::parse_publish`]).
    pub fn is_loopback(&self) -> bool {
        self.0.is_loopback()
    }

    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.0
    }

    /// Its family.
    pub fn family(&self) -> Family {
        Family::of(&self.0)
    }

    /// iptables' spelling of the address as a match: `192.0.2.1/32`.
    pub fn as_match(&self) -> String {
        format!("{self}/{}", self.family().host_prefix())
    }
}

impl FromStr for HostIp {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostIp::parse_field("ip", s)
    }
}

impl TryFrom<String> for HostIp {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HostIp> for String {
    /// Stored the way iptables prints it (see [`CanonicalIp`]).
    fn from(h: HostIp) -> String {
        h.to_string()
    }
}

impl fmt::Display for HostIp {
    /// The spelling `iptables -S` prints back (see [`CanonicalIp`]).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        CanonicalIp(self.0).fmt(f)
    }
}

/// An address spelled exactly as iptables prints it: glibc's `inet_ntop`.
///
/// Rust and glibc agree on every address but one group: glibc writes an
/// IPv6 address whose first 96 bits are zero and whose last 32 are not
/// `0.0.0.x` in dotted form (`::1.2.3.4`), where Rust writes `::102:304`.
/// Rules are compared line by line with what `iptables -S` prints, so a
/// different spelling would look like drift forever; natmap therefore uses
/// glibc's spelling everywhere it shows or stores an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanonicalIp(pub IpAddr);

impl fmt::Display for CanonicalIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V6(v6) if ipv4_compatible(&v6) => {
                let [.., a, b, c, d] = v6.octets();
                write!(f, "::{a}.{b}.{c}.{d}")
            }
            ip => ip.fmt(f),
        }
    }
}

/// glibc's test for the dotted form: the longest run of zero groups starts
/// at the front and is exactly six groups long (`::a.b.c.d` with `a.b` not
/// zero). The `::ffff:a.b.c.d` form Rust already writes the same way.
fn ipv4_compatible(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    s[..6].iter().all(|g| *g == 0) && s[6] != 0
}

/// A source network: an address (taken as /32 or /128) or a CIDR, stored with
/// its host bits cleared so `10.0.0.7/24` and `10.0.0.0/24` are the same rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Network(IpNet);

impl Network {
    /// Parses `s` as the value of `field`.
    pub fn parse_field(field: &'static str, s: &str) -> Result<Network, ParseError> {
        const FORM: &str = "an IP address or CIDR such as 10.0.0.5, 10.0.0.0/24 or 2001:db8::/64";
        let s_trim = s;
        let net = if s_trim.contains('/') {
            s_trim
                .parse::<IpNet>()
                .map_err(|_| ParseError::new(field, s, FORM))?
        } else {
            let ip: IpAddr = s_trim
                .parse()
                .map_err(|_| ParseError::new(field, s, FORM))?;
            IpNet::from(ip)
        };
        Ok(Network(net.trunc()))
    }

    /// Builds the network of `ip` with prefix length `prefix` (host bits cleared).
    pub fn new(ip: IpAddr, prefix: u8) -> Option<Network> {
        IpNet::new(ip, prefix).ok().map(|n| Network(n.trunc()))
    }

    /// The network's family.
    pub fn family(&self) -> Family {
        match self.0 {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.0.contains(ip)
    }
}

impl FromStr for Network {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Network::parse_field("network", s)
    }
}

impl TryFrom<String> for Network {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.to_string()
    }
}

impl Network {
    /// Whether the network is every address of its family (`0.0.0.0/0`,
    /// `::/0`). iptables prints no `-s` match at all for it.
    pub fn is_everything(&self) -> bool {
        self.0.prefix_len() == 0
    }

    /// The `-s`/`-d` match for the network as iptables prints it back,
    /// with a trailing space, or nothing for the whole address space.
    pub fn as_match(&self, flag: &str) -> String {
        if self.is_everything() {
            String::new()
        } else {
            format!("{flag} {self} ")
        }
    }
}

impl fmt::Display for Network {
    /// Always `addr/prefix`, as `iptables -S` prints a source match.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", CanonicalIp(self.0.addr()), self.0.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ip_refuses_loopback_and_friends() {
        for s in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:1.2.3.4",
            "1.2.3",
            "x",
            "1.2.3.4\n",
        ] {
            assert!(HostIp::parse_field("int-ip", s).is_err(), "{s:?}");
        }
        let h = HostIp::parse_field("ext-ip", "2001:db8::1").unwrap();
        assert_eq!(h.as_match(), "2001:db8::1/128");
        assert_eq!(h.family(), Family::V6);
    }

    #[test]
    fn network_truncates_host_bits() {
        let n = Network::parse_field("int-ip", "10.0.0.7/24").unwrap();
        assert_eq!(n.to_string(), "10.0.0.0/24");
        assert_eq!(
            Network::parse_field("int-ip", "10.0.0.7")
                .unwrap()
                .to_string(),
            "10.0.0.7/32"
        );
        assert!(Network::parse_field("int-ip", "10.0.0.0/33").is_err());
    }

    #[test]
    fn ipv6_is_spelled_like_glibc() {
        let cases = [
            ("::1.2.3.4", "::1.2.3.4"),
            ("::102:304", "::1.2.3.4"),
            ("::1:2", "::0.1.0.2"),
            ("::2", "::2"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
            ("64:ff9b::1.2.3.4", "64:ff9b::102:304"),
            ("2001:DB8:0:0:1::2", "2001:db8::1:0:0:2"),
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
        ];
        for (input, printed) in cases {
            let ip: IpAddr = input.parse().unwrap();
            assert_eq!(CanonicalIp(ip).to_string(), printed, "{input}");
        }
        let net = Network::parse_field("int-ip", "::1.2.3.4/126").unwrap();
        assert_eq!(net.to_string(), "::1.2.3.4/126");
        assert_eq!(net, Network::parse_field("x", &net.to_string()).unwrap());
        assert!(Network::parse_field("x", "::/0").unwrap().is_everything());
        assert_eq!(
            Network::parse_field("x", "0.0.0.0/0")
                .unwrap()
                .as_match("-s"),
            ""
        );
    }
}
