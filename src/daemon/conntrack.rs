//! Cutting tracked connections over ctnetlink, without a process: one
//! `IPCTNL_MSG_CT_GET` dump per address family, the entries picked in user
//! space by the same filter `conntrack -D -f FAMILY -p PROTO [--orig-dst IP]
//! [--orig-port-dst PORT] --reply-src IP` applies, then one
//! `IPCTNL_MSG_CT_DELETE` per entry, named by its original tuple (and zone
//! and id, so an entry that was replaced in the meantime is left alone).
//!
//! The dump carries a kernel-side filter (`CTA_FILTER`, Linux 5.9+) of what
//! all filters of the family have in common, so unrelated connections are
//! not copied to the daemon at all; the kernel still walks its whole hash
//! table (`nf_conntrack_buckets`), which is the floor of a cut. A kernel
//! that refuses the filter gets a plain dump.
//!
//! Built by hand on a `NETLINK_NETFILTER` socket, like the nftables
//! driver's element batches (`firewall::nftables::netlink`): no C library.
//! [`super::host::forget_connections`] falls back to the `conntrack`
//! program when this fails (no `nf_conntrack_netlink`, no permission).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::netlink::{
    attr, attrs, error_of, messages, nested, NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

use super::host::Flows;
use crate::model::Proto;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_FILTER_F_CTA_IP_SRC: u32 = 1 << 0;
const CTA_FILTER_F_CTA_IP_DST: u32 = 1 << 1;
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_CTA_PROTO_DST_PORT: u32 = 1 << 5;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
/// An attribute's type without the nested and byte-order flags.
/// `nlmsghdr` plus `nfgenmsg`: where a ctnetlink message's attributes start.
const CT_HDRLEN: usize = NLMSG_HDRLEN + 4;

/// How long one receive may wait for the kernel (a dump part, or the
/// acknowledgements of a chunk of deletes) before the cut gives up.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many entries are deleted per call; the rest are left to
/// their timeouts (and logged).
pub const MAX_CUT: usize = 65_536;
/// Deletes sent per write; the socket's receive buffer holds their answers.
const DELETE_CHUNK: usize = 256;

/// Deletes every tracked connection that one of `filters` selects: one
/// dump per address family among them, one delete per selected entry.
/// Returns how many entries were deleted (entries that went away between
/// the dump and the delete are not counted, and are not an error).
pub fn cut(filters: &[Flows]) -> io::Result<usize> {
    let mut deleted = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mine: Vec<&Flows> = filters
            .iter()
            .filter(|f| family_of(f.reply_src) == family)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let mut sock = Socket::open()?;
        let mut selected = Vec::new();
        let mut more = 0usize;
        let mut each = |e: Entry| {
            if mine.iter().any(|f| selects(f, &e)) {
                if selected.len() < MAX_CUT {
                    selected.push(e);
                } else {
                    more += 1;
                }
            }
        };
        let common = Common::of(&mine);
        if let Err(e) = sock.dump(family, Some(&common), &mut each) {
            // An older kernel may refuse the filter; the user-space match
            // alone decides what is cut anyway.
            tracing::debug!("conntrack dump with a kernel filter failed ({e}); dumping all");
            sock = Socket::open()?;
            sock.dump(family, None, &mut each)?;
        }
        if more > 0 {
            tracing::warn!(
                "conntrack: {} tracked connections to cut in one go; cut the first {MAX_CUT}, \
                 {more} are left to time out",
                MAX_CUT + more
            );
        }
        deleted += sock.delete(family, &selected)?;
    }
    Ok(deleted)
}

/// The netfilter family (`nfgenmsg.nfgen_family`) of an address.
fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn proto_num(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// Whether `conntrack -D -f FAMILY -p PROTO [--orig-dst IP]
/// [--orig-port-dst PORT] --reply-src IP` deletes `e`: every option given
/// must match (the family is that of the reply source).
fn selects(f: &Flows, e: &Entry) -> bool {
    e.proto == proto_num(f.proto)
        && e.reply_src == f.reply_src
        && f.orig_dst.is_none_or(|d| d == e.orig_dst)
        && f.orig_port.is_none_or(|p| e.orig_dport == Some(p))
}

/// What every filter of one family has in common: the kernel-side filter
/// of the dump (`None`: the filters differ there, or do not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Common {
    proto: Option<Proto>,
    orig_dst: Option<IpAddr>,
    orig_port: Option<u16>,
    reply_src: Option<IpAddr>,
}

impl Common {
    fn of(filters: &[&Flows]) -> Common {
        fn same<T: PartialEq + Copy>(mut all: impl Iterator<Item = Option<T>>) -> Option<T> {
            let first = all.next()??;
            all.all(|v| v == Some(first)).then_some(first)
        }
        let proto = same(filters.iter().map(|f| Some(f.proto)));
        Common {
            proto,
            orig_dst: same(filters.iter().map(|f| f.orig_dst)),
            // A port filter needs the protocol in the kernel.
            orig_port: proto.and(same(filters.iter().map(|f| f.orig_port))),
            reply_src: same(filters.iter().map(|f| Some(f.reply_src))),
        }
    }

    /// `CTA_TUPLE_ORIG`, `CTA_TUPLE_REPLY` and `CTA_FILTER` of a dump request.
    fn write(&self, b: &mut Vec<u8>) {
        // IPv4 addresses only: the kernel compares IPv6 addresses of a
        // filter the wrong way round (`!ipv6_addr_cmp` in
        // `ctnetlink_filter_match_tuple` leaves out exactly the entries that
        // match; seen on 6.18), so an IPv6 filter names protocol and port.
        let v4 = |ip: Option<IpAddr>| match ip {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        };
        let (mut orig_flags, mut reply_flags) = (0, 0);
        let mut orig = Vec::new();
        if let Some(dst) = v4(self.orig_dst) {
            orig_flags |= CTA_FILTER_F_CTA_IP_DST;
            nested(&mut orig, CTA_TUPLE_IP, |a| {
                attr(a, CTA_IP_V4_DST, &dst.octets())
            });
        }
        if let Some(proto) = self.proto {
            orig_flags |= CTA_FILTER_F_CTA_PROTO_NUM;
            if self.orig_port.is_some() {
                orig_flags |= CTA_FILTER_F_CTA_PROTO_DST_PORT;
            }
            nested(&mut orig, CTA_TUPLE_PROTO, |p| {
                attr(p, CTA_PROTO_NUM, &[proto_num(proto)]);
                if let Some(port) = self.orig_port {
                    attr(p, CTA_PROTO_DST_PORT, &port.to_be_bytes());
                }
            });
        }
        let mut reply = Vec::new();
        if let Some(src) = v4(self.reply_src) {
            reply_flags |= CTA_FILTER_F_CTA_IP_SRC;
            nested(&mut reply, CTA_TUPLE_IP, |a| {
                attr(a, CTA_IP_V4_SRC, &src.octets())
            });
        }
        if orig_flags == 0 && reply_flags == 0 {
            return;
        }
        if orig_flags != 0 {
            attr(b, CTA_TUPLE_ORIG | NLA_F_NESTED, &orig);
        }
        if reply_flags != 0 {
            attr(b, CTA_TUPLE_REPLY | NLA_F_NESTED, &reply);
        }
        nested(b, CTA_FILTER, |f| {
            attr(f, CTA_FILTER_ORIG_FLAGS, &orig_flags.to_ne_bytes());
            attr(f, CTA_FILTER_REPLY_FLAGS, &reply_flags.to_ne_bytes());
        });
    }
}

/// What a dumped entry is selected by, and what names it in a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Layer-4 protocol number of the original tuple.
    proto: u8,
    orig_dst: IpAddr,
    /// Destination port of the original tuple (TCP, UDP, SCTP, …).
    orig_dport: Option<u16>,
    reply_src: IpAddr,
    /// The payload of `CTA_TUPLE_ORIG` as the kernel sent it.
    orig_tuple: Vec<u8>,
    /// `CTA_ZONE` (big-endian), when the entry is in a zone.
    zone: Option<[u8; 2]>,
    /// `CTA_ID` (big-endian).
    id: Option<[u8; 4]>,
}

/// One direction's tuple: (source, destination, protocol, destination port).
type Tuple = (Option<IpAddr>, Option<IpAddr>, Option<u8>, Option<u16>);

fn parse_tuple(buf: &[u8]) -> Tuple {
    let (mut src, mut dst, mut proto, mut dport) = (None, None, None, None);
    for (ty, payload) in attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, a) in attrs(payload) {
                    let ip = match (ty, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => {
                            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).expect("4 bytes")))
                        }
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => {
                            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).expect("16 bytes")))
                        }
                        _ => continue,
                    };
                    match ty {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        _ => dst = Some(ip),
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, a) in attrs(payload) {
                    match (ty, a.len()) {
                        (CTA_PROTO_NUM, 1) => proto = Some(a[0]),
                        (CTA_PROTO_DST_PORT, 2) => dport = Some(u16::from_be_bytes([a[0], a[1]])),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src, dst, proto, dport)
}

/// The entry in one `IPCTNL_MSG_CT_NEW` message of a dump (`attrs`: what
/// follows the `nfgenmsg`); `None` when it lacks a part the filter needs.
fn parse_entry(buf: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut zone, mut id) = (None, None, None, None);
    for (ty, payload) in attrs(buf) {
        match ty {
            CTA_TUPLE_ORIG => orig = Some(payload),
            CTA_TUPLE_REPLY => reply = Some(payload),
            CTA_ZONE => zone = payload.try_into().ok(),
            CTA_ID => id = payload.try_into().ok(),
            _ => {}
        }
    }
    let orig = orig?;
    let (_, orig_dst, proto, orig_dport) = parse_tuple(orig);
    let (reply_src, ..) = parse_tuple(reply?);
    Some(Entry {
        proto: proto?,
        orig_dst: orig_dst?,
        orig_dport,
        reply_src: reply_src?,
        orig_tuple: orig.to_vec(),
        zone,
        id,
    })
}

/// A `NETLINK_NETFILTER` socket in the caller's network namespace, with a
/// receive timeout.
struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    fn open() -> io::Result<Socket> {
        Ok(Socket {
            fd: crate::netlink::open_netfilter(Some(RECV_TIMEOUT))?,
            seq: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        crate::netlink::send(&self.fd, buf)
    }

    /// Receives one datagram into `buf`; a timeout is an error.
    fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        crate::netlink::recv(&self.fd, buf).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from ctnetlink within {RECV_TIMEOUT:?}"),
                )
            } else {
                e
            }
        })
    }

    /// Dumps the connection table of `family`, calling `each` per entry;
    /// with `filter`, the kernel leaves out entries it does not match.
    fn dump(
        &mut self,
        family: u8,
        filter: Option<&Common>,
        each: &mut impl FnMut(Entry),
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let mut req = Vec::new();
        message(
            &mut req,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family,
            |b| {
                if let Some(f) = filter {
                    f.write(b);
                }
            },
        );
        self.send(&req)?;
        // A dump part fills at most a page or two; 64 KiB leaves room.
        let mut buf = vec![0u8; 65536];
        loop {
            let data = self.recv(&mut buf)?;
            for (ty, seq_of, msg) in messages(data)? {
                if seq_of != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => error_of(msg)?,
                    t if t == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                        if let Some(e) = msg.get(CT_HDRLEN..).and_then(parse_entry) {
                            each(e);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Deletes `entries` of `family`, in chunks of [`DELETE_CHUNK`] per
    /// write, each answered before the next; returns how many the kernel
    /// deleted (an entry already gone, `ENOENT`, is skipped).
    fn delete(&mut self, family: u8, entries: &[Entry]) -> io::Result<usize> {
        let mut deleted = 0;
        let mut buf = vec![0u8; 65536];
        for chunk in entries.chunks(DELETE_CHUNK) {
            let first = self.seq.wrapping_add(1);
            let mut req = Vec::with_capacity(chunk.len() * 96);
            for e in chunk {
                let seq = self.next_seq();
                delete_message(&mut req, seq, family, e);
            }
            self.send(&req)?;
            let mut pending = chunk.len();
            while pending > 0 {
                let data = self.recv(&mut buf)?;
                for (ty, seq, msg) in messages(data)? {
                    if ty != NLMSG_ERROR || seq.wrapping_sub(first) as usize >= chunk.len() {
                        continue;
                    }
                    pending -= 1;
                    match error_of(msg) {
                        Ok(()) => deleted += 1,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(deleted)
    }
}

/// `IPCTNL_MSG_CT_DELETE` of one entry, acknowledged.
fn delete_message(buf: &mut Vec<u8>, seq: u32, family: u8, e: &Entry) {
    message(
        buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        |b| {
            attr(b, CTA_TUPLE_ORIG | NLA_F_NESTED, &e.orig_tuple);
            if let Some(zone) = e.zone {
                attr(b, CTA_ZONE, &zone);
            }
            if let Some(id) = e.id {
                attr(b, CTA_ID, &id);
            }
        },
    );
}

/// One netlink message with an `nfgenmsg` header (version 0, resource id
/// 0); `body` writes the attributes.
fn message(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    body: impl FnOnce(&mut Vec<u8>),
) {
    crate::netlink::message(buf, (ty, flags, seq), family, 0, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tuple as the kernel dumps it: addresses, then protocol and ports.
    fn tuple(buf: &mut Vec<u8>, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) {
        nested(buf, CTA_TUPLE_IP, |b| match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                attr(b, CTA_IP_V4_SRC, &s.octets());
                attr(b, CTA_IP_V4_DST, &d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                attr(b, CTA_IP_V6_SRC, &s.octets());
                attr(b, CTA_IP_V6_DST, &d.octets());
            }
            _ => unreachable!("one family per tuple"),
        });
        nested(buf, CTA_TUPLE_PROTO, |b| {
            attr(b, CTA_PROTO_NUM, &[proto]);
            attr(b, 2, &sport.to_be_bytes());
            attr(b, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
        });
    }

    /// One dumped `IPCTNL_MSG_CT_NEW` message of a DNATed connection
    /// `client:sport -> orig_dst:dport`, answered by `target:tport`.
    #[allow(clippy::too_many_arguments)]
    fn dumped(
        proto: u8,
        client: &str,
        sport: u16,
        orig_dst: &str,
        dport: u16,
        target: &str,
        tport: u16,
        zone: Option<u16>,
    ) -> Vec<u8> {
        let (client, orig_dst, target): (IpAddr, IpAddr, IpAddr) = (
            client.parse().unwrap(),
            orig_dst.parse().unwrap(),
            target.parse().unwrap(),
        );
        let mut m = Vec::new();
        message(
            &mut m,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
            0x2, // NLM_F_MULTI
            9,
            family_of(client),
            |b| {
                nested(b, CTA_TUPLE_ORIG, |b| {
                    tuple(b, client, orig_dst, proto, sport, dport)
                });
                nested(b, CTA_TUPLE_REPLY, |b| {
                    tuple(b, target, client, proto, tport, sport)
                });
                attr(b, 3, &0x188u32.to_be_bytes()); // CTA_STATUS
                attr(b, 7, &30u32.to_be_bytes()); // CTA_TIMEOUT
                attr(b, CTA_ID, &0xdead_beefu32.to_be_bytes());
                if let Some(z) = zone {
                    attr(b, CTA_ZONE, &z.to_be_bytes());
                }
            },
        );
        m
    }

    fn entry(msg: &[u8]) -> Entry {
        parse_entry(&msg[CT_HDRLEN..]).expect("an entry")
    }

    fn flows(proto: Proto, orig_dst: Option<&str>, port: Option<u16>, reply_src: &str) -> Flows {
        Flows {
            proto,
            orig_dst: orig_dst.map(|d| d.parse().unwrap()),
            orig_port: port,
            reply_src: reply_src.parse().unwrap(),
        }
    }

    #[test]
    fn a_dumped_entry_is_read_from_its_tuples() {
        let msg = dumped(
            17,
            "192.0.2.2",
            40000,
            "192.0.2.1",
            5353,
            "198.51.100.2",
            53,
            Some(7),
        );
        let e = entry(&msg);
        assert_eq!(e.proto, 17);
        assert_eq!(e.orig_dst, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.orig_dport, Some(5353));
        assert_eq!(e.reply_src, "198.51.100.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.zone, Some(7u16.to_be_bytes()));
        assert_eq!(e.id, Some(0xdead_beefu32.to_be_bytes()));

        let v6 = entry(&dumped(
            6,
            "2001:db8:1::2",
            1,
            "2001:db8:1::1",
            8080,
            "2001:db8:2::2",
            80,
            None,
        ));
        assert_eq!(v6.orig_dst, "2001:db8:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.reply_src, "2001:db8:2::2".parse::<IpAddr>().unwrap());
        assert_eq!((v6.proto, v6.orig_dport, v6.zone), (6, Some(8080), None));
    }

    #[test]
    fn a_message_without_both_tuples_or_cut_short_is_no_entry() {
        let msg = dumped(6, "192.0.2.2", 1, "192.0.2.1", 25, "198.51.100.2", 25, None);
        // The original tuple alone (the reply tuple's attribute cut off).
        let attrs_only = &msg[CT_HDRLEN..];
        let orig_len = u16::from_ne_bytes([attrs_only[0], attrs_only[1]]);
        assert_eq!(
            parse_entry(&attrs_only[..crate::netlink::align(orig_len.into())]),
            None
        );
        // A truncated attribute stops the walk rather than reading past it.
        assert_eq!(parse_entry(&attrs_only[..10]), None);
        assert_eq!(parse_entry(&[]), None);
    }

    #[test]
    fn the_filter_selects_what_conntrack_d_selects() {
        let e = entry(&dumped(
            17,
            "192.0.2.2",
            40000,
            "192.0.2.1",
            5353,
            "198.51.100.2",
            5353,
            None,
        ));
        // dnat's filter: protocol, original destination, reply source.
        assert!(selects(
            &flows(Proto::Udp, Some("192.0.2.1"), None, "198.51.100.2"),
            &e
        ));
        // Docker's, with the port; and with no host address.
        assert!(selects(
            &flows(Proto::Udp, Some("192.0.2.1"), Some(5353), "198.51.100.2"),
            &e
        ));
        assert!(selects(
            &flows(Proto::Udp, None, Some(5353), "198.51.100.2"),
            &e
        ));
        // Any option that differs leaves the entry alone.
        for other in [
            flows(Proto::Tcp, Some("192.0.2.1"), None, "198.51.100.2"),
            flows(Proto::Udp, Some("192.0.2.9"), None, "198.51.100.2"),
            flows(Proto::Udp, Some("192.0.2.1"), Some(5354), "198.51.100.2"),
            flows(Proto::Udp, Some("192.0.2.1"), None, "198.51.100.3"),
            // The client's address is the reply's destination, not its source.
            flows(Proto::Udp, None, None, "192.0.2.2"),
            flows(Proto::Udp, None, None, "2001:db8:2::2"),
        ] {
            assert!(!selects(&other, &e), "{other:?} selected {e:?}");
        }
    }

    #[test]
    fn a_delete_names_the_entry_by_its_original_tuple_zone_and_id() {
        let msg = dumped(
            6,
            "192.0.2.2",
            1,
            "192.0.2.1",
            25,
            "198.51.100.2",
            25,
            Some(3),
        );
        let e = entry(&msg);
        let mut del = Vec::new();
        delete_message(&mut del, 42, libc::AF_INET as u8, &e);
        let parsed = messages(&del).unwrap();
        assert_eq!(parsed.len(), 1);
        let (ty, seq, m) = parsed[0];
        assert_eq!(ty, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE);
        assert_eq!(seq, 42);
        assert_eq!(
            u16::from_ne_bytes([m[6], m[7]]),
            NLM_F_REQUEST | NLM_F_ACK,
            "acknowledged, so the cut waits for the kernel"
        );
        assert_eq!(m[NLMSG_HDRLEN], libc::AF_INET as u8);
        let got: Vec<(u16, Vec<u8>)> = attrs(&m[CT_HDRLEN..])
            .map(|(t, p)| (t, p.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                (CTA_TUPLE_ORIG, e.orig_tuple.clone()),
                (CTA_ZONE, 3u16.to_be_bytes().to_vec()),
                (CTA_ID, 0xdead_beefu32.to_be_bytes().to_vec()),
            ]
        );
        // The tuple is the original direction, as dumped.
        assert_eq!(
            parse_tuple(&e.orig_tuple).1,
            Some("192.0.2.1".parse().unwrap())
        );
        // Without a zone, none is sent (the default zone).
        let mut plain = entry(&msg);
        plain.zone = None;
        let mut del = Vec::new();
        delete_message(&mut del, 1, libc::AF_INET as u8, &plain);
        assert!(!attrs(&del[CT_HDRLEN..]).any(|(t, _)| t == CTA_ZONE));
    }

    #[test]
    fn the_kernel_filter_is_what_every_filter_of_the_family_has_in_common() {
        let a = flows(Proto::Udp, Some("192.0.2.1"), Some(53), "198.51.100.2");
        let b = flows(Proto::Udp, Some("192.0.2.1"), Some(54), "198.51.100.2");
        let c = flows(Proto::Tcp, None, Some(53), "198.51.100.2");
        assert_eq!(
            Common::of(&[&a]),
            Common {
                proto: Some(Proto::Udp),
                orig_dst: Some("192.0.2.1".parse().unwrap()),
                orig_port: Some(53),
                reply_src: Some("198.51.100.2".parse().unwrap()),
            }
        );
        let ab = Common::of(&[&a, &b]);
        assert_eq!((ab.proto, ab.orig_port), (Some(Proto::Udp), None));
        assert!(ab.orig_dst.is_some() && ab.reply_src.is_some());
        // No common protocol: no port either (the kernel needs both).
        let ac = Common::of(&[&a, &c]);
        assert_eq!((ac.proto, ac.orig_dst, ac.orig_port), (None, None, None));
        assert!(ac.reply_src.is_some());

        // Written as the kernel reads it: tuples carrying the flagged parts.
        let mut req = Vec::new();
        Common::of(&[&a]).write(&mut req);
        let got: Vec<(u16, Vec<u8>)> = attrs(&req).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(
            got.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_FILTER]
        );
        assert_eq!(
            parse_tuple(&got[0].1),
            (None, Some("192.0.2.1".parse().unwrap()), Some(17), Some(53))
        );
        assert_eq!(
            parse_tuple(&got[1].1).0,
            Some("198.51.100.2".parse().unwrap())
        );
        let flags: Vec<u32> = attrs(&got[2].1)
            .map(|(_, p)| u32::from_ne_bytes(p.try_into().unwrap()))
            .collect();
        assert_eq!(
            flags,
            [
                CTA_FILTER_F_CTA_IP_DST
                    | CTA_FILTER_F_CTA_PROTO_NUM
                    | CTA_FILTER_F_CTA_PROTO_DST_PORT,
                CTA_FILTER_F_CTA_IP_SRC
            ]
        );
        // IPv6 addresses are left to the user-space match.
        let v6 = flows(
            Proto::Tcp,
            Some("2001:db8:1::1"),
            Some(443),
            "2001:db8:2::2",
        );
        let mut req = Vec::new();
        Common::of(&[&v6]).write(&mut req);
        let kinds: Vec<u16> = attrs(&req).map(|(t, _)| t).collect();
        assert_eq!(kinds, [CTA_TUPLE_ORIG, CTA_FILTER]);
        let orig = attrs(&req).next().unwrap().1;
        assert_eq!(parse_tuple(orig), (None, None, Some(6), Some(443)));
        // Nothing in common: a plain dump.
        let none = Common {
            proto: None,
            orig_dst: None,
            orig_port: None,
            reply_src: None,
        };
        let mut req = Vec::new();
        none.write(&mut req);
        assert!(req.is_empty());
    }

    #[test]
    fn answers_are_split_into_messages_and_errors() {
        let mut data = Vec::new();
        for (seq, errno) in [(5u32, 0i32), (6, -libc::ENOENT)] {
            let start = data.len();
            data.extend_from_slice(&36u32.to_ne_bytes());
            data.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            data.extend_from_slice(&0u16.to_ne_bytes());
            data.extend_from_slice(&seq.to_ne_bytes());
            data.extend_from_slice(&0u32.to_ne_bytes());
            data.extend_from_slice(&errno.to_ne_bytes());
            data.resize(start + 36, 0);
        }
        let msgs = messages(&data).unwrap();
        assert_eq!(msgs.len(), 2);
        assert!(error_of(msgs[0].2).is_ok());
        assert_eq!(
            error_of(msgs[1].2).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert!(messages(&data[..20]).is_err(), "a message cut short");
    }
}
