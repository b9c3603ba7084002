//! Element changes over netlink, without a process: one batch of
//! `NFT_MSG_NEWSETELEM`/`NFT_MSG_DELSETELEM` on a `NETLINK_NETFILTER`
//! socket, built by hand (no C library; `rustables` is GPL and does not fit
//! natmap's MIT licence).
//!
//! The driver's per-change path: every element change of a request is one
//! batch here (interval maps of concatenations carry `NFTA_SET_ELEM_KEY_END`);
//! the whole table (start, recovery, repair) still goes through `nft -f -`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;

use crate::model::Family;
pub(super) use crate::netlink::attr;
use crate::netlink::{
    attrs, error_of, messages, nested, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REQUEST,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
/// Elements per message: the largest (an IPv6 interface-bound interval
/// with its value) takes under 120 bytes, so 256 stay well below the
/// 64 KiB of a nested attribute.
const ELEMENTS_PER_MESSAGE: usize = 256;
/// Room for a whole table's elements in one batch (a repair sends them
/// all; the kernel grants root more than wmem_max).
const SEND_BUFFER: libc::c_int = 32 << 20;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
/// Attribute 1 of table, chain, rule and set messages: the table's name.
const ATTR_TABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One element: its key and, for a map, its value, each in the kernel's
/// register layout (every part of a concatenation padded to 4 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The key bytes.
    pub key: Vec<u8>,
    /// The last key of the interval (interval maps of concatenations only).
    pub key_end: Option<Vec<u8>>,
    /// The value bytes (maps only).
    pub data: Option<Vec<u8>>,
}

/// Elements to add to or delete from one set, one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    /// The set or map.
    pub set: &'static str,
    /// Add (`NEWSETELEM`) or delete (`DELSETELEM`).
    pub add: bool,
    /// The elements.
    pub elements: Vec<Element>,
}

/// One `NEWSETELEM` (created, acknowledged) or `DELSETELEM` message of
/// `elements` (some of `change`'s), with sequence number and family `(seq, nfproto)`.
fn element_message(
    batch: &mut Vec<u8>,
    change: &SetChange,
    elements: &[Element],
    (seq, nfproto): (u32, u8),
    table: &str,
) {
    let (kind, flags) = if change.add {
        (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
    } else {
        (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
    };
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | kind;
    message(batch, ty, flags, seq, nfproto, |b| {
        attr(b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(b, NFTA_SET_ELEM_LIST_SET, &cstr(change.set));
        nested(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
            for e in elements {
                nested(b, NFTA_LIST_ELEM, |b| {
                    nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &e.key));
                    if let Some(end) = &e.key_end {
                        nested(b, NFTA_SET_ELEM_KEY_END, |b| attr(b, NFTA_DATA_VALUE, end));
                    }
                    if let Some(data) = &e.data {
                        nested(b, NFTA_SET_ELEM_DATA, |b| attr(b, NFTA_DATA_VALUE, data));
                    }
                });
            }
        });
    });
}

/// Appends one concatenation part, padded to a 4-byte register.
pub fn push_part(buf: &mut Vec<u8>, part: &[u8]) {
    buf.extend_from_slice(part);
    buf.resize(buf.len() + (4 - part.len() % 4) % 4, 0);
}

/// Rules per chain and elements per set, by name ([`Netlink::count_table`]).
pub type TableCounts = (BTreeMap<String, usize>, BTreeMap<String, usize>);

/// A `NETLINK_NETFILTER` socket in the caller's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens and binds the socket.
    pub fn open() -> io::Result<Netlink> {
        let fd = crate::netlink::open_netfilter(None)?;
        // Room for a whole table's elements (root may pass wmem_max).
        if crate::netlink::set_int_option(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SEND_BUFFER)
            .is_err()
        {
            let _ =
                crate::netlink::set_int_option(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SEND_BUFFER);
        }
        // Its batches are natmap's own, not drift (events.rs).
        if let Ok(port) = crate::netlink::port_id(&fd) {
            super::events::own_socket(port);
        }
        Ok(Netlink { fd, seq: 1 })
    }

    /// Deletes `del` then adds `add` in set `set` of natmap's `table` of
    /// `family`, as one atomic batch; waits for the kernel's answer.
    pub fn change(
        &mut self,
        family: Family,
        table: &str,
        set: &'static str,
        add: &[Element],
        del: &[Element],
    ) -> io::Result<()> {
        let changes = [
            SetChange {
                set,
                add: false,
                elements: del.to_vec(),
            },
            SetChange {
                set,
                add: true,
                elements: add.to_vec(),
            },
        ];
        self.batch(family, table, &changes)
    }

    /// `changes` in order, as one atomic batch in natmap's `table` of
    /// `family`; waits for the kernel's answer (an error: nothing changed).
    pub fn batch(&mut self, family: Family, table: &str, changes: &[SetChange]) -> io::Result<()> {
        let nfproto = match family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        };
        let mut batch = Vec::new();
        let mut acks = 0;
        let begin = self.next_seq();
        message(
            &mut batch,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            |_| {},
        );
        for change in changes {
            if change.elements.is_empty() {
                continue;
            }
            // An attribute's length is 16 bits: a long list goes in
            // several messages of the same batch (still one transaction).
            for chunk in change.elements.chunks(ELEMENTS_PER_MESSAGE) {
                let seq = self.next_seq();
                acks += 1;
                element_message(&mut batch, change, chunk, (seq, nfproto), table);
            }
        }
        let end = self.next_seq();
        message(
            &mut batch,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            |_| {},
        );
        if acks == 0 {
            return Ok(());
        }
        crate::netlink::send(&self.fd, &batch)?;
        self.read_acks(acks)
    }

    /// Counts what `table` of `family` holds, read over netlink (no
    /// process, nothing parsed but the counts): rules per chain and
    /// elements per set or map, by name; `None` when the table does not
    /// exist. Every set of natmap's table is a hash or a concatenation
    /// (one kernel element per element, as `nft` lists them).
    pub fn count_table(&mut self, family: Family, table: &str) -> io::Result<Option<TableCounts>> {
        let nfproto = nfproto(family);
        let name = cstr(table);
        let get = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE;
        match self.request(
            get,
            NLM_F_REQUEST | NLM_F_ACK,
            nfproto,
            &[(NFTA_TABLE_NAME, &name)],
            |_| {},
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let ours = |body: &[u8]| attr_of(body, ATTR_TABLE) == Some(&name[..]);
        let mut chains = BTreeMap::new();
        let chain_dump = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN;
        self.request(
            chain_dump,
            NLM_F_REQUEST | NLM_F_DUMP,
            nfproto,
            &[(ATTR_TABLE, &name)],
            |body| {
                if ours(body) {
                    if let Some(chain) = attr_of(body, NFTA_CHAIN_NAME) {
                        chains.entry(string(chain)).or_insert(0);
                    }
                }
            },
        )?;
        let rule_dump = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE;
        self.request(
            rule_dump,
            NLM_F_REQUEST | NLM_F_DUMP,
            nfproto,
            &[(ATTR_TABLE, &name)],
            |body| {
                if ours(body) {
                    if let Some(chain) = attr_of(body, NFTA_RULE_CHAIN) {
                        *chains.entry(string(chain)).or_insert(0) += 1;
                    }
                }
            },
        )?;
        let mut sets = BTreeMap::new();
        let set_dump = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSET;
        self.request(
            set_dump,
            NLM_F_REQUEST | NLM_F_DUMP,
            nfproto,
            &[(ATTR_TABLE, &name)],
            |body| {
                // Anonymous sets (`{ tcp, udp }` in a rule) are the rule's,
                // not listed by `nft` as sets.
                let anonymous = attr_of(body, NFTA_SET_FLAGS)
                    .and_then(|v| v.get(..4))
                    .is_some_and(|v| {
                        u32::from_be_bytes(v.try_into().expect("4 bytes")) & NFT_SET_ANONYMOUS != 0
                    });
                if ours(body) && !anonymous {
                    if let Some(set) = attr_of(body, NFTA_SET_NAME) {
                        sets.insert(string(set), 0usize);
                    }
                }
            },
        )?;
        let elem_dump = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM;
        for (set, count) in sets.iter_mut() {
            let set_name = cstr(set);
            self.request(
                elem_dump,
                NLM_F_REQUEST | NLM_F_DUMP,
                nfproto,
                &[
                    (NFTA_SET_ELEM_LIST_TABLE, &name),
                    (NFTA_SET_ELEM_LIST_SET, &set_name),
                ],
                |body| {
                    if let Some(list) = attr_of(body, NFTA_SET_ELEM_LIST_ELEMENTS) {
                        *count += attrs(list).filter(|&(ty, _)| ty == NFTA_LIST_ELEM).count();
                    }
                },
            )?;
        }
        Ok(Some((chains, sets)))
    }

    /// Sends one request (`attrs` as strings) and reads its answers until
    /// the acknowledgement (or, for a dump, its end), handing the body of
    /// every answer after its nfgenmsg to `each`.
    fn request(
        &mut self,
        ty: u16,
        flags: u16,
        nfproto: u8,
        request_attrs: &[(u16, &[u8])],
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let mut req = Vec::new();
        message(&mut req, ty, flags, seq, nfproto, |b| {
            for (t, v) in request_attrs {
                attr(b, *t, v);
            }
        });
        crate::netlink::send(&self.fd, &req)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut interrupted = false;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut msgs = crate::netlink::recv(&self.fd, &mut buf)?;
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
                let msg_flags = u16::from_ne_bytes(msgs[6..8].try_into().expect("2 bytes"));
                let got = u32::from_ne_bytes(msgs[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > msgs.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                let body = &msgs[16..len];
                msgs = &msgs[crate::netlink::align(len).min(msgs.len())..];
                if got != seq {
                    continue;
                }
                if msg_flags & NLM_F_DUMP_INTR != 0 {
                    // The ruleset changed during the dump: the counts
                    // may be torn (the caller reads another way).
                    interrupted = true;
                }
                match ty {
                    NLMSG_ERROR if body.len() >= 4 => {
                        let errno = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    NLMSG_DONE if interrupted => {
                        return Err(io::Error::from_raw_os_error(libc::EINTR))
                    }
                    NLMSG_DONE => return Ok(()),
                    _ if body.len() >= 4 => each(&body[4..]),
                    _ => {}
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Reads answers until `acks` acknowledgements arrived; the first error
    /// the kernel reports is returned (the batch then changed nothing).
    fn read_acks(&self, mut acks: usize) -> io::Result<()> {
        let mut buf = vec![0u8; 65536];
        while acks > 0 {
            let data = crate::netlink::recv(&self.fd, &mut buf)?;
            for (ty, _, msg) in messages(data)? {
                if ty == NLMSG_ERROR {
                    error_of(msg)?;
                    acks -= 1;
                }
            }
        }
        Ok(())
    }
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

fn attr_of(body: &[u8], want: u16) -> Option<&[u8]> {
    attrs(body).find(|&(ty, _)| ty == want).map(|(_, v)| v)
}

/// A string attribute's text, up to its NUL.
fn string(v: &[u8]) -> String {
    let v = v.split(|&b| b == 0).next().unwrap_or(v);
    String::from_utf8_lossy(v).into_owned()
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// One netlink message with an nfgenmsg header; `body` writes the
/// attributes. Batch markers name the nf_tables subsystem as their resource.
pub(super) fn message(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    nfproto: u8,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let res_id = if ty == NFNL_MSG_BATCH_BEGIN || ty == NFNL_MSG_BATCH_END {
        NFNL_SUBSYS_NFTABLES
    } else {
        0
    };
    crate::netlink::message(buf, (ty, flags, seq), nfproto, res_id, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_parts_are_padded_to_registers() {
        let mut key = Vec::new();
        push_part(&mut key, &[17]);
        push_part(&mut key, &8080u16.to_be_bytes());
        assert_eq!(key, [17, 0, 0, 0, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn a_batch_message_is_framed_and_aligned() {
        let mut b = Vec::new();
        message(&mut b, 0x0a0c, NLM_F_REQUEST, 7, NFPROTO_IPV4, |b| {
            attr(b, NFTA_SET_ELEM_LIST_TABLE, &cstr("natmap"));
        });
        assert_eq!(b.len() % 4, 0);
        // Header, nfgenmsg, attribute header, "natmap\0" padded to 8.
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            16 + 4 + 4 + 8
        );
        assert_eq!(b[16], NFPROTO_IPV4);
    }
}
