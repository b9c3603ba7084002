//! The iptables driver: everything natmap knows about iptables.
//!
//! # Layout
//! - [`driver`]: [`IptablesDriver`], the [`crate::firewall::FirewallDriver`]
//!   over the modules below, and its mirror of what it applied;
//! - [`render`]: pure, rules → the lines of natmap's chains ([`Ruleset`]),
//!   which [`FamilyRules::kernel`] lays out in the kernel's chains: the DNAT
//!   and FORWARD ACCEPT lines in shards by protocol and port block, created
//!   with their first line and removed with their last;
//! - [`restore`]: pure, a ruleset (and, for a full apply, what
//!   `iptables-save` showed) → one `iptables-restore --noflush` transaction;
//! - [`saved`]: `iptables-save` parsed just enough to find natmap's chains,
//!   their hooks and drift;
//! - `counters`: per-rule counters from `iptables-save -c`, Docker's own
//!   published ports;
//! - [`exec`]: running `iptables-restore`/`-save` (real and recording
//!   executors), flavor detection (iptables-nft or iptables-legacy).
//!
//! Rendering and transactions run no process, so they are tested against
//! golden text (`testdata/`).

mod counters;
pub mod driver;
pub mod exec;
pub mod render;
pub mod restore;
pub mod saved;

pub use driver::IptablesDriver;

use crate::model::Family;

/// One of the chains natmap owns, in one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    /// nat `NATMAP`, hooked from `PREROUTING`: DNAT of traffic arriving from outside.
    NatPrerouting,
    /// nat `NATMAP-OUTPUT`, hooked from `OUTPUT`: DNAT of the host's own traffic.
    NatOutput,
    /// nat `NATMAP-POSTROUTING`, hooked from `POSTROUTING`: SNAT and hairpin MASQUERADE.
    NatPostrouting,
    /// filter `NATMAP`, hooked from `DOCKER-USER`: FORWARD ACCEPT for forwarded targets.
    FilterForward,
}

impl Chain {
    /// Every natmap chain, in the order they are rendered.
    pub const ALL: [Chain; 4] = [
        Chain::NatPrerouting,
        Chain::NatOutput,
        Chain::NatPostrouting,
        Chain::FilterForward,
    ];

    /// The table the chain lives in.
    pub fn table(self) -> &'static str {
        match self {
            Chain::FilterForward => "filter",
            _ => "nat",
        }
    }

    /// The chain's name.
    pub fn name(self) -> &'static str {
        match self {
            Chain::NatPrerouting | Chain::FilterForward => "NATMAP",
            Chain::NatOutput => "NATMAP-OUTPUT",
            Chain::NatPostrouting => "NATMAP-POSTROUTING",
        }
    }

    /// The chain that jumps to it (natmap's only rule outside its own chains).
    pub fn hook(self) -> &'static str {
        match self {
            Chain::NatPrerouting => "PREROUTING",
            Chain::NatOutput => "OUTPUT",
            Chain::NatPostrouting => "POSTROUTING",
            Chain::FilterForward => DOCKER_USER,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the chain's port-keyed lines live in shards (sub-chains it
    /// jumps to, one per protocol and block of [`SHARD_WIDTH`] ports).
    /// iptables-nft fetches and parses the whole chain a `-D` deletes from,
    /// so a delete in one 8,000-line chain took ~400 ms, one in a chain of
    /// ~1,000 lines tens of ms. `NATMAP-POSTROUTING` stays one chain: an
    /// SNAT and a hairpin MASQUERADE may match the same packet, so its
    /// order across rules matters, and it holds lines only for SNAT,
    /// hairpin and masqueraded Docker mappings.
    pub fn is_sharded(self) -> bool {
        !matches!(self, Chain::NatPostrouting)
    }

    /// The name of this chain's shard for `key`: `NATMAP-T12` (nat
    /// `NATMAP` and filter `NATMAP`), `NATMAP-OUTPUT-U3`.
    pub fn shard_name(self, key: ShardKey) -> String {
        format!("{}-{key}", self.name())
    }

    /// Whether `name` is one of this chain's shards (whether or not natmap
    /// wants it now): `<name>-<T|U><block>`.
    pub fn is_shard_name(self, name: &str) -> bool {
        self.is_sharded()
            && name
                .strip_prefix(self.name())
                .and_then(|r| r.strip_prefix('-'))
                .and_then(ShardKey::parse)
                .is_some_and(|k| self.shard_name(k) == name)
    }
}

/// How many ports one shard covers: 256 blocks per protocol. A packet
/// walks its chain's jumps (one per non-empty shard and port side) and at
/// most the shards its ports fall in. 256 ports keep a full shard at 256
/// DNAT lines (512 accepts) for a `-D` to fetch (with 1,024, one delete's
/// transaction in full shards took 93 ms at 20,000 rules against 22 ms in
/// near-empty ones), while 8,000 rules on consecutive ports need only 32
/// jumps.
pub const SHARD_WIDTH: u32 = 256;

/// Which shard a port-keyed line goes to: its protocol and the block of
/// [`SHARD_WIDTH`] ports it matches (`T12` is tcp 3072-3327).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardKey {
    /// `tcp` or `udp`, as iptables spells it.
    pub proto: &'static str,
    /// The block: ports `block * SHARD_WIDTH ..= (block + 1) * SHARD_WIDTH - 1`.
    pub block: u16,
}

impl ShardKey {
    /// The ports of the block, as `first:last`.
    pub fn ports(self) -> String {
        let first = u32::from(self.block) * SHARD_WIDTH;
        format!("{first}:{}", (first + SHARD_WIDTH - 1).min(65_535))
    }

    fn letter(self) -> char {
        if self.proto == "udp" {
            'U'
        } else {
            'T'
        }
    }

    /// `T12` → the key, anything else → `None`.
    fn parse(s: &str) -> Option<ShardKey> {
        let proto = match s.chars().next()? {
            'T' => "tcp",
            'U' => "udp",
            _ => return None,
        };
        let block: u16 = s[1..].parse().ok()?;
        (u32::from(block) * SHARD_WIDTH <= 65_535).then_some(ShardKey { proto, block })
    }
}

impl std::fmt::Display for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.letter(), self.block)
    }
}

/// The port match a line is keyed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSide {
    /// `--dport`/`--dports`.
    Destination,
    /// `--sport`/`--sports` (the reply half of a FORWARD accept).
    Source,
}

impl PortSide {
    fn option(self) -> &'static str {
        match self {
            PortSide::Destination => "--dport",
            PortSide::Source => "--sport",
        }
    }
}

/// The shards a line goes to and the side it is keyed on, read from the
/// line as rendered: `-p tcp|udp` and its one port match (`-m tcp --dport
/// 25`, `--dport 8000:8010`, `-m multiport --dports 25,465`). A line whose
/// ports span several blocks goes, unchanged, into each of their shards:
/// the parent's jump to a shard matches only that block's ports, so each
/// of the line's ports reaches it in exactly one shard. `None` for a line
/// with no port match, or a negated one (it stays in the parent).
pub fn shard_keys(line: &str) -> Option<(PortSide, Vec<ShardKey>)> {
    let mut words = line.split_whitespace();
    let mut proto = None;
    let mut found: Option<(PortSide, &str)> = None;
    let mut negated = false;
    while let Some(w) = words.next() {
        // A negated port match (`! --dport 25`, never rendered) is no key.
        if negated && w.starts_with("--") && w.contains("port") {
            return None;
        }
        negated = w == "!";
        match w {
            "-p" => {
                proto = match words.next()? {
                    "tcp" => Some("tcp"),
                    "udp" => Some("udp"),
                    _ => return None,
                }
            }
            "--dport" | "--dports" if found.is_none() => {
                found = Some((PortSide::Destination, words.next()?));
            }
            "--sport" | "--sports" if found.is_none() => {
                found = Some((PortSide::Source, words.next()?));
            }
            _ => {}
        }
    }
    let (side, list) = found?;
    let proto = proto?;
    let mut blocks: Vec<u16> = Vec::new();
    for item in list.split(',') {
        let (a, b) = item.split_once(':').unwrap_or((item, item));
        let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
        for block in a / SHARD_WIDTH..=b / SHARD_WIDTH {
            blocks.push(u16::try_from(block).ok()?);
        }
    }
    blocks.sort_unstable();
    blocks.dedup();
    Some((
        side,
        blocks
            .into_iter()
            .map(|block| ShardKey { proto, block })
            .collect(),
    ))
}

/// The parent's jump to the shard `key` of `chain` for packets whose
/// `side` port is in its block, as `iptables -S` prints it.
pub fn shard_jump(chain: Chain, key: ShardKey, side: PortSide) -> String {
    format!(
        "-p {p} -m {p} {} {} -j {}",
        side.option(),
        key.ports(),
        chain.shard_name(key),
        p = key.proto
    )
}

/// One chain as it exists in the kernel: a parent (a [`Chain`]), or a
/// shard of one, with the lines it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChain<'a> {
    /// The table it lives in.
    pub table: &'static str,
    /// Its name.
    pub name: String,
    /// The logical chain it belongs to.
    pub chain: Chain,
    /// Whether it is the logical chain itself (hooked), not a shard.
    pub parent: bool,
    /// Its lines, as `iptables -S` prints them after `-A <name> `.
    pub lines: Vec<std::borrow::Cow<'a, str>>,
}

/// Docker's chain for user rules; natmap creates it (with its `FORWARD` jump)
/// when Docker has not, and Docker adopts it when it starts.
pub const DOCKER_USER: &str = "DOCKER-USER";

/// The tables natmap writes to, in the order they appear in restore input.
pub const TABLES: [&str; 2] = ["nat", "filter"];

/// The lines of natmap's chains in one family. Each line is what follows
/// `-A <chain> ` in `iptables -S`, in the canonical form iptables prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRules {
    chains: [Vec<String>; 4],
}

impl FamilyRules {
    /// The lines of one chain.
    pub fn chain(&self, chain: Chain) -> &[String] {
        &self.chains[chain.index()]
    }

    /// Appends a line to a chain.
    pub fn push(&mut self, chain: Chain, line: String) {
        self.chains[chain.index()].push(line);
    }

    /// Total number of lines.
    pub fn len(&self) -> usize {
        self.chains.iter().map(Vec::len).sum()
    }

    /// Whether there are no lines at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chains these lines occupy in the kernel, in restore order: each
    /// logical chain, then its shards in key order. Only shards that hold
    /// a line exist (an empty or small ruleset has few or none). A sharded
    /// parent holds its lines without a port match, in render order, then
    /// one jump per shard and port side its lines use ([`shard_jump`]);
    /// each shard holds, in render order, every line whose ports meet its
    /// block. Lines for the same port are thus in one shard, in the order
    /// rendered. Lines of different shards that one packet can match are
    /// only a filter accept keyed on `--dport` and one keyed on `--sport`:
    /// both ACCEPT, so their order does not matter.
    pub fn kernel(&self) -> Vec<KernelChain<'_>> {
        Chain::ALL
            .into_iter()
            .flat_map(|chain| self.kernel_of(chain))
            .collect()
    }

    /// [`FamilyRules::kernel`] of one logical chain: it, then its shards.
    pub fn kernel_of(&self, chain: Chain) -> Vec<KernelChain<'_>> {
        use std::borrow::Cow;
        use std::collections::{BTreeMap, BTreeSet};
        let mut out = Vec::new();
        {
            let lines = self.chain(chain);
            let parent = |lines| KernelChain {
                table: chain.table(),
                name: chain.name().to_owned(),
                chain,
                parent: true,
                lines,
            };
            if !chain.is_sharded() {
                out.push(parent(
                    lines.iter().map(|l| Cow::Borrowed(l.as_str())).collect(),
                ));
                return out;
            }
            let mut head: Vec<Cow<'_, str>> = Vec::new();
            let mut shards: BTreeMap<ShardKey, Vec<Cow<'_, str>>> = BTreeMap::new();
            let mut jumps: BTreeSet<(ShardKey, PortSide)> = BTreeSet::new();
            for line in lines {
                match shard_keys(line) {
                    Some((side, keys)) => {
                        for key in keys {
                            shards
                                .entry(key)
                                .or_default()
                                .push(Cow::Borrowed(line.as_str()));
                            jumps.insert((key, side));
                        }
                    }
                    None => head.push(Cow::Borrowed(line.as_str())),
                }
            }
            head.extend(
                jumps
                    .into_iter()
                    .map(|(key, side)| Cow::Owned(shard_jump(chain, key, side))),
            );
            out.push(parent(head));
            for (key, lines) in shards {
                out.push(KernelChain {
                    table: chain.table(),
                    name: chain.shard_name(key),
                    chain,
                    parent: false,
                    lines,
                });
            }
        }
        out
    }
}

/// natmap's whole desired (or applied) ruleset, both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    v4: FamilyRules,
    v6: FamilyRules,
}

impl Ruleset {
    /// The rules of one family.
    pub fn family(&self, family: Family) -> &FamilyRules {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// Mutable access to one family's rules.
    pub fn family_mut(&mut self, family: Family) -> &mut FamilyRules {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }
}

#[cfg(test)]
mod tests;
