//! The iptables driver: everything natmap knows about iptables.
//!
//! # Layout
//! - [`driver`]: [`IptablesDriver`], the [`crate::firewall::FirewallDriver`]
//!   over the modules below, and its mirror of what it applied;
//! - [`render`]: pure, rules → the lines of natmap's chains ([`Ruleset`]);
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
