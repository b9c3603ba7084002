//! The marks the nftables backend puts on the traffic it translates, so
//! the host's other firewalls let it through:
//!
//! - the connection mark (`ct mark`), set on every connection natmap's
//!   DNAT translates (and every `snat --forward` connection): Docker ≤ 28
//!   (iptables) drops forwarded traffic in `FORWARD`; natmap keeps one
//!   `-m connmark --mark V/M -j ACCEPT` in `DOCKER-USER` for it;
//! - the packet mark (`meta mark`), set on every forwarded packet of those
//!   connections: Docker 29's nftables backend accepts it with
//!   `dockerd --bridge-accept-fwmark V/M`.
//!
//! Both are `value/mask` (`0x10000000/0x10000000`); setting one changes
//! only the mask's bits, so other users of the other bits keep theirs.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::model::ParseError;

/// A mark: the bits of `mask` set to `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Mark {
    /// The bits' value (only bits of `mask`).
    pub value: u32,
    /// The bits the mark owns.
    pub mask: u32,
}

/// natmap's default bit: one bit, clear of kube-proxy's 0x4000/0x8000 and
/// the low bits policy-routing setups use.
pub const DEFAULT_BIT: u32 = 0x1000_0000;

impl Mark {
    /// One bit or a value under a mask.
    pub const fn new(value: u32, mask: u32) -> Mark {
        Mark { value, mask }
    }

    /// nft's `… and ~M or V` for setting the mark on `what` (`ct mark`,
    /// `meta mark`), as a statement.
    pub fn set(self, what: &str) -> String {
        if self.mask == u32::MAX {
            format!("{what} set {:#010x}", self.value)
        } else {
            format!(
                "{what} set {what} & {:#010x} | {:#010x}",
                !self.mask, self.value
            )
        }
    }

    /// nft's match of the mark on `what`.
    pub fn matches(self, what: &str) -> String {
        if self.mask == u32::MAX {
            format!("{what} {:#010x}", self.value)
        } else {
            format!("{what} & {:#010x} == {:#010x}", self.mask, self.value)
        }
    }

    /// iptables' `VALUE/MASK` (as `iptables -S` prints it back).
    pub fn iptables(self) -> String {
        format!("{:#x}/{:#x}", self.value, self.mask)
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

impl FromStr for Mark {
    type Err = ParseError;

    /// `VALUE[/MASK]`, each hexadecimal (`0x…`) or decimal; without a mask
    /// the mark owns all 32 bits (as Docker reads `--bridge-accept-fwmark`).
    fn from_str(s: &str) -> Result<Mark, ParseError> {
        let bad = || {
            ParseError::new(
                "mark",
                s,
                "VALUE[/MASK], e.g. 0x10000000/0x10000000: a non-zero value whose bits are all in the mask",
            )
        };
        let num = |t: &str| {
            let t = t.trim();
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => t.parse().ok(),
            }
        };
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (num(v).ok_or_else(bad)?, num(m).ok_or_else(bad)?),
            None => (num(s).ok_or_else(bad)?, u32::MAX),
        };
        if value == 0 || value & !mask != 0 {
            return Err(bad());
        }
        Ok(Mark { value, mask })
    }
}

impl TryFrom<String> for Mark {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Mark, ParseError> {
        s.parse()
    }
}

/// The marks of one daemon (`[nftables]` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Marks {
    /// The connection mark of translated connections.
    pub ct: Mark,
    /// The packet mark of their forwarded packets; `None`: not set.
    pub fw: Option<Mark>,
}

impl Default for Marks {
    fn default() -> Marks {
        let bit = Mark::new(DEFAULT_BIT, DEFAULT_BIT);
        Marks {
            ct: bit,
            fw: Some(bit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_with_and_without_a_mask() {
        let m: Mark = "0x10000000/0x10000000".parse().unwrap();
        assert_eq!(m, Mark::new(0x1000_0000, 0x1000_0000));
        assert_eq!(m.iptables(), "0x10000000/0x10000000");
        assert_eq!(
            m.set("ct mark"),
            "ct mark set ct mark & 0xefffffff | 0x10000000"
        );
        assert_eq!(m.matches("ct mark"), "ct mark & 0x10000000 == 0x10000000");
        let all: Mark = "42".parse().unwrap();
        assert_eq!(all, Mark::new(42, u32::MAX));
        assert_eq!(all.set("meta mark"), "meta mark set 0x0000002a");
        for bad in ["0", "0x3/0x1", "x", "1/", "0x1/0x1/0x1"] {
            assert!(bad.parse::<Mark>().is_err(), "{bad}");
        }
    }
}
