//! Container bridge ports: whether bridged traffic passes the host's
//! iptables (br_netfilter), which bridge port leads to a container address,
//! and that port's hairpin mode.
//!
//! Kernel facts only: no Docker call, no shell, no `setns` (the unit forbids
//! it with `RestrictNamespaces=yes`), nothing beyond CAP_NET_ADMIN. The port
//! is found from the container's address and network alone:
//! 1. the bridges holding an address in the container's network (the
//!    gateway: `docker0`, or `br-…` of a user-defined network);
//! 2. their ports (a link dump filtered by master) whose veth peer lives in
//!    another network namespace: `IFLA_LINK` is the peer's index there and
//!    `IFLA_LINK_NETNSID` the namespace's id as seen from here;
//! 3. in each such namespace, an address dump of the peer interface
//!    (`IFA_TARGET_NETNSID`, Linux 4.20; strict checking so the kernel
//!    honours the filters): the port whose peer carries the address is the
//!    container's ([`PortFinder`] remembers what it found per port).
//!
//! Interface names and indexes come from the kernel; names are still parsed
//! into [`IfName`] before they become part of a `/sys` path.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::firewall::BridgeNetfilter;
use crate::model::{Family, IfName, Network};

/// br_netfilter's switches; absent while the module is not loaded.
const NF_SYSCTLS: &str = "/proc/sys/net/bridge";

/// Whether bridged traffic passes iptables and ip6tables in this network
/// namespace now (`net.bridge.bridge-nf-call-ip{,6}tables`). Both off when
/// br_netfilter is not loaded: its sysctls do not exist then.
pub fn netfilter() -> BridgeNetfilter {
    let on = |leaf: &str| {
        std::fs::read_to_string(Path::new(NF_SYSCTLS).join(leaf)).is_ok_and(|v| v.trim() == "1")
    };
    BridgeNetfilter {
        iptables: on("bridge-nf-call-iptables"),
        ip6tables: on("bridge-nf-call-ip6tables"),
    }
}

/// The host side of a container's veth: a bridge port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePort {
    /// The port's name (`vethXXXXXXX`).
    pub name: IfName,
    /// Its index, so a name reused by another interface is not mistaken for it.
    pub ifindex: u32,
    /// The bridge it belongs to.
    pub bridge: IfName,
}

impl BridgePort {
    fn sys(&self, leaf: &str) -> PathBuf {
        sys_class_net(&self.name).join(leaf)
    }

    /// Whether the port still exists under its name and index, still a
    /// port of the same bridge (a stopped container's veth is gone).
    pub fn still_there(&self) -> bool {
        let index = std::fs::read_to_string(self.sys("ifindex"));
        let master = std::fs::read_link(self.sys("master"));
        index.is_ok_and(|i| i.trim() == self.ifindex.to_string())
            && master.is_ok_and(|m| m.file_name() == Some(self.bridge.as_str().as_ref()))
    }

    /// Whether the port is in hairpin mode (the bridge may send a frame
    /// back out of the port it came in on).
    pub fn hairpin(&self) -> io::Result<bool> {
        Ok(std::fs::read_to_string(self.sys("brport/hairpin_mode"))?.trim() == "1")
    }

    /// Switches hairpin mode on or off.
    pub fn set_hairpin(&self, on: bool) -> io::Result<()> {
        std::fs::write(self.sys("brport/hairpin_mode"), if on { "1" } else { "0" })
    }

    /// Whether frames of `family` crossing this port's bridge pass the
    /// host's filters: br_netfilter is loaded and either its sysctl
    /// (`global`) or the bridge's own `nf_call_ip{,6}tables` option says so.
    pub fn filtered(&self, family: Family, global: BridgeNetfilter) -> bool {
        if global.filters(family) {
            return true;
        }
        let leaf = match family {
            Family::V4 => "bridge/nf_call_iptables",
            Family::V6 => "bridge/nf_call_ip6tables",
        };
        Path::new(NF_SYSCTLS).exists()
            && std::fs::read_to_string(sys_class_net(&self.bridge).join(leaf))
                .is_ok_and(|v| v.trim() == "1")
    }
}

impl std::fmt::Display for BridgePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (port of {})", self.name, self.bridge)
    }
}

fn sys_class_net(name: &IfName) -> PathBuf {
    Path::new("/sys/class/net").join(name.as_str())
}

/// Finds the bridge ports of container addresses.
///
/// It remembers the addresses found behind each port: a container's
/// addresses on a veth do not change while the veth exists (another network
/// is another veth), so each port's namespace is asked once, and a search
/// costs one link dump per bridge plus one address dump per port it has not
/// seen before, whatever the number of containers.
#[derive(Debug, Default)]
pub struct PortFinder {
    /// (bridge index, port index, port name) → the addresses behind the port.
    behind: HashMap<(u32, u32, String), Vec<IpAddr>>,
}

impl PortFinder {
    /// The bridge port leading to each of `targets` (a container's address
    /// and its network) that a bridge of this host leads to. An address no
    /// bridge leads to (a macvlan or overlay network, a container on the
    /// host's network) is left out.
    pub fn find(
        &mut self,
        targets: &[(IpAddr, Network)],
    ) -> Result<HashMap<IpAddr, BridgePort>, String> {
        let mut found = HashMap::new();
        let bridges = bridges_for(targets)?;
        if bridges.is_empty() {
            return Ok(found);
        }
        let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
        for (bridge, bridge_index, subnets) in bridges {
            let mut wanted: Vec<IpAddr> = targets
                .iter()
                .filter(|(ip, net)| subnets.contains(net) && !found.contains_key(ip))
                .map(|(ip, _)| *ip)
                .collect();
            let ports = nl
                .ports_of(bridge_index)
                .map_err(|e| format!("listing the ports of {bridge}: {e}"))?;
            let key = |p: &Link| (bridge_index, p.index, p.name.clone());
            self.behind.retain(|(b, i, n), _| {
                *b != bridge_index || ports.iter().any(|p| p.index == *i && p.name == *n)
            });
            // Ports seen before first (no kernel call), then the new ones
            // until every address is found.
            let (known, new): (Vec<&Link>, Vec<&Link>) = ports
                .iter()
                .partition(|p| self.behind.contains_key(&key(p)));
            for port in known.into_iter().chain(new) {
                if wanted.is_empty() {
                    break;
                }
                let addrs = self.addresses_of(&mut nl, bridge_index, port)?;
                let Ok(name) = port.name.parse::<IfName>() else {
                    continue;
                };
                wanted.retain(|ip| {
                    if !addrs.contains(ip) {
                        return true;
                    }
                    let port = BridgePort {
                        name: name.clone(),
                        ifindex: port.index,
                        bridge: bridge.clone(),
                    };
                    found.insert(*ip, port);
                    false
                });
            }
        }
        Ok(found)
    }

    /// The addresses behind `port` of bridge `bridge_index`: remembered, or
    /// asked of its namespace once.
    fn addresses_of(
        &mut self,
        nl: &mut Netlink,
        bridge_index: u32,
        port: &Link,
    ) -> Result<Vec<IpAddr>, String> {
        let key = (bridge_index, port.index, port.name.clone());
        if let Some(a) = self.behind.get(&key) {
            return Ok(a.clone());
        }
        let a = nl
            .addresses_behind(port)
            .map_err(|e| format!("reading the addresses behind {}: {e}", port.name))?;
        self.behind.insert(key, a.clone());
        Ok(a)
    }
}

/// The bridges with an address in one of the targets' networks: name,
/// index, and those networks.
fn bridges_for(targets: &[(IpAddr, Network)]) -> Result<Vec<(IfName, u32, Vec<Network>)>, String> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    let mut found: Vec<(IfName, u32, Vec<Network>)> = Vec::new();
    for a in addrs {
        let Some(ip) = a.address.as_ref().and_then(super::local::ip_of) else {
            continue;
        };
        let nets: Vec<Network> = targets
            .iter()
            .map(|(_, net)| *net)
            .filter(|net| net.contains(&ip))
            .collect();
        if nets.is_empty() {
            continue;
        }
        let Ok(name) = a.interface_name.parse::<IfName>() else {
            continue;
        };
        if let Some(known) = found.iter_mut().find(|(n, _, _)| *n == name) {
            known.2.extend(nets);
            continue;
        }
        if !sys_class_net(&name).join("bridge").is_dir() {
            continue;
        }
        let index = std::fs::read_to_string(sys_class_net(&name).join("ifindex"))
            .ok()
            .and_then(|i| i.trim().parse().ok());
        if let Some(index) = index {
            found.push((name, index, nets));
        }
    }
    Ok(found)
}

// ───────────────────────────── rtnetlink ─────────────────────────────

// Constants of <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>
// and <linux/netlink.h>, spelled out because not every libc release has them.
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_TARGET_NETNSID: u16 = 10;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
/// Attribute type bits that are flags (nested, byte order), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

/// A link of a link dump.
#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    /// The veth peer's index in its own namespace.
    peer: Option<u32>,
    /// The peer's namespace, when it is another one.
    peer_netns: Option<i32>,
}

/// A NETLINK_ROUTE socket with strict checking of dump requests.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Strict checking makes the kernel honour the dump filters (master,
        // ifindex, target namespace) instead of ignoring them; a kernel
        // without it answers unfiltered, which the parsers below reject.
        let one: libc::c_int = 1;
        // SAFETY: a valid fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_GET_STRICT_CHK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // A dump never blocks for long; bound it anyway.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid fd and a timeval option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd, seq: 0 })
    }

    /// The ports of bridge `master`.
    fn ports_of(&mut self, master: u32) -> io::Result<Vec<Link>> {
        let header = [0u8; IFINFOMSG_LEN]; // AF_UNSPEC, every field zero
        let replies = self.dump(
            RTM_GETLINK,
            &header,
            &[(IFLA_MASTER, &master.to_ne_bytes())],
        )?;
        let mut links = Vec::new();
        for (kind, body) in replies {
            if kind != RTM_NEWLINK || body.len() < IFINFOMSG_LEN {
                continue;
            }
            let index = u32::from_ne_bytes(body[4..8].try_into().expect("4 bytes"));
            let mut link = Link {
                index,
                name: String::new(),
                peer: None,
                peer_netns: None,
            };
            let mut its_master = None;
            for (ty, data) in attributes(&body[IFINFOMSG_LEN..]) {
                match ty {
                    IFLA_IFNAME => {
                        let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                        link.name = String::from_utf8_lossy(&data[..end]).into_owned();
                    }
                    IFLA_LINK => link.peer = read_u32(data),
                    IFLA_MASTER => its_master = read_u32(data),
                    IFLA_LINK_NETNSID => link.peer_netns = read_u32(data).map(|v| v as i32),
                    _ => {}
                }
            }
            // Filtered here too: a kernel that ignored the filter lists every link.
            if its_master == Some(master) && link.peer_netns.is_some_and(|n| n >= 0) {
                links.push(link);
            }
        }
        Ok(links)
    }

    /// The IPv4 and IPv6 addresses of a port's veth peer, in its namespace.
    fn addresses_behind(&mut self, port: &Link) -> io::Result<Vec<IpAddr>> {
        let (Some(peer), Some(nsid)) = (port.peer, port.peer_netns) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            out.extend(self.addresses_in(nsid, peer, family)?);
        }
        Ok(out)
    }

    /// The addresses of `family` on interface `index` of namespace `nsid`.
    fn addresses_in(&mut self, nsid: i32, index: u32, family: u8) -> io::Result<Vec<IpAddr>> {
        let mut header = [0u8; IFADDRMSG_LEN];
        header[0] = family;
        header[4..8].copy_from_slice(&index.to_ne_bytes());
        let replies = self.dump(
            RTM_GETADDR,
            &header,
            &[(IFA_TARGET_NETNSID, &nsid.to_ne_bytes())],
        )?;
        let mut out = Vec::new();
        for (kind, body) in replies {
            if kind != RTM_NEWADDR || body.len() < IFADDRMSG_LEN || body[0] != family {
                continue;
            }
            let its_index = u32::from_ne_bytes(body[4..8].try_into().expect("4 bytes"));
            let mut from_ns = None;
            let mut addrs = Vec::new();
            for (ty, data) in attributes(&body[IFADDRMSG_LEN..]) {
                match ty {
                    IFA_TARGET_NETNSID => from_ns = read_u32(data).map(|v| v as i32),
                    IFA_ADDRESS | IFA_LOCAL => addrs.extend(ip_of(data)),
                    _ => {}
                }
            }
            // Only an answer about that namespace and interface counts: a
            // kernel that ignored the filters answers about this namespace
            // (without the tag) or about every interface.
            if from_ns == Some(nsid) && its_index == index {
                for a in addrs {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sends one dump request and collects the answers: (type, body).
    fn dump(
        &mut self,
        kind: u16,
        header: &[u8],
        attrs: &[(u16, &[u8])],
    ) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send_to_kernel(&dump_request(kind, seq, header, attrs))?;
        self.answers_to(seq)
    }

    /// Sends `msg` to the kernel.
    fn send_to_kernel(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is the kernel's address once the
        // family is set.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the answers to request `seq` until its NLMSG_DONE: (type, body)
    /// of each; an NLMSG_ERROR with a code is that error.
    fn answers_to(&self, seq: u32) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
                let its_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let body = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align4(len).min(rest.len())..];
                if its_seq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = read_u32(body.get(..4).unwrap_or(&[])).map_or(0, |c| c as i32);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => out.push((ty, body.to_vec())),
                }
            }
        }
    }
}

/// A netlink dump request: header (length, `kind`, REQUEST|DUMP, `seq`),
/// the family `header`, then each attribute (type, bytes) padded to 4.
fn dump_request(kind: u16, seq: u32, header: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
    msg.extend_from_slice(header);
    for (ty, data) in attrs {
        let len = 4 + data.len();
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(data);
        msg.resize(align4(msg.len()), 0);
    }
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg[4..6].copy_from_slice(&kind.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    msg
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An address attribute's value.
fn ip_of(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(..4)?.try_into().ok()?))
}

/// The (type, payload) attributes in `buf`; stops at the first malformed one.
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_split_and_malformed_ones_end_the_list() {
        let mut buf = Vec::new();
        // IFLA_IFNAME "ab\0" (len 7, padded to 8), IFLA_MASTER 5.
        buf.extend_from_slice(&7u16.to_ne_bytes());
        buf.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        buf.extend_from_slice(b"ab\0\0");
        buf.extend_from_slice(&8u16.to_ne_bytes());
        buf.extend_from_slice(&(IFLA_MASTER | 0x8000).to_ne_bytes());
        buf.extend_from_slice(&5u32.to_ne_bytes());
        // A length past the end.
        buf.extend_from_slice(&40u16.to_ne_bytes());
        buf.extend_from_slice(&1u16.to_ne_bytes());
        let attrs = attributes(&buf);
        assert_eq!(attrs.len(), 2, "{attrs:?}");
        assert_eq!(attrs[0], (IFLA_IFNAME, &b"ab\0"[..]));
        assert_eq!(attrs[1].0, IFLA_MASTER, "flag bits masked");
        assert_eq!(read_u32(attrs[1].1), Some(5));
        assert_eq!(read_u32(&[1, 2]), None);
    }

    #[test]
    fn no_bridge_leads_to_a_network_this_host_has_no_address_in() {
        let nowhere: Network = "198.18.254.0/24".parse().unwrap();
        let found = PortFinder::default()
            .find(&[("198.18.254.7".parse().unwrap(), nowhere)])
            .unwrap();
        assert!(found.is_empty(), "{found:?}");
    }
}
